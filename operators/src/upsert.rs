//! The upsert stage: records in, changes of live facts out.
//!
//! An expense is identified by `(user_id, expense_id)`. The contract says the latest record for
//! an expense, in input order, replaces the earlier one, and a delete removes it.
//! [`UpsertByExpense::upsert_by_expense`] keeps the live fact of every expense in a hash map and turns each instruction into at most two
//! differences: `-old` (if there was a live fact) and `+new` (for an upsert). Everything after
//! this stage is a plain differential collection of live facts, so aggregates are always over
//! the set of live expenses and retractions need no special handling downstream.
//!
//! Why a custom operator and not `arrange_from_upsert`: differential's upsert arrangement keeps
//! the *greatest* value when several upserts of a key share a timestamp, not the last one, and
//! with one timestamp per epoch "upsert then delete" inside an epoch would resolve wrongly. A
//! hash map applied in arrival order is also an order of magnitude cheaper (measured 9.3 M vs
//! 1.6 M records/s on this workload).
//!
//! Order: instructions are exchanged by a hash of `(user_id, expense_id)`, so every instruction for an
//! expense reaches the same worker. Timely delivers the messages between two workers in the
//! order they were sent, so as long as all records of an expense come from one source worker
//! (true for a file, a Kafka partition, the generator and the in-process input), arrival order is
//! input order.
//!
//! Epochs: instructions are held per epoch and applied, in arrival order, once the input
//! frontier has passed their epoch, epoch after epoch. So at the moment epoch `E` is applied
//! and the next one is not, the map holds exactly the live expenses of the input up to `E`:
//! that is when a checkpoint takes its copy ([`UpsertSnapshots`]). Holding costs no latency
//! downstream: the aggregates wait for the same frontier before they emit an epoch anyway.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::rc::Rc;

use differential_dataflow::VecCollection;
use differential_dataflow::collection::AsCollection;
use hashbrown::hash_table::{Entry, HashTable};

use ahash::RandomState;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use crate::Epoch;
use crate::model::{ExpenseId, Fact, LiveFact, Record, UserId};

/// One upsert-stage instruction: replace (`Some`) or remove (`None`) the fact of an expense.
///
/// An expense's identity is `(user_id, expense_id)`: the same `expense_id` under two users names
/// two different expenses, so a record of one user can never change or move another user's
/// expense (a per-user topic only checks that a record names its own user).
///
/// Fixed-size (no heap part): the id is inline ([`ExpenseId`]) and the fact leaves out the user,
/// which is here once. This is what crosses the exchange, one per record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Instruction {
    /// The user the expense belongs to (part of its identity).
    pub user_id: UserId,
    /// The expense the instruction is about, within the user's expenses.
    pub expense_id: ExpenseId,
    /// The new live fact, or `None` to delete.
    pub fact: Option<LiveFact>,
}

impl From<Record> for Instruction {
    fn from(record: Record) -> Self {
        match record {
            Record::Upsert(e) => {
                let fact = LiveFact::from(e.fact());
                Instruction {
                    user_id: e.user_id,
                    expense_id: e.expense_id,
                    fact: Some(fact),
                }
            }
            Record::Delete {
                expense_id,
                user_id,
            } => Instruction {
                user_id,
                expense_id,
                fact: None,
            },
        }
    }
}

/// Hash used to route instructions; fixed-seed so every worker and process agrees. (Routing is
/// no map: an input that aims many expenses at one worker only skews the load, it cannot make a
/// lookup slow. The map each worker keeps is seeded, see [`LiveMap`].)
fn route(user_id: UserId, expense_id: &ExpenseId) -> u64 {
    FxBuildHasher.hash_one((user_id, expense_id))
}

/// The live set of one worker: `(user_id, expense_id) -> fact`. Keyed by input, so hashed with
/// a per-process random seed: colliding keys cannot be computed ahead of time.
///
/// One entry is `8 + 24 + 32 = 64` bytes, with no heap part for ids up to
/// [`ExpenseId::INLINE`] bytes (it was `8 + 24 + 40 = 72` bytes plus a heap `String` per live
/// expense); `bench/README.md` has the measured bytes per live expense.
///
/// **Split into [`LiveMap::SHARDS`] tables** that grow one at a time. A hash table doubles all
/// at once, and while it moves its entries the old and the new table are both allocated: for
/// one table per worker that was half again the live set at the peak of a catch-up (the
/// largest item of its heap profile: 204 MiB for 1.66 M live expenses on two workers, whose
/// tables happened to double together). With shards only one shard's old table is allocated
/// besides the live set at any time. The shard is taken from bits of the same hash that the
/// tables do not use for their buckets (for tables up to 2^32 buckets) or tags, so each
/// operation still hashes its key once.
#[derive(Debug)]
pub struct LiveMap {
    hasher: RandomState,
    shards: Box<[HashTable<LiveEntry>]>,
    len: usize,
}

/// One entry of a [`LiveMap`].
pub type LiveEntry = ((UserId, ExpenseId), LiveFact);

impl Default for LiveMap {
    fn default() -> Self {
        LiveMap {
            hasher: RandomState::new(),
            shards: (0..Self::SHARDS).map(|_| HashTable::new()).collect(),
            len: 0,
        }
    }
}

impl LiveMap {
    /// Tables the live set is split into.
    pub const SHARDS: usize = 16;

    /// The key's hash, and the shard that holds it: bits 32.. of the hash (hashbrown takes a
    /// table's bucket from the low bits and its tag from the top seven).
    fn locate(&self, key: &(UserId, ExpenseId)) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        (hash, (hash >> 32) as usize % Self::SHARDS)
    }

    /// Live expenses.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no expense is live.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The live fact of an expense.
    pub fn get(&self, key: &(UserId, ExpenseId)) -> Option<&LiveFact> {
        let (hash, shard) = self.locate(key);
        self.shards[shard]
            .find(hash, |(k, _)| k == key)
            .map(|(_, fact)| fact)
    }

    /// Sets the live fact of an expense; returns the one it replaces, if any.
    pub fn insert(&mut self, key: (UserId, ExpenseId), fact: LiveFact) -> Option<LiveFact> {
        let (hash, shard) = self.locate(&key);
        let hasher = &self.hasher;
        match self.shards[shard].entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k)) {
            Entry::Occupied(mut entry) => Some(std::mem::replace(&mut entry.get_mut().1, fact)),
            Entry::Vacant(entry) => {
                entry.insert((key, fact));
                self.len += 1;
                None
            }
        }
    }

    /// Removes an expense; returns its live fact, if it had one.
    pub fn remove(&mut self, key: &(UserId, ExpenseId)) -> Option<LiveFact> {
        let (hash, shard) = self.locate(key);
        let entry = self.shards[shard]
            .find_entry(hash, |(k, _)| k == key)
            .ok()?;
        self.len -= 1;
        Some(entry.remove().0.1)
    }

    /// Every live expense, in no order.
    pub fn iter(&self) -> impl Iterator<Item = &LiveEntry> {
        self.shards.iter().flat_map(HashTable::iter)
    }
}

/// The live expenses of one worker's share at one epoch: what a checkpoint stores.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveSnapshot {
    /// The epoch: the copy holds the effect of every instruction up to and including it.
    pub epoch: Epoch,
    /// `(expense_id, live fact)` of every live expense this worker owns, in no order. (The
    /// fact carries the user, the other half of the expense's identity.)
    pub live: Vec<(ExpenseId, Fact)>,
    /// The reference rows this worker owns (see [`crate::reference`]), in no order.
    pub reference: Vec<(crate::reference::RefKey, crate::reference::RefValue)>,
}

/// Shared between the upsert operator and its driver: the epochs to copy the live set at, and
/// the copies taken.
#[derive(Debug, Default)]
pub struct SnapshotState {
    /// Epochs to take a copy at. A request must be made before this worker advances its input
    /// past the epoch (then the operator cannot have applied it yet).
    pub requested: BTreeSet<Epoch>,
    /// Copies taken, oldest first.
    pub taken: Vec<LiveSnapshot>,
}

/// A handle to the upsert operator's snapshot requests and results.
pub type UpsertSnapshots = Rc<RefCell<SnapshotState>>;

/// Turns a stream of upsert instructions into the collection of live facts.
pub trait UpsertByExpense<'scope> {
    /// Applies instructions per `expense_id`, epoch by epoch, in arrival order within an
    /// epoch; see the module docs. Copies the live set at the epochs requested in `snapshots`.
    ///
    /// Input updates must have diff `1` (an instruction is an event, not a multiset member); an
    /// update with diff `n > 1` is applied `n` times, which for upserts is the same as once, and
    /// updates with diff `<= 0` are ignored.
    fn upsert_by_expense(
        self,
        snapshots: UpsertSnapshots,
    ) -> VecCollection<'scope, Epoch, Fact, i64>;
}

impl<'scope> UpsertByExpense<'scope> for VecCollection<'scope, Epoch, Instruction, i64> {
    fn upsert_by_expense(
        self,
        snapshots: UpsertSnapshots,
    ) -> VecCollection<'scope, Epoch, Fact, i64> {
        let exchange = Exchange::new(|update: &(Instruction, Epoch, i64)| {
            route(update.0.user_id, &update.0.expense_id)
        });
        self.inner
            .unary_frontier::<CapacityContainerBuilder<Vec<(Fact, Epoch, i64)>>, _, _, _>(
                exchange,
                "UpsertByExpense",
                |_capability, _info| {
                    // (user_id, expense_id) -> the live fact.
                    let mut live = LiveMap::default();
                    // Instructions of epochs not yet applied, in arrival order.
                    let mut held: BTreeMap<Epoch, (Capability<Epoch>, Vec<Instruction>)> =
                        BTreeMap::new();
                    move |(input, frontier), output| {
                        input.for_each(|capability, data| {
                            for (instruction, time, diff) in data.drain(..) {
                                if diff <= 0 {
                                    continue;
                                }
                                held.entry(time)
                                    .or_insert_with(|| (capability.delayed(&time, 0), Vec::new()))
                                    .1
                                    .push(instruction);
                            }
                        });
                        // Epochs the input can no longer reach, with copies due in between.
                        loop {
                            let next_held = held
                                .first_key_value()
                                .map(|(t, _)| *t)
                                .filter(|t| !frontier.less_equal(t));
                            let next_copy = snapshots
                                .borrow()
                                .requested
                                .first()
                                .copied()
                                .filter(|t| !frontier.less_equal(t));
                            match (next_held, next_copy) {
                                (Some(t), copy) if copy.is_none_or(|c| t <= c) => {
                                    let (_, (capability, instructions)) =
                                        held.pop_first().expect("checked");
                                    let mut session = output.session(&capability);
                                    for instruction in instructions {
                                        apply(&mut live, instruction, |fact, diff| {
                                            session.give((fact, t, diff));
                                        });
                                    }
                                }
                                (_, Some(epoch)) => {
                                    let copy = LiveSnapshot {
                                        epoch,
                                        live: live
                                            .iter()
                                            .map(|((user, id), f)| (id.clone(), f.of(*user)))
                                            .collect(),
                                        reference: Vec::new(),
                                    };
                                    let mut state = snapshots.borrow_mut();
                                    state.requested.remove(&epoch);
                                    state.taken.push(copy);
                                }
                                (_, None) => break,
                            }
                        }
                    }
                },
            )
            .as_collection()
    }
}

/// Applies one instruction to the live set, reporting the changes of live facts.
fn apply(live: &mut LiveMap, instruction: Instruction, mut emit: impl FnMut(Fact, i64)) {
    let Instruction {
        user_id,
        expense_id,
        fact,
    } = instruction;
    let key = (user_id, expense_id);
    match fact {
        Some(new) => match live.insert(key, new) {
            Some(old) => {
                if old != new {
                    // (A duplicate delivery changes nothing.)
                    emit(old.of(user_id), -1);
                    emit(new.of(user_id), 1);
                }
            }
            None => emit(new.of(user_id), 1),
        },
        None => {
            if let Some(old) = live.remove(&key) {
                emit(old.of(user_id), -1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;

    /// The sharded live map behaves as one map: random inserts, replacements and removes
    /// (many keys of one user, ids of both lengths, so some on the heap), checked against a
    /// `std` map after every step, with the whole content compared now and then.
    #[test]
    fn the_sharded_live_map_agrees_with_a_plain_map() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (food, rent) = (crate::Name::intern("food").0, crate::Name::intern("rent").0);
        let mut map = LiveMap::default();
        let mut model: std::collections::HashMap<(UserId, ExpenseId), LiveFact> =
            std::collections::HashMap::new();
        for step in 0..60_000 {
            let user = rng.random_range(0..20u64);
            let n = rng.random_range(0..3_000u32);
            let text = if n % 7 == 0 {
                format!("an-id-long-enough-to-live-on-the-heap-{n}")
            } else {
                format!("e{n}")
            };
            let key = (user, ExpenseId::new(&text).unwrap());
            if rng.random_range(0..4) == 0 {
                assert_eq!(map.remove(&key), model.remove(&key));
            } else {
                let fact = LiveFact {
                    category: if n % 2 == 0 { food } else { rent },
                    merchant: food,
                    amount_minor: rng.random_range(-500..5_000),
                    event_ms: i64::from(n),
                };
                assert_eq!(
                    map.insert(key.clone(), fact),
                    model.insert(key.clone(), fact)
                );
            }
            assert_eq!(map.get(&key), model.get(&key));
            assert_eq!(map.len(), model.len());
            if step % 10_000 == 0 {
                let mut all: Vec<_> = map.iter().cloned().collect();
                let mut expected: Vec<_> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
                all.sort_by(|a, b| a.0.cmp(&b.0));
                expected.sort_by(|a, b| a.0.cmp(&b.0));
                assert_eq!(all, expected);
            }
        }
        assert!(map.len() > 10_000, "the shards grew: {}", map.len());
        assert!(map.shards.iter().all(|shard| !shard.is_empty()));
    }

    /// What crosses the exchange and what the map keeps per live expense are fixed-size: for ids
    /// up to `ExpenseId::INLINE` bytes these sizes are the whole cost (no heap part), and they
    /// do not grow unnoticed.
    #[test]
    fn instructions_and_live_entries_are_fixed_size() {
        assert_eq!(size_of::<ExpenseId>(), 24);
        assert_eq!(size_of::<LiveFact>(), 32);
        assert_eq!(size_of::<LiveEntry>(), 64);
        assert!(
            size_of::<Instruction>() <= 72,
            "{}",
            size_of::<Instruction>()
        );
    }
}
