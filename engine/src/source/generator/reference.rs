//! The simulator's reference data: every simulated user's budget and currency, exchange rates
//! for every simulator currency, and changes of both over time, interleaved with the
//! simulator's expenses as one deterministic stream ([`Stream`]).
//!
//! # What the stream holds
//!
//! * First, one exchange-rate row per simulator currency ([`CURRENCY_VALUES`]), in base-currency
//!   micro-units per minor unit (base EUR by default: EUR = `1_000_000`).
//! * Before a user's first expense, the user's row: the currency all of the user's expenses are
//!   in (the simulator's profile) and a monthly budget of 5/4 of the simulator's calibrated
//!   budget (the simulator draws it at 60 % to 160 % of the user's expected monthly spending, so
//!   at the end of a month about three users in five are under budget, one in five near it and
//!   one in five over; during the month almost everyone is under).
//! * Between the expenses, at `budget_change_rate` per 1000 records, a budget change: a user who
//!   spent in the current stream month revises the budget against what the stream has given
//!   them this month so far (`s`, from the source's own totals of new, late and refund
//!   expenses): 60 % of the revisions put `s` at 30-75 % of the new budget (under: clears any
//!   alert), 30 % at 80-100 % (near: the 80 % alert), 10 % at 100-125 % (over: both alerts).
//!   Spending moves every user towards the budget during the month, so of four users drawn
//!   (two who spent this month, two who made one of the last 1024 expenses: busy users revise
//!   more often) the one with the largest share of the budget spent revises (those who reach
//!   their limit revise first); this keeps most users under budget, some near it and a few over
//!   at any time (see the tests). Budgets are rounded down to whole units (100 minor units) and are at
//!   least 100.
//! * At `fx_change_rate` per 1000 records, a rate change: a currency other than the base moves
//!   to within ±3 % of its base rate.
//!
//! The expenses are exactly the simulator's stream (the reference data draws from its own
//! generator, seeded from the simulator's seed), so turning reference data on or off never
//! changes an expense. The same config gives the same stream, record for record; the state
//! (users seen, spend this month and last) is rebuilt by generating again, so a source restored
//! at offset `n` regenerates exactly the records after `n`.
//!
//! # Rates and the yen
//!
//! A rate is applied to minor units as they are (see `spendflow_operators::reference`). The
//! simulator's yen amounts are whole yen (the yen has no minor unit), so the yen's rate here is
//! base minor units per yen, times a million (EUR base: `625_000`, 1.6 yen per euro cent), which
//! makes converted totals right in the base's minor units.

use std::collections::VecDeque;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::{FxHashMap, FxHashSet};
use spendflow_operators::model::{Record, UserId, day_of, month_of_day};
use spendflow_operators::reference::{Currency, RATE_ONE, RefChange, RefKey, RefValue};

use super::{Generated, GeneratedKind, Simulator};

/// The simulator's currencies and their value: minor units worth one euro cent, in thousandths
/// (the same table the simulator converts amounts with).
pub const CURRENCY_VALUES: [(Currency, i64); 9] = [
    (*b"EUR", 1000),
    (*b"USD", 1080),
    (*b"GBP", 850),
    (*b"CHF", 950),
    (*b"SEK", 11_500),
    (*b"PLN", 4300),
    (*b"JPY", 1600),
    (*b"CAD", 1480),
    (*b"AUD", 1650),
];

/// Users drawn for a budget revision, alternately any user who spent this month and the user
/// of a recent expense; the one with the largest share of the budget spent revises.
const REVISION_CANDIDATES: usize = 4;

/// Recent spending expenses whose users are candidates for a revision.
const RECENT: usize = 1024;

/// How far a rate change may move a rate from its base value, per mille.
const FX_SWING_PER_MILLE: u64 = 30;

/// One record of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A simulated expense record (JSON bytes, as the simulator made them).
    Expense(Generated),
    /// A change of reference data.
    Reference(RefChange),
}

/// The base rate of `currency` against `base`: base minor units per minor unit, times a million,
/// rounded half up. `None` if either is not a simulator currency.
pub fn base_rate(currency: Currency, base: Currency) -> Option<i64> {
    let value = |c: Currency| {
        CURRENCY_VALUES
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| *v)
    };
    let (c, b) = (value(currency)?, value(base)?);
    // base minor per currency minor = b / c.
    Some((2 * b * RATE_ONE + c) / (2 * c))
}

/// How often reference records come, and in which currency rates are given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReferenceSettings {
    /// Emit reference records at all.
    pub enabled: bool,
    /// Budget changes per 2^32 records.
    pub budget_threshold: u64,
    /// Budget plus rate changes per 2^32 records.
    pub fx_threshold: u64,
    /// The currency rates are in.
    pub base: Currency,
}

/// Changes per 1000 records as a threshold out of 2^32 (exact for 0 and 1000).
pub fn per_mille_threshold(per_1000: f64) -> u64 {
    ((per_1000 / 1000.0).clamp(0.0, 1.0) * (1u64 << 32) as f64).round() as u64
}

/// The simulator's expenses with reference data interleaved.
#[derive(Debug)]
pub struct Stream {
    simulator: Simulator,
    settings: ReferenceSettings,
    rng: ChaCha8Rng,
    pending: VecDeque<Item>,
    started: bool,
    seen: FxHashSet<UserId>,
    /// Spend per `(user, month)` of new, late and refund expenses, this stream month and the one
    /// before.
    spent: FxHashMap<(UserId, i32), i128>,
    /// The stream month `active` is of.
    month: i32,
    /// Users with spend in `month`, in the order they first spent.
    active: Vec<UserId>,
    /// Every user's budget as last sent.
    budgets: FxHashMap<UserId, i64>,
    /// The users of the last [`RECENT`] spending expenses, a ring.
    recent: Vec<UserId>,
    recent_next: usize,
    /// Records returned so far.
    produced: u64,
}

impl Stream {
    /// The stream over `simulator`.
    pub fn new(simulator: Simulator, settings: ReferenceSettings) -> Self {
        let seed = simulator.config().seed;
        let month = month_of_day(day_of(simulator.stream_ms()));
        Stream {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x0BAD_9E70_F00D_CAFE),
            simulator,
            settings,
            pending: VecDeque::new(),
            started: false,
            seen: FxHashSet::default(),
            spent: FxHashMap::default(),
            month,
            active: Vec::new(),
            budgets: FxHashMap::default(),
            recent: Vec::new(),
            recent_next: 0,
            produced: 0,
        }
    }

    /// The simulator.
    pub fn simulator(&self) -> &Simulator {
        &self.simulator
    }

    /// Records returned so far (expenses and reference changes).
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// What the stream has counted as `user`'s spend in `month` (`year * 12 + month - 1`): the
    /// sum of new, late and refund expenses (corrections and deletes are not followed). Kept for
    /// the current stream month and the one before.
    pub fn spent(&self, user: UserId, month: i32) -> i128 {
        self.spent.get(&(user, month)).copied().unwrap_or(0)
    }

    /// The next record.
    pub fn next_item(&mut self) -> Item {
        self.produced += 1;
        if !self.settings.enabled {
            return Item::Expense(self.expense());
        }
        if !self.started {
            self.started = true;
            let base = self.settings.base;
            for (currency, _) in CURRENCY_VALUES {
                let rate_micros = base_rate(currency, base).expect("a simulator currency");
                self.pending.push_back(Item::Reference(RefChange {
                    key: RefKey::Fx(currency),
                    value: Some(RefValue::Fx { rate_micros }),
                }));
            }
        }
        if let Some(item) = self.pending.pop_front() {
            return item;
        }
        let roll = self.rng.next_u64() >> 32;
        if roll < self.settings.budget_threshold
            && let Some(change) = self.budget_change()
        {
            return Item::Reference(change);
        }
        if roll >= self.settings.budget_threshold && roll < self.settings.fx_threshold {
            return Item::Reference(self.fx_change());
        }
        let generated = self.expense();
        let user = generated.user_id;
        if self.seen.insert(user)
            && let Some(profile) = self.simulator.user(user)
        {
            let currency = currency_code(&profile.currency);
            let budget = profile
                .monthly_budget_minor
                .saturating_mul(5)
                .div_euclid(4)
                .div_euclid(1000)
                .saturating_add(1)
                .saturating_mul(1000);
            self.budgets.insert(user, budget);
            self.pending.push_back(Item::Expense(generated));
            return Item::Reference(RefChange {
                key: RefKey::User(user),
                value: Some(RefValue::User {
                    budget_minor: Some(budget),
                    currency,
                }),
            });
        }
        Item::Expense(generated)
    }

    /// The simulator's next record, counted into the month's spend.
    fn expense(&mut self) -> Generated {
        let generated = self.simulator.next_record();
        if !self.settings.enabled {
            return generated;
        }
        let now = month_of_day(day_of(self.simulator.stream_ms()));
        if now != self.month {
            self.month = now;
            self.active.clear();
            self.spent.retain(|(_, m), _| *m >= now - 1);
            // Users who spent this month already (late events come before their month's turn).
            let mut users: Vec<UserId> = self
                .spent
                .iter()
                .filter(|((_, m), _)| *m == now)
                .map(|((u, _), _)| *u)
                .collect();
            users.sort_unstable();
            self.active = users;
        }
        if matches!(
            generated.kind,
            GeneratedKind::New | GeneratedKind::Late | GeneratedKind::Refund
        ) && let Some(Record::Upsert(expense)) = &generated.record
        {
            let month = month_of_day(day_of(expense.event_ms));
            if self.recent.len() < RECENT {
                self.recent.push(expense.user_id);
            } else {
                self.recent[self.recent_next] = expense.user_id;
                self.recent_next = (self.recent_next + 1) % RECENT;
            }
            if month >= self.month - 1 {
                let key = (expense.user_id, month);
                if !self.spent.contains_key(&key) && month == self.month {
                    self.active.push(expense.user_id);
                }
                *self.spent.entry(key).or_insert(0) += i128::from(expense.amount_minor);
            }
        }
        generated
    }

    /// A user who spent this month revises the budget against that spend; `None` if nobody
    /// has spent yet this month.
    fn budget_change(&mut self) -> Option<RefChange> {
        if self.active.is_empty() {
            return None;
        }
        // Of a few users drawn, the one furthest into the budget revises it: spending grows
        // every budget towards its limit during a month, and those who reach it revise first.
        let mut user = 0;
        let mut share = (-1_i128, 1_i128);
        for i in 0..REVISION_CANDIDATES {
            // Half of the candidates are users of recent expenses: busy users revise more often.
            let candidate = if i % 2 == 1 && !self.recent.is_empty() {
                self.recent[below(self.rng.next_u64(), self.recent.len() as u64) as usize]
            } else {
                self.active[below(self.rng.next_u64(), self.active.len() as u64) as usize]
            };
            let spent = self.spent(candidate, self.month);
            let budget = i128::from(self.budgets.get(&candidate).copied().unwrap_or(1).max(1));
            if spent * share.1 > share.0 * budget {
                user = candidate;
                share = (spent, budget);
            }
        }
        let spent = self.spent(user, self.month);
        let profile = self.simulator.user(user)?;
        // Spend as a share of the new budget, percent.
        let roll = below(self.rng.next_u64(), 1000);
        let percent = if roll < 600 {
            30 + below(self.rng.next_u64(), 45)
        } else if roll < 900 {
            80 + below(self.rng.next_u64(), 20)
        } else {
            100 + below(self.rng.next_u64(), 25)
        };
        let budget = (spent.max(0) * 100 / i128::from(percent)) / 100 * 100;
        let budget = i64::try_from(budget).unwrap_or(i64::MAX).max(100);
        self.budgets.insert(user, budget);
        Some(RefChange {
            key: RefKey::User(user),
            value: Some(RefValue::User {
                budget_minor: Some(budget),
                currency: currency_code(&profile.currency),
            }),
        })
    }

    /// A currency other than the base moves within ±3 % of its base rate.
    fn fx_change(&mut self) -> RefChange {
        let others: Vec<Currency> = CURRENCY_VALUES
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| *c != self.settings.base)
            .collect();
        let currency = others[below(self.rng.next_u64(), others.len() as u64) as usize];
        let base = base_rate(currency, self.settings.base).expect("a simulator currency");
        let swing = below(self.rng.next_u64(), 2 * FX_SWING_PER_MILLE + 1) as i64
            - FX_SWING_PER_MILLE as i64;
        let rate_micros = (base * (1000 + swing) / 1000).max(1);
        RefChange {
            key: RefKey::Fx(currency),
            value: Some(RefValue::Fx { rate_micros }),
        }
    }
}

/// A profile's currency as a code (the simulator's codes are three ASCII letters).
fn currency_code(text: &str) -> Currency {
    let mut code = [b'?'; 3];
    for (slot, byte) in code.iter_mut().zip(text.bytes()) {
        *slot = byte;
    }
    code
}

/// A uniform number in `0..n` from 64 random bits (multiply-shift).
fn below(random: u64, n: u64) -> u64 {
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}
