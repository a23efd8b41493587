//! Token auth through the real `spendflow` binary: every status the issue names on gRPC
//! (`UNAUTHENTICATED`, `PERMISSION_DENIED` naming the scope, `RESOURCE_EXHAUSTED` for the
//! per-token stream cap) and on HTTP (401, 403, the sign-in cookie), tokens minted by
//! `spendflow token`, and the refusal to serve without auth on a non-loopback address.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::alerts_client::AlertsClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use spendflow_proto::v1::personnel_client::PersonnelClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::web::{EventStream, request};

pub const SECRET: &str = "auth-test-secret-0123456789abcdef-0123456789";

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A token from `spendflow token` (the binary), signed with the secret in `secret_file`.
pub fn mint(secret_file: &Path, sub: Option<&str>, scope: &str, ttl: &str) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spendflow"));
    command
        .arg("token")
        .arg("--jwt-secret-file")
        .arg(secret_file)
        .args(["--scope", scope, "--ttl", ttl]);
    if let Some(sub) = sub {
        command.args(["--sub", sub]);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "spendflow token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// An HS256 token signed with `secret` whose `exp` is an hour ago.
fn expired(secret: &str, scope: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "1", "scope": scope, "exp": now - 3600, "iat": now - 7200}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// The input: users 1, 2 and 3 with expenses.
pub fn input_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for i in 0..30 {
        let user = i % 3 + 1;
        writeln!(
            file,
            r#"{{"expense_id":"e-{i}","user_id":{user},"merchant":"Tesco","category":"groceries","amount_minor":{},"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}}"#,
            100 + i
        )
        .unwrap();
    }
    file.flush().unwrap();
    file
}

/// `spendflow run` over `input` with gRPC and web on `grpc`/`web` and `extra` flags.
pub struct Engine {
    pub child: Child,
    pub grpc: SocketAddr,
    pub web: SocketAddr,
}

impl Engine {
    pub fn start(input: &Path, extra: &[&std::ffi::OsStr]) -> Engine {
        let (grpc, web) = (free_addr(), free_addr());
        let child = Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["run", "--input"])
            .arg(format!("file:{}", input.display()))
            .args(["--grpc", &grpc.to_string(), "--web", &web.to_string()])
            .args(["--log", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Engine { child, grpc, web }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn summary(user: u64) -> pb::GetUserSummaryRequest {
    pb::GetUserSummaryRequest {
        user_id: user,
        consistency: None,
    }
}

fn subscribe(users: &[u64]) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        user_ids: users.to_vec(),
        ..Default::default()
    }
}

/// Asserts `result` failed with `code` and a message containing `needle`.
fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{needle:?} not in {:?}",
        status.message()
    );
}

async fn channel(addr: SocketAddr) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return channel;
        }
        assert!(Instant::now() < deadline, "gRPC did not come up on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (with an admin token) until the engine has read the whole input.
async fn wait_caught_up(channel: &Channel, admin_token: &str) {
    let mut admin = AdminClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = admin
            .get_status(with_token(pb::GetStatusRequest {}, Some(admin_token)))
            .await
            .unwrap()
            .into_inner();
        if status.caught_up && status.records_read == 30 {
            return;
        }
        assert!(Instant::now() < deadline, "not caught up: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn grpc_statuses_follow_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let other_secret = dir.path().join("other");
    std::fs::write(&other_secret, "another-secret-of-enough-length-0123456789").unwrap();
    let input = input_file();
    let engine = Engine::start(
        input.path(),
        &["--jwt-secret-file".as_ref(), secret.as_os_str()],
    );

    let admin = mint(&secret, None, "admin", "1h");
    let reader = mint(&secret, None, "expenses:read", "1h");
    let me = mint(
        &secret,
        Some("1"),
        "expenses:read:self personnel:read personnel:write",
        "1h",
    );
    let forged = mint(&other_secret, None, "expenses:read admin", "1h");
    let old = expired(SECRET, "expenses:read admin");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let channel = runtime.block_on(channel(engine.grpc));
    // Health and reflection stay open.
    crate::support::grpc::assert_reflection_lists_services(&runtime, &channel);
    let services = crate::support::grpc::reflected_services(&runtime, &channel);
    assert!(
        services.iter().any(|s| s == "spendflow.v1.Alerts"),
        "{services:?}"
    );
    runtime.block_on(async {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "spendflow.v1.ExpenseQuery".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            serving.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "spendflow.v1.Alerts".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            serving.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        wait_caught_up(&channel, &admin).await;
        let mut query = ExpenseQueryClient::new(channel.clone());
        let mut admin_client = AdminClient::new(channel.clone());
        let mut personnel = PersonnelClient::new(channel.clone());

        // Not authenticated: no token, expired, badly signed, not a bearer token.
        assert_status(
            query.get_user_summary(with_token(summary(1), None)).await,
            Code::Unauthenticated,
            "no token",
        );
        assert_status(
            query
                .get_user_summary(with_token(summary(1), Some(&old)))
                .await,
            Code::Unauthenticated,
            "expired",
        );
        assert_status(
            query
                .get_user_summary(with_token(summary(1), Some(&forged)))
                .await,
            Code::Unauthenticated,
            "signature",
        );
        assert_status(
            admin_client
                .get_status(with_token(pb::GetStatusRequest {}, Some(&forged)))
                .await,
            Code::Unauthenticated,
            "signature",
        );

        // A self token: its own user, nobody else, nothing across users.
        let own = query
            .get_user_summary(with_token(summary(1), Some(&me)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(own.summary.unwrap().user_id, 1);
        assert_status(
            query
                .get_user_summary(with_token(summary(2), Some(&me)))
                .await,
            Code::PermissionDenied,
            "expenses:read",
        );
        assert_status(
            query
                .get_user_windows(with_token(
                    pb::GetUserWindowsRequest {
                        user_id: 2,
                        granularity: pb::Granularity::Month.into(),
                        from: "2026-01".into(),
                        to: "2026-12".into(),
                        consistency: None,
                    },
                    Some(&me),
                ))
                .await,
            Code::PermissionDenied,
            "expenses:read",
        );
        assert_status(
            query
                .top_spenders(with_token(
                    pb::TopSpendersRequest {
                        limit: 3,
                        consistency: None,
                    },
                    Some(&me),
                ))
                .await,
            Code::PermissionDenied,
            "TopSpenders needs the scope expenses:read",
        );
        assert_status(
            query
                .list_user_summaries(with_token(
                    pb::ListUserSummariesRequest::default(),
                    Some(&me),
                ))
                .await,
            Code::PermissionDenied,
            "ListUserSummaries needs the scope expenses:read",
        );
        assert_status(
            query.subscribe(with_token(subscribe(&[]), Some(&me))).await,
            Code::PermissionDenied,
            "expenses:read",
        );
        assert_status(
            query
                .subscribe(with_token(subscribe(&[1, 2]), Some(&me)))
                .await,
            Code::PermissionDenied,
            "user 2",
        );
        let mut own_stream = query
            .subscribe(with_token(subscribe(&[1]), Some(&me)))
            .await
            .unwrap()
            .into_inner();
        assert!(own_stream.message().await.unwrap().is_some());
        drop(own_stream);

        // Alerts: the same rules. (This engine has no reference data, so no alerts: the
        // statuses are what is checked.)
        let mut alerts = AlertsClient::new(channel.clone());
        let list = |user_id| pb::ListAlertsRequest {
            user_id,
            ..Default::default()
        };
        let subscribe_alerts = |user_id| pb::SubscribeAlertsRequest {
            user_id,
            ..Default::default()
        };
        assert_status(
            alerts.list_alerts(with_token(list(1), None)).await,
            Code::Unauthenticated,
            "no token",
        );
        assert_status(
            alerts.list_alerts(with_token(list(2), Some(&me))).await,
            Code::PermissionDenied,
            "expenses:read",
        );
        assert_status(
            alerts.list_alerts(with_token(list(0), Some(&me))).await,
            Code::PermissionDenied,
            "ListAlerts of every user (user_id 0) needs the scope expenses:read",
        );
        assert_status(
            alerts
                .subscribe(with_token(subscribe_alerts(2), Some(&me)))
                .await,
            Code::PermissionDenied,
            "expenses:read",
        );
        assert_status(
            alerts
                .subscribe(with_token(subscribe_alerts(0), Some(&me)))
                .await,
            Code::PermissionDenied,
            "expenses:read",
        );
        assert_status(
            alerts
                .subscribe(with_token(subscribe_alerts(1), None))
                .await,
            Code::Unauthenticated,
            "no token",
        );
        assert_status(
            alerts
                .list_alerts(with_token(
                    pb::ListAlertsRequest {
                        page_token: "not-a-token".into(),
                        ..list(0)
                    },
                    Some(&reader),
                ))
                .await,
            Code::InvalidArgument,
            "page_token",
        );
        let own = alerts
            .list_alerts(with_token(list(1), Some(&me)))
            .await
            .unwrap()
            .into_inner();
        assert!(own.alerts.is_empty() && own.as_of.is_some(), "{own:?}");
        let every = alerts
            .list_alerts(with_token(list(0), Some(&reader)))
            .await
            .unwrap()
            .into_inner();
        assert!(every.alerts.is_empty(), "{every:?}");
        let mut own_alerts = alerts
            .subscribe(with_token(subscribe_alerts(1), Some(&me)))
            .await
            .unwrap()
            .into_inner();
        let first = own_alerts.message().await.unwrap().unwrap();
        assert!(
            matches!(
                first.event,
                Some(pb::subscribe_alerts_response::Event::Snapshot(ref s)) if s.last
            ),
            "{first:?}"
        );
        drop(own_alerts);

        // Admin needs `admin`; a reader has every user but no admin.
        assert_status(
            admin_client
                .get_status(with_token(pb::GetStatusRequest {}, Some(&reader)))
                .await,
            Code::PermissionDenied,
            "the scope admin",
        );
        assert_status(
            admin_client
                .list_rejected(with_token(pb::ListRejectedRequest { limit: 1 }, Some(&me)))
                .await,
            Code::PermissionDenied,
            "the scope admin",
        );
        let top = query
            .top_spenders(with_token(
                pb::TopSpendersRequest {
                    limit: 3,
                    consistency: None,
                },
                Some(&reader),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(top.spenders.len(), 3);
        assert_status(
            query
                .top_spenders(with_token(
                    pb::TopSpendersRequest {
                        limit: 3,
                        consistency: None,
                    },
                    Some(&admin),
                ))
                .await,
            Code::PermissionDenied,
            "expenses:read",
        );

        // Personnel: the self token may touch only its own user's picture. (This engine has no
        // personnel store: a permitted call gets as far as saying so.)
        assert_status(
            personnel
                .delete_image(with_token(pb::DeleteImageRequest { user_id: 2 }, Some(&me)))
                .await,
            Code::PermissionDenied,
            "only for its own user (1)",
        );
        assert_status(
            personnel
                .get_user(with_token(pb::GetUserRequest { user_id: 2 }, Some(&me)))
                .await,
            Code::PermissionDenied,
            "personnel:read",
        );
        assert_status(
            personnel
                .delete_image(with_token(pb::DeleteImageRequest { user_id: 1 }, Some(&me)))
                .await,
            Code::FailedPrecondition,
            "no user directory",
        );
        assert_status(
            personnel
                .get_user(with_token(pb::GetUserRequest { user_id: 1 }, Some(&reader)))
                .await,
            Code::PermissionDenied,
            "personnel:read",
        );
        assert_status(
            personnel
                .delete_image(with_token(pb::DeleteImageRequest { user_id: 1 }, None))
                .await,
            Code::Unauthenticated,
            "no token",
        );

        // One token holds at most 16 streams; another token is counted apart; a closed
        // stream frees its place.
        let mut streams = Vec::new();
        for _ in 0..16 {
            streams.push(
                query
                    .subscribe(with_token(subscribe(&[]), Some(&reader)))
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
        assert_status(
            query
                .subscribe(with_token(subscribe(&[]), Some(&reader)))
                .await,
            Code::ResourceExhausted,
            "16 streams",
        );
        // Alert streams count against the same per-token cap.
        assert_status(
            alerts
                .subscribe(with_token(subscribe_alerts(0), Some(&reader)))
                .await,
            Code::ResourceExhausted,
            "16 streams",
        );
        let other_reader = mint(&secret, Some("99"), "expenses:read", "2h");
        let _other = query
            .subscribe(with_token(subscribe(&[]), Some(&other_reader)))
            .await
            .unwrap();
        drop(streams.pop());
        // The server sees the stream's end asynchronously: retry until its place is free.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match query
                .subscribe(with_token(subscribe(&[]), Some(&reader)))
                .await
            {
                Ok(_) => break,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    assert!(
                        Instant::now() < deadline,
                        "the closed stream was never released"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    });
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn header<'a>(response: &'a crate::web::Response, name: &str) -> Option<&'a str> {
    response.header(name)
}

#[test]
fn http_statuses_follow_the_token_and_the_sign_in_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let input = input_file();
    let engine = Engine::start(
        input.path(),
        &["--jwt-secret-file".as_ref(), secret.as_os_str()],
    );
    let me = mint(&secret, Some("1"), "expenses:read:self", "30m");
    let reader = mint(&secret, None, "expenses:read", "1h");
    let old = expired(SECRET, "expenses:read");
    let web = engine.web;
    // Wait for the web server (and the data) with the reader's token.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(web).is_ok() {
            let user = request(
                web,
                "GET",
                "/api/users/3",
                &[("Authorization", &bearer(&reader))],
                None,
            );
            if user.status == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the web report did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let get = |path: &str, headers: &[(&str, &str)]| request(web, "GET", path, headers, None);

    // 401 with a JSON error: no token, expired, badly formed.
    for headers in [
        vec![],
        vec![("Authorization", bearer(&old))],
        vec![("Authorization", "Basic dXNlcjpwYXNz".to_string())],
        vec![("Cookie", format!("spendflow_token={old}"))],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        for path in [
            "/api/overview",
            "/api/users/1",
            "/api/events?user=1",
            "/metrics",
        ] {
            let answer = get(path, &headers);
            assert_eq!(answer.status, 401, "{path} {headers:?}");
            assert!(answer.json()["error"].as_str().is_some(), "{path}");
            assert_eq!(header(&answer, "www-authenticate"), Some("Bearer"));
        }
    }
    let expired_cookie = get(
        "/api/overview",
        &[("Cookie", &format!("spendflow_token={old}"))],
    );
    assert!(
        expired_cookie.json()["error"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{:?}",
        expired_cookie.text()
    );
    // Pages redirect to the sign-in page, which is open, with its style sheet.
    for path in ["/", "/users/1"] {
        let page = get(path, &[]);
        assert_eq!(page.status, 303, "{path}");
        assert_eq!(header(&page, "location"), Some("/signin"));
    }
    let signin = get("/signin", &[]);
    assert_eq!(signin.status, 200);
    assert!(signin.text().contains("name=\"token\""));
    assert_eq!(get("/assets/style.css", &[]).status, 200);

    // A self token: its own user only.
    let auth = bearer(&me);
    let mine = [("Authorization", auth.as_str())];
    assert_eq!(get("/api/users/1", &mine).status, 200);
    for path in ["/api/users/2", "/api/users/2/image", "/api/events?user=2"] {
        let denied = get(path, &mine);
        assert_eq!(denied.status, 403, "{path}");
        assert!(
            denied.json()["error"]
                .as_str()
                .unwrap()
                .contains("expenses:read"),
            "{path}: {}",
            denied.text()
        );
    }
    for path in ["/api/overview", "/api/events"] {
        let denied = get(path, &mine);
        assert_eq!(denied.status, 403, "{path}");
        assert!(
            denied.text().contains("needs the scope expenses:read"),
            "{path}"
        );
    }
    let overview_page = get("/", &mine);
    assert_eq!(overview_page.status, 303);
    assert_eq!(header(&overview_page, "location"), Some("/users/1"));
    let metrics = get("/metrics", &mine);
    assert_eq!(metrics.status, 403);
    assert!(metrics.text().contains("the scope admin"));
    let mut own_events = EventStream::open_with(
        web,
        "/api/events?user=1",
        &[("Authorization", auth.as_str())],
    );
    assert_eq!(own_events.status, 200);
    assert_eq!(own_events.next().event, "hello");
    drop(own_events);

    // A reader sees everything but /metrics.
    let auth = bearer(&reader);
    let all = [("Authorization", auth.as_str())];
    assert_eq!(get("/api/overview", &all).status, 200);
    assert_eq!(get("/api/users/2", &all).status, 200);
    assert_eq!(get("/", &all).status, 200);
    assert_eq!(get("/metrics", &all).status, 403);

    // Sign in: the cookie is HttpOnly, Secure, SameSite=Strict, for the whole site, and lives
    // no longer than the token (30 minutes).
    let form = format!("token={me}");
    let signed_in = request(
        web,
        "POST",
        "/signin",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", &format!("http://{web}")),
        ],
        Some(form.as_bytes()),
    );
    assert_eq!(signed_in.status, 303, "{}", signed_in.text());
    assert_eq!(header(&signed_in, "location"), Some("/users/1"));
    let cookie = header(&signed_in, "set-cookie").unwrap().to_string();
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    let max_age: u64 = cookie
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1_700..=1_800).contains(&max_age), "{cookie}");
    let value = cookie.split(';').next().unwrap().to_string();
    assert_eq!(value, format!("spendflow_token={me}"));
    let with_cookie = [("Cookie", value.as_str())];
    assert_eq!(get("/api/users/1", &with_cookie).status, 200);
    assert_eq!(get("/api/users/2", &with_cookie).status, 403);
    assert_eq!(get("/users/1", &with_cookie).status, 200);

    // A bad token is refused on the form, and a cross-site post too.
    let refused = request(
        web,
        "POST",
        "/signin",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(format!("token={old}").as_bytes()),
    );
    assert_eq!(refused.status, 401);
    assert!(refused.text().contains("expired"));
    assert!(header(&refused, "set-cookie").is_none());
    let cross_site = request(
        web,
        "POST",
        "/signin",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", "https://evil.example"),
        ],
        Some(form.as_bytes()),
    );
    assert_eq!(cross_site.status, 403);
    assert!(header(&cross_site, "set-cookie").is_none());

    // Sign out clears the cookie.
    let signed_out = request(web, "POST", "/signout", &with_cookie, Some(b""));
    assert_eq!(signed_out.status, 303);
    assert!(
        header(&signed_out, "set-cookie")
            .unwrap()
            .contains("Max-Age=0")
    );
}

/// `spendflow run` over `input` with `args`, which must exit (within 30 s) with an error.
fn refused(input: &Path, args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["run", "--input"])
        .arg(format!("file:{}", input.display()))
        .args(["--log", "warn"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`spendflow run {args:?}` started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "{args:?} exited with success");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn without_auth_only_loopback_is_served() {
    let input = input_file();
    let dir = tempfile::tempdir().unwrap();

    for args in [
        vec!["--grpc", "0.0.0.0:0"],
        vec!["--grpc", "127.0.0.1:0", "--web", "0.0.0.0:0"],
    ] {
        let stderr = refused(input.path(), &args);
        assert!(
            stderr.contains("refusing to serve on 0.0.0.0:0 without auth"),
            "{stderr}"
        );
        assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
        assert!(stderr.contains("--jwt-secret-file"), "{stderr}");
    }

    // A bad key is an error at start.
    let short = dir.path().join("short");
    std::fs::write(&short, "too short").unwrap();
    let short_arg = short.to_string_lossy().to_string();
    let stderr = refused(
        input.path(),
        &["--grpc", "127.0.0.1:0", "--jwt-secret-file", &short_arg],
    );
    assert!(stderr.contains("at least 32"), "{stderr}");
    let not_a_key = dir.path().join("key.pem");
    std::fs::write(
        &not_a_key,
        "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let key_arg = not_a_key.to_string_lossy().to_string();
    let stderr = refused(
        input.path(),
        &["--grpc", "127.0.0.1:0", "--jwt-public-key", &key_arg],
    );
    assert!(
        stderr.contains("RS256") && stderr.contains(&key_arg),
        "{stderr}"
    );

    // With --insecure-no-auth it serves on every address.
    let port = free_addr().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["run", "--input"])
        .arg(format!("file:{}", input.path().display()))
        .args(["--log", "warn", "--insecure-no-auth", "--grpc"])
        .arg(format!("0.0.0.0:{port}"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answered = runtime.block_on(async {
        let channel = channel(SocketAddr::from(([127, 0, 0, 1], port))).await;
        ExpenseQueryClient::new(channel)
            .top_spenders(pb::TopSpendersRequest {
                limit: 1,
                consistency: None,
            })
            .await
    });
    let _ = child.kill();
    let _ = child.wait();
    answered.unwrap();
}

#[test]
fn the_token_command_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let token = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .arg("token")
            .arg("--jwt-secret-file")
            .arg(&secret)
            .args(args)
            .output()
            .unwrap()
    };
    for (args, needle) in [
        (
            &["--scope", "expenses:write"][..],
            "\"expenses:write\" is not a scope",
        ),
        (&["--scope", "expenses:read:self"][..], "needs --sub"),
        (
            &["--scope", "expenses:read:self", "--sub", "alice"][..],
            "needs --sub",
        ),
        (&["--scope", "admin", "--ttl", "soon"][..], "soon"),
    ] {
        let output = token(args);
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let output = token(&[
        "--scope",
        "expenses:read:self personnel:read",
        "--sub",
        "42",
        "--ttl",
        "1h",
    ]);
    assert!(output.status.success());
    let jwt = String::from_utf8(output.stdout).unwrap();
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(jwt.trim());
    let claims = claims.unwrap().claims;
    assert_eq!(claims["sub"], "42");
    assert_eq!(claims["scope"], "expenses:read:self personnel:read");
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 3600);
}
