//! An [`ImageStore`] in memory: for the demo (generated avatars, uploads that last as long as
//! the process) and for unit tests. It behaves like the HDFS store, temporary files included,
//! so tests of the upload rules (no partial blob after an abort) hold for both.
//!
//! A store made with [`MemoryImageStore::bounded`] (the demo's) holds at most so many bytes
//! and images, temporary files included: an upload past either answers
//! [`ImageError::Full`] naming the limit, and the space comes back when pictures are
//! replaced or deleted and the garbage collector removes the old ones.

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
    /// Bytes in `blobs` and `temp`.
    held: u64,
    /// Most bytes held (`u64::MAX`: unbounded).
    max_bytes: u64,
    /// Most blobs and temporary files (`usize::MAX`: unbounded).
    max_images: usize,
}

impl Inner {
    /// Removes a temporary file; false if it did not exist.
    fn remove_temp(&mut self, name: &str) -> bool {
        let removed = self.temp.remove(name);
        self.held -= removed.as_ref().map_or(0, |(b, _)| b.len() as u64);
        removed.is_some()
    }

    fn full(&self, limit: String) -> ImageError {
        ImageError::Full {
            store: "memory".into(),
            limit,
        }
    }
}

/// Blobs in a map; cheap to clone (clones share the blobs).
#[derive(Clone, Debug)]
pub struct MemoryImageStore {
    inner: Arc<Mutex<Inner>>,
}

impl Default for MemoryImageStore {
    fn default() -> Self {
        MemoryImageStore::new()
    }
}

impl MemoryImageStore {
    /// An empty store without bounds.
    pub fn new() -> Self {
        MemoryImageStore::bounded(u64::MAX, usize::MAX)
    }

    /// An empty store that holds at most `max_bytes` bytes and `max_images` images (temporary
    /// uploads included). Images [`MemoryImageStore::insert`] puts in count, but are never
    /// refused.
    pub fn bounded(max_bytes: u64, max_images: usize) -> Self {
        MemoryImageStore {
            inner: Arc::new(Mutex::new(Inner {
                max_bytes,
                max_images,
                ..Inner::default()
            })),
        }
    }

    /// Bytes and images held now (temporary uploads included).
    pub fn usage(&self) -> (u64, usize) {
        let inner = self.lock();
        (inner.held, inner.blobs.len() + inner.temp.len())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Stores `bytes` as a final blob under `sha256` directly (the caller vouches for the hash),
    /// keeping an existing one. For pre-generated content such as the demo's avatars.
    pub fn insert(&self, sha256: &str, bytes: Bytes) {
        let mut inner = self.lock();
        if !inner.blobs.contains_key(sha256) {
            inner.held += bytes.len() as u64;
            inner.blobs.insert(sha256.to_string(), (bytes, now_ms()));
        }
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
        let mut inner = self.lock();
        if inner.blobs.len() + inner.temp.len() >= inner.max_images {
            let limit = format!("at most {} images", inner.max_images);
            return Err(inner.full(limit));
        }
        inner.temp.insert(name.clone(), (Vec::new(), now_ms()));
        drop(inner);
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
        let mut inner = self.lock();
        let removed = inner.blobs.remove(sha256);
        inner.held -= removed.as_ref().map_or(0, |(b, _)| b.len() as u64);
        Ok(removed.is_some())
    }

    async fn remove_temp(&self, name: &str) -> Result<bool, ImageError> {
        Ok(self.lock().remove_temp(name))
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
        let held = inner.held + chunk.len() as u64;
        if held > inner.max_bytes {
            let limit = format!("at most {} bytes", inner.max_bytes);
            return Err(inner.full(limit));
        }
        let Some(temp) = inner.temp.get_mut(&self.name) else {
            return Err(ImageError::Storage {
                store: "memory".into(),
                message: format!("temporary file {} vanished", self.name),
                retriable: false,
            });
        };
        temp.0.extend_from_slice(&chunk);
        temp.1 = now_ms();
        inner.held = held;
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
        match inner.blobs.get_mut(sha256) {
            // The same content is stored already: the upload's bytes go.
            Some(existing) => {
                existing.1 = now;
                inner.held -= bytes.len() as u64;
            }
            None => {
                inner
                    .blobs
                    .insert(sha256.to_string(), (Bytes::from(bytes), now));
            }
        }
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<(), ImageError> {
        self.done = true;
        self.store.lock().remove_temp(&self.name);
        Ok(())
    }
}

impl Drop for MemoryPending {
    fn drop(&mut self) {
        if !self.done {
            self.store.lock().remove_temp(&self.name);
        }
    }
}
