//! The client side of labelling: submit a job to a coordinator and follow it until it ends.

use std::collections::HashMap;
use std::time::Duration;

use distillery_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use distillery_proto::v1::{self, JobState};
use distillery_teacher::TeacherSpec;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

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

#[derive(Clone)]
struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = CoordinatorServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn connect(endpoint: &str, token: Option<&str>) -> Result<Client> {
    let conn = |reason: String| Error::Connect { endpoint: endpoint.to_owned(), reason };
    let channel = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| conn(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| conn(e.to_string()))?;
    let bearer = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| Error::Invalid { what: "auth token", reason: "not valid ASCII".into() })?,
        ),
        None => None,
    };
    Ok(CoordinatorServiceClient::with_interceptor(channel, Bearer(bearer))
        .max_decoding_message_size(64 << 20))
}

/// Submits `req` to the coordinator at `endpoint` and follows the job through `WatchJob` until it
/// ends, calling `on_progress` on every event. Returns the final job; an error when it failed or
/// was cancelled (a job with poisoned shards returns normally: check `poisoned`).
pub async fn submit_and_wait(
    endpoint: &str,
    token: Option<&str>,
    req: &LabelRequest,
    mut on_progress: impl FnMut(&JobProgress),
) -> Result<v1::Job> {
    let mut client = connect(endpoint, token).await?;
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
    while !is_terminal(last.state) {
        let mut stream = client
            .watch_job(v1::WatchJobRequest { job_id: job_id.clone() })
            .await
            .map_err(|s| Error::Rpc { call: "WatchJob", status: Box::new(s) })?
            .into_inner();
        while let Some(event) = stream.next().await {
            let event = event.map_err(|s| Error::Rpc { call: "WatchJob", status: Box::new(s) })?;
            if let Some(job) = event.job {
                on_progress(&JobProgress::of(&job));
                let done = is_terminal(job.state);
                last = job;
                if done {
                    break;
                }
            }
        }
        if !is_terminal(last.state) {
            // The stream ended early (coordinator restarting): read the job once, then watch again.
            last = client
                .get_job(v1::GetJobRequest { job_id: job_id.clone() })
                .await
                .map_err(|s| Error::Rpc { call: "GetJob", status: Box::new(s) })?
                .into_inner();
        }
    }
    match JobState::try_from(last.state) {
        Ok(JobState::Completed | JobState::CompletedWithPoisoned) => Ok(last),
        _ => Err(Error::JobFailed { job_id, state: state_name(last.state), detail: last.error.clone() }),
    }
}
