//! Unit tests of the position encoding and row rules, and tests against the real MariaDB of the
//! services kit (`SPENDFLOW_MYSQL`, skipped when it is unset). Each service test works in a
//! database of its own and registers with a replica id of its own.

use std::time::{Duration, Instant};

use ::mysql::prelude::Queryable;
use ::mysql::{Conn, Row, Value};
use spendflow_operators::reference::{RefChange, RefKey, RefValue};

use super::stream::{Table, row_changes};
use super::*;

#[test]
fn positions_round_trip_and_grow_along_the_binlog() {
    let positions = [
        BinlogPosition { seq: 1, pos: 4 },
        BinlogPosition { seq: 1, pos: 328 },
        BinlogPosition {
            seq: 1,
            pos: u32::MAX,
        },
        BinlogPosition { seq: 2, pos: 4 },
        BinlogPosition { seq: 2, pos: 5000 },
        BinlogPosition {
            seq: 999_999,
            pos: 4,
        },
        BinlogPosition {
            seq: 1_000_000,
            pos: 256,
        },
        BinlogPosition {
            seq: BinlogPosition::MAX_SEQ,
            pos: u32::MAX,
        },
    ];
    for pair in positions.windows(2) {
        assert!(
            pair[0].encode() < pair[1].encode(),
            "{:?} before {:?}",
            pair[0],
            pair[1]
        );
    }
    for p in positions {
        assert!(p.encode() > 0);
        assert_eq!(BinlogPosition::decode(p.encode()), Some(p));
    }
    assert_eq!(BinlogPosition::decode(0), None);
    assert_eq!(BinlogPosition::decode(-5), None);
}

#[test]
fn file_names_split_and_rebuild() {
    assert_eq!(
        split_file_name("mariadb-bin.000042"),
        Some(("mariadb-bin", 42))
    );
    assert_eq!(
        split_file_name("my.bin.log.1000000"),
        Some(("my.bin.log", 1_000_000))
    );
    assert_eq!(split_file_name("mariadb-bin"), None);
    assert_eq!(split_file_name("mariadb-bin."), None);
    assert_eq!(split_file_name(".000001"), None);
    assert_eq!(split_file_name("bin.00x001"), None);
    let p = BinlogPosition::of_file("mariadb-bin.000042", 1234).unwrap();
    assert_eq!(p, BinlogPosition { seq: 42, pos: 1234 });
    assert_eq!(p.file_name("mariadb-bin"), "mariadb-bin.000042");
    assert_eq!(
        BinlogPosition {
            seq: 1_234_567,
            pos: 4
        }
        .file_name("b"),
        "b.1234567"
    );
}

fn user_values(id: i64, budget: Option<i64>, currency: &str) -> Vec<Value> {
    vec![
        Value::Int(id),
        budget.map_or(Value::NULL, Value::Int),
        Value::Bytes(currency.as_bytes().to_vec()),
    ]
}

fn set_user(id: u64, budget: Option<i64>, currency: &[u8; 3]) -> RefChange {
    RefChange {
        key: RefKey::User(id),
        value: Some(RefValue::User {
            budget_minor: budget,
            currency: *currency,
        }),
    }
}

fn set_fx(currency: &[u8; 3], rate_micros: i64) -> RefChange {
    RefChange {
        key: RefKey::Fx(*currency),
        value: Some(RefValue::Fx { rate_micros }),
    }
}

fn removed(key: RefKey) -> RefChange {
    RefChange { key, value: None }
}

#[test]
fn row_images_become_changes() {
    let mut out = Vec::new();
    let a = user_values(7, Some(50_000), "EUR");
    row_changes(Table::Users, None, Some(&a), &mut out);
    assert_eq!(out, vec![set_user(7, Some(50_000), b"EUR")]);

    // An update of columns the source does not read: nothing.
    out.clear();
    row_changes(Table::Users, Some(&a), Some(&a), &mut out);
    assert!(out.is_empty(), "{out:?}");

    // NULL budget, padded CHAR currency.
    let b = user_values(7, None, "USD ");
    row_changes(Table::Users, Some(&a), Some(&b), &mut out);
    assert_eq!(out, vec![set_user(7, None, b"USD")]);

    // A key change removes the old key.
    out.clear();
    let c = user_values(8, None, "USD");
    row_changes(Table::Users, Some(&b), Some(&c), &mut out);
    assert_eq!(
        out,
        vec![removed(RefKey::User(7)), set_user(8, None, b"USD")]
    );

    out.clear();
    row_changes(Table::Users, Some(&c), None, &mut out);
    assert_eq!(out, vec![removed(RefKey::User(8))]);

    // Bad currencies and rates are skipped.
    out.clear();
    for bad in ["eur", "EU", "EURO", "E1R", ""] {
        row_changes(
            Table::Users,
            None,
            Some(&user_values(9, None, bad)),
            &mut out,
        );
        let fx = [Value::Bytes(bad.as_bytes().to_vec()), Value::Int(1_000_000)];
        row_changes(Table::Fx, None, Some(&fx), &mut out);
    }
    for rate in [Value::Int(0), Value::Int(-1), Value::NULL] {
        row_changes(
            Table::Fx,
            None,
            Some(&[Value::Bytes(b"GBP".to_vec()), rate]),
            &mut out,
        );
    }
    assert!(out.is_empty(), "{out:?}");

    // The text protocol's values (the snapshot) decode like the binlog's.
    row_changes(
        Table::Fx,
        None,
        Some(&[
            Value::Bytes(b"GBP".to_vec()),
            Value::Bytes(b"1170000".to_vec()),
        ]),
        &mut out,
    );
    row_changes(
        Table::Users,
        None,
        Some(&[
            Value::Bytes(b"12".to_vec()),
            Value::Bytes(b"-3".to_vec()),
            Value::Bytes(b"CHF".to_vec()),
        ]),
        &mut out,
    );
    assert_eq!(
        out,
        vec![set_fx(b"GBP", 1_170_000), set_user(12, Some(-3), b"CHF")]
    );
}

// ---- against the real server ------------------------------------------------------------------

/// The kit's URL, or `None` (the test is skipped) when `SPENDFLOW_MYSQL` is unset.
fn service_url() -> Option<String> {
    match std::env::var("SPENDFLOW_MYSQL") {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_string()),
        _ => {
            eprintln!("SPENDFLOW_MYSQL is not set: skipping (docker/native/services env)");
            None
        }
    }
}

/// A database of the test's own, with `users`, `fx_rates` and an unrelated table.
struct TestDb {
    url: String,
    name: String,
    conn: Conn,
}

impl TestDb {
    fn create(base: &str, tag: &str) -> Self {
        let name = format!("spendflow_cdc_{tag}_{:08x}", rand::random::<u32>());
        let (prefix, query) = match base.split_once('?') {
            Some((p, q)) => (p, format!("?{q}")),
            None => (base, String::new()),
        };
        let server = prefix
            .strip_prefix("mysql://")
            .and_then(|rest| rest.split_once('/').map(|(auth_host, _)| auth_host))
            .unwrap_or_else(|| prefix.strip_prefix("mysql://").unwrap_or(prefix));
        let url = format!("mysql://{server}/{name}{query}");
        let (mut conn, _) = crate::mysql_client::connect(&url, true).expect("create the database");
        for sql in [
            "CREATE TABLE users (user_id BIGINT UNSIGNED NOT NULL PRIMARY KEY, \
             name VARCHAR(64) NOT NULL, currency CHAR(3) NOT NULL, \
             monthly_budget_minor BIGINT NULL)",
            "CREATE TABLE fx_rates (currency CHAR(3) NOT NULL PRIMARY KEY, \
             rate_micros BIGINT NOT NULL)",
            "CREATE TABLE other (id INT NOT NULL PRIMARY KEY, currency CHAR(3) NOT NULL)",
        ] {
            conn.query_drop(sql).expect(sql);
        }
        TestDb { url, name, conn }
    }

    fn run(&mut self, statements: &[&str]) {
        for sql in statements {
            self.conn.query_drop(*sql).expect(sql);
        }
    }

    /// The end of the binlog now.
    fn end(&mut self) -> i64 {
        let row: Row = self
            .conn
            .query_first("SHOW MASTER STATUS")
            .expect("SHOW MASTER STATUS")
            .expect("a binlog (the kit's MariaDB runs with --log-bin)");
        let file: String = row.get(0).unwrap();
        let pos: u64 = row.get(1).unwrap();
        BinlogPosition::of_file(&file, pos).unwrap().encode()
    }

    fn config(&self) -> MysqlCdcSourceConfig {
        MysqlCdcSourceConfig {
            url: self.url.clone(),
            // A replica id per reader: the server drops an older reader with the same id.
            server_id: 100_000 + rand::random::<u32>() % 1_000_000_000,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = self
            .conn
            .query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
    }
}

/// Polls until the source's position reaches `target`; returns the changes and the polls'
/// answers.
fn read_until(source: &mut MysqlCdcSource, target: i64) -> (Vec<RefChange>, Vec<Poll>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut changes = Vec::new();
    let mut answers = Vec::new();
    let mut out = Vec::new();
    while source.partitions()[0].position < target {
        assert!(
            Instant::now() < deadline,
            "the source did not reach {target} in 60 s: {source:?}, {changes:?}"
        );
        let answer = source.poll(&mut out, 100).expect("poll");
        answers.push(answer);
        for record in out.drain(..) {
            assert_eq!(record.partition, 0);
            match record.payload {
                Payload::Reference(change) => changes.push(change),
                other => panic!("not a reference change: {other:?}"),
            }
        }
        if answer != Poll::Ready {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    (changes, answers)
}

#[test]
fn snapshot_then_binlog_changes_in_commit_order() {
    let Some(base) = service_url() else { return };
    let mut db = TestDb::create(&base, "order");
    db.run(&[
        "INSERT INTO users VALUES (1, 'Ann', 'EUR', 50000), (2, 'Bob', 'USD', NULL), \
         (3, 'Cy', 'eur', 100)",
        "INSERT INTO fx_rates VALUES ('EUR', 1000000), ('USD', 920000)",
        "INSERT INTO other VALUES (1, 'EUR')",
    ]);
    let mut source = MysqlCdcSource::resume(db.config(), &RestoredPositions::new()).unwrap();
    assert_eq!(source.name(), format!("mysql:{}", db.name));
    let mut out = Vec::new();
    // Not caught up before the snapshot is taken.
    assert_ne!(source.poll(&mut out, 0).unwrap(), Poll::Idle);
    let end = db.end();
    let (mut snapshot, _) = read_until(&mut source, end);
    snapshot.sort();
    let mut expected = vec![
        set_user(1, Some(50_000), b"EUR"),
        set_user(2, None, b"USD"),
        // user 3's currency is lowercase: skipped with a WARN.
        set_fx(b"EUR", 1_000_000),
        set_fx(b"USD", 920_000),
    ];
    expected.sort();
    assert_eq!(snapshot, expected);

    db.run(&[
        "INSERT INTO users VALUES (4, 'Dee', 'GBP', 70000)",
        "UPDATE users SET monthly_budget_minor = 60000 WHERE user_id = 1",
        // Changes nothing: no rows event. Changes a column not read: no change.
        "UPDATE users SET monthly_budget_minor = 60000 WHERE user_id = 1",
        "UPDATE users SET name = 'Ann B' WHERE user_id = 1",
        "INSERT INTO other VALUES (2, 'GBP')",
        "UPDATE other SET currency = 'CHF'",
        "UPDATE fx_rates SET rate_micros = 925000 WHERE currency = 'USD'",
        "START TRANSACTION",
        "INSERT INTO fx_rates VALUES ('GBP', 1170000)",
        "UPDATE users SET monthly_budget_minor = NULL, currency = 'EUR' WHERE user_id = 2",
        "DELETE FROM users WHERE user_id = 4",
        "COMMIT",
        "START TRANSACTION",
        "UPDATE users SET monthly_budget_minor = 1 WHERE user_id = 1",
        "ROLLBACK",
        "DELETE FROM fx_rates WHERE currency = 'EUR'",
    ]);
    let end = db.end();
    let (changes, answers) = read_until(&mut source, end);
    assert_eq!(
        changes,
        vec![
            set_user(4, Some(70_000), b"GBP"),
            set_user(1, Some(60_000), b"EUR"),
            set_fx(b"USD", 925_000),
            set_fx(b"GBP", 1_170_000),
            set_user(2, None, b"EUR"),
            removed(RefKey::User(4)),
            removed(RefKey::Fx(*b"EUR")),
        ]
    );
    assert!(answers.iter().all(|a| *a != Poll::Finished), "{answers:?}");
    // Caught up: nothing pending, the snapshot taken, past the end seen at open.
    assert_eq!(source.poll(&mut out, 100).unwrap(), Poll::Idle);
    assert!(out.is_empty());
    let partitions = source.partitions();
    assert_eq!(partitions.len(), 1);
    assert!(partitions[0].position >= end);
}

#[test]
fn a_resumed_reader_yields_exactly_the_later_changes() {
    let Some(base) = service_url() else { return };
    let mut db = TestDb::create(&base, "resume");
    db.run(&["INSERT INTO users VALUES (1, 'Ann', 'EUR', 50000)"]);
    let config = db.config();
    let mut first = MysqlCdcSource::resume(config.clone(), &RestoredPositions::new()).unwrap();
    let end = db.end();
    let (snapshot, _) = read_until(&mut first, end);
    assert_eq!(snapshot, vec![set_user(1, Some(50_000), b"EUR")]);
    db.run(&["UPDATE users SET monthly_budget_minor = 55000 WHERE user_id = 1"]);
    let end = db.end();
    let (changes, _) = read_until(&mut first, end);
    assert_eq!(changes, vec![set_user(1, Some(55_000), b"EUR")]);
    let taken = first.partitions()[0].position;
    drop(first);

    db.run(&[
        "INSERT INTO fx_rates VALUES ('USD', 920000)",
        "UPDATE users SET monthly_budget_minor = 56000 WHERE user_id = 1",
    ]);
    let mut restored = RestoredPositions::new();
    restored.insert((source_name(&db.name), 0), taken);
    let mut second = MysqlCdcSource::resume(config, &restored).unwrap();
    assert_eq!(second.partitions()[0].position, taken);
    let end = db.end();
    let (changes, _) = read_until(&mut second, end);
    assert_eq!(
        changes,
        vec![set_fx(b"USD", 920_000), set_user(1, Some(56_000), b"EUR")]
    );
}

#[test]
fn a_missing_binlog_file_is_fatal_and_says_what_to_do() {
    let Some(base) = service_url() else { return };
    let db = TestDb::create(&base, "purged");
    let mut restored = RestoredPositions::new();
    let gone = BinlogPosition {
        seq: 999_999,
        pos: 4,
    };
    restored.insert((source_name(&db.name), 0), gone.encode());
    let error = MysqlCdcSource::resume(db.config(), &restored).unwrap_err();
    assert!(!error.is_retriable(), "{error}");
    let message = error.to_string();
    assert!(message.contains(".999999"), "{message}");
    assert!(message.contains("no longer on the server"), "{message}");
    assert!(message.contains("empty checkpoint"), "{message}");
}

#[test]
fn a_dropped_connection_is_retried_from_the_last_position_taken() {
    let Some(base) = service_url() else { return };
    let mut db = TestDb::create(&base, "reconnect");
    db.run(&["INSERT INTO users VALUES (1, 'Ann', 'EUR', 50000)"]);
    let mut source = MysqlCdcSource::resume(db.config(), &RestoredPositions::new()).unwrap();
    let end = db.end();
    let (snapshot, _) = read_until(&mut source, end);
    assert_eq!(snapshot, vec![set_user(1, Some(50_000), b"EUR")]);
    db.run(&["UPDATE users SET monthly_budget_minor = 51000 WHERE user_id = 1"]);
    let end = db.end();
    let (changes, _) = read_until(&mut source, end);
    assert_eq!(changes, vec![set_user(1, Some(51_000), b"EUR")]);
    let taken = source.partitions()[0].position;

    // The server drops the reader's binlog connection.
    let dump = source.dump_connection_id();
    assert_ne!(dump, 0);
    db.run(&[&format!("KILL CONNECTION {dump}")]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    let error = loop {
        assert!(
            Instant::now() < deadline,
            "no error after the kill: {source:?}"
        );
        match source.poll(&mut out, 100) {
            Err(e) => break e,
            Ok(answer) => {
                assert!(out.is_empty(), "{out:?}");
                assert_ne!(answer, Poll::Finished);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    assert!(error.is_retriable(), "{error}");
    assert_eq!(source.partitions()[0].position, taken);

    // It reconnects and resumes where it stood: the next change once, nothing again.
    db.run(&["UPDATE users SET monthly_budget_minor = 52000 WHERE user_id = 1"]);
    let end = db.end();
    let (changes, _) = read_until(&mut source, end);
    assert_eq!(changes, vec![set_user(1, Some(52_000), b"EUR")]);
    assert_ne!(source.dump_connection_id(), dump);
    assert_eq!(source.poll(&mut out, 100).unwrap(), Poll::Idle);
}

#[test]
fn the_config_defaults_its_server_id_and_only_worker_0_reads() {
    use crate::source::{SourceConfig, WorkerPlace};

    let config: SourceConfig =
        toml::from_str("kind = \"mysql_cdc\"\nurl = \"mysql://u:p@127.0.0.1:1/db\"\n").unwrap();
    let SourceConfig::MysqlCdc(cdc) = &config else {
        panic!("{config:?}")
    };
    assert_eq!(cdc.server_id, DEFAULT_SERVER_ID);
    assert_ne!(DEFAULT_SERVER_ID, 1, "the kit's server is 1");
    let with_id: MysqlCdcSourceConfig =
        toml::from_str("url = \"mysql://u:p@h/db\"\nserver_id = 77\n").unwrap();
    assert_eq!(with_id.server_id, 77);
    assert!(toml::from_str::<MysqlCdcSourceConfig>("url = \"x\"\nserverid = 7\n").is_err());
    // Other workers get no reader (and never connect: port 1 would refuse).
    let readers = config
        .open_readers(
            WorkerPlace { index: 1, count: 2 },
            &RestoredPositions::new(),
        )
        .unwrap();
    assert!(readers.is_empty());
    // Worker 0 connects; here it cannot, and says so as a retriable error.
    let error = config
        .open_readers(
            WorkerPlace { index: 0, count: 2 },
            &RestoredPositions::new(),
        )
        .err()
        .expect("no server on port 1");
    assert!(error.is_retriable(), "{error}");
}
