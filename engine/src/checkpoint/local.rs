//! Checkpoints as files in a local directory.
//!
//! ```text
//! <dir>/LOCK                               held (flock) by a single engine, or process 0 of a cluster
//! <dir>/LOCK-<p>                           held by process p (p >= 1) of a cluster
//! <dir>/checkpoint-00000000000000001234    a single engine's checkpoint, named by epoch
//! <dir>/checkpoint-00000000000000001234-share-<p>-of-<n>
//!                                          process p's share of a cluster of n (see `shares`)
//! <dir>/.tmp-checkpoint-<random>           a checkpoint being written (process 0 / single)
//! <dir>/.tmp-p<p>-checkpoint-<random>      a share being written by process p >= 1
//! <dir>/discarded-<unix secs>/             checkpoints moved aside by --discard-checkpoints
//! ```
//!
//! A checkpoint is written to a temporary file, fsynced, renamed to its final name and the
//! directory fsynced: a crash at any point leaves either the complete new file or none, and the
//! previous checkpoint untouched. The two newest complete checkpoint epochs are kept (see
//! [`super::shares`] for shares, completeness and retention).
//!
//! Checkpoints hold people's spending: the directory is created owner-only (0700), every file
//! owner-only (0600), and nothing is written through a symbolic link someone planted in the
//! directory. The temporary file gets a random name and is created exclusively (`O_EXCL`,
//! the `tempfile` crate), the rename replaces whatever link sits at the final name (its target
//! is never touched), and the lock file is opened with `O_NOFOLLOW` (a link there is refused).
//! Leftover temporary files of a crashed engine (of this process index only: the other
//! processes of a cluster share the directory) are removed when the directory is opened.
//!
//! Fencing: the engine holds an exclusive lock on its process index's lock file for as long as
//! it runs. The kernel releases it when the process dies (also on `kill -9`), so a restarted
//! engine takes over at once, while a second engine started against the same directory with the
//! same process index — a zombie and its replacement — is refused. The processes of one
//! cluster (different indices) share the directory; so the lock fences engines on one host
//! only: processes on several hosts need a directory all of them reach, such as HDFS.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::shares::{self, Files};
use super::{Checkpoint, CheckpointError, CheckpointStore, DecodeError};
use crate::cluster::Share;

/// A directory of checkpoint files, locked by this engine (for its process index).
#[derive(Debug)]
pub struct LocalDirStore {
    dir: PathBuf,
    share: Share,
    /// Temporary files of this process index start so (then a random part).
    tmp_prefix: String,
    /// Held for the store's lifetime; the lock goes with the file handle.
    _lock: File,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The lock file of a process index: `LOCK` for process 0 (and a single engine), `LOCK-<p>`
/// for the others.
pub fn lock_file_name(process: usize) -> String {
    if process == 0 {
        "LOCK".to_string()
    } else {
        format!("LOCK-{process}")
    }
}

/// The prefix of the temporary files of a process index.
fn tmp_prefix(process: usize) -> String {
    if process == 0 {
        ".tmp-checkpoint-".to_string()
    } else {
        format!(".tmp-p{process}-checkpoint-")
    }
}

impl LocalDirStore {
    /// Opens (creating if needed) `dir` for a single engine and locks it.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Locked`] if another engine holds it, [`CheckpointError::Io`] if it
    /// cannot be created or locked.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CheckpointError> {
        Self::open_share(dir, Share::SINGLE)
    }

    /// Opens (creating if needed) `dir` for process `share.process` of a cluster of
    /// `share.processes` and takes that process index's lock.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Locked`] if another engine holds this process index's lock,
    /// [`CheckpointError::Io`] if it cannot be created or locked.
    pub fn open_share(dir: impl Into<PathBuf>, share: Share) -> Result<Self, CheckpointError> {
        let dir = dir.into();
        create_private_dir(&dir)?;
        let lock_path = dir.join(lock_file_name(share.process));
        let mut lock = open_lock(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&lock_path).unwrap_or_default();
                return Err(CheckpointError::Locked {
                    path: dir.display().to_string(),
                    holder: holder.trim().to_string(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error(&lock_path)(e)),
        }
        lock.set_len(0).map_err(io_error(&lock_path))?;
        writeln!(lock, "pid {} process {share}", std::process::id())
            .map_err(io_error(&lock_path))?;
        let store = LocalDirStore {
            dir,
            share,
            tmp_prefix: tmp_prefix(share.process),
            _lock: lock,
        };
        store.remove_leftovers();
        Ok(store)
    }

    /// Removes temporary files a crashed engine of this process index left (the lock is ours:
    /// nobody else writes them).
    fn remove_leftovers(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&self.tmp_prefix))
            {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "Removed a partly written checkpoint.")
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "Could not remove a partly written checkpoint.")
                    }
                }
            }
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The share this store writes.
    pub fn share(&self) -> Share {
        self.share
    }

    /// Moves every checkpoint file (of every share) into `<dir>/discarded-<unix seconds>/`
    /// (nothing is deleted), for a start that gives them up explicitly
    /// (`--discard-checkpoints`). Returns where each went.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Io`] if they cannot be listed or moved.
    pub fn discard_all(&mut self) -> Result<Vec<(PathBuf, PathBuf)>, CheckpointError> {
        Ok(shares::discard_all(self)?
            .into_iter()
            .map(|(from, to)| (PathBuf::from(from), PathBuf::from(to)))
            .collect())
    }

    fn sync_dir(&self) -> Result<(), CheckpointError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))
    }
}

impl Files for LocalDirStore {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn path_of(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn list(&self) -> Result<Vec<String>, CheckpointError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn read(&self, name: &str) -> Result<Checkpoint, DecodeError> {
        let file = File::open(self.dir.join(name))
            .map_err(|e| DecodeError(format!("cannot be opened: {e}")))?;
        Checkpoint::decode(BufReader::with_capacity(1 << 20, file))
    }

    fn write(&mut self, name: &str, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let path = self.dir.join(name);
        // Whatever fails, the temporary file is removed when it drops (a full disk stays full
        // of half-written checkpoints otherwise).
        let tmp = write_file(&self.dir, &self.tmp_prefix, checkpoint)?;
        // A rename replaces a link at `path` itself, never its target.
        tmp.persist(&path).map_err(|e| io_error(&path)(e.error))?;
        crate::metrics::checkpoint_file(&path);
        self.sync_dir()
    }

    fn remove(&self, name: &str) -> Result<(), CheckpointError> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    fn move_aside(&mut self, names: &[String]) -> Result<Vec<(String, String)>, CheckpointError> {
        let aside = self.dir.join(format!("discarded-{}", shares::unix_secs()));
        create_private_dir(&aside)?;
        let mut moved = Vec::new();
        for name in names {
            let (from, to) = (self.dir.join(name), aside.join(name));
            match fs::rename(&from, &to) {
                Ok(()) => moved.push((from.display().to_string(), to.display().to_string())),
                // Another process of the cluster moved it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&from)(e)),
            }
        }
        self.sync_dir()?;
        Ok(moved)
    }
}

impl CheckpointStore for LocalDirStore {
    fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        shares::latest(self)
    }

    fn discard_all(&mut self) -> Result<Vec<(String, String)>, CheckpointError> {
        shares::discard_all(self)
    }

    fn save(&mut self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let share = self.share;
        shares::save(self, share, checkpoint)
    }
}

/// Writes `checkpoint` to a new owner-only temporary file in `dir` and syncs it.
fn write_file(
    dir: &Path,
    prefix: &str,
    checkpoint: &Checkpoint,
) -> Result<tempfile::NamedTempFile, CheckpointError> {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        // Created exclusively under a random name, 0600 on Unix.
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    let path = tmp.path().to_path_buf();
    let mut out = BufWriter::with_capacity(1 << 20, tmp);
    checkpoint.encode(&mut out).map_err(io_error(&path))?;
    let tmp = out
        .into_inner()
        .map_err(|e| io_error(&path)(e.into_error()))?;
    tmp.as_file().sync_all().map_err(io_error(&path))?;
    Ok(tmp)
}

/// Creates `dir` (and missing parents) owner-only; warns if it exists and others may enter it.
fn create_private_dir(dir: &Path) -> Result<(), CheckpointError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let existed = dir.exists();
        builder.mode(0o700);
        builder.create(dir).map_err(io_error(dir))?;
        let mode = fs::metadata(dir)
            .map_err(io_error(dir))?
            .permissions()
            .mode();
        if existed && mode & 0o077 != 0 {
            tracing::warn!(
                path = %dir.display(),
                mode = format!("{:o}", mode & 0o777),
                "The checkpoint directory is open to other users; checkpoints hold everyone's expenses (chmod 700 it)."
            );
        }
        Ok(())
    }
    #[cfg(not(unix))]
    builder.create(dir).map_err(io_error(dir))
}

/// Opens (creating owner-only if missing) the lock file, never through a symbolic link.
fn open_lock(path: &Path) -> Result<File, CheckpointError> {
    let mut options = OpenOptions::new();
    options.create(true).truncate(false).read(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    options.open(path).map_err(|e| {
        let link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        if link {
            io_error(path)(std::io::Error::new(
                e.kind(),
                "the lock file is a symbolic link; refusing to follow it (remove the link)",
            ))
        } else {
            io_error(path)(e)
        }
    })
}
