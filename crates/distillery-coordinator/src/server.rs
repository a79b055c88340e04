//! Running the coordinator as a gRPC server: health (NOT_SERVING until the state is loaded, then
//! SERVING), reflection, optional bearer-token auth on `CoordinatorService` (health and reflection
//! stay open, so probes work without credentials), optional TLS, message size limits, the lease
//! reaper, the metrics endpoint, and graceful shutdown (open `WatchJob` streams end with
//! `UNAVAILABLE` so that clients watch again once the coordinator is back).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use distillery_proto::server::ServerTask;
use distillery_proto::v1::coordinator_service_server::CoordinatorServiceServer;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::backend::{CacheCommitter, ShardPlanner};
use crate::clock::{Clock, SystemClock};
use crate::config::CoordinatorConfig;
use crate::coordinator::{Coordinator, CoordinatorOptions};
use crate::error::CoordError;
use crate::grpc::CoordinatorGrpc;
use crate::lance_backend::LanceBackend;
use crate::metrics::{Metrics, serve_metrics};

pub use distillery_proto::auth::BearerAuth;

/// File in the state directory holding the bound gRPC address (`host:port`), rewritten at start.
pub const ADDR_FILE: &str = "coordinator.addr";

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] distillery_core::Error),
    #[error(transparent)]
    Coordinator(#[from] CoordError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    TlsFile(#[from] distillery_proto::transport::TlsFileError),
    #[error("TLS certificate {cert} and key {key}: {reason}")]
    Tls { cert: String, key: String, reason: String },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server task: {0}")]
    Join(String),
}

/// The storage a coordinator works against.
#[derive(Clone)]
pub struct Backends {
    pub planner: Arc<dyn ShardPlanner>,
    pub cache: Arc<dyn CacheCommitter>,
}

impl Backends {
    /// Lance datasets through `distillery-cache`.
    pub fn lance() -> Self {
        let b = Arc::new(LanceBackend::new());
        Self { planner: b.clone(), cache: b }
    }

    /// One object serving both roles (e.g. [`crate::MemoryBackend`]).
    pub fn from_shared<B: ShardPlanner + CacheCommitter>(b: Arc<B>) -> Self {
        Self { planner: b.clone(), cache: b }
    }
}

/// A coordinator serving in the background.
#[derive(Debug)]
pub struct RunningCoordinator {
    /// The bound gRPC address (the real port when `listen` had port 0).
    pub addr: SocketAddr,
    /// The bound metrics address, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The domain object, for in-process callers (e.g. `label --local`) and tests.
    pub coordinator: Coordinator,
    /// Stops the server when dropped.
    server: ServerTask<ServeError>,
}

impl RunningCoordinator {
    /// `http://addr` (or `https://` with TLS) for clients.
    pub fn endpoint(&self, tls: bool) -> String {
        format!("{}://{}", if tls { "https" } else { "http" }, self.addr)
    }

    /// Stops accepting calls, lets running calls finish, and waits for the server to stop.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.server.shutdown().await.map_err(|e| ServeError::Join(e.to_string()))?
    }
}

/// Serves until `shutdown` resolves (use [`shutdown_signal`] for SIGINT/SIGTERM), against Lance.
pub async fn serve(
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let running = spawn(cfg).await?;
    tracing::info!(addr = %running.addr, "coordinator serving");
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await
}

/// Starts a coordinator against Lance in the background.
pub async fn spawn(cfg: CoordinatorConfig) -> Result<RunningCoordinator, ServeError> {
    spawn_with(cfg, Backends::lance(), Arc::new(SystemClock)).await
}

/// Starts a coordinator with explicit storage and clock (tests, embedded use).
pub async fn spawn_with(
    cfg: CoordinatorConfig,
    backends: Backends,
    clock: Arc<dyn Clock>,
) -> Result<RunningCoordinator, ServeError> {
    cfg.validate()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<CoordinatorServiceServer<CoordinatorGrpc>>().await;
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;

    let metrics = Arc::new(Metrics::new());
    let opts = CoordinatorOptions {
        state_dir: cfg.state_dir.clone(),
        lease_ttl: cfg.lease_ttl,
        max_attempts: cfg.max_attempts,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Io { what: format!("bind {}", cfg.listen), source })?;
    let addr =
        listener.local_addr().map_err(|source| ServeError::Io { what: "local address".into(), source })?;
    let core = Coordinator::open(opts, backends.planner, backends.cache, clock, metrics.clone()).await?;
    // Other processes (workers, tests) started with port 0 read the real address from here.
    let addr_file = cfg.state_dir.join(ADDR_FILE);
    std::fs::write(&addr_file, format!("{addr}\n"))
        .map_err(|source| ServeError::Io { what: format!("write {}", addr_file.display()), source })?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_addr = match cfg.metrics_listen {
        Some(m) => {
            let mut rx = stop_rx.clone();
            let (bound, _task) = serve_metrics(m, metrics.clone(), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .map_err(|source| ServeError::Io { what: format!("bind metrics {m}"), source })?;
            Some(bound)
        }
        None => None,
    };

    let reaper = {
        let core = core.clone();
        let mut rx = stop_rx.clone();
        let period = (cfg.lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = core.reap_expired() {
                            tracing::error!(error = %e, "lease reaper");
                        }
                        core.trim_rates();
                    }
                    _ = rx.wait_for(|s| *s) => break,
                }
            }
        })
    };

    let auth = BearerAuth::new(cfg.auth_token.as_deref());
    let limit = cfg.max_message_bytes;
    // Set when shutdown begins: open WatchJob streams end, so the graceful stop does not wait for
    // jobs to finish.
    let (closing_tx, closing_rx) = watch::channel(false);
    let coord_svc = CoordinatorServiceServer::new(
        CoordinatorGrpc::new(core.clone()).closing_on(closing_rx).progress_every(cfg.watch_progress_interval),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(distillery_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Io {
            what: "reflection".into(),
            source: std::io::Error::other(e.to_string()),
        })?;

    let mut builder = Server::builder();
    if let Some(tls) = &cfg.tls {
        builder = builder.tls_config(tls.server_config()?).map_err(|e| ServeError::Tls {
            cert: tls.cert.display().to_string(),
            key: tls.key.display().to_string(),
            reason: distillery_proto::transport::error_chain(&e),
        })?;
    }
    // Only the Distillery service needs the token: kubelet gRPC probes cannot send one.
    let router = builder
        .add_service(InterceptedService::new(coord_svc, auth))
        .add_service(health)
        .add_service(reflection);

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = {
        let reporter = reporter.clone();
        ServerTask::spawn(move |stop| async move {
            let signal = async move {
                stop.await;
                reporter.set_not_serving::<CoordinatorServiceServer<CoordinatorGrpc>>().await;
                reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                let _ = closing_tx.send(true);
            };
            let result = router.serve_with_incoming_shutdown(incoming, signal).await;
            let _ = stop_tx.send(true);
            let _ = reaper.await;
            result.map_err(ServeError::from)
        })
    };
    reporter.set_serving::<CoordinatorServiceServer<CoordinatorGrpc>>().await;
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    tracing::info!(%addr, state_dir = %cfg.state_dir.display(), tls = cfg.tls.is_some(), auth = cfg.auth_token.is_some(), "coordinator ready");
    Ok(RunningCoordinator { addr, metrics_addr, coordinator: core, server })
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
