//! The alerts topic against real Kafka (and, end to end, MariaDB's binlog):
//!
//! * the output on its own: records written, a crash in the middle of a transaction, a new
//!   output on the same topic: each state change once; a second engine with the same
//!   `transactional.id` fences the first;
//! * the acceptance test of issue 16 with the real binary: a budget lowered in MySQL fires
//!   alerts on the topic (the issue's 2 s, asserted with a margin), an `fx_rates` update
//!   re-ranks `TopSpenders`, a kill -9 between lowering and restoring the budget, and the topic
//!   holds exactly one `fired` and one `cleared` per alert of the user.
//!
//! Needs SPENDFLOW_KAFKA (and SPENDFLOW_MYSQL, SPENDFLOW_CASSANDRA for the end-to-end test).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};
use spendflow_engine::core::PartitionPosition;
use spendflow_engine::sink::alerts::{AlertsOutput, AlertsTopicConfig, POSITIONS_HEADER};
use spendflow_operators::reference::{AlertEvent, AlertState};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;

use crate::support::stream::{Generation, StreamRun, messages_in, status};
use crate::support::{service_env, unique_name};

/// One record of the alerts topic as a reader sees it.
#[derive(Clone, Debug)]
struct Seen {
    key: String,
    value: serde_json::Value,
    positions: Option<String>,
}

impl Seen {
    fn alert(&self) -> (u64, String, u64) {
        (
            self.value["user_id"].as_u64().unwrap(),
            self.value["month"].as_str().unwrap().to_string(),
            self.value["threshold_pct"].as_u64().unwrap(),
        )
    }

    fn state(&self) -> &str {
        self.value["state"].as_str().unwrap()
    }
}

/// Every committed record of `topic`, read to its end (each partition's end of partition).
fn read_alerts(brokers: &str, topic: &str) -> Vec<Seen> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("sf_alerts_reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    let mut pending = BTreeSet::new();
    for p in metadata.topics()[0].partitions() {
        assignment
            .add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
        pending.insert(p.id());
    }
    assert!(!pending.is_empty(), "topic {topic} has no partitions");
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "{topic} not read to its end");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push(Seen {
                key: String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap(),
                value: serde_json::from_slice(m.payload().unwrap()).unwrap(),
                positions: m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == POSITIONS_HEADER))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8(v.to_vec()).unwrap()),
            }),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// Per alert, its states in topic order.
fn sequences(records: &[Seen]) -> BTreeMap<(u64, String, u64), Vec<String>> {
    let mut out: BTreeMap<_, Vec<String>> = BTreeMap::new();
    for r in records {
        out.entry(r.alert())
            .or_default()
            .push(r.state().to_string());
    }
    out
}

/// Every alert's states alternate from `fired`: nothing said twice in a row.
fn assert_alternating(records: &[Seen]) {
    for (alert, states) in sequences(records) {
        for (i, s) in states.iter().enumerate() {
            let want = if i % 2 == 0 { "fired" } else { "cleared" };
            assert_eq!(s, want, "{alert:?}: {states:?}");
        }
    }
}

const MONTH: i32 = 2026 * 12 + 10;

fn event(user: u64, state: AlertState) -> AlertEvent {
    AlertEvent {
        user_id: user,
        month: MONTH,
        threshold_pct: 80,
        state,
        spent_minor: 9_000 + user as i128,
        budget_minor: 10_000,
        currency: *b"SEK",
    }
}

fn at(position: i64) -> Vec<PartitionPosition> {
    vec![PartitionPosition {
        source: Arc::from("expenses"),
        partition: 0,
        position,
        ..PartitionPosition::default()
    }]
}

use AlertState::{Cleared, Fired};

#[test]
fn the_output_survives_a_crash_in_the_middle_of_a_transaction_without_duplicates() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let topic = unique_name("sf_alerts_out");
    let config = AlertsTopicConfig {
        partitions: Some(2),
        ..AlertsTopicConfig::new(&brokers, &topic)
    };
    // First run: two epochs committed, the third sent in a transaction a crash leaves open.
    let out = AlertsOutput::open(&config).unwrap();
    assert!(out.publish(1, &at(10), &[event(1, Fired), event(2, Fired)], false));
    assert!(out.publish(2, &at(20), &[event(1, Cleared), event(3, Fired)], false));
    assert!(out.flush(Duration::from_secs(60)), "first epochs committed");
    assert_eq!(out.committed_epoch(), Some(2));
    assert!(out.publish(3, &at(30), &[event(1, Fired), event(2, Cleared)], false));
    out.abandon();
    let first = read_alerts(&brokers, &topic);
    assert_eq!(
        first.len(),
        4,
        "the open transaction is not read: {first:?}"
    );

    // Second run, restored from the checkpoint of epoch 1: the restore epoch says 1 and 2 are
    // fired (the topic knows), epoch 2 is replayed (tracked only), epoch 3 (never committed)
    // is past the topic's positions: written now; then a new change.
    let out = AlertsOutput::open(&config).unwrap();
    assert!(out.publish(1, &at(10), &[event(1, Fired), event(2, Fired)], true));
    assert!(out.publish(2, &at(20), &[event(1, Cleared), event(3, Fired)], false));
    assert!(out.publish(3, &at(30), &[event(1, Fired), event(2, Cleared)], false));
    assert!(out.publish(4, &at(40), &[event(3, Cleared)], false));
    assert!(out.flush(Duration::from_secs(60)));
    assert_eq!(out.written(), (1, 2));
    out.close(Duration::from_secs(30)).unwrap();

    let records = read_alerts(&brokers, &topic);
    assert_alternating(&records);
    let states: BTreeMap<u64, Vec<String>> = sequences(&records)
        .into_iter()
        .map(|((user, _, _), s)| (user, s))
        .collect();
    let s = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(states[&1], s(&["fired", "cleared", "fired"]));
    assert_eq!(states[&2], s(&["fired", "cleared"]));
    assert_eq!(states[&3], s(&["fired", "cleared"]));
    // The record as documented.
    let r = &records.iter().find(|r| r.key == "2").unwrap();
    assert_eq!(
        r.value,
        serde_json::json!({"user_id": 2, "month": "2026-11", "threshold_pct": 80,
            "state": "fired", "spent_minor": 9002, "budget_minor": 10000, "currency": "SEK",
            "epoch": 1})
    );
    assert_eq!(
        r.positions.as_deref(),
        Some(r#"[{"source":"expenses","partition":0,"position":10}]"#)
    );
}

#[test]
fn a_second_engine_on_the_topic_fences_the_first() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let topic = unique_name("sf_alerts_fence");
    let config = AlertsTopicConfig::new(&brokers, &topic);
    let old = AlertsOutput::open(&config).unwrap();
    assert!(old.publish(1, &at(1), &[event(1, Fired)], false));
    assert!(old.flush(Duration::from_secs(60)));
    let new = AlertsOutput::open(&config).unwrap();
    // The old engine's next transaction is refused for good.
    old.publish(2, &at(2), &[event(2, Fired)], false);
    let flushed = old.flush(Duration::from_secs(60));
    assert!(!flushed, "the fenced output wrote");
    assert!(old.failed());
    let error = old.close(Duration::from_secs(10)).unwrap_err();
    assert!(!error.is_retriable(), "{error}");
    // The new one writes relative to what the topic says: 1 is fired already.
    assert!(new.publish(5, &at(5), &[event(1, Fired), event(3, Fired)], true));
    assert!(new.flush(Duration::from_secs(60)));
    new.close(Duration::from_secs(30)).unwrap();
    let records = read_alerts(&brokers, &topic);
    assert_alternating(&records);
    let users: Vec<u64> = records.iter().map(|r| r.alert().0).collect();
    assert_eq!(users, [1, 3], "{records:?}");
}

#[test]
fn a_topic_holding_something_else_is_refused_with_a_clear_error() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let topic = unique_name("sf_alerts_foreign");
    crate::support::create_topics(&brokers, &[(topic.clone(), 1)]);
    let producer = crate::support::producer(&brokers);
    producer
        .send(
            rdkafka::producer::BaseRecord::to(&topic)
                .key("1")
                .payload("not json"),
        )
        .unwrap();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
    let error = AlertsOutput::open(&AlertsTopicConfig::new(&brokers, &topic)).unwrap_err();
    assert!(!error.is_retriable(), "{error}");
    assert!(error.to_string().contains("not an alert record"), "{error}");
}

// ---- The acceptance test: the real binary, MariaDB's binlog, Kafka, kill -9. ----

/// `(month, threshold)` fired for a user whose months sum to `spend` under `budget`.
fn fired_set(spend: &BTreeMap<String, i64>, budget: i64) -> BTreeSet<(String, u64)> {
    let mut out = BTreeSet::new();
    if budget <= 0 {
        return out;
    }
    for (month, s) in spend {
        for t in [80u64, 100] {
            if i128::from(*s) * 100 >= i128::from(budget) * i128::from(t) {
                out.insert((month.clone(), t));
            }
        }
    }
    out
}

fn top_spenders(runtime: &tokio::runtime::Runtime, grpc: &str) -> pb::TopSpendersResponse {
    runtime.block_on(async {
        let mut client = ExpenseQueryClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        client
            .top_spenders(pb::TopSpendersRequest {
                limit: 1000,
                consistency: None,
            })
            .await
            .unwrap()
            .into_inner()
    })
}

fn wait_caught_up(
    setup: &StreamRun,
    runtime: &tokio::runtime::Runtime,
    engine: &mut std::process::Child,
) {
    let in_kafka = messages_in(&setup.brokers, &setup.prefix());
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        // `>=`: the count includes the CDC source's rows besides the expenses in Kafka.
        if let Some(s) = status(runtime, &setup.grpc)
            && s.caught_up
            && s.records_read >= in_kafka
        {
            return;
        }
        assert!(
            engine.try_wait().unwrap().is_none(),
            "the engine exited:\n{}",
            setup.log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "not caught up with {in_kafka} records:\n{}",
            setup.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls the topic until `want` holds of the user's records; returns them and how long it took.
fn wait_for(
    brokers: &str,
    topic: &str,
    what: &str,
    want: impl Fn(&[Seen]) -> bool,
) -> (Vec<Seen>, Duration) {
    let started = Instant::now();
    loop {
        let records = read_alerts(brokers, topic);
        if want(&records) {
            return (records, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: not on the topic after 60 s: {records:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_budget_change_fires_and_clears_once_across_kill_9_and_a_rate_change_reranks() {
    let mut setup = StreamRun::new("spendflow_it_alerts");
    let topic = format!("{}.alerts", setup.name);
    setup.engine_args = vec![
        "--mysql-cdc".into(),
        setup.mysql_url.clone(),
        "--alerts-topic".into(),
        topic.clone(),
        "--reporting-currency".into(),
        "EUR".into(),
        "--checkpoint-interval".into(),
        "1s".into(),
        "--epoch-interval-ms".into(),
        "20".into(),
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let generation = Generation::messy(30, 3_000, 16, 5_000);
    let done = setup.generator(&generation).wait().unwrap();
    assert!(done.success(), "the generator failed: {done}");
    let mut engine = setup.engine();
    wait_caught_up(&setup, &runtime, &mut engine);

    let mut db = mysql::Conn::new(mysql::Opts::from_url(&setup.mysql_url).unwrap()).unwrap();
    // Spend per user and UTC month, from the source of truth.
    let rows: Vec<(u64, String, i64)> = db
        .query(
            "SELECT user_id, DATE_FORMAT(event_time, '%Y-%m'), CAST(SUM(amount_minor) AS SIGNED) \
             FROM expenses GROUP BY user_id, DATE_FORMAT(event_time, '%Y-%m')",
        )
        .unwrap();
    let mut spend: BTreeMap<u64, BTreeMap<String, i64>> = BTreeMap::new();
    for (user, month, s) in rows {
        spend.entry(user).or_default().insert(month, s);
    }
    let budgets: BTreeMap<u64, (i64, String)> = db
        .query_map(
            "SELECT user_id, monthly_budget_minor, currency FROM users",
            |(u, b, c): (u64, i64, String)| (u, (b, c)),
        )
        .unwrap()
        .into_iter()
        .collect();
    // A user with spending, nothing fired at its own budget, alerts fired at a budget of 1.
    let (user, original, currency, expected) = budgets
        .iter()
        .find_map(|(u, (b, c))| {
            let s = spend.get(u)?;
            let expected = fired_set(s, 1);
            (fired_set(s, *b).is_empty() && !expected.is_empty())
                .then(|| (*u, *b, c.clone(), expected))
        })
        .expect("a user with spending under budget");
    eprintln!("user {user} ({currency}, budget {original}): expects {expected:?} at budget 1");
    let before = read_alerts(&setup.brokers, &topic);
    assert!(
        before.iter().all(|r| r.alert().0 != user),
        "user {user} has alerts already: {before:?}"
    );
    let of_user = |records: &[Seen], state: &str| -> BTreeSet<(String, u64)> {
        records
            .iter()
            .filter(|r| r.alert().0 == user && r.state() == state)
            .map(|r| {
                let (_, m, t) = r.alert();
                (m, t)
            })
            .collect()
    };

    // An fx_rates update re-ranks TopSpenders: the top spender's currency falls to one
    // micro-unit per unit.
    let top = top_spenders(&runtime, &setup.grpc);
    assert_eq!(top.reporting_currency, "EUR");
    let leader = top
        .spenders
        .iter()
        .find(|s| s.currency != "EUR")
        .cloned()
        .expect("a ranked spender in another currency than EUR");
    db.exec_drop(
        "UPDATE fx_rates SET rate_micros = 1 WHERE currency = ?",
        (leader.currency.as_str(),),
    )
    .unwrap();
    let converted = |total: i64| -> i64 {
        // round half away from zero of total * 1 / 1_000_000
        let (q, r) = (total / 1_000_000, total % 1_000_000);
        if r.abs() * 2 >= 1_000_000 {
            q + r.signum()
        } else {
            q
        }
    };
    // Spenders below the leader, in other currencies, that its new amount falls under: they
    // must rank above it afterwards.
    let new_amount = converted(leader.total_minor);
    assert_ne!(
        leader.converted_minor, new_amount,
        "the rate change changes nothing"
    );
    let overtaking: Vec<u64> = top
        .spenders
        .iter()
        .filter(|o| o.rank > leader.rank && o.currency != leader.currency)
        .filter(|o| o.converted_minor > new_amount)
        .map(|o| o.user_id)
        .collect();
    assert!(
        !overtaking.is_empty(),
        "no spender for the rate change to re-rank: {top:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = top_spenders(&runtime, &setup.grpc);
        let rank_of = |user: u64| {
            now.spenders
                .iter()
                .find(|s| s.user_id == user)
                .map(|s| s.rank)
        };
        let mine = now
            .spenders
            .iter()
            .find(|s| s.user_id == leader.user_id)
            .expect("the leader is still ranked (30 users, limit 1000)");
        let reranked = mine.converted_minor == new_amount
            && overtaking
                .iter()
                .all(|o| rank_of(*o).is_some_and(|r| r < mine.rank));
        // Ranked by converted amount.
        let ordered = now
            .spenders
            .windows(2)
            .all(|w| w[0].converted_minor >= w[1].converted_minor);
        if reranked && ordered {
            eprintln!(
                "rate change: user {} ({}) from rank {} to {}",
                leader.user_id, leader.currency, leader.rank, mine.rank
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TopSpenders not re-ranked after the rate change: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Budget 1: the user's alerts fire. The issue asks for 2 s; asserted with a 5x margin for
    // a loaded 2-core machine (the time taken is printed).
    db.exec_drop(
        "UPDATE users SET monthly_budget_minor = 1 WHERE user_id = ?",
        (user,),
    )
    .unwrap();
    let (fired, took) = wait_for(&setup.brokers, &topic, "fired", |r| {
        of_user(r, "fired") == expected
    });
    eprintln!("fired on the topic {took:?} after the UPDATE");
    assert!(took < Duration::from_secs(10), "fired after {took:?}");
    for r in fired.iter().filter(|r| r.alert().0 == user) {
        assert_eq!(r.key, user.to_string());
        assert_eq!(r.value["budget_minor"], 1);
        assert_eq!(r.value["currency"], currency.as_str());
        assert!(r.positions.is_some());
    }

    // kill -9, restart, and set the budget back.
    engine.kill().unwrap();
    engine.wait().unwrap();
    engine = setup.engine();
    db.exec_drop(
        "UPDATE users SET monthly_budget_minor = ? WHERE user_id = ?",
        (original, user),
    )
    .unwrap();
    let (records, took) = wait_for(&setup.brokers, &topic, "cleared", |r| {
        of_user(r, "cleared") == expected
    });
    eprintln!("cleared on the topic {took:?} after the UPDATE (restart included)");
    wait_caught_up(&setup, &runtime, &mut engine);
    // A duplicate `fired` from the restart would be written before the gate opened, so before
    // the `cleared` records (one key, one partition): it would be in `records` already.
    let _ = records;
    let records = read_alerts(&setup.brokers, &topic);
    assert!(records.len() >= fired.len());
    assert_alternating(&records);
    for ((u, month, t), states) in sequences(&records) {
        if u == user {
            assert!(
                expected.contains(&(month.clone(), t)),
                "{month} {t}: {states:?}"
            );
            assert_eq!(states, ["fired", "cleared"], "{month} {t}");
        }
    }
    setup.sigterm(&mut engine);
    drop(db);
    setup.clean_up(&runtime);
}

// ---- verify's SQL for alerts and converted totals, against real MariaDB. ----

#[test]
fn verify_computes_alerts_and_converted_totals_in_sql_like_the_rules() {
    use spendflow_engine::verify::Truth;
    use spendflow_engine::verify::mysql::MySqlTruth;
    use spendflow_engine::verify::reference::convert;

    let base = service_env("SPENDFLOW_MYSQL");
    let name = unique_name("spendflow_it_verify_ref");
    let (head, _) = base.rsplit_once('/').unwrap();
    let url = format!("{head}/{name}");
    let (mut db, _) = spendflow_engine::mysql_client::connect(&url, true).unwrap();
    db.query_drop(
        "CREATE TABLE users (user_id BIGINT UNSIGNED PRIMARY KEY, \
         monthly_budget_minor BIGINT NULL, currency CHAR(3) NOT NULL)",
    )
    .unwrap();
    db.query_drop(
        "CREATE TABLE expenses (expense_id VARCHAR(32) PRIMARY KEY, user_id BIGINT UNSIGNED, \
         category VARCHAR(32) NOT NULL, amount_minor BIGINT NOT NULL, event_time DATETIME(3) NOT NULL)",
    )
    .unwrap();
    // Without fx_rates: no reference data in the truth.
    let mut truth = MySqlTruth::connect(&url).unwrap();
    assert_eq!(truth.reference(Some("EUR")).unwrap(), None);
    drop(truth);
    db.query_drop(
        "CREATE TABLE fx_rates (currency CHAR(3) PRIMARY KEY, rate_micros BIGINT NOT NULL)",
    )
    .unwrap();
    db.query_drop(
        "INSERT INTO fx_rates VALUES ('SEK', 87654), ('GBP', 1500000), ('NOK', 500000), ('EUR', 999)",
    )
    .unwrap();
    // (user, budget, currency)
    let users: [(u64, Option<i64>, &str); 7] = [
        (1, Some(1_000), "EUR"),
        (2, Some(0), "SEK"),
        (3, None, "USD"),
        (4, Some(10), "GBP"),
        (5, Some(i64::MAX), "NOK"),
        (6, Some(3), "NOK"),
        (7, Some(100), "SEK"),
    ];
    for (u, b, c) in users {
        db.exec_drop("INSERT INTO users VALUES (?, ?, ?)", (u, b, c))
            .unwrap();
    }
    // (user, amount, event_time)
    let expenses: [(u64, i64, &str); 12] = [
        // 1: November at exactly 80 %, December at 100 % (a refund included), January under.
        (1, 800, "2026-11-03 10:00:00.000"),
        (1, 1_200, "2026-12-31 23:59:59.999"),
        (1, -200, "2026-12-01 00:00:00.000"),
        (1, 799, "2027-01-01 00:00:00.000"),
        // 2: budget 0, no alert; converted at the SEK rate.
        (2, 123_456_789, "2026-11-05 00:00:00.000"),
        // 3: no budget, no rate: neither.
        (3, 50, "2026-11-05 00:00:00.000"),
        // 4: a net refund, -15 GBP minor units at 1.5: -22.5 rounds to -23.
        (4, -15, "2026-11-05 00:00:00.000"),
        // 5: a huge budget; 9e15 at 0.5.
        (5, 9_000_000_000_000_000, "2026-11-05 00:00:00.000"),
        // 6: one minor unit at 0.5 rounds half away from zero, to 1; 3 of 3: both fire.
        (6, 1, "2026-11-05 00:00:00.000"),
        (6, 2, "2026-11-06 00:00:00.000"),
        // 7: 99 of 100 crosses 80 only.
        (7, 99, "2026-10-31 23:59:59.999"),
        // A user without a row: no alert, no conversion.
        (8, 1_000, "2026-11-05 00:00:00.000"),
    ];
    for (i, (u, a, t)) in expenses.iter().enumerate() {
        db.exec_drop(
            "INSERT INTO expenses VALUES (?, ?, 'c', ?, ?)",
            (format!("e{i}"), u, a, t),
        )
        .unwrap();
    }
    let mut truth = MySqlTruth::connect(&url).unwrap();
    let reference = truth.reference(Some("EUR")).unwrap().unwrap();
    let m = |y: i32, mo: i32| y * 12 + mo - 1;
    assert_eq!(
        reference.fired.iter().copied().collect::<Vec<_>>(),
        [
            (1, m(2026, 11), 80),
            (1, m(2026, 12), 80),
            (1, m(2026, 12), 100),
            (6, m(2026, 11), 80),
            (6, m(2026, 11), 100),
            (7, m(2026, 10), 80),
        ]
    );
    let converted = reference.converted.clone().unwrap();
    let want: BTreeMap<u64, i128> = BTreeMap::from([
        // EUR is the reporting currency: exactly 1, whatever fx_rates says of it.
        (1, 2_599),
        (2, convert(123_456_789, 87_654)),
        (4, -23),
        (5, 4_500_000_000_000_000),
        (6, convert(3, 500_000)),
        (7, convert(99, 87_654)),
    ]);
    assert_eq!(converted, want);
    // Budgets of the users with a row and a live expense; NULL is no budget (0).
    let budgets: Vec<(u64, i64, &str)> = reference
        .budgets
        .iter()
        .map(|(u, (b, c))| (*u, *b, c.as_str()))
        .collect();
    assert_eq!(
        budgets,
        [
            (1, 1_000, "EUR"),
            (2, 0, "SEK"),
            (3, 0, "USD"),
            (4, 10, "GBP"),
            (5, i64::MAX, "NOK"),
            (6, 3, "NOK"),
            (7, 100, "SEK"),
        ]
    );
    assert_eq!(convert(3, 500_000), 2);
    // Without a reporting currency: alerts only.
    assert_eq!(truth.reference(None).unwrap().unwrap().converted, None);
    drop(truth);
    db.query_drop(format!("DROP DATABASE `{name}`")).unwrap();
}

#[test]
fn the_output_works_through_the_sasl_ssl_listener_with_the_engines_options() {
    use spendflow_engine::kafka_client::KafkaOptions;

    // Every client of the output (topic creation, the transactional producer, the reader at
    // open) takes the options: the SASL_SSL listener accepts nothing else.
    let brokers = service_env("SPENDFLOW_KAFKA_SASL_SSL");
    let mut options = KafkaOptions::new();
    for (k, v) in [
        ("security.protocol", "SASL_SSL".to_string()),
        ("sasl.mechanisms", "PLAIN".to_string()),
        ("sasl.username", service_env("SPENDFLOW_KAFKA_SASL_USER")),
        (
            "sasl.password",
            service_env("SPENDFLOW_KAFKA_SASL_PASSWORD"),
        ),
        ("ssl.ca.location", service_env("SPENDFLOW_SERVICES_CA")),
    ] {
        options.insert(k, v).unwrap();
    }
    let topic = unique_name("sf_alerts_sasl");
    let config = AlertsTopicConfig {
        librdkafka_options: options,
        ..AlertsTopicConfig::new(&brokers, &topic)
    };
    let out = AlertsOutput::open(&config).unwrap();
    assert!(out.publish(1, &at(1), &[event(1, Fired)], false));
    assert!(out.flush(Duration::from_secs(60)));
    out.close(Duration::from_secs(30)).unwrap();
    // Opened again (read through SASL_SSL): the fired alert is known, not written twice.
    let out = AlertsOutput::open(&config).unwrap();
    assert!(out.publish(1, &at(1), &[event(1, Fired)], true));
    assert!(out.flush(Duration::from_secs(60)));
    assert_eq!(out.written(), (0, 0));
    out.close(Duration::from_secs(30)).unwrap();
    // The plain listener is the same cluster.
    let records = read_alerts(&service_env("SPENDFLOW_KAFKA"), &topic);
    assert_eq!(records.len(), 1, "{records:?}");
}
