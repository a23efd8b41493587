//! Prometheus metrics: what the engine counts, under the names operators scrape.
//!
//! Everything is recorded through the [`metrics`](::metrics) facade, which does no I/O and is
//! compiled in every build: without a recorder installed every call is a no-op, and a program
//! that embeds the engine may install a recorder of its own. With the `web` feature,
//! [`exporter`] installs the Prometheus recorder (once per process) and renders the text
//! exposition that `GET /metrics` answers on the web port and on the `--metrics` address.
//!
//! Most values are not counted twice: the engine's own counters (records read, accepted and
//! rejected, partition positions, checkpoint progress) are copied into the metrics when they
//! are scraped ([`refresh`], from the [`StatusProbe`] of the engine that [`watch`] was given).
//! What has no counter elsewhere is recorded where it happens, one call per site: epoch close
//! latency, sink commits, checkpoint duration and size, gRPC calls, open streams.
//!
//! Every name is listed in [`names`] and in the README's `## Metrics` table.

#[cfg(feature = "web")]
pub mod exporter;
#[cfg(feature = "grpc")]
mod grpc;

#[cfg(feature = "grpc")]
pub use grpc::{GrpcMetrics, GrpcMetricsLayer};

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use spendflow_operators::Epoch;

use crate::pipeline::Shared;
use crate::serve::read_model::ReadModel;
use crate::serve::status::StatusProbe;

/// The metric names (Prometheus conventions: `spendflow_` prefix, unit suffix, `_total` on
/// counters).
pub mod names {
    /// Counter: records taken from the sources.
    pub const RECORDS_READ: &str = "spendflow_records_read_total";
    /// Counter: records that entered the dataflow.
    pub const RECORDS_ACCEPTED: &str = "spendflow_records_accepted_total";
    /// Counter, label `reason`: records rejected (dead letters), by reason code.
    pub const RECORDS_REJECTED: &str = "spendflow_records_rejected_total";
    /// Gauge: the newest epoch published to the read model.
    pub const EPOCH: &str = "spendflow_epoch";
    /// Histogram: from the epoch clock's cut of an epoch until its results are published.
    pub const EPOCH_CLOSE: &str = "spendflow_epoch_close_seconds";
    /// Gauge, labels `topic`, `partition`: records in a Kafka partition not read yet.
    pub const KAFKA_LAG: &str = "spendflow_kafka_lag_records";
    /// Counter: rows (cells) the durable sink wrote or deleted.
    pub const SINK_ROWS: &str = "spendflow_sink_rows_written_total";
    /// Counter: failed sink attempts that were retried.
    pub const SINK_RETRIES: &str = "spendflow_sink_retries_total";
    /// Gauge: epoch groups taken by the sink and not yet committed.
    pub const SINK_INFLIGHT: &str = "spendflow_sink_inflight_groups";
    /// Histogram: writing and committing one epoch group.
    pub const SINK_COMMIT: &str = "spendflow_sink_commit_seconds";
    /// Gauge: time since the newest checkpoint was written (or restored).
    pub const CHECKPOINT_AGE: &str = "spendflow_checkpoint_age_seconds";
    /// Histogram: writing one checkpoint.
    pub const CHECKPOINT_DURATION: &str = "spendflow_checkpoint_duration_seconds";
    /// Gauge: size of the newest checkpoint file.
    pub const CHECKPOINT_SIZE: &str = "spendflow_checkpoint_size_bytes";
    /// Counter: checkpoints given up because of a failure.
    pub const CHECKPOINT_FAILURES: &str = "spendflow_checkpoint_failures_total";
    /// Counter, labels `method`, `code`: gRPC calls answered.
    pub const GRPC_REQUESTS: &str = "spendflow_grpc_requests_total";
    /// Histogram, label `method`: from a gRPC call's arrival to its response headers.
    pub const GRPC_DURATION: &str = "spendflow_grpc_request_duration_seconds";
    /// Gauge: open `Subscribe` streams.
    pub const GRPC_SUBSCRIBERS: &str = "spendflow_grpc_subscribers";
    /// Gauge: open web event streams (`/api/events`).
    pub const WEB_CLIENTS: &str = "spendflow_web_event_clients";
    /// Gauge: resident memory of the process.
    pub const RSS: &str = "spendflow_process_resident_memory_bytes";
    /// Counter: bytes this process sent to the other processes of its cluster.
    pub const CLUSTER_SENT: &str = "spendflow_cluster_sent_bytes_total";
    /// Counter: bytes this process received from the other processes of its cluster.
    pub const CLUSTER_RECEIVED: &str = "spendflow_cluster_received_bytes_total";

    /// Every name, for the exporter's descriptions and the tests.
    pub const ALL: [&str; 21] = [
        RECORDS_READ,
        RECORDS_ACCEPTED,
        RECORDS_REJECTED,
        EPOCH,
        EPOCH_CLOSE,
        KAFKA_LAG,
        SINK_ROWS,
        SINK_RETRIES,
        SINK_INFLIGHT,
        SINK_COMMIT,
        CHECKPOINT_AGE,
        CHECKPOINT_DURATION,
        CHECKPOINT_SIZE,
        CHECKPOINT_FAILURES,
        GRPC_REQUESTS,
        GRPC_DURATION,
        GRPC_SUBSCRIBERS,
        WEB_CLIENTS,
        RSS,
        CLUSTER_SENT,
        CLUSTER_RECEIVED,
    ];
}

/// Says what each metric is (the `# HELP` lines) to the installed recorder.
pub fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(RECORDS_READ, "Records taken from the sources.");
    describe_counter!(RECORDS_ACCEPTED, "Records that entered the dataflow.");
    describe_counter!(
        RECORDS_REJECTED,
        "Records rejected (dead letters), by reason code."
    );
    describe_gauge!(EPOCH, "The newest epoch published to the read model.");
    describe_histogram!(
        EPOCH_CLOSE,
        Unit::Seconds,
        "From the epoch clock's cut of an epoch until its results are published."
    );
    describe_gauge!(
        KAFKA_LAG,
        "Records in a Kafka partition not read yet (high watermark minus position)."
    );
    describe_counter!(SINK_ROWS, "Rows the durable sink wrote or deleted.");
    describe_counter!(SINK_RETRIES, "Failed sink attempts that were retried.");
    describe_gauge!(
        SINK_INFLIGHT,
        "Epoch groups taken by the sink and not yet committed."
    );
    describe_histogram!(
        SINK_COMMIT,
        Unit::Seconds,
        "Writing and committing one epoch group."
    );
    describe_gauge!(
        CHECKPOINT_AGE,
        Unit::Seconds,
        "Time since the newest checkpoint was written or restored."
    );
    describe_histogram!(
        CHECKPOINT_DURATION,
        Unit::Seconds,
        "Writing one checkpoint."
    );
    describe_gauge!(
        CHECKPOINT_SIZE,
        Unit::Bytes,
        "Size of the newest checkpoint file."
    );
    describe_counter!(
        CHECKPOINT_FAILURES,
        "Checkpoints given up because of a failure."
    );
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls answered, by method and status code."
    );
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "From a gRPC call's arrival to its response headers (a stream: until it opens)."
    );
    describe_gauge!(GRPC_SUBSCRIBERS, "Open gRPC Subscribe streams.");
    describe_gauge!(WEB_CLIENTS, "Open web event streams (/api/events).");
    describe_gauge!(RSS, Unit::Bytes, "Resident memory of the process.");
    describe_counter!(
        CLUSTER_SENT,
        Unit::Bytes,
        "Bytes sent to the other processes of the cluster (timely's exchanges, headers included)."
    );
    describe_counter!(
        CLUSTER_RECEIVED,
        Unit::Bytes,
        "Bytes received from the other processes of the cluster."
    );
}

/// The source name of the in-process input (`crate::source::input`).
const IN_PROCESS_INPUT: &str = crate::source::input::INPUT_SOURCE;

/// The engine whose counters are copied into the metrics at each scrape: weak references, so
/// a stopped engine is not kept alive by its metrics. The newest engine started in this
/// process wins (one engine per process is the normal case).
static WATCHED: Mutex<Option<(Weak<Shared>, Weak<ReadModel>)>> = Mutex::new(None);

/// Copies `probe`'s engine counters into the metrics at each scrape from now on.
pub fn watch(probe: &StatusProbe) {
    *WATCHED.lock() = Some((
        Arc::downgrade(&probe.shared),
        Arc::downgrade(&probe.read_model),
    ));
}

/// Brings the scraped values up to date: the watched engine's counters, positions and
/// checkpoint progress, and the process's resident memory.
pub fn refresh() {
    use ::metrics::{counter, gauge};
    if let Some(bytes) = resident_memory_bytes() {
        gauge!(names::RSS).set(bytes as f64);
    }
    let probe = WATCHED.lock().as_ref().and_then(|(shared, read_model)| {
        Some(StatusProbe {
            shared: shared.upgrade()?,
            read_model: read_model.upgrade()?,
        })
    });
    let Some(probe) = probe else {
        return;
    };
    if probe.shared.topology.processes > 1 {
        let (sent, received) = spendflow_operators::runtime::cluster_bytes();
        counter!(names::CLUSTER_SENT).absolute(sent);
        counter!(names::CLUSTER_RECEIVED).absolute(received);
    }
    let status = probe.status();
    counter!(names::RECORDS_READ).absolute(status.records_read);
    counter!(names::RECORDS_ACCEPTED).absolute(status.records_accepted);
    for (reason, n) in &status.rejected_by_reason {
        counter!(names::RECORDS_REJECTED, "reason" => *reason).absolute(*n);
    }
    gauge!(names::EPOCH).set(status.as_of.epoch as f64);
    for p in &status.partitions {
        // Only Kafka knows where a partition ends (files and the generator have no end); the
        // in-process input (`Engine::input`, source `input`) counts its queue, which is no lag.
        if let Some(end) = p.high_watermark.filter(|_| &*p.source != IN_PROCESS_INPUT) {
            let lag = end.saturating_sub(p.position).max(0);
            gauge!(names::KAFKA_LAG, "topic" => p.source.to_string(), "partition" => p.partition.to_string())
                .set(lag as f64);
        }
    }
    if let Some(checkpoint) = &status.checkpoint {
        counter!(names::CHECKPOINT_FAILURES).absolute(checkpoint.failures);
        if let Some(at) = checkpoint.last_at {
            gauge!(names::CHECKPOINT_AGE).set(at.elapsed().as_secs_f64());
        }
    }
}

/// The resident memory of this process (`VmRSS` of `/proc/self/status`); `None` where there is
/// no procfs.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// When the epoch clock cut each recent epoch, so the publisher can tell how long closing it
/// took. Bounded: only the newest [`EpochCuts::KEEP`] cuts are kept.
#[derive(Debug, Default)]
pub struct EpochCuts(Mutex<VecDeque<(Epoch, Instant)>>);

impl EpochCuts {
    /// Cuts remembered at most (epochs cut faster than they are published are not timed).
    pub const KEEP: usize = 1024;

    /// The clock closed `epoch` (records after it go to the next one) now.
    pub fn cut(&self, epoch: Epoch) {
        let mut cuts = self.0.lock();
        if cuts.len() == Self::KEEP {
            cuts.pop_front();
        }
        cuts.push_back((epoch, Instant::now()));
    }

    /// Every epoch through `epoch` is published: records how long each took since its cut.
    pub fn published(&self, epoch: Epoch) {
        let mut cuts = self.0.lock();
        while let Some(&(cut, at)) = cuts.front() {
            if cut > epoch {
                break;
            }
            cuts.pop_front();
            ::metrics::histogram!(names::EPOCH_CLOSE).record(at.elapsed().as_secs_f64());
        }
    }
}

/// The durable sink committed a group: its counters and the time writing and committing took.
pub fn sink_committed(counters: crate::sink::SinkCounters, took: Duration) {
    ::metrics::counter!(names::SINK_ROWS).absolute(counters.rows);
    ::metrics::counter!(names::SINK_RETRIES).absolute(counters.retries);
    ::metrics::histogram!(names::SINK_COMMIT).record(took.as_secs_f64());
}

/// Epoch groups the sink has taken and not yet committed: `+1` when it takes one, `-1` when it
/// is done with it.
pub fn sink_inflight(change: f64) {
    ::metrics::gauge!(names::SINK_INFLIGHT).increment(change);
}

/// A checkpoint was written in `took`.
pub fn checkpoint_written(took: Duration) {
    ::metrics::histogram!(names::CHECKPOINT_DURATION).record(took.as_secs_f64());
}

/// The newest checkpoint is the file at `path`.
pub fn checkpoint_file(path: &std::path::Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        ::metrics::gauge!(names::CHECKPOINT_SIZE).set(meta.len() as f64);
    }
}

/// A gRPC `Subscribe` stream opened (`+1`) or closed (`-1`).
pub fn grpc_subscribers(change: f64) {
    ::metrics::gauge!(names::GRPC_SUBSCRIBERS).increment(change);
}

/// A web event stream opened (`+1`) or closed (`-1`).
pub fn web_clients(change: f64) {
    ::metrics::gauge!(names::WEB_CLIENTS).increment(change);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read_from_vm_rss() {
        let status = "Name:\tspendflow\nVmPeak:\t  999 kB\nVmRSS:\t   2048 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        if cfg!(target_os = "linux") {
            assert!(resident_memory_bytes().is_some_and(|b| b > 0));
        }
    }

    #[test]
    fn names_follow_the_prometheus_conventions() {
        for name in names::ALL {
            assert!(name.starts_with("spendflow_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
    }

    #[test]
    fn epoch_cuts_are_timed_once_and_stay_bounded() {
        let cuts = EpochCuts::default();
        for epoch in 1..=(EpochCuts::KEEP as u64 + 10) {
            cuts.cut(epoch);
        }
        assert_eq!(cuts.0.lock().len(), EpochCuts::KEEP);
        cuts.published(20);
        assert_eq!(cuts.0.lock().front().map(|c| c.0), Some(21));
        cuts.published(20);
        assert_eq!(cuts.0.lock().front().map(|c| c.0), Some(21));
    }
}
