//! The aggregate stage: live facts in, one arrangement of `(count, sum)` per cell out.
//!
//! Every live fact contributes `(1, amount)` to its user's total, category, merchant, UTC day and
//! UTC month cells. The contributions are *differences*, multiplied by the fact's diff, so a
//! retraction (`-1`) subtracts exactly what the insertion added, and the arrangement's
//! accumulated difference for a key **is** the aggregate. No operator ever rescans the values of
//! a key: a `reduce` that did measured 75–320× slower on this workload.
//!
//! Before the arrangement, each worker sums its contributions per cell and epoch in a hash map
//! and sends one update per changed cell when the epoch closes: within an epoch most records of
//! a user hit the same user, month and category cells, so this cuts the updates the
//! arrangement has to sort and exchange by more than half (the merge batcher was the largest
//! cost in the profile). It adds no latency: the sums leave exactly when the arrangement could
//! have sealed the epoch anyway.
//!
//! All cells live in one arrangement keyed by [`AggKey`], whose hash is the user id, so the
//! arrangement exchanges by user and one sort serves every aggregate.
//!
//! **Replays touch every cell they pass.** Within an epoch, changes of a cell can cancel out
//! (an insert and a delete of the same expense, or two expenses whose amounts offset): nothing
//! then leaves the pre-aggregation, which is right for an engine that has published every
//! earlier epoch. After a crash it is not: the durable sink may hold the cell as an earlier run
//! wrote it *between* those changes (the insert written, the delete not yet), and a replay that
//! reads both into one epoch would never correct it. So during replay epochs (before
//! [`ReplayTouch::until`], set by the engine until its sources have passed everything the
//! previous run can have read) the pre-aggregation also sends every cell it touched, with a
//! zero sum where its changes cancelled; those updates go, like the cells, to the worker that
//! owns the user, which captures them ([`CapturedTouches`]) and turns each into a zero change:
//! "write this cell's current value", or delete it if it has no live expense. (Captured where
//! the facts were summed, a touch would be published by a worker that does not own the cell: in
//! a cluster, by a process that holds nothing of the user, which then wrote it as deleted.)
//!
//! A user's last event time is no sum (a delete of the newest expense must reveal the one
//! before), so it is not a cell: [`LastSeenByUser`] keeps each user's multiset of live event
//! times in an ordered map, on the worker that owns the user, and reports the newest time of
//! every user whose times changed when an epoch closes. Keeping those times in the arrangement
//! instead (one key per live expense, never consolidating) cost about 40% of the dataflow's
//! throughput in measurements, and made the pre-aggregation above a net loss.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ahash::RandomState;

use differential_dataflow::Hashable;
use differential_dataflow::VecCollection;
use differential_dataflow::collection::AsCollection;
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::{Cursor, Navigable};
use differential_dataflow::trace::implementations::KeySpine;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use crate::Epoch;
use crate::model::{AggKey, CountSum, Fact, LastSeen, UserId};
use crate::small_map::SmallMap;

/// The trace type of the cell arrangement.
pub type CellTrace = TraceAgent<KeySpine<AggKey, Epoch, CountSum>>;

/// Changes of cells captured from the arrangement's output, with their epochs.
pub type CapturedChanges = Rc<RefCell<Vec<(AggKey, Epoch, CountSum)>>>;

/// Cells touched in replay epochs, with their epochs, captured by the pre-aggregation.
pub type CapturedTouches = Rc<RefCell<Vec<(AggKey, Epoch)>>>;

/// Maps keyed by input-chosen keys (users, cells) hash with a per-process random seed, so an
/// input cannot aim many keys at one bucket (see the criterion bench `hashers`).
type SeededMap<K, V> = HashMap<K, V, RandomState>;

/// The replay epochs: every epoch from [`ReplayTouch::from`] and before [`ReplayTouch::until`]
/// reports the cells it touched, even where their changes cancel (see the module docs). Shared
/// by all workers of a process; none by default, all from an epoch on until further notice with
/// [`ReplayTouch::until_told`].
///
/// The upper bound only ever moves from "every epoch" down to one fixed epoch, and the engine
/// sets it only once every worker has read past the replayed input, so no epoch holding
/// replayed records can close without touching.
#[derive(Clone, Debug)]
pub struct ReplayTouch {
    from: Epoch,
    until: Arc<AtomicU64>,
}

impl Default for ReplayTouch {
    fn default() -> Self {
        ReplayTouch {
            from: 0,
            until: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl ReplayTouch {
    /// Every epoch from `from` on is a replay epoch until [`ReplayTouch::end_at`] says
    /// otherwise. (A restored checkpoint's own epoch comes before `from`: it changes every
    /// cell it holds anyway.)
    pub fn until_told(from: Epoch) -> Self {
        ReplayTouch {
            from,
            until: Arc::new(AtomicU64::new(Epoch::MAX)),
        }
    }

    /// The first replay epoch.
    pub fn from(&self) -> Epoch {
        self.from
    }

    /// The first epoch after the replay (`Epoch::MAX` while not known yet; at most `from`
    /// when there is none).
    pub fn until(&self) -> Epoch {
        self.until.load(Ordering::Acquire)
    }

    /// True if `epoch` is a replay epoch.
    pub fn covers(&self, epoch: Epoch) -> bool {
        epoch >= self.from && epoch < self.until()
    }

    /// The replay ends with `last`: later epochs report only real changes. Only ever lowers
    /// the bound (a later call with a larger epoch changes nothing).
    pub fn end_at(&self, last: Epoch) {
        self.until
            .fetch_min(last.saturating_add(1), Ordering::AcqRel);
    }
}

/// Arranges live facts into aggregate cells.
pub trait AggregateCells<'scope> {
    /// Explodes each fact into its cells, sums them per epoch, and arranges them by cell; in
    /// the replay epochs of `replay`, also appends every touched cell to `touched` on the
    /// worker that owns it. The returned stream carries no data, only the progress of that
    /// capture, for a probe: an epoch's touches are all captured once it passes. See the module
    /// docs.
    fn aggregate_cells(
        self,
        replay: ReplayTouch,
        touched: CapturedTouches,
    ) -> (Arranged<'scope, CellTrace>, Stream<'scope, Epoch, Vec<()>>);
}

impl<'scope> AggregateCells<'scope> for VecCollection<'scope, Epoch, Fact, i64> {
    fn aggregate_cells(
        self,
        replay: ReplayTouch,
        touched: CapturedTouches,
    ) -> (Arranged<'scope, CellTrace>, Stream<'scope, Epoch, Vec<()>>) {
        let scope = self.inner.scope();
        let sums = self.inner.pre_aggregate_cells(|_| true, replay.clone());
        // A replay bound only ever moves down, so a dataflow built with no replay epoch never
        // gets one: it needs no capture, and its pre-aggregated sums are not copied for one
        // (timely clones a stream's batches for every consumer but the last).
        let touches = if replay.until() > replay.from() {
            sums.clone().capture_touches(replay, touched)
        } else {
            timely::dataflow::operators::generic::operator::empty(scope)
        };
        let cells = sums.as_collection().arrange_by_self_named("AggregateCells");
        (cells, touches)
    }
}

/// Captures the cells summed in replay epochs (see [`AggregateCells`]) on their owners.
trait CaptureTouches<'scope> {
    fn capture_touches(
        self,
        replay: ReplayTouch,
        touched: CapturedTouches,
    ) -> Stream<'scope, Epoch, Vec<()>>;
}

impl<'scope> CaptureTouches<'scope> for Stream<'scope, Epoch, Vec<(AggKey, Epoch, CountSum)>> {
    fn capture_touches(
        self,
        replay: ReplayTouch,
        touched: CapturedTouches,
    ) -> Stream<'scope, Epoch, Vec<()>> {
        use differential_dataflow::Hashable;
        let covered = replay.clone();
        // Only replay epochs' updates cross to the owner a second time.
        self.unary::<CapacityContainerBuilder<Vec<(AggKey, Epoch)>>, _, _, _>(
            Pipeline,
            "ReplayTouches",
            move |_capability, _info| {
                move |input, output| {
                    input.for_each(|capability, data| {
                        let touches: Vec<(AggKey, Epoch)> = data
                            .drain(..)
                            .filter(|(_, time, _)| covered.covers(*time))
                            .map(|(key, time, _)| (key, time))
                            .collect();
                        if !touches.is_empty() {
                            output
                                .session(&capability)
                                .give_iterator(touches.into_iter());
                        }
                    });
                }
            },
        )
        .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Exchange::new(|(key, _): &(AggKey, Epoch)| key.hashed()),
            "CaptureTouches",
            move |_capability, _info| {
                move |input, _output| {
                    input.for_each(|_capability, data| {
                        touched.borrow_mut().extend(data.drain(..));
                    });
                }
            },
        )
    }
}

/// The first step of [`AggregateCells`], on its own (benchmarks measure it, and variants of
/// the graph reuse it): each epoch's cell contributions summed in a hash map per worker, sent
/// as one update per changed cell when the epoch closes.
pub trait PreAggregateCells<'scope> {
    /// Explodes each fact into the cells `keep` accepts and sums them per epoch; in the replay
    /// epochs of `replay`, also sends the touched cells whose changes cancelled, with a zero
    /// sum.
    fn pre_aggregate_cells<F>(
        self,
        keep: F,
        replay: ReplayTouch,
    ) -> Stream<'scope, Epoch, Vec<(AggKey, Epoch, CountSum)>>
    where
        F: Fn(&AggKey) -> bool + 'static;
}

impl<'scope> PreAggregateCells<'scope> for Stream<'scope, Epoch, Vec<(Fact, Epoch, i64)>> {
    fn pre_aggregate_cells<F>(
        self,
        keep: F,
        replay: ReplayTouch,
    ) -> Stream<'scope, Epoch, Vec<(AggKey, Epoch, CountSum)>>
    where
        F: Fn(&AggKey) -> bool + 'static,
    {
        self.unary_frontier::<CapacityContainerBuilder<Vec<(AggKey, Epoch, CountSum)>>, _, _, _>(
            Pipeline,
            "PreAggregateCells",
            |_capability, _info| {
                // Per open epoch: a capability to send at it, and the running sums.
                let mut open: BTreeMap<Epoch, (Capability<Epoch>, SeededMap<FullKey, CountSum>)> =
                    BTreeMap::new();
                // Emptied maps of closed epochs, kept for their capacity.
                let mut spare: Vec<SeededMap<FullKey, CountSum>> = Vec::new();
                move |(input, frontier), output| {
                    input.for_each(|capability, data| {
                        for (fact, time, diff) in data.drain(..) {
                            let (_, sums) = open.entry(time).or_insert_with(|| {
                                (
                                    capability.delayed(&time, 0),
                                    spare.pop().unwrap_or_default(),
                                )
                            });
                            let amount = fact.amount_minor * diff;
                            for cell in fact.cells() {
                                if !keep(&cell) {
                                    continue;
                                }
                                let sum = sums.entry(FullKey(cell)).or_insert((0, 0));
                                sum.0 += diff;
                                sum.1 += amount;
                            }
                        }
                    });
                    // Epochs the input can no longer reach are complete: send their sums.
                    while let Some(entry) = open.first_entry() {
                        if frontier.less_equal(entry.key()) {
                            break;
                        }
                        let (time, (capability, mut sums)) = entry.remove_entry();
                        // In a replay epoch, cancelled cells go too (zero sums: nothing for
                        // the arrangement, a touch for `CaptureTouches`).
                        let touch = replay.covers(time);
                        let mut session = output.session(&capability);
                        session.give_iterator(
                            sums.drain()
                                .filter(|(_, sum)| touch || *sum != (0, 0))
                                .map(|(FullKey(key), sum)| (key, time, sum)),
                        );
                        spare.push(sums);
                    }
                }
            },
        )
    }
}

/// An [`AggKey`] hashed on all its fields: `AggKey`'s own hash looks only at the user (to route
/// by user), which would put every cell of a user in one hash-map bucket chain.
#[derive(PartialEq, Eq)]
struct FullKey(AggKey);

impl Hash for FullKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(&self.0).hash(state);
        match self.0 {
            AggKey::User(u) => u.hash(state),
            AggKey::Category(u, n) | AggKey::Merchant(u, n) => (u, n).hash(state),
            AggKey::Day(u, d) | AggKey::Month(u, d) => (u, d).hash(state),
        }
    }
}

/// Last-event-time changes captured per epoch, for the worker to drain.
pub type CapturedLastSeen = Rc<RefCell<Vec<(Epoch, LastSeen)>>>;

/// Tracks every user's newest live event time.
pub trait LastSeenByUser<'scope> {
    /// Exchanges facts by user, keeps each user's live event times, and when an epoch closes
    /// appends the newest time of every user whose times changed in it to `sink`. The returned
    /// stream carries no data, only progress, for a probe.
    fn last_seen_by_user(self, sink: CapturedLastSeen) -> Stream<'scope, Epoch, Vec<()>>;
}

impl<'scope> LastSeenByUser<'scope> for VecCollection<'scope, Epoch, Fact, i64> {
    fn last_seen_by_user(self, sink: CapturedLastSeen) -> Stream<'scope, Epoch, Vec<()>> {
        // The same owner as the cells' arrangement: a user's last-seen time and cells are
        // published by one worker (one process, in a cluster).
        let by_user =
            Exchange::new(|update: &(Fact, Epoch, i64)| AggKey::User(update.0.user_id).hashed());
        self.inner
            .unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                by_user,
                "LastSeenByUser",
                |_capability, _info| {
                    // user -> (event_ms -> live expenses at that time).
                    let mut times: SeededMap<UserId, SmallMap<i64, i64>> = SeededMap::default();
                    // Changes of epochs not yet closed, applied in epoch order once they are.
                    let mut open: BTreeMap<Epoch, (Capability<Epoch>, Vec<(UserId, i64, i64)>)> =
                        BTreeMap::new();
                    move |(input, frontier), _output| {
                        input.for_each(|capability, data| {
                            for (fact, time, diff) in data.drain(..) {
                                open.entry(time)
                                    .or_insert_with(|| (capability.delayed(&time, 0), Vec::new()))
                                    .1
                                    .push((fact.user_id, fact.event_ms, diff));
                            }
                        });
                        while let Some(entry) = open.first_entry() {
                            if frontier.less_equal(entry.key()) {
                                break;
                            }
                            // Dropping the capability lets the probe see the epoch closed, after
                            // its changes are in the sink.
                            let (epoch, (_capability, mut changes)) = entry.remove_entry();
                            for &(user, event_ms, diff) in &changes {
                                times.entry(user).or_default().update(
                                    event_ms,
                                    |count| *count += diff,
                                    |count| *count != 0,
                                );
                            }
                            changes.sort_unstable_by_key(|(user, _, _)| *user);
                            changes.dedup_by_key(|(user, _, _)| *user);
                            let mut sink = sink.borrow_mut();
                            for (user, _, _) in changes {
                                let newest = times.get(&user).and_then(SmallMap::last_key);
                                if newest.is_none() {
                                    times.remove(&user);
                                }
                                sink.push((
                                    epoch,
                                    LastSeen {
                                        user_id: user,
                                        event_ms: newest,
                                    },
                                ));
                            }
                        }
                    }
                },
            )
    }
}

/// Copies the updates of every batch an arrangement emits into `sink`, and passes the
/// arrangement's progress on (its output carries no data).
///
/// Put a probe on the returned stream, not on the arrangement: a probe on the arrangement can
/// see a time complete before this operator has received the batches of that time.
pub fn capture_changes<'scope>(
    arranged: &Arranged<'scope, CellTrace>,
    sink: CapturedChanges,
) -> Stream<'scope, Epoch, Vec<()>> {
    arranged
        .stream
        .clone()
        .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Pipeline,
            "CaptureChanges",
            move |_capability, _info| {
                move |input, _output| {
                    input.for_each(|_capability, spans| {
                        let mut sink = sink.borrow_mut();
                        for span in spans.iter() {
                            let Some(batch) = &span.inner else { continue };
                            let mut cursor = batch.cursor();
                            while let Some(key) = cursor.get_key(batch) {
                                while cursor.get_val(batch).is_some() {
                                    cursor.map_times(batch, |time, diff| {
                                        sink.push((*key, *time, *diff));
                                    });
                                    cursor.step_val(batch);
                                }
                                cursor.step_key(batch);
                            }
                        }
                    });
                }
            },
        )
}
