//! Runs the dataflow bench's workload once (or a few times) and prints the throughput: a small
//! release binary to profile (`perf record -g`, `valgrind --tool=callgrind`) without criterion's
//! repetitions around it.
//!
//! ```text
//! cargo run --release -p spendflow-bench --example dataflow_once -- \
//!     [records=1000000] [users=10000] [epoch=100000] [workers=1] [runs=1]
//! ```
//!
//! Arguments are positional, each optional, with the defaults shown.

use spendflow_bench::{config, count, epochs, records, run_dataflow, split_by_worker};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are numbers"))
        .collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (n, users, per_epoch, workers, runs) = (
        arg(0, 1_000_000),
        arg(1, 10_000),
        arg(2, 100_000),
        arg(3, 1),
        arg(4, 1),
    );

    let records = records(config(users as u64, 0.0), n);
    let input = split_by_worker(&epochs(&records, per_epoch), workers);
    drop(records);
    for run in 0..runs {
        let result = run_dataflow(input.clone());
        let cells: usize = result.closed.iter().flatten().map(|c| c.cells.len()).sum();
        println!(
            "run {run}: {} records, {workers} worker(s), epochs of {per_epoch}: {:.3} s, \
             {:.3} M records/s, {cells} cell changes drained",
            count(&input),
            result.elapsed.as_secs_f64(),
            count(&input) as f64 / result.elapsed.as_secs_f64() / 1e6,
        );
    }
}
