//! What every Kafka client of spendflow shares: the user's librdkafka settings.
//!
//! The source's consumer, the dead-letter producer and the generator's producer all connect to
//! the same cluster, so they take the same settings: `--kafka-option KEY=VALUE` (repeatable) and
//! `--kafka-options-file FILE` on the command line, `librdkafka_options` in a config file. That
//! is how SASL and TLS are turned on (`security.protocol=SASL_SSL`, `sasl.mechanisms`,
//! `sasl.username`, `sasl.password`, `ssl.ca.location`, ...; librdkafka's CONFIGURATION.md lists
//! them all).
//!
//! Some settings are what the exactly-once guarantee rests on (offsets are never committed by
//! librdkafka, a lost position is an error and not a silent jump, only committed records are
//! read, the producers are idempotent); those are refused with an error that says why, instead
//! of being silently overridden either way. Values whose key names a secret never appear in
//! `Debug` output or logs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use rdkafka::config::ClientConfig;
use serde::Deserialize;

/// Settings spendflow decides itself, and why a user may not change them.
const RESERVED: &[(&str, &str)] = &[
    (
        "bootstrap.servers",
        "the brokers come from --input kafka:HOST:PORT (or --brokers)",
    ),
    (
        "enable.auto.commit",
        "positions are kept in spendflow's checkpoints, never committed by librdkafka",
    ),
    (
        "enable.auto.offset.store",
        "positions are kept in spendflow's checkpoints, never committed by librdkafka",
    ),
    (
        "auto.offset.reset",
        "a position that is gone is handled as lost input (--on-data-loss), never skipped silently",
    ),
    (
        "isolation.level",
        "only committed records are read, so an aborted write never counts",
    ),
    (
        "enable.partition.eof",
        "the source tracks the end of each partition itself",
    ),
    (
        "enable.idempotence",
        "the producers must be idempotent so a retried send never writes twice",
    ),
];

/// Words in a key that mark its value as a secret (`sasl.password`, `ssl.key.password`,
/// `sasl.jaas.config`, `ssl.key.pem`, `sasl.oauthbearer.client.secret`, ...).
const SECRET_WORDS: &[&str] = &["password", "secret", "jaas", "key.pem", "token"];

/// librdkafka settings given by the user, applied to every Kafka client spendflow creates.
/// A config file's `librdkafka_options` are checked as they are read.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "BTreeMap<String, String>")]
pub struct KafkaOptions(BTreeMap<String, String>);

impl TryFrom<BTreeMap<String, String>> for KafkaOptions {
    type Error = KafkaOptionError;

    fn try_from(options: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        let options = KafkaOptions(options);
        options.validate()?;
        Ok(options)
    }
}

/// A librdkafka setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KafkaOptionError {
    /// Not `KEY=VALUE`.
    #[error("Kafka option `{0}` is not KEY=VALUE (e.g. security.protocol=SASL_SSL)")]
    Malformed(String),
    /// A setting spendflow decides itself.
    #[error("Kafka option `{key}` cannot be set: {why}")]
    Reserved {
        /// The key.
        key: String,
        /// Why spendflow sets it itself.
        why: &'static str,
    },
    /// The options file could not be read.
    #[error("Kafka options file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line of the options file is not `KEY=VALUE`.
    #[error("Kafka options file {path}, line {line}: not KEY=VALUE")]
    FileLine {
        /// The file.
        path: String,
        /// The line number, from 1.
        line: usize,
    },
}

impl KafkaOptions {
    /// No settings.
    pub fn new() -> Self {
        KafkaOptions::default()
    }

    /// Adds `KEY=VALUE` (a later value for the same key replaces an earlier one).
    ///
    /// # Errors
    ///
    /// The text is not `KEY=VALUE`, or the key is one spendflow sets itself.
    pub fn push(&mut self, text: &str) -> Result<(), KafkaOptionError> {
        let (key, value) = parse(text)?;
        self.insert(key, value)
    }

    /// Sets `key` to `value`.
    ///
    /// # Errors
    ///
    /// The key is one spendflow sets itself.
    pub fn insert(
        &mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), KafkaOptionError> {
        let key = key.into();
        check_key(&key)?;
        self.0.insert(key, value.into());
        Ok(())
    }

    /// Adds the settings of a file of `KEY=VALUE` lines (blank lines and lines starting with
    /// `#` are skipped), the way secrets are kept off the command line.
    ///
    /// # Errors
    ///
    /// The file cannot be read, a line is not `KEY=VALUE`, or a key is reserved.
    pub fn read_file(&mut self, path: &Path) -> Result<(), KafkaOptionError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KafkaOptionError::File {
            path: shown.clone(),
            source,
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = parse(line).map_err(|_| KafkaOptionError::FileLine {
                path: shown.clone(),
                line: n + 1,
            })?;
            self.insert(key, value)?;
        }
        Ok(())
    }

    /// Every key is one a user may set (a config file's options are checked here).
    ///
    /// # Errors
    ///
    /// The first reserved key.
    pub fn validate(&self) -> Result<(), KafkaOptionError> {
        self.0.keys().try_for_each(|key| check_key(key))
    }

    /// True without settings.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Sets every option on `client`, after spendflow's own settings.
    pub fn apply(&self, client: &mut ClientConfig) {
        for (key, value) in &self.0 {
            client.set(key, value);
        }
    }
}

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(key, value)| {
                let shown = if is_secret(key) { "<redacted>" } else { value };
                (key, shown)
            }))
            .finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for KafkaOptions {
    /// Options without the reserved-key check (call [`KafkaOptions::validate`]).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        KafkaOptions(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

fn parse(text: &str) -> Result<(String, String), KafkaOptionError> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(KafkaOptionError::Malformed(text.to_string())),
    }
}

fn check_key(key: &str) -> Result<(), KafkaOptionError> {
    match RESERVED.iter().find(|(reserved, _)| *reserved == key) {
        Some((_, why)) => Err(KafkaOptionError::Reserved {
            key: key.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|word| key.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_later_values_win() {
        let mut options = KafkaOptions::new();
        options.push("security.protocol=SASL_SSL").unwrap();
        options.push("sasl.mechanisms = PLAIN").unwrap();
        options.push("security.protocol=SSL").unwrap();
        assert_eq!(options.get("security.protocol"), Some("SSL"));
        assert_eq!(options.get("sasl.mechanisms"), Some("PLAIN"));
        // A value may itself hold '=' (JAAS configs, base64).
        options.push("sasl.oauthbearer.config=a=b c=d").unwrap();
        assert_eq!(options.get("sasl.oauthbearer.config"), Some("a=b c=d"));
    }

    #[test]
    fn malformed_and_reserved_options_are_refused_with_the_reason() {
        let mut options = KafkaOptions::new();
        assert!(matches!(
            options.push("security.protocol"),
            Err(KafkaOptionError::Malformed(_))
        ));
        assert!(matches!(
            options.push("=x"),
            Err(KafkaOptionError::Malformed(_))
        ));
        let error = options.push("enable.auto.commit=true").unwrap_err();
        assert!(error.to_string().contains("checkpoints"), "{error}");
        let error = options.push("auto.offset.reset=earliest").unwrap_err();
        assert!(error.to_string().contains("--on-data-loss"), "{error}");
        assert!(options.is_empty());
        // A config file's options are checked too.
        let from_file: KafkaOptions = [("isolation.level", "read_uncommitted")]
            .into_iter()
            .collect();
        assert!(from_file.validate().is_err());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut options = KafkaOptions::new();
        options.push("sasl.username=alice").unwrap();
        options.push("sasl.password=hunter2").unwrap();
        options.push("ssl.key.password=hunter3").unwrap();
        options
            .push("sasl.jaas.config=PlainLoginModule required password=\"hunter4\";")
            .unwrap();
        let shown = format!("{options:?}");
        assert!(shown.contains("alice"), "{shown}");
        for secret in ["hunter2", "hunter3", "hunter4"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn an_options_file_keeps_secrets_off_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kafka.properties");
        std::fs::write(
            &path,
            "# SASL\nsasl.username=alice\n\nsasl.password=hunter2\n",
        )
        .unwrap();
        let mut options = KafkaOptions::new();
        options.read_file(&path).unwrap();
        assert_eq!(options.get("sasl.password"), Some("hunter2"));

        std::fs::write(&path, "sasl.username=alice\nnot a setting\n").unwrap();
        let error = KafkaOptions::new().read_file(&path).unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
        let error = KafkaOptions::new()
            .read_file(&dir.path().join("missing"))
            .unwrap_err();
        assert!(matches!(error, KafkaOptionError::File { .. }), "{error}");
    }

    #[test]
    fn options_are_applied_to_a_client() {
        let mut options = KafkaOptions::new();
        options.push("security.protocol=SASL_SSL").unwrap();
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", "127.0.0.1:9092");
        options.apply(&mut client);
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(client.get("bootstrap.servers"), Some("127.0.0.1:9092"));
    }
}
