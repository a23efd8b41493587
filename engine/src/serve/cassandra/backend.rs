//! `ExpenseQuery` from the Cassandra sink's tables: the data access behind the shared query
//! service (see the parent module for what the answers promise).

use std::sync::Arc;

use futures::StreamExt;
use spendflow_operators::{CountSum, UserId};
use tokio::sync::Mutex as AsyncMutex;
use tonic::Status;

use super::index::IndexCache;
use super::progress::ProgressWatch;
use crate::cassandra::CassandraError;
use crate::cassandra::reader::TableReader;
use crate::serve::grpc::backend::{
    Amount, Answer, Buckets, CategoryData, CategorySums, OverviewData, QueryBackend, SpenderData,
    SubscribeSpec, SubscribeStream, SummaryData, SummaryPage, Wait,
};

/// Users of a `ListUserSummaries` page read at once.
const PAGE_CONCURRENCY: usize = 32;
/// Rows per page of the scan behind the totals by category over all users.
const CATEGORY_SCAN_PAGE: i32 = 5000;

/// Exact (128-bit) sums of cells as the tables store them (`bigint`).
fn widen(cells: Vec<(String, CountSum)>) -> Vec<(String, Amount)> {
    cells
        .into_iter()
        .map(|(key, (count, sum))| (key, (count, i128::from(sum))))
        .collect()
}

fn spender(row: &crate::cassandra::reader::UserRow) -> SpenderData {
    SpenderData {
        user_id: row.user_id,
        total_minor: row.total_minor.into(),
        expense_count: row.expense_count,
        ..SpenderData::default()
    }
}

/// The message of `Subscribe` from Cassandra.
pub const SUBSCRIBE_UNIMPLEMENTED: &str = "Subscribe is not served from Cassandra: the tables \
     hold current values, not the per-epoch changes a stream is made of. Subscribe on the \
     engine's own gRPC address (`spendflow run ... --grpc ADDR`), or poll GetUserSummary here \
     with consistency.min_epoch";

/// A Cassandra failure as a gRPC status: `UNAVAILABLE` if a retry may succeed, `INTERNAL`
/// otherwise (unexpected rows, a missing table).
pub fn status(error: CassandraError) -> Status {
    if error.is_retriable() {
        Status::unavailable(format!("{error}; retry"))
    } else {
        Status::internal(error.to_string())
    }
}

/// Reads the tables for the query service.
#[derive(Debug, Clone)]
pub struct CassandraBackend {
    reader: Arc<TableReader>,
    progress: ProgressWatch,
    index: Arc<IndexCache>,
    /// One scan of `user_category_totals` at a time; concurrent callers wait for it.
    category_scan: Arc<AsyncMutex<()>>,
}

impl CassandraBackend {
    /// A backend over `reader`, answering as of what `progress` has seen committed.
    pub fn new(reader: Arc<TableReader>, progress: ProgressWatch, index: Arc<IndexCache>) -> Self {
        CassandraBackend {
            reader,
            progress,
            index,
            category_scan: Arc::default(),
        }
    }

    /// One user's summary, read now; `None` if `user_totals` has no row for the user.
    async fn summary(&self, user: UserId) -> Result<Option<SummaryData>, Status> {
        let (row, categories, merchants) = tokio::try_join!(
            self.reader.user(user),
            self.reader.categories(user),
            self.reader.merchants(user)
        )
        .map_err(status)?;
        Ok(row.map(|row| SummaryData {
            user_id: row.user_id,
            total_minor: row.total_minor.into(),
            expense_count: row.expense_count,
            last_event_ms: row.last_event_ms,
            by_category: widen(categories),
            by_merchant: widen(merchants),
            // No reference data nor month cells in the tables: budget, month to date and
            // currency stay unknown (0 and empty on the wire).
            ..SummaryData::default()
        }))
    }
}

#[tonic::async_trait]
impl QueryBackend for CassandraBackend {
    async fn user_summary(
        &self,
        wait: Wait,
        user: UserId,
    ) -> Result<Answer<Option<SummaryData>>, Status> {
        let as_of = self.progress.at_least(wait).await?;
        let value = self.summary(user).await?;
        Ok(Answer { as_of, value })
    }

    async fn user_summaries(
        &self,
        wait: Wait,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Answer<SummaryPage>, Status> {
        self.progress.at_least(wait).await?;
        let index = self
            .index
            .get(&self.reader, &self.progress, wait.min_epoch)
            .await
            .map_err(status)?;
        let users = index.after(after);
        let page = &users[..users.len().min(limit)];
        let ids: Vec<UserId> = page.iter().map(|r| r.user_id).collect();
        let summaries: Vec<Option<SummaryData>> = futures::stream::iter(ids)
            .map(|user| self.summary(user))
            .buffered(PAGE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let resume_after = (users.len() > page.len())
            .then(|| page.last().map(|r| r.user_id))
            .flatten();
        Ok(Answer {
            as_of: index.as_of.clone(),
            value: SummaryPage {
                // A user the index has but the tables no longer do went away meanwhile.
                summaries: summaries.into_iter().flatten().collect(),
                resume_after,
            },
        })
    }

    async fn user_windows(
        &self,
        wait: Wait,
        user: UserId,
        buckets: Buckets,
        from: i32,
        to: i32,
    ) -> Result<Answer<Option<Vec<(i32, Amount)>>>, Status> {
        let as_of = self.progress.at_least(wait).await?;
        let cells = async {
            match buckets {
                Buckets::Day => self.reader.days(user, from, to).await,
                Buckets::Month => self.reader.months(user, from, to).await,
            }
        };
        let (row, cells) = tokio::try_join!(self.reader.user(user), cells).map_err(status)?;
        Ok(Answer {
            as_of,
            value: row.map(|_| {
                cells
                    .into_iter()
                    .map(|(bucket, (count, sum))| (bucket, (count, i128::from(sum))))
                    .collect()
            }),
        })
    }

    async fn top_spenders(
        &self,
        wait: Wait,
        limit: usize,
    ) -> Result<Answer<Vec<SpenderData>>, Status> {
        self.progress.at_least(wait).await?;
        let index = self
            .index
            .get(&self.reader, &self.progress, wait.min_epoch)
            .await
            .map_err(status)?;
        let spenders = index.top().take(limit).map(spender).collect();
        Ok(Answer {
            as_of: index.as_of.clone(),
            value: spenders,
        })
    }

    async fn overview(&self, wait: Wait, limit: usize) -> Result<Answer<OverviewData>, Status> {
        self.progress.at_least(wait).await?;
        let index = self
            .index
            .get(&self.reader, &self.progress, wait.min_epoch)
            .await
            .map_err(status)?;
        Ok(Answer {
            as_of: index.as_of.clone(),
            value: OverviewData {
                users: index.len() as u64,
                live_expenses: index.live_expenses(),
                top: index.top().take(limit).map(spender).collect(),
            },
        })
    }

    async fn category_totals(&self, wait: Wait) -> Result<Answer<Vec<CategoryData>>, Status> {
        let _scan = self.category_scan.lock().await;
        // Every row read after the committed epoch seen here is at least that new.
        let as_of = self.progress.at_least(wait).await?;
        let mut sums = CategorySums::default();
        self.reader
            .scan_categories(CATEGORY_SCAN_PAGE, |name, (count, sum)| {
                sums.add(name, (count, i128::from(sum)));
            })
            .await
            .map_err(status)?;
        Ok(Answer {
            as_of,
            value: sums.finish(),
        })
    }

    fn timeline(&self) -> (Arc<str>, Option<spendflow_operators::Epoch>) {
        let observed = self.progress.current();
        (
            observed.as_of().incarnation,
            observed.state.committed_epoch(),
        )
    }

    async fn subscribe(&self, _spec: SubscribeSpec) -> Result<SubscribeStream, Status> {
        Err(Status::unimplemented(SUBSCRIBE_UNIMPLEMENTED))
    }
}
