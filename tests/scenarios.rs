//! Data-driven scenario tests: `tests/scenarios/*.txt` hold scripts of commands, the exact
//! events each must produce, and the book drawn as `bids | price | asks`.
//!
//! Format (one scenario starts at each `## title` line; `#` lines are comments):
//! ```text
//! ## a title
//! spec: price_decimals=2 size_decimals=0 tick_size=0.05 stp_default=cancel_newest
//! > alice: new cid=a1 side=sell price=10.00 qty=5
//! accepted a1
//! > bob: new cid=b1 side=buy price=10.00 qty=2
//! accepted b1
//! trade 2@10.00 maker=a1(3) taker=b1(0)
//! book:
//!   bids | price | asks
//!        | 10.00 | 3 (1)
//! ```
//! Commands go through the wire decoder (`key=value` become the fields of a JSON command, so
//! `ts`, `seq`, `oid`, `expire_at` are numbers and `cancel_orders` a boolean). Events name
//! orders by cid, or `#oid` when they have none. A command followed by no event line must
//! produce no event.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use agora::book::{Event, MarketSpec, MarketSpecInput, OrderBook, OrderTag, Side};
use agora::wire::{self, DecodeContext};

fn name(tag: &OrderTag) -> String {
    match tag.cid {
        Some(cid) => cid.to_string(),
        None => format!("#{}", tag.oid),
    }
}

fn render(spec: &MarketSpec, e: &Event) -> String {
    let p = |p: agora::book::Price| spec.fmt_price(p);
    let q = |q: agora::book::Qty| spec.fmt_qty(q);
    match e {
        Event::Accepted(a) => format!("accepted {}", name(&a.order)),
        Event::Rejected(r) => {
            let who = match (r.cid, r.oid) {
                (Some(cid), _) => cid.to_string(),
                (None, Some(oid)) => format!("#{oid}"),
                (None, None) => "-".into(),
            };
            format!("rejected {who} {}", r.reason.as_str())
        }
        Event::Trade(t) => format!(
            "trade {}@{} maker={}({}) taker={}({})",
            q(t.qty),
            p(t.price),
            name(&t.maker),
            q(t.maker_leaves),
            name(&t.taker),
            q(t.taker_leaves)
        ),
        Event::Cancelled(c) => format!(
            "cancelled {} {} qty={} leaves={}",
            name(&c.order),
            c.reason.as_str(),
            q(c.qty),
            q(c.leaves)
        ),
        Event::Amended(a) => format!(
            "amended {} price={} qty={} leaves={} {}",
            name(&a.order),
            p(a.price),
            q(a.qty),
            q(a.leaves),
            if a.priority_kept { "kept" } else { "lost" }
        ),
        Event::Triggered(t) => format!(
            "triggered {} stop={} last={}",
            name(&t.order),
            p(t.stop_price),
            p(t.last_price)
        ),
    }
}

/// The book drawn top-down: asks from the worst shown down to the best, then bids.
fn draw(book: &OrderBook) -> Vec<String> {
    let spec = book.spec();
    let cell = |l: &agora::book::L2Level| format!("{} ({})", spec.fmt_qty(l.qty), l.orders);
    let mut lines = vec![norm("bids | price | asks")];
    let asks = book.depth(Side::Sell, usize::MAX);
    for l in asks.iter().rev() {
        lines.push(norm(&format!(
            "| {} | {}",
            spec.fmt_price(l.price),
            cell(l)
        )));
    }
    for l in book.depth(Side::Buy, usize::MAX) {
        lines.push(norm(&format!(
            "{} | {} |",
            cell(&l),
            spec.fmt_price(l.price)
        )));
    }
    lines
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn spec_from(line: &str) -> MarketSpec {
    let mut input = MarketSpecInput::new("T", 2, 0);
    for kv in line.split_whitespace() {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| panic!("spec entry {kv:?} needs key=value"));
        let s = Some(v.to_string());
        match k {
            "symbol" => input.symbol = v.into(),
            "price_decimals" => input.price_decimals = v.parse().expect("price_decimals"),
            "size_decimals" => input.size_decimals = v.parse().expect("size_decimals"),
            "tick_size" => input.tick_size = s,
            "lot_size" => input.lot_size = s,
            "min_qty" => input.min_qty = s,
            "max_qty" => input.max_qty = s,
            "price_band_pct" => input.price_band_pct = s,
            "orders_max" => input.orders_max = Some(v.parse().expect("orders_max")),
            "stp_default" => {
                input.stp_default = Some(
                    serde_json::from_value(serde_json::Value::String(v.into()))
                        .expect("stp_default"),
                )
            }
            other => panic!("unknown spec key {other}"),
        }
    }
    input
        .validate()
        .unwrap_or_else(|e| panic!("scenario spec invalid: {e}"))
}

/// `alice: new cid=a1 side=sell price=10.00 qty=5` → the JSON bytes of that command.
fn command_json(line: &str) -> (serde_json::Value, Option<u64>, Option<u64>) {
    let (account, rest) = line
        .split_once(':')
        .unwrap_or_else(|| panic!("command {line:?} needs `account: op ...`"));
    let mut words = rest.split_whitespace();
    let op = words
        .next()
        .unwrap_or_else(|| panic!("command {line:?} has no op"));
    let mut map = serde_json::Map::new();
    map.insert("op".into(), op.into());
    map.insert("account".into(), account.trim().into());
    let (mut ts, mut seq) = (None, None);
    for kv in words {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| panic!("field {kv:?} needs key=value"));
        let value: serde_json::Value = match k {
            "ts" => {
                ts = Some(v.parse().expect("ts"));
                continue;
            }
            "seq" => {
                seq = Some(v.parse().expect("seq"));
                continue;
            }
            "oid" | "expire_at" => serde_json::Value::from(v.parse::<u64>().expect("number")),
            "cancel_orders" => serde_json::Value::from(v == "true"),
            _ => serde_json::Value::from(v),
        };
        map.insert(k.into(), value);
    }
    (serde_json::Value::Object(map), ts, seq)
}

struct Scenario {
    title: String,
    file: String,
    spec_line: String,
    steps: Vec<Step>,
}

enum Step {
    Command {
        line: String,
        expected: Vec<String>,
        line_no: usize,
    },
    Book {
        expected: Vec<String>,
        line_no: usize,
    },
}

fn parse(file: &str, text: &str) -> Vec<Scenario> {
    let mut scenarios: Vec<Scenario> = Vec::new();
    let mut in_book = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || (line.starts_with('#') && !line.starts_with("##")) {
            in_book = false;
            continue;
        }
        if let Some(title) = line.strip_prefix("## ") {
            scenarios.push(Scenario {
                title: title.into(),
                file: file.into(),
                spec_line: String::new(),
                steps: Vec::new(),
            });
            in_book = false;
            continue;
        }
        let s = scenarios
            .last_mut()
            .unwrap_or_else(|| panic!("{file}:{line_no}: text before the first `## title`"));
        if let Some(spec) = line.strip_prefix("spec:") {
            s.spec_line = spec.trim().into();
        } else if let Some(cmd) = line.strip_prefix('>') {
            in_book = false;
            s.steps.push(Step::Command {
                line: cmd.trim().into(),
                expected: Vec::new(),
                line_no,
            });
        } else if line == "book:" {
            in_book = true;
            s.steps.push(Step::Book {
                expected: Vec::new(),
                line_no,
            });
        } else {
            match s.steps.last_mut() {
                Some(Step::Book { expected, .. }) if in_book => expected.push(norm(line)),
                Some(Step::Command { expected, .. }) => expected.push(norm(line)),
                _ => panic!("{file}:{line_no}: {line:?} follows no command or book"),
            }
        }
    }
    scenarios
}

fn run(s: &Scenario) -> Result<(), String> {
    let spec = spec_from(&s.spec_line);
    let mut book = OrderBook::new(spec.clone());
    let mut events = Vec::new();
    let mut next_seq = 1u64;
    let mut ts_last = 0u64;
    for step in &s.steps {
        match step {
            Step::Command {
                line,
                expected,
                line_no,
            } => {
                let (json, ts, seq) = command_json(line);
                let seq = seq.unwrap_or(next_seq);
                next_seq = seq + 1;
                let ts = ts.unwrap_or(ts_last);
                ts_last = ts;
                let bytes = serde_json::to_vec(&json).map_err(|e| e.to_string())?;
                let ctx = DecodeContext {
                    spec: &spec,
                    seq,
                    ts,
                    default_account: None,
                    bound_account: None,
                    batch_max: 100,
                    operator: true,
                };
                let mut got = Vec::new();
                for decoded in wire::decode(&bytes, true, &ctx) {
                    match decoded {
                        Ok(cmd) => {
                            events.clear();
                            book.apply(&cmd, &mut events);
                            book.check_invariants()
                                .map_err(|e| format!("line {line_no}: invariant: {e}"))?;
                            got.extend(events.iter().map(|e| render(&spec, e)));
                        }
                        Err(r) => {
                            got.push(format!("wire-rejected {} {}", r.reason.as_str(), r.message))
                        }
                    }
                }
                let got: Vec<String> = got.iter().map(|g| norm(g)).collect();
                if &got != expected {
                    let mut msg = format!("line {line_no}: `> {line}`\nexpected:\n");
                    for e in expected {
                        let _ = writeln!(msg, "  {e}");
                    }
                    let _ = writeln!(msg, "got:");
                    for g in &got {
                        let _ = writeln!(msg, "  {g}");
                    }
                    return Err(msg);
                }
            }
            Step::Book { expected, line_no } => {
                let got = draw(&book);
                if &got != expected {
                    return Err(format!(
                        "line {line_no}: book differs\nexpected:\n  {}\ngot:\n  {}",
                        expected.join("\n  "),
                        got.join("\n  ")
                    ));
                }
            }
        }
    }
    // Every scenario's final book also survives a snapshot round trip unchanged.
    let snap = book.snapshot();
    let restored = OrderBook::restore(&snap).map_err(|e| format!("restore: {e}"))?;
    if restored.snapshot() != snap {
        return Err("restored book differs from the original".into());
    }
    Ok(())
}

#[test]
fn scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut failures = Vec::new();
    let mut count = 0;
    for path in &files {
        let text = fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        for s in parse(&file, &text) {
            count += 1;
            if let Err(e) = run(&s) {
                failures.push(format!("{} / {}\n{e}", s.file, s.title));
            }
        }
    }
    assert!(
        count >= 40,
        "only {count} scenarios found in {}",
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "{} of {count} scenarios failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
