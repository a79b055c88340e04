//! One face as stored in a face dataset, and one rejected input.

use distillery_core::FaceId;
use serde::{Deserialize, Serialize};

/// Dataset split of a face.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    #[default]
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "val" | "valid" | "validation" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// A face ready to be stored: the encoded image exactly as it was read (JPEG/PNG bytes untouched),
/// the face box on it, and its labels. Crops are made at read time from `box_xywh`.
#[derive(Clone, Debug, PartialEq)]
pub struct FaceRecord {
    /// `FaceId::of(&image, box_xywh)`.
    pub id: FaceId,
    /// Encoded image bytes as read from the source.
    pub image: Vec<u8>,
    /// Width and height of the decoded image in pixels.
    pub width: u32,
    pub height: u32,
    /// Face box `[x, y, w, h]` in pixels on the image; `None` means the whole image is the face.
    pub box_xywh: Option<[f32; 4]>,
    /// Expression label as an index into the dataset's class set (EmoNet order for AffectNet).
    pub label: Option<u32>,
    /// Valence and arousal in [−1, 1]; `None` when missing.
    pub valence: Option<f32>,
    pub arousal: Option<f32>,
    pub split: Split,
    /// Where the face came from (path, or `synth:<seed>:<index>`).
    pub source: String,
}

/// An input row that could not be used, and why. Rejects never stop an ingest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    /// File path (or URI) of the input.
    pub source: String,
    /// 1-based row of a CSV/JSONL manifest, when the input came from one.
    pub row: Option<u64>,
    pub reason: String,
}
