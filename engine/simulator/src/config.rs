//! The simulator's configuration: seed, population and the share of each kind of record.

use serde::{Deserialize, Serialize};
use spendflow_operators::model::{MS_PER_DAY, days_from_civil};

/// Event times stay within 0001-01-01 ..= 9999-12-31 (four-digit years, as RFC 3339 needs).
/// This is the last millisecond of 9999-12-31, UTC.
pub const MAX_EVENT_MS: i64 = 253_402_300_799_999;

/// The largest accepted [`GeneratorConfig::users`]: user ids `1..=users` must fit the contract's
/// `1..=2^63-1` with room to spare (the model documents ids up to `i64::MAX - 1`).
pub const MAX_USERS: u64 = i64::MAX as u64 - 1;

/// The largest accepted [`GeneratorConfig::merchants`]. The merchant table is built in memory.
pub const MAX_MERCHANTS: u32 = 1_000_000;

/// The largest accepted [`GeneratorConfig::live_window`] (about 40 bytes per entry).
pub const MAX_LIVE_WINDOW: usize = 10_000_000;

/// The default [`GeneratorConfig::start_ms`]: 2026-11-01T00:00:00Z.
pub fn default_start_ms() -> i64 {
    i64::from(days_from_civil(2026, 11, 1)) * MS_PER_DAY
}

/// How the simulator behaves. Every field has a default, so a config file only names what it
/// changes; unknown fields are an error (a typo must not silently fall back to a default).
///
/// The six `*_rate` fields are shares of the output stream and must add up to at most 1; the
/// rest of the stream is new expenses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Seed of the whole simulation: the same seed and config give byte-identical output.
    pub seed: u64,
    /// Number of users; their ids are `1..=users`.
    pub users: u64,
    /// Number of merchants, spread over the spending categories.
    pub merchants: u32,
    /// Share of records that correct an earlier live expense (same id, changed amount, sometimes
    /// another merchant or category).
    pub correction_rate: f64,
    /// Share of records that delete an earlier live expense (a chargeback or void).
    pub delete_rate: f64,
    /// Share of records that re-send the exact bytes of an earlier record (at-least-once delivery).
    pub duplicate_rate: f64,
    /// Share of records that are refunds: new expenses with a negative amount at a merchant the
    /// user has spent at.
    pub refund_rate: f64,
    /// Share of records that are new expenses with an event time up to `late_max_ms` in the past.
    pub late_rate: f64,
    /// Share of records that are malformed and must be rejected by the decoder.
    pub bad_rate: f64,
    /// Event time of the first record, milliseconds since the Unix epoch (UTC).
    pub start_ms: i64,
    /// How far the stream's event time advances per record, in milliseconds.
    pub ms_per_event: i64,
    /// How far before the stream time a late record's event time can be, in milliseconds.
    pub late_max_ms: i64,
    /// How many live expenses the simulator remembers as targets for corrections, deletes,
    /// duplicates and refunds. Bounds its memory (about 40 bytes per entry).
    pub live_window: usize,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 0,
            users: 1000,
            merchants: 200,
            correction_rate: 0.05,
            delete_rate: 0.02,
            duplicate_rate: 0.02,
            refund_rate: 0.03,
            late_rate: 0.05,
            bad_rate: 0.0,
            start_ms: default_start_ms(),
            ms_per_event: 1000,
            late_max_ms: 10 * MS_PER_DAY,
            live_window: 100_000,
        }
    }
}

/// A [`GeneratorConfig`] that cannot be simulated. The message names the field and the range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A `*_rate` field is not a number in `[0, 1]`.
    #[error("generator: {field} must be a number from 0 to 1, got {value}")]
    RateOutOfRange {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// The rates add up to more than 1.
    #[error(
        "generator: correction_rate + delete_rate + duplicate_rate + refund_rate + late_rate + \
         bad_rate must be at most 1, got {sum}"
    )]
    RatesAboveOne {
        /// The sum of the rates.
        sum: f64,
    },
    /// `users` is 0.
    #[error("generator: users must be at least 1")]
    NoUsers,
    /// `users` is so large that user ids would leave the contract's range.
    #[error("generator: users must be at most {MAX_USERS} (user ids are 1..=users), got {users}")]
    TooManyUsers {
        /// The configured number of users.
        users: u64,
    },
    /// `merchants` is 0 or larger than [`MAX_MERCHANTS`].
    #[error("generator: merchants must be from 1 to {MAX_MERCHANTS}, got {merchants}")]
    Merchants {
        /// The configured number of merchants.
        merchants: u32,
    },
    /// `ms_per_event` is negative.
    #[error("generator: ms_per_event must be 0 or more, got {ms_per_event}")]
    NegativeStep {
        /// The configured step.
        ms_per_event: i64,
    },
    /// `late_max_ms` is not positive.
    #[error("generator: late_max_ms must be at least 1, got {late_max_ms}")]
    LateMax {
        /// The configured maximum lateness.
        late_max_ms: i64,
    },
    /// `start_ms` would put event times before 1970 or after the year 9999.
    #[error(
        "generator: start_ms must be from late_max_ms ({late_max_ms}, so late events stay after \
         1970-01-01) to {MAX_EVENT_MS} (9999-12-31), got {start_ms}"
    )]
    Start {
        /// The configured start.
        start_ms: i64,
        /// The configured maximum lateness.
        late_max_ms: i64,
    },
    /// `live_window` is 0 or larger than [`MAX_LIVE_WINDOW`].
    #[error("generator: live_window must be from 1 to {MAX_LIVE_WINDOW}, got {live_window}")]
    LiveWindow {
        /// The configured window.
        live_window: usize,
    },
}

impl GeneratorConfig {
    /// The six rates with their field names, in the order the simulator draws them.
    pub(crate) fn rates(&self) -> [(&'static str, f64); 6] {
        [
            ("bad_rate", self.bad_rate),
            ("correction_rate", self.correction_rate),
            ("delete_rate", self.delete_rate),
            ("duplicate_rate", self.duplicate_rate),
            ("refund_rate", self.refund_rate),
            ("late_rate", self.late_rate),
        ]
    }

    /// Checks every field's range.
    ///
    /// # Errors
    ///
    /// The first field found out of range, as a [`ConfigError`] whose message says what to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut sum = 0.0;
        for (field, value) in self.rates() {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError::RateOutOfRange { field, value });
            }
            sum += value;
        }
        // A little slack for decimal fractions that do not add up exactly in binary.
        if sum > 1.0 + 1e-9 {
            return Err(ConfigError::RatesAboveOne { sum });
        }
        if self.users == 0 {
            return Err(ConfigError::NoUsers);
        }
        if self.users > MAX_USERS {
            return Err(ConfigError::TooManyUsers { users: self.users });
        }
        if self.merchants == 0 || self.merchants > MAX_MERCHANTS {
            return Err(ConfigError::Merchants {
                merchants: self.merchants,
            });
        }
        if self.ms_per_event < 0 {
            return Err(ConfigError::NegativeStep {
                ms_per_event: self.ms_per_event,
            });
        }
        if self.late_max_ms < 1 {
            return Err(ConfigError::LateMax {
                late_max_ms: self.late_max_ms,
            });
        }
        if self.start_ms < self.late_max_ms || self.start_ms > MAX_EVENT_MS {
            return Err(ConfigError::Start {
                start_ms: self.start_ms,
                late_max_ms: self.late_max_ms,
            });
        }
        if self.live_window == 0 || self.live_window > MAX_LIVE_WINDOW {
            return Err(ConfigError::LiveWindow {
                live_window: self.live_window,
            });
        }
        Ok(())
    }
}
