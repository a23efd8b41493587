use std::io::Write;

use super::*;
use crate::source::{Payload, Poll, Source};

fn lines(source: &mut FileSource) -> (Vec<(i64, Vec<u8>)>, Poll) {
    let mut out = Vec::new();
    let poll = source.poll(&mut out, 1000).unwrap();
    let got = out
        .into_iter()
        .map(|r| match r.payload {
            Payload::Bytes(b) => (r.offset, b.to_vec()),
            Payload::Record(_) | Payload::Reference(_) => panic!("files hold bytes"),
        })
        .collect();
    (got, poll)
}

#[test]
fn reads_lines_with_offsets_and_skips_blank_ones() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(file, "a\n\nbb\r\n   \nccc").unwrap();
    let config = FileSourceConfig {
        path: file.path().into(),
        follow: false,
    };
    let mut source = FileSource::open(config.clone(), 0).unwrap();
    let (got, poll) = lines(&mut source);
    assert_eq!(
        got,
        vec![
            (0, b"a".to_vec()),
            (3, b"bb".to_vec()),
            (11, b"ccc".to_vec())
        ]
    );
    assert_eq!(poll, Poll::Ready);
    assert_eq!(source.partitions()[0].position, 14);
    assert_eq!(lines(&mut source).1, Poll::Finished);
    // Resuming at a recorded offset reads exactly the rest.
    let mut resumed = FileSource::open(config, 3).unwrap();
    assert_eq!(lines(&mut resumed).0.len(), 2);
}

#[test]
fn follow_waits_for_complete_lines() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(file, "one\ntw").unwrap();
    file.flush().unwrap();
    let config = FileSourceConfig {
        path: file.path().into(),
        follow: true,
    };
    let mut source = FileSource::open(config, 0).unwrap();
    assert_eq!(
        lines(&mut source),
        (vec![(0, b"one".to_vec())], Poll::Ready)
    );
    assert_eq!(lines(&mut source), (vec![], Poll::Idle));
    write!(file, "o\nthree\n").unwrap();
    file.flush().unwrap();
    let (got, _) = lines(&mut source);
    assert_eq!(got, vec![(4, b"two".to_vec()), (8, b"three".to_vec())]);
    assert_eq!(source.partitions()[0].position, 14);
}

#[test]
fn an_oversize_line_is_truncated_not_buffered_whole() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let huge = "x".repeat(3 * MAX);
    writeln!(file, "{huge}").unwrap();
    writeln!(file, "next").unwrap();
    let config = FileSourceConfig {
        path: file.path().into(),
        follow: false,
    };
    let mut source = FileSource::open(config, 0).unwrap();
    let (got, _) = lines(&mut source);
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].1.len(),
        MAX + 1,
        "kept one byte over the limit, so it is rejected"
    );
    assert_eq!(got[1], ((3 * MAX + 1) as i64, b"next".to_vec()));
}

const MAX: usize = spendflow_operators::decode::MAX_RECORD_BYTES;

#[test]
fn a_missing_file_says_which() {
    let config = FileSourceConfig {
        path: "/no/such/file.jsonl".into(),
        follow: false,
    };
    let err = FileSource::open(config, 0).err().unwrap();
    assert!(err.to_string().contains("/no/such/file.jsonl"), "{err}");
    assert!(!err.is_retriable());
}
