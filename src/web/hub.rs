//! What the web page shows, gathered once per node for every page open on it: the markets
//! (their bucket, their placement, the owner's heartbeat figures, the book's best prices kept
//! from the L2 deltas, the last trade, the order stream's lag, the history's ticker), the live
//! nodes and the rebalancer's holder, and the events a page follows (deltas and trades of its
//! market, every market's status, handoffs and failovers with their pause).
//!
//! The hub starts with the first page and stops a minute after the last one closed, so a node
//! nobody looks at subscribes to nothing. It reads only what any NATS client may read; it
//! never asks a market actor anything (the book's deltas and snapshot request are public).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::actors::market::MarketStatus;
use crate::bus::{Buckets, KvFollower, Subjects};
use crate::client::{BookDelta, BookSnapshot, Client, ClientError, HistoryAskError, L2, TapeTrade};
use crate::cluster::membership::{NodeRecord, REBALANCER_KEY, Renewal, renewed_node, unix_ms};
use crate::cluster::placement::{Placement, PlacementState};
use crate::history::decimal::Dec;

/// How long a book or history request may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most event streams (open pages) one node serves at once.
pub const STREAMS_MAX: usize = 64;
/// Trades kept per market for a page that opens.
const TAPE_KEPT: usize = 100;
/// Handoffs and failovers kept for a page that opens.
const EVENTS_KEPT: usize = 50;
/// The hub stops this long after the last page closed.
const IDLE_STOP: Duration = Duration::from_secs(60);
/// Most deltas kept for a market while its book is fetched (past that the oldest go, and
/// the book is fetched again when they are found missing).
const WAITING_MAX: usize = 10_000;
/// How often lags and tickers are read again.
const SLOW_EVERY: Duration = Duration::from_secs(5);
/// A node not heard from for this long is dropped from the page.
const NODE_FORGET: Duration = Duration::from_secs(60);

/// One server-sent event, for the pages of `market` (or of every market).
struct Frame {
    market: Option<String>,
    text: String,
}

fn frame(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

#[derive(Deserialize)]
struct Tape {
    market: String,
    trades: Vec<TapeTrade>,
}

struct NodeSeen {
    record: NodeRecord,
    seen: Instant,
}

#[derive(Default)]
struct MarketView {
    /// In the markets bucket (a market that exists).
    listed: bool,
    placement: Option<Placement>,
    book: Option<L2>,
    fetching: bool,
    /// Deltas that came while the book was being fetched, applied after it.
    waiting: VecDeque<BookDelta>,
    last_price: Option<String>,
    tape: VecDeque<TapeTrade>,
    /// The node that last said it runs the market, at which epoch.
    owner: Option<(String, u64)>,
    /// The node that last said it stopped the market, at which epoch, when.
    stopped: Option<(String, u64, Instant)>,
    /// The state it last announced.
    announced: Option<String>,
    lag: Option<u64>,
    ticker: Option<Value>,
}

#[derive(Default)]
struct State {
    markets: BTreeMap<String, MarketView>,
    nodes: BTreeMap<String, NodeSeen>,
    rebalancer: Option<String>,
    events: VecDeque<Value>,
}

pub struct Hub {
    pub(super) client: async_nats::Client,
    /// The same connection as a client: book and history requests as clients make them.
    api: Client,
    js: jetstream::Context,
    pub(super) subjects: Subjects,
    buckets: Buckets,
    pub(super) node: String,
    /// A node whose heartbeat is older than this is not live.
    lease: Duration,
    state: Mutex<State>,
    events: broadcast::Sender<Arc<Frame>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    streams: AtomicUsize,
    last_used: Mutex<Instant>,
    /// How many of the three buckets the hub has read up to their latest entry since it
    /// started (an empty bucket counts once its watch is open).
    synced: AtomicUsize,
}

/// Counts an open event stream while it lives.
struct StreamGuard(Arc<Hub>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        *lock(&self.0.last_used) = Instant::now();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Clone, Copy)]
enum Bucket {
    Markets,
    Placement,
    Nodes,
}

impl Hub {
    pub fn new(
        client: async_nats::Client,
        subjects: Subjects,
        buckets: Buckets,
        node: String,
        lease: Duration,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            api: Client::with_connection(client.clone(), subjects.clone()),
            js: jetstream::new(client.clone()),
            client,
            subjects,
            buckets,
            node,
            lease,
            state: Mutex::new(State::default()),
            events: broadcast::channel(4096).0,
            tasks: Mutex::new(Vec::new()),
            streams: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            synced: AtomicUsize::new(0),
        })
    }

    /// Starts following the cluster unless it already does.
    pub fn ensure_running(self: &Arc<Hub>) {
        *lock(&self.last_used) = Instant::now();
        let mut tasks = lock(&self.tasks);
        if !tasks.is_empty() {
            return;
        }
        let follow = |bucket: Bucket, store: &kv::Store| {
            tokio::spawn(self.clone().follow(bucket, store.clone()))
        };
        tasks.push(follow(Bucket::Markets, &self.buckets.markets));
        tasks.push(follow(Bucket::Placement, &self.buckets.placement));
        tasks.push(follow(Bucket::Nodes, &self.buckets.nodes));
        tasks.push(tokio::spawn(self.clone().listen()));
        tasks.push(tokio::spawn(self.clone().slow_loop()));
    }

    fn stop(&self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        *lock(&self.state) = State::default();
        self.synced.store(0, Ordering::Relaxed);
    }

    /// Waits (at most `timeout`) until the hub has read every bucket's current entries, so
    /// that the first overview a page gets is whole.
    pub async fn wait_synced(&self, timeout: Duration) {
        let started = Instant::now();
        while self.synced.load(Ordering::Relaxed) < 3 && started.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Follows one bucket, its current entries first, for as long as the hub runs.
    async fn follow(self: Arc<Hub>, bucket: Bucket, store: kv::Store) {
        let mut counted = false;
        loop {
            if let Ok(mut follower) = KvFollower::open(store.clone()).await {
                let empty = store
                    .status()
                    .await
                    .map(|s| s.values() == 0)
                    .unwrap_or(false);
                if empty && !counted {
                    counted = true;
                    self.synced.fetch_add(1, Ordering::Relaxed);
                }
                while let Some(entry) = follower.next().await {
                    let Ok(entry) = entry else { break };
                    self.apply_entry(bucket, &entry);
                    if entry.delta == 0 && !counted {
                        counted = true;
                        self.synced.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn apply_entry(&self, bucket: Bucket, entry: &kv::Entry) {
        let gone = !matches!(entry.operation, kv::Operation::Put);
        let mut state = lock(&self.state);
        match bucket {
            Bucket::Markets => {
                let view = state.markets.entry(entry.key.clone()).or_default();
                view.listed = !gone;
                if gone && view.placement.is_none() {
                    state.markets.remove(&entry.key);
                }
            }
            Bucket::Placement => {
                let placement = if gone {
                    None
                } else {
                    Placement::decode(&entry.value)
                };
                let view = state.markets.entry(entry.key.clone()).or_default();
                // The owner as the market announced it; the placement only tells it before the
                // first announcement this hub hears (a handoff is told by the announcements).
                if let Some(p) = &placement
                    && p.state == PlacementState::Active
                    && view.owner.is_none()
                {
                    view.owner = Some((p.node.clone(), p.epoch));
                }
                view.placement = placement;
            }
            Bucket::Nodes if let Some(node) = renewed_node(&entry.key) => {
                // A renewal without load keeps alive the record of the same instance.
                if !gone
                    && let Ok(renewal) = serde_json::from_slice::<Renewal>(&entry.value)
                    && let Some(n) = state.nodes.get_mut(node)
                    && n.record.instance == renewal.instance
                {
                    n.seen = Instant::now();
                }
            }
            Bucket::Nodes if entry.key == REBALANCER_KEY => {
                state.rebalancer = (!gone).then(|| String::from_utf8_lossy(&entry.value).into());
            }
            Bucket::Nodes => {
                if gone {
                    state.nodes.remove(&entry.key);
                } else if let Ok(record) = serde_json::from_slice::<NodeRecord>(&entry.value) {
                    let seen = Instant::now();
                    state
                        .nodes
                        .insert(entry.key.clone(), NodeSeen { record, seen });
                }
            }
        }
    }

    /// The public subjects of every market: L2 deltas, trades, status.
    async fn listen(self: Arc<Hub>) {
        loop {
            let mut subscriptions = Vec::new();
            for subject in [
                self.subjects.book("*"),
                self.subjects.trades("*"),
                self.subjects.status("*"),
            ] {
                if let Ok(s) = self.client.subscribe(subject).await {
                    subscriptions.push(s);
                }
            }
            let mut messages = futures::stream::select_all(subscriptions);
            while let Some(message) = messages.next().await {
                self.on_message(&message);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn on_message(self: &Arc<Hub>, message: &async_nats::Message) {
        let subject = message.subject.as_str();
        let kind = subject
            .strip_prefix(self.subjects.prefix())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.split('.').next())
            .unwrap_or("");
        match kind {
            "book" => {
                if let Ok(delta) = rmp_serde::from_slice::<BookDelta>(&message.payload) {
                    self.on_delta(delta);
                }
            }
            "trades" => {
                if let Ok(tape) = rmp_serde::from_slice::<Tape>(&message.payload) {
                    self.on_trades(tape);
                }
            }
            "status" => {
                if let Some(status) = MarketStatus::decode(&message.payload) {
                    self.on_status(status);
                }
            }
            _ => {}
        }
    }

    fn broadcast(&self, market: Option<&str>, event: &str, data: &Value) {
        // No page open: nobody to tell.
        let _ = self.events.send(Arc::new(Frame {
            market: market.map(str::to_string),
            text: frame(event, data),
        }));
    }

    fn on_delta(self: &Arc<Hub>, delta: BookDelta) {
        let fetch = {
            let mut state = lock(&self.state);
            let view = state.markets.entry(delta.market.clone()).or_default();
            if view.fetching {
                if view.waiting.len() == WAITING_MAX {
                    view.waiting.pop_front();
                }
                view.waiting.push_back(delta.clone());
                false
            } else if view.book.as_mut().is_some_and(|b| b.apply(&delta).is_ok()) {
                false
            } else {
                // No book yet, or a delta missed: fetch it, keeping what comes meanwhile.
                view.book = None;
                view.fetching = true;
                view.waiting.clear();
                view.waiting.push_back(delta.clone());
                true
            }
        };
        if fetch {
            let hub = self.clone();
            let market = delta.market.clone();
            tokio::spawn(async move { hub.fetch_book(market).await });
        }
        if let Ok(data) = serde_json::to_value(&delta) {
            self.broadcast(Some(&delta.market), "book", &data);
        }
    }

    /// The market's whole L2 book, for the best prices of the overview, and the deltas that
    /// came meanwhile applied over it.
    async fn fetch_book(&self, market: String) {
        let fetched = self.book(&market, None).await.ok();
        let mut state = lock(&self.state);
        let view = state.markets.entry(market).or_default();
        view.fetching = false;
        let waiting = std::mem::take(&mut view.waiting);
        let Some(snapshot) = fetched else {
            // Asked again at the next delta.
            return;
        };
        let mut book = L2::from_snapshot(&snapshot);
        // A delta that does not follow means one was lost: the next one fetches again.
        let whole = waiting.iter().all(|d| book.apply(d).is_ok());
        view.book = whole.then_some(book);
    }

    /// Asks the market for its book (`depth` levels a side, or all), as a client does: the
    /// snapshot, or (HTTP status, error) when it refused or nobody answered.
    pub async fn book(
        &self,
        market: &str,
        depth: Option<usize>,
    ) -> Result<BookSnapshot, (u16, Value)> {
        self.api
            .book_request(market, depth, ASK_TIMEOUT)
            .await
            .map_err(|e| match e {
                ClientError::Refused {
                    error,
                    message,
                    retry_after,
                    ..
                } => (
                    if error == "rate_limited" { 429 } else { 503 },
                    json!({"error": error, "message": message, "retry_after_ms": retry_after.map(|d| d.as_millis() as u64)}),
                ),
                other => (
                    503,
                    json!({"error": "not_answering", "message": format!("{other} (not running, or moving: ask again)")}),
                ),
            })
    }

    fn on_trades(&self, tape: Tape) {
        {
            let mut state = lock(&self.state);
            let view = state.markets.entry(tape.market.clone()).or_default();
            for trade in &tape.trades {
                if view.tape.len() == TAPE_KEPT {
                    view.tape.pop_front();
                }
                view.tape.push_back(trade.clone());
            }
            if let Some(last) = tape.trades.last() {
                view.last_price = Some(last.price.clone());
            }
        }
        let data = json!({"market": tape.market, "trades": tape.trades});
        self.broadcast(Some(&tape.market), "trades", &data);
    }

    /// A market's announcement; a new owner's first `active` after another node's `released`
    /// (or `stopped`) is a handoff (its pause: from that stop), after no stop a failover (its
    /// pause: from the old owner's last heartbeat).
    fn on_status(&self, status: MarketStatus) {
        let now = Instant::now();
        let event = {
            let mut state = lock(&self.state);
            // How long ago the last owner was heard from: a failover's pause began then.
            let last_heard = state
                .markets
                .get(&status.market)
                .and_then(|v| v.owner.as_ref())
                .and_then(|(old, _)| state.nodes.get(old))
                .map(|n| now.duration_since(n.seen));
            let view = state.markets.entry(status.market.clone()).or_default();
            view.announced = Some(status.state.clone());
            let mut event = None;
            // `released`: handed to the next owner; `stopped`: stopped (drained, removed).
            if status.state == "stopped" || status.state == "released" {
                view.stopped = Some((status.node.clone(), status.epoch, now));
            } else if status.is_active() {
                let newer = view.owner.as_ref().is_none_or(|(_, e)| *e < status.epoch);
                if newer {
                    let before = view.owner.clone();
                    let stop = view.stopped.take();
                    if let Some((from, _)) = before.filter(|(n, _)| *n != status.node) {
                        let (kind, pause) = match stop {
                            Some((_, epoch, at)) if epoch < status.epoch => {
                                ("handoff", Some(now.duration_since(at)))
                            }
                            _ => ("failover", last_heard),
                        };
                        event = Some(json!({
                            "kind": kind,
                            "market": status.market,
                            "from": from,
                            "to": status.node,
                            "epoch": status.epoch,
                            "pause_ms": pause.map(|p| p.as_millis() as u64),
                            "ts_ms": unix_ms(),
                        }));
                    }
                    view.owner = Some((status.node.clone(), status.epoch));
                }
            }
            if let Some(e) = &event {
                if state.events.len() == EVENTS_KEPT {
                    state.events.pop_front();
                }
                state.events.push_back(e.clone());
            }
            event
        };
        let data = json!({
            "market": status.market,
            "node": status.node,
            "epoch": status.epoch,
            "state": status.state,
            "ts_ms": unix_ms(),
        });
        self.broadcast(None, "status", &data);
        if let Some(event) = event {
            self.broadcast(None, "cluster", &event);
        }
    }

    /// Every few seconds: each market's lag behind its order stream and the history's ticker;
    /// and the hub stops once no page has been open for a minute.
    async fn slow_loop(self: Arc<Hub>) {
        loop {
            let markets: Vec<(String, Option<u64>)> = {
                let state = lock(&self.state);
                state
                    .markets
                    .iter()
                    .filter(|(_, v)| v.listed)
                    .map(|(m, v)| {
                        let applied = v.owner.as_ref().and_then(|(node, _)| {
                            state.nodes.get(node).and_then(|n| {
                                n.record
                                    .markets
                                    .iter()
                                    .find(|l| &l.symbol == m)
                                    .map(|l| l.last_seq)
                            })
                        });
                        (m.clone(), applied)
                    })
                    .collect()
            };
            let mut history = true;
            for (market, applied) in markets {
                let lag = match applied {
                    Some(applied) => self
                        .stream_last(&market)
                        .await
                        .map(|last| last.saturating_sub(applied)),
                    None => None,
                };
                let ticker = if history {
                    match self.history(&format!("ticker.{market}"), json!({})).await {
                        Ok(t) => Some(t),
                        Err((503, _)) => {
                            // No history process: ask no other market this round.
                            history = false;
                            None
                        }
                        Err(_) => None,
                    }
                } else {
                    None
                };
                let mut state = lock(&self.state);
                if let Some(view) = state.markets.get_mut(&market) {
                    view.lag = lag;
                    view.ticker = ticker;
                }
            }
            {
                let mut state = lock(&self.state);
                state.nodes.retain(|_, n| n.seen.elapsed() < NODE_FORGET);
            }
            tokio::time::sleep(SLOW_EVERY).await;
            let idle = self.streams.load(Ordering::Relaxed) == 0
                && lock(&self.last_used).elapsed() > IDLE_STOP;
            if idle {
                self.stop();
                return;
            }
        }
    }

    async fn stream_last(&self, market: &str) -> Option<u64> {
        let name = self.subjects.orders_stream(market);
        let asked = async {
            let mut stream = self.js.get_stream(&name).await.ok()?;
            stream.info().await.ok().map(|i| i.state.last_sequence)
        };
        tokio::time::timeout(Duration::from_secs(1), asked)
            .await
            .ok()
            .flatten()
    }

    /// Asks a history query (`<prefix>.query.<what>`) in JSON: its answer, or (503, why)
    /// when no history process runs, (504, why) when it did not answer in time, (400, its
    /// refusal) when it refused.
    pub async fn history(&self, what: &str, body: Value) -> Result<Value, (u16, Value)> {
        self.api
            .ask_history(what, &body, ASK_TIMEOUT)
            .await
            .map_err(|e| match e {
                HistoryAskError::NotRunning { .. } => (
                    503,
                    json!({"error": "no_history", "message": "agora history is not running: start it beside the nodes for candles, tickers and older trades"}),
                ),
                HistoryAskError::Refused(v) => (400, v),
                HistoryAskError::Timeout { .. } => {
                    (504, json!({"error": "timeout", "message": e.to_string()}))
                }
                HistoryAskError::Failed { .. } => {
                    (503, json!({"error": "bad_answer", "message": e.to_string()}))
                }
            })
    }

    /// The trades this node saw of `market`, newest first.
    pub fn recent_trades(&self, market: &str) -> Value {
        let state = lock(&self.state);
        let trades: Vec<&TapeTrade> = state
            .markets
            .get(market)
            .map(|v| v.tape.iter().rev().collect())
            .unwrap_or_default();
        json!({"market": market, "trades": trades})
    }

    /// The markets, the nodes and the recent handoffs and failovers, as the page shows them.
    pub fn overview(&self) -> Value {
        let state = lock(&self.state);
        let now = Instant::now();
        let live = |node: &str| {
            state
                .nodes
                .get(node)
                .is_some_and(|n| now.duration_since(n.seen) <= self.lease)
        };
        let markets: Vec<Value> = state
            .markets
            .iter()
            .filter(|(_, v)| v.listed || v.placement.is_some())
            .map(|(symbol, v)| {
                let load = v.placement.as_ref().and_then(|p| {
                    state
                        .nodes
                        .get(&p.node)
                        .and_then(|n| n.record.markets.iter().find(|l| &l.symbol == symbol))
                });
                let state_name = match (&v.placement, load) {
                    (None, _) => "unplaced",
                    (Some(p), _) if p.state != PlacementState::Active => "moving",
                    (Some(_), _)
                        if matches!(v.announced.as_deref(), Some("stopped" | "released")) =>
                    {
                        "moving"
                    }
                    (Some(_), Some(l)) if l.halted => "halted",
                    _ => "active",
                };
                let best =
                    |levels: Vec<crate::client::Level>| levels.into_iter().next().map(|l| l.price);
                let bid = v.book.as_ref().and_then(|b| best(b.bids(1)));
                let ask = v.book.as_ref().and_then(|b| best(b.asks(1)));
                let spread = bid
                    .as_deref()
                    .and_then(Dec::parse)
                    .zip(ask.as_deref().and_then(Dec::parse))
                    .and_then(|(b, a)| a.checked_sub(b))
                    .map(|d| d.to_string());
                json!({
                    "market": symbol,
                    "node": v.placement.as_ref().map(|p| &p.node),
                    "node_live": v.placement.as_ref().map(|p| live(&p.node)),
                    "epoch": v.placement.as_ref().map(|p| p.epoch),
                    "state": state_name,
                    "standby": v.placement.as_ref().and_then(|p| p.standby.as_ref()),
                    "commands_per_sec": load.map(|l| l.commands_per_sec),
                    "resting_orders": load.map(|l| l.resting_orders),
                    "last_seq": load.map(|l| l.last_seq),
                    "lag": v.lag,
                    "last_price": v.last_price,
                    "best_bid": bid,
                    "best_ask": ask,
                    "spread": spread,
                    "ticker": v.ticker,
                })
            })
            .collect();
        let nodes: Vec<Value> = state
            .nodes
            .values()
            .map(|n| {
                let r = &n.record;
                let age = now.duration_since(n.seen);
                json!({
                    "node": r.node,
                    "instance": r.instance,
                    "started_unix_ms": r.started_unix_ms,
                    "commands_per_sec": r.commands_per_sec,
                    "cpu_pct": r.cpu_pct,
                    "markets": r.markets.iter().map(|m| &m.symbol).collect::<Vec<_>>(),
                    "following": r.following,
                    "age_ms": age.as_millis() as u64,
                    "live": age <= self.lease,
                })
            })
            .collect();
        json!({
            "node": self.node,
            "prefix": self.subjects.prefix(),
            "now_ms": unix_ms(),
            "rebalancer": state.rebalancer,
            "nodes": nodes,
            "markets": markets,
            "events": state.events.iter().rev().collect::<Vec<_>>(),
        })
    }

    /// An event stream for a page showing `market`: `hello`, then `overview` every second,
    /// its market's `book` and `trades`, every market's `status` and `cluster` events.
    pub fn stream(self: &Arc<Hub>, market: String) -> Result<mpsc::Receiver<String>, (u16, Value)> {
        if self.streams.fetch_add(1, Ordering::Relaxed) >= STREAMS_MAX {
            self.streams.fetch_sub(1, Ordering::Relaxed);
            return Err((
                429,
                json!({"error": "too_many_pages", "message": format!("this node serves at most {STREAMS_MAX} pages at once; open the page on another node")}),
            ));
        }
        let guard = StreamGuard(self.clone());
        self.ensure_running();
        let (tx, rx) = mpsc::channel::<String>(1024);
        let mut events = self.events.subscribe();
        let hub = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            hub.wait_synced(Duration::from_secs(2)).await;
            let hello = json!({"node": hub.node, "market": market});
            // retry: how long a browser waits before it reconnects (its default is ~3 s).
            let first = format!("retry: 1000\n{}", frame("hello", &hello));
            if tx.send(first).await.is_err() {
                return;
            }
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let text = tokio::select! {
                    _ = tick.tick() => frame("overview", &hub.overview()),
                    event = events.recv() => match event {
                        Ok(f) if f.market.as_deref().is_none_or(|m| m == market) => f.text.clone(),
                        Ok(_) => continue,
                        // A page too slow for the deltas misses some: it sees the gap in
                        // their sequence numbers and fetches the book again.
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = tx.closed() => break,
                };
                if tx.send(text).await.is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }
}
