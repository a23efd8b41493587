//! The Cassandra tables: the one place their CQL lives.
//!
//! Every table is keyed by `user_id` (the partition key), so one user's aggregates are one
//! partition per table and a sink batch per user and table is a single-partition batch.
//!
//! | table | primary key | columns |
//! |---|---|---|
//! | `user_totals` | `user_id` | `total_minor`, `expense_count`, `last_event_ms` (null when unknown), `epoch` |
//! | `user_category_totals` | `(user_id, category)` | `total_minor`, `expense_count`, `epoch` |
//! | `user_merchant_totals` | `(user_id, merchant)` | `total_minor`, `expense_count`, `epoch` |
//! | `user_daily_totals` | `(user_id, day)` (`YYYY-MM-DD`, UTC) | `total_minor`, `expense_count`, `epoch` |
//! | `user_monthly_totals` | `(user_id, month)` (`YYYY-MM`, UTC) | `total_minor`, `expense_count`, `epoch` |
//! | `sink_progress` | `((sink), epoch)`, newest first | `positions` (JSON), `records_covered`, `committed`, `committed_at`; static `generation`, `owner` |
//!
//! Values are absolute (never counters): a row says what the aggregate *is* as of `epoch`, so
//! writing it twice is harmless. A cell whose last live expense went away is deleted. Money is
//! `bigint` minor units.
//!
//! `sink_progress` has one row per written epoch. A row exists (with `committed = false`)
//! before any result of its epoch is written, and says which input positions the epoch covers,
//! so a restarted engine can replay exactly the same epochs; `committed = true` once every
//! write of the epoch is acknowledged. The newest committed row is the `as_of` of what the
//! tables show. The static `generation` column fences engines: each start claims the next
//! generation with a lightweight transaction, and progress is only ever committed `IF
//! generation = <ours>`.
//!
//! The static `ts_lease` bounds the write timestamps (µs since the Unix epoch) the holding
//! generation may use; see `sink.rs` for how it keeps a replaced engine's writes below the
//! next one's.

use crate::error::InvalidSetting;

/// Day and month keys are text: `YYYY-MM-DD` and `YYYY-MM` sort like the dates they name.
pub const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {ks}.user_totals (
        user_id bigint PRIMARY KEY,
        total_minor bigint,
        expense_count bigint,
        last_event_ms bigint,
        epoch bigint)",
    "CREATE TABLE IF NOT EXISTS {ks}.user_category_totals (
        user_id bigint,
        category text,
        total_minor bigint,
        expense_count bigint,
        epoch bigint,
        PRIMARY KEY (user_id, category))",
    "CREATE TABLE IF NOT EXISTS {ks}.user_merchant_totals (
        user_id bigint,
        merchant text,
        total_minor bigint,
        expense_count bigint,
        epoch bigint,
        PRIMARY KEY (user_id, merchant))",
    "CREATE TABLE IF NOT EXISTS {ks}.user_daily_totals (
        user_id bigint,
        day text,
        total_minor bigint,
        expense_count bigint,
        epoch bigint,
        PRIMARY KEY (user_id, day))",
    "CREATE TABLE IF NOT EXISTS {ks}.user_monthly_totals (
        user_id bigint,
        month text,
        total_minor bigint,
        expense_count bigint,
        epoch bigint,
        PRIMARY KEY (user_id, month))",
    "CREATE TABLE IF NOT EXISTS {ks}.sink_progress (
        sink text,
        epoch bigint,
        generation bigint static,
        owner text static,
        ts_lease bigint static,
        positions text,
        records_covered bigint,
        committed boolean,
        committed_at timestamp,
        PRIMARY KEY ((sink), epoch))
        WITH CLUSTERING ORDER BY (epoch DESC)",
];

/// The `sink` value of the engine's progress rows (one engine writes a keyspace).
pub const SINK_NAME: &str = "main";

/// `CREATE KEYSPACE` with the given replication map, e.g.
/// `{'class': 'SimpleStrategy', 'replication_factor': 1}`.
pub fn create_keyspace(keyspace: &str, replication: &str) -> String {
    format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}")
}

/// Columns added after a table's first version: `ALTER TABLE` statements for keyspaces
/// created before them (an error saying the column exists is expected and ignored).
pub fn add_columns(keyspace: &str) -> Vec<String> {
    vec![format!(
        "ALTER TABLE {keyspace}.sink_progress ADD ts_lease bigint static"
    )]
}

/// The `CREATE TABLE` statements for `keyspace`.
pub fn create_tables(keyspace: &str) -> Vec<String> {
    TABLES.iter().map(|t| t.replace("{ks}", keyspace)).collect()
}

/// Checks a keyspace name: CQL identifiers are letters, digits and `_`, at most 48 long, not
/// starting with a digit (unquoted names are folded to lower case, so we ask for lower case).
pub fn validate_keyspace(keyspace: &str) -> Result<(), InvalidSetting> {
    let ok = !keyspace.is_empty()
        && keyspace.len() <= 48
        && !keyspace.starts_with(|c: char| c.is_ascii_digit())
        && keyspace
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "keyspace {keyspace:?} is not a valid name: use 1 to 48 lower-case letters, digits or '_', not starting with a digit"
        ).into())
    }
}
