//! The served side from the Cassandra sink's tables, read directly (no gRPC server needed).
//!
//! Users are every partition key of `user_totals`, `user_category_totals` and
//! `user_monthly_totals` (so a user with leftover cells but no total is found too), sorted by
//! id after the scan, since Cassandra keeps partitions in token order. A page is then each
//! user's `user_totals` row (from the scan), categories and months (point reads). A user with
//! cells but no `user_totals` row is served with a zero total and count.
//!
//! In a cluster every process writes its own share of the tables; the sink's committed epoch
//! is then the minimum over the shares of the newest layout (`cassandra::reader`), and "in
//! flight" means some share has committed a newer epoch than another.
//!
//! "Ready" means the sink is quiet: an epoch is committed, none is in flight, and what the
//! committed epoch covers has not changed for the quiet period (default 2 s). Cassandra cannot
//! see what the engine has not read yet, so run verify once the engine has caught up (its
//! `Admin/GetStatus`), or give the quiet period room. The committed epochs at the start and
//! end of the check are reported as a note.

use std::time::{Duration, Instant};

use futures::StreamExt;
use spendflow_operators::UserId;

use super::{MonthRange, Served, ServedPage, UserAggregates, VerifyError};
use crate::cassandra::reader::{ProgressState, TableReader, UserRow};
use crate::cassandra::{CassandraClientSecurity, connect_with};

/// Rows per page of the user scans.
const SCAN_PAGE: i32 = 5000;
/// Users read at once.
const CONCURRENCY: usize = 32;
/// Default time the sink must be quiet before the check starts.
pub const DEFAULT_QUIET: Duration = Duration::from_secs(2);

/// The Cassandra sink's tables.
pub struct CassandraServed {
    runtime: tokio::runtime::Runtime,
    reader: TableReader,
    quiet: Duration,
    /// Every user, by id, with its `user_totals` row if it has one (after the first page).
    users: Option<Vec<(UserId, Option<UserRow>)>>,
    next: usize,
    first: Option<ProgressState>,
    last: Option<ProgressState>,
}

impl std::fmt::Debug for CassandraServed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraServed")
            .field("keyspace", &self.reader.keyspace())
            .finish_non_exhaustive()
    }
}

impl CassandraServed {
    /// Connects to `contact_points` (`HOST:PORT[,...]`) and prepares reads of `keyspace`.
    ///
    /// # Errors
    ///
    /// [`VerifyError::Cassandra`] if Cassandra cannot be reached or the keyspace does not hold
    /// spendflow's tables.
    pub fn connect(contact_points: &str, keyspace: &str) -> Result<Self, VerifyError> {
        Self::connect_with(
            contact_points,
            keyspace,
            &CassandraClientSecurity::default(),
        )
    }

    /// As [`CassandraServed::connect`], with credentials and TLS settings.
    ///
    /// # Errors
    ///
    /// As [`CassandraServed::connect`].
    pub fn connect_with(
        contact_points: &str,
        keyspace: &str,
        security: &CassandraClientSecurity,
    ) -> Result<Self, VerifyError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| VerifyError::Config(format!("could not start a runtime: {e}")))?;
        let reader = runtime.block_on(async {
            let session = connect_with(contact_points, security).await?;
            TableReader::new(session, keyspace).await
        })?;
        Ok(CassandraServed {
            runtime,
            reader,
            quiet: DEFAULT_QUIET,
            users: None,
            next: 0,
            first: None,
            last: None,
        })
    }

    /// How long the sink must be quiet before the check starts.
    pub fn with_quiet(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    fn progress(&self) -> Result<ProgressState, VerifyError> {
        Ok(self.runtime.block_on(self.reader.progress())?)
    }

    /// Every user id in the tables, sorted, with its `user_totals` row.
    fn scan(&self) -> Result<Vec<(UserId, Option<UserRow>)>, VerifyError> {
        let (rows, with_cells) = self.runtime.block_on(async {
            tokio::try_join!(
                self.reader.scan_users(SCAN_PAGE),
                self.reader.users_with_cells(SCAN_PAGE)
            )
        })?;
        let mut users: Vec<(UserId, Option<UserRow>)> = rows
            .into_iter()
            .map(|r| (r.user_id, Some(r)))
            .chain(with_cells.into_iter().map(|u| (u, None)))
            .collect();
        // Rows first among equal ids, so dedup keeps the one with the total.
        users.sort_unstable_by_key(|(u, row)| (*u, row.is_none()));
        users.dedup_by_key(|(u, _)| *u);
        Ok(users)
    }
}

fn describe(state: &ProgressState) -> String {
    let mut text = match &state.committed {
        None => "sink_progress has no committed epoch yet".to_string(),
        Some(p) => {
            let in_flight = match state.newest {
                Some(n) if n != p.epoch => format!(", epoch {n} in flight"),
                _ => String::new(),
            };
            format!(
                "committed epoch {} covering {} records{in_flight}",
                p.epoch, p.records_covered
            )
        }
    };
    if !state.shares.is_empty() {
        // A cluster's committed epoch is its slowest share's: say which share is where.
        let shares: Vec<String> = state
            .shares
            .iter()
            .map(|s| match s.committed {
                Some(epoch) => format!("{} at epoch {epoch}", s.sink),
                None => format!("{} has committed nothing", s.sink),
            })
            .collect();
        text.push_str(&format!(" (shares: {})", shares.join(", ")));
    }
    text
}

impl Served for CassandraServed {
    fn name(&self) -> &str {
        "cassandra"
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), VerifyError> {
        let started = Instant::now();
        let mut last = self.progress()?;
        let mut since = Instant::now();
        loop {
            let quiet = last.committed.is_some() && last.settled();
            if quiet && since.elapsed() >= self.quiet {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(VerifyError::NotReady {
                    waited: timeout,
                    detail: format!(
                        "{}; the sink must be quiet for {:?} (no epoch in flight, nothing new \
                         committed) before the tables are compared",
                        describe(&last),
                        self.quiet
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
            let now = self.progress()?;
            let covered = |s: &ProgressState| {
                s.committed
                    .as_ref()
                    .map(|p| (p.records_covered, p.positions.clone()))
            };
            if now.settled() != last.settled() || covered(&now) != covered(&last) {
                since = Instant::now();
            }
            last = now;
        }
    }

    fn next_page(
        &mut self,
        page_size: usize,
        _months: Option<MonthRange>,
    ) -> Result<ServedPage, VerifyError> {
        if self.users.is_none() {
            self.first = Some(self.progress()?);
            self.users = Some(self.scan()?);
        }
        let users = self.users.as_deref().unwrap_or_default();
        let total = users.len();
        let end = (self.next + page_size).min(total);
        let page = &users[self.next..end];
        let reader = &self.reader;
        let read = |(user, row): (UserId, Option<UserRow>)| async move {
            let (categories, months) =
                tokio::try_join!(reader.categories(user), reader.all_months(user))?;
            Ok::<_, VerifyError>(UserAggregates {
                user_id: user,
                count: row.map_or(0, |r| r.expense_count),
                total_minor: row.map_or(0, |r| r.total_minor),
                by_category: categories.into_iter().collect(),
                by_month: months.into_iter().collect(),
            })
        };
        let served: Vec<UserAggregates> = self
            .runtime
            .block_on(
                futures::stream::iter(page.iter().copied())
                    .map(read)
                    .buffered(CONCURRENCY)
                    .collect::<Vec<_>>(),
            )
            .into_iter()
            .collect::<Result<_, _>>()?;
        self.next = end;
        let more = end < total;
        if !more {
            self.last = Some(self.progress()?);
        }
        Ok(ServedPage {
            users: served,
            more,
        })
    }

    fn notes(&self) -> Vec<String> {
        let epoch = |s: &Option<ProgressState>| s.as_ref().and_then(ProgressState::committed_epoch);
        let mut notes = Vec::new();
        match (epoch(&self.first), epoch(&self.last)) {
            (Some(first), Some(last)) if first != last => notes.push(format!(
                "the sink's committed epoch moved from {first} to {last} during the check: it \
                 was still writing, and a mismatch may be one it had not written yet"
            )),
            (Some(epoch), _) => notes.push(format!(
                "keyspace {}: the sink's committed epoch was {epoch} throughout",
                self.reader.keyspace()
            )),
            (None, _) => notes.push(format!(
                "keyspace {}: sink_progress has no committed epoch, so the tables may hold a \
                 partly written epoch",
                self.reader.keyspace()
            )),
        }
        if let Some(first) = &self.first
            && !first.settled()
        {
            notes.push(format!("at the start: {}", describe(first)));
        }
        notes
    }
}
