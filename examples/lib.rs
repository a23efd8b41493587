//! Example programs for spendflow; see `embed.rs` and `grpc_client.rs`.
