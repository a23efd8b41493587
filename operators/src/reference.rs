//! Reference data joined with the expenses: each user's monthly budget and currency (MySQL's
//! `users` table) and exchange rates (`fx_rates`), and what is derived from them: budget alerts
//! and totals in one reporting currency.
//!
//! Reference data enters the dataflow as [`RefChange`]s in source order (a CDC reader or the
//! simulator, read by one worker): set or remove the row of a key, last write wins. The dataflow
//! keeps the current row per key, joins users' rows with their month cells (alerts) and their
//! totals (conversion), and reports per closed epoch, beside the cell changes:
//!
//! * [`UserRef`] changes: a user's budget and currency as they now are;
//! * [`AlertEvent`]s: a `(user, month, threshold)` alert changed state (fired or cleared);
//! * [`Converted`] changes: a user's total in the reporting currency.
//!
//! # How it works
//!
//! The operators are in [`crate::enrich`]; this module has the types and the rules.
//!
//! * **Rows.** [`RefChange`]s enter through a second input
//!   ([`crate::ExpenseDataflow::push_reference`]), are exchanged to the key's owner and applied
//!   epoch by epoch in arrival order, last write wins (the expense upsert's scheme, and for
//!   its reason: differential's upsert arrangement would keep an epoch's *greatest* value).
//!   Only a row that differs at the end of an epoch from its start is a change: a row set and
//!   reset within an epoch reports nothing. A user's row is owned by the worker that owns the
//!   user's aggregate cells, so the join below needs no further exchange for users; a
//!   checkpoint copies each row from its owner, so it holds every row once.
//! * **Alerts.** Fed the changes of users' month and total cells straight from the cell
//!   arrangement (no second aggregation: the arrangement's output already is the per-epoch
//!   change of those sums), the join keeps each user's month sums, row and fired alerts, and at
//!   each closed epoch re-evaluates the rule for the months the epoch touched (all months of a
//!   user whose row changed) and reports only the changes of the fired set. Event values are
//!   those at the end of the epoch: the engine publishes epochs, never states inside one.
//! * **Conversion.** With [`DataflowOptions::reporting_currency`], the same join converts the
//!   total of every user whose total, row or rate changed, and reports it if it differs from
//!   what it last reported. Rates are few: each is broadcast to every worker.
//! * **Restore.** A restored dataflow starts from nothing: the rows and live expenses pushed
//!   in the restore epoch come out as changes of that epoch, so alerts fired at the
//!   checkpoint are `Fired` events of the restore epoch (outputs that already published them
//!   know that epoch and can tell a re-fire from a new one).
//!
//! # Alert rule
//!
//! For every user with a budget `b > 0` and every UTC month `m` of `event_time` in which the
//! user has at least one live expense, with `s` the sum of those expenses' amounts (minor
//! units, the user's currency), the alert `(user, m, t)` for `t` in [`THRESHOLDS_PCT`] is
//! *fired* when `s * 100 >= b * t` (integer arithmetic, 128 bits) and *cleared* otherwise. A user
//! without a budget (no row, `NULL`, or `b <= 0`) has no alert. An alert that is cleared and was
//! never fired is never reported: events are the changes of the set of fired alerts.
//!
//! # Conversion rule
//!
//! A rate is `rate_micros` reporting-currency micro-units per unit of `currency`, applied to
//! minor units as they are (the currencies spendflow handles all have two decimals). A user's
//! converted total is `round_half_away_from_zero(total_minor * rate_micros / 1_000_000)` with
//! 128-bit intermediates. The reporting currency itself converts at exactly 1 (rate
//! `1_000_000`) whether or not `fx_rates` lists it; a user whose currency has no rate has no
//! converted total (and is left out of the converted ranking).

use serde::{Deserialize, Serialize};

use crate::model::UserId;

/// An ISO 4217 code, three uppercase ASCII letters.
pub type Currency = [u8; 3];

/// The alert thresholds, in percent of the monthly budget.
pub const THRESHOLDS_PCT: [u8; 2] = [80, 100];

/// Micro-units in one unit: rates are fixed-point with six decimals.
pub const RATE_ONE: i64 = 1_000_000;

/// The key of one reference row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RefKey {
    /// A row of `users`.
    User(UserId),
    /// A row of `fx_rates`.
    Fx(Currency),
}

/// The value of one reference row (the columns the dataflow uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RefValue {
    /// `users`: the monthly budget (`None` for SQL `NULL`) and the currency of the user's
    /// expenses.
    User {
        /// Monthly budget in minor units of `currency`.
        budget_minor: Option<i64>,
        /// The user's currency.
        currency: Currency,
    },
    /// `fx_rates`: reporting-currency micro-units per unit of the key's currency.
    Fx {
        /// The rate, fixed-point with six decimals.
        rate_micros: i64,
    },
}

/// One change of reference data: set (`Some`) or remove (`None`) the row of `key`. Changes of
/// one key must be pushed in source order; the last one of an epoch wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RefChange {
    /// The row.
    pub key: RefKey,
    /// Its new value, or `None` when the row was deleted.
    pub value: Option<RefValue>,
}

/// A user's reference row as it now is (`None` fields: no row).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserRef {
    /// The user.
    pub user_id: UserId,
    /// The user's row, or `None` if the row was removed.
    pub row: Option<UserRow>,
}

/// The columns of a `users` row the dataflow uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserRow {
    /// Monthly budget in minor units of `currency`, if set.
    pub budget_minor: Option<i64>,
    /// The user's currency.
    pub currency: Currency,
}

/// The state an alert moved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AlertState {
    /// Spend reached the threshold.
    Fired,
    /// Spend fell back under the threshold, or the budget went up or away.
    Cleared,
}

impl AlertState {
    /// `"fired"` or `"cleared"`, as the alerts topic and the API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Fired => "fired",
            AlertState::Cleared => "cleared",
        }
    }
}

/// One alert changed state in a closed epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AlertEvent {
    /// The user.
    pub user_id: UserId,
    /// The UTC month of `event_time`, as `year * 12 + month - 1` (see `model::split_month`).
    pub month: i32,
    /// The threshold, one of [`THRESHOLDS_PCT`].
    pub threshold_pct: u8,
    /// The state it moved to.
    pub state: AlertState,
    /// The month's spend at the end of the epoch, minor units (0 when the month has no live
    /// expense left).
    pub spent_minor: i128,
    /// The budget at the end of the epoch, minor units (0 when the user has no budget left).
    pub budget_minor: i64,
    /// The user's currency at the end of the epoch (`*b"???"` when the user has no row left).
    pub currency: Currency,
}

/// A user's total in the reporting currency changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Converted {
    /// The user.
    pub user_id: UserId,
    /// The new converted total in minor units of the reporting currency, or `None` when it can
    /// no longer be converted (no live expense, no row, or no rate for the user's currency).
    pub total_minor: Option<i128>,
}

/// An exchange rate changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RateChange {
    /// The currency converted from.
    pub currency: Currency,
    /// Reporting-currency micro-units per unit of `currency`, or `None` when the row was
    /// removed.
    pub rate_micros: Option<i64>,
}

/// Options of the dataflow that do not change while it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataflowOptions {
    /// The currency totals are converted to; `None`: no conversion (no [`Converted`] output).
    pub reporting_currency: Option<Currency>,
}

impl RefValue {
    /// The user row this value is, if it is one.
    pub fn user_row(self) -> Option<UserRow> {
        match self {
            RefValue::User {
                budget_minor,
                currency,
            } => Some(UserRow {
                budget_minor,
                currency,
            }),
            RefValue::Fx { .. } => None,
        }
    }

    /// The rate this value is, if it is one.
    pub fn rate_micros(self) -> Option<i64> {
        match self {
            RefValue::Fx { rate_micros } => Some(rate_micros),
            RefValue::User { .. } => None,
        }
    }
}

impl UserRow {
    /// The budget alerts are computed against: `Some(b)` only for a set budget `b > 0` (see
    /// the alert rule).
    pub fn effective_budget(&self) -> Option<i64> {
        self.budget_minor.filter(|b| *b > 0)
    }
}

/// The currency an [`AlertEvent`] reports for a user without a row.
pub const UNKNOWN_CURRENCY: Currency = *b"???";

/// The alert rule: is `(month, threshold_pct)` fired for a month whose live expenses sum to
/// `spent_minor` (`None`: no live expense in the month), under `budget` (`None`: no budget)?
pub fn alert_fired(spent_minor: Option<i128>, budget: Option<i64>, threshold_pct: u8) -> bool {
    match (spent_minor, budget) {
        (Some(spent), Some(budget)) if budget > 0 => {
            spent * 100 >= i128::from(budget) * i128::from(threshold_pct)
        }
        _ => false,
    }
}

/// The rate a user's total in `currency` converts at into `reporting`: exactly [`RATE_ONE`]
/// for the reporting currency itself, otherwise the rate `rates` has for it, if any.
pub fn rate_for(
    currency: Currency,
    reporting: Currency,
    rates: impl FnOnce(&Currency) -> Option<i64>,
) -> Option<i64> {
    if currency == reporting {
        Some(RATE_ONE)
    } else {
        rates(&currency)
    }
}

/// The conversion rule: `total_minor * rate_micros / RATE_ONE`, rounded half away from zero,
/// in 128 bits (an `i64` total times an `i64` rate cannot overflow it).
pub fn convert(total_minor: i128, rate_micros: i64) -> i128 {
    let product = total_minor * i128::from(rate_micros);
    let one = i128::from(RATE_ONE);
    let (quotient, remainder) = (product / one, product % one);
    if remainder.abs() * 2 >= one {
        quotient + product.signum()
    } else {
        quotient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_rounds_half_away_from_zero() {
        // 0.5 minor units either way rounds away from zero; just under half rounds to zero.
        assert_eq!(convert(1, 500_000), 1);
        assert_eq!(convert(-1, 500_000), -1);
        assert_eq!(convert(1, 499_999), 0);
        assert_eq!(convert(-1, 499_999), 0);
        assert_eq!(convert(3, 1_500_000), 5); // 4.5
        assert_eq!(convert(-3, 1_500_000), -5);
        assert_eq!(convert(12_345, RATE_ONE), 12_345);
        assert_eq!(convert(0, 1_234_567), 0);
        // No overflow at the extremes of i64.
        assert_eq!(
            convert(i128::from(i64::MAX), i64::MAX),
            (i128::from(i64::MAX) * i128::from(i64::MAX) + 500_000) / 1_000_000
        );
    }

    #[test]
    fn alert_threshold_is_inclusive_and_needs_a_positive_budget() {
        assert!(alert_fired(Some(800), Some(1_000), 80));
        assert!(!alert_fired(Some(799), Some(1_000), 80));
        assert!(alert_fired(Some(1_000), Some(1_000), 100));
        assert!(!alert_fired(Some(999), Some(1_000), 100));
        assert!(!alert_fired(None, Some(1_000), 80));
        assert!(!alert_fired(Some(5), Some(0), 80));
        assert!(!alert_fired(Some(5), Some(-10), 80));
        assert!(!alert_fired(Some(5), None, 80));
        // A month with live expenses that sum to zero or less fires nothing on a positive budget.
        assert!(!alert_fired(Some(0), Some(1), 80));
        assert!(!alert_fired(Some(-5), Some(1), 80));
        // 128 bits: no overflow near the i64 limits.
        assert!(alert_fired(Some(i128::from(i64::MAX)), Some(i64::MAX), 100));
    }

    #[test]
    fn the_reporting_currency_converts_at_one_without_a_row() {
        let rates = |_: &Currency| None;
        assert_eq!(rate_for(*b"EUR", *b"EUR", rates), Some(RATE_ONE));
        assert_eq!(rate_for(*b"USD", *b"EUR", rates), None);
        assert_eq!(rate_for(*b"EUR", *b"EUR", |_| Some(7)), Some(RATE_ONE));
        assert_eq!(rate_for(*b"USD", *b"EUR", |_| Some(7)), Some(7));
    }
}
