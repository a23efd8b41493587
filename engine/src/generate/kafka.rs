//! The Kafka side of `spendflow generate`: topic creation and the idempotent producer.
//!
//! A publish enqueues every outbox row in `seq` order, waits for the delivery reports, and
//! succeeds only if every message of *this* publish was acknowledged (deliveries carry the
//! publish's generation number, so a late report from an earlier, timed-out attempt is not
//! mistaken for one of this attempt). `enable.idempotence=true` implies `acks=all` and keeps each partition's
//! messages in enqueue order across librdkafka's internal retries.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

use crate::kafka_client::KafkaOptions;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

use super::{GenerateError, Layout, OutboxRow, Publish};

/// How long metadata and admin requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Counts the acknowledgements of the current publish.
#[derive(Default)]
struct Deliveries {
    generation: AtomicUsize,
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<KafkaError>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, generation: usize) {
        if generation != self.generation.load(Ordering::Acquire) {
            return; // a report from an earlier attempt
        }
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::AcqRel);
            }
            Err((error, _)) => {
                self.failed.fetch_add(1, Ordering::AcqRel);
                let mut first = self.first_error.lock();
                first.get_or_insert_with(|| error.clone());
            }
        }
    }
}

/// Whether a Kafka error may go away on retry (a broker restarting, a timeout) rather than
/// needing a change of settings (bad configuration, authorization).
pub(crate) fn is_retriable(error: &KafkaError) -> bool {
    match error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Nul(_) => false,
        other => !matches!(
            other.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::InvalidTopic
                    | RDKafkaErrorCode::InvalidArgument
                    | RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidReplicationFactor
                    | RDKafkaErrorCode::InvalidPartitions
                    | RDKafkaErrorCode::Fatal
            )
        ),
    }
}

fn kafka_error(context: impl Into<String>) -> impl FnOnce(KafkaError) -> GenerateError {
    let context = context.into();
    move |e| GenerateError::Kafka {
        context,
        retriable: is_retriable(&e),
        message: e.to_string(),
    }
}

/// Publishes outbox rows with an idempotent producer, creating topics as needed.
pub(crate) struct KafkaPublisher {
    producer: BaseProducer<Deliveries>,
    admin: AdminClient<DefaultClientContext>,
    layout: Layout,
    known_topics: HashSet<String>,
    created: u64,
    timeout: Duration,
    /// The current publish: its generation, messages sent and not yet waited for, deadline.
    generation: usize,
    pending: u64,
    deadline: Instant,
}

impl KafkaPublisher {
    /// Creates the producer and the admin client, lists existing topics, and (keyed layout)
    /// creates the topic if it is missing.
    pub(crate) fn new(
        brokers: &str,
        layout: Layout,
        timeout: Duration,
        options: &KafkaOptions,
    ) -> Result<Self, GenerateError> {
        let timeout_ms = timeout.as_millis().to_string();
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", brokers)
            .set("client.id", "spendflow-generate")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", &timeout_ms);
        options.apply(&mut client);
        let producer: BaseProducer<Deliveries> = client
            .create_with_context(Deliveries::default())
            .map_err(kafka_error("create the producer"))?;
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", brokers)
            .set("client.id", "spendflow-generate-admin");
        options.apply(&mut client);
        let admin: AdminClient<DefaultClientContext> = client
            .create()
            .map_err(kafka_error("create the admin client"))?;
        let metadata = producer
            .client()
            .fetch_metadata(None, REQUEST_TIMEOUT)
            .map_err(kafka_error(format!("list topics on {brokers}")))?;
        let mut publisher = KafkaPublisher {
            producer,
            admin,
            layout,
            known_topics: HashSet::new(),
            created: 0,
            timeout,
            generation: 0,
            pending: 0,
            deadline: Instant::now(),
        };
        for topic in metadata.topics() {
            if topic.error().is_none() {
                publisher.known_topics.insert(topic.name().to_string());
            }
            if let Layout::Keyed {
                topic: name,
                partitions,
            } = &publisher.layout
                && topic.name() == name
                && topic.partitions().len() as i32 != *partitions
            {
                tracing::warn!(
                    topic = %name,
                    existing = topic.partitions().len(),
                    requested = partitions,
                    "The keyed topic exists with another number of partitions; using it as it is."
                );
            }
        }
        if let Layout::Keyed { topic, .. } = &publisher.layout {
            let topic = topic.clone();
            publisher.ensure_topics(&[topic.as_str()])?;
        }
        Ok(publisher)
    }

    /// Creates the topics not known to exist (1 partition per user topic, N for the keyed
    /// topic; the broker's default replication factor). A topic that already exists is fine.
    fn ensure_topics(&mut self, topics: &[&str]) -> Result<(), GenerateError> {
        let missing: Vec<&str> = topics
            .iter()
            .copied()
            .filter(|t| !self.known_topics.contains(*t))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let partitions = self.layout.partitions();
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = futures::executor::block_on(self.admin.create_topics(&new_topics, &options))
            .map_err(kafka_error("create topics"))?;
        for result in results {
            match result {
                Ok(topic) => {
                    self.created += 1;
                    self.known_topics.insert(topic);
                }
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    self.known_topics.insert(topic);
                }
                Err((topic, code)) => {
                    return Err(GenerateError::Kafka {
                        context: format!("create topic {topic}"),
                        message: code.to_string(),
                        retriable: is_retriable(&KafkaError::AdminOp(code)),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Publish for KafkaPublisher {
    fn send(&mut self, rows: &[OutboxRow]) -> Result<(), GenerateError> {
        let topics: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
        self.ensure_topics(&topics)?;

        if self.pending == 0 {
            // A new publish: reports of anything sent before no longer count.
            let context = self.producer.context();
            self.generation = context.generation.fetch_add(1, Ordering::AcqRel) + 1;
            context.delivered.store(0, Ordering::Release);
            context.failed.store(0, Ordering::Release);
            *context.first_error.lock() = None;
            self.deadline = Instant::now() + self.timeout;
        }
        for (i, row) in rows.iter().enumerate() {
            let mut record = BaseRecord::with_opaque_to(&row.topic, self.generation)
                .key(&row.key[..])
                .payload(&row.payload[..]);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        if Instant::now() > self.deadline {
                            self.pending = 0;
                            return Err(GenerateError::Kafka {
                                context: "produce".into(),
                                message: "the producer queue stayed full".into(),
                                retriable: true,
                            });
                        }
                        record = back;
                        self.producer.poll(Duration::from_millis(1));
                    }
                    Err((e, _)) => {
                        self.pending = 0;
                        return Err(kafka_error(format!("produce to {}", row.topic))(e));
                    }
                }
            }
            self.pending += 1;
            if i % 1024 == 1023 {
                // Serve delivery reports as we go, so the queue drains.
                self.producer.poll(Duration::ZERO);
            }
        }
        Ok(())
    }

    fn wait(&mut self) -> Result<(), GenerateError> {
        // Wait for this publish's reports (rdkafka's `flush` polls in 100 ms steps; this
        // returns as soon as the last report is in).
        let expected = std::mem::take(&mut self.pending);
        let context = self.producer.context();
        loop {
            let reported =
                context.delivered.load(Ordering::Acquire) + context.failed.load(Ordering::Acquire);
            if reported >= expected {
                break;
            }
            if Instant::now() > self.deadline {
                return Err(GenerateError::Kafka {
                    context: "wait for acknowledgements".into(),
                    message: format!(
                        "{reported} of {expected} reported within {:?}",
                        self.timeout
                    ),
                    retriable: true,
                });
            }
            self.producer.poll(Duration::from_millis(1));
        }
        let failed = context.failed.load(Ordering::Acquire);
        if failed > 0 {
            let first = context.first_error.lock().clone();
            return Err(GenerateError::Kafka {
                context: format!("deliver a batch ({failed} of {expected} messages failed)"),
                retriable: first.as_ref().is_none_or(is_retriable),
                message: first.map_or_else(|| "no error reported".to_string(), |e| e.to_string()),
            });
        }
        Ok(())
    }

    fn topics_created(&self) -> u64 {
        self.created
    }
}
