//! The order stream from a sequence on, through one JetStream pull consumer, with gap repair:
//! what a market (and its warm copy) reads its commands with. It moves messages and says what
//! went wrong with NATS; it never decodes a command (the market does).
//!
//! This module must never yield a message twice or skip one: it yields every message of the
//! stream exactly once, in order, or fails with the missing range named.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use futures::{FutureExt, StreamExt};

use super::BusError;
use crate::book::{Seq, Timestamp};

fn feed_err(market: &str, what: &'static str, e: impl std::fmt::Display) -> BusError {
    BusError::Market {
        market: market.to_string(),
        what,
        reason: e.to_string(),
    }
}

/// A message of the order stream, with the JetStream metadata of its reply subject read once,
/// as it arrives (`Message::info` parses the subject again at every call).
pub struct Delivered {
    pub message: jetstream::Message,
    /// `Err`: the message has no JetStream metadata (it is not from this consumer's stream).
    meta: Result<Meta, async_nats::Error>,
}

/// What the feed and the decoding of a message need of its JetStream metadata.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    /// Its stream sequence.
    pub seq: Seq,
    /// Messages still in the stream for the consumer after it.
    pub pending: u64,
    /// The stream's timestamp of it, in nanoseconds.
    pub ts: Timestamp,
}

impl Delivered {
    pub fn new(message: jetstream::Message) -> Delivered {
        let meta = message.info().map(|info| Meta {
            seq: info.stream_sequence,
            pending: info.pending,
            ts: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
        });
        Delivered { message, meta }
    }

    /// Its metadata, or an error naming the market when it has none.
    pub fn meta(&self, market: &str) -> Result<Meta, BusError> {
        self.meta
            .as_ref()
            .copied()
            .map_err(|e| feed_err(market, "reading a message's metadata", e))
    }

    /// Its stream sequence, if it has metadata.
    pub fn seq(&self) -> Option<Seq> {
        self.meta.as_ref().ok().map(|meta| meta.seq)
    }

    /// Messages still in the stream after it, if it has metadata.
    pub fn pending(&self) -> Option<u64> {
        self.meta.as_ref().ok().map(|meta| meta.pending)
    }
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
pub struct Feed {
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
    /// A new consumer being opened (`replace`).
    opening: Option<Opening>,
    /// Consumers opened again after a loss or a reconnect.
    reopens: u64,
    /// How often a waiting feed checks whether its connection was re-established.
    reconnect_check: Duration,
    /// When the wait under way checks next. Kept here, not in the waiting future: a caller
    /// that stops waiting sooner than `reconnect_check` (a market's `select!` with a 1 s
    /// timer, a warm copy's 20 ms poll) would otherwise start the wait over every time, and
    /// the check would never come.
    check_at: Option<tokio::time::Instant>,
    /// Gaps in a row at the same sequence (new consumers that did not help).
    gaps: u32,
    /// A gap seen where no new consumer could be opened (`ready`): the next wait opens one.
    broken: bool,
    /// Messages a pull asks for now: `pull`'s size, or less since a loss.
    batch: usize,
    /// The connection's cap on `batch`.
    cap: PullCap,
}

/// A new consumer being opened, in a task of its own: a caller that stops waiting for the feed
/// (a `select!` whose timer fired first, a timeout) does not cancel it, and the feed's next
/// call takes it up. Opened in the caller's future instead, a consumer that took longer than
/// the caller's timer (JetStream's API slow under a flood, after a reconnect) was cancelled at
/// every tick and opened again, and the feed never read another message.
struct Opening {
    task: tokio::task::JoinHandle<Result<pull::Stream, BusError>>,
    batch: usize,
    connects: u64,
}

/// Messages each feed on one NATS connection may pull at a time: lowered by a loss on the
/// connection, raised as feeds catch up. One per connection: whoever makes the connection
/// makes its cap (the supervisor, for the node's connections) and hands it to the feeds on it.
#[derive(Clone, Debug)]
pub struct PullCap(Arc<AtomicUsize>);

impl PullCap {
    /// A connection's cap, not lowered yet.
    pub fn new() -> PullCap {
        PullCap(Arc::new(AtomicUsize::new(usize::MAX)))
    }
}

impl Default for PullCap {
    fn default() -> PullCap {
        PullCap::new()
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
    pub async fn open(
        orders: &jetstream::stream::Stream,
        client: &async_nats::Client,
        market: &str,
        from: Seq,
        pull: Pull,
        cap: &PullCap,
    ) -> Result<Feed, BusError> {
        let connection = client.statistics();
        let connects = connection.connects.load(Ordering::Acquire);
        let cap = cap.clone();
        let batch = pull.batch().min(cap.0.load(Ordering::Acquire));
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
            opening: None,
            reopens: 0,
            reconnect_check: Self::RECONNECT_CHECK,
            check_at: None,
            gaps: 0,
            broken: false,
            batch,
            cap,
        })
    }

    /// Consumers opened again after a loss or a reconnect.
    pub fn reopens(&self) -> u64 {
        self.reopens
    }

    /// Checks for a re-established connection this often while waiting (tests: to make the
    /// check, and the new consumer it opens, happen inside a caller's short timeout).
    #[doc(hidden)]
    pub fn check_reconnects_every(&mut self, every: Duration) {
        self.reconnect_check = every;
    }

    /// A new consumer's messages from `from` on.
    async fn consume(
        orders: &jetstream::stream::Stream,
        market: &str,
        from: Seq,
        pull: Pull,
        batch: usize,
    ) -> Result<pull::Stream, BusError> {
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
            .map_err(|e| feed_err(market, "creating the order consumer", e))?;
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
            .map_err(|e| feed_err(market, "consuming the order stream", e))
    }

    /// The stream sequence of the next message this feed yields.
    pub fn at(&self) -> Seq {
        self.next
    }

    /// The sequence the consumer should deliver next: after what was yielded and read ahead.
    fn expected(&self) -> Seq {
        self.next + self.ahead.len() as u64
    }

    /// After a loss: a new consumer from the expected sequence, pulling less at a time.
    async fn reopen(&mut self, why: &str) -> Result<(), BusError> {
        let lowered = (self.batch / 4).max(1);
        let batch = self.cap.0.fetch_min(lowered, Ordering::AcqRel).min(lowered);
        tracing::warn!(market = %self.market, from = self.expected(), batch, "{why}; opening the order consumer again");
        self.reopens += 1;
        self.replace(self.expected(), batch).await
    }

    /// A new consumer from `from` pulling `batch` messages at a time, in place of the current
    /// one. Cancelled, the consumer is still opened (`Opening`), and the next `receive` reads
    /// from it; a message dropped with the cancelled caller shows as a gap.
    async fn replace(&mut self, from: Seq, batch: usize) -> Result<(), BusError> {
        if self.opening.is_none() {
            let connects = self.connection.connects.load(Ordering::Acquire);
            let (orders, market, pull) = (self.orders.clone(), self.market.clone(), self.pull);
            let task =
                tokio::spawn(
                    async move { Self::consume(&orders, &market, from, pull, batch).await },
                );
            self.opening = Some(Opening {
                task,
                batch,
                connects,
            });
        }
        self.finish_opening().await
    }

    /// Waits for the consumer being opened, if any, and reads from it from then on.
    async fn finish_opening(&mut self) -> Result<(), BusError> {
        let Some(opening) = self.opening.as_mut() else {
            return Ok(());
        };
        let opened = (&mut opening.task).await;
        let Some(opening) = self.opening.take() else {
            return Ok(());
        };
        self.messages =
            opened.map_err(|e| feed_err(&self.market, "creating the order consumer", e))??;
        self.connects = opening.connects;
        self.broken = false;
        self.batch = opening.batch;
        Ok(())
    }

    /// Once a feed that pulls less since a loss has caught up (nothing pending after `m`):
    /// the connection's cap doubled (up to the full size), and a consumer of that size.
    async fn restore_size(&mut self, m: &Delivered) -> Result<(), BusError> {
        let full = self.pull.batch();
        if self.batch < full && m.pending() == Some(0) {
            let raised = (self.batch * 2).min(full);
            let cap = self.cap.0.fetch_max(raised, Ordering::AcqRel).max(raised);
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
    async fn on_gap(&mut self, got: Seq) -> Result<(), BusError> {
        let expected = self.expected();
        self.gaps += 1;
        if self.gaps > Self::GAP_RETRIES {
            return Err(feed_err(
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
    async fn receive(&mut self) -> Option<Result<Delivered, BusError>> {
        loop {
            if let Err(e) = self.finish_opening().await {
                return Some(Err(e));
            }
            if self.broken
                && let Err(e) = self.reopen("a gap was seen").await
            {
                return Some(Err(e));
            }
            let got = match self.messages.next().now_or_never() {
                Some(got) => got,
                None => {
                    let check_at = *self
                        .check_at
                        .get_or_insert_with(|| tokio::time::Instant::now() + self.reconnect_check);
                    tokio::select! {
                        got = self.messages.next() => got,
                        _ = tokio::time::sleep_until(check_at) => {
                            self.check_at = None;
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
            // Messages flow: the next wait starts its own count.
            self.check_at = None;
            match got?.map(Delivered::new) {
                Err(e) => {
                    return Some(Err(feed_err(&self.market, "consuming the order stream", e)));
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
    pub async fn next(&mut self) -> Option<Result<Delivered, BusError>> {
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
    pub fn ready(&mut self) -> Option<Result<Delivered, BusError>> {
        let m = match self.ahead.pop_front() {
            Some(m) => Ok(m),
            None => loop {
                if self.opening.is_some() {
                    match self.finish_opening().now_or_never() {
                        None => return None,
                        Some(Err(e)) => break Err(e),
                        Some(Ok(())) => {}
                    }
                }
                if self.broken {
                    return None;
                }
                match self.messages.next().now_or_never()??.map(Delivered::new) {
                    Err(e) => {
                        break Err(feed_err(&self.market, "consuming the order stream", e));
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
    pub fn unread(&mut self, m: Delivered, seq: Seq) {
        self.ahead.push_front(m);
        self.next = seq;
    }

    /// Reads ahead: waits for the consumer's next message and keeps it (never returns while
    /// `AHEAD_MAX` are waiting). An error ends the feed.
    pub async fn read_ahead(&mut self) -> Result<(), BusError> {
        if self.ahead.len() >= Self::AHEAD_MAX {
            return std::future::pending().await;
        }
        match self.receive().await {
            Some(Ok(m)) => {
                self.ahead.push_back(m);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(feed_err(
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
pub enum Pull {
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
pub struct RangeReader {
    feed: Feed,
    from: Seq,
    next: Seq,
    to: Seq,
    market: String,
    stream: String,
}

impl RangeReader {
    /// Messages a chunk holds at most.
    pub const CHUNK: usize = 1000;

    /// Reads `from..=to` of `stream` (named in errors) with `feed`, which must be at `from`.
    pub fn new(feed: Feed, market: &str, stream: String, from: Seq, to: Seq) -> RangeReader {
        RangeReader {
            feed,
            from,
            next: from,
            to,
            market: market.to_string(),
            stream,
        }
    }

    /// The feed, where the reading stopped (a warm copy goes on with it).
    pub fn into_feed(self) -> Feed {
        self.feed
    }

    fn missing(&self) -> BusError {
        feed_err(
            &self.market,
            "replaying the order stream",
            format!(
                "messages {}..={} are not all in {}; restore its data or a snapshot covering them",
                self.from, self.to, self.stream
            ),
        )
    }

    /// The next chunk, or `None` once `to` was read.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<Delivered>>, BusError> {
        let mut chunk = Vec::new();
        while self.next <= self.to && chunk.len() < Self::CHUNK {
            let m = tokio::time::timeout(Duration::from_secs(10), self.feed.next())
                .await
                .map_err(|_| self.missing())?;
            let Some(m) = m else {
                return Err(self.missing());
            };
            let m = m?;
            let seq = m.meta(&self.market)?.seq;
            if seq > self.to {
                // Read past the range (a warm copy's feed runs on): leave it for the next read.
                self.feed.unread(m, seq);
                self.next = self.to + 1;
                break;
            }
            if seq != self.next {
                // The stream lost messages (its head was removed, or a range was purged).
                return Err(self.missing());
            }
            self.next = seq + 1;
            chunk.push(m);
        }
        Ok((!chunk.is_empty()).then_some(chunk))
    }
}
