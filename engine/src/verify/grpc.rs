//! The served side over gRPC: `ExpenseQuery/ListUserSummaries` pages (total, count, per
//! category), `ExpenseQuery/GetUserWindows` (months, several users at a time) and
//! `Admin/GetStatus` (to wait for `caught_up`).
//!
//! Every request after the first asks for at least the epoch of the first answer
//! (`consistency.min_epoch`), so pages never go back in time; the epochs seen are reported as a
//! note when they differ.

use std::time::{Duration, Instant};

use futures::StreamExt;
use spendflow_operators::model::split_month;
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::alerts_client::AlertsClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use tonic::transport::{Channel, Endpoint};

use super::reference::{RankedSpender, ReferenceServed};
use super::{MonthRange, Served, ServedPage, UserAggregates, VerifyError};

/// Spenders asked of `TopSpenders` (the service's limit).
const TOP_SPENDERS: u32 = 1000;

/// Widest month range of one `GetUserWindows` request (the service's limit).
const MAX_MONTHS_PER_REQUEST: i32 = 1200;
/// The first and last month a request can name (four-digit years).
const FIRST_MONTH: i32 = 1000 * 12;
const LAST_MONTH: i32 = 9999 * 12 + 11;
/// `GetUserWindows` requests in flight at once.
const CONCURRENCY: usize = 16;
/// Largest answer accepted (a page of summaries with many merchants each).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

fn grpc_error(call: &str) -> impl FnOnce(tonic::Status) -> VerifyError + '_ {
    move |status| VerifyError::Grpc {
        call: call.to_string(),
        retriable: matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
        ),
        message: format!("{}: {}", status.code(), status.message()),
    }
}

/// `2026-11` for a month bucket.
pub fn format_month(month: i32) -> String {
    let (y, m) = split_month(month);
    format!("{y:04}-{m:02}")
}

/// The month bucket of `2026-11`, `None` if it is not `YYYY-MM`.
pub fn parse_month(key: &str) -> Option<i32> {
    let (y, m) = key.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let (y, m): (i32, i32) = (y.parse().ok()?, m.parse().ok()?);
    (1..=12).contains(&m).then_some(y * 12 + m - 1)
}

/// The month ranges (each at most the service's limit) covering `range` widened to include
/// `newest`, clamped to four-digit years.
pub fn month_requests(range: Option<MonthRange>, newest: Option<i32>) -> Vec<(i32, i32)> {
    let (first, last) = match (range, newest) {
        (Some(r), Some(n)) => (r.first.min(n), r.last.max(n)),
        (Some(r), None) => (r.first, r.last),
        (None, Some(n)) => (n, n),
        (None, None) => return Vec::new(),
    };
    let (first, last) = (first.max(FIRST_MONTH), last.min(LAST_MONTH));
    let mut out = Vec::new();
    let mut from = first;
    while from <= last {
        let to = (from + MAX_MONTHS_PER_REQUEST - 1).min(last);
        out.push((from, to));
        from = to + 1;
    }
    out
}

/// The engine's gRPC service.
pub struct GrpcServed {
    runtime: tokio::runtime::Runtime,
    query: ExpenseQueryClient<Channel>,
    admin: AdminClient<Channel>,
    alerts: AlertsClient<Channel>,
    addr: String,
    token: String,
    first_epoch: Option<u64>,
    last_epoch: Option<u64>,
    /// Budget and currency of every user paged so far.
    budgets: std::collections::BTreeMap<u64, (i64, String)>,
}

impl std::fmt::Debug for GrpcServed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServed")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl GrpcServed {
    /// Connects to `addr` (`host:port` or `http://host:port`).
    ///
    /// # Errors
    ///
    /// [`VerifyError::Config`] for a bad address, [`VerifyError::Grpc`] if nothing answers.
    pub fn connect(addr: &str) -> Result<Self, VerifyError> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| VerifyError::Config(format!("could not start a runtime: {e}")))?;
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| VerifyError::Config(format!("--grpc {addr:?} is not an address: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        let channel = runtime
            .block_on(endpoint.connect())
            .map_err(|e| VerifyError::Grpc {
                call: format!("connect to {uri}"),
                message: format!("{e} (is `spendflow run` serving there?)"),
                retriable: true,
            })?;
        Ok(GrpcServed {
            runtime,
            query: ExpenseQueryClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            admin: AdminClient::new(channel.clone()),
            alerts: AlertsClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
            addr: uri,
            token: String::new(),
            first_epoch: None,
            last_epoch: None,
            budgets: Default::default(),
        })
    }

    fn consistency(&self) -> Option<pb::Consistency> {
        self.first_epoch.map(|epoch| pb::Consistency {
            incarnation: String::new(),
            min_epoch: epoch,
            timeout_ms: 30_000,
        })
    }

    fn saw(&mut self, as_of: Option<&pb::AsOf>) {
        if let Some(as_of) = as_of {
            self.first_epoch.get_or_insert(as_of.epoch);
            self.last_epoch = Some(self.last_epoch.unwrap_or(0).max(as_of.epoch));
        }
    }

    /// The status, for waiting and for messages.
    fn status(&mut self) -> Result<pb::GetStatusResponse, VerifyError> {
        let mut admin = self.admin.clone();
        self.runtime
            .block_on(admin.get_status(pb::GetStatusRequest {}))
            .map(tonic::Response::into_inner)
            .map_err(grpc_error("Admin/GetStatus"))
    }
}

impl Served for GrpcServed {
    fn name(&self) -> &str {
        "grpc"
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), VerifyError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            // `caught_up`: everything the engine's input held when it last looked is served.
            if status.caught_up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let lag: i64 = status.partitions.iter().map(|p| p.lag.max(0)).sum();
                return Err(VerifyError::NotReady {
                    waited: timeout,
                    detail: format!(
                        "{} records read, epoch {}, lag {lag} over {} partitions",
                        status.records_read,
                        status.as_of.map_or(0, |a| a.epoch),
                        status.partitions.len()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn next_page(
        &mut self,
        page_size: usize,
        months: Option<MonthRange>,
    ) -> Result<ServedPage, VerifyError> {
        let request = pb::ListUserSummariesRequest {
            page_size: page_size.min(1000) as u32,
            page_token: self.token.clone(),
            consistency: self.consistency(),
        };
        let mut query = self.query.clone();
        let page = self
            .runtime
            .block_on(query.list_user_summaries(request))
            .map_err(grpc_error("ExpenseQuery/ListUserSummaries"))?
            .into_inner();
        self.saw(page.as_of.as_ref());
        let consistency = self.consistency();
        for s in &page.summaries {
            self.budgets
                .insert(s.user_id, (s.monthly_budget_minor, s.currency.clone()));
        }

        let mut users: Vec<UserAggregates> = page
            .summaries
            .iter()
            .map(|s| UserAggregates {
                user_id: s.user_id,
                count: s.expense_count,
                total_minor: s.total_minor,
                by_category: s
                    .by_category
                    .iter()
                    .map(|t| (t.key.clone(), (t.expense_count, t.total_minor)))
                    .collect(),
                by_month: Default::default(),
            })
            .collect();

        // Months: every (user, range) request, CONCURRENCY at a time.
        let mut requests = Vec::new();
        for (i, s) in page.summaries.iter().enumerate() {
            let newest = (s.expense_count > 0).then(|| {
                spendflow_operators::model::month_of_day(spendflow_operators::model::day_of(
                    s.last_event_ms,
                ))
            });
            for (from, to) in month_requests(months, newest) {
                requests.push((
                    i,
                    pb::GetUserWindowsRequest {
                        user_id: s.user_id,
                        granularity: pb::Granularity::Month.into(),
                        from: format_month(from),
                        to: format_month(to),
                        consistency: consistency.clone(),
                    },
                ));
            }
        }
        let client = self.query.clone();
        let answers: Vec<(usize, Result<pb::GetUserWindowsResponse, tonic::Status>)> =
            self.runtime.block_on(
                futures::stream::iter(requests.into_iter().map(|(i, request)| {
                    let mut client = client.clone();
                    async move {
                        let answer = client
                            .get_user_windows(request)
                            .await
                            .map(tonic::Response::into_inner);
                        (i, answer)
                    }
                }))
                .buffer_unordered(CONCURRENCY)
                .collect(),
            );
        for (i, answer) in answers {
            let windows = match answer {
                Ok(windows) => windows,
                // The user went away between the two calls: no months.
                Err(status) if status.code() == tonic::Code::NotFound => continue,
                Err(status) => return Err(grpc_error("ExpenseQuery/GetUserWindows")(status)),
            };
            self.saw(windows.as_of.as_ref());
            let user = &mut users[i];
            for w in windows.windows {
                let month = parse_month(&w.key).ok_or_else(|| VerifyError::Grpc {
                    call: "ExpenseQuery/GetUserWindows".into(),
                    message: format!("a month bucket's key is not YYYY-MM: {:?}", w.key),
                    retriable: false,
                })?;
                user.by_month
                    .insert(month, (w.expense_count, w.total_minor));
            }
        }

        let more = !page.next_page_token.is_empty();
        self.token = page.next_page_token;
        Ok(ServedPage { users, more })
    }

    fn reference(&mut self) -> Result<Option<ReferenceServed>, VerifyError> {
        let mut query = self.query.clone();
        let top = self
            .runtime
            .block_on(query.top_spenders(pb::TopSpendersRequest {
                limit: TOP_SPENDERS,
                consistency: self.consistency(),
            }))
            .map_err(grpc_error("ExpenseQuery/TopSpenders"))?
            .into_inner();
        self.saw(top.as_of.as_ref());
        let mut fired = std::collections::BTreeSet::new();
        let mut token = String::new();
        loop {
            let mut alerts = self.alerts.clone();
            let page = self
                .runtime
                .block_on(alerts.list_alerts(pb::ListAlertsRequest {
                    user_id: 0,
                    consistency: self.consistency(),
                    page_size: 1000,
                    page_token: token.clone(),
                }));
            let page = match page {
                Ok(page) => page.into_inner(),
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::warn!(
                        "The engine has no Alerts service (an older engine): alerts and converted totals are not checked."
                    );
                    return Ok(None);
                }
                Err(status) => return Err(grpc_error("Alerts/ListAlerts")(status)),
            };
            self.saw(page.as_of.as_ref());
            for a in &page.alerts {
                let month = parse_month(&a.month).ok_or_else(|| VerifyError::Grpc {
                    call: "Alerts/ListAlerts".into(),
                    message: format!("an alert's month is not YYYY-MM: {:?}", a.month),
                    retriable: false,
                })?;
                let pct = u8::try_from(a.threshold_pct).map_err(|_| VerifyError::Grpc {
                    call: "Alerts/ListAlerts".into(),
                    message: format!("an alert's threshold is {}", a.threshold_pct),
                    retriable: false,
                })?;
                if a.state != pb::AlertState::Cleared as i32 {
                    fired.insert((a.user_id, month, pct));
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let has_reference = !fired.is_empty()
            || top.spenders.iter().any(|s| !s.currency.is_empty())
            || self.budgets.values().any(|(_, c)| !c.is_empty());
        let reporting_currency =
            (!top.reporting_currency.is_empty()).then_some(top.reporting_currency);
        Ok(Some(ReferenceServed {
            ranking: if reporting_currency.is_some() {
                top.spenders
                    .iter()
                    .map(|s| RankedSpender {
                        user_id: s.user_id,
                        converted_minor: s.converted_minor,
                    })
                    .collect()
            } else {
                Vec::new()
            },
            reporting_currency,
            has_reference,
            fired,
            limit: TOP_SPENDERS as usize,
            budgets: std::mem::take(&mut self.budgets),
        }))
    }

    fn notes(&self) -> Vec<String> {
        match (self.first_epoch, self.last_epoch) {
            (Some(first), Some(last)) if first != last => vec![format!(
                "the engine's epoch moved from {first} to {last} during the check: it was still \
                 ingesting, and a mismatch may be one it had not caught up with yet"
            )],
            (Some(epoch), _) => vec![format!("every answer came from epoch {epoch}")],
            _ => Vec::new(),
        }
    }
}
