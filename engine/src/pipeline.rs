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
//! Epochs are cut by a shared [`EpochClock`]: on a timer (only when something was read since the
//! last cut, so an idle engine does not churn) or as soon as a worker has taken a record budget
//! into the current epoch (so catch-up runs in large, efficient batches).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use spendflow_operators::aggregate::ReplayTouch;
use spendflow_operators::decode::decode;
use spendflow_operators::runtime::WorkerContext;
use spendflow_operators::{ClosedEpoch, Epoch, RejectReason, Rejection};

use crate::checkpoint::{Checkpoint, CheckpointStore, SavedPosition};
use crate::serve::read_model::{AsOf, EpochDelta, Published, ReadModelWriter};
use crate::sink::cassandra::{CassandraSink, EpochGroup};
use crate::sink::dead_letter::{DeadLetters, RAW_PREFIX_BYTES, RejectedRecord};
use crate::source::{PartitionPosition, Payload, Poll, Source, SourceRecord};

/// Records taken from the sources per poll.
const POLL_BATCH: usize = 4096;

/// How often an idle worker refreshes the partition positions it shows the status service.
const STATUS_REFRESH: Duration = Duration::from_millis(250);

/// Reports the publisher may have queued before workers wait for it (back-pressure).
const REPORT_QUEUE: usize = 64;

/// Cuts the input into epochs; shared by all workers of a process.
#[derive(Debug)]
pub struct EpochClock {
    start: Instant,
    interval: Duration,
    budget: usize,
    current: AtomicU64,
    last_cut_ns: AtomicU64,
    /// Something was read since the last cut.
    dirty: AtomicBool,
    /// Nanoseconds between checkpoints; 0 when checkpoints are off.
    checkpoint_every_ns: u64,
    last_checkpoint_ns: AtomicU64,
    /// The epoch the running checkpoint copies the state at; 0 when none runs.
    checkpoint_mark: AtomicU64,
    /// Something was read since the last checkpoint was marked.
    unsaved: AtomicBool,
}

impl EpochClock {
    /// A clock that cuts every `interval` while there is input, or after `budget` records.
    pub fn new(interval: Duration, budget: usize) -> Self {
        // Epoch 0 stays empty: data starts at 1, so "epoch 0" can mean "nothing yet".
        Self::starting_at(1, interval, budget, None)
    }

    /// A clock whose first epoch is `first` (after a restore, epochs continue past everything
    /// an earlier run published), and that marks an epoch for a checkpoint every
    /// `checkpoint_interval`, if given.
    pub fn starting_at(
        first: Epoch,
        interval: Duration,
        budget: usize,
        checkpoint_interval: Option<Duration>,
    ) -> Self {
        EpochClock {
            start: Instant::now(),
            interval,
            budget: budget.max(1),
            current: AtomicU64::new(first.max(1)),
            last_cut_ns: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            checkpoint_every_ns: checkpoint_interval.map_or(0, |i| i.as_nanos().max(1) as u64),
            last_checkpoint_ns: AtomicU64::new(0),
            checkpoint_mark: AtomicU64::new(0),
            unsaved: AtomicBool::new(false),
        }
    }

    /// Notes that records were read (so the timer should cut an epoch).
    pub fn note_input(&self) {
        self.dirty.store(true, Ordering::Release);
        self.unsaved.store(true, Ordering::Release);
    }

    /// The epoch a worker should be pushing at, after `in_epoch` records in its current one.
    /// Cuts a new epoch if the timer or the budget says so.
    pub fn target(&self, in_epoch: usize) -> Epoch {
        let now = self.start.elapsed().as_nanos() as u64;
        let last = self.last_cut_ns.load(Ordering::Acquire);
        let due = now.saturating_sub(last) >= self.interval.as_nanos() as u64
            && self.dirty.load(Ordering::Acquire);
        // A checkpoint is due when input arrived since the last one, even if none arrives now
        // (an engine that went idle still gets a checkpoint of everything it read).
        let checkpoint_due = self.checkpoint_every_ns > 0
            && self.checkpoint_mark.load(Ordering::SeqCst) == 0
            && now.saturating_sub(self.last_checkpoint_ns.load(Ordering::SeqCst))
                >= self.checkpoint_every_ns
            && self.unsaved.load(Ordering::Acquire);
        if (due || checkpoint_due || in_epoch >= self.budget)
            && self
                .last_cut_ns
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.dirty.store(false, Ordering::Release);
            // A checkpoint due: mark the epoch being closed, *before* the cut is visible, so
            // every worker that advances past it sees the mark first.
            if checkpoint_due {
                self.unsaved.store(false, Ordering::Release);
                self.last_checkpoint_ns.store(now, Ordering::SeqCst);
                self.checkpoint_mark
                    .store(self.current.load(Ordering::SeqCst), Ordering::SeqCst);
            }
            return self.current.fetch_add(1, Ordering::SeqCst) + 1;
        }
        self.current.load(Ordering::SeqCst)
    }

    /// The epoch a checkpoint is being taken at, if any.
    pub fn checkpoint_mark(&self) -> Option<Epoch> {
        Some(self.checkpoint_mark.load(Ordering::SeqCst)).filter(|&e| e > 0)
    }

    /// The checkpoint at `epoch` is written (or given up): the next one may be marked.
    pub fn checkpoint_finished(&self, epoch: Epoch) {
        let _ = self
            .checkpoint_mark
            .compare_exchange(epoch, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The epoch records are pushed at now.
    pub fn current(&self) -> Epoch {
        self.current.load(Ordering::Acquire)
    }

    /// Cuts a new epoch now, whatever the timer says (used at shutdown).
    pub fn cut(&self) -> Epoch {
        self.current.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// Live counters of one worker, readable by the status service.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    /// Records taken from this worker's sources.
    pub read: AtomicU64,
    /// Records that decoded and entered the dataflow.
    pub accepted: AtomicU64,
    /// True when every source of this worker had nothing more at the last poll.
    pub idle: AtomicBool,
    /// Partition positions after the last poll.
    pub partitions: std::sync::Mutex<Vec<PartitionPosition>>,
    /// Set the first time every source of this worker had nothing more (see
    /// [`Shared::replay`]).
    pub was_idle: AtomicBool,
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
    pub fatal: std::sync::Mutex<Option<String>>,
    /// The checkpoint to restore, until every worker has pushed its share of it.
    restore: std::sync::Mutex<Option<Arc<Checkpoint>>>,
    /// How checkpoints go, for the status service.
    pub checkpoints: std::sync::Mutex<CheckpointProgress>,
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
            fatal: std::sync::Mutex::new(None),
            restore: std::sync::Mutex::new(None),
            checkpoints: std::sync::Mutex::new(CheckpointProgress::default()),
            checkpoints_enabled: false,
            restore_pending: std::sync::atomic::AtomicUsize::new(workers),
            incarnation: Arc::default(),
            replay: ReplayTouch::default(),
            workers_were_idle: std::sync::atomic::AtomicUsize::new(0),
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
    fn note_idle(&self, worker: usize) {
        if !self.workers[worker].was_idle.swap(true, Ordering::AcqRel)
            && self.workers_were_idle.fetch_add(1, Ordering::AcqRel) + 1 == self.workers.len()
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
            let mut progress = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
            progress.last_epoch = checkpoint.epoch;
            progress.last_at = Some(Instant::now());
        }
        *self.restore.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(checkpoint));
        self
    }

    /// Stops the engine because of `error`, which stays readable through [`Shared::fatal`].
    pub fn fail(&self, error: String) {
        tracing::error!(%error, "The engine stops.");
        self.fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(error);
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
        self.workers.iter().all(|w| w.idle.load(Ordering::Acquire))
    }

    /// Every partition's position, over all workers.
    pub fn partitions(&self) -> Vec<PartitionPosition> {
        self.workers
            .iter()
            .flat_map(|w| {
                w.partitions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .collect()
    }
}

/// How checkpoints go: the newest one, and the failures.
#[derive(Clone, Debug, Default)]
pub struct CheckpointProgress {
    /// The newest checkpoint written in this run or restored at start (0: none).
    pub last_epoch: Epoch,
    /// When it was written or restored.
    pub last_at: Option<Instant>,
    /// The newest failure, if any in this run.
    pub last_error: Option<String>,
    /// Checkpoints given up because of a failure.
    pub failures: u64,
    /// Failures since the last checkpoint written.
    pub consecutive_failures: u64,
}

impl CheckpointProgress {
    fn failed(&mut self, error: String) {
        self.last_error = Some(error);
        self.failures += 1;
        self.consecutive_failures += 1;
    }

    fn written(&mut self, epoch: Epoch) {
        self.last_epoch = epoch;
        self.last_at = Some(Instant::now());
        self.consecutive_failures = 0;
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
    pub live: Vec<(String, spendflow_operators::Fact)>,
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

/// A bounded channel from the workers to the publisher.
pub fn report_channel() -> (Sender<WorkerReport>, Receiver<WorkerReport>) {
    crossbeam_channel::bounded(REPORT_QUEUE)
}

/// Steps 1–4 on one worker, until [`Shared::stop`] is set.
pub fn run_worker(
    ctx: &mut WorkerContext<'_>,
    shared: &Shared,
    mut sources: Vec<Box<dyn Source>>,
    reports: Sender<WorkerReport>,
) {
    let index = ctx.index();
    let status = &shared.workers[index];
    let mut dataflow = ctx.build_dataflow_with_replay(shared.replay.clone());
    let mut batch: Vec<SourceRecord> = Vec::with_capacity(POLL_BATCH);
    // (last epoch closed by an advance, positions then, records read then), oldest first.
    let mut closes: VecDeque<(Epoch, Arc<Vec<PartitionPosition>>, u64)> = VecDeque::new();
    let mut in_epoch = 0usize;
    let mut read = 0u64;
    let mut rejected = vec![0u64; RejectReason::ALL_CODES.len()];
    // Checkpoints requested: (epoch, positions, read, rejected) at the end of the epoch.
    let mut checkpoints: Vec<(Epoch, Arc<Vec<PartitionPosition>>, u64, Vec<u64>)> = Vec::new();
    let mut stopping = false;

    // 0. Restore a checkpoint: push this worker's share of its live expenses at its epoch, and
    //    publish that epoch on its own before reading anything (the durable sink skips it: it
    //    holds that state already).
    let restore = shared
        .restore
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(checkpoint) = restore {
        dataflow.advance_to(checkpoint.epoch);
        let peers = ctx.peers();
        for (id, fact) in checkpoint.live.iter().skip(index).step_by(peers) {
            dataflow.push_live(id.clone(), *fact);
        }
        if index == 0 {
            read = checkpoint.records_read;
            for (code, n) in &checkpoint.rejected {
                if let Some(i) = RejectReason::ALL_CODES.iter().position(|c| c == code) {
                    rejected[i] = *n;
                }
            }
            status.read.store(read, Ordering::Release);
        }
        drop(checkpoint);
        if shared.restore_pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last worker to take its share frees the checkpoint's memory.
            shared
                .restore
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
        let target = shared.clock.current();
        let positions: Vec<PartitionPosition> =
            sources.iter().flat_map(|s| s.partitions()).collect();
        closes.push_back((target - 1, Arc::new(positions), read));
        dataflow.advance_to(target);
        while dataflow.is_behind() {
            ctx.step();
        }
        let epochs = with_positions(dataflow.drain_closed(), &mut closes);
        let report = WorkerReport {
            worker: index,
            epochs,
            snapshots: Vec::new(),
        };
        if reports.send(report).is_err() {
            return;
        }
    } else {
        // Record this first advance like every other: the epochs it closes (0, or everything
        // before the sink's next epoch) cover nothing read yet. Without the entry, an epoch it
        // closes that drains only after later reads (a busy machine: the first records are
        // read and the epoch cut before epoch 0 has passed the probe) was paired with the
        // read count and positions of that later advance, and published as covering records
        // whose changes it does not hold: `caught_up` was true with nothing served.
        let first = shared.clock.current();
        let positions: Vec<PartitionPosition> =
            sources.iter().flat_map(|s| s.partitions()).collect();
        closes.push_back((first - 1, Arc::new(positions), read));
        dataflow.advance_to(first);
    }
    let mut last_status = Instant::now();
    // `None` until the first poll, so the first poll always publishes the partitions: a worker
    // idle from its first poll on is caught up at once, and must show what it reads then.
    let mut last_busy: Option<bool> = None;
    // A source that failed for good is no longer read: what it had left is never read, so this
    // worker is never caught up again.
    let mut lost_source = false;

    loop {
        // 1. Poll every source once.
        let mut busy = false;
        if !stopping {
            // Not idle while polling: records taken from a source but not yet counted must
            // never look caught up.
            status.idle.store(false, Ordering::Release);
            let mut idle = true;
            // A source that is not caught up although it has nothing to return now.
            let mut behind = lost_source;
            let mut failed = Vec::new();
            for (i, source) in sources.iter_mut().enumerate() {
                // Never take more than the epoch budget has room for, so epochs stay bounded.
                let room = shared
                    .clock
                    .budget
                    .saturating_sub(in_epoch)
                    .clamp(1, POLL_BATCH);
                match source.poll(&mut batch, room) {
                    Ok(Poll::Ready) => busy = true,
                    Ok(Poll::Behind) => behind = true,
                    Ok(Poll::Idle) | Ok(Poll::Finished) => {}
                    Err(e) if e.is_retriable() => {
                        // Not caught up while a source cannot be read.
                        behind = true;
                        tracing::warn!(worker = index, error = %e, "Source read failed; retrying.");
                    }
                    Err(e) => {
                        tracing::error!(worker = index, error = %e, "Source failed; it is no longer read.");
                        failed.push(i);
                    }
                }
                // 2.–3. Decode and push (or reject) everything the poll returned.
                let mut partitions = None;
                for record in batch.drain(..) {
                    idle = false;
                    read += 1;
                    in_epoch += 1;
                    match admit(record.payload, record.expected_user) {
                        Ok(decoded) => {
                            dataflow.push(decoded);
                            status.accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err((rejection, raw)) => {
                            let code = rejection.reason.code();
                            if let Some(i) = RejectReason::ALL_CODES.iter().position(|c| *c == code)
                            {
                                rejected[i] += 1;
                            }
                            let partitions = partitions.get_or_insert_with(|| source.partitions());
                            let partition = partitions.get(record.partition);
                            shared.dead_letters.record(
                                RejectedRecord {
                                    reason: rejection.reason,
                                    detail: rejection.detail,
                                    source: partition
                                        .map_or_else(|| Arc::from("?"), |p| Arc::clone(&p.source)),
                                    partition: partition.map_or(0, |p| p.partition),
                                    offset: record.offset,
                                    raw_prefix: raw[..raw.len().min(RAW_PREFIX_BYTES)].to_vec(),
                                },
                                &raw,
                                record.key.as_deref(),
                            );
                        }
                    }
                }
            }
            for i in failed.into_iter().rev() {
                sources.remove(i);
                lost_source = true;
                behind = true;
            }
            if !idle {
                shared.clock.note_input();
            }
            status.read.store(read, Ordering::Release);
            // Positions for the status service: after reads, and now and then for sources whose
            // ends move without reads (Kafka watermarks). Not on every idle loop.
            // Also when the worker turns idle: the caught-up claim and the positions (lag) it
            // shows must agree.
            let not_idle = busy || behind;
            if !idle || last_busy != Some(not_idle) || last_status.elapsed() >= STATUS_REFRESH {
                last_status = Instant::now();
                *status.partitions.lock().unwrap_or_else(|p| p.into_inner()) =
                    sources.iter().flat_map(|s| s.partitions()).collect();
            }
            last_busy = Some(not_idle);
            status.idle.store(!not_idle, Ordering::Release);
            if !not_idle {
                shared.note_idle(index);
            }
        }

        // 3. Cut epochs.
        let target = if stopping {
            dataflow.epoch()
        } else {
            shared.clock.target(in_epoch)
        };
        let stop_now = !stopping && shared.stop.load(Ordering::Acquire);
        let target = if stop_now {
            target.max(shared.clock.cut())
        } else {
            target
        };
        if target > dataflow.epoch() {
            let positions: Arc<Vec<PartitionPosition>> =
                Arc::new(sources.iter().flat_map(|s| s.partitions()).collect());
            // A checkpoint at an epoch this advance closes: ask for a copy of the live set at
            // it, and note where the sources stood.
            if let Some(mark) = shared.clock.checkpoint_mark()
                && (dataflow.epoch()..target).contains(&mark)
            {
                dataflow.request_snapshot(mark);
                checkpoints.push((mark, Arc::clone(&positions), read, rejected.clone()));
            }
            closes.push_back((target - 1, positions, read));
            dataflow.advance_to(target);
            in_epoch = 0;
        }
        stopping |= stop_now;

        // 4. Step the dataflow and report what closed.
        if busy {
            ctx.step();
        } else {
            ctx.step_or_park(Duration::from_millis(1));
        }
        let snapshots: Vec<SnapshotPart> = dataflow
            .take_snapshots()
            .into_iter()
            .filter_map(|copy| {
                let at = checkpoints.iter().position(|c| c.0 == copy.epoch)?;
                let (epoch, positions, read, rejected) = checkpoints.remove(at);
                Some(SnapshotPart {
                    epoch,
                    live: copy.live,
                    positions,
                    read,
                    rejected,
                })
            })
            .collect();
        let closed = dataflow.drain_closed();
        if !closed.is_empty() || !snapshots.is_empty() {
            let epochs = with_positions(closed, &mut closes);
            if reports
                .send(WorkerReport {
                    worker: index,
                    epochs,
                    snapshots,
                })
                .is_err()
            {
                tracing::debug!(worker = index, "Publisher gone; worker stops.");
                break;
            }
        }
        if stopping && !dataflow.is_behind() {
            break;
        }
    }
    tracing::debug!(worker = index, records = read, "Worker finished.");
}

/// Pairs each closed epoch with the positions and read count of the advance that closed it
/// (the first advance at or after it), forgetting older advances.
fn with_positions(
    closed: Vec<ClosedEpoch>,
    closes: &mut VecDeque<(Epoch, Arc<Vec<PartitionPosition>>, u64)>,
) -> Vec<WorkerEpoch> {
    closed
        .into_iter()
        .map(|closed| {
            while closes.len() > 1 && closes[0].0 < closed.epoch {
                closes.pop_front();
            }
            let (_, positions, read) = closes.front().cloned().unwrap_or_default();
            WorkerEpoch {
                closed,
                positions,
                read,
            }
        })
        .collect()
}

/// Decodes a payload and checks the user a source expects. On rejection, returns the reason
/// and the record's bytes.
fn admit(
    payload: Payload,
    expected_user: Option<u64>,
) -> Result<spendflow_operators::Record, (Rejection, Vec<u8>)> {
    let (record, bytes) = match payload {
        Payload::Record(record) => (record, None),
        Payload::Bytes(bytes) => match decode(&bytes) {
            Ok(record) => (record, Some(bytes)),
            Err(rejection) => return Err((rejection, bytes)),
        },
    };
    match expected_user {
        Some(user) if record.user_id() != user => {
            let raw =
                bytes.unwrap_or_else(|| spendflow_operators::decode::encode(&record).into_bytes());
            let detail = format!(
                "the record's user_id {} differs from the topic's user {user}",
                record.user_id()
            );
            Err((
                Rejection {
                    reason: RejectReason::UserMismatch,
                    detail,
                },
                raw,
            ))
        }
        _ => Ok(record),
    }
}

/// Where the publisher sends what it publishes, besides the read model.
#[derive(Debug, Default)]
pub struct Outputs {
    /// The durable sink's inbox.
    pub sink: Option<Arc<SinkInbox>>,
    /// The checkpoint writer's queue.
    pub checkpoints: Option<Sender<SnapshotPart>>,
    /// The epoch of the delta that carries a restored checkpoint's state: published to the
    /// read model, not to the sink, which holds that state already.
    pub restored: Option<Epoch>,
}

/// The hand-off between the publisher and the durable sink: one group of epochs that grows
/// while the sink writes the previous one.
///
/// The publisher merges each published epoch into the waiting group (a cell that changes in
/// many epochs is written once, with its last value), so the slower the sink, the fewer writes
/// per input record. Bounded: once the waiting group holds `max_cells` cells the publisher
/// waits, its own bounded queue then holds the workers, and they stop reading their sources
/// (back-pressure); memory stays at about two groups.
#[derive(Debug)]
pub struct SinkInbox {
    waiting: std::sync::Mutex<(Option<EpochGroup>, bool)>,
    changed: std::sync::Condvar,
    max_cells: usize,
}

impl SinkInbox {
    /// An inbox whose waiting group holds up to `max_cells` cells.
    pub fn new(max_cells: usize) -> Self {
        SinkInbox {
            waiting: std::sync::Mutex::new((None, false)),
            changed: std::sync::Condvar::new(),
            max_cells: max_cells.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<EpochGroup>, bool)> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges a published epoch into the waiting group, first waiting while the group is
    /// full. Returns false once the sink has closed the inbox (it failed for good).
    pub fn put(&self, published: &Published, records_covered: u64) -> bool {
        let mut state = self.lock();
        while !state.1
            && state
                .0
                .as_ref()
                .is_some_and(|g| g.cells.len() >= self.max_cells)
        {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.1 {
            return false;
        }
        state.0.get_or_insert_with(EpochGroup::default).merge(
            published.as_of.epoch,
            Arc::clone(&published.as_of.positions),
            records_covered,
            published.cells.iter().cloned(),
        );
        self.changed.notify_all();
        true
    }

    /// The waiting group, once there is one; `None` once the inbox is closed and empty.
    fn take(&self) -> Option<EpochGroup> {
        let mut state = self.lock();
        loop {
            if let Some(group) = state.0.take() {
                self.changed.notify_all();
                return Some(group);
            }
            if state.1 {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// No more groups: the publisher is done (the sink writes what waits), or the sink failed
    /// (the publisher stops handing it epochs).
    pub fn close(&self) {
        self.lock().1 = true;
        self.changed.notify_all();
    }
}

/// Steps 5–6: merges worker reports into whole epochs, publishes them to the read model and
/// the durable sink, and hands checkpoint shares to the checkpoint writer, until every worker
/// has hung up.
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
            tracing::trace!(
                epoch,
                cells,
                changed = published.cells.len(),
                "Published an epoch."
            );
            if outputs.restored == Some(epoch) {
                continue;
            }
            if let Some(sink) = &outputs.sink
                && !sink.put(&published, records_covered)
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

/// How often the sink logs what it has written.
const SINK_REPORT: Duration = Duration::from_secs(10);

/// Step 7: writes the groups the publisher hands over to Cassandra, until the publisher is
/// done. Marks each committed epoch in [`Shared::sink_committed`].
pub fn run_sink(inbox: Arc<SinkInbox>, mut sink: CassandraSink, shared: &Shared) {
    let started = Instant::now();
    let mut last_report = Instant::now();
    while let Some(group) = inbox.take() {
        match sink.write(&group) {
            Ok(()) => {
                shared.sink_committed.store(group.epoch, Ordering::Release);
                tracing::trace!(
                    epoch = group.epoch,
                    cells = group.cells.len(),
                    "Committed to Cassandra."
                );
            }
            Err(e) if e.is_retriable() && shared.stop.load(Ordering::Acquire) => {
                tracing::warn!(
                    epoch = group.epoch,
                    error = %e,
                    "Stopping before Cassandra took the last epochs; the next start writes them again from the checkpoint."
                );
                break;
            }
            Err(e) => {
                shared.fail(format!("Cassandra sink: {e}"));
                break;
            }
        }
        if last_report.elapsed() >= SINK_REPORT {
            last_report = Instant::now();
            log_sink(&sink, started, "Cassandra sink progress.");
        }
    }
    inbox.close();
    log_sink(&sink, started, "Cassandra sink finished.");
}

fn log_sink(sink: &CassandraSink, started: Instant, message: &str) {
    let counters = sink.counters();
    let rows_per_s = counters.rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
    tracing::info!(
        groups = counters.groups,
        rows = counters.rows,
        rows_per_s = rows_per_s as u64,
        retries = counters.retries,
        "{message}"
    );
}

/// How long a checkpoint may wait for a worker's share before it is given up (a worker that
/// missed the mark; the next checkpoint is then marked).
const CHECKPOINT_PATIENCE: Duration = Duration::from_secs(120);

/// Step 8: joins the workers' shares of each checkpoint and stores it, once the durable sink
/// (if any) has committed its epoch, until the publisher hangs up.
pub fn run_checkpointer(
    parts: Receiver<SnapshotPart>,
    workers: usize,
    mut store: Box<dyn CheckpointStore>,
    shared: &Shared,
    wait_for_sink: bool,
) {
    let mut pending: std::collections::BTreeMap<Epoch, (Instant, Vec<SnapshotPart>)> =
        Default::default();
    loop {
        match parts.recv_timeout(Duration::from_millis(200)) {
            Ok(part) => pending
                .entry(part.epoch)
                .or_insert_with(|| (Instant::now(), Vec::new()))
                .1
                .push(part),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
        pending.retain(|epoch, (since, _)| {
            let keep = since.elapsed() < CHECKPOINT_PATIENCE;
            if !keep {
                tracing::warn!(
                    epoch,
                    "A checkpoint missed a worker's share; it is given up."
                );
                shared.clock.checkpoint_finished(*epoch);
            }
            keep
        });
        let Some((&epoch, _)) = pending.iter().find(|(_, (_, p))| p.len() == workers) else {
            continue;
        };
        let (_, shares) = pending.remove(&epoch).expect("found");
        // The sink must hold the checkpoint's state before the checkpoint may say so.
        while wait_for_sink
            && shared.sink_committed.load(Ordering::Acquire) < epoch
            && !shared.stop.load(Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if wait_for_sink && shared.sink_committed.load(Ordering::Acquire) < epoch {
            break; // Stopping before the sink caught up: this checkpoint would claim too much.
        }
        let started = Instant::now();
        let progress = || shared.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        // Dead letters of records before the checkpoint must be in their topic before the
        // checkpoint says those records are done: a restart will not read them again.
        if !shared.dead_letters.flush() {
            let mut progress = progress();
            progress.failed(format!(
                "checkpoint at epoch {epoch} held back: dead letters before it are not delivered yet"
            ));
            let consecutive = progress.consecutive_failures;
            drop(progress);
            if consecutive > 1 {
                tracing::error!(
                    epoch,
                    consecutive,
                    "Checkpoint skipped again: dead letters before it are still not delivered; a restart reads more input again each time."
                );
            } else {
                tracing::warn!(
                    epoch,
                    "Checkpoint skipped: dead letters before it are not delivered yet."
                );
            }
            shared.clock.checkpoint_finished(epoch);
            continue;
        }
        let mut checkpoint = join_shares(epoch, shares);
        checkpoint.dead_letter_scan = shared.dead_letters.scan_start(&checkpoint.positions);
        checkpoint.incarnation = shared.incarnation.to_string();
        match store.save(&checkpoint) {
            Ok(()) => {
                progress().written(epoch);
                shared.dead_letters.checkpointed(&checkpoint.positions);
                tracing::info!(
                    epoch,
                    live = checkpoint.live.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "Checkpoint written."
                )
            }
            Err(e) => {
                let mut progress = progress();
                progress.failed(e.to_string());
                let (failures, last_epoch) = (progress.consecutive_failures, progress.last_epoch);
                drop(progress);
                tracing::error!(
                    epoch,
                    error = %e,
                    consecutive_failures = failures,
                    last_written = last_epoch,
                    "Checkpoint not written; the previous one stays valid, and a restart reads more input again (with Kafka retention, input may expire before it is)."
                )
            }
        }
        shared.clock.checkpoint_finished(epoch);
    }
}

/// One checkpoint from every worker's share.
fn join_shares(epoch: Epoch, shares: Vec<SnapshotPart>) -> Checkpoint {
    let mut checkpoint = Checkpoint {
        epoch,
        names: spendflow_operators::Name::interned()
            .iter()
            .map(|n| n.to_string())
            .collect(),
        ..Checkpoint::default()
    };
    let mut rejected = vec![0u64; RejectReason::ALL_CODES.len()];
    for share in shares {
        checkpoint.records_read += share.read;
        for (total, n) in rejected.iter_mut().zip(&share.rejected) {
            *total += n;
        }
        checkpoint
            .positions
            .extend(share.positions.iter().map(|p| SavedPosition {
                source: p.source.to_string(),
                partition: p.partition,
                position: p.position,
            }));
        if checkpoint.live.is_empty() {
            checkpoint.live = share.live;
        } else {
            checkpoint.live.extend(share.live);
        }
    }
    checkpoint.positions.sort();
    checkpoint.rejected = RejectReason::ALL_CODES
        .iter()
        .zip(rejected)
        .filter(|(_, n)| *n > 0)
        .map(|(code, n)| (code.to_string(), n))
        .collect();
    checkpoint
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

#[cfg(test)]
mod checkpointer_tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::checkpoint::CheckpointError;
    use crate::sink::dead_letter::DeadLetterOutput;

    /// A dead-letter output whose deliveries succeed only when told to.
    #[derive(Debug, Default)]
    struct Output {
        deliverable: Arc<AtomicBool>,
    }

    impl DeadLetterOutput for Output {
        fn send(&self, _: &RejectedRecord, _: &[u8], _: Option<&[u8]>) {}
        fn flush(&self) -> bool {
            self.deliverable.load(Ordering::SeqCst)
        }
    }

    /// A store in memory that fails while told to.
    #[derive(Debug, Default)]
    struct Store {
        saved: Arc<std::sync::Mutex<Vec<Epoch>>>,
        failing: Arc<AtomicBool>,
    }

    impl CheckpointStore for Store {
        fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError> {
            Ok(None)
        }
        fn save(&mut self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(CheckpointError::Io {
                    path: "/nowhere".into(),
                    source: std::io::Error::other("disk on fire"),
                });
            }
            self.saved.lock().unwrap().push(checkpoint.epoch);
            Ok(())
        }
    }

    fn part(epoch: Epoch) -> SnapshotPart {
        SnapshotPart {
            epoch,
            live: Vec::new(),
            positions: Arc::new(Vec::new()),
            read: epoch,
            rejected: Vec::new(),
        }
    }

    #[test]
    fn undelivered_dead_letters_and_failed_writes_hold_back_checkpoints_and_show_in_status() {
        let output = Output::default();
        let deliverable = Arc::clone(&output.deliverable);
        let store = Store::default();
        let (saved, failing) = (Arc::clone(&store.saved), Arc::clone(&store.failing));
        let dead_letters = Arc::new(DeadLetters::default().with_output(Box::new(output)));
        let shared = Arc::new(Shared::new(
            1,
            EpochClock::new(Duration::from_millis(10), 1000),
            dead_letters,
        ));
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || run_checkpointer(rx, 1, Box::new(store), &shared, false))
        };
        let progress = || shared.checkpoints.lock().unwrap().clone();
        let wait_failures = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while progress().failures < n {
                assert!(Instant::now() < deadline, "{:?}", progress());
                std::thread::sleep(Duration::from_millis(5));
            }
        };

        // Dead letters not delivered: no checkpoint, twice.
        tx.send(part(1)).unwrap();
        wait_failures(1);
        tx.send(part(2)).unwrap();
        wait_failures(2);
        assert!(saved.lock().unwrap().is_empty());
        let p = progress();
        assert_eq!((p.last_epoch, p.consecutive_failures), (0, 2));
        assert!(p.last_error.unwrap().contains("dead letters"));

        // Delivered, but the store fails.
        deliverable.store(true, Ordering::SeqCst);
        failing.store(true, Ordering::SeqCst);
        tx.send(part(3)).unwrap();
        wait_failures(3);
        assert!(saved.lock().unwrap().is_empty());
        assert!(progress().last_error.unwrap().contains("disk on fire"));

        // Both well again: written.
        failing.store(false, Ordering::SeqCst);
        tx.send(part(4)).unwrap();
        drop(tx);
        thread.join().unwrap();
        assert_eq!(*saved.lock().unwrap(), vec![4]);
        let p = progress();
        assert_eq!(
            (p.last_epoch, p.failures, p.consecutive_failures),
            (4, 3, 0)
        );
        assert!(p.last_at.is_some());
    }
}
