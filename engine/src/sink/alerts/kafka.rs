//! The alerts topic: an [`AlertGate`] fed by the publisher, written by its own thread in Kafka
//! transactions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use spendflow_operators::reference::{AlertEvent, AlertState};

use super::{
    AlertGate, AlertRecord, AlertsError, AlertsTopicConfig, POSITIONS_HEADER,
    parse_positions_header, positions_header,
};
use crate::core::{Epoch, PartitionPosition};

/// How long one Kafka request (metadata, a transaction's commit) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long reading the topic at open may take.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The first and the longest wait between attempts while Kafka cannot be written.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));

/// Records written in one transaction at most.
const MAX_BATCH_RECORDS: usize = 10_000;

enum Msg {
    Epoch {
        epoch: Epoch,
        positions: Vec<PartitionPosition>,
        events: Vec<AlertEvent>,
        restore: bool,
    },
    /// Answer once everything queued before is committed.
    Flush(Sender<()>),
    /// Stop as a crash would (tests).
    Abandon,
}

/// What the output's thread shares with the publisher's handle.
#[derive(Debug, Default)]
struct Shared {
    /// The gate is open: epochs without events need not be queued.
    open: AtomicBool,
    /// The thread stopped on an error.
    failed: AtomicBool,
    /// Give up retrying (shutdown).
    stop: AtomicBool,
    /// The newest epoch whose records are committed, plus one (0: none).
    committed: AtomicU64,
    /// The newest epoch queued for the thread, plus one (0: none).
    queued: AtomicU64,
    /// Records committed, fired and cleared.
    fired: AtomicU64,
    cleared: AtomicU64,
}

/// Writes alert changes to a Kafka topic, exactly once across crashes (see the module docs).
///
/// [`AlertsOutput::publish`] queues an epoch for the output's thread and returns; it waits only
/// while the queue is full (a Kafka outage longer than the queue's epochs: back-pressure on the
/// publisher, never a dropped event).
#[derive(Debug)]
pub struct AlertsOutput {
    topic: String,
    tx: Option<Sender<Msg>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<(), AlertsError>>>,
}

impl AlertsOutput {
    /// Creates the topic if it is missing, claims it (fencing an older engine with the same
    /// `transactional.id`, which also settles a transaction a crash left open), reads it to
    /// its end and starts the writer thread.
    ///
    /// # Errors
    ///
    /// [`AlertsError::Fatal`] for bad settings or a topic that cannot be read (a record that
    /// is not an alert); [`AlertsError::Retriable`] if Kafka cannot be reached in time.
    pub fn open(config: &AlertsTopicConfig) -> Result<Self, AlertsError> {
        let topic = config.topic.clone();
        let fatal = |message: String| AlertsError::Fatal {
            topic: topic.clone(),
            message,
        };
        config.validate().map_err(|e| fatal(e.0))?;
        ensure_topic(config)?;
        let producer = producer(config)?;
        let records = read_topic(config)?;
        let read = records.len();
        let gate = AlertGate::new(records);
        tracing::info!(
            topic = %config.topic,
            records = read,
            fired = gate.topic_fired().count(),
            "Alerts topic read: changes are written relative to what it says."
        );
        let shared = Arc::new(Shared::default());
        shared.open.store(gate.is_open(), Ordering::Release);
        let (tx, rx) = crossbeam_channel::bounded(config.queue_epochs);
        let writer = Writer {
            topic: config.topic.clone(),
            producer,
            gate,
            shared: Arc::clone(&shared),
        };
        let thread = std::thread::Builder::new()
            .name("alerts-out".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| fatal(format!("cannot start the writer thread: {e}")))?;
        Ok(AlertsOutput {
            topic: config.topic.clone(),
            tx: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    /// Hands over one published epoch (or a delta of several): its number, the input
    /// positions it covers, its alert events in epoch order (`EpochDelta::alerts`) and
    /// `restore`: true for the first delta of a run that restored a checkpoint (its events
    /// are the restored fired set, as `Fired`). Every delta must be handed over, also those
    /// without events, so that the output sees the positions (it skips them cheaply once it
    /// writes transitions as they come). Waits only while the queue is full. False once the output has stopped on an error (logged); the
    /// engine keeps serving, and the next start writes what this run did not (the topic is
    /// compared with).
    pub fn publish(
        &self,
        epoch: Epoch,
        positions: &[PartitionPosition],
        events: &[AlertEvent],
        restore: bool,
    ) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        if self.shared.failed.load(Ordering::Acquire) {
            return false;
        }
        if events.is_empty() && !restore && self.shared.open.load(Ordering::Acquire) {
            // Nothing to write: the epoch is in the topic as soon as everything before it.
            if self.shared.committed.load(Ordering::Acquire)
                >= self.shared.queued.load(Ordering::Acquire)
            {
                self.shared.committed.fetch_max(epoch + 1, Ordering::AcqRel);
            }
            return true;
        }
        self.shared.queued.store(epoch + 1, Ordering::Release);
        tx.send(Msg::Epoch {
            epoch,
            positions: positions.to_vec(),
            events: events.to_vec(),
            restore,
        })
        .is_ok()
    }

    /// Waits until everything published before is committed to the topic; false if the
    /// output stopped or `timeout` passed first.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        let (ack, done) = crossbeam_channel::bounded(1);
        if tx.send_timeout(Msg::Flush(ack), timeout).is_err() {
            return false;
        }
        // The answer, or the thread's failure (a request it never took is never answered).
        loop {
            match done.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => return true,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return false,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if self.failed() || Instant::now() >= deadline {
                        return false;
                    }
                }
            }
        }
    }

    /// The newest epoch such that the records of it and of every epoch before it are
    /// committed to the topic. A checkpoint at or before it never makes a change be folded
    /// away after a crash (see the module docs); the checkpointer may wait for it.
    pub fn committed_epoch(&self) -> Option<Epoch> {
        self.shared.committed.load(Ordering::Acquire).checked_sub(1)
    }

    /// A handle that reads [`AlertsOutput::committed_epoch`] from another thread (the
    /// checkpointer's wait).
    pub fn committed_probe(&self) -> impl Fn() -> Option<Epoch> + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.committed.load(Ordering::Acquire).checked_sub(1)
    }

    /// Records committed in this run: `(fired, cleared)`.
    pub fn written(&self) -> (u64, u64) {
        (
            self.shared.fired.load(Ordering::Relaxed),
            self.shared.cleared.load(Ordering::Relaxed),
        )
    }

    /// True if the output stopped on an error.
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// Writes what is queued and stops, waiting at most `grace` for Kafka; what could not be
    /// written then is written by the next start (logged).
    ///
    /// # Errors
    ///
    /// The error the output stopped on, if any.
    pub fn close(mut self, grace: Duration) -> Result<(), AlertsError> {
        self.tx.take();
        let thread = self.thread.take().expect("joined once");
        let deadline = Instant::now() + grace;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.shared.stop.store(true, Ordering::Release);
        thread.join().unwrap_or_else(|_| {
            Err(AlertsError::Fatal {
                topic: self.topic.clone(),
                message: "the writer thread panicked".into(),
            })
        })
    }

    /// Stops the way a crash would, for tests: what is queued is sent in a transaction that is
    /// never committed (nor aborted), and the producer is dropped. The next open of the topic
    /// aborts that transaction.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Abandon);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for AlertsOutput {
    fn drop(&mut self) {
        self.tx.take();
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Writer {
    topic: String,
    producer: ThreadedProducer<DefaultProducerContext>,
    gate: AlertGate,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) -> Result<(), AlertsError> {
        let result = self.serve(&rx);
        if let Err(e) = &result {
            self.shared.failed.store(true, Ordering::Release);
            // Flushes queued behind the failure hear of it now (their answers drop).
            while rx.try_recv().is_ok() {}
            tracing::error!(
                topic = %self.topic,
                error = %e,
                "The alerts output stopped: alert changes from now on are not written in this run (the next start writes them)."
            );
        }
        result
    }

    fn serve(&mut self, rx: &Receiver<Msg>) -> Result<(), AlertsError> {
        while let Ok(first) = rx.recv() {
            let mut records: Vec<(AlertRecord, Arc<str>)> = Vec::new();
            let mut acks = Vec::new();
            let mut abandon = false;
            let mut last_epoch = None;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Epoch {
                        epoch,
                        positions,
                        events,
                        restore,
                    } => {
                        let out = self.gate.epoch(epoch, &positions, &events, restore);
                        if !out.is_empty() {
                            let header: Arc<str> = positions_header(&positions).into();
                            records.extend(out.into_iter().map(|r| (r, Arc::clone(&header))));
                        }
                        last_epoch = Some(epoch);
                    }
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Abandon => abandon = true,
                }
                if !abandon && records.len() < MAX_BATCH_RECORDS {
                    next = rx.try_recv().ok();
                }
            }
            self.shared
                .open
                .store(self.gate.is_open(), Ordering::Release);
            if abandon {
                self.send_uncommitted(&records);
                return Ok(());
            }
            if !records.is_empty()
                && let Err(e) = self.write(&records)
            {
                // Before the flushes waiting on this batch hear of it (their answers drop).
                self.shared.failed.store(true, Ordering::Release);
                return Err(e);
            }
            if let Some(epoch) = last_epoch {
                self.shared.committed.fetch_max(epoch + 1, Ordering::AcqRel);
            }
            for ack in acks {
                let _ = ack.send(());
            }
        }
        Ok(())
    }

    /// Writes one batch in a transaction, retrying with backoff while Kafka cannot be
    /// written.
    fn write(&self, records: &[(AlertRecord, Arc<str>)]) -> Result<(), AlertsError> {
        let mut wait = BACKOFF.0;
        let mut failures = 0u32;
        loop {
            match self.write_once(records) {
                Ok(()) => {
                    for (r, _) in records {
                        let counter = match r.state {
                            AlertState::Fired => &self.shared.fired,
                            AlertState::Cleared => &self.shared.cleared,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("spendflow_alerts_written_total", "state" => r.state.as_str())
                            .increment(1);
                    }
                    if failures > 0 {
                        tracing::info!(topic = %self.topic, failures, "Alerts topic written again.");
                    }
                    return Ok(());
                }
                Err(e) if e.is_retriable() && !self.shared.stop.load(Ordering::Acquire) => {
                    failures += 1;
                    tracing::warn!(
                        topic = %self.topic,
                        error = %e,
                        records = records.len(),
                        failures,
                        retry_in_ms = wait.as_millis() as u64,
                        "Alerts topic: write failed; retrying (the publisher waits once the queue is full)."
                    );
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(BACKOFF.1);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn write_once(&self, records: &[(AlertRecord, Arc<str>)]) -> Result<(), AlertsError> {
        self.producer
            .begin_transaction()
            .map_err(|e| self.txn_error("begin a transaction", e))?;
        if let Err(e) = self.send_all(records) {
            self.abort();
            return Err(e);
        }
        let mut tries = 0;
        loop {
            match self.producer.commit_transaction(REQUEST_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e)) if e.is_retriable() && tries < 3 => tries += 1,
                Err(e) => {
                    let error = self.txn_error("commit", e);
                    if error.is_retriable() {
                        self.abort();
                    }
                    return Err(error);
                }
            }
        }
    }

    fn send_all(&self, records: &[(AlertRecord, Arc<str>)]) -> Result<(), AlertsError> {
        for (record, header) in records {
            let key = record.kafka_key();
            let value = record.to_json();
            let headers = OwnedHeaders::new().insert(Header {
                key: POSITIONS_HEADER,
                value: Some(header.as_bytes()),
            });
            let mut out = BaseRecord::to(&self.topic)
                .key(&key)
                .payload(&value)
                .headers(headers);
            loop {
                match self.producer.send(out) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        out = back;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err((e, _)) => {
                        return Err(AlertsError::Retriable {
                            topic: self.topic.clone(),
                            message: format!("send: {e}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn abort(&self) {
        if let Err(e) = self.producer.abort_transaction(REQUEST_TIMEOUT) {
            tracing::warn!(topic = %self.topic, error = %e, "Alerts topic: aborting a transaction failed.");
        }
    }

    /// Retriable unless librdkafka says the producer is done for (fenced by a newer engine
    /// with the same `transactional.id`, or another fatal state).
    fn txn_error(&self, doing: &str, e: KafkaError) -> AlertsError {
        let fatal = match &e {
            KafkaError::Transaction(t) => t.is_fatal(),
            _ => false,
        };
        let message = format!("{doing}: {e}");
        if fatal {
            AlertsError::Fatal {
                topic: self.topic.clone(),
                message: format!(
                    "{message} (another engine with the same transactional.id took the topic over?)"
                ),
            }
        } else {
            AlertsError::Retriable {
                topic: self.topic.clone(),
                message,
            }
        }
    }

    /// [`AlertsOutput::abandon`]: sends the records in a transaction and leaves it open.
    fn send_uncommitted(&self, records: &[(AlertRecord, Arc<str>)]) {
        if records.is_empty() || self.producer.begin_transaction().is_err() {
            return;
        }
        let _ = self.send_all(records);
        let _ = self.producer.flush(REQUEST_TIMEOUT);
    }
}

fn kafka_error(topic: &str, doing: &str, e: KafkaError) -> AlertsError {
    AlertsError::Retriable {
        topic: topic.to_string(),
        message: format!("{doing}: {e}"),
    }
}

/// Creates the topic if it is missing (no compaction).
fn ensure_topic(config: &AlertsTopicConfig) -> Result<(), AlertsError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    config.librdkafka_options.apply(&mut client);
    let admin: AdminClient<DefaultClientContext> = client
        .create()
        .map_err(|e| kafka_error(&config.topic, "creating an admin client", e))?;
    let topic = NewTopic::new(
        &config.topic,
        config.partitions.unwrap_or(-1),
        TopicReplication::Fixed(-1),
    )
    .set("cleanup.policy", "delete");
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    let results = futures::executor::block_on(admin.create_topics([&topic], &options))
        .map_err(|e| kafka_error(&config.topic, "creating the topic", e))?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(topic = %config.topic, "Created the alerts topic."),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(kafka_error(
                    &config.topic,
                    "creating the topic",
                    KafkaError::AdminOp(code),
                ));
            }
        }
    }
    Ok(())
}

/// The transactional producer, initialised: an older producer with the same id is fenced and
/// a transaction it left open is aborted.
fn producer(
    config: &AlertsTopicConfig,
) -> Result<ThreadedProducer<DefaultProducerContext>, AlertsError> {
    let mut client = ClientConfig::new();
    config.librdkafka_options.apply(&mut client);
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "spendflow-alerts")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("transactional.id", config.transactional_id())
        .set("linger.ms", "5");
    let producer: ThreadedProducer<DefaultProducerContext> = client
        .create()
        .map_err(|e| kafka_error(&config.topic, "creating a producer", e))?;
    producer
        .init_transactions(REQUEST_TIMEOUT)
        .map_err(|e| match &e {
            KafkaError::Transaction(t) if t.is_fatal() => AlertsError::Fatal {
                topic: config.topic.clone(),
                message: format!("initialising transactions: {e}"),
            },
            _ => kafka_error(&config.topic, "initialising transactions", e),
        })?;
    Ok(producer)
}

/// Reads every committed record of the topic, in order per partition, with the positions of
/// its epoch.
fn read_topic(
    config: &AlertsTopicConfig,
) -> Result<Vec<(AlertRecord, Vec<super::HeaderPosition>)>, AlertsError> {
    let topic = config.topic.as_str();
    let retriable = |doing: &str, e: KafkaError| kafka_error(topic, doing, e);
    let fatal = |message: String| AlertsError::Fatal {
        topic: topic.to_string(),
        message,
    };
    let mut client = ClientConfig::new();
    config.librdkafka_options.apply(&mut client);
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", "spendflow-alerts-read")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = client
        .create()
        .map_err(|e| retriable("creating a reader", e))?;
    let deadline = Instant::now() + READ_TIMEOUT;
    // A topic just created may have no leader yet for a moment: asked again until it has.
    let (assignment, mut pending) = loop {
        match partitions(&consumer, topic) {
            Ok(found) => break found,
            Err(Listing::Fatal(message)) => return Err(fatal(message)),
            Err(Listing::Retriable(e)) if Instant::now() > deadline => return Err(e),
            Err(Listing::Retriable(e)) => {
                tracing::debug!(error = %e, "Alerts topic not readable yet; asking again.");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let mut records = Vec::new();
    if pending.is_empty() {
        return Ok(records);
    }
    consumer
        .assign(&assignment)
        .map_err(|e| retriable("assigning", e))?;
    while !pending.is_empty() {
        if Instant::now() > deadline {
            return Err(AlertsError::Retriable {
                topic: topic.to_string(),
                message: format!(
                    "not read to its end within {}s (partitions left: {:?})",
                    READ_TIMEOUT.as_secs(),
                    pending.keys().collect::<Vec<_>>()
                ),
            });
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match message {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(partition)) => {
                pending.remove(&partition);
                continue;
            }
            Err(e) => return Err(retriable("reading", e)),
        };
        let at = format!(
            "partition {} offset {}",
            message.partition(),
            message.offset()
        );
        let value = message
            .payload()
            .ok_or_else(|| fatal(format!("{at}: a record without a value")))?;
        let record = AlertRecord::from_json(value)
            .map_err(|e| fatal(format!("{at}: not an alert record: {e}")))?;
        let positions = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == POSITIONS_HEADER))
            .and_then(|h| h.value)
            .ok_or_else(|| fatal(format!("{at}: no {POSITIONS_HEADER} header")))?;
        let positions = parse_positions_header(positions)
            .map_err(|e| fatal(format!("{at}: {POSITIONS_HEADER}: {e}")))?;
        records.push((record, positions));
    }
    Ok(records)
}

enum Listing {
    Retriable(AlertsError),
    Fatal(String),
}

/// The topic's partitions that hold records, assigned from their beginning, and their ends.
fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
) -> Result<(TopicPartitionList, BTreeMap<i32, i64>), Listing> {
    let retriable = |doing: &str, e: KafkaError| Listing::Retriable(kafka_error(topic, doing, e));
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| retriable("listing partitions", e))?;
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(Listing::Retriable(AlertsError::Retriable {
            topic: topic.to_string(),
            message: "not in the cluster's metadata yet".into(),
        }));
    };
    if let Some(e) = meta.error() {
        let code = RDKafkaErrorCode::from(e);
        return Err(match code {
            RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic => Listing::Retriable(AlertsError::Retriable {
                topic: topic.to_string(),
                message: format!("listing partitions: {code}"),
            }),
            _ => Listing::Fatal(format!("cannot be read: {code}")),
        });
    }
    if meta.partitions().is_empty() {
        return Err(Listing::Retriable(AlertsError::Retriable {
            topic: topic.to_string(),
            message: "no partitions listed yet".into(),
        }));
    }
    let mut assignment = TopicPartitionList::new();
    let mut pending = BTreeMap::new();
    for partition in meta.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), REQUEST_TIMEOUT)
            .map_err(|e| retriable("reading partition ends", e))?;
        if high > low {
            pending.insert(partition.id(), high);
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Beginning)
                .map_err(|e| retriable("assigning", e))?;
        }
    }
    Ok((assignment, pending))
}

impl super::AlertsSink for AlertsOutput {
    fn publish(
        &self,
        epoch: Epoch,
        positions: &[PartitionPosition],
        events: &[AlertEvent],
        restore: bool,
    ) -> bool {
        AlertsOutput::publish(self, epoch, positions, events, restore)
    }

    fn close_within(self: Box<Self>, grace: Duration) {
        let topic = self.topic.clone();
        let (fired, cleared) = self.written();
        match (*self).close(grace) {
            Ok(()) => tracing::info!(topic = %topic, fired, cleared, "Alerts topic closed."),
            Err(e) => tracing::error!(
                topic = %topic,
                error = %e,
                "Alerts output stopped on an error; the next start writes what this run did not."
            ),
        }
    }
}
