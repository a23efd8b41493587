//! An [`ImageStore`] in memory: for the demo (generated avatars, uploads that last as long as
//! the process) and for unit tests. It behaves like the HDFS store, temporary files included,
//! so tests of the upload rules (no partial blob after an abort) hold for both.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use super::{BlobInfo, ImageError, ImageStore, PendingBlob, TempInfo, now_ms};

#[derive(Debug, Default)]
struct Inner {
    /// Final blobs by SHA-256: bytes and modification time.
    blobs: BTreeMap<String, (Bytes, u64)>,
    /// Temporary files by name: bytes so far and modification time.
    temp: BTreeMap<String, (Vec<u8>, u64)>,
}

/// Blobs in a map; cheap to clone (clones share the blobs).
#[derive(Clone, Debug, Default)]
pub struct MemoryImageStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryImageStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryImageStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Stores `bytes` as a final blob under `sha256` directly (the caller vouches for the hash),
    /// keeping an existing one. For pre-generated content such as the demo's avatars.
    pub fn insert(&self, sha256: &str, bytes: Bytes) {
        self.lock()
            .blobs
            .entry(sha256.to_string())
            .or_insert_with(|| (bytes, now_ms()));
    }

    /// Sets a blob's modification time (tests of the garbage collector's grace period).
    pub fn set_modified(&self, sha256: &str, modified_ms: u64) {
        if let Some(blob) = self.lock().blobs.get_mut(sha256) {
            blob.1 = modified_ms;
        }
    }

    /// Sets a temporary file's modification time (tests).
    pub fn set_temp_modified(&self, name: &str, modified_ms: u64) {
        if let Some(temp) = self.lock().temp.get_mut(name) {
            temp.1 = modified_ms;
        }
    }
}

#[async_trait::async_trait]
impl ImageStore for MemoryImageStore {
    fn location(&self) -> String {
        "memory".to_string()
    }

    async fn begin(&self) -> Result<Box<dyn PendingBlob>, ImageError> {
        let name = super::temp_name();
        self.lock()
            .temp
            .insert(name.clone(), (Vec::new(), now_ms()));
        Ok(Box::new(MemoryPending {
            store: self.clone(),
            name,
            done: false,
        }))
    }

    async fn read(&self, sha256: &str) -> Result<Option<Vec<u8>>, ImageError> {
        Ok(self.lock().blobs.get(sha256).map(|(b, _)| b.to_vec()))
    }

    async fn stat(&self, sha256: &str) -> Result<Option<BlobInfo>, ImageError> {
        Ok(self.lock().blobs.get(sha256).map(|(b, m)| BlobInfo {
            sha256: sha256.to_string(),
            size: b.len() as u64,
            modified_ms: *m,
        }))
    }

    async fn list_blobs(&self) -> Result<Vec<BlobInfo>, ImageError> {
        Ok(self
            .lock()
            .blobs
            .iter()
            .map(|(sha, (b, m))| BlobInfo {
                sha256: sha.clone(),
                size: b.len() as u64,
                modified_ms: *m,
            })
            .collect())
    }

    async fn list_temp(&self) -> Result<Vec<TempInfo>, ImageError> {
        Ok(self
            .lock()
            .temp
            .iter()
            .map(|(name, (b, m))| TempInfo {
                name: name.clone(),
                size: b.len() as u64,
                modified_ms: *m,
            })
            .collect())
    }

    async fn remove_blob(&self, sha256: &str) -> Result<bool, ImageError> {
        Ok(self.lock().blobs.remove(sha256).is_some())
    }

    async fn remove_temp(&self, name: &str) -> Result<bool, ImageError> {
        Ok(self.lock().temp.remove(name).is_some())
    }
}

struct MemoryPending {
    store: MemoryImageStore,
    name: String,
    done: bool,
}

#[async_trait::async_trait]
impl PendingBlob for MemoryPending {
    fn temp_name(&self) -> &str {
        &self.name
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), ImageError> {
        let mut inner = self.store.lock();
        let Some(temp) = inner.temp.get_mut(&self.name) else {
            return Err(ImageError::Storage {
                store: "memory".into(),
                message: format!("temporary file {} vanished", self.name),
                retriable: false,
            });
        };
        temp.0.extend_from_slice(&chunk);
        temp.1 = now_ms();
        Ok(())
    }

    async fn commit(mut self: Box<Self>, sha256: &str) -> Result<(), ImageError> {
        self.done = true;
        let mut inner = self.store.lock();
        let Some((bytes, _)) = inner.temp.remove(&self.name) else {
            return Err(ImageError::Storage {
                store: "memory".into(),
                message: format!("temporary file {} vanished", self.name),
                retriable: false,
            });
        };
        let now = now_ms();
        inner
            .blobs
            .entry(sha256.to_string())
            .and_modify(|b| b.1 = now)
            .or_insert_with(|| (Bytes::from(bytes), now));
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<(), ImageError> {
        self.done = true;
        self.store.lock().temp.remove(&self.name);
        Ok(())
    }
}

impl Drop for MemoryPending {
    fn drop(&mut self) {
        if !self.done {
            self.store.lock().temp.remove(&self.name);
        }
    }
}
