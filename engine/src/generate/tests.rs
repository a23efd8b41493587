//! Unit tests without services: schema SQL, topic naming, batches, and the outbox protocol
//! against in-memory fakes of MySQL and Kafka that can fail ("crash") at any point.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use spendflow_operators::decode;
use spendflow_operators::model::{Expense, ExpenseId, Record, days_from_civil};

use super::budgets::Budgets;
use super::config::{DEFAULT_TOPIC_PREFIX, GenerateConfig, Layout};
use super::mysql::{
    DEFAULT_DATABASE, MIGRATIONS, database_of, datetime_value, delete_expenses_sql,
    insert_outbox_sql, pending_migrations, placeholders, upsert_expenses_sql,
    validate_database_name,
};
use super::{
    Batch, GenerateError, KindCounts, Observer, OutboxRow, Progress, Publish, ReferenceUpdate,
    RunState, Store, Summary, run_with,
};
use crate::source::generator::{GeneratorConfig, Simulator};

// ---------------------------------------------------------------------------------------------
// Schema and SQL
// ---------------------------------------------------------------------------------------------

#[test]
fn migration_one_creates_every_table_idempotently() {
    let ddl = MIGRATIONS[0].statements.join("\n");
    assert_eq!(MIGRATIONS[0].version, 1);
    for statement in MIGRATIONS[0].statements {
        assert!(
            statement
                .trim_start()
                .starts_with("CREATE TABLE IF NOT EXISTS"),
            "not idempotent: {statement}"
        );
    }
    for (table, columns) in [
        (
            "users",
            &[
                "user_id BIGINT UNSIGNED NOT NULL PRIMARY KEY",
                "name",
                "email",
                "country",
                "currency",
                "monthly_budget_minor BIGINT",
                "image_ref VARCHAR(512) NULL",
            ][..],
        ),
        ("cards", &["card_id", "user_id"][..]),
        ("merchants", &["name", "category"][..]),
        (
            "expenses",
            &[
                "expense_id VARBINARY(128) NOT NULL PRIMARY KEY",
                "user_id",
                "card_id",
                "merchant",
                "category",
                "amount_minor BIGINT",
                "currency",
                "event_ms BIGINT",
                "event_time DATETIME(3)",
            ][..],
        ),
        (
            "outbox",
            &[
                "seq BIGINT UNSIGNED NOT NULL PRIMARY KEY",
                "topic",
                "msg_key",
                "payload",
            ][..],
        ),
        (
            "generator_state",
            &["fingerprint", "records", "reference_done"][..],
        ),
    ] {
        let statement = MIGRATIONS[0]
            .statements
            .iter()
            .find(|s| s.contains(&format!("EXISTS {table} (")))
            .unwrap_or_else(|| panic!("no CREATE TABLE {table} in:\n{ddl}"));
        for column in columns {
            assert!(
                statement.contains(column),
                "{table} lacks {column}:\n{statement}"
            );
        }
    }
    // Names the engine groups by compare byte for byte.
    assert!(ddl.contains("category VARBINARY"));
    assert!(ddl.contains("merchant VARBINARY"));
    assert!(!ddl.contains("FLOAT") && !ddl.contains("DOUBLE") && !ddl.contains("DECIMAL"));
}

#[test]
fn migrations_are_ordered_and_pending_ones_are_found() {
    let versions: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(versions, sorted, "versions must increase");
    assert_eq!(pending_migrations(0).count(), MIGRATIONS.len());
    let latest = *versions.last().unwrap();
    assert_eq!(pending_migrations(latest).count(), 0);
}

#[test]
fn multi_row_statements_have_one_placeholder_per_value() {
    assert_eq!(placeholders(2, 3), "(?, ?, ?), (?, ?, ?)");
    let upsert = upsert_expenses_sql(3);
    assert_eq!(upsert.matches('?').count(), 27);
    assert!(upsert.contains("ON DUPLICATE KEY UPDATE"));
    for column in [
        "user_id",
        "card_id",
        "merchant",
        "category",
        "amount_minor",
        "currency",
        "event_ms",
        "event_time",
    ] {
        assert!(
            upsert.contains(&format!("{column} = VALUES({column})")),
            "an upsert must replace {column}"
        );
    }
    assert_eq!(delete_expenses_sql(4).matches('?').count(), 4);
    assert_eq!(insert_outbox_sql(5).matches('?').count(), 20);
}

#[test]
fn database_names_come_from_the_url_and_are_checked() {
    let (_, db) = database_of("mysql://u:p@127.0.0.1:3306/sf_test_1").unwrap();
    assert_eq!(db, "sf_test_1");
    let (_, db) = database_of("mysql://u:p@127.0.0.1:3306").unwrap();
    assert_eq!(db, DEFAULT_DATABASE);
    assert!(validate_database_name("spendflow").is_ok());
    assert!(validate_database_name("a`b").is_err());
    assert!(validate_database_name("").is_err());
    assert!(validate_database_name(&"x".repeat(65)).is_err());
    assert!(matches!(
        database_of("postgres://nope"),
        Err(crate::mysql_client::MySqlError::Config(_))
    ));
}

#[test]
fn datetime_values_are_utc_with_milliseconds() {
    let day = i64::from(days_from_civil(2026, 11, 24));
    let ms = day * 86_400_000 + 10 * 3_600_000 + 15 * 60_000 + 7_123;
    assert_eq!(
        datetime_value(ms),
        ::mysql::Value::Date(2026, 11, 24, 10, 15, 7, 123_000)
    );
    assert_eq!(
        datetime_value(0),
        ::mysql::Value::Date(1970, 1, 1, 0, 0, 0, 0)
    );
    // The last millisecond of a month stays in it.
    let dec1 = i64::from(days_from_civil(2026, 12, 1)) * 86_400_000;
    assert_eq!(
        datetime_value(dec1 - 1),
        ::mysql::Value::Date(2026, 11, 30, 23, 59, 59, 999_000)
    );
}

// ---------------------------------------------------------------------------------------------
// Topics and settings
// ---------------------------------------------------------------------------------------------

#[test]
fn topics_and_keys_follow_the_layout() {
    let per_user = Layout::default();
    assert_eq!(per_user.topic_for(42), format!("{DEFAULT_TOPIC_PREFIX}42"));
    assert_eq!(per_user.partitions(), 1);
    let keyed = Layout::Keyed {
        topic: "expenses".into(),
        partitions: 4,
    };
    assert_eq!(keyed.topic_for(42), "expenses");
    assert_eq!(keyed.partitions(), 4);
    assert_eq!(Layout::key_for(42), "42");

    // The pattern the engine subscribes with matches exactly the layout's topics.
    let re = regex::Regex::new(&format!("^(?:{})$", per_user.topic_pattern())).unwrap();
    assert!(re.is_match("expenses.user.7"));
    assert!(!re.is_match("expenses.user."));
    assert!(!re.is_match("expensesXuserX7"));
    assert!(!re.is_match("expenses.user.7.x"));
    let re = regex::Regex::new(&format!("^(?:{})$", keyed.topic_pattern())).unwrap();
    assert!(re.is_match("expenses") && !re.is_match("expensesX"));

    // The Kafka source reads the user back from the topic name.
    assert_eq!(
        crate::source::kafka::user_of_topic(&per_user.topic_for(9001), DEFAULT_TOPIC_PREFIX),
        Some(9001)
    );
}

#[test]
fn invalid_settings_name_the_flag() {
    let mut config = GenerateConfig::new("mysql://u@h/db", "127.0.0.1:9092");
    assert!(config.validate().is_ok());
    config.layout = Layout::PerUser {
        prefix: "bad prefix/".into(),
    };
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("--topic-prefix"), "{e}");
    config.layout = Layout::PerUser {
        prefix: "p".repeat(240),
    };
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--topic-prefix")
    );
    config.layout = Layout::Keyed {
        topic: "expenses".into(),
        partitions: 0,
    };
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--partitions")
    );
    config.layout = Layout::default();
    config.batch = 0;
    assert!(config.validate().is_err());
    config.batch = 10;
    config.brokers = " ".into();
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--brokers")
    );
    config.brokers = "b:1".into();
    config.simulator.bad_rate = 2.0;
    assert!(matches!(
        config.validate(),
        Err(GenerateError::Simulator(_))
    ));
}

#[test]
fn the_fingerprint_covers_what_determines_the_records() {
    let base = GenerateConfig::new("mysql://u@h/db", "b:1");
    let mut other = base.clone();
    other.events = Some(10);
    other.rate = Some(5);
    other.batch = 7;
    other.mysql_url = "mysql://x@y/z".into();
    assert_eq!(base.fingerprint(), other.fingerprint());
    let mut seed = base.clone();
    seed.simulator.seed += 1;
    assert_ne!(base.fingerprint(), seed.fingerprint());
    let mut layout = base.clone();
    layout.layout = Layout::Keyed {
        topic: "t".into(),
        partitions: 2,
    };
    assert_ne!(base.fingerprint(), layout.fingerprint());
}

#[test]
fn a_rate_makes_batches_small() {
    let mut config = GenerateConfig::new("mysql://u@h/db", "b:1");
    assert_eq!(config.effective_batch(), config.batch);
    config.rate = Some(100);
    assert_eq!(config.effective_batch(), 5);
    config.rate = Some(1);
    assert_eq!(config.effective_batch(), 1);
    config.rate = Some(10_000_000);
    assert_eq!(config.effective_batch(), config.batch);
}

// ---------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------

fn simulator(seed: u64, bad_rate: f64) -> Simulator {
    Simulator::new(GeneratorConfig {
        seed,
        users: 20,
        bad_rate,
        correction_rate: 0.2,
        delete_rate: 0.1,
        duplicate_rate: 0.1,
        live_window: 50,
        ..GeneratorConfig::default()
    })
    .unwrap()
}

/// Applies records one by one, as the engine does.
fn apply(state: &mut BTreeMap<ExpenseId, Expense>, record: Record) {
    match record {
        Record::Upsert(e) => {
            state.insert(e.expense_id.clone(), e);
        }
        Record::Delete { expense_id, .. } => {
            state.remove(&expense_id);
        }
    }
}

#[test]
fn a_batch_nets_out_to_applying_its_records_in_order() {
    let mut sim = simulator(7, 0.05);
    let layout = Layout::default();
    let mut sequential = BTreeMap::new();
    let mut netted = BTreeMap::new();
    for _ in 0..20 {
        let mut batch = Batch::with_capacity(100);
        for _ in 0..100 {
            let seq = sim.produced();
            let g = sim.next_record();
            if let Some(r) = g.record.clone() {
                apply(&mut sequential, r);
            }
            batch.push(seq, g, &layout);
        }
        // Each id once, upserts and deletes disjoint.
        let up: Vec<&str> = batch.upserts().map(|e| e.expense_id.as_str()).collect();
        let del: Vec<&str> = batch.deletes().collect();
        let mut all: Vec<&str> = up.iter().chain(del.iter()).copied().collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "an id appears twice in a batch's changes");
        for e in batch.upserts() {
            netted.insert(e.expense_id.clone(), e.clone());
        }
        for id in batch.deletes() {
            netted.remove(id);
        }
        // Every record (malformed included) is in the outbox, in stream order.
        assert_eq!(batch.len(), 100);
        assert!(batch.outbox().windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        assert_eq!(batch.end_seq(), Some(sim.produced()));
    }
    assert_eq!(sequential, netted);
}

#[test]
fn malformed_records_go_to_the_outbox_only() {
    let mut sim = Simulator::new(GeneratorConfig {
        bad_rate: 1.0,
        correction_rate: 0.0,
        delete_rate: 0.0,
        duplicate_rate: 0.0,
        refund_rate: 0.0,
        late_rate: 0.0,
        ..GeneratorConfig::default()
    })
    .unwrap();
    let mut batch = Batch::with_capacity(50);
    for _ in 0..50 {
        let seq = sim.produced();
        batch.push(seq, sim.next_record(), &Layout::default());
    }
    assert_eq!(batch.len(), 50);
    assert_eq!(batch.upserts().count() + batch.deletes().count(), 0);
    for row in batch.outbox() {
        assert!(decode(&row.payload).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// The outbox protocol against fakes that crash
// ---------------------------------------------------------------------------------------------

/// MySQL in memory. A "crash" is an error from a commit, which then changes nothing (as a
/// transaction that never committed).
#[derive(Default)]
struct MemStore {
    fingerprint: Option<String>,
    records: u64,
    reference_done: bool,
    users: u64,
    expenses: BTreeMap<ExpenseId, Expense>,
    outbox: BTreeMap<u64, OutboxRow>,
    /// The budgets written by `write_reference`.
    budgets: BTreeMap<u64, i64>,
    /// Budget and rate changes committed, with the records count of their batch.
    reference: Vec<(u64, ReferenceUpdate)>,
    /// Commits that succeed before one fails.
    commits_before_failure: Option<usize>,
}

impl Store for MemStore {
    fn database(&self) -> &str {
        "memory"
    }

    fn begin_run(&mut self, fingerprint: &str) -> Result<RunState, GenerateError> {
        match &self.fingerprint {
            Some(stored) if stored != fingerprint => Err(GenerateError::OtherRun {
                database: "memory".into(),
                stored: stored.clone(),
                wanted: fingerprint.into(),
            }),
            _ => {
                self.fingerprint = Some(fingerprint.to_string());
                Ok(RunState {
                    records: self.records,
                    reference_done: self.reference_done,
                })
            }
        }
    }

    fn write_reference(
        &mut self,
        simulator: &Simulator,
        budgets: &Budgets,
    ) -> Result<(), GenerateError> {
        self.users = simulator.config().users;
        self.budgets = (1..=self.users)
            .filter_map(|id| simulator.user(id))
            .map(|u| (u.user_id, budgets.of(u.user_id, u.monthly_budget_minor)))
            .collect();
        self.reference_done = true;
        Ok(())
    }

    fn pending_outbox(&mut self) -> Result<Vec<OutboxRow>, GenerateError> {
        Ok(self.outbox.values().cloned().collect())
    }

    fn commit_batch(
        &mut self,
        batch: &Batch,
        records: u64,
        published_below: Option<u64>,
    ) -> Result<(), GenerateError> {
        if let Some(n) = &mut self.commits_before_failure {
            if *n == 0 {
                return Err(GenerateError::Config("crash during commit".into()));
            }
            *n -= 1;
        }
        if let Some(below) = published_below {
            self.outbox.retain(|seq, _| *seq >= below);
        }
        for e in batch.upserts() {
            self.expenses.insert(e.expense_id.clone(), e.clone());
        }
        for id in batch.deletes() {
            self.expenses.remove(id);
        }
        for row in batch.outbox() {
            self.outbox.insert(row.seq, row.clone());
        }
        for update in batch.reference_updates() {
            self.reference.push((records, update.clone()));
        }
        self.records = records;
        Ok(())
    }

    fn delete_published(&mut self, below: u64) -> Result<(), GenerateError> {
        self.outbox.retain(|seq, _| *seq >= below);
        Ok(())
    }
}

/// Kafka in memory: one log per topic. Sent messages are delivered when waited for; a "crash"
/// delivers a prefix of them and fails.
#[derive(Default)]
struct MemKafka {
    in_flight: Vec<OutboxRow>,
    logs: BTreeMap<String, Vec<OutboxRow>>,
    /// Messages delivered before a failure.
    messages_before_failure: Option<usize>,
    /// Whether that failure is retriable (the run retries) or not (the run stops).
    retriable: bool,
    created: u64,
}

impl Publish for MemKafka {
    fn send(&mut self, rows: &[OutboxRow]) -> Result<(), GenerateError> {
        // The ordering invariant: nothing is sent while an earlier send is unacknowledged.
        assert!(
            self.in_flight.is_empty(),
            "a batch was sent before the previous one was acknowledged"
        );
        self.in_flight.extend_from_slice(rows);
        Ok(())
    }

    fn wait(&mut self) -> Result<(), GenerateError> {
        for row in std::mem::take(&mut self.in_flight) {
            if let Some(n) = &mut self.messages_before_failure {
                if *n == 0 {
                    self.messages_before_failure = None;
                    return Err(GenerateError::Kafka {
                        context: "test".into(),
                        message: "broker went away".into(),
                        retriable: self.retriable,
                    });
                }
                *n -= 1;
            }
            if !self.logs.contains_key(&row.topic) {
                self.created += 1;
            }
            self.logs.entry(row.topic.clone()).or_default().push(row);
        }
        Ok(())
    }

    fn topics_created(&self) -> u64 {
        self.created
    }
}

impl MemKafka {
    /// What an engine reading every topic converges to: the last record per expense, per
    /// topic in order; and the malformed messages it rejects, by stream position.
    fn consume(&self) -> (BTreeMap<ExpenseId, Expense>, BTreeMap<u64, Vec<u8>>) {
        let mut state = BTreeMap::new();
        let mut rejected = BTreeMap::new();
        for log in self.logs.values() {
            for row in log {
                match decode(&row.payload) {
                    Ok(record) => apply(&mut state, record),
                    Err(_) => {
                        rejected.insert(row.seq, row.payload.clone());
                    }
                }
            }
        }
        (state, rejected)
    }

    fn messages(&self) -> usize {
        self.logs.values().map(Vec::len).sum()
    }
}

fn config(events: u64, batch: usize) -> GenerateConfig {
    let mut config = GenerateConfig::new("mysql://memory/db", "memory:0");
    config.simulator = GeneratorConfig {
        seed: 11,
        users: 30,
        bad_rate: 0.02,
        correction_rate: 0.15,
        delete_rate: 0.08,
        duplicate_rate: 0.05,
        late_rate: 0.05,
        live_window: 200,
        ..GeneratorConfig::default()
    };
    config.events = Some(events);
    config.batch = batch;
    config
}

fn go(
    config: &GenerateConfig,
    store: &mut MemStore,
    kafka: &mut MemKafka,
) -> Result<Summary, GenerateError> {
    run_with(
        config,
        store,
        kafka,
        &mut (),
        &AtomicBool::new(false),
        Instant::now(),
    )
}

/// The reference: one uninterrupted run.
fn clean_run(config: &GenerateConfig) -> (MemStore, MemKafka, Summary) {
    let mut store = MemStore::default();
    let mut kafka = MemKafka::default();
    let summary = go(config, &mut store, &mut kafka).unwrap();
    (store, kafka, summary)
}

#[test]
fn an_uninterrupted_run_leaves_mysql_equal_to_what_kafka_delivers() {
    let config = config(3_000, 128);
    let (store, kafka, summary) = clean_run(&config);
    assert_eq!(summary.records, 3_000);
    assert_eq!(summary.kinds.total(), 3_000);
    assert!(summary.kinds.malformed_total() > 0);
    assert!(summary.kinds.correction > 0 && summary.kinds.delete > 0);
    assert!(store.outbox.is_empty(), "everything published is deleted");
    assert_eq!(store.records, 3_000);
    assert!(store.reference_done);
    assert_eq!(kafka.messages(), 3_000);
    let (delivered, rejected) = kafka.consume();
    assert_eq!(delivered, store.expenses);
    assert_eq!(rejected.len() as u64, summary.kinds.malformed_total());
    assert_eq!(summary.topics, kafka.logs.len() as u64);
    assert!(!summary.stopped);
}

/// Crashes at every kind of moment, then a restart with the same settings: MySQL ends equal to
/// the clean run's, Kafka delivers the same final state, and every malformed record is there.
#[test]
fn a_crash_anywhere_then_a_restart_converges_to_the_clean_run() {
    let config = config(2_000, 100);
    let (clean_store, _, clean_summary) = clean_run(&config);

    // (commits before the failed one, messages delivered before a publish failure)
    let cases: &[(Option<usize>, Option<usize>)] = &[
        (Some(0), None),         // crash in the first commit
        (Some(7), None),         // crash in a later commit
        (None, Some(0)),         // crash right after a commit, nothing published
        (None, Some(550)),       // crash in the middle of a batch's publish
        (None, Some(700)),       // crash at a batch boundary of the publish
        (Some(12), Some(1_150)), // both, the publish first
    ];
    for (&(commits, messages), delivered_anyway) in
        cases.iter().flat_map(|c| [(c, false), (c, true)])
    {
        let mut store = MemStore {
            commits_before_failure: commits,
            ..MemStore::default()
        };
        let mut kafka = MemKafka {
            messages_before_failure: messages,
            retriable: false,
            ..MemKafka::default()
        };
        let first = go(&config, &mut store, &mut kafka);
        assert!(first.is_err(), "case {commits:?}/{messages:?} should crash");
        let left_in_outbox = store.outbox.len() as u64;

        // The process is gone: what it had sent but not seen acknowledged is either lost or
        // delivered by the broker anyway.
        kafka.messages_before_failure = None;
        if delivered_anyway {
            kafka.wait().unwrap();
        } else {
            kafka.in_flight.clear();
        }

        // Restart: same settings, a working store and broker.
        store.commits_before_failure = None;
        let summary = go(&config, &mut store, &mut kafka).unwrap();
        assert_eq!(summary.records, 2_000);
        assert_eq!(summary.replayed, left_in_outbox);
        assert_eq!(summary.kinds, clean_summary.kinds, "fast-forward recounts");
        assert!(store.outbox.is_empty());
        assert_eq!(
            store.expenses, clean_store.expenses,
            "case {commits:?}/{messages:?}: MySQL differs from the clean run"
        );
        let (delivered, rejected) = kafka.consume();
        assert_eq!(
            delivered, store.expenses,
            "case {commits:?}/{messages:?}: Kafka's final state differs from MySQL"
        );
        assert_eq!(rejected.len() as u64, clean_summary.kinds.malformed_total());
        // Nothing is lost: every stream position reached Kafka at least once.
        let seqs: std::collections::BTreeSet<u64> =
            kafka.logs.values().flatten().map(|r| r.seq).collect();
        assert_eq!(seqs.len(), 2_000);
    }
}

#[test]
fn replay_preserves_per_expense_order() {
    // Crash in the middle of publishing a batch, after a correction of an expense whose
    // delete comes later in the same batch: the replay must end with the delete again.
    let config = config(1_500, 300);
    for cut in [1, 150, 299, 301, 450, 899] {
        let mut store = MemStore::default();
        let mut kafka = MemKafka {
            messages_before_failure: Some(cut),
            ..MemKafka::default()
        };
        assert!(go(&config, &mut store, &mut kafka).is_err());
        go(&config, &mut store, &mut kafka).unwrap();
        // Per topic: the last record of each expense is the latest in stream order.
        for log in kafka.logs.values() {
            let mut last_seq_by_id: HashMap<String, u64> = HashMap::new();
            let mut newest_seq_by_id: HashMap<String, u64> = HashMap::new();
            for row in log {
                if let Ok(record) = decode(&row.payload) {
                    let id = record.expense_id().to_string();
                    last_seq_by_id.insert(id.clone(), row.seq);
                    let newest = newest_seq_by_id.entry(id).or_insert(row.seq);
                    *newest = (*newest).max(row.seq);
                }
            }
            assert_eq!(last_seq_by_id, newest_seq_by_id, "cut at {cut}");
        }
        let (delivered, _) = kafka.consume();
        assert_eq!(delivered, store.expenses, "cut at {cut}");
    }
}

#[test]
fn a_retriable_publish_failure_is_retried_in_place() {
    let config = config(500, 100);
    let (clean_store, clean_kafka, _) = clean_run(&config);
    let mut store = MemStore::default();
    let mut kafka = MemKafka {
        messages_before_failure: Some(250),
        retriable: true,
        ..MemKafka::default()
    };
    let summary = go(&config, &mut store, &mut kafka).unwrap();
    assert_eq!(summary.records, 500);
    assert_eq!(store.expenses, clean_store.expenses);
    // The failed batch's first 50 messages went out twice.
    assert_eq!(kafka.messages(), clean_kafka.messages() + 50);
    assert_eq!(kafka.consume().0, store.expenses);
}

#[test]
fn a_restart_with_other_settings_is_refused() {
    let config_a = config(200, 50);
    let mut store = MemStore::default();
    let mut kafka = MemKafka::default();
    go(&config_a, &mut store, &mut kafka).unwrap();
    let mut config_b = config_a.clone();
    config_b.simulator.seed += 1;
    let e = go(&config_b, &mut store, &mut kafka).unwrap_err();
    assert!(matches!(e, GenerateError::OtherRun { .. }), "{e}");
    assert!(!e.is_retriable());
}

#[test]
fn a_finished_run_does_nothing_and_a_larger_target_extends_it() {
    let config_a = config(400, 64);
    let mut store = MemStore::default();
    let mut kafka = MemKafka::default();
    go(&config_a, &mut store, &mut kafka).unwrap();
    let again = go(&config_a, &mut store, &mut kafka).unwrap();
    assert_eq!(again.session_records(), 0);
    assert_eq!(kafka.messages(), 400);

    let mut config_b = config_a.clone();
    config_b.events = Some(900);
    let extended = go(&config_b, &mut store, &mut kafka).unwrap();
    assert_eq!(extended.resumed_from, 400);
    assert_eq!(extended.session_records(), 500);
    let (clean_store, clean_kafka, _) = clean_run(&config_b);
    assert_eq!(store.expenses, clean_store.expenses);
    assert_eq!(kafka.messages(), clean_kafka.messages());
}

#[test]
fn a_stop_request_finishes_the_batch_and_reports_it() {
    struct StopAfter<'a>(&'a AtomicBool, u64);
    impl Observer for StopAfter<'_> {
        fn progress(&mut self, progress: &Progress<'_>) {
            if progress.records >= self.1 {
                self.0.store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }
    let config = config(10_000, 100);
    let stop = AtomicBool::new(false);
    let mut store = MemStore::default();
    let mut kafka = MemKafka::default();
    let summary = run_with(
        &config,
        &mut store,
        &mut kafka,
        &mut StopAfter(&stop, 300),
        &stop,
        Instant::now(),
    )
    .unwrap();
    assert!(summary.stopped);
    assert_eq!(summary.records, 300);
    assert!(store.outbox.is_empty());
    assert_eq!(kafka.consume().0, store.expenses);
}

#[test]
fn the_summary_names_counts_topics_and_rate() {
    let config = config(600, 100);
    let (_, _, summary) = clean_run(&config);
    let text = summary.to_string();
    assert!(text.contains("600 records this start"), "{text}");
    assert!(text.contains("malformed"), "{text}");
    assert!(
        text.contains("per-user topics expenses.user.<user_id>"),
        "{text}"
    );
    let mut kinds = KindCounts::default();
    kinds.add(crate::source::generator::GeneratedKind::Malformed(
        "float_amount",
    ));
    kinds.add(crate::source::generator::GeneratedKind::New);
    assert_eq!((kinds.total(), kinds.malformed_total()), (2, 1));
}

#[test]
fn fx_rates_cover_every_currency_the_simulator_uses() {
    use super::mysql::FX_RATES;
    use spendflow_operators::reference::RATE_ONE;

    let sim = Simulator::new(GeneratorConfig {
        seed: 7,
        users: 5000,
        ..GeneratorConfig::default()
    })
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for user_id in 1..=sim.config().users {
        let user = sim.user(user_id).expect("a user");
        assert!(
            FX_RATES.iter().any(|(code, _)| *code == user.currency),
            "no rate for {}",
            user.currency
        );
        seen.insert(user.currency);
    }
    // Every country's currency shows up among 5000 users.
    assert_eq!(seen.len(), FX_RATES.len(), "{seen:?}");
    assert!(FX_RATES.contains(&("EUR", RATE_ONE)));
    for (code, rate) in FX_RATES {
        assert_eq!(code.len(), 3);
        assert!(code.bytes().all(|b| b.is_ascii_uppercase()), "{code}");
        assert!(*rate > 0, "{code}");
    }
    // A migration creates the table the CDC source reads.
    assert!(
        MIGRATIONS
            .iter()
            .flat_map(|m| m.statements)
            .any(|s| s.contains("CREATE TABLE IF NOT EXISTS fx_rates"))
    );
}

#[test]
fn budget_and_rate_changes_come_at_their_rates_interleaved_with_the_batches() {
    use super::mysql::FX_RATES;

    let mut changing = config(10_000, 250);
    changing.budget_change_rate = 2.5;
    changing.fx_change_rate = 0.3;
    let (store, _, _) = clean_run(&changing);
    let budgets: Vec<(u64, u64, i64)> = store
        .reference
        .iter()
        .filter_map(|(at, u)| match u {
            ReferenceUpdate::Budget {
                user_id,
                budget_minor,
            } => Some((*at, *user_id, *budget_minor)),
            ReferenceUpdate::Rate { .. } => None,
        })
        .collect();
    let rates: Vec<(u64, &str, i64)> = store
        .reference
        .iter()
        .filter_map(|(at, u)| match u {
            ReferenceUpdate::Rate {
                currency,
                rate_micros,
            } => Some((*at, *currency, *rate_micros)),
            ReferenceUpdate::Budget { .. } => None,
        })
        .collect();
    // 2.5 and 0.3 per 1,000 of 10,000 records.
    assert_eq!(budgets.len(), 25);
    assert_eq!(rates.len(), 3);
    // Spread over the run, not all in one batch.
    let batches: std::collections::BTreeSet<u64> = budgets.iter().map(|b| b.0).collect();
    assert!(batches.len() >= 10, "{batches:?}");
    for (_, user_id, budget) in &budgets {
        let base = store.budgets[user_id];
        assert!(
            *budget >= base / 2 && *budget <= base * 3 / 2 + 1000 && budget % 1000 == 0,
            "user {user_id}: {budget} from {base}"
        );
    }
    for (_, currency, rate) in &rates {
        assert_ne!(*currency, "EUR", "the reporting currency stays at 1");
        let base = FX_RATES.iter().find(|(c, _)| c == currency).unwrap().1;
        assert!(
            (rate - base).abs() * 50 <= base,
            "{currency}: {rate} from {base}"
        );
    }
    // Reproducible: the same run makes the same changes.
    let (again, _, _) = clean_run(&changing);
    assert_eq!(again.reference, store.reference);
    // None by default.
    let (quiet, _, _) = clean_run(&config(10_000, 250));
    assert!(quiet.reference.is_empty());
}

#[test]
fn change_rates_are_validated() {
    for bad in [-1.0, 1000.5, f64::NAN, f64::INFINITY] {
        let mut c = config(10, 10);
        c.budget_change_rate = bad;
        assert!(
            matches!(c.validate(), Err(GenerateError::Config(m)) if m.contains("--budget-change-rate"))
        );
        let mut c = config(10, 10);
        c.fx_change_rate = bad;
        assert!(
            matches!(c.validate(), Err(GenerateError::Config(m)) if m.contains("--fx-change-rate"))
        );
    }
}

#[test]
fn budgets_put_most_users_under_some_near_and_a_few_over() {
    use spendflow_operators::model::civil_from_days;

    let mut c = config(30_000, 1000);
    c.simulator.users = 200;
    let (store, _, _) = clean_run(&c);
    // The truth after the run: live expenses per user and UTC month.
    let mut months: BTreeMap<(u64, (i32, u32)), i128> = BTreeMap::new();
    for e in store.expenses.values() {
        let (y, m, _) = civil_from_days(e.event_ms.div_euclid(86_400_000) as i32);
        *months.entry((e.user_id, (y, m))).or_default() += i128::from(e.amount_minor);
    }
    let mut busiest: BTreeMap<u64, i128> = BTreeMap::new();
    for ((user, _), spent) in months {
        let max = busiest.entry(user).or_insert(i128::MIN);
        *max = (*max).max(spent);
    }
    let (mut under, mut near, mut over) = (0, 0, 0);
    for (user, spent) in &busiest {
        let budget = i128::from(store.budgets[user]);
        assert!(budget > 0);
        // Never the simulator's whole-month budget against a few hours of spending.
        assert!(
            budget <= spent.max(&1) * 3,
            "user {user}: {spent} of {budget}"
        );
        match spent * 100 / budget {
            i128::MIN..80 => under += 1,
            80..100 => near += 1,
            _ => over += 1,
        }
    }
    let all = under + near + over;
    assert!(
        under * 100 >= all * 55,
        "under {under}, near {near}, over {over}"
    );
    assert!(
        near * 100 >= all * 8,
        "under {under}, near {near}, over {over}"
    );
    assert!(
        over * 100 >= all * 3,
        "under {under}, near {near}, over {over}"
    );
    assert!(
        over < near && near < under,
        "under {under}, near {near}, over {over}"
    );
}

/// Against the services kit's MariaDB (`SPENDFLOW_MYSQL`; skipped when unset): `fx_rates` and
/// the calibrated budgets are written, and a batch's budget and rate changes are committed.
#[test]
fn mysql_store_writes_rates_budgets_and_changes() {
    use ::mysql::prelude::Queryable;

    use super::mysql::{FX_RATES, MySqlStore};

    let Some(base) = std::env::var("SPENDFLOW_MYSQL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    else {
        eprintln!("SPENDFLOW_MYSQL is not set: skipping (docker/native/services env)");
        return;
    };
    let (prefix, query) = match base.trim().split_once('?') {
        Some((p, q)) => (p.to_string(), format!("?{q}")),
        None => (base.trim().to_string(), String::new()),
    };
    let server = prefix.trim_start_matches("mysql://");
    let server = server.split_once('/').map_or(server, |(s, _)| s);
    let database = format!("spendflow_gen_fx_{:08x}", rand::random::<u32>());
    let url = format!("mysql://{server}/{database}{query}");

    let sim = simulator(3, 0.0);
    let budgets = Budgets::calibrate(sim.config(), Some(2000)).unwrap();
    let mut store = MySqlStore::open(&url).unwrap();
    store.begin_run("fingerprint").unwrap();
    store.write_reference(&sim, &budgets).unwrap();
    let mut batch = Batch::with_capacity(0);
    batch.push_reference(ReferenceUpdate::Budget {
        user_id: 2,
        budget_minor: 123_000,
    });
    batch.push_reference(ReferenceUpdate::Rate {
        currency: "USD",
        rate_micros: 930_000,
    });
    store.commit_batch(&batch, 0, None).unwrap();
    drop(store);

    let (mut conn, _) = crate::mysql_client::connect(&url, false).unwrap();
    let rates: Vec<(String, i64)> = conn
        .query("SELECT currency, rate_micros FROM fx_rates ORDER BY currency")
        .unwrap();
    let mut expected: Vec<(String, i64)> = FX_RATES
        .iter()
        .map(|(c, r)| (c.to_string(), if *c == "USD" { 930_000 } else { *r }))
        .collect();
    expected.sort();
    let users: Vec<(u64, i64)> = conn
        .query("SELECT user_id, monthly_budget_minor FROM users ORDER BY user_id")
        .unwrap();
    conn.query_drop(format!("DROP DATABASE `{database}`"))
        .unwrap();
    assert_eq!(rates, expected);
    assert_eq!(users.len() as u64, sim.config().users);
    for (user_id, budget) in users {
        let wanted = if user_id == 2 {
            123_000
        } else {
            budgets.of(user_id, sim.user(user_id).unwrap().monthly_budget_minor)
        };
        assert_eq!(budget, wanted, "user {user_id}");
    }
}
