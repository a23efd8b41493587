//! Running workers: the one place the engine reaches timely's execution model through.
//!
//! [`execute`] starts `workers` timely worker threads in this process and runs `logic` on each
//! with a [`WorkerContext`], from which it builds its [`ExpenseDataflow`] and steps the worker.
//! Cluster mode (timely processes across hosts) will add a topology argument here; nothing
//! outside this module needs to change for it.

use std::time::Duration;

use timely::worker::Worker;

use crate::aggregate::ReplayTouch;
use crate::dataflow::ExpenseDataflow;

/// One worker thread's view of the computation.
pub struct WorkerContext<'w> {
    worker: &'w mut Worker,
}

impl WorkerContext<'_> {
    /// This worker's index, in `0..peers()`.
    pub fn index(&self) -> usize {
        self.worker.index()
    }

    /// The number of workers in the computation.
    pub fn peers(&self) -> usize {
        self.worker.peers()
    }

    /// Builds the expense dataflow on this worker. Every worker must call it once.
    pub fn build_dataflow(&mut self) -> ExpenseDataflow {
        ExpenseDataflow::new(self.worker)
    }

    /// Builds the expense dataflow on this worker, reporting the cells touched in `replay`'s
    /// epochs (see [`crate::aggregate::ReplayTouch`]). Every worker must call it once, with
    /// clones of the same `replay`.
    pub fn build_dataflow_with_replay(&mut self, replay: ReplayTouch) -> ExpenseDataflow {
        ExpenseDataflow::with_replay(self.worker, replay)
    }

    /// Like [`WorkerContext::build_dataflow_with_replay`], with `options` (the reporting
    /// currency). Every worker must call it once, with the same arguments.
    pub fn build_dataflow_with_options(
        &mut self,
        replay: ReplayTouch,
        options: crate::reference::DataflowOptions,
    ) -> ExpenseDataflow {
        ExpenseDataflow::with_options(self.worker, replay, options)
    }

    /// Does one round of dataflow work without blocking. Returns false when no dataflow is
    /// left to run.
    pub fn step(&mut self) -> bool {
        self.worker.step()
    }

    /// Does one round of work, or waits up to `timeout` for other workers' messages if there
    /// is none. Use it when no input is at hand, so an idle worker does not spin.
    pub fn step_or_park(&mut self, timeout: Duration) -> bool {
        self.worker.step_or_park(Some(timeout))
    }
}

/// Runs `logic` on `workers` worker threads and returns each worker's result, in index order.
///
/// # Errors
///
/// A message if the threads could not be started, or if a worker panicked.
pub fn execute<T, F>(workers: usize, logic: F) -> Result<Vec<T>, WorkersFailed>
where
    T: Send + 'static,
    F: Fn(&mut WorkerContext<'_>) -> T + Send + Sync + 'static,
{
    let config = timely::Config::process(workers.max(1));
    let guards = timely::execute(config, move |worker| logic(&mut WorkerContext { worker }))
        .map_err(WorkersFailed)?;
    guards
        .join()
        .into_iter()
        .collect::<Result<_, String>>()
        .map_err(WorkersFailed)
}

/// The worker threads could not be started, or one of them panicked (timely's message).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("dataflow workers: {0}")]
pub struct WorkersFailed(pub String);
