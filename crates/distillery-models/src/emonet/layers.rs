//! Inference-only building blocks of EmoNet: convolution, eval-mode batch norm, linear, the
//! pre-activation `ConvBlock`, the hourglass, and exact pooling/upsampling forms.
//!
//! Every convolution and linear layer records its MACs through [`crate::cost::record`]. Pooling and
//! upsampling use reshape-based forms that are exact for the even sizes EmoNet produces (candle's
//! generic pooling kernels have edge cases we avoid on principle).

use candle_core::{D, Result, Tensor};

use super::weights::Params;
use crate::cost;

/// PyTorch's default `BatchNorm` epsilon, used by every normalisation layer of EmoNet.
const BN_EPS: f64 = 1e-5;

/// A 2-D convolution with an optional bias, square kernel, groups = 1.
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    weight: Tensor,
    /// `[1, c_out, 1, 1]`, ready to broadcast.
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    c_in: usize,
    k: usize,
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
        let bias = if bias { Some(p.get("bias", &[c_out])?.reshape((1, c_out, 1, 1))?) } else { None };
        Ok(Self { weight, bias, stride, padding, c_in, k })
    }

    /// A 1×1 convolution with bias, stride 1.
    pub(crate) fn pointwise(p: &Params<'_>, c_in: usize, c_out: usize) -> Result<Self> {
        Self::load(p, c_in, c_out, 1, 1, 0, true)
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.k == 1 && self.stride == 1 && self.padding == 0 {
            // A 1×1 convolution is a matmul over channels; this skips the im2col copy.
            let (n, c, h, w) = x.dims4()?;
            let c_out = self.weight.dim(0)?;
            let wm = self.weight.reshape((c_out, c))?;
            let xm = x.reshape((n, c, h * w))?;
            wm.broadcast_left(n)?.matmul(&xm)?.reshape((n, c_out, h, w))?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
        };
        cost::record(cost::conv2d_macs(y.dims(), self.c_in, self.k, self.k));
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Batch normalisation with running statistics (eval mode), precomputed as `x * scale + shift`.
#[derive(Debug, Clone)]
pub(crate) struct BatchNorm {
    /// `[1, c, 1, 1]` for 2-D inputs; reshaped on the fly for 1-D ones.
    scale: Tensor,
    shift: Tensor,
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
        Ok(Self { scale: scale.reshape((1, c, 1, 1))?, shift: shift.reshape((1, c, 1, 1))? })
    }

    /// Normalises `[n, c, h, w]` or `[n, c]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
        self.forward(x)?.relu()
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
        up + upsample_nearest2(&low)?
    }
}

/// 2×2 max pooling with stride 2 on `[n, c, h, w]` with even `h` and `w`.
pub(crate) fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("emonet max_pool2: spatial size {h}×{w} is not even");
    }
    x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
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
}
