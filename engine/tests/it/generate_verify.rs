//! `spendflow generate` and `spendflow verify` against real MariaDB and Kafka (issue 4's
//! acceptance): the generator writes MySQL and Kafka, the engine reads Kafka by pattern or one
//! keyed topic, and verify compares the engine's gRPC answers with SQL.
//!
//! Needs `SPENDFLOW_MYSQL` and `SPENDFLOW_KAFKA` (`docker/native/services up` and
//! `eval "$(docker/native/services env)"`). Every test uses its own database and topic names
//! (`spendflow_it_*`), so the tests run in parallel and again; the MySQL user needs privileges on
//! databases matching `spendflow\_%` (the services kit grants them).

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::support::{create_topics, read_dead_letters, service_env, unique_name};
use mysql::prelude::Queryable;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use spendflow_engine::generate::{self, GenerateConfig, Layout, Summary};
use spendflow_engine::source::generator::Simulator;
use spendflow_engine::source::kafka::KafkaSourceConfig;
use spendflow_engine::verify::grpc::GrpcServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, Report, VerifyOptions};
use spendflow_engine::{Engine, EngineConfig, SourceConfig, Status};

/// The services, and names unique to one test.
struct Setup {
    brokers: String,
    mysql_url: String,
    database: String,
    name: String,
    dead_letter_topic: String,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let brokers = service_env("SPENDFLOW_KAFKA");
        let base = service_env("SPENDFLOW_MYSQL");
        let name = unique_name(tag);
        // Replace the URL's database with this test's own.
        let (head, _) = base
            .rsplit_once('/')
            .filter(|(head, _)| head.contains("://") && !head.ends_with('/'))
            .unwrap_or((base.as_str(), ""));
        let mysql_url = format!("{head}/{name}");
        Setup {
            dead_letter_topic: format!("{name}.dead-letter"),
            brokers,
            mysql_url,
            database: name.clone(),
            name,
        }
    }

    fn prefix(&self) -> String {
        format!("{}.user.", self.name)
    }

    fn keyed_topic(&self) -> String {
        format!("{}.expenses", self.name)
    }

    /// The acceptance workload: 200 users, 50,000 events, corrections, deletes, duplicates,
    /// late events and 1% malformed.
    fn config(&self, layout: Layout, users: u64, events: u64) -> GenerateConfig {
        let mut config = GenerateConfig::new(&self.mysql_url, &self.brokers);
        config.layout = layout;
        config.events = Some(events);
        config.simulator.seed = 4;
        config.simulator.users = users;
        config.simulator.bad_rate = 0.01;
        config.simulator.correction_rate = 0.05;
        config.simulator.delete_rate = 0.02;
        config.simulator.duplicate_rate = 0.02;
        config.simulator.late_rate = 0.05;
        config
    }

    fn engine(&self, source: KafkaSourceConfig, workers: usize) -> Engine {
        create_topics(&self.brokers, &[(self.dead_letter_topic.clone(), 1)]);
        let config = EngineConfig {
            workers,
            epoch_interval_ms: 20,
            source: Some(SourceConfig::Kafka(source)),
            grpc: Some("127.0.0.1:0".parse().unwrap()),
            dead_letter_topic: self.dead_letter_topic.clone(),
            ..EngineConfig::default()
        };
        Engine::builder().config(config).start().unwrap()
    }

    fn pattern_source(&self) -> KafkaSourceConfig {
        let prefix = self.prefix();
        let layout = Layout::PerUser {
            prefix: prefix.clone(),
        };
        let mut source = KafkaSourceConfig::pattern(&self.brokers, layout.topic_pattern());
        source.user_topic_prefix = prefix;
        source.group_id = format!("{}.engine", self.name);
        source.discovery_interval_ms = 300;
        source
    }

    fn verify(&self, engine: &Engine) -> Report {
        let addr = engine.grpc_addr().unwrap().to_string();
        let mut truth = MySqlTruth::connect(&self.mysql_url).unwrap();
        let mut served = GrpcServed::connect(&addr).unwrap();
        verify::verify(&mut truth, &mut served, &VerifyOptions::default()).unwrap()
    }

    /// Drops the database and the test's topics (best effort: a failed test keeps them for a
    /// look).
    fn clean_up(&self) {
        if let Ok(mut conn) = mysql::Conn::new(mysql::Opts::from_url(&self.mysql_url).unwrap()) {
            let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.database));
        }
        let admin = admin(&self.brokers);
        let topics = list_topics(&self.brokers)
            .into_iter()
            .filter(|t| t.starts_with(&self.name))
            .collect::<Vec<_>>();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _ = runtime.block_on(admin.delete_topics(&topics, &AdminOptions::new()));
    }
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

fn consumer(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("sf_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

fn list_topics(brokers: &str) -> Vec<String> {
    consumer(brokers)
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap()
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .collect()
}

/// Messages in the topics starting with `prefix` (the sum of their high watermarks).
fn messages_in(brokers: &str, prefix: &str) -> u64 {
    let consumer = consumer(brokers);
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut total = 0;
    for topic in metadata.topics() {
        if !topic.name().starts_with(prefix) {
            continue;
        }
        for p in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic.name(), p.id(), Duration::from_secs(10))
                .unwrap();
            total += (high - low) as u64;
        }
    }
    total
}

/// The generator's records, regenerated: the malformed ones' bytes (Kafka-only records).
fn malformed_payloads(config: &GenerateConfig, events: u64) -> Vec<Vec<u8>> {
    let mut simulator = Simulator::new(config.simulator.clone()).unwrap();
    (0..events)
        .map(|_| simulator.next_record())
        .filter(|g| g.kind.is_malformed())
        .map(|g| g.bytes)
        .collect()
}

/// Waits until the engine has read `expected` records and reports caught up.
fn wait_for(engine: &Engine, expected: u64, what: &str) -> (Status, Duration) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    loop {
        let status = engine.status();
        if status.caught_up && status.records_read == expected {
            return (status, started.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not caught up with {expected} records in 120 s: read {}, caught_up {}, {} partitions",
            status.records_read,
            status.caught_up,
            status.partitions.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kafka partitions the engine reads (its status also lists the in-process input).
fn kafka_partitions(status: &Status, prefix: &str) -> usize {
    status
        .partitions
        .iter()
        .filter(|p| p.source.starts_with(prefix))
        .count()
}

fn run_generate(config: &GenerateConfig) -> Summary {
    let summary = generate::run(config, &mut (), &AtomicBool::new(false))
        .unwrap_or_else(|e| panic!("generate: {e}"));
    eprintln!("{summary}");
    summary
}

/// The engine's dead letters are exactly the malformed records, each with a reason.
fn assert_dead_letters(setup: &Setup, malformed: &[Vec<u8>]) {
    let letters = read_dead_letters(&setup.brokers, &setup.dead_letter_topic, malformed.len());
    assert_eq!(
        letters.len(),
        malformed.len(),
        "each malformed record exactly once in the dead-letter topic"
    );
    let mut got: Vec<Vec<u8>> = letters.iter().map(|(bytes, _)| bytes.clone()).collect();
    let mut want = malformed.to_vec();
    got.sort();
    want.sort();
    assert!(
        got == want,
        "the dead letters are not the malformed records"
    );
    assert!(
        letters.iter().all(|(_, reason)| !reason.is_empty()),
        "every dead letter has a spendflow.reason header"
    );
}

fn assert_agrees(report: &Report, users: u64) {
    assert!(report.is_ok(), "{report}");
    assert!(
        report.users_checked > users * 9 / 10 && report.users_checked <= users,
        "{report}"
    );
}

/// The engine reads every message; the rate for the report.
fn ingest_rate(records: u64, took: Duration) -> f64 {
    records as f64 / took.as_secs_f64().max(1e-9)
}

#[test]
fn per_user_topics_end_to_end() {
    let setup = Setup::new("spendflow_it_gen_a");
    let events = 50_000;
    let config = setup.config(
        Layout::PerUser {
            prefix: setup.prefix(),
        },
        200,
        events,
    );
    let summary = run_generate(&config);
    assert_eq!(summary.records, events);
    assert_eq!(summary.topics, 200);
    assert_eq!(summary.topics_created, 200);
    let malformed = malformed_payloads(&config, events);
    assert_eq!(summary.kinds.malformed_total(), malformed.len() as u64);
    assert!(malformed.len() > 300 && malformed.len() < 700);
    assert!(summary.kinds.correction > 0 && summary.kinds.delete > 0);
    assert!(summary.kinds.duplicate > 0 && summary.kinds.late > 0);
    assert_eq!(messages_in(&setup.brokers, &setup.prefix()), events);

    let started = Instant::now();
    let engine = setup.engine(setup.pattern_source(), 1);
    let (status, _) = wait_for(&engine, events, "per-user");
    let took = started.elapsed();
    eprintln!(
        "per-user: generator {:.0} records/s; engine ingest {:.0} records/s ({events} records, 200 topics, 1 worker, {took:?})",
        summary.rate(),
        ingest_rate(events, took)
    );
    assert_eq!(status.records_rejected, malformed.len() as u64);
    assert_eq!(kafka_partitions(&status, &setup.prefix()), 200);

    let report = setup.verify(&engine);
    eprintln!("{report}");
    assert_agrees(&report, 200);
    engine.shutdown().unwrap();
    assert_dead_letters(&setup, &malformed);

    // Generating again with the same settings finds the run complete and changes nothing.
    let again = run_generate(&config);
    assert_eq!(again.session_records(), 0);
    assert_eq!(messages_in(&setup.brokers, &setup.prefix()), events);
    setup.clean_up();
}

#[test]
fn keyed_topic_two_workers_end_to_end() {
    let setup = Setup::new("spendflow_it_gen_b");
    let events = 50_000;
    let topic = setup.keyed_topic();
    let config = setup.config(
        Layout::Keyed {
            topic: topic.clone(),
            partitions: 4,
        },
        200,
        events,
    );
    let summary = run_generate(&config);
    assert_eq!(summary.records, events);
    assert_eq!(messages_in(&setup.brokers, &topic), events);
    let malformed = malformed_payloads(&config, events);

    let started = Instant::now();
    let mut source = KafkaSourceConfig::topic(&setup.brokers, &topic);
    source.group_id = format!("{}.engine", setup.name);
    let engine = setup.engine(source, 2);
    let (status, _) = wait_for(&engine, events, "keyed");
    let took = started.elapsed();
    eprintln!(
        "keyed: generator {:.0} records/s; engine ingest {:.0} records/s ({events} records, 4 partitions, 2 workers, {took:?})",
        summary.rate(),
        ingest_rate(events, took)
    );
    assert_eq!(kafka_partitions(&status, &topic), 4);
    assert_eq!(status.workers, 2);
    assert_eq!(status.records_rejected, malformed.len() as u64);

    let report = setup.verify(&engine);
    eprintln!("{report}");
    assert_agrees(&report, 200);
    engine.shutdown().unwrap();
    assert_dead_letters(&setup, &malformed);
    setup.clean_up();
}

#[test]
fn topics_created_after_the_engine_started_are_picked_up() {
    let setup = Setup::new("spendflow_it_gen_c");
    // The engine first: no topic of this prefix exists yet.
    let engine = setup.engine(setup.pattern_source(), 2);
    assert_eq!(kafka_partitions(&engine.status(), &setup.prefix()), 0);

    let events = 5_000;
    let config = setup.config(
        Layout::PerUser {
            prefix: setup.prefix(),
        },
        40,
        events,
    );
    let summary = run_generate(&config);
    assert_eq!(summary.topics_created, summary.topics);
    let (status, _) = wait_for(&engine, events, "late topics");
    assert_eq!(
        kafka_partitions(&status, &setup.prefix()) as u64,
        summary.topics
    );
    assert_eq!(
        status.records_rejected,
        summary.kinds.malformed_total(),
        "malformed records in late topics are counted"
    );

    // A second start with a larger target continues the same run; the engine follows.
    let mut more = config.clone();
    more.events = Some(events + 2_000);
    let extended = run_generate(&more);
    assert_eq!(extended.resumed_from, events);
    let (status, _) = wait_for(&engine, events + 2_000, "extended");
    assert_eq!(
        kafka_partitions(&status, &setup.prefix()) as u64,
        extended.topics
    );

    let report = setup.verify(&engine);
    eprintln!("{report}");
    assert_agrees(&report, 40);

    // The command line: exit 0 when both sides agree...
    let addr = engine.grpc_addr().unwrap().to_string();
    let verify_cli = || {
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["verify", "--mysql", &setup.mysql_url, "--grpc", &addr])
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let output = verify_cli();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("40 users checked") && stdout.contains("0 mismatches"),
        "{stdout}"
    );

    // ...and non-zero, with both values, when they do not: a changed amount, a user MySQL
    // no longer has, and one the engine never saw.
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(&setup.mysql_url).unwrap()).unwrap();
    let (changed, changed_user): (Vec<u8>, u64) = conn
        .query_first("SELECT expense_id, user_id FROM expenses WHERE user_id <> 3 ORDER BY expense_id LIMIT 1")
        .unwrap()
        .unwrap();
    conn.exec_drop(
        "UPDATE expenses SET amount_minor = amount_minor + 1 WHERE expense_id = ?",
        (changed,),
    )
    .unwrap();
    conn.query_drop("DELETE FROM expenses WHERE user_id = 3")
        .unwrap();
    conn.query_drop(
        "INSERT INTO expenses (expense_id, user_id, merchant, category, amount_minor, currency, \
         event_ms, event_time) VALUES ('e-extra', 999, 'Tesco', 'groceries', 100, 'EUR', \
         1795947300000, '2026-11-29 10:15:00')",
    )
    .unwrap();
    let output = verify_cli();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}");
    assert!(!output.status.success(), "mismatches must fail: {stdout}");
    assert!(stdout.contains("41 users checked"), "{stdout}");
    assert!(
        stdout.contains(&format!("user {changed_user} total: mysql ")),
        "{stdout}"
    );
    assert!(stdout.contains("user 3 missing in the truth"), "{stdout}");
    assert!(
        stdout.contains("user 999 missing on the served side"),
        "{stdout}"
    );
    assert!(stderr.contains("mismatches in 3 of 41 users"), "{stderr}");

    engine.shutdown().unwrap();
    setup.clean_up();
}

#[test]
fn generator_killed_mid_run_and_restarted_still_agrees() {
    let setup = Setup::new("spendflow_it_gen_d");
    let events: u64 = 50_000;
    let config = setup.config(
        Layout::PerUser {
            prefix: setup.prefix(),
        },
        200,
        events,
    );
    let args = |rate: u64| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spendflow"));
        command
            .args(["generate", "--mysql", &setup.mysql_url])
            .args(["--brokers", &setup.brokers])
            .args(["--topic-prefix", &setup.prefix()])
            .args(["--users", "200", "--events", &events.to_string()])
            .args(["--seed", &config.simulator.seed.to_string()])
            .args(["--bad-rate", "0.01", "--correction-rate", "0.05"])
            .args(["--delete-rate", "0.02", "--duplicate-rate", "0.02"])
            .args(["--late-rate", "0.05", "--rate", &rate.to_string()])
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        command
    };

    // Paced so that it is surely mid-run when killed: kill -9 once MySQL shows progress.
    let mut child = args(15_000).spawn().unwrap();
    let mut conn = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(conn) = mysql::Conn::new(mysql::Opts::from_url(&setup.mysql_url).unwrap()) {
                break conn;
            }
            assert!(
                Instant::now() < deadline,
                "the generator never created its database"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let progress = |conn: &mut mysql::Conn| -> u64 {
        conn.query_first("SELECT records FROM generator_state WHERE id = 1")
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    // Generous: the suite runs two tests at once on a 2-core machine (seen: 5,000 records took
    // more than 30 s beside another heavy test).
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress(&mut conn) < 5_000 {
        assert!(Instant::now() < deadline, "the generator made no progress");
        assert!(child.try_wait().unwrap().is_none(), "the generator exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = progress(&mut conn);
    assert!(
        at_kill > 0 && at_kill < events,
        "killed mid-run, at {at_kill} records"
    );

    // Restart with the same settings, at full speed: it replays the outbox and continues.
    let output = args(0).output().unwrap();
    assert!(output.status.success(), "the restarted generator failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(stdout.contains("resumed after"), "{stdout}");
    assert_eq!(progress(&mut conn), events);
    let outbox: Option<u64> = conn.query_first("SELECT COUNT(*) FROM outbox").unwrap();
    assert_eq!(outbox, Some(0));

    // Kafka may hold a batch twice (published, then killed before the outbox row was
    // deleted); the engine must still agree with MySQL.
    let in_kafka = messages_in(&setup.brokers, &setup.prefix());
    assert!(in_kafka >= events, "nothing lost: {in_kafka} messages");
    let engine = setup.engine(setup.pattern_source(), 2);
    let (status, _) = wait_for(&engine, in_kafka, "after the restart");
    let report = setup.verify(&engine);
    eprintln!("{report}");
    assert_agrees(&report, 200);
    engine.shutdown().unwrap();

    // Every malformed record reached the dead letters (some possibly twice, with the batch
    // that was re-published).
    let malformed: BTreeSet<Vec<u8>> = malformed_payloads(&config, events).into_iter().collect();
    let letters = read_dead_letters(
        &setup.brokers,
        &setup.dead_letter_topic,
        status.records_rejected as usize,
    );
    assert_eq!(letters.len() as u64, status.records_rejected);
    let got: BTreeSet<Vec<u8>> = letters.into_iter().map(|(bytes, _)| bytes).collect();
    assert!(
        got == malformed,
        "the dead letters are not the malformed records"
    );
    setup.clean_up();
}

/// Issue 16: budgets, currencies and exchange rates joined live from MariaDB's binlog while
/// the generator changes them; `verify` compares the alerts fired and the converted ranking
/// with SQL over the same database.
#[test]
fn budgets_and_rates_from_the_binlog_agree_with_sql() {
    let setup = Setup::new("spendflow_it_gen_cdc");
    let events = 30_000;
    let topic = setup.keyed_topic();
    let mut config = setup.config(
        Layout::Keyed {
            topic: topic.clone(),
            partitions: 2,
        },
        200,
        events,
    );
    config.budget_change_rate = 2.0;
    config.fx_change_rate = 0.5;
    let summary = run_generate(&config);
    assert_eq!(summary.records, events);

    create_topics(&setup.brokers, &[(setup.dead_letter_topic.clone(), 1)]);
    let mut source = KafkaSourceConfig::topic(&setup.brokers, &topic);
    source.group_id = format!("{}.engine", setup.name);
    let mut cdc = spendflow_engine::source::mysql_cdc::MysqlCdcSourceConfig::new(&setup.mysql_url);
    // Apart from other tests' readers of the same server (a replica id is one connection).
    cdc.server_id = 4_170_216;
    let engine = Engine::builder()
        .config(EngineConfig {
            workers: 2,
            epoch_interval_ms: 20,
            source: Some(SourceConfig::Kafka(source)),
            reference: Some(SourceConfig::MysqlCdc(cdc)),
            reporting_currency: Some("EUR".into()),
            grpc: Some("127.0.0.1:0".parse().unwrap()),
            dead_letter_topic: setup.dead_letter_topic.clone(),
            ..EngineConfig::default()
        })
        .start()
        .unwrap();
    // The binlog rows count as records read too: caught up, with at least the expenses read.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = engine.status();
        if status.caught_up && status.records_read >= events {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not caught up in 120 s: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let report = setup.verify(&engine);
    eprintln!("{report}");
    assert_agrees(&report, 200);
    let reference = report.reference.as_ref().expect("the reference checks ran");
    assert_eq!(reference.mismatch_count, 0, "{report}");
    assert!(
        reference.alerts_checked.is_some_and(|n| n > 0),
        "calibrated budgets leave some users over: {report}"
    );
    assert!(
        reference.spenders_checked.is_some_and(|n| n > 0),
        "{report}"
    );
    assert!(reference.budgets_checked.is_some_and(|n| n > 0), "{report}");
    engine.shutdown().unwrap();
    setup.clean_up();
}
