//! `agora history` measured from outside, beside the node's own maximum in the same run:
//!
//! - **keep up**: `agora bench` (the node's end-to-end maximum through NATS) runs against a
//!   local nats-server; its journal is then written from the start by `agora history
//!   --rebuild` into SQLite and into PostgreSQL, timed from start to caught up: journal
//!   commands a second and rows a second, against the node's maximum;
//! - **queries**: an account with `AGORA_HBENCH_ORDERS` (default 100,000) historic orders:
//!   `agora.query.<ACCOUNT>.history` (newest page of 100, and a page deep in the past), p50 and
//!   p99 over 300 requests each, from each database.
//!
//! Needs `nats-server` and PostgreSQL's server binaries (as the tests do); installs nothing.
//! `AGORA_HBENCH_COMMANDS` sets `agora bench --orders` (default 100,000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use agora::bus::{self, LocalServer};
use agora::history::Store;
use async_nats::jetstream;
use common::Agora;
use common::db::Postgres;
use serde_json::{Value, json};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Commands in every market's order stream (what the journals will cover).
async fn journaled_target(js: &jetstream::Context) -> u64 {
    use futures::StreamExt;
    let mut total = 0;
    let mut streams = js.streams();
    while let Some(Ok(info)) = streams.next().await {
        if info.config.name.starts_with("ORDERS_") {
            total += info.state.last_sequence;
        }
    }
    total
}

/// Commands journaled in every market (the sum of the journals' last sequences).
async fn journaled(js: &jetstream::Context) -> u64 {
    let journal = bus::Journal::open(js, &bus::Subjects::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut names = Vec::new();
    let mut streams = js.stream_names();
    use futures::StreamExt;
    while let Some(Ok(name)) = streams.next().await {
        if let Some(m) = name.strip_prefix("ORDERS_") {
            names.push(m.to_string());
        }
    }
    let mut total = 0;
    for m in names {
        total += journal.last_seq(&m).await.unwrap_or(0);
    }
    total
}

async fn written(store: &Store) -> u64 {
    store
        .progress()
        .await
        .map(|p| p.values().map(|p| p.last_seq).sum())
        .unwrap_or(0)
}

async fn rows(store: &Store) -> u64 {
    let mut total = 0;
    for t in ["orders", "fills", "trades", "candles"] {
        let r = store
            .select(&format!("SELECT COUNT(*) FROM {t}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        total += r
            .first()
            .and_then(|r| r.first())
            .and_then(|c| c.int())
            .unwrap_or(0) as u64;
    }
    total
}

/// Runs `agora history --rebuild` into `db` and times it to caught up with `target` commands.
async fn catch_up(url: &str, db: &str, dir: &std::path::Path, target: u64) -> (f64, u64, u64) {
    let started = Instant::now();
    let mut history = Agora::spawn(&[
        "history",
        "--rebuild",
        "--nats-url",
        url,
        "--database",
        db,
        "--data-dir",
        &dir.display().to_string(),
    ]);
    history.wait_line(|l| l.contains("writing"), Duration::from_secs(60));
    let writing = Instant::now();
    let store = Store::open(db).await.unwrap_or_else(|e| panic!("{e}"));
    loop {
        let w = written(&store).await;
        if w >= target {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the history wrote {w} of {target} commands in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = writing.elapsed().as_secs_f64();
    eprintln!(
        "  (from the process's start: {:.2} s)",
        started.elapsed().as_secs_f64()
    );
    let r = rows(&store).await;
    let _ = history.terminate(Duration::from_secs(20));
    (secs, target, r)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn query_latency(client: &async_nats::Client, body: Value, n: usize) -> (f64, f64, usize) {
    let mut times = Vec::with_capacity(n);
    let mut items = 0;
    for _ in 0..n {
        let t = Instant::now();
        let reply = client
            .request("agora.query.whale.history", body.to_string().into())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        let v: Value = serde_json::from_slice(&reply.payload).expect("json");
        assert_eq!(v["ok"], true, "{v}");
        items =
            v["orders"].as_array().map_or(0, Vec::len) + v["fills"].as_array().map_or(0, Vec::len);
    }
    times.sort_by(f64::total_cmp);
    (percentile(&times, 0.5), percentile(&times, 0.99), items)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let commands = env_usize("AGORA_HBENCH_COMMANDS", 100_000);
    let whale_orders = env_usize("AGORA_HBENCH_ORDERS", 100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
    let url = nats.url();
    let js = jetstream::new(
        bus::connect(&url, "bench")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );

    // The node's maximum, and a journal to write.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
        .args([
            "bench",
            "--nats-url",
            &url,
            "--orders",
            &commands.to_string(),
            "--json",
        ])
        .output()
        .expect("agora bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "agora bench failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("agora bench prints its JSON line");
    let node_max = report["phases"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "max"))
        .and_then(|p| p["commands_per_sec"].as_f64())
        .unwrap_or(0.0);
    // A journal to write: the benchmark mix (workload (a)) in two markets, one command a
    // message, published with up to 2,000 awaiting acknowledgement.
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).expect("dir");
    let _node = Agora::node(
        &url,
        &node_dir,
        "node_id = \"w1\"\n[market_defaults]\ncid_window_secs = 0\n[[markets]]\nsymbol = \"FLOW-A\"\nprice_decimals = 2\nsize_decimals = 0\norders_max = 1000000\n[[markets]]\nsymbol = \"FLOW-B\"\nprice_decimals = 2\nsize_decimals = 0\norders_max = 1000000\n[[markets]]\nsymbol = \"WHALE-USD\"\nprice_decimals = 2\nsize_decimals = 0\norders_max = 1000000\n",
    );
    let mut pending = std::collections::VecDeque::new();
    for (i, market) in ["FLOW-A", "FLOW-B"].iter().enumerate() {
        let w = agora::workload::generate(&agora::workload::FlowParams::small_book(
            7 + i as u64,
            commands / 2,
        ));
        for c in w.prefill.iter().chain(&w.commands) {
            let bytes = rmp_serde::to_vec_named(&agora::wire::WireCommandOut::from_command(
                &w.spec, c, false,
            ))
            .expect("encode");
            let ack = js
                .publish(format!("agora.orders.{market}"), bytes.into())
                .await
                .expect("publish sent");
            pending.push_back(ack);
            if pending.len() >= 2000
                && let Some(a) = pending.pop_front()
            {
                a.await.expect("publish acknowledged");
            }
        }
    }
    for a in pending {
        a.await.expect("publish acknowledged");
    }
    let mut target = 0;
    while target < journaled_target(&js).await {
        tokio::time::sleep(Duration::from_millis(200)).await;
        target = journaled(&js).await;
    }

    let pg = Postgres::start();
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    println!("journal: {target} commands; node end-to-end maximum {node_max:.0} commands/s");
    for (name, db) in [("sqlite", sqlite.clone()), ("postgres", pg.url.clone())] {
        let (secs, n, r) = catch_up(&url, &db, &dir.path().join(name), target).await;
        println!(
            "{name:9} wrote {n} commands ({r} rows) in {secs:.2} s from taking the role: {:.0} commands/s, {:.0} rows/s, {:.2}x the node's maximum",
            n as f64 / secs,
            r as f64 / secs,
            n as f64 / secs / node_max.max(1.0)
        );
    }

    // An account with many historic orders: resting buys that never cross, 100 a message.
    let spec_market = "WHALE-USD";
    let batches: Vec<Value> = (0..whale_orders)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|c| {
            json!({"op": "batch", "commands": c.iter().map(|k| json!({
                "op": "new", "account": "whale", "side": "buy", "type": "limit", "tif": "gtc",
                "price": format!("{}.{:02}", 10 + k % 50, k % 100), "qty": "1",
            })).collect::<Vec<_>>()})
        })
        .collect();
    for b in &batches {
        common::publish(&js, spec_market, b.clone()).await;
    }
    common::wait_journal(
        &js,
        spec_market,
        batches.len() as u64,
        Duration::from_secs(600),
    )
    .await;
    let target = journaled(&js).await;
    let client = bus::connect(&url, "bench-q")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (name, db) in [("sqlite", sqlite), ("postgres", pg.url.clone())] {
        let mut history = Agora::spawn(&[
            "history",
            "--nats-url",
            &url,
            "--database",
            &db,
            "--data-dir",
            &dir.path().join(format!("{name}-q")).display().to_string(),
        ]);
        history.wait_line(|l| l.contains("writing"), Duration::from_secs(60));
        let store = Store::open(&db).await.unwrap_or_else(|e| panic!("{e}"));
        while written(&store).await < target {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let newest = query_latency(&client, json!({"limit": 100}), 300).await;
        let middle = store
            .select(
                &format!(
                    "SELECT created_ts FROM orders WHERE account = 'whale' ORDER BY created_ts LIMIT 1 OFFSET {}",
                    whale_orders / 2
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .first()
            .and_then(|r| r.first())
            .and_then(|c| c.int())
            .unwrap_or(0);
        let deep = query_latency(
            &client,
            json!({"limit": 100, "before": middle, "market": spec_market}),
            300,
        )
        .await;
        let one = query_latency(&client, json!({"limit": 1}), 300).await;
        println!(
            "{name:9} history of an account with {whale_orders} orders: newest 100 p50 {:.2} ms p99 {:.2} ms ({} items); 100 of one market before a time p50 {:.2} ms p99 {:.2} ms; newest 1 p50 {:.2} ms p99 {:.2} ms",
            newest.0, newest.1, newest.2, deep.0, deep.1, one.0, one.1
        );
        let _ = history.terminate(Duration::from_secs(20));
    }
}
