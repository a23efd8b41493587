//! The JSON API behind the pages. Every answer is read through the [`QueryBackend`] gRPC's
//! `ExpenseQuery` answers from, in the same order (largest first, ties by key: the backend's
//! [`largest_first`]), and says which epoch it is (`as_of.epoch`), so a client can compare it
//! with gRPC answers exactly. Sums are exact (128-bit) where gRPC's `int64` refuses them.
//!
//! # Budgets, alerts and the reporting currency
//!
//! Budget alerts, users' reference rows (budget, currency), exchange rates and converted totals
//! are read from the engine's read model ([`super::WebBackend::live`]); a backend without one
//! (`serve --from cassandra`) says `available: false` / `alerts_available: false` and leaves
//! them empty. Amounts are minor units; `currency` fields are ISO 4217 codes.
//!
//! `GET /api/overview` adds:
//! * `reporting_currency`: the engine's `--reporting-currency`, or `null`.
//! * `ranking`: `converted` when there is one: `top_spenders` are then ranked by the total in
//!   the reporting currency and each has `converted_minor` beside `total_minor` (in the user's
//!   `currency`; users whose currency has no rate are left out of that ranking); else
//!   `minor_units`: ranked by the sum of minor units, as gRPC's `TopSpenders` without one.
//! * `categories_currency`: the reporting currency when the totals by category are converted
//!   (each user's category totals at the rate of the user's currency,
//!   `round_half_away_from_zero(total * rate_micros / 1e6)` in 128 bits, then added up); `null`
//!   when they are sums of minor units across currencies (meaningless unless all users share a
//!   currency): without a reporting currency, or with one while no user's totals convert yet
//!   (no rates or users' rows have arrived; `ranking` is then `minor_units` too). `categories_unconverted_users`: users left out for want of a rate;
//!   `categories_note`: the same in words, for the page (it says how to set a reporting
//!   currency).
//! * `alerts`: `{available, as_of: {epoch}, over_budget_users, alerted_users, over_budget}`:
//!   users with a fired 100 % alert, users with any fired alert, and at most
//!   [`MAX_OVER_BUDGET`] fired 100 % alerts (the newest first, then the largest share of the
//!   budget) as
//!   `{user_id, name?, month: "2026-11", threshold_pct, spent_minor, budget_minor, currency,
//!   since_epoch}`.
//!
//! `GET /api/users/{id}` adds:
//! * `budget`: the meter, or `null` without a budget: `{monthly_budget_minor, currency, month,
//!   month_to_date_minor, percent, thresholds_pct: [80, 100]}`; `month` is the user's newest
//!   month with live expenses (the stream's present), `percent` rounded down.
//! * `alerts_available` and `alerts`: the user's fired alerts, as in the overview (no `name`).
//! * `reporting_currency`, and `converted_minor`: the user's total in it, if it converts.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use spendflow_operators::reference::{Currency, RATE_ONE, THRESHOLDS_PCT};
use spendflow_operators::{Epoch, UserId};
use spendflow_proto::v1 as pb;

use super::App;
use crate::personnel::{Personnel, UserDetails};
use crate::serve::auth::{self, AuthError, Principal};
use crate::serve::grpc::backend::{
    Amount, Buckets, CategoryData, QueryBackend, SummaryData, Wait, largest_first,
};
use crate::serve::read_model::{AlertView, Snapshot, format_month};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;

/// Most top spenders one overview may ask for.
pub const MAX_TOP: usize = 100;
/// Top spenders when the request does not say.
const DEFAULT_TOP: usize = 10;
/// Merchants listed on a user's page (the count of all is given too).
const MAX_MERCHANTS: usize = 15;
/// Months in a user's chart: the newest ones.
const MAX_MONTHS: usize = 24;
/// Over-budget users listed on the overview (the count of all is given too).
pub const MAX_OVER_BUDGET: usize = 20;
/// How long the totals by category over all users may be reused before they are recomputed
/// from a newer snapshot. Summing over every user costs time proportional to the users, so
/// a page polling it must not trigger that on every epoch.
const CATEGORY_REUSE: Duration = Duration::from_secs(1);
/// How long a user's months may wait for the epoch of the user's summary (they are read right
/// after it, so that epoch is there already, or the store lost it meanwhile).
const MONTHS_WAIT: Duration = Duration::from_secs(1);
/// Users' details kept in memory, and for how long.
const DETAILS_CACHE: usize = 10_000;
const DETAILS_TTL: Duration = Duration::from_secs(60);

/// An error answer: a status and a JSON body `{"error": "..."}` saying what to fix.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for ApiError {
    /// A backend's failure: the store is unavailable (`503`, retry), a wait ran out (`504`),
    /// anything else `500`; the message is the backend's.
    fn from(status: tonic::Status) -> Self {
        let code = match status.code() {
            tonic::Code::Unavailable | tonic::Code::ResourceExhausted => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(code, status.message().to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "status": self.status.as_u16() });
        (
            self.status,
            [(header::CACHE_CONTROL, "no-store")],
            Json(body),
        )
            .into_response()
    }
}

/// A JSON answer that is never cached: it is the live state.
fn fresh<T: Serialize>(value: T) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Json(value)).into_response()
}

/// Parses a user id from a path or query, or says what is allowed.
pub fn parse_user_id(text: &str) -> Result<UserId, ApiError> {
    match text.parse::<u64>() {
        Ok(id) if (1..=i64::MAX as u64).contains(&id) => Ok(id),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "a user id is an integer from 1 to {}, got {text:?}",
                i64::MAX
            ),
        )),
    }
}

/// What a request may read: `None` without auth; with auth, the principal the middleware
/// ([`auth::web::require`]) found. A request that reached a handler without one while auth
/// is on is refused (`401`), so a route outside the middleware fails closed.
#[derive(Debug)]
pub struct Access(Option<Principal>);

impl Access {
    /// Runs `check` on the principal, if auth is on.
    pub fn check(
        &self,
        check: impl FnOnce(&Principal) -> Result<(), AuthError>,
    ) -> Result<(), ApiError> {
        match &self.0 {
            Some(principal) => check(principal).map_err(ApiError::from),
            None => Ok(()),
        }
    }
}

impl FromRequestParts<App> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Principal>() {
            Some(principal) => Ok(Access(Some(principal.clone()))),
            None if app.backend.auth.is_some() => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "not signed in: send `Authorization: Bearer <JWT>` or sign in at /signin",
            )),
            None => Ok(Access(None)),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let status = match &e {
            AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AuthError::Denied(_) => StatusCode::FORBIDDEN,
            AuthError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            AuthError::Key { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// `GET /signin`: the sign-in form.
pub async fn signin_form(State(app): State<App>) -> Response {
    auth::web::signin_form(app.backend.auth.clone()).await
}

/// The sign-in form's fields.
#[derive(Debug, Deserialize)]
pub struct SignInForm {
    token: String,
}

/// `POST /signin`: takes a token, sets the sign-in cookie.
pub async fn signin(
    State(app): State<App>,
    headers: axum::http::HeaderMap,
    form: Result<axum::Form<SignInForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let token = form.map(|f| f.0.token).unwrap_or_default();
    auth::web::signin(app.backend.auth.clone(), &headers, &token).await
}

/// `POST /signout`: clears the sign-in cookie.
pub async fn signout(headers: axum::http::HeaderMap) -> Response {
    auth::web::signout(&headers).await
}

/// `404` for anything not routed: JSON under `/api/`, a small page with a way back elsewhere.
pub async fn not_found(uri: Uri) -> Response {
    if uri.path().starts_with("/api/") {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no such endpoint: {}; the API has /api/overview, /api/users/{{id}}, \
                 /api/users/{{id}}/image and /api/events",
                uri.path()
            ),
        )
        .into_response();
    }
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><title>Not found · spendflow</title>\
         <link rel=\"stylesheet\" href=\"/assets/style.css\"><main class=\"page\"><h1>Not found</h1>\
         <p>There is no page here. <a href=\"/\">Back to the overview</a>.</p></main></html>",
    )
        .into_response()
}

/// `(count, sum)` of one key, as JSON.
#[derive(Debug, Serialize)]
pub struct Total {
    /// Category, merchant or month (`2026-11`).
    pub key: String,
    /// Sum of the live expenses, minor units.
    pub total_minor: i128,
    /// Number of live expenses.
    pub expense_count: i64,
}

/// Totals in the order gRPC answers them ([`largest_first`]).
fn totals(mut entries: Vec<(String, Amount)>) -> Vec<Total> {
    largest_first(&mut entries);
    entries
        .into_iter()
        .map(|(key, (count, sum))| Total {
            key,
            total_minor: sum,
            expense_count: count,
        })
        .collect()
}

/// Whatever the backend has now: the web report never waits for an epoch.
const NOW: Wait = Wait::NOW;

#[derive(Debug, Serialize)]
struct AsOfJson {
    epoch: Epoch,
}

// ---------------------------------------------------------------------------------------------
// Users' details
// ---------------------------------------------------------------------------------------------

/// A user's details as the page shows them.
#[derive(Clone, Debug, Serialize)]
pub struct DetailsJson {
    name: String,
    email: String,
    country: String,
    currency: String,
    monthly_budget_minor: i64,
    cards: Vec<CardJson>,
    /// Where the photo is, if the user has one.
    image_url: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
struct CardJson {
    card_id: String,
    masked_number: String,
}

impl DetailsJson {
    /// The user's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The currency of all the user's expenses.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    fn from(details: &UserDetails) -> Self {
        DetailsJson {
            name: details.name.clone(),
            email: details.email.clone(),
            country: details.country.clone(),
            currency: details.currency.clone(),
            monthly_budget_minor: details.monthly_budget_minor,
            cards: details
                .cards
                .iter()
                .map(|c| CardJson {
                    card_id: c.card_id.clone(),
                    masked_number: c.masked_number.clone(),
                })
                .collect(),
            image_url: details
                .image
                .as_ref()
                .map(|i| format!("/api/users/{}/image?v={}", details.user_id, i.sha256)),
        }
    }
}

/// What is known about a user's details.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// No personnel store is configured.
    NotConfigured,
    /// The store has no such user.
    NotFound,
    /// The store could not be read; the message says why.
    Failed(String),
    /// The details.
    Found(Arc<DetailsJson>),
}

impl Lookup {
    fn details(&self) -> Option<&DetailsJson> {
        match self {
            Lookup::Found(d) => Some(d),
            _ => None,
        }
    }

    fn state(&self) -> &'static str {
        match self {
            Lookup::NotConfigured => "not_configured",
            Lookup::NotFound => "not_found",
            Lookup::Failed(_) => "unavailable",
            Lookup::Found(_) => "ok",
        }
    }
}

/// Users' details for the pages, from the personnel store, with a small cache so a page that
/// refreshes every second does not ask the store for the same users again and again.
#[derive(Clone, Debug)]
pub struct Directory {
    personnel: Option<Arc<Personnel>>,
    cache: Arc<Mutex<HashMap<UserId, (Instant, Lookup)>>>,
}

impl Directory {
    /// A directory over `personnel` (none: details are "not configured").
    pub fn new(personnel: Option<Arc<Personnel>>) -> Self {
        Directory {
            personnel,
            cache: Arc::default(),
        }
    }

    /// True if a personnel store is configured.
    pub fn configured(&self) -> bool {
        self.personnel.is_some()
    }

    /// One user's details.
    pub async fn lookup(&self, user: UserId) -> Lookup {
        let Some(personnel) = &self.personnel else {
            return Lookup::NotConfigured;
        };
        if let Some((at, lookup)) = self.lock().get(&user)
            && at.elapsed() < DETAILS_TTL
        {
            return lookup.clone();
        }
        let lookup = match personnel.user(user).await {
            Ok(Some(details)) => Lookup::Found(Arc::new(DetailsJson::from(&details))),
            Ok(None) => Lookup::NotFound,
            Err(e) => {
                tracing::warn!(user, error = %e, "Could not read the user's details for the web page.");
                // Not cached: the next request tries again.
                return Lookup::Failed(e.to_string());
            }
        };
        let mut cache = self.lock();
        if cache.len() >= DETAILS_CACHE {
            cache.retain(|_, (at, _)| at.elapsed() < DETAILS_TTL);
            if cache.len() >= DETAILS_CACHE {
                cache.clear();
            }
        }
        cache.insert(user, (Instant::now(), lookup.clone()));
        lookup
    }

    /// Several users' details, in the order given.
    pub async fn lookup_all(&self, users: &[UserId]) -> Vec<Lookup> {
        futures::future::join_all(users.iter().map(|u| self.lookup(*u))).await
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<UserId, (Instant, Lookup)>> {
        self.cache.lock()
    }
}

// ---------------------------------------------------------------------------------------------
// GET /api/overview
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct OverviewQuery {
    /// Top spenders to list, 1 to [`MAX_TOP`].
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Overview {
    as_of: AsOfJson,
    users: u64,
    live_expenses: i64,
    records_read: u64,
    records_rejected: u64,
    caught_up: bool,
    /// `ok` or `not_configured`: whether names and photos can be shown.
    details: &'static str,
    /// The engine's reporting currency (`--reporting-currency`), if it has one and the backend
    /// says (the engine's read model does; a Cassandra store does not).
    reporting_currency: Option<String>,
    /// `converted` (by the total in the reporting currency) or `minor_units` (by the sum of
    /// minor units in each user's own currency).
    ranking: &'static str,
    top_spenders: Vec<Spender>,
    /// Totals by category over all users, at `categories_as_of` (recomputed at most once a
    /// second, so it may be a little older than `as_of`).
    categories: TotalsOf,
    /// The currency of `categories`: the reporting currency when there is one (each user's
    /// totals converted at the user's currency's rate); `None`: sums of minor units of the
    /// users' own currencies, which only mean something if all users share one currency.
    categories_currency: Option<String>,
    /// With a reporting currency: users left out of `categories` because their currency has
    /// no rate (or they have no reference row).
    categories_unconverted_users: u64,
    /// What `categories` are, in words, for the page.
    categories_note: String,
    categories_as_of: AsOfJson,
    /// Budget alerts: users over budget now.
    alerts: AlertsOverview,
}

/// The totals of shared [`Categories`], serialized as their list.
#[derive(Debug)]
struct TotalsOf(Arc<Categories>);

impl Serialize for TotalsOf {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.totals.serialize(serializer)
    }
}

/// The overview's budget alerts.
#[derive(Debug, Serialize)]
struct AlertsOverview {
    /// False when the backend has no alert states (`serve --from cassandra`): the rest is
    /// empty then.
    available: bool,
    /// The epoch of the alert states.
    as_of: AsOfJson,
    /// Users with a fired 100 % alert (in any month).
    over_budget_users: usize,
    /// Users with any fired alert (80 % or 100 %).
    alerted_users: usize,
    /// Fired 100 % alerts, the newest first, at most [`MAX_OVER_BUDGET`].
    over_budget: Vec<AlertJson>,
}

/// A fired alert, as the pages show it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AlertJson {
    pub user_id: UserId,
    /// The user's name, where details are configured (overview only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The UTC month, `2026-11`.
    pub month: String,
    /// 80 or 100.
    pub threshold_pct: u8,
    /// The month's spend now, minor units of `currency`.
    pub spent_minor: i128,
    /// The monthly budget now, minor units of `currency`.
    pub budget_minor: i64,
    pub currency: String,
    /// The epoch the alert fired at.
    pub since_epoch: Epoch,
}

impl From<&AlertView> for AlertJson {
    fn from(a: &AlertView) -> Self {
        AlertJson {
            user_id: a.user_id,
            name: None,
            month: format_month(a.month),
            threshold_pct: a.threshold_pct,
            spent_minor: a.spent_minor,
            budget_minor: a.budget_minor,
            currency: currency_text(a.currency),
            since_epoch: a.since_epoch,
        }
    }
}

/// A currency code as text (`???` stays as it is).
pub fn currency_text(code: Currency) -> String {
    String::from_utf8_lossy(&code).into_owned()
}

/// `round_half_away_from_zero(total_minor * rate_micros / 1_000_000)` in 128 bits, the
/// conversion rule of `spendflow_operators::reference`; `None` if the product does not fit.
pub fn convert_minor(total_minor: i128, rate_micros: i64) -> Option<i128> {
    let product = total_minor.checked_mul(i128::from(rate_micros))?;
    let one = i128::from(RATE_ONE);
    let (quotient, rest) = (product / one, product % one);
    Some(if rest.abs() * 2 >= one {
        quotient + product.signum()
    } else {
        quotient
    })
}

/// The rate of `currency` into `reporting`: exactly one for the reporting currency itself,
/// else the snapshot's rate, if it has one.
pub fn rate_into(snapshot: &Snapshot, reporting: Currency, currency: Currency) -> Option<i64> {
    if currency == reporting {
        Some(RATE_ONE)
    } else {
        snapshot.fx_rate(currency)
    }
}

/// Totals by category over all users of `snapshot`, each user's category totals converted
/// with `rate_of(currency_of(user))` ([`convert_minor`]); users without a currency or a rate
/// are left out and counted. Largest first, ties by category.
pub fn converted_categories(
    snapshot: &Snapshot,
    currency_of: impl Fn(UserId) -> Option<Currency>,
    rate_of: impl Fn(Currency) -> Option<i64>,
) -> (Vec<CategoryTotal>, u64) {
    let mut sums: std::collections::BTreeMap<String, (i64, i128, u64)> = Default::default();
    let mut unconverted = 0u64;
    for user in snapshot.users_after(None) {
        let Some(rate) = currency_of(user.user_id).and_then(&rate_of) else {
            unconverted += 1;
            continue;
        };
        let converted: Option<Vec<_>> = user
            .categories
            .iter()
            .map(|(name, (count, sum))| convert_minor(sum, rate).map(|c| (name, count, c)))
            .collect();
        let Some(converted) = converted else {
            unconverted += 1;
            continue;
        };
        for (name, count, sum) in converted {
            let entry = sums.entry(name.text().to_string()).or_default();
            entry.0 += count;
            entry.1 += sum;
            entry.2 += 1;
        }
    }
    let mut entries: Vec<(String, (i64, i128))> = Vec::with_capacity(sums.len());
    let mut users = std::collections::HashMap::with_capacity(sums.len());
    for (key, (count, sum, n)) in sums {
        users.insert(key.clone(), n);
        entries.push((key, (count, sum)));
    }
    largest_first(&mut entries);
    let totals = entries
        .into_iter()
        .map(|(key, (count, sum))| CategoryTotal {
            users: users.get(&key).copied().unwrap_or(0),
            key,
            total_minor: sum,
            expense_count: count,
        })
        .collect();
    (totals, unconverted)
}

/// The current month of a user for the budget meter: the newest month with live expenses
/// (the stream's present; a simulator or a replay may be in another month than the clock).
fn meter_month(snapshot: &Snapshot, user: UserId) -> Option<i32> {
    snapshot
        .user(user)
        .and_then(|a| a.months.iter().next_back())
        .map(|(month, _)| month)
}

/// The budget alerts of the overview, from the read model's snapshot.
fn alerts_overview(snapshot: Option<&Snapshot>) -> AlertsOverview {
    let Some(snapshot) = snapshot else {
        return AlertsOverview {
            available: false,
            as_of: AsOfJson { epoch: 0 },
            over_budget_users: 0,
            alerted_users: 0,
            over_budget: Vec::new(),
        };
    };
    let top = *THRESHOLDS_PCT.last().expect("thresholds");
    let mut over: Vec<&AlertView> = snapshot
        .alerts(None)
        .filter(|a| a.threshold_pct == top)
        .collect();
    let mut users: Vec<UserId> = over.iter().map(|a| a.user_id).collect();
    users.dedup();
    // The newest first (the epoch it fired at, then the month), then the largest share of the
    // budget (exactly: spent_a / budget_a > spent_b / budget_b), then by user.
    over.sort_by(|a, b| {
        let left = a.spent_minor * i128::from(b.budget_minor.max(1));
        let right = b.spent_minor * i128::from(a.budget_minor.max(1));
        b.since_epoch
            .cmp(&a.since_epoch)
            .then(b.month.cmp(&a.month))
            .then(right.cmp(&left))
            .then(a.user_id.cmp(&b.user_id))
    });
    over.truncate(MAX_OVER_BUDGET);
    AlertsOverview {
        available: true,
        as_of: AsOfJson {
            epoch: snapshot.as_of().epoch,
        },
        over_budget_users: users.len(),
        alerted_users: snapshot.alerted_users(),
        over_budget: over.into_iter().map(AlertJson::from).collect(),
    }
}

#[derive(Debug, Serialize)]
struct Spender {
    rank: usize,
    user_id: UserId,
    name: Option<String>,
    /// The user's currency: from the reference data, else from the user's details.
    currency: Option<String>,
    /// The user's total in `currency`.
    total_minor: i128,
    expense_count: i64,
    /// The total in the reporting currency, when there is one and the user's currency has a
    /// rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    converted_minor: Option<i128>,
}

/// One category over all users.
#[derive(Debug, Serialize)]
pub struct CategoryTotal {
    key: String,
    /// Sum over all users: in the reporting currency when the overview says
    /// `categories_currency`, else of minor units of each user's own currency.
    total_minor: i128,
    expense_count: i64,
    /// Users with a live expense in the category.
    users: u64,
}

impl From<CategoryData> for CategoryTotal {
    fn from(c: CategoryData) -> Self {
        CategoryTotal {
            key: c.category,
            total_minor: c.total_minor,
            expense_count: c.expense_count,
            users: c.users,
        }
    }
}

/// Totals by category over all users, and what they are in.
#[derive(Debug, Default)]
pub struct Categories {
    totals: Vec<CategoryTotal>,
    /// The reporting currency they are converted to; `None`: sums of minor units.
    currency: Option<Currency>,
    /// Users left out for want of a currency or rate (converted totals only).
    unconverted_users: u64,
    /// There is a reporting currency, but no user's totals could be converted yet (no rates
    /// or users' rows have arrived): `totals` are sums of minor units.
    no_rates: bool,
}

/// The last totals by category and the epoch they are of.
#[derive(Debug, Default)]
pub struct CategoryCache {
    last: Mutex<Option<(Instant, Epoch, Arc<Categories>)>>,
}

impl CategoryCache {
    /// Totals by category, or the last ones if they are of `epoch` (the epoch the rest of the
    /// answer is of) or recent enough: converted into the reporting currency when `live` (the
    /// engine's read model) has one, else from `backend` as sums of minor units.
    ///
    /// # Errors
    ///
    /// The backend's, if it had to be asked.
    async fn get(
        &self,
        backend: &dyn QueryBackend,
        live: Option<&Snapshot>,
        epoch: Epoch,
    ) -> Result<(Epoch, Arc<Categories>), tonic::Status> {
        if let Some((at, cached_epoch, totals)) = &*self.last.lock()
            && (*cached_epoch == epoch || at.elapsed() < CATEGORY_REUSE)
        {
            return Ok((*cached_epoch, Arc::clone(totals)));
        }
        let converted = live
            .and_then(|s| s.reporting_currency().map(|r| (s, r)))
            .map(|(snapshot, reporting)| {
                let (totals, unconverted_users) = converted_categories(
                    snapshot,
                    |user| snapshot.user_ref(user).map(|row| row.currency),
                    |currency| rate_into(snapshot, reporting, currency),
                );
                let categories = Categories {
                    totals,
                    currency: Some(reporting),
                    unconverted_users,
                    no_rates: false,
                };
                (snapshot.as_of().epoch, categories)
            });
        let (epoch, categories) = match converted {
            // Somebody's totals converted (or there is nobody to convert).
            Some((epoch, categories))
                if !categories.totals.is_empty() || categories.unconverted_users == 0 =>
            {
                (epoch, categories)
            }
            // Nobody's could: no rates or rows yet. The sums of minor units, said so.
            no_rates => {
                let answer = backend.category_totals(NOW).await?;
                let categories = Categories {
                    totals: answer.value.into_iter().map(CategoryTotal::from).collect(),
                    currency: None,
                    unconverted_users: 0,
                    no_rates: no_rates.is_some(),
                };
                (answer.as_of.epoch, categories)
            }
        };
        let categories = Arc::new(categories);
        *self.last.lock() = Some((Instant::now(), epoch, Arc::clone(&categories)));
        Ok((epoch, categories))
    }
}

/// What the totals by category are, in words.
fn categories_note(categories: &Categories) -> String {
    match categories.currency {
        Some(currency) => {
            let currency = currency_text(currency);
            let mut note = format!(
                "in {currency}: each user's totals converted at the current rate of the user's \
                 currency"
            );
            if categories.unconverted_users > 0 {
                note.push_str(&format!(
                    "; {} users left out (no rate for their currency)",
                    categories.unconverted_users
                ));
            }
            note
        }
        None if categories.no_rates => "mixed currencies: each user's own minor units, added up \
             as they are (no user's currency has an exchange rate to the reporting currency yet)"
            .to_string(),
        None => "mixed currencies: each user's own minor units, added up as they are (start the \
                 engine with --reporting-currency EUR to convert them into one currency)"
            .to_string(),
    }
}

/// Counters the overview shows, as `Admin/GetStatus` answers them.
async fn counters(app: &App) -> Result<pb::GetStatusResponse, ApiError> {
    Ok(app
        .backend
        .admin
        .get_status(tonic::Request::new(pb::GetStatusRequest {}))
        .await?
        .into_inner())
}

pub async fn overview(
    State(app): State<App>,
    access: Access,
    query: Result<Query<OverviewQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    access.check(|p| p.read_all("the overview of every user"))?;
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be an integer from 1 to {MAX_TOP}: {e}"),
        )
    })?;
    let limit = match query.limit {
        None => DEFAULT_TOP,
        Some(n) if (1..=MAX_TOP).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("limit must be from 1 to {MAX_TOP}, got {n}"),
            ));
        }
    };
    let status = counters(&app).await?;
    let query = app.backend.query.as_ref();
    let answer = query.overview(NOW, limit).await?;
    let epoch = answer.as_of.epoch;
    let overview = answer.value;
    let snapshot = app.backend.live.as_ref().map(|m| m.snapshot());
    let snapshot = snapshot.as_deref();
    let reporting = snapshot.and_then(Snapshot::reporting_currency);
    // With a reporting currency, the ranking by converted total (from the same snapshot).
    // Without any converted total yet (no rates or rows have arrived), by minor units.
    let converting = snapshot.is_some_and(|s| s.top_converted().next().is_some());
    let ranked: Vec<(UserId, i128, i64, Option<i128>)> = match (snapshot, reporting) {
        (Some(snapshot), Some(_)) if converting => snapshot
            .top_converted()
            .take(limit)
            .map(|(user, converted)| {
                let (total, count) = snapshot
                    .user(user)
                    .map_or((0, 0), |a| (a.total_minor, a.expense_count));
                (user, total, count, Some(converted))
            })
            .collect(),
        _ => overview
            .top
            .iter()
            .map(|u| (u.user_id, u.total_minor, u.expense_count, None))
            .collect(),
    };
    let ids: Vec<UserId> = ranked.iter().map(|u| u.0).collect();
    let details = app.directory.lookup_all(&ids).await;
    let top_spenders = ranked
        .iter()
        .zip(&details)
        .enumerate()
        .map(|(i, ((user, total, count, converted), lookup))| Spender {
            rank: i + 1,
            user_id: *user,
            name: lookup.details().map(|d| d.name.clone()),
            currency: snapshot
                .and_then(|s| s.user_ref(*user))
                .map(|row| currency_text(row.currency))
                .or_else(|| lookup.details().map(|d| d.currency.clone())),
            total_minor: *total,
            expense_count: *count,
            converted_minor: *converted,
        })
        .collect();
    let (categories_epoch, categories) = app.categories.get(query, snapshot, epoch).await?;
    let mut alerts = alerts_overview(snapshot);
    let alerted: Vec<UserId> = alerts.over_budget.iter().map(|a| a.user_id).collect();
    for (alert, lookup) in alerts
        .over_budget
        .iter_mut()
        .zip(app.directory.lookup_all(&alerted).await)
    {
        alert.name = lookup.details().map(|d| d.name.clone());
    }
    Ok(fresh(Overview {
        as_of: AsOfJson { epoch },
        users: overview.users,
        live_expenses: overview.live_expenses,
        records_read: status.records_read,
        records_rejected: status.records_rejected,
        caught_up: status.caught_up,
        details: if app.directory.configured() {
            "ok"
        } else {
            "not_configured"
        },
        reporting_currency: reporting.map(currency_text),
        ranking: if reporting.is_some() && converting {
            "converted"
        } else {
            "minor_units"
        },
        top_spenders,
        categories_currency: categories.currency.map(currency_text),
        categories_unconverted_users: categories.unconverted_users,
        categories_note: categories_note(&categories),
        categories: TotalsOf(categories),
        categories_as_of: AsOfJson {
            epoch: categories_epoch,
        },
        alerts,
    }))
}

// ---------------------------------------------------------------------------------------------
// GET /api/users/{id}
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct UserPage {
    as_of: AsOfJson,
    user_id: UserId,
    /// `ok`, `not_configured`, `not_found` or `unavailable`.
    details_state: &'static str,
    details: Option<Arc<DetailsJson>>,
    /// `None` if the user has no live expense.
    aggregates: Option<AggregatesJson>,
    /// The budget meter: `None` without a budget in the reference data (or without a read
    /// model behind the report).
    budget: Option<BudgetJson>,
    /// False when the backend has no alert states (`serve --from cassandra`).
    alerts_available: bool,
    /// The user's fired alerts, by month and threshold.
    alerts: Vec<AlertJson>,
    /// The engine's reporting currency, if any.
    reporting_currency: Option<String>,
    /// The user's total in the reporting currency, if it can be converted.
    converted_minor: Option<i128>,
}

/// A user's spend this month against the monthly budget.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BudgetJson {
    /// The monthly budget from the reference data, minor units of `currency`.
    pub monthly_budget_minor: i64,
    pub currency: String,
    /// The month the meter is of: the newest month with live expenses (`None`: no expense).
    pub month: Option<String>,
    /// The spend in `month`, minor units of `currency` (0 without one).
    pub month_to_date_minor: i128,
    /// `month_to_date_minor` as whole percent of the budget, rounded down.
    pub percent: i128,
    /// The alert thresholds, percent of the budget.
    pub thresholds_pct: [u8; 2],
}

/// A user's budget meter and fired alerts from the read model's snapshot.
pub fn budget_and_alerts(
    snapshot: &Snapshot,
    user: UserId,
) -> (Option<BudgetJson>, Vec<AlertJson>) {
    let alerts = snapshot.alerts(Some(user)).map(AlertJson::from).collect();
    let budget = snapshot.user_ref(user).and_then(|row| {
        let budget = row.budget_minor.filter(|b| *b > 0)?;
        let month = meter_month(snapshot, user);
        let spent = month.map_or(0, |m| snapshot.month_spend(user, m));
        Some(BudgetJson {
            monthly_budget_minor: budget,
            currency: currency_text(row.currency),
            month: month.map(format_month),
            month_to_date_minor: spent,
            percent: spent.saturating_mul(100).div_euclid(i128::from(budget)),
            thresholds_pct: THRESHOLDS_PCT,
        })
    });
    (budget, alerts)
}

#[derive(Debug, Serialize)]
struct AggregatesJson {
    total_minor: i128,
    expense_count: i64,
    last_event_ms: Option<i64>,
    last_event_time: Option<String>,
    categories: Vec<Total>,
    /// The largest merchants (at most 15); `merchant_count` says how many there are.
    merchants: Vec<Total>,
    merchant_count: usize,
    /// The newest months (at most 24), oldest first.
    months: Vec<Total>,
}

/// A user's aggregates as the page shows them: `months` are the user's month buckets, oldest
/// first.
fn aggregates_json(user: SummaryData, months: Vec<(i32, Amount)>) -> AggregatesJson {
    let merchant_count = user.by_merchant.len();
    let mut merchants = totals(user.by_merchant);
    merchants.truncate(MAX_MERCHANTS);
    let skip = months.len().saturating_sub(MAX_MONTHS);
    AggregatesJson {
        total_minor: user.total_minor,
        expense_count: user.expense_count,
        last_event_ms: user.last_event_ms,
        last_event_time: user
            .last_event_ms
            .map(spendflow_operators::decode::format_event_time),
        categories: totals(user.by_category),
        merchants,
        merchant_count,
        months: months
            .into_iter()
            .skip(skip)
            .map(|(month, (count, sum))| Total {
                key: format_month(month),
                total_minor: sum,
                expense_count: count,
            })
            .collect(),
    }
}

pub async fn user(
    State(app): State<App>,
    access: Access,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let user = parse_user_id(&id)?;
    access.check(|p| p.read_user(user))?;
    let query = app.backend.query.as_ref();
    let (summary, lookup) = tokio::join!(query.user_summary(NOW, user), app.directory.lookup(user));
    let summary = summary?;
    let epoch = summary.as_of.epoch;
    let aggregates = match summary.value {
        Some(data) => {
            // Every month the user has, from the same epoch or a newer one.
            let wait = Wait {
                min_epoch: epoch,
                timeout: MONTHS_WAIT,
                pinned: false,
            };
            let months = query
                .user_windows(wait, user, Buckets::Month, i32::MIN, i32::MAX)
                .await?
                .value
                .unwrap_or_default();
            Some(aggregates_json(data, months))
        }
        None => None,
    };
    if aggregates.is_none() && !matches!(lookup, Lookup::Found(_)) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "user {user} has no live expenses as of epoch {epoch}{}",
                match lookup {
                    Lookup::NotFound => " and is not in the personnel records",
                    _ => "",
                }
            ),
        ));
    }
    let snapshot = app.backend.live.as_ref().map(|m| m.snapshot());
    let (budget, alerts) = snapshot
        .as_deref()
        .map(|s| budget_and_alerts(s, user))
        .unwrap_or_default();
    let reporting = snapshot.as_deref().and_then(Snapshot::reporting_currency);
    Ok(fresh(UserPage {
        as_of: AsOfJson { epoch },
        user_id: user,
        details_state: lookup.state(),
        details: match &lookup {
            Lookup::Found(d) => Some(Arc::clone(d)),
            _ => None,
        },
        aggregates,
        budget,
        alerts_available: snapshot.is_some(),
        alerts,
        reporting_currency: reporting.map(currency_text),
        converted_minor: snapshot.as_deref().and_then(|s| s.converted(user)),
    }))
}

// ---------------------------------------------------------------------------------------------
// GET /api/users/{id}/image
// ---------------------------------------------------------------------------------------------

pub async fn image(
    State(app): State<App>,
    access: Access,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let user = parse_user_id(&id)?;
    access.check(|p| p.read_user(user))?;
    let Some(personnel) = &app.directory.personnel else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "user details and photos are not configured on this engine",
        ));
    };
    let found = personnel.image(user).await.map_err(|e| {
        tracing::warn!(user, error = %e, "Could not read the user's photo for the web page.");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the photo of user {user} could not be read: {e}"),
        )
    })?;
    let Some((image, bytes)) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("user {user} has no photo"),
        ));
    };
    // The bytes are content-addressed: the hash is a perfect validator.
    let etag = format!("\"{}\"", image.sha256);
    let headers_out = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, "private, max-age=60".to_string()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
    ];
    if super::assets::etag_matches(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, headers_out).into_response());
    }
    Ok((
        [(header::CONTENT_TYPE, image.content_type.clone())],
        headers_out,
        bytes,
    )
        .into_response())
}
