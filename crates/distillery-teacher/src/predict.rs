//! One-shot predictions for `distillery predict`: images or a preprocessed array in, one
//! [`Prediction`] per input out, in input order.

use candle_core::{D, Tensor};
use distillery_models::teacher::Teacher;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::prep;

/// What a teacher (or a student used as one) says about one input.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Prediction {
    /// The input: an image path, or `npy[i]`.
    pub input: String,
    pub classes: Vec<String>,
    pub logits: Vec<f32>,
    /// softmax(logits).
    pub probs: Vec<f32>,
    /// Name of the most probable class.
    pub top: String,
    /// `null` when the teacher has no valence/arousal head.
    pub valence: Option<f32>,
    pub arousal: Option<f32>,
}

/// Prepares each encoded image with the teacher's own preprocessing (the image is taken as the face
/// crop) and predicts. `names` label the inputs in the output.
pub fn predict_images(teacher: &dyn Teacher, images: &[(String, Vec<u8>)]) -> Result<Vec<Prediction>> {
    let pp = &teacher.info().preprocess;
    let shape = prep::input_shape(pp);
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(teacher.info().max_batch.max(1)) {
        let mut data = Vec::with_capacity(chunk.len() * shape.iter().product::<usize>());
        for (name, bytes) in chunk {
            let img = prep::decode(bytes).map_err(|e| Error::Input(format!("{name}: {e}")))?;
            data.extend(prep::to_input(&img, pp));
        }
        let x = Tensor::from_vec(data, (chunk.len(), shape[0], shape[1], shape[2]), teacher.device())
            .map_err(Error::inference("predict input"))?;
        let names: Vec<String> = chunk.iter().map(|(n, _)| n.clone()).collect();
        out.extend(predict_tensor(teacher, &x, &names)?);
    }
    Ok(out)
}

/// Predicts on an already preprocessed `[n, C, H, W]` f32 array; `names` has `n` entries.
pub fn predict_tensor(teacher: &dyn Teacher, x: &Tensor, names: &[String]) -> Result<Vec<Prediction>> {
    let n = x.dim(0).map_err(|e| Error::Input(format!("input array: {e}")))?;
    if names.len() != n {
        return Err(Error::Input(format!("{} names for {n} inputs", names.len())));
    }
    predict_rows(teacher, x, names).map_err(Error::inference("predict"))
}

fn predict_rows(teacher: &dyn Teacher, x: &Tensor, names: &[String]) -> candle_core::Result<Vec<Prediction>> {
    let n = x.dim(0)?;
    let info = teacher.info();
    let classes: Vec<String> = info.classes.names().to_vec();
    let mut out = Vec::with_capacity(n);
    let batch = info.max_batch.max(1);
    for start in (0..n).step_by(batch) {
        let len = batch.min(n - start);
        let xb = x.narrow(0, start, len)?.to_device(teacher.device())?.to_dtype(candle_core::DType::F32)?;
        let y = teacher.forward(&xb)?;
        let logits = y.logits.to_dtype(candle_core::DType::F32)?;
        let probs = candle_nn_softmax(&logits)?.to_vec2::<f32>()?;
        let logits = logits.to_vec2::<f32>()?;
        let valence = y.valence.map(|t| t.to_vec1::<f32>()).transpose()?;
        let arousal = y.arousal.map(|t| t.to_vec1::<f32>()).transpose()?;
        for i in 0..len {
            let top = probs[i]
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, _)| classes.get(k).cloned().unwrap_or_else(|| k.to_string()))
                .unwrap_or_default();
            out.push(Prediction {
                input: names[start + i].clone(),
                classes: classes.clone(),
                logits: logits[i].clone(),
                probs: probs[i].clone(),
                top,
                valence: valence.as_ref().map(|v| v[i]),
                arousal: arousal.as_ref().map(|v| v[i]),
            });
        }
    }
    Ok(out)
}

/// Row-wise softmax, stable for large logits.
fn candle_nn_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::TinyTeacher;

    #[test]
    fn probabilities_sum_to_one_and_order_is_kept() {
        let dev = candle_core::Device::Cpu;
        let t = TinyTeacher::new(3, 16, &dev).unwrap();
        let x = Tensor::rand(0f32, 1f32, (5, 3, 16, 16), &dev).unwrap();
        let names: Vec<String> = (0..5).map(|i| format!("npy[{i}]")).collect();
        let p = predict_tensor(&t, &x, &names).unwrap();
        assert_eq!(p.len(), 5);
        for (i, row) in p.iter().enumerate() {
            assert_eq!(row.input, names[i]);
            let s: f32 = row.probs.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "{s}");
            let best = row.probs.iter().cloned().fold(f32::MIN, f32::max);
            assert_eq!(row.probs[row.classes.iter().position(|c| *c == row.top).unwrap()], best);
        }
        // The same row predicted alone gives the same answer as in the batch.
        let one = predict_tensor(&t, &x.narrow(0, 2, 1).unwrap(), &names[2..3]).unwrap();
        for (a, b) in one[0].logits.iter().zip(&p[2].logits) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn an_undecodable_image_is_named() {
        let t = TinyTeacher::new(0, 16, &candle_core::Device::Cpu).unwrap();
        let err = predict_images(&t, &[("bad.jpg".into(), b"not an image".to_vec())]).unwrap_err();
        assert!(err.to_string().contains("bad.jpg"), "{err}");
    }
}
