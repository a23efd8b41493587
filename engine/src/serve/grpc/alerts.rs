//! `spendflow.v1.Alerts`: the fired budget alerts (`ListAlerts`) and their changes as epochs
//! close (`Subscribe`), from the engine's read model.
//!
//! The rules are those of `ExpenseQuery`: `ListAlerts` answers from one snapshot (its `as_of`),
//! after waiting for `consistency.min_epoch` if asked; `Subscribe` sends the fired alerts a
//! page at a time, then each published epoch's alert changes (if any) and a progress mark, and
//! resumes after an epoch without a snapshot while the read model's alert history still holds
//! it (another incarnation: a snapshot). A subscriber too slow to follow gets a new snapshot; one
//! that does not read its snapshot within [`SNAPSHOT_READ_DEADLINE`] is let go. With auth, a
//! `expenses:read:self` token sees only its own user's alerts; every user's (`user_id` 0)
//! needs `expenses:read`.
//!
//! `spendflow serve --from cassandra` answers with [`AlertsUnimplemented`]: the sink's tables
//! hold no alerts.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use spendflow_operators::reference::{AlertEvent, AlertState};
use spendflow_operators::{Epoch, UserId};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::alerts_server::Alerts;
use tokio::sync::broadcast;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use super::memory::{SNAPSHOT_READ_DEADLINE, SnapshotHolds, SnapshotSlot};
use super::query::SubscriberGuard;
use crate::serve::auth::grpc::{caller, check};
use crate::serve::read_model::{
    AlertSubscriptionStart, AlertView, PublishedAlerts, ReadModel, Snapshot, format_month,
};

/// Alerts per snapshot message of a subscription.
const SNAPSHOT_CHUNK: usize = 1000;

/// The key of one alert: `(user, month, threshold)`.
type AlertKey = (UserId, i32, u8);

/// The stream `Alerts/Subscribe` answers with.
pub type AlertStream =
    Pin<Box<dyn Stream<Item = Result<pb::SubscribeAlertsResponse, Status>> + Send>>;

/// Answers `Alerts` from the engine's read model.
#[derive(Debug, Clone)]
pub struct AlertsService {
    read_model: Arc<ReadModel>,
    /// Open subscriptions, at most [`super::MAX_SUBSCRIBERS`].
    subscribers: Arc<AtomicUsize>,
    /// The snapshots subscribers are reading ([`SNAPSHOT_READ_DEADLINE`]).
    holds: Arc<SnapshotHolds>,
}

impl AlertsService {
    /// A service over `read_model`.
    pub fn new(read_model: Arc<ReadModel>) -> Self {
        AlertsService {
            read_model,
            subscribers: Arc::default(),
            holds: Arc::default(),
        }
    }

    /// The same service counting its subscriptions in `count`, shared with `ExpenseQuery`'s
    /// ([`super::QueryService::subscriber_count`]), so [`super::MAX_SUBSCRIBERS`] bounds the
    /// streams of both together.
    pub fn sharing_subscribers(mut self, count: Arc<AtomicUsize>) -> Self {
        self.subscribers = count;
        self
    }

    /// The snapshot to answer from, after waiting for `consistency.min_epoch` if asked.
    /// `pinned`: a cluster peer gathering an answer asks for the state of exactly
    /// `consistency.min_epoch` (see [`super::backend::Wait::pinned`]).
    async fn snapshot(
        &self,
        consistency: Option<&pb::Consistency>,
        pinned: bool,
    ) -> Result<Arc<Snapshot>, Status> {
        let latest = self.read_model.published_epoch();
        let (min_epoch, timeout) =
            convert::consistency(consistency, self.read_model.incarnation(), latest)?;
        if min_epoch == 0 {
            return Ok(if pinned {
                self.read_model.snapshot_from(0)
            } else {
                self.read_model.snapshot()
            });
        }
        let newest = self
            .read_model
            .snapshot_at_least(min_epoch, timeout)
            .await
            .ok_or_else(|| {
                convert::epoch_not_reached(
                    super::backend::Wait {
                        min_epoch,
                        timeout,
                        pinned: false,
                    },
                    self.read_model.published_epoch(),
                    "published",
                )
            })?;
        Ok(if pinned {
            self.read_model.snapshot_from(min_epoch)
        } else {
            newest
        })
    }
}

/// `user_id` of a request: 0 for every user, else a valid user id.
fn user_filter(user_id: u64) -> Result<Option<UserId>, Status> {
    match user_id {
        0 => Ok(None),
        id => convert::user_id(id).map(Some),
    }
}

/// Checks that the caller may read the alerts of `user` (every user's with `None`).
fn check_filter<T>(request: &Request<T>, user: Option<UserId>, what: &str) -> Result<(), Status> {
    check(request, |p| match user {
        Some(user) => p.read_user(user),
        None => p.read_all(what),
    })
}

fn page_token(key: AlertKey) -> String {
    format!("{}:{}:{}", key.0, key.1, key.2)
}

fn parse_page_token(token: &str) -> Result<Option<AlertKey>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Status::invalid_argument(format!(
            "page_token must be a next_page_token from a previous answer, got {token:?}"
        ))
    };
    let mut parts = token.split(':');
    let (Some(user), Some(month), Some(threshold), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    Ok(Some((
        user.parse().map_err(|_| bad())?,
        month.parse().map_err(|_| bad())?,
        threshold.parse().map_err(|_| bad())?,
    )))
}

/// A fired alert as the wire carries it; `OUT_OF_RANGE` if its spend does not fit `int64`.
fn fired(view: &AlertView) -> Result<pb::Alert, Status> {
    Ok(pb::Alert {
        user_id: view.user_id,
        month: format_month(view.month),
        threshold_pct: view.threshold_pct.into(),
        state: pb::AlertState::Fired.into(),
        spent_minor: convert::fit(
            view.spent_minor,
            view.user_id,
            &format!("month {}", format_month(view.month)),
        )?,
        budget_minor: view.budget_minor,
        currency: convert::currency(view.currency),
        epoch: view.since_epoch,
    })
}

/// An alert's change of state as the wire carries it.
fn changed(epoch: Epoch, event: &AlertEvent) -> Result<pb::Alert, Status> {
    Ok(pb::Alert {
        user_id: event.user_id,
        month: format_month(event.month),
        threshold_pct: event.threshold_pct.into(),
        state: match event.state {
            AlertState::Fired => pb::AlertState::Fired,
            AlertState::Cleared => pb::AlertState::Cleared,
        }
        .into(),
        spent_minor: convert::fit(
            event.spent_minor,
            event.user_id,
            &format!("month {}", format_month(event.month)),
        )?,
        budget_minor: event.budget_minor,
        currency: convert::currency(event.currency),
        epoch,
    })
}

#[tonic::async_trait]
impl Alerts for AlertsService {
    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let user = user_filter(request.get_ref().user_id)?;
        check_filter(&request, user, "ListAlerts of every user (user_id 0)")?;
        let pinned = super::cluster::pinned(&request);
        let request = request.into_inner();
        let page_size = convert::limit(request.page_size, 100, 1000, "page_size")?;
        let after = parse_page_token(&request.page_token)?;
        let snapshot = self.snapshot(request.consistency.as_ref(), pinned).await?;
        let mut views = snapshot.alerts_after(user, after);
        let page: Vec<&AlertView> = views.by_ref().take(page_size).collect();
        let next_page_token = match (views.next(), page.last()) {
            (Some(_), Some(last)) => page_token((last.user_id, last.month, last.threshold_pct)),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: page.into_iter().map(fired).collect::<Result<_, _>>()?,
            as_of: Some(convert::as_of(snapshot.as_of())),
            next_page_token,
        }))
    }

    type SubscribeStream = AlertStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeAlertsRequest>,
    ) -> Result<Response<AlertStream>, Status> {
        let user = user_filter(request.get_ref().user_id)?;
        check_filter(
            &request,
            user,
            "Subscribe to every user's alerts (user_id 0)",
        )?;
        // One token holds a bounded number of streams.
        let token_stream = match caller(&request) {
            None => None,
            Some(caller) => Some(caller.open_stream()?),
        };
        let request = request.into_inner();
        let guard = SubscriberGuard::acquire(&self.subscribers).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} subscriptions are open already; retry later",
                super::MAX_SUBSCRIBERS
            ))
        })?;
        let ours = self.read_model.incarnation();
        let resume_after = (request.resume_after_epoch > 0).then_some(request.resume_after_epoch);
        let resume_after = if !request.incarnation.is_empty() && request.incarnation != **ours {
            // Another timeline's epoch: a fresh snapshot replaces everything the client holds.
            tracing::debug!(theirs = %request.incarnation, ours = %ours, "Alert resume from another incarnation; sending a snapshot.");
            None
        } else {
            resume_after
        };
        if let Some(after) = resume_after {
            let newest = self.read_model.published_epoch();
            if newest.is_none_or(|newest| after > newest) {
                let newest = newest.map_or_else(|| "none yet".to_string(), |e| e.to_string());
                return Err(Status::out_of_range(format!(
                    "resume_after_epoch {after} is beyond the newest published epoch ({newest}) \
                     of incarnation {ours:?}; resume after an epoch this server sent you, or send \
                     0 for a fresh snapshot"
                )));
            }
        }
        let (start, changes) = self.read_model.subscribe_alerts(resume_after);
        let phase = match start {
            AlertSubscriptionStart::Snapshot(snapshot) => {
                Phase::Snapshot(Pages::new(self.holds.hold(snapshot)))
            }
            AlertSubscriptionStart::Replay(replay) => Phase::Replay(replay.into()),
        };
        let feed = Feed {
            user,
            sent_through: resume_after.unwrap_or(0),
            phase,
            changes,
            read_model: Arc::clone(&self.read_model),
            pending: VecDeque::new(),
            done: false,
            holds: Arc::clone(&self.holds),
            _guard: guard,
            _token_stream: token_stream,
        };
        // Messages are made as the client reads them (no task, no queue), as in
        // `ExpenseQuery/Subscribe`.
        Ok(Response::new(Box::pin(futures::stream::unfold(
            feed,
            |mut feed| async move { feed.next().await.map(|message| (message, feed)) },
        ))))
    }
}

/// A snapshot's fired alerts being sent a page at a time.
struct Pages {
    /// Emptied by the reaper when the snapshot is not read in time.
    slot: Arc<SnapshotSlot>,
    /// The last alert sent (`None`: none yet).
    after: Option<AlertKey>,
}

impl Pages {
    fn new(slot: Arc<SnapshotSlot>) -> Self {
        Pages { slot, after: None }
    }
}

enum Phase {
    Snapshot(Pages),
    Replay(VecDeque<Arc<PublishedAlerts>>),
    Live,
}

/// One alert subscription: makes its messages on demand.
struct Feed {
    /// Only this user's alerts; `None`: every user's.
    user: Option<UserId>,
    /// The newest epoch the client has everything of (0: none yet).
    sent_through: Epoch,
    phase: Phase,
    changes: broadcast::Receiver<Arc<PublishedAlerts>>,
    read_model: Arc<ReadModel>,
    /// Messages made and not yet taken (at most the two of one epoch).
    pending: VecDeque<Result<pb::SubscribeAlertsResponse, Status>>,
    done: bool,
    holds: Arc<SnapshotHolds>,
    _guard: SubscriberGuard,
    /// The token's stream count, released with the stream.
    _token_stream: Option<crate::serve::auth::StreamGuard>,
}

fn message(
    event: pb::subscribe_alerts_response::Event,
) -> Result<pb::SubscribeAlertsResponse, Status> {
    Ok(pb::SubscribeAlertsResponse { event: Some(event) })
}

/// The next page of a snapshot's fired alerts (`last` set on the last one, which may be empty).
fn snapshot_page(user: Option<UserId>, pages: &mut Pages) -> Result<pb::AlertSnapshot, Status> {
    let Some(snapshot) = pages.slot.snapshot.lock().clone() else {
        return Err(Status::resource_exhausted(format!(
            "the alert snapshot of epoch {} was not read within {} s, and a snapshot held \
             longer costs the server memory; subscribe again and read the stream as it comes",
            pages.slot.epoch,
            SNAPSHOT_READ_DEADLINE.as_secs()
        )));
    };
    let mut views = snapshot.alerts_after(user, pages.after);
    let page: Vec<&AlertView> = views.by_ref().take(SNAPSHOT_CHUNK).collect();
    let last = views.next().is_none();
    pages.after = page
        .last()
        .map(|v| (v.user_id, v.month, v.threshold_pct))
        .or(pages.after);
    Ok(pb::AlertSnapshot {
        alerts: page.into_iter().map(fired).collect::<Result<_, _>>()?,
        last,
        as_of: Some(convert::as_of(snapshot.as_of())),
    })
}

impl Feed {
    /// The next message; `None` when the stream ends.
    async fn next(&mut self) -> Option<Result<pb::SubscribeAlertsResponse, Status>> {
        loop {
            if let Some(message) = self.pending.pop_front() {
                return Some(message);
            }
            if self.done {
                return None;
            }
            match &mut self.phase {
                Phase::Snapshot(pages) => {
                    let epoch = pages.slot.epoch;
                    match snapshot_page(self.user, pages) {
                        Ok(page) => {
                            if page.last {
                                self.sent_through = epoch;
                                self.phase = Phase::Live;
                            }
                            return Some(message(pb::subscribe_alerts_response::Event::Snapshot(
                                page,
                            )));
                        }
                        Err(status) => self.fail(status),
                    }
                }
                Phase::Replay(replay) => match replay.pop_front() {
                    Some(published) => {
                        self.published(&published);
                        self.sent_through = published.as_of.epoch;
                    }
                    None => self.phase = Phase::Live,
                },
                Phase::Live => {
                    tokio::select! {
                        received = self.changes.recv() => match received {
                            Ok(published) if published.as_of.epoch <= self.sent_through => {}
                            Ok(published) => {
                                self.published(&published);
                                self.sent_through = published.as_of.epoch;
                            }
                            Err(broadcast::error::RecvError::Lagged(missed)) => {
                                // Too slow to follow every epoch: a fresh snapshot replaces
                                // everything the client holds.
                                tracing::debug!(missed, "Alert subscriber lagged; sending a new snapshot.");
                                self.changes = self.changes.resubscribe();
                                let slot = self.holds.hold(self.read_model.snapshot());
                                self.phase = Phase::Snapshot(Pages::new(slot));
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                        () = self.read_model.closed() => return None,
                    }
                }
            }
        }
    }

    /// Ends the stream with `status`.
    fn fail(&mut self, status: Status) {
        self.pending.push_back(Err(status));
        self.done = true;
    }

    /// Queues an epoch's alert changes of the subscribed user(s) (if any) and its progress
    /// mark.
    fn published(&mut self, published: &PublishedAlerts) {
        let as_of = convert::as_of(&published.as_of);
        let alerts: Result<Vec<pb::Alert>, Status> = published
            .alerts
            .iter()
            .filter(|(_, event)| self.user.is_none_or(|u| u == event.user_id))
            .map(|(epoch, event)| changed(*epoch, event))
            .collect();
        let alerts = match alerts {
            Ok(alerts) => alerts,
            Err(status) => return self.fail(status),
        };
        if !alerts.is_empty() {
            self.pending
                .push_back(message(pb::subscribe_alerts_response::Event::Changes(
                    pb::AlertChanges {
                        alerts,
                        as_of: Some(as_of.clone()),
                    },
                )));
        }
        self.pending
            .push_back(message(pb::subscribe_alerts_response::Event::Progress(
                pb::Progress { as_of: Some(as_of) },
            )));
    }
}

/// The message of every `Alerts` call on `spendflow serve --from cassandra`.
pub const ALERTS_UNIMPLEMENTED: &str = "Alerts is not served from Cassandra: the sink's tables \
     hold no budget alerts. Call the engine's own gRPC address (`spendflow run ... --grpc \
     ADDR`), or read the alerts topic";

/// `Alerts` where there are none to serve (`spendflow serve --from cassandra`): every call is
/// `UNIMPLEMENTED` with [`ALERTS_UNIMPLEMENTED`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AlertsUnimplemented;

#[tonic::async_trait]
impl Alerts for AlertsUnimplemented {
    async fn list_alerts(
        &self,
        _: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        Err(Status::unimplemented(ALERTS_UNIMPLEMENTED))
    }

    type SubscribeStream = AlertStream;

    async fn subscribe(
        &self,
        _: Request<pb::SubscribeAlertsRequest>,
    ) -> Result<Response<AlertStream>, Status> {
        Err(Status::unimplemented(ALERTS_UNIMPLEMENTED))
    }
}

#[cfg(test)]
mod tests;
