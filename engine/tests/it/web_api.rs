//! The web report's HTTP contract without a browser: pages and assets with their types and
//! cache headers, the JSON API's shapes and error statuses, server-sent events after a push,
//! and that nothing served refers to another origin.

use std::sync::Arc;
use std::time::Duration;

use crate::web::{EventStream, get, request};
use serde_json::{Value, json};
use spendflow_engine::Engine;
use spendflow_engine::personnel::Personnel;

fn record(id: &str, user: u64, category: &str, merchant: &str, amount: i64, time: &str) -> String {
    format!(
        r#"{{"expense_id":"{id}","user_id":{user},"merchant":"{merchant}","category":"{category}","amount_minor":{amount},"currency":"EUR","event_time":"{time}"}}"#
    )
}

/// An engine with the web report, personnel for users 1..=5 and a few expenses: user 1 and 2
/// (known to personnel) and user 999 (not).
fn engine(personnel: bool) -> Engine {
    let mut builder = Engine::builder()
        .epoch_interval(Duration::from_millis(5))
        .web("127.0.0.1:0".parse().unwrap());
    if personnel {
        builder = builder.personnel(Arc::new(Personnel::demo(5, 11)));
    }
    let engine = builder.start().unwrap();
    let input = engine.input();
    for r in [
        record("a1", 1, "groceries", "Tesco", 1_000, "2026-10-01T10:00:00Z"),
        record("a2", 1, "groceries", "Aldi", 500, "2026-11-02T10:00:00Z"),
        record("a3", 1, "travel", "KLM", 20_000, "2026-11-15T08:00:00Z"),
        record("b1", 2, "fuel", "Shell", 7_000, "2026-11-03T09:00:00Z"),
        record("z1", 999, "groceries", "Tesco", 300, "2026-11-04T09:00:00Z"),
    ] {
        input.push_json(r).unwrap();
    }
    assert!(engine.wait_caught_up(Duration::from_secs(10)));
    engine
}

#[test]
fn pages_and_assets_are_served_from_the_binary() {
    let engine = engine(false);
    let addr = engine.web_addr().unwrap();

    for path in ["/", "/users/1", "/users/whatever"] {
        let page = get(addr, path);
        assert_eq!(page.status, 200, "{path}");
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert!(page.text().contains("/assets/app.js"));
        let csp = page.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("default-src 'self'"), "{csp}");
    }

    let mut served = vec![get(addr, "/").text()];
    for (name, content_type) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ] {
        let path = format!("/assets/{name}");
        let asset = get(addr, &path);
        assert_eq!(asset.status, 200, "{path}");
        assert_eq!(asset.header("content-type"), Some(content_type), "{path}");
        assert_eq!(asset.header("cache-control"), Some("no-cache"), "{path}");
        let etag = asset.header("etag").expect("an etag").to_string();
        let again = request(addr, "GET", &path, &[("If-None-Match", &etag)], None);
        assert_eq!(again.status, 304, "{path} revalidates");
        assert!(again.body.is_empty());
        served.push(asset.text());
    }
    // Nothing refers to another origin (the SVG namespace URI is a name, never fetched).
    for body in &served {
        let without_namespace = body.replace("http://www.w3.org/2000/svg", "");
        for needle in ["http://", "https://", "//cdn", "@import", "url("] {
            assert!(!without_namespace.contains(needle), "found {needle:?}");
        }
    }

    let missing = get(addr, "/assets/jquery.js");
    assert_eq!(missing.status, 404);
    let missing = get(addr, "/no/such/page");
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("Back to the overview"));
    let missing = get(addr, "/api/nothing");
    assert_eq!(missing.status, 404);
    assert!(
        missing.json()["error"]
            .as_str()
            .unwrap()
            .contains("/api/overview")
    );
    engine.shutdown().unwrap();
}

#[test]
fn the_api_answers_from_the_read_model() {
    let engine = engine(true);
    let addr = engine.web_addr().unwrap();
    let epoch = engine.read_model().snapshot().as_of().epoch;

    let overview = get(addr, "/api/overview");
    assert_eq!(overview.status, 200);
    assert_eq!(overview.header("cache-control"), Some("no-store"));
    let overview = overview.json();
    assert_eq!(overview["as_of"]["epoch"], json!(epoch));
    assert_eq!(overview["users"], json!(3));
    assert_eq!(overview["live_expenses"], json!(5));
    assert_eq!(overview["details"], json!("ok"));
    let top: Vec<(u64, i64, bool)> = overview["top_spenders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["user_id"].as_u64().unwrap(),
                s["total_minor"].as_i64().unwrap(),
                s["name"].is_string(),
            )
        })
        .collect();
    // Users 1 and 2 are in the personnel records, 999 is not.
    assert_eq!(
        top,
        vec![(1, 21_500, true), (2, 7_000, true), (999, 300, false)]
    );
    let categories: Vec<(String, i64, i64, i64)> = overview["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["key"].as_str().unwrap().to_string(),
                c["total_minor"].as_i64().unwrap(),
                c["expense_count"].as_i64().unwrap(),
                c["users"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        categories,
        vec![
            ("travel".into(), 20_000, 1, 1),
            ("fuel".into(), 7_000, 1, 1),
            ("groceries".into(), 1_800, 3, 2),
        ]
    );
    assert_eq!(
        get(addr, "/api/overview?limit=1").json()["top_spenders"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    for bad in ["limit=0", "limit=101", "limit=ten"] {
        let answer = get(addr, &format!("/api/overview?{bad}"));
        assert_eq!(answer.status, 400, "{bad}");
        assert!(answer.json()["error"].as_str().unwrap().contains("limit"));
    }

    let user = get(addr, "/api/users/1");
    assert_eq!(user.status, 200);
    let user = user.json();
    assert_eq!(user["as_of"]["epoch"], json!(epoch));
    assert_eq!(user["details_state"], json!("ok"));
    let details = &user["details"];
    let expected = engine_details(1);
    assert_eq!(details["name"], json!(expected.name));
    assert_eq!(details["currency"], json!(expected.currency));
    assert!(
        details["image_url"]
            .as_str()
            .unwrap()
            .starts_with("/api/users/1/image")
    );
    let aggregates = &user["aggregates"];
    assert_eq!(aggregates["total_minor"], json!(21_500));
    assert_eq!(aggregates["expense_count"], json!(3));
    assert_eq!(aggregates["last_event_time"], json!("2026-11-15T08:00:00Z"));
    assert_eq!(
        aggregates["categories"],
        json!([
            {"key": "travel", "total_minor": 20_000, "expense_count": 1},
            {"key": "groceries", "total_minor": 1_500, "expense_count": 2},
        ])
    );
    assert_eq!(
        aggregates["months"],
        json!([
            {"key": "2026-10", "total_minor": 1_000, "expense_count": 1},
            {"key": "2026-11", "total_minor": 20_500, "expense_count": 2},
        ])
    );
    assert_eq!(aggregates["merchant_count"], json!(3));

    // A user personnel knows but without expenses has a page; one nobody knows is 404.
    let quiet = get(addr, "/api/users/3").json();
    assert_eq!(quiet["aggregates"], Value::Null);
    assert_eq!(quiet["details_state"], json!("ok"));
    let unknown = get(addr, "/api/users/424242");
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"].as_str().unwrap().contains("424242"));
    let stranger = get(addr, "/api/users/999").json();
    assert_eq!(stranger["details_state"], json!("not_found"));
    assert_eq!(stranger["aggregates"]["total_minor"], json!(300));
    for bad in ["0", "abc", "-4", "99999999999999999999"] {
        let answer = get(addr, &format!("/api/users/{bad}"));
        assert_eq!(answer.status, 400, "{bad}");
        assert!(
            answer.json()["error"]
                .as_str()
                .unwrap()
                .contains("integer from 1")
        );
    }

    // The photo: a PNG, validated by its content hash.
    let image = get(addr, "/api/users/1/image");
    assert_eq!(image.status, 200);
    assert_eq!(image.header("content-type"), Some("image/png"));
    assert!(image.body.starts_with(b"\x89PNG\r\n\x1a\n"));
    let etag = image.header("etag").unwrap().to_string();
    let again = request(
        addr,
        "GET",
        "/api/users/1/image",
        &[("If-None-Match", &etag)],
        None,
    );
    assert_eq!(again.status, 304);
    assert_eq!(get(addr, "/api/users/999/image").status, 404);
    assert_eq!(get(addr, "/api/users/x/image").status, 400);
    engine.shutdown().unwrap();
}

fn engine_details(user: u64) -> spendflow_engine::personnel::UserDetails {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(Personnel::demo(5, 11).user(user))
        .unwrap()
        .unwrap()
}

#[test]
fn events_stream_what_changed() {
    let engine = engine(false);
    let addr = engine.web_addr().unwrap();

    let mut stream = EventStream::open(addr, "/api/events?user=2");
    assert_eq!(stream.status, 200);
    assert!(
        stream
            .headers
            .iter()
            .any(|(n, v)| n == "content-type" && v.starts_with("text/event-stream"))
    );
    let hello = stream.next();
    assert_eq!(hello.event, "hello");
    let hello: Value = serde_json::from_str(&hello.data).unwrap();
    let start = hello["epoch"].as_u64().unwrap();

    engine
        .input()
        .push_json(record(
            "b2",
            2,
            "fuel",
            "Shell",
            1_234,
            "2026-11-20T09:00:00Z",
        ))
        .unwrap();
    engine
        .input()
        .push_json(record(
            "b3",
            2,
            "parking",
            "APCOA",
            300,
            "2026-12-01T09:00:00Z",
        ))
        .unwrap();
    let mut seen = None;
    for _ in 0..20 {
        let event = stream.next();
        assert_eq!(event.event, "changes", "{event:?}");
        let changes: Value = serde_json::from_str(&event.data).unwrap();
        assert!(changes["epoch"].as_u64().unwrap() > start);
        if changes["user"]["total_minor"] == json!(7_000 + 1_234 + 300) {
            seen = Some(changes);
            break;
        }
    }
    let changes = seen.expect("a changes event with user 2's new total");
    assert!(
        changes["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["user_id"] == json!(2) && c["total_minor"] == json!(8_534))
    );
    let user = &changes["user"];
    assert_eq!(user["expense_count"], json!(3));
    let categories = user["categories"].as_array().unwrap();
    assert!(categories.contains(
        &json!({"key": "fuel", "total_minor": 8_234, "expense_count": 2, "removed": false})
    ));
    assert!(categories.contains(
        &json!({"key": "parking", "total_minor": 300, "expense_count": 1, "removed": false})
    ));
    assert!(user["months"].as_array().unwrap().contains(
        &json!({"key": "2026-12", "total_minor": 300, "expense_count": 1, "removed": false})
    ));

    assert_eq!(get(addr, "/api/events?user=zero").status, 400);
    // Shutting down with the stream still open ends it instead of waiting for the client.
    engine.shutdown().unwrap();
    drop(stream);
}

#[test]
fn the_demo_prints_the_web_address_and_serves_the_page_there() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut demo = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["demo", "--users", "20", "--rate", "200", "--log", "warn"])
        .args(["--grpc", "127.0.0.1:0", "--web", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(demo.stdout.take().unwrap());
    let mut url = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("Live web report: http://") {
            url = rest.split('/').next().map(str::to_string);
            break;
        }
    }
    let addr: std::net::SocketAddr = url
        .expect("the banner names the web address")
        .parse()
        .unwrap();
    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("spendflow"));
    // The simulated users have names in the demo.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let overview = get(addr, "/api/overview").json();
        if let Some(first) = overview["top_spenders"].get(0) {
            assert_eq!(overview["details"], json!("ok"));
            assert!(first["name"].is_string(), "{overview}");
            let user = first["user_id"].as_u64().unwrap();
            assert_eq!(get(addr, &format!("/api/users/{user}/image")).status, 200);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no spenders: {overview}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stopped = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let exit = demo.wait().unwrap();
    assert!(exit.success(), "the demo stops cleanly on SIGTERM: {exit}");
}

/// The page's JSON and gRPC answer from the same backend: for the same state, the same users
/// in the same order with the same values (ties included), the same categories and merchants
/// in the same order, the same months, the same counters.
#[test]
fn the_web_api_and_grpc_answer_the_same() {
    use spendflow_proto::v1 as pb;
    use spendflow_proto::v1::admin_client::AdminClient;
    use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;

    let engine = Engine::builder()
        .epoch_interval(Duration::from_millis(5))
        .grpc("127.0.0.1:0".parse().unwrap())
        .web("127.0.0.1:0".parse().unwrap())
        .start()
        .unwrap();
    let input = engine.input();
    let mut n = 0;
    let mut push = |user: u64, category: &str, merchant: &str, amount: i64, time: &str| {
        n += 1;
        input
            .push_json(record(
                &format!("e{n}"),
                user,
                category,
                merchant,
                amount,
                time,
            ))
            .unwrap();
    };
    // Users 10, 11 and 12 tie at 3_000 (ranked by id); user 13 has 20 merchants (the page
    // lists 15) with tied totals, and categories that tie.
    for user in [12, 10, 11] {
        push(user, "fuel", "Shell", 3_000, "2026-11-03T09:00:00Z");
    }
    for m in 0..20 {
        let amount = if m % 3 == 0 { 700 } else { 400 };
        let category = ["groceries", "dining", "travel", "books"][m % 4];
        let month = 1 + m % 12;
        push(
            13,
            category,
            &format!("Shop {m:02}"),
            amount,
            &format!("2025-{month:02}-10T12:00:00Z"),
        );
    }
    push(14, "groceries", "Tesco", -250, "2026-11-04T09:00:00Z");
    push(14, "groceries", "Tesco", 1_250, "2026-11-04T10:00:00Z");
    assert!(engine.wait_caught_up(Duration::from_secs(10)));
    let epoch = engine.read_model().snapshot().as_of().epoch;
    let addr = engine.web_addr().unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let channel = runtime
        .block_on(
            tonic::transport::Channel::from_shared(format!(
                "http://{}",
                engine.grpc_addr().unwrap()
            ))
            .unwrap()
            .connect(),
        )
        .unwrap();
    let mut query = ExpenseQueryClient::new(channel.clone());
    let mut admin = AdminClient::new(channel);

    // The overview: top spenders (rank, user, total, count) and counters.
    let overview = get(addr, "/api/overview?limit=100").json();
    assert_eq!(overview["as_of"]["epoch"], json!(epoch));
    let top = runtime
        .block_on(query.top_spenders(pb::TopSpendersRequest {
            limit: 100,
            consistency: None,
        }))
        .unwrap()
        .into_inner();
    assert_eq!(top.as_of.as_ref().unwrap().epoch, epoch);
    let web_top: Vec<Value> = overview["top_spenders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            json!([
                s["rank"],
                s["user_id"],
                s["total_minor"],
                s["expense_count"]
            ])
        })
        .collect();
    let grpc_top: Vec<Value> = top
        .spenders
        .iter()
        .map(|s| json!([s.rank, s.user_id, s.total_minor, s.expense_count]))
        .collect();
    assert_eq!(web_top, grpc_top);
    assert_eq!(
        web_top[..4],
        [
            json!([1, 13, 10_100, 20]),
            json!([2, 10, 3_000, 1]),
            json!([3, 11, 3_000, 1]),
            json!([4, 12, 3_000, 1]),
        ],
        "ties by user id"
    );
    let status = runtime
        .block_on(admin.get_status(pb::GetStatusRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(overview["users"], json!(status.users));
    assert_eq!(overview["live_expenses"], json!(status.live_expenses));
    assert_eq!(overview["records_read"], json!(status.records_read));
    assert_eq!(overview["records_rejected"], json!(status.records_rejected));

    // Totals by category over all users: what summing every gRPC summary gives, same order.
    let summaries = runtime
        .block_on(query.list_user_summaries(pb::ListUserSummariesRequest {
            page_size: 1000,
            page_token: String::new(),
            consistency: None,
        }))
        .unwrap()
        .into_inner();
    let mut by_category: std::collections::BTreeMap<String, (i64, i64, i64)> = Default::default();
    for summary in &summaries.summaries {
        for total in &summary.by_category {
            let entry = by_category.entry(total.key.clone()).or_default();
            *entry = (
                entry.0 + total.total_minor,
                entry.1 + total.expense_count,
                entry.2 + 1,
            );
        }
    }
    let mut expected: Vec<Value> = by_category
        .into_iter()
        .map(|(key, (sum, count, users))| json!([key, sum, count, users]))
        .collect();
    expected.sort_by(|a, b| {
        b[1].as_i64()
            .cmp(&a[1].as_i64())
            .then_with(|| a[0].as_str().cmp(&b[0].as_str()))
    });
    let web_categories: Vec<Value> = overview["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| json!([c["key"], c["total_minor"], c["expense_count"], c["users"]]))
        .collect();
    assert_eq!(web_categories, expected);

    // Every user's page: total, categories and merchants in gRPC's order, months as gRPC's
    // month windows.
    let as_totals = |list: &[pb::Total]| -> Vec<Value> {
        list.iter()
            .map(|t| json!({"key": t.key, "total_minor": t.total_minor, "expense_count": t.expense_count}))
            .collect()
    };
    for summary in &summaries.summaries {
        let user = summary.user_id;
        let page = get(addr, &format!("/api/users/{user}")).json();
        assert_eq!(page["as_of"]["epoch"], json!(epoch));
        let aggregates = &page["aggregates"];
        assert_eq!(
            aggregates["total_minor"],
            json!(summary.total_minor),
            "{user}"
        );
        assert_eq!(aggregates["expense_count"], json!(summary.expense_count));
        assert_eq!(
            aggregates["last_event_time"],
            json!(summary.last_event_time)
        );
        assert_eq!(
            aggregates["categories"],
            json!(as_totals(&summary.by_category))
        );
        let merchants = as_totals(&summary.by_merchant);
        assert_eq!(aggregates["merchant_count"], json!(merchants.len()));
        assert_eq!(
            aggregates["merchants"],
            json!(merchants[..merchants.len().min(15)])
        );
        let windows = runtime
            .block_on(query.get_user_windows(pb::GetUserWindowsRequest {
                user_id: user,
                granularity: pb::Granularity::Month.into(),
                from: "2000-01".into(),
                to: "2099-12".into(),
                consistency: None,
            }))
            .unwrap()
            .into_inner();
        assert_eq!(
            aggregates["months"],
            json!(as_totals(&windows.windows)),
            "{user}"
        );
    }
    let thirteen = get(addr, "/api/users/13").json();
    assert_eq!(
        thirteen["aggregates"]["merchants"]
            .as_array()
            .unwrap()
            .len(),
        15
    );
    assert_eq!(
        thirteen["aggregates"]["months"].as_array().unwrap().len(),
        12
    );
    engine.shutdown().unwrap();
}
