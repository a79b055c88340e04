//! The Distillery coordinator: splits labelling jobs into shards of a faces dataset, leases them to
//! teacher workers, and commits their outputs to the teacher cache exactly once.
//!
//! Layers: [`coordinator::Coordinator`] holds the domain logic and knows nothing of gRPC;
//! [`grpc::CoordinatorGrpc`] adapts it to `distillery.v1.CoordinatorService`; [`server`] runs it
//! (health, reflection, auth, TLS, metrics, reaper, shutdown). State is durable in a redb file in
//! the state directory, so a restarted coordinator resumes its jobs without redoing committed work.

pub mod backend;
pub mod clock;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod grpc;
pub mod lance_backend;
pub mod metrics;
pub mod model;
pub mod server;
pub mod store;

pub use backend::{BackendError, CacheCommitter, CommitOutcome, MemoryBackend, ShardPlanner};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{CoordinatorConfig, TlsPaths};
pub use coordinator::{Coordinator, CoordinatorOptions};
pub use error::CoordError;
pub use server::{
    ADDR_FILE, Backends, BearerAuth, RunningCoordinator, ServeError, serve, shutdown_signal, spawn,
    spawn_with,
};
