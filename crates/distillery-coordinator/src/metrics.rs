//! Prometheus metrics of the coordinator, served as text on `GET /metrics` when
//! `metrics_listen` is set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of per-state and per-outcome series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

/// Every metric the coordinator exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Shards of active (non-terminal) jobs per state.
    pub shards: Family<StateLabel, Gauge>,
    pub leases_granted: Counter,
    pub leases_expired: Counter,
    /// Completions by outcome (`committed`, `already_committed`, `rejected`).
    pub completions: Family<StateLabel, Counter>,
    /// Failure reports by result (`retry`, `poisoned`).
    pub failures: Family<StateLabel, Counter>,
    /// Faces labelled per second over the last minute, summed over active jobs.
    pub images_per_second: Gauge<f64, AtomicU64>,
    /// Faces labelled (committed) since start.
    pub images_labelled: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("distillery_coordinator");
        let m = Self {
            shards: Family::default(),
            leases_granted: Counter::default(),
            leases_expired: Counter::default(),
            completions: Family::default(),
            failures: Family::default(),
            images_per_second: Gauge::default(),
            images_labelled: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("shards", "Shards of active jobs by state", m.shards.clone());
        registry.register("leases_granted", "Shard leases granted", m.leases_granted.clone());
        registry.register("leases_expired", "Shard leases that lapsed", m.leases_expired.clone());
        registry.register("completions", "Shard completions by outcome", m.completions.clone());
        registry.register("failures", "Shard failure reports by result", m.failures.clone());
        registry.register(
            "images_per_second",
            "Faces labelled per second (1 min window)",
            m.images_per_second.clone(),
        );
        registry.register("images_labelled", "Faces labelled since start", m.images_labelled.clone());
        Self { registry, ..m }
    }

    pub fn label(s: &str) -> StateLabel {
        StateLabel { state: s.to_string() }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown` resolves; returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.encode())
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
