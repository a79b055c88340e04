//! Depthwise 3×3 convolution (padding 1, stride 1 or 2) as a hand-written candle op.
//!
//! candle's grouped convolution runs one convolution per channel, and its backward pass is
//! roughly 15× slower than a direct kernel. MobileNet-style students spend most of their layers
//! in depthwise convolutions, so this module implements forward and both gradients directly on
//! CPU, parallel over `(n, c)` planes with rayon, and (with the `cuda` feature) on CUDA through
//! the kernels of [`super::cuda`]. Other devices take a composition of candle ops (nine shifted
//! multiply-adds), not candle's grouped convolution.

use candle_core::{
    CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, backend::BackendStorage, bail,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::fastconv::SamePart;

/// Output side of a 3×3, padding-1 convolution with `stride` over an input of side `n`.
#[inline]
pub fn out_side(n: usize, stride: usize) -> usize {
    (n - 1) / stride + 1
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    let slice = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&slice[a..b]),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// Forward op: `(x [n,c,h,w], w [c,1,3,3]) → y [n,c,ho,wo]`.
pub(super) struct DwFwd {
    pub(super) stride: usize,
}

/// Gradient wrt the input: `(grad_y [n,c,ho,wo], w [c,1,3,3]) → grad_x [n,c,h,w]`.
struct DwBwdInput {
    stride: usize,
    h: usize,
    w: usize,
}

/// Gradient wrt the weight: `(x [n,c,h,w], grad_y [n,c,ho,wo]) → grad_w [c,1,3,3]`.
struct DwBwdWeight {
    stride: usize,
}

/// Valid output columns for kernel column `kx`: `ox` such that `ix = ox*s + kx - 1` is in `0..w`.
#[inline]
fn ox_range(kx: usize, stride: usize, w: usize, wo: usize) -> (usize, usize) {
    let lo = usize::from(kx == 0);
    // ix = ox*s + kx - 1 <= w - 1  ⇔  ox <= (w - kx) / s
    let hi = if w >= kx { ((w - kx) / stride + 1).min(wo) } else { 0 };
    (lo, hi.max(lo))
}

#[inline(always)]
fn fwd_plane<T: WithDType>(x: &[T], k: &[T], y: &mut [T], h: usize, w: usize, s: usize) {
    let wo = out_side(w, s);
    let ho = out_side(h, s);
    for v in y.iter_mut() {
        *v = T::zero();
    }
    for oy in 0..ho {
        let yrow = &mut y[oy * wo..(oy + 1) * wo];
        for ky in 0..3 {
            let iy = oy * s + ky;
            if iy == 0 || iy > h {
                continue;
            }
            let xrow = &x[(iy - 1) * w..iy * w];
            for kx in 0..3 {
                let kv = k[ky * 3 + kx];
                let (lo, hi) = ox_range(kx, s, w, wo);
                if s == 1 {
                    // ix = ox + kx - 1: a shifted contiguous run.
                    let xs = &xrow[lo + kx - 1..hi + kx - 1];
                    for (yv, xv) in yrow[lo..hi].iter_mut().zip(xs) {
                        *yv += kv * *xv;
                    }
                } else {
                    for (ox, yv) in yrow.iter_mut().enumerate().take(hi).skip(lo) {
                        *yv += kv * xrow[ox * s + kx - 1];
                    }
                }
            }
        }
    }
}

/// Stride-1 input gradient of one plane (the generic path; f32 takes [`planes_f32`]).
#[inline(always)]
fn bwd_input_plane_s1<T: WithDType>(gy: &[T], k: &[T], gx: &mut [T], h: usize, w: usize) {
    for v in gx.iter_mut() {
        *v = T::zero();
    }
    for oy in 0..h {
        let grow = &gy[oy * w..(oy + 1) * w];
        for ky in 0..3 {
            let iy = oy + ky;
            if iy == 0 || iy > h {
                continue;
            }
            let xrow = &mut gx[(iy - 1) * w..iy * w];
            for kx in 0..3 {
                let kv = k[ky * 3 + kx];
                let (lo, hi) = ox_range(kx, 1, w, w);
                let xs = &mut xrow[lo + kx - 1..hi + kx - 1];
                for (xv, gv) in xs.iter_mut().zip(&grow[lo..hi]) {
                    *xv += kv * *gv;
                }
            }
        }
    }
}

/// The `(ky, oy)` pairs whose output row `oy` reads input row `iy` through tap row `ky` in a
/// stride-2, padding-1 3×3 convolution with `ho` output rows (`iy = 2·oy + ky − 1`), by `ky`.
#[inline(always)]
fn s2_taps(iy: usize, ho: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..3).filter_map(move |ky| {
        let t = (iy + 1).checked_sub(ky)?;
        (t % 2 == 0 && t / 2 < ho).then_some((ky, t / 2))
    })
}

/// Stride-2 input gradient of one plane, gathered per input row: column `2m` takes tap `kx = 1`
/// of output column `m`, column `2m + 1` tap `kx = 0` of column `m + 1` and `kx = 2` of column `m`
/// (rows likewise, through [`s2_taps`]). A row's even and odd columns are accumulated in `buf`
/// as contiguous runs, which vectorise, then interleaved into `gx`: each value written once.
#[inline(always)]
fn bwd_input_plane_s2<T: WithDType>(
    gy: &[T],
    k: &[T],
    gx: &mut [MaybeUninit<T>],
    (h, w): (usize, usize),
    buf: &mut [T],
) {
    let (ho, wo) = (out_side(h, 2), out_side(w, 2));
    let (even, odd) = buf[..w].split_at_mut(w.div_ceil(2));
    for (iy, row) in gx.chunks_exact_mut(w).take(h).enumerate() {
        even.fill(T::zero());
        odd.fill(T::zero());
        for (ky, oy) in s2_taps(iy, ho) {
            let g = &gy[oy * wo..(oy + 1) * wo];
            let (k0, k1, k2) = (k[ky * 3], k[ky * 3 + 1], k[ky * 3 + 2]);
            for (e, gv) in even.iter_mut().zip(g) {
                *e += k1 * *gv;
            }
            for (o, gv) in odd.iter_mut().zip(&g[1..]) {
                *o += k0 * *gv;
            }
            for (o, gv) in odd.iter_mut().zip(g) {
                *o += k2 * *gv;
            }
        }
        for (m, pair) in row.chunks_mut(2).enumerate() {
            pair[0].write(even[m]);
            if let Some(v) = pair.get_mut(1) {
                v.write(odd[m]);
            }
        }
    }
}

/// Stride-2 weight gradient of one plane, added to `gk`: tap `(ky, kx)` pairs output column `ox`
/// with input column `2·ox + kx − 1`, so with each input row split into its even and odd columns
/// (in `buf`) every tap is a dot product of contiguous runs: `kx = 1` over `even[ox]`, `kx = 0`
/// over `odd[ox − 1]`, `kx = 2` over `odd[ox]`.
#[inline(always)]
fn bwd_weight_plane_s2<T: WithDType>(
    x: &[T],
    gy: &[T],
    gk: &mut [T; 9],
    (h, w): (usize, usize),
    buf: &mut [T],
) {
    let (ho, wo) = (out_side(h, 2), out_side(w, 2));
    let (even, odd) = buf[..w].split_at_mut(w.div_ceil(2));
    let (left, right) = ((wo - 1).min(odd.len()), odd.len().min(wo));
    for (iy, row) in x.chunks_exact(w).take(h).enumerate() {
        for (m, pair) in row.chunks(2).enumerate() {
            even[m] = pair[0];
            if let Some(v) = pair.get(1) {
                odd[m] = *v;
            }
        }
        for (ky, oy) in s2_taps(iy, ho) {
            let g = &gy[oy * wo..(oy + 1) * wo];
            gk[ky * 3] += dot(&odd[..left], &g[1..1 + left]);
            gk[ky * 3 + 1] += dot(&even[..wo], g);
            gk[ky * 3 + 2] += dot(&odd[..right], &g[..right]);
        }
    }
}

/// `Σ a·b` in eight interleaved partial sums (independent additions vectorise; one running sum
/// would make each wait for the last).
#[inline(always)]
fn dot<T: WithDType>(a: &[T], b: &[T]) -> T {
    const L: usize = 8;
    let mut acc = [T::zero(); L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = T::zero();
    for (x, y) in ra.iter().zip(rb) {
        sum += *x * *y;
    }
    acc.iter().fold(sum, |s, v| s + *v)
}

/// Stride-1 weight gradient of one plane, added to `gk` (the generic path; f32 takes
/// [`same_weight_grad`]).
#[inline(always)]
fn bwd_weight_plane_s1<T: WithDType>(x: &[T], gy: &[T], gk: &mut [T; 9], h: usize, w: usize) {
    for oy in 0..h {
        let grow = &gy[oy * w..(oy + 1) * w];
        for ky in 0..3 {
            let iy = oy + ky;
            if iy == 0 || iy > h {
                continue;
            }
            let xrow = &x[(iy - 1) * w..iy * w];
            for kx in 0..3 {
                let (lo, hi) = ox_range(kx, 1, w, w);
                gk[ky * 3 + kx] += dot(&xrow[lo + kx - 1..hi + kx - 1], &grow[lo..hi]);
            }
        }
    }
}

/// Partial sums per tap in [`same_weight_grad`]: output `j` of a plane goes to sum `j mod 16`, one
/// AVX-512 register (two AVX2 ones, four SSE ones), so every width adds the same values in the
/// same order.
const WG_LANES: usize = 16;

/// The stride-1 weight gradient of one channel's `h×w` planes as flat runs, read through the
/// forward pass's [`SamePart`] (its masks and zero-padded input buffer over the whole plane):
/// output `j` of a plane reads inputs `j + (ky − 1)·w + kx − 1`, so tap `(ky, kx)` gathers
/// `Σ_j g[j]·x[j + (ky − 1)·w + kx − 1]` over the outputs whose neighbour is in their own row, the
/// left and right taps taking the gradient times the 0/1 masks. Whatever the row width, outputs go
/// sixteen at a time (rows 7 or 14 wide no longer make nine short dot products per row). The
/// planes are at `first + b·step` (`b < n`) of the inputs `xs` and output gradients `gs`.
fn same_weight_grad(flat: &mut SamePart, xs: &[f32], gs: &[f32], planes: (usize, usize, usize)) -> [f32; 9] {
    super::simd::with_lanes(ChannelWeightGrad { flat, xs, gs, planes })
}

/// [`same_weight_grad`] with the CPU's widest registers.
struct ChannelWeightGrad<'a> {
    flat: &'a mut SamePart,
    xs: &'a [f32],
    gs: &'a [f32],
    planes: (usize, usize, usize),
}

impl super::simd::WithLanes for ChannelWeightGrad<'_> {
    type Output = [f32; 9];

    #[inline(always)]
    fn run<V: super::simd::Vf32>(self) -> [f32; 9] {
        const L: usize = WG_LANES;
        let ChannelWeightGrad { flat, xs, gs, planes: (n, first, step) } = self;
        let w = flat.width();
        let regs = L / V::LANES;
        // SAFETY (all blocks below): `with_lanes` runs this with registers the CPU has; every
        // block reads outputs `j..j + L` with `j + L ≤ full ≤ m` of `g` and the masks (`m` values)
        // and inputs up to `j + 2w + L + 1 < m + 2w + 2` of `xp`.
        let zero = unsafe { V::splat(0.0) };
        // Register `i` of tap `t` holds sums `i·V::LANES..(i + 1)·V::LANES`.
        let mut acc = [[zero; L]; 9];
        let mut tail = [0f32; 9];
        for b in 0..n {
            let (xp, left, right) = flat.load(&xs[first + b * step..]);
            let m = left.len();
            let full = m / L * L;
            let g = &gs[first + b * step..][..m];
            for j in (0..full).step_by(L) {
                for (i, o) in (j..j + L).step_by(V::LANES).enumerate().take(regs) {
                    unsafe {
                        let gc = V::load(g.as_ptr().add(o));
                        let gl = gc.mul(V::load(left.as_ptr().add(o)));
                        let gr = gc.mul(V::load(right.as_ptr().add(o)));
                        for ky in 0..3 {
                            let x = xp.as_ptr().add(o + ky * w);
                            let t = ky * 3;
                            acc[t][i] = acc[t][i].add(gl.mul(V::load(x)));
                            acc[t + 1][i] = acc[t + 1][i].add(gc.mul(V::load(x.add(1))));
                            acc[t + 2][i] = acc[t + 2][i].add(gr.mul(V::load(x.add(2))));
                        }
                    }
                }
            }
            for j in full..m {
                for ky in 0..3 {
                    let at = j + ky * w;
                    tail[ky * 3] += g[j] * left[j] * xp[at];
                    tail[ky * 3 + 1] += g[j] * xp[at + 1];
                    tail[ky * 3 + 2] += g[j] * right[j] * xp[at + 2];
                }
            }
        }
        std::array::from_fn(|t| {
            let mut lanes = [0f32; L];
            for (i, r) in acc[t].iter().enumerate().take(regs) {
                // SAFETY: register `i` fills lanes `i·V::LANES..(i + 1)·V::LANES` of 16.
                unsafe { r.store(lanes.as_mut_ptr().add(i * V::LANES)) };
            }
            lanes.iter().fold(tail[t], |s, v| s + v)
        })
    }
}

fn dims4(l: &Layout, op: &str, what: &str) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        [a, b, c, d] => Ok((*a, *b, *c, *d)),
        d => bail!("{op}: {what} must be 4-D, got {d:?}"),
    }
}

fn check_kernel(l: &Layout, c: usize, op: &str) -> Result<()> {
    if l.dims() != [c, 1, 3, 3] {
        bail!("{op}: weight must be [{c}, 1, 3, 3], got {:?}", l.dims());
    }
    Ok(())
}

/// Each `h×w` plane of `src` (`[n, c, h, w]`) convolved with the 3×3 taps `taps(channel)`
/// (padding 1, `stride`) by the vectorised row kernel of [`super::fastconv`].
fn planes_f32(
    src: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    stride: usize,
    taps: impl Fn(usize) -> [f32; 9] + Sync,
) -> Vec<f32> {
    let (ho, wo) = (out_side(h, stride), out_side(w, stride));
    let mut y = vec![0f32; n * c * ho * wo];
    // The per-shape set-up (masks, buffers) once per rayon task, not once per plane.
    let setup = || super::fastconv::Depthwise3x3Planes::new((h, w), stride);
    y.par_chunks_mut(ho * wo).enumerate().for_each_init(setup, |planes, (p, yp)| {
        planes.run(&src[p * h * w..(p + 1) * h * w], &taps(p % c), yp);
    });
    y
}

impl DwFwd {
    /// f32: each plane through the vectorised row kernel of [`super::fastconv`].
    fn run_f32(&self, xs: &[f32], xl: &Layout, ks: &[f32]) -> Result<(Vec<f32>, Shape)> {
        let (n, c, h, w) = dims4(xl, self.name(), "input")?;
        let taps = |ch: usize| -> [f32; 9] { ks[ch * 9..ch * 9 + 9].try_into().expect("nine taps") };
        let y = planes_f32(xs, (n, c, h, w), self.stride, taps);
        Ok((y, Shape::from((n, c, out_side(h, self.stride), out_side(w, self.stride)))))
    }

    fn run<T: WithDType>(&self, xs: &[T], xl: &Layout, ks: &[T]) -> Result<(Vec<T>, Shape)> {
        let (n, c, h, w) = dims4(xl, self.name(), "input")?;
        let (ho, wo) = (out_side(h, self.stride), out_side(w, self.stride));
        let mut y = vec![T::zero(); n * c * ho * wo];
        y.par_chunks_mut(ho * wo).enumerate().for_each(|(p, yp)| {
            let ch = p % c;
            let (x, k) = (&xs[p * h * w..(p + 1) * h * w], &ks[ch * 9..ch * 9 + 9]);
            super::simd::vectorized(
                #[inline(always)]
                || fwd_plane(x, k, yp, h, w, self.stride),
            );
        });
        Ok((y, Shape::from((n, c, ho, wo))))
    }
}

impl CustomOp2 for DwFwd {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, _, _) = dims4(l1, self.name(), "input")?;
        check_kernel(l2, c, self.name())?;
        match s1.dtype() {
            DType::F32 => {
                let (v, s) = self.run_f32(
                    contiguous::<f32>(s1, l1, self.name(), "input")?,
                    l1,
                    contiguous::<f32>(s2, l2, self.name(), "weight")?,
                )?;
                Ok((CpuStorage::F32(v), s))
            }
            DType::F64 => {
                let (v, s) = self.run(
                    contiguous::<f64>(s1, l1, self.name(), "input")?,
                    l1,
                    contiguous::<f64>(s2, l2, self.name(), "weight")?,
                )?;
                Ok((CpuStorage::F64(v), s))
            }
            d => bail!("{}: unsupported dtype {d:?} (f32 or f64)", self.name()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, h, w) = dims4(l1, self.name(), "input")?;
        check_kernel(l2, c, self.name())?;
        let (ho, wo) = (out_side(h, self.stride), out_side(w, self.stride));
        let g = super::cuda::Depthwise { n, c, h, w, ho, wo, s: self.stride, p: 1 };
        Ok((super::cuda::depthwise_fwd((s1, l1), (s2, l2), g)?, Shape::from((n, c, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let grad = grad.contiguous()?;
        let gx = grad.apply_op2_no_bwd(k, &DwBwdInput { stride: self.stride, h, w })?;
        let gk = x.apply_op2_no_bwd(&grad, &DwBwdWeight { stride: self.stride })?;
        Ok((Some(gx), Some(gk)))
    }
}

impl DwBwdInput {
    /// `(n, c, ho, wo)` of the output gradient `gl`, checked against the input side `h×w`.
    fn grad_dims(&self, gl: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (n, c, ho, wo) = dims4(gl, self.name(), "grad")?;
        let (h, w) = (self.h, self.w);
        if ho != out_side(h, self.stride) || wo != out_side(w, self.stride) {
            bail!("{}: grad {:?} does not match input side {h}×{w}", self.name(), gl.dims());
        }
        Ok((n, c, ho, wo))
    }

    /// f32, stride 1: the input gradient is the same convolution of the output gradient with the
    /// kernel turned by 180°, run by the vectorised row kernel. Stride 2 takes the generic path.
    fn run_f32(&self, gs: &[f32], gl: &Layout, ks: &[f32]) -> Result<(Vec<f32>, Shape)> {
        if self.stride != 1 {
            return self.run(gs, gl, ks);
        }
        let (n, c, _, _) = self.grad_dims(gl)?;
        let (h, w) = (self.h, self.w);
        let gx = planes_f32(gs, (n, c, h, w), 1, |ch| std::array::from_fn(|i| ks[ch * 9 + 8 - i]));
        Ok((gx, Shape::from((n, c, h, w))))
    }

    fn run<T: WithDType>(&self, gs: &[T], gl: &Layout, ks: &[T]) -> Result<(Vec<T>, Shape)> {
        let (n, c, ho, wo) = self.grad_dims(gl)?;
        let (h, w) = (self.h, self.w);
        let fill = |gx: &mut [MaybeUninit<T>]| {
            let setup = || vec![T::zero(); w];
            gx.par_chunks_mut(h * w).enumerate().for_each_init(setup, |buf, (p, gp)| {
                let ch = p % c;
                let (g, k) = (&gs[p * ho * wo..(p + 1) * ho * wo], &ks[ch * 9..ch * 9 + 9]);
                super::simd::vectorized(
                    #[inline(always)]
                    // The stride is 1 or 2 (checked where the forward op is built).
                    || match self.stride {
                        2 => bwd_input_plane_s2(g, k, gp, (h, w), buf),
                        _ => {
                            for v in gp.iter_mut() {
                                v.write(T::zero());
                            }
                            // SAFETY: every value was just initialised.
                            let gp = unsafe { &mut *(gp as *mut [MaybeUninit<T>] as *mut [T]) };
                            bwd_input_plane_s1(g, k, gp, h, w)
                        }
                    },
                );
            });
        };
        // SAFETY: the planes cover the buffer and each is written whole (stride 2 writes every
        // value once; other strides fill the plane with zeros first).
        let gx = unsafe { super::written(n * c * h * w, fill) };
        Ok((gx, Shape::from((n, c, h, w))))
    }
}

impl CustomOp2 for DwBwdInput {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, _, _) = dims4(l1, self.name(), "grad")?;
        check_kernel(l2, c, self.name())?;
        match s1.dtype() {
            DType::F32 => {
                let (v, s) = self.run_f32(
                    contiguous::<f32>(s1, l1, self.name(), "grad")?,
                    l1,
                    contiguous::<f32>(s2, l2, self.name(), "weight")?,
                )?;
                Ok((CpuStorage::F32(v), s))
            }
            DType::F64 => {
                let (v, s) = self.run(
                    contiguous::<f64>(s1, l1, self.name(), "grad")?,
                    l1,
                    contiguous::<f64>(s2, l2, self.name(), "weight")?,
                )?;
                Ok((CpuStorage::F64(v), s))
            }
            d => bail!("{}: unsupported dtype {d:?} (f32 or f64)", self.name()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, ho, wo) = self.grad_dims(l1)?;
        check_kernel(l2, c, self.name())?;
        let (h, w) = (self.h, self.w);
        let g = super::cuda::Depthwise { n, c, h, w, ho, wo, s: self.stride, p: 1 };
        Ok((super::cuda::depthwise_bwd_input((s1, l1), (s2, l2), g)?, Shape::from((n, c, h, w))))
    }
}

impl DwBwdWeight {
    /// `[n, c, h, w, ho, wo]`: the input `xl` and the output side, the gradient `gl` checked
    /// against them.
    fn dims(&self, xl: &Layout, gl: &Layout) -> Result<[usize; 6]> {
        let (n, c, h, w) = dims4(xl, self.name(), "input")?;
        let (ho, wo) = (out_side(h, self.stride), out_side(w, self.stride));
        if gl.dims() != [n, c, ho, wo] {
            bail!("{}: grad {:?} does not match output [{n}, {c}, {ho}, {wo}]", self.name(), gl.dims());
        }
        Ok([n, c, h, w, ho, wo])
    }

    /// f32, stride 1: [`same_weight_grad`], one channel (all its planes) per task. Stride 2 takes
    /// the generic path.
    fn run_f32(&self, xs: &[f32], xl: &Layout, gs: &[f32], gl: &Layout) -> Result<(Vec<f32>, Shape)> {
        if self.stride != 1 {
            return self.run(xs, xl, gs, gl);
        }
        let [n, c, h, w, _, _] = self.dims(xl, gl)?;
        let hw = h * w;
        let mut gk = vec![0f32; c * 9];
        let setup = || SamePart::new((h, w), 0..hw);
        gk.par_chunks_mut(9).enumerate().for_each_init(setup, |flat, (ch, gc)| {
            gc.copy_from_slice(&same_weight_grad(flat, xs, gs, (n, ch * hw, c * hw)));
        });
        Ok((gk, Shape::from((c, 1, 3, 3))))
    }

    fn run<T: WithDType>(&self, xs: &[T], xl: &Layout, gs: &[T], gl: &Layout) -> Result<(Vec<T>, Shape)> {
        let [n, c, h, w, ho, wo] = self.dims(xl, gl)?;
        // One 9-tap partial per channel, accumulated over the batch inside each task so no
        // reduction across threads is needed.
        let mut gk = vec![T::zero(); c * 9];
        let setup = || vec![T::zero(); w];
        gk.par_chunks_mut(9).enumerate().for_each_init(setup, |buf, (ch, gc)| {
            let mut acc = [T::zero(); 9];
            super::simd::vectorized(
                #[inline(always)]
                || {
                    for b in 0..n {
                        let p = b * c + ch;
                        let (x, g) = (&xs[p * h * w..(p + 1) * h * w], &gs[p * ho * wo..(p + 1) * ho * wo]);
                        // The stride is 1 or 2 (checked where the forward op is built).
                        match self.stride {
                            2 => bwd_weight_plane_s2(x, g, &mut acc, (h, w), buf),
                            _ => bwd_weight_plane_s1(x, g, &mut acc, h, w),
                        }
                    }
                },
            );
            gc.copy_from_slice(&acc);
        });
        Ok((gk, Shape::from((c, 1, 3, 3))))
    }
}

impl CustomOp2 for DwBwdWeight {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => {
                let (v, s) = self.run_f32(
                    contiguous::<f32>(s1, l1, self.name(), "input")?,
                    l1,
                    contiguous::<f32>(s2, l2, self.name(), "grad")?,
                    l2,
                )?;
                Ok((CpuStorage::F32(v), s))
            }
            DType::F64 => {
                let (v, s) = self.run(
                    contiguous::<f64>(s1, l1, self.name(), "input")?,
                    l1,
                    contiguous::<f64>(s2, l2, self.name(), "grad")?,
                    l2,
                )?;
                Ok((CpuStorage::F64(v), s))
            }
            d => bail!("{}: unsupported dtype {d:?} (f32 or f64)", self.name()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [n, c, h, w, ho, wo] = self.dims(l1, l2)?;
        let g = super::cuda::Depthwise { n, c, h, w, ho, wo, s: self.stride, p: 1 };
        Ok((super::cuda::depthwise_bwd_weight((s1, l1), (s2, l2), g)?, Shape::from((c, 1, 3, 3))))
    }
}

/// [`depthwise3x3_padded`] on CUDA: the input carries its padding, so the kernel reads no
/// zeros of its own (`p = 0`) and the output size is given. Inference only (no backward).
#[cfg(feature = "cuda")]
struct DwPadded {
    stride: usize,
    out: (usize, usize),
}

#[cfg(feature = "cuda")]
impl CustomOp2 for DwPadded {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-padded"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("{}: CUDA only (the CPU takes the ONNX fast paths)", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, h, w) = dims4(l1, self.name(), "input")?;
        check_kernel(l2, c, self.name())?;
        let (ho, wo) = self.out;
        let g = super::cuda::Depthwise { n, c, h, w, ho, wo, s: self.stride, p: 0 };
        Ok((super::cuda::depthwise_fwd((s1, l1), (s2, l2), g)?, Shape::from((n, c, ho, wo))))
    }
}

/// Depthwise 3×3 convolution with padding 1: `x [n,c,h,w]`, `weight [c,1,3,3]`, `stride` 1 or 2.
///
/// Differentiable wrt both arguments. Records its MACs with [`crate::cost::record`].
pub fn depthwise_conv3x3(x: &Tensor, weight: &Tensor, stride: usize) -> Result<Tensor> {
    if stride != 1 && stride != 2 {
        bail!("depthwise-conv3x3: stride must be 1 or 2, got {stride}");
    }
    let (n, c, h, w) = x.dims4()?;
    if weight.dims() != [c, 1, 3, 3] {
        bail!("depthwise-conv3x3: weight must be [{c}, 1, 3, 3], got {:?}", weight.dims());
    }
    let (ho, wo) = (out_side(h, stride), out_side(w, stride));
    crate::cost::record(crate::cost::conv2d_macs(&[n, c, ho, wo], 1, 3, 3));
    if !super::cpu_kernels(x) && !super::cuda_kernels(x, super::Kernels::Depthwise) {
        return depthwise_conv3x3_composed(x, weight, stride);
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, DwFwd { stride })
}

/// [`depthwise_conv3x3`] as nine shifted multiply-adds of candle ops, for devices without this
/// module's CPU kernels: about thirty kernel launches whatever the channel count, where candle's
/// grouped convolution runs one convolution per channel. Differentiable through candle's autograd.
pub(crate) fn depthwise_conv3x3_composed(x: &Tensor, weight: &Tensor, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    depthwise3x3_padded(&xp, weight, stride, (out_side(h, stride), out_side(w, stride)))
}

/// A 3×3 depthwise convolution without padding of an input whose padding is already applied
/// (any, e.g. an ONNX node's asymmetric pads), giving `out` = (rows, columns); weight `[c,1,3,3]`,
/// stride 1 or 2. The composed form of [`depthwise_conv3x3_composed`].
pub(crate) fn depthwise3x3_padded(
    xp: &Tensor,
    weight: &Tensor,
    stride: usize,
    out: (usize, usize),
) -> Result<Tensor> {
    if stride != 1 && stride != 2 {
        bail!("depthwise-conv3x3: stride must be 1 or 2, got {stride}");
    }
    let (n, c, h, w) = xp.dims4()?;
    let (ho, wo) = out;
    if weight.dims() != [c, 1, 3, 3] {
        bail!("depthwise-conv3x3: weight must be [{c}, 1, 3, 3], got {:?}", weight.dims());
    }
    // Every tap's window needs `stride·(out−1) + 3` rows; zeros after make it `stride·out + 2`
    // (even for stride 2), and rows beyond that are never read.
    let (ph, pw) = (stride * ho + 2, stride * wo + 2);
    if ho == 0 || wo == 0 || h < stride * (ho - 1) + 3 || w < stride * (wo - 1) + 3 {
        bail!("depthwise-conv3x3: {h}×{w} input is too small for a {ho}×{wo} output at stride {stride}");
    }
    #[cfg(feature = "cuda")]
    if super::cuda_kernels(xp, super::Kernels::Depthwise) {
        return xp.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &DwPadded { stride, out });
    }
    let fit = |t: Tensor, dim: usize, have: usize, want: usize| -> Result<Tensor> {
        if have >= want { t.narrow(dim, 0, want) } else { t.pad_with_zeros(dim, 0, want - have) }
    };
    let xp = fit(fit(xp.clone(), 2, h, ph)?, 3, w, pw)?;
    // Stride 2: padded row 2i+ky is row i+ky/2 of the even (ky%2 = 0) or odd phase, so each tap is
    // a contiguous window of one of four phase planes.
    let phases = if stride == 2 {
        let r = xp.reshape((n, c, ph / 2, 2, pw / 2, 2))?;
        let plane = |a: usize, b: usize| r.narrow(3, a, 1)?.narrow(5, b, 1)?.reshape((n, c, ph / 2, pw / 2));
        Some([[plane(0, 0)?, plane(0, 1)?], [plane(1, 0)?, plane(1, 1)?]])
    } else {
        None
    };
    let taps = weight.reshape((c, 9))?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..3 {
        for kx in 0..3 {
            let window = match &phases {
                Some(p) => p[ky % 2][kx % 2].narrow(2, ky / 2, ho)?.narrow(3, kx / 2, wo)?,
                None => xp.narrow(2, ky, ho)?.narrow(3, kx, wo)?,
            };
            let term = window.broadcast_mul(&taps.narrow(1, ky * 3 + kx, 1)?.reshape((1, c, 1, 1))?)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("depthwise-conv3x3: no taps".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check_grads, rand_var};
    use candle_core::Device;

    /// The op agrees with candle's grouped convolution (the reference semantics).
    #[test]
    fn forward_matches_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(5, 5), (6, 6), (7, 4), (1, 1), (2, 3)] {
            for stride in [1, 2] {
                let x = Tensor::randn(0f64, 1., (2, 3, h, w), &dev)?;
                let k = Tensor::randn(0f64, 1., (3, 1, 3, 3), &dev)?;
                let ours = depthwise_conv3x3(&x, &k, stride)?;
                let theirs = x.conv2d(&k, 1, stride, 1, 3)?;
                assert_eq!(ours.dims(), theirs.dims(), "{h}x{w} s{stride}");
                let d = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(d < 1e-12, "{h}x{w} stride {stride}: max diff {d}");
            }
        }
        Ok(())
    }

    /// The composed form other devices use agrees with the CPU kernel, values and gradients.
    #[test]
    fn composed_form_matches_the_kernel() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(5, 5), (6, 6), (7, 4), (1, 1), (2, 3)] {
            for stride in [1, 2] {
                let x = Tensor::randn(0f64, 1., (2, 3, h, w), &dev)?;
                let k = Tensor::randn(0f64, 1., (3, 1, 3, 3), &dev)?;
                let ours = depthwise_conv3x3_composed(&x, &k, stride)?;
                let kernel = depthwise_conv3x3(&x, &k, stride)?;
                assert_eq!(ours.dims(), kernel.dims(), "{h}x{w} s{stride}");
                let d = (ours - kernel)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(d < 1e-12, "{h}x{w} stride {stride}: max diff {d}");
            }
        }
        for (h, w) in [(5, 5), (4, 4), (5, 3)] {
            for stride in [1, 2] {
                let x = rand_var((2, 2, h, w), 3)?;
                let k = rand_var((2, 1, 3, 3), 4)?;
                check_grads(&[&x, &k], 1e-6, 1e-5, |v| depthwise_conv3x3_composed(&v[0], &v[1], stride))?;
            }
        }
        Ok(())
    }

    /// The pre-padded form with other paddings (e.g. an ONNX node's `pads = [0, 0, 1, 1]`)
    /// agrees with candle's grouped convolution of the same padded input.
    #[test]
    fn pre_padded_form_matches_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(6, 6), (7, 5), (4, 4)] {
            for stride in [1, 2] {
                for (top, left, bottom, right) in [(0, 0, 1, 1), (1, 1, 1, 1), (2, 0, 0, 1)] {
                    let x = Tensor::randn(0f64, 1., (2, 3, h, w), &dev)?;
                    let k = Tensor::randn(0f64, 1., (3, 1, 3, 3), &dev)?;
                    let xp = x.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?;
                    let theirs = xp.conv2d(&k, 0, stride, 1, 3)?;
                    let (_, _, ho, wo) = theirs.dims4()?;
                    let ours = depthwise3x3_padded(&xp, &k, stride, (ho, wo))?;
                    let d = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(d < 1e-12, "{h}x{w} s{stride} pads {top},{left},{bottom},{right}: {d}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for (h, w) in [(5, 5), (4, 4), (5, 3), (2, 3), (1, 4), (6, 1)] {
            for stride in [1, 2] {
                let x = rand_var((2, 2, h, w), 1)?;
                let k = rand_var((2, 1, 3, 3), 2)?;
                check_grads(&[&x, &k], 1e-6, 1e-5, |v| depthwise_conv3x3(&v[0], &v[1], stride))?;
            }
        }
        Ok(())
    }

    #[test]
    fn f32_gradients_match_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        // Widths that take the row kernel's 16-, 8- and 4-column groups and its edges; planes
        // of whole 16-lane blocks, with a tail and all tail for the stride-1 weight gradient;
        // stride 2 on sides of equal parity (candle's reference backward needs that).
        for (n, c, h, w, stride) in [
            (2, 4, 8, 8, 2),
            (3, 3, 8, 8, 1),
            (2, 3, 19, 21, 1),
            (1, 2, 37, 18, 1),
            (1, 2, 37, 19, 2),
            (1, 2, 5, 3, 1),
            (3, 2, 20, 36, 2),
        ] {
            let x = candle_core::Var::randn(0f32, 1., (n, c, h, w), &dev)?;
            let k = candle_core::Var::randn(0f32, 1., (c, 1, 3, 3), &dev)?;
            let r = Tensor::randn(0f32, 1., (n, c, out_side(h, stride), out_side(w, stride)), &dev)?;
            let y = depthwise_conv3x3(&x, &k, stride)?;
            let y_ref = x.conv2d(&k, 1, stride, 1, c)?;
            let d = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "{h}×{w} stride {stride}: output max diff {d}");
            let ours = y.mul(&r)?.sum_all()?.backward()?;
            let theirs = y_ref.mul(&r)?.sum_all()?.backward()?;
            for v in [x.as_tensor(), k.as_tensor()] {
                let a = ours.get(v).unwrap();
                let b = theirs.get(v).unwrap();
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-3, "{h}×{w} stride {stride}: gradient max diff {d}");
            }
        }
        Ok(())
    }

    /// One channel's stride-1 weight gradient, to run with each register type.
    #[derive(Clone)]
    struct WeightGradCase {
        hw: (usize, usize),
        xs: Vec<f32>,
        gs: Vec<f32>,
        planes: (usize, usize, usize),
    }

    impl crate::nn::simd::WithLanes for WeightGradCase {
        type Output = [f32; 9];
        #[inline(always)]
        fn run<V: crate::nn::simd::Vf32>(self) -> [f32; 9] {
            let mut flat = SamePart::new(self.hw, 0..self.hw.0 * self.hw.1);
            ChannelWeightGrad { flat: &mut flat, xs: &self.xs, gs: &self.gs, planes: self.planes }.run::<V>()
        }
    }

    #[test]
    fn stride1_weight_gradient_is_the_same_bits_in_every_register_width() {
        // Planes of 7×7 (three blocks of 16 and a tail), two images of three channels: channel 1.
        let (n, c, h, w) = (2, 3, 7, 7);
        let vals = |seed: usize| -> Vec<f32> {
            (0..n * c * h * w).map(|i| ((i * 7919 + seed) % 1013) as f32 * 0.013 - 6.5).collect()
        };
        let case = WeightGradCase { hw: (h, w), xs: vals(1), gs: vals(5), planes: (n, h * w, c * h * w) };
        let outs = crate::nn::simd::each_level(case);
        let bits = |t: &[f32; 9]| t.map(f32::to_bits);
        for o in &outs[1..] {
            assert_eq!(bits(o), bits(&outs[0]), "{outs:?}");
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 1, 3, 3), DType::F32, &dev).unwrap();
        let e = depthwise_conv3x3(&x, &k, 1).unwrap_err().to_string();
        assert!(e.contains("weight must be [3, 1, 3, 3]"), "{e}");
        let k = Tensor::zeros((3, 1, 3, 3), DType::F32, &dev).unwrap();
        assert!(depthwise_conv3x3(&x, &k, 3).is_err());
    }
}
