//! The Kafka source against a real broker (`SPENDFLOW_KAFKA`): per-user topics read by pattern,
//! a topic created while the engine runs, user checks, dead letters with their headers, and a
//! keyed topic split across two workers. Results are compared with recomputation.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::{create_topics, producer, read_dead_letters, service_env, unique_name};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use spendflow_engine::source::generator::{GeneratorConfig, Simulator};
use spendflow_engine::source::kafka::KafkaSourceConfig;
use spendflow_engine::{Engine, EngineConfig, SourceConfig};
use spendflow_operators::Record;
use spendflow_operators::oracle::recompute;

fn send(producer: &BaseProducer, topic: &str, key: Option<&str>, payload: &[u8]) {
    let mut record = BaseRecord::to(topic).payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    let mut record = record;
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                producer.poll(Duration::from_millis(10));
            }
        }
    }
}

/// Waits until the engine has read `expected` records and is caught up.
fn wait_for(engine: &Engine, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = engine.status();
        if status.caught_up && status.records_read == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not caught up with {expected} records in 90 s: read {}, caught_up {}, partitions {:?}",
            status.records_read,
            status.caught_up,
            status
                .partitions
                .iter()
                .filter(|p| p.high_watermark != Some(p.position))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn engine(source: KafkaSourceConfig, workers: usize, dead_letter_topic: &str) -> Engine {
    let config = EngineConfig {
        workers,
        epoch_interval_ms: 20,
        source: Some(SourceConfig::Kafka(source)),
        dead_letter_topic: dead_letter_topic.to_string(),
        ..EngineConfig::default()
    };
    Engine::builder().config(config).start().unwrap()
}

fn assert_matches_recomputation(engine: &Engine, truth: &[Record]) {
    let expected = recompute(truth.iter());
    let snapshot = engine.read_model().snapshot();
    let mut served = BTreeMap::new();
    for user in snapshot.users_after(None) {
        served.insert(user.user_id, (user.expense_count, user.total_minor));
    }
    let expected_users: BTreeMap<_, _> = expected
        .cells
        .iter()
        .filter_map(|(k, v)| match k {
            spendflow_operators::AggKey::User(u) => Some((*u, (v.0, i128::from(v.1)))),
            _ => None,
        })
        .collect();
    assert_eq!(served, expected_users);
    for (user, last) in &expected.last_seen {
        assert_eq!(
            snapshot.user(*user).and_then(|u| u.last_event_ms),
            Some(*last),
            "user {user}"
        );
    }
}

#[test]
fn per_user_topics_by_pattern_with_dead_letters_and_late_topics() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let prefix = format!("{}.user.", unique_name("sf_it"));
    let dlq = unique_name("sf_it_dlq");
    let users = 20u64;
    create_topics(
        &brokers,
        &(1..=users)
            .map(|u| (format!("{prefix}{u}"), 1))
            .collect::<Vec<_>>(),
    );

    // Simulated records, each to its user's topic; a malformed one goes to its user's topic too.
    let config = GeneratorConfig {
        seed: 5,
        users,
        bad_rate: 0.02,
        ..GeneratorConfig::default()
    };
    let mut simulator = Simulator::new(config).unwrap();
    let producer = producer(&brokers);
    let mut truth = Vec::new();
    let mut malformed = Vec::new();
    for _ in 0..5_000 {
        let generated = simulator.next_record();
        let user = generated.user_id.clamp(1, users);
        send(
            &producer,
            &format!("{prefix}{user}"),
            None,
            &generated.bytes,
        );
        match generated.record {
            Some(record) => truth.push(record),
            None => malformed.push(generated.bytes),
        }
    }
    // A record in the wrong user's topic is rejected, not counted for either user.
    let wrong = br#"{"expense_id":"w-1","user_id":2,"merchant":"Tesco","category":"groceries","amount_minor":100,"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}"#;
    send(&producer, &format!("{prefix}1"), None, wrong);
    producer.flush(Duration::from_secs(30)).unwrap();
    let produced = 5_001u64;

    let mut source = KafkaSourceConfig::pattern(&brokers, format!("{}.*", regex_escape(&prefix)));
    source.user_topic_prefix = prefix.clone();
    source.discovery_interval_ms = 300;
    let engine = engine(source, 2, &dlq);
    wait_for(&engine, produced);
    assert_matches_recomputation(&engine, &truth);
    let status = engine.status();
    assert_eq!(status.records_rejected, malformed.len() as u64 + 1);
    assert_eq!(status.rejected_by_reason.get("user_mismatch"), Some(&1));
    let assigned = status
        .partitions
        .iter()
        .filter(|p| p.source.starts_with(&prefix))
        .count();
    assert_eq!(
        assigned, users as usize,
        "every topic assigned once over the workers"
    );

    // A topic created after the engine started is picked up and counted.
    let late_user = users + 1;
    create_topics(&brokers, &[(format!("{prefix}{late_user}"), 1)]);
    let late = br#"{"expense_id":"late-1","user_id":21,"merchant":"Aldi","category":"groceries","amount_minor":4200,"currency":"EUR","event_time":"2026-11-24T11:00:00Z"}"#;
    send(&producer, &format!("{prefix}{late_user}"), None, late);
    producer.flush(Duration::from_secs(30)).unwrap();
    wait_for(&engine, produced + 1);
    let snapshot = engine.read_model().snapshot();
    assert_eq!(snapshot.user(late_user).map(|u| u.total_minor), Some(4200));
    engine.shutdown().unwrap();

    // The dead-letter topic holds exactly the rejected records, bytes unchanged, with reasons.
    let letters = read_dead_letters(&brokers, &dlq, malformed.len() + 1);
    assert_eq!(
        letters.len(),
        malformed.len() + 1,
        "each rejected record exactly once"
    );
    let mut got: Vec<Vec<u8>> = letters.iter().map(|(bytes, _)| bytes.clone()).collect();
    let mut want = malformed.clone();
    want.push(wrong.to_vec());
    got.sort();
    want.sort();
    let missing: Vec<String> = want
        .iter()
        .filter(|w| !got.contains(w))
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let extra: Vec<String> = got
        .iter()
        .filter(|g| !want.contains(g))
        .map(|g| String::from_utf8_lossy(g).into_owned())
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    assert!(letters.iter().all(|(_, reason)| !reason.is_empty()));
    assert!(letters.iter().any(|(_, reason)| reason == "user_mismatch"));
}

#[test]
fn keyed_topic_split_over_two_workers() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let topic = unique_name("sf_it_keyed");
    let dlq = unique_name("sf_it_dlq");
    create_topics(&brokers, &[(topic.clone(), 4)]);
    let config = GeneratorConfig {
        seed: 9,
        users: 50,
        bad_rate: 0.01,
        ..GeneratorConfig::default()
    };
    let mut simulator = Simulator::new(config).unwrap();
    let producer = producer(&brokers);
    let mut truth = Vec::new();
    for _ in 0..5_000 {
        let generated = simulator.next_record();
        send(
            &producer,
            &topic,
            Some(&generated.user_id.to_string()),
            &generated.bytes,
        );
        truth.extend(generated.record);
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let engine = engine(KafkaSourceConfig::topic(&brokers, &topic), 2, &dlq);
    wait_for(&engine, 5_000);
    assert_matches_recomputation(&engine, &truth);
    let status = engine.status();
    let partitions: Vec<_> = status
        .partitions
        .iter()
        .filter(|p| p.source.as_ref() == topic)
        .collect();
    assert_eq!(partitions.len(), 4);
    assert!(
        partitions
            .iter()
            .all(|p| p.high_watermark == Some(p.position)),
        "no lag"
    );
    let as_of: i64 = status.as_of.positions.iter().map(|p| p.position).sum();
    assert_eq!(as_of, 5_000, "the served epoch covers every offset");
    engine.shutdown().unwrap();
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| if c == '.' { vec!['\\', '.'] } else { vec![c] })
        .collect()
}

/// An expense is `(user_id, expense_id)`: a record in user 99's topic that reuses user 5's
/// `expense_id` (a delete, then an upsert) is about user 99's own expense, and leaves user 5's
/// totals alone.
#[test]
fn one_users_records_never_change_another_users_expense() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let prefix = format!("{}.user.", unique_name("sf_it_owner"));
    let dlq = unique_name("sf_it_owner_dlq");
    let (victim, intruder) = (5u64, 99u64);
    create_topics(
        &brokers,
        &[
            (format!("{prefix}{victim}"), 1),
            (format!("{prefix}{intruder}"), 1),
        ],
    );
    let record = |user: u64, op: &str, amount: i64| {
        format!(
            r#"{{"expense_id":"shared-id","user_id":{user},"merchant":"Tesco","category":"groceries","amount_minor":{amount},"currency":"EUR","event_time":"2026-11-24T10:15:00Z","op":"{op}"}}"#
        )
    };
    let producer = producer(&brokers);
    send(
        &producer,
        &format!("{prefix}{victim}"),
        None,
        record(victim, "upsert", 4_200).as_bytes(),
    );
    producer.flush(Duration::from_secs(10)).unwrap();
    let mut source = KafkaSourceConfig::pattern(&brokers, format!("{}.*", regex_escape(&prefix)));
    source.user_topic_prefix = prefix.clone();
    let engine = engine(source, 2, &dlq);
    wait_for(&engine, 1);
    for (op, amount) in [("delete", 0), ("upsert", 7)] {
        send(
            &producer,
            &format!("{prefix}{intruder}"),
            None,
            record(intruder, op, amount).as_bytes(),
        );
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    wait_for(&engine, 3);

    let snapshot = engine.read_model().snapshot();
    let victim_now = snapshot.user(victim).expect("user 5 keeps their expense");
    assert_eq!(
        (victim_now.total_minor, victim_now.expense_count),
        (4_200, 1)
    );
    let intruder_now = snapshot
        .user(intruder)
        .expect("user 99 has their own expense");
    assert_eq!(
        (intruder_now.total_minor, intruder_now.expense_count),
        (7, 1)
    );
    assert_eq!(engine.status().records_rejected, 0);
    engine.shutdown().unwrap();
}
