//! Reading the Cassandra sink's tables (see `cassandra::schema` for the contract):
//! prepared statements, row decoding, paging. Shared by `spendflow serve --from cassandra` and
//! `spendflow verify --cassandra`.
//!
//! Reads use `LOCAL_QUORUM`: a row the sink acknowledged before committing an epoch is then
//! seen by every read after that commit, provided the sink's writes and these reads together
//! reach more than the replication factor (on a one-node cluster, always).

use std::sync::Arc;

use cdrs_tokio::consistency::Consistency;
use cdrs_tokio::frame::message_result::RowsMetadataFlags;
use cdrs_tokio::query::{PreparedQuery, QueryValues};
use cdrs_tokio::query_values;
use cdrs_tokio::statement::StatementParamsBuilder;
use cdrs_tokio::types::rows::Row;
use cdrs_tokio::types::{CBytes, IntoRustByName};
use serde::Deserialize;
use spendflow_operators::{CountSum, Epoch, UserId};

use super::keys;
use super::schema::{LAYOUT_PARTITION, SINK_NAME, layout_partitions, validate_keyspace};
use super::{CassandraError, CqlSession};
use crate::core::PartitionPosition;

/// Consistency of every read.
pub const READ_CONSISTENCY: Consistency = Consistency::LocalQuorum;

/// Progress rows read per page while looking for the newest committed one.
const PROGRESS_PAGE: i32 = 16;

/// One `user_totals` row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRow {
    /// The user.
    pub user_id: UserId,
    /// Sum of the live expenses, minor units.
    pub total_minor: i64,
    /// Number of live expenses.
    pub expense_count: i64,
    /// The newest event time, ms since the Unix epoch (null when unknown).
    pub last_event_ms: Option<i64>,
}

/// One `sink_progress` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressRow {
    /// The epoch.
    pub epoch: Epoch,
    /// Input positions the epoch covers.
    pub positions: Vec<PartitionPosition>,
    /// Records read that the epoch covers.
    pub records_covered: u64,
    /// All of the epoch's writes are acknowledged.
    pub committed: bool,
}

/// What `sink_progress` says now.
///
/// For a cluster (a layout of several shares, see `cassandra::schema`), the keyspace's state
/// combines its shares ([`ProgressState::combine`]): the committed epoch is the minimum of the
/// shares' newest committed epochs (nothing while one share has committed nothing), since
/// every share has written at least that epoch; the positions and records covered are those
/// of every share's newest committed row together (what the tables hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgressState {
    /// The newest committed row: the tables show at least this epoch.
    pub committed: Option<ProgressRow>,
    /// The newest row's epoch, committed or not (an epoch in flight is newer than `committed`).
    pub newest: Option<Epoch>,
    /// The static `generation` column: the sink generation of the engine writing the tables
    /// (for a cluster, the layout generation).
    pub generation: Option<i64>,
    /// For a cluster: each share of the newest layout, in process order (empty for a single
    /// engine).
    pub shares: Vec<ShareProgress>,
}

/// One share's progress, in a cluster's [`ProgressState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareProgress {
    /// The share's progress partition, `main/<p>-of-<n>`.
    pub sink: String,
    /// Its newest committed epoch.
    pub committed: Option<Epoch>,
    /// Its sink generation (each start of the process claims the next one).
    pub generation: Option<i64>,
}

impl ProgressState {
    /// The committed epoch, if any.
    pub fn committed_epoch(&self) -> Option<Epoch> {
        self.committed.as_ref().map(|p| p.epoch)
    }

    /// The incarnation answers carry: `cassandra-generation-<g>`. Every engine start claims a
    /// new generation, so epochs of two engine runs are never taken for one timeline.
    ///
    /// For a cluster: `cassandra-layout-<l>-generations-<g0>-<g1>-...` (the layout generation
    /// and every share's generation, so a restart of any process is a new timeline).
    pub fn incarnation(&self) -> Arc<str> {
        let text = |g: Option<i64>| g.map_or_else(|| "none".to_string(), |g| g.to_string());
        if self.shares.is_empty() {
            return format!("cassandra-generation-{}", text(self.generation)).into();
        }
        let generations: Vec<String> = self.shares.iter().map(|s| text(s.generation)).collect();
        format!(
            "cassandra-layout-{}-generations-{}",
            text(self.generation),
            generations.join("-")
        )
        .into()
    }

    /// A cluster's state from its shares' (`shares` in process order, with their progress
    /// partitions): see the type's docs.
    pub fn combine(layout_generation: Option<i64>, shares: Vec<(String, ProgressState)>) -> Self {
        let all_committed = !shares.is_empty() && shares.iter().all(|(_, s)| s.committed.is_some());
        let committed = all_committed.then(|| {
            let rows = shares.iter().filter_map(|(_, s)| s.committed.as_ref());
            ProgressRow {
                epoch: rows.clone().map(|r| r.epoch).min().unwrap_or_default(),
                positions: rows.clone().flat_map(|r| r.positions.clone()).collect(),
                records_covered: rows.map(|r| r.records_covered).sum(),
                committed: true,
            }
        });
        ProgressState {
            committed,
            newest: shares.iter().filter_map(|(_, s)| s.newest).max(),
            generation: layout_generation,
            shares: shares
                .into_iter()
                .map(|(sink, s)| ShareProgress {
                    committed: s.committed_epoch(),
                    generation: s.generation,
                    sink,
                })
                .collect(),
        }
    }

    /// True when no epoch is in flight: the newest row is committed (or there is none).
    pub fn settled(&self) -> bool {
        self.newest == self.committed_epoch()
    }
}

#[derive(Deserialize)]
struct PositionJson {
    source: String,
    partition: i32,
    position: i64,
}

/// Parses `sink_progress.positions`: `[{"source": .., "partition": .., "position": ..}, ..]`.
///
/// # Errors
///
/// A message if the text is not that JSON.
pub fn parse_positions(text: &str) -> Result<Vec<PartitionPosition>, String> {
    let parsed: Vec<PositionJson> = serde_json::from_str(text)
        .map_err(|e| format!("sink_progress.positions is not the expected JSON: {e}"))?;
    Ok(parsed
        .into_iter()
        .map(|p| PartitionPosition {
            source: p.source.into(),
            partition: p.partition,
            position: p.position,
            high_watermark: None,
            ..PartitionPosition::default()
        })
        .collect())
}

struct Statements {
    progress: PreparedQuery,
    user_total: PreparedQuery,
    categories: PreparedQuery,
    merchants: PreparedQuery,
    days_range: PreparedQuery,
    months_range: PreparedQuery,
    months_all: PreparedQuery,
    scan_totals: PreparedQuery,
    scan_categories: PreparedQuery,
    distinct_categories: PreparedQuery,
    distinct_months: PreparedQuery,
}

/// Reads one keyspace's spendflow tables.
pub struct TableReader {
    session: Arc<CqlSession>,
    keyspace: String,
    statements: Statements,
}

impl std::fmt::Debug for TableReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableReader")
            .field("keyspace", &self.keyspace)
            .finish_non_exhaustive()
    }
}

fn decode_error(table: &str, e: impl std::fmt::Display) -> CassandraError {
    CassandraError::Request {
        doing: format!("read {table}"),
        message: format!("a row does not have the expected columns: {e}"),
        retriable: false,
    }
}

fn bad_key(table: &str, key: &str, shape: &str) -> CassandraError {
    CassandraError::Request {
        doing: format!("read {table}"),
        message: format!("a row's key {key:?} is not {shape}"),
        retriable: false,
    }
}

impl TableReader {
    /// Prepares every statement against `keyspace`.
    ///
    /// # Errors
    ///
    /// [`CassandraError::Config`] for a bad keyspace name or a keyspace without spendflow's
    /// tables; [`CassandraError::Request`] if Cassandra does not answer.
    pub async fn new(session: Arc<CqlSession>, keyspace: &str) -> Result<Self, CassandraError> {
        validate_keyspace(keyspace).map_err(|e| CassandraError::Config(e.to_string()))?;
        let ks = keyspace;
        let prepare = |cql: String| {
            let session = Arc::clone(&session);
            async move {
                session.prepare(cql.clone()).await.map_err(|e| {
                    let error = CassandraError::request(format!("prepare {cql:?}"), e);
                    match error {
                        CassandraError::Request {
                            retriable: false,
                            message,
                            ..
                        } => CassandraError::Config(format!(
                            "keyspace {ks} does not hold spendflow's tables ({message}); has an \
                             engine with the Cassandra sink written to it?"
                        )),
                        other => other,
                    }
                })
            }
        };
        let cells = |table: &str, key: &str| {
            format!("SELECT {key}, total_minor, expense_count FROM {ks}.{table} WHERE user_id = ?")
        };
        let range = |table: &str, key: &str| {
            format!(
                "SELECT {key}, total_minor, expense_count FROM {ks}.{table} \
                 WHERE user_id = ? AND {key} >= ? AND {key} <= ?"
            )
        };
        let statements = Statements {
            progress: prepare(format!(
                "SELECT epoch, positions, records_covered, committed, generation FROM {ks}.sink_progress \
                 WHERE sink = ?"
            ))
            .await?,
            user_total: prepare(format!(
                "SELECT user_id, total_minor, expense_count, last_event_ms FROM {ks}.user_totals \
                 WHERE user_id = ?"
            ))
            .await?,
            categories: prepare(cells("user_category_totals", "category")).await?,
            merchants: prepare(cells("user_merchant_totals", "merchant")).await?,
            days_range: prepare(range("user_daily_totals", "day")).await?,
            months_range: prepare(range("user_monthly_totals", "month")).await?,
            months_all: prepare(cells("user_monthly_totals", "month")).await?,
            scan_totals: prepare(format!(
                "SELECT user_id, total_minor, expense_count, last_event_ms FROM {ks}.user_totals"
            ))
            .await?,
            scan_categories: prepare(format!(
                "SELECT category, total_minor, expense_count FROM {ks}.user_category_totals"
            ))
            .await?,
            distinct_categories: prepare(format!(
                "SELECT DISTINCT user_id FROM {ks}.user_category_totals"
            ))
            .await?,
            distinct_months: prepare(format!(
                "SELECT DISTINCT user_id FROM {ks}.user_monthly_totals"
            ))
            .await?,
        };
        Ok(TableReader {
            session,
            keyspace: keyspace.to_string(),
            statements,
        })
    }

    /// The keyspace read.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// One page of `prepared` (all rows if `page_size` is `None`) and the state to continue
    /// from, if more rows follow.
    async fn page(
        &self,
        prepared: &PreparedQuery,
        values: Option<QueryValues>,
        page_size: Option<i32>,
        paging_state: Option<CBytes>,
        doing: &str,
    ) -> Result<(Vec<Row>, Option<CBytes>), CassandraError> {
        let mut params = StatementParamsBuilder::new()
            .with_consistency(READ_CONSISTENCY)
            .idempotent(true);
        if let Some(values) = values {
            params = params.with_values(values);
        }
        if let Some(size) = page_size {
            params = params.with_page_size(size);
        }
        if let Some(state) = paging_state {
            params = params.with_paging_state(state);
        }
        let body = self
            .session
            .exec_with_params(prepared, &params.build())
            .await
            .and_then(|envelope| envelope.response_body())
            .map_err(|e| CassandraError::request(doing, e))?;
        let next = body.as_rows_metadata().and_then(|m| {
            m.flags
                .contains(RowsMetadataFlags::HAS_MORE_PAGES)
                .then(|| m.paging_state.clone())
                .flatten()
        });
        let rows = body.into_rows().ok_or_else(|| CassandraError::Request {
            doing: doing.to_string(),
            message: "the answer has no rows".into(),
            retriable: false,
        })?;
        Ok((rows, next))
    }

    async fn rows(
        &self,
        prepared: &PreparedQuery,
        values: QueryValues,
        doing: &str,
    ) -> Result<Vec<Row>, CassandraError> {
        Ok(self
            .page(prepared, Some(values), None, None, doing)
            .await?
            .0)
    }

    /// What `sink_progress` says: the newest committed row, and the newest row of all. For a
    /// keyspace whose newest layout is a cluster, every share of that layout combined
    /// ([`ProgressState::combine`]); otherwise (a single engine, or a keyspace written before
    /// clusters) the single engine's partition `main`.
    ///
    /// # Errors
    ///
    /// The request failed, or a row is malformed.
    pub async fn progress(&self) -> Result<ProgressState, CassandraError> {
        match self.layout().await? {
            Some((generation, processes)) if processes > 1 => {
                let partitions = layout_partitions(processes);
                let states = futures::future::try_join_all(
                    partitions.iter().map(|p| self.share_progress(p)),
                )
                .await?;
                Ok(ProgressState::combine(
                    generation,
                    partitions.into_iter().zip(states).collect(),
                ))
            }
            _ => self.share_progress(SINK_NAME).await,
        }
    }

    /// The layout registry: the layout generation and the number of shares of the newest
    /// layout; `None` for a keyspace without one (written before clusters). `SELECT *`, so a
    /// keyspace whose table has no layout columns yet reads as one without a registry.
    async fn layout(&self) -> Result<Option<(Option<i64>, usize)>, CassandraError> {
        const DOING: &str = "read the sink layout";
        let params = StatementParamsBuilder::new()
            .with_consistency(READ_CONSISTENCY)
            .with_values(query_values!(LAYOUT_PARTITION.to_string()))
            .idempotent(true)
            .build();
        let rows = self
            .session
            .query_with_params(
                format!(
                    "SELECT * FROM {}.sink_progress WHERE sink = ? LIMIT 1",
                    self.keyspace
                ),
                params,
            )
            .await
            .and_then(|envelope| envelope.response_body())
            .map_err(|e| CassandraError::request(DOING, e))?
            .into_rows()
            .unwrap_or_default();
        let Some(row) = rows.first().filter(|r| r.contains_column("processes")) else {
            return Ok(None);
        };
        let processes: Option<i32> = row
            .get_by_name("processes")
            .map_err(|e| decode_error("sink_progress", e))?;
        let generation: Option<i64> = row
            .get_by_name("generation")
            .map_err(|e| decode_error("sink_progress", e))?;
        Ok(processes
            .and_then(|p| usize::try_from(p).ok())
            .map(|p| (generation, p)))
    }

    /// One progress partition's state (`main`, or a share's `main/<p>-of-<n>`).
    async fn share_progress(&self, partition: &str) -> Result<ProgressState, CassandraError> {
        let mut state = ProgressState::default();
        let mut paging = None;
        loop {
            let (rows, next) = self
                .page(
                    &self.statements.progress,
                    Some(query_values!(partition.to_string())),
                    Some(PROGRESS_PAGE),
                    paging,
                    "read sink_progress",
                )
                .await?;
            for row in &rows {
                if state.generation.is_none() {
                    state.generation = row
                        .get_by_name("generation")
                        .map_err(|e| decode_error("sink_progress", e))?;
                }
                // A partition claimed (or fenced) before its first commit has only its static
                // columns: one row without an epoch.
                let epoch: Option<i64> = row
                    .get_by_name("epoch")
                    .map_err(|e| decode_error("sink_progress", e))?;
                let Some(epoch) = epoch else {
                    continue;
                };
                state.newest.get_or_insert(epoch as Epoch);
                let committed: Option<bool> = row
                    .get_by_name("committed")
                    .map_err(|e| decode_error("sink_progress", e))?;
                if committed != Some(true) {
                    continue;
                }
                let positions: Option<String> = row
                    .get_by_name("positions")
                    .map_err(|e| decode_error("sink_progress", e))?;
                let positions = parse_positions(positions.as_deref().unwrap_or("[]"))
                    .map_err(|e| decode_error("sink_progress", e))?;
                let records: Option<i64> = row
                    .get_by_name("records_covered")
                    .map_err(|e| decode_error("sink_progress", e))?;
                state.committed = Some(ProgressRow {
                    epoch: epoch as Epoch,
                    positions,
                    records_covered: records.unwrap_or(0).max(0) as u64,
                    committed: true,
                });
                return Ok(state);
            }
            match next {
                Some(next) if !rows.is_empty() => paging = Some(next),
                _ => return Ok(state),
            }
        }
    }

    /// One user's `user_totals` row, if it exists.
    ///
    /// # Errors
    ///
    /// The request failed, or the row is malformed.
    pub async fn user(&self, user: UserId) -> Result<Option<UserRow>, CassandraError> {
        let rows = self
            .rows(
                &self.statements.user_total,
                query_values!(user as i64),
                "read user_totals",
            )
            .await?;
        rows.first().map(user_row).transpose()
    }

    /// One user's `(category, (count, sum))` cells.
    ///
    /// # Errors
    ///
    /// The request failed, or a row is malformed.
    pub async fn categories(
        &self,
        user: UserId,
    ) -> Result<Vec<(String, CountSum)>, CassandraError> {
        let rows = self
            .rows(
                &self.statements.categories,
                query_values!(user as i64),
                "read user_category_totals",
            )
            .await?;
        rows.iter()
            .map(|r| named_cell(r, "user_category_totals", "category"))
            .collect()
    }

    /// One user's `(merchant, (count, sum))` cells.
    ///
    /// # Errors
    ///
    /// The request failed, or a row is malformed.
    pub async fn merchants(&self, user: UserId) -> Result<Vec<(String, CountSum)>, CassandraError> {
        let rows = self
            .rows(
                &self.statements.merchants,
                query_values!(user as i64),
                "read user_merchant_totals",
            )
            .await?;
        rows.iter()
            .map(|r| named_cell(r, "user_merchant_totals", "merchant"))
            .collect()
    }

    /// One user's day cells in `from..=to` (day numbers), oldest first.
    ///
    /// # Errors
    ///
    /// The request failed, or a row is malformed.
    pub async fn days(
        &self,
        user: UserId,
        from: i32,
        to: i32,
    ) -> Result<Vec<(i32, CountSum)>, CassandraError> {
        let Some((from, to)) = keys::clamp(from, to, keys::first_day(), keys::last_day()) else {
            return Ok(Vec::new());
        };
        let rows = self
            .rows(
                &self.statements.days_range,
                query_values!(user as i64, keys::day_key(from), keys::day_key(to)),
                "read user_daily_totals",
            )
            .await?;
        bucket_cells(
            &rows,
            "user_daily_totals",
            "day",
            keys::parse_day_key,
            "YYYY-MM-DD",
        )
    }

    /// One user's month cells in `from..=to` (month numbers), oldest first.
    ///
    /// # Errors
    ///
    /// The request failed, or a row is malformed.
    pub async fn months(
        &self,
        user: UserId,
        from: i32,
        to: i32,
    ) -> Result<Vec<(i32, CountSum)>, CassandraError> {
        let Some((from, to)) = keys::clamp(from, to, keys::FIRST_MONTH, keys::LAST_MONTH) else {
            return Ok(Vec::new());
        };
        let rows = self
            .rows(
                &self.statements.months_range,
                query_values!(user as i64, keys::month_key(from), keys::month_key(to)),
                "read user_monthly_totals",
            )
            .await?;
        bucket_cells(
            &rows,
            "user_monthly_totals",
            "month",
            keys::parse_month_key,
            "YYYY-MM",
        )
    }

    /// Every month cell of one user, oldest first.
    ///
    /// # Errors
    ///
    /// The request failed, or a row is malformed.
    pub async fn all_months(&self, user: UserId) -> Result<Vec<(i32, CountSum)>, CassandraError> {
        let rows = self
            .rows(
                &self.statements.months_all,
                query_values!(user as i64),
                "read user_monthly_totals",
            )
            .await?;
        bucket_cells(
            &rows,
            "user_monthly_totals",
            "month",
            keys::parse_month_key,
            "YYYY-MM",
        )
    }

    /// Every `user_totals` row, a page of `page_size` at a time (in token order, not by id).
    ///
    /// # Errors
    ///
    /// A request failed, or a row is malformed.
    pub async fn scan_users(&self, page_size: i32) -> Result<Vec<UserRow>, CassandraError> {
        let mut out = Vec::new();
        let mut paging = None;
        loop {
            let (rows, next) = self
                .page(
                    &self.statements.scan_totals,
                    None,
                    Some(page_size),
                    paging,
                    "scan user_totals",
                )
                .await?;
            for row in &rows {
                out.push(user_row(row)?);
            }
            match next {
                Some(next) => paging = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// Every `user_category_totals` row, a page of `page_size` at a time, handed to `each` as
    /// `(category, (count, sum))` (one per user and category; in token order).
    ///
    /// # Errors
    ///
    /// A request failed, or a row is malformed.
    pub async fn scan_categories(
        &self,
        page_size: i32,
        mut each: impl FnMut(&str, CountSum) + Send,
    ) -> Result<(), CassandraError> {
        let mut paging = None;
        loop {
            let (rows, next) = self
                .page(
                    &self.statements.scan_categories,
                    None,
                    Some(page_size),
                    paging,
                    "scan user_category_totals",
                )
                .await?;
            for row in &rows {
                let (name, cell) = named_cell(row, "user_category_totals", "category")?;
                each(&name, cell);
            }
            match next {
                Some(next) => paging = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// The ids of every user with a row in `user_category_totals` or `user_monthly_totals`
    /// (partition keys only), unsorted.
    ///
    /// # Errors
    ///
    /// A request failed, or a row is malformed.
    pub async fn users_with_cells(&self, page_size: i32) -> Result<Vec<UserId>, CassandraError> {
        let mut out = Vec::new();
        for (prepared, table) in [
            (&self.statements.distinct_categories, "user_category_totals"),
            (&self.statements.distinct_months, "user_monthly_totals"),
        ] {
            let doing = format!("scan {table}");
            let mut paging = None;
            loop {
                let (rows, next) = self
                    .page(prepared, None, Some(page_size), paging, &doing)
                    .await?;
                for row in &rows {
                    let user: i64 = row
                        .get_r_by_name("user_id")
                        .map_err(|e| decode_error(table, e))?;
                    out.push(user as UserId);
                }
                match next {
                    Some(next) => paging = Some(next),
                    None => break,
                }
            }
        }
        Ok(out)
    }
}

fn user_row(row: &Row) -> Result<UserRow, CassandraError> {
    let get = |name: &str| -> Result<Option<i64>, CassandraError> {
        row.get_by_name(name)
            .map_err(|e| decode_error("user_totals", e))
    };
    let user_id = get("user_id")?.ok_or_else(|| decode_error("user_totals", "user_id is null"))?;
    Ok(UserRow {
        user_id: user_id as UserId,
        total_minor: get("total_minor")?.unwrap_or(0),
        expense_count: get("expense_count")?.unwrap_or(0),
        last_event_ms: get("last_event_ms")?,
    })
}

fn count_sum(row: &Row, table: &str) -> Result<CountSum, CassandraError> {
    let get = |name: &str| -> Result<i64, CassandraError> {
        let value: Option<i64> = row.get_by_name(name).map_err(|e| decode_error(table, e))?;
        Ok(value.unwrap_or(0))
    };
    Ok((get("expense_count")?, get("total_minor")?))
}

fn named_cell(row: &Row, table: &str, key: &str) -> Result<(String, CountSum), CassandraError> {
    let name: String = row.get_r_by_name(key).map_err(|e| decode_error(table, e))?;
    Ok((name, count_sum(row, table)?))
}

fn bucket_cells(
    rows: &[Row],
    table: &str,
    key: &str,
    parse: fn(&str) -> Option<i32>,
    shape: &str,
) -> Result<Vec<(i32, CountSum)>, CassandraError> {
    let mut out = rows
        .iter()
        .map(|row| {
            let text: String = row.get_r_by_name(key).map_err(|e| decode_error(table, e))?;
            let bucket = parse(&text).ok_or_else(|| bad_key(table, &text, shape))?;
            Ok((bucket, count_sum(row, table)?))
        })
        .collect::<Result<Vec<_>, CassandraError>>()?;
    out.sort_unstable_by_key(|(bucket, _)| *bucket);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_from_the_sink_json() {
        let positions = parse_positions(
            r#"[{"source":"expenses.user.7","partition":0,"position":42},
                {"source":"expenses","partition":3,"position":0,"extra":true}]"#,
        )
        .unwrap();
        assert_eq!(positions.len(), 2);
        assert_eq!(&*positions[0].source, "expenses.user.7");
        assert_eq!((positions[0].partition, positions[0].position), (0, 42));
        assert_eq!((positions[1].partition, positions[1].position), (3, 0));
        assert_eq!(positions[1].high_watermark, None);
        assert!(parse_positions("[]").unwrap().is_empty());
        for bad in [
            "",
            "{}",
            r#"[{"source":"x"}]"#,
            r#"[{"source":"x","partition":"0","position":1}]"#,
        ] {
            assert!(parse_positions(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_cluster_is_committed_up_to_its_slowest_share() {
        let state = |committed: Option<(Epoch, i64)>, newest, generation| ProgressState {
            committed: committed.map(|(epoch, position)| ProgressRow {
                epoch,
                positions: parse_positions(&format!(
                    r#"[{{"source":"expenses","partition":{epoch},"position":{position}}}]"#
                ))
                .unwrap(),
                records_covered: position as u64,
                committed: true,
            }),
            newest,
            generation,
            shares: Vec::new(),
        };
        let combined = ProgressState::combine(
            Some(3),
            vec![
                (
                    "main/0-of-2".to_string(),
                    state(Some((9, 40)), Some(9), Some(2)),
                ),
                (
                    "main/1-of-2".to_string(),
                    state(Some((7, 25)), Some(7), Some(5)),
                ),
            ],
        );
        assert_eq!(combined.committed_epoch(), Some(7));
        let committed = combined.committed.as_ref().unwrap();
        assert_eq!(committed.records_covered, 65);
        assert_eq!(committed.positions.len(), 2, "every share's positions");
        assert_eq!(combined.newest, Some(9));
        assert!(!combined.settled(), "one share is ahead of the other");
        assert_eq!(
            &*combined.incarnation(),
            "cassandra-layout-3-generations-2-5"
        );
        assert_eq!(combined.shares[1].sink, "main/1-of-2");
        assert_eq!(combined.shares[1].committed, Some(7));

        // Once both have committed the same epoch, the cluster is settled at it.
        let level = ProgressState::combine(
            Some(3),
            vec![
                (
                    "main/0-of-2".to_string(),
                    state(Some((9, 40)), Some(9), Some(2)),
                ),
                (
                    "main/1-of-2".to_string(),
                    state(Some((9, 30)), Some(9), Some(5)),
                ),
            ],
        );
        assert_eq!(level.committed_epoch(), Some(9));
        assert!(level.settled());

        // A share that has committed nothing (a new layout's, say): nothing is committed.
        let partial = ProgressState::combine(
            Some(4),
            vec![
                (
                    "main/0-of-2".to_string(),
                    state(Some((9, 40)), Some(9), Some(1)),
                ),
                ("main/1-of-2".to_string(), state(None, None, None)),
            ],
        );
        assert_eq!(partial.committed_epoch(), None);
        assert!(!partial.settled());
        assert_eq!(
            &*partial.incarnation(),
            "cassandra-layout-4-generations-1-none"
        );

        // A single engine keeps its incarnation.
        assert_eq!(
            &*state(None, None, Some(6)).incarnation(),
            "cassandra-generation-6"
        );
    }

    #[test]
    fn settled_means_no_epoch_in_flight() {
        let row = |epoch| ProgressRow {
            epoch,
            positions: Vec::new(),
            records_covered: 0,
            committed: true,
        };
        assert!(ProgressState::default().settled());
        let in_flight = ProgressState {
            committed: Some(row(4)),
            newest: Some(5),
            ..ProgressState::default()
        };
        assert!(!in_flight.settled());
        assert_eq!(in_flight.committed_epoch(), Some(4));
        let settled = ProgressState {
            committed: Some(row(5)),
            newest: Some(5),
            ..ProgressState::default()
        };
        assert!(settled.settled());
    }
}
