//! The gRPC services: `spendflow.v1.ExpenseQuery`, `spendflow.v1.Admin`, `grpc.health.v1`, and
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
pub mod backend;
pub(crate) mod convert;
mod memory;
mod personnel;
mod query;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use spendflow_proto::v1::admin_server::{Admin, AdminServer};
use spendflow_proto::v1::expense_query_server::{ExpenseQuery, ExpenseQueryServer};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tower_http::trace::TraceLayer;

pub use admin::AdminService;
pub use memory::ReadModelBackend;
#[cfg(test)]
pub(crate) use memory::category_totals;
pub use personnel::PersonnelService;
pub use query::{QueryService, SubscriberGuard};

use crate::personnel::Personnel;
use crate::serve::auth::grpc::{intercept, intercept_requiring};
use crate::serve::auth::{Authenticator, Scope};
use crate::serve::read_model::ReadModel;
use crate::serve::status::StatusProbe;

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
    let query = QueryService::over_read_model(read_model);
    let (routes, health) = router_with(query, AdminService::new(status), auth.clone()).await?;
    personnel::report_health(&health, personnel.is_some()).await;
    let personnel = PersonnelService::new(personnel).server();
    Ok(routes.add_service(intercept(personnel, auth.as_ref())))
}

/// Builds routes serving `query` and `admin`, with health (both reported serving) and
/// reflection (v1 and v1alpha). With `auth`, `query` and `admin` need a valid bearer token
/// ([`crate::serve::auth`]); health and reflection stay open. The health reporter is returned so a server can report
/// `NOT_SERVING` while its store is unreachable.
///
/// # Errors
///
/// A message if the reflection service could not be built from the descriptor sets.
pub async fn router_with<Q, A>(
    query: Q,
    admin: A,
    auth: Option<Arc<Authenticator>>,
) -> Result<(Routes, tonic_health::server::HealthReporter), GrpcError>
where
    Q: ExpenseQuery,
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
    let admin = AdminServer::new(admin).max_decoding_message_size(MAX_REQUEST_BYTES);
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(intercept(query, auth.as_ref()))
        .add_service(intercept_requiring(admin, auth.as_ref(), Scope::Admin));
    Ok((routes, health_reporter))
}

/// Serves every service on `listener` until `shutdown` completes.
///
/// # Errors
///
/// A message if the server failed.
pub async fn serve(
    listener: TcpListener,
    read_model: Arc<ReadModel>,
    status: StatusProbe,
    personnel: Option<Arc<Personnel>>,
    auth: Option<Arc<Authenticator>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    let router = router(read_model, status, personnel, auth).await?;
    serve_router(listener, router, shutdown).await
}

/// Serves `routes` on `listener` until `shutdown` completes, with a trace span and a timeout
/// ([`REQUEST_TIMEOUT`]) per call.
///
/// # Errors
///
/// A message if the server failed.
pub async fn serve_router(
    listener: TcpListener,
    routes: Routes,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), GrpcError> {
    serve_routes(listener, routes, shutdown, REQUEST_TIMEOUT).await
}

async fn serve_routes(
    listener: TcpListener,
    routes: Routes,
    shutdown: impl std::future::Future<Output = ()> + Send,
    timeout: Duration,
) -> Result<(), GrpcError> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "gRPC server listening.");
    // Small answers must not wait for Nagle's algorithm: without TCP_NODELAY a unary call can
    // take 40 ms on loopback.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .timeout(timeout)
        .layer(TraceLayer::new_for_grpc())
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
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
}
