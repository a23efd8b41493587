//! `GET /api/events`: what changed, as server-sent events, for the pages to update without a
//! reload.
//!
//! Each client gets its own subscription to the read model. Epochs close every few
//! milliseconds, far faster than anyone reads, so a client's stream collects the epochs
//! published during [`WINDOW`] and sends them as one `changes` event with the newest value of
//! every changed cell (values are absolute, so merging epochs loses nothing a page shows).
//!
//! A client that reads too slowly falls behind the read model's broadcast; it then gets a
//! `reset` event (the page reloads its data over the JSON API) and continues from the present,
//! so a slow browser costs the engine nothing and never holds up anyone else. At most
//! [`super::MAX_EVENT_CLIENTS`] streams are open at once (`503` beyond), and at most
//! [`MAX_STREAMS_PER_CLIENT`] of them for one client (`429` beyond), so one client cannot take
//! every stream. A client is its remote IP address (see [`ClientKey`]; a server that does not
//! give the handlers the connection's address, such as a [`super::router`] mounted without
//! `into_make_service_with_connect_info`, has only the overall cap).
//!
//! Events:
//! * `hello` (first): `{"epoch": N}`, the epoch published when the stream opened.
//! * `changes`: `{"epoch", "from_epoch", "changed_users", "changes": [user cells, at most
//!   10, with names], "user": {...}}` — `user` only with `?user=ID` and only if that user
//!   changed: its new total, count, last event, and changed categories, merchants and months
//!   (`removed: true` for cells that no longer exist). Sent for every window with a published
//!   epoch, even if the selected user did not change, so the page's epoch indicator ticks.
//!   Every `changes` event also carries the alert state of the newest snapshot:
//!   `over_budget_users` and `alerted_users` (the overview's badge), and with `?user=ID`
//!   `user_alerts` (the user's fired alerts, as `GET /api/users/{id}` lists them) and
//!   `user_budget_minor`, so a budget or rate change that moves no expense still shows.
//! * `reset`: the stream skipped epochs; reload the state.
//!
//! A backend without a read model (`serve --from cassandra --web`) has no per-epoch changes
//! to send: its stream sends `hello`, then a `reset` with the new epoch whenever the backend
//! has a newer one, checked every [`POLL`], and the page reloads its data over the JSON API
//! (which reads the store once per reload, so no faster than that).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use spendflow_operators::reference::THRESHOLDS_PCT;
use spendflow_operators::{AggKey, Epoch, UserId};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::time::Instant;

use super::api::{Access, AlertJson, ApiError, Directory, parse_user_id};
use super::{App, MAX_EVENT_CLIENTS};
use crate::serve::read_model::{CellValue, Published, ReadModel, Snapshot, format_month};

/// Epochs published within this window go out as one event.
pub const WINDOW: Duration = Duration::from_millis(250);
/// How often a stream without a read model checks the backend's newest epoch.
pub const POLL: Duration = Duration::from_secs(1);
/// Changed users listed per event (the count of all is given too).
const MAX_LISTED: usize = 10;
/// Streams one client (see [`ClientKey`]) may hold open at once.
pub const MAX_STREAMS_PER_CLIENT: usize = 8;

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Also send this user's changed categories, merchants and months.
    user: Option<String>,
}

pub async fn events(
    State(app): State<App>,
    client: ClientKey,
    access: Access,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the only parameter is user=ID: {e}"),
        )
    })?;
    let user = query.user.as_deref().map(parse_user_id).transpose()?;
    match user {
        Some(user) => access.check(|p| p.read_user(user))?,
        None => access.check(|p| p.read_all("live events of every user (no user=ID)"))?,
    }
    let guard = app
        .event_clients
        .acquire(client)
        .map_err(|refused| match refused {
            Refused::Everyone => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{MAX_EVENT_CLIENTS} live pages are open already; close one or retry later"
                ),
            ),
            Refused::Client(client) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{client} has {MAX_STREAMS_PER_CLIENT} live pages open already (the most one \
                     client may have); close one or retry later"
                ),
            ),
        })?;
    let stream = match &app.backend.live {
        Some(read_model) => {
            // Changes published from here on; the page loads the state itself.
            let (_, changes) = read_model.subscribe(None);
            let feed = Feed {
                changes,
                user,
                read_model: Arc::clone(read_model),
                directory: app.directory.clone(),
                last_sent: Instant::now(),
                hello: Some(read_model.published_epoch().unwrap_or(0)),
                _guard: guard,
            };
            futures::stream::unfold(feed, |mut feed| async move {
                let event = feed.next().await?;
                Some((Ok::<Event, Infallible>(event), feed))
            })
            .boxed()
        }
        None => {
            let epoch = app.backend.query.timeline().1.unwrap_or(0);
            let poll = Poll {
                app: app.clone(),
                epoch,
                hello: true,
                _guard: guard,
            };
            futures::stream::unfold(poll, |mut poll| async move {
                let event = poll.next().await?;
                Some((Ok::<Event, Infallible>(event), poll))
            })
            .boxed()
        }
    };
    // Every stream ends when the server stops.
    let stopping = app.clone();
    let stream = stream.take_until(async move { stopping.stopping().await });
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    // Proxies must not buffer the stream.
    Ok(([(header::CACHE_CONTROL, "no-store")], sse).into_response())
}

/// Who opens a stream, for the per-client share: the remote IP address.
///
/// Hook for token auth: once a request carries an authenticated principal, key streams by the
/// principal instead (add a variant and take it from the request's extensions here), so that
/// clients behind one proxy or NAT address are told apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The connection's remote address.
    Ip(IpAddr),
    /// The server did not say where the connection comes from: only the overall cap applies.
    Unknown,
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Ip(ip) => write!(f, "client {ip}"),
            ClientKey::Unknown => f.write_str("this client"),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientKey {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(ClientKey::Unknown, |ConnectInfo(addr)| {
                ClientKey::Ip(addr.ip().to_canonical())
            }))
    }
}

/// Why a stream was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// [`MAX_EVENT_CLIENTS`] streams are open.
    Everyone,
    /// The client holds [`MAX_STREAMS_PER_CLIENT`] streams.
    Client(ClientKey),
}

/// The open streams, overall and per client.
#[derive(Debug, Default)]
pub struct EventClients(Mutex<Open>);

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Clients with at least one open stream (so at most [`MAX_EVENT_CLIENTS`] entries).
    per_client: HashMap<ClientKey, usize>,
}

impl EventClients {
    /// Takes a slot for `client`, released when the guard drops (the stream ended).
    ///
    /// # Errors
    ///
    /// Which cap is reached.
    pub fn acquire(self: &Arc<Self>, client: ClientKey) -> Result<ClientGuard, Refused> {
        let mut open = self.0.lock();
        if open.total >= MAX_EVENT_CLIENTS {
            return Err(Refused::Everyone);
        }
        if client != ClientKey::Unknown {
            let held = open.per_client.entry(client.clone()).or_default();
            if *held >= MAX_STREAMS_PER_CLIENT {
                return Err(Refused::Client(client));
            }
            *held += 1;
        }
        open.total += 1;
        crate::metrics::web_clients(1.0);
        Ok(ClientGuard {
            clients: Arc::clone(self),
            client,
        })
    }

    /// Streams open now, overall.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.0.lock().total
    }
}

/// One open stream's slot; released on drop (the client went away).
#[derive(Debug)]
pub struct ClientGuard {
    clients: Arc<EventClients>,
    client: ClientKey,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        crate::metrics::web_clients(-1.0);
        let mut open = self.clients.0.lock();
        open.total -= 1;
        if let Some(held) = open.per_client.get_mut(&self.client) {
            *held -= 1;
            if *held == 0 {
                open.per_client.remove(&self.client);
            }
        }
    }
}

struct Feed {
    changes: broadcast::Receiver<Arc<Published>>,
    user: Option<UserId>,
    read_model: Arc<ReadModel>,
    directory: Directory,
    last_sent: Instant,
    hello: Option<Epoch>,
    _guard: ClientGuard,
}

/// The stream of a backend without a read model: `hello`, then `reset` per newer epoch.
struct Poll {
    app: App,
    epoch: Epoch,
    hello: bool,
    _guard: ClientGuard,
}

impl Poll {
    async fn next(&mut self) -> Option<Event> {
        if std::mem::take(&mut self.hello) {
            return Some(json_event(
                "hello",
                &serde_json::json!({ "epoch": self.epoch }),
            ));
        }
        loop {
            tokio::time::sleep(POLL).await;
            let newest = self.app.backend.query.timeline().1.unwrap_or(0);
            if newest != self.epoch {
                self.epoch = newest;
                return Some(json_event("reset", &serde_json::json!({ "epoch": newest })));
            }
        }
    }
}

/// What the stream got while waiting.
enum Received {
    Some(Vec<Arc<Published>>),
    Lagged,
    End,
}

impl Feed {
    async fn next(&mut self) -> Option<Event> {
        if let Some(epoch) = self.hello.take() {
            return Some(json_event("hello", &serde_json::json!({ "epoch": epoch })));
        }
        let batch = match self.receive().await {
            Received::Some(batch) => batch,
            Received::Lagged => {
                self.changes = self.changes.resubscribe();
                self.last_sent = Instant::now();
                let epoch = self.read_model.published_epoch().unwrap_or(0);
                return Some(json_event("reset", &serde_json::json!({ "epoch": epoch })));
            }
            Received::End => return None,
        };
        self.last_sent = Instant::now();
        let mut payload = merge(&batch, self.user);
        let ids: Vec<UserId> = payload.changes.iter().map(|c| c.user_id).collect();
        for (change, lookup) in payload
            .changes
            .iter_mut()
            .zip(self.directory.lookup_all(&ids).await)
        {
            if let super::api::Lookup::Found(details) = lookup {
                change.name = Some(details.name().to_string());
                change.currency = Some(details.currency().to_string());
            }
        }
        add_alerts(&mut payload, &self.read_model.snapshot(), self.user);
        Some(json_event("changes", &payload))
    }

    /// Waits for a published epoch, then for the rest of the window, and takes everything
    /// published by then.
    async fn receive(&mut self) -> Received {
        let first = tokio::select! {
            received = self.changes.recv() => received,
            () = self.read_model.closed() => return Received::End,
        };
        let mut batch = match first {
            Ok(published) => vec![published],
            Err(RecvError::Lagged(_)) => return Received::Lagged,
            Err(RecvError::Closed) => return Received::End,
        };
        tokio::select! {
            () = tokio::time::sleep_until(self.last_sent + WINDOW) => {}
            () = self.read_model.closed() => return Received::End,
        }
        loop {
            match self.changes.try_recv() {
                Ok(published) => batch.push(published),
                Err(TryRecvError::Empty) => return Received::Some(batch),
                Err(TryRecvError::Lagged(_)) => return Received::Lagged,
                Err(TryRecvError::Closed) => return Received::End,
            }
        }
    }
}

fn json_event(name: &str, payload: &impl Serialize) -> Event {
    let data = serde_json::to_string(payload).unwrap_or_else(|_| "{}".into());
    Event::default().event(name).data(data)
}

/// The `changes` event.
#[derive(Debug, Default, Serialize)]
pub struct ChangesJson {
    /// The newest epoch included.
    pub epoch: Epoch,
    /// The oldest epoch included.
    pub from_epoch: Epoch,
    /// Users whose totals changed.
    pub changed_users: usize,
    /// The users changed in the newest epochs, newest first (at most 10).
    pub changes: Vec<UserChange>,
    /// The selected user's changes, if they changed.
    pub user: Option<UserCells>,
    /// Users with a fired 100 % alert now (the overview's badge).
    pub over_budget_users: usize,
    /// Users with any fired alert now.
    pub alerted_users: usize,
    /// With `?user=ID`: the user's fired alerts now (the page redraws its meter and alerts when
    /// they differ from what it shows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_alerts: Option<Vec<AlertJson>>,
    /// With `?user=ID`: the user's monthly budget now, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_budget_minor: Option<i64>,
}

/// Adds the alert state of `snapshot` (the newest published) to a `changes` event: alerts and
/// budgets change without any expense changing (a budget lowered or raised), and the pages
/// must show that without a reload.
pub fn add_alerts(payload: &mut ChangesJson, snapshot: &Snapshot, user: Option<UserId>) {
    let top = *THRESHOLDS_PCT.last().expect("thresholds");
    let mut over: Vec<UserId> = snapshot
        .alerts(None)
        .filter(|a| a.threshold_pct == top)
        .map(|a| a.user_id)
        .collect();
    over.dedup();
    payload.over_budget_users = over.len();
    payload.alerted_users = snapshot.alerted_users();
    if let Some(user) = user {
        payload.user_alerts = Some(snapshot.alerts(Some(user)).map(AlertJson::from).collect());
        payload.user_budget_minor = snapshot.user_ref(user).and_then(|row| row.budget_minor);
    }
}

/// A user's new total.
#[derive(Debug, Serialize)]
pub struct UserChange {
    pub user_id: UserId,
    pub name: Option<String>,
    pub currency: Option<String>,
    pub epoch: Epoch,
    pub total_minor: i128,
    pub expense_count: i64,
    pub last_event_ms: Option<i64>,
}

/// The new values of one user's changed cells.
#[derive(Debug, Default, Serialize)]
pub struct UserCells {
    pub total_minor: Option<i128>,
    pub expense_count: Option<i64>,
    pub last_event_ms: Option<i64>,
    pub categories: Vec<CellJson>,
    pub merchants: Vec<CellJson>,
    pub months: Vec<CellJson>,
}

/// A cell's new value; `removed` if it no longer exists.
#[derive(Debug, Serialize)]
pub struct CellJson {
    pub key: String,
    pub total_minor: i128,
    pub expense_count: i64,
    pub removed: bool,
}

/// Merges a window's epochs: the newest value of every changed cell.
pub fn merge(batch: &[Arc<Published>], selected: Option<UserId>) -> ChangesJson {
    let mut users: BTreeMap<UserId, (Epoch, &CellValue)> = BTreeMap::new();
    let mut cells: BTreeMap<AggKey, &CellValue> = BTreeMap::new();
    for published in batch {
        let epoch = published.as_of.epoch;
        for cell in &published.cells {
            if let AggKey::User(user) = cell.key {
                users.insert(user, (epoch, cell));
            }
            if Some(cell.key.user_id()) == selected {
                cells.insert(cell.key, cell);
            }
        }
    }
    let mut changes: Vec<UserChange> = users
        .iter()
        .map(|(user, (epoch, cell))| UserChange {
            user_id: *user,
            name: None,
            currency: None,
            epoch: *epoch,
            total_minor: cell.sum,
            expense_count: cell.count,
            last_event_ms: cell.last_event_ms,
        })
        .collect();
    // Newest first; within an epoch the latest event first.
    changes.sort_by(|a, b| {
        (b.epoch, b.last_event_ms, a.user_id).cmp(&(a.epoch, a.last_event_ms, b.user_id))
    });
    changes.truncate(MAX_LISTED);
    let user = (!cells.is_empty()).then(|| {
        let mut out = UserCells::default();
        for (key, cell) in cells {
            let json = |key: String| CellJson {
                key,
                total_minor: cell.sum,
                expense_count: cell.count,
                removed: cell.removed(),
            };
            match key {
                AggKey::User(_) => {
                    out.total_minor = Some(cell.sum);
                    out.expense_count = Some(cell.count);
                    out.last_event_ms = cell.last_event_ms;
                }
                AggKey::Category(_, name) => out.categories.push(json(name.text().to_string())),
                AggKey::Merchant(_, name) => out.merchants.push(json(name.text().to_string())),
                AggKey::Month(_, month) => out.months.push(json(format_month(month))),
                AggKey::Day(..) => {}
            }
        }
        out
    });
    ChangesJson {
        epoch: batch.last().map_or(0, |p| p.as_of.epoch),
        from_epoch: batch.first().map_or(0, |p| p.as_of.epoch),
        changed_users: users.len(),
        changes,
        user,
        ..ChangesJson::default()
    }
}
