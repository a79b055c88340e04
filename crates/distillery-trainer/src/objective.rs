//! The distillation objective of one batch, term by term, from the losses of
//! `distillery_models::losses`:
//!
//! total = KD + va_weight · (smooth-L1 + ν · bound + α · pseudo_va) + feature_weight · feature
//!
//! * KD (Hinton et al. 2015): `(1 − α) · hard + 2α · T² · soft`, `hard` the cross-entropy over
//!   labelled rows, `soft` the cross-entropy to the softened teacher over every row. Without
//!   teacher outputs it is the plain cross-entropy.
//! * Teacher-bounded regression (Chen et al. 2017): smooth-L1 to the valence/arousal truth plus
//!   `ν ·` the teacher bound, over rows with a valence/arousal label.
//! * `pseudo_va`: rows without a valence/arousal label but with teacher outputs regress to the
//!   teacher's prediction (smooth-L1), weighted by α like the soft term — the regression
//!   counterpart of soft targets, so unlabelled faces still teach affect.
//! * Feature matching between the student's projected embedding and the teacher's embedding.
//!
//! Every term is a scalar tensor so the loop can log them separately.

use candle_core::{DType, Tensor};
use distillery_data::Batch;
use distillery_models::losses::{FeatureLoss, bounded_regression, feature_loss, kd_loss};

use crate::Result;
use crate::config::{FeatureKind, LossConfig};
use crate::error::TensorContext;

/// Outputs of a student for one batch.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// `[n, C]`.
    pub logits: Tensor,
    /// `[n, 2]` (valence, arousal).
    pub va: Tensor,
    /// `[n, D_teacher]` projection of the student's embedding, when it has a projection head.
    pub projected: Option<Tensor>,
}

/// The loss terms of one batch (scalar tensors).
#[derive(Debug, Clone)]
pub struct Terms {
    pub hard: Tensor,
    pub soft: Tensor,
    pub smooth_l1: Tensor,
    pub bound: Tensor,
    pub pseudo_va: Tensor,
    pub feature: Tensor,
    pub total: Tensor,
}

/// Computes every term for `out` on `batch`. `label_mask`/`va_mask` replace the batch's masks (the
/// loop may hide labels of part of the training set).
pub fn terms(
    out: &ModelOutput,
    batch: &Batch,
    label_mask: &Tensor,
    va_mask: &Tensor,
    cfg: &LossConfig,
) -> Result<Terms> {
    let dtype = out.logits.dtype();
    let zero = Tensor::zeros((), dtype, out.logits.device())?;
    let alpha = cfg.alpha;
    let labels = batch.labels.to_dtype(DType::U32)?;
    let label_mask = label_mask.to_dtype(dtype)?;
    let va_mask = va_mask.to_dtype(dtype)?;

    let kd =
        kd_loss(&out.logits, batch.teacher_logits.as_ref(), &labels, &label_mask, alpha, cfg.temperature)
            .op("kd loss")?;
    let reg = bounded_regression(&out.va, batch.teacher_va.as_ref(), &batch.va, &va_mask, cfg.margin, cfg.nu)
        .op("bounded regression")?;
    let pseudo_va = match (&batch.teacher_va, alpha > 0.0) {
        (Some(tva), true) => {
            let unlabelled = (1.0 - &va_mask)?;
            bounded_regression(&out.va, None, tva, &unlabelled, 0.0, 0.0)
                .op("pseudo valence/arousal")?
                .smooth_l1
        }
        _ => zero.clone(),
    };
    let kind = match cfg.feature {
        FeatureKind::None => None,
        FeatureKind::Mse => Some(FeatureLoss::Mse),
        FeatureKind::Cosine => Some(FeatureLoss::Cosine),
    };
    let feature = match (kind, &out.projected, &batch.teacher_embedding) {
        (Some(k), Some(s), Some(t)) => feature_loss(s, t, k).op("feature loss")?,
        _ => zero.clone(),
    };
    let va = ((&reg.total + (&pseudo_va * alpha)?)? * cfg.va_weight)?;
    let total = ((&kd.total + va)? + (&feature * cfg.feature_weight)?)?;
    Ok(Terms {
        hard: kd.hard,
        soft: kd.soft,
        smooth_l1: reg.smooth_l1,
        bound: reg.bound,
        pseudo_va,
        feature,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use distillery_core::FaceId;

    fn batch(dev: &Device) -> Batch {
        Batch {
            face_ids: (0..3u8).map(|i| FaceId::of(&[i], None)).collect(),
            views: vec![0; 3],
            images: Tensor::zeros((3, 1, 1, 1), DType::F32, dev).unwrap(),
            labels: Tensor::new(&[0u32, 2, 1], dev).unwrap(),
            label_mask: Tensor::new(&[1f32, 1., 0.], dev).unwrap(),
            va: Tensor::new(&[[0.5f32, -0.2], [0.0, 0.3], [-0.7, 0.9]], dev).unwrap(),
            va_mask: Tensor::new(&[1f32, 0., 1.], dev).unwrap(),
            teacher_logits: Some(
                Tensor::new(&[[1f32, 0., -1.], [0.2, 0.1, 0.9], [0., 2., 0.]], dev).unwrap(),
            ),
            teacher_va: Some(Tensor::new(&[[0.4f32, -0.1], [0.1, 0.2], [0.9, 0.9]], dev).unwrap()),
            teacher_embedding: Some(Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], dev).unwrap()),
        }
    }

    fn cfg(feature: FeatureKind) -> LossConfig {
        LossConfig {
            alpha: 0.6,
            temperature: 2.0,
            margin: 0.05,
            nu: 0.7,
            va_weight: 1.3,
            feature,
            feature_weight: 0.4,
        }
    }

    fn scal(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn terms_match_hand_computation() {
        let dev = Device::Cpu;
        let b = batch(&dev);
        let logits = Tensor::new(&[[0.3f32, -0.1, 0.2], [1.0, 0.0, 0.5], [-0.4, 0.6, 0.1]], &dev).unwrap();
        let va = Tensor::new(&[[0.1f32, -0.5], [0.3, 0.3], [0.8, 2.0]], &dev).unwrap();
        let proj = Tensor::new(&[[0.5f32, 0.5], [0.0, 2.0], [1.0, -1.0]], &dev).unwrap();
        let out = ModelOutput { logits: logits.clone(), va, projected: Some(proj) };
        let t = terms(&out, &b, &b.label_mask, &b.va_mask, &cfg(FeatureKind::Mse)).unwrap();
        let lsm = |r: &[f64]| {
            let m = r.iter().cloned().fold(f64::MIN, f64::max);
            let l = m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            r.iter().map(|v| v - l).collect::<Vec<_>>()
        };
        let lg = [[0.3, -0.1, 0.2], [1.0, 0.0, 0.5], [-0.4, 0.6, 0.1]];
        let tl = [[1.0, 0.0, -1.0], [0.2, 0.1, 0.9], [0.0, 2.0, 0.0]];
        let hard = -(lsm(&lg[0])[0] + lsm(&lg[1])[2]) / 2.0;
        assert!((scal(&t.hard) - hard).abs() < 1e-5);
        let mut soft = 0.0;
        for i in 0..3 {
            let s = lsm(&lg[i].map(|v| v / 2.0));
            let q = lsm(&tl[i].map(|v| v / 2.0));
            soft -= (0..3).map(|k| q[k].exp() * s[k]).sum::<f64>();
        }
        soft /= 3.0;
        assert!((scal(&t.soft) - soft).abs() < 1e-5);
        // Rows 0 and 2 have va labels. Row 0 diff (-0.4, -0.3): sl1 = .08 + .045; row 2 diff (1.5, 1.1):
        // sl1 = 1.0 + 0.6.
        let sl1 = ((0.08 + 0.045) + (1.0 + 0.6)) / 2.0;
        assert!((scal(&t.smooth_l1) - sl1).abs() < 1e-5);
        // Bound: row 0 ds = .25, dt = .01+.01 = .02 → active; row 2 ds = 2.25+1.21 = 3.46, dt = 2.56 → active.
        let bound = (0.25 + 3.46) / 2.0;
        assert!((scal(&t.bound) - bound).abs() < 1e-5);
        // MSE over all 6 entries: (.25 .25 0 1 0 4)/6.
        let feat = 5.5 / 6.0;
        assert!((scal(&t.feature) - feat).abs() < 1e-5);
        // Row 1 has no va label: pseudo target = teacher (0.1, 0.2), diff (0.2, 0.1) → .02 + .005.
        let pseudo = 0.025;
        assert!((scal(&t.pseudo_va) - pseudo).abs() < 1e-5);
        let c = cfg(FeatureKind::Mse);
        let total = (1.0 - c.alpha) * hard
            + 2.0 * c.alpha * 4.0 * soft
            + c.va_weight * (sl1 + c.nu * bound + c.alpha * pseudo)
            + c.feature_weight * feat;
        assert!((scal(&t.total) - total).abs() < 1e-4);
    }

    #[test]
    fn no_teacher_means_plain_supervision() {
        let dev = Device::Cpu;
        let mut b = batch(&dev);
        b.teacher_logits = None;
        b.teacher_va = None;
        b.teacher_embedding = None;
        let out = ModelOutput {
            logits: Tensor::new(&[[0.3f32, -0.1, 0.2], [1.0, 0.0, 0.5], [-0.4, 0.6, 0.1]], &dev).unwrap(),
            va: Tensor::zeros((3, 2), DType::F32, &dev).unwrap(),
            projected: None,
        };
        let t = terms(&out, &b, &b.label_mask, &b.va_mask, &cfg(FeatureKind::Cosine)).unwrap();
        assert_eq!(scal(&t.soft), 0.0);
        assert_eq!(scal(&t.bound), 0.0);
        assert_eq!(scal(&t.pseudo_va), 0.0);
        assert_eq!(scal(&t.feature), 0.0);
        let expect = scal(&t.hard) + 1.3 * scal(&t.smooth_l1);
        assert!((scal(&t.total) - expect).abs() < 1e-6);
        // No labelled rows at all: the hard term is zero, not NaN.
        let none = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let t = terms(&out, &b, &none, &none, &cfg(FeatureKind::None)).unwrap();
        assert_eq!(scal(&t.total), 0.0);
    }

    /// Finite-difference check of d total / d (logits, va, projection) for every loss kind.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let b = batch(&dev);
        for kind in [FeatureKind::Mse, FeatureKind::Cosine] {
            let x0: Vec<f64> = (0..9).map(|i| ((i * 37 % 11) as f64 - 5.0) / 7.0).collect();
            let v0: Vec<f64> = (0..6).map(|i| ((i * 13 % 7) as f64 - 3.0) / 4.0).collect();
            let p0: Vec<f64> = (0..6).map(|i| ((i * 5 % 9) as f64 - 4.0) / 3.0).collect();
            let b64 = Batch {
                teacher_logits: b.teacher_logits.as_ref().map(|t| t.to_dtype(DType::F64).unwrap()),
                teacher_va: b.teacher_va.as_ref().map(|t| t.to_dtype(DType::F64).unwrap()),
                teacher_embedding: b.teacher_embedding.as_ref().map(|t| t.to_dtype(DType::F64).unwrap()),
                va: b.va.to_dtype(DType::F64).unwrap(),
                ..b.clone()
            };
            let lm = b.label_mask.to_dtype(DType::F64).unwrap();
            let vm = b.va_mask.to_dtype(DType::F64).unwrap();
            let eval = |x: &[f64], v: &[f64], p: &[f64]| -> (f64, Vec<Tensor>, Vec<Var>) {
                let xs = Var::from_vec(x.to_vec(), (3, 3), &dev).unwrap();
                let vs = Var::from_vec(v.to_vec(), (3, 2), &dev).unwrap();
                let ps = Var::from_vec(p.to_vec(), (3, 2), &dev).unwrap();
                let out = ModelOutput {
                    logits: xs.as_tensor().clone(),
                    va: vs.as_tensor().clone(),
                    projected: Some(ps.as_tensor().clone()),
                };
                let t = terms64(&out, &b64, &lm, &vm, &cfg(kind));
                let g = t.backward().unwrap();
                let grads = [&xs, &vs, &ps].iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect();
                (t.to_scalar::<f64>().unwrap(), grads, vec![xs, vs, ps])
            };
            let (_, grads, _) = eval(&x0, &v0, &p0);
            let h = 1e-6;
            let inputs = [x0.clone(), v0.clone(), p0.clone()];
            for which in 0..3 {
                let g = grads[which].flatten_all().unwrap().to_vec1::<f64>().unwrap();
                for i in 0..inputs[which].len() {
                    let mut plus = inputs.clone();
                    let mut minus = inputs.clone();
                    plus[which][i] += h;
                    minus[which][i] -= h;
                    let fp = eval(&plus[0], &plus[1], &plus[2]).0;
                    let fm = eval(&minus[0], &minus[1], &minus[2]).0;
                    let num = (fp - fm) / (2.0 * h);
                    assert!(
                        (num - g[i]).abs() < 1e-5,
                        "{kind:?} input {which}[{i}]: numeric {num} vs analytic {}",
                        g[i]
                    );
                }
            }
        }
    }

    /// `terms` in f64 (the f32 masks' mean divides by an f32 count; the rest is dtype-generic).
    fn terms64(out: &ModelOutput, b: &Batch, lm: &Tensor, vm: &Tensor, cfg: &LossConfig) -> Tensor {
        terms(out, b, lm, vm, cfg).unwrap().total
    }
}
