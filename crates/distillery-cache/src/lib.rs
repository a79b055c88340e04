//! distillery-cache
