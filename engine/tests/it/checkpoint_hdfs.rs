//! Checkpoint shares on HDFS (issue 15), against the services kit's real NameNode and DataNode:
//! the shares of a cluster of 3 are restored, merged, by a cluster of 2; an incomplete epoch is
//! skipped; old epochs go; `--discard-checkpoints` moves everything aside.
//!
//! Needs `SPENDFLOW_HDFS` (see `docker/native/services env`). Every test uses its own HDFS
//! directory under `/spendflow-it/`.

use hdfs_native::{Client, ClientBuilder};
use spendflow_engine::checkpoint::shares::file_name;
use spendflow_engine::checkpoint::{Checkpoint, DeadLetterScan, SavedPosition, open_store};
use spendflow_engine::cluster::Share;
use spendflow_operators::{ExpenseId, Fact, Name};

use crate::support::{service_env, unique_name};

/// `hdfs://HOST:PORT` and a directory of its own for one test.
fn hdfs_dir(prefix: &str) -> (String, String) {
    let url = service_env("SPENDFLOW_HDFS")
        .trim_end_matches('/')
        .to_string();
    let root = format!("/spendflow-it/{}", unique_name(prefix));
    (url, root)
}

fn share(process: usize, processes: usize) -> Share {
    Share { process, processes }
}

/// Process `p`'s share of `epoch`: its users, its partition, its counters.
fn share_of(epoch: u64, p: usize) -> Checkpoint {
    let merchant = format!("hdfs-merchant-{p}");
    let (category, _) = Name::intern("rent");
    let (merchant_name, _) = Name::intern(&merchant);
    Checkpoint {
        epoch,
        positions: vec![SavedPosition {
            source: "expenses".into(),
            partition: p as i32,
            position: 1000 + p as i64,
        }],
        records_read: 100 + p as u64,
        rejected: vec![("bad_json".into(), p as u64 + 1)],
        names: vec!["rent".into(), merchant],
        live: (0..2000)
            .map(|i| {
                (
                    ExpenseId::new(&format!("hdfs-{p}-{i}")).unwrap(),
                    Fact {
                        user_id: 10 * p as u64 + (i % 10),
                        category,
                        merchant: merchant_name,
                        amount_minor: 1 + i as i64,
                        event_ms: 1_764_000_000_000 + i as i64,
                    },
                )
            })
            .collect(),
        reference: Vec::new(),
        incarnation: "0000feedc0ffee00".into(),
        dead_letter_scan: Some(DeadLetterScan {
            topic: "expenses.dead-letter".into(),
            from: vec![(0, 40 - p as i64)],
        }),
    }
}

/// The names directly under `dir` on HDFS, sorted (directories end in `/`).
fn listing(client: &Client, dir: &str) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut names: Vec<String> = runtime
        .block_on(client.list_status(dir, false))
        .unwrap_or_else(|e| panic!("list {dir}: {e}"))
        .into_iter()
        .map(|s| {
            let name = s.path.rsplit('/').next().unwrap().to_string();
            if s.isdir { format!("{name}/") } else { name }
        })
        .collect();
    names.sort();
    names
}

fn names(epochs: &[(u64, usize, &[usize])]) -> Vec<String> {
    let mut names: Vec<String> = epochs
        .iter()
        .flat_map(|(e, n, ps)| ps.iter().map(move |p| file_name(*e, share(*p, *n))))
        .collect();
    names.sort();
    names
}

#[test]
fn shares_of_three_on_hdfs_are_restored_by_two_and_discarded_on_request() {
    let (url, root) = hdfs_dir("ckpt_shares");
    let dir = std::path::PathBuf::from(format!("{url}{root}"));
    let client = ClientBuilder::new().with_url(url.clone()).build().unwrap();

    // A cluster of 3 writes epoch 5 whole, and epoch 9 without process 1's share (it died).
    let mut three: Vec<_> = (0..3)
        .map(|p| open_store(&dir, share(p, 3)).unwrap_or_else(|e| panic!("open as {p} of 3: {e}")))
        .collect();
    for (p, store) in three.iter_mut().enumerate() {
        store.save(&share_of(5, p)).unwrap();
    }
    for p in [0, 2] {
        three[p].save(&share_of(9, p)).unwrap();
    }
    drop(three);
    assert_eq!(
        listing(&client, &root),
        names(&[(5, 3, &[0, 1, 2]), (9, 3, &[0, 2])]),
        "every share under its final name, no temporary file left"
    );

    // Restarted as 2 processes: each restores epoch 5, all three shares merged.
    let expected = Checkpoint::merge((0..3).map(|p| share_of(5, p)).collect()).unwrap();
    assert_eq!(expected.live.len(), 6000);
    let mut two: Vec<_> = (0..2)
        .map(|p| open_store(&dir, share(p, 2)).unwrap())
        .collect();
    for (p, store) in two.iter().enumerate() {
        let latest = store
            .latest()
            .unwrap_or_else(|e| panic!("latest as {p} of 2: {e}"));
        assert_eq!(latest.as_ref(), Some(&expected), "restored as {p} of 2");
    }
    assert_eq!(
        expected.dead_letter_scan.unwrap().from,
        vec![(0, 38)],
        "the smallest dead-letter offset of the shares"
    );

    // The cluster of 2 goes on: once two of its epochs are complete, the 3-share ones go.
    for epoch in [11, 12] {
        for (p, store) in two.iter_mut().enumerate() {
            store.save(&share_of(epoch, p)).unwrap();
        }
    }
    assert_eq!(
        listing(&client, &root),
        names(&[(11, 2, &[0, 1]), (12, 2, &[0, 1])])
    );
    assert_eq!(two[1].latest().unwrap().unwrap().epoch, 12);

    // --discard-checkpoints: both processes move everything aside; nothing is deleted.
    let moved = two[0].discard_all().unwrap();
    assert_eq!(moved.len(), 4, "{moved:?}");
    assert!(two[1].discard_all().unwrap().is_empty(), "already moved");
    let after = listing(&client, &root);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0].starts_with("discarded-"), "{after:?}");
    assert_eq!(
        listing(
            &client,
            &format!("{root}/{}", after[0].trim_end_matches('/'))
        ),
        names(&[(11, 2, &[0, 1]), (12, 2, &[0, 1])])
    );
    assert_eq!(two[0].latest().unwrap(), None);
}

#[test]
fn an_incomplete_epoch_alone_on_hdfs_is_no_checkpoint() {
    let (url, root) = hdfs_dir("ckpt_partial");
    let dir = std::path::PathBuf::from(format!("{url}{root}"));
    open_store(&dir, share(1, 2))
        .unwrap()
        .save(&share_of(3, 1))
        .unwrap();
    // The cluster never finished epoch 3: there is no checkpoint to restore (and no reason to
    // refuse the start).
    let store = open_store(&dir, share(0, 2)).unwrap();
    assert_eq!(store.latest().unwrap(), None);
}

#[test]
fn an_unreachable_namenode_is_a_retriable_io_error() {
    // Port 1 on this host: nothing listens there, the connection is refused at once.
    let dir = std::path::PathBuf::from("hdfs://127.0.0.1:1/spendflow-it/nowhere");
    let err = open_store(&dir, Share::SINGLE).unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert!(err.to_string().contains("hdfs://127.0.0.1:1"), "{err}");
}

/// The store runs hdfs-native on a runtime of its own: called from a thread that is inside
/// another runtime (as a caller of `open_store` may be), it neither panics ("cannot start a
/// runtime from within a runtime") nor waits for that runtime.
#[tokio::test(flavor = "current_thread")]
async fn the_store_works_from_inside_another_runtime() {
    let (url, root) = hdfs_dir("ckpt_in_runtime");
    let dir = std::path::PathBuf::from(format!("{url}{root}"));
    let mut store = open_store(&dir, Share::SINGLE).unwrap();
    store.save(&share_of(1, 0)).unwrap();
    assert_eq!(store.latest().unwrap(), Some(share_of(1, 0)));
    drop(store);
}
