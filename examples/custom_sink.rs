//! Embeds the engine with a durable sink of its own: every committed epoch appends the users
//! whose totals changed to a file, and the last line says which epoch is committed.
//!
//! Run: `cargo run -p spendflow-examples --example custom_sink`

use std::io::Write;
use std::time::Duration;

use spendflow_engine::Engine;
use spendflow_engine::core::{AggKey, Epoch};
use spendflow_engine::sink::{EpochGroup, Sink, SinkContext, SinkCounters, SinkError};

/// Appends `epoch user total count` lines; `commit` appends `committed <epoch>`.
#[derive(Debug)]
struct TotalsFile {
    file: std::fs::File,
    counters: SinkCounters,
}

impl Sink for TotalsFile {
    fn name(&self) -> &str {
        "totals-file"
    }

    fn open(&mut self, _: &SinkContext) -> Result<Option<Epoch>, SinkError> {
        Ok(None) // A new file: nothing committed before.
    }

    fn write(&mut self, group: &EpochGroup) -> Result<(), SinkError> {
        for cell in &group.cells {
            if let AggKey::User(user) = cell.key {
                writeln!(
                    self.file,
                    "{} {user} {} {}",
                    group.epoch, cell.sum, cell.count
                )
                .map_err(|e| SinkError::retriable(self.name(), e))?;
                self.counters.rows += 1;
            }
        }
        Ok(())
    }

    fn commit(&mut self, group: &EpochGroup) -> Result<(), SinkError> {
        writeln!(self.file, "committed {}", group.epoch)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| SinkError::retriable(self.name(), e))?;
        self.counters.groups += 1;
        Ok(())
    }

    fn counters(&self) -> SinkCounters {
        self.counters
    }
}

fn main() -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("spendflow-totals-{}.txt", std::process::id()));
    let (file, counters) = (std::fs::File::create(&path)?, SinkCounters::default());
    let engine = Engine::builder()
        .sink(TotalsFile { file, counters })
        .start()?;
    for (id, user, amount) in [("e-1", 42, 1_299), ("e-2", 7, 850), ("e-1", 42, 1_000)] {
        engine.input().push_json(format!(
            r#"{{"expense_id":"{id}","user_id":{user},"merchant":"Corner Shop","category":"groceries","amount_minor":{amount},"currency":"EUR","event_time":"2026-11-20T12:00:00Z"}}"#
        ))?;
    }
    anyhow::ensure!(
        engine.wait_caught_up(Duration::from_secs(5)),
        "not caught up in 5 s"
    );
    engine.shutdown()?; // Writes and commits what is queued.

    let written = std::fs::read_to_string(&path)?;
    print!("{} wrote:\n{written}", path.display());
    let last = written.lines().last().unwrap_or_default();
    let ok = written.lines().any(|l| l.ends_with(" 42 1000 1")) && last.starts_with("committed ");
    anyhow::ensure!(
        ok,
        "user 42's corrected total, or the final commit, is missing"
    );
    std::fs::remove_file(&path)?;
    Ok(())
}
