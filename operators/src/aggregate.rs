//! The aggregate stage: live facts in, one arrangement of `(count, sum)` per cell out.
//!
//! Every live fact contributes `(1, amount)` to its user's total, category, merchant, UTC day and
//! UTC month cells, and `(1, 0)` to a `Seen` cell that records its event time (see
//! [`AggKey`]). The contributions are *differences*: `explode` multiplies them by the fact's
//! diff, so a retraction (`-1`) subtracts exactly what the insertion added, and the arrangement's
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
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use crate::Epoch;
use crate::model::{AggKey, CountSum, Fact};

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
                    move |(input, frontier), output| {
                        input.for_each(|capability, data| {
                            for (fact, time, diff) in data.drain(..) {
                                let (_, sums) = open.entry(time).or_insert_with(|| {
                                    (capability.delayed(&time, 0), FxHashMap::default())
                                });
                                let amount = fact.amount_minor * diff;
                                for cell in fact.cells() {
                                    let weight = if matches!(cell, AggKey::Seen(..)) {
                                        0
                                    } else {
                                        amount
                                    };
                                    let sum = sums.entry(FullKey(cell)).or_insert((0, 0));
                                    sum.0 += diff;
                                    sum.1 += weight;
                                }
                            }
                        });
                        // Epochs the input can no longer reach are complete: send their sums.
                        while let Some(entry) = open.first_entry() {
                            if frontier.less_equal(entry.key()) {
                                break;
                            }
                            let (time, (capability, sums)) = entry.remove_entry();
                            let mut session = output.session(&capability);
                            session.give_iterator(
                                sums.into_iter()
                                    .filter(|(_, sum)| *sum != (0, 0))
                                    .map(|(FullKey(key), sum)| (key, time, sum)),
                            );
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
            AggKey::Seen(u, t) => (u, t).hash(state),
        }
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
