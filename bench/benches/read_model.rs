//! Publishing one closed epoch: `ReadModelWriter::apply(EpochDelta)`.
//!
//! The publisher thread applies each epoch's merged changes to the persistent (`imbl`) maps of
//! the read model, computes the new value of every changed cell for subscribers, and swaps in a
//! new snapshot. It runs once per epoch on one thread whatever the number of workers, so its cost
//! per changed cell bounds how fast the engine can publish, and its cost per epoch is part of
//! the freshness (the time from a record to a query seeing it).
//!
//! The deltas are real: one run of the dataflow over the same 1,000,000-record, 10,000-user
//! stream as `benches/dataflow.rs`, with epochs of 100,000 and of 10,000 records. The bench
//! measures the *last* epoch of each run, against a read model that already holds every earlier
//! epoch (steady state: about 10,000 users with their categories, merchants, days and months),
//! because applying to an almost empty model would only measure inserts. Between iterations the
//! exact inverse of the delta (negated cells, the previous last-seen times) is applied outside
//! the timed region, so every timed apply starts from the same state.
//!
//! Throughput is per changed cell (`Elements` = the number of `CellChange`s in the delta); the
//! time per iteration is the publish cost of one epoch.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use spendflow_bench::{
    config, deltas, epochs, label, records, run_dataflow, size, split_by_worker,
};
use spendflow_engine::ReadModel;
use spendflow_engine::serve::read_model::EpochDelta;
use spendflow_operators::{CellChange, LastSeen};

/// Users in the stream.
const USERS: u64 = 10_000;

fn read_model(c: &mut Criterion) {
    // Records in the run that produces the deltas; far fewer when the bench only runs as a test.
    let total = size(1_000_000, 20_000);
    let records = records(config(USERS, 0.0), total);
    let mut group = c.benchmark_group("read_model");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for per_epoch in [total / 10, total / 100] {
        let run = run_dataflow(split_by_worker(&epochs(&records, per_epoch), 1));
        let mut deltas = deltas(&run.closed);
        let last = deltas.pop().expect("at least one epoch");

        let (model, mut writer) = ReadModel::new();
        for delta in deltas {
            writer.apply(delta);
        }
        let undo = inverse(&last, &model.snapshot());

        group.throughput(Throughput::Elements(last.cells.len() as u64));
        eprintln!(
            "read_model: the measured epoch of {} records changes {} cells and {} last-seen times",
            label(per_epoch),
            last.cells.len(),
            last.last_seen.len()
        );
        let id = BenchmarkId::new("apply_epoch", format!("epoch_{}", label(per_epoch)));
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let delta = last.clone();
                    let start = Instant::now();
                    black_box(writer.apply(delta));
                    timed += start.elapsed();
                    writer.apply(undo.clone());
                }
                timed
            })
        });
    }
    group.finish();
}

/// The delta that takes the model from after `delta` back to `before`.
fn inverse(delta: &EpochDelta, before: &spendflow_engine::Snapshot) -> EpochDelta {
    EpochDelta {
        as_of: before.as_of().clone(),
        cells: delta
            .cells
            .iter()
            .map(|c| CellChange {
                count: -c.count,
                sum: -c.sum,
                ..c.clone()
            })
            .collect(),
        last_seen: delta
            .last_seen
            .iter()
            .map(|s| LastSeen {
                user_id: s.user_id,
                event_ms: before.user(s.user_id).and_then(|u| u.last_event_ms),
            })
            .collect(),
        records_covered: before.records_covered(),
        ..EpochDelta::default()
    }
}

criterion_group!(benches, read_model);
criterion_main!(benches);
