//! Connecting to Cassandra, shared by the sink, `serve --from cassandra` and `verify`: plain
//! TCP or TLS (rustls, verifying the nodes against a CA the user names), with or without a
//! username and password (Cassandra's `PasswordAuthenticator`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cdrs_tokio::authenticators::{
    NoneAuthenticatorProvider, SaslAuthenticatorProvider, StaticPasswordAuthenticatorProvider,
};
use cdrs_tokio::cluster::session::{
    RustlsSessionBuilder, Session, SessionBuilder, TcpSessionBuilder,
};
use cdrs_tokio::cluster::{
    NodeRustlsConfigBuilder, NodeTcpConfigBuilder, RustlsConnectionManager, TcpConnectionManager,
};
use cdrs_tokio::frame::Envelope;
use cdrs_tokio::load_balancing::RoundRobinLoadBalancingStrategy;
use cdrs_tokio::query::{PreparedQuery, QueryBatch, QueryValues};
use cdrs_tokio::retry::{ExponentialReconnectionPolicy, FallthroughRetryPolicy};
use cdrs_tokio::statement::StatementParams;
use cdrs_tokio::transport::{TransportRustls, TransportTcp};
use serde::Deserialize;

use super::CassandraError;

type TcpSession = Session<
    TransportTcp,
    TcpConnectionManager,
    RoundRobinLoadBalancingStrategy<TransportTcp, TcpConnectionManager>,
>;

type TlsSession = Session<
    TransportRustls,
    RustlsConnectionManager,
    RoundRobinLoadBalancingStrategy<TransportRustls, RustlsConnectionManager>,
>;

/// A cdrs-tokio session with round-robin load balancing, over plain TCP or TLS. The requests
/// spendflow makes are methods here, so callers never care which.
pub enum CqlSession {
    /// Plain TCP.
    Tcp(TcpSession),
    /// TLS (rustls).
    Tls(TlsSession),
}

impl std::fmt::Debug for CqlSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CqlSession::Tcp(_) => "CqlSession::Tcp",
            CqlSession::Tls(_) => "CqlSession::Tls",
        })
    }
}

impl CqlSession {
    /// Runs `query` without values.
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn query(&self, query: impl ToString) -> cdrs_tokio::error::Result<Envelope> {
        match self {
            CqlSession::Tcp(s) => s.query(query).await,
            CqlSession::Tls(s) => s.query(query).await,
        }
    }

    /// Runs `query` with `values`.
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn query_with_values(
        &self,
        query: impl ToString,
        values: impl Into<QueryValues>,
    ) -> cdrs_tokio::error::Result<Envelope> {
        match self {
            CqlSession::Tcp(s) => s.query_with_values(query, values).await,
            CqlSession::Tls(s) => s.query_with_values(query, values).await,
        }
    }

    /// Runs `query` with `params` (values, consistency, paging).
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn query_with_params(
        &self,
        query: impl ToString,
        params: StatementParams,
    ) -> cdrs_tokio::error::Result<Envelope> {
        match self {
            CqlSession::Tcp(s) => s.query_with_params(query, params).await,
            CqlSession::Tls(s) => s.query_with_params(query, params).await,
        }
    }

    /// Prepares `query`.
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn prepare(&self, query: impl ToString) -> cdrs_tokio::error::Result<PreparedQuery> {
        match self {
            CqlSession::Tcp(s) => s.prepare(query).await,
            CqlSession::Tls(s) => s.prepare(query).await,
        }
    }

    /// Runs a batch.
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn batch(&self, batch: QueryBatch) -> cdrs_tokio::error::Result<Envelope> {
        match self {
            CqlSession::Tcp(s) => s.batch(batch).await,
            CqlSession::Tls(s) => s.batch(batch).await,
        }
    }

    /// Runs a prepared statement with `params`.
    ///
    /// # Errors
    ///
    /// The driver's error.
    pub async fn exec_with_params(
        &self,
        prepared: &PreparedQuery,
        params: &StatementParams,
    ) -> cdrs_tokio::error::Result<Envelope> {
        match self {
            CqlSession::Tcp(s) => s.exec_with_params(prepared, params).await,
            CqlSession::Tls(s) => s.exec_with_params(prepared, params).await,
        }
    }
}

/// How spendflow proves itself to Cassandra and checks the nodes: a username and password
/// (`PasswordAuthenticator`), and TLS verified against a CA. Off by default (plain TCP, no
/// credentials: the services kit's single node).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CassandraClientSecurity {
    /// The username; needs `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// A file whose first line is the password (kept off the command line and out of config
    /// files).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) the nodes' certificates must chain to; turns TLS on.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// The name the nodes' certificates must be valid for (default: the first contact point's
    /// host, name or IP address).
    #[serde(default)]
    pub tls_server_name: Option<String>,
}

impl CassandraClientSecurity {
    fn authenticator(
        &self,
    ) -> Result<Arc<dyn SaslAuthenticatorProvider + Send + Sync>, CassandraError> {
        match (&self.username, &self.password_file) {
            (None, None) => Ok(Arc::new(NoneAuthenticatorProvider)),
            (Some(user), Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    CassandraError::Config(format!(
                        "the Cassandra password file {}: {e}",
                        file.display()
                    ))
                })?;
                let password = text.lines().next().unwrap_or_default().to_string();
                if password.is_empty() {
                    return Err(CassandraError::Config(format!(
                        "the Cassandra password file {} is empty",
                        file.display()
                    )));
                }
                Ok(Arc::new(StaticPasswordAuthenticatorProvider::new(
                    user.clone(),
                    password,
                )))
            }
            (Some(_), None) => Err(CassandraError::Config(
                "a Cassandra username needs a password file (--cassandra-password-file)".into(),
            )),
            (None, Some(_)) => Err(CassandraError::Config(
                "a Cassandra password file needs a username (--cassandra-user)".into(),
            )),
        }
    }

    fn tls(
        &self,
        first_point: &str,
    ) -> Result<
        Option<(
            rustls::pki_types::ServerName<'static>,
            Arc<rustls::ClientConfig>,
        )>,
        CassandraError,
    > {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};

        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let bad = |message: String| CassandraError::Config(message);
        let mut roots = rustls::RootCertStore::empty();
        let certificates = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(format!("the Cassandra CA file {}: {e}", ca.display())))?;
        if certificates.is_empty() {
            return Err(bad(format!(
                "the Cassandra CA file {} holds no certificate",
                ca.display()
            )));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| bad(format!("the Cassandra CA file {}: {e}", ca.display())))?;
        }
        let name = match &self.tls_server_name {
            Some(name) => name.clone(),
            None => host_of(first_point).to_string(),
        };
        let name = ServerName::try_from(name.clone()).map_err(|e| {
            bad(format!(
                "{name:?} is not a name a certificate can be checked against: {e}"
            ))
        })?;
        // ring, like the servers' TLS (tonic's `tls-ring`): no C toolchain beyond cc. rustls
        // 0.23.48 deprecates it for lacking post-quantum key exchange, which aws-lc-rs has;
        // moving every TLS user to aws-lc-rs together is the way out of this `allow`.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some((name, Arc::new(config))))
    }
}

/// The host of `HOST:PORT` or `[V6]:PORT`.
fn host_of(point: &str) -> &str {
    let host = point.rsplit_once(':').map_or(point, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// How long one connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects to the nodes in `contact_points` (`HOST:PORT[,HOST:PORT...]`) over plain TCP
/// without credentials; see [`connect_with`].
///
/// # Errors
///
/// As [`connect_with`].
pub async fn connect(contact_points: &str) -> Result<Arc<CqlSession>, CassandraError> {
    connect_with(contact_points, &CassandraClientSecurity::default()).await
}

/// Connects to the nodes in `contact_points` (`HOST:PORT[,HOST:PORT...]`), with the
/// credentials and TLS settings of `security`.
///
/// Requests are not retried by the driver ([`FallthroughRetryPolicy`]): callers retry with
/// their own capped backoff, which, unlike the driver's default policy, rides out an outage of
/// any length. Broken connections are re-established in the background with exponential
/// backoff.
///
/// # Errors
///
/// [`CassandraError::Connect`] (retriable) if no node answers in time;
/// [`CassandraError::Config`] for an empty address list or unusable security settings.
pub async fn connect_with(
    contact_points: &str,
    security: &CassandraClientSecurity,
) -> Result<Arc<CqlSession>, CassandraError> {
    let points: Vec<String> = contact_points
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let Some(first) = points.first().cloned() else {
        return Err(CassandraError::Config(
            "no Cassandra contact point given: use HOST:PORT, e.g. 127.0.0.1:9042".into(),
        ));
    };
    let authenticator = security.authenticator()?;
    let tls = security.tls(&first)?;
    let connect_error = |message: String| CassandraError::Connect {
        contact_points: contact_points.to_string(),
        message,
    };
    let reconnection = || {
        Arc::new(ExponentialReconnectionPolicy::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            usize::MAX,
        ))
    };
    let addresses = points.into_iter().map(Into::into).collect();
    let build = async {
        match tls {
            None => {
                let config = NodeTcpConfigBuilder::new()
                    .with_contact_points(addresses)
                    .with_authenticator_provider(authenticator)
                    .build()
                    .await
                    .map_err(|e| connect_error(e.to_string()))?;
                TcpSessionBuilder::new(RoundRobinLoadBalancingStrategy::new(), config)
                    .with_retry_policy(Box::new(FallthroughRetryPolicy))
                    .with_reconnection_policy(reconnection())
                    .build()
                    .await
                    .map(CqlSession::Tcp)
                    .map_err(|e| connect_error(e.to_string()))
            }
            Some((name, tls)) => {
                let config = NodeRustlsConfigBuilder::new(name, tls)
                    .with_contact_points(addresses)
                    .with_authenticator_provider(authenticator)
                    .build()
                    .await
                    .map_err(|e| connect_error(e.to_string()))?;
                RustlsSessionBuilder::new(RoundRobinLoadBalancingStrategy::new(), config)
                    .with_retry_policy(Box::new(FallthroughRetryPolicy))
                    .with_reconnection_policy(reconnection())
                    .build()
                    .await
                    .map(CqlSession::Tls)
                    .map_err(|e| connect_error(e.to_string()))
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, build).await {
        Ok(session) => Ok(Arc::new(session?)),
        Err(_) => Err(connect_error(format!(
            "no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_in_pairs_and_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let user_only = CassandraClientSecurity {
            username: Some("alice".into()),
            ..Default::default()
        };
        assert!(user_only.authenticator().is_err());
        let file = dir.path().join("password");
        let both = CassandraClientSecurity {
            username: Some("alice".into()),
            password_file: Some(file.clone()),
            ..Default::default()
        };
        let missing = both.authenticator().err().unwrap().to_string();
        assert!(missing.contains("password file"), "{missing}");
        std::fs::write(&file, "\n").unwrap();
        assert!(both.authenticator().is_err(), "an empty password");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert!(both.authenticator().is_ok());
    }

    #[test]
    fn tls_needs_a_readable_ca_and_checks_the_contact_points_host() {
        let dir = tempfile::tempdir().unwrap();
        let none = CassandraClientSecurity::default();
        assert!(none.tls("127.0.0.1:9042").unwrap().is_none());
        let ca = dir.path().join("ca.pem");
        let with_ca = CassandraClientSecurity {
            tls_ca: Some(ca.clone()),
            ..Default::default()
        };
        assert!(with_ca.tls("127.0.0.1:9042").is_err(), "a missing file");
        std::fs::write(&ca, "not a certificate").unwrap();
        let error = with_ca.tls("127.0.0.1:9042").err().unwrap().to_string();
        assert!(error.contains("no certificate"), "{error}");
        assert_eq!(host_of("[::1]:9042"), "::1");
        assert_eq!(host_of("db.example:9042"), "db.example");
    }
}
