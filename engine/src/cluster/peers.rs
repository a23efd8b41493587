//! What a process does when a peer is lost.
//!
//! Timely cannot continue a computation without one of its processes: the network threads
//! panic (`timely communication error: ...`, a prefix timely keeps stable for hooks like this
//! one) and the workers panic on their next exchange (`MergeQueue poisoned`). The gRPC server,
//! the publisher and the sink would keep this process alive, serving answers that no longer
//! advance; instead it says which peer it lost, stops serving (the engine fails, which turns the
//! health service to NOT_SERVING) and exits non-zero, so a supervisor restarts the whole
//! cluster, which resumes from the newest complete checkpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::ClusterSpec;
use crate::pipeline::Shared;

/// The exit status of a process that lost a peer.
pub const LOST_PEER_EXIT: i32 = 3;

/// How long a process that lost a peer keeps answering NOT_SERVING before it exits.
const GRACE: Duration = Duration::from_millis(500);

/// Installs the panic hook that turns the loss of a peer into a prompt exit (see the module
/// docs). Other panics go to the hook that was there before.
pub(crate) fn exit_when_a_peer_is_lost(shared: Arc<Shared>, spec: Arc<ClusterSpec>) {
    static LOST: AtomicBool = AtomicBool::new(false);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if LOST.load(Ordering::Acquire) {
            // The workers and network threads fall one after the other once a peer is lost;
            // the first panic said why.
            return;
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("").to_string();
        let Some(peer) = lost_peer(&message, &thread) else {
            return previous(info);
        };
        if LOST.swap(true, Ordering::AcqRel) {
            return;
        }
        let who = match peer {
            Some(p) => format!(
                "process {p} ({})",
                spec.processes.get(p).map_or("?", |a| a.timely.as_str())
            ),
            None => "a peer process".to_string(),
        };
        tracing::error!(
            peer = ?peer,
            error = %message,
            "Lost peer {who}: the cluster cannot continue without it. This process stops serving and exits with status {LOST_PEER_EXIT}; restart every process of the cluster (they resume from the newest complete checkpoint)."
        );
        shared.fail(format!("lost peer {who}: {message}"));
        let _ = std::thread::Builder::new()
            .name("spendflow-lost-peer".into())
            .spawn(|| {
                std::thread::sleep(GRACE);
                std::process::exit(LOST_PEER_EXIT);
            });
    }));
}

/// `Some(peer)` if a panic with `message` on `thread` means a peer was lost (`Some(None)`
/// when it does not say which).
fn lost_peer(message: &str, thread: &str) -> Option<Option<usize>> {
    let from_thread = thread
        .strip_prefix("timely:recv-")
        .or_else(|| thread.strip_prefix("timely:send-"))
        .and_then(|n| n.parse::<usize>().ok());
    if message.starts_with("timely communication error:") {
        return Some(from_thread);
    }
    if message.contains("MergeQueue poisoned") {
        return Some(None);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::lost_peer;

    #[test]
    fn timely_communication_panics_name_the_peer() {
        assert_eq!(
            lost_peer(
                "timely communication error: reading data: socket closed",
                "timely:recv-2"
            ),
            Some(Some(2))
        );
        assert_eq!(
            lost_peer("MergeQueue poisoned.", "spendflow-workers"),
            Some(None)
        );
        assert_eq!(lost_peer("index out of bounds", "timely:recv-2"), None);
    }
}
