//! The Cassandra side of the measurements: catch-up to Cassandra (the newest committed
//! `sink_progress` row covers every record) and freshness to Cassandra (the marker user's
//! `user_totals` row shows the marker).
//!
//! Both need `spendflow run --sink cassandra`; [`detect`] finds out whether the engine binary
//! has it (an older binary does not: the report then prints "n/a" for these figures and the
//! engine runs without a sink). Each engine process of the harness writes a keyspace of its
//! own, created with the sink's tables *before* the engine starts (a restarted production
//! engine finds its tables too; schema changes take Cassandra seconds, which would otherwise be
//! counted as catch-up), and dropped when the process is done.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use cdrs_tokio::query_values;
use cdrs_tokio::types::IntoRustByName;
use spendflow_engine::cassandra::schema::{SINK_NAME, create_keyspace, create_tables};
use spendflow_engine::cassandra::{CqlSession, connect};

use crate::util::wall_ms;

/// Whether the Cassandra figures can be measured, and if not, why.
#[derive(Clone, Debug)]
pub enum Availability {
    /// The engine has `--sink cassandra`; this is Cassandra's `HOST:PORT`.
    Available(String),
    /// The reason the figures are "n/a".
    Unavailable(String),
}

/// Finds out whether `spendflow run` has the Cassandra sink (`--sink` in its help) and
/// Cassandra answers at `addr`.
pub fn detect(spendflow: &Path, addr: Option<&str>) -> Availability {
    let Some(addr) = addr else {
        return Availability::Unavailable("sink not used (--no-cassandra)".into());
    };
    let help = Command::new(spendflow)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !help.contains("--sink") {
        return Availability::Unavailable("sink not available in this spendflow binary".into());
    }
    match Cql::connect(addr) {
        Ok(_) => Availability::Available(addr.to_string()),
        Err(e) => Availability::Unavailable(format!("Cassandra not reachable at {addr}: {e:#}")),
    }
}

/// A CQL session with its own runtime, for the harness's synchronous code.
#[derive(Clone)]
pub struct Cql {
    runtime: Arc<tokio::runtime::Runtime>,
    session: Arc<CqlSession>,
}

impl Cql {
    pub fn connect(addr: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let session = runtime
            .block_on(connect(addr))
            .map_err(|e| anyhow!("{e}"))?;
        Ok(Cql {
            runtime: Arc::new(runtime),
            session,
        })
    }

    fn execute(&self, cql: String) -> Result<()> {
        self.runtime
            .block_on(self.session.query(cql.clone()))
            .with_context(|| format!("CQL: {cql}"))?;
        Ok(())
    }

    /// Creates `keyspace` (one replica) with the sink's tables.
    pub fn create_schema(&self, keyspace: &str) -> Result<()> {
        self.execute(
            create_keyspace(
                keyspace,
                "{'class': 'SimpleStrategy', 'replication_factor': 1}",
            )
            .map_err(|e| anyhow::anyhow!("keyspace {keyspace}: {e}"))?,
        )?;
        for table in create_tables(keyspace) {
            self.execute(table)?;
        }
        Ok(())
    }

    pub fn drop_keyspace(&self, keyspace: &str) -> Result<()> {
        self.execute(format!("DROP KEYSPACE IF EXISTS {keyspace}"))
    }

    /// `records_covered` of the newest committed `sink_progress` row (0 if none).
    pub fn records_covered(&self, keyspace: &str) -> Result<u64> {
        let rows = self
            .runtime
            .block_on(self.session.query_with_values(
                format!(
                    "SELECT records_covered, committed FROM {keyspace}.sink_progress WHERE sink = ? \
                     LIMIT 20"
                ),
                query_values!(SINK_NAME.to_string()),
            ))?
            .response_body()?
            .into_rows()
            .unwrap_or_default();
        Ok(rows
            .iter()
            .find_map(|row| {
                let committed: Option<bool> = row.get_by_name("committed").ok().flatten();
                let covered: Option<i64> = row.get_by_name("records_covered").ok().flatten();
                covered.filter(|_| committed == Some(true))
            })
            .unwrap_or(0)
            .max(0) as u64)
    }

    /// The user's `expense_count` in `user_totals` (0 without a row).
    async fn user_count(session: &CqlSession, keyspace: &str, user: u64) -> Result<u64> {
        let rows = session
            .query_with_values(
                format!("SELECT expense_count FROM {keyspace}.user_totals WHERE user_id = ?"),
                query_values!(user as i64),
            )
            .await?
            .response_body()?
            .into_rows()
            .unwrap_or_default();
        Ok(rows
            .first()
            .and_then(|r| {
                let count: Option<i64> = r.get_by_name("expense_count").ok().flatten();
                count
            })
            .unwrap_or(0)
            .max(0) as u64)
    }

    /// Polls the user's row every `every` until the receiver is dropped; sends
    /// `(expense_count, wall ms)` whenever the count changes (and once at the start).
    pub fn watch_user(
        &self,
        keyspace: &str,
        user: u64,
        every: Duration,
    ) -> mpsc::Receiver<(u64, i64)> {
        let (tx, rx) = mpsc::channel();
        let session = Arc::clone(&self.session);
        let keyspace = keyspace.to_string();
        self.runtime.spawn(async move {
            let mut last = None;
            loop {
                let started = Instant::now();
                if let Ok(count) = Cql::user_count(&session, &keyspace, user).await {
                    let ms = wall_ms();
                    if last != Some(count) {
                        last = Some(count);
                        if tx.send((count, ms)).is_err() {
                            return;
                        }
                    }
                } else if tx.send((last.unwrap_or(0), wall_ms())).is_err() {
                    return;
                }
                tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
            }
        });
        rx
    }
}
