//! The types every part of the engine shares: where the input stands (partition positions,
//! `as_of`), epochs, and the value of one aggregate cell. Sources produce positions, the
//! pipeline pairs them with epochs, sinks and the serving side consume both; none of them
//! imports another to get these.

use std::sync::Arc;
use std::time::Instant;

use spendflow_operators::model::civil_from_days;

pub use spendflow_operators::{AggKey, Epoch, UserId};

/// Whether a partition is being read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PartitionState {
    /// Read as records arrive.
    #[default]
    Reading,
    /// No longer read: records it had to read next were deleted from the source (retention,
    /// `kafka-delete-records`) before they were read. It keeps its lag, so the engine is never
    /// caught up again until an operator decides (`--on-data-loss skip` on a restart).
    StoppedDataLoss,
    /// No longer read: its topic was deleted while it was being read.
    Deleted,
}

impl PartitionState {
    /// The name `Admin/GetStatus` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionState::Reading => "reading",
            PartitionState::StoppedDataLoss => "stopped_data_loss",
            PartitionState::Deleted => "deleted",
        }
    }
}

/// Offsets `[from, to)` of a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetRange {
    /// The first offset of the range.
    pub from: i64,
    /// The offset after the range.
    pub to: i64,
}

/// The read position of one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionPosition {
    /// The source's name (`file:/path`, `generator`, `input`, a topic).
    pub source: Arc<str>,
    /// The partition number.
    pub partition: i32,
    /// The next offset to read.
    pub position: i64,
    /// The end of the partition when last checked, if known.
    pub high_watermark: Option<i64>,
    /// Whether the partition is read.
    pub state: PartitionState,
    /// Why the partition is not read, or what went wrong with it.
    pub error: Option<Arc<str>>,
    /// Offset ranges that were deleted from the source before they were read (lost input).
    pub lost: Vec<OffsetRange>,
}

/// `(count, sum)` of a cell as the read model keeps it: the sum in 128 bits, so that no total
/// ever wraps, however many changes accumulate over time (every change is an `i64`, so a sum
/// of 2^64 changes still fits). Where a value leaves the engine through a 64-bit type (gRPC
/// `int64`, Cassandra `bigint`), a sum outside `i64` is refused there with an error naming the
/// user and cell, never truncated. Cost: a cell's value takes 32 bytes instead of 16 (the
/// `i128` is 16-byte aligned), on top of its key and the map's node overhead.
pub type Amount = (i64, i128);

/// Where a snapshot or answer stands in the input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AsOf {
    /// The last closed epoch included.
    pub epoch: Epoch,
    /// For every input partition, the position before which all records are included.
    pub positions: Arc<Vec<PartitionPosition>>,
    /// The timeline the epoch belongs to: epoch numbers compare only within one incarnation.
    /// A new one is drawn whenever the engine starts without restoring a checkpoint (its epochs
    /// start over); a restart that restores a checkpoint keeps the checkpoint's incarnation.
    pub incarnation: Arc<str>,
}

/// A fresh incarnation id: 64 random bits in hex.
pub fn new_incarnation() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The value of one cell after an epoch, as published to subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellValue {
    /// The cell.
    pub key: AggKey,
    /// Live expenses in it; `0` together with `sum == 0` means the cell is gone.
    pub count: i64,
    /// Their total, minor units (128 bits: see [`Amount`]).
    pub sum: i128,
    /// For a user cell: the user's newest event time.
    pub last_event_ms: Option<i64>,
}

impl CellValue {
    /// True if the cell no longer exists.
    pub fn removed(&self) -> bool {
        self.count == 0 && self.sum == 0
    }
}

/// `2026-11-24` for a day number.
pub fn format_day(day: i32) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `2026-11` for a month bucket.
pub fn format_month(month: i32) -> String {
    let (y, m) = spendflow_operators::model::split_month(month);
    format!("{y:04}-{m:02}")
}

/// What a cell is, for messages: `user total`, `category "fuel"`, `day 2026-11-24` ...
pub fn describe_cell(key: &AggKey) -> String {
    match key {
        AggKey::User(_) => "user total".to_string(),
        AggKey::Category(_, name) => format!("category {:?}", name.text()),
        AggKey::Merchant(_, name) => format!("merchant {:?}", name.text()),
        AggKey::Day(_, day) => format!("day {}", format_day(*day)),
        AggKey::Month(_, month) => format!("month {}", format_month(*month)),
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
    pub(crate) fn failed(&mut self, error: String) {
        self.last_error = Some(error);
        self.failures += 1;
        self.consecutive_failures += 1;
    }

    pub(crate) fn written(&mut self, epoch: Epoch) {
        self.last_epoch = epoch;
        self.last_at = Some(Instant::now());
        self.consecutive_failures = 0;
    }
}
