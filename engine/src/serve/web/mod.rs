//! The live web report: an overview page and a page per user, served by the engine itself.
//!
//! Everything the browser needs comes from this binary: the HTML, JavaScript, CSS and icon are
//! embedded at compile time ([`assets`]), so the page works on a machine with no internet and
//! never loads anything from another origin. The pages are a thin client over a small JSON API
//! that answers through the same [`QueryBackend`] as gRPC's `ExpenseQuery` (and reads the
//! counters from the same `Admin` service), so the numbers on the page are the numbers gRPC
//! answers at the same epoch, whichever store is behind it: the engine's read model, or the
//! Cassandra sink's tables (`spendflow serve --from cassandra --web ADDR`):
//!
//! | route | what |
//! |---|---|
//! | `GET /`, `GET /users/{id}` | the page (one HTML document; the script renders by path) |
//! | `GET /assets/*` | script, style sheet, icon (ETag + `no-cache`: revalidated, never stale) |
//! | `GET /api/overview` | epoch, counters, top spenders with names, totals by category |
//! | `GET /api/users/{id}` | a user's details, totals, categories, merchants, months |
//! | `GET /api/users/{id}/image` | the user's photo, from the personnel store |
//! | `GET /api/events[?user=ID]` | server-sent events: what changed, per batch of epochs |
//!
//! Live changes come from the engine's read model ([`WebBackend::live`]). A backend without
//! one (Cassandra) has no per-epoch changes: its event stream says `reset` when a newer epoch
//! is there (checked once a second), and the page reloads its data.
//!
//! Money is integer minor units in every JSON answer; the script formats it for display in the
//! user's currency. Bad ids are `400`, unknown users and routes `404`, both with a JSON body
//! whose `error` says what to fix.
//!
//! [`serve`] runs the server on whatever tokio runtime polls it, until a shutdown future
//! completes (the engine spawns it on its one runtime); [`WebServer::start_on`] spawns it on a
//! runtime handle it is given and keeps a handle to stop it. Every request gets a
//! trace span (tower-http `TraceLayer`) and a bound of [`REQUEST_TIMEOUT`] to produce its
//! answer (tower-http `TimeoutLayer`; an event stream's body is not bounded, only its start).

mod api;
mod assets;
mod events;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use spendflow_proto::v1::admin_server::Admin;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::error::EngineError;
use crate::personnel::Personnel;
use crate::serve::auth::{self, Authenticator};
use crate::serve::grpc::backend::QueryBackend;
use crate::serve::grpc::{AdminService, ReadModelBackend};
use crate::serve::read_model::ReadModel;
use crate::serve::status::StatusProbe;
use crate::serve::transport::hosts::{AllowedHosts, check_host};
use crate::serve::transport::{
    CapAcceptor, ConnectionCap, HEADER_READ_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
    Transport,
};

pub use api::Directory;

/// Live event streams served at once; more get `503`.
pub const MAX_EVENT_CLIENTS: usize = 64;

/// How long shutdown waits for open connections (a browser's event stream, keep-alive
/// connections) before it closes them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Longest time a request may take to produce its answer (`503` after it). The engine's reads
/// never wait; a store behind the backend (Cassandra) may.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the web report of a running engine reads from: its read model, status and personnel.
/// Converts into a [`WebBackend`] over [`ReadModelBackend`] and [`AdminService`], the same
/// services the engine's gRPC serves.
#[derive(Clone, Debug)]
pub struct WebContext {
    /// The served state.
    pub read_model: Arc<ReadModel>,
    /// Counters and progress for the overview.
    pub status: StatusProbe,
    /// Users' details and photos; without it the pages show ids and aggregates only.
    pub personnel: Option<Arc<Personnel>>,
    /// Token auth (`None`: off): pages and API need a token or the sign-in cookie.
    pub auth: Option<Arc<Authenticator>>,
}

/// What the web report answers from, for any store: the query backend gRPC's `ExpenseQuery`
/// answers from, the `Admin` service gRPC serves (the overview's counters come from its
/// `GetStatus`), optionally the read model for live change events, and optionally the
/// personnel store for names and photos.
#[derive(Clone)]
pub struct WebBackend {
    /// Every aggregate the pages show.
    pub query: Arc<dyn QueryBackend>,
    /// Records read and rejected, caught up.
    pub admin: Arc<dyn Admin>,
    /// The engine's read model, for `/api/events` with the changed cells; `None` (Cassandra):
    /// the events only say when a newer epoch is committed, and the page reloads.
    pub live: Option<Arc<ReadModel>>,
    /// Users' details and photos; without it the pages show ids and aggregates only.
    pub personnel: Option<Arc<Personnel>>,
    /// Token auth (`None`: off): pages and API need a token or the sign-in cookie.
    pub auth: Option<Arc<Authenticator>>,
}

impl WebBackend {
    /// A web report over `query` and `admin`, without live change events or personnel.
    pub fn new(query: impl QueryBackend, admin: impl Admin) -> Self {
        WebBackend {
            query: Arc::new(query),
            admin: Arc::new(admin),
            live: None,
            personnel: None,
            auth: None,
        }
    }

    /// With token auth (`None`: off).
    pub fn with_auth(mut self, auth: Option<Arc<Authenticator>>) -> Self {
        self.auth = auth;
        self
    }

    /// With users' details and photos from `personnel`.
    pub fn with_personnel(mut self, personnel: Option<Arc<Personnel>>) -> Self {
        self.personnel = personnel;
        self
    }
}

impl std::fmt::Debug for WebBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebBackend")
            .field("live", &self.live.is_some())
            .field("personnel", &self.personnel.is_some())
            .field("auth", &self.auth.is_some())
            .finish_non_exhaustive()
    }
}

impl From<WebContext> for WebBackend {
    fn from(context: WebContext) -> Self {
        WebBackend {
            query: Arc::new(ReadModelBackend::new(Arc::clone(&context.read_model))),
            admin: Arc::new(AdminService::new(context.status)),
            live: Some(context.read_model),
            personnel: context.personnel,
            auth: context.auth,
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone, Debug)]
struct App {
    backend: WebBackend,
    directory: Directory,
    categories: Arc<api::CategoryCache>,
    event_clients: Arc<events::EventClients>,
    /// Becomes true when the server stops: event streams end then.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl App {
    /// Completes once the server is stopping (never, for a router served elsewhere).
    async fn stopping(&self) {
        let mut stopping = self.stopping.clone();
        if stopping.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The whole web application as an axum router (with its trace and timeout layers), for
/// serving here or mounting in a program that embeds the engine and runs its own HTTP server.
pub fn router(backend: impl Into<WebBackend>) -> Router {
    // Nobody stops this router's streams but the read model closing or the client leaving.
    let (_, never) = tokio::sync::watch::channel(false);
    router_stopping(backend.into(), never, REQUEST_TIMEOUT)
}

fn router_stopping(
    backend: WebBackend,
    stopping: tokio::sync::watch::Receiver<bool>,
    timeout: Duration,
) -> Router {
    let auth = backend.auth.clone();
    let app = App {
        directory: Directory::new(backend.personnel.clone()),
        backend,
        categories: Arc::default(),
        event_clients: Arc::default(),
        stopping,
    };
    let router = Router::new()
        .route("/", get(assets::page))
        .route("/users/{id}", get(assets::page))
        .route("/assets/{name}", get(assets::asset))
        .route("/favicon.ico", get(assets::favicon))
        .route("/api/overview", get(api::overview))
        .route("/api/users/{id}", get(api::user))
        .route("/api/users/{id}/image", get(api::image))
        .route("/api/events", get(events::events))
        .route("/metrics", get(crate::metrics::exporter::metrics))
        .route("/signin", get(api::signin_form).post(api::signin))
        .route("/signout", post(api::signout))
        .fallback(api::not_found)
        .with_state(app);
    // With token auth, every request but the sign-in page and its files needs a token.
    let router = match auth {
        Some(auth) => router.layer(middleware::from_fn_with_state(auth, auth::web::require)),
        None => router,
    };
    router
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        // A 5xx answer (a store that did not answer in time, a refusal under load) is a WARN:
        // tower-http's default ERROR is for data loss here.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
}

/// A running web server. Dropping it stops it.
#[derive(Debug)]
pub struct WebServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// The server task's result (in a mutex only so the server is `Sync`).
    done: Option<parking_lot::Mutex<std::sync::mpsc::Receiver<std::io::Result<()>>>>,
}

impl WebServer {
    /// Binds `addr` (port 0 picks a free port), so a taken port fails before anything starts.
    ///
    /// # Errors
    ///
    /// [`EngineError::Web`] if the address cannot be bound.
    pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, EngineError> {
        bind_http(addr, "--web")
    }

    /// Serves [`router`] on `listener` (from [`WebServer::bind`]) as a task spawned on
    /// `runtime`. [`WebServer::stop`] (or dropping the server) blocks until the task has ended,
    /// so call it from outside that runtime's worker threads, or await [`serve`] yourself.
    ///
    /// # Errors
    ///
    /// [`EngineError::Web`] if the listener cannot be registered with the runtime.
    pub fn start_on(
        runtime: &tokio::runtime::Handle,
        listener: std::net::TcpListener,
        backend: impl Into<WebBackend>,
    ) -> Result<WebServer, EngineError> {
        let backend = backend.into();
        let addr = local_addr(&listener)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(|e| EngineError::Web {
                addr: addr.to_string(),
                message: e.to_string(),
            })?
        };
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let (done, result) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let served = serve(listener, backend, Transport::default(), async {
                let _ = shutdown_rx.await;
            })
            .await;
            let _ = done.send(served);
        });
        Ok(WebServer {
            addr,
            shutdown: Some(shutdown),
            done: Some(parking_lot::Mutex::new(result)),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, gives open connections a short grace period, and waits for the server
    /// to end.
    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let Some(done) = self.done.take() else {
            return;
        };
        // A dropped sender: the runtime went away with the task.
        let result = done.into_inner().recv().unwrap_or(Ok(()));
        if let Err(e) = result {
            tracing::warn!(error = %e, "Web server ended with an error.");
        }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds an HTTP server's `addr` (port 0 picks a free port), non-blocking for tokio; the error
/// says which `flag` to change when the port is taken.
pub(crate) fn bind_http(
    addr: SocketAddr,
    flag: &str,
) -> Result<std::net::TcpListener, EngineError> {
    let error = |message: String| EngineError::Web {
        addr: addr.to_string(),
        message,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        error(format!(
            "{e} (is another program using it? choose another address with {flag})"
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| error(e.to_string()))?;
    Ok(listener)
}

fn local_addr(listener: &std::net::TcpListener) -> Result<SocketAddr, EngineError> {
    listener.local_addr().map_err(|e| EngineError::Web {
        addr: "?".into(),
        message: e.to_string(),
    })
}

/// Serves the web report over `backend` on `listener` until `shutdown` completes, then gives
/// open connections (a browser's event stream, keep-alive connections) a short grace period
/// before it returns. Runs on whatever runtime polls it: spawn it on the one that should own it.
///
/// `transport` says how: TLS (rustls; with a client CA, clients without a certificate are
/// refused), the connection cap (connections past it are closed when accepted), the
/// concurrency limit (requests past it get `503` at once), the allowed `Host` names (others get
/// `421`), and the timeouts: [`HEADER_READ_TIMEOUT`] for the TLS handshake, the first request
/// and each request's headers; HTTP/2 keep-alive pings.
///
/// # Errors
///
/// The listener failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: impl Into<WebBackend>,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr().ok();
    tracing::info!(
        addr = ?addr,
        tls = transport.tls.is_some(),
        mtls = transport.tls.as_ref().is_some_and(|t| t.requires_client_certificates()),
        max_connections = transport.limits.max_connections,
        max_concurrent_requests = transport.limits.max_concurrent_requests,
        "Web report listening."
    );
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let app = guarded(
        router_stopping(backend.into(), stopping_rx, REQUEST_TIMEOUT),
        &transport,
        addr,
    );
    let handle = axum_server::Handle::<SocketAddr>::new();
    let cap = CapAcceptor::new(ConnectionCap::new("web", transport.limits.max_connections));
    let mut server = axum_server::Server::<SocketAddr>::from_listener(listener)
        .handle(handle.clone())
        .first_request_timeout(HEADER_READ_TIMEOUT);
    let http = server.http_builder();
    http.http1()
        .header_read_timeout(Some(HEADER_READ_TIMEOUT))
        .keep_alive(true);
    http.http2()
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    // The connection's address: event streams are shared out per client (events::ClientKey).
    let make_service = app.into_make_service_with_connect_info::<SocketAddr>();
    let serving: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
        match &transport.tls {
            Some(tls) => {
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(
                    axum_server::tls_rustls::RustlsConfig::from_config(tls.web_config()),
                )
                .handshake_timeout(HEADER_READ_TIMEOUT)
                .acceptor(cap);
                Box::pin(server.acceptor(acceptor).serve(make_service))
            }
            None => Box::pin(server.acceptor(cap).serve(make_service)),
        };
    tokio::pin!(shutdown);
    let mut serving = serving;
    tokio::select! {
        result = &mut serving => return result,
        () = &mut shutdown => {}
    }
    // Ends the event streams, so their connections can close; closes the others after the
    // grace period.
    let _ = stopping_tx.send(true);
    handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
    match tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), serving).await {
        Ok(result) => result,
        Err(_) => {
            tracing::debug!("Web connections still open after the grace period; closing them.");
            Ok(())
        }
    }
}

/// `app` behind the `Host` allow-list and the concurrency limit (with load shedding: a request
/// past the limit gets `503` at once instead of waiting in an unbounded queue).
fn guarded(app: Router, transport: &Transport, bound: Option<SocketAddr>) -> Router {
    let hosts = AllowedHosts::new(transport.web_allowed_hosts.as_deref(), bound);
    let limit = Arc::new(tokio::sync::Semaphore::new(
        transport.limits.max_concurrent_requests,
    ));
    let max = transport.limits.max_concurrent_requests;
    app.layer(
        tower::ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(
                move |_: axum::BoxError| async move {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(serde_json::json!({
                            "error": format!("the web report has {max} requests in progress, the most it takes at once; try again shortly"),
                        })),
                    )
                },
            ))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
                limit,
            )),
    )
    .layer(axum::middleware::from_fn_with_state(hosts, check_host))
}

#[cfg(test)]
mod tests;
