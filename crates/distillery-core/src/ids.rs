//! Content-derived identifiers.
//!
//! A [`FaceId`] names one face crop by content: the hash of the encoded image bytes and the crop box,
//! so re-ingesting the same file adds nothing. A [`TeacherFingerprint`] names one teacher *as applied*:
//! its weights and its preprocessing, so outputs of different teachers never mix in a cache.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses a 32-character lower-case hex id.
            pub fn parse(s: &str) -> Result<Self> {
                if s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(Error::Id {
                        kind: $kind,
                        value: s.to_owned(),
                        reason: "expected 32 lower-case hex characters".into(),
                    })
                }
            }

            /// Derives the id from a finished hasher (first 128 bits of BLAKE3).
            pub fn from_hasher(h: &blake3::Hasher) -> Self {
                Self(h.finalize().to_hex()[..32].to_string())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

hex_id!(
    /// Stable content id of a face: BLAKE3 of the encoded bytes and the crop box.
    FaceId,
    "face id"
);
hex_id!(
    /// Identity of a teacher as applied: BLAKE3 of its weights and its preprocessing.
    TeacherFingerprint,
    "teacher fingerprint"
);

impl FaceId {
    /// The id of `bytes` cropped to `box_xywh` (None: the whole image).
    pub fn of(bytes: &[u8], box_xywh: Option<[f32; 4]>) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"distillery.face.v1\0");
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
        match box_xywh {
            Some(b) => {
                h.update(&[1]);
                for v in b {
                    h.update(&v.to_le_bytes());
                }
            }
            None => {
                h.update(&[0]);
            }
        }
        Self::from_hasher(&h)
    }
}

/// Identifier of a training run (a UUID v4 without dashes), unique per submission.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub String);

impl RunId {
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn face_id_depends_on_bytes_and_box() {
        let a = FaceId::of(b"abc", None);
        assert_eq!(a, FaceId::of(b"abc", None));
        assert_ne!(a, FaceId::of(b"abd", None));
        assert_ne!(a, FaceId::of(b"abc", Some([0.0, 0.0, 1.0, 1.0])));
        assert_ne!(
            FaceId::of(b"abc", Some([0.0, 0.0, 1.0, 1.0])),
            FaceId::of(b"abc", Some([0.0, 0.0, 1.0, 2.0]))
        );
        assert_eq!(FaceId::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn malformed_ids_are_rejected_with_the_value() {
        let err = FaceId::parse("XYZ").unwrap_err().to_string();
        assert!(err.contains("XYZ") && err.contains("face id"), "{err}");
        assert!(TeacherFingerprint::parse(&"0".repeat(31)).is_err());
    }
}
