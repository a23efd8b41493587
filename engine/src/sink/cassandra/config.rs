//! Settings of the Cassandra sink.

use crate::cassandra::CassandraClientSecurity;
use crate::error::InvalidSetting;
use serde::Deserialize;

use crate::cassandra::schema::{Replication, validate_keyspace};

/// Where and how results are written to Cassandra.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CassandraSinkConfig {
    /// Contact points, `HOST:PORT[,HOST:PORT...]`.
    pub contact_points: String,
    /// The keyspace; created with `replication` if missing, tables created if missing.
    #[serde(default = "default_keyspace")]
    pub keyspace: String,
    /// The replication map used when the keyspace is created.
    #[serde(default = "default_replication")]
    pub replication: String,
    /// Batches in flight at once (each batch is one user's changed rows).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Statements per batch at most (a user with more changed rows gets several batches;
    /// Cassandra warns above 5 KiB per batch and fails above 50 KiB by default).
    #[serde(default = "default_batch_statements")]
    pub batch_statements: usize,
    /// Distinct cells merged into the waiting group at most while the sink is busy, before
    /// the publisher (and so the read model) waits for Cassandra; see
    /// [`Sink::max_group_cells`](crate::sink::Sink::max_group_cells).
    #[serde(default = "default_max_group_cells")]
    pub max_group_cells: usize,
    /// Credentials and TLS for reaching Cassandra (`[sink.client_security]`).
    #[serde(default)]
    pub client_security: CassandraClientSecurity,
}

/// `spendflow`, as in the architecture.
pub fn default_keyspace() -> String {
    "spendflow".to_string()
}

/// One replica: right for the single-node kit; production clusters pass their own map.
pub fn default_replication() -> String {
    "{'class': 'SimpleStrategy', 'replication_factor': 1}".to_string()
}

const fn default_concurrency() -> usize {
    32
}

const fn default_batch_statements() -> usize {
    40
}

const fn default_max_group_cells() -> usize {
    crate::sink::DEFAULT_MAX_GROUP_CELLS
}

impl CassandraSinkConfig {
    /// Settings with defaults for everything but the address.
    pub fn new(contact_points: impl Into<String>) -> Self {
        CassandraSinkConfig {
            contact_points: contact_points.into(),
            keyspace: default_keyspace(),
            replication: default_replication(),
            concurrency: default_concurrency(),
            batch_statements: default_batch_statements(),
            max_group_cells: default_max_group_cells(),
            client_security: CassandraClientSecurity::default(),
        }
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// A message naming the setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        validate_keyspace(&self.keyspace)?;
        if self.contact_points.trim().is_empty() {
            return Err("cassandra contact_points is empty: use HOST:PORT".into());
        }
        if !(1..=1024).contains(&self.concurrency) {
            return Err(format!(
                "cassandra concurrency must be 1 to 1024, got {}",
                self.concurrency
            )
            .into());
        }
        if !(1..=1000).contains(&self.batch_statements) {
            return Err(format!(
                "cassandra batch_statements must be 1 to 1000, got {}",
                self.batch_statements
            )
            .into());
        }
        if self.max_group_cells == 0 {
            return Err("cassandra max_group_cells must be at least 1".into());
        }
        Replication::parse(&self.replication)?;
        Ok(())
    }
}
