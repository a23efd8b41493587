//! Chaos: the checkpoint directory becomes unwritable while the engine runs (real engine, a
//! followed file as input, checkpoints every 100 ms, gRPC on).
//!
//! How the directory is made unwritable, for root too (the tests run as root, and root ignores
//! permission bits): the directory is renamed away and a regular *file* is put at its path.
//! Every path the store writes to (`<dir>/.tmp-checkpoint-...`) then fails with "not a
//! directory", whoever the process is. Putting the directory back makes it writable again; the
//! engine's lock on `<dir>/LOCK` is held on the open file, which moves with the directory.
//!
//! Checked: the engine keeps reading and serving; `Admin/GetStatus` shows the last checkpoint's
//! epoch (unchanged while broken), its age (growing), the last error and the failures; once the
//! directory is back, a newer checkpoint is written; no temporary file is left behind; and a
//! restart restores the newest checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spendflow_engine::config::CheckpointConfig;
use spendflow_engine::source::file::FileSourceConfig;
use spendflow_engine::{Engine, EngineConfig, SourceConfig};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;

fn append(file: &mut std::fs::File, from: usize, n: usize) {
    for i in from..from + n {
        writeln!(
            file,
            r#"{{"expense_id":"e-{i}","user_id":{},"merchant":"Tesco","category":"groceries","amount_minor":100,"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}}"#,
            i % 7 + 1
        )
        .unwrap();
    }
    file.flush().unwrap();
}

fn engine(input: &Path, checkpoints: &Path) -> Engine {
    let config = EngineConfig {
        workers: 2,
        epoch_interval_ms: 5,
        source: Some(SourceConfig::File(FileSourceConfig {
            path: input.into(),
            follow: true,
        })),
        grpc: Some("127.0.0.1:0".parse().unwrap()),
        checkpoint: Some(CheckpointConfig {
            interval_ms: 100,
            ..CheckpointConfig::new(checkpoints)
        }),
        ..EngineConfig::default()
    };
    Engine::builder().config(config).start().unwrap()
}

struct Admin {
    runtime: tokio::runtime::Runtime,
    client: AdminClient<tonic::transport::Channel>,
}

impl Admin {
    fn connect(engine: &Engine) -> Admin {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let addr = engine.grpc_addr().unwrap();
        let client = runtime
            .block_on(AdminClient::connect(format!("http://{addr}")))
            .unwrap();
        Admin { runtime, client }
    }

    fn status(&mut self) -> pb::GetStatusResponse {
        self.runtime
            .block_on(self.client.get_status(pb::GetStatusRequest {}))
            .unwrap()
            .into_inner()
    }

    /// Polls GetStatus until `done` holds; fails after 60 s.
    fn until(
        &mut self,
        what: &str,
        done: impl Fn(&pb::GetStatusResponse) -> bool,
    ) -> pb::GetStatusResponse {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}; last status: {status:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn temporary_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".tmp"))
        })
        .collect()
}

#[test]
fn an_unwritable_checkpoint_directory_is_reported_and_recovered_from() {
    let work = tempfile::tempdir().unwrap();
    let input_path = work.path().join("input.jsonl");
    let mut input = std::fs::File::create(&input_path).unwrap();
    let dir = work.path().join("checkpoints");
    let aside = work.path().join("checkpoints.aside");

    append(&mut input, 0, 100);
    let engine = engine(&input_path, &dir);
    let mut admin = Admin::connect(&engine);
    let first = admin.until("a first checkpoint", |s| {
        s.records_read == 100 && s.checkpoint.as_ref().is_some_and(|c| c.last_epoch > 0)
    });
    let first = first.checkpoint.unwrap();
    assert_eq!(first.failures, 0, "{first:?}");
    assert!(first.last_error.is_empty(), "{first:?}");

    // Break the directory: a file where the directory was.
    std::fs::rename(&dir, &aside).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    // More input: checkpoints are due, and cannot be written.
    append(&mut input, 100, 100);
    let broken = admin.until("a failed checkpoint in the status", |s| {
        s.checkpoint.as_ref().is_some_and(|c| c.failures >= 1)
    });
    let broken_checkpoint = broken.checkpoint.clone().unwrap();
    assert!(
        broken_checkpoint.last_error.contains("checkpoint store"),
        "the error says what failed: {broken_checkpoint:?}"
    );
    // The newest checkpoint written is still the one before the failures (a checkpoint
    // completed before the break may have landed just after the first status read).
    let last_good = broken_checkpoint.last_epoch;
    assert!(last_good >= first.last_epoch);
    // Still serving: the new input is read and published.
    let serving = admin.until("the new input served while broken", |s| {
        s.records_read == 200 && s.caught_up
    });
    assert_eq!(serving.records_accepted, 200);
    let later = admin.status().checkpoint.unwrap();
    assert_eq!(
        later.last_epoch, last_good,
        "no checkpoint while unwritable"
    );
    assert!(later.last_age_ms >= broken_checkpoint.last_age_ms);
    assert!(engine.failure().is_none(), "the engine keeps running");

    // Writable again: the next checkpoint is written.
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&aside, &dir).unwrap();
    append(&mut input, 200, 50);
    let recovered = admin.until("a checkpoint after the directory came back", |s| {
        s.records_read == 250
            && s.checkpoint
                .as_ref()
                .is_some_and(|c| c.last_epoch > last_good)
    });
    let recovered = recovered.checkpoint.unwrap();
    assert!(recovered.failures >= 1, "{recovered:?}");
    assert!(
        temporary_files(&dir).is_empty(),
        "no temporary file left: {:?}",
        temporary_files(&dir)
    );
    let epoch = recovered.last_epoch;
    drop(admin);
    engine.shutdown().unwrap();

    // A restart restores a checkpoint at least as new as the one recovered.
    let engine = engine_restart(&input_path, &dir);
    let mut admin = Admin::connect(&engine);
    let status = admin.until("the restarted engine caught up", |s| {
        s.records_read == 250 && s.caught_up
    });
    let restored = status.checkpoint.unwrap();
    assert!(restored.last_epoch >= epoch, "{restored:?}");
    assert_eq!(restored.failures, 0);
    drop(admin);
    engine.shutdown().unwrap();
}

fn engine_restart(input: &Path, checkpoints: &Path) -> Engine {
    engine(input, checkpoints)
}
