//! The whole expense dataflow fed decoded records: upsert by `expense_id`, every aggregate (user,
//! category, merchant, day, month and the last-seen bookkeeping) in one arrangement, the capture
//! of its changes, and `drain_closed` after every epoch, as the engine's worker loop does.
//!
//! This is the engine's compute ceiling: what it could ingest if decoding and the sources were
//! free. The target is at least 2 M records/s on one worker.
//!
//! Workload: 1,000,000 simulator records (default shares of corrections, deletes, duplicates,
//! refunds and late events) over 10,000 users, cut into epochs of 100,000 records (few, large
//! epochs: catch-up or a busy stream) and of 10,000 records (the per-epoch cost shows: every
//! epoch closes, steps every operator, merges batches and drains). Each configuration runs on
//! 1 and 2 workers; with 2, each worker pushes the records of half of the users, as a source
//! partitioned by user would, and the dataflow exchanges by `expense_id` and by user.
//!
//! Every iteration builds a new dataflow and runs the whole stream from an empty state, so one
//! iteration takes about a second: the groups use few samples in flat sampling mode, and
//! `iter_custom` times only the pushing, stepping and draining (see
//! [`spendflow_bench::run_dataflow`]); cloning the input for the next run is not timed.

use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use spendflow_bench::{config, count, epochs, label, records, run_dataflow, size, split_by_worker};

/// Users in the stream.
const USERS: u64 = 10_000;

fn dataflow(c: &mut Criterion) {
    // Records per run; far fewer when the bench only runs as a test (see `size`).
    let total = size(1_000_000, 20_000);
    let records = records(config(USERS, 0.0), total);
    let mut group = c.benchmark_group("dataflow");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(total as u64));
    for per_epoch in [total / 10, total / 100] {
        let epochs = epochs(&records, per_epoch);
        for workers in [1, 2] {
            let input = split_by_worker(&epochs, workers);
            assert_eq!(count(&input), total);
            let id = BenchmarkId::new(format!("epoch_{}", label(per_epoch)), format!("w{workers}"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| run_dataflow(input.clone()).elapsed)
                        .sum()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, dataflow);
criterion_main!(benches);
