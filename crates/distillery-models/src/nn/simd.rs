//! Runtime choice of the widest vector instructions the CPU has, for our own loops.
//!
//! The workspace is compiled for the baseline x86-64 target (SSE2: four f32 lanes, no FMA), so
//! the binary runs on any x86-64 machine. The hot loops of the CPU kernels (depthwise
//! convolution, batch norm, ReLU6, unfolding, elementwise ONNX ops) are written as plain Rust
//! loops that LLVM vectorises; [`vectorized`] runs such a loop inside a function compiled for
//! AVX-512 or AVX2 when the CPU supports it, so the same source gets 16 or 8 lanes. gemm has its
//! own runtime dispatch and is not affected.
//!
//! No variant fuses multiplies and adds (Rust never contracts `a * b + c`), and each variant
//! performs the same operations per element in the same order, so all of them give bit-identical
//! results: only the speed depends on the CPU.
//!
//! The closure passed in, and every function it calls that should be vectorised, must be
//! `#[inline(always)]`: code that is not inlined into the wrapper is compiled for the baseline.

use std::sync::OnceLock;

/// The vector instruction sets [`vectorized`] chooses among.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The compile-time target only (SSE2 on x86-64).
    Baseline,
    /// AVX2 with FMA (8 f32 lanes).
    Avx2,
    /// AVX-512 F/BW/DQ/VL (16 f32 lanes).
    Avx512,
}

/// The widest level this CPU supports, detected once. `DISTILLERY_SIMD=baseline|avx2` caps it
/// (to compare the variants, or to rule them out when chasing a problem).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("DISTILLERY_SIMD").as_deref() {
            Ok("baseline") => Level::Baseline,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        detected().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Level {
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        Level::Avx512
    } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        Level::Avx2
    } else {
        Level::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Level {
    Level::Baseline
}

/// Runs `f` compiled for the widest vector instruction set of this CPU (see the module docs:
/// `f` must be `#[inline(always)]`, as must what it calls).
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    /// The closure as a kernel of [`with_lanes`], which ignores the register type.
    struct Loop<F>(F);
    impl<R, F: FnOnce() -> R> WithLanes for Loop<F> {
        type Output = R;
        #[inline(always)]
        fn run<V: Vf32>(self) -> R {
            (self.0)()
        }
    }
    with_lanes(Loop(f))
}

/// A register of f32 lanes, for kernels whose loops LLVM does not vectorise on its own (short
/// fixed-length groups get unrolled into scalar code first). Implemented for `f32` (one lane,
/// any CPU) and, on x86-64, SSE (4), AVX2 (8) and AVX-512 (16) registers.
///
/// # Safety
/// The methods use the instructions of their type: call them only from code running under
/// [`with_lanes`], which picks a type the CPU supports. Pointers must be valid for the lanes read
/// or written.
// Every method has the one contract stated above.
#[allow(clippy::missing_safety_doc)]
pub trait Vf32: Copy {
    /// f32 values per register.
    const LANES: usize;
    /// The type with half as many lanes (`f32` for itself), for groups narrower than a register.
    type Half: Vf32;
    unsafe fn splat(v: f32) -> Self;
    /// `LANES` consecutive values from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// Every other value from `p`: `p[0], p[2], …, p[2·(LANES−1)]`, reading no further.
    unsafe fn load_even(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    /// `max(self, o)`, giving `o` where `self` is NaN (as `f32::max(self, o)` does for `o` = 0).
    unsafe fn max(self, o: Self) -> Self;
}

impl Vf32 for f32 {
    const LANES: usize = 1;
    type Half = f32;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        v
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn load_even(p: *const f32) -> Self {
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { *p = self }
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        if self > o { self } else { o }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Vf32;

    impl Vf32 for __m128 {
        const LANES: usize = 4;
        type Half = f32;
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { _mm_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_even(p: *const f32) -> Self {
            // p[0..4] and p[3..7]: lanes p0, p2 from the first, p4, p6 from the second.
            unsafe {
                let (lo, hi) = (_mm_loadu_ps(p), _mm_loadu_ps(p.add(3)));
                _mm_shuffle_ps::<0b11_01_10_00>(lo, hi)
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { _mm_add_ps(self, o) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { _mm_mul_ps(self, o) }
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            unsafe { _mm_max_ps(self, o) }
        }
    }

    impl Vf32 for __m256 {
        const LANES: usize = 8;
        type Half = __m128;
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_even(p: *const f32) -> Self {
            // p[0..8] and p[7..15]: lanes p0..p6 from the first, p8..p14 (its 1, 3, 5, 7) from
            // the second.
            unsafe {
                let (lo, hi) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(7)));
                let a = _mm256_permutevar8x32_ps(lo, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0));
                let b = _mm256_permutevar8x32_ps(hi, _mm256_setr_epi32(0, 0, 0, 0, 1, 3, 5, 7));
                _mm256_blend_ps::<0xF0>(a, b)
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { _mm256_add_ps(self, o) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { _mm256_mul_ps(self, o) }
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            unsafe { _mm256_max_ps(self, o) }
        }
    }

    impl Vf32 for __m512 {
        const LANES: usize = 16;
        type Half = __m256;
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_even(p: *const f32) -> Self {
            // p[0..16] and p[15..31]: lanes p0..p14 from the first, p16..p30 (its 1, 3, …, 15)
            // from the second (index bit 4 picks the second register).
            unsafe {
                let (lo, hi) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(15)));
                let idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31);
                _mm512_permutex2var_ps(lo, idx, hi)
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { _mm512_add_ps(self, o) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { _mm512_mul_ps(self, o) }
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            unsafe { _mm512_max_ps(self, o) }
        }
    }
}

/// A kernel written once over a register type ([`Vf32`]); [`with_lanes`] runs it with the widest
/// one this CPU has. `run` must be `#[inline(always)]`, as must what it calls.
pub trait WithLanes {
    type Output;
    fn run<V: Vf32>(self) -> Self::Output;
}

/// Runs `k` with the widest register type this CPU supports (see [`level`]).
#[inline(always)]
pub fn with_lanes<K: WithLanes>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: `level` returns these only when the CPU has the features the wrappers enable.
        Level::Avx512 => return unsafe { run_avx512(k) },
        Level::Avx2 => return unsafe { run_avx2(k) },
        Level::Baseline => return k.run::<std::arch::x86_64::__m128>(),
    }
    #[allow(unreachable_code)]
    k.run::<f32>()
}

// Not closures: a closure passed into a `#[target_feature]` function is compiled without the
// features, and the intrinsics it calls would not be inlined into it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn run_avx512<K: WithLanes>(k: K) -> K::Output {
    k.run::<std::arch::x86_64::__m512>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn run_avx2<K: WithLanes>(k: K) -> K::Output {
    k.run::<std::arch::x86_64::__m256>()
}

/// Runs `k` once with every register type this CPU supports, narrowest first (for tests that
/// compare the variants).
#[cfg(test)]
pub(crate) fn each_level<K: WithLanes + Clone>(k: K) -> Vec<K::Output> {
    let mut outs = vec![k.clone().run::<f32>()];
    #[cfg(target_arch = "x86_64")]
    {
        outs.push(k.clone().run::<std::arch::x86_64::__m128>());
        if detected() >= Level::Avx2 {
            // SAFETY: the CPU has AVX2.
            outs.push(unsafe { run_avx2(k.clone()) });
        }
        if detected() >= Level::Avx512 {
            // SAFETY: the CPU has AVX-512.
            outs.push(unsafe { run_avx512(k) });
        }
    }
    outs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(always)]
    fn saxpy(a: f32, x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    }

    fn data(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 100.0).collect()
    }

    #[test]
    fn vectorized_loops_give_the_baseline_bits() {
        let x = data(1000);
        let mut want = vec![0.5f32; x.len()];
        saxpy(1.7, &x, &mut want);
        let mut got = vec![0.5f32; x.len()];
        vectorized(
            #[inline(always)]
            || saxpy(1.7, &x, &mut got),
        );
        assert_eq!(want, got, "{:?}", level());
    }

    /// Each register type's operations against plain f32 arithmetic.
    struct Ops<'a>(&'a [f32]);

    impl WithLanes for Ops<'_> {
        type Output = Vec<Vec<f32>>;
        #[inline(always)]
        fn run<V: Vf32>(self) -> Vec<Vec<f32>> {
            check::<V>(self.0)
        }
    }

    #[inline(always)]
    fn check<V: Vf32>(x: &[f32]) -> Vec<Vec<f32>> {
        let l = V::LANES;
        let mut outs = vec![vec![0f32; l]; 5];
        // SAFETY: every pointer has at least 2·l values behind it; the caller picked `V`.
        unsafe {
            let (a, b) = (V::load(x.as_ptr()), V::load(x.as_ptr().add(l)));
            a.add(b).store(outs[0].as_mut_ptr());
            a.mul(b).store(outs[1].as_mut_ptr());
            a.max(V::splat(0.0)).store(outs[2].as_mut_ptr());
            V::load_even(x.as_ptr().add(1)).store(outs[3].as_mut_ptr());
            V::splat(x[3]).store(outs[4].as_mut_ptr());
        }
        outs
    }

    #[test]
    fn registers_compute_like_scalars() {
        let mut x = data(40);
        x[2] = f32::NAN;
        let want = |l: usize| {
            vec![
                (0..l).map(|i| x[i] + x[l + i]).collect::<Vec<_>>(),
                (0..l).map(|i| x[i] * x[l + i]).collect(),
                (0..l).map(|i| x[i].max(0.0)).collect(),
                (0..l).map(|i| x[1 + 2 * i]).collect(),
                vec![x[3]; l],
            ]
        };
        let same = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            a.iter().flatten().zip(b.iter().flatten()).all(|(p, q)| p.to_bits() == q.to_bits())
        };
        assert!(same(&check::<f32>(&x), &want(1)));
        let got = with_lanes(Ops(&x));
        assert!(same(&got, &want(got[0].len())), "{:?}: {got:?}", level());
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            assert!(same(&check::<__m128>(&x), &want(4)));
            if detected() >= Level::Avx2 {
                // SAFETY: the CPU has AVX2.
                assert!(same(&unsafe { run_avx2(Ops(&x)) }, &want(8)));
            }
            if detected() >= Level::Avx512 {
                // SAFETY: the CPU has AVX-512.
                assert!(same(&unsafe { run_avx512(Ops(&x)) }, &want(16)));
            }
        }
    }
}
