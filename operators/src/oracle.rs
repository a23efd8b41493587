//! The reference implementation: every aggregate recomputed from scratch.
//!
//! Tests feed the same records to the dataflow and to [`recompute`] and compare. It is written
//! to be obviously right rather than fast: a map of live expenses built by replaying the
//! records in order, then one pass over the live expenses.

use std::collections::BTreeMap;

use crate::ClosedEpoch;
use crate::model::{AggKey, CountSum, ExpenseId, Fact, Record, UserId};

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
