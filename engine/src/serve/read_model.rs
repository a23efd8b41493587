//! The read model: the served state, one immutable snapshot per closed epoch.
//!
//! The publisher thread applies each closed epoch's changes ([`EpochDelta`]) with a
//! [`ReadModelWriter`] and swaps in a new [`Snapshot`]. Readers (gRPC threads, the web page,
//! embedding programs) load the current snapshot with one atomic pointer read and never block
//! the writer or the dataflow workers; a snapshot they hold stays valid and consistent (all of one
//! epoch) for as long as they hold it.
//!
//! Snapshots share structure: the maps are persistent (`imbl`), so publishing an epoch copies
//! only the paths to the users and cells that changed, never the whole state.
//!
//! Changes are also published as the new absolute values of every changed cell
//! ([`Published`]), to subscribers and into a bounded history that lets a subscriber resume
//! after a disconnect without a new snapshot.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use arc_swap::ArcSwap;
use imbl::{OrdMap, OrdSet};
use rustc_hash::FxHashMap;
use spendflow_operators::{AggKey, CellChange, Epoch, LastSeen, Name, UserId};
use tokio::sync::{broadcast, watch};

pub use crate::core::{Amount, AsOf, CellValue, format_day, format_month, new_incarnation};

/// Closed epochs of changes kept for resuming subscribers.
pub const HISTORY_EPOCHS: usize = 512;

/// The changes of one or more closed epochs, merged over all workers, ready to apply.
#[derive(Clone, Debug, Default)]
pub struct EpochDelta {
    /// The state after applying the delta.
    pub as_of: AsOf,
    /// Changes of cells, in any order.
    pub cells: Vec<CellChange>,
    /// New last-event times, later entries overriding earlier ones for a user.
    pub last_seen: Vec<LastSeen>,
    /// Records read by the sources that the state now covers (accepted and rejected).
    pub records_covered: u64,
}

/// All aggregates of one user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserAggregates {
    /// The user.
    pub user_id: UserId,
    /// Sum of the live expenses, minor units (128 bits: see [`Amount`]).
    pub total_minor: i128,
    /// Number of live expenses.
    pub expense_count: i64,
    /// The newest event time among the live expenses, ms since the Unix epoch.
    pub last_event_ms: Option<i64>,
    /// `(count, sum)` per category.
    pub categories: OrdMap<Name, Amount>,
    /// `(count, sum)` per merchant.
    pub merchants: OrdMap<Name, Amount>,
    /// `(count, sum)` per UTC day (days since 1970-01-01).
    pub days: OrdMap<i32, Amount>,
    /// `(count, sum)` per UTC month (`year * 12 + month - 1`).
    pub months: OrdMap<i32, Amount>,
}

impl UserAggregates {
    fn new(user_id: UserId) -> Self {
        UserAggregates {
            user_id,
            ..UserAggregates::default()
        }
    }

    /// The current `(count, sum)` of one of this user's cells; `(0, 0)` if it does not exist.
    pub fn cell(&self, key: &AggKey) -> Amount {
        let get = |v: Option<&Amount>| v.copied().unwrap_or((0, 0));
        match key {
            AggKey::User(_) => (self.expense_count, self.total_minor),
            AggKey::Category(_, name) => get(self.categories.get(name)),
            AggKey::Merchant(_, name) => get(self.merchants.get(name)),
            AggKey::Day(_, day) => get(self.days.get(day)),
            AggKey::Month(_, month) => get(self.months.get(month)),
        }
    }

    /// Adds a change to one cell and returns the cell's new `(count, sum)`.
    fn apply(&mut self, key: &AggKey, count: i64, sum: i64) -> Amount {
        let sum = i128::from(sum);
        fn add<K: Ord + Clone>(
            map: &mut OrdMap<K, Amount>,
            key: &K,
            count: i64,
            sum: i128,
        ) -> Amount {
            let value = match map.get_mut(key) {
                Some(value) => {
                    *value = (value.0 + count, value.1 + sum);
                    *value
                }
                // A zero change ("touched" during a replay) of an absent cell leaves it absent:
                // it is published as removed, and no `(0, 0)` entry is kept.
                None if (count, sum) == (0, 0) => return (0, 0),
                None => {
                    map.insert(key.clone(), (count, sum));
                    return (count, sum);
                }
            };
            if value == (0, 0) {
                map.remove(key);
            }
            value
        }
        match key {
            AggKey::User(_) => {
                self.expense_count += count;
                self.total_minor += sum;
                (self.expense_count, self.total_minor)
            }
            AggKey::Category(_, name) => add(&mut self.categories, name, count, sum),
            AggKey::Merchant(_, name) => add(&mut self.merchants, name, count, sum),
            AggKey::Day(_, day) => add(&mut self.days, day, count, sum),
            AggKey::Month(_, month) => add(&mut self.months, month, count, sum),
        }
    }

    fn is_empty(&self) -> bool {
        self.expense_count == 0
            && self.total_minor == 0
            && self.categories.is_empty()
            && self.merchants.is_empty()
            && self.days.is_empty()
            && self.months.is_empty()
    }
}

/// The new values of everything that changed when an epoch was published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The epoch published.
    pub as_of: AsOf,
    /// The cells that changed, with their new values, ordered by key.
    pub cells: Vec<CellValue>,
}

/// The served state at one closed epoch. Cheap to clone; immutable once published.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    as_of: AsOf,
    users: OrdMap<UserId, Arc<UserAggregates>>,
    by_total: OrdSet<(Reverse<i128>, UserId)>,
    live_expenses: i64,
    records_covered: u64,
}

impl Snapshot {
    /// Where this snapshot stands in the input.
    pub fn as_of(&self) -> &AsOf {
        &self.as_of
    }

    /// One user's aggregates, if the user has any live expense.
    pub fn user(&self, user_id: UserId) -> Option<&Arc<UserAggregates>> {
        self.users.get(&user_id)
    }

    /// Users with a live expense, by id, starting after `after`.
    pub fn users_after(&self, after: Option<UserId>) -> impl Iterator<Item = &Arc<UserAggregates>> {
        use std::ops::Bound::{Excluded, Unbounded};
        let lower = after.map_or(Unbounded, Excluded);
        self.users.range((lower, Unbounded)).map(|(_, u)| u)
    }

    /// Users by total, largest first (ties by user id).
    pub fn top_spenders(&self) -> impl Iterator<Item = &Arc<UserAggregates>> {
        self.by_total
            .iter()
            .filter_map(|(_, user)| self.users.get(user))
    }

    /// Users with at least one live expense.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Live expenses over all users.
    pub fn live_expenses(&self) -> i64 {
        self.live_expenses
    }

    /// Records read from the sources that this snapshot covers.
    pub fn records_covered(&self) -> u64 {
        self.records_covered
    }

    /// Every cell of the selected users (all users if `users` is empty), for snapshots sent to
    /// subscribers. User cells carry the last event time.
    pub fn cells<'a>(&'a self, users: &'a [UserId]) -> impl Iterator<Item = CellValue> + 'a {
        self.selected_from(users, None).flat_map(|u| user_cells(u))
    }

    /// At most `max` cells of the selected users (all users if `users` is empty), in the order
    /// of [`Snapshot::cells`], starting at `from`, and where the next page starts (`None`: no
    /// cell follows). A subscription's snapshot is sent a page at a time this way, so a
    /// subscriber never holds more than one page however many users there are.
    ///
    /// # Panics
    ///
    /// If `max` is 0.
    pub fn cell_page(
        &self,
        users: &[UserId],
        from: CellCursor,
        max: usize,
    ) -> (Vec<CellValue>, Option<CellCursor>) {
        assert!(max > 0, "a page holds at least one cell");
        let mut page = Vec::with_capacity(max.min(1024));
        for user in self.selected_from(users, from.user) {
            let skip = if Some(user.user_id) == from.user {
                from.skip
            } else {
                0
            };
            for (i, cell) in user_cells(user).enumerate().skip(skip) {
                if page.len() == max {
                    let next = CellCursor {
                        user: Some(user.user_id),
                        skip: i,
                    };
                    return (page, Some(next));
                }
                page.push(cell);
            }
        }
        (page, None)
    }

    /// The selected users (all if `users` is empty, which is sorted otherwise), from `from` on
    /// (inclusive).
    fn selected_from<'a>(
        &'a self,
        users: &'a [UserId],
        from: Option<UserId>,
    ) -> Box<dyn Iterator<Item = &'a Arc<UserAggregates>> + Send + 'a> {
        match (users.is_empty(), from) {
            (true, None) => Box::new(self.users.values()),
            (true, Some(from)) => Box::new(self.users.range(from..).map(|(_, u)| u)),
            (false, from) => {
                let start = from.map_or(0, |from| users.partition_point(|u| *u < from));
                Box::new(users[start..].iter().filter_map(|u| self.users.get(u)))
            }
        }
    }
}

/// Where a paged walk over a snapshot's cells ([`Snapshot::cell_page`]) stands. The default
/// is the first cell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CellCursor {
    /// The user to continue with (`None`: the first selected user).
    user: Option<UserId>,
    /// How many of that user's cells earlier pages took.
    skip: usize,
}

/// Every cell of one user; the user cell (with the last event time) first.
fn user_cells(u: &UserAggregates) -> impl Iterator<Item = CellValue> + '_ {
    let id = u.user_id;
    let value = |key: AggKey, (count, sum): Amount| CellValue {
        key,
        count,
        sum,
        last_event_ms: None,
    };
    std::iter::once(CellValue {
        key: AggKey::User(id),
        count: u.expense_count,
        sum: u.total_minor,
        last_event_ms: u.last_event_ms,
    })
    .chain(
        u.categories
            .iter()
            .map(move |(k, v)| value(AggKey::Category(id, *k), *v)),
    )
    .chain(
        u.merchants
            .iter()
            .map(move |(k, v)| value(AggKey::Merchant(id, *k), *v)),
    )
    .chain(
        u.days
            .iter()
            .map(move |(k, v)| value(AggKey::Day(id, *k), *v)),
    )
    .chain(
        u.months
            .iter()
            .map(move |(k, v)| value(AggKey::Month(id, *k), *v)),
    )
}

/// The shared, readable side of the read model.
#[derive(Debug)]
pub struct ReadModel {
    current: ArcSwap<Snapshot>,
    epoch: watch::Sender<Option<Epoch>>,
    changes: broadcast::Sender<Arc<Published>>,
    history: Mutex<VecDeque<Arc<Published>>>,
    closed: watch::Sender<bool>,
    incarnation: Arc<str>,
}

/// What a new subscriber starts from.
#[derive(Debug)]
pub enum SubscriptionStart {
    /// A snapshot; changes after its epoch follow on the receiver.
    Snapshot(Arc<Snapshot>),
    /// The changes after the requested epoch, replayed from history; newer ones follow on the
    /// receiver (skip any the replay already covered).
    Replay(Vec<Arc<Published>>),
}

impl ReadModel {
    /// An empty read model of a new incarnation and the writer that will publish into it.
    pub fn new() -> (Arc<ReadModel>, ReadModelWriter) {
        ReadModel::with_incarnation(new_incarnation().into())
    }

    /// An empty read model whose epochs belong to `incarnation` (kept from a restored
    /// checkpoint), and the writer that will publish into it.
    pub fn with_incarnation(incarnation: Arc<str>) -> (Arc<ReadModel>, ReadModelWriter) {
        let empty = Snapshot {
            as_of: AsOf {
                incarnation: Arc::clone(&incarnation),
                ..AsOf::default()
            },
            ..Snapshot::default()
        };
        let model = Arc::new(ReadModel {
            current: ArcSwap::from_pointee(empty.clone()),
            epoch: watch::Sender::new(None),
            changes: broadcast::Sender::new(1024),
            history: Mutex::new(VecDeque::with_capacity(HISTORY_EPOCHS)),
            closed: watch::Sender::new(false),
            incarnation,
        });
        let writer = ReadModelWriter {
            state: empty,
            model: Arc::clone(&model),
        };
        (model, writer)
    }

    /// The incarnation every published epoch belongs to.
    pub fn incarnation(&self) -> &Arc<str> {
        &self.incarnation
    }

    /// The current snapshot. Never blocks.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Marks the model closed: no epoch will be published any more.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Completes once the model is closed (see [`ReadModel::close`]).
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// The last published epoch, if any epoch was published yet.
    pub fn published_epoch(&self) -> Option<Epoch> {
        *self.epoch.borrow()
    }

    /// Waits until an epoch `>= min_epoch` is published, then returns the snapshot.
    /// Returns `None` on timeout.
    pub async fn snapshot_at_least(
        &self,
        min_epoch: Epoch,
        timeout: Duration,
    ) -> Option<Arc<Snapshot>> {
        let mut rx = self.epoch.subscribe();
        let reached =
            tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some_and(|e| e >= min_epoch)));
        match reached.await {
            Ok(Ok(_)) => Some(self.snapshot()),
            _ => None,
        }
    }

    /// Blocking form of [`ReadModel::snapshot_at_least`], for threads outside an async runtime.
    pub fn wait_for_epoch(&self, min_epoch: Epoch, timeout: Duration) -> Option<Arc<Snapshot>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let snapshot = self.snapshot();
            if self.published_epoch().is_some_and(|e| e >= min_epoch) {
                return Some(snapshot);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Starts a subscription: where to begin, and a receiver of everything published after.
    /// `resume_after` asks to replay the changes after that epoch instead of a snapshot, which
    /// works while the history still holds them.
    pub fn subscribe(
        &self,
        resume_after: Option<Epoch>,
    ) -> (SubscriptionStart, broadcast::Receiver<Arc<Published>>) {
        // The writer appends to the history and broadcasts under this lock, so the receiver
        // taken here misses nothing after what the history or the snapshot covers.
        let history = self.history.lock();
        let receiver = self.changes.subscribe();
        if let Some(after) = resume_after {
            let covered = history.front().is_some_and(|p| p.as_of.epoch <= after + 1)
                || self.published_epoch().is_some_and(|e| e <= after);
            if covered {
                let replay = history
                    .iter()
                    .filter(|p| p.as_of.epoch > after)
                    .cloned()
                    .collect();
                return (SubscriptionStart::Replay(replay), receiver);
            }
        }
        (SubscriptionStart::Snapshot(self.snapshot()), receiver)
    }
}

/// The single writer of a [`ReadModel`]; owned by the publisher thread.
#[derive(Debug)]
pub struct ReadModelWriter {
    state: Snapshot,
    model: Arc<ReadModel>,
}

impl ReadModelWriter {
    /// Applies a delta, publishes the new snapshot, and returns what changed.
    pub fn apply(&mut self, mut delta: EpochDelta) -> Arc<Published> {
        delta.as_of.incarnation = Arc::clone(&self.model.incarnation);
        let state = &mut self.state;
        let mut touched: FxHashMap<UserId, UserAggregates> = FxHashMap::default();
        // New values of the changed cells, in the order applied (a key may repeat when the
        // delta spans several epochs; the last value wins below).
        let mut values: Vec<(AggKey, Amount)> = Vec::with_capacity(delta.cells.len());
        for change in &delta.cells {
            let user = change.key.user_id();
            let aggregates = touched
                .entry(user)
                .or_insert_with(|| current(&state.users, user));
            values.push((
                change.key,
                aggregates.apply(&change.key, change.count, change.sum),
            ));
            if matches!(change.key, AggKey::User(_)) {
                state.live_expenses += change.count;
            }
        }
        for seen in &delta.last_seen {
            let user = seen.user_id;
            let aggregates = touched
                .entry(user)
                .or_insert_with(|| current(&state.users, user));
            aggregates.last_event_ms = seen.event_ms;
            values.push((
                AggKey::User(user),
                (aggregates.expense_count, aggregates.total_minor),
            ));
        }
        values.reverse();
        values.sort_by_key(|(key, _)| *key); // stable: the last applied value comes first
        values.dedup_by_key(|(key, _)| *key);
        let cells = values
            .into_iter()
            .map(|(key, (count, sum))| {
                let last_event_ms = match key {
                    AggKey::User(user) => touched[&user].last_event_ms,
                    _ => None,
                };
                CellValue {
                    key,
                    count,
                    sum,
                    last_event_ms,
                }
            })
            .collect();

        for (user_id, aggregates) in touched {
            if let Some(old) = state.users.get(&user_id) {
                state.by_total.remove(&(Reverse(old.total_minor), user_id));
            }
            if aggregates.is_empty() {
                state.users.remove(&user_id);
            } else {
                state
                    .by_total
                    .insert((Reverse(aggregates.total_minor), user_id));
                state.users.insert(user_id, Arc::new(aggregates));
            }
        }
        state.as_of = delta.as_of.clone();
        state.records_covered = delta.records_covered;

        let published = Arc::new(Published {
            as_of: delta.as_of,
            cells,
        });
        self.model.current.store(Arc::new(state.clone()));
        {
            let mut history = self.model.history.lock();
            if history.len() == HISTORY_EPOCHS {
                history.pop_front();
            }
            history.push_back(Arc::clone(&published));
            // No receivers is fine: nobody is subscribed.
            let _ = self.model.changes.send(Arc::clone(&published));
        }
        self.model.epoch.send_replace(Some(published.as_of.epoch));
        published
    }
}

/// A copy of a user's aggregates to change (cheap: the maps share structure).
fn current(users: &OrdMap<UserId, Arc<UserAggregates>>, user: UserId) -> UserAggregates {
    users
        .get(&user)
        .map_or_else(|| UserAggregates::new(user), |u| (**u).clone())
}

#[cfg(test)]
mod tests;
