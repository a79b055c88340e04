//! Errors of the teacher worker. Each variant says which step failed so an operator can tell a bad
//! configuration from a bad image, a broken model or an unreachable coordinator.

use std::path::PathBuf;

/// Everything that can go wrong while loading a teacher, labelling a shard or talking gRPC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration key is invalid; `key` is the dotted path of the field.
    #[error("invalid configuration `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// The teacher could not be loaded from `spec`.
    #[error("cannot load teacher `{spec}`: {reason}")]
    Load { spec: String, reason: String },
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The teacher's forward pass (or moving data to/from its device) failed.
    #[error("inference failed ({op}): {source}")]
    Inference {
        op: &'static str,
        #[source]
        source: candle_core::Error,
    },
    /// An input tensor or image has the wrong shape for the teacher.
    #[error("bad input: {0}")]
    Input(String),
    /// Reading faces or staging rows in a Lance dataset failed.
    #[error("{op} failed: {reason}")]
    Storage { op: &'static str, reason: String },
    /// A gRPC call to the coordinator failed.
    #[error("coordinator call {call} failed: {status}")]
    Rpc { call: &'static str, status: Box<tonic::Status> },
    /// Connecting to the coordinator or binding a listener failed.
    #[error("{what}: {reason}")]
    Transport { what: String, reason: String },
    /// The inference thread is gone (it panicked or the worker is shutting down).
    #[error("inference engine stopped")]
    EngineStopped,
    /// The lease asks for a teacher other than the one this worker runs.
    #[error("teacher mismatch: lease wants fingerprint {wanted}, this worker's teacher has {have}")]
    TeacherMismatch { wanted: String, have: String },
    /// Work was cancelled because the worker is shutting down.
    #[error("cancelled: worker is shutting down")]
    Cancelled,
}

impl Error {
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config { key: key.into(), reason: reason.into() }
    }

    pub fn load(spec: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Load { spec: spec.into(), reason: reason.to_string() }
    }

    pub fn storage(op: &'static str, reason: impl std::fmt::Display) -> Self {
        Error::Storage { op, reason: reason.to_string() }
    }

    pub fn inference(op: &'static str) -> impl FnOnce(candle_core::Error) -> Self {
        move |source| Error::Inference { op, source }
    }

    /// True when retrying the same work elsewhere (or later) may succeed: storage, device, network
    /// and teacher-loading problems (another worker may have the weights). Bad configuration and
    /// malformed input are permanent.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Error::Config { .. } | Error::Input(_))
    }
}

impl From<distillery_core::Error> for Error {
    fn from(e: distillery_core::Error) -> Self {
        match e {
            distillery_core::Error::Config { key, reason } => Error::Config { key, reason },
            other => Error::Input(other.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
