//! Claiming a share of the Cassandra sink: the layout registry, fencing the shares of other
//! layouts, and the timestamp floor (see `cassandra::schema` for the tables).
//!
//! A share (process `p` of a cluster of `n`; a single engine is share 0 of 1, whose progress
//! partition is `main` as before clusters) starts in four steps. Each step is made of
//! lightweight transactions, which are linearizable per partition, and of serial reads:
//!
//! 1. **Register the layout** in the registry partition `main/layout`: if its `processes` is
//!    not `n`, set it to `n`, add this layout's partitions (and `main`) to `shares` and take
//!    the next layout generation, `IF generation = <read> AND processes = <read>`; otherwise
//!    take the current layout generation. Call it `X`.
//! 2. **Fence every partition of other layouts** that `shares` names: `SET generation = g + 1,
//!    layout_generation = X IF generation = g AND ts_lease = L AND layout_generation = y` on
//!    what was read (skipped when `y = X`: a share of this layout generation fenced it
//!    already). From then on whoever held that partition (a zombie of an old layout, say
//!    process 2 of 3 after a rescale to 2) can neither extend its timestamp lease nor commit,
//!    so `L` is final: every write it ever made or will make carries a timestamp at most `L`.
//! 3. **Read the leases of this layout's other shares** (serial reads). A user this share
//!    owns now may have been written by one of them in an earlier period of a layout of the
//!    same size (3 -> 2 -> 3); leases only grow, so their current lease bounds those writes.
//! 4. **Claim its own partition** as a single engine always did: `SET generation = g + 1,
//!    layout_generation = X, ts_lease = F IF generation = g AND ts_lease = L AND
//!    layout_generation = y`, with the floor `F = max(now, L + 1, every lease of steps 2 and 3
//!    + 1)`. A zombie of this share (the process this one replaces) is fenced from here on,
//!    and all its writes are below `F`.
//!
//! A partition whose `layout_generation` is newer than `X` means that a newer layout
//! registered after this one: the start fails with [`CassandraError::Superseded`] (the engine
//! stops, fenced). So when two layouts race (an old cluster restarted by its supervisor while
//! the new one starts), the one that registered last wins whatever order their steps
//! interleave in: it fences every partition of the other (the registry named them when it
//! registered), and the loser is refused at any partition the winner already touched, or
//! fenced later at its next lease extension or commit.
//!
//! A change of workers per process alone (`-w`) keeps the layout (the sink only knows the
//! number of processes), so users move between shares of one layout without a layout change;
//! each process's replacement fences its own share. A zombie may still extend its lease
//! between a sibling's step 3 and its own replacement's claim, so before its first write a
//! share raises its timestamps above its siblings' leases once more (`Connection::
//! above_siblings` in `sink.rs`): by then every process of the cluster has claimed (they open
//! their sinks before they join), so every zombie's lease is final and below those.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use cdrs_tokio::consistency::Consistency;
use cdrs_tokio::query::QueryValues;
use cdrs_tokio::query_values;
use cdrs_tokio::statement::StatementParamsBuilder;
use cdrs_tokio::types::list::List;
use cdrs_tokio::types::rows::Row;
use cdrs_tokio::types::{AsRustType, IntoRustByName};
use spendflow_operators::Epoch;

use super::sink::{PROGRESS_ROWS_KEPT, SinkStart};
use crate::cassandra::schema::{self, LAYOUT_PARTITION, SINK_NAME};
use crate::cassandra::{CassandraError, CqlSession};
use crate::cluster::Share;

/// The static columns of one progress partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Statics {
    generation: Option<i64>,
    ts_lease: Option<i64>,
    layout_generation: Option<i64>,
}

/// What the layout registry holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Registry {
    generation: Option<i64>,
    processes: Option<i32>,
    shares: BTreeSet<String>,
}

/// A CQL literal for a condition on a value read: `null` when there was none.
fn literal<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "null".to_string(), |v| v.to_string())
}

fn decode(doing: &str, e: impl std::fmt::Display) -> CassandraError {
    CassandraError::Request {
        doing: doing.to_string(),
        message: format!("a sink_progress row does not have the expected columns: {e}"),
        retriable: false,
    }
}

/// The rows of `cql` (one bound value: the partition), read with SERIAL consistency, so they
/// show what every lightweight transaction before has decided.
async fn serial_rows(
    session: &CqlSession,
    cql: String,
    partition: &str,
    doing: &str,
) -> Result<Vec<Row>, CassandraError> {
    let params = StatementParamsBuilder::new()
        .with_consistency(Consistency::Serial)
        .with_values(query_values!(partition.to_string()))
        .idempotent(true)
        .build();
    session
        .query_with_params(cql, params)
        .await
        .and_then(|envelope| envelope.response_body())
        .map(|body| body.into_rows().unwrap_or_default())
        .map_err(|e| CassandraError::request(doing, e))
}

/// The static columns of `partition` (all `None` if it has no row).
async fn statics(
    session: &CqlSession,
    ks: &str,
    partition: &str,
) -> Result<Statics, CassandraError> {
    const DOING: &str = "read the sink generation";
    let rows = serial_rows(
        session,
        format!(
            "SELECT generation, ts_lease, layout_generation FROM {ks}.sink_progress \
             WHERE sink = ? LIMIT 1"
        ),
        partition,
        DOING,
    )
    .await?;
    let Some(row) = rows.first() else {
        return Ok(Statics::default());
    };
    let get = |name: &str| -> Result<Option<i64>, CassandraError> {
        row.get_by_name(name).map_err(|e| decode(DOING, e))
    };
    Ok(Statics {
        generation: get("generation")?,
        ts_lease: get("ts_lease")?,
        layout_generation: get("layout_generation")?,
    })
}

async fn registry(session: &CqlSession, ks: &str) -> Result<Registry, CassandraError> {
    const DOING: &str = "read the sink layout";
    let rows = serial_rows(
        session,
        format!(
            "SELECT generation, processes, shares FROM {ks}.sink_progress WHERE sink = ? LIMIT 1"
        ),
        LAYOUT_PARTITION,
        DOING,
    )
    .await?;
    let Some(row) = rows.first() else {
        return Ok(Registry::default());
    };
    let shares: Option<List> = row.get_by_name("shares").map_err(|e| decode(DOING, e))?;
    let shares: Vec<String> = match shares {
        Some(list) => list.as_r_type().map_err(|e| decode(DOING, e))?,
        None => Vec::new(),
    };
    Ok(Registry {
        generation: row
            .get_by_name("generation")
            .map_err(|e| decode(DOING, e))?,
        processes: row.get_by_name("processes").map_err(|e| decode(DOING, e))?,
        shares: shares.into_iter().collect(),
    })
}

/// Whether a lightweight transaction applied, and the generation it saw.
pub(super) fn lwt_result(
    envelope: cdrs_tokio::frame::Envelope,
    doing: &str,
) -> Result<(bool, Option<i64>), CassandraError> {
    let rows = envelope
        .response_body()
        .map_err(|e| CassandraError::request(doing, e))?
        .into_rows()
        .unwrap_or_default();
    let Some(row) = rows.first() else {
        return Ok((false, None));
    };
    let applied: bool = row
        .get_r_by_name("[applied]")
        .map_err(|e| CassandraError::request(doing, e))?;
    let generation: Option<i64> = row.get_by_name("generation").ok().flatten();
    Ok((applied, generation))
}

async fn conditional(
    session: &CqlSession,
    cql: String,
    values: QueryValues,
    doing: &str,
) -> Result<bool, CassandraError> {
    let envelope = session
        .query_with_values(cql, values)
        .await
        .map_err(|e| CassandraError::request(doing, e))?;
    Ok(lwt_result(envelope, doing)?.0)
}

/// Step 1: registers a layout of `processes` shares; returns the layout generation and every
/// partition the registry names (this layout's among them).
async fn register(
    session: &CqlSession,
    ks: &str,
    processes: usize,
    owner: &str,
) -> Result<(i64, BTreeSet<String>), CassandraError> {
    let ours = schema::layout_partitions(processes);
    let processes = i32::try_from(processes)
        .map_err(|_| CassandraError::Config(format!("{processes} processes are too many")))?;
    loop {
        let current = registry(session, ks).await?;
        let same = current.processes == Some(processes);
        if same
            && ours.iter().all(|s| current.shares.contains(s))
            && let Some(generation) = current.generation
        {
            return Ok((generation, current.shares));
        }
        let next = match (same, current.generation) {
            (true, Some(generation)) => generation,
            (_, generation) => generation.unwrap_or(0) + 1,
        };
        let mut shares = current.shares.clone();
        shares.extend(ours.iter().cloned());
        shares.insert(SINK_NAME.to_string());
        let applied = conditional(
            session,
            format!(
                "UPDATE {ks}.sink_progress SET generation = ?, processes = ?, shares = ?, owner = ? \
                 WHERE sink = ? IF generation = {} AND processes = {}",
                literal(current.generation),
                literal(current.processes)
            ),
            query_values!(
                next,
                processes,
                shares.iter().cloned().collect::<Vec<String>>(),
                owner.to_string(),
                LAYOUT_PARTITION.to_string()
            ),
            "register the sink layout",
        )
        .await?;
        if applied {
            if !same {
                tracing::info!(
                    keyspace = ks,
                    processes,
                    layout_generation = next,
                    previous = ?current.processes,
                    "A new layout of the Cassandra sink: the shares of other layouts are fenced."
                );
            }
            return Ok((next, shares));
        }
        // Another share registered in between: read again.
    }
}

fn superseded(ks: &str, partition: &str, ours: i64, theirs: i64) -> CassandraError {
    CassandraError::Superseded {
        keyspace: ks.to_string(),
        sink: partition.to_string(),
        ours,
        theirs,
    }
}

/// Step 2: fences `partition` (a share of another layout) under layout generation `layout`;
/// returns its final lease.
async fn fence(
    session: &CqlSession,
    ks: &str,
    partition: &str,
    layout: i64,
    owner: &str,
) -> Result<Option<i64>, CassandraError> {
    loop {
        let s = statics(session, ks, partition).await?;
        match s.layout_generation {
            Some(theirs) if theirs > layout => {
                return Err(superseded(ks, partition, layout, theirs));
            }
            // Fenced by this layout generation already: nobody holds it since.
            Some(theirs) if theirs == layout => return Ok(s.ts_lease),
            _ => {}
        }
        let applied = conditional(
            session,
            format!(
                "UPDATE {ks}.sink_progress SET generation = ?, layout_generation = ?, owner = ? \
                 WHERE sink = ? IF generation = {} AND ts_lease = {} AND layout_generation = {}",
                literal(s.generation),
                literal(s.ts_lease),
                literal(s.layout_generation)
            ),
            query_values!(
                s.generation.unwrap_or(0) + 1,
                layout,
                format!("fenced by {owner}"),
                partition.to_string()
            ),
            "fence a share of another layout",
        )
        .await?;
        if applied {
            tracing::info!(
                keyspace = ks,
                share = partition,
                final_lease = ?s.ts_lease,
                "Fenced a share of another layout of the Cassandra sink."
            );
            return Ok(s.ts_lease);
        }
    }
}

/// Claims `share` of the sink (the four steps of the module docs) and reads the newest epoch
/// that share committed.
///
/// # Errors
///
/// A failed request; [`CassandraError::Superseded`] if a newer layout took over.
pub(super) async fn claim(
    session: &CqlSession,
    ks: &str,
    owner: &str,
    share: Share,
) -> Result<SinkStart, CassandraError> {
    let owner = format!("{owner} at {}", now_ms());
    let own = schema::share_partition(share);
    let siblings = schema::layout_partitions(share.processes);
    let (layout, registered) = register(session, ks, share.processes, &owner).await?;
    let mut others: Option<i64> = None;
    for partition in &registered {
        if *partition == own {
            continue;
        }
        let lease = if siblings.contains(partition) {
            let s = statics(session, ks, partition).await?;
            if let Some(theirs) = s.layout_generation.filter(|g| *g > layout) {
                return Err(superseded(ks, partition, layout, theirs));
            }
            s.ts_lease
        } else {
            fence(session, ks, partition, layout, &owner).await?
        };
        others = others.max(lease);
    }
    loop {
        let s = statics(session, ks, &own).await?;
        if let Some(theirs) = s.layout_generation.filter(|g| *g > layout) {
            return Err(superseded(ks, &own, layout, theirs));
        }
        let next = s.generation.unwrap_or(0) + 1;
        let floor = now_us()
            .max(s.ts_lease.unwrap_or(0).saturating_add(1))
            .max(others.unwrap_or(0).saturating_add(1));
        // Conditional on the lease read too: an extension by the old generation in between
        // makes this fail and read again.
        let applied = conditional(
            session,
            format!(
                "UPDATE {ks}.sink_progress SET generation = ?, owner = ?, ts_lease = ?, \
                 layout_generation = ? WHERE sink = ? \
                 IF generation = {} AND ts_lease = {} AND layout_generation = {}",
                literal(s.generation),
                literal(s.ts_lease),
                literal(s.layout_generation)
            ),
            // The lease starts at the floor and is extended at the first write, so engines
            // that restart without writing do not push timestamps ahead of the clock.
            query_values!(next, owner.clone(), floor, layout, own.clone()),
            "claim the sink",
        )
        .await?;
        if !applied {
            continue; // Someone else claimed in between: read again.
        }
        return Ok(SinkStart {
            generation: next,
            committed_epoch: committed_epoch(session, ks, &own).await?,
            timestamp_floor: floor,
            layout_generation: layout,
        });
    }
}

/// The largest lease the other shares of `share`'s layout hold now (serial reads); `None`
/// for a single engine or when none holds one.
///
/// # Errors
///
/// A failed request.
pub(super) async fn sibling_leases(
    session: &CqlSession,
    ks: &str,
    share: Share,
) -> Result<Option<i64>, CassandraError> {
    let own = schema::share_partition(share);
    let mut largest = None;
    for partition in schema::layout_partitions(share.processes) {
        if partition != own {
            largest = largest.max(statics(session, ks, &partition).await?.ts_lease);
        }
    }
    Ok(largest)
}

/// The newest epoch committed in `partition`.
async fn committed_epoch(
    session: &CqlSession,
    ks: &str,
    partition: &str,
) -> Result<Option<Epoch>, CassandraError> {
    Ok(session
        .query_with_values(
            format!(
                "SELECT epoch, committed FROM {ks}.sink_progress WHERE sink = ? LIMIT {PROGRESS_ROWS_KEPT}"
            ),
            query_values!(partition.to_string()),
        )
        .await
        .map_err(|e| CassandraError::request("read sink progress", e))?
        .response_body()
        .map_err(|e| CassandraError::request("read sink progress", e))?
        .into_rows()
        .unwrap_or_default()
        .iter()
        .find_map(|row| {
            let committed: Option<bool> = row.get_by_name("committed").ok().flatten();
            let epoch: Option<i64> = row.get_by_name("epoch").ok().flatten();
            epoch.filter(|_| committed == Some(true))
        })
        .map(|e| e as Epoch))
}

pub(super) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
