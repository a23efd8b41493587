//! The gRPC contract, end to end: an engine serving on a free port, records pushed in process,
//! every RPC called through the generated client, and every kind of bad request answered with
//! the precise status.

use std::time::Duration;

use spendflow_engine::Engine;
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use tonic::Code;
use tonic::transport::Channel;

fn record(id: &str, user: u64, category: &str, merchant: &str, amount: i64, time: &str) -> String {
    format!(
        r#"{{"expense_id":"{id}","user_id":{user},"merchant":"{merchant}","category":"{category}","amount_minor":{amount},"currency":"EUR","event_time":"{time}"}}"#
    )
}

struct Fixture {
    engine: Engine,
    runtime: tokio::runtime::Runtime,
    channel: Channel,
}

impl Fixture {
    fn start() -> Fixture {
        let engine = Engine::builder()
            .workers(2)
            .epoch_interval(Duration::from_millis(5))
            .grpc("127.0.0.1:0".parse().unwrap())
            .start()
            .unwrap();
        let input = engine.input();
        let records = [
            record("a1", 1, "groceries", "Tesco", 1_000, "2026-11-01T10:00:00Z"),
            record("a2", 1, "groceries", "Aldi", 500, "2026-11-02T10:00:00Z"),
            record("a3", 1, "travel", "KLM", 20_000, "2026-10-15T08:00:00Z"),
            record("b1", 2, "fuel", "Shell", 7_000, "2026-11-03T09:00:00Z"),
            record("c1", 3, "groceries", "Tesco", 100, "2026-11-04T09:00:00Z"),
            record("d1", 4, "groceries", "Tesco", 100, "2026-11-04T09:00:00Z"),
            record("e1", 5, "groceries", "Tesco", 100, "2026-11-04T09:00:00Z"),
            // A correction, a delete and a refund.
            record("a2", 1, "groceries", "Aldi", 700, "2026-11-02T10:00:00Z"),
            r#"{"expense_id":"d1","user_id":4,"op":"delete"}"#.to_string(),
            record("a4", 1, "travel", "KLM", -5_000, "2026-11-05T08:00:00Z"),
            // Malformed: a float amount and broken JSON.
            // (Its names appear nowhere else: a rejected record must not intern them.)
            record(
                "x1",
                1,
                "rejected only",
                "Rejected Only",
                0,
                "2026-11-01T10:00:00Z",
            )
            .replace(":0,", ":12.5,"),
            "{not json".to_string(),
        ];
        for r in records {
            input.push_json(r).unwrap();
        }
        assert!(
            engine.wait_caught_up(Duration::from_secs(10)),
            "engine caught up"
        );
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let addr = engine.grpc_addr().unwrap();
        let channel = crate::support::grpc::connect(&runtime, addr);
        Fixture {
            engine,
            runtime,
            channel,
        }
    }

    fn query(&self) -> ExpenseQueryClient<Channel> {
        ExpenseQueryClient::new(self.channel.clone())
    }

    fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// `GetUserSummary` for `user_id`, waiting as `consistency` says.
    fn summary(
        &self,
        user_id: u64,
        consistency: Option<pb::Consistency>,
    ) -> Result<pb::GetUserSummaryResponse, tonic::Status> {
        crate::support::grpc::summary(&self.runtime, &self.channel, user_id, consistency)
    }
}

#[test]
fn queries_answer_from_the_live_state() {
    let f = Fixture::start();
    let rt = &f.runtime;
    let mut query = f.query();

    let summary = f.summary(1, None).unwrap();
    let user = summary.summary.unwrap();
    assert_eq!(user.total_minor, 1_000 + 700 + 20_000 - 5_000);
    assert_eq!(user.expense_count, 4);
    assert_eq!(user.last_event_time, "2026-11-05T08:00:00Z");
    let categories: Vec<_> = user
        .by_category
        .iter()
        .map(|t| (t.key.as_str(), t.total_minor, t.expense_count))
        .collect();
    assert_eq!(
        categories,
        vec![("travel", 15_000, 2), ("groceries", 1_700, 2)]
    );
    assert!(summary.as_of.unwrap().epoch > 0);

    // Paging visits every user once, in order.
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = rt
            .block_on(query.list_user_summaries(pb::ListUserSummariesRequest {
                page_size: 2,
                page_token: token.clone(),
                consistency: None,
            }))
            .unwrap()
            .into_inner();
        seen.extend(page.summaries.iter().map(|s| s.user_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, vec![1, 2, 3, 5], "user 4's only expense was deleted");

    let windows = |granularity: pb::Granularity, from: &str, to: &str| {
        let request = pb::GetUserWindowsRequest {
            user_id: 1,
            granularity: granularity.into(),
            from: from.into(),
            to: to.into(),
            consistency: None,
        };
        let mut query = f.query();
        rt.block_on(query.get_user_windows(request))
    };
    let months = windows(pb::Granularity::Month, "2026-01", "2026-12")
        .unwrap()
        .into_inner();
    let months: Vec<_> = months
        .windows
        .iter()
        .map(|w| (w.key.as_str(), w.total_minor))
        .collect();
    assert_eq!(months, vec![("2026-10", 20_000), ("2026-11", -3_300)]);
    let days = windows(pb::Granularity::Day, "2026-11-02", "2026-11-05")
        .unwrap()
        .into_inner();
    let days: Vec<_> = days
        .windows
        .iter()
        .map(|w| (w.key.as_str(), w.total_minor))
        .collect();
    assert_eq!(days, vec![("2026-11-02", 700), ("2026-11-05", -5_000)]);

    let top = rt
        .block_on(query.top_spenders(pb::TopSpendersRequest {
            limit: 2,
            consistency: None,
        }))
        .unwrap()
        .into_inner();
    let top: Vec<_> = top
        .spenders
        .iter()
        .map(|s| (s.rank, s.user_id, s.total_minor))
        .collect();
    assert_eq!(top, vec![(1, 1, 16_700), (2, 2, 7_000)]);
}

#[test]
fn bad_requests_get_precise_statuses() {
    let f = Fixture::start();
    let rt = &f.runtime;
    let mut query = f.query();
    let summary = |user_id| pb::GetUserSummaryRequest {
        user_id,
        consistency: None,
    };

    let status = rt.block_on(query.get_user_summary(summary(0))).unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("user_id"), "{}", status.message());
    let status = rt
        .block_on(query.get_user_summary(summary(999)))
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("999"));

    let list = |page_size, page_token: &str| pb::ListUserSummariesRequest {
        page_size,
        page_token: page_token.into(),
        consistency: None,
    };
    let status = rt
        .block_on(query.list_user_summaries(list(5000, "")))
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("page_size"));
    let status = rt
        .block_on(query.list_user_summaries(list(10, "garbage")))
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("page_token"));

    let windows = |granularity: pb::Granularity, from: &str, to: &str| pb::GetUserWindowsRequest {
        user_id: 1,
        granularity: granularity.into(),
        from: from.into(),
        to: to.into(),
        consistency: None,
    };
    for (request, needle) in [
        (
            windows(pb::Granularity::Unspecified, "2026-01", "2026-02"),
            "granularity",
        ),
        (
            windows(pb::Granularity::Month, "2026/01", "2026-02"),
            "from",
        ),
        (
            windows(pb::Granularity::Day, "2026-11-05", "2026-11-01"),
            "after",
        ),
        (
            windows(pb::Granularity::Day, "2000-01-01", "2026-11-01"),
            "at most 3660 days",
        ),
    ] {
        let status = rt.block_on(query.get_user_windows(request)).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains(needle),
            "{} lacks {needle}",
            status.message()
        );
    }

    let status = rt
        .block_on(query.top_spenders(pb::TopSpendersRequest {
            limit: 1001,
            consistency: None,
        }))
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Read-your-writes with an epoch that will not come in time.
    let far = pb::Consistency {
        incarnation: String::new(),
        min_epoch: u64::MAX,
        timeout_ms: 50,
    };
    let status = f.summary(1, Some(far)).unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);

    let too_many = pb::SubscribeRequest {
        incarnation: String::new(),
        user_ids: (1..=1001).collect(),
        resume_after_epoch: 0,
    };
    let status = rt.block_on(query.subscribe(too_many)).unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[test]
fn admin_reports_counts_and_rejections() {
    let f = Fixture::start();
    let rt = &f.runtime;
    let mut admin = f.admin();
    let status = rt
        .block_on(admin.get_status(pb::GetStatusRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(status.records_read, 12);
    assert_eq!(status.records_accepted, 10);
    assert_eq!(status.records_rejected, 2);
    assert_eq!(
        status.rejected_by_reason.get("amount_not_integer"),
        Some(&1)
    );
    assert_eq!(status.rejected_by_reason.get("bad_json"), Some(&1));
    assert!(status.caught_up);
    assert_eq!(status.workers, 2);
    assert_eq!(status.users, 4);
    assert_eq!(status.live_expenses, 7);
    // groceries, travel, fuel, Tesco, Aldi, KLM, Shell (other tests in this process add more),
    // and never the names of the rejected record.
    assert!(status.interned_names >= 7, "{}", status.interned_names);
    assert!(
        !spendflow_operators::Name::interned()
            .iter()
            .any(|n| n.starts_with("Rejected Only") || n.starts_with("rejected only")),
        "a rejected record's names were interned"
    );
    let input = status
        .partitions
        .iter()
        .find(|p| p.source == "input")
        .unwrap();
    assert_eq!((input.position, input.lag), (12, 0));
    assert_eq!(
        status
            .as_of
            .unwrap()
            .positions
            .iter()
            .find(|p| p.source == "input")
            .map(|p| p.offset),
        Some(12),
        "the served epoch covers every record read"
    );

    let rejected = rt
        .block_on(admin.list_rejected(pb::ListRejectedRequest { limit: 10 }))
        .unwrap()
        .into_inner();
    assert_eq!(rejected.total_rejected, 2);
    let reasons: Vec<_> = rejected
        .records
        .iter()
        .map(|r| (r.reason.as_str(), r.offset))
        .collect();
    assert_eq!(
        reasons,
        vec![("bad_json", 11), ("amount_not_integer", 10)],
        "newest first"
    );
    assert_eq!(rejected.records[0].raw_prefix, "{not json");
}

#[test]
fn subscriptions_stream_snapshot_changes_and_progress() {
    let f = Fixture::start();
    let rt = &f.runtime;
    let mut query = f.query();
    let mut stream = rt
        .block_on(query.subscribe(pb::SubscribeRequest {
            incarnation: String::new(),
            user_ids: vec![2],
            resume_after_epoch: 0,
        }))
        .unwrap()
        .into_inner();
    let next = |stream: &mut tonic::Streaming<pb::SubscribeResponse>| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), stream.message()).await })
            .expect("a message in time")
            .unwrap()
            .unwrap()
            .event
            .unwrap()
    };
    let pb::subscribe_response::Event::Snapshot(snapshot) = next(&mut stream) else {
        panic!("a subscription starts with a snapshot")
    };
    assert!(snapshot.last);
    let user = snapshot
        .cells
        .iter()
        .find(|c| c.kind() == pb::CellKind::User)
        .unwrap();
    assert_eq!(
        (user.user_id, user.total_minor, user.expense_count),
        (2, 7_000, 1)
    );
    let snapshot_epoch = snapshot.as_of.unwrap().epoch;

    // A new expense of user 2 arrives as changes, followed by progress.
    f.engine
        .input()
        .push_json(record(
            "b2",
            2,
            "fuel",
            "Shell",
            3_000,
            "2026-11-06T09:00:00Z",
        ))
        .unwrap();
    let changes = loop {
        match next(&mut stream) {
            pb::subscribe_response::Event::Changes(changes) => break changes,
            pb::subscribe_response::Event::Progress(p) => {
                assert!(p.as_of.unwrap().epoch > snapshot_epoch)
            }
            pb::subscribe_response::Event::Snapshot(_) => panic!("no second snapshot"),
        }
    };
    assert!(
        changes.cells.iter().all(|c| c.user_id == 2),
        "only the subscribed user"
    );
    let user = changes
        .cells
        .iter()
        .find(|c| c.kind() == pb::CellKind::User)
        .unwrap();
    assert_eq!((user.total_minor, user.expense_count), (10_000, 2));
    assert_eq!(user.last_event_time, "2026-11-06T09:00:00Z");
    let changes_epoch = changes.as_of.unwrap().epoch;
    assert!(matches!(
        next(&mut stream),
        pb::subscribe_response::Event::Progress(_)
    ));

    // Resuming after the snapshot's epoch replays those changes without a snapshot.
    let mut resumed = rt
        .block_on(query.subscribe(pb::SubscribeRequest {
            incarnation: String::new(),
            user_ids: vec![2],
            resume_after_epoch: snapshot_epoch,
        }))
        .unwrap()
        .into_inner();
    let replayed = loop {
        match next(&mut resumed) {
            pb::subscribe_response::Event::Changes(changes) => break changes,
            pb::subscribe_response::Event::Progress(_) => {}
            pb::subscribe_response::Event::Snapshot(_) => panic!("resume needs no snapshot"),
        }
    };
    assert_eq!(replayed.as_of.unwrap().epoch, changes_epoch);
}

/// Issue 11, 5a and 5b: a client is never left waiting for an epoch that will not come, and
/// epochs of another incarnation (an engine that started over) are never taken for this one's.
#[test]
fn epochs_beyond_the_newest_or_of_another_incarnation_do_not_mislead() {
    let f = Fixture::start();
    let rt = &f.runtime;
    let mut query = f.query();
    let summary = f.summary(1, None).unwrap();
    let as_of = summary.as_of.unwrap();
    assert_eq!(as_of.incarnation.len(), 16, "{:?}", as_of.incarnation);
    let newest = f.engine.read_model().published_epoch().unwrap();
    assert!(newest >= as_of.epoch);

    // Resuming after an epoch far beyond the newest: OUT_OF_RANGE naming the newest, not a
    // stream that sends nothing.
    let beyond = newest + 1_000_000;
    let status = rt
        .block_on(query.subscribe(pb::SubscribeRequest {
            user_ids: vec![],
            resume_after_epoch: beyond,
            incarnation: as_of.incarnation.clone(),
        }))
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains(&beyond.to_string()), "{status:?}");
    assert!(
        status.message().contains("newest published epoch ("),
        "{status:?}"
    );
    // ... also when the client does not say which incarnation it holds.
    let status = rt
        .block_on(query.subscribe(pb::SubscribeRequest {
            user_ids: vec![],
            resume_after_epoch: beyond,
            incarnation: String::new(),
        }))
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // The same large epoch from another incarnation: a fresh snapshot, never deltas.
    let next = |stream: &mut tonic::Streaming<pb::SubscribeResponse>| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), stream.message()).await })
            .expect("a message in time")
            .unwrap()
            .unwrap()
            .event
            .unwrap()
    };
    let mut stream = rt
        .block_on(query.subscribe(pb::SubscribeRequest {
            user_ids: vec![1],
            resume_after_epoch: beyond,
            incarnation: "0123456789abcdef".into(),
        }))
        .unwrap()
        .into_inner();
    let pb::subscribe_response::Event::Snapshot(snapshot) = next(&mut stream) else {
        panic!("another incarnation's epoch gets a snapshot")
    };
    assert_eq!(snapshot.as_of.unwrap().incarnation, as_of.incarnation);
    // A small epoch from another incarnation (which this run has passed): a snapshot too.
    let mut stream = rt
        .block_on(query.subscribe(pb::SubscribeRequest {
            user_ids: vec![1],
            resume_after_epoch: 1,
            incarnation: "0123456789abcdef".into(),
        }))
        .unwrap()
        .into_inner();
    assert!(matches!(
        next(&mut stream),
        pb::subscribe_response::Event::Snapshot(_)
    ));

    // Read-your-writes with another incarnation's epoch: FAILED_PRECONDITION at once (not a
    // wait, not an answer from an unrelated state), naming the current incarnation.
    for min_epoch in [1, beyond] {
        let status = f
            .summary(
                1,
                Some(pb::Consistency {
                    min_epoch,
                    timeout_ms: 30_000,
                    incarnation: "0123456789abcdef".into(),
                }),
            )
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains(&as_of.incarnation), "{status:?}");
    }
    // The same incarnation's epoch is answered.
    f.summary(
        1,
        Some(pb::Consistency {
            min_epoch: as_of.epoch,
            timeout_ms: 0,
            incarnation: as_of.incarnation.clone(),
        }),
    )
    .unwrap();
}

#[test]
fn reflection_and_health_are_on() {
    let f = Fixture::start();
    crate::support::grpc::assert_reflection_lists_services(&f.runtime, &f.channel);
    assert_eq!(
        crate::support::grpc::health(&f.runtime, &f.channel, "spendflow.v1.ExpenseQuery"),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}
