//! The simulator as a source: paced to a rate, optionally stopping after a number of records.

use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;

use super::{ConfigError, GeneratorConfig, Simulator};
use crate::error::SourceError;
use crate::source::{PartitionPosition, Payload, Poll, Source, SourceRecord};

/// Settings of the generator source.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSourceConfig {
    /// What the simulator produces (seed, users, shares of corrections, deletes, ...).
    #[serde(default)]
    pub simulator: GeneratorConfig,
    /// Records per second; `None` produces as fast as the engine takes them.
    #[serde(default)]
    pub rate: Option<u64>,
    /// Stop after this many records; `None` runs until the engine stops.
    #[serde(default)]
    pub events: Option<u64>,
}

impl GeneratorSourceConfig {
    /// Checks the simulator settings and the rate.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.simulator.validate()
    }
}

/// Produces simulated records as JSON bytes, so they take the same decoding path as any input.
pub struct GeneratorSource {
    simulator: Simulator,
    rate: Option<u64>,
    events: Option<u64>,
    started: Option<Instant>,
    produced: u64,
    name: Arc<str>,
}

impl GeneratorSource {
    /// A source over a new simulator.
    ///
    /// # Errors
    ///
    /// [`SourceError::Generator`] if the simulator settings are invalid.
    pub fn new(config: GeneratorSourceConfig) -> Result<Self, SourceError> {
        let simulator =
            Simulator::new(config.simulator).map_err(|e| SourceError::Generator(e.to_string()))?;
        Ok(GeneratorSource {
            simulator,
            rate: config.rate.filter(|r| *r > 0),
            events: config.events,
            started: None,
            produced: 0,
            name: Arc::from("generator"),
        })
    }

    /// The simulator (for user profiles and merchants).
    pub fn simulator(&self) -> &Simulator {
        &self.simulator
    }
}

impl Source for GeneratorSource {
    fn poll(&mut self, out: &mut Vec<SourceRecord>, max: usize) -> Result<Poll, SourceError> {
        let started = *self.started.get_or_insert_with(Instant::now);
        let mut allowed = max as u64;
        if let Some(events) = self.events {
            if self.produced >= events {
                return Ok(Poll::Finished);
            }
            allowed = allowed.min(events - self.produced);
        }
        if let Some(rate) = self.rate {
            // Records due by now at the configured rate, minus those already produced.
            let due = (started.elapsed().as_micros() as u64).saturating_mul(rate) / 1_000_000;
            allowed = allowed.min(due.saturating_sub(self.produced));
        }
        if allowed == 0 {
            return Ok(Poll::Idle);
        }
        for _ in 0..allowed {
            let generated = self.simulator.next_record();
            out.push(SourceRecord {
                payload: Payload::Bytes(generated.bytes),
                partition: 0,
                offset: self.produced as i64,
                expected_user: None,
                key: None,
            });
            self.produced += 1;
        }
        Ok(Poll::Ready)
    }

    fn partitions(&self) -> Vec<PartitionPosition> {
        vec![PartitionPosition {
            source: Arc::clone(&self.name),
            partition: 0,
            position: self.produced as i64,
            high_watermark: None,
            ..PartitionPosition::default()
        }]
    }
}
