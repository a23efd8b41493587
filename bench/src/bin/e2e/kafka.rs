//! The Kafka side of the harness: fresh topics, loading the simulator's records, the steady-rate
//! producer with freshness markers, and the raw consume-and-discard ceiling.
//!
//! Records come from the engine's own seeded [`Simulator`] (the same one `spendflow generate`,
//! the demo and the criterion benches use), laid out with the same [`Layout`] type as
//! `spendflow generate`: one keyed topic (key = user id) or one topic per user.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use spendflow_engine::generate::{KindCounts, Layout};
use spendflow_engine::source::generator::Simulator;

use crate::util::{check_stop, wall_ms};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn admin(brokers: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("create the Kafka admin client")
}

/// Creates `(name, partitions)` topics (replication 1); an existing topic is an error, since
/// every run uses fresh names.
pub fn create_topics(brokers: &str, topics: &[(String, i32)]) -> Result<()> {
    let admin = admin(brokers)?;
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    for chunk in topics.chunks(100) {
        let new: Vec<NewTopic<'_>> = chunk
            .iter()
            .map(|(name, p)| NewTopic::new(name, *p, TopicReplication::Fixed(1)))
            .collect();
        let results = futures::executor::block_on(admin.create_topics(&new, &options))
            .context("create topics")?;
        for result in results {
            if let Err((topic, code)) = result {
                bail!("could not create topic {topic}: {code}");
            }
        }
    }
    Ok(())
}

/// Every topic whose name starts with `prefix`.
pub fn topics_with_prefix(brokers: &str, prefix: &str) -> Result<Vec<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("create a metadata client")?;
    let metadata = consumer
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .with_context(|| format!("list topics on {brokers}"))?;
    Ok(metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// Deletes every topic named `prefix...` (the run's topics, dead letters included).
pub fn delete_topics_with_prefix(brokers: &str, prefix: &str) -> Result<usize> {
    let topics = topics_with_prefix(brokers, prefix)?;
    let admin = admin(brokers)?;
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    for chunk in topics.chunks(100) {
        let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let results = futures::executor::block_on(admin.delete_topics(&names, &options))
            .context("delete topics")?;
        for result in results {
            if let Err((topic, code)) = result
                && code != RDKafkaErrorCode::UnknownTopicOrPartition
            {
                bail!("could not delete topic {topic}: {code}");
            }
        }
    }
    Ok(topics.len())
}

/// Counts delivery failures.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn producer(brokers: &str, linger_ms: &str) -> Result<BaseProducer<Deliveries>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", "spendflow-bench-e2e")
        // Retries must not reorder a partition: the engine applies the last record per
        // expense, so a correction overtaken by its original would change the answer.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms)
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        // The same compression as `spendflow generate`, so consumers pay what they would.
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "60000")
        .create_with_context(Deliveries::default())
        .context("create the Kafka producer")
}

/// Enqueues one message, waiting while librdkafka's queue is full.
fn send(
    producer: &BaseProducer<Deliveries>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
) -> Result<()> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(1));
                check_stop()?;
            }
            Err((e, _)) => bail!("produce to {topic}: {e}"),
        }
    }
}

fn finish(producer: &BaseProducer<Deliveries>) -> Result<()> {
    producer
        .flush(Duration::from_secs(60))
        .context("wait for the producer's acknowledgements")?;
    let failed = producer.context().failed.load(Ordering::Acquire);
    if failed > 0 {
        bail!("{failed} messages could not be delivered");
    }
    Ok(())
}

/// What loading the topics took.
#[derive(Debug)]
pub struct LoadStats {
    pub records: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub kinds: KindCounts,
}

/// Produces the simulator's next `n` records, in order, and waits until Kafka has them all.
pub fn load(brokers: &str, layout: &Layout, sim: &mut Simulator, n: u64) -> Result<LoadStats> {
    let producer = producer(brokers, "5")?;
    let mut kinds = KindCounts::default();
    let mut bytes = 0;
    let start = Instant::now();
    for i in 0..n {
        let generated = sim.next_record();
        kinds.add(generated.kind);
        bytes += generated.bytes.len() as u64;
        let topic = layout.topic_for(generated.user_id);
        let key = Layout::key_for(generated.user_id);
        send(&producer, &topic, key.as_bytes(), &generated.bytes)?;
        if i % 4096 == 0 {
            producer.poll(Duration::ZERO);
            check_stop()?;
        }
    }
    finish(&producer)?;
    Ok(LoadStats {
        records: n,
        bytes,
        elapsed: start.elapsed(),
        kinds,
    })
}

/// The freshness probes: a user of its own that only markers write to. Every marker is a new
/// expense of 1 minor unit, so after the k-th marker the user's expense count is k in spendflow,
/// in Spark and in Cassandra alike, and the first time a system shows count >= k, marker k (and
/// every one before it) is visible there.
pub struct Markers {
    pub user: u64,
    topic: String,
    key: String,
    run_id: String,
    producer: BaseProducer<Deliveries>,
    /// Markers sent so far.
    pub sent: u64,
}

/// One marker: the user's expense count once it is applied, and when it was handed to Kafka.
#[derive(Clone, Copy, Debug)]
pub struct Marker {
    pub count: u64,
    pub sent_ms: i64,
}

impl Markers {
    pub fn new(brokers: &str, layout: &Layout, user: u64, run_id: &str) -> Result<Self> {
        Ok(Markers {
            user,
            topic: layout.topic_for(user),
            key: Layout::key_for(user),
            run_id: run_id.to_string(),
            // No batching delay for the probes themselves.
            producer: producer(brokers, "0")?,
            sent: 0,
        })
    }

    fn send(&mut self) -> Result<Marker> {
        let seq = self.sent + 1;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let payload = format!(
            r#"{{"expense_id":"m-{}-{seq}","user_id":{},"card_id":"c-{}-1","merchant":"Bench Marker","category":"groceries","amount_minor":1,"currency":"EUR","event_time":"{now}","op":"upsert"}}"#,
            self.run_id, self.user, self.user
        );
        let sent_ms = wall_ms();
        send(
            &self.producer,
            &self.topic,
            self.key.as_bytes(),
            payload.as_bytes(),
        )?;
        self.producer.poll(Duration::ZERO);
        self.sent = seq;
        Ok(Marker {
            count: seq,
            sent_ms,
        })
    }
}

/// The steady-rate phase.
#[derive(Clone, Copy, Debug)]
pub struct SteadyPlan {
    /// Background simulator records per second.
    pub rate: u64,
    /// How long to produce.
    pub duration: Duration,
    /// Time between two markers.
    pub marker_every: Duration,
}

/// Produces the simulator's records at `plan.rate` per second for `plan.duration`, and a marker
/// every `plan.marker_every`; returns the markers sent and the background records produced.
pub fn steady(
    brokers: &str,
    layout: &Layout,
    sim: &mut Simulator,
    markers: &mut Markers,
    plan: SteadyPlan,
) -> Result<(Vec<Marker>, u64)> {
    let producer = producer(brokers, "5")?;
    let mut sent = Vec::new();
    let mut produced = 0u64;
    let start = Instant::now();
    let mut next_marker = start + plan.marker_every / 2;
    loop {
        check_stop()?;
        let now = Instant::now();
        let elapsed = now - start;
        if elapsed >= plan.duration {
            break;
        }
        let due = (plan.rate as f64 * elapsed.as_secs_f64()) as u64;
        while produced < due {
            let generated = sim.next_record();
            let topic = layout.topic_for(generated.user_id);
            let key = Layout::key_for(generated.user_id);
            send(&producer, &topic, key.as_bytes(), &generated.bytes)?;
            produced += 1;
        }
        if now >= next_marker {
            sent.push(markers.send()?);
            next_marker += plan.marker_every;
        }
        producer.poll(Duration::ZERO);
        markers.producer.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_micros(500));
    }
    finish(&producer)?;
    finish(&markers.producer)?;
    Ok((sent, produced))
}

/// Records currently in `topics` (sum of high minus low watermarks), and their partitions.
pub fn partitions_of(brokers: &str, topics: &[String]) -> Result<(u64, Vec<(String, i32)>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("create a metadata client")?;
    let mut out = Vec::new();
    let mut total = 0u64;
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .with_context(|| format!("metadata of {topic}"))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p.id(), REQUEST_TIMEOUT)
                    .with_context(|| format!("watermarks of {topic}/{}", p.id()))?;
                total += (high - low).max(0) as u64;
                out.push((topic.clone(), p.id()));
            }
        }
    }
    Ok((total, out))
}

/// The Kafka ceiling: `threads` plain librdkafka consumers (the engine's worker count, with the
/// engine's consumer settings) read every partition of `topics` from the beginning and drop
/// each message after touching its length. Returns the records read and the time from the
/// first assignment to the last record.
pub fn raw_consume(brokers: &str, topics: &[String], threads: usize) -> Result<(u64, Duration)> {
    let (_, partitions) = partitions_of(brokers, topics)?;
    let threads = threads.max(1);
    let total = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(std::sync::Barrier::new(threads));
    let mut handles = Vec::new();
    for t in 0..threads {
        let mine: Vec<(String, i32)> = partitions
            .iter()
            .enumerate()
            .filter(|(i, _)| i % threads == t)
            .map(|(_, p)| p.clone())
            .collect();
        let brokers = brokers.to_string();
        let total = Arc::clone(&total);
        let barrier = Arc::clone(&barrier);
        handles.push(std::thread::spawn(move || -> Result<(Instant, Instant)> {
            let mut config = ClientConfig::new();
            for (key, value) in spendflow_engine::source::kafka::READ_SETTINGS {
                config.set(key, value);
            }
            let consumer: BaseConsumer = config
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("spendflow-bench-raw-{}", wall_ms()))
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("isolation.level", "read_committed")
                .set("enable.partition.eof", "false")
                .create()
                .context("create the raw consumer")?;
            let mut expected = 0u64;
            let mut list = TopicPartitionList::new();
            for (topic, p) in &mine {
                let (low, high) = consumer.fetch_watermarks(topic, *p, REQUEST_TIMEOUT)?;
                expected += (high - low).max(0) as u64;
                list.add_partition_offset(topic, *p, Offset::Beginning)?;
            }
            barrier.wait();
            let start = Instant::now();
            consumer.assign(&list)?;
            let mut read = 0u64;
            let mut bytes = 0u64;
            let deadline = start + Duration::from_secs(600);
            while read < expected {
                check_stop()?;
                if Instant::now() > deadline {
                    bail!("raw consumer read {read} of {expected} records in 600 s");
                }
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        bytes += m.payload_len() as u64;
                        read += 1;
                    }
                    Some(Err(e)) => bail!("raw consumer: {e}"),
                    None => {}
                }
            }
            std::hint::black_box(bytes);
            total.fetch_add(read, Ordering::AcqRel);
            Ok((start, Instant::now()))
        }));
    }
    let mut spans = Vec::new();
    for h in handles {
        spans.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("raw consumer panicked"))??,
        );
    }
    let start = spans.iter().map(|s| s.0).min().context("no consumer")?;
    let end = spans.iter().map(|s| s.1).max().context("no consumer")?;
    Ok((total.load(Ordering::Acquire), end - start))
}
