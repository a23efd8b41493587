//! Personnel images: content-addressed blobs (SHA-256) on HDFS, or in memory for the demo and
//! unit tests.
//!
//! # Why content addressing
//!
//! A blob's name is the SHA-256 of its bytes, at `<root>/<sha[0..2]>/<sha>`. So a stored blob
//! never changes (no reader can see a half-replaced image), two users with the same picture
//! share one blob, and a download can be checked against its name. Which user shows which blob
//! is kept elsewhere: the `users.image_ref` column in MySQL (see [`crate::personnel`]).
//!
//! # Why uploads go through a temporary file
//!
//! An upload streams into `<root>/.tmp/<random>` and is renamed to its final path only once
//! every byte is written, its type checked and its hash known. A rename is atomic on the
//! NameNode, so a final path either does not exist or holds the complete blob. A client that
//! aborts mid-upload leaves only the temporary file, which the upload deletes itself (and
//! `spendflow images gc` removes any a crashed server left behind, once they are older than
//! its `--tmp-age-minutes`).
//!
//! # What is accepted
//!
//! PNG, JPEG and WebP only, recognised by their magic bytes whatever the client declares; a
//! declared content type must match the detected one. The size limit (default
//! [`DEFAULT_MAX_BYTES`], 5 MiB) is enforced while the chunks arrive, so an oversized upload
//! is refused without being buffered. Once every byte is in, the whole image is decoded (the
//! `image` crate, off the async threads) within [`MAX_DIMENSION`] pixels a side,
//! [`MAX_PIXELS`] pixels and [`MAX_DECODE_ALLOC`] bytes of decoder memory: a truncated or
//! damaged file, or a small file that unpacks into a huge picture, is refused and nothing is
//! stored.
//!
//! # Replace, delete and orphans
//!
//! Replacing or deleting a user's image only changes the user's reference: the old blob may be
//! shared with another user, or being streamed to a reader at that moment. Blobs no user
//! references are *orphans*; [`collect_garbage`] (`spendflow images gc`) removes those older
//! than a grace period (uploads that reuse an existing blob refresh its modification time, and
//! the reference set is read before the blobs are listed, so a blob being attached while gc
//! runs is kept).

pub mod avatar;
pub mod config;
pub mod hdfs;
pub mod memory;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use config::HdfsImageConfig;
pub use hdfs::HdfsImageStore;
pub use memory::MemoryImageStore;

/// The default largest image, in bytes: 5 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 5 * 1024 * 1024;

/// Widest and tallest picture accepted, in pixels.
pub const MAX_DIMENSION: u32 = 4096;

/// Most pixels (width × height) in a picture accepted.
pub const MAX_PIXELS: u64 = 16 * 1024 * 1024;

/// Most memory the decoder may allocate for one picture (16 Mpx of 8-bit RGBA is 64 MiB).
pub const MAX_DECODE_ALLOC: u64 = 128 * 1024 * 1024;

/// Bytes per chunk when images are streamed out (`GetImage`) or uploaded by the CLI.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Where an image is: its content address, what it is, and how large it is. Stored (as JSON) in
/// the user's `image_ref` column.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// SHA-256 of the bytes, 64 lowercase hex digits; also the blob's name.
    pub sha256: String,
    /// The detected type: `image/png`, `image/jpeg` or `image/webp`.
    pub content_type: String,
    /// Size in bytes.
    pub size: u64,
}

impl ImageRef {
    /// The JSON stored in MySQL.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses what [`ImageRef::to_json`] wrote.
    ///
    /// # Errors
    ///
    /// [`ImageError::Corrupt`] if the text is not a valid reference.
    pub fn from_json(text: &str) -> Result<ImageRef, ImageError> {
        let parsed: ImageRef = serde_json::from_str(text).map_err(|e| ImageError::Corrupt {
            message: format!("image_ref {text:?} is not a valid image reference: {e}"),
        })?;
        if !is_sha256_hex(&parsed.sha256) {
            return Err(ImageError::Corrupt {
                message: format!("image_ref {text:?} has no valid sha256"),
            });
        }
        Ok(parsed)
    }
}

/// The image formats accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageKind {
    /// PNG: `89 50 4E 47 0D 0A 1A 0A`.
    Png,
    /// JPEG: `FF D8 FF`.
    Jpeg,
    /// WebP: `RIFF <size> WEBP`.
    WebP,
}

impl ImageKind {
    /// Every accepted kind.
    pub const ALL: [ImageKind; 3] = [ImageKind::Png, ImageKind::Jpeg, ImageKind::WebP];

    /// Bytes [`ImageKind::detect`] needs to tell every kind apart.
    pub const MAGIC_LEN: usize = 12;

    /// The MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            ImageKind::Png => "image/png",
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::WebP => "image/webp",
        }
    }

    /// The kind a MIME type names (case-insensitive, parameters ignored; `image/jpg` is taken
    /// for JPEG).
    pub fn from_content_type(content_type: &str) -> Option<ImageKind> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "image/png" => Some(ImageKind::Png),
            "image/jpeg" | "image/jpg" => Some(ImageKind::Jpeg),
            "image/webp" => Some(ImageKind::WebP),
            _ => None,
        }
    }

    /// The kind the first bytes of a file show, if any.
    pub fn detect(head: &[u8]) -> Option<ImageKind> {
        if head.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) {
            Some(ImageKind::Png)
        } else if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageKind::Jpeg)
        } else if head.len() >= 12 && &head[0..4] == b"RIFF" && &head[8..12] == b"WEBP" {
            Some(ImageKind::WebP)
        } else {
            None
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.content_type())
    }
}

/// What can go wrong with an image or its storage.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The upload is not an acceptable image, or the request is malformed; the message says
    /// what was detected or what to fix.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
    /// The upload is larger than the limit.
    #[error(
        "image too large: more than {limit} bytes received (the limit is {limit} bytes); \
         scale it down or compress it"
    )]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client's stream ended with an error or was cancelled before the upload finished.
    #[error("upload aborted: {message}")]
    Aborted {
        /// Why.
        message: String,
    },
    /// A blob or a reference does not match what it should be.
    #[error("stored image is corrupt: {message}")]
    Corrupt {
        /// What does not match.
        message: String,
    },
    /// The store holds as much as it may (a bounded store, such as the demo's in memory).
    #[error("image store {store} is full: {limit}; delete pictures or retry later")]
    Full {
        /// Which store.
        store: String,
        /// The limit reached, e.g. `at most 1000 images`.
        limit: String,
    },
    /// The storage failed.
    #[error("image storage ({store}): {message}")]
    Storage {
        /// Which store, e.g. `hdfs://127.0.0.1:9000/spendflow/images`.
        store: String,
        /// What failed.
        message: String,
        /// Whether trying again may help (a connection problem) or not (a permission problem).
        retriable: bool,
    },
}

impl ImageError {
    /// True if the same request may succeed later.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            ImageError::Storage {
                retriable: true,
                ..
            }
        )
    }
}

/// One stored blob, as listed for garbage collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its SHA-256 (its name).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub modified_ms: u64,
}

/// One temporary upload file, as listed for garbage collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TempInfo {
    /// Its name under `<root>/.tmp/`.
    pub name: String,
    /// Bytes written so far.
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub modified_ms: u64,
}

/// Content-addressed blob storage. Implementations: [`HdfsImageStore`], [`MemoryImageStore`].
#[async_trait::async_trait]
pub trait ImageStore: Send + Sync + fmt::Debug {
    /// Where the blobs are, for messages (`hdfs://host:9000/root`, `memory`).
    fn location(&self) -> String;

    /// Starts an upload into a new temporary file.
    async fn begin(&self) -> Result<Box<dyn PendingBlob>, ImageError>;

    /// The blob's bytes, or `None` if there is no such blob.
    async fn read(&self, sha256: &str) -> Result<Option<Vec<u8>>, ImageError>;

    /// The blob's size, or `None` if there is no such blob.
    async fn stat(&self, sha256: &str) -> Result<Option<BlobInfo>, ImageError>;

    /// Every blob.
    async fn list_blobs(&self) -> Result<Vec<BlobInfo>, ImageError>;

    /// Every temporary upload file.
    async fn list_temp(&self) -> Result<Vec<TempInfo>, ImageError>;

    /// Deletes a blob; false if it did not exist.
    async fn remove_blob(&self, sha256: &str) -> Result<bool, ImageError>;

    /// Deletes a temporary file; false if it did not exist.
    async fn remove_temp(&self, name: &str) -> Result<bool, ImageError>;
}

/// An upload in progress, in a temporary file. Dropping it without [`PendingBlob::commit`]
/// removes the temporary file (in the background for stores that need I/O for it).
#[async_trait::async_trait]
pub trait PendingBlob: Send {
    /// The temporary file's name, under `<root>/.tmp/`.
    fn temp_name(&self) -> &str;

    /// Appends bytes.
    async fn write(&mut self, chunk: Bytes) -> Result<(), ImageError>;

    /// Finishes the file and moves it to its final path `<sha[0..2]>/<sha>`. If a blob with that
    /// name exists already (the same content), the temporary file is removed and the existing
    /// blob's modification time refreshed.
    async fn commit(self: Box<Self>, sha256: &str) -> Result<(), ImageError>;

    /// Removes the temporary file.
    async fn abort(self: Box<Self>) -> Result<(), ImageError>;
}

/// True for 64 lowercase hex digits.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// The blob's path relative to the root: `<sha[0..2]>/<sha>`.
pub fn blob_path(sha256: &str) -> String {
    format!("{}/{sha256}", &sha256[..2.min(sha256.len())])
}

/// A fresh random name for a temporary upload file.
pub(crate) fn temp_name() -> String {
    format!(
        "upload-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Streams `chunks` into `store` as one image: checks the type by magic bytes (and against
/// `declared`, if not empty), enforces `max_bytes` as the bytes arrive, hashes, and commits the
/// blob under its SHA-256. On any error the temporary file is removed and nothing is visible.
///
/// # Errors
///
/// [`ImageError::Invalid`] for an unknown declared type, a file that is not PNG/JPEG/WebP, or a
/// declared type that does not match the content (the message names what was detected);
/// [`ImageError::TooLarge`] past `max_bytes`; [`ImageError::Aborted`] if `chunks` yields an
/// error; [`ImageError::Storage`] if the store fails.
pub async fn store_stream<S>(
    store: &dyn ImageStore,
    declared: &str,
    max_bytes: u64,
    chunks: S,
) -> Result<ImageRef, ImageError>
where
    S: Stream<Item = Result<Bytes, ImageError>> + Send,
{
    let declared_kind = check_declared(declared)?;
    let mut pending = store.begin().await?;
    let fed = match feed(pending.as_mut(), declared_kind, max_bytes, chunks).await {
        Ok((sha256, kind, whole)) => check_decodes_off_thread(whole, kind)
            .await
            .map(|size| (sha256, kind, size)),
        Err(e) => Err(e),
    };
    match fed {
        Ok((sha256, kind, size)) => {
            pending.commit(&sha256).await?;
            Ok(ImageRef {
                sha256,
                content_type: kind.content_type().to_string(),
                size,
            })
        }
        Err(e) => {
            if let Err(cleanup) = pending.abort().await {
                tracing::warn!(error = %cleanup, "Could not remove a refused upload's temporary file; `spendflow images gc` will.");
            }
            Err(e)
        }
    }
}

/// [`check_decodes`] on a blocking thread; returns the size in bytes.
async fn check_decodes_off_thread(whole: Vec<u8>, kind: ImageKind) -> Result<u64, ImageError> {
    let size = whole.len() as u64;
    tokio::task::spawn_blocking(move || check_decodes(&whole, kind))
        .await
        .map_err(|e| ImageError::Invalid {
            message: format!("the image could not be checked: {e}"),
        })??;
    Ok(size)
}

/// Decodes the whole picture (as `kind`) within [`MAX_DIMENSION`], [`MAX_PIXELS`] and
/// [`MAX_DECODE_ALLOC`], and returns its width and height.
///
/// # Errors
///
/// [`ImageError::Invalid`] saying what is wrong: a side or the pixel count over the limit, or
/// data that does not decode (truncated, damaged).
pub fn check_decodes(bytes: &[u8], kind: ImageKind) -> Result<(u32, u32), ImageError> {
    let format = match kind {
        ImageKind::Png => image::ImageFormat::Png,
        ImageKind::Jpeg => image::ImageFormat::Jpeg,
        ImageKind::WebP => image::ImageFormat::WebP,
    };
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DIMENSION);
    limits.max_image_height = Some(MAX_DIMENSION);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    let reader = || {
        let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        reader.limits(limits.clone());
        reader
    };
    let refused = |e: image::ImageError| ImageError::Invalid {
        message: match e {
            image::ImageError::Limits(e) => format!(
                "the {kind} picture is over the limits ({MAX_DIMENSION} pixels a side, \
                 {MAX_PIXELS} pixels, {} MiB to decode): {e}; scale it down",
                MAX_DECODE_ALLOC >> 20
            ),
            e => format!("not a valid {kind} picture: {e} (it must decode completely)"),
        },
    };
    let (width, height) = reader().into_dimensions().map_err(refused)?;
    if width > MAX_DIMENSION
        || height > MAX_DIMENSION
        || u64::from(width) * u64::from(height) > MAX_PIXELS
    {
        return Err(ImageError::Invalid {
            message: format!(
                "the {kind} picture is {width}×{height} pixels, over the limits \
                 ({MAX_DIMENSION} pixels a side, {MAX_PIXELS} pixels); scale it down"
            ),
        });
    }
    reader().decode().map_err(refused)?;
    Ok((width, height))
}

/// Checks a declared content type: empty (let the content decide) or one of the accepted ones.
///
/// # Errors
///
/// [`ImageError::Invalid`] naming the accepted types.
pub fn check_declared(declared: &str) -> Result<Option<ImageKind>, ImageError> {
    if declared.trim().is_empty() {
        return Ok(None);
    }
    ImageKind::from_content_type(declared)
        .map(Some)
        .ok_or_else(|| ImageError::Invalid {
            message: format!(
                "content type {declared:?} is not accepted; images must be image/png, \
                 image/jpeg or image/webp"
            ),
        })
}

/// Checks the first bytes of an upload (or all of it, if shorter than [`ImageKind::MAGIC_LEN`]).
///
/// # Errors
///
/// [`ImageError::Invalid`] saying what was found.
pub fn check_content(head: &[u8], declared: Option<ImageKind>) -> Result<ImageKind, ImageError> {
    let Some(kind) = ImageKind::detect(head) else {
        let what = if head.is_empty() {
            "the upload is empty".to_string()
        } else if head
            .iter()
            .take(64)
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
        {
            "the content looks like text".to_string()
        } else {
            format!(
                "the content starts with bytes {}",
                hex(&head[..head.len().min(8)])
            )
        };
        return Err(ImageError::Invalid {
            message: format!(
                "not an accepted image: {what}, not a PNG, JPEG or WebP signature (the file \
                 name and declared type do not matter; the bytes do)"
            ),
        });
    };
    match declared {
        Some(declared) if declared != kind => Err(ImageError::Invalid {
            message: format!(
                "declared content type {declared} does not match the content, which is {kind}; \
                 declare {kind} or leave the content type empty"
            ),
        }),
        _ => Ok(kind),
    }
}

/// Streams the chunks into `pending` and returns the SHA-256, the kind and every byte (at
/// most `max_bytes`, for the decode check).
async fn feed<S>(
    pending: &mut dyn PendingBlob,
    declared: Option<ImageKind>,
    max_bytes: u64,
    chunks: S,
) -> Result<(String, ImageKind, Vec<u8>), ImageError>
where
    S: Stream<Item = Result<Bytes, ImageError>> + Send,
{
    let mut chunks = std::pin::pin!(chunks);
    let mut hasher = Sha256::new();
    let mut whole: Vec<u8> = Vec::new();
    let mut kind = None;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if chunk.is_empty() {
            continue;
        }
        if (whole.len() + chunk.len()) as u64 > max_bytes {
            return Err(ImageError::TooLarge { limit: max_bytes });
        }
        whole.extend_from_slice(&chunk);
        if kind.is_none() && whole.len() >= ImageKind::MAGIC_LEN {
            kind = Some(check_content(&whole[..ImageKind::MAGIC_LEN], declared)?);
        }
        hasher.update(&chunk);
        pending.write(chunk).await?;
    }
    let kind = match kind {
        Some(kind) => kind,
        None => check_content(&whole, declared)?,
    };
    Ok((hex(&hasher.finalize()), kind, whole))
}

/// What [`collect_garbage`] may remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcOptions {
    /// Orphaned blobs younger than this are kept (an upload may be attaching them right now).
    pub blob_grace: Duration,
    /// Temporary files younger than this are kept (an upload may still be writing them).
    pub temp_age: Duration,
    /// Only report what would be removed.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            blob_grace: Duration::from_secs(10 * 60),
            temp_age: Duration::from_secs(60 * 60),
            dry_run: false,
        }
    }
}

/// What [`collect_garbage`] found and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs looked at.
    pub blobs: usize,
    /// Blobs some user references.
    pub referenced: usize,
    /// Orphaned blobs removed (or, in a dry run, that would be).
    pub removed_blobs: Vec<String>,
    /// Orphaned blobs kept because they are younger than the grace period.
    pub young_orphans: usize,
    /// Temporary files removed (or that would be).
    pub removed_temp: Vec<String>,
    /// Temporary files kept because they are younger than the age limit.
    pub young_temp: usize,
    /// Bytes freed (or that would be).
    pub freed_bytes: u64,
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} blobs, {} referenced; removed {} orphaned blobs ({} kept, younger than the grace \
             period) and {} temporary files ({} kept, too recent); {} bytes freed",
            self.blobs,
            self.referenced,
            self.removed_blobs.len(),
            self.young_orphans,
            self.removed_temp.len(),
            self.young_temp,
            self.freed_bytes
        )
    }
}

/// Removes blobs that no reference in `referenced` names and that are older than the grace
/// period, and temporary files older than the age limit.
///
/// `referenced` must be read *before* this is called: a blob attached after that moment is
/// either younger than the grace period (a new upload, or an existing blob whose modification
/// time the upload refreshed) or found in a second look at its modification time just before
/// its removal.
///
/// # Errors
///
/// [`ImageError::Storage`] if listing or removing fails; what was removed before stays removed.
pub async fn collect_garbage(
    store: &dyn ImageStore,
    referenced: &HashSet<String>,
    options: GcOptions,
) -> Result<GcReport, ImageError> {
    let now = now_ms();
    let blob_cutoff = now.saturating_sub(options.blob_grace.as_millis() as u64);
    let temp_cutoff = now.saturating_sub(options.temp_age.as_millis() as u64);
    let mut report = GcReport::default();
    for blob in store.list_blobs().await? {
        report.blobs += 1;
        if referenced.contains(&blob.sha256) {
            report.referenced += 1;
            continue;
        }
        if blob.modified_ms > blob_cutoff {
            report.young_orphans += 1;
            continue;
        }
        if !options.dry_run {
            // Look again: an upload of the same bytes may have refreshed it since the listing.
            match store.stat(&blob.sha256).await? {
                Some(now) if now.modified_ms <= blob_cutoff => {}
                _ => {
                    report.young_orphans += 1;
                    continue;
                }
            }
            store.remove_blob(&blob.sha256).await?;
            tracing::info!(sha256 = %blob.sha256, size = blob.size, "Removed an orphaned image blob.");
        }
        report.freed_bytes += blob.size;
        report.removed_blobs.push(blob.sha256);
    }
    for temp in store.list_temp().await? {
        if temp.modified_ms > temp_cutoff {
            report.young_temp += 1;
            continue;
        }
        if !options.dry_run {
            store.remove_temp(&temp.name).await?;
            tracing::info!(name = %temp.name, size = temp.size, "Removed a stale temporary upload file.");
        }
        report.freed_bytes += temp.size;
        report.removed_temp.push(temp.name);
    }
    Ok(report)
}
