//! What several integration tests share: an `agora` child process (a node, or a watcher whose
//! output lines are collected), killed when dropped.
#![allow(dead_code)]

pub mod db;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/PID/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses and may hold any
            // character: read it after the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
    })
}

/// An `agora` child process whose stdout and stderr lines arrive on channels.
pub struct Agora {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    errors: mpsc::Receiver<String>,
}

/// Forwards a child's output lines; with `AGORA_TEST_ECHO` set, also copies them to stderr
/// (prefixed with the child's pid), to see what the nodes of a failing test said.
fn forward(from: impl std::io::Read + Send + 'static, pid: u32) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let echo = std::env::var_os("AGORA_TEST_ECHO").is_some();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if echo {
                eprintln!("[agora {pid}] {line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_on(
    rx: &mpsc::Receiver<String>,
    matches: impl Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if matches(&line) => return line,
            Ok(_) => {}
            Err(_) => panic!("no expected line within {timeout:?}"),
        }
    }
}

impl Agora {
    /// Runs `agora <args>` with `AGORA_LOG=warn` (or `$AGORA_TEST_LOG`).
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Agora {
        let log = std::env::var("AGORA_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let mut child = Command::new(env!("CARGO_BIN_EXE_agora"))
            .args(args)
            .env("AGORA_LOG", log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agora starts");
        let pid = child.id();
        let lines = forward(child.stdout.take().expect("piped"), pid);
        let errors = forward(child.stderr.take().expect("piped"), pid);
        Agora {
            child,
            lines,
            errors,
        }
    }

    /// A node with `config` (TOML) written into `dir`, started against `url`; returns once
    /// it printed its ready line.
    pub fn node(url: &str, dir: &std::path::Path, config: &str) -> Agora {
        let path = dir.join("node.toml");
        std::fs::write(&path, config).expect("write config");
        let data = dir.join("data");
        let node = Agora::spawn(&[
            "node".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
            "--nats-url".as_ref(),
            url.as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ]);
        node.wait_line(|l| l.contains("ready"), Duration::from_secs(30));
        node
    }

    /// `agora node` as the quick start runs it, with a nats-server of its own and its data in
    /// `data`; returns once it printed its ready line, with the URL of that server.
    pub fn embedded_node(data: &std::path::Path) -> (Agora, String) {
        let node = Agora::spawn(&["node".as_ref(), "--data-dir".as_ref(), data.as_os_str()]);
        let started = node.wait_line(
            |l| l.contains("started nats-server at "),
            Duration::from_secs(30),
        );
        let url = started
            .split_whitespace()
            .find(|w| w.starts_with("nats://"))
            .unwrap_or_else(|| panic!("no URL in {started:?}"))
            .to_string();
        node.wait_line(|l| l.contains("ready"), Duration::from_secs(30));
        (node, url)
    }

    /// The next line that `matches`, skipping others (panics after `timeout`).
    pub fn wait_line(&self, matches: impl Fn(&str) -> bool, timeout: Duration) -> String {
        wait_on(&self.lines, matches, timeout)
    }

    /// A stdout line that `matches` if one comes within 100 ms (others are skipped).
    pub fn try_line(&self, matches: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + Duration::from_millis(100);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// The next stderr line that `matches` (panics after `timeout`).
    pub fn wait_err_line(&self, matches: impl Fn(&str) -> bool, timeout: Duration) -> String {
        wait_on(&self.errors, matches, timeout)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal`. A SIGSTOP returns only once every thread of the child has stopped:
    /// the kernel stops a process's threads one after the other, and on a loaded machine the
    /// thread picked to start the stop can wait for a core while the others go on serving
    /// requests for milliseconds.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id();
        // SAFETY: kill with a pid we own and a valid signal.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
        if signal != libc::SIGSTOP {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(pid) {
            assert!(
                Instant::now() < deadline,
                "agora {pid} did not stop within 10 s of SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGTERM, then the exit status (panics if it takes over `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "agora did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every line the child wrote and no wait took yet, stdout's then stderr's; waits up to
    /// 300 ms for more after the last, and a second in all (a live child may never stop
    /// writing: a failing test's dump must still come back).
    pub fn rest(&self) -> (Vec<String>, Vec<String>) {
        let drain = |rx: &mpsc::Receiver<String>| {
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut out = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left.min(Duration::from_millis(300))) {
                    Ok(line) => out.push(line),
                    Err(_) => break,
                }
                if left.is_zero() {
                    // Whatever is already buffered, without waiting.
                    out.extend(rx.try_iter());
                    break;
                }
            }
            out
        };
        (drain(&self.lines), drain(&self.errors))
    }

    /// The next line as JSON (panics after `timeout`).
    pub fn next_json(&self, timeout: Duration) -> serde_json::Value {
        let line = self.wait_line(|_| true, timeout);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }
}

impl Drop for Agora {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `agora <args>` to completion and panics, with what it printed, unless it succeeded;
/// its standard output.
pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(args)
        .output()
        .expect("agora runs");
    assert!(
        out.status.success(),
        "agora {}: {} {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `agora <args>` to completion: success, stdout lines as JSON, stderr.
pub fn run(args: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(args)
        .output()
        .expect("agora runs");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `n` resting orders that never cross (bids from 99.99 down, asks from 100.01 up, `levels` price
/// levels a side, 1,000 lots each, from accounts `mm-0`..`mm-{accounts - 1}`), as batch
/// messages of up to 100 commands.
pub fn resting_batches(n: usize, levels: usize, accounts: usize) -> Vec<serde_json::Value> {
    let orders: Vec<serde_json::Value> = (0..n)
        .map(|k| {
            let level = (k / 2 % levels) as u64;
            let (side, cents) = if k % 2 == 0 {
                ("buy", 9999 - level)
            } else {
                ("sell", 10001 + level)
            };
            serde_json::json!({
                "op": "new",
                "account": format!("mm-{}", k % accounts),
                "side": side,
                "type": "limit",
                "tif": "gtc",
                "price": format!("{}.{:02}", cents / 100, cents % 100),
                "qty": "1000",
            })
        })
        .collect();
    orders
        .chunks(100)
        .map(|c| serde_json::json!({"op": "batch", "commands": c}))
        .collect()
}

/// Publishes one order-subject message (`value` as MessagePack) to `market` and waits for
/// JetStream's acknowledgement.
pub async fn publish(js: &async_nats::jetstream::Context, market: &str, value: serde_json::Value) {
    let bytes = rmp_serde::to_vec_named(&value).expect("msgpack");
    js.publish(format!("agora.orders.{market}"), bytes.into())
        .await
        .expect("publish sent")
        .await
        .expect("publish acknowledged");
}

/// The last input sequence in `market`'s journal, if it has one (read with the product's
/// own journal reader).
pub async fn journal_last_seq(js: &async_nats::jetstream::Context, market: &str) -> Option<u64> {
    let journal = agora::bus::Journal::open(js, &agora::bus::Subjects::default())
        .await
        .ok()?;
    journal.last_seq(market).await.ok().filter(|&seq| seq > 0)
}

/// Waits until `market`'s journal covers input sequence `seq` (its last journaled sequence is
/// `seq` or later), reading it with [`journal_last_seq`] every 20 ms (up to every 100 ms for
/// waits of minutes, not to load a busy machine further). Panics after `timeout`, naming the
/// market, `seq` and the last sequence the journal showed.
pub async fn wait_journal(
    js: &async_nats::jetstream::Context,
    market: &str,
    seq: u64,
    timeout: Duration,
) {
    let started = Instant::now();
    let poll = (timeout / 1000).clamp(Duration::from_millis(20), Duration::from_millis(100));
    loop {
        let last = journal_last_seq(js, market).await;
        if last >= Some(seq) {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "the journal of {market} did not reach input sequence {seq} within {timeout:?}; the last sequence it showed was {}",
            last.map_or_else(|| "none (no journal yet)".to_string(), |s| s.to_string())
        );
        tokio::time::sleep(poll).await;
    }
}

/// What an offline replay of a market's order stream gives.
pub struct Offline {
    /// The stream's messages, 1 to its last, as the market's core takes them.
    pub msgs: Vec<agora::actors::Incoming>,
    /// The execution reports (each as JSON text) of each (stored, public) exec subject, in the order its
    /// subscriber sees them.
    pub reports: BTreeMap<String, Vec<String>>,
    /// The book's state hash after the last message.
    pub state_hash: agora::book::StateHash,
    /// The book after the last message.
    pub book: agora::book::OrderBook,
}

impl Offline {
    /// Every report of every subject, sorted.
    pub fn sorted_reports(&self) -> Vec<String> {
        let mut all: Vec<String> = self.reports.values().flatten().cloned().collect();
        all.sort();
        all
    }
}

/// The reports of one message of the exec stream, each as JSON text.
pub fn exec_reports(payload: &[u8]) -> Vec<String> {
    let v: serde_json::Value = rmp_serde::from_slice(payload).expect("exec message decodes");
    v["reports"]
        .as_array()
        .map(|reports| reports.iter().map(serde_json::Value::to_string).collect())
        .unwrap_or_default()
}

/// Replays the order stream of `spec`'s market offline, as the market would have: messages 1
/// to the stream's last, each read with `get_raw_message` and decoded by the product's own
/// [`agora::actors::market::Routes`] (so per-account and admin subjects say who sent it, and
/// `Content-Type` whether it is JSON), through a fresh [`agora::actors::MarketCore`] (batches
/// of at most 100) one message at a time.
pub async fn offline_replay(
    js: &async_nats::jetstream::Context,
    subjects: &agora::bus::Subjects,
    spec: &agora::book::MarketSpec,
) -> Offline {
    let market = spec.symbol.as_str();
    let routes = agora::actors::market::Routes::new(subjects, market);
    let mut orders = js
        .get_stream(subjects.orders_stream(market))
        .await
        .unwrap_or_else(|e| panic!("the order stream of {market}: {e}"));
    let n = orders
        .info()
        .await
        .unwrap_or_else(|e| panic!("the order stream of {market}: {e}"))
        .state
        .last_sequence;
    let mut core = agora::actors::MarketCore::new(subjects.clone(), spec.clone(), 100);
    let mut msgs = Vec::new();
    let mut reports: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for seq in 1..=n {
        let m = orders
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|e| panic!("message {seq} of the order stream of {market}: {e}"));
        let ts = u64::try_from(m.time.unix_timestamp_nanos()).unwrap_or(0);
        let msg = routes.decode(m.subject.as_str(), Some(&m.headers), &m.payload, seq, ts);
        if let Some(out) = core.process(std::slice::from_ref(&msg)) {
            for x in out.execs {
                // Published on the capture subject, stored under the public one.
                let stored = x.subject.replacen(".capture.", ".", 1);
                reports
                    .entry(stored)
                    .or_default()
                    .extend(exec_reports(&x.payload));
            }
        }
        msgs.push(msg);
    }
    Offline {
        msgs,
        reports,
        state_hash: core.book().state_hash(),
        book: core.book().clone(),
    }
}

/// `GET /metrics` on localhost:`port`: the body (panics unless 200).
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

/// `GET path` on localhost:`port` (`request` is "GET /path"): the status code and the JSON
/// body.
pub fn http_get(port: u16, request: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(format!("{request} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// What a plain (core NATS) subscriber to the public tape and report subjects received, as a
/// client connects: every trade id on the tape, every fill (trade id and liquidity) in the
/// reports, and each subject's `Nats-Sequence` chain (`Nats-Last-Sequence` must be the sequence
/// of the message before on that subject), so a duplicate or a gap shows.
#[derive(Default)]
pub struct Tally {
    pub trades: BTreeMap<String, u32>,
    pub fills: BTreeMap<(String, String), u32>,
    /// Last `Nats-Sequence` seen per subject.
    last: BTreeMap<String, u64>,
    pub gaps: Vec<String>,
    pub unsequenced: u64,
}

pub struct PublicTally {
    tally: std::sync::Arc<std::sync::Mutex<Tally>>,
    client: async_nats::Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PublicTally {
    /// Subscribes (core NATS, no JetStream) to `agora.trades.>` and `agora.execs.>` on `url`
    /// (one or more, comma-separated).
    pub async fn start(url: &str) -> PublicTally {
        use futures::StreamExt;
        let addrs: Vec<async_nats::ServerAddr> = url
            .split(',')
            .map(|u| u.parse().expect("a NATS URL"))
            .collect();
        let client = async_nats::connect(addrs.as_slice())
            .await
            .unwrap_or_else(|e| panic!("the plain subscriber connects: {e}"));
        let tally = std::sync::Arc::new(std::sync::Mutex::new(Tally::default()));
        let mut tasks = Vec::new();
        for subject in ["agora.trades.>", "agora.execs.>"] {
            let mut sub = client
                .subscribe(subject)
                .await
                .unwrap_or_else(|e| panic!("subscribing to {subject}: {e}"));
            let tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let mut t = tally.lock().expect("tally");
                    t.add(&m);
                }
            }));
        }
        client.flush().await.expect("flush");
        PublicTally {
            tally,
            client,
            tasks,
        }
    }

    /// Waits until `trades` distinct trade ids arrived (at most `timeout`), then checks that
    /// every trade arrived once, every fill once on each side, and no subject skipped a
    /// sequence. Answers the count of fills.
    pub async fn check(&self, trades: usize, timeout: Duration) -> usize {
        let started = Instant::now();
        loop {
            let have = self.tally.lock().expect("tally").trades.len();
            if have >= trades || started.elapsed() > timeout {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = self.tally.lock().expect("tally");
        let twice: Vec<_> = t.trades.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "trades a plain subscriber received more than once: {twice:?}"
        );
        let fills_twice: Vec<_> = t.fills.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            fills_twice.is_empty(),
            "fills a plain subscriber received more than once: {fills_twice:?}"
        );
        assert!(
            t.gaps.is_empty(),
            "sequence gaps on public subjects: {:?}",
            t.gaps
        );
        assert_eq!(
            t.unsequenced, 0,
            "public messages without Nats-Sequence headers"
        );
        assert_eq!(
            t.trades.len(),
            trades,
            "a plain subscriber received {} of {trades} trades",
            t.trades.len()
        );
        assert_eq!(
            t.fills.len(),
            2 * trades,
            "a plain subscriber received {} fills for {trades} trades (two sides each)",
            t.fills.len()
        );
        t.fills.len()
    }

    pub fn trades(&self) -> usize {
        self.tally.lock().expect("tally").trades.len()
    }
}

impl Drop for PublicTally {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = &self.client;
    }
}

impl Tally {
    fn add(&mut self, m: &async_nats::Message) {
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .and_then(|v| v.as_str().parse::<u64>().ok())
        };
        match (header("Nats-Sequence"), header("Nats-Last-Sequence")) {
            (Some(seq), Some(prev)) => {
                let subject = m.subject.to_string();
                let expected = self.last.get(&subject).copied();
                if let Some(expected) = expected
                    && expected != prev
                {
                    self.gaps.push(format!(
                        "{subject}: message {seq} follows {prev}, but the last one seen was {expected}"
                    ));
                }
                self.last.insert(subject, seq);
            }
            _ => self.unsequenced += 1,
        }
        let v: serde_json::Value = match rmp_serde::from_slice(&m.payload) {
            Ok(v) => v,
            Err(e) => panic!("a public message on {} does not decode: {e}", m.subject),
        };
        for trade in v["trades"].as_array().into_iter().flatten() {
            let id = format!("{}/{}", v["market"], trade["trade_id"]);
            *self.trades.entry(id).or_default() += 1;
        }
        for report in v["reports"].as_array().into_iter().flatten() {
            if report["type"] == "fill" {
                let key = (
                    format!("{}/{}", report["market"], report["trade_id"]),
                    report["liquidity"].as_str().unwrap_or_default().to_string(),
                );
                *self.fills.entry(key).or_default() += 1;
            }
        }
    }
}

/// The trades stored in `TRADES` (every market), each once: panics on a trade id stored twice.
pub async fn stored_trades(js: &async_nats::jetstream::Context) -> usize {
    let mut trades = js.get_stream("TRADES").await.expect("TRADES");
    let last = trades.info().await.expect("info").state.last_sequence;
    let mut ids = std::collections::BTreeMap::<String, u32>::new();
    for seq in 1..=last {
        if let Ok(m) = trades.get_raw_message(seq).await {
            let v: serde_json::Value = rmp_serde::from_slice(&m.payload).expect("tape decodes");
            for t in v["trades"].as_array().into_iter().flatten() {
                *ids.entry(format!("{}/{}", v["market"], t["trade_id"]))
                    .or_default() += 1;
            }
        }
    }
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "trades stored twice in TRADES: {twice:?}");
    ids.len()
}

/// The spec a node runs `market` under, as stored in the markets bucket: what an offline
/// replay must use to decide what the node decided (a market created by a node has a cid
/// window; a spec written by hand in a test would not).
pub async fn stored_spec(
    js: &async_nats::jetstream::Context,
    market: &str,
) -> agora::book::MarketSpec {
    let kv = js
        .get_key_value("agora_markets")
        .await
        .expect("the markets bucket");
    let bytes = kv
        .get(market)
        .await
        .expect("read the stored spec")
        .unwrap_or_else(|| panic!("{market} has no stored spec"));
    serde_json::from_slice::<agora::book::MarketSpecInput>(&bytes)
        .expect("a stored spec")
        .validate()
        .expect("a valid stored spec")
}

/// Checks that every metric named `prefix*` in the repository file `file` (an alert rule file,
/// a dashboard) is one `exported` (a /metrics text) has; returns how many names it checked.
pub fn assert_watched_exported(file: &str, prefix: &str, exported: &str) -> usize {
    let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut watched: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with(prefix))
        .collect();
    watched.sort_unstable();
    watched.dedup();
    for name in &watched {
        assert!(
            exported.lines().any(|l| l.starts_with(name)),
            "{file} looks at {name}, which is not exported:\n{exported}"
        );
    }
    watched.len()
}
