//! Restart after a crash, measured: how long an engine with 1,000,000 events behind its
//! checkpoint takes to serve everything again, and what the Cassandra sink writes.
//!
//! ```text
//! docker/native/services up cassandra
//! cargo build --release
//! cargo run --release -p spendflow-bench --example recovery -- --events 1000000
//! ```
//!
//! 1. Writes `--events` simulated records (1% malformed) to a JSON-lines file.
//! 2. Runs `spendflow run --input file:… -w 2 --sink cassandra --checkpoint-dir …` until it
//!    serves every record and the sink has committed it: catch-up throughput, to gRPC and to
//!    Cassandra, and the rows the sink wrote per input event.
//! 3. Waits for the checkpoint of everything, stops the engine (SIGTERM; the sink reports the
//!    rows it wrote), starts it again and times the restart: from the new process to serving
//!    all records again (`caught_up`); then kills it with SIGKILL and times a second restart.
//!
//! Prints one line per figure; `bench/README.md` quotes them.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cdrs_tokio::types::IntoRustByName;
use clap::Parser;
use spendflow_engine::source::generator::{GeneratorConfig, Simulator};
use spendflow_proto::v1::GetStatusRequest;
use spendflow_proto::v1::admin_client::AdminClient;

#[derive(Parser)]
struct Args {
    /// Records in the input.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Simulated users.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Cassandra contact point.
    #[arg(long, env = "SPENDFLOW_CASSANDRA", default_value = "127.0.0.1:9042")]
    cassandra: String,
    /// Dataflow workers.
    #[arg(short = 'w', long, default_value_t = 2)]
    workers: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let binary = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("spendflow"))
        .context("where is target/release?")?;
    if !binary.exists() {
        bail!(
            "{} is missing: run `cargo build --release` first",
            binary.display()
        );
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/recovery");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("input.jsonl");
    let started = Instant::now();
    write_input(&input, args.events, args.users)?;
    println!(
        "input: {} records in {:.1?}",
        args.events,
        started.elapsed()
    );

    let keyspace = format!("sf_recovery_{}", std::process::id());
    let grpc = "127.0.0.1:50071";
    let runtime = tokio::runtime::Runtime::new()?;
    let engine = |log: &str| -> Result<Child> {
        Ok(Command::new(&binary)
            .args(["run", "-w", &args.workers.to_string(), "--grpc", grpc])
            .arg("--input")
            .arg(format!("file:{}", input.display()))
            .args(["--sink", "cassandra", "--cassandra", &args.cassandra])
            .args(["--keyspace", &keyspace, "--checkpoint-interval", "2s"])
            .arg("--checkpoint-dir")
            .arg(dir.join("checkpoints"))
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(log))?)
            .spawn()?)
    };

    // Catch-up from nothing.
    let started = Instant::now();
    let mut first = engine("first.log")?;
    let served = wait_served(&runtime, grpc, args.events, Duration::from_secs(600))?;
    let to_grpc = started.elapsed();
    let to_cassandra = wait_committed(&runtime, &args.cassandra, &keyspace, args.events)?;
    let to_cassandra = to_cassandra.duration_since(started);
    let rows = sink_rows(&runtime, &args.cassandra, &keyspace)?;
    println!(
        "catch-up to gRPC: {} records in {:.2?} = {:.0} records/s ({} live expenses, {} users)",
        args.events,
        to_grpc,
        args.events as f64 / to_grpc.as_secs_f64(),
        served.live_expenses,
        served.users
    );
    println!(
        "catch-up to Cassandra: {:.2?} = {:.0} records/s; {} rows live in the tables",
        to_cassandra,
        args.events as f64 / to_cassandra.as_secs_f64(),
        rows
    );

    // Let a checkpoint of everything be written, then crash.
    let checkpoints = dir.join("checkpoints");
    let deadline = Instant::now() + Duration::from_secs(60);
    while newest_checkpoint_covers(&dir.join("first.log")) < args.events {
        if Instant::now() > deadline {
            bail!(
                "no checkpoint of everything within 60 s (see {})",
                dir.join("first.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let size: u64 = std::fs::read_dir(&checkpoints)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    // A clean stop first, so the sink reports what it wrote.
    Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()?;
    first.wait()?;
    let written = std::fs::read_to_string(dir.join("first.log"))?
        .lines()
        .find(|l| l.contains("Cassandra sink finished"))
        .and_then(|l| field(&strip_ansi(l), "rows"))
        .unwrap_or(0);
    println!(
        "Cassandra writes: {written} rows = {:.0} rows/s during catch-up, {:.3} writes per input event ({:.3} rows live per event)",
        written as f64 / to_cassandra.as_secs_f64(),
        written as f64 / args.events as f64,
        rows as f64 / args.events as f64
    );
    println!("checkpoint: {:.1} MiB", size as f64 / (1 << 20) as f64);

    // Restart after the clean stop, then crash it with SIGKILL and restart again.
    for (run, log) in [
        ("after a clean stop", "second.log"),
        ("after kill -9", "third.log"),
    ] {
        let started = Instant::now();
        let mut engine = engine(log)?;
        wait_served(&runtime, grpc, args.events, Duration::from_secs(600))?;
        println!(
            "restart {run}, from the checkpoint with {} events behind it, to serving everything again: {:.2?}",
            args.events,
            started.elapsed()
        );
        engine.kill()?;
        engine.wait()?;
    }
    runtime.block_on(async {
        if let Ok(session) = spendflow_engine::cassandra::connect(&args.cassandra).await {
            let _ = session
                .query(format!("DROP KEYSPACE IF EXISTS {keyspace}"))
                .await;
        }
    });
    Ok(())
}

fn write_input(path: &Path, events: u64, users: u64) -> Result<()> {
    let mut simulator = Simulator::new(GeneratorConfig {
        users,
        seed: 7,
        bad_rate: 0.01,
        ..GeneratorConfig::default()
    })?;
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    for _ in 0..events {
        let record = simulator.next_record();
        out.write_all(&record.bytes)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn wait_served(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    events: u64,
    limit: Duration,
) -> Result<spendflow_proto::v1::GetStatusResponse> {
    let deadline = Instant::now() + limit;
    loop {
        let status = runtime.block_on(async {
            let mut client = AdminClient::connect(format!("http://{addr}")).await.ok()?;
            Some(
                client
                    .get_status(GetStatusRequest {})
                    .await
                    .ok()?
                    .into_inner(),
            )
        });
        if let Some(s) = status
            && s.caught_up
            && s.records_read >= events
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the engine did not serve {events} records within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// When the sink's newest committed progress row covers `events` records.
fn wait_committed(
    runtime: &tokio::runtime::Runtime,
    contact: &str,
    keyspace: &str,
    events: u64,
) -> Result<Instant> {
    runtime.block_on(async {
        let session = spendflow_engine::cassandra::connect(contact).await?;
        loop {
            let rows = session
                .query(format!(
                    "SELECT records_covered, committed FROM {keyspace}.sink_progress WHERE sink = 'main' LIMIT 5"
                ))
                .await?
                .response_body()?
                .into_rows()
                .unwrap_or_default();
            let covered = rows.iter().find_map(|r| {
                let committed: Option<bool> = r.get_by_name("committed").ok().flatten();
                let covered: Option<i64> = r.get_by_name("records_covered").ok().flatten();
                covered.filter(|_| committed == Some(true))
            });
            if covered.is_some_and(|c| c as u64 >= events) {
                return Ok(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

fn sink_rows(runtime: &tokio::runtime::Runtime, contact: &str, keyspace: &str) -> Result<u64> {
    runtime.block_on(async {
        let session = spendflow_engine::cassandra::connect(contact).await?;
        let mut total = 0;
        for table in [
            "user_totals",
            "user_category_totals",
            "user_merchant_totals",
            "user_daily_totals",
            "user_monthly_totals",
        ] {
            let rows = session
                .query(format!("SELECT COUNT(*) FROM {keyspace}.{table}"))
                .await?
                .response_body()?
                .into_rows()
                .unwrap_or_default();
            let n: i64 = rows
                .first()
                .map(|r| r.get_r_by_name("count"))
                .transpose()?
                .unwrap_or(0);
            total += n as u64;
        }
        Ok::<_, anyhow::Error>(total)
    })
}

/// Records read covered by the newest "Checkpoint written" line's epoch is not logged; the
/// checkpoint of everything is the first one written after the engine went idle, which this
/// approximates by the `records` of the newest restore-able file: read it back.
fn newest_checkpoint_covers(log: &Path) -> u64 {
    let dir = log.parent().unwrap().join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut newest: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
        })
        .collect();
    newest.sort();
    newest
        .last()
        .and_then(|p| std::fs::File::open(p).ok())
        .and_then(|f| {
            spendflow_engine::checkpoint::Checkpoint::decode(std::io::BufReader::new(f)).ok()
        })
        .map_or(0, |c| c.records_read)
}

/// The number after `name=` in a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut escape = false;
    for c in line.chars() {
        match (escape, c) {
            (false, '\u{1b}') => escape = true,
            (true, 'm') => escape = false,
            (false, c) => out.push(c),
            _ => {}
        }
    }
    out
}
