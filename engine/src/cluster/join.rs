//! Joining the processes at start, and agreeing on how they start.
//!
//! Every process recovers on its own (the newest complete checkpoint, its own share of the
//! durable sink), then sends the others a [`Hello`] while the sockets are connected (see
//! `spendflow_operators::runtime::connect`). From the hellos every process computes the same
//! [`Agreed`] start: the first epoch (after everything any process's checkpoint or sink share
//! holds) and the incarnation of the epochs (process 0's, so `as_of` and `min_epoch` mean the
//! same in every process). Processes that cannot agree (another hostfile, another checkpoint)
//! refuse to start, each saying why.

use serde::{Deserialize, Serialize};
use spendflow_operators::Epoch;
use spendflow_operators::runtime::{self, Connected};

use super::ClusterSpec;
use crate::EngineError;

/// What a process tells the others at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Hello {
    /// The binary's version: processes of one cluster run the same one.
    version: String,
    /// The hostfile as this process read it.
    hostfile: Vec<(String, String)>,
    /// The epoch of the checkpoint it restored, if any.
    restored: Option<Epoch>,
    /// The first epoch it would start at on its own.
    first_epoch: Epoch,
    /// The incarnation it would use on its own.
    incarnation: String,
}

/// How every process of the cluster starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Agreed {
    /// The first epoch of this run, the same in every process.
    pub first_epoch: Epoch,
    /// The incarnation of this run's epochs, the same in every process.
    pub incarnation: String,
}

/// Connects to every other process of `spec` (each running `workers` workers), waiting at most
/// `spec.wait`, and agrees on the start. `restored`, `first_epoch` and `incarnation` are what
/// this process found on its own.
///
/// # Errors
///
/// [`EngineError::Cluster`]: a peer did not come in time, or the processes disagree.
pub(crate) fn join(
    spec: &ClusterSpec,
    workers: usize,
    restored: Option<Epoch>,
    first_epoch: Epoch,
    incarnation: &str,
) -> Result<(Connected, Agreed), EngineError> {
    let hello = Hello {
        version: env!("CARGO_PKG_VERSION").to_string(),
        hostfile: spec
            .processes
            .iter()
            .map(|p| (p.timely.clone(), p.grpc.clone()))
            .collect(),
        restored,
        first_epoch,
        incarnation: incarnation.to_string(),
    };
    let bytes = serde_json::to_vec(&hello).expect("a hello serializes");
    let addresses: Vec<String> = spec.processes.iter().map(|p| p.timely.clone()).collect();
    tracing::info!(
        process = spec.process,
        processes = spec.processes.len(),
        listen = %spec.me().timely,
        wait_secs = spec.wait.as_secs(),
        "Joining the cluster."
    );
    let connected = runtime::connect(&addresses, spec.process, workers, &bytes, spec.wait)
        .map_err(|e| EngineError::Cluster {
            retriable: matches!(e, runtime::ConnectError::Timeout { .. }),
            message: e.to_string(),
        })?;
    let mut hellos = Vec::with_capacity(connected.processes());
    for (p, bytes) in connected.hellos().iter().enumerate() {
        let theirs: Hello = serde_json::from_slice(bytes).map_err(|e| EngineError::Cluster {
            message: format!(
                "process {p} sent an unreadable hello ({e}): is it the same spendflow version?"
            ),
            retriable: false,
        })?;
        hellos.push(theirs);
    }
    let agreed = agree(&hellos, spec.process)?;
    tracing::info!(
        first_epoch = agreed.first_epoch,
        incarnation = %agreed.incarnation,
        "Every process of the cluster joined."
    );
    Ok((connected, agreed))
}

/// The start every process computes alike from all hellos, or why they cannot start together.
fn agree(hellos: &[Hello], me: usize) -> Result<Agreed, EngineError> {
    let refuse = |message: String| EngineError::Cluster {
        message,
        retriable: false,
    };
    let ours = &hellos[me];
    for (p, theirs) in hellos.iter().enumerate() {
        if theirs.version != ours.version {
            return Err(refuse(format!(
                "process {p} runs spendflow {}, this process {}: every process of a cluster runs the same version",
                theirs.version, ours.version
            )));
        }
        if theirs.hostfile != ours.hostfile {
            return Err(refuse(format!(
                "process {p} was started with another cluster file: every process must get the same file"
            )));
        }
        if theirs.restored != ours.restored {
            return Err(refuse(format!(
                "process {p} restored the checkpoint of epoch {}, this process that of epoch {}: every process must use the same --checkpoint-dir (a directory all of them read: shared, or hdfs://), or none",
                describe(theirs.restored),
                describe(ours.restored)
            )));
        }
    }
    Ok(Agreed {
        first_epoch: hellos.iter().map(|h| h.first_epoch).max().unwrap_or(1),
        incarnation: hellos[0].incarnation.clone(),
    })
}

fn describe(epoch: Option<Epoch>) -> String {
    epoch.map_or_else(|| "none".to_string(), |e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(restored: Option<Epoch>, first_epoch: Epoch, incarnation: &str) -> Hello {
        Hello {
            version: "1".into(),
            hostfile: vec![("a:1".into(), "a:2".into()), ("b:1".into(), "b:2".into())],
            restored,
            first_epoch,
            incarnation: incarnation.into(),
        }
    }

    #[test]
    fn the_first_epoch_is_the_latest_and_the_incarnation_process_zeros() {
        let hellos = [hello(Some(7), 8, "zero"), hello(Some(7), 11, "one")];
        for me in 0..2 {
            assert_eq!(
                agree(&hellos, me).unwrap(),
                Agreed {
                    first_epoch: 11,
                    incarnation: "zero".into()
                }
            );
        }
    }

    #[test]
    fn other_checkpoints_or_hostfiles_are_refused_with_what_to_do() {
        let err = agree(&[hello(Some(7), 8, "a"), hello(None, 1, "b")], 1).unwrap_err();
        assert!(err.to_string().contains("--checkpoint-dir"), "{err}");
        let mut other = hello(None, 1, "b");
        other.hostfile.pop();
        let err = agree(&[hello(None, 1, "a"), other], 0).unwrap_err();
        assert!(err.to_string().contains("same file"), "{err}");
    }
}
