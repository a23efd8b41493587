//! Following `sink_progress`: a background task reads it every poll interval and publishes
//! what it found, so requests learn their `as_of` without a query of their own, and
//! read-your-writes waits (`consistency.min_epoch`) wake as soon as the sink commits the epoch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spendflow_operators::Epoch;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Status;

use crate::cassandra::reader::{ProgressState, TableReader};
use crate::serve::grpc::backend::Wait;
use crate::serve::grpc::convert;
use crate::serve::read_model::AsOf;

/// Longest wait for one read of `sink_progress` before it counts as failed.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the last successful read of `sink_progress` found.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The progress rows' state.
    pub state: ProgressState,
    /// When what the committed row covers (records and positions), or whether an epoch is in
    /// flight, last changed (or when the server started watching).
    pub changed_at: Instant,
    /// The last read failed: Cassandra's message.
    pub error: Option<String>,
}

impl Observed {
    /// The committed epoch and its positions (epoch 0 if nothing is committed yet).
    pub fn as_of(&self) -> AsOf {
        match &self.state.committed {
            Some(p) => AsOf {
                epoch: p.epoch,
                positions: Arc::new(p.positions.clone()),
                incarnation: self.state.incarnation(),
            },
            None => AsOf {
                incarnation: self.state.incarnation(),
                ..AsOf::default()
            },
        }
    }

    /// The tables are quiet: an epoch is committed, none is in flight, and what the committed
    /// epoch covers has not changed for `quiet`. Cassandra cannot tell what the engine has not
    /// read yet, so a stopped or stalled engine looks quiet too.
    pub fn quiet(&self, quiet: Duration) -> bool {
        self.state.committed.is_some() && self.state.settled() && self.changed_at.elapsed() >= quiet
    }

    fn fingerprint(state: &ProgressState) -> (bool, Option<(u64, Vec<(String, i32, i64)>)>) {
        let covered = state.committed.as_ref().map(|p| {
            let positions = p
                .positions
                .iter()
                .map(|q| (q.source.to_string(), q.partition, q.position))
                .collect();
            (p.records_covered, positions)
        });
        (state.settled(), covered)
    }
}

/// The published view of `sink_progress`; cheap to clone.
#[derive(Clone, Debug)]
pub struct ProgressWatch {
    rx: watch::Receiver<Observed>,
}

impl ProgressWatch {
    /// The latest observation.
    pub fn current(&self) -> Observed {
        self.rx.borrow().clone()
    }

    /// The as-of to answer with: the committed epoch now, or (with `wait.min_epoch > 0`) once
    /// the sink has committed `min_epoch`, waiting at most `wait.timeout`.
    ///
    /// # Errors
    ///
    /// `DEADLINE_EXCEEDED` if the epoch was not committed in time.
    pub async fn at_least(&self, wait: Wait) -> Result<AsOf, Status> {
        if wait.min_epoch == 0 {
            return Ok(self.current().as_of());
        }
        let mut rx = self.rx.clone();
        let reached = tokio::time::timeout(
            wait.timeout,
            rx.wait_for(|o| {
                o.state
                    .committed_epoch()
                    .is_some_and(|e| e >= wait.min_epoch)
            }),
        )
        .await;
        match reached {
            Ok(Ok(observed)) => Ok(observed.as_of()),
            _ => Err(convert::epoch_not_reached(
                wait,
                self.current().state.committed_epoch(),
                "committed by the Cassandra sink",
            )),
        }
    }

    /// Waits for the next observation; false once the watching task has ended.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// The committed epoch now.
    pub fn committed_epoch(&self) -> Option<Epoch> {
        self.rx.borrow().state.committed_epoch()
    }
}

/// Reads `sink_progress` once (so a server does not start against a keyspace it cannot
/// read), then keeps reading it every `interval` in a task, which ends once every
/// [`ProgressWatch`] is dropped. A failed read keeps the last state and sets
/// [`Observed::error`] until a read succeeds again.
///
/// # Errors
///
/// The first read's error.
pub async fn watch(
    reader: Arc<TableReader>,
    interval: Duration,
) -> Result<(ProgressWatch, JoinHandle<()>), crate::cassandra::CassandraError> {
    let first = reader.progress().await?;
    let (tx, rx) = watch::channel(Observed {
        state: first,
        changed_at: Instant::now(),
        error: None,
    });
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = tx.closed() => return,
            }
            let result = match tokio::time::timeout(READ_TIMEOUT, reader.progress()).await {
                Ok(result) => result,
                Err(_) => Err(crate::cassandra::CassandraError::Request {
                    doing: "read sink_progress".into(),
                    message: format!("no answer within {} s", READ_TIMEOUT.as_secs()),
                    retriable: true,
                }),
            };
            let mut recovered = false;
            tx.send_modify(|observed| match result {
                Ok(state) => {
                    if Observed::fingerprint(&state) != Observed::fingerprint(&observed.state) {
                        observed.changed_at = Instant::now();
                    }
                    observed.state = state;
                    recovered = observed.error.take().is_some();
                }
                Err(e) => {
                    if observed.error.is_none() {
                        tracing::warn!(error = %e, "Cannot read sink_progress; answers stay at the last committed epoch seen, and reads of the tables may fail.");
                    }
                    observed.error = Some(e.to_string());
                }
            });
            if recovered {
                tracing::info!("sink_progress is readable again.");
            }
        }
    });
    Ok((ProgressWatch { rx }, task))
}
