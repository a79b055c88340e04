//! Labelling one shard: faces → prepared views → batches → teacher → rows → staged fragments.
//!
//! ```text
//! reader ──[decode]──▶ N decoders ──[ready]──▶ batcher ──[infer]──▶ driver ──[rows]──▶ sink
//!  (skip cached)        (CPU pool)           (max batch,           (one batch at a     (stages
//!                                              max delay)            time on the engine) chunks)
//! ```
//!
//! Every arrow is a bounded channel, so the number of prepared images alive at once is bounded by
//! [`PipelineConfig::in_flight_bound`] however many faces a shard holds; the `in_flight` and
//! per-stage high-water gauges in [`Metrics`] show it. A face that fails to decode or crop is
//! recorded in [`ShardReport::failures`] and skipped; a teacher or storage error fails the shard.
//! Dropping the returned future cancels the shard: its tasks live in a `JoinSet` and are aborted.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distillery_core::FaceId;
use distillery_data::{FaceRecord, View};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::engine::{BatchOutputs, Engine};
use crate::error::{Error, Result};
use crate::metrics::{Metrics, error_kind, stage};
use crate::prep::prepare_views;

/// Sizes of the pipeline's batches, pools and queues.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineConfig {
    /// Largest batch given to the teacher (also capped by the teacher's own `max_batch`).
    pub max_batch: usize,
    /// Longest a partial batch waits for more inputs.
    pub max_delay: Duration,
    /// Parallel image decoders.
    pub decode_threads: usize,
    /// Bound of the reader → decoder queue, in faces.
    pub decode_queue: usize,
    /// Bound of the decoder → batcher queue, in prepared views.
    pub ready_queue: usize,
    /// Bound of the batcher → teacher queue, in batches.
    pub infer_queue: usize,
    /// Rows handed to the sink per `stage` call.
    pub stage_rows: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_delay: Duration::from_millis(20),
            decode_threads: 2,
            decode_queue: 64,
            ready_queue: 128,
            infer_queue: 2,
            stage_rows: 4096,
        }
    }
}

impl PipelineConfig {
    /// Most prepared (face, view) inputs that can be alive at once with `views_per_face` views:
    /// those held by decoders, queued for the batcher, in the batch being built, queued for the
    /// teacher and in the batch it is running.
    pub fn in_flight_bound(&self, views_per_face: usize, max_batch: usize) -> usize {
        self.decode_threads * views_per_face + self.ready_queue + max_batch * (self.infer_queue + 2)
    }
}

/// What to label in a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardJob {
    /// Unique name of the shard, used to name staged fragments.
    pub shard_key: String,
    /// `K`: every face gets views `0..=K` (0 is the plain crop).
    pub augmentations: u32,
    /// Seed of the deterministic augmentations.
    pub view_seed: u64,
}

/// The teacher's outputs for one (face, view).
#[derive(Clone, Debug, PartialEq)]
pub struct LabelRow {
    pub face_id: FaceId,
    pub view: View,
    pub logits: Vec<f32>,
    pub valence: Option<f32>,
    pub arousal: Option<f32>,
    pub embedding: Option<Vec<f32>>,
    /// 68 (x, y) pairs, flattened.
    pub landmarks: Option<Vec<f32>>,
}

/// A face that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaceFailure {
    pub face_id: FaceId,
    pub source: String,
    pub reason: String,
}

/// Outcome of a labelled shard.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardReport {
    /// Distinct faces in the shard.
    pub faces: usize,
    /// Rows produced (and staged).
    pub rows: usize,
    /// (face, view) pairs already cached for this teacher, not recomputed.
    pub skipped_existing: usize,
    /// Faces all of whose views were already cached.
    pub faces_skipped: usize,
    /// Faces that could not be prepared.
    pub failures: Vec<FaceFailure>,
    /// What the sink returned: the staged fragments, serialised.
    pub staged: String,
    pub elapsed: Duration,
}

/// Where rows go. The Lance cache implements it by staging fragments; tests keep rows in memory.
#[async_trait::async_trait]
pub trait RowSink: Send {
    /// (face, view) pairs already stored for this teacher; they are skipped.
    async fn existing(&mut self) -> Result<HashSet<(FaceId, u32)>>;
    /// Takes a chunk of rows.
    async fn stage(&mut self, rows: Vec<LabelRow>) -> Result<()>;
    /// Called once after the last chunk; returns the staged fragments serialised (JSON).
    async fn finish(&mut self) -> Result<String>;
}

/// A sink that keeps rows in memory; `finish` returns their `(face, view)` keys as JSON.
#[derive(Default)]
pub struct MemorySink {
    pub existing: HashSet<(FaceId, u32)>,
    pub rows: Vec<LabelRow>,
    /// Number of `stage` calls.
    pub chunks: usize,
}

#[async_trait::async_trait]
impl RowSink for MemorySink {
    async fn existing(&mut self) -> Result<HashSet<(FaceId, u32)>> {
        Ok(self.existing.clone())
    }
    async fn stage(&mut self, rows: Vec<LabelRow>) -> Result<()> {
        self.chunks += 1;
        self.rows.extend(rows);
        Ok(())
    }
    async fn finish(&mut self) -> Result<String> {
        let keys: Vec<(String, u32)> =
            self.rows.iter().map(|r| (r.face_id.to_string(), r.view.index)).collect();
        serde_json::to_string(&keys).map_err(|e| Error::storage("serialising staged rows", e))
    }
}

pub use distillery_data::view::views_for;

struct Prepared {
    face_id: FaceId,
    view: View,
    input: Vec<f32>,
}

struct PendingBatch {
    keys: Vec<(FaceId, View)>,
    input: Vec<f32>,
}

/// Counts prepared inputs alive anywhere in the pipeline and reports the count to the metrics.
#[derive(Clone)]
struct InFlight {
    n: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl InFlight {
    fn add(&self, k: usize) {
        let now = self.n.fetch_add(k, Ordering::SeqCst) + k;
        self.metrics.observe_depth(stage::IN_FLIGHT, now);
    }
    fn sub(&self, k: usize) {
        let now = self.n.fetch_sub(k, Ordering::SeqCst) - k;
        self.metrics.observe_depth(stage::IN_FLIGHT, now);
    }
}

fn depth<T>(tx: &mpsc::Sender<T>) -> usize {
    tx.max_capacity() - tx.capacity()
}

/// Labels `faces` (one shard) with the teacher behind `engine` and hands the rows to `sink`.
pub async fn label_shard(
    engine: &Engine,
    cfg: &PipelineConfig,
    metrics: &Arc<Metrics>,
    job: &ShardJob,
    faces: Vec<FaceRecord>,
    sink: &mut dyn RowSink,
) -> Result<ShardReport> {
    label_shard_with_progress(engine, cfg, metrics, job, faces, sink, &Arc::new(AtomicUsize::new(0))).await
}

/// [`label_shard`], adding the number of rows produced so far to `progress` as it goes (for
/// heartbeats).
pub async fn label_shard_with_progress(
    engine: &Engine,
    cfg: &PipelineConfig,
    metrics: &Arc<Metrics>,
    job: &ShardJob,
    faces: Vec<FaceRecord>,
    sink: &mut dyn RowSink,
    progress: &Arc<AtomicUsize>,
) -> Result<ShardReport> {
    let started = Instant::now();
    let info = engine.info().clone();
    let max_batch = cfg.max_batch.min(info.max_batch).max(1);
    let views_per_face = job.augmentations as usize + 1;

    // Decide the work up front: distinct faces, minus (face, view) pairs already cached.
    let existing = sink.existing().await?;
    let mut seen = HashSet::new();
    let mut work = Vec::new();
    let mut skipped_existing = 0;
    let mut faces_skipped = 0;
    for face in faces {
        if !seen.insert(face.id.clone()) {
            continue;
        }
        let views: Vec<View> = views_for(&face.id, job.augmentations, job.view_seed)
            .into_iter()
            .filter(|v| !existing.contains(&(face.id.clone(), v.index)))
            .collect();
        skipped_existing += views_per_face - views.len();
        if views.is_empty() {
            faces_skipped += 1;
        } else {
            work.push((face, views));
        }
    }
    drop(existing);
    metrics.skipped_existing.inc_by(skipped_existing as u64);
    let n_faces = seen.len();

    metrics.set_capacity(stage::DECODE, cfg.decode_queue);
    metrics.set_capacity(stage::READY, cfg.ready_queue);
    metrics.set_capacity(stage::INFER, cfg.infer_queue);
    metrics.set_capacity(stage::IN_FLIGHT, cfg.in_flight_bound(views_per_face, max_batch));

    let (face_tx, face_rx) = mpsc::channel::<(FaceRecord, Vec<View>)>(cfg.decode_queue.max(1));
    let (ready_tx, mut ready_rx) = mpsc::channel::<Prepared>(cfg.ready_queue.max(1));
    let (batch_tx, mut batch_rx) = mpsc::channel::<PendingBatch>(cfg.infer_queue.max(1));
    let (rows_tx, mut rows_rx) = mpsc::channel::<LabelRow>(cfg.stage_rows.clamp(1, 4096));
    let failures = Arc::new(Mutex::new(Vec::<FaceFailure>::new()));
    let in_flight = InFlight { n: Arc::new(AtomicUsize::new(0)), metrics: metrics.clone() };
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();

    // Reader: feeds faces to the decoders. A closed channel means a later stage stopped.
    {
        let metrics = metrics.clone();
        tasks.spawn(async move {
            for item in work {
                if face_tx.send(item).await.is_err() {
                    break;
                }
                metrics.observe_depth(stage::DECODE, depth(&face_tx));
            }
            Ok(())
        });
    }

    // Decoders: CPU work on the blocking pool, one face (all its views) at a time per decoder.
    let face_rx = Arc::new(tokio::sync::Mutex::new(face_rx));
    for _ in 0..cfg.decode_threads.max(1) {
        let face_rx = face_rx.clone();
        let ready_tx = ready_tx.clone();
        let pp = info.preprocess.clone();
        let failures = failures.clone();
        let metrics = metrics.clone();
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            loop {
                let next = face_rx.lock().await.recv().await;
                let Some((face, views)) = next else { break };
                let pp = pp.clone();
                let vs = views.clone();
                let FaceRecord { id, image, box_xywh, source, .. } = face;
                let prepared = tokio::task::spawn_blocking(move || prepare_views(&image, box_xywh, &vs, &pp))
                    .await
                    .unwrap_or_else(|e| Err(format!("decoder panicked: {e}")));
                match prepared {
                    Ok(inputs) => {
                        in_flight.add(inputs.len());
                        let mut left = inputs.len();
                        for (view, input) in views.into_iter().zip(inputs) {
                            if ready_tx.send(Prepared { face_id: id.clone(), view, input }).await.is_err() {
                                in_flight.sub(left);
                                return Ok(());
                            }
                            left -= 1;
                            metrics.observe_depth(stage::READY, depth(&ready_tx));
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(face = %id, %source, %reason, "skipping face");
                        metrics.error(error_kind::DECODE);
                        failures.lock().expect("failures lock").push(FaceFailure {
                            face_id: id,
                            source,
                            reason,
                        });
                    }
                }
            }
            Ok(())
        });
    }
    drop(ready_tx);

    // Batcher: up to `max_batch` inputs, waiting at most `max_delay` after the first.
    {
        let max_delay = cfg.max_delay;
        let input_len = engine.input_len();
        let metrics = metrics.clone();
        tasks.spawn(async move {
            while let Some(first) = ready_rx.recv().await {
                let deadline = tokio::time::Instant::now() + max_delay;
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                        Ok(Some(p)) => batch.push(p),
                        Ok(None) | Err(_) => break,
                    }
                }
                let mut input = Vec::with_capacity(batch.len() * input_len);
                let mut keys = Vec::with_capacity(batch.len());
                for p in batch {
                    input.extend_from_slice(&p.input);
                    keys.push((p.face_id, p.view));
                }
                if batch_tx.send(PendingBatch { keys, input }).await.is_err() {
                    break;
                }
                metrics.observe_depth(stage::INFER, depth(&batch_tx));
            }
            Ok(())
        });
    }

    // Driver: one batch at a time through the engine, then rows to the sink.
    {
        let engine = engine.clone();
        let metrics = metrics.clone();
        let in_flight = in_flight.clone();
        let progress = progress.clone();
        tasks.spawn(async move {
            while let Some(PendingBatch { keys, input }) = batch_rx.recv().await {
                let n = keys.len();
                metrics.observe_batch(n);
                let out =
                    engine.infer(input, n).await.inspect_err(|_| metrics.error(error_kind::INFERENCE))?;
                in_flight.sub(n);
                for (i, (face_id, view)) in keys.into_iter().enumerate() {
                    if rows_tx.send(row_of(&out, i, face_id, view)).await.is_err() {
                        return Ok(());
                    }
                }
                metrics.images.inc_by(n as u64);
                progress.fetch_add(n, Ordering::Relaxed);
            }
            Ok(())
        });
    }

    // Sink: runs here, so a storage error surfaces directly.
    let chunk = cfg.stage_rows.max(1);
    let mut buf = Vec::with_capacity(chunk.min(4096));
    let mut rows = 0;
    let mut sink_result: Result<()> = Ok(());
    while let Some(r) = rows_rx.recv().await {
        buf.push(r);
        if buf.len() >= chunk {
            rows += buf.len();
            if let Err(e) = sink.stage(std::mem::take(&mut buf)).await {
                sink_result = Err(e);
                break;
            }
        }
    }
    drop(rows_rx);
    // Upstream errors (teacher, panics) come first: a closed sink is their consequence.
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(Error::Input(format!("pipeline task failed: {e}"))),
        }
    }
    if let Err(e) = sink_result {
        metrics.error(error_kind::STORAGE);
        return Err(e);
    }
    if !buf.is_empty() {
        rows += buf.len();
        sink.stage(buf).await.inspect_err(|_| metrics.error(error_kind::STORAGE))?;
    }
    let staged = sink.finish().await.inspect_err(|_| metrics.error(error_kind::STORAGE))?;
    let elapsed = started.elapsed();
    if rows > 0 {
        metrics.images_per_second.set(rows as f64 / elapsed.as_secs_f64().max(1e-9));
    }
    let failures = std::mem::take(&mut *failures.lock().expect("failures lock"));
    Ok(ShardReport { faces: n_faces, rows, skipped_existing, faces_skipped, failures, staged, elapsed })
}

fn row_of(out: &BatchOutputs, i: usize, face_id: FaceId, view: View) -> LabelRow {
    LabelRow {
        face_id,
        view,
        logits: out.logits_row(i).to_vec(),
        valence: out.valence.as_ref().map(|v| v[i]),
        arousal: out.arousal.as_ref().map(|v| v[i]),
        embedding: out.embedding_row(i).map(<[f32]>::to_vec),
        landmarks: out.landmarks_row(i).map(<[f32]>::to_vec),
    }
}
