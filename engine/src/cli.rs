//! The command line: parses arguments, builds an engine configuration, and runs it until Ctrl-C.
//! Everything it does goes through the library's public API, like any embedding program.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use spendflow_engine::config::{SecurityConfig, SinkConfig};
use spendflow_engine::generate::config::{
    DEFAULT_BATCH, DEFAULT_PARTITIONS, DEFAULT_TOPIC, DEFAULT_TOPIC_PREFIX,
};
use spendflow_engine::generate::{GenerateConfig, Layout, TerminalProgress};
use spendflow_engine::personnel::Personnel;
use spendflow_engine::serve::cassandra::{CassandraServeConfig, CassandraServer};
use spendflow_engine::source::generator::{GeneratorConfig, GeneratorSourceConfig};
use spendflow_engine::verify::cassandra::CassandraServed;
use spendflow_engine::verify::grpc::GrpcServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, VerifyOptions};
use spendflow_engine::{Engine, EngineConfig, SourceConfig, Status};

use crate::cli_images::{ImagesArgs, connect_personnel, images_command, start_avatars};
use crate::cli_run::{CONFIG_HELP, RunArgs, RunFile, RunSettings, given};

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
    ///   spendflow run --config spendflow.toml
    #[command(verbatim_doc_comment, after_long_help = CONFIG_HELP)]
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
    /// Mint a development token (HS256) for servers started with --jwt-secret-file.
    ///
    /// Example:
    ///   spendflow token --jwt-secret-file secret --sub 42 \
    ///       --scope "expenses:read:self personnel:read" --ttl 1h
    ///   grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"user_id": 42}' \
    ///       127.0.0.1:50051 spendflow.v1.ExpenseQuery/GetUserSummary
    #[command(verbatim_doc_comment)]
    Token(crate::cli_token::TokenArgs),
}

/// The engine flags of `demo` and `run`.
#[derive(Debug, Args)]
pub(crate) struct EngineArgs {
    /// Dataflow worker threads; users are divided among them.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub(crate) workers: usize,

    /// Address of the gRPC query service (reflection is on: `grpcurl -plaintext ADDR list`).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub(crate) grpc: SocketAddr,

    /// Longest time between epochs while records arrive, in milliseconds: how stale the
    /// served results can be.
    #[arg(long, default_value_t = 50)]
    pub(crate) epoch_interval_ms: u64,

    #[command(flatten)]
    pub(crate) security: crate::cli_security::SecurityArgs,
}

/// The simulator flags of `demo` and `generate`: what the simulated stream holds.
#[derive(Debug, Args)]
struct SimulatorArgs {
    /// Simulated users (ids 1..=N).
    #[arg(long, default_value_t = 1000)]
    users: u64,

    /// Seed of the simulation: the same seed and settings give the same records.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Share of malformed records, 0 to 1 (`generate` writes them to Kafka only, never to
    /// MySQL).
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
}

impl From<&SimulatorArgs> for GeneratorConfig {
    fn from(args: &SimulatorArgs) -> Self {
        GeneratorConfig {
            seed: args.seed,
            users: args.users,
            bad_rate: args.bad_rate,
            correction_rate: args.correction_rate,
            delete_rate: args.delete_rate,
            duplicate_rate: args.duplicate_rate,
            refund_rate: args.refund_rate,
            late_rate: args.late_rate,
            ..GeneratorConfig::default()
        }
    }
}

// The demo shows rejection at work: 1% malformed records unless told otherwise.
#[derive(Debug, Args)]
#[command(mut_arg("bad_rate", |arg| arg.default_value("0.01")))]
struct DemoArgs {
    #[command(flatten)]
    engine: EngineArgs,

    #[command(flatten)]
    simulator: SimulatorArgs,

    /// Records per second (0: as fast as possible).
    #[arg(long, default_value_t = 2000)]
    rate: u64,

    /// Stop generating after this many records (the service keeps running).
    #[arg(long)]
    events: Option<u64>,

    /// Address of the live web report (overview and a page per user; port 0 picks one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    web: SocketAddr,

    /// Convert every user's total to this currency with the simulator's exchange rates, and
    /// rank top spenders by it; `none` keeps each user's own currency.
    #[arg(long, value_name = "CODE", default_value = "EUR")]
    reporting_currency: String,
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

    #[command(flatten)]
    simulator: SimulatorArgs,

    /// Stop when this many records exist in total (a restart continues towards it); without
    /// it, run until Ctrl-C.
    #[arg(long)]
    events: Option<u64>,

    /// Records per second (0: as fast as MySQL and Kafka take them).
    #[arg(long, default_value_t = 0)]
    rate: u64,

    /// Records per MySQL transaction and Kafka flush.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    batch: usize,

    /// Budget changes per 1,000 generated records (0 to 1000; fractions accumulate, e.g. 0.5 is
    /// one change per 2,000 records): UPDATE users SET monthly_budget_minor of a random user to
    /// 50-150% of its base budget, committed with the records' batch.
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    budget_change_rate: f64,

    /// Exchange-rate changes per 1,000 generated records (0 to 1000): a random non-EUR rate in
    /// fx_rates set within +-2% of its base rate, committed with the records' batch.
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    fx_change_rate: f64,

    /// Also give every user a generated avatar (a PNG identicon, the same for a seed and user
    /// as in the demo), uploaded to HDFS (--hdfs) with its reference in MySQL. Users who have
    /// a picture keep it.
    #[arg(long)]
    avatars: bool,

    /// With --avatars: HDFS URL for the pictures, hdfs://host:port[/root] (root default
    /// /spendflow/images).
    #[arg(long, value_name = "URL", env = "SPENDFLOW_HDFS")]
    hdfs: Option<String>,

    #[command(flatten)]
    kafka_client: crate::cli_run::KafkaClientArgs,
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

    #[command(flatten)]
    cassandra_client: crate::cli_run::CassandraClientArgs,

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

    #[command(flatten)]
    cassandra_client: crate::cli_run::CassandraClientArgs,

    #[command(flatten)]
    security: crate::cli_security::SecurityArgs,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        // `run` reads its config file first: the file may set the log filter.
        Command::Run(args) => run_settings(args, &matches, &cli.log).and_then(|settings| {
            init_logging(&settings.log);
            run(settings)
        }),
        Command::Demo(args) => logged(&cli.log, || demo(args)),
        Command::Generate(args) => logged(&cli.log, || generate(args)),
        Command::Verify(args) => logged(&cli.log, || verify_command(args)),
        Command::Serve(args) => logged(&cli.log, || serve(args)),
        Command::Images(args) => logged(&cli.log, || images_command(args)),
        Command::Token(args) => crate::cli_token::token(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `command` with logging set up.
fn logged(filter: &str, command: impl FnOnce() -> Result<()>) -> Result<()> {
    init_logging(filter);
    command()
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: log files, pipes and CI logs get plain text
    // (and NO_COLOR, https://no-color.org, turns it off everywhere).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn engine_config(
    args: &EngineArgs,
    source: SourceConfig,
    web: Option<SocketAddr>,
) -> Result<EngineConfig> {
    Ok(EngineConfig {
        workers: args.workers,
        epoch_interval_ms: args.epoch_interval_ms,
        source: Some(source),
        grpc: Some(args.grpc),
        web,
        security: args.security.config()?,
        metrics: args.security.metrics,
        ..EngineConfig::default()
    })
}

fn demo(args: DemoArgs) -> Result<()> {
    let runtime = io_runtime()?;
    // Before anything starts: a SIGTERM from then on always stops the demo cleanly.
    let stop = stop_signal(runtime.handle())?;
    let simulator = GeneratorConfig::from(&args.simulator);
    let converts = !args.reporting_currency.eq_ignore_ascii_case("none");
    let mut generator = GeneratorSourceConfig {
        simulator,
        rate: (args.rate > 0).then_some(args.rate),
        events: args.events,
        ..GeneratorSourceConfig::default()
    };
    if converts {
        // The simulator's rates are quoted in the reporting currency.
        generator.fx_base = args.reporting_currency.to_ascii_uppercase();
    }
    let source = SourceConfig::Generator(generator);
    let mut config = engine_config(&args.engine, source, Some(args.web))?;
    if converts {
        config.reporting_currency = Some(args.reporting_currency.to_ascii_uppercase());
    }
    let engine = Engine::builder()
        .config(config)
        .runtime(runtime.handle().clone())
        // Names, e-mails, cards and generated avatars for the simulated users, in memory.
        .personnel(Arc::new(Personnel::demo(
            args.simulator.users,
            args.simulator.seed,
        )))
        .start()
        .context("could not start the demo")?;
    let addr = engine
        .grpc_addr()
        .context("the gRPC server did not start")?;
    let web = engine.web_addr().context("the web server did not start")?;
    say(demo_banner(addr, web, &args));
    if let Some(metrics) = engine.metrics_addr() {
        say(format!("Prometheus metrics: http://{metrics}/metrics"));
    }
    if let Some(note) = crate::cli_token::auth_note(&args.engine.security, web) {
        say(note);
    }
    watch(engine, &stop)
}

fn demo_banner(addr: SocketAddr, web: SocketAddr, args: &DemoArgs) -> String {
    let security = args.engine.security.config().unwrap_or_default();
    let (scheme, g) = (scheme(&security), grpcurl_flags(&security));
    let rate = if args.rate == 0 {
        "as fast as possible".to_string()
    } else {
        format!("{}/s", args.rate)
    };
    format!(
        "\
spendflow demo: {users} simulated users, {rate}, seed {seed}; gRPC on {addr}

Live web report: {scheme}://{web}/  (top spenders, categories, live feed; a page per user)

Try (grpcurl: `make tools` installs it into target/tools/bin):
  grpcurl {g} {addr} list
  grpcurl {g} {addr} describe spendflow.v1.ExpenseQuery
  grpcurl {g} -d '{{\"limit\": 5}}' {addr} spendflow.v1.ExpenseQuery/TopSpenders
  grpcurl {g} -d '{{\"user_id\": 1}}' {addr} spendflow.v1.ExpenseQuery/GetUserSummary
  grpcurl {g} -d '{{\"user_id\": 1, \"granularity\": \"GRANULARITY_MONTH\", \"from\": \"2026-01\", \"to\": \"2026-12\"}}' {addr} spendflow.v1.ExpenseQuery/GetUserWindows
  grpcurl {g} -d '{{\"user_ids\": [1]}}' {addr} spendflow.v1.ExpenseQuery/Subscribe
  grpcurl {g} {addr} spendflow.v1.Admin/GetStatus
  grpcurl {g} -d '{{\"limit\": 3}}' {addr} spendflow.v1.Admin/ListRejected

Budget alerts: every simulated user has a monthly budget, and about 10 users a second revise
theirs, so alerts (80 % and 100 % of the budget, per UTC month) fire and clear as you watch.
The overview lists the users over budget now; a user's page has the budget meter and alerts.
  grpcurl {g} -d '{{\"page_size\": 5}}' {addr} spendflow.v1.Alerts/ListAlerts
  grpcurl {g} {addr} spendflow.v1.Alerts/Subscribe
  {ranking}; the overview shows who is over budget.

Ctrl-C stops.",
        users = args.simulator.users,
        seed = args.simulator.seed,
        ranking = if args.reporting_currency.eq_ignore_ascii_case("none") {
            "Top spenders are ranked by raw minor units (--reporting-currency EUR converts)".to_string()
        } else {
            format!(
                "Top spenders are ranked in {} (converted_minor)",
                args.reporting_currency
            )
        },
    )
}

/// `https` when the servers speak TLS, else `http`.
fn scheme(security: &SecurityConfig) -> &'static str {
    if security.tls.is_some() {
        "https"
    } else {
        "http"
    }
}

/// How grpcurl reaches the gRPC server: `-plaintext`, or the CA (and client certificate).
fn grpcurl_flags(security: &SecurityConfig) -> String {
    match &security.tls {
        None => "-plaintext".into(),
        Some(tls) if tls.client_ca.is_some() => {
            "-cacert CA.pem -cert client.pem -key client-key.pem".into()
        }
        Some(_) => "-cacert CA.pem".into(),
    }
}

/// The settings of `run`: its config file, if any, with the flags given over it.
fn run_settings(args: RunArgs, matches: &clap::ArgMatches, log: &str) -> Result<RunSettings> {
    let file = args.config_file().map(RunFile::read).transpose()?;
    let run_matches = matches
        .subcommand_matches("run")
        .context("the run subcommand's arguments")?;
    args.settings(run_matches, file, log, given(matches, "log"))
}

fn run(settings: RunSettings) -> Result<()> {
    if !settings.ignored_flags.is_empty() {
        tracing::warn!(
            flags = %settings.ignored_flags.join(" "),
            "These flags do not apply to this input and are ignored."
        );
    }
    let config = settings.engine;
    let security = config.security.clone();
    if matches!(config.sink, Some(SinkConfig::Cassandra(_))) && config.checkpoint.is_none() {
        tracing::warn!(
            "--sink cassandra without --checkpoint-dir: a restart reads all input again and re-writes every row it touches."
        );
    }
    let runtime = io_runtime()?;
    let stop = stop_signal(runtime.handle())?;
    let mut builder = Engine::builder()
        .config(config)
        .runtime(runtime.handle().clone());
    if let Some(personnel) = &settings.personnel {
        builder = builder.personnel(connect_personnel(personnel)?);
    }
    let engine = builder.start().context("could not start the engine")?;
    let (scheme, g) = (scheme(&security), grpcurl_flags(&security));
    if let Some(addr) = engine.grpc_addr() {
        tracing::info!(%addr, "Serving gRPC; try `grpcurl {g} {addr} spendflow.v1.Admin/GetStatus`.");
    }
    if let Some(addr) = engine.web_addr() {
        tracing::info!(%addr, "Serving the live web report at {scheme}://{addr}/.");
    }
    if let Some(addr) = engine.metrics_addr() {
        tracing::info!(%addr, "Serving Prometheus metrics at http://{addr}/metrics.");
    }
    watch(engine, &stop)
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
    config.budget_change_rate = args.budget_change_rate;
    config.fx_change_rate = args.fx_change_rate;
    config.simulator = GeneratorConfig::from(&args.simulator);
    args.kafka_client.add_to(&mut config.kafka_options)?;
    let runtime = io_runtime()?;
    let stop = stop_signal(runtime.handle())?;
    let avatars = match args.avatars {
        true => Some(start_avatars(
            &config.mysql_url,
            args.hdfs.as_deref(),
            args.simulator.seed,
            args.simulator.users,
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
            .unwrap_or_else(|_| Err(anyhow!("the avatar thread panicked")))
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
        bail!("the records are written, but attaching avatars failed: {e:#}");
    }
    Ok(())
}

fn verify_command(args: VerifyArgs) -> Result<()> {
    let mut truth = MySqlTruth::connect(&args.mysql).context("could not read MySQL")?;
    let mut served: Box<dyn verify::Served> = match &args.cassandra {
        Some(contact_points) => Box::new(
            CassandraServed::connect_with(
                contact_points,
                &args.keyspace,
                &args.cassandra_client.security(),
            )
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
        security: args.security.config()?,
        metrics: None,
        client_security: args.cassandra_client.security(),
    };
    let security = config.security.clone();
    let runtime = io_runtime()?;
    let stop = stop_signal(runtime.handle())?;
    // --- metrics ---: the recorder before the first call; `--metrics` served until exit.
    spendflow_engine::metrics::exporter::handle();
    let metrics = args
        .security
        .metrics
        .map(|addr| {
            spendflow_engine::metrics::exporter::spawn(
                runtime.handle(),
                addr,
                std::future::pending(),
            )
        })
        .transpose()
        .context("could not serve --metrics")?;
    let server = CassandraServer::start_on(runtime.handle(), config)
        .context("could not start serving from Cassandra")?;
    if let Some(addr) = metrics {
        tracing::info!(%addr, "Serving Prometheus metrics at http://{addr}/metrics.");
    }
    let addr = server.addr();
    let (scheme, g) = (scheme(&security), grpcurl_flags(&security));
    tracing::info!(%addr, "Serving; try `grpcurl {g} {addr} spendflow.v1.Admin/GetStatus`.");
    if let Some(web) = server.web_addr() {
        say(format!("Web report: {scheme}://{web}/"));
    }
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
fn watch(engine: Engine, stop: &AtomicBool) -> Result<()> {
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

/// Prints a line for the person who started a long-running command (the demo's banner, the
/// address served). A reader that went away (`spendflow demo | head -3`, a test that read the
/// address and closed the pipe) must not stop the engine: `println!` would panic on the broken
/// pipe, so a failed write is ignored here.
fn say(text: impl std::fmt::Display) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
}

/// The binary's one async runtime: the engine's servers and sink (or `serve --from
/// cassandra`), and the signal handlers, all run on it.
fn io_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("spendflow-io")
        .enable_all()
        .build()
        .context("could not start the async runtime")
}

/// A flag set by Ctrl-C or SIGTERM, listened for on `runtime`.
///
/// The handlers are registered before this returns (not later, on a task): a SIGTERM that
/// arrives once the engine runs always stops it cleanly, never with the default action
/// (killed, exit status 143).
fn stop_signal(runtime: &tokio::runtime::Handle) -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let _context = runtime.enter();
    #[cfg(unix)]
    let (mut interrupt, mut terminate) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()).context("could not handle Ctrl-C")?,
            signal(SignalKind::terminate()).context("could not handle SIGTERM")?,
        )
    };
    runtime.spawn(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        flag.store(true, Ordering::Release);
    });
    Ok(stop)
}

/// `spendflow run ARGS` parsed as [`main`] parses it: the arguments, the subcommand's matches,
/// `--log` and whether it was given.
#[cfg(test)]
pub(crate) fn parse_run(
    args: &[&str],
) -> Result<(RunArgs, clap::ArgMatches, String, bool), clap::Error> {
    let matches = Cli::command().try_get_matches_from(["spendflow", "run"].iter().chain(args))?;
    let Command::Run(run) = Cli::from_arg_matches(&matches)?.command else {
        unreachable!("parsed as run")
    };
    let run_matches = matches.subcommand_matches("run").cloned();
    let log = matches
        .get_one::<String>("log")
        .cloned()
        .unwrap_or_default();
    Ok((
        run,
        run_matches.unwrap_or_default(),
        log,
        given(&matches, "log"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(["spendflow"].iter().chain(args))
            .unwrap()
            .command
    }

    #[test]
    fn demo_and_generate_share_the_simulator_flags() {
        let Command::Generate(generate) = parse(&["generate", "--mysql", "m", "--brokers", "b"])
        else {
            unreachable!()
        };
        let Command::Demo(demo) = parse(&["demo"]) else {
            unreachable!()
        };
        // The defaults are the simulator's, but the seed (42) and the demo's malformed records.
        let expected = GeneratorConfig {
            seed: 42,
            ..GeneratorConfig::default()
        };
        assert_eq!(GeneratorConfig::from(&generate.simulator), expected);
        assert_eq!(
            GeneratorConfig::from(&demo.simulator),
            GeneratorConfig {
                bad_rate: 0.01,
                ..expected
            }
        );

        let Command::Demo(demo) = parse(&[
            "demo",
            "--users",
            "7",
            "--seed",
            "9",
            "--bad-rate",
            "0",
            "--refund-rate",
            "0.5",
        ]) else {
            unreachable!()
        };
        let simulator = GeneratorConfig::from(&demo.simulator);
        assert_eq!(
            (
                simulator.users,
                simulator.seed,
                simulator.bad_rate,
                simulator.refund_rate
            ),
            (7, 9, 0.0, 0.5)
        );
    }
}
