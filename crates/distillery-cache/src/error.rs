//! Errors of the cache crate. Each names the dataset URI and the operation, column, row or key
//! that failed, so a message alone is enough to find the problem.

/// An error while reading or writing a faces dataset or a teacher cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Lance (or the object store under it) failed.
    #[error("{op} `{uri}`: {source}")]
    Lance {
        op: &'static str,
        uri: String,
        #[source]
        source: Box<lance::Error>,
    },
    /// The dataset does not exist where it was expected.
    #[error("no dataset at `{uri}` ({what})")]
    NotFound { uri: String, what: &'static str },
    /// A stored column is missing or has an unexpected type.
    #[error("`{uri}`: column `{column}`: {reason}")]
    Column { uri: String, column: String, reason: String },
    /// Input handed to an operation is invalid; `key` names the record, shard or field.
    #[error("invalid input `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    /// A face image could not be decoded or preprocessed.
    #[error("face {face_id}: {reason}")]
    Image { face_id: String, reason: String },
    /// Building a tensor failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A background worker of the streaming reader stopped.
    #[error("stream: {0}")]
    Stream(String),
}

impl Error {
    pub(crate) fn lance(op: &'static str, uri: &str, source: lance::Error) -> Self {
        Error::Lance { op, uri: uri.to_owned(), source: Box::new(source) }
    }

    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid { key: key.into(), reason: reason.into() }
    }

    pub(crate) fn column(uri: &str, column: &str, reason: impl Into<String>) -> Self {
        Error::Column { uri: uri.to_owned(), column: column.to_owned(), reason: reason.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
