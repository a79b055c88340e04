//! Prometheus metrics of a teacher worker and the HTTP endpoint that serves them.
//!
//! Queue gauges record both the current depth and the high-water mark of every bounded stage, so an
//! operator (and the tests) can see that memory stays flat however large a dataset is.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};

type Label = [(&'static str, &'static str); 1];

/// Bounded stages of the pipeline, as used in the `stage` label.
pub mod stage {
    /// Faces read from the dataset, waiting to be decoded.
    pub const DECODE: &str = "decode";
    /// Prepared (face, view) inputs waiting to be batched.
    pub const READY: &str = "ready";
    /// Batches submitted to the inference thread, waiting for their outputs.
    pub const INFER: &str = "infer";
    /// All prepared (face, view) inputs alive anywhere in the pipeline.
    pub const IN_FLIGHT: &str = "in_flight";
}

/// The worker's metrics. Cheap to share: clone the `Arc`.
pub struct Metrics {
    registry: Registry,
    /// (face, view) rows produced by the teacher.
    pub images: Counter,
    /// Throughput of the last finished shard, rows per second.
    pub images_per_second: Gauge<f64, AtomicU64>,
    /// Sizes of the batches given to the teacher.
    pub batch_size: Histogram,
    /// Batches given to the teacher, and the largest one.
    pub batches: Counter,
    pub batch_size_max: Gauge,
    queue_depth: Family<Label, Gauge>,
    queue_high_water: Family<Label, Gauge>,
    queue_capacity: Family<Label, Gauge>,
    errors: Family<Label, Counter>,
    /// (face, view) pairs skipped because the cache already held them.
    pub skipped_existing: Counter,
    /// Shards finished and failed.
    pub shards_completed: Counter,
    pub shards_failed: Counter,
}

/// Error kinds counted in `errors_total{kind=...}`.
pub mod error_kind {
    pub const DECODE: &str = "decode";
    pub const INFERENCE: &str = "inference";
    pub const STORAGE: &str = "storage";
    pub const COORDINATOR: &str = "coordinator";
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("distillery_teacher");
        let m = Metrics {
            images: Counter::default(),
            images_per_second: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            batches: Counter::default(),
            batch_size_max: Gauge::default(),
            queue_depth: Family::default(),
            queue_high_water: Family::default(),
            queue_capacity: Family::default(),
            errors: Family::default(),
            skipped_existing: Counter::default(),
            shards_completed: Counter::default(),
            shards_failed: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("images", "Face views labelled by the teacher", m.images.clone());
        registry.register(
            "images_per_second",
            "Throughput of the last finished shard",
            m.images_per_second.clone(),
        );
        registry.register("batch_size", "Batch sizes given to the teacher", m.batch_size.clone());
        registry.register("batches", "Batches given to the teacher", m.batches.clone());
        registry.register("batch_size_max", "Largest batch given to the teacher", m.batch_size_max.clone());
        registry.register(
            "queue_depth",
            "Items waiting in each bounded pipeline stage",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_high_water",
            "Largest depth seen in each bounded pipeline stage",
            m.queue_high_water.clone(),
        );
        registry.register("queue_capacity", "Bound of each pipeline stage", m.queue_capacity.clone());
        registry.register("errors", "Errors by kind", m.errors.clone());
        registry.register("skipped_existing", "Face views already in the cache", m.skipped_existing.clone());
        registry.register("shards_completed", "Shards completed", m.shards_completed.clone());
        registry.register("shards_failed", "Shards failed", m.shards_failed.clone());
        Arc::new(Metrics { registry, ..m })
    }

    /// Records one batch of `n` inputs.
    pub fn observe_batch(&self, n: usize) {
        self.batch_size.observe(n as f64);
        self.batches.inc();
        self.batch_size_max.inner().fetch_max(n as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Declares the bound of `stage`.
    pub fn set_capacity(&self, stage: &'static str, cap: usize) {
        self.queue_capacity.get_or_create(&[("stage", stage)]).set(cap as i64);
    }

    /// Records the current depth of `stage` and raises its high-water mark if needed.
    pub fn observe_depth(&self, stage: &'static str, depth: usize) {
        let depth = depth as i64;
        self.queue_depth.get_or_create(&[("stage", stage)]).set(depth);
        let hw = self.queue_high_water.get_or_create(&[("stage", stage)]);
        // `fetch_max` on the inner atomic keeps the mark monotone under concurrent writers.
        hw.inner().fetch_max(depth, std::sync::atomic::Ordering::Relaxed);
    }

    /// Largest depth ever recorded for `stage`.
    pub fn high_water(&self, stage: &'static str) -> i64 {
        self.queue_high_water.get_or_create(&[("stage", stage)]).get()
    }

    /// Declared bound of `stage` (0 when never declared).
    pub fn capacity(&self, stage: &'static str) -> i64 {
        self.queue_capacity.get_or_create(&[("stage", stage)]).get()
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&[("kind", kind)]).inc();
    }

    pub fn errors(&self, kind: &'static str) -> u64 {
        self.errors.get_or_create(&[("kind", kind)]).get()
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown` resolves; returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use axum::http::header;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::Transport {
        what: format!("binding metrics listener {addr}"),
        reason: e.to_string(),
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Transport { what: "metrics listener".into(), reason: e.to_string() })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    m.render(),
                )
            }
        }),
    );
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok((bound, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_water_is_monotone_and_rendered() {
        let m = Metrics::new();
        m.set_capacity(stage::READY, 4);
        m.observe_depth(stage::READY, 3);
        m.observe_depth(stage::READY, 1);
        assert_eq!(m.high_water(stage::READY), 3);
        m.error(error_kind::DECODE);
        let text = m.render();
        assert!(text.contains("distillery_teacher_queue_high_water{stage=\"ready\"} 3"), "{text}");
        assert!(text.contains("distillery_teacher_errors_total{kind=\"decode\"} 1"), "{text}");
    }
}
