//! The web server answers only the `Host` names it is told to (`--web-allowed-hosts`; by
//! default the bound address, `localhost` and `127.0.0.1`). A page on another site whose name
//! an attacker points at 127.0.0.1 (DNS rebinding) sends its own name as `Host`, and gets
//! `421 Misdirected Request` instead of users' spending.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The host names (lowercase, without port) the web server answers.
#[derive(Clone, Debug)]
pub struct AllowedHosts {
    names: Arc<Vec<String>>,
}

impl AllowedHosts {
    /// `configured`, or by default the IP of `bound` (unless it is the unspecified address),
    /// `localhost` and `127.0.0.1`.
    pub fn new(configured: Option<&[String]>, bound: Option<SocketAddr>) -> Self {
        let names = match configured {
            Some(names) => names.iter().map(|n| normalize(n)).collect(),
            None => {
                let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
                if let Some(addr) = bound
                    && !addr.ip().is_unspecified()
                {
                    names.push(addr.ip().to_string());
                }
                names
            }
        };
        AllowedHosts {
            names: Arc::new(names),
        }
    }

    /// True when `host` (a `Host` header or URI authority, with or without port) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        let name = normalize(host);
        self.names.contains(&name)
    }
}

/// `host` lowercased, without a port and without the brackets of an IPv6 literal.
fn normalize(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or_default()
    } else {
        // No port, or a bare IPv6 address.
        host
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Middleware: `421` with a JSON error unless the request's host is allowed. The host is the
/// URI's authority (HTTP/2's `:authority`) or else the `Host` header; a request with neither is
/// refused too.
pub async fn check_host(
    State(allowed): State<AllowedHosts>,
    request: Request,
    next: Next,
) -> Response {
    let host = request.uri().host().map(str::to_string).or_else(|| {
        request
            .headers()
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    });
    match host {
        Some(host) if allowed.allows(&host) => next.run(request).await,
        host => {
            let shown = host.unwrap_or_default();
            tracing::debug!(host = %shown, "Request for a host that is not allowed.");
            (
                StatusCode::MISDIRECTED_REQUEST,
                axum::Json(serde_json::json!({
                    "error": format!(
                        "this server does not answer for host {shown:?}; allow it with --web-allowed-hosts"
                    ),
                })),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_compared_without_port_or_case() {
        let allowed = AllowedHosts::new(None, Some("10.1.2.3:8080".parse().unwrap()));
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1:9",
            "10.1.2.3",
            "10.1.2.3:8080",
        ] {
            assert!(allowed.allows(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.2",
            "",
            "[::1]",
        ] {
            assert!(!allowed.allows(refused), "{refused}");
        }
        let any = AllowedHosts::new(None, Some("0.0.0.0:8080".parse().unwrap()));
        assert!(!any.allows("0.0.0.0"));

        let configured = AllowedHosts::new(
            Some(&["Report.Example".to_string(), "::1".to_string()]),
            None,
        );
        assert!(configured.allows("report.example:443"));
        assert!(configured.allows("[::1]:8080"));
        assert!(!configured.allows("localhost"));
    }
}
