//! Steps 1–4 on one worker thread: poll the sources, decode, push into the dataflow, cut
//! epochs, step, and report what closed to the publisher.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
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
