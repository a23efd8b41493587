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
