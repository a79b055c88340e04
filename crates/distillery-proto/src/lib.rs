//! Generated gRPC types of Distillery's API (package `distillery.v1`) and conversions between them
//! and the domain types of `distillery-core` / `distillery-data`.
//!
//! The `.proto` files in `proto/distillery/v1/` are the source of truth; `docs/api.md` is derived
//! from their comments. Services: `CoordinatorService` (jobs and shard leases), `TeacherService`
//! (inference on a worker) and `TrainerService` (training runs). [`auth`], [`transport`] and
//! [`server`] hold what every server and client shares: the bearer token, TLS, how a client dials a
//! service, and the handle of a running server.

pub mod auth;
pub mod convert;
pub mod server;
pub mod transport;

/// Package `distillery.v1`: messages, enums, `*_client` and `*_server` modules.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("distillery.v1");
}

/// Encoded `FileDescriptorSet` of every Distillery proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("distillery_descriptor");

pub use convert::ConvertError;
