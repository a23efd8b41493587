//! The flags of `run`, `demo` and `serve` that say who may reach the servers and how (TLS,
//! tokens, allowed hosts, limits), and where metrics are served.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use spendflow_engine::config::{LimitsConfig, SecurityConfig, TlsConfig};

/// Security flags shared by `run`, `demo` and `serve`.
#[derive(Debug, Default, Args)]
pub(crate) struct SecurityArgs {
    // --- transport ---
    /// Serve gRPC and the web report over TLS with this certificate chain (PEM, leaf first;
    /// with --tls-key). Clients then use https:// and `grpcurl -cacert CA.pem`.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Also require client certificates signed by a CA in this file (mTLS); clients without
    /// one are refused. Needs --tls-cert and --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// The host names (comma-separated, without port) the web report answers; requests for
    /// any other `Host` get 421 (protection against DNS rebinding). Default: the bound
    /// address, localhost and 127.0.0.1.
    #[arg(long, value_name = "HOST[,HOST...]", value_delimiter = ',')]
    pub(crate) web_allowed_hosts: Option<Vec<String>>,
    /// Open connections per server (gRPC and web each); connections past it are closed when
    /// accepted [default: 1024].
    #[arg(long, value_name = "N")]
    pub(crate) max_connections: Option<usize>,
    // --- metrics ---
    /// Serve Prometheus metrics (`GET /metrics`, nothing else) on this address of their own, e.g.
    /// an internal one (port 0 picks a free port). The web port serves `/metrics` as well.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<SocketAddr>,
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
        let mut config = SecurityConfig::default();
        // --- transport ---
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls = Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            });
        }
        config.web_allowed_hosts = self.web_allowed_hosts.clone();
        config.limits = LimitsConfig {
            max_connections: self
                .max_connections
                .unwrap_or(LimitsConfig::default().max_connections),
            ..LimitsConfig::default()
        };
        // --- auth ---
        config.jwt_secret_file = self.jwt_secret_file.clone();
        config.jwt_public_key = self.jwt_public_key.clone();
        config.insecure_no_auth = self.insecure_no_auth;
        Ok(config)
    }

    /// True when none of these flags was given (a config file's `[security]` then applies).
    pub(crate) fn is_empty(&self) -> bool {
        // --- transport ---
        self.tls_cert.is_none()
            && self.tls_key.is_none()
            && self.tls_client_ca.is_none()
            && self.web_allowed_hosts.is_none()
            && self.max_connections.is_none()
            // --- auth ---
            && self.jwt_secret_file.is_none()
            && self.jwt_public_key.is_none()
            && !self.insecure_no_auth
    }
}
