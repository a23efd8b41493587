//! The hand-off between the publisher and the sink driver.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::EpochGroup;
use crate::core::{AsOf, CellValue};

/// The hand-off between the publisher and the durable sink: one group of epochs that grows
/// while the sink writes the previous one.
///
/// The publisher merges each published epoch into the waiting group (a cell that changes in
/// many epochs is written once, with its last value), so the slower the sink, the fewer writes
/// per input record. Bounded: once the waiting group holds `max_cells` cells the publisher
/// waits, its own bounded queue then holds the workers, and they stop reading their sources
/// (back-pressure); memory stays at about two groups.
#[derive(Debug)]
pub(crate) struct SinkInbox {
    waiting: Mutex<(Option<EpochGroup>, bool)>,
    changed: Condvar,
    max_cells: usize,
}

impl SinkInbox {
    /// An inbox whose waiting group holds up to `max_cells` cells.
    pub fn new(max_cells: usize) -> Self {
        SinkInbox {
            waiting: parking_lot::Mutex::new((None, false)),
            changed: Condvar::new(),
            max_cells: max_cells.max(1),
        }
    }

    /// Merges a published epoch into the waiting group, first waiting while the group is
    /// full. Returns false once the sink has closed the inbox (it failed for good).
    pub fn put(&self, as_of: &AsOf, cells: &[CellValue], records_covered: u64) -> bool {
        let mut state = self.waiting.lock();
        while !state.1
            && state
                .0
                .as_ref()
                .is_some_and(|g| g.cells.len() >= self.max_cells)
        {
            self.changed.wait(&mut state);
        }
        if state.1 {
            return false;
        }
        state.0.get_or_insert_with(EpochGroup::default).merge(
            as_of.epoch,
            Arc::clone(&as_of.positions),
            records_covered,
            cells.iter().cloned(),
        );
        self.changed.notify_all();
        true
    }

    /// The waiting group, once there is one; `None` once the inbox is closed and empty.
    pub(crate) fn take(&self) -> Option<EpochGroup> {
        let mut state = self.waiting.lock();
        loop {
            if let Some(group) = state.0.take() {
                self.changed.notify_all();
                return Some(group);
            }
            if state.1 {
                return None;
            }
            self.changed.wait(&mut state);
        }
    }

    /// No more groups: the publisher is done (the sink writes what waits), or the sink failed
    /// (the publisher stops handing it epochs).
    pub fn close(&self) {
        self.waiting.lock().1 = true;
        self.changed.notify_all();
    }
}
