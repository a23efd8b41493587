use super::consumer::owner_of;
use super::*;

#[test]
fn partitions_are_divided_stably_and_evenly() {
    for peers in [1, 2, 3, 4] {
        let mut counts = vec![0; peers];
        for user in 1..=400 {
            let topic = format!("expenses.user.{user}");
            let owner = owner_of(&topic, 0, peers);
            assert_eq!(owner, owner_of(&topic, 0, peers), "stable");
            counts[owner] += 1;
        }
        // Every worker gets a fair share (within 40% of even) of 400 single-partition topics.
        let even = 400 / peers;
        assert!(
            counts.iter().all(|c| *c * 10 >= even * 6),
            "{peers} workers: {counts:?}"
        );
    }
    // Every process of a cluster computes the same owner.
    assert_eq!(owner_of("expenses", 3, 2), owner_of("expenses", 3, 2));
    assert_eq!(owner_of("t", 0, 1), 0);
}

#[test]
fn a_topics_partitions_are_spread_evenly_over_the_workers() {
    // Hashing every partition on its own put 3 or 4 of a keyed topic's 4 partitions on one of
    // 2 workers for most names, and that worker's fetch thread bounded the catch-up.
    for peers in 1..=6 {
        for partitions in [1, 2, 3, 4, 6, 8, 12, 16] {
            for n in 0..50 {
                let topic = format!("sfbench.{n:08x}.keyed");
                let mut counts = vec![0; peers];
                for p in 0..partitions {
                    counts[owner_of(&topic, p, peers)] += 1;
                }
                let (min, max) = (
                    counts.iter().min().copied().unwrap_or(0),
                    counts.iter().max().copied().unwrap_or(0),
                );
                assert!(
                    max - min <= 1,
                    "{topic}: {partitions} partitions over {peers} workers: {counts:?}"
                );
            }
        }
    }
}

#[test]
fn per_user_topics_name_their_user() {
    assert_eq!(
        user_of_topic("expenses.user.42", "expenses.user."),
        Some(42)
    );
    assert_eq!(user_of_topic("expenses.user.0", "expenses.user."), None);
    assert_eq!(user_of_topic("expenses.user.4x", "expenses.user."), None);
    assert_eq!(user_of_topic("expenses.user.", "expenses.user."), None);
    assert_eq!(user_of_topic("expenses", "expenses.user."), None);
}

#[test]
fn config_needs_exactly_one_topic_setting() {
    assert!(
        KafkaSourceConfig::pattern("127.0.0.1:9092", r"expenses\.user\..*")
            .validate()
            .is_ok()
    );
    assert!(
        KafkaSourceConfig::topic("127.0.0.1:9092", "expenses")
            .validate()
            .is_ok()
    );
    let mut both = KafkaSourceConfig::topic("127.0.0.1:9092", "expenses");
    both.topic_pattern = Some("x".into());
    assert!(both.validate().unwrap_err().0.contains("exactly one"));
    let bad = KafkaSourceConfig::pattern("127.0.0.1:9092", "(");
    assert!(bad.validate().unwrap_err().0.contains("regex"));
    let unknown = serde_json::from_str::<KafkaSourceConfig>(r#"{"brokers":"b","topik":"x"}"#);
    assert!(unknown.unwrap_err().to_string().contains("unknown field"));
}

mod read_ahead {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::super::consumer::Assigned;
    use super::super::fetch::{Fetch, Fetched, ReadAhead, Taken};
    use crate::source::{PartitionPosition, PartitionState, Payload, SourceRecord};

    fn partitions(positions: &[i64]) -> (Vec<Assigned>, BTreeMap<(Arc<str>, i32), usize>) {
        let topic: Arc<str> = Arc::from("t");
        let mut assigned = Vec::new();
        let mut index = BTreeMap::new();
        for (p, &position) in positions.iter().enumerate() {
            index.insert((Arc::clone(&topic), p as i32), assigned.len());
            assigned.push(Assigned {
                status: PartitionPosition {
                    source: Arc::clone(&topic),
                    partition: p as i32,
                    position,
                    ..PartitionPosition::default()
                },
                expected_user: None,
            });
        }
        (assigned, index)
    }

    fn records(partition: i32, offsets: std::ops::Range<i64>) -> Fetch {
        let topic: Arc<str> = Arc::from("t");
        Fetch::Records(
            offsets
                .map(|offset| Fetched {
                    topic: Arc::clone(&topic),
                    partition,
                    offset,
                    payload: format!("{offset}").into_bytes().into(),
                    key: Some(bytes::Bytes::from_static(b"42")),
                })
                .collect(),
        )
    }

    fn positions(assigned: &[Assigned]) -> Vec<i64> {
        assigned.iter().map(|a| a.status.position).collect()
    }

    fn offsets(out: &[SourceRecord]) -> Vec<(usize, i64)> {
        out.iter().map(|r| (r.partition, r.offset)).collect()
    }

    #[test]
    fn positions_never_pass_what_the_worker_took() {
        let (mut assigned, index) = partitions(&[0, 5]);
        let (tx, mut ahead) = ReadAhead::fed();
        assert!(tx.send(records(0, 0..10)));
        assert!(tx.send(records(1, 3..8)));
        let mut out = Vec::new();
        // The worker has room for 4: the other 6 of the batch and the second batch stay read
        // ahead, and no position counts them.
        assert!(matches!(
            ahead.take(&mut assigned, &index, &mut out, 4),
            Taken::Done
        ));
        assert_eq!(offsets(&out), [(0, 0), (0, 1), (0, 2), (0, 3)]);
        assert_eq!(positions(&assigned), [4, 5]);
        assert!(ahead.buffered() > 0);
        // Every position is one past the last record taken of its partition.
        assert!(matches!(
            ahead.take(&mut assigned, &index, &mut out, 100),
            Taken::Done
        ));
        assert_eq!(
            out.len(),
            4 + 6 + 3,
            "offsets 3 and 4 of partition 1 are below its position"
        );
        assert_eq!(offsets(&out[10..]), [(1, 5), (1, 6), (1, 7)]);
        assert_eq!(positions(&assigned), [10, 8]);
        assert_eq!(ahead.buffered(), 0);
        // The record keeps its bytes and key; a numeric key is the expected user.
        let Payload::Bytes(bytes) = &out[12].payload else {
            panic!("bytes expected");
        };
        assert_eq!(&bytes[..], b"7");
        assert_eq!(out[12].key.as_deref(), Some(&b"42"[..]));
        assert_eq!(out[12].expected_user, Some(42));
    }

    #[test]
    fn partitions_not_read_take_nothing_and_keep_their_position() {
        let (mut assigned, index) = partitions(&[0, 0]);
        assigned[1].status.state = PartitionState::StoppedDataLoss;
        let (tx, mut ahead) = ReadAhead::fed();
        assert!(tx.send(records(1, 0..3)));
        assert!(tx.send(records(7, 0..3))); // not assigned to this worker
        assert!(tx.send(records(0, 0..2)));
        let mut out = Vec::new();
        ahead.take(&mut assigned, &index, &mut out, 100);
        assert_eq!(offsets(&out), [(0, 0), (0, 1)]);
        assert_eq!(positions(&assigned), [2, 0]);
    }

    #[test]
    fn an_error_comes_after_the_records_before_it() {
        let (mut assigned, index) = partitions(&[0]);
        let (tx, mut ahead) = ReadAhead::fed();
        assert!(tx.send(records(0, 0..2)));
        assert!(tx.send(Fetch::Error(KafkaError::MessageConsumption(
            RDKafkaErrorCode::OffsetOutOfRange,
        ))));
        assert!(tx.send(records(0, 2..3)));
        let mut out = Vec::new();
        assert!(matches!(
            ahead.take(&mut assigned, &index, &mut out, 100),
            Taken::Error(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OffsetOutOfRange
            ))
        ));
        assert_eq!(positions(&assigned), [2]);
        assert!(matches!(
            ahead.take(&mut assigned, &index, &mut out, 100),
            Taken::Done
        ));
        assert_eq!(positions(&assigned), [3]);
        // The fetch thread gone: said once nothing is left.
        drop(tx);
        assert!(matches!(
            ahead.take(&mut assigned, &index, &mut out, 100),
            Taken::Gone
        ));
    }
}
