//! Where the dataflow's time goes, stage by stage: builds growing prefixes of the expense
//! dataflow (and a few variants of it) from the operators' public pieces, runs the dataflow
//! bench's workload through each, and prints records/s. The difference between two consecutive
//! prefixes is the cost of the stage added. A profile says which functions are hot; this says
//! which *operators* are, and what a change to the graph would buy before anyone makes it.
//!
//! ```text
//! cargo run --release -p spendflow-bench --example dataflow_stages -- \
//!     [records=1000000] [users=10000] [epoch=100000] [workers=1] [runs=3]
//! STAGES=arrange,full cargo run --release -p spendflow-bench --example dataflow_stages
//! ```
//!
//! Stages, each including the ones before it:
//!
//! * `input`: the input session and progress tracking only.
//! * `upsert`: plus `upsert_by_expense` (exchange by `(user_id, expense_id)`, the last-value hash map).
//! * `last_seen`: plus `last_seen_by_user` (exchange by user, per-user multiset of event times).
//! * `preagg`: plus each epoch's cell contributions summed in a hash map per worker (the
//!   engine's `PreAggregateCells` step, which `aggregate_cells` runs before its arrangement),
//!   not arranged.
//! * `arrange`: `last_seen` plus the engine's `aggregate_cells` (pre-aggregation, exchange by
//!   user, merge batcher, spine).
//! * `capture`: plus `capture_changes` (copying every batch's updates out).
//! * `full`: `ExpenseDataflow` as the engine runs it, with `drain_closed` after every epoch.
//!
//! Variants that are not in the engine (candidate changes, measured here first; compare them
//! with `arrange`):
//!
//! * `arrange_no_preagg`: every cell contribution straight into the arrangement (`explode` then
//!   `arrange_by_self`), without the per-epoch pre-aggregation.
//! * `arrange_3cells`: only the category, merchant and day cells: what deriving the user total
//!   (the sum of its categories) and the months (sums of their days) when publishing would save.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use differential_dataflow::AsCollection;
use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::operators::arrange::Arranged;
use spendflow_bench::{config, count, epochs, records, split_by_worker};
use spendflow_operators::aggregate::{
    AggregateCells, CapturedChanges, CapturedLastSeen, CellTrace, LastSeenByUser,
    PreAggregateCells, ReplayTouch, capture_changes,
};
use spendflow_operators::model::{AggKey, CountSum, Fact, Record};
use spendflow_operators::upsert::{Instruction, UpsertByExpense};
use spendflow_operators::{Epoch, ExpenseDataflow};
use timely::dataflow::operators::Probe;
use timely::dataflow::{ProbeHandle, Stream};
use timely::worker::Worker;

const STAGES: [&str; 9] = [
    "input",
    "upsert",
    "last_seen",
    "preagg",
    "arrange",
    "capture",
    "full",
    "arrange_no_preagg",
    "arrange_3cells",
];

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
        arg(4, 3).max(1),
    );
    let only = std::env::var("STAGES").ok();

    let records = records(config(users as u64, 0.0), n);
    let input = split_by_worker(&epochs(&records, per_epoch), workers);
    drop(records);
    let total = count(&input);
    println!("{total} records, {users} users, epochs of {per_epoch}, {workers} worker(s)");
    for stage in STAGES {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|s| s == stage))
        {
            continue;
        }
        let mut times: Vec<Duration> = (0..runs).map(|_| run(stage, input.clone())).collect();
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "{stage:>18}: median {:>7.3} s  {:>6.3} M records/s  (runs: {})",
            median.as_secs_f64(),
            total as f64 / median.as_secs_f64() / 1e6,
            times
                .iter()
                .map(|t| format!("{:.3}", t.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

/// One worker's handles on a partial dataflow.
struct Built {
    input: InputSession<Epoch, Instruction, i64>,
    probe: ProbeHandle<Epoch>,
    /// What the capture operators collected; emptied after every epoch.
    captured: CapturedChanges,
    last_seen: CapturedLastSeen,
}

/// Runs `stage` once over `input` (one entry per worker), timing as the dataflow bench does.
fn run(stage: &'static str, input: Vec<Vec<Vec<Record>>>) -> Duration {
    let workers = input.len();
    let slots: Arc<Vec<Mutex<Option<Vec<Vec<Record>>>>>> =
        Arc::new(input.into_iter().map(|w| Mutex::new(Some(w))).collect());
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let epochs = slots[worker.index()]
            .lock()
            .expect("no worker panicked holding it")
            .take()
            .expect("each worker takes its own input once");
        if stage == "full" {
            return run_full(worker, epochs);
        }
        let mut built = build(stage, worker);
        let start = Instant::now();
        for (epoch, records) in epochs.into_iter().enumerate() {
            for record in records {
                built.input.update(Instruction::from(record), 1);
            }
            built.input.advance_to(epoch as Epoch + 1);
            built.input.flush();
            while built.probe.less_than(built.input.time()) {
                worker.step();
            }
            built.captured.borrow_mut().clear();
            built.last_seen.borrow_mut().clear();
        }
        (start, Instant::now())
    })
    .expect("workers start");
    let spans: Vec<(Instant, Instant)> = guards
        .join()
        .into_iter()
        .map(|r| r.expect("worker ran"))
        .collect();
    let start = spans.iter().map(|s| s.0).min().expect("a worker");
    let end = spans.iter().map(|s| s.1).max().expect("a worker");
    end - start
}

/// The engine's own dataflow, driven as `spendflow_bench::run_dataflow` drives it.
fn run_full(worker: &mut Worker, epochs: Vec<Vec<Record>>) -> (Instant, Instant) {
    let mut dataflow = ExpenseDataflow::new(worker);
    let start = Instant::now();
    for (epoch, records) in epochs.into_iter().enumerate() {
        for record in records {
            dataflow.push(record);
        }
        dataflow.advance_to(epoch as Epoch + 1);
        while dataflow.is_behind() {
            worker.step();
        }
        std::hint::black_box(dataflow.drain_closed());
    }
    (start, Instant::now())
}

fn build(stage: &str, worker: &mut Worker) -> Built {
    let probe = ProbeHandle::new();
    let captured = CapturedChanges::default();
    let last_seen = CapturedLastSeen::default();
    let input = worker.dataflow::<Epoch, _, _>(|scope| {
        let (input, instructions) = scope.new_collection::<Instruction, i64>();
        if stage == "input" {
            instructions.inner.probe_with(&probe);
            return input;
        }
        let facts = instructions.upsert_by_expense(Default::default());
        if stage == "upsert" {
            facts.inner.probe_with(&probe);
            return input;
        }
        facts
            .clone()
            .last_seen_by_user(last_seen.clone())
            .probe_with(&probe);
        // Trace handles are dropped at the end of this closure, as the engine does.
        let arranged: Arranged<'_, CellTrace> = match stage {
            "last_seen" => return input,
            "preagg" => {
                pre_aggregate(facts.inner, false).probe_with(&probe);
                return input;
            }
            "arrange" | "capture" => {
                facts
                    .aggregate_cells(ReplayTouch::default(), Default::default())
                    .0
            }
            "arrange_no_preagg" => facts
                .explode(|fact: Fact| {
                    let amount = fact.amount_minor;
                    fact.cells()
                        .into_iter()
                        .map(move |cell| (cell, (1, amount)))
                })
                .arrange_by_self(),
            "arrange_3cells" => pre_aggregate(facts.inner, true)
                .as_collection()
                .arrange_by_self(),
            other => panic!("unknown stage {other}"),
        };
        if stage == "capture" {
            capture_changes(&arranged, captured.clone()).probe_with(&probe);
        } else {
            arranged.stream.probe_with(&probe);
        }
        input
    });
    Built {
        input,
        probe,
        captured,
        last_seen,
    }
}

/// The engine's pre-aggregation step (`PreAggregateCells`), not arranged; with `three_cells`,
/// only the category, merchant and day cells.
fn pre_aggregate<'scope>(
    facts: Stream<'scope, Epoch, Vec<(Fact, Epoch, i64)>>,
    three_cells: bool,
) -> Stream<'scope, Epoch, Vec<(AggKey, Epoch, CountSum)>> {
    facts.pre_aggregate_cells(
        move |cell| !(three_cells && matches!(cell, AggKey::User(_) | AggKey::Month(..))),
        ReplayTouch::default(),
    )
}
