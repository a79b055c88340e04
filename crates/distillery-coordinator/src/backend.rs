//! What the coordinator needs from storage, as two small traits: planning shards over a faces
//! dataset, and committing staged outputs to a teacher cache. The Lance implementation lives in
//! [`crate::lance_backend`]; [`MemoryBackend`] is an in-memory stand-in for tests and demos.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use distillery_core::TeacherFingerprint;

use crate::model::{JobSpec, ShardRange};

/// A storage failure, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The staged fragment description is malformed (the worker's fault).
    #[error("staged fragments: {0}")]
    InvalidStaged(String),
    /// The dataset named by `uri` could not be opened (wrong URI, missing, no access).
    #[error("cannot open `{uri}`: {reason}")]
    Open { uri: String, reason: String },
    /// Any other I/O failure of the named operation.
    #[error("{op}: {reason}")]
    Io { op: &'static str, reason: String },
}

/// What committing a shard did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Committed now, producing this dataset version.
    Committed { version: u64 },
    /// The cache already holds a commit under this shard key; nothing was written.
    AlreadyCommitted,
}

/// Splits a faces dataset into shards.
#[async_trait]
pub trait ShardPlanner: Send + Sync + 'static {
    /// Contiguous row ranges of at most `spec.shard_size` rows, never spanning fragments, in a
    /// deterministic order.
    async fn plan(&self, spec: &JobSpec) -> Result<Vec<ShardRange>, BackendError>;
}

/// The teacher cache, as far as the coordinator uses it. The coordinator is its only committer.
#[async_trait]
pub trait CacheCommitter: Send + Sync + 'static {
    /// Shard keys already committed to the cache of `spec`.
    async fn committed_shards(&self, spec: &JobSpec) -> Result<HashSet<String>, BackendError>;

    /// Commits the staged fragments (JSON) of one shard under `shard_key`, once: a second commit
    /// under the same key must return [`CommitOutcome::AlreadyCommitted`] and write nothing.
    async fn commit(
        &self,
        spec: &JobSpec,
        shard_key: &str,
        staged: &[u8],
    ) -> Result<CommitOutcome, BackendError>;

    /// For each range, whether every face in it already has outputs for `teacher` and every view
    /// index `0..=spec.views`.
    async fn cached_ranges(
        &self,
        spec: &JobSpec,
        teacher: &TeacherFingerprint,
        ranges: &[ShardRange],
    ) -> Result<Vec<bool>, BackendError>;
}

/// In-memory faces datasets and caches: fragments are row counts; a cache records commits by
/// shard key and which `(fragment, row)` already have all views for a teacher.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    /// faces URI → (fragment id → rows).
    datasets: HashMap<String, BTreeMap<u64, u64>>,
    /// cache URI → shard key → version.
    commits: HashMap<String, BTreeMap<String, u64>>,
    /// cache URI → number of commit calls that wrote something.
    versions: HashMap<String, u64>,
    /// (cache URI, teacher) → rows with outputs for every view.
    cached_rows: HashMap<(String, TeacherFingerprint), HashSet<(u64, u64)>>,
    /// Commit calls left to fail with an I/O error.
    fail_commits: u32,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Defines a faces dataset with the given fragment sizes (fragment ids 0, 1, ...).
    pub fn add_dataset(&self, uri: &str, fragment_rows: &[u64]) {
        let frags = fragment_rows.iter().enumerate().map(|(i, &n)| (i as u64, n)).collect();
        self.inner.lock().unwrap().datasets.insert(uri.to_string(), frags);
    }

    /// Marks rows `range` of a faces dataset as fully cached for `teacher` in `cache_uri`.
    pub fn mark_cached(&self, cache_uri: &str, teacher: &TeacherFingerprint, range: ShardRange) {
        let mut g = self.inner.lock().unwrap();
        let set = g.cached_rows.entry((cache_uri.to_string(), teacher.clone())).or_default();
        for r in range.offset..range.offset + range.len {
            set.insert((range.fragment_id, r));
        }
    }

    /// Records a commit directly, as if made by an earlier coordinator.
    pub fn insert_commit(&self, cache_uri: &str, shard_key: &str) {
        let mut g = self.inner.lock().unwrap();
        let v = g.versions.entry(cache_uri.to_string()).or_default();
        *v += 1;
        let v = *v;
        g.commits.entry(cache_uri.to_string()).or_default().insert(shard_key.to_string(), v);
    }

    /// Makes the next `n` commit calls fail with an I/O error.
    pub fn fail_next_commits(&self, n: u32) {
        self.inner.lock().unwrap().fail_commits = n;
    }

    /// Shard keys committed to `cache_uri`, in order.
    pub fn commits(&self, cache_uri: &str) -> Vec<String> {
        self.inner
            .lock()
            .unwrap()
            .commits
            .get(cache_uri)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Number of commits that wrote something to `cache_uri`.
    pub fn commit_count(&self, cache_uri: &str) -> u64 {
        self.inner.lock().unwrap().versions.get(cache_uri).copied().unwrap_or(0)
    }
}

#[async_trait]
impl ShardPlanner for MemoryBackend {
    async fn plan(&self, spec: &JobSpec) -> Result<Vec<ShardRange>, BackendError> {
        let g = self.inner.lock().unwrap();
        let frags = g.datasets.get(&spec.faces_uri).ok_or_else(|| BackendError::Open {
            uri: spec.faces_uri.clone(),
            reason: "no such dataset".into(),
        })?;
        Ok(split_fragments(frags.iter().map(|(&f, &n)| (f, n)), spec.shard_size))
    }
}

#[async_trait]
impl CacheCommitter for MemoryBackend {
    async fn committed_shards(&self, spec: &JobSpec) -> Result<HashSet<String>, BackendError> {
        let g = self.inner.lock().unwrap();
        Ok(g.commits.get(&spec.cache_uri).map(|m| m.keys().cloned().collect()).unwrap_or_default())
    }

    async fn commit(
        &self,
        spec: &JobSpec,
        shard_key: &str,
        staged: &[u8],
    ) -> Result<CommitOutcome, BackendError> {
        serde_json::from_slice::<serde_json::Value>(staged)
            .map_err(|e| BackendError::InvalidStaged(e.to_string()))?;
        let mut g = self.inner.lock().unwrap();
        if g.fail_commits > 0 {
            g.fail_commits -= 1;
            return Err(BackendError::Io { op: "commit", reason: "injected failure".into() });
        }
        if g.commits.get(&spec.cache_uri).is_some_and(|m| m.contains_key(shard_key)) {
            return Ok(CommitOutcome::AlreadyCommitted);
        }
        let v = g.versions.entry(spec.cache_uri.clone()).or_default();
        *v += 1;
        let version = *v;
        g.commits.entry(spec.cache_uri.clone()).or_default().insert(shard_key.to_string(), version);
        Ok(CommitOutcome::Committed { version })
    }

    async fn cached_ranges(
        &self,
        spec: &JobSpec,
        teacher: &TeacherFingerprint,
        ranges: &[ShardRange],
    ) -> Result<Vec<bool>, BackendError> {
        let g = self.inner.lock().unwrap();
        let set = g.cached_rows.get(&(spec.cache_uri.clone(), teacher.clone()));
        Ok(ranges
            .iter()
            .map(|r| {
                set.is_some_and(|s| (r.offset..r.offset + r.len).all(|row| s.contains(&(r.fragment_id, row))))
            })
            .collect())
    }
}

/// Splits fragments `(id, rows)` into ranges of at most `shard_size` rows (0 is treated as 1).
pub fn split_fragments(frags: impl IntoIterator<Item = (u64, u64)>, shard_size: u64) -> Vec<ShardRange> {
    let size = shard_size.max(1);
    let mut out = Vec::new();
    for (fragment_id, rows) in frags {
        let mut offset = 0;
        while offset < rows {
            let len = size.min(rows - offset);
            out.push(ShardRange { fragment_id, offset, len });
            offset += len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_row_once_without_spanning_fragments() {
        let s = split_fragments([(0, 5), (3, 2), (7, 0)], 2);
        let want = [(0, 0, 2), (0, 2, 2), (0, 4, 1), (3, 0, 2)];
        assert_eq!(s.len(), want.len());
        for (r, (f, o, l)) in s.iter().zip(want) {
            assert_eq!((r.fragment_id, r.offset, r.len), (f, o, l));
        }
    }
}
