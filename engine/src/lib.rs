//! spendflow's engine: where expense records come from, how they flow through the dataflow, and
//! where results go. `spendflow-operators` says *what* is computed; this crate says *where*.
//!
//! Modules in data-path order (`ARCHITECTURE.md` at the repository root has the map):
//!
//! 1. [`source`]: where records come from: the in-process input, files, the simulator, Kafka
//!    (feature `kafka`). Each kind builds one worker's readers from restored positions.
//! 2. `pipeline`: the threads a record passes through: workers (poll, decode, push, cut
//!    epochs, step), the publisher, the sink driver, the checkpointer.
//! 3. [`sink`]: durable sinks behind the [`sink::Sink`] contract (Cassandra with feature
//!    `cassandra`, memory, or the embedder's own) and dead letters.
//! 4. [`serve`]: the read model every engine has, status, and (features `grpc`, `web`) the
//!    query services and the live web report.
//! 5. [`checkpoint`]: the state and positions a restart resumes from.
//!
//! [`core`] holds the types all of them share; `start` starts them in this order. The
//! workload tools ([`generate`], [`verify`]) and [`personnel`] are behind features of their own
//! (`workload`, `personnel`); `default-features = false` builds the embedded engine alone.
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

#[cfg(feature = "cassandra")]
pub mod cassandra;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod core;
pub mod error;
#[cfg(feature = "workload")]
pub mod generate;
#[cfg(feature = "personnel")]
pub mod images;
#[cfg(feature = "kafka")]
pub mod kafka_client;
pub mod metrics;
#[cfg(any(feature = "personnel", feature = "workload", feature = "mysql-cdc"))]
pub mod mysql_client;
#[cfg(feature = "personnel")]
pub mod personnel;
pub(crate) mod pipeline;
pub mod serve;
pub mod sink;
pub mod source;
mod start;
#[cfg(feature = "workload")]
pub mod verify;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{EngineConfig, SourceConfig};
pub use error::{EngineError, SourceError};
pub use serve::read_model::{ReadModel, Snapshot};
pub use serve::status::Status;
pub use source::input::InputHandle;

use crate::pipeline::Shared;
use crate::serve::status::StatusProbe;

/// How long shutdown waits for gRPC and web clients to hang up before closing their
/// connections.
const SERVERS_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long a stopping cluster process waits for the other processes to stop too.
const CLUSTER_STOP_GRACE: Duration = Duration::from_secs(30);

/// How long shutdown waits for the durable sink to write what is queued.
const SINK_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Configures and starts an [`Engine`].
#[derive(Debug, Default)]
pub struct EngineBuilder {
    config: EngineConfig,
    #[cfg(feature = "personnel")]
    personnel: Option<Arc<personnel::Personnel>>,
    sink: Option<Box<dyn sink::Sink>>,
    runtime: Option<tokio::runtime::Handle>,
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

    /// A durable sink of the embedding program's own (see [`sink::Sink`] for the contract),
    /// instead of one named in the configuration.
    pub fn sink(mut self, sink: impl sink::Sink + 'static) -> Self {
        self.sink = Some(Box::new(sink));
        self
    }

    /// Runs the engine's servers and its sink on the embedding program's tokio runtime
    /// instead of one of its own. The engine's blocking calls (`start`, `shutdown`, dropping
    /// it) must then still be made outside that runtime's threads.
    ///
    /// ```
    /// let runtime = tokio::runtime::Runtime::new()?;
    /// let engine = spendflow_engine::Engine::builder()
    ///     .runtime(runtime.handle().clone())
    ///     .start()?;
    /// engine.shutdown()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    /// User details and pictures for the `Personnel` gRPC service; without it those calls
    /// answer `FAILED_PRECONDITION`. See [`personnel::Personnel`].
    #[cfg(feature = "personnel")]
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
        Engine::start(self)
    }
}

/// A running engine. Dropping it shuts it down.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    input: InputHandle,
    read_model: Arc<ReadModel>,
    shared: Arc<Shared>,
    workers: Option<JoinHandle<Result<Vec<()>, spendflow_operators::runtime::WorkersFailed>>>,
    publisher: Option<JoinHandle<()>>,
    sink_thread: Option<JoinHandle<()>>,
    /// Makes the sink's retries give up (at shutdown, after a grace period).
    sink_stop: Arc<std::sync::atomic::AtomicBool>,
    checkpointer: Option<JoinHandle<()>>,
    servers: start::Servers,
    /// Last, so it is dropped after everything that runs on it.
    runtime: start::EngineRuntime,
}

impl Engine {
    /// A builder with default settings: one worker, no source but the in-process input, no
    /// gRPC server.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    fn start(builder: EngineBuilder) -> Result<Engine, EngineError> {
        let EngineBuilder {
            config,
            #[cfg(feature = "personnel")]
            personnel,
            sink,
            runtime,
        } = builder;
        config.validate()?;
        let runtime = start::EngineRuntime::new(runtime)?;
        let mut recovered = start::recover(&config, sink, &runtime.handle())?;
        let placement = start::join_cluster(&config, &mut recovered)?;
        let restored = recovered.positions();
        let (input, sources) = start::open_sources(&config, &restored)?;
        let restoring = recovered.restored.is_some();
        let (shared, read_model, writer) = start::shared_state(&config, &mut recovered, &restored)?;
        if let Some(spec) = &shared.cluster {
            cluster::exit_when_a_peer_is_lost(Arc::clone(&shared), Arc::clone(spec));
        }
        let listeners = start::bind(&config)?;
        let start::Recovered {
            store,
            sink,
            sink_stop,
            #[cfg(feature = "kafka")]
            alerts,
            ..
        } = recovered;
        let alerts = start::Alerts {
            #[cfg(feature = "kafka")]
            output: alerts,
            restored: restoring,
        };
        let (sink, sink_committed) = sink.unzip();
        let threads = start::spawn(
            placement,
            config.workers,
            &shared,
            sink,
            store,
            sink_committed.flatten(),
            writer,
            sources,
            alerts,
        )?;
        let servers = start::serve(
            listeners,
            &runtime.handle(),
            &shared,
            &read_model,
            #[cfg(feature = "personnel")]
            personnel,
        )?;
        Ok(Engine {
            config,
            input,
            read_model,
            shared,
            workers: Some(threads.workers),
            publisher: Some(threads.publisher),
            sink_thread: threads.sink,
            sink_stop,
            checkpointer: threads.checkpointer,
            servers,
            runtime,
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
        self.shared.fatal.lock().clone()
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
        self.servers.grpc_addr
    }

    /// The address the web report listens on, if it runs.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.servers.web_addr
    }

    /// The address `/metrics` is served on by itself (`EngineConfig::metrics`), if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.servers.metrics_addr
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
            if self.shared.cluster.is_some() {
                // The dataflow ends only when every process's input has ended: a process asked to
                // stop alone would wait for the others for ever.
                let deadline = Instant::now() + CLUSTER_STOP_GRACE;
                while !workers.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if !workers.is_finished() {
                    let message = format!(
                        "the other processes of the cluster did not stop within {}s: stop every process of the cluster together (e.g. SIGTERM to each); this process exits without a clean end (a restart resumes from the newest complete checkpoint)",
                        CLUSTER_STOP_GRACE.as_secs()
                    );
                    tracing::error!("{message}");
                    self.read_model.close();
                    self.servers
                        .stop(&self.runtime.handle(), SERVERS_SHUTDOWN_GRACE);
                    return Err(EngineError::Cluster {
                        message,
                        retriable: false,
                    });
                }
            }
            match workers.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => result = Err(EngineError::Workers(e.0)),
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
        self.servers
            .stop(&self.runtime.handle(), SERVERS_SHUTDOWN_GRACE);
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
