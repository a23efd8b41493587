//! The reference stage: reference rows in, budget alerts and converted totals out.
//!
//! Two operators, beside the expense path (see the diagram in [`crate::dataflow`]):
//!
//! * [`UpsertReference`] keeps the current row of every [`RefKey`], last write wins in
//!   arrival order within an epoch, like [`crate::upsert`] does for expenses (and for the same
//!   reason it is no `arrange_from_upsert`: that keeps the greatest value of an epoch, not the
//!   last). Each key is owned by one worker: a user's row by the worker that owns the user's
//!   aggregate cells (the same hash the cell arrangement exchanges by), a rate by a hash of its
//!   currency. The owner reports the row's changes ([`UserRef`], [`RateChange`]) and holds it
//!   in checkpoints, so a checkpoint has every row once.
//! * [`JoinReference`] runs on the worker that owns a user's cells, fed by the arrangement's
//!   changes of the user's total and month cells ([`capture_and_forward_spend`], in the same
//!   pass that captures the cell changes for the worker) and by the user's row. It keeps per
//!   user the total, the month sums, the row, the fired alerts and the last reported converted
//!   total, and when an epoch closes re-evaluates exactly what the epoch touched: the months
//!   whose sums changed (every month of a user whose row changed), and the converted total of
//!   users whose total, row or rate changed. It reports the *changes* of the fired set, so an
//!   alert that stays fired while the spend moves yields nothing.
//!
//! Rates are few (one row per currency), so every rate change is broadcast to every worker and
//! each worker keeps all rates; a rate change re-converts the worker's users of that currency,
//! found by a scan of the worker's users (rates change rarely; an index by currency would cost
//! every expense-only epoch something, the scan costs only epochs that change a rate).
//!
//! Without reference data the only cost on the expense path is the forwarding of total and
//! month cell changes (a fraction of the arrangement's output, which is already pre-aggregated
//! per epoch) and keeping their sums per user: the join needs them when a budget arrives later.
//!
//! Restore: rows pushed with [`crate::ExpenseDataflow::push_live_reference`] in the restore
//! epoch, with the live expenses, come out as changes of that epoch: the restored users and
//! rates, the alerts fired at the checkpoint as `Fired` events, and the converted totals.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use ahash::RandomState;
use differential_dataflow::Hashable;
use differential_dataflow::VecCollection;
use differential_dataflow::operators::arrange::Arranged;
use differential_dataflow::trace::cursor::{Cursor, Navigable};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use crate::Epoch;
use crate::aggregate::{CapturedChanges, CellTrace};
use crate::model::{AggKey, CountSum, UserId};
use crate::reference::{
    AlertEvent, AlertState, Converted, Currency, RateChange, RefChange, RefKey, RefValue,
    THRESHOLDS_PCT, UNKNOWN_CURRENCY, UserRef, UserRow, alert_fired, convert, rate_for,
};
use crate::small_map::SmallMap;

/// User-row changes per closed epoch, for the worker to drain.
pub type CapturedUsers = Rc<RefCell<Vec<(Epoch, UserRef)>>>;
/// Rate changes per closed epoch, for the worker to drain.
pub type CapturedRates = Rc<RefCell<Vec<(Epoch, RateChange)>>>;
/// Alert events per closed epoch, for the worker to drain.
pub type CapturedAlerts = Rc<RefCell<Vec<(Epoch, AlertEvent)>>>;
/// Converted-total changes per closed epoch, for the worker to drain.
pub type CapturedConverted = Rc<RefCell<Vec<(Epoch, Converted)>>>;

/// The reference rows one worker owns at one epoch.
pub type RefRows = Vec<(RefKey, RefValue)>;

/// Shared between [`UpsertReference`] and its driver: the epochs to copy the rows at, and the
/// copies taken (the reference half of [`crate::upsert::SnapshotState`]).
#[derive(Debug, Default)]
pub struct RefSnapshotState {
    /// Epochs to take a copy at (requested before the input passes them).
    pub requested: BTreeSet<Epoch>,
    /// Copies taken, oldest first.
    pub taken: Vec<(Epoch, RefRows)>,
}

/// A handle to the reference upsert's snapshot requests and results.
pub type RefSnapshots = Rc<RefCell<RefSnapshotState>>;

/// A changed row on its way to the join: the worker it is for, the epoch, and the row as it
/// now is.
pub type RoutedChange = (u64, Epoch, RefChange);

/// The exchange hash of a reference key: a user's row goes where the user's cells are (the cell
/// arrangement exchanges by `AggKey::hashed`, which hashes the user only), a rate anywhere.
fn route(key: &RefKey) -> u64 {
    match key {
        RefKey::User(user) => AggKey::User(*user).hashed(),
        RefKey::Fx(currency) => currency.hashed(),
    }
}

/// Turns reference changes into the current rows, one owner per key.
pub trait UpsertReference<'scope> {
    /// Applies changes per key, epoch by epoch, last write wins in arrival order within an
    /// epoch; reports each key whose row differs at the end of an epoch from its start to
    /// `users` / `rates`, and sends it on: a user row to this worker (its owner, which also
    /// owns the user's cells), a rate to every worker. Copies the rows at the epochs requested
    /// in `snapshots`.
    ///
    /// Input updates must have diff `1`; updates with diff `<= 0` are ignored. A value of the
    /// wrong kind for its key (a rate for a user) is a caller bug and removes the row.
    fn upsert_reference(
        self,
        snapshots: RefSnapshots,
        users: CapturedUsers,
        rates: CapturedRates,
    ) -> Stream<'scope, Epoch, Vec<RoutedChange>>;
}

impl<'scope> UpsertReference<'scope> for VecCollection<'scope, Epoch, RefChange, i64> {
    fn upsert_reference(
        self,
        snapshots: RefSnapshots,
        users: CapturedUsers,
        rates: CapturedRates,
    ) -> Stream<'scope, Epoch, Vec<RoutedChange>> {
        let scope = self.inner.scope();
        let (index, peers) = (scope.index() as u64, scope.peers() as u64);
        let exchange = Exchange::new(|update: &(RefChange, Epoch, i64)| route(&update.0.key));
        self.inner
            .unary_frontier::<CapacityContainerBuilder<Vec<RoutedChange>>, _, _, _>(
                exchange,
                "UpsertReference",
                |_capability, _info| {
                    let mut rows: HashMap<RefKey, RefValue, RandomState> = HashMap::default();
                    // Changes of epochs not yet applied, in arrival order.
                    let mut held: BTreeMap<Epoch, (Capability<Epoch>, Vec<RefChange>)> =
                        BTreeMap::new();
                    move |(input, frontier), output| {
                        input.for_each(|capability, data| {
                            for (change, time, diff) in data.drain(..) {
                                if diff <= 0 {
                                    continue;
                                }
                                held.entry(time)
                                    .or_insert_with(|| (capability.delayed(&time, 0), Vec::new()))
                                    .1
                                    .push(change);
                            }
                        });
                        // As in `UpsertByExpense`: epochs in order, copies between them.
                        loop {
                            let next_held = held
                                .first_key_value()
                                .map(|(t, _)| *t)
                                .filter(|t| !frontier.less_equal(t));
                            let next_copy = snapshots
                                .borrow()
                                .requested
                                .first()
                                .copied()
                                .filter(|t| !frontier.less_equal(t));
                            match (next_held, next_copy) {
                                (Some(epoch), copy) if copy.is_none_or(|c| epoch <= c) => {
                                    let (_, (capability, changes)) =
                                        held.pop_first().expect("checked");
                                    // Each touched key's row before the epoch, in key order.
                                    let mut before: BTreeMap<RefKey, Option<RefValue>> =
                                        BTreeMap::new();
                                    for RefChange { key, value } in changes {
                                        before
                                            .entry(key)
                                            .or_insert_with(|| rows.get(&key).copied());
                                        match value.filter(|v| fits(&key, v)) {
                                            Some(value) => rows.insert(key, value),
                                            None => rows.remove(&key),
                                        };
                                    }
                                    let mut session = output.session(&capability);
                                    let (mut users, mut rates) =
                                        (users.borrow_mut(), rates.borrow_mut());
                                    for (key, old) in before {
                                        let value = rows.get(&key).copied();
                                        if value == old {
                                            continue;
                                        }
                                        let change = RefChange { key, value };
                                        match key {
                                            RefKey::User(user_id) => {
                                                users.push((
                                                    epoch,
                                                    UserRef {
                                                        user_id,
                                                        row: value.and_then(RefValue::user_row),
                                                    },
                                                ));
                                                session.give((index, epoch, change));
                                            }
                                            RefKey::Fx(currency) => {
                                                rates.push((
                                                    epoch,
                                                    RateChange {
                                                        currency,
                                                        rate_micros: value
                                                            .and_then(RefValue::rate_micros),
                                                    },
                                                ));
                                                for worker in 0..peers {
                                                    session.give((worker, epoch, change));
                                                }
                                            }
                                        }
                                    }
                                }
                                (_, Some(epoch)) => {
                                    let copy = rows.iter().map(|(k, v)| (*k, *v)).collect();
                                    let mut state = snapshots.borrow_mut();
                                    state.requested.remove(&epoch);
                                    state.taken.push((epoch, copy));
                                }
                                (_, None) => break,
                            }
                        }
                    }
                },
            )
    }
}

/// True if `value` is the kind of row `key` names.
fn fits(key: &RefKey, value: &RefValue) -> bool {
    matches!(
        (key, value),
        (RefKey::User(_), RefValue::User { .. }) | (RefKey::Fx(_), RefValue::Fx { .. })
    )
}

/// Copies the updates of every batch the cell arrangement emits into `sink` (as
/// [`crate::aggregate::capture_changes`] does) and, in the same pass, sends the changes of
/// users' total and month cells on, for [`JoinReference`]. The output stays on this worker,
/// which owns those cells.
pub fn capture_and_forward_spend<'scope>(
    arranged: &Arranged<'scope, CellTrace>,
    sink: CapturedChanges,
) -> Stream<'scope, Epoch, Vec<(AggKey, Epoch, CountSum)>> {
    arranged
        .stream
        .clone()
        .unary::<CapacityContainerBuilder<Vec<(AggKey, Epoch, CountSum)>>, _, _, _>(
            Pipeline,
            "CaptureChanges",
            move |_capability, _info| {
                move |input, output| {
                    input.for_each(|capability, spans| {
                        let mut sink = sink.borrow_mut();
                        let mut session = output.session(&capability);
                        for span in spans.iter() {
                            let Some(batch) = &span.inner else { continue };
                            let mut cursor = batch.cursor();
                            while let Some(key) = cursor.get_key(batch) {
                                let forward = matches!(key, AggKey::User(_) | AggKey::Month(..));
                                while cursor.get_val(batch).is_some() {
                                    cursor.map_times(batch, |time, diff| {
                                        sink.push((*key, *time, *diff));
                                        if forward {
                                            session.give((*key, *time, *diff));
                                        }
                                    });
                                    cursor.step_val(batch);
                                }
                                cursor.step_key(batch);
                            }
                        }
                    });
                }
            },
        )
}

/// What the join keeps of one user, on the worker that owns the user: one entry per user with
/// live expenses, so it is kept small. What only users with a row (or a fired alert, or a
/// converted total) have is boxed apart: an entry of the users map is 64 bytes instead of 160,
/// which at a million users was the largest item of the engine's heap.
#[derive(Debug, Default)]
struct UserState {
    /// The user's total cell.
    total: CountSum,
    /// The user's month cells that are not `(0, 0)`.
    months: SmallMap<i32, CountSum>,
    /// The rest, if any of it is there.
    reference: Option<Box<ReferenceState>>,
}

/// The part of a [`UserState`] that comes with a user's row.
#[derive(Debug, Default)]
struct ReferenceState {
    /// The user's row, if any.
    row: Option<UserRow>,
    /// `(month, threshold)` of every fired alert.
    fired: BTreeSet<(i32, u8)>,
    /// The converted total last reported.
    converted: Option<i128>,
}

impl ReferenceState {
    fn is_empty(&self) -> bool {
        self.row.is_none() && self.fired.is_empty() && self.converted.is_none()
    }
}

impl UserState {
    /// True if nothing is kept: the entry can go.
    fn is_idle(&self) -> bool {
        self.total == (0, 0)
            && self.months.is_empty()
            && self.reference.as_ref().is_none_or(|r| r.is_empty())
    }

    /// The user's row, if any.
    fn row(&self) -> Option<UserRow> {
        self.reference.as_ref().and_then(|r| r.row)
    }

    /// `(month, threshold)` of every fired alert.
    fn fired(&self) -> impl Iterator<Item = &(i32, u8)> {
        self.reference.iter().flat_map(|r| r.fired.iter())
    }

    /// The converted total last reported.
    fn converted(&self) -> Option<i128> {
        self.reference.as_ref().and_then(|r| r.converted)
    }

    /// The boxed part, made if missing (see [`UserState::tidy`]).
    fn reference_mut(&mut self) -> &mut ReferenceState {
        self.reference.get_or_insert_with(Box::default)
    }

    /// Frees the boxed part once it holds nothing.
    fn tidy(&mut self) {
        if self.reference.as_ref().is_some_and(|r| r.is_empty()) {
            self.reference = None;
        }
    }

    /// True if a change of a month's spend can change an alert.
    fn alerts_may_change(&self) -> bool {
        self.fired().next().is_some() || self.row().is_some_and(|r| r.effective_budget().is_some())
    }
}

/// What an epoch touched of one user.
#[derive(Debug, Default)]
struct Dirty {
    /// Every month (the row changed).
    all: bool,
    /// Months whose spend changed.
    months: Vec<i32>,
    /// The converted total may have changed (total or rate changed).
    total: bool,
}

/// Joins users' spend with their rows and the rates.
pub trait JoinReference<'scope> {
    /// Keeps users' total and month sums from this stream (the changes of `AggKey::User` and
    /// `AggKey::Month` cells of the users this worker owns), joins them with the rows of
    /// `reference`, and when an epoch closes appends the alert events (see the alert rule in
    /// [`crate::reference`]) to `alerts` and, with a `reporting` currency, the converted-total
    /// changes to `converted`. The returned stream carries no data, only progress, for a probe.
    fn join_reference(
        self,
        reference: Stream<'scope, Epoch, Vec<RoutedChange>>,
        reporting: Option<Currency>,
        alerts: CapturedAlerts,
        converted: CapturedConverted,
    ) -> Stream<'scope, Epoch, Vec<()>>;
}

/// Per open epoch: a capability, and the spend and reference changes of the epoch.
type Held = BTreeMap<Epoch, (Capability<Epoch>, Vec<(AggKey, CountSum)>, Vec<RefChange>)>;

impl<'scope> JoinReference<'scope> for Stream<'scope, Epoch, Vec<(AggKey, Epoch, CountSum)>> {
    fn join_reference(
        self,
        reference: Stream<'scope, Epoch, Vec<RoutedChange>>,
        reporting: Option<Currency>,
        alerts: CapturedAlerts,
        converted: CapturedConverted,
    ) -> Stream<'scope, Epoch, Vec<()>> {
        let to_worker = Exchange::new(|routed: &RoutedChange| routed.0);
        self.binary_frontier::<_, CapacityContainerBuilder<Vec<()>>, _, _, _, _>(
            reference,
            Pipeline,
            to_worker,
            "JoinReference",
            |_capability, _info| {
                let mut join = Join {
                    users: HashMap::default(),
                    rates: BTreeMap::new(),
                    reporting,
                };
                let mut held: Held = BTreeMap::new();
                move |(spend, spend_frontier), (reference, reference_frontier), _output| {
                    spend.for_each(|capability, data| {
                        for (key, time, diff) in data.drain(..) {
                            held.entry(time)
                                .or_insert_with(|| {
                                    (capability.delayed(&time, 0), Vec::new(), Vec::new())
                                })
                                .1
                                .push((key, diff));
                        }
                    });
                    reference.for_each(|capability, data| {
                        for (_, time, change) in data.drain(..) {
                            held.entry(time)
                                .or_insert_with(|| {
                                    (capability.delayed(&time, 0), Vec::new(), Vec::new())
                                })
                                .2
                                .push(change);
                        }
                    });
                    while let Some(entry) = held.first_entry() {
                        let epoch = *entry.key();
                        if spend_frontier.less_equal(&epoch)
                            || reference_frontier.less_equal(&epoch)
                        {
                            break;
                        }
                        // The capability drops after the sinks have the epoch's output.
                        let (_capability, spend, changes) = entry.remove();
                        join.close_epoch(epoch, spend, changes, &alerts, &converted);
                    }
                }
            },
        )
    }
}

/// The join's state on one worker.
struct Join {
    users: HashMap<UserId, UserState, RandomState>,
    /// Every rate (broadcast: each worker has all).
    rates: BTreeMap<Currency, i64>,
    reporting: Option<Currency>,
}

impl Join {
    /// Applies one closed epoch and reports what it changed.
    fn close_epoch(
        &mut self,
        epoch: Epoch,
        spend: Vec<(AggKey, CountSum)>,
        changes: Vec<RefChange>,
        alerts: &CapturedAlerts,
        converted: &CapturedConverted,
    ) {
        let mut dirty: BTreeMap<UserId, Dirty> = BTreeMap::new();
        for (key, (count, sum)) in spend {
            let (user, month) = match key {
                AggKey::User(user) => (user, None),
                AggKey::Month(user, month) => (user, Some(month)),
                _ => continue,
            };
            let state = self.users.entry(user).or_default();
            match month {
                None => {
                    state.total.0 += count;
                    state.total.1 += sum;
                    if self.reporting.is_some() && state.row().is_some() {
                        dirty.entry(user).or_default().total = true;
                    }
                }
                Some(month) => {
                    state.months.update(
                        month,
                        |cell| {
                            cell.0 += count;
                            cell.1 += sum;
                        },
                        |cell| *cell != (0, 0),
                    );
                    if state.alerts_may_change() {
                        dirty.entry(user).or_default().months.push(month);
                    }
                }
            }
            if state.is_idle() {
                self.users.remove(&user);
            }
        }
        let mut rates_changed = Vec::new();
        for RefChange { key, value } in changes {
            match key {
                RefKey::User(user) => {
                    let state = self.users.entry(user).or_default();
                    state.reference_mut().row = value.and_then(RefValue::user_row);
                    state.tidy();
                    let dirty = dirty.entry(user).or_default();
                    dirty.all = true;
                    dirty.total = true;
                }
                RefKey::Fx(currency) => {
                    match value.and_then(RefValue::rate_micros) {
                        Some(rate) => self.rates.insert(currency, rate),
                        None => self.rates.remove(&currency),
                    };
                    rates_changed.push(currency);
                }
            }
        }
        if let Some(reporting) = self.reporting {
            rates_changed.retain(|c| *c != reporting);
            if !rates_changed.is_empty() {
                for (user, state) in &self.users {
                    if state
                        .row()
                        .is_some_and(|row| rates_changed.contains(&row.currency))
                    {
                        dirty.entry(*user).or_default().total = true;
                    }
                }
            }
        }

        let mut alerts = alerts.borrow_mut();
        let mut converted = converted.borrow_mut();
        for (user, dirty) in dirty {
            let Some(state) = self.users.get_mut(&user) else {
                continue;
            };
            let budget = state.row().and_then(|row| row.effective_budget());
            let currency = state.row().map_or(UNKNOWN_CURRENCY, |row| row.currency);
            let mut months = dirty.months;
            if dirty.all {
                months.extend(state.months.keys());
                months.extend(state.fired().map(|(month, _)| *month));
            }
            months.sort_unstable();
            months.dedup();
            for month in months {
                let spent = state
                    .months
                    .get(&month)
                    .filter(|(count, _)| *count > 0)
                    .map(|(_, sum)| i128::from(*sum));
                for threshold_pct in THRESHOLDS_PCT {
                    let fired = alert_fired(spent, budget, threshold_pct);
                    let changed = if fired {
                        state.reference_mut().fired.insert((month, threshold_pct))
                    } else {
                        state
                            .reference
                            .as_mut()
                            .is_some_and(|r| r.fired.remove(&(month, threshold_pct)))
                    };
                    if changed {
                        alerts.push((
                            epoch,
                            AlertEvent {
                                user_id: user,
                                month,
                                threshold_pct,
                                state: if fired {
                                    AlertState::Fired
                                } else {
                                    AlertState::Cleared
                                },
                                spent_minor: spent.unwrap_or(0),
                                budget_minor: budget.unwrap_or(0),
                                currency,
                            },
                        ));
                    }
                }
            }
            if let Some(reporting) = self.reporting
                && dirty.total
            {
                let total = state
                    .row()
                    .filter(|_| state.total.0 > 0)
                    .and_then(|row| {
                        rate_for(row.currency, reporting, |c| self.rates.get(c).copied())
                    })
                    .map(|rate| convert(i128::from(state.total.1), rate));
                if total != state.converted() {
                    state.reference_mut().converted = total;
                    converted.push((
                        epoch,
                        Converted {
                            user_id: user,
                            total_minor: total,
                        },
                    ));
                }
            }
            state.tidy();
            if state.is_idle() {
                self.users.remove(&user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The join keeps one entry per user with live expenses: it stays small, and does not grow
    /// unnoticed (the boxed reference part and the small month map are why it is 64 bytes).
    #[test]
    fn a_users_entry_in_the_join_is_64_bytes() {
        assert_eq!(std::mem::size_of::<(UserId, UserState)>(), 64);
    }
}
