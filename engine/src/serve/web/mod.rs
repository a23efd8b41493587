//! The live web report: an overview page and a page per user, served by the engine itself.
//!
//! Everything the browser needs comes from this binary: the HTML, JavaScript, CSS and icon are
//! embedded at compile time ([`assets`]), so the page works on a machine with no internet and
//! never loads anything from another origin. The pages are a thin client over a small JSON API
//! that reads the same read-model snapshots as gRPC, so the numbers on the page are the numbers
//! gRPC answers at the same epoch:
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
//! Money is integer minor units in every JSON answer; the script formats it for display in the
//! user's currency. Bad ids are `400`, unknown users and routes `404`, both with a JSON body
//! whose `error` says what to fix.
//!
//! The server runs on its own small tokio runtime and thread, like the gRPC server, so a slow
//! browser can never hold up the dataflow or gRPC answers.

mod api;
mod assets;
mod events;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use axum::routing::get;

use crate::error::EngineError;
use crate::personnel::Personnel;
use crate::serve::read_model::ReadModel;
use crate::serve::status::StatusProbe;

pub use api::Directory;

/// Live event streams served at once; more get `503`.
pub const MAX_EVENT_CLIENTS: usize = 64;

/// How long shutdown waits for open connections (a browser's event stream, keep-alive
/// connections) before it closes them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the web handlers read from.
#[derive(Clone, Debug)]
pub struct WebContext {
    /// The served state.
    pub read_model: Arc<ReadModel>,
    /// Counters and progress for the overview.
    pub status: StatusProbe,
    /// Users' details and photos; without it the pages show ids and aggregates only.
    pub personnel: Option<Arc<Personnel>>,
}

/// Shared state of the handlers.
#[derive(Clone, Debug)]
struct App {
    read_model: Arc<ReadModel>,
    status: StatusProbe,
    directory: Directory,
    categories: Arc<api::CategoryCache>,
    event_clients: Arc<AtomicUsize>,
}

/// The whole web application as an axum router, for serving here or mounting in a program that
/// embeds the engine and runs its own HTTP server.
pub fn router(context: WebContext) -> Router {
    let app = App {
        read_model: context.read_model,
        status: context.status,
        directory: Directory::new(context.personnel),
        categories: Arc::default(),
        event_clients: Arc::default(),
    };
    Router::new()
        .route("/", get(assets::page))
        .route("/users/{id}", get(assets::page))
        .route("/assets/{name}", get(assets::asset))
        .route("/favicon.ico", get(assets::favicon))
        .route("/api/overview", get(api::overview))
        .route("/api/users/{id}", get(api::user))
        .route("/api/users/{id}/image", get(api::image))
        .route("/api/events", get(events::events))
        .fallback(api::not_found)
        .with_state(app)
}

/// The web server of a running engine.
#[derive(Debug)]
pub struct WebServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl WebServer {
    /// Binds `addr` (port 0 picks a free port), so a taken port fails before anything starts.
    ///
    /// # Errors
    ///
    /// [`EngineError::Web`] if the address cannot be bound.
    pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, EngineError> {
        let error = |message: String| EngineError::Web {
            addr: addr.to_string(),
            message,
        };
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            error(format!(
                "{e} (is another program using it? choose another address with --web)"
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| error(e.to_string()))?;
        Ok(listener)
    }

    /// Serves [`router`] on `listener` from a runtime thread of its own.
    ///
    /// # Errors
    ///
    /// [`EngineError::Web`] if the runtime or its thread cannot start.
    pub fn start(
        listener: std::net::TcpListener,
        context: WebContext,
    ) -> Result<WebServer, EngineError> {
        let addr = listener.local_addr().map_err(|e| EngineError::Web {
            addr: "?".into(),
            message: e.to_string(),
        })?;
        let error = |message: String| EngineError::Web {
            addr: addr.to_string(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("spendflow-web")
            .enable_all()
            .build()
            .map_err(|e| error(e.to_string()))?;
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("spendflow-web-main".into())
            .spawn(move || {
                let result = runtime.block_on(serve(listener, context, shutdown_rx));
                // Connections still open after the grace period are dropped with the runtime.
                runtime.shutdown_timeout(Duration::from_millis(100));
                result
            })
            .map_err(|e| error(e.to_string()))?;
        Ok(WebServer {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, gives open connections a short grace period, and joins the thread.
    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "Web server ended with an error."),
                Err(_) => tracing::warn!("Web server thread panicked."),
            }
        }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    listener: std::net::TcpListener,
    context: WebContext,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), String> {
    use axum::serve::ListenerExt;

    let addr = listener.local_addr().ok();
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| e.to_string())?
        .tap_io(|tcp| {
            // Small answers must not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
        });
    tracing::info!(addr = ?addr, "Web report listening.");
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let graceful = async move {
        let _ = shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let server = axum::serve(listener, router(context)).with_graceful_shutdown(graceful);
    let deadline = async move {
        let _ = stopping_rx.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result.map_err(|e| e.to_string()),
        () = deadline => {
            tracing::debug!("Web connections still open after the grace period; closing them.");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
