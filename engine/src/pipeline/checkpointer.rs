//! Step 8 on the checkpoint thread: joins the workers' shares of each checkpoint and stores it
//! once the durable sink (if any) has committed its epoch.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use spendflow_operators::{Epoch, RejectReason};

use super::*;
use crate::checkpoint::{Checkpoint, CheckpointStore, SavedPosition};

/// Reads the newest epoch the alerts topic holds every change of (`AlertsOutput::committed_probe`).
pub type AlertsCommitted = Box<dyn Fn() -> Option<Epoch> + Send>;

/// How long a checkpoint may wait for a worker's share before it is given up (a worker that
/// missed the mark; the next checkpoint is then marked).
const CHECKPOINT_PATIENCE: Duration = Duration::from_secs(120);

/// Step 8: joins the workers' shares of each checkpoint and stores it, once the durable sink
/// (if any) has committed its epoch, until the publisher hangs up.
pub fn run_checkpointer(
    parts: Receiver<SnapshotPart>,
    workers: usize,
    mut store: Box<dyn CheckpointStore>,
    shared: &Shared,
    wait_for_sink: bool,
    alerts_committed: Option<AlertsCommitted>,
) {
    let mut pending: std::collections::BTreeMap<Epoch, (Instant, Vec<SnapshotPart>)> =
        Default::default();
    loop {
        match parts.recv_timeout(Duration::from_millis(200)) {
            Ok(part) => pending
                .entry(part.epoch)
                .or_insert_with(|| (Instant::now(), Vec::new()))
                .1
                .push(part),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
        pending.retain(|epoch, (since, _)| {
            let keep = since.elapsed() < CHECKPOINT_PATIENCE;
            if !keep {
                tracing::warn!(
                    epoch,
                    "A checkpoint missed a worker's share; it is given up."
                );
                shared.clock.checkpoint_finished(*epoch);
            }
            keep
        });
        let Some((&epoch, _)) = pending.iter().find(|(_, (_, p))| p.len() == workers) else {
            continue;
        };
        let (_, shares) = pending.remove(&epoch).expect("found");
        // The sink must hold the checkpoint's state before the checkpoint may say so.
        while wait_for_sink
            && shared.sink_committed.load(Ordering::Acquire) < epoch
            && !shared.stop.load(Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if wait_for_sink && shared.sink_committed.load(Ordering::Acquire) < epoch {
            break; // Stopping before the sink caught up: this checkpoint would claim too much.
        }
        // Likewise the alerts topic: a checkpoint ahead of it would make a restart skip the
        // input behind changes the topic never got (see `sink::alerts`).
        if let Some(committed) = &alerts_committed {
            while committed().is_none_or(|c| c < epoch) && !shared.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if committed().is_none_or(|c| c < epoch) {
                break;
            }
        }
        let started = Instant::now();
        let progress = || shared.checkpoints.lock();
        // Dead letters of records before the checkpoint must be in their topic before the
        // checkpoint says those records are done: a restart will not read them again.
        if !shared.dead_letters.flush() {
            let mut progress = progress();
            progress.failed(format!(
                "checkpoint at epoch {epoch} held back: dead letters before it are not delivered yet"
            ));
            let consecutive = progress.consecutive_failures;
            drop(progress);
            if consecutive > 1 {
                tracing::error!(
                    epoch,
                    consecutive,
                    "Checkpoint skipped again: dead letters before it are still not delivered; a restart reads more input again each time."
                );
            } else {
                tracing::warn!(
                    epoch,
                    "Checkpoint skipped: dead letters before it are not delivered yet."
                );
            }
            shared.clock.checkpoint_finished(epoch);
            continue;
        }
        let mut checkpoint = join_shares(epoch, shares);
        checkpoint.dead_letter_scan = shared.dead_letters.scan_start(&checkpoint.positions);
        checkpoint.incarnation = shared.incarnation.to_string();
        match store.save(&checkpoint) {
            Ok(()) => {
                progress().written(epoch);
                crate::metrics::checkpoint_written(started.elapsed());
                shared.dead_letters.checkpointed(&checkpoint.positions);
                tracing::info!(
                    epoch,
                    live = checkpoint.live.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "Checkpoint written."
                )
            }
            Err(e) => {
                let mut progress = progress();
                progress.failed(e.to_string());
                let (failures, last_epoch) = (progress.consecutive_failures, progress.last_epoch);
                drop(progress);
                tracing::error!(
                    epoch,
                    error = %e,
                    consecutive_failures = failures,
                    last_written = last_epoch,
                    "Checkpoint not written; the previous one stays valid, and a restart reads more input again (with Kafka retention, input may expire before it is)."
                )
            }
        }
        shared.clock.checkpoint_finished(epoch);
    }
}

/// One checkpoint from every worker's share.
fn join_shares(epoch: Epoch, shares: Vec<SnapshotPart>) -> Checkpoint {
    let mut checkpoint = Checkpoint {
        epoch,
        names: spendflow_operators::Name::interned()
            .iter()
            .map(|n| n.to_string())
            .collect(),
        ..Checkpoint::default()
    };
    let mut rejected = vec![0u64; RejectReason::ALL_CODES.len()];
    for share in shares {
        checkpoint.records_read += share.read;
        for (total, n) in rejected.iter_mut().zip(&share.rejected) {
            *total += n;
        }
        checkpoint
            .positions
            .extend(share.positions.iter().map(|p| SavedPosition {
                source: p.source.to_string(),
                partition: p.partition,
                position: p.position,
            }));
        if checkpoint.live.is_empty() {
            checkpoint.live = share.live;
        } else {
            checkpoint.live.extend(share.live);
        }
        checkpoint.reference.extend(share.reference);
    }
    checkpoint.positions.sort();
    checkpoint.rejected = RejectReason::ALL_CODES
        .iter()
        .zip(rejected)
        .filter(|(_, n)| *n > 0)
        .map(|(code, n)| (code.to_string(), n))
        .collect();
    checkpoint
}

#[cfg(test)]
mod checkpointer_tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::checkpoint::CheckpointError;
    use crate::sink::dead_letter::{DeadLetterOutput, DeadLetters, RejectedRecord};

    /// A dead-letter output whose deliveries succeed only when told to.
    #[derive(Debug, Default)]
    struct Output {
        deliverable: Arc<AtomicBool>,
    }

    impl DeadLetterOutput for Output {
        fn send(&self, _: &RejectedRecord, _: &[u8], _: Option<&[u8]>) {}
        fn flush(&self) -> bool {
            self.deliverable.load(Ordering::SeqCst)
        }
    }

    /// A store in memory that fails while told to.
    #[derive(Debug, Default)]
    struct Store {
        saved: Arc<parking_lot::Mutex<Vec<Epoch>>>,
        failing: Arc<AtomicBool>,
    }

    impl CheckpointStore for Store {
        fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError> {
            Ok(None)
        }
        fn save(&mut self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(CheckpointError::Io {
                    path: "/nowhere".into(),
                    source: std::io::Error::other("disk on fire"),
                });
            }
            self.saved.lock().push(checkpoint.epoch);
            Ok(())
        }
        fn discard_all(&mut self) -> Result<Vec<(String, String)>, CheckpointError> {
            Ok(Vec::new())
        }
    }

    fn part(epoch: Epoch) -> SnapshotPart {
        SnapshotPart {
            epoch,
            live: Vec::new(),
            reference: Vec::new(),
            positions: Arc::new(Vec::new()),
            read: epoch,
            rejected: Vec::new(),
        }
    }

    #[test]
    fn undelivered_dead_letters_and_failed_writes_hold_back_checkpoints_and_show_in_status() {
        let output = Output::default();
        let deliverable = Arc::clone(&output.deliverable);
        let store = Store::default();
        let (saved, failing) = (Arc::clone(&store.saved), Arc::clone(&store.failing));
        let dead_letters = Arc::new(DeadLetters::default().with_output(Box::new(output)));
        let shared = Arc::new(Shared::new(
            1,
            EpochClock::new(Duration::from_millis(10), 1000),
            dead_letters,
        ));
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                run_checkpointer(rx, 1, Box::new(store), &shared, false, None)
            })
        };
        let progress = || shared.checkpoints.lock().clone();
        let wait_failures = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while progress().failures < n {
                assert!(Instant::now() < deadline, "{:?}", progress());
                std::thread::sleep(Duration::from_millis(5));
            }
        };

        // Dead letters not delivered: no checkpoint, twice.
        tx.send(part(1)).unwrap();
        wait_failures(1);
        tx.send(part(2)).unwrap();
        wait_failures(2);
        assert!(saved.lock().is_empty());
        let p = progress();
        assert_eq!((p.last_epoch, p.consecutive_failures), (0, 2));
        assert!(p.last_error.unwrap().contains("dead letters"));

        // Delivered, but the store fails.
        deliverable.store(true, Ordering::SeqCst);
        failing.store(true, Ordering::SeqCst);
        tx.send(part(3)).unwrap();
        wait_failures(3);
        assert!(saved.lock().is_empty());
        assert!(progress().last_error.unwrap().contains("disk on fire"));

        // Both well again: written.
        failing.store(false, Ordering::SeqCst);
        tx.send(part(4)).unwrap();
        drop(tx);
        thread.join().unwrap();
        assert_eq!(*saved.lock(), vec![4]);
        let p = progress();
        assert_eq!(
            (p.last_epoch, p.failures, p.consecutive_failures),
            (4, 3, 0)
        );
        assert!(p.last_at.is_some());
    }
}
