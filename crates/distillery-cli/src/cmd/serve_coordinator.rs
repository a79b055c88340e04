//! `distillery serve-coordinator`: runs the coordinator that splits labelling jobs into shards,
//! leases them to teacher workers and commits their outputs. Stops cleanly on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use distillery_coordinator::{CoordinatorConfig, TlsPaths};

/// Options of `serve-coordinator`. Flags override the values of `--config`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeCoordinatorArgs {
    /// TOML file with a `CoordinatorConfig` (listen, state_dir, lease_ttl, max_attempts,
    /// auth_token, tls, metrics_listen, max_message_bytes).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// gRPC listen address (port 0 picks a free port; the bound address is logged).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Directory of the durable state (jobs, shards, committed shard keys).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Lease time-to-live, e.g. `30s`, `500ms`, `2m`.
    #[arg(long, value_parser = parse_duration)]
    pub lease_ttl: Option<std::time::Duration>,
    /// Failed attempts after which a shard is poisoned.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Require `authorization: Bearer <token>` on every CoordinatorService call (health and
    /// reflection stay open for probes).
    #[arg(long, env = "DISTILLERY_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// PEM certificate for TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest gRPC message in bytes.
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    distillery_coordinator::config::parse_duration(s)
}

impl ServeCoordinatorArgs {
    /// The effective configuration: the file (if any), then the flags.
    pub fn to_config(&self) -> anyhow::Result<CoordinatorConfig> {
        let mut cfg = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                CoordinatorConfig::from_toml(&text).with_context(|| format!("in {}", p.display()))?
            }
            None => {
                let dir = self.state_dir.clone().context("--state-dir is required (or give --config)")?;
                CoordinatorConfig::new(dir)
            }
        };
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if let Some(v) = &self.state_dir {
            cfg.state_dir = v.clone();
        }
        if let Some(v) = self.lease_ttl {
            cfg.lease_ttl = v;
        }
        if let Some(v) = self.max_attempts {
            cfg.max_attempts = v;
        }
        if let Some(v) = &self.auth_token {
            cfg.auth_token = Some(v.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            cfg.tls = Some(TlsPaths { cert: cert.clone(), key: key.clone() });
        }
        if let Some(v) = self.metrics_listen {
            cfg.metrics_listen = Some(v);
        }
        if let Some(v) = self.max_message_bytes {
            cfg.max_message_bytes = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Runs the coordinator until SIGINT/SIGTERM.
pub async fn run(args: ServeCoordinatorArgs) -> anyhow::Result<()> {
    let cfg = args.to_config()?;
    distillery_coordinator::serve(cfg, distillery_coordinator::shutdown_signal()).await?;
    Ok(())
}
