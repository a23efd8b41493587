//! `spendflow verify`: checks what a served side says (the engine's gRPC answers, or the
//! Cassandra sink's tables) against SQL over the live `expenses` table that `spendflow
//! generate` keeps.
//!
//! # What is compared
//!
//! For every user on either side: the total and count of live expenses, the total and count
//! per category, and per UTC month (event time). A user present on one side only is a
//! mismatch, and so is a served user whose month buckets do not add up to its count (which
//! would mean buckets outside the months checked).
//!
//! # How
//!
//! Both sides are read a page of users at a time, in user id order, and merged: the served side
//! pages ([`Served::next_page`]) and, for each page, the truth side answers for exactly the
//! same range of user ids ([`Truth::users`]), so users missing on either side are found
//! without holding either side whole in memory. The month range asked of the served side is the
//! truth's overall month range, widened per user to its newest served event.
//!
//! The two sides are traits so another served side or another truth can be plugged in;
//! [`grpc::GrpcServed`], [`cassandra::CassandraServed`] and [`mysql::MySqlTruth`] are the ones
//! the command line uses. The comparison itself ([`compare_users`]) is a pure function.
//!
//! Besides, where both sides have reference data (issue 16), the alerts fired now and the
//! totals converted to the reporting currency ([`reference`]): [`Truth::reference`] computes
//! them with SQL, [`Served::reference`] reads them (`Alerts/ListAlerts`, `TopSpenders`).
//!
//! The check is meaningful once the engine has caught up with everything the generator wrote:
//! [`Served::wait_ready`] waits for that (gRPC: `Admin/GetStatus` reports `caught_up`;
//! Cassandra: the sink has been quiet for a while), and the report notes when the served epoch
//! moved during the check.

pub mod cassandra;
pub mod grpc;
pub mod mysql;
pub mod reference;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use spendflow_operators::UserId;

/// A `(count, total_minor)` pair.
pub type CountTotal = (i64, i64);

/// Everything compared for one user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserAggregates {
    /// The user.
    pub user_id: UserId,
    /// Live expenses.
    pub count: i64,
    /// Sum of their amounts, minor units.
    pub total_minor: i64,
    /// Per category.
    pub by_category: BTreeMap<String, CountTotal>,
    /// Per UTC month, keyed `year * 12 + month - 1`.
    pub by_month: BTreeMap<i32, CountTotal>,
}

/// An inclusive range of months (`year * 12 + month - 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonthRange {
    /// The first month.
    pub first: i32,
    /// The last month.
    pub last: i32,
}

/// One page of served users.
#[derive(Clone, Debug, Default)]
pub struct ServedPage {
    /// Users in increasing id order.
    pub users: Vec<UserAggregates>,
    /// Whether more pages follow. If so, the page covers exactly the ids up to its last user's.
    pub more: bool,
}

/// The ground truth (SQL over the live expenses).
pub trait Truth {
    /// A short name for reports (`mysql`).
    fn name(&self) -> &str;
    /// The months of the oldest and newest live expense, `None` if there are none.
    ///
    /// # Errors
    ///
    /// The backend's error.
    fn month_range(&mut self) -> Result<Option<MonthRange>, VerifyError>;
    /// Every user with a live expense and an id in `(after, upto]` (unbounded where `None`),
    /// in increasing id order.
    ///
    /// # Errors
    ///
    /// The backend's error.
    fn users(
        &mut self,
        after: Option<UserId>,
        upto: Option<UserId>,
    ) -> Result<Vec<UserAggregates>, VerifyError>;
    /// The alerts fired now and, with `reporting_currency`, the converted totals; `None` if
    /// the truth has no reference data (no `fx_rates` table).
    ///
    /// # Errors
    ///
    /// The backend's error.
    fn reference(
        &mut self,
        _reporting_currency: Option<&str>,
    ) -> Result<Option<reference::ReferenceTruth>, VerifyError> {
        Ok(None)
    }
}

/// What is served (the engine over gRPC; the Cassandra sink's tables).
pub trait Served {
    /// A short name for reports (`grpc`).
    fn name(&self) -> &str;
    /// Waits until the served side has everything its input holds, at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`VerifyError::NotReady`] on timeout, or the backend's error.
    fn wait_ready(&mut self, _timeout: Duration) -> Result<(), VerifyError> {
        Ok(())
    }
    /// The next page of at most `page_size` users (the first call gives the first page).
    /// `months` is the truth's month range, for backends that must be asked for a range.
    ///
    /// # Errors
    ///
    /// The backend's error.
    fn next_page(
        &mut self,
        page_size: usize,
        months: Option<MonthRange>,
    ) -> Result<ServedPage, VerifyError>;
    /// Remarks about consistency to print with the report (e.g. the epochs the answers came
    /// from).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// The alerts fired now and the converted ranking; `None` if this side serves neither.
    ///
    /// # Errors
    ///
    /// The backend's error.
    fn reference(&mut self) -> Result<Option<reference::ReferenceServed>, VerifyError> {
        Ok(None)
    }
}

/// What failed while verifying (as opposed to a mismatch, which is a result).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A setting is invalid.
    #[error("invalid settings: {0}")]
    Config(String),
    /// A MySQL query failed.
    #[error("MySQL: {context}: {source}")]
    MySql {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: ::mysql::Error,
    },
    /// A gRPC call failed.
    #[error("gRPC {call}: {message}")]
    Grpc {
        /// The call.
        call: String,
        /// What went wrong.
        message: String,
        /// Whether trying again may help.
        retriable: bool,
    },
    /// Cassandra could not be read.
    #[error(transparent)]
    Cassandra(#[from] crate::cassandra::CassandraError),
    /// The served side did not catch up in time.
    #[error("the served side is not caught up after {waited:?}: {detail}")]
    NotReady {
        /// How long it was waited for.
        waited: Duration,
        /// Its last reported state.
        detail: String,
    },
}

impl VerifyError {
    /// True if verifying again later may succeed (a server starting, an engine catching up).
    pub fn is_retriable(&self) -> bool {
        match self {
            VerifyError::Config(_) => false,
            VerifyError::MySql { source, .. } => crate::mysql_client::is_retriable(source),
            VerifyError::Grpc { retriable, .. } => *retriable,
            VerifyError::Cassandra(e) => e.is_retriable(),
            VerifyError::NotReady { .. } => true,
        }
    }
}

/// Which aggregate differs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Aspect {
    /// The user is in the truth but not served.
    MissingServed,
    /// The user is served but not in the truth.
    MissingTruth,
    /// The user's total and count.
    User,
    /// One category.
    Category(String),
    /// One month (`year * 12 + month - 1`).
    Month(i32),
    /// The served month buckets do not add up to the served count.
    MonthsIncomplete,
}

impl fmt::Display for Aspect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aspect::MissingServed => write!(f, "missing on the served side"),
            Aspect::MissingTruth => write!(f, "missing in the truth"),
            Aspect::User => write!(f, "total"),
            Aspect::Category(c) => write!(f, "category {c:?}"),
            Aspect::Month(m) => {
                let (y, mo) = spendflow_operators::model::split_month(*m);
                write!(f, "month {y:04}-{mo:02}")
            }
            Aspect::MonthsIncomplete => write!(f, "sum of served months"),
        }
    }
}

/// One difference, with both values (`None`: absent on that side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The user.
    pub user_id: UserId,
    /// Which aggregate.
    pub aspect: Aspect,
    /// The truth's `(count, total)`.
    pub truth: Option<CountTotal>,
    /// The served `(count, total)`.
    pub served: Option<CountTotal>,
}

fn show(value: Option<CountTotal>) -> String {
    match value {
        Some((count, total)) => format!("{count} expenses, total {total}"),
        None => "absent".to_string(),
    }
}

impl Mismatch {
    /// The mismatch as a line, naming the two sides.
    pub fn describe(&self, truth: &str, served: &str) -> String {
        format!(
            "user {} {}: {truth} {} | {served} {}",
            self.user_id,
            self.aspect,
            show(self.truth),
            show(self.served)
        )
    }
}

/// How to verify.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Users per served page.
    pub page_size: usize,
    /// Mismatches kept (with both values) for the report; all are counted.
    pub max_reported: usize,
    /// How long to wait for the served side to catch up first (zero: do not wait).
    pub wait_ready: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            page_size: 1000,
            max_reported: 20,
            wait_ready: Duration::from_secs(60),
        }
    }
}

/// The outcome of a verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The truth's name.
    pub truth: String,
    /// The served side's name.
    pub served: String,
    /// Users on either side.
    pub users_checked: u64,
    /// Users in the truth.
    pub users_truth: u64,
    /// Users served.
    pub users_served: u64,
    /// Users with at least one mismatch.
    pub mismatched_users: u64,
    /// Every mismatch found.
    pub mismatch_count: u64,
    /// The first mismatches (up to [`VerifyOptions::max_reported`]).
    pub mismatches: Vec<Mismatch>,
    /// Consistency remarks.
    pub notes: Vec<String>,
    /// Live expenses in the truth, summed over users.
    pub expenses_truth: i64,
    /// The checks of alerts and converted totals, where the served side has them.
    pub reference: Option<reference::ReferenceReport>,
}

impl Report {
    /// True if both sides agree everywhere.
    pub fn is_ok(&self) -> bool {
        self.mismatch_count == 0
            && self
                .reference
                .as_ref()
                .is_none_or(|r| r.mismatch_count == 0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "spendflow verify: {} users checked ({} in {}, {} in {}), {} live expenses in {}",
            self.users_checked,
            self.users_truth,
            self.truth,
            self.users_served,
            self.served,
            self.expenses_truth,
            self.truth
        )?;
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        if self.mismatch_count == 0 {
            write!(
                f,
                "  0 mismatches: {} and {} agree",
                self.truth, self.served
            )?;
        } else {
            self.write_mismatches(f)?;
        }
        if let Some(reference) = &self.reference {
            reference.write(f, &self.truth, &self.served)?;
        }
        Ok(())
    }
}

impl Report {
    fn write_mismatches(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  {} mismatches in {} users; the first {}:",
            self.mismatch_count,
            self.mismatched_users,
            self.mismatches.len()
        )?;
        for (i, m) in self.mismatches.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "    {}", m.describe(&self.truth, &self.served))?;
        }
        Ok(())
    }
}

/// Compares the same range of users from both sides (each in increasing id order), adding to
/// `report`.
pub fn compare_users(
    truth: &[UserAggregates],
    served: &[UserAggregates],
    max_reported: usize,
    report: &mut Report,
) {
    let push = |report: &mut Report, m: Mismatch| {
        report.mismatch_count += 1;
        if report.mismatches.len() < max_reported {
            report.mismatches.push(m);
        }
    };
    let (mut t, mut s) = (truth.iter().peekable(), served.iter().peekable());
    loop {
        let (tu, su) = (t.peek(), s.peek());
        let (tu, su) = match (tu, su) {
            (None, None) => break,
            (Some(a), Some(b)) if a.user_id == b.user_id => (t.next(), s.next()),
            (Some(a), Some(b)) if a.user_id < b.user_id => (t.next(), None),
            (Some(_), None) => (t.next(), None),
            _ => (None, s.next()),
        };
        report.users_checked += 1;
        let before = report.mismatch_count;
        if let Some(tu) = tu {
            report.users_truth += 1;
            report.expenses_truth += tu.count;
        }
        if su.is_some() {
            report.users_served += 1;
        }
        match (tu, su) {
            (Some(tu), None) => push(
                report,
                Mismatch {
                    user_id: tu.user_id,
                    aspect: Aspect::MissingServed,
                    truth: Some((tu.count, tu.total_minor)),
                    served: None,
                },
            ),
            (None, Some(su)) => push(
                report,
                Mismatch {
                    user_id: su.user_id,
                    aspect: Aspect::MissingTruth,
                    truth: None,
                    served: Some((su.count, su.total_minor)),
                },
            ),
            (Some(tu), Some(su)) => {
                for m in compare_user(tu, su) {
                    push(report, m);
                }
            }
            (None, None) => {}
        }
        if report.mismatch_count > before {
            report.mismatched_users += 1;
        }
    }
}

/// Every difference between two views of one user.
pub fn compare_user(truth: &UserAggregates, served: &UserAggregates) -> Vec<Mismatch> {
    let user_id = truth.user_id;
    let mut out = Vec::new();
    let (t, s) = (
        (truth.count, truth.total_minor),
        (served.count, served.total_minor),
    );
    if t != s {
        out.push(Mismatch {
            user_id,
            aspect: Aspect::User,
            truth: Some(t),
            served: Some(s),
        });
    }
    diff_maps(
        &truth.by_category,
        &served.by_category,
        |c| Aspect::Category(c.clone()),
        user_id,
        &mut out,
    );
    diff_maps(
        &truth.by_month,
        &served.by_month,
        |m| Aspect::Month(*m),
        user_id,
        &mut out,
    );
    let month_count: i64 = served.by_month.values().map(|(c, _)| c).sum();
    let month_total: i64 = served.by_month.values().map(|(_, t)| t).sum();
    if (month_count, month_total) != s {
        out.push(Mismatch {
            user_id,
            aspect: Aspect::MonthsIncomplete,
            truth: Some(s),
            served: Some((month_count, month_total)),
        });
    }
    out
}

fn diff_maps<K: Ord>(
    truth: &BTreeMap<K, CountTotal>,
    served: &BTreeMap<K, CountTotal>,
    aspect: impl Fn(&K) -> Aspect,
    user_id: UserId,
    out: &mut Vec<Mismatch>,
) {
    let keys: std::collections::BTreeSet<&K> = truth.keys().chain(served.keys()).collect();
    for key in keys {
        let (t, s) = (truth.get(key).copied(), served.get(key).copied());
        if t != s {
            out.push(Mismatch {
                user_id,
                aspect: aspect(key),
                truth: t,
                served: s,
            });
        }
    }
}

/// Verifies `served` against `truth`, a page at a time (see the module docs).
///
/// # Errors
///
/// A backend failure, or [`VerifyError::NotReady`] if the served side does not catch up
/// within [`VerifyOptions::wait_ready`]. Mismatches are not errors: see [`Report::is_ok`].
pub fn verify(
    truth: &mut dyn Truth,
    served: &mut dyn Served,
    options: &VerifyOptions,
) -> Result<Report, VerifyError> {
    if options.page_size == 0 {
        return Err(VerifyError::Config(
            "the page size must be at least 1".into(),
        ));
    }
    if !options.wait_ready.is_zero() {
        served.wait_ready(options.wait_ready)?;
    }
    let months = truth.month_range()?;
    let mut report = Report {
        truth: truth.name().to_string(),
        served: served.name().to_string(),
        ..Report::default()
    };
    let mut after = None;
    loop {
        let page = served.next_page(options.page_size, months)?;
        let upto = match (page.more, page.users.last()) {
            (true, Some(last)) => Some(last.user_id),
            _ => None,
        };
        let truth_users = truth.users(after, upto)?;
        compare_users(&truth_users, &page.users, options.max_reported, &mut report);
        match upto {
            Some(upto) => after = Some(upto),
            None => break,
        }
    }
    report.notes = served.notes();
    let served_reference = served.reference()?;
    if let Some(served_reference) = &served_reference {
        let truth_reference = truth.reference(served_reference.reporting_currency.as_deref())?;
        report.reference = reference::compare(
            truth_reference.as_ref(),
            Some(served_reference),
            options.max_reported,
        );
    }
    Ok(report)
}
