//! Writing closed epochs to Cassandra.
//!
//! One [`EpochGroup`] (one or more consecutive closed epochs, merged) is written as:
//!
//! 1. every changed cell's **absolute** value (or a delete, for a cell that no longer exists),
//!    batched per user (all tables are partitioned by user), at most
//!    `concurrency` batches in flight, each retried with capped exponential backoff for as long
//!    as it takes (a Cassandra outage stalls the sink, and through the bounded queue in front of
//!    it, the sources; nothing is dropped);
//! 2. then one `sink_progress` row for the group's last epoch, committed with a lightweight
//!    transaction `IF generation = <ours>`, so an engine that another one has replaced can never
//!    advance progress.
//!
//! **Write timestamps** are microseconds since the Unix epoch, like any other writer's, so an
//! operator's fix-up with an ordinary timestamp neither hides spendflow's rows forever nor
//! always wins: every group is written at `max(now, previous + 1)`, at or above the wall clock
//! of the write and strictly increasing within a run (a retried batch reuses its group's
//! timestamp, so a retry is a no-op). Across runs, the static `ts_lease` column of
//! `sink_progress` carries a *time lease*:
//!
//! * a generation may only write with timestamps up to the lease it holds; before it would
//!   pass it, it extends the lease (to its timestamp + [`TS_LEASE`]) with a lightweight
//!   transaction `IF generation = <ours>`, which fails once another engine has claimed the
//!   sink (the sink stops, fenced);
//! * claiming the sink is one lightweight transaction `IF generation = <g> AND ts_lease = <L>`
//!   on what it read, which sets the new generation's floor to `max(now, L + 1)`.
//!
//! Lightweight transactions on the one `sink_progress` partition are linearizable, so every
//! lease the replaced generation ever obtained is at most `L`, and all its writes, including
//! those of a zombie that has not noticed yet, carry timestamps below the new generation's
//! floor: a newer generation's cells always win, whatever the machines' clocks say. The cost
//! is one lightweight transaction per [`TS_LEASE`] of writing, and after a takeover the new
//! generation's timestamps may run up to [`TS_LEASE`] ahead of the wall clock. Timestamps of
//! keyspaces written before (`generation << 32 | epoch`, near 1970) are far below any of
//! these. After a restart from a checkpoint at epoch `C`, the
//! engine re-reads the input after `C` and re-writes every cell that input touches, which
//! includes every cell the previous run wrote after its checkpoint: Cassandra converges to
//! exactly the state of the input, with each row at least as new as the progress row says.
//!
//! **Shares.** In a cluster every process runs this sink for the users it owns
//! ([`SinkContext::share`](crate::sink::SinkContext)), and everything above happens per share:
//! share `p` of `n` claims, leases, fences and commits in its own `sink_progress` partition
//! `main/<p>-of-<n>` (a single engine keeps `main`), and `open` returns the epoch that share
//! committed. A new layout (another number of processes) registers itself and fences every
//! share of the other layouts before it claims, taking a timestamp floor above every lease any
//! of them held, so after a rescale (a user moving from old share 2-of-3 to new share 1-of-2)
//! the new share's writes win over any zombie's: see `claim.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cdrs_tokio::consistency::Consistency;
use cdrs_tokio::frame::message_batch::BatchType;
use cdrs_tokio::query::{BatchQueryBuilder, PreparedQuery, QueryValues};
use cdrs_tokio::query_values;
use cdrs_tokio::types::value::Value;
use futures::StreamExt;
use spendflow_operators::{AggKey, Epoch};

use super::claim::{claim, lwt_result, now_ms, now_us};
use super::config::CassandraSinkConfig;
use crate::cassandra::schema;
use crate::cassandra::{CassandraError, CqlSession, connect_with};
use crate::core::{CellValue, format_day, format_month};
use crate::sink::{EpochGroup, Sink, SinkContext, SinkCounters, SinkError};

/// First and largest pause between retries of a failed write.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// How long one request may take before it is abandoned and retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write keeps failing on one session before the sink drops that session and
/// connects a new one. cdrs-tokio can keep a single-node cluster's only node marked down after
/// the node came back ("No nodes available in query plan!" forever; seen in the
/// `cassandra_outage` test after a 30 s outage), so retrying on the old session alone may
/// never succeed.
const RECONNECT_AFTER: Duration = Duration::from_secs(15);

/// How far ahead of its newest write timestamp a generation leases timestamps (µs).
pub const TS_LEASE: i64 = 5_000_000;

/// Progress rows kept: older ones are deleted now and then.
pub(super) const PROGRESS_ROWS_KEPT: u64 = 1000;

/// What the sink found when it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkStart {
    /// The generation this engine claimed.
    pub generation: i64,
    /// The newest epoch an earlier run committed, if any.
    pub committed_epoch: Option<Epoch>,
    /// The smallest write timestamp this generation uses: above every timestamp an earlier
    /// generation could use (µs since the Unix epoch).
    pub timestamp_floor: i64,
    /// The layout generation this share registered under (see `claim`).
    pub layout_generation: i64,
}

/// The statements, prepared once.
struct Prepared {
    upsert_user: PreparedQuery,
    delete_user: PreparedQuery,
    upsert_category: PreparedQuery,
    delete_category: PreparedQuery,
    upsert_merchant: PreparedQuery,
    delete_merchant: PreparedQuery,
    upsert_day: PreparedQuery,
    delete_day: PreparedQuery,
    upsert_month: PreparedQuery,
    delete_month: PreparedQuery,
}

/// The Cassandra sink; see the module docs. Built by [`CassandraSink::new`], connected by
/// [`Sink::open`].
pub struct CassandraSink {
    config: CassandraSinkConfig,
    conn: Option<Connection>,
}

/// A sink's connection, from `open` on: the engine's runtime (the sink driver thread is not
/// one of its threads, so it blocks on it), the session and what this generation holds.
struct Connection {
    runtime: tokio::runtime::Handle,
    session: Arc<CqlSession>,
    prepared: Arc<Prepared>,
    config: CassandraSinkConfig,
    /// What this generation found when it claimed the sink (its generation number too).
    start: SinkStart,
    /// This share's progress partition (`main`, or `main/<p>-of-<n>` in a cluster).
    partition: String,
    /// The newest write timestamp used (µs).
    last_timestamp: i64,
    /// The largest write timestamp this generation holds a lease for (µs).
    lease: i64,
    stop: Arc<AtomicBool>,
    counters: SinkCounters,
    /// This process's share of the sink.
    share: crate::cluster::Share,
    /// The first write has raised the timestamps above this layout's other shares' leases
    /// (see [`Connection::above_siblings`]).
    above_siblings: bool,
}

impl std::fmt::Debug for CassandraSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraSink")
            .field("keyspace", &self.config.keyspace)
            .field(
                "generation",
                &self.conn.as_ref().map(|c| c.start.generation),
            )
            .field("share", &self.conn.as_ref().map(|c| &c.partition))
            .finish_non_exhaustive()
    }
}

impl CassandraSink {
    /// A sink for `config`, not connected yet.
    pub fn new(config: CassandraSinkConfig) -> Self {
        CassandraSink { config, conn: None }
    }

    /// What the sink found when it opened (its generation, the committed epoch, its first
    /// write timestamp); `None` before [`Sink::open`].
    pub fn start(&self) -> Option<SinkStart> {
        self.conn.as_ref().map(|c| c.start)
    }

    /// The newest write timestamp used (µs since the Unix epoch; before the first write, one
    /// below the generation's floor); `None` before [`Sink::open`].
    pub fn last_timestamp(&self) -> Option<i64> {
        self.conn.as_ref().map(|c| c.last_timestamp)
    }

    fn connection(&mut self) -> Result<&mut Connection, SinkError> {
        self.conn.as_mut().ok_or_else(|| {
            SinkError::fatal(
                "cassandra",
                "the sink was not opened (call Sink::open first)",
            )
        })
    }
}

impl Sink for CassandraSink {
    fn name(&self) -> &str {
        "cassandra"
    }

    fn open(&mut self, ctx: &SinkContext) -> Result<Option<Epoch>, SinkError> {
        let conn = Connection::open(
            self.config.clone(),
            &ctx.owner,
            ctx.share,
            Arc::clone(&ctx.stop),
            ctx.runtime.clone(),
        )?;
        let committed = conn.start.committed_epoch;
        self.conn = Some(conn);
        Ok(committed)
    }

    fn write(&mut self, group: &EpochGroup) -> Result<(), SinkError> {
        Ok(self.connection()?.write(group)?)
    }

    fn commit(&mut self, group: &EpochGroup) -> Result<(), SinkError> {
        Ok(self.connection()?.commit(group)?)
    }

    fn counters(&self) -> SinkCounters {
        self.conn
            .as_ref()
            .map_or_else(SinkCounters::default, |c| c.counters)
    }

    fn max_group_cells(&self) -> usize {
        self.config.max_group_cells
    }
}

impl From<CassandraError> for SinkError {
    fn from(e: CassandraError) -> Self {
        let sink = "cassandra".to_string();
        if e.is_retriable() {
            SinkError::Retriable {
                sink,
                source: Box::new(e),
            }
        } else if matches!(
            e,
            CassandraError::Fenced { .. } | CassandraError::Superseded { .. }
        ) {
            SinkError::Fenced {
                sink,
                source: Box::new(e),
            }
        } else {
            SinkError::Fatal {
                sink,
                source: Box::new(e),
            }
        }
    }
}

impl Connection {
    /// Connects, creates the keyspace and tables if missing, prepares the statements and claims
    /// the next generation. Blocking (outside the runtime's threads). `stop` makes
    /// retries give up (at shutdown).
    fn open(
        config: CassandraSinkConfig,
        owner: &str,
        share: crate::cluster::Share,
        stop: Arc<AtomicBool>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Connection, CassandraError> {
        config
            .validate()
            .map_err(|e| CassandraError::Config(e.to_string()))?;
        let (session, prepared, start) = runtime.block_on(async {
            let session = connect_with(&config.contact_points, &config.client_security).await?;
            let ks = &config.keyspace;
            run(
                &session,
                &schema::create_keyspace(ks, &config.replication)
                    .map_err(|e| CassandraError::Config(e.to_string()))?,
                "create keyspace",
            )
            .await?;
            for table in schema::create_tables(ks) {
                run(&session, &table, "create table").await?;
            }
            for alter in schema::add_columns(ks) {
                // Fails when the column exists (created with the table): expected.
                if let Err(e) = run(&session, &alter, "add a column").await {
                    tracing::debug!(error = %e, "Column not added (it exists).");
                }
            }
            let prepared = prepare(&session, ks).await?;
            let start = claim(&session, ks, owner, share).await?;
            Ok::<_, CassandraError>((session, prepared, start))
        })?;
        let partition = schema::share_partition(share);
        tracing::info!(
            keyspace = %config.keyspace,
            share = %partition,
            generation = start.generation,
            layout_generation = start.layout_generation,
            committed_epoch = ?start.committed_epoch,
            "Cassandra sink ready."
        );
        Ok(Connection {
            partition,
            runtime,
            session,
            prepared: Arc::new(prepared),
            last_timestamp: start.timestamp_floor - 1,
            lease: start.timestamp_floor,
            start,
            config,
            stop,
            counters: SinkCounters::default(),
            share,
            above_siblings: share.is_single(),
        })
    }

    /// Writes a group's rows (extending the timestamp lease first when needed). Retries
    /// retriable failures until they succeed or the sink is stopped; after
    /// [`RECONNECT_AFTER`] of failures on one session, on a new session.
    ///
    /// # Errors
    ///
    /// A fatal [`CassandraError`], [`CassandraError::Fenced`] if another engine took over, or
    /// the last retriable error if the sink was stopped while retrying.
    fn write(&mut self, group: &EpochGroup) -> Result<(), CassandraError> {
        // Only references to the cells: the rows (CQL values) of a batch are built when it is
        // sent, so a large merged group costs a pointer a cell here, not its encoded rows.
        let batches = plan_cells(group, self.config.batch_statements)
            .map_err(|e| e.in_keyspace(&self.config.keyspace))?;
        let rows: usize = batches.iter().map(|b| b.len()).sum();
        let epoch = group.epoch;
        if !self.above_siblings {
            self.with_reconnects(group.epoch, Connection::above_siblings)?;
        }
        let timestamp = write_timestamp(now_us(), self.last_timestamp);
        // Every step is idempotent (the same timestamp, absolute values), so the whole group
        // is simply written again on a new session.
        self.with_reconnects(group.epoch, |conn| {
            conn.write_on_session(&batches, epoch, timestamp)
        })?;
        self.counters.rows += rows as u64;
        self.counters.batches += batches.len() as u64;
        Ok(())
    }

    /// Before a share's first write: raises its timestamps above the leases this layout's
    /// other shares hold now. A cluster's processes all claim their shares before the
    /// dataflow runs (they open their sinks, then join), so by the first write every other
    /// share is held by this run, whose floor is above everything its predecessor could use.
    /// That covers what the claim cannot see: a user moving between shares of one layout (the
    /// same number of processes, another `-w`) while the old process of that share, not
    /// fenced yet, still extended its lease after this share claimed.
    fn above_siblings(&mut self) -> Result<(), CassandraError> {
        let session = Arc::clone(&self.session);
        let stop = Arc::clone(&self.stop);
        let keyspace = self.config.keyspace.clone();
        let share = self.share;
        let retries = std::sync::atomic::AtomicU64::new(0);
        let leases = self.runtime.block_on(retry(
            "read the other shares' leases",
            &stop,
            &retries,
            || super::claim::sibling_leases(&session, &keyspace, share),
        ));
        self.counters.retries += retries.into_inner();
        if let Some(lease) = leases? {
            // The next write is at least one above it.
            self.last_timestamp = self.last_timestamp.max(lease);
        }
        self.above_siblings = true;
        Ok(())
    }

    /// Commits the group's progress row, `IF generation = <ours>`; retried like
    /// [`Connection::write`].
    fn commit(&mut self, group: &EpochGroup) -> Result<(), CassandraError> {
        self.with_reconnects(group.epoch, |conn| {
            let session = Arc::clone(&conn.session);
            let stop = Arc::clone(&conn.stop);
            let keyspace = conn.config.keyspace.clone();
            let partition = conn.partition.clone();
            let generation = conn.start.generation;
            let retries = std::sync::atomic::AtomicU64::new(0);
            let result = conn
                .runtime
                .block_on(retry("commit progress", &stop, &retries, || {
                    commit(&session, &keyspace, &partition, generation, group)
                }));
            conn.counters.retries += retries.into_inner();
            result
        })?;
        self.counters.groups += 1;
        if self.counters.groups.is_multiple_of(100) && group.epoch > PROGRESS_ROWS_KEPT {
            let cql = format!(
                "DELETE FROM {}.sink_progress WHERE sink = ? AND epoch < ?",
                self.config.keyspace
            );
            let older = (group.epoch - PROGRESS_ROWS_KEPT) as i64;
            if let Err(e) = self.runtime.block_on(
                self.session
                    .query_with_values(cql, query_values!(self.partition.clone(), older)),
            ) {
                tracing::debug!(error = %e, "Could not trim old progress rows; will retry later.");
            }
        }
        Ok(())
    }

    /// Runs `step` until it succeeds or fails for good, replacing the session each time it
    /// has kept failing retriably for [`RECONNECT_AFTER`].
    fn with_reconnects(
        &mut self,
        epoch: Epoch,
        mut step: impl FnMut(&mut Connection) -> Result<(), CassandraError>,
    ) -> Result<(), CassandraError> {
        let mut reconnected = false;
        loop {
            match step(self) {
                Err(e) if e.is_retriable() && !self.stop.load(Ordering::Acquire) => {
                    tracing::warn!(
                        error = %e,
                        failing_s = RECONNECT_AFTER.as_secs(),
                        "Cassandra writes keep failing on this session; connecting a new one."
                    );
                    self.reconnect()?;
                    reconnected = true;
                }
                Err(e) => return Err(e),
                Ok(()) => break,
            }
        }
        if reconnected {
            tracing::info!(epoch, "Cassandra writes succeed again (on a new session).");
        }
        Ok(())
    }

    /// One attempt at a group's rows on the current session: extends the lease if needed and
    /// writes the batches, retrying failures for up to [`RECONNECT_AFTER`].
    fn write_on_session(
        &mut self,
        batches: &[Vec<&CellValue>],
        epoch: Epoch,
        timestamp: i64,
    ) -> Result<(), CassandraError> {
        if timestamp > self.lease {
            self.extend_lease(timestamp + TS_LEASE)?;
        }
        self.last_timestamp = timestamp;
        let session = Arc::clone(&self.session);
        let prepared = Arc::clone(&self.prepared);
        let stop = Arc::clone(&self.stop);
        let concurrency = self.config.concurrency;
        let (retries, result) = self.runtime.block_on(async move {
            let retries = std::sync::atomic::AtomicU64::new(0);
            let mut results = futures::stream::iter(batches.iter().map(|batch| {
                let session = &session;
                let prepared = &prepared;
                let stop = &stop;
                let retries = &retries;
                async move {
                    retry("write a batch", stop, retries, || {
                        let query = batch
                            .iter()
                            .map(|cell| cell_row(cell, epoch))
                            .collect::<Result<Vec<Row>, _>>()
                            .and_then(|rows| build_batch(prepared, &rows, timestamp));
                        async move {
                            let query = query?;
                            session
                                .batch(query)
                                .await
                                .map_err(|e| CassandraError::request("write a batch", e))
                        }
                    })
                    .await
                }
            }))
            .buffer_unordered(concurrency);
            let mut failed = None;
            while let Some(result) = results.next().await {
                if let Err(e) = result {
                    failed = Some(e);
                    break;
                }
            }
            drop(results);
            (retries.into_inner(), failed.map_or(Ok(()), Err))
        });
        self.counters.retries += retries;
        result
    }

    /// Drops the session and connects a new one (with freshly prepared statements), retrying
    /// until it succeeds or the sink is stopped.
    fn reconnect(&mut self) -> Result<(), CassandraError> {
        let mut pause = BACKOFF.0;
        loop {
            let contact_points = &self.config.contact_points;
            let keyspace = &self.config.keyspace;
            let attempt = self.runtime.block_on(async {
                let session = connect_with(contact_points, &self.config.client_security).await?;
                let prepared = prepare(&session, keyspace).await?;
                Ok::<_, CassandraError>((session, prepared))
            });
            match attempt {
                Ok((session, prepared)) => {
                    self.session = session;
                    self.prepared = Arc::new(prepared);
                    tracing::info!("Connected a new Cassandra session.");
                    return Ok(());
                }
                Err(e) if e.is_retriable() && !self.stop.load(Ordering::Acquire) => {
                    self.counters.retries += 1;
                    tracing::debug!(error = %e, "Cassandra not reachable yet; retrying.");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(BACKOFF.1);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Extends this generation's timestamp lease to `until`, only while it holds the sink.
    fn extend_lease(&mut self, until: i64) -> Result<(), CassandraError> {
        let session = Arc::clone(&self.session);
        let stop = Arc::clone(&self.stop);
        let keyspace = self.config.keyspace.clone();
        let partition = self.partition.clone();
        let generation = self.start.generation;
        let retries = std::sync::atomic::AtomicU64::new(0);
        let result = self.runtime.block_on(retry("extend the timestamp lease", &stop, &retries, || {
            let session = &session;
            let keyspace = &keyspace;
            let partition = &partition;
            async move {
                let envelope = session
                    .query_with_values(
                        format!(
                            "UPDATE {keyspace}.sink_progress SET ts_lease = ? WHERE sink = ? IF generation = ?"
                        ),
                        query_values!(until, partition.clone(), generation),
                    )
                    .await
                    .map_err(|e| CassandraError::request("extend the timestamp lease", e))?;
                match lwt_result(envelope, "extend the timestamp lease")? {
                    (true, _) => Ok(()),
                    (false, theirs) => Err(CassandraError::Fenced {
                        keyspace: keyspace.clone(),
                        sink: partition.clone(),
                        ours: generation,
                        theirs: theirs.unwrap_or(-1),
                    }),
                }
            }
        }));
        self.counters.retries += retries.into_inner();
        result?;
        self.lease = until;
        Ok(())
    }
}

/// The timestamp of the next write: at or above the wall clock `now_us`, and above the
/// previous one.
pub fn write_timestamp(now_us: i64, last: i64) -> i64 {
    now_us.max(last.saturating_add(1))
}

/// One statement of a batch: which prepared query, and its values.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    kind: RowKind,
    values: Vec<Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowKind {
    UpsertUser,
    DeleteUser,
    UpsertCategory,
    DeleteCategory,
    UpsertMerchant,
    DeleteMerchant,
    UpsertDay,
    DeleteDay,
    UpsertMonth,
    DeleteMonth,
}

/// Turns a group's cells into batches: each batch holds rows of one user only (every table is
/// partitioned by user) and at most `per_batch` rows.
///
/// # Errors
///
/// [`CassandraError::ValueOutOfRange`] (fatal; keyspace left empty, the caller names it) if a
/// cell's total does not fit `bigint`: never a truncated value.
pub fn plan_batches(group: &EpochGroup, per_batch: usize) -> Result<Vec<Vec<Row>>, CassandraError> {
    plan_cells(group, per_batch)?
        .into_iter()
        .map(|batch| {
            batch
                .into_iter()
                .map(|cell| cell_row(cell, group.epoch))
                .collect()
        })
        .collect()
}

/// What [`plan_batches`] plans, as references to the group's cells (the sink builds each
/// batch's rows only when it sends it). Every total is checked first, so a group with a value
/// Cassandra cannot hold fails before anything is written.
///
/// # Errors
///
/// As [`plan_batches`].
fn plan_cells(
    group: &EpochGroup,
    per_batch: usize,
) -> Result<Vec<Vec<&CellValue>>, CassandraError> {
    let mut by_user: BTreeMap<u64, Vec<&CellValue>> = BTreeMap::new();
    for cell in &group.cells {
        if i64::try_from(cell.sum).is_err() {
            return Err(out_of_range(cell));
        }
        by_user.entry(cell.key.user_id()).or_default().push(cell);
    }
    let per_batch = per_batch.max(1);
    let mut batches = Vec::new();
    for cells in by_user.into_values() {
        batches.extend(cells.chunks(per_batch).map(<[&CellValue]>::to_vec));
    }
    Ok(batches)
}

fn out_of_range(cell: &CellValue) -> CassandraError {
    CassandraError::ValueOutOfRange {
        keyspace: String::new(),
        user: cell.key.user_id(),
        cell: crate::core::describe_cell(&cell.key),
        sum: cell.sum,
    }
}

/// The statement that writes (or deletes) one cell, as of `epoch`.
fn cell_row(cell: &CellValue, epoch: Epoch) -> Result<Row, CassandraError> {
    let epoch = epoch as i64;
    let user_value = Value::from(cell.key.user_id() as i64);
    let gone = cell.removed();
    let sum = i64::try_from(cell.sum).map_err(|_| out_of_range(cell))?;
    Ok(match cell.key {
        AggKey::User(_) if gone => Row {
            kind: RowKind::DeleteUser,
            values: vec![user_value],
        },
        AggKey::User(_) => Row {
            kind: RowKind::UpsertUser,
            values: vec![
                user_value,
                Value::from(sum),
                Value::from(cell.count),
                Value::from(cell.last_event_ms),
                Value::from(epoch),
            ],
        },
        AggKey::Category(_, name) | AggKey::Merchant(_, name) => {
            let category = matches!(cell.key, AggKey::Category(..));
            let text = Value::from(name.text().to_string());
            let kind = match (category, gone) {
                (true, true) => RowKind::DeleteCategory,
                (true, false) => RowKind::UpsertCategory,
                (false, true) => RowKind::DeleteMerchant,
                (false, false) => RowKind::UpsertMerchant,
            };
            bucket_row(kind, gone, user_value, text, cell, sum, epoch)
        }
        AggKey::Day(_, day) => {
            let kind = if gone {
                RowKind::DeleteDay
            } else {
                RowKind::UpsertDay
            };
            let text = Value::from(format_day(day));
            bucket_row(kind, gone, user_value, text, cell, sum, epoch)
        }
        AggKey::Month(_, month) => {
            let kind = if gone {
                RowKind::DeleteMonth
            } else {
                RowKind::UpsertMonth
            };
            let text = Value::from(format_month(month));
            bucket_row(kind, gone, user_value, text, cell, sum, epoch)
        }
    })
}

fn bucket_row(
    kind: RowKind,
    gone: bool,
    user: Value,
    bucket: Value,
    cell: &CellValue,
    sum: i64,
    epoch: i64,
) -> Row {
    let values = if gone {
        vec![user, bucket]
    } else {
        vec![
            user,
            bucket,
            Value::from(sum),
            Value::from(cell.count),
            Value::from(epoch),
        ]
    };
    Row { kind, values }
}

fn build_batch(
    prepared: &Prepared,
    rows: &[Row],
    timestamp: i64,
) -> Result<cdrs_tokio::query::QueryBatch, CassandraError> {
    // LOCAL_QUORUM, so that readers at LOCAL_QUORUM (`serve --from cassandra`) see every row
    // of a committed epoch on a cluster with replicas.
    let mut builder = BatchQueryBuilder::new()
        .with_consistency(Consistency::LocalQuorum)
        .with_batch_type(BatchType::Unlogged)
        .with_timestamp(timestamp);
    for row in rows {
        let query = match row.kind {
            RowKind::UpsertUser => &prepared.upsert_user,
            RowKind::DeleteUser => &prepared.delete_user,
            RowKind::UpsertCategory => &prepared.upsert_category,
            RowKind::DeleteCategory => &prepared.delete_category,
            RowKind::UpsertMerchant => &prepared.upsert_merchant,
            RowKind::DeleteMerchant => &prepared.delete_merchant,
            RowKind::UpsertDay => &prepared.upsert_day,
            RowKind::DeleteDay => &prepared.delete_day,
            RowKind::UpsertMonth => &prepared.upsert_month,
            RowKind::DeleteMonth => &prepared.delete_month,
        };
        builder = builder.add_query_prepared(query, QueryValues::SimpleValues(row.values.clone()));
    }
    builder
        .build()
        .map_err(|e| CassandraError::request("build a batch", e))
}

/// Runs `attempt` until it succeeds, fails fatally, `stop` is set, or it has failed for
/// [`RECONNECT_AFTER`] (the caller then tries a new session); pauses between attempts grow
/// from 100 ms to 5 s.
async fn retry<T, F, Fut>(
    doing: &str,
    stop: &AtomicBool,
    retries: &std::sync::atomic::AtomicU64,
    mut attempt: F,
) -> Result<T, CassandraError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CassandraError>>,
{
    let mut pause = BACKOFF.0;
    let started = Instant::now();
    let mut warned = false;
    loop {
        // A request to a node that went away may never be answered: give up on it and retry.
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, attempt())
            .await
            .unwrap_or_else(|_| {
                Err(CassandraError::Request {
                    doing: doing.to_string(),
                    message: format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
                    retriable: true,
                })
            });
        match outcome {
            Ok(value) => {
                if warned {
                    tracing::info!(
                        doing,
                        after_s = started.elapsed().as_secs(),
                        "Cassandra writes succeed again."
                    );
                }
                return Ok(value);
            }
            Err(e)
                if e.is_retriable()
                    && !stop.load(Ordering::Acquire)
                    && started.elapsed() < RECONNECT_AFTER =>
            {
                retries.fetch_add(1, Ordering::Relaxed);
                if !warned && started.elapsed() >= Duration::from_secs(2) {
                    warned = true;
                    tracing::warn!(doing, error = %e, "Cassandra is failing; the sink retries (the input waits, nothing is lost).");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKOFF.1);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run(session: &CqlSession, cql: &str, doing: &str) -> Result<(), CassandraError> {
    session
        .query(cql)
        .await
        .map(|_| ())
        .map_err(|e| CassandraError::request(doing, e))
}

async fn prepare(session: &CqlSession, ks: &str) -> Result<Prepared, CassandraError> {
    let p = |cql: String| async move {
        session
            .prepare(cql.clone())
            .await
            .map_err(|e| CassandraError::request(format!("prepare {cql}"), e))
    };
    let bucket = |table: &str, column: &str| {
        (
            format!(
                "INSERT INTO {ks}.{table} (user_id, {column}, total_minor, expense_count, epoch) VALUES (?, ?, ?, ?, ?)"
            ),
            format!("DELETE FROM {ks}.{table} WHERE user_id = ? AND {column} = ?"),
        )
    };
    let (uc, dc) = bucket("user_category_totals", "category");
    let (um, dm) = bucket("user_merchant_totals", "merchant");
    let (ud, dd) = bucket("user_daily_totals", "day");
    let (umo, dmo) = bucket("user_monthly_totals", "month");
    Ok(Prepared {
        upsert_user: p(format!(
            "INSERT INTO {ks}.user_totals (user_id, total_minor, expense_count, last_event_ms, epoch) VALUES (?, ?, ?, ?, ?)"
        ))
        .await?,
        delete_user: p(format!("DELETE FROM {ks}.user_totals WHERE user_id = ?")).await?,
        upsert_category: p(uc).await?,
        delete_category: p(dc).await?,
        upsert_merchant: p(um).await?,
        delete_merchant: p(dm).await?,
        upsert_day: p(ud).await?,
        delete_day: p(dd).await?,
        upsert_month: p(umo).await?,
        delete_month: p(dmo).await?,
    })
}

/// Writes the group's progress row, only if this engine still holds the sink.
async fn commit(
    session: &CqlSession,
    ks: &str,
    partition: &str,
    generation: i64,
    group: &EpochGroup,
) -> Result<(), CassandraError> {
    let positions: Vec<serde_json::Value> = group
        .positions
        .iter()
        .map(|p| {
            serde_json::json!({"source": &*p.source, "partition": p.partition, "position": p.position})
        })
        .collect();
    let envelope = session
        .query_with_values(
            format!(
                "UPDATE {ks}.sink_progress SET positions = ?, records_covered = ?, committed = true, committed_at = ? \
                 WHERE sink = ? AND epoch = ? IF generation = ?"
            ),
            query_values!(
                serde_json::Value::Array(positions).to_string(),
                group.records_covered as i64,
                now_ms(),
                partition.to_string(),
                group.epoch as i64,
                generation
            ),
        )
        .await
        .map_err(|e| CassandraError::request("commit progress", e))?;
    match lwt_result(envelope, "commit progress")? {
        (true, _) => Ok(()),
        (false, theirs) => Err(CassandraError::Fenced {
            keyspace: ks.to_string(),
            sink: partition.to_string(),
            ours: generation,
            theirs: theirs.unwrap_or(-1),
        }),
    }
}
