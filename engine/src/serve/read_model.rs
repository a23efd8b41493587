//! The read model: the served state, one immutable snapshot per closed epoch.
//!
//! The publisher thread applies each closed epoch's changes ([`EpochDelta`]) with a
//! [`ReadModelWriter`] and swaps in a new [`Snapshot`]. Readers (gRPC threads, the web page,
//! embedding programs) load the current snapshot with one atomic pointer read and never block
//! the writer or the dataflow workers; a snapshot they hold stays valid and consistent (all of one
//! epoch) for as long as they hold it.
//!
//! Snapshots share structure: the map of users is persistent (`imbl`), so publishing an epoch
//! copies only the paths to the users that changed, never the whole state; a changed user's own
//! maps are small sorted slices ([`CellMap`]), rebuilt once per epoch in one pass.
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
use spendflow_operators::reference::{
    AlertEvent, AlertState, Converted, Currency, RateChange, UserRef, UserRow,
};
use spendflow_operators::{AggKey, CellChange, Epoch, LastSeen, Name, UserId};
use tokio::sync::{broadcast, watch};

pub use crate::core::{Amount, AsOf, CellValue, format_day, format_month, new_incarnation};

/// Closed epochs of changes kept for resuming subscribers.
pub const HISTORY_EPOCHS: usize = 512;

/// Changed cells the history of changes keeps at most, over all its epochs (it always keeps the
/// newest epoch). Caught up, epochs are small and [`HISTORY_EPOCHS`] bounds it; during a
/// catch-up each epoch changes up to hundreds of thousands of cells, and 512 of them held
/// every change of a 2 M-record catch-up (about 70 MiB at its peak, growing with the input). A
/// subscriber that resumes after an epoch the history no longer holds gets a snapshot instead,
/// which is always correct.
pub const HISTORY_CELLS: usize = 256 * 1024;

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
    /// Users' reference rows (budget, currency) as they now are, later entries overriding
    /// earlier ones for a user.
    pub users: Vec<UserRef>,
    /// Alerts that changed state, in epoch order.
    pub alerts: Vec<(Epoch, AlertEvent)>,
    /// Users' totals in the reporting currency, later entries overriding earlier ones.
    pub converted: Vec<Converted>,
    /// Exchange rates, later entries overriding earlier ones.
    pub rates: Vec<RateChange>,
}

/// All aggregates of one user.
///
/// The per-user maps are compact sorted slices ([`CellMap`]), not persistent maps: a user has
/// tens to hundreds of cells, and a persistent map's node is sized for dozens of entries even
/// when it holds one, which made a user cost kilobytes. A user changed by an epoch gets new maps
/// (built in one pass over the old ones and the epoch's changes); snapshots still share every
/// untouched user, because the map of users stays persistent.
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
    pub categories: CellMap<Name>,
    /// `(count, sum)` per merchant.
    pub merchants: CellMap<Name>,
    /// `(count, sum)` per UTC day (days since 1970-01-01).
    pub days: CellMap<i32>,
    /// `(count, sum)` per UTC month (`year * 12 + month - 1`).
    pub months: CellMap<i32>,
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
        let get = |v: Option<Amount>| v.unwrap_or((0, 0));
        match key {
            AggKey::User(_) => (self.expense_count, self.total_minor),
            AggKey::Category(_, name) => get(self.categories.get(name)),
            AggKey::Merchant(_, name) => get(self.merchants.get(name)),
            AggKey::Day(_, day) => get(self.days.get(day)),
            AggKey::Month(_, month) => get(self.months.get(month)),
        }
    }

    /// This user after the net changes `changes` (sorted by key, one per key, all of this
    /// user) and a new last event time (`Some(new)`) if one is given. Calls `publish` with the
    /// new value of every changed cell, `(0, 0)` for a cell that is gone; the user cell last,
    /// if it changed or the last event time was given.
    fn changed(
        &self,
        changes: &[NetChange],
        last_seen: Option<Option<i64>>,
        mut publish: impl FnMut(CellValue),
    ) -> UserAggregates {
        // The changes are sorted by key, and keys sort by kind first.
        let kind = |key: &AggKey| match key {
            AggKey::User(_) => 0,
            AggKey::Category(..) => 1,
            AggKey::Merchant(..) => 2,
            AggKey::Day(..) => 3,
            AggKey::Month(..) => 4,
        };
        let split =
            |k: u8, from: usize| from + changes[from..].partition_point(|c| kind(&c.key) <= k);
        let users_end = split(0, 0);
        let categories_end = split(1, users_end);
        let merchants_end = split(2, categories_end);
        let days_end = split(3, merchants_end);
        let mut cell = |key: AggKey, (count, sum): Amount| {
            publish(CellValue {
                key,
                count,
                sum,
                last_event_ms: None,
            })
        };
        let mut next = UserAggregates {
            user_id: self.user_id,
            total_minor: self.total_minor,
            expense_count: self.expense_count,
            last_event_ms: self.last_event_ms,
            categories: self.categories.merge(
                &changes[users_end..categories_end],
                |key| match key {
                    AggKey::Category(_, name) => *name,
                    _ => unreachable!("sorted by kind"),
                },
                &mut cell,
            ),
            merchants: self.merchants.merge(
                &changes[categories_end..merchants_end],
                |key| match key {
                    AggKey::Merchant(_, name) => *name,
                    _ => unreachable!("sorted by kind"),
                },
                &mut cell,
            ),
            days: self.days.merge(
                &changes[merchants_end..days_end],
                |key| match key {
                    AggKey::Day(_, day) => *day,
                    _ => unreachable!("sorted by kind"),
                },
                &mut cell,
            ),
            months: self.months.merge(
                &changes[days_end..],
                |key| match key {
                    AggKey::Month(_, month) => *month,
                    _ => unreachable!("sorted by kind"),
                },
                &mut cell,
            ),
        };
        for change in &changes[..users_end] {
            next.expense_count += change.count;
            next.total_minor += change.sum;
        }
        if let Some(last_event_ms) = last_seen {
            next.last_event_ms = last_event_ms;
        }
        if users_end > 0 || last_seen.is_some() {
            publish(CellValue {
                key: AggKey::User(self.user_id),
                count: next.expense_count,
                sum: next.total_minor,
                last_event_ms: next.last_event_ms,
            });
        }
        next
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

/// The net change of one cell over an epoch's delta.
#[derive(Clone, Copy, Debug)]
struct NetChange {
    key: AggKey,
    count: i64,
    sum: i128,
}

/// One entry of a [`CellMap`]: 32 bytes for an 8-byte key (a `(K, Amount)` tuple would take 48,
/// the `i128` forcing 16-byte alignment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry<K> {
    key: K,
    count: i64,
    sum_low: u64,
    sum_high: i64,
}

impl<K: Copy> Entry<K> {
    fn new(key: K, (count, sum): Amount) -> Self {
        Entry {
            key,
            count,
            // Two's complement halves, put back together exactly by `amount`.
            sum_low: sum as u64,
            sum_high: (sum >> 64) as i64,
        }
    }

    fn amount(&self) -> Amount {
        let sum = (i128::from(self.sum_high) << 64) | i128::from(self.sum_low);
        (self.count, sum)
    }

    fn pair(&self) -> (K, Amount) {
        (self.key, self.amount())
    }
}

/// A user's `(count, sum)` per key (category, merchant, day or month): an immutable sorted
/// slice, exactly as large as its entries. Never holds `(0, 0)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellMap<K> {
    entries: Box<[Entry<K>]>,
}

impl<K> Default for CellMap<K> {
    fn default() -> Self {
        CellMap {
            entries: Box::default(),
        }
    }
}

/// The iterator over a [`CellMap`]: keys and values, by key.
#[derive(Clone, Debug)]
pub struct CellMapIter<'a, K>(std::slice::Iter<'a, Entry<K>>);

impl<K: Copy> Iterator for CellMapIter<'_, K> {
    type Item = (K, Amount);

    fn next(&mut self) -> Option<(K, Amount)> {
        self.0.next().map(Entry::pair)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl<K: Copy> DoubleEndedIterator for CellMapIter<'_, K> {
    fn next_back(&mut self) -> Option<(K, Amount)> {
        self.0.next_back().map(Entry::pair)
    }
}

impl<K: Copy> ExactSizeIterator for CellMapIter<'_, K> {}

impl<K: Copy + Ord> CellMap<K> {
    /// Keys with a value.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No key has a value.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: &K) -> Option<Amount> {
        self.entries
            .binary_search_by(|e| e.key.cmp(key))
            .ok()
            .map(|i| self.entries[i].amount())
    }

    /// Keys and values, by key.
    pub fn iter(&self) -> CellMapIter<'_, K> {
        CellMapIter(self.entries.iter())
    }

    /// Keys in `range` and their values, by key.
    pub fn range(&self, range: impl std::ops::RangeBounds<K>) -> CellMapIter<'_, K> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let start = match range.start_bound() {
            Included(k) => self.entries.partition_point(|e| e.key < *k),
            Excluded(k) => self.entries.partition_point(|e| e.key <= *k),
            Unbounded => 0,
        };
        let end = match range.end_bound() {
            Included(k) => self.entries.partition_point(|e| e.key <= *k),
            Excluded(k) => self.entries.partition_point(|e| e.key < *k),
            Unbounded => self.entries.len(),
        };
        CellMapIter(self.entries[start..end.max(start)].iter())
    }

    /// This map after `changes` (sorted by key, one per key), built in one pass; calls
    /// `publish` with every changed key's new value (`(0, 0)`: gone). A zero change of an
    /// absent key leaves it absent (it is published as gone, and no `(0, 0)` entry is kept).
    fn merge(
        &self,
        changes: &[NetChange],
        key_of: impl Fn(&AggKey) -> K,
        publish: &mut impl FnMut(AggKey, Amount),
    ) -> CellMap<K> {
        if changes.is_empty() {
            return self.clone();
        }
        // The exact length first, so the slice is allocated once and never shrunk.
        let mut len = self.entries.len();
        for change in changes {
            match self.get(&key_of(&change.key)) {
                Some((count, sum)) => {
                    len -= usize::from((count + change.count, sum + change.sum) == (0, 0));
                }
                None => len += usize::from((change.count, change.sum) != (0, 0)),
            }
        }
        let mut merged = Vec::with_capacity(len);
        let mut old = self.entries.iter().peekable();
        for change in changes {
            let key = key_of(&change.key);
            while let Some(entry) = old.next_if(|e| e.key < key) {
                merged.push(*entry);
            }
            let (count, sum) = match old.next_if(|e| e.key == key) {
                Some(entry) => entry.amount(),
                None => (0, 0),
            };
            let value = (count + change.count, sum + change.sum);
            publish(change.key, value);
            if value != (0, 0) {
                merged.push(Entry::new(key, value));
            }
        }
        merged.extend(old);
        debug_assert_eq!(merged.len(), len);
        CellMap {
            entries: merged.into_boxed_slice(),
        }
    }
}

impl<'a, K: Copy + Ord> IntoIterator for &'a CellMap<K> {
    type Item = (K, Amount);
    type IntoIter = CellMapIter<'a, K>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
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
    /// The engine's reporting currency, if any.
    reporting_currency: Option<Currency>,
    /// Users' reference rows (also of users without a live expense).
    refs: OrdMap<UserId, UserRow>,
    /// The fired alerts, by `(user, month, threshold)`.
    alerts: OrdMap<(UserId, i32, u8), AlertView>,
    /// Users' totals in the reporting currency.
    converted: OrdMap<UserId, i128>,
    /// The same, largest first (ties by user id).
    by_converted: OrdSet<(Reverse<i128>, UserId)>,
    /// Exchange rates: reporting-currency micro-units per unit.
    rates: OrdMap<Currency, i64>,
}

/// A fired alert as the read model holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlertView {
    /// The user.
    pub user_id: UserId,
    /// The UTC month, `year * 12 + month - 1`.
    pub month: i32,
    /// 80 or 100.
    pub threshold_pct: u8,
    /// The month's spend now, minor units.
    pub spent_minor: i128,
    /// The budget now, minor units.
    pub budget_minor: i64,
    /// The user's currency.
    pub currency: Currency,
    /// The epoch at which it fired.
    pub since_epoch: Epoch,
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

    /// The currency totals are converted to (`--reporting-currency`), if any.
    pub fn reporting_currency(&self) -> Option<Currency> {
        self.reporting_currency
    }

    /// A user's reference row (budget, currency), if the reference data has one.
    pub fn user_ref(&self, user_id: UserId) -> Option<&UserRow> {
        self.refs.get(&user_id)
    }

    /// The exchange rate of `currency` (reporting-currency micro-units per unit), if known.
    pub fn fx_rate(&self, currency: Currency) -> Option<i64> {
        self.rates.get(&currency).copied()
    }

    /// A user's spend in one UTC month (`year * 12 + month - 1`), minor units; 0 without any.
    pub fn month_spend(&self, user_id: UserId, month: i32) -> i128 {
        self.user(user_id)
            .and_then(|u| u.months.get(&month))
            .map_or(0, |(_, sum)| sum)
    }

    /// The fired alerts of one user (all users with `None`), by user, month and threshold.
    pub fn alerts(&self, user_id: Option<UserId>) -> impl Iterator<Item = &AlertView> {
        use std::ops::Bound::{Included, Unbounded};
        let (lower, upper) = match user_id {
            Some(u) => (Included((u, i32::MIN, 0)), Included((u, i32::MAX, u8::MAX))),
            None => (Unbounded, Unbounded),
        };
        self.alerts.range((lower, upper)).map(|(_, a)| a)
    }

    /// The fired alerts of one user (all users with `None`) after the alert `after` (a
    /// `(user, month, threshold)` key; from the first with `None`), in the order of
    /// [`Snapshot::alerts`]: for paging.
    pub fn alerts_after(
        &self,
        user_id: Option<UserId>,
        after: Option<(UserId, i32, u8)>,
    ) -> impl Iterator<Item = &AlertView> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let first = user_id.map(|u| (u, i32::MIN, 0u8));
        let last = user_id.map(|u| (u, i32::MAX, u8::MAX));
        let lower = match (first, after) {
            (Some(first), Some(after)) if after < first => Included(first),
            (_, Some(after)) => Excluded(after),
            (Some(first), None) => Included(first),
            (None, None) => Unbounded,
        };
        let upper = last.map_or(Unbounded, Included);
        // A cursor at or past the end of the user's alerts: nothing (never a reversed range).
        let empty = matches!((after, last), (Some(after), Some(last)) if after >= last);
        (!empty)
            .then(|| self.alerts.range((lower, upper)).map(|(_, a)| a))
            .into_iter()
            .flatten()
    }

    /// Users with at least one fired alert.
    pub fn alerted_users(&self) -> usize {
        let mut users = 0;
        let mut last = None;
        for (user, _, _) in self.alerts.keys() {
            if last != Some(*user) {
                users += 1;
                last = Some(*user);
            }
        }
        users
    }

    /// A user's total in the reporting currency, if it can be converted.
    pub fn converted(&self, user_id: UserId) -> Option<i128> {
        self.converted.get(&user_id).copied()
    }

    /// Users by converted total, largest first (ties by user id); users that cannot be
    /// converted are left out. Empty without a reporting currency.
    pub fn top_converted(&self) -> impl Iterator<Item = (UserId, i128)> + '_ {
        self.by_converted.iter().map(|(Reverse(t), u)| (*u, *t))
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
            .map(move |(k, v)| value(AggKey::Category(id, k), v)),
    )
    .chain(
        u.merchants
            .iter()
            .map(move |(k, v)| value(AggKey::Merchant(id, k), v)),
    )
    .chain(
        u.days
            .iter()
            .map(move |(k, v)| value(AggKey::Day(id, k), v)),
    )
    .chain(
        u.months
            .iter()
            .map(move |(k, v)| value(AggKey::Month(id, k), v)),
    )
}

/// The shared, readable side of the read model.
#[derive(Debug)]
pub struct ReadModel {
    current: ArcSwap<Snapshot>,
    epoch: watch::Sender<Option<Epoch>>,
    changes: broadcast::Sender<Arc<Published>>,
    history: Mutex<History>,
    /// Alert changes per published epoch (empty ones too: they carry the progress), for
    /// `Alerts/Subscribe`; bounded like `history`.
    alert_changes: broadcast::Sender<Arc<PublishedAlerts>>,
    alert_history: Mutex<VecDeque<Arc<PublishedAlerts>>>,
    closed: watch::Sender<bool>,
    incarnation: Arc<str>,
    /// The newest snapshots, oldest first, at most `keep_recent` (0 unless a cluster asks:
    /// [`ReadModel::keep_recent_snapshots`]).
    recent: Mutex<VecDeque<Arc<Snapshot>>>,
    keep_recent: std::sync::atomic::AtomicUsize,
}

/// The changes of the newest published epochs, for resuming subscribers: at most
/// [`HISTORY_EPOCHS`] epochs and, beyond the newest one, [`HISTORY_CELLS`] changed cells.
#[derive(Debug, Default)]
struct History {
    epochs: VecDeque<Arc<Published>>,
    /// Changed cells over `epochs`.
    cells: usize,
}

impl History {
    /// Appends the newest epoch and forgets the oldest ones over the bounds.
    fn push(&mut self, published: Arc<Published>) {
        self.cells += published.cells.len();
        self.epochs.push_back(published);
        while self.epochs.len() > HISTORY_EPOCHS
            || (self.cells > HISTORY_CELLS && self.epochs.len() > 1)
        {
            let oldest = self.epochs.pop_front().expect("more than one epoch");
            self.cells -= oldest.cells.len();
        }
    }
}

/// The alerts that changed state when an epoch (or several, merged) was published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedAlerts {
    /// The epoch published.
    pub as_of: AsOf,
    /// The state changes, in epoch order, each with the epoch it happened in and the spend,
    /// budget and currency at the end of that epoch.
    pub alerts: Vec<(Epoch, AlertEvent)>,
}

/// What a new alert subscriber starts from.
#[derive(Debug)]
pub enum AlertSubscriptionStart {
    /// A snapshot (its fired alerts); changes after its epoch follow on the receiver.
    Snapshot(Arc<Snapshot>),
    /// The alert changes after the requested epoch, replayed from history; newer ones follow on
    /// the receiver (skip any the replay already covered).
    Replay(Vec<Arc<PublishedAlerts>>),
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
            history: Mutex::new(History::default()),
            alert_changes: broadcast::Sender::new(1024),
            alert_history: Mutex::new(VecDeque::with_capacity(HISTORY_EPOCHS)),
            closed: watch::Sender::new(false),
            incarnation,
            recent: Mutex::new(VecDeque::new()),
            keep_recent: std::sync::atomic::AtomicUsize::new(0),
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

    /// Keeps the `n` newest snapshots (not only the current one) from the next published epoch
    /// on, so that [`ReadModel::snapshot_from`] can answer as of a slightly older epoch. A
    /// cluster needs it: every process answers a gathered query (`TopSpenders`,
    /// `ListUserSummaries`) as of the same epoch although they publish it at slightly
    /// different times. Snapshots share structure, so one costs the users its epoch changed.
    pub fn keep_recent_snapshots(&self, n: usize) {
        self.keep_recent
            .store(n, std::sync::atomic::Ordering::Relaxed);
        let mut recent = self.recent.lock();
        while recent.len() > n {
            recent.pop_front();
        }
    }

    /// The oldest kept snapshot of epoch `epoch` or later; the current snapshot if none is
    /// kept (see [`ReadModel::keep_recent_snapshots`]) or all kept ones are older.
    pub fn snapshot_from(&self, epoch: Epoch) -> Arc<Snapshot> {
        let recent = self.recent.lock();
        match recent.iter().find(|s| s.as_of.epoch >= epoch) {
            Some(snapshot) => Arc::clone(snapshot),
            None => self.snapshot(),
        }
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
            let covered = history
                .epochs
                .front()
                .is_some_and(|p| p.as_of.epoch <= after + 1)
                || self.published_epoch().is_some_and(|e| e <= after);
            if covered {
                let replay = history
                    .epochs
                    .iter()
                    .filter(|p| p.as_of.epoch > after)
                    .cloned()
                    .collect();
                return (SubscriptionStart::Replay(replay), receiver);
            }
        }
        (SubscriptionStart::Snapshot(self.snapshot()), receiver)
    }

    /// Starts an alert subscription: where to begin, and a receiver of the alert changes of
    /// every epoch published after. `resume_after` asks to replay the changes after that epoch
    /// instead of a snapshot, which works while the alert history still holds them (as
    /// [`ReadModel::subscribe`]).
    pub fn subscribe_alerts(
        &self,
        resume_after: Option<Epoch>,
    ) -> (
        AlertSubscriptionStart,
        broadcast::Receiver<Arc<PublishedAlerts>>,
    ) {
        // As in `subscribe`: the writer appends and broadcasts under this lock.
        let history = self.alert_history.lock();
        let receiver = self.alert_changes.subscribe();
        if let Some(after) = resume_after {
            let covered = history.front().is_some_and(|p| p.as_of.epoch <= after + 1)
                || self.published_epoch().is_some_and(|e| e <= after);
            if covered {
                let replay = history
                    .iter()
                    .filter(|p| p.as_of.epoch > after)
                    .cloned()
                    .collect();
                return (AlertSubscriptionStart::Replay(replay), receiver);
            }
        }
        (AlertSubscriptionStart::Snapshot(self.snapshot()), receiver)
    }
}

/// The single writer of a [`ReadModel`]; owned by the publisher thread.
#[derive(Debug)]
pub struct ReadModelWriter {
    state: Snapshot,
    model: Arc<ReadModel>,
}

impl ReadModelWriter {
    /// Sets the engine's reporting currency (`--reporting-currency`; `None`: no conversion),
    /// which [`Snapshot::reporting_currency`] reports from now on, the current snapshot
    /// included. Call it before the first epoch is applied; it does not change while the
    /// engine runs.
    pub fn set_reporting_currency(&mut self, currency: Option<Currency>) {
        self.state.reporting_currency = currency;
        self.model.current.store(Arc::new(self.state.clone()));
    }

    /// Applies a delta, publishes the new snapshot, and returns what changed.
    ///
    /// Each touched user is rebuilt once from its old aggregates and the net changes of its
    /// cells (a key may repeat when the delta spans several epochs: the changes add up, so the
    /// published value is the cell's value after all of them).
    pub fn apply(&mut self, mut delta: EpochDelta) -> Arc<Published> {
        delta.as_of.incarnation = Arc::clone(&self.model.incarnation);
        let state = &mut self.state;
        let mut changes: Vec<NetChange> = delta
            .cells
            .iter()
            .map(|c| {
                if matches!(c.key, AggKey::User(_)) {
                    state.live_expenses += c.count;
                }
                NetChange {
                    key: c.key,
                    count: c.count,
                    sum: i128::from(c.sum),
                }
            })
            .collect();
        // By user, then by key (kind first), so each user's changes are one run.
        changes.sort_unstable_by_key(|c| (c.key.user_id(), c.key));
        changes.dedup_by(|later, kept| {
            let same = later.key == kept.key;
            if same {
                kept.count += later.count;
                kept.sum += later.sum;
            }
            same
        });
        // Later entries override earlier ones.
        let mut last_seen: FxHashMap<UserId, Option<i64>> = delta
            .last_seen
            .iter()
            .map(|seen| (seen.user_id, seen.event_ms))
            .collect();

        let mut cells: Vec<CellValue> = Vec::with_capacity(changes.len() + last_seen.len());
        let mut rest = &changes[..];
        while let Some(first) = rest.first() {
            let user = first.key.user_id();
            // A user's run is a few entries: scan it. (A binary search over the rest of the
            // epoch was one cache miss per probe, ~19 probes a touched user, and 90 % of this
            // function's time at a million users.)
            let end = rest
                .iter()
                .position(|c| c.key.user_id() != user)
                .unwrap_or(rest.len());
            let seen = last_seen.remove(&user);
            state.update_user(user, &rest[..end], seen, &mut cells);
            rest = &rest[end..];
        }
        for (user, seen) in last_seen {
            state.update_user(user, &[], Some(seen), &mut cells);
        }
        // One value per key: a user's cells are published once, the user cell included.
        cells.sort_unstable_by_key(|cell| cell.key);

        state.apply_reference(&delta, &changes);

        state.as_of = delta.as_of.clone();
        state.records_covered = delta.records_covered;

        let alerts = Arc::new(PublishedAlerts {
            as_of: delta.as_of.clone(),
            alerts: delta.alerts,
        });
        let published = Arc::new(Published {
            as_of: delta.as_of,
            cells,
        });
        let snapshot = Arc::new(state.clone());
        self.model.current.store(Arc::clone(&snapshot));
        let keep = self
            .model
            .keep_recent
            .load(std::sync::atomic::Ordering::Relaxed);
        if keep > 0 {
            let mut recent = self.model.recent.lock();
            recent.push_back(snapshot);
            while recent.len() > keep {
                recent.pop_front();
            }
        }
        {
            let mut history = self.model.history.lock();
            history.push(Arc::clone(&published));
            // No receivers is fine: nobody is subscribed.
            let _ = self.model.changes.send(Arc::clone(&published));
        }
        {
            let mut history = self.model.alert_history.lock();
            if history.len() == HISTORY_EPOCHS {
                history.pop_front();
            }
            history.push_back(Arc::clone(&alerts));
            let _ = self.model.alert_changes.send(alerts);
        }
        self.model.epoch.send_replace(Some(published.as_of.epoch));
        published
    }
}

impl Snapshot {
    /// Applies a delta's reference rows, rates, converted totals and alert changes (after its
    /// cells, `changes`, so the alerts' spend is the month cells' new value).
    fn apply_reference(&mut self, delta: &EpochDelta, changes: &[NetChange]) {
        // Users whose alert views may need new spend, budget or currency.
        let mut touched: Vec<UserId> = Vec::new();
        for user in &delta.users {
            match user.row {
                Some(row) => self.refs.insert(user.user_id, row),
                None => self.refs.remove(&user.user_id),
            };
            touched.push(user.user_id);
        }
        for rate in &delta.rates {
            match rate.rate_micros {
                Some(rate_micros) => self.rates.insert(rate.currency, rate_micros),
                None => self.rates.remove(&rate.currency),
            };
        }
        for converted in &delta.converted {
            let user = converted.user_id;
            let old = self.converted.get(&user).copied();
            if old == converted.total_minor {
                continue;
            }
            if let Some(total) = old {
                self.by_converted.remove(&(Reverse(total), user));
                self.converted.remove(&user);
            }
            if let Some(total) = converted.total_minor {
                self.by_converted.insert((Reverse(total), user));
                self.converted.insert(user, total);
            }
        }
        for (epoch, event) in &delta.alerts {
            let key = (event.user_id, event.month, event.threshold_pct);
            match event.state {
                AlertState::Fired => {
                    self.alerts.insert(
                        key,
                        AlertView {
                            user_id: event.user_id,
                            month: event.month,
                            threshold_pct: event.threshold_pct,
                            spent_minor: event.spent_minor,
                            budget_minor: event.budget_minor,
                            currency: event.currency,
                            since_epoch: *epoch,
                        },
                    );
                }
                AlertState::Cleared => {
                    self.alerts.remove(&key);
                }
            }
            touched.push(event.user_id);
        }
        if self.alerts.is_empty() {
            return;
        }
        touched.extend(
            changes
                .iter()
                .filter(|c| matches!(c.key, AggKey::Month(..)))
                .map(|c| c.key.user_id()),
        );
        touched.sort_unstable();
        touched.dedup();
        // The fired alerts show the spend and budget as they are now, whichever changed.
        for user in touched {
            let row = self.refs.get(&user).copied();
            let keys: Vec<(UserId, i32, u8)> = self
                .alerts(Some(user))
                .map(|a| (a.user_id, a.month, a.threshold_pct))
                .collect();
            for key in keys {
                let spent_minor = self.month_spend(user, key.1);
                if let Some(view) = self.alerts.get_mut(&key) {
                    view.spent_minor = spent_minor;
                    view.budget_minor = row.and_then(|r| r.budget_minor).unwrap_or(0);
                    view.currency = row.map_or(*b"???", |r| r.currency);
                }
            }
        }
    }

    /// Applies one user's net changes and new last event time, keeps the order by total, and
    /// appends the changed cells' new values to `cells`.
    fn update_user(
        &mut self,
        user: UserId,
        changes: &[NetChange],
        last_seen: Option<Option<i64>>,
        cells: &mut Vec<CellValue>,
    ) {
        // One walk down the users map: `get_mut` copies the path of shared nodes once, and
        // the slot is replaced in place (a `get` and then an `insert` walked it twice).
        let mut publish = |cell| cells.push(cell);
        let (old_total, new_total) = match self.users.get_mut(&user) {
            Some(slot) => {
                let next = slot.changed(changes, last_seen, &mut publish);
                let new_total = (!next.is_empty()).then_some(next.total_minor);
                let old_total = slot.total_minor;
                if new_total.is_some() {
                    *slot = Arc::new(next);
                } else {
                    self.users.remove(&user);
                }
                (Some(old_total), new_total)
            }
            None => {
                let next = UserAggregates::new(user).changed(changes, last_seen, &mut publish);
                let new_total = (!next.is_empty()).then_some(next.total_minor);
                if new_total.is_some() {
                    self.users.insert(user, Arc::new(next));
                }
                (None, new_total)
            }
        };
        // The order by total changes only when the total does (or the user comes or goes).
        if old_total != new_total {
            if let Some(total) = old_total {
                self.by_total.remove(&(Reverse(total), user));
            }
            if let Some(total) = new_total {
                self.by_total.insert((Reverse(total), user));
            }
        }
    }
}

#[cfg(test)]
mod tests;
