//! Seeded, realistic order flow for benches, `agora replay` samples and soak runs.
//!
//! Real flow is cancel-heavy: about half adds, a third or more cancels, a few percent executions;
//! orders rest over hundreds of sparse levels, most near the top. The generator keeps a book of
//! its own so cancels and amends target orders that are really open. Same parameters and seed ⇒
//! the same commands, on any machine. This module must never be used on the engine's command
//! path: it exists to produce inputs, not to process them.

use std::collections::HashMap;

use crate::book::{
    Account, Amend, Cid, Command, Event, MarketSpec, MarketSpecInput, NewOrder, Op, OrderBook,
    OrderId, OrderRef, OrderType, Price, Qty, Side, StpMode, Tif,
};

/// SplitMix64: tiny, fast, and the same everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct FlowParams {
    pub seed: u64,
    /// Resting orders to build before the measured commands, and to hover around after.
    pub resting: usize,
    /// Passive orders spread over this many ticks from the top of the book.
    pub spread_ticks: u64,
    /// Measured commands.
    pub commands: usize,
    pub accounts: u32,
    /// Mix in every order type and rule (stops, icebergs, GTD, amends, STP, halts, bad input);
    /// otherwise the benchmark mix: ~55% limit, ~10% market, ~35% cancel.
    pub full_mix: bool,
    /// Percent of cancels aimed at one of the most recently placed open orders (most orders
    /// die young); the rest pick uniformly among all open orders. 0 = all uniform.
    pub young_cancel_pct: u8,
}

/// How the flow is shaped beyond `FlowParams`, for the families of flows the book is measured
/// on (BENCHMARKS.md, "Flow families"); the default is the shape of workloads (a) and (b).
#[derive(Clone, Debug)]
pub struct FlowShape {
    /// Percent of the benchmark mix's commands that are cancels (10-60; default 35). Above 35
    /// the book cannot keep its size from live cancels alone (adds must outnumber cancels), so
    /// while it is short of its resting size a drawn cancel targets a recently closed order and
    /// is rejected, as late cancels are on a real venue.
    pub cancel_pct: u8,
    /// Percent of cancels that name their order by cid (the rest by oid; default 50).
    pub cancel_by_cid_pct: u8,
    /// Cids as plain numbers (`"1234"`) rather than `"c1234"`.
    pub numeric_cids: bool,
}

/// The default cancel share of the benchmark mix.
pub const CANCEL_PCT_DEFAULT: u8 = 35;

impl Default for FlowShape {
    fn default() -> FlowShape {
        FlowShape {
            cancel_pct: CANCEL_PCT_DEFAULT,
            cancel_by_cid_pct: 50,
            numeric_cids: false,
        }
    }
}

/// Recently closed orders kept as targets of late cancels.
const CLOSED_WINDOW: usize = 256;

/// How many of the most recently placed orders count as young.
const YOUNG_WINDOW: usize = 64;

/// Default share of cancels aimed at young orders.
pub const YOUNG_CANCEL_PCT_DEFAULT: u8 = 80;

impl FlowParams {
    /// Workload (a): ~1,000 resting orders over a few hundred levels.
    pub fn small_book(seed: u64, commands: usize) -> FlowParams {
        FlowParams {
            seed,
            resting: 1_000,
            spread_ticks: 400,
            commands,
            accounts: 200,
            full_mix: false,
            young_cancel_pct: YOUNG_CANCEL_PCT_DEFAULT,
        }
    }

    /// Workload (b): ~100,000 resting orders over a wide price range.
    pub fn large_book(seed: u64, commands: usize) -> FlowParams {
        FlowParams {
            seed,
            resting: 100_000,
            spread_ticks: 20_000,
            commands,
            accounts: 2_000,
            full_mix: false,
            young_cancel_pct: YOUNG_CANCEL_PCT_DEFAULT,
        }
    }
}

/// A generated workload: the spec, the commands that build the starting book, and the flow.
#[derive(Clone, Debug)]
pub struct Workload {
    pub spec: MarketSpec,
    pub prefill: Vec<Command>,
    pub commands: Vec<Command>,
}

impl Workload {
    /// A book holding the prefill, with room to run the flow without growing.
    pub fn prefilled_book(&self) -> OrderBook {
        let mut book = OrderBook::with_capacity(self.spec.clone(), self.prefill.len() * 2 + 1024);
        let mut events = Vec::with_capacity(1024);
        for cmd in &self.prefill {
            events.clear();
            book.apply(cmd, &mut events);
        }
        book
    }
}

/// What a workload is made of, as `agora generate` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub resting: usize,
    /// Price levels holding the resting orders (both sides).
    pub levels: usize,
    pub commands: usize,
    /// Shares of the flow, in percent: limit orders, market orders, cancels (by cid among them).
    pub limit_pct: f64,
    pub market_pct: f64,
    pub cancel_pct: f64,
    pub cancel_by_cid_pct: f64,
}

impl Workload {
    pub fn profile(&self) -> Profile {
        let book = self.prefilled_book();
        let (mut limit, mut market, mut cancel, mut by_cid) = (0usize, 0usize, 0usize, 0usize);
        for cmd in &self.commands {
            match &cmd.op {
                Op::New(o) if o.order_type == OrderType::Market => market += 1,
                Op::New(_) => limit += 1,
                Op::Cancel(target) => {
                    cancel += 1;
                    by_cid += usize::from(matches!(target, OrderRef::Cid(_)));
                }
                _ => {}
            }
        }
        let pct = |n: usize, of: usize| 100.0 * n as f64 / of.max(1) as f64;
        Profile {
            resting: book.order_count(),
            levels: book.level_count(Side::Buy) + book.level_count(Side::Sell),
            commands: self.commands.len(),
            limit_pct: pct(limit, self.commands.len()),
            market_pct: pct(market, self.commands.len()),
            cancel_pct: pct(cancel, self.commands.len()),
            cancel_by_cid_pct: pct(by_cid, cancel),
        }
    }
}

/// The market the generated flow trades: `BENCH-USD`, prices with 2 decimals, whole lots.
pub fn bench_spec() -> MarketSpec {
    let mut input = MarketSpecInput::new("BENCH-USD", 2, 0);
    input.orders_max = Some(10_000_000);
    match input.validate() {
        Ok(spec) => spec,
        Err(e) => unreachable!("the built-in bench spec is valid: {e}"),
    }
}

#[derive(Clone, Copy)]
struct Live {
    oid: OrderId,
    account: u32,
    cid: Cid,
}

struct Generator {
    rng: Rng,
    params: FlowParams,
    shape: FlowShape,
    /// The most recently closed orders (targets of late cancels), oldest first.
    closed: std::collections::VecDeque<Live>,
    book: OrderBook,
    events: Vec<Event>,
    accounts: Vec<Account>,
    live: Vec<Live>,
    live_index: HashMap<OrderId, usize>,
    /// The most recently placed orders that rested (oldest first); some may have closed since.
    young: std::collections::VecDeque<OrderId>,
    pending: HashMap<OrderId, Live>,
    seq: u64,
    ts: u64,
    mid: u64,
    halted: bool,
}

const MID_START: u64 = 100_000;

impl Generator {
    fn new(params: FlowParams, shape: FlowShape, spec: MarketSpec) -> Generator {
        let accounts = (0..params.accounts.max(1))
            .map(|i| {
                Account::new(&format!("acct-{i}")).unwrap_or_else(|_| unreachable!("ascii name"))
            })
            .collect();
        Generator {
            rng: Rng::new(params.seed),
            book: OrderBook::with_capacity(spec, params.resting * 2 + 1024),
            params,
            shape,
            closed: std::collections::VecDeque::with_capacity(CLOSED_WINDOW + 1),
            events: Vec::with_capacity(256),
            accounts,
            live: Vec::new(),
            live_index: HashMap::new(),
            young: std::collections::VecDeque::with_capacity(YOUNG_WINDOW + 1),
            pending: HashMap::new(),
            seq: 0,
            ts: 1_700_000_000_000_000_000,
            mid: MID_START,
            halted: false,
        }
    }

    fn forget(&mut self, oid: OrderId) {
        if let Some(i) = self.live_index.remove(&oid) {
            let gone = self.live.swap_remove(i);
            if self.shape.cancel_pct > CANCEL_PCT_DEFAULT {
                self.closed.push_back(gone);
                if self.closed.len() > CLOSED_WINDOW {
                    self.closed.pop_front();
                }
            }
            if let Some(moved) = self.live.get(i) {
                self.live_index.insert(moved.oid, i);
            }
        }
    }

    /// Applies a command to the generator's own book and follows which orders stay open.
    fn emit(&mut self, cmd: Command, out: &mut Vec<Command>) {
        self.events.clear();
        self.book.apply(&cmd, &mut self.events);
        let events = std::mem::take(&mut self.events);
        for e in &events {
            match e {
                Event::Accepted(a) => {
                    if let Some(l) = self.pending.remove(&a.order.oid) {
                        self.live_index.insert(l.oid, self.live.len());
                        self.live.push(l);
                        self.young.push_back(l.oid);
                        if self.young.len() > YOUNG_WINDOW {
                            self.young.pop_front();
                        }
                    }
                }
                Event::Trade(t) => {
                    if t.maker_leaves.0 == 0 {
                        self.forget(t.maker.oid);
                    }
                    if t.taker_leaves.0 == 0 {
                        self.forget(t.taker.oid);
                    }
                    self.mid = t.price.0;
                }
                Event::Cancelled(c) if c.leaves.0 == 0 => self.forget(c.order.oid),
                Event::Amended(a) if a.leaves.0 == 0 => self.forget(a.order.oid),
                _ => {}
            }
        }
        self.events = events;
        self.pending.clear();
        out.push(cmd);
    }

    fn next_input(&mut self) -> (u64, u64) {
        self.seq += 1;
        self.ts += self.rng.below(1_000_000);
        (self.seq, self.ts)
    }

    fn new_order(&mut self, account: u32, order: NewOrder) -> Command {
        let (seq, ts) = self.next_input();
        let oid = OrderId::from_input(seq, 0);
        if let Some(cid) = order.cid {
            self.pending.insert(oid, Live { oid, account, cid });
        }
        Command {
            seq,
            pos: 0,
            ts,
            account: self.accounts[account as usize],
            op: Op::New(order),
        }
    }

    fn cid(&self) -> Cid {
        let text = if self.shape.numeric_cids {
            format!("{}", self.seq + 1)
        } else {
            format!("c{}", self.seq + 1)
        };
        Cid::new(&text).unwrap_or_else(|_| unreachable!("short ascii"))
    }

    fn passive_price(&mut self, side: Side) -> u64 {
        // Skewed toward the top: most orders rest near the best prices.
        let u = self.rng.below(1 << 20);
        let offset =
            1 + ((self.params.spread_ticks as u128 * u128::from(u * u / (1 << 20))) >> 20) as u64;
        match side {
            Side::Buy => self.mid.saturating_sub(offset).max(1),
            Side::Sell => self.mid + offset,
        }
    }

    fn passive(&mut self, account: u32) -> Command {
        let side = if self.rng.chance(500) {
            Side::Buy
        } else {
            Side::Sell
        };
        let price = self.passive_price(side);
        let mut order = NewOrder::limit(side, Price(price), Qty(1 + self.rng.below(10)));
        order.cid = Some(self.cid());
        self.new_order(account, order)
    }

    fn marketable(&mut self, account: u32) -> Command {
        let side = if self.rng.chance(500) {
            Side::Buy
        } else {
            Side::Sell
        };
        let through = self.rng.below(3);
        let price = match side {
            Side::Buy => self.book.best_ask().map_or(self.mid, |p| p.0) + through,
            Side::Sell => self
                .book
                .best_bid()
                .map_or(self.mid, |p| p.0)
                .saturating_sub(through)
                .max(1),
        };
        let mut order = NewOrder::limit(side, Price(price), Qty(1 + self.rng.below(10)));
        order.cid = Some(self.cid());
        self.new_order(account, order)
    }

    fn market(&mut self, account: u32) -> Command {
        let side = if self.rng.chance(500) {
            Side::Buy
        } else {
            Side::Sell
        };
        let mut order = NewOrder::market(side, Qty(1 + self.rng.below(8)));
        order.cid = Some(self.cid());
        self.new_order(account, order)
    }

    /// A cancel target: usually a young order (if one is still open), else any open order.
    fn cancel_target(&mut self) -> Option<Live> {
        if self.live.is_empty() {
            return None;
        }
        if !self.young.is_empty()
            && self
                .rng
                .chance(u64::from(self.params.young_cancel_pct) * 10)
        {
            for _ in 0..4 {
                let oid = self.young[self.rng.below(self.young.len() as u64) as usize];
                if let Some(&i) = self.live_index.get(&oid) {
                    return Some(self.live[i]);
                }
            }
        }
        Some(self.live[self.rng.below(self.live.len() as u64) as usize])
    }

    fn cancel(&mut self) -> Option<Command> {
        let target = self.cancel_target()?;
        Some(self.cancel_of(target))
    }

    /// A cancel of an order that already closed (filled or cancelled): rejected by the book.
    fn late_cancel(&mut self) -> Option<Command> {
        if self.closed.is_empty() {
            return None;
        }
        let target = self.closed[self.rng.below(self.closed.len() as u64) as usize];
        Some(self.cancel_of(target))
    }

    fn cancel_of(&mut self, target: Live) -> Command {
        let by_oid_per_mille = 1000 - 10 * u64::from(self.shape.cancel_by_cid_pct.min(100));
        let by = if self.rng.chance(by_oid_per_mille) {
            OrderRef::Oid(target.oid)
        } else {
            OrderRef::Cid(target.cid)
        };
        let (seq, ts) = self.next_input();
        Command {
            seq,
            pos: 0,
            ts,
            account: self.accounts[target.account as usize],
            op: Op::Cancel(by),
        }
    }

    fn bench_step(&mut self) -> Command {
        let account = self.rng.below(u64::from(self.params.accounts.max(1))) as u32;
        let target = self.params.resting;
        let r = self.rng.below(1000);
        let few = self.live.len() < target * 9 / 10;
        let many = self.live.len() > target * 11 / 10;
        let adds_end = 1000 - 10 * u64::from(self.shape.cancel_pct.clamp(1, 89));
        if r < 100 {
            self.market(account)
        } else if r < adds_end {
            if many && let Some(c) = self.cancel() {
                return c;
            }
            if self.rng.chance(270) {
                self.marketable(account)
            } else {
                self.passive(account)
            }
        } else if few {
            if self.shape.cancel_pct > CANCEL_PCT_DEFAULT
                && let Some(c) = self.late_cancel()
            {
                return c;
            }
            self.passive(account)
        } else {
            self.cancel().unwrap_or_else(|| self.passive(account))
        }
    }

    fn full_step(&mut self) -> Command {
        let account = self.rng.below(u64::from(self.params.accounts.max(1))) as u32;
        if self.halted && self.rng.chance(300) {
            self.halted = false;
            let (seq, ts) = self.next_input();
            return Command {
                seq,
                pos: 0,
                ts,
                account: self.accounts[0],
                op: Op::Resume,
            };
        }
        let r = self.rng.below(1000);
        match r {
            0..=299 => self.passive(account),
            300..=399 => self.marketable(account),
            400..=449 => self.market(account),
            450..=649 => self.cancel().unwrap_or_else(|| self.passive(account)),
            650..=719 => self.special_limit(account),
            720..=779 => self.stop(account),
            780..=849 => self.amend().unwrap_or_else(|| self.passive(account)),
            850..=859 => {
                let (seq, ts) = self.next_input();
                Command {
                    seq,
                    pos: 0,
                    ts,
                    account: self.accounts[account as usize],
                    op: Op::CancelAll,
                }
            }
            860..=862 if !self.halted => {
                self.halted = true;
                let (seq, ts) = self.next_input();
                let cancel_orders = self.rng.chance(200);
                Command {
                    seq,
                    pos: 0,
                    ts,
                    account: self.accounts[0],
                    op: Op::Halt { cancel_orders },
                }
            }
            863..=899 => self.invalid(account),
            _ => self.passive(account),
        }
    }

    fn special_limit(&mut self, account: u32) -> Command {
        let side = if self.rng.chance(500) {
            Side::Buy
        } else {
            Side::Sell
        };
        let aggressive = self.rng.chance(400);
        let price = if aggressive {
            match side {
                Side::Buy => self.book.best_ask().map_or(self.mid, |p| p.0) + self.rng.below(3),
                Side::Sell => self
                    .book
                    .best_bid()
                    .map_or(self.mid, |p| p.0)
                    .saturating_sub(self.rng.below(3))
                    .max(1),
            }
        } else {
            self.passive_price(side)
        };
        let qty = 1 + self.rng.below(20);
        let mut order = NewOrder::limit(side, Price(price), Qty(qty));
        order.cid = Some(self.cid());
        order.tif = match self.rng.below(5) {
            0 => Tif::Ioc,
            1 => Tif::Fok,
            2 => Tif::PostOnly,
            3 => Tif::Gtd,
            _ => Tif::Gtc,
        };
        if order.tif == Tif::Gtd {
            order.expire_at = Some(self.ts + 1 + self.rng.below(50_000_000));
        }
        if order.tif.rests() && self.rng.chance(400) {
            order.display_qty = Some(Qty(1 + self.rng.below(qty)));
        }
        order.stp = match self.rng.below(8) {
            0 => Some(StpMode::CancelNewest),
            1 => Some(StpMode::CancelOldest),
            2 => Some(StpMode::CancelBoth),
            3 => Some(StpMode::DecrementAndCancel),
            4 => Some(StpMode::None),
            _ => None,
        };
        self.new_order(account, order)
    }

    fn stop(&mut self, account: u32) -> Command {
        let side = if self.rng.chance(500) {
            Side::Buy
        } else {
            Side::Sell
        };
        let distance = self.rng.below(20);
        let stop = match side {
            Side::Buy => self.mid + distance,
            Side::Sell => self.mid.saturating_sub(distance).max(1),
        };
        let qty = 1 + self.rng.below(10);
        let mut order = if self.rng.chance(500) {
            let limit = match side {
                Side::Buy => stop + self.rng.below(5),
                Side::Sell => stop.saturating_sub(self.rng.below(5)).max(1),
            };
            let mut o = NewOrder::limit(side, Price(limit), Qty(qty));
            o.order_type = OrderType::StopLimit;
            o
        } else {
            let mut o = NewOrder::market(side, Qty(qty));
            o.order_type = OrderType::StopMarket;
            o
        };
        order.stop_price = Some(Price(stop));
        order.cid = Some(self.cid());
        self.new_order(account, order)
    }

    fn amend(&mut self) -> Option<Command> {
        if self.live.is_empty() {
            return None;
        }
        let target = self.live[self.rng.below(self.live.len() as u64) as usize];
        let qty = self.rng.chance(600).then(|| Qty(1 + self.rng.below(15)));
        let price = (qty.is_none() || self.rng.chance(300)).then(|| {
            let side = if self.rng.chance(500) {
                Side::Buy
            } else {
                Side::Sell
            };
            Price(self.passive_price(side))
        });
        let (seq, ts) = self.next_input();
        Some(Command {
            seq,
            pos: 0,
            ts,
            account: self.accounts[target.account as usize],
            op: Op::Amend(Amend {
                target: OrderRef::Cid(target.cid),
                qty,
                price,
            }),
        })
    }

    fn invalid(&mut self, account: u32) -> Command {
        let mut order = NewOrder::limit(Side::Buy, Price(self.mid), Qty(1));
        match self.rng.below(4) {
            0 => order.qty = Qty(0),
            1 => order.price = None,
            2 => order.tif = Tif::Gtd,
            _ => order.order_type = OrderType::Market,
        }
        self.new_order(account, order)
    }
}

/// Generates a workload: a prefill of `resting` passive orders, then `commands` of flow.
pub fn generate(params: &FlowParams) -> Workload {
    generate_shaped(params, &FlowShape::default())
}

/// `generate`, with the flow shaped by `shape`.
pub fn generate_shaped(params: &FlowParams, shape: &FlowShape) -> Workload {
    let spec = bench_spec();
    let mut g = Generator::new(params.clone(), shape.clone(), spec.clone());
    let mut prefill = Vec::with_capacity(params.resting);
    for _ in 0..params.resting {
        let account = g.rng.below(u64::from(params.accounts.max(1))) as u32;
        let cmd = g.passive(account);
        g.emit(cmd, &mut prefill);
    }
    let mut commands = Vec::with_capacity(params.commands);
    for _ in 0..params.commands {
        let cmd = if params.full_mix {
            g.full_step()
        } else {
            g.bench_step()
        };
        g.emit(cmd, &mut commands);
    }
    Workload {
        spec,
        prefill,
        commands,
    }
}

/// Writes the workload (prefill, then flow) as JSON lines of wire commands with their `ts`,
/// the format `agora replay` reads.
pub fn write_jsonl(w: &Workload, out: &mut impl std::io::Write) -> std::io::Result<()> {
    for cmd in w.prefill.iter().chain(&w.commands) {
        let line = crate::wire::WireCommandOut::from_command(&w.spec, cmd, true);
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
