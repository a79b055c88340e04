//! The teacher cache: teacher outputs per (face, teacher fingerprint, view), written by many
//! workers and committed by one coordinator, exactly once per shard.
//!
//! Writing is two-phase. A worker calls [`TeacherCache::stage`], which writes Lance data files and
//! returns their fragment metadata ([`StagedFragments`], serde JSON) without touching the dataset's
//! version history; nothing is visible yet. The committer calls [`TeacherCache::commit`], which
//! appends those fragments in one Lance transaction. Every row carries the shard key that produced
//! it, so the set of committed shards is read back from the data itself and a shard committed a
//! second time (a retried or late worker) is answered with [`CommitOutcome::AlreadyCommitted`]
//! and adds nothing. Shards with no rows are recorded in the manifest config instead.
//!
//! Teacher names and class orders are kept in the manifest config, one key per fingerprint
//! (`distillery.teacher.<fingerprint>`), so logits can always be interpreted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::builder::{
    FixedSizeListBuilder, Float16Builder, Float32Builder, ListBuilder, StringBuilder, UInt32Builder,
};
use arrow_array::{
    Array, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, ListArray, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt32Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use distillery_core::{FaceId, TeacherFingerprint};
use distillery_data::View;
use lance::Dataset;
use lance::dataset::optimize::{CompactionOptions, compact_files};
use lance::dataset::transaction::{Operation, TransactionBuilder};
use lance::dataset::{CommitBuilder, InsertBuilder, WriteMode};
use lance::table::format::Fragment;
use serde::{Deserialize, Serialize};

use crate::faces::FaceStore;
use crate::util::{col, collect, sql_str, store_params, try_open, write_params};
use crate::{Error, Result, StorageOptions};

/// Face id the row belongs to (see the faces dataset). Utf8, not null.
pub const FACE_ID: &str = "face_id";
/// Teacher fingerprint (32 hex): weights + preprocessing. Utf8, not null.
pub const FINGERPRINT: &str = "fingerprint";
/// Human-readable teacher name (e.g. `emonet8`). Utf8, not null.
pub const TEACHER: &str = "teacher";
/// View index: 0 plain, 1..=K augmentations. UInt32, not null.
pub const VIEW: &str = "view";
/// View sub-crop `[x, y, w, h]` relative to the face crop (fractions of its width/height).
/// FixedSizeList<Float32, 4>, not null.
pub const VIEW_CROP: &str = "view_crop";
/// View mirrored left–right after cropping. Boolean, not null.
pub const VIEW_FLIP: &str = "view_flip";
/// Raw (pre-softmax) class logits in the teacher's class order. List<Float32> or List<Float16>.
pub const LOGITS: &str = "logits";
/// Teacher valence in [−1, 1]. Float32, nullable.
pub const VALENCE: &str = "valence";
/// Teacher arousal in [−1, 1]. Float32, nullable.
pub const AROUSAL: &str = "arousal";
/// Teacher feature embedding (penultimate layer). List<Float32>, nullable.
pub const EMBEDDING: &str = "embedding";
/// 68 facial landmarks as x0,y0,x1,y1,... (136 values) in pixels of the model input.
/// List<Float32>, nullable.
pub const LANDMARKS: &str = "landmarks";
/// Key of the shard whose commit produced the row. Utf8, not null.
pub const SHARD: &str = "shard";
/// Worker that computed the row. Utf8, not null.
pub const WORKER: &str = "worker";
/// When the row was staged. Timestamp(µs, UTC), not null.
pub const CREATED_AT: &str = "created_at";

/// Number of values in [`LANDMARKS`] (68 points × (x, y)).
pub const LANDMARK_VALUES: usize = 136;

const CFG_TEACHER: &str = "distillery.teacher.";
const CFG_EMPTY_SHARD: &str = "distillery.shard.empty.";
const CFG_FORMAT: &str = "distillery.cache.format";

/// Storage type of the [`LOGITS`] column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogitsPrecision {
    #[default]
    F32,
    /// Half precision: halves the column; logits keep ~3 significant digits.
    F16,
}

/// Options used when a cache is created. An existing cache keeps its stored precision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheOptions {
    pub logits_precision: LogitsPrecision,
    /// Object-store options (see [`StorageOptions`]).
    #[serde(default)]
    pub storage: StorageOptions,
}

/// One teacher output for one view of one face.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheRow {
    pub face_id: FaceId,
    pub view: View,
    pub logits: Vec<f32>,
    pub valence: Option<f32>,
    pub arousal: Option<f32>,
    pub embedding: Option<Vec<f32>>,
    pub landmarks: Option<Vec<f32>>,
}

/// A teacher as recorded in a cache: its fingerprint, name and class order (index `i` of
/// [`CacheRow::logits`] is `classes[i]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherMeta {
    pub fingerprint: TeacherFingerprint,
    pub name: String,
    pub classes: Vec<String>,
}

/// Data files written by [`TeacherCache::stage`] and not yet committed. Serialises to JSON so a
/// worker can send it to the committer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagedFragments {
    pub shard_key: String,
    pub teacher: TeacherMeta,
    pub worker: String,
    pub precision: LogitsPrecision,
    pub rows: u64,
    pub fragments: Vec<Fragment>,
}

impl StagedFragments {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("staged fragments serialise")
    }

    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Error::invalid("staged fragments JSON", e.to_string()))
    }
}

/// Result of [`TeacherCache::commit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitOutcome {
    /// The shard's rows are now visible at `version`.
    Committed { version: u64 },
    /// The shard had been committed before; nothing was added.
    AlreadyCommitted,
}

/// Rows of one teacher in a cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TeacherSummary {
    pub fingerprint: TeacherFingerprint,
    pub name: String,
    pub classes: Vec<String>,
    pub rows: u64,
}

/// Overview of a cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheSummary {
    pub uri: String,
    pub version: u64,
    pub rows: u64,
    pub fragments: usize,
    pub shards: usize,
    pub precision: LogitsPrecision,
    pub teachers: Vec<TeacherSummary>,
    /// Rows per view index.
    pub views: BTreeMap<u32, u64>,
    /// Every version still stored: (version, timestamp RFC 3339).
    pub versions: Vec<(u64, String)>,
}

/// How many faces of a faces dataset have the plain view (0) labelled by one teacher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub faces: u64,
    pub covered: u64,
    pub missing: u64,
}

/// Result of [`TeacherCache::compact`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactStats {
    pub fragments_before: usize,
    pub fragments_after: usize,
    pub version: u64,
}

/// Result of [`TeacherCache::cleanup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupStats {
    pub old_versions: u64,
    pub bytes_removed: u64,
    pub data_files_removed: u64,
}

/// Arrow schema of the teacher cache for a logits precision.
pub fn cache_schema(precision: LogitsPrecision) -> SchemaRef {
    let logit_type = match precision {
        LogitsPrecision::F32 => DataType::Float32,
        LogitsPrecision::F16 => DataType::Float16,
    };
    let list = |t: DataType| DataType::List(Arc::new(Field::new_list_field(t, true)));
    Arc::new(Schema::new(vec![
        Field::new(FACE_ID, DataType::Utf8, false),
        Field::new(FINGERPRINT, DataType::Utf8, false),
        Field::new(TEACHER, DataType::Utf8, false),
        Field::new(VIEW, DataType::UInt32, false),
        Field::new(
            VIEW_CROP,
            DataType::FixedSizeList(Arc::new(Field::new_list_field(DataType::Float32, true)), 4),
            false,
        ),
        Field::new(VIEW_FLIP, DataType::Boolean, false),
        Field::new(LOGITS, list(logit_type), false),
        Field::new(VALENCE, DataType::Float32, true),
        Field::new(AROUSAL, DataType::Float32, true),
        Field::new(EMBEDDING, list(DataType::Float32), true),
        Field::new(LANDMARKS, list(DataType::Float32), true),
        Field::new(SHARD, DataType::Utf8, false),
        Field::new(WORKER, DataType::Utf8, false),
        Field::new(CREATED_AT, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
    ]))
}

/// The teacher cache at one URI (local path or `s3://`).
pub struct TeacherCache {
    uri: String,
    storage: StorageOptions,
    precision: LogitsPrecision,
    ds: Option<Dataset>,
    /// Committed shard keys as of a dataset version (rebuilt when the version moves).
    committed: Mutex<Option<(u64, HashSet<String>)>>,
}

impl TeacherCache {
    /// Opens the cache at `uri`, or prepares to create it (with `opts.logits_precision`) on the
    /// first commit. An existing cache keeps the precision it was created with.
    pub async fn create_or_open(uri: &str, opts: CacheOptions) -> Result<Self> {
        let ds = try_open(uri, &opts.storage).await?;
        let mut precision = opts.logits_precision;
        if let Some(ds) = &ds {
            let stored = stored_precision(ds, uri)?;
            if stored != precision {
                tracing::warn!(uri, ?stored, requested = ?precision, "cache keeps its stored logits precision");
            }
            precision = stored;
        }
        Ok(Self { uri: uri.to_owned(), storage: opts.storage, precision, ds, committed: Mutex::new(None) })
    }

    /// Opens an existing cache; errors if there is none at `uri`.
    pub async fn open(uri: &str) -> Result<Self> {
        Self::open_with(uri, StorageOptions::new()).await
    }

    /// [`Self::open`] with explicit object-store options.
    pub async fn open_with(uri: &str, storage: StorageOptions) -> Result<Self> {
        let ds = try_open(uri, &storage)
            .await?
            .ok_or_else(|| Error::NotFound { uri: uri.to_owned(), what: "teacher cache" })?;
        let precision = stored_precision(&ds, uri)?;
        Ok(Self { uri: uri.to_owned(), storage, precision, ds: Some(ds), committed: Mutex::new(None) })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn precision(&self) -> LogitsPrecision {
        self.precision
    }

    /// Dataset version (0 before the first commit).
    pub fn version(&self) -> u64 {
        self.ds.as_ref().map_or(0, |d| d.version().version)
    }

    /// The opened Lance dataset (None before the first commit).
    pub fn dataset(&self) -> Option<&Dataset> {
        self.ds.as_ref()
    }

    /// Re-reads the latest version (after another process committed).
    pub async fn refresh(&mut self) -> Result<()> {
        match self.ds.as_mut() {
            Some(ds) => {
                ds.checkout_latest().await.map_err(|e| Error::lance("checkout latest", &self.uri, e))?
            }
            None => {
                self.ds = try_open(&self.uri, &self.storage).await?;
                if let Some(ds) = &self.ds {
                    self.precision = stored_precision(ds, &self.uri)?;
                }
            }
        }
        Ok(())
    }

    /// Teachers recorded in the manifest config.
    pub fn teachers(&self) -> Result<Vec<TeacherMeta>> {
        let Some(ds) = &self.ds else { return Ok(vec![]) };
        let mut out = Vec::new();
        for (k, v) in ds.config() {
            if k.starts_with(CFG_TEACHER) {
                out.push(
                    serde_json::from_str::<TeacherMeta>(v)
                        .map_err(|e| Error::invalid(format!("{}: config `{k}`", self.uri), e.to_string()))?,
                );
            }
        }
        out.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        Ok(out)
    }

    /// The recorded teacher with this fingerprint.
    pub fn teacher(&self, fingerprint: &TeacherFingerprint) -> Result<Option<TeacherMeta>> {
        Ok(self.teachers()?.into_iter().find(|t| &t.fingerprint == fingerprint))
    }

    /// Phase 1 (workers): writes `rows` as data files and returns their fragments, uncommitted.
    pub async fn stage(
        &self,
        meta: &TeacherMeta,
        shard_key: &str,
        worker: &str,
        rows: Vec<CacheRow>,
    ) -> Result<StagedFragments> {
        validate_rows(meta, shard_key, &rows)?;
        let n = rows.len() as u64;
        let mut staged = StagedFragments {
            shard_key: shard_key.to_owned(),
            teacher: meta.clone(),
            worker: worker.to_owned(),
            precision: self.precision,
            rows: n,
            fragments: vec![],
        };
        if rows.is_empty() {
            return Ok(staged);
        }
        let batch = rows_to_batch(meta, shard_key, worker, &rows, self.precision)?;
        // The dataset may have been created since this handle was opened.
        let current = match &self.ds {
            Some(ds) => Some(ds.clone()),
            None => try_open(&self.uri, &self.storage).await?,
        };
        let txn = match current {
            Some(ds) => {
                let stored = stored_precision(&ds, &self.uri)?;
                if stored != self.precision {
                    return Err(Error::invalid(
                        shard_key,
                        format!(
                            "cache `{}` stores {stored:?} logits, this handle writes {:?}",
                            self.uri, self.precision
                        ),
                    ));
                }
                let params = write_params(&self.storage, WriteMode::Append);
                InsertBuilder::new(Arc::new(ds)).with_params(&params).execute_uncommitted(vec![batch]).await
            }
            None => {
                let params = write_params(&self.storage, WriteMode::Create);
                InsertBuilder::new(self.uri.as_str())
                    .with_params(&params)
                    .execute_uncommitted(vec![batch])
                    .await
            }
        }
        .map_err(|e| Error::lance("stage shard", &self.uri, e))?;
        staged.fragments = match txn.operation {
            Operation::Append { fragments } | Operation::Overwrite { fragments, .. } => fragments,
            other => {
                return Err(Error::invalid(
                    shard_key,
                    format!("unexpected staged operation {}", other.name()),
                ));
            }
        };
        Ok(staged)
    }

    /// Phase 2 (the committer): makes staged rows visible, once per shard key. Creates the dataset
    /// on the first commit.
    pub async fn commit(&mut self, shard_key: &str, staged: StagedFragments) -> Result<CommitOutcome> {
        if staged.shard_key != shard_key {
            return Err(Error::invalid(
                shard_key,
                format!("staged fragments belong to shard `{}`", staged.shard_key),
            ));
        }
        self.refresh().await?;
        if self.committed_shards().await?.contains(shard_key) {
            tracing::info!(uri = %self.uri, shard_key, "shard already committed; staged rows dropped");
            return Ok(CommitOutcome::AlreadyCommitted);
        }
        if self.ds.is_some() && staged.precision != self.precision {
            return Err(Error::invalid(
                shard_key,
                format!("staged {:?} logits into a cache storing {:?}", staged.precision, self.precision),
            ));
        }
        let meta = &staged.teacher;
        let meta_key = format!("{CFG_TEACHER}{}", meta.fingerprint);
        let meta_json = serde_json::to_string(meta).expect("teacher meta serialises");
        let mut config: HashMap<String, String> = HashMap::new();
        match self.teacher(&meta.fingerprint)? {
            Some(known) if known != *meta => {
                return Err(Error::invalid(
                    shard_key,
                    format!("teacher {} is recorded as {known:?}, staged as {meta:?}", meta.fingerprint),
                ));
            }
            Some(_) => {}
            None => {
                config.insert(meta_key, meta_json);
            }
        }
        if staged.fragments.is_empty() {
            config.insert(format!("{CFG_EMPTY_SHARD}{shard_key}"), staged.worker.clone());
        }
        let base = self.version();
        let mut own_commits = 0;
        let version = match self.ds.take() {
            None => {
                self.precision = staged.precision;
                config.insert(CFG_FORMAT.into(), "1".into());
                let schema = lance::datatypes::Schema::try_from(cache_schema(self.precision).as_ref())
                    .map_err(|e| Error::lance("cache schema", &self.uri, e))?;
                let op = Operation::Overwrite {
                    fragments: staged.fragments,
                    schema,
                    config_upsert_values: Some(config),
                    initial_bases: None,
                };
                let mut b = CommitBuilder::new(self.uri.as_str());
                if let Some(p) = store_params(&self.storage) {
                    b = b.with_store_params(p);
                }
                let ds = b
                    .execute(TransactionBuilder::new(0, op).build())
                    .await
                    .map_err(|e| Error::lance("create cache", &self.uri, e))?;
                let v = ds.version().version;
                self.ds = Some(ds);
                own_commits = v;
                v
            }
            Some(mut ds) => {
                if !config.is_empty() {
                    // Metadata goes first: a crash after it leaves a teacher without rows, harmless.
                    if let Err(e) = ds.update_config(config).await {
                        self.ds = Some(ds);
                        return Err(Error::lance("update cache config", &self.uri, e));
                    }
                    own_commits += 1;
                }
                if !staged.fragments.is_empty() {
                    let read = ds.version().version;
                    let op = Operation::Append { fragments: staged.fragments };
                    let ds_arc = Arc::new(ds);
                    match CommitBuilder::new(ds_arc.clone())
                        .execute(TransactionBuilder::new(read, op).build())
                        .await
                    {
                        Ok(new) => {
                            ds = new;
                            own_commits += 1;
                        }
                        Err(e) => {
                            self.ds = Some(Arc::unwrap_or_clone(ds_arc));
                            return Err(Error::lance("commit shard", &self.uri, e));
                        }
                    }
                }
                let v = ds.version().version;
                self.ds = Some(ds);
                v
            }
        };
        let mut guard = self.committed.lock().expect("committed-set lock");
        match guard.as_mut() {
            // Our own commits are the only ones since the set was built: extend it.
            Some((v, set)) if *v == base && version == base + own_commits => {
                set.insert(shard_key.to_owned());
                *v = version;
            }
            _ => *guard = None,
        }
        Ok(CommitOutcome::Committed { version })
    }

    /// Keys of every committed shard (as of the opened version).
    pub async fn committed_shards(&self) -> Result<HashSet<String>> {
        let Some(ds) = &self.ds else { return Ok(HashSet::new()) };
        let version = ds.version().version;
        if let Some((v, set)) = self.committed.lock().expect("committed-set lock").as_ref()
            && *v == version
        {
            return Ok(set.clone());
        }
        let mut set: HashSet<String> =
            ds.config().keys().filter_map(|k| k.strip_prefix(CFG_EMPTY_SHARD).map(str::to_owned)).collect();
        let mut scan = ds.scan();
        scan.project(&[SHARD]).map_err(|e| Error::lance("scan shard keys", &self.uri, e))?;
        for b in collect(&scan, &self.uri).await? {
            let s = col::<StringArray>(&b, SHARD, &self.uri)?;
            for i in 0..s.len() {
                if !set.contains(s.value(i)) {
                    set.insert(s.value(i).to_owned());
                }
            }
        }
        *self.committed.lock().expect("committed-set lock") = Some((version, set.clone()));
        Ok(set)
    }

    /// (face, view) pairs already labelled by the teacher `fingerprint`.
    pub async fn existing(&self, fingerprint: &TeacherFingerprint) -> Result<HashSet<(FaceId, u32)>> {
        let Some(ds) = &self.ds else { return Ok(HashSet::new()) };
        let mut scan = ds.scan();
        scan.project(&[FACE_ID, VIEW]).map_err(|e| Error::lance("scan", &self.uri, e))?;
        scan.filter(&format!("{FINGERPRINT} = {}", sql_str(fingerprint.as_str())))
            .map_err(|e| Error::lance("filter fingerprint", &self.uri, e))?;
        let mut out = HashSet::new();
        for b in collect(&scan, &self.uri).await? {
            let ids = col::<StringArray>(&b, FACE_ID, &self.uri)?;
            let views = col::<UInt32Array>(&b, VIEW, &self.uri)?;
            for i in 0..b.num_rows() {
                out.insert((parse_id(ids.value(i), &self.uri)?, views.value(i)));
            }
        }
        Ok(out)
    }

    /// Every row of one teacher, in storage order.
    pub async fn rows(&self, fingerprint: &TeacherFingerprint) -> Result<Vec<CacheRow>> {
        let Some(ds) = &self.ds else { return Ok(vec![]) };
        let mut scan = ds.scan();
        scan.project(&ROW_COLUMNS).map_err(|e| Error::lance("scan", &self.uri, e))?;
        scan.filter(&format!("{FINGERPRINT} = {}", sql_str(fingerprint.as_str())))
            .map_err(|e| Error::lance("filter fingerprint", &self.uri, e))?;
        scan.scan_in_order(true);
        let mut out = Vec::new();
        for b in collect(&scan, &self.uri).await? {
            out.extend(batch_to_rows(&b, &self.uri)?);
        }
        Ok(out)
    }

    /// Keys of one teacher's rows: (face, view, Lance row id), for the streaming reader's index.
    pub(crate) async fn row_index(
        &self,
        fingerprint: &TeacherFingerprint,
    ) -> Result<Vec<(FaceId, u32, u64)>> {
        let Some(ds) = &self.ds else { return Ok(vec![]) };
        let mut scan = ds.scan();
        scan.project(&[FACE_ID, VIEW]).map_err(|e| Error::lance("scan", &self.uri, e))?;
        scan.with_row_id();
        scan.filter(&format!("{FINGERPRINT} = {}", sql_str(fingerprint.as_str())))
            .map_err(|e| Error::lance("filter fingerprint", &self.uri, e))?;
        let mut out = Vec::new();
        for b in collect(&scan, &self.uri).await? {
            let ids = col::<StringArray>(&b, FACE_ID, &self.uri)?;
            let views = col::<UInt32Array>(&b, VIEW, &self.uri)?;
            let rid = col::<arrow_array::UInt64Array>(&b, lance::dataset::ROW_ID, &self.uri)?;
            for i in 0..b.num_rows() {
                out.push((parse_id(ids.value(i), &self.uri)?, views.value(i), rid.value(i)));
            }
        }
        Ok(out)
    }

    /// Teachers, views, rows and versions of the cache.
    pub async fn summary(&self) -> Result<CacheSummary> {
        let mut s = CacheSummary {
            uri: self.uri.clone(),
            version: self.version(),
            rows: 0,
            fragments: 0,
            shards: 0,
            precision: self.precision,
            teachers: vec![],
            views: BTreeMap::new(),
            versions: vec![],
        };
        let Some(ds) = &self.ds else { return Ok(s) };
        s.fragments = ds.count_fragments();
        s.shards = self.committed_shards().await?.len();
        s.versions = ds
            .versions()
            .await
            .map_err(|e| Error::lance("list versions", &self.uri, e))?
            .into_iter()
            .map(|v| (v.version, v.timestamp.to_rfc3339()))
            .collect();
        let mut per_fp: BTreeMap<String, (String, u64)> = BTreeMap::new();
        let mut scan = ds.scan();
        scan.project(&[FINGERPRINT, TEACHER, VIEW]).map_err(|e| Error::lance("scan", &self.uri, e))?;
        for b in collect(&scan, &self.uri).await? {
            let fp = col::<StringArray>(&b, FINGERPRINT, &self.uri)?;
            let name = col::<StringArray>(&b, TEACHER, &self.uri)?;
            let view = col::<UInt32Array>(&b, VIEW, &self.uri)?;
            for i in 0..b.num_rows() {
                s.rows += 1;
                *s.views.entry(view.value(i)).or_default() += 1;
                match per_fp.get_mut(fp.value(i)) {
                    Some(e) => e.1 += 1,
                    None => {
                        per_fp.insert(fp.value(i).to_owned(), (name.value(i).to_owned(), 1));
                    }
                }
            }
        }
        let metas = self.teachers()?;
        for (fp, (name, rows)) in per_fp {
            let fingerprint = TeacherFingerprint::parse(&fp)
                .map_err(|e| Error::column(&self.uri, FINGERPRINT, e.to_string()))?;
            let classes = metas
                .iter()
                .find(|m| m.fingerprint == fingerprint)
                .map(|m| m.classes.clone())
                .unwrap_or_default();
            s.teachers.push(TeacherSummary { fingerprint, name, classes, rows });
        }
        Ok(s)
    }

    /// How many faces of `faces` have their plain view labelled by `fingerprint`.
    pub async fn coverage(&self, faces: &FaceStore, fingerprint: &TeacherFingerprint) -> Result<Coverage> {
        let ids = faces.ids().await?;
        let done = self.existing(fingerprint).await?;
        let covered = ids.iter().filter(|id| done.contains(&((*id).clone(), 0))).count() as u64;
        Ok(Coverage { faces: ids.len() as u64, covered, missing: ids.len() as u64 - covered })
    }

    /// Rewrites small fragments (one per committed shard) into large ones. Rows are unchanged.
    pub async fn compact(&mut self) -> Result<CompactStats> {
        let Some(ds) = self.ds.as_mut() else {
            return Ok(CompactStats { fragments_before: 0, fragments_after: 0, version: 0 });
        };
        ds.checkout_latest().await.map_err(|e| Error::lance("checkout latest", &self.uri, e))?;
        let before = ds.count_fragments();
        compact_files(ds, CompactionOptions::default(), None)
            .await
            .map_err(|e| Error::lance("compact", &self.uri, e))?;
        Ok(CompactStats {
            fragments_before: before,
            fragments_after: ds.count_fragments(),
            version: ds.version().version,
        })
    }

    /// Deletes versions older than `older_than` and the files only they referenced. Files of
    /// staged but never committed shards are left to Lance's own grace period.
    pub async fn cleanup(&mut self, older_than: Duration) -> Result<CleanupStats> {
        let Some(ds) = self.ds.as_ref() else {
            return Ok(CleanupStats { old_versions: 0, bytes_removed: 0, data_files_removed: 0 });
        };
        let older = chrono::TimeDelta::from_std(older_than)
            .map_err(|e| Error::invalid("older_than", e.to_string()))?;
        let r = ds
            .cleanup_old_versions(older, Some(false), Some(false))
            .await
            .map_err(|e| Error::lance("cleanup", &self.uri, e))?;
        Ok(CleanupStats {
            old_versions: r.old_versions,
            bytes_removed: r.bytes_removed,
            data_files_removed: r.data_files_removed,
        })
    }
}

/// Reads cache rows by Lance row id, in the order given.
pub(crate) async fn take_rows_from(ds: &Dataset, row_ids: &[u64]) -> Result<Vec<CacheRow>> {
    if row_ids.is_empty() {
        return Ok(vec![]);
    }
    let uri = ds.uri();
    let schema = ds.schema().project(&ROW_COLUMNS).map_err(|e| Error::lance("project", uri, e))?;
    let b = ds.take_rows(row_ids, schema).await.map_err(|e| Error::lance("take rows", uri, e))?;
    let rows = batch_to_rows(&b, uri)?;
    if rows.len() != row_ids.len() {
        return Err(Error::column(
            uri,
            lance::dataset::ROW_ID,
            format!("took {} rows for {} row ids", rows.len(), row_ids.len()),
        ));
    }
    Ok(rows)
}

const ROW_COLUMNS: [&str; 10] =
    [FACE_ID, VIEW, VIEW_CROP, VIEW_FLIP, LOGITS, VALENCE, AROUSAL, EMBEDDING, LANDMARKS, FINGERPRINT];

fn parse_id(s: &str, uri: &str) -> Result<FaceId> {
    FaceId::parse(s).map_err(|e| Error::column(uri, FACE_ID, e.to_string()))
}

fn stored_precision(ds: &Dataset, uri: &str) -> Result<LogitsPrecision> {
    let f = ds.schema().field(LOGITS).ok_or_else(|| Error::column(uri, LOGITS, "missing"))?;
    match f.data_type() {
        DataType::List(inner) if inner.data_type() == &DataType::Float32 => Ok(LogitsPrecision::F32),
        DataType::List(inner) if inner.data_type() == &DataType::Float16 => Ok(LogitsPrecision::F16),
        t => Err(Error::column(uri, LOGITS, format!("unexpected type {t}"))),
    }
}

fn validate_rows(meta: &TeacherMeta, shard_key: &str, rows: &[CacheRow]) -> Result<()> {
    if shard_key.is_empty() {
        return Err(Error::invalid("shard_key", "must not be empty"));
    }
    let mut seen = HashSet::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let key = || format!("shard {shard_key} row {i} (face {} view {})", r.face_id, r.view.index);
        if !seen.insert((&r.face_id, r.view.index)) {
            return Err(Error::invalid(key(), "duplicate (face, view) in one shard"));
        }
        if !meta.classes.is_empty() && r.logits.len() != meta.classes.len() {
            return Err(Error::invalid(
                key(),
                format!(
                    "{} logits for {} classes of teacher {}",
                    r.logits.len(),
                    meta.classes.len(),
                    meta.name
                ),
            ));
        }
        if r.logits.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(key(), "non-finite logit"));
        }
        if let Some(l) = &r.landmarks
            && l.len() != LANDMARK_VALUES
        {
            return Err(Error::invalid(
                key(),
                format!("{} landmark values, expected {LANDMARK_VALUES}", l.len()),
            ));
        }
    }
    Ok(())
}

fn rows_to_batch(
    meta: &TeacherMeta,
    shard_key: &str,
    worker: &str,
    rows: &[CacheRow],
    precision: LogitsPrecision,
) -> Result<RecordBatch> {
    let n = rows.len();
    let mut face = StringBuilder::with_capacity(n, n * 32);
    let mut fp = StringBuilder::with_capacity(n, n * 32);
    let mut teacher = StringBuilder::new();
    let mut view = UInt32Builder::with_capacity(n);
    let mut crop = FixedSizeListBuilder::new(Float32Builder::new(), 4);
    let mut flip = arrow_array::builder::BooleanBuilder::with_capacity(n);
    let mut logits32 = ListBuilder::new(Float32Builder::new());
    let mut logits16 = ListBuilder::new(Float16Builder::new());
    let mut valence = Float32Builder::with_capacity(n);
    let mut arousal = Float32Builder::with_capacity(n);
    let mut emb = ListBuilder::new(Float32Builder::new());
    let mut lmk = ListBuilder::new(Float32Builder::new());
    let mut shard = StringBuilder::new();
    let mut wk = StringBuilder::new();
    let now = chrono::Utc::now().timestamp_micros();
    for r in rows {
        face.append_value(r.face_id.as_str());
        fp.append_value(meta.fingerprint.as_str());
        teacher.append_value(&meta.name);
        view.append_value(r.view.index);
        crop.values().append_slice(&r.view.crop);
        crop.append(true);
        flip.append_value(r.view.flip);
        match precision {
            LogitsPrecision::F32 => {
                logits32.values().append_slice(&r.logits);
                logits32.append(true);
            }
            LogitsPrecision::F16 => {
                for v in &r.logits {
                    logits16.values().append_value(half::f16::from_f32(*v));
                }
                logits16.append(true);
            }
        }
        valence.append_option(r.valence);
        arousal.append_option(r.arousal);
        for (b, v) in [(&mut emb, &r.embedding), (&mut lmk, &r.landmarks)] {
            match v {
                Some(v) => {
                    b.values().append_slice(v);
                    b.append(true);
                }
                None => b.append(false),
            }
        }
        shard.append_value(shard_key);
        wk.append_value(worker);
    }
    let logits: Arc<dyn Array> = match precision {
        LogitsPrecision::F32 => Arc::new(logits32.finish()),
        LogitsPrecision::F16 => Arc::new(logits16.finish()),
    };
    let created = TimestampMicrosecondArray::from(vec![now; n]).with_timezone("UTC");
    RecordBatch::try_new(
        cache_schema(precision),
        vec![
            Arc::new(face.finish()),
            Arc::new(fp.finish()),
            Arc::new(teacher.finish()),
            Arc::new(view.finish()),
            Arc::new(crop.finish()),
            Arc::new(flip.finish()),
            logits,
            Arc::new(valence.finish()),
            Arc::new(arousal.finish()),
            Arc::new(emb.finish()),
            Arc::new(lmk.finish()),
            Arc::new(shard.finish()),
            Arc::new(wk.finish()),
            Arc::new(created),
        ],
    )
    .map_err(|e| Error::invalid(format!("shard {shard_key}"), e.to_string()))
}

fn f32_list(list: &ListArray, i: usize, uri: &str, name: &str) -> Result<Option<Vec<f32>>> {
    if list.is_null(i) {
        return Ok(None);
    }
    let v = list.value(i);
    if let Some(a) = v.as_any().downcast_ref::<Float32Array>() {
        Ok(Some(a.values().to_vec()))
    } else if let Some(a) = v.as_any().downcast_ref::<Float16Array>() {
        Ok(Some(a.values().iter().map(|h| h.to_f32()).collect()))
    } else {
        Err(Error::column(uri, name, format!("unexpected item type {}", v.data_type())))
    }
}

fn batch_to_rows(b: &RecordBatch, uri: &str) -> Result<Vec<CacheRow>> {
    let face = col::<StringArray>(b, FACE_ID, uri)?;
    let view = col::<UInt32Array>(b, VIEW, uri)?;
    let crop = col::<FixedSizeListArray>(b, VIEW_CROP, uri)?;
    let crop_v = crop
        .values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .ok_or_else(|| Error::column(uri, VIEW_CROP, "values are not f32"))?;
    let flip = col::<BooleanArray>(b, VIEW_FLIP, uri)?;
    let logits = col::<ListArray>(b, LOGITS, uri)?;
    let valence = col::<Float32Array>(b, VALENCE, uri)?;
    let arousal = col::<Float32Array>(b, AROUSAL, uri)?;
    let emb = col::<ListArray>(b, EMBEDDING, uri)?;
    let lmk = col::<ListArray>(b, LANDMARKS, uri)?;
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let o = crop.value_offset(i) as usize;
        out.push(CacheRow {
            face_id: parse_id(face.value(i), uri)?,
            view: View {
                index: view.value(i),
                crop: [crop_v.value(o), crop_v.value(o + 1), crop_v.value(o + 2), crop_v.value(o + 3)],
                flip: flip.value(i),
            },
            logits: f32_list(logits, i, uri, LOGITS)?.unwrap_or_default(),
            valence: valence.is_valid(i).then(|| valence.value(i)),
            arousal: arousal.is_valid(i).then(|| arousal.value(i)),
            embedding: f32_list(emb, i, uri, EMBEDDING)?,
            landmarks: f32_list(lmk, i, uri, LANDMARKS)?,
        });
    }
    Ok(out)
}
