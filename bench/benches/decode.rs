//! Decoding JSON v1 records: `spendflow_operators::decode(bytes) -> Result<Record, Rejection>`.
//!
//! Every record the engine reads from Kafka or a file goes through `decode` on a worker thread
//! before the dataflow sees it, so its cost per record caps what one core can ingest (the target
//! is at least 1 M records/s per core). Two groups:
//!
//! * `decode/valid`: the simulator's default mix (new expenses, corrections, refunds, late
//!   events, duplicates, deletes), about 200 bytes a record. This is the common path: one
//!   serde pass capturing raw fields, then per-field checks, an RFC 3339 parse and the `Arc<str>`
//!   / `String` allocations of the `Record`.
//! * `decode/malformed`: only malformed records (every damage kind the simulator knows, in
//!   equal shares): what a poison stream costs. A rejection formats a human-readable detail, so
//!   it is not free; it must still be far cheaper than a valid record.
//!
//! Each iteration decodes the next of 100,000 distinct pre-generated lines (cycling), so the
//! branch predictor and caches see a realistic variety rather than one line decoded again and
//! again. The decoded value is dropped inside the timed region, as the engine eventually drops
//! it too.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use spendflow_bench::{config, lines, size};

/// Distinct lines per group (a few when the bench only runs as a test).
fn line_count() -> usize {
    size(100_000, 1_000)
}
/// Users in the generated stream; the count hardly matters to decoding.
const USERS: u64 = 10_000;

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    for (name, bad_rate) in [("valid", 0.0), ("malformed", 1.0)] {
        let lines = lines(config(USERS, bad_rate), line_count());
        let mut next = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                let line = &lines[next];
                next = if next + 1 == lines.len() { 0 } else { next + 1 };
                black_box(spendflow_operators::decode(black_box(line)))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
