//! The Cassandra client every Cassandra user in the engine shares: connecting
//! ([`session`]), the tables and what their rows promise ([`schema`]), how cells map to row
//! keys ([`keys`]), reading the tables as of a committed epoch ([`reader`]), and errors with a
//! retriable/fatal distinction. The sink (`sink::cassandra`), `serve --from cassandra` and
//! `verify --cassandra` are built on it; none of them imports another.

pub mod keys;
pub mod reader;
pub mod schema;
pub mod session;

pub use reader::TableReader;
pub use session::{CassandraClientSecurity, CqlSession, connect, connect_with};

/// What can go wrong talking to Cassandra.
#[derive(Debug, thiserror::Error)]
pub enum CassandraError {
    /// A setting is wrong; retrying will not help.
    #[error("Cassandra configuration: {0}")]
    Config(String),
    /// No node could be reached.
    #[error(
        "cannot connect to Cassandra at {contact_points}: {message} (is it running? `docker/native/services up` starts one on 127.0.0.1:9042)"
    )]
    Connect {
        /// The addresses tried.
        contact_points: String,
        /// The driver's message.
        message: String,
    },
    /// A request failed.
    #[error("Cassandra {doing}: {message}")]
    Request {
        /// What was being done.
        doing: String,
        /// The driver's message.
        message: String,
        /// True if the same request may succeed later (timeouts, unavailable nodes).
        retriable: bool,
    },
    /// A total does not fit the tables' `bigint` columns: writing it would need a truncated
    /// value, so the sink stops instead (the engine's own gRPC and web answers keep serving).
    #[error(
        "user {user}'s {cell} totals {sum} minor units, outside the bigint range of the Cassandra tables (keyspace {keyspace}); the sink stops rather than write a wrong value"
    )]
    ValueOutOfRange {
        /// The keyspace.
        keyspace: String,
        /// The user.
        user: u64,
        /// Which cell: `user total`, `category "fuel"`, ...
        cell: String,
        /// The exact total.
        sum: i128,
    },
    /// Another engine claimed this keyspace's sink (or our share of it) after us: we must stop
    /// writing.
    #[error(
        "another engine (generation {theirs}) took over the sink {sink:?} of keyspace {keyspace}; this one (generation {ours}) stops writing"
    )]
    Fenced {
        /// The keyspace.
        keyspace: String,
        /// The progress partition: `main` for a single engine, `main/<p>-of-<n>` for a share.
        sink: String,
        /// Our generation.
        ours: i64,
        /// The generation that holds the sink now.
        theirs: i64,
    },
    /// A newer layout (a cluster of another size, or a single engine) took the keyspace's sink
    /// over after this engine registered its own: this engine must stop writing.
    #[error(
        "a newer layout of the sink of keyspace {keyspace} (layout generation {theirs}) took over {sink:?}; this engine (layout generation {ours}) stops writing (start it again with the current hostfile)"
    )]
    Superseded {
        /// The keyspace.
        keyspace: String,
        /// The progress partition found taken over.
        sink: String,
        /// The layout generation this engine registered under.
        ours: i64,
        /// The layout generation that holds the partition now.
        theirs: i64,
    },
}

impl CassandraError {
    /// Names the keyspace in an error that did not know it.
    pub fn in_keyspace(self, ks: &str) -> Self {
        match self {
            CassandraError::ValueOutOfRange {
                user, cell, sum, ..
            } => CassandraError::ValueOutOfRange {
                keyspace: ks.to_string(),
                user,
                cell,
                sum,
            },
            other => other,
        }
    }

    /// True if retrying the same operation later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            CassandraError::Connect { .. } => true,
            CassandraError::Request { retriable, .. } => *retriable,
            CassandraError::Config(_)
            | CassandraError::Fenced { .. }
            | CassandraError::Superseded { .. }
            | CassandraError::ValueOutOfRange { .. } => false,
        }
    }

    /// Wraps a driver error; server-side syntax/schema/auth errors are fatal, the rest
    /// (I/O, timeouts, overload, unavailable) retriable.
    pub fn request(doing: impl Into<String>, error: cdrs_tokio::error::Error) -> Self {
        use cdrs_tokio::frame::message_error::ErrorType;
        let retriable = match &error {
            cdrs_tokio::error::Error::Server { body, .. } => !matches!(
                body.ty,
                ErrorType::Syntax
                    | ErrorType::Invalid
                    | ErrorType::Unauthorized
                    | ErrorType::Config
                    | ErrorType::AlreadyExists(_)
                    | ErrorType::Authentication
                    | ErrorType::Protocol
            ),
            _ => true,
        };
        CassandraError::Request {
            doing: doing.into(),
            message: error.to_string(),
            retriable,
        }
    }
}
