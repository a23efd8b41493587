//! When epochs are cut.
//!
//! The policy, in one place ([`EpochClock::target`]):
//!
//! * **Caught up** (no source reports lag): the timer cuts, every `interval` while something
//!   was read since the last cut, so fresh records are published within about one interval.
//!   The record budget cuts too if a worker takes that many records first.
//! * **Lagging** (any source of any worker reports a backlog, see `Source::lagging`): the
//!   record budget cuts: an epoch holds `budget` records of a worker, so catch-up runs in large
//!   batches and pays the rendezvous of the workers and the publish once per batch, not once per
//!   `interval`. The timer still cuts after [`LAGGING_MAX_INTERVAL`] (or `interval`, if longer),
//!   so a lag claim that is wrong, or a slow trickle, never holds records back for long.
//! * A checkpoint that is due cuts in either case.
//!
//! Whichever worker finds a cut due moves the shared epoch on; every worker advances to it at its
//! next step, as before (the rendezvous of the workers is the dataflow's frontier).
//!
//! **In a cluster** the processes must cut the same epochs, and take checkpoints at the same
//! epoch (every process writes its share of it). Process 0's clock *leads*: it alone applies the
//! policy above and decides checkpoints; its worker 0 signals every cut (and the checkpoint
//! epoch it closes) to all workers through the dataflow (`ClockSignal`). The other processes'
//! clocks *follow*: they never cut on their own, but move to each epoch the leader signals, and
//! signal the leader when they read input (so its timer cuts) or fill an epoch's budget (so it
//! cuts now). A follower is therefore never ahead of the leader, and a checkpoint epoch the leader
//! signals is still open on every worker when the signal arrives.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use spendflow_operators::Epoch;

/// While sources lag, the longest an epoch stays open with records in it.
pub const LAGGING_MAX_INTERVAL: Duration = Duration::from_secs(1);

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
    /// True in a cluster process other than process 0 (see the module docs).
    follower: bool,
    /// A follower asked for a cut (its worker filled an epoch's budget).
    cut_requested: AtomicBool,
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
            follower: false,
            cut_requested: AtomicBool::new(false),
        }
    }

    /// Makes this clock follow the leader's cuts (a cluster process other than process 0).
    pub fn follow_the_leader(mut self) -> Self {
        self.follower = true;
        self
    }

    /// True if this clock follows another process's cuts.
    pub fn is_follower(&self) -> bool {
        self.follower
    }

    /// A follower: moves to `epoch`, which the leader cut to (never back).
    pub fn follow(&self, epoch: Epoch) {
        let before = self.current.fetch_max(epoch, Ordering::AcqRel);
        for cut in before..epoch {
            self.cuts.cut(cut);
        }
    }

    /// A follower: copies the state at `epoch` for a checkpoint, as the leader decided (unless
    /// this process is still writing its share of an earlier one: then the leader's checkpoint
    /// misses this share, is never restored, and the next one is taken).
    pub fn follow_checkpoint(&self, epoch: Epoch) {
        if self
            .checkpoint_mark
            .compare_exchange(0, epoch, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            tracing::warn!(
                epoch,
                "Still writing this process's share of an earlier checkpoint: this process skips the checkpoint the cluster takes at this epoch."
            );
        }
    }

    /// The leader: a follower filled an epoch's budget; cut at the next chance.
    pub fn request_cut(&self) {
        self.cut_requested.store(true, Ordering::Release);
    }

    /// Notes that records were read (so the timer should cut an epoch).
    pub fn note_input(&self) {
        self.dirty.store(true, Ordering::Release);
        self.unsaved.store(true, Ordering::Release);
    }

    /// The epoch a worker should be pushing at, after `in_epoch` records in its current one,
    /// `lagging` if any source reports lag. Cuts a new epoch if the policy (module docs) says
    /// so.
    pub fn target(&self, in_epoch: usize, lagging: bool) -> Epoch {
        self.target_at(self.start.elapsed().as_nanos() as u64, in_epoch, lagging)
    }

    /// [`EpochClock::target`] at `now` nanoseconds after the clock started.
    fn target_at(&self, now: u64, in_epoch: usize, lagging: bool) -> Epoch {
        if self.follower {
            return self.current.load(Ordering::SeqCst);
        }
        let requested = self.cut_requested.load(Ordering::Acquire);
        let last = self.last_cut_ns.load(Ordering::Acquire);
        let interval = if lagging {
            self.interval.max(LAGGING_MAX_INTERVAL)
        } else {
            self.interval
        };
        let due = now.saturating_sub(last) >= interval.as_nanos() as u64
            && self.dirty.load(Ordering::Acquire);
        // A checkpoint is due when input arrived since the last one, even if none arrives now
        // (an engine that went idle still gets a checkpoint of everything it read).
        let checkpoint_due = self.checkpoint_every_ns > 0
            && self.checkpoint_mark.load(Ordering::SeqCst) == 0
            && now.saturating_sub(self.last_checkpoint_ns.load(Ordering::SeqCst))
                >= self.checkpoint_every_ns
            && self.unsaved.load(Ordering::Acquire);
        if (due || checkpoint_due || requested || in_epoch >= self.budget)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn caught_up_the_timer_cuts() {
        let clock = EpochClock::new(Duration::from_millis(50), 100_000);
        clock.note_input();
        assert_eq!(
            clock.target_at(10 * MS, 500, false),
            1,
            "interval not elapsed"
        );
        assert_eq!(clock.target_at(50 * MS, 500, false), 2, "the timer cuts");
        // Nothing read since: no cut, however long.
        assert_eq!(clock.target_at(500 * MS, 0, false), 2);
        // The budget cuts too.
        clock.note_input();
        assert_eq!(clock.target_at(510 * MS, 100_000, false), 3);
    }

    #[test]
    fn lagging_the_budget_cuts_not_the_timer() {
        let clock = EpochClock::new(Duration::from_millis(50), 10_000);
        clock.note_input();
        // Many intervals pass with records in the epoch: no cut while lagging...
        assert_eq!(clock.target_at(50 * MS, 500, true), 1);
        assert_eq!(clock.target_at(400 * MS, 9_999, true), 1);
        // ...until the budget is reached.
        assert_eq!(clock.target_at(401 * MS, 10_000, true), 2);
        clock.note_input();
        assert_eq!(clock.target_at(460 * MS, 3, true), 2);
        // Caught up again: the timer cuts what is there.
        assert_eq!(clock.target_at(460 * MS, 3, false), 3);
    }

    #[test]
    fn lagging_the_timer_still_cuts_after_the_longest_interval() {
        let clock = EpochClock::new(Duration::from_millis(50), 10_000);
        clock.note_input();
        let max = LAGGING_MAX_INTERVAL.as_nanos() as u64;
        assert_eq!(clock.target_at(max - 1, 5, true), 1);
        assert_eq!(clock.target_at(max, 5, true), 2);
    }

    #[test]
    fn lagging_a_due_checkpoint_still_cuts() {
        let clock = EpochClock::starting_at(
            1,
            Duration::from_millis(50),
            10_000,
            Some(Duration::from_millis(100)),
        );
        clock.note_input();
        assert_eq!(clock.target_at(100 * MS, 5, true), 2);
        assert_eq!(clock.checkpoint_mark(), Some(1));
    }
}
