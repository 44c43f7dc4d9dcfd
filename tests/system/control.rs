//! The control subject through `agora ctl`, against an `agora node` and a nats-server started
//! by the test: markets added while others run (and back after a restart), listed, halted and
//! resumed in order with the flow, removed; bad requests refused with what to fix; a trader
//! cannot halt a market through the orders subject.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agora::bus::{self, LocalServer};
use async_nats::jetstream;
use serde_json::{Value, json};

struct Node(Child);

impl Node {
    fn start(url: &str, dir: &std::path::Path) -> (Node, String) {
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            "node_id = \"n1\"\n[[markets]]\nsymbol = \"TEST-USD\"\nprice_decimals = 2\nsize_decimals = 0\n",
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_agora"))
            .arg("node")
            .arg("--config")
            .arg(&config)
            .args(["--nats-url", url, "--data-dir"])
            .arg(dir.join("data"))
            .env("AGORA_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("agora node starts");
        let stdout = child.stdout.take().expect("piped");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ready = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("ready") {
                ready = line;
                break;
            }
            assert!(Instant::now() < deadline, "the node never got ready");
        }
        (Node(child), ready)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(url: &str, args: &[&str]) -> (bool, Value, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_agora"))
        .arg("ctl")
        .args(args)
        .args(["--nats-url", url])
        .output()
        .expect("agora ctl runs");
    let reply = serde_json::from_slice(&stdout).unwrap_or(Value::Null);
    (
        status.success(),
        reply,
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

async fn publish(js: &jetstream::Context, subject: &str, value: Value) -> u64 {
    let bytes = rmp_serde::to_vec_named(&value).expect("msgpack");
    js.publish(subject.to_string(), bytes.into())
        .await
        .expect("publish sent")
        .await
        .expect("publish acknowledged")
        .sequence
}

/// Every report sent to `account` in `market`.
async fn reports(
    js: &jetstream::Context,
    account: &str,
    market: &str,
    at_least: usize,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let mut execs = js.get_stream("EXECS").await.expect("EXECS");
        let last = execs.info().await.expect("info").state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = execs.get_raw_message(seq).await
                && m.subject.as_str() == format!("agora.execs.{account}.{market}")
            {
                let v: Value = rmp_serde::from_slice(&m.payload).expect("decodes");
                out.extend(v["reports"].as_array().cloned().unwrap_or_default());
            }
        }
        if out.len() >= at_least {
            return out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{account} got {} reports, expected {at_least}",
            out.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn operators_control_markets_through_agora_ctl() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let (node, _) = Node::start(&url, dir.path());
    let client = bus::connect(&url, "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = jetstream::new(client);

    // market.add while TEST-USD runs.
    let spec = dir.path().join("new.toml");
    std::fs::write(
        &spec,
        "symbol = \"NEW-USD\"\nprice_decimals = 2\nsize_decimals = 0\ntick_size = \"0.05\"\n",
    )
    .expect("write");
    let (ok, reply, err) = ctl(
        &url,
        &["market.add", "--spec", spec.to_str().expect("utf-8")],
    );
    assert!(ok, "{reply} {err}");
    assert_eq!(reply["market"], "NEW-USD");
    assert_eq!(reply["created"], true);
    publish(
        &js,
        "agora.orders.NEW-USD",
        json!({"op":"new","account":"alice","cid":"a1","side":"sell","price":"10.05","qty":"3"}),
    )
    .await;
    let alice = reports(&js, "alice", "NEW-USD", 1).await;
    assert_eq!(alice[0]["type"], "accepted");

    let (ok, reply, _) = ctl(&url, &["market.list"]);
    assert!(ok);
    let markets = reply["markets"].as_array().cloned().unwrap_or_default();
    let new = markets
        .iter()
        .find(|m| m["symbol"] == "NEW-USD")
        .expect("listed");
    assert_eq!(new["state"], "active");
    assert_eq!(new["resting_orders"], 1);
    assert!(markets.iter().any(|m| m["symbol"] == "TEST-USD"));
    let (ok, reply, _) = ctl(&url, &["node.list"]);
    assert!(ok);
    assert_eq!(reply["nodes"][0]["node"], "n1", "{reply}");
    assert_eq!(reply["nodes"][0]["markets"], 2, "{reply}");

    // A trader cannot halt a market: halt on the orders subject is refused.
    publish(
        &js,
        "agora.orders.NEW-USD",
        json!({"op":"halt","account":"mallory"}),
    )
    .await;
    let mallory = reports(&js, "mallory", "NEW-USD", 1).await;
    assert_eq!(mallory[0]["reason"], "not_permitted");

    // market.halt is sequenced with the orders: the next order is refused, cancels still work.
    let (ok, reply, err) = ctl(&url, &["market.halt", "NEW-USD"]);
    assert!(ok, "{reply} {err}");
    assert_eq!(reply["halted"], true);
    publish(
        &js,
        "agora.orders.NEW-USD",
        json!({"op":"new","account":"bob","cid":"b1","side":"buy","price":"10.05","qty":"1"}),
    )
    .await;
    let bob = reports(&js, "bob", "NEW-USD", 1).await;
    assert_eq!(bob[0]["reason"], "halted");
    let (ok, reply, _) = ctl(&url, &["market.resume", "NEW-USD"]);
    assert!(ok);
    assert_eq!(reply["halted"], false);
    publish(
        &js,
        "agora.orders.NEW-USD",
        json!({"op":"new","account":"bob","cid":"b2","side":"buy","price":"10.05","qty":"1"}),
    )
    .await;
    let bob = reports(&js, "bob", "NEW-USD", 3).await;
    assert!(bob.iter().any(|r| r["type"] == "fill"), "{bob:?}");

    // Bad requests say what to fix, and exit non-zero.
    std::fs::write(
        &spec,
        "symbol = \"BAD-USD\"\nprice_decimals = 2\nsize_decimals = 0\ntick_size = \"0.001\"\n",
    )
    .expect("write");
    let (ok, reply, _) = ctl(
        &url,
        &["market.add", "--spec", spec.to_str().expect("utf-8")],
    );
    assert!(!ok);
    assert_eq!(reply["error"], "invalid_spec");
    assert_eq!(
        reply["message"],
        "tick_size 0.001 has 3 decimals; BAD-USD allows 2 (field tick_size)"
    );
    let (ok, reply, _) = ctl(&url, &["market.frobnicate"]);
    assert!(!ok);
    assert_eq!(reply["error"], "unknown_verb");
    let (ok, reply, _) = ctl(&url, &["market.halt", "NOPE-USD"]);
    assert!(!ok);
    assert_eq!(reply["error"], "unknown_market");

    // Added markets come back after a restart; removed ones do not.
    std::fs::write(
        &spec,
        "symbol = \"KEEP-USD\"\nprice_decimals = 2\nsize_decimals = 0\n",
    )
    .expect("write");
    assert!(
        ctl(
            &url,
            &["market.add", "--spec", spec.to_str().expect("utf-8")]
        )
        .0
    );
    let (ok, reply, _) = ctl(&url, &["market.remove", "NEW-USD"]);
    assert!(ok, "{reply}");
    assert_eq!(reply["stopped"], true);
    drop(node);
    let (_node, ready) = Node::start(&url, dir.path());
    assert!(
        ready.contains("KEEP-USD") && ready.contains("TEST-USD"),
        "{ready}"
    );
    assert!(!ready.contains("NEW-USD"), "{ready}");
}
