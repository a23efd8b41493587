//! A gRPC client of a running spendflow (for instance `cargo run --release -- demo`): status,
//! top spenders, one user's summary and months, then a few seconds of live changes.
//!
//! Run: `cargo run -p spendflow-examples --example grpc_client -- http://127.0.0.1:50051`

use std::time::Duration;

use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let channel = tonic::transport::Channel::from_shared(addr.clone())?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {addr} ({e}); is `spendflow demo` running?"))?;
    let mut admin = AdminClient::new(channel.clone());
    let mut query = ExpenseQueryClient::new(channel);

    let status = admin
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    println!(
        "epoch {} | read {} | rejected {} | users {} | caught up {}",
        status.as_of.map_or(0, |a| a.epoch),
        status.records_read,
        status.records_rejected,
        status.users,
        status.caught_up
    );

    let top = query
        .top_spenders(pb::TopSpendersRequest {
            limit: 5,
            consistency: None,
        })
        .await?
        .into_inner();
    println!("top spenders:");
    for s in &top.spenders {
        println!(
            "  #{} user {:>5}: {:>12} minor units over {} expenses",
            s.rank, s.user_id, s.total_minor, s.expense_count
        );
    }
    let Some(first) = top.spenders.first() else {
        println!("no spenders yet");
        return Ok(());
    };

    let request = pb::GetUserSummaryRequest {
        user_id: first.user_id,
        consistency: None,
    };
    let summary = query
        .get_user_summary(request)
        .await?
        .into_inner()
        .summary
        .unwrap_or_default();
    println!(
        "user {}: last event {}",
        summary.user_id, summary.last_event_time
    );
    for c in summary.by_category.iter().take(5) {
        println!(
            "  {:<14} {:>12} ({} expenses)",
            c.key, c.total_minor, c.expense_count
        );
    }

    // Asking for user 0 shows what a bad request gets back.
    let bad = query
        .get_user_summary(pb::GetUserSummaryRequest {
            user_id: 0,
            consistency: None,
        })
        .await;
    if let Err(status) = bad {
        println!("user 0 -> {:?}: {}", status.code(), status.message());
    }

    let mut stream = query
        .subscribe(pb::SubscribeRequest {
            incarnation: String::new(),
            user_ids: vec![first.user_id],
            resume_after_epoch: 0,
        })
        .await?
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        // Stop at the deadline, at the end of the stream, or on an error.
        let Ok(Ok(Some(message))) = tokio::time::timeout_at(deadline, stream.message()).await
        else {
            break;
        };
        match message.event {
            Some(pb::subscribe_response::Event::Snapshot(s)) => {
                println!("snapshot: {} cells", s.cells.len())
            }
            Some(pb::subscribe_response::Event::Changes(c)) => {
                println!(
                    "epoch {}: {} cells changed",
                    c.as_of.map_or(0, |a| a.epoch),
                    c.cells.len()
                )
            }
            Some(pb::subscribe_response::Event::Progress(_)) | None => {}
        }
    }
    Ok(())
}
