//! The MySQL client the engine's MySQL users share (`generate` writes the database,
//! `verify` reads it as the truth, Personnel reads users from it): which database a URL names,
//! connecting (creating the database on request), and which driver errors are worth a retry.

use ::mysql::prelude::Queryable;
use ::mysql::{Conn, Opts, OptsBuilder};

/// The database used when the URL names none.
pub const DEFAULT_DATABASE: &str = "spendflow";

/// What can go wrong reaching MySQL.
#[derive(Debug, thiserror::Error)]
pub enum MySqlError {
    /// The URL or the database name is invalid; the message says how to fix it.
    #[error("invalid settings: {0}")]
    Config(String),
    /// A MySQL operation failed.
    #[error("MySQL: {context}: {source}")]
    Driver {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: ::mysql::Error,
    },
}

impl MySqlError {
    /// Wraps a driver error with what was being done.
    pub fn driver(context: impl Into<String>) -> impl FnOnce(::mysql::Error) -> MySqlError {
        let context = context.into();
        move |source| MySqlError::Driver { context, source }
    }

    /// True if trying again later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            MySqlError::Config(_) => false,
            MySqlError::Driver { source, .. } => is_retriable(source),
        }
    }
}

/// The database a URL names, or [`DEFAULT_DATABASE`].
///
/// # Errors
///
/// [`MySqlError::Config`] for a URL the driver cannot parse or a database name that is not
/// a plain identifier (letters, digits, `_`, `$`; at most 64 characters).
pub fn database_of(url: &str) -> Result<(Opts, String), MySqlError> {
    let opts = Opts::from_url(url).map_err(|e| {
        MySqlError::Config(format!(
            "--mysql must be a URL like mysql://user:password@host:3306/spendflow: {e}"
        ))
    })?;
    let database = opts
        .get_db_name()
        .filter(|d| !d.is_empty())
        .unwrap_or(DEFAULT_DATABASE)
        .to_string();
    validate_database_name(&database)?;
    Ok((opts, database))
}

/// Checks that `name` can be used unquoted-safe inside backticks.
///
/// # Errors
///
/// [`MySqlError::Config`] naming what is wrong.
pub fn validate_database_name(name: &str) -> Result<(), MySqlError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$');
    if ok {
        Ok(())
    } else {
        Err(MySqlError::Config(format!(
            "the MySQL database name must be 1 to 64 ASCII letters, digits, '_' or '$', got {name:?}"
        )))
    }
}

/// Connects to the URL's database, creating it first if `create` is set and it is missing.
///
/// # Errors
///
/// [`MySqlError::MySql`] if the server cannot be reached, the credentials are refused, or
/// the database is missing (and not to be created) or cannot be created.
pub fn connect(url: &str, create: bool) -> Result<(Conn, String), MySqlError> {
    let (opts, database) = database_of(url)?;
    let with_db = OptsBuilder::from_opts(opts.clone()).db_name(Some(database.clone()));
    match Conn::new(with_db.clone()) {
        Ok(conn) => Ok((conn, database)),
        // 1049: unknown database.
        Err(::mysql::Error::MySqlError(e)) if e.code == 1049 && create => {
            let mut server = Conn::new(OptsBuilder::from_opts(opts).db_name(None::<String>))
                .map_err(MySqlError::driver("connect"))?;
            server
                .query_drop(format!(
                    "CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4"
                ))
                .map_err(MySqlError::driver(format!(
                    "create database `{database}` (the user needs the CREATE privilege, or \
                     create it yourself)"
                )))?;
            drop(server);
            let conn = Conn::new(with_db)
                .map_err(MySqlError::driver(format!("connect to `{database}`")))?;
            Ok((conn, database))
        }
        Err(e) => Err(MySqlError::driver(format!("connect to `{database}`"))(e)),
    }
}

/// Whether a MySQL error may go away on retry: a lost connection, a deadlock, a lock timeout,
/// a server shutting down or out of connections.
pub fn is_retriable(error: &::mysql::Error) -> bool {
    match error {
        ::mysql::Error::MySqlError(e) => matches!(e.code, 1040 | 1053 | 1205 | 1213 | 2006 | 2013),
        ::mysql::Error::IoError(_) | ::mysql::Error::CodecError(_) => true,
        other => other.is_connectivity_error(),
    }
}
