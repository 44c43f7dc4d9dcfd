//! The order book and matching: a pure, deterministic state machine.
//!
//! Input: a [`Command`] (which carries its sequence and timestamp). Output: [`Event`]s pushed
//! into a buffer the caller owns. Same snapshot + same commands ⇒ same events and the same
//! [`StateHash`], on any machine. `book` knows nothing of actix, tokio, NATS, MessagePack,
//! figment or the clock; it does no I/O, no logging, draws no random numbers and uses no floats.
//!
//! [`OrderBook`] is the fast book the engine runs. [`reference::ReferenceBook`] is a naive,
//! obviously correct book that follows the same rules; tests use it as the oracle and benches
//! as the baseline.
//!
//! # The rules
//!
//! Both books follow exactly these rules; a difference in any event is a bug.
//!
//! **Every command.** (1) If `(seq, pos)` is not greater than the last applied `(seq, pos)`
//! the command is rejected `sequence_not_increasing` and nothing else happens. Otherwise it
//! becomes the last applied input, whatever follows. (2) The trade counter `n` (trade id
//! `<seq>-<n>`) restarts at 0 when `seq` differs from the previous command's. (3) Every open
//! GTD order (resting or stop) with `expire_at <= ts` is cancelled `expired`, in order of
//! `(expire_at, oid)`. (4) The operation runs. (5) Stops are triggered (below).
//!
//! **cid window** (when the spec's `cid_window_secs` is above 0). The book keeps the
//! (account, cid, ts) of recent `new` commands, oldest first, each (account, cid) at most once.
//! At step (3), before GTD expiry, entries with `ts − entry.ts ≥ cid_window_secs` seconds (in
//! nanoseconds, saturating) leave from the front. A `new` with a cid whose (account, cid) the
//! window holds is rejected `duplicate_cid` before any other check; any other `new` with a
//! cid is added at the back whatever the checks below decide (the oldest entry leaves first
//! when the window holds `cid_window_orders`). An update of the spec applies new limits from
//! the next command: off empties the window, a smaller cap drops the oldest entries.
//!
//! **Per-account limits** (when the spec has them; only `new` and `amend` are limited, never a
//! cancel, `cancel_all` or an operator's command). While the spec has a rate
//! (`account_rate`), each account has a debt `tat` (0 when it has none), and every applied
//! command moves the limit's clock to its `ts` if that is later (turning the rate off forgets
//! the clock and every debt; a debt at or behind the clock is the same as none). At step (4),
//! before the operation's own checks (the cid window's included): (a) with a rate, interval
//! `I = ⌊10⁹ / account_rate⌋` ns and tolerance `τ = (account_burst − 1) × I`, let
//! `start = max(tat, clock)`: if `start − clock > τ` the command is rejected `rate_limited`
//! with `retry_after = start − clock − τ`; (b) with `account_orders_max`, a `new` that may
//! rest or wait (limit with gtc/gtd/post_only, every stop type) while its account has that
//! many open orders (resting + stops) is rejected `too_many_open_orders`. A command these
//! refuse changes nothing else: it costs no rate and the cid window does not remember it.
//! Otherwise the account's `tat` becomes `start + I`, whatever the checks that follow decide.
//!
//! **new**, checked in this order, the first failure is the reason: `halted`; qty (`qty_zero`,
//! `qty_not_on_lot`, `qty_below_min`, `qty_above_max`); price (limit and stop_limit:
//! `price_missing`, `price_zero`, `price_not_on_tick`; market types: `price_not_allowed`);
//! stop price (stop types: `stop_price_missing`, `stop_price_invalid` when zero or off tick;
//! others: `stop_price_not_allowed`); tif (market types take only ioc or fok:
//! `tif_not_allowed`); display_qty (`display_qty_invalid` unless the type is limit or
//! stop_limit, tif is gtc, gtd or post_only, and it is above zero, on the lot and at most qty);
//! expire_at (gtd: `expire_at_missing`, `expire_at_in_past` when `expire_at <= ts`; others:
//! `expire_at_not_allowed`); `duplicate_cid` when the account has an open order with this cid;
//! `price_out_of_band` (limit type only, see band); `book_full` when the order may rest or wait
//! (limit with gtc/gtd/post_only, every stop type) and the open orders (resting + stops) number
//! `orders_max` already. Then `accepted` (its `stp` is the order's or else the market's default),
//! then a stop type waits for its trigger; a limit or market order executes as a taker.
//!
//! **Executing a taker.** post_only: if it would cross (buy price ≥ best ask, sell price ≤ best
//! bid) it is cancelled `post_only_would_cross` whole; else it rests. fok: first the fillable
//! quantity is counted level by level in price priority over the levels its limit (and band)
//! accepts: if the taker's stp is `cancel_newest`, `cancel_both` or `decrement_and_cancel` and a
//! level holds any order of the taker's account, the check fails; otherwise the level adds the
//! leaves (hidden included) of every order (stp `none`) or of the other accounts' orders (stp
//! `cancel_oldest`); once the sum reaches qty it passes. If it fails: cancelled `fok_unfilled`
//! whole, no trade. Then the match loop runs; a remainder rests (gtc, gtd), or is cancelled
//! `ioc_remainder` (ioc) or `market_remainder` (market). Resting goes to the back of its level.
//!
//! **Match loop.** While the taker has quantity: take the best opposite level whose price the
//! taker accepts (buy: level ≤ limit, sell: level ≥ limit; market orders: any level inside the
//! band) and its oldest order (the maker). Same account and the taker's stp is not `none`:
//! `cancel_newest`: taker cancelled `stp` (its remainder), loop ends. `cancel_oldest`: maker
//! cancelled `stp`, loop goes on. `cancel_both`: maker then taker cancelled `stp`, loop ends.
//! `decrement_and_cancel`: `d = min(taker left, maker leaves)`; the maker loses `d` from its
//! leaves and from its total qty (event `cancelled` reason `stp`, `qty = d`, `leaves` = what
//! remains; it leaves the book at 0, else keeps its place; an iceberg's shown part becomes at
//! most its leaves) and then the taker loses `d` likewise; the loop ends if the taker reaches 0. Otherwise a fill: `qty = min(taker left, maker shown)` at
//! the maker's price, one `trade` event (`maker_leaves`, `taker_leaves` after the fill), last
//! trade price = that price. A maker at 0 leaves the book; an iceberg maker whose shown part
//! reaches 0 shows `min(display_qty, leaves)` again and moves to the back of its level.
//!
//! **Band** (when the spec has `price_band_pct`). The reference is the last trade price, else
//! the best opposite price, else there is no band. A limit buy above `ref × (1 + pct)` or a
//! limit sell below `ref × (1 − pct)` is rejected `price_out_of_band` (on entry and on amend of
//! price; the passive side is never limited). A market order (and a triggered stop_market) does
//! not trade beyond those bounds, computed when it starts executing; the rest is cancelled
//! `market_remainder`. Bounds use exact integers: buy `floor(ref × (10000 + bps) / 10000)`,
//! sell `ceil(ref × (10000 − bps) / 10000)`.
//!
//! **Stops.** After each operation (whether or not it traded), while the market is not halted
//! and a last trade price exists (from this or any earlier command): the
//! candidate buy stop is the one with the lowest stop price (then lowest oid) among those with
//! `stop_price ≤ last`; the candidate sell stop the one with the highest stop price (then
//! lowest oid) among those with `stop_price ≥ last`. If both exist the lower oid goes first. It
//! is removed from the stops, `triggered` is emitted, and it executes as a taker (stop_limit as
//! a limit order with its price and tif; stop_market as a market order with its tif). Repeat
//! until no stop qualifies (cascades included).
//!
//! **cancel** by oid (`unknown_order` if not open; `not_owner` if another account's) or by cid
//! (looked up among the sender's open orders; `unknown_order`). Allowed while halted. Emits
//! `cancelled` reason `user` with the leaves; works on waiting stops too.
//!
//! **amend**, checked in order: `halted`; the target as for cancel; a waiting stop is
//! `not_amendable`; neither qty nor price given: `nothing_to_amend`; qty (`qty_zero`,
//! `qty_not_on_lot`, `qty_above_max`); price (`price_zero`, `price_not_on_tick`); new total and
//! price equal to the current ones: `nothing_to_amend`; price changed: `price_out_of_band`, and
//! for post_only `post_only_would_cross` if the new price would cross. Then: new qty ≤ filled:
//! `amended` (new price, new qty, leaves 0, priority not kept) and the order leaves the book. Same price and lower qty: leaves =
//! qty − filled, an iceberg shows at most its leaves, priority kept. Same price and higher qty:
//! to the back of the level, an iceberg shows `min(display_qty, leaves)`. New price: the order
//! leaves its level, `amended` is emitted, and it executes as a taker at the new price (as gtc,
//! gtd or post_only, its own tif), keeping what it had filled.
//!
//! **cancel_all** cancels every open order of the sender (resting and stops) in oid order,
//! reason `cancel_all`; nothing when there is none. **halt** (`already_halted` if halted)
//! stops matching: new and amend are rejected `halted`; with `cancel_orders` every open order
//! is cancelled `halt` in oid order. **resume** (`not_halted` if not halted) lifts it.
//!
//! **Rejections** carry: for new, the would-be oid, its cid, price and qty; for cancel and
//! amend, the oid if given or found, the cid if given (or the found order's if it is the
//! sender's), and for amend its price and qty.

pub mod cid_window;
pub mod columns;
pub mod columns_read;
pub mod command;
mod directory;
pub mod event;
mod index;
mod ladder;
pub mod limits;
pub mod num;
pub mod reference;
mod slab;
pub mod snapshot;
pub mod spec;
pub mod state_hash;
pub mod types;

mod order_book;

/// Asks the CPU to bring the cache line at `addr` into its caches. A hint: it never faults and
/// reads nothing the program sees, so any address will do (a wrong one only wastes the hint).
#[inline(always)]
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch dereferences nothing and cannot fault, whatever the address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

pub use cid_window::CidSeen;
pub use command::{Amend, Command, NewOrder, Op, OpKind, OrderRef};
pub use event::{
    Accepted, Amended, CancelReason, Cancelled, Event, OrderTag, RejectReason, Rejected, Trade,
    Triggered,
};
pub use limits::RateDebt;
pub use num::{Price, Qty};
pub use order_book::{OpenOrder, OrderBook};
pub use snapshot::{BookSnapshot, L2Level, OrderRecord, RestoreError};
pub use spec::{MarketSpec, MarketSpecInput, SpecError, SpecRules};
pub use state_hash::{HashVersion, StateHash};
pub use types::{Account, Cid, OrderId, OrderType, Seq, Side, StpMode, Tif, Timestamp};

/// Commands a driver tells the book of before their turn (`Matching::prefetch`, with `ahead`
/// 1 to `LOOKAHEAD`): enough for a fetch from memory to finish during the commands between.
pub const LOOKAHEAD: usize = 3;

/// What both books offer a driver (replay, benches): a fresh book, commands in, events out.
pub trait Matching {
    fn with_spec(spec: MarketSpec) -> Self;
    fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>);
    /// A hint that `cmd` is applied `ahead` commands after the next `apply` (1 to
    /// `LOOKAHEAD`): the book may ask the CPU for what it will read. Changes nothing.
    fn prefetch(&self, _cmd: &Command, _ahead: usize) {}
    /// Whether `prefetch` is worth calling now (drivers skip it otherwise).
    fn prefetches(&self) -> bool {
        false
    }
    fn state_hash(&self) -> StateHash;
}

impl Matching for OrderBook {
    fn with_spec(spec: MarketSpec) -> OrderBook {
        OrderBook::with_capacity(spec, 1024)
    }
    fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>) {
        OrderBook::apply(self, cmd, out)
    }
    fn prefetch(&self, cmd: &Command, ahead: usize) {
        OrderBook::prefetch(self, cmd, ahead)
    }
    fn prefetches(&self) -> bool {
        OrderBook::prefetches(self)
    }
    fn state_hash(&self) -> StateHash {
        OrderBook::state_hash(self)
    }
}

impl Matching for reference::ReferenceBook {
    fn with_spec(spec: MarketSpec) -> reference::ReferenceBook {
        reference::ReferenceBook::new(spec)
    }
    fn apply(&mut self, cmd: &Command, out: &mut Vec<Event>) {
        reference::ReferenceBook::apply(self, cmd, out)
    }
    fn state_hash(&self) -> StateHash {
        reference::ReferenceBook::state_hash(self)
    }
}
