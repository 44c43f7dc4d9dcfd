//! Data-driven scenario tests: `tests/scenarios/*.txt` hold scripts of commands, the exact
//! events each must produce, and the book drawn as `bids | price | asks`. Every scenario runs
//! on both books, the fast [`OrderBook`] and the naive [`ReferenceBook`], in lockstep: each
//! must produce the events and the book the file spells out, and the two must agree on every
//! event and on their whole state (snapshot) after every command.
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
//! `ts`, `seq`, `oid`, `expire_at` are numbers and `cancel_orders` a boolean). A command takes
//! the next input sequence (from 1) and the last timestamp (from 0) unless it gives `seq=` or
//! `ts=`; `pos=` sets its position within its sequence (default 0), as a batch would. Events
//! name orders by cid, or `#oid` when they have none. A command followed by no event line must
//! produce no event.
//!
//! Besides `spec:`, a scenario may say `events: full`: its events are then written with every
//! field, orders named `oid:account` or `oid:account:cid`, and trades with their id
//! `seq-n` and the taker's side:
//! ```text
//! accepted 1000:a sell limit gtc 100x10 stp=none [stop=P] [display=Q] [expire=T]
//! accepted 5000:t sell market ioc -x1 stp=none
//! rejected new price_out_of_band b oid=6000 cid=- price=1005 qty=1
//! trade 2-1 4@100 buy maker=1000:a leaves=6 taker=2000:b leaves=0
//! cancelled 2000:a buy stp qty=8 leaves=0
//! amended 1000:a:a1 sell 100x6 leaves=4 kept=true
//! triggered 3000:a buy stop_market stop=100 last=100
//! ```
//! (a rejection says its op, reason and account, then the oid, cid, price and qty it carries,
//! `-` for none). Two more checks look at the state rather than the events:
//! ```text
//! orders:
//!   ask 2000:b 100 qty=5 filled=0 leaves=5 visible=5
//!   ask 1000:a 100 qty=10 filled=3 leaves=7 visible=3
//!   stop sell 5000:c - qty=1 filled=0 leaves=1 visible=1 stop=90
//! state: last_input=8:0 trade_n=1 orders=1 stops=0
//! ```
//! `orders:` lists every open order of the snapshot, exactly: bids then asks in priority order
//! (best price first, oldest first within a price), then waiting stops in oid order; `stop=`
//! ends the line of an order that has a stop price. `state:` checks only the keys it names:
//! `halted`, `last_trade`, `last_input` (`seq:pos`), `trade_n`, `best_bid`, `best_ask`,
//! `orders` (resting orders) and `stops` (waiting stops); `-` means none.
//!
//! Failures name the file and line, the scenario, and the book that went wrong.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use agora::book::reference::ReferenceBook;
use agora::book::{
    BookSnapshot, Command, Event, L2Level, MarketSpec, MarketSpecInput, OrderBook, OrderRecord,
    OrderTag, Price, Qty, RestoreError, Side,
};
use agora::wire::{self, DecodeContext};

// ---------------------------------------------------------------------------------------------
// The two books
// ---------------------------------------------------------------------------------------------

/// What a scenario needs of a book.
trait Book: Sized {
    const NAME: &'static str;
    fn spec(&self) -> &MarketSpec;
    fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>);
    fn check_invariants(&self) -> Result<(), String>;
    fn depth(&self, side: Side) -> Vec<L2Level>;
    fn best_bid(&self) -> Option<Price>;
    fn best_ask(&self) -> Option<Price>;
    fn order_count(&self) -> usize;
    fn snapshot(&self) -> BookSnapshot;
    fn restore(s: &BookSnapshot) -> Result<Self, RestoreError>;
}

macro_rules! book {
    ($ty:ty, $name:literal) => {
        impl Book for $ty {
            const NAME: &'static str = $name;
            fn spec(&self) -> &MarketSpec {
                <$ty>::spec(self)
            }
            fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>) {
                <$ty>::apply(self, cmd, out)
            }
            fn check_invariants(&self) -> Result<(), String> {
                <$ty>::check_invariants(self)
            }
            fn depth(&self, side: Side) -> Vec<L2Level> {
                <$ty>::depth(self, side, usize::MAX)
            }
            fn best_bid(&self) -> Option<Price> {
                <$ty>::best_bid(self)
            }
            fn best_ask(&self) -> Option<Price> {
                <$ty>::best_ask(self)
            }
            fn order_count(&self) -> usize {
                <$ty>::order_count(self)
            }
            fn snapshot(&self) -> BookSnapshot {
                <$ty>::snapshot(self)
            }
            fn restore(s: &BookSnapshot) -> Result<Self, RestoreError> {
                <$ty>::restore(s)
            }
        }
    };
}

book!(OrderBook, "fast");
book!(ReferenceBook, "reference");

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

fn name(tag: &OrderTag) -> String {
    match tag.cid {
        Some(cid) => cid.to_string(),
        None => format!("#{}", tag.oid),
    }
}

/// An event in the short form: orders by name, the fields a reader looks at first.
fn render(spec: &MarketSpec, e: &Event) -> String {
    let p = |p: Price| spec.fmt_price(p);
    let q = |q: Qty| spec.fmt_qty(q);
    match e {
        Event::Accepted(a) => format!("accepted {}", name(&a.order)),
        Event::Rejected(r) => {
            let who = match (r.cid, r.oid) {
                (Some(cid), _) => cid.to_string(),
                (None, Some(oid)) => format!("#{oid}"),
                (None, None) => "-".into(),
            };
            match r.retry_after {
                Some(ns) => format!("rejected {who} {} retry_after={ns}", r.reason.as_str()),
                None => format!("rejected {who} {}", r.reason.as_str()),
            }
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

/// An order as `oid:account` or `oid:account:cid`.
fn who(
    oid: agora::book::OrderId,
    account: agora::book::Account,
    cid: Option<agora::book::Cid>,
) -> String {
    match cid {
        Some(cid) => format!("{oid}:{account}:{cid}"),
        None => format!("{oid}:{account}"),
    }
}

fn tag(t: &OrderTag) -> String {
    who(t.oid, t.account, t.cid)
}

/// An event in the full form (`events: full`): every field it carries but its ts (and its
/// seq, but for a trade's id).
fn render_full(spec: &MarketSpec, e: &Event) -> String {
    let p = |p: Price| spec.fmt_price(p);
    let q = |q: Qty| spec.fmt_qty(q);
    let price = |x: Option<Price>| x.map_or("-".to_string(), p);
    let qty = |x: Option<Qty>| x.map_or("-".to_string(), q);
    match e {
        Event::Accepted(a) => {
            let mut s = format!(
                "accepted {} {} {} {} {}x{} stp={}",
                tag(&a.order),
                a.side.as_str(),
                a.order_type.as_str(),
                a.tif.as_str(),
                price(a.price),
                q(a.qty),
                a.stp.as_str()
            );
            if let Some(stop) = a.stop_price {
                let _ = write!(s, " stop={}", p(stop));
            }
            if let Some(d) = a.display_qty {
                let _ = write!(s, " display={}", q(d));
            }
            if let Some(at) = a.expire_at {
                let _ = write!(s, " expire={at}");
            }
            s
        }
        Event::Rejected(r) => {
            format!(
                "rejected {} {} {} oid={} cid={} price={} qty={}",
                r.op.as_str(),
                r.reason.as_str(),
                r.account,
                r.oid.map_or("-".to_string(), |o| o.to_string()),
                r.cid.map_or("-".to_string(), |c| c.to_string()),
                price(r.price),
                qty(r.qty),
            ) + &r
                .retry_after
                .map_or(String::new(), |ns| format!(" retry_after={ns}"))
        }
        Event::Trade(t) => format!(
            "trade {}-{} {}@{} {} maker={} leaves={} taker={} leaves={}",
            t.seq,
            t.trade_n,
            q(t.qty),
            p(t.price),
            t.taker_side.as_str(),
            tag(&t.maker),
            q(t.maker_leaves),
            tag(&t.taker),
            q(t.taker_leaves)
        ),
        Event::Cancelled(c) => format!(
            "cancelled {} {} {} qty={} leaves={}",
            tag(&c.order),
            c.side.as_str(),
            c.reason.as_str(),
            q(c.qty),
            q(c.leaves)
        ),
        Event::Amended(m) => format!(
            "amended {} {} {}x{} leaves={} kept={}",
            tag(&m.order),
            m.side.as_str(),
            p(m.price),
            q(m.qty),
            q(m.leaves),
            m.priority_kept
        ),
        Event::Triggered(t) => format!(
            "triggered {} {} {} stop={} last={}",
            tag(&t.order),
            t.side.as_str(),
            t.order_type.as_str(),
            p(t.stop_price),
            p(t.last_price)
        ),
    }
}

/// The book drawn top-down: asks from the worst shown down to the best, then bids.
fn draw<B: Book>(book: &B) -> Vec<String> {
    let spec = book.spec();
    let cell = |l: &L2Level| format!("{} ({})", spec.fmt_qty(l.qty), l.orders);
    let mut lines = vec![norm("bids | price | asks")];
    for l in book.depth(Side::Sell).iter().rev() {
        lines.push(norm(&format!(
            "| {} | {}",
            spec.fmt_price(l.price),
            cell(l)
        )));
    }
    for l in book.depth(Side::Buy) {
        lines.push(norm(&format!(
            "{} | {} |",
            cell(&l),
            spec.fmt_price(l.price)
        )));
    }
    lines
}

/// Every open order of the snapshot, one line each (see the module doc).
fn orders(s: &BookSnapshot) -> Vec<String> {
    let spec = &s.spec;
    let line = |list: String, o: &OrderRecord| {
        let mut l = format!(
            "{list} {} {} qty={} filled={} leaves={} visible={}",
            who(o.oid, o.account, o.cid),
            o.price.map_or("-".to_string(), |p| spec.fmt_price(p)),
            spec.fmt_qty(o.qty),
            spec.fmt_qty(o.filled),
            spec.fmt_qty(o.leaves),
            spec.fmt_qty(o.visible)
        );
        if let Some(stop) = o.stop_price {
            let _ = write!(l, " stop={}", spec.fmt_price(stop));
        }
        l
    };
    let bids = s.bids.iter().map(|o| line("bid".into(), o));
    let asks = s.asks.iter().map(|o| line("ask".into(), o));
    let stops = s
        .stops
        .iter()
        .map(|o| line(format!("stop {}", o.side.as_str()), o));
    bids.chain(asks).chain(stops).collect()
}

/// The value of one `state:` key.
fn state<B: Book>(book: &B, s: &BookSnapshot, key: &str) -> Result<String, String> {
    let spec = &s.spec;
    let price = |p: Option<Price>| p.map_or("-".to_string(), |p| spec.fmt_price(p));
    Ok(match key {
        "halted" => s.halted.to_string(),
        "last_trade" => price(s.last_trade_price),
        "last_input" => s
            .last_input
            .map_or("-".to_string(), |(seq, pos)| format!("{seq}:{pos}")),
        "trade_n" => s.trade_n.to_string(),
        "best_bid" => price(book.best_bid()),
        "best_ask" => price(book.best_ask()),
        "orders" => book.order_count().to_string(),
        "stops" => s.stops.len().to_string(),
        other => return Err(format!("unknown state key {other:?}")),
    })
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

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
            "cid_window_secs" => input.cid_window_secs = Some(v.parse().expect("cid_window_secs")),
            "cid_window_orders" => {
                input.cid_window_orders = Some(v.parse().expect("cid_window_orders"))
            }
            "account_rate_per_sec" => {
                input.account_rate_per_sec = Some(v.parse().expect("account_rate_per_sec"))
            }
            "account_burst" => input.account_burst = Some(v.parse().expect("account_burst")),
            "account_open_orders_max" => {
                input.account_open_orders_max = Some(v.parse().expect("account_open_orders_max"))
            }
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

/// A command line's JSON and the input fields it sets itself.
struct CommandLine {
    json: serde_json::Value,
    ts: Option<u64>,
    seq: Option<u64>,
    pos: Option<u16>,
}

/// `alice: new cid=a1 side=sell price=10.00 qty=5` → the JSON of that command.
fn command_json(line: &str) -> CommandLine {
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
    let (mut ts, mut seq, mut pos) = (None, None, None);
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
            "pos" => {
                pos = Some(v.parse().expect("pos"));
                continue;
            }
            "oid" | "expire_at" => serde_json::Value::from(v.parse::<u64>().expect("number")),
            "cancel_orders" => serde_json::Value::from(v == "true"),
            _ => serde_json::Value::from(v),
        };
        map.insert(k.into(), value);
    }
    CommandLine {
        json: serde_json::Value::Object(map),
        ts,
        seq,
        pos,
    }
}

struct Scenario {
    title: String,
    file: String,
    spec_line: String,
    /// `events: full`: events in the full form.
    full: bool,
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
    Orders {
        expected: Vec<String>,
        line_no: usize,
    },
    State {
        checks: Vec<(String, String)>,
        line_no: usize,
    },
}

fn parse(file: &str, text: &str) -> Vec<Scenario> {
    let mut scenarios: Vec<Scenario> = Vec::new();
    // Whether lines still belong to the last `book:` or `orders:` block.
    let mut in_block = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || (line.starts_with('#') && !line.starts_with("##")) {
            in_block = false;
            continue;
        }
        if let Some(title) = line.strip_prefix("## ") {
            scenarios.push(Scenario {
                title: title.into(),
                file: file.into(),
                spec_line: String::new(),
                full: false,
                steps: Vec::new(),
            });
            in_block = false;
            continue;
        }
        let s = scenarios
            .last_mut()
            .unwrap_or_else(|| panic!("{file}:{line_no}: text before the first `## title`"));
        if let Some(spec) = line.strip_prefix("spec:") {
            s.spec_line = spec.trim().into();
        } else if let Some(mode) = line.strip_prefix("events:") {
            s.full = match mode.trim() {
                "full" => true,
                "short" => false,
                other => panic!("{file}:{line_no}: events {other:?} is not full or short"),
            };
        } else if let Some(cmd) = line.strip_prefix('>') {
            in_block = false;
            s.steps.push(Step::Command {
                line: cmd.trim().into(),
                expected: Vec::new(),
                line_no,
            });
        } else if line == "book:" {
            in_block = true;
            s.steps.push(Step::Book {
                expected: Vec::new(),
                line_no,
            });
        } else if line == "orders:" {
            in_block = true;
            s.steps.push(Step::Orders {
                expected: Vec::new(),
                line_no,
            });
        } else if let Some(kvs) = line.strip_prefix("state:") {
            in_block = false;
            let checks = kvs
                .split_whitespace()
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or_else(|| {
                        panic!("{file}:{line_no}: state entry {kv:?} needs key=value")
                    });
                    (k.to_string(), v.to_string())
                })
                .collect();
            s.steps.push(Step::State { checks, line_no });
        } else {
            match s.steps.last_mut() {
                Some(Step::Book { expected, .. } | Step::Orders { expected, .. }) if in_block => {
                    expected.push(norm(line))
                }
                Some(Step::Command { expected, .. }) => expected.push(norm(line)),
                _ => panic!("{file}:{line_no}: {line:?} follows no command, book or orders"),
            }
        }
    }
    scenarios
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// Applies one command line's decoded commands to `book`: its events, and every line they
/// and the wire's rejections render to.
fn apply<B: Book>(
    book: &mut B,
    decoded: &[Result<Command, wire::WireReject>],
    full: bool,
) -> Result<(Vec<Event>, Vec<String>), String> {
    let mut all = Vec::new();
    let mut lines = Vec::new();
    let mut events = Vec::new();
    for d in decoded {
        match d {
            Ok(cmd) => {
                let spec = book.spec().clone();
                events.clear();
                book.apply(cmd, &mut events);
                book.check_invariants()
                    .map_err(|e| format!("invariant broken: {e}"))?;
                lines.extend(events.iter().map(|e| {
                    norm(&if full {
                        render_full(&spec, e)
                    } else {
                        render(&spec, e)
                    })
                }));
                all.append(&mut events);
            }
            Err(r) => lines.push(norm(&format!(
                "wire-rejected {} {}",
                r.reason.as_str(),
                r.message
            ))),
        }
    }
    Ok((all, lines))
}

/// `expected` and `got`, one per line, indented, for a failure message.
fn differ(what: &str, expected: &[String], got: &[String]) -> String {
    let mut msg = format!("{what} differ\n    expected:\n");
    for e in expected {
        let _ = writeln!(msg, "      {e}");
    }
    let _ = writeln!(msg, "    got:");
    for g in got {
        let _ = writeln!(msg, "      {g}");
    }
    msg
}

/// One book's result at a step: what it rendered, checked against what the file says.
fn check<B: Book>(
    failures: &mut Vec<(&'static str, String)>,
    what: &str,
    expected: &[String],
    got: &[String],
) {
    if got != expected {
        failures.push((B::NAME, differ(what, expected, got)));
    }
}

fn check_state<B: Book>(
    failures: &mut Vec<(&'static str, String)>,
    book: &B,
    checks: &[(String, String)],
) {
    let snapshot = book.snapshot();
    for (key, want) in checks {
        match state(book, &snapshot, key) {
            Ok(got) if &got == want => {}
            Ok(got) => failures.push((B::NAME, format!("state {key} is {got}, expected {want}"))),
            Err(e) => failures.push((B::NAME, e)),
        }
    }
}

/// Runs one scenario on both books in lockstep. On the first step where anything is wrong,
/// says what, for which book, at which line.
fn run(s: &Scenario) -> Result<(), String> {
    let spec = spec_from(&s.spec_line);
    let mut fast = OrderBook::new(spec.clone());
    let mut reference = ReferenceBook::new(spec);
    let mut next_seq = 1u64;
    let mut ts_last = 0u64;
    let here = |line_no: usize, what: &str| format!("{}:{line_no}: {what}", s.file);
    for step in &s.steps {
        // (book, message) for each thing wrong at this step.
        let mut failures: Vec<(&'static str, String)> = Vec::new();
        let (line_no, what) = match step {
            Step::Command {
                line,
                expected,
                line_no,
            } => {
                let c = command_json(line);
                let seq = c.seq.unwrap_or(next_seq);
                next_seq = seq + 1;
                let ts = c.ts.unwrap_or(ts_last);
                ts_last = ts;
                let bytes = serde_json::to_vec(&c.json).map_err(|e| e.to_string())?;
                let ctx = DecodeContext {
                    spec: fast.spec(),
                    seq,
                    ts,
                    default_account: None,
                    bound_account: None,
                    batch_max: 100,
                    operator: true,
                };
                let mut decoded = wire::decode(&bytes, true, &ctx);
                if let Some(pos) = c.pos {
                    for cmd in decoded.iter_mut().flatten() {
                        cmd.pos = pos;
                    }
                }
                let f = apply(&mut fast, &decoded, s.full);
                let r = apply(&mut reference, &decoded, s.full);
                match &f {
                    Ok((_, got)) => check::<OrderBook>(&mut failures, "events", expected, got),
                    Err(e) => failures.push((OrderBook::NAME, e.clone())),
                }
                match &r {
                    Ok((_, got)) => check::<ReferenceBook>(&mut failures, "events", expected, got),
                    Err(e) => failures.push((ReferenceBook::NAME, e.clone())),
                }
                if let (Ok((fe, _)), Ok((re, _))) = (&f, &r) {
                    if fe != re {
                        failures.push((
                            "fast and reference",
                            format!("events differ\n    fast: {fe:?}\n    reference: {re:?}"),
                        ));
                    }
                    let (fs, rs) = (fast.snapshot(), reference.snapshot());
                    if fs != rs {
                        failures.push((
                            "fast and reference",
                            format!("snapshots differ\n    fast: {fs:?}\n    reference: {rs:?}"),
                        ));
                    }
                }
                (*line_no, format!("`> {line}`"))
            }
            Step::Book { expected, line_no } => {
                check::<OrderBook>(&mut failures, "books", expected, &draw(&fast));
                check::<ReferenceBook>(&mut failures, "books", expected, &draw(&reference));
                (*line_no, "book:".to_string())
            }
            Step::Orders { expected, line_no } => {
                check::<OrderBook>(&mut failures, "orders", expected, &orders(&fast.snapshot()));
                let got = orders(&reference.snapshot());
                check::<ReferenceBook>(&mut failures, "orders", expected, &got);
                (*line_no, "orders:".to_string())
            }
            Step::State { checks, line_no } => {
                check_state(&mut failures, &fast, checks);
                check_state(&mut failures, &reference, checks);
                (*line_no, "state:".to_string())
            }
        };
        if !failures.is_empty() {
            let mut msg = here(line_no, &what);
            for (book, failure) in failures {
                let _ = write!(msg, "\n  {book} book: {failure}");
            }
            return Err(msg);
        }
    }
    // Every scenario's final book also survives a snapshot round trip unchanged.
    round_trip(&fast)?;
    round_trip(&reference)
}

fn round_trip<B: Book>(book: &B) -> Result<(), String> {
    let snap = book.snapshot();
    let restored = B::restore(&snap).map_err(|e| format!("{} book: restore: {e}", B::NAME))?;
    if restored.snapshot() != snap {
        return Err(format!(
            "{} book: the restored book differs from the original",
            B::NAME
        ));
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
        count >= 77,
        "only {count} scenarios found in {}",
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "{} of {count} scenarios failed (each on both books):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
