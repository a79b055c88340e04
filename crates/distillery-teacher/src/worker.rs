//! The worker loop: register with the coordinator, lease a shard, label it while heartbeating,
//! hand in the staged fragments, repeat.
//!
//! Failure handling:
//! - the coordinator unreachable (or restarted, so our session is unknown): retry with exponential
//!   backoff (`retry_initial_ms` doubling up to `retry_max_ms`) and register again;
//! - a heartbeat answering REVOKED / CANCELLED / UNKNOWN: drop the shard's work at once;
//! - a shard that fails: `FailShard` with `retryable` from [`Error::is_retryable`].
//!
//! Shutdown (SIGTERM in the CLI) **drains**: no new lease is taken, the current shard is finished
//! and completed if it ends within `drain_timeout_ms`; otherwise its work is dropped and its lease
//! released with a retryable `FailShard`, so another worker picks it up at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use candle_core::Device;
use distillery_data::FaceRecord;
use distillery_models::teacher::TeacherInfo;
use distillery_proto::auth::AttachBearer;
use distillery_proto::transport::{ConnectError, Target};
use distillery_proto::v1;
use distillery_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::config::WorkerConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::load::{TeacherSpec, load_teacher, parse_device};
use crate::metrics::{Metrics, error_kind, serve_metrics};
use crate::pipeline::{RowSink, ShardJob, label_shard_with_progress};
use crate::service::{EngineSlot, ServerOptions, serve};

/// Where a worker reads a lease's faces and stages its rows.
#[async_trait::async_trait]
pub trait ShardStorage: Send + Sync + 'static {
    /// The faces of the lease's shard range.
    async fn read_faces(&self, lease: &v1::ShardLease) -> Result<Vec<FaceRecord>>;
    /// A sink staging rows for the lease into its teacher cache.
    async fn open_sink(
        &self,
        lease: &v1::ShardLease,
        teacher: &TeacherInfo,
        worker_id: &str,
    ) -> Result<Box<dyn RowSink>>;
}

/// A worker started with [`spawn_worker`].
pub struct RunningWorker {
    /// Address of the worker's `TeacherService`.
    pub addr: SocketAddr,
    /// Address of `GET /metrics`, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub worker_id: String,
    pub metrics: Arc<Metrics>,
    /// Resolves when the worker has stopped (after [`RunningWorker::shutdown`] or a fatal error).
    pub handle: tokio::task::JoinHandle<Result<()>>,
    stop: watch::Sender<bool>,
}

impl RunningWorker {
    /// Asks the worker to drain and stop (see the module docs); returns at once.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Drains, stops and waits for the worker.
    pub async fn stop(self) -> Result<()> {
        self.shutdown();
        self.handle
            .await
            .map_err(|e| Error::Transport { what: "worker task".into(), reason: e.to_string() })?
    }
}

/// Runs a worker until `shutdown` resolves, then drains and returns.
pub async fn run_worker(
    cfg: WorkerConfig,
    storage: Arc<dyn ShardStorage>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut w = spawn_worker(cfg, storage).await?;
    tokio::select! {
        r = &mut w.handle => r.map_err(|e| Error::Transport { what: "worker task".into(), reason: e.to_string() })?,
        () = shutdown => w.stop().await,
    }
}

/// Starts a worker in the background: binds its `TeacherService` (and metrics endpoint), then
/// loads the configured teacher (if any) and works leases until [`RunningWorker::shutdown`].
pub async fn spawn_worker(cfg: WorkerConfig, storage: Arc<dyn ShardStorage>) -> Result<RunningWorker> {
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let pinned = cfg.teacher.as_deref().map(TeacherSpec::parse).transpose()?;
    let (stop, stop_rx) = watch::channel(false);
    let metrics = Metrics::new();
    let (server_stop, server_stop_rx) = watch::channel(false);
    let server_shutdown = {
        let mut rx = server_stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // A CA file that cannot be used is a configuration error now, not a retry loop. It is read
    // again at each registration, so a renewed CA is picked up.
    let coordinator = cfg.coordinator_target();
    coordinator.endpoint().map_err(|e| Error::config("tls_ca", e.to_string()))?;
    let opts = ServerOptions {
        auth_token: cfg.auth_token.clone(),
        max_message_bytes: cfg.max_message_bytes,
        tls: cfg.tls.clone(),
    };
    let server = serve(cfg.listen, opts, server_shutdown).await?;
    let metrics_addr = match cfg.metrics_listen {
        Some(a) => {
            let mut rx = server_stop_rx.clone();
            let (addr, _) = serve_metrics(a, metrics.clone(), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await?;
            Some(addr)
        }
        None => None,
    };
    let addr = server.addr;
    let worker_id = cfg.worker_id.clone().unwrap_or_else(|| default_worker_id(addr.port()));
    let advertise = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
    let worker = Worker {
        device_name: cfg.device.trim().to_ascii_lowercase(),
        cfg,
        coordinator,
        id: worker_id.clone(),
        advertise,
        metrics: metrics.clone(),
        slot: server.slot.clone(),
        storage,
        device,
        pinned,
        loaded: None,
        stop: stop_rx,
    };
    let handle = tokio::spawn(async move {
        let r = worker.run().await;
        let _ = server_stop.send(true);
        r.and(server.wait().await)
    });
    Ok(RunningWorker { addr, metrics_addr, worker_id, metrics, handle, stop })
}

/// The id of a worker started without one: `worker-<host>-<pid>-<port>`. The host name keeps ids
/// apart where PIDs and ports repeat (every pod of a Deployment is PID 1 on the same port).
pub fn default_worker_id(port: u16) -> String {
    worker_id_for(host_name().as_deref(), std::process::id(), port)
}

/// The host name: `/proc/sys/kernel/hostname`, else `$HOSTNAME`, else none.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// `worker-<host>-<pid>-<port>`, with characters outside `[A-Za-z0-9._:-]` of the host replaced by
/// `-` and the host shortened so the id stays within the 128 characters of a valid worker id.
pub fn worker_id_for(host: Option<&str>, pid: u32, port: u16) -> String {
    let tail = format!("-{pid}-{port}");
    let host: String = host
        .unwrap_or("unknown-host")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._:-".contains(c) { c } else { '-' })
        .take(128 - "worker-".len() - tail.len())
        .collect();
    format!("worker-{host}{tail}")
}

type Client = CoordinatorServiceClient<InterceptedService<Channel, AttachBearer>>;

struct Session {
    client: Client,
    token: String,
    heartbeat: Duration,
}

/// Exponential backoff between attempts to reach the coordinator.
struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self { next: initial, initial, max }
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    fn reset(&mut self) {
        self.next = self.initial;
    }
}

enum Outcome {
    Finished(Result<crate::pipeline::ShardReport>),
    Lost(v1::LeaseStatus),
    Drained,
}

struct Worker {
    cfg: WorkerConfig,
    /// The coordinator's URL and CA.
    coordinator: Target,
    id: String,
    advertise: String,
    metrics: Arc<Metrics>,
    slot: EngineSlot,
    storage: Arc<dyn ShardStorage>,
    device: Device,
    device_name: String,
    pinned: Option<TeacherSpec>,
    /// The loaded teacher and the spec it came from.
    loaded: Option<(TeacherSpec, Engine)>,
    stop: watch::Receiver<bool>,
}

impl Worker {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits `d` unless shutdown comes first; false when shutting down.
    async fn pause(&self, d: Duration) -> bool {
        let mut rx = self.stop.clone();
        let stopped = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        tokio::select! {
            () = tokio::time::sleep(d) => !self.stopping(),
            () = stopped => false,
        }
    }

    async fn run(mut self) -> Result<()> {
        if let Some(spec) = self.pinned.clone() {
            let engine = self.load(&spec).await?;
            self.loaded = Some((spec, engine));
        }
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.retry_initial_ms),
            Duration::from_millis(self.cfg.retry_max_ms),
        );
        let mut session: Option<Session> = None;
        while !self.stopping() {
            let Some(s) = session.as_mut() else {
                match self.register().await {
                    Ok(s) => {
                        tracing::info!(worker = %self.id, coordinator = %self.cfg.coordinator, "registered");
                        session = Some(s);
                        backoff.reset();
                        // Ready for work: a generic worker is healthy before its first lease.
                        self.slot.set_accepting_work(true).await;
                    }
                    Err(e) => {
                        self.metrics.error(error_kind::COORDINATOR);
                        tracing::warn!(error = %e, "cannot register with the coordinator; retrying");
                        if !self.pause(backoff.step()).await {
                            break;
                        }
                    }
                }
                continue;
            };
            let req = v1::LeaseShardRequest { worker_id: self.id.clone(), session: s.token.clone() };
            match s.client.lease_shard(req).await {
                Err(status) => {
                    // Unreachable, restarted (unknown session) or refusing: start over.
                    self.metrics.error(error_kind::COORDINATOR);
                    tracing::warn!(%status, "LeaseShard failed; registering again");
                    session = None;
                    self.slot.set_accepting_work(false).await;
                    if !self.pause(backoff.step()).await {
                        break;
                    }
                }
                Ok(resp) => match resp.into_inner().outcome {
                    Some(v1::lease_shard_response::Outcome::Lease(lease)) => {
                        backoff.reset();
                        let (client, hb) = (s.client.clone(), s.heartbeat);
                        let token = s.token.clone();
                        self.work(client, &token, hb, lease).await;
                    }
                    Some(v1::lease_shard_response::Outcome::NoWork(nw)) => {
                        backoff.reset();
                        let d = Duration::from_millis(nw.retry_after_ms.clamp(1, self.cfg.retry_max_ms));
                        if !self.pause(d).await {
                            break;
                        }
                    }
                    None => {
                        tracing::warn!("LeaseShard answered neither a lease nor no-work; registering again");
                        session = None;
                        self.slot.set_accepting_work(false).await;
                        if !self.pause(backoff.step()).await {
                            break;
                        }
                    }
                },
            }
        }
        self.slot.set_accepting_work(false).await;
        tracing::info!(worker = %self.id, "worker stopped");
        Ok(())
    }

    async fn register(&self) -> Result<Session> {
        let channel = self.coordinator.connect(Duration::from_secs(5)).await.map_err(|e| match e {
            ConnectError::Unreachable { url, reason } => {
                Error::Transport { what: format!("connecting to {url}"), reason }
            }
            other => Error::config("tls_ca", other.to_string()),
        })?;
        let bearer = AttachBearer::new(self.cfg.auth_token.as_deref(), "auth_token")
            .map_err(|e| Error::config("auth_token", e))?;
        let mut client = CoordinatorServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(self.cfg.max_message_bytes)
            .max_encoding_message_size(self.cfg.max_message_bytes);
        let (name, fingerprint, max_batch) = match &self.loaded {
            Some((_, e)) if self.pinned.is_some() => (
                e.info().name.clone(),
                e.info().fingerprint.to_string(),
                self.cfg.max_batch.min(e.info().max_batch),
            ),
            _ => (String::new(), String::new(), self.cfg.max_batch),
        };
        let resp = client
            .register_worker(v1::RegisterWorkerRequest {
                worker_id: self.id.clone(),
                address: self.advertise.clone(),
                teacher_name: name,
                teacher_fingerprint: fingerprint,
                device: self.device_name.clone(),
                max_batch: max_batch as u32,
            })
            .await
            .map_err(|s| Error::Rpc { call: "RegisterWorker", status: Box::new(s) })?
            .into_inner();
        let heartbeat = match resp.heartbeat_interval_ms {
            0 => Duration::from_millis((resp.lease_ttl_ms / 3).max(100)),
            ms => Duration::from_millis(ms),
        };
        Ok(Session { client, token: resp.session, heartbeat })
    }

    async fn load(&self, spec: &TeacherSpec) -> Result<Engine> {
        let (spec2, device) = (spec.clone(), self.device.clone());
        let teacher = tokio::task::spawn_blocking(move || load_teacher(&spec2, &device))
            .await
            .map_err(|e| Error::load(spec.to_string(), e))??;
        let engine = Engine::start(teacher, 2);
        self.slot.set(engine.clone(), self.device_name.clone()).await;
        tracing::info!(teacher = %engine.info().name, fingerprint = %engine.info().fingerprint, "teacher loaded");
        Ok(engine)
    }

    /// The engine for `lease`: the pinned teacher, or the lease's teacher (loaded when it changes).
    async fn engine_for(&mut self, lease: &v1::ShardLease) -> Result<Engine> {
        let spec = match &self.pinned {
            Some(p) => p.clone(),
            None => spec_of_lease(lease)?,
        };
        let engine = match &self.loaded {
            Some((s, e)) if *s == spec => e.clone(),
            _ => {
                self.slot.clear().await;
                self.loaded = None;
                let e = self.load(&spec).await?;
                self.loaded = Some((spec, e.clone()));
                e
            }
        };
        let have = engine.info().fingerprint.to_string();
        if !lease.teacher_fingerprint.is_empty() && lease.teacher_fingerprint != have {
            return Err(Error::TeacherMismatch { wanted: lease.teacher_fingerprint.clone(), have });
        }
        Ok(engine)
    }

    async fn work(&mut self, mut client: Client, session: &str, heartbeat: Duration, lease: v1::ShardLease) {
        let lease_id = lease.lease_id.clone();
        tracing::info!(lease = %lease_id, shard = %lease.shard_key, attempt = lease.attempt, "labelling shard");
        let progress = Arc::new(AtomicUsize::new(0));
        let views_per_face = lease.views as usize + 1;
        let pipeline_cfg = self.cfg.pipeline();
        let metrics = self.metrics.clone();
        let storage = self.storage.clone();
        let id = self.id.clone();
        let engine = self.engine_for(&lease).await;
        let job = {
            let progress = progress.clone();
            let lease = lease.clone();
            async move {
                let engine = engine?;
                let faces = storage.read_faces(&lease).await?;
                let mut sink = storage.open_sink(&lease, engine.info(), &id).await?;
                let job = ShardJob {
                    shard_key: lease.shard_key.clone(),
                    augmentations: lease.views,
                    view_seed: lease.view_seed,
                };
                label_shard_with_progress(
                    &engine,
                    &pipeline_cfg,
                    &metrics,
                    &job,
                    faces,
                    sink.as_mut(),
                    &progress,
                )
                .await
            }
        };
        tokio::pin!(job);
        let mut ticks = tokio::time::interval(heartbeat);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut stop = self.stop.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::pin!(stopped);
        let mut drain_until: Option<tokio::time::Instant> = None;
        let drain = Duration::from_millis(self.cfg.drain_timeout_ms);
        let outcome = loop {
            tokio::select! {
                r = &mut job => break Outcome::Finished(r),
                _ = ticks.tick() => {
                    let req = v1::HeartbeatRequest {
                        worker_id: self.id.clone(),
                        session: session.to_string(),
                        leases: vec![v1::LeaseProgress {
                            lease_id: lease_id.clone(),
                            images_done: (progress.load(Ordering::Relaxed) / views_per_face) as u64,
                        }],
                    };
                    match client.heartbeat(req).await {
                        Ok(resp) => {
                            let status = resp.into_inner().leases.first().map(|l| l.status()).unwrap_or(v1::LeaseStatus::Unknown);
                            if status != v1::LeaseStatus::Active {
                                break Outcome::Lost(status);
                            }
                        }
                        // Keep working: the coordinator may be back before the lease lapses.
                        Err(status) => {
                            self.metrics.error(error_kind::COORDINATOR);
                            tracing::warn!(%status, lease = %lease_id, "heartbeat failed");
                        }
                    }
                }
                () = &mut stopped, if drain_until.is_none() => {
                    tracing::info!(lease = %lease_id, timeout_ms = self.cfg.drain_timeout_ms, "draining: finishing the current shard");
                    drain_until = Some(tokio::time::Instant::now() + drain);
                }
                () = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)), if drain_until.is_some() => {
                    break Outcome::Drained;
                }
            }
        };
        match outcome {
            Outcome::Finished(Ok(report)) => {
                tracing::info!(
                    lease = %lease_id, rows = report.rows, faces = report.faces,
                    failed_faces = report.failures.len(), secs = report.elapsed.as_secs_f64(), "shard labelled"
                );
                let req = v1::CompleteShardRequest {
                    worker_id: self.id.clone(),
                    lease_id: lease_id.clone(),
                    staged_fragments: report.staged.into_bytes(),
                    rows_written: report.rows as u64,
                    skipped: report.faces_skipped as u64,
                };
                match self
                    .call_with_retries("CompleteShard", || {
                        let mut c = client.clone();
                        let r = req.clone();
                        async move { c.complete_shard(r).await.map(|r| r.into_inner()) }
                    })
                    .await
                {
                    Ok(resp) => {
                        self.metrics.shards_completed.inc();
                        tracing::info!(lease = %lease_id, outcome = ?resp.outcome(), detail = %resp.detail, "shard handed in");
                    }
                    Err(e) => {
                        tracing::warn!(lease = %lease_id, error = %e, "could not hand in the shard; its lease will lapse")
                    }
                }
            }
            Outcome::Finished(Err(e)) => {
                self.metrics.shards_failed.inc();
                tracing::warn!(lease = %lease_id, error = %e, retryable = e.is_retryable(), "shard failed");
                self.fail(&client, &lease_id, e.to_string(), e.is_retryable()).await;
            }
            Outcome::Lost(status) => {
                tracing::warn!(lease = %lease_id, ?status, "lease lost; dropping the shard's work");
            }
            Outcome::Drained => {
                self.metrics.shards_failed.inc();
                tracing::warn!(lease = %lease_id, "drain timeout: releasing the shard");
                self.fail(&client, &lease_id, "worker shutting down before the shard finished".into(), true)
                    .await;
            }
        }
    }

    async fn fail(&self, client: &Client, lease_id: &str, error: String, retryable: bool) {
        let req = v1::FailShardRequest {
            worker_id: self.id.clone(),
            lease_id: lease_id.to_string(),
            error,
            retryable,
        };
        let r = self
            .call_with_retries("FailShard", || {
                let mut c = client.clone();
                let r = req.clone();
                async move { c.fail_shard(r).await.map(|r| r.into_inner()) }
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(lease = %lease_id, error = %e, "could not report the failure; the lease will lapse");
        }
    }

    /// A few attempts with backoff on UNAVAILABLE, even while draining (the work is done already).
    async fn call_with_retries<T, F, Fut>(&self, call: &'static str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.retry_initial_ms),
            Duration::from_millis(self.cfg.retry_max_ms),
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(s) if s.code() == tonic::Code::Unavailable && attempt < 5 => {
                    self.metrics.error(error_kind::COORDINATOR);
                    tokio::time::sleep(backoff.step()).await;
                }
                Err(s) => {
                    self.metrics.error(error_kind::COORDINATOR);
                    return Err(Error::Rpc { call, status: Box::new(s) });
                }
            }
        }
    }
}

/// The teacher a lease names, as a [`TeacherSpec`].
pub fn spec_of_lease(lease: &v1::ShardLease) -> Result<TeacherSpec> {
    let t = lease.teacher.as_ref().ok_or_else(|| Error::config("lease.teacher", "is missing"))?;
    let kind = v1::TeacherKind::try_from(t.kind)
        .map_err(|_| Error::config("lease.teacher.kind", format!("unknown kind {}", t.kind)))?;
    let weights = (!t.weights_path.is_empty()).then(|| t.weights_path.clone().into());
    match kind {
        v1::TeacherKind::Emonet8 => Ok(TeacherSpec::Emonet { classes: 8, weights }),
        v1::TeacherKind::Emonet5 => Ok(TeacherSpec::Emonet { classes: 5, weights }),
        v1::TeacherKind::Onnx => Ok(TeacherSpec::Onnx(t.config_path.clone().into())),
        v1::TeacherKind::Student => Ok(TeacherSpec::Student(t.config_path.clone().into())),
        v1::TeacherKind::Unspecified => Err(Error::config("lease.teacher.kind", "is unspecified")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::valid_worker_id;

    #[test]
    fn the_default_worker_id_names_the_host() {
        let id = worker_id_for(Some("teacher-worker-7d9f8-x2x4q"), 1, 50052);
        assert_eq!(id, "worker-teacher-worker-7d9f8-x2x4q-1-50052");
        // Two pods: same PID and port, different host names, different ids.
        assert_ne!(id, worker_id_for(Some("teacher-worker-7d9f8-k8zzm"), 1, 50052));
        // Odd characters are replaced and long names shortened: the id stays valid.
        let id = worker_id_for(Some("a b/c"), 7, 1);
        assert_eq!(id, "worker-a-b-c-7-1");
        let long = "h".repeat(300);
        let id = worker_id_for(Some(&long), u32::MAX, u16::MAX);
        assert!(valid_worker_id(&id), "{id}");
        assert!(id.ends_with(&format!("-{}-{}", u32::MAX, u16::MAX)), "{id}");
        assert!(valid_worker_id(&worker_id_for(None, 1, 2)));
    }

    #[test]
    fn the_default_worker_id_of_this_process_includes_its_host_name() {
        let id = default_worker_id(50061);
        assert!(valid_worker_id(&id), "{id}");
        assert!(id.ends_with(&format!("-{}-50061", std::process::id())), "{id}");
        // Where the kernel reports a host name (Linux), the id carries it.
        if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let h = h.trim();
            assert!(!h.is_empty());
            assert_eq!(host_name().as_deref(), Some(h));
            assert_eq!(id, worker_id_for(Some(h), std::process::id(), 50061));
            if h.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)) {
                assert!(id.starts_with(&format!("worker-{h}-")), "{id}");
            }
        }
    }
}
