//! The Prometheus side: the process-global recorder (`metrics-exporter-prometheus`, without
//! its own HTTP listener), the `GET /metrics` handler the web report mounts, and the server
//! of `--metrics ADDR`, which answers `/metrics` alone.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::EngineError;

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often histograms are drained into their buckets when nobody scrapes (bounds the memory
/// of values recorded between scrapes).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Latency buckets in seconds, for every `_seconds` histogram: 1 ms to 60 s.
const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// The handle that renders this process's metrics. The first call installs the Prometheus
/// recorder as the process's global recorder (once: several engines in one process share it)
/// and starts its upkeep thread. If the embedding program installed a recorder of its own
/// first, that one keeps receiving the engine's metrics (a warning says so) and this handle
/// renders nothing.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .expect("the buckets are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        match ::metrics::set_global_recorder(recorder) {
            Ok(()) => super::describe(),
            Err(e) => tracing::warn!(
                error = %e,
                "A metrics recorder is installed already; the engine records into it and /metrics stays empty."
            ),
        }
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("spendflow-metrics".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "No metrics upkeep thread; histograms are drained at each scrape only.");
        }
        handle
    })
}

/// The current metrics in the Prometheus text exposition format, with the engine's counters
/// brought up to date first.
pub fn render() -> String {
    let handle = handle();
    super::refresh();
    handle.run_upkeep();
    handle.render()
}

/// `GET /metrics`.
pub async fn metrics() -> impl IntoResponse {
    // Rendering walks every series; keep it off the async workers' hot path.
    let body = tokio::task::spawn_blocking(render)
        .await
        .unwrap_or_else(|e| format!("# rendering failed: {e}\n"));
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

/// A router that answers `GET /metrics` and nothing else (`404`).
pub fn router() -> Router {
    Router::new().route("/metrics", get(metrics))
}

/// Binds the `--metrics` address (port 0 picks a free port), so a taken port fails before
/// anything starts.
///
/// # Errors
///
/// [`EngineError::Web`] if the address cannot be bound.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, EngineError> {
    crate::serve::web::bind_http(addr, "--metrics")
}

/// Binds `addr` and serves [`router`] there as a task of `runtime` until `shutdown` completes;
/// returns the bound address (for a server that does not start through the engine, e.g.
/// `serve --from cassandra`).
///
/// # Errors
///
/// [`EngineError::Web`] if the address cannot be bound.
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, EngineError> {
    let listener = bind(addr)?;
    let error = |e: std::io::Error| EngineError::Web {
        addr: addr.to_string(),
        message: e.to_string(),
    };
    let bound = listener.local_addr().map_err(error)?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(error)?
    };
    runtime.spawn(async move {
        if let Err(e) = serve(listener, shutdown).await {
            tracing::warn!(error = %e, "Metrics server ended with an error.");
        }
    });
    Ok(bound)
}

/// Serves [`router`] on `listener` until `shutdown` completes (the `--metrics` address).
///
/// # Errors
///
/// The listener failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Installed before the first scrape, so counters recorded from now on are kept.
    handle();
    tracing::info!(addr = ?listener.local_addr().ok(), "Metrics listening.");
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::super::names;
    use super::*;

    /// Whether `text` is Prometheus text exposition: every line a `# HELP`/`# TYPE` comment or
    /// `name{labels} value`, names and label names well formed, values numbers. Returns the first
    /// line that is not.
    fn check_exposition(text: &str) -> Result<(), String> {
        for line in text.lines() {
            if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            if !sample_line_is_valid(line) {
                return Err(line.to_string());
            }
        }
        Ok(())
    }

    fn sample_line_is_valid(line: &str) -> bool {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let (name, rest) = line.split_at(name_end);
        if !is_metric_name(name) {
            return false;
        }
        let rest = match rest.strip_prefix('{') {
            Some(labels) => {
                let Some(end) = labels.rfind('}') else {
                    return false;
                };
                if !labels_are_valid(&labels[..end]) {
                    return false;
                }
                &labels[end + 1..]
            }
            None => rest,
        };
        let mut fields = rest.split_whitespace();
        let value_ok = fields
            .next()
            .is_some_and(|v| v.parse::<f64>().is_ok() || matches!(v, "+Inf" | "-Inf" | "NaN"));
        // An optional timestamp in milliseconds.
        value_ok
            && fields.next().is_none_or(|t| t.parse::<i64>().is_ok())
            && fields.next().is_none()
    }

    fn is_metric_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn labels_are_valid(mut labels: &str) -> bool {
        while !labels.is_empty() {
            let Some(eq) = labels.find('=') else {
                return false;
            };
            let label = &labels[..eq];
            if label.starts_with(':') || !is_metric_name(label) {
                return false;
            }
            let Some(value) = labels[eq + 1..].strip_prefix('"') else {
                return false;
            };
            // The closing quote: the first one not escaped.
            let mut escaped = false;
            let Some(close) = value.char_indices().find_map(|(i, c)| {
                let close = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                close.then_some(i)
            }) else {
                return false;
            };
            labels = &value[close + 1..];
            labels = match labels.strip_prefix(',') {
                Some(more) => more,
                None if labels.is_empty() => labels,
                None => return false,
            };
        }
        true
    }

    #[test]
    fn the_exposition_check_accepts_samples_and_refuses_anything_else() {
        let good = "# HELP spendflow_x_total Things.\n# TYPE spendflow_x_total counter\n\
                    spendflow_x_total 3\nspendflow_y{reason=\"bad \\\"json\\\"\",a=\"b\"} 1.5\n\
                    spendflow_z_bucket{le=\"+Inf\"} 2\nspendflow_w NaN 1700000000000\n";
        assert_eq!(check_exposition(good), Ok(()));
        for bad in [
            "spendflow_x",
            "spendflow x 1",
            "1spendflow 1",
            "spendflow_x{a=b} 1",
            "spendflow_x{a=\"b\"",
            "spendflow_x{a=\"b\"} one",
            "spendflow_x 1 2 3",
            "# comment that is not HELP or TYPE",
        ] {
            assert_eq!(check_exposition(bad), Err(bad.to_string()), "{bad}");
        }
    }

    #[test]
    fn a_recorded_metric_is_rendered_as_prometheus_text() {
        let handle = handle();
        ::metrics::counter!(names::RECORDS_READ).absolute(7);
        ::metrics::histogram!(names::SINK_COMMIT).record(0.003);
        let text = render();
        check_exposition(&text).unwrap();
        assert!(
            text.contains("# TYPE spendflow_records_read_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE spendflow_sink_commit_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("spendflow_sink_commit_seconds_bucket{le=\"0.005\"}"),
            "{text}"
        );
        assert!(text.contains(names::RSS), "{text}");
        // A second call does not install again.
        assert!(std::ptr::eq(handle, super::handle()));
    }
}
