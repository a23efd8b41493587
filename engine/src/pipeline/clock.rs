//! When epochs are cut.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use spendflow_operators::Epoch;

/// Cuts the input into epochs; shared by all workers of a process.
#[derive(Debug)]
pub struct EpochClock {
    start: Instant,
    interval: Duration,
    pub(super) budget: usize,
    current: AtomicU64,
    last_cut_ns: AtomicU64,
    /// Something was read since the last cut.
    dirty: AtomicBool,
    /// Nanoseconds between checkpoints; 0 when checkpoints are off.
    checkpoint_every_ns: u64,
    last_checkpoint_ns: AtomicU64,
    /// The epoch the running checkpoint copies the state at; 0 when none runs.
    checkpoint_mark: AtomicU64,
    /// Something was read since the last checkpoint was marked.
    unsaved: AtomicBool,
    /// When recent epochs were cut (for `spendflow_epoch_close_seconds`).
    pub(crate) cuts: std::sync::Arc<crate::metrics::EpochCuts>,
}

impl EpochClock {
    /// A clock that cuts every `interval` while there is input, or after `budget` records.
    #[cfg(test)]
    pub fn new(interval: Duration, budget: usize) -> Self {
        // Epoch 0 stays empty: data starts at 1, so "epoch 0" can mean "nothing yet".
        Self::starting_at(1, interval, budget, None)
    }

    /// A clock whose first epoch is `first` (after a restore, epochs continue past everything
    /// an earlier run published), and that marks an epoch for a checkpoint every
    /// `checkpoint_interval`, if given.
    pub fn starting_at(
        first: Epoch,
        interval: Duration,
        budget: usize,
        checkpoint_interval: Option<Duration>,
    ) -> Self {
        EpochClock {
            start: Instant::now(),
            interval,
            budget: budget.max(1),
            current: AtomicU64::new(first.max(1)),
            last_cut_ns: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            checkpoint_every_ns: checkpoint_interval.map_or(0, |i| i.as_nanos().max(1) as u64),
            last_checkpoint_ns: AtomicU64::new(0),
            checkpoint_mark: AtomicU64::new(0),
            unsaved: AtomicBool::new(false),
            cuts: Default::default(),
        }
    }

    /// Notes that records were read (so the timer should cut an epoch).
    pub fn note_input(&self) {
        self.dirty.store(true, Ordering::Release);
        self.unsaved.store(true, Ordering::Release);
    }

    /// The epoch a worker should be pushing at, after `in_epoch` records in its current one.
    /// Cuts a new epoch if the timer or the budget says so.
    pub fn target(&self, in_epoch: usize) -> Epoch {
        let now = self.start.elapsed().as_nanos() as u64;
        let last = self.last_cut_ns.load(Ordering::Acquire);
        let due = now.saturating_sub(last) >= self.interval.as_nanos() as u64
            && self.dirty.load(Ordering::Acquire);
        // A checkpoint is due when input arrived since the last one, even if none arrives now
        // (an engine that went idle still gets a checkpoint of everything it read).
        let checkpoint_due = self.checkpoint_every_ns > 0
            && self.checkpoint_mark.load(Ordering::SeqCst) == 0
            && now.saturating_sub(self.last_checkpoint_ns.load(Ordering::SeqCst))
                >= self.checkpoint_every_ns
            && self.unsaved.load(Ordering::Acquire);
        if (due || checkpoint_due || in_epoch >= self.budget)
            && self
                .last_cut_ns
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.dirty.store(false, Ordering::Release);
            // A checkpoint due: mark the epoch being closed, *before* the cut is visible, so
            // every worker that advances past it sees the mark first.
            if checkpoint_due {
                self.unsaved.store(false, Ordering::Release);
                self.last_checkpoint_ns.store(now, Ordering::SeqCst);
                self.checkpoint_mark
                    .store(self.current.load(Ordering::SeqCst), Ordering::SeqCst);
            }
            self.cuts.cut(self.current.load(Ordering::SeqCst));
            return self.current.fetch_add(1, Ordering::SeqCst) + 1;
        }
        self.current.load(Ordering::SeqCst)
    }

    /// The epoch a checkpoint is being taken at, if any.
    pub fn checkpoint_mark(&self) -> Option<Epoch> {
        Some(self.checkpoint_mark.load(Ordering::SeqCst)).filter(|&e| e > 0)
    }

    /// The checkpoint at `epoch` is written (or given up): the next one may be marked.
    pub fn checkpoint_finished(&self, epoch: Epoch) {
        let _ = self
            .checkpoint_mark
            .compare_exchange(epoch, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The epoch records are pushed at now.
    pub fn current(&self) -> Epoch {
        self.current.load(Ordering::Acquire)
    }

    /// Cuts a new epoch now, whatever the timer says (used at shutdown).
    pub fn cut(&self) -> Epoch {
        self.current.fetch_add(1, Ordering::AcqRel) + 1
    }
}
