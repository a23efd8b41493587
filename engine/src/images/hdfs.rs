//! The [`ImageStore`] on HDFS (hdfs-native: a pure-Rust client, no JVM).
//!
//! Layout under the root: `<sha[0..2]>/<sha>` for blobs (256 directories at most, so no
//! directory grows huge), `.tmp/<random>` for uploads in progress. An upload is written with
//! `overwrite = false` to its temporary path, closed (the NameNode then knows every block), and
//! renamed without overwrite; a rename that loses to another upload of the same content finds
//! the blob in place and just removes its temporary file.
//!
//! A [`PendingBlob`] dropped mid-upload (a client that went away drops the request's future)
//! removes its temporary file from a background task; `spendflow images gc` catches any that a
//! crash left behind.

use bytes::Bytes;
use hdfs_native::{Client, ClientBuilder, HdfsError, WriteOptions, file::FileWriter};

use super::config::HdfsImageConfig;
use super::{BlobInfo, ImageError, ImageStore, PendingBlob, TempInfo, blob_path, is_sha256_hex};

/// Blobs on HDFS under a root directory.
#[derive(Clone, Debug)]
pub struct HdfsImageStore {
    client: Client,
    config: HdfsImageConfig,
}

impl HdfsImageStore {
    /// A store for `config`. Does not connect yet: the first operation does, and reports an
    /// unreachable NameNode as a retriable [`ImageError::Storage`].
    ///
    /// # Errors
    ///
    /// [`ImageError::Invalid`] for a bad URL or root.
    pub fn new(config: HdfsImageConfig) -> Result<HdfsImageStore, ImageError> {
        config.validate()?;
        let client = ClientBuilder::new()
            .with_url(config.url.clone())
            .build()
            .map_err(|e| ImageError::Invalid {
                message: format!("HDFS URL {:?}: {e}", config.url),
            })?;
        Ok(HdfsImageStore { client, config })
    }

    /// The settings.
    pub fn config(&self) -> &HdfsImageConfig {
        &self.config
    }

    /// The hdfs-native client (tests look at paths directly).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The absolute path of a blob.
    pub fn blob_path(&self, sha256: &str) -> String {
        format!("{}/{}", self.config.root, blob_path(sha256))
    }

    /// The directory of temporary upload files.
    pub fn temp_dir(&self) -> String {
        format!("{}/.tmp", self.config.root)
    }

    fn error(&self, what: &str) -> impl FnOnce(HdfsError) -> ImageError + '_ {
        let what = what.to_string();
        move |e| storage_error(&self.location(), &what, e)
    }

    async fn list_dir(
        &self,
        dir: &str,
        recursive: bool,
    ) -> Result<Vec<hdfs_native::client::FileStatus>, ImageError> {
        match self.client.list_status(dir, recursive).await {
            Ok(list) => Ok(list),
            Err(HdfsError::FileNotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(storage_error(&self.location(), &format!("list {dir}"), e)),
        }
    }
}

fn storage_error(store: &str, what: &str, e: HdfsError) -> ImageError {
    let retriable = matches!(
        e,
        HdfsError::IOError(_)
            | HdfsError::DataTransferError(_)
            | HdfsError::ChecksumError
            | HdfsError::BlocksNotFound(_)
            | HdfsError::OperationFailed(_)
    );
    ImageError::Storage {
        store: store.to_string(),
        message: format!("{what}: {e}"),
        retriable,
    }
}

#[async_trait::async_trait]
impl ImageStore for HdfsImageStore {
    fn location(&self) -> String {
        format!("{}{}", self.config.url, self.config.root)
    }

    async fn begin(&self) -> Result<Box<dyn PendingBlob>, ImageError> {
        let name = super::temp_name();
        let path = format!("{}/{name}", self.temp_dir());
        let writer = self
            .client
            .create(
                &path,
                WriteOptions::default().overwrite(false).create_parent(true),
            )
            .await
            .map_err(self.error(&format!("create {path}")))?;
        Ok(Box::new(HdfsPending {
            store: self.clone(),
            name,
            path,
            writer: Some(writer),
        }))
    }

    async fn read(&self, sha256: &str) -> Result<Option<Vec<u8>>, ImageError> {
        if !is_sha256_hex(sha256) {
            return Ok(None);
        }
        let path = self.blob_path(sha256);
        let mut reader = match self.client.read(&path).await {
            Ok(reader) => reader,
            Err(HdfsError::FileNotFound(_)) => return Ok(None),
            Err(e) => return Err(storage_error(&self.location(), &format!("open {path}"), e)),
        };
        let len = reader.file_length();
        let bytes = reader
            .read_bytes(len)
            .await
            .map_err(self.error(&format!("read {path}")))?;
        Ok(Some(bytes.to_vec()))
    }

    async fn stat(&self, sha256: &str) -> Result<Option<BlobInfo>, ImageError> {
        if !is_sha256_hex(sha256) {
            return Ok(None);
        }
        let path = self.blob_path(sha256);
        match self.client.get_file_info(&path).await {
            Ok(status) => Ok(Some(BlobInfo {
                sha256: sha256.to_string(),
                size: status.length as u64,
                modified_ms: status.modification_time,
            })),
            Err(HdfsError::FileNotFound(_)) => Ok(None),
            Err(e) => Err(storage_error(&self.location(), &format!("stat {path}"), e)),
        }
    }

    async fn list_blobs(&self) -> Result<Vec<BlobInfo>, ImageError> {
        let mut out = Vec::new();
        for dir in self.list_dir(&self.config.root, false).await? {
            let prefix = dir.path.rsplit('/').next().unwrap_or_default().to_string();
            if !dir.isdir || prefix.len() != 2 {
                continue;
            }
            for file in self.list_dir(&dir.path, false).await? {
                let name = file.path.rsplit('/').next().unwrap_or_default();
                if file.isdir || !is_sha256_hex(name) || !name.starts_with(&prefix) {
                    continue;
                }
                out.push(BlobInfo {
                    sha256: name.to_string(),
                    size: file.length as u64,
                    modified_ms: file.modification_time,
                });
            }
        }
        Ok(out)
    }

    async fn list_temp(&self) -> Result<Vec<TempInfo>, ImageError> {
        Ok(self
            .list_dir(&self.temp_dir(), false)
            .await?
            .into_iter()
            .filter(|f| !f.isdir)
            .map(|f| TempInfo {
                name: f.path.rsplit('/').next().unwrap_or_default().to_string(),
                size: f.length as u64,
                modified_ms: f.modification_time,
            })
            .collect())
    }

    async fn remove_blob(&self, sha256: &str) -> Result<bool, ImageError> {
        if !is_sha256_hex(sha256) {
            return Ok(false);
        }
        let path = self.blob_path(sha256);
        match self.client.delete(&path, false).await {
            Ok(deleted) => Ok(deleted),
            Err(HdfsError::FileNotFound(_)) => Ok(false),
            Err(e) => Err(storage_error(
                &self.location(),
                &format!("delete {path}"),
                e,
            )),
        }
    }

    async fn remove_temp(&self, name: &str) -> Result<bool, ImageError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Ok(false);
        }
        let path = format!("{}/{name}", self.temp_dir());
        match self.client.delete(&path, false).await {
            Ok(deleted) => Ok(deleted),
            Err(HdfsError::FileNotFound(_)) => Ok(false),
            Err(e) => Err(storage_error(
                &self.location(),
                &format!("delete {path}"),
                e,
            )),
        }
    }
}

/// An upload into `<root>/.tmp/<name>`.
struct HdfsPending {
    store: HdfsImageStore,
    name: String,
    path: String,
    /// `None` once committed or aborted.
    writer: Option<FileWriter>,
}

impl HdfsPending {
    async fn remove_temp(&self) -> Result<(), ImageError> {
        match self.store.client.delete(&self.path, false).await {
            Ok(_) | Err(HdfsError::FileNotFound(_)) => Ok(()),
            Err(e) => Err(storage_error(
                &self.store.location(),
                &format!("delete {}", self.path),
                e,
            )),
        }
    }
}

#[async_trait::async_trait]
impl PendingBlob for HdfsPending {
    fn temp_name(&self) -> &str {
        &self.name
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), ImageError> {
        let location = self.store.location();
        let Some(writer) = self.writer.as_mut() else {
            return Err(ImageError::Storage {
                store: location,
                message: format!("{} is already closed", self.path),
                retriable: false,
            });
        };
        writer
            .write_bytes(chunk)
            .await
            .map_err(|e| storage_error(&location, &format!("write {}", self.path), e))?;
        Ok(())
    }

    async fn commit(mut self: Box<Self>, sha256: &str) -> Result<(), ImageError> {
        let location = self.store.location();
        if let Some(mut writer) = self.writer.take() {
            let closed = writer.close().await;
            drop(writer);
            if let Err(e) = closed {
                let _ = self.remove_temp().await;
                return Err(storage_error(&location, &format!("close {}", self.path), e));
            }
        }
        let client = self.store.client.clone();
        let target = self.store.blob_path(sha256);
        let dir = target.rsplit_once('/').map_or("/", |(d, _)| d).to_string();

        // The same content may be stored already: keep it, refresh its time (so a garbage
        // collection running now sees it as young), drop ours.
        if client.get_file_info(&target).await.is_ok() {
            touch(&client, &target).await;
            return self.remove_temp().await;
        }
        client
            .mkdirs(&dir, 0o755, true)
            .await
            .map_err(|e| storage_error(&location, &format!("mkdirs {dir}"), e))?;
        match client.rename(&self.path, &target, false).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Another upload of the same bytes may have won the race.
                if client.get_file_info(&target).await.is_ok() {
                    touch(&client, &target).await;
                    self.remove_temp().await
                } else {
                    let _ = self.remove_temp().await;
                    Err(storage_error(
                        &location,
                        &format!("rename {} to {target}", self.path),
                        e,
                    ))
                }
            }
        }
    }

    async fn abort(mut self: Box<Self>) -> Result<(), ImageError> {
        // Dropping the writer releases the lease; the half-written file is then deleted.
        drop(self.writer.take());
        self.remove_temp().await
    }
}

async fn touch(client: &Client, path: &str) {
    let now = super::now_ms();
    if let Err(e) = client.set_times(path, now, now).await {
        tracing::warn!(path, error = %e, "Could not refresh an image blob's modification time.");
    }
}

impl Drop for HdfsPending {
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        drop(writer);
        // Dropped mid-upload (the request's future was cancelled): delete the temporary file in
        // the background.
        let client = self.store.client.clone();
        let path = std::mem::take(&mut self.path);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    match client.delete(&path, false).await {
                        Ok(_) | Err(HdfsError::FileNotFound(_)) => {
                            tracing::debug!(path, "Removed an abandoned upload's temporary file.");
                        }
                        Err(e) => tracing::warn!(path, error = %e, "Could not remove an abandoned upload's temporary file; `spendflow images gc` will."),
                    }
                });
            }
            Err(_) => tracing::warn!(
                path,
                "An upload was abandoned outside a runtime; `spendflow images gc` will remove its temporary file."
            ),
        }
    }
}
