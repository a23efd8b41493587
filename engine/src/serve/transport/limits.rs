//! gRPC limits that refuse instead of queueing: a concurrency limit per service (a call past it
//! answers `RESOURCE_EXHAUSTED` at once), and oversized request messages answered with
//! `RESOURCE_EXHAUSTED` (tonic's decoder says `OUT_OF_RANGE`, which gRPC reserves for reading
//! past the end of a range; every other gRPC implementation says `RESOURCE_EXHAUSTED`).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use tokio::sync::Semaphore;
use tonic::codegen::http;
use tower::{Layer, Service};

/// A [`ServiceLimit`] for every service.
#[derive(Clone, Debug)]
pub struct ServiceLimitLayer {
    limits: Arc<Limits>,
}

#[derive(Debug)]
struct Limits {
    /// Semaphore per limited service, by its full name (`spendflow.v1.Admin`).
    per_service: HashMap<&'static str, Arc<Semaphore>>,
    max: usize,
}

impl ServiceLimitLayer {
    /// At most `max` calls in progress to each of `services` (full names); calls to other
    /// services (health, reflection) are not limited.
    pub fn new(services: &[&'static str], max: usize) -> Self {
        let per_service = services
            .iter()
            .map(|s| (*s, Arc::new(Semaphore::new(max))))
            .collect();
        ServiceLimitLayer {
            limits: Arc::new(Limits { per_service, max }),
        }
    }
}

impl<S> Layer<S> for ServiceLimitLayer {
    type Service = ServiceLimit<S>;

    fn layer(&self, inner: S) -> ServiceLimit<S> {
        ServiceLimit {
            inner,
            limits: Arc::clone(&self.limits),
        }
    }
}

/// Refuses a call with `RESOURCE_EXHAUSTED` when its service already has the most calls in
/// progress it may have (until its answer is produced; a stream's messages after that are
/// bounded by the service itself, e.g. the cap on subscribers).
#[derive(Clone, Debug)]
pub struct ServiceLimit<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S, B> Service<http::Request<B>> for ServiceLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The path is `/package.Service/Method`.
        let service = request
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        let permit = match self.limits.per_service.get_key_value(service) {
            None => None,
            Some((name, semaphore)) => match Arc::clone(semaphore).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let status = tonic::Status::resource_exhausted(format!(
                        "{name} has {} calls in progress, the most it takes at once; try again shortly",
                        self.limits.max
                    ));
                    return std::future::ready(Ok(status.into_http())).boxed();
                }
            },
        };
        let answer = self.inner.call(request);
        async move {
            let answer = answer.await;
            drop(permit);
            answer
        }
        .boxed()
    }
}

/// Rewrites tonic's answer to a request message over the size limit (`OUT_OF_RANGE`, "decoded
/// message length too large") as `RESOURCE_EXHAUSTED` naming the limit. The answer to a request
/// that could not be decoded is a trailers-only response, so its status is in the headers.
pub fn oversized_as_resource_exhausted(
    mut response: http::Response<tonic::body::Body>,
    max_bytes: usize,
) -> http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == b"11");
    let too_large = headers.get("grpc-message").is_some_and(|m| {
        let m = m.as_bytes();
        m.windows(b"message%20length%20too%20large".len())
            .any(|w| w == b"message%20length%20too%20large")
            || m.windows(b"message length too large".len())
                .any(|w| w == b"message length too large")
    });
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        let message = format!("request%20message%20larger%20than%20{max_bytes}%20bytes");
        if let Ok(message) = http::HeaderValue::from_str(&message) {
            headers.insert("grpc-message", message);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_decoders_size_error_is_rewritten() {
        let oversized = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 70000 bytes, the limit is: 65536 bytes",
        )
        .into_http::<tonic::body::Body>();
        let rewritten = oversized_as_resource_exhausted(oversized, 65536);
        let status = tonic::Status::from_header_map(rewritten.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("65536"), "{status:?}");

        let other = tonic::Status::out_of_range("month 13 is past the range")
            .into_http::<tonic::body::Body>();
        let kept = oversized_as_resource_exhausted(other, 65536);
        let status = tonic::Status::from_header_map(kept.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
    }
}
