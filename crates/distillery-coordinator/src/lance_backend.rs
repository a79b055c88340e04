//! The real storage behind the coordinator: faces datasets and teacher caches in Lance, through
//! `distillery-cache`. Caches are opened once per URI and kept; commits to one cache are
//! serialised (the coordinator is the only committer, so no other writer races them).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use distillery_cache::{CacheOptions, FaceStore, StagedFragments, StorageOptions, TeacherCache};
use distillery_core::TeacherFingerprint;
use tokio::sync::Mutex;

use crate::backend::{BackendError, CacheCommitter, CommitOutcome, ShardPlanner};
use crate::model::{JobSpec, ShardRange};

/// Lance-backed [`ShardPlanner`] and [`CacheCommitter`].
#[derive(Default)]
pub struct LanceBackend {
    caches: Mutex<HashMap<String, Arc<Mutex<TeacherCache>>>>,
}

impl std::fmt::Debug for LanceBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanceBackend").finish_non_exhaustive()
    }
}

fn options(spec: &JobSpec) -> StorageOptions {
    spec.storage_options.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn io(op: &'static str) -> impl Fn(distillery_cache::Error) -> BackendError {
    move |e| BackendError::Io { op, reason: e.to_string() }
}

impl LanceBackend {
    pub fn new() -> Self {
        Self::default()
    }

    async fn cache(&self, spec: &JobSpec) -> Result<Arc<Mutex<TeacherCache>>, BackendError> {
        let mut caches = self.caches.lock().await;
        if let Some(c) = caches.get(&spec.cache_uri) {
            return Ok(c.clone());
        }
        let opts = CacheOptions { storage: options(spec), ..Default::default() };
        let cache = TeacherCache::create_or_open(&spec.cache_uri, opts)
            .await
            .map_err(|e| BackendError::Open { uri: spec.cache_uri.clone(), reason: e.to_string() })?;
        let c = Arc::new(Mutex::new(cache));
        caches.insert(spec.cache_uri.clone(), c.clone());
        Ok(c)
    }

    async fn faces(spec: &JobSpec) -> Result<FaceStore, BackendError> {
        FaceStore::open_with(&spec.faces_uri, options(spec))
            .await
            .map_err(|e| BackendError::Open { uri: spec.faces_uri.clone(), reason: e.to_string() })
    }
}

#[async_trait]
impl ShardPlanner for LanceBackend {
    async fn plan(&self, spec: &JobSpec) -> Result<Vec<ShardRange>, BackendError> {
        let faces = Self::faces(spec).await?;
        let size = usize::try_from(spec.shard_size).unwrap_or(usize::MAX).max(1);
        let shards = faces.shards(size).await.map_err(io("plan shards"))?;
        Ok(shards
            .into_iter()
            .map(|s| ShardRange { fragment_id: s.fragment_id, offset: s.offset, len: s.len })
            .collect())
    }
}

#[async_trait]
impl CacheCommitter for LanceBackend {
    async fn committed_shards(&self, spec: &JobSpec) -> Result<HashSet<String>, BackendError> {
        let cache = self.cache(spec).await?;
        let mut c = cache.lock().await;
        c.refresh().await.map_err(io("refresh cache"))?;
        c.committed_shards().await.map_err(io("read committed shards"))
    }

    async fn commit(
        &self,
        spec: &JobSpec,
        shard_key: &str,
        staged: &[u8],
    ) -> Result<CommitOutcome, BackendError> {
        let text = std::str::from_utf8(staged).map_err(|e| BackendError::InvalidStaged(e.to_string()))?;
        let staged =
            StagedFragments::from_json(text).map_err(|e| BackendError::InvalidStaged(e.to_string()))?;
        if staged.shard_key != shard_key {
            return Err(BackendError::InvalidStaged(format!(
                "staged for shard `{}`, completed as `{shard_key}`",
                staged.shard_key
            )));
        }
        let cache = self.cache(spec).await?;
        let mut c = cache.lock().await;
        match c.commit(shard_key, staged).await {
            Ok(distillery_cache::CommitOutcome::Committed { version }) => {
                Ok(CommitOutcome::Committed { version })
            }
            Ok(distillery_cache::CommitOutcome::AlreadyCommitted) => Ok(CommitOutcome::AlreadyCommitted),
            Err(distillery_cache::Error::Invalid { key, reason }) => {
                Err(BackendError::InvalidStaged(format!("{key}: {reason}")))
            }
            Err(e) => Err(io("commit shard")(e)),
        }
    }

    async fn cached_ranges(
        &self,
        spec: &JobSpec,
        teacher: &TeacherFingerprint,
        ranges: &[ShardRange],
    ) -> Result<Vec<bool>, BackendError> {
        let existing = {
            let cache = self.cache(spec).await?;
            let mut c = cache.lock().await;
            c.refresh().await.map_err(io("refresh cache"))?;
            c.existing(teacher).await.map_err(io("read cached outputs"))?
        };
        if existing.is_empty() || ranges.is_empty() {
            return Ok(vec![false; ranges.len()]);
        }
        // Face ids come in storage order, fragment after fragment; one range per fragment gives
        // where each fragment starts in that order.
        let faces = Self::faces(spec).await?;
        let ids = faces.ids().await.map_err(io("read face ids"))?;
        let mut start = HashMap::new();
        let mut at = 0u64;
        for f in faces.shards(usize::MAX).await.map_err(io("plan shards"))? {
            start.insert(f.fragment_id, at);
            at += f.len;
        }
        Ok(ranges
            .iter()
            .map(|r| {
                let Some(&s) = start.get(&r.fragment_id) else { return false };
                (s + r.offset..s + r.offset + r.len).all(|row| {
                    ids.get(row as usize)
                        .is_some_and(|id| (0..=spec.views).all(|v| existing.contains(&(id.clone(), v))))
                })
            })
            .collect())
    }
}
