//! Interned names of categories and merchants.
//!
//! Aggregate keys are compared and sorted millions of times per second inside the dataflow, so
//! they must not carry strings: a profile of the first version spent over a third of the worker's
//! time in `memcmp` on category and merchant names. A [`Name`] is instead a 64-bit FNV-1a hash of
//! the text — the same in every process and build, so workers and (later) cluster processes
//! agree without coordination — and a process-wide registry maps it back to the text for
//! answers.
//!
//! Two different texts with the same 64-bit hash would share one aggregate. Among a million
//! distinct names the chance of any such pair is about 3 in 100 million; the registry keeps the
//! first text and counts collisions ([`Name::collisions`]) so the engine can report them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use ahash::RandomState;
use serde::{Deserialize, Serialize};

/// Name ids are chosen by input (they are hashes of input text), so the maps keyed by them are
/// seeded per process.
type IdMap = HashMap<u64, Arc<str>, RandomState>;

/// An interned category or merchant name.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Name(u64);

static REGISTRY: OnceLock<RwLock<IdMap>> = OnceLock::new();
static COLLISIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Names this thread has seen: the registry's lock is taken once per name and thread.
    static SEEN: RefCell<IdMap> = RefCell::new(IdMap::default());
    /// Texts this thread interned for the first time since the last [`Name::take_fresh`],
    /// collected only on threads that asked ([`Name::collect_fresh`]: dataflow workers, which
    /// send them to every other worker so a cluster process that never read a name can still
    /// answer with its text).
    static FRESH: RefCell<Option<Vec<Arc<str>>>> = const { RefCell::new(None) };
}

fn registry() -> &'static RwLock<IdMap> {
    REGISTRY.get_or_init(Default::default)
}

fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl Name {
    /// Interns `text`: returns its name and the shared copy of the text (so records holding
    /// the same merchant share one allocation).
    pub fn intern(text: &str) -> (Name, Arc<str>) {
        let id = fnv1a(text);
        let cached = SEEN.with(|seen| seen.borrow().get(&id).cloned());
        if let Some(shared) = cached {
            if &*shared != text {
                COLLISIONS.fetch_add(1, Ordering::Relaxed);
            }
            return (Name(id), shared);
        }
        let shared = {
            let mut registry = registry().write().unwrap_or_else(|p| p.into_inner());
            let shared = registry
                .entry(id)
                .or_insert_with(|| Arc::from(text))
                .clone();
            if &*shared != text {
                COLLISIONS.fetch_add(1, Ordering::Relaxed);
            }
            shared
        };
        SEEN.with(|seen| seen.borrow_mut().insert(id, Arc::clone(&shared)));
        FRESH.with(|fresh| {
            if let Some(fresh) = fresh.borrow_mut().as_mut() {
                fresh.push(Arc::clone(&shared));
            }
        });
        (Name(id), shared)
    }

    /// Makes this thread collect the texts it interns for the first time, for
    /// [`Name::take_fresh`].
    pub fn collect_fresh() {
        FRESH.with(|fresh| {
            fresh.borrow_mut().get_or_insert_with(Vec::new);
        });
    }

    /// The texts this thread interned for the first time since the last call (empty unless
    /// [`Name::collect_fresh`] was called on it).
    pub fn take_fresh() -> Vec<Arc<str>> {
        FRESH.with(|fresh| {
            fresh
                .borrow_mut()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default()
        })
    }

    /// Learns a text another worker interned (see [`Name::collect_fresh`]): registers it
    /// without counting it as fresh here, so it is not sent on again.
    pub fn learn(text: &str) {
        let id = fnv1a(text);
        if SEEN.with(|seen| seen.borrow().contains_key(&id)) {
            return;
        }
        let shared = {
            let mut registry = registry().write().unwrap_or_else(|p| p.into_inner());
            registry
                .entry(id)
                .or_insert_with(|| Arc::from(text))
                .clone()
        };
        SEEN.with(|seen| seen.borrow_mut().insert(id, shared));
    }

    /// The text of the name, or `#<id>` for a name this process never interned.
    pub fn text(self) -> Arc<str> {
        if let Some(shared) = SEEN.with(|seen| seen.borrow().get(&self.0).cloned()) {
            return shared;
        }
        let registry = registry().read().unwrap_or_else(|p| p.into_inner());
        registry
            .get(&self.0)
            .cloned()
            .unwrap_or_else(|| Arc::from(format!("#{:016x}", self.0)))
    }

    /// The 64-bit id.
    pub fn id(self) -> u64 {
        self.0
    }

    /// The name with this id, as stored by [`Name::id`] (e.g. in a checkpoint). Its text is
    /// known only once some text with this id was interned in this process.
    pub fn from_id(id: u64) -> Name {
        Name(id)
    }

    /// A shared copy of `text` without interning it: the interned copy when the name is known
    /// already (no allocation), a new one otherwise. Decoding uses this, so a record that is
    /// rejected later (bad amount, wrong user, ...) never grows the registry, which is kept for
    /// the process's life and written into every checkpoint; only records that enter the
    /// dataflow are interned ([`crate::model::Expense::fact`]).
    pub fn shared(text: &str) -> Arc<str> {
        let id = fnv1a(text);
        let known = SEEN
            .with(|seen| seen.borrow().get(&id).cloned())
            .or_else(|| {
                let registry = registry().read().unwrap_or_else(|p| p.into_inner());
                registry.get(&id).cloned()
            });
        match known {
            Some(shared) if &*shared == text => shared,
            _ => Arc::from(text),
        }
    }

    /// How many names are interned in this process (reported by the status service: the
    /// registry never shrinks).
    pub fn count() -> usize {
        registry().read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Every text interned in this process so far (for checkpoints: interning them again in
    /// another process gives the same ids).
    pub fn interned() -> Vec<Arc<str>> {
        let registry = registry().read().unwrap_or_else(|p| p.into_inner());
        registry.values().cloned().collect()
    }

    /// How many times two different texts met under one id in this process.
    pub fn collisions() -> u64 {
        COLLISIONS.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.text())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn fresh_names_are_collected_once_per_thread_and_learned_ones_are_not() {
        std::thread::spawn(|| {
            // Not collecting: nothing is kept.
            Name::intern("fresh-test-before");
            Name::collect_fresh();
            assert!(Name::take_fresh().is_empty());
            Name::intern("fresh-test-a");
            Name::intern("fresh-test-a");
            Name::learn("fresh-test-learned");
            Name::intern("fresh-test-learned");
            let fresh: Vec<String> = Name::take_fresh().iter().map(|t| t.to_string()).collect();
            assert_eq!(fresh, vec!["fresh-test-a".to_string()]);
            assert!(Name::take_fresh().is_empty());
            assert_eq!(
                &*Name::from_id(Name::intern("fresh-test-learned").0.id()).text(),
                "fresh-test-learned"
            );
        })
        .join()
        .unwrap();
    }
    use super::*;

    #[test]
    fn interning_is_stable_and_shares_text() {
        let (a, text_a) = Name::intern("Tesco");
        let (b, text_b) = Name::intern("Tesco");
        assert_eq!(a, b);
        assert!(Arc::ptr_eq(&text_a, &text_b));
        assert_ne!(a, Name::intern("Aldi").0);
        assert_eq!(&*a.text(), "Tesco");
        // The id is a pure function of the text: the same in every process.
        assert_eq!(a.id(), fnv1a("Tesco"));
        // Other threads resolve it through the registry.
        let id = a;
        let text = std::thread::spawn(move || id.text()).join().unwrap();
        assert_eq!(&*text, "Tesco");
        assert_eq!(Name::collisions(), 0);
    }
}
