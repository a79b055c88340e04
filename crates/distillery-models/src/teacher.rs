//! The interface every teacher implements: EmoNet, ONNX graphs, or a trained student used as one.

use candle_core::{Device, Result, Tensor};
use distillery_core::{ClassSet, Preprocess, TeacherFingerprint};

/// What a teacher is, independent of any input.
#[derive(Clone, Debug)]
pub struct TeacherInfo {
    /// Human name, e.g. `emonet-8` or the TOML file's `name`.
    pub name: String,
    pub classes: ClassSet,
    /// How images must be prepared; tensors given to [`Teacher::forward`] already follow it.
    pub preprocess: Preprocess,
    /// True when the teacher predicts valence and arousal.
    pub has_valence_arousal: bool,
    /// Width of [`TeacherOutput::embedding`], if the teacher exposes one.
    pub embedding_dim: Option<usize>,
    /// True when the teacher produces landmarks.
    pub has_landmarks: bool,
    /// Largest batch the teacher is happy to take at once.
    pub max_batch: usize,
    /// Hash of weights + preprocessing; see [`distillery_core::TeacherFingerprint`].
    pub fingerprint: TeacherFingerprint,
}

/// Outputs for a batch of `n` images. All tensors are f32 on the teacher's device.
#[derive(Debug, Clone)]
pub struct TeacherOutput {
    /// `[n, classes]`. For teachers that emit probabilities, `ln(p)` clamped below.
    pub logits: Tensor,
    /// `[n]`, in [−1, 1] by convention.
    pub valence: Option<Tensor>,
    /// `[n]`, in [−1, 1] by convention.
    pub arousal: Option<Tensor>,
    /// `[n, d]`.
    pub embedding: Option<Tensor>,
    /// `[n, 68, 2]` as (x, y) in input pixels.
    pub landmarks: Option<Tensor>,
}

/// A model that labels preprocessed face batches. Implementations are immutable after loading, so
/// one instance serves many threads.
pub trait Teacher: Send + Sync {
    fn info(&self) -> &TeacherInfo;
    fn device(&self) -> &Device;
    /// Runs the teacher on `x`: `[n, C, H, W]` f32, already preprocessed per [`TeacherInfo::preprocess`].
    fn forward(&self, x: &Tensor) -> Result<TeacherOutput>;
}
