//! Evaluation metrics for expression classification and valence/arousal regression, and for how
//! closely a student follows its teacher.
//!
//! Definitions follow the EmoNet paper's evaluation: CCC and PCC use population statistics (divide
//! by N), SAGR is the fraction of samples whose prediction has the sign of the truth (`sign(0) = 0`).
//! Every function returns `NaN` when its value is undefined (no samples, zero variance) rather than
//! inventing a number, and the report serialises those as `null`.

/// Confusion matrix: `m[truth][pred]` counts.
pub fn confusion_matrix(truth: &[u32], pred: &[u32], classes: usize) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; classes]; classes];
    for (&t, &p) in truth.iter().zip(pred) {
        if (t as usize) < classes && (p as usize) < classes {
            m[t as usize][p as usize] += 1;
        }
    }
    m
}

/// Fraction of samples on the diagonal.
pub fn accuracy(cm: &[Vec<u64>]) -> f64 {
    let total: u64 = cm.iter().flatten().sum();
    let hit: u64 = (0..cm.len()).map(|i| cm[i][i]).sum();
    if total == 0 { f64::NAN } else { hit as f64 / total as f64 }
}

/// Per-class F1 = 2·TP / (2·TP + FP + FN); `NaN` for a class that is neither present nor predicted.
pub fn per_class_f1(cm: &[Vec<u64>]) -> Vec<f64> {
    let c = cm.len();
    (0..c)
        .map(|k| {
            let tp = cm[k][k];
            let fn_: u64 = cm[k].iter().sum::<u64>() - tp;
            let fp: u64 = (0..c).map(|r| cm[r][k]).sum::<u64>() - tp;
            let denom = 2 * tp + fp + fn_;
            if denom == 0 { f64::NAN } else { 2.0 * tp as f64 / denom as f64 }
        })
        .collect()
}

/// Mean F1 over the classes that occur in the truth or the predictions.
pub fn macro_f1(cm: &[Vec<u64>]) -> f64 {
    let f: Vec<f64> = per_class_f1(cm).into_iter().filter(|v| !v.is_nan()).collect();
    if f.is_empty() { f64::NAN } else { f.iter().sum::<f64>() / f.len() as f64 }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Root mean squared error.
pub fn rmse(pred: &[f64], truth: &[f64]) -> f64 {
    if pred.is_empty() {
        return f64::NAN;
    }
    (pred.iter().zip(truth).map(|(p, t)| (p - t) * (p - t)).sum::<f64>() / pred.len() as f64).sqrt()
}

/// Population means, variances and covariance of two series.
fn moments(p: &[f64], t: &[f64]) -> (f64, f64, f64, f64, f64) {
    let (mp, mt) = (mean(p), mean(t));
    let n = p.len() as f64;
    let vp = p.iter().map(|x| (x - mp) * (x - mp)).sum::<f64>() / n;
    let vt = t.iter().map(|x| (x - mt) * (x - mt)).sum::<f64>() / n;
    let cov = p.iter().zip(t).map(|(x, y)| (x - mp) * (y - mt)).sum::<f64>() / n;
    (mp, mt, vp, vt, cov)
}

/// Pearson correlation coefficient.
pub fn pcc(pred: &[f64], truth: &[f64]) -> f64 {
    if pred.is_empty() {
        return f64::NAN;
    }
    let (_, _, vp, vt, cov) = moments(pred, truth);
    let d = (vp * vt).sqrt();
    if d == 0.0 { f64::NAN } else { cov / d }
}

/// Lin's concordance correlation coefficient: `2·cov / (σp² + σt² + (μp − μt)²)`.
pub fn ccc(pred: &[f64], truth: &[f64]) -> f64 {
    if pred.is_empty() {
        return f64::NAN;
    }
    let (mp, mt, vp, vt, cov) = moments(pred, truth);
    let d = vp + vt + (mp - mt) * (mp - mt);
    if d == 0.0 { f64::NAN } else { 2.0 * cov / d }
}

/// Sign agreement: fraction of samples with `sign(pred) == sign(truth)`.
pub fn sagr(pred: &[f64], truth: &[f64]) -> f64 {
    if pred.is_empty() {
        return f64::NAN;
    }
    let sign = |x: f64| {
        if x > 0.0 {
            1
        } else if x < 0.0 {
            -1
        } else {
            0
        }
    };
    pred.iter().zip(truth).filter(|(p, t)| sign(**p) == sign(**t)).count() as f64 / pred.len() as f64
}

/// Index of the largest value (first on ties).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of one row, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(teacher ‖ student) of one row of logits (temperature 1), in nats.
pub fn kl_teacher_student(teacher: &[f32], student: &[f32]) -> f64 {
    let lt = log_softmax(teacher);
    let ls = log_softmax(student);
    lt.iter().zip(&ls).map(|(t, s)| t.exp() * (t - s)).sum()
}

/// Regression metrics of one dimension (valence or arousal).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RegressionMetrics {
    pub n: usize,
    pub rmse: f64,
    pub pcc: f64,
    pub ccc: f64,
    pub sagr: f64,
}

impl RegressionMetrics {
    pub fn compute(pred: &[f64], truth: &[f64]) -> Self {
        Self {
            n: pred.len(),
            rmse: rmse(pred, truth),
            pcc: pcc(pred, truth),
            ccc: ccc(pred, truth),
            sagr: sagr(pred, truth),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    #[test]
    fn classification_by_hand() {
        // truth: 0 0 1 1 2 ; pred: 0 1 1 1 0
        let cm = confusion_matrix(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 0], 3);
        assert_eq!(cm, vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]);
        close(accuracy(&cm), 3.0 / 5.0);
        // class 0: tp1 fp1 fn1 → 2/4; class 1: tp2 fp1 fn0 → 4/5; class 2: tp0 fp0 fn1 → 0.
        let f = per_class_f1(&cm);
        close(f[0], 0.5);
        close(f[1], 0.8);
        close(f[2], 0.0);
        close(macro_f1(&cm), (0.5 + 0.8 + 0.0) / 3.0);
        // A class absent from truth and predictions does not count.
        let cm4 = confusion_matrix(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 0], 4);
        close(macro_f1(&cm4), (0.5 + 0.8 + 0.0) / 3.0);
        assert!(accuracy(&confusion_matrix(&[], &[], 3)).is_nan());
    }

    #[test]
    fn regression_by_hand() {
        let t = [0.0, 0.5, -0.5, 1.0];
        let p = [0.1, 0.4, -0.2, 0.5];
        // squared errors: .01 .01 .09 .25 → mean .09 → rmse .3
        close(rmse(&p, &t), 0.3);
        // means: t .25, p .2 ; deviations t: -.25 .25 -.75 .75 ; p: -.1 .2 -.4 .3
        // cov = (.025 + .05 + .3 + .225)/4 = .15 ; var_t = (.0625+.0625+.5625+.5625)/4 = .3125
        // var_p = (.01+.04+.16+.09)/4 = .075
        close(pcc(&p, &t), 0.15 / (0.3125f64 * 0.075).sqrt());
        close(ccc(&p, &t), 2.0 * 0.15 / (0.3125 + 0.075 + 0.05 * 0.05));
        // signs: t 0 + - + ; p + + - + → 3 of 4 agree
        close(sagr(&p, &t), 0.75);
        close(ccc(&t, &t), 1.0);
        close(pcc(&t, &t), 1.0);
        assert!(pcc(&[1.0, 1.0], &[0.0, 1.0]).is_nan());
        // A constant offset keeps PCC at 1 but lowers CCC.
        let shifted: Vec<f64> = t.iter().map(|x| x + 0.5).collect();
        close(pcc(&shifted, &t), 1.0);
        close(ccc(&shifted, &t), 2.0 * 0.3125 / (2.0 * 0.3125 + 0.25));
    }

    #[test]
    fn agreement_and_kl_by_hand() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        close(kl_teacher_student(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        // teacher p = (1/2, 1/2); student q = softmax(0, ln 3) = (1/4, 3/4)
        // KL = 1/2 ln(2) + 1/2 ln(2/3)
        // ln 3 enters as an f32 logit (relative error ~6e-8), so compare at f32 precision.
        let kl = kl_teacher_student(&[0.0, 0.0], &[0.0, 3f32.ln()]);
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl - want).abs() < 1e-7, "{kl} vs {want}");
        let ls = log_softmax(&[1000.0, 1000.0]);
        close(ls[0], -(2f64.ln()));
    }
}
