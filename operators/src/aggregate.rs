//! The aggregate stage: live facts in, one arrangement of `(count, sum)` per cell out.
//!
//! Every live fact contributes `(1, amount)` to its user's total, category, merchant, UTC day and
//! UTC month cells, and `(1, 0)` to a `Seen` cell that records its event time (see
//! [`AggKey`]). The contributions are *differences*: `explode` multiplies them by the fact's
//! diff, so a retraction (`-1`) subtracts exactly what the insertion added, and the arrangement's
//! accumulated difference for a key **is** the aggregate. No operator ever rescans the values of
//! a key: a `reduce` that did measured 75–320× slower on this workload.
//!
//! All cells live in one arrangement keyed by [`AggKey`], whose hash is the user id, so the
//! arrangement exchanges by user and one sort serves every aggregate.

use std::cell::RefCell;
use std::rc::Rc;

use differential_dataflow::VecCollection;
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::{Cursor, Navigable};
use differential_dataflow::trace::implementations::KeySpine;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;

use crate::Epoch;
use crate::model::{AggKey, CountSum, Fact};

/// The trace type of the cell arrangement.
pub type CellTrace = TraceAgent<KeySpine<AggKey, Epoch, CountSum>>;

/// Changes of cells captured from the arrangement's output, with their epochs.
pub type CapturedChanges = Rc<RefCell<Vec<(AggKey, Epoch, CountSum)>>>;

/// Arranges live facts into aggregate cells.
pub trait AggregateCells<'scope> {
    /// Explodes each fact into its cells and arranges them by cell; see the module docs.
    fn aggregate_cells(self) -> Arranged<'scope, CellTrace>;
}

impl<'scope> AggregateCells<'scope> for VecCollection<'scope, Epoch, Fact, i64> {
    fn aggregate_cells(self) -> Arranged<'scope, CellTrace> {
        self.explode(|fact: Fact| {
            let amount = fact.amount_minor;
            fact.cells().into_iter().map(move |cell| {
                let weight = if matches!(cell, AggKey::Seen(..)) {
                    (1, 0)
                } else {
                    (1, amount)
                };
                (cell, weight)
            })
        })
        .arrange_by_self_named("AggregateCells")
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
