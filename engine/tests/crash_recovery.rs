//! Crash recovery against the real services: the generator streams 100,000 events (one topic per
//! user, with corrections, deletes, duplicates, late events and 1% malformed) into Kafka while
//! the engine — the real binary, with the Cassandra sink and checkpoints — is killed with
//! SIGKILL five times at random moments and restarted each time. At the end, the answers over
//! gRPC and the Cassandra tables both agree with MySQL exactly, and the dead-letter topic
//! holds each malformed record exactly once.
//!
//! The test prints its seed; `SPENDFLOW_CRASH_SEED=<seed>` repeats the same kill schedule.
//! Needs SPENDFLOW_KAFKA, SPENDFLOW_CASSANDRA and SPENDFLOW_MYSQL (`docker/native/services env`).

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spendflow_engine::generate::GenerateConfig;
use spendflow_engine::source::generator::Simulator;
use spendflow_engine::verify::grpc::GrpcServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, VerifyOptions};
use spendflow_proto::v1::GetStatusRequest;
use spendflow_proto::v1::admin_client::AdminClient;

use support::{create_topics, read_dead_letters, service_env, unique_name};

const USERS: u64 = 100;
const EVENTS: u64 = 100_000;
const KILLS: usize = 5;

struct Setup {
    brokers: String,
    cassandra: String,
    mysql_url: String,
    name: String,
    keyspace: String,
    checkpoints: tempfile::TempDir,
    grpc: String,
}

impl Setup {
    fn new() -> Setup {
        let base = service_env("SPENDFLOW_MYSQL");
        let name = unique_name("spendflow_it_crash");
        let (head, _) = base.rsplit_once('/').expect("a MySQL URL with a database");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Setup {
            brokers: service_env("SPENDFLOW_KAFKA"),
            cassandra: service_env("SPENDFLOW_CASSANDRA"),
            mysql_url: format!("{head}/{name}"),
            keyspace: name.clone(),
            name,
            checkpoints: tempfile::tempdir().unwrap(),
            grpc: format!("127.0.0.1:{port}"),
        }
    }

    fn prefix(&self) -> String {
        format!("{}.user.", self.name)
    }

    fn dead_letter_topic(&self) -> String {
        format!("{}.dead-letter", self.name)
    }

    fn generator(&self, seed: u64) -> Child {
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["generate", "--mysql", &self.mysql_url])
            .args(["--brokers", &self.brokers])
            .args(["--topic-prefix", &self.prefix()])
            .args(["--users", &USERS.to_string()])
            .args(["--events", &EVENTS.to_string()])
            .args(["--seed", &seed.to_string()])
            .args(["--bad-rate", "0.01", "--correction-rate", "0.05"])
            .args(["--delete-rate", "0.02", "--duplicate-rate", "0.02"])
            .args(["--late-rate", "0.05", "--rate", "5000"])
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the generator")
    }

    fn engine(&self) -> Child {
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
            .args(["--checkpoint-interval", "1s", "--epoch-interval-ms", "20"])
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log())
            .spawn()
            .expect("start the engine")
    }

    /// The engines' logs, appended run after run (printed when the test fails).
    fn log(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap()
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.checkpoints.path().with_extension("engine.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// The engine's status over gRPC, if it answers.
fn status(
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

fn messages_in(brokers: &str, prefix: &str) -> u64 {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut total = 0;
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(prefix))
    {
        for p in topic.partitions() {
            // A topic just created may not have a leader yet: it counts as empty for now.
            if let Ok((low, high)) =
                consumer.fetch_watermarks(topic.name(), p.id(), Duration::from_secs(10))
            {
                total += (high - low) as u64;
            }
        }
    }
    total
}

fn sigterm(child: &mut Child, setup: &Setup) {
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
                "the engine exited with {status} after SIGTERM"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still running 60 s after SIGTERM:\n{}",
            setup.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn killed_five_times_mid_stream_still_exact_in_grpc_cassandra_and_dead_letters() {
    let seed: u64 = std::env::var("SPENDFLOW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash_recovery seed {seed} (SPENDFLOW_CRASH_SEED={seed} repeats it)");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let setup = Setup::new();
    create_topics(&setup.brokers, &[(setup.dead_letter_topic(), 1)]);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // Kill points: random moments spread over the stream (by events in Kafka), plus a random
    // delay so a kill can land anywhere in an epoch, a checkpoint or a sink write.
    let mut points: Vec<u64> = (0..KILLS)
        .map(|_| rng.random_range(EVENTS / 20..EVENTS * 19 / 20))
        .collect();
    points.sort_unstable();
    let mut generator = setup.generator(seed % 1000);
    let mut engine = setup.engine();
    for (kill, point) in points.into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(120);
        while messages_in(&setup.brokers, &setup.prefix()) < point {
            assert!(
                Instant::now() < deadline,
                "the generator stalled before {point} events"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1_000)));
        assert!(
            engine.try_wait().unwrap().is_none(),
            "the engine exited on its own before kill {}:\n{}",
            kill + 1,
            setup.log_tail()
        );
        let read = status(&runtime, &setup.grpc).map(|s| s.records_read);
        engine.kill().unwrap(); // SIGKILL
        engine.wait().unwrap();
        eprintln!(
            "kill -9 #{} at ~{point} events produced; the engine had read {read:?}",
            kill + 1
        );
        // Sometimes restart at once, sometimes after a pause.
        if rng.random_bool(0.5) {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..1_000)));
        }
        engine = setup.engine();
    }
    let generated = generator.wait().unwrap();
    assert!(generated.success(), "the generator failed: {generated}");

    // Everything in Kafka read, and the state caught up with it.
    let in_kafka = messages_in(&setup.brokers, &setup.prefix());
    assert_eq!(in_kafka, EVENTS, "the generator wrote every event once");
    let deadline = Instant::now() + Duration::from_secs(180);
    let restarted = Instant::now();
    loop {
        let s = status(&runtime, &setup.grpc);
        if let Some(s) = &s
            && s.caught_up
            && s.records_read == in_kafka
        {
            eprintln!(
                "caught up {:?} after the generator finished: {} read, {} rejected",
                restarted.elapsed(),
                s.records_read,
                s.records_rejected
            );
            break;
        }
        assert!(
            engine.try_wait().unwrap().is_none(),
            "the engine exited on its own"
        );
        assert!(
            Instant::now() < deadline,
            "not caught up with {in_kafka} records: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // gRPC agrees with MySQL.
    let mut truth = MySqlTruth::connect(&setup.mysql_url).unwrap();
    let mut served = GrpcServed::connect(&setup.grpc).unwrap();
    let report = verify::verify(&mut truth, &mut served, &VerifyOptions::default()).unwrap();
    eprintln!("gRPC: {report}");
    assert!(report.is_ok(), "{report}");
    assert!(report.users_checked > USERS * 9 / 10, "{report}");
    let rejected = status(&runtime, &setup.grpc).unwrap().records_rejected;
    // (An open MySQL session would hold the database's metadata lock at the DROP below.)
    drop((truth, served));

    // A clean stop lets the sink write its last epochs; then Cassandra agrees with MySQL.
    sigterm(&mut engine, &setup);
    let verify = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["verify", "--mysql", &setup.mysql_url])
        .args([
            "--cassandra",
            &setup.cassandra,
            "--keyspace",
            &setup.keyspace,
        ])
        .args(["--log", "warn"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&verify.stdout);
    eprintln!(
        "Cassandra: {out}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success(),
        "verify --cassandra found mismatches"
    );

    // Each malformed record exactly once in the dead-letter topic, and counted once.
    let config = {
        let mut c = GenerateConfig::new(&setup.mysql_url, &setup.brokers);
        c.simulator.seed = seed % 1000;
        c.simulator.users = USERS;
        c.simulator.bad_rate = 0.01;
        c.simulator.correction_rate = 0.05;
        c.simulator.delete_rate = 0.02;
        c.simulator.duplicate_rate = 0.02;
        c.simulator.late_rate = 0.05;
        c
    };
    let mut simulator = Simulator::new(config.simulator.clone()).unwrap();
    let mut malformed: Vec<Vec<u8>> = (0..EVENTS)
        .map(|_| simulator.next_record())
        .filter(|g| g.kind.is_malformed())
        .map(|g| g.bytes)
        .collect();
    assert_eq!(rejected, malformed.len() as u64, "rejections counted once");
    let letters = read_dead_letters(&setup.brokers, &setup.dead_letter_topic(), malformed.len());
    let mut got: Vec<Vec<u8>> = letters.into_iter().map(|(bytes, _)| bytes).collect();
    got.sort();
    malformed.sort();
    assert_eq!(got.len(), malformed.len(), "each dead letter exactly once");
    assert!(
        got == malformed,
        "the dead letters are the malformed records"
    );

    // Clean up (a failed run keeps everything for a look).
    if let Ok(mut conn) = mysql::Conn::new(mysql::Opts::from_url(&setup.mysql_url).unwrap()) {
        use mysql::prelude::Queryable;
        let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{}`", setup.name));
    }
    runtime.block_on(async {
        if let Ok(session) = spendflow_engine::sink::cassandra::connect(&setup.cassandra).await {
            let _ = session
                .query(format!("DROP KEYSPACE IF EXISTS {}", setup.keyspace))
                .await;
        }
    });
}
