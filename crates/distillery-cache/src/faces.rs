//! The faces dataset: every ingested face with its encoded image and labels, one row per face,
//! plus a sibling dataset of rejected inputs.
//!
//! Rows are keyed by [`FaceId`] (content hash of image bytes and box), and appends skip ids that
//! are already stored, so re-ingesting the same files adds nothing. Images are stored exactly as
//! read (PNG/JPEG bytes); crops and views are made at read time.
//!
//! Layout: the faces dataset is the Lance dataset at the URI itself (so any Lance reader opens it);
//! rejects go to the sibling dataset [`rejects_uri`] (`faces.lance` → `faces.rejects.lance`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow_array::builder::{
    FixedSizeListBuilder, Float32Builder, LargeBinaryBuilder, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{
    Array, FixedSizeListArray, Float32Array, LargeBinaryArray, RecordBatch, RecordBatchIterator, StringArray,
    UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use distillery_core::FaceId;
use distillery_data::{FaceRecord, Reject, Split};
use lance::Dataset;
use lance::dataset::optimize::{CompactionOptions, compact_files};
use lance::dataset::{InsertBuilder, WriteMode};
use serde::{Deserialize, Serialize};

use crate::util::{col, collect, sql_str, try_open, write_params};
use crate::{Error, Result, StorageOptions};

/// Content id of the face (32 lower-case hex characters, see `FaceId`). Utf8, not null, unique.
pub const FACE_ID: &str = "face_id";
/// Encoded image bytes exactly as read from the source. LargeBinary, not null.
pub const IMAGE: &str = "image";
/// Encoding of [`IMAGE`]: `"png"` or `"jpeg"`. Utf8, not null.
pub const FORMAT: &str = "format";
/// Width of the decoded image in pixels. UInt32, not null.
pub const WIDTH: &str = "width";
/// Height of the decoded image in pixels. UInt32, not null.
pub const HEIGHT: &str = "height";
/// Face box `[x, y, w, h]` in pixels on the image. FixedSizeList<Float32, 4>, null = whole image.
pub const BOX: &str = "box";
/// Expression class index into the dataset's class set (EmoNet order for AffectNet). UInt32, nullable.
pub const LABEL: &str = "label";
/// Valence in [−1, 1]. Float32, nullable.
pub const VALENCE: &str = "valence";
/// Arousal in [−1, 1]. Float32, nullable.
pub const AROUSAL: &str = "arousal";
/// Dataset split: `"train"`, `"val"` or `"test"`. Utf8, not null.
pub const SPLIT: &str = "split";
/// Where the face came from (file path/URI, or `synth:<seed>:<index>`). Utf8, not null.
pub const SOURCE: &str = "source";

/// Rejects dataset: file path or URI of the rejected input. Utf8, not null.
pub const REJECT_SOURCE: &str = "source";
/// Rejects dataset: 1-based manifest row, when the input came from a CSV/JSONL manifest. UInt64, nullable.
pub const REJECT_ROW: &str = "row";
/// Rejects dataset: why the input was rejected. Utf8, not null.
pub const REJECT_REASON: &str = "reason";

/// Arrow schema of the faces dataset.
pub fn faces_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(FACE_ID, DataType::Utf8, false),
        Field::new(IMAGE, DataType::LargeBinary, false),
        Field::new(FORMAT, DataType::Utf8, false),
        Field::new(WIDTH, DataType::UInt32, false),
        Field::new(HEIGHT, DataType::UInt32, false),
        Field::new(
            BOX,
            DataType::FixedSizeList(Arc::new(Field::new_list_field(DataType::Float32, true)), 4),
            true,
        ),
        Field::new(LABEL, DataType::UInt32, true),
        Field::new(VALENCE, DataType::Float32, true),
        Field::new(AROUSAL, DataType::Float32, true),
        Field::new(SPLIT, DataType::Utf8, false),
        Field::new(SOURCE, DataType::Utf8, false),
    ]))
}

/// Arrow schema of the rejects dataset.
pub fn rejects_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(REJECT_SOURCE, DataType::Utf8, false),
        Field::new(REJECT_ROW, DataType::UInt64, true),
        Field::new(REJECT_REASON, DataType::Utf8, false),
    ]))
}

/// URI of the rejects dataset beside the faces dataset at `uri`: a trailing `.lance` is replaced by
/// `.rejects.lance`, otherwise `.rejects.lance` is appended.
pub fn rejects_uri(uri: &str) -> String {
    let base = uri.trim_end_matches('/');
    let stem = base.strip_suffix(".lance").unwrap_or(base);
    format!("{stem}.rejects.lance")
}

/// What an append did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendStats {
    /// Rows written.
    pub added: u64,
    /// Records skipped because their id was already stored or repeated within the batch.
    pub duplicates: u64,
}

/// What [`FaceStore::ingest`] or [`FaceStore::synthesize`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IngestTotals {
    /// The input's counts, with `accepted` = rows this run wrote.
    #[serde(flatten)]
    pub report: distillery_data::ingest::IngestReport,
    /// Faces already in the dataset before this run (re-ingesting adds nothing).
    pub already_stored: u64,
    /// The dataset's version afterwards.
    pub version: u64,
}

/// A contiguous run of rows of one fragment: the unit of work handed to a teacher worker.
/// `offset` counts live rows from the start of the fragment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardRange {
    pub fragment_id: u64,
    pub offset: u64,
    pub len: u64,
}

impl ShardRange {
    /// A stable text key for this shard (`f<fragment>:<offset>+<len>`), used as the teacher-cache
    /// shard key when a worker labels it.
    pub fn key(&self) -> String {
        format!("f{}:{}+{}", self.fragment_id, self.offset, self.len)
    }
}

/// Mean and standard deviation (population) of a label over the rows that have it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    pub count: u64,
    pub mean: f64,
    pub std: f64,
}

/// Summary of a faces dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaceStats {
    pub version: u64,
    pub faces: u64,
    pub rejects: u64,
    /// Faces per split name.
    pub splits: BTreeMap<String, u64>,
    /// Faces per (split, class index); unlabelled faces are not counted here.
    pub classes: BTreeMap<String, BTreeMap<u32, u64>>,
    pub unlabelled: u64,
    pub valence: Option<MeanStd>,
    pub arousal: Option<MeanStd>,
}

/// The faces dataset at one URI (local path or `s3://`), with its rejects beside it.
pub struct FaceStore {
    uri: String,
    options: StorageOptions,
    ds: Option<Dataset>,
    /// Ids already stored, loaded on the first append (one scan of the id column).
    known: Option<HashSet<FaceId>>,
}

impl FaceStore {
    /// Streams an ingest into the store chunk by chunk (faces and their rejects; memory stays
    /// bounded by one chunk, and what was written before an error stays written), calling
    /// `on_progress(rows read)` after each chunk.
    pub async fn ingest(
        &mut self,
        mut ingest: distillery_data::ingest::Ingest,
        mut on_progress: impl FnMut(u64),
    ) -> Result<IngestTotals> {
        let (mut accepted, mut already) = (0u64, 0u64);
        loop {
            // Reading and decoding a chunk is CPU work: off the async threads.
            let (chunk, returned) = tokio::task::spawn_blocking(move || (ingest.next(), ingest))
                .await
                .map_err(|e| Error::Stream(format!("ingest reader: {e}")))?;
            ingest = returned;
            let Some(chunk) = chunk else { break };
            self.append_rejects(chunk.rejects).await?;
            let s = self.append(chunk.faces).await?;
            accepted += s.added;
            already += s.duplicates;
            let r = ingest.report();
            on_progress(r.accepted + r.rejected + r.skipped);
        }
        let mut report = ingest.report();
        report.accepted = accepted;
        Ok(IngestTotals { report, already_stored: already, version: self.version() })
    }

    /// Generates `cfg.count` synthetic faces into the store, 512 at a time, calling
    /// `on_progress(faces generated)` after each batch. Regenerating with the same seed adds
    /// nothing (the faces are already stored).
    pub async fn synthesize(
        &mut self,
        cfg: &distillery_data::synth::SynthConfig,
        mut on_progress: impl FnMut(u64),
    ) -> Result<IngestTotals> {
        const BATCH: u64 = 512;
        let (mut added, mut already) = (0u64, 0u64);
        let mut start = 0u64;
        while start < cfg.count {
            let end = (start + BATCH).min(cfg.count);
            let c = cfg.clone();
            let records =
                tokio::task::spawn_blocking(move || distillery_data::synth::generate_batch(&c, start..end))
                    .await
                    .map_err(|e| Error::Stream(format!("synthetic faces: {e}")))?;
            let s = self.append(records).await?;
            added += s.added;
            already += s.duplicates;
            on_progress(end);
            start = end;
        }
        let report = distillery_data::ingest::IngestReport { accepted: added, ..Default::default() };
        Ok(IngestTotals { report, already_stored: already, version: self.version() })
    }

    /// Opens an existing faces dataset; errors if there is none at `uri`.
    pub async fn open(uri: &str) -> Result<Self> {
        Self::open_with(uri, StorageOptions::new()).await
    }

    /// [`Self::open`] with explicit object-store options.
    pub async fn open_with(uri: &str, options: StorageOptions) -> Result<Self> {
        let ds = try_open(uri, &options)
            .await?
            .ok_or_else(|| Error::NotFound { uri: uri.to_owned(), what: "faces dataset" })?;
        Ok(Self { uri: uri.to_owned(), options, ds: Some(ds), known: None })
    }

    /// Opens the faces dataset at `uri`, or prepares to create it on the first append.
    pub async fn create_or_open(uri: &str) -> Result<Self> {
        Self::create_or_open_with(uri, StorageOptions::new()).await
    }

    /// [`Self::create_or_open`] with explicit object-store options.
    pub async fn create_or_open_with(uri: &str, options: StorageOptions) -> Result<Self> {
        let ds = try_open(uri, &options).await?;
        Ok(Self { uri: uri.to_owned(), options, ds, known: None })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn storage_options(&self) -> &StorageOptions {
        &self.options
    }

    /// The opened Lance dataset (None before the first append).
    pub fn dataset(&self) -> Option<&Dataset> {
        self.ds.as_ref()
    }

    /// Dataset version (0 before the first append).
    pub fn version(&self) -> u64 {
        self.ds.as_ref().map_or(0, |d| d.version().version)
    }

    /// Re-reads the latest version (after another process appended).
    pub async fn refresh(&mut self) -> Result<()> {
        if let Some(ds) = self.ds.as_mut() {
            ds.checkout_latest().await.map_err(|e| Error::lance("checkout latest", &self.uri, e))?;
        } else {
            self.ds = try_open(&self.uri, &self.options).await?;
        }
        self.known = None;
        Ok(())
    }

    /// Number of faces stored.
    pub async fn count(&self) -> Result<u64> {
        match &self.ds {
            None => Ok(0),
            Some(ds) => {
                Ok(ds.count_rows(None).await.map_err(|e| Error::lance("count", &self.uri, e))? as u64)
            }
        }
    }

    /// Stores `records`, skipping any whose id is already stored or repeated in `records`.
    pub async fn append(&mut self, records: Vec<FaceRecord>) -> Result<AppendStats> {
        // Validate everything first so a bad record leaves no trace.
        records.iter().try_for_each(validate_record)?;
        if self.known.is_none() {
            self.known = Some(self.load_ids().await?);
        }
        let known = self.known.as_mut().expect("loaded above");
        let total = records.len() as u64;
        let mut fresh = Vec::with_capacity(records.len());
        for r in records {
            if known.insert(r.id.clone()) {
                fresh.push(r);
            }
        }
        let stats = AppendStats { added: fresh.len() as u64, duplicates: total - fresh.len() as u64 };
        if fresh.is_empty() {
            return Ok(stats);
        }
        let batch = match records_to_batch(&fresh) {
            Ok(b) => b,
            Err(e) => {
                self.known = None;
                return Err(e);
            }
        };
        let res = self.write_batch(batch).await;
        if res.is_err() {
            // The in-memory id set may now claim ids that were not written.
            self.known = None;
        }
        res.map(|()| stats)
    }

    async fn write_batch(&mut self, batch: RecordBatch) -> Result<()> {
        let ds = match self.ds.take() {
            None => {
                let params = write_params(&self.options, WriteMode::Create);
                let schema = batch.schema();
                let reader = RecordBatchIterator::new(vec![Ok(batch)], schema);
                Dataset::write(reader, self.uri.as_str(), Some(params))
                    .await
                    .map_err(|e| Error::lance("create faces dataset", &self.uri, e))?
            }
            Some(ds) => {
                let params = write_params(&self.options, WriteMode::Append);
                let ds = Arc::new(ds);
                let res = InsertBuilder::new(ds.clone()).with_params(&params).execute(vec![batch]).await;
                match res {
                    Ok(new) => new,
                    Err(e) => {
                        self.ds = Some(Arc::unwrap_or_clone(ds));
                        return Err(Error::lance("append faces", &self.uri, e));
                    }
                }
            }
        };
        self.ds = Some(ds);
        Ok(())
    }

    async fn load_ids(&self) -> Result<HashSet<FaceId>> {
        let Some(ds) = &self.ds else { return Ok(HashSet::new()) };
        let mut scan = ds.scan();
        scan.project(&[FACE_ID]).map_err(|e| Error::lance("scan face ids", &self.uri, e))?;
        let mut out = HashSet::new();
        for b in collect(&scan, &self.uri).await? {
            let ids = col::<StringArray>(&b, FACE_ID, &self.uri)?;
            for i in 0..ids.len() {
                out.insert(parse_id(ids.value(i), &self.uri)?);
            }
        }
        Ok(out)
    }

    /// Every stored face id, in storage order.
    pub async fn ids(&self) -> Result<Vec<FaceId>> {
        let Some(ds) = &self.ds else { return Ok(vec![]) };
        let mut scan = ds.scan();
        scan.project(&[FACE_ID]).map_err(|e| Error::lance("scan face ids", &self.uri, e))?;
        scan.scan_in_order(true);
        let mut out = Vec::new();
        for b in collect(&scan, &self.uri).await? {
            let ids = col::<StringArray>(&b, FACE_ID, &self.uri)?;
            for i in 0..ids.len() {
                out.push(parse_id(ids.value(i), &self.uri)?);
            }
        }
        Ok(out)
    }

    /// Records rejected inputs in the rejects dataset beside this one.
    pub async fn append_rejects(&mut self, rejects: Vec<Reject>) -> Result<()> {
        if rejects.is_empty() {
            return Ok(());
        }
        let uri = rejects_uri(&self.uri);
        let mut source = StringBuilder::new();
        let mut row = UInt64Builder::new();
        let mut reason = StringBuilder::new();
        for r in &rejects {
            source.append_value(&r.source);
            row.append_option(r.row);
            reason.append_value(&r.reason);
        }
        let batch = RecordBatch::try_new(
            rejects_schema(),
            vec![Arc::new(source.finish()), Arc::new(row.finish()), Arc::new(reason.finish())],
        )
        .map_err(|e| Error::invalid("rejects", e.to_string()))?;
        let exists = try_open(&uri, &self.options).await?;
        let mode = if exists.is_some() { WriteMode::Append } else { WriteMode::Create };
        let reader = RecordBatchIterator::new(vec![Ok(batch)], rejects_schema());
        Dataset::write(reader, uri.as_str(), Some(write_params(&self.options, mode)))
            .await
            .map_err(|e| Error::lance("append rejects", &uri, e))?;
        Ok(())
    }

    /// All stored rejects.
    pub async fn rejects(&self) -> Result<Vec<Reject>> {
        let uri = rejects_uri(&self.uri);
        let Some(ds) = try_open(&uri, &self.options).await? else { return Ok(vec![]) };
        let mut out = Vec::new();
        let mut scan = ds.scan();
        scan.scan_in_order(true);
        for b in collect(&scan, &uri).await? {
            let source = col::<StringArray>(&b, REJECT_SOURCE, &uri)?;
            let row = col::<UInt64Array>(&b, REJECT_ROW, &uri)?;
            let reason = col::<StringArray>(&b, REJECT_REASON, &uri)?;
            for i in 0..b.num_rows() {
                out.push(Reject {
                    source: source.value(i).to_owned(),
                    row: row.is_valid(i).then(|| row.value(i)),
                    reason: reason.value(i).to_owned(),
                });
            }
        }
        Ok(out)
    }

    /// Number of stored rejects.
    pub async fn rejects_count(&self) -> Result<u64> {
        let uri = rejects_uri(&self.uri);
        match try_open(&uri, &self.options).await? {
            None => Ok(0),
            Some(ds) => Ok(ds.count_rows(None).await.map_err(|e| Error::lance("count", &uri, e))? as u64),
        }
    }

    /// Splits the dataset into shards of at most `shard_size` rows, fragment by fragment, so each
    /// row is in exactly one shard.
    pub async fn shards(&self, shard_size: usize) -> Result<Vec<ShardRange>> {
        if shard_size == 0 {
            return Err(Error::invalid("shard_size", "must be > 0"));
        }
        let Some(ds) = &self.ds else { return Ok(vec![]) };
        let mut out = Vec::new();
        for frag in ds.get_fragments() {
            let rows =
                frag.count_rows(None).await.map_err(|e| Error::lance("count fragment rows", &self.uri, e))?
                    as u64;
            let mut offset = 0;
            while offset < rows {
                let len = (shard_size as u64).min(rows - offset);
                out.push(ShardRange { fragment_id: frag.id() as u64, offset, len });
                offset += len;
            }
        }
        Ok(out)
    }

    /// Reads the faces of one shard, in storage order.
    pub async fn read_shard(&self, shard: &ShardRange) -> Result<Vec<FaceRecord>> {
        let key = shard.key();
        let ds = self.ds.as_ref().ok_or_else(|| Error::invalid(&key, "the faces dataset is empty"))?;
        let frag = ds.get_fragment(shard.fragment_id as usize).ok_or_else(|| {
            Error::invalid(
                &key,
                format!("fragment {} is not in version {}", shard.fragment_id, self.version()),
            )
        })?;
        let mut scan = frag.scan();
        scan.scan_in_order(true);
        scan.limit(Some(shard.len as i64), Some(shard.offset as i64))
            .map_err(|e| Error::lance("scan shard", &self.uri, e))?;
        let mut out = Vec::with_capacity(shard.len as usize);
        for b in collect(&scan, &self.uri).await? {
            out.extend(batch_to_records(&b, &self.uri)?);
        }
        if out.len() as u64 != shard.len {
            return Err(Error::invalid(
                &key,
                format!("shard has {} rows in version {}, expected {}", out.len(), self.version(), shard.len),
            ));
        }
        Ok(out)
    }

    /// Reads the faces with the given ids (any order; ids not stored are left out).
    pub async fn read_ids(&self, ids: &[FaceId]) -> Result<Vec<FaceRecord>> {
        let Some(ds) = &self.ds else { return Ok(vec![]) };
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(512) {
            let list: Vec<String> = chunk.iter().map(|i| sql_str(i.as_str())).collect();
            let mut scan = ds.scan();
            scan.filter(&format!("{FACE_ID} IN ({})", list.join(",")))
                .map_err(|e| Error::lance("filter face ids", &self.uri, e))?;
            for b in collect(&scan, &self.uri).await? {
                out.extend(batch_to_records(&b, &self.uri)?);
            }
        }
        Ok(out)
    }

    /// Counts per split and class, label statistics and the number of rejects.
    pub async fn stats(&self) -> Result<FaceStats> {
        let mut st = FaceStats {
            version: self.version(),
            faces: 0,
            rejects: self.rejects_count().await?,
            splits: BTreeMap::new(),
            classes: BTreeMap::new(),
            unlabelled: 0,
            valence: None,
            arousal: None,
        };
        let Some(ds) = &self.ds else { return Ok(st) };
        let mut scan = ds.scan();
        scan.project(&[SPLIT, LABEL, VALENCE, AROUSAL])
            .map_err(|e| Error::lance("scan labels", &self.uri, e))?;
        let (mut v, mut a) = (Moments::default(), Moments::default());
        for b in collect(&scan, &self.uri).await? {
            let split = col::<StringArray>(&b, SPLIT, &self.uri)?;
            let label = col::<UInt32Array>(&b, LABEL, &self.uri)?;
            let val = col::<Float32Array>(&b, VALENCE, &self.uri)?;
            let aro = col::<Float32Array>(&b, AROUSAL, &self.uri)?;
            for i in 0..b.num_rows() {
                st.faces += 1;
                let s = split.value(i).to_owned();
                *st.splits.entry(s.clone()).or_default() += 1;
                if label.is_valid(i) {
                    *st.classes.entry(s).or_default().entry(label.value(i)).or_default() += 1;
                } else {
                    st.unlabelled += 1;
                }
                if val.is_valid(i) {
                    v.push(val.value(i));
                }
                if aro.is_valid(i) {
                    a.push(aro.value(i));
                }
            }
        }
        st.valence = v.finish();
        st.arousal = a.finish();
        Ok(st)
    }

    /// Rewrites small fragments into larger ones; returns (fragments before, after).
    pub async fn compact(&mut self) -> Result<(usize, usize)> {
        let Some(ds) = self.ds.as_mut() else { return Ok((0, 0)) };
        let before = ds.count_fragments();
        compact_files(ds, CompactionOptions::default(), None)
            .await
            .map_err(|e| Error::lance("compact", &self.uri, e))?;
        Ok((before, ds.count_fragments()))
    }
}

#[derive(Default)]
struct Moments {
    n: u64,
    sum: f64,
    sum_sq: f64,
}

impl Moments {
    fn push(&mut self, x: f32) {
        let x = x as f64;
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    fn finish(&self) -> Option<MeanStd> {
        (self.n > 0).then(|| {
            let mean = self.sum / self.n as f64;
            let var = (self.sum_sq / self.n as f64 - mean * mean).max(0.0);
            MeanStd { count: self.n, mean, std: var.sqrt() }
        })
    }
}

fn parse_id(s: &str, uri: &str) -> Result<FaceId> {
    FaceId::parse(s).map_err(|e| Error::column(uri, FACE_ID, e.to_string()))
}

/// `"png"` / `"jpeg"` from the image's magic bytes.
pub fn image_format(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("jpeg")
    } else {
        None
    }
}

fn validate_record(r: &FaceRecord) -> Result<()> {
    let key = || format!("face {} ({})", r.id, r.source);
    if image_format(&r.image).is_none() {
        return Err(Error::invalid(key(), "image is neither PNG nor JPEG"));
    }
    if r.width == 0 || r.height == 0 {
        return Err(Error::invalid(key(), format!("image size {}x{} is empty", r.width, r.height)));
    }
    if let Some(b) = r.box_xywh
        && (b.iter().any(|v| !v.is_finite()) || b[2] <= 0.0 || b[3] <= 0.0)
    {
        return Err(Error::invalid(key(), format!("box {b:?} must be finite with w, h > 0")));
    }
    for (name, v) in [("valence", r.valence), ("arousal", r.arousal)] {
        if let Some(v) = v
            && !v.is_finite()
        {
            return Err(Error::invalid(key(), format!("{name} {v} is not finite")));
        }
    }
    Ok(())
}

fn records_to_batch(records: &[FaceRecord]) -> Result<RecordBatch> {
    let n = records.len();
    let mut id = StringBuilder::with_capacity(n, n * 32);
    let mut image = LargeBinaryBuilder::with_capacity(n, records.iter().map(|r| r.image.len()).sum());
    let mut format = StringBuilder::new();
    let mut width = UInt32Builder::with_capacity(n);
    let mut height = UInt32Builder::with_capacity(n);
    let mut bx = FixedSizeListBuilder::new(Float32Builder::new(), 4);
    let mut label = UInt32Builder::with_capacity(n);
    let mut valence = Float32Builder::with_capacity(n);
    let mut arousal = Float32Builder::with_capacity(n);
    let mut split = StringBuilder::new();
    let mut source = StringBuilder::new();
    for r in records {
        id.append_value(r.id.as_str());
        image.append_value(&r.image);
        format.append_value(image_format(&r.image).unwrap_or("unknown"));
        width.append_value(r.width);
        height.append_value(r.height);
        match r.box_xywh {
            Some(b) => {
                bx.values().append_slice(&b);
                bx.append(true);
            }
            None => {
                bx.values().append_nulls(4);
                bx.append(false);
            }
        }
        label.append_option(r.label);
        valence.append_option(r.valence);
        arousal.append_option(r.arousal);
        split.append_value(r.split.as_str());
        source.append_value(&r.source);
    }
    RecordBatch::try_new(
        faces_schema(),
        vec![
            Arc::new(id.finish()),
            Arc::new(image.finish()),
            Arc::new(format.finish()),
            Arc::new(width.finish()),
            Arc::new(height.finish()),
            Arc::new(bx.finish()),
            Arc::new(label.finish()),
            Arc::new(valence.finish()),
            Arc::new(arousal.finish()),
            Arc::new(split.finish()),
            Arc::new(source.finish()),
        ],
    )
    .map_err(|e| Error::invalid("faces batch", e.to_string()))
}

/// Face boxes of a batch (`None` where null).
pub(crate) fn read_boxes(b: &RecordBatch, uri: &str) -> Result<Vec<Option<[f32; 4]>>> {
    let bx = col::<FixedSizeListArray>(b, BOX, uri)?;
    let vals = bx
        .values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .ok_or_else(|| Error::column(uri, BOX, "values are not f32"))?;
    Ok((0..b.num_rows())
        .map(|i| {
            bx.is_valid(i).then(|| {
                let o = bx.value_offset(i) as usize;
                [vals.value(o), vals.value(o + 1), vals.value(o + 2), vals.value(o + 3)]
            })
        })
        .collect())
}

/// Converts a batch with the full faces schema back into records.
pub(crate) fn batch_to_records(b: &RecordBatch, uri: &str) -> Result<Vec<FaceRecord>> {
    let id = col::<StringArray>(b, FACE_ID, uri)?;
    let image = col::<LargeBinaryArray>(b, IMAGE, uri)?;
    let width = col::<UInt32Array>(b, WIDTH, uri)?;
    let height = col::<UInt32Array>(b, HEIGHT, uri)?;
    let boxes = read_boxes(b, uri)?;
    let label = col::<UInt32Array>(b, LABEL, uri)?;
    let valence = col::<Float32Array>(b, VALENCE, uri)?;
    let arousal = col::<Float32Array>(b, AROUSAL, uri)?;
    let split = col::<StringArray>(b, SPLIT, uri)?;
    let source = col::<StringArray>(b, SOURCE, uri)?;
    let mut out = Vec::with_capacity(b.num_rows());
    for (i, box_xywh) in boxes.into_iter().enumerate() {
        let split = Split::parse(split.value(i)).ok_or_else(|| {
            Error::column(
                uri,
                SPLIT,
                format!("row of face {}: unknown split `{}`", id.value(i), split.value(i)),
            )
        })?;
        out.push(FaceRecord {
            id: parse_id(id.value(i), uri)?,
            image: image.value(i).to_vec(),
            width: width.value(i),
            height: height.value(i),
            box_xywh,
            label: label.is_valid(i).then(|| label.value(i)),
            valence: valence.is_valid(i).then(|| valence.value(i)),
            arousal: arousal.is_valid(i).then(|| arousal.value(i)),
            split,
            source: source.value(i).to_owned(),
        });
    }
    Ok(out)
}
