//! `spendflow generate --avatars`: a generated picture for every simulated user, uploaded
//! through the same path as any upload (checks, HDFS temporary file and rename, `image_ref` in
//! MySQL), so the full stack shows photos.
//!
//! Users who already have a picture are skipped: a second run does nothing new, and a picture
//! someone uploaded is never replaced by a generated one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{Personnel, PersonnelError};
use crate::images::{ImageKind, avatar};

/// Uploads at once.
const CONCURRENCY: usize = 8;

/// What [`attach_generated_avatars`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AvatarSummary {
    /// Avatars uploaded.
    pub uploaded: u64,
    /// Users skipped because they already had a picture.
    pub skipped: u64,
    /// User ids that do not exist in the directory.
    pub missing: u64,
    /// Whether `stop` ended it early.
    pub stopped: bool,
}

/// Gives users `1..=users` the avatar [`avatar::avatar_png`] makes for `(seed, user)`, unless
/// they have a picture already. Stops early (between users) when `stop` is set.
///
/// # Errors
///
/// The first failed upload or lookup (the run can simply be repeated).
pub async fn attach_generated_avatars(
    personnel: &Personnel,
    seed: u64,
    users: u64,
    stop: &AtomicBool,
) -> Result<AvatarSummary, PersonnelError> {
    let results: Vec<Result<Option<Outcome>, PersonnelError>> = futures::stream::iter(1..=users)
        .map(|user_id| async move {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let Some(user) = personnel.user(user_id).await? else {
                return Ok(Some(Outcome::Missing));
            };
            if user.image.is_some() {
                return Ok(Some(Outcome::Skipped));
            }
            let png = avatar::avatar_png(seed, user_id);
            personnel
                .put_image(user_id, ImageKind::Png.content_type(), png)
                .await?;
            Ok(Some(Outcome::Uploaded))
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut summary = AvatarSummary::default();
    for result in results {
        match result? {
            Some(Outcome::Uploaded) => summary.uploaded += 1,
            Some(Outcome::Skipped) => summary.skipped += 1,
            Some(Outcome::Missing) => summary.missing += 1,
            None => summary.stopped = true,
        }
    }
    Ok(summary)
}

enum Outcome {
    Uploaded,
    Skipped,
    Missing,
}

/// Waits until `user_id` exists in the directory (the generator writes users before its first
/// records), polling. Returns false on timeout or when `stop` is set.
///
/// # Errors
///
/// A directory error that is not retriable.
pub async fn wait_for_user(
    personnel: &Personnel,
    user_id: u64,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<bool, PersonnelError> {
    let deadline = Instant::now() + timeout;
    loop {
        match personnel.user(user_id).await {
            Ok(Some(_)) => return Ok(true),
            Ok(None) => {}
            Err(e) if e.is_retriable() => {}
            Err(e) => return Err(e),
        }
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The whole `--avatars` step, blocking (it runs beside `spendflow generate` on its own thread):
/// connects to MySQL and HDFS (retrying while the generator creates the schema), waits until
/// the generator has written user `users` (users are written before any record), then attaches
/// the avatars. Gives up after `timeout` without users, or when `stop` is set.
///
/// # Errors
///
/// Bad settings, a service that fails for good, or no users within `timeout`.
pub fn attach_when_ready(
    config: &super::PersonnelConfig,
    seed: u64,
    users: u64,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<AvatarSummary, PersonnelError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PersonnelError::Unavailable {
            service: "runtime".into(),
            message: e.to_string(),
            retriable: false,
        })?;
    let deadline = Instant::now() + timeout;
    let personnel = loop {
        match Personnel::connect(config) {
            Ok(p) => break p,
            // The database or its tables may not exist yet: the generator creates them.
            Err(PersonnelError::Unavailable { .. }) if Instant::now() < deadline => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(AvatarSummary {
                        stopped: true,
                        ..AvatarSummary::default()
                    });
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e),
        }
    };
    runtime.block_on(async {
        let left = deadline.saturating_duration_since(Instant::now());
        if !wait_for_user(&personnel, users, left, stop).await? {
            if stop.load(Ordering::Relaxed) {
                return Ok(AvatarSummary {
                    stopped: true,
                    ..AvatarSummary::default()
                });
            }
            return Err(PersonnelError::NotFound(format!(
                "user {users} did not appear in MySQL within {} s; avatars not attached",
                timeout.as_secs()
            )));
        }
        attach_generated_avatars(&personnel, seed, users, stop).await
    })
}
