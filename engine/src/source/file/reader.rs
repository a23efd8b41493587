use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::sync::Arc;

use spendflow_operators::decode::MAX_RECORD_BYTES;

use super::FileSourceConfig;
use crate::error::SourceError;
use crate::source::{PartitionPosition, Payload, Poll, Source, SourceRecord};

/// Reads JSON lines from a file; see the module docs.
pub(crate) struct FileSource {
    config: FileSourceConfig,
    name: Arc<str>,
    reader: BufReader<File>,
    /// Byte offset of the next unread line.
    position: i64,
    /// Bytes of a line not yet complete (follow mode), and whether it overflowed the limit.
    partial: Vec<u8>,
    /// Total length of the partial line, including bytes not kept.
    partial_len: usize,
    finished: bool,
}

impl FileSource {
    /// Opens the file where a restored checkpoint left it (its byte offset under the name
    /// `file:<path>`), or at the beginning.
    ///
    /// # Errors
    ///
    /// [`SourceError::File`] if it cannot be opened or seeked.
    pub fn resume(
        config: FileSourceConfig,
        restored: &crate::source::RestoredPositions,
    ) -> Result<Self, SourceError> {
        let start = restored.get(&(config.name(), 0)).copied().unwrap_or(0);
        FileSource::open(config, start)
    }

    /// Opens the file at `start` (a byte offset, 0 for the beginning).
    ///
    /// # Errors
    ///
    /// [`SourceError::File`] if it cannot be opened or seeked.
    pub fn open(config: FileSourceConfig, start: i64) -> Result<Self, SourceError> {
        let err = |source| SourceError::File {
            path: config.path.clone(),
            source,
        };
        let mut file = File::open(&config.path).map_err(err)?;
        file.seek(SeekFrom::Start(start.max(0) as u64))
            .map_err(err)?;
        Ok(FileSource {
            name: Arc::from(config.name()),
            config,
            reader: BufReader::with_capacity(256 * 1024, file),
            position: start.max(0),
            partial: Vec::new(),
            partial_len: 0,
            finished: false,
        })
    }

    /// Reads the rest of the current line into `self.partial`, keeping at most one byte more
    /// than the record limit. Returns true if the line ended with a newline.
    fn read_line(&mut self) -> std::io::Result<bool> {
        loop {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                return Ok(false);
            }
            let (chunk, complete) = match memchr(b'\n', available) {
                Some(i) => (&available[..i], true),
                None => (available, false),
            };
            let keep = (MAX_RECORD_BYTES + 1)
                .saturating_sub(self.partial.len())
                .min(chunk.len());
            self.partial.extend_from_slice(&chunk[..keep]);
            self.partial_len += chunk.len();
            let consumed = chunk.len() + usize::from(complete);
            self.reader.consume(consumed);
            if complete {
                return Ok(true);
            }
        }
    }

    fn emit(&mut self, out: &mut Vec<SourceRecord>, line_len_with_newline: usize) {
        let mut bytes = std::mem::take(&mut self.partial);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let offset = self.position;
        self.position += line_len_with_newline as i64;
        self.partial_len = 0;
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            out.push(SourceRecord {
                payload: Payload::Bytes(bytes.into()),
                partition: 0,
                offset,
                expected_user: None,
                key: None,
            });
        }
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

impl Source for FileSource {
    fn poll(&mut self, out: &mut Vec<SourceRecord>, max: usize) -> Result<Poll, SourceError> {
        if self.finished {
            return Ok(Poll::Finished);
        }
        let start = out.len();
        while out.len() - start < max {
            let complete = self.read_line().map_err(|source| SourceError::File {
                path: self.config.path.clone(),
                source,
            })?;
            if complete {
                let len = self.partial_len + 1;
                self.emit(out, len);
                continue;
            }
            // End of file for now.
            if self.config.follow {
                break;
            }
            if self.partial_len > 0 {
                let len = self.partial_len;
                self.emit(out, len);
            }
            self.finished = true;
            return Ok(if out.len() > start {
                Poll::Ready
            } else {
                Poll::Finished
            });
        }
        Ok(if out.len() > start {
            Poll::Ready
        } else {
            Poll::Idle
        })
    }

    fn partitions(&self) -> Vec<PartitionPosition> {
        vec![PartitionPosition {
            source: Arc::clone(&self.name),
            partition: 0,
            position: self.position,
            high_watermark: None,
            ..PartitionPosition::default()
        }]
    }
}
