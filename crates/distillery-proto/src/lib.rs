//! distillery-proto
