use std::sync::Arc;

use spendflow_operators::{AggKey, Name};

use super::sink::{EpochGroup, plan_batches, write_timestamp};
use crate::serve::read_model::CellValue;

fn cell(key: AggKey, count: i64, sum: i64) -> CellValue {
    CellValue {
        key,
        count,
        sum,
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
    assert_eq!(group.cells[&AggKey::User(1)], cell(AggKey::User(1), 0, 0));
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
    let batches = plan_batches(&group, 3);
    // User 1: 8 rows in batches of 3, 3, 2; user 2: 2 rows.
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![3, 3, 2, 2]);
    let rows: usize = sizes.iter().sum();
    assert_eq!(rows, group.cells.len());
}

#[test]
fn timestamps_order_generations_before_epochs() {
    assert!(write_timestamp(1, 5) < write_timestamp(1, 6));
    assert!(write_timestamp(1, 1_000_000) < write_timestamp(2, 1));
    assert!(write_timestamp(2, 0) > 0);
}
