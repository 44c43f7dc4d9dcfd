//! What a new operator runs into, tried as one would: nodes started together, logins in the
//! NATS URL (never printed), a cluster's URL list, an embedded server's port across restarts,
//! a node started before NATS, liveness against readiness, a full JetStream store, a removed
//! market, a control request taken late by a stalled node, SIGTERM with NATS gone, the log's
//! format, the shipped market specs and `market.update`, and the command line's help. Each
//! against real nats-servers and the `agora` binary.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agora::bus::{self, LocalServer};
use async_nats::jetstream;
use common::{Agora, http_get, publish, scrape};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn server(dir: &Path) -> LocalServer {
    LocalServer::start(&dir.join("nats")).unwrap_or_else(|e| panic!("{e}"))
}

/// `agora <args>` run to completion: success, stdout, stderr.
fn agora(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(args)
        .output()
        .expect("agora runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `agora ctl <args> --nats-url url`: success and the reply.
fn ctl(url: &str, args: &[&str]) -> (bool, Value) {
    let mut all: Vec<&str> = vec!["ctl"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--nats-url", url]);
    let (ok, out, err) = agora(&all);
    let reply = serde_json::from_str(&out).unwrap_or_else(|_| json!({"stderr": err}));
    (ok, reply)
}

/// A node against `url` with `config`, its files under `dir`; returns once it is ready.
fn node(url: &str, dir: &Path, config: &str) -> Agora {
    std::fs::create_dir_all(dir).expect("dir");
    Agora::node(url, dir, config)
}

async fn jetstream_of(url: &str) -> jetstream::Context {
    jetstream::new(
        bus::connect(url, "test")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

#[test]
fn nodes_started_together_on_a_fresh_nats_all_run() {
    // The three-node walkthrough of docs/operations.md, three times over: every node reaches ready.
    for attempt in 0..3 {
        let dir = tempfile::tempdir().expect("temp dir");
        let nats = server(dir.path());
        let mut nodes: Vec<Agora> = (1..=3)
            .map(|n| {
                let d = dir.path().join(format!("n{n}"));
                std::fs::create_dir_all(&d).expect("dir");
                let config = d.join("node.toml");
                std::fs::write(&config, format!("node_id = \"n{n}\"\n")).expect("config");
                Agora::spawn(&[
                    "node".as_ref(),
                    "--config".as_ref(),
                    config.as_os_str(),
                    "--nats-url".as_ref(),
                    nats.url().as_ref(),
                    "--data-dir".as_ref(),
                    d.join("data").as_os_str(),
                ])
            })
            .collect();
        for (n, node) in nodes.iter_mut().enumerate() {
            let started = Instant::now();
            loop {
                if let Ok(Some(status)) = node.child.try_wait() {
                    let (out, err) = node.rest();
                    panic!(
                        "attempt {attempt}: node n{} exited ({status}): {out:?} {err:?}",
                        n + 1
                    );
                }
                if node.try_line(|l| l.contains(" ready: ")).is_some() {
                    break;
                }
                assert!(
                    started.elapsed() < WAIT,
                    "attempt {attempt}: n{} not ready",
                    n + 1
                );
            }
        }
    }
}

/// A nats-server whose only user is `agora-node` with `password`.
fn server_with_password(dir: &Path, password: &str) -> LocalServer {
    std::fs::create_dir_all(dir).expect("dir");
    let config = dir.join("users.conf");
    std::fs::write(
        &config,
        format!(
            "authorization {{ users = [ {{ user: agora-node, password: \"{password}\" }} ] }}\n"
        ),
    )
    .expect("config");
    LocalServer::start_with_config(&dir.join("nats"), &config).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_login_in_the_url_list_is_used_and_never_printed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let password = "s3cret-Pw9";
    let nats = server_with_password(dir.path(), password);
    let dead = bus::server::free_port().unwrap_or_else(|e| panic!("{e}"));
    // The list form a cluster's servers are given in, with spaces, the login in each URL.
    let url = format!(
        "nats://agora-node:{password}@127.0.0.1:{dead} , nats://agora-node:{password}@127.0.0.1:{}",
        nats.port()
    );
    let data = dir.path().join("n1");
    let mut n = Agora::spawn(&[
        "node",
        "--node-id",
        "n1",
        "--nats-url",
        &url,
        "--data-dir",
        data.to_str().expect("utf-8"),
    ]);
    let ready = n.wait_line(|l| l.contains(" ready: "), WAIT);
    let (ok, reply) = ctl(&url, &["market.list"]);
    assert!(ok, "{reply}");
    assert_eq!(
        reply["markets"].as_array().map(Vec::len),
        Some(3),
        "{reply}"
    );
    assert!(n.terminate(WAIT).success());
    let (out, err) = n.rest();
    let all = format!("{ready}{out:?}{err:?}");
    assert!(
        all.contains("***@127.0.0.1"),
        "the URL is shown, redacted: {all}"
    );
    assert!(!all.contains(password), "the password was printed: {all}");

    // A wrong password: refused at once, saying so, without the password.
    let wrong = format!("nats://agora-node:not-{password}@127.0.0.1:{}", nats.port());
    let data = dir.path().join("n2");
    let (ok, out, err) = agora(&[
        "node",
        "--nats-url",
        &wrong,
        "--data-dir",
        data.to_str().expect("utf-8"),
    ]);
    assert!(!ok);
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(
        !err.contains(password) && !out.contains(password),
        "{out}{err}"
    );
    // A login in the URL and in the settings both: refused before anything is sent.
    let (ok, _, err) = agora(&[
        "ctl",
        "market.list",
        "--nats-url",
        &url,
        "--token",
        "t",
        "--timeout-secs",
        "2",
    ]);
    assert!(!ok && err.contains("use one of them"), "{err}");
    assert!(!err.contains(password), "{err}");
}

#[test]
fn an_embedded_server_keeps_its_port_and_a_node_waits_for_nats() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let start = || {
        let node = Agora::spawn(&["node".as_ref(), "--data-dir".as_ref(), data.as_os_str()]);
        let line = node.wait_line(|l| l.starts_with("started nats-server at "), WAIT);
        node.wait_line(|l| l.contains(" ready: "), WAIT);
        let url = line.split_whitespace().nth(3).expect("the URL").to_string();
        (node, url)
    };
    let (mut first, url) = start();
    assert!(first.terminate(WAIT).success());
    let (mut second, again) = start();
    assert_eq!(url, again, "an exported AGORA_NATS_URL must stay right");
    assert!(second.terminate(WAIT).success());

    // A node started before its NATS waits for it, saying so, and runs once it is up.
    let port = bus::server::free_port().unwrap_or_else(|e| panic!("{e}"));
    let n = Agora::spawn(&[
        "node",
        "--nats-url",
        &format!("nats://127.0.0.1:{port}"),
        "--data-dir",
        dir.path().join("late").to_str().expect("utf-8"),
    ]);
    n.wait_line(
        |l| l.contains("waiting for NATS at nats://127.0.0.1:"),
        WAIT,
    );
    let _nats =
        LocalServer::start_with(&bus::server::default_binary(), port, &dir.path().join("n"))
            .unwrap_or_else(|e| panic!("{e}"));
    n.wait_line(|l| l.contains(" ready: "), WAIT);
}

async fn poll(port: u16, path: &str, until: impl Fn(u16, &Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (status, body) = http_get(port, &format!("GET {path}"));
        if until(status, &body) {
            return body;
        }
        assert!(started.elapsed() < WAIT, "{path} stayed {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn liveness_ignores_a_nats_outage_and_readiness_says_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut nats = server(dir.path());
    let port = bus::server::free_port().unwrap_or_else(|e| panic!("{e}"));
    let n = node(
        &nats.url(),
        &dir.path().join("n1"),
        &format!("node_id = \"n1\"\nhttp_port = {port}\nhttp_addr = \"127.0.0.1\"\n"),
    );
    let body = poll(port, "/ready", |s, _| s == 200).await;
    assert_eq!(body["markets"].as_array().map(Vec::len), Some(3), "{body}");
    // Prometheus conventions: every family has its HELP and TYPE; the build and the process.
    let text = scrape(port);
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let family = line.split_whitespace().nth(2).expect("a name");
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
    }
    assert!(
        text.contains(&format!("commit=\"{}\"", agora::COMMIT)),
        "{text}"
    );
    for family in [
        "agora_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(text.lines().any(|l| l.starts_with(family)), "no {family}");
    }

    nats.stop();
    let body = poll(port, "/ready", |s, _| s == 503).await;
    assert!(
        body["reason"].as_str().unwrap_or("").contains("NATS"),
        "{body}"
    );
    let (status, body) = http_get(port, "GET /health");
    assert_eq!(status, 200, "a NATS outage is not for liveness: {body}");
    nats.restart().unwrap_or_else(|e| panic!("{e}"));
    poll(port, "/ready", |s, _| s == 200).await;
    drop(n);
}

#[tokio::test]
async fn a_node_with_a_full_store_is_not_ready_and_says_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("full.conf");
    std::fs::write(&config, "jetstream { max_file_store: 8MB }\n").expect("config");
    let nats = LocalServer::start_with_config(&dir.path().join("nats"), &config)
        .unwrap_or_else(|e| panic!("{e}"));
    let port = bus::server::free_port().unwrap_or_else(|e| panic!("{e}"));
    let n = node(
        &nats.url(),
        &dir.path().join("n1"),
        &format!("node_id = \"n1\"\nhttp_port = {port}\n"),
    );
    poll(port, "/ready", |s, _| s == 200).await;
    // Fill the store with another stream until JetStream refuses.
    let js = jetstream_of(&nats.url()).await;
    js.create_stream(jetstream::stream::Config {
        name: "FILL".into(),
        subjects: vec!["fill".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    let blob = bytes::Bytes::from(vec![b'x'; 200_000]);
    for _ in 0..200 {
        let stored = match js.publish("fill", blob.clone()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if !stored {
            break;
        }
    }
    let body = poll(port, "/ready", |s, _| s == 503).await;
    let reason = body["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("runs no markets") && reason.contains("insufficient resources"),
        "NATS's own error is named: {body}"
    );
    let text = scrape(port);
    assert!(text.contains("matching_node_heartbeat_ok 0"), "{text}");
    let (ok, list) = ctl(&nats.url(), &["market.list"]);
    assert!(ok, "{list}");
    assert!(
        list["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("runs no markets") && p.contains("insufficient resources")),
        "market.list says why: {list}"
    );
    // Room again: the node takes its markets back and is ready.
    js.delete_stream("FILL").await.expect("delete");
    poll(port, "/ready", |s, b| {
        s == 200 && b["markets"].as_array().is_some_and(|m| m.len() == 3)
    })
    .await;
    let errors = {
        let mut n = n;
        assert!(n.terminate(WAIT).success());
        n.rest().1
    };
    assert!(
        errors
            .iter()
            .any(|l| l.contains("heartbeat not renewed") && l.contains("insufficient resources")),
        "the log names the storage error: {errors:?}"
    );
}

#[tokio::test]
async fn markets_removed_updated_and_checked_as_an_operator_does() {
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = server(dir.path());
    let url = nats.url();
    let n = node(&url, &dir.path().join("n1"), "node_id = \"n1\"\n");
    let js = jetstream_of(&url).await;
    let root = env!("CARGO_MANIFEST_DIR");
    let btc = format!("{root}/config/markets/btc-usdc.toml");

    // The shipped spec is what runs: BTC-USDC's max_qty of 1000 holds, and docs/operations.md's
    // market.add of the same file is accepted as the market it already is.
    let (ok, reply) = ctl(&url, &["market.add", "--spec", &btc]);
    assert!(ok, "{reply}");
    assert_eq!(reply["created"], false);
    let (ok, out, _) = agora(&[
        "order",
        "place",
        "--market",
        "BTC-USDC",
        "--account",
        "alice",
        "--side",
        "buy",
        "--price",
        "65000.01",
        "--qty",
        "1001",
        "--nats-url",
        &url,
    ]);
    // A rejected command prints its report and exits non-zero.
    assert!(!ok && out.contains("qty_above_max"), "{out}");
    // A negative price parses as a value (and the engine says what is wrong with it).
    let (ok, out, err) = agora(&[
        "order",
        "place",
        "--market",
        "BTC-USDC",
        "--account",
        "alice",
        "--side",
        "buy",
        "--price",
        "-5",
        "--qty",
        "1",
        "--nats-url",
        &url,
    ]);
    assert!(!ok && out.contains("negative"), "{out}{err}");
    assert!(err.contains("the command was rejected"), "{err}");

    // market.update: refused while an open order is off the new tick, applied after.
    let (ok, out, _) = agora(&[
        "order",
        "place",
        "--market",
        "BTC-USDC",
        "--account",
        "alice",
        "--side",
        "buy",
        "--price",
        "65000.01",
        "--qty",
        "1",
        "--cid",
        "a1",
        "--nats-url",
        &url,
    ]);
    assert!(ok && out.contains("accepted"), "{out}");
    let coarse = dir.path().join("btc-coarse.toml");
    std::fs::write(
        &coarse,
        std::fs::read_to_string(&btc)
            .expect("spec")
            .replace("tick_size = \"0.01\"", "tick_size = \"0.05\""),
    )
    .expect("write");
    let coarse = coarse.to_str().expect("utf-8");
    let (ok, reply) = ctl(&url, &["market.update", "--spec", coarse]);
    assert!(!ok && reply["error"] == "refused", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or("")
            .contains("off the tick"),
        "{reply}"
    );
    let (ok, _, _) = agora(&[
        "order",
        "cancel",
        "--market",
        "BTC-USDC",
        "--account",
        "alice",
        "--cid",
        "a1",
        "--nats-url",
        &url,
    ]);
    assert!(ok);
    let (ok, reply) = ctl(&url, &["market.update", "--spec", coarse]);
    assert!(ok, "{reply}");
    assert_eq!(reply["spec"]["tick_size"], "0.05");
    let off_tick = [
        "order",
        "place",
        "--market",
        "BTC-USDC",
        "--account",
        "alice",
        "--side",
        "buy",
        "--price",
        "65000.01",
        "--qty",
        "1",
        "--nats-url",
        &url,
    ];
    let (_, out, _) = agora(&off_tick);
    assert!(out.contains("price_not_on_tick"), "{out}");
    // Decimals cannot change.
    let decimals = dir.path().join("btc-decimals.toml");
    std::fs::write(
        &decimals,
        std::fs::read_to_string(&btc)
            .expect("spec")
            .replace("price_decimals = 2", "price_decimals = 3"),
    )
    .expect("write");
    let (ok, reply) = ctl(
        &url,
        &["market.update", "--spec", decimals.to_str().expect("utf-8")],
    );
    assert!(
        !ok && reply["message"]
            .as_str()
            .unwrap_or("")
            .contains("cannot change"),
        "{reply}"
    );

    // Symbols with an empty part, and an unknown node, are refused.
    for symbol in ["-", "-A", "A-", "--", "_"] {
        let spec = dir.path().join("bad.toml");
        std::fs::write(
            &spec,
            format!("symbol = \"{symbol}\"\nprice_decimals = 2\nsize_decimals = 0\n"),
        )
        .expect("write");
        let (ok, reply) = ctl(
            &url,
            &["market.add", "--spec", spec.to_str().expect("utf-8")],
        );
        assert!(!ok && reply["error"] == "invalid_spec", "{symbol}: {reply}");
    }
    let (ok, reply) = ctl(&url, &["node.undrain", "nope"]);
    assert!(!ok && reply["error"] == "unknown_node", "{reply}");
    let (ok, reply) = ctl(&url, &["node.drain", "nope"]);
    assert!(!ok && reply["error"] == "unknown_node", "{reply}");
    // The only node cannot be drained: nothing could take its markets. The refusal comes
    // after a lease of looking, and leaves the node as it was.
    let (ok, reply) = ctl(&url, &["node.drain", "n1"]);
    assert!(!ok && reply["error"] == "no_target", "{reply}");
    let (ok, reply) = ctl(&url, &["node.list"]);
    assert!(ok, "{reply}");
    assert_eq!(reply["nodes"][0]["draining"], false, "{reply}");
    // Watching an unknown market is an error at once, not a silent wait.
    let (ok, _, err) = agora(&["watch", "trades", "--market", "NOPE", "--nats-url", &url]);
    assert!(!ok && err.contains("no market NOPE"), "{err}");

    // A removed market refuses orders at once; nothing is parked for it; added again, it
    // runs on and takes orders.
    let spec = dir.path().join("gone.toml");
    std::fs::write(
        &spec,
        "symbol = \"GONE-USD\"\nprice_decimals = 2\nsize_decimals = 0\n",
    )
    .expect("write");
    let spec = spec.to_str().expect("utf-8");
    assert!(ctl(&url, &["market.add", "--spec", spec]).0);
    publish(
        &js,
        "GONE-USD",
        json!({"op": "new", "account": "a", "side": "buy", "price": "1.00", "qty": "1"}),
    )
    .await;
    let (ok, reply) = ctl(&url, &["market.remove", "GONE-USD"]);
    assert!(ok, "{reply}");
    let bytes =
        rmp_serde::to_vec_named(&json!({"op": "cancel_all", "account": "a"})).expect("msgpack");
    let refused = match js.publish("agora.orders.GONE-USD", bytes.into()).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a removed market took an order");
    let (ok, out, err) = agora(&[
        "order",
        "place",
        "--market",
        "GONE-USD",
        "--account",
        "a",
        "--side",
        "buy",
        "--price",
        "1.00",
        "--qty",
        "1",
        "--nats-url",
        &url,
    ]);
    assert!(!ok && err.contains("does not take orders"), "{out}{err}");
    let (ok, reply) = ctl(&url, &["market.add", "--spec", spec]);
    assert!(ok, "{reply}");
    assert_eq!(reply["pending_applied"], 0, "{reply}");
    let (ok, out, _) = agora(&[
        "order",
        "place",
        "--market",
        "GONE-USD",
        "--account",
        "a",
        "--side",
        "sell",
        "--price",
        "1.00",
        "--qty",
        "1",
        "--nats-url",
        &url,
    ]);
    assert!(
        ok && out.contains("fill"),
        "the resting order survived the removal: {out}"
    );

    // The update survives a restart (snapshot or replay alike).
    let mut n = n;
    assert!(n.terminate(WAIT).success());
    let _n = node(&url, &dir.path().join("n1"), "node_id = \"n1\"\n");
    let (_, out, _) = agora(&off_tick);
    assert!(out.contains("price_not_on_tick"), "{out}");
}

#[test]
fn a_control_request_taken_late_is_not_carried_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = server(dir.path());
    let url = nats.url();
    let n1 = node(&url, &dir.path().join("n1"), "node_id = \"n1\"\n");
    // One node stalled: a halt sent meanwhile times out, and must not happen when it wakes.
    n1.signal(libc::SIGSTOP);
    let (ok, reply) = ctl(&url, &["market.halt", "ETH-USDC", "--timeout-secs", "2"]);
    assert!(!ok, "{reply}");
    println!("the halt sent to the stalled node: {reply}");
    n1.signal(libc::SIGCONT);
    // Woken, the node finds the request past its deadline and drops it; on a loaded machine
    // the server may instead have closed the stalled connection, and the request died with
    // it. Either way it cannot happen later, which the state below checks.
    let woke = n1.wait_err_line(
        |l| l.contains("control request dropped") || l.contains("NATS connection lost"),
        WAIT,
    );
    println!("after the stall: {woke}");
    // The stall outlived the node's lease, so its markets may be starting again: wait until
    // ETH-USDC runs, then it must be active, not halted.
    let started = Instant::now();
    let eth = loop {
        let (ok, reply) = ctl(&url, &["market.list"]);
        assert!(ok, "{reply}");
        let eth = reply["markets"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["symbol"] == "ETH-USDC"))
            .cloned()
            .unwrap_or_default();
        if eth["running"] == true {
            break eth;
        }
        assert!(
            started.elapsed() < WAIT,
            "ETH-USDC does not run again: {eth}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        eth["state"], "active",
        "the late halt was carried out: {eth}"
    );

    // Two nodes, one stalled: a read-only verb is asked again until the other answers.
    let n2 = node(&url, &dir.path().join("n2"), "node_id = \"n2\"\n");
    n2.signal(libc::SIGSTOP);
    let (ok, reply) = ctl(&url, &["node.list", "--timeout-secs", "45"]);
    n2.signal(libc::SIGCONT);
    assert!(ok, "{reply}");
}

#[test]
fn sigterm_stops_a_node_within_its_bound_while_nats_is_gone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut nats = server(dir.path());
    let mut n = node(
        &nats.url(),
        &dir.path().join("n1"),
        "node_id = \"n1\"\nshutdown_timeout_secs = 3\n",
    );
    nats.stop();
    std::thread::sleep(Duration::from_millis(500));
    assert!(n.terminate(WAIT).success());
    let (_, errors) = n.rest();
    assert!(
        errors
            .iter()
            .any(|l| l.contains("stopping took over 3s") && l.contains("unreachable")),
        "{errors:?}"
    );
}

#[test]
fn a_node_is_quiet_and_plain_by_default_and_json_on_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = server(dir.path());
    let run = |format: &str, log: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agora"));
        command
            .args([
                "node",
                "--nats-url",
                &nats.url(),
                "--node-id",
                "n1",
                "--log-format",
                format,
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("AGORA_LOG")
            .env_remove("NO_COLOR")
            // A loaded machine's stall must not renew the lease late and warn about it: this
            // test is about what a healthy node says.
            .env("AGORA_CLUSTER__HEARTBEAT_MS", "300")
            .env("AGORA_CLUSTER__LEASE_MS", "5000")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(log) = log {
            command.env("AGORA_LOG", log);
        }
        let mut child = command.spawn().expect("starts");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
        let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
        std::thread::sleep(Duration::from_secs(4));
        // SAFETY: kill with a pid we own and a valid signal.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        assert!(child.wait().expect("exits").success());
        (
            out.join().expect("stdout read"),
            err.join().expect("stderr read"),
        )
    };
    let (out, err) = run("text", None);
    assert!(
        out.contains(" ready: ") && out.contains(" stopped"),
        "{out}"
    );
    assert!(
        out.lines().count() <= 10,
        "what it runs and where, no more: {out}"
    );
    assert!(
        err.trim().is_empty(),
        "nothing to warn about on a clean run and stop: {err}"
    );
    let (out, err) = run("json", Some("info"));
    assert!(
        !err.contains('\u{1b}'),
        "no colour codes off a terminal: {err}"
    );
    for line in out.lines().chain(err.lines()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(out.contains(" ready: "), "{out}");
    assert!(
        err.lines().count() > 3,
        "info lines come as JSON too: {err}"
    );
}

#[test]
fn the_command_line_explains_itself() {
    let (ok, out, _) = agora(&["--version"]);
    assert!(
        ok && out.contains(&format!("(commit {})", agora::COMMIT)),
        "{out}"
    );
    let (_, out, _) = agora(&["node", "--help"]);
    for needle in ["/metrics", "--http-addr", "--log-format", "comma-separated"] {
        assert!(out.contains(needle), "node --help lacks {needle}: {out}");
    }
    let (_, out, _) = agora(&["order", "place", "--help"]);
    for needle in [
        "--market <MARKET>",
        "The market, e.g. BTC-USDC",
        "--qty <QTY>",
        "Total quantity",
        "--price <PRICE>",
        "Limit price",
    ] {
        assert!(
            out.contains(needle),
            "order place --help lacks {needle:?}: {out}"
        );
    }
    let (_, out, _) = agora(&["ctl", "--help"]);
    for verb in [
        "market.add",
        "market.update",
        "market.remove",
        "market.halt",
        "market.list",
        "node.drain",
    ] {
        assert!(out.contains(verb), "ctl --help lacks {verb}: {out}");
    }
    let (_, out, _) = agora(&["ctl", "market.move", "--help"]);
    assert!(out.contains("--to <NODE>"), "{out}");
    let (ok, _, err) = agora(&["ctl", "market.halt"]);
    assert!(
        !ok && err.contains("<SYMBOL>"),
        "a missing argument is named: {err}"
    );
}
