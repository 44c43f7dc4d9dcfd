//! The driver: the market's behaviour, a task beside its actor. It takes batches from the
//! order feed, hands each to the actor (whose bounded mailbox is the back-pressure), publishes
//! the journal message fenced on its previous one and, once that is acknowledged, the derived
//! views, whose acknowledgements it collects while it matches and journals the next batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{HeaderMap, HeaderValue};
use futures::FutureExt;

use super::snapshots::{Saved, SnapshotBudget};
use tokio::sync::watch;
use tracing::Instrument;

use super::book_requests::serve_book_snapshots;
use super::handle::RunningMarket;
use super::{
    Fork, LastSeq, MarketActor, MarketBus, MarketError, MarketSettings, Process, StopPoint,
    hash_aside, nats_err,
};
use crate::actors::core::{BatchStats, Incoming, MarketCore};
use crate::actors::metrics::MarketMetrics;
use crate::book::{MarketSpec, Seq, StateHash};
use crate::bus::acks::{ACK_TIMEOUT, AckedPublisher};
use crate::bus::journal::JournalTail;
use crate::bus::outputs::{BatchOutputs, Outgoing};
use crate::bus::{Delivered, Feed, Journal, Pull, PullCap, SnapshotStore, Subjects};
use crate::telemetry::traces::{self, PublishSpans, TracedCommand};

pub(super) struct Driver {
    pub(super) market: String,
    pub(super) js: jetstream::Context,
    pub(super) client: async_nats::Client,
    pub(super) subjects: Subjects,
    pub(super) orders: jetstream::stream::Stream,
    pub(super) journal: Journal,
    pub(super) pull_cap: PullCap,
    pub(super) snapshots: Option<SnapshotStore>,
    pub(super) addr: Addr<MarketActor>,
    pub(super) routes: Routes,
    /// Stream sequence of our last journal message (the fence), `None` before the first.
    pub(super) journal_seq: Option<u64>,
    /// Publishes the derived views and collects their acknowledgements (made at the first).
    pub(super) views: Option<AckedPublisher>,
    /// The batch whose views are published and not yet acknowledged: its figures, when its
    /// first message was taken, and the commands then waiting in the stream.
    pub(super) unsettled: Option<(BatchStats, Instant, Option<u64>)>,
    /// A warm copy's last look at the journal's end (saves reading the batch before the last
    /// again while the last has not changed).
    pub(super) tail_seen: Option<JournalTail>,
    pub(super) settings: MarketSettings,
    /// Messages applied since the last snapshot was taken, and when it was taken.
    pub(super) since_snapshot: u64,
    pub(super) snapshot_at: Instant,
    /// The snapshot being written (one at a time, so they land in order): its sequence and
    /// how long it took.
    pub(super) snapshot_task: Option<tokio::task::JoinHandle<Result<Saved, String>>>,
    /// The last snapshot's size in bytes (the estimate of the next against the budget), the
    /// estimate the one in flight took, and whether a due one is waiting for the budget.
    pub(super) snapshot_bytes: u64,
    pub(super) snapshot_estimate: u64,
    pub(super) snapshot_deferred: bool,
    pub(super) metrics: MarketMetrics,
    /// A warm copy's order feed, read ahead of the book; recovery and then the driver go on
    /// with it.
    pub(super) feed: Option<Feed>,
    /// A warm copy that went ahead for a planned move: it applied commands of the journal's
    /// last two batches, so it cannot rebuild their outputs (only a handoff may promote it).
    pub(super) ahead: bool,
    /// Where recovery ended, announced with `active`, with the book's state hash there when
    /// recovery already knows it (a snapshot restored, nothing after it: restore checked the
    /// snapshot's hash against the book). Otherwise the hash follows in a second `active`,
    /// computed on a copy once the first is out (`launch`).
    pub(super) recovered_at: Option<(Seq, Option<StateHash>)>,
    /// The last input sequence the book has applied, for book requests answered without the
    /// actor (`book_requests`).
    pub(super) book_seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Which subject of the market's stream a message came on, and so who sent it: the decoding
/// of a stored order-stream message into what the core takes. Tests and offline checkers
/// decode with it too, so they read the stream exactly as the market does.
#[derive(Clone)]
pub struct Routes {
    /// `<prefix>.admin.<MARKET>`: messages from it may halt and resume the market.
    admin: String,
    /// `<prefix>.orders.<MARKET>.`: followed by an account, the account's own subject.
    account_orders: String,
}

impl Routes {
    pub fn new(subjects: &Subjects, market: &str) -> Routes {
        Routes {
            admin: subjects.admin(market),
            account_orders: format!("{}.", subjects.orders(market)),
        }
    }

    /// A message of the market's order stream as the core takes it: its sequence and time
    /// from JetStream (`ts` in nanoseconds), JSON if its `Content-Type` says so, and who sent
    /// it from the subject it came on (the admin subject, an account's own subject, or the
    /// shared one).
    pub fn decode(
        &self,
        subject: &str,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
        seq: Seq,
        ts: crate::book::Timestamp,
    ) -> Incoming {
        let json = headers
            .and_then(|h| h.get("Content-Type"))
            .is_some_and(|v| v.as_str().starts_with("application/json"));
        Incoming {
            seq,
            ts,
            payload: payload.to_vec(),
            json,
            operator: subject == self.admin,
            account: subject
                .strip_prefix(&self.account_orders)
                .map(|a| crate::book::Account::new(a).map_err(|_| a.to_string())),
        }
    }
}

/// A delivered message of the market's order stream as the core takes it (`Routes::decode`).
pub fn incoming(market: &str, routes: &Routes, d: &Delivered) -> Result<Incoming, MarketError> {
    let meta = d.meta(market)?;
    let m = &d.message;
    Ok(routes.decode(
        m.subject.as_str(),
        m.headers.as_ref(),
        &m.payload,
        meta.seq,
        meta.ts,
    ))
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
        driver.settings.takeover.trace.as_deref(),
    );
    driver.recover(false).instrument(span).await?;
    driver.launch().await
}

impl Driver {
    /// The market's actor, on the current arbiter, and its driver, not started.
    pub(super) async fn open(
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
            snapshot_format: settings.snapshot_format,
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
        let journal = Journal::of(events, &bus.subjects);
        let routes = Routes::new(&bus.subjects, &market);
        Ok(Driver {
            metrics: MarketMetrics::new(&market),
            market,
            js: bus.js,
            client: bus.client,
            subjects: bus.subjects,
            orders,
            journal,
            pull_cap: bus.pull_cap,
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
            snapshot_bytes: 0,
            snapshot_estimate: 0,
            snapshot_deferred: false,
            recovered_at: None,
            book_seq: Default::default(),
            feed: None,
            ahead: false,
        })
    }

    /// Runs the recovered market: answers book requests, announces it, and consumes.
    pub(super) async fn launch(mut self) -> Result<RunningMarket, MarketError> {
        let (stop, stopped) = watch::channel(false);
        let handoff = Arc::new(AtomicBool::new(false));
        // The responder has its own stop: it must end however the driver ends. Told only by the
        // market's stop, it would outlive a failed driver, whose task would then never finish,
        // and the supervisor would neither hear of the failure nor restart the market.
        let (stop_responder, responder_stopped) = watch::channel(false);
        let responder =
            serve_book_snapshots(&self, self.book_seq.clone(), responder_stopped.clone()).await?;
        let queries = super::queries::serve_queries(&self, responder_stopped).await?;
        // Where recovery ended: announced at once; the book's hash there follows in a second
        // `active` once computed (a move compares it with the old owner's), so hashing the
        // whole book never delays the first command.
        let hashed = match self.recovered_at.take() {
            Some((seq, Some(hash))) => {
                tracing::info!(market = %self.market, seq, state_hash = %hash, "market recovered: book hashed by its snapshot");
                self.announce_at("active", Some(seq), Some(hash)).await;
                None
            }
            Some((seq, None)) => {
                self.announce_at("active", Some(seq), None).await;
                // Copied after the announcement (a clone of 20,000 orders takes a millisecond
                // or two here): nothing is consumed before `run`, so the book is still at `seq`.
                let forked = self.send(Fork).await?;
                let hashing = hash_aside(forked);
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
            let _ = queries.await;
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

impl Driver {
    pub(super) async fn send<M>(&self, msg: M) -> Result<M::Result, MarketError>
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

    /// The live loop, then (stopped at a batch boundary) the last views' acknowledgements, so
    /// a clean stop leaves every output acknowledged.
    pub(super) async fn run(&mut self, stop: watch::Receiver<bool>) -> Result<(), MarketError> {
        self.consume(stop).await?;
        self.settle_views().await
    }

    /// Batch, process, publish; until stopped, fenced or failed.
    pub(super) async fn consume(
        &mut self,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), MarketError> {
        let last = self.send(LastSeq).await?;
        // A warm copy's feed goes on where its recovery ended; otherwise a consumer of our own.
        let mut messages = match self.feed.take() {
            Some(feed) if feed.at() == last + 1 => feed,
            _ => {
                Feed::open(
                    &self.orders,
                    &self.client,
                    &self.market,
                    last + 1,
                    Pull::Consume(self.settings.fetch_max),
                    &self.pull_cap,
                )
                .await?
            }
        };
        let mut tick = if self.settings.snapshot_every.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.settings.snapshot_every
        };
        if self.settings.snapshot_budget.bounded() {
            // A snapshot waiting for the budget is not left until the next interval.
            tick = tick.min(SnapshotBudget::RETRY);
        }
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
                    Some(Err(e)) => return Err(e.into()),
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
            let last_in = batch.last().map(|m| m.seq);
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
            if let Some(seq) = last_in {
                self.book_seq
                    .store(seq, std::sync::atomic::Ordering::Release);
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
    pub(super) fn take(
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
    pub(super) async fn publish_batch(
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
    pub(super) async fn settle_views(&mut self) -> Result<(), MarketError> {
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
    pub(super) async fn publish_journal(&mut self, journal: &Outgoing) -> Result<(), MarketError> {
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
                    .journal
                    .last_written(&self.market)
                    .await?
                    .ok_or_else(|| {
                        nats_err(
                            &self.market,
                            "reading the journal after a fence",
                            "the journal holds no message for the market",
                        )
                    })?;
                if last.msg_id.as_deref() == Some(msg_id.as_str()) {
                    self.journal_seq = Some(last.seq);
                    Ok(())
                } else {
                    Err(MarketError::Fenced {
                        market: self.market.clone(),
                        found: last.seq,
                    })
                }
            }
            Err(e) => Err(nats_err(&self.market, "publishing the journal", e)),
        }
    }

    /// Publishes the derived views: reports and tape through JetStream (their acknowledgements
    /// collected by `settle_views`), book deltas and unreadable messages on core NATS (`live`
    /// only: a recovering owner republishes only what JetStream can deduplicate).
    pub(super) async fn send_views(
        &mut self,
        out: BatchOutputs,
        live: bool,
    ) -> Result<(), MarketError> {
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
