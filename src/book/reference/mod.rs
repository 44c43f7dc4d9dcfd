//! The reference book: a naive, obviously correct implementation of the rules written in the
//! module doc of `book` ("The rules"), kept as the oracle the fast [`OrderBook`](super::OrderBook)
//! is tested against and as the baseline the benches measure it by.
//!
//! It is a plain `BTreeMap<Price, VecDeque<OrderId>>` per side, a `HashMap` of open orders (each
//! held as its snapshot [`OrderRecord`]), a hash index of client order ids, a `BTreeSet` of
//! waiting stops scanned whenever stops may trigger, and a `BTreeSet` of GTD expiries. Each rule
//! is written once, in the order the rules give it, so a reader can check the code against the
//! text line by line. This file must never share code or data structures with the fast book,
//! and never trade clarity for speed.

use std::cmp::min;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use super::cid_window::CidSeen;
use super::command::{Amend, Command, NewOrder, Op, OpKind, OrderRef};
use super::event::{
    Accepted, Amended, CancelReason, Cancelled, Event, OrderTag, RejectReason, Rejected, Trade,
    Triggered,
};
use super::limits::RateDebt;
use super::num::{Price, Qty};
use super::snapshot::{BookSnapshot, L2Level, OrderRecord, RestoreError, SNAPSHOT_FORMAT_VERSION};
use super::spec::{MarketSpec, SpecRules};
use super::state_hash::StateHash;
use super::types::{Account, Cid, OrderId, OrderType, Seq, Side, StpMode, Tif, Timestamp};

mod state;

/// A price level: the ids of its orders, oldest first.
type Level = VecDeque<OrderId>;

/// The naive book. See the module doc.
#[derive(Clone, Debug)]
pub struct ReferenceBook {
    spec: MarketSpec,
    halted: bool,
    last_trade_price: Option<Price>,
    last_input: Option<(Seq, u16)>,
    /// Fills so far within `last_input.0`.
    trade_n: u32,
    bids: BTreeMap<Price, Level>,
    asks: BTreeMap<Price, Level>,
    /// Stop orders waiting for their trigger.
    stops: BTreeSet<OrderId>,
    /// Every open order, resting or waiting stop.
    orders: HashMap<OrderId, OrderRecord>,
    /// `(account, cid)` of every open order that has a cid.
    cids: HashMap<(Account, Cid), OrderId>,
    /// `(expire_at, oid)` of every open GTD order.
    expiries: BTreeSet<(Timestamp, OrderId)>,
    /// The cid window: (account, cid, ts) of recent `new`s, oldest first, and the same keys
    /// as a set.
    window: VecDeque<CidSeen>,
    window_keys: HashSet<(Account, Cid)>,
    /// The per-account rate limit: its clock, and each account's theoretical arrival time
    /// (what is at or behind the clock counts as nothing; `snapshot` leaves it out).
    rate_clock: Timestamp,
    rate_tat: BTreeMap<Account, Timestamp>,
}

/// What every event of one command shares.
#[derive(Clone, Copy)]
struct Ctx {
    seq: Seq,
    pos: u16,
    ts: Timestamp,
}

/// A rejection with only the common fields filled in.
fn rejection(ctx: Ctx, op: OpKind, account: Account, reason: RejectReason) -> Rejected {
    Rejected {
        seq: ctx.seq,
        ts: ctx.ts,
        op,
        oid: None,
        cid: None,
        account,
        reason,
        price: None,
        qty: None,
        retry_after: None,
    }
}

fn tag(o: &OrderRecord) -> OrderTag {
    OrderTag {
        oid: o.oid,
        cid: o.cid,
        account: o.account,
    }
}

fn push_cancelled(out: &mut Vec<Event>, ctx: Ctx, o: &OrderRecord, reason: CancelReason, qty: Qty) {
    out.push(Event::Cancelled(Cancelled {
        seq: ctx.seq,
        ts: ctx.ts,
        order: tag(o),
        side: o.side,
        reason,
        qty,
        leaves: o.leaves,
    }));
}

/// What an order shows on the book when it (re)enters a level: all of it, or an iceberg's peak.
fn shown(o: &OrderRecord) -> Qty {
    match o.display_qty {
        Some(d) => min(d, o.leaves),
        None => o.leaves,
    }
}

/// Whether a taker on `side` with worst acceptable price `limit` (none: any) takes `level`.
fn accepts(side: Side, limit: Option<Price>, level: Price) -> bool {
    match (side, limit) {
        (_, None) => true,
        (Side::Buy, Some(limit)) => level <= limit,
        (Side::Sell, Some(limit)) => level >= limit,
    }
}

fn inconsistent(message: String) -> RestoreError {
    RestoreError::Inconsistent(message)
}

impl ReferenceBook {
    pub fn new(spec: MarketSpec) -> ReferenceBook {
        ReferenceBook {
            spec,
            halted: false,
            last_trade_price: None,
            last_input: None,
            trade_n: 0,
            bids: BTreeMap::new(),
            asks: BTreeMap::new(),
            stops: BTreeSet::new(),
            orders: HashMap::new(),
            cids: HashMap::new(),
            expiries: BTreeSet::new(),
            window: VecDeque::new(),
            window_keys: HashSet::new(),
            rate_clock: 0,
            rate_tat: BTreeMap::new(),
        }
    }

    pub fn spec(&self) -> &MarketSpec {
        &self.spec
    }

    /// Applies one command and appends what happened to `out`.
    pub fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>) {
        let ctx = Ctx {
            seq: cmd.seq,
            pos: cmd.pos,
            ts: cmd.ts,
        };
        // (1) Sequence.
        if self
            .last_input
            .is_some_and(|last| (cmd.seq, cmd.pos) <= last)
        {
            self.reject_unsequenced(ctx, cmd, out);
            return;
        }
        // (2) Trade counter.
        if self.last_input.map(|(seq, _)| seq) != Some(cmd.seq) {
            self.trade_n = 0;
        }
        self.last_input = Some((cmd.seq, cmd.pos));
        // The rate limit's clock never runs backwards.
        if self.spec.account_rate > 0 {
            self.rate_clock = self.rate_clock.max(ctx.ts);
        }
        // (3) The cid window forgets what is as old as the window; GTD expiry.
        self.forget_old_cids(ctx.ts);
        self.expire(ctx, out);
        // (4) The operation.
        match &cmd.op {
            Op::New(new) => self.new_order(ctx, cmd.account, new, out),
            Op::Cancel(target) => self.cancel(ctx, cmd.account, *target, out),
            Op::Amend(amend) => self.amend(ctx, cmd.account, amend, out),
            Op::CancelAll => self.cancel_all(ctx, cmd.account, out),
            Op::Halt { cancel_orders } => self.halt(ctx, cmd.account, *cancel_orders, out),
            Op::Resume => self.resume(ctx, cmd.account, out),
            Op::UpdateSpec(rules) => self.update_spec(ctx, cmd.account, *rules, out),
        }
        // (5) Stops.
        self.trigger_stops(ctx, out);
    }

    fn reject_unsequenced(&self, ctx: Ctx, cmd: &Command, out: &mut Vec<Event>) {
        let base = rejection(
            ctx,
            cmd.op.kind(),
            cmd.account,
            RejectReason::SequenceNotIncreasing,
        );
        let rejected = match &cmd.op {
            Op::New(new) => Rejected {
                oid: Some(OrderId::from_input(ctx.seq, ctx.pos)),
                cid: new.cid,
                price: new.price,
                qty: Some(new.qty),
                ..base
            },
            Op::Cancel(target) => {
                let (oid, cid) = self.target_ids(cmd.account, *target, None);
                Rejected { oid, cid, ..base }
            }
            Op::Amend(amend) => {
                let (oid, cid) = self.target_ids(cmd.account, amend.target, None);
                Rejected {
                    oid,
                    cid,
                    price: amend.price,
                    qty: amend.qty,
                    ..base
                }
            }
            Op::CancelAll | Op::Halt { .. } | Op::Resume => base,
            Op::UpdateSpec(rules) => Rejected {
                price: Some(rules.tick),
                ..base
            },
        };
        out.push(Event::Rejected(rejected));
    }

    fn forget_old_cids(&mut self, ts: Timestamp) {
        let window_ns = u64::from(self.spec.cid_window_secs) * 1_000_000_000;
        if window_ns == 0 {
            return;
        }
        while let Some(front) = self.window.front() {
            if ts.saturating_sub(front.ts) < window_ns {
                break;
            }
            self.forget_oldest_cid();
        }
    }

    fn forget_oldest_cid(&mut self) {
        if let Some(front) = self.window.pop_front() {
            self.window_keys.remove(&(front.account, front.cid));
        }
    }

    /// The window under the spec's limits: off empties it, a smaller cap forgets the oldest.
    fn fit_window(&mut self) {
        if self.spec.cid_window_secs == 0 {
            self.window.clear();
            self.window_keys.clear();
        }
        while self.window.len() > self.spec.cid_window_orders as usize {
            self.forget_oldest_cid();
        }
    }

    /// Whether the window holds (account, cid); if not, it is remembered at `ts`.
    fn cid_seen_before(&mut self, account: Account, cid: Cid, ts: Timestamp) -> bool {
        if self.window_keys.contains(&(account, cid)) {
            return true;
        }
        if self.window.len() >= self.spec.cid_window_orders as usize {
            self.forget_oldest_cid();
        }
        self.window.push_back(CidSeen { account, cid, ts });
        self.window_keys.insert((account, cid));
        false
    }

    fn expire(&mut self, ctx: Ctx, out: &mut Vec<Event>) {
        while let Some(&(expire_at, oid)) = self.expiries.first() {
            if expire_at > ctx.ts {
                break;
            }
            let mut order = self.remove(oid);
            let qty = order.leaves;
            order.leaves = Qty::ZERO;
            push_cancelled(out, ctx, &order, CancelReason::Expired, qty);
        }
    }

    // ----- per-account limits -----

    /// The per-account limits on a `new` (`new` given) or an `amend`: the rejection and its
    /// `retry_after`, or the command passes and its account's debt grows by one interval.
    fn account_limits(
        &mut self,
        account: Account,
        new: Option<&NewOrder>,
    ) -> Result<(), (RejectReason, Option<u64>)> {
        let mut new_tat = None;
        if self.spec.account_rate > 0 {
            let interval = 1_000_000_000 / u64::from(self.spec.account_rate);
            let tolerance = (u64::from(self.spec.account_burst) - 1) * interval;
            let tat = self.rate_tat.get(&account).copied().unwrap_or(0);
            let start = tat.max(self.rate_clock);
            if start - self.rate_clock > tolerance {
                let retry_after = start - self.rate_clock - tolerance;
                return Err((RejectReason::RateLimited, Some(retry_after)));
            }
            new_tat = Some(start.saturating_add(interval));
        }
        let max = self.spec.account_orders_max as usize;
        if max > 0
            && let Some(new) = new
        {
            let may_rest =
                (new.order_type == OrderType::Limit && new.tif.rests()) || new.order_type.is_stop();
            let open = self
                .orders
                .values()
                .filter(|o| o.account == account)
                .count();
            if may_rest && open >= max {
                return Err((RejectReason::TooManyOpenOrders, None));
            }
        }
        if let Some(tat) = new_tat {
            self.rate_tat.insert(account, tat);
        }
        Ok(())
    }

    // ----- new -----

    fn new_order(&mut self, ctx: Ctx, account: Account, new: &NewOrder, out: &mut Vec<Event>) {
        let oid = OrderId::from_input(ctx.seq, ctx.pos);
        if let Err((reason, retry_after)) = self.account_limits(account, Some(new)) {
            out.push(Event::Rejected(Rejected {
                oid: Some(oid),
                cid: new.cid,
                price: new.price,
                qty: Some(new.qty),
                retry_after,
                ..rejection(ctx, OpKind::New, account, reason)
            }));
            return;
        }
        // A cid the window holds is a retry (or a reuse); any other cid is remembered,
        // whatever the checks below decide.
        let repeated = self.spec.cid_window_secs > 0
            && new
                .cid
                .is_some_and(|cid| self.cid_seen_before(account, cid, ctx.ts));
        let checked = if repeated {
            Err(RejectReason::DuplicateCid)
        } else {
            self.check_new(ctx, account, new)
        };
        if let Err(reason) = checked {
            out.push(Event::Rejected(Rejected {
                oid: Some(oid),
                cid: new.cid,
                price: new.price,
                qty: Some(new.qty),
                ..rejection(ctx, OpKind::New, account, reason)
            }));
            return;
        }
        let stp = new.stp.unwrap_or(self.spec.stp_default);
        let order = OrderRecord {
            oid,
            account,
            cid: new.cid,
            side: new.side,
            order_type: new.order_type,
            tif: new.tif,
            price: new.price,
            stop_price: new.stop_price,
            qty: new.qty,
            filled: Qty::ZERO,
            leaves: new.qty,
            // Set again when the order rests or waits.
            visible: new.qty,
            display_qty: new.display_qty,
            expire_at: new.expire_at,
            stp,
            ts: ctx.ts,
            last_seq: ctx.seq,
        };
        out.push(Event::Accepted(Accepted {
            seq: ctx.seq,
            ts: ctx.ts,
            order: tag(&order),
            side: order.side,
            order_type: order.order_type,
            tif: order.tif,
            price: order.price,
            qty: order.qty,
            stop_price: order.stop_price,
            display_qty: order.display_qty,
            expire_at: order.expire_at,
            stp,
        }));
        if order.order_type.is_stop() {
            self.insert_stop(order);
        } else {
            self.execute(ctx, order, out);
        }
    }

    /// The checks of `new`, in the order of the rules; the first failure is the reason.
    fn check_new(&self, ctx: Ctx, account: Account, new: &NewOrder) -> Result<(), RejectReason> {
        use RejectReason as R;
        let spec = &self.spec;
        if self.halted {
            return Err(R::Halted);
        }
        let qty = new.qty.0;
        if qty == 0 {
            return Err(R::QtyZero);
        }
        if !qty.is_multiple_of(spec.lot.0) {
            return Err(R::QtyNotOnLot);
        }
        if qty < spec.min_qty.0 {
            return Err(R::QtyBelowMin);
        }
        if spec.max_qty.is_some_and(|max| qty > max.0) {
            return Err(R::QtyAboveMax);
        }
        let priced = new.order_type.has_limit_price();
        if priced {
            match new.price {
                None => return Err(R::PriceMissing),
                Some(Price(0)) => return Err(R::PriceZero),
                Some(p) if !p.0.is_multiple_of(spec.tick.0) => return Err(R::PriceNotOnTick),
                Some(_) => {}
            }
        } else if new.price.is_some() {
            return Err(R::PriceNotAllowed);
        }
        if new.order_type.is_stop() {
            match new.stop_price {
                None => return Err(R::StopPriceMissing),
                Some(p) if p.0 == 0 || !p.0.is_multiple_of(spec.tick.0) => {
                    return Err(R::StopPriceInvalid);
                }
                Some(_) => {}
            }
        } else if new.stop_price.is_some() {
            return Err(R::StopPriceNotAllowed);
        }
        if !priced && !matches!(new.tif, Tif::Ioc | Tif::Fok) {
            return Err(R::TifNotAllowed);
        }
        if let Some(display) = new.display_qty {
            let valid = priced
                && new.tif.rests()
                && display.0 > 0
                && display.0.is_multiple_of(spec.lot.0)
                && display <= new.qty;
            if !valid {
                return Err(R::DisplayQtyInvalid);
            }
        }
        if new.tif == Tif::Gtd {
            match new.expire_at {
                None => return Err(R::ExpireAtMissing),
                Some(at) if at <= ctx.ts => return Err(R::ExpireAtInPast),
                Some(_) => {}
            }
        } else if new.expire_at.is_some() {
            return Err(R::ExpireAtNotAllowed);
        }
        if let Some(cid) = new.cid
            && self.cids.contains_key(&(account, cid))
        {
            return Err(R::DuplicateCid);
        }
        if new.order_type == OrderType::Limit
            && let Some(price) = new.price
            && self.out_of_band(new.side, price)
        {
            return Err(R::PriceOutOfBand);
        }
        let may_rest =
            (new.order_type == OrderType::Limit && new.tif.rests()) || new.order_type.is_stop();
        if may_rest && self.orders.len() >= self.spec.orders_max as usize {
            return Err(R::BookFull);
        }
        Ok(())
    }

    // ----- band -----

    /// The band bound for an order on `side`: the highest price a buy may have, the lowest a
    /// sell may have; `None` when the market has no band or there is no reference price.
    fn band_bound(&self, side: Side) -> Option<Price> {
        let bps = u128::from(self.spec.price_band_bps?);
        let reference = self
            .last_trade_price
            .or_else(|| self.best(side.opposite()))?;
        let r = u128::from(reference.0);
        let bound = match side {
            Side::Buy => r * (10_000 + bps) / 10_000,
            Side::Sell => (r * (10_000 - bps)).div_ceil(10_000),
        };
        Some(Price(u64::try_from(bound).unwrap_or(u64::MAX)))
    }

    fn out_of_band(&self, side: Side, price: Price) -> bool {
        match (side, self.band_bound(side)) {
            (_, None) => false,
            (Side::Buy, Some(bound)) => price > bound,
            (Side::Sell, Some(bound)) => price < bound,
        }
    }

    // ----- executing a taker -----

    fn best(&self, side: Side) -> Option<Price> {
        match side {
            Side::Buy => self.bids.last_key_value().map(|(p, _)| *p),
            Side::Sell => self.asks.first_key_value().map(|(p, _)| *p),
        }
    }

    /// Whether a `side` order at `price` would trade against the opposite side.
    fn crosses(&self, side: Side, price: Price) -> bool {
        match side {
            Side::Buy => self.best(Side::Sell).is_some_and(|ask| price >= ask),
            Side::Sell => self.best(Side::Buy).is_some_and(|bid| price <= bid),
        }
    }

    fn levels(&self, side: Side) -> &BTreeMap<Price, Level> {
        match side {
            Side::Buy => &self.bids,
            Side::Sell => &self.asks,
        }
    }

    fn levels_mut(&mut self, side: Side) -> &mut BTreeMap<Price, Level> {
        match side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        }
    }

    /// The levels of `side`, best price first.
    fn levels_by_priority(&self, side: Side) -> Box<dyn Iterator<Item = (&Price, &Level)> + '_> {
        match side {
            Side::Buy => Box::new(self.bids.iter().rev()),
            Side::Sell => Box::new(self.asks.iter()),
        }
    }

    /// Runs `taker` (not on the book) as a taker: post_only, fok, the match loop, the remainder.
    fn execute(&mut self, ctx: Ctx, mut taker: OrderRecord, out: &mut Vec<Event>) {
        // Whatever happens next changes the order in this command.
        taker.last_seq = ctx.seq;
        if taker.tif == Tif::PostOnly
            && let Some(price) = taker.price
        {
            if self.crosses(taker.side, price) {
                self.cancel_taker(ctx, &mut taker, CancelReason::PostOnlyWouldCross, out);
            } else {
                self.rest(taker);
            }
            return;
        }
        let is_market = taker.price.is_none();
        // The worst price the taker takes: its limit, or for a market order the band bound
        // computed now (none without a band).
        let limit = match taker.price {
            Some(price) => Some(price),
            None => self.band_bound(taker.side),
        };
        if taker.tif == Tif::Fok && !self.fok_passes(&taker, limit) {
            self.cancel_taker(ctx, &mut taker, CancelReason::FokUnfilled, out);
            return;
        }
        self.match_loop(ctx, &mut taker, limit, out);
        if taker.leaves == Qty::ZERO {
            return;
        }
        if is_market {
            self.cancel_taker(ctx, &mut taker, CancelReason::MarketRemainder, out);
        } else {
            match taker.tif {
                Tif::Gtc | Tif::Gtd => self.rest(taker),
                // A fok that passed its check fills whole; post_only never gets here.
                Tif::Ioc | Tif::Fok | Tif::PostOnly => {
                    self.cancel_taker(ctx, &mut taker, CancelReason::IocRemainder, out)
                }
            }
        }
    }

    /// Cancels all that is left of a taker that is not on the book.
    fn cancel_taker(
        &self,
        ctx: Ctx,
        taker: &mut OrderRecord,
        reason: CancelReason,
        out: &mut Vec<Event>,
    ) {
        let qty = taker.leaves;
        taker.leaves = Qty::ZERO;
        push_cancelled(out, ctx, taker, reason, qty);
    }

    /// The fok check: whether the levels the taker accepts hold enough for it, by its stp.
    fn fok_passes(&self, taker: &OrderRecord, limit: Option<Price>) -> bool {
        let mut sum: u128 = 0;
        for (&price, level) in self.levels_by_priority(taker.side.opposite()) {
            if !accepts(taker.side, limit, price) {
                break;
            }
            let own = |oid: &OrderId| self.orders[oid].account == taker.account;
            let strict = matches!(
                taker.stp,
                StpMode::CancelNewest | StpMode::CancelBoth | StpMode::DecrementAndCancel
            );
            if strict && level.iter().any(own) {
                return false;
            }
            for oid in level {
                if taker.stp == StpMode::CancelOldest && own(oid) {
                    continue;
                }
                sum += u128::from(self.orders[oid].leaves.0);
            }
            if sum >= u128::from(taker.leaves.0) {
                return true;
            }
        }
        false
    }

    fn match_loop(
        &mut self,
        ctx: Ctx,
        taker: &mut OrderRecord,
        limit: Option<Price>,
        out: &mut Vec<Event>,
    ) {
        let maker_side = taker.side.opposite();
        while taker.leaves > Qty::ZERO {
            let Some(price) = self.best(maker_side) else {
                break;
            };
            if !accepts(taker.side, limit, price) {
                break;
            }
            let maker_oid = self.levels(maker_side)[&price][0];
            let maker_account = self.orders[&maker_oid].account;
            if maker_account == taker.account && taker.stp != StpMode::None {
                match taker.stp {
                    StpMode::None => unreachable!("checked above"),
                    StpMode::CancelNewest => {
                        self.cancel_taker(ctx, taker, CancelReason::Stp, out);
                    }
                    StpMode::CancelOldest => {
                        self.cancel_resting(ctx, maker_oid, CancelReason::Stp, out)
                    }
                    StpMode::CancelBoth => {
                        self.cancel_resting(ctx, maker_oid, CancelReason::Stp, out);
                        self.cancel_taker(ctx, taker, CancelReason::Stp, out);
                    }
                    StpMode::DecrementAndCancel => {
                        // Both lose `d` from their leaves and their total; the maker keeps
                        // its place unless it reaches 0.
                        let maker = self.orders.get_mut(&maker_oid).expect("maker is open");
                        let d = min(taker.leaves, maker.leaves);
                        maker.leaves = Qty(maker.leaves.0 - d.0);
                        maker.qty = Qty(maker.qty.0 - d.0);
                        maker.last_seq = ctx.seq;
                        maker.visible = min(maker.visible, maker.leaves);
                        push_cancelled(out, ctx, maker, CancelReason::Stp, d);
                        if maker.leaves == Qty::ZERO {
                            self.remove(maker_oid);
                        }
                        taker.leaves = Qty(taker.leaves.0 - d.0);
                        taker.qty = Qty(taker.qty.0 - d.0);
                        push_cancelled(out, ctx, taker, CancelReason::Stp, d);
                    }
                }
                continue;
            }
            // A fill at the maker's price.
            let maker = self.orders.get_mut(&maker_oid).expect("maker is open");
            let qty = min(taker.leaves, maker.visible);
            maker.leaves = Qty(maker.leaves.0 - qty.0);
            maker.filled = Qty(maker.filled.0 + qty.0);
            maker.last_seq = ctx.seq;
            maker.visible = Qty(maker.visible.0 - qty.0);
            taker.leaves = Qty(taker.leaves.0 - qty.0);
            taker.filled = Qty(taker.filled.0 + qty.0);
            self.trade_n += 1;
            self.last_trade_price = Some(price);
            out.push(Event::Trade(Trade {
                seq: ctx.seq,
                ts: ctx.ts,
                trade_n: self.trade_n,
                price,
                qty,
                taker_side: taker.side,
                maker: tag(maker),
                maker_leaves: maker.leaves,
                taker: tag(taker),
                taker_leaves: taker.leaves,
            }));
            if maker.leaves == Qty::ZERO {
                self.remove(maker_oid);
            } else if maker.visible == Qty::ZERO {
                // An iceberg shows its next peak at the back of its level.
                maker.visible = shown(maker);
                let level = self
                    .levels_mut(maker_side)
                    .get_mut(&price)
                    .expect("maker's level");
                let front = level.pop_front();
                debug_assert_eq!(front, Some(maker_oid));
                level.push_back(maker_oid);
            }
        }
    }

    // ----- stops -----

    /// After every applied command, traded or not, once a last trade price exists.
    fn trigger_stops(&mut self, ctx: Ctx, out: &mut Vec<Event>) {
        while !self.halted {
            let Some(last) = self.last_trade_price else {
                break;
            };
            let mut buy: Option<(Price, OrderId)> = None;
            let mut sell: Option<(Price, OrderId)> = None;
            // In oid order, so a strict comparison keeps the lowest oid among equal prices.
            for oid in &self.stops {
                let o = &self.orders[oid];
                let stop = o.stop_price.expect("a stop order has a stop price");
                match o.side {
                    Side::Buy if stop <= last && buy.is_none_or(|(best, _)| stop < best) => {
                        buy = Some((stop, *oid));
                    }
                    Side::Sell if stop >= last && sell.is_none_or(|(best, _)| stop > best) => {
                        sell = Some((stop, *oid));
                    }
                    _ => {}
                }
            }
            let oid = match (buy, sell) {
                (Some((_, b)), Some((_, s))) => min(b, s),
                (Some((_, b)), None) => b,
                (None, Some((_, s))) => s,
                (None, None) => break,
            };
            let order = self.remove(oid);
            out.push(Event::Triggered(Triggered {
                seq: ctx.seq,
                ts: ctx.ts,
                order: tag(&order),
                side: order.side,
                order_type: order.order_type,
                stop_price: order.stop_price.expect("a stop order has a stop price"),
                last_price: last,
            }));
            self.execute(ctx, order, out);
        }
    }

    // ----- cancel, amend, cancel_all, halt, resume -----

    /// Finds the target of a cancel or amend; on failure, the reason and the order found.
    fn find(
        &self,
        account: Account,
        target: OrderRef,
    ) -> Result<OrderId, (RejectReason, Option<OrderId>)> {
        match target {
            OrderRef::Oid(oid) => match self.orders.get(&oid) {
                None => Err((RejectReason::UnknownOrder, None)),
                Some(o) if o.account != account => Err((RejectReason::NotOwner, Some(oid))),
                Some(_) => Ok(oid),
            },
            OrderRef::Cid(cid) => self
                .cids
                .get(&(account, cid))
                .copied()
                .ok_or((RejectReason::UnknownOrder, None)),
        }
    }

    /// A rejection's oid and cid: the oid if given or found, the cid if given or else the
    /// found order's when it is the sender's.
    fn target_ids(
        &self,
        account: Account,
        target: OrderRef,
        found: Option<OrderId>,
    ) -> (Option<OrderId>, Option<Cid>) {
        let found = found.and_then(|oid| self.orders.get(&oid));
        match target {
            OrderRef::Oid(oid) => (
                Some(oid),
                found.filter(|o| o.account == account).and_then(|o| o.cid),
            ),
            OrderRef::Cid(cid) => (found.map(|o| o.oid), Some(cid)),
        }
    }

    fn cancel(&mut self, ctx: Ctx, account: Account, target: OrderRef, out: &mut Vec<Event>) {
        match self.find(account, target) {
            Ok(oid) => self.cancel_resting(ctx, oid, CancelReason::User, out),
            Err((reason, found)) => {
                let (oid, cid) = self.target_ids(account, target, found);
                out.push(Event::Rejected(Rejected {
                    oid,
                    cid,
                    ..rejection(ctx, OpKind::Cancel, account, reason)
                }));
            }
        }
    }

    /// Cancels the whole of an open order (resting or waiting stop).
    fn cancel_resting(
        &mut self,
        ctx: Ctx,
        oid: OrderId,
        reason: CancelReason,
        out: &mut Vec<Event>,
    ) {
        let mut order = self.remove(oid);
        let qty = order.leaves;
        order.leaves = Qty::ZERO;
        push_cancelled(out, ctx, &order, reason, qty);
    }

    fn amend(&mut self, ctx: Ctx, account: Account, amend: &Amend, out: &mut Vec<Event>) {
        let checked = match self.account_limits(account, None) {
            Err((reason, retry_after)) => Err((reason, None, retry_after)),
            Ok(()) => self
                .check_amend(account, amend)
                .map_err(|(reason, found)| (reason, found, None)),
        };
        let (oid, qty, price) = match checked {
            Ok(checked) => checked,
            Err((reason, found, retry_after)) => {
                let (oid, cid) = self.target_ids(account, amend.target, found);
                out.push(Event::Rejected(Rejected {
                    oid,
                    cid,
                    price: amend.price,
                    qty: amend.qty,
                    retry_after,
                    ..rejection(ctx, OpKind::Amend, account, reason)
                }));
                return;
            }
        };
        let current = &self.orders[&oid];
        let same_price = current.price == Some(price);
        let amended = |o: &OrderRecord, priority_kept: bool| {
            Event::Amended(Amended {
                seq: ctx.seq,
                ts: ctx.ts,
                order: tag(o),
                side: o.side,
                price,
                qty,
                leaves: o.leaves,
                priority_kept,
            })
        };
        if qty <= current.filled {
            let mut order = self.remove(oid);
            order.leaves = Qty::ZERO;
            out.push(amended(&order, false));
        } else if same_price && qty < current.qty {
            let order = self.orders.get_mut(&oid).expect("target is open");
            order.qty = qty;
            order.leaves = Qty(qty.0 - order.filled.0);
            order.last_seq = ctx.seq;
            order.visible = match order.display_qty {
                Some(_) => min(order.visible, order.leaves),
                None => order.leaves,
            };
            out.push(amended(order, true));
        } else {
            let mut order = self.remove(oid);
            order.qty = qty;
            order.leaves = Qty(qty.0 - order.filled.0);
            order.price = Some(price);
            order.last_seq = ctx.seq;
            out.push(amended(&order, false));
            if same_price {
                self.rest(order);
            } else {
                self.execute(ctx, order, out);
            }
        }
    }

    /// The checks of `amend`, in the order of the rules: the target, its new total quantity
    /// and its new price; or the reason and the order found so far.
    fn check_amend(
        &self,
        account: Account,
        amend: &Amend,
    ) -> Result<(OrderId, Qty, Price), (RejectReason, Option<OrderId>)> {
        use RejectReason as R;
        if self.halted {
            return Err((R::Halted, None));
        }
        let oid = self.find(account, amend.target)?;
        let fail = |reason| Err((reason, Some(oid)));
        if self.stops.contains(&oid) {
            return fail(R::NotAmendable);
        }
        if amend.qty.is_none() && amend.price.is_none() {
            return fail(R::NothingToAmend);
        }
        if let Some(qty) = amend.qty {
            if qty.0 == 0 {
                return fail(R::QtyZero);
            }
            if !qty.0.is_multiple_of(self.spec.lot.0) {
                return fail(R::QtyNotOnLot);
            }
            if self.spec.max_qty.is_some_and(|max| qty > max) {
                return fail(R::QtyAboveMax);
            }
        }
        if let Some(price) = amend.price {
            if price.0 == 0 {
                return fail(R::PriceZero);
            }
            if !price.0.is_multiple_of(self.spec.tick.0) {
                return fail(R::PriceNotOnTick);
            }
        }
        let order = &self.orders[&oid];
        let current_price = order.price.expect("a resting order has a price");
        let qty = amend.qty.unwrap_or(order.qty);
        let price = amend.price.unwrap_or(current_price);
        if qty == order.qty && price == current_price {
            return fail(R::NothingToAmend);
        }
        if price != current_price {
            if self.out_of_band(order.side, price) {
                return fail(R::PriceOutOfBand);
            }
            if order.tif == Tif::PostOnly && self.crosses(order.side, price) {
                return fail(R::PostOnlyWouldCross);
            }
        }
        Ok((oid, qty, price))
    }

    fn cancel_all(&mut self, ctx: Ctx, account: Account, out: &mut Vec<Event>) {
        let mut oids: Vec<OrderId> = self
            .orders
            .values()
            .filter(|o| o.account == account)
            .map(|o| o.oid)
            .collect();
        oids.sort_unstable();
        for oid in oids {
            self.cancel_resting(ctx, oid, CancelReason::CancelAll, out);
        }
    }

    fn halt(&mut self, ctx: Ctx, account: Account, cancel_orders: bool, out: &mut Vec<Event>) {
        if self.halted {
            let reason = RejectReason::AlreadyHalted;
            out.push(Event::Rejected(rejection(
                ctx,
                OpKind::Halt,
                account,
                reason,
            )));
            return;
        }
        self.halted = true;
        if cancel_orders {
            let mut oids: Vec<OrderId> = self.orders.keys().copied().collect();
            oids.sort_unstable();
            for oid in oids {
                self.cancel_resting(ctx, oid, CancelReason::Halt, out);
            }
        }
    }

    fn update_spec(&mut self, ctx: Ctx, account: Account, rules: SpecRules, out: &mut Vec<Event>) {
        let off_tick = |p: Option<Price>| p.is_some_and(|p| p.0 % rules.tick.0 != 0);
        if self
            .orders
            .values()
            .any(|o| off_tick(o.price) || off_tick(o.stop_price))
        {
            out.push(Event::Rejected(Rejected {
                price: Some(rules.tick),
                ..rejection(
                    ctx,
                    OpKind::UpdateSpec,
                    account,
                    RejectReason::OrdersOffTick,
                )
            }));
            return;
        }
        self.spec = self.spec.with_rules(rules);
        self.fit_window();
        if self.spec.account_rate == 0 {
            self.rate_clock = 0;
            self.rate_tat.clear();
        }
    }

    fn resume(&mut self, ctx: Ctx, account: Account, out: &mut Vec<Event>) {
        if !self.halted {
            let reason = RejectReason::NotHalted;
            out.push(Event::Rejected(rejection(
                ctx,
                OpKind::Resume,
                account,
                reason,
            )));
            return;
        }
        self.halted = false;
    }

    // ----- storage -----

    /// Indexes an open order by cid and expiry.
    fn index(&mut self, o: &OrderRecord) {
        if let Some(cid) = o.cid {
            self.cids.insert((o.account, cid), o.oid);
        }
        if let Some(expire_at) = o.expire_at {
            self.expiries.insert((expire_at, o.oid));
        }
    }

    /// Puts an order at the back of its level, showing all of it or its iceberg peak.
    fn rest(&mut self, mut order: OrderRecord) {
        order.visible = shown(&order);
        self.insert_resting(order);
    }

    fn insert_resting(&mut self, order: OrderRecord) {
        let price = order.price.expect("a resting order has a price");
        self.levels_mut(order.side)
            .entry(price)
            .or_default()
            .push_back(order.oid);
        self.index(&order);
        self.orders.insert(order.oid, order);
    }

    /// A waiting stop shows nothing on the book yet; its record's `visible` is its leaves (an
    /// iceberg's peak is set when it rests).
    fn insert_stop(&mut self, mut order: OrderRecord) {
        order.visible = order.leaves;
        self.stops.insert(order.oid);
        self.index(&order);
        self.orders.insert(order.oid, order);
    }

    /// Takes an open order out of the book (its level or the stops) and out of every index.
    fn remove(&mut self, oid: OrderId) -> OrderRecord {
        let order = self.orders.remove(&oid).expect("removing an open order");
        if !self.stops.remove(&oid) {
            let price = order.price.expect("a resting order has a price");
            let levels = self.levels_mut(order.side);
            let level = levels.get_mut(&price).expect("the order's level");
            let at = level
                .iter()
                .position(|&o| o == oid)
                .expect("the order is in its level");
            level.remove(at);
            if level.is_empty() {
                levels.remove(&price);
            }
        }
        if let Some(cid) = order.cid {
            self.cids.remove(&(order.account, cid));
        }
        if let Some(expire_at) = order.expire_at {
            self.expiries.remove(&(expire_at, oid));
        }
        order
    }

    // ----- views -----

    pub fn best_bid(&self) -> Option<Price> {
        self.best(Side::Buy)
    }

    pub fn best_ask(&self) -> Option<Price> {
        self.best(Side::Sell)
    }

    /// The first `levels` levels of `side`, best first, with shown quantity and order count.
    pub fn depth(&self, side: Side, levels: usize) -> Vec<L2Level> {
        self.levels_by_priority(side)
            .take(levels)
            .map(|(&price, level)| L2Level {
                price,
                qty: Qty(level.iter().map(|oid| self.orders[oid].visible.0).sum()),
                orders: level.len() as u32,
            })
            .collect()
    }

    /// The open order (resting or waiting stop) of `account` with this cid.
    pub fn open_order_by_cid(&self, account: Account, cid: Cid) -> Option<&OrderRecord> {
        self.cids
            .get(&(account, cid))
            .and_then(|oid| self.orders.get(oid))
    }

    /// Resting orders (waiting stops excluded).
    pub fn order_count(&self) -> usize {
        self.orders.len() - self.stops.len()
    }
}
