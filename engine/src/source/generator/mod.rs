//! The generator source: the seeded simulator ([`spendflow_simulator`]) read in process, one
//! partition whose offset is the number of records generated.

mod source;

pub use source::{GeneratorSource, GeneratorSourceConfig};
pub use spendflow_simulator::{
    Category, ConfigError, Generated, GeneratedKind, GeneratorConfig, MALFORMED_KINDS,
    MAX_EVENT_MS, MAX_LIVE_WINDOW, MAX_MERCHANTS, MAX_USERS, Merchant, Simulator, UserProfile,
    default_start_ms,
};
