//! The file source: JSON v1 records, one per line.
//!
//! The offset of a record is the byte offset of its line, and the source's position is the byte
//! offset of the next line, so a restart can seek straight to it. Empty lines are skipped (they
//! are not records). A line longer than the record limit is not buffered whole: the source keeps
//! its first bytes, skips the rest and hands it on so the decoder rejects it as oversize. With
//! `follow`, the source waits at the end of the file for more lines, like `tail -f`; a last
//! line without a newline is only read once it is complete (or, without `follow`, at the end).

mod config;
mod reader;

#[cfg(test)]
mod tests;

pub use config::FileSourceConfig;
pub(crate) use reader::FileSource;
