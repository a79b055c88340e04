//! Reading EmoNet state dicts and handing their tensors to the layers by official key name.
//!
//! The released checkpoints are PyTorch pickles saved from a `DataParallel` wrapper, so keys carry
//! a `module.` prefix and batch-norm layers carry `num_batches_tracked` counters; both are
//! normalised away here. `.safetensors` files with the same key names load the same way.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Why EmoNet weights could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EmoNetError {
    #[error("cannot read EmoNet weights {path}: {source}")]
    Read { path: PathBuf, source: candle_core::Error },
    #[error("EmoNet weights {path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("EmoNet weights {path} do not fit {variant}: {source}")]
    Weights { path: PathBuf, variant: &'static str, source: candle_core::Error },
    #[error("unknown EmoNet variant `{0}` (expected `emonet-8` or `emonet-5`)")]
    UnknownVariant(String),
}

/// Reads a state dict from `path` (`.pth`/`.pt` PyTorch zip pickle, or `.safetensors`), strips a
/// leading `module.` from every key, drops `num_batches_tracked` counters and converts every
/// tensor to f32 on `device`.
pub fn read_state_dict(
    path: &Path,
    device: &Device,
) -> std::result::Result<HashMap<String, Tensor>, EmoNetError> {
    let read_err = |source| EmoNetError::Read { path: path.to_owned(), source };
    let format_err = |reason: String| EmoNetError::Format { path: path.to_owned(), reason };
    if !path.is_file() {
        return Err(format_err("no such file".into()));
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
    let raw: Vec<(String, Tensor)> = if name.ends_with(".safetensors") {
        candle_core::safetensors::load(path, &Device::Cpu).map_err(read_err)?.into_iter().collect()
    } else if name.ends_with(".pth") || name.ends_with(".pt") {
        if !is_zip(path).map_err(|e| read_err(e.into()))? {
            return Err(format_err(
                "not a zip-format PyTorch file (saved by torch < 1.6?); re-save it with a recent \
                 torch.save or convert it to .safetensors"
                    .into(),
            ));
        }
        let mut tensors = candle_core::pickle::read_all(path).map_err(read_err)?;
        if tensors.is_empty() {
            // Training checkpoints nest the weights under `state_dict`.
            tensors = candle_core::pickle::read_all_with_key(path, Some("state_dict")).map_err(read_err)?;
        }
        tensors
    } else {
        return Err(format_err("unknown extension, expected .pth, .pt or .safetensors".into()));
    };
    if raw.is_empty() {
        return Err(format_err("contains no tensors".into()));
    }
    let mut out = HashMap::with_capacity(raw.len());
    for (key, tensor) in raw {
        if key.ends_with("num_batches_tracked") {
            continue;
        }
        let clean = key.strip_prefix("module.").unwrap_or(&key).to_owned();
        let tensor = tensor.to_dtype(DType::F32).and_then(|t| t.to_device(device)).map_err(read_err)?;
        if out.insert(clean.clone(), tensor).is_some() {
            return Err(format_err(format!("key `{clean}` appears both with and without `module.`")));
        }
    }
    Ok(out)
}

fn is_zip(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(n == 4 && magic == *b"PK\x03\x04")
}

/// A view of a [`VarBuilder`] that checks every requested tensor's presence and shape with errors
/// naming the full key, converts to f32, and remembers what was taken (for the parameter count and
/// the fingerprint).
pub(crate) struct Params<'a> {
    vb: VarBuilder<'a>,
    taken: &'a RefCell<Vec<(String, Tensor)>>,
}

impl<'a> Params<'a> {
    pub(crate) fn new(vb: VarBuilder<'a>, taken: &'a RefCell<Vec<(String, Tensor)>>) -> Self {
        Self { vb, taken }
    }

    pub(crate) fn pp(&self, name: impl ToString) -> Params<'a> {
        Params { vb: self.vb.pp(name), taken: self.taken }
    }

    /// The tensor `{prefix}.{name}`, which must have exactly `shape`.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let prefix = self.vb.prefix();
        let key = if prefix.is_empty() { name.to_owned() } else { format!("{prefix}.{name}") };
        let t = match self.vb.get(shape, name) {
            Ok(t) => t.to_dtype(DType::F32)?,
            // Restate the backend's error in terms of the key and both shapes.
            Err(e) => {
                if !self.vb.contains_tensor(name) {
                    candle_core::bail!("weight `{key}` is missing (expected shape {shape:?})");
                }
                match self.vb.get_unchecked(name) {
                    Ok(found) if found.dims() != shape => {
                        candle_core::bail!("weight `{key}` has shape {:?}, expected {shape:?}", found.dims())
                    }
                    _ => return Err(e.context(format!("weight `{key}`"))),
                }
            }
        };
        self.taken.borrow_mut().push((key, t.clone()));
        Ok(t)
    }
}

/// True for the keys of learnable parameters (as opposed to batch-norm running statistics).
pub(crate) fn is_parameter(key: &str) -> bool {
    !(key.ends_with("running_mean") || key.ends_with("running_var"))
}
