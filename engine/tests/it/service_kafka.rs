//! Kafka (rdkafka) against the real broker: create a topic, produce, consume, delete the topic.
//! Needs `SPENDFLOW_KAFKA` (see `docker/native/services env`).

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::support::{service_env, unique_name, within};

const RECORDS: usize = 20;

#[tokio::test]
async fn kafka_create_topic_produce_consume() {
    let bootstrap = service_env("SPENDFLOW_KAFKA");
    let topic = unique_name("spendflow_it_kafka");

    // Create the topic explicitly (2 partitions) and wait for the result.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let created = within(
        60,
        "create topic",
        admin.create_topics(
            &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
            &opts,
        ),
    )
    .await
    .expect("create_topics request");
    for result in created {
        result.unwrap_or_else(|(name, err)| panic!("creating topic {name}: {err}"));
    }

    // Produce RECORDS keyed records and wait for every delivery report.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let mut sent = BTreeSet::new();
    for i in 0..RECORDS {
        let key = format!("user-{}", i % 4);
        let payload = format!(
            r#"{{"expense_id":"e-{i}","user_id":{},"amount_minor":{}}}"#,
            i % 4,
            100 + i
        );
        let delivery = within(
            60,
            "produce",
            producer.send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(30),
            ),
        )
        .await
        .unwrap_or_else(|(err, _)| panic!("delivery of record {i} failed: {err}"));
        assert!(
            delivery.offset >= 0,
            "delivered at offset {}",
            delivery.offset
        );
        sent.insert(payload);
    }

    // Consume everything back from the beginning with a fresh group.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique_name("spendflow_it_group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let mut received = BTreeSet::new();
    within(90, "consume all produced records", async {
        while received.len() < RECORDS {
            let msg = consumer.recv().await.expect("consume");
            assert_eq!(msg.topic(), topic);
            let payload = std::str::from_utf8(msg.payload().expect("payload")).expect("utf-8");
            let key = std::str::from_utf8(msg.key().expect("key")).expect("utf-8");
            assert!(key.starts_with("user-"), "unexpected key {key}");
            received.insert(payload.to_string());
        }
    })
    .await;
    assert_eq!(received, sent, "consumed records differ from produced ones");

    drop(consumer);
    let deleted = within(60, "delete topic", admin.delete_topics(&[&topic], &opts))
        .await
        .expect("delete_topics request");
    for result in deleted {
        result.unwrap_or_else(|(name, err)| panic!("deleting topic {name}: {err}"));
    }
}
