//! Crash recovery against the real services: the generator streams 100,000 events (one topic per
//! user, with corrections, deletes, duplicates, late events and 1% malformed) into Kafka while
//! the engine — the real binary, with the Cassandra sink and checkpoints — is killed with
//! SIGKILL five times at random moments and restarted each time. At the end, the answers over
//! gRPC and the Cassandra tables both agree with MySQL exactly, and the dead-letter topic
//! holds each malformed record exactly once.
//!
//! The test prints its seed; `SPENDFLOW_CRASH_SEED=<seed>` repeats the same kill schedule.
//! Needs SPENDFLOW_KAFKA, SPENDFLOW_CASSANDRA and SPENDFLOW_MYSQL (`docker/native/services env`).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spendflow_engine::verify::grpc::GrpcServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, VerifyOptions};

use crate::support::read_dead_letters;
use crate::support::stream::{Generation, StreamRun, messages_in, status};

const USERS: u64 = 100;
const EVENTS: u64 = 100_000;
const KILLS: usize = 5;

#[test]
fn killed_five_times_mid_stream_still_exact_in_grpc_cassandra_and_dead_letters() {
    let seed: u64 = std::env::var("SPENDFLOW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash_recovery seed {seed} (SPENDFLOW_CRASH_SEED={seed} repeats it)");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut setup = StreamRun::new("spendflow_it_crash");
    setup.engine_args = ["--checkpoint-interval", "1s", "--epoch-interval-ms", "20"]
        .map(String::from)
        .to_vec();
    let generation = Generation::messy(USERS, EVENTS, seed % 1000, 5000);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // Kill points: random moments spread over the stream (by events in Kafka), plus a random
    // delay so a kill can land anywhere in an epoch, a checkpoint or a sink write.
    let mut points: Vec<u64> = (0..KILLS)
        .map(|_| rng.random_range(EVENTS / 20..EVENTS * 19 / 20))
        .collect();
    points.sort_unstable();
    let mut generator = setup.generator(&generation);
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
    setup.sigterm(&mut engine);
    assert!(
        setup.verify_cassandra(),
        "verify --cassandra found mismatches"
    );

    // Each malformed record exactly once in the dead-letter topic, and counted once.
    let malformed = generation.malformed(&setup.mysql_url, &setup.brokers);
    assert_eq!(rejected, malformed.len() as u64, "rejections counted once");
    let letters = read_dead_letters(&setup.brokers, &setup.dead_letter_topic(), malformed.len());
    let mut got: Vec<Vec<u8>> = letters.into_iter().map(|(bytes, _)| bytes).collect();
    got.sort();
    assert_eq!(got.len(), malformed.len(), "each dead letter exactly once");
    assert!(
        got == malformed,
        "the dead letters are the malformed records"
    );

    // Clean up (a failed run keeps everything for a look).
    setup.clean_up(&runtime);
}
