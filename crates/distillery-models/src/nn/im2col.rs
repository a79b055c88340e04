//! Unfolding (`im2col`) and its adjoint (`col2im`) as candle ops, so a regular convolution can be
//! computed as one batched matmul.
//!
//! candle's CPU convolution backward runs a direct transposed convolution built on dot products,
//! which for small students costs tens of times the forward. With `x → im2col(x)` and
//! `y = W · cols`, both gradients are matmuls plus one scatter-add (`col2im`), which is what
//! [`conv2d_unfolded`] does. Devices without these CPU ops unfold with a composition of candle
//! ops instead, so the same convolution runs everywhere.
//!
//! Layout: for `x [n, c, h, w]`, a `kh×kw` kernel, `stride` and zero `padding`,
//! `cols [n, c·kh·kw, ho·wo]` with row `ci·kh·kw + ky·kw + kx` and column `oy·wo + ox` holding
//! `x[n, ci, oy·stride + ky − padding, ox·stride + kx − padding]` (zero outside the image).

use candle_core::{
    CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType, backend::BackendStorage, bail,
};
use rayon::prelude::*;

/// Geometry shared by both ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn out_side(&self, n: usize, k: usize) -> Result<usize> {
        let padded = n + 2 * self.padding;
        if padded < k {
            bail!("im2col: input side {n} (padding {}) is smaller than the kernel {k}", self.padding);
        }
        Ok((padded - k) / self.stride + 1)
    }

    /// For kernel offset `k` along a side of length `n` with output length `no`: the output
    /// range `lo..hi` whose input index `o·s + k − p` lies in `0..n`.
    #[inline]
    fn valid(&self, k: usize, n: usize, no: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // o·s + k ≥ p  ⇔  o ≥ ceil((p − k) / s)
        let lo = if k >= p { 0 } else { (p - k).div_ceil(s) };
        // o·s + k − p ≤ n − 1  ⇔  o ≤ (n − 1 + p − k) / s
        let hi = if n + p > k { ((n - 1 + p - k) / s + 1).min(no) } else { 0 };
        (lo.min(no), hi.max(lo.min(no)))
    }
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let slice = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&slice[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Runs the f32 or the f64 body of an op on the contiguous contents of `s`.
fn on_floats(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    f32: impl FnOnce(&[f32]) -> Result<(Vec<f32>, Shape)>,
    f64: impl FnOnce(&[f64]) -> Result<(Vec<f64>, Shape)>,
) -> Result<(CpuStorage, Shape)> {
    match s.dtype() {
        DType::F32 => f32(contiguous(s, l, op)?).map(|(v, sh)| (CpuStorage::F32(v), sh)),
        DType::F64 => f64(contiguous(s, l, op)?).map(|(v, sh)| (CpuStorage::F64(v), sh)),
        d => bail!("{op}: unsupported dtype {d:?} (f32 or f64)"),
    }
}

/// `x [n,c,h,w] → cols [n, c·kh·kw, ho·wo]`.
struct Im2col(Geometry);

/// `cols [n, c·kh·kw, ho·wo] → x [n,c,h,w]`, summing every column entry into its pixel.
struct Col2im {
    g: Geometry,
    c: usize,
    h: usize,
    w: usize,
}

impl Im2col {
    fn run<T: WithDType>(&self, x: &[T], l: &Layout) -> Result<(Vec<T>, Shape)> {
        let Geometry { kh, kw, stride, padding } = self.0;
        let (n, c, h, w) = match l.dims() {
            [a, b, c, d] => (*a, *b, *c, *d),
            d => bail!("im2col: input must be 4-D, got {d:?}"),
        };
        let (ho, wo) = (self.0.out_side(h, kh)?, self.0.out_side(w, kw)?);
        let kk = kh * kw;
        let mut cols = vec![T::zero(); n * c * kk * ho * wo];
        // One task per (image, input channel): it owns kh·kw consecutive rows of `cols`.
        cols.par_chunks_mut(kk * ho * wo).enumerate().for_each(|(p, block)| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            for ky in 0..kh {
                let (oy0, oy1) = self.0.valid(ky, h, ho);
                for kx in 0..kw {
                    let (ox0, ox1) = self.0.valid(kx, w, wo);
                    let row = &mut block[(ky * kw + kx) * ho * wo..(ky * kw + kx + 1) * ho * wo];
                    for oy in oy0..oy1 {
                        let iy = oy * stride + ky - padding;
                        let src = &plane[iy * w..(iy + 1) * w];
                        let dst = &mut row[oy * wo..(oy + 1) * wo];
                        if stride == 1 {
                            let ix0 = ox0 + kx - padding;
                            dst[ox0..ox1].copy_from_slice(&src[ix0..ix0 + (ox1 - ox0)]);
                        } else {
                            for ox in ox0..ox1 {
                                dst[ox] = src[ox * stride + kx - padding];
                            }
                        }
                    }
                }
            }
        });
        Ok((cols, Shape::from((n, c * kk, ho * wo))))
    }
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        on_floats(s, l, self.name(), |x| self.run(x, l), |x| self.run(x, l))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, c, h, w) = arg.dims4()?;
        let g = grad.contiguous()?.apply_op1_no_bwd(&Col2im { g: self.0, c, h, w })?;
        Ok(Some(g))
    }
}

impl Col2im {
    fn run<T: WithDType>(&self, cols: &[T], l: &Layout) -> Result<(Vec<T>, Shape)> {
        let Geometry { kh, kw, stride, padding } = self.g;
        let (c, h, w) = (self.c, self.h, self.w);
        let (ho, wo) = (self.g.out_side(h, kh)?, self.g.out_side(w, kw)?);
        let kk = kh * kw;
        let n = match l.dims() {
            [n, rows, cols] if *rows == c * kk && *cols == ho * wo => *n,
            d => bail!("col2im: columns {d:?} do not fit [n, {}, {}]", c * kk, ho * wo),
        };
        let mut x = vec![T::zero(); n * c * h * w];
        x.par_chunks_mut(h * w).enumerate().for_each(|(p, plane)| {
            let block = &cols[p * kk * ho * wo..(p + 1) * kk * ho * wo];
            for ky in 0..kh {
                let (oy0, oy1) = self.g.valid(ky, h, ho);
                for kx in 0..kw {
                    let (ox0, ox1) = self.g.valid(kx, w, wo);
                    let row = &block[(ky * kw + kx) * ho * wo..(ky * kw + kx + 1) * ho * wo];
                    for oy in oy0..oy1 {
                        let iy = oy * stride + ky - padding;
                        let dst = &mut plane[iy * w..(iy + 1) * w];
                        let src = &row[oy * wo..(oy + 1) * wo];
                        for ox in ox0..ox1 {
                            dst[ox * stride + kx - padding] += src[ox];
                        }
                    }
                }
            }
        });
        Ok((x, Shape::from((n, c, h, w))))
    }
}

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        on_floats(s, l, self.name(), |x| self.run(x, l), |x| self.run(x, l))
    }
}

/// Unfolds `x [n,c,h,w]` into `[n, c·kh·kw, ho·wo]` (see the module docs); differentiable.
///
/// On the CPU a hand-written op; elsewhere (and under [`super::with_portable_layers`]) a
/// composition of candle ops, [`im2col_composed`].
pub fn im2col(x: &Tensor, kh: usize, kw: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if stride == 0 || kh == 0 || kw == 0 {
        bail!("im2col: kernel {kh}×{kw} and stride {stride} must be positive");
    }
    let g = Geometry { kh, kw, stride, padding };
    if !super::cpu_kernels(x) {
        return im2col_composed(x, g);
    }
    x.contiguous()?.apply_op1(Im2col(g))
}

/// [`im2col`] from candle's pad, reshape, narrow and stack: one window per kernel tap, each a
/// contiguous block of one of `stride²` phase planes, so its backward is candle's own (no
/// convolution backward, which on CUDA runs a convolution with an image-sized kernel through
/// cuDNN and at large batches faults).
fn im2col_composed(x: &Tensor, g: Geometry) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = (g.out_side(h, g.kh)?, g.out_side(w, g.kw)?);
    let (s, p) = (g.stride, g.padding);
    // Tap (ky, kx) reads padded rows ky + s·i (i < ho): row q = ky/s + i of phase ky % s. Each
    // phase plane therefore needs ho + (kh−1)/s rows; rows past the padded image are zeros that
    // no output reads.
    let (ph, pw) = (s * (ho + (g.kh - 1) / s), s * (wo + (g.kw - 1) / s));
    let fit = |t: Tensor, dim: usize, have: usize, want: usize| -> Result<Tensor> {
        if have >= want { t.narrow(dim, 0, want) } else { t.pad_with_zeros(dim, 0, want - have) }
    };
    let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    let xp = fit(fit(xp, 2, h + 2 * p, ph)?, 3, w + 2 * p, pw)?;
    let r = xp.reshape((n, c, ph / s, s, pw / s, s))?;
    let mut phases = Vec::with_capacity(s * s);
    for a in 0..s {
        for b in 0..s {
            phases.push(r.narrow(3, a, 1)?.narrow(5, b, 1)?.reshape((n, c, ph / s, pw / s))?);
        }
    }
    let mut taps = Vec::with_capacity(g.kh * g.kw);
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            taps.push(phases[(ky % s) * s + kx % s].narrow(2, ky / s, ho)?.narrow(3, kx / s, wo)?);
        }
    }
    Tensor::stack(&taps, 2)?.reshape((n, c * g.kh * g.kw, ho * wo))
}

/// Convolution `x [n,c_in,h,w] ⊛ weight [c_out,c_in,kh,kw]` (no bias, no groups, no dilation)
/// as `W · im2col(x)`: forward and both gradients are matmuls plus one [`im2col`]/col2im.
pub fn conv2d_unfolded(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c_in, h, w) = x.dims4()?;
    let (c_out, wc_in, kh, kw) = weight.dims4()?;
    if wc_in != c_in {
        bail!("conv2d: weight {:?} does not fit input with {c_in} channels", weight.dims());
    }
    let g = Geometry { kh, kw, stride, padding };
    let (ho, wo) = (g.out_side(h, kh)?, g.out_side(w, kw)?);
    let cols = im2col(x, kh, kw, stride, padding)?;
    let k = c_in * kh * kw;
    // Zero batch stride: candle's CPU matmul takes the broadcast weight without a copy, and the
    // broadcast's backward sums the per-image weight gradients.
    let w2 = weight.reshape((c_out, k))?.broadcast_as((n, c_out, k))?;
    w2.matmul(&cols)?.reshape((n, c_out, ho, wo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check_grads, rand_var};
    use candle_core::Device;

    /// Agrees with candle's convolution (the reference semantics) on odd, even and mixed sides.
    #[test]
    fn matches_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(5, 5), (6, 6), (7, 4), (3, 3), (2, 5)] {
            for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (3, 1, 0), (5, 2, 2)] {
                if h + 2 * padding < k || w + 2 * padding < k {
                    continue;
                }
                let x = Tensor::randn(0f64, 1., (2, 3, h, w), &dev)?;
                let wt = Tensor::randn(0f64, 1., (4, 3, k, k), &dev)?;
                let ours = conv2d_unfolded(&x, &wt, stride, padding)?;
                let theirs = x.conv2d(&wt, padding, stride, 1, 1)?;
                assert_eq!(ours.dims(), theirs.dims(), "{h}x{w} k{k} s{stride} p{padding}");
                let d = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(d < 1e-12, "{h}x{w} k{k} s{stride} p{padding}: max diff {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        // Mixed parity with stride 2 included: candle's own conv backward fails there.
        for (h, w, k, stride, padding) in [(5, 5, 3, 1, 1), (6, 5, 3, 2, 1), (4, 4, 1, 2, 0), (5, 4, 3, 1, 0)]
        {
            let x = rand_var((2, 2, h, w), 1)?;
            let wt = rand_var((3, 2, k, k), 2)?;
            check_grads(&[&x, &wt], 1e-6, 1e-6, |v| conv2d_unfolded(&v[0], &v[1], stride, padding))?;
        }
        Ok(())
    }

    /// The composition other devices run gives the op's columns and gradients, on every geometry
    /// the op is tested with.
    #[test]
    fn composed_form_matches_the_op() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(5, 5), (6, 6), (7, 4), (3, 3), (2, 5)] {
            for (k, stride, padding) in
                [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (3, 1, 0), (5, 2, 2), (3, 3, 1)]
            {
                if h + 2 * padding < k || w + 2 * padding < k {
                    continue;
                }
                let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1., (2, 3, h, w), &dev)?)?;
                let ours = im2col(&x, k, k, stride, padding)?;
                let composed = crate::nn::with_portable_layers(|| im2col(&x, k, k, stride, padding))?;
                let what = format!("{h}x{w} k{k} s{stride} p{padding}");
                assert_eq!(ours.dims(), composed.dims(), "{what}");
                assert_eq!(
                    ours.flatten_all()?.to_vec1::<f64>()?,
                    composed.flatten_all()?.to_vec1::<f64>()?,
                    "{what}"
                );
                let c = Tensor::randn(0f64, 1., ours.shape(), &dev)?;
                let g_ours = (ours * &c)?.sum_all()?.backward()?.get(&x).cloned().expect("gradient");
                let g_comp = (composed * &c)?.sum_all()?.backward()?.get(&x).cloned().expect("gradient");
                let d = (g_ours - g_comp)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(d < 1e-12, "{what}: gradients differ by {d}");
            }
        }
        Ok(())
    }

    /// The convolution on the composed path passes the finite-difference check, mixed parity and
    /// stride 2 included.
    #[test]
    fn composed_gradients_match_finite_differences() -> Result<()> {
        for (h, w, k, stride, padding) in [(6, 5, 3, 2, 1), (5, 4, 3, 1, 0), (7, 7, 5, 2, 2)] {
            let x = rand_var((2, 2, h, w), 3)?;
            let wt = rand_var((3, 2, k, k), 4)?;
            crate::nn::with_portable_layers(|| {
                check_grads(&[&x, &wt], 1e-6, 1e-6, |v| conv2d_unfolded(&v[0], &v[1], stride, padding))
            })?;
        }
        Ok(())
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() -> Result<()> {
        // <im2col(x), c> = <x, col2im(c)> for random x, c.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1., (2, 3, 7, 6), &dev)?;
        let cols = im2col(&x, 3, 3, 2, 1)?;
        let c = Tensor::randn(0f64, 1., cols.shape(), &dev)?;
        let back = c.apply_op1_no_bwd(&Col2im {
            g: Geometry { kh: 3, kw: 3, stride: 2, padding: 1 },
            c: 3,
            h: 7,
            w: 6,
        })?;
        let lhs = (cols * &c)?.sum_all()?.to_scalar::<f64>()?;
        let rhs = (x * back)?.sum_all()?.to_scalar::<f64>()?;
        assert!((lhs - rhs).abs() < 1e-9 * (1.0 + lhs.abs()), "{lhs} vs {rhs}");
        Ok(())
    }

    #[test]
    fn rejects_bad_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let wt = Tensor::zeros((2, 2, 3, 3), DType::F32, &dev).unwrap();
        let e = conv2d_unfolded(&x, &wt, 1, 1).unwrap_err().to_string();
        assert!(e.contains("does not fit input with 3 channels"), "{e}");
        let wt = Tensor::zeros((2, 3, 7, 7), DType::F32, &dev).unwrap();
        let e = conv2d_unfolded(&x, &wt, 1, 1).unwrap_err().to_string();
        assert!(e.contains("smaller than the kernel"), "{e}");
    }
}
