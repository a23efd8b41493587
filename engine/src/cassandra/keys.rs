//! Day and month keys as the Cassandra tables store them (`YYYY-MM-DD`, `YYYY-MM`, UTC), and
//! the read model's numbers for them (days since 1970-01-01; `year * 12 + month - 1`).
//!
//! Text keys sort like the dates they name only while years have four digits, so a range
//! asked of Cassandra is first clamped to years 0000 to 9999 (event times are RFC 3339, which
//! has four-digit years, so nothing is stored outside).

use spendflow_operators::model::days_from_civil;

use crate::core::{format_day, format_month};

/// The first day a text key can name: 0000-01-01.
pub fn first_day() -> i32 {
    days_from_civil(0, 1, 1)
}

/// The last day a text key can name: 9999-12-31.
pub fn last_day() -> i32 {
    days_from_civil(9999, 12, 31)
}

/// The first month a text key can name: 0000-01.
pub const FIRST_MONTH: i32 = 0;
/// The last month a text key can name: 9999-12.
pub const LAST_MONTH: i32 = 9999 * 12 + 11;

/// `2026-11-24` for a day number.
pub fn day_key(day: i32) -> String {
    format_day(day)
}

/// `2026-11` for a month number.
pub fn month_key(month: i32) -> String {
    format_month(month)
}

/// The day number of a `YYYY-MM-DD` key; `None` unless it is exactly that shape and a real
/// date.
pub fn parse_day_key(key: &str) -> Option<i32> {
    let b = key.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = &key[r];
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())
            .flatten()
    };
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    chrono::NaiveDate::from_ymd_opt(y as i32, m, d)?;
    Some(days_from_civil(y as i32, m, d))
}

/// The month number of a `YYYY-MM` key; `None` unless it is exactly that shape.
pub fn parse_month_key(key: &str) -> Option<i32> {
    let b = key.as_bytes();
    if b.len() != 7
        || b[4] != b'-'
        || !key[..4]
            .bytes()
            .chain(key[5..].bytes())
            .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let (y, m): (i32, i32) = (key[..4].parse().ok()?, key[5..].parse().ok()?);
    (1..=12).contains(&m).then_some(y * 12 + m - 1)
}

/// `from..=to` clamped to what text keys can name; `None` if nothing is left.
pub fn clamp(from: i32, to: i32, first: i32, last: i32) -> Option<(i32, i32)> {
    let (from, to) = (from.max(first), to.min(last));
    (from <= to).then_some((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_keys_round_trip_and_agree_with_the_read_model() {
        assert_eq!(day_key(days_from_civil(2026, 11, 24)), "2026-11-24");
        assert_eq!(day_key(0), "1970-01-01");
        assert_eq!(parse_day_key("1970-01-01"), Some(0));
        assert_eq!(parse_day_key("1969-12-31"), Some(-1));
        assert_eq!(
            parse_day_key("2024-02-29"),
            Some(days_from_civil(2024, 2, 29))
        );
        for day in [
            first_day(),
            -1,
            0,
            1,
            20_781,
            days_from_civil(2026, 12, 31),
            last_day(),
        ] {
            assert_eq!(parse_day_key(&day_key(day)), Some(day), "day {day}");
        }
        // Keys sort like the days they name, across months and years.
        let days: Vec<i32> = (days_from_civil(1999, 12, 25)..days_from_civil(2001, 3, 5)).collect();
        let keys: Vec<String> = days.iter().map(|d| day_key(*d)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn malformed_day_keys_are_refused() {
        for bad in [
            "",
            "2026-11",
            "2026-11-1",
            "2026-1-01",
            "26-11-01",
            "2026/11/01",
            "2026-02-30",
            "2026-13-01",
            "2026-00-10",
            "2026-11-00",
            "+026-11-01",
            "2026-11-01T",
            " 026-11-01",
            "２０２６-11-01",
        ] {
            assert_eq!(parse_day_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn month_keys_round_trip_and_agree_with_the_read_model() {
        assert_eq!(month_key(2026 * 12 + 10), "2026-11");
        assert_eq!(month_key(2027 * 12), "2027-01");
        assert_eq!(parse_month_key("2026-11"), Some(2026 * 12 + 10));
        for month in [FIRST_MONTH, 1970 * 12, 2026 * 12 + 11, LAST_MONTH] {
            assert_eq!(
                parse_month_key(&month_key(month)),
                Some(month),
                "month {month}"
            );
        }
        for bad in [
            "",
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026-11-01",
            "2026/11",
            "+026-11",
        ] {
            assert_eq!(parse_month_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ranges_are_clamped_to_four_digit_years() {
        assert_eq!(clamp(5, 10, 0, 100), Some((5, 10)));
        assert_eq!(clamp(-5, 200, 0, 100), Some((0, 100)));
        assert_eq!(clamp(150, 200, 0, 100), None);
        assert_eq!(clamp(-50, -10, 0, 100), None);
        assert_eq!(
            clamp(first_day() - 10, first_day() + 2, first_day(), last_day()),
            Some((first_day(), first_day() + 2))
        );
    }
}
