//! Step 7 on the sink thread: drives a durable [`Sink`] through its contract (write, then
//! commit, one epoch group at a time), knowing nothing of what the sink writes to.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Shared;
use crate::sink::{Sink, SinkInbox};

/// How often the sink logs what it has written.
const SINK_REPORT: Duration = Duration::from_secs(10);

/// Writes and commits the groups the publisher hands over, until the publisher is done. Marks
/// each committed epoch in [`Shared::sink_committed`].
///
/// An error stops the sink for this run: a retriable one while the engine stops is expected
/// (the next start writes those epochs again from the checkpoint); any other stops the engine,
/// since its durable output no longer advances.
pub fn run_sink(inbox: Arc<SinkInbox>, mut sink: Box<dyn Sink>, shared: &Shared) {
    let started = Instant::now();
    let mut last_report = Instant::now();
    while let Some(group) = inbox.take() {
        crate::metrics::sink_inflight(1.0);
        let began = Instant::now();
        match sink.write(&group).and_then(|()| sink.commit(&group)) {
            Ok(()) => {
                shared.sink_committed.store(group.epoch, Ordering::Release);
                crate::metrics::sink_committed(sink.counters(), began.elapsed());
                tracing::trace!(
                    sink = sink.name(),
                    epoch = group.epoch,
                    cells = group.cells.len(),
                    ms = began.elapsed().as_millis() as u64,
                    "Committed an epoch group."
                );
            }
            Err(e) if e.is_retriable() && shared.stop.load(Ordering::Acquire) => {
                tracing::warn!(
                    sink = sink.name(),
                    epoch = group.epoch,
                    error = %e,
                    "Stopping before the sink took the last epochs; the next start writes them again from the checkpoint."
                );
                break;
            }
            Err(e) => {
                shared.fail(e.to_string());
                break;
            }
        }
        crate::metrics::sink_inflight(-1.0);
        if last_report.elapsed() >= SINK_REPORT {
            last_report = Instant::now();
            log_sink(&*sink, started, "Sink progress.");
        }
    }
    inbox.close();
    log_sink(&*sink, started, "Sink finished.");
}

fn log_sink(sink: &dyn Sink, started: Instant, message: &str) {
    let counters = sink.counters();
    let rows_per_s = counters.rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
    tracing::info!(
        sink = sink.name(),
        groups = counters.groups,
        rows = counters.rows,
        rows_per_s = rows_per_s as u64,
        retries = counters.retries,
        "{message}"
    );
}
