//! Inference-only building blocks of EmoNet: convolution, eval-mode batch norm, linear, the
//! pre-activation `ConvBlock`, the hourglass, and exact pooling/upsampling forms.
//!
//! Every convolution and linear layer records its MACs through [`crate::cost::record`]. Pooling and
//! upsampling use reshape-based forms that are exact for the even sizes EmoNet produces (candle's
//! generic pooling kernels have edge cases we avoid on principle), except max pooling on GPUs
//! (see [`max_pool2`]); on the CPU, max pooling and the hourglass's sum with an upsampled map
//! ([`add_upsampled`]) are one parallel pass each, with the same bits. On a GPU, each batch norm
//! (with its ReLU) and each bias is one pass of [`nn::channel_epilogue`].

use std::mem::MaybeUninit;

use candle_core::{D, DType, Result, Tensor, bail};
use rayon::prelude::*;

use super::weights::Params;
use crate::cost;
use crate::nn;
use crate::nn::fastconv::{self, Channels, ConvGeom, Epilogue, Extent, FusedConv, PreAct};

/// PyTorch's default `BatchNorm` epsilon, used by every normalisation layer of EmoNet.
const BN_EPS: f64 = 1e-5;

/// A 2-D convolution with an optional bias, square kernel, groups = 1.
///
/// On the CPU (f32) the weights are kept flattened on the host and the forward pass runs
/// [`fastconv`]; on other devices it is candle's convolution.
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    weight: ConvWeights,
    /// `[c_out]`.
    bias: Option<Tensor>,
    geom: ConvGeom,
}

#[derive(Debug, Clone)]
enum ConvWeights {
    /// `[c_out, c_in·k·k]` with the bias alongside.
    Host { weight: Vec<f32>, bias: Option<Vec<f32>> },
    /// `[c_out, c_in, k, k]`.
    Device(Tensor),
}

impl Conv {
    /// Loads `{p}.weight` (`[c_out, c_in, k, k]`) and, when `bias`, `{p}.bias`.
    pub(crate) fn load(
        p: &Params<'_>,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = p.get("weight", &[c_out, c_in, k, k])?;
        let bias = if bias { Some(p.get("bias", &[c_out])?) } else { None };
        let weight =
            match (weight.device().is_cpu() && weight.dtype() == DType::F32, fastconv::host_weights(&weight))
            {
                (true, Some(w)) => ConvWeights::Host {
                    weight: w,
                    bias: bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?,
                },
                _ => ConvWeights::Device(weight),
            };
        Ok(Self { weight, bias, geom: ConvGeom::square(c_in, c_out, k, stride, padding) })
    }

    /// A 1×1 convolution with bias, stride 1.
    pub(crate) fn pointwise(p: &Params<'_>, c_in: usize, c_out: usize) -> Result<Self> {
        Self::load(p, c_in, c_out, 1, 1, 0, true)
    }

    /// Host weights `[c_out, k]` when the fast CPU path applies.
    fn host(&self) -> Option<&[f32]> {
        match &self.weight {
            ConvWeights::Host { weight, .. } => Some(weight),
            ConvWeights::Device(_) => None,
        }
    }

    fn record(&self, n: usize, h: usize, w: usize) -> Result<()> {
        let (ho, wo) = self.geom.out_hw(h, w)?;
        cost::record(cost::conv2d_macs(
            &[n, self.geom.c_out, ho, wo],
            self.geom.c_in,
            self.geom.kh,
            self.geom.kw,
        ));
        Ok(())
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        self.record(n, h, w)?;
        let g = &self.geom;
        let weight = match &self.weight {
            ConvWeights::Host { weight, bias } => {
                let epi = Epilogue { bias: bias.as_deref(), ..Epilogue::default() };
                let op = FusedConv { geom: *g, weight, pre: None, epi };
                if let Some(y) = fastconv::conv2d_tensor(&op, x)? {
                    return Ok(y);
                }
                Tensor::from_slice(weight, (g.c_out, g.c_in, g.kh, g.kw), x.device())?.to_dtype(x.dtype())?
            }
            ConvWeights::Device(t) => t.clone(),
        };
        let y = nn::candle_conv2d(x, &weight, g.pad_h, g.stride_h, 1, 1)?;
        let Some(b) = &self.bias else { return Ok(y) };
        let b = b.to_dtype(y.dtype())?.reshape((1, g.c_out, 1, 1))?;
        match nn::channel_epilogue(&y, None, Some(&b), &[], false)? {
            Some(y) => Ok(y),
            None => y.broadcast_add(&b),
        }
    }
}

/// Batch normalisation with running statistics (eval mode), precomputed as `x * scale + shift`.
#[derive(Debug, Clone)]
pub(crate) struct BatchNorm {
    /// `[1, c, 1, 1]` for 2-D inputs; reshaped on the fly for 1-D ones.
    scale: Tensor,
    shift: Tensor,
    /// The same on the host, for the fused CPU path (empty on other devices).
    host_scale: Vec<f32>,
    host_shift: Vec<f32>,
}

impl BatchNorm {
    /// Loads `{p}.weight`, `{p}.bias`, `{p}.running_mean`, `{p}.running_var`, all `[c]`.
    pub(crate) fn load(p: &Params<'_>, c: usize) -> Result<Self> {
        let gamma = p.get("weight", &[c])?;
        let beta = p.get("bias", &[c])?;
        let mean = p.get("running_mean", &[c])?;
        let var = p.get("running_var", &[c])?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let shift = (beta - (mean * &scale)?)?;
        let (host_scale, host_shift) = if scale.device().is_cpu() {
            (scale.to_dtype(DType::F32)?.to_vec1()?, shift.to_dtype(DType::F32)?.to_vec1()?)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Self {
            scale: scale.reshape((1, c, 1, 1))?,
            shift: shift.reshape((1, c, 1, 1))?,
            host_scale,
            host_shift,
        })
    }

    /// `relu(bn(x))` as a pre-activation fused into the next convolution (CPU only).
    fn pre_act(&self) -> Option<PreAct<'_>> {
        (!self.host_scale.is_empty()).then_some(PreAct { scale: &self.host_scale, shift: &self.host_shift })
    }

    /// Normalises `[n, c, h, w]` or `[n, c]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match nn::channel_epilogue(x, Some(&self.scale), Some(&self.shift), &[], false)? {
            Some(y) => Ok(y),
            None => self.forward_broadcast(x),
        }
    }

    /// `forward` as candle's broadcasting multiply and add (where the epilogue kernel does not run).
    fn forward_broadcast(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 2 {
            let c = self.scale.dim(1)?;
            let scale = self.scale.reshape((1, c))?;
            let shift = self.shift.reshape((1, c))?;
            x.broadcast_mul(&scale)?.broadcast_add(&shift)
        } else {
            x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)
        }
    }

    /// `relu(bn(x))`, the pre-activation used throughout EmoNet.
    pub(crate) fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        match nn::channel_epilogue(x, Some(&self.scale), Some(&self.shift), &[], true)? {
            Some(y) => Ok(y),
            None => self.forward_broadcast(x)?.relu(),
        }
    }
}

/// A fully connected layer `y = x Wᵀ + b` on `[n, d_in]`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// Stored transposed, `[d_in, d_out]`, so the forward pass is a plain matmul.
    weight_t: Tensor,
    bias: Tensor,
}

impl Linear {
    pub(crate) fn load(p: &Params<'_>, d_in: usize, d_out: usize) -> Result<Self> {
        let weight_t = p.get("weight", &[d_out, d_in])?.t()?.contiguous()?;
        let bias = p.get("bias", &[d_out])?.reshape((1, d_out))?;
        Ok(Self { weight_t, bias })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, d_in) = x.dims2()?;
        let d_out = self.weight_t.dim(1)?;
        cost::record(cost::linear_macs(n, d_in, d_out));
        x.matmul(&self.weight_t)?.broadcast_add(&self.bias)
    }
}

/// EmoNet's `ConvBlock`: three pre-activated 3×3 convolutions producing C/2, C/4 and C/4
/// channels whose outputs are concatenated, plus a (projected when C changes) skip connection.
#[derive(Debug, Clone)]
pub(crate) struct ConvBlock {
    bn1: BatchNorm,
    conv1: Conv,
    bn2: BatchNorm,
    conv2: Conv,
    bn3: BatchNorm,
    conv3: Conv,
    /// `downsample.0` (norm) and `downsample.2` (1×1 conv, no bias) when `c_in != c_out`.
    downsample: Option<(BatchNorm, Conv)>,
}

impl ConvBlock {
    pub(crate) fn load(p: &Params<'_>, c_in: usize, c_out: usize) -> Result<Self> {
        let (half, quarter) = (c_out / 2, c_out / 4);
        let downsample = if c_in != c_out {
            let d = p.pp("downsample");
            Some((BatchNorm::load(&d.pp("0"), c_in)?, Conv::load(&d.pp("2"), c_in, c_out, 1, 1, 0, false)?))
        } else {
            None
        };
        Ok(Self {
            bn1: BatchNorm::load(&p.pp("bn1"), c_in)?,
            conv1: Conv::load(&p.pp("conv1"), c_in, half, 3, 1, 1, false)?,
            bn2: BatchNorm::load(&p.pp("bn2"), half)?,
            conv2: Conv::load(&p.pp("conv2"), half, quarter, 3, 1, 1, false)?,
            bn3: BatchNorm::load(&p.pp("bn3"), quarter)?,
            conv3: Conv::load(&p.pp("conv3"), quarter, quarter, 3, 1, 1, false)?,
            downsample,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_fused(x)? {
            return Ok(y);
        }
        let a = self.conv1.forward(&self.bn1.forward_relu(x)?)?;
        let b = self.conv2.forward(&self.bn2.forward_relu(&a)?)?;
        let c = self.conv3.forward(&self.bn3.forward_relu(&b)?)?;
        let out = Tensor::cat(&[&a, &b, &c], 1)?;
        match &self.downsample {
            Some((bn, conv)) => out + conv.forward(&bn.forward_relu(x)?)?,
            None => out + x,
        }
    }
}

impl ConvBlock {
    /// The CPU path: the three convolutions write their slices of one output buffer (the
    /// concatenation costs nothing), each batch norm + ReLU is applied while unfolding, and the
    /// skip connection (projected or not) is accumulated into the same buffer. `None` when the
    /// weights or `x` are not host f32.
    fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (Some(w1), Some(w2), Some(w3)) = (self.conv1.host(), self.conv2.host(), self.conv3.host()) else {
            return Ok(None);
        };
        let (Some(p1), Some(p2), Some(p3)) = (self.bn1.pre_act(), self.bn2.pre_act(), self.bn3.pre_act())
        else {
            return Ok(None);
        };
        let (n, c_in, h, w) = x.dims4()?;
        let (half, quarter) = (self.conv1.geom.c_out, self.conv2.geom.c_out);
        let c_out = half + 2 * quarter;
        let x = x.contiguous()?;
        let out = fastconv::cpu_f32(&x, |src| -> Result<Option<Vec<f32>>> {
            let mut cat = vec![0f32; n * c_out * h * w];
            let ext = Extent { n, h, w };
            let (input, all) = ((src, Channels::all(c_in)), Channels::all(c_out));
            let none = Epilogue::default();
            let op =
                |conv: &Conv, weight, pre| FusedConv { geom: conv.geom, weight, pre: Some(pre), epi: none };
            fastconv::conv2d(&op(&self.conv1, w1, p1), ext, input, (&mut cat, all))?;
            fastconv::conv2d_within(&op(&self.conv2, w2, p2), ext, &mut cat, c_out, (0, half))?;
            fastconv::conv2d_within(&op(&self.conv3, w3, p3), ext, &mut cat, c_out, (half, half + quarter))?;
            match &self.downsample {
                Some((bn, conv)) => {
                    let (Some(wd), Some(pd)) = (conv.host(), bn.pre_act()) else { return Ok(None) };
                    let acc = FusedConv { epi: Epilogue { accumulate: true, ..none }, ..op(conv, wd, pd) };
                    fastconv::conv2d(&acc, ext, input, (&mut cat, all))?;
                }
                None => {
                    if c_in != c_out {
                        bail!("ConvBlock: {c_in} input channels need a projection to {c_out}");
                    }
                    cat.par_chunks_mut(1 << 14).zip(src.par_chunks(1 << 14)).for_each(|(o, s)| {
                        o.iter_mut().zip(s).for_each(|(o, s)| *o += s);
                    });
                }
            }
            Ok(Some(cat))
        });
        let Some(Some(cat)) = out.transpose()? else { return Ok(None) };
        for conv in [&self.conv1, &self.conv2, &self.conv3] {
            conv.record(n, h, w)?;
        }
        if let Some((_, conv)) = &self.downsample {
            conv.record(n, h, w)?;
        }
        Ok(Some(Tensor::from_vec(cat, (n, c_out, h, w), x.device())?))
    }
}

/// One level of the hourglass: `b1_L` on the full-resolution branch, `b2_L` after pooling and
/// `b3_L` before upsampling.
#[derive(Debug, Clone)]
struct Level {
    b1: ConvBlock,
    b2: ConvBlock,
    b3: ConvBlock,
}

/// A recursive hourglass of `depth` levels over 256 channels; the innermost level has an extra
/// block, `b2_plus_1`.
#[derive(Debug, Clone)]
pub(crate) struct HourGlass {
    /// `levels[l - 1]` is level `l`; the recursion starts at level `depth`.
    levels: Vec<Level>,
    b2_plus_1: ConvBlock,
}

impl HourGlass {
    pub(crate) fn load(p: &Params<'_>, depth: usize, features: usize) -> Result<Self> {
        let levels = (1..=depth)
            .map(|l| {
                Ok(Level {
                    b1: ConvBlock::load(&p.pp(format!("b1_{l}")), features, features)?,
                    b2: ConvBlock::load(&p.pp(format!("b2_{l}")), features, features)?,
                    b3: ConvBlock::load(&p.pp(format!("b3_{l}")), features, features)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let b2_plus_1 = ConvBlock::load(&p.pp("b2_plus_1"), features, features)?;
        Ok(Self { levels, b2_plus_1 })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.level(self.levels.len(), x)
    }

    fn level(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let blocks = &self.levels[l - 1];
        let up = blocks.b1.forward(x)?;
        let low = blocks.b2.forward(&max_pool2(x)?)?;
        let low = if l > 1 { self.level(l - 1, &low)? } else { self.b2_plus_1.forward(&low)? };
        let low = blocks.b3.forward(&low)?;
        add_upsampled(&up, &low)
    }
}

/// 2×2 max pooling with stride 2 on `[n, c, h, w]` with even `h` and `w`.
///
/// On the CPU one parallel pass over contiguous planes, with the bits of two reductions over axes
/// of two, which serve strided inputs and wherever a gradient is tracked (candle's pooling
/// backward is wrong); candle's pooling kernel elsewhere. Its forward pass is exact for even
/// sizes, and on CUDA candle reduces with one block per output, so the reductions would launch a
/// block for every two values.
pub(crate) fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("emonet max_pool2: spatial size {h}×{w} is not even");
    }
    if x.device().is_cpu() && !x.track_op() && x.elem_count() > 0 {
        let pooled = fastconv::cpu_f32(x, |v| {
            let (ho, wo) = (h / 2, w / 2);
            let pool = |(plane, out): (&[f32], &mut [MaybeUninit<f32>])| {
                for (rows, o) in plane.chunks_exact(2 * w).zip(out.chunks_exact_mut(wo)) {
                    let (r0, r1) = rows.split_at(w);
                    for (j, o) in o.iter_mut().enumerate() {
                        // Across each row's pair, then across the rows: the reductions' order.
                        o.write(r0[2 * j].max(r0[2 * j + 1]).max(r1[2 * j].max(r1[2 * j + 1])));
                    }
                }
            };
            // SAFETY: every output plane is written whole.
            unsafe {
                nn::written(n * c * ho * wo, |out| {
                    v.par_chunks(h * w).zip(out.par_chunks_mut(ho * wo)).for_each(pool)
                })
            }
        });
        if let Some(out) = pooled {
            return Tensor::from_vec(out, (n, c, h / 2, w / 2), x.device());
        }
    }
    if x.device().is_cpu() || x.track_op() {
        x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
    } else {
        x.max_pool2d(2)
    }
}

/// An output plane of [`add_upsampled`] and the matching plane of `up`.
type Planes<'a> = (&'a mut [MaybeUninit<f32>], &'a [f32]);

/// `up + upsample_nearest2(low)` for `up` of `[n, c, 2h, 2w]` and `low` of `[n, c, h, w]`: one
/// pass on the CPU (inference), the two ops elsewhere.
pub(crate) fn add_upsampled(up: &Tensor, low: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = low.dims4()?;
    if up.dims() != [n, c, 2 * h, 2 * w] {
        bail!("emonet hourglass: {:?} plus {:?} upsampled ×2", up.dims(), low.dims());
    }
    if !up.track_op() && !low.track_op() && low.elem_count() > 0 {
        let summed = fastconv::cpu_f32_all(&[up, low], |v| {
            let (u, l) = (v[0], v[1]);
            let add = |((out, up), low): (Planes<'_>, &[f32])| {
                let low_rows = low.chunks_exact(w).flat_map(|r| [r, r]);
                for ((o, u), l) in out.chunks_exact_mut(2 * w).zip(up.chunks_exact(2 * w)).zip(low_rows) {
                    for (j, (o, &u)) in o.iter_mut().zip(u).enumerate() {
                        o.write(u + l[j / 2]);
                    }
                }
            };
            // SAFETY: every output plane is written whole.
            unsafe {
                nn::written(u.len(), |out| {
                    let planes = out.par_chunks_mut(4 * h * w).zip(u.par_chunks(4 * h * w));
                    planes.zip(l.par_chunks(h * w)).for_each(add)
                })
            }
        });
        if let Some(out) = summed {
            return Tensor::from_vec(out, up.shape(), up.device());
        }
    }
    up + upsample_nearest2(low)?
}

/// Nearest-neighbour ×2 upsampling of `[n, c, h, w]`.
pub(crate) fn upsample_nearest2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?.broadcast_as((n, c, h, 2, w, 2))?.reshape((n, c, 2 * h, 2 * w))
}

/// Average pooling with a `k`×`k` window and stride `k` that must cover `[n, c, k, k]` exactly,
/// returning `[n, c]`.
pub(crate) fn global_avg_pool(x: &Tensor, k: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h != k || w != k {
        candle_core::bail!("emonet avg_pool_2: expected a {k}×{k} map, got {h}×{w}");
    }
    x.reshape((n, c, h * w))?.mean(D::Minus1)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn pooling_and_upsampling_match_definitions() {
        let x = Tensor::arange(0f32, 32.0, &Device::Cpu).unwrap().reshape((1, 2, 4, 4)).unwrap();
        let p = max_pool2(&x).unwrap();
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![5.0, 7.0, 13.0, 15.0, 21.0, 23.0, 29.0, 31.0]
        );
        let u = upsample_nearest2(&p).unwrap();
        assert_eq!(u.dims(), &[1, 2, 4, 4]);
        let row0 = u.get(0).unwrap().get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        let row1 = u.get(0).unwrap().get(0).unwrap().get(1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row0, vec![5.0, 5.0, 7.0, 7.0]);
        assert_eq!(row0, row1);
        let a = global_avg_pool(&x, 4).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, vec![vec![7.5, 23.5]]);
        assert!(global_avg_pool(&x.narrow(3, 0, 2).unwrap(), 4).is_err());
        assert!(max_pool2(&x.narrow(3, 0, 3).unwrap()).is_err());
    }

    /// The one-pass CPU forms of pooling and of the hourglass's upsampled sum give the bits of
    /// the reductions and of the two ops, for contiguous and strided inputs.
    #[test]
    fn one_pass_pooling_and_upsampled_sum_match_the_compositions() -> Result<()> {
        let dev = Device::Cpu;
        for (n, c, h, w) in [(2, 3, 8, 6), (1, 5, 2, 2), (3, 2, 16, 4), (1, 64, 32, 32)] {
            let x = Tensor::randn(0f32, 1., (n, c + 1, w, h), &dev)?.narrow(1, 1, c)?.transpose(2, 3)?;
            for x in [x.clone(), x.contiguous()?] {
                let reduced = x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)?;
                let pooled = max_pool2(&x)?;
                assert_eq!(pooled.dims(), reduced.dims());
                let (p, r) =
                    (pooled.flatten_all()?.to_vec1::<f32>()?, reduced.flatten_all()?.to_vec1::<f32>()?);
                assert!(p.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits()), "max {n}x{c}x{h}x{w}");
                let up = Tensor::randn(0f32, 1., (n, c, 2 * h, 2 * w), &dev)?;
                let want = (&up + upsample_nearest2(&x)?)?.flatten_all()?.to_vec1::<f32>()?;
                let got = add_upsampled(&up, &x)?;
                assert_eq!(got.dims(), up.dims());
                let got = got.flatten_all()?.to_vec1::<f32>()?;
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "sum {n}x{c}x{h}x{w}"
                );
            }
        }
        let (up, low) =
            (Tensor::zeros((1, 2, 8, 8), DType::F32, &dev)?, Tensor::zeros((1, 2, 4, 2), DType::F32, &dev)?);
        let err = add_upsampled(&up, &low).unwrap_err().to_string();
        assert!(err.contains("[1, 2, 8, 8] plus [1, 2, 4, 2]"), "{err}");
        Ok(())
    }

    /// The two forms `max_pool2` chooses between agree exactly on even sizes, for contiguous and
    /// strided inputs (candle's pooling kernels are the same loops on every device).
    #[test]
    fn candle_max_pooling_matches_the_reductions_on_even_sizes() -> Result<()> {
        let dev = Device::Cpu;
        for (n, c, h, w) in [(2, 3, 8, 6), (1, 5, 2, 2), (3, 2, 16, 4)] {
            let x = Tensor::randn(0f32, 1., (n, c + 1, w, h), &dev)?.narrow(1, 1, c)?.transpose(2, 3)?;
            assert!(!x.is_contiguous());
            for x in [x.clone(), x.contiguous()?] {
                let reduced = x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)?;
                let pooled = x.max_pool2d(2)?;
                assert_eq!(pooled.dims(), reduced.dims());
                let diff = (pooled - &reduced)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "{n}x{c}x{h}x{w}");
            }
        }
        Ok(())
    }
}
