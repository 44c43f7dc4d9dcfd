//! The canonical content of a book: what a snapshot holds, what the state hash covers, and
//! what two books must agree on to be the same book.
//!
//! `BookSnapshot` is plain data (serde), encoded by the caller (MessagePack on the bus). Its
//! state hash is defined in `state_hash`, over the same content, so it is stable across
//! machines, Rust versions and serde formats. This module must never depend on how a book
//! stores its orders: any book that can list its orders in canonical order can be snapshotted
//! and hashed.

use serde::{Deserialize, Serialize};

use super::cid_window::CidSeen;
use super::limits::RateDebt;
use super::num::{Price, Qty};
use super::spec::MarketSpec;
use super::state_hash::{Digest, Fnv, HashVersion, OrderSet, Place, StateHash, StateHasher, Words};
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

    /// The rules each record keeps alone or beside its neighbour in its list: in the list of
    /// its side, able to rest, showing what its display allows, on the tick, best price first;
    /// a stop waiting untouched, in oid order. Both books check these before they build
    /// anything, so they refuse the same snapshots with the same words, in one pass over the
    /// records as they lie in memory. What needs the whole book (an oid or an open cid twice,
    /// a crossed book, the cid window's keys) each book checks as it builds.
    pub fn check_records(&self) -> Result<(), RestoreError> {
        let bad = |m: String| Err(RestoreError::Inconsistent(m));
        let tick = self.spec.tick.0;
        let off_tick =
            |p: Option<Price>| p.is_some_and(|p| p.0.checked_rem(tick).unwrap_or(0) != 0);
        for (side, records) in [(Side::Buy, &self.bids), (Side::Sell, &self.asks)] {
            let mut previous: Option<Price> = None;
            for o in records {
                check_record(o)?;
                let oid = o.oid;
                if o.side != side {
                    return bad(format!(
                        "order {oid} is a {} order in the {} list",
                        o.side.as_str(),
                        side.as_str()
                    ));
                }
                let Some(price) = o.price else {
                    return bad(format!("resting order {oid} has no price"));
                };
                if !o.order_type.has_limit_price() || !o.tif.rests() {
                    return bad(format!(
                        "order {oid} ({} {}) cannot rest",
                        o.order_type.as_str(),
                        o.tif.as_str()
                    ));
                }
                let visible_ok = match o.display_qty {
                    Some(d) => o.visible > Qty::ZERO && o.visible <= d.min(o.leaves),
                    None => o.visible == o.leaves,
                };
                if !visible_ok {
                    return bad(format!(
                        "order {oid} shows {} of leaves {}",
                        o.visible.0, o.leaves.0
                    ));
                }
                if off_tick(o.price) || off_tick(o.stop_price) {
                    return bad(format!("order {oid} is off the tick {tick}"));
                }
                let in_order = previous.is_none_or(|p| match side {
                    Side::Buy => price <= p,
                    Side::Sell => price >= p,
                });
                if !in_order {
                    return bad(format!(
                        "{} are not best price first at order {oid}",
                        side.as_str()
                    ));
                }
                previous = Some(price);
            }
        }
        let mut previous: Option<OrderId> = None;
        for o in &self.stops {
            check_record(o)?;
            let oid = o.oid;
            if !o.order_type.is_stop() || o.stop_price.is_none() {
                return bad(format!("order {oid} among the stops is no stop order"));
            }
            if o.filled != Qty::ZERO || o.visible != o.leaves {
                return bad(format!(
                    "waiting stop {oid} has filled {} and shows {} of {}",
                    o.filled.0, o.visible.0, o.leaves.0
                ));
            }
            if off_tick(o.price) || off_tick(o.stop_price) {
                return bad(format!("order {oid} is off the tick {tick}"));
            }
            if previous.is_some_and(|p| p >= oid) {
                return bad(format!("stops are not in oid order at {oid}"));
            }
            previous = Some(oid);
        }
        Ok(())
    }

    /// The state hash of this content, in the current version (`HashVersion::CURRENT`).
    pub fn state_hash(&self) -> StateHash {
        self.state_hash_as(HashVersion::CURRENT)
    }

    /// The state hash of this content in `version`: over the spec, the market state, every
    /// open order in canonical order, the cid window and the account limits when the market
    /// has them (`StateHasher`).
    pub fn state_hash_as(&self, version: HashVersion) -> StateHash {
        match version {
            HashVersion::Fnv1 => self.hash_fnv1(),
            HashVersion::Words2 => self.hash_words2(),
        }
    }

    fn hash_with<D: Digest>(&self, digest: D) -> StateHasher<'_, D> {
        StateHasher::new(
            digest,
            &self.spec,
            self.halted,
            self.last_trade_price,
            self.last_input,
            self.trade_n,
        )
    }

    fn hash_fnv1(&self) -> StateHash {
        let mut h = self.hash_with(Fnv::new());
        h.orders("bids", self.bids.len(), self.bids.iter());
        h.orders("asks", self.asks.len(), self.asks.iter());
        h.orders("stops", self.stops.len(), self.stops.iter());
        self.finish(h)
    }

    fn hash_words2(&self) -> StateHash {
        let mut h = self.hash_with(Words::new());
        let mut set = OrderSet::default();
        for side in [&self.bids, &self.asks] {
            let mut before: Option<&OrderRecord> = None;
            for o in side {
                let prev = before.filter(|b| b.price == o.price).map(|b| b.oid.0);
                set.add(o, Place::Rests { prev });
                before = Some(o);
            }
        }
        for o in &self.stops {
            set.add(o, Place::Stop);
        }
        h.order_set(set);
        self.finish(h)
    }

    fn finish<D: Digest>(&self, h: StateHasher<'_, D>) -> StateHash {
        h.finish(
            self.cid_window.len(),
            self.cid_window.iter(),
            self.rate_clock,
            &self.rate_debts,
        )
    }
}

/// The rules of one record, whatever list it is in.
fn check_record(o: &OrderRecord) -> Result<(), RestoreError> {
    let oid = o.oid;
    if o.leaves == Qty::ZERO || o.filled.0.checked_add(o.leaves.0) != Some(o.qty.0) {
        return Err(RestoreError::Inconsistent(format!(
            "order {oid}: filled {} and leaves {} do not add up to qty {}",
            o.filled.0, o.leaves.0, o.qty.0
        )));
    }
    let bad = |what: &str| Err(RestoreError::Inconsistent(format!("order {oid}: {what}")));
    let limit = o.order_type.has_limit_price();
    if limit != o.price.is_some() || o.price == Some(Price(0)) {
        return bad("a price goes with limit and stop_limit orders only, and is above 0");
    }
    if o.order_type.is_stop() != o.stop_price.is_some() || o.stop_price == Some(Price(0)) {
        return bad("a stop price goes with stop orders only, and is above 0");
    }
    if !limit && !matches!(o.tif, Tif::Ioc | Tif::Fok) {
        return bad("an order without a limit price is ioc or fok");
    }
    if o.display_qty
        .is_some_and(|d| d == Qty::ZERO || !limit || !o.tif.rests())
    {
        return bad("a display quantity goes with limit orders that rest only, and is above 0");
    }
    if (o.tif == Tif::Gtd) != o.expire_at.is_some() {
        return bad("expire_at goes with gtd and only gtd");
    }
    Ok(())
}
