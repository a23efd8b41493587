use spendflow_operators::{ExpenseId, Fact, Name};

use super::*;

fn sample(epoch: u64, live: usize) -> Checkpoint {
    let (groceries, _) = Name::intern("groceries");
    let (tesco, _) = Name::intern("Tesco");
    Checkpoint {
        epoch,
        positions: vec![SavedPosition {
            source: "expenses.user.7".into(),
            partition: 0,
            position: 1234,
        }],
        records_read: 1300,
        rejected: vec![("bad_json".into(), 12)],
        names: vec!["groceries".into(), "Tesco".into()],
        incarnation: "0123456789abcdef".into(),
        live: (0..live)
            .map(|i| {
                (
                    ExpenseId::new(&format!("e-{i}")).unwrap(),
                    Fact {
                        user_id: 7,
                        category: groceries,
                        merchant: tesco,
                        amount_minor: -(i as i64) * 3 + 1,
                        event_ms: 1_764_000_000_000 + i as i64,
                    },
                )
            })
            .collect(),
        dead_letter_scan: Some(DeadLetterScan {
            topic: "expenses.dead-letter".into(),
            from: vec![(0, 17), (1, 4)],
        }),
        reference: vec![
            (
                RefKey::User(7),
                RefValue::User {
                    budget_minor: Some(150_000),
                    currency: *b"SEK",
                },
            ),
            (
                RefKey::User(8),
                RefValue::User {
                    budget_minor: None,
                    currency: *b"EUR",
                },
            ),
            (
                RefKey::Fx(*b"SEK"),
                RefValue::Fx {
                    rate_micros: 87_000,
                },
            ),
        ],
    }
}

fn checkpoint_files(dir: &std::path::Path) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != "LOCK")
        .collect();
    files.sort();
    files
}

/// `bytes` (an encoded checkpoint) with its version replaced and the checksum recomputed.
fn with_version(bytes: &[u8], version: &[u8; 2]) -> Vec<u8> {
    let mut out = bytes[..bytes.len() - 8].to_vec();
    out[6..8].copy_from_slice(version);
    let mut sum = Checksummed::new(());
    sum.add(&out);
    out.extend_from_slice(&sum.sum.to_le_bytes());
    out
}

#[test]
fn encode_decode_round_trip() {
    let checkpoint = sample(42, 1000);
    let mut bytes = Vec::new();
    checkpoint.encode(&mut bytes).unwrap();
    assert_eq!(Checkpoint::decode(&bytes[..]).unwrap(), checkpoint);
}

#[test]
fn damage_is_detected() {
    let mut bytes = Vec::new();
    sample(1, 10).encode(&mut bytes).unwrap();
    let middle = bytes.len() / 2;
    let mut flipped = bytes.clone();
    flipped[middle] ^= 1;
    assert!(Checkpoint::decode(&flipped[..]).is_err());
    assert!(Checkpoint::decode(&bytes[..bytes.len() - 3]).is_err());
    assert!(Checkpoint::decode(&b"garbage"[..]).is_err());
}

#[test]
fn local_store_keeps_the_newest_and_skips_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LocalDirStore::open(dir.path()).unwrap();
    assert_eq!(store.latest().unwrap(), None);
    for epoch in [3, 5, 9] {
        store.save(&sample(epoch, 5)).unwrap();
    }
    assert_eq!(store.latest().unwrap().unwrap().epoch, 9);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    // A damaged newest file: the one before it is used.
    let newest = dir.path().join(format!("checkpoint-{:020}", 9));
    std::fs::write(&newest, b"SPFCKP02 truncated").unwrap();
    assert_eq!(store.latest().unwrap().unwrap().epoch, 5);
    // Saving again keeps the two newest files, the damaged one among them.
    store.save(&sample(10, 5)).unwrap();
    assert_eq!(store.latest().unwrap().unwrap().epoch, 10);
}

#[test]
fn a_second_engine_is_fenced_out() {
    let dir = tempfile::tempdir().unwrap();
    let first = LocalDirStore::open(dir.path()).unwrap();
    let err = LocalDirStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::Locked { .. }), "{err}");
    assert!(
        err.to_string().contains("in use by another engine"),
        "{err}"
    );
    drop(first);
    LocalDirStore::open(dir.path()).expect("free again once the first is gone");
}

#[test]
fn version_1_is_read_and_unknown_versions_are_refused_by_name() {
    let mut v1 = sample(4, 3);
    v1.dead_letter_scan = None;
    v1.reference.clear();
    let mut bytes = Vec::new();
    v1.encode(&mut bytes).unwrap();
    assert_eq!(&bytes[..8], b"SPFCKP03");
    let old = with_version(&bytes, b"01");
    assert_eq!(Checkpoint::decode(&old[..]).unwrap(), v1);
    let v2 = with_version(&bytes, b"02");
    assert_eq!(Checkpoint::decode(&v2[..]).unwrap(), v1);
    let future = with_version(&bytes, b"07");
    let err = Checkpoint::decode(&future[..]).unwrap_err();
    assert!(err.0.contains("version 07 is unknown"), "{err}");
}

#[test]
fn unreadable_checkpoints_refuse_the_start_naming_each_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LocalDirStore::open(dir.path()).unwrap();
    for epoch in [3, 5] {
        store.save(&sample(epoch, 5)).unwrap();
    }
    let path = |epoch: u64| dir.path().join(format!("checkpoint-{epoch:020}"));
    // Newest: a future format version; older: truncated.
    let mut bytes = std::fs::read(path(5)).unwrap();
    bytes = with_version(&bytes, b"09");
    std::fs::write(path(5), &bytes).unwrap();
    let truncated = std::fs::read(path(3)).unwrap();
    std::fs::write(path(3), &truncated[..truncated.len() / 2]).unwrap();

    let err = store.latest().unwrap_err();
    assert!(!err.is_retriable());
    let CheckpointError::Unreadable { refused, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(refused.len(), 2, "{err}");
    let text = err.to_string();
    for (file, why) in [(path(5), "version 09 is unknown"), (path(3), "truncated")] {
        let line = text
            .lines()
            .find(|l| l.contains(&file.display().to_string()))
            .unwrap_or_else(|| panic!("{} not named in: {text}", file.display()));
        assert!(line.contains(why), "{line}");
    }
    assert!(text.contains("--discard-checkpoints"), "{text}");

    // The explicit opt-in moves them aside; nothing is deleted, and the store is empty.
    let moved = store.discard_all().unwrap();
    assert_eq!(moved.len(), 2);
    for (_, to) in &moved {
        assert!(to.exists(), "{}", to.display());
    }
    assert_eq!(store.latest().unwrap(), None);
    store.save(&sample(6, 1)).unwrap();
    assert_eq!(store.latest().unwrap().unwrap().epoch, 6);
}

#[test]
fn a_file_that_cannot_be_opened_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    // A directory with a checkpoint's name: opening it for reading fails even for root.
    std::fs::create_dir(dir.path().join(format!("checkpoint-{:020}", 8))).unwrap();
    let err = store.latest().unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Unreadable { refused, .. } if refused.len() == 1),
        "{err}"
    );
}

#[test]
fn a_failed_write_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LocalDirStore::open(dir.path()).unwrap();
    store.save(&sample(1, 2)).unwrap();
    // The final name is taken by a non-empty directory: the temporary file is written, the
    // rename fails (for root too).
    let blocked = dir.path().join(format!("checkpoint-{:020}", 2));
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("x"), b"x").unwrap();
    let err = store.save(&sample(2, 2)).unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert_eq!(
        checkpoint_files(dir.path()),
        vec![
            format!("checkpoint-{:020}", 1),
            format!("checkpoint-{:020}", 2)
        ],
        "no .tmp- file stays behind"
    );
    std::fs::remove_dir_all(&blocked).unwrap();
    store.save(&sample(2, 2)).unwrap();
    assert_eq!(store.latest().unwrap().unwrap().epoch, 2);
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[cfg(unix)]
#[test]
fn the_directory_and_every_file_are_owner_only() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("a").join("checkpoints");
    let mut store = LocalDirStore::open(&dir).unwrap();
    store.save(&sample(1, 2)).unwrap();
    store.save(&sample(2, 2)).unwrap();
    assert_eq!(mode(&dir), 0o700, "the checkpoint directory");
    assert_eq!(mode(&dir.join("LOCK")), 0o600, "the lock file");
    for name in checkpoint_files(&dir) {
        assert_eq!(mode(&dir.join(&name)), 0o600, "{name}");
    }
    let moved = store.discard_all().unwrap();
    let aside = moved[0].1.parent().unwrap();
    assert_eq!(mode(aside), 0o700, "the directory of discarded checkpoints");
}

#[cfg(unix)]
#[test]
fn links_planted_in_the_directory_are_never_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let mut store = LocalDirStore::open(dir.path()).unwrap();
    // At the names the engine writes: the final name and the temporary name it used to use.
    let name = format!("checkpoint-{:020}", 3);
    std::os::unix::fs::symlink(&victim, dir.path().join(&name)).unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join(format!(".tmp-{name}"))).unwrap();
    store.save(&sample(3, 2)).unwrap();
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious",
        "the target is untouched"
    );
    let saved = dir.path().join(&name);
    assert!(
        std::fs::symlink_metadata(&saved)
            .unwrap()
            .file_type()
            .is_file(),
        "the link was replaced by the checkpoint"
    );
    assert_eq!(mode(&saved), 0o600);
    assert_eq!(store.latest().unwrap().unwrap(), sample(3, 2));
    drop(store);

    // A link at the lock file's name is refused, not followed.
    let other = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&victim, other.path().join("LOCK")).unwrap();
    let err = LocalDirStore::open(other.path()).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn temporary_files_of_a_crashed_engine_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let leftover = dir.path().join(".tmp-checkpoint-abc123");
    std::fs::write(&leftover, b"half a checkpoint").unwrap();
    let _store = LocalDirStore::open(dir.path()).unwrap();
    assert!(!leftover.exists());
}

/// The live entries keep their length-prefixed ids, so the format (and its version) did not
/// change when ids became inline and limited; but a checkpoint written when longer ids were
/// accepted, holding one, is refused with a message saying why, never shortened or skipped.
#[test]
fn a_live_id_longer_than_the_contract_allows_is_refused_by_name() {
    let mut bytes = Vec::new();
    sample(9, 1).encode(&mut bytes).unwrap();
    // The one entry follows magic (8), header length (8) and the header.
    let header_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let entry = 16 + header_len;
    assert_eq!(&bytes[entry..entry + 4], &3u32.to_le_bytes(), "the id e-0");
    let long = "x".repeat(ExpenseId::MAX_LEN + 1);
    let mut out = bytes[..entry].to_vec();
    out.extend_from_slice(&(long.len() as u32).to_le_bytes());
    out.extend_from_slice(long.as_bytes());
    out.extend_from_slice(&bytes[entry + 4 + 3..bytes.len() - 8]);
    let mut sum = Checksummed::new(());
    sum.add(&out);
    out.extend_from_slice(&sum.sum.to_le_bytes());
    let err = Checkpoint::decode(&out[..]).unwrap_err();
    assert!(
        err.0.contains("entry 0")
            && err.0.contains("129 bytes")
            && err.0.contains("at most 128 bytes"),
        "{err}"
    );
    // The same bytes with the id that fits read back as written.
    assert_eq!(Checkpoint::decode(&bytes[..]).unwrap(), sample(9, 1));
}
