//! The student zoo behind one trait, plus saving, loading, and using a trained student as a teacher.
//!
//! A student maps a `[n, 3, s, s]` image batch (preprocessed by [`StudentSpec::preprocess`]) to
//! expression logits, bounded valence/arousal, its penultimate embedding and, optionally, that
//! embedding projected to a teacher's embedding width for feature distillation.
//!
//! On disk a student is a directory with `student.json` (the [`StudentSpec`]) and
//! `model.safetensors` (every variable of its `VarMap`, batch-norm running statistics included).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use distillery_core::{ClassSet, Preprocess, TeacherFingerprint};

use crate::nn::{Dropout, Linear};
use crate::students::{mobilenetv2::MobileNetV2, resnet::ResNet18, tiny::TinyCnn};
use crate::teacher::{Teacher, TeacherInfo, TeacherOutput};

/// The student architectures.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum StudentArch {
    /// MobileNetV2 (Sandler et al. 2018) with a width multiplier; channels round to multiples of 8.
    MobileNetV2 { width: f32 },
    /// ResNet-18 (He et al. 2016).
    ResNet18,
    /// A four-block conv–BN–ReLU–pool network for fast tests; input side a multiple of 16.
    TinyCnn,
}

/// What to build: architecture, number of expression classes, input side and optional projection.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StudentSpec {
    pub arch: StudentArch,
    pub num_classes: usize,
    /// Side of the square input in pixels.
    pub input_size: usize,
    /// Width of a linear projection of the embedding (to a teacher's embedding width), if any.
    pub embed_proj: Option<usize>,
}

/// Default input side per architecture when a spec string gives none.
fn default_size(arch: &StudentArch) -> usize {
    match arch {
        StudentArch::MobileNetV2 { .. } | StudentArch::ResNet18 => 224,
        StudentArch::TinyCnn => 64,
    }
}

impl StudentSpec {
    /// Parses `name[:width][@size]`: `mobilenetv2`, `mobilenetv2:0.5@112`, `resnet18@224`,
    /// `tiny@64`. The width multiplier applies to MobileNetV2 only. Default sides: 224 for
    /// MobileNetV2 and ResNet-18, 64 for the tiny CNN.
    pub fn parse(s: &str, num_classes: usize) -> distillery_core::Result<Self> {
        let bad = |reason: String| distillery_core::Error::config("student", format!("`{s}`: {reason}"));
        let (head, size) = match s.trim().split_once('@') {
            Some((h, z)) => {
                let z: usize =
                    z.trim().parse().map_err(|_| bad(format!("input size `{z}` is not an integer")))?;
                (h.trim(), Some(z))
            }
            None => (s.trim(), None),
        };
        let (name, width) = match head.split_once(':') {
            Some((n, w)) => {
                let w: f32 = w.trim().parse().map_err(|_| bad(format!("width `{w}` is not a number")))?;
                (n.trim(), Some(w))
            }
            None => (head, None),
        };
        let arch = match name.to_ascii_lowercase().as_str() {
            "mobilenetv2" | "mobilenet_v2" | "mbv2" => {
                StudentArch::MobileNetV2 { width: width.unwrap_or(1.0) }
            }
            "resnet18" | "resnet-18" => StudentArch::ResNet18,
            "tiny" | "tinycnn" => StudentArch::TinyCnn,
            other => {
                return Err(bad(format!("unknown architecture `{other}` (mobilenetv2, resnet18, tiny)")));
            }
        };
        if width.is_some() && !matches!(arch, StudentArch::MobileNetV2 { .. }) {
            return Err(bad("a width multiplier applies to mobilenetv2 only".into()));
        }
        let input_size = size.unwrap_or_else(|| default_size(&arch));
        let spec = Self { arch, num_classes, input_size, embed_proj: None };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the spec; errors name the offending field.
    pub fn validate(&self) -> distillery_core::Result<()> {
        use distillery_core::Error;
        if self.num_classes == 0 {
            return Err(Error::config("student.num_classes", "must be at least 1"));
        }
        if self.embed_proj == Some(0) {
            return Err(Error::config("student.embed_proj", "must be at least 1 when given"));
        }
        if !(16..=1024).contains(&self.input_size) {
            return Err(Error::config(
                "student.input_size",
                format!("{} is not in 16..=1024", self.input_size),
            ));
        }
        match self.arch {
            StudentArch::MobileNetV2 { width } if !(width > 0.0 && width <= 4.0) => {
                Err(Error::config("student.arch.width", format!("{width} is not in (0, 4]")))
            }
            StudentArch::TinyCnn if !self.input_size.is_multiple_of(16) => Err(Error::config(
                "student.input_size",
                format!("{} must be a multiple of 16 for the tiny CNN (four 2×2 pools)", self.input_size),
            )),
            _ => Ok(()),
        }
    }

    /// The preprocessing students are trained with: RGB at `input_size`², values in [0, 1].
    pub fn preprocess(&self) -> Preprocess {
        Preprocess::unit_rgb(self.input_size)
    }

    /// Short name, e.g. `mobilenetv2:0.5@112`.
    pub fn name(&self) -> String {
        match self.arch {
            StudentArch::MobileNetV2 { width } => format!("mobilenetv2:{width}@{}", self.input_size),
            StudentArch::ResNet18 => format!("resnet18@{}", self.input_size),
            StudentArch::TinyCnn => format!("tiny@{}", self.input_size),
        }
    }
}

/// A student's outputs for a batch of `n` images.
#[derive(Clone, Debug)]
pub struct StudentOutput {
    /// `[n, num_classes]` expression logits.
    pub logits: Tensor,
    /// `[n, 2]` valence and arousal, tanh-bounded to [−1, 1].
    pub va: Tensor,
    /// `[n, D]` penultimate (pooled) features.
    pub embedding: Tensor,
    /// `[n, P]` embedding through the projection, when the spec asks for one.
    pub projected: Option<Tensor>,
}

/// A trainable student network.
pub trait Student: Send + Sync {
    fn spec(&self) -> &StudentSpec;
    /// Runs the network on `x [n, 3, s, s]`; `train` selects batch statistics and dropout.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<StudentOutput>;
}

/// The heads shared by every architecture, on top of a `D`-wide embedding.
#[derive(Clone, Debug)]
pub(crate) struct Heads {
    dropout: Dropout,
    expr: Linear,
    va: Linear,
    proj: Option<Linear>,
}

impl Heads {
    pub(crate) fn new(
        spec: &StudentSpec,
        d: usize,
        dropout: f32,
        vb: VarBuilder<'_>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            dropout: Dropout::new(dropout),
            expr: Linear::new(d, spec.num_classes, vb.pp("expr"))?,
            va: Linear::new(d, 2, vb.pp("va"))?,
            proj: spec.embed_proj.map(|p| Linear::new(d, p, vb.pp("proj"))).transpose()?,
        })
    }

    pub(crate) fn forward_t(&self, embedding: Tensor, train: bool) -> candle_core::Result<StudentOutput> {
        let dropped = self.dropout.forward_t(&embedding, train)?;
        let logits = self.expr.forward(&dropped)?;
        let va = self.va.forward(&dropped)?.tanh()?;
        let projected = self.proj.as_ref().map(|p| p.forward(&embedding)).transpose()?;
        Ok(StudentOutput { logits, va, embedding, projected })
    }
}

/// Checks that `x` is `[n, 3, s, s]` with `s` the spec's input size.
pub(crate) fn check_input(spec: &StudentSpec, x: &Tensor) -> candle_core::Result<()> {
    let s = spec.input_size;
    match x.dims() {
        [_, 3, h, w] if *h == s && *w == s => Ok(()),
        d => candle_core::bail!("student {}: input must be [n, 3, {s}, {s}], got {d:?}", spec.name()),
    }
}

/// Builds the student described by `spec`; its variables come from (or are created in) `vb`.
pub fn build_student(spec: &StudentSpec, vb: VarBuilder<'_>) -> candle_core::Result<Box<dyn Student>> {
    spec.validate().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(match spec.arch {
        StudentArch::MobileNetV2 { width } => Box::new(MobileNetV2::new(spec.clone(), width, vb)?),
        StudentArch::ResNet18 => Box::new(ResNet18::new(spec.clone(), vb)?),
        StudentArch::TinyCnn => Box::new(TinyCnn::new(spec.clone(), vb)?),
    })
}

/// True for batch-norm running statistics: stored and loaded, but not trained.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// The variables an optimiser should update (everything but batch-norm running statistics).
pub fn trainable_vars(varmap: &VarMap) -> Vec<Var> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut named: Vec<(&String, &Var)> = data.iter().filter(|(k, _)| !is_running_stat(k)).collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v.clone()).collect()
}

/// Number of trainable scalars.
pub fn parameter_count(varmap: &VarMap) -> u64 {
    trainable_vars(varmap).iter().map(|v| v.elem_count() as u64).sum()
}

/// Errors saving or loading a student directory.
#[derive(Debug, thiserror::Error)]
pub enum StudentError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid student spec: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Spec(#[from] distillery_core::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

const SPEC_FILE: &str = "student.json";
const WEIGHTS_FILE: &str = "model.safetensors";

/// Writes `dir/student.json` and `dir/model.safetensors` (all variables, running stats included).
pub fn save_student(dir: &Path, spec: &StudentSpec, varmap: &VarMap) -> Result<(), StudentError> {
    std::fs::create_dir_all(dir).map_err(|source| StudentError::Io { path: dir.to_owned(), source })?;
    let spec_path = dir.join(SPEC_FILE);
    let json = serde_json::to_vec_pretty(spec)
        .map_err(|source| StudentError::Json { path: spec_path.clone(), source })?;
    std::fs::write(&spec_path, json).map_err(|source| StudentError::Io { path: spec_path, source })?;
    let weights = dir.join(WEIGHTS_FILE);
    varmap.save(&weights).map_err(|e| StudentError::Invalid { path: weights, reason: e.to_string() })
}

/// A student directory read into memory: its spec, raw weight bytes and the built model.
struct LoadedStudent {
    spec: StudentSpec,
    spec_json: Vec<u8>,
    weight_bytes: Vec<u8>,
    varmap: VarMap,
    model: Box<dyn Student>,
}

fn read_student(dir: &Path, device: &Device) -> Result<LoadedStudent, StudentError> {
    let spec_path = dir.join(SPEC_FILE);
    let spec_json =
        std::fs::read(&spec_path).map_err(|source| StudentError::Io { path: spec_path.clone(), source })?;
    let spec: StudentSpec = serde_json::from_slice(&spec_json)
        .map_err(|source| StudentError::Json { path: spec_path, source })?;
    spec.validate()?;
    let weights = dir.join(WEIGHTS_FILE);
    let weight_bytes =
        std::fs::read(&weights).map_err(|source| StudentError::Io { path: weights.clone(), source })?;
    let tensors = candle_core::safetensors::load_buffer(&weight_bytes, device)
        .map_err(|e| StudentError::Invalid { path: weights.clone(), reason: e.to_string() })?;
    let varmap = VarMap::new();
    let model = build_student(&spec, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    {
        let data = varmap.data().lock().expect("varmap lock");
        for (name, var) in data.iter() {
            let t = tensors.get(name).ok_or_else(|| StudentError::Invalid {
                path: weights.clone(),
                reason: format!("missing tensor `{name}` for {}", spec.name()),
            })?;
            if t.shape() != var.shape() {
                return Err(StudentError::Invalid {
                    path: weights.clone(),
                    reason: format!(
                        "tensor `{name}` has shape {:?}, model expects {:?}",
                        t.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
    }
    Ok(LoadedStudent { spec, spec_json, weight_bytes, varmap, model })
}

/// Loads a student saved by [`save_student`] onto `device`.
pub fn load_student(
    dir: &Path,
    device: &Device,
) -> Result<(StudentSpec, VarMap, Box<dyn Student>), StudentError> {
    let l = read_student(dir, device)?;
    Ok((l.spec, l.varmap, l.model))
}

/// A trained student used as a teacher (eval mode). Its fingerprint is BLAKE3 of the weight
/// file's bytes, the spec JSON and the preprocessing, so retraining yields a new identity.
pub struct StudentTeacher {
    info: TeacherInfo,
    device: Device,
    model: Box<dyn Student>,
}

impl StudentTeacher {
    /// Loads the student in `dir`; `classes` names its logits and must have `num_classes` entries.
    pub fn load(dir: &Path, classes: ClassSet, device: &Device) -> Result<Self, StudentError> {
        let l = read_student(dir, device)?;
        if classes.len() != l.spec.num_classes {
            return Err(StudentError::Invalid {
                path: dir.join(SPEC_FILE),
                reason: format!(
                    "num_classes is {} but {} class names were given",
                    l.spec.num_classes,
                    classes.len()
                ),
            });
        }
        let preprocess = l.spec.preprocess();
        let mut h = blake3::Hasher::new();
        h.update(b"distillery.student-teacher.v1\0");
        for part in [&l.weight_bytes, &l.spec_json, &preprocess.fingerprint_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        // The embedding width is the pooled feature width; probe it with one tiny forward.
        let probe = Tensor::zeros((1, 3, l.spec.input_size, l.spec.input_size), DType::F32, device)?;
        let d = l.model.forward_t(&probe, false)?.embedding.dim(1)?;
        let info = TeacherInfo {
            name: format!("student:{}", l.spec.name()),
            classes,
            preprocess,
            has_valence_arousal: true,
            embedding_dim: Some(d),
            has_landmarks: false,
            max_batch: 64,
            fingerprint: TeacherFingerprint::from_hasher(&h),
        };
        Ok(Self { info, device: device.clone(), model: l.model })
    }

    pub fn spec(&self) -> &StudentSpec {
        self.model.spec()
    }
}

impl Teacher for StudentTeacher {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<TeacherOutput> {
        let out = self.model.forward_t(x, false)?;
        Ok(TeacherOutput {
            logits: out.logits,
            valence: Some(out.va.narrow(1, 0, 1)?.squeeze(1)?),
            arousal: Some(out.va.narrow(1, 1, 1)?.squeeze(1)?),
            embedding: Some(out.embedding),
            landmarks: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features and all gradients of MobileNetV2 in training mode, as f64 on the host: the
    /// gradient of `sum(features²)` (features come before the heads' dropout).
    fn features_and_grads(
        vars: &VarMap,
        dtype: DType,
        x: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<(String, Tensor)>)> {
        let spec = StudentSpec::parse("mobilenetv2:1.0@64", 8)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let model = build_student(&spec, VarBuilder::from_varmap(vars, dtype, &Device::Cpu))?;
        let features = model.forward_t(&x.to_dtype(dtype)?, true)?.embedding;
        let grads = features.sqr()?.sum_all()?.backward()?;
        let data = vars.data().lock().expect("varmap lock");
        let mut named = Vec::new();
        for (k, v) in data.iter() {
            if let Some(g) = grads.get(v) {
                named.push((k.clone(), g.to_dtype(DType::F64)?));
            }
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((features.to_dtype(DType::F64)?, named))
    }

    /// The portable layer paths (what GPUs run: composed depthwise convolution, batch norm and
    /// ReLU6, candle's convolution) compute what the CPU kernels compute: in f64, the same
    /// features and every gradient of MobileNetV2 in training mode; in f32, the same features.
    /// (f32 gradients are not compared one by one: a few nearly cancel — a batch norm's shift
    /// whose output reaches the loss through another batch norm in training mode — and two f32
    /// summation orders can differ there by percents. The kernels accumulate in f64.)
    #[test]
    fn portable_layers_train_like_the_cpu_kernels() -> candle_core::Result<()> {
        let f32_vars = VarMap::new();
        let x = Tensor::rand(0f32, 1., (4, 3, 64, 64), &Device::Cpu)?;
        let fast32 = features_and_grads(&f32_vars, DType::F32, &x)?;
        let port32 = crate::nn::with_portable_layers(|| features_and_grads(&f32_vars, DType::F32, &x))?;
        let f64_vars = VarMap::new();
        for (name, var) in f32_vars.data().lock().expect("varmap lock").iter() {
            let copy = Var::from_tensor(&var.as_tensor().to_dtype(DType::F64)?)?;
            f64_vars.data().lock().expect("varmap lock").insert(name.clone(), copy);
        }
        let fast64 = features_and_grads(&f64_vars, DType::F64, &x)?;
        let port64 = crate::nn::with_portable_layers(|| features_and_grads(&f64_vars, DType::F64, &x))?;
        // Relative L2 error, against at least a millionth of the largest gradient's norm: some
        // gradients are zero up to rounding (every `project_bn.bias`).
        let norm =
            |t: &Tensor| -> candle_core::Result<f64> { t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>() };
        let mut floor = 0f64;
        for (_, g) in &fast64.1 {
            floor = floor.max(norm(g)? * 1e-6);
        }
        let err = |a: &Tensor, r: &Tensor| -> candle_core::Result<f64> {
            Ok(norm(&(a - r)?)? / norm(r)?.max(floor))
        };
        let names = |g: &[(String, Tensor)]| g.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert!(fast64.1.len() > 100, "{} gradients", fast64.1.len());
        for other in [&fast32, &port32, &port64] {
            assert_eq!(names(&other.1), names(&fast64.1));
        }
        let e = err(&port64.0, &fast64.0)?;
        assert!(e < 1e-10, "features differ in f64 by {e:.1e}");
        for ((name, p), (_, f)) in port64.1.iter().zip(&fast64.1) {
            let e = err(p, f)?;
            assert!(e < 1e-8, "{name}: portable and kernel gradients differ in f64 by {e:.1e}");
        }
        let e = err(&port32.0, &fast32.0)?;
        assert!(e < 1e-4, "features differ in f32 by {e:.1e}");
        Ok(())
    }

    #[test]
    fn parse_specs() {
        let s = StudentSpec::parse("mobilenetv2:0.5@112", 8).unwrap();
        assert_eq!(s.arch, StudentArch::MobileNetV2 { width: 0.5 });
        assert_eq!((s.num_classes, s.input_size, s.embed_proj), (8, 112, None));
        assert_eq!(
            StudentSpec::parse("mobilenetv2", 5).unwrap().arch,
            StudentArch::MobileNetV2 { width: 1.0 }
        );
        assert_eq!(StudentSpec::parse("mobilenetv2", 5).unwrap().input_size, 224);
        assert_eq!(StudentSpec::parse("resnet18@224", 8).unwrap().arch, StudentArch::ResNet18);
        let t = StudentSpec::parse("tiny@64", 8).unwrap();
        assert_eq!((&t.arch, t.input_size), (&StudentArch::TinyCnn, 64));
        assert_eq!(t.preprocess(), Preprocess::unit_rgb(64));
        for (bad, needle) in [
            ("vgg16", "unknown architecture"),
            ("tiny@60", "multiple of 16"),
            ("resnet18:0.5", "width multiplier"),
            ("mobilenetv2:abc", "width `abc`"),
            ("mobilenetv2:0", "student.arch.width"),
            ("tiny@x", "input size `x`"),
        ] {
            let e = StudentSpec::parse(bad, 8).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        assert!(StudentSpec::parse("tiny", 0).unwrap_err().to_string().contains("num_classes"));
    }

    fn build(spec: &StudentSpec) -> (VarMap, Box<dyn Student>) {
        let vm = VarMap::new();
        let m = build_student(spec, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        (vm, m)
    }

    fn spec(arch: StudentArch, num_classes: usize, input_size: usize) -> StudentSpec {
        StudentSpec { arch, num_classes, input_size, embed_proj: None }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// MACs of a full eval forward of one image, minus the expression and VA heads.
    fn backbone_macs(spec: &StudentSpec, model: &dyn Student, d: usize) -> u64 {
        let x = Tensor::zeros((1, 3, spec.input_size, spec.input_size), DType::F32, &Device::Cpu).unwrap();
        let (out, macs) = crate::cost::count(|| model.forward_t(&x, false).unwrap());
        assert_eq!(out.embedding.dims(), [1, d]);
        macs - (d * (spec.num_classes + 2)) as u64
    }

    #[test]
    fn mobilenetv2_cost_matches_the_paper() {
        let s = spec(StudentArch::MobileNetV2 { width: 1.0 }, 1000, 224);
        let (vm, m) = build(&s);
        // Reference MobileNetV2 1.0× with a 1000-class classifier: 3 504 872 parameters; our VA
        // head adds Linear(1280 → 2).
        assert_eq!(parameter_count(&vm), 3_504_872 + 1280 * 2 + 2);
        let macs = backbone_macs(&s, m.as_ref(), 1280) + 1280 * 1000;
        assert!((290_000_000..320_000_000).contains(&macs), "{macs} MACs");
    }

    #[test]
    fn resnet18_cost_matches_the_paper() {
        let s = spec(StudentArch::ResNet18, 1000, 224);
        let (vm, m) = build(&s);
        assert_eq!(parameter_count(&vm), 11_689_512 + 512 * 2 + 2);
        let macs = backbone_macs(&s, m.as_ref(), 512) + 512 * 1000;
        assert!((1_780_000_000..1_860_000_000).contains(&macs), "{macs} MACs");
    }

    #[test]
    fn tiny_cost_and_shapes() {
        let mut s = spec(StudentArch::TinyCnn, 8, 64);
        s.embed_proj = Some(16);
        let (_, m) = build(&s);
        assert_eq!(
            backbone_macs(&s, m.as_ref(), 64) - 64 * 16,
            64 * 64 * 8 * 27 + 32 * 32 * 16 * 72 + 16 * 16 * 32 * 144 + 8 * 8 * 64 * 288
        );
        let x = Tensor::rand(0f32, 1., (3, 3, 64, 64), &Device::Cpu).unwrap();
        let out = m.forward_t(&x, false).unwrap();
        assert_eq!(out.logits.dims(), [3, 8]);
        assert_eq!(out.va.dims(), [3, 2]);
        assert_eq!(out.projected.as_ref().unwrap().dims(), [3, 16]);
        let va = out.va.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(va.iter().all(|v| v.abs() <= 1.0));
        let e = m.forward_t(&Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap(), false);
        assert!(e.err().unwrap().to_string().contains("[n, 3, 64, 64]"));
    }

    #[test]
    fn every_trainable_var_gets_a_gradient() {
        for s in [spec(StudentArch::MobileNetV2 { width: 0.35 }, 4, 32), spec(StudentArch::TinyCnn, 4, 32)] {
            let (vm, m) = build(&StudentSpec { embed_proj: Some(8), ..s });
            let x = Tensor::rand(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
            let out = m.forward_t(&x, true).unwrap();
            let loss = (out.logits.sum_all().unwrap()
                + out.va.sum_all().unwrap()
                + out.projected.unwrap().sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let data = vm.data().lock().unwrap();
            for (name, var) in data.iter() {
                assert_eq!(grads.get(var.as_tensor()).is_some(), !is_running_stat(name), "{name}");
            }
        }
    }

    #[test]
    fn batchnorm_modes_differ_and_save_load_roundtrips() {
        let s = StudentSpec { embed_proj: Some(4), ..spec(StudentArch::TinyCnn, 3, 32) };
        let (vm, m) = build(&s);
        let x = Tensor::rand(0f32, 1., (4, 3, 32, 32), &Device::Cpu).unwrap();
        // One train pass moves the running statistics away from their initial 0/1.
        let train = m.forward_t(&x, true).unwrap();
        let eval = m.forward_t(&x, false).unwrap();
        assert!(max_diff(&train.embedding, &eval.embedding) > 1e-3, "train and eval should differ");
        let dir = tempfile::tempdir().unwrap();
        save_student(dir.path(), &s, &vm).unwrap();
        let (s2, vm2, m2) = load_student(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(s2, s);
        let names = |v: &VarMap| {
            let mut k: Vec<String> = v.data().lock().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(names(&vm), names(&vm2));
        assert!(names(&vm2).iter().any(|k| k.ends_with("running_var")));
        let again = m2.forward_t(&x, false).unwrap();
        assert_eq!(max_diff(&eval.logits, &again.logits), 0.0);
        assert_eq!(max_diff(&eval.va, &again.va), 0.0);
        assert_eq!(max_diff(eval.projected.as_ref().unwrap(), again.projected.as_ref().unwrap()), 0.0);

        // The same directory as a teacher: eval outputs, stable fingerprint, errors on bad input.
        let t = StudentTeacher::load(dir.path(), ClassSet::new(["a", "b", "c"]), &Device::Cpu).unwrap();
        assert_eq!(t.info().embedding_dim, Some(64));
        assert_eq!(t.info().preprocess, Preprocess::unit_rgb(32));
        let o = t.forward(&x).unwrap();
        assert_eq!(max_diff(&o.logits, &eval.logits), 0.0);
        assert_eq!(o.valence.unwrap().dims(), [4]);
        let t2 = StudentTeacher::load(dir.path(), ClassSet::new(["a", "b", "c"]), &Device::Cpu).unwrap();
        assert_eq!(t.info().fingerprint, t2.info().fingerprint);
        m.forward_t(&x, true).unwrap(); // running stats change → new weights → new fingerprint
        save_student(dir.path(), &s, &vm).unwrap();
        let t3 = StudentTeacher::load(dir.path(), ClassSet::new(["a", "b", "c"]), &Device::Cpu).unwrap();
        assert_ne!(t.info().fingerprint, t3.info().fingerprint);
        let e =
            StudentTeacher::load(dir.path(), ClassSet::emonet8(), &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("num_classes is 3"), "{e}");
        std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
        let e = load_student(dir.path(), &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
    }

    #[test]
    fn tiny_overfits_eight_images() {
        use candle_nn::{AdamW, Optimizer, ParamsAdamW};
        let dev = Device::Cpu;
        let s = spec(StudentArch::TinyCnn, 4, 32);
        let (vm, m) = build(&s);
        let x = Tensor::rand(0f32, 1., (8, 3, 32, 32), &dev).unwrap();
        let labels = Tensor::new(&[0u32, 1, 2, 3, 0, 1, 2, 3], &dev).unwrap();
        let mask = Tensor::ones(8, DType::F32, &dev).unwrap();
        let va = (Tensor::rand(0f32, 1., (8, 2), &dev).unwrap() - 0.5).unwrap();
        let params = ParamsAdamW { lr: 1e-2, weight_decay: 0.0, ..Default::default() };
        let mut opt = AdamW::new(trainable_vars(&vm), params).unwrap();
        let mut first = None;
        let mut last = 0.0;
        for _ in 0..50 {
            let out = m.forward_t(&x, true).unwrap();
            let ce = crate::losses::kd_loss(&out.logits, None, &labels, &mask, 0.0, 1.0).unwrap().total;
            let reg = crate::losses::bounded_regression(&out.va, None, &va, &mask, 0.0, 0.0).unwrap().total;
            let loss = (ce + reg).unwrap();
            last = loss.to_scalar::<f32>().unwrap();
            first.get_or_insert(last);
            opt.backward_step(&loss).unwrap();
        }
        let first = first.unwrap();
        assert!(last < 0.1 && last < first / 10.0, "loss {first} → {last}");
    }
}
