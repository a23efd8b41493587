//! Sinks: where results and rejected records go.
//!
//! * [`dead_letter`]: rejected records, kept in a bounded collection with counts by reason.
//! * The in-memory store of results is the read model (`serve::read_model`), which every
//!   engine has; durable sinks (Cassandra) receive the same per-epoch changes.

pub mod cassandra;
pub mod dead_letter;
