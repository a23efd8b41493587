//! The flags of `run`, `demo` and `serve` that say who may reach the servers and how (TLS,
//! tokens, allowed hosts, limits), and where metrics are served.

use clap::Args;

use spendflow_engine::config::SecurityConfig;

/// Security flags shared by `run`, `demo` and `serve`.
#[derive(Debug, Default, Args)]
pub(crate) struct SecurityArgs {}

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
