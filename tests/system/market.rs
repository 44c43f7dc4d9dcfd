//! A market actor against a real nats-server: orders in on the market's stream, journal,
//! execution reports, tape and book out; stopped and restarted mid-flow, it loses and repeats
//! nothing, and its book equals an offline replay of the stream.

use crate::common;

use std::time::{Duration, Instant};

use agora::actors::MarketCore;
use agora::actors::market::{self, MarketBus, MarketSettings, State};
use agora::book::MarketSpecInput;
use agora::bus::{self, LocalServer, SnapshotStore, StreamSettings, Subjects};
use agora::wire::WireCommandOut;
use agora::workload::{self, FlowParams};
use async_nats::jetstream;
use common::wait_journal;
use serde_json::{Value, json};

struct Env {
    url: String,
    _server: LocalServer,
    _dir: tempfile::TempDir,
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
}

async fn env(market: &str) -> Env {
    env_with(market, &StreamSettings::default()).await
}

async fn env_with(market: &str, settings: &StreamSettings) -> Env {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let client = bus::connect(&server.url(), "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = jetstream::new(client.clone());
    let subjects = Subjects::default();
    bus::ensure_core_streams(&js, &subjects, settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    bus::ensure_market_stream(&js, &subjects, market, settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    Env {
        url: server.url(),
        _server: server,
        _dir: dir,
        client,
        js,
        subjects,
    }
}

impl Env {
    /// What a market needs; with the snapshot store when `snapshots`.
    async fn bus(&self, snapshots: bool) -> MarketBus {
        let store = if snapshots {
            Some(
                SnapshotStore::open(&self.js, &self.subjects, &StreamSettings::default())
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            )
        } else {
            None
        };
        MarketBus {
            client: self.client.clone(),
            js: self.js.clone(),
            subjects: self.subjects.clone(),
            snapshots: store,
            pull_cap: agora::bus::PullCap::new(),
        }
    }
}

async fn publish_json(env: &Env, market: &str, value: &Value) -> u64 {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let bytes = serde_json::to_vec(value).expect("json");
    env.js
        .publish_with_headers(env.subjects.orders(market), headers, bytes.into())
        .await
        .expect("publish sent")
        .await
        .expect("publish acknowledged")
        .sequence
}

/// How long a test waits for a market's journal to cover what it sent.
const JOURNAL_WAIT: Duration = Duration::from_secs(20);

/// Every report stored in `EXECS` (as JSON text), sorted.
async fn stored_reports(env: &Env) -> Vec<String> {
    let mut all: Vec<String> = read_all(env, "EXECS")
        .await
        .into_iter()
        .flat_map(|(_, v)| v["reports"].as_array().cloned().unwrap_or_default())
        .map(|r| r.to_string())
        .collect();
    all.sort();
    all
}

/// Every message of a stream, decoded.
async fn read_all(env: &Env, stream: &str) -> Vec<(String, Value)> {
    let mut s = env.js.get_stream(stream).await.expect("stream");
    let last = s.info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push((
                m.subject.to_string(),
                rmp_serde::from_slice(&m.payload).expect("decodes"),
            ));
        }
    }
    out
}

#[actix_rt::test]
async fn orders_in_give_journal_reports_tape_out() {
    let env = env("BTC-USDC").await;
    let spec = MarketSpecInput::new("BTC-USDC", 2, 8)
        .validate()
        .expect("spec");
    let mut status = env
        .client
        .subscribe("agora.status.BTC-USDC")
        .await
        .expect("subscribe");
    let settings = MarketSettings {
        node_id: "n1".into(),
        ..MarketSettings::default()
    };
    let running = market::start(env.bus(false).await, spec.clone(), settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    publish_json(&env, "BTC-USDC", &json!({"op":"new","account":"alice","cid":"a1","side":"sell","price":"65000.00","qty":"0.5"})).await;
    publish_json(
        &env,
        "BTC-USDC",
        &json!({"op":"new","account":"bob","cid":"b1","side":"buy","price":"65000.00","qty":"0.2"}),
    )
    .await;
    publish_json(
        &env,
        "BTC-USDC",
        &json!({"op":"new","account":"bob","cid":"b2","side":"buy","price":"65000.005","qty":"1"}),
    )
    .await;
    wait_journal(&env.js, "BTC-USDC", 3, JOURNAL_WAIT).await;

    // The views follow the journal (published once it is acknowledged): wait until the last
    // command's report and the trade are stored too.
    let stored = Instant::now();
    let execs = loop {
        let execs = read_all(&env, "EXECS").await;
        let rejected = execs.iter().any(|(subject, v)| {
            subject == "agora.execs.bob.BTC-USDC"
                && v["reports"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["type"] == "rejected"))
        });
        if rejected && !read_all(&env, "TRADES").await.is_empty() {
            break execs;
        }
        assert!(
            stored.elapsed() < JOURNAL_WAIT,
            "reports of commands the journal covers were not stored: {execs:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reports = |who: &str| -> Vec<Value> {
        execs
            .iter()
            .filter(|(subject, _)| subject == &format!("agora.execs.{who}.BTC-USDC"))
            .flat_map(|(_, v)| v["reports"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let bob = reports("bob");
    let fill = bob
        .iter()
        .find(|r| r["type"] == "fill")
        .expect("bob has a fill");
    assert_eq!(fill["liquidity"], "taker");
    assert_eq!(fill["qty"], "0.20000000");
    assert_eq!(fill["price"], "65000.00");
    let bad = bob
        .iter()
        .find(|r| r["type"] == "rejected")
        .expect("bob's bad price is rejected");
    assert_eq!(bad["reason"], "invalid_field");
    assert_eq!(
        bad["message"],
        "price 65000.005 has 3 decimals; BTC-USDC allows 2"
    );
    let alice = reports("alice");
    assert!(
        alice.iter().any(|r| r["type"] == "fill"
            && r["liquidity"] == "maker"
            && r["leaves"] == "0.30000000")
    );

    let tape = read_all(&env, "TRADES").await;
    assert_eq!(tape.len(), 1);
    assert_eq!(tape[0].1["trades"][0]["qty"], "0.20000000");

    let (last, _) = running.addr.send(State).await.expect("actor answers");
    assert_eq!(last, 3);

    // The whole book on request, with the sequence it reflects.
    let reply = env
        .client
        .request("agora.book.BTC-USDC.snapshot", "".into())
        .await
        .expect("a market answers book snapshot requests");
    let book: Value = rmp_serde::from_slice(&reply.payload).expect("decodes");
    assert_eq!(book["seq"], 3);
    assert_eq!(book["asks"][0]["price"], "65000.00");
    assert_eq!(book["asks"][0]["qty"], "0.30000000");
    assert_eq!(book["bids"].as_array().map(Vec::len), Some(0));

    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
    // Announced when it started consuming (where recovery ended), again with the book's hash
    // there (computed off the market's thread), and when it stopped.
    let mut states = Vec::new();
    while states.len() < 3 {
        let next = futures::StreamExt::next(&mut status);
        let msg = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("status announced")
            .expect("subscription open");
        let v: Value = rmp_serde::from_slice(&msg.payload).expect("decodes");
        assert_eq!(v["node"], "n1");
        states.push(v);
    }
    let names: Vec<&str> = states
        .iter()
        .map(|v| v["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["active", "active", "stopped"]);
    assert_eq!(states[0]["seq"], 0);
    assert!(states[0].get("state_hash").is_none(), "{}", states[0]);
    assert_eq!(states[1]["seq"], 0);
    let empty = agora::book::OrderBook::new(spec.clone()).state_hash();
    assert_eq!(states[1]["state_hash"], empty.to_string());
}

#[actix_rt::test]
async fn a_restarted_market_loses_and_repeats_nothing() {
    restart_case(None, false).await;
}

#[actix_rt::test]
async fn a_market_restarted_from_a_snapshot_loses_and_repeats_nothing() {
    // Snapshots every 37 commands: the restart restores one and replays only what follows.
    restart_case(Some(37), false).await;
}

#[actix_rt::test]
async fn a_damaged_snapshot_is_passed_over_for_the_stream() {
    restart_case(Some(37), true).await;
}

/// Stops a market mid-flow and starts it again while orders keep coming; with `snapshot_every`
/// the market writes snapshots that often and restarts from the latest (which `damage`
/// replaces with bytes that do not decode: the market then replays the whole stream).
async fn restart_case(snapshot_every: Option<u64>, damage: bool) {
    let env = env("SAMPLE-USD").await;
    let w = workload::generate(&FlowParams {
        seed: 11,
        resting: 40,
        spread_ticks: 50,
        commands: 360,
        accounts: 6,
        full_mix: true,
        young_cancel_pct: 80,
    });
    let spec = MarketSpecInput::new("SAMPLE-USD", 2, 0)
        .validate()
        .expect("spec");
    let lines: Vec<Value> = w
        .prefill
        .iter()
        .chain(&w.commands)
        .map(|c| {
            serde_json::to_value(WireCommandOut::from_command(&w.spec, c, false)).expect("json")
        })
        .collect();
    let (first, second) = lines.split_at(lines.len() / 2);

    let bus = env.bus(snapshot_every.is_some()).await;
    let settings = MarketSettings {
        snapshot_every_commands: snapshot_every.unwrap_or(0),
        ..MarketSettings::default()
    };
    let start = || market::start(bus.clone(), spec.clone(), settings.clone());
    let running = start().await.unwrap_or_else(|e| panic!("{e}"));
    for line in first {
        publish_json(&env, "SAMPLE-USD", line).await;
    }
    wait_journal(&env.js, "SAMPLE-USD", first.len() as u64, JOURNAL_WAIT).await;
    if snapshot_every.is_some() {
        let stats = running
            .addr
            .send(market::Stats)
            .await
            .expect("actor answers");
        assert!(
            stats.snapshot_seq > 0,
            "no snapshot after {} commands",
            first.len()
        );
    }
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
    if let Some(store) = &bus.snapshots {
        let blob = store
            .load("SAMPLE-USD")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .expect("a snapshot at stop");
        assert_eq!(
            blob.last_seq,
            first.len() as u64,
            "a clean stop leaves a snapshot of everything applied"
        );
        if damage {
            let garbage = agora::bus::SnapshotBlob {
                bytes: b"\x1f\x8bnot really gzip".to_vec(),
                ..blob
            };
            store
                .save("SAMPLE-USD", &garbage)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    // Orders keep arriving while no one owns the market: they wait in the stream.
    for line in &second[..second.len() / 2] {
        publish_json(&env, "SAMPLE-USD", line).await;
    }
    let running = start().await.unwrap_or_else(|e| panic!("{e}"));
    for line in &second[second.len() / 2..] {
        publish_json(&env, "SAMPLE-USD", line).await;
    }
    wait_journal(&env.js, "SAMPLE-USD", lines.len() as u64, JOURNAL_WAIT).await;
    let (last, hash) = running.addr.send(State).await.expect("actor answers");
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(last, lines.len() as u64);

    // Offline: the same stream messages (with their stream timestamps) through a fresh core.
    let offline = common::offline_replay(&env.js, &env.subjects, &spec).await;
    let (expected, offline_hash) = (offline.sorted_reports(), offline.state_hash);
    assert_eq!(
        hash, offline_hash,
        "the restarted market's book differs from an offline replay"
    );

    let published = stored_reports(&env).await;
    assert_eq!(
        published.len(),
        expected.len(),
        "reports lost or duplicated across the restart"
    );
    assert!(
        published == expected,
        "the published reports differ from an offline replay"
    );

    // The journal covers every input exactly once, in order.
    let journal = read_all(&env, "EVENTS").await;
    let mut next = 1;
    for (_, batch) in &journal {
        assert_eq!(
            batch["first_seq"].as_u64(),
            Some(next),
            "journal batches must be contiguous"
        );
        next = batch["last_seq"].as_u64().expect("last_seq") + 1;
    }
    assert_eq!(next, lines.len() as u64 + 1);
}

#[actix_rt::test]
async fn bad_input_is_rejected_clearly_and_the_market_goes_on() {
    let env = env("BTC-USDC").await;
    let spec = MarketSpecInput::new("BTC-USDC", 2, 8)
        .validate()
        .expect("spec");
    let mut rejects = env
        .client
        .subscribe("agora.rejects.BTC-USDC")
        .await
        .expect("subscribe");
    let running = market::start(env.bus(false).await, spec, MarketSettings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let publish_raw = |bytes: Vec<u8>| {
        let js = env.js.clone();
        async move {
            js.publish("agora.orders.BTC-USDC", bytes.into())
                .await
                .expect("sent")
                .await
                .expect("acknowledged")
        }
    };
    // Not MessagePack at all: no account can be read, so it goes to the rejects subject.
    publish_raw(b"\xc1\xff garbage".to_vec()).await;
    // Too large (over 64 KiB).
    publish_raw(vec![0x90; 70_000]).await;
    // Readable, but wrong: each is rejected to its account with the rule it broke.
    let msgpack = |v: Value| rmp_serde::to_vec_named(&v).expect("encode");
    publish_raw(msgpack(
        json!({"op": "new", "account": "carol", "side": "buy", "price": "1.00"}),
    ))
    .await;
    publish_raw(msgpack(
        json!({"op": "new", "account": "carol", "side": "buy", "price": "1.00", "qty": true}),
    ))
    .await;
    publish_raw(msgpack(
        json!({"op": "new", "account": "carol", "side": "buy", "price": "1.001", "qty": "1"}),
    ))
    .await;
    // What MessagePack allows but the protocol does not: a positional array, an integer key,
    // a binary price; and JSON sent without its Content-Type. Each is refused in our words.
    publish_raw(rmp_serde::to_vec(&("new", "carol", "x")).expect("encode")).await;
    publish_raw(vec![0x81, 0x01, 0xa3, b'n', b'e', b'w']).await;
    let mut binary_price = vec![0x82, 0xa2, b'o', b'p', 0xa3, b'n', b'e', b'w', 0xa5];
    binary_price.extend(b"price");
    binary_price.extend([0xc4, 0x04]);
    binary_price.extend(b"1.00");
    publish_raw(binary_price).await;
    publish_raw(br#"{"op": "new", "account": "carol"}"#.to_vec()).await;
    // And the market goes on.
    publish_raw(msgpack(json!({"op": "new", "account": "carol", "cid": "ok", "side": "buy", "price": "1.00", "qty": "1"}))).await;
    wait_journal(&env.js, "BTC-USDC", 10, JOURNAL_WAIT).await;

    let mut unreadable = Vec::new();
    while unreadable.len() < 6 {
        let next = futures::StreamExt::next(&mut rejects);
        let msg = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("unreadable messages are published")
            .expect("subscription open");
        let v: Value = rmp_serde::from_slice(&msg.payload).expect("decodes");
        unreadable.extend(v["events"].as_array().cloned().unwrap_or_default());
    }
    assert_eq!(unreadable[0]["reason"], "malformed");
    assert_eq!(unreadable[0]["seq"], 1);
    assert!(
        unreadable[1]["message"]
            .as_str()
            .unwrap_or("")
            .contains("the limit is 65536"),
        "{}",
        unreadable[1]
    );
    let said = |i: usize| unreadable[i]["message"].as_str().unwrap_or("").to_string();
    assert!(
        said(2).contains("positional arrays are not accepted"),
        "{}",
        said(2)
    );
    assert!(
        said(3).contains("field names must be strings"),
        "{}",
        said(3)
    );
    assert!(said(4).starts_with("price is binary data"), "{}", said(4));
    assert!(
        said(5).contains("Content-Type: application/json"),
        "{}",
        said(5)
    );

    let carol: Vec<Value> = read_all(&env, "EXECS")
        .await
        .into_iter()
        .filter(|(subject, _)| subject == "agora.execs.carol.BTC-USDC")
        .flat_map(|(_, v)| v["reports"].as_array().cloned().unwrap_or_default())
        .collect();
    let messages: Vec<&str> = carol.iter().filter_map(|r| r["message"].as_str()).collect();
    assert_eq!(
        messages,
        [
            "qty is missing; send the order quantity as a decimal string",
            "qty is true; send a decimal string such as \"1.5\"",
            "price 1.001 has 3 decimals; BTC-USDC allows 2",
        ]
    );
    assert!(
        carol
            .iter()
            .any(|r| r["type"] == "accepted" && r["cid"] == "ok")
    );
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[actix_rt::test]
async fn two_markets_on_two_arbiters_trade_in_parallel() {
    use actix::Actor;
    use agora::actors::{ListMarkets, Shutdown, StartMarket, Supervisor};
    let env = env("AAA-USD").await;
    bus::ensure_market_stream(
        &env.js,
        &env.subjects,
        "BBB-USD",
        &StreamSettings::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let supervisor = Supervisor::new(env.bus(true).await, MarketSettings::default(), 2).start();
    for symbol in ["AAA-USD", "BBB-USD"] {
        let spec = MarketSpecInput::new(symbol, 2, 0).validate().expect("spec");
        supervisor
            .send(StartMarket::standalone(spec))
            .await
            .expect("supervisor answers")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let flow = |market: &'static str| {
        let env = &env;
        async move {
            for i in 0..100u32 {
                let side = if i % 2 == 0 { "sell" } else { "buy" };
                let order = json!({"op": "new", "account": format!("acct-{}", i % 3), "side": side, "price": "10.00", "qty": "1"});
                publish_json(env, market, &order).await;
            }
        }
    };
    futures::join!(flow("AAA-USD"), flow("BBB-USD"));
    wait_journal(&env.js, "AAA-USD", 100, JOURNAL_WAIT).await;
    wait_journal(&env.js, "BBB-USD", 100, JOURNAL_WAIT).await;
    let markets = supervisor
        .send(ListMarkets)
        .await
        .expect("supervisor answers");
    let arbiters: Vec<usize> = markets.iter().map(|m| m.arbiter).collect();
    assert_eq!(arbiters, [0, 1], "one market per arbiter");
    assert!(
        markets.iter().all(|m| m.running && m.last_seq == 100),
        "{markets:?}"
    );
    let tape = read_all(&env, "TRADES").await;
    for market in ["AAA-USD", "BBB-USD"] {
        let trades: usize = tape
            .iter()
            .filter(|(subject, _)| subject == &format!("agora.trades.{market}"))
            .map(|(_, v)| v["trades"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(trades, 50, "{market}: each buy meets the sell before it");
    }
    supervisor.send(Shutdown).await.expect("supervisor answers");
}

/// Publishes `commands` as batch messages of `per` commands each; returns the last sequence.
async fn publish_batches(env: &Env, market: &str, commands: &[Value], per: usize) -> u64 {
    let mut last = 0;
    for chunk in commands.chunks(per) {
        last = publish_json(env, market, &json!({"op": "batch", "commands": chunk})).await;
    }
    last
}

#[actix_rt::test]
async fn book_requests_are_limited_never_too_large_and_do_not_stall_matching() {
    // 40,000 price levels: the whole book is over NATS's 1 MiB max payload.
    let env = env("DEEP-USD").await;
    let spec = MarketSpecInput::new("DEEP-USD", 2, 0)
        .validate()
        .expect("spec");
    let settings = MarketSettings {
        batch_max: 1000,
        ..MarketSettings::default()
    };
    let running = market::start(env.bus(false).await, spec, settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let orders: Vec<Value> = (0..40_000u32)
        .map(|i| {
            json!({"op": "new", "account": format!("mm-{}", i % 50), "cid": format!("d{i}"),
                   "side": "buy", "price": format!("{}.{:02}", 1 + i / 100, i % 100), "qty": "1"})
        })
        .collect();
    let last = publish_batches(&env, "DEEP-USD", &orders, 500).await;
    wait_journal(&env.js, "DEEP-USD", last, JOURNAL_WAIT).await;

    let ask = |body: &'static str| {
        let client = env.client.clone();
        async move {
            let reply = client
                .request("agora.book.DEEP-USD.snapshot", body.into())
                .await
                .expect("answered");
            rmp_serde::from_slice::<Value>(&reply.payload).expect("decodes")
        }
    };
    // The whole book does not fit: refused with what to ask instead.
    let whole = ask("").await;
    assert_eq!(whole["error"], "too_large", "{whole}");
    assert!(
        whole["message"]
            .as_str()
            .unwrap_or("")
            .contains("{\"depth\": 1000}"),
        "{whole}"
    );
    // The best levels do, and the sequence alone.
    let best = ask(r#"{"depth": 1000}"#).await;
    assert_eq!(best["seq"], last);
    assert_eq!(best["bids"].as_array().map(Vec::len), Some(1000));
    assert_eq!(best["bids"][0]["price"], "400.99");
    let seq_only = ask(r#"{"depth": 0}"#).await;
    assert_eq!(
        (&seq_only["seq"], &seq_only["bids"]),
        (&json!(last), &json!([]))
    );
    let bad = ask(r#"{"levels": 3}"#).await;
    assert_eq!(bad["error"], "bad_request", "{bad}");

    // A flood from one connection: past 20 a second it is refused, saying when to ask again,
    // and the market goes on matching meanwhile.
    let mut refused = 0;
    for _ in 0..100 {
        let r = ask(r#"{"depth": 1000}"#).await;
        if r["error"] == "rate_limited" {
            assert!(r["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{r}");
            refused += 1;
        }
    }
    assert!(refused >= 50, "only {refused} of 100 requests were limited");
    let next = publish_json(
        &env,
        "DEEP-USD",
        &json!({"op": "new", "account": "t", "cid": "after", "side": "sell", "price": "400.99", "qty": "1"}),
    )
    .await;
    wait_journal(&env.js, "DEEP-USD", next, JOURNAL_WAIT).await;
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

#[actix_rt::test]
async fn a_large_book_snapshots_to_the_object_store_and_comes_back() {
    let env = env("BIG-USD").await;
    let spec = MarketSpecInput::new("BIG-USD", 2, 0)
        .validate()
        .expect("spec");
    let bus = env.bus(true).await;
    let settings = MarketSettings {
        batch_max: 1000,
        snapshot_every_commands: 0,
        snapshot_every: Duration::ZERO,
        ..MarketSettings::default()
    };
    let running = market::start(bus.clone(), spec.clone(), settings.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // 100,000 resting orders on 2,000 price levels, many accounts, cids with 12 random-looking
    // bytes each: a snapshot over 1 MiB even in columns and compressed.
    let orders: Vec<Value> = (0..100_000u32)
        .map(|i| {
            let mixed = u64::from(i).wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let (side, price) = if i % 2 == 0 {
                ("buy", 1000 + (i / 2) % 1000)
            } else {
                ("sell", 3000 + (i / 2) % 1000)
            };
            json!({"op": "new", "account": format!("trader-{:04}", i % 997), "cid": format!("{mixed:016x}{:08x}", mixed.rotate_left(29) as u32),
                   "side": side, "price": format!("{price}.00"), "qty": format!("{}", 1 + i % 50)})
        })
        .collect();
    let last = publish_batches(&env, "BIG-USD", &orders, 250).await;
    wait_journal(&env.js, "BIG-USD", last, JOURNAL_WAIT).await;
    let stats = running
        .addr
        .send(market::Stats)
        .await
        .expect("actor answers");
    assert_eq!(stats.resting_orders, 100_000);
    let (_, hash) = running.addr.send(State).await.expect("actor answers");
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));

    let blob = bus
        .snapshots
        .as_ref()
        .expect("store")
        .load("BIG-USD")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("a snapshot");
    assert_eq!(blob.last_seq, last);
    let objects = env
        .js
        .get_object_store("agora_snapshots")
        .await
        .expect("object store");
    let info = objects
        .info("BIG-USD/400")
        .await
        .expect("the snapshot is an object");
    assert!(
        info.size > agora::bus::snapshots::INLINE_MAX,
        "{}",
        info.size
    );

    // Back from the snapshot alone: nothing after it to replay, the same book.
    let running = market::start(bus, spec, settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (seq, restored) = running.addr.send(State).await.expect("actor answers");
    assert_eq!((seq, restored), (last, hash));
    let stats = running
        .addr
        .send(market::Stats)
        .await
        .expect("actor answers");
    assert_eq!(stats.snapshot_seq, last);
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

/// A rolling upgrade across snapshot format 2: a node set to `[snapshots] format = 1` writes
/// what builds before it read (the `Fnv1` hash) and announces that hash, so a move's hashes
/// compare with an older node's; a node of format 2 restores that snapshot, checks it in its
/// own version, and announces the book hashed again in the current one.
#[actix_rt::test]
async fn a_format_1_snapshot_is_written_for_older_nodes_and_restored_by_format_2() {
    use agora::actors::core::{MARKET_SNAPSHOT_VERSION, SnapshotFormat, decode_snapshot};
    use agora::book::HashVersion;
    let env = env("OLD-USD").await;
    let spec = MarketSpecInput::new("OLD-USD", 2, 0)
        .validate()
        .expect("spec");
    let bus = env.bus(true).await;
    let old = MarketSettings {
        node_id: "n1".into(),
        snapshot_every_commands: 0,
        snapshot_every: Duration::ZERO,
        snapshot_format: SnapshotFormat::of(1).expect("format 1 is read"),
        ..MarketSettings::default()
    };
    let running = market::start(bus.clone(), spec.clone(), old)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let orders: Vec<Value> = (0..400u32)
        .map(|i| {
            let (side, price) = if i % 2 == 0 { ("buy", 100 + i % 7) } else { ("sell", 110 + i % 7) };
            json!({"op": "new", "account": format!("t{}", i % 5), "cid": format!("c{i}"), "side": side,
                   "price": format!("{price}.00"), "qty": "3"})
        })
        .collect();
    let last = publish_batches(&env, "OLD-USD", &orders, 50).await;
    wait_journal(&env.js, "OLD-USD", last, JOURNAL_WAIT).await;
    let (_, announced_old) = running.addr.send(State).await.expect("actor answers");
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));

    let blob = bus
        .snapshots
        .as_ref()
        .expect("store")
        .load("OLD-USD")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("a snapshot at the stop");
    let stored = decode_snapshot(&blob.bytes, &blob.encoding).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored.format_version, 1);
    assert_eq!(stored.last_seq, last);
    let fnv1 = stored.book.state_hash_as(HashVersion::Fnv1);
    let words2 = stored.book.state_hash_as(HashVersion::Words2);
    assert_ne!(fnv1, words2);
    assert_eq!(stored.state_hash, fnv1, "the hash older builds check");
    assert_eq!(announced_old, fnv1, "the hash older builds compare");

    // A node of the current format: restored from it, announced in its own version.
    let mut status = env
        .client
        .subscribe("agora.status.OLD-USD")
        .await
        .expect("subscribe");
    let new = MarketSettings {
        node_id: "n2".into(),
        ..MarketSettings::default()
    };
    assert_eq!(new.snapshot_format, SnapshotFormat::CURRENT);
    assert_eq!(new.snapshot_format.version(), MARKET_SNAPSHOT_VERSION);
    let running = market::start(bus, spec, new)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (seq, announced) = running.addr.send(State).await.expect("actor answers");
    assert_eq!((seq, announced), (last, words2));
    let stats = running
        .addr
        .send(market::Stats)
        .await
        .expect("actor answers");
    assert_eq!(stats.snapshot_seq, last, "restored from the snapshot");
    let hashed = loop {
        let next = futures::StreamExt::next(&mut status);
        let msg = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("status announced")
            .expect("subscription open");
        let v: Value = rmp_serde::from_slice(&msg.payload).expect("decodes");
        if let Some(h) = v.get("state_hash") {
            break h.clone();
        }
    };
    assert_eq!(hashed, words2.to_string());
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
}

/// A batch of quotes, and retries made safe by the market's cid window rather than by
/// JetStream's shared `Nats-Msg-Id` space: another account that publishes with a `Nats-Msg-Id`
/// equal to a taker's cid does not make the taker's order disappear, and a taker that
/// publishes its order three times (no Msg-Id) is placed and filled once; its retries are
/// rejected `duplicate_cid`, after the order has filled and closed.
#[actix_rt::test]
async fn batch_messages_and_cid_retries_work_end_to_end() {
    let env = env("BTC-USDC").await;
    let spec = MarketSpecInput::new("BTC-USDC", 2, 8)
        .for_new_market()
        .validate()
        .expect("spec");
    assert!(spec.cid_window_secs > 0);
    let running = market::start(env.bus(false).await, spec, MarketSettings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A market maker quotes both sides in one message; one quote is bad and only it is refused.
    let quotes = json!({"op": "batch", "account": "mm", "commands": [
        {"op": "new", "cid": "q1", "side": "buy", "price": "64990.00", "qty": "1"},
        {"op": "new", "cid": "q2", "side": "sell", "price": "65010.00", "qty": "1"},
        {"op": "new", "cid": "q3", "side": "sell", "price": "65010.001", "qty": "1"},
    ]});
    let seq = publish_json(&env, "BTC-USDC", &quotes).await;

    // mallory publishes first with the Msg-Id the taker's cid would have been.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert("Nats-Msg-Id", "t1");
    let mallory = serde_json::to_vec(&json!({"op": "new", "account": "mallory", "cid": "m1", "side": "buy", "price": "1.00", "qty": "1"})).expect("json");
    let ack = env
        .js
        .publish_with_headers(env.subjects.orders("BTC-USDC"), headers, mallory.into())
        .await
        .expect("sent")
        .await
        .expect("acknowledged");
    assert_eq!(ack.sequence, seq + 1);

    // The taker's order through the client lands all the same.
    let client = agora::client::Client::with_connection(env.client.clone(), env.subjects.clone());
    let order = agora::client::NewOrderRequest::market("buy", "0.4").cid("t1");
    let sent = client
        .place("BTC-USDC", "taker", &order)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        sent.seq,
        seq + 2,
        "the taker's order is stored, not dropped"
    );

    // Two retries of the same command, published as a client that lost the ack would.
    let take = serde_json::to_vec(&json!({"op": "new", "account": "taker", "cid": "t1", "side": "buy", "type": "market", "qty": "0.4"})).expect("json");
    for n in 3..=4 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        let ack = env
            .js
            .publish_with_headers(
                env.subjects.orders("BTC-USDC"),
                headers,
                take.clone().into(),
            )
            .await
            .expect("sent")
            .await
            .expect("acknowledged");
        assert_eq!(ack.sequence, seq + n);
    }
    wait_journal(&env.js, "BTC-USDC", seq + 4, JOURNAL_WAIT).await;
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));

    let reports: Vec<Value> = read_all(&env, "EXECS")
        .await
        .into_iter()
        .flat_map(|(_, v)| v["reports"].as_array().cloned().unwrap_or_default())
        .collect();
    let of = |cid: &str| -> Vec<String> {
        reports
            .iter()
            .filter(|r| r["cid"] == cid)
            .map(|r| {
                let kind = r["type"].as_str().unwrap_or("?");
                match r["reason"].as_str() {
                    Some(reason) if kind == "rejected" => format!("rejected {reason}"),
                    _ => kind.to_string(),
                }
            })
            .collect()
    };
    assert_eq!(of("q1"), ["accepted"]);
    assert_eq!(of("q2"), ["accepted", "fill"]);
    assert_eq!(of("q3"), ["rejected invalid_field"]);
    assert_eq!(of("m1"), ["accepted"]);
    assert_eq!(
        of("t1"),
        [
            "accepted",
            "fill",
            "rejected duplicate_cid",
            "rejected duplicate_cid"
        ],
        "one taker order, filled once; its retries refused"
    );
    // Each quote has its own id: the message's sequence and its position in the batch.
    let oid = |cid: &str| {
        reports
            .iter()
            .find(|r| r["cid"] == cid && r["type"] == "accepted")
            .and_then(|r| r["oid"].as_u64())
    };
    assert_eq!(oid("q1"), Some(seq * 1000));
    assert_eq!(oid("q2"), Some(seq * 1000 + 1));
    assert_eq!(oid("t1"), Some((seq + 2) * 1000));
}

#[actix_rt::test]
async fn an_accounts_own_subject_carries_only_its_commands() {
    let env = env("BTC-USDC").await;
    let spec = MarketSpecInput::new("BTC-USDC", 2, 8)
        .validate()
        .expect("spec");
    let mut rejects = env
        .client
        .subscribe("agora.rejects.BTC-USDC")
        .await
        .expect("subscribe");
    let running = market::start(env.bus(false).await, spec, MarketSettings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let publish_on = |subject: &str, value: Value| {
        let (js, subject) = (env.js.clone(), subject.to_string());
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Content-Type", "application/json");
            js.publish_with_headers(
                subject,
                headers,
                serde_json::to_vec(&value).expect("json").into(),
            )
            .await
            .expect("sent")
            .await
            .expect("acknowledged")
            .sequence
        }
    };
    let alice = "agora.orders.BTC-USDC.alice";
    // No account named: it is alice's. Naming bob: refused, and the refusal goes to alice.
    publish_on(
        alice,
        json!({"op": "new", "cid": "a1", "side": "buy", "price": "1.00", "qty": "1"}),
    )
    .await;
    publish_on(alice, json!({"op": "new", "account": "bob", "cid": "b1", "side": "buy", "price": "1.00", "qty": "1"})).await;
    // Batches: one naming bob is refused entirely; in another, only the command for bob is.
    publish_on(
        alice,
        json!({"op": "batch", "account": "bob", "commands": [
            {"op": "new", "cid": "a2", "side": "buy", "price": "1.00", "qty": "1"},
        ]}),
    )
    .await;
    publish_on(
        alice,
        json!({"op": "batch", "commands": [
            {"op": "new", "cid": "a3", "side": "buy", "price": "1.00", "qty": "1"},
            {"op": "cancel_all", "account": "bob"},
        ]}),
    )
    .await;
    // A subject token that is no account at all.
    let long = format!("agora.orders.BTC-USDC.{}", "x".repeat(40));
    let bad = publish_on(
        &long,
        json!({"op": "new", "account": "alice", "side": "buy", "price": "1.00", "qty": "1"}),
    )
    .await;
    wait_journal(&env.js, "BTC-USDC", bad, JOURNAL_WAIT).await;
    use futures::StreamExt;
    let reject = tokio::time::timeout(Duration::from_secs(10), rejects.next())
        .await
        .expect("a rejection on agora.rejects")
        .expect("message");
    let reject: Value = rmp_serde::from_slice(&reject.payload).expect("decodes");
    assert_eq!(reject["events"][0]["reason"], "not_permitted", "{reject}");
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));

    let all = read_all(&env, "EXECS").await;
    assert!(
        all.iter()
            .all(|(subject, _)| subject == "agora.execs.alice.BTC-USDC"),
        "nothing reaches bob: {all:?}"
    );
    let reports: Vec<(String, String, String)> = all
        .iter()
        .flat_map(|(_, v)| v["reports"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["type"].as_str().unwrap_or("?").to_string(),
                r["cid"].as_str().unwrap_or("").to_string(),
                r["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let expected = [
        ("accepted", "a1", ""),
        ("rejected", "b1", "not_permitted"),
        ("rejected", "a2", "not_permitted"),
        ("accepted", "a3", ""),
        ("rejected", "", "not_permitted"),
    ];
    assert_eq!(
        reports,
        expected.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
}

#[actix_rt::test]
async fn every_order_type_goes_through_nats() {
    use agora::client::{Client, NewOrderRequest, Target};
    use futures::StreamExt;
    let env = env("SAMPLE-USD").await;
    let spec = MarketSpecInput::new("SAMPLE-USD", 2, 0)
        .validate()
        .expect("spec");
    let running = market::start(env.bus(false).await, spec, MarketSettings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = Client::with_connection(env.client.clone(), env.subjects.clone());
    let mut deltas = env
        .client
        .subscribe("agora.book.SAMPLE-USD")
        .await
        .expect("subscribe");
    let mut mm = client
        .reports("mm", Some("SAMPLE-USD"))
        .await
        .expect("mm reports");
    let mut t = client
        .reports("t", Some("SAMPLE-USD"))
        .await
        .expect("t reports");
    let wait = Duration::from_secs(20);
    let m = "SAMPLE-USD";
    // Sends `order` for `who` and returns the kinds (and reasons) of its own reports.
    macro_rules! send {
        ($reports:expr, $who:expr, $order:expr) => {{
            let sent = client
                .place(m, $who, &$order)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            $reports
                .for_seq(sent.seq, wait)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .into_iter()
                .map(|r| match r.fields.get("reason").and_then(|v| v.as_str()) {
                    Some(reason) => format!("{} {reason}", r.kind),
                    None => r.kind,
                })
                .collect::<Vec<String>>()
        }};
    }
    let o = |side: &str, price: &str, qty: &str| NewOrderRequest::limit(side, price, qty);
    assert_eq!(
        send!(mm, "mm", o("sell", "100.00", "10").cid("s1")),
        ["accepted"]
    );
    assert_eq!(
        send!(mm, "mm", o("buy", "99.00", "10").cid("b1")),
        ["accepted"]
    );
    // post-only that would take; IOC; FOK too big; market.
    assert_eq!(
        send!(t, "t", o("buy", "100.00", "1").tif("post_only")),
        ["accepted", "cancelled post_only_would_cross"]
    );
    assert_eq!(
        send!(t, "t", o("buy", "100.00", "3").tif("ioc")),
        ["accepted", "fill"]
    );
    assert_eq!(
        send!(t, "t", o("buy", "100.00", "100").tif("fok")),
        ["accepted", "cancelled fok_unfilled"]
    );
    assert_eq!(
        send!(t, "t", NewOrderRequest::market("buy", "2")),
        ["accepted", "fill"]
    );
    // An iceberg showing 2 of 10; a stop-market buy above the market; a stop-limit sell below.
    let iceberg = NewOrderRequest {
        display_qty: Some("2".into()),
        ..o("sell", "101.00", "10").cid("ice")
    };
    assert_eq!(send!(mm, "mm", iceberg), ["accepted"]);
    let stop_buy = NewOrderRequest {
        order_type: Some("stop_market".into()),
        stop_price: Some("100.50".into()),
        ..NewOrderRequest::market("buy", "1").cid("sb")
    };
    assert_eq!(send!(t, "t", stop_buy), ["accepted"]);
    let stop_sell = NewOrderRequest {
        order_type: Some("stop_limit".into()),
        stop_price: Some("98.00".into()),
        ..o("sell", "97.00", "1").cid("ss")
    };
    assert_eq!(send!(t, "t", stop_sell), ["accepted"]);
    // Good till a second from now (stream time), then gone when a later command comes.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let gtd = NewOrderRequest {
        tif: Some("gtd".into()),
        expire_at: Some(now + 1_000_000_000),
        ..o("buy", "95.00", "1").cid("g1")
    };
    assert_eq!(send!(t, "t", gtd), ["accepted"]);
    // Take the rest at 100.00, then trade at 101.00: the stop buy triggers and fills there.
    assert_eq!(send!(t, "t", o("buy", "100.00", "5")), ["accepted", "fill"]);
    assert_eq!(
        send!(t, "t", o("buy", "101.00", "1")),
        ["accepted", "fill", "triggered", "fill"]
    );
    // Amend and cancel.
    let sent = client
        .amend(m, "mm", &Target::Cid("b1".into()), Some("4"), None)
        .await
        .expect("amend");
    let r = mm.for_seq(sent.seq, wait).await.expect("reports");
    assert_eq!(r[0].kind, "amended");
    assert_eq!(r[0].fields["leaves"], "4");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sent = client
        .cancel(m, "t", &Target::Cid("ss".into()))
        .await
        .expect("cancel");
    let kinds: Vec<String> = t
        .for_seq(sent.seq, wait)
        .await
        .expect("reports")
        .into_iter()
        .map(|r| format!("{} {}", r.kind, r.cid.unwrap_or_default()))
        .collect();
    assert_eq!(
        kinds,
        ["cancelled g1", "cancelled ss"],
        "the GTD order expired first"
    );

    // The tape has every fill once; the book deltas chain without a gap.
    let (last, _) = running.addr.send(State).await.expect("actor answers");
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
    let trades: usize = read_all(&env, "TRADES")
        .await
        .iter()
        .map(|(_, v)| v["trades"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(trades, 5);
    let mut prev = 0;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), deltas.next()).await
    {
        let d: Value = rmp_serde::from_slice(&msg.payload).expect("decodes");
        assert_eq!(d["prev_seq"].as_u64(), Some(prev), "{d}");
        prev = d["seq"].as_u64().expect("seq");
    }
    assert!(prev > 0 && prev <= last, "deltas up to {prev} of {last}");
}

/// Publishes `out`'s journal message as a market does (fenced on `prev`, the stream sequence
/// of the journal message before it); with `views`, its reports and tape too. Returns the
/// journal message's stream sequence.
async fn publish_as_owner(
    env: &Env,
    out: &agora::bus::outputs::BatchOutputs,
    prev: u64,
    views: bool,
) -> u64 {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Nats-Msg-Id",
        out.journal.msg_id.clone().expect("an id").as_str(),
    );
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        prev.to_string().as_str(),
    );
    let seq = env
        .js
        .publish_with_headers(
            out.journal.subject.clone(),
            headers,
            out.journal.payload.clone(),
        )
        .await
        .expect("journal sent")
        .await
        .expect("journal acknowledged")
        .sequence;
    if views {
        for o in out.execs.iter().chain(&out.trades) {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", o.msg_id.clone().expect("an id").as_str());
            env.js
                .publish_with_headers(o.subject.clone(), headers, o.payload.clone())
                .await
                .expect("view sent")
                .await
                .expect("view acknowledged");
        }
    }
    seq
}

/// Publishes a generated cancel-heavy flow (its resting orders, then its commands) to the
/// market's stream, one JSON message each; returns how many.
async fn publish_flow(
    env: &Env,
    market: &str,
    seed: u64,
    resting: usize,
    commands: usize,
    accounts: u32,
) -> u64 {
    let w = workload::generate(&FlowParams {
        seed,
        resting,
        spread_ticks: 20,
        commands,
        accounts,
        full_mix: true,
        young_cancel_pct: 80,
    });
    let mut n = 0;
    for c in w.prefill.iter().chain(&w.commands) {
        let line =
            serde_json::to_value(WireCommandOut::from_command(&w.spec, c, false)).expect("json");
        publish_json(env, market, &line).await;
        n += 1;
    }
    n
}

#[actix_rt::test]
async fn a_new_owner_republishes_the_views_of_the_journals_last_two_batches() {
    // An owner journals a batch, and collects its reports' acknowledgements only after the
    // next batch is journaled: if it dies then, the journal's last two batches may both lack
    // their reports. Here it published the first batch whole and only the journal messages of
    // the next two; the next owner must publish the reports of both, and nothing twice.
    let env = env("GAP-USD").await;
    let spec = MarketSpecInput::new("GAP-USD", 2, 0)
        .validate()
        .expect("spec");
    publish_flow(&env, "GAP-USD", 5, 20, 90, 4).await;
    let offline = common::offline_replay(&env.js, &env.subjects, &spec).await;
    let (expected, offline_hash) = (offline.sorted_reports(), offline.state_hash);
    let msgs = offline.msgs;
    let n = msgs.len() as u64;

    // The dead owner: three batches, the views of the last two never published.
    let mut core = MarketCore::new(Subjects::default(), spec.clone(), 100);
    let cuts = [0, msgs.len() / 2, msgs.len() * 3 / 4, msgs.len()];
    let mut prev = 0;
    for (i, range) in cuts.windows(2).enumerate() {
        let out = core.process(&msgs[range[0]..range[1]]).expect("outputs");
        prev = publish_as_owner(&env, &out, prev, i == 0).await;
    }
    let before: usize = read_all(&env, "EXECS").await.len();
    assert!(before > 0, "the first batch's reports are there");

    let running = market::start(
        env.bus(false).await,
        spec.clone(),
        MarketSettings::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (last, hash) = running.addr.send(State).await.expect("actor answers");
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(last, n);
    assert_eq!(
        hash, offline_hash,
        "the book differs from an offline replay"
    );

    let published = stored_reports(&env).await;
    assert_eq!(
        published.len(),
        expected.len(),
        "reports lost or duplicated by the recovery"
    );
    assert!(
        published == expected,
        "the published reports differ from an offline replay"
    );
    // The journal was not extended: nothing new came in.
    assert_eq!(read_all(&env, "EVENTS").await.len(), 3);
}

#[actix_rt::test]
async fn a_market_back_later_than_the_duplicate_window_stores_and_shows_each_view_once() {
    // The dead owner journaled three batches and published the views of the first two only.
    // The market comes back after the streams' duplicate window has passed, so JetStream no
    // longer knows the views' ids: only the market's own look at what is stored keeps it from
    // storing (and republishing to every subscriber) the second batch's views again. The
    // third batch's views go out once. A plain subscriber and the streams both count.
    let settings = StreamSettings {
        duplicate_window: Duration::from_secs(1),
        ..StreamSettings::default()
    };
    let env = env_with("LATE-USD", &settings).await;
    let tally = common::PublicTally::start(&env.url).await;
    let spec = MarketSpecInput::new("LATE-USD", 2, 0)
        .validate()
        .expect("spec");
    publish_flow(&env, "LATE-USD", 7, 20, 120, 4).await;
    let offline = common::offline_replay(&env.js, &env.subjects, &spec).await;
    let expected = offline.sorted_reports();
    let msgs = offline.msgs;

    let mut core = MarketCore::new(Subjects::default(), spec.clone(), 100);
    let cuts = [0, msgs.len() / 2, msgs.len() * 3 / 4, msgs.len()];
    let mut prev = 0;
    for (i, range) in cuts.windows(2).enumerate() {
        let out = core.process(&msgs[range[0]..range[1]]).expect("outputs");
        prev = publish_as_owner(&env, &out, prev, i < 2).await;
    }
    // Past the duplicate window.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let running = market::start(
        env.bus(false).await,
        spec.clone(),
        MarketSettings::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));

    let published = stored_reports(&env).await;
    assert_eq!(
        published.len(),
        expected.len(),
        "reports stored twice (or lost) by a recovery later than the duplicate window"
    );
    assert!(
        published == expected,
        "the stored reports differ from an offline replay"
    );
    let mut trade_ids: Vec<String> = read_all(&env, "TRADES")
        .await
        .into_iter()
        .flat_map(|(_, v)| v["trades"].as_array().cloned().unwrap_or_default())
        .map(|t| t["trade_id"].to_string())
        .collect();
    let stored = trade_ids.len();
    trade_ids.sort();
    trade_ids.dedup();
    assert_eq!(stored, trade_ids.len(), "trades stored twice");
    assert!(stored > 0, "the flow trades");
    tally.check(stored, Duration::from_secs(5)).await;
}

#[actix_rt::test]
async fn a_backlog_is_taken_in_full_batches() {
    // Commands already in the stream when the market starts are a backlog: a batch waits for
    // those that have not reached it yet, so they go through `fetch_max` at a time (one
    // journal message, and one report message an account, per 256 commands), and the last
    // batch ends where the stream does, without waiting.
    let env = env("FILL-USD").await;
    let spec = MarketSpecInput::new("FILL-USD", 2, 0)
        .validate()
        .expect("spec");
    let n = publish_flow(&env, "FILL-USD", 9, 100, 900, 8).await;
    let settings = MarketSettings {
        // Generous, so a slow machine cannot cut a batch short; the default is 2 ms.
        backlog_wait: Duration::from_secs(5),
        ..MarketSettings::default()
    };
    let fetch_max = settings.fetch_max as u64;
    let running = market::start(env.bus(false).await, spec, settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_journal(&env.js, "FILL-USD", n, JOURNAL_WAIT).await;
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));

    let ends: Vec<u64> = read_all(&env, "EVENTS")
        .await
        .into_iter()
        .filter(|(subject, _)| subject == "agora.events.FILL-USD")
        .filter_map(|(_, v)| v["last_seq"].as_u64())
        .collect();
    let mut expected: Vec<u64> = (1..)
        .map(|k| k * fetch_max)
        .take_while(|&end| end < n)
        .collect();
    expected.push(n);
    assert_eq!(ends, expected, "journal batches of {fetch_max} up to {n}");
}

/// A market that ran on "n1" until released, and the warm copy "n2" kept meanwhile; the copy
/// is held back behind the journal's last batches, as warm copies are, unless `ahead` (told
/// that a move is coming, it applied them too).
struct Released {
    env: Env,
    spec: agora::book::MarketSpec,
    copy: market::Follower,
    /// Where the old owner stopped, and its book's hash there.
    at: market::StopPoint,
    hash: agora::book::StateHash,
}

async fn released(market: &str) -> Released {
    released_with(market, false).await
}

async fn released_with(market: &str, ahead: bool) -> Released {
    let env = env(market).await;
    let spec = MarketSpecInput::new(market, 2, 0).validate().expect("spec");
    let order = |i: usize| {
        let (account, side) = if i % 3 == 2 {
            ("bob", "buy")
        } else {
            ("alice", "sell")
        };
        json!({"op": "new", "account": account, "cid": format!("c{i}"), "side": side,
               "price": format!("{}.00", 100 + i % 4), "qty": "2"})
    };
    let owner = MarketSettings {
        node_id: "n1".into(),
        takeover: market::Takeover::at(1, market::TakeoverKind::Placement),
        ..MarketSettings::default()
    };
    let running = market::start(env.bus(false).await, spec.clone(), owner)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut seq = 0;
    for i in 0..30 {
        seq = publish_json(&env, market, &order(i)).await;
    }
    wait_journal(&env.js, market, seq, JOURNAL_WAIT).await;
    let copy_settings = MarketSettings {
        node_id: "n2".into(),
        ..MarketSettings::default()
    };
    let copy = market::follow(env.bus(false).await, spec.clone(), copy_settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 30..60 {
        seq = publish_json(&env, market, &order(i)).await;
    }
    wait_journal(&env.js, market, seq, JOURNAL_WAIT).await;
    let started = Instant::now();
    while copy.lag() == u64::MAX || copy.lag() > 60 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the warm copy never looked at the journal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Held back: the journal's last batches are not applied, so the copy could rebuild them.
    assert!(
        copy.lag() > 0,
        "a warm copy applied the journal's last batches"
    );
    if ahead {
        copy.go_ahead();
        assert_eq!(
            copy.lag(),
            u64::MAX,
            "the lag is unknown until the copy looked"
        );
        while copy.lag() != 0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the warm copy did not go ahead: lag {}",
                copy.lag()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let owner = running.addr.clone();
    let at = running
        .hand_off()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("a clean stop says where");
    let (last, hash) = owner.send(State).await.expect("the stopped actor answers");
    assert_eq!((at.seq, last), (seq, seq));
    assert!(
        at.journal_seq.is_some(),
        "the journal's last message is known"
    );
    Released {
        env,
        spec,
        copy,
        at,
        hash,
    }
}

/// Takes the released market over on "n2" at epoch 2 (with `stop_point`, or reading the
/// journal as for a record written before stop points existed), checks its book is the old
/// owner's, and that it goes on: the next order is journaled and answered.
async fn take_over(r: Released, stop_point: Option<market::StopPoint>) {
    let market = r.spec.symbol.clone();
    let running = r
        .copy
        .promote(market::Takeover::at(
            2,
            market::TakeoverKind::Handoff { stop_point },
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (last, hash) = running.addr.send(State).await.expect("actor answers");
    assert_eq!(
        (last, hash),
        (r.at.seq, r.hash),
        "the new owner's book differs"
    );
    let execs = read_all(&r.env, "EXECS").await.len();
    let seq = publish_json(
        &r.env,
        &market,
        &json!({"op": "new", "account": "carol", "cid": "after", "side": "buy",
                "price": "103.00", "qty": "1"}),
    )
    .await;
    wait_journal(&r.env.js, &market, seq, JOURNAL_WAIT).await;
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        read_all(&r.env, "EXECS").await.len() > execs,
        "no report after the move"
    );
    // The journal stays one chain of batches: each begins after the one before.
    let mut next = 1;
    for (subject, batch) in read_all(&r.env, "EVENTS").await {
        if subject.ends_with(&market) {
            assert_eq!(
                batch["first_seq"].as_u64(),
                Some(next),
                "journal gap or overlap"
            );
            next = batch["last_seq"].as_u64().expect("last_seq") + 1;
        }
    }
    assert_eq!(next, seq + 1);
}

#[actix_rt::test]
async fn a_released_market_is_taken_over_where_its_release_record_says() {
    let r = released("HAND-USD").await;
    let at = r.at;
    take_over(r, Some(at)).await;
}

#[actix_rt::test]
async fn a_warm_copy_gone_ahead_for_a_move_takes_the_market_over_at_the_same_book() {
    let r = released_with("AHEAD-USD", true).await;
    let at = r.at;
    take_over(r, Some(at)).await;
}

#[actix_rt::test]
async fn a_warm_copy_gone_ahead_is_not_promoted_at_a_failover() {
    // It applied the journal's last batches silently, so it cannot rebuild their outputs,
    // which a failover must republish: promoting it is refused (the supervisor then starts
    // the market from its snapshot and the stream).
    let r = released_with("AHEAD2-USD", true).await;
    let refused = r
        .copy
        .promote(market::Takeover::at(2, market::TakeoverKind::Failover))
        .await;
    match refused {
        Err(market::MarketError::Recovery { reason, .. }) => {
            assert!(reason.contains("went ahead"), "{reason}")
        }
        other => panic!(
            "an ahead copy was promoted at a failover: {:?}",
            other.map(|r| r.market)
        ),
    }
}

#[actix_rt::test]
async fn a_release_record_without_a_stop_point_is_taken_over_from_the_journal() {
    // Records written before stop points existed: the new owner reads the journal's head.
    let r = released("OLD-USD").await;
    take_over(r, None).await;
}

#[actix_rt::test]
async fn a_journal_written_after_the_release_fences_the_new_owner() {
    // The release record's figures are trusted only as far as the journal fence allows: if
    // anyone extended the journal after the release (a paused former owner), the new owner's
    // first publish fails on the fence and it stops, publishing nothing.
    let r = released("ZOMBIE-USD").await;
    let market = r.spec.symbol.clone();
    let journal_seq = r.at.journal_seq.expect("journal");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "ZOMBIE-USD:zombie");
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        journal_seq.to_string().as_str(),
    );
    let payload =
        rmp_serde::to_vec_named(&json!({"first_seq": r.at.seq + 1, "last_seq": r.at.seq + 1}))
            .expect("msgpack");
    r.env
        .js
        .publish_with_headers(
            r.env.subjects.capture_events(&market),
            headers,
            payload.into(),
        )
        .await
        .expect("sent")
        .await
        .expect("the zombie's batch lands");
    let running = r
        .copy
        .promote(market::Takeover::at(
            2,
            market::TakeoverKind::Handoff {
                stop_point: Some(r.at),
            },
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let execs = read_all(&r.env, "EXECS").await.len();
    publish_json(
        &r.env,
        &market,
        &json!({"op": "new", "account": "carol", "cid": "after", "side": "buy",
                "price": "103.00", "qty": "1"}),
    )
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(20), running.join())
        .await
        .expect("the new owner stops by itself");
    assert!(
        matches!(ended, Err(market::MarketError::Fenced { .. })),
        "not fenced: {ended:?}"
    );
    assert_eq!(
        read_all(&r.env, "EXECS").await.len(),
        execs,
        "a fenced owner published"
    );
}

/// Per-account limits as a trader meets them: past the burst a new order is refused
/// `rate_limited` with when to retry, past the open-order cap `too_many_open_orders`, cancels
/// always pass, another account is not affected; and `agora replay` of the stream, with its
/// timestamps, gives the same answers.
#[actix_rt::test]
async fn per_account_limits_refuse_the_excess_and_replay_the_same() {
    let env = env("BTC-USDC").await;
    let mut input = MarketSpecInput::new("BTC-USDC", 2, 8);
    input.account_rate_per_sec = Some(10);
    input.account_burst = Some(3);
    input.account_open_orders_max = Some(2);
    let spec = input.for_new_market().validate().expect("spec");
    let running = market::start(
        env.bus(false).await,
        spec.clone(),
        MarketSettings::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // One message, one timestamp: the burst of 3 is all alice gets at once.
    let flood = json!({"op": "batch", "account": "alice", "commands": [
        {"op": "new", "cid": "a1", "side": "buy", "price": "100.00", "qty": "1"},
        {"op": "new", "cid": "a2", "side": "buy", "price": "100.00", "qty": "1"},
        {"op": "new", "cid": "a3", "side": "buy", "price": "100.00", "qty": "1"},
        {"op": "new", "cid": "a4", "side": "buy", "price": "100.00", "qty": "1", "tif": "ioc"},
        {"op": "new", "cid": "a5", "side": "buy", "price": "100.00", "qty": "1", "tif": "ioc"},
        {"op": "cancel", "cid": "a1"},
    ]});
    publish_json(&env, "BTC-USDC", &flood).await;
    let seq = publish_json(
        &env,
        "BTC-USDC",
        &json!({"op": "new", "account": "bob", "cid": "b1", "side": "sell", "price": "101.00", "qty": "1"}),
    )
    .await;
    wait_journal(&env.js, "BTC-USDC", seq, JOURNAL_WAIT).await;
    running.stop().await.unwrap_or_else(|e| panic!("{e}"));

    let reports: Vec<Value> = read_all(&env, "EXECS")
        .await
        .into_iter()
        .flat_map(|(_, v)| v["reports"].as_array().cloned().unwrap_or_default())
        .collect();
    let outcome = |r: &Value| -> String {
        match r["reason"].as_str() {
            Some(reason) => format!(
                "{} {} {reason}",
                r["cid"].as_str().unwrap_or("-"),
                r["type"].as_str().unwrap_or("?")
            ),
            None => format!(
                "{} {}",
                r["cid"].as_str().unwrap_or("-"),
                r["type"].as_str().unwrap_or("?")
            ),
        }
    };
    let live: Vec<String> = reports.iter().map(outcome).collect();
    assert_eq!(
        live,
        [
            "a1 accepted",
            "a2 accepted",
            "a3 rejected too_many_open_orders",
            "a4 accepted",
            "a4 cancelled ioc_remainder",
            "a5 rejected rate_limited",
            "a1 cancelled user",
            "b1 accepted",
        ]
    );
    let limited = reports
        .iter()
        .find(|r| r["reason"] == "rate_limited")
        .expect("a rate_limited report");
    assert_eq!(limited["retry_after_ms"], 100, "{limited}");
    assert!(
        limited["message"]
            .as_str()
            .is_some_and(|m| m.contains("10 a second (burst 3)")),
        "{limited}"
    );

    // The stream as a file of JSON lines, each with its stream timestamp and sequence.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut lines = String::new();
    let orders = env.js.get_stream("ORDERS_BTC-USDC").await.expect("stream");
    for seq in 1..=seq {
        let m = orders.get_raw_message(seq).await.expect("message");
        let mut command: Value = serde_json::from_slice(&m.payload).expect("json command");
        command["seq"] = seq.into();
        command["ts"] = u64::try_from(m.time.unix_timestamp_nanos())
            .expect("ts")
            .into();
        lines.push_str(&format!("{command}\n"));
    }
    std::fs::write(dir.path().join("stream.jsonl"), lines).expect("write");
    let spec_file = dir.path().join("spec.toml");
    std::fs::write(&spec_file, toml_of(&spec.to_input())).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
        .arg("replay")
        .arg(dir.path().join("stream.jsonl"))
        .arg("--market")
        .arg(&spec_file)
        .output()
        .expect("agora replay runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] != "trade" && e["type"] != "book")
        .map(|e| outcome(&e))
        .collect();
    assert_eq!(replayed, live, "agora replay decides as the market did");
}

/// A spec as TOML (what `--market FILE` reads).
fn toml_of(input: &MarketSpecInput) -> String {
    let value = serde_json::to_value(input).expect("spec");
    let mut out = String::new();
    for (key, v) in value.as_object().expect("map") {
        match v {
            Value::Null => {}
            Value::String(s) => out.push_str(&format!("{key} = {s:?}\n")),
            other => out.push_str(&format!("{key} = {other}\n")),
        }
    }
    out
}
