//! The coordinator's domain logic: jobs split into shards, shards leased to workers with
//! deadlines, outputs committed exactly once. Knows nothing of gRPC; [`crate::grpc`] adapts it.
//!
//! # Shard life cycle
//!
//! `pending → leased → committed`, with `leased → pending` when a lease lapses, the worker
//! reports a retryable failure, or the worker re-registers (a restart) while holding it. Each of
//! those counts as a failure; after `max_attempts` failures (or one non-retryable failure) the
//! shard is `poisoned` and the job goes on without it. A shard whose every (face, view) is already
//! in the cache for the job's teacher is `skipped` without being leased, and a shard whose key the
//! cache (or this coordinator's store) already lists as committed is `committed` at once.
//!
//! # Job outcome policy
//!
//! When no shard is pending or leased any more, the job ends `completed` if nothing was poisoned,
//! `completed_with_poisoned` if some shards were poisoned but at least one was committed or
//! skipped, and `failed` if every shard was poisoned.
//!
//! # Exactly once
//!
//! Only the coordinator commits. A completion is accepted only for a live lease held by the
//! calling worker whose deadline has not passed; while its commit runs, the lease is marked
//! `committing` so neither the reaper nor a duplicate completion can act on it. The cache refuses a
//! second commit under the same shard key, and the committed key is stored durably with the shard
//! state in one transaction. On restart, leased shards return to pending and every pending shard
//! whose key the cache lists as committed is marked committed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use distillery_core::TeacherFingerprint;
use tokio::sync::broadcast;

use crate::backend::{BackendError, CacheCommitter, CommitOutcome, ShardPlanner};
use crate::clock::Clock;
use crate::error::{CoordError, Result};
use crate::metrics::Metrics;
use crate::model::*;
use crate::store::Store;

/// Window over which `images_per_second` is measured.
const RATE_WINDOW_MS: i64 = 60_000;
/// Retry delay suggested to a worker when there is no work.
const NO_WORK_RETRY_MS: u64 = 1_000;

/// Settings of the domain layer.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    /// Directory of the durable state (`coordinator.redb`).
    pub state_dir: PathBuf,
    /// A lease lapses this long after its grant or last heartbeat.
    pub lease_ttl: Duration,
    /// Failures after which a shard is poisoned (≥ 1).
    pub max_attempts: u32,
}

/// Why a lease ended; kept so late heartbeats and completions get a precise answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Completed,
    Expired,
    Revoked,
    Cancelled,
    Failed,
}

#[derive(Debug)]
struct LeaseEntry {
    job_id: String,
    shard_id: u64,
    worker_id: String,
    deadline_ms: i64,
    images_done: u64,
    /// A completion's commit is in flight: the reaper and other completions leave it alone.
    committing: bool,
}

#[derive(Debug)]
struct JobEntry {
    rec: JobRecord,
    shards: Vec<Shard>,
    pending: BTreeSet<u64>,
    /// shard id → lease id, for leased shards.
    active: HashMap<u64, String>,
    /// (time, faces) of recent commits, for the rate.
    recent: VecDeque<(i64, u64)>,
    /// Old lease ids of this job and how they ended.
    ended: HashMap<String, (u64, Ended)>,
}

#[derive(Debug)]
struct WorkerEntry {
    info: WorkerInfo,
    session: String,
    last_seen_ms: i64,
}

#[derive(Debug, Default)]
struct State {
    jobs: HashMap<String, JobEntry>,
    leases: HashMap<String, LeaseEntry>,
    /// lease id → job id for ended leases (the details are on the job).
    ended_index: HashMap<String, String>,
    workers: HashMap<String, WorkerEntry>,
    next_seq: u64,
}

struct Inner {
    opts: CoordinatorOptions,
    store: Store,
    planner: Arc<dyn ShardPlanner>,
    cache: Arc<dyn CacheCommitter>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    events: broadcast::Sender<JobEvent>,
    state: Mutex<State>,
}

/// The coordinator. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").field("state_dir", &self.inner.opts.state_dir).finish_non_exhaustive()
    }
}

fn unavailable(e: BackendError) -> CoordError {
    CoordError::Unavailable(e.to_string())
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn check_worker_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 {
        return Err(CoordError::invalid("worker_id", "must be 1..=128 characters"));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))) {
        return Err(CoordError::invalid(
            "worker_id",
            format!("character {c:?} is not one of [A-Za-z0-9._:-]"),
        ));
    }
    Ok(())
}

impl Coordinator {
    /// Opens the state directory, resumes its jobs (leased shards go back to pending) and
    /// cross-checks the caches of active jobs for shards committed before a crash.
    pub async fn open(
        opts: CoordinatorOptions,
        planner: Arc<dyn ShardPlanner>,
        cache: Arc<dyn CacheCommitter>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        if opts.max_attempts == 0 {
            return Err(CoordError::invalid("max_attempts", "must be at least 1"));
        }
        if opts.lease_ttl < Duration::from_millis(10) {
            return Err(CoordError::invalid("lease_ttl", "must be at least 10ms"));
        }
        let store = Store::open(&opts.state_dir)?;
        let loaded = store.load()?;
        let mut state = State::default();
        for (mut rec, mut shards) in loaded.jobs {
            state.next_seq = state.next_seq.max(rec.seq + 1);
            let mut reverted = Vec::new();
            for s in shards.iter_mut() {
                if s.state == ShardState::Leased {
                    s.state = ShardState::Pending;
                    reverted.push(s.clone());
                }
                // A commit recorded in the committed table but not on the shard cannot happen
                // (same transaction); the converse is checked against the cache below.
                if s.state == ShardState::Pending
                    && loaded.committed.contains_key(&s.key)
                    && !rec.state.is_terminal()
                {
                    s.state = ShardState::Committed;
                    s.commit_version = loaded.committed.get(&s.key).copied();
                    reverted.push(s.clone());
                }
            }
            if !reverted.is_empty() {
                store.put_shards(&rec.id, &reverted.iter().collect::<Vec<_>>())?;
            }
            let pending = if rec.state.is_terminal() {
                BTreeSet::new()
            } else {
                shards.iter().filter(|s| s.state == ShardState::Pending).map(|s| s.id).collect()
            };
            if rec.state == JobState::Pending && shards.iter().any(|s| s.state != ShardState::Pending) {
                rec.state = JobState::Running;
            }
            state.jobs.insert(
                rec.id.clone(),
                JobEntry {
                    rec,
                    shards,
                    pending,
                    active: HashMap::new(),
                    recent: VecDeque::new(),
                    ended: HashMap::new(),
                },
            );
        }
        let (events, _) = broadcast::channel(1024);
        let c = Coordinator {
            inner: Arc::new(Inner {
                opts,
                store,
                planner,
                cache,
                clock,
                metrics,
                events,
                state: Mutex::new(state),
            }),
        };
        let active: Vec<String> = {
            let st = c.lock();
            st.jobs.values().filter(|j| !j.rec.state.is_terminal()).map(|j| j.rec.id.clone()).collect()
        };
        for id in active {
            if let Err(e) = c.reconcile_with_cache(&id).await {
                tracing::warn!(job = %id, error = %e, "could not cross-check the cache on resume; will rely on the cache refusing duplicate commits");
            }
            let mut st = c.lock();
            c.maybe_finish(&mut st, &id);
        }
        c.refresh_gauges();
        Ok(c)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    fn ttl_ms(&self) -> i64 {
        self.inner.opts.lease_ttl.as_millis() as i64
    }

    /// Metrics of this coordinator.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Lease TTL in force.
    pub fn lease_ttl(&self) -> Duration {
        self.inner.opts.lease_ttl
    }

    // ----- jobs -------------------------------------------------------------------------------

    /// Plans and registers a job; returns it and whether an identical active job was returned
    /// instead. Shards already committed in the cache are marked committed, and when the teacher
    /// fingerprint is known, shards fully present in the cache are skipped.
    pub async fn submit_job(&self, mut spec: JobSpec) -> Result<(JobView, bool)> {
        if spec.faces_uri.trim().is_empty() {
            return Err(CoordError::invalid("spec.faces_uri", "is required"));
        }
        if spec.cache_uri.trim().is_empty() {
            return Err(CoordError::invalid("spec.cache_uri", "is required"));
        }
        if spec.faces_uri == spec.cache_uri {
            return Err(CoordError::invalid("spec.cache_uri", "must differ from spec.faces_uri"));
        }
        if spec.shard_size == 0 {
            spec.shard_size = DEFAULT_SHARD_SIZE;
        }
        if spec.views > 1024 {
            return Err(CoordError::invalid("spec.views", format!("{} is more than 1024", spec.views)));
        }
        let fingerprint = spec.fingerprint();
        {
            let st = self.lock();
            if let Some(j) =
                st.jobs.values().find(|j| j.rec.job_fingerprint == fingerprint && !j.rec.state.is_terminal())
            {
                return Ok((self.view(j, &st.leases), true));
            }
        }
        let ranges = self.inner.planner.plan(&spec).await.map_err(|e| match e {
            BackendError::Open { .. } => CoordError::invalid("spec.faces_uri", e.to_string()),
            other => unavailable(other),
        })?;
        let committed = self.inner.cache.committed_shards(&spec).await.map_err(unavailable)?;
        let cached = match &spec.teacher.fingerprint {
            Some(fp) => self.inner.cache.cached_ranges(&spec, fp, &ranges).await.map_err(unavailable)?,
            None => vec![false; ranges.len()],
        };
        let now = self.now();
        let id = new_id();
        let mut shards = Vec::with_capacity(ranges.len());
        for (i, r) in ranges.iter().enumerate() {
            let key = shard_key(&fingerprint, r);
            let state = if committed.contains(&key) {
                ShardState::Committed
            } else if cached[i] {
                ShardState::Skipped
            } else {
                ShardState::Pending
            };
            shards.push(Shard {
                id: i as u64,
                range: *r,
                key,
                state,
                attempts: 0,
                failures: 0,
                last_error: None,
                rows_written: 0,
                faces_skipped: 0,
                commit_version: None,
            });
        }
        let mut st = self.lock();
        // Another identical submission may have raced us while we planned.
        if let Some(j) =
            st.jobs.values().find(|j| j.rec.job_fingerprint == fingerprint && !j.rec.state.is_terminal())
        {
            return Ok((self.view(j, &st.leases), true));
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let rec = JobRecord {
            id: id.clone(),
            teacher_fingerprint: spec.teacher.fingerprint.clone(),
            spec,
            state: JobState::Running,
            job_fingerprint: fingerprint,
            created_at_ms: now,
            updated_at_ms: now,
            error: None,
            seq,
        };
        self.inner.store.put_job(&rec, &shards)?;
        let pending = shards.iter().filter(|s| s.state == ShardState::Pending).map(|s| s.id).collect();
        st.jobs.insert(
            id.clone(),
            JobEntry {
                rec,
                shards,
                pending,
                active: HashMap::new(),
                recent: VecDeque::new(),
                ended: HashMap::new(),
            },
        );
        tracing::info!(job = %id, shards = ranges.len(), "job submitted");
        self.maybe_finish(&mut st, &id);
        let view = self.view(&st.jobs[&id], &st.leases);
        drop(st);
        self.refresh_gauges();
        Ok((view, false))
    }

    /// One job.
    pub fn get_job(&self, job_id: &str) -> Result<JobView> {
        let st = self.lock();
        let j = st
            .jobs
            .get(job_id)
            .ok_or_else(|| CoordError::NotFound { what: "job", id: job_id.to_string() })?;
        Ok(self.view(j, &st.leases))
    }

    /// Jobs in `states` (all when empty), newest first, at most `limit` (0: 100).
    pub fn list_jobs(&self, states: &[JobState], limit: usize) -> Vec<JobView> {
        let st = self.lock();
        let mut jobs: Vec<&JobEntry> =
            st.jobs.values().filter(|j| states.is_empty() || states.contains(&j.rec.state)).collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.rec.seq));
        let limit = if limit == 0 { 100 } else { limit };
        jobs.into_iter().take(limit).map(|j| self.view(j, &st.leases)).collect()
    }

    /// Cancels a job. Pending and leased shards become cancelled (their workers learn it at the
    /// next heartbeat); a commit already in flight finishes. A finished job is returned unchanged.
    pub fn cancel_job(&self, job_id: &str, reason: &str) -> Result<JobView> {
        let mut st = self.lock();
        let st = &mut *st;
        let j = st
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| CoordError::NotFound { what: "job", id: job_id.to_string() })?;
        if j.rec.state.is_terminal() {
            return Ok(self.view(j, &st.leases));
        }
        let previous = j.rec.state;
        let mut changed = Vec::new();
        for s in j.shards.iter_mut() {
            match s.state {
                ShardState::Pending => {
                    s.state = ShardState::Cancelled;
                    changed.push(s.id);
                }
                ShardState::Leased => {
                    let lease_id = j.active.get(&s.id).cloned();
                    let committing =
                        lease_id.as_ref().and_then(|l| st.leases.get(l)).is_some_and(|l| l.committing);
                    if committing {
                        continue;
                    }
                    if let Some(l) = lease_id {
                        st.leases.remove(&l);
                        j.active.remove(&s.id);
                        j.ended.insert(l.clone(), (s.id, Ended::Cancelled));
                        st.ended_index.insert(l, job_id.to_string());
                    }
                    s.state = ShardState::Cancelled;
                    changed.push(s.id);
                }
                _ => {}
            }
        }
        j.pending.clear();
        j.rec.state = JobState::Cancelled;
        j.rec.error = Some(if reason.is_empty() { "cancelled".to_string() } else { reason.to_string() });
        j.rec.updated_at_ms = self.now();
        let shards: Vec<&Shard> = changed.iter().map(|&i| &j.shards[i as usize]).collect();
        self.inner.store.put_job(&j.rec, &[])?;
        self.inner.store.put_shards(job_id, &shards)?;
        tracing::info!(job = %job_id, reason, "job cancelled");
        let view = self.view(j, &st.leases);
        self.emit(JobEvent {
            kind: JobEventKind::StateChanged { previous },
            job: view.clone(),
            detail: reason.into(),
        });
        self.refresh_gauges_locked(st);
        Ok(view)
    }

    /// Subscribes to job events; the first item is a snapshot of the job.
    pub fn watch_job(&self, job_id: &str) -> Result<(JobEvent, broadcast::Receiver<JobEvent>)> {
        let rx = self.inner.events.subscribe();
        let view = self.get_job(job_id)?;
        Ok((JobEvent { kind: JobEventKind::Snapshot, job: view, detail: String::new() }, rx))
    }

    /// Re-reads which shards of a job the cache already holds: committed keys become committed,
    /// and with a known teacher fingerprint, fully cached pending shards become skipped.
    pub async fn reconcile_with_cache(&self, job_id: &str) -> Result<()> {
        let (spec, fp, pending) = {
            let st = self.lock();
            let j = st
                .jobs
                .get(job_id)
                .ok_or_else(|| CoordError::NotFound { what: "job", id: job_id.to_string() })?;
            let pending: Vec<(u64, ShardRange, String)> = j
                .pending
                .iter()
                .map(|&i| (i, j.shards[i as usize].range, j.shards[i as usize].key.clone()))
                .collect();
            (j.rec.spec.clone(), j.rec.teacher_fingerprint.clone(), pending)
        };
        if pending.is_empty() {
            return Ok(());
        }
        let committed = self.inner.cache.committed_shards(&spec).await.map_err(unavailable)?;
        let ranges: Vec<ShardRange> = pending.iter().map(|p| p.1).collect();
        let cached = match &fp {
            Some(fp) => self.inner.cache.cached_ranges(&spec, fp, &ranges).await.map_err(unavailable)?,
            None => vec![false; ranges.len()],
        };
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(j) = st.jobs.get_mut(job_id) else { return Ok(()) };
        let mut changed = Vec::new();
        for (k, (id, _, key)) in pending.iter().enumerate() {
            let s = &mut j.shards[*id as usize];
            if s.state != ShardState::Pending {
                continue;
            }
            if committed.contains(key) {
                s.state = ShardState::Committed;
            } else if cached[k] {
                s.state = ShardState::Skipped;
            } else {
                continue;
            }
            j.pending.remove(id);
            changed.push(*id);
        }
        if !changed.is_empty() {
            let shards: Vec<&Shard> = changed.iter().map(|&i| &j.shards[i as usize]).collect();
            self.inner.store.put_shards(job_id, &shards)?;
            tracing::info!(job = %job_id, shards = changed.len(), "shards already in the cache");
            let view = self.view(j, &st.leases);
            self.emit(JobEvent {
                kind: JobEventKind::Progress,
                job: view,
                detail: "shards found in cache".into(),
            });
            self.maybe_finish(st, job_id);
        }
        Ok(())
    }

    // ----- workers ----------------------------------------------------------------------------

    /// Registers (or re-registers) a worker. A re-registration revokes the old session's leases,
    /// counting one failure for each of their shards.
    pub fn register_worker(&self, info: WorkerInfo) -> Result<Registration> {
        check_worker_id(&info.worker_id)?;
        let now = self.now();
        let session = new_id();
        let mut st = self.lock();
        let held: Vec<String> = st
            .leases
            .iter()
            .filter(|(_, l)| l.worker_id == info.worker_id && !l.committing)
            .map(|(k, _)| k.clone())
            .collect();
        for lease_id in held {
            self.end_lease_with_failure(
                &mut st,
                &lease_id,
                Ended::Revoked,
                "worker re-registered while holding the lease",
                true,
            )?;
        }
        tracing::info!(worker = %info.worker_id, teacher = %info.teacher_name, device = %info.device, "worker registered");
        st.workers.insert(
            info.worker_id.clone(),
            WorkerEntry { info, session: session.clone(), last_seen_ms: now },
        );
        let ttl = self.inner.opts.lease_ttl.as_millis() as u64;
        self.refresh_gauges_locked(&st);
        Ok(Registration {
            session,
            lease_ttl_ms: ttl,
            heartbeat_interval_ms: (ttl / 3).max(1),
            max_attempts: self.inner.opts.max_attempts,
        })
    }

    fn check_session<'a>(st: &'a mut State, worker_id: &str, session: &str) -> Result<&'a mut WorkerEntry> {
        match st.workers.get_mut(worker_id) {
            Some(w) if w.session == session => Ok(w),
            Some(_) => Err(CoordError::FailedPrecondition(format!(
                "worker `{worker_id}`: stale session (the worker registered again); use the newest session"
            ))),
            None => Err(CoordError::FailedPrecondition(format!(
                "worker `{worker_id}` is not registered (the coordinator may have restarted); call RegisterWorker"
            ))),
        }
    }

    /// Grants the worker one pending shard: highest priority job first, then oldest, then lowest
    /// shard id, among jobs whose teacher the worker can run.
    pub fn lease_shard(&self, worker_id: &str, session: &str) -> Result<LeaseOutcome> {
        let now = self.now();
        let mut st = self.lock();
        let worker_fp = {
            let w = Self::check_session(&mut st, worker_id, session)?;
            w.last_seen_ms = now;
            w.info.teacher_fingerprint.clone()
        };
        let mut candidates: Vec<(&String, i32, u64)> = st
            .jobs
            .iter()
            .filter(|(_, j)| !j.rec.state.is_terminal() && !j.pending.is_empty())
            .filter(|(_, j)| match (&j.rec.teacher_fingerprint, &worker_fp) {
                (Some(job), Some(w)) => job == w,
                _ => true,
            })
            .map(|(id, j)| (id, j.rec.spec.priority, j.rec.seq))
            .collect();
        candidates.sort_by_key(|&(_, p, seq)| (std::cmp::Reverse(p), seq));
        let Some(job_id) = candidates.first().map(|c| c.0.clone()) else {
            let any_open = st.jobs.values().any(|j| !j.rec.state.is_terminal() && !j.pending.is_empty());
            let reason = match (&worker_fp, any_open) {
                (Some(fp), true) => format!("no pending shard for teacher {fp}"),
                _ => "no pending shards".to_string(),
            };
            return Ok(LeaseOutcome::NoWork { retry_after_ms: NO_WORK_RETRY_MS, reason });
        };
        let st = &mut *st;
        let j = st.jobs.get_mut(&job_id).expect("candidate job exists");
        let mut bound = false;
        if j.rec.teacher_fingerprint.is_none()
            && let Some(fp) = &worker_fp
        {
            j.rec.teacher_fingerprint = Some(fp.clone());
            bound = true;
        }
        let shard_id = *j.pending.iter().next().expect("non-empty pending set");
        j.pending.remove(&shard_id);
        let lease_id = new_id();
        let deadline_ms = now + self.ttl_ms();
        let s = &mut j.shards[shard_id as usize];
        s.state = ShardState::Leased;
        s.attempts += 1;
        let lease = Lease {
            lease_id: lease_id.clone(),
            job_id: job_id.clone(),
            shard_id,
            shard_key: s.key.clone(),
            range: s.range,
            spec: j.rec.spec.clone(),
            teacher_fingerprint: j.rec.teacher_fingerprint.clone(),
            deadline_ms,
            attempt: s.attempts,
        };
        let previous = j.rec.state;
        j.rec.state = JobState::Running;
        j.rec.updated_at_ms = now;
        j.active.insert(shard_id, lease_id.clone());
        if bound || previous != JobState::Running {
            self.inner.store.put_job(&j.rec, std::slice::from_ref(&j.shards[shard_id as usize]))?;
        } else {
            self.inner.store.put_shards(&job_id, &[&j.shards[shard_id as usize]])?;
        }
        st.leases.insert(
            lease_id.clone(),
            LeaseEntry {
                job_id: job_id.clone(),
                shard_id,
                worker_id: worker_id.to_string(),
                deadline_ms,
                images_done: 0,
                committing: false,
            },
        );
        self.inner.metrics.leases_granted.inc();
        tracing::debug!(job = %job_id, shard = shard_id, worker = %worker_id, lease = %lease_id, "lease granted");
        let view = self.view(&st.jobs[&job_id], &st.leases);
        self.emit(JobEvent {
            kind: JobEventKind::Progress,
            job: view,
            detail: format!("shard {shard_id} leased"),
        });
        self.refresh_gauges_locked(st);
        if bound {
            // The teacher is known now: look for shards the cache already holds for it.
            let c = self.clone();
            let id = job_id.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = c.reconcile_with_cache(&id).await {
                        tracing::warn!(job = %id, error = %e, "cache check after binding the teacher failed");
                    }
                });
            }
        }
        Ok(LeaseOutcome::Granted(Box::new(lease)))
    }

    /// Extends the worker's leases and records their progress; says per lease whether to go on.
    pub fn heartbeat(
        &self,
        worker_id: &str,
        session: &str,
        leases: &[(String, u64)],
    ) -> Result<Vec<LeaseStatus>> {
        let now = self.now();
        let mut st = self.lock();
        Self::check_session(&mut st, worker_id, session)?.last_seen_ms = now;
        let mut out = Vec::with_capacity(leases.len());
        let mut touched_jobs = Vec::new();
        for (lease_id, done) in leases {
            let status = match st.leases.get_mut(lease_id) {
                Some(l) if l.worker_id != worker_id => LeaseStatus::Unknown,
                Some(l) if l.committing => LeaseStatus::Active { deadline_ms: l.deadline_ms },
                Some(l) if l.deadline_ms < now => {
                    self.end_lease_with_failure(&mut st, lease_id, Ended::Expired, "lease expired", true)?;
                    self.inner.metrics.leases_expired.inc();
                    LeaseStatus::Revoked
                }
                Some(l) => {
                    l.deadline_ms = now + self.ttl_ms();
                    l.images_done = *done;
                    touched_jobs.push(l.job_id.clone());
                    LeaseStatus::Active { deadline_ms: l.deadline_ms }
                }
                None => match self.ended_reason(&st, lease_id) {
                    Some(Ended::Cancelled) => LeaseStatus::Cancelled,
                    Some(Ended::Expired | Ended::Revoked | Ended::Failed) => LeaseStatus::Revoked,
                    Some(Ended::Completed) | None => LeaseStatus::Unknown,
                },
            };
            out.push(status);
        }
        touched_jobs.sort();
        touched_jobs.dedup();
        for id in touched_jobs {
            if let Some(j) = st.jobs.get(&id) {
                let view = self.view(j, &st.leases);
                self.emit(JobEvent { kind: JobEventKind::Progress, job: view, detail: String::new() });
            }
        }
        Ok(out)
    }

    fn ended_reason(&self, st: &State, lease_id: &str) -> Option<Ended> {
        let job = st.ended_index.get(lease_id)?;
        st.jobs.get(job)?.ended.get(lease_id).map(|e| e.1)
    }

    /// Commits a finished shard exactly once. See the module docs for the rules.
    pub async fn complete_shard(
        &self,
        worker_id: &str,
        lease_id: &str,
        staged: &[u8],
        rows_written: u64,
        faces_skipped: u64,
    ) -> Result<Completion> {
        if lease_id.is_empty() {
            return Err(CoordError::invalid("lease_id", "is required"));
        }
        let staged_json = match serde_json::from_slice::<serde_json::Value>(staged) {
            Ok(v) => v,
            Err(e) => return Err(CoordError::invalid("staged_fragments", format!("not valid JSON: {e}"))),
        };
        // The teacher that produced the rows. A generic worker (one that loads the teacher named
        // in each lease) does not announce a fingerprint when it registers, so the job learns it
        // here, from its first completion.
        let staged_teacher = staged_json
            .pointer("/teacher/fingerprint")
            .and_then(|v| v.as_str())
            .and_then(|s| TeacherFingerprint::parse(s).ok());
        let now = self.now();
        let (spec, key, job_id, shard_id) = {
            let mut st = self.lock();
            let Some(l) = st.leases.get(lease_id) else {
                let reason = match self.ended_reason(&st, lease_id) {
                    Some(Ended::Completed) => {
                        self.inner
                            .metrics
                            .completions
                            .get_or_create(&Metrics::label("already_committed"))
                            .inc();
                        return Ok(Completion::AlreadyCommitted);
                    }
                    Some(Ended::Expired) => "lease expired",
                    Some(Ended::Revoked) => "lease revoked",
                    Some(Ended::Cancelled) => "job cancelled",
                    Some(Ended::Failed) => "shard was reported failed under this lease",
                    None => "unknown lease",
                };
                return Ok(self.reject(reason));
            };
            let (holder, committing, deadline_ms) = (l.worker_id.clone(), l.committing, l.deadline_ms);
            let (job_id, shard_id) = (l.job_id.clone(), l.shard_id);
            if holder != worker_id {
                return Ok(self.reject("lease held by another worker"));
            }
            if committing {
                return Ok(self.reject("a completion for this lease is already being committed"));
            }
            if deadline_ms < now {
                self.end_lease_with_failure(&mut st, lease_id, Ended::Expired, "lease expired", true)?;
                self.inner.metrics.leases_expired.inc();
                return Ok(self.reject("lease expired"));
            }
            let j = &st.jobs[&job_id];
            let s = &j.shards[shard_id as usize];
            if s.state == ShardState::Committed {
                return Ok(Completion::AlreadyCommitted);
            }
            let out = (j.rec.spec.clone(), s.key.clone(), job_id, shard_id);
            st.leases.get_mut(lease_id).expect("lease checked above").committing = true;
            out
        };
        let result = self.inner.cache.commit(&spec, &key, staged).await;
        let mut st = self.lock();
        let st = &mut *st;
        let Some(l) = st.leases.get_mut(lease_id) else {
            // Only a committing lease is never removed by others; be defensive anyway.
            return Ok(self.reject("lease vanished during commit"));
        };
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                l.committing = false;
                l.deadline_ms = self.now() + self.ttl_ms();
                tracing::warn!(job = %job_id, shard = shard_id, error = %e, "commit failed; the worker may retry");
                return Err(match e {
                    BackendError::InvalidStaged(r) => CoordError::invalid("staged_fragments", r),
                    other => unavailable(other),
                });
            }
        };
        st.leases.remove(lease_id);
        st.ended_index.insert(lease_id.to_string(), job_id.clone());
        let j = st.jobs.get_mut(&job_id).expect("job of a lease exists");
        j.active.remove(&shard_id);
        j.ended.insert(lease_id.to_string(), (shard_id, Ended::Completed));
        let s = &mut j.shards[shard_id as usize];
        s.state = ShardState::Committed;
        s.rows_written = rows_written;
        s.faces_skipped = faces_skipped;
        s.commit_version = match outcome {
            CommitOutcome::Committed { version } => Some(version),
            CommitOutcome::AlreadyCommitted => None,
        };
        let faces = s.range.len;
        self.inner.store.put_shards(&job_id, &[&j.shards[shard_id as usize]])?;
        if j.rec.teacher_fingerprint.is_none()
            && let Some(fp) = staged_teacher
        {
            j.rec.teacher_fingerprint = Some(fp);
            self.inner.store.put_job(&j.rec, &[])?;
        }
        let now = self.now();
        j.recent.push_back((now, faces));
        j.rec.updated_at_ms = now;
        self.inner.metrics.images_labelled.inc_by(faces);
        let label = match outcome {
            CommitOutcome::Committed { .. } => "committed",
            CommitOutcome::AlreadyCommitted => "already_committed",
        };
        self.inner.metrics.completions.get_or_create(&Metrics::label(label)).inc();
        tracing::info!(job = %job_id, shard = shard_id, rows = rows_written, outcome = label, "shard completed");
        let view = self.view(j, &st.leases);
        self.emit(JobEvent {
            kind: JobEventKind::Progress,
            job: view,
            detail: format!("shard {shard_id} committed"),
        });
        self.maybe_finish(st, &job_id);
        self.refresh_gauges_locked(st);
        Ok(match outcome {
            CommitOutcome::Committed { version } => Completion::Committed { version },
            CommitOutcome::AlreadyCommitted => Completion::AlreadyCommitted,
        })
    }

    fn reject(&self, reason: &str) -> Completion {
        self.inner.metrics.completions.get_or_create(&Metrics::label("rejected")).inc();
        Completion::Rejected { reason: reason.to_string() }
    }

    /// Records a failed attempt: the shard goes back to pending, or is poisoned when `retryable`
    /// is false or it has failed `max_attempts` times.
    pub fn fail_shard(
        &self,
        worker_id: &str,
        lease_id: &str,
        error: &str,
        retryable: bool,
    ) -> Result<FailureOutcome> {
        if lease_id.is_empty() {
            return Err(CoordError::invalid("lease_id", "is required"));
        }
        let mut st = self.lock();
        match st.leases.get(lease_id) {
            None => {
                return Err(CoordError::FailedPrecondition(format!("lease `{lease_id}` is not active")));
            }
            Some(l) if l.worker_id != worker_id => {
                return Err(CoordError::FailedPrecondition(format!(
                    "lease `{lease_id}` is held by another worker"
                )));
            }
            Some(l) if l.committing => {
                return Err(CoordError::FailedPrecondition(format!("lease `{lease_id}` is being committed")));
            }
            Some(_) => {}
        }
        let error = if error.is_empty() { "unspecified error" } else { error };
        let out = self.end_lease_with_failure(&mut st, lease_id, Ended::Failed, error, retryable)?;
        let label = if out.shard_state == ShardState::Poisoned { "poisoned" } else { "retry" };
        self.inner.metrics.failures.get_or_create(&Metrics::label(label)).inc();
        self.refresh_gauges_locked(&st);
        Ok(out)
    }

    /// Expires every lease whose deadline has passed; returns how many. Called by the reaper task.
    pub fn reap_expired(&self) -> Result<usize> {
        let now = self.now();
        let mut st = self.lock();
        let expired: Vec<String> = st
            .leases
            .iter()
            .filter(|(_, l)| !l.committing && l.deadline_ms < now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in &expired {
            self.end_lease_with_failure(&mut st, id, Ended::Expired, "lease expired", true)?;
            self.inner.metrics.leases_expired.inc();
        }
        if !expired.is_empty() {
            tracing::info!(count = expired.len(), "leases expired");
            self.refresh_gauges_locked(&st);
        }
        Ok(expired.len())
    }

    /// Ends a live lease as a failed attempt of its shard.
    fn end_lease_with_failure(
        &self,
        st: &mut State,
        lease_id: &str,
        how: Ended,
        error: &str,
        retryable: bool,
    ) -> Result<FailureOutcome> {
        let l = st.leases.remove(lease_id).expect("caller checked the lease");
        st.ended_index.insert(lease_id.to_string(), l.job_id.clone());
        let max = self.inner.opts.max_attempts;
        let j = st.jobs.get_mut(&l.job_id).expect("job of a lease exists");
        j.active.remove(&l.shard_id);
        j.ended.insert(lease_id.to_string(), (l.shard_id, how));
        let s = &mut j.shards[l.shard_id as usize];
        s.failures += 1;
        s.last_error = Some(format!("{error} (worker {}, attempt {})", l.worker_id, s.attempts));
        let poisoned = !retryable || s.failures >= max;
        s.state = if poisoned { ShardState::Poisoned } else { ShardState::Pending };
        if !poisoned {
            j.pending.insert(l.shard_id);
        }
        let out = FailureOutcome { shard_state: s.state, attempts: s.attempts };
        tracing::warn!(job = %l.job_id, shard = l.shard_id, worker = %l.worker_id, error, poisoned, "shard attempt failed");
        self.inner.store.put_shards(&l.job_id, &[&j.shards[l.shard_id as usize]])?;
        let view = self.view(j, &st.leases);
        let (kind, detail) = if poisoned {
            (JobEventKind::ShardPoisoned, format!("shard {} poisoned: {error}", l.shard_id))
        } else {
            (JobEventKind::Progress, format!("shard {} back to pending: {error}", l.shard_id))
        };
        self.emit(JobEvent { kind, job: view, detail });
        let job_id = l.job_id.clone();
        self.maybe_finish(st, &job_id);
        Ok(out)
    }

    /// Ends a job whose shards are all final, per the outcome policy in the module docs.
    fn maybe_finish(&self, st: &mut State, job_id: &str) {
        let Some(j) = st.jobs.get_mut(job_id) else { return };
        if j.rec.state.is_terminal() {
            return;
        }
        let c = counts(&j.shards);
        if c.open() > 0 {
            return;
        }
        let previous = j.rec.state;
        j.rec.state = if c.poisoned == 0 {
            JobState::Completed
        } else if c.committed + c.skipped == 0 && c.total > 0 {
            j.rec.error = Some("every shard was poisoned".into());
            JobState::Failed
        } else {
            JobState::CompletedWithPoisoned
        };
        j.rec.updated_at_ms = self.now();
        if let Err(e) = self.inner.store.put_job(&j.rec, &[]) {
            tracing::error!(job = %job_id, error = %e, "could not store the job's final state");
        }
        tracing::info!(job = %job_id, state = ?j.rec.state, "job finished");
        let view = self.view(j, &st.leases);
        let detail = format!("{:?}", view.state);
        // Ended-lease bookkeeping is only needed while workers may still call about the job.
        for l in j.ended.keys() {
            st.ended_index.remove(l);
        }
        if let Some(j) = st.jobs.get_mut(job_id) {
            j.ended.clear();
        }
        self.emit(JobEvent { kind: JobEventKind::StateChanged { previous }, job: view, detail });
    }

    fn emit(&self, ev: JobEvent) {
        // No receivers is fine: nobody is watching.
        let _ = self.inner.events.send(ev);
    }

    fn view(&self, j: &JobEntry, leases: &HashMap<String, LeaseEntry>) -> JobView {
        let now = self.now();
        let shards = counts(&j.shards);
        let mut images_done = 0;
        let mut images_skipped = 0;
        let mut rows_written = 0;
        let mut poisoned = Vec::new();
        for s in &j.shards {
            match s.state {
                ShardState::Committed => {
                    images_done += s.range.len;
                    images_skipped += s.faces_skipped.min(s.range.len);
                    rows_written += s.rows_written;
                }
                ShardState::Skipped => {
                    images_done += s.range.len;
                    images_skipped += s.range.len;
                }
                ShardState::Poisoned => poisoned.push(PoisonedShard {
                    shard_id: s.id,
                    range: s.range,
                    attempts: s.attempts,
                    last_error: s.last_error.clone().unwrap_or_default(),
                }),
                _ => {}
            }
        }
        // Progress of live leases is not stored; it comes from the lease table.
        for lease_id in j.active.values() {
            if let Some(l) = leases.get(lease_id) {
                images_done += l.images_done.min(j.shards[l.shard_id as usize].range.len);
            }
        }
        let window_start = (now - RATE_WINDOW_MS).max(j.rec.created_at_ms);
        let recent: u64 = j.recent.iter().filter(|(t, _)| *t >= window_start).map(|(_, n)| n).sum();
        let secs = ((now - window_start) as f64 / 1000.0).max(1.0);
        JobView {
            id: j.rec.id.clone(),
            spec: j.rec.spec.clone(),
            state: j.rec.state,
            job_fingerprint: j.rec.job_fingerprint.clone(),
            teacher_fingerprint: j.rec.teacher_fingerprint.clone(),
            shards,
            images_total: j.shards.iter().map(|s| s.range.len).sum(),
            images_done,
            images_skipped,
            rows_written,
            images_per_second: if j.rec.state.is_terminal() && recent == 0 {
                0.0
            } else {
                recent as f64 / secs
            },
            created_at_ms: j.rec.created_at_ms,
            updated_at_ms: j.rec.updated_at_ms,
            error: j.rec.error.clone(),
            poisoned,
        }
    }

    fn refresh_gauges(&self) {
        let st = self.lock();
        self.refresh_gauges_locked(&st);
    }

    fn refresh_gauges_locked(&self, st: &State) {
        let mut total = ShardCounts::default();
        let mut rate = 0.0;
        let now = self.now();
        for j in st.jobs.values().filter(|j| !j.rec.state.is_terminal()) {
            for s in &j.shards {
                total.add(s.state);
            }
            let start = (now - RATE_WINDOW_MS).max(j.rec.created_at_ms);
            let n: u64 = j.recent.iter().filter(|(t, _)| *t >= start).map(|(_, n)| n).sum();
            rate += n as f64 / ((now - start) as f64 / 1000.0).max(1.0);
        }
        let m = &self.inner.metrics;
        for s in ShardState::ALL {
            let v = match s {
                ShardState::Pending => total.pending,
                ShardState::Leased => total.leased,
                ShardState::Committed => total.committed,
                ShardState::Skipped => total.skipped,
                ShardState::Poisoned => total.poisoned,
                ShardState::Cancelled => total.cancelled,
            };
            m.shards.get_or_create(&Metrics::label(s.as_str())).set(v as i64);
        }
        m.images_per_second.set(rate);
    }

    /// Drops the in-memory rate samples older than the window (called by the reaper).
    pub fn trim_rates(&self) {
        let now = self.now();
        let mut st = self.lock();
        for j in st.jobs.values_mut() {
            while j.recent.front().is_some_and(|(t, _)| *t < now - RATE_WINDOW_MS) {
                j.recent.pop_front();
            }
        }
        self.refresh_gauges_locked(&st);
    }

    /// The teacher fingerprint a job is bound to, if any.
    pub fn job_teacher(&self, job_id: &str) -> Option<TeacherFingerprint> {
        self.lock().jobs.get(job_id).and_then(|j| j.rec.teacher_fingerprint.clone())
    }
}

fn counts(shards: &[Shard]) -> ShardCounts {
    let mut c = ShardCounts::default();
    for s in shards {
        c.add(s.state);
    }
    c
}
