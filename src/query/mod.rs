//! Queries (DESIGN section 11): an account's open orders in every market, and one order's
//! state, answered from the books themselves.
//!
//! Two layers. Each running market answers `<prefix>.market.<MARKET>.orders` for its own
//! book, from its actor between batches (`actors::market::queries`); nodes only ask it, it
//! is not for clients. The front, served by every node in one queue group, answers
//! `<prefix>.query.<ACCOUNT>.orders` and `<prefix>.query.<ACCOUNT>.order`: it asks the
//! markets concurrently, wherever they run, and puts the answers together. A market that
//! does not answer within the deadline (moving, failing over, its node stalled) is named in
//! `missing`, never left out silently; a market with no responder yet is asked again until
//! then. NATS permissions decide who may ask for which account (a trader only for her own).
//!
//! Replies are MessagePack maps, or JSON when the request says `Content-Type:
//! application/json` (or is itself a JSON object). Sizes are bounded: at most `limit`
//! orders (1..=`LIMIT_MAX`, default `LIMIT_MAX`) a reply, in (market, oid) order, with
//! `next` to ask for the rest. This module must never hold a lock across a request, wait
//! without a deadline, or answer for an account the subject does not name.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::book::{Account, Seq};
use crate::bus::Subjects;
pub use crate::wire::query::{BookQuery, LIMIT_MAX, MarketAnswer, MarketRequest, OrderView};

/// How long the front waits for the markets, unless the request asks for less.
pub const DEADLINE_DEFAULT: Duration = Duration::from_secs(2);
/// The longest deadline a request may ask for.
pub const DEADLINE_MAX: Duration = Duration::from_secs(10);

/// The queue group every node's front joins.
pub const QUEUE_GROUP: &str = "agora-query";

/// A client's request for open orders: `{market?, limit?, after?, timeout_ms?}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersRequest {
    #[serde(default)]
    market: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    /// `next` of the previous reply: `MARKET:OID`.
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// A client's request for one order: `{market, oid?, cid?, timeout_ms?}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderRequest {
    market: String,
    #[serde(default)]
    oid: Option<u64>,
    #[serde(default)]
    cid: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Serialize)]
struct OrdersReply<'a> {
    ok: bool,
    orders: &'a [OrderView],
    as_of: &'a BTreeMap<String, Seq>,
    missing: &'a [String],
    truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

#[derive(Serialize)]
struct OrderReply<'a> {
    ok: bool,
    order: &'a OrderView,
    as_of: Seq,
}

#[derive(Serialize)]
struct Refusal<'a> {
    ok: bool,
    error: &'a str,
    message: String,
}

/// Reads a request body: empty is `{}`, a JSON object when it starts with `{`, MessagePack
/// otherwise.
pub(crate) fn read_body<T: for<'de> Deserialize<'de> + Default>(
    payload: &[u8],
) -> Result<T, String> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if payload.first() == Some(&b'{') {
        return serde_json::from_slice(payload).map_err(|e| e.to_string());
    }
    rmp_serde::from_slice(payload).map_err(|e| e.to_string())
}

/// How a reply is encoded: as the request was.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    MessagePack,
    Json,
}

impl Format {
    pub(crate) fn of(headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Format {
        let json_header = headers
            .and_then(|h| h.get("Content-Type"))
            .is_some_and(|v| v.as_str().starts_with("application/json"));
        if json_header || payload.first() == Some(&b'{') {
            Format::Json
        } else {
            Format::MessagePack
        }
    }

    pub(crate) fn encode<T: Serialize>(self, value: &T) -> Bytes {
        match self {
            Format::Json => serde_json::to_vec(value).unwrap_or_default().into(),
            Format::MessagePack => rmp_serde::to_vec_named(value).unwrap_or_default().into(),
        }
    }
}

pub(crate) fn refusal(format: Format, error: &str, message: String) -> Bytes {
    format.encode(&Refusal {
        ok: false,
        error,
        message,
    })
}

/// The deadline a request asks for, within bounds.
fn deadline(timeout_ms: Option<u64>) -> Duration {
    timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEADLINE_DEFAULT)
        .clamp(Duration::from_millis(50), DEADLINE_MAX)
}

/// `MARKET:OID` of a reply's `next`.
fn parse_after(after: &str) -> Result<(String, u64), String> {
    let bad = || format!("after {after:?} is not a `next` of an earlier reply (MARKET:OID)");
    let (market, oid) = after.rsplit_once(':').ok_or_else(bad)?;
    let oid = oid.parse::<u64>().map_err(|_| bad())?;
    crate::book::spec::validate_symbol(market).map_err(|_| bad())?;
    Ok((market.to_string(), oid))
}

/// The front: answers `<prefix>.query.*.orders` and `<prefix>.query.*.order` in the queue
/// group until `stop`.
pub struct QueryFront {
    pub client: async_nats::Client,
    pub subjects: Subjects,
    /// The markets bucket: which markets exist.
    pub markets: kv::Store,
}

/// The front, subscribed (`QueryFront::listen`): `serve` answers until told to stop.
pub struct QueryListening {
    front: QueryFront,
    responder: crate::bus::Responder,
}

impl QueryFront {
    /// Subscribes to the query subjects, and makes sure the server has the subscriptions (a
    /// node says it is ready only once it answers queries).
    pub async fn listen(self) -> Result<QueryListening, crate::bus::BusError> {
        // Two subjects, not `query.*.*`: the history store answers the others.
        let subjects: Vec<String> = ["orders", "order"]
            .iter()
            .map(|kind| format!("{}.query.*.{kind}", self.subjects.prefix()))
            .collect();
        let responder =
            crate::bus::Responder::subscribe(&self.client, &subjects, QUEUE_GROUP).await?;
        Ok(QueryListening {
            front: self,
            responder,
        })
    }
}

impl QueryListening {
    /// Answers until `stop`, each request on a task of its own: a slow market delays only its
    /// askers.
    pub async fn serve(self, stop: watch::Receiver<bool>) {
        let front = std::sync::Arc::new(self.front);
        self.responder
            .serve(stop, move |message| {
                let front = front.clone();
                async move { front.answer(&message).await }
            })
            .await;
    }
}

impl QueryFront {
    async fn answer(&self, message: &async_nats::Message) -> Bytes {
        let format = Format::of(message.headers.as_ref(), &message.payload);
        let prefix_tokens = self.subjects.prefix().split('.').count();
        let tokens: Vec<&str> = message.subject.as_str().split('.').collect();
        let (Some(account), Some(kind)) =
            (tokens.get(prefix_tokens + 1), tokens.get(prefix_tokens + 2))
        else {
            return refusal(
                format,
                "bad_request",
                "ask on <prefix>.query.<ACCOUNT>.orders or .order".into(),
            );
        };
        if let Err(e) = Account::new(account) {
            return refusal(format, "bad_request", e.describe("account", account));
        }
        match *kind {
            "orders" => match read_body::<OrdersRequest>(&message.payload) {
                Ok(request) => self.open_orders(format, account, request).await,
                Err(e) => refusal(
                    format,
                    "bad_request",
                    format!(
                        "an open-orders request is {{market?, limit?, after?, timeout_ms?}}: {e}"
                    ),
                ),
            },
            "order" => match read_body::<OrderRequest>(&message.payload) {
                Ok(request) => self.one_order(format, account, request).await,
                Err(e) => refusal(
                    format,
                    "bad_request",
                    format!("an order-status request is {{market, oid or cid, timeout_ms?}}: {e}"),
                ),
            },
            other => refusal(
                format,
                "bad_request",
                format!("{other:?} is not a query; ask for orders or order"),
            ),
        }
    }

    /// Every market's name, from the markets bucket.
    async fn market_names(&self) -> Result<Vec<String>, String> {
        let mut keys = self
            .markets
            .keys()
            .await
            .map_err(|e| format!("cannot list the markets: {e}"))?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.map_err(|e| format!("cannot list the markets: {e}"))?);
        }
        names.sort();
        Ok(names)
    }

    async fn market_exists(&self, market: &str) -> Result<bool, String> {
        match self.markets.get(market).await {
            Ok(v) => Ok(v.is_some()),
            Err(e) => Err(format!("cannot read the markets: {e}")),
        }
    }

    async fn open_orders(&self, format: Format, account: &str, request: OrdersRequest) -> Bytes {
        let limit = match request.limit {
            None => LIMIT_MAX,
            Some(n) if (1..=LIMIT_MAX).contains(&n) => n,
            Some(n) => {
                return refusal(
                    format,
                    "bad_request",
                    format!(
                        "limit {n} is out of range: ask for 1 to {LIMIT_MAX} orders, and for the rest with `after` = the reply's `next`"
                    ),
                );
            }
        };
        let after = match request.after.as_deref().map(parse_after).transpose() {
            Ok(after) => after,
            Err(e) => return refusal(format, "bad_request", e),
        };
        let markets = match &request.market {
            Some(market) => match self.market_exists(market).await {
                Ok(true) => vec![market.clone()],
                Ok(false) => {
                    return refusal(
                        format,
                        "unknown_market",
                        format!("{market} is not a market here (agora ctl market.list lists them)"),
                    );
                }
                Err(e) => return refusal(format, "unavailable", e),
            },
            None => match self.market_names().await {
                Ok(names) => names,
                Err(e) => return refusal(format, "unavailable", e),
            },
        };
        // Paging: markets before the cursor's are done, the cursor's goes on after its oid.
        let asked: Vec<(String, Option<u64>)> = markets
            .into_iter()
            .filter_map(|m| match &after {
                None => Some((m, None)),
                Some((am, oid)) if *am == m => Some((m, Some(*oid))),
                Some((am, _)) if m > *am => Some((m, None)),
                Some(_) => None,
            })
            .collect();
        let until = Instant::now() + deadline(request.timeout_ms);
        let answers = futures::future::join_all(asked.iter().map(|(market, after)| {
            let request = MarketRequest {
                account: account.to_string(),
                oid: None,
                cid: None,
                after: *after,
                limit: Some(limit),
            };
            self.ask_market(market, request, until)
        }))
        .await;
        let mut orders = Vec::new();
        let mut as_of = BTreeMap::new();
        let mut missing = Vec::new();
        let mut more_in: Option<String> = None;
        for ((market, _), answer) in asked.iter().zip(answers) {
            match answer {
                Ok(a) if a.ok => {
                    as_of.insert(market.clone(), a.seq);
                    if a.more && more_in.is_none() {
                        more_in = Some(market.clone());
                    }
                    orders.extend(a.orders);
                }
                Ok(a) => {
                    tracing::debug!(market, error = ?a.error, "a market refused an open-orders query");
                    missing.push(market.clone());
                }
                Err(_) => missing.push(market.clone()),
            }
        }
        // Markets answer in market order, each in oid order; past the limit, or past a market
        // that has more, the rest waits for `next`.
        let mut truncated = more_in.is_some() || orders.len() > limit;
        if let Some(m) = &more_in {
            // Nothing of the markets after one with more may be shown before its rest.
            let keep = orders
                .iter()
                .position(|o| o.market > *m)
                .unwrap_or(orders.len());
            orders.truncate(keep);
        }
        if orders.len() > limit {
            orders.truncate(limit);
            truncated = true;
        }
        let next = truncated
            .then(|| orders.last().map(|o| format!("{}:{}", o.market, o.oid)))
            .flatten();
        format.encode(&OrdersReply {
            ok: true,
            orders: &orders,
            as_of: &as_of,
            missing: &missing,
            truncated,
            next,
        })
    }

    async fn one_order(&self, format: Format, account: &str, request: OrderRequest) -> Bytes {
        let market = request.market.clone();
        if request.oid.is_none() == request.cid.is_none() {
            return refusal(
                format,
                "bad_request",
                "name the order with oid or with cid (one of them)".into(),
            );
        }
        match self.market_exists(&market).await {
            Ok(true) => {}
            Ok(false) => {
                return refusal(
                    format,
                    "unknown_market",
                    format!("{market} is not a market here (agora ctl market.list lists them)"),
                );
            }
            Err(e) => return refusal(format, "unavailable", e),
        }
        let until = Instant::now() + deadline(request.timeout_ms);
        let asked = MarketRequest {
            account: account.to_string(),
            oid: request.oid,
            cid: request.cid.clone(),
            after: None,
            limit: None,
        };
        match self.ask_market(&market, asked, until).await {
            Ok(a) if a.ok => match a.orders.first() {
                Some(order) => format.encode(&OrderReply {
                    ok: true,
                    order,
                    as_of: a.seq,
                }),
                None => match self.closed_order(account, &request, until).await {
                    Some(reply) => format.encode(&reply),
                    None => refusal(
                        format,
                        "not_open",
                        format!(
                            "no open order of {account} in {market} has this {} (as of sequence {}): it filled, was cancelled, expired or rejected, or never existed; its reports say which",
                            if request.oid.is_some() { "oid" } else { "cid" },
                            a.seq
                        ),
                    ),
                },
            },
            Ok(a) => refusal(
                format,
                a.error.as_deref().unwrap_or("bad_request"),
                a.message.unwrap_or_default(),
            ),
            Err(e) => refusal(format, "unavailable", e),
        }
    }

    /// A closed order from the history store (`agora history`), when one runs and has it
    /// written: at most 1 s, within the request's deadline. An order the store still shows
    /// open is one whose end it has not written yet: not an answer.
    async fn closed_order(
        &self,
        account: &str,
        request: &OrderRequest,
        until: Instant,
    ) -> Option<crate::wire::query::OrderFound> {
        let lookup = crate::wire::query::OrderLookup {
            account: account.to_string(),
            market: request.market.clone(),
            oid: request.oid,
            cid: request.cid.clone(),
        };
        let payload: Bytes = rmp_serde::to_vec_named(&lookup).ok()?.into();
        let left = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        let asked = self
            .client
            .request(format!("{}.history.order", self.subjects.prefix()), payload);
        let reply = tokio::time::timeout(left, asked).await.ok()?.ok()?;
        let found: crate::wire::query::OrderFoundOwned =
            rmp_serde::from_slice(&reply.payload).ok()?;
        (found.ok && found.order.status != "open").then_some(crate::wire::query::OrderFound {
            ok: true,
            order: found.order,
            as_of: found.as_of,
        })
    }

    /// Asks one market, again while it has no responder (it is starting or moving), until
    /// `until`.
    async fn ask_market(
        &self,
        market: &str,
        request: MarketRequest,
        until: Instant,
    ) -> Result<MarketAnswer, String> {
        let subject = self.subjects.market_orders(market);
        let payload: Bytes = rmp_serde::to_vec_named(&request)
            .map_err(|e| e.to_string())?
            .into();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{market} did not answer in time"));
            }
            let asked = self.client.request(subject.clone(), payload.clone());
            match tokio::time::timeout(left, asked).await {
                Err(_) => return Err(format!("{market} did not answer in time")),
                Ok(Ok(reply)) => {
                    return rmp_serde::from_slice::<MarketAnswer>(&reply.payload)
                        .map_err(|e| format!("{market} answered something unreadable: {e}"));
                }
                Ok(Err(e)) => {
                    if e.kind() != async_nats::RequestErrorKind::NoResponders {
                        return Err(format!("asking {market}: {e}"));
                    }
                    tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let r: OrdersRequest = read_body(b"").expect("empty");
        assert_eq!(r, OrdersRequest::default());
        let r: OrdersRequest = read_body(br#"{"market": "BTC-USDC", "limit": 5}"#).expect("json");
        assert_eq!(r.market.as_deref(), Some("BTC-USDC"));
        let packed =
            rmp_serde::to_vec_named(&serde_json::json!({"market": "X", "oid": 7})).expect("pack");
        let r: OrderRequest = read_body(&packed).expect("msgpack");
        assert_eq!((r.market.as_str(), r.oid), ("X", Some(7)));
        assert!(read_body::<OrdersRequest>(br#"{"markets": "X"}"#).is_err());
        assert_eq!(
            parse_after("BTC-USDC:12000").expect("after"),
            ("BTC-USDC".to_string(), 12000)
        );
        assert!(parse_after("BTC-USDC").is_err());
        assert!(parse_after("btc:1").is_err());
    }
}
