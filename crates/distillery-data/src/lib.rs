//! distillery-data
