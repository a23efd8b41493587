//! Rejected records to a Kafka topic, with their original bytes and where they came from.
//!
//! Each dead letter is the rejected record's bytes unchanged, keyed like the original, with
//! headers `spendflow.source.topic`, `spendflow.source.partition`, `spendflow.source.offset`,
//! `spendflow.reason` (the machine-readable code) and `spendflow.detail`. The producer is
//! idempotent, so retries inside librdkafka never duplicate a dead letter.
//!
//! Delivery: every dead letter is kept (bytes, key, headers) from `send` until the broker
//! acknowledged it. A failed delivery is counted, logged, and sent again (at most every
//! [`RETRY_EVERY`]), never dropped. [`DeadLetterOutput::flush`] succeeds only once every dead
//! letter sent before it is delivered, so a checkpoint waits for them. While more than
//! [`MAX_UNDELIVERED_BYTES`] are undelivered, `send` blocks (the worker stops reading input)
//! rather than grow without bound or drop.
//!
//! After a restart from a checkpoint, the input after the checkpoint is read again, and its
//! rejected records with it. [`KafkaDeadLetters::skip_written`] reads the topic at start and
//! remembers which source records already have their dead letter there, so each rejected
//! record lands in the topic exactly once across crashes. It reads only from where the
//! checkpoint says the dead letters of records after it start
//! ([`crate::checkpoint::DeadLetterScan`]): every dead letter delivered for a record at or
//! after the checkpoint's positions is remembered with its offset until a later checkpoint
//! passes it, and the checkpoint stores, per dead-letter partition, the smallest of those
//! offsets (or the partition's end, when there is none). A restart thus reads the dead letters
//! written since about the checkpoint, not the whole topic.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;

use crate::kafka_client::KafkaOptions;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::{DeadLetterOutput, RejectedRecord};
use crate::checkpoint::{DeadLetterScan, SavedPosition};
use crate::error::SourceError;

/// How long reading the dead-letter topic at start may take.
const SCAN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`DeadLetterOutput::flush`] waits for deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A dead letter whose delivery failed is sent again after this long.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Undelivered dead letters kept in memory before `send` blocks (back-pressure).
pub const MAX_UNDELIVERED_BYTES: usize = 64 << 20;

/// One dead letter, kept until the broker acknowledged it.
#[derive(Clone, Debug)]
struct Letter {
    source: Arc<str>,
    partition: i32,
    offset: i64,
    reason: &'static str,
    detail: String,
    raw: Vec<u8>,
    key: Option<Vec<u8>>,
}

impl Letter {
    fn bytes(&self) -> usize {
        self.raw.len() + self.key.as_ref().map_or(0, Vec::len) + self.detail.len() + 64
    }
}

/// Deliveries: what is undelivered, what failed, and where delivered dead letters landed.
#[derive(Debug, Default)]
struct Deliveries {
    /// Sent and not yet acknowledged, by send sequence number (failed ones included).
    undelivered: BTreeMap<u64, Letter>,
    undelivered_bytes: usize,
    /// Sequence numbers whose delivery failed, to send again.
    failed: VecDeque<u64>,
    /// Failed deliveries in all.
    failures: u64,
    /// The newest delivery error.
    last_error: Option<String>,
    /// Per dead-letter partition: the offset after the newest dead letter known there (the
    /// partition's end at start, then each delivery).
    next: BTreeMap<i32, i64>,
    /// Dead letters in the topic for records at or after the last checkpoint's positions:
    /// `(source, partition) -> [(source offset, dead-letter partition, dead-letter offset)]`.
    since_checkpoint: HashMap<(String, i32), Vec<(i64, i32, i64)>>,
}

/// Receives delivery reports on the producer's thread.
struct DeliveryContext {
    deliveries: Arc<Mutex<Deliveries>>,
    topic: String,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: Box<u64>) {
        let mut d = self.deliveries.lock();
        match result {
            Ok(message) => {
                let Some(letter) = d.undelivered.remove(&seq) else {
                    return;
                };
                d.undelivered_bytes -= letter.bytes();
                let (partition, offset) = (message.partition(), message.offset());
                let next = d.next.entry(partition).or_insert(0);
                *next = (*next).max(offset + 1);
                d.since_checkpoint
                    .entry((letter.source.to_string(), letter.partition))
                    .or_default()
                    .push((letter.offset, partition, offset));
            }
            Err((e, _)) => {
                d.failures += 1;
                d.last_error = Some(e.to_string());
                if d.undelivered.contains_key(&seq) {
                    d.failed.push_back(*seq);
                }
                let failures = d.failures;
                drop(d);
                tracing::error!(
                    topic = %self.topic,
                    error = %e,
                    failures,
                    "A dead letter was not delivered; it is kept and sent again, and checkpoints wait for it."
                );
            }
        }
    }
}

/// Sends dead letters to a Kafka topic.
pub struct KafkaDeadLetters {
    producer: ThreadedProducer<DeliveryContext>,
    topic: String,
    deliveries: Arc<Mutex<Deliveries>>,
    /// The next send sequence number.
    seq: AtomicU64,
    /// Set when the engine stops: `send` no longer waits for room.
    closing: AtomicBool,
    /// When failed deliveries were last sent again.
    last_retry: Mutex<Option<Instant>>,
    /// Source records whose dead letter is in the topic already: `(topic, partition) -> offsets`.
    written: HashMap<(String, i32), HashSet<i64>>,
    /// The user's librdkafka settings (SASL, TLS), for the producer and the scan's reader.
    options: KafkaOptions,
}

impl std::fmt::Debug for KafkaDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDeadLetters")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// What [`KafkaDeadLetters::delivery_status`] reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryStatus {
    /// Dead letters sent and not yet delivered.
    pub undelivered: usize,
    /// Failed deliveries so far (each retry that fails counts).
    pub failures: u64,
    /// The newest delivery error.
    pub last_error: Option<String>,
}

impl KafkaDeadLetters {
    /// A producer for `topic` on `brokers`, with the user's librdkafka `options` (the
    /// source's: the same cluster, so the same SASL and TLS settings).
    ///
    /// # Errors
    ///
    /// The client error if the producer cannot be created.
    pub fn new(
        brokers: &str,
        topic: &str,
        options: &KafkaOptions,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let deliveries = Arc::new(Mutex::new(Deliveries::default()));
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", brokers)
            .set("client.id", "spendflow-dead-letters")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5");
        options.apply(&mut client);
        let producer = client.create_with_context(DeliveryContext {
            deliveries: Arc::clone(&deliveries),
            topic: topic.to_string(),
        })?;
        Ok(KafkaDeadLetters {
            producer,
            topic: topic.to_string(),
            deliveries,
            seq: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            last_retry: Mutex::new(None),
            written: HashMap::new(),
            options: options.clone(),
        })
    }

    /// How deliveries go.
    pub fn delivery_status(&self) -> DeliveryStatus {
        let d = self.deliveries.lock();
        DeliveryStatus {
            undelivered: d.undelivered.len(),
            failures: d.failures,
            last_error: d.last_error.clone(),
        }
    }

    /// Reads the dead-letter topic to its end and remembers the source records (at or after
    /// `from`, the positions input is read again from) whose dead letter is there already;
    /// [`DeadLetterOutput::send`] then skips them. Partitions not in `from` count from 0.
    /// With `scan` (from the checkpoint) for this topic, each partition is read from where it
    /// says; otherwise (and for partitions it does not list) from the partition's start.
    ///
    /// # Errors
    ///
    /// [`SourceError::Kafka`] if the topic cannot be read in time.
    pub fn skip_written(
        &mut self,
        brokers: &str,
        from: &BTreeMap<(String, i32), i64>,
        scan: Option<&DeadLetterScan>,
    ) -> Result<usize, SourceError> {
        let error = |doing: &str, e: rdkafka::error::KafkaError| SourceError::Kafka {
            message: format!("dead-letter topic {}: {doing}: {e}", self.topic),
            retriable: true,
        };
        let scan_from: BTreeMap<i32, i64> = scan
            .filter(|s| s.topic == self.topic)
            .map(|s| s.from.iter().copied().collect())
            .unwrap_or_default();
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", brokers)
            .set("group.id", "spendflow-dead-letter-scan")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed");
        self.options.apply(&mut client);
        let consumer: BaseConsumer = client.create().map_err(|e| error("creating a reader", e))?;
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .map_err(|e| error("listing partitions", e))?;
        let mut ends = BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        let mut skipped = 0;
        for topic in metadata.topics().iter().filter(|t| t.error().is_none()) {
            for partition in topic.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(&self.topic, partition.id(), Duration::from_secs(10))
                    .map_err(|e| error("reading partition ends", e))?;
                self.deliveries
                    .lock()
                    .next
                    .entry(partition.id())
                    .and_modify(|n| *n = (*n).max(high))
                    .or_insert(high);
                let start = scan_from
                    .get(&partition.id())
                    .map_or(low, |&s| s.clamp(low, high));
                skipped += (start - low).max(0);
                if high > start {
                    ends.insert(partition.id(), high);
                    assignment
                        .add_partition_offset(&self.topic, partition.id(), Offset::Offset(start))
                        .map_err(|e| error("assigning", e))?;
                }
            }
        }
        if ends.is_empty() {
            tracing::info!(topic = %self.topic, skipped, "Dead-letter topic: nothing written after the checkpoint.");
            return Ok(0);
        }
        consumer
            .assign(&assignment)
            .map_err(|e| error("assigning", e))?;
        let deadline = Instant::now() + SCAN_TIMEOUT;
        let mut found = 0;
        let mut read = 0u64;
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
            read += 1;
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
                // Remembered for the next checkpoint too: a restart from it must find this
                // dead letter again.
                self.deliveries
                    .lock()
                    .since_checkpoint
                    .entry(key.clone())
                    .or_default()
                    .push((offset, message.partition(), message.offset()));
                self.written.entry(key).or_default().insert(offset);
                found += 1;
            }
        }
        tracing::info!(
            topic = %self.topic,
            found,
            read,
            skipped,
            "Read the dead-letter topic from the checkpoint on: records re-read after the checkpoint will not be sent twice."
        );
        Ok(found)
    }

    /// Hands `seq` to the producer, waiting while its local queue is full.
    fn produce(&self, seq: u64, letter: &Letter) {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "spendflow.source.topic",
                value: Some(letter.source.as_bytes()),
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
                value: Some(letter.reason.as_bytes()),
            })
            .insert(Header {
                key: "spendflow.detail",
                value: Some(letter.detail.as_bytes()),
            });
        let mut record = BaseRecord::with_opaque_to(&self.topic, Box::new(seq))
            .payload(&letter.raw)
            .headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key);
        }
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
                Err((e, back)) => {
                    // Not handed over: kept, and sent again like a failed delivery.
                    drop(back);
                    let mut d = self.deliveries.lock();
                    d.failures += 1;
                    d.last_error = Some(e.to_string());
                    d.failed.push_back(seq);
                    drop(d);
                    tracing::error!(
                        topic = %self.topic,
                        source = %letter.source,
                        offset = letter.offset,
                        error = %e,
                        "Could not queue a dead letter; it is kept and sent again."
                    );
                    return;
                }
            }
        }
    }

    /// Sends failed dead letters again, at most every [`RETRY_EVERY`] (or now, if `force`).
    fn retry_failed(&self, force: bool) {
        {
            let mut last = self.last_retry.lock();
            if !force && last.is_some_and(|at| at.elapsed() < RETRY_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let retry: Vec<u64> = self.deliveries.lock().failed.drain(..).collect();
        for seq in retry {
            // The letter stays in `undelivered`; take a copy of what producing needs.
            let letter = self.deliveries.lock().undelivered.get(&seq).cloned();
            if let Some(letter) = letter {
                tracing::debug!(topic = %self.topic, source = %letter.source, offset = letter.offset, "Sending a dead letter again.");
                self.produce(seq, &letter);
            }
        }
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
        // Back-pressure: too much undelivered, wait (retrying) rather than grow or drop.
        let mut waiting = false;
        loop {
            let (bytes, has_failed) = {
                let d = self.deliveries.lock();
                (d.undelivered_bytes, !d.failed.is_empty())
            };
            if has_failed {
                self.retry_failed(false);
            }
            if bytes < MAX_UNDELIVERED_BYTES || self.closing.load(Ordering::Acquire) {
                break;
            }
            if !waiting {
                tracing::error!(
                    topic = %self.topic,
                    undelivered_bytes = bytes,
                    "Too many dead letters undelivered: reading input waits until they are delivered."
                );
                waiting = true;
            }
            self.producer.poll(Duration::from_millis(50));
            std::thread::sleep(Duration::from_millis(50));
        }
        let letter = Letter {
            source: Arc::clone(&rejected.source),
            partition: rejected.partition,
            offset: rejected.offset,
            reason: rejected.reason.code(),
            detail: rejected.detail.clone(),
            raw: raw.to_vec(),
            key: key.map(<[u8]>::to_vec),
        };
        let seq = self.seq.fetch_add(1, Ordering::AcqRel);
        {
            // Kept before it is produced: the delivery report cannot come first, and a
            // retry has the whole record.
            let mut d = self.deliveries.lock();
            d.undelivered_bytes += letter.bytes();
            d.undelivered.insert(seq, letter.clone());
        }
        self.produce(seq, &letter);
    }

    fn flush(&self) -> bool {
        // Everything sent before now; what is sent during the flush is not waited for.
        let mark = self.seq.load(Ordering::Acquire);
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        loop {
            let oldest = self.deliveries.lock().undelivered.keys().next().copied();
            if oldest.is_none_or(|seq| seq >= mark) {
                return true;
            }
            if Instant::now() >= deadline {
                let d = self.deliveries.lock();
                let undelivered = d.undelivered.range(..mark).count();
                tracing::warn!(
                    topic = %self.topic,
                    undelivered,
                    last_error = d.last_error.as_deref().unwrap_or(""),
                    "Dead letters not delivered in {} s; they are kept and sent again.",
                    FLUSH_TIMEOUT.as_secs()
                );
                return false;
            }
            self.retry_failed(false);
            let _ = self.producer.flush(Duration::from_millis(100));
        }
    }

    fn scan_start(&self, positions: &[SavedPosition]) -> Option<DeadLetterScan> {
        let d = self.deliveries.lock();
        let mut from = d.next.clone();
        for (key, letters) in &d.since_checkpoint {
            let position = positions
                .iter()
                .find(|p| p.source == key.0 && p.partition == key.1)
                .map_or(0, |p| p.position);
            for &(offset, partition, at) in letters {
                if offset >= position {
                    let f = from.entry(partition).or_insert(at);
                    *f = (*f).min(at);
                }
            }
        }
        Some(DeadLetterScan {
            topic: self.topic.clone(),
            from: from.into_iter().collect(),
        })
    }

    fn checkpointed(&self, positions: &[SavedPosition]) {
        let mut d = self.deliveries.lock();
        d.since_checkpoint.retain(|key, letters| {
            let position = positions
                .iter()
                .find(|p| p.source == key.0 && p.partition == key.1)
                .map_or(0, |p| p.position);
            letters.retain(|l| l.0 >= position);
            !letters.is_empty()
        });
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }
}
