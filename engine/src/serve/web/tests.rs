use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, header};
use spendflow_operators::{AggKey, Name};

use super::api::{CategoryTotal, parse_user_id};
use super::assets::{all, etag_matches};
use super::events::merge;
use crate::serve::grpc::backend::testing::Hanging;
use crate::serve::read_model::{AsOf, CellValue, EpochDelta, Published, ReadModel, Snapshot};
use crate::serve::transport::Transport;

/// The overview's totals by category, as the web API sends them.
fn category_totals(snapshot: &Snapshot) -> Vec<CategoryTotal> {
    crate::serve::grpc::category_totals(snapshot)
        .into_iter()
        .map(CategoryTotal::from)
        .collect()
}

fn cell(key: AggKey, count: i64, sum: i64) -> CellValue {
    CellValue {
        key,
        count,
        sum: sum.into(),
        last_event_ms: None,
    }
}

fn published(epoch: u64, cells: Vec<CellValue>) -> Arc<Published> {
    Arc::new(Published {
        as_of: AsOf {
            epoch,
            positions: Arc::default(),
            ..AsOf::default()
        },
        cells,
    })
}

#[test]
fn user_ids_are_checked() {
    assert_eq!(parse_user_id("42").unwrap(), 42);
    for bad in ["0", "-1", "x", "", "9223372036854775808", "1.5"] {
        assert!(parse_user_id(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_window_keeps_the_newest_value_of_every_cell() {
    let groceries = Name::intern("groceries").0;
    let travel = Name::intern("travel").0;
    let batch = vec![
        published(
            7,
            vec![
                cell(AggKey::User(1), 1, 100),
                cell(AggKey::Category(1, groceries), 1, 100),
                cell(AggKey::User(2), 3, 900),
            ],
        ),
        published(
            8,
            vec![
                cell(AggKey::User(1), 2, 250),
                cell(AggKey::Category(1, groceries), 0, 0),
                cell(AggKey::Category(1, travel), 2, 250),
            ],
        ),
    ];
    let merged = merge(&batch, Some(1));
    assert_eq!((merged.from_epoch, merged.epoch), (7, 8));
    assert_eq!(merged.changed_users, 2);
    // Newest first.
    let order: Vec<_> = merged
        .changes
        .iter()
        .map(|c| (c.user_id, c.epoch, c.total_minor))
        .collect();
    assert_eq!(order, vec![(1, 8, 250), (2, 7, 900)]);
    let user = merged.user.expect("user 1 changed");
    assert_eq!((user.total_minor, user.expense_count), (Some(250), Some(2)));
    let categories: Vec<_> = user
        .categories
        .iter()
        .map(|c| (c.key.as_str(), c.total_minor, c.removed))
        .collect();
    assert!(categories.contains(&("groceries", 0, true)));
    assert!(categories.contains(&("travel", 250, false)));

    // Another user's page gets the tick but no cells.
    assert!(merge(&batch, Some(3)).user.is_none());
    assert!(merge(&batch, None).user.is_none());
}

#[test]
fn categories_are_summed_over_users() {
    let (model, mut writer) = ReadModel::new();
    let groceries = Name::intern("groceries").0;
    let fuel = Name::intern("fuel").0;
    let change = |key, count, sum| spendflow_operators::CellChange { key, count, sum };
    writer.apply(EpochDelta {
        as_of: AsOf {
            epoch: 1,
            positions: Arc::default(),
            ..AsOf::default()
        },
        cells: vec![
            change(AggKey::User(1), 2, 300),
            change(AggKey::Category(1, groceries), 1, 100),
            change(AggKey::Category(1, fuel), 1, 200),
            change(AggKey::User(2), 1, 50),
            change(AggKey::Category(2, groceries), 1, 50),
        ],
        last_seen: Vec::new(),
        records_covered: 3,
        ..EpochDelta::default()
    });
    let totals = category_totals(&model.snapshot());
    let rows: Vec<_> = totals
        .iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect();
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"key": "fuel", "total_minor": 200, "expense_count": 1, "users": 1}),
            serde_json::json!({"key": "groceries", "total_minor": 150, "expense_count": 2, "users": 2}),
        ]
    );
}

#[test]
fn etags_validate() {
    let mut headers = HeaderMap::new();
    assert!(!etag_matches(&headers, "\"abc\""));
    headers.insert(
        header::IF_NONE_MATCH,
        HeaderValue::from_static("\"x\", W/\"abc\""),
    );
    assert!(etag_matches(&headers, "\"abc\""));
    assert!(!etag_matches(&headers, "\"abd\""));
}

#[test]
fn the_page_loads_nothing_from_elsewhere() {
    for (name, body) in all() {
        for needle in ["http://", "https://", "//cdn", "@import", "url("] {
            // The SVG namespace is a name, not a location: no request is made for it.
            let allowed = body.matches("http://www.w3.org/2000/svg").count();
            let found = body.matches(needle).count();
            let found = if needle == "http://" {
                found - allowed
            } else {
                found
            };
            assert_eq!(found, 0, "{name} contains {needle:?}");
        }
    }
}

#[test]
fn totals_beyond_i64_are_shown_exactly() {
    let (model, mut writer) = ReadModel::new();
    let (fuel, _) = Name::intern("fuel");
    let cells = (1..=3)
        .flat_map(|user| {
            [
                spendflow_operators::CellChange {
                    key: AggKey::User(user),
                    count: 1,
                    sum: i64::MAX,
                },
                spendflow_operators::CellChange {
                    key: AggKey::Category(user, fuel),
                    count: 1,
                    sum: i64::MAX,
                },
            ]
        })
        .collect();
    writer.apply(EpochDelta {
        cells,
        ..EpochDelta::default()
    });
    let totals = category_totals(&model.snapshot());
    let json = serde_json::to_string(&totals).unwrap();
    let exact = (i128::from(i64::MAX) * 3).to_string();
    assert!(json.contains(&format!("\"total_minor\":{exact}")), "{json}");
}

/// An `Admin` with fixed counters, for serving the web report over a bare read model.
struct FixedAdmin;

#[tonic::async_trait]
impl spendflow_proto::v1::admin_server::Admin for FixedAdmin {
    async fn get_status(
        &self,
        _request: tonic::Request<spendflow_proto::v1::GetStatusRequest>,
    ) -> Result<tonic::Response<spendflow_proto::v1::GetStatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(
            spendflow_proto::v1::GetStatusResponse {
                records_read: 4,
                caught_up: true,
                ..Default::default()
            },
        ))
    }

    async fn list_rejected(
        &self,
        _request: tonic::Request<spendflow_proto::v1::ListRejectedRequest>,
    ) -> Result<tonic::Response<spendflow_proto::v1::ListRejectedResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
}

/// `GET path` on `addr`, the whole answer as text (status line, headers, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn a_user_total_beyond_i64_is_shown_exactly_through_the_backend() {
    let (model, mut writer) = ReadModel::new();
    let (fuel, _) = Name::intern("fuel");
    let change = |key, sum| spendflow_operators::CellChange { key, count: 1, sum };
    writer.apply(EpochDelta {
        cells: vec![
            change(AggKey::User(7), i64::MAX),
            change(AggKey::User(7), i64::MAX),
            change(AggKey::Category(7, fuel), i64::MAX),
            change(AggKey::Category(7, fuel), i64::MAX),
            change(AggKey::User(8), 5),
        ],
        ..EpochDelta::default()
    });
    let backend = super::WebBackend::new(
        crate::serve::grpc::ReadModelBackend::new(Arc::clone(&model)),
        FixedAdmin,
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(super::serve(
        listener,
        backend,
        Transport::default(),
        async {
            let _ = stopped.await;
        },
    ));

    let exact = (i128::from(i64::MAX) * 2).to_string();
    let user = http_get(addr, "/api/users/7");
    assert!(user.starts_with("HTTP/1.1 200"), "{user}");
    assert!(
        user.contains(&format!("\"total_minor\":{exact}")),
        "the user's total: {user}"
    );
    assert!(
        user.contains(&format!("{{\"key\":\"fuel\",\"total_minor\":{exact}")),
        "the category: {user}"
    );
    let overview = http_get(addr, "/api/overview");
    assert!(overview.starts_with("HTTP/1.1 200"), "{overview}");
    assert!(
        overview.contains(&format!("\"total_minor\":{exact}")),
        "{overview}"
    );
    assert!(
        overview.contains("\"records_read\":4"),
        "the Admin's counters: {overview}"
    );
    // Rank 1 is user 7, as gRPC ranks (gRPC itself refuses to send the sum).
    let first = overview.find("\"user_id\":7").unwrap();
    let second = overview.find("\"user_id\":8").unwrap();
    assert!(first < second, "{overview}");

    stop.send(()).unwrap();
    runtime.block_on(server).unwrap().unwrap();
}

#[test]
fn an_answer_that_takes_too_long_is_503() {
    let backend = super::WebBackend::new(Hanging, FixedAdmin);
    let (_, never) = tokio::sync::watch::channel(false);
    let app = super::router_stopping(backend, never, std::time::Duration::from_millis(50));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move { axum::serve(listener, app).await });
    for path in ["/api/overview", "/api/users/1"] {
        let answer = http_get(addr, path);
        assert!(answer.starts_with("HTTP/1.1 503"), "{path}: {answer}");
    }
    // What does not read the backend is answered as usual.
    assert!(http_get(addr, "/").starts_with("HTTP/1.1 200"));
}

#[test]
fn a_server_started_on_a_given_runtime_answers_and_stops() {
    let (model, _writer) = ReadModel::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = super::WebServer::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let backend = super::WebBackend::new(
        crate::serve::grpc::ReadModelBackend::new(Arc::clone(&model)),
        FixedAdmin,
    );
    let mut server = super::WebServer::start_on(runtime.handle(), listener, backend).unwrap();
    let overview = http_get(server.addr(), "/api/overview");
    assert!(overview.starts_with("HTTP/1.1 200"), "{overview}");
    assert!(overview.contains("\"users\":0"), "{overview}");
    server.stop();
    assert!(
        std::net::TcpStream::connect(server.addr()).is_err(),
        "the listener is closed once stopped"
    );
}

/// Opens `GET /api/events` from `from` (an address of the loopback network) and returns the
/// connection (kept open: the stream stays open with it) and the status line.
fn open_events(
    runtime: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    from: std::net::IpAddr,
) -> (std::net::TcpStream, String) {
    use std::io::{Read, Write};
    let stream = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::new(from, 0))?;
            socket.connect(addr).await
        })
        .unwrap()
        .into_std()
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    let mut stream = stream;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // Byte by byte: what follows the status line stays in the socket for the caller.
    let mut status = Vec::new();
    let mut byte = [0u8];
    while status.last() != Some(&b'\n') {
        stream.read_exact(&mut byte).unwrap();
        status.push(byte[0]);
    }
    let status = String::from_utf8(status).unwrap();
    (stream, status)
}

#[test]
fn one_client_gets_at_most_its_share_of_the_event_streams() {
    use std::io::Read;

    use super::events::MAX_STREAMS_PER_CLIENT;

    let (model, _writer) = ReadModel::new();
    let backend = super::WebBackend::new(
        crate::serve::grpc::ReadModelBackend::new(Arc::clone(&model)),
        FixedAdmin,
    );
    let (_, never) = tokio::sync::watch::channel(false);
    let app = super::router_stopping(backend, never, std::time::Duration::from_secs(10));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
    });
    let greedy: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let other: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut open = Vec::new();
    for _ in 0..MAX_STREAMS_PER_CLIENT {
        let (stream, status) = open_events(&runtime, addr, greedy);
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        open.push(stream);
    }
    // One more from the same address: 429, with a JSON error naming the share.
    let (mut refused, status) = open_events(&runtime, addr, greedy);
    assert!(status.starts_with("HTTP/1.1 429"), "{status}");
    // (The connection closes after the refusal; the status line was read already.)
    let mut rest = String::new();
    refused.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("application/json"), "{rest}");
    assert!(
        rest.contains(&format!(
            "client 127.0.0.1 has {MAX_STREAMS_PER_CLIENT} live pages"
        )),
        "{rest}"
    );
    // Another client still gets a stream.
    let (_kept, status) = open_events(&runtime, addr, other);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    drop(open);
}

#[test]
fn event_stream_slots_are_counted_overall_and_per_client_and_released() {
    use super::MAX_EVENT_CLIENTS;
    use super::events::{ClientKey, EventClients, MAX_STREAMS_PER_CLIENT, Refused};

    let clients = Arc::new(EventClients::default());
    let ip = |i: usize| ClientKey::Ip(std::net::IpAddr::from([10, 0, (i / 256) as u8, i as u8]));
    let mut first: Vec<_> = (0..MAX_STREAMS_PER_CLIENT)
        .map(|_| clients.acquire(ip(0)).unwrap())
        .collect();
    assert_eq!(clients.acquire(ip(0)).unwrap_err(), Refused::Client(ip(0)));
    first.pop();
    let again = clients
        .acquire(ip(0))
        .expect("a released slot is free again");
    // Everyone else fills the overall cap; then nobody gets one, whatever their address.
    let mut others = Vec::new();
    let mut i = 1;
    while clients.open() < MAX_EVENT_CLIENTS {
        others.push(clients.acquire(ip(i)).unwrap());
        i += 1;
    }
    assert_eq!(clients.acquire(ip(i)).unwrap_err(), Refused::Everyone);
    assert_eq!(
        clients.acquire(ClientKey::Unknown).unwrap_err(),
        Refused::Everyone
    );
    drop(others);
    drop(again);
    // Without an address only the overall cap applies.
    let unknown: Vec<_> = (0..MAX_STREAMS_PER_CLIENT + 1)
        .map(|_| clients.acquire(ClientKey::Unknown).unwrap())
        .collect();
    assert_eq!(
        clients.open(),
        (MAX_STREAMS_PER_CLIENT - 1) + MAX_STREAMS_PER_CLIENT + 1
    );
    drop(unknown);
    drop(first);
    assert_eq!(clients.open(), 0);
}

#[test]
fn requests_past_the_concurrency_limit_get_503_at_once() {
    use std::io::{Read, Write};
    let backend = super::WebBackend::new(Hanging, FixedAdmin);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let transport = Transport {
        limits: crate::config::LimitsConfig {
            max_concurrent_requests: 1,
            ..Default::default()
        },
        ..Transport::default()
    };
    runtime.spawn(super::serve(
        listener,
        backend,
        transport,
        std::future::pending(),
    ));
    let send = |timeout: u64| {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(timeout)))
            .unwrap();
        write!(
            stream,
            "GET /api/users/1 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        stream
    };
    // Requests kept open: once one of them has the one place it keeps it (the backend never
    // answers), and a request after that gets 503 at once. A probe that got the place instead
    // times out, and its connection is closed, which frees the place for the next kept one.
    let mut kept = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let answer = loop {
        kept.push(send(60));
        let mut probe = send(1);
        let mut answer = String::new();
        let _ = probe.read_to_string(&mut answer);
        if !answer.is_empty() {
            break answer;
        }
        assert!(std::time::Instant::now() < deadline, "never refused");
    };
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("requests in progress"), "{answer}");
}

// ---------------------------------------------------------------------------------------------
// Budgets, alerts and the reporting currency
// ---------------------------------------------------------------------------------------------

mod budgets {
    use std::sync::Arc;

    use spendflow_operators::reference::{
        AlertEvent, AlertState, Converted, RateChange, UserRef, UserRow,
    };
    use spendflow_operators::{AggKey, CellChange, Name};

    use super::super::api::{
        AlertJson, BudgetJson, budget_and_alerts, convert_minor, converted_categories,
    };
    use super::super::events::{ChangesJson, add_alerts};
    use super::{FixedAdmin, http_get};
    use crate::serve::read_model::{AsOf, EpochDelta, ReadModel};
    use crate::serve::transport::Transport;

    /// The month bucket of 2026-11.
    const NOV: i32 = 2026 * 12 + 10;

    fn change(key: AggKey, count: i64, sum: i64) -> CellChange {
        CellChange { key, count, sum }
    }

    #[test]
    fn conversion_rounds_half_away_from_zero_in_128_bits() {
        // 1.5 and 2.5 minor units round away from zero, both signs.
        assert_eq!(convert_minor(3, 500_000), Some(2));
        assert_eq!(convert_minor(5, 500_000), Some(3));
        assert_eq!(convert_minor(-3, 500_000), Some(-2));
        assert_eq!(convert_minor(-5, 500_000), Some(-3));
        // Below one half: down, both signs.
        assert_eq!(convert_minor(1, 499_999), Some(0));
        assert_eq!(convert_minor(-1, 499_999), Some(0));
        // 1150 SEK öre at 86 957 micro-EUR per öre: 100 euro cents.
        assert_eq!(convert_minor(1150, 86_957), Some(100));
        // Beyond i64, exact.
        let big = i128::from(i64::MAX) * 4;
        assert_eq!(convert_minor(big, 1_000_000), Some(big));
        assert_eq!(convert_minor(i128::MAX / 2, 1_000_000), None);
    }

    /// A read model with users 1 (EUR), 2 (SEK) and 3 (no rate), groceries for all and fuel
    /// for user 1.
    fn three_currencies() -> Arc<ReadModel> {
        let (model, mut writer) = ReadModel::new();
        let groceries = Name::intern("groceries").0;
        let fuel = Name::intern("fuel").0;
        writer.apply(EpochDelta {
            as_of: AsOf {
                epoch: 1,
                ..AsOf::default()
            },
            cells: vec![
                change(AggKey::User(1), 2, 1_000),
                change(AggKey::Category(1, groceries), 1, 100),
                change(AggKey::Category(1, fuel), 1, 900),
                change(AggKey::User(2), 1, 1_150),
                change(AggKey::Category(2, groceries), 1, 1_150),
                change(AggKey::User(3), 1, 7),
                change(AggKey::Category(3, groceries), 1, 7),
            ],
            ..EpochDelta::default()
        });
        model
    }

    #[test]
    fn category_totals_convert_each_users_totals_at_the_users_rate() {
        let model = three_currencies();
        let snapshot = model.snapshot();
        let currency = |user| match user {
            1 => Some(*b"EUR"),
            2 => Some(*b"SEK"),
            3 => Some(*b"XXX"),
            _ => None,
        };
        let rate = |c: [u8; 3]| match &c {
            b"EUR" => Some(1_000_000),
            b"SEK" => Some(86_957),
            _ => None,
        };
        let (totals, left_out) = converted_categories(&snapshot, currency, rate);
        let rows: Vec<_> = totals
            .iter()
            .map(|c| serde_json::to_value(c).unwrap())
            .collect();
        // Groceries: 100 EUR cents + 1150 öre (100 EUR cents); user 3 has no rate and is left
        // out (the mixed sum would have been 1257).
        assert_eq!(
            rows,
            vec![
                serde_json::json!({"key": "fuel", "total_minor": 900, "expense_count": 1, "users": 1}),
                serde_json::json!({"key": "groceries", "total_minor": 200, "expense_count": 2, "users": 2}),
            ]
        );
        assert_eq!(left_out, 1);
    }

    /// Serves the web report over `model` (with its live events), answers `GET path`s.
    fn serve(model: &Arc<ReadModel>, paths: &[&str]) -> Vec<serde_json::Value> {
        let mut backend = super::super::WebBackend::new(
            crate::serve::grpc::ReadModelBackend::new(Arc::clone(model)),
            FixedAdmin,
        );
        backend.live = Some(Arc::clone(model));
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = runtime.spawn(super::super::serve(
            listener,
            backend,
            Transport::default(),
            async {
                let _ = stopped.await;
            },
        ));
        let answers = paths
            .iter()
            .map(|path| {
                let answer = http_get(addr, path);
                assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
                let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
                // A chunked body has its length first; the JSON is the one line with a brace.
                let json = body
                    .lines()
                    .find(|l| l.starts_with('{'))
                    .unwrap_or_else(|| panic!("{answer}"));
                serde_json::from_str(json).unwrap()
            })
            .collect();
        stop.send(()).unwrap();
        runtime.block_on(server).unwrap().unwrap();
        answers
    }

    #[test]
    fn without_a_reporting_currency_the_overview_says_the_categories_mix_currencies() {
        let model = three_currencies();
        let answers = serve(&model, &["/api/overview", "/api/users/1"]);
        let overview = &answers[0];
        assert_eq!(overview["reporting_currency"], serde_json::Value::Null);
        assert_eq!(overview["ranking"], "minor_units");
        assert_eq!(overview["categories_currency"], serde_json::Value::Null);
        let note = overview["categories_note"].as_str().unwrap();
        assert!(note.contains("mixed currencies"), "{note}");
        assert!(note.contains("--reporting-currency"), "{note}");
        // The mixed sum, as gRPC answers it.
        assert_eq!(overview["categories"][0]["key"], "groceries");
        assert_eq!(overview["categories"][0]["total_minor"], 1_257);
        // No alert fired: the read model has alert states, none of them fired.
        assert_eq!(
            overview["alerts"],
            serde_json::json!({"available": true, "as_of": {"epoch": 1}, "over_budget_users": 0,
                               "alerted_users": 0, "over_budget": []})
        );
        assert!(overview["top_spenders"][0].get("converted_minor").is_none());
        let user = &answers[1];
        assert_eq!(user["alerts_available"], true);
        assert_eq!(user["alerts"], serde_json::json!([]));
        assert_eq!(user["budget"], serde_json::Value::Null);
        assert_eq!(user["converted_minor"], serde_json::Value::Null);
    }

    #[test]
    fn with_a_reporting_currency_but_no_rates_yet_the_overview_ranks_and_sums_minor_units() {
        let (model, mut writer) = ReadModel::new();
        writer.set_reporting_currency(Some(*b"EUR"));
        let groceries = Name::intern("groceries").0;
        writer.apply(EpochDelta {
            as_of: AsOf {
                epoch: 1,
                ..AsOf::default()
            },
            cells: vec![
                change(AggKey::User(1), 1, 500),
                change(AggKey::Category(1, groceries), 1, 500),
            ],
            ..EpochDelta::default()
        });
        let overview = &serve(&model, &["/api/overview"])[0];
        assert_eq!(overview["reporting_currency"], "EUR");
        assert_eq!(overview["ranking"], "minor_units");
        assert_eq!(overview["top_spenders"][0]["user_id"], 1);
        assert_eq!(overview["categories_currency"], serde_json::Value::Null);
        assert_eq!(overview["categories"][0]["total_minor"], 500);
        let note = overview["categories_note"].as_str().unwrap();
        assert!(
            note.contains("no user's currency has an exchange rate"),
            "{note}"
        );
    }

    #[test]
    fn with_a_reporting_currency_the_overview_ranks_and_sums_converted_totals() {
        let (model, mut writer) = ReadModel::new();
        writer.set_reporting_currency(Some(*b"EUR"));
        let groceries = Name::intern("groceries").0;
        let fuel = Name::intern("fuel").0;
        let row = |user_id, currency| UserRef {
            user_id,
            row: Some(UserRow {
                budget_minor: None,
                currency,
            }),
        };
        writer.apply(EpochDelta {
            as_of: AsOf {
                epoch: 1,
                ..AsOf::default()
            },
            cells: vec![
                change(AggKey::User(1), 2, 1_000),
                change(AggKey::Category(1, groceries), 1, 100),
                change(AggKey::Category(1, fuel), 1, 900),
                change(AggKey::User(2), 1, 1_150),
                change(AggKey::Category(2, groceries), 1, 1_150),
                change(AggKey::User(3), 1, 7),
                change(AggKey::Category(3, groceries), 1, 7),
            ],
            users: vec![row(1, *b"EUR"), row(2, *b"SEK"), row(3, *b"XXX")],
            rates: vec![RateChange {
                currency: *b"SEK",
                rate_micros: Some(86_957),
            }],
            converted: vec![
                Converted {
                    user_id: 1,
                    total_minor: Some(1_000),
                },
                Converted {
                    user_id: 2,
                    total_minor: Some(100),
                },
            ],
            ..EpochDelta::default()
        });
        let answers = serve(&model, &["/api/overview", "/api/users/2"]);
        let overview = &answers[0];
        assert_eq!(overview["reporting_currency"], "EUR");
        assert_eq!(overview["ranking"], "converted");
        let top: Vec<_> = overview["top_spenders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["user_id"].as_u64().unwrap(),
                    s["converted_minor"].as_i64().unwrap(),
                    s["total_minor"].as_i64().unwrap(),
                    s["currency"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        // User 3's currency has no rate: not in the converted ranking.
        assert_eq!(
            top,
            vec![
                (1, 1_000, 1_000, "EUR".into()),
                (2, 100, 1_150, "SEK".into())
            ]
        );
        assert_eq!(overview["categories_currency"], "EUR");
        assert_eq!(overview["categories_unconverted_users"], 1);
        assert_eq!(
            overview["categories"],
            serde_json::json!([
                {"key": "fuel", "total_minor": 900, "expense_count": 1, "users": 1},
                {"key": "groceries", "total_minor": 200, "expense_count": 2, "users": 2},
            ])
        );
        let note = overview["categories_note"].as_str().unwrap();
        assert!(note.starts_with("in EUR"), "{note}");
        assert!(note.contains("1 users left out"), "{note}");
        let user = &answers[1];
        assert_eq!(user["reporting_currency"], "EUR");
        assert_eq!(user["converted_minor"], 100);
        // No budget in the row: no meter.
        assert_eq!(user["budget"], serde_json::Value::Null);
    }

    /// Users 7 (EUR, budget 1000, spent 1200 in 2026-11: both alerts) and 8 (SEK, budget 10 000,
    /// spent 8 500: the 80 % alert), and their alert events, through the read model's writer.
    ///
    fn alerted() -> Arc<ReadModel> {
        let (model, mut writer) = ReadModel::new();
        let fuel = Name::intern("fuel").0;
        let alert = |user_id, threshold_pct, spent_minor, budget_minor, currency| AlertEvent {
            user_id,
            month: NOV,
            threshold_pct,
            state: AlertState::Fired,
            spent_minor,
            budget_minor,
            currency,
        };
        writer.apply(EpochDelta {
            as_of: AsOf {
                epoch: 3,
                ..AsOf::default()
            },
            cells: vec![
                change(AggKey::User(7), 2, 1_200),
                change(AggKey::Category(7, fuel), 2, 1_200),
                change(AggKey::Month(7, NOV - 1), 1, 0),
                change(AggKey::Month(7, NOV), 1, 1_200),
                change(AggKey::User(8), 1, 8_500),
                change(AggKey::Category(8, fuel), 1, 8_500),
                change(AggKey::Month(8, NOV), 1, 8_500),
            ],
            users: vec![
                UserRef {
                    user_id: 7,
                    row: Some(UserRow {
                        budget_minor: Some(1_000),
                        currency: *b"EUR",
                    }),
                },
                UserRef {
                    user_id: 8,
                    row: Some(UserRow {
                        budget_minor: Some(10_000),
                        currency: *b"SEK",
                    }),
                },
            ],
            alerts: vec![
                (2, alert(7, 80, 900, 1_000, *b"EUR")),
                (3, alert(7, 100, 1_200, 1_000, *b"EUR")),
                (3, alert(8, 80, 8_500, 10_000, *b"SEK")),
            ],
            rates: vec![RateChange {
                currency: *b"SEK",
                rate_micros: Some(86_957),
            }],
            ..EpochDelta::default()
        });
        model
    }

    #[test]
    fn users_over_budget_are_listed_newest_first_then_furthest_over() {
        let (model, mut writer) = ReadModel::new();
        let over = |user_id, spent_minor, budget_minor| AlertEvent {
            user_id,
            month: NOV,
            threshold_pct: 100,
            state: AlertState::Fired,
            spent_minor,
            budget_minor,
            currency: *b"EUR",
        };
        writer.apply(EpochDelta {
            as_of: AsOf {
                epoch: 4,
                ..AsOf::default()
            },
            // User 1 fired first; users 2 and 3 at epoch 4, user 3 further over (300 %). The
            // read model shows the spend and budget as they are now: the month cells and rows.
            cells: vec![
                change(AggKey::User(1), 1, 5_000),
                change(AggKey::Month(1, NOV), 1, 5_000),
                change(AggKey::User(2), 1, 150),
                change(AggKey::Month(2, NOV), 1, 150),
                change(AggKey::User(3), 1, 300),
                change(AggKey::Month(3, NOV), 1, 300),
            ],
            users: (1..=3)
                .map(|user_id| UserRef {
                    user_id,
                    row: Some(UserRow {
                        budget_minor: Some(100),
                        currency: *b"EUR",
                    }),
                })
                .collect(),
            alerts: vec![
                (1, over(1, 5_000, 100)),
                (4, over(2, 150, 100)),
                (4, over(3, 300, 100)),
            ],
            ..EpochDelta::default()
        });
        let answers = serve(&model, &["/api/overview"]);
        let order: Vec<_> = answers[0]["alerts"]["over_budget"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["user_id"].as_u64().unwrap())
            .collect();
        assert_eq!(order, vec![3, 2, 1]);
        assert_eq!(answers[0]["alerts"]["over_budget_users"], 3);
    }

    #[test]
    fn the_budget_meter_and_alerts_of_a_user_come_from_the_read_model() {
        let model = alerted();
        let snapshot = model.snapshot();
        let (budget, alerts) = budget_and_alerts(&snapshot, 7);
        assert_eq!(
            budget,
            Some(BudgetJson {
                monthly_budget_minor: 1_000,
                currency: "EUR".into(),
                month: Some("2026-11".into()),
                month_to_date_minor: 1_200,
                percent: 120,
                thresholds_pct: [80, 100],
            })
        );
        let thresholds: Vec<_> = alerts.iter().map(|a| a.threshold_pct).collect();
        assert_eq!(thresholds, vec![80, 100]);
        let (budget, alerts) = budget_and_alerts(&snapshot, 8);
        assert_eq!(budget.unwrap().percent, 85);
        assert_eq!(alerts.len(), 1);
        // No reference row: no meter.
        assert_eq!(budget_and_alerts(&snapshot, 9), (None, Vec::new()));
    }

    #[test]
    fn the_overview_lists_users_over_budget_and_the_events_carry_the_alert_state() {
        let model = alerted();
        let answers = serve(&model, &["/api/overview", "/api/users/7"]);
        let alerts = &answers[0]["alerts"];
        assert_eq!(alerts["over_budget_users"], 1);
        assert_eq!(alerts["alerted_users"], 2);
        assert_eq!(
            alerts["over_budget"],
            serde_json::json!([{"user_id": 7, "month": "2026-11", "threshold_pct": 100,
                                "spent_minor": 1_200, "budget_minor": 1_000, "currency": "EUR",
                                "since_epoch": 3}])
        );
        let user = &answers[1];
        assert_eq!(user["budget"]["percent"], 120);
        assert_eq!(user["alerts"].as_array().unwrap().len(), 2);

        let mut payload = ChangesJson::default();
        add_alerts(&mut payload, &model.snapshot(), Some(8));
        assert_eq!((payload.over_budget_users, payload.alerted_users), (1, 2));
        assert_eq!(payload.user_budget_minor, Some(10_000));
        assert_eq!(
            payload.user_alerts,
            Some(vec![AlertJson {
                user_id: 8,
                name: None,
                month: "2026-11".into(),
                threshold_pct: 80,
                spent_minor: 8_500,
                budget_minor: 10_000,
                currency: "SEK".into(),
                since_epoch: 3,
            }])
        );
    }
}
