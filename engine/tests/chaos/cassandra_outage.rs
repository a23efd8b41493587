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
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut generator = generator(&run);
    let mut engine = KillOnDrop(run.engine());

    let (before, read_before) = peak_rss_before_the_outage(&run, &runtime, &engine);
    // Started again whatever happens to the test.
    let _restart = RestartService("cassandra");
    let during = peak_rss_during_the_outage(&run, &runtime, &mut engine, read_before);
    assert!(generator.wait().unwrap().success(), "the generator failed");
    let after = peak_rss_until_caught_up(&run, &runtime, &mut engine);
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

    grpc_agrees_with_mysql(&run);
    stops_cleanly_having_recovered(&run, &mut engine);
    assert!(
        run.verify_cassandra(),
        "verify --cassandra found mismatches"
    );

    run.clean_up(&runtime);
}

/// `spendflow generate` with its defaults (no seed, no corrections) but 1% malformed records,
/// at 2000 records a second: long enough to outlast the outage.
fn generator(run: &StreamRun) -> KillOnDrop {
    KillOnDrop(
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
    )
}

/// Running normally for a while: the memory it needs with Cassandra up (peak RSS, KiB), and the
/// records read by then (some).
fn peak_rss_before_the_outage(
    run: &StreamRun,
    runtime: &tokio::runtime::Runtime,
    engine: &KillOnDrop,
) -> (u64, u64) {
    let mut before = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        before = before.max(rss_kib(engine.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(250));
    }
    let read_before = status(runtime, &run.grpc).map_or(0, |s| s.records_read);
    assert!(
        read_before > 0,
        "the engine reads nothing:\n{}",
        run.log_tail()
    );
    (before, read_before)
}

/// Cassandra down for 30 s (killed) while the generator keeps producing, then started again:
/// the engine's peak RSS meanwhile (KiB); it never exits.
fn peak_rss_during_the_outage(
    run: &StreamRun,
    runtime: &tokio::runtime::Runtime,
    engine: &mut KillOnDrop,
    read_before: u64,
) -> u64 {
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
            run.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let read_during = status(runtime, &run.grpc).map_or(0, |s| s.records_read);
    let up = services_kit(&["up", "cassandra"]);
    assert!(up.success(), "Cassandra did not come back");
    eprintln!(
        "Cassandra back after {:?}; the engine read {read_during} records meanwhile",
        down.elapsed()
    );
    during
}

/// Once Cassandra is back the engine reads every record and says it is caught up (within 4
/// minutes, never exiting): its peak RSS meanwhile (KiB).
fn peak_rss_until_caught_up(
    run: &StreamRun,
    runtime: &tokio::runtime::Runtime,
    engine: &mut KillOnDrop,
) -> u64 {
    let mut after = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        after = after.max(rss_kib(engine.id()).unwrap_or(0));
        let s = status(runtime, &run.grpc);
        if s.as_ref()
            .is_some_and(|s| s.caught_up && s.records_read == EVENTS)
        {
            return after;
        }
        assert!(
            engine.try_wait().unwrap().is_none(),
            "the engine exited after the outage:\n{}",
            run.log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "not caught up: {s:?}\n{}",
            run.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The engine's gRPC answers agree with MySQL.
fn grpc_agrees_with_mysql(run: &StreamRun) {
    let mut truth = MySqlTruth::connect(&run.mysql_url).unwrap();
    let mut served = GrpcServed::connect(&run.grpc).unwrap();
    let report = verify::verify(&mut truth, &mut served, &VerifyOptions::default()).unwrap();
    eprintln!("gRPC: {report}");
    assert!(report.is_ok(), "{report}");
    // (The sessions close here: an open MySQL session would hold the database's metadata lock
    // at the clean-up's DROP.)
}

/// SIGTERM ends the engine cleanly, and its log says the sink's writes succeeded again.
fn stops_cleanly_having_recovered(run: &StreamRun, engine: &mut KillOnDrop) {
    run.sigterm(engine);
    let log = std::fs::read_to_string(run.log_path()).unwrap_or_default();
    let recovered = log
        .lines()
        .find(|l| l.contains("Cassandra writes succeed again"));
    assert!(
        recovered.is_some(),
        "the sink never said it recovered:\n{}",
        run.log_tail()
    );
    eprintln!("{}", recovered.unwrap_or_default());
}
