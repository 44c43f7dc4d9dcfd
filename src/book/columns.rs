//! A book snapshot as columns: the form snapshots are stored in.
//!
//! `BookSnapshot` lists its orders as records, each a map of named fields when encoded: about
//! 180 bytes an order before compression, most of them field names, and a decoder that
//! matches every name of every order. A node restarting thousands of markets spends most of
//! its time there. `BookColumns` holds the same content with each field of the orders as one
//! column (a list of values, one per order, under the field's name), accounts named once in a
//! table and referred to by index, and the fields that grow along a list (oids, prices in
//! queue order, timestamps, sequences) as differences from the value before. Encoded as
//! MessagePack it stays a map of named fields that any MessagePack reader can open, at about
//! a fifth of the size, and decodes several times faster.
//!
//! The conversion is lossless both ways: `BookColumns::from(&snapshot).into_snapshot()` gives
//! back `snapshot` exactly (tested below, and on every restore of a stored snapshot by the
//! state hash it carries). Decoding checks what a record's types checked before (every column
//! as long as the oids, codes in range, account indexes in the table); the rest is for
//! `OrderBook::restore`, as with records.

use serde::{Deserialize, Serialize};

use super::cid_window::CidSeen;
use super::limits::RateDebt;
use super::num::{Price, Qty};
use super::snapshot::{BookSnapshot, OrderRecord, RestoreError};
use super::spec::MarketSpec;
use super::types::{Account, Cid, OrderId, OrderType, Seq, Side, StpMode, Tif, Timestamp};

/// Every field of a list of orders, one column each, in the list's order.
///
/// Codes: `side` 0 buy, 1 sell; `order_type` 0 limit, 1 market, 2 stop_limit, 3 stop_market;
/// `tif` 0 gtc, 1 ioc, 2 fok, 3 gtd, 4 post_only; `stp` 0 none, 1 cancel_newest,
/// 2 cancel_oldest, 3 cancel_both, 4 decrement_and_cancel. `oid`, `price`, `ts` and
/// `last_seq` hold each value minus the one before in the column (the first minus 0; a
/// missing price is skipped); `leaves` is `qty - filled`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderColumns {
    pub oid: Vec<i64>,
    /// Index into `BookColumns::accounts`.
    pub account: Vec<u32>,
    pub cid: Vec<Option<Cid>>,
    pub side: Vec<u8>,
    pub order_type: Vec<u8>,
    pub tif: Vec<u8>,
    pub stp: Vec<u8>,
    pub price: Vec<Option<i64>>,
    pub stop_price: Vec<Option<u64>>,
    pub qty: Vec<u64>,
    pub filled: Vec<u64>,
    pub visible: Vec<u64>,
    pub display_qty: Vec<Option<u64>>,
    pub expire_at: Vec<Option<Timestamp>>,
    pub ts: Vec<i64>,
    pub last_seq: Vec<i64>,
}

/// The cid window as columns, oldest first (`ts` as differences, `account` as indexes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowColumns {
    pub account: Vec<u32>,
    pub cid: Vec<Cid>,
    pub ts: Vec<i64>,
}

/// `BookSnapshot` with its order lists and cid window as columns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookColumns {
    pub format_version: u32,
    pub spec: MarketSpec,
    pub halted: bool,
    pub last_trade_price: Option<Price>,
    pub last_input: Option<(Seq, u16)>,
    pub trade_n: u32,
    /// Every account the orders and the cid window name, each once.
    pub accounts: Vec<Account>,
    pub bids: OrderColumns,
    pub asks: OrderColumns,
    pub stops: OrderColumns,
    pub cid_window: WindowColumns,
    pub rate_clock: Timestamp,
    pub rate_debts: Vec<RateDebt>,
}

fn side_code(v: Side) -> u8 {
    match v {
        Side::Buy => 0,
        Side::Sell => 1,
    }
}

fn side_of(c: u8) -> Option<Side> {
    Some(match c {
        0 => Side::Buy,
        1 => Side::Sell,
        _ => return None,
    })
}

fn type_code(v: OrderType) -> u8 {
    match v {
        OrderType::Limit => 0,
        OrderType::Market => 1,
        OrderType::StopLimit => 2,
        OrderType::StopMarket => 3,
    }
}

fn type_of(c: u8) -> Option<OrderType> {
    Some(match c {
        0 => OrderType::Limit,
        1 => OrderType::Market,
        2 => OrderType::StopLimit,
        3 => OrderType::StopMarket,
        _ => return None,
    })
}

fn tif_code(v: Tif) -> u8 {
    match v {
        Tif::Gtc => 0,
        Tif::Ioc => 1,
        Tif::Fok => 2,
        Tif::Gtd => 3,
        Tif::PostOnly => 4,
    }
}

fn tif_of(c: u8) -> Option<Tif> {
    Some(match c {
        0 => Tif::Gtc,
        1 => Tif::Ioc,
        2 => Tif::Fok,
        3 => Tif::Gtd,
        4 => Tif::PostOnly,
        _ => return None,
    })
}

fn stp_code(v: StpMode) -> u8 {
    match v {
        StpMode::None => 0,
        StpMode::CancelNewest => 1,
        StpMode::CancelOldest => 2,
        StpMode::CancelBoth => 3,
        StpMode::DecrementAndCancel => 4,
    }
}

fn stp_of(c: u8) -> Option<StpMode> {
    Some(match c {
        0 => StpMode::None,
        1 => StpMode::CancelNewest,
        2 => StpMode::CancelOldest,
        3 => StpMode::CancelBoth,
        4 => StpMode::DecrementAndCancel,
        _ => return None,
    })
}

/// Running differences: each value minus the one before (wrapping, so any `u64` survives).
#[derive(Default)]
struct Delta(u64);

impl Delta {
    fn put(&mut self, v: u64) -> i64 {
        let d = v.wrapping_sub(self.0) as i64;
        self.0 = v;
        d
    }
    fn take(&mut self, d: i64) -> u64 {
        self.0 = self.0.wrapping_add(d as u64);
        self.0
    }
}

/// Gives each account an index, in the order they are first met.
#[derive(Default)]
struct AccountTable {
    names: Vec<Account>,
    index: std::collections::HashMap<Account, u32>,
}

impl AccountTable {
    fn index(&mut self, a: &Account) -> u32 {
        if let Some(&i) = self.index.get(a) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(*a);
        self.index.insert(*a, i);
        i
    }
}

impl OrderColumns {
    fn from_records(records: &[OrderRecord], accounts: &mut AccountTable) -> OrderColumns {
        let n = records.len();
        let mut c = OrderColumns {
            oid: Vec::with_capacity(n),
            account: Vec::with_capacity(n),
            cid: Vec::with_capacity(n),
            side: Vec::with_capacity(n),
            order_type: Vec::with_capacity(n),
            tif: Vec::with_capacity(n),
            stp: Vec::with_capacity(n),
            price: Vec::with_capacity(n),
            stop_price: Vec::with_capacity(n),
            qty: Vec::with_capacity(n),
            filled: Vec::with_capacity(n),
            visible: Vec::with_capacity(n),
            display_qty: Vec::with_capacity(n),
            expire_at: Vec::with_capacity(n),
            ts: Vec::with_capacity(n),
            last_seq: Vec::with_capacity(n),
        };
        let (mut oid, mut price, mut ts, mut seq) = <(Delta, Delta, Delta, Delta)>::default();
        for r in records {
            c.oid.push(oid.put(r.oid.0));
            c.account.push(accounts.index(&r.account));
            c.cid.push(r.cid);
            c.side.push(side_code(r.side));
            c.order_type.push(type_code(r.order_type));
            c.tif.push(tif_code(r.tif));
            c.stp.push(stp_code(r.stp));
            c.price.push(r.price.map(|p| price.put(p.0)));
            c.stop_price.push(r.stop_price.map(|p| p.0));
            c.qty.push(r.qty.0);
            c.filled.push(r.filled.0);
            c.visible.push(r.visible.0);
            c.display_qty.push(r.display_qty.map(|q| q.0));
            c.expire_at.push(r.expire_at);
            c.ts.push(ts.put(r.ts));
            c.last_seq.push(seq.put(r.last_seq));
        }
        c
    }

    fn into_records(
        self,
        list: &str,
        accounts: &[Account],
    ) -> Result<Vec<OrderRecord>, RestoreError> {
        let n = self.oid.len();
        let lengths = [
            ("account", self.account.len()),
            ("cid", self.cid.len()),
            ("side", self.side.len()),
            ("order_type", self.order_type.len()),
            ("tif", self.tif.len()),
            ("stp", self.stp.len()),
            ("price", self.price.len()),
            ("stop_price", self.stop_price.len()),
            ("qty", self.qty.len()),
            ("filled", self.filled.len()),
            ("visible", self.visible.len()),
            ("display_qty", self.display_qty.len()),
            ("expire_at", self.expire_at.len()),
            ("ts", self.ts.len()),
            ("last_seq", self.last_seq.len()),
        ];
        if let Some((name, len)) = lengths.iter().find(|(_, len)| *len != n) {
            return Err(RestoreError::Inconsistent(format!(
                "{list}: column {name} holds {len} values but there are {n} orders"
            )));
        }
        let bad = |i: usize, what: &str| {
            RestoreError::Inconsistent(format!("{list}: order {i} has {what}"))
        };
        let (mut oid, mut price, mut ts, mut seq) = <(Delta, Delta, Delta, Delta)>::default();
        let mut records = Vec::with_capacity(n);
        for i in 0..n {
            let qty = self.qty[i];
            let filled = self.filled[i];
            records.push(OrderRecord {
                oid: OrderId(oid.take(self.oid[i])),
                account: *accounts
                    .get(self.account[i] as usize)
                    .ok_or_else(|| bad(i, "an account index past the table"))?,
                cid: self.cid[i],
                side: side_of(self.side[i]).ok_or_else(|| bad(i, "an unknown side code"))?,
                order_type: type_of(self.order_type[i])
                    .ok_or_else(|| bad(i, "an unknown order type code"))?,
                tif: tif_of(self.tif[i]).ok_or_else(|| bad(i, "an unknown tif code"))?,
                price: self.price[i].map(|d| Price(price.take(d))),
                stop_price: self.stop_price[i].map(Price),
                qty: Qty(qty),
                filled: Qty(filled),
                leaves: Qty(qty
                    .checked_sub(filled)
                    .ok_or_else(|| bad(i, "more filled than its quantity"))?),
                visible: Qty(self.visible[i]),
                display_qty: self.display_qty[i].map(Qty),
                expire_at: self.expire_at[i],
                stp: stp_of(self.stp[i]).ok_or_else(|| bad(i, "an unknown stp code"))?,
                ts: ts.take(self.ts[i]),
                last_seq: seq.take(self.last_seq[i]),
            });
        }
        Ok(records)
    }
}

impl From<&BookSnapshot> for BookColumns {
    fn from(s: &BookSnapshot) -> BookColumns {
        let mut accounts = AccountTable::default();
        let bids = OrderColumns::from_records(&s.bids, &mut accounts);
        let asks = OrderColumns::from_records(&s.asks, &mut accounts);
        let stops = OrderColumns::from_records(&s.stops, &mut accounts);
        let mut window = WindowColumns {
            account: Vec::with_capacity(s.cid_window.len()),
            cid: Vec::with_capacity(s.cid_window.len()),
            ts: Vec::with_capacity(s.cid_window.len()),
        };
        let mut ts = Delta::default();
        for seen in &s.cid_window {
            window.account.push(accounts.index(&seen.account));
            window.cid.push(seen.cid);
            window.ts.push(ts.put(seen.ts));
        }
        BookColumns {
            format_version: s.format_version,
            spec: s.spec.clone(),
            halted: s.halted,
            last_trade_price: s.last_trade_price,
            last_input: s.last_input,
            trade_n: s.trade_n,
            accounts: accounts.names,
            bids,
            asks,
            stops,
            cid_window: window,
            rate_clock: s.rate_clock,
            rate_debts: s.rate_debts.clone(),
        }
    }
}

impl BookColumns {
    /// The snapshot these columns were made from, or what in them does not fit together.
    pub fn into_snapshot(self) -> Result<BookSnapshot, RestoreError> {
        let accounts = &self.accounts;
        let bids = self.bids.into_records("bids", accounts)?;
        let asks = self.asks.into_records("asks", accounts)?;
        let stops = self.stops.into_records("stops", accounts)?;
        let w = self.cid_window;
        if w.cid.len() != w.account.len() || w.ts.len() != w.account.len() {
            return Err(RestoreError::Inconsistent(format!(
                "cid window: {} accounts, {} cids and {} timestamps",
                w.account.len(),
                w.cid.len(),
                w.ts.len()
            )));
        }
        let mut ts = Delta::default();
        let mut cid_window = Vec::with_capacity(w.cid.len());
        for ((&a, cid), &d) in w.account.iter().zip(w.cid).zip(&w.ts) {
            let account = *accounts.get(a as usize).ok_or_else(|| {
                RestoreError::Inconsistent("cid window: an account index past the table".into())
            })?;
            cid_window.push(CidSeen {
                account,
                cid,
                ts: ts.take(d),
            });
        }
        Ok(BookSnapshot {
            format_version: self.format_version,
            spec: self.spec,
            halted: self.halted,
            last_trade_price: self.last_trade_price,
            last_input: self.last_input,
            trade_n: self.trade_n,
            bids,
            asks,
            stops,
            cid_window,
            rate_clock: self.rate_clock,
            rate_debts: self.rate_debts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{self, FlowParams};

    fn book_after(params: &FlowParams, window: bool) -> BookSnapshot {
        let mut w = workload::generate(params);
        if window {
            w.spec.cid_window_secs = 60;
            w.spec.cid_window_orders = 10_000;
        }
        let mut book = w.prefilled_book();
        let mut events = Vec::new();
        for cmd in &w.commands {
            events.clear();
            book.apply(cmd, &mut events);
        }
        book.snapshot()
    }

    #[test]
    fn columns_give_back_the_snapshot_exactly() {
        for (seed, window) in [(1, false), (2, true), (3, false)] {
            let params = FlowParams {
                seed,
                resting: 500,
                spread_ticks: 60,
                commands: 3_000,
                accounts: 7,
                full_mix: true,
                young_cancel_pct: 50,
            };
            let snapshot = book_after(&params, window);
            assert!(!snapshot.bids.is_empty() && !snapshot.asks.is_empty());
            assert_eq!(window, !snapshot.cid_window.is_empty());
            let columns = BookColumns::from(&snapshot);
            assert!(columns.accounts.len() <= 7);
            let bytes = rmp_serde::to_vec_named(&columns).expect("encodes");
            let decoded: BookColumns = rmp_serde::from_slice(&bytes).expect("decodes");
            assert_eq!(decoded, columns);
            assert_eq!(decoded.into_snapshot().expect("converts"), snapshot);
        }
    }

    #[test]
    fn columns_that_do_not_fit_together_are_refused_with_the_reason() {
        let params = FlowParams {
            seed: 5,
            resting: 50,
            spread_ticks: 20,
            commands: 0,
            accounts: 3,
            full_mix: false,
            young_cancel_pct: 0,
        };
        let snapshot = book_after(&params, false);
        let columns = BookColumns::from(&snapshot);
        type Spoil = fn(&mut BookColumns);
        let cases: [(Spoil, &str); 5] = [
            (
                |c| {
                    c.bids.qty.pop();
                },
                "bids: column qty holds",
            ),
            (
                |c| c.asks.account[0] = 99,
                "asks: order 0 has an account index",
            ),
            (
                |c| c.bids.side[1] = 7,
                "bids: order 1 has an unknown side code",
            ),
            (
                |c| c.asks.filled[0] = u64::MAX,
                "asks: order 0 has more filled",
            ),
            (|c| c.cid_window.ts.push(3), "cid window: 0 accounts"),
        ];
        for (spoil, want) in cases {
            let mut c = columns.clone();
            spoil(&mut c);
            let e = c.into_snapshot().expect_err("refused").to_string();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }
}
