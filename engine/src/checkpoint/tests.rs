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

// Shares (issue 15): every process of a cluster writes its share of an epoch; a restart, with
// any number of processes, restores the newest epoch whose shares are all there.

use crate::cluster::Share;
use shares::{file_name, parse_file_name};

fn share(process: usize, processes: usize) -> Share {
    Share { process, processes }
}

/// Process `p`'s share of epoch `epoch`: its own users, partition, counters and names.
fn share_of(epoch: u64, p: usize) -> Checkpoint {
    let (category, _) = Name::intern("groceries");
    let merchant_text = format!("merchant-{p}");
    let (merchant, _) = Name::intern(&merchant_text);
    Checkpoint {
        epoch,
        positions: vec![SavedPosition {
            source: "expenses".into(),
            partition: p as i32,
            position: 100 * (p as i64 + 1),
        }],
        records_read: 10 * (p as u64 + 1),
        rejected: if p == 0 {
            vec![("bad_json".into(), 1)]
        } else {
            vec![("bad_amount".into(), p as u64), ("bad_json".into(), 2)]
        },
        names: vec!["groceries".into(), merchant_text],
        live: (0..3)
            .map(|i| {
                (
                    ExpenseId::new(&format!("e-{p}-{i}")).unwrap(),
                    Fact {
                        user_id: 100 + p as u64,
                        category,
                        merchant,
                        amount_minor: 500 + i,
                        event_ms: 1_764_000_000_000 + i,
                    },
                )
            })
            .collect(),
        reference: vec![(
            RefKey::User(100 + p as u64),
            RefValue::User {
                budget_minor: Some(1000 * (p as i64 + 1)),
                currency: *b"EUR",
            },
        )],
        incarnation: "cafe0001".into(),
        dead_letter_scan: Some(DeadLetterScan {
            topic: "expenses.dead-letter".into(),
            // Partition 0 in every share; partition p+1 in share p only.
            from: vec![(0, 10 + p as i64), (p as i32 + 1, 5)],
        }),
    }
}

/// Writes the shares `processes` of epoch `epoch` of a cluster of `n` into `dir`, each
/// through its own process's store (as the processes do), then releases their locks.
fn write_shares(dir: &std::path::Path, epoch: u64, n: usize, processes: &[usize]) {
    for &p in processes {
        let mut store = LocalDirStore::open_share(dir, share(p, n)).unwrap();
        store.save(&share_of(epoch, p)).unwrap();
    }
}

fn epoch_files(dir: &std::path::Path) -> Vec<String> {
    checkpoint_files(dir)
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect()
}

#[test]
fn file_names_say_the_epoch_and_the_share() {
    assert_eq!(
        file_name(12, Share::SINGLE),
        "checkpoint-00000000000000000012"
    );
    assert_eq!(
        file_name(12, share(1, 3)),
        "checkpoint-00000000000000000012-share-1-of-3"
    );
    for (epoch, s) in [
        (0, Share::SINGLE),
        (12, share(0, 2)),
        (u64::MAX, share(6, 7)),
    ] {
        assert_eq!(parse_file_name(&file_name(epoch, s)), Some((epoch, s)));
    }
    for other in [
        "LOCK",
        "LOCK-1",
        "checkpoint-",
        "checkpoint-+5",
        "checkpoint-12-share-3-of-3",
        "checkpoint-12-share-0-of-1",
        "checkpoint-12-share-1-of-",
        ".tmp-checkpoint-abc",
        "discarded-1700000000",
    ] {
        assert_eq!(parse_file_name(other), None, "{other}");
    }
}

#[test]
fn merge_concatenates_unites_and_sums() {
    let merged = Checkpoint::merge(vec![share_of(7, 0), share_of(7, 1), share_of(7, 2)]).unwrap();
    assert_eq!(merged.epoch, 7);
    assert_eq!(merged.incarnation, "cafe0001");
    assert_eq!(merged.records_read, 10 + 20 + 30);
    let mut rejected = merged.rejected.clone();
    rejected.sort();
    assert_eq!(
        rejected,
        vec![("bad_amount".into(), 3), ("bad_json".into(), 5)]
    );
    let mut names = merged.names.clone();
    names.sort();
    assert_eq!(
        names,
        vec!["groceries", "merchant-0", "merchant-1", "merchant-2"]
    );
    assert_eq!(merged.live.len(), 9);
    for p in 0..3 {
        assert!(
            share_of(7, p)
                .live
                .iter()
                .all(|entry| merged.live.contains(entry)),
            "share {p}'s live expenses"
        );
    }
    assert_eq!(
        merged.positions,
        (0..3)
            .flat_map(|p| share_of(7, p).positions)
            .collect::<Vec<_>>()
    );
    assert_eq!(merged.reference.len(), 3);
    // Partition 0: the smallest offset of all shares; partitions 1..3 are listed by one share
    // only, so the others' dead letters there may start anywhere: read from the start.
    assert_eq!(
        merged.dead_letter_scan,
        Some(DeadLetterScan {
            topic: "expenses.dead-letter".into(),
            from: vec![(0, 10)],
        })
    );

    // One share without a scan (or on another topic): the whole topic is read.
    let mut without = share_of(7, 1);
    without.dead_letter_scan = None;
    let merged = Checkpoint::merge(vec![share_of(7, 0), without]).unwrap();
    assert_eq!(merged.dead_letter_scan, None);
    let mut elsewhere = share_of(7, 1);
    elsewhere.dead_letter_scan.as_mut().unwrap().topic = "other".into();
    assert_eq!(
        Checkpoint::merge(vec![share_of(7, 0), elsewhere])
            .unwrap()
            .dead_letter_scan,
        None
    );

    // One share is itself, unchanged.
    assert_eq!(Checkpoint::merge(vec![sample(3, 4)]).unwrap(), sample(3, 4));
    assert!(Checkpoint::merge(Vec::new()).is_err());

    // Different timelines are not one checkpoint.
    let mut other = share_of(7, 1);
    other.incarnation = "beef0002".into();
    let err = Checkpoint::merge(vec![share_of(7, 0), other]).unwrap_err();
    assert!(err.contains("different incarnations"), "{err}");
}

#[test]
fn merge_keeps_the_smaller_position_of_a_partition_two_shares_hold() {
    let mut a = share_of(7, 0);
    let mut b = share_of(7, 1);
    b.positions = a.positions.clone();
    b.positions[0].position += 50;
    a.positions.push(SavedPosition {
        source: "a-first".into(),
        partition: 3,
        position: 1,
    });
    let merged = Checkpoint::merge(vec![b, a]).unwrap();
    assert_eq!(
        merged.positions,
        vec![
            SavedPosition {
                source: "a-first".into(),
                partition: 3,
                position: 1
            },
            share_of(7, 0).positions[0].clone()
        ]
    );
}

#[test]
fn shares_of_three_are_restored_merged_by_a_cluster_of_two() {
    let dir = tempfile::tempdir().unwrap();
    write_shares(dir.path(), 5, 3, &[0, 1, 2]);
    assert_eq!(
        epoch_files(dir.path()),
        (0..3)
            .map(|p| format!("checkpoint-{:020}-share-{p}-of-3", 5))
            .collect::<Vec<_>>()
    );
    let expected = Checkpoint::merge((0..3).map(|p| share_of(5, p)).collect()).unwrap();
    for p in 0..2 {
        let store = LocalDirStore::open_share(dir.path(), share(p, 2)).unwrap();
        assert_eq!(
            store.latest().unwrap().as_ref(),
            Some(&expected),
            "as {p} of 2"
        );
    }
    // And by a single engine, through `open_store`.
    let store = open_store(dir.path(), Share::SINGLE).unwrap();
    assert_eq!(store.latest().unwrap(), Some(expected));
}

#[test]
fn an_incomplete_epoch_is_never_used() {
    let dir = tempfile::tempdir().unwrap();
    write_shares(dir.path(), 5, 3, &[0, 1, 2]);
    // Epoch 9: process 1 died before writing its share.
    write_shares(dir.path(), 9, 3, &[0, 2]);
    let store = LocalDirStore::open_share(dir.path(), share(0, 3)).unwrap();
    let latest = store.latest().unwrap().unwrap();
    assert_eq!(latest.epoch, 5);
    assert_eq!(latest.live.len(), 9);
    drop(store);

    // Nothing complete at all: the cluster never finished a checkpoint, so there is none to
    // restore (reading everything again is exact); the files are no reason to refuse.
    let only_partial = tempfile::tempdir().unwrap();
    write_shares(only_partial.path(), 9, 3, &[0, 2]);
    let mut store = LocalDirStore::open_share(only_partial.path(), share(1, 3)).unwrap();
    assert_eq!(store.latest().unwrap(), None);
    // An unreadable file beside them still refuses the start, naming it.
    std::fs::write(
        only_partial.path().join(format!("checkpoint-{:020}", 4)),
        b"not a checkpoint",
    )
    .unwrap();
    let err = store.latest().unwrap_err();
    let CheckpointError::Unreadable { refused, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(refused.len(), 1, "{err}");
    std::fs::remove_file(only_partial.path().join(format!("checkpoint-{:020}", 4))).unwrap();
    assert_eq!(store.discard_all().unwrap().len(), 2);
    assert_eq!(store.latest().unwrap(), None);
}

#[test]
fn an_unreadable_share_or_disagreeing_shares_make_the_epoch_unusable() {
    let dir = tempfile::tempdir().unwrap();
    write_shares(dir.path(), 5, 2, &[0, 1]);
    write_shares(dir.path(), 6, 2, &[0, 1]);
    let path = |epoch: u64, p: usize| dir.path().join(file_name(epoch, share(p, 2)));
    // Epoch 6: share 1 damaged.
    let bytes = std::fs::read(path(6, 1)).unwrap();
    std::fs::write(path(6, 1), &bytes[..bytes.len() - 5]).unwrap();
    let store = LocalDirStore::open_share(dir.path(), share(0, 2)).unwrap();
    assert_eq!(store.latest().unwrap().unwrap().epoch, 5);
    // Epoch 5: share 1 of another incarnation (another timeline): nothing usable is left.
    let mut stranger = share_of(5, 1);
    stranger.incarnation = "beef0002".into();
    let mut bytes = Vec::new();
    stranger.encode(&mut bytes).unwrap();
    std::fs::write(path(5, 1), &bytes).unwrap();
    let err = store.latest().unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("truncated") && text.contains("different incarnations"),
        "{text}"
    );
    // A file holding another epoch than its name says is refused too.
    let mut misnamed = share_of(4, 1);
    misnamed.incarnation = "cafe0001".into();
    let mut bytes = Vec::new();
    misnamed.encode(&mut bytes).unwrap();
    std::fs::write(path(5, 1), &bytes).unwrap();
    let text = store.latest().unwrap_err().to_string();
    assert!(
        text.contains("holds epoch 4 but is named for epoch 5"),
        "{text}"
    );
}

#[test]
fn mixed_layouts_restore_the_newest_complete_epoch_of_either() {
    let dir = tempfile::tempdir().unwrap();
    // A cluster of 3 wrote epoch 5; rescaled to 2, it wrote epoch 8.
    write_shares(dir.path(), 5, 3, &[0, 1, 2]);
    write_shares(dir.path(), 8, 2, &[0, 1]);
    let store = LocalDirStore::open_share(dir.path(), share(1, 3)).unwrap();
    assert_eq!(
        store.latest().unwrap(),
        Some(Checkpoint::merge(vec![share_of(8, 0), share_of(8, 1)]).unwrap())
    );
    // Without share 1 of 2, epoch 8 is incomplete: back to the 3 shares of epoch 5.
    std::fs::remove_file(dir.path().join(file_name(8, share(1, 2)))).unwrap();
    assert_eq!(
        store.latest().unwrap(),
        Some(Checkpoint::merge((0..3).map(|p| share_of(5, p)).collect()).unwrap())
    );
}

#[test]
fn a_single_engines_checkpoint_keeps_its_name_and_is_restored_by_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    // Written as engines before clusters wrote it: the bare old file name.
    let mut bytes = Vec::new();
    sample(4, 3).encode(&mut bytes).unwrap();
    std::fs::write(dir.path().join("checkpoint-00000000000000000004"), &bytes).unwrap();
    let mut single = LocalDirStore::open(dir.path()).unwrap();
    assert_eq!(single.latest().unwrap(), Some(sample(4, 3)));
    single.save(&sample(6, 2)).unwrap();
    assert_eq!(
        epoch_files(dir.path()),
        vec![
            "checkpoint-00000000000000000004",
            "checkpoint-00000000000000000006"
        ]
    );
    drop(single);
    // Scaling out from one engine to three: each process restores the whole checkpoint.
    for p in 0..3 {
        let store = LocalDirStore::open_share(dir.path(), share(p, 3)).unwrap();
        assert_eq!(store.latest().unwrap(), Some(sample(6, 2)), "as {p} of 3");
    }
}

#[test]
fn retention_keeps_the_two_newest_complete_epochs_and_what_others_still_write() {
    let dir = tempfile::tempdir().unwrap();
    // Left over from the cluster of 3 this one was rescaled from.
    write_shares(dir.path(), 2, 3, &[0, 1, 2]);
    let mut p0 = LocalDirStore::open_share(dir.path(), share(0, 2)).unwrap();
    let mut p1 = LocalDirStore::open_share(dir.path(), share(1, 2)).unwrap();
    let names = |epochs: &[(u64, &[usize])]| -> Vec<String> {
        let mut names: Vec<String> = epochs
            .iter()
            .flat_map(|(e, ps)| ps.iter().map(move |p| file_name(*e, share(*p, 2))))
            .collect();
        names.sort();
        names
    };
    for epoch in [3, 4] {
        p0.save(&share_of(epoch, 0)).unwrap();
        p1.save(&share_of(epoch, 1)).unwrap();
    }
    assert_eq!(
        epoch_files(dir.path()),
        names(&[(3, &[0, 1]), (4, &[0, 1])])
    );
    // Process 0 is ahead: epoch 5 is not complete yet, so 3 and 4 stay whole.
    p0.save(&share_of(5, 0)).unwrap();
    p0.save(&share_of(6, 0)).unwrap();
    assert_eq!(
        epoch_files(dir.path()),
        names(&[(3, &[0, 1]), (4, &[0, 1]), (5, &[0]), (6, &[0])])
    );
    assert_eq!(p1.latest().unwrap().unwrap().epoch, 4);
    // Process 1 completes epoch 5: epoch 3 goes; epoch 6 (process 0's) stays.
    p1.save(&share_of(5, 1)).unwrap();
    assert_eq!(
        epoch_files(dir.path()),
        names(&[(4, &[0, 1]), (5, &[0, 1]), (6, &[0])])
    );
    p1.save(&share_of(6, 1)).unwrap();
    assert_eq!(
        epoch_files(dir.path()),
        names(&[(5, &[0, 1]), (6, &[0, 1])])
    );
    assert_eq!(p0.latest().unwrap().unwrap().epoch, 6);
}

#[test]
fn locks_are_per_process_index() {
    let dir = tempfile::tempdir().unwrap();
    let p0 = LocalDirStore::open_share(dir.path(), share(0, 3)).unwrap();
    let p1 = LocalDirStore::open_share(dir.path(), share(1, 3)).unwrap();
    let _p2 = LocalDirStore::open_share(dir.path(), share(2, 3)).unwrap();
    // The same process index twice, of this cluster or another (or a single engine, which is
    // process 0), is refused.
    for s in [share(1, 3), share(1, 2), share(0, 2), Share::SINGLE] {
        let err = LocalDirStore::open_share(dir.path(), s).unwrap_err();
        assert!(matches!(err, CheckpointError::Locked { .. }), "{s}: {err}");
    }
    let err = open_store(dir.path(), share(1, 3)).unwrap_err();
    assert!(matches!(err, CheckpointError::Locked { .. }), "{err}");
    let mut names = checkpoint_files(dir.path());
    names.retain(|n| n.starts_with("LOCK"));
    assert_eq!(names, vec!["LOCK-1", "LOCK-2"], "and LOCK, for process 0");
    drop(p1);
    LocalDirStore::open_share(dir.path(), share(1, 2)).expect("process 1's lock is free again");
    drop(p0);
    LocalDirStore::open(dir.path()).expect("process 0's lock is free again");
}

#[test]
fn a_process_removes_only_its_own_leftover_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let mine = dir.path().join(".tmp-p1-checkpoint-abc");
    let process_0s = dir.path().join(".tmp-checkpoint-def");
    let process_2s = dir.path().join(".tmp-p2-checkpoint-ghi");
    for path in [&mine, &process_0s, &process_2s] {
        std::fs::write(path, b"half a checkpoint").unwrap();
    }
    let _store = LocalDirStore::open_share(dir.path(), share(1, 3)).unwrap();
    assert!(!mine.exists());
    assert!(
        process_0s.exists() && process_2s.exists(),
        "being written by others"
    );
}

#[test]
fn discard_all_moves_every_share_of_every_layout_aside() {
    let dir = tempfile::tempdir().unwrap();
    write_shares(dir.path(), 5, 3, &[0, 1]);
    write_shares(dir.path(), 8, 2, &[1]);
    let mut store = LocalDirStore::open_share(dir.path(), share(0, 2)).unwrap();
    // Only unfinished epochs: no checkpoint to restore.
    assert_eq!(store.latest().unwrap(), None);
    let moved = CheckpointStore::discard_all(&mut store).unwrap();
    assert_eq!(moved.len(), 3);
    assert!(epoch_files(dir.path()).is_empty());
    for (_, to) in &moved {
        assert!(std::path::Path::new(to).is_file(), "{to}");
    }
    // A second process doing the same finds nothing left to move.
    let mut other = LocalDirStore::open_share(dir.path(), share(1, 2)).unwrap();
    assert!(CheckpointStore::discard_all(&mut other).unwrap().is_empty());
    assert_eq!(store.latest().unwrap(), None);
}

#[test]
fn open_store_refuses_a_share_outside_its_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let err = open_store(dir.path(), share(3, 3)).unwrap_err();
    assert!(matches!(err, CheckpointError::Unsupported { .. }), "{err}");
}

#[cfg(not(feature = "hdfs"))]
#[test]
fn an_hdfs_directory_without_the_feature_says_which_feature_is_missing() {
    let err = open_store(
        std::path::Path::new("hdfs://127.0.0.1:9000/ckpt"),
        Share::SINGLE,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`hdfs` cargo feature"), "{err}");
}
