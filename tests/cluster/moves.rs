//! Markets move between nodes under load by planned handoff, a killed node's markets resume
//! elsewhere, a paused owner that lost its market publishes nothing after it wakes, the
//! rebalancer's node can die, nodes drain, and a hot-added market goes to the least loaded
//! node; all on one nats-server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use crate::common::{PublicTally, stored_trades, wait_journal};
use crate::{
    Cluster, JOURNAL_WAIT, assert_never_active_again, check_exactly_once, check_journal, load,
    wait_sent, workload,
};

#[tokio::test]
async fn a_market_moves_between_nodes_under_load_losing_and_repeating_nothing() {
    let cluster = Cluster::start(3, "").await;
    let (owner, epoch) = cluster.placed("A-USD").await;
    assert_eq!(
        owner, "n1",
        "the first node up places the configured markets"
    );

    // An idle move first.
    let pause = cluster.move_market("B-USD", "n2");
    assert_eq!(cluster.placed("B-USD").await.0, "n2");
    println!("idle move: pause {pause:.2} ms");

    // Three moves while orders flow; a plain subscriber counts every trade and fill.
    let tally = PublicTally::start(&cluster.url()).await;
    let commands = workload(11, 3000);
    let total = commands.len() as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let flow = load(&cluster.js, "A-USD", commands, 1500, sent.clone());
    let mut pauses = Vec::new();
    for to in ["n2", "n3", "n1"] {
        wait_sent(&sent, total * (pauses.len() as u64 + 1) / 4, &flow).await;
        pauses.push(cluster.move_market("A-USD", to));
    }
    flow.await.expect("load");
    let (owner, last_epoch) = cluster.placed("A-USD").await;
    assert_eq!(owner, "n1");
    assert_eq!(last_epoch, epoch + 3, "each move raises the epoch once");
    println!("moves under load: pauses {pauses:?} ms");

    wait_journal(&cluster.js, "A-USD", total, JOURNAL_WAIT).await;
    let batches = check_journal(&cluster.js, "A-USD").await;
    let reports = check_exactly_once(&cluster.js, "A-USD").await;
    println!("A-USD: {total} commands, {batches} journal batches, {reports} reports");
    check_exactly_once(&cluster.js, "B-USD").await;
    let trades = stored_trades(&cluster.js).await;
    let fills = tally.check(trades, Duration::from_secs(10)).await;
    println!("a plain subscriber saw {trades} trades and {fills} fills, each once");

    for (node, markets) in [("n1", 1), ("n2", 1), ("n3", 0)] {
        let row = cluster.node_row(node);
        assert_eq!(row["markets"], markets, "{row}");
    }
    // The nodes that answered the moves counted them, with their pauses.
    assert_eq!(cluster.metric("matching_handoffs_total"), 4.0);
    assert_eq!(cluster.metric("matching_handoff_pause_us_count"), 4.0);
    assert_eq!(cluster.metric("matching_failovers_total"), 0.0);
}

#[tokio::test]
async fn a_killed_node_s_markets_resume_elsewhere_with_every_order_once() {
    let mut cluster = Cluster::start(3, "").await;
    cluster.move_market("A-USD", "n2");
    let (_, epoch) = cluster.placed("A-USD").await;
    let mut status = cluster.status("A-USD").await;

    let tally = PublicTally::start(&cluster.url()).await;
    let commands = workload(12, 2500);
    let total = commands.len() as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let flow = load(&cluster.js, "A-USD", commands, 1500, sent.clone());
    wait_sent(&sent, total / 3, &flow).await;
    let killed = Instant::now();
    cluster.kill("n2");
    let new_owner = cluster
        .wait_active(&mut status, "n2", epoch + 1, Duration::from_secs(20))
        .await;
    println!(
        "A-USD failed over from n2 to {new_owner} in {:?} (lease 1.5 s)",
        killed.elapsed()
    );
    flow.await.expect("load");
    wait_journal(&cluster.js, "A-USD", total, JOURNAL_WAIT).await;
    check_journal(&cluster.js, "A-USD").await;
    check_exactly_once(&cluster.js, "A-USD").await;
    assert_eq!(
        cluster.metric("matching_takeover_us_count{kind=\"failover\"}"),
        1.0,
        "the new owner timed its takeover"
    );

    // Now the node holding the rebalancer lease (n1, the first up) dies with B-USD: n3 takes
    // the lease and the market.
    let (ok, nodes) = cluster.ctl(&["node.list"]);
    assert!(ok);
    assert_eq!(nodes["rebalancer"], "n1", "{nodes}");
    assert_eq!(
        cluster.metric("matching_failovers_total"),
        1.0,
        "the rebalancer counted the failover"
    );
    let (b_owner, b_epoch) = cluster.placed("B-USD").await;
    assert_eq!(b_owner, "n1");
    let mut b_status = cluster.status("B-USD").await;
    let survivor = if new_owner == "n1" {
        "n3"
    } else {
        new_owner.as_str()
    };
    cluster.kill("n1");
    let b_new = cluster
        .wait_active(&mut b_status, "n1", b_epoch + 1, Duration::from_secs(30))
        .await;
    assert_eq!(b_new, "n3");
    if new_owner == "n1" {
        // A-USD was on n1 too: it went with it.
        let a = cluster
            .wait_active(&mut status, "n1", epoch + 2, Duration::from_secs(30))
            .await;
        assert_eq!(a, "n3");
    }
    let (ok, nodes) = cluster.ctl(&["node.list"]);
    assert!(ok);
    assert_eq!(nodes["rebalancer"], survivor, "{nodes}");
    let more = workload(13, 300);
    let n = more.len() as u64;
    load(&cluster.js, "B-USD", more, 2000, Arc::default())
        .await
        .expect("load");
    wait_journal(&cluster.js, "B-USD", n, JOURNAL_WAIT).await;
    check_exactly_once(&cluster.js, "B-USD").await;
    check_exactly_once(&cluster.js, "A-USD").await;
    // A market is not moved to a dead node: once node.list shows n1 dead, a move there is
    // refused (after waiting one lease for a heartbeat that does not come), saying how old
    // its last one is.
    cluster.wait_node_alive("n1", false).await;
    let (ok, reply) = cluster.ctl(&["market.move", "B-USD", "--to", "n1"]);
    assert!(!ok, "{reply}");
    assert_eq!(reply["error"], "unknown_node", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("last heartbeat")),
        "{reply}"
    );

    // Two kills, and a plain subscriber of the public subjects saw each trade and fill once.
    let trades = stored_trades(&cluster.js).await;
    let fills = tally.check(trades, Duration::from_secs(10)).await;
    println!("a plain subscriber saw {trades} trades and {fills} fills, each once");
}

#[tokio::test]
async fn a_paused_owner_publishes_nothing_after_it_lost_the_market() {
    let cluster = Cluster::start(2, "").await;
    cluster.move_market("A-USD", "n2");
    let (_, epoch) = cluster.placed("A-USD").await;
    let mut status = cluster.status("A-USD").await;
    let commands = workload(14, 2500);
    let total = commands.len() as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let flow = load(&cluster.js, "A-USD", commands, 1200, sent.clone());
    wait_sent(&sent, total / 4, &flow).await;
    cluster.signal("n2", libc::SIGSTOP);
    let owner = cluster
        .wait_active(&mut status, "n2", epoch + 1, Duration::from_secs(20))
        .await;
    assert_eq!(owner, "n1");
    // Let the new owner work a little, then wake the old one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.signal("n2", libc::SIGCONT);
    let woke = Instant::now();
    flow.await.expect("load");
    assert_never_active_again(&mut status, "n2", woke + Duration::from_secs(3), "waking").await;
    assert_eq!(cluster.placed("A-USD").await.0, "n1");
    wait_journal(&cluster.js, "A-USD", total, JOURNAL_WAIT).await;
    check_journal(&cluster.js, "A-USD").await;
    check_exactly_once(&cluster.js, "A-USD").await;
    // n2 is a member again, with nothing.
    let n2 = cluster.node_row("n2");
    assert_eq!(n2["alive"], true, "{n2}");
    assert_eq!(n2["markets"], 0, "{n2}");
}

#[tokio::test]
async fn drained_nodes_empty_and_new_markets_go_to_the_least_loaded() {
    let cluster = Cluster::start(3, "").await;
    // n1 holds both configured markets; n2 and n3 none: a new market goes to one of them.
    let spec = cluster.dir.path().join("c.toml");
    std::fs::write(
        &spec,
        "symbol = \"C-USD\"\nprice_decimals = 2\nsize_decimals = 0\n",
    )
    .expect("write");
    let (ok, reply) = cluster.ctl(&["market.add", "--spec", spec.to_str().expect("utf-8")]);
    assert!(ok, "{reply}");
    let c_node = reply["node"].as_str().expect("node").to_string();
    assert!(c_node == "n2" || c_node == "n3", "{reply}");
    std::fs::write(
        &spec,
        "symbol = \"D-USD\"\nprice_decimals = 2\nsize_decimals = 0\n",
    )
    .expect("write");
    let (ok, reply) = cluster.ctl(&["market.add", "--spec", spec.to_str().expect("utf-8")]);
    assert!(ok, "{reply}");
    let d_node = reply["node"].as_str().expect("node").to_string();
    assert!(
        d_node != "n1" && d_node != c_node,
        "D-USD went to {d_node}: {reply}"
    );

    // Orders on A-USD before the drain; more after: it goes on where it went.
    let first = workload(15, 400);
    let n_first = first.len() as u64;
    load(&cluster.js, "A-USD", first, 3000, Arc::default())
        .await
        .expect("load");
    let (ok, reply) = cluster.ctl(&["node.drain", "n1"]);
    assert!(ok, "{reply}");
    let n1 = cluster.node_row("n1");
    assert_eq!(n1["markets"], 0, "{n1}");
    assert_eq!(n1["draining"], true, "{n1}");
    assert_ne!(cluster.placed("A-USD").await.0, "n1");
    assert_ne!(cluster.placed("B-USD").await.0, "n1");
    // The market list shows each market running where placement says.
    let (ok, list) = cluster.ctl(&["market.list"]);
    assert!(ok);
    for m in list["markets"].as_array().expect("markets") {
        assert_eq!(m["running"], true, "{m}");
        assert_ne!(m["node"], "n1", "{m}");
    }
    let (ok, _) = cluster.ctl(&["node.undrain", "n1"]);
    assert!(ok);
    let more = workload(16, 300);
    let n_more = more.len() as u64;
    load(&cluster.js, "A-USD", more, 3000, Arc::default())
        .await
        .expect("load");
    wait_journal(&cluster.js, "A-USD", n_first + n_more, JOURNAL_WAIT).await;
    check_journal(&cluster.js, "A-USD").await;
    check_exactly_once(&cluster.js, "A-USD").await;

    // Bad requests say what is wrong.
    let (ok, reply) = cluster.ctl(&["market.move", "A-USD", "--to", "n9"]);
    assert!(!ok);
    assert_eq!(reply["error"], "unknown_node");
    let (ok, reply) = cluster.ctl(&["market.move", "Z-USD", "--to", "n2"]);
    assert!(!ok);
    assert_eq!(reply["error"], "unknown_market", "{reply}");
    let (ok, reply) = cluster.ctl(&["node.drain", "n7"]);
    assert!(!ok);
    assert_eq!(reply["error"], "unknown_node");
}

/// xorshift64*: the chaos run's choices, from a seed it prints.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

const CHAOS_NATS: &str = "[nats]\nreconnect_delay_max_ms = 300";

/// Kills, pauses, moves and NATS restarts in a random order while orders flow on both
/// markets; every report still appears exactly once. `AGORA_CHAOS_SEED` repeats a run,
/// `AGORA_CHAOS_STEPS` (default 6) makes it longer.
#[tokio::test]
async fn a_seeded_random_run_of_kills_moves_pauses_and_restarts_loses_nothing() {
    let seed = std::env::var("AGORA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| agora::cluster::membership::unix_ms() | 1);
    let steps: usize = std::env::var("AGORA_CHAOS_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    println!("chaos seed {seed} ({steps} steps): AGORA_CHAOS_SEED={seed} repeats it");
    let mut rng = Rng(seed);
    let mut cluster = Cluster::start(3, CHAOS_NATS).await;
    cluster.move_market("B-USD", "n2");
    let per_step = 400;
    let a = workload(seed, per_step * steps + 200);
    let b = workload(seed + 1, per_step * steps + 200);
    let (na, nb) = (a.len() as u64, b.len() as u64);
    let rate = (per_step as u64) / 2;
    let flow_a = load(&cluster.js, "A-USD", a, rate, Arc::default());
    let flow_b = load(&cluster.js, "B-USD", b, rate, Arc::default());
    let ids = ["n1", "n2", "n3"];
    for step in 0..steps {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1000) as u64)).await;
        let node = ids[rng.below(3)];
        match rng.below(4) {
            0 => {
                println!("step {step}: kill -9 {node}, start it again");
                cluster.kill(node);
                tokio::time::sleep(Duration::from_millis(rng.below(2000) as u64)).await;
                cluster.start_node(node, CHAOS_NATS);
            }
            1 => {
                let market = ["A-USD", "B-USD"][rng.below(2)];
                let (ok, reply) = cluster.ctl(&["market.move", market, "--to", node]);
                if ok {
                    assert_eq!(reply["state_hash_equal"], true, "{reply}");
                }
                println!(
                    "step {step}: move {market} to {node}: {}",
                    if ok {
                        format!("pause {} ms", reply["pause_ms"])
                    } else {
                        format!("refused: {}", reply["message"])
                    }
                );
            }
            2 => {
                println!("step {step}: SIGSTOP {node} past its lease, then SIGCONT");
                cluster.signal(node, libc::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(2500)).await;
                cluster.signal(node, libc::SIGCONT);
            }
            _ => {
                println!("step {step}: restart nats-server");
                // Blocks this test's runtime (and its publishers) while NATS is down anyway.
                cluster.servers[0]
                    .restart()
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    flow_a.await.expect("load A-USD");
    flow_b.await.expect("load B-USD");
    wait_journal(&cluster.js, "A-USD", na, JOURNAL_WAIT).await;
    wait_journal(&cluster.js, "B-USD", nb, JOURNAL_WAIT).await;
    for market in ["A-USD", "B-USD"] {
        let batches = check_journal(&cluster.js, market).await;
        let reports = check_exactly_once(&cluster.js, market).await;
        println!("{market}: {batches} journal batches, {reports} reports, all once (seed {seed})");
    }
}

#[tokio::test]
async fn a_standby_takes_over_from_its_warm_copy_when_the_owner_dies() {
    let mut cluster = Cluster::start_with(3, "", "standbys = 1\nrebalance_every_secs = 0").await;
    // The rebalancer names a standby for each market; it keeps a warm copy.
    let kv = cluster
        .js
        .get_key_value("agora_placement")
        .await
        .expect("placement bucket");
    let started = Instant::now();
    let standby = loop {
        let bytes = kv.get("A-USD").await.expect("read").expect("placed");
        let p: Value = serde_json::from_slice(&bytes).expect("json");
        if let Some(s) = p["standby"].as_str() {
            break s.to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no standby named: {p}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (owner, epoch) = cluster.placed("A-USD").await;
    assert_ne!(standby, owner);
    let commands = workload(17, 2000);
    let total = commands.len() as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let flow = load(&cluster.js, "A-USD", commands, 1500, sent.clone());
    wait_sent(&sent, total / 2, &flow).await;
    let row = cluster.node_row(&standby);
    assert!(
        row["following"]
            .as_array()
            .is_some_and(|f| f.iter().any(|m| m == "A-USD")),
        "{standby} keeps no warm copy of A-USD: {row}"
    );
    let mut status = cluster.status("A-USD").await;
    let killed = Instant::now();
    cluster.kill(&owner);
    let new_owner = cluster
        .wait_active(&mut status, &owner, epoch + 1, Duration::from_secs(20))
        .await;
    println!(
        "A-USD failed over from {owner} to its standby {new_owner} in {:?}",
        killed.elapsed()
    );
    assert_eq!(new_owner, standby, "the standby takes over first");
    cluster.nodes[&standby].wait_line(
        |l| l.contains("running A-USD") && l.contains("from its warm copy"),
        Duration::from_secs(10),
    );
    flow.await.expect("load");
    wait_journal(&cluster.js, "A-USD", total, JOURNAL_WAIT).await;
    check_journal(&cluster.js, "A-USD").await;
    check_exactly_once(&cluster.js, "A-USD").await;
}

#[tokio::test]
async fn a_node_joining_a_loaded_cluster_takes_a_hot_market_by_a_load_move() {
    // What an autoscaler counts on: n1 runs both markets under load, n2 joins, and the
    // rebalancer gives it one. Checks every second; a node at 1.2 x the mean and 100
    // commands/s above the other is overloaded, and after three checks in a row one market
    // moves.
    let mut cluster = Cluster::start_with(
        1,
        "",
        "rebalance_every_secs = 1\nimbalance_ratio = 1.2\nmin_rate_gap = 100.0",
    )
    .await;
    assert_eq!(cluster.placed("A-USD").await.0, "n1");
    assert_eq!(cluster.placed("B-USD").await.0, "n1");
    let a = workload(21, 6000);
    let b = workload(22, 6000);
    let (na, nb) = (a.len() as u64, b.len() as u64);
    let sent = Arc::new(AtomicU64::new(0));
    let flow_a = load(&cluster.js, "A-USD", a, 400, sent.clone());
    let flow_b = load(&cluster.js, "B-USD", b, 400, Arc::default());
    wait_sent(&sent, 400, &flow_a).await;
    cluster.start_node("n2", "");
    let started = Instant::now();
    let moved = loop {
        let (a, b) = (
            cluster.placed("A-USD").await.0,
            cluster.placed("B-USD").await.0,
        );
        if a == "n2" || b == "n2" {
            break if a == "n2" { "A-USD" } else { "B-USD" };
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "no market moved off the busy node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("{moved} moved to n2 after {:?}", started.elapsed());
    flow_a.await.expect("load");
    flow_b.await.expect("load");
    // Balanced now: the other stays, and the moved one was not moved back.
    let (a, b) = (
        cluster.placed("A-USD").await.0,
        cluster.placed("B-USD").await.0,
    );
    assert_ne!(a, b, "one market on each node: A-USD on {a}, B-USD on {b}");
    assert_eq!(cluster.metric("matching_handoffs_total"), 1.0);
    wait_journal(&cluster.js, "A-USD", na, JOURNAL_WAIT).await;
    wait_journal(&cluster.js, "B-USD", nb, JOURNAL_WAIT).await;
    check_exactly_once(&cluster.js, "A-USD").await;
    check_exactly_once(&cluster.js, "B-USD").await;
}

/// Where placement says `market` runs, once it is on `node` (within `timeout`).
async fn wait_placed_on(cluster: &Cluster, market: &str, node: &str, timeout: Duration) -> u64 {
    let started = Instant::now();
    loop {
        let (owner, epoch) = cluster.placed(market).await;
        if owner == node {
            return epoch;
        }
        assert!(
            started.elapsed() < timeout,
            "{market} is still on {owner}, not on {node}, after {timeout:?}{}",
            cluster.dump()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_market_runs_on_the_node_that_prefers_it_and_comes_back_after_a_failover() {
    let mut cluster =
        Cluster::start_with(1, "", "rebalance_every_secs = 0\nfailback_after_secs = 1").await;
    // n1 came up first and placed both markets on itself; n2 prefers B-USD.
    assert_eq!(cluster.placed("B-USD").await.0, "n1");
    cluster.start_node_preferring("n2", &["B-USD"]);
    let epoch = wait_placed_on(&cluster, "B-USD", "n2", Duration::from_secs(30)).await;
    let (ok, list) = cluster.ctl(&["market.list"]);
    assert!(ok, "{list}");
    let row = |list: &Value, symbol: &str| {
        list["markets"]
            .as_array()
            .expect("markets")
            .iter()
            .find(|m| m["symbol"] == symbol)
            .cloned()
            .expect("listed")
    };
    let b = row(&list, "B-USD");
    assert_eq!(b["preferred"], serde_json::json!(["n2"]), "{b}");
    assert_eq!(b["node"], "n2", "{b}");
    assert!(
        row(&list, "A-USD").get("preferred").is_none(),
        "nobody prefers A-USD: {list}"
    );

    // Under load: n2 dies, B-USD fails over to n1, n2 comes back and B-USD follows it.
    let commands = workload(15, 3000);
    let total = commands.len() as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let flow = load(&cluster.js, "B-USD", commands, 1000, sent.clone());
    wait_sent(&sent, total / 4, &flow).await;
    cluster.kill("n2");
    let failed_over = wait_placed_on(&cluster, "B-USD", "n1", Duration::from_secs(20)).await;
    assert!(failed_over > epoch);
    cluster.start_node_preferring("n2", &["B-USD"]);
    let back = Instant::now();
    let came_back = wait_placed_on(&cluster, "B-USD", "n2", Duration::from_secs(30)).await;
    assert_eq!(
        came_back,
        failed_over + 1,
        "one planned move back, no back and forth"
    );
    println!(
        "B-USD back on n2 {:?} after it restarted (failback_after 1 s)",
        back.elapsed()
    );
    flow.await.expect("load");
    wait_journal(&cluster.js, "B-USD", total, JOURNAL_WAIT).await;
    check_journal(&cluster.js, "B-USD").await;
    check_exactly_once(&cluster.js, "B-USD").await;
    assert_eq!(cluster.placed("A-USD").await.0, "n1", "A-USD stayed");
}

#[tokio::test]
async fn renewals_without_load_keep_nodes_alive_and_a_dead_one_still_fails_over() {
    // load_every_ms = 3000 at heartbeat 100 and lease 1.5 s: a node writes its record with its
    // load every 3 s (and at the next heartbeat when what it runs changes); the renewals
    // between, a few dozen bytes at alive.<node>, are all that keeps it alive meanwhile.
    // Liveness, node.list and failover must not notice.
    let mut cluster =
        Cluster::start_with(2, "", "rebalance_every_secs = 0\nload_every_ms = 3000").await;
    cluster.move_market("B-USD", "n2");
    let placed = [cluster.placed("A-USD").await, cluster.placed("B-USD").await];
    // What each node writes, as a plain subscriber of the bucket's subjects sees it, for
    // longer than two leases: node.list shows both nodes alive all along.
    let mut puts = cluster
        .client
        .subscribe("$KV.agora_nodes.>")
        .await
        .expect("subscribe");
    let mut written: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    let watched = Instant::now();
    let mut asked = Instant::now();
    while watched.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), puts.next()).await {
            let kind = written.entry(m.subject.to_string()).or_default();
            kind.0 += 1;
            kind.1 = kind.1.max(m.payload.len());
        }
        if asked.elapsed() > Duration::from_millis(500) {
            asked = Instant::now();
            for node in ["n1", "n2"] {
                let row = cluster.node_row(node);
                assert_eq!(row["alive"], true, "{row}");
            }
        }
    }
    for node in ["n1", "n2"] {
        let (records, _) = written[&format!("$KV.agora_nodes.{node}")];
        let (renewals, renewal_bytes) = written[&format!("$KV.agora_nodes.alive.{node}")];
        println!(
            "{node} in 5 s: {records} records, {renewals} renewals of at most {renewal_bytes} bytes"
        );
        assert!((1..=4).contains(&records), "{node}: {written:?}");
        assert!(renewals > 4 * records, "{node}: {written:?}");
        assert!(renewal_bytes < 100, "{node}: {written:?}");
    }
    // The rebalancer saw both alive throughout: nothing failed over.
    assert_eq!(
        [cluster.placed("A-USD").await, cluster.placed("B-USD").await],
        placed
    );
    assert_eq!(cluster.metric("matching_failovers_total"), 0.0);
    // A move is in node.list at once, not at the next load.
    cluster.move_market("A-USD", "n2");
    cluster
        .wait_node_row(
            "n2",
            |n2| {
                n2["market_names"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m == "A-USD"))
            },
            Duration::from_secs(2),
            "listing A-USD",
        )
        .await;
    // n2 dies: the lease runs out on its renewals as it did on its records.
    let (_, epoch) = cluster.placed("A-USD").await;
    let mut status = cluster.status("A-USD").await;
    cluster.kill("n2");
    let owner = cluster
        .wait_active(&mut status, "n2", epoch + 1, Duration::from_secs(20))
        .await;
    assert_eq!(owner, "n1");
    cluster.wait_node_alive("n2", false).await;
    let n1 = cluster.node_row("n1");
    assert_eq!(n1["alive"], true, "{n1}");
}
