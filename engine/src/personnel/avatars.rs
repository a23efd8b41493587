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
    let results: Vec<Result<Option<Outcome>, PersonnelError>> =
        futures::stream::iter(1..=users)
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
