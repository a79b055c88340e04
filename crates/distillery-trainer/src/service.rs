//! The trainer gRPC service: accepts runs (a TOML config plus overrides), queues them, trains up to
//! `concurrency` at a time, streams their progress, and records every run in the registry
//! ([`crate::registry`]).
//!
//! Each run lives in `<state_dir>/runs/<run_id>/` (the usual run directory). A run that was pending
//! or running when the service stopped is reported as failed after a restart; its directory keeps
//! the last checkpoint, from which `distillery train --resume` continues. [`Trainer::stop`] (a
//! graceful shutdown) has running runs write a checkpoint and records them failed the same way.
//!
//! The network side (health, reflection, auth, configuration) is in [`crate::server`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use distillery_core::RunId;
use distillery_proto::v1;
use distillery_proto::v1::trainer_service_server::{TrainerService, TrainerServiceServer};
use futures::Stream;
use tokio::sync::{Semaphore, broadcast, watch};
use tonic::{Request, Response, Status};

use crate::config::TrainConfig;
use crate::registry::{Registry, RunRecord};
use crate::run::{RunOptions, RunReport, run};
use crate::train::Progress;
use crate::{Error, Result};

/// Settings of the trainer service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Holds `runs.lance` (the registry) and `runs/<id>/`.
    pub state_dir: PathBuf,
    /// Runs trained at the same time; the others wait in submission order.
    pub concurrency: usize,
    pub device: Device,
    /// Draw the figures of finished runs.
    pub plots: bool,
}

impl ServiceConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self { state_dir: state_dir.into(), concurrency: 1, device: Device::Cpu, plots: true }
    }
}

struct Entry {
    run: v1::Run,
    record: RunRecord,
    cancel: Arc<AtomicBool>,
    events: broadcast::Sender<v1::RunEvent>,
}

struct Inner {
    cfg: ServiceConfig,
    runs: Mutex<BTreeMap<String, Entry>>,
    slots: Arc<Semaphore>,
    registry: Registry,
    /// Serialises registry appends (Lance commits of one writer).
    registry_lock: tokio::sync::Mutex<()>,
    /// Turns true when the service stops: no run starts, running runs stop, watchers end.
    stopping: watch::Sender<bool>,
    /// Runs that started and have not recorded their end yet.
    active: watch::Sender<usize>,
}

/// Why a run that was cut short by a stop (or a crash) of the service failed.
pub const INTERRUPTED: &str = "the trainer stopped during this run; resume it from its run directory";

/// Counts a started run in `active` until dropped.
struct Active(watch::Sender<usize>);

impl Active {
    fn start(active: &watch::Sender<usize>) -> Self {
        active.send_modify(|n| *n += 1);
        Self(active.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// The trainer service; cheap to clone.
#[derive(Clone)]
pub struct Trainer {
    inner: Arc<Inner>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn state_name(s: v1::RunState) -> &'static str {
    match s {
        v1::RunState::Pending => "pending",
        v1::RunState::Running => "running",
        v1::RunState::Completed => "completed",
        v1::RunState::Failed => "failed",
        v1::RunState::Cancelled => "cancelled",
        v1::RunState::Unspecified => "unspecified",
    }
}

fn state_of(name: &str) -> v1::RunState {
    match name {
        "pending" => v1::RunState::Pending,
        "running" => v1::RunState::Running,
        "completed" => v1::RunState::Completed,
        "failed" => v1::RunState::Failed,
        "cancelled" => v1::RunState::Cancelled,
        _ => v1::RunState::Unspecified,
    }
}

fn is_terminal(s: i32) -> bool {
    [v1::RunState::Completed, v1::RunState::Failed, v1::RunState::Cancelled].iter().any(|t| *t as i32 == s)
}

fn metrics_of(json: &str) -> Vec<v1::Metric> {
    let map: BTreeMap<String, f64> = serde_json::from_str(json).unwrap_or_default();
    map.into_iter().map(|(name, value)| v1::Metric { name, value }).collect()
}

fn run_of(r: &RunRecord) -> v1::Run {
    v1::Run {
        run_id: r.run_id.clone(),
        state: state_of(&r.state) as i32,
        config_toml: r.config_toml.clone(),
        run_dir: r.run_dir.clone(),
        step: r.step,
        total_steps: r.total_steps,
        epoch: 0,
        latest_metrics: metrics_of(&r.metrics_json),
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        error: r.error.clone(),
    }
}

fn step_metrics(p: &Progress) -> Vec<v1::Metric> {
    let l = &p.losses;
    [
        ("train/loss", l.total),
        ("train/hard", l.hard),
        ("train/soft", l.soft),
        ("train/smooth_l1", l.smooth_l1),
        ("train/bound", l.bound),
        ("train/pseudo_va", l.pseudo_va),
        ("train/feature", l.feature),
        ("train/grad_norm", l.grad_norm),
        ("train/lr", p.lr),
    ]
    .into_iter()
    .map(|(n, v)| v1::Metric { name: n.into(), value: v })
    .collect()
}

fn final_metrics(r: &RunReport) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let l = &r.train.last;
    m.insert("train/loss".into(), l.total);
    if let Some(e) = &r.eval {
        let s = &e.split;
        m.insert(format!("{s}/accuracy"), e.expression.accuracy);
        m.insert(format!("{s}/macro_f1"), e.expression.macro_f1);
        if let Some(a) = &e.affect {
            m.insert(format!("{s}/valence_ccc"), a.valence.ccc);
            m.insert(format!("{s}/arousal_ccc"), a.arousal.ccc);
            m.insert(format!("{s}/mean_ccc"), a.mean_ccc);
            m.insert(format!("{s}/valence_rmse"), a.valence.rmse);
            m.insert(format!("{s}/arousal_rmse"), a.arousal.rmse);
        }
        if let Some(t) = &e.teacher {
            m.insert(format!("{s}/teacher_top1_agreement"), t.top1_agreement);
            m.insert(format!("{s}/teacher_kl"), t.mean_kl);
        }
    }
    m.retain(|_, v| v.is_finite());
    m
}

impl Trainer {
    /// Opens the service's state: loads the registry and marks runs interrupted by a restart.
    pub async fn open(cfg: ServiceConfig) -> Result<Self> {
        std::fs::create_dir_all(cfg.state_dir.join("runs")).map_err(|e| Error::io(&cfg.state_dir, e))?;
        let registry = Registry::new(&cfg.state_dir);
        let mut runs = BTreeMap::new();
        let mut interrupted = Vec::new();
        for mut r in registry.latest().await? {
            if !is_terminal(state_of(&r.state) as i32) {
                r.state = "failed".into();
                r.error = INTERRUPTED.into();
                r.updated_at_ms = now_ms();
                interrupted.push(r.clone());
            }
            let (events, _) = broadcast::channel(256);
            runs.insert(
                r.run_id.clone(),
                Entry { run: run_of(&r), record: r, cancel: Arc::new(AtomicBool::new(false)), events },
            );
        }
        registry.append(&interrupted).await?;
        let slots = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                runs: Mutex::new(runs),
                slots,
                registry,
                registry_lock: tokio::sync::Mutex::new(()),
                stopping: watch::channel(false).0,
                active: watch::channel(0).0,
            }),
        })
    }

    /// True once [`Trainer::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        *self.inner.stopping.borrow()
    }

    /// Stops the service's work for a shutdown: refuses new runs, ends open `WatchRun` streams
    /// with `UNAVAILABLE`, keeps queued runs from starting (they stay pending, and are reported
    /// failed after a restart), and has running runs write a checkpoint and stop; they are
    /// recorded failed with [`INTERRUPTED`]. Returns once every started run has been recorded.
    pub async fn stop(&self) {
        self.inner.stopping.send_replace(true);
        for e in self.inner.runs.lock().expect("runs lock").values() {
            if !is_terminal(e.run.state) {
                e.cancel.store(true, Ordering::SeqCst);
            }
        }
        let mut active = self.inner.active.subscribe();
        let _ = active.wait_for(|n| *n == 0).await;
    }

    /// The tonic service.
    pub fn into_service(self) -> TrainerServiceServer<Self> {
        TrainerServiceServer::new(self)
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(self.into_service())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| Error::Data(format!("trainer service: {e}")))
    }

    /// Binds `addr` (port 0 picks one) and serves in a background task; returns the bound address.
    pub async fn spawn(self, addr: SocketAddr) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<()>>)> {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::io(addr.to_string(), e))?;
        let bound = listener.local_addr().map_err(|e| Error::io(addr.to_string(), e))?;
        let h = tokio::spawn(self.serve(listener, std::future::pending()));
        Ok((bound, h))
    }

    /// Records `record` in the registry.
    async fn persist(&self, record: RunRecord) {
        let _g = self.inner.registry_lock.lock().await;
        if let Err(e) = self.inner.registry.append(&[record]).await {
            tracing::error!(error = %e, "cannot write the run registry");
        }
    }

    /// Applies `f` to a run and broadcasts an event of `kind`; returns the updated record.
    fn update(
        &self,
        id: &str,
        kind: v1::RunEventKind,
        detail: &str,
        step_metrics: Vec<v1::Metric>,
        f: impl FnOnce(&mut Entry),
    ) -> Option<RunRecord> {
        let mut runs = self.inner.runs.lock().expect("runs lock");
        let e = runs.get_mut(id)?;
        f(e);
        let now = now_ms();
        e.run.updated_at_ms = now;
        e.record.updated_at_ms = now;
        e.record.state = state_name(v1::RunState::try_from(e.run.state).unwrap_or_default()).into();
        e.record.step = e.run.step;
        e.record.total_steps = e.run.total_steps;
        e.record.error = e.run.error.clone();
        let ev = v1::RunEvent {
            kind: kind as i32,
            run: Some(e.run.clone()),
            step: e.run.step,
            epoch: e.run.epoch,
            metrics: step_metrics,
            detail: detail.to_string(),
        };
        // No receivers is fine: nobody is watching.
        let _ = e.events.send(ev);
        Some(e.record.clone())
    }

    fn set_state(&self, id: &str, state: v1::RunState, error: &str) -> Option<RunRecord> {
        self.update(id, v1::RunEventKind::StateChanged, state_name(state), vec![], |e| {
            e.run.state = state as i32;
            e.run.error = error.to_string();
        })
    }

    /// Validates and queues a run; returns it as submitted.
    pub async fn submit(&self, config_toml: &str, overrides: &[String]) -> Result<v1::Run> {
        let cfg = TrainConfig::from_toml_with_overrides(config_toml, overrides)?;
        if cfg.data.faces.is_none() {
            return Err(Error::config("data.faces", "no faces dataset given"));
        }
        let id = RunId::new().to_string();
        let run_dir = self.inner.cfg.state_dir.join("runs").join(&id);
        let now = now_ms();
        let record = RunRecord {
            run_id: id.clone(),
            state: "pending".into(),
            config_toml: cfg.to_toml(),
            run_dir: run_dir.display().to_string(),
            faces: cfg.data.faces.clone(),
            cache: cfg.data.cache.clone(),
            cache_version: None,
            teacher: cfg.data.teacher.clone(),
            step: 0,
            total_steps: cfg.optim.steps.unwrap_or(0),
            metrics_json: "{}".into(),
            error: String::new(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let run = run_of(&record);
        let cancel = Arc::new(AtomicBool::new(false));
        let (events, _) = broadcast::channel(256);
        self.inner.runs.lock().expect("runs lock").insert(
            id.clone(),
            Entry { run: run.clone(), record: record.clone(), cancel: cancel.clone(), events },
        );
        self.persist(record).await;
        let me = self.clone();
        tokio::spawn(async move { me.execute(id, cfg, run_dir, cancel).await });
        Ok(run)
    }

    async fn execute(self, id: String, cfg: TrainConfig, run_dir: PathBuf, cancel: Arc<AtomicBool>) {
        let Ok(_permit) = self.inner.slots.clone().acquire_owned().await else { return };
        // Counted before the check, so that `stop` either waits for this run or keeps it from starting.
        let _active = Active::start(&self.inner.active);
        if cancel.load(Ordering::SeqCst) || self.is_stopping() {
            return;
        }
        self.set_state(&id, v1::RunState::Running, "");
        let mut opts = RunOptions::new(&run_dir);
        opts.device = self.inner.cfg.device.clone();
        opts.plots = self.inner.cfg.plots;
        opts.cancel = Some(cancel.clone());
        let every = cfg.log.every_n_steps.max(1);
        let me = self.clone();
        let rid = id.clone();
        opts.progress = Some(Box::new(move |p: &Progress| {
            let report = p.step.is_multiple_of(every) || p.step == p.total_steps;
            let metrics = step_metrics(p);
            let kind = if report { v1::RunEventKind::Metrics } else { v1::RunEventKind::Unspecified };
            let apply = |e: &mut Entry| {
                e.run.step = p.step;
                e.run.total_steps = p.total_steps;
                e.run.epoch = p.epoch as u32;
                e.run.latest_metrics = metrics.clone();
            };
            if report {
                me.update(&rid, kind, "", metrics.clone(), apply);
            } else {
                // Keep the snapshot current without waking watchers on every step.
                let mut runs = me.inner.runs.lock().expect("runs lock");
                if let Some(e) = runs.get_mut(&rid) {
                    apply(e);
                }
            }
        }));
        let result = run(&cfg, opts).await;
        let record = match result {
            Ok(report) => {
                let m = final_metrics(&report);
                let json = serde_json::to_string(&m).expect("metrics serialise");
                self.update(&id, v1::RunEventKind::StateChanged, "completed", vec![], |e| {
                    e.run.state = v1::RunState::Completed as i32;
                    e.run.latest_metrics = metrics_of(&json);
                    e.record.metrics_json = json.clone();
                    e.record.cache_version = report.cache_version;
                    e.record.teacher = report.teacher.clone();
                })
            }
            Err(Error::Cancelled) => {
                let reason = self.inner.runs.lock().expect("runs lock").get(&id).map(|e| e.run.error.clone());
                let reason = reason.unwrap_or_default();
                if reason.is_empty() && self.is_stopping() {
                    // Stopped by a shutdown, not by a client: resumable, like after a crash.
                    self.set_state(&id, v1::RunState::Failed, INTERRUPTED)
                } else {
                    self.set_state(&id, v1::RunState::Cancelled, &reason)
                }
            }
            Err(e) => {
                tracing::warn!(run = %id, error = %e, "run failed");
                self.set_state(&id, v1::RunState::Failed, &e.to_string())
            }
        };
        if let Some(r) = record {
            self.persist(r).await;
        }
    }

    fn get(&self, id: &str) -> std::result::Result<v1::Run, Status> {
        self.inner
            .runs
            .lock()
            .expect("runs lock")
            .get(id)
            .map(|e| e.run.clone())
            .ok_or_else(|| Status::not_found(format!("no run `{id}`")))
    }
}

fn status_of(e: Error) -> Status {
    match e {
        Error::Config { .. } | Error::Core(_) => Status::invalid_argument(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = std::result::Result<v1::RunEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TrainerService for Trainer {
    async fn submit_run(
        &self,
        req: Request<v1::SubmitRunRequest>,
    ) -> std::result::Result<Response<v1::Run>, Status> {
        if self.is_stopping() {
            return Err(Status::unavailable("the trainer is shutting down"));
        }
        let r = req.into_inner();
        self.submit(&r.config_toml, &r.overrides).await.map(Response::new).map_err(status_of)
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        req: Request<v1::WatchRunRequest>,
    ) -> std::result::Result<Response<Self::WatchRunStream>, Status> {
        let id = req.into_inner().run_id;
        // Subscribe before taking the snapshot so no event between the two is lost.
        let (mut rx, snapshot) = {
            let runs = self.inner.runs.lock().expect("runs lock");
            let e = runs.get(&id).ok_or_else(|| Status::not_found(format!("no run `{id}`")))?;
            (e.events.subscribe(), e.run.clone())
        };
        let done = is_terminal(snapshot.state);
        let mut stopping = self.inner.stopping.subscribe();
        let stream = async_stream(move |tx| async move {
            let first = v1::RunEvent {
                kind: v1::RunEventKind::Snapshot as i32,
                step: snapshot.step,
                epoch: snapshot.epoch,
                run: Some(snapshot),
                metrics: vec![],
                detail: String::new(),
            };
            if tx.send(Ok(first)).await.is_err() || done {
                return;
            }
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    () = async { let _ = stopping.wait_for(|s| *s).await; } => {
                        let _ = tx.send(Err(Status::unavailable("the trainer is shutting down"))).await;
                        return;
                    }
                };
                match next {
                    Ok(ev) => {
                        let end = ev.run.as_ref().is_some_and(|r| is_terminal(r.state));
                        if tx.send(Ok(ev)).await.is_err() || end {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "a watcher fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_run(
        &self,
        req: Request<v1::GetRunRequest>,
    ) -> std::result::Result<Response<v1::Run>, Status> {
        self.get(&req.into_inner().run_id).map(Response::new)
    }

    async fn list_runs(
        &self,
        req: Request<v1::ListRunsRequest>,
    ) -> std::result::Result<Response<v1::ListRunsResponse>, Status> {
        let r = req.into_inner();
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        let mut runs: Vec<v1::Run> = self
            .inner
            .runs
            .lock()
            .expect("runs lock")
            .values()
            .map(|e| e.run.clone())
            .filter(|run| r.states.is_empty() || r.states.contains(&run.state))
            .collect();
        runs.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(b.run_id.cmp(&a.run_id)));
        runs.truncate(limit);
        Ok(Response::new(v1::ListRunsResponse { runs }))
    }

    async fn cancel_run(
        &self,
        req: Request<v1::CancelRunRequest>,
    ) -> std::result::Result<Response<v1::Run>, Status> {
        let r = req.into_inner();
        let (pending, cancel) = {
            let runs = self.inner.runs.lock().expect("runs lock");
            let e = runs.get(&r.run_id).ok_or_else(|| Status::not_found(format!("no run `{}`", r.run_id)))?;
            if is_terminal(e.run.state) {
                return Err(Status::failed_precondition(format!("run `{}` has already ended", r.run_id)));
            }
            (e.run.state == v1::RunState::Pending as i32, e.cancel.clone())
        };
        let reason = if r.reason.is_empty() { "cancelled by a client".to_string() } else { r.reason };
        cancel.store(true, Ordering::Relaxed);
        if pending {
            // Never started: it ends here. (A running one ends when the loop sees the flag.)
            if let Some(rec) = self.set_state(&r.run_id, v1::RunState::Cancelled, &reason) {
                self.persist(rec).await;
            }
        } else {
            let mut runs = self.inner.runs.lock().expect("runs lock");
            if let Some(e) = runs.get_mut(&r.run_id) {
                e.run.error = reason;
            }
        }
        self.get(&r.run_id).map(Response::new)
    }
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<std::result::Result<v1::RunEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
