//! What spendflow computes: the expense model, JSON v1 decoding, and the differential dataflow
//! that keeps per-user aggregates exactly up to date.
//!
//! This crate does no I/O and depends on no service client, so everything in it is tested with
//! plain unit and property tests. `spendflow-engine` feeds it records and takes its results to
//! the read model, sinks and query service. All timely/differential API use stays here.
//!
//! Reading order, following one record:
//!
//! 1. [`decode`]: bytes to a [`model::Record`], or a [`decode::Rejection`] with a reason.
//! 2. [`upsert`]: records to changes of the set of live facts (last write wins per expense).
//! 3. [`aggregate`]: live facts to `(count, sum)` per aggregate cell, as one arrangement.
//! 4. [`dataflow`]: the graph on one worker, and the consolidated changes per closed epoch.
//! 5. [`runtime`]: starting worker threads.
//!
//! Beside the expenses, reference data (budgets, currencies, exchange rates) joins them:
//! budget alerts and totals in a reporting currency.
//!
//! 6. [`reference`](mod@reference): the reference rows, the alert and conversion rules, how it works.
//! 7. [`enrich`]: the operators: reference rows upserted per key, joined with users' month
//!    and total cells.
//!
//! [`oracle`] recomputes every aggregate, fired alert and converted total from scratch; tests
//! compare the dataflow with it.

pub mod aggregate;
pub mod dataflow;
pub mod decode;
pub mod enrich;
pub mod id;
pub mod model;
pub mod name;
pub mod oracle;
pub mod reference;
pub mod runtime;
pub mod small_map;
pub mod upsert;

/// The dataflow's logical time: a number that grows by one each time the input is cut into a new
/// epoch. Results are only ever read at closed epochs.
pub type Epoch = u64;

pub use dataflow::{ClosedEpoch, ExpenseDataflow};
pub use decode::{RejectReason, Rejection, decode};
pub use model::{
    AggKey, CellChange, CountSum, Expense, ExpenseId, ExpenseIdError, Fact, LastSeen, LiveFact,
    Name, Record, UserId, owner_worker,
};
