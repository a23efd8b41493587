use std::sync::Arc;

use spendflow_operators::{AggKey, Name};

use super::sink::{plan_batches, write_timestamp};
use crate::core::CellValue;
use crate::sink::EpochGroup;

fn cell(key: AggKey, count: i64, sum: i64) -> CellValue {
    CellValue {
        key,
        count,
        sum: sum.into(),
        last_event_ms: None,
    }
}

#[test]
fn later_epochs_replace_earlier_values_in_a_group() {
    let mut group = EpochGroup::default();
    group.merge(
        3,
        Arc::default(),
        10,
        [cell(AggKey::User(1), 1, 5), cell(AggKey::User(2), 1, 7)],
    );
    group.merge(4, Arc::default(), 12, [cell(AggKey::User(1), 0, 0)]);
    assert_eq!(group.epoch, 4);
    assert_eq!(group.records_covered, 12);
    // A cell that changed and changed back is still written (its last value).
    assert_eq!(
        group.get(&AggKey::User(1)),
        Some(&cell(AggKey::User(1), 0, 0))
    );
    assert_eq!(group.cells.len(), 2);
}

#[test]
fn batches_hold_one_user_each_and_respect_the_size() {
    let (food, _) = Name::intern("food");
    let mut group = EpochGroup::default();
    let mut cells = vec![cell(AggKey::User(1), 1, 5), cell(AggKey::User(2), 0, 0)];
    cells.extend((0..7).map(|d| cell(AggKey::Day(1, 20_000 + d), 1, 5)));
    cells.push(cell(AggKey::Category(2, food), 0, 0));
    group.merge(9, Arc::default(), 0, cells);
    let batches = plan_batches(&group, 3).unwrap();
    // User 1: 8 rows in batches of 3, 3, 2; user 2: 2 rows.
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![3, 3, 2, 2]);
    let rows: usize = sizes.iter().sum();
    assert_eq!(rows, group.cells.len());
}

#[test]
fn timestamps_follow_the_clock_and_always_grow() {
    // The wall clock when it is ahead; one more than the last when the clock stands still or
    // went back.
    assert_eq!(write_timestamp(1_000, 10), 1_000);
    assert_eq!(write_timestamp(1_000, 1_000), 1_001);
    assert_eq!(write_timestamp(900, 1_000), 1_001);
    assert_eq!(write_timestamp(0, i64::MAX), i64::MAX);
}

#[test]
fn a_total_outside_bigint_fails_the_plan_naming_user_and_cell() {
    let (fuel, _) = Name::intern("fuel");
    for sum in [i128::from(i64::MAX) + 1, i128::from(i64::MIN) - 1] {
        let mut group = EpochGroup::default();
        let mut beyond = cell(AggKey::Category(42, fuel), 3, 0);
        beyond.sum = sum;
        group.merge(5, Arc::default(), 0, [cell(AggKey::User(41), 1, 5), beyond]);
        let error = plan_batches(&group, 10).unwrap_err();
        assert!(!error.is_retriable(), "fatal: {error}");
        let error = error.in_keyspace("ks_test");
        let message = error.to_string();
        for part in ["user 42", "category \"fuel\"", &sum.to_string(), "ks_test"] {
            assert!(message.contains(part), "{part} in {message}");
        }
    }
    // At the very edges of bigint the values are written as they are.
    let mut group = EpochGroup::default();
    group.merge(
        6,
        Arc::default(),
        0,
        [
            cell(AggKey::User(1), 1, i64::MAX),
            cell(AggKey::User(2), 1, i64::MIN),
        ],
    );
    assert_eq!(plan_batches(&group, 10).unwrap().len(), 2);
}
