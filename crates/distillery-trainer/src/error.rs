//! The trainer's error type: every variant names what failed (a key, a file, an operation).

use std::path::{Path, PathBuf};

/// Errors of configuration, I/O, tensor operations and data reading during training/evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid; `key` is its dotted path (e.g. `optim.lr`).
    #[error("invalid configuration `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// Reading or writing `path` failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A file exists but its content is not what we expect.
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    /// A tensor operation failed; `op` says which step.
    #[error("{op}: {source}")]
    Tensor { op: String, source: candle_core::Error },
    /// The data source failed or yielded inconsistent batches.
    #[error("data: {0}")]
    Data(String),
    /// A loss or gradient became NaN/inf.
    #[error("non-finite {what} at step {step}")]
    NonFinite { what: String, step: u64 },
    /// The run was cancelled on request.
    #[error("cancelled")]
    Cancelled,
    /// The trainer's gRPC server or a connection to one failed.
    #[error("trainer server: {0}")]
    Server(String),
    #[error(transparent)]
    Core(#[from] distillery_core::Error),
}

/// Result with the trainer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config { key: key.into(), reason: reason.into() }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    pub fn format(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().to_path_buf(), reason: reason.into() }
    }
}

impl From<candle_core::Error> for Error {
    fn from(source: candle_core::Error) -> Self {
        Error::Tensor { op: "tensor op".into(), source }
    }
}

/// Adds the name of the operation to a candle error.
pub trait TensorContext<T> {
    fn op(self, op: &str) -> Result<T>;
}

impl<T> TensorContext<T> for candle_core::Result<T> {
    fn op(self, op: &str) -> Result<T> {
        self.map_err(|source| Error::Tensor { op: op.to_string(), source })
    }
}
