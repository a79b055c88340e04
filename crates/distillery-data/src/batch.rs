//! A training/evaluation batch as the streaming reader yields it.

use candle_core::Tensor;
use distillery_core::FaceId;

/// `n` faces (one view each) with their labels and, when read from a teacher cache, the teacher's
/// outputs for exactly those views. Tensors are f32 unless noted, on the reader's device.
#[derive(Debug, Clone)]
pub struct Batch {
    pub face_ids: Vec<FaceId>,
    pub views: Vec<u32>,
    /// `[n, C, H, W]`, preprocessed for the student.
    pub images: Tensor,
    /// `[n]` u32 class index (0 where unlabelled) and `[n]` f32 mask (1 labelled, 0 not).
    pub labels: Tensor,
    pub label_mask: Tensor,
    /// `[n, 2]` (valence, arousal) and `[n]` mask (1 when both are present).
    pub va: Tensor,
    pub va_mask: Tensor,
    /// Teacher outputs for the same rows: logits `[n, C]`, `[n, 2]` (valence, arousal), `[n, D]`.
    pub teacher_logits: Option<Tensor>,
    pub teacher_va: Option<Tensor>,
    pub teacher_embedding: Option<Tensor>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.face_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.face_ids.is_empty()
    }
}
