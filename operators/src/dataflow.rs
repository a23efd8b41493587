//! The whole expense dataflow on one worker, and how it is driven.
//!
//! ```text
//! push(Record) ──> Instruction ──(exchange by user_id, expense_id)──> UpsertByExpense ──> live facts
//!     ├──> AggregateCells ──(exchange by user_id)──> arrangement of AggKey -> (count, sum)
//!     │        ──> CaptureChanges ──(user total and month changes)──┐
//!     └──(exchange by user_id)──> LastSeenByUser ──> probe          │
//!                                                                   v
//! push_reference(RefChange) ──(exchange: user rows by user_id,   JoinReference ──> probe
//!     rates by currency)──> UpsertReference ──(user rows: ────>  (alerts, converted totals)
//!                  (users, rates)    same worker; rates: every worker)
//! ```
//!
//! Cells, last-seen times, user rows, rates, alerts and converted totals all reach the worker
//! through captures ("sinks") the operators fill when an epoch closes; see [`crate::enrich`]
//! for the reference half.
//!
//! The dataflow time is an [`Epoch`]. A caller pushes records at the current epoch, advances to
//! a later epoch to close the current one, and steps the worker. Once every worker has closed
//! an epoch and the probe has passed it, [`ExpenseDataflow::drain_closed`] returns, per newly
//! closed epoch, the consolidated changes of this worker's cells plus the new last-event time of
//! every user whose events changed, and the reference outputs (user rows, rates, alert events,
//! converted totals) of the users and rows it owns. Each worker owns a share of the users,
//! so the union over workers of what they drain is the complete change of the aggregates.
//!
//! The worker holds no trace handle: everything it reports comes out of the operators as
//! changes, so the arrangement is free to compact its history as it goes.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::input::{Input, InputSession};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::ProbeHandle;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Input as _, Inspect, Probe};
use timely::worker::Worker;

use crate::Epoch;
use crate::aggregate::{
    AggregateCells, CapturedChanges, CapturedLastSeen, CapturedTouches, LastSeenByUser, ReplayTouch,
};
use crate::enrich::{
    CapturedAlerts, CapturedConverted, CapturedRates, CapturedUsers, JoinReference, RefRows,
    RefSnapshots, UpsertReference, capture_and_forward_spend,
};
use crate::model::{CellChange, LastSeen, Name, Record};
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

/// What a worker tells every other worker about epochs, in a cluster: the processes cut epochs
/// together (one leads, the others follow; see the engine's epoch clock). The dataflow only
/// carries these; it gives them no meaning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockSignal {
    /// The process that sent it.
    pub process: u32,
    /// The epoch the sender's input moved to (0: none).
    pub epoch: Epoch,
    /// A checkpoint epoch the sender decided on (0: none).
    pub checkpoint: Epoch,
    /// The sender read input since its last signal.
    pub input: bool,
    /// The sender has taken a whole epoch budget of records into its current epoch.
    pub full: bool,
    /// The sender stops: `epoch` is its last input epoch.
    pub stopping: bool,
}

/// The input of name texts (see [`ExpenseDataflow`]'s `names`).
type NamesInput = timely::dataflow::InputHandle<Epoch, CapacityContainerBuilder<Vec<String>>>;

/// One worker's handle to the expense dataflow.
pub struct ExpenseDataflow {
    input: InputSession<Epoch, Instruction, i64>,
    /// Texts of names this worker interned first, sent to every worker (see
    /// [`Name::collect_fresh`]): in a cluster, the process that owns a user may never have
    /// read the records naming its categories and merchants.
    names: NamesInput,
    /// Clock signals to every worker, and those received (see [`ClockSignal`]).
    signals: timely::dataflow::InputHandle<Epoch, CapacityContainerBuilder<Vec<ClockSignal>>>,
    received: Rc<RefCell<Vec<ClockSignal>>>,
    reference: InputSession<Epoch, RefChange, i64>,
    probe: ProbeHandle<Epoch>,
    captured: CapturedChanges,
    touched: CapturedTouches,
    last_seen: CapturedLastSeen,
    users: CapturedUsers,
    rates: CapturedRates,
    alerts: CapturedAlerts,
    converted: CapturedConverted,
    snapshots: UpsertSnapshots,
    ref_snapshots: RefSnapshots,
    /// Halves of snapshots taken so far, until both halves of an epoch are there.
    pending: BTreeMap<Epoch, (Option<LiveSnapshot>, Option<RefRows>)>,
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
        let captured = CapturedChanges::default();
        let touched = CapturedTouches::default();
        let last_seen = CapturedLastSeen::default();
        let (users, rates) = (CapturedUsers::default(), CapturedRates::default());
        let (alerts, converted) = (CapturedAlerts::default(), CapturedConverted::default());
        let snapshots = UpsertSnapshots::default();
        let ref_snapshots = RefSnapshots::default();
        let probe = ProbeHandle::new();
        Name::collect_fresh();
        let received = Rc::new(RefCell::new(Vec::new()));
        let (input, reference, names, signals) = worker.dataflow::<Epoch, _, _>(|scope| {
            let (signals, sent) = scope.new_input::<Vec<ClockSignal>>();
            let inbox = Rc::clone(&received);
            // Not probed: signals are read as they arrive, whatever the epochs.
            sent.broadcast()
                .inspect(move |signal: &ClockSignal| inbox.borrow_mut().push(*signal));
            let (names, texts) = scope.new_input::<Vec<String>>();
            // Learned before the epoch passes the probe, so before anything of it is
            // published.
            texts
                .broadcast()
                .inspect(|text: &String| Name::learn(text))
                .probe_with(&probe);
            let (input, instructions) = scope.new_collection::<Instruction, i64>();
            let (reference, changes) = scope.new_collection::<RefChange, i64>();
            let facts = instructions.upsert_by_expense(snapshots.clone());
            facts
                .clone()
                .last_seen_by_user(last_seen.clone())
                .probe_with(&probe);
            let (cells, touches) = facts.aggregate_cells(replay, touched.clone());
            touches.probe_with(&probe);
            let rows =
                changes.upsert_reference(ref_snapshots.clone(), users.clone(), rates.clone());
            capture_and_forward_spend(&cells, captured.clone())
                .join_reference(
                    rows,
                    options.reporting_currency,
                    alerts.clone(),
                    converted.clone(),
                )
                .probe_with(&probe);
            // The trace handle is dropped here: nobody reads the arrangement but the capture.
            (input, reference, names, signals)
        });
        ExpenseDataflow {
            input,
            names,
            signals,
            received,
            reference,
            probe,
            captured,
            touched,
            last_seen,
            users,
            rates,
            alerts,
            converted,
            snapshots,
            ref_snapshots,
            pending: BTreeMap::new(),
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
    ///
    /// A value of the wrong kind for its key (a rate for a user) is a caller bug: it removes
    /// the row (and fails debug builds).
    pub fn push_reference(&mut self, change: RefChange) {
        debug_assert!(
            change.value.is_none_or(|v| matches!(
                (change.key, v),
                (RefKey::User(_), RefValue::User { .. }) | (RefKey::Fx(_), RefValue::Fx { .. })
            )),
            "a reference value of the wrong kind: {change:?}"
        );
        self.reference.update(change, 1);
    }

    /// Adds a reference row as it was at a checkpoint (restore), in the current epoch.
    /// Like live expenses, restored rows may be pushed by any worker, each row by one (the
    /// dataflow routes it to its owner); they come out as changes of the restore epoch (see
    /// [`crate::enrich`]).
    pub fn push_live_reference(&mut self, key: RefKey, value: RefValue) {
        self.push_reference(RefChange {
            key,
            value: Some(value),
        });
    }

    /// Asks for a copy of this worker's live expenses as of the end of `epoch`, which must not
    /// be closed yet (`epoch >= self.epoch()`); ignored otherwise. Every worker must ask for
    /// the same epochs: a checkpoint needs every worker's copy. Copies arrive in
    /// [`ExpenseDataflow::take_snapshots`] once the epoch has been applied everywhere.
    pub fn request_snapshot(&mut self, epoch: Epoch) {
        if epoch >= self.epoch() {
            self.snapshots.borrow_mut().requested.insert(epoch);
            self.ref_snapshots.borrow_mut().requested.insert(epoch);
        }
    }

    /// The copies taken since the last call, oldest first: each holds this worker's live
    /// expenses and the reference rows it owns. (Two operators take the two halves; a copy is
    /// returned once both have, which is at the latest when the epoch is no longer behind.)
    pub fn take_snapshots(&mut self) -> Vec<LiveSnapshot> {
        for live in std::mem::take(&mut self.snapshots.borrow_mut().taken) {
            let epoch = live.epoch;
            self.pending.entry(epoch).or_default().0 = Some(live);
        }
        for (epoch, rows) in std::mem::take(&mut self.ref_snapshots.borrow_mut().taken) {
            self.pending.entry(epoch).or_default().1 = Some(rows);
        }
        let mut copies = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if !matches!(entry.get(), (Some(_), Some(_))) {
                break;
            }
            let (Some(mut copy), Some(rows)) = entry.remove() else {
                unreachable!("checked above")
            };
            copy.reference = rows;
            copies.push(copy);
        }
        copies
    }

    /// Adds a record to the current epoch.
    pub fn push(&mut self, record: Record) {
        self.input.update(Instruction::from(record), 1);
        for text in Name::take_fresh() {
            self.names.send(text.to_string());
        }
    }

    /// Sends `signal` to every worker of the computation (this one included), now.
    pub fn signal(&mut self, signal: ClockSignal) {
        self.signals.send(signal);
        self.signals.flush();
    }

    /// The signals received from workers since the last call.
    pub fn take_signals(&mut self) -> Vec<ClockSignal> {
        std::mem::take(&mut *self.received.borrow_mut())
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
            self.names.advance_to(epoch);
            self.names.flush();
            self.signals.advance_to(epoch);
            self.signals.flush();
            self.reference.advance_to(epoch);
            self.reference.flush();
        }
    }

    /// Sends buffered records into the dataflow without closing the epoch. (Dropping the
    /// handle closes the input for good: the dataflow then drains and completes.)
    pub fn flush(&mut self) {
        self.input.flush();
        self.names.flush();
        self.reference.flush();
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
        for run in updates.chunk_by(|a, b| a.1 == b.1) {
            let epoch = run[0].1;
            // Sized to the run (consolidation only shrinks it): grown by doubling, an epoch's
            // changes held up to twice their size while they wait for the publisher.
            let mut cells = Vec::with_capacity(run.len());
            for same_cell in run.chunk_by(|a, b| a.0 == b.0) {
                // A zero change survives only if it is all there is for the cell in the epoch:
                // a touched cell (real changes of one epoch never sum to zero here, the
                // arrangement consolidated them).
                let (mut count, mut sum, mut only_touches) = (0, 0, true);
                for (_, _, (c, s)) in same_cell {
                    count += c;
                    sum += s;
                    only_touches &= (*c, *s) == (0, 0);
                }
                if (count, sum) == (0, 0) && !only_touches {
                    continue;
                }
                cells.push(CellChange {
                    key: same_cell[0].0,
                    count,
                    sum,
                });
            }
            if !cells.is_empty() {
                closed.push(ClosedEpoch {
                    epoch,
                    cells,
                    ..ClosedEpoch::default()
                });
            }
        }

        // The other outputs, each in the entry of its epoch, sorted by key within it (one per
        // key and epoch, as the operators emit them).
        for (epoch, change) in drain_sorted(&self.last_seen, through, |c| c.user_id) {
            epoch_entry(&mut closed, epoch).last_seen.push(change);
        }
        for (epoch, user) in drain_sorted(&self.users, through, |u| u.user_id) {
            epoch_entry(&mut closed, epoch).users.push(user);
        }
        for (epoch, alert) in drain_sorted(&self.alerts, through, |a| {
            (a.user_id, a.month, a.threshold_pct)
        }) {
            epoch_entry(&mut closed, epoch).alerts.push(alert);
        }
        for (epoch, total) in drain_sorted(&self.converted, through, |c| c.user_id) {
            epoch_entry(&mut closed, epoch).converted.push(total);
        }
        for (epoch, rate) in drain_sorted(&self.rates, through, |r| r.currency) {
            epoch_entry(&mut closed, epoch).rates.push(rate);
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

/// Takes the entries of epochs up to `through` out of `sink`, sorted by epoch, then `key`.
fn drain_sorted<T, K: Ord>(
    sink: &RefCell<Vec<(Epoch, T)>>,
    through: Epoch,
    key: impl Fn(&T) -> K,
) -> Vec<(Epoch, T)> {
    let mut sink = sink.borrow_mut();
    let (mut now, later): (Vec<_>, Vec<_>) = sink.drain(..).partition(|(time, _)| *time <= through);
    *sink = later;
    now.sort_by_key(|(epoch, value)| (*epoch, key(value)));
    now
}

/// The entry of `epoch` in `closed` (sorted by epoch), inserted if missing.
fn epoch_entry(closed: &mut Vec<ClosedEpoch>, epoch: Epoch) -> &mut ClosedEpoch {
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
    &mut closed[at]
}
