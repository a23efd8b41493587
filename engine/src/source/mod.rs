//! Sources: where records come from.
//!
//! A source is read by one worker thread, which polls it for raw records, decodes them and
//! pushes them into the dataflow. Every record comes with its position (partition and offset),
//! so the engine knows exactly which input each closed epoch covers (`as_of`) and, later, where
//! to resume after a restart. Each partition is read by exactly one worker, which keeps the
//! records of an expense in input order (see `spendflow_operators::upsert`).
//!
//! | source | partitions | read by |
//! |---|---|---|
//! | [`generator`] | one, offset = records generated | worker 0 |
//! | [`file`](mod@file) | one, offset = byte offset of the next line | worker 0 |
//! | [`input`] | one, offset = records pushed | worker 0 |
//! | [`kafka`] | every matching topic's partitions, offset = Kafka offset | divided by a stable hash |

pub mod file;
pub mod generator;
pub mod input;
pub mod kafka;

use std::sync::Arc;

use spendflow_operators::{Record, UserId};

use crate::error::SourceError;

/// The payload of a source record: bytes to decode, or a record decoded already (in-process
/// input from Rust code).
#[derive(Clone, Debug)]
pub enum Payload {
    /// JSON v1 bytes; decoded by the worker.
    Bytes(Vec<u8>),
    /// A record built in process; it skips decoding.
    Record(Record),
}

/// One record as a source returns it.
#[derive(Clone, Debug)]
pub struct SourceRecord {
    /// What to decode.
    pub payload: Payload,
    /// Index of the partition in the source's [`Source::partitions`].
    pub partition: usize,
    /// The record's offset in its partition.
    pub offset: i64,
    /// The user the record must belong to, when the source knows (a per-user topic).
    pub expected_user: Option<UserId>,
    /// The record's key, where the source has keys (Kafka); kept for dead letters.
    pub key: Option<Vec<u8>>,
}

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

/// What a poll found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Records were returned; there may be more right away.
    Ready,
    /// Nothing is available now; poll again later.
    Idle,
    /// Nothing is available now, but the source is not caught up either: it has not yet found
    /// everything it will read (partitions not yet discovered, ends not yet checked), or a
    /// partition is stopped and keeps its lag. Poll again later.
    Behind,
    /// The source has ended for good (a file without `--follow` at its end).
    Finished,
}

/// A source of records, read by one worker.
pub trait Source: Send {
    /// Appends at most `max` records to `out` and says whether more may follow.
    ///
    /// # Errors
    ///
    /// A [`SourceError`]; the caller retries the retriable ones.
    fn poll(&mut self, out: &mut Vec<SourceRecord>, max: usize) -> Result<Poll, SourceError>;

    /// The position of every partition after the records returned so far.
    fn partitions(&self) -> Vec<PartitionPosition>;
}
