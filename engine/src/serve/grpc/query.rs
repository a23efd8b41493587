//! `spendflow.v1.ExpenseQuery`: request checks, paging rules, error statuses and answers,
//! written once over any [`QueryBackend`] (the engine's read model, Cassandra's tables).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use spendflow_operators::UserId;
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::expense_query_server::ExpenseQuery;
use tonic::{Request, Response, Status};

use super::MAX_SUBSCRIBERS;
use super::backend::{Buckets, QueryBackend, SubscribeSpec, SubscribeStream, Wait};
use super::convert;
use super::memory::ReadModelBackend;
use crate::serve::auth::grpc::{caller, check};
use crate::serve::read_model::{AsOf, ReadModel, format_day, format_month};

/// Users one subscription may select.
pub(super) const MAX_SUBSCRIBED_USERS: usize = 1000;
/// Widest day range of `GetUserWindows`.
const MAX_DAYS: i32 = 3660;
/// Widest month range of `GetUserWindows`.
const MAX_MONTHS: i32 = 1200;

/// Answers `ExpenseQuery` from a backend (by default the engine's read model).
#[derive(Debug, Clone)]
pub struct QueryService<B = ReadModelBackend> {
    backend: Arc<B>,
    subscribers: Arc<AtomicUsize>,
}

impl QueryService<ReadModelBackend> {
    /// A service over the engine's read model.
    pub fn over_read_model(read_model: Arc<ReadModel>) -> Self {
        QueryService::new(ReadModelBackend::new(read_model))
    }
}

impl<B: QueryBackend> QueryService<B> {
    /// A service over `backend`.
    pub fn new(backend: B) -> Self {
        QueryService {
            backend: Arc::new(backend),
            subscribers: Arc::default(),
        }
    }
}

impl<B: QueryBackend> QueryService<B> {
    /// The count of open subscriptions, for other streaming services to share
    /// ([`super::MAX_SUBSCRIBERS`] bounds them all together).
    pub fn subscriber_count(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.subscribers)
    }

    /// `pinned`: a cluster peer gathering an answer asks for the state of exactly
    /// `consistency.min_epoch` ([`Wait::pinned`]).
    fn wait(&self, consistency: Option<&pb::Consistency>, pinned: bool) -> Result<Wait, Status> {
        let (incarnation, latest) = self.backend.timeline();
        let (min_epoch, timeout) = convert::consistency(consistency, &incarnation, latest)?;
        Ok(Wait {
            min_epoch,
            timeout,
            pinned,
        })
    }
}

fn not_found(user: UserId, as_of: &AsOf) -> Status {
    Status::not_found(format!(
        "user {user} has no live expenses as of epoch {}",
        as_of.epoch
    ))
}

#[tonic::async_trait]
impl<B: QueryBackend> ExpenseQuery for QueryService<B> {
    async fn get_user_summary(
        &self,
        request: Request<pb::GetUserSummaryRequest>,
    ) -> Result<Response<pb::GetUserSummaryResponse>, Status> {
        let user = convert::user_id(request.get_ref().user_id)?;
        check(&request, |p| p.read_user(user))?;
        let request = request.into_inner();
        let wait = self.wait(request.consistency.as_ref(), false)?;
        let answer = self.backend.user_summary(wait, user).await?;
        let summary = answer.value.ok_or_else(|| not_found(user, &answer.as_of))?;
        Ok(Response::new(pb::GetUserSummaryResponse {
            summary: Some(convert::summary(summary)?),
            as_of: Some(convert::as_of(&answer.as_of)),
        }))
    }

    async fn list_user_summaries(
        &self,
        request: Request<pb::ListUserSummariesRequest>,
    ) -> Result<Response<pb::ListUserSummariesResponse>, Status> {
        check(&request, |p| p.read_all("ListUserSummaries"))?;
        let pinned = super::cluster::pinned(&request);
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
        let wait = self.wait(request.consistency.as_ref(), pinned)?;
        let answer = self.backend.user_summaries(wait, after, page_size).await?;
        let page = answer.value;
        Ok(Response::new(pb::ListUserSummariesResponse {
            summaries: page
                .summaries
                .into_iter()
                .map(convert::summary)
                .collect::<Result<_, _>>()?,
            next_page_token: page.resume_after.map(|u| u.to_string()).unwrap_or_default(),
            as_of: Some(convert::as_of(&answer.as_of)),
        }))
    }

    async fn get_user_windows(
        &self,
        request: Request<pb::GetUserWindowsRequest>,
    ) -> Result<Response<pb::GetUserWindowsResponse>, Status> {
        let user = convert::user_id(request.get_ref().user_id)?;
        check(&request, |p| p.read_user(user))?;
        let request = request.into_inner();
        let granularity = pb::Granularity::try_from(request.granularity).unwrap_or_default();
        #[allow(clippy::type_complexity)]
        let (buckets, parse, format, max, unit): (
            Buckets,
            fn(&str, &str) -> Result<i32, Status>,
            fn(i32) -> String,
            i32,
            &str,
        ) = match granularity {
            pb::Granularity::Day => (
                Buckets::Day,
                convert::parse_day,
                format_day,
                MAX_DAYS,
                "days",
            ),
            pb::Granularity::Month => (
                Buckets::Month,
                convert::parse_month,
                format_month,
                MAX_MONTHS,
                "months",
            ),
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
        let wait = self.wait(request.consistency.as_ref(), false)?;
        let answer = self
            .backend
            .user_windows(wait, user, buckets, from, to)
            .await?;
        let windows = answer
            .value
            .ok_or_else(|| not_found(user, &answer.as_of))?
            .into_iter()
            .map(|(bucket, (count, sum))| {
                let key = format(bucket);
                Ok(pb::Total {
                    total_minor: i64::try_from(sum)
                        .or_else(|_| convert::fit(sum, user, &format!("bucket {key}")))?,
                    key,
                    expense_count: count,
                })
            })
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(pb::GetUserWindowsResponse {
            user_id: user,
            granularity: granularity.into(),
            windows,
            as_of: Some(convert::as_of(&answer.as_of)),
        }))
    }

    async fn top_spenders(
        &self,
        request: Request<pb::TopSpendersRequest>,
    ) -> Result<Response<pb::TopSpendersResponse>, Status> {
        check(&request, |p| p.read_all("TopSpenders"))?;
        let pinned = super::cluster::pinned(&request);
        let request = request.into_inner();
        let limit = convert::limit(request.limit, 10, 1000, "limit")?;
        let wait = self.wait(request.consistency.as_ref(), pinned)?;
        let reporting_currency = self.backend.reporting_currency();
        let answer = self.backend.top_spenders(wait, limit).await?;
        let spenders = answer
            .value
            .into_iter()
            .take(limit)
            .enumerate()
            .map(|(i, u)| {
                Ok(pb::Spender {
                    rank: i as u32 + 1,
                    user_id: u.user_id,
                    total_minor: convert::fit(u.total_minor, u.user_id, "user total")?,
                    expense_count: u.expense_count,
                    currency: u.currency.map(convert::currency).unwrap_or_default(),
                    converted_minor: match u.converted_minor {
                        Some(converted) => convert::fit(converted, u.user_id, "converted total")?,
                        None => 0,
                    },
                })
            })
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(pb::TopSpendersResponse {
            spenders,
            as_of: Some(convert::as_of(&answer.as_of)),
            reporting_currency: reporting_currency
                .map(convert::currency)
                .unwrap_or_default(),
        }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller(&request);
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
        // With auth: every user subscribed to must be readable, all users need
        // `expenses:read`, and one token holds a bounded number of streams.
        let token_stream = match &caller {
            None => None,
            Some(caller) => {
                if users.is_empty() {
                    caller
                        .principal
                        .read_all("Subscribe to every user (no user_ids)")
                        .map_err(crate::serve::auth::grpc::status)?;
                }
                for user in &users {
                    caller
                        .principal
                        .read_user(*user)
                        .map_err(crate::serve::auth::grpc::status)?;
                }
                Some(caller.open_stream()?)
            }
        };
        let guard = SubscriberGuard::acquire(&self.subscribers).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{MAX_SUBSCRIBERS} subscriptions are open already; retry later"
            ))
        })?;
        let resume_after = (request.resume_after_epoch > 0).then_some(request.resume_after_epoch);
        let stream = self
            .backend
            .subscribe(SubscribeSpec {
                users,
                resume_after,
                incarnation: request.incarnation,
                guard,
            })
            .await?;
        let stream: SubscribeStream = match token_stream {
            None => stream,
            // The token's stream count is released when the stream is dropped.
            Some(held) => Box::pin(futures::StreamExt::inspect(stream, move |_| {
                let _ = &held;
            })),
        };
        Ok(Response::new(stream))
    }
}

/// Counts open subscriptions; released on drop.
#[derive(Debug)]
pub struct SubscriberGuard(Arc<AtomicUsize>);

impl SubscriberGuard {
    pub(crate) fn acquire(count: &Arc<AtomicUsize>) -> Option<Self> {
        let previous = count.fetch_add(1, Ordering::AcqRel);
        if previous >= MAX_SUBSCRIBERS {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        crate::metrics::grpc_subscribers(1.0);
        Some(SubscriberGuard(Arc::clone(count)))
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        crate::metrics::grpc_subscribers(-1.0);
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
