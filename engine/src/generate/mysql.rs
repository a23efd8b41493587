//! The MySQL side of `spendflow generate` (and the connection helpers `spendflow verify` uses):
//! database creation, the schema and its migrations, the batch transaction and the outbox.
//!
//! # Schema (migration 1)
//!
//! | table | key | what |
//! |---|---|---|
//! | `users` | `user_id` | name, email, country, currency, `monthly_budget_minor` (calibrated to the run's spending, see [`super::budgets`]), `image_ref` (NULL until an image is uploaded) |
//! | `cards` | `card_id` | the owning `user_id` |
//! | `merchants` | `name` | its `category` |
//! | `fx_rates` (migration 2) | `currency` | `rate_micros`: EUR micro-units per unit, one row per currency the simulator uses ([`FX_RATES`]) |
//! | `expenses` | `expense_id` | one row per **live** expense: user, card, merchant, category, `amount_minor`, currency, `event_ms` (exact, ms since the epoch) and `event_time` (`DATETIME(3)`, UTC, the same instant for SQL) |
//! | `outbox` | `seq` | messages committed but not yet acknowledged by Kafka: topic, key, payload |
//! | `generator_state` | `id = 1` | the run's fingerprint, records generated so far, whether users/cards/merchants are written |
//! | `schema_migrations` | `version` | applied migrations |
//!
//! Identifiers and names the engine groups by (`expense_id`, `card_id`, `merchant`,
//! `category`) are `VARBINARY`: compared byte for byte, exactly as the engine compares them (a
//! `VARCHAR` collation would fold case or ignore trailing spaces, and `GROUP BY category` in
//! `spendflow verify` would then merge groups the engine keeps apart). Display text (`name`,
//! `email`) is `utf8mb4`. Money is `BIGINT` minor units.
//!
//! The outbox replaces the "published flag" of a first sketch: deletes, duplicates and
//! malformed records must be published too but have no `expenses` row to carry a flag, and a
//! flag cannot say in which order rows were produced. See the parent module for the protocol.
//!
//! Migrations are `CREATE TABLE IF NOT EXISTS` statements recorded in `schema_migrations`, so
//! running them again, or against a database another generator created, is harmless.

use ::mysql::prelude::Queryable;
use ::mysql::{Conn, Params, TxOpts, Value};
use spendflow_operators::model::{Expense, MS_PER_DAY, civil_from_days};

use super::budgets::Budgets;
use super::{Batch, GenerateError, OutboxRow, ReferenceUpdate, RunState, Store};
use crate::source::generator::Simulator;

pub use crate::mysql_client::DEFAULT_DATABASE;

/// Rows per multi-row `INSERT` (well below the 65 535 placeholders of a prepared statement).
const ROWS_PER_STATEMENT: usize = 500;

/// One schema migration: a version and the statements that bring the schema to it.
#[derive(Debug)]
pub struct Migration {
    /// The version it brings the schema to (1, 2, ...).
    pub version: u32,
    /// What it does, stored in `schema_migrations`.
    pub description: &'static str,
    /// Idempotent DDL statements, applied in order.
    pub statements: &'static [&'static str],
}

/// Creates the migrations table (before any migration can be recorded).
pub const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version INT UNSIGNED NOT NULL PRIMARY KEY,
    description VARCHAR(255) NOT NULL,
    applied_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "users, cards, merchants, expenses, outbox, generator_state",
        statements: &[
            "CREATE TABLE IF NOT EXISTS users (
            user_id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
            name VARCHAR(128) NOT NULL,
            email VARCHAR(255) NOT NULL,
            country CHAR(2) NOT NULL,
            currency CHAR(3) NOT NULL,
            monthly_budget_minor BIGINT NOT NULL,
            image_ref VARCHAR(512) NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
            "CREATE TABLE IF NOT EXISTS cards (
            card_id VARBINARY(128) NOT NULL PRIMARY KEY,
            user_id BIGINT UNSIGNED NOT NULL,
            KEY cards_by_user (user_id)
        ) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS merchants (
            name VARBINARY(256) NOT NULL PRIMARY KEY,
            category VARBINARY(256) NOT NULL
        ) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS expenses (
            expense_id VARBINARY(128) NOT NULL PRIMARY KEY,
            user_id BIGINT UNSIGNED NOT NULL,
            card_id VARBINARY(128) NULL,
            merchant VARBINARY(256) NOT NULL,
            category VARBINARY(256) NOT NULL,
            amount_minor BIGINT NOT NULL,
            currency CHAR(3) CHARACTER SET ascii NOT NULL,
            event_ms BIGINT NOT NULL,
            event_time DATETIME(3) NOT NULL,
            KEY expenses_by_user (user_id)
        ) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS outbox (
            seq BIGINT UNSIGNED NOT NULL PRIMARY KEY,
            topic VARCHAR(255) CHARACTER SET ascii NOT NULL,
            msg_key VARBINARY(64) NULL,
            payload MEDIUMBLOB NOT NULL
        ) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS generator_state (
            id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            records BIGINT UNSIGNED NOT NULL,
            reference_done BOOLEAN NOT NULL,
            updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        ],
    },
    Migration {
        version: 2,
        description: "fx_rates",
        statements: &["CREATE TABLE IF NOT EXISTS fx_rates (
        currency CHAR(3) CHARACTER SET ascii NOT NULL PRIMARY KEY,
        rate_micros BIGINT NOT NULL
    ) ENGINE=InnoDB"],
    },
];

/// The exchange rates `generate` writes to `fx_rates`, for every currency the simulator uses:
/// reporting-currency (EUR) micro-units per unit of the currency, applied to minor units as
/// they are (see `spendflow_operators::reference`). They match the simulator's own conversion
/// of euro amounts (for the yen, one minor unit is one yen: 0.625 euro cents).
pub const FX_RATES: &[(&str, i64)] = &[
    ("EUR", 1_000_000),
    ("USD", 925_926),
    ("GBP", 1_176_471),
    ("CHF", 1_052_632),
    ("SEK", 86_957),
    ("PLN", 232_558),
    ("JPY", 625_000),
    ("CAD", 675_676),
    ("AUD", 606_061),
];

pub use crate::mysql_client::{connect, database_of, is_retriable, validate_database_name};

/// Applies every migration newer than the database's version, in order.
///
/// # Errors
///
/// [`GenerateError::MySql`] if a statement fails (the user needs CREATE and INSERT on the
/// database).
pub fn migrate(conn: &mut Conn) -> Result<u32, GenerateError> {
    conn.query_drop(MIGRATIONS_TABLE)
        .map_err(GenerateError::mysql("create schema_migrations"))?;
    let current: Option<u32> = conn
        .query_first("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        .map_err(GenerateError::mysql("read the schema version"))?;
    let current = current.unwrap_or(0);
    let mut version = current;
    for migration in pending_migrations(current) {
        for statement in migration.statements {
            conn.query_drop(statement)
                .map_err(GenerateError::mysql(format!(
                    "migration {}",
                    migration.version
                )))?;
        }
        conn.exec_drop(
            "INSERT IGNORE INTO schema_migrations (version, description) VALUES (?, ?)",
            (migration.version, migration.description),
        )
        .map_err(GenerateError::mysql("record a migration"))?;
        version = migration.version;
    }
    Ok(version)
}

/// The migrations a database at `version` still needs, in order.
pub fn pending_migrations(version: u32) -> impl Iterator<Item = &'static Migration> {
    MIGRATIONS.iter().filter(move |m| m.version > version)
}

/// `(?, ?, ...), (?, ?, ...)`: `rows` groups of `cols` placeholders.
pub fn placeholders(rows: usize, cols: usize) -> String {
    let group = format!("({})", vec!["?"; cols].join(", "));
    vec![group; rows].join(", ")
}

/// The multi-row upsert of `rows` expenses.
pub fn upsert_expenses_sql(rows: usize) -> String {
    format!(
        "INSERT INTO expenses (expense_id, user_id, card_id, merchant, category, amount_minor, \
         currency, event_ms, event_time) VALUES {} ON DUPLICATE KEY UPDATE \
         user_id = VALUES(user_id), card_id = VALUES(card_id), merchant = VALUES(merchant), \
         category = VALUES(category), amount_minor = VALUES(amount_minor), \
         currency = VALUES(currency), event_ms = VALUES(event_ms), event_time = VALUES(event_time)",
        placeholders(rows, 9)
    )
}

/// The delete of `rows` expenses by id.
pub fn delete_expenses_sql(rows: usize) -> String {
    format!(
        "DELETE FROM expenses WHERE expense_id IN ({})",
        vec!["?"; rows].join(", ")
    )
}

/// The insert of `rows` outbox messages.
pub fn insert_outbox_sql(rows: usize) -> String {
    format!(
        "INSERT INTO outbox (seq, topic, msg_key, payload) VALUES {}",
        placeholders(rows, 4)
    )
}

/// An instant as a MySQL `DATETIME(3)` value, UTC.
pub fn datetime_value(event_ms: i64) -> Value {
    let day = event_ms.div_euclid(MS_PER_DAY);
    let ms_of_day = event_ms.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_days(day as i32);
    Value::Date(
        y.clamp(0, 9999) as u16,
        m as u8,
        d as u8,
        (ms_of_day / 3_600_000) as u8,
        (ms_of_day / 60_000 % 60) as u8,
        (ms_of_day / 1000 % 60) as u8,
        (ms_of_day % 1000) as u32 * 1000,
    )
}

/// Writes the buffered `users` and `cards` rows (6 and 2 values per row).
fn flush_reference(
    conn: &mut Conn,
    user_rows: &mut Vec<Value>,
    card_rows: &mut Vec<Value>,
) -> Result<(), GenerateError> {
    if !user_rows.is_empty() {
        let sql = format!(
            "INSERT INTO users (user_id, name, email, country, currency, monthly_budget_minor) \
             VALUES {} ON DUPLICATE KEY UPDATE name = VALUES(name), email = VALUES(email), \
             country = VALUES(country), currency = VALUES(currency), \
             monthly_budget_minor = VALUES(monthly_budget_minor)",
            placeholders(user_rows.len() / 6, 6)
        );
        conn.exec_drop(sql, Params::Positional(std::mem::take(user_rows)))
            .map_err(GenerateError::mysql("write users"))?;
    }
    if !card_rows.is_empty() {
        let sql = format!(
            "INSERT INTO cards (card_id, user_id) VALUES {} \
             ON DUPLICATE KEY UPDATE user_id = VALUES(user_id)",
            placeholders(card_rows.len() / 2, 2)
        );
        conn.exec_drop(sql, Params::Positional(std::mem::take(card_rows)))
            .map_err(GenerateError::mysql("write cards"))?;
    }
    Ok(())
}

fn expense_values(e: &Expense, out: &mut Vec<Value>) {
    out.push(Value::Bytes(e.expense_id.as_bytes().to_vec()));
    out.push(Value::UInt(e.user_id));
    out.push(match &e.card_id {
        Some(card) => Value::Bytes(card.as_bytes().to_vec()),
        None => Value::NULL,
    });
    out.push(Value::Bytes(e.merchant.as_bytes().to_vec()));
    out.push(Value::Bytes(e.category.as_bytes().to_vec()));
    out.push(Value::Int(e.amount_minor));
    out.push(Value::Bytes(e.currency.to_vec()));
    out.push(Value::Int(e.event_ms));
    out.push(datetime_value(e.event_ms));
}

/// The generator's MySQL store: one connection holding the database's generator lock.
pub struct MySqlStore {
    conn: Conn,
    database: String,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl MySqlStore {
    /// Connects (creating the database if missing), takes the generator lock and migrates the
    /// schema.
    ///
    /// # Errors
    ///
    /// [`GenerateError::MySql`] for connection or DDL failures, [`GenerateError::Busy`] if
    /// another generator holds the lock.
    pub fn open(url: &str) -> Result<Self, GenerateError> {
        let (mut conn, database) = connect(url, true)?;
        // Released when the connection closes, also when the process is killed.
        let locked: Option<Option<i64>> = conn
            .exec_first(
                "SELECT GET_LOCK(CONCAT('spendflow.generate.', DATABASE()), 0)",
                (),
            )
            .map_err(GenerateError::mysql("take the generator lock"))?;
        if locked.flatten() != Some(1) {
            return Err(GenerateError::Busy(database));
        }
        migrate(&mut conn)?;
        Ok(MySqlStore { conn, database })
    }

    fn exec(tx: &mut impl Queryable, sql: String, values: Vec<Value>) -> Result<(), GenerateError> {
        tx.exec_drop(sql, Params::Positional(values))
            .map_err(GenerateError::mysql("write a batch"))
    }
}

impl Store for MySqlStore {
    fn database(&self) -> &str {
        &self.database
    }

    fn begin_run(&mut self, fingerprint: &str) -> Result<RunState, GenerateError> {
        let row: Option<(String, u64, bool)> = self
            .conn
            .query_first(
                "SELECT fingerprint, records, reference_done FROM generator_state WHERE id = 1",
            )
            .map_err(GenerateError::mysql("read generator_state"))?;
        match row {
            Some((stored, records, reference_done)) if stored == fingerprint => Ok(RunState {
                records,
                reference_done,
            }),
            Some((stored, _, _)) => Err(GenerateError::OtherRun {
                database: self.database.clone(),
                stored,
                wanted: fingerprint.to_string(),
            }),
            None => {
                self.conn
                    .exec_drop(
                        "INSERT INTO generator_state (id, fingerprint, records, reference_done) \
                         VALUES (1, ?, 0, FALSE)",
                        (fingerprint,),
                    )
                    .map_err(GenerateError::mysql("create generator_state"))?;
                Ok(RunState::default())
            }
        }
    }

    fn write_reference(
        &mut self,
        simulator: &Simulator,
        budgets: &Budgets,
    ) -> Result<(), GenerateError> {
        let users = simulator.config().users;
        let mut user_rows = Vec::new();
        let mut card_rows = Vec::new();
        for user_id in 1..=users {
            let Some(user) = simulator.user(user_id) else {
                continue;
            };
            user_rows.extend([
                Value::UInt(user.user_id),
                Value::from(user.name),
                Value::from(user.email),
                Value::from(user.country),
                Value::from(user.currency),
                Value::Int(budgets.of(user_id, user.monthly_budget_minor)),
            ]);
            for card in user.cards {
                card_rows.extend([Value::Bytes(card.into_bytes()), Value::UInt(user_id)]);
            }
            if user_rows.len() / 6 >= ROWS_PER_STATEMENT || card_rows.len() / 2 >= 1000 {
                flush_reference(&mut self.conn, &mut user_rows, &mut card_rows)?;
            }
        }
        flush_reference(&mut self.conn, &mut user_rows, &mut card_rows)?;
        let rates: Vec<Value> = FX_RATES
            .iter()
            .flat_map(|(code, rate)| [Value::from(*code), Value::Int(*rate)])
            .collect();
        self.conn
            .exec_drop(
                format!(
                    "INSERT INTO fx_rates (currency, rate_micros) VALUES {} \
                     ON DUPLICATE KEY UPDATE rate_micros = VALUES(rate_micros)",
                    placeholders(FX_RATES.len(), 2)
                ),
                Params::Positional(rates),
            )
            .map_err(GenerateError::mysql("write fx_rates"))?;
        for chunk in simulator.merchants().chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO merchants (name, category) VALUES {} \
                 ON DUPLICATE KEY UPDATE category = VALUES(category)",
                placeholders(chunk.len(), 2)
            );
            let values: Vec<Value> = chunk
                .iter()
                .flat_map(|m| {
                    [
                        Value::Bytes(m.name.as_bytes().to_vec()),
                        Value::Bytes(m.category.as_str().as_bytes().to_vec()),
                    ]
                })
                .collect();
            self.conn
                .exec_drop(sql, Params::Positional(values))
                .map_err(GenerateError::mysql("write merchants"))?;
        }
        self.conn
            .query_drop("UPDATE generator_state SET reference_done = TRUE WHERE id = 1")
            .map_err(GenerateError::mysql("update generator_state"))
    }

    fn pending_outbox(&mut self) -> Result<Vec<OutboxRow>, GenerateError> {
        let rows: Vec<(u64, String, Option<Vec<u8>>, Vec<u8>)> = self
            .conn
            .query("SELECT seq, topic, msg_key, payload FROM outbox ORDER BY seq")
            .map_err(GenerateError::mysql("read the outbox"))?;
        Ok(rows
            .into_iter()
            .map(|(seq, topic, key, payload)| OutboxRow {
                seq,
                topic,
                key: key.unwrap_or_default(),
                payload,
            })
            .collect())
    }

    fn commit_batch(
        &mut self,
        batch: &Batch,
        records: u64,
        published_below: Option<u64>,
    ) -> Result<(), GenerateError> {
        let mut tx = self
            .conn
            .start_transaction(TxOpts::default())
            .map_err(GenerateError::mysql("begin a batch"))?;
        if let Some(below) = published_below {
            tx.exec_drop("DELETE FROM outbox WHERE seq < ?", (below,))
                .map_err(GenerateError::mysql("delete published outbox rows"))?;
        }
        let upserts: Vec<&Expense> = batch.upserts().collect();
        for chunk in upserts.chunks(ROWS_PER_STATEMENT) {
            let mut values = Vec::with_capacity(chunk.len() * 9);
            for e in chunk {
                expense_values(e, &mut values);
            }
            Self::exec(&mut tx, upsert_expenses_sql(chunk.len()), values)?;
        }
        let deletes: Vec<&str> = batch.deletes().collect();
        for chunk in deletes.chunks(ROWS_PER_STATEMENT) {
            let values = chunk
                .iter()
                .map(|id| Value::Bytes(id.as_bytes().to_vec()))
                .collect();
            Self::exec(&mut tx, delete_expenses_sql(chunk.len()), values)?;
        }
        for chunk in batch.outbox().chunks(ROWS_PER_STATEMENT) {
            let mut values = Vec::with_capacity(chunk.len() * 4);
            for row in chunk {
                values.extend([
                    Value::UInt(row.seq),
                    Value::from(row.topic.as_str()),
                    Value::Bytes(row.key.clone()),
                    Value::Bytes(row.payload.clone()),
                ]);
            }
            Self::exec(&mut tx, insert_outbox_sql(chunk.len()), values)?;
        }
        for update in batch.reference_updates() {
            match update {
                ReferenceUpdate::Budget {
                    user_id,
                    budget_minor,
                } => tx.exec_drop(
                    "UPDATE users SET monthly_budget_minor = ? WHERE user_id = ?",
                    (budget_minor, user_id),
                ),
                ReferenceUpdate::Rate {
                    currency,
                    rate_micros,
                } => tx.exec_drop(
                    "INSERT INTO fx_rates (currency, rate_micros) VALUES (?, ?) \
                     ON DUPLICATE KEY UPDATE rate_micros = VALUES(rate_micros)",
                    (currency, rate_micros),
                ),
            }
            .map_err(GenerateError::mysql("change a budget or rate"))?;
        }
        tx.exec_drop(
            "UPDATE generator_state SET records = ?, updated_at = CURRENT_TIMESTAMP(3) WHERE id = 1",
            (records,),
        )
        .map_err(GenerateError::mysql("advance generator_state"))?;
        tx.commit().map_err(GenerateError::mysql("commit a batch"))
    }

    fn delete_published(&mut self, below: u64) -> Result<(), GenerateError> {
        self.conn
            .exec_drop("DELETE FROM outbox WHERE seq < ?", (below,))
            .map_err(GenerateError::mysql("delete published outbox rows"))
    }
}
