//! A coordinator and K teacher workers in this process, talking real gRPC over loopback TCP.

use std::net::SocketAddr;
use std::path::PathBuf;

use distillery_coordinator::{CoordinatorConfig, RunningCoordinator};
use distillery_proto::transport::Target;
use distillery_teacher::worker::{RunningWorker, spawn_worker};
use distillery_teacher::{WorkerConfig, default_storage};

use crate::error::Result;

/// What to start.
#[derive(Clone, Debug)]
pub struct LocalClusterConfig {
    /// Durable coordinator state.
    pub state_dir: PathBuf,
    /// Number of teacher workers.
    pub workers: usize,
    /// Teacher every worker loads at start (`None`: each lease's teacher).
    pub teacher: Option<String>,
    /// Device name for the workers (`cpu`, `cuda:N`).
    pub device: String,
    /// Largest teacher batch.
    pub max_batch: usize,
    /// Image decoders per worker.
    pub decode_threads: usize,
    /// Bearer token required by every service (and sent by the workers).
    pub auth_token: Option<String>,
}

impl LocalClusterConfig {
    pub fn new(state_dir: impl Into<PathBuf>, workers: usize) -> Self {
        Self {
            state_dir: state_dir.into(),
            workers,
            teacher: None,
            device: "cpu".into(),
            max_batch: 32,
            decode_threads: 1,
            auth_token: None,
        }
    }
}

/// A running coordinator and its workers; [`LocalCluster::shutdown`] drains and stops them.
pub struct LocalCluster {
    pub coordinator: RunningCoordinator,
    pub workers: Vec<RunningWorker>,
}

impl LocalCluster {
    /// Binds everything to 127.0.0.1 on free ports and waits until each server is up.
    pub async fn start(cfg: &LocalClusterConfig) -> Result<Self> {
        let mut ccfg = CoordinatorConfig::new(&cfg.state_dir);
        ccfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        ccfg.auth_token = cfg.auth_token.clone();
        let coordinator = distillery_coordinator::spawn(ccfg).await?;
        let endpoint = coordinator.endpoint(false);
        tracing::info!(%endpoint, workers = cfg.workers, "local coordinator up");
        let mut workers = Vec::with_capacity(cfg.workers);
        for i in 0..cfg.workers {
            let wcfg = WorkerConfig {
                coordinator: endpoint.clone(),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                teacher: cfg.teacher.clone(),
                device: cfg.device.clone(),
                max_batch: cfg.max_batch,
                decode_threads: cfg.decode_threads,
                auth_token: cfg.auth_token.clone(),
                worker_id: Some(format!("local-{i}")),
                ..WorkerConfig::default()
            };
            workers.push(spawn_worker(wcfg, default_storage()).await?);
        }
        Ok(Self { coordinator, workers })
    }

    /// The coordinator, `http://127.0.0.1:PORT` (the embedded cluster is plaintext on loopback).
    pub fn endpoint(&self) -> Target {
        Target::new(self.coordinator.endpoint(false))
    }

    /// Drains the workers, then stops the coordinator.
    pub async fn shutdown(self) -> Result<()> {
        for w in self.workers {
            w.stop().await?;
        }
        self.coordinator.shutdown().await?;
        Ok(())
    }
}
