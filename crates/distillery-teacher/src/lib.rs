//! The teacher worker (`distillery serve teacher`): loads a teacher, leases shards of a faces
//! dataset from the coordinator, labels them and stages the outputs into the teacher cache, and
//! serves the teacher itself over gRPC (`TeacherService`).
//!
//! - [`load`]: teacher specs (`emonet-8`, ONNX `.toml`, student run dirs, `tiny`) and devices;
//! - [`engine`]: the single thread that owns the model;
//! - [`pipeline`]: bounded decode → batch → infer → stage pipeline for one shard;
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint;
//! - [`service`]: the `TeacherService` gRPC server with health and reflection;
//! - [`worker`]: the lease / heartbeat / complete loop and its entry points.

pub mod config;
pub mod engine;
pub mod error;
pub mod load;
pub mod metrics;
pub mod pipeline;
pub mod predict;
pub mod prep;
pub mod service;
pub mod storage;
pub mod tiny;
pub mod worker;

pub use config::WorkerConfig;
pub use engine::{BatchOutputs, Engine};
pub use error::{Error, Result};
pub use load::{TeacherSpec, load_teacher, parse_device};
pub use metrics::Metrics;
pub use pipeline::{LabelRow, PipelineConfig, RowSink, ShardJob, ShardReport, label_shard};
pub use storage::{LanceStorage, default_storage};
pub use tiny::TinyTeacher;
pub use worker::{RunningWorker, ShardStorage, run_worker, spawn_worker};
