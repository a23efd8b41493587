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
use spendflow_operators::decode::decode;
use spendflow_operators::runtime::WorkerContext;
use spendflow_operators::{ClosedEpoch, Epoch, RejectReason, Rejection};

use crate::serve::read_model::{AsOf, EpochDelta, ReadModelWriter};
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
}

impl EpochClock {
    /// A clock that cuts every `interval` while there is input, or after `budget` records.
    pub fn new(interval: Duration, budget: usize) -> Self {
        EpochClock {
            start: Instant::now(),
            interval,
            budget: budget.max(1),
            // Epoch 0 stays empty: data starts at 1, so "epoch 0" can mean "nothing yet".
            current: AtomicU64::new(1),
            last_cut_ns: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
        }
    }

    /// Notes that records were read (so the timer should cut an epoch).
    pub fn note_input(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// The epoch a worker should be pushing at, after `in_epoch` records in its current one.
    /// Cuts a new epoch if the timer or the budget says so.
    pub fn target(&self, in_epoch: usize) -> Epoch {
        let now = self.start.elapsed().as_nanos() as u64;
        let last = self.last_cut_ns.load(Ordering::Acquire);
        let due = now.saturating_sub(last) >= self.interval.as_nanos() as u64
            && self.dirty.load(Ordering::Acquire);
        if (due || in_epoch >= self.budget)
            && self
                .last_cut_ns
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.dirty.store(false, Ordering::Release);
            return self.current.fetch_add(1, Ordering::AcqRel) + 1;
        }
        self.current.load(Ordering::Acquire)
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
        }
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

/// What a worker sends the publisher each time epochs close.
#[derive(Debug)]
pub struct WorkerReport {
    /// The worker's index.
    pub worker: usize,
    /// Closed epochs in order.
    pub epochs: Vec<WorkerEpoch>,
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
    let mut dataflow = ctx.build_dataflow();
    dataflow.advance_to(shared.clock.current());
    let mut batch: Vec<SourceRecord> = Vec::with_capacity(POLL_BATCH);
    // (last epoch closed by an advance, positions then, records read then), oldest first.
    let mut closes: VecDeque<(Epoch, Arc<Vec<PartitionPosition>>, u64)> = VecDeque::new();
    let mut in_epoch = 0usize;
    let mut read = 0u64;
    let mut stopping = false;
    let mut last_status = Instant::now();
    let mut last_busy = false;

    loop {
        // 1. Poll every source once.
        let mut busy = false;
        if !stopping {
            // Not idle while polling: records taken from a source but not yet counted must
            // never look caught up.
            status.idle.store(false, Ordering::Release);
            let mut idle = true;
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
                    Ok(Poll::Idle) | Ok(Poll::Finished) => {}
                    Err(e) if e.is_retriable() => {
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
            }
            if !idle {
                shared.clock.note_input();
            }
            status.read.store(read, Ordering::Release);
            // Positions for the status service: after reads, and now and then for sources whose
            // ends move without reads (Kafka watermarks). Not on every idle loop.
            // Also when the worker turns idle: the caught-up claim and the positions (lag) it
            // shows must agree.
            if !idle || busy != last_busy || last_status.elapsed() >= STATUS_REFRESH {
                last_status = Instant::now();
                *status.partitions.lock().unwrap_or_else(|p| p.into_inner()) =
                    sources.iter().flat_map(|s| s.partitions()).collect();
            }
            last_busy = busy;
            status.idle.store(!busy, Ordering::Release);
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
            let positions: Vec<PartitionPosition> =
                sources.iter().flat_map(|s| s.partitions()).collect();
            closes.push_back((target - 1, Arc::new(positions), read));
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
        let closed = dataflow.drain_closed();
        if !closed.is_empty() {
            let epochs = closed
                .into_iter()
                .map(|closed| {
                    // The advance that closed this epoch is the first one at or after it.
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
                .collect();
            if reports
                .send(WorkerReport {
                    worker: index,
                    epochs,
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

/// Steps 5–6: merges worker reports into whole epochs and publishes them, until every worker
/// has hung up.
pub fn run_publisher(reports: Receiver<WorkerReport>, workers: usize, mut writer: ReadModelWriter) {
    let mut merger = Merger::new(workers);
    for report in reports.iter() {
        if let Some(delta) = merger.push(report) {
            let epoch = delta.as_of.epoch;
            let cells = delta.cells.len();
            let published = writer.apply(delta);
            tracing::trace!(
                epoch,
                cells,
                changed = published.cells.len(),
                "Published an epoch."
            );
        }
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
        };
        delta.records_covered = self.read.iter().sum();
        Some(delta)
    }
}
