//! The generator source's reference data: determinism, resuming, rates of changes, budgets.

use std::collections::{BTreeMap, HashMap};

use spendflow_operators::model::{Record, UserId, day_of, month_of_day};
use spendflow_operators::reference::{Currency, RATE_ONE, RefChange, RefKey, RefValue};

use super::reference::{CURRENCY_VALUES, base_rate};
use super::{GeneratorConfig, GeneratorSource, GeneratorSourceConfig, SOURCE_NAME, Simulator};
use crate::source::{Payload, Poll, RestoredPositions, Source};

/// What one record was, comparable.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rec {
    Bytes(Vec<u8>),
    Reference(RefChange),
}

fn config(seed: u64, users: u64) -> GeneratorSourceConfig {
    GeneratorSourceConfig {
        simulator: GeneratorConfig {
            seed,
            users,
            ..GeneratorConfig::default()
        },
        ..GeneratorSourceConfig::default()
    }
}

/// Every record of `source` up to `events`, with its offset.
fn drain(mut source: GeneratorSource) -> Vec<(i64, Rec)> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    loop {
        batch.clear();
        match source.poll(&mut batch, 4096).unwrap() {
            Poll::Finished => return out,
            Poll::Ready => {}
            other => panic!("an unpaced generator is never {other:?}"),
        }
        for record in batch.drain(..) {
            let rec = match record.payload {
                Payload::Bytes(bytes) => Rec::Bytes(bytes.to_vec()),
                Payload::Reference(change) => Rec::Reference(change),
                Payload::Record(_) => panic!("the generator sends bytes"),
            };
            out.push((record.offset, rec));
        }
    }
}

fn run(config: GeneratorSourceConfig, events: u64) -> Vec<(i64, Rec)> {
    drain(
        GeneratorSource::new(GeneratorSourceConfig {
            events: Some(events),
            ..config
        })
        .unwrap(),
    )
}

#[test]
fn the_same_seed_gives_the_same_records_and_another_seed_others() {
    let a = run(config(7, 300), 20_000);
    let b = run(config(7, 300), 20_000);
    let c = run(config(8, 300), 20_000);
    assert_eq!(a.len(), 20_000);
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Offsets count every record, reference records included.
    assert!(a.iter().enumerate().all(|(i, (o, _))| *o == i as i64));
    assert!(a.iter().any(|(_, r)| matches!(r, Rec::Reference(_))));
}

#[test]
fn the_expenses_are_the_simulators_own_stream() {
    let with = run(config(3, 200), 10_000);
    let mut simulator = Simulator::new(config(3, 200).simulator).unwrap();
    let expenses: Vec<Vec<u8>> = with
        .into_iter()
        .filter_map(|(_, r)| match r {
            Rec::Bytes(b) => Some(b),
            Rec::Reference(_) => None,
        })
        .collect();
    assert!(expenses.len() < 10_000);
    for (i, bytes) in expenses.iter().enumerate() {
        assert_eq!(*bytes, simulator.next_record().bytes, "expense {i}");
    }
    // Without reference data: the plain stream.
    let without = run(
        GeneratorSourceConfig {
            reference: false,
            ..config(3, 200)
        },
        500,
    );
    let mut simulator = Simulator::new(config(3, 200).simulator).unwrap();
    for (_, r) in without {
        assert_eq!(r, Rec::Bytes(simulator.next_record().bytes));
    }
}

#[test]
fn a_resumed_source_continues_with_exactly_the_records_after_its_position() {
    let all = run(config(11, 150), 6_000);
    for at in [0_i64, 1, 9, 10, 2_345, 5_999] {
        let restored: RestoredPositions = [((SOURCE_NAME.to_string(), 0), at)].into();
        let resumed = GeneratorSource::resume(
            GeneratorSourceConfig {
                events: Some(6_000),
                ..config(11, 150)
            },
            &restored,
        )
        .unwrap();
        assert_eq!(resumed.partitions()[0].position, at);
        assert_eq!(
            drain(resumed),
            all[at as usize..].to_vec(),
            "resumed at {at}"
        );
    }
}

/// Reference changes of `records`: users' rows (in order) and rates (in order).
fn reference(records: &[(i64, Rec)]) -> (Vec<RefChange>, Vec<RefChange>) {
    records
        .iter()
        .filter_map(|(_, r)| match r {
            Rec::Reference(c) => Some(*c),
            Rec::Bytes(_) => None,
        })
        .partition(|c| matches!(c.key, RefKey::User(_)))
}

#[test]
fn rates_come_first_for_every_currency_and_change_at_the_configured_rate() {
    let records = run(
        GeneratorSourceConfig {
            budget_change_rate: 20.0,
            fx_change_rate: 4.0,
            ..config(5, 100)
        },
        100_000,
    );
    let (users, rates) = reference(&records);
    // The first records are one rate per currency, EUR at exactly one.
    for (i, (currency, _)) in CURRENCY_VALUES.iter().enumerate() {
        assert_eq!(
            records[i].1,
            Rec::Reference(RefChange {
                key: RefKey::Fx(*currency),
                value: Some(RefValue::Fx {
                    rate_micros: base_rate(*currency, *b"EUR").unwrap()
                }),
            })
        );
    }
    assert_eq!(base_rate(*b"EUR", *b"EUR"), Some(RATE_ONE));
    assert_eq!(base_rate(*b"USD", *b"EUR"), Some(925_926));
    assert_eq!(base_rate(*b"JPY", *b"EUR"), Some(625_000));
    // Then changes: 4 per 1000 records (binomial, 100 000 draws: within 20 %).
    let changes = rates.len() - CURRENCY_VALUES.len();
    assert!((320..=480).contains(&changes), "{changes} rate changes");
    for change in &rates[CURRENCY_VALUES.len()..] {
        let (RefKey::Fx(currency), Some(RefValue::Fx { rate_micros })) = (change.key, change.value)
        else {
            panic!("{change:?}");
        };
        assert_ne!(currency, *b"EUR", "the base never moves");
        let base = base_rate(currency, *b"EUR").unwrap();
        assert!(
            (rate_micros - base).abs() <= base * 3 / 100 + 1,
            "{change:?}"
        );
    }
    // Budget changes: every user row after a user's first; 20 per 1000 records.
    let firsts = users
        .iter()
        .map(|c| c.key)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let budget_changes = users.len() - firsts;
    assert!(
        (1_600..=2_400).contains(&budget_changes),
        "{budget_changes} budget changes"
    );

    // No reference changes when told so.
    let none = run(
        GeneratorSourceConfig {
            budget_change_rate: 0.0,
            fx_change_rate: 0.0,
            ..config(5, 100)
        },
        20_000,
    );
    let (users, rates) = reference(&none);
    assert_eq!(rates.len(), CURRENCY_VALUES.len());
    assert!(users.len() <= 100);
}

/// Replays `records` as the engine would: live expenses by id, the last reference row per key.
struct Replay {
    live: HashMap<String, (UserId, i32, i64, Currency)>,
    rows: BTreeMap<UserId, (i64, Currency)>,
    rates: BTreeMap<Currency, i64>,
    /// A user's row came before each of the user's expenses.
    row_first: bool,
}

fn replay(records: &[(i64, Rec)]) -> Replay {
    let mut out = Replay {
        live: HashMap::new(),
        rows: BTreeMap::new(),
        rates: BTreeMap::new(),
        row_first: true,
    };
    for (_, rec) in records {
        match rec {
            Rec::Reference(RefChange {
                key: RefKey::User(u),
                value:
                    Some(RefValue::User {
                        budget_minor: Some(b),
                        currency,
                    }),
            }) => {
                out.rows.insert(*u, (*b, *currency));
            }
            Rec::Reference(RefChange {
                key: RefKey::Fx(c),
                value: Some(RefValue::Fx { rate_micros }),
            }) => {
                out.rates.insert(*c, *rate_micros);
            }
            Rec::Reference(other) => panic!("unexpected {other:?}"),
            Rec::Bytes(bytes) => match spendflow_operators::decode::decode(bytes) {
                Ok(Record::Upsert(e)) => {
                    out.row_first &= out.rows.contains_key(&e.user_id);
                    out.live.insert(
                        e.expense_id.as_str().to_string(),
                        (
                            e.user_id,
                            month_of_day(day_of(e.event_ms)),
                            e.amount_minor,
                            e.currency,
                        ),
                    );
                }
                Ok(Record::Delete { expense_id, .. }) => {
                    out.live.remove(expense_id.as_str());
                }
                Err(_) => {}
            },
        }
    }
    out
}

#[test]
fn every_user_has_a_row_in_the_currency_of_its_expenses_before_its_first_expense() {
    let records = run(config(9, 400), 30_000);
    let replayed = replay(&records);
    assert!(replayed.row_first);
    assert!(!replayed.live.is_empty());
    for (user, _, _, currency) in replayed.live.values() {
        let (budget, row_currency) = replayed.rows[user];
        assert_eq!(row_currency, *currency, "user {user}");
        assert!(budget > 0);
        assert!(
            replayed.rates.contains_key(currency),
            "no rate for {currency:?}"
        );
    }
}

/// Shares of users (with spend in `month`) under 80 %, near (80-100 %) and over their budget,
/// in percent, from exact totals of the records.
fn shares(records: &[(i64, Rec)], month: i32) -> (usize, [usize; 3]) {
    let replayed = replay(records);
    let mut spent: BTreeMap<UserId, i128> = BTreeMap::new();
    for (user, m, amount, _) in replayed.live.values() {
        if *m == month {
            *spent.entry(*user).or_default() += i128::from(*amount);
        }
    }
    let mut counts = [0usize; 3];
    for (user, s) in &spent {
        let b = i128::from(replayed.rows[user].0);
        let bucket = if *s * 100 >= b * 100 {
            2
        } else if *s * 100 >= b * 80 {
            1
        } else {
            0
        };
        counts[bucket] += 1;
    }
    let n = spent.len().max(1);
    (spent.len(), counts.map(|c| c * 100 / n))
}

#[test]
fn most_users_are_under_budget_some_near_it_and_a_few_over() {
    // The demo's pace for a couple of minutes: 1000 users, 240 000 records, one second of
    // event time per record (2.8 days into the month).
    let config = config(42, 1000);
    let start = config.simulator.start_ms;
    let records = run(config, 240_000);
    let month = month_of_day(day_of(start + 239_000 * 1000));
    let (users, [under, near, over]) = shares(&records, month);
    eprintln!("demo: {users} users: {under}% under, {near}% near, {over}% over");
    assert!(users > 500, "{users} users spent this month");
    assert!(under >= 60, "{under}% under");
    assert!(near >= 4, "{near}% near");
    assert!((3..=25).contains(&over), "{over}% over");
}

#[test]
fn in_two_minutes_of_the_demo_alerts_fire_and_clear() {
    // 2000 records a second for two minutes. The 100 % alert of every (user, month), followed
    // record by record from exact totals, as the engine's rule has it.
    let records = run(config(42, 1000), 240_000);
    let mut live: HashMap<String, (UserId, i32, i64)> = HashMap::new();
    let mut spent: BTreeMap<(UserId, i32), i128> = BTreeMap::new();
    let mut budgets: BTreeMap<UserId, i64> = BTreeMap::new();
    let mut fired: std::collections::BTreeSet<(UserId, i32)> = Default::default();
    let (mut fires, mut clears) = (0, 0);
    let mut check =
        |user: UserId, spent: &BTreeMap<(UserId, i32), i128>, budgets: &BTreeMap<UserId, i64>| {
            let budget = i128::from(budgets.get(&user).copied().unwrap_or(0));
            for (&(u, month), &s) in spent.range((user, i32::MIN)..=(user, i32::MAX)) {
                let over = budget > 0 && s >= budget;
                if over && fired.insert((u, month)) {
                    fires += 1;
                } else if !over && fired.remove(&(u, month)) {
                    clears += 1;
                }
            }
        };
    for (_, rec) in &records {
        match rec {
            Rec::Reference(RefChange {
                key: RefKey::User(u),
                value:
                    Some(RefValue::User {
                        budget_minor: Some(b),
                        ..
                    }),
            }) => {
                budgets.insert(*u, *b);
                check(*u, &spent, &budgets);
            }
            Rec::Reference(_) => {}
            Rec::Bytes(bytes) => {
                let user = match spendflow_operators::decode::decode(bytes) {
                    Ok(Record::Upsert(e)) => {
                        let month = month_of_day(day_of(e.event_ms));
                        let old = live.insert(
                            e.expense_id.as_str().to_string(),
                            (e.user_id, month, e.amount_minor),
                        );
                        if let Some((u, m, a)) = old {
                            *spent.entry((u, m)).or_default() -= i128::from(a);
                        }
                        *spent.entry((e.user_id, month)).or_default() += i128::from(e.amount_minor);
                        e.user_id
                    }
                    Ok(Record::Delete {
                        expense_id,
                        user_id,
                    }) => {
                        if let Some((u, m, a)) = live.remove(expense_id.as_str()) {
                            *spent.entry((u, m)).or_default() -= i128::from(a);
                        }
                        user_id
                    }
                    Err(_) => continue,
                };
                check(user, &spent, &budgets);
            }
        }
    }
    eprintln!(
        "two minutes: {fires} fired, {clears} cleared, {} fired now",
        fired.len()
    );
    assert!(fires >= 50, "{fires} alerts fired");
    assert!(clears >= 20, "{clears} alerts cleared");
}

#[test]
fn at_the_end_of_a_month_without_changes_most_users_are_still_under_budget() {
    // A whole month of event time: one minute per record, 43 200 records; no budget changes:
    // the initial budgets alone.
    let config = GeneratorSourceConfig {
        simulator: GeneratorConfig {
            seed: 4,
            users: 300,
            ms_per_event: 60_000,
            late_rate: 0.0,
            ..GeneratorConfig::default()
        },
        budget_change_rate: 0.0,
        ..GeneratorSourceConfig::default()
    };
    let start = config.simulator.start_ms;
    let records = run(config, 43_000);
    let (users, [under, near, over]) = shares(&records, month_of_day(day_of(start)));
    eprintln!("month end: {users} users: {under}% under, {near}% near, {over}% over");
    assert!(under >= 50, "{under}% under");
    assert!(near >= 5, "{near}% near");
    assert!((1..=30).contains(&over), "{over}% over");
}

#[test]
fn bad_reference_settings_are_refused_with_the_setting_named() {
    for (config, field) in [
        (
            GeneratorSourceConfig {
                budget_change_rate: -1.0,
                ..GeneratorSourceConfig::default()
            },
            "budget_change_rate",
        ),
        (
            GeneratorSourceConfig {
                fx_change_rate: 1001.0,
                ..GeneratorSourceConfig::default()
            },
            "fx_change_rate",
        ),
        (
            GeneratorSourceConfig {
                budget_change_rate: 600.0,
                fx_change_rate: 600.0,
                ..GeneratorSourceConfig::default()
            },
            "budget_change_rate + fx_change_rate",
        ),
        (
            GeneratorSourceConfig {
                fx_base: "XYZ".into(),
                ..GeneratorSourceConfig::default()
            },
            "fx_base",
        ),
    ] {
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains(field), "{message}");
        assert!(GeneratorSource::new(config).is_err());
    }
    let toml: GeneratorSourceConfig =
        toml::from_str("budget_change_rate = 2.5\nfx_base = \"USD\"").unwrap();
    assert_eq!(toml.budget_change_rate, 2.5);
    assert!(toml.reference);
    assert_eq!(toml.fx_change_rate, 1.0);
    toml.validate().unwrap();
}
