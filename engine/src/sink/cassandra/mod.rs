//! The Cassandra sink: absolute values per closed epoch, idempotent, with a progress row per
//! epoch (see [`schema`] for the tables and what the progress rows promise).

mod claim;
pub mod config;
pub mod sink;
#[cfg(test)]
mod tests;

pub use config::CassandraSinkConfig;
pub use sink::{CassandraSink, SinkStart, plan_batches, write_timestamp};
