//! Serving results: the read model and the query services built on it.
//!
//! * [`auth`]: token auth (JWT scopes down to one user) of the gRPC and web servers.
//! * [`read_model`]: the snapshot per closed epoch, readable without blocking the workers.
//! * [`status`]: the engine's counters and progress, as `Admin/GetStatus` reports them.
//! * [`grpc`]: `spendflow.v1.ExpenseQuery` and `spendflow.v1.Admin`, with health and reflection.
//! * [`cassandra`]: the same query service without an engine, over the Cassandra sink's tables
//!   (`spendflow serve --from cassandra`).
//! * [`web`]: the live web report (overview and user pages, JSON API, server-sent events).

#[cfg(feature = "grpc")]
pub mod auth;
#[cfg(all(feature = "cassandra", feature = "web"))]
pub mod cassandra;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod read_model;
pub mod status;
#[cfg(feature = "grpc")]
pub mod transport;
#[cfg(feature = "web")]
pub mod web;
