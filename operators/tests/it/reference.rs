//! Reference data: on seeded random streams that interleave expense records (upserts,
//! corrections, deletes, duplicates, refunds, late events in old months) with reference changes
//! (budgets set, `NULL`, zero, negative, changed and deleted; currencies changed; rates set,
//! changed and deleted; duplicates; several changes of a key in one epoch), cut into random
//! epochs, with 1 and 2 workers, at every closed epoch:
//!
//! * the alert events so far, applied in order, give the oracle's fired set, every event is a
//!   real transition (never `Fired` when fired, never `Cleared` when not), and carries the
//!   spend, budget and currency the oracle has at the end of its epoch;
//! * the converted totals and the converted ranking equal the oracle's;
//! * the user rows and rates equal the oracle's, every reported change is a real change;
//! * the union over workers has each user, rate, alert and converted total at most once.
//!
//! And a checkpoint taken at an epoch on 2 workers, restored on 1 and on 3 workers and fed the
//! rest of the stream, gives the same at every later epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spendflow_operators::AggKey;
use spendflow_operators::model::{Expense, ExpenseId, MS_PER_DAY, Record, UserId};
use spendflow_operators::oracle::{Aggregates, Input, Joined, joined, ranking, recompute};
use spendflow_operators::reference::{
    AlertState, Currency, DataflowOptions, RefChange, RefKey, RefValue, UserRow,
};
use spendflow_operators::runtime::execute;
use spendflow_operators::upsert::LiveSnapshot;
use spendflow_operators::{ClosedEpoch, Epoch, Fact};

const REPORTING: Currency = *b"EUR";
const CURRENCIES: &[Currency] = &[*b"EUR", *b"USD", *b"GBP", *b"JPY"];
const CATEGORIES: &[&str] = &["groceries", "travel", "fuel"];
const MERCHANTS: &[&str] = &["Tesco", "Aldi", "Shell", "KLM"];

fn eid(text: &str) -> ExpenseId {
    ExpenseId::new(text).expect("a short id")
}

/// A random interleaved stream cut into epochs.
fn random_stream(seed: u64, inputs: usize, users: u64) -> Vec<Vec<Input>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sent: Vec<Input> = Vec::new();
    let mut epochs = vec![Vec::new()];
    let base_ms = 1_764_000_000_000_i64;
    for i in 0..inputs {
        let fresh = |rng: &mut ChaCha8Rng, id: ExpenseId, user: u64| {
            // Late events land in earlier months (up to ~3 months back).
            let offset = if rng.random_bool(0.15) {
                -rng.random_range(0..90 * MS_PER_DAY)
            } else {
                0
            };
            Record::Upsert(Expense {
                expense_id: id,
                user_id: user,
                card_id: None,
                merchant: Arc::from(MERCHANTS[rng.random_range(0..MERCHANTS.len())]),
                category: Arc::from(CATEGORIES[rng.random_range(0..CATEGORIES.len())]),
                amount_minor: if rng.random_bool(0.1) {
                    -rng.random_range(1..20_000)
                } else {
                    rng.random_range(1..50_000)
                },
                currency: *b"EUR",
                event_ms: base_ms + i as i64 * 7_200_000 + offset,
            })
        };
        let records: Vec<&Record> = sent
            .iter()
            .filter_map(|input| match input {
                Input::Record(r) => Some(r),
                Input::Reference(_) => None,
            })
            .collect();
        let roll = rng.random_range(0..100);
        let input = if roll < 8 && !sent.is_empty() {
            // Duplicate delivery of anything sent earlier.
            sent[rng.random_range(0..sent.len())].clone()
        } else if roll < 18 {
            Input::Reference(random_user_change(&mut rng, users))
        } else if roll < 20 && !records.is_empty() {
            // A budget exactly at a month's spend: the 100% threshold sits on its boundary.
            let cells = recompute(records.iter().copied()).cells;
            let months: Vec<_> = cells
                .iter()
                .filter_map(|(key, (count, sum))| match key {
                    AggKey::Month(user, _) if *count > 0 && *sum > 0 => Some((*user, *sum)),
                    _ => None,
                })
                .collect();
            match months.get(rng.random_range(0..months.len().max(1))) {
                Some((user, sum)) => Input::Reference(RefChange {
                    key: RefKey::User(*user),
                    value: Some(RefValue::User {
                        budget_minor: Some(*sum),
                        currency: REPORTING,
                    }),
                }),
                None => Input::Reference(random_user_change(&mut rng, users)),
            }
        } else if roll < 25 {
            Input::Reference(random_rate_change(&mut rng))
        } else if roll < 40 && !records.is_empty() {
            let earlier = records[rng.random_range(0..records.len())];
            Input::Record(fresh(
                &mut rng,
                eid(earlier.expense_id()),
                earlier.user_id(),
            ))
        } else if roll < 50 && !records.is_empty() {
            let earlier = records[rng.random_range(0..records.len())];
            Input::Record(Record::Delete {
                expense_id: eid(earlier.expense_id()),
                user_id: earlier.user_id(),
            })
        } else {
            let user = rng.random_range(1..=users);
            Input::Record(fresh(&mut rng, eid(&format!("e-{i}")), user))
        };
        sent.push(input.clone());
        epochs.last_mut().unwrap().push(input);
        if rng.random_bool(0.04) {
            // Sometimes an empty epoch.
            epochs.push(Vec::new());
            if rng.random_bool(0.1) {
                epochs.push(Vec::new());
            }
        }
    }
    epochs
}

fn random_user_change(rng: &mut ChaCha8Rng, users: u64) -> RefChange {
    // One more user than the records name: a row without expenses.
    let user = rng.random_range(1..=users + 1);
    let value = if rng.random_bool(0.1) {
        None
    } else {
        let budget_minor = match rng.random_range(0..10) {
            0 => None,
            1 => Some(0),
            2 => Some(-rng.random_range(1..100_000)),
            _ => Some(rng.random_range(10_000..600_000)),
        };
        // Mostly the reporting currency, so alerts and conversions meet often.
        let currency = if rng.random_bool(0.5) {
            REPORTING
        } else {
            CURRENCIES[rng.random_range(0..CURRENCIES.len())]
        };
        Some(RefValue::User {
            budget_minor,
            currency,
        })
    };
    RefChange {
        key: RefKey::User(user),
        value,
    }
}

fn random_rate_change(rng: &mut ChaCha8Rng) -> RefChange {
    // The reporting currency's own row too: it must not matter.
    let currency = CURRENCIES[rng.random_range(0..CURRENCIES.len())];
    let value = if rng.random_bool(0.2) {
        None
    } else {
        // Half-unit rates put odd totals exactly halfway between two minor units.
        let rate_micros = if rng.random_bool(0.4) {
            [500_000, 1_500_000, 2_500_000][rng.random_range(0..3)]
        } else {
            rng.random_range(1..3_000_000)
        };
        Some(RefValue::Fx { rate_micros })
    };
    RefChange {
        key: RefKey::Fx(currency),
        value,
    }
}

/// A checkpoint: live expenses and reference rows.
#[derive(Clone, Debug, Default)]
struct Checkpoint {
    live: Vec<(ExpenseId, Fact)>,
    reference: Vec<(RefKey, RefValue)>,
}

/// Runs the stream on `workers` workers, closing and draining every epoch in lockstep.
/// Records are pushed by the worker that "reads" their user, reference changes all by worker 0.
/// With `restore = Some((at, checkpoint))`, starts at epoch `at` with the checkpoint (spread
/// over the workers) instead of the inputs up to `at`. With `snapshot_at`, also returns each
/// worker's copies.
fn run(
    epochs: Arc<Vec<Vec<Input>>>,
    workers: usize,
    options: DataflowOptions,
    restore: Option<(Epoch, Arc<Checkpoint>)>,
    snapshot_at: Option<Epoch>,
) -> Vec<(Vec<ClosedEpoch>, Vec<LiveSnapshot>)> {
    execute(workers, move |ctx| {
        let mut dataflow = ctx.build_dataflow_with_options(Default::default(), options);
        let (index, peers) = (ctx.index(), ctx.peers());
        let start = restore.as_ref().map_or(0, |(at, _)| *at);
        if let Some(at) = snapshot_at {
            dataflow.request_snapshot(at);
        }
        let mut drained = Vec::new();
        let mut copies = Vec::new();
        dataflow.advance_to(start);
        for (epoch, inputs) in epochs.iter().enumerate().skip(start as usize) {
            match &restore {
                Some((at, checkpoint)) if *at == epoch as Epoch => {
                    for (id, fact) in checkpoint.live.iter().skip(index).step_by(peers) {
                        dataflow.push_live(id.clone(), *fact);
                    }
                    for (key, value) in checkpoint.reference.iter().skip(index).step_by(peers) {
                        dataflow.push_live_reference(*key, *value);
                    }
                }
                _ => {
                    for input in inputs {
                        match input {
                            Input::Record(r) if r.user_id() % peers as u64 == index as u64 => {
                                dataflow.push(r.clone())
                            }
                            Input::Reference(change) if index == 0 => {
                                dataflow.push_reference(*change)
                            }
                            _ => {}
                        }
                    }
                }
            }
            dataflow.advance_to(epoch as Epoch + 1);
            while dataflow.is_behind() {
                ctx.step();
            }
            copies.extend(dataflow.take_snapshots());
            let closed = dataflow.drain_closed();
            assert!(closed.windows(2).all(|w| w[0].epoch < w[1].epoch));
            assert_eq!(closed.last().map(|c| c.epoch), Some(epoch as Epoch));
            drained.extend(closed);
        }
        (drained, copies)
    })
    .expect("workers ran")
}

/// What a consumer of the closed epochs builds from them.
#[derive(Debug, Default)]
struct Served {
    aggregates: Aggregates,
    users: BTreeMap<UserId, UserRow>,
    rates: BTreeMap<Currency, i64>,
    fired: BTreeSet<(UserId, i32, u8)>,
    converted: BTreeMap<UserId, i128>,
    /// Alert events seen, to tell a test saw some of each kind.
    fired_events: usize,
    cleared_events: usize,
}

impl Served {
    /// Applies every worker's entry of `epoch` and checks it against the oracle at `epoch`.
    fn apply_and_check(&mut self, epoch: Epoch, entries: &[&ClosedEpoch], oracle: &Joined) {
        let (mut users, mut rates, mut alerts, mut converted) = (
            BTreeSet::new(),
            BTreeSet::new(),
            BTreeSet::new(),
            BTreeSet::new(),
        );
        for closed in entries {
            self.aggregates.apply(closed);
            for change in &closed.users {
                assert!(users.insert(change.user_id), "epoch {epoch}: user twice");
                let before = self.users.get(&change.user_id).copied();
                assert_ne!(before, change.row, "epoch {epoch}: no change {change:?}");
                match change.row {
                    Some(row) => self.users.insert(change.user_id, row),
                    None => self.users.remove(&change.user_id),
                };
            }
            for change in &closed.rates {
                assert!(rates.insert(change.currency), "epoch {epoch}: rate twice");
                let before = self.rates.get(&change.currency).copied();
                assert_ne!(before, change.rate_micros, "epoch {epoch}: no change");
                match change.rate_micros {
                    Some(rate) => self.rates.insert(change.currency, rate),
                    None => self.rates.remove(&change.currency),
                };
            }
            for event in &closed.alerts {
                let key = (event.user_id, event.month, event.threshold_pct);
                assert!(alerts.insert(key), "epoch {epoch}: alert twice");
                match event.state {
                    AlertState::Fired => {
                        assert!(
                            self.fired.insert(key),
                            "epoch {epoch}: fired twice {event:?}"
                        );
                        self.fired_events += 1;
                    }
                    AlertState::Cleared => {
                        assert!(
                            self.fired.remove(&key),
                            "epoch {epoch}: cleared unfired {event:?}"
                        );
                        self.cleared_events += 1;
                    }
                }
                let expected = oracle.alert_values(event.user_id, event.month);
                assert_eq!(
                    (event.spent_minor, event.budget_minor, event.currency),
                    (
                        expected.spent_minor,
                        expected.budget_minor,
                        expected.currency
                    ),
                    "epoch {epoch}: values of {event:?}"
                );
            }
            for change in &closed.converted {
                assert!(
                    converted.insert(change.user_id),
                    "epoch {epoch}: converted twice"
                );
                let before = self.converted.get(&change.user_id).copied();
                assert_ne!(before, change.total_minor, "epoch {epoch}: no change");
                match change.total_minor {
                    Some(total) => self.converted.insert(change.user_id, total),
                    None => self.converted.remove(&change.user_id),
                };
            }
        }
        assert_eq!(
            self.aggregates.cells, oracle.aggregates.cells,
            "epoch {epoch}: cells"
        );
        assert_eq!(self.users, oracle.users, "epoch {epoch}: users");
        assert_eq!(self.rates, oracle.rates, "epoch {epoch}: rates");
        let expected: BTreeSet<_> = oracle.fired.keys().copied().collect();
        assert_eq!(self.fired, expected, "epoch {epoch}: fired set");
        assert_eq!(self.converted, oracle.converted, "epoch {epoch}: converted");
        assert_eq!(
            ranking(&self.converted),
            oracle.converted_ranking(),
            "epoch {epoch}: ranking"
        );
    }
}

/// Checks every epoch from `from` on against the oracle over all inputs up to it.
fn check(
    epochs: &[Vec<Input>],
    per_worker: &[(Vec<ClosedEpoch>, Vec<LiveSnapshot>)],
    reporting: Option<Currency>,
    from: Epoch,
) -> Served {
    let mut served = Served::default();
    for epoch in from..epochs.len() as Epoch {
        let entries: Vec<&ClosedEpoch> = per_worker
            .iter()
            .flat_map(|(closed, _)| closed.iter().filter(|c| c.epoch == epoch))
            .collect();
        let oracle = joined(epochs[..=epoch as usize].iter().flatten(), reporting);
        served.apply_and_check(epoch, &entries, &oracle);
    }
    served
}

#[test]
fn alerts_conversion_and_rows_match_the_oracle_at_every_epoch_with_one_and_two_workers() {
    let options = DataflowOptions {
        reporting_currency: Some(REPORTING),
    };
    for seed in [1, 2, 3, 0x5eed] {
        let epochs = Arc::new(random_stream(seed, 2_500, 12));
        for workers in [1, 2] {
            let served = check(
                &epochs,
                &run(epochs.clone(), workers, options, None, None),
                Some(REPORTING),
                0,
            );
            // The stream exercises what it claims to.
            assert!(
                served.fired_events > 10,
                "seed {seed}: {}",
                served.fired_events
            );
            assert!(
                served.cleared_events > 10,
                "seed {seed}: {}",
                served.cleared_events
            );
            assert!(!served.converted.is_empty(), "seed {seed}");
        }
    }
}

#[test]
fn without_a_reporting_currency_nothing_is_converted() {
    let epochs = Arc::new(random_stream(9, 1_500, 8));
    let per_worker = run(epochs.clone(), 2, DataflowOptions::default(), None, None);
    let served = check(&epochs, &per_worker, None, 0);
    assert!(served.converted.is_empty());
    assert!(served.fired_events > 0);
}

#[test]
fn checkpoint_restores_at_other_parallelism_and_continues_like_the_oracle() {
    let options = DataflowOptions {
        reporting_currency: Some(REPORTING),
    };
    for seed in [5, 6] {
        let epochs = Arc::new(random_stream(seed, 2_500, 12));
        let at = (epochs.len() / 2) as Epoch;
        let runs = run(epochs.clone(), 2, options, None, Some(at));
        let mut checkpoint = Checkpoint::default();
        for (_, copies) in &runs {
            assert_eq!(copies.len(), 1, "one copy per worker");
            assert_eq!(copies[0].epoch, at);
            checkpoint.live.extend(copies[0].live.iter().cloned());
            checkpoint
                .reference
                .extend(copies[0].reference.iter().copied());
        }
        // Each row once, and all of them.
        checkpoint.reference.sort();
        let oracle = joined(epochs[..=at as usize].iter().flatten(), Some(REPORTING));
        let mut expected: Vec<(RefKey, RefValue)> = oracle
            .users
            .iter()
            .map(|(user, row)| {
                (
                    RefKey::User(*user),
                    RefValue::User {
                        budget_minor: row.budget_minor,
                        currency: row.currency,
                    },
                )
            })
            .chain(
                oracle
                    .rates
                    .iter()
                    .map(|(c, r)| (RefKey::Fx(*c), RefValue::Fx { rate_micros: *r })),
            )
            .collect();
        expected.sort();
        assert_eq!(checkpoint.reference, expected, "seed {seed}: rows at {at}");
        assert!(
            !oracle.fired.is_empty(),
            "seed {seed}: something to restore"
        );

        let checkpoint = Arc::new(checkpoint);
        for workers in [1, 3] {
            let restored = run(
                epochs.clone(),
                workers,
                options,
                Some((at, checkpoint.clone())),
                None,
            );
            // The restore epoch reports the restored state as changes from nothing: its fired
            // alerts as `Fired` events.
            let served = check(&epochs, &restored, Some(REPORTING), at);
            assert!(served.fired_events >= oracle.fired.len());
        }
    }
}

#[test]
fn one_drain_over_many_epochs_splits_reference_outputs_by_epoch() {
    let options = DataflowOptions {
        reporting_currency: Some(REPORTING),
    };
    let epochs = Arc::new(random_stream(11, 2_000, 10));
    let input = epochs.clone();
    let per_worker = execute(2, move |ctx| {
        let mut dataflow = ctx.build_dataflow_with_options(Default::default(), options);
        let (index, peers) = (ctx.index() as u64, ctx.peers() as u64);
        // Push every epoch before stepping at all: the first drain sees many closed epochs.
        for (epoch, inputs) in input.iter().enumerate() {
            for input in inputs {
                match input {
                    Input::Record(r) if r.user_id() % peers == index => dataflow.push(r.clone()),
                    Input::Reference(change) if index == 0 => dataflow.push_reference(*change),
                    _ => {}
                }
            }
            dataflow.advance_to(epoch as Epoch + 1);
        }
        while dataflow.is_behind() {
            ctx.step();
        }
        (dataflow.drain_closed(), Vec::new())
    })
    .unwrap();
    let last = epochs.len() as Epoch - 1;
    for (drained, _) in &per_worker {
        assert!(drained.windows(2).all(|w| w[0].epoch < w[1].epoch));
        assert_eq!(drained.last().map(|c| c.epoch), Some(last));
        assert!(drained[..drained.len() - 1].iter().all(|c| !c.is_empty()));
    }
    check(&epochs, &per_worker, Some(REPORTING), 0);
}

/// The events of a hand-made story, exactly.
#[test]
fn alert_and_conversion_events_of_a_budget_story() {
    use spendflow_operators::reference::{AlertEvent, Converted, RateChange, UserRef};
    let day_ms = |day: i64| (20_789 + day) * MS_PER_DAY; // 2026-12-02 + day
    let month = 2026 * 12 + 11; // December 2026
    let spend = |id: &str, amount: i64| {
        Input::Record(Record::Upsert(Expense {
            expense_id: eid(id),
            user_id: 1,
            card_id: None,
            merchant: Arc::from("Tesco"),
            category: Arc::from("groceries"),
            amount_minor: amount,
            currency: *b"USD",
            event_ms: day_ms(1),
        }))
    };
    let user = |budget_minor: Option<i64>, currency: Currency| {
        Input::Reference(RefChange {
            key: RefKey::User(1),
            value: Some(RefValue::User {
                budget_minor,
                currency,
            }),
        })
    };
    let rate = |rate_micros: Option<i64>| {
        Input::Reference(RefChange {
            key: RefKey::Fx(*b"USD"),
            value: rate_micros.map(|rate_micros| RefValue::Fx { rate_micros }),
        })
    };
    let epochs = Arc::new(vec![
        // 0: budget 1000 USD, spend 700: no alert; no rate yet, so no converted total.
        vec![user(Some(1_000), *b"USD"), spend("a", 700)],
        // 1: spend 800: the 80% alert fires; a rate arrives: 800 USD at 0.9 = 720 EUR.
        vec![spend("b", 100), rate(Some(900_000))],
        // 2: spend 850: still fired at 80%, no event; converted 765.
        vec![spend("c", 50)],
        // 3: budget 800: 850 >= 800, the 100% alert fires too (budget change alone).
        vec![user(Some(800), *b"USD")],
        // 4: set and reset in one epoch: no change at all.
        vec![user(None, *b"USD"), user(Some(800), *b"USD")],
        // 5: budget NULL: both alerts clear, reporting budget 0.
        vec![user(None, *b"USD")],
        // 6: the rate goes: no converted total any more.
        vec![rate(None)],
        // 7: the user moves to EUR with budget 1000: converts at 1, 80% fires again.
        vec![user(Some(1_000), *b"EUR")],
    ]);
    let options = DataflowOptions {
        reporting_currency: Some(REPORTING),
    };
    let per_worker = run(epochs.clone(), 1, options, None, None);
    check(&epochs, &per_worker, Some(REPORTING), 0);
    let closed = &per_worker[0].0;
    let alert = |threshold_pct, state, spent_minor, budget_minor, currency| AlertEvent {
        user_id: 1,
        month,
        threshold_pct,
        state,
        spent_minor,
        budget_minor,
        currency,
    };
    let converted = |total_minor| Converted {
        user_id: 1,
        total_minor,
    };
    let row = |budget_minor, currency| UserRef {
        user_id: 1,
        row: Some(UserRow {
            budget_minor,
            currency,
        }),
    };
    let usd = *b"USD";
    assert_eq!(closed[0].alerts, vec![]);
    assert_eq!(closed[0].converted, vec![]);
    assert_eq!(closed[0].users, vec![row(Some(1_000), usd)]);
    assert_eq!(
        closed[1].alerts,
        vec![alert(80, AlertState::Fired, 800, 1_000, usd)]
    );
    assert_eq!(closed[1].converted, vec![converted(Some(720))]);
    assert_eq!(
        closed[1].rates,
        vec![RateChange {
            currency: usd,
            rate_micros: Some(900_000)
        }]
    );
    assert_eq!(closed[2].alerts, vec![]);
    assert_eq!(closed[2].converted, vec![converted(Some(765))]);
    assert_eq!(
        closed[3].alerts,
        vec![alert(100, AlertState::Fired, 850, 800, usd)]
    );
    assert!(closed[4].is_empty(), "{:?}", closed[4]);
    assert_eq!(
        closed[5].alerts,
        vec![
            alert(80, AlertState::Cleared, 850, 0, usd),
            alert(100, AlertState::Cleared, 850, 0, usd)
        ]
    );
    assert_eq!(closed[5].users, vec![row(None, usd)]);
    assert_eq!(closed[6].converted, vec![converted(None)]);
    assert_eq!(
        closed[7].alerts,
        vec![alert(80, AlertState::Fired, 850, 1_000, REPORTING)]
    );
    assert_eq!(closed[7].converted, vec![converted(Some(850))]);
}
