//! The engine's configuration, validated once when the engine starts.
//!
//! Every struct rejects unknown fields, so a misspelt setting in a config file is an error, not
//! a silently ignored line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use spendflow_operators::reference::{Currency, DataflowOptions};

use crate::error::EngineError;
pub use crate::sink::SinkConfig;
pub use crate::source::SourceConfig;

/// How the engine runs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Dataflow worker threads. Users are divided among them.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Longest time, in milliseconds, between epoch cuts while records arrive: the upper bound
    /// on how stale the served state is.
    #[serde(default = "default_epoch_interval_ms")]
    pub epoch_interval_ms: u64,
    /// Records a worker takes into one epoch before it is cut early (large epochs make
    /// catch-up efficient).
    #[serde(default = "default_epoch_budget")]
    pub epoch_budget: usize,
    /// Rejected records kept in memory for `Admin/ListRejected` (all are counted).
    #[serde(default = "default_dead_letter_capacity")]
    pub dead_letter_capacity: usize,
    /// Where records come from, besides the in-process input every engine has.
    #[serde(default)]
    pub source: Option<SourceConfig>,
    /// Where reference data comes from (users' budgets and currencies, exchange rates): MySQL's
    /// binlog (`--mysql-cdc`). Read by worker 0 beside `source`; its position is checkpointed
    /// with the others. (The simulator brings its own reference data.)
    #[serde(default)]
    pub reference: Option<SourceConfig>,
    /// Write every change of a budget alert's state, once, to this Kafka topic
    /// (`--alerts-topic`; see `sink::alerts`).
    #[cfg(feature = "kafka")]
    #[serde(default)]
    pub alerts: Option<crate::sink::alerts::config::AlertsTopicConfig>,
    /// Convert every user's total to this currency (ISO 4217, e.g. `EUR`) with the live
    /// exchange rates, and rank top spenders by the converted total (`--reporting-currency`).
    #[serde(default)]
    pub reporting_currency: Option<String>,
    /// Serve gRPC on this address (port 0 picks a free port).
    #[serde(default)]
    pub grpc: Option<SocketAddr>,
    /// Serve the live web report on this address (port 0 picks a free port).
    #[serde(default)]
    pub web: Option<SocketAddr>,
    /// With a Kafka source: the topic rejected records are copied to, with their original
    /// bytes and headers saying where they came from and why they were rejected.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// A durable sink the results are written to, besides the in-memory read model every
    /// engine serves from.
    #[serde(default)]
    pub sink: Option<SinkConfig>,
    /// Checkpoints of the engine's state and input positions, so a restart resumes instead of
    /// re-reading everything.
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
    /// Who may reach the gRPC and web servers, and how: TLS, tokens, allowed hosts, limits.
    #[serde(default)]
    pub security: SecurityConfig,
    /// Serve Prometheus metrics (`/metrics`) on this address of their own, besides the web
    /// port's `/metrics` (port 0 picks a free port).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Cluster mode (`--cluster FILE --process I`): this process is one of several that run one
    /// dataflow together; `workers` is then the workers per process. `None`: a single engine.
    #[serde(skip)]
    pub cluster: Option<crate::cluster::ClusterSpec>,
}

/// Who may reach the servers (gRPC, the web report, metrics) and how. The default serves
/// plain text without tokens, which is only allowed on loopback addresses.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    // --- transport ---
    /// Serve gRPC and the web report over TLS with this certificate and key (and, with a
    /// client CA, require client certificates: mTLS). `None`: plain text.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The `Host` names (without port) the web server answers; others get `421`. `None`: the
    /// bound address, `localhost` and `127.0.0.1` (DNS-rebinding protection).
    #[serde(default)]
    pub web_allowed_hosts: Option<Vec<String>>,
    /// Connection caps and concurrency limits of both servers.
    #[serde(default)]
    pub limits: LimitsConfig,
    // --- auth ---
    /// Token auth with HS256: the file holding the shared secret (at least 32 bytes; white
    /// space around it is not part of it).
    #[serde(default)]
    pub jwt_secret_file: Option<PathBuf>,
    /// Token auth with RS256 or ES256: the PEM file of the issuer's public key.
    #[serde(default)]
    pub jwt_public_key: Option<PathBuf>,
    /// Serve without auth on addresses other than loopback (anyone who can reach them reads
    /// everything). Without it, and without a key, such an address is refused.
    #[serde(default)]
    pub insecure_no_auth: bool,
}

/// TLS files of the gRPC and web servers (PEM), read and checked when the servers start.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Certificate authorities whose client certificates are accepted (PEM); when set, a
    /// client without a certificate signed by one of them is refused (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// How much one server takes on at once. Past a cap new connections are closed at once and
/// excess requests are refused (`RESOURCE_EXHAUSTED` / `503`), never queued without bound.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open connections per server (gRPC and web each); more are closed when accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests in progress per gRPC service and for the web report; more are refused.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: default_max_connections(),
            max_concurrent_requests: default_max_concurrent_requests(),
        }
    }
}

fn default_max_connections() -> usize {
    1024
}

fn default_max_concurrent_requests() -> usize {
    512
}

impl SecurityConfig {
    /// Checks the transport settings that need no file access.
    ///
    /// # Errors
    ///
    /// [`EngineError::Config`] naming the setting.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.limits.max_connections == 0 {
            return Err(EngineError::Config(
                "limits.max_connections (--max-connections) must be at least 1".into(),
            ));
        }
        if self.limits.max_concurrent_requests == 0 {
            return Err(EngineError::Config(
                "limits.max_concurrent_requests must be at least 1".into(),
            ));
        }
        if let Some(hosts) = &self.web_allowed_hosts
            && let Some(bad) = hosts
                .iter()
                .find(|h| h.is_empty() || h.contains(['/', ' ', '@']))
        {
            return Err(EngineError::Config(format!(
                "web_allowed_hosts (--web-allowed-hosts): {bad:?} is not a host name"
            )));
        }
        Ok(())
    }

    /// True when token auth is configured (a secret file or a public key).
    pub fn auth_enabled(&self) -> bool {
        self.jwt_secret_file.is_some() || self.jwt_public_key.is_some()
    }

    /// Refuses to expose servers without auth: every address in `addrs` must be loopback
    /// unless auth is configured or `insecure_no_auth` is set.
    ///
    /// # Errors
    ///
    /// A message naming the first exposed address and the two ways out.
    pub fn check_exposure(&self, addrs: &[SocketAddr]) -> Result<(), String> {
        if self.auth_enabled() || self.insecure_no_auth {
            return Ok(());
        }
        match addrs.iter().find(|a| !a.ip().is_loopback()) {
            None => Ok(()),
            Some(addr) => Err(format!(
                "refusing to serve on {addr} without auth: it is not a loopback address, so \
                 anyone who can reach it would read every user's data. Give a token key \
                 (--jwt-secret-file FILE or --jwt-public-key PEM), or, on a network you trust, \
                 --insecure-no-auth"
            )),
        }
    }
}

/// Where and how often checkpoints are written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// The directory; created if missing, and locked while the engine runs.
    pub dir: PathBuf,
    /// Milliseconds between checkpoints while input arrives: at most this much input is read
    /// again after a crash. In a config file the key is `interval`, a duration such as
    /// `"10s"`, `"500ms"` or `"1h"` (`humantime`'s format, like `--checkpoint-interval`).
    #[serde(
        rename = "interval",
        default = "default_checkpoint_interval_ms",
        deserialize_with = "duration_as_ms"
    )]
    pub interval_ms: u64,
    /// When the directory holds checkpoints and none can be read: move them into
    /// `<dir>/discarded-<unix seconds>/` and start from the beginning of the input. Without
    /// it such a start is refused. Readable checkpoints are never discarded.
    #[serde(default)]
    pub discard_unreadable: bool,
}

const fn default_checkpoint_interval_ms() -> u64 {
    10_000
}

/// A duration written for people (`"10s"`, `"2m"`, `"1h"`: `humantime`'s format), as whole
/// milliseconds. A mistake keeps `humantime`'s reason (`unknown time unit "parsecs"`).
fn duration_as_ms<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    use serde::de::Error;
    let text = String::deserialize(deserializer)?;
    let duration = humantime::parse_duration(&text)
        .map_err(|e| D::Error::custom(format!("{text:?} is not a duration (e.g. 10s, 1h): {e}")))?;
    u64::try_from(duration.as_millis())
        .map_err(|_| D::Error::custom(format!("{text:?} is too long")))
}

impl CheckpointConfig {
    /// Checkpoints in `dir` at the default interval.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CheckpointConfig {
            dir: dir.into(),
            interval_ms: default_checkpoint_interval_ms(),
            discard_unreadable: false,
        }
    }
}

const fn default_workers() -> usize {
    1
}

const fn default_epoch_interval_ms() -> u64 {
    50
}

const fn default_epoch_budget() -> usize {
    100_000
}

const fn default_dead_letter_capacity() -> usize {
    crate::sink::dead_letter::DEFAULT_CAPACITY
}

fn default_dead_letter_topic() -> String {
    crate::sink::dead_letter::DEFAULT_DEAD_LETTER_TOPIC.to_string()
}

impl EngineConfig {
    /// Where this process stands in the computation: a single engine, or its place in the
    /// cluster (`workers` per process).
    pub fn topology(&self) -> crate::cluster::Topology {
        match &self.cluster {
            Some(spec) => crate::cluster::Topology {
                process: spec.process,
                processes: spec.processes.len(),
                workers_per_process: self.workers.max(1),
            },
            None => crate::cluster::Topology::single(self.workers),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: default_workers(),
            epoch_interval_ms: default_epoch_interval_ms(),
            epoch_budget: default_epoch_budget(),
            dead_letter_capacity: default_dead_letter_capacity(),
            source: None,
            reference: None,
            #[cfg(feature = "kafka")]
            alerts: None,
            reporting_currency: None,
            grpc: None,
            web: None,
            dead_letter_topic: default_dead_letter_topic(),
            sink: None,
            checkpoint: None,
            security: SecurityConfig::default(),
            metrics: None,
            cluster: None,
        }
    }
}

impl EngineConfig {
    /// The epoch interval as a duration.
    pub fn epoch_interval(&self) -> Duration {
        Duration::from_millis(self.epoch_interval_ms)
    }

    /// The reporting currency as a code, if one is set and valid.
    ///
    /// # Errors
    ///
    /// [`EngineError::Config`] if it is not three uppercase ASCII letters.
    pub fn reporting_currency(&self) -> Result<Option<Currency>, EngineError> {
        self.reporting_currency
            .as_deref()
            .map(|code| {
                <Currency>::try_from(code.as_bytes())
                    .ok()
                    .filter(|c| c.iter().all(u8::is_ascii_uppercase))
                    .ok_or_else(|| {
                        EngineError::Config(format!(
                            "reporting currency must be an ISO 4217 code of three uppercase letters (e.g. EUR), got {code:?}"
                        ))
                    })
            })
            .transpose()
    }

    /// The dataflow's options (the reporting currency), once [`EngineConfig::validate`] passed.
    pub fn dataflow_options(&self) -> DataflowOptions {
        DataflowOptions {
            reporting_currency: self.reporting_currency().ok().flatten(),
        }
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// [`EngineError::Config`] naming the setting and what is allowed.
    pub fn validate(&self) -> Result<(), EngineError> {
        if !(1..=256).contains(&self.workers) {
            return Err(EngineError::Config(format!(
                "workers must be 1 to 256, got {}",
                self.workers
            )));
        }
        if !(1..=60_000).contains(&self.epoch_interval_ms) {
            return Err(EngineError::Config(format!(
                "epoch_interval_ms must be 1 to 60000, got {}",
                self.epoch_interval_ms
            )));
        }
        if self.epoch_budget == 0 {
            return Err(EngineError::Config(
                "epoch_budget must be at least 1".into(),
            ));
        }
        if let Some(sink) = &self.sink {
            sink.validate()?;
        }
        self.reporting_currency()?;
        #[cfg(feature = "kafka")]
        if let Some(alerts) = &self.alerts {
            alerts.validate().map_err(|e| EngineError::Config(e.0))?;
        }
        if let Some(checkpoint) = &self.checkpoint {
            if !(100..=3_600_000).contains(&checkpoint.interval_ms) {
                return Err(EngineError::Config(format!(
                    "checkpoint interval_ms must be 100 to 3600000, got {}",
                    checkpoint.interval_ms
                )));
            }
            if matches!(self.source, Some(SourceConfig::Generator(_))) {
                return Err(EngineError::Config(
                    "checkpoints need a source that can be read again from a position (kafka or file), not the generator".into(),
                ));
            }
        }
        self.security.validate()?;
        if let Some(SourceConfig::Generator(g)) = &self.source {
            g.validate()
                .map_err(|e| EngineError::Config(format!("generator: {e}")))?;
        }
        let served: Vec<SocketAddr> = [self.grpc, self.web, self.metrics]
            .into_iter()
            .flatten()
            .collect();
        self.security
            .check_exposure(&served)
            .map_err(EngineError::Config)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reporting_currency_is_an_iso_code_of_three_uppercase_letters() {
        let with = |code: &str| EngineConfig {
            reporting_currency: Some(code.into()),
            ..EngineConfig::default()
        };
        assert_eq!(with("EUR").reporting_currency().unwrap(), Some(*b"EUR"));
        assert_eq!(
            with("SEK").dataflow_options().reporting_currency,
            Some(*b"SEK")
        );
        for bad in ["eur", "EURO", "EU", "E1R", ""] {
            let err = with(bad).validate().unwrap_err().to_string();
            assert!(err.contains("reporting currency"), "{bad}: {err}");
        }
        assert_eq!(EngineConfig::default().reporting_currency().unwrap(), None);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<EngineConfig>(r#"{"wrokers": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `wrokers`"), "{err}");
        let ok: EngineConfig = serde_json::from_str(
            r#"{"workers": 2, "source": {"kind": "file", "path": "x.jsonl"}}"#,
        )
        .unwrap();
        assert_eq!(ok.workers, 2);
        assert!(matches!(ok.source, Some(SourceConfig::File(_))));
    }

    #[test]
    fn checkpoint_intervals_are_durations_people_write() {
        let parse = |interval: &str| {
            toml::from_str::<CheckpointConfig>(&format!("dir = \"d\"\ninterval = \"{interval}\""))
                .map(|c| c.interval_ms)
        };
        assert_eq!(parse("1h").unwrap(), 3_600_000);
        assert_eq!(parse("2s").unwrap(), 2_000);
        assert_eq!(parse("500ms").unwrap(), 500);
        assert_eq!(parse("1m 30s").unwrap(), 90_000);
        let err = parse("10 parsecs").unwrap_err().to_string();
        assert!(err.contains("unknown time unit"), "{err}");
        let default: CheckpointConfig = toml::from_str("dir = \"d\"").unwrap();
        assert_eq!(default.interval_ms, 10_000);
        let err = toml::from_str::<CheckpointConfig>("dir = \"d\"\ninterval_ms = 5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `interval_ms`"), "{err}");
        // The longest interval validation accepts is 1h.
        let config = EngineConfig {
            checkpoint: Some(CheckpointConfig {
                interval_ms: parse("1h").unwrap(),
                ..CheckpointConfig::new("d")
            }),
            ..EngineConfig::default()
        };
        assert!(config.validate().is_ok());
    }

    #[test]
    fn servers_without_auth_stay_on_loopback() {
        let exposed = |security: SecurityConfig| {
            EngineConfig {
                grpc: Some("127.0.0.1:0".parse().unwrap()),
                web: Some("0.0.0.0:8080".parse().unwrap()),
                security,
                ..EngineConfig::default()
            }
            .validate()
        };
        let err = exposed(SecurityConfig::default()).unwrap_err().to_string();
        assert!(err.contains("0.0.0.0:8080"), "{err}");
        assert!(err.contains("--insecure-no-auth"), "{err}");
        assert!(err.contains("--jwt-secret-file"), "{err}");
        assert!(
            exposed(SecurityConfig {
                insecure_no_auth: true,
                ..SecurityConfig::default()
            })
            .is_ok()
        );
        assert!(
            exposed(SecurityConfig {
                jwt_secret_file: Some("secret".into()),
                ..SecurityConfig::default()
            })
            .is_ok()
        );
        let loopback = EngineConfig {
            grpc: Some("[::1]:0".parse().unwrap()),
            web: Some("127.0.0.1:0".parse().unwrap()),
            ..EngineConfig::default()
        };
        assert!(loopback.validate().is_ok());
        let metrics = EngineConfig {
            metrics: Some("10.1.2.3:9000".parse().unwrap()),
            ..EngineConfig::default()
        };
        assert!(
            metrics
                .validate()
                .unwrap_err()
                .to_string()
                .contains("10.1.2.3:9000")
        );
        let toml: SecurityConfig =
            toml::from_str("jwt_secret_file = \"s\"\ninsecure_no_auth = true").unwrap();
        assert!(toml.auth_enabled() && toml.insecure_no_auth);
    }

    #[test]
    fn validation_names_the_setting() {
        let config = EngineConfig {
            workers: 0,
            ..EngineConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("workers")
        );
        let config = EngineConfig {
            epoch_interval_ms: 0,
            ..EngineConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("epoch_interval_ms")
        );
    }

    #[test]
    fn security_transport_settings_come_from_a_config_file_and_are_checked() {
        let config: EngineConfig = toml::from_str(
            r#"
            [security]
            web_allowed_hosts = ["report.example"]
            [security.tls]
            cert = "server.pem"
            key = "server-key.pem"
            client_ca = "ca.pem"
            [security.limits]
            max_connections = 10
            "#,
        )
        .unwrap();
        let security = &config.security;
        let tls = security.tls.as_ref().unwrap();
        assert_eq!(
            tls.client_ca.as_deref(),
            Some(std::path::Path::new("ca.pem"))
        );
        assert_eq!(security.limits.max_connections, 10);
        assert_eq!(
            security.limits.max_concurrent_requests,
            LimitsConfig::default().max_concurrent_requests
        );
        assert!(config.validate().is_ok());

        let err = toml::from_str::<EngineConfig>("[security.tls]\ncert = \"c.pem\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `key`"), "{err}");
        let zero = EngineConfig {
            security: SecurityConfig {
                limits: LimitsConfig {
                    max_connections: 0,
                    ..LimitsConfig::default()
                },
                ..SecurityConfig::default()
            },
            ..EngineConfig::default()
        };
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("--max-connections"), "{err}");
        let bad_host = SecurityConfig {
            web_allowed_hosts: Some(vec!["http://x".into()]),
            ..SecurityConfig::default()
        };
        assert!(bad_host.validate().is_err());
    }
}
