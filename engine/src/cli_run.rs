//! `spendflow run`: one path into the engine's configuration.
//!
//! The settings start from the TOML file of `--config` when there is one (the library's
//! [`EngineConfig`], every table and key checked, plus the binary's own `log` and
//! `[personnel]`); then each flag given on the command line, or by its environment variable,
//! overrides its key. What neither gives takes the flag's default, which is the library's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::Deserialize;
use spendflow_engine::cassandra::CassandraClientSecurity;
use spendflow_engine::config::{CheckpointConfig, SinkConfig};
use spendflow_engine::kafka_client::KafkaOptions;
use spendflow_engine::personnel::PersonnelConfig;
use spendflow_engine::sink::cassandra::CassandraSinkConfig;
use spendflow_engine::source::file::FileSourceConfig;
use spendflow_engine::source::kafka::{KafkaSourceConfig, OnDataLoss};
use spendflow_engine::{EngineConfig, SourceConfig};

use crate::cli::EngineArgs;
use crate::cli_images::PersonnelArgs;

/// The end of `spendflow run --help`: the config file, by example.
pub const CONFIG_HELP: &str = "\
Config file (--config FILE, TOML): every flag has a key, named like the flag with '_' for '-'
and grouped in tables by what it sets; flags given on the command line (or by their
environment variable) override the file. An unknown key is an error. For example:

  workers = 2
  grpc = \"127.0.0.1:50051\"
  web = \"127.0.0.1:8080\"
  log = \"info\"

  [source]                      # --input, --follow, --topic, --topic-pattern, ...
  kind = \"kafka\"                # or kind = \"file\", path = \"expenses.jsonl\", follow = true
  brokers = \"127.0.0.1:9092\"
  topic_pattern = 'expenses\\.user\\..*'

  [sink]                        # --sink cassandra, --cassandra, --keyspace
  kind = \"cassandra\"
  contact_points = \"127.0.0.1:9042\"

  [checkpoint]                  # --checkpoint-dir, --checkpoint-interval, --discard-checkpoints
  dir = \"/var/lib/spendflow\"
  interval = \"1m\"               # discard_unreadable = true for --discard-checkpoints

  [personnel]                   # --mysql, --hdfs, --max-image-bytes
  mysql = \"mysql://spendflow:spendflow@127.0.0.1:13306/spendflow\"
  hdfs = \"hdfs://127.0.0.1:9000\"

  [security]                    # --web-allowed-hosts; any security flag replaces this table
  web_allowed_hosts = [\"report.example\", \"localhost\"]

  [security.tls]                # --tls-cert, --tls-key, --tls-client-ca
  cert = \"/etc/spendflow/server.pem\"
  key = \"/etc/spendflow/server-key.pem\"

  [security.limits]             # --max-connections (per server)
  max_connections = 1024
  max_concurrent_requests = 512 # per gRPC service, and for the web report

Then: spendflow run --config spendflow.toml -w 4   (4 workers, the rest from the file)";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Read the settings from this TOML file (see the example below); flags given on the
    /// command line override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    engine: EngineArgs,

    /// Where records come from: `file:PATH` (JSON lines) or `kafka:HOST:PORT[,HOST:PORT]`.
    #[arg(
        long,
        value_name = "SOURCE",
        value_parser = parse_input,
        required_unless_present = "config"
    )]
    input: Option<SourceConfig>,

    /// Where results are stored besides the in-memory read model the gRPC service answers
    /// from: `memory` (nothing durable) or `cassandra` (tables per user, category, merchant,
    /// day, month; needs --cassandra).
    #[arg(long, value_enum, default_value_t = SinkArg::Memory)]
    sink: SinkArg,

    /// With --sink cassandra: contact points, HOST:PORT[,HOST:PORT].
    #[arg(long, value_name = "HOST:PORT", env = "SPENDFLOW_CASSANDRA")]
    cassandra: Option<String>,

    #[command(flatten)]
    cassandra_client: CassandraClientArgs,

    /// With --sink cassandra: the keyspace (created if missing, with one replica; see the
    /// README to choose the replication of a real cluster).
    #[arg(long, default_value = "spendflow")]
    keyspace: String,

    /// Write checkpoints of the state and input positions here; on start, the newest one is
    /// restored and reading resumes where it stood, instead of from the beginning. The
    /// directory is locked while the engine runs.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,

    /// Time between checkpoints while input arrives, e.g. 10s, 500ms, 2m, 1h (or a number of
    /// seconds): at most this much input is read again after a crash.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    checkpoint_interval: Duration,

    /// With --checkpoint-dir: when the directory holds checkpoint files and none of them can
    /// be read (damaged, or written by a version this binary does not know), move them into
    /// DIR/discarded-<unix seconds>/ (nothing is deleted) and start without a checkpoint,
    /// reading all input again from the beginning. Without this flag such a start is refused.
    /// Readable checkpoints are never discarded: the newest readable one is used.
    #[arg(long)]
    discard_checkpoints: bool,

    /// Run as one process of a cluster: FILE has one line per process, `TIMELY_ADDR
    /// GRPC_ADDR` (e.g. `10.0.0.1:2101 10.0.0.1:50051`, `#` starts a comment), the same file
    /// for every process. This process listens for its peers on its line's first address and
    /// serves gRPC on the second (unless --grpc is given); -w is the workers per process, the
    /// same in every process. Partitions are divided among the workers of all processes and
    /// any process answers any query. See the README's "Cluster" section.
    #[arg(long, value_name = "FILE", requires = "process")]
    cluster: Option<PathBuf>,

    /// With --cluster: this process's line in the cluster file, counting from 0.
    #[arg(long, value_name = "I", requires = "cluster")]
    process: Option<usize>,

    /// With --cluster: how long to wait at start for every other process to join before
    /// giving up with an error (processes may start in any order).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    cluster_wait: Duration,

    /// Serve the live web report on this address (overview and a page per user), e.g.
    /// 127.0.0.1:8080. Off unless given.
    #[arg(long, value_name = "ADDR")]
    web: Option<SocketAddr>,

    /// With file input: keep reading the file as it grows (like `tail -f`).
    #[arg(long)]
    follow: bool,

    /// With Kafka input: read every topic whose whole name matches this regex; topics created
    /// later are picked up within --discovery-interval-ms.
    #[arg(long, value_name = "REGEX", conflicts_with = "topic")]
    topic_pattern: Option<String>,

    /// With Kafka input: read this one topic (e.g. a topic keyed by user id).
    #[arg(long, value_name = "NAME")]
    topic: Option<String>,

    /// With Kafka input: the topic rejected records are copied to, with headers saying where
    /// they came from and why.
    #[arg(long, default_value = "expenses.dead-letter")]
    dead_letter_topic: String,

    /// With Kafka input: topics named this prefix and a user id hold only that user's records;
    /// a record there that names another user is rejected.
    #[arg(long, default_value = "expenses.user.")]
    user_topic_prefix: String,

    /// With Kafka input: how often to look for new matching topics, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    discovery_interval_ms: u64,

    /// With Kafka input: what to do when records a partition had to read next were deleted
    /// from Kafka before they were read (retention, kafka-delete-records), e.g. a checkpoint's
    /// position that is older than the topic's oldest record.
    #[arg(long, value_enum, default_value = "fail")]
    on_data_loss: OnDataLossArg,

    /// Join users' monthly budgets and currencies and the exchange rates (`fx_rates`) live from
    /// this MariaDB/MySQL database's binlog (row format; the user needs REPLICATION SLAVE and
    /// REPLICATION CLIENT): `mysql://user:password@host:port/database`. A consistent snapshot
    /// on the first start, then every committed change; the binlog position is checkpointed.
    #[arg(long, value_name = "URL")]
    mysql_cdc: Option<String>,

    /// With Kafka input: write every change of a budget alert's state (80 % and 100 % of the
    /// monthly budget, per user and UTC month) to this topic, once, as JSON keyed by user id.
    #[arg(long, value_name = "NAME")]
    alerts_topic: Option<String>,

    /// Convert every user's total to this currency (ISO 4217, e.g. EUR) with the live
    /// exchange rates (`fx_rates`, through --mysql-cdc), and rank TopSpenders by the converted
    /// total: rate_micros reporting micro-units per unit, rounded half away from zero.
    #[arg(long, value_name = "CODE")]
    reporting_currency: Option<String>,

    #[command(flatten)]
    kafka_client: KafkaClientArgs,

    #[command(flatten)]
    personnel: PersonnelArgs,
}

/// `--on-data-loss`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnDataLossArg {
    /// Stop reading that partition: an ERROR names topic, partition and the lost offset range,
    /// Admin/GetStatus shows it (state stopped_data_loss), the partition keeps its lag and the
    /// engine is never caught up; other partitions keep being read and served. Restart with
    /// `skip` to accept the loss.
    Fail,
    /// Accept the loss: continue from the oldest record still in the partition. The lost
    /// range is still logged and shown in Admin/GetStatus; the served totals lack those
    /// records.
    Skip,
}

impl From<OnDataLossArg> for OnDataLoss {
    fn from(arg: OnDataLossArg) -> Self {
        match arg {
            OnDataLossArg::Fail => OnDataLoss::Fail,
            OnDataLossArg::Skip => OnDataLoss::Skip,
        }
    }
}

/// Where `run` stores results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SinkArg {
    /// Only the in-memory read model (lost on restart unless checkpoints are on).
    Memory,
    /// Cassandra tables, written per closed epoch, idempotently.
    Cassandra,
}

/// An `--input` that is neither `file:PATH` nor `kafka:BROKERS`.
#[derive(Debug, thiserror::Error)]
#[error(
    "--input must be file:PATH (a file of JSON lines) or kafka:HOST:PORT[,HOST:PORT], got {0:?}"
)]
pub struct BadInput(String);

/// `--input`: the source it names, with every other setting at its default (the Kafka topics
/// come from `--topic` or `--topic-pattern`).
fn parse_input(text: &str) -> Result<SourceConfig, BadInput> {
    match text.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(SourceConfig::File(FileSourceConfig {
            path: PathBuf::from(path),
            follow: false,
        })),
        Some(("kafka", brokers)) if !brokers.is_empty() => {
            Ok(SourceConfig::Kafka(KafkaSourceConfig {
                topic_pattern: None,
                ..KafkaSourceConfig::pattern(brokers, "")
            }))
        }
        _ => Err(BadInput(text.to_string())),
    }
}

/// A duration as people write it (`10s`, `500ms`, `2m`, `1h 30m`; `humantime`'s format), or a
/// number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, humantime::DurationError> {
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(text),
    }
}

/// What a `--config` file holds.
#[derive(Debug)]
pub struct RunFile {
    /// Everything but the two keys below: the library's own configuration.
    engine: EngineConfig,
    /// `log`: the log filter, like `--log`.
    log: Option<String>,
    /// `[personnel]`: like `--mysql`, `--hdfs`, `--max-image-bytes`.
    personnel: Option<PersonnelConfig>,
}

impl RunFile {
    /// Reads and checks a config file.
    pub fn read(path: &Path) -> Result<RunFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read the config file {}", path.display()))?;
        RunFile::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// Parses the text of a config file: TOML syntax first (errors with line and column), then
    /// each part, so that an unknown or misspelt key anywhere is an error naming it.
    fn parse(text: &str) -> Result<RunFile> {
        let mut table: toml::Table = toml::from_str(text)?;
        let log = match table.remove("log") {
            Some(value) => Some(String::deserialize(value).context("log")?),
            None => None,
        };
        let personnel = match table.remove("personnel") {
            Some(value) => Some(PersonnelConfig::deserialize(value).context("[personnel]")?),
            None => None,
        };
        let engine = EngineConfig::deserialize(toml::Value::Table(table))?;
        Ok(RunFile {
            engine,
            log,
            personnel,
        })
    }
}

/// Everything a `run` needs, from the file and the flags.
#[derive(Debug)]
pub struct RunSettings {
    pub engine: EngineConfig,
    pub personnel: Option<PersonnelConfig>,
    pub log: String,
    /// Flags given that do not apply to the source (`--follow` with Kafka, ...); `run` warns
    /// about them once logging is set up.
    pub ignored_flags: Vec<&'static str>,
}

/// Whether the flag `id` was given, on the command line or by its environment variable, as
/// opposed to taking its default.
pub fn given(matches: &ArgMatches, id: &str) -> bool {
    debug_assert!(matches.try_contains_id(id).is_ok(), "no flag {id}");
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

impl RunArgs {
    /// The config file, if `--config` names one.
    pub fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// The settings of this run: `file`'s, overridden by the flags given (`matches` are this
    /// subcommand's; `log` is `--log`'s value and `log_given` whether it was given).
    pub fn settings(
        self,
        matches: &ArgMatches,
        file: Option<RunFile>,
        log: &str,
        log_given: bool,
    ) -> Result<RunSettings> {
        let from_file = file.is_some();
        // A flag with a default applies when given, or when there is no file to keep.
        let take = |id: &str| !from_file || given(matches, id);
        let (mut config, file_log, file_personnel) = match file {
            Some(f) => (f.engine, f.log, f.personnel),
            None => (EngineConfig::default(), None, None),
        };

        if take("workers") {
            config.workers = self.engine.workers;
        }
        if take("epoch_interval_ms") {
            config.epoch_interval_ms = self.engine.epoch_interval_ms;
        }
        if let (Some(file), Some(process)) = (&self.cluster, self.process) {
            let mut spec = spendflow_engine::cluster::ClusterSpec::read(file, process)?;
            spec.wait = self.cluster_wait;
            if !given(matches, "grpc") {
                let addr = &spec.me().grpc;
                let resolved = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
                    .with_context(|| {
                        format!(
                            "the gRPC address {addr} of process {process} in {}",
                            file.display()
                        )
                    })?
                    .next()
                    .with_context(|| format!("the gRPC address {addr} resolves to nothing"))?;
                config.grpc = Some(resolved);
            }
            config.cluster = Some(spec);
        }
        if config.grpc.is_none() || given(matches, "grpc") {
            config.grpc = Some(self.engine.grpc);
        }
        if self.web.is_some() {
            config.web = self.web;
        }
        // Security flags given on the command line replace the file's `[security]` table.
        let security = self.engine.security.config()?;
        if !self.engine.security.is_empty() {
            config.security = security;
        }
        if self.engine.security.metrics.is_some() {
            config.metrics = self.engine.security.metrics;
        }
        if take("dead_letter_topic") {
            config.dead_letter_topic = self.dead_letter_topic.clone();
        }
        if let Some(code) = &self.reporting_currency {
            config.reporting_currency = Some(code.clone());
        }
        if let Some(url) = &self.mysql_cdc {
            config.reference = Some(SourceConfig::MysqlCdc(
                spendflow_engine::source::mysql_cdc::MysqlCdcSourceConfig::new(url.clone()),
            ));
        }

        if let Some(input) = self.input.clone() {
            config.source = Some(locate(config.source.take(), input));
        }
        match &mut config.source {
            Some(SourceConfig::File(file)) => {
                if take("follow") {
                    file.follow = self.follow;
                }
            }
            Some(SourceConfig::Kafka(kafka)) => self.kafka(kafka, &take)?,
            Some(SourceConfig::Generator(_) | SourceConfig::MysqlCdc(_)) => {}
            None => bail!("give --input SOURCE, or a [source] table in the config file"),
        }
        if let Some(topic) = &self.alerts_topic {
            if config.cluster.is_some() {
                bail!(
                    "--alerts-topic is not supported with --cluster yet: run the alerts from a single engine, or read ListAlerts/Subscribe from the cluster"
                );
            }
            let Some(SourceConfig::Kafka(kafka)) = &config.source else {
                bail!(
                    "--alerts-topic needs Kafka input (--input kafka:HOST:PORT): alerts go to the same brokers"
                );
            };
            let mut alerts = spendflow_engine::sink::alerts::AlertsTopicConfig::new(
                kafka.brokers.clone(),
                topic.clone(),
            );
            alerts.librdkafka_options = kafka.librdkafka_options.clone();
            config.alerts = Some(alerts);
        }
        let ignored_flags = self.ignored_flags(matches, &config);

        if take("sink") {
            match self.sink {
                SinkArg::Memory => config.sink = None,
                SinkArg::Cassandra => {
                    if config.sink.is_none() {
                        config.sink = Some(SinkConfig::Cassandra(CassandraSinkConfig::new(
                            String::new(),
                        )));
                    }
                }
            }
        }
        if let Some(SinkConfig::Cassandra(cassandra)) = &mut config.sink {
            if let Some(contact_points) = &self.cassandra {
                cassandra.contact_points = contact_points.clone();
            }
            if cassandra.contact_points.is_empty() {
                bail!("--sink cassandra needs --cassandra HOST:PORT (or SPENDFLOW_CASSANDRA)");
            }
            if take("keyspace") {
                cassandra.keyspace = self.keyspace.clone();
            }
            // Flags replace the file's `[sink.client_security]` as a whole.
            if !self.cassandra_client.is_empty() {
                cassandra.client_security = self.cassandra_client.security();
            }
        }

        if let Some(dir) = &self.checkpoint_dir {
            match &mut config.checkpoint {
                Some(checkpoint) => checkpoint.dir = dir.clone(),
                None => config.checkpoint = Some(CheckpointConfig::new(dir)),
            }
        }
        match &mut config.checkpoint {
            Some(checkpoint) => {
                if take("checkpoint_interval") {
                    // Longer than u64 milliseconds is refused by validation as too long.
                    checkpoint.interval_ms =
                        u64::try_from(self.checkpoint_interval.as_millis()).unwrap_or(u64::MAX);
                }
                checkpoint.discard_unreadable |= self.discard_checkpoints;
            }
            None if self.discard_checkpoints => bail!(
                "--discard-checkpoints needs --checkpoint-dir DIR (or a [checkpoint] table in \
                 the config file)"
            ),
            None => {}
        }

        let personnel = self
            .personnel
            .settings(file_personnel, |id| given(matches, id))?;
        let log = match file_log {
            Some(file_log) if !log_given => file_log,
            _ => log.to_string(),
        };
        Ok(RunSettings {
            engine: config,
            personnel,
            log,
            ignored_flags,
        })
    }

    /// The Kafka flags, onto the Kafka source.
    fn kafka(&self, kafka: &mut KafkaSourceConfig, take: &dyn Fn(&str) -> bool) -> Result<()> {
        if let Some(topic) = &self.topic {
            kafka.topic = Some(topic.clone());
            kafka.topic_pattern = None;
        }
        if let Some(pattern) = &self.topic_pattern {
            kafka.topic_pattern = Some(pattern.clone());
            kafka.topic = None;
        }
        if kafka.topic.is_none() && kafka.topic_pattern.is_none() {
            bail!("with --input kafka:..., give --topic-pattern REGEX or --topic NAME");
        }
        if take("user_topic_prefix") {
            kafka.user_topic_prefix = self.user_topic_prefix.clone();
        }
        if take("discovery_interval_ms") {
            kafka.discovery_interval_ms = self.discovery_interval_ms;
        }
        if take("on_data_loss") {
            kafka.on_data_loss = self.on_data_loss.into();
        }
        // The flags' settings go on top of the file's `librdkafka_options`.
        self.kafka_client.add_to(&mut kafka.librdkafka_options)?;
        Ok(())
    }

    /// The source flags given on the command line that do not apply to the source.
    fn ignored_flags(&self, matches: &ArgMatches, config: &EngineConfig) -> Vec<&'static str> {
        let kafka = matches!(config.source, Some(SourceConfig::Kafka(_)));
        let file = matches!(config.source, Some(SourceConfig::File(_)));
        let mut unused = Vec::new();
        if !file && given(matches, "follow") {
            unused.push("--follow");
        }
        if !kafka {
            if self.topic.is_some() {
                unused.push("--topic");
            }
            if self.topic_pattern.is_some() {
                unused.push("--topic-pattern");
            }
            for (id, flag) in [
                ("user_topic_prefix", "--user-topic-prefix"),
                ("discovery_interval_ms", "--discovery-interval-ms"),
                ("on_data_loss", "--on-data-loss"),
                ("kafka_option", "--kafka-option"),
                ("kafka_options_file", "--kafka-options-file"),
            ] {
                if given(matches, id) {
                    unused.push(flag);
                }
            }
        }
        unused
    }
}

/// The librdkafka settings of `run` and `generate`: how SASL and TLS are turned on.
#[derive(Debug, Default, Args)]
pub(crate) struct KafkaClientArgs {
    /// A librdkafka setting for every Kafka client (repeatable), e.g.
    /// `--kafka-option security.protocol=SASL_SSL --kafka-option sasl.mechanisms=PLAIN
    /// --kafka-option sasl.username=NAME --kafka-option ssl.ca.location=ca.pem`. Settings the
    /// exactly-once guarantee rests on (enable.auto.commit, auto.offset.reset,
    /// isolation.level, enable.idempotence, ...) are refused.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    kafka_option: Vec<String>,

    /// A file of librdkafka settings, one KEY=VALUE per line (`#` comments), read before the
    /// --kafka-option flags: the place for secrets such as sasl.password, which would be
    /// visible to other users in the process list as a flag.
    #[arg(long, value_name = "FILE")]
    kafka_options_file: Option<PathBuf>,
}

impl KafkaClientArgs {
    /// Adds the file's and the flags' settings to `options`.
    pub(crate) fn add_to(&self, options: &mut KafkaOptions) -> Result<()> {
        if let Some(file) = &self.kafka_options_file {
            options.read_file(file)?;
        }
        for option in &self.kafka_option {
            options.push(option)?;
        }
        Ok(())
    }
}

/// How `run`, `serve` and `verify` reach a Cassandra cluster that wants credentials or TLS.
#[derive(Debug, Default, Args)]
pub(crate) struct CassandraClientArgs {
    /// The Cassandra username (PasswordAuthenticator); needs --cassandra-password-file.
    #[arg(long, value_name = "NAME", requires = "cassandra_password_file")]
    cassandra_user: Option<String>,

    /// A file whose first line is the Cassandra password.
    #[arg(long, value_name = "FILE", requires = "cassandra_user")]
    cassandra_password_file: Option<PathBuf>,

    /// Connect to Cassandra over TLS, verifying the nodes against the CA certificates in this
    /// PEM file.
    #[arg(long, value_name = "PEM")]
    cassandra_tls_ca: Option<PathBuf>,

    /// With --cassandra-tls-ca: the name the nodes' certificates must be valid for (default:
    /// the host of the first contact point).
    #[arg(long, value_name = "NAME", requires = "cassandra_tls_ca")]
    cassandra_tls_server_name: Option<String>,
}

impl CassandraClientArgs {
    /// True when none of these flags was given.
    pub(crate) fn is_empty(&self) -> bool {
        self.cassandra_user.is_none()
            && self.cassandra_password_file.is_none()
            && self.cassandra_tls_ca.is_none()
            && self.cassandra_tls_server_name.is_none()
    }

    /// The settings these flags give.
    pub(crate) fn security(&self) -> CassandraClientSecurity {
        CassandraClientSecurity {
            username: self.cassandra_user.clone(),
            password_file: self.cassandra_password_file.clone(),
            tls_ca: self.cassandra_tls_ca.clone(),
            tls_server_name: self.cassandra_tls_server_name.clone(),
        }
    }
}

/// The source `--input` names, keeping the file's other settings of that source when the file
/// has the same kind of source (`--input kafka:other:9092` keeps the file's topics).
fn locate(from_file: Option<SourceConfig>, input: SourceConfig) -> SourceConfig {
    match (from_file, input) {
        (Some(SourceConfig::File(mut file)), SourceConfig::File(input)) => {
            file.path = input.path;
            SourceConfig::File(file)
        }
        (Some(SourceConfig::Kafka(mut kafka)), SourceConfig::Kafka(input)) => {
            kafka.brokers = input.brokers;
            SourceConfig::Kafka(kafka)
        }
        (_, input) => input,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run ARGS` as the binary parses it, with `file` as the config file's text.
    fn settings(args: &[&str], file: Option<&str>) -> Result<RunSettings> {
        let config = ["--config", "spendflow.toml"];
        let config: &[&str] = if file.is_some() { &config } else { &[] };
        let args: Vec<&str> = config.iter().chain(args).copied().collect();
        let (run, matches, log, log_given) = crate::cli::parse_run(&args)?;
        let file = file.map(RunFile::parse).transpose()?;
        run.settings(&matches, file, &log, log_given)
    }

    #[test]
    fn kafka_and_cassandra_client_flags_go_on_top_of_the_file() {
        let file = r#"
            [source]
            kind = "kafka"
            brokers = "k1:9092"
            topic = "t"
            librdkafka_options = { "security.protocol" = "SSL", "sasl.mechanisms" = "PLAIN" }

            [sink]
            kind = "cassandra"
            contact_points = "c1:9042"
            client_security = { tls_ca = "/file/ca.pem" }
        "#;
        let s = settings(
            &[
                "--kafka-option",
                "security.protocol=SASL_SSL",
                "--cassandra-tls-ca",
                "/flag/ca.pem",
            ],
            Some(file),
        )
        .unwrap();
        let Some(SourceConfig::Kafka(k)) = &s.engine.source else {
            panic!("{:?}", s.engine.source)
        };
        assert_eq!(
            k.librdkafka_options.get("security.protocol"),
            Some("SASL_SSL")
        );
        assert_eq!(k.librdkafka_options.get("sasl.mechanisms"), Some("PLAIN"));
        let Some(SinkConfig::Cassandra(c)) = &s.engine.sink else {
            panic!("{:?}", s.engine.sink)
        };
        assert_eq!(
            c.client_security.tls_ca.as_deref(),
            Some(Path::new("/flag/ca.pem"))
        );
        // Without flags the file's settings stay; a reserved key in the file is refused.
        let s = settings(&[], Some(file)).unwrap();
        let Some(SinkConfig::Cassandra(c)) = &s.engine.sink else {
            panic!()
        };
        assert_eq!(
            c.client_security.tls_ca.as_deref(),
            Some(Path::new("/file/ca.pem"))
        );
        let bad = file.replace("\"sasl.mechanisms\"", "\"enable.auto.commit\"");
        let error = settings(&[], Some(&bad)).unwrap_err();
        assert!(
            error.to_string().contains("enable.auto.commit"),
            "{error:#}"
        );
    }

    const FILE: &str = r#"
        workers = 3
        grpc = "127.0.0.1:7001"
        web = "127.0.0.1:7002"
        epoch_interval_ms = 30
        dead_letter_topic = "dl"
        log = "debug"

        [source]
        kind = "kafka"
        brokers = "k1:9092"
        topic_pattern = 'a\..*'
        user_topic_prefix = "a."
        discovery_interval_ms = 500
        on_data_loss = "skip"

        [sink]
        kind = "cassandra"
        contact_points = "c1:9042"
        keyspace = "ks"

        [checkpoint]
        dir = "/tmp/ck"
        interval = "1h"
        discard_unreadable = true

        [personnel]
        mysql = "mysql://m/db"
        hdfs = "hdfs://h:9000"
        max_image_bytes = 1000
    "#;

    #[test]
    fn the_file_gives_every_setting() {
        let s = settings(&[], Some(FILE)).unwrap();
        let c = &s.engine;
        assert_eq!(c.workers, 3);
        assert_eq!(c.grpc, Some("127.0.0.1:7001".parse().unwrap()));
        assert_eq!(c.web, Some("127.0.0.1:7002".parse().unwrap()));
        assert_eq!(c.epoch_interval_ms, 30);
        assert_eq!(c.dead_letter_topic, "dl");
        let Some(SourceConfig::Kafka(k)) = &c.source else {
            panic!("{:?}", c.source)
        };
        assert_eq!(
            (k.brokers.as_str(), k.topic_pattern.as_deref(), &k.topic),
            ("k1:9092", Some(r"a\..*"), &None)
        );
        assert_eq!(
            (
                k.user_topic_prefix.as_str(),
                k.discovery_interval_ms,
                k.on_data_loss
            ),
            ("a.", 500, OnDataLoss::Skip)
        );
        let Some(SinkConfig::Cassandra(sink)) = &c.sink else {
            panic!("{:?}", c.sink)
        };
        // SPENDFLOW_CASSANDRA, when the services are up, overrides the file like the flag.
        if std::env::var_os("SPENDFLOW_CASSANDRA").is_none() {
            assert_eq!(sink.contact_points, "c1:9042");
        }
        assert_eq!(sink.keyspace, "ks");
        let ck = c.checkpoint.as_ref().unwrap();
        assert_eq!(
            (ck.dir.as_path(), ck.interval_ms, ck.discard_unreadable),
            (Path::new("/tmp/ck"), 3_600_000, true)
        );
        assert_eq!(
            s.personnel,
            Some(PersonnelConfig {
                mysql: "mysql://m/db".into(),
                hdfs: "hdfs://h:9000".into(),
                max_image_bytes: 1000
            })
        );
        if std::env::var_os("RUST_LOG").is_none() {
            assert_eq!(s.log, "debug");
        }
        c.validate().unwrap();
    }

    #[test]
    fn flags_override_the_file_key_by_key() {
        let s = settings(
            &[
                "-w",
                "5",
                "--grpc",
                "127.0.0.1:7101",
                "--epoch-interval-ms",
                "40",
                "--input",
                "kafka:k2:9092",
                "--topic",
                "t",
                "--on-data-loss",
                "fail",
                "--keyspace",
                "ks2",
                "--cassandra",
                "c2:9042",
                "--checkpoint-dir",
                "/tmp/ck2",
                "--checkpoint-interval",
                "2m",
                "--hdfs",
                "hdfs://h2:9000",
                "--log",
                "warn",
            ],
            Some(FILE),
        )
        .unwrap();
        let c = &s.engine;
        assert_eq!(c.workers, 5);
        assert_eq!(c.grpc, Some("127.0.0.1:7101".parse().unwrap()));
        assert_eq!(c.epoch_interval_ms, 40);
        // Not given: the file's.
        assert_eq!(c.web, Some("127.0.0.1:7002".parse().unwrap()));
        assert_eq!(c.dead_letter_topic, "dl");
        let Some(SourceConfig::Kafka(k)) = &c.source else {
            panic!("{:?}", c.source)
        };
        assert_eq!(
            (k.brokers.as_str(), k.topic.as_deref(), &k.topic_pattern),
            ("k2:9092", Some("t"), &None)
        );
        assert_eq!(k.on_data_loss, OnDataLoss::Fail);
        assert_eq!(
            (k.user_topic_prefix.as_str(), k.discovery_interval_ms),
            ("a.", 500)
        );
        let Some(SinkConfig::Cassandra(sink)) = &c.sink else {
            panic!("{:?}", c.sink)
        };
        assert_eq!(
            (sink.contact_points.as_str(), sink.keyspace.as_str()),
            ("c2:9042", "ks2")
        );
        let ck = c.checkpoint.as_ref().unwrap();
        assert_eq!(
            (ck.dir.as_path(), ck.interval_ms, ck.discard_unreadable),
            (Path::new("/tmp/ck2"), 120_000, true)
        );
        let p = s.personnel.unwrap();
        assert_eq!(
            (p.mysql.as_str(), p.hdfs.as_str(), p.max_image_bytes),
            ("mysql://m/db", "hdfs://h2:9000", 1000)
        );
        assert_eq!(s.log, "warn");

        // --sink memory drops the file's sink; another kind of input replaces the source.
        let s = settings(
            &[
                "--sink",
                "memory",
                "--input",
                "file:x.jsonl",
                "--on-data-loss",
                "skip",
            ],
            Some(FILE),
        )
        .unwrap();
        assert!(s.engine.sink.is_none());
        assert_eq!(s.ignored_flags, ["--on-data-loss"]);
        assert!(
            matches!(&s.engine.source, Some(SourceConfig::File(f)) if f.path == Path::new("x.jsonl") && !f.follow)
        );
    }

    #[test]
    fn without_a_file_the_flags_and_their_defaults_are_the_settings() {
        let s = settings(&["--input", "kafka:k:9092", "--topic-pattern", "x.*"], None).unwrap();
        let c = &s.engine;
        let defaults = EngineConfig::default();
        assert_eq!(
            (c.workers, c.epoch_interval_ms, c.grpc, c.web),
            (1, 50, Some("127.0.0.1:50051".parse().unwrap()), None)
        );
        assert_eq!(c.dead_letter_topic, defaults.dead_letter_topic);
        assert!(c.sink.is_none() && c.checkpoint.is_none() && s.personnel.is_none());
        let Some(SourceConfig::Kafka(k)) = &c.source else {
            panic!("{:?}", c.source)
        };
        let library = KafkaSourceConfig::pattern("k:9092", "x.*");
        assert_eq!(
            (
                &k.user_topic_prefix,
                k.discovery_interval_ms,
                k.on_data_loss,
                &k.group_id
            ),
            (
                &library.user_topic_prefix,
                library.discovery_interval_ms,
                library.on_data_loss,
                &library.group_id
            )
        );

        // The flags' defaults are the library's (a file without a key means the same).
        let s = settings(&["--checkpoint-dir", "d", "--input", "file:f"], None).unwrap();
        let from_file = settings(
            &[],
            Some("[source]\nkind = \"file\"\npath = \"f\"\n[checkpoint]\ndir = \"d\""),
        )
        .unwrap();
        assert_eq!(
            s.engine.checkpoint.as_ref().unwrap().interval_ms,
            from_file.engine.checkpoint.as_ref().unwrap().interval_ms
        );
        assert_eq!(
            (s.engine.workers, s.engine.epoch_interval_ms, s.engine.grpc),
            (
                from_file.engine.workers,
                from_file.engine.epoch_interval_ms,
                from_file.engine.grpc
            )
        );
    }

    #[test]
    fn mistakes_are_errors_that_name_them() {
        let err =
            |args: &[&str], file: Option<&str>| format!("{:#}", settings(args, file).unwrap_err());
        let e = err(
            &[],
            Some("wrokers = 2\n[source]\nkind = \"file\"\npath = \"f\""),
        );
        assert!(e.contains("unknown field `wrokers`"), "{e}");
        let e = err(
            &[],
            Some("[source]\nkind = \"file\"\npath = \"f\"\nfolow = true"),
        );
        assert!(e.contains("unknown field `folow`"), "{e}");
        let e = err(
            &[],
            Some("[personnel]\nmysql = \"m\"\nhdfs = \"h\"\nmax_bytes = 1"),
        );
        assert!(
            e.contains("unknown field `max_bytes`") && e.contains("[personnel]"),
            "{e}"
        );
        let e = err(&[], Some("workers = "));
        assert!(e.contains("line 1"), "{e}");
        let e = err(&[], Some("workers = 2"));
        assert!(e.contains("--input"), "{e}");
        let e = err(&["--input", "kafak:k:9092"], None);
        assert!(e.contains("--input must be"), "{e}");
        let e = err(&["--input", "kafka:k:9092"], None);
        assert!(e.contains("--topic-pattern REGEX or --topic NAME"), "{e}");
        let e = err(&["--input", "file:f", "--discard-checkpoints"], None);
        assert!(
            e.contains("--discard-checkpoints needs --checkpoint-dir"),
            "{e}"
        );
        let e = err(
            &["--input", "file:f", "--checkpoint-interval", "10 parsecs"],
            None,
        );
        assert!(e.contains("--checkpoint-interval"), "{e}");
        let e = err(&["--input", "file:f", "--mysql", "mysql://m/db"], None);
        assert!(e.contains("--hdfs"), "{e}");
    }

    #[test]
    fn durations_are_humantime_or_seconds() {
        let ok = |text: &str| parse_duration(text).unwrap();
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("2s"), Duration::from_secs(2));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1m 30s"), Duration::from_secs(90));
        assert_eq!(ok("10"), Duration::from_secs(10));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_help_example_is_a_valid_config_file() {
        let example: String = CONFIG_HELP
            .lines()
            .skip_while(|line| !line.contains("workers = 2"))
            .take_while(|line| !line.starts_with("Then:"))
            .collect::<Vec<_>>()
            .join("\n");
        let file = RunFile::parse(&example).unwrap();
        assert_eq!(file.engine.workers, 2);
        assert!(matches!(file.engine.source, Some(SourceConfig::Kafka(_))));
        assert!(matches!(file.engine.sink, Some(SinkConfig::Cassandra(_))));
        assert_eq!(file.engine.checkpoint.as_ref().unwrap().interval_ms, 60_000);
        assert!(file.personnel.is_some());
        assert!(file.engine.security.tls.is_some());
        assert_eq!(file.engine.security.limits.max_connections, 1024);
        file.engine.validate().unwrap();
    }
}
