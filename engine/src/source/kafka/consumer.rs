use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use regex::Regex;
use spendflow_operators::UserId;

use super::fetch::{ReadAhead, Taken};
use super::{KafkaSourceConfig, OnDataLoss};
use crate::error::SourceError;
use crate::source::{OffsetRange, PartitionPosition, PartitionState, Poll, Source, SourceRecord};

/// How long metadata and watermark requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often, at most, the partitions' ends are fetched while the source looks idle.
const WATERMARK_INTERVAL: Duration = Duration::from_millis(200);
/// A backlog at least this large makes the source report itself lagging (the engine then
/// cuts epochs by record budget, and the timer only after `LAGGING_MAX_INTERVAL`).
///
/// Large on purpose: the ends it is measured against are those of the last fetch, and the
/// read-ahead channel holds up to a few batches, so a source keeping up with a steady 20 K
/// records/s briefly shows a backlog of thousands. At 2,048 such a source claimed to lag, its
/// epochs stretched towards the 1 s cap, and the end-to-end benchmark's freshness p99 went from
/// 74 ms to 337 ms. A backlog of 50,000 is seconds of input at any steady rate we serve within
/// the freshness target: that is catch-up.
const LAGGING_RECORDS: u64 = 50_000;
/// How often progress is committed to the consumer group (for monitoring only).
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// The consumer's fetch settings, tuned for catch-up and bounded memory; the benchmark's raw
/// consume ceiling reads with the same.
pub const READ_SETTINGS: [(&str, &str); 6] = [
    // Bounded prefetch: the memory bound of the source (besides the fetch thread's
    // channel, `BATCHES_AHEAD` batches). The fetch thread empties this queue as fast as
    // fetches fill it, so it only has to cover a fetch's round trip: at 16 MiB librdkafka
    // held about 175 MiB at the peak of a 2 M-record catch-up (a queued record costs far
    // more than its payload: one op struct each, and whole decompressed batches), and the
    // catch-up's peak RSS was about 800 MiB; at 2 MiB it is about 555 MiB, no slower
    // (`bench/scripts/catchup.sh`, bench/README.md). 1 MiB saved little more.
    ("queued.max.messages.kbytes", "2048"),
    // Keep prefetching until that many kilobytes are queued rather than stopping at librdkafka's
    // default 100,000 messages: with small records (~150 bytes) that default empties
    // in well under a second of catch-up and the next fetch starts only then.
    ("queued.min.messages", "1000000"),
    // When a fetch overfills that queue (one response of 4 MiB per partition can),
    // librdkafka postpones the partition's next fetch by `fetch.queue.backoff.ms`,
    // 1 s by default: the queue then drained in a fraction of that and the worker
    // waited out the rest with nothing to read. 10 ms: catch-up 2 M keyed records in
    // about 6 s instead of 7-8 s (bench/README.md). 0 was slower than 10.
    ("fetch.queue.backoff.ms", "10"),
    // Larger fetches during catch-up (fewer round trips, one lz4 batch set per
    // partition and request): 4 MiB per partition instead of 1 MiB.
    ("max.partition.fetch.bytes", "4194304"),
    // A fetch waits for 64 KiB or `fetch.wait.max.ms`: while behind, fetches come back
    // full at once; when caught up this adds at most 10 ms to the freshness, against
    // many near-empty round trips of a few records each.
    ("fetch.min.bytes", "65536"),
    ("fetch.wait.max.ms", "10"),
];

/// The worker (of `peers`) that reads a partition: the partitions of one topic go round the
/// workers in turn, starting at a worker chosen by a stable hash (FNV-1a, then fmix64) of the
/// topic's name, the same in every process and build.
///
/// Round the workers, not hashed one by one: a keyed topic's partitions must be spread evenly,
/// or one worker (and its fetch thread) reads most of the input while the other waits for it.
/// Hashing each partition gave 4 partitions over 2 workers a 4–0 or 3–1 split 5 times in 8,
/// and the catch-up ran at the speed of the loaded worker. The hashed start spreads the
/// single-partition topics of the per-user layout.
pub(crate) fn owner_of(topic: &str, partition: i32, peers: usize) -> usize {
    let peers = peers.max(1) as u64;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in topic.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits are poorly mixed for small moduli; finish with murmur3's fmix64.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    ((hash % peers + u64::from(partition.unsigned_abs()) % peers) % peers) as usize
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
pub(super) struct Assigned {
    pub(super) status: PartitionPosition,
    pub(super) expected_user: Option<UserId>,
}

/// Reads this worker's share of the matching partitions; see the module docs.
pub struct KafkaSource {
    /// The fetch thread and what it has read ahead (not yet taken: no position counts it).
    ahead: ReadAhead,
    config: KafkaSourceConfig,
    consumer: Arc<BaseConsumer>,
    pattern: Option<Regex>,
    worker: usize,
    peers: usize,
    /// Assigned partitions, in a stable order (the index is `SourceRecord::partition`).
    assigned: Vec<Assigned>,
    index: BTreeMap<(Arc<str>, i32), usize>,
    /// Where to start partitions not seen before (a checkpoint's positions, or the beginning).
    start_at: BTreeMap<(String, i32), i64>,
    /// A listing has shown what this source reads (see the module docs); until then it is
    /// never caught up.
    found: bool,
    /// Topics found deleted (warned about once each).
    deleted: BTreeSet<Arc<str>>,
    last_discovery: Option<Instant>,
    /// When the partitions' ends were last fetched; `None`: fetch before claiming to be idle.
    last_watermarks: Option<Instant>,
    /// Records were read since the ends were fetched: a position at or past an end fetched
    /// before the read is no evidence that nothing follows, so fetch again before going idle.
    read_since_watermarks: bool,
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
            message: e.to_string(),
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
            // Never skip to another offset silently: a position that is gone is reported
            // ("offset out of range") and handled as lost input.
            .set("auto.offset.reset", "error")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false");
        for (key, value) in READ_SETTINGS {
            client.set(key, value);
        }
        config.librdkafka_options.apply(&mut client);
        let consumer: Arc<BaseConsumer> = Arc::new(
            client
                .create()
                .map_err(|e| kafka_error("creating the consumer", e))?,
        );
        let ahead =
            ReadAhead::start(Arc::clone(&consumer), worker).map_err(|e| SourceError::Kafka {
                message: format!("starting the fetch thread: {e}"),
                retriable: false,
            })?;
        let mut source = KafkaSource {
            ahead,
            config,
            consumer,
            pattern,
            worker,
            peers,
            assigned: Vec::new(),
            index: BTreeMap::new(),
            start_at,
            found: false,
            deleted: BTreeSet::new(),
            last_discovery: None,
            last_watermarks: None,
            read_since_watermarks: false,
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

    /// Lists topics, assigns the new partitions this worker owns, and notices deleted topics.
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
        // (topic, partition, expected user) of new partitions this worker owns.
        let mut new: Vec<(Arc<str>, i32)> = Vec::new();
        let mut listed: BTreeSet<&str> = BTreeSet::new();
        let mut found = self.pattern.is_some();
        // A matching topic listed with an error or without partitions (e.g. leaders still
        // being elected after a broker restart) is not readable yet: until a listing shows
        // every matching topic whole, this source has not found everything it reads.
        let mut incomplete = false;
        for topic in metadata.topics() {
            let name = topic.name();
            if name.starts_with("__") || !self.matches(name) {
                continue;
            }
            if topic.error().is_some() || topic.partitions().is_empty() {
                incomplete = true;
                continue;
            }
            listed.insert(name);
            // With `--topic`: the topic and its partitions are known from here on.
            found = true;
            for partition in topic.partitions() {
                let id = partition.id();
                let key = (Arc::<str>::from(name), id);
                if owner_of(name, id, self.peers) != self.worker || self.index.contains_key(&key) {
                    continue;
                }
                new.push(key);
            }
        }
        // Topics this source reads that the listing no longer shows.
        let gone: Vec<Arc<str>> = self
            .assigned
            .iter()
            .filter(|a| a.status.state != PartitionState::Deleted)
            .map(|a| &a.status.source)
            .filter(|t| !listed.contains(&***t))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        drop(metadata);
        for topic in gone {
            if self.confirm_deleted(&topic) {
                self.topic_deleted(&topic);
            }
        }
        if !new.is_empty()
            && let Err(e) = self.assign_new(new)
        {
            // E.g. a topic so new that its partitions have no leader yet. Left for the next
            // discovery; until then this source has not found what it reads.
            tracing::warn!(
                worker = self.worker,
                error = %e,
                "New Kafka partitions not assigned yet; trying again at the next discovery."
            );
            return Ok(());
        }
        self.found |= found && !incomplete;
        Ok(())
    }

    /// Asks for `topic` by name: true only if the cluster answers that it does not exist.
    fn confirm_deleted(&self, topic: &str) -> bool {
        match self.consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT) {
            Ok(metadata) => metadata.topics().iter().any(|t| {
                t.name() == topic
                    && t.error().is_some_and(|e| {
                        matches!(
                            RDKafkaErrorCode::from(e),
                            RDKafkaErrorCode::UnknownTopicOrPartition
                                | RDKafkaErrorCode::UnknownTopic
                        )
                    })
            }),
            Err(_) => false,
        }
    }

    /// Stops reading every partition of a deleted topic; they stay in the status with their
    /// lag. Warns once per topic.
    fn topic_deleted(&mut self, topic: &Arc<str>) {
        let mut stop = TopicPartitionList::new();
        let mut partitions = 0;
        for a in &mut self.assigned {
            if a.status.source == *topic && a.status.state != PartitionState::Deleted {
                if a.status.state == PartitionState::Reading {
                    let _ = stop.add_partition(topic, a.status.partition);
                }
                a.status.state = PartitionState::Deleted;
                a.status.error = Some(Arc::from(
                    "the topic was deleted while it was being read; the partition is no longer read",
                ));
                partitions += 1;
            }
        }
        if stop.count() > 0
            && let Err(e) = self.consumer.incremental_unassign(&stop)
        {
            tracing::debug!(topic = %topic, error = %e, "Unassigning a deleted topic failed.");
        }
        if self.deleted.insert(Arc::clone(topic)) {
            tracing::warn!(
                worker = self.worker,
                topic = %topic,
                partitions,
                "A topic being read was deleted; its partitions are no longer read and keep their lag, so the engine is no longer caught up."
            );
        }
    }

    /// Fetches the low watermarks of `partitions` in one request per broker.
    fn low_watermarks(
        &self,
        partitions: &[(Arc<str>, i32)],
    ) -> Result<BTreeMap<(Arc<str>, i32), i64>, SourceError> {
        // A timestamp of -2 (`Offset::Beginning` as raw) asks for the earliest offset.
        let mut request = TopicPartitionList::new();
        for (topic, partition) in partitions {
            request
                .add_partition_offset(topic, *partition, Offset::Beginning)
                .map_err(|e| kafka_error("fetching partition starts", e))?;
        }
        let starts = self
            .consumer
            .offsets_for_times(request, REQUEST_TIMEOUT)
            .map_err(|e| kafka_error("fetching partition starts", e))?;
        let mut out = BTreeMap::new();
        for element in starts.elements() {
            match (element.offset(), element.error()) {
                (Offset::Offset(low), Ok(())) => {
                    out.insert((Arc::from(element.topic()), element.partition()), low);
                }
                (_, Err(e)) => {
                    return Err(kafka_error(
                        &format!(
                            "fetching the start of {} [{}]",
                            element.topic(),
                            element.partition()
                        ),
                        e,
                    ));
                }
                (offset, Ok(())) => {
                    return Err(SourceError::Kafka {
                        message: format!(
                            "fetching the start of {} [{}]: got {offset:?}",
                            element.topic(),
                            element.partition()
                        ),
                        retriable: true,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Assigns new partitions: at a checkpoint's position if there is one (checked against the
    /// partition's low watermark: records below it are gone), else at the oldest record.
    fn assign_new(&mut self, new: Vec<(Arc<str>, i32)>) -> Result<(), SourceError> {
        let lows = self.low_watermarks(&new)?;
        let mut list = TopicPartitionList::new();
        for key in new {
            let (name, id) = (&key.0, key.1);
            let Some(&low) = lows.get(&key) else {
                // Not answered: left for the next discovery.
                continue;
            };
            let restored = self.start_at.get(&(name.to_string(), id)).copied();
            let mut status = PartitionPosition {
                source: Arc::clone(name),
                partition: id,
                position: restored.unwrap_or(low),
                high_watermark: None,
                ..PartitionPosition::default()
            };
            if let Some(position) = restored.filter(|p| *p < low) {
                self.data_lost(
                    &mut status,
                    position,
                    low,
                    "assigned at a checkpoint's position",
                );
            }
            if status.state == PartitionState::Reading {
                list.add_partition_offset(name, id, Offset::Offset(status.position))
                    .map_err(|e| kafka_error("assigning", e))?;
            }
            self.index.insert(key.clone(), self.assigned.len());
            self.assigned.push(Assigned {
                expected_user: user_of_topic(name, &self.config.user_topic_prefix),
                status,
            });
        }
        tracing::info!(
            worker = self.worker,
            partitions = list.count(),
            total = self.assigned.len(),
            "Assigned new Kafka partitions."
        );
        if list.count() > 0 {
            self.consumer
                .incremental_assign(&list)
                .map_err(|e| kafka_error("assigning", e))?;
        }
        // New partitions have unknown ends: check them before claiming to be idle.
        self.last_watermarks = None;
        Ok(())
    }

    /// Records `[from, to)` of a partition are gone: stops it (`fail`) or moves it to `to`
    /// (`skip`). The caller (un)assigns the partition in the consumer.
    fn data_lost(&self, status: &mut PartitionPosition, from: i64, to: i64, when: &str) {
        status.lost.push(OffsetRange { from, to });
        let message = format!(
            "records [{from}, {to}) of {} [{}] were deleted from Kafka before they were read ({when})",
            status.source, status.partition
        );
        match self.config.on_data_loss {
            OnDataLoss::Fail => {
                tracing::error!(
                    worker = self.worker,
                    topic = %status.source,
                    partition = status.partition,
                    from,
                    to,
                    "Input lost: {message}. The partition is no longer read (restart with --on-data-loss skip to continue from offset {to})."
                );
                status.state = PartitionState::StoppedDataLoss;
                status.error = Some(Arc::from(format!(
                    "{message}; the partition is stopped (--on-data-loss skip continues from {to})"
                )));
            }
            OnDataLoss::Skip => {
                tracing::warn!(
                    worker = self.worker,
                    topic = %status.source,
                    partition = status.partition,
                    from,
                    to,
                    "Input lost: {message}. Continuing from offset {to} (--on-data-loss skip)."
                );
                status.position = to;
                status.error = Some(Arc::from(format!(
                    "{message}; skipped (--on-data-loss skip)"
                )));
            }
        }
    }

    /// After "offset out of range": finds the partitions whose position is below their low
    /// watermark and handles their lost records.
    fn check_positions(&mut self) -> Result<(), SourceError> {
        for i in 0..self.assigned.len() {
            let status = &self.assigned[i].status;
            if status.state != PartitionState::Reading {
                continue;
            }
            let (topic, partition, position) = (
                Arc::clone(&status.source),
                status.partition,
                status.position,
            );
            let (low, high) = self
                .consumer
                .fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
                .map_err(|e| kafka_error("fetching watermarks", e))?;
            if position > high {
                // Past the end: the partition was truncated or its topic recreated. What was
                // read cannot be matched with what is there now: stop, whatever the policy.
                let message = format!(
                    "position {position} of {topic} [{partition}] is past the partition's end {high} (topic recreated or truncated?); the partition is stopped"
                );
                tracing::error!(worker = self.worker, topic = %topic, partition, position, high, "{message}");
                let mut list = TopicPartitionList::new();
                let _ = list.add_partition(&topic, partition);
                let _ = self.consumer.incremental_unassign(&list);
                let status = &mut self.assigned[i].status;
                status.state = PartitionState::StoppedDataLoss;
                status.error = Some(Arc::from(message));
                continue;
            }
            if position >= low {
                continue;
            }
            let mut status = self.assigned[i].status.clone();
            self.data_lost(&mut status, position, low, "while reading");
            let mut list = TopicPartitionList::new();
            let _ = list.add_partition(&topic, partition);
            let _ = self.consumer.incremental_unassign(&list);
            if status.state == PartitionState::Reading {
                let mut list = TopicPartitionList::new();
                list.add_partition_offset(&topic, partition, Offset::Offset(status.position))
                    .map_err(|e| kafka_error("assigning", e))?;
                self.consumer
                    .incremental_assign(&list)
                    .map_err(|e| kafka_error("assigning", e))?;
            }
            self.assigned[i].status = status;
        }
        Ok(())
    }

    /// Fetches the end offset of every partition that is not deleted, in one request per
    /// broker.
    fn refresh_watermarks(&mut self) -> Result<(), SourceError> {
        self.last_watermarks = Some(Instant::now());
        self.read_since_watermarks = false;
        // A timestamp of -1 (`Offset::End` as raw) asks for the latest offset of each partition.
        let mut request = TopicPartitionList::new();
        for a in &self.assigned {
            if a.status.state == PartitionState::Deleted {
                continue;
            }
            request
                .add_partition_offset(&a.status.source, a.status.partition, Offset::End)
                .map_err(|e| kafka_error("fetching partition ends", e))?;
        }
        if request.count() == 0 {
            return Ok(());
        }
        let ends = match self.consumer.offsets_for_times(request, REQUEST_TIMEOUT) {
            Ok(ends) => ends,
            Err(e) => {
                // A deleted topic fails the request: look for one before calling it an error.
                let deleted = self.deleted.len();
                self.discover()?;
                if self.deleted.len() > deleted {
                    self.last_watermarks = None;
                    return Ok(());
                }
                return Err(kafka_error("fetching partition ends", e));
            }
        };
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

    /// Every partition being read has reached its end as of the last check.
    fn all_read(&self) -> bool {
        self.assigned
            .iter()
            .filter(|a| a.status.state == PartitionState::Reading)
            .all(|a| {
                a.status
                    .high_watermark
                    .is_some_and(|h| a.status.position >= h)
            })
    }

    /// Everything this source reads is found and read (see the module docs).
    fn caught_up(&self) -> bool {
        self.found
            && self
                .assigned
                .iter()
                .all(|a| a.status.state == PartitionState::Reading)
            && self.all_read()
    }

    fn commit_for_monitoring(&mut self) {
        self.last_commit = Instant::now();
        let mut offsets = TopicPartitionList::new();
        for a in self
            .assigned
            .iter()
            .filter(|a| a.status.position > 0 && a.status.state == PartitionState::Reading)
        {
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
        while out.len() - start < max {
            let room = max - (out.len() - start);
            match self.ahead.take(&mut self.assigned, &self.index, out, room) {
                Taken::Done => break,
                Taken::Error(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OffsetOutOfRange,
                )) => {
                    // Which partition is not said: compare every position with its start.
                    self.check_positions()?;
                }
                Taken::Error(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
                )) => {
                    // Probably a deleted topic: look now rather than warn on every poll.
                    self.discover()?;
                    break;
                }
                // The records taken before it are still pushed by the worker (it drains `out`
                // whatever the poll returns).
                Taken::Error(e) => return Err(kafka_error("reading", e)),
                Taken::Gone => {
                    return Err(SourceError::Kafka {
                        message: "the Kafka fetch thread stopped".into(),
                        retriable: false,
                    });
                }
            }
        }
        if out.len() > start {
            self.read_since_watermarks = true;
            return Ok(Poll::Ready);
        }
        if self
            .last_watermarks
            .is_none_or(|t| now - t >= WATERMARK_INTERVAL)
            || (self.read_since_watermarks && self.all_read())
        {
            self.refresh_watermarks()?;
        }
        Ok(if !self.all_read() {
            // Behind a known end: records are on their way (or the consumer is still
            // connecting).
            Poll::Ready
        } else if self.caught_up() {
            Poll::Idle
        } else {
            // Nothing to read now, but not caught up: the topic is not found yet, or a
            // partition is stopped (lost input, deleted topic) and keeps its lag.
            Poll::Behind
        })
    }

    fn partitions(&self) -> Vec<PartitionPosition> {
        self.assigned.iter().map(|a| a.status.clone()).collect()
    }

    /// Behind by at least [`LAGGING_RECORDS`]: records read ahead and not taken yet, plus what
    /// lies between each partition's position and its end as last fetched (a stale end only
    /// underestimates). Stopped and deleted partitions keep their lag but are not read: they
    /// do not count.
    fn lagging(&self) -> bool {
        let known: u64 = self
            .assigned
            .iter()
            .filter(|a| a.status.state == PartitionState::Reading)
            .filter_map(|a| {
                let end = a.status.high_watermark?;
                u64::try_from(end - a.status.position).ok()
            })
            .sum();
        known + self.ahead.buffered() as u64 >= LAGGING_RECORDS
    }
}
