use proptest::prelude::*;

use super::*;

const GOOD: &str = r#"{"expense_id":"e-7f3a","user_id":42,"card_id":"c-42-1","merchant":"Tesco","category":"groceries","amount_minor":1299,"currency":"EUR","event_time":"2026-11-24T10:15:00Z","op":"upsert"}"#;

/// GOOD with one field replaced by raw JSON text, or removed when `value` is `None`.
fn with(field: &str, value: Option<&str>) -> String {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(GOOD).unwrap();
    v.remove(field);
    let mut text = serde_json::Value::Object(v).to_string();
    if let Some(value) = value {
        text.pop();
        text.push_str(&format!(",\"{field}\":{value}}}"));
    }
    text
}

fn reason(text: &str) -> RejectReason {
    decode(text.as_bytes()).expect_err(text).reason
}

#[test]
fn the_contract_example_decodes() {
    let Record::Upsert(e) = decode(GOOD.as_bytes()).unwrap() else {
        panic!("not an upsert")
    };
    assert_eq!(e.expense_id, "e-7f3a");
    assert_eq!(e.user_id, 42);
    assert_eq!(e.card_id.as_deref(), Some("c-42-1"));
    assert_eq!(&*e.merchant, "Tesco");
    assert_eq!(&*e.category, "groceries");
    assert_eq!(e.amount_minor, 1299);
    assert_eq!(e.currency_str(), "EUR");
    assert_eq!(format_event_time(e.event_ms), "2026-11-24T10:15:00Z");
}

#[test]
fn op_defaults_to_upsert_and_delete_needs_only_ids() {
    assert!(matches!(
        decode(with("op", None).as_bytes()),
        Ok(Record::Upsert(_))
    ));
    assert!(matches!(
        decode(with("op", Some("null")).as_bytes()),
        Ok(Record::Upsert(_))
    ));
    let delete = decode(br#"{"expense_id":"e-1","user_id":7,"op":"delete"}"#).unwrap();
    assert_eq!(
        delete,
        Record::Delete {
            expense_id: "e-1".parse().unwrap(),
            user_id: 7
        }
    );
    // A delete's other fields are not looked at, even when they would be invalid.
    let delete = decode(br#"{"expense_id":"e-1","user_id":7,"op":"delete","amount_minor":1.5}"#);
    assert!(matches!(delete, Ok(Record::Delete { .. })));
    assert_eq!(
        reason(r#"{"user_id":7,"op":"delete"}"#),
        RejectReason::MissingField("expense_id")
    );
    assert_eq!(
        reason(r#"{"expense_id":"e","op":"delete"}"#),
        RejectReason::MissingField("user_id")
    );
}

#[test]
fn each_rule_has_its_reason() {
    use RejectReason::*;
    let cases: Vec<(String, RejectReason)> = vec![
        (with("amount_minor", Some("12.5")), AmountNotInteger),
        (with("amount_minor", Some("1e3")), AmountNotInteger),
        (
            with("amount_minor", Some("\"12\"")),
            WrongType("amount_minor"),
        ),
        (
            with("amount_minor", Some("1000000000001")),
            AmountOutOfRange,
        ),
        (
            with("amount_minor", Some("-1000000000001")),
            AmountOutOfRange,
        ),
        (
            with("amount_minor", Some("-9223372036854775808")),
            AmountOutOfRange,
        ),
        (
            with("amount_minor", Some("99999999999999999999999")),
            AmountOutOfRange,
        ),
        (with("amount_minor", None), MissingField("amount_minor")),
        (with("user_id", Some("0")), BadUserId),
        (with("user_id", Some("-3")), BadUserId),
        (with("user_id", Some("9223372036854775808")), BadUserId),
        (with("user_id", Some("4.0")), BadUserId),
        (with("user_id", Some("\"42\"")), WrongType("user_id")),
        (with("expense_id", Some("\"\"")), BadExpenseId),
        (
            with(
                "expense_id",
                Some(&format!("\"{}\"", "x".repeat(MAX_EXPENSE_ID_BYTES + 1))),
            ),
            BadExpenseId,
        ),
        (with("expense_id", Some("17")), WrongType("expense_id")),
        (with("currency", Some("\"eur\"")), BadCurrency),
        (with("currency", Some("\"EURO\"")), BadCurrency),
        (with("currency", Some("\"E1R\"")), BadCurrency),
        (with("category", Some("\"\"")), BadCategory),
        (
            with("category", Some(&format!("\"{}\"", "é".repeat(65)))),
            BadCategory,
        ),
        (
            with("merchant", Some(&format!("\"{}\"", "m".repeat(65)))),
            BadMerchant,
        ),
        (with("merchant", None), MissingField("merchant")),
        (with("card_id", Some("\"\"")), BadCardId),
        (with("event_time", Some("\"yesterday\"")), BadTimestamp),
        (
            with("event_time", Some("\"2026-11-24 10:15:00\"")),
            BadTimestamp,
        ),
        (
            with("event_time", Some("\"2026-02-30T10:15:00Z\"")),
            BadTimestamp,
        ),
        (
            with("event_time", Some("1764000000")),
            WrongType("event_time"),
        ),
        (with("op", Some("\"insert\"")), UnknownOp),
        (with("op", Some("1")), WrongType("op")),
        ("{\"expense_id\":".to_string(), BadJson),
        ("[1,2,3]".to_string(), NotAnObject),
        ("\"just a string\"".to_string(), NotAnObject),
        (String::new(), BadJson),
        (
            GOOD.replace("\"user_id\":42", "\"user_id\":42,\"user_id\":43"),
            BadJson,
        ),
    ];
    for (text, expected) in cases {
        let got = decode(text.as_bytes());
        assert_eq!(got.as_ref().map_err(|r| r.reason), Err(expected), "{text}");
        // Every rejection says which rule it broke, for people too.
        assert!(!got.unwrap_err().detail.is_empty());
    }
}

#[test]
fn bounds_are_inclusive() {
    assert!(decode(with("amount_minor", Some("1000000000000")).as_bytes()).is_ok());
    assert!(decode(with("amount_minor", Some("-1000000000000")).as_bytes()).is_ok());
    assert!(decode(with("user_id", Some("9223372036854775807")).as_bytes()).is_ok());
    let longest = "x".repeat(MAX_EXPENSE_ID_BYTES);
    let Record::Upsert(e) =
        decode(with("expense_id", Some(&format!("\"{longest}\""))).as_bytes()).unwrap()
    else {
        panic!("not an upsert")
    };
    assert_eq!(e.expense_id, longest.as_str());
    assert!(decode(with("category", Some(&format!("\"{}\"", "é".repeat(64)))).as_bytes()).is_ok());
}

#[test]
fn size_and_encoding_are_checked_first() {
    let mut big = with("merchant", None);
    big.pop();
    big.push_str(&format!(",\"pad\":\"{}\"}}", "x".repeat(MAX_RECORD_BYTES)));
    assert_eq!(reason(&big), RejectReason::Oversize);
    let mut bad_utf8 = GOOD.as_bytes().to_vec();
    bad_utf8[20] = 0xff;
    assert_eq!(decode(&bad_utf8).unwrap_err().reason, RejectReason::NotUtf8);
}

#[test]
fn unknown_fields_and_escapes_are_fine() {
    let text = with("merchant", Some(r#""Caf\u00e9 \"Nord\"""#)).replace('{', "{\"extra\":[1,{}],");
    let Record::Upsert(e) = decode(text.as_bytes()).unwrap() else {
        panic!()
    };
    assert_eq!(&*e.merchant, "Café \"Nord\"");
}

#[test]
fn event_time_offsets_normalise_to_utc() {
    let t = with("event_time", Some("\"2026-11-25T00:30:00+01:00\""));
    let Record::Upsert(e) = decode(t.as_bytes()).unwrap() else {
        panic!()
    };
    assert_eq!(format_event_time(e.event_ms), "2026-11-24T23:30:00Z");
}

#[test]
fn encode_round_trips() {
    let record = decode(GOOD.as_bytes()).unwrap();
    assert_eq!(decode(encode(&record).as_bytes()).unwrap(), record);
    let delete = Record::Delete {
        expense_id: "e-9".parse().unwrap(),
        user_id: 3,
    };
    assert_eq!(decode(encode(&delete).as_bytes()).unwrap(), delete);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn never_panics_on_mutated_records(pos in 0usize..GOOD.len(), len in 0usize..8, fill in any::<u8>()) {
        let mut bytes = GOOD.as_bytes().to_vec();
        let end = (pos + len).min(bytes.len());
        for b in &mut bytes[pos..end] { *b = fill; }
        let _ = decode(&bytes);
        bytes.truncate(pos);
        let _ = decode(&bytes);
    }
}

#[test]
fn rejected_records_do_not_grow_the_name_table() {
    // Names unique to this test, so other tests interning at the same time cannot matter.
    let merchant = "Merchant only in rejected_records_do_not_grow_the_name_table";
    let category = "category only in rejected_records_do_not_grow_the_name_table";
    let record = |amount: &str| {
        format!(
            r#"{{"expense_id":"e-1","user_id":4,"merchant":"{merchant}","category":"{category}",
                "amount_minor":{amount},"currency":"EUR","event_time":"2026-11-24T10:15:00Z"}}"#
        )
    };
    let interned = || {
        crate::Name::interned()
            .iter()
            .filter(|n| &***n == merchant || &***n == category)
            .count()
    };
    // Valid names, but the record fails a later check: nothing is interned.
    let bad = decode(record("12.5").as_bytes()).unwrap_err();
    assert_eq!(bad.reason, RejectReason::AmountNotInteger);
    assert_eq!(interned(), 0);
    // A record that decodes is interned only once it enters the dataflow (its fact is taken).
    let Record::Upsert(ok) = decode(record("1299").as_bytes()).unwrap() else {
        panic!("an upsert")
    };
    assert_eq!(interned(), 0);
    let fact = ok.fact();
    assert_eq!(interned(), 2);
    assert_eq!(&*fact.merchant.text(), merchant);
}

/// Ids are exact whatever their length: every length the contract allows (inline or on the heap)
/// decodes to exactly its text, two long ids that share a prefix stay two expenses, and one byte
/// over the limit is rejected with a reason that names the limit, for upserts and deletes alike.
#[test]
fn expense_ids_are_exact_up_to_the_limit_and_rejected_beyond() {
    assert_eq!(MAX_EXPENSE_ID_BYTES, 128);
    for len in [
        1,
        ExpenseId::INLINE,
        ExpenseId::INLINE + 1,
        36,
        64,
        MAX_EXPENSE_ID_BYTES,
    ] {
        for last in ['a', 'b'] {
            let id = format!("{}{last}", "x".repeat(len - 1));
            let Record::Upsert(e) =
                decode(with("expense_id", Some(&format!("{id:?}"))).as_bytes()).unwrap()
            else {
                panic!("not an upsert")
            };
            assert_eq!(e.expense_id.as_str(), id);
            assert_eq!(e.expense_id.is_heap_allocated(), len > ExpenseId::INLINE);
        }
    }
    let long = "x".repeat(MAX_EXPENSE_ID_BYTES + 1);
    let upsert = decode(with("expense_id", Some(&format!("{long:?}"))).as_bytes()).unwrap_err();
    assert_eq!(upsert.reason, RejectReason::BadExpenseId);
    assert_eq!(upsert.reason.code(), "bad_expense_id");
    assert!(
        upsert.detail.contains("1 to 128 bytes") && upsert.detail.contains("got 129"),
        "{}",
        upsert.detail
    );
    let delete =
        decode(format!(r#"{{"expense_id":{long:?},"user_id":7,"op":"delete"}}"#).as_bytes())
            .unwrap_err();
    assert_eq!(delete.reason, RejectReason::BadExpenseId);
    // The limit is in bytes: 65 two-byte characters are 130 bytes.
    let wide = "é".repeat(65);
    assert_eq!(
        reason(&with("expense_id", Some(&format!("{wide:?}")))),
        RejectReason::BadExpenseId
    );
}
