//! The Kafka source tells the truth, against a real broker (`SPENDFLOW_KAFKA`):
//!
//! * `caught_up` is never vacuously true: not while the topic the engine is told to read does
//!   not exist yet (every worker owning no partition used to count as "all read");
//! * records deleted from Kafka after a checkpoint's position (`delete_records`) stop that
//!   partition on restart, with the lost range in the status, while the others keep being
//!   served; `--on-data-loss skip` continues from the oldest record and still reports the range;
//! * a topic deleted while it is read stays in the status as `deleted` with its lag, is warned
//!   about once, and everything else keeps being read.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::support::{create_topics, producer, service_env, unique_name};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use spendflow_engine::checkpoint::Checkpoint;
use spendflow_engine::config::CheckpointConfig;
use spendflow_engine::source::generator::{GeneratorConfig, Simulator};
use spendflow_engine::source::kafka::{KafkaSourceConfig, OnDataLoss};
use spendflow_engine::source::{OffsetRange, PartitionPosition, PartitionState};
use spendflow_engine::{Engine, EngineConfig, SourceConfig, Status};

/// Everything the engines of this test binary log (to count warnings).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&sink)))
            .try_init();
        logs
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(buf)?;
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(all: &[&str]) -> Vec<String> {
    let logs = logs().lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| all.iter().all(|s| l.contains(s)))
        .map(str::to_string)
        .collect()
}

/// Sends `n` valid simulated records to `topic` (partitions chosen by the client) and waits
/// until all are delivered.
fn produce(brokers: &str, topic: &str, n: usize, seed: u64) {
    let producer = producer(brokers);
    let mut simulator = Simulator::new(GeneratorConfig {
        seed,
        users: 20,
        bad_rate: 0.0,
        ..GeneratorConfig::default()
    })
    .unwrap();
    for i in 0..n {
        let generated = simulator.next_record();
        let key = format!("k{i}");
        let mut record = BaseRecord::to(topic).key(&key).payload(&generated.bytes);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn engine(
    source: KafkaSourceConfig,
    workers: usize,
    checkpoints: Option<&std::path::Path>,
) -> Engine {
    let config = EngineConfig {
        workers,
        epoch_interval_ms: 20,
        source: Some(SourceConfig::Kafka(source)),
        dead_letter_topic: unique_name("sf_k1_dlq"),
        checkpoint: checkpoints.map(|dir| CheckpointConfig {
            dir: dir.to_path_buf(),
            interval_ms: 100,
            discard_unreadable: false,
        }),
        ..EngineConfig::default()
    };
    Engine::builder().config(config).start().unwrap()
}

/// Waits (at most 60 s) until `done` holds for the engine's status; returns that status.
#[track_caller]
fn wait_until(engine: &Engine, what: &str, done: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = engine.status();
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen in 60 s; last status: read {}, caught_up {}, partitions {:#?}",
            status.records_read,
            status.caught_up,
            status.partitions
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn find<'a>(status: &'a Status, topic: &str) -> Option<&'a PartitionPosition> {
    status.partitions.iter().find(|p| &*p.source == topic)
}

#[track_caller]
fn partition<'a>(status: &'a Status, topic: &str) -> &'a PartitionPosition {
    find(status, topic)
        .unwrap_or_else(|| panic!("{topic} not in the status: {:#?}", status.partitions))
}

#[test]
fn caught_up_is_false_until_the_topic_exists_and_is_read() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let topic = unique_name("sf_k1_late");
    let mut source = KafkaSourceConfig::topic(&brokers, &topic);
    source.discovery_interval_ms = 50;
    // Two workers, and (below) a topic with one partition: one worker never owns anything.
    let engine = engine(source, 2, None);

    // The topic does not exist: nothing the engine will read has been found, so it is not
    // caught up, however often the workers poll (the old source said "every assigned partition
    // is at its end" over no partition at all, within milliseconds).
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let status = engine.status();
        assert!(
            !status.caught_up,
            "caught up before the topic {topic} exists: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    create_topics(&brokers, &[(topic.clone(), 1)]);
    produce(&brokers, &topic, 300, 11);
    let status = wait_until(&engine, "caught up with 300 records", |s| {
        s.caught_up && s.records_read == 300
    });
    assert_eq!(partition(&status, &topic).high_watermark, Some(300));
    assert_eq!(partition(&status, &topic).state, PartitionState::Reading);
    engine.shutdown().unwrap();
}

/// Positions of the newest checkpoint file in `dir`, if any can be read.
fn newest_checkpoint(dir: &std::path::Path) -> Option<Checkpoint> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-"))
        })
        .collect();
    files.sort();
    let file = std::fs::File::open(files.last()?).ok()?;
    Checkpoint::decode(std::io::BufReader::new(file)).ok()
}

fn position_in(checkpoint: &Checkpoint, topic: &str) -> Option<i64> {
    checkpoint
        .positions
        .iter()
        .find(|p| p.source == topic && p.partition == 0)
        .map(|p| p.position)
}

#[test]
fn records_deleted_after_the_checkpoint_stop_the_partition_or_are_skipped_on_request() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    logs();
    let prefix = unique_name("sf_k1_loss");
    let (a, b) = (format!("{prefix}.a"), format!("{prefix}.b"));
    create_topics(&brokers, &[(a.clone(), 1), (b.clone(), 1)]);
    produce(&brokers, &a, 100, 1);
    produce(&brokers, &b, 100, 2);
    let checkpoints = tempfile::tempdir().unwrap();
    let pattern = || {
        let mut source = KafkaSourceConfig::pattern(&brokers, format!(r"{prefix}\.[ab]"));
        source.discovery_interval_ms = 100;
        source
    };

    // 1. Read everything and wait for a checkpoint that covers it.
    let first = engine(pattern(), 2, Some(checkpoints.path()));
    wait_until(&first, "caught up with 200 records", |s| {
        s.caught_up && s.records_read == 200
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !newest_checkpoint(checkpoints.path())
        .is_some_and(|c| position_in(&c, &a) == Some(100) && position_in(&c, &b) == Some(100))
    {
        assert!(Instant::now() < deadline, "no checkpoint at 100/100");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.shutdown().unwrap();

    // 2. While it is down: 50 more records each, and the first 110 of `a` deleted, so `a`'s
    //    records [100, 110) are gone before the engine read them.
    produce(&brokers, &a, 50, 3);
    produce(&brokers, &b, 50, 4);
    let mut delete = TopicPartitionList::new();
    delete
        .add_partition_offset(&a, 0, Offset::Offset(110))
        .unwrap();
    let deleted = runtime()
        .block_on(admin(&brokers).delete_records(&delete, &AdminOptions::new()))
        .expect("delete_records");
    for element in deleted.elements() {
        element.error().expect("records deleted");
    }

    // 3. Restart (default: fail): `a` stops with the range, `b` keeps being read and served.
    let second = engine(pattern(), 2, Some(checkpoints.path()));
    // (Each worker refreshes the partitions it shows every 250 ms while nothing changes, so
    // `a`'s stop may show a little after `b`'s reads.)
    let status = wait_until(&second, "b read to its end and a stopped", |s| {
        find(s, &b).is_some_and(|p| p.position == 150)
            && s.records_read == 250
            && find(s, &a).is_some_and(|p| p.state == PartitionState::StoppedDataLoss)
    });
    let pa = partition(&status, &a);
    assert_eq!(pa.state, PartitionState::StoppedDataLoss, "{pa:?}");
    assert_eq!(pa.lost, vec![OffsetRange { from: 100, to: 110 }]);
    assert_eq!(pa.position, 100, "a stopped where the checkpoint left it");
    assert!(
        pa.error
            .as_deref()
            .is_some_and(|e| e.contains("[100, 110)")),
        "{pa:?}"
    );
    assert_eq!(partition(&status, &b).state, PartitionState::Reading);
    // Served: `b`'s new records are in the published state (everything read is covered).
    wait_until(&second, "b's records published", |s| {
        s.as_of
            .positions
            .iter()
            .any(|p| *p.source == b && p.position == 150)
    });
    // `a` keeps its lag (its end is known), so the engine is not caught up, now or later.
    let status = wait_until(&second, "a's end known", |s| {
        find(s, &a).is_some_and(|p| p.high_watermark == Some(150))
    });
    assert!(!status.caught_up, "caught up with a stopped partition");
    for _ in 0..20 {
        assert!(
            !second.status().caught_up,
            "caught up with a stopped partition"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !log_lines_with(&["ERROR", &a, "[100, 110)"]).is_empty(),
        "no ERROR naming {a} and [100, 110)"
    );
    second.shutdown().unwrap();

    // 4. Restart with `skip`: `a` continues from 110 and still reports the lost range.
    let mut source = pattern();
    source.on_data_loss = OnDataLoss::Skip;
    let third = engine(source, 2, Some(checkpoints.path()));
    let status = wait_until(&third, "caught up after skipping", |s| s.caught_up);
    let pa = partition(&status, &a);
    assert_eq!(pa.state, PartitionState::Reading);
    assert_eq!(pa.position, 150);
    assert_eq!(pa.lost, vec![OffsetRange { from: 100, to: 110 }]);
    assert_eq!(partition(&status, &b).position, 150);
    // 200 before the checkpoint, 40 of `a` after the gap, 50 of `b`.
    assert_eq!(status.records_read, 290);
    third.shutdown().unwrap();
}

#[test]
fn a_topic_deleted_while_read_keeps_its_lag_warns_once_and_the_rest_is_served() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    logs();
    let prefix = unique_name("sf_k1_del");
    let (a, b) = (format!("{prefix}.a"), format!("{prefix}.b"));
    create_topics(&brokers, &[(a.clone(), 1), (b.clone(), 1)]);
    produce(&brokers, &a, 100, 5);
    produce(&brokers, &b, 100, 6);
    let mut source = KafkaSourceConfig::pattern(&brokers, format!(r"{prefix}\.[ab]"));
    source.discovery_interval_ms = 100;
    let engine = engine(source, 2, None);
    wait_until(&engine, "caught up with 200", |s| {
        s.caught_up && s.records_read == 200
    });

    let results = runtime()
        .block_on(admin(&brokers).delete_topics(&[&a], &AdminOptions::new()))
        .expect("delete_topics");
    for result in results {
        result.expect("topic deleted");
    }
    let status = wait_until(&engine, "a shown as deleted", |s| {
        find(s, &a).is_some_and(|p| p.state == PartitionState::Deleted)
    });
    assert!(!status.caught_up);
    assert_eq!(partition(&status, &a).position, 100);

    // The rest keeps being read and served.
    produce(&brokers, &b, 50, 7);
    wait_until(&engine, "b's new records published", |s| {
        s.records_read == 250
            && s.as_of
                .positions
                .iter()
                .any(|p| *p.source == b && p.position == 150)
    });
    // Some discovery rounds later: still one warning, never caught up.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        let status = engine.status();
        assert!(!status.caught_up, "caught up with a deleted topic");
        assert_eq!(partition(&status, &a).state, PartitionState::Deleted);
        std::thread::sleep(Duration::from_millis(20));
    }
    let warnings = log_lines_with(&["WARN", &a]);
    assert_eq!(warnings.len(), 1, "one warning about {a}: {warnings:#?}");
    assert!(warnings[0].contains("deleted"), "{warnings:#?}");
    engine.shutdown().unwrap();
}
