//! The command line: parses arguments, builds an engine configuration, and runs it until Ctrl-C.
//! Everything it does goes through the library's public API, like any embedding program.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use spendflow_engine::config::{CheckpointConfig, SinkConfig};
use spendflow_engine::generate::config::{
    DEFAULT_BATCH, DEFAULT_PARTITIONS, DEFAULT_TOPIC, DEFAULT_TOPIC_PREFIX,
};
use spendflow_engine::generate::{GenerateConfig, Layout, TerminalProgress};
use spendflow_engine::personnel::Personnel;
use spendflow_engine::serve::cassandra::{CassandraServeConfig, CassandraServer};
use spendflow_engine::sink::cassandra::CassandraSinkConfig;
use spendflow_engine::source::file::FileSourceConfig;
use spendflow_engine::source::generator::{GeneratorConfig, GeneratorSourceConfig};
use spendflow_engine::source::kafka::{KafkaSourceConfig, OnDataLoss};
use spendflow_engine::verify::cassandra::CassandraServed;
use spendflow_engine::verify::grpc::GrpcServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, VerifyOptions};
use spendflow_engine::{Engine, EngineConfig, SourceConfig, Status};

use crate::cli_images::{ImagesArgs, PersonnelArgs, images_command, start_avatars};

/// spendflow: real-time expense analytics on differential dataflow.
///
/// Reads card expenses (JSON records), keeps per-user totals, counts, per-category,
/// per-merchant, per-day and per-month aggregates and top spenders exactly up to date —
/// corrections, deletes and refunds included — and serves them over gRPC.
#[derive(Debug, Parser)]
#[command(
    name = "spendflow",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Log filter, e.g. `info`, `spendflow_engine=debug` (the RUST_LOG variable also works).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in-process: a simulated card stream, the dataflow, the gRPC service and
    /// the live web report.
    ///
    /// Needs no Kafka, database or other service. Prints the web address and grpcurl commands
    /// to try, then a live progress line, until Ctrl-C.
    Demo(DemoArgs),
    /// Run the engine over an input and serve the results until Ctrl-C.
    ///
    /// Examples:
    ///   spendflow run --input file:expenses.jsonl --follow -w 2
    ///   spendflow run --input kafka:127.0.0.1:9092 --topic-pattern 'expenses\.user\..*' -w 2
    ///   spendflow run --input kafka:127.0.0.1:9092 --topic expenses
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Simulate card expenses into MySQL (the ground truth) and stream them to Kafka.
    ///
    /// Each batch is committed to MySQL with an outbox, then produced to Kafka (idempotent
    /// producer, acks=all), so a crash loses nothing: a restart with the same settings
    /// re-publishes the outbox and continues where the run stopped. Deterministic for a seed.
    ///
    /// Examples:
    ///   spendflow generate --mysql mysql://spendflow:spendflow@127.0.0.1:13306/spendflow \
    ///       --brokers 127.0.0.1:9092 --users 200 --events 50000 --bad-rate 0.01
    ///   spendflow generate --mysql ... --brokers ... --layout keyed --partitions 4 --rate 1000
    #[command(verbatim_doc_comment)]
    Generate(GenerateArgs),
    /// Compare the engine's answers over gRPC, or the Cassandra sink's tables, with SQL over
    /// the live expenses in MySQL.
    ///
    /// Checks every user's total, count, per-category and per-month aggregates, and users
    /// present on one side only. Waits for the served side to be caught up first (gRPC: the
    /// engine reports caught_up; Cassandra: the sink has been quiet for --quiet-ms). Prints
    /// the mismatches (the first 20, with both values) and exits non-zero if there is any.
    ///
    /// Examples:
    ///   spendflow verify --mysql mysql://spendflow:spendflow@127.0.0.1:13306/spendflow \
    ///       --grpc 127.0.0.1:50051
    ///   spendflow verify --mysql mysql://spendflow:spendflow@127.0.0.1:13306/spendflow \
    ///       --cassandra 127.0.0.1:9042 --keyspace spendflow
    #[command(verbatim_doc_comment)]
    Verify(VerifyArgs),
    /// Serve the gRPC query service alone, from the Cassandra sink's tables: no engine.
    ///
    /// Answers spendflow.v1.ExpenseQuery and Admin/GetStatus from what an engine run with
    /// --sink cassandra wrote, with health and reflection, so readers scale apart from the
    /// engine. An answer's as_of is the sink's newest committed epoch (sink_progress); rows
    /// may be newer, so answers are *at least* as_of. Subscribe and Admin/ListRejected answer
    /// UNIMPLEMENTED (use the engine's own gRPC address). With --web, also serves the web
    /// report from the same tables (it reloads when a newer epoch is committed). Runs until
    /// Ctrl-C or SIGTERM.
    ///
    /// Examples:
    ///   spendflow serve --from cassandra --cassandra 127.0.0.1:9042 --keyspace spendflow \
    ///       --grpc 127.0.0.1:50052 --web 127.0.0.1:8080
    ///   grpcurl -plaintext 127.0.0.1:50052 spendflow.v1.Admin/GetStatus
    ///   grpcurl -plaintext -d '{"limit": 5}' 127.0.0.1:50052 spendflow.v1.ExpenseQuery/TopSpenders
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
    /// Personnel pictures: upload, download, delete, and clean up orphans.
    ///
    /// Pictures are content-addressed blobs on HDFS (`<root>/<sha[0..2]>/<sha256>`); the user's
    /// reference is in the MySQL users table. PNG, JPEG and WebP only (by content), at most
    /// 5 MiB by default.
    ///
    /// Examples:
    ///   spendflow images put 42 face.png --mysql mysql://spendflow:spendflow@127.0.0.1:13306/spendflow \
    ///       --hdfs hdfs://127.0.0.1:9000
    ///   spendflow images get 42 out.png --mysql ... --hdfs ...
    ///   spendflow images gc --mysql ... --hdfs ... --dry-run
    #[command(verbatim_doc_comment)]
    Images(ImagesArgs),
}

#[derive(Debug, Args)]
struct EngineArgs {
    /// Dataflow worker threads; users are divided among them.
    #[arg(short = 'w', long, default_value_t = 1)]
    workers: usize,

    /// Address of the gRPC query service (reflection is on: `grpcurl -plaintext ADDR list`).
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,

    /// Longest time between epochs while records arrive, in milliseconds: how stale the
    /// served results can be.
    #[arg(long, default_value_t = 50)]
    epoch_interval_ms: u64,
}

#[derive(Debug, Args)]
struct DemoArgs {
    #[command(flatten)]
    engine: EngineArgs,

    /// Simulated users.
    #[arg(long, default_value_t = 1000)]
    users: u64,

    /// Records per second (0: as fast as possible).
    #[arg(long, default_value_t = 2000)]
    rate: u64,

    /// Stop generating after this many records (the service keeps running).
    #[arg(long)]
    events: Option<u64>,

    /// Seed of the simulation: the same seed gives the same records.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Share of malformed records, to see rejection at work (0 to 1).
    #[arg(long, default_value_t = 0.01)]
    bad_rate: f64,

    /// Address of the live web report (overview and a page per user; port 0 picks one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    web: SocketAddr,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    engine: EngineArgs,

    /// Where records come from: `file:PATH` (JSON lines) or `kafka:HOST:PORT[,HOST:PORT]`.
    #[arg(long, value_name = "SOURCE")]
    input: String,

    /// Where results are stored besides the in-memory read model the gRPC service answers
    /// from: `memory` (nothing durable) or `cassandra` (tables per user, category, merchant,
    /// day, month; needs --cassandra).
    #[arg(long, value_enum, default_value_t = SinkArg::Memory)]
    sink: SinkArg,

    /// With --sink cassandra: contact points, HOST:PORT[,HOST:PORT].
    #[arg(long, value_name = "HOST:PORT", env = "SPENDFLOW_CASSANDRA")]
    cassandra: Option<String>,

    /// With --sink cassandra: the keyspace (created if missing, with one replica; see the
    /// README to choose the replication of a real cluster).
    #[arg(long, default_value = "spendflow")]
    keyspace: String,

    /// Write checkpoints of the state and input positions here; on start, the newest one is
    /// restored and reading resumes where it stood, instead of from the beginning. The
    /// directory is locked while the engine runs.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,

    /// Time between checkpoints while input arrives, e.g. 10s, 500ms, 2m: at most this much
    /// input is read again after a crash.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    checkpoint_interval: Duration,

    /// With --checkpoint-dir: when the directory holds checkpoint files and none of them can
    /// be read (damaged, or written by a version this binary does not know), move them into
    /// DIR/discarded-<unix seconds>/ (nothing is deleted) and start without a checkpoint,
    /// reading all input again from the beginning. Without this flag such a start is refused.
    /// Readable checkpoints are never discarded: the newest readable one is used.
    #[arg(long, requires = "checkpoint_dir")]
    discard_checkpoints: bool,

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

/// Where `run` stores results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SinkArg {
    /// Only the in-memory read model (lost on restart unless checkpoints are on).
    Memory,
    /// Cassandra tables, written per closed epoch, idempotently.
    Cassandra,
}

/// `10s`, `500ms`, `2m`, or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |i| text.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: use e.g. 10s, 500ms or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{text:?}: unknown unit {unit:?}; use ms, s or m")),
    }
}

/// Where `generate` puts records in Kafka.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LayoutArg {
    /// One topic per user, `<topic-prefix><user_id>`, one partition each.
    PerUser,
    /// One topic (`--topic`) with `--partitions` partitions, keyed by user id.
    Keyed,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// MySQL URL; the database (default `spendflow`) is created if missing and its schema
    /// migrated.
    #[arg(long, value_name = "URL", env = "SPENDFLOW_MYSQL")]
    mysql: String,

    /// Kafka bootstrap servers.
    #[arg(long, value_name = "HOST:PORT", env = "SPENDFLOW_KAFKA")]
    brokers: String,

    /// One topic per user, or one topic keyed by user id.
    #[arg(long, value_enum, default_value_t = LayoutArg::PerUser)]
    layout: LayoutArg,

    /// With --layout per-user: the topic name before the user id.
    #[arg(long, default_value = DEFAULT_TOPIC_PREFIX)]
    topic_prefix: String,

    /// With --layout keyed: the topic.
    #[arg(long, default_value = DEFAULT_TOPIC)]
    topic: String,

    /// With --layout keyed: partitions to create the topic with.
    #[arg(long, default_value_t = DEFAULT_PARTITIONS)]
    partitions: i32,

    /// Simulated users (ids 1..=N).
    #[arg(long, default_value_t = 1000)]
    users: u64,

    /// Stop when this many records exist in total (a restart continues towards it); without
    /// it, run until Ctrl-C.
    #[arg(long)]
    events: Option<u64>,

    /// Records per second (0: as fast as MySQL and Kafka take them).
    #[arg(long, default_value_t = 0)]
    rate: u64,

    /// Seed of the simulation: the same seed and settings give the same records.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Share of malformed records (Kafka only, never in MySQL), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    bad_rate: f64,

    /// Share of records correcting an earlier live expense, 0 to 1.
    #[arg(long, default_value_t = 0.05)]
    correction_rate: f64,

    /// Share of records deleting a live expense (chargebacks, voids), 0 to 1.
    #[arg(long, default_value_t = 0.02)]
    delete_rate: f64,

    /// Share of records re-sending an earlier record byte for byte, 0 to 1.
    #[arg(long, default_value_t = 0.02)]
    duplicate_rate: f64,

    /// Share of refunds (new expenses with a negative amount), 0 to 1.
    #[arg(long, default_value_t = 0.03)]
    refund_rate: f64,

    /// Share of new expenses with an event time up to ten days in the past, 0 to 1.
    #[arg(long, default_value_t = 0.05)]
    late_rate: f64,

    /// Records per MySQL transaction and Kafka flush.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    batch: usize,

    /// Also give every user a generated avatar (a PNG identicon, the same for a seed and user
    /// as in the demo), uploaded to HDFS (--hdfs) with its reference in MySQL. Users who have
    /// a picture keep it.
    #[arg(long)]
    avatars: bool,

    /// With --avatars: HDFS URL for the pictures, hdfs://host:port[/root] (root default
    /// /spendflow/images).
    #[arg(long, value_name = "URL", env = "SPENDFLOW_HDFS")]
    hdfs: Option<String>,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("served").args(["grpc", "cassandra"]))]
struct VerifyArgs {
    /// MySQL URL of the database `spendflow generate` wrote.
    #[arg(long, value_name = "URL", env = "SPENDFLOW_MYSQL")]
    mysql: String,

    /// Address of the engine's gRPC service (the default served side: 127.0.0.1:50051).
    #[arg(long, value_name = "ADDR")]
    grpc: Option<String>,

    /// Read the Cassandra sink's tables instead of asking the engine: contact points,
    /// HOST:PORT[,HOST:PORT].
    #[arg(long, value_name = "HOST:PORT")]
    cassandra: Option<String>,

    /// With --cassandra: the keyspace the sink writes.
    #[arg(long, default_value = "spendflow", requires = "cassandra")]
    keyspace: String,

    /// With --cassandra: how long the sink must have been quiet (no epoch in flight, nothing
    /// new committed) before comparing, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 2000,
        requires = "cassandra"
    )]
    quiet_ms: u64,

    /// Seconds to wait for the engine to report caught_up before comparing (0: do not wait).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    wait_caught_up: u64,

    /// Users per gRPC page (at most 1000).
    #[arg(long, default_value_t = 1000)]
    page_size: usize,

    /// Mismatches to print (all are counted).
    #[arg(long, default_value_t = 20)]
    show: usize,
}

/// Where `serve` answers from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ServeFrom {
    /// The tables an engine with --sink cassandra writes.
    Cassandra,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The store to answer from.
    #[arg(long, value_enum)]
    from: ServeFrom,

    /// Cassandra contact points, HOST:PORT[,HOST:PORT].
    #[arg(long, value_name = "HOST:PORT", env = "SPENDFLOW_CASSANDRA")]
    cassandra: String,

    /// The keyspace the sink writes.
    #[arg(long, default_value = "spendflow")]
    keyspace: String,

    /// Address of the gRPC service (reflection is on: `grpcurl -plaintext ADDR list`).
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,

    /// Also serve the web report on this address (the engine's overview and user pages,
    /// answered from the same tables as gRPC), e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "HOST:PORT")]
    web: Option<SocketAddr>,

    /// How often sink_progress is read (the newest committed epoch), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    poll_interval_ms: u64,

    /// How old the user index behind ListUserSummaries and TopSpenders (a scan of
    /// user_totals) may get before a request rebuilds it, once the sink has committed since,
    /// in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    index_refresh_ms: u64,

    /// How long the sink must have been quiet for Admin/GetStatus to report caught_up, in
    /// milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    quiet_ms: u64,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Demo(args) => demo(args),
        Command::Run(args) => run(args),
        Command::Generate(args) => generate(args),
        Command::Verify(args) => verify_command(args),
        Command::Serve(args) => serve(args),
        Command::Images(args) => images_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn engine_config(args: &EngineArgs, source: SourceConfig, web: Option<SocketAddr>) -> EngineConfig {
    EngineConfig {
        workers: args.workers,
        epoch_interval_ms: args.epoch_interval_ms,
        source: Some(source),
        grpc: Some(args.grpc),
        web,
        ..EngineConfig::default()
    }
}

fn demo(args: DemoArgs) -> Result<()> {
    let simulator = GeneratorConfig {
        seed: args.seed,
        users: args.users,
        bad_rate: args.bad_rate,
        ..GeneratorConfig::default()
    };
    let source = SourceConfig::Generator(GeneratorSourceConfig {
        simulator,
        rate: (args.rate > 0).then_some(args.rate),
        events: args.events,
    });
    let engine = Engine::builder()
        .config(engine_config(&args.engine, source, Some(args.web)))
        // Names, e-mails, cards and generated avatars for the simulated users, in memory.
        .personnel(Arc::new(Personnel::demo(args.users, args.seed)))
        .start()
        .context("could not start the demo")?;
    let addr = engine
        .grpc_addr()
        .context("the gRPC server did not start")?;
    let web = engine.web_addr().context("the web server did not start")?;
    println!("{}", demo_banner(addr, web, &args));
    watch(engine)
}

fn demo_banner(addr: SocketAddr, web: SocketAddr, args: &DemoArgs) -> String {
    let rate = if args.rate == 0 {
        "as fast as possible".to_string()
    } else {
        format!("{}/s", args.rate)
    };
    format!(
        "\
spendflow demo: {users} simulated users, {rate}, seed {seed}; gRPC on {addr}

Live web report: http://{web}/  (top spenders, categories, live feed; a page per user)

Try (grpcurl: `make tools` installs it into target/tools/bin):
  grpcurl -plaintext {addr} list
  grpcurl -plaintext {addr} describe spendflow.v1.ExpenseQuery
  grpcurl -plaintext -d '{{\"limit\": 5}}' {addr} spendflow.v1.ExpenseQuery/TopSpenders
  grpcurl -plaintext -d '{{\"user_id\": 1}}' {addr} spendflow.v1.ExpenseQuery/GetUserSummary
  grpcurl -plaintext -d '{{\"user_id\": 1, \"granularity\": \"GRANULARITY_MONTH\", \"from\": \"2026-01\", \"to\": \"2026-12\"}}' {addr} spendflow.v1.ExpenseQuery/GetUserWindows
  grpcurl -plaintext -d '{{\"user_ids\": [1]}}' {addr} spendflow.v1.ExpenseQuery/Subscribe
  grpcurl -plaintext {addr} spendflow.v1.Admin/GetStatus
  grpcurl -plaintext -d '{{\"limit\": 3}}' {addr} spendflow.v1.Admin/ListRejected

Ctrl-C stops.",
        users = args.users,
        seed = args.seed,
    )
}

fn run(args: RunArgs) -> Result<()> {
    let source = match args.input.split_once(':') {
        Some(("file", path)) if !path.is_empty() => SourceConfig::File(FileSourceConfig {
            path: PathBuf::from(path),
            follow: args.follow,
        }),
        Some(("kafka", brokers)) if !brokers.is_empty() => {
            let mut kafka = match (&args.topic_pattern, &args.topic) {
                (Some(pattern), None) => KafkaSourceConfig::pattern(brokers, pattern),
                (None, Some(topic)) => KafkaSourceConfig::topic(brokers, topic),
                _ => bail!("with --input kafka:..., give --topic-pattern REGEX or --topic NAME"),
            };
            kafka.discovery_interval_ms = args.discovery_interval_ms;
            kafka.user_topic_prefix = args.user_topic_prefix.clone();
            kafka.on_data_loss = match args.on_data_loss {
                OnDataLossArg::Fail => OnDataLoss::Fail,
                OnDataLossArg::Skip => OnDataLoss::Skip,
            };
            SourceConfig::Kafka(kafka)
        }
        _ => bail!(
            "--input must be file:PATH (a file of JSON lines) or kafka:HOST:PORT, got {:?}",
            args.input
        ),
    };
    let mut config = engine_config(&args.engine, source, args.web);
    config.dead_letter_topic = args.dead_letter_topic;
    if args.sink == SinkArg::Cassandra {
        let Some(contact_points) = args.cassandra else {
            bail!("--sink cassandra needs --cassandra HOST:PORT (or SPENDFLOW_CASSANDRA)");
        };
        config.sink = Some(SinkConfig::Cassandra(CassandraSinkConfig {
            keyspace: args.keyspace,
            ..CassandraSinkConfig::new(contact_points)
        }));
        if args.checkpoint_dir.is_none() {
            tracing::warn!(
                "--sink cassandra without --checkpoint-dir: a restart reads all input again and re-writes every row it touches."
            );
        }
    }
    if let Some(dir) = args.checkpoint_dir {
        config.checkpoint = Some(CheckpointConfig {
            dir,
            interval_ms: args.checkpoint_interval.as_millis() as u64,
            discard_unreadable: args.discard_checkpoints,
        });
    }
    let mut builder = Engine::builder().config(config);
    if let Some(personnel) = args.personnel.connect()? {
        builder = builder.personnel(personnel);
    }
    let engine = builder.start().context("could not start the engine")?;
    if let Some(addr) = engine.grpc_addr() {
        tracing::info!(%addr, "Serving gRPC; try `grpcurl -plaintext {addr} spendflow.v1.Admin/GetStatus`.");
    }
    if let Some(addr) = engine.web_addr() {
        tracing::info!(%addr, "Serving the live web report at http://{addr}/.");
    }
    watch(engine)
}

fn generate(args: GenerateArgs) -> Result<()> {
    let layout = match args.layout {
        LayoutArg::PerUser => Layout::PerUser {
            prefix: args.topic_prefix,
        },
        LayoutArg::Keyed => Layout::Keyed {
            topic: args.topic,
            partitions: args.partitions,
        },
    };
    let mut config = GenerateConfig::new(args.mysql, args.brokers);
    config.layout = layout;
    config.events = args.events;
    config.rate = (args.rate > 0).then_some(args.rate);
    config.batch = args.batch;
    config.simulator.seed = args.seed;
    config.simulator.users = args.users;
    config.simulator.bad_rate = args.bad_rate;
    config.simulator.correction_rate = args.correction_rate;
    config.simulator.delete_rate = args.delete_rate;
    config.simulator.duplicate_rate = args.duplicate_rate;
    config.simulator.refund_rate = args.refund_rate;
    config.simulator.late_rate = args.late_rate;
    let stop = stop_signal()?;
    let avatars = match args.avatars {
        true => Some(start_avatars(
            &config.mysql_url,
            args.hdfs.as_deref(),
            args.seed,
            args.users,
            Arc::clone(&stop),
        )?),
        false => None,
    };
    let mut progress = TerminalProgress::new();
    let result = spendflow_engine::generate::run(&config, &mut progress, &stop);
    if result.is_err() {
        // The avatar thread waits for users the failed run may never write.
        stop.store(true, Ordering::Relaxed);
    }
    let avatars = avatars.map(|thread| {
        thread
            .join()
            .unwrap_or_else(|_| Err("the avatar thread panicked".into()))
    });
    let summary = match result {
        Ok(summary) => summary,
        Err(e) if e.is_retriable() => {
            return Err(anyhow::Error::new(e).context(
                "spendflow generate stopped; run the same command again to continue (what \
                 Kafka has not acknowledged stays in the MySQL outbox and is re-published first)",
            ));
        }
        Err(e) => return Err(anyhow::Error::new(e).context("spendflow generate failed")),
    };
    if summary.stopped {
        tracing::info!(
            records = summary.records,
            "Stopped; run the same command again to continue."
        );
    }
    let input = match &summary.layout {
        Layout::PerUser { .. } => format!("--topic-pattern '{}'", summary.layout.topic_pattern()),
        Layout::Keyed { topic, .. } => format!("--topic {topic}"),
    };
    println!(
        "  read it: spendflow run --input kafka:{} {input}",
        config.brokers
    );
    if let Some(Err(e)) = avatars {
        bail!("the records are written, but attaching avatars failed: {e}");
    }
    Ok(())
}

fn verify_command(args: VerifyArgs) -> Result<()> {
    let mut truth = MySqlTruth::connect(&args.mysql).context("could not read MySQL")?;
    let mut served: Box<dyn verify::Served> = match &args.cassandra {
        Some(contact_points) => Box::new(
            CassandraServed::connect(contact_points, &args.keyspace)
                .context("could not read Cassandra")?
                .with_quiet(Duration::from_millis(args.quiet_ms)),
        ),
        None => Box::new(
            GrpcServed::connect(args.grpc.as_deref().unwrap_or("127.0.0.1:50051"))
                .context("could not reach the engine")?,
        ),
    };
    let options = VerifyOptions {
        page_size: args.page_size,
        max_reported: args.show,
        wait_ready: Duration::from_secs(args.wait_caught_up),
    };
    let report = verify::verify(&mut truth, served.as_mut(), &options).context("verify failed")?;
    println!("{report}");
    if !report.is_ok() {
        bail!(
            "{} mismatches in {} of {} users",
            report.mismatch_count,
            report.mismatched_users,
            report.users_checked
        );
    }
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    let ServeFrom::Cassandra = args.from;
    let config = CassandraServeConfig {
        contact_points: args.cassandra,
        keyspace: args.keyspace,
        grpc: args.grpc,
        web: args.web,
        poll_interval_ms: args.poll_interval_ms,
        index_refresh_ms: args.index_refresh_ms,
        quiet_ms: args.quiet_ms,
    };
    let server =
        CassandraServer::start(config).context("could not start serving from Cassandra")?;
    let addr = server.addr();
    tracing::info!(%addr, "Serving; try `grpcurl -plaintext {addr} spendflow.v1.Admin/GetStatus`.");
    if let Some(web) = server.web_addr() {
        println!("Web report: http://{web}/");
    }
    let stop = stop_signal()?;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("Shutting down.");
    server
        .shutdown()
        .context("the server did not shut down cleanly")?;
    Ok(())
}

/// Shows progress until Ctrl-C (or SIGTERM), then shuts the engine down.
fn watch(engine: Engine) -> Result<()> {
    let stop = stop_signal()?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let interactive = !bar.is_hidden();
    let mut last = (Instant::now(), 0u64);
    let mut last_line = Instant::now();
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(250));
        if let Some(failure) = engine.failure() {
            bar.finish_and_clear();
            let _ = engine.shutdown();
            bail!("the engine stopped: {failure}");
        }
        let status = engine.status();
        let now = Instant::now();
        let rate = (status.records_read - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        if now.duration_since(last.0) >= Duration::from_secs(1) {
            last = (now, status.records_read);
            let line = progress_line(&status, rate);
            if interactive {
                bar.set_message(line);
                bar.tick();
            } else if now.duration_since(last_line) >= Duration::from_secs(10) {
                last_line = now;
                tracing::info!("{line}");
            }
        }
    }
    bar.finish_and_clear();
    let status = engine.status();
    tracing::info!(
        records_read = status.records_read,
        rejected = status.records_rejected,
        epoch = status.as_of.epoch,
        "Shutting down."
    );
    engine
        .shutdown()
        .context("the engine did not shut down cleanly")?;
    Ok(())
}

fn progress_line(status: &Status, rate: f64) -> String {
    format!(
        "{:>9.0} events/s | {} read | {} users | {} live expenses | {} rejected | epoch {}{}",
        rate,
        status.records_read,
        status.users,
        status.live_expenses,
        status.records_rejected,
        status.as_of.epoch,
        if status.caught_up { " | caught up" } else { "" }
    )
}

/// A flag set by Ctrl-C or SIGTERM.
fn stop_signal() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the signal handler")?;
    std::thread::Builder::new()
        .name("spendflow-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                #[cfg(unix)]
                {
                    use tokio::signal::unix::{SignalKind, signal};
                    match signal(SignalKind::terminate()) {
                        Ok(mut term) => {
                            tokio::select! {
                                _ = tokio::signal::ctrl_c() => {}
                                _ = term.recv() => {}
                            }
                        }
                        Err(_) => {
                            let _ = tokio::signal::ctrl_c().await;
                        }
                    }
                }
                #[cfg(not(unix))]
                {
                    let _ = tokio::signal::ctrl_c().await;
                }
            });
            flag.store(true, Ordering::Release);
        })?;
    Ok(stop)
}
