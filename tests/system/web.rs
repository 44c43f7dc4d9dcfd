//! The web page in a real browser (headless Chromium driven by `web/browser/driver.mjs`): two
//! nodes on one nats-server, the page opened on n1 for BTC-USDC. Orders placed through NATS
//! show in the ladder, the spread and the tape; the market moved to n2 and the page follows;
//! n2 killed and the market back on n1, the page recovers; n1 stopped, the page says it lost
//! its connection. A screenshot of each state goes to `target/web-test/`.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agora::bus::LocalServer;
use serde_json::{Value, json};

use common::Agora;

/// Chromium behind `web/browser/driver.mjs`.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    answers: mpsc::Receiver<String>,
}

impl Browser {
    fn start() -> Browser {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/web/browser");
        let mut child = Command::new("node")
            .arg("driver.mjs")
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run node web/browser/driver.mjs ({e}): install Node.js, chromium and playwright-core (scripts/lib.sh need_playwright)")
            });
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Browser {
            child,
            stdin,
            answers,
        }
    }

    fn cmd(&mut self, command: Value) -> Result<Value, String> {
        writeln!(self.stdin, "{command}").expect("the driver takes commands");
        let line = self
            .answers
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|_| panic!("the browser driver did not answer {command}"));
        let answer: Value = serde_json::from_str(&line).expect("the driver answers JSON");
        if answer["ok"] == true {
            Ok(answer["value"].clone())
        } else {
            Err(answer["error"].as_str().unwrap_or("?").to_string())
        }
    }

    fn open(&mut self, url: &str) {
        self.cmd(json!({"op": "open", "url": url}))
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Waits until `expr` is truthy in the page; its value.
    fn wait(&mut self, what: &str, expr: &str, timeout: Duration) -> Value {
        self.cmd(json!({"op": "wait", "expr": expr, "timeout_ms": timeout.as_millis() as u64}))
            .unwrap_or_else(|e| {
                let body = self
                    .eval("document.body.innerText")
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                panic!("the page never showed {what} ({e}); it shows:\n{body}")
            })
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.cmd(json!({"op": "eval", "expr": expr}))
            .unwrap_or_else(|e| panic!("evaluating {expr}: {e}"))
    }

    fn screenshot(&mut self, name: &str) -> PathBuf {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/web-test"));
        std::fs::create_dir_all(&dir).expect("artifact dir");
        let path = dir.join(format!("{name}.png"));
        self.cmd(json!({"op": "screenshot", "path": path}))
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "close"}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_config(id: &str, port: u16) -> String {
    format!(
        "node_id = \"{id}\"\nhttp_port = {port}\nhttp_addr = \"127.0.0.1\"\n[cluster]\nheartbeat_ms = 100\nlease_ms = 1500\nrebalance_every_secs = 0\nfailback_after_secs = 3600\n"
    )
}

fn place(url: &str, account: &str, side: &str, price: &str, qty: &str) {
    let (ok, lines, err) = common::run(&[
        "order",
        "place",
        "--nats-url",
        url,
        "--market",
        "BTC-USDC",
        "--account",
        account,
        "--side",
        side,
        "--price",
        price,
        "--qty",
        qty,
    ]);
    assert!(ok, "{account} {side} {qty} @ {price}: {lines:?} {err}");
}

/// A JavaScript expression: the text of the ladder cell `field` of the `class` row at `price`.
fn ladder(class: &str, price: &str, field: &str) -> String {
    format!(
        "document.querySelector('#ladder tr.{class}[data-price=\"{price}\"] [data-field={field}]')?.textContent.trim()"
    )
}

#[test]
fn the_page_shows_the_book_and_tape_and_follows_a_move_and_a_failover() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let free = || agora::bus::server::free_port().unwrap_or_else(|e| panic!("{e}"));
    let (p1, p2) = (free(), free());
    let d1 = dir.path().join("n1");
    let d2 = dir.path().join("n2");
    std::fs::create_dir_all(&d1).expect("dir");
    std::fs::create_dir_all(&d2).expect("dir");
    // n1 first: it places the seed markets on itself.
    let mut n1 = Agora::node(&url, &d1, &node_config("n1", p1));
    let n2 = Agora::node(&url, &d2, &node_config("n2", p2));

    let mut browser = Browser::start();
    let page = format!("http://127.0.0.1:{p1}/#/market/BTC-USDC");
    browser.open(&page);
    browser.wait(
        "the first book",
        "document.body.dataset.ready === '1'",
        Duration::from_secs(20),
    );
    let first_paint = browser.eval(
        "(() => { const ready = Number(document.body.dataset.readyMs); return Number.isFinite(ready) ? ready : null })()",
    );
    println!("first paint of BTC-USDC: {first_paint} ms after navigation");
    browser.wait(
        "a live connection",
        "document.querySelector('#conn-state')?.textContent.includes('live')",
        Duration::from_secs(10),
    );
    browser.wait(
        "BTC-USDC on n1",
        "document.querySelector('#market-owner')?.textContent.includes('n1')",
        Duration::from_secs(10),
    );
    browser.wait(
        "the three seed markets",
        "document.querySelectorAll('#markets tbody tr[data-market]').length === 3",
        Duration::from_secs(10),
    );
    browser.wait(
        "both nodes in the cluster panel",
        "document.querySelectorAll('#cluster-nodes tr[data-node]').length === 2",
        Duration::from_secs(10),
    );
    browser.screenshot("1-empty");

    // A book: two asks, one bid.
    place(&url, "alice", "sell", "65000.00", "0.5");
    place(&url, "alice", "sell", "65010.00", "0.3");
    place(&url, "bob", "buy", "64990.00", "0.4");
    browser.wait(
        "the best ask",
        &format!("{} === '0.50000000'", ladder("ask", "65000.00", "qty")),
        Duration::from_secs(10),
    );
    browser.wait(
        "the second ask",
        &format!("{} === '0.30000000'", ladder("ask", "65010.00", "qty")),
        Duration::from_secs(10),
    );
    browser.wait(
        "the bid",
        &format!("{} === '0.40000000'", ladder("bid", "64990.00", "qty")),
        Duration::from_secs(10),
    );
    browser.wait(
        "a spread of 10.00",
        "document.querySelector('#spread')?.textContent.includes('10.00')",
        Duration::from_secs(10),
    );
    browser.wait(
        "the market row's best prices",
        "(() => { const r = document.querySelector('#markets tr[data-market=\"BTC-USDC\"]'); return r && r.querySelector('[data-field=bid]').textContent.includes('64990.00') && r.querySelector('[data-field=ask]').textContent.includes('65000.00') })()",
        Duration::from_secs(10),
    );
    browser.screenshot("2-book");

    // A trade: bob lifts 0.2 of the best ask.
    place(&url, "bob", "buy", "65000.00", "0.2");
    browser.wait(
        "the trade on the tape",
        "(() => { const r = document.querySelector('#tape tbody tr'); return r && r.dataset.side === 'buy' && r.querySelector('[data-field=price]').textContent.includes('65000.00') && r.querySelector('[data-field=qty]').textContent.includes('0.20000000') })()",
        Duration::from_secs(10),
    );
    browser.wait(
        "the ask left after the trade",
        &format!("{} === '0.30000000'", ladder("ask", "65000.00", "qty")),
        Duration::from_secs(10),
    );
    browser.wait(
        "the last price in the markets table",
        "document.querySelector('#markets tr[data-market=\"BTC-USDC\"] [data-field=last]')?.textContent.includes('65000.00')",
        Duration::from_secs(10),
    );
    browser.screenshot("3-trade");

    // A planned move to n2: the page follows.
    common::run_ok(&[
        "ctl",
        "market.move",
        "BTC-USDC",
        "--to",
        "n2",
        "--nats-url",
        &url,
    ]);
    browser.wait(
        "BTC-USDC on n2",
        "document.querySelector('#market-owner')?.textContent.includes('n2')",
        Duration::from_secs(15),
    );
    browser.wait(
        "the handoff in the cluster log",
        "[...document.querySelectorAll('#cluster-log li')].some(li => li.textContent.includes('handoff') && li.textContent.includes('BTC-USDC'))",
        Duration::from_secs(15),
    );
    place(&url, "bob", "buy", "64995.00", "0.1");
    browser.wait(
        "a bid placed after the move",
        &format!("{} === '0.10000000'", ladder("bid", "64995.00", "qty")),
        Duration::from_secs(15),
    );
    browser.screenshot("4-moved");

    // n2 killed: the market fails over to n1, and the page recovers by itself.
    n2.signal(libc::SIGKILL);
    browser.wait(
        "BTC-USDC back on n1",
        "document.querySelector('#market-owner')?.textContent.includes('n1')",
        Duration::from_secs(30),
    );
    browser.wait(
        "the failover in the cluster log",
        "[...document.querySelectorAll('#cluster-log li')].some(li => li.textContent.includes('failover') && li.textContent.includes('BTC-USDC'))",
        Duration::from_secs(15),
    );
    place(&url, "alice", "sell", "65005.00", "0.7");
    browser.wait(
        "an ask placed after the failover",
        &format!("{} === '0.70000000'", ladder("ask", "65005.00", "qty")),
        Duration::from_secs(20),
    );
    browser.wait(
        "the book from before the failover",
        &format!("{} === '0.10000000'", ladder("bid", "64995.00", "qty")),
        Duration::from_secs(10),
    );
    browser.screenshot("5-failover");

    // The node serving the page stops: the page says so.
    n1.terminate(Duration::from_secs(30));
    browser.wait(
        "that the connection is lost",
        "!document.querySelector('#conn-state')?.textContent.includes('live')",
        Duration::from_secs(15),
    );
    browser.screenshot("6-disconnected");
    drop(browser);
    drop(n2);
    drop(server);
}

/// The raw response to `GET path`: status line and headers, and the body.
fn get_raw(port: u16, path: &str) -> (String, Vec<u8>) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    (
        String::from_utf8_lossy(&response[..split]).into_owned(),
        response[split + 4..].to_vec(),
    )
}

#[test]
fn the_page_s_files_and_api_answer_or_say_what_is_wrong() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
    let port = agora::bus::server::free_port().unwrap_or_else(|e| panic!("{e}"));
    // Its load every 3 s, with renewals without load between (`load_every_ms`): the page must
    // count those, or the node would flicker dead for half of every 3 s (lease 1.5 s).
    let config = format!("{}load_every_ms = 3000\n", node_config("n1", port));
    let _node = Agora::node(&server.url(), dir.path(), &config);

    // The page and its modules, compiled in, with their types.
    let (head, body) = get_raw(port, "/");
    assert!(
        head.contains("200 OK") && head.contains("text/html"),
        "{head}"
    );
    let html = String::from_utf8_lossy(&body);
    assert!(html.contains("/assets/app.js"), "{html}");
    for (path, file) in [
        ("/assets/app.js", "app.js"),
        ("/assets/book.js", "book.js"),
        ("/assets/style.css", "style.css"),
    ] {
        let (head, body) = get_raw(port, path);
        assert!(head.contains("200 OK"), "{path}: {head}");
        let on_disk =
            std::fs::read(format!("{}/web/{file}", env!("CARGO_MANIFEST_DIR"))).expect("the file");
        assert_eq!(body, on_disk, "{path} is web/{file} as built");
    }
    let (head, _) = get_raw(port, "/assets/app.js");
    assert!(head.contains("text/javascript"), "{head}");

    // The overview: the seed markets on n1, n1 live and holding the rebalancer.
    let (status, overview) = common::http_get(port, "GET /api/overview");
    assert_eq!(status, 200, "{overview}");
    let markets: Vec<&str> = overview["markets"]
        .as_array()
        .expect("markets")
        .iter()
        .filter_map(|m| m["market"].as_str())
        .collect();
    assert_eq!(markets, ["BTC-USDC", "ETH-USDC", "SOL-USDC"], "{overview}");
    assert_eq!(overview["markets"][0]["node"], "n1", "{overview}");
    assert_eq!(overview["markets"][0]["state"], "active", "{overview}");
    assert_eq!(overview["rebalancer"], "n1", "{overview}");
    assert_eq!(overview["nodes"][0]["node"], "n1", "{overview}");
    // Its record lists its markets from the first heartbeat after they started (ready was
    // printed once they run); then the node stays live all along, through more than a lease
    // between records.
    let listed = Instant::now();
    loop {
        let (_, overview) = common::http_get(port, "GET /api/overview");
        if overview["nodes"][0]["markets"] == json!(["BTC-USDC", "ETH-USDC", "SOL-USDC"]) {
            break;
        }
        assert!(
            listed.elapsed() < Duration::from_secs(2),
            "the node's markets are not in its record: {overview}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..8 {
        let (status, overview) = common::http_get(port, "GET /api/overview");
        assert_eq!(status, 200, "{overview}");
        assert_eq!(overview["nodes"][0]["live"], true, "{overview}");
        assert_eq!(
            overview["nodes"][0]["markets"],
            json!(["BTC-USDC", "ETH-USDC", "SOL-USDC"]),
            "{overview}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The book of a market, and refusals that say what to do.
    let (status, book) = common::http_get(port, "GET /api/book/BTC-USDC?depth=20");
    assert_eq!(status, 200, "{book}");
    assert_eq!(book["market"], "BTC-USDC", "{book}");
    let (status, bad) = common::http_get(port, "GET /api/book/BTC%20USDC");
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["message"].as_str().unwrap_or("").contains("BTC-USDC"),
        "{bad}"
    );
    let (status, missing) = common::http_get(port, "GET /api/book/NOPE-USDC");
    assert_eq!(status, 503, "{missing}");
    assert!(
        missing["message"]
            .as_str()
            .unwrap_or("")
            .contains("NOPE-USDC"),
        "{missing}"
    );
    let (status, none) = common::http_get(port, "GET /api/candles/BTC-USDC");
    assert_eq!(status, 503, "{none}");
    assert_eq!(none["error"], "no_history", "{none}");
    let (status, trades) = common::http_get(port, "GET /api/trades/BTC-USDC");
    assert_eq!(status, 200, "{trades}");
    assert!(trades["trades"].is_array(), "{trades}");
    let (status, unknown) = common::http_get(port, "GET /api/nothing");
    assert_eq!(status, 404, "{unknown}");
    assert!(
        unknown["message"]
            .as_str()
            .unwrap_or("")
            .contains("/api/overview"),
        "{unknown}"
    );

    // The event stream: hello, then an overview, as server-sent events.
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "GET /api/stream?market=BTC-USDC HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    .expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("event: overview") {
        let n = stream.read(&mut buf).expect("the stream sends");
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    assert!(
        seen.contains("event: hello\ndata: {\"market\":\"BTC-USDC\",\"node\":\"n1\"}"),
        "{seen}"
    );
    drop(stream);

    // With agora history beside the node: a trade's candle and the ticker.
    place(&server.url(), "alice", "sell", "65000.00", "0.5");
    place(&server.url(), "bob", "buy", "65000.00", "0.2");
    let db = format!("sqlite://{}", dir.path().join("history.db").display());
    let history_dir = dir.path().join("history");
    let _history = Agora::spawn(&[
        "history",
        "--nats-url",
        &server.url(),
        "--database",
        &db,
        "--data-dir",
        &history_dir.display().to_string(),
    ]);
    let started = Instant::now();
    loop {
        let (status, candles) = common::http_get(port, "GET /api/candles/BTC-USDC?interval=1m");
        if status == 200 && candles["candles"][0]["volume"] == "0.20000000" {
            assert_eq!(candles["candles"][0]["close"], "65000.00", "{candles}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no candle of the trade from the history: {status} {candles}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    loop {
        let (_, overview) = common::http_get(port, "GET /api/overview");
        let btc = &overview["markets"][0];
        if btc["ticker"]["last"] == "65000.00" {
            assert_eq!(btc["last_price"], "65000.00", "{overview}");
            assert_eq!(btc["best_ask"], "65000.00", "{overview}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no ticker from the history in the overview: {overview}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, trades) = common::http_get(port, "GET /api/trades/BTC-USDC");
    assert_eq!(status, 200, "{trades}");
    assert_eq!(trades["trades"][0]["price"], "65000.00", "{trades}");
    drop(server);
}
