//! Prometheus metrics through the real binary: `spendflow run` on a Kafka topic (real broker,
//! `SPENDFLOW_KAFKA`) with the Cassandra sink (real Cassandra, `SPENDFLOW_CASSANDRA`),
//! checkpoints, the web report and `--metrics` on its own address. Records (one malformed)
//! are fed, gRPC is called and a subscription and a live page are held open; then `/metrics`
//! is scraped on both addresses until every documented metric is there with a plausible value,
//! and the text is checked line by line to be Prometheus text exposition.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseRecord, Producer};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;

use crate::support::{create_topics, producer, service_env, unique_name};
use crate::web::{EventStream, get};

/// Valid records fed (besides the one malformed record).
const VALID: u64 = 30;

/// Kills the engine when the test ends, passing or not.
struct Engine(Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn record(id: u64) -> String {
    let user = id % 5 + 1;
    format!(
        r#"{{"expense_id":"m-{id}","user_id":{user},"merchant":"Shop {m}","category":"groceries","amount_minor":{amount},"currency":"EUR","event_time":"2026-10-{day:02}T10:00:00Z"}}"#,
        m = id % 3,
        amount = 100 + id,
        day = id % 28 + 1,
    )
}

/// The address after `prefix` in a log line (up to the next `/`, space or backtick).
fn logged_addr(log: &Path, prefix: &str) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|line| {
        let rest = &line[line.find(prefix)? + prefix.len()..];
        let end = rest.find(['/', ' ', '`']).unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

/// Every sample of a Prometheus text exposition as `series -> value`, where the series is the
/// name with its labels as written (`name{a="b"}`); panics on any line that is neither a
/// `# HELP`/`# TYPE` comment nor `name{labels} value`.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let sample = regex::Regex::new(
        r#"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})?) (\S+)$"#,
    )
    .unwrap();
    let comment = regex::Regex::new(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .*$").unwrap();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if comment.is_match(line) {
            continue;
        }
        let captures = sample
            .captures(line)
            .unwrap_or_else(|| panic!("not Prometheus text exposition: {line:?}\n{text}"));
        let value: f64 = match &captures[2] {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}")),
        };
        samples.insert(captures[1].to_string(), value);
    }
    samples
}

/// What is not there yet, or not plausible, in one scrape (empty: all good).
fn shortfalls(samples: &BTreeMap<String, f64>, topic: &str) -> Vec<String> {
    let value = |series: &str| samples.get(series).copied();
    let mut short = Vec::new();
    let mut want = |what: &str, ok: bool| {
        if !ok {
            short.push(what.to_string());
        }
    };
    let at_least = |series: &str, min: f64| value(series).is_some_and(|v| v >= min);
    want(
        "records read >= fed",
        at_least("spendflow_records_read_total", VALID as f64 + 1.0),
    );
    want(
        "records accepted = valid",
        value("spendflow_records_accepted_total") == Some(VALID as f64),
    );
    want(
        "one record rejected as bad_json",
        value(r#"spendflow_records_rejected_total{reason="bad_json"}"#) == Some(1.0),
    );
    want("an epoch published", at_least("spendflow_epoch", 1.0));
    want(
        "epoch close latency",
        at_least("spendflow_epoch_close_seconds_count", 1.0)
            && value(r#"spendflow_epoch_close_seconds_bucket{le="+Inf"}"#).is_some(),
    );
    for partition in 0..2 {
        want(
            &format!("lag of partition {partition}, caught up"),
            value(&format!(
                r#"spendflow_kafka_lag_records{{topic="{topic}",partition="{partition}"}}"#
            )) == Some(0.0),
        );
    }
    want(
        "no lag for the in-process input (only Kafka has lag)",
        !samples
            .keys()
            .any(|s| s.starts_with(r#"spendflow_kafka_lag_records{topic="input""#)),
    );
    want(
        "sink rows written",
        at_least("spendflow_sink_rows_written_total", 1.0),
    );
    want(
        "sink retries",
        value("spendflow_sink_retries_total").is_some(),
    );
    want(
        "sink in-flight groups",
        value("spendflow_sink_inflight_groups").is_some_and(|v| (0.0..=1.0).contains(&v)),
    );
    want(
        "sink commit latency",
        at_least("spendflow_sink_commit_seconds_count", 1.0),
    );
    want(
        "checkpoint age",
        value("spendflow_checkpoint_age_seconds").is_some_and(|v| (0.0..600.0).contains(&v)),
    );
    want(
        "checkpoint duration",
        at_least("spendflow_checkpoint_duration_seconds_count", 1.0),
    );
    want(
        "checkpoint size",
        at_least("spendflow_checkpoint_size_bytes", 1.0),
    );
    want(
        "no checkpoint failures",
        value("spendflow_checkpoint_failures_total") == Some(0.0),
    );
    want(
        "GetStatus counted OK",
        at_least(
            r#"spendflow_grpc_requests_total{method="/spendflow.v1.Admin/GetStatus",code="OK"}"#,
            1.0,
        ),
    );
    want(
        "an unknown user counted NOT_FOUND",
        at_least(
            r#"spendflow_grpc_requests_total{method="/spendflow.v1.ExpenseQuery/GetUserSummary",code="NOT_FOUND"}"#,
            1.0,
        ),
    );
    want(
        "gRPC latency",
        at_least(
            r#"spendflow_grpc_request_duration_seconds_count{method="/spendflow.v1.Admin/GetStatus"}"#,
            1.0,
        ),
    );
    want(
        "the open subscription",
        at_least("spendflow_grpc_subscribers", 1.0),
    );
    want(
        "the open live page",
        at_least("spendflow_web_event_clients", 1.0),
    );
    want(
        "resident memory",
        at_least("spendflow_process_resident_memory_bytes", 1024.0 * 1024.0),
    );
    short
}

#[test]
fn metrics_are_scraped_from_the_web_port_and_the_metrics_address() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let cassandra = service_env("SPENDFLOW_CASSANDRA");
    let topic = unique_name("metrics");
    let keyspace = unique_name("metrics");
    create_topics(&brokers, &[(topic.clone(), 2)]);
    let kafka = producer(&brokers);
    for id in 0..VALID {
        let payload = record(id);
        let key = (id % 5 + 1).to_string();
        kafka
            .send(BaseRecord::to(&topic).key(&key).payload(&payload))
            .expect("queue a record");
    }
    kafka
        .send(
            BaseRecord::<str, str>::to(&topic)
                .partition(0)
                .payload("{not json"),
        )
        .expect("queue the malformed record");
    kafka.flush(Duration::from_secs(30)).expect("flush");

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("engine.log");
    let engine = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["run", "-w", "2", "--epoch-interval-ms", "50"])
        .args(["--input", &format!("kafka:{brokers}"), "--topic", &topic])
        .args(["--dead-letter-topic", &format!("{topic}_dead")])
        .args(["--sink", "cassandra", "--cassandra", &cassandra])
        .args(["--keyspace", &keyspace])
        .arg("--checkpoint-dir")
        .arg(dir.path().join("checkpoints"))
        .args(["--checkpoint-interval", "300ms"])
        .args(["--grpc", "127.0.0.1:0", "--web", "127.0.0.1:0"])
        .args(["--metrics", "127.0.0.1:0", "--log", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start spendflow run");
    let mut engine = Engine(engine);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(60);
    let (grpc, web, metrics) = loop {
        let found = (
            logged_addr(&log, "grpcurl -plaintext "),
            logged_addr(&log, "Serving the live web report at http://"),
            logged_addr(&log, "Serving Prometheus metrics at http://"),
        );
        if let (Some(grpc), Some(web), Some(metrics)) = found {
            break (grpc, web, metrics);
        }
        if let Some(exit) = engine.0.try_wait().unwrap() {
            panic!("the engine exited ({exit}); its log:\n{}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "no addresses logged in 60 s; log:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(web, metrics);

    // gRPC: a status call, a call that fails (unknown user), and a subscription held open.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let channel = crate::support::grpc::connect(&runtime, grpc);
    runtime
        .block_on(AdminClient::new(channel.clone()).get_status(pb::GetStatusRequest::default()))
        .expect("GetStatus");
    let unknown = runtime
        .block_on(ExpenseQueryClient::new(channel.clone()).get_user_summary(
            pb::GetUserSummaryRequest {
                user_id: 987_654,
                ..Default::default()
            },
        ))
        .expect_err("an unknown user");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let _subscription = runtime
        .block_on(
            ExpenseQueryClient::new(channel.clone()).subscribe(pb::SubscribeRequest {
                user_ids: vec![1],
                ..Default::default()
            }),
        )
        .expect("Subscribe")
        .into_inner();
    // A live page held open.
    let live = EventStream::open(web, "/api/events");
    assert_eq!(live.status, 200);

    let deadline = Instant::now() + Duration::from_secs(120);
    let (from_web, from_metrics) = loop {
        let scraped_web = get(web, "/metrics");
        let scraped_metrics = get(metrics, "/metrics");
        assert_eq!(scraped_web.status, 200, "{}", scraped_web.text());
        assert_eq!(scraped_metrics.status, 200, "{}", scraped_metrics.text());
        for scraped in [&scraped_web, &scraped_metrics] {
            assert!(
                scraped
                    .header("content-type")
                    .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
                "{:?}",
                scraped.header("content-type")
            );
        }
        let from_web = parse_exposition(&scraped_web.text());
        let from_metrics = parse_exposition(&scraped_metrics.text());
        let short_web = shortfalls(&from_web, &topic);
        let short_metrics = shortfalls(&from_metrics, &topic);
        if short_web.is_empty() && short_metrics.is_empty() {
            break (from_web, from_metrics);
        }
        if let Some(exit) = engine.0.try_wait().unwrap() {
            panic!("the engine exited ({exit}); its log:\n{}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "after 120 s, still missing on the web port: {short_web:?}, on --metrics: \
             {short_metrics:?}\nscrape:\n{}\nlog:\n{}",
            scraped_metrics.text(),
            log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Both addresses show the same registry.
    let web_names: Vec<_> = from_web
        .keys()
        .filter(|s| s.starts_with("spendflow_"))
        .collect();
    let metrics_names: Vec<_> = from_metrics
        .keys()
        .filter(|s| s.starts_with("spendflow_"))
        .collect();
    assert_eq!(web_names, metrics_names);
    // The --metrics address serves /metrics and nothing else.
    assert_eq!(get(metrics, "/").status, 404);
    assert_eq!(get(metrics, "/api/overview").status, 404);
    drop(live);

    drop(engine);
    runtime.block_on(async {
        if let Ok(session) = spendflow_engine::cassandra::connect(&cassandra).await {
            let _ = session
                .query(format!("DROP KEYSPACE IF EXISTS {keyspace}"))
                .await;
        }
    });
}
