//! One module per subcommand: argument structs and the glue that calls the libraries.

pub mod cache;
pub mod completions;
pub mod eval;
pub mod faces;
pub mod label;
pub mod models;
pub mod predict;
pub mod quickstart;
pub mod serve_coordinator;
pub mod serve_teacher;
pub mod serve_trainer;
pub mod train;
