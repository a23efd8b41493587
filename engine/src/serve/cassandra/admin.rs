//! `spendflow.v1.Admin` from Cassandra: what `sink_progress` and the user index can tell.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::backend::status;
use super::index::IndexCache;
use super::progress::ProgressWatch;
use crate::cassandra::reader::TableReader;
use crate::serve::grpc::convert;

/// The message of `ListRejected` from Cassandra.
pub const LIST_REJECTED_UNIMPLEMENTED: &str = "ListRejected is not served from Cassandra: \
     rejected records are kept by the engine (Admin/ListRejected on its own gRPC address) and \
     copied to its dead-letter topic";

/// Answers `Admin` from the tables.
#[derive(Debug, Clone)]
pub struct CassandraAdmin {
    reader: Arc<TableReader>,
    progress: ProgressWatch,
    index: Arc<IndexCache>,
    started: Instant,
    quiet: Duration,
}

impl CassandraAdmin {
    /// `caught_up` is reported once the sink has been quiet for `quiet`.
    pub fn new(
        reader: Arc<TableReader>,
        progress: ProgressWatch,
        index: Arc<IndexCache>,
        quiet: Duration,
    ) -> Self {
        CassandraAdmin {
            reader,
            progress,
            index,
            started: Instant::now(),
            quiet,
        }
    }
}

#[tonic::async_trait]
impl Admin for CassandraAdmin {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let observed = self.progress.current();
        let index = self
            .index
            .get(&self.reader, &self.progress, 0)
            .await
            .map_err(status)?;
        let as_of = observed.as_of();
        let records = observed
            .state
            .committed
            .as_ref()
            .map_or(0, |p| p.records_covered);
        Ok(Response::new(pb::GetStatusResponse {
            as_of: Some(convert::as_of(&as_of)),
            records_read: records,
            records_accepted: 0,
            records_rejected: 0,
            rejected_by_reason: Default::default(),
            caught_up: observed.quiet(self.quiet),
            partitions: as_of
                .positions
                .iter()
                .map(|p| pb::PartitionStatus {
                    source: p.source.to_string(),
                    partition: p.partition,
                    position: p.position,
                    high_watermark: -1,
                    lag: -1,
                    ..Default::default()
                })
                .collect(),
            workers: 0,
            users: index.len() as u64,
            live_expenses: index.live_expenses(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            version: env!("CARGO_PKG_VERSION").to_string(),
            interned_names: 0,
            // Only the engine that writes checkpoints knows them.
            checkpoint: None,
            // No engine processes to list (the tables hold no per-process state).
            ..Default::default()
        }))
    }

    async fn list_rejected(
        &self,
        _request: Request<pb::ListRejectedRequest>,
    ) -> Result<Response<pb::ListRejectedResponse>, Status> {
        Err(Status::unimplemented(LIST_REJECTED_UNIMPLEMENTED))
    }
}
