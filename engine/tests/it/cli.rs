//! The `spendflow` binary itself: `run --input file:X -w 2` reaches `caught_up` with the right
//! counts, and SIGTERM (what Ctrl-C sends as SIGINT) shuts it down cleanly with exit code 0.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn run_serves_a_file_and_stops_cleanly_on_sigterm() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for i in 0..1_000 {
        let user = i % 17 + 1;
        writeln!(
            file,
            r#"{{"expense_id":"e-{i}","user_id":{user},"merchant":"Tesco","category":"groceries","amount_minor":{i},"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}}"#
        )
        .unwrap();
    }
    writeln!(file, "not json at all").unwrap();
    file.flush().unwrap();

    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["run", "--input"])
        .arg(format!("file:{}", file.path().display()))
        .args(["-w", "2", "--grpc", &addr, "--log", "warn"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no caught-up status within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let Ok(mut admin) = AdminClient::connect(format!("http://{addr}")).await else {
                continue;
            };
            let Ok(status) = admin.get_status(pb::GetStatusRequest {}).await else {
                continue;
            };
            let status = status.into_inner();
            if status.caught_up {
                break status;
            }
        }
    });
    assert_eq!(
        (
            status.records_read,
            status.records_accepted,
            status.records_rejected
        ),
        (1_001, 1_000, 1)
    );
    assert_eq!(status.users, 17);
    assert_eq!(status.workers, 2);

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "still running 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "clean exit, got {exit:?}");
}

#[test]
fn bad_arguments_say_what_to_do() {
    let output = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args([
            "run",
            "--input",
            "kafak:localhost:9092",
            "--grpc",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--input must be"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args([
            "run",
            "--input",
            "file:/no/such/file.jsonl",
            "--grpc",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/no/such/file.jsonl"), "{stderr}");

    let help = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["demo", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--users",
        "--rate",
        "--events",
        "--seed",
        "--grpc",
        "--workers",
    ] {
        assert!(help.contains(flag), "demo --help lacks {flag}");
    }
}

#[test]
fn run_refuses_unreadable_checkpoints_unless_told_to_discard_them() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        r#"{{"expense_id":"e-1","user_id":1,"merchant":"Tesco","category":"groceries","amount_minor":5,"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}}"#
    )
    .unwrap();
    file.flush().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let damaged = dir.path().join(format!("checkpoint-{:020}", 12));
    std::fs::write(&damaged, b"SPFCKP02 cut short").unwrap();
    let future = dir.path().join(format!("checkpoint-{:020}", 13));
    std::fs::write(&future, b"SPFCKP99 from a later spendflow").unwrap();

    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_spendflow"))
            .args(["run", "--input"])
            .arg(format!("file:{}", file.path().display()))
            .arg("--checkpoint-dir")
            .arg(dir.path())
            .args(["--grpc", "127.0.0.1:0", "--log", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let refused = run(&[]).wait_with_output().unwrap();
    assert!(!refused.status.success(), "must not start");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("none can be read"), "{stderr}");
    assert!(
        stderr.contains(&damaged.display().to_string()) && stderr.contains("implausible"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&future.display().to_string()) && stderr.contains("version 99"),
        "{stderr}"
    );
    assert!(stderr.contains("--discard-checkpoints"), "{stderr}");
    assert!(damaged.exists() && future.exists(), "nothing touched");

    // With the opt-in it starts, and the files are moved aside, not deleted.
    let mut started = run(&["--discard-checkpoints"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while damaged.exists() || future.exists() {
        assert!(Instant::now() < deadline, "not moved aside in 30 s");
        assert!(started.try_wait().unwrap().is_none(), "the engine exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("discarded-"))
        .flat_map(|e| std::fs::read_dir(e.path()).unwrap())
        .count();
    assert_eq!(aside, 2);
    std::thread::sleep(Duration::from_millis(300));
    assert!(started.try_wait().unwrap().is_none(), "the engine runs");
    started.kill().unwrap();
    let output = started.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("discarding an unreadable checkpoint"),
        "{stderr}"
    );
}
