//! `bench/RESULTS.md`: the machine, the versions, the workload, every figure as min/median/max
//! over the runs, the ratios (each on a line of its own, `spendflow/Spark: 12.3x`), the targets,
//! and the profile when one was taken.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use spendflow_engine::generate::KindCounts;

use crate::Settings;
use crate::cassandra::Availability;
use crate::fold::UserTotals;
use crate::kafka::LoadStats;
use crate::kstreams::{JAVA_HEAP, KStreamsInstall};
use crate::spark::SparkInstall;
use crate::util::Spread;

/// One freshness window.
#[derive(Clone, Debug)]
pub struct Freshness {
    pub samples: usize,
    pub missing: usize,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub produced: u64,
    pub secs: f64,
}

/// `perf report` of one catch-up.
#[derive(Clone, Debug)]
pub struct Profile {
    pub by_thread: String,
    pub by_symbol: String,
}

/// What one engine configuration measured on one layout.
#[derive(Default)]
pub struct EngineFigures {
    pub command: String,
    pub catchup: Vec<f64>,
    pub cass_catchup: Vec<f64>,
    pub cores: Vec<f64>,
    pub broker_cores: Vec<f64>,
    pub cassandra_cores: Vec<f64>,
    pub machine_busy: Vec<f64>,
    pub rss_mib: Vec<f64>,
    pub fresh: Vec<Freshness>,
    pub cass_fresh: Vec<Freshness>,
    pub check: Option<String>,
    pub profile: Option<Profile>,
    /// Off-CPU share of the worker threads during catch-up (%).
    pub off_cpu: Vec<f64>,
    /// Rows the sink wrote (or deleted) per event read, during catch-up.
    pub writes_per_event: Vec<f64>,
    /// Cassandra's CPU time per row written during catch-up (µs).
    pub cassandra_us_per_row: Vec<f64>,
}

/// One point of the scaling table.
#[derive(Clone, Debug)]
pub struct ScalePoint {
    pub users: u64,
    pub records: u64,
    pub rate: f64,
    pub rss_mib: f64,
    pub live: u64,
}

/// Everything measured on one layout.
pub struct LayoutResult {
    pub name: &'static str,
    pub users: u64,
    pub topics: usize,
    pub load: Option<LoadStats>,
    pub fold: Vec<f64>,
    pub raw: Vec<f64>,
    /// The engine without a durable sink.
    pub sf: EngineFigures,
    /// The engine with the Cassandra sink, when it has one.
    pub sfc: Option<EngineFigures>,
    pub spark_catchup: Vec<f64>,
    pub spark_startup: Vec<f64>,
    pub spark_cores: Vec<f64>,
    pub spark_rss_mib: Vec<f64>,
    pub spark_fresh: Vec<Freshness>,
    pub ks_catchup: Vec<f64>,
    pub ks_startup: Vec<f64>,
    pub ks_cores: Vec<f64>,
    pub ks_rss_mib: Vec<f64>,
    pub ks_fresh: Vec<Freshness>,
    pub ks_check: Option<String>,
}

impl LayoutResult {
    pub fn new(name: &'static str, users: u64, topics: usize) -> Self {
        LayoutResult {
            name,
            users,
            topics,
            load: None,
            fold: Vec::new(),
            raw: Vec::new(),
            sf: EngineFigures::default(),
            sfc: None,
            spark_catchup: Vec::new(),
            spark_startup: Vec::new(),
            spark_cores: Vec::new(),
            spark_rss_mib: Vec::new(),
            spark_fresh: Vec::new(),
            ks_catchup: Vec::new(),
            ks_startup: Vec::new(),
            ks_cores: Vec::new(),
            ks_rss_mib: Vec::new(),
            ks_fresh: Vec::new(),
            ks_check: None,
        }
    }

    fn median(values: &[f64]) -> Option<f64> {
        Spread::of(values).map(|s| s.median)
    }

    fn p99s(f: &[Freshness]) -> Vec<f64> {
        f.iter().filter_map(|w| w.p99).collect()
    }

    fn p50s(f: &[Freshness]) -> Vec<f64> {
        f.iter().filter_map(|w| w.p50).collect()
    }
}

/// Compares the engine's served per-user totals with the HashMap fold's.
pub fn check(served: &UserTotals, reference: &UserTotals) -> String {
    let mut wrong: Vec<String> = Vec::new();
    let mut users: Vec<&u64> = reference.keys().collect();
    users.sort();
    for user in users {
        let value = &reference[user];
        if served.get(user) != Some(value) {
            wrong.push(format!(
                "user {user}: served {:?}, fold {value:?}",
                served.get(user)
            ));
        }
    }
    let extra = served.keys().filter(|u| !reference.contains_key(u)).count();
    if wrong.is_empty() && extra == 0 {
        format!("equal for all {} users (total and count)", reference.len())
    } else {
        format!(
            "MISMATCH: {} of {} users differ, {extra} served users not in the fold (first: {})",
            wrong.len(),
            reference.len(),
            wrong.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        )
    }
}

pub struct Report {
    settings: Settings,
    machine: Vec<(String, String)>,
    versions: Vec<(String, String)>,
    cassandra: String,
    spark: bool,
    kstreams: bool,
    pub load_start: Option<String>,
    pub load_end: Option<String>,
    pub layouts: Vec<LayoutResult>,
    /// The in-memory dataflow, one worker (records/s per run).
    pub in_memory: Vec<f64>,
    pub scaling: Vec<ScalePoint>,
    pub scaling_note: Option<String>,
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let text = String::from_utf8_lossy(&text);
    text.lines().next().map(|l| l.trim().to_string())
}

fn kit_version(repo: &Path, var: &str) -> Option<String> {
    let script = std::fs::read_to_string(repo.join("docker/native/services")).ok()?;
    script
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{var}=")))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_string)
}

impl Report {
    pub fn new(
        settings: &Settings,
        spendflow: &Path,
        repo: &Path,
        spark: Option<&SparkInstall>,
        kstreams: Option<&KStreamsInstall>,
        cassandra: &Availability,
    ) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let machine = vec![
            ("CPU".into(), format!("{cpu}, {cores} cores visible")),
            ("memory".into(), memory),
            ("kernel".into(), format!("Linux {kernel}")),
            (
                "sharing".into(),
                "Kafka (and Cassandra) of the services kit run on the same cores as the engine, \
                 Spark and this harness"
                    .into(),
            ),
        ];
        let repo_s = repo.display().to_string();
        let commit = command_line("git", &["-C", &repo_s, "rev-parse", "--short", "HEAD"])
            .unwrap_or_default();
        let dirty = Command::new("git")
            .args([
                "-C",
                &repo_s,
                "status",
                "--porcelain",
                "--untracked-files=no",
            ])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        let spendflow_version =
            command_line(&spendflow.display().to_string(), &["--version"]).unwrap_or_default();
        let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
        let mut versions = vec![
            (
                "spendflow".into(),
                format!(
                    "{spendflow_version}, commit {commit}{}",
                    if dirty {
                        " (with uncommitted changes in the tree)"
                    } else {
                        ""
                    }
                ),
            ),
            (
                "rustc".into(),
                command_line("rustc", &["-V"]).unwrap_or_default(),
            ),
            ("librdkafka".into(), librdkafka),
            (
                "Kafka".into(),
                kit_version(repo, "KAFKA_VERSION").unwrap_or_default()
                    + " (KRaft, one broker, services kit)",
            ),
            (
                "Java".into(),
                command_line("java", &["-version"]).unwrap_or_default(),
            ),
        ];
        if let Some(spark) = spark {
            versions.push((
                "Spark".into(),
                format!(
                    "pyspark {} with spark-sql-kafka-0-10_2.13 {}, local[2], {}",
                    spark.version,
                    spark.version,
                    command_line(&spark.python.display().to_string(), &["--version"])
                        .unwrap_or_default()
                ),
            ));
        }
        if let Some(ks) = kstreams {
            versions.push((
                "Kafka Streams".into(),
                format!(
                    "kafka-streams {} (`bench/kstreams`), exactly_once_v2, RocksDB stores, \
                     {JAVA_HEAP}, threads = engine workers",
                    ks.version
                ),
            ));
        }
        let cassandra = match cassandra {
            Availability::Available(addr) => format!("on, `--sink cassandra` to {addr}"),
            Availability::Unavailable(why) => why.clone(),
        };
        if let Some(v) = kit_version(repo, "CASSANDRA_VERSION") {
            versions.push((
                "Cassandra".into(),
                format!("{v} (services kit); sink: {cassandra}"),
            ));
        }
        Report {
            settings: settings.clone(),
            machine,
            versions,
            cassandra,
            spark: spark.is_some(),
            kstreams: kstreams.is_some(),
            load_start: None,
            load_end: None,
            layouts: Vec::new(),
            in_memory: Vec::new(),
            scaling: Vec::new(),
            scaling_note: None,
        }
    }

    fn na_cassandra(&self) -> String {
        format!("n/a ({})", self.cassandra)
    }

    /// The ratios of `catchup` (spendflow's catch-up figures) to the other sides.
    fn ratios(&self, l: &LayoutResult, catchup: &[f64]) -> Vec<(String, Option<f64>)> {
        let sf = LayoutResult::median(catchup);
        let ratio = |other: Option<f64>| match (sf, other) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        vec![
            (
                "spendflow/Spark".into(),
                ratio(LayoutResult::median(&l.spark_catchup)),
            ),
            (
                "spendflow/Kafka Streams".into(),
                ratio(LayoutResult::median(&l.ks_catchup)),
            ),
            (
                "spendflow/raw-Kafka".into(),
                ratio(LayoutResult::median(&l.raw)),
            ),
            (
                "spendflow/HashMap".into(),
                ratio(LayoutResult::median(&l.fold)),
            ),
        ]
    }

    /// Freshness and memory: the other side's median p99 (peak RSS) / spendflow's.
    fn other_ratios(l: &LayoutResult) -> Vec<(String, Option<f64>)> {
        let over = |theirs: &[f64], ours: &[f64]| match (
            LayoutResult::median(theirs),
            LayoutResult::median(ours),
        ) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let ours_p99 = LayoutResult::p99s(&l.sf.fresh);
        vec![
            (
                "spendflow/Spark (freshness p99)".into(),
                over(&LayoutResult::p99s(&l.spark_fresh), &ours_p99),
            ),
            (
                "spendflow/Kafka Streams (freshness p99)".into(),
                over(&LayoutResult::p99s(&l.ks_fresh), &ours_p99),
            ),
            (
                "spendflow/Spark (peak RSS)".into(),
                over(&l.spark_rss_mib, &l.sf.rss_mib),
            ),
            (
                "spendflow/Kafka Streams (peak RSS)".into(),
                over(&l.ks_rss_mib, &l.sf.rss_mib),
            ),
        ]
    }

    fn ratio_text(v: Option<f64>) -> String {
        match v {
            Some(v) if v >= 10.0 => format!("{v:.1}x"),
            Some(v) => format!("{v:.2}x"),
            None => "n/a".into(),
        }
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.render()).with_context(|| format!("write {}", path.display()))
    }

    /// A short summary for the terminal.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for l in &self.layouts {
            let _ = writeln!(out, "{} layout:", l.name);
            for (name, v) in self
                .ratios(l, &l.sf.catchup)
                .into_iter()
                .chain(Self::other_ratios(l))
            {
                let _ = writeln!(out, "  {name}: {}", Self::ratio_text(v));
            }
            let _ = writeln!(
                out,
                "  catch-up: spendflow {} events/s, with the Cassandra sink {} (to Cassandra {}), \
                 Spark {} events/s; p99 freshness: spendflow {} ms, with the sink {} ms (to \
                 Cassandra {} ms), Spark {} ms",
                fmt_median(&l.sf.catchup, 0),
                fmt_median(l.sfc.as_ref().map_or(&[][..], |f| &f.catchup), 0),
                fmt_median(l.sfc.as_ref().map_or(&[][..], |f| &f.cass_catchup), 0),
                fmt_median(&l.spark_catchup, 0),
                fmt_median(&LayoutResult::p99s(&l.sf.fresh), 0),
                fmt_median(
                    &l.sfc
                        .as_ref()
                        .map_or(Vec::new(), |f| LayoutResult::p99s(&f.fresh)),
                    0
                ),
                fmt_median(
                    &l.sfc
                        .as_ref()
                        .map_or(Vec::new(), |f| LayoutResult::p99s(&f.cass_fresh)),
                    0
                ),
                fmt_median(&LayoutResult::p99s(&l.spark_fresh), 0),
            );
        }
        out
    }

    fn render(&self) -> String {
        let s = &self.settings;
        let mut o = String::new();
        let w = &mut o;
        let _ = writeln!(w, "# spendflow end-to-end benchmark results\n");
        let _ = writeln!(
            w,
            "Written by the end-to-end harness (`bench/src/bin/e2e`, see `bench/README.md`) on {} \
             UTC{}.\n\nCommand: `{}`\n",
            chrono::Utc::now().format("%Y-%m-%d %H:%M"),
            if s.quick {
                " in **--quick** mode (small input, one run: not for quoting)"
            } else {
                ""
            },
            s.command_line
        );

        if let Some(first) = self.layouts.first() {
            let _ = writeln!(
                w,
                "## Ratios\n\nMedian catch-up throughput of spendflow (Kafka to served state, \
                 state in memory like Spark's) divided by the median of the other side, {} \
                 layout (per-layout ratios, and those with the Cassandra sink, are in the tables \
                 below):\n",
                first.name
            );
            let _ = writeln!(w, "```");
            for (name, v) in self.ratios(first, &first.sf.catchup) {
                let _ = writeln!(w, "{name}: {}", Self::ratio_text(v));
            }
            for (name, v) in Self::other_ratios(first) {
                let _ = writeln!(w, "{name}: {}", Self::ratio_text(v));
            }
            let _ = writeln!(w, "```\n");
            let _ = writeln!(
                w,
                "Freshness and memory ratios are the other side's median p99 freshness (or peak \
                 RSS) divided by spendflow's (no durable sink): above 1 means spendflow is \
                 fresher (or smaller).\n"
            );
        }

        let _ = writeln!(w, "## Machine\n");
        for (k, v) in &self.machine {
            let _ = writeln!(w, "- {k}: {v}");
        }
        let _ = writeln!(
            w,
            "- load average (1, 5, 15 min) at the start: {}; at the end: {}",
            self.load_start.as_deref().unwrap_or("?"),
            self.load_end.as_deref().unwrap_or("?")
        );
        let _ = writeln!(w, "\n## Versions\n");
        for (k, v) in &self.versions {
            let _ = writeln!(w, "- {k}: {v}");
        }

        let _ = writeln!(w, "\n## Workload\n");
        let _ = writeln!(
            w,
            "- {} records per layout from the engine's seeded simulator (seed {:#x}, the \
             criterion benches' settings), loaded into fresh topics before anything is measured; \
             no malformed records",
            s.events, s.seed
        );
        for l in &self.layouts {
            let layout = match l.name {
                "keyed" => format!(
                    "one topic, {} partitions, key = user id, {} users",
                    s.partitions, l.users
                ),
                _ => format!(
                    "one single-partition topic per user: {} users, {} topics (one for the \
                     freshness marker user)",
                    l.users, l.topics
                ),
            };
            let _ = writeln!(w, "- {} layout: {layout}", l.name);
            if let Some(load) = &l.load {
                let _ = writeln!(
                    w,
                    "  - {} records, {:.0} bytes each on average, lz4 batches; loaded at {:.0} \
                     records/s (acks=all); mix: {}",
                    load.records,
                    load.bytes as f64 / load.records.max(1) as f64,
                    load.records as f64 / load.elapsed.as_secs_f64(),
                    mix(&load.kinds)
                );
            }
            for f in std::iter::once(&l.sf).chain(l.sfc.as_ref()) {
                if !f.command.is_empty() {
                    let _ = writeln!(w, "  - engine: `{}`", f.command);
                }
            }
        }
        let _ = writeln!(
            w,
            "- freshness: {} background records/s for {} s per window, one marker every {} ms, \
             {} window(s) per system after a 2 s warm-up",
            s.rate,
            s.window.as_secs(),
            1000 / s.markers_per_sec,
            s.runs
        );
        let _ = writeln!(
            w,
            "- engine: {} worker(s); runs per figure: {}",
            s.workers, s.runs
        );

        for l in &self.layouts {
            self.render_layout(w, l);
        }
        self.render_extra(w);
        self.render_targets(w);
        self.render_profile(w);
        render_notes(w, self.spark, self.kstreams);
        o
    }

    fn render_engine(&self, w: &mut String, f: &EngineFigures, sink: bool) {
        let who = if sink {
            "spendflow with the Cassandra sink"
        } else {
            "spendflow"
        };
        row(
            w,
            &format!("{who}: catch-up, Kafka → served state (events/s)"),
            &f.catchup,
            0,
        );
        if sink {
            row(
                w,
                &format!("{who}: catch-up, Kafka → Cassandra (events/s)"),
                &f.cass_catchup,
                0,
            );
        }
        row(
            w,
            &format!("{who}: engine CPU during catch-up (cores busy, of 2)"),
            &f.cores,
            2,
        );
        row(
            w,
            &format!("{who}: Kafka broker CPU during catch-up (cores)"),
            &f.broker_cores,
            2,
        );
        row(
            w,
            &format!("{who}: Cassandra CPU during catch-up (cores)"),
            &f.cassandra_cores,
            2,
        );
        row(
            w,
            &format!("{who}: whole machine CPU busy during catch-up (%)"),
            &f.machine_busy,
            0,
        );
        row(
            w,
            &format!("{who}: worker threads off-CPU during catch-up (%, schedstat)"),
            &f.off_cpu,
            0,
        );
        if sink {
            row(
                w,
                &format!("{who}: Cassandra writes per event during catch-up (rows / events)"),
                &f.writes_per_event,
                3,
            );
            row(
                w,
                &format!("{who}: Cassandra CPU per written row during catch-up (µs)"),
                &f.cassandra_us_per_row,
                1,
            );
        }
        row(
            w,
            &format!("{who}: freshness p50, produce → gRPC Subscribe (ms)"),
            &LayoutResult::p50s(&f.fresh),
            0,
        );
        row(
            w,
            &format!("{who}: freshness p99, produce → gRPC Subscribe (ms)"),
            &LayoutResult::p99s(&f.fresh),
            0,
        );
        if sink {
            row(
                w,
                &format!("{who}: freshness p50, produce → Cassandra row (ms)"),
                &LayoutResult::p50s(&f.cass_fresh),
                0,
            );
            row(
                w,
                &format!("{who}: freshness p99, produce → Cassandra row (ms)"),
                &LayoutResult::p99s(&f.cass_fresh),
                0,
            );
        }
        row(w, &format!("{who}: peak RSS (MiB, VmHWM)"), &f.rss_mib, 0);
    }

    fn render_layout(&self, w: &mut String, l: &LayoutResult) {
        let _ = writeln!(w, "\n## Results: {} layout\n", l.name);
        let _ = writeln!(w, "| figure | min | median | max | runs |");
        let _ = writeln!(w, "|---|---:|---:|---:|---:|");
        self.render_engine(w, &l.sf, false);
        match &l.sfc {
            Some(f) => self.render_engine(w, f, true),
            None => row_text(
                w,
                "spendflow with the Cassandra sink (catch-up, freshness)",
                &self.na_cassandra(),
            ),
        }
        if self.spark {
            row(
                w,
                "Spark: catch-up, Kafka → sink, from query start (events/s)",
                &l.spark_catchup,
                0,
            );
            row(
                w,
                "Spark: start-up, process to query start (s)",
                &l.spark_startup,
                1,
            );
            row(
                w,
                "Spark: CPU, start to caught up (cores busy, of 2)",
                &l.spark_cores,
                2,
            );
            row(
                w,
                "Spark: freshness p50, produce → sink (ms)",
                &LayoutResult::p50s(&l.spark_fresh),
                0,
            );
            row(
                w,
                "Spark: freshness p99, produce → sink (ms)",
                &LayoutResult::p99s(&l.spark_fresh),
                0,
            );
            row(
                w,
                "Spark: driver peak RSS (MiB, Python + JVM VmHWM)",
                &l.spark_rss_mib,
                0,
            );
        } else {
            row_text(w, "Spark (catch-up, freshness)", "n/a (--skip-spark)");
        }
        if self.kstreams {
            row(
                w,
                "Kafka Streams: catch-up, Kafka → per-user results, from start() (events/s)",
                &l.ks_catchup,
                0,
            );
            row(
                w,
                "Kafka Streams: start-up, process to start() (s)",
                &l.ks_startup,
                1,
            );
            row(
                w,
                "Kafka Streams: CPU, start to caught up (cores busy, of 2)",
                &l.ks_cores,
                2,
            );
            row(
                w,
                "Kafka Streams: freshness p50, produce → per-user result (ms)",
                &LayoutResult::p50s(&l.ks_fresh),
                0,
            );
            row(
                w,
                "Kafka Streams: freshness p99, produce → per-user result (ms)",
                &LayoutResult::p99s(&l.ks_fresh),
                0,
            );
            row(
                w,
                "Kafka Streams: peak RSS (MiB, JVM VmHWM)",
                &l.ks_rss_mib,
                0,
            );
        } else {
            row_text(
                w,
                "Kafka Streams (catch-up, freshness)",
                "n/a (--no-kstreams)",
            );
        }
        row(
            w,
            "raw librdkafka consume-and-discard (events/s)",
            &l.raw,
            0,
        );
        row(
            w,
            "HashMap fold, decode + upsert + 5 cells, 1 thread (events/s)",
            &l.fold,
            0,
        );
        let _ = writeln!(w);
        for (name, v) in self.ratios(l, &l.sf.catchup) {
            let _ = writeln!(w, "- {name} ({} layout): {}", l.name, Self::ratio_text(v));
        }
        if let Some(f) = &l.sfc {
            for (name, v) in self.ratios(l, &f.catchup) {
                let _ = writeln!(
                    w,
                    "- {name} ({} layout, spendflow with the Cassandra sink, to served state): {}",
                    l.name,
                    Self::ratio_text(v)
                );
            }
        }
        for (name, v) in Self::other_ratios(l) {
            let _ = writeln!(w, "- {name} ({} layout): {}", l.name, Self::ratio_text(v));
        }
        let mut windows = vec![("spendflow (gRPC)", &l.sf.fresh)];
        if let Some(f) = &l.sfc {
            windows.push(("spendflow with the sink (gRPC)", &f.fresh));
            windows.push(("spendflow with the sink (Cassandra)", &f.cass_fresh));
        }
        windows.push(("Spark", &l.spark_fresh));
        windows.push(("Kafka Streams", &l.ks_fresh));
        for (who, f) in windows {
            if f.is_empty() {
                continue;
            }
            let samples: usize = f.iter().map(|x| x.samples).sum();
            let missing: usize = f.iter().map(|x| x.missing).sum();
            let rate: f64 =
                f.iter().map(|x| x.produced as f64 / x.secs).sum::<f64>() / f.len() as f64;
            let _ = writeln!(
                w,
                "- {who} freshness: {samples} markers seen over {} window(s){}, background \
                 produced at {rate:.0} records/s on average",
                f.len(),
                if missing > 0 {
                    format!(", **{missing} not seen within the wait**")
                } else {
                    String::new()
                }
            );
        }
        for (who, f) in std::iter::once(("spendflow", &l.sf)).chain(
            l.sfc
                .as_ref()
                .map(|f| ("spendflow with the Cassandra sink", f)),
        ) {
            if let Some(check) = &f.check {
                let _ = writeln!(
                    w,
                    "- check, {who}: served per-user totals after the first catch-up vs the \
                     HashMap fold of the same records: {check}"
                );
            }
        }
        if let Some(check) = &l.ks_check {
            let _ = writeln!(
                w,
                "- check, Kafka Streams: per-user totals after the first catch-up vs the \
                 HashMap fold of the same records: {check}"
            );
        }
    }

    /// The in-memory figure and the scaling table.
    fn render_extra(&self, w: &mut String) {
        let _ = writeln!(w, "\n## In-memory dataflow, one worker\n");
        let _ = writeln!(w, "| figure | min | median | max | runs |");
        let _ = writeln!(w, "|---|---:|---:|---:|---:|");
        row(
            w,
            if self.settings.quick {
                "dataflow alone, 1 worker, 100 k records (--quick; the full run: 1 M), 10 k \
                 users, 10 epochs (criterion's `dataflow/epoch_100k/w1` workload, in the \
                 harness's process) (events/s)"
            } else {
                "dataflow alone, 1 worker, 1 M records, 10 k users, epochs of 100 k (criterion's \
                 `dataflow/epoch_100k/w1` workload, in the harness's process) (events/s)"
            },
            &self.in_memory,
            0,
        );
        if self.scaling.is_empty() {
            return;
        }
        let _ = writeln!(
            w,
            "\n## Scaling: catch-up and memory by users and by records\n\n{}. Bytes per live \
             expense = peak RSS / the expenses live at the end (the fold of the same \
             records).\n",
            self.scaling_note.as_deref().unwrap_or_default()
        );
        let _ = writeln!(
            w,
            "| users | records | catch-up (events/s) | peak RSS (MiB) | live expenses | bytes \
             per live expense |"
        );
        let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|");
        for p in &self.scaling {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} |",
                fmt_num(p.users as f64, 0),
                fmt_num(p.records as f64, 0),
                fmt_num(p.rate, 0),
                fmt_num(p.rss_mib, 0),
                fmt_num(p.live as f64, 0),
                fmt_num(p.rss_mib * 1024.0 * 1024.0 / p.live.max(1) as f64, 0)
            );
        }
    }

    fn render_targets(&self, w: &mut String) {
        let Some(l) = self.layouts.first() else {
            return;
        };
        let _ = writeln!(
            w,
            "\n## Targets of issue 14 ({} layout, medians; reported, never asserted)\n",
            l.name
        );
        let _ = writeln!(w, "| figure | target | measured | |");
        let _ = writeln!(w, "|---|---:|---:|---|");
        let verdict = |ok: Option<bool>| match ok {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "n/a",
        };
        let mut target = |name: &str, goal: &str, value: String, ok: Option<bool>| {
            let _ = writeln!(w, "| {name} | {goal} | {value} | {} |", verdict(ok));
        };
        let med = LayoutResult::median;
        let sf = med(&l.sf.catchup);
        target(
            "catch-up Kafka → served state (events/s)",
            "≥ 1,000,000",
            fmt_opt(sf, 0),
            sf.map(|v| v >= 1e6),
        );
        let ratios = self.ratios(l, &l.sf.catchup);
        let ratio = |name: &str| ratios.iter().find(|r| r.0 == name).and_then(|r| r.1);
        for (name, goal, min) in [
            ("spendflow/Spark", "≥ 10x", 10.0),
            ("spendflow/raw-Kafka", "≥ 0.35x", 0.35),
            ("spendflow/HashMap", "≥ 1.0x", 1.0),
        ] {
            let v = ratio(name);
            target(name, goal, Self::ratio_text(v), v.map(|v| v >= min));
        }
        let sfc = l.sfc.as_ref();
        let stored = sfc.and_then(|f| med(&f.cass_catchup));
        target(
            "with the Cassandra sink: catch-up Kafka → Cassandra (events/s)",
            "≥ 250,000",
            fmt_opt(stored, 0),
            stored.map(|v| v >= 250e3),
        );
        let writes = sfc.and_then(|f| med(&f.writes_per_event));
        target(
            "Cassandra writes per event during catch-up",
            "≤ 0.2",
            fmt_opt(writes, 3),
            writes.map(|v| v <= 0.2),
        );
        let p99c = sfc.and_then(|f| med(&LayoutResult::p99s(&f.fresh)));
        target(
            &format!(
                "freshness p99 @ {} events/s to gRPC, sink on (ms)",
                self.settings.rate
            ),
            "≤ 100",
            fmt_opt(p99c, 0),
            p99c.map(|v| v <= 100.0),
        );
        let p99s = sfc.and_then(|f| med(&LayoutResult::p99s(&f.cass_fresh)));
        target(
            &format!(
                "freshness p99 @ {} events/s to the Cassandra row (ms)",
                self.settings.rate
            ),
            "≤ 500",
            fmt_opt(p99s, 0),
            p99s.map(|v| v <= 500.0),
        );
        let rss = med(&l.sf.rss_mib);
        target(
            &format!(
                "peak RSS, {} records (MiB, no durable sink)",
                fmt_num(self.settings.events as f64, 0)
            ),
            "≤ 300",
            fmt_opt(rss, 0),
            rss.map(|v| v <= 300.0),
        );
        let mem = med(&self.in_memory);
        target(
            "in-memory graph, one worker (events/s)",
            "≥ 2,000,000",
            fmt_opt(mem, 0),
            mem.map(|v| v >= 2e6),
        );
        if let Some(p) = self.layouts.iter().find(|l| l.name == "per-user") {
            let v = med(&p.sf.catchup);
            target(
                "per-user layout catch-up does not regress (events/s)",
                "≥ 357,000",
                fmt_opt(v, 0),
                v.map(|v| v >= 357e3),
            );
        }
        let at = |users: u64| {
            self.scaling
                .iter()
                .filter(|p| p.users == users)
                .min_by_key(|p| p.records)
        };
        if let (Some(small), Some(big)) = (at(1_000), at(1_000_000))
            && small.records == big.records
        {
            let share = big.rate / small.rate;
            target(
                "scaling: catch-up at 1 M users / at 1 k users",
                "≥ 0.5x",
                format!("{share:.2}x"),
                Some(share >= 0.5),
            );
            target(
                &format!(
                    "scaling: peak RSS at 1 M users, {} records (MiB)",
                    fmt_num(big.records as f64, 0)
                ),
                "≤ 600",
                fmt_num(big.rss_mib, 0),
                Some(big.rss_mib <= 600.0),
            );
        }
        let _ = writeln!(
            w,
            "\nWhere a target is missed, `bench/README.md` (\"End-to-end results and where the time \
             goes\") has the analysis: profiles, off-CPU time, experiments and fixes."
        );
    }

    fn render_profile(&self, w: &mut String) {
        for l in &self.layouts {
            for (who, f) in std::iter::once(("spendflow", &l.sf)).chain(
                l.sfc
                    .as_ref()
                    .map(|f| ("spendflow with the Cassandra sink", f)),
            ) {
                let Some(p) = &f.profile else { continue };
                let _ = writeln!(
                    w,
                    "\n## Profile: one extra catch-up of {who}, {} layout (`perf record -g`)\n",
                    l.name
                );
                let _ = writeln!(w, "Samples by thread:\n\n```\n{}\n```\n", p.by_thread);
                let _ = writeln!(
                    w,
                    "Top symbols by thread (self time, ≥ 0.7 %):\n\n```\n{}\n```",
                    p.by_symbol
                );
            }
        }
    }
}

fn render_notes(w: &mut String, spark: bool, kstreams: bool) {
    let _ = writeln!(
        w,
        "\n## How each figure is measured\n\n\
         - **Catch-up**: the records are in Kafka before the system starts. spendflow: from \
         starting `spendflow run` (process start-up included) until `Admin/GetStatus` reports \
         `caught_up` with `records_read` ≥ N, polled every 10 ms; each run is a fresh process. \
         Throughput = records / that time.\n\
         - **Freshness**: background simulator records at the steady rate plus a marker expense \
         (a new expense of 1 minor unit for a user no other record names) every 50 ms; latency = \
         from handing the marker to the Kafka producer (linger 0) until the system first shows \
         the marker user's count including it. spendflow: a `Subscribe` stream on that user \
         (the change is sent when the epoch is published to the read model that \
         `GetUserSummary` reads). p50 and p99 per window; min/median/max over the windows.\n\
         - **Peak RSS**: `VmHWM` from `/proc/PID/status` of the engine process after each \
         catch-up and after the freshness windows.\n\
         - **Raw librdkafka ceiling**: as many plain `BaseConsumer`s as engine workers, with \
         the engine's consumer settings, reading every partition from the beginning and \
         dropping each message; no decoding.\n\
         - **HashMap fold**: the same bytes (regenerated from the same seed) decoded with \
         `spendflow_operators::decode` and folded on one thread into hash maps with the \
         engine's semantics (latest record per `expense_id`, retractions, the five cells per \
         expense), no Kafka, no epochs, no serving. Its per-user totals are also compared with \
         what the engine serves after the first catch-up.\n\
         - **Cassandra** (when the engine runs with `--sink cassandra`): each engine process \
         writes a keyspace of its own, created with the sink's tables before it starts, with a \
         `--checkpoint-dir` of its own. Catch-up to Cassandra: until the newest committed \
         `sink_progress` row has `records_covered` ≥ N (polled every 10 ms, after the served \
         state caught up). Freshness to Cassandra: the marker user's `user_totals` row, read \
         every 5 ms during the windows.\n\
         - **CPU**: user + system time of the process (and of the Kafka broker) during the \
         catch-up, divided by its wall time.\n\
         - **Off-CPU share**: 1 − (run time of the engine's `-w` worker threads, from \
         `/proc/PID/task/TID/schedstat`) / (`-w` × the wall time from process start to caught \
         up); the threads start a few ms after the process, so this slightly overstates it.\n\
         - **Cassandra writes per event**: the engine's `spendflow_sink_rows_written_total` \
         (rows written or deleted, from its `--metrics` endpoint) when Cassandra covered the \
         N records, divided by N. **Cassandra CPU per row**: Cassandra's CPU time over the \
         catch-up / those rows (other helpers' use of Cassandra during the run counts too).\n\
         - **In-memory dataflow**: `spendflow_bench::run_dataflow` on criterion's \
         `dataflow/epoch_100k/w1` input, in the harness's process, no Kafka, no serving.\n\
         - **Scaling table**: per point a fresh keyed topic, one catch-up of a fresh engine \
         without the durable sink (one run per point: single measurements), the topic \
         deleted after."
    );
    if kstreams {
        let _ = writeln!(
            w,
            "- **Kafka Streams baseline** (`bench/kstreams`, one Java class, built with Maven by \
             `bench/kstreams/build.sh`): the same topic(s) from the earliest offset, JSON decoded \
             with Jackson, re-keyed by `(user_id, expense_id)` and aggregated into a KTable of \
             the latest version per expense (a delete is a retracted version), then `groupBy` \
             user with an adder and a subtractor (a correction or delete retracts the old \
             amount; refunds are negative amounts): per-user total and count, exactly as \
             spendflow's user cell. `exactly_once_v2`, RocksDB stores with changelog topics, \
             default caching and commit interval (100 ms under exactly-once), as many stream \
             threads as engine workers, a fresh application id per run. Catch-up: from \
             `KafkaStreams.start()` until the per-user results it has received add up to N \
             records (each expense carries the count of records that reached it), JVM start-up \
             reported apart. Freshness: the marker user's row as it leaves the per-user KTable \
             (`toStream().foreach`). It computes less than spendflow (no category, merchant, \
             day or month cells, no serving) and more than the Spark baseline (exact upserts). \
             Peak RSS is the JVM's, with a 1 GiB heap cap; RocksDB's memory is outside it."
        );
    }
    if spark {
        let _ = writeln!(
            w,
            "- **Spark baseline** (`bench/spark/aggregate.py`, pyspark, `local[2]`, 2 shuffle \
             partitions, default state store): reads the same topic(s) from the earliest offset, \
             `from_json` with the record's schema, `rollup(user_id, category)` with sum and \
             count, update output mode, `foreachBatch` sink, trigger as fast as possible. \
             Catch-up is timed from the query's start (JVM and SparkSession start-up excluded, \
             reported apart) until a micro-batch covering N records has reached the sink. \
             Freshness: the sink prints the marker user's row when it changes.\n\
             - **What Spark computes is less, and that favours it.** Structured Streaming has no \
             retraction inside a plain aggregation, so the baseline sums every `upsert` record: \
             a correction is counted again instead of replacing the expense, a duplicate is \
             counted twice, a delete is read and ignored (spendflow keeps the latest record per \
             `expense_id` and retracts). Exact upserts in Spark need `applyInPandasWithState` / \
             `transformWithState` holding every live expense, which would be slower. It keeps \
             per-user and per-user-category totals only (spendflow also keeps merchant, day and \
             month cells, last event time and top spenders), and its sink only picks the two \
             rows the harness watches, while spendflow publishes every changed cell to its read \
             model and subscribers every epoch."
        );
    }
}

fn mix(k: &KindCounts) -> String {
    let total = k.total().max(1) as f64;
    let pct = |n: u64| n as f64 * 100.0 / total;
    format!(
        "{:.1} % new, {:.1} % late, {:.1} % corrections, {:.1} % refunds, {:.1} % duplicates, \
         {:.1} % deletes",
        pct(k.new),
        pct(k.late),
        pct(k.correction),
        pct(k.refund),
        pct(k.duplicate),
        pct(k.delete)
    )
}

fn fmt_num(v: f64, decimals: usize) -> String {
    if decimals == 0 && v.abs() >= 1000.0 {
        // Thousands separators for large counts.
        let s = format!("{:.0}", v);
        let bytes = s.as_bytes();
        let mut out = String::new();
        for (i, b) in bytes.iter().enumerate() {
            if i > 0 && (bytes.len() - i) % 3 == 0 && bytes[i - 1] != b'-' {
                out.push(',');
            }
            out.push(*b as char);
        }
        out
    } else {
        format!("{v:.decimals$}")
    }
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| fmt_num(v, decimals))
}

fn fmt_median(values: &[f64], decimals: usize) -> String {
    fmt_opt(Spread::of(values).map(|s| s.median), decimals)
}

fn row(w: &mut String, name: &str, values: &[f64], decimals: usize) {
    match Spread::of(values) {
        Some(s) => {
            let _ = writeln!(
                w,
                "| {name} | {} | {} | {} | {} |",
                fmt_num(s.min, decimals),
                fmt_num(s.median, decimals),
                fmt_num(s.max, decimals),
                s.n
            );
        }
        None => row_text(w, name, "n/a"),
    }
}

fn row_text(w: &mut String, name: &str, text: &str) {
    let _ = writeln!(w, "| {name} | {text} | | | |");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(fmt_num(1234567.4, 0), "1,234,567");
        assert_eq!(fmt_num(999.0, 0), "999");
        assert_eq!(fmt_num(-12345.0, 0), "-12,345");
        assert_eq!(fmt_num(1.234, 2), "1.23");
    }
}
