//! The [`UserDirectory`] over MySQL: the `users` and `cards` tables `spendflow generate`
//! creates (see `generate::mysql`). `users.image_ref` holds the user's [`ImageRef`] as
//! JSON, NULL when the user has no picture.
//!
//! The `mysql` crate is blocking, so every query runs on tokio's blocking pool
//! (`spawn_blocking`) with a connection from a small pool.

use std::collections::HashSet;

use ::mysql::prelude::Queryable;
use ::mysql::{Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, PooledConn, TxOpts};

use super::{MaskedCard, PersonnelError, UserDetails, UserDirectory};
use crate::images::ImageRef;
use crate::mysql_client::{database_of, is_retriable};

/// Connections kept at most.
const MAX_CONNECTIONS: usize = 8;

/// Users and cards in MySQL.
#[derive(Clone)]
pub struct MySqlDirectory {
    pool: Pool,
    database: String,
}

impl std::fmt::Debug for MySqlDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlDirectory")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

fn unavailable(context: &str) -> impl FnOnce(::mysql::Error) -> PersonnelError + '_ {
    move |e| PersonnelError::Unavailable {
        service: "MySQL".into(),
        message: format!("{context}: {e}"),
        retriable: is_retriable(&e),
    }
}

impl MySqlDirectory {
    /// Connects to the URL's database (default `spendflow`) and checks that it has the
    /// `users` table. Blocking.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::Invalid`] for a bad URL; [`PersonnelError::Unavailable`] if the server
    /// cannot be reached, or the database or its `users` table is missing.
    pub fn connect(url: &str) -> Result<MySqlDirectory, PersonnelError> {
        let (opts, database) = database_of(url).map_err(|e| PersonnelError::Invalid {
            message: e.to_string(),
        })?;
        let constraints = PoolConstraints::new(0, MAX_CONNECTIONS).unwrap_or_default();
        let opts: Opts = OptsBuilder::from_opts(opts)
            .db_name(Some(database.clone()))
            .pool_opts(PoolOpts::default().with_constraints(constraints))
            .into();
        let pool = Pool::new(opts).map_err(unavailable("connect"))?;
        let directory = MySqlDirectory { pool, database };
        let mut conn = directory.conn()?;
        conn.query_drop("SELECT user_id, image_ref FROM users LIMIT 1")
            .map_err(|e| PersonnelError::Unavailable {
                service: "MySQL".into(),
                message: format!(
                    "database `{}` has no usable `users` table ({e}); create it with \
                     `spendflow generate --mysql URL ...`",
                    directory.database
                ),
                retriable: false,
            })?;
        Ok(directory)
    }

    /// The database name.
    pub fn database(&self) -> &str {
        &self.database
    }

    fn conn(&self) -> Result<PooledConn, PersonnelError> {
        self.pool.get_conn().map_err(unavailable("connect"))
    }

    /// Runs `f` with a connection on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, PersonnelError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PooledConn) -> Result<T, PersonnelError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = this.conn()?;
            f(&mut conn)
        })
        .await
        .map_err(|e| PersonnelError::Unavailable {
            service: "MySQL".into(),
            message: format!("the query task failed: {e}"),
            retriable: false,
        })?
    }
}

fn parse_ref(user_id: u64, text: Option<String>) -> Result<Option<ImageRef>, PersonnelError> {
    match text {
        None => Ok(None),
        Some(t) if t.trim().is_empty() => Ok(None),
        Some(t) => ImageRef::from_json(&t)
            .map(Some)
            .map_err(|e| PersonnelError::Corrupt(format!("user {user_id}: {e}"))),
    }
}

type UserRow = (String, String, String, String, i64, Option<String>);

#[async_trait::async_trait]
impl UserDirectory for MySqlDirectory {
    async fn user(&self, user_id: u64) -> Result<Option<UserDetails>, PersonnelError> {
        self.blocking(move |conn| {
            let row: Option<UserRow> = conn
                .exec_first(
                    "SELECT name, email, country, currency, monthly_budget_minor, image_ref \
                     FROM users WHERE user_id = ?",
                    (user_id,),
                )
                .map_err(unavailable("read a user"))?;
            let Some((name, email, country, currency, monthly_budget_minor, image_ref)) = row
            else {
                return Ok(None);
            };
            let cards: Vec<Vec<u8>> = conn
                .exec(
                    "SELECT card_id FROM cards WHERE user_id = ? ORDER BY card_id",
                    (user_id,),
                )
                .map_err(unavailable("read a user's cards"))?;
            Ok(Some(UserDetails {
                user_id,
                name,
                email,
                country,
                currency,
                monthly_budget_minor,
                cards: cards
                    .iter()
                    .map(|c| MaskedCard::from_card_id(&String::from_utf8_lossy(c)))
                    .collect(),
                image: parse_ref(user_id, image_ref)?,
            }))
        })
        .await
    }

    async fn exists(&self, user_id: u64) -> Result<bool, PersonnelError> {
        self.blocking(move |conn| {
            let found: Option<u64> = conn
                .exec_first("SELECT user_id FROM users WHERE user_id = ?", (user_id,))
                .map_err(unavailable("look a user up"))?;
            Ok(found.is_some())
        })
        .await
    }

    async fn set_image(
        &self,
        user_id: u64,
        image: Option<&ImageRef>,
    ) -> Result<Option<ImageRef>, PersonnelError> {
        let json = image.map(ImageRef::to_json);
        self.blocking(move |conn| {
            let mut tx = conn
                .start_transaction(TxOpts::default())
                .map_err(unavailable("begin"))?;
            let row: Option<(u64, Option<String>)> = tx
                .exec_first(
                    "SELECT user_id, image_ref FROM users WHERE user_id = ? FOR UPDATE",
                    (user_id,),
                )
                .map_err(unavailable("read a user's image reference"))?;
            let Some((_, previous)) = row else {
                return Err(PersonnelError::NotFound(format!(
                    "user {user_id} does not exist"
                )));
            };
            tx.exec_drop(
                "UPDATE users SET image_ref = ? WHERE user_id = ?",
                (json, user_id),
            )
            .map_err(unavailable("set a user's image reference"))?;
            tx.commit().map_err(unavailable("commit"))?;
            // An unreadable old reference must not block replacing it.
            Ok(parse_ref(user_id, previous).unwrap_or(None))
        })
        .await
    }

    async fn referenced_images(&self) -> Result<HashSet<String>, PersonnelError> {
        self.blocking(move |conn| {
            let rows: Vec<(u64, String)> = conn
                .query("SELECT user_id, image_ref FROM users WHERE image_ref IS NOT NULL")
                .map_err(unavailable("read image references"))?;
            let mut out = HashSet::with_capacity(rows.len());
            for (user_id, text) in rows {
                match ImageRef::from_json(&text) {
                    Ok(r) => {
                        out.insert(r.sha256);
                    }
                    Err(e) => {
                        // Refuse to collect garbage with an unreadable reference: its blob may be
                        // the one it names.
                        return Err(PersonnelError::Corrupt(format!(
                            "user {user_id}: {e}; fix or clear it before collecting garbage"
                        )));
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}
