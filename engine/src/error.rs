//! Errors of the engine library.
//!
//! Each error says whether trying again can help ([`EngineError::is_retriable`]): a broker that
//! is restarting is retriable, a file that does not exist is not. Binaries wrap these in
//! `anyhow` at the top; the library never does.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong starting or running the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration is invalid; the message says which setting and why.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The gRPC server could not start or failed.
    #[error("gRPC server on {addr}: {message}")]
    Serve {
        /// The address it was to listen on.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// The web report could not start.
    #[error("web server on {addr}: {message}")]
    Web {
        /// The address it was to listen on.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// Checkpoints could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The durable sink could not start or failed for good.
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    /// The alerts topic could not be opened.
    #[error(transparent)]
    Alerts(#[from] crate::sink::alerts::AlertsError),
    /// The dataflow workers failed (a worker thread panicked or could not start).
    #[error("dataflow workers failed: {0}")]
    Workers(String),
    /// The processes of a cluster could not be joined, or do not agree on how to start.
    #[error("cluster: {message}")]
    Cluster {
        /// What went wrong and what to do.
        message: String,
        /// True if starting again may succeed (a peer that was not up yet).
        retriable: bool,
    },
    /// The engine was already shut down.
    #[error("the engine has shut down")]
    ShutDown,
}

impl EngineError {
    /// True if the same operation may succeed later without a change of configuration.
    pub fn is_retriable(&self) -> bool {
        match self {
            EngineError::Source(e) => e.is_retriable(),
            EngineError::Checkpoint(e) => e.is_retriable(),
            EngineError::Sink(e) => e.is_retriable(),
            EngineError::Alerts(e) => e.is_retriable(),
            EngineError::Serve { .. } | EngineError::Web { .. } => true,
            EngineError::Cluster { retriable, .. } => *retriable,
            EngineError::Config(_) | EngineError::Workers(_) | EngineError::ShutDown => false,
        }
    }
}

/// A source could not produce records.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The generator's configuration is invalid.
    #[error("generator: {0}")]
    Generator(String),
    /// Kafka failed; `retriable` says whether trying again can help (a broker restarting) or
    /// not (an invalid setting).
    #[error("kafka: {message}")]
    Kafka {
        /// What failed and why.
        message: String,
        /// Whether a retry may succeed.
        retriable: bool,
    },
    /// MySQL or MariaDB (the CDC source) failed; `retriable` says whether trying again can help
    /// (a dropped connection) or not (the binlog is off, a position's file was purged).
    #[error("mysql: {message}")]
    Mysql {
        /// What failed, why, and what to do about it.
        message: String,
        /// Whether a retry may succeed.
        retriable: bool,
    },
    /// The in-process input was closed by every handle.
    #[error("the in-process input is closed")]
    InputClosed,
}

impl SourceError {
    /// True if reading again later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            SourceError::File { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            SourceError::Kafka { retriable, .. } | SourceError::Mysql { retriable, .. } => {
                *retriable
            }
            SourceError::Generator(_) | SourceError::InputClosed => false,
        }
    }
}

/// A setting that is not allowed; the message names the setting and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSetting(pub String);

impl From<String> for InvalidSetting {
    fn from(message: String) -> Self {
        InvalidSetting(message)
    }
}

impl From<&str> for InvalidSetting {
    fn from(message: &str) -> Self {
        InvalidSetting(message.to_string())
    }
}

impl From<InvalidSetting> for EngineError {
    fn from(e: InvalidSetting) -> Self {
        EngineError::Config(e.0)
    }
}
