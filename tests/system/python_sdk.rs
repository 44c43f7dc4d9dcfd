//! The Python SDK's own tests (`clients/python/tests`, pytest) against a real `agora node`
//! that started its own nats-server: orders and fills in decimals, typed refusals, queries,
//! batches, the book and the tape, catch-up after a restart, a lost connection that misses
//! nothing, market status, and the history store's answers (`agora history` beside the node).

use std::process::Command;
use std::time::Duration;

#[test]
fn the_python_sdk_passes_its_tests_against_a_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut node, url) = crate::common::Agora::embedded_node(&dir.path().join("data"));
    // The history store beside it, as docs/clients.md runs it: same data directory, so it finds
    // the node's NATS by itself, and SQLite there.
    let history = crate::common::Agora::spawn(&[
        "history".as_ref(),
        "--data-dir".as_ref(),
        dir.path().join("data").as_os_str(),
    ]);
    history.wait_line(|l| l.contains("writing"), Duration::from_secs(30));
    let output = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python"))
        .env("AGORA_NATS_URL", &url)
        .env("AGORA_BIN", env!("CARGO_BIN_EXE_agora"))
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&output.stdout);
    // pytest's exit status: 0 all passed; anything else (failures, no tests collected, an
    // error in a fixture, pytest missing) fails this test with its output.
    assert!(
        output.status.success(),
        "pytest exited with {:?}:\n{text}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("9 passed"), "{text}");
    drop(history);
    // SIGTERM, so the node stops the nats-server it started.
    node.terminate(Duration::from_secs(30));
}
