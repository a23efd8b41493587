//! The in-process input: records pushed by the program that embeds the engine.
//!
//! [`InputHandle`]s (cloneable, `Send`) push JSON bytes or ready [`Record`]s into a bounded
//! channel that worker 0 drains. A full channel blocks the pusher: the engine's back-pressure
//! reaches the caller instead of growing memory. The position is the number of records taken
//! from the channel.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use spendflow_operators::Record;
use spendflow_operators::reference::RefChange;

use crate::error::{EngineError, SourceError};
use crate::source::{PartitionPosition, Payload, Poll, Source, SourceRecord};

/// The source name of the in-process input in positions and status. Its position counts the
/// records taken in this run: it starts at 0 again after a restart (the records are the
/// embedding program's, not re-readable from here).
pub const INPUT_SOURCE: &str = "input";

/// Records the channel holds before pushes block.
pub const INPUT_CAPACITY: usize = 64 * 1024;

/// Pushes records into a running engine. Cheap to clone; every clone feeds the same input.
#[derive(Clone, Debug)]
pub struct InputHandle {
    tx: Sender<Payload>,
}

impl InputHandle {
    /// Pushes one JSON v1 record, waiting while the input is full. Malformed records are
    /// accepted here and rejected by the engine like any other (see `Admin/ListRejected`).
    ///
    /// # Errors
    ///
    /// [`EngineError::ShutDown`] if the engine has stopped.
    pub fn push_json(&self, bytes: impl Into<Vec<u8>>) -> Result<(), EngineError> {
        self.tx
            .send(Payload::Bytes(bytes.into().into()))
            .map_err(|_| EngineError::ShutDown)
    }

    /// Pushes one record built in Rust, waiting while the input is full.
    ///
    /// # Errors
    ///
    /// [`EngineError::ShutDown`] if the engine has stopped.
    pub fn push(&self, record: Record) -> Result<(), EngineError> {
        self.tx
            .send(Payload::Record(record))
            .map_err(|_| EngineError::ShutDown)
    }

    /// Pushes one change of reference data (a user's budget and currency, an exchange rate),
    /// waiting while the input is full. Changes apply in push order with the records around
    /// them: an embedding program that keeps budgets elsewhere feeds them here (see
    /// `spendflow_operators::reference`).
    ///
    /// # Errors
    ///
    /// [`EngineError::ShutDown`] if the engine has stopped.
    pub fn push_reference(&self, change: RefChange) -> Result<(), EngineError> {
        self.tx
            .send(Payload::Reference(change))
            .map_err(|_| EngineError::ShutDown)
    }

    /// Records pushed but not yet taken by the engine.
    pub fn pending(&self) -> usize {
        self.tx.len()
    }

    /// Pushes without waiting. Returns the record back if the input is full.
    ///
    /// # Errors
    ///
    /// [`EngineError::ShutDown`] if the engine has stopped.
    pub fn try_push(&self, record: Record) -> Result<Option<Record>, EngineError> {
        match self.tx.try_send(Payload::Record(record)) {
            Ok(()) => Ok(None),
            Err(TrySendError::Full(Payload::Record(r))) => Ok(Some(r)),
            Err(TrySendError::Full(_)) => unreachable!("sent a record"),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::ShutDown),
        }
    }
}

/// The worker side of the in-process input.
pub(crate) struct InputSource {
    rx: Receiver<Payload>,
    name: Arc<str>,
    position: i64,
}

/// Creates a connected handle and source.
pub(crate) fn channel() -> (InputHandle, InputSource) {
    let (tx, rx) = crossbeam_channel::bounded(INPUT_CAPACITY);
    (
        InputHandle { tx },
        InputSource {
            rx,
            name: Arc::from(INPUT_SOURCE),
            position: 0,
        },
    )
}

impl Source for InputSource {
    fn poll(&mut self, out: &mut Vec<SourceRecord>, max: usize) -> Result<Poll, SourceError> {
        let start = out.len();
        for payload in self.rx.try_iter().take(max) {
            out.push(SourceRecord {
                payload,
                partition: 0,
                offset: self.position,
                expected_user: None,
                key: None,
            });
            self.position += 1;
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
            high_watermark: Some(self.position + self.rx.len() as i64),
            ..PartitionPosition::default()
        }]
    }
}
