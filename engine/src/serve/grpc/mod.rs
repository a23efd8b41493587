//! The gRPC services: `spendflow.v1.ExpenseQuery`, `spendflow.v1.Alerts`, `spendflow.v1.Admin`,
//! `grpc.health.v1`, and
//! server reflection (v1 and v1alpha, so both current and older `grpcurl` can list and
//! describe everything without the `.proto` files).
//!
//! `ExpenseQuery` is written once over a [`backend::QueryBackend`]: the engine answers from its
//! read model ([`ReadModelBackend`]: handlers read the current snapshot and never wait on the
//! dataflow, except where a request asks for read-your-writes), and `spendflow serve --from
//! cassandra` answers from the Cassandra sink's tables (`crate::serve::cassandra`). The web
//! report answers through the same backends (`crate::serve::web`).
//!
//! [`serve_router`] runs on whatever tokio runtime polls it, with a trace span per call
//! (tower-http `TraceLayer`) and [`REQUEST_TIMEOUT`] per call (`Server::builder().timeout`;
//! it bounds producing an answer, not a subscription's stream).

mod admin;
mod alerts;
pub mod backend;
pub mod cluster;
pub(crate) mod convert;
mod memory;
mod personnel;
mod query;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use spendflow_proto::v1::admin_server::{Admin, AdminServer};
use spendflow_proto::v1::alerts_server::{Alerts, AlertsServer};
use spendflow_proto::v1::expense_query_server::{ExpenseQuery, ExpenseQueryServer};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tower_http::trace::TraceLayer;

pub use admin::AdminService;
pub use alerts::{ALERTS_UNIMPLEMENTED, AlertsService, AlertsUnimplemented};
pub use cluster::{ClusterAdmin, ClusterAlerts, ClusterQuery, Peers, PeersError};
#[cfg(test)]
pub(crate) use memory::category_totals;
pub use memory::{Clock, ReadModelBackend};
pub use personnel::PersonnelService;
pub use query::{QueryService, SubscriberGuard};

use crate::personnel::Personnel;
use crate::serve::auth::grpc::{intercept, intercept_requiring};
use crate::serve::auth::{Authenticator, Scope};
use crate::serve::read_model::ReadModel;
use crate::serve::status::StatusProbe;
use crate::serve::transport::{
    ConnectionCap, HEADER_READ_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_CONNECTION_AGE,
    ServiceLimitLayer, Transport, capped_incoming, oversized_as_resource_exhausted,
};

/// Largest request message accepted, in bytes. Requests are small; this bounds memory per call.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Subscriptions served at once; more get `RESOURCE_EXHAUSTED`.
pub const MAX_SUBSCRIBERS: usize = 256;

/// Longest time a call may take to produce its answer (`CANCELLED` after it; a client's
/// shorter `grpc-timeout` applies as well). Longer than the longest read-your-writes wait a
/// request may ask for ([`convert::MAX_WAIT`]), so such a wait ends with its own, clearer
/// status.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the routes of every service, ready to serve with [`serve_router`].
///
/// # Errors
///
/// A message if the reflection service could not be built from the descriptor sets.
pub async fn router(
    read_model: Arc<ReadModel>,
    status: StatusProbe,
    personnel: Option<Arc<Personnel>>,
    auth: Option<Arc<Authenticator>>,
) -> Result<Routes, GrpcError> {
    cluster_router(read_model, status, personnel, auth, None).await
}

/// [`router`] of one process of a cluster: with `peers`, every process answers every query
/// ([`cluster`]: calls about users another process owns are forwarded to it, calls over all
/// users are gathered from all processes as of one epoch, `Admin/GetStatus` lists every
/// process), and the read model keeps its [`cluster::KEPT_SNAPSHOTS`] newest snapshots for
/// that. Without `peers`, exactly [`router`].
///
/// # Errors
///
/// A message if the reflection service could not be built from the descriptor sets.
pub async fn cluster_router(
    read_model: Arc<ReadModel>,
    status: StatusProbe,
    personnel: Option<Arc<Personnel>>,
    auth: Option<Arc<Authenticator>>,
    peers: Option<Arc<Peers>>,
) -> Result<Routes, GrpcError> {
    let query = QueryService::over_read_model(Arc::clone(&read_model));
    let subscribers = query.subscriber_count();
    let alerts =
        AlertsService::new(Arc::clone(&read_model)).sharing_subscribers(Arc::clone(&subscribers));
    let engine = Arc::downgrade(&status.shared);
    let admin = AdminService::new(status);
    let (routes, health) = match peers {
        None => router_with(query, alerts, admin, auth.clone()).await?,
        Some(peers) => {
            read_model.keep_recent_snapshots(cluster::KEPT_SNAPSHOTS);
            let query = ClusterQuery::new(query, Arc::clone(&peers), Arc::clone(&read_model));
            let alerts = ClusterAlerts::new(alerts, Arc::clone(&peers), read_model, subscribers);
            let admin = ClusterAdmin::new(admin, peers);
            router_with(query, alerts, admin, auth.clone()).await?
        }
    };
    // Only the engine serves alerts (`serve --from cassandra` answers UNIMPLEMENTED, and its
    // health does not list them).
    health.set_serving::<AlertsServer<AlertsService>>().await;
    personnel::report_health(&health, personnel.is_some()).await;
    tokio::spawn(not_serving_once_failed(engine, health));
    let personnel = PersonnelService::new(personnel).server();
    Ok(routes.add_service(intercept(personnel, auth.as_ref())))
}

/// How often the health service looks whether the engine failed.
const FAILURE_POLL: Duration = Duration::from_millis(100);

/// Reports every service `NOT_SERVING` once the engine failed for good (a fenced sink, a lost
/// cluster peer): what it serves no longer advances. Ends with the engine.
async fn not_serving_once_failed(
    engine: std::sync::Weak<crate::pipeline::Shared>,
    health: tonic_health::server::HealthReporter,
) {
    loop {
        tokio::time::sleep(FAILURE_POLL).await;
        let Some(shared) = engine.upgrade() else {
            return;
        };
        if shared.fatal.lock().is_some() {
            for service in [
                "",
                "spendflow.v1.ExpenseQuery",
                "spendflow.v1.Admin",
                "spendflow.v1.Alerts",
                "spendflow.v1.Personnel",
            ] {
                health
                    .set_service_status(service, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            tracing::warn!("The engine failed: the health service reports NOT_SERVING.");
            return;
        }
    }
}

/// Builds routes serving `query`, `alerts` and `admin`, with health (`query` and `admin`
/// reported serving; the caller reports `alerts` if it really serves them) and
/// reflection (v1 and v1alpha). With `auth`, `query`, `alerts` and `admin` need a valid bearer
/// token ([`crate::serve::auth`]); health and reflection stay open. The health reporter is returned so a server can report
/// `NOT_SERVING` while its store is unreachable.
///
/// # Errors
///
/// A message if the reflection service could not be built from the descriptor sets.
pub async fn router_with<Q, L, A>(
    query: Q,
    alerts: L,
    admin: A,
    auth: Option<Arc<Authenticator>>,
) -> Result<(Routes, tonic_health::server::HealthReporter), GrpcError>
where
    Q: ExpenseQuery,
    L: Alerts,
    A: Admin,
{
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ExpenseQueryServer<Q>>().await;
    health_reporter.set_serving::<AdminServer<A>>().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(spendflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(spendflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let query = ExpenseQueryServer::new(query).max_decoding_message_size(MAX_REQUEST_BYTES);
    let alerts = AlertsServer::new(alerts).max_decoding_message_size(MAX_REQUEST_BYTES);
    let admin = AdminServer::new(admin).max_decoding_message_size(MAX_REQUEST_BYTES);
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(intercept(query, auth.as_ref()))
        .add_service(intercept(alerts, auth.as_ref()))
        .add_service(intercept_requiring(admin, auth.as_ref(), Scope::Admin));
    Ok((routes, health_reporter))
}

/// Serves every service on `listener` until `shutdown` completes, with `transport`'s TLS and
/// limits.
///
/// # Errors
///
/// A message if the server failed.
pub async fn serve(
    listener: TcpListener,
    read_model: Arc<ReadModel>,
    status: StatusProbe,
    personnel: Option<Arc<Personnel>>,
    transport: Transport,
    auth: Option<Arc<Authenticator>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    let peers = cluster_peers(&status, &transport)?;
    let router = cluster_router(read_model, status, personnel, auth, peers).await?;
    serve_router(listener, router, transport, shutdown).await
}

/// The peers of a cluster process (`status.shared.cluster`, with more than one process), called
/// with `transport`'s TLS; `None` for a single process. Must run inside a tokio runtime.
///
/// # Errors
///
/// [`PeersError`] for an unusable address in the cluster file.
pub fn cluster_peers(
    status: &StatusProbe,
    transport: &Transport,
) -> Result<Option<Arc<Peers>>, PeersError> {
    match &status.shared.cluster {
        Some(spec) if spec.processes.len() > 1 => Ok(Some(Arc::new(Peers::new(
            spec,
            status.shared.topology,
            transport.tls.as_deref(),
        )?))),
        _ => Ok(None),
    }
}

/// Serves `routes` on `listener` until `shutdown` completes, with a trace span and a timeout
/// ([`REQUEST_TIMEOUT`]) per call, and `transport`'s TLS and limits.
///
/// # Errors
///
/// A message if the server failed.
pub async fn serve_router(
    listener: TcpListener,
    routes: Routes,
    transport: Transport,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    serve_routes(listener, routes, transport, shutdown, REQUEST_TIMEOUT).await
}

/// The services whose calls count against the per-service concurrency limit (health and
/// reflection are not limited: they must answer while the others are busy).
const LIMITED_SERVICES: [&str; 4] = [
    "spendflow.v1.ExpenseQuery",
    "spendflow.v1.Alerts",
    "spendflow.v1.Admin",
    "spendflow.v1.Personnel",
];

async fn serve_routes(
    listener: TcpListener,
    routes: Routes,
    transport: Transport,
    shutdown: impl std::future::Future<Output = ()> + Send,
    timeout: Duration,
) -> Result<(), GrpcError> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let limits = &transport.limits;
    tracing::info!(
        addr = ?addr,
        tls = transport.tls.is_some(),
        mtls = transport.tls.as_ref().is_some_and(|t| t.requires_client_certificates()),
        max_connections = limits.max_connections,
        max_concurrent_requests = limits.max_concurrent_requests,
        "gRPC server listening."
    );
    // Small answers must not wait for Nagle's algorithm: without TCP_NODELAY a unary call can
    // take 40 ms on loopback (set by `capped_incoming`).
    // A connection that has not sent HTTP/2's 24-byte preface (or, with TLS, its first
    // handshake bytes) within HEADER_READ_TIMEOUT is closed: idle sockets do not keep a place
    // under the cap (the TLS handshake has the same bound from tonic).
    let incoming = capped_incoming(
        listener,
        ConnectionCap::new("grpc", limits.max_connections)
            .with_greeting_timeout(24, HEADER_READ_TIMEOUT),
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &transport.tls {
        builder = builder.tls_config(tls.grpc_config())?;
    }
    builder
        .timeout(timeout)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_connection_age(MAX_CONNECTION_AGE)
        .layer(TraceLayer::new_for_grpc().on_failure(log_failure))
        // Outside the limits and the oversized-message mapping: every answer is counted with the
        // code the client sees (RESOURCE_EXHAUSTED from a refused or oversized call included).
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(ServiceLimitLayer::new(
            &LIMITED_SERVICES,
            limits.max_concurrent_requests,
        ))
        .layer(tower::util::MapResponseLayer::new(
            |response: tonic::codegen::http::Response<tonic::body::Body>| {
                oversized_as_resource_exhausted(response, MAX_REQUEST_BYTES)
            },
        ))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Logs a call that did not end `OK`: at DEBUG when the client asked for something it may not
/// have or that is not there (a bad argument, an unknown user, a missing or insufficient token,
/// a cancelled call), which is the server working as it should; at WARN otherwise (internal
/// errors, unavailable stores, deadlines, refusals under load). tower-http's default logs every
/// one at ERROR, and ERROR here means data loss.
fn log_failure(
    failure: tower_http::classify::GrpcFailureClass,
    latency: Duration,
    _span: &tracing::Span,
) {
    use tonic::Code;
    use tower_http::classify::GrpcFailureClass;

    match failure {
        GrpcFailureClass::Status(status) => {
            let code = Code::from_i32(status.code_raw());
            let latency_ms = latency.as_millis();
            match code {
                Code::Cancelled
                | Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::Unauthenticated => {
                    tracing::debug!(?code, latency_ms, "gRPC call refused.");
                }
                _ => tracing::warn!(?code, latency_ms, "gRPC call failed."),
            }
        }
        other => {
            tracing::warn!(failure = %other, latency_ms = latency.as_millis(), "gRPC call failed.");
        }
    }
}

/// Why a gRPC server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The reflection service could not be built from the descriptor sets.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed (accepting connections, serving them).
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The cluster's peers could not be set up from the cluster file.
    #[error("gRPC peers: {0}")]
    Peers(#[from] PeersError),
}

#[cfg(test)]
mod tests {
    use spendflow_proto::v1 as pb;
    use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;

    use super::*;
    use crate::serve::grpc::backend::testing::Hanging;

    #[test]
    fn a_call_that_takes_too_long_is_cancelled_by_the_server() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = Routes::new(ExpenseQueryServer::new(QueryService::new(Hanging)));
        runtime.spawn(serve_routes(
            listener,
            routes,
            Transport::default(),
            std::future::pending(),
            Duration::from_millis(50),
        ));
        let status = runtime
            .block_on(async {
                let mut client = ExpenseQueryClient::connect(format!("http://{addr}")).await?;
                let call = client.top_spenders(pb::TopSpendersRequest {
                    limit: 1,
                    consistency: None,
                });
                // Bounded, so a missing server timeout fails instead of hanging.
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(answer) => Ok::<_, Box<dyn std::error::Error>>(answer.unwrap_err()),
                    Err(_) => panic!("the server never ended the call"),
                }
            })
            .unwrap();
        assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    }

    #[test]
    fn health_turns_not_serving_when_the_engine_fails() {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

        let runtime = tokio::runtime::Runtime::new().unwrap();
        let shared = Arc::new(crate::pipeline::Shared::new(
            1,
            crate::pipeline::EpochClock::starting_at(1, Duration::from_millis(10), 1000, None),
            Arc::new(crate::sink::dead_letter::DeadLetters::default()),
        ));
        let (read_model, _writer) = ReadModel::new();
        let status = StatusProbe {
            shared: Arc::clone(&shared),
            read_model: Arc::clone(&read_model),
        };
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = runtime
            .block_on(router(read_model, status, None, None))
            .unwrap();
        runtime.spawn(serve_routes(
            listener,
            routes,
            Transport::default(),
            std::future::pending(),
            Duration::from_secs(60),
        ));
        let check = |service: &str| {
            let service = service.to_string();
            runtime.block_on(async move {
                let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut client = HealthClient::new(channel);
                client
                    .check(HealthCheckRequest { service })
                    .await
                    .unwrap()
                    .into_inner()
                    .status()
            })
        };
        assert_eq!(check("spendflow.v1.ExpenseQuery"), ServingStatus::Serving);
        shared.fail("lost peer process 1".into());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while check("") != ServingStatus::NotServing {
            assert!(std::time::Instant::now() < deadline, "still SERVING");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            check("spendflow.v1.ExpenseQuery"),
            ServingStatus::NotServing
        );
        assert_eq!(check("spendflow.v1.Admin"), ServingStatus::NotServing);
    }

    #[test]
    fn calls_past_a_services_concurrency_limit_are_refused_at_once() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = Routes::new(ExpenseQueryServer::new(QueryService::new(Hanging)));
        let transport = Transport {
            limits: crate::config::LimitsConfig {
                max_concurrent_requests: 1,
                ..Default::default()
            },
            ..Transport::default()
        };
        runtime.spawn(serve_routes(
            listener,
            routes,
            transport,
            std::future::pending(),
            Duration::from_secs(600),
        ));
        let status = runtime.block_on(async {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let request = || pb::TopSpendersRequest {
                limit: 1,
                consistency: None,
            };
            // Calls kept open: once one of them has the one place it keeps it (the backend
            // never answers), and a call after that is refused at once. A probe that got the
            // place instead times out, is cancelled, and frees it for the next kept call.
            let mut kept = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let mut hold = ExpenseQueryClient::new(channel.clone());
                kept.push(tokio::spawn(
                    async move { hold.top_spenders(request()).await },
                ));
                let mut client = ExpenseQueryClient::new(channel.clone());
                let probe = client.top_spenders(request());
                if let Ok(answer) = tokio::time::timeout(Duration::from_secs(1), probe).await {
                    break answer.unwrap_err();
                }
                assert!(tokio::time::Instant::now() < deadline, "never refused");
            }
        });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("spendflow.v1.ExpenseQuery"),
            "{status:?}"
        );
    }
}
