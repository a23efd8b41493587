//! Shared helpers for the integration tests that talk to real services
//! (`service_kafka.rs`, `service_cassandra.rs`, `service_mysql.rs`, `service_hdfs.rs`; the
//! end-to-end runs of the crash and outage tests are in [`stream`]; reflection and health checks
//! of the gRPC servers in [`grpc`]).
//!
//! The services are started by `docker/native/services up` (or `make test`, which also sets
//! the variables and stops the services afterwards). A test whose variable is unset fails with
//! instructions; it never passes silently.
#![allow(dead_code)] // each test binary uses its own subset

pub mod cluster;
pub mod grpc;
pub mod stream;

use std::future::Future;
use std::time::Duration;

/// Address of a running service, read from the environment (`SPENDFLOW_KAFKA`,
/// `SPENDFLOW_CASSANDRA`, `SPENDFLOW_MYSQL`, `SPENDFLOW_HDFS`).
///
/// Panics with instructions when the variable is unset or empty.
#[track_caller]
pub fn service_env(var: &str) -> String {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => value.trim().to_string(),
        _ => panic!(
            "{var} is not set, so this test cannot reach its real service.\n\
             Start the services and export their addresses, then rerun:\n\
             \n    docker/native/services up\n    eval \"$(docker/native/services env)\"\n\
             \nor run the whole suite with `make test` (starts, tests, stops).\n\
             See docker/native/README.md."
        ),
    }
}

/// A name that is unique per run, usable as a Kafka topic, Cassandra keyspace, MySQL table or
/// HDFS path component: `<prefix>_<16 hex digits>` (lowercase ASCII, digits, underscore).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// A CA certificate of our own (`<dir>/other-ca.pem`, made with openssl), which signed nothing
/// the services kit serves: a client trusting only it must refuse the kit's servers.
pub fn foreign_ca(dir: &std::path::Path) -> std::path::PathBuf {
    let other = dir.join("other-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not the kit's CA", "-keyout"])
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    other
}

/// Awaits `fut`, failing the test with `what` if it takes longer than `secs` seconds.
pub async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// Creates Kafka topics `(name, partitions)` (replication 1) on `brokers`, failing the test if
/// any cannot be created.
pub fn create_topics(brokers: &str, topics: &[(String, i32)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let results = runtime
        .block_on(admin.create_topics(&topics, &options))
        .expect("create_topics");
    for result in results {
        result.unwrap_or_else(|(name, e)| panic!("creating {name}: {e}"));
    }
}

/// Every dead letter on `topic` as `(payload, spendflow.reason header)`, once `expected` have
/// arrived and no more follow for half a second (a duplicate would show up as one too many).
pub fn read_dead_letters(brokers: &str, topic: &str, expected: usize) -> Vec<(Vec<u8>, String)> {
    use std::time::Instant;

    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("sf_dead_letter_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let mut quiet = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                quiet = 0;
                let reason = message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "spendflow.reason"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                out.push((message.payload().unwrap_or_default().to_vec(), reason));
            }
            None if out.len() >= expected => {
                quiet += 1;
                if quiet >= 5 {
                    break;
                }
            }
            _ => {}
        }
    }
    out
}

/// An idempotent Kafka producer on `brokers` for tests that write input records.
pub fn producer(brokers: &str) -> rdkafka::producer::BaseProducer {
    rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}
