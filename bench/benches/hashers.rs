//! What the seeded hasher costs: the upsert stage's live map keyed by `(user_id, expense_id)`,
//! with the hasher the engine uses (`ahash::RandomState`, a per-process random seed, so an
//! input cannot compute keys that collide) against the fixed FxHash it replaced and std's
//! SipHash. Each iteration upserts the next of 100,000 distinct expense keys into a map that
//! already holds them all (the steady state of a live set: a lookup and a replace), so the
//! figures are the per-record cost of the map the upsert stage pays.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use spendflow_bench::size;

fn keys() -> Vec<(u64, String)> {
    (0..size(100_000, 1_000) as u64)
        .map(|i| {
            (
                1 + i % 10_000,
                format!("e-{:012x}", i.wrapping_mul(0x9e37_79b9)),
            )
        })
        .collect()
}

fn upsert_with<S: BuildHasher + Default>(c: &mut Criterion, name: &str) {
    let keys = keys();
    let mut map: HashMap<(u64, String), i64, S> = HashMap::default();
    for (i, key) in keys.iter().enumerate() {
        map.insert(key.clone(), i as i64);
    }
    let mut next = 0;
    let mut group = c.benchmark_group("live_map_upsert");
    group.throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        b.iter(|| {
            let key = &keys[next];
            next = (next + 1) % keys.len();
            if let Some(value) = map.get_mut(black_box(key)) {
                *value += 1;
            }
        })
    });
    group.finish();
}

fn hashers(c: &mut Criterion) {
    upsert_with::<ahash::RandomState>(c, "ahash_seeded");
    upsert_with::<rustc_hash::FxBuildHasher>(c, "fxhash_fixed");
    upsert_with::<std::collections::hash_map::RandomState>(c, "siphash_seeded");
}

criterion_group!(benches, hashers);
criterion_main!(benches);
