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
//! | `mysql_cdc` | one, offset = binlog position (`file seq << 32 \| byte`) | worker 0 |

//!
//! # Adding a source
//!
//! One folder here (`config.rs` with a serde config, the reader implementing [`Source`],
//! `tests.rs`) and one [`SourceConfig`] variant whose arm in [`SourceConfig::open_readers`]
//! builds the readers of one worker from the restored positions. The engine places every
//! source with that one call per worker; it never needs to know the kind.

pub mod file;
pub mod generator;
pub mod input;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mysql-cdc")]
pub mod mysql_cdc;

use spendflow_operators::reference::RefChange;
use spendflow_operators::{Record, UserId};

use std::collections::BTreeMap;

use serde::Deserialize;

pub use crate::core::{OffsetRange, PartitionPosition, PartitionState};
use crate::error::SourceError;

/// The payload of a source record: bytes to decode, or a record decoded already (in-process
/// input from Rust code).
#[derive(Clone, Debug)]
pub enum Payload {
    /// JSON v1 bytes; decoded by the worker. `Bytes`, not `Vec<u8>`: the Kafka source copies
    /// a whole batch of records into one buffer and hands out slices of it, instead of one
    /// allocation per record made on its fetch thread and freed on the worker.
    Bytes(bytes::Bytes),
    /// A record built in process; it skips decoding.
    Record(Record),
    /// A change of reference data (a user's budget or currency, an exchange rate), from a CDC
    /// source or the simulator; it joins the expenses (see `spendflow_operators::reference`).
    Reference(RefChange),
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
    pub key: Option<bytes::Bytes>,
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

    /// True while the source knows of a large backlog it has not returned yet (catch-up). The
    /// engine then cuts epochs by record budget instead of by timer (see
    /// `pipeline::EpochClock`). Sources that cannot tell say false: epochs stay timed.
    fn lagging(&self) -> bool {
        false
    }
}

/// A source of records, as configured (the command line, a config file, an embedding program).
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// The seeded in-process simulator.
    Generator(generator::GeneratorSourceConfig),
    /// A file of JSON lines.
    File(file::FileSourceConfig),
    /// Kafka topics, by name or pattern.
    #[cfg(feature = "kafka")]
    Kafka(kafka::KafkaSourceConfig),
    /// Users' budgets and exchange rates from a MySQL/MariaDB binlog (reference data).
    #[cfg(feature = "mysql-cdc")]
    MysqlCdc(mysql_cdc::MysqlCdcSourceConfig),
}

/// Where a source resumes: the position of every `(source name, partition)` a restored
/// checkpoint recorded. A partition not listed starts at its beginning.
pub type RestoredPositions = BTreeMap<(String, i32), i64>;

/// Which worker the readers are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerPlace {
    /// This worker's index, `0..count`.
    pub index: usize,
    /// How many workers there are.
    pub count: usize,
}

impl SourceConfig {
    /// The readers worker `place` runs for this source, resuming at `restored`.
    ///
    /// Single-partition sources (generator, file, MySQL CDC) are read by worker 0 only; Kafka gives every
    /// worker a reader of its own share of the partitions.
    ///
    /// # Errors
    ///
    /// A [`SourceError`] if the source cannot be opened.
    pub fn open_readers(
        &self,
        place: WorkerPlace,
        restored: &RestoredPositions,
    ) -> Result<Vec<Box<dyn Source>>, SourceError> {
        match self {
            SourceConfig::Generator(g) if place.index == 0 => {
                Ok(vec![Box::new(generator::GeneratorSource::new(g.clone())?)])
            }
            SourceConfig::File(f) if place.index == 0 => Ok(vec![Box::new(
                file::FileSource::resume(f.clone(), restored)?,
            )]),
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(k) => Ok(vec![Box::new(kafka::KafkaSource::new(
                k.clone(),
                place.index,
                place.count,
                restored.clone(),
            )?)]),
            #[cfg(feature = "mysql-cdc")]
            SourceConfig::MysqlCdc(m) if place.index == 0 => Ok(vec![Box::new(
                mysql_cdc::MysqlCdcSource::resume(m.clone(), restored)?,
            )]),
            #[cfg(feature = "mysql-cdc")]
            SourceConfig::MysqlCdc(_) => Ok(Vec::new()),
            SourceConfig::Generator(_) | SourceConfig::File(_) => Ok(Vec::new()),
        }
    }
}
