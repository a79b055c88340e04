//! Distillation losses: Hinton knowledge distillation for expressions, teacher-bounded regression
//! for valence/arousal, and feature (embedding) distillation.
//!
//! Each returns its terms separately so training can log them. Masks are per-row `f32` tensors of
//! 0/1: a row with mask 0 contributes nothing, and means are over the rows that count (zero when
//! none do, never NaN). Teacher tensors are detached: gradients flow to the student only.

use candle_core::{D, DType, Result, Tensor, bail};
use candle_nn::ops::{log_softmax, softmax};

/// Knowledge-distillation loss terms (scalars).
#[derive(Clone, Debug)]
pub struct KdTerms {
    /// Cross-entropy of the student against the labels, mean over labelled rows.
    pub hard: Tensor,
    /// Cross-entropy `−Σ q log p` of softened student `p = softmax(z_s/T)` against the softened
    /// teacher `q = softmax(z_t/T)`, mean over rows; zero without a teacher.
    pub soft: Tensor,
    /// `(1−α)·hard + 2α·T²·soft` with a teacher; `hard` without one.
    pub total: Tensor,
}

/// Masked mean of a per-row value `v [n]` with `mask [n]` (0/1): `Σ v·m / max(Σ m, 1)`.
fn masked_mean(v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    v.mul(mask)?.sum_all()?.div(&mask.sum_all()?.maximum(1.0)?)
}

fn check_rows(what: &str, t: &Tensor, n: usize) -> Result<()> {
    if t.dims() != [n] {
        bail!("{what} must be [{n}], got {:?}", t.dims());
    }
    Ok(())
}

/// Hinton et al. (2015) distillation:
/// `(1−α)·CE(y, softmax(z_s)) + 2α·T²·CE(softmax(z_s/T), softmax(z_t/T))`.
///
/// `student_logits`/`teacher_logits`: `[n, C]`; `labels`: `u32 [n]`; `label_mask`: `[n]` in the
/// logits' dtype, 1 where a row has a label. Labels of unlabelled rows are ignored (any value).
pub fn kd_loss(
    student_logits: &Tensor,
    teacher_logits: Option<&Tensor>,
    labels: &Tensor,
    label_mask: &Tensor,
    alpha: f64,
    temperature: f64,
) -> Result<KdTerms> {
    let (n, c) = student_logits.dims2()?;
    check_rows("kd_loss: labels", labels, n)?;
    check_rows("kd_loss: label_mask", label_mask, n)?;
    if !(0.0..=1.0).contains(&alpha) || temperature <= 0.0 {
        bail!("kd_loss: alpha must be in [0, 1] and temperature > 0, got α={alpha}, T={temperature}");
    }
    let mask = label_mask.to_dtype(student_logits.dtype())?;
    // Out-of-range labels on masked rows must not break the gather.
    let safe = labels.to_dtype(DType::U32)?.minimum(c.saturating_sub(1) as f64)?;
    let nll = log_softmax(student_logits, D::Minus1)?.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let hard = masked_mean(&nll, &mask)?;
    let Some(teacher) = teacher_logits else {
        let soft = hard.zeros_like()?;
        return Ok(KdTerms { total: hard.clone(), hard, soft });
    };
    if teacher.dims() != [n, c] {
        bail!("kd_loss: teacher logits must be [{n}, {c}], got {:?}", teacher.dims());
    }
    let q = softmax(&(teacher.detach().to_dtype(student_logits.dtype())? / temperature)?, D::Minus1)?;
    let log_p = log_softmax(&(student_logits / temperature)?, D::Minus1)?;
    let soft = (q.mul(&log_p)?.sum(1)?.neg()?.sum_all()? / n.max(1) as f64)?;
    let total = ((&hard * (1.0 - alpha))? + (&soft * (2.0 * alpha * temperature * temperature))?)?;
    Ok(KdTerms { hard, soft, total })
}

/// Teacher-bounded regression terms (scalars).
#[derive(Clone, Debug)]
pub struct RegTerms {
    /// Smooth L1 (β = 1) summed over valence and arousal, mean over valid rows.
    pub smooth_l1: Tensor,
    /// The teacher bound `L_b`, mean over valid rows (unweighted); zero without a teacher.
    pub bound: Tensor,
    /// `smooth_l1 + ν·bound`.
    pub total: Tensor,
}

/// Teacher-bounded regression (Chen et al. 2017; Takamoto et al. 2020):
/// `L_reg = smoothL1(R_s, y) + ν·L_b`, `L_b = ‖R_s−y‖²` if `‖R_s−y‖² + m > ‖R_t−y‖²` else 0.
///
/// Per row over the `(valence, arousal)` 2-vector; `student_va`, `teacher_va`, `target_va`:
/// `[n, 2]`; `va_mask`: `[n]`, 1 where the row has a target. The student is penalised by the
/// bound only where it is not already better than the teacher by the margin.
pub fn bounded_regression(
    student_va: &Tensor,
    teacher_va: Option<&Tensor>,
    target_va: &Tensor,
    va_mask: &Tensor,
    margin: f64,
    nu: f64,
) -> Result<RegTerms> {
    let (n, k) = student_va.dims2()?;
    if k != 2 {
        bail!("bounded_regression: student_va must be [n, 2], got {:?}", student_va.dims());
    }
    if target_va.dims() != [n, 2] {
        bail!("bounded_regression: target_va must be [{n}, 2], got {:?}", target_va.dims());
    }
    check_rows("bounded_regression: va_mask", va_mask, n)?;
    let dtype = student_va.dtype();
    let mask = va_mask.to_dtype(dtype)?;
    // Rows without a target may hold NaN; zero them so `NaN·0` cannot leak into the sums.
    let valid = mask.unsqueeze(1)?.broadcast_as((n, 2))?.ne(0.0)?;
    let target = valid.where_cond(&target_va.to_dtype(dtype)?, &student_va.zeros_like()?)?;
    let diff = (student_va - &target)?;
    // Huber with β = 1 written as 0.5·c² + (|d| − c), c = min(|d|, 1): smooth at the joint.
    let a = diff.abs()?;
    let c = a.minimum(1.0)?;
    let huber = ((c.sqr()? * 0.5)? + (a - &c)?)?;
    let smooth_l1 = masked_mean(&huber.sum(1)?, &mask)?;
    let bound = match teacher_va {
        None => smooth_l1.zeros_like()?,
        Some(t) => {
            if t.dims() != [n, 2] {
                bail!("bounded_regression: teacher_va must be [{n}, 2], got {:?}", t.dims());
            }
            let d_s = diff.sqr()?.sum(1)?;
            let d_t = (t.detach().to_dtype(dtype)? - &target)?.sqr()?.sum(1)?;
            // The indicator is piecewise constant: computed on detached values.
            let active = (d_s.detach() + margin)?.gt(&d_t)?.to_dtype(dtype)?;
            masked_mean(&d_s.mul(&active)?, &mask)?
        }
    };
    let total = (&smooth_l1 + (&bound * nu)?)?;
    Ok(RegTerms { smooth_l1, bound, total })
}

/// How student and teacher embeddings are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureLoss {
    /// Mean squared error over all elements.
    Mse,
    /// Mean over rows of `1 − cos(s, t)`.
    Cosine,
}

/// Feature distillation between the student's projected embedding and the teacher's, both `[n, P]`.
pub fn feature_loss(student_proj: &Tensor, teacher_emb: &Tensor, kind: FeatureLoss) -> Result<Tensor> {
    let (n, p) = student_proj.dims2()?;
    if teacher_emb.dims() != [n, p] {
        bail!("feature_loss: teacher embedding must be [{n}, {p}], got {:?}", teacher_emb.dims());
    }
    let t = teacher_emb.detach().to_dtype(student_proj.dtype())?;
    match kind {
        FeatureLoss::Mse => (student_proj - &t)?.sqr()?.mean_all(),
        FeatureLoss::Cosine => {
            // A tiny additive term keeps the norm differentiable at zero.
            let norm = |x: &Tensor| -> Result<Tensor> { (x.sqr()?.sum(1)? + 1e-12)?.sqrt() };
            let dot = student_proj.mul(&t)?.sum(1)?;
            let cos = dot.div(&(norm(student_proj)? * norm(&t)?)?)?;
            (1.0 - cos)?.mean_all()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check_grads, pseudo_random, rand_var};
    use candle_core::{Device, Var};

    fn t64(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    fn log_softmax_ref(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        z.iter().map(|v| v - lse).collect()
    }

    #[test]
    fn kd_uniform_logits_give_ln_c() -> Result<()> {
        let dev = Device::Cpu;
        let zeros = Tensor::zeros((3, 4), DType::F64, &dev)?;
        let labels = Tensor::new(&[0u32, 3, 1], &dev)?;
        let mask = t64(&[1.0, 1.0, 1.0], &[3]);
        let (alpha, temp) = (0.7, 3.0);
        let k = kd_loss(&zeros, Some(&zeros), &labels, &mask, alpha, temp)?;
        let ln4 = 4f64.ln();
        assert!((scalar(&k.hard) - ln4).abs() < 1e-12);
        assert!((scalar(&k.soft) - ln4).abs() < 1e-12);
        let want = (1.0 - alpha) * ln4 + 2.0 * alpha * temp * temp * ln4;
        assert!((scalar(&k.total) - want).abs() < 1e-12, "{} vs {want}", scalar(&k.total));
        Ok(())
    }

    #[test]
    fn kd_matches_scalar_reference_and_respects_mask() -> Result<()> {
        let zs = pseudo_random(12, 1).iter().map(|v| v * 3.0).collect::<Vec<_>>();
        let zt = pseudo_random(12, 2).iter().map(|v| v * 3.0).collect::<Vec<_>>();
        let labels = [2usize, 0, 1];
        let mask = [1.0, 0.0, 1.0];
        let (alpha, temp) = (0.4, 2.0);
        let (mut hard, mut soft) = (0.0, 0.0);
        for r in 0..3 {
            let ls = log_softmax_ref(&zs[r * 4..r * 4 + 4]);
            hard += mask[r] * -ls[labels[r]];
            let st: Vec<f64> = zs[r * 4..r * 4 + 4].iter().map(|v| v / temp).collect();
            let tt: Vec<f64> = zt[r * 4..r * 4 + 4].iter().map(|v| v / temp).collect();
            let (lp, lq) = (log_softmax_ref(&st), log_softmax_ref(&tt));
            soft -= lq.iter().zip(&lp).map(|(q, p)| q.exp() * p).sum::<f64>();
        }
        hard /= 2.0;
        soft /= 3.0;
        let s = t64(&zs, &[3, 4]);
        let t = t64(&zt, &[3, 4]);
        let lab = Tensor::new(&[2u32, 0, 1], &Device::Cpu)?;
        let m = t64(&mask, &[3]);
        let k = kd_loss(&s, Some(&t), &lab, &m, alpha, temp)?;
        assert!((scalar(&k.hard) - hard).abs() < 1e-12);
        assert!((scalar(&k.soft) - soft).abs() < 1e-12);
        let total = (1.0 - alpha) * hard + 2.0 * alpha * temp * temp * soft;
        assert!((scalar(&k.total) - total).abs() < 1e-12);
        // The unlabelled row's label is irrelevant, even when out of range.
        let lab2 = Tensor::new(&[2u32, 99, 1], &Device::Cpu)?;
        assert_eq!(scalar(&kd_loss(&s, Some(&t), &lab2, &m, alpha, temp)?.total), scalar(&k.total));
        // No labels at all: hard term is zero, not NaN. No teacher: total is the hard CE.
        let none = t64(&[0.0; 3], &[3]);
        assert_eq!(scalar(&kd_loss(&s, Some(&t), &lab, &none, alpha, temp)?.hard), 0.0);
        let plain = kd_loss(&s, None, &lab, &m, alpha, temp)?;
        assert_eq!(scalar(&plain.total), scalar(&plain.hard));
        assert_eq!(scalar(&plain.soft), 0.0);
        Ok(())
    }

    #[test]
    fn kd_gradients() -> Result<()> {
        let s = rand_var((3, 5), 3)?;
        let t = rand_var((3, 5), 4)?;
        let lab = Tensor::new(&[4u32, 0, 2], &Device::Cpu)?;
        let m = t64(&[1.0, 0.0, 1.0], &[3]);
        check_grads(&[&s], 1e-6, 1e-6, |v| {
            kd_loss(&v[0], Some(t.as_tensor()), &lab, &m, 0.3, 2.5).map(|k| k.total)
        })?;
        check_grads(&[&s], 1e-6, 1e-6, |v| kd_loss(&v[0], None, &lab, &m, 0.3, 2.5).map(|k| k.total))?;
        // The teacher gets no gradient.
        let g = kd_loss(&s, Some(&t), &lab, &m, 0.3, 2.5)?.total.backward()?;
        assert!(g.get(&t).is_none());
        Ok(())
    }

    #[test]
    fn bounded_regression_hand_values() -> Result<()> {
        let s = t64(&[0.5, 0.5, 2.0, 0.0, 9.0, 9.0], &[3, 2]);
        let y = t64(&[0.0, 0.0, 0.0, 0.0, f64::NAN, f64::NAN], &[3, 2]);
        let t = t64(&[0.1, 0.1, 3.0, 0.0, 0.0, 0.0], &[3, 2]);
        let m = t64(&[1.0, 1.0, 0.0], &[3]);
        // Row 0: smoothL1 0.125+0.125, ‖d‖² 0.5 > 0.02 → bound 0.5.
        // Row 1: smoothL1 1.5, ‖d‖² 4 < 9 → bound 0 (margin 0); with margin 6: 4 + 6 > 9 → 4.
        // Row 2 is masked out (NaN target ignored).
        let r = bounded_regression(&s, Some(&t), &y, &m, 0.0, 0.5)?;
        assert!((scalar(&r.smooth_l1) - (0.25 + 1.5) / 2.0).abs() < 1e-12);
        assert!((scalar(&r.bound) - 0.5 / 2.0).abs() < 1e-12);
        assert!((scalar(&r.total) - (0.875 + 0.5 * 0.25)).abs() < 1e-12);
        let r = bounded_regression(&s, Some(&t), &y, &m, 6.0, 0.5)?;
        assert!((scalar(&r.bound) - (0.5 + 4.0) / 2.0).abs() < 1e-12);
        let r = bounded_regression(&s, None, &y, &m, 6.0, 0.5)?;
        assert_eq!(scalar(&r.bound), 0.0);
        assert_eq!(scalar(&r.total), scalar(&r.smooth_l1));
        let none = t64(&[0.0; 3], &[3]);
        assert_eq!(scalar(&bounded_regression(&s, Some(&t), &y, &none, 0.0, 0.5)?.total), 0.0);
        Ok(())
    }

    #[test]
    fn bounded_regression_gradients() -> Result<()> {
        // Spread so that some |d| exceed 1 (linear branch) and the bound is active on some rows.
        let s = Var::from_tensor(&(rand_var((6, 2), 5)?.as_tensor() * 2.0)?)?;
        let y = rand_var((6, 2), 6)?;
        let t = rand_var((6, 2), 7)?;
        let m = t64(&[1.0, 1.0, 0.0, 1.0, 1.0, 1.0], &[6]);
        let r = bounded_regression(&s, Some(&t), &y, &m, 0.1, 0.7)?;
        assert!(scalar(&r.bound) > 0.0, "bound inactive everywhere: test would not cover it");
        check_grads(&[&s], 1e-6, 1e-6, |v| {
            bounded_regression(&v[0], Some(t.as_tensor()), &y, &m, 0.1, 0.7).map(|r| r.total)
        })
    }

    #[test]
    fn feature_losses_values_and_gradients() -> Result<()> {
        let s = t64(&[1.0, 0.0, 0.0, 2.0], &[2, 2]);
        let t = t64(&[0.0, 1.0, 0.0, 3.0], &[2, 2]);
        // MSE: (1 + 1 + 0 + 1) / 4; cosine: row 0 orthogonal (1), row 1 parallel (0) → 0.5.
        assert!((scalar(&feature_loss(&s, &t, FeatureLoss::Mse)?) - 0.75).abs() < 1e-12);
        assert!((scalar(&feature_loss(&s, &t, FeatureLoss::Cosine)?) - 0.5).abs() < 1e-9);
        let s = rand_var((3, 4), 8)?;
        let t = rand_var((3, 4), 9)?;
        for kind in [FeatureLoss::Mse, FeatureLoss::Cosine] {
            check_grads(&[&s], 1e-6, 1e-6, |v| feature_loss(&v[0], &t, kind))?;
        }
        assert!(feature_loss(&s, &t64(&[0.0; 3], &[1, 3]), FeatureLoss::Mse).is_err());
        Ok(())
    }
}
