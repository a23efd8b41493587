//! A tower layer on the gRPC server that counts calls by method and status code and times them
//! (`spendflow_grpc_requests_total`, `spendflow_grpc_request_duration_seconds`).
//!
//! The status is read from the response headers: an error answer is "trailers-only", so its
//! `grpc-status` is there; a call answered normally has it only in the trailers, and no
//! `grpc-status` in the headers means `OK` (a stream that fails after it started counts as
//! `OK`: it was opened). A call whose future is dropped before it answered (the client went
//! away, or the server's request timeout ended it) counts as `CANCELLED`. The time is from the
//! request's arrival to the response headers: for a stream, until it is open.
//!
//! Method labels are bounded: paths that are not a well-formed `/package.Service/Method`, and
//! calls answered `UNIMPLEMENTED` (unknown services and methods), are labelled `unknown`, so
//! random paths cannot grow the number of series.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;

use super::names;

/// Counts and times every gRPC call; add it with `Server::builder().layer(GrpcMetricsLayer)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut call = Call {
            method: method_label(request.uri().path()),
            started: Instant::now(),
            recorded: false,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            let code = match &answer {
                Ok(response) => status_code(response.headers()),
                Err(_) => tonic::Code::Unknown,
            };
            call.record(code);
            answer
        })
    }
}

/// One call being answered; records itself as `CANCELLED` if dropped unanswered.
struct Call {
    method: String,
    started: Instant,
    recorded: bool,
}

impl Call {
    fn record(&mut self, code: tonic::Code) {
        self.recorded = true;
        let method = if code == tonic::Code::Unimplemented {
            UNKNOWN.to_string()
        } else {
            std::mem::take(&mut self.method)
        };
        let seconds = self.started.elapsed().as_secs_f64();
        ::metrics::histogram!(names::GRPC_DURATION, "method" => method.clone()).record(seconds);
        ::metrics::counter!(names::GRPC_REQUESTS, "method" => method, "code" => code_name(code))
            .increment(1);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(tonic::Code::Cancelled);
        }
    }
}

/// The label of calls to paths that name no method.
const UNKNOWN: &str = "unknown";

/// The longest method label kept (longer paths are `unknown`).
const MAX_METHOD_LEN: usize = 128;

/// `/package.Service/Method` as it is; anything else `unknown`.
fn method_label(path: &str) -> String {
    let well_formed = path.len() <= MAX_METHOD_LEN
        && path.strip_prefix('/').is_some_and(|rest| {
            rest.split_once('/').is_some_and(|(service, method)| {
                !service.is_empty()
                    && !method.is_empty()
                    && service
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                    && method
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        });
    if well_formed {
        path.to_string()
    } else {
        UNKNOWN.to_string()
    }
}

/// The code in the response headers' `grpc-status`; `OK` without one.
fn status_code(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

/// The code's name as the gRPC specification writes it (`NOT_FOUND`).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(all(test, feature = "web"))]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer, Service};

    use super::*;

    /// A service that answers with `status` in the headers (or none), or never answers.
    #[derive(Clone)]
    struct Answer(Option<Option<i32>>);

    impl Service<http::Request<()>> for Answer {
        type Response = http::Response<()>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<http::Response<()>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let answer = self.0;
            Box::pin(async move {
                let Some(status) = answer else {
                    return std::future::pending().await;
                };
                let mut response = http::Response::new(());
                if let Some(status) = status {
                    response
                        .headers_mut()
                        .insert("grpc-status", status.to_string().parse().unwrap());
                }
                Ok(response)
            })
        }
    }

    /// The value of `name{labels}` in the rendered metrics (0 when absent).
    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    fn call(runtime: &tokio::runtime::Runtime, answer: Option<Option<i32>>, path: &str) {
        let mut service = GrpcMetricsLayer.layer(Answer(answer));
        let request = http::Request::builder().uri(path).body(()).unwrap();
        let future = service.call(request);
        if answer.is_some() {
            runtime.block_on(future).unwrap();
        } else {
            // Never answered: dropped, as the server's timeout or a client that left does.
            drop(future);
        }
    }

    #[test]
    fn calls_are_counted_by_method_and_code_and_timed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handle = crate::metrics::exporter::handle();
        // A method name of this test alone: other tests record through the same recorder.
        let method = "/spendflow.test.LayerTest/Call";
        let series = |code: &str| {
            format!("spendflow_grpc_requests_total{{method=\"{method}\",code=\"{code}\"}}")
        };
        let before = handle.render();
        call(&runtime, Some(None), method);
        call(&runtime, Some(None), method);
        call(&runtime, Some(Some(5)), method);
        call(&runtime, None, method);
        call(&runtime, Some(Some(12)), "/no.Such/Thing");
        call(&runtime, Some(Some(12)), "/../../etc/passwd");
        let after = handle.render();
        let delta = |code: &str| sample(&after, &series(code)) - sample(&before, &series(code));
        assert_eq!(delta("OK"), 2.0, "{after}");
        assert_eq!(delta("NOT_FOUND"), 1.0, "{after}");
        assert_eq!(delta("CANCELLED"), 1.0, "{after}");
        assert!(!after.contains("/no.Such/Thing"), "{after}");
        assert!(!after.contains("passwd"), "{after}");
        assert!(
            sample(
                &after,
                "spendflow_grpc_requests_total{method=\"unknown\",code=\"UNIMPLEMENTED\"}"
            ) >= 2.0,
            "{after}"
        );
        let count = format!("spendflow_grpc_request_duration_seconds_count{{method=\"{method}\"}}");
        assert_eq!(
            sample(&after, &count) - sample(&before, &count),
            4.0,
            "{after}"
        );
    }

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_label("/spendflow.v1.Admin/GetStatus"),
            "/spendflow.v1.Admin/GetStatus"
        );
        assert_eq!(method_label("/spendflow.v1.Admin/"), UNKNOWN);
        assert_eq!(method_label("/a/b/c"), UNKNOWN);
        assert_eq!(method_label("/a b/c"), UNKNOWN);
        assert_eq!(method_label(&format!("/a.B/{}", "x".repeat(200))), UNKNOWN);
    }
}
