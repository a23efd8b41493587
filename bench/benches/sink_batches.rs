//! Cassandra batch formation: turning one published epoch into the sink's batches.
//!
//! The sink thread merges published epochs into an `EpochGroup` (the last value of every
//! changed cell) and cuts it into per-user batches of prepared-statement values
//! (`plan_batches`): category and merchant names become text, days and months `YYYY-MM-DD` /
//! `YYYY-MM`. This is the CPU the sink spends per changed cell before anything goes to the
//! network; it runs on the sink's own thread, beside the workers and the publisher.
//!
//! The epochs are real: the published values of the last epoch of a dataflow run over the
//! same 1,000,000-record, 10,000-user stream as `benches/dataflow.rs`, in epochs of 100,000
//! and 10,000 records. Throughput is per changed cell.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use spendflow_bench::{
    config, deltas, epochs, label, records, run_dataflow, size, split_by_worker,
};
use spendflow_engine::ReadModel;
use spendflow_engine::sink::EpochGroup;
use spendflow_engine::sink::cassandra::plan_batches;

/// Users in the stream.
const USERS: u64 = 10_000;

/// Statements per batch: the sink's default.
const PER_BATCH: usize = 40;

fn sink_batches(c: &mut Criterion) {
    let total = size(1_000_000, 20_000);
    let records = records(config(USERS, 0.0), total);
    let mut group = c.benchmark_group("sink_batches");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for per_epoch in [total / 10, total / 100] {
        let run = run_dataflow(split_by_worker(&epochs(&records, per_epoch), 1));
        let (_model, mut writer) = ReadModel::new();
        let mut published = None;
        for delta in deltas(&run.closed) {
            published = Some(writer.apply(delta));
        }
        let published = published.expect("at least one epoch");
        let cells = published.cells.len();
        group.throughput(Throughput::Elements(cells as u64));
        let id = BenchmarkId::new("merge_and_plan", format!("epoch_{}", label(per_epoch)));
        group.bench_function(id, |b| {
            b.iter(|| {
                let mut epoch = EpochGroup::default();
                epoch.merge(
                    published.as_of.epoch,
                    Arc::clone(&published.as_of.positions),
                    0,
                    published.cells.iter().cloned(),
                );
                black_box(plan_batches(&epoch, PER_BATCH))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, sink_batches);
criterion_main!(benches);
