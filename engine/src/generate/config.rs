//! Settings of `spendflow generate`: where the truth goes (MySQL), where the stream goes (Kafka,
//! per-user topics or one keyed topic), what the simulator produces and how fast.

use std::time::Duration;

use serde::Serialize;
use spendflow_operators::UserId;

use super::GenerateError;
use crate::kafka_client::KafkaOptions;
use crate::source::generator::GeneratorConfig;

/// The default prefix of per-user topics (the Kafka source's default too).
pub const DEFAULT_TOPIC_PREFIX: &str = "expenses.user.";
/// The default keyed topic.
pub const DEFAULT_TOPIC: &str = "expenses";
/// The default number of partitions of the keyed topic.
pub const DEFAULT_PARTITIONS: i32 = 4;
/// The default number of records per MySQL transaction and Kafka flush.
pub const DEFAULT_BATCH: usize = 10_000;
/// The largest accepted batch.
pub const MAX_BATCH: usize = 50_000;
/// Kafka's limit on topic name length.
pub const MAX_TOPIC_CHARS: usize = 249;
/// Digits of the largest user id, the longest suffix of a per-user topic.
const MAX_USER_DIGITS: usize = 20;

/// Where records go in Kafka.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "layout", rename_all = "kebab-case")]
pub enum Layout {
    /// One topic per user, `<prefix><user_id>`, each with one partition, created when the
    /// user's first record is published.
    PerUser {
        /// The topic name before the user id.
        prefix: String,
    },
    /// One topic with `partitions` partitions; the key is the user id as a decimal string, so
    /// all of a user's records go to one partition, in order.
    Keyed {
        /// The topic.
        topic: String,
        /// Partitions to create the topic with (an existing topic is used as it is).
        partitions: i32,
    },
}

impl Default for Layout {
    fn default() -> Self {
        Layout::PerUser {
            prefix: DEFAULT_TOPIC_PREFIX.to_string(),
        }
    }
}

impl Layout {
    /// The topic a user's records go to.
    pub fn topic_for(&self, user_id: UserId) -> String {
        match self {
            Layout::PerUser { prefix } => format!("{prefix}{user_id}"),
            Layout::Keyed { topic, .. } => topic.clone(),
        }
    }

    /// The message key of a user's records: the user id in decimal, in both layouts (with one
    /// partition per topic the key does not route, but the engine checks it and dead letters
    /// keep it).
    pub fn key_for(user_id: UserId) -> String {
        user_id.to_string()
    }

    /// Partitions a topic of this layout is created with.
    pub fn partitions(&self) -> i32 {
        match self {
            Layout::PerUser { .. } => 1,
            Layout::Keyed { partitions, .. } => *partitions,
        }
    }

    /// A regex that matches every topic of this layout and nothing else of the same shape, for
    /// `spendflow run --topic-pattern`.
    pub fn topic_pattern(&self) -> String {
        match self {
            Layout::PerUser { prefix } => format!("{}[0-9]+", regex::escape(prefix)),
            Layout::Keyed { topic, .. } => regex::escape(topic),
        }
    }

    fn validate(&self) -> Result<(), GenerateError> {
        match self {
            Layout::PerUser { prefix } => {
                validate_topic_chars(prefix, "--topic-prefix")?;
                if prefix.chars().count() + MAX_USER_DIGITS > MAX_TOPIC_CHARS {
                    return Err(GenerateError::Config(format!(
                        "--topic-prefix may have at most {} characters (topic names are at most \
                         {MAX_TOPIC_CHARS} with the user id), got {}",
                        MAX_TOPIC_CHARS - MAX_USER_DIGITS,
                        prefix.chars().count()
                    )));
                }
                Ok(())
            }
            Layout::Keyed { topic, partitions } => {
                validate_topic_chars(topic, "--topic")?;
                if topic.is_empty() || topic == "." || topic == ".." {
                    return Err(GenerateError::Config(format!(
                        "--topic must be a topic name, got {topic:?}"
                    )));
                }
                if topic.chars().count() > MAX_TOPIC_CHARS {
                    return Err(GenerateError::Config(format!(
                        "--topic may have at most {MAX_TOPIC_CHARS} characters, got {}",
                        topic.chars().count()
                    )));
                }
                if !(1..=10_000).contains(partitions) {
                    return Err(GenerateError::Config(format!(
                        "--partitions must be 1 to 10000, got {partitions}"
                    )));
                }
                Ok(())
            }
        }
    }
}

/// Kafka topic names may contain ASCII letters, digits, `.`, `_` and `-`.
fn validate_topic_chars(name: &str, flag: &str) -> Result<(), GenerateError> {
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(GenerateError::Config(format!(
            "{flag} may contain only ASCII letters, digits, '.', '_' and '-', got {c:?} in {name:?}"
        ))),
        None => Ok(()),
    }
}

/// Everything `spendflow generate` needs.
#[derive(Clone, Debug)]
pub struct GenerateConfig {
    /// MySQL URL, `mysql://user:password@host:port/database`; the database (default
    /// `spendflow`) is created if missing.
    pub mysql_url: String,
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Per-user topics or one keyed topic.
    pub layout: Layout,
    /// What the simulator produces: seed, users and the shares of each kind of record.
    pub simulator: GeneratorConfig,
    /// Stop once this many records have been generated in total (over restarts); `None` runs
    /// until stopped.
    pub events: Option<u64>,
    /// Records per second; `None` goes as fast as MySQL and Kafka take them.
    pub rate: Option<u64>,
    /// Records per MySQL transaction and Kafka flush (smaller with a low `rate`).
    pub batch: usize,
    /// How long one publish of a batch may take before it is retried.
    pub publish_timeout: Duration,
    /// How many times a failed publish is retried (with backoff) before the run stops; the
    /// outbox keeps the records for the next start.
    pub publish_retries: u32,
    /// librdkafka settings for the producer and the admin client (SASL, TLS, tuning).
    pub kafka_options: KafkaOptions,
    /// Budget changes per 1,000 generated records: `UPDATE users SET monthly_budget_minor`
    /// of a random user, committed with the records' batch (so interleaved with the expenses).
    /// 0 (the default) changes none.
    pub budget_change_rate: f64,
    /// Exchange-rate changes per 1,000 generated records: a random non-EUR rate of `fx_rates`
    /// set within ±2% of its base rate, committed with the records' batch. 0 changes none.
    pub fx_change_rate: f64,
}

/// The largest accepted `--budget-change-rate` / `--fx-change-rate` (one change per record).
pub const MAX_CHANGE_RATE: f64 = 1000.0;

impl GenerateConfig {
    /// Settings with defaults for everything but the two addresses.
    pub fn new(mysql_url: impl Into<String>, brokers: impl Into<String>) -> Self {
        GenerateConfig {
            mysql_url: mysql_url.into(),
            brokers: brokers.into(),
            layout: Layout::default(),
            simulator: GeneratorConfig::default(),
            events: None,
            rate: None,
            batch: DEFAULT_BATCH,
            publish_timeout: Duration::from_secs(60),
            publish_retries: 8,
            kafka_options: KafkaOptions::new(),
            budget_change_rate: 0.0,
            fx_change_rate: 0.0,
        }
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// [`GenerateError::Config`] or [`GenerateError::Simulator`] naming the setting.
    pub fn validate(&self) -> Result<(), GenerateError> {
        self.simulator.validate()?;
        self.layout.validate()?;
        if self.brokers.trim().is_empty() {
            return Err(GenerateError::Config(
                "--brokers must name at least one host:port".into(),
            ));
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return Err(GenerateError::Config(format!(
                "the batch size must be 1 to {MAX_BATCH}, got {}",
                self.batch
            )));
        }
        for (flag, rate) in [
            ("--budget-change-rate", self.budget_change_rate),
            ("--fx-change-rate", self.fx_change_rate),
        ] {
            if !(rate.is_finite() && (0.0..=MAX_CHANGE_RATE).contains(&rate)) {
                return Err(GenerateError::Config(format!(
                    "{flag} is changes per 1,000 generated records, 0 to {MAX_CHANGE_RATE}, \
                     got {rate}"
                )));
            }
        }
        if self.publish_timeout.is_zero() {
            return Err(GenerateError::Config(
                "the publish timeout must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The records one batch takes: the batch size, but about a twentieth of a second's worth
    /// with a rate, so records reach Kafka soon after they are generated.
    pub fn effective_batch(&self) -> usize {
        match self.rate {
            Some(rate) if rate > 0 => (rate / 20).clamp(1, self.batch as u64) as usize,
            _ => self.batch,
        }
    }

    /// What makes a run: the simulator settings (seed included) and the layout, as canonical
    /// JSON. A database remembers the fingerprint of the run it holds; a restart must match it,
    /// because only the same settings regenerate the same records. `events`, `rate` and `batch`
    /// are not part of it: a run may be resumed faster, slower, or extended.
    pub fn fingerprint(&self) -> String {
        #[derive(Serialize)]
        struct Fingerprint<'a> {
            version: u32,
            simulator: &'a GeneratorConfig,
            layout: &'a Layout,
        }
        serde_json::to_string(&Fingerprint {
            version: 1,
            simulator: &self.simulator,
            layout: &self.layout,
        })
        // Serializing plain structs of numbers and strings cannot fail; keep a readable
        // fallback rather than a panic path anyway.
        .unwrap_or_else(|e| format!("unserializable settings: {e}"))
    }
}
