use std::time::Duration;

use futures::StreamExt;
use spendflow_operators::reference::{AlertEvent, AlertState, UserRef, UserRow};
use spendflow_operators::{AggKey, CellChange};
use spendflow_proto::v1::alerts_server::Alerts;
use tonic::Code;

use super::*;
use crate::serve::auth::grpc::Caller;
use crate::serve::auth::{AuthKey, Authenticator, Principal, Scopes};
use crate::serve::read_model::{AsOf, EpochDelta, ReadModelWriter};

const MONTH: i32 = 2026 * 12 + 10; // 2026-11

fn event(user_id: UserId, month: i32, threshold_pct: u8, state: AlertState) -> AlertEvent {
    AlertEvent {
        user_id,
        month,
        threshold_pct,
        state,
        spent_minor: 900,
        budget_minor: 1000,
        currency: *b"EUR",
    }
}

fn delta(epoch: Epoch, alerts: Vec<(Epoch, AlertEvent)>) -> EpochDelta {
    EpochDelta {
        as_of: AsOf {
            epoch,
            ..AsOf::default()
        },
        alerts,
        ..EpochDelta::default()
    }
}

/// Users 1 to 3 with budgets and spend; alerts (1, 80), (1, 100), (2, 80), (3, 80), (3, 80 of
/// the month before), fired at epoch 1.
fn model_with_alerts() -> (Arc<ReadModel>, ReadModelWriter) {
    let (model, mut writer) = ReadModel::new();
    let mut cells = Vec::new();
    let mut users = Vec::new();
    for user in 1..=3 {
        cells.push(CellChange {
            key: AggKey::User(user),
            count: 1,
            sum: 1000,
        });
        cells.push(CellChange {
            key: AggKey::Month(user, MONTH),
            count: 1,
            sum: 1000,
        });
        users.push(UserRef {
            user_id: user,
            row: Some(UserRow {
                budget_minor: Some(1000),
                currency: *b"EUR",
            }),
        });
    }
    let alerts = [
        (1, MONTH, 80),
        (1, MONTH, 100),
        (2, MONTH, 80),
        (3, MONTH - 1, 80),
        (3, MONTH, 80),
    ]
    .into_iter()
    .map(|(u, m, t)| (1, event(u, m, t, AlertState::Fired)))
    .collect();
    writer.apply(EpochDelta {
        cells,
        users,
        ..delta(1, alerts)
    });
    (model, writer)
}

fn list(user_id: u64, page_size: u32, page_token: &str) -> Request<pb::ListAlertsRequest> {
    Request::new(pb::ListAlertsRequest {
        user_id,
        consistency: None,
        page_size,
        page_token: page_token.to_string(),
    })
}

fn keys(alerts: &[pb::Alert]) -> Vec<(u64, String, u32)> {
    alerts
        .iter()
        .map(|a| (a.user_id, a.month.clone(), a.threshold_pct))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn list_alerts_pages_through_the_fired_alerts_and_filters_by_user() {
    let (model, _writer) = model_with_alerts();
    let service = AlertsService::new(Arc::clone(&model));
    let runtime = runtime();
    let mut all = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = runtime
            .block_on(service.list_alerts(list(0, 2, &token)))
            .unwrap()
            .into_inner();
        assert!(page.alerts.len() <= 2);
        assert_eq!(page.as_of.unwrap().epoch, 1);
        all.extend(page.alerts);
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(
        keys(&all),
        vec![
            (1, "2026-11".into(), 80),
            (1, "2026-11".into(), 100),
            (2, "2026-11".into(), 80),
            (3, "2026-10".into(), 80),
            (3, "2026-11".into(), 80),
        ]
    );
    let first = &all[0];
    assert_eq!(first.state, pb::AlertState::Fired as i32);
    assert_eq!(
        (
            first.spent_minor,
            first.budget_minor,
            first.currency.as_str()
        ),
        (1000, 1000, "EUR"),
        "the current month spend, not the event's"
    );
    assert_eq!(first.epoch, 1);

    // One user's alerts, paged too.
    let page = runtime
        .block_on(service.list_alerts(list(3, 1, "")))
        .unwrap()
        .into_inner();
    assert_eq!(keys(&page.alerts), vec![(3, "2026-10".into(), 80)]);
    let page = runtime
        .block_on(service.list_alerts(list(3, 1, &page.next_page_token)))
        .unwrap()
        .into_inner();
    assert_eq!(keys(&page.alerts), vec![(3, "2026-11".into(), 80)]);
    assert!(page.next_page_token.is_empty());
    // A user without alerts: an empty answer, not NOT_FOUND.
    let page = runtime
        .block_on(service.list_alerts(list(9, 0, "")))
        .unwrap()
        .into_inner();
    assert!(page.alerts.is_empty() && page.next_page_token.is_empty());
}

#[test]
fn list_alerts_refuses_bad_requests_naming_the_field() {
    let (model, _writer) = model_with_alerts();
    let service = AlertsService::new(model);
    let runtime = runtime();
    let refused = |request, field: &str, code: Code| {
        let status = runtime.block_on(service.list_alerts(request)).unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    };
    refused(list(0, 1001, ""), "page_size", Code::InvalidArgument);
    refused(list(0, 10, "garbage"), "page_token", Code::InvalidArgument);
    refused(list(0, 10, "1:2"), "page_token", Code::InvalidArgument);
    refused(list(u64::MAX, 10, ""), "user_id", Code::InvalidArgument);
    let mut request = list(0, 10, "");
    request.get_mut().consistency = Some(pb::Consistency {
        min_epoch: 1,
        incarnation: "another".into(),
        timeout_ms: 0,
    });
    refused(request, "consistency.min_epoch", Code::FailedPrecondition);
    let mut request = list(0, 10, "");
    request.get_mut().consistency = Some(pb::Consistency {
        min_epoch: 5,
        incarnation: String::new(),
        timeout_ms: 10,
    });
    refused(request, "epoch 5", Code::DeadlineExceeded);
}

#[test]
fn a_self_token_lists_only_its_own_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "alerts-test-secret-0123456789abcdef-0123").unwrap();
    let auth = Arc::new(Authenticator::new(AuthKey::hs256_file(&secret).unwrap()));
    let (model, _writer) = model_with_alerts();
    let service = AlertsService::new(model);
    let runtime = runtime();
    let as_caller = |mut request: Request<pb::ListAlertsRequest>, scope: &str| {
        request.extensions_mut().insert(Caller {
            principal: Principal {
                sub: Some(2),
                scopes: Scopes::from_claim(scope),
                token_id: Arc::from("t"),
                expires_at: u64::MAX,
            },
            auth: Arc::clone(&auth),
        });
        request
    };
    let own = runtime
        .block_on(service.list_alerts(as_caller(list(2, 0, ""), "expenses:read:self")))
        .unwrap()
        .into_inner();
    assert_eq!(keys(&own.alerts), vec![(2, "2026-11".into(), 80)]);
    for user in [1, 0] {
        let status = runtime
            .block_on(service.list_alerts(as_caller(list(user, 0, ""), "expenses:read:self")))
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "user {user}: {status:?}"
        );
        assert!(status.message().contains("expenses:read"), "{status:?}");
    }
    let all = runtime
        .block_on(service.list_alerts(as_caller(list(0, 0, ""), "expenses:read")))
        .unwrap()
        .into_inner();
    assert_eq!(all.alerts.len(), 5);

    // Subscribing follows the same rule.
    let subscribe = |user_id| {
        let mut request = Request::new(pb::SubscribeAlertsRequest {
            user_id,
            resume_after_epoch: 0,
            incarnation: String::new(),
        });
        request.extensions_mut().insert(Caller {
            principal: Principal {
                sub: Some(2),
                scopes: Scopes::from_claim("expenses:read:self"),
                token_id: Arc::from("t"),
                expires_at: u64::MAX,
            },
            auth: Arc::clone(&auth),
        });
        runtime.block_on(service.subscribe(request))
    };
    assert!(subscribe(2).is_ok());
    for user in [1, 0] {
        let status = subscribe(user).err().unwrap();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "user {user}: {status:?}"
        );
    }
}

fn subscribe_request(
    user_id: u64,
    resume_after_epoch: Epoch,
    incarnation: &str,
) -> Request<pb::SubscribeAlertsRequest> {
    Request::new(pb::SubscribeAlertsRequest {
        user_id,
        resume_after_epoch,
        incarnation: incarnation.to_string(),
    })
}

async fn next_event(stream: &mut AlertStream) -> pb::subscribe_alerts_response::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a message in time")
        .expect("the stream goes on")
        .expect("not an error")
        .event
        .unwrap()
}

#[tokio::test]
async fn subscribe_sends_the_fired_alerts_then_changes_and_resumes_without_a_snapshot() {
    use pb::subscribe_alerts_response::Event;

    let (model, mut writer) = model_with_alerts();
    let service = AlertsService::new(Arc::clone(&model));
    let mut stream = service
        .subscribe(subscribe_request(1, 0, ""))
        .await
        .unwrap()
        .into_inner();
    let Event::Snapshot(snapshot) = next_event(&mut stream).await else {
        panic!("a snapshot first");
    };
    assert!(snapshot.last);
    assert_eq!(
        keys(&snapshot.alerts),
        vec![(1, "2026-11".into(), 80), (1, "2026-11".into(), 100)]
    );
    let incarnation = snapshot.as_of.unwrap().incarnation;

    // Epoch 2: user 1's 100 % alert clears, user 2's fires again (not subscribed).
    writer.apply(delta(
        2,
        vec![
            (2, event(1, MONTH, 100, AlertState::Cleared)),
            (2, event(2, MONTH, 100, AlertState::Fired)),
        ],
    ));
    let Event::Changes(changes) = next_event(&mut stream).await else {
        panic!("epoch 2's changes");
    };
    assert_eq!(changes.as_of.unwrap().epoch, 2);
    assert_eq!(changes.alerts.len(), 1);
    assert_eq!(changes.alerts[0].state, pb::AlertState::Cleared as i32);
    assert_eq!(changes.alerts[0].epoch, 2);
    assert!(
        matches!(next_event(&mut stream).await, Event::Progress(p) if p.as_of.as_ref().unwrap().epoch == 2)
    );

    // Epoch 3 changes nothing of user 1: a progress mark only.
    writer.apply(delta(
        3,
        vec![(3, event(2, MONTH, 80, AlertState::Cleared))],
    ));
    assert!(
        matches!(next_event(&mut stream).await, Event::Progress(p) if p.as_of.as_ref().unwrap().epoch == 3)
    );
    drop(stream);

    // The client comes back after epoch 2 while epoch 4 is published: epochs 3 and 4 from
    // history, no snapshot.
    writer.apply(delta(
        4,
        vec![(4, event(1, MONTH, 80, AlertState::Cleared))],
    ));
    let mut stream = service
        .subscribe(subscribe_request(1, 2, &incarnation))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(next_event(&mut stream).await, Event::Progress(p) if p.as_of.as_ref().unwrap().epoch == 3)
    );
    let Event::Changes(changes) = next_event(&mut stream).await else {
        panic!("epoch 4's changes, not a snapshot");
    };
    assert_eq!(keys(&changes.alerts), vec![(1, "2026-11".into(), 80)]);
    assert!(
        matches!(next_event(&mut stream).await, Event::Progress(p) if p.as_of.as_ref().unwrap().epoch == 4)
    );

    // Another incarnation's epoch: a snapshot (user 1 has no alert left).
    let mut stream = service
        .subscribe(subscribe_request(1, 2, "another-incarnation"))
        .await
        .unwrap()
        .into_inner();
    let Event::Snapshot(snapshot) = next_event(&mut stream).await else {
        panic!("a snapshot for another incarnation");
    };
    assert!(snapshot.last && snapshot.alerts.is_empty());
    assert_eq!(snapshot.as_of.unwrap().epoch, 4);

    // An epoch beyond the newest: OUT_OF_RANGE naming the field.
    let status = service
        .subscribe(subscribe_request(1, 99, &incarnation))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("resume_after_epoch"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_large_alert_snapshot_comes_in_pages() {
    use pb::subscribe_alerts_response::Event;

    let (model, mut writer) = ReadModel::new();
    let alerts = (1..=(2 * SNAPSHOT_CHUNK as u64 + 5))
        .map(|u| (1, event(u, MONTH, 80, AlertState::Fired)))
        .collect();
    writer.apply(delta(1, alerts));
    let service = AlertsService::new(model);
    let mut stream = service
        .subscribe(subscribe_request(0, 0, ""))
        .await
        .unwrap()
        .into_inner();
    let mut users = Vec::new();
    loop {
        let Event::Snapshot(page) = next_event(&mut stream).await else {
            panic!("snapshot pages first");
        };
        assert!(page.alerts.len() <= SNAPSHOT_CHUNK);
        users.extend(page.alerts.iter().map(|a| a.user_id));
        if page.last {
            break;
        }
    }
    assert_eq!(
        users,
        (1..=(2 * SNAPSHOT_CHUNK as u64 + 5)).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn alerts_are_unimplemented_from_cassandra_with_a_pointer_to_the_engine() {
    let status = AlertsUnimplemented
        .list_alerts(list(0, 0, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("engine"), "{status:?}");
    let status = AlertsUnimplemented
        .subscribe(subscribe_request(0, 0, ""))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::Unimplemented);
}

/// A subscriber that falls further behind than the broadcast holds gets a fresh snapshot
/// (which replaces what it holds), never a stream with a gap.
#[tokio::test]
async fn a_subscriber_too_slow_to_follow_gets_a_new_snapshot() {
    use pb::subscribe_alerts_response::Event;

    let (model, mut writer) = model_with_alerts();
    let service = AlertsService::new(Arc::clone(&model));
    let mut stream = service
        .subscribe(subscribe_request(0, 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut stream).await, Event::Snapshot(s) if s.last));
    // Far more epochs than the broadcast keeps, while the client reads nothing; the last one
    // clears user 2's alert.
    let last = 2 + 2000;
    for epoch in 2..last {
        writer.apply(delta(epoch, vec![]));
    }
    writer.apply(delta(
        last,
        vec![(last, event(2, MONTH, 80, AlertState::Cleared))],
    ));
    let Event::Snapshot(snapshot) = next_event(&mut stream).await else {
        panic!("a new snapshot after lagging");
    };
    assert!(snapshot.last);
    assert_eq!(snapshot.as_of.unwrap().epoch, last);
    assert_eq!(snapshot.alerts.len(), 4, "user 2's alert is gone");
    assert!(snapshot.alerts.iter().all(|a| a.user_id != 2));
}

/// Alert streams and `ExpenseQuery` streams share one bound.
#[tokio::test]
async fn alert_subscriptions_count_against_the_servers_subscription_limit() {
    let (model, _writer) = model_with_alerts();
    let query = super::super::QueryService::over_read_model(Arc::clone(&model));
    let service = AlertsService::new(model).sharing_subscribers(query.subscriber_count());
    let count = query.subscriber_count();
    let held: Vec<SubscriberGuard> = (0..super::super::MAX_SUBSCRIBERS)
        .map(|_| SubscriberGuard::acquire(&count).unwrap())
        .collect();
    let status = service
        .subscribe(subscribe_request(1, 0, ""))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("subscriptions are open"),
        "{status:?}"
    );
    drop(held);
    let stream = service
        .subscribe(subscribe_request(1, 0, ""))
        .await
        .unwrap();
    assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 1);
    drop(stream);
    assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 0);
}
