//! `spendflow.v1.Admin`.

use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::convert;
use crate::serve::auth::Scope;
use crate::serve::auth::grpc::check;
use crate::serve::status::StatusProbe;

/// Answers `Admin` from the engine's shared state.
#[derive(Debug, Clone)]
pub struct AdminService {
    status: StatusProbe,
}

impl AdminService {
    /// A service over the engine's status.
    pub fn new(status: StatusProbe) -> Self {
        AdminService { status }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        // Also required by the router's interceptor (for every `Admin`); checked here too so
        // the service is safe wherever it is mounted behind the interceptor.
        check(&request, |p| p.require(Scope::Admin))?;
        let s = self.status.status();
        let topology = s.topology;
        let this_process = pb::ProcessStatus {
            process: topology.process as u32,
            // The cluster's services fill in the addresses from the cluster file.
            grpc_address: String::new(),
            reachable: true,
            error: String::new(),
            workers: s
                .worker_partitions
                .iter()
                .enumerate()
                .map(|(local, partitions)| pb::WorkerStatus {
                    worker: topology.global_worker(local) as u32,
                    partitions: partitions.iter().map(partition_status).collect(),
                })
                .collect(),
            published_epoch: s.published_epoch.unwrap_or(0),
            caught_up: s.caught_up,
            records_read: s.records_read,
            users: s.users as u64,
        };
        Ok(Response::new(pb::GetStatusResponse {
            as_of: Some(convert::as_of(&s.as_of)),
            records_read: s.records_read,
            records_accepted: s.records_accepted,
            records_rejected: s.records_rejected,
            rejected_by_reason: s
                .rejected_by_reason
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            caught_up: s.caught_up,
            partitions: s.partitions.iter().map(partition_status).collect(),
            workers: s.workers as u32,
            users: s.users as u64,
            live_expenses: s.live_expenses,
            uptime_ms: s.uptime.as_millis() as u64,
            version: env!("CARGO_PKG_VERSION").to_string(),
            interned_names: s.interned_names as u64,
            checkpoint: s.checkpoint.map(|c| pb::CheckpointStatus {
                last_epoch: c.last_epoch,
                last_age_ms: c.last_at.map_or(0, |at| at.elapsed().as_millis() as u64),
                last_error: c.last_error.unwrap_or_default(),
                failures: c.failures,
            }),
            processes: vec![this_process],
            process: topology.process as u32,
        }))
    }

    async fn list_rejected(
        &self,
        request: Request<pb::ListRejectedRequest>,
    ) -> Result<Response<pb::ListRejectedResponse>, Status> {
        check(&request, |p| p.require(Scope::Admin))?;
        let limit = convert::limit(request.into_inner().limit, 20, 1000, "limit")?;
        let dead_letters = &self.status.shared.dead_letters;
        let records = dead_letters
            .recent(limit)
            .into_iter()
            .map(|r| pb::RejectedRecord {
                reason: r.reason.code().to_string(),
                detail: r.detail,
                source: r.source.to_string(),
                partition: r.partition,
                offset: r.offset,
                raw_prefix: String::from_utf8_lossy(&r.raw_prefix).into_owned(),
            })
            .collect();
        Ok(Response::new(pb::ListRejectedResponse {
            records,
            total_rejected: dead_letters.total(),
        }))
    }
}

/// One input partition's progress as the wire carries it.
fn partition_status(p: &crate::core::PartitionPosition) -> pb::PartitionStatus {
    pb::PartitionStatus {
        source: p.source.to_string(),
        partition: p.partition,
        position: p.position,
        high_watermark: p.high_watermark.unwrap_or(-1),
        lag: p.high_watermark.map_or(-1, |h| (h - p.position).max(0)),
        state: p.state.as_str().to_string(),
        error: p.error.as_deref().unwrap_or_default().to_string(),
        lost: p
            .lost
            .iter()
            .map(|r| pb::OffsetRange {
                from: r.from,
                to: r.to,
            })
            .collect(),
    }
}
