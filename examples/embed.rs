//! Embeds the spendflow engine in a program: push records in process, read results, follow
//! changes, shut down. No services, no network.
//!
//! Run: `cargo run -p spendflow-examples --example embed`

use std::time::Duration;

use spendflow_engine::Engine;
use spendflow_engine::serve::read_model::SubscriptionStart;

fn expense(id: &str, user: u64, category: &str, amount_minor: i64, day: u32) -> String {
    format!(
        r#"{{"expense_id":"{id}","user_id":{user},"merchant":"Corner Shop","category":"{category}","amount_minor":{amount_minor},"currency":"EUR","event_time":"2026-11-{day:02}T12:00:00Z"}}"#
    )
}

fn main() -> anyhow::Result<()> {
    // Two worker threads; epochs cut every 10 ms while records arrive.
    let engine = Engine::builder()
        .workers(2)
        .epoch_interval(Duration::from_millis(10))
        .start()?;
    let input = engine.input();

    // Follow every change from the start (a subscription sees whole epochs only).
    let (start, mut changes) = engine.read_model().subscribe(None);
    if let SubscriptionStart::Snapshot(snapshot) = start {
        println!("subscribed at epoch {}", snapshot.as_of().epoch);
    }

    input.push_json(expense("e-1", 42, "groceries", 1_299, 20))?;
    input.push_json(expense("e-2", 42, "travel", 45_000, 21))?;
    input.push_json(expense("e-3", 7, "groceries", 850, 21))?;
    // A correction (same expense_id), a chargeback (delete) and a refund (negative amount).
    input.push_json(expense("e-2", 42, "travel", 39_000, 21))?;
    input.push_json(r#"{"expense_id":"e-3","user_id":7,"op":"delete"}"#)?;
    input.push_json(expense("e-4", 42, "groceries", -299, 22))?;
    // A malformed record is rejected, counted and kept; it never stops the engine.
    input.push_json(expense("e-5", 42, "groceries", 0, 22).replace(":0,", ":12.5,"))?;

    if !engine.wait_caught_up(Duration::from_secs(5)) {
        anyhow::bail!("the engine did not catch up in 5 s");
    }
    let snapshot = engine.read_model().snapshot();
    let user = snapshot
        .user(42)
        .ok_or_else(|| anyhow::anyhow!("user 42 has no expenses"))?;
    println!(
        "user 42 at epoch {}: {} expenses, total {} minor units",
        snapshot.as_of().epoch,
        user.expense_count,
        user.total_minor
    );
    for (category, (count, total)) in user.categories.iter() {
        println!("  {category}: {count} expenses, {total}");
    }
    println!("user 7 present: {}", snapshot.user(7).is_some());
    let status = engine.status();
    println!(
        "read {}, accepted {}, rejected {} {:?}",
        status.records_read,
        status.records_accepted,
        status.records_rejected,
        status.rejected_by_reason
    );

    while let Ok(published) = changes.try_recv() {
        println!(
            "epoch {}: {} cells changed",
            published.as_of.epoch,
            published.cells.len()
        );
    }
    engine.shutdown()?;
    Ok(())
}
