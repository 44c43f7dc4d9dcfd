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

use std::time::Duration;

use actix::prelude::*;
use async_nats::jetstream;

use super::core::{self, BatchStats, Incoming, MarketCore, MarketSnapshot};
use super::lease::Lease;
pub use super::takeover::{StopPoint, Takeover, TakeoverKind};
use crate::book::{HashVersion, MarketSpec, OrderBook, Seq, StateHash};
use crate::bus::outputs::{self, BatchOutputs, Outcome, Top};
use crate::bus::{BusError, PullCap, SnapshotStore, Subjects};
use crate::telemetry::traces::{Matching, TracedCommand};

mod book_requests;
mod driver;
mod handle;
mod queries;
mod recovery;
mod snapshots;
mod status;
pub use snapshots::SnapshotBudget;
pub use status::MarketStatus;
mod warm;

pub use driver::{Routes, incoming, start};
pub use handle::{MarketControl, RunningMarket};
pub use warm::{Follower, follow};

/// What a market talks to: NATS, JetStream, its subject names and the snapshot store.
#[derive(Clone)]
pub struct MarketBus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    /// Where snapshots are written and read; `None` recovers from the streams alone.
    pub snapshots: Option<SnapshotStore>,
    /// What each order feed on `client`'s connection may pull at a time (one per connection).
    pub pull_cap: PullCap,
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
    /// A snapshot after this many commands (0: not by count).
    pub snapshot_every_commands: u64,
    /// A snapshot after this long with commands since the last one (zero: not by time).
    pub snapshot_every: Duration,
    /// The node's snapshot bytes a second, shared by every market it runs.
    pub snapshot_budget: SnapshotBudget,
    /// The snapshot format written (`[snapshots] format`): 2, or 1 while nodes of builds
    /// before format 2 still run; its state hash version is also what the market announces.
    pub snapshot_format: core::SnapshotFormat,
    /// The node's lease: checked before every journal publish (`None`: not checked).
    pub lease: Option<Lease>,
    /// How this node came to run it: epoch, trace, and whether its previous owner released
    /// it (and where it stopped).
    pub takeover: Takeover,
}

impl Default for MarketSettings {
    fn default() -> MarketSettings {
        MarketSettings {
            fetch_max: 256,
            backlog_wait: Duration::from_millis(2),
            batch_max: 100,
            node_id: String::new(),
            snapshot_every_commands: 100_000,
            snapshot_every: Duration::from_secs(30),
            snapshot_budget: SnapshotBudget::default(),
            snapshot_format: core::SnapshotFormat::CURRENT,
            lease: None,
            takeover: Takeover::standalone(),
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
    /// The snapshot format it writes (`MarketSettings::snapshot_format`), whose state hash
    /// version is also the one it announces and compares.
    snapshot_format: core::SnapshotFormat,
}

impl MarketActor {
    /// The state hash version of the snapshots it writes.
    fn hash_version(&self) -> HashVersion {
        self.snapshot_format.hash_version()
    }

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
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
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
        let traced = matching.seqs();
        let mut outcomes = vec![Outcome::default(); traced.len()];
        let batches = self.core.process_traced(&msg.batch, &traced, &mut outcomes);
        matching.finish(&outcomes);
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

/// The market's whole state, for the snapshot store (hashed by the writer, off the actor).
#[derive(Message)]
#[rtype(result = "core::UnhashedSnapshot")]
pub struct TakeSnapshot {
    pub epoch: u64,
}

impl Handler<TakeSnapshot> for MarketActor {
    type Result = MessageResult<TakeSnapshot>;
    fn handle(&mut self, msg: TakeSnapshot, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.core.unhashed_snapshot(msg.epoch, self.snapshot_format))
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
        MessageResult((
            self.core.last_seq(),
            self.core.book().state_hash_as(self.hash_version()),
        ))
    }
}

/// The last applied stream sequence and a copy of the book, to hash away from the actor: a
/// clone costs a fraction of the hash (0.4 against 3.9 ms with 20,000 orders).
#[derive(Message)]
#[rtype(result = "Forked")]
pub struct Fork;

/// What `Fork` answers: the copy, and the state hash version the market announces.
pub struct Forked {
    pub seq: Seq,
    pub book: Box<OrderBook>,
    pub hash_version: HashVersion,
}

impl Handler<Fork> for MarketActor {
    type Result = MessageResult<Fork>;
    fn handle(&mut self, _: Fork, _: &mut Self::Context) -> Self::Result {
        MessageResult(Forked {
            seq: self.core.last_seq(),
            book: Box::new(self.core.book().clone()),
            hash_version: self.hash_version(),
        })
    }
}

/// Computes a copy's state hash on a thread of its own at a lower priority (nice 10 on
/// Linux): hashing 20,000 orders takes a core for about 4 ms, and on a small machine a move's
/// new owner, its announcement's readers and nats-server need the cores more right then.
pub fn hash_aside(forked: Forked) -> tokio::sync::oneshot::Receiver<StateHash> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let hashing = move || {
        #[cfg(target_os = "linux")]
        // SAFETY: setpriority only reads its arguments; `who` 0 on Linux is the calling thread,
        // which ends after the hash. A refusal leaves the priority as it was.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, 10);
        }
        let _ = tx.send(forked.book.state_hash_as(forked.hash_version));
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

#[derive(Message)]
#[rtype(result = "MarketSpec")]
pub struct SpecOf;

/// An account's open orders (a page of them) or one of them, with the sequence the book
/// reflects and the spec to show them with; and whether more follow the page.
#[derive(Message)]
#[rtype(result = "(Seq, MarketSpec, Vec<crate::book::OpenOrder>, bool)")]
pub struct AccountOrders {
    pub account: crate::book::Account,
    pub query: crate::wire::query::BookQuery,
}

impl Handler<AccountOrders> for MarketActor {
    type Result = MessageResult<AccountOrders>;
    fn handle(&mut self, msg: AccountOrders, _: &mut Self::Context) -> Self::Result {
        let book = self.core.book();
        let (orders, more) = match msg.query {
            crate::wire::query::BookQuery::Open { after, limit } => {
                book.open_orders(&msg.account, after, limit)
            }
            crate::wire::query::BookQuery::One(target) => (
                book.open_order(&msg.account, target).into_iter().collect(),
                false,
            ),
        };
        MessageResult((self.core.last_seq(), self.core.spec().clone(), orders, more))
    }
}

impl Handler<SpecOf> for MarketActor {
    type Result = MessageResult<SpecOf>;
    fn handle(&mut self, _: SpecOf, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.core.spec().clone())
    }
}

fn nats_err(market: &str, what: &'static str, e: impl std::fmt::Display) -> MarketError {
    MarketError::Nats {
        market: market.to_string(),
        what,
        reason: e.to_string(),
    }
}
