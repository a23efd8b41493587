//! Rejected records to a Kafka topic, with their original bytes and where they came from.
//!
//! Each dead letter is the rejected record's bytes unchanged, keyed like the original, with
//! headers `spendflow.source.topic`, `spendflow.source.partition`, `spendflow.source.offset`,
//! `spendflow.reason` (the machine-readable code) and `spendflow.detail`. The producer is
//! idempotent, so retries inside librdkafka never duplicate a dead letter.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use super::{DeadLetterOutput, RejectedRecord};

/// The default dead-letter topic.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "expenses.dead-letter";

/// Sends dead letters to a Kafka topic.
pub struct KafkaDeadLetters {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
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
        })
    }
}

impl DeadLetterOutput for KafkaDeadLetters {
    fn send(&self, rejected: &RejectedRecord, raw: &[u8], key: Option<&[u8]>) {
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

    fn flush(&self) {
        if let Err(e) = self.producer.flush(Duration::from_secs(10)) {
            tracing::error!(topic = %self.topic, error = %e, "Dead letters not delivered before shutdown.");
        }
    }
}
