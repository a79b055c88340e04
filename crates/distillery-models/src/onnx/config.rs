//! The TOML description of an ONNX teacher: which file, which input and outputs, how images are
//! prepared and how the outputs are read.
//!
//! ```toml
//! name = "faceapi-expression"
//! model = "faceapi_expression.onnx"   # relative to this file's folder
//! input = "input"
//! output = "probs"
//! outputs = "probabilities"           # or "logits"
//! classes = ["neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised"]
//! max_batch = 64
//! cpu_chunk = 8                       # images per graph run on the CPU
//!
//! [preprocess]
//! size = [112, 112]
//! pad_to_square = true
//! ```

use std::path::{Path, PathBuf};

use distillery_core::{Error, Preprocess};
use serde::{Deserialize, Serialize};

use super::OnnxError;

/// How the class output of the model is to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Already normalised probabilities; the teacher's logits become `ln(max(p, 1e-7))`.
    Probabilities,
    /// Unnormalised scores, used as they are.
    Logits,
}

/// An ONNX teacher as described by its TOML file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxTeacherConfig {
    /// Human name of the teacher.
    pub name: String,
    /// The `.onnx` file; relative paths resolve against the TOML file's folder.
    pub model: PathBuf,
    /// Name of the graph input that takes the image batch.
    pub input: String,
    /// Name of the value holding class scores, `[N, classes]`.
    pub output: String,
    /// Whether `output` holds probabilities or logits.
    pub outputs: OutputKind,
    /// Class names in the order of `output`'s columns.
    pub classes: Vec<String>,
    /// Value holding valence (`[N]`, `[N, 1]`, or `[N, k]` with `valence_index`).
    #[serde(default)]
    pub valence_output: Option<String>,
    #[serde(default)]
    pub valence_index: Option<usize>,
    /// Value holding arousal (same conventions as valence).
    #[serde(default)]
    pub arousal_output: Option<String>,
    #[serde(default)]
    pub arousal_index: Option<usize>,
    /// Value used as the embedding (flattened to `[N, d]`); any intermediate value may be named.
    #[serde(default)]
    pub embedding_output: Option<String>,
    /// Largest batch run at once; bigger batches are split.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// On the CPU, images per run of the graph: a batch runs in chunks this size (at most
    /// `max_batch`), so that each layer's activations stay in the CPU's caches between layers.
    /// face-api at batch 32 on two cores ran about a tenth faster in chunks of 2 to 16 images
    /// than whole, and slower one image at a time. Devices other than the CPU run whole batches.
    #[serde(default = "default_cpu_chunk")]
    pub cpu_chunk: usize,
    /// How images are prepared for `input`.
    pub preprocess: Preprocess,
}

fn default_max_batch() -> usize {
    64
}

fn default_cpu_chunk() -> usize {
    8
}

impl OnnxTeacherConfig {
    /// Parses TOML text; unknown keys are errors naming the key.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, OnnxError> {
        let cfg: Self = toml::from_str(text)
            .map_err(|e| OnnxError::ConfigParse { path: origin.to_path_buf(), source: Box::new(e) })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a teacher TOML file.
    pub fn from_file(path: &Path) -> Result<Self, OnnxError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| OnnxError::Io { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, path)
    }

    /// Checks values serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), Error> {
        let nonempty = |key: &str, v: &str| {
            if v.trim().is_empty() { Err(Error::config(key, "must not be empty")) } else { Ok(()) }
        };
        nonempty("name", &self.name)?;
        nonempty("model", &self.model.to_string_lossy())?;
        nonempty("input", &self.input)?;
        nonempty("output", &self.output)?;
        if self.classes.is_empty() {
            return Err(Error::config("classes", "must list at least one class"));
        }
        for (i, c) in self.classes.iter().enumerate() {
            if c.trim().is_empty() {
                return Err(Error::config("classes", format!("entry {i} is empty")));
            }
            if self.classes[..i].iter().any(|d| d.eq_ignore_ascii_case(c)) {
                return Err(Error::config("classes", format!("`{c}` appears twice")));
            }
        }
        if self.max_batch == 0 {
            return Err(Error::config("max_batch", "must be at least 1"));
        }
        if self.cpu_chunk == 0 {
            return Err(Error::config("cpu_chunk", "must be at least 1"));
        }
        for (out, idx, out_key, idx_key) in [
            (&self.valence_output, &self.valence_index, "valence_output", "valence_index"),
            (&self.arousal_output, &self.arousal_index, "arousal_output", "arousal_index"),
        ] {
            if out.is_none() && idx.is_some() {
                return Err(Error::config(idx_key, format!("is set but `{out_key}` is not")));
            }
            if let Some(o) = out {
                nonempty(out_key, o)?;
            }
        }
        if self.valence_output.is_some() != self.arousal_output.is_some() {
            let missing = if self.valence_output.is_some() { "arousal_output" } else { "valence_output" };
            return Err(Error::config(missing, "valence and arousal must be given together"));
        }
        if let Some(e) = &self.embedding_output {
            nonempty("embedding_output", e)?;
        }
        self.preprocess.validate("preprocess")?;
        Ok(())
    }

    /// The model path, resolved against `base_dir` when relative.
    pub fn model_path(&self, base_dir: &Path) -> PathBuf {
        if self.model.is_absolute() { self.model.clone() } else { base_dir.join(&self.model) }
    }

    /// Bytes describing how outputs are read, for the teacher fingerprint.
    pub(crate) fn interpretation_bytes(&self) -> Vec<u8> {
        let v = serde_json::json!({
            "input": self.input,
            "output": self.output,
            "outputs": self.outputs,
            "classes": self.classes,
            "valence": [self.valence_output, self.valence_index.map(|i| i as u64)],
            "arousal": [self.arousal_output, self.arousal_index.map(|i| i as u64)],
            "embedding": self.embedding_output,
        });
        serde_json::to_vec(&v).expect("json serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
model = "m.onnx"
input = "x"
output = "y"
outputs = "logits"
classes = ["a", "b"]
[preprocess]
size = [8, 8]
"#;

    #[test]
    fn parses_and_resolves_relative_model_paths() {
        let c = OnnxTeacherConfig::from_toml(GOOD, Path::new("t.toml")).unwrap();
        assert_eq!((c.max_batch, c.cpu_chunk), (64, 8));
        assert_eq!(c.outputs, OutputKind::Logits);
        assert_eq!(c.model_path(Path::new("/cfg")), PathBuf::from("/cfg/m.onnx"));
        let mut abs = c.clone();
        abs.model = PathBuf::from("/abs/m.onnx");
        assert_eq!(abs.model_path(Path::new("/cfg")), PathBuf::from("/abs/m.onnx"));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e =
            OnnxTeacherConfig::from_toml(&format!("clases = []\n{GOOD}"), Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("clases"), "{e}");
        let e = OnnxTeacherConfig::from_toml(
            &GOOD.replace("size = [8, 8]", "size = [8, 8]\nsclae = 1.0"),
            Path::new("t"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("sclae"), "{e}");
        let e =
            OnnxTeacherConfig::from_toml(&GOOD.replace("[\"a\", \"b\"]", "[\"a\", \"A\"]"), Path::new("t"))
                .unwrap_err();
        assert!(e.to_string().contains("`classes`"), "{e}");
        let e = OnnxTeacherConfig::from_toml(&format!("valence_output = \"v\"\n{GOOD}"), Path::new("t"))
            .unwrap_err();
        assert!(e.to_string().contains("arousal_output"), "{e}");
        let e = OnnxTeacherConfig::from_toml(&format!("max_batch = 0\n{GOOD}"), Path::new("t")).unwrap_err();
        assert!(e.to_string().contains("max_batch"), "{e}");
        let e = OnnxTeacherConfig::from_toml(&format!("cpu_chunk = 0\n{GOOD}"), Path::new("t")).unwrap_err();
        assert!(e.to_string().contains("cpu_chunk"), "{e}");
        let e = OnnxTeacherConfig::from_toml(
            &GOOD.replace("size = [8, 8]", "size = [8, 8]\nchannels = 2"),
            Path::new("t"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("preprocess.channels"), "{e}");
    }
}
