//! The transport through the real binary: TLS on gRPC (grpcurl with `-cacert`) and on the web
//! report (curl with `--cacert`), mTLS refusing clients without a certificate, the web
//! server's `Host` allow-list, oversized gRPC messages answered `RESOURCE_EXHAUSTED`, and idle
//! connections past the cap that neither take gRPC down nor stay open.
//!
//! Certificates are made per test by `docker/dev-certs.sh` (openssl) in a temporary directory.
//! grpcurl comes from `make tools` (target/tools/bin, or `SPENDFLOW_TOOLS_DIR`/bin, or PATH).

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Development certificates (CA, server for 127.0.0.1/localhost, client) in a fresh directory.
pub(crate) fn certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .arg(repo().join("docker/dev-certs.sh"))
        .arg(dir.path())
        // No tokens here: auth is not what these tests are about.
        .env("SPENDFLOW_BIN", "/nonexistent")
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run docker/dev-certs.sh");
    assert!(
        output.status.success(),
        "dev-certs.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for file in ["ca.pem", "server.pem", "server-key.pem", "client.pem"] {
        assert!(dir.path().join(file).is_file(), "{file} made");
    }
    dir
}

/// grpcurl, installed by `make tools`; the test fails with instructions without it.
pub(crate) fn grpcurl() -> PathBuf {
    let tools = std::env::var_os("SPENDFLOW_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/tools"));
    let installed = tools.join("bin/grpcurl");
    if installed.is_file() {
        return installed;
    }
    if let Ok(found) = Command::new("sh")
        .args(["-c", "command -v grpcurl"])
        .output()
        && found.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());
    }
    panic!("grpcurl is not installed: run `make tools` (it installs into target/tools/bin)");
}

/// A running `spendflow demo` with its gRPC and web addresses; killed when dropped.
struct Demo {
    child: Child,
    grpc: SocketAddr,
    web: SocketAddr,
    banner: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the demo with `args` added and reads the addresses from its banner.
fn demo(args: &[&str]) -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["demo", "--users", "20", "--rate", "200", "--log", "warn"])
        .args(["--grpc", "127.0.0.1:0", "--web", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut grpc, mut web, mut banner) = (None, None, String::new());
    for line in stdout.lines() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if let Some((_, addr)) = line.split_once("gRPC on ") {
            grpc = addr.trim().parse().ok();
        }
        if let Some(rest) = line.strip_prefix("Live web report: ") {
            let addr = rest
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            web = addr.split('/').next().and_then(|a| a.parse().ok());
        }
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    Demo {
        child,
        grpc: grpc.unwrap_or_else(|| panic!("the banner names the gRPC address:\n{banner}")),
        web: web.unwrap_or_else(|| panic!("the banner names the web address:\n{banner}")),
        banner,
    }
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `curl` of `url` with `args`: (HTTP status, body); status 0 when no answer came.
pub(crate) fn curl(url: &str, args: &[&str]) -> (u16, String, Output) {
    let output = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string(), output)
}

fn path(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}

#[test]
fn grpc_and_the_web_report_speak_tls() {
    let certs = certificates();
    let dir = certs.path();
    let demo = demo(&[
        "--tls-cert",
        &path(dir, "server.pem"),
        "--tls-key",
        &path(dir, "server-key.pem"),
    ]);
    assert!(
        demo.banner.contains(&format!("https://{}/", demo.web)),
        "{}",
        demo.banner
    );
    assert!(demo.banner.contains("-cacert"), "{}", demo.banner);
    let grpcurl = grpcurl();
    let target = demo.grpc.to_string();

    let list = run(Command::new(&grpcurl).args(["-cacert", &path(dir, "ca.pem"), &target, "list"]));
    assert!(list.status.success(), "{}", text(&list));
    let services = String::from_utf8_lossy(&list.stdout);
    for service in ["spendflow.v1.ExpenseQuery", "spendflow.v1.Admin"] {
        assert!(services.contains(service), "{service} in {services}");
    }
    let status = run(Command::new(&grpcurl).args([
        "-cacert",
        &path(dir, "ca.pem"),
        &target,
        "spendflow.v1.Admin/GetStatus",
    ]));
    assert!(status.status.success(), "{}", text(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("records"),
        "{}",
        text(&status)
    );
    // Plain text is not served any more.
    let plain = run(Command::new(&grpcurl).args([
        "-plaintext",
        "-max-time",
        "10",
        &target,
        "spendflow.v1.Admin/GetStatus",
    ]));
    assert!(!plain.status.success(), "{}", text(&plain));
    // Nor is a server the client does not trust.
    let untrusted = run(Command::new(&grpcurl).args([
        "-max-time",
        "10",
        &target,
        "spendflow.v1.Admin/GetStatus",
    ]));
    assert!(!untrusted.status.success(), "{}", text(&untrusted));

    let url = format!("https://{}/api/overview", demo.web);
    let (code, body, output) = curl(&url, &["--cacert", &path(dir, "ca.pem")]);
    assert_eq!(code, 200, "{}", text(&output));
    assert!(body.contains("top_spenders"), "{body}");
    // By name too (the certificate is for localhost as well; the Host is allowed by default).
    let by_name = format!("https://localhost:{}/api/overview", demo.web.port());
    let (code, _, output) = curl(&by_name, &["--cacert", &path(dir, "ca.pem")]);
    assert_eq!(code, 200, "{}", text(&output));
    let (code, _, output) = curl(&format!("http://{}/api/overview", demo.web), &[]);
    assert_ne!(code, 200, "plain HTTP is not served: {}", text(&output));
}

#[test]
fn mtls_refuses_clients_without_a_certificate() {
    let certs = certificates();
    let dir = certs.path();
    let demo = demo(&[
        "--tls-cert",
        &path(dir, "server.pem"),
        "--tls-key",
        &path(dir, "server-key.pem"),
        "--tls-client-ca",
        &path(dir, "ca.pem"),
    ]);
    let grpcurl = grpcurl();
    let target = demo.grpc.to_string();
    let without = run(Command::new(&grpcurl).args([
        "-cacert",
        &path(dir, "ca.pem"),
        "-max-time",
        "10",
        &target,
        "spendflow.v1.Admin/GetStatus",
    ]));
    assert!(!without.status.success(), "{}", text(&without));
    let with = run(Command::new(&grpcurl).args([
        "-cacert",
        &path(dir, "ca.pem"),
        "-cert",
        &path(dir, "client.pem"),
        "-key",
        &path(dir, "client-key.pem"),
        &target,
        "spendflow.v1.Admin/GetStatus",
    ]));
    assert!(with.status.success(), "{}", text(&with));

    let url = format!("https://{}/api/overview", demo.web);
    let (code, _, output) = curl(&url, &["--cacert", &path(dir, "ca.pem")]);
    assert_eq!(
        code,
        0,
        "no answer without a certificate: {}",
        text(&output)
    );
    let (code, _, output) = curl(
        &url,
        &[
            "--cacert",
            &path(dir, "ca.pem"),
            "--cert",
            &path(dir, "client.pem"),
            "--key",
            &path(dir, "client-key.pem"),
        ],
    );
    assert_eq!(code, 200, "{}", text(&output));
}

#[test]
fn a_bad_tls_file_stops_the_start_naming_it() {
    let certs = certificates();
    let dir = certs.path();
    // The client's key does not belong to the server's certificate.
    let output = run(Command::new(env!("CARGO_BIN_EXE_spendflow")).args([
        "demo",
        "--grpc",
        "127.0.0.1:0",
        "--web",
        "127.0.0.1:0",
        "--tls-cert",
        &path(dir, "server.pem"),
        "--tls-key",
        &path(dir, "client-key.pem"),
    ]));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-key"), "{stderr}");
    assert!(stderr.contains("client-key.pem"), "{stderr}");

    let output = run(Command::new(env!("CARGO_BIN_EXE_spendflow")).args([
        "demo",
        "--grpc",
        "127.0.0.1:0",
        "--web",
        "127.0.0.1:0",
        "--tls-cert",
        &path(dir, "missing.pem"),
        "--tls-key",
        &path(dir, "server-key.pem"),
    ]));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    assert!(stderr.contains("missing.pem"), "{stderr}");
}

#[test]
fn the_web_report_answers_only_allowed_hosts() {
    let demo = demo(&[]);
    let url = format!("http://{}/api/overview", demo.web);
    let (code, body, output) = curl(&url, &["-H", "Host: evil.example"]);
    assert_eq!(code, 421, "{}", text(&output));
    assert!(body.contains("--web-allowed-hosts"), "{body}");
    let (code, _, output) = curl(
        &url,
        &["-H", &format!("Host: evil.example:{}", demo.web.port())],
    );
    assert_eq!(code, 421, "{}", text(&output));
    let (code, _, output) = curl(&url, &[]);
    assert_eq!(code, 200, "{}", text(&output));
    let (code, _, output) = curl(&url, &["-H", "Host: localhost"]);
    assert_eq!(code, 200, "{}", text(&output));
    drop(demo);

    let demo = demo_with_hosts();
    let url = format!("http://{}/api/overview", demo.web);
    let (code, _, output) = curl(&url, &["-H", "Host: report.example"]);
    assert_eq!(code, 200, "{}", text(&output));
    let (code, _, output) = curl(&url, &[]);
    assert_eq!(
        code,
        421,
        "127.0.0.1 is not in the list given: {}",
        text(&output)
    );
}

fn demo_with_hosts() -> Demo {
    demo(&["--web-allowed-hosts", "report.example,intranet.example"])
}

#[test]
fn oversized_grpc_messages_answer_resource_exhausted() {
    let demo = demo(&[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let channel = crate::support::grpc::connect(&runtime, demo.grpc);
    // 40,000 ids of 5 bytes each: about 200 KB, over the 64 KiB limit.
    let request = pb::SubscribeRequest {
        user_ids: (0..40_000u64).map(|i| 1 << 30 | i).collect(),
        ..Default::default()
    };
    let status = runtime
        .block_on(ExpenseQueryClient::new(channel.clone()).subscribe(request))
        .expect_err("an oversized request is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("65536"), "{status:?}");
    // A normal call on the same channel still answers.
    runtime
        .block_on(AdminClient::new(channel).get_status(pb::GetStatusRequest {}))
        .expect("GetStatus answers");
}

/// Opens `n` TCP connections to `addr` that never send anything.
fn idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}")))
        .collect()
}

/// Like [`idle_connections`], counting the connections refused instead of failing.
fn try_idle_connections(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut refused = 0;
    let open = (0..n)
        .filter_map(|_| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|_| refused += 1)
                .ok()
        })
        .collect();
    (open, refused)
}

/// How many of `connections` the server has closed (a read returns end of file).
fn closed_by_server(connections: &[TcpStream]) -> usize {
    connections
        .iter()
        .filter(|c| {
            c.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 4096];
            // Drains what the server sent (HTTP/2 settings) until end of file (closed),
            // nothing more yet (open) or a reset (closed).
            loop {
                match (&**c).read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
                }
            }
        })
        .count()
}

#[test]
fn idle_connections_past_the_cap_are_closed_and_grpc_keeps_answering() {
    const CAP: usize = 16;
    const EXTRA: usize = 24;
    let demo = demo(&["--max-connections", &CAP.to_string()]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A client that connected before the flood.
    let channel = crate::support::grpc::connect(&runtime, demo.grpc);
    let get_status = |channel: &tonic::transport::Channel| {
        runtime
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(20),
                    AdminClient::new(channel.clone()).get_status(pb::GetStatusRequest {}),
                )
                .await
            })
            .expect("GetStatus answers in time")
    };

    let web_flood = idle_connections(demo.web, CAP + EXTRA);
    // gRPC answers a new client while the web port is flooded.
    let fresh = crate::support::grpc::connect(&runtime, demo.grpc);
    get_status(&fresh).expect("GetStatus on a new connection during the web flood");
    // The connections past the web cap are closed by the server.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let closed = closed_by_server(&web_flood);
        if closed >= EXTRA {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {closed} of {} idle web connections were closed",
            CAP + EXTRA
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Flooding the gRPC port itself: a client already connected keeps answering.
    let grpc_flood = idle_connections(demo.grpc, CAP + EXTRA);
    get_status(&channel).expect("GetStatus on an existing connection during the gRPC flood");
    // Those past the cap are closed at once; the admitted ones once they have sent nothing
    // for the greeting timeout (10 s). Then a new client gets a place while the flood's
    // sockets are still open on this side.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let closed = closed_by_server(&grpc_flood);
        if closed == CAP + EXTRA {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {closed} of {} idle gRPC connections were closed",
            CAP + EXTRA
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = crate::support::grpc::connect(&runtime, demo.grpc);
    get_status(&again).expect("GetStatus on a new connection after the idle ones were closed");
    // The same on the web port (first-request timeout).
    let deadline = Instant::now() + Duration::from_secs(60);
    while closed_by_server(&web_flood) < CAP + EXTRA {
        assert!(
            Instant::now() < deadline,
            "the idle web connections were not all closed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, _, output) = curl(&format!("http://{}/api/overview", demo.web), &[]);
    assert_eq!(code, 200, "{}", text(&output));
    drop(web_flood);
    drop(grpc_flood);
}

/// The engine's resident memory in MiB (`VmRSS` of /proc/PID/status).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `GetStatus` latencies over `n` calls on `channel`: (median, max) in milliseconds, and how
/// many failed.
fn status_latency(
    runtime: &tokio::runtime::Runtime,
    channel: &tonic::transport::Channel,
    n: usize,
) -> (f64, f64, usize) {
    let mut times = Vec::new();
    let mut failed = 0;
    for _ in 0..n {
        let start = Instant::now();
        let answer = runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                AdminClient::new(channel.clone()).get_status(pb::GetStatusRequest {}),
            )
            .await
        });
        match answer {
            Ok(Ok(_)) => times.push(start.elapsed().as_secs_f64() * 1000.0),
            _ => failed += 1,
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let max = times.last().copied().unwrap_or(f64::NAN);
    (median, max, failed)
}

/// The worst case the README's security section states: N idle TCP connections to each of the
/// web and gRPC ports, and M all-user `Subscribe` streams (each on its own connection) that
/// never read; the engine's RSS before, during and after, and `GetStatus` latency during (on a
/// connection made before the flood, and on one made during it). Not a timed test: it prints
/// the numbers. Run it against a debug build:
///
///     SPENDFLOW_ABUSE_IDLE=1100 SPENDFLOW_ABUSE_SUBSCRIBERS=256 SPENDFLOW_ABUSE_USERS=20000 \
///       cargo test -p spendflow-engine --test it tls::measure_worst_case -- --ignored --nocapture
#[test]
#[ignore = "a measurement for the README, not a check; run it by name"]
fn measure_worst_case() {
    let idle = env_usize("SPENDFLOW_ABUSE_IDLE", 1100);
    let subscribers = env_usize("SPENDFLOW_ABUSE_SUBSCRIBERS", 256);
    let users = env_usize("SPENDFLOW_ABUSE_USERS", 20_000);
    let rate = env_usize("SPENDFLOW_ABUSE_RATE", 5_000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["demo", "--log", "warn"])
        .args(["--users", &users.to_string(), "--rate", &rate.to_string()])
        .args(["--grpc", "127.0.0.1:0", "--web", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut grpc, mut web) = (None::<SocketAddr>, None::<SocketAddr>);
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some((_, addr)) = line.split_once("gRPC on ") {
            grpc = addr.trim().parse().ok();
        }
        if let Some(rest) = line.strip_prefix("Live web report: http://") {
            web = rest.split('/').next().and_then(|a| a.parse().ok());
            break;
        }
    }
    let demo = Demo {
        grpc: grpc.unwrap(),
        web: web.unwrap(),
        banner: String::new(),
        child,
    };
    let pid = demo.child.id();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let before_channel = crate::support::grpc::connect(&runtime, demo.grpc);
    // Let the demo fill its state with every user.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status = runtime
            .block_on(AdminClient::new(before_channel.clone()).get_status(pb::GetStatusRequest {}))
            .unwrap()
            .into_inner();
        let summaries = status.users;
        if summaries as usize >= users * 9 / 10 || Instant::now() > deadline {
            println!(
                "state: {summaries} users, {} records accepted",
                status.records_accepted
            );
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let rss_before = rss_mib(pid);
    let (p50_before, max_before, failed_before) = status_latency(&runtime, &before_channel, 20);

    // The flood.
    let started = Instant::now();
    let mut streams = Vec::new();
    let mut refused = 0;
    // The machine is shared: stop adding subscribers past this much engine memory.
    let max_rss = env_usize("SPENDFLOW_ABUSE_MAX_RSS_MIB", 4096) as f64;
    let mut peak = rss_before;
    for _ in 0..subscribers {
        peak = peak.max(rss_mib(pid));
        if peak > max_rss {
            println!(
                "stopped adding subscribers at {} streams: RSS {peak:.0} MiB is over the {max_rss:.0} MiB safety limit",
                streams.len()
            );
            break;
        }
        let channel = runtime.block_on(
            tonic::transport::Channel::from_shared(format!("http://{}", demo.grpc))
                .unwrap()
                .connect(),
        );
        let Ok(channel) = channel else {
            refused += 1;
            continue;
        };
        match runtime.block_on(
            ExpenseQueryClient::new(channel.clone()).subscribe(pb::SubscribeRequest::default()),
        ) {
            // Kept, never read.
            Ok(stream) => streams.push((channel, stream)),
            Err(_) => refused += 1,
        }
    }
    // The idle connections after the subscribers (which need places under the gRPC cap).
    let (web_idle, web_refused) = try_idle_connections(demo.web, idle);
    let (grpc_idle, grpc_refused) = try_idle_connections(demo.grpc, idle);
    std::thread::sleep(Duration::from_secs(10));
    let rss_during = rss_mib(pid).max(peak);
    let (p50_during, max_during, failed_during) = status_latency(&runtime, &before_channel, 20);
    let fresh = runtime.block_on(
        tonic::transport::Channel::from_shared(format!("http://{}", demo.grpc))
            .unwrap()
            .connect(),
    );
    let fresh_result = match &fresh {
        Ok(channel) => {
            let (p50, max, failed) = status_latency(&runtime, channel, 20);
            format!("p50 {p50:.1} ms, max {max:.1} ms, {failed} failed")
        }
        Err(e) => format!("could not connect: {e}"),
    };
    let web_closed = closed_by_server(&web_idle);
    let grpc_closed = closed_by_server(&grpc_idle);
    let flood_secs = started.elapsed().as_secs_f64();

    let open_streams = streams.len();
    drop(streams);
    drop(web_idle);
    drop(grpc_idle);
    std::thread::sleep(Duration::from_secs(10));
    let rss_after = rss_mib(pid);
    let (p50_after, max_after, failed_after) = status_latency(&runtime, &before_channel, 20);

    println!(
        "worst case: {idle} idle connections to web and to gRPC each, {open_streams} of {subscribers} all-user Subscribe streams open and never read ({refused} refused), {users} users at {rate}/s"
    );
    println!("RSS MiB: before {rss_before:.0}, during {rss_during:.0}, after {rss_after:.0}");
    println!(
        "idle connections closed by the server during the flood: web {web_closed}/{idle} ({web_refused} not connected), gRPC {grpc_closed}/{idle} ({grpc_refused} not connected)"
    );
    println!(
        "GetStatus (connection made before): before p50 {p50_before:.1} ms max {max_before:.1} ms ({failed_before} failed); during p50 {p50_during:.1} ms max {max_during:.1} ms ({failed_during} failed); after p50 {p50_after:.1} ms max {max_after:.1} ms ({failed_after} failed)"
    );
    println!("GetStatus on a connection made during the flood: {fresh_result}");
    println!("flood held for {flood_secs:.0} s");
}
