//! Checks of what every spendflow gRPC server offers besides its own services (the engine's and
//! `serve --from cassandra`'s alike): server reflection and the standard health service.

use spendflow_proto::v1 as pb;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1, v1alpha};

/// A channel to the gRPC server at `addr` (connected: fails here when nothing listens).
pub fn connect(runtime: &tokio::runtime::Runtime, addr: std::net::SocketAddr) -> Channel {
    runtime
        .block_on(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect(),
        )
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// `ExpenseQuery/GetUserSummary` for `user_id`, waiting as `consistency` says.
pub fn summary(
    runtime: &tokio::runtime::Runtime,
    channel: &Channel,
    user_id: u64,
    consistency: Option<pb::Consistency>,
) -> Result<pb::GetUserSummaryResponse, tonic::Status> {
    runtime
        .block_on(ExpenseQueryClient::new(channel.clone()).get_user_summary(
            pb::GetUserSummaryRequest {
                user_id,
                consistency,
            },
        ))
        .map(tonic::Response::into_inner)
}

/// The services every spendflow gRPC server lists by reflection.
pub const SERVICES: [&str; 3] = [
    "spendflow.v1.ExpenseQuery",
    "spendflow.v1.Admin",
    "grpc.health.v1.Health",
];

/// The service names reflection (v1) lists on `channel`.
pub fn reflected_services(runtime: &tokio::runtime::Runtime, channel: &Channel) -> Vec<String> {
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut responses = runtime
        .block_on(reflection.server_reflection_info(tokio_stream::iter(vec![request])))
        .unwrap()
        .into_inner();
    let response = runtime.block_on(responses.message()).unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("a service list")
    };
    list.service.into_iter().map(|s| s.name).collect()
}

/// Reflection (v1) lists spendflow's services and the health service.
#[track_caller]
pub fn assert_reflection_lists_services(runtime: &tokio::runtime::Runtime, channel: &Channel) {
    let names = reflected_services(runtime, channel);
    for expected in SERVICES {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

/// The older reflection protocol (v1alpha, which some tools still speak) answers a service
/// list too.
#[track_caller]
pub fn assert_reflection_v1alpha_answers(runtime: &tokio::runtime::Runtime, channel: &Channel) {
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut reflection =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut responses = runtime
        .block_on(reflection.server_reflection_info(tokio_stream::iter(vec![request])))
        .unwrap()
        .into_inner();
    let response = runtime.block_on(responses.message()).unwrap().unwrap();
    assert!(matches!(
        response.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(_))
    ));
}

/// What the health service says about `service`.
pub fn health(
    runtime: &tokio::runtime::Runtime,
    channel: &Channel,
    service: &str,
) -> ServingStatus {
    runtime
        .block_on(
            HealthClient::new(channel.clone()).check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            }),
        )
        .unwrap()
        .into_inner()
        .status()
}
