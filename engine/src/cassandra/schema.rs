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
//! | `sink_progress` | `((sink), epoch)`, newest first | `positions` (JSON), `records_covered`, `committed`, `committed_at`; static `generation`, `owner`, `ts_lease`, `layout_generation`, `processes`, `shares` |
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
//!
//! # Shares (cluster mode)
//!
//! In a cluster every process writes the users it owns, and each process's *share* has a
//! progress partition of its own ([`share_partition`]): `sink = 'main'` for a single engine
//! (share 0 of 1, as before clusters, so an existing keyspace keeps its progress) and
//! `sink = 'main/<p>-of-<n>'` for process `p` of `n`. Each share claims, fences and commits
//! in its own partition, exactly as a single engine does in `main`.
//!
//! The partition `sink = 'main/layout'` ([`LAYOUT_PARTITION`], static columns only) is the
//! layout registry: `processes` is the newest layout (how many shares), `generation` the
//! *layout generation* (one more at every change of layout), and `shares` every progress
//! partition any layout registered (so a later layout knows whom to fence). Each share
//! partition's static `layout_generation` is the layout generation of whoever claimed or
//! fenced it last; a claim or fence made under an older layout generation than that is
//! refused (the engine stops, fenced). See `sink::cassandra::claim` for the protocol.
//!
//! **What is committed** in the keyspace (what readers report): the registry's layout names
//! the shares; the committed epoch is the *minimum* of the newest committed epochs of those
//! shares (nothing, while one of them has committed nothing). A keyspace without a registry
//! (written before clusters), or whose layout is one process, is read from `main` alone.

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
        layout_generation bigint static,
        processes int static,
        shares set<text> static,
        positions text,
        records_covered bigint,
        committed boolean,
        committed_at timestamp,
        PRIMARY KEY ((sink), epoch))
        WITH CLUSTERING ORDER BY (epoch DESC)",
];

/// The `sink` value of a single engine's progress rows (share 0 of 1); a cluster's shares
/// use [`share_partition`].
pub const SINK_NAME: &str = "main";

/// The `sink` value of the layout registry's partition (static columns only): its
/// `generation` is the layout generation, `processes` the newest layout, `shares` every
/// progress partition any layout registered.
pub const LAYOUT_PARTITION: &str = "main/layout";

/// The `sink` value (progress partition) of a share: [`SINK_NAME`] for a single engine (so a
/// keyspace written before clusters keeps its progress), `main/<p>-of-<n>` for process `p` of
/// a cluster of `n`.
pub fn share_partition(share: crate::cluster::Share) -> String {
    if share.is_single() {
        SINK_NAME.to_string()
    } else {
        format!("{SINK_NAME}/{share}")
    }
}

/// The progress partitions of every share of a layout of `processes` processes, in process
/// order.
pub fn layout_partitions(processes: usize) -> Vec<String> {
    (0..processes.max(1))
        .map(|process| {
            share_partition(crate::cluster::Share {
                process,
                processes: processes.max(1),
            })
        })
        .collect()
}

/// `CREATE KEYSPACE` with the given replication map, e.g.
/// `{'class': 'SimpleStrategy', 'replication_factor': 1}`. The name and the map are checked
/// ([`validate_keyspace`], [`Replication::parse`]) and the map is written back from what was
/// parsed, so nothing but a replication map reaches CQL.
///
/// # Errors
///
/// A message naming what is wrong with the name or the map.
pub fn create_keyspace(keyspace: &str, replication: &str) -> Result<String, InvalidSetting> {
    validate_keyspace(keyspace)?;
    let replication = Replication::parse(replication)?;
    Ok(format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {}",
        replication.cql()
    ))
}

/// Replicas of one datacenter at most (a larger factor is a typo, not a cluster).
pub const MAX_REPLICATION_FACTOR: u32 = 32;

/// A keyspace's replication, as the sink's `replication` setting gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replication {
    /// `{'class': 'SimpleStrategy', 'replication_factor': N}`.
    Simple {
        /// Replicas in the cluster (1 to [`MAX_REPLICATION_FACTOR`]).
        factor: u32,
    },
    /// `{'class': 'NetworkTopologyStrategy', 'DC': N, ...}`: replicas per datacenter, and
    /// optionally a `replication_factor` for the datacenters not named.
    NetworkTopology {
        /// The default for datacenters not named, if given.
        default: Option<u32>,
        /// `(datacenter, replicas)`, in the order given.
        datacenters: Vec<(String, u32)>,
    },
}

impl Replication {
    /// Parses a CQL replication map: `{'class': 'SimpleStrategy', 'replication_factor': 3}`
    /// or `{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}` (factors as numbers or
    /// quoted numbers; the classes also by their full `org.apache.cassandra.locator.` names).
    /// Datacenter names are letters, digits, `_`, `-` and `.`, at most 64 long.
    ///
    /// # Errors
    ///
    /// A message saying what is wrong and what is allowed.
    pub fn parse(text: &str) -> Result<Replication, InvalidSetting> {
        let bad = |why: &str| {
            InvalidSetting(format!(
                "cassandra replication {text:?} is not valid: {why}; use a map like \
                 {{'class': 'SimpleStrategy', 'replication_factor': 1}} or \
                 {{'class': 'NetworkTopologyStrategy', 'dc1': 3}}"
            ))
        };
        let entries = parse_map(text).map_err(|why| bad(&why))?;
        let mut class = None;
        let mut factor = None;
        let mut datacenters: Vec<(String, u32)> = Vec::new();
        for (i, (key, value)) in entries.iter().enumerate() {
            if entries[..i].iter().any(|(k, _)| k == key) {
                return Err(bad(&format!("'{key}' is given twice")));
            }
            match key.as_str() {
                "class" => class = Some(value.as_str()),
                "replication_factor" => factor = Some(replicas(key, value).map_err(|w| bad(&w))?),
                dc => {
                    let valid = !dc.is_empty()
                        && dc.len() <= 64
                        && dc
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
                    if !valid {
                        return Err(bad(&format!(
                            "'{dc}' is not a datacenter name (letters, digits, '_', '-', '.', \
                             at most 64)"
                        )));
                    }
                    datacenters.push((dc.to_string(), replicas(dc, value).map_err(|w| bad(&w))?));
                }
            }
        }
        let class = class.ok_or_else(|| bad("'class' is missing"))?;
        let class = class
            .strip_prefix("org.apache.cassandra.locator.")
            .unwrap_or(class);
        match class {
            "SimpleStrategy" => {
                if let Some((dc, _)) = datacenters.first() {
                    return Err(bad(&format!(
                        "SimpleStrategy takes only 'replication_factor', not '{dc}'"
                    )));
                }
                let factor =
                    factor.ok_or_else(|| bad("SimpleStrategy needs 'replication_factor'"))?;
                if factor == 0 {
                    return Err(bad("'replication_factor' must be at least 1"));
                }
                Ok(Replication::Simple { factor })
            }
            "NetworkTopologyStrategy" => {
                if factor.is_none() && datacenters.iter().all(|(_, n)| *n == 0) {
                    return Err(bad(
                        "NetworkTopologyStrategy needs at least one datacenter with a replica",
                    ));
                }
                Ok(Replication::NetworkTopology {
                    default: factor,
                    datacenters,
                })
            }
            other => Err(bad(&format!(
                "class '{other}' is not SimpleStrategy or NetworkTopologyStrategy"
            ))),
        }
    }

    /// The map as CQL.
    pub fn cql(&self) -> String {
        match self {
            Replication::Simple { factor } => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {factor}}}")
            }
            Replication::NetworkTopology {
                default,
                datacenters,
            } => {
                let mut out = String::from("{'class': 'NetworkTopologyStrategy'");
                if let Some(factor) = default {
                    out.push_str(&format!(", 'replication_factor': {factor}"));
                }
                for (dc, n) in datacenters {
                    out.push_str(&format!(", '{dc}': {n}"));
                }
                out.push('}');
                out
            }
        }
    }
}

/// A replica count: 0 to [`MAX_REPLICATION_FACTOR`].
fn replicas(key: &str, value: &str) -> Result<u32, String> {
    value
        .parse::<u32>()
        .ok()
        .filter(|n| *n <= MAX_REPLICATION_FACTOR && !value.starts_with('+'))
        .ok_or_else(|| {
            format!(
                "'{key}' must be a number of replicas, 0 to {MAX_REPLICATION_FACTOR}, got {value:?}"
            )
        })
}

/// `{'key': value, ...}` with quoted keys and quoted or bare values (no quotes inside
/// quotes, nothing after the closing brace).
fn parse_map(text: &str) -> Result<Vec<(String, String)>, String> {
    let body = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or("it must be one map in braces")?;
    let mut entries = Vec::new();
    let mut rest = body.trim();
    if rest.is_empty() {
        return Err("the map is empty".to_string());
    }
    loop {
        let (key, after) = quoted(rest).ok_or("keys must be quoted like 'class'")?;
        let after = after
            .trim_start()
            .strip_prefix(':')
            .ok_or_else(|| format!("':' expected after '{key}'"))?
            .trim_start();
        let (value, after) = match quoted(after) {
            Some(quoted) => quoted,
            None => {
                let end = after
                    .find(|c: char| !c.is_ascii_alphanumeric())
                    .unwrap_or(after.len());
                if end == 0 {
                    return Err(format!("'{key}' has no value"));
                }
                (&after[..end], &after[end..])
            }
        };
        entries.push((key.to_string(), value.to_string()));
        let after = after.trim_start();
        if after.is_empty() {
            return Ok(entries);
        }
        rest = after
            .strip_prefix(',')
            .ok_or_else(|| format!("',' or '}}' expected after '{key}'"))?
            .trim_start();
    }
}

/// A single-quoted word at the start of `text` (letters, digits, `_`, `-`, `.`) and the rest.
fn quoted(text: &str) -> Option<(&str, &str)> {
    let inner = text.strip_prefix('\'')?;
    let end = inner.find('\'')?;
    let word = &inner[..end];
    word.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .then_some((word, &inner[end + 1..]))
}

/// Columns added after a table's first version: `ALTER TABLE` statements for keyspaces
/// created before them (an error saying the column exists is expected and ignored).
pub fn add_columns(keyspace: &str) -> Vec<String> {
    [
        "ts_lease bigint static",
        "layout_generation bigint static",
        "processes int static",
        "shares set<text> static",
    ]
    .iter()
    .map(|column| format!("ALTER TABLE {keyspace}.sink_progress ADD {column}"))
    .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_engine_keeps_its_partition_and_shares_get_their_own() {
        use crate::cluster::Share;
        assert_eq!(share_partition(Share::SINGLE), "main");
        assert_eq!(
            share_partition(Share {
                process: 1,
                processes: 3
            }),
            "main/1-of-3"
        );
        assert_eq!(layout_partitions(1), vec!["main".to_string()]);
        assert_eq!(
            layout_partitions(2),
            vec!["main/0-of-2".to_string(), "main/1-of-2".to_string()]
        );
        assert!(!layout_partitions(3).contains(&LAYOUT_PARTITION.to_string()));
    }

    #[test]
    fn known_strategies_are_accepted_and_written_back_canonically() {
        let simple = Replication::parse("{'class': 'SimpleStrategy', 'replication_factor': 1}");
        assert_eq!(simple, Ok(Replication::Simple { factor: 1 }));
        let quoted = Replication::parse(
            " { 'class' : 'org.apache.cassandra.locator.SimpleStrategy','replication_factor':'3' } ",
        )
        .unwrap();
        assert_eq!(
            quoted.cql(),
            "{'class': 'SimpleStrategy', 'replication_factor': 3}"
        );
        let nts = Replication::parse(
            "{'class': 'NetworkTopologyStrategy', 'eu-west.1': 3, 'dc_2': 0, 'us1': 2}",
        )
        .unwrap();
        assert_eq!(
            nts.cql(),
            "{'class': 'NetworkTopologyStrategy', 'eu-west.1': 3, 'dc_2': 0, 'us1': 2}"
        );
        let default =
            Replication::parse("{'class': 'NetworkTopologyStrategy', 'replication_factor': 2}")
                .unwrap();
        assert_eq!(
            default.cql(),
            "{'class': 'NetworkTopologyStrategy', 'replication_factor': 2}"
        );
        assert_eq!(
            create_keyspace(
                "ks_1",
                "{'class': 'SimpleStrategy', 'replication_factor': 1}"
            )
            .unwrap(),
            "CREATE KEYSPACE IF NOT EXISTS ks_1 WITH replication = \
             {'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
    }

    #[test]
    fn anything_else_is_a_config_error_naming_the_problem() {
        let cases = [
            (
                "{'class': 'SimpleStrategy', 'replication_factor': 1}; DROP KEYSPACE x",
                "one map",
            ),
            (
                "{'class': 'SimpleStrategy', 'replication_factor': 1}; DROP KEYSPACE x; {'a': 1}",
                "not valid",
            ),
            (
                "{'class': 'SimpleStrategy', 'replication_factor': '1'}'}; DROP TABLE t; --'}",
                "not valid",
            ),
            (
                "{'class': 'SimpleStrategy', 'replication_factor': 1 AND durable_writes = false}",
                "expected",
            ),
            (
                "{'class': 'Simple\\'Strategy', 'replication_factor': 1}",
                "not valid",
            ),
            ("{'class': 'LocalStrategy'}", "class 'LocalStrategy'"),
            ("{'class': 'EverywhereStrategy'}", "not SimpleStrategy"),
            ("{'replication_factor': 1}", "'class' is missing"),
            ("{'class': 'SimpleStrategy'}", "needs 'replication_factor'"),
            (
                "{'class': 'SimpleStrategy', 'replication_factor': 0}",
                "at least 1",
            ),
            (
                "{'class': 'SimpleStrategy', 'replication_factor': 1000}",
                "0 to 32",
            ),
            (
                "{'class': 'SimpleStrategy', 'replication_factor': -1}",
                "no value",
            ),
            (
                "{'class': 'SimpleStrategy', 'replication_factor': 1, 'dc1': 1}",
                "only 'replication_factor'",
            ),
            (
                "{'class': 'NetworkTopologyStrategy', 'dc 1': 3}",
                "keys must be quoted",
            ),
            (
                "{'class': 'NetworkTopologyStrategy', 'dc1': 0}",
                "at least one datacenter",
            ),
            (
                "{'class': 'NetworkTopologyStrategy', 'dc1': 1, 'dc1': 2}",
                "twice",
            ),
            (
                "{'class': 'NetworkTopologyStrategy', 'dc1': three}",
                "number of replicas",
            ),
            ("{}", "empty"),
            ("'class': 'SimpleStrategy'", "one map"),
            ("", "one map"),
        ];
        for (text, expected) in cases {
            let error = Replication::parse(text).expect_err(text).0;
            assert!(error.contains(expected), "{text}: {error}");
            assert!(error.contains("cassandra replication"), "{error}");
            assert!(create_keyspace("ks", text).is_err(), "{text}");
        }
        let error = create_keyspace(
            "ks; DROP KEYSPACE other",
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        )
        .unwrap_err();
        assert!(error.0.contains("not a valid name"), "{error}");
    }
}
