//! Shared inputs and drivers for spendflow's criterion benches.
//!
//! The benches measure the three hot paths of the engine, each in isolation, so that a
//! regression (or a win) can be pinned to one of them:
//!
//! * `benches/decode.rs`: bytes to [`Record`] ([`spendflow_operators::decode`]), the per-record
//!   cost every source pays before the dataflow sees anything.
//! * `benches/dataflow.rs`: decoded records through the whole dataflow (upsert, every aggregate,
//!   `drain_closed` per epoch) on 1 and 2 workers: the engine's compute ceiling.
//! * `benches/read_model.rs`: [`ReadModelWriter::apply`] of one epoch's changes, the
//!   publisher's cost per epoch and per changed cell.
//!
//! The examples (`examples/`) are for profiling: `dataflow_once` runs the dataflow bench's
//! workload without criterion around it, `dataflow_stages` times growing prefixes and candidate
//! variants of the graph, and `workload` prints the sizes and update counts of the inputs.
//! `README.md` has the figures measured on the project's 2-core machine.
//!
//! Why the inputs come from the engine's own [`Simulator`] rather than from uniform random
//! records: the costs depend on the shape of the stream. Corrections and deletes make the upsert
//! stage emit retractions (`-old, +new`), duplicates exercise its "unchanged" short cut, late
//! events touch old day and month cells, and the Zipf-like user and merchant skew decides how
//! many distinct cells an epoch changes. Uniform records would over-state cell churn and
//! under-state retractions. The simulator is seeded, so every run of a bench sees the same bytes.
//!
//! Everything here is prepared *outside* the timed regions: generation, cutting into epochs,
//! splitting by worker, and cloning the per-run input. The drivers time only what the engine
//! does per record.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spendflow_engine::serve::read_model::{AsOf, EpochDelta};
use spendflow_engine::source::generator::{GeneratorConfig, Simulator};
use spendflow_operators::runtime::execute;
use spendflow_operators::{ClosedEpoch, Epoch, Record};

/// True if the bench binary was started to measure (`cargo bench`), false if it was started to
/// check that every bench runs (`cargo test --all-targets`, as the CI's `make test` does, runs each
/// bench target once, in a debug build, without criterion's `--bench` flag).
///
/// The benches use [`size`] to pick their workload from it: a million-record dataflow run takes
/// seconds in a release build and minutes in a debug one, which the test suite must not pay.
pub fn measuring() -> bool {
    let mut bench = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--bench" => bench = true,
            "--test" | "--list" => return false,
            _ => {}
        }
    }
    bench
}

/// `full` when [`measuring`], else `smoke` (a size that only shows the bench still runs).
pub fn size(full: usize, smoke: usize) -> usize {
    if measuring() { full } else { smoke }
}

/// A short label for a record count: `100k`, `2k`, `200`.
pub fn label(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// The seed every bench uses, so their inputs are the same from run to run.
pub const SEED: u64 = 0x5eed;

/// The simulator config of the benches: [`SEED`], `users` users, the default shares of
/// corrections (5 %), deletes (2 %), duplicates (2 %), refunds (3 %) and late events (5 %), and
/// a share `bad_rate` (0 to 1) of malformed records; the other shares are scaled by
/// `1 - bad_rate`, so the valid records keep the default mix.
///
/// The live window is raised to 1,000,000 so that corrections and deletes can reach any expense
/// of a million-record run, as a real stream's chargebacks reach old expenses; with the default
/// window of 100,000 most of the state would never be touched again.
pub fn config(users: u64, bad_rate: f64) -> GeneratorConfig {
    let defaults = GeneratorConfig::default();
    let valid = 1.0 - bad_rate;
    GeneratorConfig {
        seed: SEED,
        users,
        bad_rate,
        correction_rate: defaults.correction_rate * valid,
        delete_rate: defaults.delete_rate * valid,
        duplicate_rate: defaults.duplicate_rate * valid,
        refund_rate: defaults.refund_rate * valid,
        late_rate: defaults.late_rate * valid,
        live_window: 1_000_000,
        ..defaults
    }
}

/// The first `n` records of the simulator's stream as JSON v1 bytes (one record each, no
/// newline), valid and malformed alike.
///
/// # Panics
///
/// If `config` is out of range.
pub fn lines(config: GeneratorConfig, n: usize) -> Vec<Vec<u8>> {
    let mut simulator = Simulator::new(config).expect("a valid bench config");
    (0..n).map(|_| simulator.next_record().bytes).collect()
}

/// The first `n` *valid* records of the simulator's stream, already decoded (malformed records
/// are skipped, so with `bad_rate > 0` more than `n` are drawn). The simulator hands out the
/// decoded form along with the bytes, so no decoding cost is paid here.
///
/// # Panics
///
/// If `config` is out of range or its `bad_rate` is 1 (no record would ever be valid).
pub fn records(config: GeneratorConfig, n: usize) -> Vec<Record> {
    assert!(config.bad_rate < 1.0, "bad_rate 1 yields no valid record");
    let mut simulator = Simulator::new(config).expect("a valid bench config");
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        if let Some(record) = simulator.next_record().record {
            out.push(record);
        }
    }
    out
}

/// Cuts a stream into epochs of `per_epoch` records (the last one may be shorter), as the
/// engine's epoch clock does under load, when the record budget rather than the timer cuts.
pub fn epochs(records: &[Record], per_epoch: usize) -> Vec<Vec<Record>> {
    records
        .chunks(per_epoch.max(1))
        .map(<[Record]>::to_vec)
        .collect()
}

/// One input per worker: `split[w][e]` holds the records worker `w` pushes at epoch `e`.
///
/// Worker `w` of `peers` takes the records of the users with `user_id % peers == w`, as a source
/// partitioned by user would (one Kafka partition per user group, say). Every record of an
/// expense therefore enters through one worker, in stream order, which the upsert stage relies
/// on (see `spendflow_operators::upsert`). Every worker has an entry for every epoch, possibly
/// empty, so that all of them close the same epochs.
pub fn split_by_worker(epochs: &[Vec<Record>], peers: usize) -> Vec<Vec<Vec<Record>>> {
    let peers = peers.max(1);
    let mut split: Vec<Vec<Vec<Record>>> = (0..peers)
        .map(|_| Vec::with_capacity(epochs.len()))
        .collect();
    for epoch in epochs {
        for worker in split.iter_mut() {
            worker.push(Vec::with_capacity(epoch.len() / peers + 1));
        }
        for record in epoch {
            let worker = (record.user_id() % peers as u64) as usize;
            split[worker]
                .last_mut()
                .expect("pushed above")
                .push(record.clone());
        }
    }
    split
}

/// Total number of records in a per-worker input.
pub fn count(split: &[Vec<Vec<Record>>]) -> usize {
    split.iter().flatten().map(Vec::len).sum()
}

/// What one run of the dataflow took and produced.
#[derive(Debug)]
pub struct DataflowRun {
    /// Wall time from the moment the first worker started pushing until the last worker had
    /// drained the last epoch. Thread start-up, dataflow construction and tear-down are not in
    /// it: the engine pays those once, not per record.
    pub elapsed: Duration,
    /// Per worker, the closed epochs it drained, in epoch order.
    pub closed: Vec<Vec<ClosedEpoch>>,
}

/// Runs the whole expense dataflow once on `input.len()` workers, from an empty state.
///
/// Each worker builds the dataflow, then for every epoch pushes its records (moved, not cloned:
/// the engine pushes the `Record` the decoder just made), closes the epoch with `advance_to`,
/// steps until the epoch has passed the probe and calls `drain_closed`, which is what the
/// engine's worker loop does between polls. Waiting for each epoch before pushing the next is
/// the latency-bound ("real-time") mode: it exposes the fixed cost of closing an epoch, which
/// small epochs pay more often.
///
/// # Panics
///
/// If a worker panics or does not report exactly one closed epoch per epoch.
pub fn run_dataflow(input: Vec<Vec<Vec<Record>>>) -> DataflowRun {
    let workers = input.len().max(1);
    let slots: Arc<Vec<Mutex<Option<Vec<Vec<Record>>>>>> =
        Arc::new(input.into_iter().map(|w| Mutex::new(Some(w))).collect());
    let results = execute(workers, move |ctx| {
        let mut dataflow = ctx.build_dataflow();
        let epochs = slots[ctx.index()]
            .lock()
            .expect("no worker panicked holding it")
            .take()
            .expect("each worker takes its own input once");
        let mut closed = Vec::with_capacity(epochs.len());
        let start = Instant::now();
        for (epoch, records) in epochs.into_iter().enumerate() {
            for record in records {
                dataflow.push(record);
            }
            dataflow.advance_to(epoch as Epoch + 1);
            while dataflow.is_behind() {
                ctx.step();
            }
            closed.extend(dataflow.drain_closed());
        }
        (start, Instant::now(), closed)
    })
    .expect("dataflow workers ran");
    let start = results.iter().map(|r| r.0).min().expect("one worker");
    let end = results.iter().map(|r| r.1).max().expect("one worker");
    DataflowRun {
        elapsed: end - start,
        closed: results.into_iter().map(|r| r.2).collect(),
    }
}

/// Merges the workers' closed epochs into one [`EpochDelta`] per epoch, the way the engine's
/// publisher does (concatenating every worker's changes of the epoch).
pub fn deltas(closed: &[Vec<ClosedEpoch>]) -> Vec<EpochDelta> {
    let epochs = closed.iter().map(Vec::len).max().unwrap_or(0);
    (0..epochs)
        .map(|i| {
            let mut delta = EpochDelta::default();
            for worker in closed {
                if let Some(c) = worker.get(i) {
                    delta.as_of = AsOf {
                        epoch: c.epoch,
                        positions: Arc::default(),
                        ..AsOf::default()
                    };
                    delta.cells.extend(c.cells.iter().cloned());
                    delta.last_seen.extend(c.last_seen.iter().cloned());
                }
            }
            delta
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use spendflow_operators::oracle::{Aggregates, recompute};

    use super::*;

    /// The driver the benches time must compute the right thing, or the figures mean nothing.
    #[test]
    fn run_dataflow_matches_recomputation_on_one_and_two_workers() {
        let records = records(config(200, 0.0), 20_000);
        let expected = recompute(&records);
        let epochs = epochs(&records, 3_000);
        for workers in [1, 2] {
            let split = split_by_worker(&epochs, workers);
            assert_eq!(count(&split), records.len());
            let run = run_dataflow(split);
            let mut served = Aggregates::default();
            for worker in &run.closed {
                assert_eq!(worker.len(), epochs.len(), "one closed epoch per epoch");
                worker.iter().for_each(|c| served.apply(c));
            }
            assert_eq!(served, expected, "{workers} workers");
            assert_eq!(deltas(&run.closed).len(), epochs.len());
        }
    }

    #[test]
    fn malformed_lines_are_all_rejected() {
        let lines = lines(config(100, 1.0), 500);
        assert!(
            lines
                .iter()
                .all(|l| spendflow_operators::decode(l).is_err())
        );
    }
}
