//! ONNX teachers: any ONNX classification network described by a small TOML file runs as a
//! [`Teacher`](crate::teacher::Teacher).
//!
//! The evaluator is ours, on candle: a model file is parsed once into an execution plan
//! ([`OnnxGraph`]): nodes in topological order, initializers as candle tensors, sub-graphs that
//! depend only on constants folded away. Running a batch then walks the plan, freeing each
//! intermediate value after its last use. Only `candle-onnx`'s generated protobuf types are used.
//!
//! Coverage is the common inference set of image CNNs (convolutions incl. depthwise, pooling,
//! normalisation, activations, dense layers and the shape plumbing exporters emit around them). An
//! operator outside it is rejected when the model loads, with an error naming the op type and node.

mod config;
mod graph;
mod kernels;
mod ops;
mod proto;
mod teacher;

pub use config::{OnnxTeacherConfig, OutputKind};
pub use graph::{NodeTime, OnnxGraph, by_op_type};
pub use teacher::OnnxTeacher;

/// The protobuf types of the ONNX format (re-exported so callers can build models in code).
pub use candle_onnx::onnx as pb;

use std::path::PathBuf;

/// Everything that can go wrong loading or running an ONNX teacher.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// A file (model or config) could not be read.
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The model bytes are not a valid ONNX protobuf.
    #[error("{path} is not a valid ONNX model: {reason}")]
    Decode { path: PathBuf, reason: String },
    /// The teacher TOML is not valid TOML or has unknown/mistyped keys.
    #[error("teacher config {path}: {source}")]
    ConfigParse { path: PathBuf, source: Box<toml::de::Error> },
    /// A config value is invalid; the inner error names the key.
    #[error(transparent)]
    Config(#[from] distillery_core::Error),
    /// The graph uses an operator this evaluator does not implement.
    #[error("unsupported ONNX op `{op_type}` (domain `{domain}`) at node `{node}`")]
    UnsupportedOp { op_type: String, domain: String, node: String },
    /// A node has attributes or inputs this evaluator cannot honour.
    #[error("ONNX node `{node}` ({op_type}): {reason}")]
    BadNode { op_type: String, node: String, reason: String },
    /// The graph as a whole is malformed (cycles, dangling names, bad initializers...).
    #[error("ONNX graph: {0}")]
    Graph(String),
    /// A node failed while running.
    #[error("ONNX node `{node}` ({op_type}) failed: {source}")]
    Node { op_type: String, node: String, source: Box<candle_core::Error> },
    /// A candle error outside any node (moving inputs, post-processing outputs).
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for OnnxError {
    fn from(e: candle_core::Error) -> Self {
        OnnxError::Candle(Box::new(e))
    }
}

impl From<OnnxError> for candle_core::Error {
    fn from(e: OnnxError) -> Self {
        match e {
            OnnxError::Candle(c) => *c,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}
