//! Personnel: who a user is (name, e-mail, country, currency, monthly budget, masked cards) and
//! their picture. The gRPC `spendflow.v1.Personnel` service, the web report and
//! `spendflow images` all go through [`Personnel`].
//!
//! Two things sit behind it, each behind a trait so the demo and unit tests need no services:
//!
//! * a [`UserDirectory`]: the MySQL `users` and `cards` tables ([`MySqlDirectory`]), or an
//!   in-memory directory ([`MemoryDirectory`]), which for the demo derives users from the
//!   seeded simulator and gives each a generated avatar;
//! * an [`ImageStore`]: content-addressed blobs on HDFS, or in memory (see [`crate::images`]
//!   for the upload rules: magic bytes, size limit, temporary file and rename).
//!
//! The user's image reference (SHA-256, type, size) lives with the user, in the
//! `users.image_ref` column, so the directory is the single place that says which picture a
//! user has. An upload checks that the user exists before it accepts a byte, stores the blob,
//! then points the user at it. Replacing or deleting only moves the pointer; the old blob is
//! removed by [`Personnel::collect_garbage`] once no user references it (see
//! [`crate::images`] for why not at once). A server that serves Personnel runs that
//! collection itself every [`GC_INTERVAL`] ([`Personnel::collect_garbage_periodically`]), so
//! nobody has to run `spendflow images gc`.
//!
//! An upload must finish within [`UPLOAD_DEADLINE`] (set with
//! [`Personnel::with_upload_deadline`]) however steadily its bytes trickle in: past it the
//! upload is dropped, its temporary file removed, and the caller gets
//! [`PersonnelError::DeadlineExceeded`].

pub mod avatars;
pub mod config;
pub mod memory;
pub mod mysql;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::io::AsyncReadExt;

pub use config::PersonnelConfig;
pub use memory::MemoryDirectory;
pub use mysql::MySqlDirectory;

pub use crate::images::ImageRef;
use crate::images::{
    self, CHUNK_BYTES, GcOptions, GcReport, HdfsImageStore, ImageError, ImageStore,
    MemoryImageStore,
};

/// How long one upload may take, from its first byte to its check: 5 MiB at 64 KiB/s takes 80 s.
pub const UPLOAD_DEADLINE: Duration = Duration::from_secs(120);

/// How often a running server removes orphaned pictures and stale temporary uploads.
pub const GC_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Bytes of uploads the demo's in-memory image store holds beyond its generated avatars.
pub const DEMO_UPLOAD_BYTES: u64 = 64 * 1024 * 1024;

/// Uploaded pictures the demo's in-memory image store holds beyond its generated avatars.
pub const DEMO_UPLOADS: usize = 1000;

/// Bytes the demo's store sets aside per generated avatar (they are about 300).
const DEMO_AVATAR_BYTES: u64 = 4096;

/// A user as the Personnel service shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserDetails {
    /// The user id.
    pub user_id: u64,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// ISO 3166-1 alpha-2 country code.
    pub country: String,
    /// ISO 4217 currency of the user's expenses and budget.
    pub currency: String,
    /// Monthly budget in minor units of `currency`.
    pub monthly_budget_minor: i64,
    /// The user's cards, by card id.
    pub cards: Vec<MaskedCard>,
    /// The user's picture, if one was uploaded (or, in the demo, generated).
    pub image: Option<ImageRef>,
}

/// A card, never with its full number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskedCard {
    /// The card id the expenses carry, e.g. `c-42-1`.
    pub card_id: String,
    /// What to display: `•••• 4242`.
    pub masked_number: String,
}

impl MaskedCard {
    /// The masked form of a card id.
    ///
    /// spendflow stores card ids, never card numbers (the simulator has none). The four digits
    /// shown are derived from the card id (a stable hash), standing in for the last four digits
    /// of a real number so that cards can be told apart on screen.
    pub fn from_card_id(card_id: &str) -> MaskedCard {
        // FNV-1a: stable across runs and platforms.
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        for b in card_id.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
        }
        MaskedCard {
            card_id: card_id.to_string(),
            masked_number: format!("•••• {:04}", h % 10_000),
        }
    }
}

/// What can go wrong in [`Personnel`]. Maps onto gRPC status codes one to one (see
/// `serve::grpc`).
#[derive(Debug, thiserror::Error)]
pub enum PersonnelError {
    /// No such user, or the user has no image (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// A bad request or an unacceptable upload; the message says what to fix
    /// (`INVALID_ARGUMENT`).
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
    /// An upload over the size limit (`RESOURCE_EXHAUSTED`).
    #[error(
        "image too large: more than {limit} bytes received (the limit is {limit} bytes); scale \
         it down or compress it"
    )]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client's stream failed or ended before the upload was complete (`CANCELLED`).
    #[error("upload aborted: {0}")]
    Aborted(String),
    /// The upload took longer than its deadline; nothing was stored (`DEADLINE_EXCEEDED`).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The image store holds as much as it may (`RESOURCE_EXHAUSTED`); the message names the
    /// limit.
    #[error("{0}")]
    Full(String),
    /// Stored data does not match what it should be: a blob whose bytes do not hash to its
    /// name, a referenced blob that is missing, an unreadable reference (`DATA_LOSS`).
    #[error("stored image data is corrupt: {0}")]
    Corrupt(String),
    /// MySQL or HDFS failed (`UNAVAILABLE` if retriable, `INTERNAL` otherwise).
    #[error("{service}: {message}")]
    Unavailable {
        /// `MySQL`, or the image store's location.
        service: String,
        /// What failed.
        message: String,
        /// Whether the same request may succeed later.
        retriable: bool,
    },
}

impl PersonnelError {
    /// True if the same request may succeed later without a change.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            PersonnelError::Unavailable {
                retriable: true,
                ..
            }
        )
    }
}

impl From<ImageError> for PersonnelError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::Invalid { message } => PersonnelError::Invalid { message },
            ImageError::TooLarge { limit } => PersonnelError::TooLarge { limit },
            ImageError::Aborted { message } => PersonnelError::Aborted(message),
            ImageError::Corrupt { message } => PersonnelError::Corrupt(message),
            e @ ImageError::Full { .. } => PersonnelError::Full(e.to_string()),
            ImageError::Storage {
                store,
                message,
                retriable,
            } => PersonnelError::Unavailable {
                service: store,
                message,
                retriable,
            },
        }
    }
}

/// Where users come from. Implementations: [`MySqlDirectory`], [`MemoryDirectory`].
#[async_trait::async_trait]
pub trait UserDirectory: Send + Sync + fmt::Debug {
    /// The user, or `None` if there is no such user.
    async fn user(&self, user_id: u64) -> Result<Option<UserDetails>, PersonnelError>;

    /// Whether the user exists.
    async fn exists(&self, user_id: u64) -> Result<bool, PersonnelError> {
        Ok(self.user(user_id).await?.is_some())
    }

    /// Points the user at `image` (or at none) and returns the previous reference.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::NotFound`] if the user does not exist.
    async fn set_image(
        &self,
        user_id: u64,
        image: Option<&ImageRef>,
    ) -> Result<Option<ImageRef>, PersonnelError>;

    /// The SHA-256 of every blob some user references.
    async fn referenced_images(&self) -> Result<HashSet<String>, PersonnelError>;
}

/// User details and pictures, from a directory and an image store.
#[derive(Clone)]
pub struct Personnel {
    directory: Arc<dyn UserDirectory>,
    images: Arc<dyn ImageStore>,
    max_image_bytes: u64,
    upload_deadline: Duration,
}

impl fmt::Debug for Personnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Personnel")
            .field("directory", &self.directory)
            .field("images", &self.images.location())
            .field("max_image_bytes", &self.max_image_bytes)
            .field("upload_deadline", &self.upload_deadline)
            .finish()
    }
}

impl Personnel {
    /// Personnel over any directory and image store, with an image size limit in bytes.
    pub fn new(
        directory: Arc<dyn UserDirectory>,
        images: Arc<dyn ImageStore>,
        max_image_bytes: u64,
    ) -> Personnel {
        Personnel {
            directory,
            images,
            max_image_bytes,
            upload_deadline: UPLOAD_DEADLINE,
        }
    }

    /// The same, with another deadline per upload (default [`UPLOAD_DEADLINE`]).
    #[must_use]
    pub fn with_upload_deadline(mut self, deadline: Duration) -> Personnel {
        self.upload_deadline = deadline;
        self
    }

    /// Personnel over MySQL (`users`, `cards`) and HDFS. Blocking (it opens a MySQL
    /// connection): call it outside an async runtime or in `spawn_blocking`.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::Invalid`] for bad URLs; [`PersonnelError::Unavailable`] if MySQL
    /// cannot be reached or has no `users` table.
    pub fn connect(config: &PersonnelConfig) -> Result<Personnel, PersonnelError> {
        config.validate()?;
        let hdfs = images::HdfsImageConfig::from_url(&config.hdfs)?;
        let images = HdfsImageStore::new(hdfs)?;
        let directory = MySqlDirectory::connect(&config.mysql)?;
        Ok(Personnel::new(
            Arc::new(directory),
            Arc::new(images),
            config.max_image_bytes,
        ))
    }

    /// In-memory personnel for the demo: users `1..=users` with the profiles the seeded
    /// simulator gives them (the same as `spendflow generate` writes to MySQL for that seed),
    /// each with a generated avatar, and an in-memory image store (uploads last as long as the
    /// process, and take at most [`DEMO_UPLOAD_BYTES`] and [`DEMO_UPLOADS`] pictures beyond
    /// the avatars). Needs no service.
    pub fn demo(users: u64, seed: u64) -> Personnel {
        let avatars = usize::try_from(users).unwrap_or(usize::MAX);
        let store = MemoryImageStore::bounded(
            DEMO_UPLOAD_BYTES.saturating_add(users.saturating_mul(DEMO_AVATAR_BYTES)),
            DEMO_UPLOADS.saturating_add(avatars),
        );
        let directory = MemoryDirectory::from_simulator(users, seed, store.clone());
        Personnel::new(
            Arc::new(directory),
            Arc::new(store),
            images::DEFAULT_MAX_BYTES,
        )
    }

    /// The largest image accepted, in bytes.
    pub fn max_image_bytes(&self) -> u64 {
        self.max_image_bytes
    }

    /// Where the images are stored, for messages.
    pub fn image_location(&self) -> String {
        self.images.location()
    }

    /// The user, or `None` if there is no such user.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::Unavailable`] if the directory cannot be read.
    pub async fn user(&self, user_id: u64) -> Result<Option<UserDetails>, PersonnelError> {
        self.directory.user(user_id).await
    }

    /// The user's picture and its bytes; `None` if the user does not exist or has no picture.
    /// The bytes are checked against the SHA-256 they are stored under.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::Corrupt`] if the referenced blob is missing or its bytes do not match;
    /// [`PersonnelError::Unavailable`] if a service fails.
    pub async fn image(&self, user_id: u64) -> Result<Option<(ImageRef, Vec<u8>)>, PersonnelError> {
        let Some(image) = self.user(user_id).await?.and_then(|u| u.image) else {
            return Ok(None);
        };
        let Some(bytes) = self.images.read(&image.sha256).await? else {
            tracing::error!(user_id, sha256 = %image.sha256, store = %self.images.location(), "A user's image blob is missing.");
            return Err(PersonnelError::Corrupt(format!(
                "user {user_id}'s image {} is missing from {}; upload it again",
                image.sha256,
                self.images.location()
            )));
        };
        let actual = images::sha256_hex(&bytes);
        if actual != image.sha256 {
            tracing::error!(user_id, sha256 = %image.sha256, actual = %actual, "An image blob's bytes do not match its name.");
            return Err(PersonnelError::Corrupt(format!(
                "user {user_id}'s image {} reads back with SHA-256 {actual}; upload it again",
                image.sha256
            )));
        }
        Ok(Some((image, bytes)))
    }

    /// Checks that a user exists; the first step of an upload, before any byte is accepted.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::NotFound`] naming the user.
    pub async fn require_user(&self, user_id: u64) -> Result<(), PersonnelError> {
        if user_id == 0 {
            return Err(PersonnelError::Invalid {
                message: "user_id must be 1 or more".into(),
            });
        }
        if self.directory.exists(user_id).await? {
            Ok(())
        } else {
            Err(PersonnelError::NotFound(format!(
                "user {user_id} does not exist"
            )))
        }
    }

    /// Uploads a picture for a user from a stream of chunks and makes it the user's picture.
    /// `content_type` may be empty (the bytes decide); otherwise it must match them.
    ///
    /// The user must exist (checked before the first chunk is read). The bytes go to a
    /// temporary file; nothing is visible unless every check passed and every byte arrived.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::NotFound`], [`PersonnelError::Invalid`] (not PNG/JPEG/WebP, or not
    /// what was declared), [`PersonnelError::TooLarge`], [`PersonnelError::Aborted`] (the
    /// stream failed), [`PersonnelError::Unavailable`].
    pub async fn upload<S>(
        &self,
        user_id: u64,
        content_type: &str,
        chunks: S,
    ) -> Result<ImageRef, PersonnelError>
    where
        S: Stream<Item = Result<Bytes, ImageError>> + Send,
    {
        self.require_user(user_id).await?;
        let deadline = self.upload_deadline;
        let stored = tokio::time::timeout(
            deadline,
            images::store_stream(
                self.images.as_ref(),
                content_type,
                self.max_image_bytes,
                chunks,
            ),
        )
        .await;
        // Past the deadline the upload's future is dropped: its temporary file goes with it.
        let image = stored.map_err(|_| {
            tracing::info!(
                user_id,
                deadline_s = deadline.as_secs_f64(),
                "An upload took too long; dropped."
            );
            PersonnelError::DeadlineExceeded(format!(
                "the upload did not finish within {} s (the limit for one upload); nothing was \
                 stored: send the picture faster, or a smaller one",
                deadline.as_secs_f64()
            ))
        })??;
        let previous = self.directory.set_image(user_id, Some(&image)).await?;
        tracing::info!(
            user_id,
            sha256 = %image.sha256,
            content_type = %image.content_type,
            size = image.size,
            replaced = ?previous.as_ref().map(|p| &p.sha256),
            "Stored a user's image."
        );
        Ok(image)
    }

    /// [`Personnel::upload`] from bytes in memory.
    ///
    /// # Errors
    ///
    /// As [`Personnel::upload`].
    pub async fn put_image(
        &self,
        user_id: u64,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<ImageRef, PersonnelError> {
        let bytes = Bytes::from(bytes);
        let chunks: Vec<Result<Bytes, ImageError>> = (0..bytes.len())
            .step_by(CHUNK_BYTES)
            .map(|i| Ok(bytes.slice(i..(i + CHUNK_BYTES).min(bytes.len()))))
            .collect();
        self.upload(user_id, content_type, futures::stream::iter(chunks))
            .await
    }

    /// [`Personnel::upload`] from a file, read in chunks (never whole into memory). The file
    /// name does not matter; the bytes decide the type.
    ///
    /// # Errors
    ///
    /// As [`Personnel::upload`]; [`PersonnelError::Invalid`] if the file cannot be read.
    pub async fn upload_file(
        &self,
        user_id: u64,
        content_type: &str,
        path: &Path,
    ) -> Result<ImageRef, PersonnelError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| PersonnelError::Invalid {
                message: format!("cannot read {}: {e}", path.display()),
            })?;
        let display = path.display().to_string();
        let chunks = futures::stream::unfold(Some(file), move |file| {
            let display = display.clone();
            async move {
                let mut file = file?;
                let mut buf = vec![0u8; CHUNK_BYTES];
                match file.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Bytes::from(buf)), Some(file)))
                    }
                    Err(e) => Some((
                        Err(ImageError::Aborted {
                            message: format!("reading {display}: {e}"),
                        }),
                        None,
                    )),
                }
            }
        });
        self.upload(user_id, content_type, chunks).await
    }

    /// Writes the user's picture to `path` (through a temporary file beside it, renamed at the
    /// end, so `path` never holds a partial image) and returns its reference.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::NotFound`] if the user does not exist or has no picture;
    /// [`PersonnelError::Invalid`] if `path` cannot be written; as [`Personnel::image`].
    pub async fn download_to_file(
        &self,
        user_id: u64,
        path: &Path,
    ) -> Result<ImageRef, PersonnelError> {
        let Some((image, bytes)) = self.image(user_id).await? else {
            self.require_user(user_id).await?;
            return Err(PersonnelError::NotFound(format!(
                "user {user_id} has no image"
            )));
        };
        let mut temp = path.as_os_str().to_owned();
        temp.push(format!(".part-{:08x}", rand::random::<u32>()));
        let temp = PathBuf::from(temp);
        let write_error = |e: std::io::Error| PersonnelError::Invalid {
            message: format!("cannot write {}: {e}", path.display()),
        };
        if let Err(e) = write_new_private(&temp, &bytes).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(write_error(e));
        }
        if let Err(e) = tokio::fs::rename(&temp, path).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(write_error(e));
        }
        Ok(image)
    }

    /// Removes the user's picture (the user then has none) and returns what it was; `None` if
    /// the user had none. The blob itself goes at the next garbage collection if no other user
    /// references it.
    ///
    /// # Errors
    ///
    /// [`PersonnelError::NotFound`] if the user does not exist.
    pub async fn delete_image(&self, user_id: u64) -> Result<Option<ImageRef>, PersonnelError> {
        self.require_user(user_id).await?;
        let previous = self.directory.set_image(user_id, None).await?;
        tracing::info!(user_id, removed = ?previous.as_ref().map(|p| &p.sha256), "Removed a user's image reference.");
        Ok(previous)
    }

    /// Runs [`Personnel::collect_garbage`] with the default [`GcOptions`] every `every` until
    /// `stop` completes; what a server serving Personnel runs (every [`GC_INTERVAL`]), so
    /// replaced and deleted pictures go once the grace period is over without anyone running
    /// `spendflow images gc`. A failed pass is logged and tried again the next time.
    pub async fn collect_garbage_periodically(
        self: Arc<Self>,
        every: Duration,
        stop: impl std::future::Future<Output = ()> + Send,
    ) {
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = &mut stop => return,
            }
            // Stopping interrupts a pass too: each removal stands alone.
            let pass = tokio::select! {
                pass = self.collect_garbage(GcOptions::default()) => pass,
                () = &mut stop => return,
            };
            match pass {
                Ok(report) if report.removed_blobs.is_empty() && report.removed_temp.is_empty() => {
                    tracing::debug!(%report, "Image garbage collection: nothing to remove.");
                }
                Ok(report) => {
                    tracing::info!(%report, store = %self.images.location(), "Image garbage collection.")
                }
                Err(e) => {
                    tracing::warn!(error = %e, store = %self.images.location(), "Image garbage collection failed; trying again later.")
                }
            }
        }
    }

    /// Removes blobs no user references (older than the grace period) and stale temporary
    /// files. The references are read first (see [`images::collect_garbage`]).
    ///
    /// # Errors
    ///
    /// [`PersonnelError::Unavailable`] if a service fails.
    pub async fn collect_garbage(&self, options: GcOptions) -> Result<GcReport, PersonnelError> {
        let referenced = self.directory.referenced_images().await?;
        Ok(images::collect_garbage(self.images.as_ref(), &referenced, options).await?)
    }
}

/// Writes `bytes` to a new file at `path`, owner-only (0600), never through an existing file
/// or link there.
async fn write_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).await?;
    file.write_all(bytes).await?;
    file.sync_all().await
}
