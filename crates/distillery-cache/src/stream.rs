//! The streaming reader: joins faces (images, labels) with one teacher's cache rows by face id and
//! view, and yields preprocessed [`Batch`]es to a synchronous training loop.
//!
//! How it works, and why:
//! - An index of (face row, view, cache row) is built up front from cheap columns only (ids,
//!   views, split, Lance row ids), in storage order. Images are never held for the whole dataset.
//! - Each epoch's order is computed on that index alone from `(seed, epoch)`: the index is cut into
//!   blocks of consecutive rows, the blocks are permuted, blocks go to data-parallel ranks
//!   round-robin (so ranks partition the rows), and each rank's rows pass through a shuffle buffer
//!   of `shuffle_buffer` entries. Blocks keep reads local; the buffer mixes them. Because the order
//!   is a pure function of the index and the seed, it is reproducible, and resuming at
//!   (epoch, batch) just skips a prefix.
//! - A loader thread reads that order in windows of a few batches (Lance `take` by row id),
//!   decodes and preprocesses them on a rayon pool of `workers` threads, and sends finished
//!   batches through a bounded channel, so memory stays bounded by a few batches.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use arrow_array::{Float32Array, LargeBinaryArray, RecordBatch, StringArray, UInt32Array, UInt64Array};
use candle_core::{Device, Tensor};
use distillery_core::{FaceId, Preprocess, TeacherFingerprint};
use distillery_data::{Batch, Split, View};
use lance::Dataset;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::faces::{self, FaceStore};
use crate::teacher_cache::{CacheRow, TeacherCache};
use crate::util::{col, collect, sql_str};
use crate::{Error, Result};

/// Which cached views of each face an epoch visits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ViewSelection {
    /// Only view 0 (the plain crop).
    #[default]
    PlainOnly,
    /// Every cached view of every face, each once per epoch.
    All,
    /// One cached view per face per epoch, drawn from `(seed, epoch)`.
    Random,
}

/// A place in the stream: the next batch to be produced is batch `batch` of epoch `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamPosition {
    pub epoch: usize,
    pub batch: usize,
}

/// Configuration of a [`BatchStream`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// Only faces of this split (all when `None`).
    pub split: Option<Split>,
    pub batch_size: usize,
    /// Entries in the shuffle buffer; 0 or 1 keeps storage order (for evaluation).
    pub shuffle_buffer: usize,
    pub seed: u64,
    /// Number of epochs; `None` streams forever.
    pub epochs: Option<usize>,
    /// This process's rank among `world` data-parallel readers; ranks see disjoint rows.
    pub rank: usize,
    pub world: usize,
    /// Views to visit. Without a cache only the plain view exists.
    pub views: ViewSelection,
    /// Decode/preprocess threads.
    pub workers: usize,
    /// How faces become model inputs (always produced as `[n, C, H, W]`).
    pub preprocess: Preprocess,
    /// Drop each epoch's last partial batch.
    pub drop_last: bool,
    /// Where to start (resume).
    #[serde(default)]
    pub start: StreamPosition,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            split: None,
            batch_size: 32,
            shuffle_buffer: 1024,
            seed: 0,
            epochs: Some(1),
            rank: 0,
            world: 1,
            views: ViewSelection::PlainOnly,
            workers: 2,
            preprocess: Preprocess::unit_rgb(112),
            drop_last: false,
            start: StreamPosition::default(),
        }
    }
}

impl StreamConfig {
    fn validate(&self) -> Result<()> {
        let bad = |k: &str, r: String| Err(Error::invalid(format!("stream.{k}"), r));
        if self.batch_size == 0 {
            return bad("batch_size", "must be > 0".into());
        }
        if self.world == 0 || self.rank >= self.world {
            return bad("rank", format!("rank {} is not in 0..{}", self.rank, self.world));
        }
        if self.workers == 0 {
            return bad("workers", "must be > 0".into());
        }
        if let Some(e) = self.epochs
            && self.start.epoch > e
        {
            return bad("start", format!("epoch {} is past the last epoch {e}", self.start.epoch));
        }
        self.preprocess
            .validate("stream.preprocess")
            .map_err(|e| Error::invalid("stream.preprocess", e.to_string()))
    }
}

/// One entry of the index: a face row and, with a cache, the cache row of one of its views.
#[derive(Clone, Debug)]
struct Item {
    face_row: u64,
    face: u32,
    cache_row: Option<u64>,
}

/// A decoded, preprocessed sample.
struct Sample {
    face_id: FaceId,
    view: u32,
    pixels: Vec<f32>,
    label: Option<u32>,
    va: Option<(f32, f32)>,
    teacher: Option<CacheRow>,
}

/// Blocking iterator of batches; see the module docs.
pub struct BatchStream {
    rx: Option<Receiver<Result<(StreamPosition, Batch)>>>,
    loader: Option<JoinHandle<()>>,
    position: StreamPosition,
    batches_per_epoch: usize,
    items_per_epoch: usize,
}

impl BatchStream {
    /// The next batch to be yielded (epoch, batch index) — store it to resume later.
    pub fn position(&self) -> StreamPosition {
        self.position
    }

    /// Batches per epoch on this rank.
    pub fn batches_per_epoch(&self) -> usize {
        self.batches_per_epoch
    }

    /// (face, view) samples per epoch on this rank.
    pub fn samples_per_epoch(&self) -> usize {
        self.items_per_epoch
    }
}

impl Iterator for BatchStream {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(Ok((pos, batch))) => {
                self.position = if pos.batch + 1 >= self.batches_per_epoch {
                    StreamPosition { epoch: pos.epoch + 1, batch: 0 }
                } else {
                    StreamPosition { epoch: pos.epoch, batch: pos.batch + 1 }
                };
                Some(Ok(batch))
            }
            Ok(Err(e)) => {
                self.rx = None;
                Some(Err(e))
            }
            Err(_) => {
                self.rx = None;
                None
            }
        }
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        // Closing the channel makes the loader stop at its next send.
        self.rx = None;
        if let Some(h) = self.loader.take() {
            let _ = h.join();
        }
    }
}

/// Opens a stream over `faces`, joined with the rows of teacher `fingerprint` in `cache` when
/// given (faces without a cached row are skipped then). Without a cache, batches carry no teacher
/// outputs (plain supervised training).
pub async fn open_stream(
    faces: &FaceStore,
    cache: Option<(&TeacherCache, &TeacherFingerprint)>,
    cfg: StreamConfig,
) -> Result<BatchStream> {
    cfg.validate()?;
    let faces_uri = faces.uri().to_owned();
    let Some(fds) = faces.dataset().cloned() else {
        return Err(Error::invalid(&faces_uri, "the faces dataset is empty"));
    };

    // Face index: id and row id of every face of the split.
    let mut scan = fds.scan();
    scan.project(&[faces::FACE_ID]).map_err(|e| Error::lance("scan", &faces_uri, e))?;
    scan.with_row_id();
    if let Some(s) = cfg.split {
        scan.filter(&format!("{} = {}", faces::SPLIT, sql_str(s.as_str())))
            .map_err(|e| Error::lance("filter split", &faces_uri, e))?;
    }
    let mut face_ids: Vec<FaceId> = Vec::new();
    let mut face_rows: Vec<u64> = Vec::new();
    for b in collect(&scan, &faces_uri).await? {
        let ids = col::<StringArray>(&b, faces::FACE_ID, &faces_uri)?;
        let rid = col::<UInt64Array>(&b, lance::dataset::ROW_ID, &faces_uri)?;
        for i in 0..b.num_rows() {
            face_ids.push(
                FaceId::parse(ids.value(i))
                    .map_err(|e| Error::column(&faces_uri, faces::FACE_ID, e.to_string()))?,
            );
            face_rows.push(rid.value(i));
        }
    }

    // Join with the cache by face id.
    let mut items: Vec<Item> = Vec::new();
    let mut groups: Vec<(usize, usize)> = Vec::new(); // item ranges per face, for Random views
    let cache_ds = match cache {
        None => {
            for (k, row) in face_rows.iter().enumerate() {
                groups.push((items.len(), items.len() + 1));
                items.push(Item { face_row: *row, face: k as u32, cache_row: None });
            }
            None
        }
        Some((tc, fp)) => {
            let by_face: HashMap<&FaceId, usize> =
                face_ids.iter().enumerate().map(|(k, id)| (id, k)).collect();
            let mut per_face: Vec<Vec<(u32, u64)>> = vec![Vec::new(); face_ids.len()];
            for (id, view, row) in tc.row_index(fp).await? {
                if let Some(&k) = by_face.get(&id) {
                    per_face[k].push((view, row));
                }
            }
            let mut skipped = 0usize;
            for (k, mut views) in per_face.into_iter().enumerate() {
                views.sort_unstable();
                if cfg.views == ViewSelection::PlainOnly {
                    views.retain(|(v, _)| *v == 0);
                }
                if views.is_empty() {
                    skipped += 1;
                    continue;
                }
                let start = items.len();
                for (_, row) in views {
                    items.push(Item { face_row: face_rows[k], face: k as u32, cache_row: Some(row) });
                }
                groups.push((start, items.len()));
            }
            if skipped > 0 {
                tracing::warn!(skipped, fingerprint = %fp, "faces without cached teacher rows are skipped");
            }
            Some(
                tc.dataset()
                    .cloned()
                    .ok_or_else(|| Error::invalid(tc.uri(), "the teacher cache is empty"))?,
            )
        }
    };

    let plan = Plan {
        groups,
        n_items: items.len(),
        seed: cfg.seed,
        shuffle_buffer: cfg.shuffle_buffer,
        rank: cfg.rank,
        world: cfg.world,
        random_view: cfg.views == ViewSelection::Random && cache.is_some(),
    };
    let items_per_epoch = plan.epoch_order(0).len();
    let batches_per_epoch = if cfg.drop_last {
        items_per_epoch / cfg.batch_size
    } else {
        items_per_epoch.div_ceil(cfg.batch_size)
    };

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.workers)
        .thread_name(|i| format!("distillery-decode-{i}"))
        .build()
        .map_err(|e| Error::Stream(format!("decode pool: {e}")))?;
    let (tx, rx) = sync_channel(2);
    let loader = Loader {
        cfg,
        plan,
        items,
        face_ids,
        faces: fds,
        faces_uri,
        cache: cache_ds,
        pool,
        batches_per_epoch,
    };
    let handle = std::thread::Builder::new()
        .name("distillery-stream".into())
        .spawn(move || loader.run(tx))
        .map_err(|e| Error::Stream(format!("spawn loader: {e}")))?;
    let position = StreamPosition::default();
    Ok(BatchStream { rx: Some(rx), loader: Some(handle), position, batches_per_epoch, items_per_epoch })
}

/// The epoch order: a pure function of the index shape and the seed.
struct Plan {
    groups: Vec<(usize, usize)>,
    n_items: usize,
    seed: u64,
    shuffle_buffer: usize,
    rank: usize,
    world: usize,
    random_view: bool,
}

impl Plan {
    fn rng(&self, epoch: usize, stream: u64) -> ChaCha8Rng {
        let mut h = blake3::Hasher::new();
        h.update(b"distillery.stream.v1\0");
        h.update(&self.seed.to_le_bytes());
        h.update(&(epoch as u64).to_le_bytes());
        h.update(&stream.to_le_bytes());
        ChaCha8Rng::from_seed(*h.finalize().as_bytes())
    }

    /// Item indices this rank visits in `epoch`, in order.
    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let base: Vec<usize> = if self.random_view {
            let mut rng = self.rng(epoch, 1);
            self.groups.iter().map(|&(a, b)| rng.random_range(a..b)).collect()
        } else {
            (0..self.n_items).collect()
        };
        let shuffle = self.shuffle_buffer > 1;
        let block = if shuffle { (self.shuffle_buffer / 16).clamp(1, 1024) } else { base.len().max(1) };
        let mut blocks: Vec<&[usize]> = base.chunks(block).collect();
        let mut rng = self.rng(epoch, 2);
        if shuffle {
            for i in (1..blocks.len()).rev() {
                blocks.swap(i, rng.random_range(0..=i));
            }
        }
        let mine = blocks.into_iter().enumerate().filter(|(k, _)| k % self.world == self.rank);
        if !shuffle {
            return mine.flat_map(|(_, b)| b.iter().copied()).collect();
        }
        let mut out = Vec::with_capacity(base.len() / self.world + block);
        let mut buf: Vec<usize> = Vec::with_capacity(self.shuffle_buffer);
        for (_, b) in mine {
            for &i in b {
                buf.push(i);
                if buf.len() >= self.shuffle_buffer {
                    let k = rng.random_range(0..buf.len());
                    out.push(buf.swap_remove(k));
                }
            }
        }
        while !buf.is_empty() {
            let k = rng.random_range(0..buf.len());
            out.push(buf.swap_remove(k));
        }
        out
    }
}

struct Loader {
    cfg: StreamConfig,
    plan: Plan,
    items: Vec<Item>,
    face_ids: Vec<FaceId>,
    faces: Dataset,
    faces_uri: String,
    cache: Option<Dataset>,
    pool: rayon::ThreadPool,
    batches_per_epoch: usize,
}

/// Batches loaded per read: enough to amortise a Lance `take`, few enough to bound memory.
const WINDOW_BATCHES: usize = 4;

impl Loader {
    fn run(self, tx: SyncSender<Result<(StreamPosition, Batch)>>) {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("distillery-stream-io")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(Error::Stream(format!("io runtime: {e}"))));
                return;
            }
        };
        if self.batches_per_epoch == 0 {
            return; // nothing to read: end the stream instead of looping over empty epochs
        }
        let bs = self.cfg.batch_size;
        let mut epoch = self.cfg.start.epoch;
        while self.cfg.epochs.is_none_or(|n| epoch < n) {
            let order = self.plan.epoch_order(epoch);
            let first = if epoch == self.cfg.start.epoch { self.cfg.start.batch } else { 0 };
            let mut batch_idx = first;
            let mut pos = first * bs;
            while batch_idx < self.batches_per_epoch {
                let end = (pos + bs * WINDOW_BATCHES).min(order.len());
                let window = &order[pos..end];
                let samples = match rt.block_on(self.load(window)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                for chunk in samples.chunks(bs) {
                    if batch_idx >= self.batches_per_epoch {
                        break;
                    }
                    let msg = make_batch(chunk, &self.cfg.preprocess)
                        .map(|b| (StreamPosition { epoch, batch: batch_idx }, b));
                    let failed = msg.is_err();
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                    batch_idx += 1;
                }
                pos = end;
                if pos >= order.len() {
                    break;
                }
            }
            epoch += 1;
        }
    }

    /// Reads, decodes and preprocesses the items at `window` (indices into the index), in order.
    async fn load(&self, window: &[usize]) -> Result<Vec<Sample>> {
        // Faces: each distinct row once, in storage order for locality.
        let mut rows: Vec<u64> = window.iter().map(|&i| self.items[i].face_row).collect();
        rows.sort_unstable();
        rows.dedup();
        let proj = self
            .faces
            .schema()
            .project(&[
                faces::FACE_ID,
                faces::IMAGE,
                faces::BOX,
                faces::LABEL,
                faces::VALENCE,
                faces::AROUSAL,
            ])
            .map_err(|e| Error::lance("project", &self.faces_uri, e))?;
        let fb = self
            .faces
            .take_rows(&rows, proj)
            .await
            .map_err(|e| Error::lance("take faces", &self.faces_uri, e))?;
        let face_at = index_by_id(&fb, &self.faces_uri)?;

        let teacher: Vec<Option<CacheRow>> = match &self.cache {
            None => vec![None; window.len()],
            Some(ds) => {
                let ids: Vec<u64> =
                    window.iter().map(|&i| self.items[i].cache_row.expect("cache item")).collect();
                let tc = crate::teacher_cache::take_rows_from(ds, &ids).await?;
                tc.into_iter().map(Some).collect()
            }
        };

        let images = col::<LargeBinaryArray>(&fb, faces::IMAGE, &self.faces_uri)?;
        let boxes = faces::read_boxes(&fb, &self.faces_uri)?;
        let labels = col::<UInt32Array>(&fb, faces::LABEL, &self.faces_uri)?;
        let val = col::<Float32Array>(&fb, faces::VALENCE, &self.faces_uri)?;
        let aro = col::<Float32Array>(&fb, faces::AROUSAL, &self.faces_uri)?;
        use arrow_array::Array;

        let pre = &self.cfg.preprocess;
        let jobs: Vec<(usize, Option<CacheRow>)> = window.iter().copied().zip(teacher).collect();
        self.pool.install(|| {
            jobs.into_par_iter()
                .map(|(i, t)| {
                    let item = &self.items[i];
                    let id = &self.face_ids[item.face as usize];
                    let r = *face_at.get(id).ok_or_else(|| {
                        Error::column(
                            &self.faces_uri,
                            faces::FACE_ID,
                            format!("face {id} not returned by take"),
                        )
                    })?;
                    if let Some(t) = &t
                        && &t.face_id != id
                    {
                        return Err(Error::Stream(format!(
                            "cache row for {} joined to face {id}",
                            t.face_id
                        )));
                    }
                    let view = t.as_ref().map_or(View::plain(), |t| t.view);
                    let pixels = face_to_input(images.value(r), boxes[r], &view, pre)
                        .map_err(|reason| Error::Image { face_id: id.to_string(), reason })?;
                    let va = (val.is_valid(r) && aro.is_valid(r)).then(|| (val.value(r), aro.value(r)));
                    Ok(Sample {
                        face_id: id.clone(),
                        view: view.index,
                        pixels,
                        label: labels.is_valid(r).then(|| labels.value(r)),
                        va,
                        teacher: t,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
    }
}

fn index_by_id(b: &RecordBatch, uri: &str) -> Result<HashMap<FaceId, usize>> {
    let ids = col::<StringArray>(b, faces::FACE_ID, uri)?;
    (0..b.num_rows())
        .map(|i| {
            FaceId::parse(ids.value(i))
                .map(|id| (id, i))
                .map_err(|e| Error::column(uri, faces::FACE_ID, e.to_string()))
        })
        .collect()
}

fn make_batch(samples: &[Sample], pre: &Preprocess) -> Result<Batch> {
    let n = samples.len();
    let [h, w] = pre.size;
    let c = pre.channels;
    let dev = Device::Cpu;
    let mut px = Vec::with_capacity(n * c * h * w);
    for s in samples {
        px.extend_from_slice(&s.pixels);
    }
    let images = Tensor::from_vec(px, (n, c, h, w), &dev)?;
    let labels =
        Tensor::from_vec(samples.iter().map(|s| s.label.unwrap_or(0)).collect::<Vec<u32>>(), n, &dev)?;
    let label_mask = Tensor::from_vec(
        samples.iter().map(|s| if s.label.is_some() { 1f32 } else { 0.0 }).collect::<Vec<_>>(),
        n,
        &dev,
    )?;
    let va = Tensor::from_vec(
        samples
            .iter()
            .flat_map(|s| {
                let (v, a) = s.va.unwrap_or((0.0, 0.0));
                [v, a]
            })
            .collect::<Vec<f32>>(),
        (n, 2),
        &dev,
    )?;
    let va_mask = Tensor::from_vec(
        samples.iter().map(|s| if s.va.is_some() { 1f32 } else { 0.0 }).collect::<Vec<_>>(),
        n,
        &dev,
    )?;
    let (mut tl, mut tva, mut temb) = (None, None, None);
    if samples.iter().all(|s| s.teacher.is_some()) && n > 0 {
        let rows: Vec<&CacheRow> = samples.iter().filter_map(|s| s.teacher.as_ref()).collect();
        let k = rows[0].logits.len();
        if let Some(bad) = rows.iter().find(|r| r.logits.len() != k) {
            return Err(Error::Stream(format!(
                "face {} has {} teacher logits, others {k}",
                bad.face_id,
                bad.logits.len()
            )));
        }
        tl = Some(Tensor::from_vec(
            rows.iter().flat_map(|r| r.logits.iter().copied()).collect::<Vec<_>>(),
            (n, k),
            &dev,
        )?);
        if rows.iter().all(|r| r.valence.is_some() && r.arousal.is_some()) {
            let v: Vec<f32> =
                rows.iter().flat_map(|r| [r.valence.unwrap_or(0.0), r.arousal.unwrap_or(0.0)]).collect();
            tva = Some(Tensor::from_vec(v, (n, 2), &dev)?);
        }
        if let Some(d) = rows[0].embedding.as_ref().map(Vec::len)
            && rows.iter().all(|r| r.embedding.as_ref().is_some_and(|e| e.len() == d))
        {
            let e: Vec<f32> = rows.iter().flat_map(|r| r.embedding.iter().flatten().copied()).collect();
            temb = Some(Tensor::from_vec(e, (n, d), &dev)?);
        }
    }
    Ok(Batch {
        face_ids: samples.iter().map(|s| s.face_id.clone()).collect(),
        views: samples.iter().map(|s| s.view).collect(),
        images,
        labels,
        label_mask,
        va,
        va_mask,
        teacher_logits: tl,
        teacher_va: tva,
        teacher_embedding: temb,
    })
}

/// Turns an encoded face into a `[C, H, W]` model input: decode, crop to the face box, apply the
/// view (sub-crop, flip), resize, scale and normalise.
///
/// The one place image preprocessing happens in the reader; it follows the `Preprocess` contract
/// and is meant to be replaced by the data crate's shared implementation when it exists.
fn face_to_input(
    bytes: &[u8],
    box_xywh: Option<[f32; 4]>,
    view: &View,
    pre: &Preprocess,
) -> Result<Vec<f32>, String> {
    use image::imageops::{self, FilterType};

    let img = image::load_from_memory(bytes).map_err(|e| format!("decode: {e}"))?.to_rgb8();
    let (iw, ih) = (img.width() as f32, img.height() as f32);
    let [bx, by, bw, bh] = box_xywh.unwrap_or([0.0, 0.0, iw, ih]);
    let [vx, vy, vw, vh] = view.crop;
    // View crop inside the face box, in image pixels, clamped to the image.
    let x0 = (bx + vx * bw).floor().clamp(0.0, iw - 1.0);
    let y0 = (by + vy * bh).floor().clamp(0.0, ih - 1.0);
    let x1 = (bx + (vx + vw) * bw).ceil().clamp(x0 + 1.0, iw);
    let y1 = (by + (vy + vh) * bh).ceil().clamp(y0 + 1.0, ih);
    let mut crop =
        imageops::crop_imm(&img, x0 as u32, y0 as u32, (x1 - x0) as u32, (y1 - y0) as u32).to_image();
    if view.flip {
        imageops::flip_horizontal_in_place(&mut crop);
    }
    if pre.pad_to_square && crop.width() != crop.height() {
        let side = crop.width().max(crop.height());
        let mut sq = image::RgbImage::new(side, side);
        imageops::overlay(
            &mut sq,
            &crop,
            ((side - crop.width()) / 2) as i64,
            ((side - crop.height()) / 2) as i64,
        );
        crop = sq;
    }
    let [h, w] = pre.size;
    let filter = match pre.filter {
        distillery_core::ResizeFilter::Bilinear => FilterType::Triangle,
        distillery_core::ResizeFilter::Nearest => FilterType::Nearest,
    };
    let resized = if crop.width() as usize == w && crop.height() as usize == h {
        crop
    } else {
        imageops::resize(&crop, w as u32, h as u32, filter)
    };
    let c = pre.channels;
    let mut out = vec![0f32; c * h * w];
    let norm = |ch: usize, v: f32| {
        let m = pre.mean.get(ch).copied().unwrap_or(0.0);
        let s = pre.std.get(ch).copied().unwrap_or(1.0);
        (v * pre.scale - m) / s
    };
    for (x, y, p) in resized.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        if c == 1 {
            // ITU-R BT.601 luma, as `image`'s grey conversion.
            let l = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
            out[y * w + x] = norm(0, l);
        } else {
            for ch in 0..3 {
                out[ch * h * w + y * w + x] = norm(ch, p[ch] as f32);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(n: usize, buf: usize, rank: usize, world: usize, seed: u64) -> Plan {
        Plan {
            groups: (0..n).map(|i| (i, i + 1)).collect(),
            n_items: n,
            seed,
            shuffle_buffer: buf,
            rank,
            world,
            random_view: false,
        }
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation_partitioned_by_rank() {
        let n = 1000;
        let a = plan(n, 128, 0, 1, 1).epoch_order(0);
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..n).collect::<Vec<_>>());
        assert_eq!(a, plan(n, 128, 0, 1, 1).epoch_order(0));
        assert_ne!(a, plan(n, 128, 0, 1, 2).epoch_order(0));
        assert_ne!(a, plan(n, 128, 0, 1, 1).epoch_order(1));
        assert_eq!(plan(n, 0, 0, 1, 1).epoch_order(3), (0..n).collect::<Vec<_>>());
        let mut all: Vec<usize> = (0..3).flat_map(|r| plan(n, 64, r, 3, 5).epoch_order(2)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn face_to_input_crops_flips_and_scales() {
        // 4×2 image; left half red, right half blue.
        let img = image::RgbImage::from_fn(4, 2, |x, _| {
            if x < 2 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) }
        });
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        let bytes = bytes.into_inner();
        let pre = Preprocess { size: [2, 2], ..Preprocess::unit_rgb(2) };
        // Box = the left 2×2 square: all red.
        let out = face_to_input(&bytes, Some([0.0, 0.0, 2.0, 2.0]), &View::plain(), &pre).unwrap();
        assert_eq!(out, vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        // Whole image with a right-half view, flipped: blue.
        let v = View { index: 1, crop: [0.5, 0.0, 0.5, 1.0], flip: true };
        let out = face_to_input(&bytes, None, &v, &pre).unwrap();
        assert_eq!(&out[8..], &[1.0, 1.0, 1.0, 1.0]);
        // Whole image, flipped, resized 4×2 → 4×2 keeps pixels: red moves right.
        let pre = Preprocess { size: [2, 4], ..Preprocess::unit_rgb(2) };
        let v = View { flip: true, ..View::plain() };
        let out = face_to_input(&bytes, None, &v, &pre).unwrap();
        assert_eq!(&out[..4], &[0.0, 0.0, 1.0, 1.0]);
        assert!(face_to_input(b"junk", None, &View::plain(), &pre).unwrap_err().contains("decode"));
    }
}
