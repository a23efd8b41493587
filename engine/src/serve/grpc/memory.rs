//! The engine's own backend: answers from read-model snapshots.
//!
//! Every answer comes from one immutable snapshot, so it is exactly its `as_of`: all of one
//! closed epoch. Reads never wait on the dataflow, except where a request asks for
//! read-your-writes, which waits, bounded, for the publisher.

use std::sync::Arc;

use spendflow_operators::{Epoch, UserId};
use spendflow_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::backend::{
    Answer, Buckets, CategoryData, CategorySums, OverviewData, QueryBackend, SpenderData,
    SubscribeSpec, SubscribeStream, SummaryData, SummaryPage, Wait,
};
use super::convert;
use crate::serve::read_model::{
    Amount, Published, ReadModel, Snapshot, SubscriptionStart, UserAggregates,
};

/// Cells per snapshot message of a subscription.
const SNAPSHOT_CHUNK: usize = 1000;

/// Answers from the engine's read model.
#[derive(Debug, Clone)]
pub struct ReadModelBackend {
    read_model: Arc<ReadModel>,
}

impl ReadModelBackend {
    /// A backend over `read_model`.
    pub fn new(read_model: Arc<ReadModel>) -> Self {
        ReadModelBackend { read_model }
    }

    /// The snapshot to answer from, after waiting for `wait.min_epoch` if asked.
    async fn snapshot(&self, wait: Wait) -> Result<Arc<Snapshot>, Status> {
        if wait.min_epoch == 0 {
            return Ok(self.read_model.snapshot());
        }
        self.read_model
            .snapshot_at_least(wait.min_epoch, wait.timeout)
            .await
            .ok_or_else(|| {
                convert::epoch_not_reached(wait, self.read_model.published_epoch(), "published")
            })
    }
}

fn answer<T>(snapshot: &Snapshot, value: T) -> Answer<T> {
    Answer {
        as_of: snapshot.as_of().clone(),
        value,
    }
}

/// A read-model user as backend-neutral summary data (sums exact, 128-bit).
pub fn summary_data(user: &UserAggregates) -> SummaryData {
    let names = |map: &imbl::OrdMap<spendflow_operators::Name, Amount>| {
        map.iter()
            .map(|(k, v)| (k.text().to_string(), *v))
            .collect::<Vec<_>>()
    };
    SummaryData {
        user_id: user.user_id,
        total_minor: user.total_minor,
        expense_count: user.expense_count,
        last_event_ms: user.last_event_ms,
        by_category: names(&user.categories),
        by_merchant: names(&user.merchants),
    }
}

fn spender(user: &UserAggregates) -> SpenderData {
    SpenderData {
        user_id: user.user_id,
        total_minor: user.total_minor,
        expense_count: user.expense_count,
    }
}

/// Totals by category over every user of `snapshot`. Costs time proportional to users ×
/// categories.
pub fn category_totals(snapshot: &Snapshot) -> Vec<CategoryData> {
    let mut sums = CategorySums::default();
    for user in snapshot.users_after(None) {
        for (name, amount) in &user.categories {
            sums.add(&name.text(), *amount);
        }
    }
    sums.finish()
}

#[tonic::async_trait]
impl QueryBackend for ReadModelBackend {
    async fn user_summary(
        &self,
        wait: Wait,
        user: UserId,
    ) -> Result<Answer<Option<SummaryData>>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let summary = snapshot.user(user).map(|u| summary_data(u));
        Ok(answer(&snapshot, summary))
    }

    async fn user_summaries(
        &self,
        wait: Wait,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Answer<SummaryPage>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let mut users = snapshot.users_after(after);
        let summaries: Vec<SummaryData> = users
            .by_ref()
            .take(limit)
            .map(|u| summary_data(u))
            .collect();
        let resume_after = match (users.next(), summaries.last()) {
            (Some(_), Some(last)) => Some(last.user_id),
            _ => None,
        };
        Ok(answer(
            &snapshot,
            SummaryPage {
                summaries,
                resume_after,
            },
        ))
    }

    async fn user_windows(
        &self,
        wait: Wait,
        user: UserId,
        buckets: Buckets,
        from: i32,
        to: i32,
    ) -> Result<Answer<Option<Vec<(i32, Amount)>>>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let windows = snapshot.user(user).map(|aggregates| {
            let map = match buckets {
                Buckets::Day => &aggregates.days,
                Buckets::Month => &aggregates.months,
            };
            map.range(from..=to).map(|(b, v)| (*b, *v)).collect()
        });
        Ok(answer(&snapshot, windows))
    }

    async fn top_spenders(
        &self,
        wait: Wait,
        limit: usize,
    ) -> Result<Answer<Vec<SpenderData>>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let spenders = snapshot
            .top_spenders()
            .take(limit)
            .map(|u| spender(u))
            .collect();
        Ok(answer(&snapshot, spenders))
    }

    async fn overview(&self, wait: Wait, limit: usize) -> Result<Answer<OverviewData>, Status> {
        let snapshot = self.snapshot(wait).await?;
        let overview = OverviewData {
            users: snapshot.user_count() as u64,
            live_expenses: snapshot.live_expenses(),
            top: snapshot
                .top_spenders()
                .take(limit)
                .map(|u| spender(u))
                .collect(),
        };
        Ok(answer(&snapshot, overview))
    }

    async fn category_totals(&self, wait: Wait) -> Result<Answer<Vec<CategoryData>>, Status> {
        let snapshot = self.snapshot(wait).await?;
        // A pass over every user: off the async workers.
        let owned = Arc::clone(&snapshot);
        let totals = tokio::task::spawn_blocking(move || category_totals(&owned))
            .await
            .map_err(|e| Status::internal(format!("summing the categories failed: {e}")))?;
        Ok(answer(&snapshot, totals))
    }

    fn timeline(&self) -> (Arc<str>, Option<Epoch>) {
        (
            Arc::clone(self.read_model.incarnation()),
            self.read_model.published_epoch(),
        )
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<SubscribeStream, Status> {
        let SubscribeSpec {
            users,
            resume_after,
            incarnation,
            guard,
        } = spec;
        let ours = self.read_model.incarnation();
        let resume_after = if !incarnation.is_empty() && incarnation != **ours {
            // Another timeline's epoch: nothing to resume from; a fresh snapshot replaces
            // everything the client holds.
            tracing::debug!(theirs = %incarnation, ours = %ours, "Resume from another incarnation; sending a snapshot.");
            None
        } else {
            resume_after
        };
        if let Some(after) = resume_after {
            // Epochs only grow: an epoch beyond the newest now cannot be the client's, and
            // waiting for it would send nothing for as long as it takes.
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
        let (start, changes) = self.read_model.subscribe(resume_after);
        let (tx, rx) = mpsc::channel(16);
        let read_model = Arc::clone(&self.read_model);
        tokio::spawn(async move {
            let _guard = guard;
            let feed = Feed {
                tx,
                users,
                resume_after: resume_after.unwrap_or(0),
            };
            if let Err(Closed) = feed.run(start, changes, &read_model).await {
                tracing::debug!("Subscriber went away.");
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
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

    /// Ends the stream with `status` (a value the wire cannot carry).
    async fn fail(&self, status: Status) -> Closed {
        let _ = self.tx.send(Err(status)).await;
        Closed
    }

    async fn snapshot(&self, snapshot: &Snapshot) -> Result<Epoch, Closed> {
        let as_of = convert::as_of(snapshot.as_of());
        let cells: Vec<pb::Cell> = match snapshot
            .cells(&self.users)
            .map(|c| convert::cell(&c))
            .collect()
        {
            Ok(cells) => cells,
            Err(status) => return Err(self.fail(status).await),
        };
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
        let cells: Vec<pb::Cell> = match published
            .cells
            .iter()
            .filter(|c| self.users.is_empty() || self.users.binary_search(&c.key.user_id()).is_ok())
            .map(convert::cell)
            .collect()
        {
            Ok(cells) => cells,
            Err(status) => return Err(self.fail(status).await),
        };
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spendflow_operators::{AggKey, CellChange};

    use super::*;
    use crate::serve::read_model::EpochDelta;

    #[test]
    fn a_total_outside_int64_is_out_of_range_naming_user_and_cell() {
        use spendflow_proto::v1::expense_query_server::ExpenseQuery;

        use super::super::QueryService;

        let (model, mut writer) = ReadModel::new();
        let cells = (0..2)
            .map(|_| CellChange {
                key: AggKey::User(7),
                count: 1,
                sum: i64::MAX,
            })
            .chain([CellChange {
                key: AggKey::User(8),
                count: 1,
                sum: 5,
            }])
            .collect();
        writer.apply(EpochDelta {
            cells,
            ..EpochDelta::default()
        });
        let backend = ReadModelBackend::new(Arc::clone(&model));
        let now = Wait {
            min_epoch: 0,
            timeout: Duration::ZERO,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // The backend reads the exact sum (the web report shows it) ...
        let exact = i128::from(i64::MAX) * 2;
        let answer = runtime.block_on(backend.user_summary(now, 7)).unwrap();
        assert_eq!(answer.value.unwrap().total_minor, exact);
        // ... gRPC's int64 cannot carry it: OUT_OF_RANGE, never a truncated value.
        let service = QueryService::over_read_model(model);
        let status = runtime
            .block_on(
                service.get_user_summary(tonic::Request::new(pb::GetUserSummaryRequest {
                    user_id: 7,
                    consistency: None,
                })),
            )
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        let exact = exact.to_string();
        for part in ["user 7", "user total", exact.as_str()] {
            assert!(status.message().contains(part), "{part}: {status:?}");
        }
        let status = runtime
            .block_on(
                service.top_spenders(tonic::Request::new(pb::TopSpendersRequest {
                    limit: 10,
                    consistency: None,
                })),
            )
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        // Other users are answered as usual.
        let answer = runtime
            .block_on(
                service.get_user_summary(tonic::Request::new(pb::GetUserSummaryRequest {
                    user_id: 8,
                    consistency: None,
                })),
            )
            .unwrap()
            .into_inner();
        assert_eq!(answer.summary.unwrap().total_minor, 5);
    }
}
