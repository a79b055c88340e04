//! Views of a face: the plain crop and K deterministic augmentations of it.
//!
//! A view is stored with every teacher-cache row, so a student trained on an augmented view is
//! compared with what the teacher really produced for that same view.

use serde::{Deserialize, Serialize};

/// Parameters of one view, applied to the face crop (after the record's box is applied).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// 0 is the plain view; 1..=K are augmentations.
    pub index: u32,
    /// Sub-crop `[x, y, w, h]` relative to the face crop, in units of its size (plain: `[0,0,1,1]`).
    pub crop: [f32; 4],
    /// Mirror left–right after cropping.
    pub flip: bool,
}

impl View {
    pub const fn plain() -> Self {
        Self { index: 0, crop: [0.0, 0.0, 1.0, 1.0], flip: false }
    }
}
