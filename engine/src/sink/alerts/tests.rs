//! The gate apart from Kafka: an in-memory topic, a model engine whose input is a sequence of
//! fired sets (one per input offset), epochs cut at chosen offsets, crashes after `k` records
//! and restores from chosen checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use spendflow_operators::reference::{AlertEvent, AlertState};

use super::*;

const SOURCE: &str = "expenses";

/// The input: after reading offset `i` (so at position `i + 1`) the fired set is `input[i]`;
/// at position 0 it is empty.
struct Input(Vec<BTreeSet<AlertKey>>);

impl Input {
    fn fired_at(&self, position: usize) -> BTreeSet<AlertKey> {
        if position == 0 {
            BTreeSet::new()
        } else {
            self.0[position - 1].clone()
        }
    }
}

fn key(user: u64) -> AlertKey {
    (user, 2026 * 12 + 10, 80)
}

fn event(key: AlertKey, state: AlertState) -> AlertEvent {
    AlertEvent {
        user_id: key.0,
        month: key.1,
        threshold_pct: key.2,
        state,
        spent_minor: 100,
        budget_minor: 100,
        currency: *b"EUR",
    }
}

fn positions(at: usize) -> Vec<PartitionPosition> {
    vec![PartitionPosition {
        source: Arc::from(SOURCE),
        partition: 0,
        position: at as i64,
        ..PartitionPosition::default()
    }]
}

/// The events of an epoch from fired set `before` to `after` (a dataflow consolidates them).
fn transitions(before: &BTreeSet<AlertKey>, after: &BTreeSet<AlertKey>) -> Vec<AlertEvent> {
    let mut out: Vec<AlertEvent> = after
        .difference(before)
        .map(|k| event(*k, AlertState::Fired))
        .collect();
    out.extend(
        before
            .difference(after)
            .map(|k| event(*k, AlertState::Cleared)),
    );
    out
}

type Topic = Vec<(AlertRecord, Vec<HeaderPosition>)>;

/// One run of the engine: opens a gate over `topic`; with `restore_at`, restores a
/// checkpoint at that position first (its epoch delivers the fired set there), else starts
/// from position 0; then publishes epochs ending at each of `cuts`. Writes records to `topic`
/// until `crash_after` records were written in this run (`None`: no crash).
fn run(
    input: &Input,
    topic: &mut Topic,
    restore_at: Option<usize>,
    cuts: &[usize],
    crash_after: Option<usize>,
) -> bool {
    let mut gate = AlertGate::new(topic.clone());
    let mut written = 0;
    let mut epoch = 0;
    let mut at = 0;
    let mut write = |records: Vec<AlertRecord>, at: usize, topic: &mut Topic| -> bool {
        let header = parse_positions_header(positions_header(&positions(at)).as_bytes()).unwrap();
        for r in records {
            if crash_after.is_some_and(|k| written >= k) {
                return false;
            }
            topic.push((r, header.clone()));
            written += 1;
        }
        true
    };
    if let Some(c) = restore_at {
        at = c;
        let fired = input.fired_at(c);
        let events = transitions(&BTreeSet::new(), &fired);
        let records = gate.epoch(epoch, &positions(c), &events, true);
        if !write(records, c, topic) {
            return false;
        }
    }
    let start = at;
    for &cut in cuts.iter().filter(|&&cut| cut > start) {
        epoch += 1;
        let events = transitions(&input.fired_at(at), &input.fired_at(cut));
        at = cut;
        let records = gate.epoch(epoch, &positions(cut), &events, false);
        if !write(records, cut, topic) {
            return false;
        }
    }
    true
}

/// Every alert's states in the topic alternate from `fired`, and the fired set ends as `want`.
fn assert_consistent(topic: &Topic, want: &BTreeSet<AlertKey>) {
    let mut last: BTreeMap<AlertKey, AlertState> = BTreeMap::new();
    for (r, _) in topic {
        let before = last.insert(r.key(), r.state);
        match r.state {
            AlertState::Fired => assert_ne!(
                before,
                Some(AlertState::Fired),
                "{:?} fired twice in a row: {topic:?}",
                r.key()
            ),
            AlertState::Cleared => assert_eq!(
                before,
                Some(AlertState::Fired),
                "{:?} cleared while not fired: {topic:?}",
                r.key()
            ),
        }
    }
    let fired: BTreeSet<AlertKey> = last
        .into_iter()
        .filter(|(_, s)| *s == AlertState::Fired)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(&fired, want, "the topic's fired set: {topic:?}");
}

fn states(topic: &Topic) -> Vec<(AlertKey, AlertState)> {
    topic.iter().map(|(r, _)| (r.key(), r.state)).collect()
}

/// Users 1–3 fire and clear over 10 offsets; user 1 fires, clears and fires again.
fn input() -> Input {
    let sets: [&[u64]; 10] = [
        &[1],
        &[1, 2],
        &[1, 2],
        &[2],
        &[2, 3],
        &[2, 3],
        &[1, 3],
        &[1, 3],
        &[1],
        &[1, 2],
    ];
    Input(
        sets.iter()
            .map(|s| s.iter().map(|u| key(*u)).collect())
            .collect(),
    )
}

const CUTS: [usize; 5] = [2, 4, 6, 8, 10];

#[test]
fn a_fresh_start_writes_every_transition_once() {
    let input = input();
    let mut topic = Topic::new();
    assert!(run(&input, &mut topic, None, &CUTS, None));
    assert_consistent(&topic, &input.fired_at(10));
    assert_eq!(
        states(&topic),
        vec![
            (key(1), AlertState::Fired),
            (key(2), AlertState::Fired),
            (key(1), AlertState::Cleared),
            (key(3), AlertState::Fired),
            (key(1), AlertState::Fired),
            (key(2), AlertState::Cleared),
            (key(2), AlertState::Fired),
            (key(3), AlertState::Cleared),
        ]
    );
    // Records carry their epoch's positions.
    assert_eq!(topic[0].1[0].position, 2);
    assert_eq!(topic.last().unwrap().1[0].position, 10);
}

/// The reference: what a run without a crash writes.
fn reference() -> Topic {
    let mut topic = Topic::new();
    assert!(run(&input(), &mut topic, None, &CUTS, None));
    topic
}

#[test]
fn a_crash_in_the_middle_of_an_epoch_neither_loses_nor_duplicates() {
    let input = input();
    let full = states(&reference());
    // Epoch 3 (offsets 4..6) writes two records; crash after the first of them, then after
    // every other record count, restoring from every checkpoint before the crash.
    for crash_after in 0..full.len() {
        for restore_at in [0, 2, 4] {
            let mut topic = Topic::new();
            assert!(!run(&input, &mut topic, None, &CUTS, Some(crash_after)));
            assert_eq!(topic.len(), crash_after);
            let said_through = topic.last().map_or(0, |(_, p)| p[0].position as usize);
            let restore = (restore_at > 0).then_some(restore_at);
            assert!(run(&input, &mut topic, restore, &CUTS, None));
            assert_consistent(&topic, &input.fired_at(10));
            if restore_at <= said_through {
                // Same epoch cuts, and the checkpoint is not ahead of the topic: the topic
                // holds exactly what a run without a crash writes.
                assert_eq!(
                    states(&topic),
                    full,
                    "crash after {crash_after}, restore at {restore_at}"
                );
            }
        }
    }
}

#[test]
fn a_crash_before_any_record_writes_the_restored_fired_set() {
    let input = input();
    let mut topic = Topic::new();
    assert!(!run(&input, &mut topic, None, &CUTS, Some(0)));
    assert!(topic.is_empty());
    // The checkpoint at 6 was written although no record was: the restore epoch's fired set
    // is said, then the rest.
    assert!(run(&input, &mut topic, Some(6), &CUTS, None));
    assert_consistent(&topic, &input.fired_at(10));
    assert_eq!(
        states(&topic)[..2],
        [(key(2), AlertState::Fired), (key(3), AlertState::Fired)]
    );
    assert_eq!(topic[0].0.epoch, 0);
}

#[test]
fn a_flip_during_replay_is_not_written_again() {
    // User 1 fires at 1 and clears at 4 (both written), the crash comes at 6; the restore at
    // 2 replays 1 fired and then cleared: tracked only, nothing written twice.
    let input = input();
    let mut topic = Topic::new();
    assert!(run(&input, &mut topic, None, &[2, 4, 6], None));
    let before = topic.len();
    assert!(run(&input, &mut topic, Some(2), &CUTS, None));
    assert_consistent(&topic, &input.fired_at(10));
    assert_eq!(states(&topic), states(&reference()));
    // Only what came after 6 is new.
    assert!(
        topic[before..].iter().all(|(_, p)| p[0].position > 6),
        "{topic:?}"
    );
}

#[test]
fn a_flip_between_the_topic_and_the_restore_is_cleared() {
    // The topic says 1 fired (position 2). The engine restores a checkpoint at 4, where 1 is
    // no longer fired, and the restore epoch covers the topic: 1 is cleared at once.
    let input = input();
    let mut topic = Topic::new();
    assert!(run(&input, &mut topic, None, &[2], None));
    assert_eq!(
        states(&topic),
        [(key(1), AlertState::Fired), (key(2), AlertState::Fired)]
    );
    assert!(run(&input, &mut topic, Some(4), &[], None));
    assert_consistent(&topic, &input.fired_at(4));
    assert_eq!(
        states(&topic)[2..],
        [(key(1), AlertState::Cleared)],
        "{topic:?}"
    );
    // The cleared record keeps the amounts last said (no event of it was seen).
    assert_eq!(topic[2].0.spent_minor, 100);
}

#[test]
fn a_restore_with_other_epoch_cuts_converges() {
    let input = input();
    for crash_after in 0..reference().len() {
        for restore_at in [None, Some(1), Some(3), Some(5)] {
            for cuts in [
                &[3, 7, 10][..],
                &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                &[10],
                &[5, 9, 10],
            ] {
                let mut topic = Topic::new();
                run(&input, &mut topic, None, &CUTS, Some(crash_after));
                assert!(run(&input, &mut topic, restore_at, cuts, None));
                assert_consistent(&topic, &input.fired_at(10));
            }
        }
    }
}

#[test]
fn two_crashes_in_a_row_converge() {
    let input = input();
    for first in 0..4 {
        for second in 0..4 {
            let mut topic = Topic::new();
            run(&input, &mut topic, None, &CUTS, Some(first));
            run(&input, &mut topic, Some(2), &[3, 5, 7, 10], Some(second));
            assert!(run(&input, &mut topic, Some(4), &[6, 10], None));
            assert_consistent(&topic, &input.fired_at(10));
        }
    }
}

#[test]
fn a_source_not_listed_holds_the_gate() {
    // Per-user topics are sources of their own, discovered a few at a time: one the engine
    // does not list yet may still hold records it has to read again.
    let record = AlertRecord::of(&event(key(1), AlertState::Fired), 3);
    let other = HeaderPosition {
        source: "expenses.user.7".into(),
        partition: 0,
        position: 99,
    };
    let mut gate = AlertGate::new([(record, vec![other])]);
    assert!(gate.epoch(1, &positions(0), &[], false).is_empty());
    assert!(!gate.is_open());
    let mut both = positions(0);
    both.push(PartitionPosition {
        source: Arc::from("expenses.user.7"),
        position: 99,
        ..both[0].clone()
    });
    // Caught up: nothing fired now, so the topic's fired alert is cleared.
    let out = gate.epoch(2, &both, &[], false);
    assert!(gate.is_open());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].state, AlertState::Cleared);
}

#[test]
fn a_partition_not_listed_yet_holds_the_gate() {
    let record = AlertRecord::of(&event(key(1), AlertState::Fired), 3);
    let at = |partition, position| HeaderPosition {
        source: SOURCE.into(),
        partition,
        position,
    };
    let mut gate = AlertGate::new([(record, vec![at(0, 5), at(1, 7)])]);
    assert!(gate.epoch(1, &positions(9), &[], false).is_empty());
    assert!(!gate.is_open());
    let mut both = positions(9);
    both.push(PartitionPosition {
        partition: 1,
        position: 7,
        ..both[0].clone()
    });
    gate.epoch(2, &both, &[event(key(1), AlertState::Fired)], false);
    assert!(gate.is_open());
}

#[test]
fn the_record_is_the_documented_json() {
    let record = AlertRecord {
        user_id: 42,
        month: 2026 * 12 + 10,
        threshold_pct: 100,
        state: AlertState::Fired,
        spent_minor: 12_345,
        budget_minor: 10_000,
        currency: *b"EUR",
        epoch: 17,
    };
    assert_eq!(record.kafka_key(), "42");
    assert_eq!(
        record.to_json(),
        r#"{"user_id":42,"month":"2026-11","threshold_pct":100,"state":"fired","spent_minor":12345,"budget_minor":10000,"currency":"EUR","epoch":17}"#
    );
    assert_eq!(
        AlertRecord::from_json(record.to_json().as_bytes()),
        Ok(record)
    );
    let cleared = AlertRecord {
        state: AlertState::Cleared,
        month: 2027 * 12,
        ..record
    };
    assert!(cleared.to_json().contains(r#""month":"2027-01","#));
    assert_eq!(
        AlertRecord::from_json(cleared.to_json().as_bytes()),
        Ok(cleared)
    );
    assert!(AlertRecord::from_json(br#"{"user_id":1}"#).is_err());
    assert!(
        AlertRecord::from_json(record.to_json().replace("fired", "burning").as_bytes()).is_err()
    );
    assert_eq!(parse_month("2026-13"), None);
    assert_eq!(parse_month("2026-1"), None);
}

#[test]
fn the_positions_header_round_trips() {
    let header = positions_header(&positions(12));
    assert_eq!(
        header,
        r#"[{"source":"expenses","partition":0,"position":12}]"#
    );
    assert_eq!(
        parse_positions_header(header.as_bytes()).unwrap(),
        vec![HeaderPosition {
            source: SOURCE.into(),
            partition: 0,
            position: 12
        }]
    );
}
