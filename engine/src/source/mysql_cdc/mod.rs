//! The MySQL/MariaDB CDC source: users' budgets and currencies (`users`) and exchange rates
//! (`fx_rates`) of one database, as [`RefChange`]s, from a consistent snapshot and then the
//! server's row-based binlog.
//!
//! # What it reads
//!
//! The database is the URL's (default `spendflow`). A `users` row becomes
//! `RefKey::User(user_id)` with `RefValue::User { budget_minor, currency }`
//! (`monthly_budget_minor`, SQL `NULL` → `None`); an `fx_rates` row becomes
//! `RefKey::Fx(currency)` with `RefValue::Fx { rate_micros }`; a deleted row a change with
//! `value: None`. An update that changes none of these columns yields no change (MariaDB writes
//! no rows event for an update that changes nothing at all). Other tables and other databases
//! are ignored.
//!
//! A row whose currency is not three uppercase ASCII letters, or whose rate is not positive, is
//! skipped with a WARN naming the table, the row's key and the value. The dead-letter output
//! is for Kafka records (bytes that did not decode), not for database rows: fix the row in
//! MySQL and its next change is read.
//!
//! Columns are found by name in `information_schema` (a binlog row carries positions only), when
//! a table is first met and again after any DDL statement. The schema a row is decoded with is
//! therefore the current one: a table altered while the source was stopped, and a binlog read
//! from before the change, decode with the wrong columns. Do not alter the two tables' columns
//! under a running pipeline without restarting it from a new snapshot.
//!
//! # Server requirements
//!
//! `--log-bin --binlog-format=ROW` (full row images, the default), a `server_id`, and a user with
//! `SELECT` on the database and `REPLICATION SLAVE, REPLICATION CLIENT` on the server (the
//! services kit's MariaDB has all of them). The reader registers as a replica with
//! [`MysqlCdcSourceConfig::server_id`].
//!
//! # Positions
//!
//! One partition (read by worker 0). Its offset encodes a binlog position `(file, byte)` as
//! `seq << 32 | byte`, `seq` being the file's sequence number (`mariadb-bin.000042` → 42): it
//! grows monotonically along the binlog, also across files ([`BinlogPosition`]). The file's base
//! name (`mariadb-bin`) is the server's, read from `SHOW MASTER STATUS` when the source opens.
//! Offset 0 means no position: the source starts with a snapshot.
//!
//! The position moves only past whole transactions: the rows of a transaction are held until
//! its commit event (`XID`, or a `COMMIT` query for non-transactional tables) and then handed to
//! the worker with the position after that event; outside transactions it moves past every
//! event (DDL, rotations, format descriptions). [`Source::partitions`] reports the position
//! past the last *transaction* whose changes were all taken, so a checkpoint never holds a
//! position inside a transaction, and a reader resumed there starts with the next one.
//!
//! # Start
//!
//! * No restored position: `START TRANSACTION WITH CONSISTENT SNAPSHOT`, one change per row of
//!   both tables, and the binlog from `Binlog_snapshot_file/position` (`SHOW STATUS LIKE
//!   'binlog_snapshot_%'`), the point that snapshot stands at. The position stays 0 until the
//!   last snapshot row is taken, so a checkpoint taken during the snapshot takes it again.
//! * Restored: the binlog from the restored position; no snapshot (the checkpoint holds the
//!   rows). If that position's binlog file is gone from the server (purged, or expired by
//!   `binlog_expire_logs_seconds`), the source refuses to start: the changes in between are
//!   lost, and the engine stops rather than keep budgets and rates it cannot know are current.
//!
//! # Caught up
//!
//! [`Poll::Behind`] until the snapshot is taken and the position has reached the end of the
//! binlog that `SHOW MASTER STATUS` reported when the source opened (and while reconnecting);
//! [`Poll::Idle`] after that when nothing is pending.
//!
//! # Threads and errors
//!
//! The snapshot and the binlog stream are read on a thread of their own, which hands whole
//! transactions to the worker over a bounded channel (as the Kafka source's read-ahead does):
//! the worker's poll never blocks. The thread asks the server for a heartbeat every second, so
//! it notices a stop soon, and treats 30 s without any event as a dead connection.
//!
//! A dropped connection is retriable: the thread reports it once ([`SourceError::Mysql`] with
//! `retriable: true`), then reconnects (backing off to 30 s) and resumes at the end of the last
//! transaction it handed over (a snapshot cut short is taken again from the start). A missing
//! binlog file, the binlog being off or not row-based, and refused credentials are fatal.

mod config;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crossbeam_channel::{Receiver, TryRecvError};
use spendflow_operators::reference::RefChange;

pub use config::{DEFAULT_SERVER_ID, MysqlCdcSourceConfig};

use crate::error::SourceError;
use crate::source::{PartitionPosition, Payload, Poll, RestoredPositions, Source, SourceRecord};

/// A position in the binlog: the file's sequence number and a byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BinlogPosition {
    /// The file's sequence number: the digits after the last `.` of its name.
    pub seq: u32,
    /// The byte offset in the file.
    pub pos: u32,
}

impl BinlogPosition {
    /// The largest sequence number an offset can hold (it stays a positive `i64`).
    pub const MAX_SEQ: u32 = i32::MAX as u32;

    /// The partition offset: `seq << 32 | pos`, monotonic along the binlog.
    pub fn encode(self) -> i64 {
        (i64::from(self.seq.min(Self::MAX_SEQ)) << 32) | i64::from(self.pos)
    }

    /// The position an offset encodes; `None` for 0 and negative offsets (no position).
    pub fn decode(offset: i64) -> Option<Self> {
        (offset > 0).then_some(BinlogPosition {
            seq: (offset >> 32) as u32,
            pos: (offset & 0xffff_ffff) as u32,
        })
    }

    /// The position of file `name` at byte `pos`, if the name ends in `.<digits>`.
    pub fn of_file(name: &str, pos: u64) -> Option<Self> {
        let (_, seq) = split_file_name(name)?;
        Some(BinlogPosition {
            seq,
            pos: u32::try_from(pos).ok()?,
        })
    }

    /// The name of this position's file in a binlog whose files are `<base>.<seq>`.
    pub fn file_name(self, base: &str) -> String {
        format!("{base}.{:06}", self.seq)
    }
}

/// `mariadb-bin.000042` → `("mariadb-bin", 42)`.
pub fn split_file_name(name: &str) -> Option<(&str, u32)> {
    let (base, digits) = name.rsplit_once('.')?;
    if base.is_empty() || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: u32 = digits.parse().ok()?;
    (seq <= BinlogPosition::MAX_SEQ).then_some((base, seq))
}

/// What the reading thread hands the worker, in binlog order.
#[derive(Debug)]
enum Item {
    /// A change of a transaction not yet complete; `offset` is its commit position.
    Change { change: RefChange, offset: i64 },
    /// Everything up to this offset was handed over: the position may move here.
    Commit(i64),
    /// The snapshot ended here (all its rows were handed over).
    SnapshotDone(i64),
    /// The thread could not read; the retriable ones are followed by more items.
    Error(SourceError),
}

/// Items per message on the channel, at most.
const BATCH: usize = 1024;
/// Messages the channel holds before the thread waits for the worker.
const BATCHES_AHEAD: usize = 8;

/// The CDC source's reader (one partition, worker 0).
pub struct MysqlCdcSource {
    name: Arc<str>,
    rx: Receiver<Vec<Item>>,
    pending: VecDeque<Item>,
    /// Offset past the last transaction whose changes were all taken.
    position: i64,
    /// `SHOW MASTER STATUS` when the source opened.
    end: i64,
    snapshot_done: bool,
    /// False while the thread is reconnecting.
    connected: Arc<AtomicBool>,
    /// The server's id of the connection streaming the binlog (its `Binlog Dump` thread).
    dump_connection: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    failed: bool,
}

impl std::fmt::Debug for MysqlCdcSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlCdcSource")
            .field("name", &self.name)
            .field("position", &self.position)
            .field("end", &self.end)
            .field("snapshot_done", &self.snapshot_done)
            .field(
                "dump_connection",
                &self.dump_connection.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl MysqlCdcSource {
    /// Opens the source at the position `restored` holds for it (a snapshot first if none).
    ///
    /// # Errors
    ///
    /// [`SourceError::Mysql`]: the server cannot be reached (retriable), or it has no row-based
    /// binlog, or the restored position's file is gone (fatal, with what to do).
    pub fn resume(
        config: MysqlCdcSourceConfig,
        restored: &RestoredPositions,
    ) -> Result<Self, SourceError> {
        let (_, database) = crate::mysql_client::database_of(&config.url)
            .map_err(|e| stream::config_error(e.to_string()))?;
        let name: Arc<str> = Arc::from(source_name(&database));
        let start = restored
            .get(&(name.to_string(), 0))
            .copied()
            .and_then(BinlogPosition::decode);
        let opened = stream::open(&config, start)?;
        let connected = Arc::new(AtomicBool::new(true));
        let dump_connection = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::bounded(BATCHES_AHEAD);
        let end = opened.end.encode();
        let reader = stream::Reader::new(
            config,
            opened,
            start,
            tx,
            Arc::clone(&connected),
            Arc::clone(&dump_connection),
            Arc::clone(&stop),
        );
        std::thread::Builder::new()
            .name("spendflow-mysql-cdc".into())
            .spawn(move || reader.run())
            .map_err(|e| SourceError::Mysql {
                message: format!("cannot start the binlog reader thread: {e}"),
                retriable: true,
            })?;
        Ok(MysqlCdcSource {
            name,
            rx,
            pending: VecDeque::new(),
            position: start.map_or(0, BinlogPosition::encode),
            end,
            snapshot_done: start.is_some(),
            connected,
            dump_connection,
            stop,
            failed: false,
        })
    }

    /// The source name positions are recorded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's id of the connection streaming the binlog now (0 before it is open).
    pub fn dump_connection_id(&self) -> u32 {
        self.dump_connection.load(Ordering::Relaxed)
    }

    fn caught_up(&self) -> bool {
        self.snapshot_done && self.position >= self.end
    }
}

/// The source name of a database's CDC positions: `mysql:<database>`.
pub fn source_name(database: &str) -> String {
    format!("mysql:{database}")
}

impl Drop for MysqlCdcSource {
    fn drop(&mut self) {
        // The thread sees it at its next event or heartbeat (at most about a second), or when
        // it next sends: the channel's receiving end is gone.
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Source for MysqlCdcSource {
    fn poll(&mut self, out: &mut Vec<SourceRecord>, max: usize) -> Result<Poll, SourceError> {
        let start = out.len();
        while out.len() - start < max {
            let item = match self.pending.pop_front() {
                Some(item) => item,
                None => match self.rx.try_recv() {
                    Ok(batch) => {
                        self.pending.extend(batch);
                        continue;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if out.len() > start {
                            break;
                        }
                        if self.failed {
                            return Ok(Poll::Finished);
                        }
                        self.failed = true;
                        return Err(SourceError::Mysql {
                            message: "the binlog reader thread stopped".into(),
                            retriable: false,
                        });
                    }
                },
            };
            match item {
                Item::Change { change, offset } => out.push(SourceRecord {
                    payload: Payload::Reference(change),
                    partition: 0,
                    offset,
                    expected_user: None,
                    key: None,
                }),
                Item::Commit(offset) => self.position = self.position.max(offset),
                Item::SnapshotDone(offset) => {
                    self.position = self.position.max(offset);
                    self.snapshot_done = true;
                }
                Item::Error(e) => {
                    if out.len() > start {
                        // The records before it first; the error on the next poll.
                        self.pending.push_front(Item::Error(e));
                        break;
                    }
                    if !e.is_retriable() {
                        self.failed = true;
                    }
                    return Err(e);
                }
            }
        }
        if out.len() > start {
            Ok(Poll::Ready)
        } else if self.caught_up() && self.connected.load(Ordering::Relaxed) {
            Ok(Poll::Idle)
        } else {
            Ok(Poll::Behind)
        }
    }

    fn partitions(&self) -> Vec<PartitionPosition> {
        vec![PartitionPosition {
            source: Arc::clone(&self.name),
            partition: 0,
            position: self.position,
            high_watermark: Some(self.end.max(self.position)),
            ..PartitionPosition::default()
        }]
    }

    fn lagging(&self) -> bool {
        !self.snapshot_done
    }
}
