//! The whole system in one process: a coordinator and K teacher workers as real gRPC servers on
//! loopback (`distillery label --local`), the client side of labelling (submit a job and follow it
//! to the end), and the embedded quickstart that chains synthesis, labelling, distillation and
//! evaluation.

pub mod cluster;
pub mod error;
pub mod experiment;
pub mod label;
pub mod quickstart;

pub use cluster::{LocalCluster, LocalClusterConfig};
pub use error::{Error, Result};
pub use experiment::{ExperimentOptions, ExperimentReport, distillation_experiment};
pub use label::{JobProgress, LabelRequest, Reconnect, submit_and_wait, submit_and_wait_with};
pub use quickstart::{QuickstartOptions, QuickstartSummary, quickstart};
