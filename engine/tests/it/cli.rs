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
    // Logs into a pipe or a file are plain text: no terminal colour codes.
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a log that is no terminal: {stderr:?}"
    );
}

/// A file of `n` valid records over 17 users.
fn records_file(n: usize) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for i in 0..n {
        let user = i % 17 + 1;
        writeln!(
            file,
            r#"{{"expense_id":"e-{i}","user_id":{user},"merchant":"Tesco","category":"groceries","amount_minor":{i},"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}}"#
        )
        .unwrap();
    }
    file.flush().unwrap();
    file
}

/// Polls `Admin/GetStatus` on `addr` until `done` holds for the answer (30 s at most).
fn wait_for_status(
    child: &mut std::process::Child,
    addr: &str,
    what: &str,
    done: impl Fn(&pb::GetStatusResponse) -> bool,
) -> pb::GetStatusResponse {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "not {what} within 30 s");
            if let Some(exit) = child.try_wait().unwrap() {
                panic!("the engine exited ({exit:?}) before it was {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let Ok(mut admin) = AdminClient::connect(format!("http://{addr}")).await else {
                continue;
            };
            let Ok(status) = admin.get_status(pb::GetStatusRequest {}).await else {
                continue;
            };
            let status = status.into_inner();
            if done(&status) {
                break status;
            }
        }
    })
}

/// SIGTERM, then a clean exit within 20 s.
fn stop(mut child: std::process::Child) {
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

fn spendflow_run(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spendflow"));
    command
        .arg("run")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("SPENDFLOW_CASSANDRA")
        .stdin(Stdio::null());
    command
}

#[test]
fn run_takes_its_settings_from_a_config_file_and_flags_override_it() {
    let records = records_file(500);
    let dir = tempfile::tempdir().unwrap();
    let (first_checkpoints, second_checkpoints) = (dir.path().join("a"), dir.path().join("b"));
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("spendflow.toml");
    std::fs::write(
        &config,
        format!(
            r#"
workers = 2
grpc = "{addr}"
log = "warn"

[source]
kind = "file"
path = '{}'

[checkpoint]
dir = '{}'
interval = "200ms"
"#,
            records.path().display(),
            first_checkpoints.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    // All from the file: its workers, address, source, and checkpoints every 200 ms.
    let mut child = spendflow_run(&["--config", config]).spawn().unwrap();
    let status = wait_for_status(&mut child, &addr, "caught up", |s| s.caught_up);
    assert_eq!(
        (status.records_read, status.records_accepted, status.workers),
        (500, 500, 2)
    );
    let status = wait_for_status(&mut child, &addr, "checkpointed", |s| {
        s.checkpoint.as_ref().is_some_and(|c| c.last_epoch > 0)
    });
    assert_eq!(status.checkpoint.unwrap().failures, 0);
    stop(child);
    assert!(
        std::fs::read_dir(&first_checkpoints)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")),
        "a checkpoint in the file's directory"
    );

    // Flags given override their keys, the rest still comes from the file. A checkpoint
    // interval of an hour (refused before humantime: "unknown unit") means no checkpoint yet.
    let other = format!("127.0.0.1:{}", free_port());
    let mut child = spendflow_run(&["--config", config, "-w", "3", "--grpc", &other])
        .arg("--checkpoint-dir")
        .arg(&second_checkpoints)
        .args(["--checkpoint-interval", "1h"])
        .spawn()
        .unwrap();
    let status = wait_for_status(&mut child, &other, "caught up", |s| s.caught_up);
    assert_eq!(
        (status.records_read, status.records_accepted, status.workers),
        (500, 500, 3),
        "read from the start: the second directory has no checkpoint to resume from"
    );
    assert_eq!(status.checkpoint.map(|c| c.last_epoch), Some(0));
    stop(child);
    assert!(second_checkpoints.is_dir(), "the flag's directory was used");
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        (
            "wrokers = 2\n[source]\nkind = \"file\"\npath = \"x.jsonl\"\n",
            "wrokers",
        ),
        (
            "[source]\nkind = \"file\"\npath = \"x.jsonl\"\n[checkpoint]\ndir = \"d\"\nintervall = \"1h\"\n",
            "intervall",
        ),
    ] {
        let config = dir.path().join(format!("{key}.toml"));
        std::fs::write(&config, text).unwrap();
        let output = spendflow_run(&["--config", config.to_str().unwrap()])
            .args(["--grpc", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{key} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("unknown field `{key}`"))
                && stderr.contains(&config.display().to_string()),
            "{stderr}"
        );
    }
}

#[test]
fn run_help_documents_the_config_file() {
    let help = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "--config <FILE>",
        "[source]",
        "[checkpoint]",
        "interval = \"1m\"",
        "override the file",
    ] {
        assert!(
            help.contains(needle),
            "run --help lacks {needle:?}:\n{help}"
        );
    }
}
