//! The simulator as a source: paced to a rate, optionally stopping after a number of records,
//! with the simulated users' reference data (budgets, currencies, exchange rates) interleaved
//! (see [`super::reference`]).

use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;

use super::reference::{CURRENCY_VALUES, Item, ReferenceSettings, Stream, per_mille_threshold};
use super::{ConfigError, GeneratorConfig, Simulator};
use crate::error::SourceError;
use crate::source::{PartitionPosition, Payload, Poll, RestoredPositions, Source, SourceRecord};

/// The source's name in positions and checkpoints.
pub const SOURCE_NAME: &str = "generator";

/// Settings of the generator source that cannot be run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GeneratorConfigError {
    /// A simulator setting.
    #[error(transparent)]
    Simulator(#[from] ConfigError),
    /// A reference-data setting; the message names it.
    #[error("{0}")]
    Reference(String),
}

/// Settings of the generator source.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSourceConfig {
    /// What the simulator produces (seed, users, shares of corrections, deletes, ...).
    #[serde(default)]
    pub simulator: GeneratorConfig,
    /// Records per second; `None` produces as fast as the engine takes them.
    #[serde(default)]
    pub rate: Option<u64>,
    /// Stop after this many records (reference records included); `None` runs until the
    /// engine stops.
    #[serde(default)]
    pub events: Option<u64>,
    /// Also produce the users' budgets and currencies and the exchange rates as reference
    /// records (default true).
    #[serde(default = "yes")]
    pub reference: bool,
    /// Budget changes per 1000 records, 0 to 1000 (default 5): a user revises the monthly
    /// budget against what they have spent this month, so alerts fire and clear.
    #[serde(default = "default_budget_change_rate")]
    pub budget_change_rate: f64,
    /// Exchange-rate changes per 1000 records, 0 to 1000 (default 1).
    #[serde(default = "default_fx_change_rate")]
    pub fx_change_rate: f64,
    /// The currency the exchange rates are in (default `EUR`): give the engine's reporting
    /// currency. One of the simulator's currencies.
    #[serde(default = "default_fx_base")]
    pub fx_base: String,
}

fn yes() -> bool {
    true
}

fn default_budget_change_rate() -> f64 {
    5.0
}

fn default_fx_change_rate() -> f64 {
    1.0
}

fn default_fx_base() -> String {
    "EUR".into()
}

impl Default for GeneratorSourceConfig {
    fn default() -> Self {
        GeneratorSourceConfig {
            simulator: GeneratorConfig::default(),
            rate: None,
            events: None,
            reference: true,
            budget_change_rate: default_budget_change_rate(),
            fx_change_rate: default_fx_change_rate(),
            fx_base: default_fx_base(),
        }
    }
}

impl GeneratorSourceConfig {
    /// Checks the simulator settings and the reference settings.
    ///
    /// # Errors
    ///
    /// A [`GeneratorConfigError`] naming the setting.
    pub fn validate(&self) -> Result<(), GeneratorConfigError> {
        self.simulator.validate()?;
        self.reference_settings()
            .map_err(GeneratorConfigError::Reference)?;
        Ok(())
    }

    /// The reference settings, or what is wrong with them.
    fn reference_settings(&self) -> Result<ReferenceSettings, String> {
        for (field, value) in [
            ("budget_change_rate", self.budget_change_rate),
            ("fx_change_rate", self.fx_change_rate),
        ] {
            if !(0.0..=1000.0).contains(&value) {
                return Err(format!(
                    "generator: {field} must be a number of changes per 1000 records from 0 to \
                     1000, got {value}"
                ));
            }
        }
        if self.budget_change_rate + self.fx_change_rate > 1000.0 {
            return Err(format!(
                "generator: budget_change_rate + fx_change_rate must be at most 1000 (per 1000 \
                 records), got {}",
                self.budget_change_rate + self.fx_change_rate
            ));
        }
        let base = CURRENCY_VALUES
            .iter()
            .map(|(c, _)| *c)
            .find(|c| c.as_slice() == self.fx_base.as_bytes())
            .ok_or_else(|| {
                format!(
                    "generator: fx_base must be one of the simulator's currencies ({}), got {:?}",
                    CURRENCY_VALUES
                        .iter()
                        .map(|(c, _)| String::from_utf8_lossy(c).into_owned())
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.fx_base
                )
            })?;
        let budget_threshold = per_mille_threshold(self.budget_change_rate);
        Ok(ReferenceSettings {
            enabled: self.reference,
            budget_threshold,
            fx_threshold: budget_threshold + per_mille_threshold(self.fx_change_rate),
            base,
        })
    }
}

/// Produces simulated records as JSON bytes, so they take the same decoding path as any input,
/// and reference changes as [`Payload::Reference`].
pub struct GeneratorSource {
    stream: Stream,
    rate: Option<u64>,
    events: Option<u64>,
    started: Option<Instant>,
    /// Records produced before this source was opened (regenerated, not returned).
    skipped: u64,
    name: Arc<str>,
}

impl GeneratorSource {
    /// A source over a new simulator.
    ///
    /// # Errors
    ///
    /// [`SourceError::Generator`] if the settings are invalid.
    pub fn new(config: GeneratorSourceConfig) -> Result<Self, SourceError> {
        let settings = config
            .reference_settings()
            .map_err(SourceError::Generator)?;
        let simulator =
            Simulator::new(config.simulator).map_err(|e| SourceError::Generator(e.to_string()))?;
        Ok(GeneratorSource {
            stream: Stream::new(simulator, settings),
            rate: config.rate.filter(|r| *r > 0),
            events: config.events,
            started: None,
            skipped: 0,
            name: Arc::from(SOURCE_NAME),
        })
    }

    /// A source that continues after the records a checkpoint covers: the stream is generated
    /// again from the start and the first `restored` records (the position of partition 0 of
    /// [`SOURCE_NAME`]) are dropped, so the records returned are exactly those that followed
    /// them. The rate paces the records still to come.
    ///
    /// # Errors
    ///
    /// As [`GeneratorSource::new`].
    pub fn resume(
        config: GeneratorSourceConfig,
        restored: &RestoredPositions,
    ) -> Result<Self, SourceError> {
        let mut source = GeneratorSource::new(config)?;
        let position = restored
            .get(&(SOURCE_NAME.to_string(), 0))
            .copied()
            .unwrap_or(0)
            .max(0) as u64;
        for _ in 0..position {
            source.stream.next_item();
        }
        source.skipped = position;
        Ok(source)
    }

    /// The simulator (for user profiles and merchants).
    pub fn simulator(&self) -> &Simulator {
        self.stream.simulator()
    }

    /// Records produced so far, the skipped ones of a resumed source included: the offset of
    /// the next record.
    pub fn produced(&self) -> u64 {
        self.stream.produced()
    }
}

impl Source for GeneratorSource {
    fn poll(&mut self, out: &mut Vec<SourceRecord>, max: usize) -> Result<Poll, SourceError> {
        let started = *self.started.get_or_insert_with(Instant::now);
        let produced = self.stream.produced();
        let mut allowed = max as u64;
        if let Some(events) = self.events {
            if produced >= events {
                return Ok(Poll::Finished);
            }
            allowed = allowed.min(events - produced);
        }
        if let Some(rate) = self.rate {
            // Records due by now at the configured rate, minus those already produced here.
            let due = (started.elapsed().as_micros() as u64).saturating_mul(rate) / 1_000_000;
            allowed = allowed.min(due.saturating_sub(produced - self.skipped));
        }
        if allowed == 0 {
            return Ok(Poll::Idle);
        }
        for _ in 0..allowed {
            let offset = self.stream.produced() as i64;
            let payload = match self.stream.next_item() {
                Item::Expense(generated) => Payload::Bytes(generated.bytes.into()),
                Item::Reference(change) => Payload::Reference(change),
            };
            out.push(SourceRecord {
                payload,
                partition: 0,
                offset,
                expected_user: None,
                key: None,
            });
        }
        Ok(Poll::Ready)
    }

    fn partitions(&self) -> Vec<PartitionPosition> {
        vec![PartitionPosition {
            source: Arc::clone(&self.name),
            partition: 0,
            position: self.stream.produced() as i64,
            high_watermark: None,
            ..PartitionPosition::default()
        }]
    }
}
