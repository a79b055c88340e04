//! A tiny CNN for fast tests and smoke runs: four conv3×3–BN–ReLU–maxpool2×2 blocks
//! (8, 16, 32, 64 channels) and global average pooling to a 64-wide embedding.
//! ≈4.4 M MACs at 64²; the input side must be a multiple of 16.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{BatchNorm2d, Conv2d, global_avg_pool, max_pool2x2};
use crate::student::{Heads, Student, StudentOutput, StudentSpec, check_input};

const CHANNELS: [usize; 4] = [8, 16, 32, 64];

pub struct TinyCnn {
    spec: StudentSpec,
    blocks: Vec<(Conv2d, BatchNorm2d)>,
    heads: Heads,
}

impl TinyCnn {
    pub fn new(spec: StudentSpec, vb: VarBuilder<'_>) -> Result<Self> {
        let mut c = 3;
        let mut blocks = Vec::new();
        for (i, out) in CHANNELS.into_iter().enumerate() {
            let vb = vb.pp(format!("block{i}"));
            blocks.push((
                Conv2d::new(c, out, 3, 1, 1, false, vb.pp("conv"))?,
                BatchNorm2d::new(out, vb.pp("bn"))?,
            ));
            c = out;
        }
        let heads = Heads::new(&spec, c, 0.0, vb.pp("head"))?;
        Ok(Self { spec, blocks, heads })
    }
}

impl Student for TinyCnn {
    fn spec(&self) -> &StudentSpec {
        &self.spec
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<StudentOutput> {
        check_input(&self.spec, x)?;
        let mut h = x.clone();
        for (conv, bn) in &self.blocks {
            h = max_pool2x2(&bn.forward_t(&conv.forward(&h)?, train)?.relu()?)?;
        }
        self.heads.forward_t(global_avg_pool(&h)?, train)
    }
}
