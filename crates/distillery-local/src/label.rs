//! The client side of labelling: submit a job to a coordinator and follow it until it ends.
//!
//! Following survives a coordinator restart: when `WatchJob` breaks (the coordinator shutting down
//! answers `UNAVAILABLE`; a killed one breaks the connection), the client reconnects with backoff,
//! re-reads the job with `GetJob` and watches again, for up to [`Reconnect::give_up_after`] of
//! continuous outage. Jobs are durable on the coordinator, so nothing is lost meanwhile.

use std::collections::HashMap;
use std::error::Error as _;
use std::time::{Duration, Instant};

use distillery_proto::auth::AttachBearer;
use distillery_proto::transport::{ConnectError, Target};
use distillery_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use distillery_proto::v1::{self, JobState};
use distillery_teacher::TeacherSpec;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::{Error, Result};

/// A labelling job as a caller describes it.
#[derive(Clone, Debug)]
pub struct LabelRequest {
    pub faces_uri: String,
    pub cache_uri: String,
    pub teacher: TeacherSpec,
    /// Augmented views per face besides the plain one.
    pub views: u32,
    pub shard_size: u64,
    pub view_seed: u64,
    pub storage_options: HashMap<String, String>,
}

/// A snapshot of a job while it runs, for progress display.
#[derive(Clone, Debug, PartialEq)]
pub struct JobProgress {
    pub job_id: String,
    pub state: String,
    pub images_total: u64,
    pub images_done: u64,
    pub images_skipped: u64,
    pub rows_written: u64,
    pub images_per_second: f64,
    pub shards_total: u64,
    pub shards_done: u64,
}

impl JobProgress {
    fn of(job: &v1::Job) -> Self {
        let shards = job.shards.unwrap_or_default();
        Self {
            job_id: job.job_id.clone(),
            state: state_name(job.state),
            images_total: job.images_total,
            images_done: job.images_done,
            images_skipped: job.images_skipped,
            rows_written: job.rows_written,
            images_per_second: job.images_per_second,
            shards_total: shards.total,
            shards_done: shards.committed + shards.skipped + shards.poisoned,
        }
    }
}

fn state_name(state: i32) -> String {
    JobState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_ascii_lowercase())
        .unwrap_or_else(|_| format!("unknown({state})"))
}

fn is_terminal(state: i32) -> bool {
    matches!(
        JobState::try_from(state),
        Ok(JobState::Completed | JobState::CompletedWithPoisoned | JobState::Failed | JobState::Cancelled)
    )
}

/// The protobuf form of a teacher spec.
pub fn proto_teacher(spec: &TeacherSpec) -> Result<v1::TeacherSpec> {
    let path = |p: &std::path::Path| {
        std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).to_string_lossy().into_owned()
    };
    let (kind, config_path, weights_path) = match spec {
        TeacherSpec::Emonet { classes, weights } => {
            let kind = if *classes == 5 { v1::TeacherKind::Emonet5 } else { v1::TeacherKind::Emonet8 };
            (kind, String::new(), weights.as_deref().map(path).unwrap_or_default())
        }
        TeacherSpec::Onnx(p) => (v1::TeacherKind::Onnx, path(p), String::new()),
        TeacherSpec::Student(p) => (v1::TeacherKind::Student, path(p), String::new()),
        TeacherSpec::Tiny { .. } => {
            return Err(Error::Invalid {
                what: "teacher",
                reason: "the tiny test teacher cannot be named in a job; preload it on the workers".into(),
            });
        }
    };
    Ok(v1::TeacherSpec { kind: kind as i32, config_path, weights_path, fingerprint: String::new() })
}

type Client =
    CoordinatorServiceClient<tonic::service::interceptor::InterceptedService<Channel, AttachBearer>>;

async fn connect(coordinator: &Target, token: Option<&str>) -> Result<Client> {
    let channel = coordinator.connect(Duration::from_secs(10)).await.map_err(|e| match e {
        ConnectError::Unreachable { url, reason } => Error::Connect { endpoint: url, reason },
        ConnectError::Url { .. } => Error::Invalid { what: "coordinator URL", reason: e.to_string() },
        ConnectError::TlsCa(reason) => Error::Invalid { what: "TLS CA", reason },
    })?;
    let bearer = AttachBearer::new(token, "auth token")
        .map_err(|reason| Error::Invalid { what: "auth token", reason })?;
    Ok(CoordinatorServiceClient::with_interceptor(channel, bearer).max_decoding_message_size(64 << 20))
}

/// How [`submit_and_wait`] rides out a coordinator that goes away while it follows a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconnect {
    /// First wait after a failed call; doubles on each further failure.
    pub initial: Duration,
    /// Longest wait between two attempts.
    pub max: Duration,
    /// Give up when the coordinator has been unreachable this long without a break.
    pub give_up_after: Duration,
}

impl Default for Reconnect {
    /// 200 ms doubling up to 5 s, for up to 5 minutes: enough for a coordinator pod to be
    /// rescheduled and load its state.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
            give_up_after: Duration::from_secs(300),
        }
    }
}

/// True for failures that a reconnect can cure: `UNAVAILABLE` (from the server, e.g. while it shuts
/// down, or from our channel when it cannot connect), and any status that our side made from a
/// broken connection (such a status carries its transport error as a source; one the server sent
/// does not).
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal | Code::Cancelled | Code::DeadlineExceeded => {
            status.source().is_some()
        }
        _ => false,
    }
}

/// The current outage: when it began and the next wait.
struct Outage {
    policy: Reconnect,
    since: Option<Instant>,
    next: Duration,
}

impl Outage {
    fn new(policy: Reconnect) -> Self {
        Self { policy, since: None, next: policy.initial }
    }

    /// A call succeeded: the coordinator is back.
    fn over(&mut self) {
        if self.since.take().is_some() {
            tracing::info!("the coordinator answers again");
        }
        self.next = self.policy.initial;
    }

    /// The wait before the next attempt after a failure at `now`, or `None` once the outage
    /// would outlast `give_up_after`. Returns also how long the outage has lasted.
    fn next_delay(&mut self, now: Instant) -> (Option<Duration>, Duration) {
        let since = *self.since.get_or_insert(now);
        let waited = now.saturating_duration_since(since);
        if waited + self.next > self.policy.give_up_after {
            return (None, waited);
        }
        let d = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        (Some(d), waited)
    }

    /// A call failed with a transient `status`: waits before the next attempt, or gives up once the
    /// outage would outlast `give_up_after`.
    async fn wait(&mut self, call: &'static str, status: Status, endpoint: &str, job_id: &str) -> Result<()> {
        let (delay, waited) = self.next_delay(Instant::now());
        let Some(delay) = delay else {
            return Err(Error::CoordinatorLost {
                endpoint: endpoint.to_owned(),
                job_id: job_id.to_owned(),
                waited_secs: waited.as_secs(),
                call,
                status: Box::new(status),
            });
        };
        tracing::warn!(%call, code = ?status.code(), message = status.message(), retry_in_ms = delay.as_millis() as u64,
            "lost the coordinator while following the job; reconnecting");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// Submits `req` to the coordinator (its URL, and for `https://` the CA to verify it with) and
/// follows the job through `WatchJob` until it ends, calling `on_progress` on every event. Returns
/// the final job; an error when it failed or was cancelled (a job with poisoned shards returns
/// normally: check `poisoned`). A coordinator restart while following is ridden out with the
/// default [`Reconnect`] policy.
pub async fn submit_and_wait(
    coordinator: &Target,
    token: Option<&str>,
    req: &LabelRequest,
    on_progress: impl FnMut(&JobProgress),
) -> Result<v1::Job> {
    submit_and_wait_with(coordinator, token, req, Reconnect::default(), on_progress).await
}

/// [`submit_and_wait`] with an explicit reconnect policy.
pub async fn submit_and_wait_with(
    coordinator: &Target,
    token: Option<&str>,
    req: &LabelRequest,
    reconnect: Reconnect,
    mut on_progress: impl FnMut(&JobProgress),
) -> Result<v1::Job> {
    let endpoint = coordinator.url.as_str();
    let mut client = connect(coordinator, token).await?;
    let spec = v1::LabelJobSpec {
        faces_uri: req.faces_uri.clone(),
        cache_uri: req.cache_uri.clone(),
        teacher: Some(proto_teacher(&req.teacher)?),
        views: req.views,
        shard_size: req.shard_size,
        priority: 0,
        storage_options: req.storage_options.clone(),
        view_seed: req.view_seed,
    };
    let submitted = client
        .submit_label_job(v1::SubmitLabelJobRequest { spec: Some(spec) })
        .await
        .map_err(|s| Error::Rpc { call: "SubmitLabelJob", status: Box::new(s) })?
        .into_inner();
    let job = submitted.job.ok_or_else(|| Error::Invalid { what: "reply", reason: "no job".into() })?;
    let job_id = job.job_id.clone();
    tracing::info!(%job_id, already_active = submitted.already_active, "labelling job submitted");
    on_progress(&JobProgress::of(&job));
    let mut last = job;
    let mut outage = Outage::new(reconnect);
    while !is_terminal(last.state) {
        // Follow the stream to its end. The channel reconnects by itself on the next call after
        // the connection broke.
        let watched = async {
            let mut stream =
                client.watch_job(v1::WatchJobRequest { job_id: job_id.clone() }).await?.into_inner();
            while let Some(event) = stream.next().await {
                outage.over();
                if let Some(job) = event?.job {
                    on_progress(&JobProgress::of(&job));
                    let done = is_terminal(job.state);
                    last = job;
                    if done {
                        break;
                    }
                }
            }
            Ok::<(), Status>(())
        }
        .await;
        match watched {
            Ok(()) => {}
            Err(s) if is_transient(&s) => outage.wait("WatchJob", s, endpoint, &job_id).await?,
            Err(s) => return Err(Error::Rpc { call: "WatchJob", status: Box::new(s) }),
        }
        if is_terminal(last.state) {
            break;
        }
        // The stream ended early or broke (coordinator restarting): read the job, then watch again.
        match client.get_job(v1::GetJobRequest { job_id: job_id.clone() }).await {
            Ok(job) => {
                outage.over();
                last = job.into_inner();
                on_progress(&JobProgress::of(&last));
            }
            Err(s) if is_transient(&s) => outage.wait("GetJob", s, endpoint, &job_id).await?,
            Err(s) => return Err(Error::Rpc { call: "GetJob", status: Box::new(s) }),
        }
    }
    match JobState::try_from(last.state) {
        Ok(JobState::Completed | JobState::CompletedWithPoisoned) => Ok(last),
        _ => Err(Error::JobFailed { job_id, state: state_name(last.state), detail: last.error.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transport_failures_are_retried() {
        assert!(is_transient(&Status::unavailable("the coordinator is shutting down")));
        // Made on our side from a broken connection: it carries the transport error.
        let broken = Status::from_error(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
        assert_eq!(broken.code(), Code::Unknown);
        assert!(is_transient(&broken));
        // Sent by the server: final.
        for s in [
            Status::unknown("a handler failed"),
            Status::internal("state store failed"),
            Status::not_found("no job"),
            Status::unauthenticated("invalid bearer token"),
            Status::invalid_argument("bad"),
        ] {
            assert!(!is_transient(&s), "{s:?}");
        }
    }

    #[test]
    fn the_wait_backs_off_and_gives_up_after_the_bound() {
        let policy = Reconnect {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
            give_up_after: Duration::from_secs(2),
        };
        let mut outage = Outage::new(policy);
        let t0 = Instant::now();
        let mut now = t0;
        let mut waits = vec![];
        // Each attempt fails at once, right after the previous wait.
        while let (Some(d), _) = outage.next_delay(now) {
            waits.push(d.as_millis());
            now += d;
        }
        assert_eq!(waits, [100, 200, 400, 400, 400, 400], "doubling, capped at `max`");
        assert!(now - t0 <= policy.give_up_after);
        assert_eq!(outage.next_delay(now), (None, now - t0), "the bound is reached: give up");
        // Contact ends the outage: the next failure starts a new one with the initial wait.
        outage.over();
        assert_eq!(outage.next_delay(now).0, Some(policy.initial));
    }
}
