//! The core oracle: on random streams with upserts, corrections, deletes, duplicates, refunds and
//! late events, the aggregates at every closed epoch equal a from-scratch recomputation over the
//! records of all epochs up to it, with 1 and with 2 workers.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spendflow_operators::model::{Expense, ExpenseId, MS_PER_DAY, Record};
use spendflow_operators::oracle::{Aggregates, recompute};
use spendflow_operators::runtime::execute;
use spendflow_operators::{ClosedEpoch, Epoch};

/// The id with this (short) text.
fn eid(text: &str) -> ExpenseId {
    ExpenseId::new(text).expect("a short id")
}

const CATEGORIES: &[&str] = &["groceries", "travel", "fuel"];
const MERCHANTS: &[&str] = &["Tesco", "Aldi", "Shell", "KLM", "Café Nord"];

/// A random stream cut into epochs: `epochs[e]` holds the records pushed at epoch `e`.
fn random_stream(seed: u64, records: usize, users: u64) -> Vec<Vec<Record>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sent: Vec<Record> = Vec::new();
    let mut epochs = vec![Vec::new()];
    let base_ms = 1_764_000_000_000_i64;
    for i in 0..records {
        let fresh = |rng: &mut ChaCha8Rng, id: ExpenseId, user: u64| {
            let late = rng.random_bool(0.1);
            let offset = if late {
                -rng.random_range(0..60 * MS_PER_DAY)
            } else {
                0
            };
            Expense {
                expense_id: id,
                user_id: user,
                card_id: None,
                merchant: Arc::from(MERCHANTS[rng.random_range(0..MERCHANTS.len())]),
                category: Arc::from(CATEGORIES[rng.random_range(0..CATEGORIES.len())]),
                amount_minor: if rng.random_bool(0.1) {
                    -rng.random_range(1..5_000)
                } else {
                    rng.random_range(1..50_000)
                },
                currency: *b"EUR",
                event_ms: base_ms + i as i64 * 7_200_000 + offset,
            }
        };
        let roll = rng.random_range(0..100);
        let record = if roll < 15 && !sent.is_empty() {
            // Duplicate delivery of an earlier record, exactly.
            sent[rng.random_range(0..sent.len())].clone()
        } else if roll < 35 && !sent.is_empty() {
            // Correction of an earlier expense: same id and user, new content.
            let earlier = &sent[rng.random_range(0..sent.len())];
            fresh(&mut rng, eid(earlier.expense_id()), earlier.user_id()).into_upsert()
        } else if roll < 45 && !sent.is_empty() {
            // Delete of an earlier expense (maybe already deleted).
            let earlier = &sent[rng.random_range(0..sent.len())];
            Record::Delete {
                expense_id: eid(earlier.expense_id()),
                user_id: earlier.user_id(),
            }
        } else if roll < 47 {
            // Delete of an expense that never existed.
            Record::Delete {
                expense_id: eid(&format!("ghost-{i}")),
                user_id: 1,
            }
        } else if roll < 51 && !sent.is_empty() {
            // Another user's record that reuses an earlier expense_id: a different expense
            // (identity is `(user_id, expense_id)`), which must neither replace nor delete the
            // earlier user's one.
            let earlier = &sent[rng.random_range(0..sent.len())];
            let id = eid(earlier.expense_id());
            let other = earlier.user_id() % users + 1;
            if rng.random_bool(0.5) {
                Record::Delete {
                    expense_id: id,
                    user_id: other,
                }
            } else {
                fresh(&mut rng, id, other).into_upsert()
            }
        } else {
            let user = rng.random_range(1..=users);
            fresh(&mut rng, eid(&format!("e-{i}")), user).into_upsert()
        };
        sent.push(record.clone());
        epochs.last_mut().unwrap().push(record);
        if rng.random_bool(0.05) {
            epochs.push(Vec::new());
        }
    }
    epochs
}

trait IntoUpsert {
    fn into_upsert(self) -> Record;
}
impl IntoUpsert for Expense {
    fn into_upsert(self) -> Record {
        Record::Upsert(self)
    }
}

/// Runs the dataflow on `workers` workers. Each worker pushes the records of the users it
/// "reads" (`user % peers == index`), as a partitioned source would; every epoch is closed and
/// drained in lockstep so that each worker reports exactly one `ClosedEpoch` per epoch.
fn run(epochs: Arc<Vec<Vec<Record>>>, workers: usize) -> Vec<Vec<ClosedEpoch>> {
    execute(workers, move |ctx| {
        let mut dataflow = ctx.build_dataflow();
        let (index, peers) = (ctx.index() as u64, ctx.peers() as u64);
        let mut drained = Vec::new();
        for (epoch, records) in epochs.iter().enumerate() {
            for record in records.iter().filter(|r| r.user_id() % peers == index) {
                dataflow.push(record.clone());
            }
            dataflow.advance_to(epoch as Epoch + 1);
            while dataflow.is_behind() {
                ctx.step();
            }
            let mut closed = dataflow.drain_closed();
            assert_eq!(closed.len(), 1, "exactly the epoch that just closed");
            let closed = closed.pop().unwrap();
            assert_eq!(closed.epoch, epoch as Epoch);
            drained.push(closed);
        }
        drained
    })
    .expect("workers ran")
}

/// Checks every epoch of a run against recomputation; returns the final aggregates.
fn check(epochs: &[Vec<Record>], per_worker: &[Vec<ClosedEpoch>]) -> Aggregates {
    let mut served = Aggregates::default();
    let mut prefix: Vec<&Record> = Vec::new();
    for (epoch, records) in epochs.iter().enumerate() {
        prefix.extend(records);
        for worker in per_worker {
            served.apply(&worker[epoch]);
        }
        let expected = recompute(prefix.iter().copied());
        assert_eq!(
            served.cells, expected.cells,
            "cells differ at epoch {epoch}"
        );
        assert_eq!(
            served.last_seen, expected.last_seen,
            "last seen differs at epoch {epoch}"
        );
    }
    served
}

#[test]
fn every_epoch_matches_recomputation_with_one_and_two_workers() {
    for seed in [1, 2, 3, 0x5eed] {
        let epochs = Arc::new(random_stream(seed, 3_000, 25));
        let one = check(&epochs, &run(epochs.clone(), 1));
        let two = check(&epochs, &run(epochs.clone(), 2));
        assert_eq!(one, two, "seed {seed}: 1 and 2 workers disagree");
        assert!(
            !one.cells.is_empty(),
            "seed {seed}: the stream left something live"
        );
    }
}

#[test]
fn changes_are_consolidated_one_per_key_and_never_zero() {
    let epochs = Arc::new(random_stream(7, 2_000, 10));
    for worker in run(epochs, 2) {
        for closed in worker {
            let keys: Vec<_> = closed.cells.iter().map(|c| c.key).collect();
            assert!(
                keys.windows(2).all(|w| w[0] < w[1]),
                "sorted, one change per key"
            );
            assert!(closed.cells.iter().all(|c| (c.count, c.sum) != (0, 0)));
        }
    }
}

fn expense(id: &str, user: u64, amount: i64, event_ms: i64) -> Record {
    Record::Upsert(Expense {
        expense_id: eid(id),
        user_id: user,
        card_id: None,
        merchant: Arc::from("Tesco"),
        category: Arc::from("groceries"),
        amount_minor: amount,
        currency: *b"EUR",
        event_ms,
    })
}

#[test]
fn order_inside_one_epoch_decides() {
    let delete = |id: &str| Record::Delete {
        expense_id: eid(id),
        user_id: 1,
    };
    let epochs = vec![
        // Upsert then delete in one epoch: gone. Delete then upsert: live.
        vec![
            expense("a", 1, 100, 0),
            delete("a"),
            delete("b"),
            expense("b", 1, 250, 5),
        ],
        // Two corrections in one epoch: the last wins, even though it is the smaller value.
        vec![expense("b", 1, 900, 5), expense("b", 1, 300, 7)],
        // Delete the only live expense: the user disappears, last seen included.
        vec![delete("b")],
    ];
    let per_worker = run(Arc::new(epochs.clone()), 1);
    check(&epochs, &per_worker);
    let worker = &per_worker[0];
    let total = |closed: &ClosedEpoch| {
        closed
            .cells
            .iter()
            .find(|c| c.key == spendflow_operators::AggKey::User(1))
            .map(|c| (c.count, c.sum))
    };
    assert_eq!(total(&worker[0]), Some((1, 250)));
    assert_eq!(total(&worker[1]), Some((0, 50)));
    assert_eq!(total(&worker[2]), Some((-1, -300)));
    assert_eq!(worker[2].last_seen[0].event_ms, None);
}

#[test]
fn one_drain_over_many_epochs_splits_them_by_epoch() {
    let epochs = Arc::new(random_stream(11, 2_000, 10));
    let input = epochs.clone();
    let per_worker = execute(2, move |ctx| {
        let mut dataflow = ctx.build_dataflow();
        let (index, peers) = (ctx.index() as u64, ctx.peers() as u64);
        // Push every epoch before stepping at all: the first drain sees many closed epochs.
        for (epoch, records) in input.iter().enumerate() {
            for record in records.iter().filter(|r| r.user_id() % peers == index) {
                dataflow.push(record.clone());
            }
            dataflow.advance_to(epoch as Epoch + 1);
        }
        while dataflow.is_behind() {
            ctx.step();
        }
        dataflow.drain_closed()
    })
    .unwrap();
    let last = epochs.len() as Epoch - 1;
    for drained in &per_worker {
        assert!(drained.windows(2).all(|w| w[0].epoch < w[1].epoch));
        assert_eq!(drained.last().map(|c| c.epoch), Some(last));
    }
    // Applying each epoch's changes in order reproduces recomputation at that epoch.
    let mut served = Aggregates::default();
    let mut prefix: Vec<&Record> = Vec::new();
    for (epoch, records) in epochs.iter().enumerate() {
        prefix.extend(records);
        for drained in &per_worker {
            drained
                .iter()
                .filter(|c| c.epoch == epoch as Epoch)
                .for_each(|c| served.apply(c));
        }
        let expected = recompute(prefix.iter().copied());
        assert_eq!(served.cells, expected.cells, "epoch {epoch}");
        assert_eq!(served.last_seen, expected.last_seen, "epoch {epoch}");
    }
}

/// Checkpoint and restore: copies of the live set taken at an epoch (while later epochs are
/// already being pushed) equal the live expenses of the input up to that epoch, and a fresh
/// dataflow restored from them, at a different number of workers, then fed the rest of the
/// input, ends with the same aggregates as recomputation over all of it.
#[test]
fn snapshot_then_restore_at_other_parallelism_matches_recomputation() {
    for seed in [5, 6] {
        let epochs = Arc::new(random_stream(seed, 3_000, 20));
        let at = (epochs.len() / 2) as Epoch;
        let input = epochs.clone();
        // Two workers; the copy is requested before the epoch closes, and every epoch is
        // pushed before any stepping, so later epochs' records are in flight when it is taken.
        let copies = execute(2, move |ctx| {
            let mut dataflow = ctx.build_dataflow();
            let (index, peers) = (ctx.index() as u64, ctx.peers() as u64);
            dataflow.request_snapshot(at);
            for (epoch, records) in input.iter().enumerate() {
                for record in records.iter().filter(|r| r.user_id() % peers == index) {
                    dataflow.push(record.clone());
                }
                dataflow.advance_to(epoch as Epoch + 1);
            }
            while dataflow.is_behind() {
                ctx.step();
            }
            dataflow.take_snapshots()
        })
        .unwrap();
        let mut live: Vec<(ExpenseId, spendflow_operators::Fact)> = Vec::new();
        for worker in copies {
            assert_eq!(worker.len(), 1, "one copy per worker");
            assert_eq!(worker[0].epoch, at);
            live.extend(worker[0].live.iter().cloned());
        }
        live.sort();
        let upto: Vec<&Record> = epochs[..=at as usize].iter().flatten().collect();
        let mut expected_live: Vec<_> =
            spendflow_operators::oracle::live_facts(upto.iter().copied())
                .into_iter()
                .map(|((_, id), fact)| (id, fact))
                .collect();
        expected_live.sort();
        assert_eq!(
            live, expected_live,
            "seed {seed}: the copy is the live set at {at}"
        );

        // Restore on one worker at epoch `at`, then push the remaining epochs.
        let rest = epochs.clone();
        let live = Arc::new(live);
        let restored = execute(1, move |ctx| {
            let mut dataflow = ctx.build_dataflow();
            dataflow.advance_to(at);
            for (id, fact) in live.iter() {
                dataflow.push_live(id.clone(), *fact);
            }
            for (epoch, records) in rest.iter().enumerate().skip(at as usize + 1) {
                dataflow.advance_to(epoch as Epoch);
                for record in records {
                    dataflow.push(record.clone());
                }
            }
            dataflow.advance_to(rest.len() as Epoch);
            while dataflow.is_behind() {
                ctx.step();
            }
            dataflow.drain_closed()
        })
        .unwrap();
        let mut served = Aggregates::default();
        for closed in &restored[0] {
            served.apply(closed);
        }
        let expected = recompute(epochs.iter().flatten());
        assert_eq!(served, expected, "seed {seed}: restored run ends equal");
    }
}
