//! Sinks: where results and rejected records go.
//!
//! * The in-memory store of results is the read model (`serve::read_model`), which every
//!   engine has.
//! * A **durable sink** ([`Sink`]) receives the same per-epoch changes, merged into
//!   [`EpochGroup`]s, from the sink driver thread (`pipeline::sink_driver`): [`cassandra`], or
//!   any implementation an embedding program hands to `EngineBuilder::sink`. [`memory`] keeps
//!   them in memory (tests, examples).
//! * [`alerts`]: budget alert changes, once each, on a Kafka topic.
//! * [`dead_letter`]: rejected records, kept in a bounded collection with counts by reason, and
//!   sent to a dead-letter topic where there is one.
//!
//! # The contract of a durable sink
//!
//! ```text
//!   open(ctx) ──> committed epoch C (or none)          once, before anything else
//!   write(G1) ──> commit(G1) ──> write(G2) ──> ...     groups in epoch order, each after C
//! ```
//!
//! * A group holds the **absolute** value of every cell that changed in its epochs (never a
//!   difference), so writing a group twice, or a later group over an earlier one, converges to
//!   the same state: a retry after a crash or a failed call is always safe.
//! * `commit(G)` records `G.epoch` as done; after a restart `open` returns the newest committed
//!   epoch, and the engine resumes from its checkpoint with every re-read cell written again
//!   (so a sink ahead of the checkpoint converges too).
//! * Errors say what the driver does next ([`SinkError`]): **retriable** ones are retried by the
//!   sink itself for as long as it likes; one returned to the driver stops the sink for this
//!   run (the input waits, nothing is lost: the next start writes again from the checkpoint).
//!   **Fenced** means another engine took the output over; **fatal** means retrying cannot help.
//!   Both stop the engine with the error.
//!
//! A new sink is one folder here (config, the `Sink` impl, tests) and one [`SinkConfig`]
//! variant.

pub mod alerts;
#[cfg(feature = "cassandra")]
pub mod cassandra;
pub mod dead_letter;
mod inbox;
pub mod memory;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use spendflow_operators::AggKey;

use crate::core::{CellValue, Epoch, PartitionPosition};

pub(crate) use inbox::SinkInbox;

/// The default of [`Sink::max_group_cells`]: 64 bytes a cell in the waiting group (up to
/// twice that while its sorted runs wait to be merged), so some 256–512 MB at most, and only for
/// a state that large whose sink is far behind.
pub const DEFAULT_MAX_GROUP_CELLS: usize = 4_000_000;

/// One or more consecutive closed epochs, merged: what one sink write covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochGroup {
    /// The last epoch of the group.
    pub epoch: Epoch,
    /// Input positions the group's state covers.
    pub positions: Arc<Vec<PartitionPosition>>,
    /// Records read that the state covers.
    pub records_covered: u64,
    /// The new value of every cell that changed in any epoch of the group: sorted by key, one
    /// value per key. (A sorted `Vec` of values that carry their key: 64 bytes a cell, where a
    /// map by key held about 100.)
    pub cells: Vec<CellValue>,
}

impl EpochGroup {
    /// Adds a later epoch: its values replace earlier ones of the same cells. `cells` may come
    /// in any order; where a key repeats in it, the last value counts.
    pub fn merge(
        &mut self,
        epoch: Epoch,
        positions: Arc<Vec<PartitionPosition>>,
        records_covered: u64,
        cells: impl IntoIterator<Item = CellValue>,
    ) {
        self.epoch = epoch;
        self.positions = positions;
        self.records_covered = records_covered;
        let later = sorted_run(cells.into_iter().collect());
        self.cells = merge_runs(std::mem::take(&mut self.cells), later);
    }

    /// The group's value of `key`, if the cell changed in it.
    pub fn get(&self, key: &AggKey) -> Option<&CellValue> {
        self.cells
            .binary_search_by(|cell| cell.key.cmp(key))
            .ok()
            .map(|i| &self.cells[i])
    }
}

/// `cells` sorted by key with one value per key, the last one where a key repeats.
fn sorted_run(mut cells: Vec<CellValue>) -> Vec<CellValue> {
    if !cells.is_sorted_by(|a, b| a.key < b.key) {
        // Stable, so equal keys keep their order and the last of each run is the latest.
        cells.sort_by_key(|cell| cell.key);
        let mut unique: Vec<CellValue> = Vec::with_capacity(cells.len());
        for cell in cells {
            match unique.last_mut() {
                Some(last) if last.key == cell.key => *last = cell,
                _ => unique.push(cell),
            }
        }
        cells = unique;
    }
    cells
}

/// Merges two runs (each sorted by key, one value per key) into one; where both hold a key,
/// `later`'s value wins. One pass over both, in key order: no per-cell allocation or search.
fn merge_runs(earlier: Vec<CellValue>, later: Vec<CellValue>) -> Vec<CellValue> {
    if earlier.is_empty() {
        return later;
    }
    if later.is_empty() {
        return earlier;
    }
    let mut merged = Vec::with_capacity(earlier.len() + later.len());
    let mut earlier = earlier.into_iter().peekable();
    let mut later = later.into_iter().peekable();
    loop {
        let take_later = match (earlier.peek(), later.peek()) {
            (Some(a), Some(b)) => match a.key.cmp(&b.key) {
                std::cmp::Ordering::Less => false,
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Equal => {
                    earlier.next();
                    true
                }
            },
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (None, None) => break,
        };
        let next = if take_later {
            later.next()
        } else {
            earlier.next()
        };
        merged.extend(next);
    }
    merged
}

/// The group being gathered while the sink writes the previous one (see `SinkInbox`): each
/// published epoch is a sorted run of cells, and runs are merged as they come so that each run
/// is more than twice as long as the next (a cell is copied `O(log n)` times in all, each merge
/// a sequential pass). The finished group ([`GroupRuns::finish`]) is the merge of all runs.
///
/// Memory: a cell changed in several epochs is held once per run that has it until they merge,
/// but the runs hold fewer than twice the distinct cells (each run holds a cell once, and each
/// is less than half as long as the one before); [`GroupRuns::distinct_cells`] merges
/// everything first when the exact count is needed.
#[derive(Debug, Default)]
pub(crate) struct GroupRuns {
    epoch: Epoch,
    positions: Arc<Vec<PartitionPosition>>,
    records_covered: u64,
    /// Oldest first; each more than twice as long as the next.
    runs: Vec<Vec<CellValue>>,
}

impl GroupRuns {
    /// Adds a later epoch's cells (sorted by key, one per key, as a published epoch is; any
    /// other order is sorted first).
    pub(crate) fn push(
        &mut self,
        epoch: Epoch,
        positions: Arc<Vec<PartitionPosition>>,
        records_covered: u64,
        cells: Vec<CellValue>,
    ) {
        self.epoch = epoch;
        self.positions = positions;
        self.records_covered = records_covered;
        let mut run = sorted_run(cells);
        if run.is_empty() {
            return;
        }
        while let Some(last) = self.runs.last() {
            if last.len() > 2 * run.len() {
                break;
            }
            let last = self.runs.pop().expect("checked");
            run = merge_runs(last, run);
        }
        self.runs.push(run);
    }

    /// Cells held, counting a cell once per run that has it: at least the distinct cells.
    pub(crate) fn held_cells(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }

    /// The number of distinct cells (merges every run into one to count them).
    pub(crate) fn distinct_cells(&mut self) -> usize {
        self.compact();
        self.held_cells()
    }

    fn compact(&mut self) {
        while self.runs.len() > 1 {
            let later = self.runs.pop().expect("checked");
            let earlier = self.runs.pop().expect("checked");
            self.runs.push(merge_runs(earlier, later));
        }
    }

    /// The group: every run merged, later values winning.
    pub(crate) fn finish(mut self) -> EpochGroup {
        self.compact();
        EpochGroup {
            epoch: self.epoch,
            positions: self.positions,
            records_covered: self.records_covered,
            cells: self.runs.pop().unwrap_or_default(),
        }
    }
}

/// Counters of what a sink did, for logs, status and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkCounters {
    /// Groups committed.
    pub groups: u64,
    /// Rows (cells) written or deleted.
    pub rows: u64,
    /// Requests sent (retries not counted).
    pub batches: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
}

/// What a sink gets when it opens.
#[derive(Clone, Debug)]
pub struct SinkContext {
    /// Who is writing, for outputs that record an owner (`spendflow pid 1234`).
    pub owner: String,
    /// Set at shutdown (after a grace period): a sink that is retrying gives up and returns
    /// its last retriable error.
    pub stop: Arc<AtomicBool>,
    /// The engine's async runtime, for sinks with async clients: the sink driver thread is
    /// not one of its threads, so a sink may `block_on` it.
    pub runtime: tokio::runtime::Handle,
    /// This process's share of the sink: in a cluster, every process writes the users it owns
    /// and fences its own share (a single engine is share 0 of 1).
    pub share: crate::cluster::Share,
}

impl SinkContext {
    /// A context owned by `owner`, never told to stop, on `runtime`.
    pub fn new(owner: impl Into<String>, runtime: tokio::runtime::Handle) -> Self {
        SinkContext {
            owner: owner.into(),
            stop: Arc::default(),
            runtime,
            share: crate::cluster::Share::SINGLE,
        }
    }

    /// True once the sink should stop retrying.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// A sink that takes epoch groups; see the module docs for the contract.
pub trait Sink: Send + std::fmt::Debug {
    /// A short name for logs and errors (`cassandra`, `memory`, ...).
    fn name(&self) -> &str;

    /// Opens the output (connects, creates what is missing, claims it against other engines)
    /// and returns the newest epoch an earlier run committed, if any.
    ///
    /// # Errors
    ///
    /// A [`SinkError`]; the engine does not start.
    fn open(&mut self, ctx: &SinkContext) -> Result<Option<Epoch>, SinkError>;

    /// Writes the group's cells (absolute values; idempotent).
    ///
    /// # Errors
    ///
    /// A [`SinkError`]; any error stops this sink for the run.
    fn write(&mut self, group: &EpochGroup) -> Result<(), SinkError>;

    /// Records `group.epoch` as committed, once its cells are written.
    ///
    /// # Errors
    ///
    /// A [`SinkError`]; any error stops this sink for the run.
    fn commit(&mut self, group: &EpochGroup) -> Result<(), SinkError>;

    /// What the sink has done so far.
    fn counters(&self) -> SinkCounters;

    /// Distinct cells merged into the waiting group at most while the sink is busy, before
    /// the publisher waits for the sink (back-pressure on the sources beyond it). The group
    /// holds one value per cell, so it is bounded by the state anyway; this bound matters only
    /// for a huge state behind a very slow sink. Below it the read model never waits for the
    /// sink.
    fn max_group_cells(&self) -> usize {
        DEFAULT_MAX_GROUP_CELLS
    }
}

/// How a sink failed, and so what the engine does.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Trying again later may succeed (a node down, a timeout).
    #[error("{sink} sink: {source}")]
    Retriable {
        /// The sink's name.
        sink: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another writer took the output over: this engine must stop writing.
    #[error("{sink} sink: {source}")]
    Fenced {
        /// The sink's name.
        sink: String,
        /// Who took over.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Retrying cannot help (a setting, a value the output cannot hold).
    #[error("{sink} sink: {source}")]
    Fatal {
        /// The sink's name.
        sink: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SinkError {
    /// A retriable error of `sink`.
    pub fn retriable(
        sink: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        SinkError::Retriable {
            sink: sink.into(),
            source: source.into(),
        }
    }

    /// A fatal error of `sink`.
    pub fn fatal(
        sink: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        SinkError::Fatal {
            sink: sink.into(),
            source: source.into(),
        }
    }

    /// True if trying again later may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self, SinkError::Retriable { .. })
    }

    /// True if another writer took the output over.
    pub fn is_fenced(&self) -> bool {
        matches!(self, SinkError::Fenced { .. })
    }
}

/// A durable sink configured by name (the command line, a config file). Embedding programs
/// can also hand the engine any [`Sink`] directly.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// Cassandra tables (see `cassandra::schema`).
    #[cfg(feature = "cassandra")]
    Cassandra(cassandra::CassandraSinkConfig),
}

impl SinkConfig {
    /// The sink, not opened yet.
    pub fn build(&self) -> Box<dyn Sink> {
        match self {
            #[cfg(feature = "cassandra")]
            SinkConfig::Cassandra(c) => Box::new(cassandra::CassandraSink::new(c.clone())),
            #[cfg(not(feature = "cassandra"))]
            _ => unreachable!("no sink kind is compiled in"),
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// A message naming the setting and what is allowed.
    pub fn validate(&self) -> Result<(), crate::error::InvalidSetting> {
        match self {
            #[cfg(feature = "cassandra")]
            SinkConfig::Cassandra(c) => c.validate(),
            #[cfg(not(feature = "cassandra"))]
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn cell(key: AggKey, count: i64) -> CellValue {
        CellValue {
            key,
            count,
            sum: i128::from(count) * 7,
            last_event_ms: None,
        }
    }

    fn random_key(rng: &mut ChaCha8Rng) -> AggKey {
        let user = rng.random_range(1..=20);
        match rng.random_range(0..3) {
            0 => AggKey::User(user),
            1 => AggKey::Day(user, rng.random_range(0..5)),
            _ => AggKey::Month(user, rng.random_range(0..2)),
        }
    }

    /// The oracle: on random epochs (keys repeating within and across epochs, epochs of every
    /// size), the runs, and `EpochGroup::merge`, hold exactly what a map by cell that takes
    /// every value in order holds, sorted by key, one value per key.
    #[test]
    fn a_group_holds_the_last_value_of_every_cell_like_a_map_by_cell() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        for case in 0..200 {
            let mut model: BTreeMap<AggKey, CellValue> = BTreeMap::new();
            let mut runs = GroupRuns::default();
            let mut merged = EpochGroup::default();
            let epochs = rng.random_range(1..40);
            for epoch in 1..=epochs {
                let size = match rng.random_range(0..4) {
                    0 => 0,
                    1 => rng.random_range(1..4),
                    _ => rng.random_range(1..120),
                };
                let cells: Vec<CellValue> = (0..size)
                    .map(|_| cell(random_key(&mut rng), rng.random_range(-5..50)))
                    .collect();
                for c in &cells {
                    model.insert(c.key, c.clone());
                }
                // A published epoch is sorted and unique; the runs take it as it is.
                let published: Vec<CellValue> = {
                    let mut by_key: BTreeMap<AggKey, CellValue> = BTreeMap::new();
                    for c in &cells {
                        by_key.insert(c.key, c.clone());
                    }
                    by_key.into_values().collect()
                };
                runs.push(epoch, Arc::default(), epoch * 10, published);
                merged.merge(epoch, Arc::default(), epoch * 10, cells);
                assert!(
                    runs.held_cells() <= 2 * model.len() + size,
                    "case {case}: the runs hold {} cells for {} distinct",
                    runs.held_cells(),
                    model.len()
                );
                assert!(runs.runs.len() <= 1 + (model.len().max(1)).ilog2() as usize + 1);
            }
            let expected: Vec<CellValue> = model.into_values().collect();
            let group = runs.finish();
            assert_eq!(group.cells, expected, "case {case}: runs");
            assert_eq!(group.epoch, epochs);
            assert_eq!(group.records_covered, epochs * 10);
            assert_eq!(merged.cells, expected, "case {case}: merge");
            for c in &expected {
                assert_eq!(group.get(&c.key), Some(c));
            }
        }
    }

    #[test]
    fn the_exact_count_merges_the_runs_first() {
        let mut runs = GroupRuns::default();
        // The same two cells in every epoch: held several times until merged.
        for epoch in 1..=5 {
            runs.push(
                epoch,
                Arc::default(),
                epoch,
                vec![
                    cell(AggKey::User(1), epoch as i64),
                    cell(AggKey::User(2), 1),
                ],
            );
        }
        assert!(runs.held_cells() >= 2);
        assert_eq!(runs.distinct_cells(), 2);
        assert_eq!(runs.held_cells(), 2);
        assert_eq!(
            runs.finish().get(&AggKey::User(1)),
            Some(&cell(AggKey::User(1), 5))
        );
    }
}
