//! Shared vocabulary of Distillery: identifiers, class sets, preprocessing specs and errors.
//!
//! Everything here is plain data with no I/O, so every other crate can depend on it.

pub mod classes;
pub mod error;
pub mod ids;
pub mod preprocess;
pub mod reference;

pub use classes::ClassSet;
pub use error::{Error, Result};
pub use ids::{FaceId, RunId, TeacherFingerprint};
pub use preprocess::{Layout, Preprocess, ResizeFilter};
