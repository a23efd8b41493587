//! Cluster mode: one dataflow across several `spendflow` processes (`--cluster FILE
//! --process I`).
//!
//! Timely dataflow does the distribution: worker threads of every process form one
//! computation, worker indices are global (process `p` of `n`, `w` workers each, hosts workers
//! `p*w .. (p+1)*w`), and data is exchanged by user between processes over TCP. This module
//! holds what spendflow adds around it:
//!
//! - [`ClusterSpec`]: the hostfile, one line per process, `TIMELY_ADDR GRPC_ADDR`;
//! - [`Topology`]: who this process is, and which process owns a user (for forwarding
//!   queries), derived alike in every process;
//! - [`Share`]: this process's share of checkpoints and of the durable sink.

use std::fmt;
use std::path::Path;

use spendflow_operators::UserId;

/// One process of the cluster, as the hostfile lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessAddrs {
    /// `host:port` timely listens on and its peers connect to.
    pub timely: String,
    /// `host:port` of its gRPC service (peers forward queries there).
    pub grpc: String,
}

/// The hostfile and this process's place in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Every process, in process order (line order in the file).
    pub processes: Vec<ProcessAddrs>,
    /// This process's index into `processes`.
    pub process: usize,
    /// How long to wait at start for the other processes to join (`--cluster-wait`).
    pub wait: std::time::Duration,
}

/// The default of [`ClusterSpec::wait`].
pub const DEFAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A hostfile that cannot be used, or a process index outside it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The file could not be read.
    #[error("cluster file {path}: {message}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// A line is not `TIMELY_ADDR GRPC_ADDR`.
    #[error(
        "cluster file line {line}: {message} (each line is `TIMELY_ADDR GRPC_ADDR`, e.g. `10.0.0.1:2101 10.0.0.1:50051`; `#` starts a comment)"
    )]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The file lists no process.
    #[error("cluster file lists no process (each line is `TIMELY_ADDR GRPC_ADDR`)")]
    Empty,
    /// `--process` is not an index into the file.
    #[error("--process {process} is out of range: the cluster file lists {processes} processes (0..={})", processes - 1)]
    ProcessOutOfRange {
        /// The index given.
        process: usize,
        /// How many the file lists.
        processes: usize,
    },
    /// Two processes share an address.
    #[error("cluster file lists {addr} twice (lines {first} and {second})")]
    Duplicate {
        /// The address.
        addr: String,
        /// 1-based line of the first use.
        first: usize,
        /// 1-based line of the second.
        second: usize,
    },
}

impl ClusterSpec {
    /// Reads the hostfile at `path` for process `process`.
    ///
    /// # Errors
    ///
    /// See [`ClusterError`].
    pub fn read(path: &Path, process: usize) -> Result<Self, ClusterError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClusterError::Unreadable {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, process)
    }

    /// Parses a hostfile's text for process `process`.
    ///
    /// # Errors
    ///
    /// See [`ClusterError`].
    pub fn parse(text: &str, process: usize) -> Result<Self, ClusterError> {
        let mut processes = Vec::new();
        let mut seen: Vec<(String, usize)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [timely, grpc] = fields[..] else {
                return Err(ClusterError::BadLine {
                    line,
                    message: format!("expected 2 addresses, found {}", fields.len()),
                });
            };
            for addr in [timely, grpc] {
                check_addr(addr).map_err(|message| ClusterError::BadLine { line, message })?;
                if let Some((_, first)) = seen.iter().find(|(a, _)| a == addr) {
                    return Err(ClusterError::Duplicate {
                        addr: addr.to_string(),
                        first: *first,
                        second: line,
                    });
                }
                seen.push((addr.to_string(), line));
            }
            processes.push(ProcessAddrs {
                timely: timely.to_string(),
                grpc: grpc.to_string(),
            });
        }
        if processes.is_empty() {
            return Err(ClusterError::Empty);
        }
        if process >= processes.len() {
            return Err(ClusterError::ProcessOutOfRange {
                process,
                processes: processes.len(),
            });
        }
        Ok(ClusterSpec {
            processes,
            process,
            wait: DEFAULT_WAIT,
        })
    }

    /// This process's addresses.
    pub fn me(&self) -> &ProcessAddrs {
        &self.processes[self.process]
    }

    /// This process's share (of checkpoints and of the durable sink).
    pub fn share(&self) -> Share {
        Share {
            process: self.process,
            processes: self.processes.len(),
        }
    }
}

/// `host:port` with a port number; the host is resolved when connecting.
fn check_addr(addr: &str) -> Result<(), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("`{addr}` has no port (expected host:port)"));
    };
    if host.is_empty() {
        return Err(format!("`{addr}` has no host"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("`{addr}`: `{port}` is not a port number"))?;
    Ok(())
}

/// One process's share of what every process writes (checkpoints, the durable sink): process
/// `process` of `processes`. A single engine is share 0 of 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Share {
    /// This process's index.
    pub process: usize,
    /// How many processes write shares.
    pub processes: usize,
}

impl Default for Share {
    fn default() -> Self {
        Share::SINGLE
    }
}

impl Share {
    /// A single engine: share 0 of 1.
    pub const SINGLE: Share = Share {
        process: 0,
        processes: 1,
    };

    /// True for a single engine.
    pub fn is_single(self) -> bool {
        self.processes == 1
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-of-{}", self.process, self.processes)
    }
}

/// Who is who in a running computation: the same in every process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// This process's index.
    pub process: usize,
    /// How many processes.
    pub processes: usize,
    /// Workers per process (`-w`; the same in every process).
    pub workers_per_process: usize,
}

impl Topology {
    /// A single process with `workers` workers.
    pub fn single(workers: usize) -> Self {
        Topology {
            process: 0,
            processes: 1,
            workers_per_process: workers.max(1),
        }
    }

    /// Workers of all processes.
    pub fn peers(&self) -> usize {
        self.processes * self.workers_per_process
    }

    /// The global index of this process's local worker `local`.
    pub fn global_worker(&self, local: usize) -> usize {
        self.process * self.workers_per_process + local
    }

    /// The index among this process's workers of global worker `global` (one of this
    /// process's).
    pub fn local_worker(&self, global: usize) -> usize {
        global - self.process * self.workers_per_process
    }

    /// The process hosting global worker `worker`.
    pub fn process_of_worker(&self, worker: usize) -> usize {
        worker / self.workers_per_process
    }

    /// The process whose read model holds `user` (the owner of its cells, alerts and
    /// last-seen times in the dataflow).
    pub fn owner_process(&self, user: UserId) -> usize {
        self.process_of_worker(spendflow_operators::owner_worker(user, self.peers()))
    }

    /// This process's share.
    pub fn share(&self) -> Share {
        Share {
            process: self.process,
            processes: self.processes,
        }
    }
}

mod join;
mod peers;
pub(crate) use join::{Agreed, join};
pub use peers::LOST_PEER_EXIT;
pub(crate) use peers::exit_when_a_peer_is_lost;

#[cfg(test)]
mod tests;
