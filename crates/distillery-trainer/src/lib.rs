//! distillery-trainer
