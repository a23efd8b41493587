//! Cassandra outage: while the generator streams into Kafka and the engine (the real binary,
//! with the Cassandra sink and checkpoints) reads it, Cassandra is killed, kept down for 30
//! seconds, and started again. The engine must not crash, its memory must stay bounded (the
//! sink holds the input back instead of queueing it), and once Cassandra is back both gRPC
//! and the Cassandra tables agree with MySQL.
//!
//! This test stops the kit's Cassandra for everyone, so it lives alone in its own test binary
//! (cargo runs test binaries one after another). Needs SPENDFLOW_KAFKA, SPENDFLOW_CASSANDRA and
//! SPENDFLOW_MYSQL (`docker/native/services env`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spendflow_engine::verify::grpc::GrpcServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, VerifyOptions};

use crate::support::stream::{KillOnDrop, RestartService, service_pid, services_kit, status};
use crate::support::{create_topics, service_env, unique_name};

const USERS: u64 = 100;
const EVENTS: u64 = 100_000;
const OUTAGE: Duration = Duration::from_secs(30);

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[test]
fn thirty_seconds_without_cassandra_then_exact_again() {
    let _serial = crate::serial();
    let brokers = service_env("SPENDFLOW_KAFKA");
    let cassandra = service_env("SPENDFLOW_CASSANDRA");
    let base = service_env("SPENDFLOW_MYSQL");
    let name = unique_name("spendflow_it_outage");
    let (head, _) = base.rsplit_once('/').expect("a MySQL URL with a database");
    let mysql_url = format!("{head}/{name}");
    let prefix = format!("{name}.user.");
    let dead_letters = format!("{name}.dead-letter");
    create_topics(&brokers, &[(dead_letters.clone(), 1)]);
    let checkpoints = tempfile::tempdir().unwrap();
    let grpc = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let mut generator = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["generate", "--mysql", &mysql_url, "--brokers", &brokers])
            .args(["--topic-prefix", &prefix, "--users", &USERS.to_string()])
            .args(["--events", &EVENTS.to_string(), "--rate", "2000"])
            .args(["--bad-rate", "0.01", "--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let log_path = checkpoints.path().with_extension("engine.log");
    let mut engine = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["run", "-w", "2", "--grpc", &grpc])
            .args(["--input", &format!("kafka:{brokers}")])
            .args([
                "--topic-pattern",
                &format!("{}[0-9]+", regex::escape(&prefix)),
            ])
            .args([
                "--user-topic-prefix",
                &prefix,
                "--discovery-interval-ms",
                "300",
            ])
            .args(["--dead-letter-topic", &dead_letters])
            .args([
                "--sink",
                "cassandra",
                "--cassandra",
                &cassandra,
                "--keyspace",
                &name,
            ])
            .arg("--checkpoint-dir")
            .arg(checkpoints.path())
            .args(["--checkpoint-interval", "2s", "--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let log_tail = || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    // Running normally for a while: the memory it needs with Cassandra up.
    let mut before = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        before = before.max(rss_kib(engine.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(250));
    }
    let read_before = status(&runtime, &grpc).map_or(0, |s| s.records_read);
    assert!(read_before > 0, "the engine reads nothing:\n{}", log_tail());

    // Cassandra down for 30 s while the generator keeps producing.
    let _restart = RestartService("cassandra");
    let pid = service_pid("cassandra");
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    eprintln!("Cassandra (pid {pid}) killed with {read_before} records read");
    let mut during = 0;
    let down = Instant::now();
    while down.elapsed() < OUTAGE {
        during = during.max(rss_kib(engine.id()).unwrap_or(0));
        assert!(
            engine.try_wait().unwrap().is_none(),
            "the engine exited during the outage:\n{}",
            log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let read_during = status(&runtime, &grpc).map_or(0, |s| s.records_read);
    let up = services_kit(&["up", "cassandra"]);
    assert!(up.success(), "Cassandra did not come back");
    eprintln!(
        "Cassandra back after {:?}; the engine read {read_during} records meanwhile",
        down.elapsed()
    );

    assert!(generator.wait().unwrap().success(), "the generator failed");
    let mut after = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        after = after.max(rss_kib(engine.id()).unwrap_or(0));
        let s = status(&runtime, &grpc);
        if s.as_ref()
            .is_some_and(|s| s.caught_up && s.records_read == EVENTS)
        {
            break;
        }
        assert!(
            engine.try_wait().unwrap().is_none(),
            "the engine exited after the outage:\n{}",
            log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "not caught up: {s:?}\n{}",
            log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "engine RSS: peak {} MiB before the outage, {} MiB during it, {} MiB after",
        before / 1024,
        during / 1024,
        after / 1024
    );
    // Bounded: the queue in front of the sink holds a few epochs, not the input.
    assert!(
        during < before * 2 + 256 * 1024,
        "memory grew during the outage: {before} KiB before, {during} KiB during"
    );

    let mut truth = MySqlTruth::connect(&mysql_url).unwrap();
    let mut served = GrpcServed::connect(&grpc).unwrap();
    let report = verify::verify(&mut truth, &mut served, &VerifyOptions::default()).unwrap();
    eprintln!("gRPC: {report}");
    assert!(report.is_ok(), "{report}");
    // (An open MySQL session would hold the database's metadata lock at the DROP below.)
    drop((truth, served));

    let ok = Command::new("kill")
        .args(["-TERM", &engine.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let exit = engine.wait().unwrap();
    assert!(
        exit.success(),
        "the engine exited with {exit}:\n{}",
        log_tail()
    );
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let recovered = log
        .lines()
        .find(|l| l.contains("Cassandra writes succeed again"));
    assert!(
        recovered.is_some(),
        "the sink never said it recovered:\n{}",
        log_tail()
    );
    eprintln!("{}", recovered.unwrap_or_default());
    let verify = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["verify", "--mysql", &mysql_url, "--cassandra", &cassandra])
        .args(["--keyspace", &name, "--log", "warn"])
        .output()
        .unwrap();
    eprintln!(
        "Cassandra: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success(),
        "verify --cassandra found mismatches"
    );

    if let Ok(mut conn) = mysql::Conn::new(mysql::Opts::from_url(&mysql_url).unwrap()) {
        use mysql::prelude::Queryable;
        let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"));
    }
    runtime.block_on(async {
        if let Ok(session) = spendflow_engine::sink::cassandra::connect(&cassandra).await {
            let _ = session
                .query(format!("DROP KEYSPACE IF EXISTS {name}"))
                .await;
        }
    });
}
