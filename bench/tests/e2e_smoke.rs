//! Smoke test of the end-to-end harness (`src/bin/e2e`): a tiny run against the real Kafka and
//! Cassandra of the services kit, both layouts, without the Spark and Kafka Streams baselines
//! (which take minutes to install and start), the scaling table and the in-memory figure. It checks that the harness runs end to end, that the engine's served
//! state equals the HashMap fold of the same records, and that the results file has every
//! ratio line. It asserts nothing about speed.
//!
//! Needs `SPENDFLOW_KAFKA` and `SPENDFLOW_CASSANDRA` (`docker/native/services up`, then
//! `eval "$(docker/native/services env)"`), and the `spendflow` binary of the same build
//! profile, which `cargo test --workspace` builds for the engine's own tests.

use std::path::PathBuf;
use std::process::Command;

fn service_env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => panic!(
            "{var} is not set, so the end-to-end smoke test cannot reach its real service.\n\
             Start the services and export their addresses, then rerun:\n\
             \n    docker/native/services up\n    eval \"$(docker/native/services env)\"\n"
        ),
    }
}

#[test]
fn quick_run_writes_every_figure_and_ratio() {
    let kafka = service_env("SPENDFLOW_KAFKA");
    let cassandra = service_env("SPENDFLOW_CASSANDRA");
    let e2e = PathBuf::from(env!("CARGO_BIN_EXE_e2e"));
    let spendflow = e2e.with_file_name("spendflow");
    assert!(
        spendflow.is_file(),
        "{} is missing: build it first (`cargo build -p spendflow-engine`; `cargo test \
         --workspace` does)",
        spendflow.display()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("RESULTS.md");
    let out = Command::new(&e2e)
        .args(["--quick", "--skip-spark", "--layouts", "keyed,per-user"])
        .args([
            "--no-kstreams",
            "--no-scaling",
            "--no-in-memory",
            "--no-cluster",
        ])
        .args([
            "--events",
            "4000",
            "--users",
            "100",
            "--per-user-users",
            "5",
        ])
        .args(["--rate", "2000", "--window-secs", "2"])
        .arg("--brokers")
        .arg(&kafka)
        .arg("--cassandra")
        .arg(&cassandra)
        .arg("--spendflow")
        .arg(&spendflow)
        .arg("--output")
        .arg(&output)
        .output()
        .expect("run e2e");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "e2e failed:\n{stderr}");
    let results = std::fs::read_to_string(&output).expect("results written");

    for line in ["spendflow/raw-Kafka: ", "spendflow/HashMap: "] {
        let found = results
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| {
                panic!("no line starting with {line:?} in:\n{results}");
            });
        let value = found[line.len()..].trim_end_matches('x');
        assert!(
            value.parse::<f64>().is_ok_and(|v| v > 0.0),
            "{found:?} is not a positive ratio"
        );
    }
    for skipped in ["spendflow/Spark: n/a", "spendflow/Kafka Streams: n/a"] {
        assert!(
            results.lines().any(|l| l == skipped),
            "the skipped baseline must show as n/a ({skipped}):\n{results}"
        );
    }
    // The sink's rows per event come from the engine's metrics: a number, not n/a.
    let writes = results
        .lines()
        .find(|l| l.contains("Cassandra writes per event during catch-up (rows / events) |"))
        .unwrap_or_else(|| panic!("no writes-per-event row in:\n{results}"));
    assert!(
        !writes.contains("n/a"),
        "writes per event not measured: {writes}"
    );
    // The targets table says met or missed for the figures it has.
    assert!(
        results.contains("## Targets of issue 14")
            && (results.contains("| met |") || results.contains("| **missed** |")),
        "targets table missing:\n{results}"
    );
    // Both layouts ran, and the engine's answer matched the fold in each, without and with the
    // Cassandra sink.
    for layout in ["keyed", "per-user"] {
        assert!(
            results.contains(&format!("## Results: {layout} layout")),
            "{layout} missing"
        );
    }
    assert_eq!(
        results.matches("equal for all").count(),
        4,
        "the served state must equal the HashMap fold in both layouts and both engine \
         configurations:\n{results}"
    );
    assert!(
        !results.contains("MISMATCH"),
        "served state differs:\n{results}"
    );
    // The Cassandra figures are measured when the engine has the sink.
    assert!(
        results.contains("Kafka → Cassandra (events/s) | ") && !results.contains("n/a (sink"),
        "Cassandra figures missing:\n{results}"
    );
    // Every marker of every window was seen.
    assert!(!results.contains("not seen"), "markers lost:\n{results}");
    // The run cleaned up after itself.
    assert!(stderr.contains("deleted "), "topics not deleted:\n{stderr}");
}
