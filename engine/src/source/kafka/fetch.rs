//! The read-ahead of the Kafka source: a fetch thread per source polls the consumer
//! continuously and hands whole batches to the worker over a bounded channel.
//!
//! The worker never waits in librdkafka's queue while records are on their way: it takes what
//! the fetch thread has ready, decodes and pushes it. The channel holds at most
//! [`BATCHES_AHEAD`] batches of at most [`FETCH_BATCH`] records; when it is full the fetch
//! thread blocks, librdkafka's own prefetch queue fills up to `queued.max.messages.kbytes` and
//! fetching stops: memory stays bounded.
//!
//! Positions are the worker's business: a record in the channel (or in the batch the worker is
//! taking from) has not been pushed into the dataflow, so it never moves its partition's
//! position. [`ReadAhead::take`] moves a partition's position only past a record it hands to
//! the worker, in the same step.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use spendflow_operators::UserId;

use crate::source::{PartitionState, Payload, SourceRecord};

use super::consumer::Assigned;

/// Records per batch handed to the worker, at most.
pub(super) const FETCH_BATCH: usize = 4096;
/// Batches the channel holds before the fetch thread waits for the worker.
pub(super) const BATCHES_AHEAD: usize = 8;
/// How long one poll of the fetch thread blocks when librdkafka has nothing: a real timeout
/// (the thread has nothing else to do), short enough to notice a stop soon.
const FETCH_WAIT: Duration = Duration::from_millis(100);
/// How long the worker waits for the first batch of a poll when none is ready (as long as the
/// old in-worker `consumer.poll` did).
const FIRST_WAIT: Duration = Duration::from_millis(1);
/// The buffer the fetch thread copies payloads and keys into: records are slices of it, so a
/// record costs no allocation of its own (one per buffer instead: two per record, made on the
/// fetch thread and freed on the worker, contended on the allocator's lock in profiles).
const ARENA_BYTES: usize = 1 << 20;

/// One record read ahead.
#[derive(Debug)]
pub(super) struct Fetched {
    /// Interned: one allocation per topic, not per record.
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub payload: Bytes,
    pub key: Option<Bytes>,
}

/// Copies records' bytes into a shared buffer and hands out slices of it.
struct Arena(BytesMut);

impl Arena {
    fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if self.0.capacity() - self.0.len() < bytes.len() {
            // The slices handed out keep the old buffer alive; this one starts a new one.
            self.0 = BytesMut::with_capacity(ARENA_BYTES.max(bytes.len()));
        }
        self.0.extend_from_slice(bytes);
        self.0.split().freeze()
    }
}

/// What the fetch thread hands over, in consumer order.
#[derive(Debug)]
pub(super) enum Fetch {
    Records(Vec<Fetched>),
    /// A consume error; the records before it were sent first.
    Error(KafkaError),
}

/// The fetch thread's end of the read-ahead: counts the records it sends.
pub(super) struct Feed {
    tx: Sender<Fetch>,
    in_flight: Arc<AtomicUsize>,
}

impl Feed {
    /// Sends, waiting while the channel is full. False once the worker's end is gone.
    pub(super) fn send(&self, fetch: Fetch) -> bool {
        let n = match &fetch {
            Fetch::Records(batch) => batch.len(),
            Fetch::Error(_) => 0,
        };
        self.in_flight.fetch_add(n, Ordering::Relaxed);
        self.tx.send(fetch).is_ok()
    }
}

/// The worker's end of the read-ahead: the channel and the batch being taken from.
pub(super) struct ReadAhead {
    rx: Option<Receiver<Fetch>>,
    pending: std::vec::IntoIter<Fetched>,
    /// Records in the channel (sent, not yet received).
    in_flight: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What [`ReadAhead::take`] ended on.
#[derive(Debug)]
pub(super) enum Taken {
    /// `max` records were taken, or nothing more is ready.
    Done,
    /// A consume error came after the records taken; the caller handles it and may take more.
    Error(KafkaError),
    /// The fetch thread is gone (it panicked).
    Gone,
}

impl ReadAhead {
    /// Starts the fetch thread of `consumer` (named after `worker`).
    pub(super) fn start(consumer: Arc<BaseConsumer>, worker: usize) -> std::io::Result<Self> {
        let (feed, mut ahead) = Self::fed();
        let stop = Arc::clone(&ahead.stop);
        ahead.thread = Some(
            std::thread::Builder::new()
                .name(format!("spendflow-fetch-{worker}"))
                .spawn(move || fetch_loop(&consumer, &feed, &stop))?,
        );
        Ok(ahead)
    }

    /// A read-ahead fed through the returned [`Feed`], without a thread yet.
    pub(super) fn fed() -> (Feed, Self) {
        let (tx, rx) = crossbeam_channel::bounded(BATCHES_AHEAD);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let ahead = ReadAhead {
            rx: Some(rx),
            pending: Vec::new().into_iter(),
            in_flight: Arc::clone(&in_flight),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        (Feed { tx, in_flight }, ahead)
    }

    /// Records read ahead and not yet taken by the worker.
    pub(super) fn buffered(&self) -> usize {
        self.pending.len() + self.in_flight.load(Ordering::Relaxed)
    }

    /// Moves up to `max` ready records of partitions being read into `out`, each moving its
    /// partition's position past it. Records of partitions not (or no longer) read, and records
    /// below a partition's position (fetched before the partition was moved), are dropped.
    pub(super) fn take(
        &mut self,
        assigned: &mut [Assigned],
        index: &BTreeMap<(Arc<str>, i32), usize>,
        out: &mut Vec<SourceRecord>,
        max: usize,
    ) -> Taken {
        let Some(rx) = &self.rx else {
            return Taken::Gone;
        };
        let start = out.len();
        let mut first = true;
        while out.len() - start < max {
            let Some(fetched) = self.pending.next() else {
                let next = if first {
                    first = false;
                    rx.recv_timeout(FIRST_WAIT).map_err(|e| match e {
                        RecvTimeoutError::Timeout => TryRecvError::Empty,
                        RecvTimeoutError::Disconnected => TryRecvError::Disconnected,
                    })
                } else {
                    rx.try_recv()
                };
                match next {
                    Ok(Fetch::Records(batch)) => {
                        self.in_flight.fetch_sub(batch.len(), Ordering::Relaxed);
                        self.pending = batch.into_iter();
                        continue;
                    }
                    Ok(Fetch::Error(e)) => return Taken::Error(e),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Taken::Gone,
                }
            };
            let Fetched {
                topic,
                partition,
                offset,
                payload,
                key,
            } = fetched;
            let Some(&i) = index.get(&(topic, partition)) else {
                continue;
            };
            let a = &mut assigned[i];
            if a.status.state != PartitionState::Reading || offset < a.status.position {
                continue;
            }
            let expected_user = a.expected_user.or_else(|| {
                let key = std::str::from_utf8(key.as_deref()?).ok()?;
                key.parse::<UserId>().ok()
            });
            out.push(SourceRecord {
                payload: Payload::Bytes(payload),
                partition: i,
                offset,
                expected_user,
                key,
            });
            a.status.position = offset + 1;
        }
        Taken::Done
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Dropping the receiver wakes a fetch thread blocked on a full channel.
        self.rx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The fetch thread: polls until stopped or the worker's end is gone, sending a batch when it
/// is full or when librdkafka has nothing more right now.
fn fetch_loop(consumer: &BaseConsumer, feed: &Feed, stop: &AtomicBool) {
    let mut topics: HashSet<Arc<str>> = HashSet::new();
    let mut batch: Vec<Fetched> = Vec::with_capacity(FETCH_BATCH);
    let mut arena = Arena(BytesMut::with_capacity(ARENA_BYTES));
    let send = |batch: &mut Vec<Fetched>| -> bool {
        let full = std::mem::replace(batch, Vec::with_capacity(FETCH_BATCH));
        feed.send(Fetch::Records(full))
    };
    while !stop.load(Ordering::Acquire) {
        let wait = if batch.is_empty() {
            FETCH_WAIT
        } else {
            Duration::ZERO
        };
        match consumer.poll(wait) {
            None => {
                if !batch.is_empty() && !send(&mut batch) {
                    return;
                }
            }
            Some(Ok(message)) => {
                let topic = match topics.get(message.topic()) {
                    Some(topic) => Arc::clone(topic),
                    None => {
                        let topic = Arc::<str>::from(message.topic());
                        topics.insert(Arc::clone(&topic));
                        topic
                    }
                };
                batch.push(Fetched {
                    topic,
                    partition: message.partition(),
                    offset: message.offset(),
                    payload: arena.copy(message.payload().unwrap_or_default()),
                    key: message.key().map(|key| arena.copy(key)),
                });
                if batch.len() >= FETCH_BATCH && !send(&mut batch) {
                    return;
                }
            }
            Some(Err(e)) => {
                if (!batch.is_empty() && !send(&mut batch)) || !feed.send(Fetch::Error(e)) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_slices_keep_their_bytes_across_buffers() {
        let mut arena = Arena(BytesMut::with_capacity(ARENA_BYTES));
        // Records of every size, past several buffers, and one larger than a buffer.
        let sizes = (0..5_000usize)
            .map(|i| (i * 37) % 700)
            .chain([ARENA_BYTES + 3, 0, 12]);
        let mut kept = Vec::new();
        for (i, size) in sizes.enumerate() {
            let bytes: Vec<u8> = (0..size).map(|j| (i + j) as u8).collect();
            kept.push((arena.copy(&bytes), bytes));
        }
        for (slice, bytes) in &kept {
            assert_eq!(&slice[..], &bytes[..]);
        }
    }
}
