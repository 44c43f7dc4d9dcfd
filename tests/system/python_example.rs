//! `examples/python/place_order.py`, run as a user would, against an `agora node` that started
//! its own nats-server: through the Python SDK it places orders, prints the fill, asks what is
//! left open and cancels it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_python_example_places_orders_and_prints_its_fill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut node = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["node", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("AGORA_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("agora node starts");
    // Its standard output is read to the end (on a thread), so the node never writes to a
    // closed pipe.
    let stdout = node.stdout.take().expect("piped");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut url = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let Some(u) = line.split_whitespace().find(|w| w.starts_with("nats://")) {
            url.get_or_insert_with(|| u.trim_end_matches(';').to_string());
        }
        if line.contains("ready") {
            break;
        }
    }
    let url = url.expect("the node printed its NATS URL");
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/place_order.py"
    );
    let output = Command::new("python3")
        .arg(example)
        .arg(&url)
        .output()
        .expect("python3 runs");
    // SIGTERM, so the node stops the nats-server it started (a SIGKILL would leave it behind).
    // SAFETY: kill with a pid we own and a valid signal.
    unsafe {
        libc::kill(node.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let stopped = loop {
        match node.try_wait() {
            Ok(Some(status)) => break Some(status),
            _ if Instant::now() > deadline => {
                let _ = node.kill();
                let _ = node.wait();
                break None;
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
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
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the node did not stop cleanly on SIGTERM: {stopped:?}"
    );
}
