//! The services kit's own shell tests (`docker/native/tests/*.sh`), run with the suite: the kit
//! is what every other integration test stands on, on a fresh machine first of all.

use std::path::Path;
use std::process::Command;

/// Runs one of the kit's test scripts and fails with its output if it fails.
fn kit_test(script: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docker/native/tests")
        .join(script);
    let out = Command::new("bash").arg(&path).output().expect("run bash");
    assert!(
        out.status.success(),
        "{} failed:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn spawn_waits_for_the_daemon_to_run() {
    kit_test("spawn.sh");
}
