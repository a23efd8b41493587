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

use crate::support::stream::{
    KillOnDrop, RestartService, StreamRun, rss_kib, service_pid, services_kit, status,
};

const USERS: u64 = 100;
const EVENTS: u64 = 100_000;
const OUTAGE: Duration = Duration::from_secs(30);

#[test]
fn thirty_seconds_without_cassandra_then_exact_again() {
    let _serial = crate::serial();
    let mut run = StreamRun::new("spendflow_it_outage");
    run.engine_args = vec!["--checkpoint-interval".into(), "2s".into()];
    let grpc = run.grpc.clone();
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // The generator's defaults (no seed, no corrections), only 1% malformed records.
    let mut generator = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args([
                "generate",
                "--mysql",
                &run.mysql_url,
                "--brokers",
                &run.brokers,
            ])
            .args([
                "--topic-prefix",
                &run.prefix(),
                "--users",
                &USERS.to_string(),
            ])
            .args(["--events", &EVENTS.to_string(), "--rate", "2000"])
            .args(["--bad-rate", "0.01", "--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut engine = KillOnDrop(run.engine());
    let log_tail = || run.log_tail();

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

    let mut truth = MySqlTruth::connect(&run.mysql_url).unwrap();
    let mut served = GrpcServed::connect(&grpc).unwrap();
    let report = verify::verify(&mut truth, &mut served, &VerifyOptions::default()).unwrap();
    eprintln!("gRPC: {report}");
    assert!(report.is_ok(), "{report}");
    // (An open MySQL session would hold the database's metadata lock at the DROP below.)
    drop((truth, served));

    run.sigterm(&mut engine);
    let log = std::fs::read_to_string(run.log_path()).unwrap_or_default();
    let recovered = log
        .lines()
        .find(|l| l.contains("Cassandra writes succeed again"));
    assert!(
        recovered.is_some(),
        "the sink never said it recovered:\n{}",
        log_tail()
    );
    eprintln!("{}", recovered.unwrap_or_default());
    assert!(
        run.verify_cassandra(),
        "verify --cassandra found mismatches"
    );

    run.clean_up(&runtime);
}
