//! A small Rust client for Agora: send order commands, read execution reports, the trade tape
//! and the L2 book. What `agora order` and `agora watch` use; also the reference for clients in
//! other languages (the wire is MessagePack maps with named fields).
//!
//! ```no_run
//! # async fn demo() -> Result<(), agora::client::ClientError> {
//! use agora::client::{Client, NewOrderRequest};
//! let client = Client::connect("nats://127.0.0.1:4222", &Default::default(), "agora").await?;
//! let mut reports = client.reports("alice", Some("BTC-USDC")).await?;
//! let sent = client
//!     .place("BTC-USDC", "alice", &NewOrderRequest::limit("buy", "65000.00", "0.5").cid("a1"))
//!     .await?;
//! let mine = reports.for_seq(sent.seq, std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! Commands carry no `Nats-Msg-Id`: JetStream's duplicate window is one space shared by every
//! account of a market, so another account could make an order vanish by using its cid first.
//! A retried `new` is safe through its `cid` instead: the market remembers each (account,
//! cid) for its cid window and rejects the retry `duplicate_cid` (`docs/clients.md`). Each
//! command is sent under a span `agora.order.<op>` whose context travels in the
//! W3C `traceparent` header, so the engine's spans join the client's trace when an
//! OpenTelemetry layer is installed (`telemetry::traces::init`); without one the span is free.
//! This module must never decide anything about an order: the engine does.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::push;

use async_nats::jetstream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::bus::{self, BusError, NatsOptions, Subjects};

mod queries;
use crate::telemetry::traces;
use crate::wire::WireCommandOut;
pub use queries::{HistoryAskError, OpenOrders, OrderStatus};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(
        "{market} does not take orders here: no stream answers on {subject}; list markets with `agora ctl market.list`"
    )]
    UnknownMarket { market: String, subject: String },
    #[error("publishing to {subject}: {reason}")]
    Publish { subject: String, reason: String },
    #[error(
        "the order was not taken: NATS JetStream does not answer for {subject} ({reason}); a NATS cluster that lost its quorum refuses writes until a majority of its servers is back. Send it again then, with the same cid: it counts once"
    )]
    Unavailable { subject: String, reason: String },
    #[error(
        "no acknowledgement on {subject} ({reason}): the order may or may not be stored. Send it again with the same cid: JetStream keeps it once"
    )]
    Unacknowledged { subject: String, reason: String },
    #[error("subscribing to {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
    #[error("no answer on {subject} within {waited:?}: {hint}")]
    Timeout {
        subject: String,
        waited: Duration,
        hint: &'static str,
    },
    #[error("a message on {subject} does not decode: {reason}")]
    Decode { subject: String, reason: String },
    #[error(
        "no market {market} answers: it does not exist or no node runs it now; list markets with `agora ctl market.list`"
    )]
    NoSuchMarket { market: String },
    #[error("{subject} refused the request ({error}): {message}")]
    Refused {
        subject: String,
        /// `rate_limited`, `too_large`, `bad_request`.
        error: String,
        message: String,
        /// For `rate_limited`: when asking again will be answered.
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A refusal of a request (`{error, message, retry_after_ms?}`).
#[derive(Deserialize)]
struct RefusalReply {
    error: String,
    message: String,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// A `new` command, as decimal strings (the engine checks them against the market's spec).
/// Declared once: the same struct is the `agora order place` flags (their help is these docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct NewOrderRequest {
    /// buy or sell.
    #[arg(long)]
    pub side: String,
    /// limit (default), market, stop_limit or stop_market.
    #[arg(long = "type")]
    pub order_type: Option<String>,
    /// gtc (default), ioc, fok, gtd or post_only.
    #[arg(long)]
    pub tif: Option<String>,
    /// Limit price, as a decimal string ("65000.00"); not for market orders.
    #[arg(long, allow_hyphen_values = true)]
    pub price: Option<String>,
    /// Total quantity, as a decimal string ("0.5").
    #[arg(long, allow_hyphen_values = true)]
    pub qty: String,
    /// Trigger price of a stop_limit or stop_market order, as a decimal string.
    #[arg(long, allow_hyphen_values = true)]
    pub stop_price: Option<String>,
    /// Iceberg: the quantity shown at a time.
    #[arg(long, allow_hyphen_values = true)]
    pub display_qty: Option<String>,
    /// For gtd: expiry, nanoseconds since the Unix epoch.
    #[arg(long)]
    pub expire_at: Option<u64>,
    /// Self-trade prevention: none, cancel_newest, cancel_oldest, cancel_both, decrement_and_cancel.
    #[arg(long)]
    pub stp: Option<String>,
    /// Client order id: names the order in reports and cancels, and makes a retry safe (the
    /// market rejects a second `new` with it within its cid window, `duplicate_cid`).
    #[arg(long)]
    pub cid: Option<String>,
}

impl NewOrderRequest {
    /// A limit order, good till cancelled.
    pub fn limit(side: &str, price: &str, qty: &str) -> NewOrderRequest {
        NewOrderRequest {
            side: side.into(),
            price: Some(price.into()),
            qty: qty.into(),
            ..NewOrderRequest::default()
        }
    }

    /// A market order.
    pub fn market(side: &str, qty: &str) -> NewOrderRequest {
        NewOrderRequest {
            side: side.into(),
            order_type: Some("market".into()),
            qty: qty.into(),
            ..NewOrderRequest::default()
        }
    }

    pub fn cid(mut self, cid: &str) -> NewOrderRequest {
        self.cid = Some(cid.into());
        self
    }

    pub fn tif(mut self, tif: &str) -> NewOrderRequest {
        self.tif = Some(tif.into());
        self
    }

    fn wire(&self, account: &str) -> WireCommandOut {
        WireCommandOut {
            op: "new".into(),
            account: account.into(),
            cid: self.cid.clone(),
            side: Some(self.side.clone()),
            order_type: self.order_type.clone(),
            tif: self.tif.clone(),
            price: self.price.clone(),
            qty: Some(self.qty.clone()),
            stop_price: self.stop_price.clone(),
            display_qty: self.display_qty.clone(),
            expire_at: self.expire_at,
            stp: self.stp.clone(),
            ..WireCommandOut::default()
        }
    }
}

/// Which order a cancel or amend means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Cid(String),
    Oid(u64),
}

/// A command the market's stream accepted (not yet applied: its reports say what happened).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sent {
    /// The stream sequence: every report about this command carries it as `seq`.
    pub seq: u64,
    /// For a `new`: the engine's order id (`seq * 1000`).
    pub oid: Option<u64>,
}

/// One execution report: `type` is accepted, rejected, fill, cancelled, amended, triggered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    #[serde(rename = "type")]
    pub kind: String,
    pub market: String,
    /// The input sequence that caused it.
    pub seq: u64,
    #[serde(default)]
    pub oid: Option<u64>,
    #[serde(default)]
    pub cid: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    /// The sequence in stream `EXECS` of the message that carried it: `agora watch reports
    /// --since` takes it, to go on after the last report a reader has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<u64>,
    /// Everything else the report carries (price, qty, leaves, liquidity, reason, ...).
    #[serde(flatten)]
    pub fields: BTreeMap<String, serde_json::Value>,
}

/// Where a reader of an account's reports starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportsFrom {
    /// Reports stored from now on.
    Now,
    /// From this `EXECS` sequence (a report's `stream_seq` + 1 goes on after it).
    Seq(u64),
    /// From the first report stored at or after this time.
    Time(async_nats::datetime::DateTime),
}

impl std::str::FromStr for ReportsFrom {
    type Err = String;
    /// `now`, a sequence (`1042`), or an RFC 3339 time (`2026-12-05T09:30:00Z`).
    fn from_str(s: &str) -> Result<ReportsFrom, String> {
        if s == "now" {
            return Ok(ReportsFrom::Now);
        }
        if let Ok(seq) = s.parse::<u64>() {
            return Ok(ReportsFrom::Seq(seq.max(1)));
        }
        async_nats::datetime::parse_rfc3339(s)
            .map(ReportsFrom::Time)
            .map_err(|_| {
                format!(
                    "{s:?} is neither a stream sequence (such as 1042) nor an RFC 3339 time (such as 2026-12-05T09:30:00Z)"
                )
            })
    }
}

#[derive(Deserialize)]
struct ReportBatch {
    reports: Vec<Report>,
}

/// One trade on the public tape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapeTrade {
    pub trade_id: String,
    pub ts: u64,
    pub price: String,
    pub qty: String,
    pub taker_side: String,
}

#[derive(Deserialize)]
struct Tape {
    market: String,
    trades: Vec<TapeTrade>,
}

/// One price level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level {
    pub price: String,
    pub qty: String,
    pub orders: u32,
}

/// The whole L2 book at a stream sequence (`<prefix>.book.<MARKET>.snapshot`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookSnapshot {
    pub market: String,
    pub seq: u64,
    pub bids: Vec<Level>,
    pub asks: Vec<Level>,
}

/// A change of one level: its quantity now ("0" when gone from the top).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelChange {
    pub side: String,
    pub price: String,
    pub qty: String,
    pub orders: u32,
}

/// An L2 delta on `<prefix>.book.<MARKET>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookDelta {
    pub market: String,
    pub seq: u64,
    pub prev_seq: u64,
    pub changes: Vec<LevelChange>,
}

pub struct Client {
    nats: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
}

fn decode<T: serde::de::DeserializeOwned>(subject: &str, payload: &[u8]) -> Result<T, ClientError> {
    rmp_serde::from_slice(payload).map_err(|e| ClientError::Decode {
        subject: subject.to_string(),
        reason: e.to_string(),
    })
}

impl Client {
    /// Connects to NATS at `url` with `options`; subjects start with `prefix` (`agora`).
    pub async fn connect(
        url: &str,
        options: &NatsOptions,
        prefix: &str,
    ) -> Result<Client, ClientError> {
        let subjects = Subjects::new(prefix)?;
        let nats = bus::connect_with(url, "agora-client", options).await?;
        Ok(Client::with_connection(nats, subjects))
    }

    /// A client on a connection the caller already has.
    pub fn with_connection(nats: async_nats::Client, subjects: Subjects) -> Client {
        let js = jetstream::new(nats.clone());
        Client { nats, js, subjects }
    }

    /// The NATS connection (for requests this client has no method for).
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Publishes one command (any `op`, batches included) to the market's stream, on the
    /// subject of the command's account (`<prefix>.orders.<MARKET>.<ACCOUNT>`).
    pub async fn send(&self, market: &str, command: &WireCommandOut) -> Result<Sent, ClientError> {
        Subjects::check_token("market", market)?;
        Subjects::check_token("account", &command.account)?;
        let subject = self.subjects.orders_for(market, &command.account);
        let payload = rmp_serde::to_vec_named(command)
            .map_err(|e| ClientError::Invalid(format!("cannot encode the command: {e}")))?;
        let mut headers = async_nats::HeaderMap::new();
        let span = traces::client_span(
            &command.op,
            market,
            &command.account,
            command.cid.as_deref(),
        );
        traces::inject(&span, &mut headers);
        let ack = self
            .publish(market, &subject, headers, payload)
            .instrument(span.clone())
            .await
            .inspect_err(|e| traces::fail(&span, e))?;
        let sent = Sent {
            seq: ack.sequence,
            oid: (command.op == "new").then(|| ack.sequence.saturating_mul(1000)),
        };
        traces::record_sent(&span, sent.seq, sent.oid);
        Ok(sent)
    }

    /// Publishes a command's bytes and waits for the stream's acknowledgement.
    async fn publish(
        &self,
        market: &str,
        subject: &str,
        headers: async_nats::HeaderMap,
        payload: Vec<u8>,
    ) -> Result<jetstream::publish::PublishAck, ClientError> {
        let publish_err = |reason: String| ClientError::Publish {
            subject: subject.to_string(),
            reason,
        };
        let acked = self
            .js
            .publish_with_headers(subject.to_string(), headers, payload.into())
            .await
            .map_err(|e| publish_err(e.to_string()))?
            .await;
        let acked = match acked {
            Ok(ack) => return Ok(ack),
            Err(e) => e,
        };
        match acked.kind() {
            // A cluster without a quorum cannot map a subject to its stream either: it says
            // "no stream". Tell that apart from a market that does not exist by asking for the
            // market's stream: only a cluster that works answers "not found".
            jetstream::context::PublishErrorKind::StreamNotFound => {
                let stream = self.subjects.orders_stream(market);
                let asked =
                    tokio::time::timeout(Duration::from_secs(2), self.js.get_stream(&stream)).await;
                // Unknown: no such stream, or one that no longer takes the subject (a removed
                // market keeps its stream, detached).
                let unknown = match &asked {
                    Ok(Ok(found)) => !found
                        .cached_info()
                        .config
                        .subjects
                        .iter()
                        .any(|filter| subject_matches(filter, subject)),
                    Ok(Err(e)) => matches!(
                        e.kind(),
                        jetstream::context::GetStreamErrorKind::JetStream(js)
                            if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                    ),
                    Err(_) => false,
                };
                if unknown {
                    return Err(ClientError::UnknownMarket {
                        market: market.to_string(),
                        subject: subject.to_string(),
                    });
                }
                let reason = match asked {
                    Ok(Ok(_)) => format!("{stream} takes {subject}, but {acked}"),
                    Ok(Err(e)) => format!("{acked}; asking for {stream}: {e}"),
                    Err(_) => format!("{acked}; no answer about {stream} within 2 s"),
                };
                Err(ClientError::Unavailable {
                    subject: subject.to_string(),
                    reason,
                })
            }
            jetstream::context::PublishErrorKind::TimedOut => Err(ClientError::Unacknowledged {
                subject: subject.to_string(),
                reason: acked.to_string(),
            }),
            _ => Err(publish_err(acked.to_string())),
        }
    }

    /// Places an order for `account`.
    pub async fn place(
        &self,
        market: &str,
        account: &str,
        order: &NewOrderRequest,
    ) -> Result<Sent, ClientError> {
        self.send(market, &order.wire(account)).await
    }

    /// Cancels one of `account`'s orders.
    pub async fn cancel(
        &self,
        market: &str,
        account: &str,
        target: &Target,
    ) -> Result<Sent, ClientError> {
        let mut command = WireCommandOut {
            op: "cancel".into(),
            account: account.into(),
            ..WireCommandOut::default()
        };
        set_target(&mut command, target);
        self.send(market, &command).await
    }

    /// Amends one of `account`'s orders (FIX: `qty` is the new total, filled included).
    pub async fn amend(
        &self,
        market: &str,
        account: &str,
        target: &Target,
        qty: Option<&str>,
        price: Option<&str>,
    ) -> Result<Sent, ClientError> {
        if qty.is_none() && price.is_none() {
            return Err(ClientError::Invalid(
                "an amend changes qty, price or both; give at least one".into(),
            ));
        }
        let mut command = WireCommandOut {
            op: "amend".into(),
            account: account.into(),
            qty: qty.map(str::to_string),
            price: price.map(str::to_string),
            ..WireCommandOut::default()
        };
        set_target(&mut command, target);
        self.send(market, &command).await
    }

    /// Cancels every open order of `account` in the market.
    pub async fn cancel_all(&self, market: &str, account: &str) -> Result<Sent, ClientError> {
        let command = WireCommandOut {
            op: "cancel_all".into(),
            account: account.into(),
            ..WireCommandOut::default()
        };
        self.send(market, &command).await
    }

    async fn subscribe(&self, subject: String) -> Result<async_nats::Subscriber, ClientError> {
        let sub =
            self.nats
                .subscribe(subject.clone())
                .await
                .map_err(|e| ClientError::Subscribe {
                    subject: subject.clone(),
                    reason: e.to_string(),
                })?;
        // Make sure the server has the interest before the caller publishes anything.
        self.nats
            .flush()
            .await
            .map_err(|e| ClientError::Subscribe {
                subject,
                reason: e.to_string(),
            })?;
        Ok(sub)
    }

    /// `account`'s execution reports from now on, in one market or all.
    pub async fn reports(
        &self,
        account: &str,
        market: Option<&str>,
    ) -> Result<Reports, ClientError> {
        self.reports_from(account, market, ReportsFrom::Now).await
    }

    /// `account`'s execution reports from `from` on, in one market or all, read from stream
    /// `EXECS` through an ordered consumer filtered to the account's subjects: each report once,
    /// in order, and after a lost connection the reader goes on from the last message it
    /// yielded. NATS permissions can let a trader create exactly this consumer
    /// (`$JS.API.CONSUMER.CREATE.EXECS.*.<prefix>.execs.<ACCOUNT>.>`, see
    /// `config/nats/permissions.conf`) and nothing on another account's reports.
    pub async fn reports_from(
        &self,
        account: &str,
        market: Option<&str>,
        from: ReportsFrom,
    ) -> Result<Reports, ClientError> {
        use async_nats::jetstream::consumer::DeliverPolicy;
        Subjects::check_token("account", account)?;
        let subject = match market {
            Some(m) => {
                Subjects::check_token("market", m)?;
                self.subjects.execs(account, m)
            }
            None => self.subjects.execs_of(account),
        };
        let deliver_policy = match from {
            ReportsFrom::Now => DeliverPolicy::New,
            ReportsFrom::Seq(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            ReportsFrom::Time(start_time) => DeliverPolicy::ByStartTime { start_time },
        };
        // A name of our own (the inbox's random token): the create request then carries the
        // filter in its subject, which is what permissions can name.
        let inbox = self.nats.new_inbox();
        let token = inbox.rsplit('.').next().unwrap_or("0");
        let config = push::OrderedConfig {
            name: Some(format!("reports-{account}-{token}")),
            deliver_subject: self.nats.new_inbox(),
            filter_subject: subject.clone(),
            deliver_policy,
            ..Default::default()
        };
        let stream = self.subjects.execs_stream();
        let refused = |e: &dyn std::fmt::Display| ClientError::Subscribe {
            subject: subject.clone(),
            reason: format!(
                "cannot read the reports from stream {stream}: {e}; this user needs permission to create a consumer on {stream} filtered to {subject}"
            ),
        };
        let consumer: async_nats::jetstream::consumer::Consumer<push::OrderedConfig> = self
            .js
            .create_consumer_on_stream(config, stream.clone())
            .await
            .map_err(|e| refused(&e))?;
        // Where the reader starts: a consumer made again after a lost connection before the
        // first message would start from the stream's beginning; below this it yields nothing.
        let last = match from {
            ReportsFrom::Now => consumer.cached_info().delivered.stream_sequence,
            ReportsFrom::Seq(seq) => seq.saturating_sub(1),
            ReportsFrom::Time(_) => 0,
        };
        let messages = consumer.messages().await.map_err(|e| refused(&e))?;
        Ok(Reports {
            messages,
            subject,
            pending: std::collections::VecDeque::new(),
            last,
        })
    }

    /// Checks that `market` exists before watching it, so a mistyped name fails at once
    /// instead of waiting for ever. A running market answers its book request; when none
    /// does, its order stream tells an unknown market from one that is only not running now
    /// (for users who may read stream information; for the others, the error says both).
    pub async fn check_market(&self, market: &str) -> Result<(), ClientError> {
        Subjects::check_token("market", market)?;
        let subject = self.subjects.book_snapshot(market);
        let asked = self
            .nats
            .send_request(
                subject,
                async_nats::Request::new()
                    .payload(r#"{"depth": 0}"#.into())
                    .timeout(Some(Duration::from_secs(5))),
            )
            .await;
        match asked {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                let stream = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.js.get_stream(self.subjects.orders_stream(market)),
                )
                .await;
                match stream {
                    // It exists and will run again (a failover, a restart): watch it.
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(ClientError::NoSuchMarket {
                        market: market.to_string(),
                    }),
                }
            }
            // A busy market may be slow to answer a whole book; it exists.
            Err(_) => Ok(()),
        }
    }

    /// The market's trade tape from now on.
    pub async fn trades(&self, market: &str) -> Result<Trades, ClientError> {
        Subjects::check_token("market", market)?;
        let subject = self.subjects.trades(market);
        Ok(Trades {
            sub: self.subscribe(subject.clone()).await?,
            subject,
            pending: std::collections::VecDeque::new(),
        })
    }

    /// The whole L2 book now, with the sequence it reflects.
    pub async fn book_snapshot(
        &self,
        market: &str,
        timeout: Duration,
    ) -> Result<BookSnapshot, ClientError> {
        self.book_request(market, None, timeout).await
    }

    /// The best `depth` levels a side of the market's book (0: only the sequence it reflects,
    /// answered without touching the book). A refusal (`rate_limited` with when to ask again,
    /// `too_large` for a book over NATS's max payload) is `ClientError::Refused`.
    pub async fn book_request(
        &self,
        market: &str,
        depth: Option<usize>,
        timeout: Duration,
    ) -> Result<BookSnapshot, ClientError> {
        Subjects::check_token("market", market)?;
        let subject = self.subjects.book_snapshot(market);
        let body = match depth {
            Some(d) => format!("{{\"depth\": {d}}}").into_bytes().into(),
            None => bytes::Bytes::new(),
        };
        let reply = tokio::time::timeout(timeout, self.nats.request(subject.clone(), body))
            .await
            .map_err(|_| ClientError::Timeout {
                subject: subject.clone(),
                waited: timeout,
                hint: "is the market running? (`agora ctl market.list`)",
            })?
            .map_err(|_| ClientError::Timeout {
                subject: subject.clone(),
                waited: timeout,
                hint: "no market answers there; is the market running? (`agora ctl market.list`)",
            })?;
        if let Ok(refused) = rmp_serde::from_slice::<RefusalReply>(&reply.payload) {
            return Err(ClientError::Refused {
                subject,
                error: refused.error,
                message: refused.message,
                retry_after: refused.retry_after_ms.map(Duration::from_millis),
            });
        }
        decode(&subject, &reply.payload)
    }

    /// Waits until the market has applied the command at stream sequence `seq`.
    pub async fn wait_applied(
        &self,
        market: &str,
        seq: u64,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // The sequence alone: answered without the book, and cheap for everyone.
            match self.book_request(market, Some(0), left).await {
                Ok(book) if book.seq >= seq => return Ok(()),
                Ok(_) => {}
                Err(ClientError::Refused {
                    retry_after: Some(wait),
                    ..
                }) => tokio::time::sleep(wait.min(left)).await,
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout {
                    subject: self.subjects.book_snapshot(market),
                    waited: timeout,
                    hint: "the market runs but has not reached the command yet; it may be overloaded",
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The market's L2 book kept current: a snapshot, then every delta; a missed delta is
    /// noticed (`prev_seq`) and the book is fetched again.
    pub async fn book(&self, market: &str, timeout: Duration) -> Result<BookFeed<'_>, ClientError> {
        Subjects::check_token("market", market)?;
        let subject = self.subjects.book(market);
        // Deltas first, then the snapshot: nothing falls between the two.
        let sub = self.subscribe(subject.clone()).await?;
        let snapshot = self.book_snapshot(market, timeout).await?;
        Ok(BookFeed {
            client: self,
            market: market.to_string(),
            subject,
            sub,
            timeout,
            book: L2::from_snapshot(&snapshot),
        })
    }
}

fn set_target(command: &mut WireCommandOut, target: &Target) {
    match target {
        Target::Cid(cid) => command.cid = Some(cid.clone()),
        Target::Oid(oid) => command.oid = Some(*oid),
    }
}

/// Execution reports as they arrive.
pub struct Reports {
    messages: push::Ordered,
    subject: String,
    pending: std::collections::VecDeque<Report>,
    /// `EXECS` sequence of the last message taken.
    last: u64,
}

impl Reports {
    /// The next report; `None` when the reader ended.
    pub async fn next(&mut self) -> Result<Option<Report>, ClientError> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Ok(Some(r));
            }
            let msg = match self.messages.next().await {
                None => return Ok(None),
                Some(Ok(msg)) => msg,
                // Said while the connection is away or the consumer is made again; the reader
                // goes on from its last message by itself.
                Some(Err(e))
                    if matches!(
                        e.kind(),
                        push::OrderedErrorKind::MissingHeartbeat
                            | push::OrderedErrorKind::ConsumerDeleted
                    ) =>
                {
                    continue;
                }
                Some(Err(e)) => {
                    return Err(ClientError::Subscribe {
                        subject: self.subject.clone(),
                        reason: format!("the report reader stopped: {e}"),
                    });
                }
            };
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            // The ordered consumer never yields a message twice; this holds it even so, and
            // keeps a consumer made again from the start (see `reports_from`) from going back.
            if seq != 0 && seq <= self.last {
                continue;
            }
            self.last = self.last.max(seq);
            let batch: ReportBatch = decode(&self.subject, &msg.payload)?;
            self.pending.extend(batch.reports.into_iter().map(|mut r| {
                r.stream_seq = Some(seq);
                r
            }));
        }
    }

    /// The `EXECS` sequence of the last message read (before the first, the one before where
    /// the reader started): start a new reader at this + 1 to go on from here.
    pub fn stream_seq(&self) -> u64 {
        self.last
    }

    /// Every report about the command at stream sequence `seq` (they travel in one message
    /// per account), waiting up to `timeout`.
    pub async fn for_seq(
        &mut self,
        seq: u64,
        timeout: Duration,
    ) -> Result<Vec<Report>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut found = Vec::new();
        loop {
            // Reports of one batch arrive together: once ours were seen, drain that message.
            if !found.is_empty() && self.pending.is_empty() {
                return Ok(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.next()).await;
            match next {
                Ok(Ok(Some(r))) if r.seq == seq => found.push(r),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => return Ok(found),
                Ok(Err(e)) => return Err(e),
                Err(_) if !found.is_empty() => return Ok(found),
                Err(_) => {
                    return Err(ClientError::Timeout {
                        subject: self.subject.clone(),
                        waited: timeout,
                        hint: "the command is in the stream, but no market applied it yet; is the market running? (`agora ctl market.list`)",
                    });
                }
            }
        }
    }
}

/// The trade tape as it arrives.
pub struct Trades {
    sub: async_nats::Subscriber,
    subject: String,
    pending: std::collections::VecDeque<(String, TapeTrade)>,
}

impl Trades {
    /// The next trade with its market; `None` when the connection closed.
    pub async fn next(&mut self) -> Result<Option<(String, TapeTrade)>, ClientError> {
        loop {
            if let Some(t) = self.pending.pop_front() {
                return Ok(Some(t));
            }
            let Some(msg) = self.sub.next().await else {
                return Ok(None);
            };
            let tape: Tape = decode(&self.subject, &msg.payload)?;
            let market = tape.market;
            self.pending
                .extend(tape.trades.into_iter().map(|t| (market.clone(), t)));
        }
    }
}

/// A local L2 book: price → (qty, orders) per side, as decimal strings from the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L2 {
    pub seq: u64,
    /// Keyed by price as a number of the smallest unit, so ordering is numeric.
    bids: BTreeMap<u128, Level>,
    asks: BTreeMap<u128, Level>,
}

/// A decimal string's digits as one integer (prices of one market share their decimals).
fn price_key(price: &str) -> u128 {
    price
        .bytes()
        .filter(u8::is_ascii_digit)
        .fold(0u128, |acc, d| {
            acc.saturating_mul(10).saturating_add(u128::from(d - b'0'))
        })
}

fn is_zero(qty: &str) -> bool {
    qty.bytes().all(|b| b == b'0' || b == b'.')
}

impl L2 {
    pub fn from_snapshot(s: &BookSnapshot) -> L2 {
        let side = |levels: &[Level]| {
            levels
                .iter()
                .map(|l| (price_key(&l.price), l.clone()))
                .collect()
        };
        L2 {
            seq: s.seq,
            bids: side(&s.bids),
            asks: side(&s.asks),
        }
    }

    /// Applies a delta. `Ok(false)`: already included, skipped. `Err(())`: a delta was missed
    /// (fetch the snapshot again).
    #[allow(clippy::result_unit_err)]
    pub fn apply(&mut self, d: &BookDelta) -> Result<bool, ()> {
        if d.seq <= self.seq {
            return Ok(false);
        }
        if d.prev_seq > self.seq {
            return Err(());
        }
        for c in &d.changes {
            let side = if c.side == "buy" {
                &mut self.bids
            } else {
                &mut self.asks
            };
            let key = price_key(&c.price);
            if is_zero(&c.qty) {
                side.remove(&key);
            } else {
                side.insert(
                    key,
                    Level {
                        price: c.price.clone(),
                        qty: c.qty.clone(),
                        orders: c.orders,
                    },
                );
            }
        }
        self.seq = d.seq;
        Ok(true)
    }

    /// Best first.
    pub fn bids(&self, n: usize) -> Vec<Level> {
        self.bids.values().rev().take(n).cloned().collect()
    }

    /// Best first.
    pub fn asks(&self, n: usize) -> Vec<Level> {
        self.asks.values().take(n).cloned().collect()
    }
}

/// What a `BookFeed` saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BookUpdate {
    /// A delta applied.
    Delta(BookDelta),
    /// A delta was missed; the book was fetched again at this sequence.
    Resynced(u64),
}

/// A market's L2 book, kept current from its deltas.
pub struct BookFeed<'a> {
    client: &'a Client,
    market: String,
    subject: String,
    sub: async_nats::Subscriber,
    timeout: Duration,
    book: L2,
}

impl BookFeed<'_> {
    pub fn book(&self) -> &L2 {
        &self.book
    }

    /// Waits for the next change of the book; `None` when the connection closed.
    pub async fn next(&mut self) -> Result<Option<BookUpdate>, ClientError> {
        loop {
            let Some(msg) = self.sub.next().await else {
                return Ok(None);
            };
            let delta: BookDelta = decode(&self.subject, &msg.payload)?;
            match self.book.apply(&delta) {
                Ok(true) => return Ok(Some(BookUpdate::Delta(delta))),
                Ok(false) => {}
                Err(()) => {
                    let snapshot = self
                        .client
                        .book_snapshot(&self.market, self.timeout)
                        .await?;
                    self.book = L2::from_snapshot(&snapshot);
                    // The delta may be newer than the snapshot: apply it if it follows.
                    let _ = self.book.apply(&delta);
                    return Ok(Some(BookUpdate::Resynced(self.book.seq)));
                }
            }
        }
    }
}

/// Whether the NATS subject `filter` (with `*` and `>` wildcards) matches `subject`.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for f in filter.split('.') {
        match (f, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    #[test]
    fn subject_filters_match_as_nats_does() {
        use super::subject_matches;
        assert!(subject_matches("agora.orders.A-USD", "agora.orders.A-USD"));
        assert!(subject_matches(
            "agora.orders.A-USD.*",
            "agora.orders.A-USD.carol"
        ));
        assert!(subject_matches(
            "agora.orders.>",
            "agora.orders.A-USD.carol"
        ));
        assert!(!subject_matches(
            "agora.orders.A-USD",
            "agora.orders.A-USD.carol"
        ));
        assert!(!subject_matches(
            "agora.orders.A-USD.*",
            "agora.orders.A-USD"
        ));
        assert!(!subject_matches(
            "agora.orders.B-USD.>",
            "agora.orders.A-USD.carol"
        ));
        assert!(!subject_matches(
            "agora.removed.A-USD.>",
            "agora.orders.A-USD.carol"
        ));
    }

    use super::*;

    fn level(price: &str, qty: &str) -> Level {
        Level {
            price: price.into(),
            qty: qty.into(),
            orders: 1,
        }
    }

    fn change(side: &str, price: &str, qty: &str) -> LevelChange {
        LevelChange {
            side: side.into(),
            price: price.into(),
            qty: qty.into(),
            orders: u32::from(!is_zero(qty)),
        }
    }

    #[test]
    fn a_local_book_follows_deltas_and_notices_a_gap() {
        let mut book = L2::from_snapshot(&BookSnapshot {
            market: "X".into(),
            seq: 10,
            bids: vec![level("99.50", "2"), level("9.00", "1")],
            asks: vec![level("100.00", "1")],
        });
        assert_eq!(
            book.bids(1),
            [level("99.50", "2")],
            "numeric order, not text"
        );
        let delta = |seq, prev_seq, changes| BookDelta {
            market: "X".into(),
            seq,
            prev_seq,
            changes,
        };
        // Older than the snapshot: skipped.
        assert_eq!(book.apply(&delta(9, 5, vec![])), Ok(false));
        // Its predecessor is before the snapshot: it follows.
        assert_eq!(
            book.apply(&delta(
                12,
                7,
                vec![change("buy", "99.50", "0"), change("sell", "100.50", "3")]
            )),
            Ok(true)
        );
        assert_eq!(book.bids(5), [level("9.00", "1")]);
        assert_eq!(
            book.asks(5),
            [
                level("100.00", "1"),
                LevelChange::into_level(change("sell", "100.50", "3"))
            ]
        );
        // A delta whose predecessor we never saw: a gap.
        assert_eq!(book.apply(&delta(20, 15, vec![])), Err(()));
        assert_eq!(book.seq, 12);
    }

    impl LevelChange {
        fn into_level(self) -> Level {
            Level {
                price: self.price,
                qty: self.qty,
                orders: self.orders,
            }
        }
    }

    #[test]
    fn commands_have_the_wire_shape() {
        let w = NewOrderRequest::limit("buy", "65000.00", "0.5")
            .cid("a1")
            .tif("ioc")
            .wire("alice");
        let v: serde_json::Value =
            rmp_serde::from_slice(&rmp_serde::to_vec_named(&w).expect("encodes")).expect("decodes");
        assert_eq!(
            v,
            serde_json::json!({"op": "new", "account": "alice", "cid": "a1", "side": "buy",
                               "tif": "ioc", "price": "65000.00", "qty": "0.5"})
        );
    }
}
