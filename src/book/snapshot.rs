//! The canonical content of a book: what a snapshot holds, what the state hash covers, and
//! what two books must agree on to be the same book.
//!
//! `BookSnapshot` is plain data (serde), encoded by the caller (MessagePack on the bus). The
//! hash is FNV-1a 64 over a fixed byte layout written here, so it is stable across machines,
//! Rust versions and serde formats. This module must never depend on how a book stores its
//! orders: any book that can list its orders in canonical order can be snapshotted and hashed.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::cid_window::CidSeen;
use super::limits::RateDebt;
use super::num::{Price, Qty};
use super::spec::MarketSpec;
use super::types::{Account, Cid, OrderId, OrderType, Seq, Side, StpMode, Tif, Timestamp};

/// Bumped whenever the snapshot layout changes; restore refuses other versions.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

/// One open order, with everything needed to rebuild it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub oid: OrderId,
    pub account: Account,
    pub cid: Option<Cid>,
    pub side: Side,
    pub order_type: OrderType,
    pub tif: Tif,
    pub price: Option<Price>,
    pub stop_price: Option<Price>,
    /// Total quantity (after amends), filled included.
    pub qty: Qty,
    pub filled: Qty,
    pub leaves: Qty,
    /// The part shown on the book: equals `leaves` unless a resting iceberg, and always for a
    /// stop waiting for its trigger (an iceberg's peak is set when it comes to rest).
    pub visible: Qty,
    pub display_qty: Option<Qty>,
    pub expire_at: Option<Timestamp>,
    pub stp: StpMode,
    /// When the order was accepted (0 in snapshots of older builds), and the input sequence
    /// of the last command that changed it (0 there: read as the order's own). Not hashed,
    /// so hashes stored by older builds still verify; both books keep them alike.
    #[serde(default)]
    pub ts: Timestamp,
    #[serde(default)]
    pub last_seq: Seq,
}

/// The whole state of a book.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookSnapshot {
    pub format_version: u32,
    pub spec: MarketSpec,
    pub halted: bool,
    pub last_trade_price: Option<Price>,
    /// The last applied input `(seq, pos)`.
    pub last_input: Option<(Seq, u16)>,
    /// Fills so far within `last_input.0` (for trade ids).
    pub trade_n: u32,
    /// Resting bids, best price first, oldest first within a price.
    pub bids: Vec<OrderRecord>,
    /// Resting asks, best price first, oldest first within a price.
    pub asks: Vec<OrderRecord>,
    /// Stop orders waiting for their trigger, in oid order.
    pub stops: Vec<OrderRecord>,
    /// The cid window (`spec.cid_window_secs`), oldest first; empty when it is off.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cid_window: Vec<CidSeen>,
    /// The per-account rate limit's clock: the greatest timestamp applied while the market
    /// has a rate (`spec.account_rate`); 0 without one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rate_clock: Timestamp,
    /// The accounts ahead of the rate (debt beyond `rate_clock`), by account name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_debts: Vec<RateDebt>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A stable 64-bit hash of a book's canonical content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StateHash(pub u64);

impl fmt::Display for StateHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One level of the aggregated (L2) book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L2Level {
    pub price: Price,
    /// Shown quantity at this price (hidden iceberg quantity excluded).
    pub qty: Qty,
    pub orders: u32,
}

/// Why a snapshot could not be restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "snapshot format version {found} is not supported; this build reads version {expected}"
    )]
    Version { found: u32, expected: u32 },
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }
    fn opt(&mut self, v: Option<u64>) {
        match v {
            None => self.bytes(&[0]),
            Some(v) => {
                self.bytes(&[1]);
                self.u64(v);
            }
        }
    }
}

fn hash_order(h: &mut Fnv, o: &OrderRecord) {
    h.u64(o.oid.0);
    h.str(o.account.as_str());
    h.str(o.cid.as_ref().map_or("", |c| c.as_str()));
    h.str(o.side.as_str());
    h.str(o.order_type.as_str());
    h.str(o.tif.as_str());
    h.opt(o.price.map(|p| p.0));
    h.opt(o.stop_price.map(|p| p.0));
    h.u64(o.qty.0);
    h.u64(o.filled.0);
    h.u64(o.leaves.0);
    h.u64(o.visible.0);
    h.opt(o.display_qty.map(|q| q.0));
    h.opt(o.expire_at);
    h.str(o.stp.as_str());
}

impl BookSnapshot {
    /// The cid window fits its spec: empty when the window is off, within its cap. (Each
    /// book checks for a key held twice while it rebuilds its own window.)
    pub fn check_cid_window(&self) -> Result<(), RestoreError> {
        if self.spec.cid_window_secs == 0 && !self.cid_window.is_empty() {
            return Err(RestoreError::Inconsistent(
                "the cid window holds entries but is off".into(),
            ));
        }
        if self.cid_window.len() > self.spec.cid_window_orders as usize {
            return Err(RestoreError::Inconsistent(format!(
                "the cid window holds {} entries, more than its cap of {}",
                self.cid_window.len(),
                self.spec.cid_window_orders
            )));
        }
        Ok(())
    }

    /// The rate limit's state fits its spec: none without a rate; otherwise debts beyond the
    /// clock, one per account, in account order.
    pub fn check_rate_limits(&self) -> Result<(), RestoreError> {
        let bad = |m: String| Err(RestoreError::Inconsistent(m));
        if self.spec.account_rate == 0 {
            if self.rate_clock != 0 || !self.rate_debts.is_empty() {
                return bad("the per-account rate limit holds state but is off".into());
            }
            return Ok(());
        }
        if let Some(d) = self.rate_debts.iter().find(|d| d.tat <= self.rate_clock) {
            return bad(format!(
                "the rate debt of {} ends at {}, not after the clock {}",
                d.account, d.tat, self.rate_clock
            ));
        }
        if let Some(w) = self
            .rate_debts
            .windows(2)
            .find(|w| w[0].account.as_str() >= w[1].account.as_str())
        {
            return bad(format!(
                "the rate debts are not one per account in account order ({} before {})",
                w[0].account, w[1].account
            ));
        }
        Ok(())
    }

    /// FNV-1a 64 over the spec, the market state, every open order in canonical order, and
    /// the cid window when the market has one (`StateHasher`).
    pub fn state_hash(&self) -> StateHash {
        let mut h = StateHasher::new(
            &self.spec,
            self.halted,
            self.last_trade_price,
            self.last_input,
            self.trade_n,
        );
        h.orders("bids", self.bids.len(), self.bids.iter());
        h.orders("asks", self.asks.len(), self.asks.iter());
        h.orders("stops", self.stops.len(), self.stops.iter());
        h.finish(
            self.cid_window.len(),
            self.cid_window.iter(),
            self.rate_clock,
            &self.rate_debts,
        )
    }
}

/// The state hash, fed part by part in canonical order: the head (`new`), the bids, asks and
/// stops (`orders`, in that order), then the cid window and the account limits (`finish`). A
/// snapshot feeds it from its records; a live book from its own structures, one order at a
/// time, without first copying itself into a snapshot. Both must give the same value: the
/// cluster compares hashes across nodes and stores them with snapshots.
pub(super) struct StateHasher<'a> {
    h: Fnv,
    spec: &'a MarketSpec,
}

impl<'a> StateHasher<'a> {
    pub(super) fn new(
        spec: &'a MarketSpec,
        halted: bool,
        last_trade_price: Option<Price>,
        last_input: Option<(Seq, u16)>,
        trade_n: u32,
    ) -> StateHasher<'a> {
        let mut h = Fnv::new();
        let s = spec;
        h.str(&s.symbol);
        h.str(&s.base_token);
        h.str(&s.quote_token);
        h.u64(u64::from(s.price_decimals));
        h.u64(u64::from(s.size_decimals));
        h.u64(s.tick.0);
        h.u64(s.lot.0);
        h.u64(s.min_qty.0);
        h.opt(s.max_qty.map(|q| q.0));
        h.opt(s.price_band_bps.map(u64::from));
        h.str(s.stp_default.as_str());
        h.u64(u64::from(s.orders_max));
        h.u64(u64::from(halted));
        h.opt(last_trade_price.map(|p| p.0));
        h.opt(last_input.map(|(seq, _)| seq));
        h.opt(last_input.map(|(_, pos)| u64::from(pos)));
        h.u64(u64::from(trade_n));
        StateHasher { h, spec }
    }

    /// One list of orders: `tag` ("bids", "asks", "stops"), how many, and each in order.
    pub(super) fn orders<R: std::borrow::Borrow<OrderRecord>>(
        &mut self,
        tag: &str,
        len: usize,
        orders: impl Iterator<Item = R>,
    ) {
        self.h.str(tag);
        self.h.u64(len as u64);
        for o in orders {
            hash_order(&mut self.h, o.borrow());
        }
    }

    pub(super) fn finish<'c>(
        mut self,
        cid_window_len: usize,
        cid_window: impl Iterator<Item = &'c CidSeen>,
        rate_clock: Timestamp,
        rate_debts: &[RateDebt],
    ) -> StateHash {
        let (h, s) = (&mut self.h, self.spec);
        // Only a market with a cid window hashes it, so books without one (every book of
        // older builds) keep their hashes.
        if s.cid_window_secs > 0 {
            h.str("cid_window");
            h.u64(u64::from(s.cid_window_secs));
            h.u64(u64::from(s.cid_window_orders));
            h.u64(cid_window_len as u64);
            for seen in cid_window {
                h.str(seen.account.as_str());
                h.str(seen.cid.as_str());
                h.u64(seen.ts);
            }
        }
        // Likewise the per-account limits, only when a market has them.
        if s.account_rate > 0 || s.account_orders_max > 0 {
            h.str("account_limits");
            h.u64(u64::from(s.account_rate));
            h.u64(u64::from(s.account_burst));
            h.u64(u64::from(s.account_orders_max));
            h.u64(rate_clock);
            h.u64(rate_debts.len() as u64);
            for d in rate_debts {
                h.str(d.account.as_str());
                h.u64(d.tat);
            }
        }
        StateHash(h.0)
    }
}
