//! The tonic adapter: decodes requests into domain calls on [`Coordinator`] and maps
//! [`CoordError`] to status codes (malformed request → INVALID_ARGUMENT naming the field, unknown
//! job → NOT_FOUND, stale worker session → FAILED_PRECONDITION, storage trouble → UNAVAILABLE).

use std::pin::Pin;
use std::time::Duration;

use distillery_proto::convert::optional_fingerprint;
use distillery_proto::v1;
use distillery_proto::v1::coordinator_service_server::CoordinatorService;
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tonic::{Request, Response, Status};

use crate::coordinator::Coordinator;
use crate::error::CoordError;
use crate::model::{self, JobEventKind};

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Self {
        match &e {
            CoordError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            CoordError::NotFound { .. } => Status::not_found(e.to_string()),
            CoordError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            CoordError::Unavailable(_) => Status::unavailable(e.to_string()),
            CoordError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

/// The gRPC face of a [`Coordinator`].
#[derive(Clone, Debug)]
pub struct CoordinatorGrpc {
    core: Coordinator,
    /// Turns true when the server begins to shut down; open `WatchJob` streams then end.
    closing: Option<watch::Receiver<bool>>,
    /// Least time between two progress events of one `WatchJob` stream.
    progress_every: Duration,
}

impl CoordinatorGrpc {
    pub fn new(core: Coordinator) -> Self {
        Self { core, closing: None, progress_every: crate::config::default_watch_progress_interval() }
    }

    /// Sends a `WatchJob` stream's progress events at most once per `every` (the latest of
    /// those in between); other events go out at once and carry the latest counts themselves.
    pub fn progress_every(mut self, every: Duration) -> Self {
        self.progress_every = every;
        self
    }

    /// Ends every open `WatchJob` stream with `UNAVAILABLE` once `closing` turns true, so a
    /// graceful shutdown does not wait for jobs to finish and clients know to watch again.
    pub fn closing_on(mut self, closing: watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }
}

/// Resolves once `closing` turns true (never without a receiver, or if its sender is gone first).
async fn closed(closing: Option<watch::Receiver<bool>>) {
    match closing {
        Some(mut rx) => {
            if rx.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

// ----- conversions ------------------------------------------------------------------------------

/// Decodes and checks a job spec; errors name the field under `spec.`.
pub fn job_spec_from_proto(spec: Option<v1::LabelJobSpec>) -> Result<model::JobSpec, CoordError> {
    let spec = spec.ok_or_else(|| CoordError::invalid("spec", "is required"))?;
    let teacher = spec.teacher.ok_or_else(|| CoordError::invalid("spec.teacher", "is required"))?;
    teacher.validate("spec.teacher")?;
    let kind = match v1::TeacherKind::try_from(teacher.kind) {
        Ok(v1::TeacherKind::Emonet8) => model::TeacherKind::Emonet8,
        Ok(v1::TeacherKind::Emonet5) => model::TeacherKind::Emonet5,
        Ok(v1::TeacherKind::Onnx) => model::TeacherKind::Onnx,
        Ok(v1::TeacherKind::Student) => model::TeacherKind::Student,
        _ => return Err(CoordError::invalid("spec.teacher.kind", "is required")),
    };
    let fingerprint = optional_fingerprint("spec.teacher.fingerprint", &teacher.fingerprint)?;
    for k in spec.storage_options.keys() {
        if k.trim().is_empty() {
            return Err(CoordError::invalid("spec.storage_options", "has an empty key"));
        }
    }
    Ok(model::JobSpec {
        faces_uri: spec.faces_uri.trim().to_string(),
        cache_uri: spec.cache_uri.trim().to_string(),
        teacher: model::TeacherSpec {
            kind,
            config_path: teacher.config_path,
            weights_path: teacher.weights_path,
            fingerprint,
        },
        views: spec.views,
        shard_size: spec.shard_size,
        priority: spec.priority,
        storage_options: spec.storage_options.into_iter().collect(),
        view_seed: spec.view_seed,
    })
}

fn teacher_to_proto(t: &model::TeacherSpec) -> v1::TeacherSpec {
    let kind = match t.kind {
        model::TeacherKind::Emonet8 => v1::TeacherKind::Emonet8,
        model::TeacherKind::Emonet5 => v1::TeacherKind::Emonet5,
        model::TeacherKind::Onnx => v1::TeacherKind::Onnx,
        model::TeacherKind::Student => v1::TeacherKind::Student,
    };
    v1::TeacherSpec {
        kind: kind as i32,
        config_path: t.config_path.clone(),
        weights_path: t.weights_path.clone(),
        fingerprint: t.fingerprint.as_ref().map(|f| f.to_string()).unwrap_or_default(),
    }
}

/// The spec as reported to clients: storage option values are blanked (they may be credentials).
fn spec_to_proto(s: &model::JobSpec, reveal_options: bool) -> v1::LabelJobSpec {
    v1::LabelJobSpec {
        faces_uri: s.faces_uri.clone(),
        cache_uri: s.cache_uri.clone(),
        teacher: Some(teacher_to_proto(&s.teacher)),
        views: s.views,
        shard_size: s.shard_size,
        priority: s.priority,
        storage_options: s
            .storage_options
            .iter()
            .map(|(k, v)| (k.clone(), if reveal_options { v.clone() } else { String::new() }))
            .collect(),
        view_seed: s.view_seed,
    }
}

fn range_to_proto(r: &model::ShardRange) -> v1::ShardRange {
    v1::ShardRange { fragment_id: r.fragment_id, offset: r.offset, len: r.len }
}

pub fn job_state_to_proto(s: model::JobState) -> v1::JobState {
    match s {
        model::JobState::Pending => v1::JobState::Pending,
        model::JobState::Running => v1::JobState::Running,
        model::JobState::Completed => v1::JobState::Completed,
        model::JobState::CompletedWithPoisoned => v1::JobState::CompletedWithPoisoned,
        model::JobState::Failed => v1::JobState::Failed,
        model::JobState::Cancelled => v1::JobState::Cancelled,
    }
}

fn job_state_from_proto(field: &str, s: i32) -> Result<model::JobState, CoordError> {
    Ok(match v1::JobState::try_from(s) {
        Ok(v1::JobState::Pending) => model::JobState::Pending,
        Ok(v1::JobState::Running) => model::JobState::Running,
        Ok(v1::JobState::Completed) => model::JobState::Completed,
        Ok(v1::JobState::CompletedWithPoisoned) => model::JobState::CompletedWithPoisoned,
        Ok(v1::JobState::Failed) => model::JobState::Failed,
        Ok(v1::JobState::Cancelled) => model::JobState::Cancelled,
        _ => return Err(CoordError::invalid(field, format!("{s} is not a job state"))),
    })
}

pub fn shard_state_to_proto(s: model::ShardState) -> v1::ShardState {
    match s {
        model::ShardState::Pending => v1::ShardState::Pending,
        model::ShardState::Leased => v1::ShardState::Leased,
        model::ShardState::Committed => v1::ShardState::Committed,
        model::ShardState::Skipped => v1::ShardState::Skipped,
        model::ShardState::Poisoned => v1::ShardState::Poisoned,
        model::ShardState::Cancelled => v1::ShardState::Cancelled,
    }
}

/// A job view on the wire.
pub fn job_to_proto(j: &model::JobView) -> v1::Job {
    let c = &j.shards;
    v1::Job {
        job_id: j.id.clone(),
        spec: Some(spec_to_proto(&j.spec, false)),
        state: job_state_to_proto(j.state) as i32,
        job_fingerprint: j.job_fingerprint.clone(),
        teacher_fingerprint: j.teacher_fingerprint.as_ref().map(|f| f.to_string()).unwrap_or_default(),
        shards: Some(v1::ShardCounts {
            pending: c.pending,
            leased: c.leased,
            committed: c.committed,
            skipped: c.skipped,
            poisoned: c.poisoned,
            cancelled: c.cancelled,
            total: c.total,
        }),
        images_total: j.images_total,
        images_done: j.images_done,
        images_skipped: j.images_skipped,
        rows_written: j.rows_written,
        images_per_second: j.images_per_second,
        created_at_ms: j.created_at_ms,
        updated_at_ms: j.updated_at_ms,
        error: j.error.clone().unwrap_or_default(),
        poisoned: j
            .poisoned
            .iter()
            .map(|p| v1::PoisonedShard {
                shard_id: p.shard_id,
                range: Some(range_to_proto(&p.range)),
                attempts: p.attempts,
                last_error: p.last_error.clone(),
            })
            .collect(),
    }
}

fn event_to_proto(e: &model::JobEvent) -> v1::JobEvent {
    let (kind, previous) = match e.kind {
        JobEventKind::Snapshot => (v1::JobEventKind::Snapshot, v1::JobState::Unspecified),
        JobEventKind::Progress => (v1::JobEventKind::Progress, v1::JobState::Unspecified),
        JobEventKind::StateChanged { previous } => {
            (v1::JobEventKind::StateChanged, job_state_to_proto(previous))
        }
        JobEventKind::ShardPoisoned => (v1::JobEventKind::ShardPoisoned, v1::JobState::Unspecified),
    };
    v1::JobEvent {
        kind: kind as i32,
        job: Some(job_to_proto(&e.job)),
        previous_state: previous as i32,
        detail: e.detail.clone(),
    }
}

fn lease_to_proto(l: &model::Lease) -> v1::ShardLease {
    v1::ShardLease {
        lease_id: l.lease_id.clone(),
        job_id: l.job_id.clone(),
        shard_id: l.shard_id,
        shard_key: l.shard_key.clone(),
        range: Some(range_to_proto(&l.range)),
        faces_uri: l.spec.faces_uri.clone(),
        cache_uri: l.spec.cache_uri.clone(),
        teacher: Some(teacher_to_proto(&l.spec.teacher)),
        teacher_fingerprint: l.teacher_fingerprint.as_ref().map(|f| f.to_string()).unwrap_or_default(),
        views: l.spec.views,
        storage_options: l.spec.storage_options.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        deadline_unix_ms: l.deadline_ms,
        attempt: l.attempt,
        view_seed: l.spec.view_seed,
    }
}

fn required(field: &str, v: &str) -> Result<(), CoordError> {
    if v.trim().is_empty() { Err(CoordError::invalid(field, "is required")) } else { Ok(()) }
}

// ----- the service ------------------------------------------------------------------------------

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::JobEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl CoordinatorService for CoordinatorGrpc {
    async fn submit_label_job(
        &self,
        req: Request<v1::SubmitLabelJobRequest>,
    ) -> Result<Response<v1::SubmitLabelJobResponse>, Status> {
        let spec = job_spec_from_proto(req.into_inner().spec)?;
        let (job, already_active) = self.core.submit_job(spec).await?;
        Ok(Response::new(v1::SubmitLabelJobResponse { job: Some(job_to_proto(&job)), already_active }))
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        let id = req.into_inner().job_id;
        required("job_id", &id)?;
        Ok(Response::new(job_to_proto(&self.core.get_job(&id)?)))
    }

    async fn list_jobs(
        &self,
        req: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let r = req.into_inner();
        let states = r
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| job_state_from_proto(&format!("states[{i}]"), *s))
            .collect::<Result<Vec<_>, _>>()?;
        let jobs = self.core.list_jobs(&states, r.limit as usize);
        Ok(Response::new(v1::ListJobsResponse { jobs: jobs.iter().map(job_to_proto).collect() }))
    }

    async fn cancel_job(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::Job>, Status> {
        let r = req.into_inner();
        required("job_id", &r.job_id)?;
        Ok(Response::new(job_to_proto(&self.core.cancel_job(&r.job_id, &r.reason)?)))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = req.into_inner().job_id;
        required("job_id", &id)?;
        let (snapshot, mut rx) = self.core.watch_job(&id)?;
        let core = self.core.clone();
        let closing = self.closing.clone();
        let every = self.progress_every;
        let stream = async_stream(move |tx| async move {
            let done = snapshot.job.state.is_terminal();
            if tx.send(Ok(event_to_proto(&snapshot))).await.is_err() || done {
                return;
            }
            let closed = closed(closing);
            tokio::pin!(closed);
            // Progress waiting for its turn (only the latest is kept) and when that turn comes.
            let mut held: Option<model::JobEvent> = None;
            let mut next_progress = Instant::now();
            loop {
                let next = tokio::select! {
                    next = rx.recv() => Some(next),
                    () = sleep_until(next_progress), if held.is_some() => None,
                    () = &mut closed => {
                        let _ = tx
                            .send(Err(Status::unavailable("the coordinator is shutting down; watch the job again")))
                            .await;
                        return;
                    }
                };
                let ev = match next {
                    None => held.take().expect("a held event is due"),
                    Some(Ok(ev)) if ev.job.id == id => ev,
                    Some(Ok(_)) => continue,
                    Some(Err(RecvError::Lagged(_))) => match core.get_job(&id) {
                        // Missed events: a fresh snapshot says where the job is now.
                        Ok(job) => {
                            model::JobEvent { kind: JobEventKind::Progress, job, detail: String::new() }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    },
                    Some(Err(RecvError::Closed)) => return,
                };
                // Plain progress (heartbeats, lease grants) waits for its turn; progress with a
                // detail (a shard committed, or back to pending after a failure) does not.
                if ev.kind == JobEventKind::Progress && ev.detail.is_empty() {
                    if Instant::now() < next_progress {
                        held = Some(ev);
                        continue;
                    }
                    next_progress = Instant::now() + every;
                } else {
                    // Newer than any held progress, and carrying the same counts.
                    held = None;
                }
                let terminal = ev.job.state.is_terminal();
                if tx.send(Ok(event_to_proto(&ev))).await.is_err() || terminal {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn register_worker(
        &self,
        req: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerResponse>, Status> {
        let r = req.into_inner();
        let info = model::WorkerInfo {
            teacher_fingerprint: optional_fingerprint("teacher_fingerprint", &r.teacher_fingerprint)
                .map_err(CoordError::from)?,
            worker_id: r.worker_id,
            address: r.address,
            teacher_name: r.teacher_name,
            device: r.device,
            max_batch: r.max_batch,
        };
        let reg = self.core.register_worker(info)?;
        Ok(Response::new(v1::RegisterWorkerResponse {
            session: reg.session,
            lease_ttl_ms: reg.lease_ttl_ms,
            heartbeat_interval_ms: reg.heartbeat_interval_ms,
            max_attempts: reg.max_attempts,
        }))
    }

    async fn lease_shard(
        &self,
        req: Request<v1::LeaseShardRequest>,
    ) -> Result<Response<v1::LeaseShardResponse>, Status> {
        let r = req.into_inner();
        required("worker_id", &r.worker_id)?;
        required("session", &r.session)?;
        let outcome = match self.core.lease_shard(&r.worker_id, &r.session)? {
            model::LeaseOutcome::Granted(l) => v1::lease_shard_response::Outcome::Lease(lease_to_proto(&l)),
            model::LeaseOutcome::NoWork { retry_after_ms, reason } => {
                v1::lease_shard_response::Outcome::NoWork(v1::NoWork { retry_after_ms, reason })
            }
        };
        Ok(Response::new(v1::LeaseShardResponse { outcome: Some(outcome) }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        required("worker_id", &r.worker_id)?;
        required("session", &r.session)?;
        for (i, l) in r.leases.iter().enumerate() {
            required(&format!("leases[{i}].lease_id"), &l.lease_id)?;
        }
        let leases: Vec<(String, u64)> =
            r.leases.iter().map(|l| (l.lease_id.clone(), l.images_done)).collect();
        let statuses = self.core.heartbeat(&r.worker_id, &r.session, &leases)?;
        let leases = leases
            .into_iter()
            .zip(statuses)
            .map(|((lease_id, _), s)| {
                let (status, deadline) = match s {
                    model::LeaseStatus::Active { deadline_ms } => (v1::LeaseStatus::Active, deadline_ms),
                    model::LeaseStatus::Revoked => (v1::LeaseStatus::Revoked, 0),
                    model::LeaseStatus::Cancelled => (v1::LeaseStatus::Cancelled, 0),
                    model::LeaseStatus::Unknown => (v1::LeaseStatus::Unknown, 0),
                };
                v1::LeaseHeartbeat { lease_id, status: status as i32, deadline_unix_ms: deadline }
            })
            .collect();
        Ok(Response::new(v1::HeartbeatResponse { leases }))
    }

    async fn complete_shard(
        &self,
        req: Request<v1::CompleteShardRequest>,
    ) -> Result<Response<v1::CompleteShardResponse>, Status> {
        let r = req.into_inner();
        required("worker_id", &r.worker_id)?;
        required("lease_id", &r.lease_id)?;
        let c = self
            .core
            .complete_shard(&r.worker_id, &r.lease_id, &r.staged_fragments, r.rows_written, r.skipped)
            .await?;
        let resp = match c {
            model::Completion::Committed { version } => v1::CompleteShardResponse {
                outcome: v1::CompletionOutcome::Committed as i32,
                cache_version: version,
                detail: String::new(),
            },
            model::Completion::AlreadyCommitted => v1::CompleteShardResponse {
                outcome: v1::CompletionOutcome::AlreadyCommitted as i32,
                cache_version: 0,
                detail: "shard was committed before".into(),
            },
            model::Completion::Rejected { reason } => v1::CompleteShardResponse {
                outcome: v1::CompletionOutcome::Rejected as i32,
                cache_version: 0,
                detail: reason,
            },
        };
        Ok(Response::new(resp))
    }

    async fn fail_shard(
        &self,
        req: Request<v1::FailShardRequest>,
    ) -> Result<Response<v1::FailShardResponse>, Status> {
        let r = req.into_inner();
        required("worker_id", &r.worker_id)?;
        required("lease_id", &r.lease_id)?;
        let out = self.core.fail_shard(&r.worker_id, &r.lease_id, &r.error, r.retryable)?;
        Ok(Response::new(v1::FailShardResponse {
            shard_state: shard_state_to_proto(out.shard_state) as i32,
            attempts: out.attempts,
        }))
    }
}

/// A stream fed by a task through a small channel: the task stops when the client goes away.
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<v1::JobEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
