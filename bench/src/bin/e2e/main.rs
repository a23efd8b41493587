//! `e2e`: spendflow's end-to-end benchmark against the services kit, with the Spark Structured
//! Streaming baseline measured by the same harness, on the same topics, on the same machine.
//!
//! ```text
//! make bench-e2e                                  # the full run; writes bench/RESULTS.md
//! cargo run --release -p spendflow-bench --bin e2e -- --quick     # a small run (target/bench)
//! cargo run --release -p spendflow-bench --bin e2e -- --help
//! ```
//!
//! Why it is built this way:
//!
//! * **Black box.** The engine is the real `spendflow run` binary in its own process, fed by
//!   the real Kafka of the services kit and observed only through its public gRPC API, as a
//!   user would run it; its peak RSS (`VmHWM`) is its own. Spark is the same: a child process
//!   reading the same topic, observed through what its sink prints.
//! * **Same input for everyone.** The records are the engine's seeded simulator stream
//!   (corrections, deletes, duplicates, refunds and late events in the default shares), loaded
//!   once per layout into fresh topics; every measurement of that layout reads those topics:
//!   the raw librdkafka ceiling, spendflow, Spark. The HashMap ceiling folds the same bytes.
//! * **Catch-up** = N records already in Kafka, a fresh process, time until the served state
//!   covers them (`GetStatus`: `caught_up` and `records_read >= N`), process start-up included.
//!   For Spark, time from the query's start (after the JVM and the SparkSession are up) until a
//!   micro-batch covering N records has reached the sink; its start-up is reported apart.
//! * **Freshness** = at a steady background rate (20 K events/s by default), a marker expense
//!   for a user of its own every 50 ms; for each marker, the time from handing it to the Kafka
//!   producer until the system shows it: a `Subscribe` change for spendflow (the same snapshot
//!   `GetUserSummary` reads), the `foreachBatch` sink for Spark. p50 and p99 per window.
//! * **Each figure is min/median/max over `--runs` runs.** Catch-up runs each use a fresh
//!   process; freshness windows run back to back on one caught-up process per system.
//! * **Robust to re-runs and Ctrl-C.** Topic names carry a fresh run id, every child runs in a
//!   process group of its own and is stopped with it, and the run's topics are deleted at the
//!   end, also after an error or Ctrl-C.

mod cassandra;
mod cluster;
mod engine;
mod fold;
mod kafka;
mod kstreams;
mod report;
mod spark;
mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use spendflow_engine::generate::Layout;
use spendflow_engine::source::generator::{GeneratorConfig, Simulator};

use crate::cassandra::Availability;
use crate::engine::EngineProcess;
use crate::kafka::{Marker, Markers, SteadyPlan};
use crate::kstreams::{KStreamsInstall, KStreamsRun};
use crate::report::{Freshness, LayoutResult, Profile, Report, ScalePoint};
use crate::spark::{SparkInstall, SparkProcess};
use crate::util::{check_stop, percentile, wall_ms};

/// spendflow's end-to-end benchmark: catch-up throughput, freshness and memory against the
/// services kit's Kafka, with the Spark Structured Streaming baseline, the raw librdkafka
/// consume ceiling and a single-threaded HashMap fold, written to bench/RESULTS.md.
///
/// Needs Kafka running (`docker/native/services up kafka cassandra`) and the release binary
/// (`cargo build --release -p spendflow-engine`); `make bench-e2e` does both. The Spark
/// baseline installs itself into target/bench/spark on first use (pyspark from PyPI, the Kafka
/// connector from Maven Central: a few minutes, about 1 GB).
#[derive(Debug, Parser)]
#[command(name = "e2e", max_term_width = 100)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "SPENDFLOW_KAFKA", default_value = "127.0.0.1:9092")]
    brokers: String,

    /// Cassandra CQL address, for the Cassandra sink's figures (when the engine has the sink).
    #[arg(long, env = "SPENDFLOW_CASSANDRA", default_value = "127.0.0.1:9042")]
    cassandra: String,

    /// Run the engine without the Cassandra sink even if it has one.
    #[arg(long)]
    no_cassandra: bool,

    /// Records loaded into Kafka per layout (the catch-up input). Default 2,000,000 (--quick:
    /// 50,000).
    #[arg(long)]
    events: Option<u64>,

    /// Simulated users in the keyed layout. Default 10,000 (--quick: 1,000).
    #[arg(long)]
    users: Option<u64>,

    /// Simulated users in the per-user layout, one topic each. Default 200 (--quick: 50).
    #[arg(long)]
    per_user_users: Option<u64>,

    /// Partitions of the keyed topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,

    /// Layouts to measure, in this order; the first one gives the headline ratios.
    #[arg(long, value_delimiter = ',', default_value = "keyed,per-user")]
    layouts: Vec<LayoutName>,

    /// Engine worker threads (`spendflow run -w`), and raw consumer threads.
    #[arg(short = 'w', long, default_value_t = 2)]
    workers: usize,

    /// Runs per figure (min/median/max are over these). Default 3 (--quick: 1).
    #[arg(long)]
    runs: Option<usize>,

    /// Background records per second during the freshness windows.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,

    /// Length of one freshness window, in seconds. Default 10 (--quick: 3).
    #[arg(long)]
    window_secs: Option<u64>,

    /// Freshness markers per second.
    #[arg(long, default_value_t = 20)]
    markers_per_sec: u64,

    /// Do not run the Spark baseline (its figures and ratio become n/a).
    #[arg(long)]
    skip_spark: bool,

    /// Do not build or run the Kafka Streams baseline (its figures and ratios become n/a).
    #[arg(long, alias = "skip-kstreams")]
    no_kstreams: bool,

    /// Do not measure the scaling table (catch-up and peak RSS by users and by records).
    #[arg(long, alias = "skip-scaling")]
    no_scaling: bool,

    /// Do not measure cluster mode (1, 2 and 3 processes of one worker on this host).
    #[arg(long)]
    no_cluster: bool,

    /// Only measure cluster mode (1, 2 and 3 processes of one worker on this host, issue 15)
    /// and put its section into the results file in place of the earlier one, leaving the
    /// rest of the file as it is.
    #[arg(long, conflicts_with = "no_cluster")]
    cluster_only: bool,

    /// Records in the cluster-mode input (one keyed topic, 6 partitions, --users users).
    /// Default 1,000,000 (--quick: 50,000).
    #[arg(long)]
    cluster_events: Option<u64>,

    /// Do not run the in-memory dataflow figure (criterion's `dataflow/epoch_100k/w1` workload).
    #[arg(long)]
    no_in_memory: bool,

    /// One extra catch-up run of the engine under `perf record -g`; the top threads and
    /// symbols go into the results.
    #[arg(long)]
    profile: bool,

    /// Small and quick: 50,000 events, 1 run, 3 s windows; writes target/bench/RESULTS-quick.md
    /// unless --output is given.
    #[arg(long)]
    quick: bool,

    /// Seed of the simulated stream.
    #[arg(long, default_value_t = spendflow_bench::SEED)]
    seed: u64,

    /// The spendflow binary. Default: `spendflow` next to this program (target/release).
    #[arg(long)]
    spendflow: Option<PathBuf>,

    /// Extra argument for `spendflow run` (repeatable), e.g. --engine-arg=--epoch-interval-ms=20.
    #[arg(long, allow_hyphen_values = true)]
    engine_arg: Vec<String>,

    /// Keep the run's work directory (the engines' logs) instead of deleting it at the end.
    #[arg(long)]
    keep_logs: bool,

    /// Where to write the results. Default bench/RESULTS.md (--quick:
    /// target/bench/RESULTS-quick.md).
    #[arg(long)]
    output: Option<PathBuf>,

    /// Longest wait for one catch-up, in seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LayoutName {
    /// One topic, `--partitions` partitions, keyed by user id.
    Keyed,
    /// One single-partition topic per user.
    PerUser,
}

/// The settings after `--quick` and the defaults are applied.
#[derive(Clone, Debug)]
pub struct Settings {
    pub brokers: String,
    pub events: u64,
    pub users: u64,
    pub per_user_users: u64,
    pub partitions: i32,
    pub workers: usize,
    pub runs: usize,
    pub rate: u64,
    pub window: Duration,
    pub markers_per_sec: u64,
    pub seed: u64,
    pub quick: bool,
    pub command_line: String,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = real_main(args) {
        eprintln!("[e2e] error: {e:#}");
        std::process::exit(1);
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[e2e] {}", msg.as_ref());
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the repository")
        .to_path_buf()
}

fn real_main(args: Args) -> Result<()> {
    util::install_stop_handler()?;
    let repo = repo_root();
    let quick = args.quick;
    let settings = Settings {
        brokers: args.brokers.clone(),
        events: args
            .events
            .unwrap_or(if quick { 50_000 } else { 2_000_000 }),
        users: args.users.unwrap_or(if quick { 1_000 } else { 10_000 }),
        per_user_users: args.per_user_users.unwrap_or(if quick { 50 } else { 200 }),
        partitions: args.partitions,
        workers: args.workers.max(1),
        runs: args.runs.unwrap_or(if quick { 1 } else { 3 }).max(1),
        rate: args.rate,
        window: Duration::from_secs(args.window_secs.unwrap_or(if quick { 3 } else { 10 })),
        markers_per_sec: args.markers_per_sec.max(1),
        seed: args.seed,
        quick,
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let output = args.output.clone().unwrap_or_else(|| {
        if quick {
            repo.join("target/bench/RESULTS-quick.md")
        } else {
            repo.join("bench/RESULTS.md")
        }
    });
    let spendflow = match &args.spendflow {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this program")?
            .join("spendflow"),
    };
    if !spendflow.is_file() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p spendflow-engine` (or \
             use `make bench-e2e`), or pass --spendflow PATH",
            spendflow.display()
        );
    }

    let cluster_events = args
        .cluster_events
        .unwrap_or(if quick { 50_000 } else { 1_000_000 });

    let run_id = format!(
        "{:08x}",
        (wall_ms() as u64 ^ u64::from(std::process::id())) as u32
    );
    let prefix = format!("sfbench.{run_id}.");
    let work = repo.join("target/bench/tmp").join(&run_id);
    std::fs::create_dir_all(&work)?;
    say(format!(
        "run {run_id}: {} events per layout, {} run(s), workers {}, work dir {}",
        settings.events,
        settings.runs,
        settings.workers,
        work.display()
    ));
    // Whatever happens from here on, the run's topics are deleted at the end.
    let _topics = TopicsGuard {
        brokers: settings.brokers.clone(),
        prefix: prefix.clone(),
    };
    kafka::topics_with_prefix(&settings.brokers, "sfbench.").with_context(|| {
        format!(
            "Kafka is not reachable at {}: start it with `docker/native/services up kafka`",
            settings.brokers
        )
    })?;

    if args.cluster_only {
        let load = util::load_average().unwrap_or_default();
        let points = cluster::measure(
            &settings,
            &prefix,
            &work,
            &spendflow,
            &args.engine_arg,
            cluster_events,
            Duration::from_secs(args.timeout_secs),
        )?;
        let load = format!(
            "{load} at the start, {} at the end",
            util::load_average().unwrap_or_default()
        );
        let section = cluster::render(&points, &settings, cluster_events, &load);
        cluster::splice(&output, &section)?;
        say(format!(
            "wrote the cluster-mode section of {}",
            output.display()
        ));
        print!("{section}");
        let _ = std::fs::remove_dir_all(&work);
        return Ok(());
    }

    let cassandra = cassandra::detect(
        &spendflow,
        (!args.no_cassandra).then_some(args.cassandra.as_str()),
    );
    let spark = if args.skip_spark {
        None
    } else {
        Some(spark::install(&repo)?)
    };
    let kstreams = if args.no_kstreams {
        None
    } else {
        Some(kstreams::install(&repo)?)
    };
    let scaling = (!args.no_scaling).then(|| scale_points(quick));
    say(format!(
        "estimate: about {} min for this run (from the rates of the last full run on this \
         machine; a faster engine makes it shorter)",
        estimate_minutes(
            &settings,
            args.layouts.len(),
            spark.is_some(),
            kstreams.is_some(),
            matches!(cassandra, Availability::Available(_)),
            scaling.as_deref(),
            (!args.no_cluster).then_some(cluster_events),
        )
        .round()
    ));

    let mut report = Report::new(
        &settings,
        &spendflow,
        &repo,
        spark.as_ref(),
        kstreams.as_ref(),
        &cassandra,
    );
    report.load_start = util::load_average();
    if !args.no_in_memory {
        report.in_memory = in_memory(&settings)?;
    }
    for layout_name in &args.layouts {
        check_stop()?;
        let result = measure_layout(
            *layout_name,
            &settings,
            &prefix,
            &work,
            &spendflow,
            &args.engine_arg,
            spark.as_ref(),
            kstreams.as_ref(),
            &cassandra,
            args.profile,
            &repo,
            args.timeout_secs,
        )?;
        report.layouts.push(result);
        // Write what we have after each layout, so a later failure keeps the earlier figures.
        report.load_end = util::load_average();
        report.write(&output)?;
    }
    if let Some(points) = &scaling {
        report.scaling_note = Some(format!(
            "keyed layout, {} partitions, `-w {}`, no durable sink; one run per point",
            settings.partitions, settings.workers
        ));
        for &(users, records) in points {
            check_stop()?;
            let point = measure_scale_point(
                &settings,
                &prefix,
                &work,
                &spendflow,
                &args.engine_arg,
                users,
                records,
                Duration::from_secs(args.timeout_secs),
            )?;
            report.scaling.push(point);
            report.load_end = util::load_average();
            report.write(&output)?;
        }
    }
    report.load_end = util::load_average();
    report.write(&output)?;
    if !args.no_cluster {
        check_stop()?;
        let load = util::load_average().unwrap_or_default();
        let points = cluster::measure(
            &settings,
            &prefix,
            &work,
            &spendflow,
            &args.engine_arg,
            cluster_events,
            Duration::from_secs(args.timeout_secs),
        )?;
        let load = format!(
            "{load} at the start, {} at the end",
            util::load_average().unwrap_or_default()
        );
        cluster::splice(
            &output,
            &cluster::render(&points, &settings, cluster_events, &load),
        )?;
    }
    say(format!("wrote {}", output.display()));
    print!("{}", report.summary());
    if args.keep_logs {
        say(format!("engine logs kept in {}", work.display()));
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// Deletes the run's topics when dropped.
struct TopicsGuard {
    brokers: String,
    prefix: String,
}

impl Drop for TopicsGuard {
    fn drop(&mut self) {
        match kafka::delete_topics_with_prefix(&self.brokers, &self.prefix) {
            Ok(n) => say(format!("deleted {n} topics {}*", self.prefix)),
            Err(e) => say(format!(
                "could not delete the topics {}*: {e:#}",
                self.prefix
            )),
        }
    }
}

/// One layout's topics and how each system reads them.
struct Plan {
    name: &'static str,
    layout: Layout,
    users: u64,
    marker_user: u64,
    topics: Vec<(String, i32)>,
    engine_args: Vec<String>,
    spark_source: Vec<String>,
}

fn plan(name: LayoutName, s: &Settings, prefix: &str) -> Plan {
    match name {
        LayoutName::Keyed => {
            let topic = format!("{prefix}keyed");
            let layout = Layout::Keyed {
                topic: topic.clone(),
                partitions: s.partitions,
            };
            Plan {
                name: "keyed",
                users: s.users,
                marker_user: s.users + 1,
                topics: vec![(topic.clone(), s.partitions)],
                engine_args: vec!["--topic".into(), topic.clone()],
                spark_source: vec!["--topic".into(), topic],
                layout,
            }
        }
        LayoutName::PerUser => {
            let user_prefix = format!("{prefix}user.");
            let layout = Layout::PerUser {
                prefix: user_prefix.clone(),
            };
            let pattern = layout.topic_pattern();
            let marker_user = s.per_user_users + 1;
            Plan {
                name: "per-user",
                users: s.per_user_users,
                marker_user,
                topics: (1..=marker_user)
                    .map(|u| (layout.topic_for(u), 1))
                    .collect(),
                engine_args: vec![
                    "--topic-pattern".into(),
                    pattern.clone(),
                    "--user-topic-prefix".into(),
                    user_prefix,
                ],
                spark_source: vec!["--pattern".into(), pattern],
                layout,
            }
        }
    }
}

/// Freshness of each marker: the first time a system showed a count >= the marker's count,
/// minus the time the marker was handed to the producer. Markers never seen are counted apart.
fn latencies(markers: &[Marker], seen: &[(u64, i64)]) -> (Vec<f64>, usize) {
    let mut out = Vec::new();
    let mut missing = 0;
    for m in markers {
        match seen
            .iter()
            .filter(|(count, ms)| *count >= m.count && *ms >= m.sent_ms)
            .map(|(_, ms)| *ms)
            .min()
        {
            Some(ms) => out.push((ms - m.sent_ms) as f64),
            None => missing += 1,
        }
    }
    (out, missing)
}

#[allow(clippy::too_many_arguments)]
fn measure_layout(
    name: LayoutName,
    s: &Settings,
    prefix: &str,
    work: &Path,
    spendflow: &Path,
    extra_engine_args: &[String],
    spark: Option<&SparkInstall>,
    kstreams: Option<&KStreamsInstall>,
    cassandra: &Availability,
    profile: bool,
    repo: &Path,
    timeout_secs: u64,
) -> Result<LayoutResult> {
    let plan = plan(name, s, prefix);
    let timeout = Duration::from_secs(timeout_secs);
    let mut r = LayoutResult::new(plan.name, plan.users, plan.topics.len());
    say(format!(
        "[{}] creating {} topic(s), loading {} records",
        plan.name,
        plan.topics.len(),
        s.events
    ));
    kafka::create_topics(&s.brokers, &plan.topics)?;
    let config: GeneratorConfig = GeneratorConfig {
        seed: s.seed,
        ..spendflow_bench::config(plan.users, 0.0)
    };
    let mut sim = Simulator::new(config.clone())?;
    let load = kafka::load(&s.brokers, &plan.layout, &mut sim, s.events)?;
    say(format!(
        "[{}] loaded {} records ({:.0} MB) in {:.1} s",
        plan.name,
        load.records,
        load.bytes as f64 / 1e6,
        load.elapsed.as_secs_f64()
    ));
    r.load = Some(load);
    let topic_names: Vec<String> = plan.topics.iter().map(|t| t.0.clone()).collect();

    // (e) The compute ceiling: the same bytes, decoded and folded on one thread.
    let lines: Vec<Vec<u8>> = {
        let mut again = Simulator::new(config.clone())?;
        (0..s.events).map(|_| again.next_record().bytes).collect()
    };
    let mut reference = None;
    for run in 0..s.runs {
        check_stop()?;
        let f = fold::fold(&lines);
        say(format!(
            "[{}] HashMap fold {}/{}: {:.0} records/s ({} cells, {} rejected)",
            plan.name,
            run + 1,
            s.runs,
            f.records as f64 / f.elapsed.as_secs_f64(),
            f.cells,
            f.rejected
        ));
        r.fold.push(f.records as f64 / f.elapsed.as_secs_f64());
        reference = Some(f.users);
    }
    drop(lines);
    let reference = reference.unwrap_or_default();

    // (d) The Kafka ceiling.
    for run in 0..s.runs {
        check_stop()?;
        let (read, took) = kafka::raw_consume(&s.brokers, &topic_names, s.workers)?;
        say(format!(
            "[{}] raw consume {}/{}: {read} records in {:.2} s",
            plan.name,
            run + 1,
            s.runs,
            took.as_secs_f64()
        ));
        r.raw.push(read as f64 / took.as_secs_f64());
    }

    // (a) spendflow catch-up. Two configurations: without a durable sink (state in memory,
    // served over gRPC: what Spark, which also keeps its state in memory, is compared with),
    // and with the Cassandra sink and checkpoints, when the engine has it. Each run is a fresh
    // process (with a keyspace of its own).
    let mut base_args = vec![
        "--input".to_string(),
        format!("kafka:{}", s.brokers),
        "-w".into(),
        s.workers.to_string(),
        "--dead-letter-topic".into(),
        format!("{prefix}dead-letter"),
    ];
    base_args.extend(plan.engine_args.iter().cloned());
    base_args.extend(extra_engine_args.iter().cloned());
    let cql = match cassandra {
        Availability::Available(addr) => Some((cassandra::Cql::connect(addr)?, addr.clone())),
        Availability::Unavailable(_) => None,
    };
    let ctx = EngineCtx {
        spendflow,
        base_args,
        cql: cql.as_ref(),
        keyspace_prefix: format!(
            "{}_{}",
            prefix.trim_end_matches('.').replace('.', "_"),
            plan.name.replace('-', "_")
        ),
        work,
        layout: plan.name,
        broker: util::service_pid(repo, "kafka"),
        cassandra: util::service_pid(repo, "cassandra"),
        timeout,
    };
    let sinks: Vec<bool> = std::iter::once(false)
        .chain(cql.is_some().then_some(true))
        .collect();
    for &sink in &sinks {
        let mut f = report::EngineFigures {
            command: format!("spendflow run {}", ctx.args(sink, "<keyspace>").join(" ")),
            ..Default::default()
        };
        for run in 0..s.runs {
            ctx.catch_up_run(sink, run, s, &reference, &mut f)?;
        }
        if profile {
            check_stop()?;
            f.profile = Some(ctx.profile(sink, s.events)?);
        }
        if sink {
            r.sfc = Some(f);
        } else {
            r.sf = f;
        }
    }

    // (a) Spark catch-up, each run a fresh process on a fresh checkpoint.
    if let Some(install) = spark {
        for run in 0..s.runs {
            check_stop()?;
            let (p, start, done) =
                start_spark_caught_up(install, repo, s, &plan, work, run, s.events, timeout)?;
            let secs = (done - start).as_secs_f64();
            let startup = (start - p.started).as_secs_f64();
            let rss = p.peak_rss_kib();
            r.spark_cores
                .push(util::group_cpu_secs(p.pid()) / (done - p.started).as_secs_f64());
            say(format!(
                "[{}] Spark catch-up {}/{}: {} records in {secs:.2} s = {:.0}/s (start-up \
                 {startup:.1} s), peak RSS {} MiB",
                plan.name,
                run + 1,
                s.runs,
                p.records,
                p.records as f64 / secs,
                rss / 1024
            ));
            r.spark_catchup.push(p.records as f64 / secs);
            r.spark_startup.push(startup);
            r.spark_rss_mib.push(rss as f64 / 1024.0);
            p.stop();
        }
    }

    // (a) Kafka Streams catch-up, each run a fresh JVM with a fresh application id (fresh
    // consumer group, internal topics and RocksDB state). The first run's per-user totals are
    // checked against the fold.
    if let Some(install) = kstreams {
        for run in 0..s.runs {
            check_stop()?;
            let totals = (run == 0).then(|| work.join(format!("kstreams-{}-totals", plan.name)));
            let (p, start, done) = start_kstreams_caught_up(
                install,
                s,
                &plan,
                prefix,
                work,
                &format!("c{run}"),
                s.events,
                totals.clone(),
                timeout,
            )?;
            let secs = (done - start).as_secs_f64();
            let startup = (start - p.started).as_secs_f64();
            let rss = p.peak_rss_kib();
            r.ks_cores
                .push(util::group_cpu_secs(p.pid()) / (done - p.started).as_secs_f64());
            say(format!(
                "[{}] Kafka Streams catch-up {}/{}: {} records in {secs:.2} s = {:.0}/s \
                 (start-up {startup:.1} s), peak RSS {} MiB",
                plan.name,
                run + 1,
                s.runs,
                p.records,
                p.records as f64 / secs,
                rss / 1024
            ));
            r.ks_catchup.push(p.records as f64 / secs);
            r.ks_startup.push(startup);
            r.ks_rss_mib.push(rss as f64 / 1024.0);
            p.stop();
            if let Some(t) = totals {
                let served = kstreams::read_totals(&t)?;
                let check = report::check(&served, &reference);
                say(format!(
                    "[{}] Kafka Streams per-user totals vs HashMap fold: {check}",
                    plan.name
                ));
                r.ks_check = Some(check);
            }
            let _ = std::fs::remove_dir_all(work.join(format!("kstreams-{}-c{run}", plan.name)));
        }
    }

    // (b) Freshness at a steady rate: spendflow (each configuration), then Spark and Kafka
    // Streams, each on one caught-up process.
    let plan_steady = SteadyPlan {
        rate: s.rate,
        duration: s.window,
        marker_every: Duration::from_millis(1000 / s.markers_per_sec),
    };
    let warmup = SteadyPlan {
        duration: Duration::from_secs(2),
        ..plan_steady
    };
    let run_tag = format!("{}{}", prefix.trim_end_matches('.'), plan.name);
    let mut markers = Markers::new(&s.brokers, &plan.layout, plan.marker_user, &run_tag)?;
    for &sink in &sinks {
        check_stop()?;
        let (in_topics, _) = kafka::partitions_of(&s.brokers, &topic_names)?;
        let tag = if sink { "fresh_c" } else { "fresh" };
        let log = work.join(format!("engine-{}-{tag}.log", plan.name));
        let (args, keyspace) = ctx.prepare(sink, tag)?;
        let mut engine = EngineProcess::start(spendflow, &args, &log)?;
        catch_up(&mut engine, keyspace.as_ref(), in_topics, timeout)
            .with_context(|| format!("engine log: {}", log.display()))?;
        let seen = engine.subscribe(plan.marker_user)?;
        let stored = keyspace
            .as_ref()
            .map(|k| k.cql.watch_user(&k.name, plan.marker_user, CASSANDRA_POLL));
        kafka::steady(&s.brokers, &plan.layout, &mut sim, &mut markers, warmup)?;
        let f = if sink {
            r.sfc.as_mut().context("figures with the sink")?
        } else {
            &mut r.sf
        };
        let who = if sink {
            "spendflow+Cassandra"
        } else {
            "spendflow"
        };
        for run in 0..s.runs {
            let (sent, produced) = kafka::steady(
                &s.brokers,
                &plan.layout,
                &mut sim,
                &mut markers,
                plan_steady,
            )?;
            // Let the last markers arrive (a system that fell behind gets 10 s more).
            let target = markers.sent;
            let mut observed: Vec<(u64, i64)> = Vec::new();
            let mut stored_seen: Vec<(u64, i64)> = Vec::new();
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                check_stop()?;
                observed.extend(seen.try_iter());
                if let Some(rx) = &stored {
                    stored_seen.extend(rx.try_iter());
                }
                let done = |o: &[(u64, i64)]| o.iter().any(|o| o.0 >= target);
                if done(&observed) && (stored.is_none() || done(&stored_seen)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            observed.extend(seen.try_iter());
            let window = |name: &str, seen: &[(u64, i64)]| {
                let (lat, missing) = latencies(&sent, seen);
                let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
                say(format!(
                    "[{}] {who} freshness to {name} {}/{}: {} markers over {produced} \
                     records, p50 {:?} ms, p99 {:?} ms, {missing} not seen",
                    plan.name,
                    run + 1,
                    s.runs,
                    sent.len(),
                    p50,
                    p99
                ));
                report::Freshness {
                    samples: lat.len(),
                    missing,
                    p50,
                    p99,
                    produced,
                    secs: s.window.as_secs_f64(),
                }
            };
            f.fresh.push(window("gRPC", &observed));
            if stored.is_some() {
                f.cass_fresh.push(window("Cassandra", &stored_seen));
            }
        }
        let rss = engine.peak_rss_kib().unwrap_or(0);
        f.rss_mib.push(rss as f64 / 1024.0);
        engine.stop();
        drop(stored);
        drop(keyspace);
    }
    if let Some(install) = spark {
        check_stop()?;
        let (in_topics, _) = kafka::partitions_of(&s.brokers, &topic_names)?;
        let (mut p, _, _) =
            start_spark_caught_up(install, repo, s, &plan, work, s.runs, in_topics, timeout)?;
        r.spark_fresh = baseline_freshness(
            &mut p,
            "Spark",
            s,
            &plan,
            &mut sim,
            &mut markers,
            warmup,
            plan_steady,
        )?;
        r.spark_rss_mib.push(p.peak_rss_kib() as f64 / 1024.0);
        p.stop();
    }
    if let Some(install) = kstreams {
        check_stop()?;
        let (in_topics, _) = kafka::partitions_of(&s.brokers, &topic_names)?;
        let (mut p, _, _) = start_kstreams_caught_up(
            install, s, &plan, prefix, work, "fresh", in_topics, None, timeout,
        )?;
        r.ks_fresh = baseline_freshness(
            &mut p,
            "Kafka Streams",
            s,
            &plan,
            &mut sim,
            &mut markers,
            warmup,
            plan_steady,
        )?;
        r.ks_rss_mib.push(p.peak_rss_kib() as f64 / 1024.0);
        p.stop();
        let _ = std::fs::remove_dir_all(work.join(format!("kstreams-{}-fresh", plan.name)));
    }
    Ok(r)
}

/// What every engine process of a layout shares.
struct EngineCtx<'a> {
    spendflow: &'a Path,
    base_args: Vec<String>,
    cql: Option<&'a (cassandra::Cql, String)>,
    keyspace_prefix: String,
    work: &'a Path,
    layout: &'static str,
    broker: Option<u32>,
    cassandra: Option<u32>,
    timeout: Duration,
}

impl EngineCtx<'_> {
    /// Arguments of one engine process; with `sink`, writing to keyspace `keyspace`.
    fn args(&self, sink: bool, keyspace: &str) -> Vec<String> {
        let mut args = self.base_args.clone();
        if let (true, Some((_, addr))) = (sink, self.cql) {
            let checkpoints = self.work.join(format!("checkpoints-{keyspace}"));
            args.extend([
                "--sink".into(),
                "cassandra".into(),
                "--cassandra".into(),
                addr.clone(),
                "--keyspace".into(),
                keyspace.to_string(),
                "--checkpoint-dir".into(),
                checkpoints.display().to_string(),
            ]);
        }
        args
    }

    /// The arguments, and with `sink` the keyspace, created (and dropped with the guard).
    fn prepare(&self, sink: bool, tag: &str) -> Result<(Vec<String>, Option<Keyspace>)> {
        let name = format!("{}_{tag}", self.keyspace_prefix);
        let keyspace = match (sink, self.cql) {
            (true, Some((cql, _))) => {
                cql.create_schema(&name)?;
                Some(Keyspace {
                    cql: cql.clone(),
                    name: name.clone(),
                    checkpoints: self.work.join(format!("checkpoints-{name}")),
                })
            }
            _ => None,
        };
        Ok((self.args(sink, &name), keyspace))
    }

    /// One catch-up of a fresh engine over the `s.events` records in Kafka.
    fn catch_up_run(
        &self,
        sink: bool,
        run: usize,
        s: &Settings,
        reference: &fold::UserTotals,
        f: &mut report::EngineFigures,
    ) -> Result<()> {
        check_stop()?;
        let tag = format!("{}{run}", if sink { "c" } else { "m" });
        let log = self.work.join(format!("engine-{}-{tag}.log", self.layout));
        let (mut args, keyspace) = self.prepare(sink, &tag)?;
        // The sink's rows written come from the engine's Prometheus counter.
        let metrics = if sink {
            let addr = format!("127.0.0.1:{}", engine::free_port()?);
            args.extend(["--metrics".into(), addr.clone()]);
            Some(addr)
        } else {
            None
        };
        let broker_cpu = self.broker.and_then(util::cpu_secs);
        let cassandra_cpu = self.cassandra.and_then(util::cpu_secs);
        let machine = util::machine_ticks();
        let mut engine = EngineProcess::start(self.spendflow, &args, &log)?;
        let caught = catch_up(&mut engine, keyspace.as_ref(), s.events, self.timeout)
            .with_context(|| format!("engine log: {}", log.display()))?;
        // CPU over the whole catch-up (to Cassandra when the sink is on).
        let wall = caught.cassandra_secs.unwrap_or(caught.served_secs);
        let cpu = util::cpu_secs(engine.pid()).unwrap_or(0.0);
        let cassandra_after = self.cassandra.and_then(util::cpu_secs);
        // Off-CPU share of the worker threads over the catch-up (to Cassandra with the sink).
        if let Some(off) = util::workers_off_cpu(engine.pid(), s.workers, wall) {
            f.off_cpu.push(off * 100.0);
        }
        if let Some(addr) = &metrics {
            match util::scrape_counter(addr, "spendflow_sink_rows_written_total") {
                Ok(rows) => {
                    f.writes_per_event.push(rows / caught.records.max(1) as f64);
                    if let (Some(a), Some(b)) = (cassandra_cpu, cassandra_after)
                        && rows > 0.0
                    {
                        f.cassandra_us_per_row.push((b - a) * 1e6 / rows);
                    }
                    say(format!(
                        "[{}] sink rows written: {rows:.0} = {:.3} per event",
                        self.layout,
                        rows / caught.records.max(1) as f64
                    ));
                }
                Err(e) => say(format!(
                    "[{}] could not read the sink's rows from {addr}: {e:#}",
                    self.layout
                )),
            }
        }
        let used =
            |pid: Option<u32>, before: Option<f64>| match (before, pid.and_then(util::cpu_secs)) {
                (Some(a), Some(b)) => Some((b - a) / wall),
                _ => None,
            };
        let rss = engine.peak_rss_kib().unwrap_or(0);
        let rate = caught.records as f64 / caught.served_secs;
        say(format!(
            "[{}] spendflow{} catch-up {}/{}: {} records in {:.2} s = {rate:.0}/s{}, {:.2} \
             cores, peak RSS {} MiB; rejected {}",
            self.layout,
            if sink { "+Cassandra" } else { "" },
            run + 1,
            s.runs,
            caught.records,
            caught.served_secs,
            caught
                .cassandra_secs
                .map(|c| format!(
                    " (Cassandra: {c:.2} s = {:.0}/s)",
                    caught.records as f64 / c
                ))
                .unwrap_or_default(),
            cpu / wall,
            rss / 1024,
            caught.rejected
        ));
        f.catchup.push(rate);
        if let Some(c) = caught.cassandra_secs {
            f.cass_catchup.push(caught.records as f64 / c);
        }
        f.cores.push(cpu / wall);
        f.broker_cores.extend(used(self.broker, broker_cpu));
        f.cassandra_cores
            .extend(used(self.cassandra, cassandra_cpu));
        f.machine_busy
            .extend(util::machine_busy(machine, util::machine_ticks()).map(|b| b * 100.0));
        f.rss_mib.push(rss as f64 / 1024.0);
        if run == 0 {
            let served = engine.user_totals()?;
            let check = report::check(&served, reference);
            say(format!(
                "[{}] served state vs HashMap fold: {check}",
                self.layout
            ));
            f.check = Some(check);
        }
        engine.stop();
        drop(keyspace);
        Ok(())
    }

    /// One extra catch-up under `perf record -g`.
    fn profile(&self, sink: bool, records: u64) -> Result<Profile> {
        let tag = if sink { "perf_c" } else { "perf" };
        let (args, keyspace) = self.prepare(sink, tag)?;
        let profile = profile_catchup(
            self.spendflow,
            &args,
            records,
            self.work,
            &format!("{}-{tag}", self.layout),
            self.timeout,
        );
        drop(keyspace);
        profile
    }
}

/// How often the marker user's Cassandra row is read during the freshness windows.
const CASSANDRA_POLL: Duration = Duration::from_millis(5);

/// A keyspace of the run and the engine's checkpoint directory beside it, both removed when
/// the guard is dropped (checkpoints are hundreds of MB; the logs stay for a failed run).
struct Keyspace {
    cql: cassandra::Cql,
    name: String,
    checkpoints: PathBuf,
}

impl Drop for Keyspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.checkpoints);
        if let Err(e) = self.cql.drop_keyspace(&self.name) {
            say(format!("could not drop keyspace {}: {e:#}", self.name));
        }
    }
}

/// When a fresh engine had caught up, timed from its start.
struct CaughtUp {
    records: u64,
    rejected: u64,
    served_secs: f64,
    cassandra_secs: Option<f64>,
}

/// Waits until the engine serves at least `records` records (and, with the Cassandra sink,
/// until its newest committed progress row covers them), polling both every 10 ms.
fn catch_up(
    engine: &mut EngineProcess,
    keyspace: Option<&Keyspace>,
    records: u64,
    timeout: Duration,
) -> Result<CaughtUp> {
    let deadline = Instant::now() + timeout;
    let mut served: Option<(u64, u64, f64)> = None;
    let mut stored: Option<f64> = None;
    let mut covered = 0;
    loop {
        check_stop()?;
        if served.is_none() {
            let (at, status) = engine.wait_caught_up(records, timeout)?;
            served = Some((
                status.records_read,
                status.records_rejected,
                (at - engine.started).as_secs_f64(),
            ));
        }
        match keyspace {
            None => break,
            Some(k) if stored.is_none() => {
                covered = k.cql.records_covered(&k.name).unwrap_or(covered);
                if covered >= records {
                    stored = Some(engine.started.elapsed().as_secs_f64());
                    break;
                }
            }
            Some(_) => break,
        }
        if Instant::now() > deadline {
            bail!("the Cassandra sink covered {covered} of {records} records in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (records, rejected, served_secs) = served.context("not caught up")?;
    Ok(CaughtUp {
        records,
        rejected,
        served_secs,
        cassandra_secs: stored,
    })
}

/// Starts the Spark baseline on a fresh checkpoint and waits until its sink has seen `records`
/// records; returns the process, when its query started, and when it had caught up.
#[allow(clippy::too_many_arguments)]
fn start_spark_caught_up(
    install: &SparkInstall,
    repo: &Path,
    s: &Settings,
    plan: &Plan,
    work: &Path,
    run: usize,
    records: u64,
    timeout: Duration,
) -> Result<(SparkProcess, Instant, Instant)> {
    let checkpoint = work.join(format!("spark-{}-{run}", plan.name));
    let log = work.join(format!("spark-{}-{run}.log", plan.name));
    let mut p = SparkProcess::start(
        install,
        repo,
        &s.brokers,
        &plan.spark_source,
        plan.marker_user,
        &checkpoint,
        &log,
    )?;
    let start = p
        .wait_ready(Duration::from_secs(180))
        .with_context(|| format!("Spark log: {}", log.display()))?;
    let mut marks = Vec::new();
    let done = p
        .wait_records(records, timeout, &mut marks)
        .with_context(|| format!("Spark log: {}", log.display()))?;
    Ok((p, start, done))
}

/// One catch-up of the engine under `perf record -g`; the top threads and symbols.
fn profile_catchup(
    spendflow: &Path,
    engine_args: &[String],
    records: u64,
    work: &Path,
    layout: &str,
    timeout: Duration,
) -> Result<Profile> {
    let data = work.join(format!("perf-{layout}.data"));
    let log = work.join(format!("engine-{layout}-perf.log"));
    Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .context("`perf` is needed for --profile (apt-get install linux-perf)")?;
    // perf starts the engine, so every thread it ever has is sampled; SIGTERM to the process
    // group stops the engine, and perf then writes its file.
    let wrapper: Vec<String> = ["perf", "record", "-g", "-F", "499", "-o"]
        .iter()
        .map(|s| s.to_string())
        .chain([data.display().to_string(), "--".into()])
        .collect();
    let mut engine = EngineProcess::start_under(&wrapper, spendflow, engine_args, &log)?;
    let result = engine.wait_caught_up(records, timeout);
    engine.stop();
    result?;
    let report = |sort: &str| -> Result<String> {
        let out = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                sort,
                "-g",
                "none",
            ])
            .args(["--percent-limit", if sort == "comm" { "1" } else { "0.7" }])
            .arg("-i")
            .arg(&data)
            .output()
            .context("perf report")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(30)
            .map(|l| l.trim_end().trim_end_matches(['-', ' ']).to_string())
            .collect::<Vec<_>>()
            .join("\n"))
    };
    let profile = Profile {
        by_thread: report("comm")?,
        by_symbol: report("comm,symbol")?,
    };
    let _ = std::fs::remove_file(&data);
    say(format!("[{layout}] profile:\n{}", profile.by_thread));
    Ok(profile)
}

/// Starts the Kafka Streams baseline with a fresh application id and state directory (`tag`
/// names both) and waits until its per-user results cover `records` records; returns the
/// process, when it was started (`READY`), and when it had caught up.
#[allow(clippy::too_many_arguments)]
fn start_kstreams_caught_up(
    install: &KStreamsInstall,
    s: &Settings,
    plan: &Plan,
    prefix: &str,
    work: &Path,
    tag: &str,
    records: u64,
    totals: Option<PathBuf>,
    timeout: Duration,
) -> Result<(SparkProcess, Instant, Instant)> {
    let log = work.join(format!("kstreams-{}-{tag}.log", plan.name));
    let run = KStreamsRun {
        brokers: &s.brokers,
        source: &plan.spark_source,
        marker_user: plan.marker_user,
        // Under the run's prefix: its internal topics are deleted with the run's topics.
        app_id: format!("{prefix}kstreams-{}-{tag}", plan.name),
        state_dir: work.join(format!("kstreams-{}-{tag}", plan.name)),
        threads: s.workers,
        expect: records,
        totals,
    };
    let mut p = kstreams::start(install, &run, &log)?;
    let start = p
        .wait_ready(Duration::from_secs(120))
        .with_context(|| format!("Kafka Streams log: {}", log.display()))?;
    let mut marks = Vec::new();
    let done = p
        .wait_records(records, timeout, &mut marks)
        .with_context(|| format!("Kafka Streams log: {}", log.display()))?;
    Ok((p, start, done))
}

/// Freshness windows on a caught-up baseline (Spark or Kafka Streams): a warm-up, then
/// `s.runs` windows, each marker timed to the first `MARK` line that includes it.
#[allow(clippy::too_many_arguments)]
fn baseline_freshness(
    p: &mut SparkProcess,
    who: &str,
    s: &Settings,
    plan: &Plan,
    sim: &mut Simulator,
    markers: &mut Markers,
    warmup: SteadyPlan,
    plan_steady: SteadyPlan,
) -> Result<Vec<Freshness>> {
    let mut out = Vec::new();
    let mut marks = Vec::new();
    kafka::steady(&s.brokers, &plan.layout, sim, markers, warmup)?;
    for run in 0..s.runs {
        marks.clear();
        let (sent, produced) = kafka::steady(&s.brokers, &plan.layout, sim, markers, plan_steady)?;
        let target = markers.sent;
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end && !marks.iter().any(|m: &(u64, i64)| m.0 >= target) {
            p.collect_marks(Duration::from_millis(100), &mut marks)?;
        }
        let (lat, missing) = latencies(&sent, &marks);
        let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
        say(format!(
            "[{}] {who} freshness {}/{}: {} markers over {produced} records, p50 {:?} ms, p99 \
             {:?} ms, {missing} not seen",
            plan.name,
            run + 1,
            s.runs,
            sent.len(),
            p50,
            p99
        ));
        out.push(Freshness {
            samples: lat.len(),
            missing,
            p50,
            p99,
            produced,
            secs: s.window.as_secs_f64(),
        });
    }
    Ok(out)
}

/// The scaling table's points, `(users, records)`: users at a fixed record count, then records
/// at 10 k users (the 10 k-user, 2 M-record point is shared).
fn scale_points(quick: bool) -> Vec<(u64, u64)> {
    if quick {
        vec![
            (100, 50_000),
            (1_000, 50_000),
            (10_000, 50_000),
            (1_000, 100_000),
        ]
    } else {
        vec![
            (1_000, 2_000_000),
            (10_000, 2_000_000),
            (100_000, 2_000_000),
            (1_000_000, 2_000_000),
            (10_000, 10_000_000),
            (10_000, 20_000_000),
        ]
    }
}

/// A rough duration of the run, in minutes, from the rates of the last full run on this
/// machine (load 600 K/s, fold 650 K/s, raw 2.9 M/s, spendflow 150 K/s and 70 K/s with the
/// sink, Spark 130 K/s plus 25 s start-up, Kafka Streams 40 K/s plus 15 s (a guess: its first
/// quick runs did 4-6 K/s on 50 K records, mostly start-up and rebalancing), the scaling table
/// at spendflow's rate): printed at the start so a full run's length is no surprise.
fn estimate_minutes(
    s: &Settings,
    layouts: usize,
    spark: bool,
    kstreams: bool,
    cassandra: bool,
    scaling: Option<&[(u64, u64)]>,
    cluster_events: Option<u64>,
) -> f64 {
    let n = s.events as f64;
    let runs = s.runs as f64;
    let window = s.window.as_secs_f64() + 4.0;
    let mut secs_per_layout = n / 600e3 + runs * (n / 650e3 + n / 2.9e6);
    let mut systems = 1.0;
    secs_per_layout += runs * (2.0 + n / 150e3);
    if cassandra {
        secs_per_layout += runs * (4.0 + n / 70e3);
        systems += 1.0;
    }
    if spark {
        secs_per_layout += runs * (25.0 + n / 130e3);
        systems += 1.0;
    }
    if kstreams {
        secs_per_layout += runs * (15.0 + n / 40e3);
        systems += 1.0;
    }
    // Freshness: each system catches up once more, then a warm-up and the windows.
    secs_per_layout += systems * (n / 120e3 + 2.0 + runs * window);
    let mut total = secs_per_layout * layouts as f64;
    for &(_, records) in scaling.unwrap_or_default() {
        let r = records as f64;
        total += r / 600e3 + r / 1e6 + 2.0 + r / 150e3;
    }
    // Cluster mode: one load, then 1, 2 and 3 processes `runs` times each (guessed at a third
    // of the engine's rate: one worker each, and the exchange).
    if let Some(events) = cluster_events {
        let r = events as f64;
        total += r / 600e3 + 3.0 * runs * (5.0 + r / 50e3);
    }
    total / 60.0
}

/// The in-memory dataflow alone, one worker: criterion's `dataflow/epoch_100k/w1` workload
/// (1 M records of 10 k users in epochs of 100 k, `bench/benches/dataflow.rs`), run `s.runs`
/// times in this process; records/s per run.
fn in_memory(s: &Settings) -> Result<Vec<f64>> {
    let n = if s.quick { 100_000 } else { 1_000_000 };
    let records = spendflow_bench::records(spendflow_bench::config(10_000, 0.0), n);
    let input = spendflow_bench::split_by_worker(&spendflow_bench::epochs(&records, n / 10), 1);
    drop(records);
    let mut out = Vec::new();
    for run in 0..s.runs {
        check_stop()?;
        let took = spendflow_bench::run_dataflow(input.clone()).elapsed;
        let rate = n as f64 / took.as_secs_f64();
        say(format!(
            "in-memory dataflow, one worker {}/{}: {n} records in {:.2} s = {rate:.0}/s",
            run + 1,
            s.runs,
            took.as_secs_f64()
        ));
        out.push(rate);
    }
    Ok(out)
}

/// One point of the scaling table: `records` records of `users` users loaded into a fresh
/// keyed topic, one catch-up of a fresh engine without a durable sink, its peak RSS, and the
/// live expenses at the end (regenerated from the same seed); the topic is deleted after.
#[allow(clippy::too_many_arguments)]
fn measure_scale_point(
    s: &Settings,
    prefix: &str,
    work: &Path,
    spendflow: &Path,
    extra_engine_args: &[String],
    users: u64,
    records: u64,
    timeout: Duration,
) -> Result<ScalePoint> {
    let topic = format!("{prefix}scale-{users}u-{records}r");
    let layout = Layout::Keyed {
        topic: topic.clone(),
        partitions: s.partitions,
    };
    say(format!(
        "[scaling] {users} users, {records} records: loading"
    ));
    kafka::create_topics(&s.brokers, &[(topic.clone(), s.partitions)])?;
    let config = GeneratorConfig {
        seed: s.seed,
        ..spendflow_bench::config(users, 0.0)
    };
    let result = (|| -> Result<ScalePoint> {
        let mut sim = Simulator::new(config.clone())?;
        kafka::load(&s.brokers, &layout, &mut sim, records)?;
        drop(sim);
        let live = fold::live_expenses(config, records)?;
        let mut args = vec![
            "--input".to_string(),
            format!("kafka:{}", s.brokers),
            "-w".into(),
            s.workers.to_string(),
            "--dead-letter-topic".into(),
            format!("{prefix}dead-letter"),
            "--topic".into(),
            topic.clone(),
        ];
        args.extend(extra_engine_args.iter().cloned());
        let log = work.join(format!("engine-scale-{users}-{records}.log"));
        let mut engine = EngineProcess::start(spendflow, &args, &log)?;
        let caught = catch_up(&mut engine, None, records, timeout)
            .with_context(|| format!("engine log: {}", log.display()))?;
        let rss_kib = engine.peak_rss_kib().unwrap_or(0);
        engine.stop();
        let rate = caught.records as f64 / caught.served_secs;
        say(format!(
            "[scaling] {users} users, {records} records: {rate:.0}/s, peak RSS {} MiB, {live} \
             live expenses, {:.0} bytes per live expense",
            rss_kib / 1024,
            rss_kib as f64 * 1024.0 / live.max(1) as f64
        ));
        Ok(ScalePoint {
            users,
            records,
            rate,
            rss_mib: rss_kib as f64 / 1024.0,
            live,
        })
    })();
    if let Err(e) = kafka::delete_topics_with_prefix(&s.brokers, &topic) {
        say(format!("could not delete {topic}: {e:#}"));
    }
    result
}
