//! Small pieces every measurement uses: the Ctrl-C flag, child processes that never outlive the
//! harness, peak memory from `/proc`, and min/median/max and percentiles.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

static STOP: AtomicBool = AtomicBool::new(false);

/// Sets the stop flag on Ctrl-C or SIGTERM. Every wait in the harness checks it, so an
/// interrupted run unwinds normally and its guards stop the children and delete the topics.
pub fn install_stop_handler() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the signal handler")?;
    std::thread::Builder::new()
        .name("e2e-signals".into())
        .spawn(move || {
            runtime.block_on(async {
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
            });
            eprintln!("[e2e] interrupted: stopping the children and deleting the topics");
            STOP.store(true, Ordering::Release);
        })?;
    Ok(())
}

/// Fails if Ctrl-C was pressed.
pub fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Acquire) {
        bail!("interrupted");
    }
    Ok(())
}

/// Wall-clock milliseconds since the Unix epoch: the one clock the harness and the Spark
/// script (another process on the same machine) both read.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A child process in its own process group, stopped (SIGTERM, then SIGKILL after a grace
/// period) with its whole group when dropped, so neither an error nor Ctrl-C leaves an engine
/// or a Spark JVM behind. The group is the child's own (`process_group(0)`), so only processes
/// this harness started are signalled.
pub struct ChildGuard {
    child: Child,
    name: String,
}

impl ChildGuard {
    /// Starts `command` in a new process group, with stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path, stdout: Stdio) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let log_file = File::create(log).with_context(|| format!("create {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log_file)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("start {name} ({command:?})"))?;
        Ok(ChildGuard {
            child,
            name: name.to_string(),
        })
    }

    /// The child's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child itself (to take its stdout).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Fails if the child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early with {status}", self.name);
        }
        Ok(())
    }

    /// Stops the process group: SIGTERM, up to `grace` for the leader to exit, then SIGKILL
    /// for whatever of the group is left.
    pub fn stop(&mut self, grace: Duration) {
        let group = format!("-{}", self.child.id());
        if matches!(self.child.try_wait(), Ok(None)) {
            signal("-TERM", &group);
            let end = Instant::now() + grace;
            while Instant::now() < end {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The leader may be gone while group members (a JVM) are not.
        signal("-KILL", &group);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// `kill SIGNAL -- TARGET`; a target that no longer exists is fine.
fn signal(sig: &str, target: &str) {
    let _ = Command::new("kill")
        .args([sig, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Peak resident set size (`VmHWM`) of one process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sum of the peak resident set sizes of every live process in process group `pgid`, in KiB
/// (the Spark driver: the Python process and the JVM it launched).
pub fn group_peak_rss_kib(pgid: u32) -> u64 {
    group_members(pgid)
        .into_iter()
        .filter_map(peak_rss_kib)
        .sum()
}

/// The live processes of process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command (which may contain spaces) start after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(2).and_then(|g| g.parse().ok()) == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// CPU time (user + system) a process has used, in seconds (`/proc/PID/stat`, 100 ticks/s).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 of the line, utime 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU time of every live process in process group `pgid`, in seconds.
pub fn group_cpu_secs(pgid: u32) -> f64 {
    group_members(pgid).into_iter().filter_map(cpu_secs).sum()
}

/// A service's pid (`kafka`, `cassandra`), from the services kit's pid file.
pub fn service_pid(repo: &Path, service: &str) -> Option<u32> {
    let dir = std::env::var("SPENDFLOW_SERVICES_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo.join("target/services"));
    std::fs::read_to_string(dir.join(service).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The machine's CPU time so far, `(busy, total)` in ticks (`/proc/stat`, all cores).
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The share of the machine's CPU (0 to 1) busy between two [`machine_ticks`] readings.
pub fn machine_busy(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (before?, after?);
    (t1 > t0).then(|| (b1 - b0) as f64 / (t1 - t0) as f64)
}

/// The off-CPU share (0 to 1) of a process's `workers` worker threads over `wall_secs`: 1 −
/// their run time (`/proc/PID/task/TID/schedstat`, first field, ns) / (`workers` × wall).
/// The workers are the `workers` busiest threads whose name starts with `spendflow-work`
/// (timely's threads inherit the name of the `spendflow-workers` thread that starts them);
/// when no thread has that name, the `workers` busiest threads of the process.
pub fn workers_off_cpu(pid: u32, workers: usize, wall_secs: f64) -> Option<f64> {
    let mut named = Vec::new();
    let mut all = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let dir = entry.path();
        let Some(run_ns) = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.starts_with("spendflow-work") {
            named.push(run_ns);
        }
        all.push(run_ns);
    }
    let mut threads = if named.len() >= workers { named } else { all };
    threads.sort_unstable_by(|a, b| b.cmp(a));
    threads.truncate(workers);
    if threads.is_empty() || wall_secs <= 0.0 {
        return None;
    }
    let run_secs = threads.iter().sum::<u64>() as f64 / 1e9;
    Some((1.0 - run_secs / (threads.len() as f64 * wall_secs)).clamp(0.0, 1.0))
}

/// The value of an unlabelled Prometheus counter `name` at `http://ADDR/metrics` (a local
/// child's endpoint: one plain HTTP/1.0 GET).
pub fn scrape_counter(addr: &str, name: &str) -> Result<f64> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    // Summed over the series of that name (with or without labels).
    let values: Vec<f64> = body
        .lines()
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let series = key.split('{').next()?;
            (series == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .collect();
    if values.is_empty() {
        bail!("no {name} in the metrics at {addr}");
    }
    Ok(values.iter().sum())
}

/// The 1-minute load average.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Min, median and max of a set of measurements.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[v.len() - 1],
            n: v.len(),
        })
    }
}

/// The nearest-rank `p`-th percentile (0 to 100) of `values`.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_percentiles() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.0, 3.0, 3));
        assert_eq!(Spread::of(&[4.0, 1.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[]).is_none());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }
}
