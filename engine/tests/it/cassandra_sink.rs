//! The Cassandra sink against the real node: absolute values and deletes land in the tables,
//! the progress row is committed, a replayed write is harmless, and a second engine fences
//! the first one out; in a cluster, every process's share commits on its own, a zombie share
//! is fenced by its replacement, and a new layout fences every share of the old one. Needs `SPENDFLOW_CASSANDRA` (see `docker/native/services env`).

use std::sync::Arc;

use cdrs_tokio::types::IntoRustByName;
use spendflow_engine::cassandra::TableReader;
use spendflow_engine::cassandra::connect;
use spendflow_engine::cassandra::reader::ProgressState;
use spendflow_engine::cluster::Share;
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
    // Claimed, nothing committed yet (the progress partition holds only its static columns):
    // readers see the generation and no committed epoch, not an error.
    let state = reader_progress(&runtime, &contact, &keyspace);
    assert_eq!((state.committed_epoch(), state.generation), (None, Some(1)));

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

// ---------------------------------------------------------------------------------------------
// Issue 15: shares of the sink, one per process of a cluster, each with its own progress.

/// Opens share `share` of the sink as a cluster process does.
fn open_share(
    config: &CassandraSinkConfig,
    owner: &str,
    share: Share,
    runtime: &tokio::runtime::Runtime,
) -> Result<(CassandraSink, SinkStart), SinkError> {
    let mut sink = CassandraSink::new(config.clone());
    let ctx = SinkContext {
        share,
        ..SinkContext::new(owner, runtime.handle().clone())
    };
    let committed = sink.open(&ctx)?;
    let start = sink.start().unwrap();
    assert_eq!(committed, start.committed_epoch);
    Ok((sink, start))
}

fn share(process: usize, processes: usize) -> Share {
    Share { process, processes }
}

/// `(total_minor, WRITETIME(total_minor))` of `user`.
fn user_total(
    runtime: &tokio::runtime::Runtime,
    contact: &str,
    keyspace: &str,
    user: u64,
) -> Option<(i64, i64)> {
    let rows = select(
        runtime,
        contact,
        format!(
            "SELECT total_minor, WRITETIME(total_minor) AS ts FROM {keyspace}.user_totals WHERE user_id = {user}"
        ),
    );
    rows.first().map(|row| {
        (
            row.get_r_by_name("total_minor").unwrap(),
            row.get_r_by_name("ts").unwrap(),
        )
    })
}

/// What readers (`serve --from cassandra`, `verify --cassandra`) see as committed.
fn reader_progress(
    runtime: &tokio::runtime::Runtime,
    contact: &str,
    keyspace: &str,
) -> ProgressState {
    runtime.block_on(async {
        let session = connect(contact).await.unwrap();
        let reader = TableReader::new(session, keyspace).await.unwrap();
        reader.progress().await.unwrap()
    })
}

fn keyspace_config(contact: &str, prefix: &str) -> (String, CassandraSinkConfig) {
    let keyspace = unique_name(prefix);
    let config = CassandraSinkConfig {
        keyspace: keyspace.clone(),
        ..CassandraSinkConfig::new(contact.to_string())
    };
    (keyspace, config)
}

#[test]
fn two_shares_of_a_layout_write_and_commit_independently() {
    let contact = service_env("SPENDFLOW_CASSANDRA");
    let (keyspace, config) = keyspace_config(&contact, "spendflow_shares");
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let (mut zero, start0) = open_share(&config, "p0", share(0, 2), &runtime).unwrap();
    let (mut one, start1) = open_share(&config, "p1", share(1, 2), &runtime).unwrap();
    // Each share has a generation of its own; neither claim fenced the other.
    assert_eq!((start0.generation, start1.generation), (1, 1));
    assert_eq!(start0.layout_generation, start1.layout_generation);
    assert_eq!(
        (start0.committed_epoch, start1.committed_epoch),
        (None, None)
    );

    zero.put(&group(3, vec![cell(AggKey::User(10), 1, 100, Some(1))]))
        .unwrap();
    one.put(&group(3, vec![cell(AggKey::User(11), 1, 110, Some(1))]))
        .unwrap();
    zero.put(&group(5, vec![cell(AggKey::User(10), 2, 150, Some(2))]))
        .unwrap();
    assert_eq!(
        user_total(&runtime, &contact, &keyspace, 10).unwrap().0,
        150
    );
    assert_eq!(
        user_total(&runtime, &contact, &keyspace, 11).unwrap().0,
        110
    );

    // Each share's progress is its own partition.
    let progress = |partition: &str| -> Vec<i64> {
        select(
            &runtime,
            &contact,
            format!(
                "SELECT epoch FROM {keyspace}.sink_progress WHERE sink = '{partition}' AND epoch > 0"
            ),
        )
        .iter()
        .map(|r| r.get_r_by_name("epoch").unwrap())
        .collect()
    };
    assert_eq!(progress("main/0-of-2"), vec![5, 3]);
    assert_eq!(progress("main/1-of-2"), vec![3]);

    // Readers: the keyspace is committed up to the slowest share of the layout.
    let state = reader_progress(&runtime, &contact, &keyspace);
    assert_eq!(state.committed_epoch(), Some(3));
    assert_eq!(state.newest, Some(5));
    assert!(!state.settled());
    assert_eq!(state.shares.len(), 2);
    one.put(&group(5, vec![])).unwrap();
    let state = reader_progress(&runtime, &contact, &keyspace);
    assert_eq!(state.committed_epoch(), Some(5));
    assert!(state.settled());
    assert_eq!(state.committed.unwrap().records_covered, 2 * 105);

    // A restart of each process opens with the epoch THAT share committed.
    drop((zero, one));
    let (mut one, start1) = open_share(&config, "p1 again", share(1, 2), &runtime).unwrap();
    assert_eq!((start1.generation, start1.committed_epoch), (2, Some(5)));
    one.put(&group(6, vec![cell(AggKey::User(11), 2, 120, Some(3))]))
        .unwrap();
    let (_zero, start0) = open_share(&config, "p0 again", share(0, 2), &runtime).unwrap();
    assert_eq!((start0.generation, start0.committed_epoch), (2, Some(5)));
    // The same layout: no share of it was fenced by the other's restart.
    assert_eq!(start0.layout_generation, start1.layout_generation);

    select(&runtime, &contact, format!("DROP KEYSPACE {keyspace}"));
}

#[test]
fn a_zombie_share_is_fenced_once_its_replacement_claims() {
    let contact = service_env("SPENDFLOW_CASSANDRA");
    let (keyspace, config) = keyspace_config(&contact, "spendflow_zombie");
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let (mut zero, _) = open_share(&config, "p0", share(0, 2), &runtime).unwrap();
    let (mut zombie, _) = open_share(&config, "p1 old", share(1, 2), &runtime).unwrap();
    zombie
        .put(&group(4, vec![cell(AggKey::User(11), 1, 110, Some(1))]))
        .unwrap();
    zero.put(&group(4, vec![])).unwrap();

    // Process 1 is replaced (its old process still running): the new one claims share 1.
    let (mut one, start) = open_share(&config, "p1 new", share(1, 2), &runtime).unwrap();
    assert_eq!((start.generation, start.committed_epoch), (2, Some(4)));
    assert!(start.timestamp_floor > zombie.last_timestamp().unwrap());
    one.put(&group(5, vec![cell(AggKey::User(11), 2, 220, Some(2))]))
        .unwrap();
    let (_, new_ts) = user_total(&runtime, &contact, &keyspace, 11).unwrap();

    // The zombie's late write loses, and it can never advance share 1's progress.
    let err = zombie
        .put(&group(9, vec![cell(AggKey::User(11), 9, 999, Some(9))]))
        .unwrap_err();
    assert!(err.is_fenced(), "{err}");
    assert!(err.to_string().contains("main/1-of-2"), "{err}");
    assert_eq!(
        user_total(&runtime, &contact, &keyspace, 11),
        Some((220, new_ts))
    );
    let committed: Vec<i64> = select(
        &runtime,
        &contact,
        format!(
            "SELECT epoch FROM {keyspace}.sink_progress WHERE sink = 'main/1-of-2' AND epoch > 0"
        ),
    )
    .iter()
    .map(|r| r.get_r_by_name("epoch").unwrap())
    .collect();
    assert_eq!(committed, vec![5, 4], "no epoch 9 from the zombie");

    // Share 0 is not touched by share 1's replacement.
    zero.put(&group(5, vec![cell(AggKey::User(10), 1, 100, Some(1))]))
        .unwrap();
    assert_eq!(
        reader_progress(&runtime, &contact, &keyspace).committed_epoch(),
        Some(5)
    );

    select(&runtime, &contact, format!("DROP KEYSPACE {keyspace}"));
}

#[test]
fn a_rescale_from_three_to_two_fences_the_old_layout_and_the_new_writes_win() {
    let contact = service_env("SPENDFLOW_CASSANDRA");
    let (keyspace, config) = keyspace_config(&contact, "spendflow_rescale");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let user = 77;

    // Three processes: share 2-of-3 owns the user.
    let mut old: Vec<CassandraSink> = (0..3)
        .map(|p| {
            open_share(&config, &format!("old p{p}"), share(p, 3), &runtime)
                .unwrap()
                .0
        })
        .collect();
    for (p, sink) in old.iter_mut().enumerate() {
        let cells = if p == 2 {
            vec![cell(AggKey::User(user), 1, 300, Some(1))]
        } else {
            vec![]
        };
        sink.put(&group(8, cells)).unwrap();
    }
    assert_eq!(
        reader_progress(&runtime, &contact, &keyspace).committed_epoch(),
        Some(8)
    );
    let old_ts = old[2].last_timestamp().unwrap();

    // Two processes: the user moves to share 1-of-2, which starts above every lease of the
    // old layout, and fences every old share.
    let (mut one, start1) = open_share(&config, "new p1", share(1, 2), &runtime).unwrap();
    assert_eq!(
        start1.committed_epoch, None,
        "a new share has committed nothing"
    );
    assert!(start1.timestamp_floor > old_ts);
    let state = reader_progress(&runtime, &contact, &keyspace);
    assert_eq!(
        state.committed_epoch(),
        None,
        "the newest layout has committed nothing yet: {state:?}"
    );
    one.put(&group(9, vec![cell(AggKey::User(user), 2, 500, Some(2))]))
        .unwrap();
    let (total, new_ts) = user_total(&runtime, &contact, &keyspace, user).unwrap();
    assert_eq!(total, 500);

    // Every share of the old layout is a zombie now: the old owner's late write of the user
    // loses, and none of them commits again.
    for (p, sink) in old.iter_mut().enumerate() {
        let cells = if p == 2 {
            vec![cell(AggKey::User(user), 9, 999, Some(9))]
        } else {
            vec![]
        };
        let err = sink.put(&group(10, cells)).unwrap_err();
        assert!(err.is_fenced(), "old share {p}: {err}");
    }
    assert_eq!(
        user_total(&runtime, &contact, &keyspace, user),
        Some((500, new_ts))
    );

    // The other new share; then the keyspace is committed up to the new layout's slowest.
    let (mut zero, start0) = open_share(&config, "new p0", share(0, 2), &runtime).unwrap();
    assert_eq!(start0.layout_generation, start1.layout_generation);
    zero.put(&group(9, vec![])).unwrap();
    let state = reader_progress(&runtime, &contact, &keyspace);
    assert_eq!(state.committed_epoch(), Some(9));
    assert_eq!(
        state
            .shares
            .iter()
            .map(|s| s.sink.as_str())
            .collect::<Vec<_>>(),
        vec!["main/0-of-2", "main/1-of-2"]
    );

    // Back to a single engine: it fences the cluster's shares and its writes win.
    let (mut single, start) = open(&config, "single", &runtime);
    assert!(start.timestamp_floor > one.last_timestamp().unwrap());
    single
        .put(&group(11, vec![cell(AggKey::User(user), 3, 700, Some(3))]))
        .unwrap();
    assert!(one.put(&group(11, vec![])).unwrap_err().is_fenced());
    assert_eq!(
        user_total(&runtime, &contact, &keyspace, user).unwrap().0,
        700
    );
    let state = reader_progress(&runtime, &contact, &keyspace);
    assert_eq!(state.committed_epoch(), Some(11));
    assert!(state.shares.is_empty(), "a single engine reads from main");

    // A share that finds its partition taken by a newer layout than the one it registered
    // under refuses to start (as when an old layout's process races a newer one).
    select(
        &runtime,
        &contact,
        format!(
            "UPDATE {keyspace}.sink_progress SET layout_generation = 1000 WHERE sink = 'main/1-of-2'"
        ),
    );
    let err = open_share(&config, "late p1", share(1, 2), &runtime).unwrap_err();
    assert!(err.is_fenced(), "{err}");
    assert!(err.to_string().contains("newer layout"), "{err}");

    select(&runtime, &contact, format!("DROP KEYSPACE {keyspace}"));
}

/// A keyspace an engine wrote before shares existed (its `sink_progress` without the layout
/// columns) still opens for a single engine with its committed epoch, and above its lease.
#[test]
fn a_single_engine_opens_a_keyspace_written_before_shares_with_its_committed_epoch() {
    let contact = service_env("SPENDFLOW_CASSANDRA");
    let (keyspace, config) = keyspace_config(&contact, "spendflow_legacy");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    select(
        &runtime,
        &contact,
        spendflow_engine::cassandra::schema::create_keyspace(&keyspace, &config.replication)
            .unwrap(),
    );
    for table in spendflow_engine::cassandra::schema::create_tables(&keyspace) {
        if !table.contains("sink_progress") {
            select(&runtime, &contact, table);
        }
    }
    // The table as the engine created it before issue 15.
    select(
        &runtime,
        &contact,
        format!(
            "CREATE TABLE {keyspace}.sink_progress (sink text, epoch bigint, generation bigint static, \
             owner text static, ts_lease bigint static, positions text, records_covered bigint, \
             committed boolean, committed_at timestamp, PRIMARY KEY ((sink), epoch)) \
             WITH CLUSTERING ORDER BY (epoch DESC)"
        ),
    );
    let lease = 4_000_000_000_000_000_i64; // µs, far after now: the floor must pass it
    select(
        &runtime,
        &contact,
        format!(
            "UPDATE {keyspace}.sink_progress SET generation = 3, owner = 'old', ts_lease = {lease} \
             WHERE sink = 'main'"
        ),
    );
    for (epoch, committed) in [(40, true), (41, true), (42, false)] {
        select(
            &runtime,
            &contact,
            format!(
                "INSERT INTO {keyspace}.sink_progress (sink, epoch, positions, records_covered, committed) \
                 VALUES ('main', {epoch}, '[]', {epoch}, {committed})"
            ),
        );
    }
    // Readers read it as before.
    let state = reader_progress(&runtime, &contact, &keyspace);
    assert_eq!(state.committed_epoch(), Some(41));
    assert_eq!(&*state.incarnation(), "cassandra-generation-3");

    let (mut sink, start) = open(&config, "new engine", &runtime);
    assert_eq!(start.generation, 4);
    assert_eq!(start.committed_epoch, Some(41));
    assert!(start.timestamp_floor > lease);
    sink.put(&group(43, vec![cell(AggKey::User(5), 1, 50, Some(1))]))
        .unwrap();
    let state = reader_progress(&runtime, &contact, &keyspace);
    assert_eq!(state.committed_epoch(), Some(43));
    assert_eq!(&*state.incarnation(), "cassandra-generation-4");
    assert!(state.shares.is_empty());

    select(&runtime, &contact, format!("DROP KEYSPACE {keyspace}"));
}

/// The same number of processes with another `-w`: users move between shares of one layout,
/// so no layout change fences the old run. The old holder of another share may extend its
/// lease after this share claimed (before its own replacement claims); this share's first
/// write still goes above it.
#[test]
fn a_shares_first_write_is_above_the_leases_its_siblings_hold_then() {
    let contact = service_env("SPENDFLOW_CASSANDRA");
    let (keyspace, config) = keyspace_config(&contact, "spendflow_siblings");
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let (_old_one, _) = open_share(&config, "old p1", share(1, 2), &runtime).unwrap();
    let (mut zero, start0) = open_share(&config, "new p0", share(0, 2), &runtime).unwrap();
    // The old process 1 extends its lease well beyond the new share 0's floor (a zombie's
    // extension, made far ahead here so that the clock cannot catch up during the test)...
    let extended = start0.timestamp_floor + 3_600_000_000;
    select(
        &runtime,
        &contact,
        format!(
            "UPDATE {keyspace}.sink_progress SET ts_lease = {extended} WHERE sink = 'main/1-of-2'"
        ),
    );
    // ...then its replacement claims, and the cluster starts writing.
    let (_one, start1) = open_share(&config, "new p1", share(1, 2), &runtime).unwrap();
    assert!(start1.timestamp_floor > extended);
    zero.put(&group(1, vec![cell(AggKey::User(10), 1, 100, Some(1))]))
        .unwrap();
    let (total, ts) = user_total(&runtime, &contact, &keyspace, 10).unwrap();
    assert_eq!(total, 100);
    assert!(
        ts > extended,
        "share 0 writes above every lease its siblings held at its first write: {ts} <= {extended}"
    );

    select(&runtime, &contact, format!("DROP KEYSPACE {keyspace}"));
}
