//! What `ExpenseQuery` reads from, as a small trait, so the request checks, paging rules, error
//! statuses and answer building in [`super::query`] are written once and every store answers
//! the same way.
//!
//! A backend only fetches data: one user's summary, a page of summaries after a user id, one
//! user's day or month buckets, the largest spenders, the totals over all users (for the web
//! report's overview), and (if it can) a subscription. Every answer comes with the [`AsOf`] it
//! reflects. Sums are 128-bit ([`Amount`]), as the read model keeps them: gRPC's `int64` fields
//! refuse a sum that does not fit (`OUT_OF_RANGE`, in [`super::convert`]), the web report shows
//! it exactly. The order of an answer (largest first, ties by key) is [`largest_first`], used by
//! gRPC and the web report alike. Two backends exist:
//!
//! * [`super::memory::ReadModelBackend`]: the engine's read model (one consistent snapshot per
//!   closed epoch; the answer is exactly `as_of`).
//! * `serve::cassandra::CassandraBackend`: the tables the Cassandra sink writes (answers are *at
//!   least* `as_of`; see that module).

use std::pin::Pin;
use std::time::Duration;

use spendflow_operators::{Epoch, UserId};
use spendflow_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::Status;

use super::query::SubscriberGuard;
pub use crate::serve::read_model::Amount;
use crate::serve::read_model::AsOf;
pub use spendflow_operators::reference::Currency;

/// A read-your-writes requirement: answer from epoch `min_epoch` or later, waiting at most
/// `timeout` for it (`min_epoch == 0`: whatever is current, no wait).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait {
    /// The smallest acceptable epoch.
    pub min_epoch: Epoch,
    /// How long to wait for it.
    pub timeout: Duration,
    /// Answer from the oldest state at or after `min_epoch` the backend still holds, not the
    /// newest (a cluster's gathered queries, so that every process answers as of one epoch;
    /// see [`crate::serve::read_model::ReadModel::snapshot_from`]). Backends that hold only
    /// their newest state ignore it.
    pub pinned: bool,
}

impl Wait {
    /// Whatever is current, no wait.
    pub const NOW: Wait = Wait {
        min_epoch: 0,
        timeout: Duration::ZERO,
        pinned: false,
    };
}

/// A value and the state it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer<T> {
    /// Where the value stands in the input.
    pub as_of: AsOf,
    /// The value.
    pub value: T,
}

/// One user's summary as a backend reads it (names as text, any order; the answer sorts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SummaryData {
    /// The user.
    pub user_id: UserId,
    /// Sum of the live expenses, minor units.
    pub total_minor: i128,
    /// Number of live expenses.
    pub expense_count: i64,
    /// The newest event time, ms since the Unix epoch, if known.
    pub last_event_ms: Option<i64>,
    /// `(category, (count, sum))`.
    pub by_category: Vec<(String, Amount)>,
    /// `(merchant, (count, sum))`.
    pub by_merchant: Vec<(String, Amount)>,
    /// The user's monthly budget from the reference data, minor units of `currency`, if set.
    /// (The Cassandra backend has no reference data: always `None` there.)
    pub monthly_budget_minor: Option<i64>,
    /// Sum of the live expenses in the current UTC month (by the server's clock), minor
    /// units. (Always 0 from the Cassandra backend, which keeps no month cells.)
    pub month_to_date_minor: i128,
    /// The user's currency from the reference data, if known (`None` from Cassandra).
    pub currency: Option<Currency>,
}

impl SummaryData {
    /// The summary with its categories and merchants in answer order ([`largest_first`]).
    pub fn ordered(mut self) -> Self {
        largest_first(&mut self.by_category);
        largest_first(&mut self.by_merchant);
        self
    }
}

/// Sorts `(key, (count, sum))` entries the way every answer lists them: largest sum first,
/// ties by key, so answers are stable.
pub fn largest_first<K: Ord>(entries: &mut [(K, Amount)]) {
    entries.sort_by(|(a_key, (_, a_sum)), (b_key, (_, b_sum))| {
        b_sum.cmp(a_sum).then_with(|| a_key.cmp(b_key))
    });
}

/// A page of summaries in increasing user id order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SummaryPage {
    /// The summaries.
    pub summaries: Vec<SummaryData>,
    /// If more users follow: the id to continue after (the last user the page looked at, which
    /// may be later than the last summary if a user went away meanwhile). `None` on the last
    /// page.
    pub resume_after: Option<UserId>,
}

/// One of the largest spenders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpenderData {
    /// The user.
    pub user_id: UserId,
    /// The user's total, minor units.
    pub total_minor: i128,
    /// The user's live expenses.
    pub expense_count: i64,
    /// The user's currency from the reference data, if known.
    pub currency: Option<Currency>,
    /// With a reporting currency: the total converted to it, minor units (the ranking is by
    /// this). `None` without one.
    pub converted_minor: Option<i128>,
}

/// The population and the largest spenders, read together (one snapshot, one index).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverviewData {
    /// Users with a live expense.
    pub users: u64,
    /// Live expenses over all users.
    pub live_expenses: i64,
    /// The largest spenders, largest first, ties by user id.
    pub top: Vec<SpenderData>,
}

/// One category over all users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CategoryData {
    /// The category.
    pub category: String,
    /// Live expenses in it.
    pub expense_count: i64,
    /// Sum over all users of their minor units (users' currencies differ).
    pub total_minor: i128,
    /// Users with a live expense in it.
    pub users: u64,
}

/// Sums category cells (one per user and category) into totals per category over all users.
/// 128-bit sums: a total over all users never wraps.
#[derive(Debug, Default)]
pub struct CategorySums(std::collections::BTreeMap<String, (i64, i128, u64)>);

impl CategorySums {
    /// Adds one user's `(count, sum)` in `category`.
    pub fn add(&mut self, category: &str, (count, sum): Amount) {
        let entry = match self.0.get_mut(category) {
            Some(entry) => entry,
            None => self.0.entry(category.to_string()).or_default(),
        };
        entry.0 += count;
        entry.1 += sum;
        entry.2 += 1;
    }

    /// The totals in answer order: largest first, ties by name.
    pub fn finish(self) -> Vec<CategoryData> {
        let mut out: Vec<CategoryData> = self
            .0
            .into_iter()
            .map(
                |(category, (expense_count, total_minor, users))| CategoryData {
                    category,
                    expense_count,
                    total_minor,
                    users,
                },
            )
            .collect();
        out.sort_by(|a, b| {
            b.total_minor
                .cmp(&a.total_minor)
                .then_with(|| a.category.cmp(&b.category))
        });
        out
    }
}

/// Day or month buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buckets {
    /// UTC days, numbered from 1970-01-01.
    Day,
    /// UTC months, numbered `year * 12 + month - 1`.
    Month,
}

/// The stream a subscription answers with.
pub type SubscribeStream =
    Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

/// A validated subscription request.
#[derive(Debug)]
pub struct SubscribeSpec {
    /// Only these users (sorted, no duplicates); empty means every user.
    pub users: Vec<UserId>,
    /// Replay the changes after this epoch instead of sending a snapshot.
    pub resume_after: Option<Epoch>,
    /// The incarnation `resume_after` was read from; empty if the client did not say.
    pub incarnation: String,
    /// Holds one of the server's subscription slots for as long as the stream lives.
    pub guard: SubscriberGuard,
}

/// Where `ExpenseQuery` reads from. Requests arrive validated; a backend returns what it found,
/// or a status for failures of its own (the store is unavailable, the epoch was not reached in
/// time: see [`super::convert::epoch_not_reached`]).
#[tonic::async_trait]
pub trait QueryBackend: Send + Sync + 'static {
    /// One user's summary; `None` if the user has no live expense.
    async fn user_summary(
        &self,
        wait: Wait,
        user: UserId,
    ) -> Result<Answer<Option<SummaryData>>, Status>;

    /// At most `limit` summaries of the users after `after` (from the first user if `None`).
    async fn user_summaries(
        &self,
        wait: Wait,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Answer<SummaryPage>, Status>;

    /// One user's buckets in `from..=to` that hold a live expense, oldest first, as
    /// `(bucket, (count, sum))`; `None` if the user has no live expense.
    async fn user_windows(
        &self,
        wait: Wait,
        user: UserId,
        buckets: Buckets,
        from: i32,
        to: i32,
    ) -> Result<Answer<Option<Vec<(i32, Amount)>>>, Status>;

    /// The `limit` users with the largest totals, largest first, ties by user id. With a
    /// reporting currency ([`QueryBackend::reporting_currency`]), by the converted totals
    /// instead, leaving out users that cannot be converted.
    async fn top_spenders(
        &self,
        wait: Wait,
        limit: usize,
    ) -> Result<Answer<Vec<SpenderData>>, Status>;

    /// How many users have a live expense, how many live expenses there are, and the `limit`
    /// largest spenders, all from one state (the web report's overview).
    async fn overview(&self, wait: Wait, limit: usize) -> Result<Answer<OverviewData>, Status>;

    /// Totals by category over all users, largest first, ties by name. Costs a pass over every
    /// user's categories: callers cache it (the web report reuses it for a second).
    async fn category_totals(&self, wait: Wait) -> Result<Answer<Vec<CategoryData>>, Status>;

    /// The backend's current incarnation and newest epoch (`None`: none yet), to check
    /// epochs a client sends against.
    fn timeline(&self) -> (std::sync::Arc<str>, Option<Epoch>);

    /// A subscription stream (snapshot, changes, progress marks).
    async fn subscribe(&self, spec: SubscribeSpec) -> Result<SubscribeStream, Status>;

    /// The currency `top_spenders` ranks in (the engine's `--reporting-currency`); `None`:
    /// totals in the users' own currencies. It does not change while a server runs.
    fn reporting_currency(&self) -> Option<Currency> {
        None
    }
}

/// Backends for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use tonic::Status;

    use super::*;

    /// A backend whose reads never finish (a store that hangs).
    pub struct Hanging;

    #[tonic::async_trait]
    impl QueryBackend for Hanging {
        async fn user_summary(
            &self,
            _: Wait,
            _: spendflow_operators::UserId,
        ) -> Result<Answer<Option<SummaryData>>, Status> {
            std::future::pending().await
        }

        async fn user_summaries(
            &self,
            _: Wait,
            _: Option<spendflow_operators::UserId>,
            _: usize,
        ) -> Result<Answer<SummaryPage>, Status> {
            std::future::pending().await
        }

        async fn user_windows(
            &self,
            _: Wait,
            _: spendflow_operators::UserId,
            _: Buckets,
            _: i32,
            _: i32,
        ) -> Result<Answer<Option<Vec<(i32, Amount)>>>, Status> {
            std::future::pending().await
        }

        async fn top_spenders(
            &self,
            _: Wait,
            _: usize,
        ) -> Result<Answer<Vec<SpenderData>>, Status> {
            std::future::pending().await
        }

        async fn overview(&self, _: Wait, _: usize) -> Result<Answer<OverviewData>, Status> {
            std::future::pending().await
        }

        async fn category_totals(&self, _: Wait) -> Result<Answer<Vec<CategoryData>>, Status> {
            std::future::pending().await
        }

        fn timeline(&self) -> (Arc<str>, Option<spendflow_operators::Epoch>) {
            (Arc::from("hanging"), None)
        }

        async fn subscribe(&self, _: SubscribeSpec) -> Result<SubscribeStream, Status> {
            std::future::pending().await
        }
    }
}
