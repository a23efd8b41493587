//! The engine's own backend: answers from read-model snapshots.
//!
//! Every answer comes from one immutable snapshot, so it is exactly its `as_of`: all of one
//! closed epoch. Reads never wait on the dataflow, except where a request asks for
//! read-your-writes, which waits, bounded, for the publisher.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use spendflow_operators::{Epoch, UserId};
use spendflow_proto::v1 as pb;
use tokio::sync::broadcast;
use tonic::Status;

use super::backend::{
    Answer, Buckets, CategoryData, CategorySums, OverviewData, QueryBackend, SpenderData,
    SubscribeSpec, SubscribeStream, SummaryData, SummaryPage, Wait,
};
use super::convert;
use super::query::SubscriberGuard;
use crate::serve::read_model::{
    Amount, CellCursor, CellMap, Published, ReadModel, Snapshot, SubscriptionStart, UserAggregates,
};

/// Cells per snapshot message of a subscription.
const SNAPSHOT_CHUNK: usize = 1000;

/// Longest time a subscription may take to read its snapshot. While it reads, the snapshot of
/// its starting epoch stays in memory, and as the state moves on that copy shares less and less
/// with it (up to a whole copy of the state per subscriber that stops reading). Past this the
/// snapshot is let go and the stream ends with `RESOURCE_EXHAUSTED`; the client subscribes
/// again. Checked by one task per backend (a stream nobody reads is never polled itself).
pub const SNAPSHOT_READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// The snapshot a subscription is reading, which the backend's reaper may take away.
pub(super) struct SnapshotSlot {
    pub(super) snapshot: parking_lot::Mutex<Option<Arc<Snapshot>>>,
    pub(super) epoch: Epoch,
    since: tokio::time::Instant,
}

/// Every snapshot subscriptions are reading, and the task that lets go of those held too long.
#[derive(Debug, Default)]
pub(super) struct SnapshotHolds {
    slots: parking_lot::Mutex<Vec<std::sync::Weak<SnapshotSlot>>>,
    reaper: std::sync::OnceLock<()>,
}

impl SnapshotHolds {
    /// Registers a subscription's snapshot; starts the reaper on the first one.
    pub(super) fn hold(self: &Arc<Self>, snapshot: Arc<Snapshot>) -> Arc<SnapshotSlot> {
        let slot = Arc::new(SnapshotSlot {
            epoch: snapshot.as_of().epoch,
            snapshot: parking_lot::Mutex::new(Some(snapshot)),
            since: tokio::time::Instant::now(),
        });
        self.slots.lock().push(Arc::downgrade(&slot));
        self.reaper.get_or_init(|| {
            let holds = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(holds) = holds.upgrade() else {
                        return;
                    };
                    holds.reap(SNAPSHOT_READ_DEADLINE);
                }
            });
        });
        slot
    }

    /// Lets go of the snapshots held longer than `deadline`; forgets finished ones.
    fn reap(&self, deadline: std::time::Duration) {
        self.slots.lock().retain(|slot| {
            let Some(slot) = slot.upgrade() else {
                return false;
            };
            if slot.since.elapsed() < deadline {
                return true;
            }
            if slot.snapshot.lock().take().is_some() {
                tracing::debug!(
                    epoch = slot.epoch,
                    "A subscriber did not read its snapshot in time; letting it go."
                );
            }
            false
        });
    }
}

impl std::fmt::Debug for SnapshotSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSlot")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// The server's clock, ms since the Unix epoch (month-to-date sums use its month).
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock(Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        }))
    }

    /// A clock that reads `now` (tests).
    pub fn new(now: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    /// Now, ms since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        (self.0)()
    }

    /// The current UTC month, `year * 12 + month - 1`.
    pub fn month(&self) -> i32 {
        use spendflow_operators::model::{day_of, month_of_day};
        month_of_day(day_of(self.now_ms()))
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Clock").field(&self.now_ms()).finish()
    }
}

/// Answers from the engine's read model.
#[derive(Debug, Clone)]
pub struct ReadModelBackend {
    read_model: Arc<ReadModel>,
    /// For month-to-date sums.
    clock: Clock,
    /// Snapshot cells made for subscribers so far (see [`ReadModelBackend::snapshot_cells`]).
    snapshot_cells: Arc<AtomicU64>,
    /// The snapshots subscribers are reading ([`SNAPSHOT_READ_DEADLINE`]).
    holds: Arc<SnapshotHolds>,
}

impl ReadModelBackend {
    /// A backend over `read_model`.
    pub fn new(read_model: Arc<ReadModel>) -> Self {
        ReadModelBackend {
            read_model,
            clock: Clock::system(),
            snapshot_cells: Arc::default(),
            holds: Arc::default(),
        }
    }

    /// The same backend reading the time from `clock` (tests pin the month this way).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// How many snapshot cells subscriptions have made so far: pages are made only as
    /// subscribers read them, so this grows by at most one page per subscriber that reads
    /// nothing.
    pub fn snapshot_cells(&self) -> u64 {
        self.snapshot_cells.load(Ordering::Relaxed)
    }

    /// The snapshot to answer from, after waiting for `wait.min_epoch` if asked.
    async fn snapshot(&self, wait: Wait) -> Result<Arc<Snapshot>, Status> {
        if wait.min_epoch == 0 && !wait.pinned {
            return Ok(self.read_model.snapshot());
        }
        let newest = if wait.min_epoch == 0 {
            self.read_model.snapshot()
        } else {
            self.read_model
                .snapshot_at_least(wait.min_epoch, wait.timeout)
                .await
                .ok_or_else(|| {
                    convert::epoch_not_reached(wait, self.read_model.published_epoch(), "published")
                })?
        };
        if wait.pinned {
            // The oldest kept state at or after the epoch (a cluster asks every process for
            // the same one).
            return Ok(self.read_model.snapshot_from(wait.min_epoch));
        }
        Ok(newest)
    }
}

fn answer<T>(snapshot: &Snapshot, value: T) -> Answer<T> {
    Answer {
        as_of: snapshot.as_of().clone(),
        value,
    }
}

/// A read-model user as backend-neutral summary data (sums exact, 128-bit).
pub fn summary_data(user: &UserAggregates) -> SummaryData {
    let names = |map: &CellMap<spendflow_operators::Name>| {
        map.iter()
            .map(|(k, v)| (k.text().to_string(), v))
            .collect::<Vec<_>>()
    };
    SummaryData {
        user_id: user.user_id,
        total_minor: user.total_minor,
        expense_count: user.expense_count,
        last_event_ms: user.last_event_ms,
        by_category: names(&user.categories),
        by_merchant: names(&user.merchants),
        ..SummaryData::default()
    }
}

/// [`summary_data`] with the user's reference row (budget, currency) and the spend of
/// `month` (the current one), from `snapshot`.
pub fn summary_with_reference(
    snapshot: &Snapshot,
    user: &UserAggregates,
    month: i32,
) -> SummaryData {
    let row = snapshot.user_ref(user.user_id);
    SummaryData {
        monthly_budget_minor: row.and_then(|r| r.budget_minor),
        currency: row.map(|r| r.currency),
        month_to_date_minor: user.months.get(&month).map_or(0, |(_, sum)| sum),
        ..summary_data(user)
    }
}

fn spender(snapshot: &Snapshot, user: &UserAggregates) -> SpenderData {
    SpenderData {
        user_id: user.user_id,
        total_minor: user.total_minor,
        expense_count: user.expense_count,
        currency: snapshot.user_ref(user.user_id).map(|r| r.currency),
        converted_minor: snapshot.converted(user.user_id),
    }
}

/// Totals by category over every user of `snapshot`. Costs time proportional to users ×
/// categories.
pub fn category_totals(snapshot: &Snapshot) -> Vec<CategoryData> {
    let mut sums = CategorySums::default();
    for user in snapshot.users_after(None) {
        for (name, amount) in &user.categories {
            sums.add(&name.text(), amount);
        }
    }
    sums.finish()
}

#[tonic::async_trait]
impl QueryBackend for ReadModelBackend {
    async fn user_summary(
        &self,
        wait: Wait,
        user: UserId,
    ) -> Result<Answer<Option<SummaryData>>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let month = self.clock.month();
        let summary = snapshot
            .user(user)
            .map(|u| summary_with_reference(&snapshot, u, month));
        Ok(answer(&snapshot, summary))
    }

    async fn user_summaries(
        &self,
        wait: Wait,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Answer<SummaryPage>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let month = self.clock.month();
        let mut users = snapshot.users_after(after);
        let summaries: Vec<SummaryData> = users
            .by_ref()
            .take(limit)
            .map(|u| summary_with_reference(&snapshot, u, month))
            .collect();
        let resume_after = match (users.next(), summaries.last()) {
            (Some(_), Some(last)) => Some(last.user_id),
            _ => None,
        };
        Ok(answer(
            &snapshot,
            SummaryPage {
                summaries,
                resume_after,
            },
        ))
    }

    async fn user_windows(
        &self,
        wait: Wait,
        user: UserId,
        buckets: Buckets,
        from: i32,
        to: i32,
    ) -> Result<Answer<Option<Vec<(i32, Amount)>>>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let windows = snapshot.user(user).map(|aggregates| {
            let map = match buckets {
                Buckets::Day => &aggregates.days,
                Buckets::Month => &aggregates.months,
            };
            map.range(from..=to).collect()
        });
        Ok(answer(&snapshot, windows))
    }

    async fn top_spenders(
        &self,
        wait: Wait,
        limit: usize,
    ) -> Result<Answer<Vec<SpenderData>>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let spenders = if snapshot.reporting_currency().is_some() {
            // By the converted totals; a user with one has live expenses (no such total
            // otherwise), so the filter only guards against an inconsistent delta.
            snapshot
                .top_converted()
                .filter_map(|(user, _)| snapshot.user(user))
                .take(limit)
                .map(|u| spender(&snapshot, u))
                .collect()
        } else {
            snapshot
                .top_spenders()
                .take(limit)
                .map(|u| spender(&snapshot, u))
                .collect()
        };
        Ok(answer(&snapshot, spenders))
    }

    async fn overview(&self, wait: Wait, limit: usize) -> Result<Answer<OverviewData>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let overview = OverviewData {
            users: snapshot.user_count() as u64,
            live_expenses: snapshot.live_expenses(),
            top: snapshot
                .top_spenders()
                .take(limit)
                .map(|u| spender(&snapshot, u))
                .collect(),
        };
        Ok(answer(&snapshot, overview))
    }

    async fn category_totals(&self, wait: Wait) -> Result<Answer<Vec<CategoryData>>, Status> {
        let snapshot = self.snapshot(wait).await?;
        // A pass over every user: off the async workers.
        let owned = Arc::clone(&snapshot);
        let totals = tokio::task::spawn_blocking(move || category_totals(&owned))
            .await
            .map_err(|e| Status::internal(format!("summing the categories failed: {e}")))?;
        Ok(answer(&snapshot, totals))
    }

    fn reporting_currency(&self) -> Option<spendflow_operators::reference::Currency> {
        self.read_model.snapshot().reporting_currency()
    }

    fn timeline(&self) -> (Arc<str>, Option<Epoch>) {
        (
            Arc::clone(self.read_model.incarnation()),
            self.read_model.published_epoch(),
        )
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<SubscribeStream, Status> {
        let SubscribeSpec {
            users,
            resume_after,
            incarnation,
            guard,
        } = spec;
        let ours = self.read_model.incarnation();
        let resume_after = if !incarnation.is_empty() && incarnation != **ours {
            // Another timeline's epoch: nothing to resume from; a fresh snapshot replaces
            // everything the client holds.
            tracing::debug!(theirs = %incarnation, ours = %ours, "Resume from another incarnation; sending a snapshot.");
            None
        } else {
            resume_after
        };
        if let Some(after) = resume_after {
            // Epochs only grow: an epoch beyond the newest now cannot be the client's, and
            // waiting for it would send nothing for as long as it takes.
            let newest = self.read_model.published_epoch();
            if newest.is_none_or(|newest| after > newest) {
                let newest = newest.map_or_else(|| "none yet".to_string(), |e| e.to_string());
                return Err(Status::out_of_range(format!(
                    "resume_after_epoch {after} is beyond the newest published epoch ({newest}) \
                     of incarnation {ours:?}; resume after an epoch this server sent you, or send \
                     0 for a fresh snapshot"
                )));
            }
        }
        let (start, changes) = self.read_model.subscribe(resume_after);
        let phase = match start {
            SubscriptionStart::Snapshot(snapshot) => {
                Phase::Snapshot(SnapshotPages::new(self.holds.hold(snapshot)))
            }
            SubscriptionStart::Replay(replay) => Phase::Replay(replay.into()),
        };
        let feed = Feed {
            users,
            // Nothing at or before the epoch the client already has, even if the replay is
            // empty.
            sent_through: resume_after.unwrap_or(0),
            phase,
            changes,
            read_model: Arc::clone(&self.read_model),
            pending: VecDeque::new(),
            done: false,
            snapshot_cells: Arc::clone(&self.snapshot_cells),
            holds: Arc::clone(&self.holds),
            _guard: guard,
        };
        // The stream makes each message when the client's connection asks for the next one
        // (no task of its own, no queue): a subscriber that reads nothing costs one page of
        // its snapshot at most, and nothing stays behind once it goes away.
        Ok(Box::pin(futures::stream::unfold(
            feed,
            |mut feed| async move { feed.next().await.map(|message| (message, feed)) },
        )))
    }
}

/// A snapshot being sent a page at a time.
struct SnapshotPages {
    /// Emptied by the backend's reaper when the snapshot is not read in time.
    slot: Arc<SnapshotSlot>,
    /// Where the next page starts; `None` once the last page was made.
    next: Option<CellCursor>,
}

impl SnapshotPages {
    fn new(slot: Arc<SnapshotSlot>) -> Self {
        SnapshotPages {
            slot,
            next: Some(CellCursor::default()),
        }
    }
}

/// Where a subscription stands.
enum Phase {
    /// Sending a snapshot.
    Snapshot(SnapshotPages),
    /// Replaying the history after the epoch the client resumes after.
    Replay(VecDeque<Arc<Published>>),
    /// Following the published epochs.
    Live,
}

/// One subscription: makes its messages on demand.
struct Feed {
    /// Only these users (sorted); empty means every user.
    users: Vec<UserId>,
    /// The newest epoch the client has everything of (0: none yet).
    sent_through: Epoch,
    phase: Phase,
    changes: broadcast::Receiver<Arc<Published>>,
    read_model: Arc<ReadModel>,
    /// Messages made and not yet taken (at most the two of one epoch: changes, progress).
    pending: VecDeque<Result<pb::SubscribeResponse, Status>>,
    /// The stream ends once `pending` is empty.
    done: bool,
    /// Counts the snapshot cells made, over all subscriptions of the backend.
    snapshot_cells: Arc<AtomicU64>,
    /// Where a new snapshot (after lagging) is registered.
    holds: Arc<SnapshotHolds>,
    /// Holds one of the server's subscription slots while the stream lives.
    _guard: SubscriberGuard,
}

/// The next page of a snapshot (`last` set on the last one, which may be empty).
fn snapshot_page(
    users: &[UserId],
    counter: &AtomicU64,
    pages: &mut SnapshotPages,
) -> Result<pb::Snapshot, Status> {
    let Some(snapshot) = pages.slot.snapshot.lock().clone() else {
        return Err(Status::resource_exhausted(format!(
            "the snapshot of epoch {} was not read within {} s, and a snapshot held longer \
             costs the server memory; subscribe again and read the stream as it comes",
            pages.slot.epoch,
            SNAPSHOT_READ_DEADLINE.as_secs()
        )));
    };
    let from = pages.next.unwrap_or_default();
    let (cells, next) = snapshot.cell_page(users, from, SNAPSHOT_CHUNK);
    pages.next = next;
    counter.fetch_add(cells.len() as u64, Ordering::Relaxed);
    Ok(pb::Snapshot {
        cells: cells.iter().map(convert::cell).collect::<Result<_, _>>()?,
        last: next.is_none(),
        as_of: Some(convert::as_of(snapshot.as_of())),
    })
}

fn message(event: pb::subscribe_response::Event) -> Result<pb::SubscribeResponse, Status> {
    Ok(pb::SubscribeResponse { event: Some(event) })
}

impl Feed {
    /// The next message; `None` when the stream ends.
    async fn next(&mut self) -> Option<Result<pb::SubscribeResponse, Status>> {
        loop {
            if let Some(message) = self.pending.pop_front() {
                return Some(message);
            }
            if self.done {
                return None;
            }
            match &mut self.phase {
                Phase::Snapshot(pages) => {
                    let page = snapshot_page(&self.users, &self.snapshot_cells, pages);
                    let epoch = pages.slot.epoch;
                    match page {
                        Ok(page) => {
                            if page.last {
                                self.sent_through = epoch;
                                self.phase = Phase::Live;
                            }
                            return Some(message(pb::subscribe_response::Event::Snapshot(page)));
                        }
                        Err(status) => self.fail(status),
                    }
                }
                Phase::Replay(replay) => match replay.pop_front() {
                    Some(published) => {
                        self.published(&published);
                        self.sent_through = published.as_of.epoch;
                    }
                    None => self.phase = Phase::Live,
                },
                Phase::Live => {
                    tokio::select! {
                        received = self.changes.recv() => match received {
                            Ok(published) if published.as_of.epoch <= self.sent_through => {}
                            Ok(published) => {
                                self.published(&published);
                                self.sent_through = published.as_of.epoch;
                            }
                            Err(broadcast::error::RecvError::Lagged(missed)) => {
                                // Too slow to follow every epoch: start over from a fresh
                                // snapshot, which replaces everything the client holds.
                                tracing::debug!(missed, "Subscriber lagged; sending a new snapshot.");
                                self.changes = self.changes.resubscribe();
                                let slot = self.holds.hold(self.read_model.snapshot());
                                self.phase = Phase::Snapshot(SnapshotPages::new(slot));
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                        () = self.read_model.closed() => return None,
                    }
                }
            }
        }
    }

    /// Ends the stream with `status` (a value the wire cannot carry).
    fn fail(&mut self, status: Status) {
        self.pending.push_back(Err(status));
        self.done = true;
    }

    /// Queues an epoch's changes of the subscribed users (if any) and its progress mark.
    fn published(&mut self, published: &Published) {
        let as_of = convert::as_of(&published.as_of);
        let cells: Vec<pb::Cell> = match published
            .cells
            .iter()
            .filter(|c| self.users.is_empty() || self.users.binary_search(&c.key.user_id()).is_ok())
            .map(convert::cell)
            .collect()
        {
            Ok(cells) => cells,
            Err(status) => return self.fail(status),
        };
        if !cells.is_empty() {
            let changes = pb::Changes {
                cells,
                as_of: Some(as_of.clone()),
            };
            self.pending
                .push_back(message(pb::subscribe_response::Event::Changes(changes)));
        }
        self.pending
            .push_back(message(pb::subscribe_response::Event::Progress(
                pb::Progress { as_of: Some(as_of) },
            )));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spendflow_operators::{AggKey, CellChange};

    use super::*;
    use crate::serve::read_model::EpochDelta;

    #[test]
    fn a_total_outside_int64_is_out_of_range_naming_user_and_cell() {
        use spendflow_proto::v1::expense_query_server::ExpenseQuery;

        use super::super::QueryService;

        let (model, mut writer) = ReadModel::new();
        let cells = (0..2)
            .map(|_| CellChange {
                key: AggKey::User(7),
                count: 1,
                sum: i64::MAX,
            })
            .chain([CellChange {
                key: AggKey::User(8),
                count: 1,
                sum: 5,
            }])
            .collect();
        writer.apply(EpochDelta {
            cells,
            ..EpochDelta::default()
        });
        let backend = ReadModelBackend::new(Arc::clone(&model));
        let now = Wait::NOW;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // The backend reads the exact sum (the web report shows it) ...
        let exact = i128::from(i64::MAX) * 2;
        let answer = runtime.block_on(backend.user_summary(now, 7)).unwrap();
        assert_eq!(answer.value.unwrap().total_minor, exact);
        // ... gRPC's int64 cannot carry it: OUT_OF_RANGE, never a truncated value.
        let service = QueryService::over_read_model(model);
        let status = runtime
            .block_on(
                service.get_user_summary(tonic::Request::new(pb::GetUserSummaryRequest {
                    user_id: 7,
                    consistency: None,
                })),
            )
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        let exact = exact.to_string();
        for part in ["user 7", "user total", exact.as_str()] {
            assert!(status.message().contains(part), "{part}: {status:?}");
        }
        let status = runtime
            .block_on(
                service.top_spenders(tonic::Request::new(pb::TopSpendersRequest {
                    limit: 10,
                    consistency: None,
                })),
            )
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        // Other users are answered as usual.
        let answer = runtime
            .block_on(
                service.get_user_summary(tonic::Request::new(pb::GetUserSummaryRequest {
                    user_id: 8,
                    consistency: None,
                })),
            )
            .unwrap()
            .into_inner();
        assert_eq!(answer.summary.unwrap().total_minor, 5);
    }

    /// GetUserSummary's budget fields: the reference row's budget and currency, and the spend
    /// of the month the server's clock is in (injected, so the answer does not depend on when
    /// the test runs).
    #[test]
    fn user_summary_carries_budget_currency_and_month_to_date_by_the_servers_clock() {
        use spendflow_operators::model::days_from_civil;
        use spendflow_operators::reference::{UserRef, UserRow};
        use spendflow_proto::v1::expense_query_server::ExpenseQuery;

        use super::super::QueryService;

        let november = 2026 * 12 + 10;
        let (model, mut writer) = ReadModel::new();
        let cell = |key, sum| CellChange { key, count: 1, sum };
        writer.apply(EpochDelta {
            cells: vec![
                cell(AggKey::User(7), 1_000 + 250),
                cell(AggKey::Month(7, november - 1), 1_000),
                cell(AggKey::Month(7, november), 250),
                cell(AggKey::User(8), 5),
                cell(AggKey::Month(8, november), 5),
            ],
            users: vec![UserRef {
                user_id: 7,
                row: Some(UserRow {
                    budget_minor: Some(2_000),
                    currency: *b"GBP",
                }),
            }],
            ..EpochDelta::default()
        });
        let now = Arc::new(AtomicU64::new(0));
        let at = |y, m, d| days_from_civil(y, m, d) as u64 * 86_400_000 + 3_600_000;
        let clock = {
            let now = Arc::clone(&now);
            Clock::new(move || now.load(Ordering::Relaxed) as i64)
        };
        let service = QueryService::new(ReadModelBackend::new(model).with_clock(clock));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let summary = |user| {
            runtime
                .block_on(service.get_user_summary(tonic::Request::new(
                    pb::GetUserSummaryRequest {
                        user_id: user,
                        consistency: None,
                    },
                )))
                .unwrap()
                .into_inner()
                .summary
                .unwrap()
        };
        now.store(at(2026, 11, 30), Ordering::Relaxed);
        let s = summary(7);
        assert_eq!(
            (
                s.monthly_budget_minor,
                s.month_to_date_minor,
                s.currency.as_str()
            ),
            (2_000, 250, "GBP")
        );
        assert_eq!(s.total_minor, 1_250);
        now.store(at(2026, 10, 1), Ordering::Relaxed);
        assert_eq!(
            summary(7).month_to_date_minor,
            1_000,
            "October by the clock"
        );
        now.store(at(2026, 12, 1), Ordering::Relaxed);
        assert_eq!(summary(7).month_to_date_minor, 0, "nothing in December yet");
        // A user without a reference row: 0 and empty.
        now.store(at(2026, 11, 2), Ordering::Relaxed);
        let s = summary(8);
        assert_eq!(
            (
                s.monthly_budget_minor,
                s.month_to_date_minor,
                s.currency.as_str()
            ),
            (0, 5, "")
        );
    }

    /// A month-to-date sum outside int64 is OUT_OF_RANGE, like every other sum.
    #[test]
    fn a_month_to_date_outside_int64_is_out_of_range() {
        use spendflow_proto::v1::expense_query_server::ExpenseQuery;

        use super::super::QueryService;

        let month = 2026 * 12 + 10;
        let (model, mut writer) = ReadModel::new();
        let cells = (0..2)
            .flat_map(|_| {
                [
                    CellChange {
                        key: AggKey::User(7),
                        count: 1,
                        sum: i64::MAX,
                    },
                    CellChange {
                        key: AggKey::User(7),
                        count: 1,
                        sum: -i64::MAX,
                    },
                    CellChange {
                        key: AggKey::Month(7, month),
                        count: 1,
                        sum: i64::MAX,
                    },
                ]
            })
            .collect();
        writer.apply(EpochDelta {
            cells,
            ..EpochDelta::default()
        });
        let clock = Clock::new(move || {
            i64::from(spendflow_operators::model::days_from_civil(2026, 11, 15)) * 86_400_000
        });
        let service = QueryService::new(ReadModelBackend::new(model).with_clock(clock));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let status = runtime
            .block_on(
                service.get_user_summary(tonic::Request::new(pb::GetUserSummaryRequest {
                    user_id: 7,
                    consistency: None,
                })),
            )
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("month to date"), "{status:?}");
    }

    /// With a reporting currency TopSpenders ranks by the converted totals, leaves out users
    /// without one, and says the currency; without, it ranks by the users' own totals.
    #[test]
    fn top_spenders_rank_by_converted_totals_with_a_reporting_currency() {
        use spendflow_operators::reference::{Converted, UserRef, UserRow};
        use spendflow_proto::v1::expense_query_server::ExpenseQuery;

        use super::super::QueryService;

        let deltas = || {
            let cell = |user, sum| CellChange {
                key: AggKey::User(user),
                count: 1,
                sum,
            };
            let row = |user_id, currency: &[u8; 3]| UserRef {
                user_id,
                row: Some(UserRow {
                    budget_minor: None,
                    currency: *currency,
                }),
            };
            let converted = |user_id, total| Converted {
                user_id,
                total_minor: total,
            };
            EpochDelta {
                // In their own currencies 3 > 2 > 1 > 4; converted 1 > 2 = 3 (ties by user);
                // 4's currency has no rate.
                cells: vec![
                    cell(1, 1_000),
                    cell(2, 2_000),
                    cell(3, 90_000),
                    cell(4, 500),
                ],
                users: vec![
                    row(1, b"GBP"),
                    row(2, b"EUR"),
                    row(3, b"JPY"),
                    row(4, b"XXX"),
                ],
                converted: vec![
                    converted(1, Some(2_500)),
                    converted(2, Some(2_000)),
                    converted(3, Some(2_000)),
                ],
                ..EpochDelta::default()
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let top = |service: &QueryService| {
            runtime
                .block_on(
                    service.top_spenders(tonic::Request::new(pb::TopSpendersRequest {
                        limit: 10,
                        consistency: None,
                    })),
                )
                .unwrap()
                .into_inner()
        };

        let (model, mut writer) = ReadModel::new();
        writer.set_reporting_currency(Some(*b"EUR"));
        writer.apply(deltas());
        let answer = top(&QueryService::over_read_model(model));
        assert_eq!(answer.reporting_currency, "EUR");
        let ranked: Vec<(u32, u64, i64, i64, &str)> = answer
            .spenders
            .iter()
            .map(|s| {
                (
                    s.rank,
                    s.user_id,
                    s.converted_minor,
                    s.total_minor,
                    s.currency.as_str(),
                )
            })
            .collect();
        assert_eq!(
            ranked,
            vec![
                (1, 1, 2_500, 1_000, "GBP"),
                (2, 2, 2_000, 2_000, "EUR"),
                (3, 3, 2_000, 90_000, "JPY"),
            ]
        );

        // No reporting currency: by the users' own totals, every user, no converted amount.
        let (model, mut writer) = ReadModel::new();
        let mut d = deltas();
        d.converted.clear();
        writer.apply(d);
        let answer = top(&QueryService::over_read_model(model));
        assert_eq!(answer.reporting_currency, "");
        let ranked: Vec<(u64, i64, &str)> = answer
            .spenders
            .iter()
            .map(|s| (s.user_id, s.converted_minor, s.currency.as_str()))
            .collect();
        assert_eq!(
            ranked,
            vec![(3, 0, "JPY"), (2, 0, "EUR"), (1, 0, "GBP"), (4, 0, "XXX")]
        );
    }

    /// A subscriber that stops reading its snapshot holds the snapshot of its starting epoch,
    /// which stops sharing memory with the state as it moves on: after
    /// [`SNAPSHOT_READ_DEADLINE`] the backend lets go of it (though nobody polls the stream)
    /// and the stream ends with `RESOURCE_EXHAUSTED`.
    #[tokio::test(start_paused = true)]
    async fn a_snapshot_not_read_in_time_is_let_go_and_the_stream_ends() {
        use std::sync::atomic::AtomicUsize;

        use futures::StreamExt;

        let (model, mut writer) = ReadModel::new();
        let delta = |epoch: Epoch, sum: i64| EpochDelta {
            as_of: crate::serve::read_model::AsOf {
                epoch,
                ..Default::default()
            },
            cells: (1..=(3 * SNAPSHOT_CHUNK) as u64)
                .map(|user| CellChange {
                    key: AggKey::User(user),
                    count: 1,
                    sum,
                })
                .collect(),
            ..EpochDelta::default()
        };
        writer.apply(delta(1, 5));
        let backend = ReadModelBackend::new(Arc::clone(&model));
        let slots = Arc::new(AtomicUsize::new(0));
        let pinned = Arc::downgrade(&model.snapshot());
        let mut stream = backend
            .subscribe(SubscribeSpec {
                users: Vec::new(),
                resume_after: None,
                incarnation: String::new(),
                guard: SubscriberGuard::acquire(&slots).unwrap(),
            })
            .await
            .unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert!(matches!(
            first.event,
            Some(pb::subscribe_response::Event::Snapshot(ref page)) if !page.last
        ));
        // The state moves on; only the subscriber keeps the old snapshot.
        writer.apply(delta(2, 7));
        assert!(
            pinned.upgrade().is_some(),
            "held while the client may still read"
        );

        tokio::time::sleep(SNAPSHOT_READ_DEADLINE + Duration::from_secs(2)).await;
        assert!(
            pinned.upgrade().is_none(),
            "the snapshot is still in memory after the deadline"
        );
        let status = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream ends")
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("subscribe again"), "{status:?}");
        assert!(stream.next().await.is_none());
        drop(stream);
        assert_eq!(slots.load(Ordering::Relaxed), 0, "the slot is free again");
    }

    /// A subscriber that reads its snapshot in time is not disturbed by the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_snapshot_read_in_time_is_kept_whatever_the_clock_does_after() {
        use std::sync::atomic::AtomicUsize;

        use futures::StreamExt;

        let (model, mut writer) = ReadModel::new();
        let delta = |epoch: Epoch, sum: i64| EpochDelta {
            as_of: crate::serve::read_model::AsOf {
                epoch,
                ..Default::default()
            },
            cells: vec![CellChange {
                key: AggKey::User(1),
                count: 1,
                sum,
            }],
            ..EpochDelta::default()
        };
        writer.apply(delta(1, 5));
        let backend = ReadModelBackend::new(Arc::clone(&model));
        let slots = Arc::new(AtomicUsize::new(0));
        let mut stream = backend
            .subscribe(SubscribeSpec {
                users: Vec::new(),
                resume_after: None,
                incarnation: String::new(),
                guard: SubscriberGuard::acquire(&slots).unwrap(),
            })
            .await
            .unwrap();
        let page = stream.next().await.unwrap().unwrap();
        assert!(matches!(
            page.event,
            Some(pb::subscribe_response::Event::Snapshot(ref page)) if page.last
        ));
        tokio::time::sleep(SNAPSHOT_READ_DEADLINE * 2).await;
        writer.apply(delta(2, 6));
        // (Bounded: a paused clock would otherwise advance for ever if nothing came.)
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the changes of epoch 2")
            .unwrap()
            .unwrap();
        assert!(
            matches!(next.event, Some(pb::subscribe_response::Event::Changes(_))),
            "{next:?}"
        );
    }

    #[test]
    fn a_subscriber_that_reads_nothing_costs_one_page_of_the_snapshot() {
        use std::sync::atomic::AtomicUsize;

        use futures::StreamExt;

        const PAGES: usize = 20;
        let (model, mut writer) = ReadModel::new();
        let cells = (1..=(PAGES * SNAPSHOT_CHUNK) as u64)
            .map(|user| CellChange {
                key: AggKey::User(user),
                count: 1,
                sum: 5,
            })
            .collect();
        writer.apply(EpochDelta {
            cells,
            ..EpochDelta::default()
        });
        let backend = ReadModelBackend::new(Arc::clone(&model));
        let slots = Arc::new(AtomicUsize::new(0));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let let_others_run = || {
            runtime.block_on(async {
                for _ in 0..100 {
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut stream = runtime
            .block_on(backend.subscribe(SubscribeSpec {
                users: Vec::new(),
                resume_after: None,
                incarnation: String::new(),
                guard: SubscriberGuard::acquire(&slots).unwrap(),
            }))
            .unwrap();
        let_others_run();
        assert_eq!(
            backend.snapshot_cells(),
            0,
            "nothing is made before it is asked for"
        );

        let snapshot = |message: Option<Result<pb::SubscribeResponse, Status>>| match message
            .unwrap()
            .unwrap()
            .event
            .unwrap()
        {
            pb::subscribe_response::Event::Snapshot(page) => page,
            other => panic!("expected a snapshot page, got {other:?}"),
        };
        let first = snapshot(runtime.block_on(stream.next()));
        assert_eq!(first.cells.len(), SNAPSHOT_CHUNK);
        assert!(!first.last);
        let_others_run();
        // The client reads nothing more: one page made, not the whole snapshot.
        assert_eq!(backend.snapshot_cells(), SNAPSHOT_CHUNK as u64);

        // Reading on gets every user once, in order, the last page marked.
        let mut users: Vec<u64> = first.cells.iter().map(|c| c.user_id).collect();
        loop {
            let page = snapshot(runtime.block_on(stream.next()));
            assert!(page.cells.len() <= SNAPSHOT_CHUNK);
            users.extend(page.cells.iter().map(|c| c.user_id));
            if page.last {
                break;
            }
        }
        assert_eq!(
            users,
            (1..=(PAGES * SNAPSHOT_CHUNK) as u64).collect::<Vec<_>>()
        );
        assert_eq!(backend.snapshot_cells(), (PAGES * SNAPSHOT_CHUNK) as u64);

        // Then the changes of the next epoch and its progress mark.
        writer.apply(EpochDelta {
            as_of: crate::serve::read_model::AsOf {
                epoch: 2,
                ..Default::default()
            },
            cells: vec![CellChange {
                key: AggKey::User(7),
                count: 1,
                sum: 1,
            }],
            ..EpochDelta::default()
        });
        match runtime
            .block_on(stream.next())
            .unwrap()
            .unwrap()
            .event
            .unwrap()
        {
            pb::subscribe_response::Event::Changes(changes) => {
                assert_eq!(changes.cells.len(), 1);
                assert_eq!(changes.cells[0].total_minor, 6);
            }
            other => panic!("expected changes, got {other:?}"),
        }
        assert!(matches!(
            runtime
                .block_on(stream.next())
                .unwrap()
                .unwrap()
                .event
                .unwrap(),
            pb::subscribe_response::Event::Progress(_)
        ));
        // Going away frees the subscription's slot.
        assert_eq!(slots.load(Ordering::Relaxed), 1);
        drop(stream);
        assert_eq!(slots.load(Ordering::Relaxed), 0);
    }
}
