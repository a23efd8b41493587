//! Steps 5–6 on the publisher thread: merge the workers' closed epochs into whole epochs,
//! publish them to the read model, and hand them to the sink driver and the checkpointer.

use std::collections::VecDeque;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use spendflow_operators::Epoch;

use super::*;
use crate::core::PartitionPosition;
use crate::serve::read_model::{AsOf, EpochDelta, ReadModelWriter};
use crate::sink::SinkInbox;

/// Where the publisher sends what it publishes, besides the read model.
#[derive(Debug, Default)]
pub struct Outputs {
    /// The durable sink's inbox.
    pub sink: Option<Arc<SinkInbox>>,
    /// The checkpoint writer's queue.
    pub checkpoints: Option<Sender<SnapshotPart>>,
    /// The newest epoch the durable sink committed before this run: epochs up to it are not
    /// handed to it again. The first delta of a run (through `first_epoch - 1`, which is at
    /// most this) carries either nothing or a restored checkpoint's state, which such a sink
    /// holds already (re-read input then rewrites every cell it touches).
    pub sink_committed: Option<Epoch>,
    /// When the clock cut each epoch (publishing one records how long it took).
    pub epoch_cuts: Arc<crate::metrics::EpochCuts>,
}

/// Steps 5–6: merges worker reports into whole epochs, publishes them to the read model and
/// the durable sink, and hands checkpoint shares to the checkpoint writer, until every worker
/// has hung up.
///
/// The read model gets each epoch first; handing it to the sink then merges it into the sink's
/// waiting group without waiting for the sink (see `sink::SinkInbox`: it waits only once that
/// group holds millions of distinct cells), so the served state does not move at the durable
/// store's pace.
pub fn run_publisher(
    reports: Receiver<WorkerReport>,
    workers: usize,
    mut writer: ReadModelWriter,
    mut outputs: Outputs,
) {
    let mut merger = Merger::new(workers);
    for mut report in reports.iter() {
        if let Some(checkpoints) = &outputs.checkpoints {
            for part in report.snapshots.drain(..) {
                let _ = checkpoints.send(part);
            }
        }
        if let Some(delta) = merger.push(report) {
            let epoch = delta.as_of.epoch;
            let cells = delta.cells.len();
            let records_covered = delta.records_covered;
            let published = writer.apply(delta);
            outputs.epoch_cuts.published(epoch);
            tracing::trace!(
                epoch,
                cells,
                changed = published.cells.len(),
                "Published an epoch."
            );
            if outputs.sink_committed.is_some_and(|c| epoch <= c) {
                continue;
            }
            if let Some(sink) = &outputs.sink
                && !sink.put(&published.as_of, &published.cells, records_covered)
            {
                // The sink failed for good and said so; keep serving what is published.
                outputs.sink = None;
            }
        }
    }
    if let Some(sink) = &outputs.sink {
        sink.close();
    }
    tracing::debug!("Publisher finished.");
}

/// Collects per-worker closed epochs and cuts them into deltas that cover whole epochs of every
/// worker.
#[derive(Debug)]
pub struct Merger {
    pending: Vec<VecDeque<WorkerEpoch>>,
    reported_through: Vec<Option<Epoch>>,
    positions: Vec<Arc<Vec<PartitionPosition>>>,
    read: Vec<u64>,
    published: Option<Epoch>,
}

impl Merger {
    /// A merger for `workers` workers.
    pub fn new(workers: usize) -> Self {
        Merger {
            pending: (0..workers).map(|_| VecDeque::new()).collect(),
            reported_through: vec![None; workers],
            positions: vec![Arc::default(); workers],
            read: vec![0; workers],
            published: None,
        }
    }

    /// Takes a report; returns a delta if it completes a new epoch on every worker.
    pub fn push(&mut self, report: WorkerReport) -> Option<EpochDelta> {
        let w = report.worker;
        if let Some(last) = report.epochs.last() {
            self.reported_through[w] = Some(last.closed.epoch);
        }
        self.pending[w].extend(report.epochs);

        let ready = self.reported_through.iter().copied().min().flatten()?;
        if self.published.is_some_and(|p| p >= ready) {
            return None;
        }
        let mut delta = EpochDelta::default();
        for (w, pending) in self.pending.iter_mut().enumerate() {
            while pending.front().is_some_and(|e| e.closed.epoch <= ready) {
                let WorkerEpoch {
                    closed,
                    positions,
                    read,
                } = pending.pop_front().expect("checked");
                delta.cells.extend(closed.cells);
                delta.last_seen.extend(closed.last_seen);
                self.positions[w] = positions;
                self.read[w] = read;
            }
        }
        self.published = Some(ready);
        delta.as_of = AsOf {
            epoch: ready,
            positions: Arc::new(
                self.positions
                    .iter()
                    .flat_map(|p| p.iter().cloned())
                    .collect(),
            ),
            // The read model's writer stamps its incarnation.
            ..AsOf::default()
        };
        delta.records_covered = self.read.iter().sum();
        Some(delta)
    }
}
