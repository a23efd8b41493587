//! Cluster mode with the real binary (issue 15): free ports, the hostfile, processes started
//! from it (`spendflow run -w W --cluster FILE --process I ...`), waiting until every process
//! says it is caught up, killing and stopping processes, and everything one process answers
//! (the acceptance compares these answers between processes and runs).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use spendflow_proto::v1 as pb;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use tonic::transport::Channel;

use super::stream::{KillOnDrop, StreamRun, status, tail};

/// `n` distinct free TCP ports on 127.0.0.1: bound all at once (so they differ), released on
/// return. Another program could take one before the engine binds it; that shows as a bind
/// error in the engine's log, not as a wrong answer.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A hostfile: one line per process, `TIMELY_ADDR GRPC_ADDR`.
#[derive(Clone, Debug)]
pub struct Hostfile {
    pub path: PathBuf,
    pub timely: Vec<String>,
    pub grpc: Vec<String>,
}

impl Hostfile {
    /// Writes `<dir>/<name>` for `n` processes on 127.0.0.1 with free ports (and a comment
    /// line and a blank line, which the parser must skip).
    pub fn write(dir: &Path, name: &str, n: usize) -> Hostfile {
        let ports = free_ports(2 * n);
        let timely: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", ports[i])).collect();
        let grpc: Vec<String> = (0..n)
            .map(|i| format!("127.0.0.1:{}", ports[n + i]))
            .collect();
        let mut text = format!("# {n} spendflow processes: TIMELY_ADDR GRPC_ADDR\n\n");
        for (t, g) in timely.iter().zip(&grpc) {
            text.push_str(&format!("{t} {g}\n"));
        }
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write the hostfile");
        Hostfile { path, timely, grpc }
    }

    pub fn processes(&self) -> usize {
        self.grpc.len()
    }
}

/// One running `spendflow run` (of a cluster, or on its own).
pub struct Process {
    /// Its index in the hostfile (0 for a process on its own).
    pub index: usize,
    /// Where it serves gRPC.
    pub grpc: String,
    /// Where it serves Prometheus metrics (`--metrics`).
    pub metrics: std::net::SocketAddr,
    /// Its log (stderr, appended run after run).
    pub log: PathBuf,
    pub child: KillOnDrop,
}

impl Process {
    /// The last 30 lines of its log.
    pub fn log_tail(&self) -> String {
        format!(
            "--- process {} ({}) log {}:\n{}",
            self.index,
            self.grpc,
            self.log.display(),
            tail(&self.log, 30)
        )
    }

    /// Its whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reaped.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// Sends SIGTERM (without waiting).
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM {}", self.child.id());
    }

    /// Its exit status and how long it took, if it exits within `limit` (polled every 20 ms).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some((status, started.elapsed()));
            }
            if started.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the log")
}

/// Starts `spendflow run -w WORKERS --metrics METRICS ARGS --log info`, stderr appended to
/// `log`.
fn spawn(
    workers: usize,
    metrics: std::net::SocketAddr,
    cluster: &[String],
    args: &[String],
    log: &Path,
) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["run", "-w", &workers.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(cluster)
            .args(args)
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(log))
            .spawn()
            .expect("start spendflow run"),
    )
}

/// One process on its own: `spendflow run -w WORKERS --grpc <free port> ARGS` (`--metrics`
/// on another free port), its log
/// `<log_dir>/<tag>.log`.
pub fn start_single(workers: usize, args: &[String], log_dir: &Path, tag: &str) -> Process {
    let ports = free_ports(2);
    let grpc = format!("127.0.0.1:{}", ports[0]);
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], ports[1]));
    let log = log_dir.join(format!("{tag}.log"));
    let child = spawn(
        workers,
        metrics,
        &["--grpc".into(), grpc.clone()],
        args,
        &log,
    );
    Process {
        index: 0,
        grpc,
        metrics,
        log,
        child,
    }
}

/// Every process of `hostfile`: `spendflow run -w WORKERS --cluster FILE --process I ARGS`
/// (no `--grpc`: each serves on its line's second column; `--metrics` on a free port of its
/// own), logs `<log_dir>/<tag>-p<I>.log`.
pub fn start_cluster(
    hostfile: &Hostfile,
    workers: usize,
    args: &[String],
    log_dir: &Path,
    tag: &str,
) -> Vec<Process> {
    let ports = free_ports(hostfile.processes());
    (0..hostfile.processes())
        .map(|i| {
            let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], ports[i]));
            let log = log_dir.join(format!("{tag}-p{i}.log"));
            let cluster = [
                "--cluster".to_string(),
                hostfile.path.display().to_string(),
                "--process".to_string(),
                i.to_string(),
            ];
            Process {
                index: i,
                grpc: hostfile.grpc[i].clone(),
                metrics,
                child: spawn(workers, metrics, &cluster, args, &log),
                log,
            }
        })
        .collect()
}

/// The tails of every process's log, for failure messages.
pub fn log_tails(processes: &[Process]) -> String {
    processes
        .iter()
        .map(Process::log_tail)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the statuses account for exactly `expected` records read: every process reports
/// the cluster's total (then each says `expected`) or its own share (then they add up to it).
pub fn read_exactly(statuses: &[pb::GetStatusResponse], expected: u64) -> bool {
    statuses.iter().all(|s| s.records_read == expected)
        || statuses.iter().map(|s| s.records_read).sum::<u64>() == expected
}

/// The first process that has exited, with its status.
pub fn exited(processes: &mut [Process]) -> Option<(usize, ExitStatus)> {
    processes.iter_mut().find_map(|p| {
        p.child
            .try_wait()
            .expect("try_wait")
            .map(|exit| (p.index, exit))
    })
}

/// How long the records read may add up while some process has not yet said `caught_up`,
/// or every process has said it while the records read do not add up, before the wait fails.
const SETTLE: Duration = Duration::from_secs(60);

/// Waits (at most `secs`) until the records read add up to exactly `expected`
/// ([`read_exactly`]) and every process has answered `Admin/GetStatus` with `caught_up` since
/// they do (each at some poll, not necessarily all at the same one: in cluster mode each
/// process's `caught_up` gathers every process's, and a process's own flag was seen to flicker
/// between polls while nothing was left to read; the answers are compared with MySQL
/// afterwards, so a process that was not really caught up still fails the test). Fails the
/// test if a process exits meanwhile, or if either condition holds for [`SETTLE`] without the
/// other. Returns the last statuses.
pub fn wait_caught_up(
    runtime: &tokio::runtime::Runtime,
    processes: &mut [Process],
    expected: u64,
    secs: u64,
) -> Vec<pb::GetStatusResponse> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut said_caught_up = vec![false; processes.len()];
    let mut added_up_since: Option<Instant> = None;
    let mut all_said_since: Option<Instant> = None;
    let mut flickers = 0;
    loop {
        if let Some((i, exit)) = exited(processes) {
            panic!(
                "process {i} exited with {exit} before it caught up:\n{}",
                log_tails(processes)
            );
        }
        let statuses: Vec<Option<pb::GetStatusResponse>> =
            processes.iter().map(|p| status(runtime, &p.grpc)).collect();
        let brief = || -> Vec<String> {
            statuses
                .iter()
                .map(|s| match s {
                    Some(s) => format!(
                        "caught_up {} read {} epoch {:?} partitions {}",
                        s.caught_up,
                        s.records_read,
                        s.as_of.as_ref().map(|a| a.epoch),
                        s.partitions.len()
                    ),
                    None => "no answer".into(),
                })
                .collect()
        };
        let all: Vec<pb::GetStatusResponse> = statuses.iter().flatten().cloned().collect();
        let added_up = all.len() == processes.len() && read_exactly(&all, expected);
        if added_up {
            added_up_since.get_or_insert_with(Instant::now);
            for (said, s) in said_caught_up.iter_mut().zip(&statuses) {
                let now = s.as_ref().is_some_and(|s| s.caught_up);
                if *said && !now {
                    flickers += 1;
                }
                *said |= now;
            }
        } else {
            added_up_since = None;
            said_caught_up.iter_mut().for_each(|s| *s = false);
        }
        if statuses
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s.caught_up))
        {
            all_said_since.get_or_insert_with(Instant::now);
        } else {
            all_said_since = None;
        }
        if added_up && said_caught_up.iter().all(|s| *s) {
            eprintln!(
                "{} process(es) caught up with {expected} records in {:?} ({flickers} \
                 caught_up flag(s) seen true, then false)",
                processes.len(),
                started.elapsed()
            );
            return all;
        }
        for (what, since) in [
            (
                "the records read add up, but not every process said caught_up",
                added_up_since,
            ),
            (
                "every process says caught_up, but the records read do not add up",
                all_said_since,
            ),
        ] {
            assert!(
                since.is_none_or(|t| t.elapsed() < SETTLE),
                "{what} for {SETTLE:?} ({expected} expected): {:?}\n{}",
                brief(),
                log_tails(processes)
            );
        }
        assert!(
            Instant::now() < deadline,
            "not caught up with {expected} records in {secs} s: {:?}\n{}",
            brief(),
            log_tails(processes)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to every process at once, then waits (at most 60 s each) for them to exit; fails
/// the test if one does not exit or exits non-zero.
pub fn sigterm_all(processes: &mut [Process]) {
    for p in processes.iter() {
        p.sigterm();
    }
    for i in 0..processes.len() {
        match processes[i].wait_exit(Duration::from_secs(60)) {
            Some((exit, _)) => assert!(
                exit.success(),
                "process {i} exited with {exit} after SIGTERM:\n{}",
                log_tails(processes)
            ),
            None => panic!(
                "process {i} still running 60 s after SIGTERM:\n{}",
                log_tails(processes)
            ),
        }
    }
}

/// The arguments [`StreamRun::engine`] gives `spendflow run` (per-user topics, dead letters,
/// Cassandra sink, checkpoints, the run's extra arguments), without `-w` and `--grpc`.
pub fn stream_args(run: &StreamRun) -> Vec<String> {
    let pattern = format!("{}[0-9]+", regex::escape(&run.prefix()));
    let mut args: Vec<String> = [
        "--input",
        &format!("kafka:{}", run.brokers),
        "--topic-pattern",
        &pattern,
        "--user-topic-prefix",
        &run.prefix(),
        "--discovery-interval-ms",
        "300",
        "--dead-letter-topic",
        &run.dead_letter_topic(),
        "--sink",
        "cassandra",
        "--cassandra",
        &run.cassandra,
        "--keyspace",
        &run.keyspace,
        "--checkpoint-dir",
        &run.checkpoints.path().display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(run.engine_args.iter().cloned());
    args
}

/// Everything one process answers about a run's users: `GetUserSummary` and
/// `GetUserWindows` (months and days) of every user, `TopSpenders` of all users, and every
/// page of `ListUserSummaries` (small pages, so paging crosses processes). `as_of` is left
/// out: epoch numbers differ between runs.
#[derive(Debug, PartialEq)]
pub struct Answers {
    /// Per user: the summary, or the gRPC code it was refused with.
    pub summaries: BTreeMap<u64, Result<pb::UserSummary, tonic::Code>>,
    /// Per user: month buckets over the 100 years up to its last event.
    pub months: BTreeMap<u64, Result<Vec<pb::Total>, tonic::Code>>,
    /// Per user: day buckets over the 3,000 days up to its last event.
    pub days: BTreeMap<u64, Result<Vec<pb::Total>, tonic::Code>>,
    pub top: Vec<pb::Spender>,
    pub listed: Vec<pb::UserSummary>,
}

fn month_key(month: i32) -> String {
    let (y, m) = spendflow_operators::model::split_month(month);
    format!("{y:04}-{m:02}")
}

fn day_key(day: i32) -> String {
    let (y, m, d) = spendflow_operators::model::civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// [`Answers`] of the process serving gRPC at `addr`, for users `1..=users`.
pub fn answers(runtime: &tokio::runtime::Runtime, addr: &str, users: u64) -> Answers {
    runtime.block_on(async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let mut client = ExpenseQueryClient::new(channel);
        let mut out = Answers {
            summaries: BTreeMap::new(),
            months: BTreeMap::new(),
            days: BTreeMap::new(),
            top: Vec::new(),
            listed: Vec::new(),
        };
        for user_id in 1..=users {
            let summary = client
                .get_user_summary(pb::GetUserSummaryRequest {
                    user_id,
                    consistency: None,
                })
                .await
                .map(|r| r.into_inner().summary.unwrap_or_default())
                .map_err(|s| s.code());
            let last_day = summary
                .as_ref()
                .ok()
                .map(|s| spendflow_operators::model::day_of(s.last_event_ms))
                .unwrap_or(0);
            let last_month = spendflow_operators::model::month_of_day(last_day);
            let windows = |granularity: pb::Granularity, from: String, to: String| {
                let mut client = client.clone();
                async move {
                    client
                        .get_user_windows(pb::GetUserWindowsRequest {
                            user_id,
                            granularity: granularity.into(),
                            from,
                            to,
                            consistency: None,
                        })
                        .await
                        .map(|r| r.into_inner().windows)
                        .map_err(|s| s.code())
                }
            };
            let months = windows(
                pb::Granularity::Month,
                month_key(last_month - 1199),
                month_key(last_month),
            )
            .await;
            let days = windows(
                pb::Granularity::Day,
                day_key(last_day - 2999),
                day_key(last_day),
            )
            .await;
            out.summaries.insert(user_id, summary);
            out.months.insert(user_id, months);
            out.days.insert(user_id, days);
        }
        out.top = client
            .top_spenders(pb::TopSpendersRequest {
                limit: users.min(1000) as u32,
                consistency: None,
            })
            .await
            .unwrap_or_else(|e| panic!("TopSpenders at {addr}: {e}"))
            .into_inner()
            .spenders;
        let mut token = String::new();
        loop {
            let page = client
                .list_user_summaries(pb::ListUserSummariesRequest {
                    page_size: 7,
                    page_token: token.clone(),
                    consistency: None,
                })
                .await
                .unwrap_or_else(|e| panic!("ListUserSummaries at {addr}: {e}"))
                .into_inner();
            out.listed.extend(page.summaries);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        out
    })
}

/// Fails the test, naming the first difference, unless `got` (from `what`) equals `want`.
#[track_caller]
pub fn assert_same_answers(want: &Answers, got: &Answers, what: &str) {
    for (user, w) in &want.summaries {
        let g = got.summaries.get(user);
        assert_eq!(g, Some(w), "{what}: GetUserSummary of user {user}");
    }
    for (user, w) in &want.months {
        assert_eq!(
            got.months.get(user),
            Some(w),
            "{what}: GetUserWindows (months) of user {user}"
        );
    }
    for (user, w) in &want.days {
        assert_eq!(
            got.days.get(user),
            Some(w),
            "{what}: GetUserWindows (days) of user {user}"
        );
    }
    assert_eq!(got.top, want.top, "{what}: TopSpenders");
    assert_eq!(
        got.listed.len(),
        want.listed.len(),
        "{what}: ListUserSummaries lists a different number of users"
    );
    for (g, w) in got.listed.iter().zip(&want.listed) {
        assert_eq!(g, w, "{what}: ListUserSummaries, user {}", w.user_id);
    }
    assert!(got == want, "{what}: the answers differ");
}

/// The metric the lead's core exports: bytes timely sent to other processes.
pub const SENT_BYTES: &str = "spendflow_cluster_sent_bytes_total";

/// The sum of every sample of `metric` (all label sets) in a Prometheus text exposition, or
/// `None` if it has no sample.
pub fn metric_sum(exposition: &str, metric: &str) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue; // another metric whose name starts alike
        }
        if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}
