//! EmoNet (Toisoul et al., "Estimation of continuous valence and arousal levels from faces in
//! naturalistic conditions", Nature Machine Intelligence 2021), the default teacher, for inference
//! with candle.
//!
//! Architecture (all normalisation layers are batch norm with running statistics):
//! - stem: 7×7 stride-2 conv 3→64 (+bias), BN, ReLU; `ConvBlock(64,128)`; 2×2 max pool;
//!   `ConvBlock(128,128)`; `ConvBlock(128,256)` → `x`, 256×64×64 for a 256² input;
//! - a face-alignment network (FAN) of two stacked depth-4 hourglasses over 256 channels, each
//!   followed by `top_m_i`, a 1×1 conv + BN + ReLU (`ll`) and a 1×1 conv to 68 landmark heatmaps;
//!   between stacks `ll` goes through `bl0` and the heatmaps through `al0`, both added to the input
//!   of the next stack;
//! - emotion head: the features `[ll_0 (after bl0), ll_1]` are multiplied by the attention mask
//!   (the channel sum of the last heatmaps), concatenated after `x` (768 channels), reduced by a
//!   1×1 conv to 256, then 4 × [`ConvBlock(256,256)`, 2×2 max pool] to 4×4, averaged to a 256-d
//!   vector, and `emo_fc_2`: Linear 256→128, BN1d, ReLU, Linear 128→n+2 (n expression logits,
//!   then valence, then arousal).
//!
//! Weights load by the official state-dict key names (`conv1.weight`, `m0.b1_4.bn1.running_var`,
//! `emo_fc_2.3.bias`, ...), so the released `emonet_8.pth` / `emonet_5.pth` load unchanged.

mod layers;
mod weights;

use std::cell::RefCell;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use distillery_core::{ClassSet, Preprocess, TeacherFingerprint};

use self::layers::{BatchNorm, Conv, ConvBlock, HourGlass, Linear, global_avg_pool, max_pool2};
pub use self::weights::{EmoNetError, read_state_dict};
use self::weights::{Params, is_parameter};
use crate::teacher::{Teacher, TeacherInfo, TeacherOutput};

/// Input side EmoNet was trained for; the head's pooling only fits this size.
pub const INPUT_SIZE: usize = 256;
/// Number of facial landmarks (heatmaps) predicted by the FAN.
pub const N_LANDMARKS: usize = 68;
/// Width of [`EmoNetRaw::embedding`].
pub const EMBEDDING_DIM: usize = 256;

const N_STACKS: usize = 2;
const HOURGLASS_DEPTH: usize = 4;
const FEATURES: usize = 256;
const EMO_BLOCKS: usize = 4;

/// Which released EmoNet: trained on AffectNet's 8 or 5 expression classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmoNetVariant {
    Eight,
    Five,
}

impl EmoNetVariant {
    pub fn n_expression(self) -> usize {
        match self {
            Self::Eight => 8,
            Self::Five => 5,
        }
    }

    /// `emonet-8` or `emonet-5`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Eight => "emonet-8",
            Self::Five => "emonet-5",
        }
    }

    /// Class names in the order of the logits.
    pub fn classes(self) -> ClassSet {
        match self {
            Self::Eight => ClassSet::emonet8(),
            Self::Five => ClassSet::emonet5(),
        }
    }
}

impl FromStr for EmoNetVariant {
    type Err = EmoNetError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "emonet-8" => Ok(Self::Eight),
            "emonet-5" => Ok(Self::Five),
            _ => Err(EmoNetError::UnknownVariant(s.to_owned())),
        }
    }
}

impl fmt::Display for EmoNetVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One hourglass stack and its heads (`m{i}`, `top_m_{i}`, `conv_last{i}`, `bn_end{i}`, `l{i}`,
/// and `bl{i}`/`al{i}` for all but the last stack).
#[derive(Debug, Clone)]
struct Stack {
    hourglass: HourGlass,
    top: ConvBlock,
    conv_last: Conv,
    bn_end: BatchNorm,
    heatmaps: Conv,
    /// `bl{i}` (features) and `al{i}` (heatmaps → features), feeding the next stack.
    next: Option<(Conv, Conv)>,
}

/// Raw EmoNet outputs for a batch of `n` images.
#[derive(Debug, Clone)]
pub struct EmoNetRaw {
    /// `[n, 68, 64, 64]` landmark heatmaps of the last stack.
    pub heatmap: Tensor,
    /// `[n, n_expression + 2]`: expression logits, then valence, then arousal.
    pub head: Tensor,
    /// `[n, 256]`: the average-pooled emotion features, i.e. the input of `emo_fc_2` (after
    /// `avg_pool_2` and the flatten in the reference forward).
    pub embedding: Tensor,
}

/// The EmoNet teacher.
#[derive(Debug, Clone)]
pub struct EmoNet {
    variant: EmoNetVariant,
    conv1: Conv,
    bn1: BatchNorm,
    conv2: ConvBlock,
    conv3: ConvBlock,
    conv4: ConvBlock,
    stacks: Vec<Stack>,
    emo_in: Conv,
    emo_blocks: Vec<ConvBlock>,
    fc1: Linear,
    fc_bn: BatchNorm,
    fc2: Linear,
    parameters: usize,
    /// Sorted `(key, shape)` of every tensor the model took from its weights.
    weight_shapes: Vec<(String, Vec<usize>)>,
    info: TeacherInfo,
    device: Device,
}

impl EmoNet {
    /// Builds EmoNet from tensors under the official key names. Missing or misshaped keys are
    /// errors naming the key; extra keys are ignored (the released checkpoints are loaded
    /// non-strictly by the reference code too).
    pub fn new(variant: EmoNetVariant, vb: VarBuilder<'_>) -> Result<Self> {
        let device = vb.device().clone();
        let taken = RefCell::new(Vec::new());
        let p = Params::new(vb, &taken);
        let conv1 = Conv::load(&p.pp("conv1"), 3, 64, 7, 2, 3, true)?;
        let bn1 = BatchNorm::load(&p.pp("bn1"), 64)?;
        let conv2 = ConvBlock::load(&p.pp("conv2"), 64, 128)?;
        let conv3 = ConvBlock::load(&p.pp("conv3"), 128, 128)?;
        let conv4 = ConvBlock::load(&p.pp("conv4"), 128, FEATURES)?;
        let stacks = (0..N_STACKS)
            .map(|i| {
                let next = if i + 1 < N_STACKS {
                    Some((
                        Conv::pointwise(&p.pp(format!("bl{i}")), FEATURES, FEATURES)?,
                        Conv::pointwise(&p.pp(format!("al{i}")), N_LANDMARKS, FEATURES)?,
                    ))
                } else {
                    None
                };
                Ok(Stack {
                    hourglass: HourGlass::load(&p.pp(format!("m{i}")), HOURGLASS_DEPTH, FEATURES)?,
                    top: ConvBlock::load(&p.pp(format!("top_m_{i}")), FEATURES, FEATURES)?,
                    conv_last: Conv::pointwise(&p.pp(format!("conv_last{i}")), FEATURES, FEATURES)?,
                    bn_end: BatchNorm::load(&p.pp(format!("bn_end{i}")), FEATURES)?,
                    heatmaps: Conv::pointwise(&p.pp(format!("l{i}")), FEATURES, N_LANDMARKS)?,
                    next,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let emo_in = Conv::pointwise(&p.pp("conv1x1_input_emo_2"), FEATURES * (N_STACKS + 1), FEATURES)?;
        // `emo_net_2` is a Sequential alternating ConvBlock and MaxPool2d: blocks sit at even indices.
        let emo_blocks = (0..EMO_BLOCKS)
            .map(|b| ConvBlock::load(&p.pp("emo_net_2").pp(2 * b), FEATURES, FEATURES))
            .collect::<Result<Vec<_>>>()?;
        let fc = p.pp("emo_fc_2");
        let fc1 = Linear::load(&fc.pp("0"), EMBEDDING_DIM, 128)?;
        let fc_bn = BatchNorm::load(&fc.pp("1"), 128)?;
        let fc2 = Linear::load(&fc.pp("3"), 128, variant.n_expression() + 2)?;

        let mut taken = std::mem::take(&mut *taken.borrow_mut());
        taken.sort_by(|a, b| a.0.cmp(&b.0));
        let parameters = taken.iter().filter(|(k, _)| is_parameter(k)).map(|(_, t)| t.elem_count()).sum();
        let fingerprint = fingerprint(variant, &taken)?;
        let weight_shapes = taken.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
        let info = TeacherInfo {
            name: variant.name().to_owned(),
            classes: variant.classes(),
            preprocess: Preprocess::emonet(),
            has_valence_arousal: true,
            embedding_dim: Some(EMBEDDING_DIM),
            has_landmarks: true,
            max_batch: 16,
            fingerprint,
        };
        Ok(Self {
            variant,
            conv1,
            bn1,
            conv2,
            conv3,
            conv4,
            stacks,
            emo_in,
            emo_blocks,
            fc1,
            fc_bn,
            fc2,
            parameters,
            weight_shapes,
            info,
            device,
        })
    }

    /// Loads a state dict (`.pth`/`.pt` or `.safetensors`, chosen by extension) onto `device`.
    pub fn load(
        variant: EmoNetVariant,
        path: &Path,
        device: &Device,
    ) -> std::result::Result<Self, EmoNetError> {
        let tensors = read_state_dict(path, device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::new(variant, vb).map_err(|source| EmoNetError::Weights {
            path: path.to_owned(),
            variant: variant.name(),
            source,
        })
    }

    pub fn variant(&self) -> EmoNetVariant {
        self.variant
    }

    /// Number of learnable parameters (batch-norm running statistics excluded).
    pub fn parameter_count(&self) -> usize {
        self.parameters
    }

    /// Every weight key the model uses with its shape, sorted by key.
    pub fn weight_shapes(&self) -> &[(String, Vec<usize>)] {
        &self.weight_shapes
    }

    /// Runs the network on `[n, 3, 256, 256]` preprocessed images.
    pub fn forward_raw(&self, x: &Tensor) -> Result<EmoNetRaw> {
        // On a rayon worker, so each convolution's tiles start without a hand-off (`on_pool`).
        crate::nn::on_pool(|| self.forward_raw_here(x))
    }

    fn forward_raw_here(&self, x: &Tensor) -> Result<EmoNetRaw> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != INPUT_SIZE || dims[3] != INPUT_SIZE {
            candle_core::bail!("EmoNet expects input [n, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {dims:?}");
        }
        let x = x.to_dtype(DType::F32)?;
        let x = self.bn1.forward_relu(&self.conv1.forward(&x)?)?;
        let x = max_pool2(&self.conv2.forward(&x)?)?;
        let x = self.conv4.forward(&self.conv3.forward(&x)?)?;

        let mut previous = x.clone();
        let mut features = Vec::with_capacity(N_STACKS);
        let mut heatmap = None;
        for stack in &self.stacks {
            let hg = stack.hourglass.forward(&previous)?;
            let ll = stack.top.forward(&hg)?;
            let ll = stack.bn_end.forward_relu(&stack.conv_last.forward(&ll)?)?;
            let hm = stack.heatmaps.forward(&ll)?;
            let ll = match &stack.next {
                Some((bl, al)) => {
                    let ll = bl.forward(&ll)?;
                    previous = ((previous + &ll)? + al.forward(&hm)?)?;
                    ll
                }
                None => ll,
            };
            features.push(ll);
            heatmap = Some(hm);
        }
        let heatmap = heatmap.expect("EmoNet has at least one stack");

        // Attention: every FAN feature map is weighted by the summed landmark heatmaps.
        let mask = heatmap.sum_keepdim(1)?;
        let attended = Tensor::cat(&features, 1)?.broadcast_mul(&mask)?;
        let mut e = self.emo_in.forward(&Tensor::cat(&[&x, &attended], 1)?)?;
        for block in &self.emo_blocks {
            e = max_pool2(&block.forward(&e)?)?;
        }
        let embedding = global_avg_pool(&e, 4)?;
        let h = self.fc_bn.forward(&self.fc1.forward(&embedding)?)?.relu()?;
        let head = self.fc2.forward(&h)?;
        Ok(EmoNetRaw { heatmap, head, embedding })
    }

    /// Runs the network and splits its outputs into the teacher fields: logits `[n, classes]`,
    /// valence and arousal `[n]`, embedding `[n, 256]` and landmarks `[n, 68, 2]`.
    pub fn forward_all(&self, x: &Tensor) -> Result<TeacherOutput> {
        let raw = self.forward_raw(x)?;
        let n_expr = self.variant.n_expression();
        let landmarks = heatmap_landmarks(&raw.heatmap, x.dim(3)?, x.dim(2)?)?;
        Ok(TeacherOutput {
            logits: raw.head.narrow(1, 0, n_expr)?.contiguous()?,
            valence: Some(raw.head.narrow(1, n_expr, 1)?.squeeze(1)?.contiguous()?),
            arousal: Some(raw.head.narrow(1, n_expr + 1, 1)?.squeeze(1)?.contiguous()?),
            embedding: Some(raw.embedding),
            landmarks: Some(landmarks),
        })
    }
}

impl Teacher for EmoNet {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, x: &Tensor) -> Result<TeacherOutput> {
        self.forward_all(x)
    }
}

/// Landmarks from `[n, k, hh, hw]` heatmaps as `[n, k, 2]` (x, y) input-pixel coordinates for an
/// input of `in_w`×`in_h`: the arg-max cell's centre, scaled to the input, with pixel `i` centred
/// on coordinate `i` (so a 4×4 input block per cell maps to its middle, e.g. cell 0 → 1.5).
pub fn heatmap_landmarks(heatmap: &Tensor, in_w: usize, in_h: usize) -> Result<Tensor> {
    let (n, k, hh, hw) = heatmap.dims4()?;
    let idx = heatmap.reshape((n, k, hh * hw))?.argmax(D::Minus1)?.to_dtype(DType::F32)?;
    let row = (&idx / hw as f64)?.floor()?;
    let col = (&idx - (&row * hw as f64)?)?;
    let sx = in_w as f64 / hw as f64;
    let sy = in_h as f64 / hh as f64;
    let x = ((col + 0.5)? * sx)? - 0.5;
    let y = ((row + 0.5)? * sy)? - 0.5;
    Tensor::stack(&[x?, y?], 2)
}

/// BLAKE3 over a domain tag, every weight (key, shape, little-endian f32 values) in sorted key
/// order, the preprocessing and the variant name.
fn fingerprint(variant: EmoNetVariant, sorted: &[(String, Tensor)]) -> Result<TeacherFingerprint> {
    let mut h = blake3::Hasher::new();
    h.update(b"distillery.teacher.emonet.v1\0");
    let mut buf = Vec::new();
    for (key, t) in sorted {
        h.update(key.as_bytes());
        h.update(&[0]);
        h.update(&(t.rank() as u64).to_le_bytes());
        for d in t.dims() {
            h.update(&(*d as u64).to_le_bytes());
        }
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        buf.clear();
        buf.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        h.update(&buf);
    }
    h.update(&Preprocess::emonet().fingerprint_bytes());
    h.update(variant.name().as_bytes());
    Ok(TeacherFingerprint::from_hasher(&h))
}
