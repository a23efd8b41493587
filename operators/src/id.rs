//! Expense identities: the exact `expense_id` text, inline when short, with no `String` per
//! record.
//!
//! Every record crosses the upsert stage's exchange and every live expense is a key of its map,
//! so the id is on the hottest path of the engine and in its largest state. A `String` there
//! costs a heap allocation per record (and per live expense: 24 bytes of `String` plus the
//! allocation, ~32 bytes more for a typical 18-byte id), and a pointer to chase on every lookup.
//!
//! Why not a fingerprint: two different expenses must never merge, and a finance product cannot
//! accept "almost never" (a 64-bit hash of a billion ids collides with a chance of about 3 %;
//! even a 128-bit one would need the text kept beside it to be exact). An [`ExpenseId`] *is* the
//! text, compared and hashed as the text.
//!
//! Why `compact_str`: a maintained small-string type of 24 bytes (the size of a `String`) that
//! keeps up to [`ExpenseId::INLINE`] bytes in place and only longer texts on the heap. The
//! common id shapes (the simulator's `e-` + 16 hex digits, a ULID, 20-digit numbers) are inline,
//! so they cost no allocation through the exchange or in the upsert map; a UUID in text (36
//! bytes) takes one allocation, as a `String` did. The contract stays 1 to
//! [`ExpenseId::MAX_LEN`] bytes: no id that was valid before is refused now.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use compact_str::CompactString;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The exact text of an `expense_id`, 1 to [`ExpenseId::MAX_LEN`] bytes of UTF-8, inline up to
/// [`ExpenseId::INLINE`] bytes.
///
/// Equality, ordering and hashing are those of the text (`Borrow<str>` holds: a map keyed by
/// `ExpenseId` can be looked up with a `&str`).
#[derive(Clone)]
pub struct ExpenseId(CompactString);

/// Why a text cannot be an [`ExpenseId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpenseIdError {
    /// The empty text.
    #[error("expense_id must not be empty")]
    Empty,
    /// Longer than [`ExpenseId::MAX_LEN`] bytes.
    #[error(
        "expense_id is {len} bytes; at most {} bytes are allowed",
        ExpenseId::MAX_LEN
    )]
    TooLong {
        /// The text's length in bytes.
        len: usize,
    },
}

impl ExpenseId {
    /// The longest id, in bytes (UTF-8): the record contract.
    pub const MAX_LEN: usize = 128;

    /// The longest id kept inline, in bytes: shorter ids never touch the heap.
    pub const INLINE: usize = std::mem::size_of::<CompactString>();

    /// The id with this text.
    ///
    /// # Errors
    ///
    /// [`ExpenseIdError`] if `text` is empty or longer than [`ExpenseId::MAX_LEN`] bytes.
    pub fn new(text: &str) -> Result<ExpenseId, ExpenseIdError> {
        let len = text.len();
        if len == 0 {
            return Err(ExpenseIdError::Empty);
        }
        if len > Self::MAX_LEN {
            return Err(ExpenseIdError::TooLong { len });
        }
        Ok(ExpenseId(CompactString::new(text)))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The text's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Whether the text lives on the heap (longer than [`ExpenseId::INLINE`] bytes).
    pub fn is_heap_allocated(&self) -> bool {
        self.0.is_heap_allocated()
    }
}

impl Deref for ExpenseId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ExpenseId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for ExpenseId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for ExpenseId {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for ExpenseId {}

impl PartialEq<str> for ExpenseId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ExpenseId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialOrd for ExpenseId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ExpenseId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for ExpenseId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As the text, so that `Borrow<str>` lookups find it.
        self.as_str().hash(state);
    }
}

impl TryFrom<&str> for ExpenseId {
    type Error = ExpenseIdError;
    fn try_from(text: &str) -> Result<Self, Self::Error> {
        ExpenseId::new(text)
    }
}

impl TryFrom<String> for ExpenseId {
    type Error = ExpenseIdError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        ExpenseId::new(&text)
    }
}

impl std::str::FromStr for ExpenseId {
    type Err = ExpenseIdError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ExpenseId::new(text)
    }
}

impl fmt::Debug for ExpenseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ExpenseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ExpenseId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ExpenseId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        ExpenseId::new(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn keeps_the_exact_text_inline() {
        assert_eq!(std::mem::size_of::<ExpenseId>(), 24);
        let id = ExpenseId::new("e-00ff").unwrap();
        assert!(!id.is_heap_allocated());
        let inline = "x".repeat(ExpenseId::INLINE);
        assert!(!ExpenseId::new(&inline).unwrap().is_heap_allocated());
        assert_eq!(id.as_str(), "e-00ff");
        assert_eq!(id, "e-00ff");
        // Different texts are different ids, whatever their length or content.
        assert_ne!(
            ExpenseId::new("e-1").unwrap(),
            ExpenseId::new("e-1\0").unwrap()
        );
        assert_ne!(ExpenseId::new("a").unwrap(), ExpenseId::new("b").unwrap());
        let uuid = "123e4567-e89b-12d3-a456-426614174000";
        assert_eq!(ExpenseId::new(uuid).unwrap().as_str(), uuid);
        assert!(ExpenseId::new(uuid).unwrap().is_heap_allocated());
        let multibyte = "é".repeat(ExpenseId::MAX_LEN / 2);
        assert_eq!(ExpenseId::new(&multibyte).unwrap().as_str(), multibyte);
    }

    #[test]
    fn rejects_empty_and_too_long_ids() {
        assert_eq!(ExpenseId::new(""), Err(ExpenseIdError::Empty));
        let longest = "x".repeat(ExpenseId::MAX_LEN);
        assert_eq!(ExpenseId::new(&longest).unwrap().len(), ExpenseId::MAX_LEN);
        let long = "x".repeat(ExpenseId::MAX_LEN + 1);
        assert_eq!(
            ExpenseId::new(&long),
            Err(ExpenseIdError::TooLong {
                len: ExpenseId::MAX_LEN + 1
            })
        );
        assert!(serde_json::from_str::<ExpenseId>(&format!("{long:?}")).is_err());
    }

    #[test]
    fn orders_hashes_and_serializes_as_the_text() {
        let mut ids: Vec<ExpenseId> = ["b", "a", "ab", "aa"]
            .iter()
            .map(|t| ExpenseId::new(t).unwrap())
            .collect();
        ids.sort();
        let texts: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
        assert_eq!(texts, ["a", "aa", "ab", "b"]);
        let mut map = HashMap::new();
        map.insert(ExpenseId::new("e-7").unwrap(), 7);
        assert_eq!(map.get("e-7"), Some(&7));
        let json = serde_json::to_string(&ids[0]).unwrap();
        assert_eq!(json, "\"a\"");
        assert_eq!(serde_json::from_str::<ExpenseId>(&json).unwrap(), ids[0]);
    }
}
