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

use std::hash::{BuildHasher, BuildHasherDefault};

use rustc_hash::{FxHashMap, FxHashSet, FxHasher};
use spendflow_engine::source::generator::{GeneratorConfig, Simulator};
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

/// The live expenses at the end of `n` records of `config`'s stream (regenerated, not decoded:
/// the scaling table's denominator for bytes per live expense). An expense is `(user_id,
/// expense_id)`, the id kept as a 64-bit hash so that 20 M records fit in a few hundred MB.
pub fn live_expenses(config: GeneratorConfig, n: u64) -> anyhow::Result<u64> {
    let mut sim = Simulator::new(config)?;
    let hasher = BuildHasherDefault::<FxHasher>::default();
    let mut live: FxHashSet<(u64, u64)> = FxHashSet::default();
    for _ in 0..n {
        match sim.next_record().record {
            Some(Record::Upsert(e)) => {
                live.insert((e.user_id, hasher.hash_one(&e.expense_id)));
            }
            Some(Record::Delete {
                expense_id,
                user_id,
            }) => {
                live.remove(&(user_id, hasher.hash_one(&expense_id)));
            }
            None => {}
        }
    }
    Ok(live.len() as u64)
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
        // The live count the scaling table divides by is the fold's.
        let live = live_expenses(
            GeneratorConfig {
                users: 50,
                bad_rate: 0.01,
                ..GeneratorConfig::default()
            },
            20_000,
        )
        .unwrap();
        let expected_live: i64 = run.users.values().map(|v| v.1).sum();
        assert_eq!(live as i64, expected_live);
    }
}
