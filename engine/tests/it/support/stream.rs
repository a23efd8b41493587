//! End-to-end runs against the real services, shared by the crash and outage tests
//! (`crash_recovery.rs`, `cassandra_outage.rs`, `chaos_kafka.rs`): the real `spendflow generate`
//! streaming into Kafka (ground truth in MySQL), the real `spendflow run` reading it with the
//! Cassandra sink and checkpoints, and the checks afterwards (gRPC and Cassandra against MySQL,
//! the dead-letter topic against the malformed records the seeded simulator produced).
//!
//! Also the services kit's processes: the pid of a service (to kill it) and a guard that starts
//! it again whatever happens to the test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spendflow_engine::generate::GenerateConfig;
use spendflow_engine::source::generator::Simulator;
use spendflow_proto::v1::GetStatusRequest;
use spendflow_proto::v1::admin_client::AdminClient;

use super::{service_env, unique_name};

/// The repository's root.
pub fn repo() -> PathBuf {
    // The parent, not `engine/..`: paths built from it are compared with the command lines of
    // the kit's processes, which name `<repo>/target/services/...` as the kit resolved it.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the engine crate lives in the repository")
        .to_path_buf()
}

/// Where the services kit keeps its services: `$SPENDFLOW_SERVICES_DIR`, or the kit's default
/// `<repo>/target/services` (where `make test` starts them).
pub fn services_dir() -> PathBuf {
    let dir = std::env::var("SPENDFLOW_SERVICES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target/services"));
    // Resolved like the kit resolves it, so it matches the services' command lines.
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// `docker/native/services <args>` (with the same `SPENDFLOW_SERVICES_DIR` as [`services_dir`]).
pub fn services_kit(args: &[&str]) -> std::process::ExitStatus {
    Command::new(repo().join("docker/native/services"))
        .args(args)
        .env("SPENDFLOW_SERVICES_DIR", services_dir())
        .status()
        .expect("run docker/native/services")
}

/// The pid of the kit's `service` (`kafka`, `cassandra`, ...), from its pid file; checked to be
/// alive and to be that service (its command line names the service's directory), as the kit
/// itself does, so a stale pid file never gets another process killed.
#[track_caller]
pub fn service_pid(service: &str) -> u32 {
    let dir = services_dir().join(service);
    let file = dir.join("pid");
    let pid: u32 = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| {
            panic!(
                "the kit's {service} pid file {} ({e}): is {service} started by docker/native/services \
                 with this SPENDFLOW_SERVICES_DIR?",
                file.display()
            )
        })
        .trim()
        .parse()
        .expect("a pid in the pid file");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default();
    assert!(
        cmdline.contains(&*dir.to_string_lossy()),
        "pid {pid} from {} is not the kit's {service} (command line: {cmdline:?})",
        file.display()
    );
    pid
}

/// Starts the kit's service again when dropped, so a failing test never leaves it down for the
/// tests that run after it (`services up` does nothing when it is up already).
pub struct RestartService(pub &'static str);

impl Drop for RestartService {
    fn drop(&mut self) {
        let _ = services_kit(&["up", self.0]);
    }
}

/// A child process that is killed and reaped when dropped, so a failing test leaves no engine
/// or generator running into the tests after it.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Both fail harmlessly once the child has been waited for.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The engine's status over gRPC, if it answers.
pub fn status(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
) -> Option<spendflow_proto::v1::GetStatusResponse> {
    runtime.block_on(async {
        let mut client = AdminClient::connect(format!("http://{addr}")).await.ok()?;
        Some(
            client
                .get_status(GetStatusRequest {})
                .await
                .ok()?
                .into_inner(),
        )
    })
}

/// The resident memory of process `pid` in KiB (`VmRSS` in `/proc/PID/status`), if it is alive.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Messages in the topics whose names start with `prefix` (sum of high minus low watermarks).
/// A topic that has no leader yet (just created, or the broker is restarting) counts as empty.
pub fn messages_in(brokers: &str, prefix: &str) -> u64 {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let Ok(metadata) = consumer.fetch_metadata(None, Duration::from_secs(10)) else {
        return 0;
    };
    let mut total = 0;
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(prefix))
    {
        for p in topic.partitions() {
            if let Ok((low, high)) =
                consumer.fetch_watermarks(topic.name(), p.id(), Duration::from_secs(10))
            {
                total += (high - low) as u64;
            }
        }
    }
    total
}

/// What `spendflow generate` is asked to produce (per-user layout). The same settings give the
/// same records, so the test knows which ones are malformed ([`Generation::malformed`]).
#[derive(Clone, Debug)]
pub struct Generation {
    pub users: u64,
    pub events: u64,
    pub seed: u64,
    /// Records per second.
    pub rate: u64,
    pub bad_rate: f64,
    pub correction_rate: f64,
    pub delete_rate: f64,
    pub duplicate_rate: f64,
    pub late_rate: f64,
}

impl Generation {
    /// Corrections, deletes, duplicates, late events and 1% malformed records.
    pub fn messy(users: u64, events: u64, seed: u64, rate: u64) -> Generation {
        Generation {
            users,
            events,
            seed,
            rate,
            bad_rate: 0.01,
            correction_rate: 0.05,
            delete_rate: 0.02,
            duplicate_rate: 0.02,
            late_rate: 0.05,
        }
    }

    /// The bytes of every malformed record among the first `events`, sorted.
    pub fn malformed(&self, mysql_url: &str, brokers: &str) -> Vec<Vec<u8>> {
        let mut c = GenerateConfig::new(mysql_url, brokers);
        c.simulator.seed = self.seed;
        c.simulator.users = self.users;
        c.simulator.bad_rate = self.bad_rate;
        c.simulator.correction_rate = self.correction_rate;
        c.simulator.delete_rate = self.delete_rate;
        c.simulator.duplicate_rate = self.duplicate_rate;
        c.simulator.late_rate = self.late_rate;
        let mut simulator = Simulator::new(c.simulator).unwrap();
        let mut malformed: Vec<Vec<u8>> = (0..self.events)
            .map(|_| simulator.next_record())
            .filter(|g| g.kind.is_malformed())
            .map(|g| g.bytes)
            .collect();
        malformed.sort();
        malformed
    }
}

/// One end-to-end run: its names (MySQL database, topics, keyspace), checkpoint directory,
/// gRPC address and the engine's log.
pub struct StreamRun {
    pub brokers: String,
    pub cassandra: String,
    pub mysql_url: String,
    pub name: String,
    pub keyspace: String,
    pub checkpoints: tempfile::TempDir,
    pub grpc: String,
    /// Extra arguments for `spendflow run` (after the common ones).
    pub engine_args: Vec<String>,
    /// Extra arguments for `spendflow generate` (after the common ones).
    pub generator_args: Vec<String>,
}

impl StreamRun {
    /// Unique names starting with `prefix`, a free port for gRPC; creates the dead-letter topic.
    pub fn new(prefix: &str) -> StreamRun {
        let base = service_env("SPENDFLOW_MYSQL");
        let name = unique_name(prefix);
        let (head, _) = base.rsplit_once('/').expect("a MySQL URL with a database");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let run = StreamRun {
            brokers: service_env("SPENDFLOW_KAFKA"),
            cassandra: service_env("SPENDFLOW_CASSANDRA"),
            mysql_url: format!("{head}/{name}"),
            keyspace: name.clone(),
            name,
            checkpoints: tempfile::tempdir().unwrap(),
            grpc: format!("127.0.0.1:{port}"),
            engine_args: Vec::new(),
            generator_args: Vec::new(),
        };
        super::create_topics(&run.brokers, &[(run.dead_letter_topic(), 1)]);
        run
    }

    /// The per-user topics' prefix.
    pub fn prefix(&self) -> String {
        format!("{}.user.", self.name)
    }

    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dead-letter", self.name)
    }

    /// Starts `spendflow generate` (resumes it, when started again with the same settings).
    pub fn generator(&self, g: &Generation) -> Child {
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["generate", "--mysql", &self.mysql_url])
            .args(["--brokers", &self.brokers])
            .args(["--topic-prefix", &self.prefix()])
            .args(["--users", &g.users.to_string()])
            .args(["--events", &g.events.to_string()])
            .args(["--seed", &g.seed.to_string()])
            .args(["--bad-rate", &g.bad_rate.to_string()])
            .args(["--correction-rate", &g.correction_rate.to_string()])
            .args(["--delete-rate", &g.delete_rate.to_string()])
            .args(["--duplicate-rate", &g.duplicate_rate.to_string()])
            .args(["--late-rate", &g.late_rate.to_string()])
            .args(["--rate", &g.rate.to_string()])
            .args(&self.generator_args)
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_to("generate.log"))
            .spawn()
            .expect("start the generator")
    }

    /// Starts `spendflow run -w 2` on the per-user topics with the Cassandra sink and
    /// checkpoints; its log is appended to [`StreamRun::log_path`].
    pub fn engine(&self) -> Child {
        let pattern = format!("{}[0-9]+", regex::escape(&self.prefix()));
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["run", "-w", "2", "--grpc", &self.grpc])
            .args(["--input", &format!("kafka:{}", self.brokers)])
            .args(["--topic-pattern", &pattern])
            .args(["--user-topic-prefix", &self.prefix()])
            .args(["--discovery-interval-ms", "300"])
            .args(["--dead-letter-topic", &self.dead_letter_topic()])
            .args(["--sink", "cassandra", "--cassandra", &self.cassandra])
            .args(["--keyspace", &self.keyspace])
            .arg("--checkpoint-dir")
            .arg(self.checkpoints.path())
            .args(&self.engine_args)
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_to("engine.log"))
            .spawn()
            .expect("start the engine")
    }

    fn log_to(&self, extension: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.checkpoints.path().with_extension(extension))
            .unwrap()
    }

    /// The engines' log, appended run after run (beside the checkpoint directory).
    pub fn log_path(&self) -> PathBuf {
        self.checkpoints.path().with_extension("engine.log")
    }

    /// The generators' log (warnings and errors).
    pub fn generator_log_path(&self) -> PathBuf {
        self.checkpoints.path().with_extension("generate.log")
    }

    /// The last 40 lines of the engine's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 40)
    }

    /// Sends SIGTERM and waits (at most 60 s) for a clean exit.
    pub fn sigterm(&self, child: &mut Child) {
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the engine exited with {status} after SIGTERM:\n{}",
                    self.log_tail()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still running 60 s after SIGTERM:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `spendflow verify --cassandra`: whether the Cassandra tables agree with MySQL (its
    /// report is printed).
    pub fn verify_cassandra(&self) -> bool {
        let verify = Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["verify", "--mysql", &self.mysql_url])
            .args(["--cassandra", &self.cassandra, "--keyspace", &self.keyspace])
            .args(["--log", "warn"])
            .output()
            .unwrap();
        eprintln!(
            "Cassandra: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        verify.status.success()
    }

    /// Drops the run's MySQL database and Cassandra keyspace (call at the end of a passing
    /// test: a failed run keeps everything for a look).
    pub fn clean_up(&self, runtime: &tokio::runtime::Runtime) {
        if let Ok(mut conn) = mysql::Conn::new(mysql::Opts::from_url(&self.mysql_url).unwrap()) {
            use mysql::prelude::Queryable;
            let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
        }
        runtime.block_on(async {
            if let Ok(session) = spendflow_engine::cassandra::connect(&self.cassandra).await {
                let _ = session
                    .query(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace))
                    .await;
            }
        });
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
