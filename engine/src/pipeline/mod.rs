//! The whole path of a record, in one place.
//!
//! ```text
//!  worker thread (one per -w)                                  publisher thread
//!  ┌───────────────────────────────────────────────┐          ┌──────────────────────────────┐
//!  │ 1. poll its sources   (source/*)              │          │ 5. merge the workers' closed │
//!  │ 2. decode             (operators::decode)     │ reports  │    epochs into one delta     │
//!  │    └─ rejected ──> dead letters (sink/dead_letter)       │ 6. apply it to the read model│
//!  │ 3. push into the dataflow, cut epochs (EpochClock)  ───> │    (serve/read_model) and to │
//!  │ 4. step; drain closed epochs (operators::dataflow)│      │    every other sink          │
//!  └───────────────────────────────────────────────┘          └──────────────────────────────┘
//! ```
//!
//! Steps 1–4 run on every worker; each worker reads its own sources (partitions are divided
//! among workers), and the dataflow exchanges data by key. Each worker reports, per closed epoch,
//! the changes of the users it owns together with its source positions at that epoch; the
//! publisher publishes epoch `E` once every worker has reported through `E`, so a snapshot
//! always shows whole epochs of every worker — never a partial one.
//!
//! Epochs are cut by a shared [`EpochClock`]: while any source reports lag, as soon as a worker
//! has taken a record budget into the current epoch (so catch-up runs in large, efficient
//! batches); when caught up, on a timer (only when something was read since the last cut, so an
//! idle engine does not churn). See [`clock`] for the policy.
//!
//! One file per thread, in data-path order:
//!
//! | file | thread | steps |
//! |---|---|---|
//! | [`clock`] | (shared) | when epochs are cut |
//! | [`worker`] | `spendflow-workers` (one per `-w`) | 1–4: poll, decode, push, step |
//! | [`publisher`] | `spendflow-publisher` | 5–6: merge, publish, hand to the sink and checkpoints |
//! | [`sink_driver`] | `spendflow-sink` | 7: write and commit epoch groups to the durable sink |
//! | [`checkpointer`] | `spendflow-checkpoint` | 8: join and store checkpoints |
//!
//! This file holds what they share: [`Shared`] (counters, flags, the clock) and the reports the
//! workers send the publisher.

mod checkpointer;
mod clock;
mod publisher;
mod reports;
mod sink_driver;
mod worker;

pub use checkpointer::{AlertsCommitted, run_checkpointer};
pub use clock::EpochClock;
pub use publisher::{Outputs, run_publisher};
pub use reports::{ReportReceiver, ReportSender, report_channel};
pub use sink_driver::run_sink;
pub use worker::run_worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use spendflow_operators::aggregate::ReplayTouch;
use spendflow_operators::{ClosedEpoch, Epoch};

use crate::checkpoint::Checkpoint;
use crate::core::{CheckpointProgress, PartitionPosition};
use crate::sink::dead_letter::DeadLetters;

/// Live counters of one worker, readable by the status service.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    /// Records taken from this worker's sources.
    pub read: AtomicU64,
    /// Records that decoded and entered the dataflow.
    pub accepted: AtomicU64,
    /// True when every source of this worker had nothing more at the last poll.
    pub idle: AtomicBool,
    /// Polls started plus polls finished: odd while a poll is in flight (see
    /// [`WorkerStatus::idle_after_poll`]).
    pub polls: AtomicU64,
    /// Partition positions after the last poll.
    pub partitions: parking_lot::Mutex<Vec<PartitionPosition>>,
    /// Set the first time every source of this worker had nothing more (see
    /// [`Shared::replay`]).
    pub was_idle: AtomicBool,
    /// True when a source of this worker reported lag at the last poll.
    pub lagging: AtomicBool,
}

/// How long a status probe waits for a worker's poll in flight to finish.
const POLL_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

impl WorkerStatus {
    /// Whether the worker's last finished poll found nothing more. A poll in flight may be
    /// taking records that are not counted yet, so never counts as idle: the probe waits for it
    /// to finish (a poll of sources with nothing to return takes microseconds), and says "not
    /// idle" only if it takes longer than [`POLL_WAIT`]. (Saying "not idle" at once made
    /// `caught_up` flicker between probes on a busy machine, where a worker is often
    /// descheduled in the middle of a poll.)
    pub fn idle_after_poll(&self) -> bool {
        let deadline = Instant::now() + POLL_WAIT;
        loop {
            let before = self.polls.load(Ordering::Acquire);
            if before.is_multiple_of(2) {
                let idle = self.idle.load(Ordering::Acquire);
                if self.polls.load(Ordering::Acquire) == before {
                    return idle;
                }
            } else if Instant::now() >= deadline {
                return false;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// State shared by the workers, the publisher and the services.
#[derive(Debug)]
pub struct Shared {
    /// The epoch clock.
    pub clock: EpochClock,
    /// Set to stop: workers close their last epoch and exit.
    pub stop: AtomicBool,
    /// Rejected records.
    pub dead_letters: Arc<DeadLetters>,
    /// One entry per worker.
    pub workers: Vec<WorkerStatus>,
    /// When the engine started.
    pub started: Instant,
    /// The newest epoch the durable sink has committed (0: none yet, or no durable sink).
    pub sink_committed: AtomicU64,
    /// Set when a part of the engine failed for good (the durable sink was fenced or hit a
    /// fatal error): the engine stops, and says why.
    pub fatal: parking_lot::Mutex<Option<String>>,
    /// The checkpoint to restore, until every worker has pushed its share of it.
    restore: parking_lot::Mutex<Option<Arc<Checkpoint>>>,
    /// How checkpoints go, for the status service.
    pub checkpoints: parking_lot::Mutex<CheckpointProgress>,
    /// True when the engine writes checkpoints.
    pub checkpoints_enabled: bool,
    restore_pending: std::sync::atomic::AtomicUsize,
    /// The replay epochs, in which the dataflow reports every cell the input touched so the
    /// durable sink rewrites it (see `spendflow_operators::aggregate`). With a durable sink,
    /// a start is a replay until every worker has once read all its sources had: the previous
    /// run cannot have read (and written) anything beyond that. Without one, there is none.
    pub replay: ReplayTouch,
    /// Workers that have been idle at least once.
    workers_were_idle: std::sync::atomic::AtomicUsize,
    /// The read model's incarnation, written into every checkpoint (a restart that restores
    /// the checkpoint continues its epochs, and so its incarnation).
    pub incarnation: Arc<str>,
    /// The dataflow's options (the reporting currency).
    pub dataflow_options: spendflow_operators::reference::DataflowOptions,
    /// Where this process stands in the computation: [`Shared::workers`] are its local
    /// workers, `topology.global_worker(i)` their indices in the dataflow.
    pub topology: crate::cluster::Topology,
    /// The hostfile, in cluster mode (peers' gRPC addresses, for forwarding queries).
    pub cluster: Option<Arc<crate::cluster::ClusterSpec>>,
}

impl Shared {
    /// Shared state for `workers` workers.
    pub fn new(workers: usize, clock: EpochClock, dead_letters: Arc<DeadLetters>) -> Self {
        Shared {
            clock,
            stop: AtomicBool::new(false),
            dead_letters,
            workers: (0..workers).map(|_| WorkerStatus::default()).collect(),
            started: Instant::now(),
            sink_committed: AtomicU64::new(0),
            fatal: parking_lot::Mutex::new(None),
            restore: parking_lot::Mutex::new(None),
            checkpoints: parking_lot::Mutex::new(CheckpointProgress::default()),
            checkpoints_enabled: false,
            restore_pending: std::sync::atomic::AtomicUsize::new(workers),
            incarnation: Arc::default(),
            dataflow_options: spendflow_operators::reference::DataflowOptions::default(),
            replay: ReplayTouch::default(),
            workers_were_idle: std::sync::atomic::AtomicUsize::new(0),
            topology: crate::cluster::Topology::single(workers),
            cluster: None,
        }
    }

    /// Treats the start as a replay (for a durable sink; see [`Shared::replay`]), from the
    /// clock's first epoch on.
    pub fn with_replay(mut self) -> Self {
        self.replay = ReplayTouch::until_told(self.clock.current());
        self
    }

    /// Notes that `worker`'s sources had nothing more; the last worker to get there for the
    /// first time ends the replay at the epoch being read now. Every record any worker read
    /// before is in that epoch or an earlier one.
    ///
    /// In a cluster the replay never ends: this process's workers being done says nothing of
    /// records other processes still re-read, whose cells this process owns and must rewrite.
    /// (Touching costs little there: nearly every touched cell changes anyway.)
    fn note_idle(&self, worker: usize) {
        if !self.workers[worker].was_idle.swap(true, Ordering::AcqRel)
            && self.workers_were_idle.fetch_add(1, Ordering::AcqRel) + 1 == self.workers.len()
            && self.topology.processes == 1
        {
            let last = self.clock.current();
            if self.replay.until() == Epoch::MAX {
                tracing::info!(
                    epoch = last,
                    "Replay done: every source has been read to where it stood at start."
                );
            }
            self.replay.end_at(last);
        }
    }

    /// Restores `checkpoint` when the workers start: each pushes its share of the live
    /// expenses at the checkpoint's epoch.
    pub fn restore_from(self, checkpoint: Checkpoint) -> Self {
        {
            let mut progress = self.checkpoints.lock();
            progress.last_epoch = checkpoint.epoch;
            progress.last_at = Some(Instant::now());
        }
        *self.restore.lock() = Some(Arc::new(checkpoint));
        self
    }

    /// Stops the engine because of `error`, which stays readable through [`Shared::fatal`].
    pub fn fail(&self, error: String) {
        tracing::error!(%error, "The engine stops.");
        self.fatal.lock().get_or_insert(error);
        self.stop.store(true, Ordering::Release);
    }

    /// Records read by all sources.
    pub fn records_read(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.read.load(Ordering::Acquire))
            .sum()
    }

    /// Records accepted into the dataflow.
    pub fn records_accepted(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.accepted.load(Ordering::Relaxed))
            .sum()
    }

    /// True if every worker's sources had nothing more at their last poll.
    pub fn sources_idle(&self) -> bool {
        self.workers.iter().all(WorkerStatus::idle_after_poll)
    }

    /// True if a source of any worker reported lag at its last poll (epochs are then cut by
    /// record budget; see [`EpochClock`]).
    pub fn sources_lagging(&self) -> bool {
        self.workers
            .iter()
            .any(|w| w.lagging.load(Ordering::Acquire))
    }

    /// Every partition's position, over all workers.
    pub fn partitions(&self) -> Vec<PartitionPosition> {
        self.workers
            .iter()
            .flat_map(|w| w.partitions.lock().clone())
            .collect()
    }
}

/// One closed epoch of one worker, with where its sources stood when it closed.
#[derive(Debug)]
pub struct WorkerEpoch {
    /// The changes.
    pub closed: ClosedEpoch,
    /// The worker's partition positions at the close.
    pub positions: Arc<Vec<PartitionPosition>>,
    /// Records the worker had read at the close.
    pub read: u64,
}

/// One worker's share of a checkpoint: its live expenses and where its sources stood.
#[derive(Debug)]
pub struct SnapshotPart {
    /// The checkpoint's epoch.
    pub epoch: Epoch,
    /// The live expenses this worker owns.
    pub live: Vec<(spendflow_operators::ExpenseId, spendflow_operators::Fact)>,
    /// The reference rows this worker owns.
    pub reference: Vec<(
        spendflow_operators::reference::RefKey,
        spendflow_operators::reference::RefValue,
    )>,
    /// The worker's partition positions at the end of the epoch.
    pub positions: Arc<Vec<PartitionPosition>>,
    /// Records the worker had read by then.
    pub read: u64,
    /// Records the worker had rejected by then, per reason (in `RejectReason::ALL_CODES` order).
    pub rejected: Vec<u64>,
}

/// What a worker sends the publisher each time epochs close.
#[derive(Debug)]
pub struct WorkerReport {
    /// The worker's index.
    pub worker: usize,
    /// Closed epochs in order.
    pub epochs: Vec<WorkerEpoch>,
    /// Shares of checkpoints taken since the last report.
    pub snapshots: Vec<SnapshotPart>,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::WorkerStatus;

    #[test]
    fn a_probe_waits_for_a_poll_in_flight_instead_of_saying_not_idle() {
        let status = std::sync::Arc::new(WorkerStatus::default());
        // A finished poll that found nothing.
        status.polls.store(2, Ordering::Release);
        status.idle.store(true, Ordering::Release);
        assert!(status.idle_after_poll());
        // A poll starts, and finishes 5 ms later finding nothing again: the probe says idle.
        status.polls.fetch_add(1, Ordering::AcqRel);
        let poller = {
            let status = std::sync::Arc::clone(&status);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                status.idle.store(true, Ordering::Release);
                status.polls.fetch_add(1, Ordering::AcqRel);
            })
        };
        assert!(status.idle_after_poll(), "flickered to not idle");
        poller.join().unwrap();
        // A poll that took records: not idle once it finishes.
        status.polls.fetch_add(1, Ordering::AcqRel);
        status.idle.store(false, Ordering::Release);
        status.polls.fetch_add(1, Ordering::AcqRel);
        assert!(!status.idle_after_poll());
        // A poll stuck in flight (a slow source): not idle, after a bounded wait.
        status.idle.store(true, Ordering::Release);
        status.polls.fetch_add(1, Ordering::AcqRel);
        let started = Instant::now();
        assert!(!status.idle_after_poll());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
