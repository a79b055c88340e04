//! Running the trainer as a gRPC server (`distillery serve trainer`): its configuration (TOML or
//! flags), `TrainerService` behind an optional bearer token, `grpc.health.v1.Health` and
//! reflection (both open, so probes work without credentials), and graceful shutdown.
//!
//! Health (`""` and `distillery.v1.TrainerService`) is `SERVING` once the run registry is loaded and
//! `NOT_SERVING` as soon as shutdown begins. Shutdown then stops the service's work
//! ([`Trainer::stop`]: running runs checkpoint and are recorded as interrupted, open `WatchRun`
//! streams end with `UNAVAILABLE`) and lets running calls finish.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use distillery_proto::auth::{AttachBearer, BearerAuth};
use distillery_proto::server::ServerTask;
use distillery_proto::transport::{ConnectError, Target, TlsPaths, error_chain};
use distillery_proto::v1::trainer_service_client::TrainerServiceClient;
use distillery_proto::v1::trainer_service_server::TrainerServiceServer;
use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Server};

use crate::service::{ServiceConfig, Trainer};
use crate::{Error, Result};

/// Health service name of the trainer service.
pub const SERVICE_NAME: &str = "distillery.v1.TrainerService";

/// Everything a trainer process needs. Unknown keys are errors; [`TrainerServerConfig::validate`]
/// names the bad key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerServerConfig {
    /// gRPC address; port 0 picks a free port (see [`RunningTrainer::addr`]).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Holds the run registry (`runs.lance`) and the run directories (`runs/<run_id>/`); created
    /// when missing.
    pub state_dir: PathBuf,
    /// Runs trained at the same time; the others wait in submission order.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Draw the figures of finished runs.
    #[serde(default = "default_plots")]
    pub plots: bool,
    /// When set, `TrainerService` calls must carry `authorization: Bearer <token>`.
    #[serde(default)]
    pub auth_token: Option<String>,
    /// Largest gRPC message accepted or sent by `TrainerService`, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// When set, gRPC is served over TLS (a `[tls]` table with `cert` and `key`, PEM).
    #[serde(default)]
    pub tls: Option<TlsPaths>,
}

pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50053))
}
pub fn default_concurrency() -> usize {
    1
}
pub fn default_plots() -> bool {
    true
}
pub fn default_max_message_bytes() -> usize {
    64 << 20
}

impl TrainerServerConfig {
    /// A config with defaults for everything but the state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: default_listen(),
            state_dir: state_dir.into(),
            concurrency: default_concurrency(),
            plots: default_plots(),
            auth_token: None,
            max_message_bytes: default_max_message_bytes(),
            tls: None,
        }
    }

    /// Parses and validates TOML; `origin` (e.g. the file path) names the source in errors, and
    /// unknown keys are errors naming the key.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::config(origin, e.to_string().trim()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(Error::config("state_dir", "is required"));
        }
        if !(1..=64).contains(&self.concurrency) {
            return Err(Error::config("concurrency", format!("{} is not in 1..=64", self.concurrency)));
        }
        if let Some(t) = &self.auth_token
            && (t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(Error::config("auth_token", "must be non-empty without whitespace"));
        }
        if !(1024..=(1 << 30)).contains(&self.max_message_bytes) {
            return Err(Error::config(
                "max_message_bytes",
                format!("{} is not between 1 KiB and 1 GiB", self.max_message_bytes),
            ));
        }
        if let Some(tls) = &self.tls {
            tls.check().map_err(|(key, reason)| Error::config(key, reason))?;
        }
        Ok(())
    }
}

/// A trainer serving in the background.
pub struct RunningTrainer {
    /// The bound gRPC address (the real port when `listen` had port 0).
    pub addr: SocketAddr,
    /// The service, for in-process callers and tests.
    pub trainer: Trainer,
    /// Stops the server when dropped.
    server: ServerTask<Error>,
}

impl RunningTrainer {
    /// Reports `NOT_SERVING`, stops the service's work ([`Trainer::stop`]), lets running calls
    /// finish, and waits for the server to stop.
    pub async fn shutdown(self) -> Result<()> {
        self.server.shutdown().await.map_err(|e| Error::Server(format!("server task: {e}")))?
    }
}

/// Serves until `shutdown` resolves, then shuts down gracefully.
pub async fn serve(
    cfg: TrainerServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let running = spawn(cfg).await?;
    tracing::info!(addr = %running.addr, "trainer serving");
    shutdown.await;
    tracing::info!("shutting down: stopping runs and watchers");
    running.shutdown().await
}

/// Opens the run registry, binds `cfg.listen` and serves in the background.
pub async fn spawn(cfg: TrainerServerConfig) -> Result<RunningTrainer> {
    cfg.validate()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::NotServing).await;
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::io(format!("bind {}", cfg.listen), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io(format!("bind {}", cfg.listen), e))?;
    let mut service_cfg = ServiceConfig::new(&cfg.state_dir);
    service_cfg.concurrency = cfg.concurrency;
    service_cfg.plots = cfg.plots;
    let trainer = Trainer::open(service_cfg).await?;

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(distillery_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Server(format!("reflection: {e}")))?;
    let svc = TrainerServiceServer::new(trainer.clone())
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes);
    let mut builder = Server::builder();
    if let Some(tls) = &cfg.tls {
        let config = tls.server_config().map_err(|e| Error::Server(e.to_string()))?;
        builder = builder.tls_config(config).map_err(|e| {
            Error::Server(format!(
                "TLS certificate {} and key {}: {}",
                tls.cert.display(),
                tls.key.display(),
                error_chain(&e)
            ))
        })?;
    }
    // Only the Distillery service needs the token: kubelet gRPC probes cannot send one.
    let router = builder
        .add_service(InterceptedService::new(svc, BearerAuth::new(cfg.auth_token.as_deref())))
        .add_service(health)
        .add_service(reflection);

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = {
        let reporter = reporter.clone();
        let trainer = trainer.clone();
        ServerTask::spawn(move |stop| async move {
            let signal = async move {
                stop.await;
                reporter.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::NotServing).await;
                reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                trainer.stop().await;
            };
            router
                .serve_with_incoming_shutdown(incoming, signal)
                .await
                .map_err(|e| Error::Server(format!("TrainerService on {addr}: {e}")))
        })
    };
    reporter.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    tracing::info!(%addr, state_dir = %cfg.state_dir.display(), concurrency = cfg.concurrency, tls = cfg.tls.is_some(), auth = cfg.auth_token.is_some(), "trainer ready");
    Ok(RunningTrainer { addr, trainer, server })
}

/// A `TrainerService` client that sends the bearer token, when given, with every call.
pub type TrainerClient = TrainerServiceClient<InterceptedService<Channel, AttachBearer>>;

/// Connects to the trainer at `trainer` (`http://host:port`, or `https://` with its CA).
pub async fn connect(trainer: &Target, token: Option<&str>) -> Result<TrainerClient> {
    let bearer = AttachBearer::new(token, "auth_token").map_err(|e| Error::config("auth_token", e))?;
    let channel = trainer.connect(std::time::Duration::from_secs(10)).await.map_err(|e| match e {
        ConnectError::Url { .. } => Error::config("trainer", e.to_string()),
        ConnectError::TlsCa(reason) => Error::config("tls_ca", reason),
        ConnectError::Unreachable { url, reason } => {
            Error::Server(format!("cannot reach the trainer at {url}: {reason}"))
        }
    })?;
    Ok(TrainerServiceClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(default_max_message_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_keys_are_checked_and_named() {
        let c = TrainerServerConfig::from_toml(
            "listen = \"0.0.0.0:50053\"\nstate_dir = \"/var/lib/t\"\nconcurrency = 2\nplots = false\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!((c.listen.port(), c.concurrency, c.plots), (50053, 2, false));
        assert_eq!(c.max_message_bytes, default_max_message_bytes());
        let e = TrainerServerConfig::from_toml("state_dir = \"/x\"\nconcurency = 2\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("concurency") && e.contains("t.toml"), "{e}");
        let e = TrainerServerConfig::from_toml("listen = \"0.0.0.0:1\"\n", "t.toml").unwrap_err().to_string();
        assert!(e.contains("state_dir"), "{e}");
    }

    #[test]
    fn validate_names_the_key() {
        type Breaker = Box<dyn Fn(&mut TrainerServerConfig)>;
        let bad: Vec<(&str, Breaker)> = vec![
            ("state_dir", Box::new(|c| c.state_dir = PathBuf::new())),
            ("concurrency", Box::new(|c| c.concurrency = 0)),
            ("auth_token", Box::new(|c| c.auth_token = Some("a b".into()))),
            ("max_message_bytes", Box::new(|c| c.max_message_bytes = 10)),
            (
                "tls.key",
                Box::new(|c| {
                    c.tls = Some(TlsPaths {
                        cert: concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into(),
                        key: "/nope".into(),
                    })
                }),
            ),
        ];
        for (key, f) in bad {
            let mut c = TrainerServerConfig::new("/tmp/t");
            c.validate().unwrap();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
    }
}
