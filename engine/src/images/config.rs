//! Where the HDFS image store lives.

use serde::{Deserialize, Serialize};

use super::ImageError;

/// The root used when the URL names no path.
pub const DEFAULT_ROOT: &str = "/spendflow/images";

/// The HDFS image store's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HdfsImageConfig {
    /// The NameNode, `hdfs://host:port` (or a name service from `HADOOP_CONF_DIR`).
    pub url: String,
    /// The directory that holds the blobs (`<root>/<sha[0..2]>/<sha>`) and the temporary upload
    /// files (`<root>/.tmp/`); absolute.
    #[serde(default = "default_root")]
    pub root: String,
}

fn default_root() -> String {
    DEFAULT_ROOT.to_string()
}

impl HdfsImageConfig {
    /// Parses `hdfs://host:port[/root]`: the path, if any, is the root; otherwise
    /// [`DEFAULT_ROOT`].
    ///
    /// # Errors
    ///
    /// [`ImageError::Invalid`] for a URL that is not `hdfs://` or `viewfs://`, or a root with
    /// `.` or `..` components.
    pub fn from_url(url: &str) -> Result<HdfsImageConfig, ImageError> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid_url(url));
        };
        if !matches!(scheme, "hdfs" | "viewfs") || rest.is_empty() {
            return Err(invalid_url(url));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(invalid_url(url));
        }
        let root = path.trim_end_matches('/');
        let config = HdfsImageConfig {
            url: format!("{scheme}://{authority}"),
            root: if root.is_empty() {
                DEFAULT_ROOT.to_string()
            } else {
                root.to_string()
            },
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the root.
    ///
    /// # Errors
    ///
    /// [`ImageError::Invalid`] naming the problem.
    pub fn validate(&self) -> Result<(), ImageError> {
        let ok = self.root.starts_with('/')
            && self.root.len() > 1
            && self
                .root
                .split('/')
                .skip(1)
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if ok {
            Ok(())
        } else {
            Err(ImageError::Invalid {
                message: format!(
                    "the image root must be an absolute HDFS path like /spendflow/images, got {:?}",
                    self.root
                ),
            })
        }
    }
}

fn invalid_url(url: &str) -> ImageError {
    ImageError::Invalid {
        message: format!(
            "--hdfs must look like hdfs://host:9000 or hdfs://host:9000/root/dir, got {url:?}"
        ),
    }
}
