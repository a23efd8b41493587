//! Settings of the alerts topic.

use serde::Deserialize;

use crate::error::InvalidSetting;
use crate::kafka_client::KafkaOptions;

/// Epochs queued for the alerts output's thread before the publisher waits.
pub const DEFAULT_QUEUE_EPOCHS: usize = 1024;

/// Where budget alerts go: a Kafka topic.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsTopicConfig {
    /// The topic (created if missing, without compaction: every month of a user shares the
    /// user's key).
    pub topic: String,
    /// The brokers, `HOST:PORT[,HOST:PORT...]`.
    pub brokers: String,
    /// Partitions of the topic if it is created (`None`: the broker's default).
    #[serde(default)]
    pub partitions: Option<i32>,
    /// The producer's `transactional.id` (`None`: `spendflow-alerts-<topic>`). One engine
    /// per id: a newer engine with the same id fences an older one that still writes.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// Epochs queued for the output's thread before the publisher waits for it.
    #[serde(default = "default_queue_epochs")]
    pub queue_epochs: usize,
    /// The user's librdkafka settings (SASL, TLS): the engine's, normally.
    #[serde(default)]
    pub librdkafka_options: KafkaOptions,
}

fn default_queue_epochs() -> usize {
    DEFAULT_QUEUE_EPOCHS
}

impl AlertsTopicConfig {
    /// The topic `topic` on `brokers`, everything else by default.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        AlertsTopicConfig {
            topic: topic.into(),
            brokers: brokers.into(),
            partitions: None,
            transactional_id: None,
            queue_epochs: DEFAULT_QUEUE_EPOCHS,
            librdkafka_options: KafkaOptions::new(),
        }
    }

    /// The producer's `transactional.id`.
    pub fn transactional_id(&self) -> String {
        self.transactional_id
            .clone()
            .unwrap_or_else(|| format!("spendflow-alerts-{}", self.topic))
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// A message naming the setting and what is allowed.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.topic.is_empty()
            || self.topic.len() > 249
            || !self.topic.chars().all(legal)
            || self.topic == "."
            || self.topic == ".."
        {
            return Err(format!(
                "alerts topic {:?}: a Kafka topic name is 1 to 249 characters of a-z A-Z 0-9 . _ -",
                self.topic
            )
            .into());
        }
        if self.brokers.trim().is_empty() {
            return Err("alerts topic: no brokers (HOST:PORT)".into());
        }
        if self.partitions.is_some_and(|p| p < 1) {
            return Err("alerts topic: partitions must be at least 1".into());
        }
        if self.queue_epochs == 0 {
            return Err("alerts topic: queue_epochs must be at least 1".into());
        }
        if self
            .transactional_id
            .as_ref()
            .is_some_and(|id| id.trim().is_empty())
        {
            return Err("alerts topic: transactional_id must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_with_the_setting_named() {
        let good = AlertsTopicConfig::new("localhost:9092", "spendflow.alerts");
        assert!(good.validate().is_ok());
        assert_eq!(good.transactional_id(), "spendflow-alerts-spendflow.alerts");
        for topic in ["", "a b", "..", "alerts/x"] {
            let e = AlertsTopicConfig::new("localhost:9092", topic)
                .validate()
                .unwrap_err();
            assert!(e.0.contains("alerts topic"), "{e:?}");
        }
        let no_brokers = AlertsTopicConfig::new(" ", "t");
        assert!(no_brokers.validate().unwrap_err().0.contains("brokers"));
        let zero = AlertsTopicConfig {
            partitions: Some(0),
            ..good.clone()
        };
        assert!(zero.validate().unwrap_err().0.contains("partitions"));
        let queue = AlertsTopicConfig {
            queue_epochs: 0,
            ..good
        };
        assert!(queue.validate().unwrap_err().0.contains("queue_epochs"));
    }

    #[test]
    fn a_config_file_section_reads() {
        let c: AlertsTopicConfig = serde_json::from_str(
            r#"{"topic":"alerts","brokers":"k:9092","partitions":3,"librdkafka_options":{"security.protocol":"SASL_SSL"}}"#,
        )
        .unwrap();
        assert_eq!(c.partitions, Some(3));
        assert_eq!(c.queue_epochs, DEFAULT_QUEUE_EPOCHS);
        assert!(
            serde_json::from_str::<AlertsTopicConfig>(r#"{"topic":"a","brokers":"b","x":1}"#)
                .is_err()
        );
    }
}
