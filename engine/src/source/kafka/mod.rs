//! The Kafka source: many topics by pattern, partitions divided among workers, positions kept
//! by spendflow.
//!
//! * **Topics.** A regex (`--topic-pattern`) or one name (`--topic`). The source lists the
//!   cluster's topics every [`KafkaSourceConfig::discovery_interval_ms`] and starts reading any
//!   new match from its beginning, so a per-user topic created while the engine runs is picked
//!   up within that delay.
//! * **Users.** A topic named `<user_topic_prefix><digits>` (default prefix `expenses.user.`)
//!   belongs to that user, and a record in it that names another user is rejected
//!   (`user_mismatch`). In a keyed topic, a key that is a number is the user the record must name.
//! * **Workers.** Every worker lists the same partitions and takes its share: a topic's
//!   partitions go round the workers in turn from a worker chosen by a stable hash of the topic
//!   (so a keyed topic is spread evenly, and single-partition topics are spread by the hash):
//!   deterministic, no coordination, and a partition never moves while the engine runs, so each
//!   partition keeps a single reader (which keeps each expense's records in order).
//! * **Positions.** Partitions are assigned manually at positions spendflow chooses (the
//!   beginning, or a checkpoint); consumer-group commits are sent only so Kafka tools can show
//!   lag, never read back. `isolation.level=read_committed`.
//! * **Read-ahead.** A fetch thread per source polls the consumer continuously and hands
//!   batches of records to the worker over a bounded channel (see `fetch`); the worker takes
//!   whole batches without waiting in librdkafka. A partition's position moves only past
//!   records the worker has taken, never past records still read ahead.
//! * **Back-pressure.** librdkafka's prefetch queue is bounded
//!   (`queued.max.messages.kbytes`) and so is the fetch thread's channel; the worker takes only
//!   as much as the epoch budget allows.
//! * **Lag.** The source reports itself lagging while its known backlog is large (records
//!   read ahead plus the distance to the partitions' ends): the engine then cuts epochs by
//!   record budget, not by timer.
//! * **Caught up.** A poll reports idle only when the source has found what it reads (with
//!   `--topic`: a listing that showed the topic and its partitions; with a pattern: one
//!   successful listing, which may match no topic at all: then there is nothing to read) and
//!   every assigned partition's position has reached the partition's end as of the last check
//!   (made after assignment, refreshed every few hundred milliseconds while the source looks
//!   idle). Until then it reports [`Poll::Behind`](crate::source::Poll::Behind).
//! * **Lost input.** `auto.offset.reset=error`: librdkafka never skips silently. A partition
//!   assigned at a position below its low watermark (a checkpoint's position whose records
//!   were deleted since), or that hits "offset out of range" while read, has lost the records
//!   `[position, low watermark)`. With [`OnDataLoss::Fail`] (the default) it stops: an ERROR
//!   names topic, partition and range, `Admin/GetStatus` shows `stopped_data_loss` and the
//!   range, and it keeps its lag. With [`OnDataLoss::Skip`] it continues at the low watermark
//!   and still logs and reports the range.
//! * **Deleted topics.** A topic deleted while read (confirmed by asking for it by name) leaves
//!   its partitions in the status as `deleted` with their lag, no longer read; one WARN names
//!   the topic. Everything else keeps being read.

mod config;
mod consumer;
mod fetch;

#[cfg(test)]
mod tests;

pub use config::{KafkaSourceConfig, OnDataLoss};
pub use consumer::{KafkaSource, READ_SETTINGS, user_of_topic};
