//! The error type shared by configuration and identifier parsing.

/// Errors raised by core types: invalid configuration or malformed identifiers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid; `key` names the offending field (dotted path).
    #[error("invalid configuration `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// An identifier string could not be parsed.
    #[error("invalid {kind} `{value}`: {reason}")]
    Id { kind: &'static str, value: String, reason: String },
}

impl Error {
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config { key: key.into(), reason: reason.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
