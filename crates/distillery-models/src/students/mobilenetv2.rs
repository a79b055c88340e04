//! MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").
//!
//! Layout as in the paper's Table 2: a stride-2 3×3 stem to 32 channels, seven stages of inverted
//! residual blocks `(t, c, n, s)`, a 1×1 convolution to 1280 channels and global average pooling.
//! The width multiplier scales every channel count, rounded to a multiple of 8 (never below 90%
//! of the scaled value); the last width is not reduced below 1280. At 1.0× and 224² the backbone
//! costs ≈0.30 G MACs; with a 1000-class head it has the reference 3.50 M parameters (our extra
//! valence/arousal head adds 2 562). Any square input side works (stride-2 layers round up).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{
    BatchNorm2d, Conv2d, ConvBn, DepthwiseConv3x3, Pointwise, StageConv, conv_bn_chain_t, global_avg_pool,
};
use crate::student::{Heads, Student, StudentOutput, StudentSpec, check_input};

/// Expansion `t`, output channels `c`, repeats `n`, first stride `s` (the paper's Table 2).
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// Rounds `v` to a multiple of `d` (at least `d`), bumping up when rounding lost more than 10%.
pub fn make_divisible(v: f32, d: usize) -> usize {
    let r = (((v + d as f32 / 2.0) as usize) / d * d).max(d);
    if (r as f32) < 0.9 * v { r + d } else { r }
}

/// Inverted residual: 1×1 expand (skipped when t = 1) → depthwise 3×3 → linear 1×1 projection,
/// with an identity shortcut when shape is preserved.
#[derive(Clone, Debug)]
struct InvertedResidual {
    expand: Option<(Pointwise, BatchNorm2d)>,
    dw: DepthwiseConv3x3,
    dw_bn: BatchNorm2d,
    project: Pointwise,
    project_bn: BatchNorm2d,
    residual: bool,
}

impl InvertedResidual {
    fn new(c_in: usize, c_out: usize, stride: usize, t: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let hidden = c_in * t;
        let expand = if t != 1 {
            Some((
                Pointwise::new(c_in, hidden, vb.pp("expand"))?,
                BatchNorm2d::new(hidden, vb.pp("expand_bn"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            expand,
            dw: DepthwiseConv3x3::new(hidden, stride, vb.pp("dw"))?,
            dw_bn: BatchNorm2d::new(hidden, vb.pp("dw_bn"))?,
            project: Pointwise::new(hidden, c_out, vb.pp("project"))?,
            project_bn: BatchNorm2d::new(c_out, vb.pp("project_bn"))?,
            residual: stride == 1 && c_in == c_out,
        })
    }

    /// One chain of stages (one op when training on the CPU: see [`conv_bn_chain_t`]).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut stages = Vec::with_capacity(3);
        if let Some((pw, bn)) = &self.expand {
            stages.push(ConvBn { conv: StageConv::Pointwise(pw), bn, relu6: true });
        }
        stages.push(ConvBn { conv: StageConv::Depthwise(&self.dw), bn: &self.dw_bn, relu6: true });
        stages.push(ConvBn { conv: StageConv::Pointwise(&self.project), bn: &self.project_bn, relu6: false });
        conv_bn_chain_t(x, &stages, self.residual, train)
    }
}

/// MobileNetV2 with the shared student heads (dropout 0.2 before the expression and VA heads).
pub struct MobileNetV2 {
    spec: StudentSpec,
    stem: Conv2d,
    stem_bn: BatchNorm2d,
    blocks: Vec<InvertedResidual>,
    last: Pointwise,
    last_bn: BatchNorm2d,
    heads: Heads,
}

impl MobileNetV2 {
    pub fn new(spec: StudentSpec, width: f32, vb: VarBuilder<'_>) -> Result<Self> {
        let mut c = make_divisible(32.0 * width, 8);
        let last_c = make_divisible(1280.0 * width.max(1.0), 8);
        let stem = Conv2d::new(3, c, 3, 2, 1, false, vb.pp("stem"))?;
        let stem_bn = BatchNorm2d::new(c, vb.pp("stem_bn"))?;
        let mut blocks = Vec::new();
        for (t, ch, n, s) in SETTINGS {
            let out = make_divisible(ch as f32 * width, 8);
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                blocks.push(InvertedResidual::new(
                    c,
                    out,
                    stride,
                    t,
                    vb.pp(format!("blocks.{}", blocks.len())),
                )?);
                c = out;
            }
        }
        let last = Pointwise::new(c, last_c, vb.pp("last"))?;
        let last_bn = BatchNorm2d::new(last_c, vb.pp("last_bn"))?;
        let heads = Heads::new(&spec, last_c, 0.2, vb.pp("head"))?;
        Ok(Self { spec, stem, stem_bn, blocks, last, last_bn, heads })
    }
}

impl Student for MobileNetV2 {
    fn spec(&self) -> &StudentSpec {
        &self.spec
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<StudentOutput> {
        check_input(&self.spec, x)?;
        let mut h = self.stem_bn.forward_relu6_t(&self.stem.forward(x)?, train)?;
        for b in &self.blocks {
            h = b.forward_t(&h, train)?;
        }
        let last = ConvBn { conv: StageConv::Pointwise(&self.last), bn: &self.last_bn, relu6: true };
        let h = conv_bn_chain_t(&h, &[last], false, train)?;
        self.heads.forward_t(global_avg_pool(&h)?, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_rounding_follows_the_reference_rule() {
        assert_eq!(make_divisible(32.0, 8), 32);
        assert_eq!(make_divisible(16.0 * 0.5, 8), 8);
        assert_eq!(make_divisible(24.0 * 0.5, 8), 16);
        assert_eq!(make_divisible(32.0 * 0.35, 8), 16); // 11.2 → 8 would lose > 10%
        assert_eq!(make_divisible(96.0 * 0.75, 8), 72);
        assert_eq!(make_divisible(1280.0, 8), 1280);
    }
}
