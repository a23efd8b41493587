//! Replay epochs report every cell they touch, even where its changes cancel (the fix for
//! phantom rows in a durable sink after a crash: see `spendflow_operators::aggregate`).

use std::collections::BTreeSet;
use std::sync::Arc;

use spendflow_operators::aggregate::ReplayTouch;
use spendflow_operators::model::{AggKey, Expense, MS_PER_DAY, Record};
use spendflow_operators::oracle::{Aggregates, recompute};
use spendflow_operators::runtime::execute;
use spendflow_operators::{ClosedEpoch, Epoch};

fn expense(id: &str, user: u64, merchant: &str, amount: i64) -> Expense {
    Expense {
        expense_id: id.parse().expect("a short id"),
        user_id: user,
        card_id: None,
        merchant: Arc::from(merchant),
        category: Arc::from("groceries"),
        amount_minor: amount,
        currency: *b"EUR",
        event_ms: 20_000 * MS_PER_DAY + 3_600_000,
    }
}

/// Runs `epochs` (records per epoch, starting at epoch 1) on `workers` workers with `replay`, and
/// returns every worker's drained epochs, merged in epoch order.
fn run(workers: usize, epochs: Vec<Vec<Record>>, replay: ReplayTouch) -> Vec<ClosedEpoch> {
    let epochs = Arc::new(epochs);
    let drained = execute(workers, move |ctx| {
        let mut dataflow = ctx.build_dataflow_with_replay(replay.clone());
        let (index, peers) = (ctx.index() as u64, ctx.peers() as u64);
        dataflow.advance_to(1);
        for (i, records) in epochs.iter().enumerate() {
            for record in records.iter().filter(|r| r.user_id() % peers == index) {
                dataflow.push(record.clone());
            }
            dataflow.advance_to(i as Epoch + 2);
        }
        while dataflow.is_behind() {
            ctx.step();
        }
        dataflow.drain_closed()
    })
    .expect("workers ran");
    let mut all: Vec<ClosedEpoch> = drained.into_iter().flatten().collect();
    all.sort_by_key(|c| c.epoch);
    all
}

fn zero_cells(closed: &[ClosedEpoch], epoch: Epoch) -> BTreeSet<AggKey> {
    closed
        .iter()
        .filter(|c| c.epoch == epoch)
        .flat_map(|c| &c.cells)
        .filter(|c| c.count == 0 && c.sum == 0)
        .map(|c| c.key)
        .collect()
}

#[test]
fn insert_and_delete_in_one_replay_epoch_touch_every_cell() {
    let x = expense("x", 7, "Phantom Shop", 1_250);
    let epochs = vec![vec![
        Record::Upsert(x.clone()),
        Record::Delete {
            expense_id: "x".parse().unwrap(),
            user_id: 7,
        },
    ]];
    // Not a replay: nothing changed, nothing is reported.
    let normal = run(1, epochs.clone(), ReplayTouch::default());
    assert!(zero_cells(&normal, 1).is_empty(), "{normal:?}");
    // A replay: every cell of the expense is reported, as a zero change.
    let replayed = run(1, epochs, ReplayTouch::until_told(1));
    let expected: BTreeSet<AggKey> = x.fact().cells().into_iter().collect();
    assert_eq!(zero_cells(&replayed, 1), expected);
}

#[test]
fn offsetting_changes_across_workers_are_touched_and_later_epochs_are_not() {
    // Epoch 1: user 3 has "a" (500). Epoch 2 (replay): "a" is deleted and "b" (500, same
    // cells) inserted: every cell's change nets to zero. Epoch 3 (after the replay ended at 2):
    // the same again with "b" -> "c", which must report nothing.
    let a = expense("a", 3, "Same", 500);
    let b = expense("b", 3, "Same", 500);
    let c = expense("c", 3, "Same", 500);
    let epochs = vec![
        vec![Record::Upsert(a)],
        vec![
            Record::Delete {
                expense_id: "a".parse().unwrap(),
                user_id: 3,
            },
            Record::Upsert(b.clone()),
        ],
        vec![
            Record::Delete {
                expense_id: "b".parse().unwrap(),
                user_id: 3,
            },
            Record::Upsert(c),
        ],
    ];
    for workers in [1, 2] {
        let replay = ReplayTouch::until_told(1);
        replay.end_at(2);
        let closed = run(workers, epochs.clone(), replay);
        let expected: BTreeSet<AggKey> = b.fact().cells().into_iter().collect();
        assert_eq!(zero_cells(&closed, 2), expected, "{workers} workers");
        assert!(zero_cells(&closed, 3).is_empty(), "{workers} workers");
        // Zero changes change no value: the aggregates still equal a recomputation.
        let mut served = Aggregates::default();
        for epoch in &closed {
            served.apply(epoch);
        }
        assert_eq!(served, recompute(epochs.iter().flatten()));
    }
}

#[test]
fn the_replay_bound_only_moves_down() {
    let replay = ReplayTouch::until_told(3);
    assert!(replay.covers(Epoch::MAX - 1));
    assert!(!replay.covers(2) && replay.covers(3));
    replay.end_at(10);
    replay.end_at(20);
    assert!(replay.covers(10) && !replay.covers(11));
    let none = ReplayTouch::default();
    assert!(!none.covers(0) && !none.covers(1));
}

#[test]
fn touches_are_reported_by_the_worker_that_owns_the_user() {
    // In a cluster each process publishes only the users its workers own: a touch reported by
    // another worker (where the facts happened to be summed) would be published by a process
    // that holds nothing of the user, as a deleted cell.
    let workers = 3;
    let mut epoch = Vec::new();
    for user in 0..40u64 {
        for n in 0..3 {
            let id = format!("u{user}e{n}");
            epoch.push(Record::Upsert(expense(&id, user, "Shop", 100 + n)));
            epoch.push(Record::Delete {
                expense_id: id.parse().unwrap(),
                user_id: user,
            });
        }
    }
    let epochs = Arc::new(vec![epoch]);
    let replay = ReplayTouch::until_told(1);
    let drained = execute(workers, move |ctx| {
        let mut dataflow = ctx.build_dataflow_with_replay(replay.clone());
        let (index, peers) = (ctx.index(), ctx.peers());
        dataflow.advance_to(1);
        for record in epochs[0]
            .iter()
            .filter(|r| r.user_id() as usize % peers == index)
        {
            dataflow.push(record.clone());
        }
        dataflow.advance_to(2);
        while dataflow.is_behind() {
            ctx.step();
        }
        (index, dataflow.drain_closed())
    })
    .expect("workers ran");
    let mut touched = 0;
    for (worker, closed) in drained {
        for cell in closed.iter().flat_map(|c| &c.cells) {
            assert_eq!(
                spendflow_operators::owner_worker(cell.key.user_id(), workers),
                worker,
                "{cell:?} reported by worker {worker}"
            );
            touched += 1;
        }
    }
    assert!(
        touched >= 40 * 5,
        "every user's cells are touched: {touched}"
    );
}
