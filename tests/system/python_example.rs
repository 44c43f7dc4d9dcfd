//! `examples/python/place_order.py`, run as a user would, against an `agora node` that started
//! its own nats-server: through the Python SDK it places orders, prints the fill, asks what is
//! left open and cancels it.

use std::process::Command;
use std::time::Duration;

#[test]
fn the_python_example_places_orders_and_prints_its_fill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut node, url) = crate::common::Agora::embedded_node(&dir.path().join("data"));
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/place_order.py"
    );
    let output = Command::new("python3")
        .arg(example)
        .arg(&url)
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the example failed: {}\n{}",
        text,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("alice sell accepted: oid 1000 at stream seq 1"),
        "{text}"
    );
    assert!(
        text.contains("bob fill buy 0.20000000 @ 65000.00 taker"),
        "{text}"
    );
    assert!(
        text.contains(
            "alice still has 0.30000000 of 0.50000000 open at 65000.00 (filled 0.20000000)"
        ),
        "{text}"
    );
    assert!(text.contains("open orders of alice now: 0"), "{text}");
    // SIGTERM, so the node stops the nats-server it started (a SIGKILL would leave it behind).
    let stopped = node.terminate(Duration::from_secs(30));
    assert!(
        stopped.success(),
        "the node did not stop cleanly on SIGTERM: {stopped:?}"
    );
}
