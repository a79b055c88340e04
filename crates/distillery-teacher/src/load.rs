//! Turning a teacher name on the command line (or in a job) into a loaded [`Teacher`].
//!
//! A spec is one of:
//! - `emonet-8` / `emonet-5`, optionally `emonet-8:PATH` with the weights file;
//! - a path to an ONNX teacher description (`*.toml`);
//! - a student run directory (it contains `student.json`), to use a trained student as a teacher;
//! - `tiny` or `tiny:SEED[:SIDE]`, the weight-free deterministic teacher of [`crate::tiny`].
//!
//! Devices are named `cpu` (the default), `cuda` or `cuda:N`; CUDA needs the crate's `cuda` feature.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::Device;
use distillery_core::ClassSet;
use distillery_models::device::DeviceName;
use distillery_models::emonet::{EmoNet, EmoNetVariant};
use distillery_models::onnx::OnnxTeacher;
use distillery_models::student::{StudentSpec, StudentTeacher};
use distillery_models::teacher::Teacher;

use crate::error::{Error, Result};
use crate::tiny::TinyTeacher;

/// A parsed teacher spec; see the module docs for the accepted forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TeacherSpec {
    /// EmoNet with 8 or 5 classes; `weights` is the weights file, when given.
    Emonet { classes: u8, weights: Option<PathBuf> },
    /// An ONNX teacher described by a TOML file.
    Onnx(PathBuf),
    /// A trained student's run directory.
    Student(PathBuf),
    /// The deterministic test teacher with its seed and input side.
    Tiny { seed: u64, side: usize },
}

impl TeacherSpec {
    /// Parses `s`; errors name the spec and say which forms are accepted.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = |why: &str| Error::config("teacher", format!("`{s}`: {why}"));
        if s.is_empty() {
            return Err(bad("empty teacher spec"));
        }
        for (name, classes) in [("emonet-8", 8u8), ("emonet-5", 5u8)] {
            if s == name {
                return Ok(TeacherSpec::Emonet { classes, weights: None });
            }
            if let Some(path) = s.strip_prefix(name).and_then(|r| r.strip_prefix(':')) {
                if path.is_empty() {
                    return Err(bad("missing weights path after `:`"));
                }
                return Ok(TeacherSpec::Emonet { classes, weights: Some(PathBuf::from(path)) });
            }
        }
        if s == "tiny" || s.starts_with("tiny:") {
            let mut parts = s.split(':').skip(1);
            let seed = match parts.next() {
                Some(p) => p.parse::<u64>().map_err(|_| bad("tiny seed must be an unsigned integer"))?,
                None => 0,
            };
            let side = match parts.next() {
                Some(p) => p
                    .parse::<usize>()
                    .ok()
                    .filter(|v| (2..=512).contains(v))
                    .ok_or_else(|| bad("tiny side must be in 2..=512"))?,
                None => 16,
            };
            if parts.next().is_some() {
                return Err(bad("expected tiny[:SEED[:SIDE]]"));
            }
            return Ok(TeacherSpec::Tiny { seed, side });
        }
        let path = Path::new(s);
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml")) {
            return Ok(TeacherSpec::Onnx(path.to_path_buf()));
        }
        if path.join("student.json").is_file() {
            return Ok(TeacherSpec::Student(path.to_path_buf()));
        }
        if path.is_dir() {
            return Err(bad("directory has no student.json, so it is not a student run"));
        }
        Err(bad(
            "expected emonet-8[:WEIGHTS], emonet-5[:WEIGHTS], an ONNX teacher .toml, a student run directory, or tiny[:SEED[:SIDE]]",
        ))
    }
}

impl FromStr for TeacherSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TeacherSpec::parse(s)
    }
}

impl fmt::Display for TeacherSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TeacherSpec::Emonet { classes, weights: None } => write!(f, "emonet-{classes}"),
            TeacherSpec::Emonet { classes, weights: Some(w) } => {
                write!(f, "emonet-{classes}:{}", w.display())
            }
            TeacherSpec::Onnx(p) | TeacherSpec::Student(p) => write!(f, "{}", p.display()),
            TeacherSpec::Tiny { seed, side } => write!(f, "tiny:{seed}:{side}"),
        }
    }
}

/// Parses a device name (`cpu`, `cuda` (GPU 0) or `cuda:N`) and opens the device.
pub fn parse_device(s: &str) -> Result<Device> {
    let name = DeviceName::parse(s).map_err(|e| Error::config("device", e))?;
    name.open().map_err(|e| Error::config("device", e.to_string()))
}

/// Checks a device name without opening the device.
pub fn check_device_name(s: &str) -> Result<()> {
    DeviceName::parse(s).map(|_| ()).map_err(|e| Error::config("device", e))
}

/// Class names of a student run: `classes.json` (a list of names) when the run wrote one, else
/// EmoNet's 8- or 5-class order by the head's width.
fn student_classes(dir: &Path) -> std::result::Result<ClassSet, String> {
    let names = dir.join("classes.json");
    if names.is_file() {
        let text = std::fs::read_to_string(&names).map_err(|e| format!("{}: {e}", names.display()))?;
        let list: Vec<String> =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", names.display()))?;
        return Ok(ClassSet::new(list));
    }
    let spec_path = dir.join("student.json");
    let text = std::fs::read_to_string(&spec_path).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let spec: StudentSpec =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    Ok(match spec.num_classes {
        8 => ClassSet::emonet8(),
        5 => ClassSet::emonet5(),
        n => ClassSet::new((0..n).map(|i| format!("class_{i}"))),
    })
}

/// Loads the teacher named by `spec` on `device`.
///
/// Teachers whose implementation is not part of this build return [`Error::Load`] naming the spec.
pub fn load_teacher(spec: &TeacherSpec, device: &Device) -> Result<Arc<dyn Teacher>> {
    let name = spec.to_string();
    match spec {
        TeacherSpec::Tiny { seed, side } => {
            Ok(Arc::new(TinyTeacher::new(*seed, *side, device).map_err(|e| Error::load(&name, e))?))
        }
        TeacherSpec::Emonet { classes, weights } => {
            let variant = if *classes == 5 { EmoNetVariant::Five } else { EmoNetVariant::Eight };
            let Some(weights) = weights else {
                return Err(Error::load(
                    name,
                    "EmoNet needs its weights: give emonet-8:PATH (or --weights PATH) with emonet_8.pth or .safetensors",
                ));
            };
            let model = EmoNet::load(variant, weights, device).map_err(|e| Error::load(&name, e))?;
            Ok(Arc::new(model))
        }
        TeacherSpec::Onnx(path) => {
            if !path.is_file() {
                return Err(Error::load(name, format!("{} does not exist", path.display())));
            }
            Ok(Arc::new(OnnxTeacher::from_config_file(path, device).map_err(|e| Error::load(&name, e))?))
        }
        TeacherSpec::Student(dir) => {
            let classes = student_classes(dir).map_err(|e| Error::load(&name, e))?;
            Ok(Arc::new(StudentTeacher::load(dir, classes, device).map_err(|e| Error::load(&name, e))?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_round_trip() {
        assert_eq!(
            TeacherSpec::parse("emonet-8").unwrap(),
            TeacherSpec::Emonet { classes: 8, weights: None }
        );
        assert_eq!(
            TeacherSpec::parse("emonet-5:/w/e.safetensors").unwrap(),
            TeacherSpec::Emonet { classes: 5, weights: Some("/w/e.safetensors".into()) }
        );
        assert_eq!(TeacherSpec::parse("x/faceapi.toml").unwrap(), TeacherSpec::Onnx("x/faceapi.toml".into()));
        assert_eq!(TeacherSpec::parse("tiny:3:8").unwrap(), TeacherSpec::Tiny { seed: 3, side: 8 });
        assert_eq!(TeacherSpec::parse("tiny").unwrap(), TeacherSpec::Tiny { seed: 0, side: 16 });
        for s in ["tiny:3:8", "emonet-8", "emonet-5:/a/b"] {
            assert_eq!(TeacherSpec::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn bad_specs_name_the_input() {
        for s in ["", "emonet-8:", "tiny:x", "tiny:1:1", "nonexistent-thing"] {
            let e = TeacherSpec::parse(s).unwrap_err().to_string();
            assert!(e.contains("`teacher`"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let e = TeacherSpec::parse(dir.path().to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("student.json"), "{e}");
        std::fs::write(dir.path().join("student.json"), "{}").unwrap();
        assert_eq!(
            TeacherSpec::parse(dir.path().to_str().unwrap()).unwrap(),
            TeacherSpec::Student(dir.path().into())
        );
    }

    #[test]
    fn devices() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        assert!(parse_device("tpu").unwrap_err().to_string().contains("`device`"));
        assert!(check_device_name("cuda:1").is_ok());
        assert!(check_device_name("cuda:x").is_err());
    }

    #[test]
    fn tiny_loads_and_missing_onnx_file_is_named() {
        let t = load_teacher(&TeacherSpec::Tiny { seed: 1, side: 8 }, &Device::Cpu).unwrap();
        assert_eq!(t.info().preprocess.size, [8, 8]);
        let e =
            load_teacher(&TeacherSpec::Onnx("/nope/t.toml".into()), &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("/nope/t.toml"), "{e}");
    }
}
