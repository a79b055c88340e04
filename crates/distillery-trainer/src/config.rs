//! Training configuration: one TOML file, overridable key by key from the command line.
//!
//! Every section uses `deny_unknown_fields`, so a misspelt key is an error rather than a silently
//! ignored setting. `--set key.path=value` overrides are merged into the parsed TOML before it is
//! deserialised; an override of a key that does not exist is rejected naming the key.

use std::path::Path;

use distillery_core::TeacherFingerprint;
use distillery_data::Split;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Everything a training run needs besides the data itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Seeds weight initialisation, data order and label subsampling.
    pub seed: u64,
    pub data: DataConfig,
    pub student: StudentConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub checkpoint: CheckpointConfig,
    pub log: LogConfig,
}

/// Which views of each face a training epoch reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ViewsMode {
    /// Only the plain crop (view 0).
    #[default]
    Plain,
    /// One cached view per face per epoch, drawn with the run's seed.
    Random,
    /// Every cached view is its own training row.
    All,
}

/// Where the faces and teacher outputs come from and how they are batched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// URI of the face dataset (a Lance dataset path).
    pub faces: Option<String>,
    /// URI of the teacher cache; without one the run is plain supervised training.
    pub cache: Option<String>,
    /// Teacher fingerprint to read from the cache; unset means the only teacher in it.
    pub teacher: Option<String>,
    /// Split trained on.
    pub train_split: String,
    /// Split evaluated at the end of the run.
    pub eval_split: String,
    pub views: ViewsMode,
    pub batch_size: usize,
    /// Decoding/preprocessing threads of the data stream.
    pub workers: usize,
    /// Rows held for shuffling.
    pub shuffle_buffer: usize,
    /// Fraction of training faces whose labels are used (chosen by hashing the face id with the
    /// seed); the others contribute only through the teacher terms.
    pub labelled_fraction: f64,
}

/// The student to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudentConfig {
    /// Student spec, e.g. `mobilenetv2:0.5@112`, `resnet18`, `tiny@64`.
    pub spec: String,
    pub num_classes: usize,
}

/// Kind of feature-matching loss between the student's projected embedding and the teacher's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    #[default]
    None,
    Mse,
    Cosine,
}

/// Weights of the distillation objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Weight of the soft (teacher) term in the classification loss; 0 is plain supervised.
    pub alpha: f64,
    /// Softmax temperature of the soft term.
    pub temperature: f64,
    /// Margin `m` of the teacher-bounded regression loss.
    pub margin: f64,
    /// Weight `ν` of the bound term of the regression loss.
    pub nu: f64,
    /// Weight of the valence/arousal regression loss relative to classification.
    pub va_weight: f64,
    pub feature: FeatureKind,
    pub feature_weight: f64,
}

/// AdamW, learning-rate schedule and run length.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate, reached after warm-up.
    pub lr: f64,
    /// Decoupled weight decay, applied to weight matrices/kernels only (not norms or biases).
    pub weight_decay: f64,
    pub warmup_steps: u64,
    /// Learning rate at the end of the cosine decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Passes over the training split.
    pub epochs: usize,
    /// Optimiser steps; when set it decides the run length instead of `epochs`.
    pub steps: Option<u64>,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip: f64,
    pub betas: [f64; 2],
    pub eps: f64,
}

/// When to write checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Checkpoint every this many steps (and always at the end); 0 only at the end.
    pub every_n_steps: u64,
}

/// When to log metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Append a line to `metrics.jsonl` every this many steps (epochs always get one); 0 disables.
    pub every_n_steps: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            faces: None,
            cache: None,
            teacher: None,
            train_split: "train".into(),
            eval_split: "val".into(),
            views: ViewsMode::Plain,
            batch_size: 64,
            workers: 2,
            shuffle_buffer: 4096,
            labelled_fraction: 1.0,
        }
    }
}

impl Default for StudentConfig {
    fn default() -> Self {
        Self { spec: "mobilenetv2:0.5@112".into(), num_classes: 8 }
    }
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            temperature: 4.0,
            margin: 0.1,
            nu: 0.5,
            va_weight: 1.0,
            feature: FeatureKind::None,
            feature_weight: 0.0,
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            weight_decay: 0.05,
            warmup_steps: 100,
            min_lr_ratio: 0.0,
            epochs: 10,
            steps: None,
            grad_clip: 1.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_n_steps: 500 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { every_n_steps: 50 }
    }
}

impl TrainConfig {
    /// Parses TOML text (no overrides) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        Self::from_toml_with_overrides(text, &[])
    }

    /// Parses TOML text, applies `key.path=value` overrides in order, and validates.
    pub fn from_toml_with_overrides(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| Error::config(toml_key(&e), e.message().to_string()))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let cfg: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::config(toml_key(&e), e.message().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a TOML file (none: the defaults), applies overrides and validates. Errors name the file.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
            None => String::new(),
        };
        Self::from_toml_with_overrides(&text, overrides).map_err(|e| match (path, e) {
            (Some(p), Error::Config { key, reason }) => {
                Error::Config { key, reason: format!("{reason} (in {})", p.display()) }
            }
            (_, e) => e,
        })
    }

    /// The configuration as TOML text (what a run directory stores).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Fingerprint named by `data.teacher`, parsed.
    pub fn teacher_fingerprint(&self) -> Result<Option<TeacherFingerprint>> {
        self.data
            .teacher
            .as_deref()
            .map(|s| TeacherFingerprint::parse(s).map_err(|e| Error::config("data.teacher", e.to_string())))
            .transpose()
    }

    /// Checks value ranges; errors name the dotted key.
    pub fn validate(&self) -> Result<()> {
        let d = &self.data;
        for (key, split) in [("data.train_split", &d.train_split), ("data.eval_split", &d.eval_split)] {
            if Split::parse(split).is_none() {
                return Err(Error::config(key, format!("`{split}` is not one of train, val, test")));
            }
        }
        if d.batch_size == 0 {
            return Err(Error::config("data.batch_size", "must be at least 1"));
        }
        if d.shuffle_buffer == 0 {
            return Err(Error::config("data.shuffle_buffer", "must be at least 1"));
        }
        if !(d.labelled_fraction > 0.0 && d.labelled_fraction <= 1.0) {
            return Err(Error::config(
                "data.labelled_fraction",
                format!("{} is not in (0, 1]", d.labelled_fraction),
            ));
        }
        self.teacher_fingerprint()?;
        for (key, v) in [("data.faces", &d.faces), ("data.cache", &d.cache)] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(Error::config(key, "is empty"));
            }
        }
        if self.student.spec.trim().is_empty() {
            return Err(Error::config("student.spec", "is empty"));
        }
        if self.student.num_classes < 2 {
            return Err(Error::config("student.num_classes", "must be at least 2"));
        }
        let l = &self.loss;
        if !(0.0..=1.0).contains(&l.alpha) {
            return Err(Error::config("loss.alpha", format!("{} is not in [0, 1]", l.alpha)));
        }
        if !(l.temperature.is_finite() && l.temperature > 0.0) {
            return Err(Error::config("loss.temperature", "must be finite and > 0"));
        }
        for (key, v) in [
            ("loss.margin", l.margin),
            ("loss.nu", l.nu),
            ("loss.va_weight", l.va_weight),
            ("loss.feature_weight", l.feature_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(key, format!("{v} must be finite and >= 0")));
            }
        }
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(Error::config("optim.lr", format!("{} must be finite and > 0", o.lr)));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(Error::config("optim.weight_decay", "must be finite and >= 0"));
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            return Err(Error::config("optim.min_lr_ratio", "must be in [0, 1]"));
        }
        if o.steps.is_none() && o.epochs == 0 {
            return Err(Error::config("optim.epochs", "must be at least 1 (or set optim.steps)"));
        }
        if o.steps == Some(0) {
            return Err(Error::config("optim.steps", "must be at least 1"));
        }
        if !(o.grad_clip.is_finite() && o.grad_clip >= 0.0) {
            return Err(Error::config("optim.grad_clip", "must be finite and >= 0 (0 disables)"));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(Error::config(format!("optim.betas[{i}]"), format!("{b} is not in [0, 1)")));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(Error::config("optim.eps", "must be finite and > 0"));
        }
        Ok(())
    }

    /// A configuration with every optional field set, so that its serialisation lists every key.
    fn every_key() -> Self {
        let mut c = Self::default();
        c.data.faces = Some(String::new());
        c.data.cache = Some(String::new());
        c.data.teacher = Some(String::new());
        c.optim.steps = Some(0);
        c
    }

    /// Every settable dotted key with an example value of its type.
    pub fn known_keys() -> Vec<(String, toml::Value)> {
        let v = toml::Value::try_from(Self::every_key()).expect("config serialises");
        let mut out = Vec::new();
        flatten("", &v, &mut out);
        out
    }
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        _ => out.push((prefix.to_string(), v.clone())),
    }
}

/// Best key name for a TOML/serde error: the unknown field if there is one, else the span-less
/// message's first backticked word, else `config`.
fn toml_key(e: &toml::de::Error) -> String {
    let msg = e.message();
    msg.split('`').nth(1).map(str::to_string).unwrap_or_else(|| "config".into())
}

/// Applies one `key.path=value` override to a parsed TOML table.
///
/// The value is read as a TOML value when it parses as one (numbers, booleans, arrays, quoted
/// strings) and as a bare string otherwise; it is then converted to the key's type where that is
/// unambiguous (an integer for a float key, anything for a string key).
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| Error::config(assignment, "override must look like key.path=value"))?;
    let key = key.trim();
    let raw = raw.trim();
    let known = TrainConfig::known_keys();
    let Some((_, example)) = known.iter().find(|(k, _)| k == key) else {
        let section = key.split('.').next().unwrap_or(key);
        let hint: Vec<&str> =
            known.iter().map(|(k, _)| k.as_str()).filter(|k| k.starts_with(&format!("{section}."))).collect();
        let reason = if hint.is_empty() {
            "unknown key".to_string()
        } else {
            format!("unknown key (known in `{section}`: {})", hint.join(", "))
        };
        return Err(Error::config(key, reason));
    };
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}")).ok().and_then(|mut t| t.remove("v"));
    let value = match (example, parsed) {
        (toml::Value::String(_), Some(toml::Value::String(s))) => toml::Value::String(s),
        (toml::Value::String(_), _) => toml::Value::String(raw.to_string()),
        (toml::Value::Float(_), Some(toml::Value::Integer(i))) => toml::Value::Float(i as f64),
        (toml::Value::Array(_), Some(toml::Value::Array(a))) => toml::Value::Array(
            a.into_iter()
                .map(|x| if let toml::Value::Integer(i) = x { toml::Value::Float(i as f64) } else { x })
                .collect(),
        ),
        (_, Some(v)) => v,
        (_, None) => return Err(Error::config(key, format!("`{raw}` is not a valid value"))),
    };
    if std::mem::discriminant(&value) != std::mem::discriminant(example) {
        return Err(Error::config(
            key,
            format!("`{raw}` has the wrong type (expected {})", example.type_str()),
        ));
    }
    let parts: Vec<&str> = key.split('.').collect();
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        let entry = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| Error::config(*p, "is not a table"))?;
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_validate_and_round_trip() {
        let c = TrainConfig::from_toml_str("").unwrap();
        assert_eq!(c, TrainConfig::default());
        let back = TrainConfig::from_toml_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = TrainConfig::from_toml_str("[optim]\nlr = 0.1\nlearning_rate = 2\n").unwrap_err().to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = TrainConfig::from_toml_str("[dat]\nbatch_size = 2\n").unwrap_err().to_string();
        assert!(e.contains("dat"), "{e}");
    }

    #[test]
    fn validate_names_the_bad_key() {
        let e = TrainConfig::from_toml_str("[loss]\nalpha = 1.5\n").unwrap_err().to_string();
        assert!(e.contains("loss.alpha"), "{e}");
        let e = TrainConfig::from_toml_str("[optim]\nbetas = [0.9, 1.0]\n").unwrap_err().to_string();
        assert!(e.contains("optim.betas[1]"), "{e}");
        let e = TrainConfig::from_toml_str("[data]\nteacher = \"xyz\"\n").unwrap_err().to_string();
        assert!(e.contains("data.teacher"), "{e}");
        let e = TrainConfig::from_toml_str("[data]\ntrain_split = \"dev\"\n").unwrap_err().to_string();
        assert!(e.contains("data.train_split"), "{e}");
    }

    #[test]
    fn overrides_merge_with_types() {
        let c = TrainConfig::from_toml_with_overrides(
            "[optim]\nlr = 0.1\n",
            &set(&[
                "optim.lr=2e-3",
                "optim.weight_decay=0",
                "optim.steps=40",
                "student.spec=tiny@64",
                "data.cache=/tmp/cache.lance",
                "loss.feature=cosine",
                "optim.betas=[0.8, 0.99]",
                "seed=7",
            ]),
        )
        .unwrap();
        assert_eq!(c.optim.lr, 2e-3);
        assert_eq!(c.optim.weight_decay, 0.0);
        assert_eq!(c.optim.steps, Some(40));
        assert_eq!(c.student.spec, "tiny@64");
        assert_eq!(c.data.cache.as_deref(), Some("/tmp/cache.lance"));
        assert_eq!(c.loss.feature, FeatureKind::Cosine);
        assert_eq!(c.optim.betas, [0.8, 0.99]);
        assert_eq!(c.seed, 7);
    }

    #[test]
    fn bad_overrides_are_named() {
        let e = TrainConfig::from_toml_with_overrides("", &set(&["optim.lrr=1"])).unwrap_err().to_string();
        assert!(e.contains("optim.lrr") && e.contains("optim.lr"), "{e}");
        let e = TrainConfig::from_toml_with_overrides("", &set(&["optim.lr"])).unwrap_err().to_string();
        assert!(e.contains("key.path=value"), "{e}");
        let e =
            TrainConfig::from_toml_with_overrides("", &set(&["optim.epochs=many"])).unwrap_err().to_string();
        assert!(e.contains("optim.epochs"), "{e}");
        let e = TrainConfig::from_toml_with_overrides("", &set(&["loss.alpha=2"])).unwrap_err().to_string();
        assert!(e.contains("loss.alpha"), "{e}");
        let e =
            TrainConfig::from_toml_with_overrides("", &set(&["loss.feature=l7"])).unwrap_err().to_string();
        assert!(e.contains("l7"), "{e}");
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/train");
        for name in ["default.toml", "quick.toml", "supervised.toml"] {
            let c = TrainConfig::load(Some(&dir.join(name)), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            if name == "supervised.toml" {
                assert_eq!(c.loss.alpha, 0.0);
            }
        }
    }
}
