//! The engine's status: counters, positions, and whether it has caught up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::core::PartitionPosition;
use crate::pipeline::Shared;
use crate::serve::read_model::{AsOf, ReadModel};

/// A point-in-time view of the engine.
#[derive(Clone, Debug)]
pub struct Status {
    /// The published state's position.
    pub as_of: AsOf,
    /// Records taken from the sources.
    pub records_read: u64,
    /// Records that entered the dataflow.
    pub records_accepted: u64,
    /// Records rejected; `read == accepted + rejected` once the workers are idle.
    pub records_rejected: u64,
    /// Rejections by reason code.
    pub rejected_by_reason: BTreeMap<&'static str, u64>,
    /// Everything the sources have made available so far is in the served state.
    pub caught_up: bool,
    /// Every input partition's read position (and end, where known).
    pub partitions: Vec<PartitionPosition>,
    /// Worker threads.
    pub workers: usize,
    /// Users with a live expense.
    pub users: usize,
    /// Live expenses.
    pub live_expenses: i64,
    /// Time since the engine started.
    pub uptime: Duration,
    /// Category and merchant names interned by this process.
    pub interned_names: usize,
    /// Checkpoints, when the engine writes them.
    pub checkpoint: Option<crate::core::CheckpointProgress>,
    /// Where this process stands in the computation (a single process: 0 of 1).
    pub topology: crate::cluster::Topology,
    /// Each local worker's partition positions, in local worker order (global index:
    /// `topology.global_worker(i)`).
    pub worker_partitions: Vec<Vec<PartitionPosition>>,
    /// The newest published epoch, if any.
    pub published_epoch: Option<spendflow_operators::Epoch>,
}

/// Computes [`Status`] from the shared pipeline state and the read model.
#[derive(Clone, Debug)]
pub struct StatusProbe {
    pub(crate) shared: Arc<Shared>,
    pub(crate) read_model: Arc<ReadModel>,
}

impl StatusProbe {
    /// The current status.
    pub fn status(&self) -> Status {
        // Read the snapshot first: anything read after it can only make `caught_up` false.
        let snapshot = self.read_model.snapshot();
        let idle = self.shared.sources_idle();
        let records_read = self.shared.records_read();
        let caught_up = idle && snapshot.records_covered() == records_read;
        Status {
            as_of: snapshot.as_of().clone(),
            records_read,
            records_accepted: self.shared.records_accepted(),
            records_rejected: self.shared.dead_letters.total(),
            rejected_by_reason: self.shared.dead_letters.counts(),
            caught_up,
            partitions: self.shared.partitions(),
            workers: self.shared.workers.len(),
            users: snapshot.user_count(),
            live_expenses: snapshot.live_expenses(),
            uptime: self.shared.started.elapsed(),
            interned_names: spendflow_operators::Name::count(),
            checkpoint: self
                .shared
                .checkpoints_enabled
                .then(|| self.shared.checkpoints.lock().clone()),
            topology: self.shared.topology,
            worker_partitions: self
                .shared
                .workers
                .iter()
                .map(|w| w.partitions.lock().clone())
                .collect(),
            published_epoch: self.read_model.published_epoch(),
        }
    }
}
