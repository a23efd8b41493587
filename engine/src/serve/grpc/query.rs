//! `spendflow.v1.ExpenseQuery`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use spendflow_operators::{Epoch, UserId};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::expense_query_server::ExpenseQuery;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::MAX_SUBSCRIBERS;
use super::convert;
use crate::serve::read_model::{Published, ReadModel, Snapshot, SubscriptionStart};

/// Cells per snapshot message of a subscription.
const SNAPSHOT_CHUNK: usize = 1000;
/// Users one subscription may select.
const MAX_SUBSCRIBED_USERS: usize = 1000;
/// Widest day range of `GetUserWindows`.
const MAX_DAYS: i32 = 3660;
/// Widest month range of `GetUserWindows`.
const MAX_MONTHS: i32 = 1200;

/// Answers `ExpenseQuery` from the read model.
#[derive(Debug, Clone)]
pub struct QueryService {
    read_model: Arc<ReadModel>,
    subscribers: Arc<AtomicUsize>,
}

impl QueryService {
    /// A service over `read_model`.
    pub fn new(read_model: Arc<ReadModel>) -> Self {
        QueryService {
            read_model,
            subscribers: Arc::default(),
        }
    }

    /// The snapshot to answer from, after waiting for `consistency.min_epoch` if asked.
    async fn snapshot(
        &self,
        consistency: Option<&pb::Consistency>,
    ) -> Result<Arc<Snapshot>, Status> {
        let (min_epoch, wait) = convert::consistency(consistency)?;
        if min_epoch == 0 {
            return Ok(self.read_model.snapshot());
        }
        self.read_model.snapshot_at_least(min_epoch, wait).await.ok_or_else(|| {
            Status::deadline_exceeded(format!(
                "epoch {min_epoch} was not published within {} ms (latest: {:?}); retry or raise consistency.timeout_ms",
                wait.as_millis(),
                self.read_model.published_epoch()
            ))
        })
    }
}

fn not_found(user: UserId, snapshot: &Snapshot) -> Status {
    Status::not_found(format!(
        "user {user} has no live expenses as of epoch {}",
        snapshot.as_of().epoch
    ))
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExpenseQuery for QueryService {
    async fn get_user_summary(
        &self,
        request: Request<pb::GetUserSummaryRequest>,
    ) -> Result<Response<pb::GetUserSummaryResponse>, Status> {
        let request = request.into_inner();
        let user = convert::user_id(request.user_id)?;
        let snapshot = self.snapshot(request.consistency.as_ref()).await?;
        let aggregates = snapshot
            .user(user)
            .ok_or_else(|| not_found(user, &snapshot))?;
        Ok(Response::new(pb::GetUserSummaryResponse {
            summary: Some(convert::summary(aggregates)),
            as_of: Some(convert::as_of(snapshot.as_of())),
        }))
    }

    async fn list_user_summaries(
        &self,
        request: Request<pb::ListUserSummariesRequest>,
    ) -> Result<Response<pb::ListUserSummariesResponse>, Status> {
        let request = request.into_inner();
        let page_size = convert::limit(request.page_size, 100, 1000, "page_size")?;
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<UserId>().map_err(|_| {
                Status::invalid_argument(format!(
                    "page_token must be a next_page_token from a previous answer, got {token:?}"
                ))
            })?),
        };
        let snapshot = self.snapshot(request.consistency.as_ref()).await?;
        let mut users = snapshot.users_after(after);
        let summaries: Vec<pb::UserSummary> = users
            .by_ref()
            .take(page_size)
            .map(|u| convert::summary(u))
            .collect();
        let next_page_token = match (users.next(), summaries.last()) {
            (Some(_), Some(last)) => last.user_id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListUserSummariesResponse {
            summaries,
            next_page_token,
            as_of: Some(convert::as_of(snapshot.as_of())),
        }))
    }

    async fn get_user_windows(
        &self,
        request: Request<pb::GetUserWindowsRequest>,
    ) -> Result<Response<pb::GetUserWindowsResponse>, Status> {
        let request = request.into_inner();
        let user = convert::user_id(request.user_id)?;
        let granularity = pb::Granularity::try_from(request.granularity).unwrap_or_default();
        let (parse, max, unit): (fn(&str, &str) -> Result<i32, Status>, i32, &str) =
            match granularity {
                pb::Granularity::Day => (convert::parse_day, MAX_DAYS, "days"),
                pb::Granularity::Month => (convert::parse_month, MAX_MONTHS, "months"),
                pb::Granularity::Unspecified => {
                    return Err(Status::invalid_argument(
                        "granularity must be GRANULARITY_DAY or GRANULARITY_MONTH",
                    ));
                }
            };
        let (from, to) = (parse(&request.from, "from")?, parse(&request.to, "to")?);
        if from > to {
            return Err(Status::invalid_argument(format!(
                "from ({}) must not be after to ({})",
                request.from, request.to
            )));
        }
        if to - from >= max {
            return Err(Status::invalid_argument(format!(
                "the range may span at most {max} {unit}, got {}",
                to - from + 1
            )));
        }
        let snapshot = self.snapshot(request.consistency.as_ref()).await?;
        let aggregates = snapshot
            .user(user)
            .ok_or_else(|| not_found(user, &snapshot))?;
        let (buckets, format): (_, fn(i32) -> String) = match granularity {
            pb::Granularity::Day => (&aggregates.days, crate::serve::read_model::format_day),
            _ => (&aggregates.months, crate::serve::read_model::format_month),
        };
        let windows = buckets
            .range(from..=to)
            .map(|(bucket, (count, sum))| pb::Total {
                key: format(*bucket),
                total_minor: *sum,
                expense_count: *count,
            })
            .collect();
        Ok(Response::new(pb::GetUserWindowsResponse {
            user_id: user,
            granularity: granularity.into(),
            windows,
            as_of: Some(convert::as_of(snapshot.as_of())),
        }))
    }

    async fn top_spenders(
        &self,
        request: Request<pb::TopSpendersRequest>,
    ) -> Result<Response<pb::TopSpendersResponse>, Status> {
        let request = request.into_inner();
        let limit = convert::limit(request.limit, 10, 1000, "limit")?;
        let snapshot = self.snapshot(request.consistency.as_ref()).await?;
        let spenders = snapshot
            .top_spenders()
            .take(limit)
            .enumerate()
            .map(|(i, u)| pb::Spender {
                rank: i as u32 + 1,
                user_id: u.user_id,
                total_minor: u.total_minor,
                expense_count: u.expense_count,
            })
            .collect();
        Ok(Response::new(pb::TopSpendersResponse {
            spenders,
            as_of: Some(convert::as_of(snapshot.as_of())),
        }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        if request.user_ids.len() > MAX_SUBSCRIBED_USERS {
            return Err(Status::invalid_argument(format!(
                "user_ids may name at most {MAX_SUBSCRIBED_USERS} users, got {}",
                request.user_ids.len()
            )));
        }
        let mut users = request
            .user_ids
            .iter()
            .map(|u| convert::user_id(*u))
            .collect::<Result<Vec<_>, _>>()?;
        users.sort_unstable();
        users.dedup();
        let guard = SubscriberGuard::acquire(&self.subscribers).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{MAX_SUBSCRIBERS} subscriptions are open already; retry later"
            ))
        })?;
        let resume = (request.resume_after_epoch > 0).then_some(request.resume_after_epoch);
        let (start, changes) = self.read_model.subscribe(resume);
        let (tx, rx) = mpsc::channel(16);
        let read_model = Arc::clone(&self.read_model);
        tokio::spawn(async move {
            let _guard = guard;
            let feed = Feed {
                tx,
                users,
                resume_after: resume.unwrap_or(0),
            };
            if let Err(Closed) = feed.run(start, changes, &read_model).await {
                tracing::debug!("Subscriber went away.");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Counts open subscriptions; released on drop.
#[derive(Debug)]
struct SubscriberGuard(Arc<AtomicUsize>);

impl SubscriberGuard {
    fn acquire(count: &Arc<AtomicUsize>) -> Option<Self> {
        let previous = count.fetch_add(1, Ordering::AcqRel);
        if previous >= MAX_SUBSCRIBERS {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SubscriberGuard(Arc::clone(count)))
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client hung up.
struct Closed;

/// One subscription's sender.
struct Feed {
    tx: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
    users: Vec<UserId>,
    /// The epoch the client resumes after (0 for a fresh subscription).
    resume_after: Epoch,
}

impl Feed {
    async fn send(&self, event: pb::subscribe_response::Event) -> Result<(), Closed> {
        self.tx
            .send(Ok(pb::SubscribeResponse { event: Some(event) }))
            .await
            .map_err(|_| Closed)
    }

    async fn snapshot(&self, snapshot: &Snapshot) -> Result<Epoch, Closed> {
        let as_of = convert::as_of(snapshot.as_of());
        let cells: Vec<pb::Cell> = snapshot
            .cells(&self.users)
            .map(|c| convert::cell(&c))
            .collect();
        let mut chunks = cells.chunks(SNAPSHOT_CHUNK).peekable();
        if chunks.peek().is_none() {
            let last = pb::Snapshot {
                cells: Vec::new(),
                last: true,
                as_of: Some(as_of.clone()),
            };
            self.send(pb::subscribe_response::Event::Snapshot(last))
                .await?;
        }
        while let Some(chunk) = chunks.next() {
            let message = pb::Snapshot {
                cells: chunk.to_vec(),
                last: chunks.peek().is_none(),
                as_of: Some(as_of.clone()),
            };
            self.send(pb::subscribe_response::Event::Snapshot(message))
                .await?;
        }
        Ok(snapshot.as_of().epoch)
    }

    async fn published(&self, published: &Published) -> Result<(), Closed> {
        let as_of = convert::as_of(&published.as_of);
        let cells: Vec<pb::Cell> = published
            .cells
            .iter()
            .filter(|c| self.users.is_empty() || self.users.binary_search(&c.key.user_id()).is_ok())
            .map(convert::cell)
            .collect();
        if !cells.is_empty() {
            let changes = pb::Changes {
                cells,
                as_of: Some(as_of.clone()),
            };
            self.send(pb::subscribe_response::Event::Changes(changes))
                .await?;
        }
        self.send(pb::subscribe_response::Event::Progress(pb::Progress {
            as_of: Some(as_of),
        }))
        .await
    }

    async fn run(
        &self,
        start: SubscriptionStart,
        mut changes: broadcast::Receiver<Arc<Published>>,
        read_model: &ReadModel,
    ) -> Result<(), Closed> {
        let mut sent_through = match start {
            SubscriptionStart::Snapshot(snapshot) => self.snapshot(&snapshot).await?,
            SubscriptionStart::Replay(replay) => {
                // Nothing at or before the epoch the client already has, even if the replay is
                // empty.
                let mut through = self.resume_after;
                for published in &replay {
                    self.published(published).await?;
                    through = published.as_of.epoch;
                }
                through
            }
        };
        loop {
            tokio::select! {
                received = changes.recv() => match received {
                    Ok(published) if published.as_of.epoch <= sent_through => {}
                    Ok(published) => {
                        self.published(&published).await?;
                        sent_through = published.as_of.epoch;
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Too slow to follow every epoch: start over from a fresh snapshot,
                        // which replaces everything the client holds.
                        tracing::debug!(missed, "Subscriber lagged; sending a new snapshot.");
                        changes = changes.resubscribe();
                        sent_through = self.snapshot(&read_model.snapshot()).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                () = self.tx.closed() => return Err(Closed),
                () = read_model.closed() => return Ok(()),
            }
        }
    }
}
