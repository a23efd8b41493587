//! Rejected records: never dropped silently.
//!
//! Every record that fails to decode or validate is counted by reason and kept, with where it
//! came from and the first bytes of it, in a bounded ring of the most recent ones (older ones
//! are only counted, so a flood of bad input cannot exhaust memory). `Admin/GetStatus` reports
//! the counts and `Admin/ListRejected` the ring. Durable dead-letter outputs (a Kafka topic)
//! receive the same records.

use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use spendflow_operators::RejectReason;

use crate::checkpoint::{DeadLetterScan, SavedPosition};

#[cfg(feature = "kafka")]
pub mod kafka;

/// The default dead-letter topic.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "expenses.dead-letter";

/// Where dead letters go besides the in-memory ring: a durable output such as a Kafka topic.
pub trait DeadLetterOutput: Send + Sync + std::fmt::Debug {
    /// Sends one rejected record with its complete original bytes and key. The output keeps
    /// it until it is delivered (retrying failed deliveries), and may block while too much is
    /// undelivered (back-pressure) rather than drop it.
    fn send(&self, rejected: &RejectedRecord, raw: &[u8], key: Option<&[u8]>);
    /// Waits until everything sent before the call is delivered; false if some of it is not
    /// delivered in time (it stays kept and retried).
    fn flush(&self) -> bool;
    /// Where a restart from a checkpoint at `positions` must start reading the durable output
    /// to find the dead letters of records it reads again; `None`: from the start.
    fn scan_start(&self, _positions: &[SavedPosition]) -> Option<DeadLetterScan> {
        None
    }
    /// A checkpoint at `positions` is written: what only a restart from an older one needed
    /// may be forgotten.
    fn checkpointed(&self, _positions: &[SavedPosition]) {}
    /// The engine stops: stop waiting for room in [`DeadLetterOutput::send`] (what is not
    /// delivered is covered by no checkpoint, so a restart sends it again).
    fn close(&self) {}
}

/// Bytes of a rejected record kept for inspection.
pub const RAW_PREFIX_BYTES: usize = 256;

/// Rejected records kept in memory by default.
pub const DEFAULT_CAPACITY: usize = 1000;

/// One rejected record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedRecord {
    /// Why it was rejected.
    pub reason: RejectReason,
    /// What exactly was wrong.
    pub detail: String,
    /// The source it came from.
    pub source: Arc<str>,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Its first [`RAW_PREFIX_BYTES`] bytes.
    pub raw_prefix: Vec<u8>,
}

/// The in-memory dead-letter collection; shared by all workers.
#[derive(Debug)]
pub(crate) struct DeadLetters {
    recent: Mutex<VecDeque<RejectedRecord>>,
    capacity: usize,
    by_reason: Vec<AtomicU64>,
    total: AtomicU64,
    output: Option<Box<dyn DeadLetterOutput>>,
}

impl Default for DeadLetters {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl DeadLetters {
    /// A collection that keeps the `capacity` most recent rejected records.
    pub fn with_capacity(capacity: usize) -> Self {
        DeadLetters {
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity,
            by_reason: RejectReason::ALL_CODES
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            total: AtomicU64::new(0),
            output: None,
        }
    }

    /// Also sends every dead letter to `output`.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub fn with_output(mut self, output: Box<dyn DeadLetterOutput>) -> Self {
        self.output = Some(output);
        self
    }

    /// Delivers what the durable output still holds (before a checkpoint, at shutdown);
    /// false if some of it could not be delivered in time.
    pub fn flush(&self) -> bool {
        self.output.as_ref().is_none_or(|output| output.flush())
    }

    /// See [`DeadLetterOutput::scan_start`].
    pub fn scan_start(&self, positions: &[SavedPosition]) -> Option<DeadLetterScan> {
        self.output.as_ref()?.scan_start(positions)
    }

    /// See [`DeadLetterOutput::checkpointed`].
    pub fn checkpointed(&self, positions: &[SavedPosition]) {
        if let Some(output) = &self.output {
            output.checkpointed(positions);
        }
    }

    /// See [`DeadLetterOutput::close`].
    pub fn close(&self) {
        if let Some(output) = &self.output {
            output.close();
        }
    }

    /// Counts and keeps a rejected record; `raw` is the whole original record and `key` its
    /// key, for the durable output.
    pub fn record(&self, rejected: RejectedRecord, raw: &[u8], key: Option<&[u8]>) {
        if let Some(output) = &self.output {
            output.send(&rejected, raw, key);
        }
        let code = rejected.reason.code();
        if let Some(i) = RejectReason::ALL_CODES.iter().position(|c| *c == code) {
            self.by_reason[i].fetch_add(1, Ordering::Relaxed);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            reason = code,
            source = %rejected.source,
            partition = rejected.partition,
            offset = rejected.offset,
            detail = %rejected.detail,
            "Rejected a record."
        );
        if self.capacity == 0 {
            return;
        }
        let mut recent = self.recent.lock();
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(rejected);
    }

    /// Adds counts carried over from a checkpoint (`(reason code, count)`; unknown codes are
    /// counted in the total only).
    pub fn restore_counts(&self, counts: &[(String, u64)]) {
        for (code, n) in counts {
            if let Some(i) = RejectReason::ALL_CODES.iter().position(|c| c == code) {
                self.by_reason[i].fetch_add(*n, Ordering::Relaxed);
            }
            self.total.fetch_add(*n, Ordering::Relaxed);
        }
    }

    /// Rejected records ever counted.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts by reason code, for the reasons seen at least once.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        RejectReason::ALL_CODES
            .iter()
            .zip(&self.by_reason)
            .map(|(code, n)| (*code, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The `limit` most recent rejected records, newest first.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub fn recent(&self, limit: usize) -> Vec<RejectedRecord> {
        let recent = self.recent.lock();
        recent.iter().rev().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(offset: i64, reason: RejectReason) -> RejectedRecord {
        RejectedRecord {
            reason,
            detail: "x".into(),
            source: Arc::from("input"),
            partition: 0,
            offset,
            raw_prefix: vec![b'{'],
        }
    }

    #[test]
    fn keeps_the_newest_and_counts_all() {
        let dl = DeadLetters::with_capacity(3);
        for i in 0..10 {
            let reason = if i % 2 == 0 {
                RejectReason::BadJson
            } else {
                RejectReason::BadCurrency
            };
            dl.record(rejected(i, reason), b"{", None);
        }
        assert_eq!(dl.total(), 10);
        assert_eq!(
            dl.counts(),
            BTreeMap::from([("bad_currency", 5), ("bad_json", 5)])
        );
        let offsets: Vec<i64> = dl.recent(10).iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![9, 8, 7]);
    }
}
