//! Lance storage of a worker: faces are read from the lease's faces dataset, rows are staged into
//! its teacher cache (data files written, not committed: the coordinator commits them).

use std::collections::HashSet;
use std::sync::Arc;

use distillery_cache::{
    CacheOptions, CacheRow, FaceStore, ShardRange, StagedFragments, TeacherCache, TeacherMeta,
};
use distillery_core::FaceId;
use distillery_data::FaceRecord;
use distillery_models::teacher::TeacherInfo;
use distillery_proto::v1;

use crate::error::{Error, Result};
use crate::pipeline::{LabelRow, RowSink};
use crate::worker::ShardStorage;

/// Reads and stages through Lance, at the URIs and with the storage options each lease names.
#[derive(Clone, Debug, Default)]
pub struct LanceStorage;

/// The storage `distillery serve teacher` uses.
pub fn default_storage() -> Arc<dyn ShardStorage> {
    Arc::new(LanceStorage)
}

fn range_of(lease: &v1::ShardLease) -> Result<ShardRange> {
    let r = lease.range.as_ref().ok_or_else(|| Error::config("lease.range", "is missing"))?;
    Ok(ShardRange { fragment_id: r.fragment_id, offset: r.offset, len: r.len })
}

#[async_trait::async_trait]
impl ShardStorage for LanceStorage {
    async fn read_faces(&self, lease: &v1::ShardLease) -> Result<Vec<FaceRecord>> {
        let range = range_of(lease)?;
        let store =
            FaceStore::open_with(&lease.faces_uri, lease.storage_options.clone().into_iter().collect())
                .await
                .map_err(|e| Error::storage("opening the faces dataset", e))?;
        store.read_shard(&range).await.map_err(|e| Error::storage("reading the shard's faces", e))
    }

    async fn open_sink(
        &self,
        lease: &v1::ShardLease,
        teacher: &TeacherInfo,
        worker_id: &str,
    ) -> Result<Box<dyn RowSink>> {
        let opts = CacheOptions {
            storage: lease.storage_options.clone().into_iter().collect(),
            ..Default::default()
        };
        let cache = TeacherCache::create_or_open(&lease.cache_uri, opts)
            .await
            .map_err(|e| Error::storage("opening the teacher cache", e))?;
        Ok(Box::new(LanceSink::new(cache, teacher, &lease.shard_key, worker_id)))
    }
}

/// Stages chunks of rows as fragments of one shard and merges them into one [`StagedFragments`].
pub struct LanceSink {
    cache: TeacherCache,
    meta: TeacherMeta,
    shard_key: String,
    worker: String,
    staged: Option<StagedFragments>,
}

impl LanceSink {
    pub fn new(cache: TeacherCache, teacher: &TeacherInfo, shard_key: &str, worker: &str) -> Self {
        let meta = TeacherMeta {
            fingerprint: teacher.fingerprint.clone(),
            name: teacher.name.clone(),
            classes: teacher.classes.names().to_vec(),
        };
        Self { cache, meta, shard_key: shard_key.into(), worker: worker.into(), staged: None }
    }
}

#[async_trait::async_trait]
impl RowSink for LanceSink {
    async fn existing(&mut self) -> Result<HashSet<(FaceId, u32)>> {
        self.cache
            .existing(&self.meta.fingerprint)
            .await
            .map_err(|e| Error::storage("listing cached rows", e))
    }

    async fn stage(&mut self, rows: Vec<LabelRow>) -> Result<()> {
        let rows: Vec<CacheRow> = rows
            .into_iter()
            .map(|r| CacheRow {
                face_id: r.face_id,
                view: r.view,
                logits: r.logits,
                valence: r.valence,
                arousal: r.arousal,
                embedding: r.embedding,
                landmarks: r.landmarks,
            })
            .collect();
        let s = self
            .cache
            .stage(&self.meta, &self.shard_key, &self.worker, rows)
            .await
            .map_err(|e| Error::storage("staging rows", e))?;
        match &mut self.staged {
            None => self.staged = Some(s),
            Some(all) => {
                all.rows += s.rows;
                all.fragments.extend(s.fragments);
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<String> {
        let staged = match self.staged.take() {
            Some(s) => s,
            // Nothing to label: stage an empty set so the coordinator still records the shard.
            None => self
                .cache
                .stage(&self.meta, &self.shard_key, &self.worker, vec![])
                .await
                .map_err(|e| Error::storage("staging rows", e))?,
        };
        Ok(staged.to_json())
    }
}
