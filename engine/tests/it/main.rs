//! spendflow-engine's integration tests, linked into one test binary (one link instead of one
//! per file: on a 2-core machine that is minutes of CI). Each module is what used to be a test
//! file; they run in parallel threads as the tests of one file always did, against the real
//! services the kit starts (`docker/native/services up`, or `make test`).
//!
//! The tests that stop a service for everyone (a broker or Cassandra killed) are in the
//! `chaos` binary instead, which cargo runs on its own.

mod support;
mod web;

mod alerts_kafka;
mod auth;
mod cassandra_read;
mod cassandra_sink;
mod chaos_checkpoint;
mod checkpoint_hdfs;
mod cli;
mod cluster;
mod crash_recovery;
mod dead_letter_delivery;
mod file_pipeline;
mod generate_verify;
mod grpc;
mod kafka_sasl;
mod kafka_source;
mod kafka_truth;
mod metrics;
mod personnel_hdfs;
mod replay_phantom;
mod service_cassandra;
mod service_hdfs;
mod service_kafka;
mod service_mysql;
mod services_kit;
mod sink_stall;
mod tls;
mod web_api;
mod web_auth_browser;
mod web_browser;
