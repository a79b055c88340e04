//! `distillery serve teacher`: run a teacher worker that leases shards from a coordinator, labels
//! them and serves its teacher over gRPC. SIGTERM / Ctrl-C drain the current shard, then exit.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use distillery_proto::transport::TlsPaths;
use distillery_teacher::{WorkerConfig, run_worker};

/// Options of `distillery serve teacher`. Flags override the values of `--config`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeTeacherArgs {
    /// Worker configuration file (TOML, keys as in the flags with `_` for `-`, except --tls-cert and
    /// --tls-key: a `[tls]` table with `cert` and `key`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Coordinator URL: http://HOST:PORT, or https://HOST:PORT with --tls-ca.
    #[arg(long, env = "DISTILLERY_COORDINATOR", value_name = "URL")]
    pub coordinator: Option<String>,
    /// PEM certificate of the CA that signed the coordinator's certificate (for an https://
    /// coordinator).
    #[arg(long, env = "DISTILLERY_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate to serve this worker's TeacherService over TLS (with --tls-key).
    #[arg(long, requires = "tls_key", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Address of this worker's TeacherService (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// host:port the coordinator hands out for this worker (default: the bound address).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Teacher to load at start: emonet-8[:WEIGHTS], emonet-5[:WEIGHTS], an ONNX teacher .toml, a
    /// student run directory, or tiny[:SEED[:SIDE]]. Without it the worker loads each lease's teacher.
    #[arg(long, value_name = "SPEC")]
    pub teacher: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Largest batch given to the teacher.
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Longest a partial batch waits for more images (ms).
    #[arg(long)]
    pub max_delay_ms: Option<u64>,
    /// Parallel image decoders.
    #[arg(long)]
    pub decode_threads: Option<usize>,
    /// Bound of the prepared-image queue.
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Bearer token required by this worker's TeacherService and sent to the coordinator.
    #[arg(long, env = "DISTILLERY_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Stable, unique worker id (1-128 of [A-Za-z0-9._:-]); default worker-<host>-<pid>-<port>.
    #[arg(long, env = "DISTILLERY_WORKER_ID", value_name = "ID")]
    pub worker_id: Option<String>,
    /// On shutdown, how long the current shard may take before its lease is released (ms).
    #[arg(long)]
    pub drain_timeout_ms: Option<u64>,
}

impl ServeTeacherArgs {
    /// The worker configuration: `--config` (or defaults), then the flags.
    pub fn to_config(&self) -> anyhow::Result<WorkerConfig> {
        let mut cfg = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                WorkerConfig::from_toml(&text, &p.display().to_string())?
            }
            None => WorkerConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { cfg.$f = v.clone().into(); } )* };
        }
        set!(
            coordinator,
            listen,
            device,
            max_batch,
            max_delay_ms,
            decode_threads,
            queue_capacity,
            drain_timeout_ms
        );
        set!(advertise, metrics_listen, teacher, auth_token, worker_id, tls_ca);
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            cfg.tls = Some(TlsPaths { cert: cert.clone(), key: key.clone() });
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Runs the worker until SIGTERM or Ctrl-C.
pub async fn run(args: ServeTeacherArgs) -> anyhow::Result<()> {
    let cfg = args.to_config()?;
    tracing::info!(coordinator = %cfg.coordinator, listen = %cfg.listen, teacher = ?cfg.teacher, tls = cfg.tls.is_some(), "starting teacher worker");
    run_worker(cfg, distillery_teacher::default_storage(), shutdown_signal()).await?;
    Ok(())
}

/// Resolves on the first SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested: draining");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(&p, "coordinator = \"http://c:1\"\nmax_batch = 8\n").unwrap();
        let args = ServeTeacherArgs { config: Some(p.clone()), max_batch: Some(16), ..Default::default() };
        let cfg = args.to_config().unwrap();
        assert_eq!((cfg.coordinator.as_str(), cfg.max_batch), ("http://c:1", 16));
        let args = ServeTeacherArgs { config: Some(p), device: Some("tpu".into()), ..Default::default() };
        assert!(args.to_config().unwrap_err().to_string().contains("`device`"));
    }

    #[test]
    fn tls_flags_set_the_ca_and_the_server_identity() {
        let tls = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tls");
        let args = ServeTeacherArgs {
            coordinator: Some("https://localhost:50051".into()),
            tls_ca: Some(tls.join("ca.pem")),
            tls_cert: Some(tls.join("server.pem")),
            tls_key: Some(tls.join("server.key")),
            ..Default::default()
        };
        let cfg = args.to_config().unwrap();
        assert_eq!(cfg.tls_ca, Some(tls.join("ca.pem")));
        assert_eq!(cfg.tls.map(|t| t.cert), Some(tls.join("server.pem")));
        // An https:// coordinator without a CA is refused, naming the key.
        let args =
            ServeTeacherArgs { coordinator: Some("https://localhost:50051".into()), ..Default::default() };
        assert!(args.to_config().unwrap_err().to_string().contains("`tls_ca`"));
        use clap::Args;
        let cmd = ServeTeacherArgs::augment_args(clap::Command::new("teacher"));
        let arg = cmd.get_arguments().find(|a| a.get_id() == "tls_ca").expect("--tls-ca");
        assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some("DISTILLERY_TLS_CA"));
        assert!(
            cmd.try_get_matches_from(["teacher", "--tls-cert", "c.pem"]).is_err(),
            "--tls-cert needs --tls-key"
        );
    }

    /// The manifests set `DISTILLERY_WORKER_ID` from the pod name; the flag must read it.
    #[test]
    fn worker_id_comes_from_the_environment_too() {
        use clap::Args;
        let cmd = ServeTeacherArgs::augment_args(clap::Command::new("teacher"));
        let arg = cmd.get_arguments().find(|a| a.get_id() == "worker_id").expect("--worker-id");
        assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some("DISTILLERY_WORKER_ID"));
        let m = cmd.try_get_matches_from(["teacher", "--worker-id", "teacher-worker-0"]).unwrap();
        assert_eq!(m.get_one::<String>("worker_id").map(String::as_str), Some("teacher-worker-0"));
    }
}
