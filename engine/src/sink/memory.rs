//! A durable sink that keeps what it is given in memory: the smallest complete implementation
//! of the [`Sink`] contract, for tests and for embedding programs that want the committed
//! stream without an external store.
//!
//! Clones share one store, so a test can hand one clone to an engine and read the other; a
//! store handed to a second engine after the first stopped behaves like a database that
//! survived the restart (`open` returns the last committed epoch).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use spendflow_operators::AggKey;

use super::{EpochGroup, Sink, SinkContext, SinkCounters, SinkError};
use crate::core::{CellValue, Epoch};

/// What a [`MemorySink`] holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryState {
    /// Every live cell, as written (cells written as removed are dropped).
    pub cells: BTreeMap<AggKey, CellValue>,
    /// The newest committed epoch.
    pub committed: Option<Epoch>,
    /// The epochs committed, in order.
    pub commits: Vec<Epoch>,
    /// Times the sink was opened.
    pub opens: u64,
}

/// See the module docs.
///
/// ```
/// use std::time::Duration;
/// use spendflow_engine::Engine;
/// use spendflow_engine::core::AggKey;
/// use spendflow_engine::sink::memory::MemorySink;
///
/// let sink = MemorySink::new();
/// let engine = Engine::builder().sink(sink.clone()).start()?;
/// engine.input().push_json(
///     r#"{"expense_id":"e-1","user_id":42,"merchant":"Tesco","category":"groceries",
///         "amount_minor":1299,"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}"#,
/// )?;
/// engine.wait_caught_up(Duration::from_secs(5));
/// engine.shutdown()?; // The sink writes and commits what is queued.
/// let held = sink.state();
/// assert_eq!(held.cells[&AggKey::User(42)].sum, 1299);
/// assert!(held.committed.is_some());
/// # Ok::<(), spendflow_engine::EngineError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemorySink {
    state: Arc<Mutex<MemoryState>>,
    counters: SinkCounters,
}

impl MemorySink {
    /// An empty store.
    pub fn new() -> Self {
        MemorySink::default()
    }

    /// A copy of what the store holds now.
    pub fn state(&self) -> MemoryState {
        self.state.lock().clone()
    }
}

impl Sink for MemorySink {
    fn name(&self) -> &str {
        "memory"
    }

    fn open(&mut self, _ctx: &SinkContext) -> Result<Option<Epoch>, SinkError> {
        let mut state = self.state.lock();
        state.opens += 1;
        Ok(state.committed)
    }

    fn write(&mut self, group: &EpochGroup) -> Result<(), SinkError> {
        let mut state = self.state.lock();
        for cell in &group.cells {
            if cell.removed() {
                state.cells.remove(&cell.key);
            } else {
                state.cells.insert(cell.key, cell.clone());
            }
        }
        drop(state);
        self.counters.rows += group.cells.len() as u64;
        self.counters.batches += 1;
        Ok(())
    }

    fn commit(&mut self, group: &EpochGroup) -> Result<(), SinkError> {
        let mut state = self.state.lock();
        state.committed = Some(group.epoch);
        state.commits.push(group.epoch);
        drop(state);
        self.counters.groups += 1;
        Ok(())
    }

    fn counters(&self) -> SinkCounters {
        self.counters
    }
}
