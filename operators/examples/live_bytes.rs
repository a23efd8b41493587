//! Bytes per live expense: builds N live expenses through the whole dataflow (decode, exchange,
//! upsert map, aggregates, last-seen) and reports the sizes of the types that carry an expense
//! and the heap the dataflow holds afterwards, measured by a counting global allocator (in this
//! binary only).
//!
//! ```text
//! cargo run --release -p spendflow-operators --example live_bytes -- [LIVE] [USERS]
//! ```
//!
//! Defaults: 1,000,000 live expenses over 10,000 users, one worker. Ids look like the
//! simulator's (`e-` + 16 hex digits); every expense has its own event time (as in the
//! generator's streams), 50 merchants, 10 categories. The figures are counts, not timings, so
//! they do not depend on the machine's load. `PERF-NOTES.md` has the results.

// A global allocator cannot be written without `unsafe`; this measuring binary is the one place
// it is allowed (the workspace denies `unsafe_code`), and it only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};

use spendflow_operators::Epoch;
use spendflow_operators::model::Fact;
use spendflow_operators::runtime::execute;
use spendflow_operators::upsert::{Instruction, LiveEntry};

/// The system allocator, counting live bytes, their peak, and allocation calls.
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed) + layout.size() as u64;
        PEAK.fetch_max(now, Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let now = if new_size >= layout.size() {
            let grow = (new_size - layout.size()) as u64;
            LIVE.fetch_add(grow, Ordering::Relaxed) + grow
        } else {
            let shrink = (layout.size() - new_size) as u64;
            LIVE.fetch_sub(shrink, Ordering::Relaxed) - shrink
        };
        PEAK.fetch_max(now, Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MERCHANTS: usize = 50;
const CATEGORIES: usize = 10;
/// Records pushed per epoch.
const EPOCH_RECORDS: u64 = 50_000;

/// What one run measured.
struct Measured {
    /// Heap bytes held after building the dataflow, before any record.
    baseline: u64,
    /// Heap bytes held once every live expense is in and every epoch drained.
    after: u64,
    /// The most heap bytes held at once during the run.
    peak: u64,
    /// Allocation calls inside `decode`.
    decode_calls: u64,
    /// Allocation calls of the whole run besides decoding (push, exchange, operators, drain).
    dataflow_calls: u64,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let live: u64 = args.next().map_or(1_000_000, |a| a.parse().expect("LIVE"));
    let users: u64 = args.next().map_or(10_000, |a| a.parse().expect("USERS"));

    println!("sizes (bytes):");
    println!(
        "  Instruction (one per record through the exchange): {}",
        size_of::<Instruction>()
    );
    println!(
        "  upsert map entry ((user, id) -> fact, one per live expense): {}",
        size_of::<LiveEntry>()
    );
    println!(
        "  Fact (one per change of a live fact, to the aggregates): {}",
        size_of::<Fact>()
    );

    let measured = execute(1, move |ctx| {
        let mut dataflow = ctx.build_dataflow();
        for _ in 0..10 {
            ctx.step();
        }
        let baseline = LIVE.load(Ordering::Relaxed);
        PEAK.store(baseline, Ordering::Relaxed);
        let calls_before = CALLS.load(Ordering::Relaxed);
        let mut decode_calls = 0;
        let mut format_calls = 0;
        let mut line = String::with_capacity(256);
        let mut epoch: Epoch = 0;
        for i in 0..live {
            let before = CALLS.load(Ordering::Relaxed);
            line.clear();
            write!(
                line,
                r#"{{"expense_id":"e-{i:016x}","user_id":{},"merchant":"merchant-{}","category":"category-{}","amount_minor":{},"currency":"EUR","event_time":"{}"}}"#,
                i % users + 1,
                i % MERCHANTS as u64,
                (i / 7) % CATEGORIES as u64,
                1 + (i * 37) % 50_000,
                spendflow_operators::decode::format_event_time(1_764_000_000_000 + i as i64 * 1_001),
            )
            .expect("a String");
            format_calls += CALLS.load(Ordering::Relaxed) - before;
            let before = CALLS.load(Ordering::Relaxed);
            let record = spendflow_operators::decode(line.as_bytes()).expect("a valid record");
            decode_calls += CALLS.load(Ordering::Relaxed) - before;
            dataflow.push(record);
            if (i + 1) % EPOCH_RECORDS == 0 || i + 1 == live {
                epoch += 1;
                dataflow.advance_to(epoch);
                while dataflow.is_behind() {
                    ctx.step();
                }
                drop(dataflow.drain_closed());
            }
        }
        // The formatting of the input lines is no part of the dataflow's allocations.
        let all_calls = CALLS.load(Ordering::Relaxed) - calls_before;
        Measured {
            baseline,
            after: LIVE.load(Ordering::Relaxed),
            peak: PEAK.load(Ordering::Relaxed),
            decode_calls,
            dataflow_calls: all_calls - decode_calls - format_calls,
        }
    })
    .expect("the worker ran")
    .remove(0);

    let per = |bytes: u64| bytes as f64 / live as f64;
    println!("{live} live expenses, {users} users, 1 worker:");
    println!(
        "  heap held by the dataflow: {:.1} bytes per live expense ({} bytes over a {} byte baseline)",
        per(measured.after - measured.baseline),
        measured.after - measured.baseline,
        measured.baseline
    );
    println!(
        "  peak heap during the run: {:.1} bytes per live expense",
        per(measured.peak - measured.baseline)
    );
    println!(
        "  allocation calls per record: {:.3} in decode, {:.3} in the dataflow (push, exchange, operators, drain)",
        per(measured.decode_calls),
        per(measured.dataflow_calls)
    );
}
