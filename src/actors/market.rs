//! `MarketActor`: the actor that owns one market's book (through `MarketCore`), and the driver
//! that feeds it from the market's order stream and publishes what it produces.
//!
//! The driver takes batches from a JetStream pull consumer (never a plain subscription, which
//! drops messages when its buffer fills), hands each batch to the actor through its bounded
//! mailbox (so overload shows as back-pressure), then publishes the journal message fenced with
//! `Nats-Expected-Last-Subject-Sequence`, and only once it is acknowledged the derived views,
//! whose acknowledgements it collects while it matches and journals the next batch. On start it
//! recovers: it reads the journal's last two batches (the views of the one before the last may
//! not have been acknowledged when the last landed), replays the stream up to them silently,
//! republishes their derived views (JetStream drops what had landed) and goes on from the next
//! sequence. No command is lost or applied twice; no output is published
//! twice. This module must never publish a derived view before its journal message, nor go on
//! after the fence says another owner wrote the journal.
//!
//! Traces: a message whose `traceparent` header says "sampled" gets an `agora.market.command`
//! span (`telemetry::traces`), carried beside the batch: into the actor (`Process::traced`),
//! where the match is recorded under it, and through the journal and report publishes. An
//! untraced message costs an atomic load (a header lookup with tracing on), nothing more.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    context::PublishErrorKind,
};
use async_nats::{HeaderMap, HeaderValue};
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::Instrument;

use super::core::{self, BatchStats, Incoming, MarketCore, MarketSnapshot};
use super::lease::Lease;
use super::metrics::MarketMetrics;
use crate::book::{MarketSpec, OrderBook, Seq, StateHash, Timestamp};
use crate::bus::acks::{ACK_TIMEOUT, AckedPublisher};
use crate::bus::outputs::{self, BatchOutputs, Outgoing, Top};
use crate::bus::{BusError, SnapshotBlob, SnapshotStore, Subjects};
use crate::telemetry::traces::{self, Matching, PublishSpans, TracedCommand};

/// What a market talks to: NATS, JetStream, its subject names and the snapshot store.
#[derive(Clone)]
pub struct MarketBus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    /// Where snapshots are written and read; `None` recovers from the streams alone.
    pub snapshots: Option<SnapshotStore>,
}

/// How a market takes its input.
#[derive(Clone, Debug)]
pub struct MarketSettings {
    /// Most stream messages processed as one batch (one journal message).
    pub fetch_max: usize,
    /// How long a batch waits for commands the stream already holds for it but that have not
    /// arrived yet (a backlog), so that it fills up to `fetch_max` (zero: never waits).
    pub backlog_wait: Duration,
    /// Most commands one batch message (`op: batch`) may carry.
    pub batch_max: u16,
    /// The node running the market, named in its status announcements.
    pub node_id: String,
    /// The placement epoch the market runs at (0 until the cluster assigns one).
    pub epoch: u64,
    /// A snapshot after this many commands (0: not by count).
    pub snapshot_every_commands: u64,
    /// A snapshot after this long with commands since the last one (zero: not by time).
    pub snapshot_every: Duration,
    /// The node's lease: checked before every journal publish (`None`: not checked).
    pub lease: Option<Lease>,
    /// The `traceparent` of the handoff or failover that gave this node the market: its
    /// recovery is traced as a child.
    pub trace: Option<String>,
    /// The previous owner released the market (a planned move) with every output up to the
    /// journal's last batch acknowledged: recovery applies that batch silently instead of
    /// rebuilding and republishing its outputs, which keeps a move's pause short.
    pub handed_over: bool,
    /// With `handed_over`: where the previous owner stopped, from its release record. Recovery
    /// then goes up to there without reading the journal's head (`None`: an older record;
    /// the journal is read).
    pub stop_point: Option<StopPoint>,
}

/// Where a market's driver stopped cleanly (every output acknowledged): its last applied
/// order-stream sequence, and the `EVENTS` stream sequence of the journal's last message as
/// the driver knew it (its own last, or the one its recovery found; `None`: the journal was
/// empty). A releasing owner writes it into the placement record, so the new owner need not
/// read the journal's head inside the move's pause; the journal fence still decides (a stale
/// figure fails the new owner's first publish and nothing else).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct StopPoint {
    pub seq: Seq,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_seq: Option<u64>,
}

impl Default for MarketSettings {
    fn default() -> MarketSettings {
        MarketSettings {
            fetch_max: 256,
            backlog_wait: Duration::from_millis(2),
            batch_max: 100,
            node_id: String::new(),
            epoch: 0,
            snapshot_every_commands: 100_000,
            snapshot_every: Duration::from_secs(30),
            lease: None,
            trace: None,
            handed_over: false,
            stop_point: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MarketError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{market}: {what}: {reason}")]
    Nats {
        market: String,
        what: &'static str,
        reason: String,
    },
    #[error(
        "{market}: the journal was extended by another owner (at stream sequence {found}); this node no longer owns the market and stopped without publishing"
    )]
    Fenced { market: String, found: u64 },
    #[error(
        "{market}: this node's lease lapsed (its heartbeat was not renewed in time); it stopped the market without publishing, and the cluster gives it to a live node"
    )]
    LeaseLapsed { market: String },
    #[error("{market}: the market actor is gone")]
    ActorGone { market: String },
    #[error("{market}: {reason}")]
    Recovery { market: String, reason: String },
}

/// The actor: owns the market's pure core. Its mailbox is bounded; the driver awaits each send.
pub struct MarketActor {
    core: MarketCore,
    /// Messages applied, and when, for the rate `market.list` shows (the shell may read the
    /// clock; the core never does).
    applied: std::collections::VecDeque<(std::time::Instant, usize)>,
    /// The stream sequence of the last snapshot saved.
    snapshot_seq: Seq,
}

impl MarketActor {
    fn count(&mut self, n: usize) {
        let now = std::time::Instant::now();
        self.applied.push_back((now, n));
        while self
            .applied
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(10))
        {
            self.applied.pop_front();
        }
    }
}

impl Actor for MarketActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(16);
    }
}

/// Apply messages and return what each resulting batch sends (more than one when their events
/// would not fit one journal message), and what it did.
#[derive(Message)]
#[rtype(result = "Vec<(BatchOutputs, BatchStats)>")]
pub struct Process {
    pub batch: Vec<Incoming>,
    /// The spans of the batch's traced messages (almost always none); the match is recorded
    /// under each.
    pub traced: Vec<TracedCommand>,
}

/// Apply messages already processed before (recovery): nothing is built.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replay(pub Vec<Incoming>);

/// The last applied stream sequence and the book's state hash.
#[derive(Message)]
#[rtype(result = "(Seq, StateHash)")]
pub struct State;

/// What `market.list` shows of a market.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct MarketStats {
    pub last_seq: Seq,
    pub halted: bool,
    pub resting_orders: usize,
    pub stop_orders: usize,
    pub bid_levels: usize,
    pub ask_levels: usize,
    /// Commands applied per second over the last ten seconds.
    pub commands_per_sec: f64,
    /// The stream sequence of the last snapshot saved (0: none yet).
    pub snapshot_seq: Seq,
}

#[derive(Message)]
#[rtype(result = "MarketStats")]
pub struct Stats;

/// The whole L2 book and the stream sequence it reflects.
#[derive(Message)]
#[rtype(result = "(Seq, Top)")]
pub struct L2Book;

impl Handler<Process> for MarketActor {
    type Result = MessageResult<Process>;
    fn handle(&mut self, msg: Process, _: &mut Self::Context) -> Self::Result {
        self.count(msg.batch.len());
        let matching = Matching::start(
            self.core.spec().symbol.as_str(),
            &msg.traced,
            msg.batch.len(),
        );
        let batches = self.core.process_split(&msg.batch);
        matching.finish(batches.iter().map(|(out, _)| &out.journal));
        MessageResult(batches)
    }
}

impl Handler<Replay> for MarketActor {
    type Result = ();
    fn handle(&mut self, msg: Replay, _: &mut Self::Context) {
        self.core.replay(&msg.0);
    }
}

impl Handler<Stats> for MarketActor {
    type Result = MessageResult<Stats>;
    fn handle(&mut self, _: Stats, _: &mut Self::Context) -> Self::Result {
        let now = std::time::Instant::now();
        let recent: usize = self
            .applied
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= Duration::from_secs(10))
            .map(|(_, n)| n)
            .sum();
        let book = self.core.book();
        MessageResult(MarketStats {
            last_seq: self.core.last_seq(),
            halted: book.is_halted(),
            resting_orders: book.order_count(),
            stop_orders: book.stop_count(),
            bid_levels: book.level_count(crate::book::Side::Buy),
            ask_levels: book.level_count(crate::book::Side::Sell),
            commands_per_sec: recent as f64 / 10.0,
            snapshot_seq: self.snapshot_seq,
        })
    }
}

/// The market's whole state, for the snapshot store.
#[derive(Message)]
#[rtype(result = "MarketSnapshot")]
pub struct TakeSnapshot {
    pub epoch: u64,
}

impl Handler<TakeSnapshot> for MarketActor {
    type Result = MessageResult<TakeSnapshot>;
    fn handle(&mut self, msg: TakeSnapshot, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.core.snapshot(msg.epoch))
    }
}

/// Replace the state with a snapshot's (recovery, before anything is applied).
#[derive(Message)]
#[rtype(result = "Result<(), core::SnapshotError>")]
struct Restore(Box<MarketSnapshot>);

impl Handler<Restore> for MarketActor {
    type Result = Result<(), core::SnapshotError>;
    fn handle(&mut self, msg: Restore, _: &mut Self::Context) -> Self::Result {
        let subjects = self.core.subjects().clone();
        let batch_max = self.core.batch_max();
        self.core = MarketCore::restore(subjects, &msg.0, batch_max)?;
        self.snapshot_seq = msg.0.last_seq;
        Ok(())
    }
}

/// A snapshot up to this sequence was saved.
#[derive(Message)]
#[rtype(result = "()")]
struct SnapshotSaved(Seq);

impl Handler<SnapshotSaved> for MarketActor {
    type Result = ();
    fn handle(&mut self, msg: SnapshotSaved, _: &mut Self::Context) {
        self.snapshot_seq = self.snapshot_seq.max(msg.0);
    }
}

impl Handler<L2Book> for MarketActor {
    type Result = MessageResult<L2Book>;
    fn handle(&mut self, _: L2Book, _: &mut Self::Context) -> Self::Result {
        MessageResult((
            self.core.last_seq(),
            outputs::top(self.core.book(), usize::MAX),
        ))
    }
}

impl Handler<State> for MarketActor {
    type Result = MessageResult<State>;
    fn handle(&mut self, _: State, _: &mut Self::Context) -> Self::Result {
        MessageResult((self.core.last_seq(), self.core.book().state_hash()))
    }
}

/// The last applied stream sequence and a copy of the book, to hash away from the actor: a
/// clone costs a fraction of the hash (0.4 against 3.9 ms with 20,000 orders).
#[derive(Message)]
#[rtype(result = "(Seq, Box<OrderBook>)")]
pub struct Fork;

impl Handler<Fork> for MarketActor {
    type Result = MessageResult<Fork>;
    fn handle(&mut self, _: Fork, _: &mut Self::Context) -> Self::Result {
        MessageResult((self.core.last_seq(), Box::new(self.core.book().clone())))
    }
}

/// Computes a copy's state hash on a thread of its own at a lower priority (nice 10 on
/// Linux): hashing 20,000 orders takes a core for about 4 ms, and on a small machine a move's
/// new owner, its announcement's readers and nats-server need the cores more right then.
pub fn hash_aside(book: Box<OrderBook>) -> tokio::sync::oneshot::Receiver<StateHash> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let hashing = move || {
        #[cfg(target_os = "linux")]
        // SAFETY: setpriority only reads its arguments; `who` 0 on Linux is the calling thread,
        // which ends after the hash. A refusal leaves the priority as it was.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, 10);
        }
        let _ = tx.send(book.state_hash());
    };
    if let Err(e) = std::thread::Builder::new()
        .name("agora-hash".into())
        .spawn(hashing)
    {
        // The receiver then reports the hash as not computed.
        tracing::warn!("cannot start a thread to hash a book: {e}");
    }
    rx
}

/// The last applied stream sequence alone (`State` hashes the whole book: O(orders)).
#[derive(Message)]
#[rtype(result = "Seq")]
pub struct LastSeq;

impl Handler<LastSeq> for MarketActor {
    type Result = Seq;
    fn handle(&mut self, _: LastSeq, _: &mut Self::Context) -> Seq {
        self.core.last_seq()
    }
}

/// A running market: its actor, and the driver to stop or await.
pub struct RunningMarket {
    pub market: String,
    pub addr: Addr<MarketActor>,
    stop: watch::Sender<bool>,
    handoff: Arc<AtomicBool>,
    stopped_at: Arc<std::sync::OnceLock<StopPoint>>,
    driver: tokio::task::JoinHandle<Result<(), MarketError>>,
}

/// Stops a market (the part of `RunningMarket` a supervisor keeps).
#[derive(Clone)]
pub struct MarketControl {
    pub market: String,
    pub addr: Addr<MarketActor>,
    stop: watch::Sender<bool>,
    handoff: Arc<AtomicBool>,
    stopped_at: Arc<std::sync::OnceLock<StopPoint>>,
}

impl MarketControl {
    /// Asks the driver to stop at the next batch boundary, its outputs published.
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops like `request_stop`, without the final snapshot: the market is handed to a node
    /// that already holds its state (or this node lost it), so stopping fast matters more.
    pub fn request_handoff(&self) {
        self.handoff.store(true, Ordering::Release);
        let _ = self.stop.send(true);
    }

    /// Where the driver stopped, once it ended cleanly (`None` before, or after a failure).
    pub fn stopped_at(&self) -> Option<StopPoint> {
        self.stopped_at.get().copied()
    }
}

impl RunningMarket {
    /// The control half, and the driver to await.
    pub fn split(
        self,
    ) -> (
        MarketControl,
        tokio::task::JoinHandle<Result<(), MarketError>>,
    ) {
        (
            MarketControl {
                market: self.market,
                addr: self.addr,
                stop: self.stop,
                handoff: self.handoff,
                stopped_at: self.stopped_at,
            },
            self.driver,
        )
    }

    /// Asks the driver to stop like `MarketControl::request_handoff` (no final snapshot) and
    /// waits; answers where it stopped.
    pub async fn hand_off(self) -> Result<Option<StopPoint>, MarketError> {
        self.handoff.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        let stopped_at = self.stopped_at.clone();
        self.join().await?;
        Ok(stopped_at.get().copied())
    }

    /// Asks the driver to stop at the next batch boundary (its outputs published) and waits.
    pub async fn stop(self) -> Result<(), MarketError> {
        let _ = self.stop.send(true);
        self.join().await
    }

    /// Waits for the driver to end (it ends by itself when fenced or on an error).
    pub async fn join(self) -> Result<(), MarketError> {
        match self.driver.await {
            Ok(result) => result,
            Err(e) => Err(MarketError::Nats {
                market: self.market,
                what: "driver task",
                reason: e.to_string(),
            }),
        }
    }
}

/// A market's state as announced on `<prefix>.status.<MARKET>`.
#[derive(serde::Serialize)]
struct Status<'a> {
    market: &'a str,
    node: &'a str,
    epoch: u64,
    state: &'static str,
    /// With `active`: the last command recovery applied; a second `active` adds the book's
    /// state hash then (computed off the market's thread), so a new owner's book can be checked
    /// against the old owner's.
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<Seq>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_hash: Option<String>,
}

/// Publishes a market's status; usable from a task of its own.
struct Announcer {
    client: async_nats::Client,
    subject: String,
    market: String,
    node: String,
    epoch: u64,
}

impl Announcer {
    async fn announce(&self, state: &'static str, seq: Option<Seq>, hash: Option<StateHash>) {
        let status = Status {
            market: &self.market,
            node: &self.node,
            epoch: self.epoch,
            state,
            seq,
            state_hash: hash.map(|h| h.to_string()),
        };
        if let Ok(bytes) = rmp_serde::to_vec_named(&status) {
            let _ = self
                .client
                .publish(self.subject.clone(), bytes.into())
                .await;
            let _ = self.client.flush().await;
        }
    }
}

/// The answer to `<prefix>.book.<MARKET>.snapshot`.
#[derive(serde::Serialize)]
struct BookSnapshotReply<'a> {
    market: &'a str,
    /// The stream sequence the book reflects: apply deltas whose `seq` is above it.
    seq: Seq,
    bids: Vec<crate::wire::WireLevel>,
    asks: Vec<crate::wire::WireLevel>,
}

/// Answers full-book requests on `<prefix>.book.<MARKET>.snapshot` until `stop`.
async fn serve_book_snapshots(
    driver: &Driver,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, MarketError> {
    let mut requests = driver
        .client
        .subscribe(driver.subjects.book_snapshot(&driver.market))
        .await
        .map_err(|e| nats_err(&driver.market, "subscribing to book snapshot requests", e))?;
    let (client, addr, market) = (
        driver.client.clone(),
        driver.addr.clone(),
        driver.market.clone(),
    );
    Ok(actix_rt::spawn(async move {
        loop {
            let request = tokio::select! {
                _ = stop.changed() => break,
                r = requests.next() => r,
            };
            let Some(request) = request else { break };
            let Some(reply) = request.reply else { continue };
            let Ok((seq, top)) = addr.send(L2Book).await else {
                break;
            };
            let spec = match addr.send(SpecOf).await {
                Ok(spec) => spec,
                Err(_) => break,
            };
            let level = |l: &crate::book::L2Level| crate::wire::WireLevel {
                price: spec.fmt_price(l.price),
                qty: spec.fmt_qty(l.qty),
                orders: l.orders,
            };
            let body = BookSnapshotReply {
                market: &market,
                seq,
                bids: top.bids.iter().map(level).collect(),
                asks: top.asks.iter().map(level).collect(),
            };
            if let Ok(bytes) = rmp_serde::to_vec_named(&body) {
                let _ = client.publish(reply, bytes.into()).await;
            }
        }
        let _ = requests.unsubscribe().await;
    }))
}

/// The market's spec.
#[derive(Message)]
#[rtype(result = "MarketSpec")]
pub struct SpecOf;

impl Handler<SpecOf> for MarketActor {
    type Result = MessageResult<SpecOf>;
    fn handle(&mut self, _: SpecOf, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.core.spec().clone())
    }
}

/// The head of a journal message: which input sequences it covers.
#[derive(Clone, Copy, Debug, Deserialize)]
struct JournalHead {
    first_seq: Seq,
    last_seq: Seq,
}

/// The end of a market's journal: its last batch (and the stream sequence of its message),
/// and the batch before it. A batch's views may still be unacknowledged while the next
/// batch's journal message lands (the driver collects a batch's acknowledgements while it
/// processes and journals the next one), so a new owner rebuilds and republishes both.
#[derive(Clone, Copy, Debug)]
struct JournalTail {
    seq: u64,
    head: JournalHead,
    /// `None` for a market's first batch (or when the message before it is gone).
    prev: Option<JournalHead>,
    /// The stream sequence of the message before (from the last one's fence header), 0 if none.
    prev_seq: u64,
}

impl JournalTail {
    /// The batches whose views may be unacknowledged, oldest first.
    fn unsettled(&self) -> impl Iterator<Item = JournalHead> {
        self.prev.into_iter().chain(std::iter::once(self.head))
    }

    /// The first command of the batches a new owner rebuilds.
    fn rebuild_from(&self) -> Seq {
        self.prev.map_or(self.head.first_seq, |p| p.first_seq)
    }
}

struct Driver {
    market: String,
    js: jetstream::Context,
    client: async_nats::Client,
    subjects: Subjects,
    orders: jetstream::stream::Stream,
    events: jetstream::stream::Stream,
    snapshots: Option<SnapshotStore>,
    addr: Addr<MarketActor>,
    routes: Routes,
    /// Stream sequence of our last journal message (the fence), `None` before the first.
    journal_seq: Option<u64>,
    /// Publishes the derived views and collects their acknowledgements (made at the first).
    views: Option<AckedPublisher>,
    /// The batch whose views are published and not yet acknowledged: its figures, when its
    /// first message was taken, and the commands then waiting in the stream.
    unsettled: Option<(BatchStats, Instant, Option<u64>)>,
    /// A warm copy's last look at the journal's end (saves reading the batch before the last
    /// again while the last has not changed).
    tail_seen: Option<JournalTail>,
    settings: MarketSettings,
    /// Messages applied since the last snapshot was taken, and when it was taken.
    since_snapshot: u64,
    snapshot_at: Instant,
    /// The snapshot being written (one at a time, so they land in order): its sequence and
    /// how long it took.
    snapshot_task: Option<tokio::task::JoinHandle<Result<(Seq, u64), String>>>,
    metrics: MarketMetrics,
    /// A warm copy's order feed, read ahead of the book; recovery and then the driver go on
    /// with it.
    feed: Option<Feed>,
    /// Where recovery ended, announced with `active`; the book's state hash there follows in a
    /// second `active`, computed on a copy once the first is out (`launch`).
    recovered_at: Option<Seq>,
}

fn nats_err(market: &str, what: &'static str, e: impl std::fmt::Display) -> MarketError {
    MarketError::Nats {
        market: market.to_string(),
        what,
        reason: e.to_string(),
    }
}

/// Which subject of the market's stream a message came on.
#[derive(Clone)]
struct Routes {
    /// `<prefix>.admin.<MARKET>`: messages from it may halt and resume the market.
    admin: String,
    /// `<prefix>.orders.<MARKET>.`: followed by an account, the account's own subject.
    account_orders: String,
}

impl Routes {
    fn new(subjects: &Subjects, market: &str) -> Routes {
        Routes {
            admin: subjects.admin(market),
            account_orders: format!("{}.", subjects.orders(market)),
        }
    }
}

/// A message of the order stream, with the JetStream metadata of its reply subject read once,
/// as it arrives (`Message::info` parses the subject again at every call).
struct Delivered {
    message: jetstream::Message,
    /// `Err`: the message has no JetStream metadata (it is not from this consumer's stream).
    meta: Result<Meta, async_nats::Error>,
}

/// What the feed and the decoding of a message need of its JetStream metadata.
#[derive(Clone, Copy)]
struct Meta {
    /// Its stream sequence.
    seq: Seq,
    /// Messages still in the stream for the consumer after it.
    pending: u64,
    /// The stream's timestamp of it, in nanoseconds.
    ts: Timestamp,
}

impl Delivered {
    fn new(message: jetstream::Message) -> Delivered {
        let meta = message.info().map(|info| Meta {
            seq: info.stream_sequence,
            pending: info.pending,
            ts: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
        });
        Delivered { message, meta }
    }

    /// Its stream sequence, if it has metadata.
    fn seq(&self) -> Option<Seq> {
        self.meta.as_ref().ok().map(|meta| meta.seq)
    }

    /// Messages still in the stream after it, if it has metadata.
    fn pending(&self) -> Option<u64> {
        self.meta.as_ref().ok().map(|meta| meta.pending)
    }
}

fn incoming(market: &str, routes: &Routes, d: &Delivered) -> Result<Incoming, MarketError> {
    let meta = d
        .meta
        .as_ref()
        .map_err(|e| nats_err(market, "reading a message's metadata", e))?;
    let m = &d.message;
    let json = m
        .headers
        .as_ref()
        .and_then(|h| h.get("Content-Type"))
        .is_some_and(|v| v.as_str().starts_with("application/json"));
    Ok(Incoming {
        seq: meta.seq,
        ts: meta.ts,
        payload: m.payload.to_vec(),
        json,
        operator: m.subject.as_str() == routes.admin,
        account: m
            .subject
            .as_str()
            .strip_prefix(&routes.account_orders)
            .map(|a| crate::book::Account::new(a).map_err(|_| a.to_string())),
    })
}

/// Starts the market: creates its actor on the current arbiter, recovers it from its latest
/// snapshot and the streams, and starts its driver.
pub async fn start(
    bus: MarketBus,
    spec: MarketSpec,
    settings: MarketSettings,
) -> Result<RunningMarket, MarketError> {
    let mut driver = Driver::open(bus, spec, settings).await?;
    let span = traces::recover_span(
        &driver.market,
        &driver.settings.node_id,
        driver.settings.trace.as_deref(),
    );
    driver.recover(false).instrument(span).await?;
    driver.launch().await
}

impl Driver {
    /// The market's actor, on the current arbiter, and its driver, not started.
    async fn open(
        bus: MarketBus,
        spec: MarketSpec,
        settings: MarketSettings,
    ) -> Result<Driver, MarketError> {
        let market = spec.symbol.clone();
        let core = MarketCore::new(bus.subjects.clone(), spec, settings.batch_max);
        let addr = MarketActor {
            core,
            applied: std::collections::VecDeque::new(),
            snapshot_seq: 0,
        }
        .start();
        let orders = bus
            .js
            .get_stream(bus.subjects.orders_stream(&market))
            .await
            .map_err(|e| nats_err(&market, "opening the order stream", e))?;
        let events = bus
            .js
            .get_stream(bus.subjects.events_stream())
            .await
            .map_err(|e| nats_err(&market, "opening the journal stream", e))?;
        let routes = Routes::new(&bus.subjects, &market);
        Ok(Driver {
            metrics: MarketMetrics::new(&market),
            market,
            js: bus.js,
            client: bus.client,
            subjects: bus.subjects,
            orders,
            events,
            snapshots: bus.snapshots,
            addr,
            routes,
            journal_seq: None,
            views: None,
            unsettled: None,
            tail_seen: None,
            settings,
            since_snapshot: 0,
            snapshot_at: Instant::now(),
            snapshot_task: None,
            recovered_at: None,
            feed: None,
        })
    }

    /// Runs the recovered market: answers book requests, announces it, and consumes.
    async fn launch(mut self) -> Result<RunningMarket, MarketError> {
        let (stop, stopped) = watch::channel(false);
        let handoff = Arc::new(AtomicBool::new(false));
        // The responder has its own stop: it must end however the driver ends. Told only by the
        // market's stop, it would outlive a failed driver, whose task would then never finish,
        // and the supervisor would neither hear of the failure nor restart the market.
        let (stop_responder, responder_stopped) = watch::channel(false);
        let responder = serve_book_snapshots(&self, responder_stopped).await?;
        // Where recovery ended: announced at once; the book's hash there follows in a second
        // `active` once computed (a move compares it with the old owner's), so hashing the
        // whole book never delays the first command.
        let hashed = match self.recovered_at.take() {
            Some(seq) => {
                self.announce_at("active", Some(seq), None).await;
                // Copied after the announcement (a clone of 20,000 orders takes a millisecond
                // or two here): nothing is consumed before `run`, so the book is still at `seq`.
                let (_, book) = self.send(Fork).await?;
                let hashing = hash_aside(book);
                let announcer = self.announcer();
                Some(actix_rt::spawn(async move {
                    match hashing.await {
                        Ok(hash) => {
                            tracing::info!(market = %announcer.market, seq, state_hash = %hash, "market recovered: book hashed");
                            announcer.announce("active", Some(seq), Some(hash)).await;
                        }
                        Err(e) => {
                            tracing::warn!(market = %announcer.market, "hashing the recovered book failed: {e}")
                        }
                    }
                }))
            }
            None => {
                self.announce("active").await;
                None
            }
        };
        let (market, addr) = (self.market.clone(), self.addr.clone());
        let handed_off = handoff.clone();
        let stopped_at = Arc::new(std::sync::OnceLock::new());
        let stop_point = stopped_at.clone();
        let handle = actix_rt::spawn(async move {
            let mut result = self.run(stopped).await;
            if result.is_ok() {
                // Every output acknowledged: where it stopped is what the next owner needs.
                match self.send(LastSeq).await {
                    Ok(seq) => {
                        let _ = stop_point.set(StopPoint {
                            seq,
                            journal_seq: self.journal_seq,
                        });
                    }
                    Err(e) => result = Err(e),
                }
            }
            if result.is_ok() && !handed_off.load(Ordering::Acquire) {
                // Stopped at a batch boundary with every output acknowledged: leave a snapshot,
                // so the next start (here or on another node) replays nothing.
                if let Err(e) = self.final_snapshot().await {
                    result = Err(e);
                }
            } else if let Some(task) = self.snapshot_task.take() {
                let _ = task.await;
            }
            let _ = stop_responder.send(true);
            let _ = responder.await;
            // The hash's announcement goes out before the market's last one.
            if let Some(hashed) = hashed {
                let _ = hashed.await;
            }
            self.metrics.running(false);
            self.announce(match &result {
                Ok(()) if handed_off.load(Ordering::Acquire) => "released",
                Ok(()) => "stopped",
                Err(_) => "failed",
            })
            .await;
            result
        });
        Ok(RunningMarket {
            market,
            addr,
            stop,
            handoff,
            stopped_at,
            driver: handle,
        })
    }
}

/// How often a warm copy looks at the journal to catch up.
const FOLLOW_POLL: Duration = Duration::from_millis(20);

/// A warm copy of a market on a node that does not own it: its actor holds the book as of the
/// journal's last two batches, kept current by applying the order stream silently, so taking
/// the market over needs no snapshot load and almost no replay. It publishes nothing.
pub struct Follower {
    pub market: String,
    /// Commands the owner has applied that this copy has not (`u64::MAX` before the first
    /// look at the journal).
    lag: Arc<AtomicU64>,
    promote: Option<tokio::sync::oneshot::Sender<Promotion>>,
    stop: watch::Sender<bool>,
}

struct Promotion {
    epoch: u64,
    trace: Option<String>,
    handed_over: bool,
    stop_point: Option<StopPoint>,
    reply: tokio::sync::oneshot::Sender<Result<RunningMarket, MarketError>>,
}

impl Follower {
    pub fn lag(&self) -> u64 {
        self.lag.load(Ordering::Acquire)
    }

    /// Turns the copy into the running market at `epoch`: it applies what the journal says was
    /// done, rebuilds the journal's last two batches and republishes their views (JetStream drops
    /// those that had landed), then consumes from the next command. Answers once it consumes.
    /// `handed_over`: released by its owner, every output acknowledged, at `stop_point` when the
    /// release record says where (then the journal's head is not read; see `StopPoint`).
    pub async fn promote(
        mut self,
        epoch: u64,
        trace: Option<String>,
        handed_over: bool,
        stop_point: Option<StopPoint>,
    ) -> Result<RunningMarket, MarketError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || MarketError::ActorGone {
            market: self.market.clone(),
        };
        let promote = self.promote.take().ok_or_else(gone)?;
        promote
            .send(Promotion {
                epoch,
                trace,
                handed_over,
                stop_point,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Drops the copy.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.promote.is_some() {
            let _ = self.stop.send(true);
        }
    }
}

/// Starts a warm copy of the market on the current arbiter: restores the latest snapshot, then
/// follows the journal in the background.
pub async fn follow(
    bus: MarketBus,
    spec: MarketSpec,
    settings: MarketSettings,
) -> Result<Follower, MarketError> {
    let mut driver = Driver::open(bus, spec, settings).await?;
    if let Some(snapshot) = driver.load_snapshot().await {
        let seq = snapshot.last_seq;
        driver
            .send(Restore(Box::new(snapshot)))
            .await?
            .map_err(|e| MarketError::Recovery {
                market: driver.market.clone(),
                reason: format!("restoring the snapshot at {seq}: {e}"),
            })?;
    }
    let applied = driver.send(LastSeq).await?;
    driver.feed = Some(
        Feed::open(
            &driver.orders,
            &driver.client,
            &driver.market,
            applied + 1,
            Pull::Consume(driver.settings.fetch_max),
        )
        .await?,
    );
    let lag = Arc::new(AtomicU64::new(u64::MAX));
    let (promote, mut promoted) = tokio::sync::oneshot::channel::<Promotion>();
    let (stop, mut stopped) = watch::channel(false);
    let market = driver.market.clone();
    let following = lag.clone();
    actix_rt::spawn(async move {
        let mut timer = tokio::time::interval(FOLLOW_POLL);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                p = &mut promoted => {
                    if let Ok(p) = p {
                        let _ = p
                            .reply
                            .send(driver.promote(p.epoch, p.trace, p.handed_over, p.stop_point).await);
                    }
                    return;
                }
                _ = stopped.changed() => return,
                _ = timer.tick() => {
                    if let Err(e) = driver.follow_step(&following).await {
                        tracing::warn!(market = %driver.market, "following: {e}");
                    }
                }
                read = async {
                    match driver.feed.as_mut() {
                        Some(feed) => feed.read_ahead().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Err(e) = read {
                        // Opened again from the book's sequence at the next step.
                        tracing::warn!(market = %driver.market, "following: {e}");
                        driver.feed = None;
                    }
                }
            }
        }
    });
    Ok(Follower {
        market,
        lag,
        promote: Some(promote),
        stop,
    })
}

impl Driver {
    /// Applies, silently, the commands of every journal batch but the last two (whose outputs
    /// a new owner must rebuild), and records how far behind the owner this copy is.
    async fn follow_step(&mut self, lag: &AtomicU64) -> Result<(), MarketError> {
        let applied = self.send(LastSeq).await?;
        if self.feed.is_none() {
            let feed = Feed::open(
                &self.orders,
                &self.client,
                &self.market,
                applied + 1,
                Pull::Consume(self.settings.fetch_max),
            );
            self.feed = Some(feed.await?);
        }
        let seen = self.tail_seen;
        let Some(tail) = self.journal_tail(seen).await? else {
            lag.store(0, Ordering::Release);
            return Ok(());
        };
        self.tail_seen = Some(tail);
        let mut applied = applied;
        if tail.rebuild_from() > applied + 1 {
            applied += self
                .replay_range(applied + 1, tail.rebuild_from() - 1)
                .await?;
        }
        lag.store(
            tail.head.last_seq.saturating_sub(applied),
            Ordering::Release,
        );
        Ok(())
    }

    async fn promote(
        mut self,
        epoch: u64,
        trace: Option<String>,
        handed_over: bool,
        stop_point: Option<StopPoint>,
    ) -> Result<RunningMarket, MarketError> {
        self.settings.epoch = epoch;
        self.settings.handed_over = handed_over;
        self.settings.stop_point = stop_point;
        let span = traces::recover_span(&self.market, &self.settings.node_id, trace.as_deref());
        self.recover(true).instrument(span).await?;
        self.launch().await
    }

    /// The journal's last two batches (`None`: the journal is empty). The batch before the
    /// last is found through the last message's fence header, and taken from `seen` when that
    /// already names it.
    async fn journal_tail(
        &self,
        seen: Option<JournalTail>,
    ) -> Result<Option<JournalTail>, MarketError> {
        let subject = self.subjects.events(&self.market);
        let last = match self.events.get_last_raw_message_by_subject(&subject).await {
            Ok(last) => last,
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None);
            }
            Err(e) => return Err(nats_err(&self.market, "reading the journal", e)),
        };
        let head: JournalHead = rmp_serde::from_slice(&last.payload)
            .map_err(|e| nats_err(&self.market, "reading the journal's last batch", e))?;
        let prev_seq = last
            .headers
            .get(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE)
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .unwrap_or(0);
        let prev = match seen {
            Some(t) if t.seq == last.sequence => t.prev,
            Some(t) if t.seq == prev_seq => Some(t.head),
            _ if prev_seq == 0 => None,
            // Released with every output acknowledged: nothing is rebuilt, and a move's pause
            // need not wait for a second read.
            _ if self.settings.handed_over => None,
            _ => self.journal_batch(&subject, prev_seq).await?,
        };
        // Batches are contiguous; anything else is not the batch before this one.
        let prev = prev.filter(|p| p.last_seq + 1 == head.first_seq);
        Ok(Some(JournalTail {
            seq: last.sequence,
            head,
            prev,
            prev_seq,
        }))
    }

    /// The journal batch at stream sequence `seq`, if it is still there and is this market's.
    async fn journal_batch(
        &self,
        subject: &str,
        seq: u64,
    ) -> Result<Option<JournalHead>, MarketError> {
        match self.events.get_raw_message(seq).await {
            Ok(m) if m.subject.as_str() == subject => {
                rmp_serde::from_slice(&m.payload).map(Some).map_err(|e| {
                    nats_err(
                        &self.market,
                        "reading the journal's batch before the last",
                        e,
                    )
                })
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(nats_err(&self.market, "reading the journal", e)),
        }
    }
}

/// What recovery found and did, for the log.
#[derive(Debug, Default)]
struct Recovered {
    /// Taken over from a warm copy (no snapshot loaded).
    warm: bool,
    snapshot_seq: Option<Seq>,
    replayed: u64,
    republished: u64,
}

impl Driver {
    async fn send<M>(&self, msg: M) -> Result<M::Result, MarketError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        MarketActor: Handler<M>,
    {
        self.addr
            .send(msg)
            .await
            .map_err(|_| MarketError::ActorGone {
                market: self.market.clone(),
            })
    }

    /// The latest snapshot, or `None` when there is none or it cannot be used (then the
    /// stream is replayed from its start, and the log says why).
    async fn load_snapshot(&self) -> Option<MarketSnapshot> {
        let store = self.snapshots.as_ref()?;
        let blob = match store.load(&self.market).await {
            Ok(blob) => blob?,
            Err(e) => {
                tracing::warn!(market = %self.market, "{e}; recovering from the stream alone");
                return None;
            }
        };
        let decoded =
            tokio::task::spawn_blocking(move || core::decode_snapshot(&blob.bytes, &blob.encoding))
                .await;
        match decoded {
            Ok(Ok(snapshot)) => Some(snapshot),
            Ok(Err(e)) => {
                tracing::warn!(market = %self.market, "{e}; recovering from the stream alone");
                None
            }
            Err(e) => {
                tracing::warn!(market = %self.market, "decoding the snapshot failed: {e}");
                None
            }
        }
    }

    /// Restores the latest usable snapshot (`warm`: the actor's state already is a follower's,
    /// short of the journal's last two batches), replays the stream from it up to the journal's
    /// last two batches, and republishes their derived views (JetStream drops those that landed).
    async fn recover(&mut self, warm: bool) -> Result<(), MarketError> {
        let started = Instant::now();
        // Released with every output acknowledged, and the release record says where: the
        // journal's head is that, unless someone wrote after the release, which the fence
        // catches at the first publish (see `StopPoint`). Otherwise the journal says.
        let stop_point = self
            .settings
            .stop_point
            .filter(|_| self.settings.handed_over);
        let tail = match stop_point {
            Some(at) => {
                self.journal_seq = at.journal_seq;
                None
            }
            None => self.journal_tail(None).await?,
        };
        if let Some(t) = &tail {
            self.journal_seq = Some(t.seq);
            if t.prev.is_none() && t.prev_seq != 0 && !self.settings.handed_over {
                tracing::warn!(market = %self.market, journal_seq = t.prev_seq, "the journal's batch before the last is not there; only the last batch's views are republished");
            }
        }
        // Whether `seq` falls inside a batch whose outputs may have to be rebuilt: a book there
        // cannot rebuild them.
        let inside = |seq: Seq| {
            tail.iter()
                .flat_map(JournalTail::unsettled)
                .find(|b| seq >= b.first_seq && seq < b.last_seq)
        };
        let mut done = Recovered::default();
        let mut from = 1;
        if warm {
            let applied = self.send(LastSeq).await?;
            if !self.settings.handed_over
                && let Some(b) = inside(applied)
            {
                return Err(MarketError::Recovery {
                    market: self.market.clone(),
                    reason: format!(
                        "the warm copy is at {applied}, inside one of the journal's last batches ({}..={})",
                        b.first_seq, b.last_seq
                    ),
                });
            }
            done.warm = true;
            from = applied + 1;
        } else if let Some(snapshot) = self.load_snapshot().await {
            let seq = snapshot.last_seq;
            // A snapshot inside the last batches cannot rebuild their outputs; snapshots are
            // taken at batch boundaries, so this means the journal and the snapshot disagree:
            // trust the stream.
            if inside(seq).is_none() {
                self.send(Restore(Box::new(snapshot))).await?.map_err(|e| {
                    MarketError::Recovery {
                        market: self.market.clone(),
                        reason: format!("restoring the snapshot at {seq}: {e}"),
                    }
                })?;
                done.snapshot_seq = Some(seq);
                from = seq + 1;
            } else {
                tracing::warn!(market = %self.market, snapshot_seq = seq, "the snapshot falls inside the journal's last batches; recovering from the stream alone");
            }
        }
        if let Some(at) = stop_point {
            // Released where the record says, every output published: all of it, silently.
            if at.seq >= from {
                done.replayed = self.replay_range(from, at.seq).await?;
            }
        } else if let Some(tail) = tail.filter(|_| self.settings.handed_over)
            && tail.head.last_seq >= from
        {
            // Released by its owner with every output published: all of it, silently.
            done.replayed = self.replay_range(from, tail.head.last_seq).await?;
        } else if let Some(tail) = tail {
            // Everything before the last two batches, silently; then each of them again (unless
            // the snapshot or the copy is past it: a snapshot is taken with every output
            // acknowledged), to rebuild its outputs byte for byte and republish its views.
            for b in tail.unsettled() {
                if b.last_seq < from {
                    continue;
                }
                if b.first_seq > from {
                    done.replayed += self.replay_range(from, b.first_seq - 1).await?;
                }
                let mut batch = Vec::new();
                let mut reader = self.read_range(b.first_seq, b.last_seq).await?;
                let read = async {
                    while let Some(chunk) = reader.next_chunk().await? {
                        batch.extend(chunk);
                    }
                    Ok::<_, MarketError>(())
                }
                .await;
                self.done_reading(reader);
                read?;
                done.republished += batch.len() as u64;
                let batch = Process {
                    batch,
                    traced: Vec::new(),
                };
                for (out, _) in self.send(batch).await? {
                    self.send_views(out, false).await?;
                    self.settle_views().await?;
                }
                from = b.last_seq + 1;
            }
        }
        let stats = self.send(Stats).await?;
        let last_seq = stats.last_seq;
        // The book's hash there is computed once it is announced (`launch`).
        self.recovered_at = Some(last_seq);
        self.since_snapshot = if done.warm {
            last_seq.saturating_sub(stats.snapshot_seq)
        } else {
            last_seq.saturating_sub(done.snapshot_seq.unwrap_or(0))
        };
        self.metrics.book(&BatchStats {
            resting_orders: stats.resting_orders as u64,
            bid_levels: stats.bid_levels as u64,
            ask_levels: stats.ask_levels as u64,
            ..BatchStats::default()
        });
        self.metrics.running(true);
        let span = tracing::Span::current();
        span.record("warm", done.warm);
        span.record("epoch", traces::int(self.settings.epoch));
        traces::record_recovered(
            &span,
            done.snapshot_seq,
            done.replayed,
            done.republished,
            last_seq,
        );
        tracing::info!(
            market = %self.market,
            warm = done.warm,
            epoch = self.settings.epoch,
            snapshot_seq = ?done.snapshot_seq,
            replayed = done.replayed,
            republished = done.republished,
            last_seq,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "market recovered"
        );
        Ok(())
    }

    /// Replays stream messages `from..=to` into the actor, building nothing. Returns how many.
    async fn replay_range(&mut self, from: Seq, to: Seq) -> Result<u64, MarketError> {
        let mut count = 0;
        let mut reader = self.read_range(from, to).await?;
        let replayed = async {
            while let Some(chunk) = reader.next_chunk().await? {
                count += chunk.len() as u64;
                self.send(Replay(chunk)).await?;
            }
            Ok(count)
        }
        .await;
        self.done_reading(reader);
        replayed
    }

    /// Keeps the warm copy's feed once a range was read from it.
    fn done_reading(&mut self, reader: RangeReader) {
        if reader.kept {
            self.feed = Some(reader.feed);
        }
    }

    /// Reads stream messages `from..=to` in chunks: from the warm copy's feed when it is there,
    /// otherwise with a consumer of its own.
    async fn read_range(&mut self, from: Seq, to: Seq) -> Result<RangeReader, MarketError> {
        let reader = |feed: Feed, kept: bool| RangeReader {
            feed,
            kept,
            from,
            next: from,
            to,
            market: self.market.clone(),
            routes: self.routes.clone(),
            stream: self.subjects.orders_stream(&self.market),
        };
        if let Some(feed) = self.feed.take() {
            if feed.next == from {
                return Ok(reader(feed, true));
            }
            // Out of step with the book (it cannot happen, but a fresh feed is cheap): start
            // the warm copy's over from here.
            tracing::warn!(market = %self.market, feed = feed.next, from, "the warm copy's feed is out of step; opening it again");
            let feed = Feed::open(
                &self.orders,
                &self.client,
                &self.market,
                from,
                Pull::Consume(self.settings.fetch_max),
            )
            .await?;
            return Ok(reader(feed, true));
        }
        let feed = Feed::open(&self.orders, &self.client, &self.market, from, Pull::Replay).await?;
        Ok(reader(feed, false))
    }

    /// Publishes the market's state on `<prefix>.status.<MARKET>` (best effort).
    async fn announce(&self, state: &'static str) {
        self.announce_at(state, None, None).await;
    }

    async fn announce_at(&self, state: &'static str, seq: Option<Seq>, hash: Option<StateHash>) {
        self.announcer().announce(state, seq, hash).await;
    }

    fn announcer(&self) -> Announcer {
        Announcer {
            client: self.client.clone(),
            subject: self.subjects.status(&self.market),
            market: self.market.clone(),
            node: self.settings.node_id.clone(),
            epoch: self.settings.epoch,
        }
    }

    /// Whether a snapshot is due: enough commands, or commands and enough time.
    fn snapshot_due(&self) -> bool {
        let s = &self.settings;
        self.snapshots.is_some()
            && self.since_snapshot > 0
            && ((s.snapshot_every_commands > 0 && self.since_snapshot >= s.snapshot_every_commands)
                || (!s.snapshot_every.is_zero() && self.snapshot_at.elapsed() >= s.snapshot_every))
    }

    /// Collects a finished snapshot write, logging how it went. Returns whether none is running.
    async fn reap_snapshot(&mut self, wait: bool) -> bool {
        let Some(task) = self.snapshot_task.take_if(|t| wait || t.is_finished()) else {
            return self.snapshot_task.is_none();
        };
        match task.await {
            Ok(Ok((seq, micros))) => {
                self.metrics.snapshot(micros);
                let _ = self.addr.send(SnapshotSaved(seq)).await;
            }
            Ok(Err(e)) => {
                tracing::warn!(market = %self.market, "snapshot not saved: {e}; the next one is tried at the next batch");
                // Count it as not taken, so the next batch tries again.
                self.snapshot_at = Instant::now() - self.settings.snapshot_every;
            }
            Err(e) => tracing::warn!(market = %self.market, "snapshot task failed: {e}"),
        }
        true
    }

    /// Takes a snapshot (every output up to it is acknowledged: this runs between batches) and
    /// writes it in the background; one write at a time.
    async fn snapshot_if_due(&mut self) -> Result<(), MarketError> {
        if !self.snapshot_due() || !self.reap_snapshot(false).await {
            return Ok(());
        }
        let Some(store) = self.snapshots.clone() else {
            return Ok(());
        };
        // A snapshot covers outputs that are all acknowledged.
        self.settle_views().await?;
        let snapshot = self
            .send(TakeSnapshot {
                epoch: self.settings.epoch,
            })
            .await?;
        self.since_snapshot = 0;
        self.snapshot_at = Instant::now();
        let market = self.market.clone();
        self.snapshot_task = Some(tokio::spawn(write_snapshot(store, market, snapshot)));
        Ok(())
    }

    /// On a clean stop: waits for the write in flight and writes one more if anything changed.
    async fn final_snapshot(&mut self) -> Result<(), MarketError> {
        self.reap_snapshot(true).await;
        let Some(store) = self.snapshots.clone() else {
            return Ok(());
        };
        if self.since_snapshot == 0 {
            return Ok(());
        }
        let snapshot = self
            .send(TakeSnapshot {
                epoch: self.settings.epoch,
            })
            .await?;
        match write_snapshot(store, self.market.clone(), snapshot).await {
            Ok((seq, micros)) => {
                self.metrics.snapshot(micros);
                self.since_snapshot = 0;
                let _ = self.addr.send(SnapshotSaved(seq)).await;
            }
            // The streams still hold everything: the next start replays more, that is all.
            Err(e) => tracing::warn!(market = %self.market, "snapshot at stop not saved: {e}"),
        }
        Ok(())
    }

    /// The live loop, then (stopped at a batch boundary) the last views' acknowledgements, so
    /// a clean stop leaves every output acknowledged.
    async fn run(&mut self, stop: watch::Receiver<bool>) -> Result<(), MarketError> {
        self.consume(stop).await?;
        self.settle_views().await
    }

    /// Batch, process, publish; until stopped, fenced or failed.
    async fn consume(&mut self, mut stop: watch::Receiver<bool>) -> Result<(), MarketError> {
        let last = self.send(LastSeq).await?;
        // A warm copy's feed goes on where its recovery ended; otherwise a consumer of our own.
        let mut messages = match self.feed.take() {
            Some(feed) if feed.next == last + 1 => feed,
            _ => {
                Feed::open(
                    &self.orders,
                    &self.client,
                    &self.market,
                    last + 1,
                    Pull::Consume(self.settings.fetch_max),
                )
                .await?
            }
        };
        let tick = if self.settings.snapshot_every.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.settings.snapshot_every
        };
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Under load the next messages are already here; otherwise, while waiting for them,
            // the last views' acknowledgements are collected first.
            let first = match messages.next().now_or_never() {
                Some(m) if !*stop.borrow() => m,
                _ => {
                    self.settle_views().await?;
                    tokio::select! {
                        _ = stop.changed() => return Ok(()),
                        _ = timer.tick() => {
                            self.snapshot_if_due().await?;
                            continue;
                        }
                        m = messages.next() => m,
                    }
                }
            };
            let Some(first) = first else { return Ok(()) };
            let received = Instant::now();
            let first = first?;
            // Commands still waiting in the stream after the last one taken.
            let mut pending = first.pending();
            let mut batch = Vec::new();
            // Sampled messages' spans (no allocation until one is traced).
            let mut traced = Vec::new();
            self.take(&first, &mut batch, &mut traced)?;
            // Take whatever else is already here, without waiting: batches grow under load only.
            while batch.len() < self.settings.fetch_max {
                match messages.ready() {
                    Some(Ok(m)) => {
                        pending = m.pending();
                        self.take(&m, &mut batch, &mut traced)?;
                    }
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            // The stream already holds more commands for us than have arrived (a backlog):
            // wait for them, briefly, so that the batch fills. One batch of 256 costs NATS far
            // fewer journal and report messages than five of 50 (each account gets one report
            // message a batch), which is what lets the node keep up under load; the wait is
            // for messages already stored, never for new ones, so without a backlog (the
            // stream has nothing more for us) a batch never waits.
            if !self.settings.backlog_wait.is_zero()
                && batch.len() < self.settings.fetch_max
                && pending.is_some_and(|p| p > 0)
            {
                let deadline = tokio::time::Instant::now() + self.settings.backlog_wait;
                while batch.len() < self.settings.fetch_max && pending.is_some_and(|p| p > 0) {
                    let m = match messages.ready() {
                        Some(m) => m,
                        None => match tokio::time::timeout_at(deadline, messages.next()).await {
                            Ok(Some(m)) => m,
                            Ok(None) | Err(_) => break,
                        },
                    };
                    let m = m?;
                    pending = m.pending();
                    self.take(&m, &mut batch, &mut traced)?;
                }
            }
            let n = batch.len() as u64;
            let process = Process {
                batch,
                traced: traced.clone(),
            };
            for (out, stats) in self.send(process).await? {
                let published = self.publish_batch(out, &traced).await;
                if let Err(e) = published {
                    if matches!(e, MarketError::Nats { .. }) {
                        self.metrics.publish_error();
                    }
                    return Err(e);
                }
                // Its figures are recorded once its views are acknowledged.
                self.unsettled = Some((stats, received, pending));
                if !traced.is_empty() {
                    // The traced commands' report spans end with the acknowledgements.
                    self.settle_views().await?;
                }
            }
            // The traced commands' spans end once their outputs are acknowledged.
            drop(traced);
            self.since_snapshot += n;
            self.snapshot_if_due().await?;
            if *stop.borrow() {
                return Ok(());
            }
        }
    }

    /// Decodes a message into `batch`, and its span into `traced` if it is traced.
    fn take(
        &self,
        m: &Delivered,
        batch: &mut Vec<Incoming>,
        traced: &mut Vec<TracedCommand>,
    ) -> Result<(), MarketError> {
        let msg = incoming(&self.market, &self.routes, m)?;
        if let Some(t) = traces::command_span(&self.market, msg.seq, m.message.headers.as_ref()) {
            traced.push(t);
        }
        batch.push(msg);
        Ok(())
    }

    /// Publishes a processed batch: the journal message, then (once acknowledged) the views;
    /// each under a span per traced message of the batch.
    ///
    /// The views' acknowledgements are not awaited here: the next batch is taken, matched and
    /// journaled meanwhile, and they are collected before that batch's views go out (or before
    /// a snapshot, or at a stop). So while a batch's journal message lands, only the views of
    /// the batch before it may still be unacknowledged, and a new owner rebuilds and
    /// republishes the journal's last two batches.
    async fn publish_batch(
        &mut self,
        out: BatchOutputs,
        traced: &[TracedCommand],
    ) -> Result<(), MarketError> {
        let spans = PublishSpans::journal(traced, &out.journal);
        if let Err(e) = self.publish_journal(&out.journal).await {
            spans.fail(traced, &e);
            return Err(e);
        }
        drop(spans);
        let spans =
            PublishSpans::reports(traced, out.execs.len() + usize::from(out.trades.is_some()));
        let mut published = self.settle_views().await;
        if published.is_ok() {
            published = self.send_views(out, true).await;
        }
        if let Err(e) = &published {
            spans.fail(traced, e);
        }
        published
    }

    /// Waits for the acknowledgements of the views in flight, and records the figures of the
    /// batch they belong to.
    async fn settle_views(&mut self) -> Result<(), MarketError> {
        if let Some(views) = self.views.as_mut().filter(|v| v.in_flight() > 0) {
            views
                .wait(ACK_TIMEOUT)
                .await
                .map_err(|e| nats_err(&self.market, "publishing reports", e))?;
        }
        if let Some((stats, received, pending)) = self.unsettled.take() {
            let micros = u64::try_from(received.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.metrics.batch(&stats, micros, pending);
        }
        Ok(())
    }

    /// Publishes the journal message, fenced on our previous one.
    async fn publish_journal(&mut self, journal: &Outgoing) -> Result<(), MarketError> {
        if self.settings.lease.as_ref().is_some_and(|l| !l.valid()) {
            return Err(MarketError::LeaseLapsed {
                market: self.market.clone(),
            });
        }
        let msg_id = journal.msg_id.clone().unwrap_or_default();
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, msg_id.as_str());
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            HeaderValue::from(self.journal_seq.unwrap_or(0)),
        );
        let sent = self
            .js
            .publish_with_headers(journal.subject.clone(), headers, journal.payload.clone())
            .await
            .map_err(|e| nats_err(&self.market, "publishing the journal", e))?;
        match sent.await {
            Ok(ack) => {
                self.journal_seq = Some(ack.sequence);
                Ok(())
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                // Either our own retried publish had landed, or another owner wrote: look.
                let last = self
                    .events
                    .get_last_raw_message_by_subject(&journal.subject)
                    .await
                    .map_err(|e| nats_err(&self.market, "reading the journal after a fence", e))?;
                let ours = last
                    .headers
                    .get("Nats-Msg-Id")
                    .is_some_and(|v| v.as_str() == msg_id);
                if ours {
                    self.journal_seq = Some(last.sequence);
                    Ok(())
                } else {
                    Err(MarketError::Fenced {
                        market: self.market.clone(),
                        found: last.sequence,
                    })
                }
            }
            Err(e) => Err(nats_err(&self.market, "publishing the journal", e)),
        }
    }

    /// Publishes the derived views: reports and tape through JetStream (their acknowledgements
    /// collected by `settle_views`), book deltas and unreadable messages on core NATS (`live`
    /// only: a recovering owner republishes only what JetStream can deduplicate).
    async fn send_views(&mut self, out: BatchOutputs, live: bool) -> Result<(), MarketError> {
        let market = &self.market;
        let views = match &mut self.views {
            Some(views) => views,
            None => self.views.insert(
                AckedPublisher::new(self.client.clone())
                    .await
                    .map_err(|e| nats_err(market, "subscribing to report acknowledgements", e))?,
            ),
        };
        for o in out.execs.into_iter().chain(out.trades) {
            views
                .publish(o.subject, o.msg_id, o.payload)
                .await
                .map_err(|e| nats_err(market, "publishing reports", e))?;
        }
        if live {
            for o in out.book.into_iter().chain(out.rejects) {
                self.client
                    .publish(o.subject, o.payload)
                    .await
                    .map_err(|e| nats_err(market, "publishing book updates", e))?;
            }
        }
        Ok(())
    }
}

/// Encodes a snapshot (off the actor threads) and saves it. Returns the sequence it covers and
/// how long it took, in microseconds.
async fn write_snapshot(
    store: SnapshotStore,
    market: String,
    snapshot: MarketSnapshot,
) -> Result<(Seq, u64), String> {
    let started = Instant::now();
    let (last_seq, epoch, orders) = (
        snapshot.last_seq,
        snapshot.epoch,
        snapshot.book.bids.len() + snapshot.book.asks.len() + snapshot.book.stops.len(),
    );
    let bytes = tokio::task::spawn_blocking(move || core::encode_snapshot(&snapshot))
        .await
        .map_err(|e| e.to_string())??;
    let size = bytes.len();
    let blob = SnapshotBlob {
        last_seq,
        epoch,
        bytes,
        encoding: core::SNAPSHOT_ENCODING.to_string(),
    };
    let placed = store
        .save(&market, &blob)
        .await
        .map_err(|e| e.to_string())?;
    tracing::debug!(
        market = %market,
        last_seq,
        orders,
        bytes = size,
        placed = ?placed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "snapshot saved"
    );
    Ok((
        last_seq,
        u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    ))
}

/// The order stream from a sequence on, through one pull consumer, with the messages read
/// ahead of their use waiting in `ahead`. A warm copy keeps one open and reads ahead as the
/// owner's commands arrive, so taking the market over reads nothing more from JetStream: its
/// recovery takes the journal's last batch from here, and the driver goes on consuming from
/// the same consumer.
///
/// A feed yields every message of the stream exactly once, in order, or fails. Its consumer
/// does not acknowledge (JetStream counts a message delivered once sent), so a message lost on
/// the way is never sent again by that consumer: nats-server closes a connection whose
/// unread data passes its `max_pending` (a node catching up on many markets' backlogs at
/// once), and what it had sent is gone. So each message is checked against the sequence
/// expected next: an earlier one is dropped, a later one (a gap) opens a new consumer from the
/// expected sequence; and a feed waiting for messages opens a new consumer when the
/// connection was re-established meanwhile, in case the end of a burst was lost with nothing
/// after it to show the gap. A loss lowers what every feed on that connection pulls at a time
/// (`PullCap`: to a quarter, down to one message), its own new consumer and those opened later
/// (a market restarted after a lost journal acknowledgement, a recovery's replay), so that a
/// node catching up on many backlogs at once reads them within the server's limit instead of
/// losing them again; each feed that catches up (nothing pending) doubles it back, up to the
/// full size.
struct Feed {
    messages: pull::Stream,
    ahead: VecDeque<Delivered>,
    /// The stream sequence of the next message this feed yields.
    next: Seq,
    market: String,
    /// What it takes to open the consumer again.
    orders: jetstream::stream::Stream,
    pull: Pull,
    connection: Arc<async_nats::Statistics>,
    /// The connection's count of connects when the consumer was opened.
    connects: u64,
    /// Gaps in a row at the same sequence (new consumers that did not help).
    gaps: u32,
    /// A gap seen where no new consumer could be opened (`ready`): the next wait opens one.
    broken: bool,
    /// Messages a pull asks for now: `pull`'s size, or less since a loss.
    batch: usize,
    /// The connection's cap on `batch`.
    cap: Arc<AtomicUsize>,
}

/// Messages each feed on one NATS connection may pull at a time: lowered by a loss on the
/// connection, raised as feeds catch up. One per connection, found by its statistics (which
/// the client shares between its clones).
struct PullCap;

impl PullCap {
    fn of(connection: &Arc<async_nats::Statistics>) -> Arc<AtomicUsize> {
        // Taken only as a feed opens: a lock does.
        type Caps = std::sync::Mutex<std::collections::HashMap<usize, Arc<AtomicUsize>>>;
        static CAPS: std::sync::OnceLock<Caps> = std::sync::OnceLock::new();
        CAPS.get_or_init(Default::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(Arc::as_ptr(connection) as usize)
            .or_insert_with(|| Arc::new(AtomicUsize::new(usize::MAX)))
            .clone()
    }
}

/// What a message received from the consumer is, against the sequence expected next.
enum Arrival {
    InOrder,
    /// Already yielded (or read ahead): dropped.
    Stale,
    /// Later than expected: messages between were lost on the way.
    Gap(Seq),
}

impl Feed {
    /// At most this many messages read ahead (a warm copy whose owner is stuck stops pulling).
    const AHEAD_MAX: usize = 20_000;
    /// How often a waiting feed checks whether its connection was re-established.
    const RECONNECT_CHECK: Duration = Duration::from_secs(1);
    /// New consumers tried for one gap before the feed fails: a gap that stays is a hole in
    /// the stream itself (removed by its limits, or purged).
    const GAP_RETRIES: u32 = 3;

    /// A feed from `from` on.
    async fn open(
        orders: &jetstream::stream::Stream,
        client: &async_nats::Client,
        market: &str,
        from: Seq,
        pull: Pull,
    ) -> Result<Feed, MarketError> {
        let connection = client.statistics();
        let connects = connection.connects.load(Ordering::Acquire);
        let cap = PullCap::of(&connection);
        let batch = pull.batch().min(cap.load(Ordering::Acquire));
        let messages = Self::consume(orders, market, from, pull, batch).await?;
        Ok(Feed {
            messages,
            ahead: VecDeque::new(),
            next: from.max(1),
            market: market.to_string(),
            orders: orders.clone(),
            pull,
            connection,
            connects,
            gaps: 0,
            broken: false,
            batch,
            cap,
        })
    }

    /// A new consumer's messages from `from` on.
    async fn consume(
        orders: &jetstream::stream::Stream,
        market: &str,
        from: Seq,
        pull: Pull,
        batch: usize,
    ) -> Result<pull::Stream, MarketError> {
        let inactive = match pull {
            Pull::Consume(_) => Duration::from_secs(60),
            Pull::Replay => Duration::from_secs(30),
        };
        let consumer = orders
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ack_policy: AckPolicy::None,
                inactive_threshold: inactive,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err(market, "creating the order consumer", e))?;
        let messages = match pull {
            Pull::Consume(_) => consumer.stream().max_messages_per_batch(batch),
            Pull::Replay => consumer
                .stream()
                .max_messages_per_batch(batch)
                .heartbeat(Duration::from_secs(1))
                .expires(Duration::from_secs(5)),
        };
        messages
            .messages()
            .await
            .map_err(|e| nats_err(market, "consuming the order stream", e))
    }

    /// The sequence the consumer should deliver next: after what was yielded and read ahead.
    fn expected(&self) -> Seq {
        self.next + self.ahead.len() as u64
    }

    /// After a loss: a new consumer from the expected sequence, pulling less at a time.
    async fn reopen(&mut self, why: &str) -> Result<(), MarketError> {
        let lowered = (self.batch / 4).max(1);
        let batch = self.cap.fetch_min(lowered, Ordering::AcqRel).min(lowered);
        tracing::warn!(market = %self.market, from = self.expected(), batch, "{why}; opening the order consumer again");
        self.replace(self.expected(), batch).await
    }

    /// A new consumer from `from` pulling `batch` messages at a time, in place of the current
    /// one. (Cancelled, it leaves the current one: a message lost with it shows as a gap.)
    async fn replace(&mut self, from: Seq, batch: usize) -> Result<(), MarketError> {
        let connects = self.connection.connects.load(Ordering::Acquire);
        self.messages = Self::consume(&self.orders, &self.market, from, self.pull, batch).await?;
        self.connects = connects;
        self.broken = false;
        self.batch = batch;
        Ok(())
    }

    /// Once a feed that pulls less since a loss has caught up (nothing pending after `m`):
    /// the connection's cap doubled (up to the full size), and a consumer of that size.
    async fn restore_size(&mut self, m: &Delivered) -> Result<(), MarketError> {
        let full = self.pull.batch();
        if self.batch < full && m.pending() == Some(0) {
            let raised = (self.batch * 2).min(full);
            let cap = self.cap.fetch_max(raised, Ordering::AcqRel).max(raised);
            let batch = full.min(cap);
            tracing::info!(market = %self.market, batch, "caught up; pulling more at a time");
            // `m` is yielded (or read ahead) by the caller: the new consumer starts after it.
            self.replace(self.expected() + 1, batch).await?;
        }
        Ok(())
    }

    fn arrival(&self, m: &Delivered) -> Arrival {
        // A message without metadata is not from this consumer's stream: whoever decodes it
        // says so.
        let Some(seq) = m.seq() else {
            return Arrival::InOrder;
        };
        match seq.cmp(&self.expected()) {
            std::cmp::Ordering::Equal => Arrival::InOrder,
            std::cmp::Ordering::Less => Arrival::Stale,
            std::cmp::Ordering::Greater => Arrival::Gap(seq),
        }
    }

    /// After a gap: a new consumer from the expected sequence, or (when new ones keep showing
    /// the same gap) an error naming the missing messages.
    async fn on_gap(&mut self, got: Seq) -> Result<(), MarketError> {
        let expected = self.expected();
        self.gaps += 1;
        if self.gaps > Self::GAP_RETRIES {
            return Err(nats_err(
                &self.market,
                "consuming the order stream",
                format!(
                    "message {got} came where {expected} was expected, with {} new consumers in a row: messages {expected}..{} are not in the stream (removed by its limits, or purged); restore them, or a snapshot covering them",
                    Self::GAP_RETRIES,
                    got - 1
                ),
            ));
        }
        self.reopen(&format!(
            "message {got} came where {expected} was expected (the messages between were lost on the way)"
        ))
        .await
    }

    /// The next message from the consumer in stream order, waiting for it; `None` when the
    /// consumer ended.
    async fn receive(&mut self) -> Option<Result<Delivered, MarketError>> {
        loop {
            if self.broken
                && let Err(e) = self.reopen("a gap was seen").await
            {
                return Some(Err(e));
            }
            let got = match self.messages.next().now_or_never() {
                Some(got) => got,
                None => {
                    tokio::select! {
                        got = self.messages.next() => got,
                        _ = tokio::time::sleep(Self::RECONNECT_CHECK) => {
                            if self.connection.connects.load(Ordering::Acquire) != self.connects
                                && let Err(e) = self.reopen("the connection to NATS was established again").await
                            {
                                return Some(Err(e));
                            }
                            continue;
                        }
                    }
                }
            };
            match got?.map(Delivered::new) {
                Err(e) => {
                    return Some(Err(nats_err(&self.market, "consuming the order stream", e)));
                }
                Ok(m) => match self.arrival(&m) {
                    Arrival::InOrder => {
                        self.gaps = 0;
                        if let Err(e) = self.restore_size(&m).await {
                            return Some(Err(e));
                        }
                        return Some(Ok(m));
                    }
                    Arrival::Stale => {}
                    Arrival::Gap(got) => {
                        if let Err(e) = self.on_gap(got).await {
                            return Some(Err(e));
                        }
                    }
                },
            }
        }
    }

    fn yielded(&mut self, m: &Delivered) {
        if let Some(seq) = m.seq() {
            self.next = seq + 1;
        }
    }

    /// The next message: one read ahead, or the next from the consumer.
    async fn next(&mut self) -> Option<Result<Delivered, MarketError>> {
        let m = match self.ahead.pop_front() {
            Some(m) => Ok(m),
            None => self.receive().await?,
        };
        if let Ok(m) = &m {
            self.yielded(m);
        }
        Some(m)
    }

    /// The next message if one is here already, without waiting.
    fn ready(&mut self) -> Option<Result<Delivered, MarketError>> {
        let m = match self.ahead.pop_front() {
            Some(m) => Ok(m),
            None => loop {
                if self.broken {
                    return None;
                }
                match self.messages.next().now_or_never()??.map(Delivered::new) {
                    Err(e) => {
                        break Err(nats_err(&self.market, "consuming the order stream", e));
                    }
                    Ok(m) => match self.arrival(&m) {
                        Arrival::InOrder => {
                            self.gaps = 0;
                            break Ok(m);
                        }
                        Arrival::Stale => {}
                        // The next wait (`receive`) opens a new consumer.
                        Arrival::Gap(_) => self.broken = true,
                    },
                }
            },
        };
        if let Ok(m) = &m {
            self.yielded(m);
        }
        Some(m)
    }

    /// Puts back a message taken too far.
    fn unread(&mut self, m: Delivered, seq: Seq) {
        self.ahead.push_front(m);
        self.next = seq;
    }

    /// Reads ahead: waits for the consumer's next message and keeps it (never returns while
    /// `AHEAD_MAX` are waiting). An error ends the feed.
    async fn read_ahead(&mut self) -> Result<(), MarketError> {
        if self.ahead.len() >= Self::AHEAD_MAX {
            return std::future::pending().await;
        }
        match self.receive().await {
            Some(Ok(m)) => {
                self.ahead.push_back(m);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(nats_err(
                &self.market,
                "reading the order stream ahead",
                "the consumer ended",
            )),
        }
    }
}

/// How a feed pulls: as a running market does (and a warm copy, which becomes one), or to
/// replay a range (large pulls, and a heartbeat and short expiries, so that a missing message
/// shows within seconds).
#[derive(Clone, Copy)]
enum Pull {
    Consume(usize),
    Replay,
}

impl Pull {
    /// Messages a pull asks for.
    fn batch(self) -> usize {
        match self {
            Pull::Consume(batch) => batch.max(1),
            Pull::Replay => RangeReader::CHUNK,
        }
    }
}

/// Messages `from..=to` of a market's order stream, in order, in chunks.
struct RangeReader {
    feed: Feed,
    /// The feed is the warm copy's: it goes back to the driver once read.
    kept: bool,
    from: Seq,
    next: Seq,
    to: Seq,
    market: String,
    routes: Routes,
    stream: String,
}

impl RangeReader {
    const CHUNK: usize = 1000;

    fn missing(&self) -> MarketError {
        nats_err(
            &self.market,
            "replaying the order stream",
            format!(
                "messages {}..={} are not all in {}; restore its data or a snapshot covering them",
                self.from, self.to, self.stream
            ),
        )
    }

    /// The next chunk, or `None` once `to` was read.
    async fn next_chunk(&mut self) -> Result<Option<Vec<Incoming>>, MarketError> {
        let mut chunk = Vec::new();
        while self.next <= self.to && chunk.len() < Self::CHUNK {
            let m = tokio::time::timeout(Duration::from_secs(10), self.feed.next())
                .await
                .map_err(|_| self.missing())?;
            let Some(m) = m else {
                return Err(self.missing());
            };
            let m = m?;
            let seq = m
                .meta
                .as_ref()
                .map_err(|e| nats_err(&self.market, "reading a message's metadata", e))?
                .seq;
            if seq > self.to {
                // Read past the range (a warm copy's feed runs on): leave it for the next read.
                self.feed.unread(m, seq);
                self.next = self.to + 1;
                break;
            }
            let msg = incoming(&self.market, &self.routes, &m)?;
            if msg.seq != self.next {
                // The stream lost messages (its head was removed, or a range was purged).
                return Err(self.missing());
            }
            self.next = msg.seq + 1;
            chunk.push(msg);
        }
        Ok((!chunk.is_empty()).then_some(chunk))
    }
}
