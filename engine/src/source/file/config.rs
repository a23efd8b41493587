use std::path::PathBuf;

use serde::Deserialize;

/// Settings of the file source.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// The file to read: JSON v1 records, one per line.
    pub path: PathBuf,
    /// Keep reading as the file grows, instead of finishing at its end.
    #[serde(default)]
    pub follow: bool,
}

impl FileSourceConfig {
    /// The source name its positions are recorded under: `file:<path>`.
    pub fn name(&self) -> String {
        format!("file:{}", self.path.display())
    }
}
