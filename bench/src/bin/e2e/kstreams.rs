//! The Kafka Streams baseline: `bench/kstreams` (one Java class, `KStreamsBaseline`), built on
//! first use by `bench/kstreams/build.sh` into `target/bench/kstreams` and run as a child JVM.
//! It prints the same `READY`/`BATCH`/`MARK` lines as the Spark script, so the harness reads it
//! with the same [`SparkProcess`] reader; its per-user totals go to a file for the check.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::fold::UserTotals;
use crate::spark::SparkProcess;

/// The Java heap of the baseline (its RocksDB stores live outside it).
pub const JAVA_HEAP: &str = "-Xmx1g";

/// The built baseline: the classpath to run it with, and the Kafka Streams version.
#[derive(Clone, Debug)]
pub struct KStreamsInstall {
    pub classpath: String,
    pub version: String,
}

/// Runs `bench/kstreams/build.sh` (idempotent: quick when already built).
pub fn install(repo: &Path) -> Result<KStreamsInstall> {
    let script = repo.join("bench/kstreams/build.sh");
    eprintln!(
        "[e2e] Kafka Streams baseline: {} (first run: a minute or two)",
        script.display()
    );
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "the Kafka Streams baseline did not build: {} failed ({}); its Maven output is \
             above. Fix it, or run without it: --no-kstreams",
            script.display(),
            out.status
        );
    }
    let classpath = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let lib = classpath
        .split(':')
        .find_map(|p| p.strip_suffix("/*"))
        .map(PathBuf::from)
        .context("build.sh printed no lib/* classpath entry")?;
    let version = std::fs::read_dir(&lib)
        .with_context(|| format!("read {}", lib.display()))?
        .flatten()
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("kafka-streams-")
                .and_then(|v| v.strip_suffix(".jar"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    Ok(KStreamsInstall { classpath, version })
}

/// What one baseline process is started with.
pub struct KStreamsRun<'a> {
    pub brokers: &'a str,
    /// `--topic T` or `--pattern P`.
    pub source: &'a [String],
    pub marker_user: u64,
    /// Also the prefix of its internal topics (deleted with the run's topics).
    pub app_id: String,
    pub state_dir: PathBuf,
    pub threads: usize,
    /// With `totals`: write every user's totals there once the results cover this many records.
    pub expect: u64,
    pub totals: Option<PathBuf>,
}

/// Starts the baseline; stderr goes to `log`.
pub fn start(install: &KStreamsInstall, run: &KStreamsRun<'_>, log: &Path) -> Result<SparkProcess> {
    std::fs::create_dir_all(&run.state_dir)?;
    let mut command = Command::new("java");
    command
        .arg(JAVA_HEAP)
        .arg("-cp")
        .arg(&install.classpath)
        .arg("spendflow.bench.KStreamsBaseline")
        .arg("--brokers")
        .arg(run.brokers)
        .args(run.source)
        .arg("--app-id")
        .arg(&run.app_id)
        .arg("--state-dir")
        .arg(&run.state_dir)
        .arg("--marker-user")
        .arg(run.marker_user.to_string())
        .arg("--threads")
        .arg(run.threads.to_string())
        .arg("--expect")
        .arg(run.expect.to_string());
    if let Some(t) = &run.totals {
        command.arg("--totals").arg(t);
    }
    SparkProcess::spawn("the Kafka Streams baseline", command, log)
}

/// The per-user totals the baseline wrote (`user total count` lines).
pub fn read_totals(path: &Path) -> Result<UserTotals> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut out = UserTotals::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [user, total, count] = f.as_slice() else {
            bail!("bad line in {}: {line:?}", path.display());
        };
        let (total, count): (i64, i64) = (total.parse()?, count.parse()?);
        // The served state has no row for a user whose expenses were all deleted.
        if (total, count) != (0, 0) {
            out.insert(user.parse()?, (total, count));
        }
    }
    Ok(out)
}
