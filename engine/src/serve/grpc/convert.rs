//! Request validation and conversions between the read model and `spendflow.v1` messages.
//!
//! Every validation error is `INVALID_ARGUMENT` with a message that names the field, says what
//! is allowed and what was sent, so a client can fix the request without reading the server.

use std::time::Duration;

use spendflow_operators::model::days_from_civil;
use spendflow_operators::{AggKey, Epoch, UserId};
use spendflow_proto::v1 as pb;
use tonic::Status;

use super::backend::{Amount, SummaryData, Wait, largest_first};
use crate::serve::read_model::{AsOf, CellValue, format_day, format_month};

/// Longest read-your-writes wait a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// Wait used when a request sets `min_epoch` without a timeout.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

pub fn as_of(as_of: &AsOf) -> pb::AsOf {
    pb::AsOf {
        epoch: as_of.epoch,
        positions: as_of
            .positions
            .iter()
            .map(|p| pb::SourcePosition {
                source: p.source.to_string(),
                partition: p.partition,
                offset: p.position,
            })
            .collect(),
        incarnation: as_of.incarnation.to_string(),
    }
}

pub fn user_id(user_id: u64) -> Result<UserId, Status> {
    if user_id == 0 || user_id > i64::MAX as u64 {
        return Err(Status::invalid_argument(format!(
            "user_id must be from 1 to {}, got {user_id}",
            i64::MAX
        )));
    }
    Ok(user_id)
}

/// `(min_epoch, wait)` of a request's consistency setting. `incarnation` is the server's: a
/// `min_epoch` of another incarnation fails with `FAILED_PRECONDITION`.
pub fn consistency(
    c: Option<&pb::Consistency>,
    incarnation: &str,
    latest: Option<Epoch>,
) -> Result<(Epoch, Duration), Status> {
    let Some(c) = c else {
        return Ok((0, Duration::ZERO));
    };
    let wait = match c.timeout_ms {
        0 => DEFAULT_WAIT,
        ms => Duration::from_millis(ms.into()),
    };
    if wait > MAX_WAIT {
        return Err(Status::invalid_argument(format!(
            "consistency.timeout_ms must be at most {}, got {}",
            MAX_WAIT.as_millis(),
            c.timeout_ms
        )));
    }
    if c.min_epoch > 0 && !c.incarnation.is_empty() && c.incarnation != incarnation {
        let latest = latest.map_or_else(|| "none yet".to_string(), |e| e.to_string());
        return Err(Status::failed_precondition(format!(
            "consistency.min_epoch {} is of incarnation {:?}, but the server now runs              incarnation {incarnation:?} (its epochs started over; latest epoch: {latest});              read again without min_epoch and use the new as_of",
            c.min_epoch, c.incarnation
        )));
    }
    Ok((c.min_epoch, wait))
}

/// A count limit: 0 means `default`, above `max` is an error naming `field`.
pub fn limit(value: u32, default: u32, max: u32, field: &str) -> Result<usize, Status> {
    match value {
        0 => Ok(default as usize),
        v if v > max => Err(Status::invalid_argument(format!(
            "{field} must be at most {max}, got {v}"
        ))),
        v => Ok(v as usize),
    }
}

/// Totals in answer order ([`largest_first`]); `OUT_OF_RANGE` naming the user and cell (`what`
/// and the key) if a sum does not fit `int64`.
fn totals(
    mut entries: Vec<(String, Amount)>,
    user: UserId,
    what: &str,
) -> Result<Vec<pb::Total>, Status> {
    largest_first(&mut entries);
    entries
        .into_iter()
        .map(|(key, (count, sum))| {
            Ok(pb::Total {
                total_minor: i64::try_from(sum)
                    .or_else(|_| fit(sum, user, &format!("{what} {key:?}")))?,
                key,
                expense_count: count,
            })
        })
        .collect()
}

/// The answer for one user's summary, whichever backend read it; `OUT_OF_RANGE` naming the
/// user and cell if a sum does not fit `int64`.
pub fn summary(user: SummaryData) -> Result<pb::UserSummary, Status> {
    let id = user.user_id;
    Ok(pb::UserSummary {
        user_id: id,
        total_minor: fit(user.total_minor, id, "user total")?,
        expense_count: user.expense_count,
        by_category: totals(user.by_category, id, "category")?,
        by_merchant: totals(user.by_merchant, id, "merchant")?,
        last_event_time: user
            .last_event_ms
            .map(spendflow_operators::decode::format_event_time)
            .unwrap_or_default(),
        last_event_ms: user.last_event_ms.unwrap_or(0),
        monthly_budget_minor: user.monthly_budget_minor.unwrap_or(0),
        month_to_date_minor: fit(user.month_to_date_minor, id, "month to date")?,
        currency: user.currency.map(currency).unwrap_or_default(),
    })
}

/// An ISO 4217 code as text.
pub fn currency(code: [u8; 3]) -> String {
    String::from_utf8_lossy(&code).into_owned()
}

/// `DEADLINE_EXCEEDED` for a read-your-writes wait that ran out: `latest` is the newest epoch
/// the backend has (`what`: published, committed ...).
pub fn epoch_not_reached(wait: Wait, latest: Option<Epoch>, what: &str) -> Status {
    let latest = latest.map_or_else(|| "none yet".to_string(), |e| e.to_string());
    Status::deadline_exceeded(format!(
        "epoch {} was not {what} within {} ms (latest: {latest}); retry or raise consistency.timeout_ms",
        wait.min_epoch,
        wait.timeout.as_millis(),
    ))
}

/// A 128-bit sum of the read model as the wire's `int64`: `OUT_OF_RANGE` naming the user and
/// cell if it does not fit (never a truncated value).
pub fn fit(sum: i128, user: UserId, cell: &str) -> Result<i64, Status> {
    i64::try_from(sum).map_err(|_| {
        Status::out_of_range(format!(
            "the total of user {user}'s {cell} is {sum} minor units, outside the 64-bit range \
             of total_minor; it cannot be sent exactly (the web API shows it)"
        ))
    })
}

/// A cell as sent to subscribers; `OUT_OF_RANGE` if its sum does not fit `int64`.
pub fn cell(value: &CellValue) -> Result<pb::Cell, Status> {
    let total_minor = fit(
        value.sum,
        value.key.user_id(),
        &crate::core::describe_cell(&value.key),
    )?;
    let (kind, key) = match &value.key {
        AggKey::User(_) => (pb::CellKind::User, String::new()),
        AggKey::Category(_, name) => (pb::CellKind::Category, name.text().to_string()),
        AggKey::Merchant(_, name) => (pb::CellKind::Merchant, name.text().to_string()),
        AggKey::Day(_, day) => (pb::CellKind::Day, format_day(*day)),
        AggKey::Month(_, month) => (pb::CellKind::Month, format_month(*month)),
    };
    Ok(pb::Cell {
        user_id: value.key.user_id(),
        kind: kind.into(),
        key,
        total_minor,
        expense_count: value.count,
        removed: value.removed(),
        last_event_time: value
            .last_event_ms
            .map(spendflow_operators::decode::format_event_time)
            .unwrap_or_default(),
    })
}

/// Parses `YYYY-MM-DD` into a day number.
pub fn parse_day(text: &str, field: &str) -> Result<i32, Status> {
    let bad = || {
        Status::invalid_argument(format!(
            "{field} must be a date like 2026-11-24 for day windows, got {text:?}"
        ))
    };
    let date = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| bad())?;
    use chrono::Datelike;
    Ok(days_from_civil(date.year(), date.month(), date.day()))
}

/// Parses `YYYY-MM` into a month bucket.
pub fn parse_month(text: &str, field: &str) -> Result<i32, Status> {
    let bad = || {
        Status::invalid_argument(format!(
            "{field} must be a month like 2026-11 for month windows, got {text:?}"
        ))
    };
    let (y, m) = text.split_once('-').ok_or_else(bad)?;
    let (y, m): (i32, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if y.to_string().len() != 4 || !(1..=12).contains(&m) || text.len() != 7 {
        return Err(bad());
    }
    Ok(y * 12 + m as i32 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dates_strictly() {
        assert_eq!(
            parse_day("2026-11-24", "from").unwrap(),
            days_from_civil(2026, 11, 24)
        );
        assert_eq!(parse_month("2026-11", "from").unwrap(), 2026 * 12 + 10);
        for bad in ["2026-13", "2026-1", "26-11", "2026-11-01", "x", ""] {
            let status = parse_month(bad, "from").unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(
                status.message().contains("2026-11"),
                "says what is expected"
            );
        }
        for bad in ["2026-02-30", "2026-11", "24.11.2026"] {
            assert_eq!(
                parse_day(bad, "to").unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }

    #[test]
    fn limits_and_ids_are_checked() {
        assert_eq!(limit(0, 10, 1000, "limit").unwrap(), 10);
        assert_eq!(limit(1000, 10, 1000, "limit").unwrap(), 1000);
        assert!(
            limit(1001, 10, 1000, "limit")
                .unwrap_err()
                .message()
                .contains("at most 1000")
        );
        assert_eq!(user_id(0).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(
            user_id(u64::MAX).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let wait = pb::Consistency {
            min_epoch: 3,
            timeout_ms: 60_000,
            incarnation: String::new(),
        };
        assert!(consistency(Some(&wait), "a", None).is_err());
        let other = pb::Consistency {
            min_epoch: 3,
            timeout_ms: 0,
            incarnation: "old".into(),
        };
        let status = consistency(Some(&other), "new", Some(9)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("\"new\"") && status.message().contains("9"));
        let same = pb::Consistency {
            incarnation: "new".into(),
            ..other
        };
        assert!(consistency(Some(&same), "new", None).is_ok());
    }
}
