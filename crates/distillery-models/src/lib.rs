//! Distillery's models: the EmoNet teacher, ONNX teachers, the student zoo, the distillation losses
//! and the MAC counter.
//!
//! Architecture invariant: this crate does no I/O beyond reading weight files it is handed a path
//! to. Images, datasets and networks live in other crates.

pub mod alloc;
pub mod cost;
pub mod device;
pub mod emonet;
pub mod losses;
pub mod nn;
pub mod onnx;
pub mod process;
pub mod student;
pub mod students;
pub mod teacher;
pub mod zoo;

pub use cost::ModelCost;
pub use teacher::{Teacher, TeacherInfo, TeacherOutput};
