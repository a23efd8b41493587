//! Budget alerts out: every change of the set of fired alerts, once, on a Kafka topic.
//!
//! The publisher hands each published epoch to an [`AlertsOutput`] (`kafka`): its number, the
//! input positions it covers, the [`AlertEvent`]s it holds and whether it is the epoch of a
//! restored checkpoint. The output writes records on its own thread; the publisher only waits
//! when the output's bounded queue is full (a Kafka outage longer than the queue): an event is
//! never dropped to keep the publisher going.
//!
//! # The record
//!
//! Key: the user id as decimal text. Value: JSON, exactly
//! `{"user_id":7,"month":"2026-11","threshold_pct":80,"state":"fired","spent_minor":8000,
//! "budget_minor":10000,"currency":"EUR","epoch":42}` (amounts as JSON integers). Header
//! [`POSITIONS_HEADER`]: the input positions of the epoch the record was written at, as JSON
//! `[{"source":"expenses","partition":0,"position":1234},...]`.
//!
//! # Exactly once across crashes: state changes relative to the topic
//!
//! The topic itself is the reference of what was said ([`AlertGate`]). On open the output reads
//! the whole topic (committed records only) and rebuilds the last state written per
//! `(user, month, threshold)` and, per input partition, the highest position any record was
//! written at. Then:
//!
//! * While an epoch's positions do not yet cover those (some partition is below its recorded
//!   position: the engine is reading input again after a restore), the output only *tracks*
//!   the alerts fired now: a restore epoch delivers the restored fired set as `Fired` events,
//!   later epochs deliver transitions.
//! * At the first epoch that covers them, it writes the difference between the fired set and
//!   the topic's state (`fired` for alerts fired now that the topic does not have fired,
//!   `cleared` for alerts the topic has fired that are not fired now), then every transition
//!   that changes the topic's state, as it comes.
//!
//! So a state change is never written twice (the topic is compared with first) and never lost
//! (at the gate the topic converges to the engine's state), even when a crash cut an epoch's
//! records in half. An empty topic has no gate: everything is written from the start,
//! including a restore epoch's fired set (nothing was said yet). A transient change that
//! happened and reverted entirely between the topic's last position and the gate epoch's end
//! (a restore whose epochs are cut differently) is folded into the difference: the topic's
//! states still alternate and end where the engine is.
//!
//! The one way a change can be folded away: a restart from a checkpoint *newer* than what the
//! topic says (the engine crashed while the output was behind, its queued records lost). The
//! input between the two is not read again, so changes there that reverted are never seen; the
//! topic still converges to the engine's state at the restore epoch. A checkpointer that writes
//! only epochs at or before `AlertsOutput::committed_epoch` rules that out.
//!
//! Records are written in Kafka transactions (one per batch of epochs, a `transactional.id`
//! per engine and topic): a reader never sees half a batch, and an older engine that still
//! writes is fenced when a new one opens the topic.

#[cfg(feature = "kafka")]
pub mod config;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use spendflow_operators::UserId;
use spendflow_operators::reference::{AlertEvent, AlertState, Currency};

use crate::core::Epoch;

use crate::core::PartitionPosition;

#[cfg(feature = "kafka")]
pub use config::AlertsTopicConfig;
#[cfg(feature = "kafka")]
pub use kafka::AlertsOutput;

/// Where the publisher hands every published epoch's alert changes (the Kafka topic,
/// [`AlertsOutput`], is the one the engine has; the trait keeps the pipeline free of Kafka).
pub trait AlertsSink: Send + std::fmt::Debug {
    /// Hands over one published delta: its epoch, the input positions it covers, its alert
    /// changes in epoch order, and whether it is the restored checkpoint's epoch. Called for
    /// every delta, also those without changes. False once the output has stopped on an error.
    fn publish(
        &self,
        epoch: Epoch,
        positions: &[PartitionPosition],
        events: &[AlertEvent],
        restore: bool,
    ) -> bool;

    /// Writes what is queued, waiting at most `grace`, and stops.
    fn close_within(self: Box<Self>, grace: std::time::Duration);
}

/// While the gate stays shut, a warning every this many epochs.
const HELD_WARN_EVERY: u64 = 1000;

/// The header holding the input positions of a record's epoch.
pub const POSITIONS_HEADER: &str = "spendflow-positions";

/// One alert: `(user, month, threshold)`.
pub type AlertKey = (UserId, i32, u8);

/// How the alerts output failed.
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    /// Trying again later may succeed (a broker down, a timeout).
    #[error("alerts topic {topic}: {message}")]
    Retriable {
        /// The topic.
        topic: String,
        /// What failed.
        message: String,
    },
    /// Retrying cannot help: a topic that cannot be read, a record that is not ours, another
    /// engine took the topic over (fenced).
    #[error("alerts topic {topic}: {message}")]
    Fatal {
        /// The topic.
        topic: String,
        /// What failed.
        message: String,
    },
}

impl AlertsError {
    /// True if trying again later may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self, AlertsError::Retriable { .. })
    }
}

/// One record of the alerts topic (its value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlertRecord {
    /// The user.
    pub user_id: UserId,
    /// The month, `year * 12 + month - 1`.
    pub month: i32,
    /// The threshold in percent.
    pub threshold_pct: u8,
    /// Fired or cleared.
    pub state: AlertState,
    /// The month's spend, minor units.
    pub spent_minor: i128,
    /// The budget, minor units.
    pub budget_minor: i64,
    /// The user's currency.
    pub currency: Currency,
    /// The epoch the record was written at.
    pub epoch: Epoch,
}

/// The JSON of [`AlertRecord`], field for field.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordJson<'a> {
    user_id: UserId,
    month: &'a str,
    threshold_pct: u8,
    state: &'a str,
    spent_minor: i128,
    budget_minor: i64,
    currency: &'a str,
    epoch: Epoch,
}

impl AlertRecord {
    /// The record of `event` written at `epoch`.
    pub fn of(event: &AlertEvent, epoch: Epoch) -> Self {
        AlertRecord {
            user_id: event.user_id,
            month: event.month,
            threshold_pct: event.threshold_pct,
            state: event.state,
            spent_minor: event.spent_minor,
            budget_minor: event.budget_minor,
            currency: event.currency,
            epoch,
        }
    }

    /// The alert it is about.
    pub fn key(&self) -> AlertKey {
        (self.user_id, self.month, self.threshold_pct)
    }

    /// The record's key: the user id as decimal text.
    pub fn kafka_key(&self) -> String {
        self.user_id.to_string()
    }

    /// The record's value.
    pub fn to_json(&self) -> String {
        let month = crate::core::format_month(self.month);
        let currency = String::from_utf8_lossy(&self.currency);
        serde_json::to_string(&RecordJson {
            user_id: self.user_id,
            month: &month,
            threshold_pct: self.threshold_pct,
            state: self.state.as_str(),
            spent_minor: self.spent_minor,
            budget_minor: self.budget_minor,
            currency: &currency,
            epoch: self.epoch,
        })
        .expect("a record always serializes")
    }

    /// Reads a record's value.
    ///
    /// # Errors
    ///
    /// What is wrong with it.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let json: RecordJson<'_> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let month = parse_month(json.month)
            .ok_or_else(|| format!("month {:?} is not YYYY-MM", json.month))?;
        let state = match json.state {
            "fired" => AlertState::Fired,
            "cleared" => AlertState::Cleared,
            other => return Err(format!("state {other:?} is neither fired nor cleared")),
        };
        let currency: Currency = json
            .currency
            .as_bytes()
            .try_into()
            .map_err(|_| format!("currency {:?} is not three letters", json.currency))?;
        Ok(AlertRecord {
            user_id: json.user_id,
            month,
            threshold_pct: json.threshold_pct,
            state,
            spent_minor: json.spent_minor,
            budget_minor: json.budget_minor,
            currency,
            epoch: json.epoch,
        })
    }
}

/// `2026-11` as `year * 12 + month - 1`.
pub fn parse_month(text: &str) -> Option<i32> {
    let (y, m) = text.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let (y, m): (i32, i32) = (y.parse().ok()?, m.parse().ok()?);
    (1..=12).contains(&m).then_some(y * 12 + m - 1)
}

/// One input position as the positions header holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderPosition {
    /// The source's name.
    pub source: String,
    /// The partition.
    pub partition: i32,
    /// The next offset to read.
    pub position: i64,
}

/// The positions header of an epoch covering `positions`.
pub fn positions_header(positions: &[PartitionPosition]) -> String {
    let list: Vec<HeaderPosition> = positions
        .iter()
        .map(|p| HeaderPosition {
            source: p.source.to_string(),
            partition: p.partition,
            position: p.position,
        })
        .collect();
    serde_json::to_string(&list).expect("positions always serialize")
}

/// Reads a positions header.
///
/// # Errors
///
/// What is wrong with it.
pub fn parse_positions_header(bytes: &[u8]) -> Result<Vec<HeaderPosition>, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// The gate between the engine's alert events and the topic: see the module docs. Kafka
/// apart, so that it can be tested on its own.
#[derive(Debug, Default)]
pub struct AlertGate {
    /// The topic's state: the last record per alert.
    topic: BTreeMap<AlertKey, AlertRecord>,
    /// Per `(source, partition)`: the highest position the topic's records were written at.
    /// `None` once the gate is open (or if the topic was empty).
    recorded: Option<BTreeMap<(String, i32), i64>>,
    /// The newest event of each alert seen in this run; the fired ones are the fired set.
    seen: BTreeMap<AlertKey, AlertEvent>,
    /// Epochs held so far (for the warning while the gate stays shut).
    held: u64,
}

impl AlertGate {
    /// A gate over a topic that holds `records` (in topic order per alert), each with the
    /// positions of its epoch.
    pub fn new(records: impl IntoIterator<Item = (AlertRecord, Vec<HeaderPosition>)>) -> Self {
        let mut topic = BTreeMap::new();
        let mut recorded: Option<BTreeMap<(String, i32), i64>> = None;
        for (record, positions) in records {
            topic.insert(record.key(), record);
            let recorded = recorded.get_or_insert_with(BTreeMap::new);
            for p in positions {
                let at = recorded
                    .entry((p.source, p.partition))
                    .or_insert(p.position);
                *at = (*at).max(p.position);
            }
        }
        AlertGate {
            topic,
            recorded,
            seen: BTreeMap::new(),
            held: 0,
        }
    }

    /// True once records are written as transitions come (no replay left to track).
    pub fn is_open(&self) -> bool {
        self.recorded.is_none()
    }

    /// Alerts the topic has fired now.
    pub fn topic_fired(&self) -> impl Iterator<Item = AlertKey> + '_ {
        self.topic
            .iter()
            .filter(|(_, r)| r.state == AlertState::Fired)
            .map(|(k, _)| *k)
    }

    /// Takes one published epoch; returns the records to write for it, in order.
    pub fn epoch(
        &mut self,
        epoch: Epoch,
        positions: &[PartitionPosition],
        events: &[AlertEvent],
        restore: bool,
    ) -> Vec<AlertRecord> {
        if restore {
            // The restored fired set, whole: nothing seen before it counts.
            self.seen.clear();
        }
        if self.recorded.is_none() {
            let mut out = Vec::new();
            for event in events {
                self.seen.insert(key_of(event), *event);
                if let Some(record) = self.change(event, epoch) {
                    out.push(record);
                }
            }
            return out;
        }
        for event in events {
            self.seen.insert(key_of(event), *event);
        }
        let behind = self.behind(positions);
        if !behind.is_empty() {
            if self.held.is_multiple_of(HELD_WARN_EVERY) {
                tracing::warn!(
                    epoch,
                    held_epochs = self.held,
                    behind = ?&behind[..behind.len().min(5)],
                    partitions_behind = behind.len(),
                    "Alerts: the alerts topic was written from input positions this engine has not \
                     reached yet; alert changes are tracked and written once it has. (If the input \
                     changed, those positions are never reached: use a new alerts topic.)"
                );
            }
            self.held += 1;
            return Vec::new();
        }
        self.recorded = None;
        // The difference between the fired set and the topic's state.
        let mut out = Vec::new();
        let fired_now: Vec<AlertEvent> = self
            .seen
            .values()
            .filter(|e| e.state == AlertState::Fired)
            .copied()
            .collect();
        for event in fired_now {
            if let Some(record) = self.change(&event, epoch) {
                out.push(record);
            }
        }
        let stale: Vec<AlertKey> = self
            .topic_fired()
            .filter(|k| {
                self.seen
                    .get(k)
                    .is_none_or(|e| e.state == AlertState::Cleared)
            })
            .collect();
        for key in stale {
            let event = match self.seen.get(&key) {
                Some(event) => *event,
                None => {
                    // Not fired in the engine and nothing seen of it: the amounts last said.
                    let r = self.topic[&key];
                    AlertEvent {
                        user_id: r.user_id,
                        month: r.month,
                        threshold_pct: r.threshold_pct,
                        state: AlertState::Cleared,
                        spent_minor: r.spent_minor,
                        budget_minor: r.budget_minor,
                        currency: r.currency,
                    }
                }
            };
            if let Some(record) = self.change(&event, epoch) {
                out.push(record);
            }
        }
        tracing::info!(
            epoch,
            written = out.len(),
            "Alerts: the engine caught up with the alerts topic; writing the difference, then every change."
        );
        out
    }

    /// The record for `event` if it changes the topic's state (and records it as written).
    fn change(&mut self, event: &AlertEvent, epoch: Epoch) -> Option<AlertRecord> {
        let key = key_of(event);
        let fired_in_topic = self
            .topic
            .get(&key)
            .is_some_and(|r| r.state == AlertState::Fired);
        let changes = match event.state {
            AlertState::Fired => !fired_in_topic,
            AlertState::Cleared => fired_in_topic,
        };
        if !changes {
            return None;
        }
        let record = AlertRecord::of(event, epoch);
        self.topic.insert(key, record);
        Some(record)
    }

    /// The recorded positions that `positions` do not reach: `(source, partition, recorded,
    /// now)`. A partition not listed (not assigned yet, a topic not discovered yet) is behind:
    /// opening the gate before the engine has read it again could write a change twice.
    fn behind(&self, positions: &[PartitionPosition]) -> Vec<(String, i32, i64, Option<i64>)> {
        let Some(recorded) = &self.recorded else {
            return Vec::new();
        };
        let mut now: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for p in positions {
            let at = now.entry((&p.source, p.partition)).or_insert(p.position);
            // Listed twice: the lower one counts.
            *at = (*at).min(p.position);
        }
        recorded
            .iter()
            .filter_map(|((source, partition), &want)| {
                let have = now.get(&(source.as_str(), *partition)).copied();
                (have.is_none_or(|have| have < want))
                    .then(|| (source.clone(), *partition, want, have))
            })
            .collect()
    }
}

fn key_of(event: &AlertEvent) -> AlertKey {
    (event.user_id, event.month, event.threshold_pct)
}
