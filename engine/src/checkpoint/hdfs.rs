//! Checkpoints on HDFS (`--checkpoint-dir hdfs://HOST:PORT/PATH`, cargo feature `hdfs`), so
//! the processes of a cluster on several hosts write their shares to, and restore from, one
//! place. hdfs-native is the client (pure Rust, no JVM).
//!
//! ```text
//! /PATH/checkpoint-<epoch:020>[-share-<p>-of-<n>]   as in a local directory (see `shares`)
//! /PATH/.tmp-checkpoint-<random>                    process 0's (or a single engine's) file
//! /PATH/.tmp-p<p>-checkpoint-<random>               being written; process p's
//! /PATH/discarded-<unix secs>/                      moved aside by --discard-checkpoints
//! ```
//!
//! A checkpoint is written to a temporary file (created without overwrite, owner-only), closed
//! (the NameNode then knows every block), and renamed over its final name: a crash leaves at
//! most a temporary file, never a partial file under a final name. Temporary files of this
//! process index that a crashed engine left are removed when the store is opened.
//!
//! Fencing: HDFS has no `flock`, and this store takes no lease of its own. What keeps two
//! writers of one share apart is the cluster itself: every process of a cluster has its own
//! `--process` index and writes only that share, and a timely cluster cannot run with two
//! processes of one index. An operator who starts a second cluster (or a second single engine)
//! on the same HDFS directory is not refused; do not.
//!
//! hdfs-native is asynchronous. The store owns a small runtime (one worker thread) on which
//! every HDFS call runs; callers block on a channel until it is done, so the store works from a
//! plain thread (the checkpointer) and from the main thread (recovery) alike, and never calls
//! `block_on` inside another runtime. Every call is bounded by [`CALL_TIMEOUT`], and an
//! unreachable NameNode is given up after a few tries (`dfs.client.failover.max.attempts` is
//! set to 4, over any Hadoop configuration files).

use std::future::Future;
use std::io::{self, Read, Write};
use std::time::Duration;

use bytes::Bytes;
use hdfs_native::file::{FileReader, FileWriter};
use hdfs_native::{Client, ClientBuilder, HdfsError, WriteOptions};

use super::shares::{self, Files};
use super::{Checkpoint, CheckpointError, CheckpointStore, DecodeError};
use crate::cluster::Share;

/// The longest one HDFS call (one chunk written or read, a rename, a listing) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How often a call to an unreachable NameNode is tried again (with a growing pause, 0.5 s
/// to 8 s) before it fails: hdfs-native's default (15, pauses up to 15 s) keeps a start or a
/// checkpoint waiting for minutes; a checkpoint that fails is tried again at the next one, and a
/// start that fails is restarted by its supervisor.
const FAILOVER_ATTEMPTS: u32 = 4;

/// Bytes written or read per HDFS call.
const CHUNK: usize = 8 << 20;

/// Checkpoint files in one HDFS directory.
#[derive(Debug)]
pub struct HdfsStore {
    /// `hdfs://HOST:PORT`.
    url: String,
    /// The directory, absolute, without a trailing `/`.
    root: String,
    share: Share,
    tmp_prefix: String,
    client: Client,
    /// `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

/// Splits `hdfs://HOST:PORT/PATH` into `hdfs://HOST:PORT` and `/PATH`.
fn split_url(dir: &str) -> Result<(String, String), String> {
    let rest = dir
        .strip_prefix(super::HDFS_SCHEME)
        .ok_or("an HDFS checkpoint directory starts with hdfs://")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() {
        return Err("the URL names no NameNode (hdfs://HOST:PORT/PATH)".into());
    }
    let path = format!("/{}", path.trim_end_matches('/'));
    if path == "/" {
        return Err("the URL names no directory (hdfs://HOST:PORT/PATH)".into());
    }
    if path.split('/').any(|part| part == "." || part == "..") {
        return Err("the directory must not contain `.` or `..`".into());
    }
    Ok((format!("{}{authority}", super::HDFS_SCHEME), path))
}

impl HdfsStore {
    /// Opens (creating if needed) the HDFS directory of `dir` (`hdfs://HOST:PORT/PATH`) for
    /// `share`, and removes that process index's leftover temporary files.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Unsupported`] for a malformed URL; [`CheckpointError::Io`] if HDFS
    /// cannot be reached or the directory cannot be created.
    pub fn open(dir: &str, share: Share) -> Result<HdfsStore, CheckpointError> {
        let unsupported = |message: String| CheckpointError::Unsupported {
            dir: dir.to_string(),
            message,
        };
        let (url, root) = split_url(dir).map_err(unsupported)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("spendflow-checkpoint-hdfs")
            .enable_all()
            .build()
            .map_err(|source| CheckpointError::Io {
                path: dir.to_string(),
                source,
            })?;
        let client = ClientBuilder::new()
            .with_url(url.clone())
            .with_config([(
                "dfs.client.failover.max.attempts",
                FAILOVER_ATTEMPTS.to_string(),
            )])
            .with_io_runtime(runtime.handle().clone())
            .build()
            .map_err(|e| unsupported(format!("HDFS client: {e}")))?;
        let process = share.process;
        let store = HdfsStore {
            url,
            root,
            share,
            tmp_prefix: if process == 0 {
                ".tmp-checkpoint-".to_string()
            } else {
                format!(".tmp-p{process}-checkpoint-")
            },
            client,
            runtime: Some(runtime),
        };
        let (client, root) = (store.client.clone(), store.root.clone());
        store
            .call(async move { client.mkdirs(&root, 0o700, true).await })
            .map_err(store.error(&store.root))?;
        store.remove_leftovers();
        tracing::info!(dir = %store.location(), share = %share, "Checkpoints on HDFS.");
        Ok(store)
    }

    /// The share this store writes.
    pub fn share(&self) -> Share {
        self.share
    }

    /// The hdfs-native client (tests look at paths directly).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The absolute HDFS path of the store's directory.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.root)
    }

    fn error<'a>(&'a self, path: &'a str) -> impl FnOnce(HdfsError) -> CheckpointError + 'a {
        move |e| CheckpointError::Io {
            path: format!("{}{path}", self.url),
            source: match e {
                HdfsError::IOError(e) => e,
                e => io::Error::other(e.to_string()),
            },
        }
    }

    /// Runs `future` on the store's runtime and waits for it, at most [`CALL_TIMEOUT`].
    fn run<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, HdfsError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the store")
            .spawn(async move {
                let _ = tx.send(tokio::time::timeout(CALL_TIMEOUT, future).await);
            });
        match rx.recv() {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(HdfsError::IOError(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("HDFS did not answer within {} s", CALL_TIMEOUT.as_secs()),
            ))),
            Err(_) => Err(HdfsError::InternalError("the HDFS call was dropped".into())),
        }
    }

    /// [`HdfsStore::run`] for a call that returns an HDFS result.
    fn call<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T, HdfsError>> + Send + 'static,
    ) -> Result<T, HdfsError> {
        self.run(future)?
    }

    fn delete(&self, path: &str) -> Result<(), HdfsError> {
        let (client, path) = (self.client.clone(), path.to_string());
        match self.call(async move { client.delete(&path, false).await }) {
            Ok(_) | Err(HdfsError::FileNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn remove_leftovers(&self) {
        let Ok(names) = self.list() else {
            return;
        };
        for name in names
            .iter()
            .filter(|name| name.starts_with(&self.tmp_prefix))
        {
            let path = self.path(name);
            match self.delete(&path) {
                Ok(()) => {
                    tracing::info!(path = %self.path_of(name), "Removed a partly written checkpoint.")
                }
                Err(e) => {
                    tracing::warn!(path = %self.path_of(name), error = %e, "Could not remove a partly written checkpoint.")
                }
            }
        }
    }

    fn write_to(&self, tmp: &str, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let (client, path) = (self.client.clone(), tmp.to_string());
        let writer = self
            .call(async move {
                client
                    .create(
                        &path,
                        WriteOptions::default().overwrite(false).permission(0o600),
                    )
                    .await
            })
            .map_err(self.error(tmp))?;
        let mut out = HdfsWriter {
            store: self,
            writer: Some(writer),
            buf: Vec::with_capacity(CHUNK),
        };
        checkpoint
            .encode(&mut out)
            .map_err(|source| CheckpointError::Io {
                path: format!("{}{tmp}", self.url),
                source,
            })?;
        let mut writer = out.writer.take().ok_or_else(|| CheckpointError::Io {
            path: format!("{}{tmp}", self.url),
            source: io::Error::other("the HDFS writer failed earlier"),
        })?;
        self.call(async move { writer.close().await })
            .map_err(self.error(tmp))
    }
}

impl Drop for HdfsStore {
    fn drop(&mut self) {
        // Never blocks, so the store may be dropped anywhere (also inside another runtime).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Writes into an HDFS file in chunks of [`CHUNK`] bytes (the encoder writes small pieces).
struct HdfsWriter<'a> {
    store: &'a HdfsStore,
    /// `None` after a failed write.
    writer: Option<FileWriter>,
    buf: Vec<u8>,
}

impl HdfsWriter<'_> {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut writer = self
            .writer
            .take()
            .ok_or_else(|| io::Error::other("the HDFS writer failed earlier"))?;
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        let written = self
            .store
            .run(async move {
                let written = writer.write_bytes(chunk).await;
                (writer, written)
            })
            .map_err(|e| io::Error::other(e.to_string()))?;
        match written {
            (writer, Ok(_)) => {
                self.writer = Some(writer);
                Ok(())
            }
            (_, Err(e)) => Err(io::Error::other(e.to_string())),
        }
    }
}

impl Write for HdfsWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Reads an HDFS file in chunks of [`CHUNK`] bytes.
struct HdfsReader<'a> {
    store: &'a HdfsStore,
    /// `None` after a failed read.
    reader: Option<FileReader>,
    chunk: Bytes,
}

impl Read for HdfsReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.chunk.is_empty() {
            let mut reader = self
                .reader
                .take()
                .ok_or_else(|| io::Error::other("the HDFS reader failed earlier"))?;
            let want = reader.remaining().min(CHUNK);
            if want == 0 {
                self.reader = Some(reader);
                return Ok(0);
            }
            let (reader, chunk) = self
                .store
                .run(async move {
                    let chunk = reader.read_bytes(want).await;
                    (reader, chunk)
                })
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.chunk = chunk.map_err(|e| io::Error::other(e.to_string()))?;
            self.reader = Some(reader);
            if self.chunk.is_empty() {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

impl Files for HdfsStore {
    fn location(&self) -> String {
        format!("{}{}", self.url, self.root)
    }

    fn path_of(&self, name: &str) -> String {
        format!("{}{}/{name}", self.url, self.root)
    }

    fn list(&self) -> Result<Vec<String>, CheckpointError> {
        let (client, root) = (self.client.clone(), self.root.clone());
        let listed = match self.call(async move { client.list_status(&root, false).await }) {
            Ok(listed) => listed,
            Err(HdfsError::FileNotFound(_)) => Vec::new(),
            Err(e) => return Err(self.error(&self.root)(e)),
        };
        Ok(listed
            .into_iter()
            .filter_map(|status| status.path.rsplit('/').next().map(str::to_string))
            .filter(|name| !name.is_empty())
            .collect())
    }

    fn read(&self, name: &str) -> Result<Checkpoint, DecodeError> {
        let (client, path) = (self.client.clone(), self.path(name));
        let reader = self
            .call(async move { client.read(&path).await })
            .map_err(|e| DecodeError(format!("cannot be opened: {e}")))?;
        Checkpoint::decode(HdfsReader {
            store: self,
            reader: Some(reader),
            chunk: Bytes::new(),
        })
    }

    fn write(&mut self, name: &str, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let tmp = self.path(&format!(
            "{}{:016x}",
            self.tmp_prefix,
            rand::random::<u64>()
        ));
        let target = self.path(name);
        let written = self.write_to(&tmp, checkpoint).and_then(|()| {
            let (client, from, to) = (self.client.clone(), tmp.clone(), target.clone());
            self.call(async move { client.rename(&from, &to, true).await })
                .map_err(self.error(&target))
        });
        if written.is_err()
            && let Err(e) = self.delete(&tmp)
        {
            tracing::warn!(path = %tmp, error = %e, "Could not remove a partly written checkpoint; the next start of this process removes it.");
        }
        written
    }

    fn remove(&self, name: &str) -> Result<(), CheckpointError> {
        let path = self.path(name);
        self.delete(&path).map_err(self.error(&path))
    }

    fn move_aside(&mut self, names: &[String]) -> Result<Vec<(String, String)>, CheckpointError> {
        let aside = self.path(&format!("discarded-{}", shares::unix_secs()));
        let (client, dir) = (self.client.clone(), aside.clone());
        self.call(async move { client.mkdirs(&dir, 0o700, true).await })
            .map_err(self.error(&aside))?;
        let mut moved = Vec::new();
        for name in names {
            let (from, to) = (self.path(name), format!("{aside}/{name}"));
            let (client, src, dst) = (self.client.clone(), from.clone(), to.clone());
            match self.call(async move { client.rename(&src, &dst, false).await }) {
                Ok(()) => moved.push((format!("{}{from}", self.url), format!("{}{to}", self.url))),
                // Another process of the cluster moved it first.
                Err(HdfsError::FileNotFound(_)) => {}
                Err(e) => return Err(self.error(&from)(e)),
            }
        }
        Ok(moved)
    }
}

impl CheckpointStore for HdfsStore {
    fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        shares::latest(self)
    }

    fn save(&mut self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let share = self.share;
        shares::save(self, share, checkpoint)
    }

    fn discard_all(&mut self) -> Result<Vec<(String, String)>, CheckpointError> {
        shares::discard_all(self)
    }
}

#[cfg(test)]
mod tests {
    use super::split_url;

    #[test]
    fn urls_split_into_namenode_and_directory() {
        assert_eq!(
            split_url("hdfs://nn:9000/spendflow/ckpt/").unwrap(),
            ("hdfs://nn:9000".to_string(), "/spendflow/ckpt".to_string())
        );
        for bad in [
            "hdfs://nn:9000",
            "hdfs://nn:9000/",
            "hdfs:///x",
            "hdfs://nn/a/../b",
        ] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }
}
