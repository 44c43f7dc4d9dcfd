//! The queries the history store answers (DESIGN section 11), in the queue group
//! `agora-history` (every `agora history` process answers, writer or standby):
//!
//! - `<prefix>.query.<ACCOUNT>.history` `{market?, from?, to?, limit?, before?}`: the
//!   account's orders (by creation time) and fills, newest first. A page holds at most `limit`
//!   items (1..=1000, default 100) of both together, cut between two timestamps; `next` is the
//!   `before` of the next page (nanoseconds: everything older than it).
//! - `<prefix>.history.order` (internal: the node's query front asks it for an order the books
//!   no longer hold) `{account, market, oid?, cid?}`.
//! - `<prefix>.query.trades.<MARKET>` `{from?, to?, limit?, before?}`: the tape, newest first;
//!   `next`/`before` is a trade id.
//! - `<prefix>.query.candles.<MARKET>` `{interval, from?, to?}`: `1m` candles as stored, `5m`,
//!   `1h`, `1d` made from them; at most 1,000 a reply (the newest of the range).
//! - `<prefix>.query.ticker.<MARKET>` `{}`: last price, the last 24 h, best bid and ask (from
//!   the market's own book, asked on `<prefix>.book.<MARKET>.snapshot`).
//!
//! Replies as the node's queries: MessagePack, or JSON for a JSON request; `{ok: false, error,
//! message}` when refused. This module must never write to the database.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::HistoryError;
use super::decimal::{Dec, with_scale};
use super::store::{Bind, Cell, Dialect, Store};
use crate::book::Account;
use crate::bus::Subjects;
use crate::query::{Format, read_body, refusal};
pub use crate::wire::query::{HistoryOrder, OrderFound, OrderFoundOwned, OrderLookup};

/// The queue group of the history processes.
pub const QUEUE_GROUP: &str = "agora-history";
/// Most items a page holds.
pub const LIMIT_MAX: usize = 1000;
/// Items a page holds unless the request says.
pub const LIMIT_DEFAULT: usize = 100;
/// Most candles a reply holds.
pub const CANDLES_MAX: usize = 1000;

const DAY_NS: i64 = 86_400_000_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryFill {
    pub market: String,
    pub trade_id: String,
    pub oid: u64,
    pub cid: Option<String>,
    pub side: String,
    pub liquidity: String,
    pub price: String,
    pub qty: String,
    pub ts: u64,
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryTrade {
    pub market: String,
    pub trade_id: String,
    pub price: String,
    pub qty: String,
    pub taker_side: String,
    pub ts: u64,
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candle {
    pub t: i64,
    pub open: String,
    pub high: String,
    pub low: String,
    pub close: String,
    pub volume: String,
    pub trades: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryRequest {
    #[serde(default)]
    market: Option<String>,
    #[serde(default)]
    from: Option<u64>,
    #[serde(default)]
    to: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    before: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TradesRequest {
    #[serde(default)]
    from: Option<u64>,
    #[serde(default)]
    to: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    before: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CandlesRequest {
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    from: Option<i64>,
    #[serde(default)]
    to: Option<i64>,
}

#[derive(Serialize)]
struct HistoryReply {
    ok: bool,
    orders: Vec<HistoryOrder>,
    fills: Vec<HistoryFill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<u64>,
}

#[derive(Serialize)]
struct TradesReply {
    ok: bool,
    trades: Vec<HistoryTrade>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

#[derive(Serialize)]
struct CandlesReply {
    ok: bool,
    market: String,
    interval: String,
    candles: Vec<Candle>,
}

#[derive(Serialize)]
struct TickerReply {
    ok: bool,
    market: String,
    last: Option<String>,
    open_24h: Option<String>,
    high_24h: Option<String>,
    low_24h: Option<String>,
    volume_24h: String,
    change_24h: Option<String>,
    trades_24h: u64,
    best_bid: Option<String>,
    best_ask: Option<String>,
    ts: u64,
}

/// Why a query was refused: `(error, message)`.
type Refused = (&'static str, String);

fn bad(message: impl Into<String>) -> Refused {
    ("bad_request", message.into())
}

fn unavailable(e: impl std::fmt::Display) -> Refused {
    ("unavailable", format!("the history database: {e}"))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn ns(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn cell_u64(c: Option<&Cell>) -> u64 {
    c.and_then(Cell::int)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0)
}

fn cell_text(c: Option<&Cell>) -> Option<String> {
    c.and_then(Cell::text).map(str::to_string)
}

/// The history's queries.
#[derive(Clone)]
pub struct HistoryQueries {
    client: async_nats::Client,
    subjects: Subjects,
    store: Store,
}

impl HistoryQueries {
    pub fn new(client: async_nats::Client, subjects: Subjects, store: Store) -> HistoryQueries {
        HistoryQueries {
            client,
            subjects,
            store,
        }
    }

    /// Subscribes (and makes sure the server has the subscriptions), then serves until `stop`.
    pub async fn listen(self, stop: watch::Receiver<bool>) -> Result<(), HistoryError> {
        let p = self.subjects.prefix().to_string();
        let subjects = [
            format!("{p}.query.*.history"),
            format!("{p}.history.order"),
            format!("{p}.query.trades.*"),
            format!("{p}.query.candles.*"),
            format!("{p}.query.ticker.*"),
        ];
        let responder = crate::bus::Responder::subscribe(&self.client, &subjects, QUEUE_GROUP)
            .await
            .map_err(|e| HistoryError::Other(e.to_string()))?;
        let this = Arc::new(self);
        actix_rt::spawn(responder.serve(stop, move |message| {
            let this = this.clone();
            async move {
                let started = Instant::now();
                let answer = this.answer(&message).await;
                metrics::histogram!("history_query_duration_us")
                    .record(started.elapsed().as_micros() as f64);
                answer
            }
        }));
        Ok(())
    }

    async fn answer(&self, message: &async_nats::Message) -> Bytes {
        let format = Format::of(message.headers.as_ref(), &message.payload);
        let skip = self.subjects.prefix().split('.').count();
        let tokens: Vec<&str> = message.subject.as_str().split('.').skip(skip).collect();
        let result = match tokens.as_slice() {
            ["history", "order"] => self.order(format, &message.payload).await,
            ["query", account, "history"] => self.history(format, account, &message.payload).await,
            ["query", "trades", market] => self.trades(format, market, &message.payload).await,
            ["query", "candles", market] => self.candles(format, market, &message.payload).await,
            ["query", "ticker", market] => self.ticker(format, market).await,
            _ => Err(bad(
                "ask on <prefix>.query.<ACCOUNT>.history, .query.trades.<MARKET>, .query.candles.<MARKET> or .query.ticker.<MARKET>",
            )),
        };
        match result {
            Ok(bytes) => bytes,
            Err((error, message)) => refusal(format, error, message),
        }
    }

    fn dialect(&self) -> Dialect {
        self.store.dialect
    }

    async fn decimals(&self, market: &str) -> Result<(u8, u8), Refused> {
        let rows = self
            .store
            .select(
                "SELECT price_decimals, size_decimals FROM history_progress WHERE market = ?",
                &[Bind::Text(market.to_string())],
            )
            .await
            .map_err(unavailable)?;
        let row = rows.first();
        let get = |i: usize| {
            row.and_then(|r| r.get(i))
                .and_then(Cell::int)
                .and_then(|v| u8::try_from(v).ok())
                .unwrap_or(0)
        };
        Ok((get(0), get(1)))
    }

    fn order_select(&self) -> String {
        self.store.order_select()
    }

    fn read_order(&self, r: &[Cell], decimals: &BTreeMap<String, (u8, u8)>) -> HistoryOrder {
        let market = cell_text(r.first()).unwrap_or_default();
        let (pd, sd) = decimals.get(&market).copied().unwrap_or((0, 0));
        let p = |i: usize| cell_text(r.get(i)).map(|s| with_scale(&s, pd));
        let q = |i: usize| cell_text(r.get(i)).map(|s| with_scale(&s, sd));
        HistoryOrder {
            oid: cell_u64(r.get(1)),
            account: cell_text(r.get(2)).unwrap_or_default(),
            cid: cell_text(r.get(3)),
            side: cell_text(r.get(4)),
            order_type: cell_text(r.get(5)),
            tif: cell_text(r.get(6)),
            display_qty: None,
            price: p(7),
            stop_price: p(8),
            qty: q(9),
            filled: q(10).unwrap_or_else(|| "0".into()),
            leaves: q(11).unwrap_or_else(|| "0".into()),
            avg_price: cell_text(r.get(13))
                .map(|s| with_scale(&s, pd + super::project::AVG_EXTRA_DECIMALS)),
            status: cell_text(r.get(14)).unwrap_or_default(),
            reason: cell_text(r.get(15)),
            created_seq: cell_u64(r.get(16)),
            last_seq: cell_u64(r.get(17)),
            ts: cell_u64(r.get(18)),
            updated_ts: cell_u64(r.get(19)),
            market,
        }
    }

    async fn decimals_of(
        &self,
        markets: impl Iterator<Item = String>,
    ) -> Result<BTreeMap<String, (u8, u8)>, Refused> {
        let mut out = BTreeMap::new();
        for m in markets {
            if let std::collections::btree_map::Entry::Vacant(e) = out.entry(m) {
                let d = self.decimals(e.key()).await?;
                e.insert(d);
            }
        }
        Ok(out)
    }

    async fn history(
        &self,
        format: Format,
        account: &str,
        payload: &[u8],
    ) -> Result<Bytes, Refused> {
        Account::new(account).map_err(|e| bad(e.describe("account", account)))?;
        let r: HistoryRequest = read_body(payload).map_err(|e| {
            bad(format!(
                "a history request is {{market?, from?, to?, limit?, before?}} (times in nanoseconds since the epoch): {e}"
            ))
        })?;
        if let Some(m) = &r.market {
            crate::book::spec::validate_symbol(m).map_err(|e| bad(e.to_string()))?;
        }
        let limit = r.limit.unwrap_or(LIMIT_DEFAULT).clamp(1, LIMIT_MAX);
        let from = ns(r.from.unwrap_or(0));
        let upper = ns(r
            .before
            .unwrap_or(u64::MAX)
            .min(r.to.map_or(u64::MAX, |t| t.saturating_add(1))));
        let mut binds = vec![Bind::Text(account.to_string())];
        let mut market_filter = String::new();
        if let Some(m) = &r.market {
            market_filter = " AND market = ?".into();
            binds.push(Bind::Text(m.clone()));
        }
        binds.push(Bind::Int(from));
        binds.push(Bind::Int(upper));
        let fetch = (limit + 1) as i64;
        let orders_sql = format!(
            "{} WHERE account = ?{market_filter} AND created_ts >= ? AND created_ts < ? ORDER BY created_ts DESC, market DESC, oid DESC LIMIT {fetch}",
            self.order_select()
        );
        let d = |c: &str| self.dialect().dec_text(c);
        let fills_select = format!(
            "SELECT market, trade_id, oid, cid, side, liquidity, {}, {}, ts, seq FROM fills",
            d("price"),
            d("qty")
        );
        let fills_sql = format!(
            "{fills_select} WHERE account = ?{market_filter} AND ts >= ? AND ts < ? ORDER BY ts DESC, market DESC, seq DESC LIMIT {fetch}"
        );
        let mut orders = self
            .store
            .select(&orders_sql, &binds)
            .await
            .map_err(unavailable)?;
        let mut fills = self
            .store
            .select(&fills_sql, &binds)
            .await
            .map_err(unavailable)?;
        // Cut the page between two timestamps: everything at the cut's timestamp is in it.
        let mut times: Vec<i64> = orders
            .iter()
            .map(|r| r.get(18).and_then(Cell::int).unwrap_or(0))
            .chain(
                fills
                    .iter()
                    .map(|r| r.get(8).and_then(Cell::int).unwrap_or(0)),
            )
            .collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        let mut next = None;
        if times.len() > limit {
            let cut = times[limit - 1];
            // Everything at the cut's own time, even beyond `limit`.
            let mut at = binds.clone();
            at.truncate(binds.len() - 2);
            at.push(Bind::Int(cut));
            let orders_at = format!(
                "{} WHERE account = ?{market_filter} AND created_ts = ? ORDER BY market DESC, oid DESC",
                self.order_select()
            );
            let fills_at = format!(
                "{fills_select} WHERE account = ?{market_filter} AND ts = ? ORDER BY market DESC, seq DESC"
            );
            orders.retain(|r| r.get(18).and_then(Cell::int).unwrap_or(0) > cut);
            fills.retain(|r| r.get(8).and_then(Cell::int).unwrap_or(0) > cut);
            orders.extend(
                self.store
                    .select(&orders_at, &at)
                    .await
                    .map_err(unavailable)?,
            );
            fills.extend(
                self.store
                    .select(&fills_at, &at)
                    .await
                    .map_err(unavailable)?,
            );
            next = u64::try_from(cut).ok();
        }
        let markets = orders
            .iter()
            .chain(fills.iter())
            .filter_map(|r| cell_text(r.first()));
        let decimals = self.decimals_of(markets).await?;
        let orders: Vec<HistoryOrder> = orders
            .iter()
            .map(|r| self.read_order(r, &decimals))
            .collect();
        let fills: Vec<HistoryFill> = fills
            .iter()
            .map(|r| {
                let market = cell_text(r.first()).unwrap_or_default();
                let (pd, sd) = decimals.get(&market).copied().unwrap_or((0, 0));
                HistoryFill {
                    trade_id: cell_text(r.get(1)).unwrap_or_default(),
                    oid: cell_u64(r.get(2)),
                    cid: cell_text(r.get(3)),
                    side: cell_text(r.get(4)).unwrap_or_default(),
                    liquidity: cell_text(r.get(5)).unwrap_or_default(),
                    price: with_scale(&cell_text(r.get(6)).unwrap_or_default(), pd),
                    qty: with_scale(&cell_text(r.get(7)).unwrap_or_default(), sd),
                    ts: cell_u64(r.get(8)),
                    seq: cell_u64(r.get(9)),
                    market,
                }
            })
            .collect();
        Ok(format.encode(&HistoryReply {
            ok: true,
            orders,
            fills,
            next,
        }))
    }

    /// One order of an account, open or closed, as the database has it.
    pub async fn lookup(&self, l: &OrderLookup) -> Result<Option<(HistoryOrder, u64)>, Refused> {
        Account::new(&l.account).map_err(|e| bad(e.describe("account", &l.account)))?;
        crate::book::spec::validate_symbol(&l.market).map_err(|e| bad(e.to_string()))?;
        let (filter, key) = match (l.oid, &l.cid) {
            (Some(oid), None) => (" AND oid = ?", Bind::Int(ns(oid))),
            (None, Some(cid)) => (" AND cid = ?", Bind::Text(cid.clone())),
            _ => return Err(bad("name the order with oid or with cid (one of them)")),
        };
        let sql = format!(
            "{} WHERE account = ? AND market = ?{filter} ORDER BY created_seq DESC LIMIT 1",
            self.order_select()
        );
        let rows = self
            .store
            .select(
                &sql,
                &[
                    Bind::Text(l.account.clone()),
                    Bind::Text(l.market.clone()),
                    key,
                ],
            )
            .await
            .map_err(unavailable)?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let decimals = self.decimals_of(std::iter::once(l.market.clone())).await?;
        let as_of = self
            .store
            .select(
                "SELECT last_seq FROM history_progress WHERE market = ?",
                &[Bind::Text(l.market.clone())],
            )
            .await
            .map_err(unavailable)?
            .first()
            .map_or(0, |r| cell_u64(r.first()));
        Ok(Some((self.read_order(row, &decimals), as_of)))
    }

    async fn order(&self, format: Format, payload: &[u8]) -> Result<Bytes, Refused> {
        let l: OrderLookup = read_body(payload).map_err(|e| {
            bad(format!(
                "an order lookup is {{account, market, oid or cid}}: {e}"
            ))
        })?;
        match self.lookup(&l).await? {
            Some((order, as_of)) => Ok(format.encode(&OrderFound {
                ok: true,
                order,
                as_of,
            })),
            None => Err((
                "not_found",
                format!(
                    "the history has no order of {} in {} with this {}",
                    l.account,
                    l.market,
                    if l.oid.is_some() { "oid" } else { "cid" }
                ),
            )),
        }
    }

    async fn trades(&self, format: Format, market: &str, payload: &[u8]) -> Result<Bytes, Refused> {
        crate::book::spec::validate_symbol(market).map_err(|e| bad(e.to_string()))?;
        let r: TradesRequest = read_body(payload).map_err(|e| {
            bad(format!(
                "a trades request is {{from?, to?, limit?, before?}} (before: a trade_id): {e}"
            ))
        })?;
        let limit = r.limit.unwrap_or(LIMIT_DEFAULT).clamp(1, LIMIT_MAX);
        let mut binds = vec![
            Bind::Text(market.to_string()),
            Bind::Int(ns(r.from.unwrap_or(0))),
            Bind::Int(ns(r.to.unwrap_or(u64::MAX >> 1))),
        ];
        let mut cursor = String::new();
        if let Some(before) = &r.before {
            let (seq, n) = before
                .split_once('-')
                .and_then(|(s, n)| Some((s.parse::<u64>().ok()?, n.parse::<u64>().ok()?)))
                .ok_or_else(|| bad(format!("before {before:?} is not a trade id (<seq>-<n>)")))?;
            cursor = " AND (seq < ? OR (seq = ? AND n < ?))".into();
            binds.extend([Bind::Int(ns(seq)), Bind::Int(ns(seq)), Bind::Int(ns(n))]);
        }
        let d = |c: &str| self.dialect().dec_text(c);
        let sql = format!(
            "SELECT trade_id, {}, {}, taker_side, ts, seq FROM trades WHERE market = ? AND ts >= ? AND ts <= ?{cursor} ORDER BY seq DESC, n DESC LIMIT {}",
            d("price"),
            d("qty"),
            limit + 1
        );
        let mut rows = self.store.select(&sql, &binds).await.map_err(unavailable)?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let (pd, sd) = self.decimals(market).await?;
        let trades: Vec<HistoryTrade> = rows
            .iter()
            .map(|r| HistoryTrade {
                market: market.to_string(),
                trade_id: cell_text(r.first()).unwrap_or_default(),
                price: with_scale(&cell_text(r.get(1)).unwrap_or_default(), pd),
                qty: with_scale(&cell_text(r.get(2)).unwrap_or_default(), sd),
                taker_side: cell_text(r.get(3)).unwrap_or_default(),
                ts: cell_u64(r.get(4)),
                seq: cell_u64(r.get(5)),
            })
            .collect();
        let next = more
            .then(|| trades.last().map(|t| t.trade_id.clone()))
            .flatten();
        Ok(format.encode(&TradesReply {
            ok: true,
            trades,
            next,
        }))
    }

    /// The stored `1m` candles of `market` with `from <= t < to`, oldest first.
    async fn minute_candles(
        &self,
        market: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<Candle>, Refused> {
        let d = |c: &str| self.dialect().dec_text(c);
        let sql = format!(
            "SELECT t, {}, {}, {}, {}, {}, trades FROM candles WHERE market = ? AND {} = '1m' AND t >= ? AND t < ? ORDER BY t",
            d("open"),
            d("high"),
            d("low"),
            d("close"),
            d("volume"),
            self.dialect().interval_col()
        );
        let rows = self
            .store
            .select(
                &sql,
                &[
                    Bind::Text(market.to_string()),
                    Bind::Int(from),
                    Bind::Int(to),
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| Candle {
                t: r.first().and_then(Cell::int).unwrap_or(0),
                open: cell_text(r.get(1)).unwrap_or_default(),
                high: cell_text(r.get(2)).unwrap_or_default(),
                low: cell_text(r.get(3)).unwrap_or_default(),
                close: cell_text(r.get(4)).unwrap_or_default(),
                volume: cell_text(r.get(5)).unwrap_or_default(),
                trades: cell_u64(r.get(6)),
            })
            .collect())
    }

    async fn candles(
        &self,
        format: Format,
        market: &str,
        payload: &[u8],
    ) -> Result<Bytes, Refused> {
        crate::book::spec::validate_symbol(market).map_err(|e| bad(e.to_string()))?;
        let r: CandlesRequest = read_body(payload).map_err(|e| {
            bad(format!("a candles request is {{interval: 1m|5m|1h|1d, from?, to?}} (nanoseconds since the epoch): {e}"))
        })?;
        let interval = r.interval.unwrap_or_else(|| "1m".into());
        let width = interval_ns(&interval)
            .ok_or_else(|| bad(format!("interval {interval:?}: use 1m, 5m, 1h or 1d")))?;
        let to = r.to.unwrap_or_else(now_ns);
        let to = to.saturating_add(width) - to.rem_euclid(width);
        let earliest = to.saturating_sub(width.saturating_mul(CANDLES_MAX as i64));
        let from = r.from.unwrap_or(earliest).max(earliest);
        let from = from - from.rem_euclid(width);
        let minutes = self.minute_candles(market, from, to).await?;
        let (pd, sd) = self.decimals(market).await?;
        let candles = aggregate(&minutes, width, pd, sd);
        Ok(format.encode(&CandlesReply {
            ok: true,
            market: market.to_string(),
            interval,
            candles,
        }))
    }

    async fn ticker(&self, format: Format, market: &str) -> Result<Bytes, Refused> {
        crate::book::spec::validate_symbol(market).map_err(|e| bad(e.to_string()))?;
        let now = now_ns();
        let (pd, sd) = self.decimals(market).await?;
        let day = self.minute_candles(market, now - DAY_NS, now + 1).await?;
        let d = |c: &str| self.dialect().dec_text(c);
        let last_sql = format!(
            "SELECT {} FROM trades WHERE market = ? ORDER BY seq DESC, n DESC LIMIT 1",
            d("price")
        );
        let last = self
            .store
            .select(&last_sql, &[Bind::Text(market.to_string())])
            .await
            .map_err(unavailable)?
            .first()
            .and_then(|r| cell_text(r.first()))
            .map(|s| with_scale(&s, pd));
        let summary = aggregate(&day, i64::MAX, pd, sd).into_iter().next();
        let (open, high, low, volume, trades) = match &summary {
            Some(c) => (
                Some(c.open.clone()),
                Some(c.high.clone()),
                Some(c.low.clone()),
                c.volume.clone(),
                c.trades,
            ),
            None => (None, None, None, with_scale("0", sd), 0),
        };
        let change = match (&last, &open) {
            (Some(l), Some(o)) => signed_diff(l, o, pd),
            _ => None,
        };
        let (best_bid, best_ask) = self.top_of_book(market).await;
        Ok(format.encode(&TickerReply {
            ok: true,
            market: market.to_string(),
            last,
            open_24h: open,
            high_24h: high,
            low_24h: low,
            volume_24h: volume,
            change_24h: change,
            trades_24h: trades,
            best_bid,
            best_ask,
            ts: u64::try_from(now).unwrap_or(0),
        }))
    }

    /// The best bid and ask from the market's own book (none when it does not answer in 1 s).
    async fn top_of_book(&self, market: &str) -> (Option<String>, Option<String>) {
        #[derive(Deserialize)]
        struct Level {
            price: String,
        }
        #[derive(Deserialize)]
        struct Book {
            #[serde(default)]
            bids: Vec<Level>,
            #[serde(default)]
            asks: Vec<Level>,
        }
        let asked = self.client.request(
            self.subjects.book_snapshot(market),
            Bytes::from_static(b"{\"depth\":1}"),
        );
        match tokio::time::timeout(Duration::from_secs(1), asked).await {
            Ok(Ok(reply)) => match rmp_serde::from_slice::<Book>(&reply.payload) {
                Ok(b) => (
                    b.bids.into_iter().next().map(|l| l.price),
                    b.asks.into_iter().next().map(|l| l.price),
                ),
                Err(_) => (None, None),
            },
            _ => (None, None),
        }
    }
}

/// Nanoseconds in a candle interval.
pub fn interval_ns(interval: &str) -> Option<i64> {
    Some(match interval {
        "1m" => 60_000_000_000,
        "5m" => 300_000_000_000,
        "1h" => 3_600_000_000_000,
        "1d" => DAY_NS,
        _ => return None,
    })
}

/// Folds one-minute candles (oldest first) into candles `width` wide (`i64::MAX`: one).
pub fn aggregate(minutes: &[Candle], width: i64, pd: u8, sd: u8) -> Vec<Candle> {
    let mut out: Vec<(Candle, Dec, Dec, Dec)> = Vec::new();
    for m in minutes {
        let (Some(high), Some(low), Some(volume)) = (
            Dec::parse(m.high.trim()).or_else(|| Dec::parse(&with_scale(&m.high, pd))),
            Dec::parse(m.low.trim()).or_else(|| Dec::parse(&with_scale(&m.low, pd))),
            Dec::parse(m.volume.trim()).or_else(|| Dec::parse(&with_scale(&m.volume, sd))),
        ) else {
            continue;
        };
        let t = if width == i64::MAX {
            m.t
        } else {
            m.t - m.t.rem_euclid(width)
        };
        match out.last_mut() {
            Some((c, h, l, v)) if width == i64::MAX || c.t == t => {
                *h = (*h).max(high);
                *l = (*l).min(low);
                *v = v.checked_add(volume).unwrap_or(*v);
                c.close = m.close.clone();
                c.trades += m.trades;
            }
            _ => out.push((
                Candle {
                    t,
                    open: m.open.clone(),
                    high: String::new(),
                    low: String::new(),
                    close: m.close.clone(),
                    volume: String::new(),
                    trades: m.trades,
                },
                high,
                low,
                volume,
            )),
        }
    }
    out.into_iter()
        .map(|(mut c, h, l, v)| {
            c.open = with_scale(&c.open, pd);
            c.close = with_scale(&c.close, pd);
            c.high = with_scale(&h.to_string(), pd);
            c.low = with_scale(&l.to_string(), pd);
            c.volume = with_scale(&v.to_string(), sd);
            c
        })
        .collect()
}

/// `a - b` as a signed decimal string with `scale` decimals.
fn signed_diff(a: &str, b: &str, scale: u8) -> Option<String> {
    let (a, b) = (
        Dec::parse(a)?.rescale(scale)?,
        Dec::parse(b)?.rescale(scale)?,
    );
    if a >= b {
        Some(a.checked_sub(b)?.to_string())
    } else {
        Some(format!("-{}", b.checked_sub(a)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: i64, o: &str, h: &str, l: &str, c: &str, v: &str, n: u64) -> Candle {
        Candle {
            t,
            open: o.into(),
            high: h.into(),
            low: l.into(),
            close: c.into(),
            volume: v.into(),
            trades: n,
        }
    }

    #[test]
    fn minutes_fold_into_wider_candles() {
        let min = 60_000_000_000;
        let minutes = vec![
            m(0, "10.00", "12.00", "9.00", "11.00", "1.5", 2),
            m(min, "11.00", "13.50", "10.00", "10.50", "2", 1),
            m(5 * min, "10.50", "10.50", "8.00", "9.00", "0.25", 1),
        ];
        let five = aggregate(&minutes, 5 * min, 2, 2);
        assert_eq!(
            five,
            vec![
                m(0, "10.00", "13.50", "9.00", "10.50", "3.50", 3),
                m(5 * min, "10.50", "10.50", "8.00", "9.00", "0.25", 1),
            ]
        );
        let all = aggregate(&minutes, i64::MAX, 2, 2);
        assert_eq!(all, vec![m(0, "10.00", "13.50", "8.00", "9.00", "3.75", 4)]);
    }

    #[test]
    fn changes_are_signed() {
        assert_eq!(signed_diff("101.50", "100.00", 2).as_deref(), Some("1.50"));
        assert_eq!(signed_diff("99.00", "100.00", 2).as_deref(), Some("-1.00"));
        assert_eq!(signed_diff("100", "100", 0).as_deref(), Some("0"));
    }
}
