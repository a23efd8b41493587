//! Cluster mode: every process answers every query.
//!
//! In a cluster (`spendflow run ... --cluster FILE --process I`) each process's read model
//! holds only the users it owns ([`Topology::owner_process`]); every process publishes the same
//! epoch numbers of one incarnation. The services here wrap a process's own services and make
//! the cluster look like one engine:
//!
//! * calls about one user (`GetUserSummary`, `GetUserWindows`, `ListAlerts` and
//!   `Alerts/Subscribe` of one user, `ExpenseQuery/Subscribe` of users one process owns) are
//!   forwarded to the owner, with the caller's `authorization` and the request unchanged; its
//!   answer or its status comes back (an unreachable owner: `UNAVAILABLE` naming it);
//! * calls over all users (`TopSpenders`, `ListUserSummaries`, `ListAlerts` of every user) are
//!   gathered from every process as of ONE epoch ([`gather`]) and merged exactly as one engine
//!   would order and page them (page tokens are user ids, valid on every process);
//! * subscriptions over users of several processes merge the processes' streams ([`merge`]):
//!   one snapshot as of one epoch, then each epoch's changes of all processes, then its
//!   progress mark;
//! * `Admin/GetStatus` lists every process, and `caught_up` is true only when all are.
//!
//! A forwarded call carries [`FORWARDED`]: its receiver answers from its own read model only
//! (no call is forwarded twice). A gathering call also carries [`PINNED`]: the receiver answers
//! from the oldest state it keeps at or after `consistency.min_epoch`
//! ([`crate::serve::read_model::ReadModel::snapshot_from`]), so every process answers as of the
//! same epoch even though they publish it at slightly different times.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use spendflow_operators::{Epoch, UserId};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::admin_server::Admin;
use spendflow_proto::v1::alerts_client::AlertsClient;
use spendflow_proto::v1::alerts_server::Alerts;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use spendflow_proto::v1::expense_query_server::ExpenseQuery;
use tokio_stream::Stream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use super::alerts::AlertStream;
use super::backend::SubscribeStream;
use super::query::SubscriberGuard;
use super::{AdminService, AlertsService, QueryService, REQUEST_TIMEOUT, convert};
use crate::cluster::{ClusterSpec, Topology};
use crate::serve::auth::grpc::{caller, check};
use crate::serve::read_model::ReadModel;
use crate::serve::transport::LoadedTls;

/// Metadata marking a call one process forwarded to another: the receiver answers from its own
/// read model.
pub const FORWARDED: &str = "x-spendflow-forwarded";
/// Metadata (with [`FORWARDED`]) asking for the state of exactly `consistency.min_epoch` (the
/// oldest kept state at or after it).
pub const PINNED: &str = "x-spendflow-pinned";

/// Snapshots a process keeps for gathered queries ([`ReadModel::keep_recent_snapshots`]): the
/// epochs one process may be ahead of another while a gathered query asks them all.
pub const KEPT_SNAPSHOTS: usize = 32;

/// Rounds a gathered query tries before giving up on finding one epoch every process holds.
const GATHER_ROUNDS: usize = 8;

/// Largest answer accepted from a peer (a page of 1000 summaries with their categories and
/// merchants is well below).
const MAX_PEER_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// How long connecting to a peer may take before the call is `UNAVAILABLE`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Items per message of a merged snapshot (as the engine pages its own).
const SNAPSHOT_CHUNK: usize = 1000;

/// True when another process forwarded `request` (answer it locally).
pub(crate) fn forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().get(FORWARDED).is_some()
}

/// True when a gathering peer asks for the state of exactly `consistency.min_epoch`.
pub(crate) fn pinned<T>(request: &Request<T>) -> bool {
    forwarded(request) && request.metadata().get(PINNED).is_some()
}

/// Why the peers could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    /// A process's gRPC address is not usable as a URI.
    #[error("cluster process {process}: gRPC address {addr:?}: {message}")]
    Address {
        /// The process.
        process: usize,
        /// Its address from the cluster file.
        addr: String,
        /// What is wrong.
        message: String,
    },
    /// The hostfile and the topology disagree.
    #[error(
        "the cluster file lists {listed} processes (this is process {process}), the topology has {topology}"
    )]
    Mismatch {
        /// Processes in the file.
        listed: usize,
        /// This process in the file.
        process: usize,
        /// Processes in the topology.
        topology: usize,
    },
}

/// The processes of a cluster as gRPC clients (lazy channels: a peer that is down makes only the
/// calls that need it fail, and is used again once it is back).
#[derive(Clone, Debug)]
pub struct Peers {
    topology: Topology,
    addrs: Vec<String>,
    /// One per process; this process's is never used.
    channels: Vec<Channel>,
}

impl Peers {
    /// Clients of every process of `spec`. With `tls` (the server's own TLS), peers are called
    /// over TLS trusting the client CA (`--tls-client-ca`) if set, else the server's own
    /// certificate, presenting the server's certificate as the client identity when mTLS is
    /// on; without, in plain text. Must run inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`PeersError`] for an address that is not `host:port`, or a spec that does not match
    /// `topology`.
    pub fn new(
        spec: &ClusterSpec,
        topology: Topology,
        tls: Option<&LoadedTls>,
    ) -> Result<Peers, PeersError> {
        if spec.processes.len() != topology.processes || spec.process != topology.process {
            return Err(PeersError::Mismatch {
                listed: spec.processes.len(),
                process: spec.process,
                topology: topology.processes,
            });
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut channels = Vec::with_capacity(spec.processes.len());
        for (process, addrs) in spec.processes.iter().enumerate() {
            let bad = |message: String| PeersError::Address {
                process,
                addr: addrs.grpc.clone(),
                message,
            };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", addrs.grpc))
                .map_err(|e| bad(e.to_string()))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true);
            if let Some(tls) = tls {
                endpoint = endpoint
                    .tls_config(tls.grpc_client_config())
                    .map_err(|e| bad(e.to_string()))?;
            }
            channels.push(endpoint.connect_lazy());
        }
        Ok(Peers {
            topology,
            addrs: spec.processes.iter().map(|p| p.grpc.clone()).collect(),
            channels,
        })
    }

    /// This process's index.
    pub fn me(&self) -> usize {
        self.topology.process
    }

    /// How many processes.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Never true: a cluster has this process at least.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The gRPC address of `process` from the cluster file.
    pub fn addr(&self, process: usize) -> &str {
        &self.addrs[process]
    }

    fn owner(&self, user: UserId) -> usize {
        self.topology.owner_process(user)
    }

    fn query(&self, process: usize) -> ExpenseQueryClient<Channel> {
        ExpenseQueryClient::new(self.channels[process].clone())
            .max_decoding_message_size(MAX_PEER_ANSWER_BYTES)
    }

    fn alerts(&self, process: usize) -> AlertsClient<Channel> {
        AlertsClient::new(self.channels[process].clone())
            .max_decoding_message_size(MAX_PEER_ANSWER_BYTES)
    }

    fn admin(&self, process: usize) -> AdminClient<Channel> {
        AdminClient::new(self.channels[process].clone())
            .max_decoding_message_size(MAX_PEER_ANSWER_BYTES)
    }

    /// A peer's status as the caller sees it: `UNAVAILABLE` names the peer (it is down or
    /// unreachable, or its own store is); any other status is the peer's answer, unchanged.
    fn status(&self, process: usize, status: Status) -> Status {
        match status.code() {
            Code::Unavailable => Status::unavailable(format!(
                "cluster process {process} ({}) is unavailable: {}",
                self.addrs[process],
                status.message()
            )),
            // Which process did not reach the epoch (or did not answer in time).
            Code::DeadlineExceeded => Status::deadline_exceeded(format!(
                "cluster process {process} ({}): {}",
                self.addrs[process],
                status.message()
            )),
            _ => status,
        }
    }
}

/// A request to a peer: `message` with the caller's `authorization`, marked [`FORWARDED`]
/// (and [`PINNED`] if asked).
fn outgoing<T>(metadata: &MetadataMap, message: T, pin: bool) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(auth) = metadata.get("authorization") {
        request.metadata_mut().insert("authorization", auth.clone());
    }
    mark(request.metadata_mut(), pin);
    request
}

/// A unary call to a peer ends a little before the caller's own call would be cancelled
/// ([`REQUEST_TIMEOUT`]), so a peer that hangs gives a status naming it.
fn timed<T>(mut request: Request<T>) -> Request<T> {
    request.set_timeout(REQUEST_TIMEOUT.saturating_sub(Duration::from_secs(5)));
    request
}

fn mark(metadata: &mut MetadataMap, pin: bool) {
    metadata.insert(FORWARDED, MetadataValue::from_static("1"));
    if pin {
        metadata.insert(PINNED, MetadataValue::from_static("1"));
    }
}

/// The same request for this process's own service, marked like a peer's (the caller's
/// identity, in the extensions, stays).
fn local<T, U>(request: &Request<T>, message: U, pin: bool) -> Request<U> {
    let mut metadata = MetadataMap::new();
    mark(&mut metadata, pin);
    Request::from_parts(metadata, request.extensions().clone(), message)
}

/// Every process's `as_of` merged: the epoch they share, every process's positions (each
/// reads other partitions), ordered by source and partition.
fn merged_as_of(epoch: Epoch, parts: impl IntoIterator<Item = Option<pb::AsOf>>) -> pb::AsOf {
    let mut merged = pb::AsOf {
        epoch,
        ..pb::AsOf::default()
    };
    for part in parts.into_iter().flatten() {
        if merged.incarnation.is_empty() {
            merged.incarnation = part.incarnation;
        }
        merged.positions.extend(part.positions);
    }
    merged
        .positions
        .sort_by(|a, b| (&a.source, a.partition).cmp(&(&b.source, b.partition)));
    merged
}

/// Asks every process (`ask(process, consistency, pinned)`) as of one epoch and returns their
/// answers in process order with that epoch.
///
/// The first round asks for the newest epoch this process has published (or the request's
/// `min_epoch` if newer): a process behind waits for it (up to the request's timeout), a process
/// ahead answers from the state of that epoch it still keeps. If the answers' epochs differ (a
/// process no longer keeps that state), the next round asks for the newest of them.
async fn gather<T, F, Fut>(
    read_model: &ReadModel,
    processes: usize,
    consistency: Option<pb::Consistency>,
    epoch_of: impl Fn(&T) -> Epoch,
    ask: F,
) -> Result<(Epoch, Vec<T>), Status>
where
    F: Fn(usize, pb::Consistency) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let requested = consistency.unwrap_or_default();
    // The request's own consistency is checked the way one engine checks it.
    convert::consistency(
        Some(&requested),
        read_model.incarnation(),
        read_model.published_epoch(),
    )?;
    let mut target = requested
        .min_epoch
        .max(read_model.published_epoch().unwrap_or(0));
    let mut seen = Vec::new();
    for _ in 0..GATHER_ROUNDS {
        let consistency = pb::Consistency {
            min_epoch: target,
            timeout_ms: requested.timeout_ms,
            incarnation: if requested.incarnation.is_empty() {
                read_model.incarnation().to_string()
            } else {
                requested.incarnation.clone()
            },
        };
        let answers = futures::future::join_all(
            (0..processes).map(|process| ask(process, consistency.clone())),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<T>, Status>>()?;
        let epochs: Vec<Epoch> = answers.iter().map(&epoch_of).collect();
        let newest = epochs.iter().copied().max().unwrap_or(0);
        if epochs.iter().all(|e| *e == newest) {
            return Ok((newest, answers));
        }
        tracing::debug!(
            target,
            ?epochs,
            "Gathered answers of different epochs; asking again."
        );
        seen = epochs;
        target = newest;
    }
    Err(Status::unavailable(format!(
        "the cluster's processes did not answer as of one epoch in {GATHER_ROUNDS} rounds \
         (last epochs: {seen:?}); retry"
    )))
}

/// `ExpenseQuery` of a cluster process: forwards, gathers and merges (see the module).
#[derive(Debug, Clone)]
pub struct ClusterQuery {
    local: QueryService,
    peers: Arc<Peers>,
    read_model: Arc<ReadModel>,
}

impl ClusterQuery {
    /// Answers for the cluster `peers` describe, from `local` (over `read_model`) for what this
    /// process owns.
    pub fn new(local: QueryService, peers: Arc<Peers>, read_model: Arc<ReadModel>) -> Self {
        ClusterQuery {
            local,
            peers,
            read_model,
        }
    }

    fn epoch(as_of: Option<&pb::AsOf>) -> Epoch {
        as_of.map_or(0, |a| a.epoch)
    }
}

#[tonic::async_trait]
impl ExpenseQuery for ClusterQuery {
    async fn get_user_summary(
        &self,
        request: Request<pb::GetUserSummaryRequest>,
    ) -> Result<Response<pb::GetUserSummaryResponse>, Status> {
        if forwarded(&request) {
            return self.local.get_user_summary(request).await;
        }
        let owner = self
            .peers
            .owner(convert::user_id(request.get_ref().user_id)?);
        if owner == self.peers.me() {
            return self.local.get_user_summary(request).await;
        }
        let (metadata, _, message) = request.into_parts();
        let answer = self
            .peers
            .query(owner)
            .get_user_summary(timed(outgoing(&metadata, message, false)))
            .await
            .map_err(|s| self.peers.status(owner, s))?;
        Ok(Response::new(answer.into_inner()))
    }

    async fn list_user_summaries(
        &self,
        request: Request<pb::ListUserSummariesRequest>,
    ) -> Result<Response<pb::ListUserSummariesResponse>, Status> {
        if forwarded(&request) {
            return self.local.list_user_summaries(request).await;
        }
        check(&request, |p| p.read_all("ListUserSummaries"))?;
        let page_size = convert::limit(request.get_ref().page_size, 100, 1000, "page_size")?;
        let message = request.get_ref().clone();
        let (epoch, pages) = gather(
            &self.read_model,
            self.peers.len(),
            message.consistency.clone(),
            |page: &pb::ListUserSummariesResponse| Self::epoch(page.as_of.as_ref()),
            |process, consistency| {
                let message = pb::ListUserSummariesRequest {
                    consistency: Some(consistency),
                    ..message.clone()
                };
                let request = &request;
                async move {
                    if process == self.peers.me() {
                        self.local
                            .list_user_summaries(local(request, message, true))
                            .await
                            .map(Response::into_inner)
                    } else {
                        self.peers
                            .query(process)
                            .list_user_summaries(timed(outgoing(request.metadata(), message, true)))
                            .await
                            .map(Response::into_inner)
                            .map_err(|s| self.peers.status(process, s))
                    }
                }
            },
        )
        .await?;
        let more = pages.iter().any(|p| !p.next_page_token.is_empty());
        let mut as_ofs = Vec::with_capacity(pages.len());
        let mut summaries = Vec::new();
        for page in pages {
            as_ofs.push(page.as_of);
            summaries.extend(page.summaries);
        }
        summaries.sort_by_key(|s| s.user_id);
        let more = more || summaries.len() > page_size;
        summaries.truncate(page_size);
        let next_page_token = match (more, summaries.last()) {
            (true, Some(last)) => last.user_id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListUserSummariesResponse {
            summaries,
            next_page_token,
            as_of: Some(merged_as_of(epoch, as_ofs)),
        }))
    }

    async fn get_user_windows(
        &self,
        request: Request<pb::GetUserWindowsRequest>,
    ) -> Result<Response<pb::GetUserWindowsResponse>, Status> {
        if forwarded(&request) {
            return self.local.get_user_windows(request).await;
        }
        let owner = self
            .peers
            .owner(convert::user_id(request.get_ref().user_id)?);
        if owner == self.peers.me() {
            return self.local.get_user_windows(request).await;
        }
        let (metadata, _, message) = request.into_parts();
        let answer = self
            .peers
            .query(owner)
            .get_user_windows(timed(outgoing(&metadata, message, false)))
            .await
            .map_err(|s| self.peers.status(owner, s))?;
        Ok(Response::new(answer.into_inner()))
    }

    async fn top_spenders(
        &self,
        request: Request<pb::TopSpendersRequest>,
    ) -> Result<Response<pb::TopSpendersResponse>, Status> {
        if forwarded(&request) {
            return self.local.top_spenders(request).await;
        }
        check(&request, |p| p.read_all("TopSpenders"))?;
        let limit = convert::limit(request.get_ref().limit, 10, 1000, "limit")?;
        let message = request.get_ref().clone();
        let (epoch, answers) = gather(
            &self.read_model,
            self.peers.len(),
            message.consistency.clone(),
            |answer: &pb::TopSpendersResponse| Self::epoch(answer.as_of.as_ref()),
            |process, consistency| {
                let message = pb::TopSpendersRequest {
                    consistency: Some(consistency),
                    ..message.clone()
                };
                let request = &request;
                async move {
                    if process == self.peers.me() {
                        self.local
                            .top_spenders(local(request, message, true))
                            .await
                            .map(Response::into_inner)
                    } else {
                        self.peers
                            .query(process)
                            .top_spenders(timed(outgoing(request.metadata(), message, true)))
                            .await
                            .map(Response::into_inner)
                            .map_err(|s| self.peers.status(process, s))
                    }
                }
            },
        )
        .await?;
        let reporting_currency = answers
            .iter()
            .map(|a| a.reporting_currency.clone())
            .find(|c| !c.is_empty())
            .unwrap_or_default();
        let mut as_ofs = Vec::with_capacity(answers.len());
        let mut spenders = Vec::new();
        for answer in answers {
            as_ofs.push(answer.as_of);
            spenders.extend(answer.spenders);
        }
        // As one engine ranks: largest first (the converted total with a reporting currency),
        // ties by user id.
        let converted = !reporting_currency.is_empty();
        spenders.sort_by(|a, b| {
            let key = |s: &pb::Spender| {
                if converted {
                    s.converted_minor
                } else {
                    s.total_minor
                }
            };
            key(b).cmp(&key(a)).then_with(|| a.user_id.cmp(&b.user_id))
        });
        spenders.truncate(limit);
        for (i, spender) in spenders.iter_mut().enumerate() {
            spender.rank = i as u32 + 1;
        }
        Ok(Response::new(pb::TopSpendersResponse {
            spenders,
            as_of: Some(merged_as_of(epoch, as_ofs)),
            reporting_currency,
        }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<SubscribeStream>, Status> {
        if forwarded(&request) {
            return self.local.subscribe(request).await;
        }
        // The limit is on the whole request (each owner would see only its part).
        let listed = request.get_ref().user_ids.len();
        if listed > super::query::MAX_SUBSCRIBED_USERS {
            return Err(Status::invalid_argument(format!(
                "user_ids may name at most {} users, got {listed}",
                super::query::MAX_SUBSCRIBED_USERS
            )));
        }
        let users = request
            .get_ref()
            .user_ids
            .iter()
            .map(|u| convert::user_id(*u))
            .collect::<Result<Vec<_>, _>>()?;
        let mut owners: Vec<usize> = if users.is_empty() {
            (0..self.peers.len()).collect()
        } else {
            users.iter().map(|u| self.peers.owner(*u)).collect()
        };
        owners.sort_unstable();
        owners.dedup();
        if owners == [self.peers.me()] {
            return self.local.subscribe(request).await;
        }
        // Checked here too, so a refused caller costs no peer a stream.
        let token_stream = open_checked(&request, &users, "Subscribe to every user (no user_ids)")?;
        let guard = self.acquire()?;
        let (metadata, _, message) = request.into_parts();
        let mut streams = Vec::with_capacity(owners.len());
        for owner in owners {
            // Each owner gets the users it owns (all users: every process, all of its own).
            let mine: Vec<u64> = message
                .user_ids
                .iter()
                .copied()
                .filter(|u| self.peers.owner(*u as UserId) == owner)
                .collect();
            let message = pb::SubscribeRequest {
                user_ids: mine,
                ..message.clone()
            };
            let stream = self
                .peers
                .query(owner)
                .subscribe(outgoing(&metadata, message, false))
                .await
                .map_err(|s| self.peers.status(owner, s))?
                .into_inner();
            let peers = Arc::clone(&self.peers);
            streams.push(
                stream
                    .map(move |r| r.map_err(|s| peers.status(owner, s)))
                    .boxed(),
            );
        }
        let held = (guard, token_stream);
        let merged: SubscribeStream = if streams.len() == 1 {
            let stream = streams.pop().expect("one stream");
            Box::pin(stream.inspect(move |_| {
                let _ = &held;
            }))
        } else {
            Box::pin(merge::<CellFrames>(streams).inspect(move |_| {
                let _ = &held;
            }))
        };
        Ok(Response::new(merged))
    }
}

impl ClusterQuery {
    fn acquire(&self) -> Result<SubscriberGuard, Status> {
        SubscriberGuard::acquire(&self.local.subscriber_count()).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} subscriptions are open already; retry later",
                super::MAX_SUBSCRIBERS
            ))
        })
    }
}

/// The auth checks of a subscription (every user readable; all users need read-all) and the
/// token's stream count, held as long as the relayed stream lives.
fn open_checked<T>(
    request: &Request<T>,
    users: &[UserId],
    all: &str,
) -> Result<Option<crate::serve::auth::StreamGuard>, Status> {
    let Some(caller) = caller(request) else {
        return Ok(None);
    };
    if users.is_empty() {
        caller
            .principal
            .read_all(all)
            .map_err(crate::serve::auth::grpc::status)?;
    }
    for user in users {
        caller
            .principal
            .read_user(*user)
            .map_err(crate::serve::auth::grpc::status)?;
    }
    Ok(Some(caller.open_stream()?))
}

/// `Alerts` of a cluster process: forwards one user's calls to the owner, gathers every user's
/// `ListAlerts` as of one epoch, merges every user's subscription.
#[derive(Debug, Clone)]
pub struct ClusterAlerts {
    local: AlertsService,
    peers: Arc<Peers>,
    read_model: Arc<ReadModel>,
    subscribers: Arc<std::sync::atomic::AtomicUsize>,
}

impl ClusterAlerts {
    /// Answers for the cluster `peers` describe, from `local` for what this process owns;
    /// relayed subscriptions count in `subscribers` (shared with `ExpenseQuery`'s).
    pub fn new(
        local: AlertsService,
        peers: Arc<Peers>,
        read_model: Arc<ReadModel>,
        subscribers: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Self {
        ClusterAlerts {
            local,
            peers,
            read_model,
            subscribers,
        }
    }
}

/// The page token `ListAlerts` answers with for the alert `alert` (`user:month:threshold`).
fn alert_token(alert: &pb::Alert) -> Result<String, Status> {
    let month = convert::parse_month(&alert.month, "month")?;
    Ok(format!("{}:{month}:{}", alert.user_id, alert.threshold_pct))
}

#[tonic::async_trait]
impl Alerts for ClusterAlerts {
    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        if forwarded(&request) {
            return self.local.list_alerts(request).await;
        }
        let user = request.get_ref().user_id;
        if user != 0 {
            let owner = self.peers.owner(convert::user_id(user)?);
            if owner == self.peers.me() {
                return self.local.list_alerts(request).await;
            }
            let (metadata, _, message) = request.into_parts();
            let answer = self
                .peers
                .alerts(owner)
                .list_alerts(timed(outgoing(&metadata, message, false)))
                .await
                .map_err(|s| self.peers.status(owner, s))?;
            return Ok(Response::new(answer.into_inner()));
        }
        check(&request, |p| {
            p.read_all("ListAlerts of every user (user_id 0)")
        })?;
        let page_size = convert::limit(request.get_ref().page_size, 100, 1000, "page_size")?;
        let message = request.get_ref().clone();
        let (epoch, pages) = gather(
            &self.read_model,
            self.peers.len(),
            message.consistency.clone(),
            |page: &pb::ListAlertsResponse| page.as_of.as_ref().map_or(0, |a| a.epoch),
            |process, consistency| {
                let message = pb::ListAlertsRequest {
                    consistency: Some(consistency),
                    ..message.clone()
                };
                let request = &request;
                async move {
                    if process == self.peers.me() {
                        self.local
                            .list_alerts(local(request, message, true))
                            .await
                            .map(Response::into_inner)
                    } else {
                        self.peers
                            .alerts(process)
                            .list_alerts(timed(outgoing(request.metadata(), message, true)))
                            .await
                            .map(Response::into_inner)
                            .map_err(|s| self.peers.status(process, s))
                    }
                }
            },
        )
        .await?;
        let more = pages.iter().any(|p| !p.next_page_token.is_empty());
        let mut as_ofs = Vec::with_capacity(pages.len());
        let mut alerts = Vec::new();
        for page in pages {
            as_ofs.push(page.as_of);
            alerts.extend(page.alerts);
        }
        // As one engine orders them: by user, month (`YYYY-MM` sorts as text) and threshold.
        alerts.sort_by(|a, b| {
            (a.user_id, &a.month, a.threshold_pct).cmp(&(b.user_id, &b.month, b.threshold_pct))
        });
        let more = more || alerts.len() > page_size;
        alerts.truncate(page_size);
        let next_page_token = match (more, alerts.last()) {
            (true, Some(last)) => alert_token(last)?,
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAlertsResponse {
            alerts,
            as_of: Some(merged_as_of(epoch, as_ofs)),
            next_page_token,
        }))
    }

    type SubscribeStream = AlertStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeAlertsRequest>,
    ) -> Result<Response<AlertStream>, Status> {
        if forwarded(&request) {
            return self.local.subscribe(request).await;
        }
        let user = request.get_ref().user_id;
        let owners: Vec<usize> = if user == 0 {
            (0..self.peers.len()).collect()
        } else {
            vec![self.peers.owner(convert::user_id(user)?)]
        };
        if owners == [self.peers.me()] {
            return self.local.subscribe(request).await;
        }
        let users: Vec<UserId> = if user == 0 { Vec::new() } else { vec![user] };
        let token_stream = open_checked(
            &request,
            &users,
            "Subscribe to every user's alerts (user_id 0)",
        )?;
        let guard = SubscriberGuard::acquire(&self.subscribers).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} subscriptions are open already; retry later",
                super::MAX_SUBSCRIBERS
            ))
        })?;
        let (metadata, _, message) = request.into_parts();
        let mut streams = Vec::with_capacity(owners.len());
        for owner in owners {
            let stream = self
                .peers
                .alerts(owner)
                .subscribe(outgoing(&metadata, message.clone(), false))
                .await
                .map_err(|s| self.peers.status(owner, s))?
                .into_inner();
            let peers = Arc::clone(&self.peers);
            streams.push(
                stream
                    .map(move |r| r.map_err(|s| peers.status(owner, s)))
                    .boxed(),
            );
        }
        let held = (guard, token_stream);
        let merged: AlertStream = if streams.len() == 1 {
            let stream = streams.pop().expect("one stream");
            Box::pin(stream.inspect(move |_| {
                let _ = &held;
            }))
        } else {
            Box::pin(merge::<AlertFrames>(streams).inspect(move |_| {
                let _ = &held;
            }))
        };
        Ok(Response::new(merged))
    }
}

/// `Admin` of a cluster process: `GetStatus` lists every process; `ListRejected` answers this
/// process's own rejected records.
#[derive(Debug, Clone)]
pub struct ClusterAdmin {
    local: AdminService,
    peers: Arc<Peers>,
}

impl ClusterAdmin {
    /// Answers for the cluster `peers` describe, from `local` for this process.
    pub fn new(local: AdminService, peers: Arc<Peers>) -> Self {
        ClusterAdmin { local, peers }
    }
}

#[tonic::async_trait]
impl Admin for ClusterAdmin {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        if forwarded(&request) {
            return self.local.get_status(request).await;
        }
        let metadata = request.metadata().clone();
        let mut status = self.local.get_status(request).await?.into_inner();
        let me = self.peers.me();
        let asked = futures::future::join_all((0..self.peers.len()).map(|process| {
            let metadata = &metadata;
            async move {
                if process == me {
                    return None;
                }
                let mut client = self.peers.admin(process);
                let mut request = outgoing(metadata, pb::GetStatusRequest {}, false);
                request.set_timeout(Duration::from_secs(5));
                Some(client.get_status(request).await)
            }
        }))
        .await;
        let own = status.processes.pop().unwrap_or_default();
        let mut processes = Vec::with_capacity(self.peers.len());
        for (process, answer) in asked.into_iter().enumerate() {
            let entry = match answer {
                None => own.clone(),
                Some(Ok(answer)) => answer.into_inner().processes.pop().unwrap_or_default(),
                Some(Err(error)) => pb::ProcessStatus {
                    reachable: false,
                    error: self.peers.status(process, error).message().to_string(),
                    ..pb::ProcessStatus::default()
                },
            };
            processes.push(pb::ProcessStatus {
                process: process as u32,
                grpc_address: self.peers.addr(process).to_string(),
                ..entry
            });
        }
        status.caught_up = processes.iter().all(|p| p.reachable && p.caught_up);
        status.processes = processes;
        Ok(Response::new(status))
    }

    async fn list_rejected(
        &self,
        request: Request<pb::ListRejectedRequest>,
    ) -> Result<Response<pb::ListRejectedResponse>, Status> {
        self.local.list_rejected(request).await
    }
}

/// A subscription's message, taken apart and put together again (the cells of
/// `ExpenseQuery/Subscribe`, the alerts of `Alerts/Subscribe`).
trait Frames: Send + 'static {
    type Message: Send + 'static;
    type Item: Send + 'static;
    type Key: Ord + Send + 'static;
    fn split(message: Self::Message) -> Frame<Self::Item>;
    fn join(frame: Frame<Self::Item>) -> Self::Message;
    /// The item's key in a snapshot; `None`: the item removes the key's value.
    fn key(item: &Self::Item) -> (Self::Key, bool);
}

/// One message of a subscription.
enum Frame<I> {
    Snapshot {
        items: Vec<I>,
        last: bool,
        as_of: Option<pb::AsOf>,
    },
    Changes {
        items: Vec<I>,
        as_of: Option<pb::AsOf>,
    },
    Progress {
        as_of: Option<pb::AsOf>,
    },
    /// A message without an event (never sent by a process).
    Empty,
}

struct CellFrames;

impl Frames for CellFrames {
    type Message = pb::SubscribeResponse;
    type Item = pb::Cell;
    type Key = (u64, i32, String);

    fn split(message: pb::SubscribeResponse) -> Frame<pb::Cell> {
        use pb::subscribe_response::Event;
        match message.event {
            Some(Event::Snapshot(s)) => Frame::Snapshot {
                items: s.cells,
                last: s.last,
                as_of: s.as_of,
            },
            Some(Event::Changes(c)) => Frame::Changes {
                items: c.cells,
                as_of: c.as_of,
            },
            Some(Event::Progress(p)) => Frame::Progress { as_of: p.as_of },
            None => Frame::Empty,
        }
    }

    fn join(frame: Frame<pb::Cell>) -> pb::SubscribeResponse {
        use pb::subscribe_response::Event;
        let event = match frame {
            Frame::Snapshot { items, last, as_of } => Some(Event::Snapshot(pb::Snapshot {
                cells: items,
                last,
                as_of,
            })),
            Frame::Changes { items, as_of } => Some(Event::Changes(pb::Changes {
                cells: items,
                as_of,
            })),
            Frame::Progress { as_of } => Some(Event::Progress(pb::Progress { as_of })),
            Frame::Empty => None,
        };
        pb::SubscribeResponse { event }
    }

    fn key(cell: &pb::Cell) -> ((u64, i32, String), bool) {
        ((cell.user_id, cell.kind, cell.key.clone()), cell.removed)
    }
}

struct AlertFrames;

impl Frames for AlertFrames {
    type Message = pb::SubscribeAlertsResponse;
    type Item = pb::Alert;
    type Key = (u64, String, u32);

    fn split(message: pb::SubscribeAlertsResponse) -> Frame<pb::Alert> {
        use pb::subscribe_alerts_response::Event;
        match message.event {
            Some(Event::Snapshot(s)) => Frame::Snapshot {
                items: s.alerts,
                last: s.last,
                as_of: s.as_of,
            },
            Some(Event::Changes(c)) => Frame::Changes {
                items: c.alerts,
                as_of: c.as_of,
            },
            Some(Event::Progress(p)) => Frame::Progress { as_of: p.as_of },
            None => Frame::Empty,
        }
    }

    fn join(frame: Frame<pb::Alert>) -> pb::SubscribeAlertsResponse {
        use pb::subscribe_alerts_response::Event;
        let event = match frame {
            Frame::Snapshot { items, last, as_of } => Some(Event::Snapshot(pb::AlertSnapshot {
                alerts: items,
                last,
                as_of,
            })),
            Frame::Changes { items, as_of } => Some(Event::Changes(pb::AlertChanges {
                alerts: items,
                as_of,
            })),
            Frame::Progress { as_of } => Some(Event::Progress(pb::Progress { as_of })),
            Frame::Empty => None,
        };
        pb::SubscribeAlertsResponse { event }
    }

    fn key(alert: &pb::Alert) -> ((u64, String, u32), bool) {
        (
            (alert.user_id, alert.month.clone(), alert.threshold_pct),
            alert.state == i32::from(pb::AlertState::Cleared),
        )
    }
}

type Inner<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// One process's stream while merging.
struct Source<F: Frames> {
    /// Its snapshot so far, by key (`None` once it sent the last page, or if it resumed).
    snapshot: Option<BTreeMap<F::Key, F::Item>>,
    /// Its snapshot's epoch, once complete.
    snapshot_epoch: Option<Epoch>,
    /// Its newest progress mark (or its snapshot's epoch).
    progress: Option<Epoch>,
    /// Changes received and not yet sent, by epoch, with that epoch's `as_of`.
    pending: BTreeMap<Epoch, (Vec<F::Item>, Option<pb::AsOf>)>,
    /// Its newest `as_of`.
    as_of: Option<pb::AsOf>,
    started: bool,
    resumed: bool,
}

impl<F: Frames> Source<F> {
    fn new() -> Self {
        Source {
            snapshot: None,
            snapshot_epoch: None,
            progress: None,
            pending: BTreeMap::new(),
            as_of: None,
            started: false,
            resumed: false,
        }
    }
}

/// Merges the subscription streams of several processes (each about the users it owns) into
/// one stream like one engine's: a snapshot of every process as of one epoch (the newest of the
/// processes' snapshots; an older one is brought forward with its changes up to that epoch),
/// then per epoch the changes of all processes and one progress mark, sent once every process
/// has sent that epoch's progress. A resumed subscription (every process replays) has no
/// snapshot. A process that sends a snapshot later (it fell behind, or could not replay while
/// others did) ends the stream with `ABORTED`: subscribe again (resuming after the last
/// progress mark received replays the changes without a snapshot).
fn merge<F: Frames>(streams: Vec<Inner<F::Message>>) -> Inner<F::Message> {
    let n = streams.len();
    // Each stream ends with a `None`, so the end of one (its process is shutting down) is seen.
    let tagged = futures::stream::select_all(streams.into_iter().enumerate().map(|(i, s)| {
        s.map(Some)
            .chain(futures::stream::once(async { None }))
            .map(move |m| (i, m))
            .boxed()
    }));
    struct State<F: Frames> {
        inputs: futures::stream::SelectAll<
            Pin<Box<dyn Stream<Item = (usize, Option<Result<F::Message, Status>>)> + Send>>,
        >,
        sources: Vec<Source<F>>,
        /// Messages ready to send.
        out: std::collections::VecDeque<Result<F::Message, Status>>,
        /// The newest epoch everything has been sent of (after the snapshot).
        sent_through: Option<Epoch>,
        done: bool,
    }
    let state = State::<F> {
        inputs: tagged,
        sources: (0..n).map(|_| Source::new()).collect(),
        out: std::collections::VecDeque::new(),
        sent_through: None,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(message) = state.out.pop_front() {
                return Some((message, state));
            }
            if state.done {
                return None;
            }
            let Some((i, Some(message))) = state.inputs.next().await else {
                // A process ended its stream (it is shutting down): so does the merge.
                return None;
            };
            let message = match message {
                Ok(message) => message,
                Err(status) => {
                    state.out.push_back(Err(status));
                    state.done = true;
                    continue;
                }
            };
            let source = &mut state.sources[i];
            let first = !source.started;
            source.started = true;
            let epoch_of = |a: &Option<pb::AsOf>| a.as_ref().map_or(0, |a| a.epoch);
            match F::split(message) {
                Frame::Empty => {}
                Frame::Snapshot { items, last, as_of } => {
                    if !first && source.snapshot.is_none() {
                        let after = state
                            .sent_through
                            .map_or_else(|| "0 (a new snapshot)".to_string(), |e| e.to_string());
                        state.out.push_back(Err(Status::aborted(format!(
                            "cluster process {i} restarted its part of the subscription with a \
                             snapshot (it fell behind or no longer holds the epochs asked for); \
                             subscribe again, resuming after epoch {after}"
                        ))));
                        state.done = true;
                        continue;
                    }
                    let map = source.snapshot.get_or_insert_with(BTreeMap::new);
                    for item in items {
                        map.insert(F::key(&item).0, item);
                    }
                    if last {
                        let epoch = epoch_of(&as_of);
                        source.snapshot_epoch = Some(epoch);
                        source.progress = Some(epoch);
                        source.as_of = as_of;
                    }
                }
                Frame::Changes { items, as_of } => {
                    if first {
                        source.resumed = true;
                    }
                    let epoch = epoch_of(&as_of);
                    let entry = source.pending.entry(epoch).or_default();
                    entry.0.extend(items);
                    entry.1 = as_of.clone();
                    source.as_of = as_of;
                }
                Frame::Progress { as_of } => {
                    if first {
                        source.resumed = true;
                    }
                    let epoch = epoch_of(&as_of);
                    let entry = source.pending.entry(epoch).or_default();
                    entry.1 = as_of.clone();
                    source.progress = Some(epoch);
                    source.as_of = as_of;
                }
            }
            advance::<F>(&mut state.sources, &mut state.sent_through, &mut state.out);
            if state.out.iter().any(Result::is_err) {
                state.done = true;
            }
        }
    }))
}

/// Sends what every process has sent: first the merged snapshot (once every process's is
/// complete and brought up to the newest snapshot epoch), then each epoch every process has
/// sent the progress of.
fn advance<F: Frames>(
    sources: &mut [Source<F>],
    sent_through: &mut Option<Epoch>,
    out: &mut std::collections::VecDeque<Result<F::Message, Status>>,
) {
    if sent_through.is_none() {
        // Every process must have started (with a complete snapshot or a resumption).
        if !sources
            .iter()
            .all(|s| s.snapshot_epoch.is_some() || (s.resumed && s.snapshot.is_none()))
        {
            return;
        }
        let snapshots: Vec<Epoch> = sources.iter().filter_map(|s| s.snapshot_epoch).collect();
        if snapshots.is_empty() {
            // Every process resumed: no snapshot, changes follow.
            let from = sources
                .iter()
                .filter_map(|s| s.pending.keys().next().copied())
                .min()
                .unwrap_or(0);
            *sent_through = Some(from.saturating_sub(1));
        } else if snapshots.len() != sources.len() {
            out.push_back(Err(Status::aborted(
                "some cluster processes resumed the subscription and others sent a snapshot \
                 (they no longer hold the epochs asked for); subscribe again with \
                 resume_after_epoch 0",
            )));
            return;
        } else {
            let target = snapshots.iter().copied().max().unwrap_or(0);
            // A process behind catches up with its changes up to the target.
            if sources.iter().any(|s| s.progress.unwrap_or(0) < target) {
                return;
            }
            let mut items = Vec::new();
            let mut as_ofs = Vec::new();
            for source in sources.iter_mut() {
                let mut map = source.snapshot.take().unwrap_or_default();
                let later = source.pending.split_off(&(target + 1));
                let mut as_of = None;
                for (_, (changes, changes_as_of)) in std::mem::replace(&mut source.pending, later) {
                    for item in changes {
                        let (key, removed) = F::key(&item);
                        if removed {
                            map.remove(&key);
                        } else {
                            map.insert(key, item);
                        }
                    }
                    as_of = changes_as_of.or(as_of);
                }
                // Removed cells do not belong in a snapshot.
                items.extend(map.into_values());
                as_ofs.push(as_of.or_else(|| source.snapshot_as_of()));
            }
            let as_of = merged_as_of(target, as_ofs);
            let mut chunks: Vec<Vec<F::Item>> = Vec::new();
            let mut items = items.into_iter().peekable();
            while items.peek().is_some() {
                chunks.push(items.by_ref().take(SNAPSHOT_CHUNK).collect());
            }
            if chunks.is_empty() {
                chunks.push(Vec::new());
            }
            let last = chunks.len() - 1;
            for (i, items) in chunks.into_iter().enumerate() {
                out.push_back(Ok(F::join(Frame::Snapshot {
                    items,
                    last: i == last,
                    as_of: Some(as_of.clone()),
                })));
            }
            *sent_through = Some(target);
        }
    }
    let Some(through) = *sent_through else {
        return;
    };
    let Some(frontier) = sources.iter().map(|s| s.progress).min().flatten() else {
        return;
    };
    if frontier <= through {
        return;
    }
    let mut epochs: BTreeMap<Epoch, (Vec<F::Item>, Vec<Option<pb::AsOf>>)> = BTreeMap::new();
    for source in sources.iter_mut() {
        let later = source.pending.split_off(&(frontier + 1));
        for (epoch, (items, as_of)) in std::mem::replace(&mut source.pending, later) {
            if epoch <= through {
                continue;
            }
            let entry = epochs.entry(epoch).or_default();
            entry.0.extend(items);
            entry.1.push(as_of);
        }
    }
    for (epoch, (items, as_ofs)) in epochs {
        let as_of = merged_as_of(epoch, as_ofs);
        if !items.is_empty() {
            out.push_back(Ok(F::join(Frame::Changes {
                items,
                as_of: Some(as_of.clone()),
            })));
        }
        out.push_back(Ok(F::join(Frame::Progress { as_of: Some(as_of) })));
    }
    *sent_through = Some(frontier);
}

impl<F: Frames> Source<F> {
    fn snapshot_as_of(&self) -> Option<pb::AsOf> {
        self.as_of.clone()
    }
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
