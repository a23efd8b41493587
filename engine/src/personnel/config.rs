//! Where Personnel finds its users and images.

use serde::{Deserialize, Serialize};

use super::PersonnelError;
use crate::images::DEFAULT_MAX_BYTES;

/// Largest configurable image limit: 64 MiB (an image is held in memory when it is served).
pub const MAX_IMAGE_LIMIT: u64 = 64 * 1024 * 1024;

/// Personnel over MySQL and HDFS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonnelConfig {
    /// MySQL URL of the database `spendflow generate` wrote (`users`, `cards`), e.g.
    /// `mysql://spendflow:spendflow@127.0.0.1:13306/spendflow`.
    pub mysql: String,
    /// HDFS URL with an optional root directory for the images, e.g.
    /// `hdfs://127.0.0.1:9000/spendflow/images` (root default `/spendflow/images`).
    pub hdfs: String,
    /// Largest image accepted, in bytes (1 to 64 MiB).
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: u64,
}

fn default_max_image_bytes() -> u64 {
    DEFAULT_MAX_BYTES
}

impl PersonnelConfig {
    /// Settings with the default image limit.
    pub fn new(mysql: impl Into<String>, hdfs: impl Into<String>) -> PersonnelConfig {
        PersonnelConfig {
            mysql: mysql.into(),
            hdfs: hdfs.into(),
            max_image_bytes: DEFAULT_MAX_BYTES,
        }
    }

    /// Checks the limit.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::Invalid`] naming the setting.
    pub fn validate(&self) -> Result<(), PersonnelError> {
        if self.max_image_bytes == 0 || self.max_image_bytes > MAX_IMAGE_LIMIT {
            return Err(PersonnelError::Invalid {
                message: format!(
                    "max_image_bytes must be 1 to {MAX_IMAGE_LIMIT}, got {}",
                    self.max_image_bytes
                ),
            });
        }
        Ok(())
    }
}
