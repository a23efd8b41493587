//! The Cassandra sink against the real node: absolute values and deletes land in the tables,
//! the progress row is committed, a replayed write is harmless, and a second engine fences
//! the first one out. Needs `SPENDFLOW_CASSANDRA` (see `docker/native/services env`).

use std::sync::Arc;

use cdrs_tokio::types::IntoRustByName;
use spendflow_engine::cassandra::connect;
use spendflow_engine::serve::read_model::CellValue;
use spendflow_engine::sink::cassandra::{CassandraSink, CassandraSinkConfig, SinkStart};
use spendflow_engine::sink::{EpochGroup, Sink, SinkContext, SinkError};
use spendflow_engine::source::PartitionPosition;
use spendflow_operators::{AggKey, Name};

use crate::support::{service_env, unique_name};

fn cell(key: AggKey, count: i64, sum: i64, last: Option<i64>) -> CellValue {
    CellValue {
        key,
        count,
        sum: sum.into(),
        last_event_ms: last,
    }
}

/// Opens a sink as the engine does, owned by `owner`.
fn open(
    config: &CassandraSinkConfig,
    owner: &str,
    runtime: &tokio::runtime::Runtime,
) -> (CassandraSink, SinkStart) {
    let mut sink = CassandraSink::new(config.clone());
    sink.open(&SinkContext::new(owner, runtime.handle().clone()))
        .unwrap();
    let start = sink.start().unwrap();
    (sink, start)
}

/// Writes a group and commits it, as the sink driver does.
trait Put {
    fn put(&mut self, group: &EpochGroup) -> Result<(), SinkError>;
}

impl Put for CassandraSink {
    fn put(&mut self, group: &EpochGroup) -> Result<(), SinkError> {
        self.write(group)?;
        self.commit(group)
    }
}

fn group(epoch: u64, cells: Vec<CellValue>) -> EpochGroup {
    let mut g = EpochGroup::default();
    g.merge(
        epoch,
        Arc::new(vec![PartitionPosition {
            source: Arc::from("expenses.user.7"),
            partition: 0,
            position: 100 + epoch as i64,
            high_watermark: None,
            ..PartitionPosition::default()
        }]),
        100 + epoch,
        cells,
    );
    g
}

fn select(
    runtime: &tokio::runtime::Runtime,
    contact: &str,
    cql: String,
) -> Vec<cdrs_tokio::types::rows::Row> {
    runtime.block_on(async {
        let session = connect(contact).await.unwrap();
        session
            .query(cql)
            .await
            .unwrap()
            .response_body()
            .unwrap()
            .into_rows()
            .unwrap_or_default()
    })
}

#[test]
fn writes_absolute_values_deletes_commits_and_fences() {
    let contact = service_env("SPENDFLOW_CASSANDRA");
    let keyspace = unique_name("spendflow_sink");
    let config = CassandraSinkConfig {
        keyspace: keyspace.clone(),
        ..CassandraSinkConfig::new(contact.clone())
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mut sink, start) = open(&config, "test-1", &runtime);
    assert_eq!(start.generation, 1);
    assert_eq!(start.committed_epoch, None);

    let (groceries, _) = Name::intern("groceries");
    let (tesco, _) = Name::intern("Tesco");
    let day = 20_416; // 2025-11-24
    let first = group(
        3,
        vec![
            cell(AggKey::User(7), 2, 1500, Some(1_764_000_000_000)),
            cell(AggKey::Category(7, groceries), 2, 1500, None),
            cell(AggKey::Merchant(7, tesco), 2, 1500, None),
            cell(AggKey::Day(7, day), 2, 1500, None),
            cell(AggKey::Month(7, 2025 * 12 + 10), 2, 1500, None),
        ],
    );
    sink.put(&first).unwrap();
    // Replaying the same group (a retry, a restart) changes nothing.
    sink.put(&first).unwrap();

    let rows = select(
        &runtime,
        &contact,
        format!(
            "SELECT total_minor, expense_count, last_event_ms, epoch FROM {keyspace}.user_totals WHERE user_id = 7"
        ),
    );
    assert_eq!(rows.len(), 1);
    let total: i64 = rows[0].get_r_by_name("total_minor").unwrap();
    let count: i64 = rows[0].get_r_by_name("expense_count").unwrap();
    let last: i64 = rows[0].get_r_by_name("last_event_ms").unwrap();
    assert_eq!((total, count, last), (1500, 2, 1_764_000_000_000));
    let rows = select(
        &runtime,
        &contact,
        format!("SELECT day FROM {keyspace}.user_daily_totals WHERE user_id = 7"),
    )
    .into_iter()
    .map(|r| IntoRustByName::<String>::get_r_by_name(&r, "day").unwrap())
    .collect::<Vec<_>>();
    assert_eq!(rows, vec!["2025-11-24".to_string()]);

    // The category empties: its row is deleted; the total changes.
    sink.put(&group(
        5,
        vec![
            cell(AggKey::User(7), 0, 0, None),
            cell(AggKey::Category(7, groceries), 0, 0, None),
        ],
    ))
    .unwrap();
    let users = select(
        &runtime,
        &contact,
        format!("SELECT user_id FROM {keyspace}.user_totals"),
    );
    assert!(users.is_empty(), "the user row is deleted");
    let categories = select(
        &runtime,
        &contact,
        format!("SELECT category FROM {keyspace}.user_category_totals WHERE user_id = 7"),
    );
    assert!(categories.is_empty());
    let progress = select(
        &runtime,
        &contact,
        format!(
            "SELECT epoch, committed, records_covered, positions, generation FROM {keyspace}.sink_progress WHERE sink = 'main'"
        ),
    );
    let newest = &progress[0];
    assert_eq!(
        IntoRustByName::<i64>::get_r_by_name(newest, "epoch").unwrap(),
        5
    );
    assert!(IntoRustByName::<bool>::get_r_by_name(newest, "committed").unwrap());
    assert_eq!(
        IntoRustByName::<i64>::get_r_by_name(newest, "records_covered").unwrap(),
        105
    );
    let positions: String = newest.get_r_by_name("positions").unwrap();
    assert!(positions.contains("\"position\":105"), "{positions}");

    // A second engine claims the sink: it sees the committed epoch, and the first is fenced.
    let (mut second, start) = open(&config, "test-2", &runtime);
    assert_eq!(start.generation, 2);
    assert_eq!(start.committed_epoch, Some(5));
    let err = sink
        .put(&group(6, vec![cell(AggKey::User(7), 1, 10, Some(1))]))
        .unwrap_err();
    assert!(err.is_fenced(), "{err}");
    assert!(err.to_string().contains("took over"), "{err}");
    // The newer generation's write wins even at a lower epoch number.
    second
        .put(&group(4, vec![cell(AggKey::User(7), 1, 99, Some(1))]))
        .unwrap();
    let rows = select(
        &runtime,
        &contact,
        format!("SELECT total_minor FROM {keyspace}.user_totals WHERE user_id = 7"),
    );
    let total: i64 = rows[0].get_r_by_name("total_minor").unwrap();
    assert_eq!(total, 99);

    select(&runtime, &contact, format!("DROP KEYSPACE {keyspace}"));
}

/// `(total_minor, WRITETIME(total_minor))` of user 7.
fn total_and_timestamp(
    runtime: &tokio::runtime::Runtime,
    contact: &str,
    keyspace: &str,
) -> (i64, i64) {
    let rows = select(
        runtime,
        contact,
        format!(
            "SELECT total_minor, WRITETIME(total_minor) AS ts FROM {keyspace}.user_totals WHERE user_id = 7"
        ),
    );
    (
        rows[0].get_r_by_name("total_minor").unwrap(),
        rows[0].get_r_by_name("ts").unwrap(),
    )
}

/// Issue 11, point 7: write timestamps are ordinary (µs since the Unix epoch, at or above the
/// wall clock), so another writer's row does not hide spendflow's forever; they grow across a
/// restart (new generation); and a replaced engine's late writes still lose to the new one's.
#[test]
fn write_timestamps_follow_the_clock_grow_across_generations_and_fence_zombies() {
    let contact = service_env("SPENDFLOW_CASSANDRA");
    let keyspace = unique_name("spendflow_sink_ts");
    let config = CassandraSinkConfig {
        keyspace: keyspace.clone(),
        ..CassandraSinkConfig::new(contact.clone())
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64
    };

    let before = now_us();
    let (mut first, start) = open(&config, "ts-1", &runtime);
    assert!(
        start.timestamp_floor >= before,
        "floor at or above the clock"
    );
    first
        .put(&group(1, vec![cell(AggKey::User(7), 1, 100, Some(1))]))
        .unwrap();
    let (total, ts) = total_and_timestamp(&runtime, &contact, &keyspace);
    assert_eq!(total, 100);
    assert!(
        ts >= before,
        "a wall-clock timestamp, not one near 1970: {ts}"
    );
    assert_eq!(ts, first.last_timestamp().unwrap());

    // Another writer (an operator's fix-up) with an ordinary, current timestamp.
    select(
        &runtime,
        &contact,
        format!(
            "INSERT INTO {keyspace}.user_totals (user_id, total_minor, expense_count, epoch) \
             VALUES (7, 555, 1, 0) USING TIMESTAMP {}",
            now_us().max(ts + 1)
        ),
    );
    let (total, other) = total_and_timestamp(&runtime, &contact, &keyspace);
    assert_eq!(total, 555, "the fix-up is visible");
    // spendflow's next write of that cell overwrites it.
    first
        .put(&group(2, vec![cell(AggKey::User(7), 1, 200, Some(1))]))
        .unwrap();
    let (total, second_ts) = total_and_timestamp(&runtime, &contact, &keyspace);
    assert_eq!(total, 200, "spendflow's next write wins over the fix-up");
    assert!(second_ts > other && second_ts > ts);

    // A restart claims the next generation: its timestamps start above everything the first
    // one could use (its whole lease), and its writes win.
    let (mut second, start) = open(&config, "ts-2", &runtime);
    assert_eq!(start.generation, 2);
    assert!(start.timestamp_floor > first.last_timestamp().unwrap());
    second
        .put(&group(3, vec![cell(AggKey::User(7), 1, 300, Some(1))]))
        .unwrap();
    let (total, third_ts) = total_and_timestamp(&runtime, &contact, &keyspace);
    assert_eq!(total, 300);
    assert!(third_ts > second_ts, "timestamps grow across the restart");

    // The replaced engine, not knowing yet, writes the same cell after the new one did: its
    // cells carry timestamps within its old lease, below the new generation's, and it is
    // fenced at its commit. The new generation's value stays.
    let err = first
        .put(&group(4, vec![cell(AggKey::User(7), 1, 999, Some(1))]))
        .unwrap_err();
    assert!(err.is_fenced(), "{err}");
    assert!(err.to_string().contains("took over"), "{err}");
    assert!(first.last_timestamp().unwrap() < start.timestamp_floor);
    let (total, ts) = total_and_timestamp(&runtime, &contact, &keyspace);
    assert_eq!(
        (total, ts),
        (300, third_ts),
        "the zombie's late write loses"
    );

    select(&runtime, &contact, format!("DROP KEYSPACE {keyspace}"));
}
