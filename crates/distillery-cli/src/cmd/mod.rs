//! One module per subcommand: argument structs and the glue that calls the libraries.

pub mod completions;
pub mod models;
