//! ResNet-18 (He et al. 2016, "Deep Residual Learning for Image Recognition").
//!
//! 7×7 stride-2 stem, 3×3 stride-2 max pool, four stages of two basic blocks (64, 128, 256, 512
//! channels; stages 2–4 start with stride 2 and a 1×1 projection shortcut), global average pooling
//! to a 512-wide embedding. ≈1.8 G MACs at 224²; 11.69 M parameters with a 1000-class head.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{BatchNorm2d, Conv2d, global_avg_pool, max_pool3x3_s2_nonneg};
use crate::student::{Heads, Student, StudentOutput, StudentSpec, check_input};

#[derive(Clone, Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    down: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    fn new(c_in: usize, c_out: usize, stride: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let down = if stride != 1 || c_in != c_out {
            Some((
                Conv2d::new(c_in, c_out, 1, stride, 0, false, vb.pp("down"))?,
                BatchNorm2d::new(c_out, vb.pp("down_bn"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: Conv2d::new(c_in, c_out, 3, stride, 1, false, vb.pp("conv1"))?,
            bn1: BatchNorm2d::new(c_out, vb.pp("bn1"))?,
            conv2: Conv2d::new(c_out, c_out, 3, 1, 1, false, vb.pp("conv2"))?,
            bn2: BatchNorm2d::new(c_out, vb.pp("bn2"))?,
            down,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let h = self.bn2.forward_t(&self.conv2.forward(&h)?, train)?;
        let shortcut = match &self.down {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        (h + shortcut)?.relu()
    }
}

/// ResNet-18 with the shared student heads (no dropout).
pub struct ResNet18 {
    spec: StudentSpec,
    stem: Conv2d,
    stem_bn: BatchNorm2d,
    blocks: Vec<BasicBlock>,
    heads: Heads,
}

impl ResNet18 {
    pub fn new(spec: StudentSpec, vb: VarBuilder<'_>) -> Result<Self> {
        let stem = Conv2d::new(3, 64, 7, 2, 3, false, vb.pp("stem"))?;
        let stem_bn = BatchNorm2d::new(64, vb.pp("stem_bn"))?;
        let mut blocks = Vec::new();
        let mut c = 64;
        for (i, out) in [64, 128, 256, 512].into_iter().enumerate() {
            for j in 0..2 {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(c, out, stride, vb.pp(format!("layer{}.{j}", i + 1)))?);
                c = out;
            }
        }
        let heads = Heads::new(&spec, c, 0.0, vb.pp("head"))?;
        Ok(Self { spec, stem, stem_bn, blocks, heads })
    }
}

impl Student for ResNet18 {
    fn spec(&self) -> &StudentSpec {
        &self.spec
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<StudentOutput> {
        check_input(&self.spec, x)?;
        let h = self.stem_bn.forward_t(&self.stem.forward(x)?, train)?.relu()?;
        // Post-ReLU values are ≥ 0, which the zero-padded max pool relies on.
        let mut h = max_pool3x3_s2_nonneg(&h)?;
        for b in &self.blocks {
            h = b.forward_t(&h, train)?;
        }
        self.heads.forward_t(global_avg_pool(&h)?, train)
    }
}
