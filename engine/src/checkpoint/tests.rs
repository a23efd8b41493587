use spendflow_operators::{Fact, Name};

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
                    format!("e-{i}"),
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
    }
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
    std::fs::write(&newest, b"SPFCKP01 truncated").unwrap();
    assert_eq!(store.latest().unwrap().unwrap().epoch, 5);
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
