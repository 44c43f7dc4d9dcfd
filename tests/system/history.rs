//! `agora history` against real databases (SQLite in a file, PostgreSQL 15 and MariaDB started
//! by the test on free ports), a real nats-server and a node: trading in two markets while
//! the writer is killed with SIGKILL (a standby takes over), the database is down for 30 s,
//! then every table is checked against an offline replay of the order streams, a `--rebuild`
//! into a second database gives the same tables, and the queries answer from them.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use agora::bus::{self, LocalServer};
use agora::history::Store;
use agora::history::decimal::Dec;
use agora::history::store::Cell;
use async_nats::jetstream;
use common::db::{MariaDb, Postgres};
use common::{Agora, offline_replay, publish, stored_spec, wait_journal};
use serde_json::{Value, json};

const MARKETS: [&str; 2] = ["H-ONE", "H-TWO"];
const WAIT: Duration = Duration::from_secs(60);

const NODE_CONFIG: &str = "node_id = \"h1\"\n[[markets]]\nsymbol = \"H-ONE\"\nprice_decimals = 2\nsize_decimals = 0\n[[markets]]\nsymbol = \"H-TWO\"\nprice_decimals = 2\nsize_decimals = 0\n";

/// The database under test, and what the test does to it.
enum Db {
    Sqlite(std::path::PathBuf),
    Postgres(Postgres),
    MariaDb(MariaDb),
}

impl Db {
    fn url(&self) -> String {
        match self {
            Db::Sqlite(p) => format!("sqlite://{}", p.join("history.db").display()),
            Db::Postgres(pg) => pg.url.clone(),
            Db::MariaDb(m) => m.url.clone(),
        }
    }

    /// A second, empty database on the same server.
    fn second(&self) -> String {
        match self {
            Db::Sqlite(p) => format!("sqlite://{}", p.join("rebuilt.db").display()),
            Db::Postgres(pg) => {
                pg.psql("CREATE DATABASE agora2");
                format!("{}/agora2", pg.url.rsplit_once('/').expect("a path").0)
            }
            Db::MariaDb(m) => {
                m.sql("CREATE DATABASE agora2; GRANT ALL PRIVILEGES ON agora2.* TO 'agora'@'%'; GRANT ALL PRIVILEGES ON agora2.* TO 'agora'@'127.0.0.1'; FLUSH PRIVILEGES;");
                format!("{}/agora2", m.url.rsplit_once('/').expect("a path").0)
            }
        }
    }

    /// Makes the database refuse every write for `secs` seconds: the server stopped (or, for
    /// SQLite, the file locked by another process), then back.
    fn outage(&mut self, secs: u64) -> Outage {
        match self {
            Db::Sqlite(p) => {
                let db = p.join("history.db");
                let script = format!(
                    "import sqlite3, time\nc = sqlite3.connect({:?}, timeout=30, isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep({secs})\nc.execute('COMMIT')\n",
                    db.display().to_string()
                );
                let mut child = std::process::Command::new("python3")
                    .args(["-c", &script])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("python3 runs");
                let mut line = String::new();
                std::io::BufRead::read_line(
                    &mut std::io::BufReader::new(child.stdout.as_mut().expect("piped")),
                    &mut line,
                )
                .expect("the lock holder says it holds the lock");
                assert_eq!(line.trim(), "locked");
                Outage::Lock(child)
            }
            Db::Postgres(pg) => {
                pg.stop();
                Outage::Stopped(Instant::now() + Duration::from_secs(secs))
            }
            Db::MariaDb(m) => {
                m.stop();
                Outage::Stopped(Instant::now() + Duration::from_secs(secs))
            }
        }
    }

    /// `sql` through the database's own command-line client (psql, mariadb, Python's sqlite3),
    /// as a back office would read the tables: the first column of each row.
    fn client_query(&self, sql: &str) -> Vec<String> {
        let text = match self {
            Db::Sqlite(p) => python_sqlite(p, &format!("for r in c.execute({sql:?}): print(r[0])")),
            Db::Postgres(pg) => pg.psql(sql),
            Db::MariaDb(m) => m.sql(sql),
        };
        text.lines().map(|l| l.trim().to_string()).collect()
    }

    /// Makes the tables look as schema 1 left them: text in the database's default collation
    /// (MariaDB's ignores case), `schema_version` 1.
    fn back_to_schema_1(&self) {
        let sql = match self {
            Db::Sqlite(_) => String::new(),
            Db::Postgres(_) => "DO $$ DECLARE r record; BEGIN FOR r IN SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema() AND data_type = 'text' LOOP EXECUTE format('ALTER TABLE %I ALTER COLUMN %I TYPE TEXT COLLATE \"default\"', r.table_name, r.column_name); END LOOP; END $$;".into(),
            Db::MariaDb(_) => ["history_meta", "history_progress", "orders", "fills", "trades", "candles"]
                .iter()
                .map(|t| format!("ALTER TABLE {t} CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci;"))
                .collect(),
        };
        self.client_exec(&format!(
            "{sql} UPDATE history_meta SET value = '1' WHERE name = 'schema_version';"
        ));
    }

    /// Text columns of the history tables that do not compare byte for byte (SQLite's always
    /// do: it has no per-column default to check).
    fn text_columns_not_binary(&self) -> Option<Vec<String>> {
        match self {
            Db::Sqlite(_) => None,
            Db::Postgres(_) => Some(self.client_query(
                "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = current_schema() AND data_type = 'text' AND collation_name IS DISTINCT FROM 'C'",
            )),
            Db::MariaDb(_) => Some(self.client_query(
                "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND collation_name IS NOT NULL AND collation_name <> 'utf8mb4_bin'",
            )),
        }
    }

    /// Runs `sql` (statements separated by `;`) as a back office would, committed.
    fn client_exec(&self, sql: &str) {
        match self {
            Db::Sqlite(p) => {
                python_sqlite(p, &format!("c.executescript({sql:?})"));
            }
            Db::Postgres(pg) => {
                pg.psql(sql);
            }
            Db::MariaDb(m) => {
                m.sql(sql);
            }
        }
    }

    fn end_outage(&mut self, outage: Outage) {
        match outage {
            Outage::Lock(mut child) => {
                let status = child.wait().expect("lock holder ends");
                assert!(status.success());
            }
            Outage::Stopped(until) => {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                match self {
                    Db::Postgres(pg) => pg.restart(),
                    Db::MariaDb(m) => m.restart(),
                    Db::Sqlite(_) => {}
                }
            }
        }
    }
}

enum Outage {
    Lock(std::process::Child),
    Stopped(Instant),
}

fn history(nats: &str, db: &str, dir: &Path, extra: &[&str]) -> Agora {
    let data = dir.join("data");
    let mut args: Vec<String> = vec![
        "history".into(),
        "--nats-url".into(),
        nats.into(),
        "--database".into(),
        db.into(),
        "--data-dir".into(),
        data.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Agora::spawn(&args)
}

fn kill9(a: &mut Agora) {
    let _ = a.child.kill();
    let _ = a.child.wait();
}

/// The two flows, as JSON command messages: every order type and rule.
fn flows() -> Vec<Vec<Value>> {
    (0..2u64)
        .map(|i| {
            let w = agora::workload::generate(&agora::workload::FlowParams {
                seed: 40 + i,
                resting: 60,
                spread_ticks: 40,
                commands: 1200,
                accounts: 6,
                full_mix: true,
                young_cancel_pct: 80,
            });
            w.prefill
                .iter()
                .chain(&w.commands)
                .map(|c| {
                    serde_json::to_value(agora::wire::WireCommandOut::from_command(
                        &w.spec, c, false,
                    ))
                    .expect("json")
                })
                .collect()
        })
        .collect()
}

/// Two accounts whose names differ only in case, one of them with two cids that differ only
/// in case, buying far below H-ONE's book (its flow trades around 1000.00), after its flow:
/// `twin`'s `k-1` (cancelled), then `TWIN`'s `k-1` and `twin`'s `K-1` (resting, newer).
fn case_twins() -> Vec<Value> {
    vec![
        json!({"op": "new", "account": "twin", "cid": "k-1", "side": "buy", "price": "900.00", "qty": "1"}),
        json!({"op": "cancel", "account": "twin", "cid": "k-1"}),
        json!({"op": "new", "account": "TWIN", "cid": "k-1", "side": "buy", "price": "900.00", "qty": "2"}),
        json!({"op": "new", "account": "twin", "cid": "K-1", "side": "buy", "price": "900.00", "qty": "3"}),
    ]
}

async fn publish_range(js: &jetstream::Context, flows: &[Vec<Value>], from: usize, to: usize) {
    for i in from..to {
        for (m, flow) in MARKETS.iter().zip(flows) {
            if let Some(c) = flow.get(i) {
                publish(js, m, c.clone()).await;
            }
        }
    }
}

async fn rows(store: &Store, sql: &str) -> Vec<Vec<Cell>> {
    store
        .select(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Waits until the database has written every market's journal up to its end.
async fn caught_up(js: &jetstream::Context, store: &Store, timeout: Duration) {
    let started = Instant::now();
    loop {
        let mut behind = Vec::new();
        let progress = store.progress().await.unwrap_or_default();
        for m in MARKETS {
            let journal = common::journal_last_seq(js, m).await.unwrap_or(0);
            let written = progress.get(m).map_or(0, |p| p.last_seq);
            if written < journal {
                behind.push(format!("{m}: {written} of {journal}"));
            }
        }
        if behind.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "the history did not catch up within {timeout:?}: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn text(c: &Cell) -> String {
    match c {
        Cell::Text(s) => s.clone(),
        Cell::Int(i) => i.to_string(),
        Cell::Null => String::new(),
    }
}

fn dec(c: &Cell) -> Option<Dec> {
    match c {
        Cell::Null => None,
        c => Some(Dec::parse(text(c).trim()).unwrap_or_else(|| panic!("{c:?} is not a decimal"))),
    }
}

fn dec_str(v: &Value) -> Option<Dec> {
    v.as_str().map(|s| Dec::parse(s).expect("decimal"))
}

/// What the tables must hold, folded from the execution reports of an offline replay of
/// the order streams (another path than the journal the writer reads).
type OrderState = (String, String, Option<String>, Dec, Dec);
type FillKey = (String, String, String, String);

#[derive(Debug, Default, PartialEq)]
struct Expected {
    /// (market, oid) → (account, status, reason, filled, leaves)
    orders: BTreeMap<(String, u64), OrderState>,
    /// (market, trade_id, account, liquidity) → (oid, price, qty)
    fills: BTreeMap<FillKey, (u64, Dec, Dec)>,
    /// (market, trade_id) → (price, qty)
    trades: BTreeMap<(String, String), (Dec, Dec)>,
    /// (market, minute) → (volume, trades)
    candles: BTreeMap<(String, i64), (Dec, u64)>,
}

async fn expected(js: &jetstream::Context) -> Expected {
    let subjects = bus::Subjects::default();
    let mut out = Expected::default();
    for m in MARKETS {
        let spec = stored_spec(js, m).await;
        let offline = offline_replay(js, &subjects, &spec).await;
        for reports in offline.reports.values() {
            for r in reports {
                let r: Value = serde_json::from_str(r).expect("report");
                let key = (m.to_string(), r["oid"].as_u64().unwrap_or(0));
                let zero = Dec::zero(0);
                match r["type"].as_str().unwrap_or("") {
                    "accepted" => {
                        let qty = dec_str(&r["qty"]).expect("qty");
                        out.orders.insert(
                            key,
                            (
                                r["account"].as_str().unwrap_or("").into(),
                                "open".into(),
                                None,
                                zero,
                                qty,
                            ),
                        );
                    }
                    "rejected" if r["op"] == "new" && r["account"].is_string() => {
                        out.orders.insert(
                            key,
                            (
                                r["account"].as_str().unwrap_or("").into(),
                                "rejected".into(),
                                r["reason"].as_str().map(String::from),
                                zero,
                                zero,
                            ),
                        );
                    }
                    "fill" => {
                        let (price, qty) = (
                            dec_str(&r["price"]).expect("price"),
                            dec_str(&r["qty"]).expect("qty"),
                        );
                        let leaves = dec_str(&r["leaves"]).expect("leaves");
                        if let Some(o) = out.orders.get_mut(&key) {
                            o.3 = o.3.checked_add(qty).expect("sum");
                            o.4 = leaves;
                            if leaves.is_zero() {
                                o.1 = "filled".into();
                                o.2 = None;
                            }
                        }
                        let trade_id = r["trade_id"].as_str().unwrap_or("").to_string();
                        let liquidity = r["liquidity"].as_str().unwrap_or("").to_string();
                        out.fills.insert(
                            (
                                m.to_string(),
                                trade_id.clone(),
                                r["account"].as_str().unwrap_or("").into(),
                                liquidity.clone(),
                            ),
                            (key.1, price, qty),
                        );
                        if liquidity == "taker" {
                            out.trades.insert((m.to_string(), trade_id), (price, qty));
                            let ts = r["ts"].as_i64().unwrap_or(0);
                            let c = out
                                .candles
                                .entry((m.to_string(), ts - ts.rem_euclid(60_000_000_000)))
                                .or_insert((zero, 0));
                            c.0 = c.0.checked_add(qty).expect("sum");
                            c.1 += 1;
                        }
                    }
                    "cancelled" => {
                        let leaves = dec_str(&r["leaves"]).expect("leaves");
                        if let Some(o) = out.orders.get_mut(&key) {
                            o.4 = leaves;
                            if leaves.is_zero() {
                                let reason = r["reason"].as_str().unwrap_or("").to_string();
                                o.1 = if reason == "expired" {
                                    "expired"
                                } else {
                                    "cancelled"
                                }
                                .into();
                                o.2 = Some(reason);
                            }
                        }
                    }
                    "amended" => {
                        let leaves = dec_str(&r["leaves"]).expect("leaves");
                        if let Some(o) = out.orders.get_mut(&key) {
                            o.4 = leaves;
                            if leaves.is_zero() {
                                o.1 = "filled".into();
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// What the database holds, in the same shape.
async fn stored(store: &Store) -> Expected {
    let d = |c: &str| store.dialect.dec_text(c);
    let mut out = Expected::default();
    for r in rows(
        store,
        &format!(
            "SELECT market, oid, account, status, reason, {}, {} FROM orders",
            d("filled"),
            d("leaves")
        ),
    )
    .await
    {
        out.orders.insert(
            (text(&r[0]), r[1].int().unwrap_or(0) as u64),
            (
                text(&r[2]),
                text(&r[3]),
                r[4].text().map(String::from),
                dec(&r[5]).expect("filled"),
                dec(&r[6]).expect("leaves"),
            ),
        );
    }
    for r in rows(
        store,
        &format!(
            "SELECT market, trade_id, account, liquidity, oid, {}, {} FROM fills",
            d("price"),
            d("qty")
        ),
    )
    .await
    {
        out.fills.insert(
            (text(&r[0]), text(&r[1]), text(&r[2]), text(&r[3])),
            (
                r[4].int().unwrap_or(0) as u64,
                dec(&r[5]).expect("price"),
                dec(&r[6]).expect("qty"),
            ),
        );
    }
    for r in rows(
        store,
        &format!(
            "SELECT market, trade_id, {}, {} FROM trades",
            d("price"),
            d("qty")
        ),
    )
    .await
    {
        out.trades.insert(
            (text(&r[0]), text(&r[1])),
            (dec(&r[2]).expect("price"), dec(&r[3]).expect("qty")),
        );
    }
    for r in rows(
        store,
        &format!("SELECT market, t, {}, trades FROM candles", d("volume")),
    )
    .await
    {
        out.candles.insert(
            (text(&r[0]), r[1].int().unwrap_or(0)),
            (dec(&r[2]).expect("volume"), r[3].int().unwrap_or(0) as u64),
        );
    }
    out
}

/// Every table as text, row by row, sorted: two databases written from one journal match.
async fn dump(store: &Store) -> Vec<String> {
    let mut out = Vec::new();
    let d = |c: &str| store.dialect.dec_text(c);
    let iv = store.dialect.interval_col();
    for sql in [
        store.order_select(),
        format!(
            "SELECT market, trade_id, account, liquidity, oid, cid, side, {}, {}, ts, seq FROM fills",
            d("price"),
            d("qty")
        ),
        format!(
            "SELECT market, trade_id, n, {}, {}, taker_side, ts, seq FROM trades",
            d("price"),
            d("qty")
        ),
        format!(
            "SELECT market, {iv}, t, {}, {}, {}, {}, {}, trades FROM candles",
            d("open"),
            d("high"),
            d("low"),
            d("close"),
            d("volume")
        ),
        "SELECT market, last_seq, events_seq, price_decimals, size_decimals FROM history_progress"
            .to_string(),
    ] {
        for r in rows(store, &sql).await {
            out.push(r.iter().map(text).collect::<Vec<_>>().join("|"));
        }
    }
    out.sort();
    out
}

/// Python's sqlite3 on the test's `history.db` in `dir`: `body` runs with the connection as
/// `c`, then commits; what it prints.
fn python_sqlite(dir: &Path, body: &str) -> String {
    let script = format!(
        "import sqlite3\nc = sqlite3.connect({:?})\n{body}\nc.commit()\n",
        dir.join("history.db").display().to_string()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two dumps hold the same rows; else the first few rows only one of them has.
fn assert_same(a: &[String], b: &[String], what: &str) {
    let (set_a, set_b): (
        std::collections::BTreeSet<&String>,
        std::collections::BTreeSet<&String>,
    ) = (a.iter().collect(), b.iter().collect());
    let only_a: Vec<&&String> = set_a.difference(&set_b).take(10).collect();
    let only_b: Vec<&&String> = set_b.difference(&set_a).take(10).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty() && a.len() == b.len(),
        "{what} differs ({} rows against {}): only in the first {only_a:?}, only in the second {only_b:?}",
        b.len(),
        a.len()
    );
}

fn agora_json(args: &[&str]) -> Vec<Value> {
    let (ok, lines, err) = common::run(args);
    assert!(ok, "agora {args:?} failed: {err}");
    lines
}

/// One database at a time: each test runs a node, three history processes and a server.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn exercise(mut db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
    let url = nats.url();
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).expect("dir");
    let _node = Agora::node(&url, &node_dir, NODE_CONFIG);
    let js = jetstream::new(
        bus::connect(&url, "test")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let db_url = db.url();
    let mut flows = flows();
    flows[0].extend(case_twins());
    let len = flows.iter().map(Vec::len).max().unwrap_or(0);

    // A writer and a standby on one database.
    let mut first = history(&url, &db_url, &dir.path().join("h1"), &[]);
    first.wait_line(|l| l.contains("writing"), WAIT);
    let port = common::db::free_port();
    let mut second = history(
        &url,
        &db_url,
        &dir.path().join("h2"),
        &["--http-port", &port.to_string()],
    );
    second.wait_line(|l| l.contains("standby"), WAIT);

    // Trading; the writer is killed with SIGKILL mid-flow, the standby takes over.
    publish_range(&js, &flows, 0, len / 3).await;
    kill9(&mut first);
    let killed = Instant::now();
    second.wait_line(|l| l.contains("writing"), WAIT);
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "the standby took {takeover:?} to take over"
    );
    eprintln!("standby took over {takeover:?} after the writer was killed");

    // The database refuses writes for 30 s under load: the writer says so, and catches up.
    let outage = db.outage(30);
    publish_range(&js, &flows, len / 3, 2 * len / 3).await;
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut said = None;
    while Instant::now() < deadline {
        let (status, body) = common::http_get(port, "GET /ready");
        if status == 503
            && body["reason"]
                .as_str()
                .is_some_and(|r| r.contains("database"))
        {
            said = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let said = said.expect("/ready says the database fails while it is down");
    assert_eq!(said["role"], "writer");
    // Every history metric the alert rules look at is exported.
    let metrics = common::scrape(port);
    let watched =
        common::assert_watched_exported("deploy/prometheus/alerts.yml", "history_", &metrics);
    assert_eq!(watched, 3, "the alert rules look at 3 history metrics");
    assert!(
        metrics.contains("history_database_up 0"),
        "the database is down: {metrics}"
    );
    db.end_outage(outage);

    // The first process comes back as a standby; the writer is killed again mid-flow.
    let mut third = history(&url, &db_url, &dir.path().join("h1"), &[]);
    third.wait_line(|l| l.contains("standby"), WAIT);
    publish_range(&js, &flows, 2 * len / 3, 5 * len / 6).await;
    kill9(&mut second);
    third.wait_line(|l| l.contains("writing"), WAIT);
    publish_range(&js, &flows, 5 * len / 6, len).await;
    for (m, flow) in MARKETS.iter().zip(&flows) {
        wait_journal(&js, m, flow.len() as u64, WAIT).await;
    }
    let store = Store::open(&db_url).await.unwrap_or_else(|e| panic!("{e}"));
    caught_up(&js, &store, Duration::from_secs(120)).await;

    // Every table equals what the order streams imply.
    let want = expected(&js).await;
    let have = stored(&store).await;
    assert!(
        want.fills.len() > 100 && want.orders.len() > 1000,
        "the flow trades: {} fills",
        want.fills.len()
    );
    for (name, w, h) in [
        (
            "orders",
            format!("{:?}", want.orders.len()),
            format!("{:?}", have.orders.len()),
        ),
        (
            "fills",
            format!("{:?}", want.fills.len()),
            format!("{:?}", have.fills.len()),
        ),
        (
            "trades",
            format!("{:?}", want.trades.len()),
            format!("{:?}", have.trades.len()),
        ),
    ] {
        assert_eq!(w, h, "{name}: rows expected and stored");
    }
    for (k, v) in &want.orders {
        assert_eq!(have.orders.get(k), Some(v), "order {k:?}");
    }
    assert_eq!(want.fills, have.fills);
    assert_eq!(want.trades, have.trades);
    assert_eq!(want.candles, have.candles);

    // A back office reads the same with its own tools.
    let count = db.client_query("SELECT COUNT(*) FROM orders");
    assert_eq!(count, vec![want.orders.len().to_string()]);
    let filled = db.client_query(
        "SELECT COUNT(*) FROM orders WHERE status = 'filled' AND leaves = 0 AND filled > 0",
    );
    let want_filled = want.orders.values().filter(|o| o.1 == "filled").count();
    assert_eq!(filled, vec![want_filled.to_string()]);

    // The queries answer from it.
    let account = want
        .orders
        .values()
        .next()
        .map(|o| o.0.clone())
        .expect("an account");
    let mine: Vec<&(String, u64)> = want
        .orders
        .iter()
        .filter(|(_, o)| o.0 == account)
        .map(|(k, _)| k)
        .collect();
    let listed = agora_json(&[
        "history",
        "orders",
        "--account",
        &account,
        "--limit",
        "100000",
        "--nats-url",
        &url,
    ]);
    assert_eq!(
        listed.len(),
        mine.len(),
        "agora history orders lists every order of {account}"
    );
    let times: Vec<u64> = listed
        .iter()
        .map(|o| o["ts"].as_u64().unwrap_or(0))
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    let paged = agora_json(&[
        "history",
        "orders",
        "--account",
        &account,
        "--limit",
        "7",
        "--nats-url",
        &url,
    ]);
    assert_eq!(paged.len(), 7);
    let trades = agora_json(&[
        "history",
        "trades",
        "--market",
        "H-ONE",
        "--limit",
        "100000",
        "--nats-url",
        &url,
    ]);
    assert_eq!(
        trades.len(),
        want.trades.keys().filter(|(m, _)| m == "H-ONE").count()
    );
    let candles = agora_json(&[
        "history",
        "candles",
        "--market",
        "H-TWO",
        "--interval",
        "1m",
        "--nats-url",
        &url,
    ]);
    let want_two: Vec<_> = want
        .candles
        .iter()
        .filter(|((m, _), _)| m == "H-TWO")
        .collect();
    assert_eq!(candles.len(), want_two.len());
    // Accounts and cids are case-sensitive: `twin` is shown its own two orders, not `TWIN`'s,
    // and its cancelled `k-1` is found by that cid, not the newer `K-1` or `TWIN`'s `k-1`.
    let twin = agora_json(&[
        "history",
        "orders",
        "--account",
        "twin",
        "--limit",
        "100",
        "--nats-url",
        &url,
    ]);
    let named: std::collections::BTreeSet<String> = twin
        .iter()
        .map(|o| format!("{} {}", o["account"], o["cid"]))
        .collect();
    assert_eq!(
        named,
        ["\"twin\" \"K-1\"", "\"twin\" \"k-1\""]
            .map(String::from)
            .into(),
        "{twin:?}"
    );
    let status = agora_json(&[
        "order",
        "status",
        "--account",
        "twin",
        "--market",
        "H-ONE",
        "--cid",
        "k-1",
        "--nats-url",
        &url,
    ]);
    assert_eq!(status[0]["order"]["cid"], "k-1", "{status:?}");
    assert_eq!(status[0]["order"]["account"], "twin", "{status:?}");
    assert_eq!(status[0]["order"]["status"], "cancelled", "{status:?}");
    let ticker = agora_json(&["history", "ticker", "--market", "H-ONE", "--nats-url", &url]);
    assert!(ticker[0]["last"].is_string(), "{ticker:?}");
    // A closed order's status comes from the history.
    let (closed, _) = want
        .orders
        .iter()
        .find(|(_, o)| o.1 == "filled")
        .expect("a filled order");
    let status = agora_json(&[
        "order",
        "status",
        "--account",
        &want.orders[closed].0,
        "--market",
        &closed.0,
        "--oid",
        &closed.1.to_string(),
        "--nats-url",
        &url,
    ]);
    assert_eq!(status[0]["order"]["status"], "filled", "{status:?}");

    // A rebuild into a second database writes the same tables.
    let second_url = db.second();
    let mut rebuild = history(&url, &second_url, &dir.path().join("h3"), &["--rebuild"]);
    rebuild.wait_line(|l| l.contains("writing"), WAIT);
    let rebuilt = Store::open(&second_url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    caught_up(&js, &rebuilt, Duration::from_secs(120)).await;
    let a = dump(&store).await;
    assert_same(&a, &dump(&rebuilt).await, "the rebuilt database");
    kill9(&mut rebuild);

    // A writer killed between the transactions of one run (PostgreSQL writes a run's
    // markets in transactions of their own, at once) leaves some markets written further
    // than others; the next writer starts from where every market is written. Here: all
    // of H-TWO lost, H-ONE whole, the position back at the journal's start.
    kill9(&mut third);
    db.client_exec(
        "DELETE FROM orders WHERE market = 'H-TWO'; DELETE FROM fills WHERE market = 'H-TWO'; DELETE FROM trades WHERE market = 'H-TWO'; DELETE FROM candles WHERE market = 'H-TWO'; DELETE FROM history_progress WHERE market = 'H-TWO'; UPDATE history_meta SET value = '0' WHERE name = 'read_through'",
    );
    assert_eq!(
        db.client_query("SELECT COUNT(*) FROM orders WHERE market = 'H-TWO'"),
        vec!["0".to_string()]
    );
    let mut fourth = history(&url, &db_url, &dir.path().join("h4"), &[]);
    fourth.wait_line(|l| l.contains("writing"), WAIT);
    caught_up(&js, &store, Duration::from_secs(120)).await;
    assert_same(
        &a,
        &dump(&store).await,
        "the tables written again after a lost part",
    );
    kill9(&mut fourth);

    // A database of schema 1 is converted in place when a store opens it, nothing lost.
    db.back_to_schema_1();
    let twins = "SELECT COUNT(*) FROM orders WHERE account = 'twin'";
    if matches!(db, Db::MariaDb(_)) {
        assert_eq!(
            db.client_query(twins),
            vec!["3"],
            "MariaDB's default collation takes TWIN for twin"
        );
    }
    let converted = Store::open(&db_url).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        db.client_query("SELECT value FROM history_meta WHERE name = 'schema_version'"),
        vec!["2"]
    );
    assert_eq!(db.client_query(twins), vec!["2"]);
    if let Some(left) = db.text_columns_not_binary() {
        assert_eq!(left, vec!["0"], "text columns left in another collation");
    }
    assert_same(
        &a,
        &dump(&converted).await,
        "the tables converted from schema 1",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_history_is_exact_through_kills_outages_and_rebuilds() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("temp dir");
    exercise(Db::Sqlite(dir.path().to_path_buf())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_history_is_exact_through_kills_outages_and_rebuilds() {
    let _one = ONE_AT_A_TIME.lock().await;
    exercise(Db::Postgres(Postgres::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_history_is_exact_through_kills_outages_and_rebuilds() {
    let _one = ONE_AT_A_TIME.lock().await;
    exercise(Db::MariaDb(MariaDb::start())).await;
}
