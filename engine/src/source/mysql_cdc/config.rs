use serde::Deserialize;

/// The replica server id the reader uses when none is configured. A binlog reader registers
/// with the server like a replica, and its id must differ from the server's own (the services
/// kit's MariaDB is `--server-id=1`) and from every other replica's.
pub const DEFAULT_SERVER_ID: u32 = 4_170_001;

/// Settings of the MySQL/MariaDB CDC source.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlCdcSourceConfig {
    /// `mysql://user:password@host:port/database`: the database whose `users` and `fx_rates`
    /// are read (default `spendflow`). The user needs `SELECT` on it and `REPLICATION SLAVE,
    /// REPLICATION CLIENT` on the server.
    pub url: String,
    /// The replica server id this reader registers with; unique among the server's replicas
    /// and different from the server's own `server_id`.
    #[serde(default = "default_server_id")]
    pub server_id: u32,
}

fn default_server_id() -> u32 {
    DEFAULT_SERVER_ID
}

impl MysqlCdcSourceConfig {
    /// Settings for `url` with the default server id.
    pub fn new(url: impl Into<String>) -> Self {
        MysqlCdcSourceConfig {
            url: url.into(),
            server_id: DEFAULT_SERVER_ID,
        }
    }
}
