//! The read model never waits for the durable sink: with a sink that is stuck in `write` (a
//! Cassandra that stopped answering, a slow store), the engine still reads all its input and
//! serves all of it, while every epoch after the stuck one merges into one waiting group;
//! once the sink moves again it receives exactly the input, in few large groups.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use spendflow_engine::core::Epoch;
use spendflow_engine::sink::memory::MemorySink;
use spendflow_engine::sink::{EpochGroup, Sink, SinkContext, SinkCounters, SinkError};
use spendflow_engine::source::file::FileSourceConfig;
use spendflow_engine::{Engine, EngineConfig, SourceConfig};
use spendflow_operators::AggKey;

/// A [`MemorySink`] whose `write` waits until the test opens the gate.
#[derive(Debug, Clone)]
struct GatedSink {
    inner: MemorySink,
    gate: Arc<(Mutex<bool>, Condvar)>,
    writes_entered: Arc<AtomicU64>,
}

impl GatedSink {
    fn open_gate(&self) {
        *self.gate.0.lock() = true;
        self.gate.1.notify_all();
    }
}

impl Sink for GatedSink {
    fn name(&self) -> &str {
        "gated"
    }

    fn open(&mut self, ctx: &SinkContext) -> Result<Option<Epoch>, SinkError> {
        self.inner.open(ctx)
    }

    fn write(&mut self, group: &EpochGroup) -> Result<(), SinkError> {
        self.writes_entered.fetch_add(1, Ordering::SeqCst);
        let mut open = self.gate.0.lock();
        while !*open {
            self.gate.1.wait(&mut open);
        }
        drop(open);
        self.inner.write(group)
    }

    fn commit(&mut self, group: &EpochGroup) -> Result<(), SinkError> {
        self.inner.commit(group)
    }

    fn counters(&self) -> SinkCounters {
        self.inner.counters()
    }
}

#[test]
fn a_stalled_sink_does_not_hold_back_the_read_model() {
    // One expense per user: five cells each (user, category, merchant, day, month), so
    // 300,000 changed cells in all, more than the 200,000 at which the publisher used to wait
    // for the sink.
    const USERS: u64 = 60_000;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    {
        let mut out = std::io::BufWriter::new(file.as_file_mut());
        for user in 1..=USERS {
            writeln!(
                out,
                r#"{{"expense_id":"e-{user}","user_id":{user},"merchant":"m-{m}","category":"c-{c}","amount_minor":{amount},"currency":"EUR","event_time":"2026-11-{day:02}T10:15:00Z"}}"#,
                m = user % 97,
                c = user % 13,
                amount = 100 + user,
                day = 1 + user % 28,
            )
            .unwrap();
        }
    }
    let sink = GatedSink {
        inner: MemorySink::new(),
        gate: Arc::default(),
        writes_entered: Arc::default(),
    };
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

    let caught_up = engine.wait_caught_up(Duration::from_secs(60));
    let snapshot = engine.read_model().snapshot();
    let (served_users, committed) = (snapshot.user_count(), engine.sink_committed());
    // Let the sink go before asserting, so that a failure does not leave the engine stuck.
    sink.open_gate();
    assert!(
        caught_up,
        "the engine caught up while the sink was stuck (served {served_users} of {USERS} users)"
    );
    assert_eq!(served_users as u64, USERS, "every user is served");
    assert_eq!(committed, None, "the sink had committed nothing yet");
    assert!(sink.writes_entered.load(Ordering::SeqCst) >= 1);

    engine.shutdown().unwrap();
    let state = sink.inner.state();
    let users = state
        .cells
        .keys()
        .filter(|k| matches!(k, AggKey::User(_)))
        .count();
    assert_eq!(
        users as u64, USERS,
        "the sink holds every user once it moved"
    );
    assert_eq!(state.cells[&AggKey::User(7)].sum, 107.into());
    // The stuck group, the one that merged everything after it, and at most the final epoch
    // of the shutdown.
    assert!(
        state.commits.len() <= 3,
        "epochs merged while the sink was stuck: {:?}",
        state.commits
    );
}
