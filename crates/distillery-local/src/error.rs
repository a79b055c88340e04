//! Errors of the embedded cluster and of the labelling client.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("coordinator: {0}")]
    Coordinator(#[from] distillery_coordinator::ServeError),
    #[error("teacher worker: {0}")]
    Worker(#[from] distillery_teacher::Error),
    #[error("cannot reach the coordinator at {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("{call} failed: {status}")]
    Rpc { call: &'static str, status: Box<tonic::Status> },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("training: {0}")]
    Train(#[from] distillery_trainer::Error),
    #[error("faces dataset: {0}")]
    Faces(#[from] distillery_cache::Error),
    #[error("{what}: {reason}")]
    Step { what: String, reason: String },
    #[error(
        "lost the coordinator at {endpoint} for {waited_secs}s while following job {job_id} (the job goes \
         on: run the same command again to attach to it); last {call}: {status}"
    )]
    CoordinatorLost {
        endpoint: String,
        job_id: String,
        waited_secs: u64,
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("labelling job {job_id} ended {state}: {detail}")]
    JobFailed { job_id: String, state: String, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
