//! Cluster mode's acceptance (issue 15), every process a real `spendflow run --cluster FILE
//! --process I` against the services kit's Kafka, Cassandra, MariaDB and HDFS:
//!
//! * **Same answers.** Per-user topics, and one keyed topic, generated with corrections,
//!   deletes, duplicates, late events and malformed records: 3 processes × 1 worker answer
//!   every query (`GetUserSummary`, `GetUserWindows` by month and by day, `TopSpenders`, every
//!   page of `ListUserSummaries`) from every process exactly as 1 process × 3 workers does,
//!   both agree with MySQL (`verify`), each run's dead-letter topic holds each malformed record
//!   once (a partition read by two processes would put it there twice), and every cluster
//!   process sent bytes to its peers (`spendflow_cluster_sent_bytes_total` > 0: it is one
//!   dataflow, not three engines that each read everything).
//! * **A process killed.** `kill -9` of one of three mid-stream (the generator still
//!   writing): the other two log the lost peer and exit non-zero within 10 s; the three started
//!   again on the same checkpoint directory and Cassandra keyspace catch up, and gRPC (from
//!   every process) and Cassandra agree with MySQL; each malformed record once in the dead
//!   letters.
//! * **Rescale.** 3 processes with checkpoints on HDFS (`hdfs://` under `SPENDFLOW_HDFS`),
//!   stopped with SIGTERM once a checkpoint of every process covers everything, then more input
//!   is generated into the same topics. 2 processes started on the same checkpoint directory
//!   must restore it (both log "Restoring a checkpoint."), agree with MySQL from both
//!   processes, and read no partition from its start: `records_read` is restored from the
//!   checkpoint (the records before its positions) and grows by what is read since, so it ends
//!   at exactly first + more only if every partition resumed at its saved position (one read
//!   from its start, or from an older position, counts its records twice, and the wait fails
//!   once every process has said `caught_up` for 60 s without the count adding up).
//!
//! Needs SPENDFLOW_KAFKA, SPENDFLOW_MYSQL, SPENDFLOW_CASSANDRA and SPENDFLOW_HDFS
//! (`docker/native/services env`).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use spendflow_engine::generate::{self, GenerateConfig, Layout};
use spendflow_engine::source::generator::Simulator;
use spendflow_engine::verify::grpc::GrpcServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, VerifyOptions};

use crate::support::cluster::{
    Hostfile, Process, SENT_BYTES, answers, assert_same_answers, exited, log_tails, metric_sum,
    read_exactly, sigterm_all, start_cluster, start_single, stream_args, wait_caught_up,
};
use crate::support::stream::{Generation, StreamRun, messages_in};
use crate::support::{create_topics, read_dead_letters, service_env, unique_name};

/// Users and events of the same-answers runs (small: the module must stay within minutes on
/// a shared 2-core machine, and every user is asked five questions by four processes).
const USERS: u64 = 60;
const EVENTS: u64 = 10_000;

/// One generated data set in MySQL and Kafka, and the `spendflow run` arguments that read it.
struct Data {
    brokers: String,
    mysql_url: String,
    name: String,
    config: GenerateConfig,
    /// `--input ... --topic ...` or `--topic-pattern ...`.
    source_args: Vec<String>,
}

impl Data {
    /// Generates `events` records of `users` users (corrections, deletes, duplicates, late
    /// events, 1 % malformed) into a database and topics of their own.
    fn generate(tag: &str, keyed: bool, users: u64, events: u64) -> Data {
        let brokers = service_env("SPENDFLOW_KAFKA");
        let base = service_env("SPENDFLOW_MYSQL");
        let name = unique_name(tag);
        let (head, _) = base.rsplit_once('/').expect("a MySQL URL with a database");
        let mysql_url = format!("{head}/{name}");
        let prefix = format!("{name}.user.");
        let topic = format!("{name}.expenses");
        let layout = if keyed {
            // 6 partitions: two for each of three processes (by the stable hash).
            Layout::Keyed {
                topic: topic.clone(),
                partitions: 6,
            }
        } else {
            Layout::PerUser {
                prefix: prefix.clone(),
            }
        };
        let mut source_args = vec!["--input".to_string(), format!("kafka:{brokers}")];
        if keyed {
            source_args.extend(["--topic".to_string(), topic]);
        } else {
            source_args.extend([
                "--topic-pattern".to_string(),
                layout.topic_pattern(),
                "--user-topic-prefix".to_string(),
                prefix,
                "--discovery-interval-ms".to_string(),
                "300".to_string(),
            ]);
        }
        source_args.extend(["--epoch-interval-ms".to_string(), "20".to_string()]);
        let mut config = GenerateConfig::new(&mysql_url, &brokers);
        config.layout = layout;
        config.events = Some(events);
        config.simulator.seed = 15;
        config.simulator.users = users;
        config.simulator.bad_rate = 0.01;
        config.simulator.correction_rate = 0.05;
        config.simulator.delete_rate = 0.02;
        config.simulator.duplicate_rate = 0.02;
        config.simulator.late_rate = 0.05;
        let data = Data {
            brokers,
            mysql_url,
            name,
            config,
            source_args,
        };
        data.run_generator(events);
        data
    }

    /// Runs the generator (in this process) up to `events` records in all (it resumes).
    fn run_generator(&self, events: u64) {
        let mut config = self.config.clone();
        config.events = Some(events);
        let summary = generate::run(&config, &mut (), &AtomicBool::new(false))
            .unwrap_or_else(|e| panic!("generate: {e}"));
        assert_eq!(summary.records, events, "{summary}");
    }

    /// A dead-letter topic of its own for one run (created), and the run's arguments.
    fn run_args(&self, run: &str) -> (String, Vec<String>) {
        let dead_letters = format!("{}.dead-letter.{run}", self.name);
        create_topics(&self.brokers, &[(dead_letters.clone(), 1)]);
        let mut args = self.source_args.clone();
        args.extend(["--dead-letter-topic".to_string(), dead_letters.clone()]);
        (dead_letters, args)
    }

    /// The malformed records among the first `events`, sorted.
    fn malformed(&self, events: u64) -> Vec<Vec<u8>> {
        let mut simulator = Simulator::new(self.config.simulator.clone()).unwrap();
        let mut malformed: Vec<Vec<u8>> = (0..events)
            .map(|_| simulator.next_record())
            .filter(|g| g.kind.is_malformed())
            .map(|g| g.bytes)
            .collect();
        malformed.sort();
        malformed
    }

    /// Drops the database and deletes the topics (best effort; a failed test keeps them).
    fn clean_up(&self) {
        if let Ok(mut conn) = mysql::Conn::new(mysql::Opts::from_url(&self.mysql_url).unwrap()) {
            let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
        }
        delete_topics(&self.brokers, &self.name);
    }
}

fn consumer(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("sf_cluster_reader"))
        .create()
        .unwrap()
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

/// Every partition of the topics starting with `prefix`, with its high watermark.
fn high_watermarks(brokers: &str, prefix: &str) -> BTreeMap<(String, i32), i64> {
    let consumer = consumer(brokers);
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut out = BTreeMap::new();
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(prefix))
    {
        for p in topic.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic.name(), p.id(), Duration::from_secs(10))
                .unwrap();
            out.insert((topic.name().to_string(), p.id()), high);
        }
    }
    out
}

fn delete_topics(brokers: &str, prefix: &str) {
    let topics: Vec<String> = high_watermarks(brokers, prefix)
        .into_keys()
        .map(|(t, _)| t)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _ = runtime.block_on(admin(brokers).delete_topics(&topics, &AdminOptions::new()));
}

/// Each malformed record exactly once in `topic`, each with a reason.
#[track_caller]
fn assert_dead_letters_once(brokers: &str, topic: &str, malformed: &[Vec<u8>], what: &str) {
    let letters = read_dead_letters(brokers, topic, malformed.len());
    let mut got: Vec<Vec<u8>> = letters.iter().map(|(bytes, _)| bytes.clone()).collect();
    got.sort();
    assert_eq!(
        got.len(),
        malformed.len(),
        "{what}: each malformed record exactly once in the dead-letter topic"
    );
    assert!(
        got == malformed,
        "{what}: the dead letters are not the malformed records"
    );
    assert!(
        letters.iter().all(|(_, reason)| !reason.is_empty()),
        "{what}: every dead letter has a spendflow.reason header"
    );
}

/// `verify` of the process serving gRPC at `addr` against MySQL: 0 mismatches, (nearly) every
/// user checked.
#[track_caller]
fn assert_agrees_with_mysql(mysql_url: &str, addr: &str, users: u64, what: &str) {
    let mut truth = MySqlTruth::connect(mysql_url).unwrap();
    let mut served =
        GrpcServed::connect(addr).unwrap_or_else(|e| panic!("{what}: connect to {addr}: {e}"));
    let report = verify::verify(&mut truth, &mut served, &VerifyOptions::default())
        .unwrap_or_else(|e| panic!("{what}: verify: {e}"));
    eprintln!("{what}: {report}");
    assert!(report.is_ok(), "{what}: {report}");
    assert!(
        report.users_checked > users * 9 / 10 && report.users_checked <= users,
        "{what}: {report}"
    );
}

/// What `/metrics` of `process` says `spendflow_cluster_sent_bytes_total` is.
fn sent_bytes(process: &Process) -> Option<f64> {
    let response = crate::web::get(process.metrics, "/metrics");
    assert_eq!(response.status, 200, "GET /metrics of {}", process.grpc);
    metric_sum(&String::from_utf8_lossy(&response.body), SENT_BYTES)
}

/// 1 × 3 and 3 × 1 on the same data, at the same time (memory sink, no checkpoints): the same
/// answers from every process, both equal to MySQL, dead letters once in each run.
fn three_processes_answer_like_one_process(tag: &str, keyed: bool) {
    let started = Instant::now();
    let data = Data::generate(tag, keyed, USERS, EVENTS);
    let malformed = data.malformed(EVENTS);
    assert!(!malformed.is_empty(), "the data holds malformed records");
    eprintln!(
        "{tag}: generated {EVENTS} records in {:?}",
        started.elapsed()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let logs = tempfile::tempdir().unwrap();

    let (single_letters, single_args) = data.run_args("1x3");
    let (cluster_letters, cluster_args) = data.run_args("3x1");
    let hostfile = Hostfile::write(logs.path(), "cluster.hosts", 3);
    let mut single = vec![start_single(3, &single_args, logs.path(), "1x3")];
    let mut cluster = start_cluster(&hostfile, 1, &cluster_args, logs.path(), "3x1");

    let statuses = wait_caught_up(&runtime, &mut single, EVENTS, 240);
    assert_eq!(statuses[0].workers, 3);
    assert_eq!(statuses[0].records_rejected, malformed.len() as u64);
    wait_caught_up(&runtime, &mut cluster, EVENTS, 240);

    let reference = answers(&runtime, &single[0].grpc, USERS);
    assert!(
        reference.summaries.values().filter(|s| s.is_ok()).count() as u64 > USERS * 9 / 10,
        "most users have a summary"
    );
    assert_eq!(reference.listed.len(), reference.top.len());
    assert_agrees_with_mysql(&data.mysql_url, &single[0].grpc, USERS, "1 x 3");
    for p in &cluster {
        let what = format!("3 x 1, process {} ({})", p.index, p.grpc);
        assert_same_answers(&reference, &answers(&runtime, &p.grpc, USERS), &what);
        assert_agrees_with_mysql(&data.mysql_url, &p.grpc, USERS, &what);
        let sent = sent_bytes(p);
        assert!(
            sent.is_some_and(|b| b > 0.0),
            "{what}: {SENT_BYTES} is {sent:?}: it exchanged nothing with its peers"
        );
    }
    sigterm_all(&mut single);
    sigterm_all(&mut cluster);
    assert_dead_letters_once(&data.brokers, &single_letters, &malformed, "1 x 3");
    assert_dead_letters_once(&data.brokers, &cluster_letters, &malformed, "3 x 1");
    data.clean_up();
    eprintln!("{tag}: passed in {:?}", started.elapsed());
}

#[test]
fn per_user_topics_three_processes_answer_like_one_process_with_three_workers() {
    three_processes_answer_like_one_process("spendflow_it_cluster_a", false);
}

#[test]
fn keyed_topic_three_processes_answer_like_one_process_with_three_workers() {
    three_processes_answer_like_one_process("spendflow_it_cluster_k", true);
}

#[test]
fn a_process_killed_mid_stream_stops_the_others_and_a_restart_is_exact() {
    let started = Instant::now();
    let users = 60;
    let events = 24_000;
    let mut setup = StreamRun::new("spendflow_it_cluster_kill");
    setup.engine_args = ["--checkpoint-interval", "1s", "--epoch-interval-ms", "20"]
        .map(String::from)
        .to_vec();
    // About 8 s of stream at 3,000 records/s: the kill lands while records still arrive.
    let generation = Generation::messy(users, events, 15, 3_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let hostfile = Hostfile::write(logs.path(), "cluster.hosts", 3);
    let args = stream_args(&setup);

    let mut generator = setup.generator(&generation);
    let mut cluster = start_cluster(&hostfile, 1, &args, logs.path(), "first");
    // Mid-stream: a third of the events in Kafka, and the victim has read some of them.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let produced = messages_in(&setup.brokers, &setup.prefix());
        let read = crate::support::stream::status(&runtime, &cluster[1].grpc)
            .map_or(0, |s| s.records_read);
        if produced >= events / 3 && read > 0 {
            eprintln!("kill -9 of process 1 at {produced} records produced, {read} read");
            break;
        }
        if let Some((i, exit)) = exited(&mut cluster) {
            panic!(
                "process {i} exited with {exit} before the kill:\n{}",
                log_tails(&cluster)
            );
        }
        assert!(
            Instant::now() < deadline,
            "the stream or the cluster did not get going:\n{}",
            log_tails(&cluster)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        generator.try_wait().unwrap().is_none(),
        "the generator is still writing at the kill"
    );
    cluster[1].kill9();
    for i in [0, 2] {
        let exit = cluster[i].wait_exit(Duration::from_secs(10));
        let Some((exit, took)) = exit else {
            panic!(
                "process {i} still running 10 s after its peer was killed:\n{}",
                log_tails(&cluster)
            );
        };
        eprintln!("process {i} exited with {exit} {took:?} after the kill");
        assert!(
            !exit.success(),
            "process {i} must exit non-zero when a peer dies"
        );
        let log = cluster[i].log_text().to_lowercase();
        assert!(
            log.contains("lost peer"),
            "process {i} logs the lost peer:\n{}",
            cluster[i].log_tail()
        );
    }
    drop(cluster);

    // All three again, same checkpoint directory and keyspace.
    let mut cluster = start_cluster(&hostfile, 1, &args, logs.path(), "second");
    let generated = generator.wait().unwrap();
    assert!(generated.success(), "the generator failed: {generated}");
    let in_kafka = messages_in(&setup.brokers, &setup.prefix());
    assert_eq!(in_kafka, events, "the generator wrote every event once");
    wait_caught_up(&runtime, &mut cluster, in_kafka, 240);
    for p in &cluster {
        let what = format!("after the restart, process {} ({})", p.index, p.grpc);
        assert_agrees_with_mysql(&setup.mysql_url, &p.grpc, users, &what);
    }
    // A clean stop lets each process's sink write its last epochs; then Cassandra (every
    // process's share) agrees with MySQL.
    sigterm_all(&mut cluster);
    assert!(
        setup.verify_cassandra(),
        "verify --cassandra found mismatches:\n{}",
        log_tails(&cluster)
    );
    let malformed = generation.malformed(&setup.mysql_url, &setup.brokers);
    assert_dead_letters_once(
        &setup.brokers,
        &setup.dead_letter_topic(),
        &malformed,
        "killed and restarted",
    );
    setup.clean_up(&runtime);
    delete_topics(&setup.brokers, &setup.name);
    eprintln!("kill test passed in {:?}", started.elapsed());
}

/// Deletes the HDFS directory `path` (best effort).
fn hdfs_remove(runtime: &tokio::runtime::Runtime, url: &str, path: &str) {
    if let Ok(client) = hdfs_native::ClientBuilder::new()
        .with_url(url.to_string())
        .build()
    {
        let _ = runtime.block_on(client.delete(path, true));
    }
}

#[test]
fn rescale_three_processes_to_two_from_an_hdfs_checkpoint() {
    let started = Instant::now();
    let users = 40;
    let (first, more) = (6_000, 2_000);
    let hdfs = service_env("SPENDFLOW_HDFS");
    let data = Data::generate("spendflow_it_cluster_rescale", false, users, first);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let hdfs_path = format!("/spendflow-it/{}", data.name);
    let checkpoint_dir = format!("{}{hdfs_path}", hdfs.trim_end_matches('/'));
    let (_, mut args) = data.run_args("rescale");
    args.extend(["--checkpoint-dir".into(), checkpoint_dir.clone()]);
    args.extend(["--checkpoint-interval".into(), "1s".into()]);

    // 1. Three processes read everything; a checkpoint of every process covers it.
    let three = Hostfile::write(logs.path(), "three.hosts", 3);
    let mut cluster = start_cluster(&three, 1, &args, logs.path(), "three");
    let statuses = wait_caught_up(&runtime, &mut cluster, first, 240);
    let covered = statuses
        .iter()
        .filter_map(|s| s.as_of.as_ref().map(|a| a.epoch))
        .max()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let checkpointed: Vec<Option<u64>> = cluster
            .iter()
            .map(|p| {
                crate::support::stream::status(&runtime, &p.grpc)
                    .and_then(|s| s.checkpoint.map(|c| c.last_epoch))
            })
            .collect();
        if checkpointed.iter().all(|c| c.is_some_and(|e| e >= covered)) {
            eprintln!("checkpoints {checkpointed:?} cover epoch {covered}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint covers epoch {covered} in 60 s: {checkpointed:?}\n{}",
            log_tails(&cluster)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sigterm_all(&mut cluster);
    drop(cluster);

    // 2. More input, in the same topics.
    data.run_generator(first + more);

    // 3. Two processes on the same checkpoint directory.
    let two = Hostfile::write(logs.path(), "two.hosts", 2);
    let mut cluster = start_cluster(&two, 1, &args, logs.path(), "two");
    let statuses = wait_caught_up(&runtime, &mut cluster, first + more, 240);
    // `wait_caught_up` saw exactly first + more records read: the checkpoint's count (the
    // records before its positions) plus what was read since. A partition read from its start,
    // or from an older position, would have pushed the count past it.
    assert!(read_exactly(&statuses, first + more));
    let partitions: usize = statuses.iter().map(|s| s.partitions.len()).sum();
    assert!(
        partitions >= users as usize,
        "every per-user topic is read: {partitions} partitions listed"
    );
    for p in &cluster {
        assert!(
            p.log_text().contains("Restoring a checkpoint."),
            "process {} restored no checkpoint:\n{}",
            p.index,
            p.log_tail()
        );
        let what = format!("after the rescale, process {} ({})", p.index, p.grpc);
        assert_agrees_with_mysql(&data.mysql_url, &p.grpc, users, &what);
    }
    sigterm_all(&mut cluster);
    hdfs_remove(&runtime, &hdfs, &hdfs_path);
    data.clean_up();
    eprintln!("rescale test passed in {:?}", started.elapsed());
}
