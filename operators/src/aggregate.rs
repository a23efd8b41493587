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
//! A user's last event time is no sum (a delete of the newest expense must reveal the one
//! before), so it is not a cell: [`LastSeenByUser`] keeps each user's multiset of live event
//! times in an ordered map, on the worker that owns the user, and reports the newest time of
//! every user whose times changed when an epoch closes. Keeping those times in the arrangement
//! instead (one key per live expense, never consolidating) cost about 40% of the dataflow's
//! throughput in measurements, and made the pre-aggregation above a net loss.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

use differential_dataflow::VecCollection;
use differential_dataflow::collection::AsCollection;
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::{Cursor, Navigable};
use differential_dataflow::trace::implementations::KeySpine;
use rustc_hash::FxHashMap;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use crate::Epoch;
use crate::model::{AggKey, CountSum, Fact, LastSeen, UserId};

/// The trace type of the cell arrangement.
pub type CellTrace = TraceAgent<KeySpine<AggKey, Epoch, CountSum>>;

/// Changes of cells captured from the arrangement's output, with their epochs.
pub type CapturedChanges = Rc<RefCell<Vec<(AggKey, Epoch, CountSum)>>>;

/// Arranges live facts into aggregate cells.
pub trait AggregateCells<'scope> {
    /// Explodes each fact into its cells, sums them per epoch, and arranges them by cell; see
    /// the module docs.
    fn aggregate_cells(self) -> Arranged<'scope, CellTrace>;
}

impl<'scope> AggregateCells<'scope> for VecCollection<'scope, Epoch, Fact, i64> {
    fn aggregate_cells(self) -> Arranged<'scope, CellTrace> {
        self.inner
            .unary_frontier::<CapacityContainerBuilder<Vec<(AggKey, Epoch, CountSum)>>, _, _, _>(
                Pipeline,
                "PreAggregateCells",
                |_capability, _info| {
                    // Per open epoch: a capability to send at it, and the running sums.
                    let mut open: BTreeMap<
                        Epoch,
                        (Capability<Epoch>, FxHashMap<FullKey, CountSum>),
                    > = BTreeMap::new();
                    // Emptied maps of closed epochs, kept for their capacity.
                    let mut spare: Vec<FxHashMap<FullKey, CountSum>> = Vec::new();
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
                            let mut session = output.session(&capability);
                            session.give_iterator(
                                sums.drain()
                                    .filter(|(_, sum)| *sum != (0, 0))
                                    .map(|(FullKey(key), sum)| (key, time, sum)),
                            );
                            spare.push(sums);
                        }
                    }
                },
            )
            .as_collection()
            .arrange_by_self_named("AggregateCells")
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
        let by_user = Exchange::new(|update: &(Fact, Epoch, i64)| update.0.user_id);
        self.inner
            .unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                by_user,
                "LastSeenByUser",
                |_capability, _info| {
                    // user -> (event_ms -> live expenses at that time).
                    let mut times: FxHashMap<UserId, BTreeMap<i64, i64>> = FxHashMap::default();
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
                                let user_times = times.entry(user).or_default();
                                let count = user_times.entry(event_ms).or_insert(0);
                                *count += diff;
                                if *count == 0 {
                                    user_times.remove(&event_ms);
                                }
                            }
                            changes.sort_unstable_by_key(|(user, _, _)| *user);
                            changes.dedup_by_key(|(user, _, _)| *user);
                            let mut sink = sink.borrow_mut();
                            for (user, _, _) in changes {
                                let newest = times
                                    .get(&user)
                                    .and_then(|t| t.last_key_value())
                                    .map(|(ms, _)| *ms);
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
