//! The checks of what is joined with reference data (issue 16): the budget alerts fired now and
//! the totals converted to the reporting currency.
//!
//! * **Alerts**: the truth computes the fired set per `(user, month, threshold)` with SQL from
//!   `expenses` and `users.monthly_budget_minor` (the rule of
//!   `spendflow_operators::reference`: fired when `spend * 100 >= budget * threshold`, budget
//!   above 0, a month with at least one live expense); the served side lists
//!   `Alerts/ListAlerts`, every page. Each alert on one side only is a mismatch.
//! * **Converted totals**: the truth converts each user's total with the rate of the user's
//!   currency (`fx_rates`; the reporting currency at exactly 1), rounded half away from zero,
//!   in SQL with exact integer arithmetic; the served side is `TopSpenders` (up to its limit).
//!   Each served spender's amount must be the truth's, and the served amounts, in rank order,
//!   must be the truth's largest amounts in order (ties may list users in either order).
//!
//! * **Budgets**: each served user's `monthly_budget_minor` and `currency`
//!   (`ListUserSummaries`) against `users` (no row, `NULL` or a budget at or below 0: no
//!   budget, served as 0). `month_to_date_minor` is not compared: it depends on the server's
//!   clock at the moment it answers.
//!
//! Skipped, with a note, when MySQL has no `fx_rates` table (a database from before reference
//! data), when the engine serves no reference data (run without `--mysql-cdc`), and, for the
//! converted totals, when the engine has no reporting currency.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use spendflow_operators::UserId;

use crate::core::format_month;

/// One alert: `(user, month, threshold)`, the month as `year * 12 + month - 1`.
pub type AlertKey = (UserId, i32, u8);

/// What the truth says of reference data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReferenceTruth {
    /// The alerts fired now.
    pub fired: BTreeSet<AlertKey>,
    /// Each user's converted total (users with a live expense and a rate), if a reporting
    /// currency was asked for.
    pub converted: Option<BTreeMap<UserId, i128>>,
    /// Budget (0: none) and currency of each user with a row and a live expense.
    pub budgets: BTreeMap<UserId, (i64, String)>,
}

/// One spender of the served ranking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankedSpender {
    /// The user.
    pub user_id: UserId,
    /// The converted total.
    pub converted_minor: i64,
}

/// What the served side says of reference data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReferenceServed {
    /// The engine's reporting currency, if any.
    pub reporting_currency: Option<String>,
    /// False if the engine has no reference data at all (no currency known for any user, no
    /// alert): run without `--mysql-cdc`.
    pub has_reference: bool,
    /// The alerts fired now.
    pub fired: BTreeSet<AlertKey>,
    /// `TopSpenders` in rank order.
    pub ranking: Vec<RankedSpender>,
    /// The limit `TopSpenders` was asked with.
    pub limit: usize,
    /// Budget and currency of each served user (`0` and `""` when unknown).
    pub budgets: BTreeMap<UserId, (i64, String)>,
}

/// One difference in reference data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReferenceMismatch {
    /// An alert fired on one side only.
    Alert {
        /// The alert.
        key: AlertKey,
        /// Fired in the truth.
        truth: bool,
    },
    /// A served spender's converted total differs (`None`: the truth has none).
    Converted {
        /// The user.
        user_id: UserId,
        /// The truth's.
        truth: Option<i128>,
        /// The served.
        served: i64,
    },
    /// A user's budget or currency differs (`None`: the truth has no row for the user).
    Budget {
        /// The user.
        user_id: UserId,
        /// The truth's budget and currency.
        truth: Option<(i64, String)>,
        /// The served.
        served: (i64, String),
    },
    /// The amount at a rank differs (`None`: no one at that rank on that side).
    Rank {
        /// From 1.
        rank: usize,
        /// The truth's amount.
        truth: Option<i128>,
        /// The served amount.
        served: Option<i64>,
    },
}

impl ReferenceMismatch {
    /// The mismatch as a line, naming the two sides.
    pub fn describe(&self, truth: &str, served: &str) -> String {
        let said = |v: Option<String>| v.unwrap_or_else(|| "absent".into());
        match self {
            ReferenceMismatch::Alert { key, truth: fired } => {
                let (user, month, pct) = key;
                let (yes, no) = if *fired {
                    (truth, served)
                } else {
                    (served, truth)
                };
                format!(
                    "user {user} alert {} {pct}%: fired in {yes}, not in {no}",
                    format_month(*month)
                )
            }
            ReferenceMismatch::Converted {
                user_id,
                truth: t,
                served: s,
            } => format!(
                "user {user_id} converted total: {truth} {} | {served} {s}",
                said(t.map(|t| t.to_string()))
            ),
            ReferenceMismatch::Budget {
                user_id,
                truth: t,
                served: s,
            } => format!(
                "user {user_id} budget: {truth} {} | {served} {} {:?}",
                said(t.as_ref().map(|(b, c)| format!("{b} {c:?}"))),
                s.0,
                s.1
            ),
            ReferenceMismatch::Rank {
                rank,
                truth: t,
                served: s,
            } => format!(
                "converted ranking, rank {rank}: {truth} {} | {served} {}",
                said(t.map(|t| t.to_string())),
                said(s.map(|s| s.to_string()))
            ),
        }
    }
}

/// The outcome of the reference checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReferenceReport {
    /// Alerts on either side, when they were compared.
    pub alerts_checked: Option<u64>,
    /// Spenders compared, when converted totals were.
    pub spenders_checked: Option<u64>,
    /// Users whose budget and currency were compared.
    pub budgets_checked: Option<u64>,
    /// Every mismatch found.
    pub mismatch_count: u64,
    /// The first mismatches.
    pub mismatches: Vec<ReferenceMismatch>,
    /// Why a check was skipped.
    pub notes: Vec<String>,
}

impl ReferenceReport {
    fn push(&mut self, m: ReferenceMismatch, max_reported: usize) {
        self.mismatch_count += 1;
        if self.mismatches.len() < max_reported {
            self.mismatches.push(m);
        }
    }

    /// Writes the report's lines (after the user checks' report).
    pub fn write(&self, f: &mut fmt::Formatter<'_>, truth: &str, served: &str) -> fmt::Result {
        if let Some(n) = self.alerts_checked {
            write!(f, "\n  alerts: {n} fired alerts checked")?;
        }
        if let Some(n) = self.spenders_checked {
            write!(f, "\n  converted totals: {n} ranked spenders checked")?;
        }
        if let Some(n) = self.budgets_checked {
            write!(f, "\n  budgets: {n} users' budget and currency checked")?;
        }
        for note in &self.notes {
            write!(f, "\n  note: {note}")?;
        }
        if self.mismatch_count > 0 {
            write!(
                f,
                "\n  {} mismatches in alerts and converted totals; the first {}:",
                self.mismatch_count,
                self.mismatches.len()
            )?;
            for m in &self.mismatches {
                write!(f, "\n    {}", m.describe(truth, served))?;
            }
        }
        Ok(())
    }
}

/// Compares the fired sets.
pub fn compare_alerts(
    truth: &BTreeSet<AlertKey>,
    served: &BTreeSet<AlertKey>,
    max_reported: usize,
    report: &mut ReferenceReport,
) {
    report.alerts_checked = Some(truth.union(served).count() as u64);
    for key in truth.symmetric_difference(served) {
        report.push(
            ReferenceMismatch::Alert {
                key: *key,
                truth: truth.contains(key),
            },
            max_reported,
        );
    }
}

/// Compares each served user's budget and currency with the truth's.
pub fn compare_budgets(
    truth: &BTreeMap<UserId, (i64, String)>,
    served: &BTreeMap<UserId, (i64, String)>,
    max_reported: usize,
    report: &mut ReferenceReport,
) {
    report.budgets_checked = Some(served.len() as u64);
    for (user_id, (budget, currency)) in served {
        let t = truth.get(user_id).map(|(b, c)| ((*b).max(0), c.clone()));
        let s = ((*budget).max(0), currency.clone());
        if t.clone().unwrap_or((0, String::new())) != s {
            report.push(
                ReferenceMismatch::Budget {
                    user_id: *user_id,
                    truth: t,
                    served: s,
                },
                max_reported,
            );
        }
    }
}

/// Compares the served ranking with the truth's converted totals.
pub fn compare_converted(
    truth: &BTreeMap<UserId, i128>,
    ranking: &[RankedSpender],
    limit: usize,
    max_reported: usize,
    report: &mut ReferenceReport,
) {
    report.spenders_checked = Some(ranking.len() as u64);
    for s in ranking {
        let t = truth.get(&s.user_id).copied();
        if t != Some(i128::from(s.converted_minor)) {
            report.push(
                ReferenceMismatch::Converted {
                    user_id: s.user_id,
                    truth: t,
                    served: s.converted_minor,
                },
                max_reported,
            );
        }
    }
    let mut amounts: Vec<i128> = truth.values().copied().collect();
    amounts.sort_unstable_by(|a, b| b.cmp(a));
    // A full page ranks the top `limit`; a shorter one must rank everyone.
    let ranked = if ranking.len() >= limit {
        limit.min(amounts.len())
    } else {
        amounts.len()
    };
    for rank in 0..ranked.max(ranking.len()) {
        let (t, s) = (
            amounts.get(rank).copied().filter(|_| rank < ranked),
            ranking.get(rank).map(|s| s.converted_minor),
        );
        if t != s.map(i128::from) {
            report.push(
                ReferenceMismatch::Rank {
                    rank: rank + 1,
                    truth: t,
                    served: s,
                },
                max_reported,
            );
        }
    }
}

/// Runs the reference checks of `truth` (`None`: MySQL has no `fx_rates` table) against
/// `served` (`None`: the served side has no alerts or conversion, e.g. Cassandra).
pub fn compare(
    truth: Option<&ReferenceTruth>,
    served: Option<&ReferenceServed>,
    max_reported: usize,
) -> Option<ReferenceReport> {
    let served = served?;
    let mut report = ReferenceReport::default();
    let Some(truth) = truth else {
        report.notes.push(
            "alerts and converted totals not checked: MySQL has no fx_rates table (no reference data)"
                .into(),
        );
        return Some(report);
    };
    if !served.has_reference {
        report.notes.push(
            "alerts and converted totals not checked: the engine serves no reference data (run it with --mysql-cdc)"
                .into(),
        );
        return Some(report);
    }
    compare_alerts(&truth.fired, &served.fired, max_reported, &mut report);
    compare_budgets(&truth.budgets, &served.budgets, max_reported, &mut report);
    match (&served.reporting_currency, &truth.converted) {
        (Some(_), Some(converted)) => compare_converted(
            converted,
            &served.ranking,
            served.limit,
            max_reported,
            &mut report,
        ),
        _ => report.notes.push(
            "converted totals not checked: the engine has no reporting currency (--reporting-currency)"
                .into(),
        ),
    }
    Some(report)
}

/// `round_half_away_from_zero(total * rate_micros / 1_000_000)`, the conversion rule (for
/// tests of the SQL's result).
pub fn convert(total_minor: i128, rate_micros: i64) -> i128 {
    let p = total_minor * i128::from(rate_micros);
    let (q, r) = (p / 1_000_000, p % 1_000_000);
    if r.abs() * 2 >= 1_000_000 {
        q + r.signum()
    } else {
        q
    }
}
