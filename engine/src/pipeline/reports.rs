//! The queue between step 4 (the workers) and steps 5–6 (the publisher): bounded by the
//! reports it holds *and* by what they hold.
//!
//! A report carries a worker's closed epochs (every changed cell) and its checkpoint shares
//! (every live expense it owns). Counted by reports alone, the 64 the queue may hold could be
//! a gigabyte: a 100 K-record epoch changes hundreds of thousands of cells, and a publisher held
//! up (by a sink at its group bound, or by a million users' worth of publishing) lets them pile
//! up. So the queue also counts their items ([`WorkerReport::items`]) and a worker waits while
//! [`REPORT_QUEUE_ITEMS`] are queued; a report larger than that still goes, alone, into an
//! empty queue, so no report is ever refused and no worker waits for a publisher that has
//! nothing left to take.
//!
//! No deadlock: the publisher takes reports in arrival order whatever epochs they close, and
//! releases their items as it takes them, so a worker only ever waits for the publisher, never
//! for another worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use super::WorkerReport;

/// Reports the publisher may have queued before workers wait for it (back-pressure).
const REPORT_QUEUE: usize = 64;

/// Items (cell changes, last-seen times, checkpointed expenses, ...) the queued reports may
/// hold in all before workers wait for the publisher: some 64–100 MB.
const REPORT_QUEUE_ITEMS: usize = 2_000_000;

/// A bounded channel from the workers to the publisher (see the module docs).
pub fn report_channel() -> (ReportSender, ReportReceiver) {
    report_channel_bounded(REPORT_QUEUE, REPORT_QUEUE_ITEMS)
}

/// [`report_channel`] with other bounds (tests).
pub(crate) fn report_channel_bounded(
    reports: usize,
    items: usize,
) -> (ReportSender, ReportReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(reports);
    let budget = Arc::new(Budget {
        queued: Mutex::new(0),
        taken: Condvar::new(),
        limit: items,
        closed: AtomicBool::new(false),
    });
    (
        ReportSender {
            tx,
            budget: Arc::clone(&budget),
        },
        ReportReceiver { rx, budget },
    )
}

#[derive(Debug)]
struct Budget {
    /// Items in reports sent and not yet taken.
    queued: Mutex<usize>,
    taken: Condvar,
    limit: usize,
    /// The publisher is gone.
    closed: AtomicBool,
}

impl Budget {
    fn release(&self, items: usize) {
        let mut queued = self.queued.lock();
        *queued = queued.saturating_sub(items);
        self.taken.notify_all();
    }
}

impl WorkerReport {
    /// What the report holds, counted in items: cell changes and the other per-epoch changes,
    /// and checkpointed expenses and reference rows.
    pub fn items(&self) -> usize {
        let epochs: usize = self
            .epochs
            .iter()
            .map(|e| {
                let c = &e.closed;
                c.cells.len()
                    + c.last_seen.len()
                    + c.users.len()
                    + c.alerts.len()
                    + c.converted.len()
                    + c.rates.len()
            })
            .sum();
        let snapshots: usize = self
            .snapshots
            .iter()
            .map(|s| s.live.len() + s.reference.len())
            .sum();
        epochs + snapshots
    }
}

/// The workers' end of the report queue.
#[derive(Clone, Debug)]
pub struct ReportSender {
    /// Each report travels with its item count, so the publisher releases exactly what the
    /// worker counted.
    tx: Sender<(usize, WorkerReport)>,
    budget: Arc<Budget>,
}

impl ReportSender {
    /// Queues a report; waits while the queue is full (by reports or by items, see the module
    /// docs).
    ///
    /// # Errors
    ///
    /// The report back, once the publisher is gone.
    pub fn send(&self, report: WorkerReport) -> Result<(), WorkerReport> {
        let items = report.items();
        {
            let mut queued = self.budget.queued.lock();
            while *queued > 0 && *queued + items > self.budget.limit {
                if self.budget.closed.load(Ordering::Acquire) {
                    return Err(report);
                }
                // Timed, so a publisher that goes away is noticed even if nobody notifies.
                self.budget
                    .taken
                    .wait_for(&mut queued, Duration::from_millis(100));
            }
            *queued += items;
        }
        self.tx.send((items, report)).map_err(|e| {
            self.budget.release(items);
            e.into_inner().1
        })
    }
}

/// The publisher's end of the report queue.
#[derive(Debug)]
pub struct ReportReceiver {
    rx: Receiver<(usize, WorkerReport)>,
    budget: Arc<Budget>,
}

impl ReportReceiver {
    /// The reports as they come, until every worker has hung up; each one's items are released
    /// as it is taken.
    pub fn iter(&self) -> impl Iterator<Item = WorkerReport> + '_ {
        self.rx.iter().map(|(items, report)| {
            self.budget.release(items);
            report
        })
    }
}

impl Drop for ReportReceiver {
    fn drop(&mut self) {
        self.budget.closed.store(true, Ordering::Release);
        self.budget.taken.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use spendflow_operators::ClosedEpoch;
    use spendflow_operators::model::{AggKey, CellChange};

    use super::*;
    use crate::pipeline::WorkerEpoch;

    /// A report of one epoch with `cells` cell changes.
    fn report(cells: usize) -> WorkerReport {
        WorkerReport {
            worker: 0,
            epochs: vec![WorkerEpoch {
                closed: ClosedEpoch {
                    epoch: 1,
                    cells: (0..cells as u64)
                        .map(|u| CellChange {
                            key: AggKey::User(u),
                            count: 1,
                            sum: 1,
                        })
                        .collect(),
                    ..ClosedEpoch::default()
                },
                positions: Arc::default(),
                read: 0,
            }],
            snapshots: Vec::new(),
        }
    }

    /// A queue bounded by 10 items that holds a report of `first` items, and a report of
    /// `second` items sent from another thread, checked to be held back; the receiver says
    /// whether that send succeeded once it returns.
    fn second_report_held_back(
        first: usize,
        second: usize,
    ) -> (
        ReportSender,
        ReportReceiver,
        crossbeam_channel::Receiver<bool>,
    ) {
        let (tx, rx) = report_channel_bounded(64, 10);
        tx.send(report(first)).unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let sender = tx.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(sender.send(report(second)).is_ok());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a report of {second} items went past {first} queued ones"
        );
        (tx, rx, done_rx)
    }

    #[test]
    fn a_worker_waits_while_the_queued_reports_hold_the_item_bound() {
        // 6 + 6 > 10: the second report waits, although the queue holds one report of 64 ...
        let (_tx, rx, second) = second_report_held_back(6, 6);
        // ... until the publisher takes the first.
        let mut reports = rx.iter();
        assert_eq!(reports.next().map(|r| r.items()), Some(6));
        assert_eq!(second.recv_timeout(Duration::from_secs(30)), Ok(true));
        assert_eq!(reports.next().map(|r| r.items()), Some(6));
    }

    #[test]
    fn a_report_larger_than_the_bound_goes_alone_into_an_empty_queue() {
        // The report of 50 went into the empty queue; the small one waits for it to be taken.
        let (_tx, rx, small) = second_report_held_back(50, 1);
        assert_eq!(rx.iter().next().map(|r| r.items()), Some(50));
        assert_eq!(small.recv_timeout(Duration::from_secs(30)), Ok(true));
    }

    #[test]
    fn a_waiting_worker_is_let_go_when_the_publisher_is_gone() {
        let (tx, rx, waiting) = second_report_held_back(10, 5);
        drop(rx);
        assert_eq!(waiting.recv_timeout(Duration::from_secs(30)), Ok(false));
        assert!(tx.send(report(1)).is_err());
    }
}
