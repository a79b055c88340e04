//! Offline distillation of students from cached teacher outputs, their evaluation, and the trainer
//! gRPC service.
//!
//! The training loop ([`train`]) reads [`distillery_data::Batch`]es from any [`source::BatchSource`]
//! (the teacher-cache stream in production, in-memory batches in tests), optimises the student with
//! AdamW ([`optim`]) on the distillation objective, and checkpoints everything needed to resume a
//! run bit-for-bit ([`checkpoint`]). [`eval`] scores students and teachers alike on a split with the
//! metrics in [`metrics`]; [`plots`] draws training curves and evaluation figures. [`service`] is
//! the `TrainerService` that queues runs, and [`server`] serves it (`distillery serve trainer`).

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod init;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod plots;
pub mod registry;
pub mod run;
pub mod server;
pub mod service;
pub mod source;
pub mod train;

pub use config::TrainConfig;
pub use error::{Error, Result};
