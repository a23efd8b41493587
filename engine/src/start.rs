//! How an engine starts, in the order it happens:
//!
//! 1. [`recover`]: lock the checkpoint directory and read the newest checkpoint; open the
//!    durable sink and learn what it committed. Epochs continue past both.
//! 2. [`open_sources`]: every worker's readers, resuming at the checkpoint's positions.
//! 3. [`shared_state`]: the read model, dead letters, the epoch clock and what the threads
//!    share.
//! 4. [`spawn`]: the sink driver, the checkpointer, the publisher and the workers (in the
//!    reverse of data-path order, so each thread's consumer runs before it produces).
//! 5. [`serve`]: gRPC and the web report.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use parking_lot::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use spendflow_operators::Epoch;

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointStore};
use crate::pipeline::{self, EpochClock, Shared};
#[cfg(feature = "grpc")]
use crate::serve;
use crate::serve::read_model::{self, ReadModel, ReadModelWriter};
use crate::serve::status::StatusProbe;
use crate::sink::dead_letter::DeadLetters;
use crate::sink::{Sink, SinkContext, SinkInbox};
use crate::source::{self, RestoredPositions, Source, WorkerPlace};
use crate::{EngineConfig, EngineError, InputHandle};

/// What step 1 found.
pub(crate) struct Recovered {
    /// The checkpoint store, when checkpoints are on.
    pub store: Option<Box<dyn CheckpointStore>>,
    /// The newest readable checkpoint.
    pub restored: Option<Checkpoint>,
    /// The durable sink, opened, and the newest epoch it had committed.
    pub sink: Option<(Box<dyn Sink>, Option<Epoch>)>,
    /// Makes the sink's retries give up (at shutdown, after a grace period).
    pub sink_stop: Arc<AtomicBool>,
    /// A new incarnation, for a run that does not continue a checkpoint's.
    fresh_incarnation: String,
    /// The alerts topic, opened and read (it is compared with before anything is written).
    #[cfg(feature = "kafka")]
    pub alerts: Option<crate::sink::alerts::kafka::AlertsOutput>,
    /// In a cluster, the start every process agreed on (see [`join_cluster`]).
    pub agreed: Option<crate::cluster::Agreed>,
}

impl Recovered {
    /// The first epoch of this run: after everything the checkpoint and the sink hold (in a
    /// cluster: those of every process).
    pub fn first_epoch(&self) -> Epoch {
        if let Some(agreed) = &self.agreed {
            return agreed.first_epoch;
        }
        self.own_first_epoch()
    }

    /// The first epoch after what this process's checkpoint and sink share hold.
    fn own_first_epoch(&self) -> Epoch {
        self.restored
            .as_ref()
            .map(|c| c.epoch)
            .max(self.sink.as_ref().and_then(|(_, committed)| *committed))
            .unwrap_or(0)
            + 1
    }

    /// The incarnation of this run's epochs. Epochs continue a previous timeline only when a
    /// checkpoint is restored: then they keep its incarnation; otherwise (or for a checkpoint
    /// from before incarnations) a new one. In a cluster, process 0's.
    pub fn incarnation(&self) -> String {
        if let Some(agreed) = &self.agreed {
            return agreed.incarnation.clone();
        }
        self.restored
            .as_ref()
            .map(|c| c.incarnation.clone())
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| self.fresh_incarnation.clone())
    }

    /// Where each partition resumes.
    pub fn positions(&self) -> RestoredPositions {
        self.restored
            .iter()
            .flat_map(|c| &c.positions)
            .map(|p| ((p.source.clone(), p.partition), p.position))
            .collect()
    }
}

/// Step 1: the newest checkpoint (refusing to start over an unreadable one unless told to
/// discard it) and the durable sink, opened.
pub(crate) fn recover(
    config: &EngineConfig,
    sink: Option<Box<dyn Sink>>,
    runtime: &tokio::runtime::Handle,
) -> Result<Recovered, EngineError> {
    let (store, restored) = match &config.checkpoint {
        Some(c) => {
            let share = config
                .cluster
                .as_ref()
                .map_or(crate::cluster::Share::SINGLE, |c| c.share());
            let mut store = crate::checkpoint::open_store(&c.dir, share)?;
            let latest = match store.latest() {
                Err(CheckpointError::Unreadable { refused, .. }) if c.discard_unreadable => {
                    for (path, why) in &refused {
                        tracing::warn!(path = %path, reason = %why, "--discard-checkpoints: discarding an unreadable checkpoint.");
                    }
                    for (from, to) in store.discard_all()? {
                        tracing::warn!(
                            %from,
                            %to,
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
    let sink_stop = Arc::new(AtomicBool::new(false));
    let sink = match sink.or_else(|| config.sink.as_ref().map(|s| s.build())) {
        Some(mut sink) => {
            let ctx = SinkContext {
                owner: format!("spendflow pid {}", std::process::id()),
                stop: Arc::clone(&sink_stop),
                runtime: runtime.clone(),
                share: config
                    .cluster
                    .as_ref()
                    .map_or(crate::cluster::Share::SINGLE, |c| c.share()),
            };
            tracing::info!(sink = sink.name(), "Opening the durable sink.");
            let committed = sink.open(&ctx)?;
            tracing::info!(sink = sink.name(), committed_epoch = ?committed, "Durable sink open.");
            Some((sink, committed))
        }
        None => None,
    };
    #[cfg(feature = "kafka")]
    let alerts = match &config.alerts {
        Some(alerts) => {
            tracing::info!(topic = %alerts.topic, "Opening the alerts topic.");
            Some(crate::sink::alerts::kafka::AlertsOutput::open(alerts)?)
        }
        None => None,
    };
    Ok(Recovered {
        store,
        restored,
        sink,
        sink_stop,
        fresh_incarnation: read_model::new_incarnation(),
        agreed: None,
        #[cfg(feature = "kafka")]
        alerts,
    })
}

/// Step 1b, cluster mode only: join the other processes (a bounded wait) and agree on the start
/// (the first epoch and the incarnation, the same in every process). A single engine runs its
/// workers locally.
pub(crate) fn join_cluster(
    config: &EngineConfig,
    recovered: &mut Recovered,
) -> Result<spendflow_operators::runtime::Placement, EngineError> {
    use spendflow_operators::runtime::Placement;
    let Some(spec) = &config.cluster else {
        return Ok(Placement::Local(config.workers));
    };
    let (connected, agreed) = crate::cluster::join(
        spec,
        config.workers,
        recovered.restored.as_ref().map(|c| c.epoch),
        recovered.own_first_epoch(),
        &recovered.incarnation(),
    )?;
    recovered.agreed = Some(agreed);
    Ok(Placement::Cluster(connected))
}

/// Step 2: the in-process input, and this process's workers' readers, one list per local
/// worker. Partitions are divided among all workers of the computation (of every process, in
/// a cluster); the in-process input is read by worker 0.
pub(crate) fn open_sources(
    config: &EngineConfig,
    restored: &RestoredPositions,
) -> Result<(InputHandle, Vec<Vec<Box<dyn Source>>>), EngineError> {
    let topology = config.topology();
    let (input, input_source) = source::input::channel();
    let mut input_source = (topology.process == 0).then_some(input_source);
    let mut per_worker = Vec::with_capacity(config.workers);
    for local in 0..topology.workers_per_process {
        let place = WorkerPlace {
            index: topology.global_worker(local),
            count: topology.peers(),
        };
        let mut readers = Vec::new();
        for source in config.source.iter().chain(&config.reference) {
            readers.extend(source.open_readers(place, restored)?);
        }
        if let Some(input) = input_source.take() {
            readers.push(Box::new(input));
        }
        per_worker.push(readers);
    }
    Ok((input, per_worker))
}

/// Step 3: the read model (and its writer, for the publisher) and the state the threads share.
pub(crate) fn shared_state(
    config: &EngineConfig,
    recovered: &mut Recovered,
    #[cfg_attr(not(feature = "kafka"), allow(unused_variables))] restored: &RestoredPositions,
) -> Result<(Arc<Shared>, Arc<ReadModel>, ReadModelWriter), EngineError> {
    let incarnation: Arc<str> = recovered.incarnation().into();
    tracing::info!(%incarnation, "Incarnation of this run's epochs.");
    let (read_model, mut writer) = ReadModel::with_incarnation(Arc::clone(&incarnation));
    writer.set_reporting_currency(config.dataflow_options().reporting_currency);

    #[cfg_attr(not(feature = "kafka"), allow(unused_mut))]
    let mut dead_letters = DeadLetters::with_capacity(config.dead_letter_capacity);
    #[cfg(feature = "kafka")]
    if let Some(source::SourceConfig::Kafka(k)) = &config.source {
        let mut output = crate::sink::dead_letter::kafka::KafkaDeadLetters::new(
            &k.brokers,
            &config.dead_letter_topic,
            &k.librdkafka_options,
        )
        .map_err(|e| crate::SourceError::Kafka {
            message: format!("dead-letter producer: {e}"),
            retriable: false,
        })?;
        if config.checkpoint.is_some() {
            // Input after the checkpoint is read again: its dead letters are already in the
            // topic, and must not be sent twice.
            output.skip_written(
                &k.brokers,
                restored,
                recovered
                    .restored
                    .as_ref()
                    .and_then(|c| c.dead_letter_scan.as_ref()),
            )?;
        }
        dead_letters = dead_letters.with_output(Box::new(output));
    }
    let topology = config.topology();
    // The restored counts are process 0's to show (each process counts what it rejects; their
    // sum is the cluster's).
    if let Some(restored) = &recovered.restored
        && topology.process == 0
    {
        dead_letters.restore_counts(&restored.rejected);
    }

    let clock = EpochClock::starting_at(
        recovered.first_epoch(),
        config.epoch_interval(),
        config.epoch_budget,
        config
            .checkpoint
            .as_ref()
            .map(|c| Duration::from_millis(c.interval_ms)),
    );
    let clock = if topology.process > 0 {
        clock.follow_the_leader()
    } else {
        clock
    };
    let mut shared = Shared::new(config.workers, clock, Arc::new(dead_letters));
    if recovered.sink.is_some() {
        // What an earlier run wrote may be ahead of its checkpoint (and of its committed
        // progress): re-read input must rewrite every cell it touches.
        shared = shared.with_replay();
    }
    shared.checkpoints_enabled = config.checkpoint.is_some();
    shared.topology = topology;
    shared.cluster = config.cluster.clone().map(Arc::new);
    shared.incarnation = incarnation;
    shared.dataflow_options = config.dataflow_options();
    if let Some(restored) = recovered.restored.take() {
        shared = shared.restore_from(restored);
    }
    Ok((Arc::new(shared), read_model, writer))
}

/// The alerts output step 1 opened, for step 4.
pub(crate) struct Alerts {
    /// The alerts topic, if `--alerts-topic`.
    #[cfg(feature = "kafka")]
    pub output: Option<crate::sink::alerts::kafka::AlertsOutput>,
    /// True when a checkpoint was restored (the first published delta is its state).
    pub restored: bool,
}

/// The threads step 4 starts.
pub(crate) struct Threads {
    pub workers: JoinHandle<Result<Vec<()>, spendflow_operators::runtime::WorkersFailed>>,
    pub publisher: JoinHandle<()>,
    pub sink: Option<JoinHandle<()>>,
    pub checkpointer: Option<JoinHandle<()>>,
}

/// Step 4: the sink driver, the checkpointer, the publisher and the workers.
pub(crate) fn spawn(
    placement: spendflow_operators::runtime::Placement,
    workers: usize,
    shared: &Arc<Shared>,
    sink: Option<Box<dyn Sink>>,
    store: Option<Box<dyn CheckpointStore>>,
    sink_committed: Option<Epoch>,
    writer: ReadModelWriter,
    sources: Vec<Vec<Box<dyn Source>>>,
    alerts: Alerts,
) -> Result<Threads, EngineError> {
    let spawn_error = |e: std::io::Error| EngineError::Workers(e.to_string());
    // The alerts topic (Kafka only): the publisher feeds it, the checkpointer waits for it.
    type AlertsParts = (
        Option<pipeline::AlertsCommitted>,
        Option<Box<dyn crate::sink::alerts::AlertsSink>>,
    );
    #[cfg(feature = "kafka")]
    let (alerts_committed, alerts_output): AlertsParts = match alerts.output {
        Some(output) => (
            Some(Box::new(output.committed_probe())),
            Some(Box::new(output)),
        ),
        None => (None, None),
    };
    #[cfg(not(feature = "kafka"))]
    let (alerts_committed, alerts_output): AlertsParts = (None, None);
    let mut outputs = pipeline::Outputs {
        sink_committed,
        epoch_cuts: Arc::clone(&shared.clock.cuts),
        restored: alerts.restored,
        alerts: alerts_output,
        ..pipeline::Outputs::default()
    };
    let sink = match sink {
        Some(sink) => {
            let inbox = Arc::new(SinkInbox::new(sink.max_group_cells()));
            outputs.sink = Some(Arc::clone(&inbox));
            let shared = Arc::clone(shared);
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
            let shared = Arc::clone(shared);
            let wait_for_sink = sink.is_some();
            Some(
                std::thread::Builder::new()
                    .name("spendflow-checkpoint".into())
                    .spawn(move || {
                        pipeline::run_checkpointer(
                            rx,
                            workers,
                            store,
                            &shared,
                            wait_for_sink,
                            alerts_committed,
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

    // Each worker takes its own readers when the dataflow runtime starts it.
    let per_worker: Mutex<Vec<Option<Vec<Box<dyn Source>>>>> =
        Mutex::new(sources.into_iter().map(Some).collect());
    let shared = Arc::clone(shared);
    let workers = std::thread::Builder::new()
        .name("spendflow-workers".into())
        .spawn(move || {
            let reports_tx = Mutex::new(reports_tx);
            let result = spendflow_operators::runtime::execute_on(placement, move |ctx| {
                let local = shared.topology.local_worker(ctx.index());
                let sources = per_worker
                    .lock()
                    .get_mut(local)
                    .and_then(Option::take)
                    .unwrap_or_default();
                let reports = reports_tx.lock().clone();
                pipeline::run_worker(ctx, &shared, sources, reports);
            });
            if let Err(e) = &result {
                tracing::error!(error = %e, "Dataflow workers failed; the served state no longer advances.");
            }
            result
        })
        .map_err(spawn_error)?;
    Ok(Threads {
        workers,
        publisher,
        sink,
        checkpointer,
    })
}

/// The async runtime the engine's services and its sink run on: its own, or the one an
/// embedding program handed over (`EngineBuilder::runtime`).
#[derive(Debug)]
pub(crate) enum EngineRuntime {
    /// Built by the engine and shut down with it (`None` once shut down).
    Owned(Option<tokio::runtime::Runtime>),
    /// The embedding program's; it outlives the engine.
    Borrowed(tokio::runtime::Handle),
}

impl EngineRuntime {
    /// The embedder's runtime, or a new one with two worker threads (gRPC, the web report and
    /// the sink's requests are I/O bound; the dataflow runs on its own threads).
    pub fn new(handle: Option<tokio::runtime::Handle>) -> Result<Self, EngineError> {
        match handle {
            Some(handle) => Ok(EngineRuntime::Borrowed(handle)),
            None => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("spendflow-io")
                .enable_all()
                .build()
                .map(|runtime| EngineRuntime::Owned(Some(runtime)))
                .map_err(|e| EngineError::Workers(format!("the async runtime: {e}"))),
        }
    }

    /// A handle to spawn on or block on (from threads outside the runtime).
    pub fn handle(&self) -> tokio::runtime::Handle {
        match self {
            EngineRuntime::Owned(Some(runtime)) => runtime.handle().clone(),
            EngineRuntime::Owned(None) => unreachable!("the runtime is shut down only on drop"),
            EngineRuntime::Borrowed(handle) => handle.clone(),
        }
    }
}

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        // Without blocking: a runtime dropped on an async thread would panic otherwise. The
        // servers and the sink are stopped before this.
        if let EngineRuntime::Owned(runtime) = self
            && let Some(runtime) = runtime.take()
        {
            runtime.shutdown_background();
        }
    }
}

/// Listeners bound before anything starts, so a taken port fails fast.
/// Listeners bound before anything starts, so a taken port fails fast.
pub(crate) struct Listeners {
    /// TLS (read and checked before binding) and limits of both servers.
    #[cfg(feature = "grpc")]
    transport: serve::transport::Transport,
    #[cfg(feature = "grpc")]
    grpc: Option<std::net::TcpListener>,
    #[cfg(feature = "web")]
    web: Option<std::net::TcpListener>,
    // --- metrics ---
    #[cfg(feature = "web")]
    metrics: Option<std::net::TcpListener>,
    /// Token auth of both servers (`None`: off), its key read and checked before serving.
    #[cfg(feature = "grpc")]
    auth: Option<Arc<serve::auth::Authenticator>>,
}

/// Binds the configured addresses.
pub(crate) fn bind(config: &EngineConfig) -> Result<Listeners, EngineError> {
    #[cfg(not(feature = "grpc"))]
    if config.grpc.is_some() {
        return Err(EngineError::Config(
            "gRPC is configured, but this build of spendflow-engine has no `grpc` feature".into(),
        ));
    }
    #[cfg(not(feature = "web"))]
    if config.web.is_some() {
        return Err(EngineError::Config(
            "the web report is configured, but this build of spendflow-engine has no `web` feature"
                .into(),
        ));
    }
    // TLS files are read and checked before anything is bound, so a bad file says which.
    #[cfg(feature = "grpc")]
    let transport = serve::transport::Transport::load(&config.security)
        .map_err(|e| EngineError::Config(e.to_string()))?;
    #[cfg(not(feature = "grpc"))]
    if config.security.tls.is_some() {
        return Err(EngineError::Config(
            "TLS is configured, but this build of spendflow-engine serves nothing (no `grpc` feature)".into(),
        ));
    }
    #[cfg(feature = "grpc")]
    let grpc = match config.grpc {
        Some(addr) => {
            let serve_error = |message: String| EngineError::Serve {
                addr: addr.to_string(),
                message,
            };
            let listener = std::net::TcpListener::bind(addr).map_err(|e| {
                serve_error(format!(
                    "{e} (is another spendflow running? choose another address with --grpc)"
                ))
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| serve_error(e.to_string()))?;
            Some(listener)
        }
        None => None,
    };
    #[cfg(feature = "web")]
    let web = config.web.map(serve::web::WebServer::bind).transpose()?;
    // --- metrics ---
    #[cfg(not(feature = "web"))]
    if config.metrics.is_some() {
        return Err(EngineError::Config(
            "metrics are configured, but this build of spendflow-engine has no `web` feature"
                .into(),
        ));
    }
    #[cfg(feature = "web")]
    let metrics = config
        .metrics
        .map(crate::metrics::exporter::bind)
        .transpose()?;
    #[cfg(feature = "grpc")]
    let auth = serve::auth::Authenticator::from_config(&config.security)
        .map_err(|e| EngineError::Config(format!("token auth: {e}")))?;
    Ok(Listeners {
        #[cfg(feature = "grpc")]
        transport,
        #[cfg(feature = "grpc")]
        grpc,
        #[cfg(feature = "web")]
        web,
        #[cfg(feature = "web")]
        metrics,
        #[cfg(feature = "grpc")]
        auth,
    })
}

/// A bound std listener as a tokio one on `runtime`, with its address.
#[cfg(feature = "grpc")]
fn async_listener(
    runtime: &tokio::runtime::Handle,
    listener: std::net::TcpListener,
) -> std::io::Result<(Option<SocketAddr>, tokio::net::TcpListener)> {
    let addr = listener.local_addr().ok();
    let _context = runtime.enter();
    Ok((addr, tokio::net::TcpListener::from_std(listener)?))
}

/// Completes once the shutdown signal is sent.
#[cfg(feature = "grpc")]
fn signalled(
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut stopped = stopped.clone();
    async move {
        let _ = stopped.wait_for(|s| *s).await;
    }
}

/// Why a server task ended with an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServerError {
    #[cfg(feature = "grpc")]
    #[error(transparent)]
    Grpc(#[from] serve::grpc::GrpcError),
    #[cfg(feature = "web")]
    #[error("web report: {0}")]
    Web(#[from] std::io::Error),
}

/// The running servers, and one signal that stops them all.
#[derive(Debug)]
pub(crate) struct Servers {
    pub grpc_addr: Option<SocketAddr>,
    pub web_addr: Option<SocketAddr>,
    /// Where `--metrics` serves `/metrics` alone.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<(
        &'static str,
        tokio::task::JoinHandle<Result<(), ServerError>>,
    )>,
}

impl Servers {
    /// Stops accepting, lets clients finish for `grace`, then closes what is still open.
    /// Blocking: call it outside the runtime.
    pub fn stop(&mut self, runtime: &tokio::runtime::Handle, grace: Duration) {
        let _ = self.shutdown.send(true);
        for (name, task) in self.tasks.drain(..) {
            let abort = task.abort_handle();
            match runtime.block_on(async { tokio::time::timeout(grace, task).await }) {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(server = name, error = %e, "Server ended with an error.")
                }
                Ok(Err(e)) if e.is_cancelled() => {}
                Ok(Err(e)) => tracing::warn!(server = name, error = %e, "Server task failed."),
                Err(_) => {
                    tracing::warn!(
                        server = name,
                        "Clients still connected at shutdown; closing their connections."
                    );
                    abort.abort();
                }
            }
        }
    }
}

/// Step 5: gRPC and the web report, on the listeners bound before, as tasks of the engine's
/// runtime. (Without the `grpc` feature there is nothing to serve.)
#[cfg_attr(not(feature = "grpc"), allow(unused_variables, unused_mut))]
pub(crate) fn serve(
    listeners: Listeners,
    runtime: &tokio::runtime::Handle,
    shared: &Arc<Shared>,
    read_model: &Arc<ReadModel>,
    #[cfg(feature = "personnel")] personnel: Option<Arc<crate::personnel::Personnel>>,
) -> Result<Servers, EngineError> {
    let (shutdown, stopped) = tokio::sync::watch::channel(false);
    let mut servers = Servers {
        grpc_addr: None,
        web_addr: None,
        metrics_addr: None,
        shutdown,
        tasks: Vec::new(),
    };
    let status = || StatusProbe {
        shared: Arc::clone(shared),
        read_model: Arc::clone(read_model),
    };
    // Replaced and deleted pictures go once their grace period is over, while this serves.
    #[cfg(feature = "personnel")]
    if let Some(personnel) = &personnel {
        let collecting = Arc::clone(personnel)
            .collect_garbage_periodically(crate::personnel::GC_INTERVAL, signalled(&stopped));
        let task = runtime.spawn(async move {
            collecting.await;
            Ok(())
        });
        servers.tasks.push(("image gc", task));
    }
    #[cfg(feature = "grpc")]
    if let Some(listener) = listeners.grpc {
        let (addr, listener) =
            async_listener(runtime, listener).map_err(|e| EngineError::Serve {
                addr: "?".into(),
                message: e.to_string(),
            })?;
        let stop = signalled(&stopped);
        let serving = serve::grpc::serve(
            listener,
            Arc::clone(read_model),
            status(),
            #[cfg(feature = "personnel")]
            personnel.clone(),
            listeners.transport.clone(),
            listeners.auth.clone(),
            stop,
        );
        let task = runtime.spawn(async move { serving.await.map_err(ServerError::from) });
        servers.grpc_addr = addr;
        servers.tasks.push(("grpc", task));
    }
    #[cfg(feature = "web")]
    if let Some(listener) = listeners.web {
        let (addr, listener) = async_listener(runtime, listener).map_err(|e| EngineError::Web {
            addr: "?".into(),
            message: e.to_string(),
        })?;
        let stop = signalled(&stopped);
        let context = serve::web::WebContext {
            read_model: Arc::clone(read_model),
            status: status(),
            personnel,
            auth: listeners.auth.clone(),
        };
        let task = runtime.spawn(async move {
            serve::web::serve(listener, context, listeners.transport, stop)
                .await
                .map_err(ServerError::from)
        });
        servers.web_addr = addr;
        servers.tasks.push(("web", task));
    }
    // --- metrics ---: the engine's counters are scraped from its status; the recorder is
    // installed before anything is recorded when a server will show it.
    crate::metrics::watch(&status());
    #[cfg(feature = "web")]
    if servers.web_addr.is_some() || listeners.metrics.is_some() {
        crate::metrics::exporter::handle();
    }
    #[cfg(feature = "web")]
    if let Some(listener) = listeners.metrics {
        let (addr, listener) = async_listener(runtime, listener).map_err(|e| EngineError::Web {
            addr: "?".into(),
            message: e.to_string(),
        })?;
        let stop = signalled(&stopped);
        let task = runtime.spawn(async move {
            crate::metrics::exporter::serve(listener, stop)
                .await
                .map_err(ServerError::from)
        });
        servers.metrics_addr = addr;
        servers.tasks.push(("metrics", task));
    }
    Ok(servers)
}
