//! The hand-off between the publisher and the sink driver.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{EpochGroup, GroupRuns};
use crate::core::{AsOf, CellValue};

/// The hand-off between the publisher and the durable sink: one group of epochs that grows
/// while the sink writes the previous one.
///
/// The publisher publishes each epoch to the read model first and then merges it into the
/// waiting group here, **without waiting for the sink**: the served state moves at the pace of
/// the input, not of the durable store. A cell that changes in many epochs is written once,
/// with its last value, so the further the sink falls behind, the larger its next group and
/// the fewer writes per input record.
///
/// Memory: the waiting group keeps one value per distinct cell (sorted runs merged as they
/// come, see `GroupRuns`: fewer than two values per distinct cell until they merge) — it is
/// bounded by the size of the state, not by how much input arrives while the sink is busy (the
/// same cell changing a million times is one entry). With the group being written, that is a
/// few copies of the changed part of the state at most. For a huge state behind a very slow
/// sink there is still a hard bound, `max_cells` (the sink's
/// [`Sink::max_group_cells`](super::Sink::max_group_cells), millions by default): only once
/// the waiting group holds that many distinct cells does the publisher wait, its own bounded
/// queue then holds the workers, and they stop reading their sources (back-pressure).
///
/// Exactly-once is unchanged: a group carries the positions and epoch of its last epoch, the
/// sink commits that epoch only after writing every cell of the group, and checkpoints wait
/// for the sink's commit (`pipeline::checkpointer`), so nothing claims what the sink has not
/// committed; a restart re-reads and re-writes everything after the sink's last commit.
#[derive(Debug)]
pub(crate) struct SinkInbox {
    waiting: Mutex<(Option<GroupRuns>, bool)>,
    changed: Condvar,
    max_cells: usize,
}

impl SinkInbox {
    /// An inbox whose waiting group holds up to `max_cells` distinct cells before the
    /// publisher waits.
    pub fn new(max_cells: usize) -> Self {
        SinkInbox {
            waiting: parking_lot::Mutex::new((None, false)),
            changed: Condvar::new(),
            max_cells: max_cells.max(1),
        }
    }

    /// Merges a published epoch into the waiting group; waits only while the group already
    /// holds `max_cells` distinct cells (see the type's docs). Returns false once the sink has
    /// closed the inbox (it failed for good).
    pub fn put(&self, as_of: &AsOf, cells: &[CellValue], records_covered: u64) -> bool {
        let mut state = self.waiting.lock();
        // The runs may hold a cell more than once; only the exact count (which merges them)
        // decides to wait.
        while !state.1
            && state.0.as_mut().is_some_and(|g| {
                g.held_cells() >= self.max_cells && g.distinct_cells() >= self.max_cells
            })
        {
            self.changed.wait(&mut state);
        }
        if state.1 {
            return false;
        }
        state.0.get_or_insert_with(GroupRuns::default).push(
            as_of.epoch,
            Arc::clone(&as_of.positions),
            records_covered,
            cells.to_vec(),
        );
        self.changed.notify_all();
        true
    }

    /// The waiting group, once there is one; `None` once the inbox is closed and empty.
    pub(crate) fn take(&self) -> Option<EpochGroup> {
        let runs = {
            let mut state = self.waiting.lock();
            loop {
                if let Some(runs) = state.0.take() {
                    self.changed.notify_all();
                    break runs;
                }
                if state.1 {
                    return None;
                }
                self.changed.wait(&mut state);
            }
        };
        // Merged outside the lock: the publisher goes on meanwhile.
        Some(runs.finish())
    }

    /// No more groups: the publisher is done (the sink writes what waits), or the sink failed
    /// (the publisher stops handing it epochs).
    pub fn close(&self) {
        self.waiting.lock().1 = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spendflow_operators::AggKey;

    use super::*;

    fn as_of(epoch: u64) -> AsOf {
        AsOf {
            epoch,
            ..AsOf::default()
        }
    }

    fn cell(user: u64, count: i64) -> CellValue {
        CellValue {
            key: AggKey::User(user),
            count,
            sum: (count * 10).into(),
            last_event_ms: None,
        }
    }

    #[test]
    fn the_waiting_group_is_bounded_by_distinct_cells_not_by_epochs() {
        // Nobody takes: the publisher must still never wait, however many epochs change the
        // same cells.
        let inbox = SinkInbox::new(3);
        for epoch in 1..=10_000 {
            assert!(inbox.put(&as_of(epoch), &[cell(1, epoch as i64), cell(2, 1)], epoch));
        }
        let group = inbox.take().expect("a group waits");
        assert_eq!(group.epoch, 10_000);
        assert_eq!(group.records_covered, 10_000);
        assert_eq!(group.cells.len(), 2);
        assert_eq!(group.get(&AggKey::User(1)), Some(&cell(1, 10_000)));
    }

    #[test]
    fn the_publisher_waits_only_at_the_bound_and_goes_on_once_the_sink_takes() {
        let inbox = Arc::new(SinkInbox::new(2));
        assert!(inbox.put(&as_of(1), &[cell(1, 1), cell(2, 1)], 1));
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let publisher = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                let put = inbox.put(&as_of(2), &[cell(3, 1)], 2);
                done_tx.send(put).unwrap();
            })
        };
        // The full group holds the publisher back ...
        assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err());
        // ... until the sink takes it.
        let first = inbox.take().expect("the full group");
        assert_eq!(first.epoch, 1);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(true));
        publisher.join().unwrap();
        let second = inbox.take().expect("the next group");
        assert_eq!(second.epoch, 2);
        assert_eq!(second.cells.len(), 1);
        inbox.close();
        assert!(inbox.take().is_none());
        assert!(
            !inbox.put(&as_of(3), &[cell(4, 1)], 3),
            "a closed inbox refuses"
        );
    }
}
