//! Unit tests of Personnel with the in-memory directory and store.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::images::{ImageStore, MemoryImageStore, avatar, now_ms, sha256_hex};

fn user(id: u64) -> UserDetails {
    UserDetails {
        user_id: id,
        name: format!("User {id}"),
        email: format!("user{id}@example.invalid"),
        country: "DE".into(),
        currency: "EUR".into(),
        monthly_budget_minor: 100_000,
        cards: vec![MaskedCard::from_card_id(&format!("c-{id}-1"))],
        image: None,
    }
}

fn personnel(users: &[u64]) -> (Personnel, MemoryImageStore) {
    let store = MemoryImageStore::new();
    let directory = MemoryDirectory::new(users.iter().map(|&id| user(id)));
    let p = Personnel::new(Arc::new(directory), Arc::new(store.clone()), 10_000);
    (p, store)
}

/// A valid PNG of `len` bytes, different for each `n` (uploads are decoded whole).
fn png(n: u8, len: usize) -> Vec<u8> {
    avatar::padded_png(u64::from(n), len)
}

#[test]
fn masked_cards_show_four_stable_digits() {
    let a = MaskedCard::from_card_id("c-42-1");
    assert_eq!(a, MaskedCard::from_card_id("c-42-1"));
    assert!(a.masked_number.starts_with("•••• "), "{}", a.masked_number);
    let digits = a.masked_number.trim_start_matches("•••• ");
    assert_eq!(digits.len(), 4);
    assert!(digits.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(a.card_id, "c-42-1");
}

#[tokio::test]
async fn demo_users_come_from_the_simulator_with_avatars() {
    let p = Personnel::demo(50, 42);
    let u = p.user(7).await.unwrap().expect("user 7");
    let sim = crate::source::generator::Simulator::new(crate::source::generator::GeneratorConfig {
        seed: 42,
        users: 50,
        ..Default::default()
    })
    .unwrap()
    .user(7)
    .unwrap();
    assert_eq!(
        (u.name.as_str(), u.email.as_str()),
        (sim.name.as_str(), sim.email.as_str())
    );
    assert_eq!(u.monthly_budget_minor, sim.monthly_budget_minor);
    assert_eq!(u.cards.len(), sim.cards.len());
    let image = u.image.clone().expect("a generated avatar");
    assert_eq!(image.content_type, "image/png");
    let (got, bytes) = p.image(7).await.unwrap().expect("avatar bytes");
    assert_eq!(got, image);
    assert_eq!(sha256_hex(&bytes), image.sha256);
    assert_eq!(bytes, avatar::avatar_png(42, 7));
    assert!(p.user(0).await.unwrap().is_none());
    assert!(p.user(51).await.unwrap().is_none());
    assert!(p.image(51).await.unwrap().is_none());
    // Uploads work in the demo too.
    let new = p.put_image(7, "", png(1, 500)).await.unwrap();
    assert_eq!(p.user(7).await.unwrap().unwrap().image, Some(new));
}

#[tokio::test]
async fn unknown_user_is_refused_before_any_chunk() {
    let (p, store) = personnel(&[1]);
    let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&polled);
    let chunks = futures::stream::poll_fn(move |_| {
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        std::task::Poll::Ready(None::<Result<Bytes, ImageError>>)
    });
    let err = p.upload(99, "image/png", chunks).await.unwrap_err();
    assert!(
        matches!(err, PersonnelError::NotFound(ref m) if m.contains("99")),
        "{err:?}"
    );
    assert!(
        !polled.load(std::sync::atomic::Ordering::Relaxed),
        "a chunk was read"
    );
    assert!(store.list_temp().await.unwrap().is_empty());
    assert!(matches!(
        p.delete_image(99).await,
        Err(PersonnelError::NotFound(_))
    ));
    assert!(matches!(
        p.require_user(0).await,
        Err(PersonnelError::Invalid { .. })
    ));
}

#[tokio::test]
async fn refusals_map_to_their_errors() {
    let (p, store) = personnel(&[1]);
    let err = p
        .put_image(1, "image/png", b"text, named .png".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, PersonnelError::Invalid { .. }), "{err:?}");
    let err = p.put_image(1, "", png(1, 10_001)).await.unwrap_err();
    assert!(
        matches!(err, PersonnelError::TooLarge { limit: 10_000 }),
        "{err:?}"
    );
    assert!(store.list_blobs().await.unwrap().is_empty());
    assert!(store.list_temp().await.unwrap().is_empty());
    assert_eq!(p.user(1).await.unwrap().unwrap().image, None);
}

#[tokio::test]
async fn replace_delete_and_orphans() {
    let (p, store) = personnel(&[1, 2]);
    let first = p.put_image(1, "image/png", png(1, 800)).await.unwrap();
    let second = p.put_image(1, "image/png", png(2, 900)).await.unwrap();
    assert_ne!(first.sha256, second.sha256);
    assert_eq!(
        p.user(1).await.unwrap().unwrap().image,
        Some(second.clone())
    );
    let (_, bytes) = p.image(1).await.unwrap().unwrap();
    assert_eq!(bytes, png(2, 900));

    // User 2 shares the first picture: it is referenced again.
    let shared = p.put_image(2, "", png(1, 800)).await.unwrap();
    assert_eq!(shared, first);
    assert_eq!(store.list_blobs().await.unwrap().len(), 2);

    // User 2 removes it: the blob is now an orphan, removed once past the grace period.
    assert_eq!(p.delete_image(2).await.unwrap(), Some(first.clone()));
    assert_eq!(p.delete_image(2).await.unwrap(), None);
    assert!(p.image(2).await.unwrap().is_none());
    let options = images::GcOptions {
        blob_grace: Duration::from_secs(60),
        temp_age: Duration::from_secs(60),
        dry_run: false,
    };
    let report = p.collect_garbage(options).await.unwrap();
    assert!(report.removed_blobs.is_empty(), "young orphans are kept");
    store.set_modified(&first.sha256, now_ms() - 120_000);
    store.set_modified(&second.sha256, now_ms() - 120_000);
    let report = p.collect_garbage(options).await.unwrap();
    assert_eq!(report.removed_blobs, vec![first.sha256.clone()]);
    assert!(store.read(&first.sha256).await.unwrap().is_none());
    assert!(
        p.image(1).await.unwrap().is_some(),
        "the referenced blob stays"
    );
}

#[tokio::test]
async fn a_missing_or_corrupt_blob_is_reported() {
    let (p, store) = personnel(&[1]);
    let image = p.put_image(1, "", png(3, 1000)).await.unwrap();
    store.remove_blob(&image.sha256).await.unwrap();
    assert!(matches!(p.image(1).await, Err(PersonnelError::Corrupt(_))));
    store.insert(&image.sha256, Bytes::from(png(4, 1000)));
    assert!(matches!(p.image(1).await, Err(PersonnelError::Corrupt(_))));
}

#[tokio::test]
async fn files_upload_in_chunks_and_download_atomically() {
    let (p, _store) = personnel(&[1]);
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("photo.png");
    std::fs::write(&text, "not a picture at all").unwrap();
    let err = p.upload_file(1, "", &text).await.unwrap_err();
    assert!(matches!(err, PersonnelError::Invalid { .. }));

    let real = dir.path().join("real.bin");
    let bytes = png(9, 200_000);
    std::fs::write(&real, &bytes).unwrap();
    let p = Personnel::new(p.directory.clone(), p.images.clone(), 1_000_000);
    let image = p.upload_file(1, "image/png", &real).await.unwrap();
    assert_eq!(image.size, 200_000);
    let out = dir.path().join("out.png");
    assert_eq!(p.download_to_file(1, &out).await.unwrap(), image);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers, 3, "no temporary file beside the output");
}

#[tokio::test(start_paused = true)]
async fn an_upload_that_trickles_past_its_deadline_is_dropped() {
    use futures::StreamExt;

    let (p, store) = personnel(&[1]);
    let p = p.with_upload_deadline(Duration::from_secs(10));
    let start = png(5, 2000);
    // A chunk a second, each well within any idle timeout, never ending.
    let trickle = futures::stream::iter(
        std::iter::once(start[..100].to_vec()).chain(std::iter::repeat(vec![0u8; 10])),
    )
    .then(|chunk| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(Bytes::from(chunk))
    });
    let err = p.upload(1, "", trickle).await.unwrap_err();
    match &err {
        PersonnelError::DeadlineExceeded(message) => {
            assert!(message.contains("within 10 s"), "{message}")
        }
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert!(
        store.list_temp().await.unwrap().is_empty(),
        "the temporary file goes"
    );
    assert!(store.list_blobs().await.unwrap().is_empty());
    assert_eq!(p.user(1).await.unwrap().unwrap().image, None);
}

#[tokio::test(start_paused = true)]
async fn a_running_server_collects_replaced_pictures_after_the_grace_period() {
    let (p, store) = personnel(&[1]);
    let old = p.put_image(1, "", png(6, 1000)).await.unwrap();
    let new = p.put_image(1, "", png(7, 1000)).await.unwrap();
    store.set_modified(&old.sha256, now_ms() - 3_600_000);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(Arc::new(p).collect_garbage_periodically(
        Duration::from_secs(60),
        async move {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(store.stat(&old.sha256).await.unwrap().is_some(), "not yet");
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(
        store.stat(&old.sha256).await.unwrap().is_none(),
        "collected"
    );
    assert!(store.stat(&new.sha256).await.unwrap().is_some(), "in use");
    stop.send(()).unwrap();
    task.await.unwrap();
}
