//! The whole expense dataflow on one worker, and how it is driven.
//!
//! ```text
//! push(Record) ──> Instruction ──(exchange by user_id, expense_id)──> UpsertByExpense ──> live facts
//!     ├──> AggregateCells ──(exchange by user_id)──> arrangement of AggKey -> (count, sum)
//!     │        ──> CaptureChanges ──> probe
//!     └──(exchange by user_id)──> LastSeenByUser ──> probe
//! ```
//!
//! The dataflow time is an [`Epoch`]. A caller pushes records at the current epoch, advances to
//! a later epoch to close the current one, and steps the worker. Once every worker has closed
//! an epoch and the probe has passed it, [`ExpenseDataflow::drain_closed`] returns, per newly
//! closed epoch, the consolidated changes of this worker's cells plus the new last-event time of
//! every user whose events changed. Each worker owns a share of the users,
//! so the union over workers of what they drain is the complete change of the aggregates.
//!
//! The worker holds no trace handle: everything it reports comes out of the operators as
//! changes, so the arrangement is free to compact its history as it goes.

use differential_dataflow::input::{Input, InputSession};
use timely::dataflow::ProbeHandle;
use timely::dataflow::operators::Probe;
use timely::worker::Worker;

use crate::Epoch;
use crate::aggregate::{
    AggregateCells, CapturedChanges, CapturedLastSeen, CapturedTouches, LastSeenByUser,
    ReplayTouch, capture_changes,
};
use crate::model::{CellChange, LastSeen, Record};
use crate::model::{ExpenseId, Fact, LiveFact};
use crate::reference::{
    AlertEvent, Converted, DataflowOptions, RateChange, RefChange, RefKey, RefValue, UserRef,
};
use crate::upsert::{Instruction, LiveSnapshot, UpsertByExpense, UpsertSnapshots};

/// The changes of this worker's cells when one epoch closed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClosedEpoch {
    /// The epoch. Every earlier epoch is closed too.
    pub epoch: Epoch,
    /// Consolidated changes of aggregate cells, sorted by key: non-zero, except in replay
    /// epochs, where a cell the epoch touched but did not change has a zero change ("write its
    /// current value"; see `aggregate`'s module docs).
    pub cells: Vec<CellChange>,
    /// Users whose last event time changed in this epoch, with the new value; sorted by user.
    pub last_seen: Vec<LastSeen>,
    /// Users whose reference row (budget, currency) changed in this epoch, as it now is;
    /// sorted by user. See [`crate::reference`].
    pub users: Vec<UserRef>,
    /// Alerts that changed state in this epoch, sorted by `(user, month, threshold)`.
    pub alerts: Vec<AlertEvent>,
    /// Users whose total in the reporting currency changed in this epoch; sorted by user.
    /// Always empty without a reporting currency.
    pub converted: Vec<Converted>,
    /// Exchange rates that changed in this epoch, as they now are; sorted by currency. Each
    /// is reported by one worker.
    pub rates: Vec<RateChange>,
}

impl ClosedEpoch {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
            && self.last_seen.is_empty()
            && self.users.is_empty()
            && self.alerts.is_empty()
            && self.converted.is_empty()
            && self.rates.is_empty()
    }
}

/// One worker's handle to the expense dataflow.
pub struct ExpenseDataflow {
    input: InputSession<Epoch, Instruction, i64>,
    probe: ProbeHandle<Epoch>,
    captured: CapturedChanges,
    touched: CapturedTouches,
    last_seen: CapturedLastSeen,
    snapshots: UpsertSnapshots,
    /// The epoch through which changes were last drained, if any.
    drained_through: Option<Epoch>,
}

impl ExpenseDataflow {
    /// Builds the dataflow on `worker`. Every worker of a computation must build it, in the
    /// same order relative to other dataflows.
    pub fn new(worker: &mut Worker) -> Self {
        Self::with_replay(worker, ReplayTouch::default())
    }

    /// Like [`ExpenseDataflow::new`], reporting the cells touched in the replay epochs of
    /// `replay` as zero changes (an engine with a durable sink, after a restart).
    pub fn with_replay(worker: &mut Worker, replay: ReplayTouch) -> Self {
        Self::with_options(worker, replay, DataflowOptions::default())
    }

    /// Like [`ExpenseDataflow::with_replay`], with `options` (the reporting currency).
    pub fn with_options(
        worker: &mut Worker,
        replay: ReplayTouch,
        options: DataflowOptions,
    ) -> Self {
        // TODO(issue 16, operators lane): the reference input, alerts and conversion.
        let _ = options;
        let captured = CapturedChanges::default();
        let touched = CapturedTouches::default();
        let last_seen = CapturedLastSeen::default();
        let snapshots = UpsertSnapshots::default();
        let probe = ProbeHandle::new();
        let input = worker.dataflow::<Epoch, _, _>(|scope| {
            let (input, instructions) = scope.new_collection::<Instruction, i64>();
            let facts = instructions.upsert_by_expense(snapshots.clone());
            facts
                .clone()
                .last_seen_by_user(last_seen.clone())
                .probe_with(&probe);
            let cells = facts.aggregate_cells(replay, touched.clone());
            capture_changes(&cells, captured.clone()).probe_with(&probe);
            // The trace handle is dropped here: nobody reads the arrangement but the capture.
            input
        });
        ExpenseDataflow {
            input,
            probe,
            captured,
            touched,
            last_seen,
            snapshots,
            drained_through: None,
        }
    }

    /// Adds a live expense as it was at a checkpoint (restore), in the current epoch.
    pub fn push_live(&mut self, expense_id: ExpenseId, fact: Fact) {
        self.input.update(
            Instruction {
                user_id: fact.user_id,
                expense_id,
                fact: Some(LiveFact::from(fact)),
            },
            1,
        );
    }

    /// Adds a change of reference data (a budget, a currency, a rate) to the current epoch.
    /// Changes of one key must come in source order, all from one worker.
    pub fn push_reference(&mut self, change: RefChange) {
        // TODO(issue 16, operators lane).
        let _ = change;
    }

    /// Adds a reference row as it was at a checkpoint (restore), in the current epoch.
    pub fn push_live_reference(&mut self, key: RefKey, value: RefValue) {
        // TODO(issue 16, operators lane).
        let _ = (key, value);
    }

    /// Asks for a copy of this worker's live expenses as of the end of `epoch`, which must not
    /// be closed yet (`epoch >= self.epoch()`); ignored otherwise. Every worker must ask for
    /// the same epochs: a checkpoint needs every worker's copy. Copies arrive in
    /// [`ExpenseDataflow::take_snapshots`] once the epoch has been applied everywhere.
    pub fn request_snapshot(&mut self, epoch: Epoch) {
        if epoch >= self.epoch() {
            self.snapshots.borrow_mut().requested.insert(epoch);
        }
    }

    /// The copies taken since the last call, oldest first.
    pub fn take_snapshots(&mut self) -> Vec<LiveSnapshot> {
        std::mem::take(&mut self.snapshots.borrow_mut().taken)
    }

    /// Adds a record to the current epoch.
    pub fn push(&mut self, record: Record) {
        self.input.update(Instruction::from(record), 1);
    }

    /// The epoch records are currently pushed at.
    pub fn epoch(&self) -> Epoch {
        *self.input.time()
    }

    /// Closes every epoch before `epoch`; later pushes go to `epoch`. Does nothing if `epoch` is
    /// not after the current one.
    pub fn advance_to(&mut self, epoch: Epoch) {
        if epoch > *self.input.time() {
            self.input.advance_to(epoch);
            self.input.flush();
        }
    }

    /// Sends buffered records into the dataflow without closing the epoch. (Dropping the
    /// handle closes the input for good: the dataflow then drains and completes.)
    pub fn flush(&mut self) {
        self.input.flush();
    }

    /// True while some closed epoch has not made it through the whole dataflow.
    pub fn is_behind(&self) -> bool {
        self.probe.less_than(self.input.time())
    }

    /// The first epoch not yet complete everywhere, if any.
    fn frontier(&self) -> Option<Epoch> {
        self.probe.with_frontier(|f| f.first().copied())
    }

    /// The changes of the epochs that completed since the last call, one entry per epoch that
    /// changed anything, in epoch order, always ending with an entry for the newest completed
    /// epoch (empty if nothing changed in it). Empty if no epoch completed since the last call.
    pub fn drain_closed(&mut self) -> Vec<ClosedEpoch> {
        let through = match self.frontier() {
            Some(0) => return Vec::new(),
            Some(f) => f - 1,
            // The probe's frontier is empty once the input is closed and everything is done.
            None => Epoch::MAX,
        };
        if self.drained_through.is_some_and(|d| d >= through) {
            return Vec::new();
        }
        self.drained_through = Some(through);

        let mut updates = {
            let mut captured = self.captured.borrow_mut();
            let (now, later): (Vec<_>, Vec<_>) = captured
                .drain(..)
                .partition(|(_, time, _)| *time <= through);
            *captured = later;
            now
        };
        // Cells touched in replay epochs join as zero changes: consolidated with the real
        // changes below, they are dropped where a real change exists and kept where none does.
        {
            let mut touched = self.touched.borrow_mut();
            let (now, later): (Vec<_>, Vec<_>) =
                touched.drain(..).partition(|(_, time)| *time <= through);
            *touched = later;
            updates.extend(now.into_iter().map(|(key, time)| (key, time, (0, 0))));
        }
        // By epoch, then by key, so each epoch's run consolidates in one pass.
        updates.sort_unstable_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        let mut closed: Vec<ClosedEpoch> = Vec::new();
        let mut updates = updates.into_iter().peekable();
        while let Some((key, epoch, (mut count, mut sum))) = updates.next() {
            // A zero change survives only if it is all there is for the cell in the epoch: a
            // touched cell (real changes of one epoch never sum to zero here, the arrangement
            // consolidated them).
            let mut only_touches = (count, sum) == (0, 0);
            while let Some((_, _, (c, s))) =
                updates.next_if(|(next, time, _)| *time == epoch && *next == key)
            {
                count += c;
                sum += s;
                only_touches &= (c, s) == (0, 0);
            }
            if (count, sum) == (0, 0) && !only_touches {
                continue;
            }
            if closed.last().is_none_or(|c| c.epoch != epoch) {
                closed.push(ClosedEpoch {
                    epoch,
                    ..ClosedEpoch::default()
                });
            }
            closed
                .last_mut()
                .expect("pushed above")
                .cells
                .push(CellChange { key, count, sum });
        }

        // Last-seen changes, each in the entry of its epoch (one per user and epoch, in user
        // order within an epoch as the operator emits them; sorted here to be sure).
        let mut seen = {
            let mut captured = self.last_seen.borrow_mut();
            let (now, later): (Vec<_>, Vec<_>) =
                captured.drain(..).partition(|(time, _)| *time <= through);
            *captured = later;
            now
        };
        seen.sort_by_key(|(epoch, change)| (*epoch, change.user_id));
        for (epoch, change) in seen {
            let at = closed.partition_point(|c| c.epoch < epoch);
            if closed.get(at).is_none_or(|c| c.epoch != epoch) {
                closed.insert(
                    at,
                    ClosedEpoch {
                        epoch,
                        ..ClosedEpoch::default()
                    },
                );
            }
            closed[at].last_seen.push(change);
        }
        if closed.last().is_none_or(|c| c.epoch != through) {
            closed.push(ClosedEpoch {
                epoch: through,
                ..ClosedEpoch::default()
            });
        }
        closed
    }
}
