//! Steps 1–4 on one worker thread: poll the sources, decode, push into the dataflow, cut
//! epochs, step, and report what closed to the publisher.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use spendflow_operators::dataflow::{ClockSignal, ExpenseDataflow};
use spendflow_operators::decode::decode;
use spendflow_operators::runtime::WorkerContext;
use spendflow_operators::{ClosedEpoch, Epoch, RejectReason, Rejection};

use super::*;
use crate::core::PartitionPosition;
use crate::sink::dead_letter::{RAW_PREFIX_BYTES, RejectedRecord};
use crate::source::{Payload, Poll, Source, SourceRecord};

/// Records taken from the sources per poll.
const POLL_BATCH: usize = 4096;

/// How often an idle worker refreshes the partition positions it shows the status service.
const STATUS_REFRESH: Duration = Duration::from_millis(250);

/// Steps 1–4 on one worker, until [`Shared::stop`] is set.
pub fn run_worker(
    ctx: &mut WorkerContext<'_>,
    shared: &Shared,
    sources: Vec<Box<dyn Source>>,
    reports: ReportSender,
) {
    let mut worker = Worker::new(ctx, shared, sources, reports);
    // 0. Restore this worker's share of a checkpoint, or start a new timeline.
    if !worker.begin(ctx) {
        return;
    }
    loop {
        // 1.–3. Poll every source once; decode and push (or reject) what it returned.
        let busy = !worker.stopping && worker.poll_sources();
        // 3. Cut epochs.
        worker.cut_epochs();
        // 4. Step the dataflow and report what closed.
        if !worker.step_and_report(ctx, busy) {
            break;
        }
    }
    tracing::debug!(
        worker = worker.index,
        records = worker.read,
        "Worker finished."
    );
}

/// (last epoch closed by an advance, positions then, records read then).
type Close = (Epoch, Arc<Vec<PartitionPosition>>, u64);

/// One worker's state between the steps.
struct Worker<'a> {
    /// This worker's index among the workers of this process (its status and reports).
    index: usize,
    /// Its index in the whole computation (in a cluster, across processes).
    global: usize,
    shared: &'a Shared,
    status: &'a WorkerStatus,
    dataflow: ExpenseDataflow,
    sources: Vec<Box<dyn Source>>,
    reports: ReportSender,
    batch: Vec<SourceRecord>,
    /// Advances not yet matched with the epochs they closed, oldest first.
    closes: VecDeque<Close>,
    in_epoch: usize,
    read: u64,
    rejected: Vec<u64>,
    /// Checkpoints requested: (epoch, positions, read, rejected) at the end of the epoch.
    checkpoints: Vec<(Epoch, Arc<Vec<PartitionPosition>>, u64, Vec<u64>)>,
    stopping: bool,
    last_status: Instant,
    /// `None` until the first poll, so the first poll always publishes the partitions: a
    /// worker idle from its first poll on is caught up at once, and must show what it reads
    /// then.
    last_busy: Option<bool>,
    /// A source that failed for good is no longer read: what it had left is never read, so
    /// this worker is never caught up again.
    lost_source: bool,
    /// In a cluster: this worker told every worker that it read input, or filled its epoch
    /// budget, in its current epoch (see `clock`: the leader cuts for followers).
    signaled: (bool, bool),
    /// In a cluster, once stopping: the last input epoch each process said it stops at. Every
    /// process ends at the latest of them, so all publish (and commit) the same last epoch.
    stopped: std::collections::BTreeMap<u32, Epoch>,
}

impl<'a> Worker<'a> {
    fn new(
        ctx: &mut WorkerContext<'_>,
        shared: &'a Shared,
        sources: Vec<Box<dyn Source>>,
        reports: ReportSender,
    ) -> Self {
        let global = ctx.index();
        let index = shared.topology.local_worker(global);
        Worker {
            index,
            global,
            shared,
            status: &shared.workers[index],
            dataflow: ctx
                .build_dataflow_with_options(shared.replay.clone(), shared.dataflow_options),
            sources,
            reports,
            batch: Vec::with_capacity(POLL_BATCH),
            closes: VecDeque::new(),
            in_epoch: 0,
            read: 0,
            rejected: vec![0u64; RejectReason::ALL_CODES.len()],
            checkpoints: Vec::new(),
            stopping: false,
            last_status: Instant::now(),
            last_busy: None,
            lost_source: false,
            signaled: (false, false),
            stopped: std::collections::BTreeMap::new(),
        }
    }

    fn positions(&self) -> Arc<Vec<PartitionPosition>> {
        Arc::new(self.sources.iter().flat_map(|s| s.partitions()).collect())
    }

    /// Step 0. With a checkpoint: push this worker's share of its live expenses at its epoch,
    /// and publish that epoch on its own before reading anything (a durable sink that holds
    /// it already skips it). Without: the first advance. False if the publisher is gone.
    fn begin(&mut self, ctx: &mut WorkerContext<'_>) -> bool {
        let restore = self.shared.restore.lock().clone();
        let Some(checkpoint) = restore else {
            // Record this first advance like every other: the epochs it closes (0, or
            // everything before the sink's next epoch) cover nothing read yet. Without the
            // entry, an epoch it closes that drains only after later reads (a busy machine:
            // the first records are read and the epoch cut before epoch 0 has passed the
            // probe) was paired with the read count and positions of that later advance, and
            // published as covering records whose changes it does not hold: `caught_up` was
            // true with nothing served.
            let first = self.shared.clock.current();
            self.closes
                .push_back((first - 1, self.positions(), self.read));
            self.dataflow.advance_to(first);
            return true;
        };
        self.dataflow.advance_to(checkpoint.epoch);
        let peers = ctx.peers();
        // Every process holds the whole checkpoint (all shares, merged): each worker of the
        // computation pushes its slice, and the dataflow routes every entry to its owner.
        for (id, fact) in checkpoint.live.iter().skip(self.global).step_by(peers) {
            self.dataflow.push_live(id.clone(), *fact);
        }
        for (key, value) in checkpoint.reference.iter().skip(self.global).step_by(peers) {
            self.dataflow.push_live_reference(*key, *value);
        }
        if self.global == 0 {
            self.read = checkpoint.records_read;
            for (code, n) in &checkpoint.rejected {
                if let Some(i) = RejectReason::ALL_CODES.iter().position(|c| c == code) {
                    self.rejected[i] = *n;
                }
            }
            self.status.read.store(self.read, Ordering::Release);
        }
        drop(checkpoint);
        if self.shared.restore_pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last worker to take its share frees the checkpoint's memory.
            self.shared.restore.lock().take();
        }
        let target = self.shared.clock.current();
        self.closes
            .push_back((target - 1, self.positions(), self.read));
        self.dataflow.advance_to(target);
        while self.dataflow.is_behind() {
            ctx.step();
        }
        let epochs = with_positions(self.dataflow.drain_closed(), &mut self.closes);
        let report = WorkerReport {
            worker: self.index,
            epochs,
            snapshots: Vec::new(),
        };
        self.reports.send(report).is_ok()
    }

    /// Steps 1–3: polls every source once, decodes and pushes (or rejects) what it returned,
    /// and tells the status service where this worker stands. True if a source had more.
    fn poll_sources(&mut self) -> bool {
        let (index, shared, status) = (self.index, self.shared, self.status);
        let mut busy = false;
        // A poll in flight: records taken from a source but not yet counted must never look
        // caught up (see `WorkerStatus::idle_after_poll`).
        status.polls.fetch_add(1, Ordering::AcqRel);
        let mut idle = true;
        // A source that is not caught up although it has nothing to return now.
        let mut behind = self.lost_source;
        let mut failed = Vec::new();
        let mut lagging = false;
        for (i, source) in self.sources.iter_mut().enumerate() {
            // Never take more than the epoch budget has room for, so epochs stay bounded.
            let room = shared
                .clock
                .budget
                .saturating_sub(self.in_epoch)
                .clamp(1, POLL_BATCH);
            match source.poll(&mut self.batch, room) {
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
            lagging |= source.lagging();
            let mut partitions = None;
            for record in self.batch.drain(..) {
                idle = false;
                self.read += 1;
                self.in_epoch += 1;
                if let Payload::Reference(change) = record.payload {
                    self.dataflow.push_reference(change);
                    continue;
                }
                match admit(record.payload, record.expected_user) {
                    Ok(decoded) => {
                        self.dataflow.push(decoded);
                        status.accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err((rejection, raw)) => {
                        let code = rejection.reason.code();
                        if let Some(i) = RejectReason::ALL_CODES.iter().position(|c| *c == code) {
                            self.rejected[i] += 1;
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
            self.sources.remove(i);
            self.lost_source = true;
            behind = true;
        }
        if !idle {
            shared.clock.note_input();
        }
        if shared.clock.is_follower() {
            // The leader cuts for this process: tell it there is input to cut, or a full epoch.
            let full = self.in_epoch >= shared.clock.budget;
            let (input, full) = (!idle && !self.signaled.0, full && !self.signaled.1);
            if input || full {
                self.signaled.0 |= input;
                self.signaled.1 |= full;
                self.dataflow.signal(ClockSignal {
                    process: shared.topology.process as u32,
                    input,
                    full,
                    ..ClockSignal::default()
                });
            }
        }
        status.read.store(self.read, Ordering::Release);
        status.lagging.store(lagging, Ordering::Release);
        // Positions for the status service: after reads, and now and then for sources whose
        // ends move without reads (Kafka watermarks). Not on every idle loop. Also when the
        // worker turns idle: the caught-up claim and the positions (lag) it shows must agree.
        let not_idle = busy || behind;
        if !idle || self.last_busy != Some(not_idle) || self.last_status.elapsed() >= STATUS_REFRESH
        {
            self.last_status = Instant::now();
            *status.partitions.lock() = self.sources.iter().flat_map(|s| s.partitions()).collect();
        }
        self.last_busy = Some(not_idle);
        status.idle.store(!not_idle, Ordering::Release);
        status.polls.fetch_add(1, Ordering::AcqRel);
        if !not_idle {
            shared.note_idle(index);
        }
        busy
    }

    /// Step 3: advances the dataflow to the epoch the clock says (all of it when stopping),
    /// asking for a checkpoint copy when a checkpoint mark falls in the epochs it closes.
    fn cut_epochs(&mut self) {
        let target = if self.stopping {
            // In a cluster, the latest last epoch any process stops at (signals raise the clock).
            let last = if self.shared.topology.processes > 1 {
                self.shared.clock.current()
            } else {
                0
            };
            self.dataflow.epoch().max(last)
        } else {
            self.shared
                .clock
                .target(self.in_epoch, self.shared.sources_lagging())
        };
        let stop_now = !self.stopping && self.shared.stop.load(Ordering::Acquire);
        let target = if stop_now {
            target.max(self.shared.clock.cut())
        } else {
            target
        };
        if target > self.dataflow.epoch() {
            let positions = self.positions();
            // A checkpoint at an epoch this advance closes: ask for a copy of the live set at
            // it, and note where the sources stood.
            if let Some(mark) = self.shared.clock.checkpoint_mark()
                && (self.dataflow.epoch()..target).contains(&mark)
            {
                self.dataflow.request_snapshot(mark);
                self.checkpoints.push((
                    mark,
                    Arc::clone(&positions),
                    self.read,
                    self.rejected.clone(),
                ));
            }
            if self.global == 0 && self.shared.topology.processes > 1 {
                // The leader's cut, for the followers (see `clock`).
                let checkpoint = self
                    .shared
                    .clock
                    .checkpoint_mark()
                    .filter(|mark| (self.dataflow.epoch()..target).contains(mark))
                    .unwrap_or(0);
                self.dataflow.signal(ClockSignal {
                    process: 0,
                    epoch: target,
                    checkpoint,
                    ..ClockSignal::default()
                });
            }
            self.closes.push_back((target - 1, positions, self.read));
            self.dataflow.advance_to(target);
            self.in_epoch = 0;
            self.signaled = (false, false);
        }
        if stop_now && self.shared.topology.processes > 1 {
            let process = self.shared.topology.process as u32;
            let last = self.dataflow.epoch();
            let mine = self.stopped.entry(process).or_insert(last);
            *mine = (*mine).max(last);
            self.dataflow.signal(ClockSignal {
                process,
                epoch: last,
                stopping: true,
                ..ClockSignal::default()
            });
        }
        self.stopping |= stop_now;
    }

    /// In a cluster, a stopping worker is done only once every process said where it stops
    /// and this worker's input reached the latest of those epochs (see [`Worker::stopped`]).
    fn every_process_stops_here(&self) -> bool {
        let processes = self.shared.topology.processes;
        processes == 1
            || (self.stopped.len() == processes
                && self.stopped.values().all(|&e| e <= self.dataflow.epoch()))
    }

    /// Step 4: steps the dataflow (parking briefly when no source had more) and reports the
    /// epochs that closed and the checkpoint copies that are ready. False once the worker is
    /// done (stopped and drained, or the publisher is gone).
    fn step_and_report(&mut self, ctx: &mut WorkerContext<'_>, busy: bool) -> bool {
        if busy {
            ctx.step();
        } else {
            ctx.step_or_park(Duration::from_millis(1));
        }
        self.take_signals();
        let checkpoints = &mut self.checkpoints;
        let snapshots: Vec<SnapshotPart> = self
            .dataflow
            .take_snapshots()
            .into_iter()
            .filter_map(|copy| {
                let at = checkpoints.iter().position(|c| c.0 == copy.epoch)?;
                let (epoch, positions, read, rejected) = checkpoints.remove(at);
                Some(SnapshotPart {
                    epoch,
                    live: copy.live,
                    reference: copy.reference,
                    positions,
                    read,
                    rejected,
                })
            })
            .collect();
        let closed = self.dataflow.drain_closed();
        if !closed.is_empty() || !snapshots.is_empty() {
            let epochs = with_positions(closed, &mut self.closes);
            let report = WorkerReport {
                worker: self.index,
                epochs,
                snapshots,
            };
            if self.reports.send(report).is_err() {
                tracing::debug!(worker = self.index, "Publisher gone; worker stops.");
                return false;
            }
        }
        !self.stopping || self.dataflow.is_behind() || !self.every_process_stops_here()
    }
}

impl Worker<'_> {
    /// In a cluster: applies the clock signals other processes' workers sent (see `clock`).
    fn take_signals(&mut self) {
        let me = self.shared.topology.process as u32;
        let clock = &self.shared.clock;
        for signal in self.dataflow.take_signals() {
            if signal.process == me {
                continue;
            }
            if signal.stopping {
                let last = self.stopped.entry(signal.process).or_insert(signal.epoch);
                *last = (*last).max(signal.epoch);
                clock.follow(signal.epoch);
                continue;
            }
            if clock.is_follower() {
                if signal.checkpoint > 0 {
                    clock.follow_checkpoint(signal.checkpoint);
                }
                if signal.epoch > 0 {
                    clock.follow(signal.epoch);
                }
            } else {
                if signal.input {
                    clock.note_input();
                }
                if signal.full {
                    clock.request_cut();
                }
            }
        }
    }
}

/// Pairs each closed epoch with the positions and read count of the advance that closed it
/// (the first advance at or after it), forgetting older advances.
fn with_positions(closed: Vec<ClosedEpoch>, closes: &mut VecDeque<Close>) -> Vec<WorkerEpoch> {
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
        Payload::Reference(_) => unreachable!("reference changes are pushed before admit"),
        Payload::Bytes(bytes) => match decode(&bytes) {
            Ok(record) => (record, Some(bytes)),
            Err(rejection) => return Err((rejection, bytes.to_vec())),
        },
    };
    match expected_user {
        Some(user) if record.user_id() != user => {
            let raw = bytes.map_or_else(
                || spendflow_operators::decode::encode(&record).into_bytes(),
                |bytes| bytes.to_vec(),
            );
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
