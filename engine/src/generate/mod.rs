//! `spendflow generate`: the seeded simulator writing the ground truth to MySQL and streaming the
//! same records to Kafka, so that the engine's answers can be checked against SQL
//! (`spendflow verify`).
//!
//! # What goes where
//!
//! * **MySQL** (database from the URL, default `spendflow`, created if missing; schema migrated
//!   idempotently, see [`mysql`]): `users`, `cards`, `merchants` (written once per run), and
//!   `expenses` with exactly one row per *live* expense: an upsert inserts or replaces the row, a
//!   delete removes it, a duplicate changes nothing. Malformed records never reach MySQL.
//!   `fx_rates` holds a rate for every currency the simulator uses (EUR, the reporting
//!   currency, at 1), and `users.monthly_budget_minor` is calibrated to the run's own spending
//!   ([`budgets`]). `--budget-change-rate` / `--fx-change-rate` (changes per 1,000 records)
//!   update budgets and rates in the records' batch transactions, so the MySQL CDC source sees
//!   them interleaved with the expenses.
//! * **Kafka**: every record, malformed ones included, in generation order. Per-user layout:
//!   topic `<prefix><user_id>` (1 partition, created when the user's first record is
//!   published); keyed layout: one topic with N partitions, key = user id in decimal (so a
//!   user's records stay in one partition, in order). The producer is idempotent (`acks=all`,
//!   retries cannot reorder or duplicate within a partition).
//!
//! # The outbox, and why a crash loses nothing
//!
//! Records are generated in batches. Each batch is handled in three steps:
//!
//! 1. **One MySQL transaction** applies the batch's net effect to `expenses`, inserts every
//!    record of the batch into `outbox(seq, topic, msg_key, payload)` (`seq` = the record's
//!    position in the simulated stream), advances `generator_state.records` (how many records
//!    of the stream are now in MySQL), and deletes the outbox rows of batches Kafka has
//!    acknowledged.
//! 2. The **previous** batch's acknowledgements are awaited (it was produced while this batch
//!    was generated and committed: MySQL and Kafka work in parallel). If they fail, the whole
//!    previous batch is produced again, in order, until acknowledged.
//! 3. Only then is this batch's outbox **produced to Kafka in `seq` order** (without waiting;
//!    the next iteration waits).
//!
//! So at most two batches are unacknowledged, and a batch is only sent once every earlier one
//! is acknowledged.
//!
//! On start, before anything new is generated, every row left in `outbox` is re-published in
//! `seq` order and then deleted. So whatever the moment of a crash (`kill -9`):
//!
//! * before the commit of step 1: nothing of the batch happened; the progress counter still
//!   points before it, and the restarted simulator regenerates exactly the same records;
//! * after the commit: the outbox holds the batch, and the restart publishes it.
//!
//! Re-publishing can deliver a record twice. That is harmless because records are upserts and
//! deletes keyed by `expense_id`, and because **replay preserves per-expense order**: the
//! outbox is replayed as a whole, in `seq` order, before any newer batch is produced, and a
//! batch is never sent before every earlier one is acknowledged. Within a partition Kafka then
//! holds some prefix-subsequence of earlier attempts followed by the complete last attempt, so
//! the *last* record of every expense in the partition is its latest version, which is exactly
//! the row (or absence of a row) in MySQL. The engine applies the last record per expense, so it
//! converges to MySQL. (A transient older version may be visible while the replay is read; the
//! final state is exact.) Every record of an expense goes to one partition (its user's topic,
//! or its user's key), so cross-partition order never matters.
//!
//! # Resuming
//!
//! `generator_state` holds the run's fingerprint (seed, simulator settings, layout) and the
//! number of records generated so far, updated in the batch's transaction. A restart with the
//! same settings replays the outbox, then fast-forwards a fresh simulator past the records
//! already written (the simulator is deterministic and cheap: millions of records per second),
//! and continues; `--events` is the total over all starts, so a finished run does nothing, and a
//! larger `--events` extends it. A restart with other settings is refused
//! ([`GenerateError::OtherRun`]): use another database. A MySQL advisory lock keeps two
//! generators off one database.
//!
//! # Progress
//!
//! [`run`] reports to an [`Observer`]: [`TerminalProgress`] draws a progress bar (rate, ETA,
//! counts) on a terminal and logs a plain line every few seconds otherwise; a [`Summary`] ends
//! the run.

pub mod budgets;
pub mod config;
mod kafka;
pub mod mysql;
mod progress;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use spendflow_operators::model::{Expense, ExpenseId, Record};

pub use config::{GenerateConfig, Layout};
pub use progress::TerminalProgress;

use crate::source::generator::{ConfigError, Generated, GeneratedKind, Simulator};

/// Everything that can stop `spendflow generate`.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A setting is invalid; the message names it.
    #[error("invalid settings: {0}")]
    Config(String),
    /// The simulator settings are invalid.
    #[error(transparent)]
    Simulator(#[from] ConfigError),
    /// A MySQL operation failed.
    #[error("MySQL: {context}: {source}")]
    MySql {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: ::mysql::Error,
    },
    /// A Kafka operation failed.
    #[error("Kafka: {context}: {message}")]
    Kafka {
        /// What was being done.
        context: String,
        /// What went wrong.
        message: String,
        /// Whether trying again may help.
        retriable: bool,
    },
    /// The database holds a run made with other settings; regenerating with these settings
    /// would mix two different streams.
    #[error(
        "database `{database}` holds a run with other settings (seed, simulator settings or \
         layout); resume it with the same settings, or generate into another database.\n  \
         stored: {stored}\n  wanted: {wanted}"
    )]
    OtherRun {
        /// The database.
        database: String,
        /// The stored run's fingerprint.
        stored: String,
        /// This run's fingerprint.
        wanted: String,
    },
    /// Another generator holds the database's lock.
    #[error("another `spendflow generate` is writing to database `{0}`; wait for it to finish")]
    Busy(String),
}

impl From<crate::mysql_client::MySqlError> for GenerateError {
    fn from(e: crate::mysql_client::MySqlError) -> Self {
        match e {
            crate::mysql_client::MySqlError::Config(message) => GenerateError::Config(message),
            crate::mysql_client::MySqlError::Driver { context, source } => {
                GenerateError::MySql { context, source }
            }
        }
    }
}

impl GenerateError {
    /// True if the same run may succeed later without a change of settings (a server that is
    /// restarting, a lock held by another generator). The outbox keeps anything unpublished.
    pub fn is_retriable(&self) -> bool {
        match self {
            GenerateError::MySql { source, .. } => mysql::is_retriable(source),
            GenerateError::Kafka { retriable, .. } => *retriable,
            GenerateError::Busy(_) => true,
            GenerateError::Config(_)
            | GenerateError::Simulator(_)
            | GenerateError::OtherRun { .. } => false,
        }
    }

    pub(crate) fn mysql(context: impl Into<String>) -> impl FnOnce(::mysql::Error) -> Self {
        let context = context.into();
        move |source| GenerateError::MySql { context, source }
    }
}

/// One message waiting in the outbox (and then in Kafka): its place in the stream, where it
/// goes, and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// The record's position in the simulated stream (0-based); publishing follows it.
    pub seq: u64,
    /// The topic.
    pub topic: String,
    /// The message key (the user id in decimal).
    pub key: Vec<u8>,
    /// The record's bytes (JSON v1, or malformed bytes).
    pub payload: Vec<u8>,
}

/// One batch of generated records: the outbox rows in stream order, and the net effect on the
/// `expenses` table (the last record of each expense in the batch wins, as it would applied one
/// by one).
#[derive(Debug, Default)]
pub struct Batch {
    outbox: Vec<OutboxRow>,
    /// Budget and rate changes committed with the batch.
    reference: Vec<ReferenceUpdate>,
    /// `(expense_id, Some(row) for an upsert | None for a delete)`, first appearance order.
    changes: Vec<(ExpenseId, Option<Expense>)>,
    index: HashMap<ExpenseId, usize>,
}

impl Batch {
    /// An empty batch with room for `records`.
    pub fn with_capacity(records: usize) -> Self {
        Batch {
            outbox: Vec::with_capacity(records),
            reference: Vec::new(),
            changes: Vec::with_capacity(records),
            index: HashMap::with_capacity(records),
        }
    }

    /// Adds the record generated at stream position `seq`.
    pub fn push(&mut self, seq: u64, generated: Generated, layout: &Layout) {
        self.outbox.push(OutboxRow {
            seq,
            topic: layout.topic_for(generated.user_id),
            key: Layout::key_for(generated.user_id).into_bytes(),
            payload: generated.bytes,
        });
        let (expense_id, state) = match generated.record {
            Some(Record::Upsert(expense)) => (expense.expense_id.clone(), Some(expense)),
            Some(Record::Delete { expense_id, .. }) => (expense_id, None),
            None => return, // malformed: Kafka only
        };
        match self.index.get(&expense_id) {
            Some(&i) => self.changes[i].1 = state,
            None => {
                self.index.insert(expense_id.clone(), self.changes.len());
                self.changes.push((expense_id, state));
            }
        }
    }

    /// Adds a budget or rate change, committed with the batch.
    pub fn push_reference(&mut self, update: ReferenceUpdate) {
        self.reference.push(update);
    }

    /// The budget and rate changes of the batch, in order.
    pub fn reference_updates(&self) -> &[ReferenceUpdate] {
        &self.reference
    }

    /// The messages to publish, in stream order.
    pub fn outbox(&self) -> &[OutboxRow] {
        &self.outbox
    }

    /// Expenses whose row must be inserted or replaced (each id once).
    pub fn upserts(&self) -> impl Iterator<Item = &Expense> {
        self.changes.iter().filter_map(|(_, e)| e.as_ref())
    }

    /// Expense ids whose row must be removed (each id once, none also in [`Batch::upserts`]).
    pub fn deletes(&self) -> impl Iterator<Item = &str> {
        self.changes
            .iter()
            .filter(|(_, e)| e.is_none())
            .map(|(id, _)| id.as_str())
    }

    /// The stream position after the batch's last record.
    pub fn end_seq(&self) -> Option<u64> {
        self.outbox.last().map(|r| r.seq + 1)
    }

    /// Number of records in the batch.
    pub fn len(&self) -> usize {
        self.outbox.len()
    }

    /// Whether the batch has no record.
    pub fn is_empty(&self) -> bool {
        self.outbox.is_empty()
    }
}

/// A change of reference data `generate` makes while it generates (`--budget-change-rate`,
/// `--fx-change-rate`); the CDC source reads it from the binlog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReferenceUpdate {
    /// `users.monthly_budget_minor` of a user.
    Budget {
        /// The user.
        user_id: u64,
        /// The new budget, minor units of the user's currency.
        budget_minor: i64,
    },
    /// `fx_rates.rate_micros` of a currency.
    Rate {
        /// The currency.
        currency: &'static str,
        /// The new rate.
        rate_micros: i64,
    },
}

/// Draws the budget and rate changes owed per batch, at the configured rates (changes per
/// 1,000 records, to a thousandth; fractions carry over to the next batch, counted in integer
/// millionths of a change so that 0.3 per 1,000 over 10,000 records is exactly 3). Seeded from
/// the run's seed and the records already generated, so a run is reproducible. A new budget is
/// the user's calibrated budget ([`budgets`]) times 50% to 150% (rounded up to 1,000 minor units); a new rate is the currency's base rate
/// within ±2%, so neither drifts away over a long run.
struct ReferenceChanges {
    rng: rand_chacha::ChaCha8Rng,
    /// Millionths of a change owed.
    budget_owed: u64,
    fx_owed: u64,
}

/// A rate per 1,000 records as millionths of a change per record.
fn micro_per_record(rate: f64) -> u64 {
    (rate * 1000.0).round().max(0.0) as u64
}

impl ReferenceChanges {
    fn new(seed: u64, records: u64) -> Self {
        use rand::SeedableRng;
        ReferenceChanges {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(
                seed ^ records.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            budget_owed: 0,
            fx_owed: 0,
        }
    }

    fn add_to(
        &mut self,
        batch: &mut Batch,
        records: usize,
        config: &GenerateConfig,
        simulator: &Simulator,
        budgets: &budgets::Budgets,
    ) {
        use rand::Rng;
        const ONE: u64 = 1_000_000;
        self.budget_owed += micro_per_record(config.budget_change_rate) * records as u64;
        self.fx_owed += micro_per_record(config.fx_change_rate) * records as u64;
        let users = simulator.config().users;
        while self.budget_owed >= ONE {
            self.budget_owed -= ONE;
            let user_id = self.rng.random_range(1..=users.max(1));
            let Some(user) = simulator.user(user_id) else {
                continue;
            };
            let base = budgets.of(user_id, user.monthly_budget_minor);
            let percent = self.rng.random_range(50..=150_i64);
            let budget_minor = (base.saturating_mul(percent) / 100)
                .div_euclid(1000)
                .saturating_add(1)
                .saturating_mul(1000);
            batch.push_reference(ReferenceUpdate::Budget {
                user_id,
                budget_minor,
            });
        }
        let movable: Vec<&(&'static str, i64)> = mysql::FX_RATES
            .iter()
            .filter(|(code, _)| *code != "EUR")
            .collect();
        while self.fx_owed >= ONE {
            self.fx_owed -= ONE;
            let &&(currency, base) = &movable[self.rng.random_range(0..movable.len())];
            let per_mille = self.rng.random_range(-20..=20_i64);
            batch.push_reference(ReferenceUpdate::Rate {
                currency,
                rate_micros: (base + base * per_mille / 1000).max(1),
            });
        }
    }
}

/// Records per kind, over the whole run (earlier starts included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// New expenses.
    pub new: u64,
    /// Corrections of a live expense.
    pub correction: u64,
    /// Deletes.
    pub delete: u64,
    /// Duplicate deliveries.
    pub duplicate: u64,
    /// Refunds (new expenses with a negative amount).
    pub refund: u64,
    /// Late new expenses.
    pub late: u64,
    /// Malformed records (Kafka only), by kind of damage.
    pub malformed: BTreeMap<&'static str, u64>,
}

impl KindCounts {
    /// Counts one record.
    pub fn add(&mut self, kind: GeneratedKind) {
        match kind {
            GeneratedKind::New => self.new += 1,
            GeneratedKind::Correction => self.correction += 1,
            GeneratedKind::Delete => self.delete += 1,
            GeneratedKind::Duplicate => self.duplicate += 1,
            GeneratedKind::Refund => self.refund += 1,
            GeneratedKind::Late => self.late += 1,
            GeneratedKind::Malformed(label) => *self.malformed.entry(label).or_default() += 1,
        }
    }

    /// Malformed records of every kind.
    pub fn malformed_total(&self) -> u64 {
        self.malformed.values().sum()
    }

    /// Every record.
    pub fn total(&self) -> u64 {
        self.new
            + self.correction
            + self.delete
            + self.duplicate
            + self.refund
            + self.late
            + self.malformed_total()
    }
}

impl fmt::Display for KindCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} new, {} corrections, {} deletes, {} duplicates, {} refunds, {} late, {} malformed",
            self.new,
            self.correction,
            self.delete,
            self.duplicate,
            self.refund,
            self.late,
            self.malformed_total()
        )
    }
}

/// What a start of the generator found.
#[derive(Clone, Debug)]
pub struct Start {
    /// The MySQL database.
    pub database: String,
    /// Records generated by earlier starts (0 for a new run).
    pub resumed_from: u64,
    /// Outbox messages re-published before generating.
    pub replayed: u64,
    /// The total to reach, if any.
    pub target: Option<u64>,
}

/// Progress after a batch.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// Records generated in total (earlier starts included): the MySQL progress counter.
    pub records: u64,
    /// The total to reach, if any.
    pub target: Option<u64>,
    /// Records generated by this start.
    pub session_records: u64,
    /// Time since this start began generating.
    pub elapsed: Duration,
    /// Records per kind over the whole run.
    pub kinds: &'a KindCounts,
}

/// The end of a start of the generator.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The MySQL database.
    pub database: String,
    /// Where the records went.
    pub layout: Layout,
    /// Records generated in total, over every start.
    pub records: u64,
    /// Records generated by earlier starts.
    pub resumed_from: u64,
    /// Outbox messages re-published at this start.
    pub replayed: u64,
    /// Records per kind, over every start.
    pub kinds: KindCounts,
    /// Distinct topics written to, over every start.
    pub topics: u64,
    /// Topics this start created.
    pub topics_created: u64,
    /// Time this start took, from connecting to the last acknowledgement.
    pub elapsed: Duration,
    /// Time spent generating and publishing new records (what the rate is over).
    pub generating: Duration,
    /// True if a stop request ended the run before its target.
    pub stopped: bool,
}

impl Summary {
    /// Records generated by this start.
    pub fn session_records(&self) -> u64 {
        self.records - self.resumed_from
    }

    /// Records per second generated into MySQL and Kafka by this start.
    pub fn rate(&self) -> f64 {
        let secs = self.generating.as_secs_f64();
        if secs > 0.0 {
            self.session_records() as f64 / secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.stopped { "stopped" } else { "done" };
        writeln!(
            f,
            "spendflow generate {verb}: {} records this start in {:.1} s ({:.0} records/s); {} in total in database `{}`",
            self.session_records(),
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.records,
            self.database
        )?;
        if self.resumed_from > 0 || self.replayed > 0 {
            writeln!(
                f,
                "  resumed after {} records; {} unpublished messages re-published from the outbox",
                self.resumed_from, self.replayed
            )?;
        }
        writeln!(f, "  records: {}", self.kinds)?;
        if !self.kinds.malformed.is_empty() {
            let kinds: Vec<String> = self
                .kinds
                .malformed
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            writeln!(f, "  malformed (Kafka only): {}", kinds.join(", "))?;
        }
        match &self.layout {
            Layout::PerUser { prefix } => write!(
                f,
                "  topics: {} per-user topics {prefix}<user_id> ({} created now)",
                self.topics, self.topics_created
            ),
            Layout::Keyed { topic, partitions } => write!(
                f,
                "  topic: {topic} ({partitions} partitions, key = user id{})",
                if self.topics_created > 0 {
                    ", created now"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Receives the run's progress. Every method has an empty default; `()` ignores everything.
pub trait Observer {
    /// The run has connected, replayed the outbox and fast-forwarded; generation starts.
    fn started(&mut self, _start: &Start) {}
    /// A batch is in MySQL and acknowledged by Kafka.
    fn progress(&mut self, _progress: &Progress<'_>) {}
    /// The run ended (target reached or stopped).
    fn finished(&mut self, _summary: &Summary) {}
}

impl Observer for () {}

/// Where the truth and the outbox are kept: MySQL in production, memory in tests.
pub(crate) trait Store {
    /// The database's name, for messages.
    fn database(&self) -> &str;
    /// Registers the run (or checks that the stored run has the same fingerprint) and returns
    /// how far it got.
    fn begin_run(&mut self, fingerprint: &str) -> Result<RunState, GenerateError>;
    /// Writes users, cards and merchants, and marks them written.
    fn write_reference(
        &mut self,
        simulator: &Simulator,
        budgets: &budgets::Budgets,
    ) -> Result<(), GenerateError>;
    /// Every unpublished outbox row, in `seq` order.
    fn pending_outbox(&mut self) -> Result<Vec<OutboxRow>, GenerateError>;
    /// In one transaction: deletes outbox rows below `published_below`, applies the batch to
    /// `expenses`, inserts its outbox rows, sets the progress counter to `records`.
    fn commit_batch(
        &mut self,
        batch: &Batch,
        records: u64,
        published_below: Option<u64>,
    ) -> Result<(), GenerateError>;
    /// Deletes outbox rows below `below` (they are acknowledged by Kafka).
    fn delete_published(&mut self, below: u64) -> Result<(), GenerateError>;
}

/// How far a stored run got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RunState {
    /// Records of the stream already in MySQL (and in the outbox or Kafka).
    pub records: u64,
    /// Whether users, cards and merchants are written.
    pub reference_done: bool,
}

/// Where records are published: Kafka in production, memory in tests.
pub(crate) trait Publish {
    /// Enqueues `rows`, in order, without waiting for acknowledgements.
    fn send(&mut self, rows: &[OutboxRow]) -> Result<(), GenerateError>;
    /// Waits until everything sent since the last wait is acknowledged. After an error,
    /// nothing sent before counts as acknowledged: send it again.
    fn wait(&mut self) -> Result<(), GenerateError>;
    /// Topics this publisher created.
    fn topics_created(&self) -> u64;
}

/// Runs the generator until `config.events` records exist in total, or until `stop` is set
/// (checked between batches; the current batch is finished and acknowledged first).
///
/// # Errors
///
/// Invalid settings, an unreachable or failing MySQL or Kafka (after retries for publishing),
/// or a database that holds a run with other settings. Whatever was committed to MySQL but not
/// acknowledged by Kafka stays in the outbox and is published by the next start.
pub fn run(
    config: &GenerateConfig,
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<Summary, GenerateError> {
    config.validate()?;
    let started = Instant::now();
    let mut store = mysql::MySqlStore::open(&config.mysql_url)?;
    let mut publisher = kafka::KafkaPublisher::new(
        &config.brokers,
        config.layout.clone(),
        config.publish_timeout,
        &config.kafka_options,
    )?;
    run_with(config, &mut store, &mut publisher, observer, stop, started)
}

/// The run loop over any store and publisher; see the module docs for the protocol.
pub(crate) fn run_with(
    config: &GenerateConfig,
    store: &mut dyn Store,
    publisher: &mut dyn Publish,
    observer: &mut dyn Observer,
    stop: &AtomicBool,
    started: Instant,
) -> Result<Summary, GenerateError> {
    let mut simulator = Simulator::new(config.simulator.clone())?;
    let state = store.begin_run(&config.fingerprint())?;
    let budgets = budgets::Budgets::calibrate(&config.simulator, config.events)?;
    if !state.reference_done {
        store.write_reference(&simulator, &budgets)?;
    }

    // Anything committed but not acknowledged by an earlier start goes out first, in order,
    // before any newer record of the same expenses can.
    let pending = store.pending_outbox()?;
    let replayed = pending.len() as u64;
    if let Some(last) = pending.last() {
        tracing::info!(
            messages = replayed,
            "Re-publishing the outbox left by an earlier start."
        );
        publish_with_retry(publisher, &pending, config)?;
        store.delete_published(last.seq + 1)?;
    }

    // Fast-forward past what earlier starts generated (same seed, same records).
    let mut kinds = KindCounts::default();
    let mut users = HashSet::new();
    for _ in 0..state.records {
        let generated = simulator.next_record();
        kinds.add(generated.kind);
        users.insert(generated.user_id);
    }

    observer.started(&Start {
        database: store.database().to_string(),
        resumed_from: state.records,
        replayed,
        target: config.events,
    });

    let generating = Instant::now();
    let batch_size = config.effective_batch();
    // Outbox rows below this are acknowledged by Kafka and may be deleted.
    let mut confirmed_below = None;
    // The batch whose messages are on their way to Kafka while the next one is generated and
    // committed.
    let mut in_flight: Option<Batch> = None;
    let mut stopped = false;
    let mut reference_changes = ReferenceChanges::new(config.simulator.seed, state.records);
    loop {
        let remaining = config
            .events
            .map_or(u64::MAX, |t| t.saturating_sub(simulator.produced()));
        if remaining == 0 {
            break;
        }
        if stop.load(Ordering::Acquire) {
            stopped = true;
            break;
        }
        let n = remaining.min(batch_size as u64) as usize;
        let mut batch = Batch::with_capacity(n);
        for _ in 0..n {
            let seq = simulator.produced();
            let generated = simulator.next_record();
            kinds.add(generated.kind);
            users.insert(generated.user_id);
            batch.push(seq, generated, &config.layout);
        }
        reference_changes.add_to(&mut batch, n, config, &simulator, &budgets);
        let commit_started = Instant::now();
        store.commit_batch(&batch, simulator.produced(), confirmed_below)?;
        let commit_ms = commit_started.elapsed().as_millis() as u64;

        // The previous batch must be acknowledged before this one is sent, so that a retry of
        // it can never land after this batch's records.
        let wait_started = Instant::now();
        if let Some(previous) = in_flight.take() {
            confirm(publisher, &previous, config)?;
            confirmed_below = previous.end_seq();
        }
        tracing::debug!(
            records = batch.len(),
            commit_ms,
            wait_ms = wait_started.elapsed().as_millis() as u64,
            "Batch committed; the previous one acknowledged."
        );
        match publisher.send(batch.outbox()) {
            Ok(()) => in_flight = Some(batch),
            Err(e) if e.is_retriable() => {
                tracing::warn!(error = %e, "Sending a batch failed; retrying it in order.");
                publish_with_retry(publisher, batch.outbox(), config)?;
                confirmed_below = batch.end_seq();
            }
            Err(e) => return Err(e),
        }

        let session_records = simulator.produced() - state.records;
        observer.progress(&Progress {
            records: simulator.produced(),
            target: config.events,
            session_records,
            elapsed: generating.elapsed(),
            kinds: &kinds,
        });
        if let Some(rate) = config.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(session_records as f64 / rate as f64);
            while generating.elapsed() < due && !stop.load(Ordering::Acquire) {
                std::thread::sleep((due - generating.elapsed()).min(Duration::from_millis(50)));
            }
        }
    }
    if let Some(last) = in_flight.take() {
        confirm(publisher, &last, config)?;
        confirmed_below = last.end_seq();
    }
    let generating = generating.elapsed();
    if let Some(below) = confirmed_below {
        store.delete_published(below)?;
    }

    let topics = match config.layout {
        Layout::PerUser { .. } => users.len() as u64,
        Layout::Keyed { .. } => 1,
    };
    let summary = Summary {
        database: store.database().to_string(),
        layout: config.layout.clone(),
        records: simulator.produced(),
        resumed_from: state.records,
        replayed,
        kinds,
        topics,
        topics_created: publisher.topics_created(),
        elapsed: started.elapsed(),
        generating,
        stopped,
    };
    observer.finished(&summary);
    Ok(summary)
}

/// Waits for the acknowledgement of `batch`, which was sent; if that fails retriably, publishes
/// the whole batch again (in order, with retries).
fn confirm(
    publisher: &mut dyn Publish,
    batch: &Batch,
    config: &GenerateConfig,
) -> Result<(), GenerateError> {
    match publisher.wait() {
        Ok(()) => Ok(()),
        Err(e) if e.is_retriable() => {
            tracing::warn!(error = %e, "A batch was not acknowledged; sending it again in order.");
            publish_with_retry(publisher, batch.outbox(), config)
        }
        Err(e) => Err(e),
    }
}

/// Publishes `rows` and waits for them, retrying retriable failures with capped exponential
/// backoff. Each attempt re-sends every row, in order (see the module docs for why that keeps
/// per-expense order).
fn publish_with_retry(
    publisher: &mut dyn Publish,
    rows: &[OutboxRow],
    config: &GenerateConfig,
) -> Result<(), GenerateError> {
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        match publisher.send(rows).and_then(|()| publisher.wait()) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retriable() && attempt < config.publish_retries => {
                attempt += 1;
                tracing::warn!(
                    error = %e,
                    attempt,
                    retries = config.publish_retries,
                    "Publishing a batch failed; retrying the whole batch in order."
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}
