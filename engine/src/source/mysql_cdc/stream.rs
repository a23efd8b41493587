//! The reading thread of the CDC source: the snapshot, the binlog stream, and turning rows into
//! [`RefChange`]s at transaction ends. See the parent module for the rules.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ::mysql::binlog::events::{Event, EventData, TableMapEvent};
use ::mysql::binlog::row::BinlogRow;
use ::mysql::binlog::value::BinlogValue;
use ::mysql::prelude::Queryable;
use ::mysql::{BinlogRequest, Conn, OptsBuilder, Row, Value};
use crossbeam_channel::Sender;
use spendflow_operators::reference::{Currency, RefChange, RefKey, RefValue};

use super::{BATCH, BinlogPosition, Item, MysqlCdcSourceConfig, split_file_name};
use crate::error::SourceError;
use crate::mysql_client;

/// How long a read of the stream may wait: the server sends a heartbeat every
/// [`HEARTBEAT`], so this long without any event means the connection is dead.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The heartbeat period the thread asks the server for.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// MySQL's error when a binlog file cannot be read (purged, missing from the index).
const ER_MASTER_FATAL_ERROR_READING_BINLOG: u16 = 1236;
/// Unknown table.
const ER_NO_SUCH_TABLE: u16 = 1146;

/// A fatal configuration error.
pub(super) fn config_error(message: impl Into<String>) -> SourceError {
    SourceError::Mysql {
        message: message.into(),
        retriable: false,
    }
}

fn driver_error(context: &str) -> impl FnOnce(::mysql::Error) -> SourceError + '_ {
    move |e| SourceError::Mysql {
        retriable: mysql_client::is_retriable(&e),
        message: format!("{context}: {e}"),
    }
}

/// A connection to the URL's database, with a read timeout.
fn connect(url: &str) -> Result<(Conn, String), SourceError> {
    let (opts, database) =
        mysql_client::database_of(url).map_err(|e| config_error(e.to_string()))?;
    let opts = OptsBuilder::from_opts(opts)
        .db_name(Some(database.clone()))
        .read_timeout(Some(READ_TIMEOUT));
    let conn = Conn::new(opts).map_err(driver_error("connect"))?;
    Ok((conn, database))
}

/// What the source learned when it opened.
#[derive(Debug)]
pub(super) struct Opened {
    /// The end of the binlog (`SHOW MASTER STATUS`).
    pub end: BinlogPosition,
    /// The binlog files' base name.
    pub base: String,
    /// The database read.
    pub database: String,
}

fn column<T: ::mysql::prelude::FromValue>(row: &Row, index: usize) -> Option<T> {
    row.get_opt::<T, usize>(index).and_then(Result::ok)
}

/// Checks the server (a row-based binlog) and, for a restored position, that its file is still
/// there; reads the end of the binlog.
pub(super) fn open(
    config: &MysqlCdcSourceConfig,
    start: Option<BinlogPosition>,
) -> Result<Opened, SourceError> {
    let (mut conn, database) = connect(&config.url)?;
    let (log_bin, format): (i64, String) = conn
        .query_first("SELECT @@log_bin, @@binlog_format")
        .map_err(driver_error("read the binlog settings"))?
        .unwrap_or((0, String::new()));
    if log_bin != 1 || !format.eq_ignore_ascii_case("ROW") {
        return Err(config_error(format!(
            "the CDC source reads the server's row-based binary log, but log_bin is {} and \
             binlog_format is {format:?}: start the server with --log-bin=<dir>/mariadb-bin \
             --binlog-format=ROW --server-id=1 (docker/native/services does)",
            if log_bin == 1 { "ON" } else { "OFF" }
        )));
    }
    let status: Option<Row> = conn
        .query_first("SHOW MASTER STATUS")
        .map_err(driver_error(
            "SHOW MASTER STATUS (the user needs REPLICATION CLIENT)",
        ))?;
    let (file, pos) = status
        .and_then(|row| Some((column::<String>(&row, 0)?, column::<u64>(&row, 1)?)))
        .ok_or_else(|| {
            config_error(
                "SHOW MASTER STATUS shows no binary log: the user needs REPLICATION CLIENT \
                 (and REPLICATION SLAVE to read it)",
            )
        })?;
    let (base, _) = split_file_name(&file).ok_or_else(|| {
        config_error(format!(
            "the binlog file name {file:?} does not end in .<digits>"
        ))
    })?;
    let end = BinlogPosition::of_file(&file, pos)
        .ok_or_else(|| config_error(format!("binlog position {file}:{pos} is out of range")))?;
    let base = base.to_string();
    if let Some(start) = start {
        let logs: Vec<Row> = conn
            .query("SHOW BINARY LOGS")
            .map_err(driver_error("SHOW BINARY LOGS"))?;
        let names: Vec<String> = logs.iter().filter_map(|r| column(r, 0)).collect();
        let wanted = start.file_name(&base);
        if !names.contains(&wanted) {
            return Err(purged(&wanted, start.pos, &names));
        }
    }
    Ok(Opened {
        end,
        base,
        database,
    })
}

/// The fatal error of a position whose binlog file is gone.
fn purged(file: &str, pos: u32, on_server: &[String]) -> SourceError {
    let listed = match (on_server.first(), on_server.last()) {
        (Some(first), Some(last)) => format!("the server has {first} to {last}"),
        _ => "the server lists none".to_string(),
    };
    config_error(format!(
        "binlog file {file} (position {pos}), where this source's checkpoint stands, is no \
         longer on the server ({listed}): it was purged or expired (binlog_expire_logs_seconds), \
         so the budget and rate changes since then cannot be read. Refusing to go on with \
         reference data that may be stale: restart the engine from an empty checkpoint \
         directory (the source then takes a new snapshot), and keep binlog files for longer \
         than the engine may be stopped"
    ))
}

/// The two tables the source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Table {
    Users,
    Fx,
}

impl Table {
    fn of(name: &str) -> Option<Table> {
        match name {
            "users" => Some(Table::Users),
            "fx_rates" => Some(Table::Fx),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Table::Users => "users",
            Table::Fx => "fx_rates",
        }
    }

    /// The columns read, in the order [`Table::row`] takes them.
    fn columns(self) -> &'static [&'static str] {
        match self {
            Table::Users => &["user_id", "monthly_budget_minor", "currency"],
            Table::Fx => &["currency", "rate_micros"],
        }
    }

    /// The key of a row (its values in [`Table::columns`] order), or why it has none.
    fn key(self, values: &[Value]) -> Result<RefKey, String> {
        match self {
            Table::Users => user_id(&values[0]).map(RefKey::User),
            Table::Fx => currency(&values[0]).map(RefKey::Fx),
        }
    }

    /// The key and value of a row, or why the row cannot be used.
    pub(super) fn row(self, values: &[Value]) -> Result<(RefKey, RefValue), String> {
        let key = self.key(values)?;
        let value = match self {
            Table::Users => RefValue::User {
                budget_minor: int(&values[1]).map_err(|e| format!("monthly_budget_minor {e}"))?,
                currency: currency(&values[2])?,
            },
            Table::Fx => match int(&values[1]) {
                Ok(Some(rate_micros)) if rate_micros > 0 => RefValue::Fx { rate_micros },
                Ok(other) => {
                    return Err(format!(
                        "rate_micros must be a positive integer, got {other:?}"
                    ));
                }
                Err(e) => return Err(format!("rate_micros {e}")),
            },
        };
        Ok((key, value))
    }
}

fn user_id(value: &Value) -> Result<u64, String> {
    match value {
        // A binlog row does not say whether an integer column is unsigned: a BIGINT UNSIGNED
        // above i64::MAX arrives negative.
        Value::Int(i) => Ok(*i as u64),
        Value::UInt(u) => Ok(*u),
        Value::Bytes(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("user_id {:?} is not an integer", String::from_utf8_lossy(b))),
        other => Err(format!("user_id {other:?} is not an integer")),
    }
}

fn int(value: &Value) -> Result<Option<i64>, String> {
    match value {
        Value::NULL => Ok(None),
        Value::Int(i) => Ok(Some(*i)),
        Value::UInt(u) => i64::try_from(*u)
            .map(Some)
            .map_err(|_| format!("{u} is out of range")),
        Value::Bytes(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| format!("{:?} is not an integer", String::from_utf8_lossy(b))),
        other => Err(format!("{other:?} is not an integer")),
    }
}

/// Three uppercase ASCII letters (trailing spaces of a `CHAR` column ignored).
pub(super) fn currency(value: &Value) -> Result<Currency, String> {
    let bytes = match value {
        Value::Bytes(b) => b.trim_ascii_end(),
        other => return Err(format!("currency {other:?} is not text")),
    };
    match <[u8; 3]>::try_from(bytes) {
        Ok(code) if code.iter().all(u8::is_ascii_uppercase) => Ok(code),
        _ => Err(format!(
            "currency {:?} is not three uppercase ASCII letters",
            String::from_utf8_lossy(bytes)
        )),
    }
}

fn skip(table: Table, values: &[Value], why: &str) {
    tracing::warn!(
        table = table.name(),
        row = ?values,
        reason = why,
        "Skipping a reference row the engine cannot use."
    );
}

/// The changes one binlog row (its before and after images, in [`Table::columns`] order)
/// makes: none for an update of other columns, a delete and a set when the key changed.
pub(super) fn row_changes(
    table: Table,
    before: Option<&[Value]>,
    after: Option<&[Value]>,
    out: &mut Vec<RefChange>,
) {
    match (before, after) {
        (Some(before), None) => match table.key(before) {
            Ok(key) => out.push(RefChange { key, value: None }),
            Err(why) => skip(table, before, &why),
        },
        (before, Some(after)) => {
            let (key, value) = match table.row(after) {
                Ok(row) => row,
                Err(why) => return skip(table, after, &why),
            };
            if let Some(before) = before {
                match table.row(before) {
                    Ok(old) if old == (key, value) => return,
                    _ => {}
                }
                if let Ok(old_key) = table.key(before)
                    && old_key != key
                {
                    out.push(RefChange {
                        key: old_key,
                        value: None,
                    });
                }
            }
            out.push(RefChange {
                key,
                value: Some(value),
            });
        }
        (None, None) => {}
    }
}

/// The thread's state: where to resume, and the channel to the worker.
pub(super) struct Reader {
    config: MysqlCdcSourceConfig,
    base: String,
    database: String,
    /// Where the next session starts: the end of the last transaction handed over (or the
    /// snapshot's position); `None` until a snapshot was handed over completely.
    start: Option<BinlogPosition>,
    tx: Sender<Vec<Item>>,
    connected: Arc<AtomicBool>,
    dump_connection: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

impl Reader {
    pub(super) fn new(
        config: MysqlCdcSourceConfig,
        opened: Opened,
        start: Option<BinlogPosition>,
        tx: Sender<Vec<Item>>,
        connected: Arc<AtomicBool>,
        dump_connection: Arc<AtomicU32>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Reader {
            config,
            base: opened.base,
            database: opened.database,
            start,
            tx,
            connected,
            dump_connection,
            stop,
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sends items in messages of at most [`BATCH`]; false once the worker's end is gone.
    fn send(&self, mut items: Vec<Item>) -> bool {
        while items.len() > BATCH {
            let rest = items.split_off(BATCH);
            if self.tx.send(items).is_err() {
                return false;
            }
            items = rest;
        }
        items.is_empty() || self.tx.send(items).is_ok()
    }

    /// Reads until stopped or a fatal error, reconnecting after retriable ones.
    pub(super) fn run(mut self) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let began = Instant::now();
            let error = match self.session() {
                Ok(()) => return,
                Err(e) => e,
            };
            if self.stopped() {
                return;
            }
            let retriable = error.is_retriable();
            tracing::warn!(
                source = %super::source_name(&self.database),
                error = %error,
                retriable,
                "The MySQL CDC source could not read."
            );
            self.connected.store(false, Ordering::Relaxed);
            if !self.send(vec![Item::Error(error)]) || !retriable {
                return;
            }
            if began.elapsed() > MAX_BACKOFF {
                backoff = Duration::from_secs(1);
            }
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                if self.stopped() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection's worth of reading: the snapshot if none was handed over, then the
    /// binlog. `Ok` when stopped.
    fn session(&mut self) -> Result<(), SourceError> {
        let (mut meta, _) = connect(&self.config.url)?;
        let start = match self.start {
            Some(start) => start,
            None => {
                let Some(at) = self.snapshot(&mut meta)? else {
                    return Ok(());
                };
                self.start = Some(at);
                at
            }
        };
        let (mut conn, _) = connect(&self.config.url)?;
        conn.query_drop(format!(
            "SET @master_binlog_checksum = @@global.binlog_checksum, \
             @master_heartbeat_period = {}",
            HEARTBEAT.as_nanos()
        ))
        .map_err(driver_error("prepare the binlog stream"))?;
        let file = start.file_name(&self.base);
        let request = BinlogRequest::new(self.config.server_id)
            .with_filename(file.clone().into_bytes())
            .with_pos(u64::from(start.pos));
        self.dump_connection
            .store(conn.connection_id(), Ordering::Relaxed);
        let stream = conn
            .get_binlog_stream(request)
            .map_err(|e| stream_error(e, &file, start.pos))?;
        self.connected.store(true, Ordering::Relaxed);
        let mut decoder = Decoder::new(self.database.clone(), start.seq);
        let mut out = Vec::new();
        for event in stream {
            if self.stopped() {
                return Ok(());
            }
            let event = event.map_err(|e| stream_error(e, &file, start.pos))?;
            decoder.event(&event, &mut meta, &mut out)?;
            if let Some(Item::Commit(offset)) = out.last() {
                let at = BinlogPosition::decode(*offset);
                if !self.send(std::mem::take(&mut out)) {
                    return Ok(());
                }
                self.start = at.or(self.start);
            }
        }
        Err(SourceError::Mysql {
            message: "the server ended the binlog stream".into(),
            retriable: true,
        })
    }

    /// Reads both tables in a consistent snapshot and hands their rows over; returns the
    /// binlog position the snapshot stands at (`None` if stopped).
    fn snapshot(&mut self, conn: &mut Conn) -> Result<Option<BinlogPosition>, SourceError> {
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .map_err(driver_error("set the snapshot's isolation level"))?;
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .map_err(driver_error("start the snapshot"))?;
        let status: Vec<(String, String)> = conn
            .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
            .map_err(driver_error("read the snapshot's binlog position"))?;
        let value = |name: &str| {
            status
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let at = match (
            value("Binlog_snapshot_file"),
            value("Binlog_snapshot_position"),
        ) {
            (Some(file), Some(pos)) => pos
                .parse()
                .ok()
                .and_then(|pos| BinlogPosition::of_file(&file, pos)),
            _ => None,
        }
        .ok_or_else(|| {
            config_error(
                "SHOW STATUS LIKE 'binlog_snapshot_%' gives no binlog position (the CDC source \
                 needs MariaDB's Binlog_snapshot_file/position)",
            )
        })?;
        let offset = at.encode();
        let mut rows = 0_u64;
        for table in [Table::Users, Table::Fx] {
            let sql = format!(
                "SELECT {} FROM `{}`.`{}`",
                table.columns().join(", "),
                self.database,
                table.name()
            );
            let result = match conn.query_iter(sql) {
                Ok(result) => result,
                Err(::mysql::Error::MySqlError(e)) if e.code == ER_NO_SUCH_TABLE => {
                    tracing::info!(
                        table = table.name(),
                        database = %self.database,
                        "No such table yet; its rows will come from the binlog."
                    );
                    continue;
                }
                Err(e) => return Err(driver_error("snapshot")(e)),
            };
            let mut items = Vec::with_capacity(BATCH);
            let mut changes = Vec::new();
            for row in result {
                let row = row.map_err(driver_error("snapshot"))?;
                let values: Vec<Value> = row.unwrap();
                row_changes(table, None, Some(&values), &mut changes);
                rows += 1;
                items.extend(
                    changes
                        .drain(..)
                        .map(|change| Item::Change { change, offset }),
                );
                if items.len() >= BATCH
                    && (self.stopped() || !self.send(std::mem::take(&mut items)))
                {
                    return Ok(None);
                }
            }
            if !self.send(items) {
                return Ok(None);
            }
        }
        conn.query_drop("COMMIT")
            .map_err(driver_error("end the snapshot"))?;
        if !self.send(vec![Item::SnapshotDone(offset)]) {
            return Ok(None);
        }
        tracing::info!(
            database = %self.database,
            rows,
            position = %format!("{}:{}", at.file_name(&self.base), at.pos),
            "MySQL CDC snapshot taken; reading the binlog from its position."
        );
        Ok(Some(at))
    }
}

/// A stream error: a missing binlog file is fatal, the rest as the driver says.
fn stream_error(e: ::mysql::Error, file: &str, pos: u32) -> SourceError {
    match &e {
        ::mysql::Error::MySqlError(err) if err.code == ER_MASTER_FATAL_ERROR_READING_BINLOG => {
            config_error(format!(
                "the server cannot send binlog file {file} from position {pos}: {}. If the file \
                 was purged, the budget and rate changes since then cannot be read: restart the \
                 engine from an empty checkpoint directory (the source then takes a new \
                 snapshot)",
                err.message
            ))
        }
        _ => driver_error("read the binlog")(e),
    }
}

/// Turns binlog events into items: rows of the two tables held until their transaction ends.
struct Decoder {
    database: String,
    /// The sequence number of the file being read.
    seq: u32,
    /// Inside a transaction (after `BEGIN`, a table map or rows, before its end).
    in_tx: bool,
    /// A table map or rows were seen in this transaction.
    rows_seen: bool,
    /// The changes of the transaction so far.
    buffered: Vec<RefChange>,
    /// The table maps of the two tables, by table id.
    tables: HashMap<u64, (Table, TableMapEvent<'static>)>,
    /// Column positions of the two tables (and the column count they were read for).
    layouts: HashMap<Table, (u64, Vec<usize>)>,
}

impl Decoder {
    fn new(database: String, seq: u32) -> Self {
        Decoder {
            database,
            seq,
            in_tx: false,
            rows_seen: false,
            buffered: Vec::new(),
            tables: HashMap::new(),
            layouts: HashMap::new(),
        }
    }

    /// The transaction ended at `log_pos` (committed: its changes go out).
    fn commit(&mut self, log_pos: u32, out: &mut Vec<Item>) {
        let offset = BinlogPosition {
            seq: self.seq,
            pos: log_pos,
        }
        .encode();
        out.extend(
            self.buffered
                .drain(..)
                .map(|change| Item::Change { change, offset }),
        );
        out.push(Item::Commit(offset));
        self.in_tx = false;
        self.rows_seen = false;
    }

    fn event(
        &mut self,
        event: &Event,
        meta: &mut Conn,
        out: &mut Vec<Item>,
    ) -> Result<(), SourceError> {
        let log_pos = event.header().log_pos();
        let data = event.read_data().map_err(|e| SourceError::Mysql {
            message: format!("cannot decode a binlog event: {e}"),
            retriable: false,
        })?;
        match data {
            Some(EventData::RotateEvent(rotate)) => {
                if let Some((_, seq)) = split_file_name(&rotate.name()) {
                    self.seq = seq;
                    if !self.in_tx
                        && let Ok(pos) = u32::try_from(rotate.position())
                    {
                        out.push(Item::Commit(BinlogPosition { seq, pos }.encode()));
                    }
                }
            }
            Some(EventData::HeartbeatEvent) => {}
            Some(EventData::XidEvent(_)) => self.commit(log_pos, out),
            Some(EventData::QueryEvent(query)) => {
                let sql = query.query();
                let sql = sql.trim();
                if sql.eq_ignore_ascii_case("BEGIN") {
                    self.in_tx = true;
                } else if sql.eq_ignore_ascii_case("COMMIT") {
                    self.commit(log_pos, out);
                } else if sql.len() >= 8 && sql[..8].eq_ignore_ascii_case("ROLLBACK") {
                    self.buffered.clear();
                    self.commit(log_pos, out);
                } else {
                    if !sql.starts_with('#') {
                        // DDL may have changed the tables' columns: look them up again.
                        self.layouts.clear();
                    }
                    if !self.rows_seen && log_pos != 0 {
                        self.commit(log_pos, out);
                    }
                }
            }
            Some(EventData::TableMapEvent(map)) => {
                self.in_tx = true;
                self.rows_seen = true;
                let table = (map.database_name() == self.database.as_str())
                    .then(|| Table::of(&map.table_name()))
                    .flatten();
                match table {
                    Some(table) => {
                        self.tables
                            .insert(map.table_id(), (table, map.into_owned()));
                    }
                    None => {
                        self.tables.remove(&map.table_id());
                    }
                }
            }
            Some(EventData::RowsEvent(rows)) => {
                self.in_tx = true;
                self.rows_seen = true;
                let Some((table, count)) = self
                    .tables
                    .get(&rows.table_id())
                    .map(|(table, map)| (*table, map.columns_count()))
                else {
                    return Ok(());
                };
                let columns = self.layout(table, count, meta)?;
                let (_, map) = &self.tables[&rows.table_id()];
                for row in rows.rows(map) {
                    let (before, after) = row.map_err(|e| SourceError::Mysql {
                        message: format!("cannot decode a row of {}: {e}", table.name()),
                        retriable: false,
                    })?;
                    let before = before.map(|r| pick(&r, &columns));
                    let after = after.map(|r| pick(&r, &columns));
                    row_changes(
                        table,
                        before.as_deref(),
                        after.as_deref(),
                        &mut self.buffered,
                    );
                }
            }
            _ => {
                if !self.in_tx && log_pos != 0 {
                    self.commit(log_pos, out);
                }
            }
        }
        Ok(())
    }

    /// The positions of `table`'s columns read, from `information_schema` (cached until the
    /// column count changes or DDL is seen).
    fn layout(
        &mut self,
        table: Table,
        count: u64,
        meta: &mut Conn,
    ) -> Result<Vec<usize>, SourceError> {
        if let Some((known, columns)) = self.layouts.get(&table)
            && *known == count
        {
            return Ok(columns.clone());
        }
        let names: Vec<String> = meta
            .exec(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (&self.database, table.name()),
            )
            .map_err(driver_error("read the columns of a table"))?;
        let columns = table
            .columns()
            .iter()
            .map(|want| {
                names
                    .iter()
                    .position(|n| n.eq_ignore_ascii_case(want))
                    .ok_or_else(|| {
                        config_error(format!(
                            "table `{}`.`{}` has no column {want}; the CDC source reads {}",
                            self.database,
                            table.name(),
                            table.columns().join(", ")
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if names.len() as u64 != count {
            tracing::warn!(
                table = table.name(),
                binlog_columns = count,
                current_columns = names.len(),
                "A binlog row has another column count than the table now has; decoding it \
                 with the current columns."
            );
        }
        self.layouts.insert(table, (count, columns.clone()));
        Ok(columns)
    }
}

/// The values of a binlog row at `columns` (`NULL` for a column the image lacks).
fn pick(row: &BinlogRow, columns: &[usize]) -> Vec<Value> {
    columns
        .iter()
        .map(|&i| match row.as_ref(i) {
            Some(BinlogValue::Value(v)) => v.clone(),
            _ => Value::NULL,
        })
        .collect()
}
