use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use regex::Regex;
use spendflow_operators::UserId;

use super::KafkaSourceConfig;
use crate::error::SourceError;
use crate::source::{PartitionPosition, Payload, Poll, Source, SourceRecord};

/// How long metadata and watermark requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often, at most, the partitions' ends are fetched while the source looks idle.
const WATERMARK_INTERVAL: Duration = Duration::from_millis(200);
/// How often progress is committed to the consumer group (for monitoring only).
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// The worker (of `peers`) that reads a partition: a stable hash (FNV-1a, then fmix64) of
/// topic and partition, the same in every process and build.
pub fn owner_of(topic: &str, partition: i32, peers: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in topic.bytes().chain(partition.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits are poorly mixed for small moduli; finish with murmur3's fmix64.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    (hash % peers.max(1) as u64) as usize
}

/// The user a per-user topic belongs to: `<prefix><digits>`.
pub fn user_of_topic(topic: &str, prefix: &str) -> Option<UserId> {
    let digits = topic.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|u| *u >= 1)
}

/// One assigned partition.
#[derive(Debug)]
struct Assigned {
    status: PartitionPosition,
    expected_user: Option<UserId>,
}

/// Reads this worker's share of the matching partitions; see the module docs.
pub struct KafkaSource {
    config: KafkaSourceConfig,
    consumer: BaseConsumer,
    pattern: Option<Regex>,
    worker: usize,
    peers: usize,
    /// Assigned partitions, in a stable order (the index is `SourceRecord::partition`).
    assigned: Vec<Assigned>,
    index: BTreeMap<(Arc<str>, i32), usize>,
    /// Where to start partitions not seen before (a checkpoint's positions, or the beginning).
    start_at: BTreeMap<(String, i32), i64>,
    last_discovery: Option<Instant>,
    last_watermarks: Option<Instant>,
    last_commit: Instant,
}

impl KafkaSource {
    /// Connects (lazily: librdkafka connects in the background) and assigns the matching
    /// partitions this worker owns, from the beginning or from `start_at`.
    ///
    /// # Errors
    ///
    /// [`SourceError::Kafka`] if the configuration is invalid or the consumer cannot be created.
    pub fn new(
        config: KafkaSourceConfig,
        worker: usize,
        peers: usize,
        start_at: BTreeMap<(String, i32), i64>,
    ) -> Result<Self, SourceError> {
        config.validate().map_err(|e| SourceError::Kafka {
            message: e,
            retriable: false,
        })?;
        let pattern = match &config.topic_pattern {
            Some(p) => Some(
                Regex::new(&format!("^(?:{p})$")).map_err(|e| SourceError::Kafka {
                    message: format!("topic_pattern: {e}"),
                    retriable: false,
                })?,
            ),
            None => None,
        };
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("client.id", format!("spendflow-worker-{worker}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            // Bounded prefetch: the memory bound of the source.
            .set("queued.max.messages.kbytes", "16384")
            .set("fetch.wait.max.ms", "10");
        for (key, value) in &config.librdkafka_options {
            client.set(key, value);
        }
        let consumer: BaseConsumer = client
            .create()
            .map_err(|e| kafka_error("creating the consumer", e))?;
        let mut source = KafkaSource {
            config,
            consumer,
            pattern,
            worker,
            peers,
            assigned: Vec::new(),
            index: BTreeMap::new(),
            start_at,
            last_discovery: None,
            last_watermarks: None,
            last_commit: Instant::now(),
        };
        source.discover()?;
        Ok(source)
    }

    fn matches(&self, topic: &str) -> bool {
        match (&self.pattern, &self.config.topic) {
            (Some(pattern), _) => pattern.is_match(topic),
            (None, Some(name)) => name == topic,
            (None, None) => false,
        }
    }

    /// Lists topics and assigns the new partitions this worker owns.
    fn discover(&mut self) -> Result<(), SourceError> {
        self.last_discovery = Some(Instant::now());
        let topic = self
            .config
            .topic
            .as_deref()
            .filter(|_| self.pattern.is_none());
        let metadata = self
            .consumer
            .fetch_metadata(topic, REQUEST_TIMEOUT)
            .map_err(|e| kafka_error("listing topics", e))?;
        let mut new = TopicPartitionList::new();
        for topic in metadata.topics() {
            let name = topic.name();
            if name.starts_with("__") || !self.matches(name) || topic.error().is_some() {
                continue;
            }
            for partition in topic.partitions() {
                let id = partition.id();
                let key = (Arc::<str>::from(name), id);
                if owner_of(name, id, self.peers) != self.worker || self.index.contains_key(&key) {
                    continue;
                }
                let start = self
                    .start_at
                    .get(&(name.to_string(), id))
                    .copied()
                    .unwrap_or(0);
                new.add_partition_offset(name, id, Offset::Offset(start))
                    .map_err(|e| kafka_error("assigning", e))?;
                self.index.insert(key.clone(), self.assigned.len());
                self.assigned.push(Assigned {
                    status: PartitionPosition {
                        source: key.0,
                        partition: id,
                        position: start,
                        high_watermark: None,
                    },
                    expected_user: user_of_topic(name, &self.config.user_topic_prefix),
                });
            }
        }
        if new.count() > 0 {
            tracing::info!(
                worker = self.worker,
                partitions = new.count(),
                total = self.assigned.len(),
                "Assigned new Kafka partitions."
            );
            self.consumer
                .incremental_assign(&new)
                .map_err(|e| kafka_error("assigning", e))?;
            // New partitions have unknown ends: check them before claiming to be idle.
            self.last_watermarks = None;
        }
        Ok(())
    }

    /// Fetches the end offset of every assigned partition in one request per broker.
    fn refresh_watermarks(&mut self) -> Result<(), SourceError> {
        self.last_watermarks = Some(Instant::now());
        if self.assigned.is_empty() {
            return Ok(());
        }
        // A timestamp of -1 (`Offset::End` as raw) asks for the latest offset of each partition.
        let mut request = TopicPartitionList::new();
        for a in &self.assigned {
            request
                .add_partition_offset(&a.status.source, a.status.partition, Offset::End)
                .map_err(|e| kafka_error("fetching partition ends", e))?;
        }
        let ends = self
            .consumer
            .offsets_for_times(request, REQUEST_TIMEOUT)
            .map_err(|e| kafka_error("fetching partition ends", e))?;
        for element in ends.elements() {
            if let (Offset::Offset(end), Some(&i)) = (
                element.offset(),
                self.index
                    .get(&(Arc::from(element.topic()), element.partition())),
            ) {
                self.assigned[i].status.high_watermark = Some(end);
            }
        }
        Ok(())
    }

    fn all_read(&self) -> bool {
        self.assigned.iter().all(|a| {
            a.status
                .high_watermark
                .is_some_and(|h| a.status.position >= h)
        })
    }

    fn commit_for_monitoring(&mut self) {
        self.last_commit = Instant::now();
        let mut offsets = TopicPartitionList::new();
        for a in self.assigned.iter().filter(|a| a.status.position > 0) {
            let _ = offsets.add_partition_offset(
                &a.status.source,
                a.status.partition,
                Offset::Offset(a.status.position),
            );
        }
        if offsets.count() > 0
            && let Err(e) = self.consumer.commit(&offsets, CommitMode::Async)
        {
            tracing::debug!(error = %e, "Group commit (monitoring only) failed.");
        }
    }
}

fn kafka_error(doing: &str, e: KafkaError) -> SourceError {
    let retriable = !matches!(e, KafkaError::ClientCreation(_));
    SourceError::Kafka {
        message: format!("{doing}: {e}"),
        retriable,
    }
}

impl Source for KafkaSource {
    fn poll(&mut self, out: &mut Vec<SourceRecord>, max: usize) -> Result<Poll, SourceError> {
        let now = Instant::now();
        if self
            .last_discovery
            .is_none_or(|t| now - t >= Duration::from_millis(self.config.discovery_interval_ms))
        {
            self.discover()?;
        }
        if now - self.last_commit >= COMMIT_INTERVAL {
            self.commit_for_monitoring();
        }
        let start = out.len();
        let mut wait = Duration::from_millis(1);
        while out.len() - start < max {
            let Some(result) = self.consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let message = result.map_err(|e| kafka_error("reading", e))?;
            let Some(&i) = self
                .index
                .get(&(Arc::from(message.topic()), message.partition()))
            else {
                continue;
            };
            let assigned = &mut self.assigned[i];
            let expected_user = assigned.expected_user.or_else(|| {
                let key = std::str::from_utf8(message.key()?).ok()?;
                key.parse::<UserId>().ok()
            });
            out.push(SourceRecord {
                payload: Payload::Bytes(message.payload().unwrap_or_default().to_vec()),
                partition: i,
                offset: message.offset(),
                expected_user,
                key: message.key().map(<[u8]>::to_vec),
            });
            assigned.status.position = message.offset() + 1;
        }
        if out.len() > start {
            return Ok(Poll::Ready);
        }
        if self
            .last_watermarks
            .is_none_or(|t| now - t >= WATERMARK_INTERVAL)
        {
            self.refresh_watermarks()?;
        }
        // Behind a known end: records are on their way (or the consumer is still connecting).
        Ok(if self.all_read() {
            Poll::Idle
        } else {
            Poll::Ready
        })
    }

    fn partitions(&self) -> Vec<PartitionPosition> {
        self.assigned.iter().map(|a| a.status.clone()).collect()
    }
}
