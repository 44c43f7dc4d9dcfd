//! The cluster measured from outside, with real `agora node` processes on a local nats-server
//! (the patterns of `tests/cluster/`):
//!
//! - **moves**: the pause of a planned `market.move` (the reply's `pause_ms`) between two nodes
//!   with a book of resting orders that do not cross, idle and under a light order flow; with
//!   `AGORA_CBENCH_MOVE_WINDOW` orders with a cid sent first (IOC, far from the book), so the
//!   market's cid window holds that many entries when it moves;
//! - **failover**: from `kill -9` of a market's owner to the first execution report received
//!   after it (the new owner's recovery republish counts), under a light order flow, for each
//!   heartbeat/lease setting (`AGORA_CBENCH_FAILOVER`, pairs `hb/lease`), with
//!   `AGORA_CBENCH_STANDBYS` warm copies a market; the killed node is started again between
//!   kills;
//! - **startup**: markets × resting orders on one node, stopped cleanly (final snapshots), then
//!   started again: time to its `ready` line and its RSS. The fill goes
//!   `AGORA_CBENCH_FILL_WAVE` markets at a time (100).
//! - **flood**: order → report latency on a market with a deep book (`AGORA_CBENCH_FLOOD_LEVELS`
//!   price levels) and on a shallow market of the same node, before, during and after a flood
//!   of book snapshot requests (`AGORA_CBENCH_FLOOD_CONNS` connections × 8 requests in flight,
//!   for `AGORA_CBENCH_FLOOD_SECS`).
//!
//! Sizes come from `AGORA_CBENCH_*` variables (see `Settings::from_env`); the defaults finish in
//! a few minutes. Needs `nats-server` on `PATH` (or `$AGORA_NATS_SERVER`); installs nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agora::bus::{self, LocalServer};
use async_nats::jetstream;
use common::Agora;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// What to run, and how big.
struct Settings {
    parts: Vec<String>,
    /// Resting orders in the moved market.
    resting: usize,
    /// Moves per phase (idle, then under flow).
    moves: usize,
    /// Commands a second of the flow during moves.
    move_rate: u64,
    /// Orders with a cid sent before the moves: entries in the moved market's cid window.
    move_window: usize,
    /// Kills per failover setting.
    kills: usize,
    /// `heartbeat_ms/lease_ms` pairs.
    failover: Vec<(u64, u64)>,
    failover_resting: usize,
    failover_rate: u64,
    /// Warm standby copies per market during the failover runs (`[cluster] standbys`).
    failover_standbys: u32,
    /// `markets x orders` pairs.
    startup: Vec<(usize, usize)>,
    /// Markets the start-up bench fills at once.
    startup_fill_wave: usize,
    flood_levels: usize,
    flood_conns: usize,
    flood_secs: u64,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match var(name) {
        Some(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        None => default,
    }
}

fn pairs(name: &str, default: &str, sep: char) -> Vec<(u64, u64)> {
    var(name)
        .unwrap_or_else(|| default.to_string())
        .split(',')
        .map(|p| {
            let (a, b) = p
                .trim()
                .split_once(sep)
                .unwrap_or_else(|| panic!("{name}: {p:?} is not A{sep}B"));
            let parse = |s: &str| {
                s.trim()
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
            };
            (parse(a), parse(b))
        })
        .collect()
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            parts: var("AGORA_CBENCH_PARTS")
                .unwrap_or_else(|| "moves,failover,startup,flood".into())
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
            resting: num("AGORA_CBENCH_RESTING", 20_000),
            moves: num("AGORA_CBENCH_MOVES", 20),
            move_rate: num("AGORA_CBENCH_MOVE_RATE", 500),
            move_window: num("AGORA_CBENCH_MOVE_WINDOW", 0),
            kills: num("AGORA_CBENCH_KILLS", 5),
            failover: pairs("AGORA_CBENCH_FAILOVER", "100/500,50/300", '/'),
            failover_resting: num("AGORA_CBENCH_FAILOVER_RESTING", 2_000),
            failover_rate: num("AGORA_CBENCH_FAILOVER_RATE", 300),
            failover_standbys: num("AGORA_CBENCH_STANDBYS", 0),
            startup: pairs("AGORA_CBENCH_STARTUP", "20x2000,200x100", 'x')
                .into_iter()
                .map(|(m, o)| (m as usize, o as usize))
                .collect(),
            startup_fill_wave: num("AGORA_CBENCH_FILL_WAVE", 100),
            flood_levels: num("AGORA_CBENCH_FLOOD_LEVELS", 40_000),
            flood_conns: num("AGORA_CBENCH_FLOOD_CONNS", 8),
            flood_secs: num("AGORA_CBENCH_FLOOD_SECS", 20),
        }
    }

    fn runs(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

/// p50, p99 (nearest rank) and max of some samples, in ms.
struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Stats {
    fn of(samples: &[f64]) -> Stats {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            if s.is_empty() {
                f64::NAN
            } else {
                s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
            }
        };
        Stats {
            n: s.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn row(&self, what: &str) -> String {
        format!(
            "{what:<52} {:>4} {:>9.1} {:>9.1} {:>9.1}",
            self.n, self.p50, self.p99, self.max
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A nats-server and `agora node` processes, each in a directory of its own under `dir`.
struct Cluster {
    dir: tempfile::TempDir,
    server: LocalServer,
    nodes: BTreeMap<String, Agora>,
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| {
            eprintln!(
                "cluster bench: cannot start nats-server ({e}).\nInstall nats-server (https://docs.nats.io/running-a-nats-service/introduction/installation) on PATH, or set AGORA_NATS_SERVER to its path."
            );
            std::process::exit(2)
        });
        let client = bus::connect(&server.url(), "cluster-bench")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let js = jetstream::new(client.clone());
        Cluster {
            dir,
            server,
            nodes: BTreeMap::new(),
            client,
            js,
        }
    }

    fn node_dir(&self, id: &str) -> PathBuf {
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(&dir).expect("node dir");
        dir
    }

    /// Starts (or starts again, with its data) node `id`; returns once it printed `ready`.
    fn start_node(&mut self, id: &str, config: &str) {
        let dir = self.node_dir(id);
        let node = Agora::node(&self.server.url(), &dir, config);
        self.nodes.insert(id.to_string(), node);
    }

    fn kill(&mut self, id: &str) {
        if let Some(mut node) = self.nodes.remove(id) {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }

    /// A control request (MessagePack both ways); the reply as JSON.
    async fn ctl(&self, verb: &str, body: Value) -> Value {
        let bytes = rmp_serde::to_vec_named(&body).expect("msgpack");
        let request = async_nats::Request::new()
            .payload(bytes.into())
            .timeout(Some(Duration::from_secs(90)));
        let reply = self
            .client
            .send_request(format!("agora.ctl.{verb}"), request)
            .await
            .unwrap_or_else(|e| panic!("ctl {verb} {body}: {e}"));
        rmp_serde::from_slice(&reply.payload).expect("ctl reply")
    }

    /// Where placement says `market` runs, and at which epoch.
    async fn placed(&self, market: &str) -> (String, u64) {
        let kv = self
            .js
            .get_key_value("agora_placement")
            .await
            .expect("placement bucket");
        let bytes = kv.get(market).await.expect("read").expect("placed");
        let v: Value = serde_json::from_slice(&bytes).expect("json");
        (
            v["node"].as_str().expect("node").to_string(),
            v["epoch"].as_u64().expect("epoch"),
        )
    }

    /// Every message on `subject` (core NATS), stamped when it arrived.
    async fn stamped(&self, subject: &str) -> mpsc::UnboundedReceiver<(Instant, Value)> {
        let mut sub = self
            .client
            .subscribe(subject.to_string())
            .await
            .expect("subscribe");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let at = Instant::now();
                let v = rmp_serde::from_slice(&m.payload).unwrap_or(Value::Null);
                if tx.send((at, v)).is_err() {
                    break;
                }
            }
        });
        rx
    }
}

/// A node's configuration: `[cluster]` lines, snapshots, the markets; no load moves.
fn node_config(id: &str, cluster: &str, markets: &[String]) -> String {
    let mut c = format!(
        "node_id = \"{id}\"\n[cluster]\n{cluster}\nrebalance_every_secs = 0\n[tracing]\nenabled = false\n"
    );
    for m in markets {
        c.push_str(&format!(
            "\n[[markets]]\nsymbol = \"{m}\"\nprice_decimals = 2\nsize_decimals = 0\n"
        ));
    }
    c
}

/// `n` resting orders that never cross (bids 90.00..99.99, asks 100.01..110.00, 1,000 lots
/// each), as batch messages of up to 100 commands (MessagePack).
fn resting_batches(n: usize) -> Vec<Vec<u8>> {
    common::resting_batches(n, 1000, 8)
        .iter()
        .map(|b| rmp_serde::to_vec_named(b).expect("msgpack"))
        .collect()
}

/// `n` IOC buys with a cid, far below the book (each is cancelled at once and leaves its
/// (account, cid) in the market's cid window), over 100 accounts, as batch messages of 100.
fn window_batches(n: usize) -> Vec<Vec<u8>> {
    let orders: Vec<Value> = (0..n)
        .map(|k| {
            json!({
                "op": "new",
                "account": format!("w-{}", k % 100),
                "cid": format!("w{k}"),
                "side": "buy",
                "type": "limit",
                "tif": "ioc",
                "price": "1.00",
                "qty": "1",
            })
        })
        .collect();
    orders
        .chunks(100)
        .map(|c| rmp_serde::to_vec_named(&json!({"op": "batch", "commands": c})).expect("msgpack"))
        .collect()
}

/// Checks that the window filled by `window_batches` still holds its first order: sent
/// again, it is refused `duplicate_cid`.
async fn window_holds_first(c: &Cluster, market: &str) {
    let mut reports = c
        .client
        .subscribe(format!("agora.execs.w-0.{market}"))
        .await
        .expect("subscribe");
    c.client.flush().await.expect("flush");
    let again = json!({"op": "new", "account": "w-0", "cid": "w0", "side": "buy",
        "type": "limit", "tif": "ioc", "price": "1.00", "qty": "1"});
    let bytes = rmp_serde::to_vec_named(&again).expect("msgpack");
    c.js.publish(format!("agora.orders.{market}"), bytes.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let m = tokio::time::timeout(Duration::from_secs(30), reports.next())
        .await
        .expect("a report within 30 s")
        .expect("subscription");
    let v: Value = rmp_serde::from_slice(&m.payload).unwrap_or(Value::Null);
    assert!(
        v.to_string().contains("duplicate_cid"),
        "the cid window does not hold the first order: {v}"
    );
}

/// Publishes `messages` to each market's order subject with JetStream, acks pipelined.
async fn publish_all(js: &jetstream::Context, markets: &[String], messages: &[Vec<u8>]) {
    let mut acks = Vec::new();
    for market in markets {
        let subject = format!("agora.orders.{market}");
        for m in messages {
            acks.push(
                js.publish(subject.clone(), m.clone().into())
                    .await
                    .expect("publish"),
            );
            if acks.len() >= 512 {
                for a in acks.drain(..) {
                    a.await.expect("ack");
                }
            }
        }
    }
    for a in acks {
        a.await.expect("ack");
    }
}

async fn journal_last_seq(js: &jetstream::Context, market: &str) -> Option<u64> {
    let events = js.get_stream("EVENTS").await.ok()?;
    let last = events
        .get_last_raw_message_by_subject(&format!("agora.events.{market}"))
        .await
        .ok()?;
    let head: Value = rmp_serde::from_slice(&last.payload).ok()?;
    head["last_seq"].as_u64()
}

async fn wait_journal(js: &jetstream::Context, market: &str, seq: u64, timeout: Duration) {
    let started = Instant::now();
    while journal_last_seq(js, market).await < Some(seq) {
        assert!(
            started.elapsed() < timeout,
            "the journal of {market} never reached {seq} (at {:?})",
            journal_last_seq(js, market).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A light taker flow on `market` until `stop`: IOC orders of 1 lot that cross the book
/// (buy at 105.00, sell at 95.00, alternately), `rate` a second in windows of 10 whose acks are
/// awaited together. Returns the commands acknowledged.
fn flow(
    js: &jetstream::Context,
    market: &str,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let (js, subject) = (js.clone(), format!("agora.orders.{market}"));
    let sent = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        let started = Instant::now();
        let mut k = 0u64;
        let mut window = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut acks = Vec::new();
            for _ in 0..10 {
                let (side, price) = if k.is_multiple_of(2) {
                    ("buy", "105.00")
                } else {
                    ("sell", "95.00")
                };
                k += 1;
                let c = json!({"op": "new", "account": "taker-1", "side": side, "type": "limit",
                    "tif": "ioc", "price": price, "qty": "1"});
                let bytes = rmp_serde::to_vec_named(&c).expect("msgpack");
                if let Ok(ack) = js.publish(subject.clone(), bytes.into()).await {
                    acks.push(ack);
                }
            }
            for ack in acks {
                if ack.await.is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            window += 1;
            let due = Duration::from_secs_f64(window as f64 * 10.0 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        sent.load(Ordering::Relaxed)
    })
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

// ----- moves --------------------------------------------------------------------------------

async fn bench_moves(s: &Settings, out: &mut Vec<String>) {
    let market = "MOVE-USD".to_string();
    let markets = vec![market.clone()];
    let cluster_lines = "heartbeat_ms = 100\nlease_ms = 500";
    let mut c = Cluster::start().await;
    for id in ["n1", "n2"] {
        c.start_node(id, &node_config(id, cluster_lines, &markets));
    }
    let mut batches = resting_batches(s.resting);
    batches.extend(window_batches(s.move_window));
    let n = batches.len() as u64;
    let filling = Instant::now();
    publish_all(&c.js, &markets, &batches).await;
    wait_journal(&c.js, &market, n, Duration::from_secs(300)).await;
    println!(
        "moves: {} resting orders and {} in the cid window in {n} batches, journaled in {:.1} s",
        s.resting,
        s.move_window,
        filling.elapsed().as_secs_f64()
    );
    if s.move_window > 0 {
        window_holds_first(&c, &market).await;
    }
    for (phase, rate) in [("idle", 0), ("flow", s.move_rate)] {
        let stop = Arc::new(AtomicBool::new(false));
        let flowing = (rate > 0).then(|| flow(&c.js, &market, rate, stop.clone()));
        if flowing.is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (mut pauses, mut walls, mut lags) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..s.moves {
            let (owner, _) = c.placed(&market).await;
            let to = if owner == "n1" { "n2" } else { "n1" };
            let asked = Instant::now();
            let reply = c
                .ctl("market.move", json!({"symbol": market, "node": to}))
                .await;
            let wall = ms(asked.elapsed());
            assert_eq!(reply["ok"], true, "market.move to {to}: {reply}");
            let pause = reply["pause_ms"].as_f64().expect("pause_ms");
            pauses.push(pause);
            walls.push(wall);
            lags.push(reply["lag"].as_f64().unwrap_or(f64::NAN));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let sent = match flowing {
            Some(f) => f.await.expect("flow"),
            None => 0,
        };
        println!("moves ({phase}): pause_ms {pauses:?}");
        println!("moves ({phase}): lag at release {lags:?}; flow commands acked {sent}");
        let label = if rate > 0 {
            format!("{rate} cmd/s")
        } else {
            "idle".into()
        };
        let book = if s.move_window > 0 {
            format!("{} resting, {} in the cid window", s.resting, s.move_window)
        } else {
            format!("{} resting", s.resting)
        };
        out.push(Stats::of(&pauses).row(&format!("move pause_ms, {book}, {label}")));
        out.push(Stats::of(&walls).row(&format!("move request wall ms, {book}, {label}")));
    }
}

// ----- failover -----------------------------------------------------------------------------

/// Reports that arrive this soon after the kill were on their way from the dead owner.
const IN_FLIGHT: Duration = Duration::from_millis(50);

async fn bench_failover(s: &Settings, heartbeat: u64, lease: u64, out: &mut Vec<String>) {
    let market = "FAIL-USD".to_string();
    let markets = vec![market.clone()];
    let standbys = s.failover_standbys;
    let cluster_lines =
        format!("heartbeat_ms = {heartbeat}\nlease_ms = {lease}\nstandbys = {standbys}");
    let mut c = Cluster::start().await;
    for id in ["n1", "n2", "n3"] {
        c.start_node(id, &node_config(id, &cluster_lines, &markets));
    }
    // n1 holds the rebalancer lease (first up) and, drained, no market: each kill is of a plain
    // owner, and the market goes back and forth between n2 and n3.
    let reply = c.ctl("node.drain", json!({"node": "n1"})).await;
    assert_eq!(reply["ok"], true, "node.drain n1: {reply}");
    let batches = resting_batches(s.failover_resting);
    let n = batches.len() as u64;
    publish_all(&c.js, &markets, &batches).await;
    wait_journal(&c.js, &market, n, Duration::from_secs(120)).await;

    let mut execs = c.stamped("agora.execs.>").await;
    let mut status = c.stamped(&format!("agora.status.{market}")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let flowing = flow(&c.js, &market, s.failover_rate, stop.clone());
    let (mut to_report, mut to_active) = (Vec::new(), Vec::new());
    for i in 0..s.kills {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (owner, epoch) = c.placed(&market).await;
        assert_ne!(owner, "n1", "the drained node got the market");
        while execs.try_recv().is_ok() {}
        while status.try_recv().is_ok() {}
        let killed = Instant::now();
        c.kill(&owner);
        let first = loop {
            let (at, _) = tokio::time::timeout(Duration::from_secs(30), execs.recv())
                .await
                .expect("no report within 30 s of the kill")
                .expect("execs subscription");
            if at > killed + IN_FLIGHT {
                break at - killed;
            }
        };
        let (active, new_owner) = loop {
            let (at, v) = tokio::time::timeout(Duration::from_secs(30), status.recv())
                .await
                .expect("no active status within 30 s of the kill")
                .expect("status subscription");
            if v["state"] == "active"
                && v["node"] != owner.as_str()
                && v["epoch"].as_u64().unwrap_or(0) > epoch
            {
                break (at - killed, v["node"].as_str().unwrap_or("?").to_string());
            }
        };
        println!(
            "failover {heartbeat}/{lease} #{i}: {owner} -> {new_owner}: first report {:.1} ms, active {:.1} ms",
            ms(first),
            ms(active)
        );
        to_report.push(ms(first));
        to_active.push(ms(active));
        c.start_node(&owner, &node_config(&owner, &cluster_lines, &markets));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flowing.await.expect("flow");
    println!("failover {heartbeat}/{lease}: flow commands acked {sent}");
    out.push(Stats::of(&to_report).row(&format!(
        "failover kill->first report ms, hb {heartbeat} lease {lease} standbys {standbys}"
    )));
    out.push(Stats::of(&to_active).row(&format!(
        "failover kill->active status ms, hb {heartbeat} lease {lease} standbys {standbys}"
    )));
}

// ----- snapshot flood -----------------------------------------------------------------------

/// Order → first report latencies (ms) on `market`: `n` IOC sells far above the book (accepted,
/// then cancelled), `per_sec` a second, timed from the publish to the report's arrival.
async fn probe(c: &Cluster, market: &str, n: usize, per_sec: u64) -> Vec<f64> {
    let mut reports = c
        .client
        .subscribe(format!("agora.execs.probe.{market}"))
        .await
        .expect("subscribe");
    c.client.flush().await.expect("flush");
    let subject = format!("agora.orders.{market}");
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let order = json!({"op": "new", "account": "probe", "side": "sell", "type": "limit",
            "tif": "ioc", "price": "9999.00", "qty": "1"});
        let bytes = rmp_serde::to_vec_named(&order).expect("msgpack");
        let sent = Instant::now();
        let ack =
            c.js.publish(subject.clone(), bytes.into())
                .await
                .expect("publish");
        let seq = ack.await.expect("ack").sequence;
        let arrived = loop {
            let m = tokio::time::timeout(Duration::from_secs(120), reports.next())
                .await
                .expect("a report within 120 s")
                .expect("subscription");
            let v: Value = rmp_serde::from_slice(&m.payload).unwrap_or(Value::Null);
            let ours = v["reports"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["seq"].as_u64() == Some(seq)));
            if ours {
                break Instant::now();
            }
        };
        out.push(ms(arrived - sent));
        tokio::time::sleep(Duration::from_millis(1000 / per_sec.max(1))).await;
    }
    out
}

async fn bench_flood(s: &Settings, out: &mut Vec<String>) {
    let (deep, near) = ("DEEP-USD".to_string(), "NEAR-USD".to_string());
    let markets = vec![deep.clone(), near.clone()];
    let mut c = Cluster::start().await;
    c.start_node("n1", &node_config("n1", "", &markets));
    // `flood_levels` bids at distinct prices (1.00, 1.01, ...), in batch messages of 100.
    let orders: Vec<Value> = (0..s.flood_levels)
        .map(|i| {
            json!({"op": "new", "account": format!("mm-{}", i % 50), "side": "buy",
                "price": format!("{}.{:02}", 1 + i / 100, i % 100), "qty": "1"})
        })
        .collect();
    let batches: Vec<Vec<u8>> = orders
        .chunks(100)
        .map(|chunk| {
            rmp_serde::to_vec_named(&json!({"op": "batch", "commands": chunk})).expect("msgpack")
        })
        .collect();
    let n = batches.len() as u64;
    publish_all(&c.js, std::slice::from_ref(&deep), &batches).await;
    wait_journal(&c.js, &deep, n, Duration::from_secs(300)).await;

    for body in ["", r#"{"depth": 5000}"#] {
        let Ok(reply) = c
            .client
            .request(format!("agora.book.{deep}.snapshot"), body.into())
            .await
        else {
            println!("flood: a request {body:?} is not answered");
            continue;
        };
        let v: Value = rmp_serde::from_slice(&reply.payload).unwrap_or(Value::Null);
        println!(
            "flood: a request {body:?} is answered with {} bytes: {}",
            reply.payload.len(),
            v.get("error").map_or_else(
                || format!("{} bid levels", v["bids"].as_array().map_or(0, Vec::len)),
                |e| format!("{e}")
            )
        );
    }
    let mut phases: Vec<(&str, Vec<f64>, Vec<f64>)> = Vec::new();
    let before_deep = probe(&c, &deep, 100, 20).await;
    let before_near = probe(&c, &near, 100, 20).await;
    phases.push(("before", before_deep, before_near));

    // The flood: connections each sending `FLOOD_RATE` requests a second without waiting for
    // answers (as a hostile client would), half for the whole book and half for the best 5,000
    // levels a side; the answers are counted by kind as they come.
    const FLOOD_RATE: u64 = 2_000;
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let mut flooders = Vec::new();
    for _ in 0..s.flood_conns {
        let client = bus::connect(&c.server.url(), "flood")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let inbox = client.new_inbox();
        let mut answers = client
            .subscribe(format!("{inbox}.*"))
            .await
            .expect("subscribe");
        let counting = counts.clone();
        flooders.push(tokio::spawn(async move {
            // 0: levels, 1: rate_limited, 2: too_large, 3: anything else.
            while let Some(m) = answers.next().await {
                let v: Value = rmp_serde::from_slice(&m.payload).unwrap_or(Value::Null);
                let kind = match v["error"].as_str() {
                    None if v["bids"].is_array() => 0,
                    Some("rate_limited") => 1,
                    Some("too_large") => 2,
                    _ => 3,
                };
                counting[kind].fetch_add(1, Ordering::Relaxed);
            }
        }));
        let (stop, subject) = (stop.clone(), format!("agora.book.{deep}.snapshot"));
        flooders.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = if k.is_multiple_of(2) {
                    ""
                } else {
                    r#"{"depth": 5000}"#
                };
                let _ = client
                    .publish_with_reply(subject.clone(), format!("{inbox}.{k}"), body.into())
                    .await;
                k += 1;
                if k.is_multiple_of(100) {
                    let due = Duration::from_secs_f64(k as f64 / FLOOD_RATE as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            let _ = client.flush().await;
        }));
    }
    let started = Instant::now();
    let per = (s.flood_secs * 20 / 2).max(10) as usize;
    let during_deep = probe(&c, &deep, per / 2, 20).await;
    let during_near = probe(&c, &near, per / 2, 20).await;
    if let Some(left) = Duration::from_secs(s.flood_secs).checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    stop.store(true, Ordering::Relaxed);
    let flood_secs = started.elapsed().as_secs();
    // Answers still on their way count too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for f in flooders {
        f.abort();
    }
    let count = |i: usize| counts[i].load(Ordering::Relaxed);
    println!(
        "flood: {flood_secs} s of {} requests a second: {} answered with levels, {} rate_limited, {} too_large, {} other",
        FLOOD_RATE * s.flood_conns as u64,
        count(0),
        count(1),
        count(2),
        count(3)
    );
    phases.push(("during", during_deep, during_near));
    let after_deep = probe(&c, &deep, 100, 20).await;
    let after_near = probe(&c, &near, 100, 20).await;
    phases.push(("after", after_deep, after_near));
    for (phase, d, n) in &phases {
        out.push(Stats::of(d).row(&format!(
            "flood {phase}: order->report ms, {} levels",
            s.flood_levels
        )));
        out.push(Stats::of(n).row(&format!("flood {phase}: order->report ms, other market")));
    }
}

// ----- start-up -----------------------------------------------------------------------------

/// Runs `agora node` in `dir` (configuration written there) and waits for its ready line.
fn spawn_node(url: &str, dir: &Path, config: &str, timeout: Duration) -> (Agora, Duration, usize) {
    let path = dir.join("node.toml");
    std::fs::write(&path, config).expect("write config");
    let data = dir.join("data");
    let started = Instant::now();
    let node = Agora::spawn(&[
        "node".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
        "--nats-url".as_ref(),
        url.as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ]);
    let line = node.wait_line(|l| l.contains(" ready: "), timeout);
    let took = started.elapsed();
    let here = line
        .split("markets here: ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .map(|r| r.split(", ").filter(|m| m.ends_with("-USD")).count())
        .unwrap_or(0);
    (node, took, here)
}

/// Waits until the node's `/ready` answers 200 (every market here running and caught up).
fn wait_ready(port: u16, timeout: Duration) -> bool {
    use std::io::{Read, Write};
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut answer = String::new();
            if c.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .is_ok()
                && c.read_to_string(&mut answer).is_ok()
                && answer.starts_with("HTTP/1.1 200")
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

async fn bench_startup(markets: usize, orders: usize, fill_wave: usize, out: &mut Vec<String>) {
    let symbols: Vec<String> = (0..markets).map(|i| format!("S{i:04}-USD")).collect();
    // Node records carry every market's figures: with many markets, slower heartbeats.
    let cluster_lines = if markets > 200 {
        "heartbeat_ms = 1000\nlease_ms = 5000"
    } else {
        "heartbeat_ms = 100\nlease_ms = 500"
    };
    let port = bus::server::free_port().expect("a free port");
    // Snapshots only by command count and at the clean stop: every market's 30 s snapshot of
    // a full book (thousands of them at this scale) would compete with the fill, and the
    // restart reads the clean stop's snapshots either way.
    let config = format!(
        "http_port = {port}\n{}\n[snapshots]\nevery_secs = 0\n",
        node_config("n1", cluster_lines, &symbols)
    );
    let c = Cluster::start().await;
    let dir = c.node_dir("n1");
    let timeout = Duration::from_secs(600);
    let (node, first_start, _) = spawn_node(&c.server.url(), &dir, &config, timeout);
    let rss_empty = rss_kb(node.child.id()).unwrap_or(0);

    let batches = resting_batches(orders);
    let per_market = batches.len() as u64;
    let filling = Instant::now();
    // In waves of markets, each wave's journals complete before the next starts: nats-server
    // holds a write buffer (up to 8 MB) for each stream being written or read, and with
    // thousands of order streams filled at once while the node's consumers lag it outgrew
    // this machine's memory (20 GB at 2,000 markets).
    for wave in symbols.chunks(fill_wave.max(1)) {
        publish_all(&c.js, wave, &batches).await;
        for m in wave {
            wait_journal(&c.js, m, per_market, Duration::from_secs(1800)).await;
        }
    }
    let fill = filling.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_filled = rss_kb(node.child.id()).unwrap_or(0);

    // A clean stop: every market writes its final snapshot.
    let mut node = node;
    let stopping = Instant::now();
    node.signal(libc::SIGTERM);
    let status = node.child.wait().expect("wait");
    let stop = stopping.elapsed();
    if !status.success() {
        println!("startup {markets}x{orders}: the node stopped with {status}");
    }
    drop(node);

    let restarting = Instant::now();
    let (node, start, here) = spawn_node(&c.server.url(), &dir, &config, timeout);
    // The ready line waits at most 30 s for the markets; /ready says when they all run.
    let ready = wait_ready(port, timeout);
    let start_ready = restarting.elapsed();
    let rss_ready = rss_kb(node.child.id()).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_later = rss_kb(node.child.id()).unwrap_or(0);
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!(
        "startup {markets}x{orders}: first start {:.2} s (empty, RSS {:.0} MB); fill {:.1} s ({:.0} orders/s), RSS {:.0} MB; clean stop {:.2} s; start from snapshots {:.2} s to the ready line ({here} markets here), {:.2} s to /ready{}, RSS {:.0} MB then, {:.0} MB 2 s later",
        first_start.as_secs_f64(),
        mb(rss_empty),
        fill.as_secs_f64(),
        (markets * orders) as f64 / fill.as_secs_f64(),
        mb(rss_filled),
        stop.as_secs_f64(),
        start.as_secs_f64(),
        start_ready.as_secs_f64(),
        if ready { "" } else { " (NOT READY: timed out)" },
        mb(rss_ready),
        mb(rss_later),
    );
    assert!(ready, "/ready never answered 200");
    let total = (markets * orders) as f64;
    out.push(format!(
        "{:<14} {:>10} {:>9.2} {:>9.2} {:>9.0} {:>9.0} {:>9.0} {:>10.1}",
        format!("{markets}x{orders}"),
        markets * orders,
        first_start.as_secs_f64(),
        start_ready.as_secs_f64(),
        mb(rss_empty),
        mb(rss_filled),
        mb(rss_later),
        if total > 0.0 {
            (rss_later.saturating_sub(rss_empty) as f64 * 1024.0) / total
        } else {
            f64::NAN
        },
    ));
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let s = Settings::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut rows = Vec::new();
        if s.runs("moves") {
            bench_moves(&s, &mut rows).await;
        }
        if s.runs("failover") {
            for &(hb, lease) in &s.failover {
                bench_failover(&s, hb, lease, &mut rows).await;
            }
        }
        if s.runs("flood") {
            bench_flood(&s, &mut rows).await;
        }
        let mut startup = Vec::new();
        if s.runs("startup") {
            for &(m, o) in &s.startup {
                bench_startup(m, o, s.startup_fill_wave, &mut startup).await;
            }
        }
        println!();
        if !rows.is_empty() {
            println!(
                "{:<52} {:>4} {:>9} {:>9} {:>9}",
                "cluster (ms)", "n", "p50", "p99", "max"
            );
            for r in &rows {
                println!("{r}");
            }
        }
        if !startup.is_empty() {
            println!(
                "\n{:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
                "startup",
                "orders",
                "empty s",
                "snap s",
                "RSS0 MB",
                "RSSf MB",
                "RSSr MB",
                "B/order"
            );
            for r in &startup {
                println!("{r}");
            }
            println!(
                "empty s: first start, no orders; snap s: from spawning the node to /ready answering 200, from snapshots; RSS0: after the first start; RSSf: filled; RSSr: 2 s after the start from snapshots; B/order: (RSSr - RSS0) / orders"
            );
        }
    });
}
