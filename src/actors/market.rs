//! `MarketActor`: the actor that owns one market's book (through `MarketCore`), and the driver
//! that feeds it from the market's order stream and publishes what it produces.
//!
//! The driver takes batches from a JetStream pull consumer (never a plain subscription, which
//! drops messages when its buffer fills), hands each batch to the actor through its bounded
//! mailbox (so overload shows as back-pressure), then publishes the journal message fenced with
//! `Nats-Expected-Last-Subject-Sequence`, and only once it is acknowledged the derived views,
//! pipelined. On start it recovers: it reads the journal's last batch, replays the stream up to
//! it silently, republishes that batch's derived views (JetStream drops what had landed) and
//! goes on from the next sequence. No command is lost or applied twice; no output is published
//! twice. This module must never publish a derived view before its journal message, nor go on
//! after the fence says another owner wrote the journal.

use std::time::Duration;

use actix::prelude::*;
use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    context::PublishErrorKind,
};
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;

use super::core::{Incoming, MarketCore};
use crate::book::{MarketSpec, Seq, StateHash};
use crate::bus::outputs::{self, BatchOutputs, Outgoing, Top};
use crate::bus::{BusError, Subjects};

/// How a market takes its input.
#[derive(Clone, Debug)]
pub struct MarketSettings {
    /// Most stream messages processed as one batch (one journal message).
    pub fetch_max: usize,
    /// Most commands one batch message (`op: batch`) may carry.
    pub batch_max: u16,
    /// The node running the market, named in its status announcements.
    pub node_id: String,
}

impl Default for MarketSettings {
    fn default() -> MarketSettings {
        MarketSettings {
            fetch_max: 256,
            batch_max: 100,
            node_id: String::new(),
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
    #[error("{market}: the market actor is gone")]
    ActorGone { market: String },
}

/// The actor: owns the market's pure core. Its mailbox is bounded; the driver awaits each send.
pub struct MarketActor {
    core: MarketCore,
    /// Messages applied, and when, for the rate `market.list` shows (the shell may read the
    /// clock; the core never does).
    applied: std::collections::VecDeque<(std::time::Instant, usize)>,
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

/// Apply a batch and return what it sends.
#[derive(Message)]
#[rtype(result = "Option<BatchOutputs>")]
pub struct Process(pub Vec<Incoming>);

/// Apply messages already processed before (recovery): nothing is built.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replay(pub Vec<Incoming>);

/// The last applied stream sequence and the book's state hash.
#[derive(Message)]
#[rtype(result = "(Seq, StateHash)")]
pub struct State;

/// What `market.list` shows of a market.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MarketStats {
    pub last_seq: Seq,
    pub halted: bool,
    pub resting_orders: usize,
    pub stop_orders: usize,
    pub bid_levels: usize,
    pub ask_levels: usize,
    /// Commands applied per second over the last ten seconds.
    pub commands_per_sec: f64,
}

#[derive(Message)]
#[rtype(result = "MarketStats")]
pub struct Stats;

/// The whole L2 book and the stream sequence it reflects.
#[derive(Message)]
#[rtype(result = "(Seq, Top)")]
pub struct L2Book;

impl Handler<Process> for MarketActor {
    type Result = Option<BatchOutputs>;
    fn handle(&mut self, msg: Process, _: &mut Self::Context) -> Self::Result {
        self.count(msg.0.len());
        self.core.process(&msg.0)
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
        })
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

/// A running market: its actor, and the driver to stop or await.
pub struct RunningMarket {
    pub market: String,
    pub addr: Addr<MarketActor>,
    stop: watch::Sender<bool>,
    driver: tokio::task::JoinHandle<Result<(), MarketError>>,
}

/// Stops a market (the part of `RunningMarket` a supervisor keeps).
#[derive(Clone)]
pub struct MarketControl {
    pub market: String,
    pub addr: Addr<MarketActor>,
    stop: watch::Sender<bool>,
}

impl MarketControl {
    /// Asks the driver to stop at the next batch boundary, its outputs published.
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
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
            },
            self.driver,
        )
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
#[derive(Deserialize)]
struct JournalHead {
    first_seq: Seq,
    last_seq: Seq,
}

struct Driver {
    market: String,
    js: jetstream::Context,
    client: async_nats::Client,
    subjects: Subjects,
    orders: jetstream::stream::Stream,
    events: jetstream::stream::Stream,
    addr: Addr<MarketActor>,
    /// `<prefix>.admin.<MARKET>`: messages from it may halt and resume the market.
    admin_subject: String,
    /// Stream sequence of our last journal message (the fence), `None` before the first.
    journal_seq: Option<u64>,
    settings: MarketSettings,
}

fn nats_err(market: &str, what: &'static str, e: impl std::fmt::Display) -> MarketError {
    MarketError::Nats {
        market: market.to_string(),
        what,
        reason: e.to_string(),
    }
}

fn incoming(
    market: &str,
    admin_subject: &str,
    m: &jetstream::Message,
) -> Result<Incoming, MarketError> {
    let info = m
        .info()
        .map_err(|e| nats_err(market, "reading a message's metadata", e))?;
    let json = m
        .headers
        .as_ref()
        .and_then(|h| h.get("Content-Type"))
        .is_some_and(|v| v.as_str().starts_with("application/json"));
    Ok(Incoming {
        seq: info.stream_sequence,
        ts: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
        payload: m.payload.to_vec(),
        json,
        operator: m.subject.as_str() == admin_subject,
    })
}

/// Starts the market: creates its actor on the current arbiter, recovers it from the streams,
/// and starts its driver.
pub async fn start(
    js: jetstream::Context,
    client: async_nats::Client,
    subjects: Subjects,
    spec: MarketSpec,
    settings: MarketSettings,
) -> Result<RunningMarket, MarketError> {
    let market = spec.symbol.clone();
    let core = MarketCore::new(subjects.clone(), spec, settings.batch_max);
    let addr = MarketActor {
        core,
        applied: std::collections::VecDeque::new(),
    }
    .start();
    let orders = js
        .get_stream(subjects.orders_stream(&market))
        .await
        .map_err(|e| nats_err(&market, "opening the order stream", e))?;
    let events = js
        .get_stream(subjects.events_stream())
        .await
        .map_err(|e| nats_err(&market, "opening the journal stream", e))?;
    let admin_subject = subjects.admin(&market);
    let mut driver = Driver {
        market: market.clone(),
        js,
        client,
        subjects,
        orders,
        events,
        addr: addr.clone(),
        admin_subject,
        journal_seq: None,
        settings,
    };
    driver.recover().await?;
    let (stop, stopped) = watch::channel(false);
    let responder = serve_book_snapshots(&driver, stopped.clone()).await?;
    driver.announce("active").await;
    let handle = actix_rt::spawn(async move {
        let result = driver.run(stopped).await;
        let _ = responder.await;
        driver
            .announce(if result.is_ok() { "stopped" } else { "failed" })
            .await;
        result
    });
    Ok(RunningMarket {
        market,
        addr,
        stop,
        driver: handle,
    })
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

    /// Reads the journal's last batch, replays the stream up to it, republishes its views.
    async fn recover(&mut self) -> Result<(), MarketError> {
        let subject = self.subjects.events(&self.market);
        let head = match self.events.get_last_raw_message_by_subject(&subject).await {
            Ok(last) => {
                self.journal_seq = Some(last.sequence);
                let head: JournalHead = rmp_serde::from_slice(&last.payload)
                    .map_err(|e| nats_err(&self.market, "reading the journal's last batch", e))?;
                Some(head)
            }
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                None
            }
            Err(e) => return Err(nats_err(&self.market, "reading the journal", e)),
        };
        let Some(head) = head else { return Ok(()) };
        // Everything before the last batch, silently; then the last batch again, to rebuild its
        // outputs byte for byte and republish the derived views.
        self.replay_range(1, head.first_seq.saturating_sub(1))
            .await?;
        let mut last_batch = Vec::new();
        self.read_range_into(head.first_seq, head.last_seq, &mut last_batch)
            .await?;
        if let Some(out) = self.send(super::market::Process(last_batch)).await? {
            self.publish_views(&out, false).await?;
        }
        Ok(())
    }

    /// Replays stream messages `from..=to` into the actor, in chunks, building nothing.
    async fn replay_range(&self, from: Seq, to: Seq) -> Result<(), MarketError> {
        let mut next = from;
        while next <= to {
            let mut chunk = Vec::new();
            self.read_chunk(next, to, &mut chunk).await?;
            next = chunk.last().map_or(to + 1, |m| m.seq + 1);
            self.send(Replay(chunk)).await?;
        }
        Ok(())
    }

    async fn read_range_into(
        &self,
        from: Seq,
        to: Seq,
        out: &mut Vec<Incoming>,
    ) -> Result<(), MarketError> {
        let mut next = from;
        while next <= to {
            let before = out.len();
            self.read_chunk(next, to, out).await?;
            next = out.last().map_or(to + 1, |m| m.seq + 1);
            if out.len() == before {
                break;
            }
        }
        Ok(())
    }

    /// Up to 1,000 messages from `from`, none past `to`.
    async fn read_chunk(
        &self,
        from: Seq,
        to: Seq,
        out: &mut Vec<Incoming>,
    ) -> Result<(), MarketError> {
        let consumer = self
            .orders
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err(&self.market, "replaying the order stream", e))?;
        let want = usize::try_from((to - from + 1).min(1000)).unwrap_or(1000);
        let mut batch = consumer
            .fetch()
            .max_messages(want)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| nats_err(&self.market, "replaying the order stream", e))?;
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| nats_err(&self.market, "replaying the order stream", e))?;
            let msg = incoming(&self.market, &self.admin_subject, &m)?;
            if msg.seq > to {
                break;
            }
            out.push(msg);
            got += 1;
        }
        if got == 0 {
            return Err(nats_err(
                &self.market,
                "replaying the order stream",
                format!(
                    "messages {from}..={to} are missing from {}",
                    self.subjects.orders_stream(&self.market)
                ),
            ));
        }
        Ok(())
    }

    /// The live loop: batch, process, publish; until stopped, fenced or failed.
    /// Publishes the market's state on `<prefix>.status.<MARKET>` (best effort).
    async fn announce(&self, state: &'static str) {
        let status = Status {
            market: &self.market,
            node: &self.settings.node_id,
            epoch: 0,
            state,
        };
        if let Ok(bytes) = rmp_serde::to_vec_named(&status) {
            let _ = self
                .client
                .publish(self.subjects.status(&self.market), bytes.into())
                .await;
            let _ = self.client.flush().await;
        }
    }

    async fn run(&mut self, mut stop: watch::Receiver<bool>) -> Result<(), MarketError> {
        let (last, _) = self.send(State).await?;
        let consumer = self
            .orders
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: last + 1,
                },
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err(&self.market, "creating the order consumer", e))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.settings.fetch_max)
            .messages()
            .await
            .map_err(|e| nats_err(&self.market, "consuming the order stream", e))?;
        loop {
            let first = tokio::select! {
                _ = stop.changed() => return Ok(()),
                m = messages.next() => m,
            };
            let Some(first) = first else { return Ok(()) };
            let first =
                first.map_err(|e| nats_err(&self.market, "consuming the order stream", e))?;
            let mut batch = vec![incoming(&self.market, &self.admin_subject, &first)?];
            // Take whatever else is already here, without waiting: batches grow under load only.
            while batch.len() < self.settings.fetch_max {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => {
                        batch.push(incoming(&self.market, &self.admin_subject, &m)?)
                    }
                    Some(Some(Err(e))) => {
                        return Err(nats_err(&self.market, "consuming the order stream", e));
                    }
                    _ => break,
                }
            }
            if let Some(out) = self.send(Process(batch)).await? {
                self.publish_journal(&out.journal).await?;
                self.publish_views(&out, true).await?;
            }
            if *stop.borrow() {
                return Ok(());
            }
        }
    }

    /// Publishes the journal message, fenced on our previous one.
    async fn publish_journal(&mut self, journal: &Outgoing) -> Result<(), MarketError> {
        let msg_id = journal.msg_id.clone().unwrap_or_default();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            self.journal_seq.unwrap_or(0).to_string().as_str(),
        );
        let sent = self
            .js
            .publish_with_headers(
                journal.subject.clone(),
                headers,
                journal.payload.clone().into(),
            )
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

    /// Publishes the derived views: reports and tape through JetStream (pipelined, acks awaited
    /// together), book deltas and unreadable messages on core NATS (`live` only: a recovering
    /// owner republishes only what JetStream can deduplicate).
    async fn publish_views(&self, out: &BatchOutputs, live: bool) -> Result<(), MarketError> {
        let mut acks = Vec::new();
        for o in out.execs.iter().chain(out.trades.iter()) {
            let mut headers = HeaderMap::new();
            if let Some(id) = &o.msg_id {
                headers.insert("Nats-Msg-Id", id.as_str());
            }
            acks.push(
                self.js
                    .publish_with_headers(o.subject.clone(), headers, o.payload.clone().into())
                    .await
                    .map_err(|e| nats_err(&self.market, "publishing reports", e))?,
            );
        }
        if live {
            for o in out.book.iter().chain(out.rejects.iter()) {
                self.client
                    .publish(o.subject.clone(), o.payload.clone().into())
                    .await
                    .map_err(|e| nats_err(&self.market, "publishing book updates", e))?;
            }
        }
        let acks = acks.into_iter().map(std::future::IntoFuture::into_future);
        for ack in futures::future::join_all(acks).await {
            ack.map_err(|e| nats_err(&self.market, "publishing reports", e))?;
        }
        Ok(())
    }
}
