//! Rejected records to a Kafka topic, with their original bytes and where they came from.
//!
//! Each dead letter is the rejected record's bytes unchanged, keyed like the original, with
//! headers `spendflow.source.topic`, `spendflow.source.partition`, `spendflow.source.offset`,
//! `spendflow.reason` (the machine-readable code) and `spendflow.detail`. The producer is
//! idempotent, so retries inside librdkafka never duplicate a dead letter.
//!
//! After a restart from a checkpoint, the input after the checkpoint is read again, and its
//! rejected records with it. [`KafkaDeadLetters::skip_written`] reads the topic once at start
//! and remembers which source records already have their dead letter there, so each rejected
//! record lands in the topic exactly once across crashes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::{DeadLetterOutput, RejectedRecord};
use crate::error::SourceError;

/// How long reading the dead-letter topic at start may take.
const SCAN_TIMEOUT: Duration = Duration::from_secs(60);

/// The default dead-letter topic.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "expenses.dead-letter";

/// Sends dead letters to a Kafka topic.
pub struct KafkaDeadLetters {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
    /// Source records whose dead letter is in the topic already: `(topic, partition) -> offsets`.
    written: HashMap<(String, i32), HashSet<i64>>,
}

impl std::fmt::Debug for KafkaDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDeadLetters")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaDeadLetters {
    /// A producer for `topic` on `brokers`.
    ///
    /// # Errors
    ///
    /// The client error if the producer cannot be created.
    pub fn new(brokers: &str, topic: &str) -> Result<Self, rdkafka::error::KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("client.id", "spendflow-dead-letters")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()?;
        Ok(KafkaDeadLetters {
            producer,
            topic: topic.to_string(),
            written: HashMap::new(),
        })
    }

    /// Reads the dead-letter topic to its end and remembers the source records (at or after
    /// `from`, the positions input is read again from) whose dead letter is there already;
    /// [`DeadLetterOutput::send`] then skips them. Partitions not in `from` count from 0.
    ///
    /// # Errors
    ///
    /// [`SourceError::Kafka`] if the topic cannot be read in time.
    pub fn skip_written(
        &mut self,
        brokers: &str,
        from: &BTreeMap<(String, i32), i64>,
    ) -> Result<usize, SourceError> {
        let error = |doing: &str, e: rdkafka::error::KafkaError| SourceError::Kafka {
            message: format!("dead-letter topic {}: {doing}: {e}", self.topic),
            retriable: true,
        };
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "spendflow-dead-letter-scan")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            .create()
            .map_err(|e| error("creating a reader", e))?;
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .map_err(|e| error("listing partitions", e))?;
        let mut ends = BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        for topic in metadata.topics().iter().filter(|t| t.error().is_none()) {
            for partition in topic.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(&self.topic, partition.id(), Duration::from_secs(10))
                    .map_err(|e| error("reading partition ends", e))?;
                if high > low {
                    ends.insert(partition.id(), high);
                    assignment
                        .add_partition_offset(&self.topic, partition.id(), Offset::Offset(low))
                        .map_err(|e| error("assigning", e))?;
                }
            }
        }
        if ends.is_empty() {
            return Ok(0);
        }
        consumer
            .assign(&assignment)
            .map_err(|e| error("assigning", e))?;
        let deadline = Instant::now() + SCAN_TIMEOUT;
        let mut found = 0;
        while !ends.is_empty() {
            if Instant::now() > deadline {
                return Err(SourceError::Kafka {
                    message: format!(
                        "dead-letter topic {}: not read to its end within {}s",
                        self.topic,
                        SCAN_TIMEOUT.as_secs()
                    ),
                    retriable: true,
                });
            }
            let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let message = message.map_err(|e| error("reading", e))?;
            if ends
                .get(&message.partition())
                .is_some_and(|end| message.offset() + 1 >= *end)
            {
                ends.remove(&message.partition());
            }
            let header = |key: &str| {
                message.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == key)
                        .and_then(|h| std::str::from_utf8(h.value?).ok().map(str::to_string))
                })
            };
            let (Some(source), Some(partition), Some(offset)) = (
                header("spendflow.source.topic"),
                header("spendflow.source.partition").and_then(|p| p.parse::<i32>().ok()),
                header("spendflow.source.offset").and_then(|o| o.parse::<i64>().ok()),
            ) else {
                continue;
            };
            let key = (source, partition);
            if offset >= from.get(&key).copied().unwrap_or(0) {
                self.written.entry(key).or_default().insert(offset);
                found += 1;
            }
        }
        tracing::info!(
            topic = %self.topic,
            found,
            "Read the dead-letter topic: records re-read after the checkpoint will not be sent twice."
        );
        Ok(found)
    }
}

impl DeadLetterOutput for KafkaDeadLetters {
    fn send(&self, rejected: &RejectedRecord, raw: &[u8], key: Option<&[u8]>) {
        if !self.written.is_empty()
            && self
                .written
                .get(&(rejected.source.to_string(), rejected.partition))
                .is_some_and(|offsets| offsets.contains(&rejected.offset))
        {
            return; // Sent before a restart.
        }
        let partition = rejected.partition.to_string();
        let offset = rejected.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "spendflow.source.topic",
                value: Some(rejected.source.as_bytes()),
            })
            .insert(Header {
                key: "spendflow.source.partition",
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: "spendflow.source.offset",
                value: Some(offset.as_bytes()),
            })
            .insert(Header {
                key: "spendflow.reason",
                value: Some(rejected.reason.code().as_bytes()),
            })
            .insert(Header {
                key: "spendflow.detail",
                value: Some(rejected.detail.as_bytes()),
            });
        let mut record = BaseRecord::to(&self.topic).payload(raw).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        // A full local queue is the only synchronous failure; wait for room rather than drop.
        let mut record = record;
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    tracing::error!(
                        topic = %self.topic,
                        source = %rejected.source,
                        offset = rejected.offset,
                        error = %e,
                        "Could not queue a dead letter; it is only counted in memory."
                    );
                    return;
                }
            }
        }
    }

    fn flush(&self) -> bool {
        match self.producer.flush(Duration::from_secs(10)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "Dead letters not delivered in 10 s; they are still queued.");
                false
            }
        }
    }
}
