//! Monthly budgets calibrated to what the generated stream actually spends.
//!
//! The simulator's own budget is near a user's spending over a *whole* month of event time at
//! the configured pace; a run of `--events` records usually covers much less (50,000 records at
//! one per second are 14 hours), so with those budgets nobody comes near an alert. `generate`
//! therefore replays the records it is about to write (the simulator is deterministic and
//! cheap), sums every user's live expenses per UTC month of `event_time`, exactly as the alert
//! rule does, and sets the budget so that the user's busiest month ends at a chosen share of it:
//!
//! | users | month's spending / budget | alerts |
//! |---|---|---|
//! | 70% | 40% to 75% | none |
//! | 20% | 80% to 99% | 80% |
//! | 10% | 101% to 130% | 80% and 100% |
//!
//! The share is a hash of `(seed, user_id)`; budgets of 10,000 minor units or more are rounded up to 100
//! (shares move by at most 1%). Users without spending
//! in the calibrated records keep the simulator's budget. Runs longer than [`MAX_HORIZON`]
//! records (or without `--events`) are calibrated on their first [`MAX_HORIZON`] records.

use std::collections::HashMap;

use spendflow_operators::model::{ExpenseId, MS_PER_DAY, Record, UserId, civil_from_days};

use crate::source::generator::{GeneratorConfig, Simulator};

use super::GenerateError;

/// The most records replayed to calibrate budgets (about a second and some 50 MB).
pub const MAX_HORIZON: u64 = 1_000_000;

/// Budgets by user; users not listed keep the simulator's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budgets {
    by_user: HashMap<UserId, i64>,
}

impl Budgets {
    /// The budget of a user, given the simulator's as the fallback.
    pub fn of(&self, user_id: UserId, simulator_budget: i64) -> i64 {
        self.by_user
            .get(&user_id)
            .copied()
            .unwrap_or(simulator_budget)
    }

    /// Calibrates budgets on the first `min(events, MAX_HORIZON)` records of `config`'s
    /// stream (`MAX_HORIZON` without `events`).
    ///
    /// # Errors
    ///
    /// [`GenerateError::Simulator`] for an invalid simulator configuration.
    pub fn calibrate(config: &GeneratorConfig, events: Option<u64>) -> Result<Self, GenerateError> {
        let horizon = events.unwrap_or(MAX_HORIZON).min(MAX_HORIZON);
        let mut simulator = Simulator::new(config.clone())?;
        let mut live: HashMap<ExpenseId, (UserId, i32, i64)> = HashMap::new();
        for _ in 0..horizon {
            match simulator.next_record().record {
                Some(Record::Upsert(e)) => {
                    live.insert(
                        e.expense_id,
                        (e.user_id, month_of(e.event_ms), e.amount_minor),
                    );
                }
                Some(Record::Delete { expense_id, .. }) => {
                    live.remove(&expense_id);
                }
                None => {}
            }
        }
        let mut months: HashMap<(UserId, i32), i128> = HashMap::new();
        for (user, month, amount) in live.into_values() {
            *months.entry((user, month)).or_default() += i128::from(amount);
        }
        let mut busiest: HashMap<UserId, i128> = HashMap::new();
        for ((user, _), spent) in months {
            let max = busiest.entry(user).or_default();
            *max = (*max).max(spent);
        }
        let by_user = busiest
            .into_iter()
            .filter(|(_, spent)| *spent > 0)
            .map(|(user, spent)| {
                let percent = i128::from(share_percent(config.seed, user));
                let budget = (spent * 100 + percent - 1) / percent;
                // Round numbers where the 1% this costs at most cannot move a user across a
                // threshold by much.
                let rounded = if budget >= 10_000 {
                    (budget + 99) / 100 * 100
                } else {
                    budget
                };
                (user, i64::try_from(rounded).unwrap_or(i64::MAX))
            })
            .collect();
        Ok(Budgets { by_user })
    }
}

/// `year * 12 + month - 1` of an instant, UTC.
fn month_of(event_ms: i64) -> i32 {
    let (y, m, _) = civil_from_days(event_ms.div_euclid(MS_PER_DAY) as i32);
    y * 12 + m as i32 - 1
}

/// The share of its budget a user's busiest month comes to, in percent (see the module docs).
pub(crate) fn share_percent(seed: u64, user_id: UserId) -> u64 {
    let h = splitmix(seed ^ splitmix(user_id));
    let bucket = h % 100;
    let within = (h >> 32) % 1000;
    match bucket {
        0..70 => 40 + within % 36,  // 40..=75
        70..90 => 80 + within % 20, // 80..=99
        _ => 101 + within % 30,     // 101..=130
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
