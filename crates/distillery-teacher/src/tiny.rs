//! A tiny deterministic teacher for tests, smoke runs and `label --local` without any weights.
//!
//! It computes a handful of image statistics (per-channel means, top-minus-bottom and
//! left-minus-right contrasts) and maps them through fixed pseudo-random matrices drawn from a seed.
//! Outputs therefore depend on the pixels (so a wrong crop or view changes them) while the model is
//! cheap enough for debug-build tests. Its fingerprint covers the seed and the preprocessing.

use candle_core::{Device, Result, Tensor};
use distillery_core::{ClassSet, Preprocess, TeacherFingerprint};
use distillery_models::teacher::{Teacher, TeacherInfo, TeacherOutput};

/// Width of the tiny teacher's embedding.
pub const TINY_EMBEDDING_DIM: usize = 8;
const FEATURES: usize = 9;

/// See the module docs. Construct with [`TinyTeacher::new`].
pub struct TinyTeacher {
    info: TeacherInfo,
    device: Device,
    w_embed: Tensor,       // [FEATURES, D]
    w_logits: Tensor,      // [D, classes]
    w_va: Tensor,          // [D, 2]
    landmark_base: Tensor, // [68, 2]
}

/// SplitMix64: a tiny, well-mixed generator so weights are reproducible without extra crates.
fn splitmix(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // Uniform in [-1, 1).
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

impl TinyTeacher {
    /// A tiny teacher over EmoNet's 8 classes with `side`×`side` RGB input, weights from `seed`.
    pub fn new(seed: u64, side: usize, device: &Device) -> Result<Self> {
        let classes = ClassSet::emonet8();
        let preprocess = Preprocess::unit_rgb(side);
        let mut s = seed;
        let mut draw = |n: usize, scale: f32| (0..n).map(|_| splitmix(&mut s) * scale).collect::<Vec<f32>>();
        let w_embed = Tensor::from_vec(
            draw(FEATURES * TINY_EMBEDDING_DIM, 2.0),
            (FEATURES, TINY_EMBEDDING_DIM),
            device,
        )?;
        let w_logits = Tensor::from_vec(
            draw(TINY_EMBEDDING_DIM * classes.len(), 3.0),
            (TINY_EMBEDDING_DIM, classes.len()),
            device,
        )?;
        let w_va = Tensor::from_vec(draw(TINY_EMBEDDING_DIM * 2, 1.5), (TINY_EMBEDDING_DIM, 2), device)?;
        let landmark_base = Tensor::from_vec(
            draw(68 * 2, 0.5).into_iter().map(|v| (v + 0.5) * side as f32).collect::<Vec<f32>>(),
            (68, 2),
            device,
        )?;
        let mut h = blake3::Hasher::new();
        h.update(b"distillery.teacher.tiny.v1\0");
        h.update(&seed.to_le_bytes());
        h.update(&preprocess.fingerprint_bytes());
        let info = TeacherInfo {
            name: format!("tiny-{seed}"),
            classes,
            preprocess,
            has_valence_arousal: true,
            embedding_dim: Some(TINY_EMBEDDING_DIM),
            has_landmarks: true,
            max_batch: 64,
            fingerprint: TeacherFingerprint::from_hasher(&h),
        };
        Ok(Self { info, device: device.clone(), w_embed, w_logits, w_va, landmark_base })
    }

    fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (_n, _c, h, w) = x.dims4()?;
        let means = x.mean((2, 3))?; // [n, 3]
        let top = x.narrow(2, 0, h / 2)?.mean((2, 3))?;
        let bottom = x.narrow(2, h / 2, h - h / 2)?.mean((2, 3))?;
        let left = x.narrow(3, 0, w / 2)?.mean((2, 3))?;
        let right = x.narrow(3, w / 2, w - w / 2)?.mean((2, 3))?;
        Tensor::cat(&[means, (top - bottom)?, (left - right)?], 1)
    }
}

impl Teacher for TinyTeacher {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, x: &Tensor) -> Result<TeacherOutput> {
        let (n, c, h, w) = x.dims4()?;
        let [eh, ew] = self.info.preprocess.size;
        if c != 3 || h != eh || w != ew {
            candle_core::bail!("tiny teacher expects [n, 3, {eh}, {ew}], got {:?}", x.dims());
        }
        let f = self.features(x)?; // [n, 9]
        let embedding = f.matmul(&self.w_embed)?.tanh()?; // [n, D]
        let logits = embedding.matmul(&self.w_logits)?;
        let va = embedding.matmul(&self.w_va)?.tanh()?; // [n, 2]
        let valence = va.narrow(1, 0, 1)?.squeeze(1)?;
        let arousal = va.narrow(1, 1, 1)?.squeeze(1)?;
        let shift = embedding.narrow(1, 0, 2)?.affine(w as f64 / 8.0, 0.0)?; // [n, 2]
        let landmarks = self.landmark_base.unsqueeze(0)?.broadcast_add(&shift.unsqueeze(1)?)?;
        debug_assert_eq!(landmarks.dims(), &[n, 68, 2]);
        Ok(TeacherOutput {
            logits,
            valence: Some(valence),
            arousal: Some(arousal),
            embedding: Some(embedding),
            landmarks: Some(landmarks),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_have_declared_shapes_and_depend_on_pixels() -> Result<()> {
        let dev = Device::Cpu;
        let t = TinyTeacher::new(7, 8, &dev)?;
        let a = Tensor::zeros((2, 3, 8, 8), candle_core::DType::F32, &dev)?;
        let b = Tensor::ones((1, 3, 8, 8), candle_core::DType::F32, &dev)?;
        let oa = t.forward(&a)?;
        let ob = t.forward(&b)?;
        assert_eq!(oa.logits.dims(), &[2, 8]);
        assert_eq!(oa.valence.as_ref().unwrap().dims(), &[2]);
        assert_eq!(oa.embedding.as_ref().unwrap().dims(), &[2, TINY_EMBEDDING_DIM]);
        assert_eq!(oa.landmarks.as_ref().unwrap().dims(), &[2, 68, 2]);
        let la = oa.logits.get(0)?.to_vec1::<f32>()?;
        let lb = ob.logits.get(0)?.to_vec1::<f32>()?;
        assert_ne!(la, lb, "logits must depend on the input");
        assert!(t.forward(&Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &dev)?).is_err());
        // Same seed, same fingerprint; other seed, other fingerprint.
        assert_eq!(TinyTeacher::new(7, 8, &dev)?.info().fingerprint, t.info().fingerprint);
        assert_ne!(TinyTeacher::new(8, 8, &dev)?.info().fingerprint, t.info().fingerprint);
        Ok(())
    }
}
