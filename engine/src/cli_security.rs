//! The flags of `run`, `demo` and `serve` that say who may reach the servers and how (TLS,
//! tokens, allowed hosts, limits), and where metrics are served.

use std::path::PathBuf;

use clap::Args;

use spendflow_engine::config::SecurityConfig;

/// Security flags shared by `run`, `demo` and `serve`.
#[derive(Debug, Default, Args)]
pub(crate) struct SecurityArgs {
    // --- auth ---
    /// Token auth with HS256: every gRPC call and web request needs `authorization: Bearer
    /// <JWT>` (or the web sign-in cookie) signed with the secret in FILE (at least 32 bytes).
    /// Mint a development token with `spendflow token`.
    #[arg(long, value_name = "FILE", conflicts_with = "jwt_public_key")]
    pub(crate) jwt_secret_file: Option<PathBuf>,
    /// Token auth with RS256 or ES256: tokens are verified with the issuer's PEM public key.
    #[arg(long, value_name = "PEM")]
    pub(crate) jwt_public_key: Option<PathBuf>,
    /// Serve without token auth on an address other than loopback (anyone who can reach it
    /// reads every user's data). Without it such an address is refused.
    #[arg(long)]
    pub(crate) insecure_no_auth: bool,
}

impl SecurityArgs {
    /// The servers' security settings these flags describe.
    pub(crate) fn config(&self) -> anyhow::Result<SecurityConfig> {
        Ok(SecurityConfig {
            // --- auth ---
            jwt_secret_file: self.jwt_secret_file.clone(),
            jwt_public_key: self.jwt_public_key.clone(),
            insecure_no_auth: self.insecure_no_auth,
        })
    }

    /// True when none of these flags was given (a config file's `[security]` then applies).
    pub(crate) fn is_empty(&self) -> bool {
        // --- auth ---
        self.jwt_secret_file.is_none() && self.jwt_public_key.is_none() && !self.insecure_no_auth
    }
}
