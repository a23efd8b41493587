//! Dead letters against the real broker: a failed delivery is kept, retried and holds back
//! `flush` (so a checkpoint waits), and a restart reads only the dead letters written after the
//! checkpoint.
//!
//! Failing deliveries deterministically: the dead-letter topic is created with
//! `max.message.bytes=64`, so the broker refuses every dead letter larger than that
//! (MESSAGE_TOO_LARGE, a definite refusal, not a timeout). Raising the topic's limit with
//! AlterConfigs makes the same dead letter deliverable: the retry then lands it, once.
//!
//! Needs SPENDFLOW_KAFKA (`docker/native/services env`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use spendflow_engine::checkpoint::SavedPosition;
use spendflow_engine::kafka_client::KafkaOptions;
use spendflow_engine::sink::dead_letter::kafka::KafkaDeadLetters;
use spendflow_engine::sink::dead_letter::{DeadLetterOutput, RejectedRecord};
use spendflow_operators::RejectReason;

use crate::support::{create_topics, read_dead_letters, service_env, unique_name};

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

fn rejected(source: &str, offset: i64) -> RejectedRecord {
    RejectedRecord {
        reason: RejectReason::BadJson,
        detail: "test".into(),
        source: Arc::from(source),
        partition: 0,
        offset,
        raw_prefix: Vec::new(),
    }
}

#[test]
fn a_refused_dead_letter_is_retried_and_holds_back_flush_until_delivered() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let topic = unique_name("sf_it_dl_refused");
    let admin = admin(&brokers);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new = NewTopic::new(&topic, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "64");
    for r in runtime
        .block_on(admin.create_topics([&new], &options))
        .unwrap()
    {
        r.unwrap();
    }

    let output = KafkaDeadLetters::new(&brokers, &topic, &KafkaOptions::new()).unwrap();
    let big = vec![b'x'; 2000];
    output.send(&rejected("input", 7), &big, Some(b"k"));
    assert!(
        !output.flush(),
        "flush must fail while the dead letter is refused"
    );
    let status = output.delivery_status();
    assert_eq!(status.undelivered, 1, "{status:?}");
    assert!(status.failures >= 1, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.to_lowercase().contains("large")),
        "{status:?}"
    );

    // The broker accepts it now: the kept dead letter is sent again and delivered.
    let alter =
        AlterConfig::new(ResourceSpecifier::Topic(&topic)).set("max.message.bytes", "1048588");
    for r in runtime
        .block_on(admin.alter_configs([&alter], &options))
        .unwrap()
    {
        r.unwrap();
    }
    let mut delivered = false;
    for _ in 0..6 {
        if output.flush() {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "{:?}", output.delivery_status());
    assert_eq!(output.delivery_status().undelivered, 0);
    let letters = read_dead_letters(&brokers, &topic, 1);
    assert_eq!(letters.len(), 1, "delivered exactly once");
    assert_eq!(letters[0].0, big);
}

#[test]
fn a_restart_reads_only_the_dead_letters_after_the_checkpoint() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let topic = unique_name("sf_it_dl_scan");
    create_topics(&brokers, &[(topic.clone(), 1)]);
    let source = "expenses.user.1";

    // A first run dead-letters source offsets 0..30; its checkpoint stands at 20.
    let first = KafkaDeadLetters::new(&brokers, &topic, &KafkaOptions::new()).unwrap();
    for offset in 0..30 {
        first.send(&rejected(source, offset), b"{bad", None);
    }
    assert!(first.flush());
    let at = |position: i64| {
        vec![SavedPosition {
            source: source.into(),
            partition: 0,
            position,
        }]
    };
    let scan = first.scan_start(&at(20)).expect("a scan start");
    assert_eq!(scan.topic, topic);
    assert_eq!(
        scan.from,
        vec![(0, 20)],
        "the dead letter of source offset 20 is the 21st in the topic"
    );
    first.checkpointed(&at(20));
    drop(first);

    // The restart reads from there: it finds exactly the 10 dead letters after the
    // checkpoint, even when told every source offset counts (`from` empty), so it read
    // nothing before them.
    let mut second = KafkaDeadLetters::new(&brokers, &topic, &KafkaOptions::new()).unwrap();
    let found = second
        .skip_written(&brokers, &BTreeMap::new(), Some(&scan))
        .unwrap();
    assert_eq!(found, 10);
    // Reading again from 20, it does not send what is there, and sends what is new.
    for offset in 20..35 {
        second.send(&rejected(source, offset), b"{bad", None);
    }
    assert!(second.flush());
    // A checkpoint of the second run at 25: the dead letters of 25..30 were written by the
    // first run, and the scan start still covers them.
    let scan = second.scan_start(&at(25)).expect("a scan start");
    assert_eq!(scan.from, vec![(0, 25)]);
    drop(second);

    let mut third = KafkaDeadLetters::new(&brokers, &topic, &KafkaOptions::new()).unwrap();
    let found = third
        .skip_written(
            &brokers,
            &BTreeMap::from([((source.to_string(), 0), 25)]),
            Some(&scan),
        )
        .unwrap();
    assert_eq!(found, 10, "25..35");
    drop(third);

    let letters = read_dead_letters(&brokers, &topic, 35);
    assert_eq!(letters.len(), 35, "each source record's dead letter once");
}
