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

/// The plain view (index 0) and `k` deterministic augmentations (indices 1..=k) of a face.
///
/// Each augmentation is a square-relative sub-crop whose sides are 80–100 % of the face crop's,
/// placed uniformly inside it, mirrored with probability ½. View `i` depends only on
/// (`face_id`, `seed`, `i`), so `views_for(id, k, s)` is a prefix of `views_for(id, k + 1, s)` and
/// workers and trainers agree on every view without storing anything but its index.
pub fn views_for(face_id: &distillery_core::FaceId, k: u32, seed: u64) -> Vec<View> {
    use rand::{Rng, SeedableRng};

    let mut out = Vec::with_capacity(k as usize + 1);
    out.push(View::plain());
    for index in 1..=k {
        let mut h = blake3::Hasher::new();
        h.update(b"distillery.view.v1\0");
        h.update(face_id.as_str().as_bytes());
        h.update(&seed.to_le_bytes());
        h.update(&index.to_le_bytes());
        let mut rng = rand_chacha::ChaCha8Rng::from_seed(*h.finalize().as_bytes());
        let side: f32 = rng.random_range(0.8..=1.0);
        let x = rng.random_range(0.0..=1.0 - side);
        let y = rng.random_range(0.0..=1.0 - side);
        let flip = rng.random_bool(0.5);
        out.push(View { index, crop: [x, y, side, side], flip });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use distillery_core::FaceId;

    #[test]
    fn views_are_deterministic_prefixes_within_bounds() {
        let id = FaceId::of(b"face", None);
        let a = views_for(&id, 6, 3);
        assert_eq!(a.len(), 7);
        assert_eq!(a[0], View::plain());
        assert_eq!(a, views_for(&id, 6, 3));
        assert_eq!(&a[..4], &views_for(&id, 3, 3)[..]);
        assert_ne!(a, views_for(&id, 6, 4));
        assert_ne!(a, views_for(&FaceId::of(b"other", None), 6, 3));
        for (i, v) in a.iter().enumerate().skip(1) {
            assert_eq!(v.index as usize, i);
            let [x, y, w, h] = v.crop;
            assert!((0.8..=1.0).contains(&w) && w == h, "{v:?}");
            assert!(x >= 0.0 && y >= 0.0 && x + w <= 1.0 + 1e-6 && y + h <= 1.0 + 1e-6, "{v:?}");
        }
        let flips = (0..200u64).filter(|s| views_for(&id, 1, *s)[1].flip).count();
        assert!((60..140).contains(&flips), "{flips}");
    }
}
