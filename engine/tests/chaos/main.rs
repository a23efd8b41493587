//! Chaos tests: each kills a service of the kit (a Kafka broker, Cassandra) while an engine
//! runs, and starts it again. Every other test would see the outage, so they live in their own
//! binary (cargo runs test binaries one after another) and take [`serial`] so that they never
//! overlap each other either.

#[path = "../it/support/mod.rs"]
mod support;

mod cassandra_outage;
mod chaos_kafka;

/// Held for the whole of a chaos test: one outage at a time.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that panicked while holding it has restarted its service (its guards did).
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}
