//! How the gRPC and web servers meet the network: TLS (rustls, optionally requiring client
//! certificates), a cap on open connections, per-service concurrency limits, the timeouts of
//! both servers, and the web server's `Host` allow-list.
//!
//! [`Transport::load`] reads and checks the TLS files once, before anything is served, so a
//! missing file, a key that does not match its certificate or an empty CA file stops the start
//! with an error naming the file. The servers take a [`Transport`] and apply it:
//! `crate::serve::grpc::serve_router_with` (tonic's TLS, keep-alive and connection-age
//! settings, [`capped_incoming`], [`ServiceLimitLayer`], [`oversized_as_resource_exhausted`])
//! and `crate::serve::web::serve_with` (axum-server with rustls, hyper's header-read and
//! keep-alive timeouts, [`CapAcceptor`], tower's concurrency limit with load shedding, and
//! [`hosts`]).

mod caps;
#[cfg(feature = "web")]
pub mod hosts;
mod limits;
mod tls;

use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "web")]
pub use caps::CapAcceptor;
pub use caps::{Capped, ConnectionCap, capped_incoming};
pub use limits::{ServiceLimit, ServiceLimitLayer, oversized_as_resource_exhausted};
pub use tls::{LoadedTls, TlsError};

use crate::config::{LimitsConfig, SecurityConfig};

/// Longest time a client may take to send a request's headers (HTTP/1), or its first request
/// after connecting (web), or to finish the TLS handshake (both servers).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an idle HTTP/2 connection is pinged, and how long the answer may take before the
/// connection is closed (a peer that went away without closing).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A gRPC connection is asked to go away (`GOAWAY`; calls in progress, subscriptions included,
/// finish) after this long, so connections that never send anything do not hold a place under
/// the connection cap for ever. Clients reconnect transparently.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(10 * 60);

/// Everything a server needs to apply the transport settings: the loaded TLS configuration (if
/// any), the limits and the web server's allowed hosts.
#[derive(Clone, Debug, Default)]
pub struct Transport {
    /// Loaded and checked TLS material; `None`: plain text.
    pub tls: Option<Arc<LoadedTls>>,
    /// Connection caps and concurrency limits.
    pub limits: LimitsConfig,
    /// The web server's allowed `Host` names; `None`: the defaults ([`hosts::AllowedHosts`]).
    pub web_allowed_hosts: Option<Vec<String>>,
}

impl Transport {
    /// Reads and checks what `config` names (the TLS files).
    ///
    /// # Errors
    ///
    /// [`TlsError`] naming the file and what is wrong with it.
    pub fn load(config: &SecurityConfig) -> Result<Transport, TlsError> {
        let tls = config
            .tls
            .as_ref()
            .map(LoadedTls::load)
            .transpose()?
            .map(Arc::new);
        Ok(Transport {
            tls,
            limits: config.limits.clone(),
            web_allowed_hosts: config.web_allowed_hosts.clone(),
        })
    }

    /// `https` with TLS, else `http`: for addresses shown to people.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}
