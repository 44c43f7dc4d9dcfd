//! Answers `<prefix>.book.<MARKET>.snapshot`: the market's L2 book, without stalling matching.
//!
//! - The levels come from a copy taken from the actor at most once per batch, and only when a
//!   request needs a newer one than the copy it has; the reply is encoded off the market's
//!   thread. A request for `{"depth": 0}` (the book's sequence only, what a client waiting
//!   for its command needs) never reaches the actor.
//! - Each requester (a connection's inbox) may ask `REQUESTS_PER_SEC` times a second, and the
//!   market sends at most `BYTES_PER_SEC` of levels a second; past either, the answer is a
//!   short refusal saying when to ask again, so a flood costs the market almost nothing.
//! - A book whose reply would exceed NATS's max payload is refused with what to ask instead
//!   (`{"depth": N}`: the best N levels a side).
//!
//! Replies: `{market, seq, bids, asks}`, or `{error, message, retry_after_ms?}` with `error`
//! one of `rate_limited`, `too_large`, `bad_request`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use super::driver::Driver;
use super::{L2Book, MarketError, SpecOf, nats_err};
use crate::book::{MarketSpec, Seq};
use crate::bus::outputs::Top;

/// Requests a requester may send a second (and at once).
pub const REQUESTS_PER_SEC: f64 = 20.0;
/// Bytes of levels a market sends a second, over all requesters.
pub const BYTES_PER_SEC: f64 = 8.0 * 1024.0 * 1024.0;
/// Requesters remembered before the oldest are forgotten.
const REQUESTERS_MAX: usize = 10_000;

/// The answer with levels.
#[derive(serde::Serialize)]
struct Reply<'a> {
    market: &'a str,
    /// The stream sequence the book reflects: apply deltas whose `seq` is above it.
    seq: Seq,
    bids: Vec<crate::wire::WireLevel>,
    asks: Vec<crate::wire::WireLevel>,
}

/// A refusal.
#[derive(serde::Serialize)]
struct Refusal<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

/// What a request may carry: nothing (the whole book) or `{"depth": N}`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Request {
    depth: Option<usize>,
}

/// Tokens refilled at `rate` a second up to `burst`.
struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn new(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
            rate,
            burst,
        }
    }

    /// Takes `n` tokens, or says how long until there are.
    fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / self.rate))
        }
    }
}

/// The latest copy of the book's levels.
struct Copy {
    seq: Seq,
    spec: MarketSpec,
    top: Arc<Top>,
    /// The whole book encoded, once asked for.
    full: Option<Bytes>,
}

/// Who asked: the reply subject without its last token (a connection's inbox).
fn requester(reply: &str) -> &str {
    reply.rsplit_once('.').map_or(reply, |(head, _)| head)
}

fn parse(payload: &[u8]) -> Result<Request, String> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Request::default());
    }
    if payload.first() == Some(&b'{') {
        return serde_json::from_slice(payload).map_err(|e| e.to_string());
    }
    rmp_serde::from_slice(payload).map_err(|e| e.to_string())
}

fn encode_levels(market: &str, seq: Seq, spec: &MarketSpec, top: &Top, depth: usize) -> Bytes {
    let level = |l: &crate::book::L2Level| crate::wire::WireLevel {
        price: spec.fmt_price(l.price),
        qty: spec.fmt_qty(l.qty),
        orders: l.orders,
    };
    let reply = Reply {
        market,
        seq,
        bids: top.bids.iter().take(depth).map(level).collect(),
        asks: top.asks.iter().take(depth).map(level).collect(),
    };
    rmp_serde::to_vec_named(&reply).unwrap_or_default().into()
}

fn refusal(error: &str, message: String, retry_after: Option<Duration>) -> Bytes {
    let r = Refusal {
        error,
        message,
        retry_after_ms: retry_after.map(|d| d.as_millis() as u64 + 1),
    };
    rmp_serde::to_vec_named(&r).unwrap_or_default().into()
}

/// Answers book requests until `stop`.
pub(super) async fn serve_book_snapshots(
    driver: &Driver,
    book_seq: Arc<AtomicU64>,
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
        let max_payload = client.server_info().max_payload.max(64 * 1024);
        let mut requesters: HashMap<String, Bucket> = HashMap::new();
        let mut bytes = Bucket::new(
            BYTES_PER_SEC,
            BYTES_PER_SEC.max(max_payload as f64),
            Instant::now(),
        );
        let mut copy: Option<Copy> = None;
        loop {
            let request = tokio::select! {
                _ = stop.changed() => break,
                r = requests.next() => r,
            };
            let Some(request) = request else { break };
            let Some(reply) = request.reply else { continue };
            let now = Instant::now();
            let who = requester(reply.as_str());
            if !requesters.contains_key(who) && requesters.len() >= REQUESTERS_MAX {
                requesters.clear();
            }
            let limited = requesters
                .entry(who.to_string())
                .or_insert_with(|| Bucket::new(REQUESTS_PER_SEC, REQUESTS_PER_SEC, now))
                .take(1.0, now);
            let answer = if let Err(wait) = limited {
                refusal(
                    "rate_limited",
                    format!(
                        "at most {REQUESTS_PER_SEC} book requests a second per connection; keep the book with the deltas on the book subject and ask again only on a gap"
                    ),
                    Some(wait),
                )
            } else {
                match parse(&request.payload) {
                    Err(e) => refusal(
                        "bad_request",
                        format!(
                            "a book request is empty (the whole book) or {{\"depth\": N}} (the best N levels a side): {e}"
                        ),
                        None,
                    ),
                    Ok(Request { depth: Some(0) }) => {
                        let seq = book_seq.load(Ordering::Acquire);
                        rmp_serde::to_vec_named(&Reply {
                            market: &market,
                            seq,
                            bids: Vec::new(),
                            asks: Vec::new(),
                        })
                        .unwrap_or_default()
                        .into()
                    }
                    Ok(Request { depth }) => {
                        // A copy at least as new as the book when the request came.
                        let wanted = book_seq.load(Ordering::Acquire);
                        if copy.as_ref().is_none_or(|c| c.seq < wanted) {
                            let Ok((seq, top)) = addr.send(L2Book).await else {
                                break;
                            };
                            let Ok(spec) = addr.send(SpecOf).await else {
                                break;
                            };
                            copy = Some(Copy {
                                seq,
                                spec,
                                top: Arc::new(top),
                                full: None,
                            });
                        }
                        let Some(c) = copy.as_mut() else { break };
                        let encoded = match (depth, &c.full) {
                            (None, Some(full)) => full.clone(),
                            _ => {
                                let (m, seq, spec, top) =
                                    (market.clone(), c.seq, c.spec.clone(), c.top.clone());
                                let n = depth.unwrap_or(usize::MAX);
                                let Ok(encoded) = tokio::task::spawn_blocking(move || {
                                    encode_levels(&m, seq, &spec, &top, n)
                                })
                                .await
                                else {
                                    break;
                                };
                                if depth.is_none() {
                                    c.full = Some(encoded.clone());
                                }
                                encoded
                            }
                        };
                        if encoded.len() > max_payload {
                            refusal(
                                "too_large",
                                format!(
                                    "the book ({} bid and {} ask levels) is {} bytes, over NATS's max payload of {max_payload}: ask for the best levels with {{\"depth\": 1000}}",
                                    c.top.bids.len(),
                                    c.top.asks.len(),
                                    encoded.len()
                                ),
                                None,
                            )
                        } else if let Err(wait) = bytes.take(encoded.len() as f64, now) {
                            refusal(
                                "rate_limited",
                                format!(
                                    "{market} is sending its book to many requesters; ask again shortly, or keep the book with the deltas"
                                ),
                                Some(wait),
                            )
                        } else {
                            encoded
                        }
                    }
                }
            };
            let _ = client.publish(reply, answer).await;
        }
        let _ = requests.unsubscribe().await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 2.0, t0);
        assert!(b.take(1.0, t0).is_ok());
        assert!(b.take(1.0, t0).is_ok());
        let wait = b.take(1.0, t0).expect_err("empty");
        assert!(wait <= Duration::from_millis(101) && wait >= Duration::from_millis(99));
        assert!(b.take(1.0, t0 + Duration::from_millis(100)).is_ok());
        // Never more than the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(2.0, later).is_ok());
        assert!(b.take(1.0, later).is_err());
    }

    #[test]
    fn requests_are_empty_or_a_depth() {
        assert_eq!(parse(b"").expect("empty").depth, None);
        assert_eq!(parse(br#"{"depth": 5}"#).expect("json").depth, Some(5));
        let packed = rmp_serde::to_vec_named(&serde_json::json!({"depth": 0})).expect("msgpack");
        assert_eq!(parse(&packed).expect("msgpack").depth, Some(0));
        assert!(parse(br#"{"levels": 5}"#).is_err());
        assert!(parse(b"\xc1").is_err());
        assert_eq!(requester("_INBOX_alice.abc.17"), "_INBOX_alice.abc");
    }
}
