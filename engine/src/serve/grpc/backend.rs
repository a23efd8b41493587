//! What `ExpenseQuery` reads from, as a small trait, so the request checks, paging rules, error
//! statuses and answer building in [`super::query`] are written once and every store answers
//! the same way.
//!
//! A backend only fetches data: one user's summary, a page of summaries after a user id, one
//! user's day or month buckets, the largest spenders, and (if it can) a subscription. Every
//! answer comes with the [`AsOf`] it reflects. Two backends exist:
//!
//! * [`super::memory::ReadModelBackend`]: the engine's read model (one consistent snapshot per
//!   closed epoch; the answer is exactly `as_of`).
//! * `serve::cassandra::CassandraBackend`: the tables the Cassandra sink writes (answers are *at
//!   least* `as_of`; see that module).

use std::pin::Pin;
use std::time::Duration;

use spendflow_operators::{CountSum, Epoch, UserId};
use spendflow_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::Status;

use super::query::SubscriberGuard;
use crate::serve::read_model::AsOf;

/// A read-your-writes requirement: answer from epoch `min_epoch` or later, waiting at most
/// `timeout` for it (`min_epoch == 0`: whatever is current, no wait).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait {
    /// The smallest acceptable epoch.
    pub min_epoch: Epoch,
    /// How long to wait for it.
    pub timeout: Duration,
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
    pub total_minor: i64,
    /// Number of live expenses.
    pub expense_count: i64,
    /// The newest event time, ms since the Unix epoch, if known.
    pub last_event_ms: Option<i64>,
    /// `(category, (count, sum))`.
    pub by_category: Vec<(String, CountSum)>,
    /// `(merchant, (count, sum))`.
    pub by_merchant: Vec<(String, CountSum)>,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpenderData {
    /// The user.
    pub user_id: UserId,
    /// The user's total, minor units.
    pub total_minor: i64,
    /// The user's live expenses.
    pub expense_count: i64,
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
    ) -> Result<Answer<Option<Vec<(i32, CountSum)>>>, Status>;

    /// The `limit` users with the largest totals, largest first, ties by user id.
    async fn top_spenders(
        &self,
        wait: Wait,
        limit: usize,
    ) -> Result<Answer<Vec<SpenderData>>, Status>;

    /// The backend's current incarnation and newest epoch (`None`: none yet), to check
    /// epochs a client sends against.
    fn timeline(&self) -> (std::sync::Arc<str>, Option<Epoch>);

    /// A subscription stream (snapshot, changes, progress marks).
    async fn subscribe(&self, spec: SubscribeSpec) -> Result<SubscribeStream, Status>;
}
