//! The file source end to end, against recomputation made outside the engine:
//!
//! * 100,000 simulated records (corrections, deletes, duplicates, refunds, late events and
//!   malformed lines) in a file, `-w 2`: once caught up, every gRPC answer equals the
//!   recomputation, and the rejected count equals the malformed lines.
//! * At every epoch the engine publishes, the published state equals the recomputation over
//!   exactly the input its `as_of` says it covers, with 1 and with 2 workers.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use spendflow_engine::serve::read_model::{CellValue, SubscriptionStart};
use spendflow_engine::source::file::FileSourceConfig;
use spendflow_engine::source::generator::{GeneratorConfig, Simulator};
use spendflow_engine::{Engine, EngineConfig, SourceConfig};
use spendflow_operators::oracle::{Aggregates, recompute};
use spendflow_operators::{AggKey, Record};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;

/// A file of `n` simulated records; returns it with each line's byte offset and decoded truth
/// (`None` for malformed lines).
fn simulated_file(
    n: usize,
    seed: u64,
    users: u64,
) -> (tempfile::NamedTempFile, Vec<(i64, Option<Record>)>) {
    let config = GeneratorConfig {
        seed,
        users,
        bad_rate: 0.01,
        ..GeneratorConfig::default()
    };
    let mut simulator = Simulator::new(config).unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let mut lines = Vec::with_capacity(n);
    let mut offset = 0i64;
    let mut buffer = Vec::new();
    for _ in 0..n {
        let generated = simulator.next_record();
        // A malformed record may not contain a newline of its own, or it would be two lines.
        assert!(!generated.bytes.contains(&b'\n'));
        lines.push((offset, generated.record));
        buffer.extend_from_slice(&generated.bytes);
        buffer.push(b'\n');
        offset += generated.bytes.len() as i64 + 1;
    }
    file.write_all(&buffer).unwrap();
    file.flush().unwrap();
    (file, lines)
}

fn engine_over(path: &std::path::Path, workers: usize, budget: usize, grpc: bool) -> Engine {
    let config = EngineConfig {
        workers,
        epoch_interval_ms: 5,
        epoch_budget: budget,
        source: Some(SourceConfig::File(FileSourceConfig {
            path: path.into(),
            follow: false,
        })),
        grpc: grpc.then(|| "127.0.0.1:0".parse().unwrap()),
        ..EngineConfig::default()
    };
    Engine::builder().config(config).start().unwrap()
}

#[test]
fn hundred_thousand_records_with_two_workers_match_recomputation() {
    let (file, lines) = simulated_file(100_000, 2026, 1_000);
    let malformed = lines.iter().filter(|(_, r)| r.is_none()).count() as u64;
    assert!(
        malformed > 500,
        "the stream has malformed lines: {malformed}"
    );
    let expected = recompute(lines.iter().filter_map(|(_, r)| r.as_ref()));

    let engine = engine_over(file.path(), 2, 10_000, true);
    assert!(
        engine.wait_caught_up(Duration::from_secs(120)),
        "caught up in time"
    );
    let addr = engine.grpc_addr().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let endpoint = format!("http://{addr}");
        let mut admin = AdminClient::connect(endpoint.clone()).await.unwrap();
        let status = admin
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(status.caught_up);
        assert_eq!(status.records_read, 100_000);
        assert_eq!(
            status.records_rejected, malformed,
            "rejected == malformed lines"
        );
        assert_eq!(status.records_accepted, 100_000 - malformed);

        let mut query = ExpenseQueryClient::connect(endpoint).await.unwrap();
        let mut users_checked = 0;
        for (key, (count, sum)) in &expected.cells {
            let AggKey::User(user) = key else { continue };
            let request = pb::GetUserSummaryRequest {
                user_id: *user,
                consistency: None,
            };
            let summary = query
                .get_user_summary(request)
                .await
                .unwrap()
                .into_inner()
                .summary
                .unwrap();
            assert_eq!(
                (summary.expense_count, summary.total_minor),
                (*count, *sum),
                "user {user}"
            );
            let by = |prefix: fn(&AggKey) -> Option<String>| -> BTreeMap<String, (i64, i64)> {
                expected
                    .cells
                    .iter()
                    .filter(|(k, _)| k.user_id() == *user)
                    .filter_map(|(k, v)| prefix(k).map(|name| (name, *v)))
                    .collect()
            };
            let served = |totals: &[pb::Total]| -> BTreeMap<String, (i64, i64)> {
                totals
                    .iter()
                    .map(|t| (t.key.clone(), (t.expense_count, t.total_minor)))
                    .collect()
            };
            assert_eq!(
                served(&summary.by_category),
                by(|k| match k {
                    AggKey::Category(_, c) => Some(c.text().to_string()),
                    _ => None,
                }),
                "user {user} categories"
            );
            assert_eq!(
                served(&summary.by_merchant),
                by(|k| match k {
                    AggKey::Merchant(_, m) => Some(m.text().to_string()),
                    _ => None,
                }),
                "user {user} merchants"
            );
            let last = expected.last_seen.get(user).copied().unwrap_or(0);
            assert_eq!(summary.last_event_ms, last, "user {user} last event");

            let months = query
                .get_user_windows(pb::GetUserWindowsRequest {
                    user_id: *user,
                    granularity: pb::Granularity::Month.into(),
                    from: "1970-01".into(),
                    to: "2069-12".into(),
                    consistency: None,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                served(&months.windows),
                by(|k| match k {
                    AggKey::Month(_, m) =>
                        Some(spendflow_engine::serve::read_model::format_month(*m)),
                    _ => None,
                }),
                "user {user} months"
            );
            users_checked += 1;
        }
        assert!(users_checked > 900, "checked {users_checked} users");

        // Top spenders: the recomputed totals, largest first.
        let mut totals: Vec<(i64, u64)> = expected
            .cells
            .iter()
            .filter_map(|(k, (_, sum))| match k {
                AggKey::User(u) => Some((-sum, *u)),
                _ => None,
            })
            .collect();
        totals.sort();
        let top = query
            .top_spenders(pb::TopSpendersRequest {
                limit: 20,
                consistency: None,
            })
            .await
            .unwrap()
            .into_inner();
        let served: Vec<(i64, u64)> = top
            .spenders
            .iter()
            .map(|s| (-s.total_minor, s.user_id))
            .collect();
        assert_eq!(served, totals[..20].to_vec());
    });
    engine.shutdown().unwrap();
}

/// The state a subscriber builds from a snapshot and the changes after it.
fn apply(state: &mut Aggregates, cells: impl IntoIterator<Item = CellValue>) {
    for cell in cells {
        if let AggKey::User(user) = cell.key {
            match cell.last_event_ms {
                Some(ms) => state.last_seen.insert(user, ms),
                None => state.last_seen.remove(&user),
            };
        }
        if cell.removed() {
            state.cells.remove(&cell.key);
        } else {
            state.cells.insert(
                cell.key,
                (
                    cell.count,
                    i64::try_from(cell.sum).expect("test totals fit i64"),
                ),
            );
        }
    }
}

#[test]
fn every_published_epoch_matches_recomputation_of_the_input_it_covers() {
    for workers in [1, 2] {
        let (file, lines) = simulated_file(6_000, 7 + workers as u64, 60);
        // A small budget makes many epochs.
        let engine = engine_over(file.path(), workers, 150, false);
        let (start, mut changes) = engine.read_model().subscribe(None);
        let SubscriptionStart::Snapshot(snapshot) = start else {
            panic!("fresh subscriptions start from a snapshot")
        };
        let mut state = Aggregates::default();
        apply(&mut state, snapshot.cells(&[]));
        let mut epochs_checked = 0;
        let mut check = |state: &Aggregates, position: i64, epoch: u64| {
            let covered = lines.iter().filter(|(offset, _)| *offset < position);
            let expected = recompute(covered.filter_map(|(_, r)| r.as_ref()));
            assert_eq!(
                state.cells, expected.cells,
                "{workers} workers, epoch {epoch}, position {position}"
            );
            assert_eq!(
                state.last_seen, expected.last_seen,
                "{workers} workers, epoch {epoch}"
            );
            epochs_checked += 1;
        };
        let file_position = |positions: &[spendflow_engine::source::PartitionPosition]| {
            positions
                .iter()
                .find(|p| p.source.starts_with("file:"))
                .map_or(0, |p| p.position)
        };
        check(
            &state,
            file_position(&snapshot.as_of().positions),
            snapshot.as_of().epoch,
        );
        let end = lines.last().map(|(o, _)| *o).unwrap() + 1;
        let mut last_epoch;
        loop {
            let published = changes.blocking_recv().expect("no lag at this size");
            if published.as_of.epoch <= snapshot.as_of().epoch {
                continue;
            }
            apply(&mut state, published.cells.iter().cloned());
            let position = file_position(&published.as_of.positions);
            check(&state, position, published.as_of.epoch);
            last_epoch = published.as_of.epoch;
            if position >= end {
                break;
            }
        }
        // The budget cuts at least 6,000 / 150 = 40 epochs. How many deltas they are
        // published in depends on the machine (epochs that close together are published
        // together), so the check asks for several deltas, not for one per epoch.
        assert!(
            last_epoch >= 40 && epochs_checked >= 4,
            "{workers} workers: {epochs_checked} deltas checked, up to epoch {last_epoch}"
        );
        engine.shutdown().unwrap();
    }
}

/// The first epochs (closed when the workers start, before anything is read) must claim no
/// input. They drain only once the probe has passed them; on a busy machine the first records
/// are read and their epoch cut before that, and those first epochs used to be published
/// with the positions and read count of that later cut: a snapshot claiming thousands of
/// records with none of their changes, and `caught_up` true with nothing served.
#[test]
fn the_first_published_epoch_claims_only_the_input_it_holds() {
    let (file, lines) = simulated_file(6_000, 99, 60);
    let file_position = |positions: &[spendflow_engine::source::PartitionPosition]| {
        positions
            .iter()
            .find(|p| p.source.starts_with("file:"))
            .map_or(0, |p| p.position)
    };
    let end = lines.last().map(|(o, _)| *o).unwrap() + 1;
    for round in 0..5 {
        // A large budget: the first poll takes a whole batch into the first epoch, which the
        // 5 ms timer then cuts while it is still being processed.
        let engine = engine_over(file.path(), 2, 100_000, false);
        let (start, mut changes) = engine.read_model().subscribe(None);
        let SubscriptionStart::Snapshot(snapshot) = start else {
            panic!("fresh subscriptions start from a snapshot")
        };
        let mut state = Aggregates::default();
        apply(&mut state, snapshot.cells(&[]));
        let check = |state: &Aggregates, position: i64, epoch: u64| {
            let covered = lines.iter().filter(|(offset, _)| *offset < position);
            let expected = recompute(covered.filter_map(|(_, r)| r.as_ref()));
            assert!(
                state.cells == expected.cells,
                "round {round}: epoch {epoch} claims file position {position} but holds {} cells, \
                 not the {} of that input",
                state.cells.len(),
                expected.cells.len()
            );
        };
        // Nothing published yet: the snapshot is the empty default, and epoch 0 may follow.
        let published = !snapshot.as_of().positions.is_empty();
        check(
            &state,
            file_position(&snapshot.as_of().positions),
            snapshot.as_of().epoch,
        );
        loop {
            let next = changes.blocking_recv().expect("no lag at this size");
            if published && next.as_of.epoch <= snapshot.as_of().epoch {
                continue;
            }
            apply(&mut state, next.cells.iter().cloned());
            let position = file_position(&next.as_of.positions);
            check(&state, position, next.as_of.epoch);
            if position >= end {
                break;
            }
        }
        engine.shutdown().unwrap();
    }
}

/// A worker whose sources have nothing to read from its very first poll (here: an empty file;
/// in CI: a Kafka partition restored at its end) must show its partitions as soon as the
/// engine says it is caught up. They were published only after a refresh interval (250 ms)
/// then, so a status read in between was caught up without them.
#[test]
fn caught_up_from_the_first_poll_still_shows_every_partition() {
    let file = tempfile::NamedTempFile::new().unwrap();
    for round in 0..10 {
        let engine = engine_over(file.path(), 1, 1_000, false);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            let status = engine.status();
            if status.caught_up {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "never caught up");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(
            status
                .partitions
                .iter()
                .any(|p| p.source.starts_with("file:")),
            "round {round}: caught up, but the file is not among the partitions: {:?}",
            status.partitions
        );
        engine.shutdown().unwrap();
    }
}

/// A durable sink handed in by an embedding program (`EngineBuilder::sink`) is driven through
/// the sink contract: once the engine has caught up and shut down, the sink holds exactly the
/// recomputation of the input. A second engine handed the same sink (a store that survived
/// the restart) is told what was committed, continues with later epochs, and the sink still
/// converges to the same state although the input is read again.
#[test]
fn a_sink_of_ones_own_receives_exactly_the_input_through_the_contract() {
    use spendflow_engine::sink::memory::MemorySink;

    let (file, lines) = simulated_file(20_000, 5, 50);
    let expected = recompute(lines.iter().filter_map(|(_, r)| r.as_ref()));
    let sink = MemorySink::new();
    let run = |sink: &MemorySink| {
        let config = EngineConfig {
            workers: 2,
            epoch_interval_ms: 5,
            source: Some(SourceConfig::File(FileSourceConfig {
                path: file.path().into(),
                follow: false,
            })),
            ..EngineConfig::default()
        };
        let engine = Engine::builder()
            .config(config)
            .sink(sink.clone())
            .start()
            .unwrap();
        assert!(engine.wait_caught_up(Duration::from_secs(60)));
        engine.shutdown().unwrap();
        let state = sink.state();
        let mut held = Aggregates::default();
        apply(&mut held, state.cells.values().cloned());
        assert_eq!(
            held.cells, expected.cells,
            "the sink holds the recomputation"
        );
        state
    };
    let first = run(&sink);
    assert_eq!(first.opens, 1);
    assert!(
        first.commits.windows(2).all(|w| w[0] < w[1]),
        "commits in epoch order"
    );
    let second = run(&sink);
    assert_eq!(second.opens, 2);
    let first_committed = first.committed.expect("the first run committed");
    let later = &second.commits[first.commits.len()..];
    assert!(
        !later.is_empty() && later.iter().all(|&e| e > first_committed),
        "the second run's epochs continue after {first_committed}: {later:?}"
    );
}
