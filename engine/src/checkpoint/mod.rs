//! Checkpoints: the engine's state and input positions at one closed epoch, so a restart
//! resumes from there instead of replaying the world.
//!
//! What a checkpoint holds is what cannot be recomputed cheaply: the live expenses (the upsert
//! stage's map, `expense_id -> fact`), where every source partition stood when the epoch closed,
//! the counters that describe that input (records read, rejections by reason), and the texts of
//! the interned names its facts refer to. Everything else — every aggregate, last-seen times,
//! the read model — is a function of the live expenses and is rebuilt on restore by pushing
//! them back into the dataflow (about a second per million live expenses).
//!
//! A checkpoint at epoch `E` is taken without stopping the input: every worker asks its upsert
//! stage for a copy of its live set as of `E` (see `spendflow_operators::upsert`) and reports
//! its partition positions at `E`; the checkpoint writer joins the parts of all workers. With a
//! durable sink, it is written only once the sink has committed `E`, so the sink never has to
//! rewrite what a checkpoint already covers (see `sink::cassandra`).
//!
//! In a cluster (issue 15) every process writes its *share* of each checkpoint epoch: a normal
//! [`Checkpoint`] holding its workers' live expenses, its partitions' positions, its counters,
//! its names and reference rows. A restart restores the newest epoch for which every share is
//! there, merged ([`Checkpoint::merge`]), whatever the number of processes now: see [`shares`]
//! for the file names, completeness and retention.
//!
//! Stores implement [`CheckpointStore`] and are opened with [`open_store`]:
//! - a local directory, [`local::LocalDirStore`]: files written atomically (temporary file,
//!   fsync, rename, fsync of the directory), other engines fenced by an exclusive lock per
//!   process index (the processes of one cluster on one host share the directory);
//! - `hdfs://HOST:PORT/PATH` (cargo feature `hdfs`), `hdfs::HdfsStore`: the same files on
//!   HDFS, so processes on several hosts restore from one place. HDFS has no `flock`: nothing
//!   there fences a second engine started with the same process index (see its docs).

#[cfg(feature = "hdfs")]
pub mod hdfs;
pub mod local;
pub mod shares;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use spendflow_operators::reference::{RefKey, RefValue};
use spendflow_operators::{Epoch, ExpenseId, Fact, Name};

pub use local::LocalDirStore;

/// The state and positions of the engine at one closed epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The epoch: the checkpoint holds the effect of all input up to its end.
    pub epoch: Epoch,
    /// Where every source partition stood at the end of the epoch.
    pub positions: Vec<SavedPosition>,
    /// Records read from all sources up to the epoch.
    pub records_read: u64,
    /// Rejected records up to the epoch, by reason code.
    pub rejected: Vec<(String, u64)>,
    /// Texts of the interned names (categories, merchants) the facts refer to.
    pub names: Vec<String>,
    /// Every live expense: `(expense_id, fact)`.
    pub live: Vec<(ExpenseId, Fact)>,
    /// Every reference row (users' budgets and currencies, exchange rates) the dataflow held at
    /// the epoch: a CDC source resumes at its saved binlog position, so the rows it read before
    /// come back from here (version 3 on; empty before).
    pub reference: Vec<(RefKey, RefValue)>,
    /// The incarnation (timeline of epoch numbers) the checkpoint's epoch belongs to; empty in
    /// checkpoints written before incarnations existed. Kept by the serving layer (issue 11, 5b).
    pub incarnation: String,
    /// Where a restart starts reading the dead-letter topic to learn which re-read records
    /// have their dead letter there already; `None`: the whole topic (no durable dead-letter
    /// output, or a version 1 checkpoint).
    pub dead_letter_scan: Option<DeadLetterScan>,
}

/// Where in the dead-letter topic the dead letters of records after a checkpoint's positions
/// start: every dead letter of a record at or after the checkpoint's positions is at or after
/// `from` in its partition, so a restart reads only those (O(dead letters since the checkpoint),
/// not the whole topic).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterScan {
    /// The dead-letter topic these offsets are in (another topic is read whole).
    pub topic: String,
    /// `(partition, offset)` for every partition of the topic; partitions not listed (created
    /// later) are read from their start.
    pub from: Vec<(i32, i64)>,
}

/// The position of one source partition in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SavedPosition {
    /// The source (`file:/path`, a topic, ...).
    pub source: String,
    /// The partition.
    pub partition: i32,
    /// The next offset to read.
    pub position: i64,
}

/// The part of a checkpoint that is not the live set, stored as JSON in the file header.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    epoch: Epoch,
    positions: Vec<SavedPosition>,
    records_read: u64,
    rejected: Vec<(String, u64)>,
    names: Vec<String>,
    live: u64,
    /// Version 2 on.
    #[serde(default)]
    dead_letter_scan: Option<DeadLetterScan>,
    /// See [`Checkpoint::incarnation`]; absent in older checkpoints.
    #[serde(default)]
    incarnation: String,
    /// Version 3 on: see [`Checkpoint::reference`].
    #[serde(default)]
    reference: Vec<(RefKey, RefValue)>,
}

/// What can go wrong reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store could not be read or written.
    #[error("checkpoint store {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A checkpoint file is damaged or from an incompatible version.
    #[error("checkpoint {path} is not readable: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The store holds checkpoints and none of them can be read: starting without them would
    /// silently read all input again from the beginning (or from the retention limit).
    #[error(
        "checkpoint directory {dir} holds checkpoints, but none can be read:{}\nThe engine does not start, so that it does not silently read all input again from the beginning. Put a readable checkpoint back (a backup, or the files from the binary that wrote them), or start with --discard-checkpoints to move these files aside and read all input again.",
        refused.iter().map(|(path, why)| format!("\n  {path}: {why}")).collect::<String>()
    )]
    Unreadable {
        /// The directory.
        dir: String,
        /// Every checkpoint file and why it was refused, newest first.
        refused: Vec<(String, String)>,
    },
    /// The checkpoint directory cannot be used by this binary (an `hdfs://` URL without the
    /// `hdfs` feature, a malformed URL, or a share that is not one).
    #[error("checkpoint directory {dir}: {message}")]
    Unsupported {
        /// The directory as given.
        dir: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// Another engine holds the store.
    #[error(
        "checkpoint directory {path} is in use by another engine ({holder}); stop it first, or use another --checkpoint-dir"
    )]
    Locked {
        /// The directory.
        path: String,
        /// Who holds it, as written in the lock file.
        holder: String,
    },
}

impl CheckpointError {
    /// True if retrying may help (I/O); corrupt data and a held lock need an operator.
    pub fn is_retriable(&self) -> bool {
        matches!(self, CheckpointError::Io { .. })
    }
}

/// Where checkpoints are kept.
pub trait CheckpointStore: Send + std::fmt::Debug {
    /// The newest readable checkpoint, if any. Unreadable newer ones are skipped with a
    /// warning naming each.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Unreadable`] if the store holds checkpoints and none can be read;
    /// [`CheckpointError::Io`] if the store cannot be listed.
    fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError>;

    /// Stores a checkpoint atomically: after a crash, either the whole checkpoint is there or
    /// none of it. Older checkpoints may be removed.
    ///
    /// # Errors
    ///
    /// [`CheckpointError`] if it could not be written; the previous checkpoint stays valid.
    fn save(&mut self, checkpoint: &Checkpoint) -> Result<(), CheckpointError>;

    /// Moves every checkpoint aside (nothing is deleted), for a start that gives them up
    /// explicitly (`--discard-checkpoints`). Returns `(from, to)` of each.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Io`] if they cannot be listed or moved.
    fn discard_all(&mut self) -> Result<Vec<(String, String)>, CheckpointError>;
}

/// Opens the checkpoint store at `dir` for this process's `share`: a local directory
/// ([`LocalDirStore`], locked for `share.process`), or `hdfs://HOST:PORT/PATH` (`hdfs::HdfsStore`,
/// cargo feature `hdfs`; it runs its HDFS calls on a small runtime of its own, so it may be
/// opened and used from any thread).
///
/// In a cluster every process saves its share of each checkpoint epoch (its workers' live
/// expenses, its partitions' positions, its counters) as
/// `checkpoint-<epoch:020>-share-<p>-of-<n>`; a single engine (`Share::SINGLE`) keeps the name
/// `checkpoint-<epoch:020>`. [`CheckpointStore::latest`] returns the newest epoch whose shares
/// are all present and readable, merged ([`Checkpoint::merge`]), whatever share this process
/// has, so a restart with another number of processes restores it too: every process gets the
/// WHOLE merged checkpoint. See [`shares`].
///
/// # Errors
///
/// [`CheckpointError::Locked`] if another engine holds this process index's lock on a local
/// directory; [`CheckpointError::Unsupported`] for an `hdfs://` directory in a binary without
/// the `hdfs` feature, a malformed URL, or a share outside its cluster;
/// [`CheckpointError::Io`] if the store cannot be created or reached.
pub fn open_store(
    dir: &std::path::Path,
    share: crate::cluster::Share,
) -> Result<Box<dyn CheckpointStore>, CheckpointError> {
    if share.processes == 0 || share.process >= share.processes {
        return Err(CheckpointError::Unsupported {
            dir: dir.display().to_string(),
            message: format!("process {share} is not a share of a cluster"),
        });
    }
    if let Some(url) = dir.to_str().filter(|d| d.starts_with(HDFS_SCHEME)) {
        #[cfg(feature = "hdfs")]
        return Ok(Box::new(hdfs::HdfsStore::open(url, share)?));
        #[cfg(not(feature = "hdfs"))]
        return Err(CheckpointError::Unsupported {
            dir: url.to_string(),
            message: "this spendflow was built without the `hdfs` cargo feature, which checkpoints on HDFS need (build with `--features hdfs`, part of the default `cli`), or use a local directory".into(),
        });
    }
    Ok(Box::new(LocalDirStore::open_share(dir, share)?))
}

/// A checkpoint directory starting so is on HDFS.
pub const HDFS_SCHEME: &str = "hdfs://";

/// File format magic: these six bytes and a two-digit version.
const MAGIC_PREFIX: &[u8; 6] = b"SPFCKP";

/// The version written: 2 added [`Checkpoint::dead_letter_scan`], 3 the reference rows
/// ([`Checkpoint::reference`]). Versions 1 and 2 are still read (version 1's restart reads the
/// whole dead-letter topic, as version 1 engines did; neither has reference rows, and their
/// engines had no reference source).
const VERSION: &[u8; 2] = b"03";

/// Versions this binary reads.
const READABLE_VERSIONS: [&[u8; 2]; 3] = [b"01", b"02", b"03"];

/// Bytes per live entry besides the id: user, category, merchant, amount, event time.
const ENTRY_FIXED: usize = 8 * 5;

impl Checkpoint {
    /// Writes the checkpoint: magic, header length and JSON header, the live entries, and a
    /// 64-bit FNV-1a checksum of everything before it.
    ///
    /// # Errors
    ///
    /// The writer's I/O errors.
    pub fn encode(&self, out: impl Write) -> io::Result<()> {
        let mut out = Checksummed::new(out);
        let header = Header {
            epoch: self.epoch,
            positions: self.positions.clone(),
            records_read: self.records_read,
            rejected: self.rejected.clone(),
            names: self.names.clone(),
            live: self.live.len() as u64,
            dead_letter_scan: self.dead_letter_scan.clone(),
            incarnation: self.incarnation.clone(),
            reference: self.reference.clone(),
        };
        let header = serde_json::to_vec(&header).map_err(io::Error::other)?;
        out.write_all(MAGIC_PREFIX)?;
        out.write_all(VERSION)?;
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut entry = Vec::with_capacity(64);
        for (id, fact) in &self.live {
            entry.clear();
            entry.extend_from_slice(&(id.len() as u32).to_le_bytes());
            entry.extend_from_slice(id.as_bytes());
            entry.extend_from_slice(&fact.user_id.to_le_bytes());
            entry.extend_from_slice(&fact.category.id().to_le_bytes());
            entry.extend_from_slice(&fact.merchant.id().to_le_bytes());
            entry.extend_from_slice(&fact.amount_minor.to_le_bytes());
            entry.extend_from_slice(&fact.event_ms.to_le_bytes());
            out.write_all(&entry)?;
        }
        let sum = out.sum;
        out.inner.write_all(&sum.to_le_bytes())?;
        out.inner.flush()
    }

    /// Reads a checkpoint written by [`Checkpoint::encode`], checking its checksum, and interns
    /// its names (so the facts' names have their texts in this process).
    ///
    /// # Errors
    ///
    /// A message saying what is wrong with the bytes.
    pub fn decode(input: impl Read) -> Result<Checkpoint, DecodeError> {
        let mut input = Checksummed::new(input);
        let mut magic = [0u8; 8];
        read_exact(&mut input, &mut magic, "magic")?;
        if &magic[..6] != MAGIC_PREFIX {
            return Err("not a spendflow checkpoint (wrong magic bytes)".into());
        }
        let version = &magic[6..];
        if !READABLE_VERSIONS.iter().any(|v| &v[..] == version) {
            return Err(format!(
                "checkpoint format version {} is unknown to this binary (it reads versions 01 to 03); it was written by another spendflow version",
                String::from_utf8_lossy(version)
            ).into());
        }
        let header_len = read_u64(&mut input, "header length")? as usize;
        if header_len > 1 << 30 {
            return Err(format!("header length {header_len} is implausible").into());
        }
        let mut header = vec![0u8; header_len];
        read_exact(&mut input, &mut header, "header")?;
        let header: Header = serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
        let mut live = Vec::with_capacity(header.live.min(1 << 24) as usize);
        let mut fixed = [0u8; ENTRY_FIXED];
        for i in 0..header.live {
            let len = read_u32(&mut input, "entry")? as usize;
            if len > 1 << 16 {
                return Err(format!("entry {i}: id length {len} is implausible").into());
            }
            let mut id = vec![0u8; len];
            read_exact(&mut input, &mut id, "entry id")?;
            let id = std::str::from_utf8(&id).map_err(|_| format!("entry {i}: id is not UTF-8"))?;
            // The file keeps ids length-prefixed (up to 2^16 bytes); an id the engine could never
            // have accepted (empty, or over `ExpenseId::MAX_LEN` bytes) means a damaged or foreign
            // file, refused here by name rather than losing or shortening that expense.
            let id = ExpenseId::new(id).map_err(|e| {
                format!(
                    "entry {i}: {e}; this checkpoint holds an expense id no engine accepts, so it is damaged or not a spendflow checkpoint"
                )
            })?;
            read_exact(&mut input, &mut fixed, "entry")?;
            let field =
                |k: usize| u64::from_le_bytes(fixed[k * 8..k * 8 + 8].try_into().expect("8 bytes"));
            live.push((
                id,
                Fact {
                    user_id: field(0),
                    category: Name::from_id(field(1)),
                    merchant: Name::from_id(field(2)),
                    amount_minor: field(3) as i64,
                    event_ms: field(4) as i64,
                },
            ));
        }
        let expected = input.sum;
        let mut sum = [0u8; 8];
        input
            .inner
            .read_exact(&mut sum)
            .map_err(|_| "truncated: no checksum".to_string())?;
        if u64::from_le_bytes(sum) != expected {
            return Err("checksum mismatch: the file is damaged".into());
        }
        for name in &header.names {
            Name::intern(name);
        }
        Ok(Checkpoint {
            epoch: header.epoch,
            positions: header.positions,
            records_read: header.records_read,
            rejected: header.rejected,
            names: header.names,
            live,
            dead_letter_scan: header.dead_letter_scan,
            incarnation: header.incarnation,
            reference: header.reference,
        })
    }
}

fn read_exact(input: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), DecodeError> {
    input
        .read_exact(buf)
        .map_err(|e| DecodeError(format!("truncated in the {what}: {e}")))
}

fn read_u64(input: &mut impl Read, what: &str) -> Result<u64, DecodeError> {
    let mut buf = [0u8; 8];
    read_exact(input, &mut buf, what)?;
    Ok(u64::from_le_bytes(buf))
}

fn read_u32(input: &mut impl Read, what: &str) -> Result<u32, DecodeError> {
    let mut buf = [0u8; 4];
    read_exact(input, &mut buf, what)?;
    Ok(u32::from_le_bytes(buf))
}

/// A reader or writer that keeps an FNV-1a hash of the bytes through it.
struct Checksummed<T> {
    inner: T,
    sum: u64,
}

impl<T> Checksummed<T> {
    fn new(inner: T) -> Self {
        Checksummed {
            inner,
            sum: 0xcbf2_9ce4_8422_2325,
        }
    }

    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.sum ^= u64::from(b);
            self.sum = self.sum.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.add(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Checksummed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.add(&buf[..n]);
        Ok(n)
    }
}

/// Why a checkpoint file could not be decoded (damaged, truncated, or not a checkpoint).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

impl From<String> for DecodeError {
    fn from(message: String) -> Self {
        DecodeError(message)
    }
}

impl From<&str> for DecodeError {
    fn from(message: &str) -> Self {
        DecodeError(message.to_string())
    }
}
