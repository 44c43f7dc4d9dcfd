//! `OrderBook`: the fast book the engine runs, following the rules in the `book` module doc.
//!
//! Layout: each side is a `Ladder` of price levels (see `ladder`: pages of 64 ticks with an
//! occupancy bitmap, so the best level and a level by price are found in a few steps). A level
//! holds an intrusive FIFO of orders that live in one slab (`Vec<Order>` plus a free list); an
//! order is found by oid through a hash index, by `(account, cid)` through another, and an
//! account's orders form a second intrusive list for `cancel_all`. Waiting stops sit in two
//! `BTreeMap`s in trigger order; GTD expiries in a min-heap with lazy deletion.
//!
//! Once warm (slab, maps and the caller's event buffer at their working size) a command
//! allocates nothing. This file must never read a clock, log, draw random numbers that reach the
//! output, or let a map's iteration order decide anything the book emits.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::hash::BuildHasher;

use super::cid_window::CidWindow;
use super::index::SlotIndex;
use super::limits::RateLimits;
use super::slab::Slab;

use super::command::{Amend, Command, NewOrder, Op, OrderRef};
use super::event::{
    Accepted, Amended, CancelReason, Cancelled, Event, OrderTag, RejectReason, Rejected, Trade,
    Triggered,
};
use super::ladder::{Ladder, NIL};
use super::num::{Price, Qty};
use super::snapshot::{BookSnapshot, L2Level, OrderRecord, RestoreError, SNAPSHOT_FORMAT_VERSION};
use super::spec::{MarketSpec, SpecRules};
use super::state_hash::{Digest, Fnv, HashVersion, OrderSet, Place, StateHash, StateHasher, Words};
use super::types::{Account, Cid, OrderId, OrderType, Seq, Side, StpMode, Tif, Timestamp};

/// Debug builds check every invariant after each command up to this many open orders.
#[cfg(debug_assertions)]
const DEBUG_CHECK_ORDERS_MAX: usize = 20_000;

/// Open orders from which `prefetch` asks the CPU for anything: about where the orders and
/// their indexes outgrow a core's 1 MB second-level cache. On a book of 1,000 orders the hints
/// cost ~16% of the commands a second; on one of 100,000 whose cancels reach cold orders they
/// gain ~30% (BENCHMARKS.md, "The look-ahead").
const PREFETCH_FROM_ORDERS: usize = 16_384;

/// Engine-generated keys (oids, exchange-assigned accounts): a fixed seed is enough.
type FixedState = foldhash::fast::FixedState;
/// Client-chosen keys (cids): a per-process random seed, so collisions cannot be precomputed.
/// The seed never reaches the output: no map here is iterated to decide what is emitted.
type SeededState = foldhash::fast::RandomState;

/// An open order in the slab: 96 bytes. What most orders lack (a cid; a stop price, an iceberg
/// peak or an expiry) lives in slabs of its own, named by slot, so that a big book of plain
/// orders costs less than 150 bytes an order with its indexes.
#[derive(Clone, Debug)]
struct Order {
    // Queue links within the level (unused while parked as a stop).
    prev: u32,
    next: u32,
    /// Slot of the order's level in its side's ladder (levels never move while they exist).
    level: u32,
    account: u32,
    acct_prev: u32,
    acct_next: u32,
    /// Slot of the order's cid in `cids`; NIL without one.
    cid: u32,
    /// Slot of the order's stop price, iceberg peak and expiry in `extras`; NIL for an order
    /// with none of them.
    extra: u32,
    leaves: u64,
    /// Shown part; equals `leaves` unless an iceberg.
    visible: u64,
    /// Limit price (0 for market types).
    price: u64,
    oid: u64,
    /// Total quantity; what is filled is `qty - leaves`.
    qty: u64,
    /// When the order was accepted (stream timestamp), and the input sequence of the last
    /// command that changed it (accepted, filled, amended, reduced, triggered to rest):
    /// what an order-status query answers.
    ts: Timestamp,
    last_seq: Seq,
    side: Side,
    order_type: OrderType,
    tif: Tif,
    stp: StpMode,
    /// A stop order waiting for its trigger.
    parked: bool,
}

// The size the doc above promises; a field added here is paid for by every resting order.
const _: () = assert!(std::mem::size_of::<Order>() == 96);

/// An order's cid, what `by_cid` holds: a lookup by cid compares here and goes straight to
/// the order.
#[derive(Clone, Copy, Debug)]
struct CidSlot {
    /// Hash of (account, cid) in `by_cid`, kept so removal and growth never hash again.
    hash: u64,
    /// The order's slot in the slab, and its account's slot.
    order: u32,
    account: u32,
    cid: Cid,
}

/// The fields of stops, icebergs and GTD orders.
#[derive(Clone, Copy, Debug, Default)]
struct Extra {
    /// Iceberg peak; 0 when not an iceberg.
    display: u64,
    /// 0 unless a stop type.
    stop_price: u64,
    expire_at: Option<Timestamp>,
}

/// The cid in `slot` of `cids` (NIL: none).
#[inline(always)]
fn cid_at(cids: &Slab<CidSlot>, slot: u32) -> Option<Cid> {
    (slot != NIL).then(|| cids.get(slot).cid)
}

/// The extra fields in `slot` of `extras` (NIL: all zero).
#[inline(always)]
fn extra_at(extras: &Slab<Extra>, slot: u32) -> Extra {
    if slot == NIL {
        Extra::default()
    } else {
        *extras.get(slot)
    }
}

#[derive(Clone, Debug)]
struct AccountSlot {
    name: Account,
    /// Open orders (resting and stops); the slot is freed at 0.
    open: u32,
    head: u32,
    tail: u32,
}

/// An order while it executes: a new order (not yet in the slab) or one taken out of its level
/// or the stops (`slot` set). Its identity is borrowed (from the command, or from a copy the
/// caller holds), so a taker that never rests never copies its account name and cid; one that
/// rests is written to the slab once, by `store`.
struct Taker<'a> {
    oid: OrderId,
    cid: &'a Option<Cid>,
    account: &'a Account,
    side: Side,
    order_type: OrderType,
    tif: Tif,
    stp: StpMode,
    price: u64,
    qty: u64,
    rem: u64,
    display: u64,
    stop_price: u64,
    expire_at: Option<Timestamp>,
    /// When the order was accepted.
    created: Timestamp,
    slot: Option<u32>,
    /// Hash of (account, cid), when already computed.
    cid_hash: Option<u64>,
}

impl Taker<'_> {
    #[inline]
    fn tag(&self) -> OrderTag {
        OrderTag {
            oid: self.oid,
            cid: *self.cid,
            account: *self.account,
        }
    }

    /// What the order shows when it rests with its current remainder.
    #[inline]
    fn visible(&self) -> u64 {
        if self.display > 0 {
            self.display.min(self.rem)
        } else {
            self.rem
        }
    }
}

/// Where an event comes from: the command's sequence and timestamp.
#[derive(Clone, Copy)]
struct At {
    seq: Seq,
    ts: Timestamp,
}

/// The ladder key of a price on `side`: its tick index, complemented for asks, so that on both
/// sides a larger key is a better price.
#[inline]
fn key_of(side: Side, price: u64, tick: u64) -> u64 {
    // Most markets quote in whole units of their last decimal: skip the division then.
    let t = if tick == 1 { price } else { price / tick };
    match side {
        Side::Buy => t,
        Side::Sell => !t,
    }
}

/// An open order as a query sees it: its record, and whether it is a stop still waiting for
/// its trigger (`untriggered`) rather than on the book (`open`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOrder {
    pub record: OrderRecord,
    pub waiting: bool,
}

/// The fast, deterministic limit order book of one market.
#[derive(Clone, Debug)]
pub struct OrderBook {
    spec: MarketSpec,
    halted: bool,
    last_trade_price: Option<u64>,
    last_input: Option<(Seq, u16)>,
    trade_n: u32,
    bids: Ladder,
    asks: Ladder,
    /// Open orders (resting and stops), named by slot everywhere in the book.
    orders: Slab<Order>,
    /// The cids of open orders that have one (`Order::cid`).
    cids: Slab<CidSlot>,
    /// Stop prices, iceberg peaks and expiries of the open orders that have one
    /// (`Order::extra`).
    extras: Slab<Extra>,
    /// Open orders (resting and stops) by oid; entries are slab slots.
    by_oid: SlotIndex,
    /// Open orders with a cid, by (account name, cid); entries are slots in `cids`.
    by_cid: SlotIndex,
    oid_hasher: FixedState,
    cid_hasher: SeededState,
    /// Accounts with open orders.
    accounts: Slab<AccountSlot>,
    /// Accounts with open orders, by name; entries are account slots.
    account_index: SlotIndex,
    /// Buy stops by (stop price, oid): the first is the next to trigger.
    buy_stops: BTreeMap<(u64, u64), u32>,
    /// Sell stops by (!stop price, oid): the first (highest stop) is the next to trigger.
    sell_stops: BTreeMap<(u64, u64), u32>,
    expiries: BinaryHeap<Reverse<(Timestamp, u64)>>,
    gtd_open: usize,
    /// (account, cid) of the recent `new`s, for retries after the first order closed.
    cid_window: CidWindow,
    /// How far ahead of the market's per-account rate each account is.
    rate_limits: RateLimits,
}

impl OrderBook {
    pub fn new(spec: MarketSpec) -> OrderBook {
        let cid_window = CidWindow::new(spec.cid_window_secs, spec.cid_window_orders);
        let rate_limits = RateLimits::new(spec.account_rate_ns());
        OrderBook {
            spec,
            halted: false,
            last_trade_price: None,
            last_input: None,
            trade_n: 0,
            bids: Ladder::default(),
            asks: Ladder::default(),
            orders: Slab::default(),
            cids: Slab::default(),
            extras: Slab::default(),
            by_oid: SlotIndex::default(),
            by_cid: SlotIndex::default(),
            oid_hasher: FixedState::default(),
            cid_hasher: SeededState::default(),
            accounts: Slab::default(),
            account_index: SlotIndex::default(),
            buy_stops: BTreeMap::new(),
            sell_stops: BTreeMap::new(),
            expiries: BinaryHeap::new(),
            gtd_open: 0,
            cid_window,
            rate_limits,
        }
    }

    /// A book with room for `orders` open orders before any container grows.
    pub fn with_capacity(spec: MarketSpec, orders: usize) -> OrderBook {
        let mut book = OrderBook::new(spec);
        book.orders.reserve(orders);
        book.cids.reserve(orders);
        book.by_oid = SlotIndex::with_capacity(orders);
        book.by_cid = SlotIndex::with_capacity(orders);
        book.bids.reserve(1024);
        book.asks.reserve(1024);
        book
    }

    pub fn spec(&self) -> &MarketSpec {
        &self.spec
    }

    pub fn is_halted(&self) -> bool {
        self.halted
    }

    pub fn last_trade_price(&self) -> Option<Price> {
        self.last_trade_price.map(Price)
    }

    /// The last applied `(seq, pos)`.
    pub fn last_input(&self) -> Option<(Seq, u16)> {
        self.last_input
    }

    pub fn best_bid(&self) -> Option<Price> {
        self.bids.best().map(|li| Price(self.bids.level(li).price))
    }

    pub fn best_ask(&self) -> Option<Price> {
        self.asks.best().map(|li| Price(self.asks.level(li).price))
    }

    /// Number of price levels on one side.
    pub fn level_count(&self, side: Side) -> usize {
        self.ladder(side).len()
    }

    /// Resting orders (stops excluded).
    pub fn order_count(&self) -> usize {
        self.open_count() - self.stop_count()
    }

    /// Stop orders waiting for their trigger.
    pub fn stop_count(&self) -> usize {
        self.buy_stops.len() + self.sell_stops.len()
    }

    /// The best `levels` levels of one side, best first.
    pub fn depth(&self, side: Side, levels: usize) -> Vec<L2Level> {
        self.ladder(side)
            .iter()
            .take(levels)
            .map(|l| L2Level {
                price: Price(l.price),
                qty: Qty(l.shown),
                orders: l.count,
            })
            .collect()
    }

    fn ladder(&self, side: Side) -> &Ladder {
        match side {
            Side::Buy => &self.bids,
            Side::Sell => &self.asks,
        }
    }

    fn ladder_mut(&mut self, side: Side) -> &mut Ladder {
        match side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        }
    }

    /// Applies one command, appending its events to `out`.
    pub fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>) {
        let at = At {
            seq: cmd.seq,
            ts: cmd.ts,
        };
        if self
            .last_input
            .is_some_and(|last| (cmd.seq, cmd.pos) <= last)
        {
            self.reject(cmd, at, RejectReason::SequenceNotIncreasing, None, out);
            return;
        }
        if self.last_input.map(|(seq, _)| seq) != Some(cmd.seq) {
            self.trade_n = 0;
        }
        self.last_input = Some((cmd.seq, cmd.pos));
        if self.rate_limits.is_on() {
            self.rate_limits.tick(cmd.ts);
        }
        if self.cid_window.is_on() {
            self.cid_window.expire(cmd.ts);
        }
        self.expire(at, out);
        match &cmd.op {
            Op::New(order) => self.on_new(cmd, at, order, out),
            Op::Cancel(target) => self.on_cancel(cmd, at, *target, out),
            Op::Amend(amend) => self.on_amend(cmd, at, amend, out),
            Op::CancelAll => self.on_cancel_all(cmd, at, out),
            Op::Halt { cancel_orders } => {
                if self.halted {
                    self.reject(cmd, at, RejectReason::AlreadyHalted, None, out);
                } else {
                    self.halted = true;
                    if *cancel_orders {
                        self.cancel_everything(at, CancelReason::Halt, out);
                    }
                }
            }
            Op::Resume => {
                if self.halted {
                    self.halted = false;
                } else {
                    self.reject(cmd, at, RejectReason::NotHalted, None, out);
                }
            }
            Op::UpdateSpec(rules) => self.on_update_spec(cmd, at, *rules, out),
        }
        self.trigger_stops(at, out);
        // Debug builds walk the whole book after every command while it is small enough for
        // that to stay usable, and every 1024th command beyond; tests call it explicitly.
        #[cfg(debug_assertions)]
        if (self.open_count() <= DEBUG_CHECK_ORDERS_MAX || cmd.seq.is_multiple_of(1024))
            && let Err(e) = self.check_invariants()
        {
            panic!(
                "invariant broken after seq {} pos {}: {e}",
                cmd.seq, cmd.pos
            );
        }
    }

    /// A hint that `cmd` is applied `ahead` commands after the next `apply` (called with 3,
    /// then 2, then 1, so each step finds in cache what the step before asked for): at 3 the
    /// CPU is asked for the index lines a lookup of its order or cid reads; at 2 for the order
    /// (or cid slot) the lookup will compare; at 1, for a cancel or amend, for what removing the
    /// order touches (its level, its neighbours in the level and the account, its cid slot),
    /// and for a `new`, the free slots it will be written to. Reads only what an earlier step
    /// asked for; changes nothing.
    ///
    /// Drivers call it only while `prefetches` says so.
    #[inline]
    pub fn prefetch(&self, cmd: &Command, ahead: usize) {
        match &cmd.op {
            Op::Cancel(target) | Op::Amend(Amend { target, .. }) => match target {
                OrderRef::Oid(oid) => {
                    let hash = self.oid_hasher.hash_one(oid.0);
                    match ahead {
                        3.. => self.by_oid.prefetch(hash),
                        2 => {
                            if let Some(slot) = self.by_oid.candidate(hash) {
                                self.orders.prefetch(slot);
                            }
                        }
                        _ => {
                            if let Some(slot) = self.by_oid.candidate(hash) {
                                self.prefetch_around(slot, oid.0);
                            }
                        }
                    }
                }
                OrderRef::Cid(cid) => {
                    let hash = self.cid_hash(&cmd.account, cid);
                    match ahead {
                        3.. => self.by_cid.prefetch(hash),
                        2 => {
                            if let Some(slot) = self.by_cid.candidate(hash) {
                                self.cids.prefetch(slot);
                            }
                        }
                        _ => {
                            if let Some(slot) = self.by_cid.candidate(hash)
                                && let Some(e) = self.cids.try_get(slot)
                                && e.cid == *cid
                            {
                                self.orders.prefetch(e.order);
                            }
                        }
                    }
                }
            },
            Op::New(o) => match ahead {
                3.. => {
                    if let Some(cid) = &o.cid {
                        self.by_cid.prefetch(self.cid_hash(&cmd.account, cid));
                    }
                }
                2 => {
                    if let Some((level, account)) = self.resting_at(cmd, o) {
                        if let Some(li) = level {
                            self.ladder(o.side).prefetch_level(li);
                        }
                        if let Some(a) = account {
                            self.accounts.prefetch(a);
                        }
                    }
                }
                _ => {
                    self.orders.prefetch_free();
                    if o.cid.is_some() {
                        self.cids.prefetch_free();
                    }
                    // The orders a resting order is linked after: its level's tail and its
                    // account's newest order.
                    if let Some((level, account)) = self.resting_at(cmd, o) {
                        if let Some(li) = level {
                            let tail = self.ladder(o.side).level(li).tail;
                            if tail != NIL {
                                self.orders.prefetch(tail);
                            }
                        }
                        if let Some(a) = account
                            && let Some(slot) = self.accounts.try_get(a)
                            && slot.tail != NIL
                        {
                            self.orders.prefetch(slot.tail);
                        }
                    }
                }
            },
            _ => {}
        }
    }

    /// Whether `prefetch` is worth calling: on a book of `PREFETCH_FROM_ORDERS` open orders or
    /// more. A smaller one stays in the caches, where the hints cost more than they save.
    #[inline]
    pub fn prefetches(&self) -> bool {
        self.by_oid.len() >= PREFETCH_FROM_ORDERS
    }

    /// For a `prefetch` of a limit order that would rest on the book as it is now (it does not
    /// reach the other side's best price): the level it would join, if there is one, and its
    /// account, if it has orders here. `None` for any other order.
    #[inline]
    fn resting_at(&self, cmd: &Command, o: &NewOrder) -> Option<(Option<u32>, Option<u32>)> {
        if o.order_type != OrderType::Limit {
            return None;
        }
        let price = o.price?.0;
        let other = match o.side {
            Side::Buy => &self.asks,
            Side::Sell => &self.bids,
        };
        if let Some(best) = other.best() {
            let best = other.level(best).price;
            let crosses = match o.side {
                Side::Buy => price >= best,
                Side::Sell => price <= best,
            };
            if crosses {
                return None;
            }
        }
        let level = self
            .ladder(o.side)
            .get(key_of(o.side, price, self.spec.tick.0));
        Some((level, self.find_account(&cmd.account)))
    }

    /// `prefetch` of what removing the order in `slot` touches, if it is order `oid`.
    #[inline]
    fn prefetch_around(&self, slot: u32, oid: u64) {
        let Some(o) = self.orders.try_get(slot) else {
            return;
        };
        if o.oid != oid {
            return;
        }
        for s in [o.prev, o.next, o.acct_prev, o.acct_next] {
            if s != NIL {
                self.orders.prefetch(s);
            }
        }
        if o.cid != NIL {
            self.cids.prefetch(o.cid);
        }
        if o.level != NIL {
            self.ladder(o.side).prefetch_level(o.level);
        }
        self.accounts.prefetch(o.account);
    }

    // ----- rejections ---------------------------------------------------------------------

    /// Pushes a rejection; `found` is the target order of a cancel or amend if it was found.
    fn reject(
        &self,
        cmd: &Command,
        at: At,
        reason: RejectReason,
        found: Option<u32>,
        out: &mut Vec<Event>,
    ) {
        let found_order = found.map(|i| &self.orders[i]);
        let target = |r: &OrderRef| match *r {
            OrderRef::Oid(oid) => (
                Some(oid),
                found_order
                    .filter(|o| self.accounts[o.account].name == cmd.account)
                    .and_then(|o| cid_at(&self.cids, o.cid)),
            ),
            OrderRef::Cid(cid) => (found_order.map(|o| OrderId(o.oid)), Some(cid)),
        };
        let (oid, cid, price, qty) = match &cmd.op {
            Op::New(o) => (
                Some(OrderId::from_input(cmd.seq, cmd.pos)),
                o.cid,
                o.price,
                Some(o.qty),
            ),
            Op::Cancel(r) => {
                let (oid, cid) = target(r);
                (oid, cid, None, None)
            }
            Op::Amend(a) => {
                let (oid, cid) = target(&a.target);
                (oid, cid, a.price, a.qty)
            }
            Op::CancelAll | Op::Halt { .. } | Op::Resume => (None, None, None, None),
            Op::UpdateSpec(rules) => (None, None, Some(rules.tick), None),
        };
        out.push(Event::Rejected(Rejected {
            seq: at.seq,
            ts: at.ts,
            op: cmd.op.kind(),
            oid,
            cid,
            account: cmd.account,
            reason,
            price,
            qty,
            retry_after: None,
        }));
    }

    // ----- new ----------------------------------------------------------------------------

    /// Checks a new order; on success returns the hash of its cid (if any), for `store`.
    /// `known_hash` is that hash when the cid window has computed it already.
    fn check_new(
        &self,
        cmd: &Command,
        o: &NewOrder,
        known_hash: Option<u64>,
    ) -> Result<Option<u64>, RejectReason> {
        use RejectReason as R;
        let spec = &self.spec;
        if self.halted {
            return Err(R::Halted);
        }
        let qty = o.qty.0;
        if qty == 0 {
            return Err(R::QtyZero);
        }
        if !on_step(qty, spec.lot.0) {
            return Err(R::QtyNotOnLot);
        }
        if qty < spec.min_qty.0 {
            return Err(R::QtyBelowMin);
        }
        if spec.max_qty.is_some_and(|max| qty > max.0) {
            return Err(R::QtyAboveMax);
        }
        if o.order_type.has_limit_price() {
            match o.price {
                None => return Err(R::PriceMissing),
                Some(Price(0)) => return Err(R::PriceZero),
                Some(p) if !on_step(p.0, spec.tick.0) => return Err(R::PriceNotOnTick),
                Some(_) => {}
            }
        } else if o.price.is_some() {
            return Err(R::PriceNotAllowed);
        }
        if o.order_type.is_stop() {
            match o.stop_price {
                None => return Err(R::StopPriceMissing),
                Some(p) if p.0 == 0 || !on_step(p.0, spec.tick.0) => {
                    return Err(R::StopPriceInvalid);
                }
                Some(_) => {}
            }
        } else if o.stop_price.is_some() {
            return Err(R::StopPriceNotAllowed);
        }
        if !o.order_type.has_limit_price() && !matches!(o.tif, Tif::Ioc | Tif::Fok) {
            return Err(R::TifNotAllowed);
        }
        if let Some(d) = o.display_qty
            && (!o.order_type.has_limit_price()
                || !o.tif.rests()
                || d.0 == 0
                || !on_step(d.0, spec.lot.0)
                || d.0 > qty)
        {
            return Err(R::DisplayQtyInvalid);
        }
        match (o.tif, o.expire_at) {
            (Tif::Gtd, None) => return Err(R::ExpireAtMissing),
            (Tif::Gtd, Some(t)) if t <= cmd.ts => return Err(R::ExpireAtInPast),
            (Tif::Gtd, Some(_)) | (_, None) => {}
            (_, Some(_)) => return Err(R::ExpireAtNotAllowed),
        }
        // The cid's hash, kept for `store`.
        let mut cid_hash = None;
        if let Some(cid) = &o.cid {
            let hash = known_hash.unwrap_or_else(|| self.cid_hash(&cmd.account, cid));
            if self.find_cid_hashed(&cmd.account, cid, hash).is_some() {
                return Err(R::DuplicateCid);
            }
            cid_hash = Some(hash);
        }
        if o.order_type == OrderType::Limit
            && let Some(p) = o.price
            && !self.in_band(o.side, p.0)
        {
            return Err(R::PriceOutOfBand);
        }
        let may_stay = o.order_type.is_stop() || o.tif.rests();
        if may_stay && self.open_count() >= spec.orders_max as usize {
            return Err(R::BookFull);
        }
        Ok(cid_hash)
    }

    /// The per-account limits on a `new` or an `amend` (`new` is the order, if one): `Ok` when
    /// they pass, with what to charge once they all do; otherwise the rejection, already
    /// pushed, and nothing changed.
    #[inline(always)]
    fn check_account_limits(
        &mut self,
        cmd: &Command,
        at: At,
        new: Option<&NewOrder>,
        out: &mut Vec<Event>,
    ) -> bool {
        // Most markets run without limits: that answer costs two loads, not a call.
        if !self.rate_limits.is_on() && self.spec.account_orders_max == 0 {
            return true;
        }
        self.check_account_limits_on(cmd, at, new, out)
    }

    /// `check_account_limits` on a market that has them.
    #[inline(never)]
    fn check_account_limits_on(
        &mut self,
        cmd: &Command,
        at: At,
        new: Option<&NewOrder>,
        out: &mut Vec<Event>,
    ) -> bool {
        let orders_max = self.spec.account_orders_max;
        let hash = self.cid_hasher.hash_one(cmd.account);
        let charge = match self.rate_limits.check(&cmd.account, hash) {
            Ok(charge) => charge,
            Err(over) => {
                self.reject(cmd, at, RejectReason::RateLimited, None, out);
                if let Some(Event::Rejected(r)) = out.last_mut() {
                    r.retry_after = Some(over.retry_after);
                }
                return false;
            }
        };
        if orders_max > 0
            && let Some(o) = new
            && (o.order_type.is_stop() || (o.order_type == OrderType::Limit && o.tif.rests()))
            && self
                .find_account(&cmd.account)
                .is_some_and(|a| self.accounts[a].open >= orders_max)
        {
            self.reject(cmd, at, RejectReason::TooManyOpenOrders, None, out);
            return false;
        }
        self.rate_limits.charge(&cmd.account, charge);
        true
    }

    fn on_new(&mut self, cmd: &Command, at: At, o: &NewOrder, out: &mut Vec<Event>) {
        if !self.check_account_limits(cmd, at, Some(o), out) {
            return;
        }
        let mut known_hash = None;
        if self.cid_window.is_on()
            && let Some(cid) = &o.cid
        {
            let hash = self.cid_hash(&cmd.account, cid);
            if self.cid_window.seen_before(&cmd.account, cid, hash, cmd.ts) {
                return self.reject(cmd, at, RejectReason::DuplicateCid, None, out);
            }
            known_hash = Some(hash);
        }
        let cid_hash = match self.check_new(cmd, o, known_hash) {
            Ok(hash) => hash,
            Err(reason) => return self.reject(cmd, at, reason, None, out),
        };
        let oid = OrderId::from_input(cmd.seq, cmd.pos);
        let stp = o.stp.unwrap_or(self.spec.stp_default);
        out.push(Event::Accepted(Accepted {
            seq: at.seq,
            ts: at.ts,
            order: OrderTag {
                oid,
                cid: o.cid,
                account: cmd.account,
            },
            side: o.side,
            order_type: o.order_type,
            tif: o.tif,
            price: o.price,
            qty: o.qty,
            stop_price: o.stop_price,
            display_qty: o.display_qty,
            expire_at: o.expire_at,
            stp,
        }));
        let mut taker = Taker {
            oid,
            cid: &o.cid,
            account: &cmd.account,
            side: o.side,
            order_type: o.order_type,
            tif: o.tif,
            stp,
            price: o.price.map_or(0, |p| p.0),
            qty: o.qty.0,
            rem: o.qty.0,
            display: o.display_qty.map_or(0, |d| d.0),
            stop_price: o.stop_price.map_or(0, |p| p.0),
            expire_at: o.expire_at,
            created: at.ts,
            slot: None,
            cid_hash,
        };
        if o.order_type.is_stop() {
            let idx = self.store(&taker, taker.rem, true);
            self.stops_mut(taker.side).insert(stop_key(&taker), idx);
            return;
        }
        self.execute(&mut taker, at, out);
    }

    // ----- execution ----------------------------------------------------------------------

    /// The band bounds around the reference price for an order of `side`. Inline up to the
    /// check for a band, which most markets do without.
    #[inline(always)]
    fn band_limit(&self, side: Side) -> Option<u64> {
        let bps = self.spec.price_band_bps?;
        self.band_limit_bps(side, bps)
    }

    fn band_limit_bps(&self, side: Side, bps: u32) -> Option<u64> {
        let bps = u128::from(bps);
        let opposite = self.ladder(side.opposite());
        let reference = self
            .last_trade_price
            .or_else(|| opposite.best().map(|li| opposite.level(li).price))?;
        let r = u128::from(reference);
        Some(match side {
            Side::Buy => u64::try_from(r * (10_000 + bps) / 10_000).unwrap_or(u64::MAX),
            Side::Sell => u64::try_from((r * (10_000 - bps)).div_ceil(10_000)).unwrap_or(u64::MAX),
        })
    }

    #[inline]
    fn in_band(&self, side: Side, price: u64) -> bool {
        match (side, self.band_limit(side)) {
            (_, None) => true,
            (Side::Buy, Some(hi)) => price <= hi,
            (Side::Sell, Some(lo)) => price >= lo,
        }
    }

    /// The lowest opposite-ladder key a taker accepts.
    fn min_key(&self, t: &Taker) -> u64 {
        let tick = self.spec.tick.0;
        if t.order_type.has_limit_price() {
            return key_of(t.side.opposite(), t.price, tick);
        }
        match (t.side, self.band_limit(t.side)) {
            (_, None) => 0,
            // A buy takes asks up to `hi`: tick index at most floor(hi / tick).
            (Side::Buy, Some(hi)) => key_of(Side::Sell, hi, tick),
            // A sell takes bids down to `lo`: tick index at least ceil(lo / tick).
            (Side::Sell, Some(lo)) => lo.div_ceil(tick),
        }
    }

    /// Whether the best level of `ladder` is at or above `min_key`.
    fn reaches(ladder: &Ladder, min_key: u64) -> bool {
        ladder
            .best()
            .is_some_and(|li| ladder.level(li).key >= min_key)
    }

    fn execute(&mut self, t: &mut Taker, at: At, out: &mut Vec<Event>) {
        let min_key = self.min_key(t);
        let opposite = self.ladder(t.side.opposite());
        let (crosses, mut opposite_best) = match opposite.best() {
            Some(li) => {
                let level = opposite.level(li);
                (level.key >= min_key, Some(level.price))
            }
            None => (false, None),
        };
        if t.tif == Tif::PostOnly {
            if crosses {
                self.cancel_taker(t, at, CancelReason::PostOnlyWouldCross, out);
                self.finish(t);
            } else {
                self.rest(t, opposite_best, at.seq);
            }
            return;
        }
        if t.tif == Tif::Fok && !self.fok_fillable(t, min_key) {
            self.cancel_taker(t, at, CancelReason::FokUnfilled, out);
            self.finish(t);
            return;
        }
        if crosses {
            match self.match_taker(t, min_key, at, out) {
                Some(best) => opposite_best = best,
                None => {
                    self.finish(t);
                    return;
                }
            }
        }
        if t.rem == 0 {
            self.finish(t);
        } else if !t.order_type.has_limit_price() {
            self.cancel_taker(t, at, CancelReason::MarketRemainder, out);
            self.finish(t);
        } else if t.tif.rests() {
            self.rest(t, opposite_best, at.seq);
        } else {
            debug_assert!(
                t.tif == Tif::Ioc,
                "a fok order passed its check but did not fill"
            );
            self.cancel_taker(t, at, CancelReason::IocRemainder, out);
            self.finish(t);
        }
    }

    fn fok_fillable(&self, t: &Taker, min_key: u64) -> bool {
        let stp = t.stp;
        let own = |o: &Order| self.accounts[o.account].name == *t.account;
        let mut sum: u64 = 0;
        for level in self.ladder(t.side.opposite()).iter() {
            if level.key < min_key {
                break;
            }
            match stp {
                StpMode::None => sum = sum.saturating_add(level.total),
                StpMode::CancelOldest => {
                    let mut i = level.head;
                    while i != NIL {
                        let o = &self.orders[i];
                        if !own(o) {
                            sum = sum.saturating_add(o.leaves);
                        }
                        i = o.next;
                    }
                }
                StpMode::CancelNewest | StpMode::CancelBoth | StpMode::DecrementAndCancel => {
                    let mut i = level.head;
                    while i != NIL {
                        let o = &self.orders[i];
                        if own(o) {
                            return false;
                        }
                        i = o.next;
                    }
                    sum = sum.saturating_add(level.total);
                }
            }
            if sum >= t.rem {
                return true;
            }
        }
        false
    }

    /// The match loop. Returns None when self-trade prevention ended the taker; else the price
    /// of the best opposite level once the loop stopped with quantity left (None when that
    /// side is empty, or when the taker filled).
    fn match_taker(
        &mut self,
        t: &mut Taker,
        min_key: u64,
        at: At,
        out: &mut Vec<Event>,
    ) -> Option<Option<u64>> {
        let opposite = t.side.opposite();
        while t.rem > 0 {
            let ladder = match opposite {
                Side::Buy => &mut self.bids,
                Side::Sell => &mut self.asks,
            };
            let Some(li) = ladder.best() else { break };
            let level = ladder.level_mut(li);
            if level.key < min_key {
                return Some(Some(level.price));
            }
            let mi = level.head;
            let maker = &mut self.orders[mi];
            if t.stp != StpMode::None && self.accounts[maker.account].name == *t.account {
                if !self.self_trade(t, mi, at, out) {
                    return None;
                }
                continue;
            }
            let fill = t.rem.min(maker.visible);
            maker.visible -= fill;
            maker.leaves -= fill;
            maker.last_seq = at.seq;

            level.shown -= fill;
            level.total -= fill;
            t.rem -= fill;
            self.trade_n += 1;
            self.last_trade_price = Some(maker.price);
            out.push(Event::Trade(Trade {
                seq: at.seq,
                ts: at.ts,
                trade_n: self.trade_n,
                price: Price(maker.price),
                qty: Qty(fill),
                taker_side: t.side,
                maker: OrderTag {
                    oid: OrderId(maker.oid),
                    cid: cid_at(&self.cids, maker.cid),
                    account: self.accounts[maker.account].name,
                },
                maker_leaves: Qty(maker.leaves),
                taker: t.tag(),
                taker_leaves: Qty(t.rem),
            }));
            if maker.leaves == 0 {
                self.unlink_level(opposite, mi);
                self.release(mi);
            } else if maker.visible == 0 {
                // Iceberg: show the next peak and go to the back of the level.
                let show = extra_at(&self.extras, maker.extra)
                    .display
                    .min(maker.leaves);
                maker.visible = show;
                level.shown += show;
                if level.count > 1 {
                    self.unlink_level(opposite, mi);
                    self.link_level(opposite, mi);
                }
            }
        }
        Some(None)
    }

    /// Self-trade prevention between taker `t` and maker `mi` of the same account.
    /// Returns false when the taker is ended.
    fn self_trade(&mut self, t: &mut Taker, mi: u32, at: At, out: &mut Vec<Event>) -> bool {
        match t.stp {
            StpMode::None => true,
            StpMode::CancelNewest => {
                self.cancel_taker(t, at, CancelReason::Stp, out);
                false
            }
            StpMode::CancelOldest => {
                self.cancel_order(mi, at, CancelReason::Stp, out);
                true
            }
            StpMode::CancelBoth => {
                self.cancel_order(mi, at, CancelReason::Stp, out);
                self.cancel_taker(t, at, CancelReason::Stp, out);
                false
            }
            StpMode::DecrementAndCancel => {
                let maker = &self.orders[mi];
                let d = t.rem.min(maker.leaves);
                if d == maker.leaves {
                    self.cancel_order(mi, at, CancelReason::Stp, out);
                } else {
                    self.reduce_resting(mi, d, at.seq);
                    let maker = &self.orders[mi];
                    out.push(Event::Cancelled(Cancelled {
                        seq: at.seq,
                        ts: at.ts,
                        order: self.tag(mi),
                        side: maker.side,
                        reason: CancelReason::Stp,
                        qty: Qty(d),
                        leaves: Qty(maker.leaves),
                    }));
                }
                t.rem -= d;
                t.qty -= d;
                out.push(Event::Cancelled(Cancelled {
                    seq: at.seq,
                    ts: at.ts,
                    order: t.tag(),
                    side: t.side,
                    reason: CancelReason::Stp,
                    qty: Qty(d),
                    leaves: Qty(t.rem),
                }));
                t.rem > 0
            }
        }
    }

    /// Takes `d` (< leaves) off a resting order's leaves and total, keeping its place.
    fn reduce_resting(&mut self, idx: u32, d: u64, seq: Seq) {
        let o = &mut self.orders[idx];
        o.last_seq = seq;
        o.leaves -= d;
        o.qty -= d;
        let shown = o.visible.min(o.leaves);
        let hidden_drop = o.visible - shown;
        o.visible = shown;
        let (side, li) = (o.side, o.level);
        let level = self.ladder_mut(side).level_mut(li);
        level.total -= d;
        level.shown -= hidden_drop;
    }

    /// Cancels the rest of the taker (no book change; `finish` releases its slot if any).
    fn cancel_taker(&mut self, t: &mut Taker, at: At, reason: CancelReason, out: &mut Vec<Event>) {
        out.push(Event::Cancelled(Cancelled {
            seq: at.seq,
            ts: at.ts,
            order: t.tag(),
            side: t.side,
            reason,
            qty: Qty(t.rem),
            leaves: Qty(0),
        }));
        t.rem = 0;
    }

    /// Ends a taker that does not rest: frees its slot if it had one.
    fn finish(&mut self, t: &Taker) {
        if let Some(slot) = t.slot {
            self.release(slot);
        }
    }

    /// Puts the taker's remainder at the back of its level. `opposite_best` is the price of the
    /// best opposite level, as `execute` last read it (nothing changes that side in between).
    fn rest(&mut self, t: &Taker, opposite_best: Option<u64>, seq: Seq) {
        // Only resting can cross a book: check it here, once, in every build. A crash beats a
        // crossed book that goes on trading.
        debug_assert_eq!(
            opposite_best,
            self.ladder(t.side.opposite())
                .best()
                .map(|li| self.ladder(t.side.opposite()).level(li).price)
        );
        if let Some(best) = opposite_best {
            let crosses = match t.side {
                Side::Buy => t.price >= best,
                Side::Sell => t.price <= best,
            };
            assert!(
                !crosses,
                "order {} would rest at {} across the best {}",
                t.oid, t.price, best
            );
        }
        let idx = match t.slot {
            Some(idx) => {
                let o = &mut self.orders[idx];
                o.parked = false;
                o.qty = t.qty;
                o.leaves = t.rem;
                o.price = t.price;
                o.visible = t.visible();
                o.last_seq = seq;
                idx
            }
            None => self.store(t, t.visible(), false),
        };
        self.link_level(t.side, idx);
    }

    // ----- the slab and its indexes -------------------------------------------------------

    /// Stores a new order in the slab and every index (not yet on a level or in the stops),
    /// with what it shows and whether it waits as a stop.
    fn store(&mut self, t: &Taker, visible: u64, parked: bool) -> u32 {
        let idx = self.store_unlinked(t, visible, parked);
        self.link_account(idx);
        idx
    }

    /// `store` but for the account's list.
    #[inline(always)]
    fn store_unlinked(&mut self, t: &Taker, visible: u64, parked: bool) -> u32 {
        let account = self.intern(t.account);
        let cid = match t.cid {
            None => NIL,
            Some(cid) => {
                let hash = match t.cid_hash {
                    Some(hash) => hash,
                    None => self.cid_hash(t.account, cid),
                };
                self.cids.insert(CidSlot {
                    hash,
                    order: NIL,
                    account,
                    cid: *cid,
                })
            }
        };
        let extra = if t.display > 0 || t.stop_price > 0 || t.expire_at.is_some() {
            self.extras.insert(Extra {
                display: t.display,
                stop_price: t.stop_price,
                expire_at: t.expire_at,
            })
        } else {
            NIL
        };
        let order = Order {
            prev: NIL,
            next: NIL,
            level: NIL,
            account,
            acct_prev: NIL,
            acct_next: NIL,
            cid,
            extra,
            leaves: t.rem,
            visible,
            price: t.price,
            oid: t.oid.0,
            qty: t.qty,
            ts: t.created,
            last_seq: t.oid.seq(),
            side: t.side,
            order_type: t.order_type,
            tif: t.tif,
            stp: t.stp,
            parked,
        };
        let idx = self.orders.insert(order);
        let (orders, oid_hasher) = (&self.orders, &self.oid_hasher);
        self.by_oid.insert(oid_hasher.hash_one(t.oid.0), idx, |s| {
            oid_hasher.hash_one(orders[s].oid)
        });
        if cid != NIL {
            self.cids.get_mut(cid).order = idx;
            let cids = &self.cids;
            self.by_cid
                .insert(cids.get(cid).hash, cid, |c| cids.get(c).hash);
        }
        if let Some(at) = t.expire_at {
            self.gtd_open += 1;
            self.expiries.push(Reverse((at, t.oid.0)));
        }
        idx
    }

    /// Appends a stored order to its account's list, which is in oid order: live, orders are
    /// stored in command order; a restore links them in oid order.
    #[inline(always)]
    fn link_account(&mut self, idx: u32) {
        let slot = &mut self.accounts[self.orders[idx].account];
        slot.open += 1;
        let tail = slot.tail;
        slot.tail = idx;
        if tail == NIL {
            slot.head = idx;
        } else {
            self.orders[tail].acct_next = idx;
            self.orders[idx].acct_prev = tail;
        }
    }

    fn intern(&mut self, name: &Account) -> u32 {
        if let Some(id) = self.find_account(name) {
            return id;
        }
        let slot = AccountSlot {
            name: *name,
            open: 0,
            head: NIL,
            tail: NIL,
        };
        let id = self.accounts.insert(slot);
        let (accounts, hasher) = (&self.accounts, &self.oid_hasher);
        self.account_index.insert(hasher.hash_one(name), id, |a| {
            hasher.hash_one(accounts[a].name)
        });
        id
    }

    // ----- index lookups --------------------------------------------------------------------

    #[inline]
    fn find_oid(&self, oid: u64) -> Option<u32> {
        let orders = &self.orders;
        self.by_oid
            .find(self.oid_hasher.hash_one(oid), |s| orders[s].oid == oid)
    }

    /// The hash of (account, cid) in `by_cid`; hashed through references, so neither id is
    /// copied first.
    #[inline]
    fn cid_hash(&self, account: &Account, cid: &Cid) -> u64 {
        self.cid_hasher.hash_one((account, cid))
    }

    #[inline]
    fn find_cid(&self, account: &Account, cid: &Cid) -> Option<u32> {
        self.find_cid_hashed(account, cid, self.cid_hash(account, cid))
    }

    /// The open order of `account` with this cid; cids are indexed by (account name, cid), so
    /// no account lookup comes first.
    #[inline]
    fn find_cid_hashed(&self, account: &Account, cid: &Cid, hash: u64) -> Option<u32> {
        let (accounts, cids) = (&self.accounts, &self.cids);
        self.by_cid
            .find(hash, |c| {
                let e = cids.get(c);
                e.cid == *cid && accounts[e.account].name == *account
            })
            .map(|c| cids.get(c).order)
    }

    #[inline]
    fn find_account(&self, name: &Account) -> Option<u32> {
        let accounts = &self.accounts;
        self.account_index
            .find(self.oid_hasher.hash_one(name), |a| {
                accounts[a].name == *name
            })
    }

    /// Open orders, resting and stops.
    #[inline]
    fn open_count(&self) -> usize {
        self.by_oid.len()
    }

    /// Removes an order that is on no level and in no stop map from every index.
    fn release(&mut self, idx: u32) {
        let o = &self.orders[idx];
        let (oid, account, cid, extra) = (o.oid, o.account, o.cid, o.extra);
        let (prev, next) = (o.acct_prev, o.acct_next);
        self.by_oid.remove(self.oid_hasher.hash_one(oid), idx);
        if cid != NIL {
            self.by_cid.remove(self.cids.get(cid).hash, cid);
            self.cids.remove(cid);
        }
        let expire_at = extra_at(&self.extras, extra).expire_at;
        if extra != NIL {
            self.extras.remove(extra);
        }
        if prev == NIL {
            self.accounts[account].head = next;
        } else {
            self.orders[prev].acct_next = next;
        }
        if next == NIL {
            self.accounts[account].tail = prev;
        } else {
            self.orders[next].acct_prev = prev;
        }
        let slot = &mut self.accounts[account];
        slot.open -= 1;
        if slot.open == 0 {
            let hash = self.oid_hasher.hash_one(slot.name);
            self.account_index.remove(hash, account);
            self.accounts.remove(account);
        }
        if expire_at.is_some() {
            self.gtd_open -= 1;
            if self.expiries.len() > 2 * self.gtd_open + 1024 {
                self.compact_expiries();
            }
        }
        self.orders.remove(idx);
    }

    fn compact_expiries(&mut self) {
        let mut heap = std::mem::take(&mut self.expiries).into_vec();
        heap.retain(|Reverse((_, oid))| self.find_oid(*oid).is_some());
        self.expiries = BinaryHeap::from(heap);
    }

    #[inline(always)]
    fn link_level(&mut self, side: Side, idx: u32) {
        let price = self.orders[idx].price;
        let key = key_of(side, price, self.spec.tick.0);
        let ladder = match side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        };
        let li = ladder.get_or_insert(key, price);
        let level = ladder.level_mut(li);
        let o = &mut self.orders[idx];
        o.level = li;
        level.shown += o.visible;
        level.total += o.leaves;
        level.count += 1;
        o.next = NIL;
        o.prev = level.tail;
        let tail = level.tail;
        level.tail = idx;
        if tail == NIL {
            level.head = idx;
        } else {
            self.orders[tail].next = idx;
        }
    }

    #[inline(always)]
    fn unlink_level(&mut self, side: Side, idx: u32) {
        let o = &self.orders[idx];
        let (prev, next, li, visible, leaves) = (o.prev, o.next, o.level, o.visible, o.leaves);
        let ladder = match side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        };
        let level = ladder.level_mut(li);
        if prev == NIL {
            level.head = next;
        } else {
            self.orders[prev].next = next;
        }
        if next == NIL {
            level.tail = prev;
        } else {
            self.orders[next].prev = prev;
        }
        level.shown -= visible;
        level.total -= leaves;
        level.count -= 1;
        if level.count == 0 {
            ladder.remove(li);
        }
    }

    fn stops_mut(&mut self, side: Side) -> &mut BTreeMap<(u64, u64), u32> {
        match side {
            Side::Buy => &mut self.buy_stops,
            Side::Sell => &mut self.sell_stops,
        }
    }

    fn tag(&self, idx: u32) -> OrderTag {
        let o = &self.orders[idx];
        OrderTag {
            oid: OrderId(o.oid),
            cid: cid_at(&self.cids, o.cid),
            account: self.accounts[o.account].name,
        }
    }

    /// Takes an open order out of its level or the stops, and out of every index.
    fn remove(&mut self, idx: u32) {
        let o = &self.orders[idx];
        if o.parked {
            let (side, key) = (o.side, order_stop_key(o, &self.extras));
            self.stops_mut(side).remove(&key);
        } else {
            self.unlink_level(o.side, idx);
        }
        self.release(idx);
    }

    /// Cancels an open order whole.
    fn cancel_order(&mut self, idx: u32, at: At, reason: CancelReason, out: &mut Vec<Event>) {
        let o = &self.orders[idx];
        out.push(Event::Cancelled(Cancelled {
            seq: at.seq,
            ts: at.ts,
            order: self.tag(idx),
            side: o.side,
            reason,
            qty: Qty(o.leaves),
            leaves: Qty(0),
        }));
        self.remove(idx);
    }

    /// The identity of an open order, for a taker made from it to borrow.
    fn identity(&self, idx: u32) -> (Account, Option<Cid>) {
        let o = &self.orders[idx];
        (self.accounts[o.account].name, cid_at(&self.cids, o.cid))
    }

    fn taker_from<'a>(&self, idx: u32, identity: &'a (Account, Option<Cid>)) -> Taker<'a> {
        let o = &self.orders[idx];
        let extra = extra_at(&self.extras, o.extra);
        Taker {
            oid: OrderId(o.oid),
            cid: &identity.1,
            account: &identity.0,
            side: o.side,
            order_type: o.order_type,
            tif: o.tif,
            stp: o.stp,
            price: o.price,
            qty: o.qty,
            rem: o.leaves,
            display: extra.display,
            stop_price: extra.stop_price,
            expire_at: extra.expire_at,
            created: o.ts,
            slot: Some(idx),
            cid_hash: (o.cid != NIL).then(|| self.cids.get(o.cid).hash),
        }
    }

    // ----- cancel, amend, cancel_all, expiry, stops ----------------------------------------

    /// Finds the target of a cancel or amend sent by `cmd.account`.
    #[inline(always)]
    fn lookup(&self, cmd: &Command, target: OrderRef) -> Result<u32, (RejectReason, Option<u32>)> {
        match target {
            OrderRef::Oid(oid) => {
                let idx = self
                    .find_oid(oid.0)
                    .ok_or((RejectReason::UnknownOrder, None))?;
                let owner = &self.accounts[self.orders[idx].account].name;
                if *owner != cmd.account {
                    return Err((RejectReason::NotOwner, None));
                }
                Ok(idx)
            }
            OrderRef::Cid(cid) => self
                .find_cid(&cmd.account, &cid)
                .ok_or((RejectReason::UnknownOrder, None)),
        }
    }

    fn on_cancel(&mut self, cmd: &Command, at: At, target: OrderRef, out: &mut Vec<Event>) {
        match self.lookup(cmd, target) {
            Ok(idx) => self.cancel_order(idx, at, CancelReason::User, out),
            Err((reason, found)) => self.reject(cmd, at, reason, found, out),
        }
    }

    fn check_amend(
        &self,
        cmd: &Command,
        a: &Amend,
    ) -> Result<(u32, u64, u64), (RejectReason, Option<u32>)> {
        use RejectReason as R;
        if self.halted {
            return Err((R::Halted, None));
        }
        let idx = self.lookup(cmd, a.target)?;
        let fail = |r| Err((r, Some(idx)));
        let o = &self.orders[idx];
        if o.parked {
            return fail(R::NotAmendable);
        }
        if a.qty.is_none() && a.price.is_none() {
            return fail(R::NothingToAmend);
        }
        if let Some(q) = a.qty {
            if q.0 == 0 {
                return fail(R::QtyZero);
            }
            if q.0 % self.spec.lot.0 != 0 {
                return fail(R::QtyNotOnLot);
            }
            if self.spec.max_qty.is_some_and(|max| q > max) {
                return fail(R::QtyAboveMax);
            }
        }
        if let Some(p) = a.price {
            if p.0 == 0 {
                return fail(R::PriceZero);
            }
            if p.0 % self.spec.tick.0 != 0 {
                return fail(R::PriceNotOnTick);
            }
        }
        let qty = a.qty.map_or(o.qty, |q| q.0);
        let price = a.price.map_or(o.price, |p| p.0);
        if qty == o.qty && price == o.price {
            return fail(R::NothingToAmend);
        }
        if price != o.price {
            if !self.in_band(o.side, price) {
                return fail(R::PriceOutOfBand);
            }
            let tick = self.spec.tick.0;
            let crosses = Self::reaches(
                self.ladder(o.side.opposite()),
                key_of(o.side.opposite(), price, tick),
            );
            if o.tif == Tif::PostOnly && crosses {
                return fail(R::PostOnlyWouldCross);
            }
        }
        Ok((idx, qty, price))
    }

    fn on_amend(&mut self, cmd: &Command, at: At, a: &Amend, out: &mut Vec<Event>) {
        if !self.check_account_limits(cmd, at, None, out) {
            return;
        }
        let (idx, qty, price) = match self.check_amend(cmd, a) {
            Ok(v) => v,
            Err((reason, found)) => return self.reject(cmd, at, reason, found, out),
        };
        let o = &self.orders[idx];
        let (side, filled, old_qty, old_price, display) = (
            o.side,
            o.qty - o.leaves,
            o.qty,
            o.price,
            extra_at(&self.extras, o.extra).display,
        );
        let amended = |book: &OrderBook, leaves: u64, priority_kept: bool| {
            Event::Amended(Amended {
                seq: at.seq,
                ts: at.ts,
                order: book.tag(idx),
                side,
                price: Price(price),
                qty: Qty(qty),
                leaves: Qty(leaves),
                priority_kept,
            })
        };
        if qty <= filled {
            out.push(amended(self, 0, false));
            self.remove(idx);
            return;
        }
        let leaves = qty - filled;
        if price == old_price && qty < old_qty {
            let d = old_qty - qty;
            self.reduce_resting(idx, d, at.seq);
            out.push(amended(self, leaves, true));
            return;
        }
        self.unlink_level(side, idx);
        let o = &mut self.orders[idx];
        o.qty = qty;
        o.leaves = leaves;
        o.price = price;
        o.last_seq = at.seq;
        o.visible = if display > 0 {
            display.min(leaves)
        } else {
            leaves
        };
        out.push(amended(self, leaves, false));
        if price == old_price {
            self.link_level(side, idx);
        } else {
            let identity = self.identity(idx);
            let mut t = self.taker_from(idx, &identity);
            self.execute(&mut t, at, out);
        }
    }

    fn on_cancel_all(&mut self, cmd: &Command, at: At, out: &mut Vec<Event>) {
        let Some(acct) = self.find_account(&cmd.account) else {
            return;
        };
        let mut idx = self.accounts[acct].head;
        while idx != NIL {
            // Read the next link first: cancelling frees this slot (and, last, the account).
            let next = self.orders[idx].acct_next;
            self.cancel_order(idx, at, CancelReason::CancelAll, out);
            idx = next;
        }
    }

    /// Cancels every open order in oid order (halt with `cancel_orders`).
    fn cancel_everything(&mut self, at: At, reason: CancelReason, out: &mut Vec<Event>) {
        let mut all: Vec<(u64, u32)> = self
            .by_oid
            .iter()
            .map(|idx| (self.orders[idx].oid, idx))
            .collect();
        all.sort_unstable();
        for (_, idx) in all {
            self.cancel_order(idx, at, reason, out);
        }
    }

    fn expire(&mut self, at: At, out: &mut Vec<Event>) {
        while let Some(&Reverse((expire_at, oid))) = self.expiries.peek() {
            if expire_at > at.ts {
                break;
            }
            self.expiries.pop();
            if let Some(idx) = self.find_oid(oid) {
                self.cancel_order(idx, at, CancelReason::Expired, out);
            }
        }
    }

    fn trigger_stops(&mut self, at: At, out: &mut Vec<Event>) {
        if self.buy_stops.is_empty() && self.sell_stops.is_empty() {
            return;
        }
        while !self.halted {
            let Some(last) = self.last_trade_price else {
                return;
            };
            let buy = self
                .buy_stops
                .first_key_value()
                .filter(|((stop, _), _)| *stop <= last)
                .map(|(&(_, oid), &idx)| (oid, idx));
            let sell = self
                .sell_stops
                .first_key_value()
                .filter(|((inv, _), _)| !*inv >= last)
                .map(|(&(_, oid), &idx)| (oid, idx));
            let idx = match (buy, sell) {
                (Some(b), Some(s)) => {
                    if b.0 < s.0 {
                        b.1
                    } else {
                        s.1
                    }
                }
                (Some(b), None) => b.1,
                (None, Some(s)) => s.1,
                (None, None) => return,
            };
            let o = &mut self.orders[idx];
            o.parked = false;
            let extra = extra_at(&self.extras, o.extra);
            let (side, key, stop_price, order_type) = (
                o.side,
                order_stop_key(o, &self.extras),
                extra.stop_price,
                o.order_type,
            );
            self.stops_mut(side).remove(&key);
            out.push(Event::Triggered(Triggered {
                seq: at.seq,
                ts: at.ts,
                order: self.tag(idx),
                side,
                order_type,
                stop_price: Price(stop_price),
                last_price: Price(last),
            }));
            let identity = self.identity(idx);
            let mut t = self.taker_from(idx, &identity);
            self.execute(&mut t, at, out);
        }
    }

    // ----- snapshot, restore, hash, invariants ---------------------------------------------

    fn record(&self, idx: u32) -> OrderRecord {
        let o = &self.orders[idx];
        let extra = extra_at(&self.extras, o.extra);
        OrderRecord {
            oid: OrderId(o.oid),
            account: self.accounts[o.account].name,
            cid: cid_at(&self.cids, o.cid),
            side: o.side,
            order_type: o.order_type,
            tif: o.tif,
            price: o.order_type.has_limit_price().then_some(Price(o.price)),
            stop_price: o.order_type.is_stop().then_some(Price(extra.stop_price)),
            qty: Qty(o.qty),
            filled: Qty(o.qty - o.leaves),
            leaves: Qty(o.leaves),
            visible: Qty(o.visible),
            display_qty: (extra.display > 0).then_some(Qty(extra.display)),
            expire_at: extra.expire_at,
            stp: o.stp,
            ts: o.ts,
            last_seq: o.last_seq,
        }
    }

    fn side_records(&self, side: Side) -> Vec<OrderRecord> {
        self.side_slots(side).map(|i| self.record(i)).collect()
    }

    /// New market rules. Rare (an operator's `market.update`), so it may walk the book: a
    /// new tick is refused while an open order's price or stop price is off it, and otherwise
    /// rebuilds the book, whose ladder is indexed in ticks.
    fn on_update_spec(&mut self, cmd: &Command, at: At, rules: SpecRules, out: &mut Vec<Event>) {
        if rules.tick == self.spec.tick {
            self.spec = self.spec.with_rules(rules);
            self.cid_window
                .configure(rules.cid_window_secs, rules.cid_window_orders);
            self.rate_limits.configure(self.spec.account_rate_ns());
            return;
        }
        let mut snapshot = self.snapshot();
        let off_tick = |p: &Option<Price>| p.is_some_and(|p| p.0 % rules.tick.0 != 0);
        if snapshot
            .bids
            .iter()
            .chain(&snapshot.asks)
            .chain(&snapshot.stops)
            .any(|o| off_tick(&o.price) || off_tick(&o.stop_price))
        {
            self.reject(cmd, at, RejectReason::OrdersOffTick, None, out);
            return;
        }
        snapshot.spec = self.spec.with_rules(rules);
        // The window under its new limits, as `configure` leaves it.
        if rules.cid_window_secs == 0 {
            snapshot.cid_window.clear();
        }
        let over = snapshot
            .cid_window
            .len()
            .saturating_sub(rules.cid_window_orders as usize);
        snapshot.cid_window.drain(..over);
        // The rate limit under its new rule, as `configure` leaves it.
        if rules.account_rate == 0 {
            snapshot.rate_clock = 0;
            snapshot.rate_debts.clear();
        }
        match OrderBook::restore(&snapshot) {
            Ok(book) => *self = book,
            // A book that cannot be rebuilt from its own snapshot is a bug: stop rather than
            // match on a book in doubt.
            Err(e) => panic!("the book cannot be rebuilt under its new tick: {e}"),
        }
    }

    /// The open orders of `account` (resting and waiting stops) in oid order, those after
    /// `after` (paging), at most `limit`; and whether more follow. Each says whether it is a
    /// stop waiting for its trigger. O(the account's open orders).
    pub fn open_orders(
        &self,
        account: &Account,
        after: Option<OrderId>,
        limit: usize,
    ) -> (Vec<OpenOrder>, bool) {
        let mut orders = Vec::new();
        let Some(a) = self.find_account(account) else {
            return (orders, false);
        };
        let mut idx = self.accounts[a].head;
        while idx != NIL {
            let o = &self.orders[idx];
            if after.is_none_or(|after| o.oid > after.0) {
                if orders.len() == limit {
                    return (orders, true);
                }
                orders.push(OpenOrder {
                    record: self.record(idx),
                    waiting: o.parked,
                });
            }
            idx = o.acct_next;
        }
        (orders, false)
    }

    /// The open order of `account` named by oid or cid; `None` when it is not open, or is
    /// another account's.
    pub fn open_order(&self, account: &Account, target: OrderRef) -> Option<OpenOrder> {
        let idx = match target {
            OrderRef::Oid(oid) => self.find_oid(oid.0)?,
            OrderRef::Cid(cid) => self.find_cid(account, &cid)?,
        };
        let o = &self.orders[idx];
        (self.accounts[o.account].name == *account).then(|| OpenOrder {
            record: self.record(idx),
            waiting: o.parked,
        })
    }

    /// The canonical content of the book.
    pub fn snapshot(&self) -> BookSnapshot {
        let mut stops: Vec<OrderRecord> = self
            .buy_stops
            .values()
            .chain(self.sell_stops.values())
            .map(|&i| self.record(i))
            .collect();
        stops.sort_by_key(|r| r.oid);
        BookSnapshot {
            format_version: SNAPSHOT_FORMAT_VERSION,
            spec: self.spec.clone(),
            halted: self.halted,
            last_trade_price: self.last_trade_price.map(Price),
            last_input: self.last_input,
            trade_n: self.trade_n,
            bids: self.side_records(Side::Buy),
            asks: self.side_records(Side::Sell),
            stops,
            cid_window: self.cid_window.iter().copied().collect(),
            rate_clock: self.rate_limits.clock(),
            rate_debts: self.rate_limits.debts(),
        }
    }

    /// The hash of `snapshot()` (`HashVersion::CURRENT`), computed from the book as it stands,
    /// one order at a time: no copy of the book into records first (a book of 20,000 orders
    /// would copy ~3 MB).
    pub fn state_hash(&self) -> StateHash {
        self.state_hash_as(HashVersion::CURRENT)
    }

    /// The same in `version`: a snapshot's restore checks the hash it stores in its own.
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
            self.last_trade_price.map(Price),
            self.last_input,
            self.trade_n,
        )
    }

    fn hash_fnv1(&self) -> StateHash {
        let mut h = self.hash_with(Fnv::new());
        for (tag, side) in [("bids", Side::Buy), ("asks", Side::Sell)] {
            let ladder = self.ladder(side);
            let len = ladder.iter().map(|l| l.count as usize).sum();
            h.orders(tag, len, self.side_slots(side).map(|i| self.record(i)));
        }
        let mut stops: Vec<(u64, u32)> = self
            .buy_stops
            .values()
            .chain(self.sell_stops.values())
            .map(|&i| (self.orders[i].oid, i))
            .collect();
        stops.sort_unstable();
        h.orders(
            "stops",
            stops.len(),
            stops.iter().map(|&(_, i)| self.record(i)),
        );
        self.finish_hash(h)
    }

    /// The orders as they lie in the slab, each with its place (`state_hash::Place`).
    fn hash_words2(&self) -> StateHash {
        let mut h = self.hash_with(Words::new());
        let mut set = OrderSet::default();
        for (i, o) in self.orders.iter() {
            let at = if o.parked {
                Place::Stop
            } else {
                let prev = (o.prev != NIL).then(|| self.orders[o.prev].oid);
                Place::Rests { prev }
            };
            set.add(&self.record(i), at);
        }
        h.order_set(set);
        self.finish_hash(h)
    }

    fn finish_hash<D: Digest>(&self, h: StateHasher<'_, D>) -> StateHash {
        let debts = self.rate_limits.debts();
        h.finish(
            self.cid_window.len(),
            self.cid_window.iter(),
            self.rate_limits.clock(),
            &debts,
        )
    }

    /// The slots of `side`'s resting orders, best level first, each level in queue order.
    fn side_slots(&self, side: Side) -> impl Iterator<Item = u32> + '_ {
        self.ladder(side).iter().flat_map(move |level| {
            std::iter::successors((level.head != NIL).then_some(level.head), move |&i| {
                let next = self.orders[i].next;
                (next != NIL).then_some(next)
            })
        })
    }

    /// Rebuilds a book from a snapshot, checking that it is consistent.
    pub fn restore(s: &BookSnapshot) -> Result<OrderBook, RestoreError> {
        let bad = |m: String| RestoreError::Inconsistent(m);
        if s.format_version != SNAPSHOT_FORMAT_VERSION {
            return Err(RestoreError::Version {
                found: s.format_version,
                expected: SNAPSHOT_FORMAT_VERSION,
            });
        }
        match s.spec.to_input().validate() {
            Ok(spec) if spec == s.spec => {}
            Ok(_) => return Err(bad("the market spec does not round-trip".into())),
            Err(e) => return Err(bad(format!("the market spec is invalid: {e}"))),
        }
        s.check_records()?;
        // Sized to what the snapshot holds and an eighth more: a node restarts thousands of
        // these, so not the doubling a growing book has, but a book sized exactly grows on its
        // first order that rests, copying every order inside that one command (~10 ms at
        // 1,000,000), and a book moved or failed over is taking orders at once.
        let records = || s.bids.iter().chain(&s.asks).chain(&s.stops);
        let with_cid = records().filter(|r| r.cid.is_some()).count();
        let with_extra = records()
            .filter(|r| r.display_qty.is_some() || r.stop_price.is_some() || r.expire_at.is_some())
            .count();
        let room = |n: usize| n + n / 8 + 16;
        let mut book = OrderBook::new(s.spec.clone());
        book.orders
            .reserve(room(s.bids.len() + s.asks.len() + s.stops.len()));
        book.by_oid = SlotIndex::with_capacity(book.orders.capacity());
        book.cids.reserve(room(with_cid));
        book.by_cid = SlotIndex::with_capacity(book.cids.capacity());
        book.extras.reserve(room(with_extra));
        book.halted = s.halted;
        book.last_trade_price = s.last_trade_price.map(|p| p.0);
        book.last_input = s.last_input;
        book.trade_n = s.trade_n;
        // Orders go into the slab in listing order, onto their levels as they go: records and
        // slab are both read and written in memory order, and each queue lies in the slab as
        // it will be walked. Account lists are in oid order, as live, so they are linked in a
        // second pass in oid order: the one pass that reaches orders at random. (Two passes
        // that each did, records then orders, were two thirds of a restore.)
        let lists = [(&s.bids, 0u8), (&s.asks, 1), (&s.stops, 2)];
        let listed = lists.iter().flat_map(|&(records, _)| records);
        // Each oid beside its place in the listing, sorted: an oid twice sits side by side.
        let mut by_oid_order: Vec<(u64, u32)> =
            listed.zip(0u32..).map(|(r, at)| (r.oid.0, at)).collect();
        by_oid_order.sort_unstable();
        if let Some(w) = by_oid_order.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(bad(format!("order {} appears twice", OrderId(w[0].0))));
        }
        let mut slots = Vec::with_capacity(by_oid_order.len());
        for (records, list) in lists {
            for r in records {
                // Hashed once, for the probe and for the store.
                let cid_hash = r.cid.as_ref().map(|cid| book.cid_hash(&r.account, cid));
                if let (Some(cid), Some(hash)) = (&r.cid, cid_hash)
                    && book.find_cid_hashed(&r.account, cid, hash).is_some()
                {
                    return Err(bad(format!(
                        "account {} has two open orders with cid {cid}",
                        r.account
                    )));
                }
                let t = Taker {
                    oid: r.oid,
                    cid: &r.cid,
                    account: &r.account,
                    side: r.side,
                    order_type: r.order_type,
                    tif: r.tif,
                    stp: r.stp,
                    price: r.price.map_or(0, |p| p.0),
                    qty: r.qty.0,
                    rem: r.leaves.0,
                    display: r.display_qty.map_or(0, |d| d.0),
                    stop_price: r.stop_price.map_or(0, |p| p.0),
                    expire_at: r.expire_at,
                    created: r.ts,
                    slot: None,
                    cid_hash,
                };
                let idx = book.store_unlinked(&t, r.visible.0, list == 2);
                // Snapshots of older builds have no last sequence: the order's own is the best
                // known.
                book.orders[idx].last_seq = if r.last_seq == 0 {
                    r.oid.seq()
                } else {
                    r.last_seq
                };
                if list == 2 {
                    let key = order_stop_key(&book.orders[idx], &book.extras);
                    book.stops_mut(r.side).insert(key, idx);
                } else {
                    book.link_level(r.side, idx);
                }
                slots.push(idx);
            }
        }
        // Each order's fetch asked for a few orders ahead: they are independent of one another.
        const AHEAD: usize = 8;
        for (k, &(_, at)) in by_oid_order.iter().enumerate() {
            if let Some(&(_, ahead)) = by_oid_order.get(k + AHEAD) {
                book.orders.prefetch(slots[ahead as usize]);
            }
            book.link_account(slots[at as usize]);
        }
        // The records kept their rules (`check_records`), and the book was built of them by the
        // code every command runs, as they were listed: best price first, so each queue is in
        // its listed order. What is left to refuse needs the whole book. The structures
        // themselves are checked whole where that code is tested (O(open orders), as long as
        // a release restore): debug builds here and after every command; the tests on every
        // book they restore, damaged snapshots among them (tests/engine/oracle.rs).
        if cfg!(debug_assertions) {
            book.check_invariants().map_err(bad)?;
        }
        for side in [Side::Buy, Side::Sell] {
            book.ladder(side).check().map_err(bad)?;
        }
        if let (Some(b), Some(a)) = (book.best_bid(), book.best_ask())
            && b >= a
        {
            return Err(bad(format!(
                "the book is crossed: best bid {} >= best ask {}",
                b.0, a.0
            )));
        }
        s.check_cid_window()?;
        for seen in &s.cid_window {
            let hash = book.cid_hash(&seen.account, &seen.cid);
            if book
                .cid_window
                .seen_before(&seen.account, &seen.cid, hash, seen.ts)
            {
                return Err(bad(format!(
                    "the cid window holds cid {} of {} twice",
                    seen.cid, seen.account
                )));
            }
        }
        s.check_rate_limits()?;
        let hasher = &book.cid_hasher;
        book.rate_limits
            .restore(s.rate_clock, &s.rate_debts, |a| hasher.hash_one(a));
        Ok(book)
    }

    /// Checks every structural invariant; O(open orders). Run after every command in debug
    /// builds and tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.cid_window.len() > self.spec.cid_window_orders as usize
            || (!self.cid_window.is_on() && self.cid_window.len() > 0)
        {
            return Err(format!(
                "the cid window holds {} entries (cap {}, {} s)",
                self.cid_window.len(),
                self.spec.cid_window_orders,
                self.spec.cid_window_secs
            ));
        }
        let mut seen = 0usize;
        // No allocation here: debug builds run this after every command, and the allocation
        // proof counts them. Per-account counts are checked through the account lists below.
        let mut in_accounts = 0usize;
        for side in [Side::Buy, Side::Sell] {
            let ladder = self.ladder(side);
            ladder.check()?;
            let mut last_key = None;
            for level in ladder.iter() {
                if last_key.is_some_and(|k| k <= level.key) {
                    return Err(format!("{} levels out of order", side.as_str()));
                }
                last_key = Some(level.key);
                let tick = self.spec.tick.0;
                if level.key != key_of(side, level.price, tick)
                    || level.price % tick != 0
                    || level.count == 0
                {
                    return Err(format!(
                        "level {} has a bad key, is off the tick, or is empty",
                        level.price
                    ));
                }
                let (mut shown, mut total, mut count) = (0u64, 0u64, 0u32);
                let mut prev = NIL;
                let mut i = level.head;
                while i != NIL {
                    let o = &self.orders[i];
                    if o.prev != prev || o.side != side || o.price != level.price || o.parked {
                        return Err(format!(
                            "order {} is badly linked in level {}",
                            o.oid, level.price
                        ));
                    }
                    if o.leaves == 0 || o.visible == 0 || o.visible > o.leaves {
                        return Err(format!(
                            "order {} rests with leaves {} shown {}",
                            o.oid, o.leaves, o.visible
                        ));
                    }
                    let display = extra_at(&self.extras, o.extra).display;
                    if (display == 0 && o.visible != o.leaves)
                        || (display > 0 && o.visible > display)
                    {
                        return Err(format!(
                            "order {} shows {} of display {}",
                            o.oid, o.visible, display
                        ));
                    }
                    // Filled is `qty - leaves`, so quantity is conserved by construction as
                    // long as leaves never exceed the total.
                    if o.leaves > o.qty {
                        return Err(format!(
                            "order {}: leaves {} exceed qty {}",
                            o.oid, o.leaves, o.qty
                        ));
                    }
                    if self.find_oid(o.oid) != Some(i) {
                        return Err(format!("order {} is not indexed", o.oid));
                    }
                    shown += o.visible;
                    total += o.leaves;
                    count += 1;
                    if self.accounts[o.account].open == 0 {
                        return Err(format!("order {} belongs to a closed account slot", o.oid));
                    }
                    prev = i;
                    i = o.next;
                }
                if prev != level.tail
                    || shown != level.shown
                    || total != level.total
                    || count != level.count
                {
                    return Err(format!(
                        "level {} totals disagree with its orders",
                        level.price
                    ));
                }
                seen += count as usize;
            }
        }
        if let (Some(b), Some(a)) = (self.best_bid(), self.best_ask())
            && b >= a
        {
            return Err(format!("crossed: bid {} >= ask {}", b.0, a.0));
        }
        for (side, stops) in [(Side::Buy, &self.buy_stops), (Side::Sell, &self.sell_stops)] {
            for (key, &i) in stops {
                let o = &self.orders[i];
                if !o.parked
                    || o.side != side
                    || order_stop_key(o, &self.extras) != *key
                    || self.find_oid(o.oid) != Some(i)
                {
                    return Err(format!("stop {} is badly indexed", o.oid));
                }
                if o.leaves != o.qty {
                    return Err(format!("stop {} has fills before its trigger", o.oid));
                }
                if self.accounts[o.account].open == 0 {
                    return Err(format!("stop {} belongs to a closed account slot", o.oid));
                }
                seen += 1;
            }
        }
        if seen != self.open_count() {
            return Err(format!(
                "{} orders indexed, {} on the book",
                self.open_count(),
                seen
            ));
        }
        for c in self.by_cid.iter() {
            let e = self.cids.get(c);
            let o = &self.orders[e.order];
            let name = self.accounts[o.account].name;
            if o.cid != c
                || e.account != o.account
                || self.find_cid(&name, &e.cid) != Some(e.order)
                || self.find_oid(o.oid) != Some(e.order)
            {
                return Err(format!("order {} is badly indexed by cid", o.oid));
            }
        }
        let with_cid = self
            .by_oid
            .iter()
            .filter(|&i| self.orders[i].cid != NIL)
            .count();
        if with_cid != self.by_cid.len() || with_cid != self.cids.len() {
            return Err("cid index size disagrees with the orders".into());
        }
        for id in self.account_index.iter() {
            let slot = &self.accounts[id];
            let name = slot.name;
            if self.find_account(&name) != Some(id) || slot.open == 0 {
                return Err(format!(
                    "account {name} is badly indexed or has no open order"
                ));
            }
            in_accounts += slot.open as usize;
            let (mut n, mut prev, mut i, mut last_oid) = (0u32, NIL, slot.head, 0u64);
            while i != NIL {
                let o = &self.orders[i];
                if o.account != id
                    || o.acct_prev != prev
                    || o.oid <= last_oid
                    || self.find_oid(o.oid) != Some(i)
                {
                    return Err(format!(
                        "account {name}'s order list is broken at {}",
                        o.oid
                    ));
                }
                n += 1;
                last_oid = o.oid;
                prev = i;
                i = o.acct_next;
            }
            if n != slot.open || prev != slot.tail {
                return Err(format!(
                    "account {name}'s order list holds {n}, expected {}",
                    slot.open
                ));
            }
        }
        // Every open order is on exactly one account's list.
        if in_accounts != self.open_count() {
            return Err(format!(
                "account lists hold {in_accounts} orders, {} are open",
                self.open_count()
            ));
        }
        let gtd = self
            .by_oid
            .iter()
            .filter(|&i| {
                extra_at(&self.extras, self.orders[i].extra)
                    .expire_at
                    .is_some()
            })
            .count();
        let with_extra = self
            .by_oid
            .iter()
            .filter(|&i| self.orders[i].extra != NIL)
            .count();
        if with_extra != self.extras.len() {
            return Err(format!(
                "{with_extra} open orders have extra fields, {} are stored",
                self.extras.len()
            ));
        }
        if gtd != self.gtd_open {
            return Err(format!("{gtd} gtd orders open, counted {}", self.gtd_open));
        }
        Ok(())
    }
}

/// Whether `value` is a whole number of `step`s (no division for the common step of 1).
#[inline]
fn on_step(value: u64, step: u64) -> bool {
    step == 1 || value.is_multiple_of(step)
}

fn stop_key(t: &Taker) -> (u64, u64) {
    match t.side {
        Side::Buy => (t.stop_price, t.oid.0),
        Side::Sell => (!t.stop_price, t.oid.0),
    }
}

fn order_stop_key(o: &Order, extras: &Slab<Extra>) -> (u64, u64) {
    let stop_price = extra_at(extras, o.extra).stop_price;
    match o.side {
        Side::Buy => (stop_price, o.oid),
        Side::Sell => (!stop_price, o.oid),
    }
}
