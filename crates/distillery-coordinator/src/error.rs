//! Errors of the coordinator's domain layer; the gRPC adapter maps each variant to a status code.

/// Why a coordinator operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The request is malformed; `field` names the offending request field.
    #[error("invalid field `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The named object does not exist.
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    /// The request is well-formed but not valid in the current state (e.g. an unknown worker
    /// session: the worker must register again).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A storage backend (faces dataset, teacher cache) could not be reached or failed; retrying
    /// may help.
    #[error("{0}")]
    Unavailable(String),
    /// The coordinator's own state store failed.
    #[error("state store: {0}")]
    Store(String),
}

impl CoordError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CoordError::InvalidArgument { field: field.into(), reason: reason.into() }
    }
}

impl From<distillery_proto::ConvertError> for CoordError {
    fn from(e: distillery_proto::ConvertError) -> Self {
        CoordError::InvalidArgument { field: e.field, reason: e.reason }
    }
}

impl From<redb::Error> for CoordError {
    fn from(e: redb::Error) -> Self {
        CoordError::Store(e.to_string())
    }
}

macro_rules! store_from {
    ($($t:ty),*) => {$(
        impl From<$t> for CoordError {
            fn from(e: $t) -> Self {
                CoordError::Store(e.to_string())
            }
        }
    )*};
}
store_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = CoordError> = std::result::Result<T, E>;
