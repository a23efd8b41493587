//! The user index: every `user_totals` row, scanned (paged) and held sorted by user id and by
//! total, so `ListUserSummaries` can page in user id order and `TopSpenders` can rank, which
//! Cassandra cannot do itself (partitions are stored in token order).
//!
//! An index is tagged with the committed epoch seen before its scan started: every row it
//! holds is at least that epoch. It is rebuilt when a request needs a newer epoch than it has
//! (read-your-writes; that request waits for the scan), or, in the background, when it is older
//! than the refresh interval and the sink has committed since (requests keep answering from the
//! index they have meanwhile). One scan runs at a time.

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use spendflow_operators::{Epoch, UserId};

use super::progress::ProgressWatch;
use crate::cassandra::CassandraError;
use crate::cassandra::reader::{TableReader, UserRow};
use crate::serve::read_model::AsOf;

/// Rows per page of the scan.
const SCAN_PAGE: i32 = 5000;

/// Every user, as one scan of `user_totals` found them.
#[derive(Debug)]
pub struct UserIndex {
    /// The committed epoch before the scan: every row is at least this new.
    pub as_of: AsOf,
    by_id: Vec<UserRow>,
    by_total: Vec<u32>,
    built: Instant,
}

impl UserIndex {
    /// An index over `rows` (any order).
    pub fn new(as_of: AsOf, mut rows: Vec<UserRow>) -> Self {
        rows.sort_unstable_by_key(|r| r.user_id);
        rows.dedup_by_key(|r| r.user_id);
        let mut by_total: Vec<u32> = (0..rows.len() as u32).collect();
        by_total.sort_unstable_by(|&a, &b| {
            let (a, b) = (&rows[a as usize], &rows[b as usize]);
            b.total_minor
                .cmp(&a.total_minor)
                .then(a.user_id.cmp(&b.user_id))
        });
        UserIndex {
            as_of,
            by_id: rows,
            by_total,
            built: Instant::now(),
        }
    }

    /// Users after `after` (all if `None`), by id.
    pub fn after(&self, after: Option<UserId>) -> &[UserRow] {
        let start = after.map_or(0, |a| self.by_id.partition_point(|r| r.user_id <= a));
        &self.by_id[start..]
    }

    /// Users by total, largest first, ties by id.
    pub fn top(&self) -> impl Iterator<Item = &UserRow> {
        self.by_total.iter().map(|&i| &self.by_id[i as usize])
    }

    /// Users in the index.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True if no user is in the index.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Live expenses over all users.
    pub fn live_expenses(&self) -> i64 {
        self.by_id.iter().map(|r| r.expense_count).sum()
    }

    fn serves(&self, min_epoch: Epoch) -> bool {
        self.as_of.epoch >= min_epoch
    }

    fn fresh(&self, committed: Option<Epoch>, refresh: Duration) -> bool {
        committed.is_none_or(|c| self.as_of.epoch >= c) || self.built.elapsed() < refresh
    }
}

/// The current index, rebuilt on demand.
#[derive(Debug)]
pub struct IndexCache {
    current: Mutex<Option<Arc<UserIndex>>>,
    scanning: Arc<tokio::sync::Mutex<()>>,
    refresh: Duration,
}

impl IndexCache {
    /// An empty cache; indexes older than `refresh` are rebuilt once the sink commits again.
    pub fn new(refresh: Duration) -> Self {
        IndexCache {
            current: Mutex::new(None),
            scanning: Arc::new(tokio::sync::Mutex::new(())),
            refresh,
        }
    }

    fn current(&self) -> Option<Arc<UserIndex>> {
        self.current.lock().clone()
    }

    /// An index at least `min_epoch` new (the caller has waited for the sink to commit it).
    ///
    /// # Errors
    ///
    /// The scan failed.
    pub async fn get(
        self: &Arc<Self>,
        reader: &Arc<TableReader>,
        progress: &ProgressWatch,
        min_epoch: Epoch,
    ) -> Result<Arc<UserIndex>, CassandraError> {
        if let Some(index) = self.current()
            && index.serves(min_epoch)
        {
            // Stale but good enough for this request: answer from it, and rebuild it in the
            // background unless a scan already runs.
            if !index.fresh(progress.committed_epoch(), self.refresh)
                && let Ok(guard) = Arc::clone(&self.scanning).try_lock_owned()
            {
                let (cache, reader, progress) =
                    (Arc::clone(self), Arc::clone(reader), progress.clone());
                tokio::spawn(async move {
                    if let Err(e) = cache.rebuild(&reader, &progress, guard).await {
                        tracing::warn!(error = %e, "Could not refresh the user index; answering from the previous one.");
                    }
                });
            }
            return Ok(index);
        }
        let guard = Arc::clone(&self.scanning).lock_owned().await;
        if let Some(index) = self.current()
            && index.serves(min_epoch)
            && index.fresh(progress.committed_epoch(), self.refresh)
        {
            return Ok(index);
        }
        self.rebuild(reader, progress, guard).await
    }

    async fn rebuild(
        &self,
        reader: &TableReader,
        progress: &ProgressWatch,
        _scanning: tokio::sync::OwnedMutexGuard<()>,
    ) -> Result<Arc<UserIndex>, CassandraError> {
        let as_of = progress.current().as_of();
        let started = Instant::now();
        let rows = reader.scan_users(SCAN_PAGE).await?;
        let index = Arc::new(UserIndex::new(as_of, rows));
        tracing::debug!(
            users = index.len(),
            epoch = index.as_of.epoch,
            took_ms = started.elapsed().as_millis() as u64,
            "Scanned user_totals."
        );
        *self.current.lock() = Some(Arc::clone(&index));
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user_id: UserId, total_minor: i64) -> UserRow {
        UserRow {
            user_id,
            total_minor,
            expense_count: 1,
            last_event_ms: None,
        }
    }

    #[test]
    fn pages_by_id_and_ranks_by_total() {
        let index = UserIndex::new(
            AsOf::default(),
            vec![
                row(30, 5),
                row(10, 50),
                row(20, 50),
                row(40, -3),
                row(10, 50),
            ],
        );
        assert_eq!(index.len(), 4);
        let ids = |rows: &[UserRow]| rows.iter().map(|r| r.user_id).collect::<Vec<_>>();
        assert_eq!(ids(index.after(None)), [10, 20, 30, 40]);
        assert_eq!(ids(index.after(Some(10))), [20, 30, 40]);
        assert_eq!(ids(index.after(Some(15))), [20, 30, 40]);
        assert!(index.after(Some(40)).is_empty());
        let top: Vec<UserId> = index.top().map(|r| r.user_id).collect();
        assert_eq!(top, [10, 20, 30, 40]);
        assert_eq!(index.live_expenses(), 4);
    }

    #[test]
    fn an_index_is_fresh_while_young_or_current() {
        let index = UserIndex::new(
            AsOf {
                epoch: 7,
                positions: Arc::default(),
                ..AsOf::default()
            },
            Vec::new(),
        );
        assert!(index.serves(7) && !index.serves(8));
        assert!(index.fresh(Some(7), Duration::ZERO));
        assert!(index.fresh(None, Duration::ZERO));
        assert!(!index.fresh(Some(8), Duration::ZERO));
        assert!(index.fresh(Some(8), Duration::from_secs(3600)));
    }
}
