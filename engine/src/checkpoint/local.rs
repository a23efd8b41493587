//! Checkpoints as files in a local directory.
//!
//! ```text
//! <dir>/LOCK                               held (flock) by the engine using the directory
//! <dir>/checkpoint-00000000000000001234    one file per checkpoint, named by epoch
//! <dir>/.tmp-checkpoint-<random>           a checkpoint being written
//! ```
//!
//! A checkpoint is written to a temporary file, fsynced, renamed to its final name and the
//! directory fsynced: a crash at any point leaves either the complete new file or none, and the
//! previous checkpoint untouched. The two newest checkpoints are kept.
//!
//! Checkpoints hold people's spending: the directory is created owner-only (0700), every file
//! owner-only (0600), and nothing is written through a symbolic link someone planted in the
//! directory. The temporary file gets a random name and is created exclusively (`O_EXCL`,
//! the `tempfile` crate), the rename replaces whatever link sits at the final name (its target
//! is never touched), and the lock file is opened with `O_NOFOLLOW` (a link there is refused).
//! Leftover temporary files of a crashed engine are removed when the directory is opened.
//!
//! Fencing: the engine holds an exclusive lock on `LOCK` for as long as it runs. The kernel
//! releases it when the process dies (also on `kill -9`), so a restarted engine takes over at
//! once, while a second engine started against the same directory — a zombie and its
//! replacement — is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{Checkpoint, CheckpointError, CheckpointStore};

/// Checkpoints kept: the newest, and one before it.
const KEEP: usize = 2;

const PREFIX: &str = "checkpoint-";
/// Temporary files start so (then a random part).
const TMP_PREFIX: &str = ".tmp-checkpoint-";

/// A directory of checkpoint files, locked by this engine.
#[derive(Debug)]
pub struct LocalDirStore {
    dir: PathBuf,
    /// Held for the store's lifetime; the lock goes with the file handle.
    _lock: File,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl LocalDirStore {
    /// Opens (creating if needed) `dir` and locks it.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Locked`] if another engine holds it, [`CheckpointError::Io`] if it
    /// cannot be created or locked.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CheckpointError> {
        let dir = dir.into();
        create_private_dir(&dir)?;
        let lock_path = dir.join("LOCK");
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
        writeln!(lock, "pid {}", std::process::id()).map_err(io_error(&lock_path))?;
        let store = LocalDirStore { dir, _lock: lock };
        store.remove_leftovers();
        Ok(store)
    }

    /// Removes temporary files a crashed engine left (the lock is ours: nobody writes them).
    fn remove_leftovers(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TMP_PREFIX))
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

    /// Checkpoint files, newest first.
    fn files(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            let name = entry.file_name();
            let Some(epoch) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|e| e.parse::<u64>().ok())
            else {
                continue;
            };
            files.push((epoch, entry.path()));
        }
        files.sort_by_key(|f| std::cmp::Reverse(f.0));
        Ok(files)
    }
}

impl LocalDirStore {
    /// Moves every checkpoint file into `<dir>/discarded-<unix seconds>/` (nothing is
    /// deleted), for a start that gives them up explicitly (`--discard-checkpoints`). Returns
    /// where each went.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Io`] if they cannot be listed or moved.
    pub fn discard_all(&mut self) -> Result<Vec<(PathBuf, PathBuf)>, CheckpointError> {
        let files = self.files()?;
        if files.is_empty() {
            return Ok(Vec::new());
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = self.dir.join(format!("discarded-{secs}"));
        create_private_dir(&aside)?;
        let mut moved = Vec::new();
        for (_, path) in files {
            let to = aside.join(path.file_name().expect("a file name"));
            fs::rename(&path, &to).map_err(io_error(&path))?;
            moved.push((path, to));
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))?;
        Ok(moved)
    }
}

impl CheckpointStore for LocalDirStore {
    fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        let mut refused = Vec::new();
        for (_, path) in self.files()? {
            let decoded = File::open(&path)
                .map_err(|e| super::DecodeError(format!("cannot be opened: {e}")))
                .and_then(|file| Checkpoint::decode(BufReader::with_capacity(1 << 20, file)));
            match decoded {
                Ok(checkpoint) => {
                    for (newer, why) in &refused {
                        tracing::warn!(
                            path = %newer,
                            reason = %why,
                            used = %path.display(),
                            epoch = checkpoint.epoch,
                            "A newer checkpoint cannot be read; restoring an older one (more input is read again)."
                        );
                    }
                    return Ok(Some(checkpoint));
                }
                Err(message) => refused.push((path.display().to_string(), message.0)),
            }
        }
        if refused.is_empty() {
            Ok(None)
        } else {
            Err(CheckpointError::Unreadable {
                dir: self.dir.display().to_string(),
                refused,
            })
        }
    }

    fn discard_all(&mut self) -> Result<Vec<(String, String)>, CheckpointError> {
        Ok(LocalDirStore::discard_all(self)?
            .into_iter()
            .map(|(from, to)| (from.display().to_string(), to.display().to_string()))
            .collect())
    }

    fn save(&mut self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let name = format!("{PREFIX}{:020}", checkpoint.epoch);
        let path = self.dir.join(&name);
        // Whatever fails, the temporary file is removed when it drops (a full disk stays full
        // of half-written checkpoints otherwise).
        let tmp = write_file(&self.dir, checkpoint)?;
        // A rename replaces a link at `path` itself, never its target.
        tmp.persist(&path).map_err(|e| io_error(&path)(e.error))?;
        crate::metrics::checkpoint_file(&path);
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))?;
        for (_, old) in self.files()?.into_iter().skip(KEEP) {
            if let Err(e) = fs::remove_file(&old) {
                tracing::warn!(path = %old.display(), error = %e, "Could not remove an old checkpoint.");
            }
        }
        Ok(())
    }
}

/// Writes `checkpoint` to a new owner-only temporary file in `dir` and syncs it.
fn write_file(
    dir: &Path,
    checkpoint: &Checkpoint,
) -> Result<tempfile::NamedTempFile, CheckpointError> {
    let tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
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
