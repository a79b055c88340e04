//! distillery-coordinator
