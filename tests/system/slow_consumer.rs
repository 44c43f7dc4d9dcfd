//! A node catching up on backlogs faster than nats-server may buffer for it. In a test binary
//! of its own: it loads the machine for a minute, and the node tests beside it are about
//! timing.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use agora::bus::{self, LocalServer};
use async_nats::jetstream;
use common::Agora;
use common::{publish, wait_journal};
use serde_json::Value;

/// How long a node may take to stop on SIGTERM.
const STOP: Duration = Duration::from_secs(20);

/// A node catching up on several markets' backlogs reads faster than nats-server may buffer
/// for it: the server closes the connection (a "slow consumer") and what it had sent on it is
/// lost. The order consumers do not acknowledge, so they would never send it again; the feeds
/// see the gap or the reconnect and open new consumers, and every command is applied.
/// (Before they did, a market stayed at 20 of 500 messages for as long as the test waited.)
#[tokio::test]
async fn backlogs_lost_to_a_slow_consumer_disconnect_are_read_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The smallest pending limit nats-server takes (it must hold one message of the largest
    // size), so the catch-up below overflows it.
    let nats_conf = dir.path().join("nats.conf");
    std::fs::write(&nats_conf, "max_payload: 1048576\nmax_pending: 1048576\n")
        .expect("write nats.conf");
    let server = LocalServer::start_with_config(&dir.path().join("nats"), &nats_conf)
        .unwrap_or_else(|e| panic!("{e}"));
    let markets = ["SA-USD", "SB-USD", "SC-USD"];
    let mut config = "node_id = \"n1\"\n".to_string();
    for m in markets {
        config.push_str(&format!(
            "[[markets]]\nsymbol = \"{m}\"\nprice_decimals = 2\nsize_decimals = 0\n"
        ));
    }
    // The first start creates the streams; the backlogs arrive while the node is down.
    let mut node = Agora::node(&server.url(), dir.path(), &config);
    let status = node.terminate(STOP);
    assert!(status.success(), "agora node exited with {status}");

    let client = bus::connect(&server.url(), "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = jetstream::new(client);
    let batches = common::resting_batches(30_000, 500, 4);
    for m in markets {
        for b in &batches {
            publish(&js, m, b.clone()).await;
        }
    }
    let mut node = Agora::node(&server.url(), dir.path(), &config);
    // Slow on a loaded machine: journal publishes lost with the connection restart their
    // markets; without the fix it never ends. All markets share the one deadline.
    let deadline = Instant::now() + Duration::from_secs(240);
    for m in markets {
        let left = deadline.saturating_duration_since(Instant::now());
        wait_journal(&js, m, batches.len() as u64, left).await;
    }
    // Every order rests (none crosses): a command skipped after a gap would show here.
    let out = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["ctl", "--nats-url", &server.url(), "market.list"])
        .output()
        .expect("agora ctl runs");
    let listed: Value = serde_json::from_slice(&out.stdout).expect("market.list answers JSON");
    for m in markets {
        let entry = listed["markets"]
            .as_array()
            .and_then(|all| all.iter().find(|e| e["symbol"] == m))
            .unwrap_or_else(|| panic!("{m} not in {listed}"));
        assert_eq!(entry["resting_orders"], 30_000, "{entry}");
    }
    assert!(node.terminate(STOP).success());
    let log = std::fs::read_to_string(dir.path().join("nats").join("nats-server.log"))
        .expect("server log");
    assert!(
        log.contains("Slow Consumer"),
        "the catch-up never overflowed the server's pending limit, so this test proved nothing"
    );
}
