//! The expense model: what a record says, and what the dataflow keeps of it.
//!
//! Three shapes, from the wire inwards:
//!
//! * [`Record`] is one decoded input record (JSON v1): an upsert carrying a full [`Expense`], or a
//!   delete carrying only the ids. It is what sources produce and what the upsert stage consumes.
//! * [`Fact`] is the part of a live expense the aggregates need: user, category, merchant,
//!   amount and event time. The upsert stage keeps one `Fact` per live `expense_id` and turns
//!   each record into `(-old, +new)` changes of facts.
//! * [`LiveFact`] is what the upsert stage keeps per live expense, beside its key
//!   `(user_id, `[`ExpenseId`]`)`: a `Fact` without the user (the key has it), 32 bytes.
//! * [`AggKey`] names one aggregate cell (a user's total, a user's category, a user's day, ...).
//!   Every fact contributes `(count = 1, sum = amount)` to a handful of cells; those
//!   contributions are the differences the dataflow accumulates.
//!
//! Money is always an `i64` count of minor units. No float appears anywhere in this crate.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::id::{ExpenseId, ExpenseIdError};
pub use crate::name::Name;

/// Largest absolute amount a record may carry, in minor units (10^12, ten billion in major units).
pub const MAX_ABS_AMOUNT_MINOR: i64 = 1_000_000_000_000;

/// Milliseconds in a UTC day. Day buckets are `floor(event_ms / MS_PER_DAY)`.
pub const MS_PER_DAY: i64 = 86_400_000;

/// A user id: an integer in `1..=i64::MAX - 1`, kept unsigned because it is never negative.
pub type UserId = u64;

/// A card expense as the contract defines it (JSON v1), after validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expense {
    /// The expense's identity: later records with the same id replace it. Exact, inline
    /// (no heap) up to [`ExpenseId::INLINE`] bytes, at most [`ExpenseId::MAX_LEN`]: see [`crate::id`].
    pub expense_id: ExpenseId,
    /// The user the expense belongs to.
    pub user_id: UserId,
    /// The card used, if the producer says.
    pub card_id: Option<String>,
    /// Merchant name, 1 to 64 characters.
    pub merchant: Arc<str>,
    /// Spending category, 1 to 64 characters.
    pub category: Arc<str>,
    /// Amount in minor units (cents); negative for a refund.
    pub amount_minor: i64,
    /// ISO 4217 code, three uppercase ASCII letters.
    pub currency: [u8; 3],
    /// Event time in milliseconds since the Unix epoch, UTC.
    pub event_ms: i64,
}

impl Expense {
    /// The currency as a `&str` (always ASCII, validated on decode).
    pub fn currency_str(&self) -> &str {
        std::str::from_utf8(&self.currency).unwrap_or("???")
    }

    /// The part of the expense the aggregates need.
    pub fn fact(&self) -> Fact {
        Fact {
            user_id: self.user_id,
            category: Name::intern(&self.category).0,
            merchant: Name::intern(&self.merchant).0,
            amount_minor: self.amount_minor,
            event_ms: self.event_ms,
        }
    }
}

/// One decoded input record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// Insert the expense, or replace the live expense with the same `expense_id`.
    Upsert(Expense),
    /// Remove the live expense with this `expense_id`, if there is one.
    Delete {
        /// The expense to remove.
        expense_id: ExpenseId,
        /// The user it belongs to (used for routing checks, e.g. per-user topics).
        user_id: UserId,
    },
}

impl Record {
    /// The `expense_id` the record is about.
    pub fn expense_id(&self) -> &str {
        match self {
            Record::Upsert(e) => e.expense_id.as_str(),
            Record::Delete { expense_id, .. } => expense_id.as_str(),
        }
    }

    /// The user the record names.
    pub fn user_id(&self) -> UserId {
        match self {
            Record::Upsert(e) => e.user_id,
            Record::Delete { user_id, .. } => *user_id,
        }
    }
}

/// What the aggregates keep of a live expense: small and `Copy`, no strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fact {
    /// The owning user.
    pub user_id: UserId,
    /// Spending category.
    pub category: Name,
    /// Merchant name.
    pub merchant: Name,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Event time, milliseconds since the Unix epoch (UTC).
    pub event_ms: i64,
}

impl Fact {
    /// The UTC day of the event, as days since 1970-01-01.
    pub fn day(&self) -> i32 {
        day_of(self.event_ms)
    }

    /// The UTC month of the event, as `year * 12 + (month - 1)`.
    pub fn month(&self) -> i32 {
        month_of_day(self.day())
    }

    /// The aggregate cells this fact contributes `(1, amount)` to.
    pub fn cells(&self) -> [AggKey; 5] {
        let user = self.user_id;
        let day = self.day();
        [
            AggKey::User(user),
            AggKey::Category(user, self.category),
            AggKey::Merchant(user, self.merchant),
            AggKey::Day(user, day),
            AggKey::Month(user, month_of_day(day)),
        ]
    }
}

/// What the upsert stage keeps of a live expense, beside its key `(user_id, expense_id)`: the
/// [`Fact`] without the user, 32 bytes, `Copy`, no strings (names are interned ids). Day and
/// month are computed from `event_ms` when the cells are (cheap, and `event_ms` is needed for the
/// user's last event time anyway).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LiveFact {
    /// Spending category.
    pub category: Name,
    /// Merchant name.
    pub merchant: Name,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Event time, milliseconds since the Unix epoch (UTC).
    pub event_ms: i64,
}

impl LiveFact {
    /// The fact of `user_id`'s expense.
    pub fn of(self, user_id: UserId) -> Fact {
        Fact {
            user_id,
            category: self.category,
            merchant: self.merchant,
            amount_minor: self.amount_minor,
            event_ms: self.event_ms,
        }
    }
}

impl From<Fact> for LiveFact {
    fn from(fact: Fact) -> Self {
        LiveFact {
            category: fact.category,
            merchant: fact.merchant,
            amount_minor: fact.amount_minor,
            event_ms: fact.event_ms,
        }
    }
}

/// One aggregate cell. The dataflow accumulates a [`CountSum`] per cell.
///
/// All cells of a user hash to the same value (`Hash` looks only at the user id), so the
/// arrangement that holds them exchanges data by user: with N workers each worker owns a share
/// of the users and every aggregate of a user lives on one worker. `Eq` and `Ord` still compare
/// every field, which `Hash` allows (equal keys hash equally).
///
/// A user's last event time is not a cell: it is no sum, so it is kept apart (see
/// `aggregate::LastSeenByUser`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AggKey {
    /// The user's total and count.
    User(UserId),
    /// The user's total and count in one category.
    Category(UserId, Name),
    /// The user's total and count at one merchant.
    Merchant(UserId, Name),
    /// The user's total and count on one UTC day (days since 1970-01-01).
    Day(UserId, i32),
    /// The user's total and count in one UTC month (`year * 12 + month - 1`).
    Month(UserId, i32),
}

impl AggKey {
    /// The user the cell belongs to.
    pub fn user_id(&self) -> UserId {
        match self {
            AggKey::User(u)
            | AggKey::Category(u, _)
            | AggKey::Merchant(u, _)
            | AggKey::Day(u, _)
            | AggKey::Month(u, _) => *u,
        }
    }
}

/// The worker (of `peers`, cluster-wide) that owns `user`: its cells, alerts, reference row and
/// last-seen times all live there, because every stage that keeps per-user state exchanges by
/// this same hash (differential's `Hashable` of [`AggKey::User`], which hashes the user only).
/// A deterministic function of the user, so every process of a cluster derives the same owner
/// (queries are forwarded with it).
pub fn owner_worker(user: UserId, peers: usize) -> usize {
    use differential_dataflow::Hashable;
    let peers = peers.max(1) as u64;
    // Timely's exchange takes `hash & (peers - 1)` for a power of two, `hash % peers`
    // otherwise: the same number.
    (AggKey::User(user).hashed() % peers) as usize
}

impl Hash for AggKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Only the user: see the type's docs for why.
        self.user_id().hash(state);
    }
}

/// A `(count, sum)` pair: the difference type of the aggregates, and their accumulated value.
pub type CountSum = (i64, i64);

/// The change of one aggregate cell's `(count, sum)` over some interval of epochs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellChange {
    /// The cell.
    pub key: AggKey,
    /// Change in the number of live expenses.
    pub count: i64,
    /// Change in the sum of their amounts, minor units.
    pub sum: i64,
}

/// A user's last event time changed: the newest `event_time` among their live expenses, or
/// `None` when they have no live expense left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastSeen {
    /// The user.
    pub user_id: UserId,
    /// Milliseconds since the Unix epoch, or `None`.
    pub event_ms: Option<i64>,
}

/// The UTC day of a millisecond timestamp, as days since 1970-01-01.
pub fn day_of(event_ms: i64) -> i32 {
    event_ms.div_euclid(MS_PER_DAY) as i32
}

/// The month bucket (`year * 12 + month - 1`) of a day number.
pub fn month_of_day(day: i32) -> i32 {
    let (y, m, _) = civil_from_days(day);
    y * 12 + (m as i32 - 1)
}

/// `(year, month 1..=12, day 1..=31)` of a day number (days since 1970-01-01), proleptic
/// Gregorian. Howard Hinnant's `civil_from_days`, exact for every `i32` day we accept.
pub fn civil_from_days(z: i32) -> (i32, u32, u32) {
    let z = z as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    ((if m <= 2 { y + 1 } else { y }) as i32, m, d)
}

/// Day number (days since 1970-01-01) of a civil date; the inverse of [`civil_from_days`].
pub fn days_from_civil(y: i32, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y as i64 - 1 } else { y as i64 };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) as i32
}

/// Splits a month bucket into `(year, month 1..=12)`.
pub fn split_month(month: i32) -> (i32, u32) {
    (month.div_euclid(12), month.rem_euclid(12) as u32 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        for day in (-800_000..800_000).step_by(37) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day, "day {day} -> {y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(days_from_civil(2026, 1, 1), 56 * 365 + 14);
        assert_eq!(days_from_civil(2026, 11, 24), 20_781);
    }

    #[test]
    fn day_and_month_buckets_use_utc_floor() {
        // 2026-11-24T23:59:59.999Z and one millisecond later.
        let before = days_from_civil(2026, 11, 24) as i64 * MS_PER_DAY + MS_PER_DAY - 1;
        assert_eq!(day_of(before), days_from_civil(2026, 11, 24));
        assert_eq!(day_of(before + 1), days_from_civil(2026, 11, 25));
        assert_eq!(day_of(-1), -1);
        assert_eq!(
            split_month(month_of_day(days_from_civil(2026, 11, 30))),
            (2026, 11)
        );
        assert_eq!(
            split_month(month_of_day(days_from_civil(2026, 12, 1))),
            (2026, 12)
        );
        assert_eq!(split_month(month_of_day(-1)), (1969, 12));
    }
}
