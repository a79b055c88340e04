//! Fused training-mode batch normalisation for CPU: one op for the forward pass and one for the
//! backward pass, in closed form.
//!
//! Composing batch norm from candle tensor ops costs about ten full-size temporaries in backward
//! and multi-axis reductions over broadcasts; in MobileNetV2 training that dominated the step.
//! Here the forward computes per-channel mean and biased variance (accumulated in f64), keeps them
//! in the op for the backward pass, and writes `y = (x − μ)·γ/σ + β`. The backward uses
//! `∂β = Σg`, `∂γ = Σg·x̂`, `∂x = γ/σ · (g − ∂β/m − x̂·∂γ/m)` with `m = n·h·w`.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
    backend::BackendStorage, bail,
};
use rayon::prelude::*;

use super::simd;

/// Per-channel statistics of one training batch.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    /// Biased (divide by `m`) variance.
    pub var: Vec<f64>,
    pub inv_std: Vec<f64>,
    /// Values per channel, `n·h·w`.
    pub count: usize,
    /// The affine map the forward pass applied, `y = x·scale + shift` (before any ReLU6), per
    /// channel: `γ/σ` and `β − μ·γ/σ`. The backward pass recomputes the ReLU6's mask with it (the
    /// same values in the same arithmetic), so it need not read the output.
    pub scale: Vec<f64>,
    pub shift: Vec<f64>,
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// `(n, c, h·w)` of an `[n, c, …]` input (`[n, c, h·w]` or `[n, c, h, w]`): the op works on the
/// tensor as it comes, so no reshape (and no graph node with its own gradient) is needed around it.
fn dims3(l: &Layout, op: &str) -> Result<(usize, usize, usize)> {
    match l.dims() {
        [a, b, rest @ ..] if !rest.is_empty() => Ok((*a, *b, rest.iter().product())),
        d => bail!("{op}: input must be [n, c, h·w] or [n, c, h, w], got {d:?}"),
    }
}

/// `(x [n,c,hw], γ [c], β [c]) → y`; records the batch statistics for [`BnTrain::stats`].
pub(super) struct BnTrain {
    pub(super) eps: f64,
    /// Clamp the output to `[0, 6]` (a ReLU6 fused into the same pass and graph node).
    pub(super) relu6: bool,
    /// Shared with the caller, which reads the statistics after the forward pass.
    pub(super) stats: Arc<Mutex<Option<BatchStats>>>,
}

impl BnTrain {
    fn run<T: WithDType>(&self, x: &[T], (n, c, hw): (usize, usize, usize), g: &[T], b: &[T]) -> Vec<T> {
        let m = (n * hw) as f64;
        let per_channel: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let planes = || (0..n).map(|i| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw]);
                simd::vectorized(
                    #[inline(always)]
                    || {
                        let sum: f64 = planes().map(|p| lane_sum(p, 0.0, false)).sum();
                        let mean = sum / m;
                        let ss: f64 = planes().map(|p| lane_sum(p, mean, true)).sum();
                        (mean, ss / m)
                    },
                )
            })
            .collect();
        let mean: Vec<f64> = per_channel.iter().map(|p| p.0).collect();
        let var: Vec<f64> = per_channel.iter().map(|p| p.1).collect();
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let scale: Vec<f64> = (0..c).map(|ch| inv_std[ch] * g[ch].to_f64()).collect();
        let shift: Vec<f64> = (0..c).map(|ch| b[ch].to_f64() - mean[ch] * scale[ch]).collect();
        let fill = |y: &mut [MaybeUninit<T>]| {
            y.par_chunks_mut(hw).enumerate().for_each(|(p, yp)| {
                let ch = p % c;
                let (a, shift) = (T::from_f64(scale[ch]), T::from_f64(shift[ch]));
                let xp = &x[p * hw..(p + 1) * hw];
                simd::vectorized(
                    #[inline(always)]
                    || {
                        if self.relu6 {
                            for (yv, xv) in yp.iter_mut().zip(xp) {
                                yv.write(super::clamp6(*xv * a + shift));
                            }
                        } else {
                            for (yv, xv) in yp.iter_mut().zip(xp) {
                                yv.write(*xv * a + shift);
                            }
                        }
                    },
                )
            })
        };
        // SAFETY: the planes cover the buffer and every value of each is written.
        let y = unsafe { super::written(x.len(), fill) };
        *self.stats.lock().expect("stats lock") =
            Some(BatchStats { mean, var, inv_std, count: n * hw, scale, shift });
        y
    }
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims3(l1, self.name())?;
        if l2.dims() != [d.1] || l3.dims() != [d.1] {
            bail!("{}: weight/bias must be [{}], got {:?}/{:?}", self.name(), d.1, l2.dims(), l3.dims());
        }
        let name = self.name();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.run(
                slice::<f32>(s1, l1, name, "input")?,
                d,
                slice::<f32>(s2, l2, name, "weight")?,
                slice::<f32>(s3, l3, name, "bias")?,
            )),
            DType::F64 => CpuStorage::F64(self.run(
                slice::<f64>(s1, l1, name, "input")?,
                d,
                slice::<f64>(s2, l2, name, "weight")?,
                slice::<f64>(s3, l3, name, "bias")?,
            )),
            dt => bail!("{name}: unsupported dtype {dt:?} (f32 or f64)"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.lock().expect("stats lock").clone() else {
            bail!("{}: backward before forward", self.name());
        };
        let gamma = gamma.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let op = BnTrainBwd { stats, gamma, relu6: self.relu6, reductions: Mutex::new(None) };
        let dx = x.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let Some((dgamma, dbeta)) = op.reductions.lock().expect("reductions lock").take() else {
            bail!("{}: backward produced no parameter gradients", self.name());
        };
        let c = dgamma.len();
        let dev = x.device();
        let dgamma = Tensor::from_vec(dgamma, c, dev)?.to_dtype(x.dtype())?;
        let dbeta = Tensor::from_vec(dbeta, c, dev)?.to_dtype(x.dtype())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `(x, grad) → ∂x`, leaving `(∂γ, ∂β)` in `reductions`. With `relu6` the gradient counts only
/// where the output was inside the clamp, `0 < x·scale + shift < 6`, recomputed from `x` as the
/// forward pass computed it (bit for bit), so the output is not read: two streams per pass
/// instead of three, and this op is bound by memory traffic.
pub(super) struct BnTrainBwd {
    pub(super) stats: BatchStats,
    pub(super) gamma: Vec<f64>,
    pub(super) relu6: bool,
    pub(super) reductions: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
}

/// Partial sums per lane: independent accumulators LLVM can keep in one vector register, where a
/// single running sum would make every addition wait for the one before.
const SUM_LANES: usize = 8;

/// `Σ (v − shift)` over `p` (squared when `square`), in f64: element `j` into partial sum
/// `j mod SUM_LANES`, then the partial sums in order plus the tail's sum.
#[inline(always)]
fn lane_sum<T: WithDType>(p: &[T], shift: f64, square: bool) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if simd::level() >= simd::Level::Avx2 && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32 (so the cast keeps length and values); the CPU has AVX (AVX2 level).
        return unsafe {
            lane_sum_avx(std::slice::from_raw_parts(p.as_ptr().cast::<f32>(), p.len()), shift, square)
        };
    }
    let f = |d: f64| if square { d * d } else { d };
    let mut acc = [0f64; SUM_LANES];
    let chunks = p.chunks_exact(SUM_LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f(v.to_f64() - shift);
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|v| f(v.to_f64() - shift)).sum::<f64>()
}

/// [`lane_sum`] for f32 in AVX registers (same operations in the same order: the same bits); see
/// [`grad_sums_avx`].
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn lane_sum_avx(p: &[f32], shift: f64, square: bool) -> f64 {
    use std::arch::x86_64::*;
    let n = p.len() / SUM_LANES * SUM_LANES;
    let vshift = _mm256_set1_pd(shift);
    let mut acc = [_mm256_setzero_pd(); 2];
    let mut j = 0;
    while j < n {
        for (h, a) in acc.iter_mut().enumerate() {
            // SAFETY: j + 4·h + 4 ≤ n ≤ p.len().
            let d =
                _mm256_sub_pd(_mm256_cvtps_pd(unsafe { _mm_loadu_ps(p.as_ptr().add(j + 4 * h)) }), vshift);
            *a = _mm256_add_pd(*a, if square { _mm256_mul_pd(d, d) } else { d });
        }
        j += SUM_LANES;
    }
    let mut lanes = [0f64; SUM_LANES];
    // SAFETY: `lanes` holds two registers of four.
    unsafe {
        _mm256_storeu_pd(lanes.as_mut_ptr(), acc[0]);
        _mm256_storeu_pd(lanes.as_mut_ptr().add(4), acc[1]);
    }
    let f = |d: f64| if square { d * d } else { d };
    lanes.iter().sum::<f64>() + p[n..].iter().map(|v| f(f64::from(*v) - shift)).sum::<f64>()
}

/// The gradient where it passes a fused ReLU6 (`0 < x·a + b < 6`, the pre-clamp output as the
/// forward pass computed it), else zero.
#[inline(always)]
fn passed<T: WithDType>(g: T, x: T, (a, b): (T, T), relu6: bool) -> T {
    if !relu6 || super::relu6_passes(x * a + b) { g } else { T::zero() }
}

/// Adds `Σ g·(x − μ)` and `Σ g` over one plane to `(dg, db)`, `g` counted only where it passes
/// the fused ReLU6 when `relu6`: element `j` into f64 partial sum `j mod SUM_LANES` (as in
/// `lane_sum`), the tail straight into the totals, then the partial sums in order.
#[inline(always)]
fn grad_sums<T: WithDType>(xp: &[T], gp: &[T], mean: f64, pre: (T, T), relu6: bool, sums: &mut (f64, f64)) {
    #[cfg(target_arch = "x86_64")]
    if simd::level() >= simd::Level::Avx2 && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32 (so the casts keep lengths and values); the CPU has AVX (AVX2 level).
        unsafe {
            let f = |s: &[T]| std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len());
            let pre = (pre.0.to_f64() as f32, pre.1.to_f64() as f32);
            return grad_sums_avx(f(xp), f(gp), mean, pre, relu6, sums);
        }
    }
    grad_sums_scalar(xp, gp, mean, pre, relu6, sums)
}

#[inline(always)]
fn grad_sums_scalar<T: WithDType>(
    xp: &[T],
    gp: &[T],
    mean: f64,
    pre: (T, T),
    relu6: bool,
    (dg, db): &mut (f64, f64),
) {
    let (mut ag, mut ab) = ([0f64; SUM_LANES], [0f64; SUM_LANES]);
    let (xc, gc) = (xp.chunks_exact(SUM_LANES), gp.chunks_exact(SUM_LANES));
    let (xr, gr) = (xc.remainder(), gc.remainder());
    for (xs, gs) in xc.zip(gc) {
        for l in 0..SUM_LANES {
            let gv = passed(gs[l], xs[l], pre, relu6).to_f64();
            ab[l] += gv;
            ag[l] += gv * (xs[l].to_f64() - mean);
        }
    }
    finish_grad_sums(xr, gr, mean, pre, relu6, (ag, ab), (dg, db));
}

/// The tail and the partial sums of [`grad_sums`].
#[inline(always)]
fn finish_grad_sums<T: WithDType>(
    xr: &[T],
    gr: &[T],
    mean: f64,
    pre: (T, T),
    relu6: bool,
    (ag, ab): ([f64; SUM_LANES], [f64; SUM_LANES]),
    (dg, db): (&mut f64, &mut f64),
) {
    for (xv, gv) in xr.iter().zip(gr) {
        let gv = passed(*gv, *xv, pre, relu6).to_f64();
        *db += gv;
        *dg += gv * (xv.to_f64() - mean);
    }
    *db += ab.iter().sum::<f64>();
    *dg += ag.iter().sum::<f64>();
}

/// [`grad_sums_scalar`] for f32 in AVX registers: the eight f64 partial sums as two registers
/// of four, each element converted, masked and accumulated with the same operations in the same
/// order as the scalar loop (so the same bits), which LLVM does not vectorise on its own (it
/// converts f32 to f64 one value at a time).
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn grad_sums_avx(
    xp: &[f32],
    gp: &[f32],
    mean: f64,
    (a, b): (f32, f32),
    relu6: bool,
    (dg, db): &mut (f64, f64),
) {
    use std::arch::x86_64::*;
    const _: () = assert!(SUM_LANES == 8, "two registers of four f64 partial sums");
    let n = xp.len().min(gp.len()) / SUM_LANES * SUM_LANES;
    let (va, vb, zero, six) = (_mm_set1_ps(a), _mm_set1_ps(b), _mm_setzero_ps(), _mm_set1_ps(6.0));
    let vmean = _mm256_set1_pd(mean);
    let (mut ab, mut ag) = ([_mm256_setzero_pd(); 2], [_mm256_setzero_pd(); 2]);
    let mut j = 0;
    while j < n {
        for h in 0..2 {
            // SAFETY: j + 4·h + 4 ≤ n ≤ both lengths.
            let (x, g) = unsafe {
                (_mm_loadu_ps(xp.as_ptr().add(j + 4 * h)), _mm_loadu_ps(gp.as_ptr().add(j + 4 * h)))
            };
            let g = if relu6 {
                // `passed`: 0 < x·a + b < 6 (false for NaN), else +0.
                let y = _mm_add_ps(_mm_mul_ps(x, va), vb);
                _mm_and_ps(_mm_and_ps(_mm_cmpgt_ps(y, zero), _mm_cmplt_ps(y, six)), g)
            } else {
                g
            };
            let (gd, xd) = (_mm256_cvtps_pd(g), _mm256_cvtps_pd(x));
            ab[h] = _mm256_add_pd(ab[h], gd);
            ag[h] = _mm256_add_pd(ag[h], _mm256_mul_pd(gd, _mm256_sub_pd(xd, vmean)));
        }
        j += SUM_LANES;
    }
    let lanes = |r: [__m256d; 2]| -> [f64; SUM_LANES] {
        let mut out = [0f64; SUM_LANES];
        // SAFETY: `out` holds two registers of four.
        unsafe {
            _mm256_storeu_pd(out.as_mut_ptr(), r[0]);
            _mm256_storeu_pd(out.as_mut_ptr().add(4), r[1]);
        }
        out
    };
    let pre = (a, b);
    finish_grad_sums(&xp[n..], &gp[n..], mean, pre, relu6, (lanes(ag), lanes(ab)), (dg, db));
}

impl BnTrainBwd {
    fn run<T: WithDType>(&self, x: &[T], g: &[T], (n, c, hw): (usize, usize, usize)) -> Vec<T> {
        let st = &self.stats;
        let relu6 = self.relu6;
        let affine = |ch: usize| (T::from_f64(st.scale[ch]), T::from_f64(st.shift[ch]));
        let red: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mean, pre) = (st.mean[ch], affine(ch));
                let mut sums = (0.0, 0.0);
                for i in 0..n {
                    let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                    let (xp, gp) = (&x[r.clone()], &g[r]);
                    grad_sums(xp, gp, mean, pre, relu6, &mut sums);
                }
                let (dg, db) = sums;
                (dg * st.inv_std[ch], db)
            })
            .collect();
        let m = st.count as f64;
        let fill = |dx: &mut [MaybeUninit<T>]| {
            dx.par_chunks_mut(hw).enumerate().for_each(|(p, dp)| {
                let ch = p % c;
                let (mean, inv) = (st.mean[ch], st.inv_std[ch]);
                let (dg, db) = red[ch];
                // ∂x = k·g − k·∂β/m − k·(x − μ)·σ⁻¹·∂γ/m with k = γ/σ, as a·g + b·x + e.
                let k = self.gamma[ch] * inv;
                let bx = -k * inv * dg / m;
                let e = -k * db / m - bx * mean;
                let (k, bx, e) = (T::from_f64(k), T::from_f64(bx), T::from_f64(e));
                let pre = affine(ch);
                let r = p * hw..(p + 1) * hw;
                let (xp, gp) = (&x[r.clone()], &g[r]);
                simd::vectorized(
                    #[inline(always)]
                    || {
                        for ((d, xv), gv) in dp.iter_mut().zip(xp).zip(gp) {
                            d.write(k * passed(*gv, *xv, pre, relu6) + bx * *xv + e);
                        }
                    },
                )
            })
        };
        // SAFETY: the planes cover the buffer and every value of each is written.
        let dx = unsafe { super::written(x.len(), fill) };
        *self.reductions.lock().expect("reductions lock") =
            Some((red.iter().map(|r| r.0).collect(), red.iter().map(|r| r.1).collect()));
        dx
    }
}

impl CustomOp2 for BnTrainBwd {
    fn name(&self) -> &'static str {
        "batch-norm-train-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims3(l1, self.name())?;
        if l1.shape() != l2.shape() {
            bail!("{}: input {:?} and grad {:?} differ", self.name(), l1.dims(), l2.dims());
        }
        let name = self.name();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.run(
                slice::<f32>(s1, l1, name, "input")?,
                slice::<f32>(s2, l2, name, "grad")?,
                d,
            )),
            DType::F64 => CpuStorage::F64(self.run(
                slice::<f64>(s1, l1, name, "input")?,
                slice::<f64>(s2, l2, name, "grad")?,
                d,
            )),
            dt => bail!("{name}: unsupported dtype {dt:?} (f32 or f64)"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Training-mode batch norm of `x3` (`[n, c, h·w]` or `[n, c, h, w]`) with affine `gamma`, `beta`
/// (`[c]`), on CPU, followed by a ReLU6 when `relu6`. Returns the output and the batch statistics
/// (for the running averages).
pub fn batch_norm_train_cpu(
    x3: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu6: bool,
) -> Result<(Tensor, BatchStats)> {
    let slot = Arc::new(Mutex::new(None));
    let op = BnTrain { eps, relu6, stats: slot.clone() };
    let y = x3.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let Some(stats) = slot.lock().expect("stats lock").clone() else {
        bail!("batch-norm-train: forward produced no statistics");
    };
    Ok((y, stats))
}

/// Training-mode batch norm of `x` (`[n, c, h·w]` or `[n, c, h, w]`) on CUDA, the ReLU6 fused
/// when `relu6`: the output and the batch statistics `[3, c]` (f64: mean, biased variance,
/// `1/√(var + ε)`), which stay on the device. Differentiable wrt `x`, `gamma` and `beta`.
#[cfg(feature = "cuda")]
pub(crate) fn batch_norm_train_cuda(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu6: bool,
) -> Result<(Tensor, Tensor)> {
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&cuda_ops::Stats { eps })?;
    let op = cuda_ops::Train { stats: stats.clone(), relu6 };
    let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    Ok((y, stats))
}

/// The ops behind [`batch_norm_train_cuda`]; the kernels are in `kernels/batchnorm.cu`.
#[cfg(feature = "cuda")]
mod cuda_ops {
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, bail};

    use super::dims3;
    use crate::nn::cuda::{self, Bn};

    fn bn(l: &Layout, op: &str) -> Result<Bn> {
        let (n, c, hw) = dims3(l, op)?;
        Ok(Bn { n, c, hw })
    }

    fn cuda_only(op: &str) -> Result<(CpuStorage, Shape)> {
        bail!("{op}: CUDA only (the CPU has its own batch-norm ops)")
    }

    /// `x → [3, c]` f64 statistics.
    pub(super) struct Stats {
        pub eps: f64,
    }

    impl CustomOp1 for Stats {
        fn name(&self) -> &'static str {
            "batch-norm-stats"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cuda_only(self.name())
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let d = bn(l, self.name())?;
            Ok((cuda::bn_stats((s, l), d, self.eps)?, Shape::from((3, d.c))))
        }
    }

    /// `(x, γ, β) → y` from the statistics; its backward runs [`Reduce`] and [`GradInput`].
    pub(super) struct Train {
        pub stats: Tensor,
        pub relu6: bool,
    }

    impl CustomOp3 for Train {
        fn name(&self) -> &'static str {
            "batch-norm-train"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cuda_only(self.name())
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let d = bn(l1, self.name())?;
            if l2.dims() != [d.c] || l3.dims() != [d.c] {
                bail!("{}: weight/bias must be [{}], got {:?}/{:?}", self.name(), d.c, l2.dims(), l3.dims());
            }
            let y = cuda::with_storage(&self.stats, |ss, sl| {
                cuda::bn_apply((s1, l1), (s2, l2), (s3, l3), (ss, sl), d, self.relu6)
            })?;
            Ok((y, l1.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            gamma: &Tensor,
            _beta: &Tensor,
            res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let grad = grad.contiguous()?;
            let red =
                x.apply_op3_no_bwd(&grad, res, &Reduce { stats: self.stats.clone(), relu6: self.relu6 })?;
            let op = GradInput {
                stats: self.stats.clone(),
                red: red.clone(),
                gamma: gamma.clone(),
                relu6: self.relu6,
            };
            let dx = x.apply_op3_no_bwd(&grad, res, &op)?;
            let dtype = x.dtype();
            Ok((Some(dx), Some(red.get(0)?.to_dtype(dtype)?), Some(red.get(1)?.to_dtype(dtype)?)))
        }
    }

    /// `(x, g, y) → [2, c]` f64: ∂γ and ∂β.
    struct Reduce {
        stats: Tensor,
        relu6: bool,
    }

    impl CustomOp3 for Reduce {
        fn name(&self) -> &'static str {
            "batch-norm-grad-sums"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cuda_only(self.name())
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let d = bn(l1, self.name())?;
            if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
                bail!(
                    "{}: input {:?}, grad {:?} and output {:?} differ",
                    self.name(),
                    l1.dims(),
                    l2.dims(),
                    l3.dims()
                );
            }
            let red = cuda::with_storage(&self.stats, |ss, sl| {
                cuda::bn_grad_reduce((s1, l1), (s2, l2), (s3, l3), (ss, sl), d, self.relu6)
            })?;
            Ok((red, Shape::from((2, d.c))))
        }
    }

    /// `(x, g, y) → ∂x`.
    struct GradInput {
        stats: Tensor,
        red: Tensor,
        gamma: Tensor,
        relu6: bool,
    }

    impl CustomOp3 for GradInput {
        fn name(&self) -> &'static str {
            "batch-norm-grad-input"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cuda_only(self.name())
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let d = bn(l1, self.name())?;
            if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
                bail!(
                    "{}: input {:?}, grad {:?} and output {:?} differ",
                    self.name(),
                    l1.dims(),
                    l2.dims(),
                    l3.dims()
                );
            }
            let gamma = self.gamma.contiguous()?;
            let dx = cuda::with_storage(&gamma, |gs, gl| {
                cuda::with_storage(&self.stats, |ss, sl| {
                    cuda::with_storage(&self.red, |rs, rl| {
                        cuda::bn_grad_input(
                            (s1, l1),
                            (s2, l2),
                            (s3, l3),
                            (gs, gl),
                            (ss, sl),
                            (rs, rl),
                            d,
                            self.relu6,
                        )
                    })
                })
            })?;
            Ok((dx, l1.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::pseudo_random;

    /// The AVX sums of the forward pass give the scalar loop's bits.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx_statistics_sums_give_the_scalar_bits() {
        if !std::arch::is_x86_feature_detected!("avx") {
            // The AVX path is never taken on this CPU.
            return;
        }
        for len in [0, 5, 8, 13, 64, 197] {
            let x: Vec<f32> = pseudo_random(len, 3).iter().map(|v| (v * 4.0 + 1.0) as f32).collect();
            // The scalar loop, on the same values widened (exactly) to f64.
            let wide: Vec<f64> = x.iter().map(|v| f64::from(*v)).collect();
            for (shift, square) in [(0.0, false), (0.7, true)] {
                let scalar = lane_sum(&wide, shift, square);
                // SAFETY: AVX detected above.
                let avx = unsafe { lane_sum_avx(&x, shift, square) };
                assert_eq!(avx.to_bits(), scalar.to_bits(), "len {len}, square {square}: {avx} vs {scalar}");
            }
        }
    }

    /// The AVX reduction of the backward pass gives the scalar loop's bits: with and without the
    /// ReLU6, values cut at both ends, a NaN (which both carry into `Σ g·(x − μ)`), and lengths
    /// with and without a tail.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx_gradient_sums_give_the_scalar_bits() {
        if !std::arch::is_x86_feature_detected!("avx") {
            // The AVX path is never taken on this CPU.
            return;
        }
        for len in [0, 5, 8, 13, 64, 197] {
            let mut x: Vec<f32> = pseudo_random(len, 1).iter().map(|v| (v * 4.0) as f32).collect();
            let g: Vec<f32> = pseudo_random(len, 2).iter().map(|v| *v as f32).collect();
            if len > 10 {
                x[3] = f32::NAN;
            }
            for relu6 in [false, true] {
                let (mean, pre) = (0.3, (1.7f32, 2.5f32));
                let mut scalar = (0.25, -1.0);
                let mut avx = scalar;
                grad_sums_scalar(&x, &g, mean, pre, relu6, &mut scalar);
                // SAFETY: AVX detected above.
                unsafe { grad_sums_avx(&x, &g, mean, pre, relu6, &mut avx) };
                let bits = |s: (f64, f64)| (s.0.to_bits(), s.1.to_bits());
                assert_eq!(bits(avx), bits(scalar), "len {len}, relu6 {relu6}: {avx:?} vs {scalar:?}");
            }
        }
    }
}
