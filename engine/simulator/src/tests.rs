use std::collections::{HashMap, HashSet};

use spendflow_operators::decode::{decode, format_event_time};
use spendflow_operators::model::{MAX_ABS_AMOUNT_MINOR, MS_PER_DAY, Record, day_of, month_of_day};

use super::simulator::{json_string, push_rfc3339, testing};
use super::*;

fn config(seed: u64) -> GeneratorConfig {
    GeneratorConfig {
        seed,
        bad_rate: 0.05,
        ..GeneratorConfig::default()
    }
}

fn take(config: GeneratorConfig, n: usize) -> Vec<Generated> {
    let mut sim = Simulator::new(config).expect("valid config");
    (0..n).map(|_| sim.next_record()).collect()
}

fn count(records: &[Generated], pred: impl Fn(&GeneratedKind) -> bool) -> usize {
    records.iter().filter(|g| pred(&g.kind)).count()
}

// --- determinism ------------------------------------------------------------------------------

#[test]
fn same_seed_gives_identical_records() {
    let a = take(config(42), 10_000);
    let b = take(config(42), 10_000);
    assert_eq!(a, b);
}

#[test]
fn different_seeds_give_different_records() {
    let a = take(config(1), 10_000);
    let b = take(config(2), 10_000);
    let same = a.iter().zip(&b).filter(|(x, y)| x.bytes == y.bytes).count();
    assert_eq!(same, 0, "{same} identical records across seeds");
}

#[test]
fn default_seed_output_starts_at_the_default_start() {
    let sim = Simulator::new(GeneratorConfig::default()).expect("defaults are valid");
    assert_eq!(format_event_time(sim.stream_ms()), "2026-11-01T00:00:00Z");
    assert_eq!(GeneratorConfig::default().start_ms, default_start_ms());
}

// --- the contract -----------------------------------------------------------------------------

#[test]
fn valid_records_decode_to_their_record_and_malformed_ones_are_rejected() {
    let records = take(config(7), 100_000);
    for g in &records {
        match (&g.kind, &g.record) {
            (GeneratedKind::Malformed(label), None) => {
                let rejection = decode(&g.bytes).expect_err(&format!(
                    "{label} record was accepted: {}",
                    String::from_utf8_lossy(&g.bytes)
                ));
                let expected: &[&str] = match *label {
                    "truncated_json" => &["bad_json", "not_utf8"],
                    "float_amount" => &["amount_not_integer"],
                    "missing_field" => &["missing_field"],
                    "bad_currency" => &["bad_currency", "wrong_type"],
                    "unknown_op" => &["unknown_op"],
                    "bad_timestamp" => &["bad_timestamp", "wrong_type"],
                    "amount_out_of_range" => &["amount_out_of_range"],
                    "not_an_object" => &["not_an_object"],
                    "invalid_utf8" => &["not_utf8"],
                    "user_id_zero" => &["bad_user_id"],
                    "wrong_type" => &["wrong_type"],
                    "concatenated" | "duplicate_field" => &["bad_json"],
                    other => panic!("unknown malformed kind {other}"),
                };
                assert!(
                    expected.contains(&rejection.reason.code()),
                    "{label} rejected as {rejection}: {}",
                    String::from_utf8_lossy(&g.bytes)
                );
            }
            (kind, Some(record)) => {
                assert!(!kind.is_malformed());
                let decoded = decode(&g.bytes).unwrap_or_else(|r| {
                    panic!(
                        "{kind:?} rejected ({r}): {}",
                        String::from_utf8_lossy(&g.bytes)
                    )
                });
                assert_eq!(&decoded, record, "{}", String::from_utf8_lossy(&g.bytes));
                assert_eq!(record.user_id(), g.user_id);
                assert_ne!(g.bytes.last(), Some(&b'\n'));
            }
            (kind, None) => panic!("{kind:?} without a record"),
        }
    }
    let labels: HashSet<_> = records
        .iter()
        .filter_map(|g| match g.kind {
            GeneratedKind::Malformed(label) => Some(label),
            _ => None,
        })
        .collect();
    for label in MALFORMED_KINDS {
        assert!(labels.contains(label), "no {label} record in 100k");
    }
}

#[test]
fn amounts_are_in_range_and_refunds_negative() {
    for g in take(config(3), 50_000) {
        if let Some(Record::Upsert(e)) = &g.record {
            assert!(e.amount_minor.unsigned_abs() <= MAX_ABS_AMOUNT_MINOR as u64);
            assert_ne!(e.amount_minor, 0);
            match g.kind {
                GeneratedKind::Refund => assert!(e.amount_minor < 0, "refund {e:?}"),
                GeneratedKind::New | GeneratedKind::Late => assert!(e.amount_minor > 0),
                _ => {}
            }
        }
    }
}

#[test]
fn rates_are_roughly_respected() {
    let records = take(config(11), 100_000);
    let n = records.len() as f64;
    let check = |name: &str, got: usize, rate: f64| {
        let expected = rate * n;
        assert!(
            (got as f64) > expected * 0.75 && (got as f64) < expected * 1.25,
            "{name}: {got} records, expected about {expected}"
        );
    };
    let defaults = config(11);
    check(
        "correction",
        count(&records, |k| *k == GeneratedKind::Correction),
        defaults.correction_rate,
    );
    check(
        "delete",
        count(&records, |k| *k == GeneratedKind::Delete),
        defaults.delete_rate,
    );
    check(
        "duplicate",
        count(&records, |k| *k == GeneratedKind::Duplicate),
        defaults.duplicate_rate,
    );
    check(
        "refund",
        count(&records, |k| *k == GeneratedKind::Refund),
        defaults.refund_rate,
    );
    check(
        "late",
        count(&records, |k| *k == GeneratedKind::Late),
        defaults.late_rate,
    );
    check(
        "malformed",
        count(&records, GeneratedKind::is_malformed),
        defaults.bad_rate,
    );
    let others = 1.0 - defaults.rates().iter().map(|(_, r)| r).sum::<f64>();
    check("new", count(&records, |k| *k == GeneratedKind::New), others);
}

#[test]
fn zero_and_full_rates() {
    let none = GeneratorConfig {
        correction_rate: 0.0,
        delete_rate: 0.0,
        duplicate_rate: 0.0,
        refund_rate: 0.0,
        late_rate: 0.0,
        bad_rate: 0.0,
        ..GeneratorConfig::default()
    };
    assert!(
        take(none.clone(), 5000)
            .iter()
            .all(|g| g.kind == GeneratedKind::New)
    );

    let all_bad = GeneratorConfig {
        bad_rate: 1.0,
        ..none.clone()
    };
    assert!(
        take(all_bad, 2000)
            .iter()
            .all(|g| g.kind.is_malformed() && decode(&g.bytes).is_err())
    );

    // Nothing is live at first, so the first record falls back to a new expense.
    let all_corrections = GeneratorConfig {
        correction_rate: 1.0,
        ..none
    };
    let records = take(all_corrections, 2000);
    assert_eq!(records[0].kind, GeneratedKind::New);
    assert!(
        records[1..]
            .iter()
            .all(|g| g.kind == GeneratedKind::Correction)
    );
}

// --- stream semantics -------------------------------------------------------------------------

/// Replays the stream against a map of live expenses and checks what each kind may do.
fn check_stream_semantics(config: GeneratorConfig, n: usize) {
    let step = config.ms_per_event;
    let late_max = config.late_max_ms;
    let window = config.live_window;
    let mut sim = Simulator::new(config).expect("valid config");
    let mut live: HashMap<String, Vec<u8>> = HashMap::new();
    let mut deleted: HashMap<String, Vec<u8>> = HashMap::new();
    let mut seen_ids: HashSet<String> = HashSet::new();
    let mut late_in_older_day = 0;
    let mut late_in_older_month = 0;
    let mut late = 0;
    for _ in 0..n {
        let stream = sim.stream_ms();
        let g = sim.next_record();
        assert!(sim.remembered() <= window);
        let Some(record) = &g.record else { continue };
        let id = record.expense_id().to_string();
        match (g.kind, record) {
            (
                GeneratedKind::New | GeneratedKind::Refund | GeneratedKind::Late,
                Record::Upsert(e),
            ) => {
                assert!(seen_ids.insert(id.clone()), "{:?} reuses id {id}", g.kind);
                if g.kind == GeneratedKind::Late {
                    late += 1;
                    assert!(
                        e.event_ms < stream,
                        "late {} not before {stream}",
                        e.event_ms
                    );
                    assert!(e.event_ms >= stream - late_max);
                    late_in_older_day += usize::from(day_of(e.event_ms) < day_of(stream));
                    late_in_older_month += usize::from(
                        month_of_day(day_of(e.event_ms)) < month_of_day(day_of(stream)),
                    );
                } else {
                    assert!(e.event_ms >= stream && e.event_ms < stream + step.max(1));
                }
                live.insert(id, g.bytes.clone());
            }
            (GeneratedKind::Correction, Record::Upsert(e)) => {
                let previous = live
                    .get(&id)
                    .unwrap_or_else(|| panic!("correction of dead {id}"));
                let before = decode(previous).expect("earlier bytes decode");
                let Record::Upsert(before) = before else {
                    panic!("live delete?")
                };
                assert_ne!(
                    before.amount_minor, e.amount_minor,
                    "correction keeps the amount"
                );
                assert_eq!(
                    before.event_ms, e.event_ms,
                    "correction moves the event time"
                );
                assert_eq!(before.amount_minor.signum(), e.amount_minor.signum());
                live.insert(id, g.bytes.clone());
            }
            (GeneratedKind::Delete, Record::Delete { .. }) => {
                assert!(live.remove(&id).is_some(), "delete of dead {id}");
                deleted.insert(id, g.bytes.clone());
            }
            (GeneratedKind::Duplicate, Record::Upsert(_)) => {
                assert_eq!(
                    live.get(&id),
                    Some(&g.bytes),
                    "duplicate is not the latest bytes of {id}"
                );
            }
            (GeneratedKind::Duplicate, Record::Delete { .. }) => {
                assert!(!live.contains_key(&id), "duplicate delete of live {id}");
                assert_eq!(deleted.get(&id), Some(&g.bytes), "duplicate delete differs");
            }
            (kind, record) => panic!("{kind:?} with {record:?}"),
        }
    }
    if late > 100 {
        assert!(
            late_in_older_day * 10 > late * 8,
            "{late_in_older_day} of {late} late in older days"
        );
        assert!(late_in_older_month > 0, "no late record in an older month");
    }
}

#[test]
fn deletes_corrections_and_duplicates_only_target_live_expenses() {
    check_stream_semantics(config(5), 100_000);
}

#[test]
fn a_small_window_keeps_memory_bounded_and_semantics_intact() {
    let small = GeneratorConfig {
        live_window: 50,
        correction_rate: 0.2,
        delete_rate: 0.2,
        duplicate_rate: 0.1,
        refund_rate: 0.1,
        ..config(9)
    };
    check_stream_semantics(small, 50_000);
}

#[test]
fn late_events_reach_older_months_around_a_month_boundary() {
    let config = GeneratorConfig {
        // One day before December, ten minutes per record: crosses into December soon.
        start_ms: default_start_ms() + 29 * MS_PER_DAY,
        ms_per_event: 600_000,
        late_rate: 0.2,
        ..config(13)
    };
    check_stream_semantics(config, 20_000);
}

// --- users and merchants ----------------------------------------------------------------------

#[test]
fn user_profiles_are_deterministic_and_match_the_records() {
    let a = Simulator::new(config(21)).expect("valid");
    let b = Simulator::new(config(21)).expect("valid");
    assert_eq!(a.user(0), None);
    assert_eq!(a.user(1001), None);
    let mut emails = HashSet::new();
    for user_id in 1..=1000 {
        let profile = a.user(user_id).expect("user in range");
        assert_eq!(Some(&profile), b.user(user_id).as_ref());
        assert_eq!(profile.user_id, user_id);
        assert!(
            profile.email.is_ascii() && profile.email.contains('@'),
            "{}",
            profile.email
        );
        assert!(
            emails.insert(profile.email.clone()),
            "duplicate email {}",
            profile.email
        );
        assert!(!profile.name.is_empty());
        assert_eq!(profile.country.len(), 2);
        assert!((1..=3).contains(&profile.cards.len()));
        for (n, card) in profile.cards.iter().enumerate() {
            assert_eq!(card, &format!("c-{user_id}-{}", n + 1));
        }
        assert!(profile.monthly_budget_minor > 0);
        assert!(profile.monthly_budget_minor <= MAX_ABS_AMOUNT_MINOR);
    }
    // Another seed gives other people.
    let c = Simulator::new(config(22)).expect("valid");
    let differ = (1..=100).filter(|&u| c.user(u) != a.user(u)).count();
    assert!(differ > 90);

    let mut sim = Simulator::new(config(21)).expect("valid");
    let profiles: HashMap<u64, UserProfile> = (1..=1000)
        .map(|u| (u, a.user(u).expect("in range")))
        .collect();
    for _ in 0..20_000 {
        if let Some(Record::Upsert(e)) = sim.next_record().record {
            let profile = &profiles[&e.user_id];
            assert_eq!(e.currency_str(), profile.currency);
            assert!(profile.cards.contains(e.card_id.as_ref().expect("card")));
        }
    }
}

#[test]
fn budgets_are_calibrated_to_spending() {
    // One month at one record a minute: compare each user's spending with their budget.
    let config = GeneratorConfig {
        seed: 4,
        users: 100,
        ms_per_event: 60_000,
        ..GeneratorConfig::default()
    };
    let mut sim = Simulator::new(config).expect("valid");
    let per_month = (30 * MS_PER_DAY / 60_000) as usize;
    let mut spent: HashMap<u64, i64> = HashMap::new();
    for _ in 0..per_month {
        let g = sim.next_record();
        if let (GeneratedKind::New | GeneratedKind::Late, Some(Record::Upsert(e))) =
            (g.kind, g.record)
        {
            *spent.entry(e.user_id).or_default() += e.amount_minor;
        }
    }
    let over = (1..=100)
        .filter(|&u| {
            spent.get(&u).copied().unwrap_or(0) > sim.user(u).expect("user").monthly_budget_minor
        })
        .count();
    // Budgets are 60 % to 160 % of the expected spending: some users go over, most do not.
    assert!((5..=70).contains(&over), "{over} of 100 users over budget");
}

#[test]
fn merchants_are_unique_short_and_keep_their_category() {
    let sim = Simulator::new(GeneratorConfig {
        merchants: 100_000,
        ..config(1)
    })
    .expect("valid");
    let merchants = sim.merchants();
    assert_eq!(merchants.len(), 100_000);
    let mut names = HashSet::new();
    for m in merchants {
        let chars = m.name.chars().count();
        assert!(
            (1..=64).contains(&chars),
            "{} is {chars} characters",
            m.name
        );
        assert!(
            names.insert(m.name.clone()),
            "duplicate merchant {}",
            m.name
        );
    }
    for category in Category::ALL {
        assert!(
            merchants.iter().any(|m| m.category == category),
            "no {category} merchant"
        );
    }

    let mut sim = Simulator::new(config(1)).expect("valid");
    let by_name: HashMap<_, _> = sim
        .merchants()
        .iter()
        .map(|m| (m.name.clone(), m.category))
        .collect();
    assert_eq!(by_name.len(), 200);
    let mut categories = HashSet::new();
    for _ in 0..20_000 {
        let g = sim.next_record();
        if let (GeneratedKind::New | GeneratedKind::Late, Some(Record::Upsert(e))) =
            (g.kind, g.record)
        {
            let category = by_name[&e.merchant];
            assert_eq!(&*e.category, category.as_str());
            categories.insert(category);
        }
    }
    assert_eq!(categories.len(), Category::ALL.len());
}

#[test]
fn fewer_merchants_than_categories() {
    let records = take(
        GeneratorConfig {
            merchants: 1,
            users: 1,
            ..config(2)
        },
        5000,
    );
    for g in records.iter().filter(|g| g.kind == GeneratedKind::New) {
        let Some(Record::Upsert(e)) = &g.record else {
            panic!("new without upsert")
        };
        assert_eq!(&*e.merchant, "Tesco");
        assert_eq!(e.user_id, 1);
    }
}

#[test]
fn activity_is_skewed() {
    let records = take(config(8), 100_000);
    let mut per_user: HashMap<u64, usize> = HashMap::new();
    let mut per_merchant: HashMap<String, usize> = HashMap::new();
    let mut new = 0;
    for g in &records {
        if let (GeneratedKind::New, Some(Record::Upsert(e))) = (g.kind, &g.record) {
            new += 1;
            *per_user.entry(e.user_id).or_default() += 1;
            *per_merchant.entry(e.merchant.to_string()).or_default() += 1;
        }
    }
    let mut counts: Vec<usize> = per_user.values().copied().collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let top_1_percent: usize = counts.iter().take(10).sum();
    assert!(
        top_1_percent * 10 > new,
        "top 1 % of users made {top_1_percent} of {new}"
    );
    // The heaviest users are not simply the lowest ids.
    let heaviest = per_user
        .iter()
        .max_by_key(|(u, c)| (**c, **u))
        .map(|(u, _)| *u);
    assert_ne!(heaviest, Some(1));
    let top_merchant = per_merchant.values().max().copied().unwrap_or(0);
    // Uniform popularity would give the top merchant 0.5 %; the market leader of groceries
    // (a fifth of the largest category) takes about 4 %.
    assert!(
        top_merchant * 40 > new,
        "top merchant has {top_merchant} of {new}"
    );
    assert!(
        per_merchant.len() > 150,
        "only {} merchants used",
        per_merchant.len()
    );
}

#[test]
fn skew_and_permutation_internals() {
    for n in [1u64, 2, 3, 7, 8, 100, 1000, 4096, 4097] {
        assert!(testing::permutation_is_bijective(n, n * 31), "n = {n}");
        let ranks = testing::user_skew_ranks(n, 10_000, n);
        assert!(ranks.iter().all(|&r| r < n));
    }
    // Every rank of a small population is reachable.
    let ranks: HashSet<u64> = testing::user_skew_ranks(37, 100_000, 5)
        .into_iter()
        .collect();
    assert_eq!(ranks.len(), 37);
    // Huge populations work without tables.
    let ranks = testing::user_skew_ranks(MAX_USERS, 1000, 1);
    assert!(ranks.iter().all(|&r| r < MAX_USERS));
}

#[test]
fn the_largest_population_still_decodes() {
    let config = GeneratorConfig {
        users: MAX_USERS,
        ..config(99)
    };
    let mut sim = Simulator::new(config).expect("valid");
    for _ in 0..5000 {
        let g = sim.next_record();
        assert!((1..=MAX_USERS).contains(&g.user_id));
        assert_eq!(decode(&g.bytes).ok(), g.record);
    }
    let profile = sim.user(MAX_USERS).expect("last user");
    assert!(profile.monthly_budget_minor > 0);
}

// --- encoding ---------------------------------------------------------------------------------

#[test]
fn timestamps_match_format_event_time() {
    let mut x = 0x1234_5678_u64;
    let mut samples = vec![0, 999, 1000, 86_399_999, MAX_EVENT_MS, default_start_ms()];
    for _ in 0..20_000 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        samples.push((x >> 1) as i64 % (MAX_EVENT_MS + 1));
    }
    for ms in samples {
        let mut out = Vec::new();
        push_rfc3339(&mut out, ms);
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            format_event_time(ms),
            "{ms}"
        );
    }
}

#[test]
fn json_strings_are_escaped() {
    for s in [
        "plain",
        "Bar \"Zum Hirsch\"",
        "back\\slash",
        "tab\tnew\nline\r",
        "\u{1}\u{1f}",
        "Phở 24",
        "",
    ] {
        let literal = json_string(s);
        let parsed: String = serde_json::from_slice(&literal).expect("valid JSON string");
        assert_eq!(parsed, s);
    }
}

#[test]
fn fast_writer_and_field_writer_agree() {
    let mut sim = Simulator::new(config(17)).expect("valid");
    for _ in 0..2000 {
        assert!(testing::writers_agree(&mut sim));
    }
}

#[test]
fn generates_many_records_with_bounded_state() {
    // A smoke run, timing nothing: the rate is measured in release builds, not asserted.
    let mut sim = Simulator::new(GeneratorConfig {
        live_window: 1000,
        ..config(6)
    })
    .expect("valid");
    let mut bytes = 0usize;
    for g in sim.by_ref().take(200_000) {
        bytes += g.bytes.len();
    }
    assert_eq!(sim.produced(), 200_000);
    assert!(sim.remembered() <= 1000);
    assert!(bytes > 200_000 * 100);
}

// --- configuration ----------------------------------------------------------------------------

#[test]
fn config_validation() {
    let ok = GeneratorConfig::default();
    assert_eq!(ok.validate(), Ok(()));
    let cases: Vec<(GeneratorConfig, &str)> = vec![
        (
            GeneratorConfig {
                delete_rate: -0.1,
                ..ok.clone()
            },
            "delete_rate must be a number from 0 to 1",
        ),
        (
            GeneratorConfig {
                bad_rate: 1.5,
                ..ok.clone()
            },
            "bad_rate",
        ),
        (
            GeneratorConfig {
                late_rate: f64::NAN,
                ..ok.clone()
            },
            "late_rate",
        ),
        (
            GeneratorConfig {
                correction_rate: 0.6,
                refund_rate: 0.5,
                ..ok.clone()
            },
            "at most 1",
        ),
        (
            GeneratorConfig {
                users: 0,
                ..ok.clone()
            },
            "users must be at least 1",
        ),
        (
            GeneratorConfig {
                users: u64::MAX,
                ..ok.clone()
            },
            "users must be at most",
        ),
        (
            GeneratorConfig {
                merchants: 0,
                ..ok.clone()
            },
            "merchants must be from 1",
        ),
        (
            GeneratorConfig {
                merchants: MAX_MERCHANTS + 1,
                ..ok.clone()
            },
            "merchants",
        ),
        (
            GeneratorConfig {
                ms_per_event: -1,
                ..ok.clone()
            },
            "ms_per_event",
        ),
        (
            GeneratorConfig {
                late_max_ms: 0,
                ..ok.clone()
            },
            "late_max_ms must be at least 1",
        ),
        (
            GeneratorConfig {
                start_ms: 1000,
                ..ok.clone()
            },
            "start_ms",
        ),
        (
            GeneratorConfig {
                start_ms: MAX_EVENT_MS + 1,
                ..ok.clone()
            },
            "start_ms",
        ),
        (
            GeneratorConfig {
                live_window: 0,
                ..ok.clone()
            },
            "live_window",
        ),
    ];
    for (config, needle) in cases {
        let err = config.validate().expect_err(needle);
        assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        assert!(Simulator::new(config).is_err());
    }
    // Decimal rates that add up to exactly 1 on paper are accepted.
    let full = GeneratorConfig {
        correction_rate: 0.1,
        delete_rate: 0.2,
        duplicate_rate: 0.3,
        refund_rate: 0.1,
        late_rate: 0.2,
        bad_rate: 0.1,
        ..ok
    };
    assert_eq!(full.validate(), Ok(()));
}

#[test]
fn config_deserializes_with_defaults_and_rejects_unknown_fields() {
    let config: GeneratorConfig =
        serde_json::from_str(r#"{"seed": 5, "users": 10, "bad_rate": 0.1}"#).expect("parses");
    assert_eq!(
        config,
        GeneratorConfig {
            seed: 5,
            users: 10,
            bad_rate: 0.1,
            ..GeneratorConfig::default()
        }
    );
    let err = serde_json::from_str::<GeneratorConfig>(r#"{"user": 10}"#).expect_err("typo");
    assert!(err.to_string().contains("unknown field"), "{err}");
}
