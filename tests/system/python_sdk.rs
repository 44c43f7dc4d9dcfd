//! The Python SDK's own tests (`clients/python/tests`, pytest) against a real `agora node`
//! that started its own nats-server: orders and fills in decimals, typed refusals, queries,
//! batches, the book and the tape, catch-up after a restart, a lost connection that misses
//! nothing, market status, and the history store's answers (`agora history` beside the node).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_python_sdk_passes_its_tests_against_a_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut node = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["node", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("AGORA_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("agora node starts");
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
    // SIGTERM, so the node stops the nats-server it started.
    // SAFETY: kill with a pid we own and a valid signal.
    unsafe {
        libc::kill(node.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = node.kill();
            let _ = node.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    // pytest's exit status: 0 all passed; anything else (failures, no tests collected, an
    // error in a fixture, pytest missing) fails this test with its output.
    assert!(
        output.status.success(),
        "pytest exited with {:?}:\n{text}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    drop(history);
    assert!(text.contains("9 passed"), "{text}");
}
