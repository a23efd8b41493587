//! Decoding and validating JSON v1 expense records.
//!
//! [`decode`] turns the bytes of one record (a Kafka value, a file line, an in-process push)
//! into a [`Record`], or into a [`Rejection`] whose [`RejectReason`] says precisely what was
//! wrong. It never panics, whatever the input: rejected records are data to be counted and
//! sent to the dead-letter output, not errors that stop the engine.
//!
//! The contract (see `ARCHITECTURE.md`):
//!
//! | field | rule |
//! |---|---|
//! | whole record | at most [`MAX_RECORD_BYTES`], UTF-8, one JSON object; unknown fields are ignored |
//! | `expense_id` | string, 1 to 128 bytes ([`MAX_EXPENSE_ID_BYTES`]; inline up to 24, see [`crate::id`]) |
//! | `user_id` | integer in `1..=2^63-1` |
//! | `op` | absent, `null`, `"upsert"` or `"delete"` |
//! | `amount_minor` | integer (a JSON float such as `12.5` is rejected), `|amount| <= 10^12` |
//! | `currency` | three uppercase ASCII letters |
//! | `category`, `merchant` | string, 1 to 64 characters |
//! | `card_id` | optional string, 1 to 128 bytes |
//! | `event_time` | RFC 3339 timestamp, normalised to UTC |
//!
//! A delete needs only `expense_id` and `user_id`; its other fields are not looked at.
//!
//! Fields are first captured as raw JSON text ([`RawValue`]) and then checked one by one, which
//! keeps the common path to a single pass over the bytes plus a cheap look at each field, and
//! lets an integer field tell "not an integer" apart from "not a number at all".

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::model::{Expense, ExpenseId, MAX_ABS_AMOUNT_MINOR, Name, Record};

/// The largest record accepted, in bytes.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Longest accepted `expense_id`, in bytes. Longer ids are rejected with
/// [`RejectReason::BadExpenseId`]; ids up to [`ExpenseId::INLINE`] bytes travel without an
/// allocation (see [`crate::id`]).
pub const MAX_EXPENSE_ID_BYTES: usize = ExpenseId::MAX_LEN;

/// Longest accepted `card_id`, in bytes.
pub const MAX_CARD_ID_BYTES: usize = 128;

/// Longest accepted `category` or `merchant`, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// Why a record was rejected. [`RejectReason::code`] is the stable, machine-readable form used
/// in metrics, dead-letter headers and gRPC status counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Larger than [`MAX_RECORD_BYTES`].
    Oversize,
    /// Not valid UTF-8.
    NotUtf8,
    /// Not valid JSON (syntax error, truncated, duplicate field).
    BadJson,
    /// Valid JSON, but not an object.
    NotAnObject,
    /// A required field is absent or `null`.
    MissingField(&'static str),
    /// A field has the wrong JSON type (a number where a string belongs, ...).
    WrongType(&'static str),
    /// `expense_id` is empty or longer than [`MAX_EXPENSE_ID_BYTES`] (128) bytes.
    BadExpenseId,
    /// `user_id` is not an integer in `1..=2^63-1`.
    BadUserId,
    /// `amount_minor` is a number but not an integer (`12.5`, `1e3`).
    AmountNotInteger,
    /// `|amount_minor|` is larger than 10^12.
    AmountOutOfRange,
    /// `currency` is not three uppercase ASCII letters.
    BadCurrency,
    /// `category` is empty or longer than 64 characters.
    BadCategory,
    /// `merchant` is empty or longer than 64 characters.
    BadMerchant,
    /// `card_id` is empty or longer than 128 bytes.
    BadCardId,
    /// `event_time` is not an RFC 3339 timestamp.
    BadTimestamp,
    /// `op` is a string other than `upsert` or `delete`.
    UnknownOp,
    /// The record's `user_id` differs from the user its source says it belongs to (a per-user
    /// Kafka topic). Not produced by [`decode`]; sources that know the user check it.
    UserMismatch,
}

impl RejectReason {
    /// Every reason, for metrics that list all of them.
    pub const ALL_CODES: &'static [&'static str] = &[
        "oversize",
        "not_utf8",
        "bad_json",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "bad_expense_id",
        "bad_user_id",
        "amount_not_integer",
        "amount_out_of_range",
        "bad_currency",
        "bad_category",
        "bad_merchant",
        "bad_card_id",
        "bad_timestamp",
        "unknown_op",
        "user_mismatch",
    ];

    /// The stable machine-readable code of the reason.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::Oversize => "oversize",
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::BadJson => "bad_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::MissingField(_) => "missing_field",
            RejectReason::WrongType(_) => "wrong_type",
            RejectReason::BadExpenseId => "bad_expense_id",
            RejectReason::BadUserId => "bad_user_id",
            RejectReason::AmountNotInteger => "amount_not_integer",
            RejectReason::AmountOutOfRange => "amount_out_of_range",
            RejectReason::BadCurrency => "bad_currency",
            RejectReason::BadCategory => "bad_category",
            RejectReason::BadMerchant => "bad_merchant",
            RejectReason::BadCardId => "bad_card_id",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::UnknownOp => "unknown_op",
            RejectReason::UserMismatch => "user_mismatch",
        }
    }

    /// The field the reason is about, where there is one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            RejectReason::MissingField(f) | RejectReason::WrongType(f) => Some(f),
            RejectReason::BadExpenseId => Some("expense_id"),
            RejectReason::BadUserId | RejectReason::UserMismatch => Some("user_id"),
            RejectReason::AmountNotInteger | RejectReason::AmountOutOfRange => Some("amount_minor"),
            RejectReason::BadCurrency => Some("currency"),
            RejectReason::BadCategory => Some("category"),
            RejectReason::BadMerchant => Some("merchant"),
            RejectReason::BadCardId => Some("card_id"),
            RejectReason::BadTimestamp => Some("event_time"),
            RejectReason::UnknownOp => Some("op"),
            RejectReason::Oversize
            | RejectReason::NotUtf8
            | RejectReason::BadJson
            | RejectReason::NotAnObject => None,
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field() {
            Some(field) => write!(f, "{} ({field})", self.code()),
            None => f.write_str(self.code()),
        }
    }
}

/// A record that did not decode: the reason and a human-readable detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The machine-readable reason.
    pub reason: RejectReason,
    /// What exactly was wrong, for people (never contains more than a short prefix of input).
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for Rejection {}

/// The wire shape: every field captured as raw JSON, checked afterwards.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    expense_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    card_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    merchant: Option<&'a RawValue>,
    #[serde(borrow, default)]
    category: Option<&'a RawValue>,
    #[serde(borrow, default)]
    amount_minor: Option<&'a RawValue>,
    #[serde(borrow, default)]
    currency: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event_time: Option<&'a RawValue>,
    #[serde(borrow, default)]
    op: Option<&'a RawValue>,
}

/// Decodes and validates one JSON v1 record.
///
/// # Errors
///
/// A [`Rejection`] saying what is wrong with the record; see the module docs for the rules.
///
/// # Examples
///
/// ```
/// use spendflow_operators::decode::{decode, RejectReason};
/// use spendflow_operators::model::Record;
///
/// let ok = decode(br#"{"expense_id":"e-1","user_id":42,"merchant":"Tesco","category":"groceries",
///     "amount_minor":1299,"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}"#).unwrap();
/// assert_eq!(ok.user_id(), 42);
/// assert!(matches!(ok, Record::Upsert(ref e) if e.amount_minor == 1299));
///
/// let float = decode(br#"{"expense_id":"e-1","user_id":42,"merchant":"Tesco","category":"groceries",
///     "amount_minor":12.5,"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}"#).unwrap_err();
/// assert_eq!(float.reason, RejectReason::AmountNotInteger);
/// ```
pub fn decode(bytes: &[u8]) -> Result<Record, Rejection> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(Rejection::new(
            RejectReason::Oversize,
            format!(
                "record is {} bytes; the limit is {MAX_RECORD_BYTES}",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::new(
            RejectReason::NotUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    // Checked before deserializing: serde would also accept a JSON array as a struct.
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<&RawValue>(text) {
            Ok(_) => Rejection::new(
                RejectReason::NotAnObject,
                "the record must be a JSON object",
            ),
            Err(e) => Rejection::new(RejectReason::BadJson, e.to_string()),
        });
    }
    let wire: Wire<'_> = serde_json::from_str(text)
        .map_err(|e| Rejection::new(RejectReason::BadJson, e.to_string()))?;

    let expense_id = required_string(wire.expense_id, "expense_id")?;
    let expense_id = ExpenseId::new(&expense_id).map_err(|_| {
        Rejection::new(
            RejectReason::BadExpenseId,
            format!(
                "expense_id must be 1 to {MAX_EXPENSE_ID_BYTES} bytes, got {}",
                expense_id.len()
            ),
        )
    })?;
    let user_id = user_id(wire.user_id)?;

    let is_delete = match present(wire.op) {
        None => false,
        Some(raw) => match string(raw, "op")?.as_ref() {
            "upsert" => false,
            "delete" => true,
            other => {
                return Err(Rejection::new(
                    RejectReason::UnknownOp,
                    format!(
                        "op must be \"upsert\" or \"delete\", got {:?}",
                        prefix(other)
                    ),
                ));
            }
        },
    };
    if is_delete {
        return Ok(Record::Delete {
            expense_id,
            user_id,
        });
    }

    let merchant = name(wire.merchant, "merchant", RejectReason::BadMerchant)?;
    let category = name(wire.category, "category", RejectReason::BadCategory)?;
    let amount_minor = amount(wire.amount_minor)?;
    let currency = currency(wire.currency)?;
    let event_ms = event_time(wire.event_time)?;
    let card_id = match present(wire.card_id) {
        None => None,
        Some(raw) => {
            let card = string(raw, "card_id")?;
            if card.is_empty() || card.len() > MAX_CARD_ID_BYTES {
                return Err(Rejection::new(
                    RejectReason::BadCardId,
                    format!("card_id must be 1 to {MAX_CARD_ID_BYTES} bytes"),
                ));
            }
            Some(card.into_owned())
        }
    };

    Ok(Record::Upsert(Expense {
        expense_id,
        user_id,
        card_id,
        merchant,
        category,
        amount_minor,
        currency,
        event_ms,
    }))
}

/// A field that is absent or `null` counts as absent.
fn present(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|r| r.get() != "null")
}

fn required<'a>(raw: Option<&'a RawValue>, field: &'static str) -> Result<&'a RawValue, Rejection> {
    present(raw).ok_or_else(|| {
        Rejection::new(
            RejectReason::MissingField(field),
            format!("{field} is required"),
        )
    })
}

fn string<'a>(raw: &'a RawValue, field: &'static str) -> Result<Cow<'a, str>, Rejection> {
    if !raw.get().starts_with('"') {
        return Err(Rejection::new(
            RejectReason::WrongType(field),
            format!("{field} must be a string, got {}", prefix(raw.get())),
        ));
    }
    // The raw text is a valid JSON string already. Without a backslash its text is exactly what
    // is between the quotes (JSON escapes every control character), so it is borrowed: serde's
    // `Cow<str>` would always allocate, which was one heap allocation per string field and record.
    let text = raw.get();
    let inner = &text[1..text.len() - 1];
    if !inner.contains('\\') {
        return Ok(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(text)
        .map(Cow::Owned)
        .map_err(|e| Rejection::new(RejectReason::BadJson, format!("{field}: {e}")))
}

fn required_string<'a>(
    raw: Option<&'a RawValue>,
    field: &'static str,
) -> Result<Cow<'a, str>, Rejection> {
    string(required(raw, field)?, field)
}

/// The text of a JSON number that is an integer (no fraction, no exponent), or why not.
fn integer_text<'a>(
    raw: &'a RawValue,
    field: &'static str,
    not_integer: RejectReason,
) -> Result<&'a str, Rejection> {
    let text = raw.get();
    let digits = text.strip_prefix('-').unwrap_or(text);
    let is_number = digits.starts_with(|c: char| c.is_ascii_digit());
    if !is_number {
        return Err(Rejection::new(
            RejectReason::WrongType(field),
            format!("{field} must be an integer, got {}", prefix(text)),
        ));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::new(
            not_integer,
            format!("{field} must be an integer, got {}", prefix(text)),
        ));
    }
    Ok(text)
}

fn user_id(raw: Option<&RawValue>) -> Result<u64, Rejection> {
    let text = integer_text(
        required(raw, "user_id")?,
        "user_id",
        RejectReason::BadUserId,
    )?;
    match text.parse::<i64>() {
        Ok(id) if id >= 1 => Ok(id as u64),
        _ => Err(Rejection::new(
            RejectReason::BadUserId,
            format!(
                "user_id must be an integer from 1 to {}, got {}",
                i64::MAX,
                prefix(text)
            ),
        )),
    }
}

fn amount(raw: Option<&RawValue>) -> Result<i64, Rejection> {
    let text = integer_text(
        required(raw, "amount_minor")?,
        "amount_minor",
        RejectReason::AmountNotInteger,
    )?;
    match text.parse::<i64>() {
        Ok(a) if a.unsigned_abs() <= MAX_ABS_AMOUNT_MINOR as u64 => Ok(a),
        _ => Err(Rejection::new(
            RejectReason::AmountOutOfRange,
            format!(
                "amount_minor must be at most {MAX_ABS_AMOUNT_MINOR} in absolute value, got {}",
                prefix(text)
            ),
        )),
    }
}

fn currency(raw: Option<&RawValue>) -> Result<[u8; 3], Rejection> {
    let text = required_string(raw, "currency")?;
    match text.as_bytes() {
        [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_uppercase()) => Ok([*a, *b, *c]),
        _ => Err(Rejection::new(
            RejectReason::BadCurrency,
            format!(
                "currency must be three uppercase letters (ISO 4217), got {:?}",
                prefix(&text)
            ),
        )),
    }
}

fn name(
    raw: Option<&RawValue>,
    field: &'static str,
    bad: RejectReason,
) -> Result<Arc<str>, Rejection> {
    let text = required_string(raw, field)?;
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(Rejection::new(
            bad,
            format!("{field} must be 1 to {MAX_NAME_CHARS} characters, got {chars}"),
        ));
    }
    // Not interned here: the record may still be rejected (see `Name::shared`).
    Ok(Name::shared(&text))
}

fn event_time(raw: Option<&RawValue>) -> Result<i64, Rejection> {
    let text = required_string(raw, "event_time")?;
    chrono::DateTime::parse_from_rfc3339(&text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            Rejection::new(
                RejectReason::BadTimestamp,
                format!(
                    "event_time must be RFC 3339 (e.g. 2026-11-24T10:15:00Z): {e}, got {:?}",
                    prefix(&text)
                ),
            )
        })
}

/// At most 40 characters of a value, for messages.
fn prefix(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Encodes a record as JSON v1, the inverse of [`decode`] (used by generators and tests).
pub fn encode(record: &Record) -> String {
    use serde_json::json;
    match record {
        Record::Upsert(e) => {
            let mut v = json!({
                "expense_id": e.expense_id,
                "user_id": e.user_id,
                "merchant": &*e.merchant,
                "category": &*e.category,
                "amount_minor": e.amount_minor,
                "currency": e.currency_str(),
                "event_time": format_event_time(e.event_ms),
                "op": "upsert",
            });
            if let Some(card) = &e.card_id {
                v["card_id"] = json!(card);
            }
            v.to_string()
        }
        Record::Delete {
            expense_id,
            user_id,
        } => json!({"expense_id": expense_id, "user_id": user_id, "op": "delete"}).to_string(),
    }
}

/// Formats milliseconds since the epoch as RFC 3339 UTC (`2026-11-24T10:15:00Z`, with
/// milliseconds only when they are not zero).
pub fn format_event_time(event_ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(event_ms) {
        Some(t) if event_ms % 1000 == 0 => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => event_ms.to_string(),
    }
}

#[cfg(test)]
mod tests;
