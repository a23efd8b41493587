use std::sync::Arc;

use spendflow_operators::{AggKey, CellChange, LastSeen};

use super::*;

fn change(key: AggKey, count: i64, sum: i64) -> CellChange {
    CellChange { key, count, sum }
}

fn delta(epoch: Epoch, cells: Vec<CellChange>, last_seen: Vec<LastSeen>) -> EpochDelta {
    EpochDelta {
        as_of: AsOf {
            epoch,
            positions: Arc::default(),
            ..AsOf::default()
        },
        cells,
        last_seen,
        records_covered: epoch,
        ..EpochDelta::default()
    }
}

fn groceries() -> spendflow_operators::Name {
    spendflow_operators::Name::intern("groceries").0
}

#[test]
fn applies_changes_and_publishes_new_values() {
    let (model, mut writer) = ReadModel::new();
    assert!(model.published_epoch().is_none());
    let published = writer.apply(delta(
        1,
        vec![
            change(AggKey::User(7), 2, 300),
            change(AggKey::Category(7, groceries()), 2, 300),
            change(AggKey::Day(7, 20_000), 2, 300),
            change(AggKey::User(9), 1, 50),
        ],
        vec![LastSeen {
            user_id: 7,
            event_ms: Some(1_000),
        }],
    ));
    assert_eq!(model.published_epoch(), Some(1));
    let snapshot = model.snapshot();
    let user = snapshot.user(7).unwrap();
    assert_eq!(
        (user.expense_count, user.total_minor, user.last_event_ms),
        (2, 300, Some(1_000))
    );
    assert_eq!(user.categories.get(&groceries()), Some((2, 300)));
    assert_eq!(snapshot.live_expenses(), 3);
    assert_eq!(published.cells.len(), 4);
    assert_eq!(
        published.cells[0].last_event_ms,
        Some(1_000),
        "user cells carry last seen"
    );

    // A retraction that empties a category removes it, and the published value says so.
    let published = writer.apply(delta(
        2,
        vec![
            change(AggKey::User(7), -2, -300),
            change(AggKey::Category(7, groceries()), -2, -300),
        ],
        vec![],
    ));
    assert!(published.cells.iter().all(CellValue::removed));
    let after = model.snapshot();
    assert!(after.user(7).unwrap().categories.is_empty());
    // The earlier snapshot is untouched: readers keep a consistent epoch.
    assert_eq!(snapshot.user(7).unwrap().total_minor, 300);
}

#[test]
fn users_without_live_expenses_disappear() {
    let (model, mut writer) = ReadModel::new();
    writer.apply(delta(1, vec![change(AggKey::User(1), 1, 10)], vec![]));
    writer.apply(delta(
        2,
        vec![change(AggKey::User(1), -1, -10)],
        vec![LastSeen {
            user_id: 1,
            event_ms: None,
        }],
    ));
    let snapshot = model.snapshot();
    assert!(snapshot.user(1).is_none());
    assert_eq!(snapshot.user_count(), 0);
    assert_eq!(snapshot.top_spenders().count(), 0);
}

#[test]
fn top_spenders_follow_totals() {
    let (model, mut writer) = ReadModel::new();
    writer.apply(delta(
        1,
        vec![
            change(AggKey::User(1), 1, 100),
            change(AggKey::User(2), 1, 300),
            change(AggKey::User(3), 1, 200),
        ],
        vec![],
    ));
    let order = |m: &ReadModel| {
        m.snapshot()
            .top_spenders()
            .map(|u| u.user_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(order(&model), vec![2, 3, 1]);
    writer.apply(delta(2, vec![change(AggKey::User(1), 1, 500)], vec![]));
    assert_eq!(order(&model), vec![1, 2, 3]);
    // A refund can push a user down.
    writer.apply(delta(3, vec![change(AggKey::User(1), 1, -550)], vec![]));
    assert_eq!(order(&model), vec![2, 3, 1]);
}

#[test]
fn paging_starts_after_the_token() {
    let (model, mut writer) = ReadModel::new();
    let cells = (1..=5).map(|u| change(AggKey::User(u), 1, 1)).collect();
    writer.apply(delta(1, cells, vec![]));
    let snapshot = model.snapshot();
    let ids: Vec<_> = snapshot.users_after(Some(2)).map(|u| u.user_id).collect();
    assert_eq!(ids, vec![3, 4, 5]);
}

#[test]
fn subscriptions_resume_from_history_or_start_from_a_snapshot() {
    let (model, mut writer) = ReadModel::new();
    for epoch in 1..=3 {
        writer.apply(delta(epoch, vec![change(AggKey::User(1), 1, 10)], vec![]));
    }
    match model.subscribe(Some(1)).0 {
        SubscriptionStart::Replay(replay) => {
            let epochs: Vec<_> = replay.iter().map(|p| p.as_of.epoch).collect();
            assert_eq!(epochs, vec![2, 3]);
        }
        SubscriptionStart::Snapshot(_) => panic!("epoch 1 is in the history"),
    }
    assert!(matches!(
        model.subscribe(None).0,
        SubscriptionStart::Snapshot(_)
    ));

    // Once the history has moved past the requested epoch, a snapshot is the only way back.
    for epoch in 4..(HISTORY_EPOCHS as Epoch + 10) {
        writer.apply(delta(epoch, vec![], vec![]));
    }
    assert!(matches!(
        model.subscribe(Some(1)).0,
        SubscriptionStart::Snapshot(_)
    ));

    // Everything published after subscribing arrives on the receiver.
    let (_, mut receiver) = model.subscribe(None);
    writer.apply(delta(1_000, vec![change(AggKey::User(2), 1, 5)], vec![]));
    assert_eq!(receiver.try_recv().unwrap().as_of.epoch, 1_000);
}

/// Catch-up epochs change many cells each: the history keeps them only up to
/// `HISTORY_CELLS` (not 512 epochs of them, which held every change of a long catch-up), and a
/// subscriber resuming before what it holds gets a snapshot.
#[test]
fn the_history_is_bounded_by_cells_as_well_as_epochs() {
    let (model, mut writer) = ReadModel::new();
    let per_epoch = HISTORY_CELLS / 4 + 1;
    for epoch in 1..=8 {
        let cells = (0..per_epoch as u64)
            .map(|u| change(AggKey::User(u), 1, epoch as i64))
            .collect();
        writer.apply(delta(epoch, cells, vec![]));
    }
    let kept: Vec<Epoch> = model
        .history
        .lock()
        .epochs
        .iter()
        .map(|p| p.as_of.epoch)
        .collect();
    // Four such epochs are just over the bound: the newest three stay.
    assert_eq!(kept, vec![6, 7, 8]);
    assert_eq!(model.history.lock().cells, 3 * per_epoch);
    assert!(matches!(
        model.subscribe(Some(4)).0,
        SubscriptionStart::Snapshot(_)
    ));
    match model.subscribe(Some(5)).0 {
        SubscriptionStart::Replay(replay) => assert_eq!(replay.len(), 3),
        SubscriptionStart::Snapshot(_) => panic!("epochs 6 to 8 are in the history"),
    }
    // One epoch larger than the bound on its own is still kept (the newest always is).
    let cells = (0..(HISTORY_CELLS as u64 + 1))
        .map(|u| change(AggKey::User(u), 1, 1))
        .collect();
    writer.apply(delta(9, cells, vec![]));
    assert_eq!(model.history.lock().epochs.len(), 1);
}

#[test]
fn formats_dates() {
    assert_eq!(
        format_day(spendflow_operators::model::days_from_civil(2026, 11, 24)),
        "2026-11-24"
    );
    assert_eq!(format_month(2026 * 12 + 10), "2026-11");
}

/// One cell of every kind for `user`.
fn every_kind(user: UserId) -> Vec<AggKey> {
    vec![
        AggKey::User(user),
        AggKey::Category(user, groceries()),
        AggKey::Merchant(user, spendflow_operators::Name::intern("corner shop").0),
        AggKey::Day(user, 20_000),
        AggKey::Month(user, 2026 * 12 + 10),
    ]
}

#[test]
fn touching_an_absent_cell_publishes_it_removed_and_keeps_nothing() {
    let (model, mut writer) = ReadModel::new();
    // User 3 has no live expense at all; every kind of its cells is touched with a zero change.
    let cells = every_kind(3).into_iter().map(|k| change(k, 0, 0)).collect();
    let published = writer.apply(delta(1, cells, vec![]));
    assert_eq!(published.cells.len(), 5, "every touched cell is published");
    assert!(
        published.cells.iter().all(CellValue::removed),
        "{:?}",
        published.cells
    );
    let snapshot = model.snapshot();
    assert!(snapshot.user(3).is_none(), "no empty user is kept");
    assert_eq!(snapshot.user_count(), 0);
    assert_eq!(snapshot.top_spenders().count(), 0);
    assert_eq!(snapshot.cells(&[]).count(), 0);

    // A user with live expenses whose other cells are touched: no zero entries appear.
    writer.apply(delta(2, vec![change(AggKey::User(4), 1, 10)], vec![]));
    let cells = every_kind(4)
        .into_iter()
        .skip(1)
        .map(|k| change(k, 0, 0))
        .collect();
    let published = writer.apply(delta(3, cells, vec![]));
    assert!(published.cells.iter().all(CellValue::removed));
    let user = model.snapshot().user(4).cloned().unwrap();
    assert!(user.categories.is_empty() && user.merchants.is_empty());
    assert!(user.days.is_empty() && user.months.is_empty());
    assert_eq!((user.expense_count, user.total_minor), (1, 10));
}

#[test]
fn touching_an_existing_cell_publishes_its_value_unchanged() {
    let (model, mut writer) = ReadModel::new();
    let cells = every_kind(5)
        .into_iter()
        .map(|k| change(k, 2, 70))
        .collect();
    writer.apply(delta(1, cells, vec![]));
    let cells = every_kind(5).into_iter().map(|k| change(k, 0, 0)).collect();
    let published = writer.apply(delta(2, cells, vec![]));
    assert_eq!(published.cells.len(), 5);
    for cell in &published.cells {
        assert_eq!((cell.count, cell.sum), (2, 70), "{:?}", cell.key);
    }
    let snapshot = model.snapshot();
    for key in every_kind(5) {
        assert_eq!(snapshot.user(5).unwrap().cell(&key), (2, 70), "{key:?}");
    }
}

#[test]
fn totals_beyond_i64_are_exact_over_many_changes_and_come_back_into_range() {
    let (model, mut writer) = ReadModel::new();
    let keys = every_kind(8);
    // 10 epochs of i64::MAX each: far beyond i64, never wrapped.
    for epoch in 1..=10 {
        let cells = keys.iter().map(|k| change(*k, 1, i64::MAX)).collect();
        let published = writer.apply(delta(epoch, cells, vec![]));
        for cell in &published.cells {
            assert_eq!(cell.sum, i128::from(i64::MAX) * i128::from(epoch as i64));
            assert_eq!(cell.count, epoch as i64);
        }
    }
    let expected = i128::from(i64::MAX) * 10;
    let snapshot = model.snapshot();
    let user = snapshot.user(8).unwrap();
    assert_eq!(user.total_minor, expected);
    for key in &keys {
        assert_eq!(user.cell(key), (10, expected), "{key:?}");
    }
    assert_eq!(
        snapshot.top_spenders().next().map(|u| u.total_minor),
        Some(expected)
    );
    // Refunds (large negative amounts) bring every cell back into the i64 range, exactly.
    for epoch in 11..=19 {
        let cells = keys.iter().map(|k| change(*k, -1, -i64::MAX)).collect();
        writer.apply(delta(epoch, cells, vec![]));
    }
    let cells = keys.iter().map(|k| change(*k, 0, 5)).collect();
    let published = writer.apply(delta(20, cells, vec![]));
    for cell in &published.cells {
        assert_eq!((cell.count, cell.sum), (1, i128::from(i64::MAX) + 5));
    }
    let cells = keys.iter().map(|k| change(*k, 0, -10)).collect();
    let published = writer.apply(delta(21, cells, vec![]));
    for cell in &published.cells {
        assert_eq!((cell.count, cell.sum), (1, i128::from(i64::MAX) - 5));
        assert!(i64::try_from(cell.sum).is_ok());
    }
    // And below i64::MIN too.
    let cells = keys
        .iter()
        .flat_map(|k| [change(*k, 1, i64::MIN), change(*k, 1, i64::MIN)])
        .collect();
    let published = writer.apply(delta(22, cells, vec![]));
    for cell in &published.cells {
        assert_eq!(
            cell.sum,
            i128::from(i64::MAX) - 5 + 2 * i128::from(i64::MIN)
        );
    }
}

#[test]
fn cell_pages_walk_the_same_cells_as_the_whole_snapshot_in_the_same_order() {
    let (model, mut writer) = ReadModel::new();
    // Users with 1, 3 and 7 cells, so pages end inside users and at their edges.
    let mut cells = Vec::new();
    for user in 1..=30u64 {
        cells.push(change(AggKey::User(user), 1, user as i64));
        for day in 0..(user % 3) as i32 * 3 {
            cells.push(change(AggKey::Day(user, day), 1, 1));
        }
    }
    writer.apply(delta(1, cells, vec![]));
    let snapshot = model.snapshot();
    let selections: [&[UserId]; 4] = [&[], &[2, 3, 5, 8, 13, 21, 99], &[99], &[4]];
    for users in selections {
        let whole: Vec<_> = snapshot.cells(users).map(|c| c.key).collect();
        for max in [1, 2, 3, 5, 7, 100] {
            let (mut paged, mut from, mut pages) = (Vec::new(), CellCursor::default(), 0);
            loop {
                let (page, next) = snapshot.cell_page(users, from, max);
                pages += 1;
                assert!(page.len() <= max, "a page holds at most {max} cells");
                paged.extend(page.iter().map(|c| c.key));
                match next {
                    Some(next) => {
                        assert_eq!(page.len(), max, "only the last page is short");
                        from = next;
                    }
                    None => break,
                }
            }
            assert_eq!(paged, whole, "users {users:?}, pages of {max}");
            assert_eq!(pages, whole.len().div_ceil(max).max(1), "{users:?} {max}");
        }
    }
}

/// The cells a snapshot should hold by the model: each user's user cell (with its last event
/// time) first, then its other cells by key, users by id.
fn model_cells(
    model: &std::collections::BTreeMap<AggKey, Amount>,
    seen: &std::collections::BTreeMap<UserId, Option<i64>>,
) -> Vec<CellValue> {
    let users: std::collections::BTreeSet<UserId> = model.keys().map(AggKey::user_id).collect();
    let mut out = Vec::new();
    for user in users {
        let (count, sum) = model.get(&AggKey::User(user)).copied().unwrap_or((0, 0));
        out.push(CellValue {
            key: AggKey::User(user),
            count,
            sum,
            last_event_ms: seen.get(&user).copied().flatten(),
        });
        let mut others: Vec<_> = model
            .iter()
            .filter(|(k, _)| k.user_id() == user && !matches!(k, AggKey::User(_)))
            .collect();
        others.sort_by_key(|(k, _)| **k);
        out.extend(others.into_iter().map(|(key, (count, sum))| CellValue {
            key: *key,
            count: *count,
            sum: *sum,
            last_event_ms: None,
        }));
    }
    out
}

/// Random deltas (repeated keys, zero changes, retractions to exactly zero, users coming and
/// going, last-seen times alone) against a `BTreeMap` oracle: the published values, every
/// snapshot's cells, lookups, windows, top spenders and live expenses agree with it, and an
/// earlier snapshot never changes.
#[test]
fn compact_maps_agree_with_a_btreemap_model_under_random_changes() {
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    let names: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| spendflow_operators::Name::intern(&format!("oracle {n}")).0)
        .collect();
    for seed in 0..40 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (model, mut writer) = ReadModel::new();
        let mut oracle: BTreeMap<AggKey, Amount> = BTreeMap::new();
        let mut seen: BTreeMap<UserId, Option<i64>> = BTreeMap::new();
        let mut earlier: Option<(Arc<Snapshot>, Vec<CellValue>)> = None;
        for epoch in 1..=60 {
            let mut cells = Vec::new();
            for _ in 0..rng.random_range(0..25) {
                if !oracle.is_empty() && rng.random_bool(0.3) {
                    // Retract an existing cell to exactly zero, sometimes in two steps.
                    let at = rng.random_range(0..oracle.len());
                    let (key, (count, sum)) = oracle.iter().nth(at).map(|(k, v)| (*k, *v)).unwrap();
                    let Ok(sum) = i64::try_from(sum) else {
                        continue;
                    };
                    if rng.random_bool(0.5) {
                        cells.push(change(key, -count, -sum));
                    } else {
                        cells.push(change(key, -1, -sum / 2));
                        cells.push(change(key, 1 - count, sum / 2 - sum));
                    }
                    continue;
                }
                let user = rng.random_range(1..=6);
                let key = match rng.random_range(0..5) {
                    0 => AggKey::User(user),
                    1 => AggKey::Category(user, names[rng.random_range(0..4)]),
                    2 => AggKey::Merchant(user, names[rng.random_range(0..4)]),
                    3 => AggKey::Day(user, rng.random_range(-3..12)),
                    _ => AggKey::Month(user, rng.random_range(0..3)),
                };
                let (count, sum) = if rng.random_bool(0.15) {
                    (0, 0)
                } else {
                    (rng.random_range(-2..=3), rng.random_range(-100..=400))
                };
                cells.push(change(key, count, sum));
            }
            let last_seen: Vec<_> = (0..rng.random_range(0..3))
                .map(|_| LastSeen {
                    user_id: rng.random_range(1..=7),
                    event_ms: rng.random_bool(0.8).then(|| rng.random_range(0..1_000)),
                })
                .collect();

            // The oracle.
            let mut touched = std::collections::BTreeSet::new();
            for c in &cells {
                let value = oracle.entry(c.key).or_insert((0, 0));
                *value = (value.0 + c.count, value.1 + i128::from(c.sum));
                if *value == (0, 0) {
                    oracle.remove(&c.key);
                }
                touched.insert(c.key);
            }
            for s in &last_seen {
                seen.insert(s.user_id, s.event_ms);
                touched.insert(AggKey::User(s.user_id));
            }
            // Published with the user cell even when the user is gone after this epoch.
            let published_seen = seen.clone();
            let last_published = |user: UserId| published_seen.get(&user).copied().flatten();
            // A user without cells is gone, and so is its last event time.
            seen.retain(|user, _| oracle.keys().any(|k| k.user_id() == *user));

            let published = writer.apply(delta(epoch, cells, last_seen.clone()));
            let expected: Vec<CellValue> = touched
                .iter()
                .map(|key| {
                    let (count, sum) = oracle.get(key).copied().unwrap_or((0, 0));
                    let last_event_ms = match key {
                        AggKey::User(user) => last_published(*user),
                        _ => None,
                    };
                    CellValue {
                        key: *key,
                        count,
                        sum,
                        last_event_ms,
                    }
                })
                .collect();
            assert_eq!(published.cells, expected, "seed {seed} epoch {epoch}");

            let snapshot = model.snapshot();
            let all = model_cells(&oracle, &seen);
            assert_eq!(
                snapshot.cells(&[]).collect::<Vec<_>>(),
                all,
                "seed {seed} epoch {epoch}"
            );
            let users: std::collections::BTreeSet<UserId> =
                oracle.keys().map(AggKey::user_id).collect();
            assert_eq!(snapshot.user_count(), users.len());
            let live: i64 = users
                .iter()
                .map(|u| oracle.get(&AggKey::User(*u)).map_or(0, |v| v.0))
                .sum();
            assert_eq!(snapshot.live_expenses(), live);
            let mut by_total: Vec<_> = users
                .iter()
                .map(|u| {
                    (
                        std::cmp::Reverse(oracle.get(&AggKey::User(*u)).map_or(0, |v| v.1)),
                        *u,
                    )
                })
                .collect();
            by_total.sort();
            let top: Vec<_> = snapshot.top_spenders().map(|u| u.user_id).collect();
            assert_eq!(top, by_total.iter().map(|(_, u)| *u).collect::<Vec<_>>());
            for user in 1..=7 {
                let Some(aggregates) = snapshot.user(user) else {
                    assert!(!users.contains(&user));
                    continue;
                };
                for name in &names {
                    for key in [AggKey::Category(user, *name), AggKey::Merchant(user, *name)] {
                        assert_eq!(
                            aggregates.cell(&key),
                            oracle.get(&key).copied().unwrap_or((0, 0))
                        );
                    }
                }
                let (from, to) = (rng.random_range(-4..13), rng.random_range(-4..13));
                let days: Vec<_> = aggregates.days.range(from..=to).collect();
                let expected: Vec<_> = (from..=to)
                    .filter_map(|d| oracle.get(&AggKey::Day(user, d)).map(|v| (d, *v)))
                    .collect();
                assert_eq!(days, expected, "days {from}..={to}");
                let days: Vec<_> = aggregates.days.range(from..to).collect();
                let expected: Vec<_> = (from..to)
                    .filter_map(|d| oracle.get(&AggKey::Day(user, d)).map(|v| (d, *v)))
                    .collect();
                assert_eq!(days, expected, "days {from}..{to}");
            }
            if let Some((snapshot, cells)) = &earlier {
                assert_eq!(
                    &snapshot.cells(&[]).collect::<Vec<_>>(),
                    cells,
                    "an earlier snapshot changed"
                );
            }
            earlier = Some((snapshot, all));
        }
    }
}

/// Allocation counting for [`measure_bytes_per_user_and_publish_cost`]: counts only on a thread
/// that asked for it, so the other tests of this binary (running in parallel) are not counted
/// and pay one thread-local read per allocation. Test-only; the one `unsafe` of the engine's
/// tests, forwarding to `System` unchanged.
#[allow(unsafe_code)]
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        static ALLOCS: Cell<u64> = const { Cell::new(0) };
        static ALLOCATED: Cell<u64> = const { Cell::new(0) };
        static FREED: Cell<u64> = const { Cell::new(0) };
    }

    fn count(allocs: u64, allocated: u64, freed: u64) {
        let _ = ON.try_with(|on| {
            if on.get() {
                ALLOCS.with(|c| c.set(c.get() + allocs));
                ALLOCATED.with(|c| c.set(c.get() + allocated));
                FREED.with(|c| c.set(c.get() + freed));
            }
        });
    }

    // SAFETY: every call is forwarded to `System` unchanged; the counters are thread-local
    // `Cell`s with const initialisers, which never allocate.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(1, layout.size() as u64, 0);
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(0, 0, layout.size() as u64);
            // SAFETY: forwarded with the caller's pointer and layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(1, new_size as u64, layout.size() as u64);
            // SAFETY: forwarded with the caller's arguments.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// `(allocations, bytes allocated, bytes freed)` on this thread since counting started.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Counts {
        pub allocs: u64,
        pub allocated: u64,
        pub freed: u64,
    }

    impl Counts {
        pub fn live(self) -> i64 {
            self.allocated as i64 - self.freed as i64
        }
        pub fn since(self, earlier: Counts) -> Counts {
            Counts {
                allocs: self.allocs - earlier.allocs,
                allocated: self.allocated - earlier.allocated,
                freed: self.freed - earlier.freed,
            }
        }
    }

    pub fn start() {
        ON.with(|on| on.set(true));
    }

    pub fn now() -> Counts {
        Counts {
            allocs: ALLOCS.with(Cell::get),
            allocated: ALLOCATED.with(Cell::get),
            freed: FREED.with(Cell::get),
        }
    }
}

/// Not an assertion, a measurement (`cargo test -p spendflow-engine --lib
/// read_model::tests::measure -- --ignored --nocapture`): the bytes a user with 5 categories, 5
/// merchants, 30 days and 2 months costs in a snapshot, and the allocations, bytes allocated and
/// CPU time per touched user of publishing epochs in which each touched user gets one expense.
/// The numbers are in PERF-NOTES.md / bench/README.md.
#[test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
fn measure_bytes_per_user_and_publish_cost() {
    const USERS: u64 = 20_000;
    const PER_EPOCH: u64 = 1_000;
    let categories: Vec<_> = (0..5)
        .map(|i| spendflow_operators::Name::intern(&format!("measure category {i}")).0)
        .collect();
    let merchants: Vec<_> = (0..5)
        .map(|i| spendflow_operators::Name::intern(&format!("measure merchant {i}")).0)
        .collect();
    let first_day = 20_000;
    // One expense of a user: every kind of cell, the way the dataflow changes them.
    let expense = |user: UserId, i: i32, amount: i64| {
        let day = first_day + i % 30;
        vec![
            change(AggKey::User(user), 1, amount),
            change(
                AggKey::Category(user, categories[i as usize % 5]),
                1,
                amount,
            ),
            change(
                AggKey::Merchant(user, merchants[(i as usize / 5) % 5]),
                1,
                amount,
            ),
            change(AggKey::Day(user, day), 1, amount),
            change(AggKey::Month(user, 657 + day / 30 % 2), 1, amount),
        ]
    };
    let seen = |user: UserId, i: i32| LastSeen {
        user_id: user,
        event_ms: Some(1_000 * i64::from(i)),
    };

    counting::start();
    let before = counting::now();
    let (model, mut writer) = ReadModel::new();
    let mut epoch = 0;
    // 30 expenses per user (every day, category, merchant, both months), users in batches.
    for batch in 0..USERS / PER_EPOCH {
        for i in 0..30 {
            epoch += 1;
            let users = batch * PER_EPOCH..(batch + 1) * PER_EPOCH;
            let cells = users.clone().flat_map(|u| expense(u, i, 100)).collect();
            let last_seen = users.map(|u| seen(u, i)).collect();
            writer.apply(delta(epoch, cells, last_seen));
        }
    }
    // Empty epochs push the filled epochs out of the history and the broadcast channel, so
    // what stays allocated is the snapshot (and a constant).
    for _ in 0..2 * 1024 {
        epoch += 1;
        writer.apply(delta(epoch, vec![], vec![]));
    }
    let snapshot = model.snapshot();
    let user = snapshot.user(0).unwrap();
    assert_eq!(
        (
            user.categories.len(),
            user.merchants.len(),
            user.days.len(),
            user.months.len()
        ),
        (5, 5, 30, 2)
    );
    let live = counting::now().since(before).live();
    println!(
        "snapshot of {USERS} users (5 categories, 5 merchants, 30 days, 2 months each): \
         {live} bytes live, {} bytes per user",
        live / USERS as i64
    );

    // Publishing: epochs of PER_EPOCH users with one more expense each, on a day, category,
    // merchant and month they already have, spread over all users.
    let rounds = 20;
    let start = counting::now();
    let clock = std::time::Instant::now();
    let cpu = thread_cpu_ns();
    for round in 0..rounds {
        epoch += 1;
        let users = (0..PER_EPOCH).map(|k| (k * (USERS / PER_EPOCH) + round) % USERS);
        let cells = users.clone().flat_map(|u| expense(u, 7, 1)).collect();
        let last_seen = users.map(|u| seen(u, 40)).collect();
        writer.apply(delta(epoch, cells, last_seen));
    }
    let elapsed = clock.elapsed();
    let cpu = thread_cpu_ns().zip(cpu).map(|(end, start)| end - start);
    let cost = counting::now().since(start);
    let touched = (rounds * PER_EPOCH) as f64;
    println!(
        "publish, {PER_EPOCH} touched users per epoch (one expense each) over {USERS} users: \
         {:.1} allocations, {:.0} bytes allocated, {} ns CPU and {:.0} ns wall clock per touched \
         user ({} build)",
        cost.allocs as f64 / touched,
        cost.allocated as f64 / touched,
        cpu.map_or("?".to_string(), |ns| format!("{:.0}", ns as f64 / touched)),
        elapsed.as_nanos() as f64 / touched,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
}

/// CPU time of this thread, ns (Linux: the first field of `/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

mod reference {
    use std::collections::BTreeMap;

    use spendflow_operators::reference::{
        AlertEvent, AlertState, Converted, RateChange, UserRef, UserRow,
    };

    use super::*;

    fn row(budget: Option<i64>, currency: &[u8; 3]) -> UserRow {
        UserRow {
            budget_minor: budget,
            currency: *currency,
        }
    }

    fn event(user_id: UserId, month: i32, threshold_pct: u8, state: AlertState) -> AlertEvent {
        AlertEvent {
            user_id,
            month,
            threshold_pct,
            state,
            spent_minor: 850,
            budget_minor: 1000,
            currency: *b"EUR",
        }
    }

    #[test]
    fn refs_rates_and_converted_totals_are_applied_and_removed() {
        let (model, mut writer) = ReadModel::new();
        writer.set_reporting_currency(Some(*b"EUR"));
        assert_eq!(model.snapshot().reporting_currency(), Some(*b"EUR"));
        writer.apply(EpochDelta {
            users: vec![
                UserRef {
                    user_id: 1,
                    row: Some(row(Some(500), b"USD")),
                },
                UserRef {
                    user_id: 2,
                    row: Some(row(None, b"EUR")),
                },
                UserRef {
                    user_id: 1,
                    row: Some(row(Some(1000), b"USD")),
                },
            ],
            rates: vec![
                RateChange {
                    currency: *b"USD",
                    rate_micros: Some(900_000),
                },
                RateChange {
                    currency: *b"GBP",
                    rate_micros: Some(1_150_000),
                },
            ],
            converted: vec![
                Converted {
                    user_id: 1,
                    total_minor: Some(90),
                },
                Converted {
                    user_id: 2,
                    total_minor: Some(300),
                },
                Converted {
                    user_id: 3,
                    total_minor: Some(90),
                },
            ],
            ..delta(1, vec![], vec![])
        });
        let snapshot = model.snapshot();
        assert_eq!(snapshot.reporting_currency(), Some(*b"EUR"));
        assert_eq!(
            snapshot.user_ref(1),
            Some(&row(Some(1000), b"USD")),
            "later wins"
        );
        assert_eq!(snapshot.user_ref(2), Some(&row(None, b"EUR")));
        assert_eq!(snapshot.fx_rate(*b"USD"), Some(900_000));
        assert_eq!(snapshot.converted(2), Some(300));
        assert_eq!(
            snapshot.top_converted().collect::<Vec<_>>(),
            vec![(2, 300), (1, 90), (3, 90)],
            "largest first, ties by user"
        );

        writer.apply(EpochDelta {
            users: vec![UserRef {
                user_id: 2,
                row: None,
            }],
            rates: vec![RateChange {
                currency: *b"GBP",
                rate_micros: None,
            }],
            converted: vec![
                Converted {
                    user_id: 2,
                    total_minor: None,
                },
                Converted {
                    user_id: 1,
                    total_minor: Some(400),
                },
            ],
            ..delta(2, vec![], vec![])
        });
        let snapshot = model.snapshot();
        assert_eq!(snapshot.user_ref(2), None);
        assert_eq!(snapshot.fx_rate(*b"GBP"), None);
        assert_eq!(snapshot.fx_rate(*b"USD"), Some(900_000));
        assert_eq!(snapshot.converted(2), None);
        assert_eq!(
            snapshot.top_converted().collect::<Vec<_>>(),
            vec![(1, 400), (3, 90)]
        );
    }

    #[test]
    fn fired_alerts_are_kept_with_their_epoch_and_current_spend_and_budget() {
        let (model, mut writer) = ReadModel::new();
        let month = 2026 * 12 + 10;
        writer.apply(EpochDelta {
            users: vec![UserRef {
                user_id: 7,
                row: Some(row(Some(1000), b"EUR")),
            }],
            alerts: vec![(3, event(7, month, 80, AlertState::Fired))],
            ..delta(
                3,
                vec![
                    change(AggKey::User(7), 1, 850),
                    change(AggKey::Month(7, month), 1, 850),
                ],
                vec![],
            )
        });
        let snapshot = model.snapshot();
        let alerts: Vec<AlertView> = snapshot.alerts(None).copied().collect();
        assert_eq!(
            alerts,
            vec![AlertView {
                user_id: 7,
                month,
                threshold_pct: 80,
                spent_minor: 850,
                budget_minor: 1000,
                currency: *b"EUR",
                since_epoch: 3,
            }]
        );
        assert_eq!(snapshot.alerted_users(), 1);

        // More spend (under 100 %) and then a higher budget, while the alert stays fired: the
        // view follows both; its epoch stays the one it fired at.
        writer.apply(delta(
            4,
            vec![
                change(AggKey::User(7), 1, 100),
                change(AggKey::Month(7, month), 1, 100),
            ],
            vec![],
        ));
        let view = *model.snapshot().alerts(Some(7)).next().unwrap();
        assert_eq!((view.spent_minor, view.since_epoch), (950, 3));
        writer.apply(EpochDelta {
            users: vec![UserRef {
                user_id: 7,
                row: Some(row(Some(1150), b"EUR")),
            }],
            ..delta(5, vec![], vec![])
        });
        let view = *model.snapshot().alerts(Some(7)).next().unwrap();
        assert_eq!((view.spent_minor, view.budget_minor), (950, 1150));

        // The 100 % alert fires and the 80 % one is cleared in one delta of two epochs.
        writer.apply(EpochDelta {
            alerts: vec![
                (6, event(7, month, 100, AlertState::Fired)),
                (7, event(7, month, 80, AlertState::Cleared)),
            ],
            ..delta(7, vec![], vec![])
        });
        let snapshot = model.snapshot();
        let keys: Vec<(UserId, u8, Epoch)> = snapshot
            .alerts(None)
            .map(|a| (a.user_id, a.threshold_pct, a.since_epoch))
            .collect();
        assert_eq!(keys, vec![(7, 100, 6)]);
        assert_eq!(
            snapshot.alerts(None).next().unwrap().spent_minor,
            950,
            "the month cell's value, not the event's"
        );
        assert!(snapshot.alerts(Some(8)).next().is_none());
    }

    #[test]
    fn alert_changes_are_published_and_resumable_from_history() {
        let (model, mut writer) = ReadModel::new();
        for epoch in 1..=3u64 {
            writer.apply(EpochDelta {
                alerts: vec![(epoch, event(epoch, 100, 80, AlertState::Fired))],
                ..delta(epoch, vec![], vec![])
            });
        }
        let (start, mut receiver) = model.subscribe_alerts(Some(1));
        let AlertSubscriptionStart::Replay(replay) = start else {
            panic!("epoch 1 is in the history");
        };
        let epochs: Vec<Epoch> = replay.iter().map(|p| p.as_of.epoch).collect();
        assert_eq!(epochs, vec![2, 3]);
        assert_eq!(
            replay[0].alerts,
            vec![(2, event(2, 100, 80, AlertState::Fired))]
        );
        writer.apply(delta(4, vec![], vec![]));
        let next = receiver.try_recv().unwrap();
        assert_eq!(
            (next.as_of.epoch, next.alerts.len()),
            (4, 0),
            "every epoch is published, with or without alert changes"
        );
        let (start, _) = model.subscribe_alerts(None);
        assert!(matches!(start, AlertSubscriptionStart::Snapshot(s) if s.as_of().epoch == 4));
    }

    #[test]
    fn the_alert_history_is_bounded() {
        let (model, mut writer) = ReadModel::new();
        for epoch in 1..=(HISTORY_EPOCHS as u64 + 10) {
            writer.apply(delta(epoch, vec![], vec![]));
        }
        assert_eq!(model.alert_history.lock().len(), HISTORY_EPOCHS);
        // Epoch 1's successors are gone: a snapshot, not a replay with a gap.
        let (start, _) = model.subscribe_alerts(Some(1));
        assert!(matches!(start, AlertSubscriptionStart::Snapshot(_)));
        let (start, _) = model.subscribe_alerts(Some(20));
        assert!(
            matches!(start, AlertSubscriptionStart::Replay(r) if r.len() == HISTORY_EPOCHS + 10 - 20)
        );
    }

    #[test]
    fn alert_pages_resume_after_the_cursor_within_the_user() {
        let (model, mut writer) = ReadModel::new();
        let alerts = [(1, 5, 80), (1, 5, 100), (1, 6, 80), (2, 5, 80), (3, 1, 100)]
            .into_iter()
            .map(|(u, m, t)| (1, event(u, m, t, AlertState::Fired)))
            .collect();
        writer.apply(EpochDelta {
            alerts,
            ..delta(1, vec![], vec![])
        });
        let snapshot = model.snapshot();
        let keys = |user, after| {
            snapshot
                .alerts_after(user, after)
                .map(|a| (a.user_id, a.month, a.threshold_pct))
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(None, Some((1, 6, 80))), vec![(2, 5, 80), (3, 1, 100)]);
        assert_eq!(
            keys(Some(1), Some((1, 5, 80))),
            vec![(1, 5, 100), (1, 6, 80)]
        );
        assert_eq!(keys(Some(2), Some((1, 6, 80))), vec![(2, 5, 80)]);
        assert_eq!(keys(Some(1), Some((1, 6, 80))), vec![]);
        assert_eq!(keys(Some(1), Some((2, 0, 0))), vec![]);
        assert_eq!(keys(Some(4), None), vec![]);
    }

    /// Random deltas of cells, reference rows, converted totals and alert changes: the
    /// converted ranking is a from-scratch sort of the converted map, and the fired alerts are
    /// exactly the set the events leave fired, with the current month spend and budget.
    #[test]
    fn converted_ranking_and_fired_alerts_agree_with_a_from_scratch_model() {
        use rand::{Rng, SeedableRng};

        for seed in 0..40 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let (model, mut writer) = ReadModel::new();
            writer.set_reporting_currency(Some(*b"EUR"));
            let mut converted: BTreeMap<UserId, i128> = BTreeMap::new();
            let mut fired: BTreeMap<(UserId, i32, u8), Epoch> = BTreeMap::new();
            let mut refs: BTreeMap<UserId, UserRow> = BTreeMap::new();
            let mut months: BTreeMap<(UserId, i32), i128> = BTreeMap::new();
            let mut epoch = 0;
            for _ in 0..60 {
                let first = epoch + 1;
                epoch += rng.random_range(1..=3);
                let mut d = delta(epoch, vec![], vec![]);
                for _ in 0..rng.random_range(0..8) {
                    let user = rng.random_range(1..=8);
                    let total = rng
                        .random_bool(0.8)
                        .then(|| i128::from(rng.random_range(-5..50i64)));
                    match total {
                        Some(t) => converted.insert(user, t),
                        None => converted.remove(&user),
                    };
                    d.converted.push(Converted {
                        user_id: user,
                        total_minor: total,
                    });
                }
                for _ in 0..rng.random_range(0..4) {
                    let user = rng.random_range(1..=8);
                    let value = rng.random_bool(0.8).then(|| {
                        row(
                            rng.random_bool(0.7).then(|| rng.random_range(1..2000)),
                            if rng.random_bool(0.5) { b"EUR" } else { b"USD" },
                        )
                    });
                    match value {
                        Some(r) => refs.insert(user, r),
                        None => refs.remove(&user),
                    };
                    d.users.push(UserRef {
                        user_id: user,
                        row: value,
                    });
                }
                for _ in 0..rng.random_range(0..6) {
                    let user = rng.random_range(1..=8);
                    let month = rng.random_range(0..3);
                    let sum = rng.random_range(1..300);
                    *months.entry((user, month)).or_default() += i128::from(sum);
                    d.cells.push(change(AggKey::User(user), 1, sum));
                    d.cells.push(change(AggKey::Month(user, month), 1, sum));
                }
                for e in first..=epoch {
                    for _ in 0..rng.random_range(0..3) {
                        let key = (
                            rng.random_range(1..=8),
                            rng.random_range(0..3),
                            [80, 100][rng.random_range(0..2)],
                        );
                        // Events are changes: a fired alert can only clear and vice versa.
                        let state = if fired.remove(&key).is_some() {
                            AlertState::Cleared
                        } else {
                            fired.insert(key, e);
                            AlertState::Fired
                        };
                        d.alerts.push((e, event(key.0, key.1, key.2, state)));
                    }
                }
                writer.apply(d);

                let snapshot = model.snapshot();
                let mut expected: Vec<(UserId, i128)> =
                    converted.iter().map(|(u, t)| (*u, *t)).collect();
                expected.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                assert_eq!(
                    snapshot.top_converted().collect::<Vec<_>>(),
                    expected,
                    "seed {seed}"
                );
                let expected: Vec<AlertView> = fired
                    .iter()
                    .map(|(&(user_id, month, threshold_pct), &since_epoch)| {
                        let r = refs.get(&user_id);
                        AlertView {
                            user_id,
                            month,
                            threshold_pct,
                            spent_minor: months.get(&(user_id, month)).copied().unwrap_or(0),
                            budget_minor: r.and_then(|r| r.budget_minor).unwrap_or(0),
                            currency: r.map_or(*b"???", |r| r.currency),
                            since_epoch,
                        }
                    })
                    .collect();
                assert_eq!(
                    snapshot.alerts(None).copied().collect::<Vec<_>>(),
                    expected,
                    "seed {seed}"
                );
                let users: std::collections::BTreeSet<UserId> = fired.keys().map(|k| k.0).collect();
                assert_eq!(snapshot.alerted_users(), users.len(), "seed {seed}");
            }
        }
    }
}
