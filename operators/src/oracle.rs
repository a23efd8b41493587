//! The reference implementation: every aggregate recomputed from scratch.
//!
//! Tests feed the same records to the dataflow and to [`recompute`] and compare. It is written
//! to be obviously right rather than fast: a map of live expenses built by replaying the
//! records in order, then one pass over the live expenses.
//!
//! With reference data, [`joined`] replays an interleaved stream of records and reference
//! changes ([`Input`]) and derives the current rows, the fired alerts and the converted totals
//! from the final state alone, with no notion of epochs or events: tests check that the
//! dataflow's per-epoch changes, applied in order, always reproduce it.

use std::collections::BTreeMap;

use crate::ClosedEpoch;
use crate::model::{AggKey, CountSum, ExpenseId, Fact, Record, UserId};
use crate::reference::{
    Currency, RATE_ONE, RefChange, RefKey, RefValue, THRESHOLDS_PCT, UNKNOWN_CURRENCY, UserRow,
};

/// All aggregates at one point of the input: `(count, sum)` per cell, and the newest event time
/// per user. Cells with `count == 0 && sum == 0` are absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Aggregates {
    /// Every cell with its `(count, sum)`.
    pub cells: BTreeMap<AggKey, CountSum>,
    /// Newest event time of each user that has a live expense.
    pub last_seen: BTreeMap<UserId, i64>,
}

impl Aggregates {
    /// Applies the changes a worker drained (for testing the change stream itself).
    pub fn apply(&mut self, closed: &ClosedEpoch) {
        for change in &closed.cells {
            let cell = self.cells.entry(change.key).or_insert((0, 0));
            cell.0 += change.count;
            cell.1 += change.sum;
            if *cell == (0, 0) {
                self.cells.remove(&change.key);
            }
        }
        for seen in &closed.last_seen {
            match seen.event_ms {
                Some(ms) => self.last_seen.insert(seen.user_id, ms),
                None => self.last_seen.remove(&seen.user_id),
            };
        }
    }
}

/// The live fact of every expense, keyed by its identity `(user_id, expense_id)`, after replaying
/// `records` in order.
pub fn live_facts<'a>(
    records: impl IntoIterator<Item = &'a Record>,
) -> BTreeMap<(UserId, ExpenseId), Fact> {
    let mut live = BTreeMap::new();
    for record in records {
        match record {
            Record::Upsert(e) => {
                live.insert((e.user_id, e.expense_id.clone()), e.fact());
            }
            Record::Delete {
                expense_id,
                user_id,
            } => {
                live.remove(&(*user_id, expense_id.clone()));
            }
        }
    }
    live
}

/// Every aggregate over the live expenses after replaying `records` in order.
pub fn recompute<'a>(records: impl IntoIterator<Item = &'a Record>) -> Aggregates {
    let mut out = Aggregates::default();
    for fact in live_facts(records).values() {
        let newest = out.last_seen.entry(fact.user_id).or_insert(fact.event_ms);
        *newest = (*newest).max(fact.event_ms);
        for cell in fact.cells() {
            let value = out.cells.entry(cell).or_insert((0, 0));
            value.0 += 1;
            value.1 += fact.amount_minor;
        }
    }
    out.cells.retain(|_, v| *v != (0, 0));
    out
}

/// One input of an interleaved stream: an expense record or a change of reference data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// An expense record.
    Record(Record),
    /// A change of a reference row.
    Reference(RefChange),
}

/// A fired alert's values: the month's spend, the budget and the user's currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FiredAlert {
    /// The month's spend, minor units.
    pub spent_minor: i128,
    /// The user's budget.
    pub budget_minor: i64,
    /// The user's currency.
    pub currency: Currency,
}

/// Everything the reference data derives, recomputed from scratch (see [`joined`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Joined {
    /// The aggregates over the live expenses.
    pub aggregates: Aggregates,
    /// Every user's current row.
    pub users: BTreeMap<UserId, UserRow>,
    /// Every current rate.
    pub rates: BTreeMap<Currency, i64>,
    /// Every fired alert `(user, month, threshold)`, with its values.
    pub fired: BTreeMap<(UserId, i32, u8), FiredAlert>,
    /// Every user's converted total, for users that have one.
    pub converted: BTreeMap<UserId, i128>,
}

impl Joined {
    /// The converted ranking: largest converted total first, ties by smaller user id; users
    /// without a converted total left out.
    pub fn converted_ranking(&self) -> Vec<(UserId, i128)> {
        ranking(&self.converted)
    }

    /// The month's spend, budget and currency an alert event of `(user, month)` reports now
    /// (zeros and [`UNKNOWN_CURRENCY`] where there is none).
    pub fn alert_values(&self, user: UserId, month: i32) -> FiredAlert {
        let row = self.users.get(&user);
        FiredAlert {
            spent_minor: self
                .aggregates
                .cells
                .get(&AggKey::Month(user, month))
                .filter(|(count, _)| *count > 0)
                .map_or(0, |(_, sum)| i128::from(*sum)),
            budget_minor: row.and_then(UserRow::effective_budget).unwrap_or(0),
            currency: row.map_or(UNKNOWN_CURRENCY, |row| row.currency),
        }
    }
}

/// Largest value first, ties by smaller user id.
pub fn ranking(totals: &BTreeMap<UserId, i128>) -> Vec<(UserId, i128)> {
    let mut ranked: Vec<_> = totals.iter().map(|(u, t)| (*u, *t)).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
}

/// The aggregates, current reference rows, fired alerts and converted totals (in `reporting`,
/// if given) after replaying `inputs` in order: the rules of [`crate::reference`], applied
/// directly to the final state.
pub fn joined<'a>(
    inputs: impl IntoIterator<Item = &'a Input>,
    reporting: Option<Currency>,
) -> Joined {
    let mut records = Vec::new();
    let mut rows: BTreeMap<RefKey, RefValue> = BTreeMap::new();
    for input in inputs {
        match input {
            Input::Record(record) => records.push(record),
            Input::Reference(RefChange { key, value }) => match value {
                Some(value) => {
                    rows.insert(*key, *value);
                }
                None => {
                    rows.remove(key);
                }
            },
        }
    }
    let aggregates = recompute(records);
    let mut out = Joined::default();
    for (key, value) in rows {
        match (key, value) {
            (RefKey::User(user), value) => {
                out.users.extend(value.user_row().map(|row| (user, row)));
            }
            (RefKey::Fx(currency), value) => {
                out.rates
                    .extend(value.rate_micros().map(|rate| (currency, rate)));
            }
        }
    }
    for (key, (count, sum)) in &aggregates.cells {
        let row = out.users.get(&key.user_id());
        match (key, row) {
            (AggKey::Month(user, month), Some(row)) if *count > 0 => {
                // The rule written out again, not `reference::alert_fired`: the oracle must not
                // share the code it checks.
                let budget = row.budget_minor.unwrap_or(0);
                for threshold_pct in THRESHOLDS_PCT {
                    if budget > 0
                        && i128::from(*sum) * 100 >= i128::from(budget) * i128::from(threshold_pct)
                    {
                        out.fired.insert(
                            (*user, *month, threshold_pct),
                            FiredAlert {
                                spent_minor: i128::from(*sum),
                                budget_minor: row.budget_minor.unwrap_or(0),
                                currency: row.currency,
                            },
                        );
                    }
                }
            }
            (AggKey::User(user), Some(row)) if *count > 0 => {
                let rate = match reporting {
                    Some(reporting) if row.currency == reporting => Some(RATE_ONE),
                    Some(_) => out.rates.get(&row.currency).copied(),
                    None => None,
                };
                if let Some(rate) = rate {
                    // Half away from zero: round the magnitude half up, then restore the sign.
                    let product = i128::from(*sum) * i128::from(rate);
                    let one = i128::from(RATE_ONE);
                    let converted = (product.abs() + one / 2) / one * product.signum();
                    out.converted.insert(*user, converted);
                }
            }
            _ => {}
        }
    }
    out.aggregates = aggregates;
    out
}
