//! Domain types of the coordinator: jobs, shards, leases and workers, independent of gRPC.
//!
//! Jobs and shards are stored durably (serde JSON in the state store); leases and worker sessions
//! live in memory only, because a restarted coordinator returns every in-flight shard to the queue.

use std::collections::BTreeMap;

use distillery_core::TeacherFingerprint;
use serde::{Deserialize, Serialize};

/// Rows per shard when a job does not say.
pub const DEFAULT_SHARD_SIZE: u64 = 1024;

/// The kind of teacher a job uses; see `distillery.v1.TeacherKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeacherKind {
    Emonet8,
    Emonet5,
    Onnx,
    Student,
}

impl TeacherKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TeacherKind::Emonet8 => "emonet-8",
            TeacherKind::Emonet5 => "emonet-5",
            TeacherKind::Onnx => "onnx",
            TeacherKind::Student => "student",
        }
    }
}

/// How to build the teacher of a job (paths are read by the workers).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TeacherSpec {
    pub kind: TeacherKind,
    /// ONNX teacher TOML path, or a student run directory; empty for EmoNet.
    pub config_path: String,
    /// Weights path; required for EmoNet.
    pub weights_path: String,
    /// The teacher fingerprint when known at submission.
    pub fingerprint: Option<TeacherFingerprint>,
}

/// A labelling job as submitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub faces_uri: String,
    pub cache_uri: String,
    pub teacher: TeacherSpec,
    /// K: view indices 0..=K are labelled.
    pub views: u32,
    /// Rows per shard (never 0 once accepted).
    pub shard_size: u64,
    /// Higher first.
    pub priority: i32,
    /// Object-store options for both URIs.
    pub storage_options: BTreeMap<String, String>,
    /// Seed of the deterministic augmentations (`distillery_data::view::views_for`).
    #[serde(default)]
    pub view_seed: u64,
}

impl JobSpec {
    /// Deterministic identity of the work a spec describes. Priority and storage options do not
    /// change the outputs, so they are left out: resubmitting with other credentials or another
    /// priority still recognises committed shards.
    pub fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"distillery.label-job.v1\0");
        for s in [
            self.faces_uri.as_str(),
            self.cache_uri.as_str(),
            self.teacher.kind.as_str(),
            self.teacher.config_path.as_str(),
            self.teacher.weights_path.as_str(),
            self.teacher.fingerprint.as_ref().map(|f| f.as_str()).unwrap_or(""),
        ] {
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        h.update(&self.views.to_le_bytes());
        h.update(&self.view_seed.to_le_bytes());
        h.update(&self.shard_size.to_le_bytes());
        h.finalize().to_hex()[..32].to_string()
    }
}

/// Rows `offset..offset+len` of one Lance fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardRange {
    pub fragment_id: u64,
    pub offset: u64,
    pub len: u64,
}

/// The deterministic key of a shard: `{job fingerprint}/{fragment}:{offset}+{len}`.
pub fn shard_key(job_fingerprint: &str, r: &ShardRange) -> String {
    format!("{job_fingerprint}/{}:{}+{}", r.fragment_id, r.offset, r.len)
}

/// Life cycle of a job; see `distillery.v1.JobState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Completed,
    CompletedWithPoisoned,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::CompletedWithPoisoned | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Life cycle of a shard; see `distillery.v1.ShardState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    Pending,
    Leased,
    Committed,
    Skipped,
    Poisoned,
    Cancelled,
}

impl ShardState {
    pub const ALL: [ShardState; 6] = [
        ShardState::Pending,
        ShardState::Leased,
        ShardState::Committed,
        ShardState::Skipped,
        ShardState::Poisoned,
        ShardState::Cancelled,
    ];

    /// True once the shard will not change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ShardState::Committed | ShardState::Skipped | ShardState::Poisoned | ShardState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Pending => "pending",
            ShardState::Leased => "leased",
            ShardState::Committed => "committed",
            ShardState::Skipped => "skipped",
            ShardState::Poisoned => "poisoned",
            ShardState::Cancelled => "cancelled",
        }
    }
}

/// One shard of a job, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub id: u64,
    pub range: ShardRange,
    pub key: String,
    pub state: ShardState,
    /// Leases granted so far.
    pub attempts: u32,
    /// Attempts that ended in a failure or an expired lease; the shard is poisoned at `max_attempts`.
    pub failures: u32,
    pub last_error: Option<String>,
    /// Cache rows committed for this shard.
    pub rows_written: u64,
    /// Faces the worker skipped because they were cached already.
    pub faces_skipped: u64,
    /// Cache version of the commit.
    pub commit_version: Option<u64>,
}

/// Number of shards per state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardCounts {
    pub pending: u64,
    pub leased: u64,
    pub committed: u64,
    pub skipped: u64,
    pub poisoned: u64,
    pub cancelled: u64,
    pub total: u64,
}

impl ShardCounts {
    pub fn add(&mut self, s: ShardState) {
        self.total += 1;
        match s {
            ShardState::Pending => self.pending += 1,
            ShardState::Leased => self.leased += 1,
            ShardState::Committed => self.committed += 1,
            ShardState::Skipped => self.skipped += 1,
            ShardState::Poisoned => self.poisoned += 1,
            ShardState::Cancelled => self.cancelled += 1,
        }
    }

    /// Shards still to be done (pending or leased).
    pub fn open(&self) -> u64 {
        self.pending + self.leased
    }
}

/// A job's stored record (its shards are stored separately).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub job_fingerprint: String,
    /// The teacher fingerprint the outputs carry; bound at submission or by the first lease.
    pub teacher_fingerprint: Option<TeacherFingerprint>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub error: Option<String>,
    /// Submission order, to serve equal priorities oldest first.
    pub seq: u64,
}

/// A shard that will not be retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoisonedShard {
    pub shard_id: u64,
    pub range: ShardRange,
    pub attempts: u32,
    pub last_error: String,
}

/// A job as reported to clients.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub job_fingerprint: String,
    pub teacher_fingerprint: Option<TeacherFingerprint>,
    pub shards: ShardCounts,
    pub images_total: u64,
    pub images_done: u64,
    pub images_skipped: u64,
    pub rows_written: u64,
    pub images_per_second: f64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub error: Option<String>,
    pub poisoned: Vec<PoisonedShard>,
}

/// What a job event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobEventKind {
    Snapshot,
    Progress,
    StateChanged { previous: JobState },
    ShardPoisoned,
}

/// One event of a job's progress stream.
#[derive(Clone, Debug, PartialEq)]
pub struct JobEvent {
    pub kind: JobEventKind,
    pub job: JobView,
    pub detail: String,
}

/// A worker's registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub address: String,
    pub teacher_name: String,
    /// `None`: a generic worker that loads whatever teacher a lease names.
    pub teacher_fingerprint: Option<TeacherFingerprint>,
    pub device: String,
    pub max_batch: u32,
}

/// Lease settings handed to a registering worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub session: String,
    pub lease_ttl_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub max_attempts: u32,
}

/// A shard granted to a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    pub lease_id: String,
    pub job_id: String,
    pub shard_id: u64,
    pub shard_key: String,
    pub range: ShardRange,
    pub spec: JobSpec,
    pub teacher_fingerprint: Option<TeacherFingerprint>,
    pub deadline_ms: i64,
    pub attempt: u32,
}

/// Answer to a lease request.
#[derive(Clone, Debug, PartialEq)]
pub enum LeaseOutcome {
    Granted(Box<Lease>),
    NoWork { retry_after_ms: u64, reason: String },
}

/// What a heartbeat says about one lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    Active { deadline_ms: i64 },
    Revoked,
    Cancelled,
    Unknown,
}

/// Answer to a completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    Committed { version: u64 },
    AlreadyCommitted,
    Rejected { reason: String },
}

/// Answer to a failure report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureOutcome {
    pub shard_state: ShardState,
    pub attempts: u32,
}
