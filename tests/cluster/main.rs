//! Several `agora node` processes, as a cluster runs them: on one nats-server (`moves`), and on
//! a JetStream cluster of three with every stream and bucket at three replicas
//! (`replicated`), where NATS servers die, lose quorum and get cut off. Every check ends with
//! the published execution reports equal to an offline replay of the order streams: nothing
//! lost, nothing twice.

#[path = "../common/mod.rs"]
mod common;
mod moves;
mod queries;
mod replicated;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agora::bus::{self, LocalServer};
use async_nats::jetstream;
use common::Agora;
use futures::StreamExt;
use serde_json::Value;

const MARKETS: &str = "[[markets]]\nsymbol = \"A-USD\"\nprice_decimals = 2\nsize_decimals = 0\n\n[[markets]]\nsymbol = \"B-USD\"\nprice_decimals = 2\nsize_decimals = 0\n";

struct Cluster {
    /// Lines added to every node's `[cluster]` section.
    cluster_lines: String,
    dir: tempfile::TempDir,
    /// One nats-server, or the three of a JetStream cluster.
    servers: Vec<LocalServer>,
    nodes: BTreeMap<String, Agora>,
    /// Each node's HTTP port (`/metrics`).
    ports: BTreeMap<String, u16>,
    js: jetstream::Context,
    client: async_nats::Client,
}

/// Waits until JetStream answers through `js` (a cluster's meta leader elected).
async fn wait_jetstream(js: &jetstream::Context, timeout: Duration) {
    let started = Instant::now();
    loop {
        match js.query_account().await {
            Ok(_) => return,
            Err(e) if started.elapsed() > timeout => {
                panic!("JetStream did not answer within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl Cluster {
    /// A nats-server and `n` nodes `n1..`, each with `extra` in its configuration; returns once
    /// every node printed its ready line.
    async fn start(n: usize, extra: &str) -> Cluster {
        Cluster::start_with(n, extra, "rebalance_every_secs = 0").await
    }

    async fn start_with(n: usize, extra: &str, cluster_lines: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
        Cluster::start_on(dir, vec![server], n, extra, cluster_lines).await
    }

    /// Three nats-servers clustered on loopback (routes, JetStream, a store each), and `n`
    /// nodes connected with the list of all three and `[streams] replicas = 3`. The servers do
    /// not advertise their client URLs, so a client reaches only the servers it was given (a
    /// partition of one node cuts it off for real).
    async fn replicated(n: usize, cluster_lines: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let free = || bus::server::free_port().unwrap_or_else(|e| panic!("{e}"));
        // A route port picked free can be taken before its server binds it: by the other
        // servers' own outgoing route connections, whose local ports come from the same
        // range. Then the three start again on new ports (a few times; then the error stands).
        let mut attempt = 0;
        let servers = 'start: loop {
            attempt += 1;
            let routes: Vec<u16> = (0..3).map(|_| free()).collect();
            let list = routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let mut servers = Vec::new();
            for (i, port) in routes.iter().enumerate() {
                let config = dir.path().join(format!("nats{i}-{attempt}.conf"));
                std::fs::write(
                    &config,
                    format!(
                        "cluster {{\n  name: \"agora-test\"\n  listen: \"127.0.0.1:{port}\"\n  no_advertise: true\n  routes: [{list}]\n}}\n"
                    ),
                )
                .expect("write nats config");
                match LocalServer::start_with_config(
                    &dir.path().join(format!("nats{i}-{attempt}")),
                    &config,
                ) {
                    Ok(server) => servers.push(server),
                    Err(e) if attempt < 4 && e.to_string().contains("address already in use") => {
                        eprintln!(
                            "nats-server {i} could not bind its port, starting the three again: {e}"
                        );
                        continue 'start;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            break servers;
        };
        Cluster::start_on(dir, servers, n, "", cluster_lines).await
    }

    async fn start_on(
        dir: tempfile::TempDir,
        servers: Vec<LocalServer>,
        n: usize,
        extra: &str,
        cluster_lines: &str,
    ) -> Cluster {
        let url = servers
            .iter()
            .map(LocalServer::url)
            .collect::<Vec<_>>()
            .join(",");
        let client = bus::connect(&url, "test")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let js = jetstream::new(client.clone());
        wait_jetstream(&js, Duration::from_secs(30)).await;
        let mut cluster = Cluster {
            cluster_lines: cluster_lines.to_string(),
            dir,
            servers,
            nodes: BTreeMap::new(),
            ports: BTreeMap::new(),
            js,
            client,
        };
        for i in 1..=n {
            cluster.start_node(&format!("n{i}"), extra);
        }
        cluster
    }

    fn start_node(&mut self, id: &str, extra: &str) {
        let url = self.url();
        self.start_node_at(id, extra, &url);
    }

    /// A node connected to `url` (a proxy, say) instead of the servers themselves.
    fn start_node_at(&mut self, id: &str, extra: &str, url: &str) {
        self.start_node_full(id, extra, url, "");
    }

    /// A node with `cluster_extra` added to its own `[cluster]` section (`prefer = [...]`).
    fn start_node_preferring(&mut self, id: &str, markets: &[&str]) {
        let url = self.url();
        let list = markets
            .iter()
            .map(|m| format!("\"{m}\""))
            .collect::<Vec<_>>()
            .join(", ");
        self.start_node_full(id, "", &url, &format!("prefer = [{list}]"));
    }

    fn start_node_full(&mut self, id: &str, extra: &str, url: &str, cluster_extra: &str) {
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(&dir).expect("node dir");
        // Timers loose enough for a busy two-core machine running tests side by side.
        let port = *self
            .ports
            .entry(id.to_string())
            .or_insert_with(|| bus::server::free_port().unwrap_or_else(|e| panic!("{e}")));
        let replicas = self.servers.len().min(3);
        let config = format!(
            "node_id = \"{id}\"\nhttp_port = {port}\n{extra}\n[cluster]\nheartbeat_ms = 100\nlease_ms = 1500\n{}\n{cluster_extra}\n[snapshots]\nevery_commands = 400\n[market]\nfetch_max = 64\n[streams]\nreplicas = {replicas}\n{MARKETS}",
            self.cluster_lines
        );
        let node = Agora::node(url, &dir, &config);
        self.nodes.insert(id.to_string(), node);
    }

    /// The sum over the live nodes of a metric's series named exactly `name`.
    fn metric(&self, name: &str) -> f64 {
        use std::io::{Read, Write};
        let mut total = 0.0;
        for id in self.nodes.keys() {
            let mut stream =
                std::net::TcpStream::connect(("127.0.0.1", self.ports[id])).expect("connect");
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .expect("write");
            let mut response = String::new();
            stream.read_to_string(&mut response).expect("read");
            total += response
                .lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        total
    }

    /// Every node's output not read yet, for a failing test's message.
    fn dump(&self) -> String {
        let mut out = String::new();
        for (id, node) in &self.nodes {
            let (stdout, stderr) = node.rest();
            out.push_str(&format!(
                "\n--- {id} stdout:\n{}\n--- {id} stderr:\n{}",
                stdout.join("\n"),
                stderr.join("\n")
            ));
        }
        out
    }

    /// Waits until `market`'s journal covers input sequence `seq`; on a timeout the panic
    /// carries every node's output.
    async fn wait_journal(&self, market: &str, seq: u64, timeout: Duration) {
        let started = Instant::now();
        loop {
            let last = common::journal_last_seq(&self.js, market).await;
            if last >= Some(seq) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "the journal of {market} did not reach input sequence {seq} within {timeout:?}; it showed {last:?}{}",
                self.dump()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The NATS URL list of every server.
    fn url(&self) -> String {
        self.servers
            .iter()
            .map(LocalServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn kill(&mut self, id: &str) {
        if let Some(mut node) = self.nodes.remove(id) {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }

    fn signal(&self, id: &str, signal: libc::c_int) {
        self.nodes[id].signal(signal);
    }

    /// `agora ctl <args>`: whether it succeeded, and the reply.
    fn ctl(&self, args: &[&str]) -> (bool, Value) {
        let out = Command::new(env!("CARGO_BIN_EXE_agora"))
            .arg("ctl")
            .args(args)
            .args(["--nats-url", &self.url()])
            .output()
            .expect("agora ctl runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let reply = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "agora ctl {args:?} printed {stdout:?} ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), reply)
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

    /// Moves `market` to `to` with `agora ctl market.move`; returns the pause in ms.
    fn move_market(&self, market: &str, to: &str) -> f64 {
        let (ok, reply) = self.ctl(&["market.move", market, "--to", to]);
        assert!(ok, "market.move {market} --to {to}: {reply}");
        assert_eq!(reply["to"], to);
        assert_eq!(
            reply["state_hash_equal"], true,
            "the new owner's book equals the old owner's: {reply}"
        );
        reply["pause_ms"].as_f64().expect("pause")
    }

    /// `node`'s row in `node.list` (panics, with the list, if it has none).
    fn node_row(&self, node: &str) -> Value {
        let (ok, nodes) = self.ctl(&["node.list"]);
        assert!(ok, "{nodes}");
        nodes["nodes"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["node"] == node))
            .cloned()
            .unwrap_or_else(|| panic!("node.list has no row for {node}: {nodes}"))
    }

    /// Asks `node.list` every 200 ms until `node`'s row is as `wanted`; returns that row
    /// (panics after `timeout`, saying `what` was awaited).
    async fn wait_node_row(
        &self,
        node: &str,
        wanted: impl Fn(&Value) -> bool,
        timeout: Duration,
        what: &str,
    ) -> Value {
        let started = Instant::now();
        loop {
            let row = self.node_row(node);
            if wanted(&row) {
                return row;
            }
            assert!(
                started.elapsed() < timeout,
                "{node} not {what} in node.list after {timeout:?}: {row}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits up to 20 s until `node.list` shows `node` alive (or dead); returns its row.
    async fn wait_node_alive(&self, node: &str, alive: bool) -> Value {
        let what = if alive { "alive" } else { "dead" };
        self.wait_node_row(
            node,
            |row| row["alive"] == alive,
            Duration::from_secs(20),
            what,
        )
        .await
    }

    /// A subscription to `market`'s status announcements.
    async fn status(&self, market: &str) -> async_nats::Subscriber {
        self.client
            .subscribe(format!("agora.status.{market}"))
            .await
            .expect("subscribe")
    }

    /// Waits until `market` announces itself active on a node other than `not`, at least at
    /// `epoch`; returns that node.
    async fn wait_active(
        &self,
        status: &mut async_nats::Subscriber,
        not: &str,
        epoch: u64,
        timeout: Duration,
    ) -> String {
        let started = Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let m = tokio::time::timeout(left, status.next())
                .await
                .unwrap_or_else(|_| panic!("no node announced the market within {timeout:?}"))
                .expect("status subscription");
            let s: Value = rmp_serde::from_slice(&m.payload).expect("status");
            if s["state"] == "active"
                && s["node"] != not
                && s["epoch"].as_u64().unwrap_or(0) >= epoch
            {
                return s["node"].as_str().expect("node").to_string();
            }
        }
    }
}

/// Waits until `flow` sent `n` commands; panics instead of hanging if it ended first or took
/// over a minute.
async fn wait_sent(sent: &AtomicU64, n: u64, flow: &tokio::task::JoinHandle<()>) {
    let started = Instant::now();
    while sent.load(Ordering::Relaxed) < n {
        assert!(
            !flow.is_finished(),
            "the flow ended after {} of the {n} commands awaited",
            sent.load(Ordering::Relaxed)
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the flow sent {} of the {n} commands awaited in a minute",
            sent.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads the market's status announcements until `until`: `node`, which lost the market (and
/// then woke, or came back from a partition), must never announce it active again.
async fn assert_never_active_again(
    status: &mut async_nats::Subscriber,
    node: &str,
    until: Instant,
    after: &str,
) {
    while Instant::now() < until {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), status.next()).await {
            let s: Value = rmp_serde::from_slice(&m.payload).expect("status");
            assert!(
                !(s["node"] == node && s["state"] == "active"),
                "{node} ran the market again after {after}: {s}"
            );
        }
    }
}

/// The commands of a generated workload for `market`, as JSON.
fn workload(seed: u64, commands: usize) -> Vec<Value> {
    let w = agora::workload::generate(&agora::workload::FlowParams {
        seed,
        resting: 40,
        spread_ticks: 30,
        commands,
        accounts: 6,
        full_mix: true,
        young_cancel_pct: 70,
    });
    w.prefill
        .iter()
        .chain(&w.commands)
        .map(|c| {
            serde_json::to_value(agora::wire::WireCommandOut::from_command(&w.spec, c, false))
                .expect("json")
        })
        .collect()
}

/// Publishes `commands` to `market` in windows of 20 (acks awaited together), about `rate` a
/// second, until done; counts what was acknowledged. Each message carries a `Nats-Msg-Id` of
/// its own, so a window whose acks were lost (NATS restarting) is sent again without doubles.
fn load(
    js: &jetstream::Context,
    market: &str,
    commands: Vec<Value>,
    rate: u64,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let (js, subject) = (js.clone(), format!("agora.orders.{market}"));
    let run = format!("{market}-{}", agora::cluster::membership::unix_ms());
    tokio::spawn(async move {
        let started = Instant::now();
        for (i, window) in commands.chunks(20).enumerate() {
            let publish_window = || async {
                let mut acks = Vec::new();
                for (j, c) in window.iter().enumerate() {
                    let bytes = rmp_serde::to_vec_named(c).expect("msgpack");
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("{run}-{i}-{j}").as_str());
                    acks.push(
                        js.publish_with_headers(subject.clone(), headers, bytes.into())
                            .await
                            .map_err(|e| e.to_string())?,
                    );
                }
                for ack in acks {
                    ack.await.map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            };
            // Retried for as long as a NATS outage in a test may last (servers restarting,
            // a quorum lost and regained).
            let first_try = Instant::now();
            while let Err(e) = publish_window().await {
                assert!(
                    first_try.elapsed() < Duration::from_secs(90),
                    "window {i} never acknowledged: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            sent.fetch_add(window.len() as u64, Ordering::Relaxed);
            let due = Duration::from_secs_f64((i + 1) as f64 * 20.0 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    })
}

/// How long a test waits for a market's journal to cover what it sent.
const JOURNAL_WAIT: Duration = Duration::from_secs(60);

/// The journal of `market` covers the stream without gaps or overlaps: each batch starts right
/// after the one before.
async fn check_journal(js: &jetstream::Context, market: &str) -> usize {
    let mut events = js.get_stream("EVENTS").await.expect("EVENTS");
    let last = events.info().await.expect("info").state.last_sequence;
    let subject = format!("agora.events.{market}");
    let mut next = 1;
    let mut batches = 0;
    for seq in 1..=last {
        let Ok(m) = events.get_raw_message(seq).await else {
            continue;
        };
        if m.subject.as_str() != subject {
            continue;
        }
        let head: Value = rmp_serde::from_slice(&m.payload).expect("journal message");
        let (first, last) = (
            head["first_seq"].as_u64().expect("first_seq"),
            head["last_seq"].as_u64().expect("last_seq"),
        );
        assert_eq!(
            first, next,
            "journal batch {batches} of {market} covers {first}..={last}, expected to start at {next}"
        );
        next = last + 1;
        batches += 1;
    }
    batches
}

/// Every report in EXECS for `market` equals an offline replay of its order stream.
async fn check_exactly_once(js: &jetstream::Context, market: &str) -> usize {
    let spec = common::stored_spec(js, market).await;
    let offline = common::offline_replay(js, &agora::bus::Subjects::default(), &spec).await;
    let expected = offline.sorted_reports();
    // Each account's reports in order: what its subscriber sees.
    let expected_by_account = offline.reports;
    let mut execs = js.get_stream("EXECS").await.expect("EXECS");
    let last = execs.info().await.expect("info").state.last_sequence;
    let mut published = Vec::new();
    let mut published_by_account: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for seq in 1..=last {
        if let Ok(m) = execs.get_raw_message(seq).await
            && m.subject.as_str().ends_with(&format!(".{market}"))
        {
            let reports = common::exec_reports(&m.payload);
            published_by_account
                .entry(m.subject.to_string())
                .or_default()
                .extend(reports.iter().cloned());
            published.extend(reports);
        }
    }
    for (subject, reports) in &expected_by_account {
        assert!(
            published_by_account.get(subject) == Some(reports),
            "{subject}: the reports are not those of an offline replay, in the same order"
        );
    }
    published.sort();
    assert_eq!(
        published.len(),
        expected.len(),
        "{market}: {} reports published, an offline replay gives {}",
        published.len(),
        expected.len()
    );
    assert!(
        published == expected,
        "{market}: the published reports differ from an offline replay of the stream"
    );
    published.len()
}
