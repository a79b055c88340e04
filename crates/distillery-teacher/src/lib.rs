//! distillery-teacher
