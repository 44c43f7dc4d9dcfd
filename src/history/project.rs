//! The projection: journal messages in, the rows they change out. Pure (no I/O): the writer
//! hands it the rows it needs from the database first (`Needs`), then `apply`s a run of
//! journal messages and writes the resulting `Changes` in one transaction.
//!
//! An order's row follows its events: `accepted` opens it; each `trade` adds to `filled` and
//! the notional, and sets `leaves`; a `cancelled` with nothing left closes it `cancelled`
//! (`expired` for a gtd order's expiry) with the cancel reason; an `amended` sets price,
//! quantity and leaves; a `rejected` new order is a row of its own, `rejected` with the
//! reason. Each trade gives one `trades` row and one `fills` row per side, and updates its
//! market's one-minute candle. This module must never decide anything the journal did not say.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Deserialize;

use super::decimal::Dec;

/// How many more decimals than its prices an order's average price gets.
pub const AVG_EXTRA_DECIMALS: u8 = 8;

/// Nanoseconds in a candle of the stored interval.
pub const MINUTE_NS: i64 = 60_000_000_000;

// ----- the journal, as the engine writes it (docs/protocol.md) -------------------------------

/// One journal message: a batch of a market's commands and every event they caused.
#[derive(Debug, Deserialize)]
pub struct JournalBatch {
    pub market: String,
    pub first_seq: u64,
    pub last_seq: u64,
    #[serde(default)]
    pub events: Vec<JournalEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JournalEvent {
    Accepted {
        seq: u64,
        ts: u64,
        oid: u64,
        cid: Option<String>,
        account: String,
        side: String,
        order_type: String,
        tif: String,
        price: Option<String>,
        qty: String,
        stop_price: Option<String>,
    },
    Rejected {
        seq: u64,
        ts: u64,
        op: Option<String>,
        oid: Option<u64>,
        cid: Option<String>,
        account: Option<String>,
        reason: String,
    },
    Trade {
        seq: u64,
        ts: u64,
        trade_id: String,
        price: String,
        qty: String,
        taker_side: String,
        maker_oid: u64,
        maker_cid: Option<String>,
        maker_account: String,
        maker_leaves: String,
        taker_oid: u64,
        taker_cid: Option<String>,
        taker_account: String,
        taker_leaves: String,
    },
    Cancelled {
        seq: u64,
        ts: u64,
        oid: u64,
        reason: String,
        leaves: String,
    },
    Amended {
        seq: u64,
        ts: u64,
        oid: u64,
        price: String,
        qty: String,
        leaves: String,
    },
    Triggered {
        seq: u64,
        ts: u64,
        oid: u64,
    },
    /// A type this build does not know (a newer engine's): nothing to project.
    #[serde(other)]
    Other,
}

impl JournalBatch {
    /// Reads a journal message (MessagePack, as the engine publishes it; JSON too).
    pub fn decode(payload: &[u8]) -> Result<JournalBatch, String> {
        if payload.first() == Some(&b'{') {
            serde_json::from_slice(payload).map_err(|e| e.to_string())
        } else {
            rmp_serde::from_slice(payload).map_err(|e| e.to_string())
        }
    }
}

// ----- rows ------------------------------------------------------------------------------------

/// An order as the `orders` table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderRow {
    pub market: String,
    pub oid: u64,
    pub account: String,
    pub cid: Option<String>,
    pub side: Option<String>,
    pub order_type: Option<String>,
    pub tif: Option<String>,
    pub price: Option<Dec>,
    pub stop_price: Option<Dec>,
    pub qty: Option<Dec>,
    pub filled: Dec,
    pub leaves: Dec,
    /// Sum of price × quantity over the order's fills, exact.
    pub notional: Dec,
    pub status: Status,
    pub reason: Option<String>,
    pub created_seq: u64,
    pub updated_seq: u64,
    pub created_ts: u64,
    pub updated_ts: u64,
}

impl OrderRow {
    /// `notional / filled` with `AVG_EXTRA_DECIMALS` more decimals than the market's prices
    /// (rounded half up); `None` before the first fill.
    pub fn avg_price(&self, price_decimals: u8) -> Option<Dec> {
        self.notional.div_round(
            self.filled,
            price_decimals.saturating_add(AVG_EXTRA_DECIMALS),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Open,
    Filled,
    Cancelled,
    Expired,
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Filled => "filled",
            Status::Cancelled => "cancelled",
            Status::Expired => "expired",
            Status::Rejected => "rejected",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        Some(match text {
            "open" => Status::Open,
            "filled" => Status::Filled,
            "cancelled" => Status::Cancelled,
            "expired" => Status::Expired,
            "rejected" => Status::Rejected,
            _ => return None,
        })
    }
}

/// One side of one trade (`fills`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FillRow {
    pub market: String,
    pub trade_id: String,
    pub account: String,
    pub liquidity: &'static str,
    pub oid: u64,
    pub cid: Option<String>,
    pub side: String,
    pub price: Dec,
    pub qty: Dec,
    pub ts: u64,
    pub seq: u64,
}

/// One trade of the public tape (`trades`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TradeRow {
    pub market: String,
    pub trade_id: String,
    /// The trade's place among its command's fills (1, 2, ...): with `seq`, the tape's order.
    pub n: u32,
    pub price: Dec,
    pub qty: Dec,
    pub taker_side: String,
    pub ts: u64,
    pub seq: u64,
}

/// A one-minute candle (`candles`, interval `1m`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CandleRow {
    pub market: String,
    /// Start of the minute, nanoseconds since the epoch.
    pub t: i64,
    pub open: Dec,
    pub high: Dec,
    pub low: Dec,
    pub close: Dec,
    pub volume: Dec,
    pub trades: u64,
}

/// How far a market's journal is written (`history_progress`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub last_seq: u64,
    /// The `EVENTS` stream sequence of the last journal message written.
    pub events_seq: u64,
    pub price_decimals: Option<u8>,
    pub size_decimals: Option<u8>,
}

/// What one transaction writes: each key once, in its final state.
#[derive(Debug, Default)]
pub struct Changes {
    pub orders: BTreeMap<(String, u64), OrderRow>,
    pub fills: Vec<FillRow>,
    pub trades: Vec<TradeRow>,
    pub candles: BTreeMap<(String, i64), CandleRow>,
    /// Per market: the progress this transaction writes, and the `events_seq` it expects to
    /// find (`None`: the market has no row yet). A mismatch means another writer got there.
    pub progress: BTreeMap<String, (Progress, Option<u64>)>,
    /// Journal messages that could not be read (logged; their sequence still counts).
    pub unreadable: u64,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.progress.is_empty()
    }

    pub fn rows(&self) -> usize {
        self.orders.len() + self.fills.len() + self.trades.len() + self.candles.len()
    }

    /// These changes as at most `parts` changes that share no market (every row and progress
    /// row of a market in one part), balanced by rows, largest markets first. Parts can be
    /// written by concurrent transactions: no two touch the same row.
    pub fn split(self, parts: usize) -> Vec<Changes> {
        if parts <= 1 || self.progress.len() <= 1 {
            return vec![self];
        }
        let mut rows: HashMap<&str, usize> = HashMap::new();
        for (market, _) in self.orders.keys() {
            *rows.entry(market).or_default() += 1;
        }
        for f in &self.fills {
            *rows.entry(&f.market).or_default() += 1;
        }
        for t in &self.trades {
            *rows.entry(&t.market).or_default() += 1;
        }
        for (market, _) in self.candles.keys() {
            *rows.entry(market).or_default() += 1;
        }
        let mut markets: Vec<(&str, usize)> = self
            .progress
            .keys()
            .map(|m| (m.as_str(), rows.get(m.as_str()).copied().unwrap_or(0) + 1))
            .collect();
        markets.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let n = parts.min(markets.len());
        let mut load = vec![0usize; n];
        let mut part_of: HashMap<String, usize> = HashMap::new();
        for (market, r) in markets {
            let (i, _) = load
                .iter()
                .enumerate()
                .min_by_key(|(_, l)| **l)
                .unwrap_or((0, &0));
            load[i] += r;
            part_of.insert(market.to_string(), i);
        }
        let mut out: Vec<Changes> = (0..n).map(|_| Changes::default()).collect();
        let at = |market: &str| part_of.get(market).copied().unwrap_or(0);
        for (key, row) in self.orders {
            out[at(&key.0)].orders.insert(key, row);
        }
        for f in self.fills {
            out[at(&f.market)].fills.push(f);
        }
        for t in self.trades {
            out[at(&t.market)].trades.push(t);
        }
        for (key, c) in self.candles {
            out[at(&key.0)].candles.insert(key, c);
        }
        for (market, p) in self.progress {
            out[at(&market)].progress.insert(market, p);
        }
        out[0].unreadable = self.unreadable;
        out
    }
}

/// Rows the projection must see before it can apply a run of messages.
#[derive(Debug, Default)]
pub struct Needs {
    pub orders: BTreeMap<String, BTreeSet<u64>>,
    pub candles: BTreeSet<(String, i64)>,
}

/// The projection's memory: progress of every market, the rows of open orders it has seen,
/// and each market's latest candle.
#[derive(Debug, Default)]
pub struct Projector {
    pub progress: HashMap<String, Progress>,
    orders: HashMap<(String, u64), OrderRow>,
    /// Orders the database was asked for and does not have (a journal trimmed by age).
    absent: BTreeSet<(String, u64)>,
    /// Candles by (market, minute): the latest of each market, and any the next messages
    /// need; `candles_known` also holds those the database does not have.
    candles: HashMap<(String, i64), CandleRow>,
    candles_known: BTreeSet<(String, i64)>,
}

/// A journal message with where it sits in `EVENTS`.
pub struct Message {
    pub events_seq: u64,
    pub batch: Result<JournalBatch, String>,
}

fn dec(text: &str, what: &str) -> Result<Dec, String> {
    Dec::parse(text).ok_or_else(|| format!("{what} {text:?} is not a decimal"))
}

fn trade_minute(ts: u64) -> i64 {
    let ts = i64::try_from(ts).unwrap_or(i64::MAX);
    ts - ts.rem_euclid(MINUTE_NS)
}

impl Projector {
    pub fn new(progress: HashMap<String, Progress>) -> Projector {
        Projector {
            progress,
            ..Projector::default()
        }
    }

    /// Whether the message at `events_seq` for `market` is written already.
    pub fn written(&self, market: &str, events_seq: u64) -> bool {
        self.progress
            .get(market)
            .is_some_and(|p| events_seq <= p.events_seq)
    }

    /// The rows `apply` will need that it does not hold.
    pub fn needs(&self, messages: &[Message]) -> Needs {
        let mut needs = Needs::default();
        let mut opened: BTreeSet<(String, u64)> = BTreeSet::new();
        for m in messages {
            let Ok(b) = &m.batch else { continue };
            // A message written already is skipped by `apply`: the orders it opens are not
            // opened again, so they are read like any other.
            if self.written(&b.market, m.events_seq) {
                continue;
            }
            for e in &b.events {
                let mut wanted: [Option<u64>; 2] = [None, None];
                match e {
                    JournalEvent::Accepted { oid, .. } => {
                        opened.insert((b.market.clone(), *oid));
                    }
                    JournalEvent::Trade {
                        maker_oid,
                        taker_oid,
                        ts,
                        ..
                    } => {
                        wanted = [Some(*maker_oid), Some(*taker_oid)];
                        let key = (b.market.clone(), trade_minute(*ts));
                        if !self.candles_known.contains(&key) {
                            needs.candles.insert(key);
                        }
                    }
                    JournalEvent::Cancelled { oid, .. }
                    | JournalEvent::Amended { oid, .. }
                    | JournalEvent::Triggered { oid, .. } => wanted[0] = Some(*oid),
                    _ => {}
                }
                for oid in wanted.into_iter().flatten() {
                    let key = (b.market.clone(), oid);
                    if !opened.contains(&key)
                        && !self.orders.contains_key(&key)
                        && !self.absent.contains(&key)
                    {
                        needs
                            .orders
                            .entry(b.market.clone())
                            .or_default()
                            .insert(oid);
                    }
                }
            }
        }
        needs
    }

    /// Takes what the database answered for `needs`: the orders' rows and the candles it has.
    pub fn provide(&mut self, needs: &Needs, orders: Vec<OrderRow>, candles: Vec<CandleRow>) {
        for row in orders {
            self.orders.insert((row.market.clone(), row.oid), row);
        }
        for (market, oids) in &needs.orders {
            for oid in oids {
                let key = (market.clone(), *oid);
                if !self.orders.contains_key(&key) {
                    self.absent.insert(key);
                }
            }
        }
        for c in candles {
            self.candles.insert((c.market.clone(), c.t), c);
        }
        self.candles_known.extend(needs.candles.iter().cloned());
    }

    /// Applies a run of messages (in `EVENTS` order) and returns what to write. Messages at or
    /// below a market's progress are skipped (a redelivery). The projector's memory moves on
    /// at once: if the write fails, write the same `Changes` again; if the writer loses its
    /// role, drop the projector.
    pub fn apply(&mut self, messages: Vec<Message>) -> Changes {
        let mut ch = Changes::default();
        for m in messages {
            let batch = match m.batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(
                        events_seq = m.events_seq,
                        "journal message {} cannot be read and is skipped: {e}",
                        m.events_seq
                    );
                    ch.unreadable += 1;
                    continue;
                }
            };
            if self.written(&batch.market, m.events_seq) {
                continue;
            }
            let market = batch.market.clone();
            let expected = self.progress.get(&market).map(|p| p.events_seq);
            let mut progress = self.progress.get(&market).cloned().unwrap_or(Progress {
                last_seq: 0,
                events_seq: 0,
                price_decimals: None,
                size_decimals: None,
            });
            for e in batch.events {
                if let Err(why) = self.event(&market, e, &mut ch, &mut progress) {
                    tracing::error!(
                        market = %market,
                        events_seq = m.events_seq,
                        "journal message {} of {market}: an event is skipped: {why}",
                        m.events_seq
                    );
                    ch.unreadable += 1;
                }
            }
            progress.last_seq = batch.last_seq.max(progress.last_seq);
            progress.events_seq = m.events_seq;
            ch.progress
                .entry(market.clone())
                .and_modify(|(p, _)| *p = progress.clone())
                .or_insert((progress.clone(), expected));
            self.progress.insert(market, progress);
        }
        // Closed orders leave the projector's memory (they are in `ch`, to be written), and
        // of the candles only each market's latest stays.
        self.orders.retain(|_, o| o.status == Status::Open);
        let mut latest: HashMap<&str, i64> = HashMap::new();
        for (m, t) in self.candles.keys() {
            let e = latest.entry(m.as_str()).or_insert(*t);
            *e = (*e).max(*t);
        }
        let keep: BTreeSet<(String, i64)> = latest
            .into_iter()
            .map(|(m, t)| (m.to_string(), t))
            .collect();
        self.candles.retain(|k, _| keep.contains(k));
        self.candles_known.retain(|k| keep.contains(k));
        ch
    }

    fn touch(
        &mut self,
        market: &str,
        oid: u64,
        seq: u64,
        ts: u64,
        ch: &mut Changes,
        f: impl FnOnce(&mut OrderRow) -> Result<(), String>,
    ) -> Result<(), String> {
        let key = (market.to_string(), oid);
        let Some(row) = self.orders.get_mut(&key) else {
            // The journal refers to an order it never opened (it was trimmed by age before
            // this store began): its fills and trades are still written.
            return Ok(());
        };
        f(row)?;
        row.updated_seq = seq;
        row.updated_ts = ts;
        ch.orders.insert(key, row.clone());
        Ok(())
    }

    fn event(
        &mut self,
        market: &str,
        e: JournalEvent,
        ch: &mut Changes,
        progress: &mut Progress,
    ) -> Result<(), String> {
        let learn_price = |p: &mut Progress, d: Dec| {
            p.price_decimals.get_or_insert(d.scale());
        };
        let learn_size = |p: &mut Progress, d: Dec| {
            p.size_decimals.get_or_insert(d.scale());
        };
        match e {
            JournalEvent::Accepted {
                seq,
                ts,
                oid,
                cid,
                account,
                side,
                order_type,
                tif,
                price,
                qty,
                stop_price,
            } => {
                let qty = dec(&qty, "qty")?;
                let price = price.as_deref().map(|p| dec(p, "price")).transpose()?;
                let stop_price = stop_price
                    .as_deref()
                    .map(|p| dec(p, "stop_price"))
                    .transpose()?;
                learn_size(progress, qty);
                if let Some(p) = price.or(stop_price) {
                    learn_price(progress, p);
                }
                let row = OrderRow {
                    market: market.to_string(),
                    oid,
                    account,
                    cid,
                    side: Some(side),
                    order_type: Some(order_type),
                    tif: Some(tif),
                    price,
                    stop_price,
                    qty: Some(qty),
                    filled: Dec::zero(qty.scale()),
                    leaves: qty,
                    notional: Dec::zero(0),
                    status: Status::Open,
                    reason: None,
                    created_seq: seq,
                    updated_seq: seq,
                    created_ts: ts,
                    updated_ts: ts,
                };
                let key = (market.to_string(), oid);
                self.absent.remove(&key);
                ch.orders.insert(key.clone(), row.clone());
                self.orders.insert(key, row);
            }
            JournalEvent::Rejected {
                seq,
                ts,
                op,
                oid,
                cid,
                account,
                reason,
            } => {
                // A refused new order is a row of its own; a refused cancel or amend changes
                // nothing, and a message with no readable account belongs to no one.
                if let (Some("new"), Some(oid), Some(account)) = (op.as_deref(), oid, account) {
                    let row = OrderRow {
                        market: market.to_string(),
                        oid,
                        account,
                        cid,
                        side: None,
                        order_type: None,
                        tif: None,
                        price: None,
                        stop_price: None,
                        qty: None,
                        filled: Dec::zero(0),
                        leaves: Dec::zero(0),
                        notional: Dec::zero(0),
                        status: Status::Rejected,
                        reason: Some(reason),
                        created_seq: seq,
                        updated_seq: seq,
                        created_ts: ts,
                        updated_ts: ts,
                    };
                    ch.orders.insert((market.to_string(), oid), row);
                }
            }
            JournalEvent::Trade {
                seq,
                ts,
                trade_id,
                price,
                qty,
                taker_side,
                maker_oid,
                maker_cid,
                maker_account,
                maker_leaves,
                taker_oid,
                taker_cid,
                taker_account,
                taker_leaves,
            } => {
                let price = dec(&price, "price")?;
                let qty = dec(&qty, "qty")?;
                let maker_leaves = dec(&maker_leaves, "maker_leaves")?;
                let taker_leaves = dec(&taker_leaves, "taker_leaves")?;
                learn_price(progress, price);
                learn_size(progress, qty);
                let n = trade_id
                    .rsplit_once('-')
                    .and_then(|(_, n)| n.parse().ok())
                    .ok_or_else(|| format!("trade_id {trade_id:?} is not <seq>-<n>"))?;
                let maker_side = match taker_side.as_str() {
                    "buy" => "sell",
                    "sell" => "buy",
                    other => return Err(format!("taker_side {other:?} is not buy or sell")),
                };
                let notional = price
                    .checked_mul(qty)
                    .ok_or("price × qty overflows 128 bits")?;
                for (oid, leaves) in [(maker_oid, maker_leaves), (taker_oid, taker_leaves)] {
                    self.touch(market, oid, seq, ts, ch, |o| {
                        o.filled = o.filled.checked_add(qty).ok_or("filled overflows")?;
                        o.notional = o
                            .notional
                            .checked_add(notional)
                            .ok_or("notional overflows")?;
                        o.leaves = leaves;
                        if leaves.is_zero() {
                            o.status = Status::Filled;
                            o.reason = None;
                        }
                        Ok(())
                    })?;
                }
                for (account, liquidity, oid, cid, side) in [
                    (maker_account, "maker", maker_oid, maker_cid, maker_side),
                    (
                        taker_account,
                        "taker",
                        taker_oid,
                        taker_cid,
                        taker_side.as_str(),
                    ),
                ] {
                    ch.fills.push(FillRow {
                        market: market.to_string(),
                        trade_id: trade_id.clone(),
                        account,
                        liquidity,
                        oid,
                        cid,
                        side: side.to_string(),
                        price,
                        qty,
                        ts,
                        seq,
                    });
                }
                ch.trades.push(TradeRow {
                    market: market.to_string(),
                    trade_id,
                    n,
                    price,
                    qty,
                    taker_side,
                    ts,
                    seq,
                });
                self.candle(market, ts, price, qty, ch)?;
            }
            JournalEvent::Cancelled {
                seq,
                ts,
                oid,
                reason,
                leaves,
            } => {
                let leaves = dec(&leaves, "leaves")?;
                self.touch(market, oid, seq, ts, ch, |o| {
                    o.leaves = leaves;
                    if leaves.is_zero() {
                        o.status = if reason == "expired" {
                            Status::Expired
                        } else {
                            Status::Cancelled
                        };
                        o.reason = Some(reason);
                    }
                    Ok(())
                })?;
            }
            JournalEvent::Amended {
                seq,
                ts,
                oid,
                price,
                qty,
                leaves,
            } => {
                let price = dec(&price, "price")?;
                let qty = dec(&qty, "qty")?;
                let leaves = dec(&leaves, "leaves")?;
                self.touch(market, oid, seq, ts, ch, |o| {
                    o.price = Some(price);
                    o.qty = Some(qty);
                    o.leaves = leaves;
                    if leaves.is_zero() {
                        // A total at or below what is filled: everything asked for is filled.
                        o.status = Status::Filled;
                    }
                    Ok(())
                })?;
            }
            JournalEvent::Triggered { seq, ts, oid } => {
                self.touch(market, oid, seq, ts, ch, |_| Ok(()))?;
            }
            JournalEvent::Other => {}
        }
        Ok(())
    }

    fn candle(
        &mut self,
        market: &str,
        ts: u64,
        price: Dec,
        qty: Dec,
        ch: &mut Changes,
    ) -> Result<(), String> {
        let key = (market.to_string(), trade_minute(ts));
        let candle = match self.candles.get(&key).cloned() {
            Some(mut c) => {
                c.high = c.high.max(price);
                c.low = c.low.min(price);
                c.close = price;
                c.volume = c.volume.checked_add(qty).ok_or("volume overflows")?;
                c.trades += 1;
                c
            }
            None => CandleRow {
                market: market.to_string(),
                t: key.1,
                open: price,
                high: price,
                low: price,
                close: price,
                volume: qty,
                trades: 1,
            },
        };
        self.candles_known.insert(key.clone());
        self.candles.insert(key.clone(), candle.clone());
        ch.candles.insert(key, candle);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::{Command, OrderBook};
    use crate::wire::EventView;
    use crate::workload::{self, FlowParams, Rng};

    #[derive(serde::Serialize)]
    struct Journal<'a> {
        market: &'a str,
        first_seq: u64,
        last_seq: u64,
        events: Vec<EventView<'a>>,
    }

    /// A generated flow with every order type and rule, cut into journal messages of 1 to 40
    /// commands, as the engine would publish them; and the book after it.
    fn journal(seed: u64, commands: usize) -> (Vec<Vec<u8>>, OrderBook, usize) {
        journal_named(seed, commands, None)
    }

    /// `journal`, its messages naming `market` instead of the flow's own symbol.
    fn journal_named(
        seed: u64,
        commands: usize,
        market: Option<&str>,
    ) -> (Vec<Vec<u8>>, OrderBook, usize) {
        let w = workload::generate(&FlowParams {
            full_mix: true,
            ..FlowParams::small_book(seed, commands)
        });
        let mut book = OrderBook::with_capacity(w.spec.clone(), 200_000);
        let all: Vec<&Command> = w.prefill.iter().chain(w.commands.iter()).collect();
        let mut rng = Rng::new(seed);
        let (mut out, mut trades, mut i) = (Vec::new(), 0, 0);
        let mut events = Vec::new();
        while i < all.len() {
            let mut end = (i + 1 + rng.below(40) as usize).min(all.len());
            while end < all.len() && all[end].seq == all[end - 1].seq {
                end += 1;
            }
            let mut batch = Vec::new();
            for c in &all[i..end] {
                events.clear();
                book.apply(c, &mut events);
                batch.append(&mut events);
            }
            trades += batch
                .iter()
                .filter(|e| matches!(e, crate::book::Event::Trade(_)))
                .count();
            let j = Journal {
                market: market.unwrap_or(&w.spec.symbol),
                first_seq: all[i].seq,
                last_seq: all[end - 1].seq,
                events: batch.iter().map(|e| EventView::new(&w.spec, e)).collect(),
            };
            out.push(rmp_serde::to_vec_named(&j).expect("encode"));
            i = end;
        }
        (out, book, trades)
    }

    /// The tables as a database would hold them: rows upserted, fills and trades inserted.
    #[derive(Default)]
    struct Tables {
        orders: BTreeMap<(String, u64), OrderRow>,
        fills: Vec<FillRow>,
        trades: Vec<TradeRow>,
        candles: BTreeMap<(String, i64), CandleRow>,
        progress: HashMap<String, Progress>,
    }

    impl Tables {
        fn write(&mut self, ch: Changes) {
            for (market, (p, expected)) in ch.progress {
                assert_eq!(self.progress.get(&market).map(|p| p.events_seq), expected);
                self.progress.insert(market, p);
            }
            self.orders.extend(ch.orders);
            self.fills.extend(ch.fills);
            self.trades.extend(ch.trades);
            self.candles.extend(ch.candles);
        }

        fn provide(&self, p: &mut Projector, run: &[Message]) {
            let needs = p.needs(run);
            let orders = needs
                .orders
                .iter()
                .flat_map(|(m, oids)| oids.iter().map(move |o| (m.clone(), *o)))
                .filter_map(|k| self.orders.get(&k).cloned())
                .collect();
            let candles = needs
                .candles
                .iter()
                .filter_map(|k| self.candles.get(k).cloned())
                .collect();
            p.provide(&needs, orders, candles);
        }
    }

    fn dec_of(text: String) -> Dec {
        Dec::parse(&text).expect("decimal")
    }

    #[test]
    fn the_tables_equal_the_book_however_the_journal_is_cut_redelivered_and_restarted() {
        let (journal, book, trade_count) = journal(11, 30_000);
        let spec = book.spec().clone();
        let mut rng = Rng::new(5);
        let mut tables = Tables::default();
        let mut projector = Projector::new(HashMap::new());
        let mut at = 0;
        while at < journal.len() {
            let n = 1 + rng.below(60) as usize;
            // Sometimes a run starts a little behind (a redelivery after a failed write).
            let from = at.saturating_sub(if rng.chance(100) { 5 } else { 0 });
            let end = (at + n).min(journal.len());
            let run: Vec<Message> = (from..end)
                .map(|i| Message {
                    events_seq: i as u64 + 1,
                    batch: JournalBatch::decode(&journal[i]),
                })
                .collect();
            tables.provide(&mut projector, &run);
            let changes = projector.apply(run);
            assert_eq!(changes.unreadable, 0);
            tables.write(changes);
            at = end;
            // Sometimes the process restarts: only the database's rows and progress remain.
            if rng.chance(50) {
                projector = Projector::new(tables.progress.clone());
            }
        }
        // Every order the book holds is open with the book's quantities; no other is open.
        let snapshot = book.snapshot();
        let resting: Vec<_> = snapshot
            .bids
            .iter()
            .chain(&snapshot.asks)
            .chain(&snapshot.stops)
            .collect();
        let open: Vec<&OrderRow> = tables
            .orders
            .values()
            .filter(|o| o.status == Status::Open)
            .collect();
        assert_eq!(open.len(), resting.len());
        for r in &resting {
            let row = &tables.orders[&(spec.symbol.clone(), r.oid.0)];
            assert_eq!(row.status, Status::Open, "{row:?}");
            assert_eq!(row.leaves, dec_of(spec.fmt_qty(r.leaves)), "{row:?}");
            assert_eq!(row.filled, dec_of(spec.fmt_qty(r.filled)), "{row:?}");
            assert_eq!(row.qty, Some(dec_of(spec.fmt_qty(r.qty))), "{row:?}");
            assert_eq!(row.price, r.price.map(|p| dec_of(spec.fmt_price(p))));
        }
        // Each trade once, two fills each, and every order's filled is the sum of its fills.
        assert_eq!(tables.trades.len(), trade_count);
        assert_eq!(tables.fills.len(), 2 * trade_count);
        let mut filled: HashMap<u64, Dec> = HashMap::new();
        for f in &tables.fills {
            let e = filled.entry(f.oid).or_insert(Dec::zero(0));
            *e = e.checked_add(f.qty).expect("sum");
        }
        for o in tables.orders.values() {
            let sum = filled.get(&o.oid).copied().unwrap_or(Dec::zero(0));
            assert_eq!(o.filled, sum, "{o:?}");
            if o.status == Status::Filled {
                assert!(o.leaves.is_zero());
            }
        }
        for status in [
            Status::Filled,
            Status::Cancelled,
            Status::Expired,
            Status::Rejected,
        ] {
            assert!(
                tables.orders.values().any(|o| o.status == status),
                "no order ended {status:?}: the flow does not reach every state"
            );
        }
        // The candles add up to the tape.
        let volume = tables
            .trades
            .iter()
            .fold(Dec::zero(0), |a, t| a.checked_add(t.qty).expect("sum"));
        let candle_volume = tables
            .candles
            .values()
            .fold(Dec::zero(0), |a, c| a.checked_add(c.volume).expect("sum"));
        assert_eq!(volume, candle_volume);
        let candle_trades: u64 = tables.candles.values().map(|c| c.trades).sum();
        assert_eq!(candle_trades as usize, trade_count);
    }

    /// Three markets' journals interleaved into one stream, each market's messages in order.
    fn three_markets(commands: usize) -> Vec<(String, Vec<u8>)> {
        let mut queues: Vec<(String, std::collections::VecDeque<Vec<u8>>)> = (0..3)
            .map(|k| {
                let market = format!("M{k}");
                let (msgs, _, _) = journal_named(20 + k as u64, commands, Some(&market));
                (market, msgs.into())
            })
            .collect();
        let mut rng = Rng::new(3);
        let mut out = Vec::new();
        while queues.iter().any(|(_, q)| !q.is_empty()) {
            let k = rng.below(3) as usize;
            let (market, q) = &mut queues[k];
            if let Some(m) = q.pop_front() {
                out.push((market.clone(), m));
            }
        }
        out
    }

    #[test]
    fn runs_split_by_market_and_written_in_part_before_a_restart_give_the_same_tables() {
        let stream = three_markets(10_000);
        let message = |i: usize| Message {
            events_seq: i as u64 + 1,
            batch: JournalBatch::decode(&stream[i].1),
        };
        // One transaction a run.
        let mut whole = Tables::default();
        let mut projector = Projector::new(HashMap::new());
        let mut rng = Rng::new(8);
        let mut at = 0;
        while at < stream.len() {
            let end = (at + 1 + rng.below(40) as usize).min(stream.len());
            let run: Vec<Message> = (at..end).map(message).collect();
            whole.provide(&mut projector, &run);
            whole.write(projector.apply(run));
            at = end;
        }
        // Each run split into up to three transactions, each of its own markets; sometimes
        // the process dies with only some parts written, and starts again from the position
        // every market is written through.
        let mut split = Tables::default();
        let mut projector = Projector::new(HashMap::new());
        let (mut through, mut crashes, mut parts_seen) = (0usize, 0, 0);
        let mut rng = Rng::new(8);
        while through < stream.len() {
            let end = (through + 1 + rng.below(40) as usize).min(stream.len());
            let run: Vec<Message> = (through..end).map(message).collect();
            split.provide(&mut projector, &run);
            let changes = projector.apply(run);
            let (rows, markets) = (changes.rows(), changes.progress.len());
            let parts = changes.split(3);
            assert_eq!(parts.len(), markets.clamp(1, 3));
            assert_eq!(parts.iter().map(Changes::rows).sum::<usize>(), rows);
            let mut seen = BTreeSet::new();
            for p in &parts {
                let mine: BTreeSet<&String> = p.progress.keys().collect();
                assert!(p.orders.keys().all(|(m, _)| mine.contains(m)));
                assert!(p.fills.iter().all(|f| mine.contains(&f.market)));
                assert!(p.trades.iter().all(|t| mine.contains(&t.market)));
                assert!(p.candles.keys().all(|(m, _)| mine.contains(m)));
                for m in mine {
                    assert!(seen.insert(m.clone()), "{m} in two parts");
                }
            }
            parts_seen += parts.len();
            if parts.len() > 1 && rng.chance(250) {
                // Killed mid-run: a random part is lost, the others committed.
                let lost = rng.below(parts.len() as u64) as usize;
                for (i, p) in parts.into_iter().enumerate() {
                    if i != lost {
                        split.write(p);
                    }
                }
                crashes += 1;
                projector = Projector::new(split.progress.clone());
                continue;
            }
            for p in parts {
                split.write(p);
            }
            through = end;
        }
        assert!(
            crashes >= 8 && parts_seen > 2 * crashes,
            "{crashes} crashes"
        );
        let sort = |t: &mut Tables| {
            t.fills.sort_by(|a, b| {
                (&a.market, &a.trade_id, a.liquidity).cmp(&(&b.market, &b.trade_id, b.liquidity))
            });
            t.trades
                .sort_by(|a, b| (&a.market, &a.trade_id).cmp(&(&b.market, &b.trade_id)));
        };
        sort(&mut whole);
        sort(&mut split);
        assert!(whole.fills.len() > 1000, "the flows trade");
        for (k, o) in &whole.orders {
            assert_eq!(Some(o), split.orders.get(k), "order {k:?}");
        }
        assert_eq!(whole.orders.len(), split.orders.len());
        assert_eq!(whole.fills, split.fills);
        assert_eq!(whole.trades, split.trades);
        assert_eq!(whole.candles, split.candles);
        assert_eq!(whole.progress, split.progress);
    }

    #[test]
    fn unreadable_messages_are_counted_and_passed() {
        let mut p = Projector::new(HashMap::new());
        let changes = p.apply(vec![Message {
            events_seq: 1,
            batch: JournalBatch::decode(b"\xc1 not msgpack"),
        }]);
        assert_eq!(changes.unreadable, 1);
        assert!(changes.is_empty());
    }
}
