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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use spendflow_operators::AggKey;

use crate::core::{CellValue, Epoch, PartitionPosition};

pub(crate) use inbox::SinkInbox;

/// The default of [`Sink::max_group_cells`]: about 100 bytes a cell in the waiting group, so
/// some 400 MB at most, and only for a state that large whose sink is far behind.
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
    /// The new value of every cell that changed in any epoch of the group.
    pub cells: BTreeMap<AggKey, CellValue>,
}

impl EpochGroup {
    /// Adds a later epoch: its values replace earlier ones of the same cells.
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
        for cell in cells {
            self.cells.insert(cell.key, cell);
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
    /// the publisher waits for the sink (back-pressure on the sources beyond it). The group is
    /// a map by cell, so it is bounded by the state anyway; this bound matters only for a huge
    /// state behind a very slow sink. Below it the read model never waits for the sink.
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
