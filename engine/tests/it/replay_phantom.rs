//! No phantom rows after a replay, against the real Cassandra (issue: cells whose changes cancel
//! inside a replayed epoch were never rewritten).
//!
//! The scenario, step by step, each step waiting for what it needs to see (no sleep-and-hope):
//!
//! 1. The engine reads expense Y and takes a checkpoint; it is killed with SIGKILL.
//! 2. Expense X is appended; a new engine (no checkpoint for an hour) writes X to Cassandra, and
//!    is killed with SIGKILL: Cassandra now holds X's cells, the checkpoint does not know X.
//! 3. The delete of X is appended; a new engine restores the checkpoint and replays X's insert
//!    and delete from the file in one poll, so into one epoch, where their changes cancel.
//!
//! Cassandra must end up holding Y alone: X's merchant, category, day and month rows gone (or
//! back to Y's values) and the user's total back to Y's. Before the fix, X's rows stayed forever.
//! Needs SPENDFLOW_CASSANDRA (`docker/native/services env`).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdrs_tokio::types::IntoRustByName;
use spendflow_engine::cassandra::connect;

use crate::support::{service_env, unique_name};

const USER: u64 = 7;

struct Setup {
    cassandra: String,
    keyspace: String,
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
}

impl Setup {
    fn input(&self) -> PathBuf {
        self.dir.path().join("input.jsonl")
    }

    fn checkpoints(&self) -> PathBuf {
        self.dir.path().join("checkpoints")
    }

    fn append(&self, line: &str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.input())
            .unwrap();
        writeln!(file, "{line}").unwrap();
        file.sync_all().unwrap();
    }

    /// Starts the real binary on the input file with the Cassandra sink and checkpoints.
    fn engine(&self, checkpoint_interval: &str, log: &str) -> Child {
        let grpc = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .arg("run")
            .arg("--input")
            .arg(format!("file:{}", self.input().display()))
            .args(["--follow", "-w", "2", "--sink", "cassandra"])
            .args(["--cassandra", &self.cassandra, "--keyspace", &self.keyspace])
            .arg("--checkpoint-dir")
            .arg(self.checkpoints())
            .args(["--checkpoint-interval", checkpoint_interval])
            .args(["--grpc", &grpc.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start spendflow run")
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// `(key, total_minor, expense_count)` of every row of a table for the user.
    fn rows(&self, table: &str, key: &str) -> Vec<(String, i64, i64)> {
        let cql = format!(
            "SELECT {key}, total_minor, expense_count FROM {}.{table} WHERE user_id = {USER}",
            self.keyspace
        );
        self.query(cql)
            .into_iter()
            .map(|row| {
                let name: String = row.get_r_by_name(key).unwrap();
                let total: i64 = row.get_r_by_name("total_minor").unwrap();
                let count: i64 = row.get_r_by_name("expense_count").unwrap();
                (name, total, count)
            })
            .collect()
    }

    fn user_total(&self) -> Option<(i64, i64)> {
        let cql = format!(
            "SELECT total_minor, expense_count FROM {}.user_totals WHERE user_id = {USER}",
            self.keyspace
        );
        self.query(cql).first().map(|row| {
            (
                row.get_r_by_name("total_minor").unwrap(),
                row.get_r_by_name("expense_count").unwrap(),
            )
        })
    }

    /// The input position (bytes of the file) the newest committed progress row covers.
    fn committed_position(&self) -> Option<i64> {
        let cql = format!(
            "SELECT positions, committed FROM {}.sink_progress WHERE sink = 'main' LIMIT 20",
            self.keyspace
        );
        self.query(cql).into_iter().find_map(|row| {
            let committed: Option<bool> = row.get_by_name("committed").ok().flatten();
            if committed != Some(true) {
                return None;
            }
            let positions: String = row.get_r_by_name("positions").ok()?;
            let positions: Vec<serde_json::Value> = serde_json::from_str(&positions).ok()?;
            positions
                .iter()
                .filter(|p| p["source"].as_str().is_some_and(|s| s.starts_with("file:")))
                .filter_map(|p| p["position"].as_i64())
                .max()
        })
    }

    fn query(&self, cql: String) -> Vec<cdrs_tokio::types::rows::Row> {
        self.runtime.block_on(async {
            let session = connect(&self.cassandra).await.unwrap();
            match session.query(cql).await {
                Ok(envelope) => envelope
                    .response_body()
                    .unwrap()
                    .into_rows()
                    .unwrap_or_default(),
                // The keyspace or table does not exist yet.
                Err(_) => Vec::new(),
            }
        })
    }

    fn checkpoint_files(&self) -> Vec<String> {
        std::fs::read_dir(self.checkpoints())
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with("checkpoint"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn record(id: &str, merchant: &str, category: &str, amount: i64, day: u32) -> String {
    format!(
        r#"{{"expense_id":"{id}","user_id":{USER},"merchant":"{merchant}","category":"{category}","amount_minor":{amount},"currency":"EUR","event_time":"2026-10-{day:02}T10:00:00Z"}}"#
    )
}

/// Waits for `done`, failing with the engine's log if the engine exits or `done` does not
/// happen within `secs`.
fn wait(
    setup: &Setup,
    engine: &mut Child,
    log: &str,
    secs: u64,
    what: &str,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        if let Some(exit) = engine.try_wait().unwrap() {
            panic!(
                "the engine exited ({exit}) while waiting for {what}; its log:\n{}",
                setup.log(log)
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}; engine log:\n{}",
            setup.log(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(mut child: Child) {
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
}

#[test]
fn replayed_changes_that_cancel_still_rewrite_their_cells() {
    let setup = Setup {
        cassandra: service_env("SPENDFLOW_CASSANDRA"),
        keyspace: unique_name("spendflow_it_phantom"),
        dir: tempfile::tempdir().unwrap(),
        runtime: tokio::runtime::Runtime::new().unwrap(),
    };
    std::fs::create_dir_all(setup.checkpoints()).unwrap();
    let size = |s: &Setup| std::fs::metadata(s.input()).unwrap().len() as i64;

    // 1. Y, written and checkpointed.
    setup.append(&record("y", "Keep Market", "groceries", 1_000, 3));
    let mut engine = setup.engine("1s", "1.log");
    wait(
        &setup,
        &mut engine,
        "1.log",
        120,
        "a checkpoint covering Y",
        || !setup.checkpoint_files().is_empty(),
    );
    kill(engine);
    let checkpoints = setup.checkpoint_files();
    assert_eq!(setup.user_total(), Some((1_000, 1)));

    // 2. X written to Cassandra by an engine that takes no checkpoint, then killed.
    setup.append(&record("x", "Phantom Shop", "travel", 250, 17));
    let mut engine = setup.engine("60m", "2.log");
    let covered = size(&setup);
    wait(
        &setup,
        &mut engine,
        "2.log",
        120,
        "X committed to Cassandra",
        || setup.committed_position() >= Some(covered),
    );
    kill(engine);
    assert_eq!(setup.user_total(), Some((1_250, 2)));
    assert_eq!(
        setup.rows("user_merchant_totals", "merchant"),
        vec![
            ("Keep Market".to_string(), 1_000, 1),
            ("Phantom Shop".to_string(), 250, 1)
        ]
    );
    assert_eq!(
        setup.checkpoint_files(),
        checkpoints,
        "no checkpoint may cover X: the replay must start before it"
    );

    // 3. X deleted; the replay reads insert and delete of X into one epoch.
    setup.append(&format!(
        r#"{{"expense_id":"x","user_id":{USER},"op":"delete"}}"#
    ));
    let mut engine = setup.engine("60m", "3.log");
    let covered = size(&setup);
    wait(
        &setup,
        &mut engine,
        "3.log",
        120,
        "the delete committed to Cassandra",
        || setup.committed_position() >= Some(covered),
    );
    kill(engine);

    let log = setup.log("3.log");
    assert!(log.contains("Restoring a checkpoint"), "{log}");
    assert_eq!(setup.user_total(), Some((1_000, 1)), "the user's total");
    assert_eq!(
        setup.rows("user_merchant_totals", "merchant"),
        vec![("Keep Market".to_string(), 1_000, 1)],
        "merchants"
    );
    assert_eq!(
        setup.rows("user_category_totals", "category"),
        vec![("groceries".to_string(), 1_000, 1)],
        "categories"
    );
    assert_eq!(
        setup.rows("user_daily_totals", "day"),
        vec![("2026-10-03".to_string(), 1_000, 1)],
        "days"
    );
    assert_eq!(
        setup.rows("user_monthly_totals", "month"),
        vec![("2026-10".to_string(), 1_000, 1)],
        "months (X's change of the shared month cancels too)"
    );
}
