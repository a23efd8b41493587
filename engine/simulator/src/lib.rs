//! spendflow's seeded, deterministic expense simulator: a workload tool of its own, with no I/O
//! and no dependency on the engine. The engine's `generator` source, `spendflow generate`, the
//! benches, the demo's personnel and the tests all draw their records from it.
//!
//! [`Simulator`] produces an infinite stream of JSON v1 records ([`Generated`]): new expenses,
//! corrections, deletes, duplicate deliveries, refunds, late events and (on request) malformed
//! records, in the shares a [`GeneratorConfig`] sets. It is a pure module: no I/O, no clock, no
//! thread. The in-process demo pushes its records straight into the pipeline, the file source
//! tests and the benches read them, and `spendflow generate` writes the same records to MySQL
//! and Kafka, together with the [`UserProfile`]s and [`Merchant`]s they refer to.
//!
//! # Determinism
//!
//! The same config (seed included) gives the same records, byte for byte, on every platform:
//!
//! * The stream comes from ChaCha8 seeded with `seed`, whose `u64` output is specified; every
//!   draw is turned into a number with integer arithmetic written out here (multiply-shift for
//!   ranges, cumulative integer tables for weighted choices) rather than `rand`'s distributions,
//!   whose algorithms may change between versions. There is no floating point on the path: the
//!   `f64` rates are turned into 32-bit thresholds once, when the simulator is built.
//! * Anything that belongs to a user rather than to a position in the stream (country, currency,
//!   cards, name, budget) is a hash of `(seed, user_id)`, so [`Simulator::user`] needs no state
//!   and gives the same profile whatever has been generated.
//! * Event time is a function of the position: record `i` has stream time
//!   `start_ms + i * ms_per_event`; no wall clock is read.
//!
//! # Realism, and how the skew works
//!
//! * Users: a few spend a lot. User ranks follow a Zipf-like law with exponent 0.8, drawn with
//!   doubling buckets (rank 0, ranks 1-2, ranks 3-6, ...) whose weights grow by a constant
//!   integer ratio: one table of at most 64 entries whatever the number of users, no per-user
//!   memory, no `powf`. An affine permutation of the ids, keyed by the seed, spreads the heavy
//!   spenders over the id space. With 1000 users, the top 1 % make about a fifth of the expenses.
//! * Merchants: each has one category for life. A new expense first picks a category by its
//!   share of card spending (groceries most, utilities least), then a merchant within it by a
//!   Zipf law with exponent 1 (the market leader takes the largest single share).
//! * Amounts: integer minor units, never floats. Each category has a quantile table in euro cents
//!   (minimum, deciles, maximum: groceries 5-150 EUR, travel 50-2000 EUR, ...) sampled
//!   piecewise-uniformly, which gives the long right tail of real spending. Each user has a home
//!   currency (from their country) and every amount is converted to it with integer rates (the
//!   yen, which has no minor unit, included).
//! * Each user has 1 to 3 cards `c-<user>-<n>`; the first is used most. Expense ids are
//!   `e-<16 hex>`, a bijective scramble of a counter, so they are unique and look random.
//! * Corrections re-send a live expense with a changed amount (sometimes a different merchant,
//!   or a recategorisation) and the same event time, so they update old buckets. Deletes remove
//!   a live expense. Duplicates repeat the latest record of a live expense (or a recent delete)
//!   byte for byte, so applying one changes nothing. Refunds are new expenses with a negative
//!   amount, same user, merchant and card as an earlier expense. Late events are new expenses
//!   up to `late_max_ms` before the stream time (default ten days: older days, sometimes the
//!   previous month).
//! * Malformed records are valid records damaged in one of [`MALFORMED_KINDS`] ways (truncated,
//!   float amount, missing field, bad currency, ...); every one is rejected by the decoder.
//!
//! # Bounded memory
//!
//! `spendflow generate` and the benches run for hundreds of millions of records, so the state
//! must not grow with the stream. Users and merchants need none beyond fixed tables (user facts
//! are hashes). The only growing need is "pick an earlier live expense" for corrections,
//! deletes, duplicates and refunds: the simulator keeps at most `live_window` (default 100 000)
//! live expenses, about 40 bytes each (4 MB), in a vector. Picking is a uniform index; a delete
//! is a `swap_remove`; when the window is full, a new expense replaces a random entry, so each
//! entry survives a newer expense with probability `1 - 1/window` and the window is a sample
//! that favours recent expenses, as real corrections and chargebacks do. An expense that falls
//! out of the window simply stays live for good. Only its compact fields are stored: its JSON is
//! a pure function of them, so a duplicate re-encodes exactly the bytes sent last. A ring of the
//! last 1024 deletes serves duplicate deletes. Memory is therefore
//! O(`live_window` + `merchants`), independent of the number of records and of users.
//!
//! # Speed
//!
//! The JSON is written by hand into one pre-sized buffer (no `serde_json::Value`, no `format!`
//! on the hot path; merchant names are escaped once, when the simulator is built). A record
//! costs about a dozen ChaCha8 words and three small allocations (the bytes, and the `String`s
//! of the decoded [`Generated::record`]). Measured in a release build on one core of a shared
//! 2-core Xeon VM: 2.4 to 2.7 million records per second (about 200 bytes each, ~500 MB/s).

mod config;
mod simulator;

pub use config::{
    ConfigError, GeneratorConfig, MAX_EVENT_MS, MAX_LIVE_WINDOW, MAX_MERCHANTS, MAX_USERS,
    default_start_ms,
};
pub use simulator::{
    Category, Generated, GeneratedKind, MALFORMED_KINDS, Merchant, Simulator, UserProfile,
};

#[cfg(test)]
mod tests;
