//! The compute ceiling: the same records, decoded with the engine's decoder and folded into hash
//! maps on one thread, with nothing else going on: no Kafka, no epochs, no exchange between
//! workers, no read model, no gRPC.
//!
//! It computes what spendflow computes (except the per-user last event time, which is no sum):
//! the latest record per `expense_id` replaces the earlier one (a correction retracts the old
//! amount, a delete retracts it for good, a duplicate changes nothing) and every live expense
//! adds `(1, amount)` to the same five cells (user, category, merchant, day, month). Its
//! per-user totals are also the reference the harness checks the engine's served state against.

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use spendflow_operators::{AggKey, ExpenseId, Fact, Record};

/// Per-user `(total_minor, expense_count)`.
pub type UserTotals = FxHashMap<u64, (i64, i64)>;

/// What one fold took and computed.
pub struct FoldRun {
    pub elapsed: Duration,
    pub records: u64,
    pub rejected: u64,
    pub cells: usize,
    pub users: UserTotals,
}

/// A hashable cell key (`AggKey` hashes by user only, on purpose, for the dataflow's exchange;
/// a hash map needs the whole key).
fn cell_key(cell: AggKey) -> (u64, u8, u64) {
    match cell {
        AggKey::User(u) => (u, 0, 0),
        AggKey::Category(u, c) => (u, 1, c.id()),
        AggKey::Merchant(u, m) => (u, 2, m.id()),
        AggKey::Day(u, d) => (u, 3, d as u64),
        AggKey::Month(u, m) => (u, 4, m as u64),
    }
}

fn apply(cells: &mut FxHashMap<(u64, u8, u64), (i64, i64)>, fact: &Fact, sign: i64) {
    for cell in fact.cells() {
        let v = cells.entry(cell_key(cell)).or_insert((0, 0));
        v.0 += sign;
        v.1 += sign * fact.amount_minor;
    }
}

/// Decodes and folds `lines` (one record each), timing both.
pub fn fold(lines: &[Vec<u8>]) -> FoldRun {
    let start = Instant::now();
    // Keyed like the engine: an expense is `(user_id, expense_id)`.
    let mut live: FxHashMap<(u64, ExpenseId), Fact> = FxHashMap::default();
    let mut cells: FxHashMap<(u64, u8, u64), (i64, i64)> = FxHashMap::default();
    let mut rejected = 0;
    for line in lines {
        match spendflow_operators::decode(line) {
            Ok(Record::Upsert(expense)) => {
                let fact = expense.fact();
                match live.insert((expense.user_id, expense.expense_id), fact) {
                    Some(old) if old == fact => {}
                    Some(old) => {
                        apply(&mut cells, &old, -1);
                        apply(&mut cells, &fact, 1);
                    }
                    None => apply(&mut cells, &fact, 1),
                }
            }
            Ok(Record::Delete {
                expense_id,
                user_id,
            }) => {
                if let Some(old) = live.remove(&(user_id, expense_id)) {
                    apply(&mut cells, &old, -1);
                }
            }
            Err(_) => rejected += 1,
        }
    }
    cells.retain(|_, v| *v != (0, 0));
    let elapsed = start.elapsed();
    let users = cells
        .iter()
        .filter(|(k, _)| k.1 == 0)
        .map(|(k, v)| (k.0, (v.1, v.0)))
        .collect();
    FoldRun {
        elapsed,
        records: lines.len() as u64,
        rejected,
        cells: cells.len(),
        users,
    }
}

#[cfg(test)]
mod tests {
    use spendflow_engine::source::generator::{GeneratorConfig, Simulator};
    use spendflow_operators::AggKey;
    use spendflow_operators::oracle::recompute;

    use super::*;

    /// The ceiling must compute the engine's aggregates, or comparing with it means nothing.
    #[test]
    fn fold_matches_the_oracle() {
        let config = GeneratorConfig {
            users: 50,
            bad_rate: 0.01,
            ..GeneratorConfig::default()
        };
        let mut sim = Simulator::new(config).unwrap();
        let generated: Vec<_> = (0..20_000).map(|_| sim.next_record()).collect();
        let lines: Vec<Vec<u8>> = generated.iter().map(|g| g.bytes.clone()).collect();
        let records: Vec<Record> = generated.into_iter().filter_map(|g| g.record).collect();
        let run = fold(&lines);
        let expected = recompute(&records);
        assert_eq!(run.rejected, lines.len() as u64 - records.len() as u64);
        assert_eq!(run.cells, expected.cells.len());
        let users: UserTotals = expected
            .cells
            .iter()
            .filter_map(|(k, v)| match k {
                AggKey::User(u) => Some((*u, (v.1, v.0))),
                _ => None,
            })
            .collect();
        assert_eq!(run.users, users);
    }
}
