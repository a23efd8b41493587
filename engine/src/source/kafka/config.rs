use crate::error::InvalidSetting;
use crate::kafka_client::KafkaOptions;

use serde::Deserialize;

/// Settings of the Kafka source.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Read every topic whose whole name matches this regex (e.g. `expenses\.user\..*`).
    #[serde(default)]
    pub topic_pattern: Option<String>,
    /// Read this one topic. Exactly one of `topic` and `topic_pattern` is required.
    #[serde(default)]
    pub topic: Option<String>,
    /// Topics named this prefix followed by a user id hold only that user's records.
    #[serde(default = "default_user_topic_prefix")]
    pub user_topic_prefix: String,
    /// Consumer group used only to publish progress for monitoring tools.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// How often to look for new matching topics, in milliseconds.
    #[serde(default = "default_discovery_interval_ms")]
    pub discovery_interval_ms: u64,
    /// librdkafka settings for every Kafka client of the engine (this consumer and the
    /// dead-letter producer): SASL, TLS, tuning. Settings the exactly-once guarantee rests on
    /// are refused (see [`KafkaOptions`]).
    #[serde(default)]
    pub librdkafka_options: KafkaOptions,
    /// What to do when records a partition had to read next were deleted from Kafka before
    /// they were read (retention, `kafka-delete-records`).
    #[serde(default)]
    pub on_data_loss: OnDataLoss,
}

/// What the Kafka source does when input it had to read next is gone from the topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDataLoss {
    /// Stop reading the partition (ERROR log, `stopped_data_loss` in `Admin/GetStatus`, the
    /// partition keeps its lag so the engine never claims to be caught up).
    #[default]
    Fail,
    /// Continue from the oldest record still in the partition; the lost offset range is
    /// still logged and shown in `Admin/GetStatus`.
    Skip,
}

fn default_user_topic_prefix() -> String {
    "expenses.user.".into()
}

fn default_group_id() -> String {
    "spendflow".into()
}

const fn default_discovery_interval_ms() -> u64 {
    2_000
}

impl KafkaSourceConfig {
    /// A configuration reading `topic_pattern` from `brokers`, with defaults elsewhere.
    pub fn pattern(brokers: impl Into<String>, topic_pattern: impl Into<String>) -> Self {
        KafkaSourceConfig {
            brokers: brokers.into(),
            topic_pattern: Some(topic_pattern.into()),
            topic: None,
            user_topic_prefix: default_user_topic_prefix(),
            group_id: default_group_id(),
            discovery_interval_ms: default_discovery_interval_ms(),
            librdkafka_options: KafkaOptions::new(),
            on_data_loss: OnDataLoss::default(),
        }
    }

    /// A configuration reading one `topic` from `brokers`, with defaults elsewhere.
    pub fn topic(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        KafkaSourceConfig {
            topic: Some(topic.into()),
            topic_pattern: None,
            ..Self::pattern(brokers, "")
        }
    }

    /// Checks that exactly one of `topic` and `topic_pattern` is set and the pattern compiles.
    ///
    /// # Errors
    ///
    /// A message naming the setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        match (&self.topic, &self.topic_pattern) {
            (Some(_), None) => Ok::<(), InvalidSetting>(()),
            (None, Some(pattern)) => regex::Regex::new(pattern)
                .map(|_| ())
                .map_err(|e| format!("topic_pattern is not a valid regex: {e}").into()),
            _ => Err("set exactly one of topic and topic_pattern".into()),
        }?;
        if self.brokers.trim().is_empty() {
            return Err("brokers must name at least one host:port".into());
        }
        if self.discovery_interval_ms == 0 {
            return Err("discovery_interval_ms must be at least 1".into());
        }
        self.librdkafka_options
            .validate()
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
