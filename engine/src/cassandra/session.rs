//! Connecting to Cassandra, shared by the sink, `serve --from cassandra` and `verify`.

use std::sync::Arc;
use std::time::Duration;

use cdrs_tokio::cluster::session::{Session, SessionBuilder, TcpSessionBuilder};
use cdrs_tokio::cluster::{NodeTcpConfigBuilder, TcpConnectionManager};
use cdrs_tokio::load_balancing::RoundRobinLoadBalancingStrategy;
use cdrs_tokio::retry::{ExponentialReconnectionPolicy, FallthroughRetryPolicy};
use cdrs_tokio::transport::TransportTcp;

use super::CassandraError;

/// A cdrs-tokio session over plain TCP with round-robin load balancing.
pub type CqlSession = Session<
    TransportTcp,
    TcpConnectionManager,
    RoundRobinLoadBalancingStrategy<TransportTcp, TcpConnectionManager>,
>;

/// How long one connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects to the nodes in `contact_points` (`HOST:PORT[,HOST:PORT...]`).
///
/// Requests are not retried by the driver ([`FallthroughRetryPolicy`]): callers retry with
/// their own capped backoff, which, unlike the driver's default policy, rides out an outage of
/// any length. Broken connections are re-established in the background with exponential
/// backoff.
///
/// # Errors
///
/// [`CassandraError::Connect`] (retriable) if no node answers in time, or the address list is
/// empty.
pub async fn connect(contact_points: &str) -> Result<Arc<CqlSession>, CassandraError> {
    let points: Vec<String> = contact_points
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if points.is_empty() {
        return Err(CassandraError::Config(
            "no Cassandra contact point given: use HOST:PORT, e.g. 127.0.0.1:9042".into(),
        ));
    }
    let connect_error = |message: String| CassandraError::Connect {
        contact_points: contact_points.to_string(),
        message,
    };
    let build = async {
        let config = NodeTcpConfigBuilder::new()
            .with_contact_points(points.into_iter().map(Into::into).collect())
            .build()
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        TcpSessionBuilder::new(RoundRobinLoadBalancingStrategy::new(), config)
            .with_retry_policy(Box::new(FallthroughRetryPolicy))
            .with_reconnection_policy(Arc::new(ExponentialReconnectionPolicy::new(
                Duration::from_millis(100),
                Duration::from_secs(2),
                usize::MAX,
            )))
            .build()
            .await
            .map_err(|e| connect_error(e.to_string()))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, build).await {
        Ok(session) => Ok(Arc::new(session?)),
        Err(_) => Err(connect_error(format!(
            "no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}
