//! The generator source: the seeded simulator ([`spendflow_simulator`]) read in process, one
//! partition whose offset is the number of records generated, reference records (users'
//! budgets and currencies, exchange rates and their changes: [`reference`]) included.

pub mod reference;
mod source;
#[cfg(test)]
mod tests;

pub use source::{GeneratorConfigError, GeneratorSource, GeneratorSourceConfig, SOURCE_NAME};
pub use spendflow_simulator::{
    Category, ConfigError, Generated, GeneratedKind, GeneratorConfig, MALFORMED_KINDS,
    MAX_EVENT_MS, MAX_LIVE_WINDOW, MAX_MERCHANTS, MAX_USERS, Merchant, Simulator, UserProfile,
    default_start_ms,
};
