//! Broker chaos: while the generator streams into Kafka (one topic per user, with corrections,
//! deletes, duplicates, late events and 1% malformed records) and the engine — the real binary,
//! two workers, the Cassandra sink and checkpoints — reads it, the Kafka broker is killed with
//! `kill -9`, stays down for 10-15 s, and is started again by the services kit. The engine must
//! not crash; afterwards the answers over gRPC and the Cassandra tables agree with MySQL, and
//! the dead-letter topic holds each malformed record of the input exactly once, counted once.
//!
//! The generator is meant to ride out the outage (its producer retries for a minute, then sends
//! the unacknowledged batch again, so Kafka may hold some records twice); if it
//! exits anyway, it is started again with the same settings, which resumes it (see
//! `spendflow_engine::generate`).
//!
//! This test stops the kit's Kafka for everyone, so it lives alone in its own test binary (cargo
//! runs test binaries one after another). It finds the broker through the kit's pid file under
//! `$SPENDFLOW_SERVICES_DIR` (default `target/services`, where `make test` starts it) and always
//! starts it again, also when it fails. The test prints its seed; `SPENDFLOW_CHAOS_SEED=<seed>`
//! repeats the same kill point and outage; `SPENDFLOW_CHAOS_EVENTS=<n>` streams n events instead
//! of 4,000 (on a slow machine). Needs SPENDFLOW_KAFKA, SPENDFLOW_CASSANDRA and
//! SPENDFLOW_MYSQL (`docker/native/services env`).

use std::collections::HashSet;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spendflow_engine::verify::grpc::GrpcServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, VerifyOptions};

use crate::support::read_dead_letters;
use crate::support::stream::{
    Generation, RestartService, StreamRun, messages_in, service_pid, services_kit, status, tail,
};

const USERS: u64 = 100;
/// Events streamed, unless `SPENDFLOW_CHAOS_EVENTS` says otherwise (fewer on a slow machine).
const EVENTS: u64 = 4_000;
/// Records per second: the stream lasts about 2 s without the outage (on an idle machine; a
/// busy one is much slower, hence the generous bounds on the waits below).
const RATE: u64 = 2_000;
/// How often the generator may be started again after it gave up.
const GENERATOR_RESTARTS: usize = 3;

/// Every record in the topics starting with `prefix`, read from the beginning to the ends the
/// topics have now.
fn input_records(brokers: &str, prefix: &str) -> Vec<Vec<u8>> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            crate::support::unique_name("sf_chaos_input_reader"),
        )
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    let mut left = 0i64;
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(prefix))
    {
        for p in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic.name(), p.id(), Duration::from_secs(10))
                .unwrap();
            if high > low {
                left += high - low;
                assignment
                    .add_partition_offset(topic.name(), p.id(), Offset::Offset(low))
                    .unwrap();
            }
        }
    }
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::with_capacity(left as usize);
    let deadline = Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < left {
        assert!(
            Instant::now() < deadline,
            "read only {} of the {left} input records within 60 s",
            out.len()
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.expect("reading the input back");
            out.push(message.payload().unwrap_or_default().to_vec());
        }
    }
    out
}

/// Whether the process is gone (or a zombie).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The generator: watched, and started again (which resumes it) when it exits without
/// finishing, at most [`GENERATOR_RESTARTS`] times.
struct Generator<'a> {
    run: &'a StreamRun,
    generation: &'a Generation,
    child: Child,
    restarts: usize,
}

impl Drop for Generator<'_> {
    fn drop(&mut self) {
        // A failing test leaves no generator behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The engine, killed if the test fails half-way (the test stops it with SIGTERM otherwise).
struct Engine(Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Generator<'_> {
    /// Starts it again if it exited with an error; `Some(())` once it finished.
    fn check(&mut self) -> Option<()> {
        let status = self.child.try_wait().unwrap()?;
        if status.success() {
            return Some(());
        }
        assert!(
            self.restarts < GENERATOR_RESTARTS,
            "the generator failed {} times ({status}):\n{}",
            self.restarts + 1,
            tail(&self.run.generator_log_path(), 20)
        );
        self.restarts += 1;
        eprintln!(
            "the generator exited with {status}; starting it again (it resumes):\n{}",
            tail(&self.run.generator_log_path(), 5)
        );
        self.child = self.run.generator(self.generation);
        None
    }
}

#[test]
fn broker_killed_mid_stream_then_exact_in_grpc_cassandra_and_dead_letters() {
    let _serial = crate::serial();
    let seed: u64 = std::env::var("SPENDFLOW_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let events: u64 = std::env::var("SPENDFLOW_CHAOS_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(EVENTS);
    eprintln!("chaos_kafka seed {seed} (SPENDFLOW_CHAOS_SEED={seed} repeats it), {events} events");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // The kill lands after a fifth to a third of the stream is in Kafka, plus up to a second
    // (anywhere in an epoch, a checkpoint or a sink write); the broker stays down 10-15 s.
    let kill_point = rng.random_range(events / 5..events / 3);
    let kill_delay = Duration::from_millis(rng.random_range(0..1_000));
    let outage = Duration::from_millis(rng.random_range(10_000..15_000));

    // Fail before anything starts if the kit's broker cannot be found.
    service_pid("kafka");
    let mut run = StreamRun::new("spendflow_it_chaos");
    run.engine_args = ["--checkpoint-interval", "1s", "--epoch-interval-ms", "20"]
        .map(String::from)
        .to_vec();
    let generation = Generation::messy(USERS, events, seed % 1000, RATE);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();

    // The engine first, serving (its sink open) before the stream starts, so the broker dies
    // while the engine reads: right after another chaos test restarted Cassandra, opening the
    // sink can take a while (seen in CI: nothing read at the kill, an empty log).
    let mut engine = Engine(run.engine());
    let deadline = Instant::now() + Duration::from_secs(180);
    while status(&runtime, &run.grpc).is_none() {
        assert!(
            Instant::now() < deadline,
            "the engine did not serve within 180 s:\n{}",
            run.log_tail()
        );
        assert!(
            engine.0.try_wait().unwrap().is_none(),
            "the engine exited at start:\n{}",
            run.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut generator = Generator {
        run: &run,
        generation: &generation,
        child: run.generator(&generation),
        restarts: 0,
    };
    let alive = |engine: &mut Child, when: &str| {
        if let Some(exit) = engine.try_wait().unwrap() {
            panic!("the engine exited ({exit}) {when}:\n{}", run.log_tail());
        }
    };

    // Streaming normally up to the kill point.
    let deadline = Instant::now() + Duration::from_secs(180);
    while messages_in(&run.brokers, &run.prefix()) < kill_point {
        assert!(
            Instant::now() < deadline,
            "fewer than {kill_point} records in Kafka after 180 s:\n{}",
            tail(&run.generator_log_path(), 20)
        );
        assert!(
            generator.check().is_none(),
            "the generator finished before the kill point"
        );
        alive(&mut engine.0, "before the broker was killed");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(kill_delay);
    let read_before = status(&runtime, &run.grpc).map_or(0, |s| s.records_read);
    assert!(
        read_before > 0,
        "the engine read nothing before the kill:\n{}",
        run.log_tail()
    );

    // kill -9, down for the outage, started again by the kit.
    let _restart = RestartService("kafka");
    let pid = service_pid("kafka");
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success(),
        "kill -9 {pid}"
    );
    let down = Instant::now();
    while !dead(pid) {
        assert!(
            down.elapsed() < Duration::from_secs(10),
            "Kafka (pid {pid}) still alive 10 s after kill -9"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "Kafka (pid {pid}) killed with kill -9 at ~{kill_point} records produced, {read_before} read; down for {outage:?}"
    );
    while down.elapsed() < outage {
        alive(&mut engine.0, "while the broker was down");
        // (A generator that gives up now is started again once the broker is back.)
        std::thread::sleep(Duration::from_millis(100));
    }
    // On a busy machine the broker's recovery can outlast the kit's readiness timeout (the kit
    // then stops it again): try a few times.
    let mut attempt = 1;
    while !services_kit(&["up", "kafka"]).success() {
        assert!(
            attempt < 3,
            "the kit could not start Kafka again ({attempt} tries)"
        );
        attempt += 1;
    }
    let read_during = status(&runtime, &run.grpc).map_or(0, |s| s.records_read);
    eprintln!(
        "Kafka back {:?} after the kill (new pid {}); the engine had read {read_during}",
        down.elapsed(),
        service_pid("kafka")
    );

    // The generator finishes (started again if it gave up); the engine reads everything.
    let deadline = Instant::now() + Duration::from_secs(240);
    while generator.check().is_none() {
        assert!(
            Instant::now() < deadline,
            "the generator did not finish within 240 s after the broker came back:\n{}",
            tail(&run.generator_log_path(), 20)
        );
        alive(&mut engine.0, "after the broker came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A batch not acknowledged within the generator's publish timeout (the broker's restart can
    // take longer than the outage) is sent again, and a resumed generator re-publishes its
    // outbox: duplicates in Kafka are allowed (the engine applies the last record per expense),
    // loss is not.
    let in_kafka = messages_in(&run.brokers, &run.prefix());
    assert!(in_kafka >= events, "{in_kafka} of {events} events in Kafka");
    eprintln!(
        "{in_kafka} records in Kafka for {events} events ({} sent again)",
        in_kafka - events
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let generated = Instant::now();
    loop {
        let s = status(&runtime, &run.grpc);
        if let Some(s) = &s
            && s.caught_up
            && s.records_read == in_kafka
        {
            eprintln!(
                "caught up {:?} after the generator finished: {} read, {} rejected",
                generated.elapsed(),
                s.records_read,
                s.records_rejected
            );
            break;
        }
        alive(&mut engine.0, "while catching up");
        assert!(
            Instant::now() < deadline,
            "not caught up with {in_kafka} records within 120 s: {s:?}\n{}",
            run.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // gRPC agrees with MySQL.
    let mut truth = MySqlTruth::connect(&run.mysql_url).unwrap();
    let mut served = GrpcServed::connect(&run.grpc).unwrap();
    let report = verify::verify(&mut truth, &mut served, &VerifyOptions::default()).unwrap();
    eprintln!("gRPC: {report}");
    assert!(report.is_ok(), "{report}\n{}", run.log_tail());
    assert!(report.users_checked > USERS * 9 / 10, "{report}");
    let rejected = status(&runtime, &run.grpc).unwrap().records_rejected;
    // (An open MySQL session would hold the database's metadata lock at the DROP below.)
    drop((truth, served));

    // A clean stop lets the sink write its last epochs; then Cassandra agrees with MySQL.
    run.sigterm(&mut engine.0);
    assert!(
        run.verify_cassandra(),
        "verify --cassandra found mismatches:\n{}",
        run.log_tail()
    );

    // The dead letters are exactly the malformed records in the input, each once (the input is
    // read back, so a record a resumed generator published twice counts twice), and the engine
    // counted each rejection once.
    let malformed = generation.malformed(&run.mysql_url, &run.brokers);
    let bad: HashSet<&[u8]> = malformed.iter().map(Vec::as_slice).collect();
    let mut expected: Vec<Vec<u8>> = input_records(&run.brokers, &run.prefix())
        .into_iter()
        .filter(|r| bad.contains(r.as_slice()))
        .collect();
    expected.sort();
    let mut distinct = expected.clone();
    distinct.dedup();
    let mut malformed_distinct = malformed.clone();
    malformed_distinct.dedup();
    assert_eq!(
        distinct, malformed_distinct,
        "every malformed record generated is in the input"
    );
    assert_eq!(
        rejected,
        expected.len() as u64,
        "rejections counted once ({} malformed generated)",
        malformed.len()
    );
    let letters = read_dead_letters(&run.brokers, &run.dead_letter_topic(), expected.len());
    let mut got: Vec<Vec<u8>> = letters.into_iter().map(|(bytes, _)| bytes).collect();
    got.sort();
    assert_eq!(
        got.len(),
        expected.len(),
        "each dead letter exactly once\n{}",
        run.log_tail()
    );
    assert!(
        got == expected,
        "the dead letters are the malformed records"
    );
    eprintln!(
        "{} dead letters, one per malformed record; generator restarts: {}; {:?} in all",
        got.len(),
        generator.restarts,
        started.elapsed()
    );

    run.clean_up(&runtime);
}
