//! Describes the benches' workload: record sizes, the mix of record kinds, and how many updates
//! each dataflow stage sees, so that a time per record can be turned into a time per update.
//!
//! ```text
//! cargo run --release -p spendflow-bench --example workload -- [records=1000000] [users=10000]
//! ```

use std::collections::HashMap;

use spendflow_bench::{config, lines};
use spendflow_engine::source::generator::Simulator;
use spendflow_operators::model::Record;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are numbers"))
        .collect();
    let n = args.first().copied().unwrap_or(1_000_000);
    let users = args.get(1).copied().unwrap_or(10_000) as u64;

    for (name, bad_rate) in [("valid", 0.0), ("malformed", 1.0)] {
        let lines = lines(config(users, bad_rate), 100_000);
        let bytes: usize = lines.iter().map(Vec::len).sum();
        println!(
            "{name} lines: {:.1} bytes on average",
            bytes as f64 / lines.len() as f64
        );
    }

    let mut simulator = Simulator::new(config(users, 0.0)).expect("valid config");
    let mut kinds: HashMap<&'static str, usize> = HashMap::new();
    let mut live = HashMap::new();
    let mut fact_changes = 0usize;
    for _ in 0..n {
        let generated = simulator.next_record();
        *kinds.entry(generated.kind.label()).or_default() += 1;
        match generated.record.expect("no malformed records") {
            Record::Upsert(e) => {
                let fact = e.fact();
                fact_changes += match live.insert(e.expense_id, fact) {
                    Some(old) if old == fact => 0,
                    Some(_) => 2,
                    None => 1,
                };
            }
            Record::Delete { expense_id, .. } => {
                fact_changes += usize::from(live.remove(&expense_id).is_some());
            }
        }
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    let cells = spendflow_operators::Fact {
        user_id: 1,
        category: spendflow_operators::Name::intern("x").0,
        merchant: spendflow_operators::Name::intern("y").0,
        amount_minor: 0,
        event_ms: 0,
    }
    .cells()
    .len();
    println!("{n} records over {users} users:");
    for (kind, count) in kinds {
        println!("  {kind:>12}: {:5.2} %", count as f64 * 100.0 / n as f64);
    }
    println!(
        "live expenses at the end: {}; fact changes out of the upsert stage: {fact_changes} \
         ({:.2} per record); cell contributions before per-epoch pre-aggregation \
         ({cells} per fact change): {}",
        live.len(),
        fact_changes as f64 / n as f64,
        fact_changes * cells
    );
}
