//! Evaluation of students and teachers on a split.
//!
//! Any model that maps preprocessed faces to logits (and optionally valence/arousal) is a
//! [`Predictor`]: a trained student or anything implementing [`Teacher`]. [`evaluate_batches`]
//! scores it on batches of a split and, when the batches carry the teacher's cached outputs, also
//! measures how closely it follows that teacher. The result is one serialisable [`EvalReport`].

use std::sync::Arc;

use candle_core::{DType, Tensor};
use distillery_core::Preprocess;
use distillery_data::Batch;
use distillery_models::teacher::Teacher;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::TensorContext;
use crate::metrics::{self, RegressionMetrics};
use crate::{Error, Result};

/// Predictions for a batch of `n` faces.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// `[n, C]`.
    pub logits: Tensor,
    /// `[n, 2]` (valence, arousal), when the model predicts them.
    pub va: Option<Tensor>,
}

/// A model that can be evaluated.
pub trait Predictor: Send + Sync {
    /// Name used in reports.
    fn name(&self) -> String;
    /// The preprocessing its inputs must follow.
    fn preprocess(&self) -> Preprocess;
    fn num_classes(&self) -> usize;
    /// Inference-mode forward pass on `[n, C, H, W]`.
    fn predict(&self, x: &Tensor) -> candle_core::Result<Prediction>;
}

/// Evaluates any [`Teacher`] as a [`Predictor`].
pub struct TeacherPredictor(pub Arc<dyn Teacher>);

impl Predictor for TeacherPredictor {
    fn name(&self) -> String {
        self.0.info().name.clone()
    }
    fn preprocess(&self) -> Preprocess {
        self.0.info().preprocess.clone()
    }
    fn num_classes(&self) -> usize {
        self.0.info().classes.len()
    }
    fn predict(&self, x: &Tensor) -> candle_core::Result<Prediction> {
        let out = self.0.forward(x)?;
        let va = match (out.valence, out.arousal) {
            (Some(v), Some(a)) => Some(Tensor::stack(&[v.flatten_all()?, a.flatten_all()?], 1)?),
            _ => None,
        };
        Ok(Prediction { logits: out.logits, va })
    }
}

/// Options of an evaluation.
#[derive(Clone, Debug, Default)]
pub struct EvalOptions {
    /// Average valence/arousal predictions over the image and its left–right mirror.
    pub flip: bool,
    /// Split name recorded in the report.
    pub split: String,
    /// Class names recorded in the report (indices when empty).
    pub classes: Vec<String>,
    /// Stop after this many batches.
    pub max_batches: Option<usize>,
}

fn de_nan<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Expression classification results (over labelled faces).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpressionReport {
    pub n: usize,
    #[serde(deserialize_with = "de_nan")]
    pub accuracy: f64,
    #[serde(deserialize_with = "de_nan")]
    pub macro_f1: f64,
    /// Per class, `null` for classes neither present nor predicted.
    pub per_class_f1: Vec<Option<f64>>,
    pub classes: Vec<String>,
    /// `confusion[truth][pred]`.
    pub confusion: Vec<Vec<u64>>,
}

/// Valence/arousal results (over faces with both labels).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AffectReport {
    pub valence: RegressionMetricsJson,
    pub arousal: RegressionMetricsJson,
    /// Mean of valence and arousal CCC.
    #[serde(deserialize_with = "de_nan")]
    pub mean_ccc: f64,
    /// Whether predictions were averaged with the mirrored image's.
    pub flip_averaged: bool,
}

/// [`RegressionMetrics`] with `null` for undefined values in JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegressionMetricsJson {
    pub n: usize,
    #[serde(deserialize_with = "de_nan")]
    pub rmse: f64,
    #[serde(deserialize_with = "de_nan")]
    pub pcc: f64,
    #[serde(deserialize_with = "de_nan")]
    pub ccc: f64,
    #[serde(deserialize_with = "de_nan")]
    pub sagr: f64,
}

impl From<RegressionMetrics> for RegressionMetricsJson {
    fn from(m: RegressionMetrics) -> Self {
        Self { n: m.n, rmse: m.rmse, pcc: m.pcc, ccc: m.ccc, sagr: m.sagr }
    }
}

/// Agreement with the teacher whose outputs are cached for the evaluated rows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TeacherAgreement {
    pub n: usize,
    /// Fraction of rows where the argmax of student and teacher logits agree.
    #[serde(deserialize_with = "de_nan")]
    pub top1_agreement: f64,
    /// Mean KL(teacher ‖ model) of the softmax distributions at temperature 1, in nats.
    #[serde(deserialize_with = "de_nan")]
    pub mean_kl: f64,
}

/// Everything an evaluation measured, as one JSON object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub split: String,
    /// Faces evaluated.
    pub n: usize,
    pub expression: ExpressionReport,
    /// Absent when the model does not predict valence/arousal.
    pub affect: Option<AffectReport>,
    /// Absent when the batches carry no teacher outputs.
    pub teacher: Option<TeacherAgreement>,
}

/// Raw per-face values behind a report (for plots).
#[derive(Clone, Debug, Default)]
pub struct EvalSamples {
    pub truth_class: Vec<u32>,
    pub pred_class: Vec<u32>,
    /// (predicted, true) valence and arousal of faces with both labels.
    pub valence: Vec<(f64, f64)>,
    pub arousal: Vec<(f64, f64)>,
}

/// Mirrors `[n, C, H, W]` left–right.
pub fn hflip(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(3)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    x.index_select(&idx, 3).op("flip")
}

fn rows_f32(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

fn vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Scores `model` on `batches`; see the module docs.
pub fn evaluate_batches(
    model: &dyn Predictor,
    batches: impl IntoIterator<Item = Result<Batch>>,
    opts: &EvalOptions,
) -> Result<(EvalReport, EvalSamples)> {
    let c = model.num_classes();
    let mut s = EvalSamples::default();
    let mut n = 0usize;
    let mut has_va = true;
    let (mut agree, mut kl_sum, mut n_teacher) = (0usize, 0f64, 0usize);
    for (bi, batch) in batches.into_iter().enumerate() {
        if opts.max_batches.is_some_and(|m| bi >= m) {
            break;
        }
        let batch = batch?;
        let pred = model.predict(&batch.images).op("model forward")?;
        let logits = rows_f32(&pred.logits)?;
        if logits.len() != batch.len() || logits.first().is_some_and(|r| r.len() != c) {
            return Err(Error::Data(format!(
                "model returned logits {:?} for a batch of {} and {c} classes",
                pred.logits.dims(),
                batch.len()
            )));
        }
        n += batch.len();
        let labels = batch.labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let lmask = vec_f32(&batch.label_mask)?;
        for i in 0..batch.len() {
            if lmask[i] > 0.0 {
                s.truth_class.push(labels[i]);
                s.pred_class.push(metrics::argmax(&logits[i]));
            }
        }
        let va = match (&pred.va, opts.flip) {
            (Some(v), true) => {
                let flipped = model.predict(&hflip(&batch.images)?).op("model forward (mirrored)")?;
                let fv =
                    flipped.va.ok_or_else(|| Error::Data("mirrored forward lost valence/arousal".into()))?;
                Some(((v + fv)? * 0.5)?)
            }
            (Some(v), false) => Some(v.clone()),
            (None, _) => None,
        };
        match va {
            Some(v) => {
                let v = rows_f32(&v)?;
                let t = rows_f32(&batch.va)?;
                let m = vec_f32(&batch.va_mask)?;
                for i in 0..batch.len() {
                    if m[i] > 0.0 {
                        s.valence.push((v[i][0] as f64, t[i][0] as f64));
                        s.arousal.push((v[i][1] as f64, t[i][1] as f64));
                    }
                }
            }
            None => has_va = false,
        }
        if let Some(tl) = &batch.teacher_logits {
            let tl = rows_f32(tl)?;
            for i in 0..batch.len() {
                n_teacher += 1;
                if metrics::argmax(&tl[i]) == metrics::argmax(&logits[i]) {
                    agree += 1;
                }
                kl_sum += metrics::kl_teacher_student(&tl[i], &logits[i]);
            }
        }
    }
    let cm = metrics::confusion_matrix(&s.truth_class, &s.pred_class, c);
    let classes =
        if opts.classes.len() == c { opts.classes.clone() } else { (0..c).map(|i| i.to_string()).collect() };
    let expression = ExpressionReport {
        n: s.truth_class.len(),
        accuracy: metrics::accuracy(&cm),
        macro_f1: metrics::macro_f1(&cm),
        per_class_f1: metrics::per_class_f1(&cm).into_iter().map(|v| (!v.is_nan()).then_some(v)).collect(),
        classes,
        confusion: cm,
    };
    let affect = has_va.then(|| {
        let (vp, vt): (Vec<f64>, Vec<f64>) = s.valence.iter().copied().unzip();
        let (ap, at): (Vec<f64>, Vec<f64>) = s.arousal.iter().copied().unzip();
        let v = RegressionMetrics::compute(&vp, &vt);
        let a = RegressionMetrics::compute(&ap, &at);
        AffectReport {
            mean_ccc: (v.ccc + a.ccc) / 2.0,
            valence: v.into(),
            arousal: a.into(),
            flip_averaged: opts.flip,
        }
    });
    let teacher = (n_teacher > 0).then(|| TeacherAgreement {
        n: n_teacher,
        top1_agreement: agree as f64 / n_teacher as f64,
        mean_kl: kl_sum / n_teacher as f64,
    });
    let report =
        EvalReport { model: model.name(), split: opts.split.clone(), n, expression, affect, teacher };
    Ok((report, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use distillery_core::FaceId;

    /// Predicts logits from pixel (0,0,0,0) .. and va from the left/right columns of row 0.
    struct Probe;

    impl Predictor for Probe {
        fn name(&self) -> String {
            "probe".into()
        }
        fn preprocess(&self) -> Preprocess {
            Preprocess::unit_rgb(2)
        }
        fn num_classes(&self) -> usize {
            3
        }
        fn predict(&self, x: &Tensor) -> candle_core::Result<Prediction> {
            // x: [n, 1, 1, 3]; logits = the three pixels; va = (left pixel, right pixel).
            let f = x.flatten_from(1)?;
            let va = Tensor::cat(&[f.narrow(1, 0, 1)?, f.narrow(1, 2, 1)?], 1)?;
            Ok(Prediction { logits: f, va: Some(va) })
        }
    }

    fn batch() -> Batch {
        let dev = Device::Cpu;
        let px = [[0.9f32, 0.1, 0.0], [0.0, 0.2, 0.8], [0.1, 0.7, 0.3], [-0.5, 0.0, 0.5]];
        let flat: Vec<f32> = px.iter().flatten().copied().collect();
        Batch {
            face_ids: (0..4u8).map(|i| FaceId::of(&[i], None)).collect(),
            views: vec![0; 4],
            images: Tensor::from_vec(flat, (4, 1, 1, 3), &dev).unwrap(),
            labels: Tensor::new(&[0u32, 1, 1, 2], &dev).unwrap(),
            label_mask: Tensor::new(&[1f32, 1., 1., 0.], &dev).unwrap(),
            va: Tensor::new(&[[1f32, 0.], [0., 1.], [0.2, 0.2], [-0.5, 0.5]], &dev).unwrap(),
            va_mask: Tensor::new(&[1f32, 1., 0., 1.], &dev).unwrap(),
            teacher_logits: Some(
                Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.], [0., 1., 0.], [0., 0., 1.]], &dev).unwrap(),
            ),
            teacher_va: None,
            teacher_embedding: None,
        }
    }

    #[test]
    fn report_matches_hand_values() {
        let opts = EvalOptions { split: "val".into(), ..Default::default() };
        let (r, s) = evaluate_batches(&Probe, [Ok(batch())], &opts).unwrap();
        assert_eq!(r.n, 4);
        // labelled rows 0..3: truth 0 1 1, predicted argmax 0 2 1.
        assert_eq!(s.pred_class, vec![0, 2, 1]);
        assert_eq!(r.expression.n, 3);
        assert!((r.expression.accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.expression.confusion[1], vec![0, 1, 1]);
        // rows with va: 0, 1, 3. predicted valence: .9, 0, -.5 ; truth 1, 0, -.5
        let a = r.affect.as_ref().unwrap();
        assert_eq!(a.valence.n, 3);
        assert!((a.valence.rmse - (0.01f64 / 3.0).sqrt()).abs() < 1e-6);
        // Teacher argmax 0 1 1 2 vs model 0 2 1 2 → 3/4.
        let t = r.teacher.as_ref().unwrap();
        assert!((t.top1_agreement - 0.75).abs() < 1e-12);
        assert!(t.mean_kl > 0.0);
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["expression"]["macro_f1"].is_number());
        let back: EvalReport = serde_json::from_value(json).unwrap();
        assert_eq!(back.expression.confusion, r.expression.confusion);
    }

    #[test]
    fn flip_averages_with_the_mirror() {
        // The probe's valence is the left pixel and arousal the right one; the mirror swaps them,
        // so flip-averaged valence = arousal = mean of the two.
        let opts = EvalOptions { flip: true, ..Default::default() };
        let (r, s) = evaluate_batches(&Probe, [Ok(batch())], &opts).unwrap();
        assert!(r.affect.as_ref().unwrap().flip_averaged);
        assert!((s.valence[0].0 - 0.45).abs() < 1e-6);
        assert!((s.arousal[0].0 - 0.45).abs() < 1e-6);
        let x = Tensor::new(&[[[[1f32, 2., 3.]]]], &Device::Cpu).unwrap();
        assert_eq!(hflip(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![3., 2., 1.]);
    }
}
