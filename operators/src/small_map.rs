//! [`SmallMap`]: an ordered map for the many small per-user maps of the operators.
//!
//! Operators keep a few maps per user (the join's month cells, the last-seen operator's live
//! event times). Most users have a handful of entries, and a `BTreeMap` allocates a whole node
//! for even one: about 200–250 bytes for these key and value types. At a million users those
//! nodes were the largest per-user item of the engine's heap (heaptrack of a 2 M-record
//! catch-up, `bench/README.md`). A `SmallMap` keeps up to [`SmallMap::FEW`] entries in a sorted
//! `Vec` (grown by half at a time, 16–24 bytes per entry here) and moves to a `BTreeMap` beyond that,
//! so a user with many entries still costs `O(log n)` per change: no input can make its
//! updates quadratic.

use std::collections::BTreeMap;

/// An ordered map: a sorted `Vec` while small, a `BTreeMap` once large (see the module docs).
#[derive(Clone, Debug)]
pub enum SmallMap<K, V> {
    /// At most [`SmallMap::FEW`] entries, sorted by key.
    Few(Vec<(K, V)>),
    /// More than that (it stays a `BTreeMap` until emptied).
    Many(BTreeMap<K, V>),
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap::Few(Vec::new())
    }
}

impl<K: Ord + Copy, V> SmallMap<K, V> {
    /// Entries kept in the sorted `Vec` before it becomes a `BTreeMap`.
    pub const FEW: usize = 16;

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        match self {
            SmallMap::Few(entries) => entries
                .binary_search_by(|(k, _)| k.cmp(key))
                .ok()
                .map(|i| &entries[i].1),
            SmallMap::Many(map) => map.get(key),
        }
    }

    /// Changes the value of `key` (starting from `V::default()` when absent) with `change`, and
    /// removes the entry if `keep` says no afterwards.
    pub fn update(&mut self, key: K, change: impl FnOnce(&mut V), keep: impl FnOnce(&V) -> bool)
    where
        V: Default,
    {
        match self {
            SmallMap::Few(entries) => match entries.binary_search_by(|(k, _)| k.cmp(&key)) {
                Ok(i) => {
                    change(&mut entries[i].1);
                    if !keep(&entries[i].1) {
                        entries.remove(i);
                        if entries.is_empty() {
                            *entries = Vec::new();
                        }
                    }
                }
                Err(i) => {
                    let mut value = V::default();
                    change(&mut value);
                    if !keep(&value) {
                        return;
                    }
                    if entries.len() < Self::FEW {
                        // Grow by one or two, not double: most users stay small.
                        if entries.len() == entries.capacity() {
                            entries.reserve_exact(entries.len() / 2 + 1);
                        }
                        entries.insert(i, (key, value));
                    } else {
                        let mut map: BTreeMap<K, V> = std::mem::take(entries).into_iter().collect();
                        map.insert(key, value);
                        *self = SmallMap::Many(map);
                    }
                }
            },
            SmallMap::Many(map) => {
                let value = map.entry(key).or_default();
                change(value);
                if !keep(value) {
                    map.remove(&key);
                    if map.is_empty() {
                        *self = SmallMap::default();
                    }
                }
            }
        }
    }

    /// True if there is no entry.
    pub fn is_empty(&self) -> bool {
        match self {
            SmallMap::Few(entries) => entries.is_empty(),
            SmallMap::Many(map) => map.is_empty(),
        }
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        match self {
            SmallMap::Few(entries) => entries.len(),
            SmallMap::Many(map) => map.len(),
        }
    }

    /// The greatest key, if any.
    pub fn last_key(&self) -> Option<K> {
        match self {
            SmallMap::Few(entries) => entries.last().map(|(k, _)| *k),
            SmallMap::Many(map) => map.last_key_value().map(|(k, _)| *k),
        }
    }

    /// Every key, in order.
    pub fn keys(&self) -> impl Iterator<Item = K> + '_ {
        let (few, many) = match self {
            SmallMap::Few(entries) => (Some(entries.iter().map(|(k, _)| *k)), None),
            SmallMap::Many(map) => (None, Some(map.keys().copied())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Random counted inserts and removals, on few keys and on many (so maps go from `Few` to
    /// `Many` and back to empty), agree with a `BTreeMap` after every step.
    #[test]
    fn agrees_with_a_btreemap() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for keys in [4i64, 20, 200] {
            let mut small: SmallMap<i64, i64> = SmallMap::default();
            let mut model: BTreeMap<i64, i64> = BTreeMap::new();
            let mut was_many = false;
            for _ in 0..20_000 {
                let key = rng.random_range(0..keys);
                let diff = if rng.random_bool(0.55) { 1 } else { -1 };
                small.update(key, |count| *count += diff, |count| *count != 0);
                let count = model.entry(key).or_insert(0);
                *count += diff;
                if *count == 0 {
                    model.remove(&key);
                }
                was_many |= matches!(small, SmallMap::Many(_));
                assert_eq!(small.get(&key), model.get(&key));
                assert_eq!(small.len(), model.len());
                assert_eq!(small.is_empty(), model.is_empty());
                assert_eq!(small.last_key(), model.last_key_value().map(|(k, _)| *k));
                assert!(small.keys().eq(model.keys().copied()));
            }
            assert_eq!(
                was_many,
                keys > SmallMap::<i64, i64>::FEW as i64,
                "{keys} keys"
            );
        }
    }

    /// A zero change to an absent key leaves nothing behind, and a map that empties frees its
    /// storage.
    #[test]
    fn absent_zero_changes_keep_nothing_and_empty_maps_hold_no_storage() {
        let mut small: SmallMap<i32, (i64, i64)> = SmallMap::default();
        small.update(3, |_| {}, |v| *v != (0, 0));
        assert!(small.is_empty());
        small.update(3, |v| v.0 += 1, |v| *v != (0, 0));
        small.update(3, |v| v.0 -= 1, |v| *v != (0, 0));
        assert!(matches!(&small, SmallMap::Few(v) if v.capacity() == 0));
    }
}
