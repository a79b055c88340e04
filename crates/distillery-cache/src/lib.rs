//! Lance storage for Distillery: the faces dataset, the teacher-output cache, and the streaming
//! reader that joins them into training batches.
//!
//! Both datasets live at a URI that is a local path or `s3://bucket/prefix`. Object-store settings
//! come from the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or from an explicit
//! [`StorageOptions`] map passed to the `*_with` constructors; explicit keys win. The on-disk
//! layout of every column is documented in `docs/cache-format.md`.

pub mod error;
pub mod faces;
pub mod stream;
pub mod teacher_cache;
mod util;

pub use error::{Error, Result};
pub use faces::{AppendStats, FaceStats, FaceStore, IngestTotals, MeanStd, ShardRange};
pub use stream::{BatchStream, StreamConfig, StreamPosition, ViewSelection, open_stream};
pub use teacher_cache::{
    CacheOptions, CacheRow, CacheSummary, CleanupStats, CommitOutcome, CompactStats, Coverage,
    LogitsPrecision, StagedFragments, TeacherCache, TeacherMeta, TeacherSummary,
};

/// Object-store options handed to Lance (`aws_endpoint`, `aws_access_key_id`,
/// `aws_secret_access_key`, `aws_region`, `allow_http`, ...). Empty for local paths.
pub type StorageOptions = std::collections::HashMap<String, String>;
