//! Oracle tests of the book: seeded random command streams go into the fast
//! [`OrderBook`] and the naive [`ReferenceBook`]; every event, snapshot and state hash must
//! match, every order's quantity must be conserved, and snapshot/restore or a second run must
//! change nothing. Hand-written scenarios with their events spelled out are the files of
//! `tests/scenarios/`, which `tests/engine/scenarios.rs` runs on both books.
//!
//! Every failure message names its seed. `AGORA_ORACLE_SEED=<seed>` runs that one seed,
//! `AGORA_ORACLE_COMMANDS=<n>` sets how many commands a test applies in all (soak runs). This
//! file must never draw randomness from anything but its own seeded generator, nor read a clock.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use agora::book::num::format_decimal;
use agora::book::reference::ReferenceBook;
use agora::book::snapshot::SNAPSHOT_FORMAT_VERSION;
use agora::book::{
    Account, Amend, BookSnapshot, CancelReason, Cid, Command, Event, HashVersion, MarketSpec,
    MarketSpecInput, NewOrder, Op, OpenOrder, OrderBook, OrderId, OrderRef, OrderType, Price, Qty,
    RejectReason, RestoreError, Side, StpMode, Tif,
};

// ---------------------------------------------------------------------------------------------
// Seeded generator
// ---------------------------------------------------------------------------------------------

/// SplitMix64: small, fast, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5eed_f00d_a60a_u64)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
    /// True with probability `per_mille / 1000`.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    /// One of `items`, by integer weights.
    fn weighted<T: Copy>(&mut self, items: &[(T, u64)]) -> T {
        let total: u64 = items.iter().map(|(_, w)| w).sum();
        let mut r = self.below(total);
        for &(item, w) in items {
            if r < w {
                return item;
            }
            r -= w;
        }
        unreachable!("weights sum to total")
    }
}

const ACCOUNT_NAMES: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];
const MS: u64 = 1_000_000;
const STP_MODES: [StpMode; 5] = [
    StpMode::None,
    StpMode::CancelNewest,
    StpMode::CancelOldest,
    StpMode::CancelBoth,
    StpMode::DecrementAndCancel,
];

/// A market spec drawn from the seed: tick, lot, min and max, band, stp default, orders max.
fn random_spec(rng: &mut Rng) -> MarketSpec {
    let mut input = MarketSpecInput::new("TEST-USD", 2, 3);
    let tick = rng.pick(&[1u64, 1, 5, 25]);
    let lot = rng.pick(&[1u64, 10, 10, 100]);
    let min_qty = lot * rng.pick(&[1u64, 1, 2, 3]);
    input.tick_size = Some(format_decimal(tick, 2));
    input.lot_size = Some(format_decimal(lot, 3));
    input.min_qty = Some(format_decimal(min_qty, 3));
    if rng.chance(500) {
        input.max_qty = Some(format_decimal(lot * rng.pick(&[25u64, 60, 200]), 3));
    }
    if rng.chance(500) {
        input.price_band_pct = Some(rng.pick(&["0.5", "1", "2.5", "10"]).to_string());
    }
    if rng.chance(600) {
        input.stp_default = Some(rng.pick(&STP_MODES));
    }
    if rng.chance(250) {
        input.orders_max = Some(rng.pick(&[12u32, 40]));
    }
    if rng.chance(400) {
        // Short windows and small caps, so entries leave by time and by count.
        input.cid_window_secs = Some(rng.pick(&[1u32, 1, 2, 30]));
        input.cid_window_orders = Some(rng.pick(&[3u32, 20, 20, 10_000]));
    }
    if rng.chance(300) {
        // Rates near what an account of the generator sends (~100 a second), so that some
        // commands pass and some wait.
        input.account_rate_per_sec = Some(rng.pick(&[50u32, 200, 1000]));
        input.account_burst = Some(rng.pick(&[1u32, 3, 20]));
    }
    if rng.chance(300) {
        input.account_open_orders_max = Some(rng.pick(&[2u32, 6, 20]));
    }
    input.validate().expect("generated spec is valid")
}

/// A new order the generator sent that may still be open (it may rest or wait).
#[derive(Clone, Copy)]
struct Sent {
    oid: OrderId,
    account: usize,
    cid: Option<Cid>,
}

/// An order open on the book, as the events tell it, so cancels and amends can aim at it.
#[derive(Clone, Copy)]
struct Open {
    oid: OrderId,
    account: usize,
    cid: Option<Cid>,
    side: Side,
    price: Option<Price>,
    qty: u64,
    filled: u64,
    /// A stop still waiting for its trigger.
    waiting: bool,
}

/// Seeded stream of commands for one market. Besides its seed it sees the events of the book
/// it feeds (`observe`), to aim cancels and amends at open orders; books that agree on every
/// event therefore get the same commands.
struct Gen {
    rng: Rng,
    spec: MarketSpec,
    accounts: Vec<Account>,
    seq: u64,
    pos: u16,
    batch_left: u16,
    ts: u64,
    /// The price everything concentrates around, in ticks; it drifts.
    mid: i64,
    /// Whether the generator believes the market halted (it sent a halt and no resume since).
    halted: bool,
    recent: VecDeque<Sent>,
    next_cid: u64,
    /// Open orders (resting and stops), in a deterministic order, and where each one is.
    open: Vec<Open>,
    open_at: HashMap<OrderId, usize>,
    /// Per mille of commands that cancel, and that amend; low on some seeds so books grow deep.
    cancels: u64,
    amends: u64,
    /// Per mille of limit prices that cross the mid.
    aggressive: u64,
    /// How far from the mid passive prices go, in ticks.
    spread: i64,
    /// Deep seeds: rarer cancel_all, halts and jumps of the mid, so the book grows.
    deep: bool,
    /// The last trade price the events showed, in ticks: the mid drifts back towards it, so a
    /// price band never locks the market up.
    last_trade: Option<i64>,
}

impl Gen {
    fn new(seed: u64) -> Gen {
        let mut rng = Rng::new(seed);
        let spec = random_spec(&mut rng);
        let accounts_n = rng.range(3, 5) as usize;
        let deep = rng.chance(300);
        let (cancels, amends, aggressive) = if deep { (50, 80, 200) } else { (150, 170, 350) };
        let accounts = ACCOUNT_NAMES[..accounts_n]
            .iter()
            .map(|a| Account::new(a).unwrap())
            .collect();
        Gen {
            rng,
            spec,
            accounts,
            seq: 0,
            pos: 0,
            batch_left: 0,
            ts: 1_700_000_000_000_000_000,
            mid: 2_000,
            halted: false,
            recent: VecDeque::new(),
            next_cid: 0,
            open: Vec::new(),
            open_at: HashMap::new(),
            cancels,
            amends,
            aggressive,
            spread: if deep { 30 } else { 8 },
            deep,
            last_trade: None,
        }
    }

    /// Follows the book's events to know which orders are open, their qty, fills and price.
    fn observe(&mut self, events: &[Event]) {
        for e in events {
            match e {
                Event::Accepted(a) => {
                    let account = self
                        .accounts
                        .iter()
                        .position(|x| *x == a.order.account)
                        .expect("a generated account");
                    self.open_at.insert(a.order.oid, self.open.len());
                    self.open.push(Open {
                        oid: a.order.oid,
                        account,
                        cid: a.order.cid,
                        side: a.side,
                        price: a.price,
                        qty: a.qty.0,
                        filled: 0,
                        waiting: a.order_type.is_stop(),
                    });
                }
                Event::Trade(t) => {
                    self.last_trade = Some((t.price.0 / self.spec.tick.0) as i64);
                    for (oid, leaves) in
                        [(t.maker.oid, t.maker_leaves), (t.taker.oid, t.taker_leaves)]
                    {
                        if let Some(o) = self.open_mut(oid) {
                            o.filled += t.qty.0;
                        }
                        if leaves.0 == 0 {
                            self.close(oid);
                        }
                    }
                }
                Event::Cancelled(c) if c.leaves.0 == 0 => self.close(c.order.oid),
                Event::Triggered(t) => {
                    if let Some(o) = self.open_mut(t.order.oid) {
                        o.waiting = false;
                    }
                }
                Event::Amended(m) => {
                    if let Some(o) = self.open_mut(m.order.oid) {
                        o.qty = m.qty.0;
                        o.price = Some(m.price);
                    }
                    if m.leaves.0 == 0 {
                        self.close(m.order.oid);
                    }
                }
                _ => {}
            }
        }
    }

    fn open_mut(&mut self, oid: OrderId) -> Option<&mut Open> {
        let at = *self.open_at.get(&oid)?;
        Some(&mut self.open[at])
    }

    fn close(&mut self, oid: OrderId) {
        if let Some(at) = self.open_at.remove(&oid) {
            self.open.swap_remove(at);
            if let Some(moved) = self.open.get(at) {
                self.open_at.insert(moved.oid, at);
            }
        }
    }

    fn next_command(&mut self) -> Command {
        if !self.rng.chance(200) {
            self.ts += MS * self.rng.range(1, 5) as u64;
        }
        if self.rng.chance(2) {
            // Now and then a quiet second or two (cid windows empty out by time).
            self.ts += MS * self.rng.range(500, 2_500) as u64;
        }
        if self.rng.chance(120) {
            self.mid += self.rng.range(-1, 1);
        }
        if self.rng.chance(if self.deep { 1 } else { 4 }) {
            self.mid += self.rng.range(-15, 15);
        }
        if let Some(last) = self.last_trade
            && (self.mid - last).abs() > 6
            && self.rng.chance(100)
        {
            self.mid += (last - self.mid).signum();
        }
        self.mid = self.mid.max(60);

        let stale;
        let (seq, pos) = if self.batch_left > 0 {
            self.batch_left -= 1;
            self.pos += 1;
            stale = false;
            (self.seq, self.pos)
        } else if self.seq > 1 && self.rng.chance(4) {
            stale = true;
            if self.rng.chance(500) {
                (self.seq, self.pos)
            } else {
                let back = 1 + self.rng.below((self.seq - 1).min(3));
                (self.seq - back, self.rng.below(3) as u16)
            }
        } else {
            stale = false;
            self.seq += if self.rng.chance(30) {
                self.rng.range(2, 6) as u64
            } else {
                1
            };
            self.pos = 0;
            if self.rng.chance(40) {
                self.batch_left = self.rng.range(1, 7) as u16;
            }
            (self.seq, 0)
        };
        let (account, op) = self.op(seq, pos, stale);
        Command {
            seq,
            pos,
            ts: self.ts,
            account: self.accounts[account],
            op,
        }
    }

    fn any_account(&mut self) -> usize {
        self.rng.below(self.accounts.len() as u64) as usize
    }

    fn op(&mut self, seq: u64, pos: u16, stale: bool) -> (usize, Op) {
        let account = self.any_account();
        if self.halted && self.rng.chance(250) {
            if !stale {
                self.halted = false;
            }
            return (account, Op::Resume);
        }
        if self.halted && self.rng.chance(30) {
            let cancel_orders = self.rng.chance(500);
            return (account, Op::Halt { cancel_orders });
        }
        if self.rng.chance(1) {
            // New market rules (an operator's market.update): a coarser tick is often refused
            // while orders rest off it; the generator keeps sending on its own spec.
            return (account, Op::UpdateSpec(random_spec(&mut self.rng).rules()));
        }
        let r = self.rng.below(1000);
        let (cancel_end, amend_end) = (7 + self.cancels, 7 + self.cancels + self.amends);
        match r {
            0..=1 if !self.deep || self.rng.chance(250) => {
                if !stale {
                    self.halted = true;
                }
                let cancel_orders = self.rng.chance(300);
                (account, Op::Halt { cancel_orders })
            }
            2 => {
                if !stale {
                    self.halted = false;
                }
                (account, Op::Resume)
            }
            3..=6 if !self.deep || r == 3 => (account, Op::CancelAll),
            _ if r < cancel_end => {
                let (sender, target, _) = self.target();
                (sender, Op::Cancel(target))
            }
            _ if r < amend_end => self.amend(),
            _ => (account, self.new_order(account, seq, pos, stale)),
        }
    }

    /// A price in units near the mid: mostly passive, often crossing, rarely far away.
    fn price_near(&mut self, side: Side) -> Price {
        let offset = if self.rng.chance(30) {
            self.rng.range(-60, 60)
        } else if self.rng.chance(self.aggressive) {
            -self.rng.range(0, 4)
        } else {
            self.rng.range(0, self.spread)
        };
        let ticks = match side {
            Side::Buy => self.mid - offset,
            Side::Sell => self.mid + offset,
        };
        Price(ticks.max(1) as u64 * self.spec.tick.0)
    }

    /// A stop price in ticks: mostly beyond the mid in the direction that triggers it later,
    /// sometimes already reached.
    fn stop_ticks(&mut self, side: Side) -> i64 {
        let away = if self.rng.chance(200) {
            -self.rng.range(1, 4)
        } else {
            self.rng.range(0, 6)
        };
        let ticks = match side {
            Side::Buy => self.mid + away,
            Side::Sell => self.mid - away,
        };
        ticks.max(1)
    }

    fn qty(&mut self) -> Qty {
        let lots = match self.rng.below(100) {
            0..=59 => self.rng.range(1, 5),
            60..=94 => self.rng.range(1, 20),
            _ => self.rng.range(30, 120),
        } as u64;
        Qty((lots * self.spec.lot.0).max(self.spec.min_qty.0))
    }

    fn cid_for(&mut self, account: usize) -> Option<Cid> {
        if self.rng.chance(250) {
            return None;
        }
        if self.rng.chance(70) {
            let own = self.rng.chance(800);
            let reused = self
                .recent
                .iter()
                .rev()
                .take(40)
                .find(|s| s.cid.is_some() && (s.account == account) == own)
                .and_then(|s| s.cid);
            if reused.is_some() {
                return reused;
            }
        }
        self.next_cid += 1;
        Some(Cid::new(&format!("c-{}", self.next_cid)).unwrap())
    }

    fn new_order(&mut self, account: usize, seq: u64, pos: u16, stale: bool) -> Op {
        let tick = self.spec.tick.0;
        let side = if self.rng.chance(500) {
            Side::Buy
        } else {
            Side::Sell
        };
        let order_type = self.rng.weighted(&[
            (OrderType::Limit, 60),
            (OrderType::Market, 12),
            (OrderType::StopLimit, 15),
            (OrderType::StopMarket, 13),
        ]);
        let tif = if order_type.has_limit_price() {
            self.rng.weighted(&[
                (Tif::Gtc, 40),
                (Tif::Ioc, 15),
                (Tif::Fok, 12),
                (Tif::Gtd, 18),
                (Tif::PostOnly, 15),
            ])
        } else if self.rng.chance(700) {
            Tif::Ioc
        } else {
            Tif::Fok
        };
        let qty = self.qty();
        let stop_ticks = order_type.is_stop().then(|| self.stop_ticks(side));
        let price = match order_type {
            OrderType::Limit => Some(self.price_near(side)),
            OrderType::StopLimit => {
                let stop = stop_ticks.unwrap_or(1);
                let off = self.rng.range(-2, 4);
                let ticks = match side {
                    Side::Buy => stop + off,
                    Side::Sell => stop - off,
                };
                Some(Price(ticks.max(1) as u64 * tick))
            }
            OrderType::Market | OrderType::StopMarket => None,
        };
        let display_qty = (order_type.has_limit_price() && tif.rests() && self.rng.chance(220))
            .then(|| {
                let lots = qty.0 / self.spec.lot.0;
                Qty(self.rng.range(1, lots as i64) as u64 * self.spec.lot.0)
            });
        let expire_at = (tif == Tif::Gtd).then(|| {
            if self.rng.chance(40) {
                self.ts - self.rng.below(3) * MS
            } else {
                self.ts + MS * self.rng.range(1, 80) as u64
            }
        });
        let stp = if self.rng.chance(550) {
            None
        } else {
            Some(self.rng.pick(&STP_MODES))
        };
        let cid = self.cid_for(account);
        let mut new = NewOrder {
            cid,
            side,
            order_type,
            tif,
            price,
            qty,
            stop_price: stop_ticks.map(|t| Price(t as u64 * tick)),
            display_qty,
            expire_at,
            stp,
        };
        if self.rng.chance(35) {
            self.break_a_rule(&mut new);
        }
        let may_stay =
            new.order_type.is_stop() || (new.order_type == OrderType::Limit && new.tif.rests());
        if !stale && may_stay {
            self.recent.push_back(Sent {
                oid: OrderId::from_input(seq, pos),
                account,
                cid: new.cid,
            });
            if self.recent.len() > 300 {
                self.recent.pop_front();
            }
        }
        Op::New(new)
    }

    /// Makes one field of a new order invalid (or merely unusual).
    fn break_a_rule(&mut self, new: &mut NewOrder) {
        let lot = self.spec.lot.0;
        let tick = self.spec.tick.0;
        let mid = self.mid as u64 * tick;
        match self.rng.below(17) {
            0 => new.qty = Qty(0),
            1 => new.qty = Qty(new.qty.0 + 1),
            2 => new.qty = Qty(self.spec.min_qty.0 - lot),
            3 => new.qty = Qty(self.spec.max_qty.map_or(0, |m| m.0) + lot),
            4 => new.price = None,
            5 => new.price = Some(Price(0)),
            6 => new.price = Some(Price(mid + 1)),
            7 => new.stop_price = None,
            8 => new.stop_price = Some(Price(0)),
            9 => new.stop_price = Some(Price(mid + 1)),
            10 => {
                new.tif = self
                    .rng
                    .pick(&[Tif::Gtc, Tif::Ioc, Tif::Fok, Tif::Gtd, Tif::PostOnly])
            }
            11 => new.display_qty = Some(Qty(new.qty.0 + lot)),
            12 => new.display_qty = Some(Qty(0)),
            13 => {
                new.tif = Tif::Gtd;
                new.expire_at = None;
            }
            14 => new.expire_at = Some(self.ts),
            15 => new.expire_at = Some(self.ts + 1_000 * MS),
            _ => {
                new.tif = Tif::Ioc;
                new.display_qty = Some(Qty(lot));
            }
        }
    }

    /// Who sends a cancel or amend, and for which order (with what the events say of it): mostly
    /// the owner of an open order, sometimes another account, an order that has closed, or one
    /// that never was.
    fn target(&mut self) -> (usize, OrderRef, Option<Open>) {
        let r = self.rng.below(1000);
        let (owner, oid, cid, open) = if !self.open.is_empty() && r < 850 {
            let mut o = self.open[self.rng.below(self.open.len() as u64) as usize];
            if o.waiting && self.rng.chance(700) {
                // Mostly aim at resting orders: a second draw.
                o = self.open[self.rng.below(self.open.len() as u64) as usize];
            }
            (o.account, o.oid, o.cid, Some(o))
        } else if !self.recent.is_empty() && r < 960 {
            let n = self.recent.len() as u64;
            let sent = self.recent[(n - 1 - self.rng.below(n.min(64))) as usize];
            (sent.account, sent.oid, sent.cid, None)
        } else {
            let sender = self.any_account();
            let target = if self.rng.chance(500) {
                OrderRef::Oid(OrderId(self.rng.below(5_000)))
            } else {
                OrderRef::Cid(Cid::new("never-sent").unwrap())
            };
            return (sender, target, None);
        };
        let sender = if self.rng.chance(900) {
            owner
        } else {
            self.any_account()
        };
        let target = match cid {
            Some(cid) if self.rng.chance(350) => OrderRef::Cid(cid),
            _ => OrderRef::Oid(oid),
        };
        (sender, target, open)
    }

    fn amend(&mut self) -> (usize, Op) {
        let (sender, target, open) = self.target();
        let lot = self.spec.lot.0;
        let tick = self.spec.tick.0;
        let (with_qty, with_price) = match self.rng.below(100) {
            0..=44 => (true, false),
            45..=79 => (false, true),
            80..=95 => (true, true),
            _ => (false, false),
        };
        let (qty_lots, filled_lots) = open.map_or((5, 0), |o| (o.qty / lot, o.filled / lot));
        let qty = with_qty.then(|| match self.rng.below(100) {
            0 => Qty(0),
            1 => Qty(lot * 3 + 1),
            2 => Qty(self.spec.max_qty.map_or(0, |m| m.0) + lot),
            3..=42 => Qty(self.rng.range(
                filled_lots as i64 + 1,
                qty_lots.max(filled_lots + 2) as i64 - 1,
            ) as u64
                * lot),
            43..=72 => Qty((qty_lots + self.rng.range(1, 10) as u64) * lot),
            73..=82 => Qty(filled_lots.max(1) * lot),
            _ => Qty(self.rng.range(1, 25) as u64 * lot),
        });
        let price = with_price.then(|| match self.rng.below(100) {
            0 => Price(0),
            1 => Price(self.mid as u64 * tick + 1),
            2..=59 => match open.and_then(|o| o.price) {
                Some(p) => Price(
                    (p.0 as i64 + self.rng.range(-3, 3) * tick as i64).max(tick as i64) as u64,
                ),
                None => self.price_near(Side::Buy),
            },
            _ => {
                let side = open.map_or(Side::Buy, |o| o.side);
                self.price_near(side)
            }
        });
        (sender, Op::Amend(Amend { target, qty, price }))
    }
}

// ---------------------------------------------------------------------------------------------
// Scale, seeds and failure context
// ---------------------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not an unsigned integer")),
    )
}

/// Commands per seed.
fn per_seed() -> u64 {
    if cfg!(debug_assertions) {
        4_000
    } else {
        20_000
    }
}

/// The seeds a test runs, and the commands for each: `AGORA_ORACLE_SEED` gives one seed;
/// otherwise `total` commands (or `AGORA_ORACLE_COMMANDS`) spread over consecutive seeds
/// from `first`.
fn plan(first: u64, total_release: u64, total_debug: u64) -> Vec<(u64, u64)> {
    let env_total = env_u64("AGORA_ORACLE_COMMANDS");
    if let Some(seed) = env_u64("AGORA_ORACLE_SEED") {
        return vec![(seed, env_total.unwrap_or(per_seed()))];
    }
    let default_total = if cfg!(debug_assertions) {
        total_debug
    } else {
        total_release
    };
    let total = env_total.unwrap_or(default_total);
    let n = total.div_ceil(per_seed()).max(1);
    (0..n)
        .map(|i| {
            (
                first + i,
                per_seed().min(total - (i * per_seed()).min(total)).max(1),
            )
        })
        .collect()
}

fn replay_hint(seed: u64) -> String {
    format!(
        "replay with: AGORA_ORACLE_SEED={seed} cargo test --release --test engine oracle -- --nocapture"
    )
}

/// Runs one seed's body; if anything in it panics (a book included), says which seed and
/// which command it was at before passing the panic on.
fn with_seed_context(seed: u64, body: impl FnOnce(&RefCell<(u64, Option<Command>)>)) {
    let at = RefCell::new((0u64, None));
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(&at))) {
        let (index, cmd) = at.borrow().clone();
        eprintln!(
            "\n*** seed {seed}: panicked at command #{index}: {cmd:?}\n*** {}\n",
            replay_hint(seed)
        );
        resume_unwind(panic);
    }
}

fn render_events(events: &[Event]) -> String {
    let mut s = String::new();
    for (i, e) in events.iter().enumerate() {
        let _ = writeln!(s, "    [{i}] {e:?}");
    }
    if events.is_empty() {
        s.push_str("    (none)\n");
    }
    s
}

fn assert_same_events(
    seed: u64,
    index: u64,
    cmd: &Command,
    (left_name, left): (&str, &[Event]),
    (right_name, right): (&str, &[Event]),
) {
    if left == right {
        return;
    }
    let first = left
        .iter()
        .zip(right)
        .position(|(a, b)| a != b)
        .unwrap_or(left.len().min(right.len()));
    panic!(
        "seed {seed}: events differ at command #{index} (first difference at event [{first}])\n  \
         command: {cmd:?}\n  {left_name}:\n{}  {right_name}:\n{}  {}",
        render_events(left),
        render_events(right),
        replay_hint(seed)
    );
}

fn assert_same_snapshot(
    seed: u64,
    index: u64,
    (left_name, left): (&str, &BookSnapshot),
    (right_name, right): (&str, &BookSnapshot),
) {
    if left == right {
        return;
    }
    let mut diff = String::new();
    if left.halted != right.halted
        || left.last_trade_price != right.last_trade_price
        || left.last_input != right.last_input
        || left.trade_n != right.trade_n
    {
        let _ = writeln!(
            diff,
            "    market state: {left_name} halted={} last={:?} input={:?} n={}; {right_name} halted={} last={:?} input={:?} n={}",
            left.halted,
            left.last_trade_price,
            left.last_input,
            left.trade_n,
            right.halted,
            right.last_trade_price,
            right.last_input,
            right.trade_n
        );
    }
    for (name, l, r) in [
        ("bids", &left.bids, &right.bids),
        ("asks", &left.asks, &right.asks),
        ("stops", &left.stops, &right.stops),
    ] {
        if l.len() != r.len() {
            let _ = writeln!(diff, "    {name}: {} vs {} orders", l.len(), r.len());
        }
        if let Some(i) = l.iter().zip(r).position(|(a, b)| a != b) {
            let _ = writeln!(
                diff,
                "    {name}[{i}]:\n      {left_name}: {:?}\n      {right_name}: {:?}",
                l[i], r[i]
            );
        }
    }
    panic!(
        "seed {seed}: snapshots differ after command #{index}\n{diff}  {}",
        replay_hint(seed)
    );
}

// ---------------------------------------------------------------------------------------------
// Quantity accounting from events
// ---------------------------------------------------------------------------------------------

/// What the events say about one open order.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    /// The quantity the order's events must add up to: its accepted qty, or after an amend
    /// the new total (at least what was filled).
    base: u64,
    /// The order's total qty: accepted, amended, less stp decrements.
    total: u64,
    fills: u64,
    /// Cancelled since `base` was set.
    cancelled: u64,
    leaves: u64,
}

/// Keeps every open order's fills, cancels and leaves as the events tell them, and checks
/// that they add up: fills + cancelled + leaves == base, and each event's `leaves` agrees.
#[derive(Default)]
struct Ledger {
    open: HashMap<OrderId, Tracked>,
}

impl Ledger {
    fn observe(&mut self, events: &[Event]) -> Result<(), String> {
        for e in events {
            self.event(e)
                .map_err(|m| format!("{m}\n    in event {e:?}"))?;
        }
        Ok(())
    }

    fn get(&mut self, oid: OrderId) -> Result<&mut Tracked, String> {
        self.open
            .get_mut(&oid)
            .ok_or_else(|| format!("event about order {oid}, which is not open"))
    }

    fn reduce(&mut self, oid: OrderId, qty: Qty, leaves: Qty, fill: bool) -> Result<(), String> {
        let a = self.get(oid)?;
        if qty.0 == 0 || qty.0 > a.leaves {
            return Err(format!(
                "order {oid}: quantity {} against leaves {}",
                qty.0, a.leaves
            ));
        }
        a.leaves -= qty.0;
        if fill {
            a.fills += qty.0;
        } else {
            a.cancelled += qty.0;
        }
        if a.leaves != leaves.0 {
            return Err(format!(
                "order {oid}: event says leaves {}, the ledger {}",
                leaves.0, a.leaves
            ));
        }
        self.close_if_done(oid)
    }

    fn close_if_done(&mut self, oid: OrderId) -> Result<(), String> {
        let a = self.get(oid)?;
        if a.fills + a.cancelled + a.leaves != a.base {
            return Err(format!("order {oid}: quantity not conserved: {a:?}"));
        }
        if a.leaves == 0 {
            self.open.remove(&oid);
        }
        Ok(())
    }

    fn event(&mut self, e: &Event) -> Result<(), String> {
        match e {
            Event::Accepted(a) => {
                let fresh = Tracked {
                    base: a.qty.0,
                    total: a.qty.0,
                    fills: 0,
                    cancelled: 0,
                    leaves: a.qty.0,
                };
                if self.open.insert(a.order.oid, fresh).is_some() {
                    return Err(format!("order {} accepted twice", a.order.oid));
                }
                Ok(())
            }
            Event::Rejected(_) => Ok(()),
            Event::Triggered(t) => self.get(t.order.oid).map(|_| ()),
            Event::Trade(t) => {
                if t.maker.oid == t.taker.oid {
                    return Err("an order traded with itself".into());
                }
                self.reduce(t.maker.oid, t.qty, t.maker_leaves, true)?;
                self.reduce(t.taker.oid, t.qty, t.taker_leaves, true)
            }
            Event::Cancelled(c) => {
                // A partial (stp decrement) cancel takes the quantity off the order's total.
                if c.leaves.0 > 0 {
                    let a = self.get(c.order.oid)?;
                    a.total = a.total.saturating_sub(c.qty.0);
                }
                self.reduce(c.order.oid, c.qty, c.leaves, false)
            }
            Event::Amended(m) => {
                let oid = m.order.oid;
                let a = self.get(oid)?;
                let expected = m.qty.0.saturating_sub(a.fills);
                if m.leaves.0 != expected {
                    return Err(format!(
                        "order {oid}: amended to {} with {} filled gives leaves {expected}, not {}",
                        m.qty.0, a.fills, m.leaves.0
                    ));
                }
                a.total = m.qty.0;
                a.base = m.qty.0.max(a.fills);
                a.cancelled = 0;
                a.leaves = expected;
                self.close_if_done(oid)
            }
        }
    }

    /// The book's open orders are exactly the ledger's, with the same quantities.
    fn check_snapshot(&self, s: &BookSnapshot) -> Result<(), String> {
        let records: Vec<_> = s.bids.iter().chain(&s.asks).chain(&s.stops).collect();
        if records.len() != self.open.len() {
            return Err(format!(
                "the book holds {} open orders, the events leave {} open",
                records.len(),
                self.open.len()
            ));
        }
        for r in records {
            let Some(a) = self.open.get(&r.oid) else {
                return Err(format!("order {} is open but its events closed it", r.oid));
            };
            if (r.qty.0, r.filled.0, r.leaves.0) != (a.total, a.fills, a.leaves)
                || r.filled.0 + r.leaves.0 != r.qty.0
            {
                return Err(format!(
                    "order {}: record qty/filled/leaves {}/{}/{}, events {}/{}/{}",
                    r.oid, r.qty.0, r.filled.0, r.leaves.0, a.total, a.fills, a.leaves
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Test 1: the fast book against the reference book
// ---------------------------------------------------------------------------------------------

const COMPARE_EVERY: u64 = 500;

fn compare_books(seed: u64, index: u64, fast: &OrderBook, reference: &ReferenceBook) {
    let (fs, rs) = (fast.snapshot(), reference.snapshot());
    assert_same_snapshot(seed, index, ("reference", &rs), ("fast", &fs));
    assert_eq!(
        fast.state_hash(),
        reference.state_hash(),
        "seed {seed}: state hashes differ after command #{index}; {}",
        replay_hint(seed)
    );
    assert_eq!(
        fast.state_hash(),
        fs.state_hash(),
        "seed {seed}: fast state_hash != snapshot's"
    );
    assert_eq!(
        fast.state_hash_as(HashVersion::Fnv1),
        fs.state_hash_as(HashVersion::Fnv1),
        "seed {seed}: fast state_hash != snapshot's in the version of format-1 snapshots"
    );
    assert_eq!(
        (fast.best_bid(), fast.best_ask(), fast.order_count()),
        (
            reference.best_bid(),
            reference.best_ask(),
            reference.order_count()
        ),
        "seed {seed}: best bid/ask or order count differ after command #{index}; {}",
        replay_hint(seed)
    );
    for side in [Side::Buy, Side::Sell] {
        assert_eq!(
            fast.depth(side, 8),
            reference.depth(side, 8),
            "seed {seed}: {} depth differs after command #{index}; {}",
            side.as_str(),
            replay_hint(seed)
        );
    }
    check_queries(seed, index, fast, &rs);
}

/// What the open-orders and order-status queries answer from the fast book is the reference
/// snapshot's orders of each account, in oid order, stops marked waiting; paging in twos
/// gives the same list; each order is found by oid and by cid by its account only.
fn check_queries(seed: u64, index: u64, fast: &OrderBook, rs: &BookSnapshot) {
    let mut expected: BTreeMap<Account, Vec<OpenOrder>> = BTreeMap::new();
    for (records, waiting) in [(&rs.bids, false), (&rs.asks, false), (&rs.stops, true)] {
        for r in records {
            expected.entry(r.account).or_default().push(OpenOrder {
                record: r.clone(),
                waiting,
            });
        }
    }
    for (account, orders) in &mut expected {
        orders.sort_by_key(|o| o.record.oid);
        let (all, more) = fast.open_orders(account, None, usize::MAX);
        assert!(
            &all == orders && !more,
            "seed {seed}: open orders of {account} differ after command #{index}"
        );
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = fast.open_orders(account, after, 2);
            after = page.last().map(|o| o.record.oid);
            paged.extend(page);
            if !more {
                break;
            }
        }
        assert!(
            &paged == orders,
            "seed {seed}: paged open orders of {account} differ"
        );
        for o in orders.iter() {
            let r = &o.record;
            assert_eq!(
                fast.open_order(account, OrderRef::Oid(r.oid)).as_ref(),
                Some(o)
            );
            if let Some(cid) = r.cid {
                assert_eq!(
                    fast.open_order(account, OrderRef::Cid(cid)).as_ref(),
                    Some(o)
                );
            }
            let stranger = Account::new("stranger").expect("account");
            assert_eq!(fast.open_order(&stranger, OrderRef::Oid(r.oid)), None);
        }
    }
}

#[derive(Default)]
struct Tally {
    commands: u64,
    events: u64,
    trades: u64,
}

fn run_oracle_seed(seed: u64, commands: u64, tally: &mut Tally) {
    with_seed_context(seed, |at| {
        let mut generator = Gen::new(seed);
        let mut fast = OrderBook::new(generator.spec.clone());
        let mut reference = ReferenceBook::new(generator.spec.clone());
        let mut ledger = Ledger::default();
        let (mut fast_events, mut reference_events) = (Vec::new(), Vec::new());
        for index in 0..commands {
            let cmd = generator.next_command();
            *at.borrow_mut() = (index, Some(cmd.clone()));
            fast_events.clear();
            reference_events.clear();
            reference.apply(&cmd, &mut reference_events);
            fast.apply(&cmd, &mut fast_events);
            generator.observe(&reference_events);
            assert_same_events(
                seed,
                index,
                &cmd,
                ("reference", &reference_events),
                ("fast", &fast_events),
            );
            if let Err(e) = fast.check_invariants() {
                panic!(
                    "seed {seed}: fast book invariant broken after command #{index} {cmd:?}: {e}\n  {}",
                    replay_hint(seed)
                );
            }
            if let Err(e) = ledger.observe(&reference_events) {
                panic!(
                    "seed {seed}: accounting after command #{index} {cmd:?}: {e}\n  {}",
                    replay_hint(seed)
                );
            }
            tally.events += reference_events.len() as u64;
            tally.trades += reference_events
                .iter()
                .filter(|e| matches!(e, Event::Trade(_)))
                .count() as u64;
            if (index + 1) % COMPARE_EVERY == 0 || index + 1 == commands {
                compare_books(seed, index, &fast, &reference);
                if let Err(e) = ledger.check_snapshot(&reference.snapshot()) {
                    panic!(
                        "seed {seed}: after command #{index}: {e}\n  {}",
                        replay_hint(seed)
                    );
                }
            }
        }
        tally.commands += commands;
    });
}

/// The per-account limits never change the outcome of a command they let through: a stream
/// run under limits gives, for every command, the events of the same stream run without
/// them in which each command a limit refused is replaced by a command that does nothing (a
/// cancel of an order that never existed), leaving those two rejections aside; and the books
/// end with the same orders.
#[test]
fn limits_never_change_an_accepted_commands_outcome() {
    let limited_reasons = [RejectReason::RateLimited, RejectReason::TooManyOpenOrders];
    let mut refused = 0u64;
    let plan = plan(5_000, 200_000, 40_000);
    for &(seed, commands) in &plan {
        with_seed_context(seed, |at| {
            let mut generator = Gen::new(seed);
            let mut input = generator.spec.to_input();
            input.account_rate_per_sec = Some([50u32, 200, 1000][(seed % 3) as usize]);
            input.account_burst = Some([1u32, 3, 20][(seed / 3 % 3) as usize]);
            input.account_open_orders_max = Some([2u32, 6, 20][(seed / 9 % 3) as usize]);
            let limited_spec = input.validate().expect("limited spec");
            let free_spec = |spec: &MarketSpec| {
                let mut input = spec.to_input();
                input.account_rate_per_sec = Some(0);
                input.account_burst = None;
                input.account_open_orders_max = Some(0);
                input.validate().expect("free spec")
            };
            generator.spec = limited_spec.clone();
            let mut limited = OrderBook::new(limited_spec.clone());
            let mut free = OrderBook::new(free_spec(&limited_spec));
            let (mut limited_events, mut free_events) = (Vec::new(), Vec::new());
            for index in 0..commands {
                let cmd = generator.next_command();
                *at.borrow_mut() = (index, Some(cmd.clone()));
                limited_events.clear();
                limited.apply(&cmd, &mut limited_events);
                generator.observe(&limited_events);
                let was_refused = limited_events.iter().any(
                    |e| matches!(e, Event::Rejected(r) if limited_reasons.contains(&r.reason)),
                );
                let free_cmd = match &cmd.op {
                    _ if was_refused => Command {
                        op: Op::Cancel(OrderRef::Oid(OrderId(1))),
                        ..cmd.clone()
                    },
                    Op::UpdateSpec(rules) => Command {
                        op: Op::UpdateSpec(free_spec(&limited.spec().with_rules(*rules)).rules()),
                        ..cmd.clone()
                    },
                    _ => cmd.clone(),
                };
                free_events.clear();
                free.apply(&free_cmd, &mut free_events);
                if was_refused {
                    refused += 1;
                    limited_events.retain(
                        |e| !matches!(e, Event::Rejected(r) if limited_reasons.contains(&r.reason)),
                    );
                    free_events.retain(|e| {
                        !matches!(e, Event::Rejected(r) if r.reason == RejectReason::UnknownOrder && r.oid == Some(OrderId(1)))
                    });
                }
                assert_same_events(
                    seed,
                    index,
                    &cmd,
                    ("with limits", &limited_events),
                    ("without, refused commands inert", &free_events),
                );
            }
            let (a, b) = (limited.snapshot(), free.snapshot());
            assert_eq!(
                (&a.bids, &a.asks, &a.stops),
                (&b.bids, &b.asks, &b.stops),
                "seed {seed}: the books end with different orders"
            );
        });
    }
    assert!(refused > 100, "the limits refused only {refused} commands");
}

#[test]
fn oracle_fast_book_matches_reference() {
    let plan = plan(1, 1_000_000, 120_000);
    let mut tally = Tally::default();
    for &(seed, commands) in &plan {
        run_oracle_seed(seed, commands, &mut tally);
    }
    eprintln!(
        "oracle: {} seeds, {} commands, {} events, {} trades",
        plan.len(),
        tally.commands,
        tally.events,
        tally.trades
    );
}

// ---------------------------------------------------------------------------------------------
// Test 2 and 4: snapshot, MessagePack round trip, restore, and go on identically
// ---------------------------------------------------------------------------------------------

/// What both books offer for the round-trip test.
trait Book: Sized {
    const NAME: &'static str;
    fn new(spec: MarketSpec) -> Self;
    fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>);
    fn snapshot(&self) -> BookSnapshot;
    fn restore(s: &BookSnapshot) -> Result<Self, RestoreError>;
    fn state_hash(&self) -> agora::book::StateHash;
}

impl Book for OrderBook {
    const NAME: &'static str = "fast";
    fn new(spec: MarketSpec) -> Self {
        OrderBook::new(spec)
    }
    fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>) {
        OrderBook::apply(self, cmd, out)
    }
    fn snapshot(&self) -> BookSnapshot {
        OrderBook::snapshot(self)
    }
    fn restore(s: &BookSnapshot) -> Result<Self, RestoreError> {
        OrderBook::restore(s)
    }
    fn state_hash(&self) -> agora::book::StateHash {
        OrderBook::state_hash(self)
    }
}

impl Book for ReferenceBook {
    const NAME: &'static str = "reference";
    fn new(spec: MarketSpec) -> Self {
        ReferenceBook::new(spec)
    }
    fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>) {
        ReferenceBook::apply(self, cmd, out)
    }
    fn snapshot(&self) -> BookSnapshot {
        ReferenceBook::snapshot(self)
    }
    fn restore(s: &BookSnapshot) -> Result<Self, RestoreError> {
        ReferenceBook::restore(s)
    }
    fn state_hash(&self) -> agora::book::StateHash {
        ReferenceBook::state_hash(self)
    }
}

/// Snapshots `book` at random points, round-trips the snapshot through MessagePack, restores
/// it (as a `B` and as a `ReferenceBook`), and feeds the same next commands to all three:
/// events and hashes must stay the same.
fn run_restore_seed<B: Book>(seed: u64, commands: u64) -> u64 {
    let mut restores = 0;
    with_seed_context(seed, |at| {
        let mut generator = Gen::new(seed);
        let mut choices = Rng::new(seed ^ 0xdead_beef);
        let mut book = B::new(generator.spec.clone());
        let mut restored: Option<(B, ReferenceBook, u64)> = None;
        let mut next_restore = choices.range(50, 1_500) as u64;
        let (mut events, mut restored_events) = (Vec::new(), Vec::new());
        for index in 0..commands {
            if index == next_restore {
                let snapshot = book.snapshot();
                let bytes = rmp_serde::to_vec_named(&snapshot).expect("snapshot encodes");
                let decoded: BookSnapshot =
                    rmp_serde::from_slice(&bytes).expect("snapshot decodes");
                assert_eq!(
                    decoded, snapshot,
                    "seed {seed}: MessagePack changed the snapshot"
                );
                let copy = B::restore(&decoded).unwrap_or_else(|e| {
                    panic!(
                        "seed {seed}: {} restore refused its own snapshot at command #{index}: {e}\n  {}",
                        B::NAME,
                        replay_hint(seed)
                    )
                });
                assert_same_snapshot(
                    seed,
                    index,
                    ("original", &snapshot),
                    ("restored", &copy.snapshot()),
                );
                assert_eq!(
                    copy.state_hash(),
                    book.state_hash(),
                    "seed {seed}: hash after restore"
                );
                let oracle = ReferenceBook::restore(&decoded).unwrap_or_else(|e| {
                    panic!(
                        "seed {seed}: the reference book refused the {} book's snapshot at command #{index}: {e}\n  {}",
                        B::NAME,
                        replay_hint(seed)
                    )
                });
                assert_same_snapshot(
                    seed,
                    index,
                    ("original", &snapshot),
                    ("restored as reference", &oracle.snapshot()),
                );
                restores += 1;
                restored = Some((copy, oracle, index + choices.range(20, 800) as u64));
                next_restore = index + choices.range(100, 2_000) as u64;
            }
            let cmd = generator.next_command();
            *at.borrow_mut() = (index, Some(cmd.clone()));
            events.clear();
            book.apply(&cmd, &mut events);
            generator.observe(&events);
            if let Some((copy, oracle, until)) = &mut restored {
                restored_events.clear();
                copy.apply(&cmd, &mut restored_events);
                assert_same_events(
                    seed,
                    index,
                    &cmd,
                    ("original", &events),
                    ("restored", &restored_events),
                );
                restored_events.clear();
                oracle.apply(&cmd, &mut restored_events);
                assert_same_events(
                    seed,
                    index,
                    &cmd,
                    ("original", &events),
                    ("restored as reference", &restored_events),
                );
                if index >= *until || index + 1 == commands {
                    assert_eq!(
                        oracle.state_hash(),
                        book.state_hash(),
                        "seed {seed}: reference restored from the {} book drifted by command #{index}; {}",
                        B::NAME,
                        replay_hint(seed)
                    );
                    assert_eq!(
                        copy.state_hash(),
                        book.state_hash(),
                        "seed {seed}: {} restored book's hash drifted by command #{index}; {}",
                        B::NAME,
                        replay_hint(seed)
                    );
                    restored = None;
                }
            }
        }
    });
    restores
}

#[test]
fn oracle_fast_restore_goes_on_identically() {
    let plan = plan(1_001, 200_000, 40_000);
    let restores: u64 = plan
        .iter()
        .map(|&(seed, n)| run_restore_seed::<OrderBook>(seed, n))
        .sum();
    assert!(restores > 0);
    let mut s = OrderBook::new(Gen::new(1).spec).snapshot();
    s.format_version = SNAPSHOT_FORMAT_VERSION + 1;
    assert!(matches!(
        OrderBook::restore(&s),
        Err(RestoreError::Version { .. })
    ));
}

#[test]
fn reference_restore_goes_on_identically() {
    let plan = plan(2_001, 200_000, 40_000);
    let restores: u64 = plan
        .iter()
        .map(|&(seed, n)| run_restore_seed::<ReferenceBook>(seed, n))
        .sum();
    assert!(restores > 0);
    let mut s = ReferenceBook::new(Gen::new(1).spec).snapshot();
    s.format_version = SNAPSHOT_FORMAT_VERSION + 1;
    assert!(matches!(
        ReferenceBook::restore(&s),
        Err(RestoreError::Version { found, expected })
            if found == SNAPSHOT_FORMAT_VERSION + 1 && expected == SNAPSHOT_FORMAT_VERSION
    ));
}

/// Both books refuse snapshots that break the book's invariants, with the same words. A
/// break one record shows is refused by `check_records` alone, before either book builds
/// anything: release builds check nothing more of the structures they build from them.
#[test]
fn both_books_refuse_inconsistent_snapshots_alike() {
    let mut input = MarketSpecInput::new("BTC-USDC", 0, 0);
    input.tick_size = Some("2".into());
    let spec = input.validate().unwrap();
    let mut book = ReferenceBook::new(spec);
    let sell_stop = |stop_price| NewOrder {
        order_type: OrderType::StopMarket,
        tif: Tif::Ioc,
        price: None,
        stop_price: Some(Price(stop_price)),
        ..NewOrder::limit(Side::Sell, Price(0), Qty(1))
    };
    let orders = [
        ("a", NewOrder::limit(Side::Buy, Price(98), Qty(5))),
        ("a", NewOrder::limit(Side::Buy, Price(96), Qty(5))),
        ("b", NewOrder::limit(Side::Sell, Price(102), Qty(5))),
        ("b", sell_stop(90)),
        ("b", sell_stop(92)),
    ];
    for (seq, (account, order)) in (1..).zip(orders) {
        let cmd = Command {
            seq,
            pos: 0,
            ts: 1_000 * MS + seq * MS,
            account: Account::new(account).unwrap(),
            op: Op::New(order),
        };
        book.apply(&cmd, &mut Vec::new());
        book.check_invariants().unwrap();
    }
    let good = book.snapshot();
    assert_eq!(good.bids.len() + good.asks.len() + good.stops.len(), 5);
    good.check_records().unwrap();
    assert!(ReferenceBook::restore(&good).is_ok());
    OrderBook::restore(&good)
        .expect("restores")
        .check_invariants()
        .expect("the restored book holds");
    let refused = |change: &dyn Fn(&mut BookSnapshot), says: &str, one_record: bool| {
        let mut bad = good.clone();
        change(&mut bad);
        let reference = ReferenceBook::restore(&bad).map(|_| ());
        let fast = OrderBook::restore(&bad).map(|_| ());
        match &reference {
            Err(RestoreError::Inconsistent(message)) => {
                assert!(message.contains(says), "{message:?} should say {says:?}")
            }
            other => panic!("expected a refusal saying {says:?}, got {other:?}"),
        }
        assert_eq!(fast, reference, "the fast book refuses alike");
        assert_eq!(bad.check_records().is_err(), one_record, "{says}");
    };
    refused(&|b| b.bids.swap(0, 1), "best price first", true);
    refused(&|b| b.asks[0].price = Some(Price(98)), "crossed", false);
    refused(&|b| b.asks[0].side = Side::Buy, "list", true);
    refused(&|b| b.bids[1].oid = b.bids[0].oid, "twice", false);
    refused(
        &|b| {
            b.bids[1].cid = Some(Cid::new("c1").unwrap());
            b.bids[0].cid = b.bids[1].cid;
        },
        "two open orders with cid",
        false,
    );
    refused(&|b| b.stops.swap(0, 1), "oid order", true);
    refused(&|b| b.bids[0].leaves = Qty(0), "add up", true);
    refused(&|b| b.bids[0].visible = Qty(4), "shows", true);
    refused(
        &|b| b.bids[0].display_qty = Some(Qty(0)),
        "display quantity",
        true,
    );
    refused(
        &|b| b.stops[0].display_qty = Some(Qty(1)),
        "display quantity",
        true,
    );
    refused(&|b| b.stops[0].tif = Tif::Gtc, "ioc or fok", true);
    refused(&|b| b.bids[0].price = Some(Price(97)), "off the tick", true);
    refused(
        &|b| b.stops[0].stop_price = Some(Price(91)),
        "off the tick",
        true,
    );
    refused(&|b| b.bids[0].tif = Tif::Ioc, "cannot rest", true);
    refused(&|b| b.bids[0].price = None, "a price goes with", true);
    refused(
        &|b| b.bids[0].price = Some(Price(0)),
        "a price goes with",
        true,
    );
    refused(
        &|b| {
            let bid = b.bids.remove(1);
            b.stops.insert(0, bid);
        },
        "no stop",
        true,
    );
    refused(
        &|b| b.stops[0].stop_price = None,
        "a stop price goes with",
        true,
    );
    refused(
        &|b| {
            b.stops[0].qty = Qty(2);
            b.stops[0].filled = Qty(1);
        },
        "waiting stop",
        true,
    );
    refused(&|b| b.bids[0].expire_at = Some(1), "gtd", true);
}

/// One random change to a snapshot's records: a field of one order, or two orders swapped.
fn damage(s: &mut BookSnapshot, rng: &mut Rng) {
    let lists = [s.bids.len(), s.asks.len(), s.stops.len()];
    let total: usize = lists.iter().sum();
    if total < 2 {
        return;
    }
    let pick = |rng: &mut Rng| {
        let mut n = rng.below(total as u64) as usize;
        for (list, &len) in lists.iter().enumerate() {
            if n < len {
                return (list, n);
            }
            n -= len;
        }
        unreachable!("n is below the total")
    };
    let (list, i) = pick(rng);
    let (other_list, j) = pick(rng);
    let other = [&s.bids, &s.asks, &s.stops][other_list][j].clone();
    let what = rng.below(14);
    if what == 13 {
        if list == other_list {
            [&mut s.bids, &mut s.asks, &mut s.stops][list].swap(i, j);
        }
        return;
    }
    let o = match list {
        0 => &mut s.bids[i],
        1 => &mut s.asks[i],
        _ => &mut s.stops[i],
    };
    let step = |v: u64, rng: &mut Rng| v.wrapping_add_signed(rng.range(-3, 3));
    match what {
        0 => o.oid = other.oid,
        1 => o.cid = other.cid,
        2 => o.account = other.account,
        3 => o.side = other.side,
        4 => o.price = o.price.map(|p| Price(step(p.0, rng))),
        5 => o.stop_price = o.stop_price.map(|p| Price(step(p.0, rng))),
        6 => o.visible = Qty(step(o.visible.0, rng)),
        7 => o.leaves = Qty(step(o.leaves.0, rng)),
        8 => o.qty = Qty(step(o.qty.0, rng)),
        9 => o.display_qty = Some(Qty(rng.below(4))).filter(|_| rng.chance(500)),
        10 => o.tif = other.tif,
        11 => o.order_type = other.order_type,
        _ => o.price = other.price,
    }
}

/// Real snapshots, damaged at random: the fast book accepts exactly the snapshots the
/// reference accepts (so its release restore, which checks the records and what needs the
/// whole book but not the structures it builds, stands on the same rules), and what both
/// accept restores to the same content.
#[test]
fn damaged_snapshots_are_accepted_and_refused_alike() {
    let (mut accepted, mut refused) = (0, 0);
    for seed in 0..24 {
        let mut generator = Gen::new(seed);
        let mut book = ReferenceBook::new(generator.spec.clone());
        let mut events = Vec::new();
        for _ in 0..400 {
            let cmd = generator.next_command();
            events.clear();
            book.apply(&cmd, &mut events);
            generator.observe(&events);
        }
        let good = book.snapshot();
        let mut rng = Rng::new(seed ^ 0x5eed);
        for round in 0..150 {
            let mut bad = good.clone();
            damage(&mut bad, &mut rng);
            match (OrderBook::restore(&bad), ReferenceBook::restore(&bad)) {
                (Ok(fast), Ok(reference)) => {
                    accepted += 1;
                    if let Err(e) = fast.check_invariants() {
                        panic!("seed {seed} round {round}: the restored book is broken: {e}");
                    }
                    let (f, r) = (fast.snapshot(), reference.snapshot());
                    if f != r {
                        let first = [(&f.bids, &r.bids), (&f.asks, &r.asks), (&f.stops, &r.stops)]
                            .into_iter()
                            .find(|(a, b)| a != b);
                        panic!(
                            "seed {seed} round {round}: the books restored differently ({first:?}), \
                             from {bad:?}"
                        );
                    }
                }
                (Err(_), Err(_)) => refused += 1,
                (fast, reference) => panic!(
                    "seed {seed} round {round}: the fast book {:?}, the reference {:?}",
                    fast.map(|_| ()),
                    reference.map(|_| ())
                ),
            }
        }
    }
    // Both outcomes were tried many times.
    assert!(
        accepted > 300 && refused > 300,
        "{accepted} accepted, {refused} refused"
    );
}

// ---------------------------------------------------------------------------------------------
// Test 3: determinism
// ---------------------------------------------------------------------------------------------

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One run of a seed on a fresh book: a digest of each command's events, and the final hash.
fn digest_run<B: Book>(seed: u64, commands: u64) -> (Vec<u64>, agora::book::StateHash) {
    let mut digests = Vec::with_capacity(commands as usize);
    let mut hash = None;
    with_seed_context(seed, |at| {
        let mut generator = Gen::new(seed);
        let mut book = B::new(generator.spec.clone());
        let mut events = Vec::new();
        for index in 0..commands {
            let cmd = generator.next_command();
            *at.borrow_mut() = (index, Some(cmd.clone()));
            events.clear();
            book.apply(&cmd, &mut events);
            generator.observe(&events);
            digests.push(fnv(format!("{events:?}").as_bytes()));
        }
        hash = Some(book.state_hash());
    });
    (digests, hash.expect("the run finished"))
}

fn check_determinism<B: Book>(first: u64) {
    for (seed, commands) in plan(first, 100_000, 24_000) {
        let (first_run, first_hash) = digest_run::<B>(seed, commands);
        let (second_run, second_hash) = digest_run::<B>(seed, commands);
        if let Some(index) = first_run.iter().zip(&second_run).position(|(a, b)| a != b) {
            panic!(
                "seed {seed}: {} book's events differ between two runs at command #{index}; {}",
                B::NAME,
                replay_hint(seed)
            );
        }
        assert_eq!(
            first_hash,
            second_hash,
            "seed {seed}: {} book's state hash differs between two runs; {}",
            B::NAME,
            replay_hint(seed)
        );
    }
}

#[test]
fn oracle_fast_book_is_deterministic() {
    check_determinism::<OrderBook>(3_001);
}

#[test]
fn reference_is_deterministic() {
    check_determinism::<ReferenceBook>(3_001);
}

// ---------------------------------------------------------------------------------------------
// The reference book and the generator on their own
// ---------------------------------------------------------------------------------------------

/// The reference book on random streams: its invariants hold, quantities are conserved, and
/// the streams reach every rule (every reason a book can give, every event, both amend kinds).
#[test]
fn reference_random_streams_conserve_and_cover_every_rule() {
    let mut rejects: BTreeSet<&str> = BTreeSet::new();
    let mut cancels: BTreeSet<&str> = BTreeSet::new();
    let mut kinds: BTreeSet<&str> = BTreeSet::new();
    let mut partial_stp = false;
    let mut priority = BTreeSet::new();
    let mut tally = Tally::default();
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    let mut max_open = 0;
    for (seed, commands) in plan(4_001, 400_000, 60_000) {
        with_seed_context(seed, |at| {
            let mut generator = Gen::new(seed);
            let mut book = ReferenceBook::new(generator.spec.clone());
            let mut ledger = Ledger::default();
            let mut events = Vec::new();
            for index in 0..commands {
                let cmd = generator.next_command();
                *at.borrow_mut() = (index, Some(cmd.clone()));
                // A cid that is not open: a `duplicate_cid` for it comes from the cid window.
                let closed_cid = match &cmd.op {
                    Op::New(new) => new
                        .cid
                        .filter(|&cid| book.open_order_by_cid(cmd.account, cid).is_none()),
                    _ => None,
                };
                events.clear();
                book.apply(&cmd, &mut events);
                generator.observe(&events);
                if closed_cid.is_some()
                    && events.iter().any(|e| {
                        matches!(e, Event::Rejected(r) if r.reason == RejectReason::DuplicateCid)
                    })
                {
                    *counts
                        .entry("rejected duplicate_cid by the cid window".into())
                        .or_default() += 1;
                }
                if let Err(e) = book.check_invariants() {
                    panic!("seed {seed}: invariant broken after #{index} {cmd:?}: {e}");
                }
                if let Err(e) = ledger.observe(&events) {
                    panic!("seed {seed}: accounting after #{index} {cmd:?}: {e}");
                }
                let triggered = events
                    .iter()
                    .filter(|e| matches!(e, Event::Triggered(_)))
                    .count();
                if triggered > 1 {
                    *counts.entry("cascades of 2+ stops".into()).or_default() += 1;
                }
                max_open = max_open.max(book.order_count());
                for e in &events {
                    kinds.insert(e.type_name());
                    let key = match e {
                        Event::Rejected(r) => format!("rejected {}", r.reason.as_str()),
                        Event::Cancelled(c) => format!("cancelled {}", c.reason.as_str()),
                        Event::Amended(m) => format!("amended kept={}", m.priority_kept),
                        Event::Accepted(a) => {
                            format!("accepted {} {}", a.order_type.as_str(), a.tif.as_str())
                        }
                        _ => e.type_name().to_string(),
                    };
                    *counts.entry(key).or_default() += 1;
                    match e {
                        Event::Rejected(r) => {
                            rejects.insert(r.reason.as_str());
                        }
                        Event::Cancelled(c) => {
                            cancels.insert(c.reason.as_str());
                            partial_stp |= c.leaves.0 > 0;
                        }
                        Event::Amended(m) => {
                            priority.insert(m.priority_kept);
                        }
                        Event::Trade(_) => tally.trades += 1,
                        _ => {}
                    }
                }
                tally.events += events.len() as u64;
                let at_check = (index + 1) % COMPARE_EVERY == 0 || index + 1 == commands;
                if at_check && let Err(e) = ledger.check_snapshot(&book.snapshot()) {
                    panic!("seed {seed}: after #{index}: {e}");
                }
            }
            tally.commands += commands;
        });
    }
    eprintln!(
        "reference: {} commands, {} events, {} trades, at most {max_open} resting orders",
        tally.commands, tally.events, tally.trades
    );
    for (key, n) in &counts {
        eprintln!("  {n:>8}  {key}");
    }
    if std::env::var_os("AGORA_ORACLE_SEED").is_some() {
        // One seed's market cannot reach every rule (its spec may have no max, no band...).
        return;
    }
    let wire_only = [
        RejectReason::Malformed,
        RejectReason::InvalidField,
        RejectReason::BatchTooLarge,
        RejectReason::NotPermitted,
    ];
    let missing: Vec<_> = RejectReason::ALL
        .iter()
        .filter(|r| !wire_only.contains(r) && !rejects.contains(r.as_str()))
        .map(|r| r.as_str())
        .collect();
    assert!(missing.is_empty(), "the streams never hit: {missing:?}");
    assert!(
        counts.contains_key("rejected duplicate_cid by the cid window"),
        "no retry of a closed order was ever refused by a cid window"
    );
    let all_cancels = [
        CancelReason::User,
        CancelReason::IocRemainder,
        CancelReason::FokUnfilled,
        CancelReason::MarketRemainder,
        CancelReason::PostOnlyWouldCross,
        CancelReason::Stp,
        CancelReason::Halt,
        CancelReason::Expired,
        CancelReason::CancelAll,
    ];
    let missing: Vec<_> = all_cancels
        .iter()
        .filter(|c| !cancels.contains(c.as_str()))
        .map(|c| c.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "the streams never cancel for: {missing:?}"
    );
    assert_eq!(kinds.len(), 6, "event kinds seen: {kinds:?}");
    assert!(partial_stp, "decrement_and_cancel never left an order open");
    assert_eq!(
        priority.len(),
        2,
        "amends seen only with priority_kept {priority:?}"
    );
}
