//! `distillery serve trainer`: runs the trainer service that queues distillation runs and trains
//! them, with health and reflection. SIGTERM / Ctrl-C: running runs write a checkpoint and stop
//! (resume them with `distillery train --resume` on their run directory), then the server exits.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use distillery_proto::transport::TlsPaths;
use distillery_trainer::server::TrainerServerConfig;

/// Options of `distillery serve trainer`. Flags override the values of `--config`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeTrainerArgs {
    /// TOML file with the keys listen, state_dir, concurrency, plots, auth_token,
    /// max_message_bytes (the flags below with `_` for `-`) and a `[tls]` table (cert, key).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listen address (port 0 picks a free port; the bound address is logged).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory of the run registry (runs.lance) and the run directories (runs/<run_id>/).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Runs trained at the same time; the others wait in submission order.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Do not draw the figures of finished runs.
    #[arg(long)]
    pub no_plots: bool,
    /// Require `authorization: Bearer <token>` on TrainerService calls (health and reflection
    /// stay open).
    #[arg(long, env = "DISTILLERY_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Largest gRPC message in bytes.
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// PEM certificate to serve gRPC over TLS (with --tls-key).
    #[arg(long, requires = "tls_key", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
}

impl ServeTrainerArgs {
    /// The effective configuration: the file (if any), then the flags.
    pub fn to_config(&self) -> anyhow::Result<TrainerServerConfig> {
        let mut cfg = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                TrainerServerConfig::from_toml(&text, &p.display().to_string())?
            }
            None => {
                let dir = self.state_dir.clone().context("--state-dir is required (or give --config)")?;
                TrainerServerConfig::new(dir)
            }
        };
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if let Some(v) = &self.state_dir {
            cfg.state_dir = v.clone();
        }
        if let Some(v) = self.concurrency {
            cfg.concurrency = v;
        }
        if self.no_plots {
            cfg.plots = false;
        }
        if let Some(v) = &self.auth_token {
            cfg.auth_token = Some(v.clone());
        }
        if let Some(v) = self.max_message_bytes {
            cfg.max_message_bytes = v;
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            cfg.tls = Some(TlsPaths { cert: cert.clone(), key: key.clone() });
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Runs the trainer until SIGINT/SIGTERM.
pub async fn run(args: ServeTrainerArgs) -> anyhow::Result<()> {
    let cfg = args.to_config()?;
    distillery_trainer::server::serve(cfg, distillery_coordinator::shutdown_signal()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_config(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/base/config").join(name)
    }

    #[test]
    fn flags_override_the_file_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, "state_dir = \"/var/lib/t\"\nconcurrency = 2\n").unwrap();
        let args = ServeTrainerArgs { config: Some(p.clone()), concurrency: Some(3), ..Default::default() };
        let cfg = args.to_config().unwrap();
        assert_eq!((cfg.state_dir.to_str(), cfg.concurrency, cfg.plots), (Some("/var/lib/t"), 3, true));
        let args = ServeTrainerArgs { config: Some(p.clone()), concurrency: Some(0), ..Default::default() };
        assert!(args.to_config().unwrap_err().to_string().contains("`concurrency`"));
        std::fs::write(&p, "state_dir = \"/var/lib/t\"\nruns_dir = \"/x\"\n").unwrap();
        let e = format!(
            "{:#}",
            ServeTrainerArgs { config: Some(p), ..Default::default() }.to_config().unwrap_err()
        );
        assert!(e.contains("runs_dir"), "{e}");
        let e = ServeTrainerArgs::default().to_config().unwrap_err().to_string();
        assert!(e.contains("--state-dir"), "{e}");
    }

    #[test]
    fn tls_flags_and_table() {
        let tls = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tls");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        let toml = format!(
            "state_dir = \"/var/lib/t\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            tls.join("server.pem").display(),
            tls.join("server.key").display()
        );
        std::fs::write(&p, toml).unwrap();
        let cfg = ServeTrainerArgs { config: Some(p), ..Default::default() }.to_config().unwrap();
        assert_eq!(cfg.tls.map(|t| t.key), Some(tls.join("server.key")));
        let args = ServeTrainerArgs {
            state_dir: Some("/var/lib/t".into()),
            tls_cert: Some(tls.join("server.pem")),
            tls_key: Some(tls.join("missing.key")),
            ..Default::default()
        };
        let e = args.to_config().unwrap_err().to_string();
        assert!(e.contains("`tls.key`") && e.contains("missing.key"), "{e}");
    }

    /// The configs the Kubernetes manifests mount are valid for the commands that read them.
    #[test]
    fn the_shipped_service_configs_parse() {
        let trainer =
            ServeTrainerArgs { config: Some(manifest_config("trainer.toml")), ..Default::default() };
        let cfg = trainer.to_config().unwrap();
        assert_eq!(cfg.listen.port(), 50053);
        let coordinator = crate::cmd::serve_coordinator::ServeCoordinatorArgs {
            config: Some(manifest_config("coordinator.toml")),
            listen: None,
            state_dir: None,
            lease_ttl: None,
            max_attempts: None,
            auth_token: None,
            tls_cert: None,
            tls_key: None,
            metrics_listen: None,
            max_message_bytes: None,
        };
        assert_eq!(coordinator.to_config().unwrap().listen.port(), 50051);
        let teacher = crate::cmd::serve_teacher::ServeTeacherArgs {
            config: Some(manifest_config("teacher.toml")),
            ..Default::default()
        };
        assert_eq!(teacher.to_config().unwrap().listen.port(), 50052);
    }

    #[test]
    fn the_token_comes_from_the_environment_too() {
        use clap::Args;
        let cmd = ServeTrainerArgs::augment_args(clap::Command::new("trainer"));
        let arg = cmd.get_arguments().find(|a| a.get_id() == "auth_token").expect("--auth-token");
        assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some("DISTILLERY_AUTH_TOKEN"));
    }
}
