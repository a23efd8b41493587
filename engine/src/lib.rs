//! spendflow's engine: where expense records come from, how they flow through the dataflow, and
//! where results go. `spendflow-operators` says *what* is computed; this crate says *where*.
//!
//! Modules in data-path order:
//!
//! 1. [`source`]: the generator, files and the in-process input.
//! 2. [`pipeline`]: the whole path of a record in one place — read, decode, push, cut epochs,
//!    step, publish.
//! 3. [`sink`]: dead letters (and, later, durable sinks).
//! 4. [`serve`]: the read model and the gRPC services.
//!
//! # Embedding
//!
//! ```no_run
//! use std::time::Duration;
//! use spendflow_engine::Engine;
//!
//! let engine = Engine::builder().workers(2).start()?;
//! engine.input().push_json(
//!     r#"{"expense_id":"e-1","user_id":42,"merchant":"Tesco","category":"groceries",
//!         "amount_minor":1299,"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}"#,
//! )?;
//! engine.wait_caught_up(Duration::from_secs(5));
//! let snapshot = engine.read_model().snapshot();
//! assert_eq!(snapshot.user(42).map(|u| u.total_minor), Some(1299));
//! engine.shutdown()?;
//! # Ok::<(), spendflow_engine::EngineError>(())
//! ```

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod images;
pub mod personnel;
pub mod pipeline;
pub mod serve;
pub mod sink;
pub mod source;
pub mod verify;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{EngineConfig, SourceConfig};
pub use error::{EngineError, SourceError};
pub use serve::read_model::{ReadModel, Snapshot};
pub use serve::status::Status;
pub use source::input::InputHandle;

use crate::pipeline::{EpochClock, Shared};
use crate::serve::status::StatusProbe;
use crate::sink::dead_letter::DeadLetters;
use crate::source::Source;

/// How long shutdown waits for gRPC clients to hang up before closing their connections.
const GRPC_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long shutdown waits for the durable sink to write what is queued.
const SINK_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Configures and starts an [`Engine`].
#[derive(Clone, Debug, Default)]
pub struct EngineBuilder {
    config: EngineConfig,
    personnel: Option<Arc<personnel::Personnel>>,
}

impl EngineBuilder {
    /// Starts from a whole configuration.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Dataflow worker threads.
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    /// Longest time between epoch cuts while records arrive.
    pub fn epoch_interval(mut self, interval: Duration) -> Self {
        self.config.epoch_interval_ms = interval.as_millis().max(1) as u64;
        self
    }

    /// A source besides the in-process input.
    pub fn source(mut self, source: SourceConfig) -> Self {
        self.config.source = Some(source);
        self
    }

    /// Serves gRPC on `addr` (port 0 picks a free port; see [`Engine::grpc_addr`]).
    pub fn grpc(mut self, addr: SocketAddr) -> Self {
        self.config.grpc = Some(addr);
        self
    }

    /// Serves the live web report on `addr` (port 0 picks a free port; see
    /// [`Engine::web_addr`]).
    pub fn web(mut self, addr: SocketAddr) -> Self {
        self.config.web = Some(addr);
        self
    }

    /// User details and pictures for the `Personnel` gRPC service; without it those calls
    /// answer `FAILED_PRECONDITION`. See [`personnel::Personnel`].
    pub fn personnel(mut self, personnel: Arc<personnel::Personnel>) -> Self {
        self.personnel = Some(personnel);
        self
    }

    /// Validates the configuration, opens the sources and starts the workers, the publisher and
    /// (if configured) the gRPC server. Blocking; call it outside an async runtime.
    ///
    /// # Errors
    ///
    /// [`EngineError::Config`] for invalid settings, [`EngineError::Source`] if a source cannot
    /// be opened, [`EngineError::Serve`] if the gRPC address cannot be bound.
    pub fn start(self) -> Result<Engine, EngineError> {
        Engine::start(self.config, self.personnel)
    }
}

/// A running engine. Dropping it shuts it down.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    input: InputHandle,
    read_model: Arc<ReadModel>,
    shared: Arc<Shared>,
    workers: Option<JoinHandle<Result<Vec<()>, String>>>,
    publisher: Option<JoinHandle<()>>,
    sink_thread: Option<JoinHandle<()>>,
    /// Makes the sink's retries give up (at shutdown, after a grace period).
    sink_stop: Arc<std::sync::atomic::AtomicBool>,
    checkpointer: Option<JoinHandle<()>>,
    grpc: Option<GrpcServer>,
    web: Option<serve::web::WebServer>,
}

#[derive(Debug)]
struct GrpcServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Engine {
    /// A builder with default settings: one worker, no source but the in-process input, no
    /// gRPC server.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    fn start(
        config: EngineConfig,
        personnel: Option<Arc<personnel::Personnel>>,
    ) -> Result<Engine, EngineError> {
        config.validate()?;
        let workers = config.workers;

        // Recovery first: lock the checkpoint directory (fencing) and read the newest
        // checkpoint; claim the durable sink and learn what it committed. Epochs continue
        // past both, so everything this run publishes is newer than anything before it.
        let (store, restored) = match &config.checkpoint {
            Some(c) => {
                let mut store = checkpoint::LocalDirStore::open(&c.dir)?;
                let latest = match checkpoint::CheckpointStore::latest(&store) {
                    Err(checkpoint::CheckpointError::Unreadable { refused, .. })
                        if c.discard_unreadable =>
                    {
                        for (path, why) in &refused {
                            tracing::warn!(path = %path, reason = %why, "--discard-checkpoints: discarding an unreadable checkpoint.");
                        }
                        for (from, to) in store.discard_all()? {
                            tracing::warn!(
                                from = %from.display(),
                                to = %to.display(),
                                "Moved an unreadable checkpoint aside; all input is read again from the beginning."
                            );
                        }
                        None
                    }
                    other => other?,
                };
                if let Some(latest) = &latest {
                    tracing::info!(
                        epoch = latest.epoch,
                        live = latest.live.len(),
                        partitions = latest.positions.len(),
                        records = latest.records_read,
                        "Restoring a checkpoint."
                    );
                }
                (Some(store), latest)
            }
            None => (None, None),
        };
        let sink_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sink = match &config.sink {
            Some(config::SinkConfig::Cassandra(c)) => Some(sink::cassandra::CassandraSink::open(
                c.clone(),
                &format!("spendflow pid {}", std::process::id()),
                Arc::clone(&sink_stop),
            )?),
            None => None,
        };
        let first_epoch = restored
            .as_ref()
            .map(|c| c.epoch)
            .max(sink.as_ref().and_then(|(_, start)| start.committed_epoch))
            .unwrap_or(0)
            + 1;
        let start_at: std::collections::BTreeMap<(String, i32), i64> = restored
            .iter()
            .flat_map(|c| &c.positions)
            .map(|p| ((p.source.clone(), p.partition), p.position))
            .collect();

        // Sources, per worker. Single-partition sources are read by worker 0.
        let (input, input_source) = source::input::channel();
        let mut first: Vec<Box<dyn Source>> = vec![Box::new(input_source)];
        match &config.source {
            Some(SourceConfig::Generator(g)) => {
                first.push(Box::new(source::generator::GeneratorSource::new(
                    g.clone(),
                )?));
            }
            Some(SourceConfig::File(f)) => {
                let name = format!("file:{}", f.path.display());
                let start = start_at.get(&(name, 0)).copied().unwrap_or(0);
                first.push(Box::new(source::file::FileSource::open(f.clone(), start)?));
            }
            Some(SourceConfig::Kafka(_)) | None => {}
        }
        let mut per_worker: Vec<Option<Vec<Box<dyn Source>>>> =
            (0..workers).map(|_| Some(Vec::new())).collect();
        if let Some(SourceConfig::Kafka(k)) = &config.source {
            // Every worker reads its own share of the partitions.
            for (worker, sources) in per_worker.iter_mut().enumerate() {
                let kafka =
                    source::kafka::KafkaSource::new(k.clone(), worker, workers, start_at.clone())?;
                sources.get_or_insert_with(Vec::new).push(Box::new(kafka));
            }
        }
        per_worker[0].get_or_insert_with(Vec::new).extend(first);
        let per_worker = Arc::new(Mutex::new(per_worker));

        // Epochs continue a previous timeline only when a checkpoint is restored: then they keep
        // its incarnation; otherwise (or for a checkpoint from before incarnations) a new one.
        let incarnation: Arc<str> = restored
            .as_ref()
            .map(|c| c.incarnation.clone())
            .filter(|i| !i.is_empty())
            .unwrap_or_else(serve::read_model::new_incarnation)
            .into();
        tracing::info!(%incarnation, "Incarnation of this run's epochs.");
        let (read_model, writer) = ReadModel::with_incarnation(Arc::clone(&incarnation));
        let mut dead_letters = DeadLetters::with_capacity(config.dead_letter_capacity);
        if let Some(SourceConfig::Kafka(k)) = &config.source {
            let mut output = sink::dead_letter::kafka::KafkaDeadLetters::new(
                &k.brokers,
                &config.dead_letter_topic,
            )
            .map_err(|e| SourceError::Kafka {
                message: format!("dead-letter producer: {e}"),
                retriable: false,
            })?;
            if config.checkpoint.is_some() {
                // Input after the checkpoint is read again: its dead letters are already in
                // the topic, and must not be sent twice.
                output.skip_written(
                    &k.brokers,
                    &start_at,
                    restored.as_ref().and_then(|c| c.dead_letter_scan.as_ref()),
                )?;
            }
            dead_letters = dead_letters.with_output(Box::new(output));
        }
        if let Some(restored) = &restored {
            dead_letters.restore_counts(&restored.rejected);
        }
        let dead_letters = Arc::new(dead_letters);
        let clock = EpochClock::starting_at(
            first_epoch,
            config.epoch_interval(),
            config.epoch_budget,
            config
                .checkpoint
                .as_ref()
                .map(|c| Duration::from_millis(c.interval_ms)),
        );
        let mut shared = Shared::new(workers, clock, dead_letters);
        if config.sink.is_some() {
            // What an earlier run wrote may be ahead of its checkpoint (and of its committed
            // progress): re-read input must rewrite every cell it touches.
            shared = shared.with_replay();
        }
        shared.checkpoints_enabled = config.checkpoint.is_some();
        shared.incarnation = incarnation;
        let restored_epoch = restored.as_ref().map(|c| c.epoch);
        if let Some(restored) = restored {
            shared = shared.restore_from(restored);
        }
        let shared = Arc::new(shared);

        // Bind before starting anything else, so a taken port fails fast.
        let grpc_listener = match config.grpc {
            Some(addr) => {
                let listener =
                    std::net::TcpListener::bind(addr).map_err(|e| EngineError::Serve {
                        addr: addr.to_string(),
                        message: format!(
                            "{e} (is another spendflow running? choose another address with --grpc)"
                        ),
                    })?;
                listener
                    .set_nonblocking(true)
                    .map_err(|e| EngineError::Serve {
                        addr: addr.to_string(),
                        message: e.to_string(),
                    })?;
                Some(listener)
            }
            None => None,
        };

        let web_listener = config.web.map(serve::web::WebServer::bind).transpose()?;

        let spawn_error = |e: std::io::Error| EngineError::Workers(e.to_string());
        // The restored state is published as one delta through `first_epoch - 1`. The sink
        // skips it when it holds that state already (it committed the checkpoint's epoch);
        // a sink that did not (a new keyspace) gets all of it.
        let sink_has_checkpoint = restored_epoch.is_some_and(|c| {
            sink.as_ref()
                .and_then(|(_, start)| start.committed_epoch)
                .is_some_and(|committed| committed >= c)
        });
        let mut outputs = pipeline::Outputs {
            restored: sink_has_checkpoint.then(|| first_epoch - 1),
            ..pipeline::Outputs::default()
        };
        let sink_thread = match sink {
            Some((sink, _)) => {
                let max_cells = match &config.sink {
                    Some(config::SinkConfig::Cassandra(c)) => c.max_group_cells,
                    None => usize::MAX,
                };
                let inbox = Arc::new(pipeline::SinkInbox::new(max_cells));
                outputs.sink = Some(Arc::clone(&inbox));
                let shared = Arc::clone(&shared);
                Some(
                    std::thread::Builder::new()
                        .name("spendflow-sink".into())
                        .spawn(move || pipeline::run_sink(inbox, sink, &shared))
                        .map_err(spawn_error)?,
                )
            }
            None => None,
        };
        let checkpointer = match store {
            Some(store) => {
                let (tx, rx) = crossbeam_channel::unbounded();
                outputs.checkpoints = Some(tx);
                let shared = Arc::clone(&shared);
                let wait_for_sink = sink_thread.is_some();
                Some(
                    std::thread::Builder::new()
                        .name("spendflow-checkpoint".into())
                        .spawn(move || {
                            pipeline::run_checkpointer(
                                rx,
                                workers,
                                Box::new(store),
                                &shared,
                                wait_for_sink,
                            )
                        })
                        .map_err(spawn_error)?,
                )
            }
            None => None,
        };

        let (reports_tx, reports_rx) = pipeline::report_channel();
        let publisher = std::thread::Builder::new()
            .name("spendflow-publisher".into())
            .spawn(move || pipeline::run_publisher(reports_rx, workers, writer, outputs))
            .map_err(spawn_error)?;

        let worker_shared = Arc::clone(&shared);
        let worker_thread = std::thread::Builder::new()
            .name("spendflow-workers".into())
            .spawn(move || {
                let reports_tx = Mutex::new(reports_tx);
                let result = spendflow_operators::runtime::execute(workers, move |ctx| {
                    let sources = per_worker
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(ctx.index())
                        .and_then(Option::take)
                        .unwrap_or_default();
                    let reports = reports_tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    pipeline::run_worker(ctx, &worker_shared, sources, reports);
                });
                if let Err(e) = &result {
                    tracing::error!(error = %e, "Dataflow workers failed; the served state no longer advances.");
                }
                result
            })
            .map_err(|e| EngineError::Workers(e.to_string()))?;

        let status = StatusProbe {
            shared: Arc::clone(&shared),
            read_model: Arc::clone(&read_model),
        };
        let grpc = match grpc_listener {
            Some(listener) => Some(GrpcServer::start(
                listener,
                Arc::clone(&read_model),
                status,
                personnel.clone(),
            )?),
            None => None,
        };

        let web = match web_listener {
            Some(listener) => Some(serve::web::WebServer::start(
                listener,
                serve::web::WebContext {
                    read_model: Arc::clone(&read_model),
                    status: StatusProbe {
                        shared: Arc::clone(&shared),
                        read_model: Arc::clone(&read_model),
                    },
                    personnel: personnel.clone(),
                },
            )?),
            None => None,
        };

        Ok(Engine {
            config,
            input,
            read_model,
            shared,
            workers: Some(worker_thread),
            publisher: Some(publisher),
            sink_thread,
            sink_stop,
            checkpointer,
            grpc,
            web,
        })
    }

    /// A handle to push records into the engine.
    pub fn input(&self) -> InputHandle {
        self.input.clone()
    }

    /// The read model: snapshots, read-your-writes waits and subscriptions.
    pub fn read_model(&self) -> &Arc<ReadModel> {
        &self.read_model
    }

    /// Counters, positions and whether the engine has caught up.
    pub fn status(&self) -> Status {
        self.status_probe().status()
    }

    /// Why the engine stopped on its own, if it did (the durable sink was fenced by another
    /// engine or failed for good). A running engine returns `None`.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The newest epoch the durable sink has committed, if there is a durable sink and it has
    /// committed anything in this run.
    pub fn sink_committed(&self) -> Option<spendflow_operators::Epoch> {
        Some(self.shared.sink_committed.load(Ordering::Acquire)).filter(|&e| e > 0)
    }

    fn status_probe(&self) -> StatusProbe {
        StatusProbe {
            shared: Arc::clone(&self.shared),
            read_model: Arc::clone(&self.read_model),
        }
    }

    /// The address the gRPC server listens on, if it runs.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().map(|g| g.addr)
    }

    /// The address the web report listens on, if it runs.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web.as_ref().map(|w| w.addr())
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Waits until the served state includes everything the sources have made available.
    /// Returns false on timeout.
    pub fn wait_caught_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            // Pending input first: once the channel is empty, every record pushed before this
            // call has been taken, and is either counted in the status or in a poll that keeps
            // its worker from looking idle.
            if self.input.pending() == 0 && self.status().caught_up {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the sources, closes the last epoch, publishes it, and stops every thread.
    ///
    /// # Errors
    ///
    /// [`EngineError::Workers`] if a worker thread failed.
    pub fn shutdown(mut self) -> Result<(), EngineError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), EngineError> {
        self.shared.stop.store(true, Ordering::Release);
        // A worker waiting for room in an undeliverable dead-letter output must not hold the
        // shutdown: what is undelivered is covered by no checkpoint.
        self.shared.dead_letters.close();
        let mut result = Ok(());
        if let Some(workers) = self.workers.take() {
            match workers.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => result = Err(EngineError::Workers(e)),
                Err(_) => result = Err(EngineError::Workers("the worker thread panicked".into())),
            }
        }
        if let Some(publisher) = self.publisher.take()
            && publisher.join().is_err()
        {
            result = Err(EngineError::Workers("the publisher thread panicked".into()));
        }
        if let Some(sink) = self.sink_thread.take() {
            // Let the sink write what is queued; if Cassandra does not take it in time, stop
            // retrying: the next start writes it again from the checkpoint.
            let deadline = Instant::now() + SINK_SHUTDOWN_GRACE;
            while !sink.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.sink_stop.store(true, Ordering::Release);
            if sink.join().is_err() {
                result = Err(EngineError::Workers("the sink thread panicked".into()));
            }
        }
        if let Some(checkpointer) = self.checkpointer.take()
            && checkpointer.join().is_err()
        {
            result = Err(EngineError::Workers(
                "the checkpoint thread panicked".into(),
            ));
        }
        if !self.shared.dead_letters.flush() {
            // Not lost: no checkpoint covers their records (checkpoints wait for delivery).
            tracing::warn!(
                "Some dead letters were not delivered before shutdown; a restart from the last checkpoint sends them again."
            );
        }
        // Ends open subscriptions, so the gRPC server's graceful shutdown does not wait on them.
        self.read_model.close();
        if let Some(mut grpc) = self.grpc.take() {
            grpc.stop();
        }
        if let Some(mut web) = self.web.take() {
            web.stop();
        }
        result
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.workers.is_some() {
            let _ = self.stop();
        }
    }
}

impl GrpcServer {
    fn start(
        listener: std::net::TcpListener,
        read_model: Arc<ReadModel>,
        status: StatusProbe,
        personnel: Option<Arc<personnel::Personnel>>,
    ) -> Result<GrpcServer, EngineError> {
        let addr = listener.local_addr().map_err(|e| EngineError::Serve {
            addr: "?".into(),
            message: e.to_string(),
        })?;
        let serve_error = |message: String| EngineError::Serve {
            addr: addr.to_string(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("spendflow-grpc")
            .enable_all()
            .build()
            .map_err(|e| serve_error(e.to_string()))?;
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("spendflow-grpc-main".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
                    let mut graceful = stopped.clone();
                    let shutdown = async move {
                        let _ = graceful.wait_for(|s| *s).await;
                    };
                    tokio::spawn(async move {
                        let _ = shutdown_rx.await;
                        let _ = stopping.send(true);
                    });
                    // Graceful shutdown waits for clients to hang up; one that never does (an
                    // idle connection nobody polls) must not hold the engine forever.
                    let forced = async move {
                        let _ = stopped.wait_for(|s| *s).await;
                        tokio::time::sleep(GRPC_SHUTDOWN_GRACE).await;
                    };
                    tokio::select! {
                        served = serve::grpc::serve(listener, read_model, status, personnel, shutdown) => served,
                        () = forced => {
                            tracing::warn!("gRPC clients still connected at shutdown; closing their connections.");
                            Ok(())
                        }
                    }
                })
            })
            .map_err(|e| serve_error(e.to_string()))?;
        Ok(GrpcServer {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server ended with an error."),
                Err(_) => tracing::warn!("gRPC server thread panicked."),
            }
        }
    }
}
