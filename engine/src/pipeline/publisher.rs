//! Steps 5–6 on the publisher thread: merge the workers' closed epochs into whole epochs,
//! publish them to the read model, and hand them to the sink driver and the checkpointer.

use std::collections::VecDeque;
use std::sync::Arc;

use crossbeam_channel::Sender;
use spendflow_operators::Epoch;

use super::*;
use crate::core::PartitionPosition;
use crate::serve::read_model::{AsOf, EpochDelta, ReadModelWriter};
use crate::sink::SinkInbox;

/// How long a stopping engine waits for the alerts topic to take what is queued.
const ALERTS_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// Where alert changes go besides the read model (`--alerts-topic`).
    pub alerts: Option<Box<dyn crate::sink::alerts::AlertsSink>>,
    /// True when this run restored a checkpoint: its first delta is the restored state.
    pub restored: bool,
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
    reports: ReportReceiver,
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
            // Alert changes go out for every delta (the output compares positions), before the
            // read model takes the delta; the restored state is the first delta of a restore.
            if let Some(alerts) = &outputs.alerts {
                let events: Vec<_> = delta.alerts.iter().map(|(_, event)| *event).collect();
                let restore = std::mem::take(&mut outputs.restored);
                if !alerts.publish(epoch, &replayable(&delta.as_of.positions), &events, restore) {
                    // It logged why; the next start writes what this run did not.
                    outputs.alerts = None;
                }
            }
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
    if let Some(alerts) = outputs.alerts.take() {
        alerts.close_within(ALERTS_GRACE);
    }
    tracing::debug!("Publisher finished.");
}

/// The positions of the input that a restart reads again: the alerts output compares them with
/// what its topic was written at. The in-process input is left out: its position starts at 0
/// in every run (its records are the embedding program's), so it would hold the comparison
/// shut forever after a restart.
fn replayable(positions: &[PartitionPosition]) -> Vec<PartitionPosition> {
    positions
        .iter()
        .filter(|p| &*p.source != crate::source::input::INPUT_SOURCE)
        .cloned()
        .collect()
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
        // Epoch by epoch over all workers (the oldest pending epoch first, workers in order
        // within one), so "later entries override earlier ones" holds across workers and the
        // alerts come in epoch order.
        loop {
            let next = self
                .pending
                .iter()
                .enumerate()
                .filter_map(|(w, p)| p.front().map(|e| (e.closed.epoch, w)))
                .filter(|(epoch, _)| *epoch <= ready)
                .min();
            let Some((_, w)) = next else {
                break;
            };
            let WorkerEpoch {
                closed,
                positions,
                read,
            } = self.pending[w].pop_front().expect("checked");
            delta.cells.extend(closed.cells);
            delta.last_seen.extend(closed.last_seen);
            delta.users.extend(closed.users);
            let epoch = closed.epoch;
            delta
                .alerts
                .extend(closed.alerts.into_iter().map(|alert| (epoch, alert)));
            delta.converted.extend(closed.converted);
            delta.rates.extend(closed.rates);
            self.positions[w] = positions;
            self.read[w] = read;
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

#[cfg(test)]
mod tests {
    use spendflow_operators::ClosedEpoch;
    use spendflow_operators::reference::{
        AlertEvent, AlertState, Converted, RateChange, UserRef, UserRow,
    };

    use super::*;

    fn alert(user_id: u64, state: AlertState) -> AlertEvent {
        AlertEvent {
            user_id,
            month: 24_310,
            threshold_pct: 80,
            state,
            spent_minor: 900,
            budget_minor: 1000,
            currency: *b"EUR",
        }
    }

    fn report(worker: usize, epochs: Vec<ClosedEpoch>) -> WorkerReport {
        WorkerReport {
            worker,
            epochs: epochs
                .into_iter()
                .map(|closed| WorkerEpoch {
                    closed,
                    positions: Arc::default(),
                    read: 0,
                })
                .collect(),
            snapshots: Vec::new(),
        }
    }

    /// An alerts output that records what it was handed.
    #[derive(Debug, Default)]
    struct Recorder(Arc<parking_lot::Mutex<Vec<(Epoch, Vec<String>, usize, bool)>>>);

    impl crate::sink::alerts::AlertsSink for Recorder {
        fn publish(
            &self,
            epoch: Epoch,
            positions: &[PartitionPosition],
            events: &[AlertEvent],
            restore: bool,
        ) -> bool {
            let sources = positions.iter().map(|p| p.source.to_string()).collect();
            self.0.lock().push((epoch, sources, events.len(), restore));
            true
        }

        fn close_within(self: Box<Self>, _grace: std::time::Duration) {}
    }

    /// The alerts output gets every delta, with or without events, the first one of a restore
    /// marked, and never the in-process input's position (it restarts at 0 in every run, so
    /// the output's comparison with its topic would never open after a restart).
    #[test]
    fn the_alerts_output_gets_every_delta_without_the_in_process_input() {
        let recorded = Recorder::default();
        let seen = Arc::clone(&recorded.0);
        let outputs = Outputs {
            alerts: Some(Box::new(recorded)),
            restored: true,
            ..Outputs::default()
        };
        let (tx, rx) = crate::pipeline::report_channel();
        let position = |source: &str, position| PartitionPosition {
            source: Arc::from(source),
            partition: 0,
            position,
            ..PartitionPosition::default()
        };
        let positions = Arc::new(vec![
            position("expenses", 10),
            position(crate::source::input::INPUT_SOURCE, 3),
        ]);
        for (epoch, alerts) in [(1, vec![alert(1, AlertState::Fired)]), (2, vec![])] {
            tx.send(WorkerReport {
                worker: 0,
                epochs: vec![WorkerEpoch {
                    closed: ClosedEpoch {
                        epoch,
                        alerts,
                        ..ClosedEpoch::default()
                    },
                    positions: Arc::clone(&positions),
                    read: 0,
                }],
                snapshots: Vec::new(),
            })
            .unwrap();
        }
        drop(tx);
        let (_model, writer) = crate::serve::read_model::ReadModel::new();
        run_publisher(rx, 1, writer, outputs);
        assert_eq!(
            *seen.lock(),
            vec![
                (1, vec!["expenses".to_string()], 1, true),
                (2, vec!["expenses".to_string()], 0, false),
            ]
        );
    }

    /// Every merged epoch's reference rows, alerts (with their epoch), converted totals and
    /// rates reach the delta, in epoch order across workers, so later values win.
    #[test]
    fn reference_alerts_converted_and_rates_are_merged_in_epoch_order() {
        let mut merger = Merger::new(2);
        let row = |budget| UserRef {
            user_id: 1,
            row: Some(UserRow {
                budget_minor: Some(budget),
                currency: *b"EUR",
            }),
        };
        // Worker 0 reports epochs 1 and 2 at once; worker 1 only epoch 1, then epoch 2.
        let w0 = vec![
            ClosedEpoch {
                epoch: 1,
                users: vec![row(100)],
                alerts: vec![alert(1, AlertState::Fired)],
                ..ClosedEpoch::default()
            },
            ClosedEpoch {
                epoch: 2,
                users: vec![row(200)],
                alerts: vec![alert(1, AlertState::Cleared)],
                converted: vec![Converted {
                    user_id: 1,
                    total_minor: Some(7),
                }],
                ..ClosedEpoch::default()
            },
        ];
        assert!(merger.push(report(0, w0)).is_none(), "worker 1 is behind");
        let w1 = vec![ClosedEpoch {
            epoch: 1,
            alerts: vec![alert(2, AlertState::Fired)],
            rates: vec![RateChange {
                currency: *b"USD",
                rate_micros: Some(900_000),
            }],
            ..ClosedEpoch::default()
        }];
        let delta = merger.push(report(1, w1)).expect("epoch 1 is whole");
        assert_eq!(delta.as_of.epoch, 1);
        assert_eq!(delta.users, vec![row(100)]);
        assert_eq!(
            delta.alerts,
            vec![
                (1, alert(1, AlertState::Fired)),
                (1, alert(2, AlertState::Fired))
            ]
        );
        assert_eq!(delta.rates.len(), 1);
        assert!(delta.converted.is_empty());

        // Epoch 2 of worker 1 and 3 of both, merged into one delta when worker 0 reports 3.
        let w1 = vec![
            ClosedEpoch {
                epoch: 2,
                alerts: vec![alert(2, AlertState::Cleared)],
                ..ClosedEpoch::default()
            },
            ClosedEpoch {
                epoch: 3,
                alerts: vec![alert(2, AlertState::Fired)],
                ..ClosedEpoch::default()
            },
        ];
        let delta = merger.push(report(1, w1)).expect("epoch 2 is whole");
        assert_eq!(delta.as_of.epoch, 2);
        assert_eq!(delta.users, vec![row(200)]);
        assert_eq!(
            delta.alerts,
            vec![
                (2, alert(1, AlertState::Cleared)),
                (2, alert(2, AlertState::Cleared))
            ]
        );
        assert_eq!(delta.converted.len(), 1);
        let w0 = vec![
            ClosedEpoch {
                epoch: 3,
                users: vec![row(300)],
                ..ClosedEpoch::default()
            },
            ClosedEpoch {
                epoch: 4,
                users: vec![row(400)],
                alerts: vec![alert(1, AlertState::Fired)],
                ..ClosedEpoch::default()
            },
        ];
        let delta = merger.push(report(0, w0)).expect("epoch 3 is whole");
        assert_eq!(delta.as_of.epoch, 3);
        assert_eq!(delta.users, vec![row(300)], "epoch 4 is not whole yet");
        assert_eq!(delta.alerts, vec![(3, alert(2, AlertState::Fired))]);
        let w1 = vec![
            ClosedEpoch {
                epoch: 4,
                ..ClosedEpoch::default()
            },
            ClosedEpoch {
                epoch: 5,
                alerts: vec![alert(2, AlertState::Cleared)],
                ..ClosedEpoch::default()
            },
        ];
        let delta = merger.push(report(1, w1)).expect("epoch 4 is whole");
        assert_eq!(delta.as_of.epoch, 4);
        assert_eq!(delta.alerts, vec![(4, alert(1, AlertState::Fired))]);
        let w0 = vec![ClosedEpoch {
            epoch: 6,
            users: vec![row(600)],
            ..ClosedEpoch::default()
        }];
        let delta = merger.push(report(0, w0)).expect("epoch 5 is whole");
        assert_eq!(delta.as_of.epoch, 5);
        assert!(delta.users.is_empty(), "worker 0's epoch 6 waits");
        assert_eq!(delta.alerts, vec![(5, alert(2, AlertState::Cleared))]);
    }

    /// One delta spanning several epochs of several workers lists the alerts epoch by epoch
    /// (not worker by worker) and a user's rows in the order they changed.
    #[test]
    fn a_delta_over_several_epochs_keeps_epoch_order_across_workers() {
        let mut merger = Merger::new(2);
        let row = |user_id, budget| UserRef {
            user_id,
            row: Some(UserRow {
                budget_minor: Some(budget),
                currency: *b"EUR",
            }),
        };
        let epochs = |worker: u64| {
            (1..=3)
                .map(|epoch| ClosedEpoch {
                    epoch,
                    users: vec![row(worker, epoch as i64)],
                    alerts: vec![alert(worker, AlertState::Fired)],
                    ..ClosedEpoch::default()
                })
                .collect()
        };
        assert!(merger.push(report(0, epochs(10))).is_none());
        let delta = merger.push(report(1, epochs(20))).unwrap();
        assert_eq!(delta.as_of.epoch, 3);
        let alert_epochs: Vec<(Epoch, u64)> =
            delta.alerts.iter().map(|(e, a)| (*e, a.user_id)).collect();
        assert_eq!(
            alert_epochs,
            vec![(1, 10), (1, 20), (2, 10), (2, 20), (3, 10), (3, 20)]
        );
        let last_of_10 = delta.users.iter().rev().find(|u| u.user_id == 10).unwrap();
        assert_eq!(last_of_10.row.unwrap().budget_minor, Some(3));
    }
}
