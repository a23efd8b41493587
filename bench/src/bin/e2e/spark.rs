//! The Spark Structured Streaming baseline: `bench/spark/aggregate.py` (pyspark, `local[2]`)
//! as a child process, installed on first use by `bench/spark/install.sh` into
//! `target/bench/spark`. The script prints one line per event (see its docstring); a reader
//! thread turns them into [`SparkEvent`]s.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{ChildGuard, check_stop, group_peak_rss_kib};

/// The installed baseline: the venv's python, the connector jars, and the version.
#[derive(Clone, Debug)]
pub struct SparkInstall {
    pub python: PathBuf,
    pub jars: PathBuf,
    pub version: String,
}

/// Runs `bench/spark/install.sh` (idempotent: quick when already installed).
pub fn install(repo: &Path) -> Result<SparkInstall> {
    let script = repo.join("bench/spark/install.sh");
    eprintln!(
        "[e2e] Spark baseline: {} (first run: a few minutes)",
        script.display()
    );
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let jars = python
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("the venv's python is not in DIR/venv/bin")?
        .join("jars");
    let version = Command::new(&python)
        .args(["-c", "import pyspark; print(pyspark.__version__)"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(SparkInstall {
        python,
        jars,
        version,
    })
}

/// What the script reports.
#[derive(Debug)]
pub enum SparkEvent {
    /// The query started.
    Ready,
    /// A micro-batch reached the sink; `records` read so far.
    Batch { records: u64 },
    /// The marker user's row changed: its expense count, at wall time `ms`.
    Mark { count: u64, ms: i64 },
}

pub struct SparkProcess {
    guard: ChildGuard,
    events: mpsc::Receiver<(Instant, SparkEvent)>,
    /// When the query started (the `READY` line arrived).
    pub ready: Option<Instant>,
    pub started: Instant,
    /// Records the last batch covered.
    pub records: u64,
    /// What the harness calls it in messages.
    name: String,
}

impl SparkProcess {
    /// Starts the script on `source` (`--topic T` or `--pattern P`).
    pub fn start(
        install: &SparkInstall,
        repo: &Path,
        brokers: &str,
        source: &[String],
        marker_user: u64,
        checkpoint: &Path,
        log: &Path,
    ) -> Result<Self> {
        let mut command = Command::new(&install.python);
        command
            .arg(repo.join("bench/spark/aggregate.py"))
            .arg("--brokers")
            .arg(brokers)
            .args(source)
            .arg("--checkpoint")
            .arg(checkpoint)
            .arg("--jars")
            .arg(&install.jars)
            .arg("--marker-user")
            .arg(marker_user.to_string())
            .env("PYTHONUNBUFFERED", "1");
        Self::spawn("the Spark baseline", command, log)
    }

    /// Starts `command`, a program that prints the lines `aggregate.py` prints (the Kafka
    /// Streams baseline prints the same ones), and reads them on a thread of its own.
    pub fn spawn(name: &str, command: Command, log: &Path) -> Result<Self> {
        let started = Instant::now();
        let mut guard = ChildGuard::spawn(name, command, log, Stdio::piped())?;
        let stdout = guard
            .child_mut()
            .stdout
            .take()
            .with_context(|| format!("no stdout from {name}"))?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let at = Instant::now();
                let f: Vec<&str> = line.split_whitespace().collect();
                let event = match f.as_slice() {
                    ["READY", _] => SparkEvent::Ready,
                    ["BATCH", _, _, records] => match records.parse() {
                        Ok(records) => SparkEvent::Batch { records },
                        Err(_) => continue,
                    },
                    ["MARK", count, _, ms] => match (count.parse(), ms.parse()) {
                        (Ok(count), Ok(ms)) => SparkEvent::Mark { count, ms },
                        _ => continue,
                    },
                    _ => continue,
                };
                if tx.send((at, event)).is_err() {
                    return;
                }
            }
        });
        Ok(SparkProcess {
            guard,
            events,
            ready: None,
            started,
            records: 0,
            name: name.to_string(),
        })
    }

    /// Handles events until `until` says stop or `timeout` passes; marks go to `marks`.
    fn pump(
        &mut self,
        timeout: Duration,
        marks: &mut Vec<(u64, i64)>,
        mut until: impl FnMut(&Self) -> bool,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            check_stop()?;
            if until(self) {
                return Ok(Instant::now());
            }
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok((at, event)) => {
                    match event {
                        SparkEvent::Ready => self.ready = Some(at),
                        SparkEvent::Batch { records } => self.records = records,
                        SparkEvent::Mark { count, ms } => marks.push((count, ms)),
                    }
                    if until(self) {
                        return Ok(at);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.guard.check_alive()?,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.guard.check_alive()?;
                    bail!("{} closed its output", self.name);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {} (it has read {} records)",
                    self.name,
                    self.records
                );
            }
        }
    }

    /// Waits for the query to start.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Instant> {
        let mut marks = Vec::new();
        self.pump(timeout, &mut marks, |s| s.ready.is_some())
    }

    /// Waits until a batch covering at least `records` records has reached the sink; returns
    /// when its line arrived.
    pub fn wait_records(
        &mut self,
        records: u64,
        timeout: Duration,
        marks: &mut Vec<(u64, i64)>,
    ) -> Result<Instant> {
        self.pump(timeout, marks, |s| s.records >= records)
    }

    /// Collects the marker rows that arrive within `d`.
    pub fn collect_marks(&mut self, d: Duration, marks: &mut Vec<(u64, i64)>) -> Result<()> {
        let end = Instant::now() + d;
        match self.pump(d + Duration::from_secs(1), marks, |_| Instant::now() >= end) {
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The process group of the driver.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Peak RSS of the driver (Python and the JVM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        group_peak_rss_kib(self.guard.pid())
    }

    pub fn stop(mut self) {
        self.guard.stop(Duration::from_secs(15));
    }
}
