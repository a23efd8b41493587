//! Expense identities: the exact `expense_id` text, inline, with no heap allocation.
//!
//! Every record crosses the upsert stage's exchange and every live expense is a key of its map,
//! so the id is on the hottest path of the engine and in its largest state. A `String` there
//! costs a heap allocation per record (and per live expense: 24 bytes of `String` plus the
//! allocation, ~32 bytes more for a typical 18-byte id), and a pointer to chase on every lookup.
//!
//! Why an inline id and not a fingerprint: two different expenses must never merge, and a
//! finance product cannot accept "almost never" (a 64-bit hash of a billion ids collides with a
//! chance of about 3 %; even a 128-bit one would need the text kept beside it to be exact). An
//! [`ExpenseId`] *is* the text: `len` and the bytes, zero-padded, compared and hashed as the
//! text. It is a fixed [`ExpenseId::CAPACITY`] + 1 = 40 bytes, with no heap part.
//!
//! The price is a limit: an `expense_id` longer than [`ExpenseId::CAPACITY`] (39) bytes is
//! rejected when the record is decoded, with the dead-letter reason `bad_expense_id` and a
//! detail naming the limit (see `decode`). 39 bytes hold the common id shapes: a UUID in text
//! (36) with a prefix of up to 3 bytes (`tx-` + UUID), a ULID (26), 32 hex digits, or the
//! simulator's `e-` + 16 hex digits (18). The contract limit was 128 bytes before; ids of 40 to
//! 128 bytes now go to the dead-letter output (counted, never dropped silently).
//!
//! Why 39 and not the 31 that would make the upsert map's entry as small as its old fixed part:
//! a UUID in text must fit. Why not 47 (`exp_` + UUID): each 8 bytes more are 8 more per live
//! expense in the upsert map's slot (which hashbrown keeps up to half empty after a resize) and
//! per exchanged record. The capacity is this one constant.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The exact text of an `expense_id`, 1 to [`ExpenseId::CAPACITY`] bytes of UTF-8, inline.
///
/// Equality, ordering and hashing are those of the text (`Borrow<str>` holds: a map keyed by
/// `ExpenseId` can be looked up with a `&str`).
#[derive(Clone)]
pub struct ExpenseId {
    /// Bytes of text in `bytes`; the rest of `bytes` is zero.
    len: u8,
    bytes: [u8; ExpenseId::CAPACITY],
}

/// Why a text cannot be an [`ExpenseId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpenseIdError {
    /// The empty text.
    #[error("expense_id must not be empty")]
    Empty,
    /// Longer than [`ExpenseId::CAPACITY`] bytes.
    #[error(
        "expense_id is {len} bytes; ids are kept inline and exact, at most {} bytes",
        ExpenseId::CAPACITY
    )]
    TooLong {
        /// The text's length in bytes.
        len: usize,
    },
}

impl ExpenseId {
    /// The longest id, in bytes (UTF-8). See the module docs for the choice.
    pub const CAPACITY: usize = 39;

    /// The id with this text.
    ///
    /// # Errors
    ///
    /// [`ExpenseIdError`] if `text` is empty or longer than [`ExpenseId::CAPACITY`] bytes.
    pub fn new(text: &str) -> Result<ExpenseId, ExpenseIdError> {
        let len = text.len();
        if len == 0 {
            return Err(ExpenseIdError::Empty);
        }
        if len > Self::CAPACITY {
            return Err(ExpenseIdError::TooLong { len });
        }
        let mut bytes = [0u8; Self::CAPACITY];
        bytes[..len].copy_from_slice(text.as_bytes());
        Ok(ExpenseId {
            len: len as u8,
            bytes,
        })
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only `new` writes `bytes`, from a `&str`, and `len` never splits it.
        std::str::from_utf8(self.as_bytes()).expect("an ExpenseId holds UTF-8")
    }

    /// The text's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
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
        assert_eq!(std::mem::size_of::<ExpenseId>(), ExpenseId::CAPACITY + 1);
        let id = ExpenseId::new("e-00ff").unwrap();
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
        let multibyte = "é".repeat(ExpenseId::CAPACITY / 2);
        assert_eq!(ExpenseId::new(&multibyte).unwrap().as_str(), multibyte);
    }

    #[test]
    fn rejects_empty_and_too_long_ids() {
        assert_eq!(ExpenseId::new(""), Err(ExpenseIdError::Empty));
        let longest = "x".repeat(ExpenseId::CAPACITY);
        assert_eq!(ExpenseId::new(&longest).unwrap().len(), ExpenseId::CAPACITY);
        let long = "x".repeat(ExpenseId::CAPACITY + 1);
        assert_eq!(
            ExpenseId::new(&long),
            Err(ExpenseIdError::TooLong {
                len: ExpenseId::CAPACITY + 1
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
