//! Checkpoint shares: what every store does alike, over the files it keeps.
//!
//! A store is a flat directory of files (a local directory, or one on HDFS). Each checkpoint
//! epoch is one file per process share:
//!
//! ```text
//! checkpoint-<epoch:020>                      a single engine (share 0 of 1), as always
//! checkpoint-<epoch:020>-share-<p>-of-<n>     process p's share of a cluster of n (n >= 2)
//! ```
//!
//! An epoch of `n` shares is *complete* when the files of all `n` shares are there.
//! `latest` restores the newest complete epoch whose shares all read, merged into one
//! [`Checkpoint`] ([`Checkpoint::merge`]), whatever this process's share is: a cluster of 3
//! restarted as 2 restores the 3 shares. An incomplete epoch (a process died before writing
//! its share) is never used: it is a checkpoint the cluster never finished, like a single
//! engine's temporary file, so it is skipped, with a warning, for an older complete one, or for
//! none (reading all input again is then exact: no complete checkpoint means no finished one).
//! Only files that cannot be read make a start refuse (`Unreadable`).
//!
//! Retention (`save`): after writing its share, a process deletes the files (of any share or
//! layout) of the epochs older than the second-newest complete epoch. Nothing another process
//! may still need goes: the two newest complete epochs stay whole, and shares of newer epochs
//! that others have not completed yet stay too. Two processes deleting the same file at once
//! is harmless (a file already gone is fine).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use spendflow_operators::Epoch;

use super::{Checkpoint, CheckpointError, DeadLetterScan, DecodeError, SavedPosition};
use crate::cluster::Share;

/// Complete epochs kept: the newest, and one before it.
pub(crate) const KEEP: usize = 2;

/// Every checkpoint file name starts so.
pub(crate) const PREFIX: &str = "checkpoint-";

/// What a store keeps its checkpoint files in (a flat directory).
pub(crate) trait Files {
    /// Where the store is, for messages (a directory, or an `hdfs://` URL).
    fn location(&self) -> String;

    /// The full path of the file `name`, for messages.
    fn path_of(&self, name: &str) -> String;

    /// The names of everything directly in the store (files and directories).
    fn list(&self) -> Result<Vec<String>, CheckpointError>;

    /// Reads and decodes the file `name`.
    fn read(&self, name: &str) -> Result<Checkpoint, DecodeError>;

    /// Writes `checkpoint` under `name` atomically (a temporary name, then a rename): after a
    /// crash, either the whole file is there or none of it.
    fn write(&mut self, name: &str, checkpoint: &Checkpoint) -> Result<(), CheckpointError>;

    /// Removes the file `name`; one already gone is fine.
    fn remove(&self, name: &str) -> Result<(), CheckpointError>;

    /// Moves the files `names` into a new `discarded-<unix seconds>/` directory beside them
    /// (nothing is deleted) and returns `(from, to)` of each moved; files already gone (another
    /// process moved them) are skipped.
    fn move_aside(&mut self, names: &[String]) -> Result<Vec<(String, String)>, CheckpointError>;
}

/// The file name of `share`'s part of epoch `epoch`.
pub fn file_name(epoch: Epoch, share: Share) -> String {
    if share.is_single() {
        format!("{PREFIX}{epoch:020}")
    } else {
        format!(
            "{PREFIX}{epoch:020}-share-{}-of-{}",
            share.process, share.processes
        )
    }
}

/// The epoch and share of a checkpoint file name; `None` for any other name.
pub fn parse_file_name(name: &str) -> Option<(Epoch, Share)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (epoch, share) = match rest.split_once("-share-") {
        None => (rest, Share::SINGLE),
        Some((epoch, share)) => {
            let (process, processes) = share.split_once("-of-")?;
            let share = Share {
                process: digits(process)?,
                processes: digits(processes)?,
            };
            if share.processes < 2 || share.process >= share.processes {
                return None;
            }
            (epoch, share)
        }
    };
    Some((digits(epoch)?, share))
}

fn digits<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The checkpoint files of a store: `(epoch, processes)` -> process -> file name, newest first
/// when iterated in reverse.
type Epochs = BTreeMap<(Epoch, usize), BTreeMap<usize, String>>;

fn epochs(files: &dyn Files) -> Result<Epochs, CheckpointError> {
    let mut epochs = Epochs::new();
    for name in files.list()? {
        if let Some((epoch, share)) = parse_file_name(&name) {
            epochs
                .entry((epoch, share.processes))
                .or_default()
                .insert(share.process, name);
        }
    }
    Ok(epochs)
}

/// The shares of `processes` missing from `present`.
fn missing(processes: usize, present: &BTreeMap<usize, String>) -> Vec<usize> {
    (0..processes)
        .filter(|p| !present.contains_key(p))
        .collect()
}

/// The newest complete epoch whose shares all read, merged; see the module docs.
pub(crate) fn latest(files: &dyn Files) -> Result<Option<Checkpoint>, CheckpointError> {
    let epochs = epochs(files)?;
    let mut refused: Vec<(String, String)> = Vec::new();
    let mut unfinished: Vec<(String, String)> = Vec::new();
    for (&(epoch, processes), present) in epochs.iter().rev() {
        let lacking = missing(processes, present);
        if !lacking.is_empty() {
            let lacking = lacking
                .iter()
                .map(|p| {
                    file_name(
                        epoch,
                        Share {
                            process: *p,
                            processes,
                        },
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            for name in present.values() {
                unfinished.push((
                    files.path_of(name),
                    format!(
                        "epoch {epoch} is incomplete (a process did not write its share): {lacking} missing"
                    ),
                ));
            }
            continue;
        }
        match read_epoch(files, epoch, present) {
            Ok(checkpoint) => {
                for (newer, why) in refused.iter().chain(&unfinished) {
                    tracing::warn!(
                        path = %newer,
                        reason = %why,
                        used = %files.path_of(&present[&0]),
                        epoch = checkpoint.epoch,
                        shares = processes,
                        "A newer checkpoint cannot be used; restoring an older one (more input is read again)."
                    );
                }
                return Ok(Some(checkpoint));
            }
            Err((name, why)) => refused.push((name, why)),
        }
    }
    if refused.is_empty() {
        for (path, why) in &unfinished {
            tracing::warn!(
                %path,
                reason = %why,
                "The cluster never finished a checkpoint: starting without one (all input is read again)."
            );
        }
        Ok(None)
    } else {
        Err(CheckpointError::Unreadable {
            dir: files.location(),
            refused,
        })
    }
}

/// Reads every share of one complete epoch and merges them; `Err((file, why))` names what
/// makes the epoch unusable.
fn read_epoch(
    files: &dyn Files,
    epoch: Epoch,
    present: &BTreeMap<usize, String>,
) -> Result<Checkpoint, (String, String)> {
    let mut shares = Vec::with_capacity(present.len());
    for name in present.values() {
        let share = files.read(name).map_err(|e| (files.path_of(name), e.0))?;
        if share.epoch != epoch {
            return Err((
                files.path_of(name),
                format!(
                    "it holds epoch {} but is named for epoch {epoch}",
                    share.epoch
                ),
            ));
        }
        shares.push(share);
    }
    Checkpoint::merge(shares).map_err(|why| (files.path_of(&present[&0]), why))
}

/// Writes `share`'s part of `checkpoint` and applies the retention (module docs).
pub(crate) fn save(
    files: &mut dyn Files,
    share: Share,
    checkpoint: &Checkpoint,
) -> Result<(), CheckpointError> {
    files.write(&file_name(checkpoint.epoch, share), checkpoint)?;
    let epochs = match epochs(files) {
        Ok(epochs) => epochs,
        Err(e) => {
            tracing::warn!(error = %e, "Checkpoint written, but the store cannot be listed to remove old ones.");
            return Ok(());
        }
    };
    let complete: BTreeSet<Epoch> = epochs
        .iter()
        .filter(|((_, processes), present)| missing(*processes, present).is_empty())
        .map(|((epoch, _), _)| *epoch)
        .collect();
    let Some(&oldest_kept) = complete.iter().rev().nth(KEEP - 1) else {
        return Ok(());
    };
    for name in epochs
        .range(..(oldest_kept, 0))
        .flat_map(|(_, present)| present.values())
    {
        if let Err(e) = files.remove(name) {
            tracing::warn!(path = %files.path_of(name), error = %e, "Could not remove an old checkpoint.");
        }
    }
    Ok(())
}

/// Moves every checkpoint file (of every share and layout) aside; see
/// [`super::CheckpointStore::discard_all`].
pub(crate) fn discard_all(files: &mut dyn Files) -> Result<Vec<(String, String)>, CheckpointError> {
    let names: Vec<String> = epochs(files)?
        .into_values()
        .flat_map(BTreeMap::into_values)
        .collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    files.move_aside(&names)
}

/// Seconds since 1970, for the names of directories of discarded checkpoints.
pub(crate) fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Checkpoint {
    /// One checkpoint from the shares of one epoch written by the processes of a cluster:
    /// their live expenses, positions and reference rows concatenated, their names united,
    /// their counters summed; the dead-letter scan starts at the smallest offset of any share
    /// in each partition (a partition some share does not list, or a share without a scan, means
    /// reading from the start). One share is returned as it is.
    ///
    /// # Errors
    ///
    /// Why the shares are not one checkpoint: no share, different epochs, or different
    /// incarnations (timelines).
    pub fn merge(mut shares: Vec<Checkpoint>) -> Result<Checkpoint, String> {
        if shares.len() <= 1 {
            return shares.pop().ok_or_else(|| "no share to merge".to_string());
        }
        let (epoch, incarnation) = (shares[0].epoch, shares[0].incarnation.clone());
        for share in &shares[1..] {
            if share.epoch != epoch {
                return Err(format!(
                    "its shares hold different epochs ({epoch} and {})",
                    share.epoch
                ));
            }
            if share.incarnation != incarnation {
                return Err(format!(
                    "its shares belong to different incarnations ({incarnation:?} and {:?}), so they are not one checkpoint",
                    share.incarnation
                ));
            }
        }
        let dead_letter_scan = merge_scans(&shares);
        let mut merged = Checkpoint {
            epoch,
            incarnation,
            dead_letter_scan,
            ..Checkpoint::default()
        };
        let mut names = HashSet::new();
        let mut rejected: Vec<(String, u64)> = Vec::new();
        for share in shares {
            merged.records_read += share.records_read;
            for (code, n) in share.rejected {
                match rejected.iter_mut().find(|(c, _)| *c == code) {
                    Some((_, total)) => *total += n,
                    None => rejected.push((code, n)),
                }
            }
            for name in share.names {
                if names.insert(name.clone()) {
                    merged.names.push(name);
                }
            }
            merged.positions.extend(share.positions);
            if merged.live.is_empty() {
                merged.live = share.live;
            } else {
                merged.live.extend(share.live);
            }
            merged.reference.extend(share.reference);
        }
        merged.rejected = rejected;
        merged.positions = merge_positions(merged.positions);
        Ok(merged)
    }
}

/// Positions sorted, one per partition: each partition is read by one worker, so two shares
/// never both list one; if they do anyway, the smaller position is kept (input is read again,
/// never skipped).
fn merge_positions(mut positions: Vec<SavedPosition>) -> Vec<SavedPosition> {
    positions.sort();
    let mut out: Vec<SavedPosition> = Vec::with_capacity(positions.len());
    for p in positions {
        match out.last() {
            Some(last) if last.source == p.source && last.partition == p.partition => {
                tracing::warn!(
                    source = %p.source,
                    partition = p.partition,
                    kept = last.position,
                    other = p.position,
                    "Two checkpoint shares hold one partition; resuming at the smaller position."
                );
            }
            _ => out.push(p),
        }
    }
    out
}

fn merge_scans(shares: &[Checkpoint]) -> Option<DeadLetterScan> {
    let first = shares[0].dead_letter_scan.as_ref()?;
    let mut from: HashMap<i32, (i64, usize)> = HashMap::new();
    for share in shares {
        let scan = share.dead_letter_scan.as_ref()?;
        if scan.topic != first.topic {
            return None;
        }
        for &(partition, offset) in &scan.from {
            let entry = from.entry(partition).or_insert((offset, 0));
            entry.0 = entry.0.min(offset);
            entry.1 += 1;
        }
    }
    let mut from: Vec<(i32, i64)> = from
        .into_iter()
        .filter(|(_, (_, seen))| *seen == shares.len())
        .map(|(partition, (offset, _))| (partition, offset))
        .collect();
    from.sort_unstable();
    Some(DeadLetterScan {
        topic: first.topic.clone(),
        from,
    })
}
