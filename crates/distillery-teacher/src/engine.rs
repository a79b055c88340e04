//! The inference thread: the only place the teacher runs.
//!
//! One OS thread owns the model and executes batches one at a time, in arrival order, for both the
//! labelling pipeline and the `Infer` RPCs. A single owner keeps device memory predictable (one
//! batch of activations at a time) and lets GPU teachers keep their context on one thread. Callers
//! hand plain `Vec<f32>` inputs in and get plain vectors out, so no tensor crosses an async task.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use distillery_models::teacher::{Teacher, TeacherInfo, TeacherOutput};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::prep::input_shape;

/// Teacher outputs of one batch of `n` inputs, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchOutputs {
    pub n: usize,
    /// `n × classes`.
    pub logits: Vec<f32>,
    pub classes: usize,
    pub valence: Option<Vec<f32>>,
    pub arousal: Option<Vec<f32>>,
    /// `n × embedding_dim`.
    pub embedding: Option<Vec<f32>>,
    pub embedding_dim: usize,
    /// `n × 68 × 2`.
    pub landmarks: Option<Vec<f32>>,
}

impl BatchOutputs {
    pub fn logits_row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.classes..(i + 1) * self.classes]
    }
    pub fn embedding_row(&self, i: usize) -> Option<&[f32]> {
        self.embedding.as_ref().map(|e| &e[i * self.embedding_dim..(i + 1) * self.embedding_dim])
    }
    pub fn landmarks_row(&self, i: usize) -> Option<&[f32]> {
        self.landmarks.as_ref().map(|l| &l[i * 136..(i + 1) * 136])
    }
}

struct Request {
    input: Vec<f32>,
    n: usize,
    reply: oneshot::Sender<Result<BatchOutputs>>,
}

/// Handle to the inference thread. Clones share the thread; it stops when the last clone drops.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Request>,
    info: Arc<TeacherInfo>,
}

impl Engine {
    /// Starts the thread that owns `teacher`; at most `queue` batches wait for it.
    pub fn start(teacher: Arc<dyn Teacher>, queue: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<Request>(queue.max(1));
        let info = Arc::new(teacher.info().clone());
        std::thread::Builder::new()
            .name("teacher-inference".into())
            .spawn(move || {
                while let Some(req) = rx.blocking_recv() {
                    // A panicking teacher fails that batch, not the worker.
                    let out =
                        std::panic::catch_unwind(AssertUnwindSafe(|| run_batch(&*teacher, req.input, req.n)))
                            .unwrap_or_else(|_| {
                                Err(Error::Input("the teacher panicked on this batch".into()))
                            });
                    let _ = req.reply.send(out);
                }
            })
            .expect("spawning the inference thread");
        Engine { tx, info }
    }

    pub fn info(&self) -> &TeacherInfo {
        &self.info
    }

    /// Number of f32 values in one prepared input.
    pub fn input_len(&self) -> usize {
        input_shape(&self.info.preprocess).iter().product()
    }

    /// Batches waiting for the thread (not counting the one running).
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Runs the teacher on `n` prepared inputs laid end to end in `input`.
    pub async fn infer(&self, input: Vec<f32>, n: usize) -> Result<BatchOutputs> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request { input, n, reply }).await.map_err(|_| Error::EngineStopped)?;
        rx.await.map_err(|_| Error::EngineStopped)?
    }
}

fn run_batch(teacher: &dyn Teacher, input: Vec<f32>, n: usize) -> Result<BatchOutputs> {
    let info = teacher.info();
    let [a, b, c] = input_shape(&info.preprocess);
    if n == 0 || input.len() != n * a * b * c {
        return Err(Error::Input(format!(
            "batch of {n} needs {} values of shape [{a}, {b}, {c}], got {}",
            n * a * b * c,
            input.len()
        )));
    }
    let x = Tensor::from_vec(input, (n, a, b, c), teacher.device()).map_err(Error::inference("upload"))?;
    let out: TeacherOutput = teacher.forward(&x).map_err(Error::inference("forward"))?;
    let flat = |t: &Tensor, what: &'static str, per_row: Option<usize>| -> Result<Vec<f32>> {
        let v = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(Error::inference(what))?;
        if per_row.is_some_and(|k| v.len() != n * k) || v.len() % n != 0 {
            return Err(Error::Input(format!(
                "teacher output `{what}` has shape {:?} for a batch of {n}",
                t.dims()
            )));
        }
        Ok(v)
    };
    let classes = info.classes.len();
    let logits = flat(&out.logits, "logits", Some(classes))?;
    let valence = out.valence.as_ref().map(|t| flat(t, "valence", Some(1))).transpose()?;
    let arousal = out.arousal.as_ref().map(|t| flat(t, "arousal", Some(1))).transpose()?;
    let embedding = out.embedding.as_ref().map(|t| flat(t, "embedding", info.embedding_dim)).transpose()?;
    let embedding_dim = embedding.as_ref().map_or(0, |e| e.len() / n);
    let landmarks = out.landmarks.as_ref().map(|t| flat(t, "landmarks", Some(136))).transpose()?;
    Ok(BatchOutputs { n, logits, classes, valence, arousal, embedding, embedding_dim, landmarks })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::TinyTeacher;
    use candle_core::Device;

    #[tokio::test]
    async fn engine_matches_direct_forward_and_rejects_bad_shapes() {
        let t = Arc::new(TinyTeacher::new(3, 4, &Device::Cpu).unwrap());
        let engine = Engine::start(t.clone(), 2);
        let input: Vec<f32> = (0..2 * 3 * 16).map(|i| (i % 7) as f32 / 7.0).collect();
        let out = engine.infer(input.clone(), 2).await.unwrap();
        let direct = t.forward(&Tensor::from_vec(input, (2, 3, 4, 4), &Device::Cpu).unwrap()).unwrap();
        assert_eq!(out.logits, direct.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(out.landmarks_row(1).unwrap().len(), 136);
        assert_eq!(out.embedding_row(0).unwrap().len(), crate::tiny::TINY_EMBEDDING_DIM);
        let e = engine.infer(vec![0.0; 5], 1).await.unwrap_err().to_string();
        assert!(e.contains("batch of 1"), "{e}");
    }
}
