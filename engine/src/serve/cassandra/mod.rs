//! `spendflow serve --from cassandra`: the gRPC query service alone, answering from the
//! tables the Cassandra sink writes, so readers scale apart from the engine (any number of
//! these servers, no dataflow, no input).
//!
//! # What the answers mean
//!
//! The sink writes epoch by epoch: every changed cell's absolute value, then a `sink_progress`
//! row marked committed. A task here reads `sink_progress` every poll interval
//! ([`progress`]); the newest committed row is the `as_of` of an answer (its epoch and the
//! input positions it covers). In a cluster every process writes its own share of the tables
//! and commits its own progress: the `as_of` is then the minimum over the shares of the newest
//! layout (every share has written at least that epoch), with every share's positions
//! (`cassandra::reader::ProgressState`). The tables can be read while the sink writes the next epoch,
//! so a row may be newer than the `as_of` reported: it is then a later, correct value. Answers
//! are **at least** `as_of`, never older; different rows of one answer (a user's total and its
//! categories, say) may come from different epochs at or after it. The engine's own gRPC
//! answers exactly `as_of` from one snapshot; use it where that matters.
//!
//! * `consistency.min_epoch` waits (bounded by `timeout_ms`, as on the engine) until the sink
//!   has committed that epoch, then reads: `DEADLINE_EXCEEDED` if it was not committed in time.
//! * `GetUserSummary`, `GetUserWindows`: point reads of the user's partitions; a user without
//!   a `user_totals` row is `NOT_FOUND` (a cell whose last live expense went away is deleted,
//!   so an absent row is zero).
//! * `ListUserSummaries` (by user id) and `TopSpenders` (by total): Cassandra stores partitions
//!   in token order, so both come from a scan of `user_totals` held sorted in memory
//!   ([`index`]), rebuilt when a request needs a newer epoch or when it is older than the
//!   refresh interval and the sink has committed since. Their `as_of` is the index's epoch (at
//!   or before the current one); summaries on a page are read fresh.
//! * `Subscribe`: `UNIMPLEMENTED` (the tables hold values, not the per-epoch changes a stream
//!   is made of); subscribe on the engine's own address.
//! * `Admin/GetStatus`: `as_of` from `sink_progress`, `records_read` = records the committed
//!   epoch covers, `users`/`live_expenses` from the index. `caught_up` means *the sink is
//!   quiet*: an epoch is committed, none is in flight, and what the committed one covers has
//!   not changed for the quiet period. Cassandra cannot see what the engine has not read yet,
//!   so a stopped engine looks caught up as well. Counters only the engine knows (accepted,
//!   rejected, workers, high watermarks, lag) are 0, empty or -1. `Admin/ListRejected`:
//!   `UNIMPLEMENTED` (the engine and its dead-letter topic keep rejected records).
//! * Health (`grpc.health.v1`) reports `NOT_SERVING` for both services while `sink_progress`
//!   cannot be read; reflection (v1 and v1alpha) is on, as on the engine.
//! * The web report (`--web ADDR`, [`CassandraServeConfig::web`]): the engine's pages and JSON
//!   API, answered through the same backend and `Admin` service as gRPC, so the page shows
//!   what gRPC answers. Totals by category over all users are a scan of
//!   `user_category_totals` (reused for a second). No personnel store: pages show ids and
//!   aggregates. `/api/events` has no per-epoch changes here: it sends `reset` when a newer
//!   epoch is committed (checked every second) and the page reloads its data.

pub mod admin;
pub mod backend;
pub mod index;
pub mod progress;

use crate::error::InvalidSetting;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use spendflow_proto::v1::admin_server::AdminServer;
use spendflow_proto::v1::expense_query_server::ExpenseQueryServer;
use tonic::server::NamedService;

pub use crate::cassandra::TableReader;
pub use admin::CassandraAdmin;
pub use backend::CassandraBackend;

use self::index::IndexCache;
use crate::cassandra::{CassandraClientSecurity, CassandraError, connect_with, schema};
use crate::serve::grpc::{AlertsUnimplemented, QueryService, router_with, serve_router};
use crate::serve::transport::Transport;
use crate::serve::web::WebBackend;

/// Settings of `spendflow serve --from cassandra`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CassandraServeConfig {
    /// Contact points, `HOST:PORT[,HOST:PORT...]`.
    pub contact_points: String,
    /// The keyspace the sink writes.
    #[serde(default = "default_keyspace")]
    pub keyspace: String,
    /// Address of the gRPC service (port 0 picks a free port).
    #[serde(default = "default_grpc")]
    pub grpc: SocketAddr,
    /// Address of the web report, if it is served (port 0 picks a free port).
    #[serde(default)]
    pub web: Option<SocketAddr>,
    /// How often `sink_progress` is read, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How old the user index (for `ListUserSummaries`, `TopSpenders`) may get before a
    /// request rebuilds it with a scan, in milliseconds, once the sink has committed since.
    #[serde(default = "default_index_refresh_ms")]
    pub index_refresh_ms: u64,
    /// How long the sink must have been quiet for `Admin/GetStatus` to say `caught_up`, in
    /// milliseconds.
    #[serde(default = "default_quiet_ms")]
    pub quiet_ms: u64,
    /// Who may reach the servers, and how (TLS, tokens, allowed hosts, limits).
    #[serde(default)]
    pub security: crate::config::SecurityConfig,
    /// Serve Prometheus metrics on this address of their own.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Credentials and TLS for reaching Cassandra.
    #[serde(default)]
    pub client_security: CassandraClientSecurity,
}

/// `spendflow`, as the sink's default.
fn default_keyspace() -> String {
    "spendflow".to_string()
}

fn default_grpc() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

const fn default_poll_interval_ms() -> u64 {
    100
}

const fn default_index_refresh_ms() -> u64 {
    1000
}

const fn default_quiet_ms() -> u64 {
    1000
}

impl CassandraServeConfig {
    /// Settings with defaults for everything but the contact points.
    pub fn new(contact_points: impl Into<String>) -> Self {
        CassandraServeConfig {
            contact_points: contact_points.into(),
            keyspace: default_keyspace(),
            grpc: default_grpc(),
            web: None,
            poll_interval_ms: default_poll_interval_ms(),
            index_refresh_ms: default_index_refresh_ms(),
            quiet_ms: default_quiet_ms(),
            security: crate::config::SecurityConfig::default(),
            metrics: None,
            client_security: CassandraClientSecurity::default(),
        }
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// A message naming the setting.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        schema::validate_keyspace(&self.keyspace)?;
        if self.contact_points.trim().is_empty() {
            return Err(
                "the Cassandra address is empty: use HOST:PORT, e.g. 127.0.0.1:9042".into(),
            );
        }
        if !(10..=60_000).contains(&self.poll_interval_ms) {
            return Err(format!(
                "the poll interval must be 10 to 60000 ms, got {}",
                self.poll_interval_ms
            )
            .into());
        }
        if self.index_refresh_ms > 3_600_000 {
            return Err(format!(
                "the index refresh interval must be at most 3600000 ms, got {}",
                self.index_refresh_ms
            )
            .into());
        }
        if self.quiet_ms > 3_600_000 {
            return Err(format!(
                "the quiet period must be at most 3600000 ms, got {}",
                self.quiet_ms
            )
            .into());
        }
        let served: Vec<SocketAddr> = [Some(self.grpc), self.web, self.metrics]
            .into_iter()
            .flatten()
            .collect();
        self.security.check_exposure(&served)?;
        Ok(())
    }
}

/// What can stop `serve --from cassandra` from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting is invalid.
    #[error("invalid settings: {0}")]
    Config(String),
    /// Cassandra could not be reached or read.
    #[error(transparent)]
    Cassandra(#[from] CassandraError),
    /// The gRPC address could not be bound.
    #[error("cannot serve gRPC on {addr}: {message}")]
    Bind {
        /// The address.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// The gRPC server failed.
    #[error(transparent)]
    Server(#[from] crate::serve::grpc::GrpcError),
    /// The web report failed.
    #[error("web report: {0}")]
    Web(#[from] std::io::Error),
    /// The server's runtime could not be started.
    #[error("could not start a runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The server ended without a result (its runtime stopped under it).
    #[error("the server ended without a result (its runtime stopped)")]
    Ended,
}

impl ServeError {
    /// True if starting again later may succeed (Cassandra coming up).
    pub fn is_retriable(&self) -> bool {
        match self {
            ServeError::Cassandra(e) => e.is_retriable(),
            ServeError::Bind { .. } => true,
            ServeError::Config(_)
            | ServeError::Server(_)
            | ServeError::Web(_)
            | ServeError::Runtime(_)
            | ServeError::Ended => false,
        }
    }
}

/// A running query service over Cassandra. Dropping it stops it.
#[derive(Debug)]
pub struct CassandraServer {
    addr: SocketAddr,
    web_addr: Option<SocketAddr>,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    /// The servers' result (in a mutex only so the server is `Sync`).
    done: Option<parking_lot::Mutex<std::sync::mpsc::Receiver<Result<(), ServeError>>>>,
    /// The runtime of [`CassandraServer::start`]; `None` on a runtime given to `start_on`.
    runtime: Option<tokio::runtime::Runtime>,
}

impl CassandraServer {
    /// Connects, checks that the keyspace holds the sink's tables, reads `sink_progress`
    /// once, binds the gRPC (and web) address and starts serving, on a runtime of its own.
    /// Blocking; call it outside an async runtime.
    ///
    /// # Errors
    ///
    /// [`ServeError::Config`] for invalid settings or a keyspace without the tables,
    /// [`ServeError::Cassandra`] if Cassandra cannot be reached, [`ServeError::Bind`] if an
    /// address is taken.
    pub fn start(config: CassandraServeConfig) -> Result<CassandraServer, ServeError> {
        config
            .validate()
            .map_err(|e| ServeError::Config(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("spendflow-serve")
            .enable_all()
            .build()
            .map_err(ServeError::Runtime)?;
        let mut server = CassandraServer::start_on(runtime.handle(), config)?;
        server.runtime = Some(runtime);
        Ok(server)
    }

    /// Like [`CassandraServer::start`], on `runtime`: the servers and their tasks are spawned
    /// there. Blocking (it waits on `runtime` for the setup); call it outside an async
    /// context. [`CassandraServer::shutdown`] and dropping the server block until the servers
    /// have ended, so call them outside `runtime`'s worker threads too.
    ///
    /// # Errors
    ///
    /// As [`CassandraServer::start`].
    pub fn start_on(
        runtime: &tokio::runtime::Handle,
        config: CassandraServeConfig,
    ) -> Result<CassandraServer, ServeError> {
        config
            .validate()
            .map_err(|e| ServeError::Config(e.to_string()))?;
        config
            .security
            .validate()
            .map_err(|e| ServeError::Config(e.to_string()))?;
        // TLS files are read and checked before anything is bound or connected.
        let transport =
            Transport::load(&config.security).map_err(|e| ServeError::Config(e.to_string()))?;
        let Setup {
            listener,
            routes,
            web,
            tasks,
        } = runtime.block_on(setup(&config))?;
        let addr = listener.local_addr().map_err(|e| ServeError::Bind {
            addr: config.grpc.to_string(),
            message: e.to_string(),
        })?;
        let web_addr = match &web {
            Some((listener, _)) => Some(listener.local_addr().map_err(|e| ServeError::Bind {
                addr: format!("{:?}", config.web),
                message: e.to_string(),
            })?),
            None => None,
        };
        tracing::info!(
            %addr,
            web = ?web_addr,
            keyspace = %config.keyspace,
            contact_points = %config.contact_points,
            tls = transport.tls.is_some(),
            "Serving spendflow.v1 from Cassandra."
        );
        let (shutdown, stopping) = tokio::sync::watch::channel(false);
        let (done, done_rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let stopped = |mut stopping: tokio::sync::watch::Receiver<bool>| async move {
                let _ = stopping.wait_for(|s| *s).await;
            };
            let grpc = serve_router(
                listener,
                routes,
                transport.clone(),
                stopped(stopping.clone()),
            );
            let web = async {
                match web {
                    Some((listener, backend)) => {
                        crate::serve::web::serve(listener, backend, transport, stopped(stopping))
                            .await
                            .map_err(ServeError::from)
                    }
                    None => Ok(()),
                }
            };
            let (grpc, web) = tokio::join!(grpc, web);
            for task in tasks {
                task.abort();
            }
            let _ = done.send(grpc.map_err(ServeError::from).and(web));
        });
        Ok(CassandraServer {
            addr,
            web_addr,
            shutdown: Some(shutdown),
            done: Some(parking_lot::Mutex::new(done_rx)),
            runtime: None,
        })
    }

    /// The address the gRPC service listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the web report listens on, if it is served.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_addr
    }

    /// Stops serving (open calls finish first) and waits for the server to end.
    ///
    /// # Errors
    ///
    /// [`ServeError::Server`] if the server ended with an error.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ServeError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(true);
        }
        let result = match self.done.take().map(|done| done.into_inner().recv()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(ServeError::Ended),
        };
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_millis(100));
        }
        result
    }
}

impl Drop for CassandraServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

type QueryServer = ExpenseQueryServer<QueryService<CassandraBackend>>;

/// What [`setup`] made: the bound listeners, the routes and web backend to serve, and the
/// tasks that run beside them.
struct Setup {
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    web: Option<(tokio::net::TcpListener, WebBackend)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn setup(config: &CassandraServeConfig) -> Result<Setup, ServeError> {
    // The token key is read and checked before anything is bound or connected.
    let auth = crate::serve::auth::Authenticator::from_config(&config.security)
        .map_err(|e| ServeError::Config(format!("token auth: {e}")))?;
    // Bind first, so a taken port fails before anything else is done.
    let listener = tokio::net::TcpListener::bind(config.grpc)
        .await
        .map_err(|e| ServeError::Bind {
            addr: config.grpc.to_string(),
            message: format!("{e} (is another server running there? choose another --grpc)"),
        })?;
    let web_listener = match config.web {
        Some(web) => {
            Some(
                tokio::net::TcpListener::bind(web)
                    .await
                    .map_err(|e| ServeError::Bind {
                        addr: web.to_string(),
                        message: format!("{e} (is another program using it? choose another --web)"),
                    })?,
            )
        }
        None => None,
    };
    let session = connect_with(&config.contact_points, &config.client_security).await?;
    let reader = Arc::new(TableReader::new(session, &config.keyspace).await?);
    let index = Arc::new(IndexCache::new(Duration::from_millis(
        config.index_refresh_ms,
    )));

    let (progress, poller) = progress::watch(
        Arc::clone(&reader),
        Duration::from_millis(config.poll_interval_ms),
    )
    .await?;
    // One backend and one admin for gRPC and the web report: the same index, the same answers.
    let backend = CassandraBackend::new(Arc::clone(&reader), progress.clone(), Arc::clone(&index));
    let admin = CassandraAdmin::new(
        Arc::clone(&reader),
        progress.clone(),
        Arc::clone(&index),
        Duration::from_millis(config.quiet_ms),
    );
    let web = web_listener.map(|l| {
        let backend = WebBackend::new(backend.clone(), admin.clone()).with_auth(auth.clone());
        (l, backend)
    });
    // No alerts in the tables: `Alerts` says to call the engine (UNIMPLEMENTED).
    let (routes, health) =
        router_with(QueryService::new(backend), AlertsUnimplemented, admin, auth).await?;
    let health_task = tokio::spawn(report_health(progress, health));
    Ok(Setup {
        listener,
        routes,
        web,
        tasks: vec![poller, health_task],
    })
}

/// Reports both services `NOT_SERVING` while `sink_progress` cannot be read.
async fn report_health(
    mut progress: progress::ProgressWatch,
    health: tonic_health::server::HealthReporter,
) {
    let mut failing = false;
    loop {
        let now_failing = progress.current().error.is_some();
        if now_failing != failing {
            failing = now_failing;
            let status = if failing {
                tonic_health::ServingStatus::NotServing
            } else {
                tonic_health::ServingStatus::Serving
            };
            for service in [QueryServer::NAME, <AdminServer<CassandraAdmin>>::NAME] {
                health.set_service_status(service, status).await;
            }
        }
        if !progress.changed().await {
            return;
        }
    }
}
