//! [`OnnxTeacher`]: an [`OnnxGraph`] plus its TOML description, as a [`Teacher`].

use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use distillery_core::{ClassSet, Error, Layout, TeacherFingerprint};

use super::{OnnxError, OnnxGraph, OnnxTeacherConfig, OutputKind};
use crate::teacher::{Teacher, TeacherInfo, TeacherOutput};

/// Probabilities below this become `ln(1e-7)` logits, so a zero probability stays finite.
const PROB_FLOOR: f64 = 1e-7;

/// An ONNX model run as a teacher.
#[derive(Debug)]
pub struct OnnxTeacher {
    graph: OnnxGraph,
    cfg: OnnxTeacherConfig,
    info: TeacherInfo,
}

impl OnnxTeacher {
    /// Loads the teacher a TOML file describes; the model path resolves against the file's folder.
    pub fn from_config_file(path: &Path, device: &Device) -> Result<Self, OnnxError> {
        let cfg = OnnxTeacherConfig::from_file(path)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_config(cfg, base, device)
    }

    /// Loads the teacher `cfg` describes, resolving a relative model path against `base_dir`.
    ///
    /// The model is run once on a zero image to check that the named outputs exist and have the
    /// declared widths, so a wrong config fails here rather than in a worker.
    pub fn from_config(cfg: OnnxTeacherConfig, base_dir: &Path, device: &Device) -> Result<Self, OnnxError> {
        cfg.validate()?;
        let path = cfg.model_path(base_dir);
        let bytes = std::fs::read(&path).map_err(|source| OnnxError::Io { path: path.clone(), source })?;
        let graph = OnnxGraph::from_bytes(&bytes, device).map_err(|e| match e {
            OnnxError::Decode { reason, .. } => OnnxError::Decode { path: path.clone(), reason },
            other => other,
        })?;
        if !graph.input_names().contains(&cfg.input.as_str()) {
            return Err(Error::config(
                "input",
                format!(
                    "`{}` is not an input of {} (inputs: {:?})",
                    cfg.input,
                    path.display(),
                    graph.input_names()
                ),
            )
            .into());
        }
        let named = [
            ("output", Some(&cfg.output)),
            ("valence_output", cfg.valence_output.as_ref()),
            ("arousal_output", cfg.arousal_output.as_ref()),
            ("embedding_output", cfg.embedding_output.as_ref()),
        ];
        for (key, name) in named {
            if let Some(n) = name
                && !graph.has_value(n)
            {
                return Err(Error::config(key, format!("`{n}` is not a value of {}", path.display())).into());
            }
        }
        let mut h = blake3::Hasher::new();
        h.update(b"distillery.onnx-teacher.v1\0");
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
        let pre = cfg.preprocess.fingerprint_bytes();
        h.update(&(pre.len() as u64).to_le_bytes());
        h.update(&pre);
        h.update(&cfg.interpretation_bytes());
        let fingerprint = TeacherFingerprint::from_hasher(&h);

        let info = TeacherInfo {
            name: cfg.name.clone(),
            classes: ClassSet::new(cfg.classes.iter().cloned()),
            preprocess: cfg.preprocess.clone(),
            has_valence_arousal: cfg.valence_output.is_some(),
            embedding_dim: None,
            has_landmarks: false,
            max_batch: cfg.max_batch,
            fingerprint,
        };
        let mut teacher = Self { graph, cfg, info };
        let probe = teacher.run_chunk(&teacher.zero_input(1)?)?;
        teacher.info.embedding_dim = probe.embedding.as_ref().map(|e| e.dim(1)).transpose()?;
        Ok(teacher)
    }

    /// The configuration this teacher was built from.
    pub fn config(&self) -> &OnnxTeacherConfig {
        &self.cfg
    }

    /// The execution plan.
    pub fn graph(&self) -> &OnnxGraph {
        &self.graph
    }

    /// Evaluates the raw graph: named inputs in, the named values out (see [`OnnxGraph::run`]).
    pub fn run(&self, inputs: &[(&str, &Tensor)], outputs: &[&str]) -> Result<Vec<Tensor>, OnnxError> {
        self.graph.run(inputs, outputs)
    }

    fn zero_input(&self, n: usize) -> candle_core::Result<Tensor> {
        let p = &self.cfg.preprocess;
        let [h, w] = p.size;
        let shape = match p.layout {
            Layout::Nchw => (n, p.channels, h, w),
            Layout::Nhwc => (n, h, w, p.channels),
        };
        Tensor::zeros(shape, DType::F32, self.graph.device())
    }

    fn run_chunk(&self, x: &Tensor) -> Result<TeacherOutput, OnnxError> {
        let n = x.dim(0)?;
        let mut names: Vec<&str> = vec![self.cfg.output.as_str()];
        for o in [&self.cfg.valence_output, &self.cfg.arousal_output, &self.cfg.embedding_output]
            .into_iter()
            .flatten()
        {
            names.push(o.as_str());
        }
        let mut outs = self.graph.run(&[(self.cfg.input.as_str(), x)], &names)?.into_iter();
        let raw = outs.next().expect("class output requested");
        let per_row = |t: &Tensor, key: &str| -> Result<Tensor, OnnxError> {
            if t.dims().first() != Some(&n) {
                return Err(
                    Error::config(key, format!("value has shape {:?}, expected {n} rows", t.dims())).into()
                );
            }
            Ok(t.to_dtype(DType::F32)?.reshape((n, ()))?)
        };
        let scores = per_row(&raw, "output")?;
        if scores.dim(1)? != self.cfg.classes.len() {
            return Err(Error::config(
                "classes",
                format!(
                    "lists {} classes but `{}` has {} columns",
                    self.cfg.classes.len(),
                    self.cfg.output,
                    scores.dim(1)?
                ),
            )
            .into());
        }
        let logits = match self.cfg.outputs {
            OutputKind::Logits => scores,
            OutputKind::Probabilities => scores.maximum(PROB_FLOOR)?.log()?,
        };
        let mut scalar = |idx: Option<usize>, key: &str| -> Result<Tensor, OnnxError> {
            let t = per_row(&outs.next().expect("requested"), key)?;
            let k = t.dim(1)?;
            match idx {
                Some(i) if i < k => Ok(t.i((.., i))?.contiguous()?),
                Some(i) => Err(Error::config(key, format!("index {i} is out of range for width {k}")).into()),
                None if k == 1 => Ok(t.squeeze(D::Minus1)?),
                None => {
                    Err(Error::config(key, format!("value has width {k}; set an index to pick one column"))
                        .into())
                }
            }
        };
        let (valence, arousal) = if self.cfg.valence_output.is_some() {
            (
                Some(scalar(self.cfg.valence_index, "valence_index")?),
                Some(scalar(self.cfg.arousal_index, "arousal_index")?),
            )
        } else {
            (None, None)
        };
        let embedding = match &self.cfg.embedding_output {
            Some(_) => Some(per_row(&outs.next().expect("requested"), "embedding_output")?),
            None => None,
        };
        Ok(TeacherOutput { logits, valence, arousal, embedding, landmarks: None })
    }
}

impl Teacher for OnnxTeacher {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        self.graph.device()
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<TeacherOutput> {
        let n = x.dim(0)?;
        let step =
            if x.device().is_cpu() { self.cfg.cpu_chunk.min(self.cfg.max_batch) } else { self.cfg.max_batch };
        if n <= step {
            return Ok(self.run_chunk(x)?);
        }
        let mut parts = Vec::new();
        for start in (0..n).step_by(step) {
            parts.push(self.run_chunk(&x.narrow(0, start, step.min(n - start))?)?);
        }
        let cat = |f: &dyn Fn(&TeacherOutput) -> Option<Tensor>| -> candle_core::Result<Option<Tensor>> {
            let ts: Option<Vec<Tensor>> = parts.iter().map(f).collect();
            ts.map(|ts| Tensor::cat(&ts, 0)).transpose()
        };
        Ok(TeacherOutput {
            logits: cat(&|p| Some(p.logits.clone()))?.expect("logits present"),
            valence: cat(&|p| p.valence.clone())?,
            arousal: cat(&|p| p.arousal.clone())?,
            embedding: cat(&|p| p.embedding.clone())?,
            landmarks: None,
        })
    }
}
