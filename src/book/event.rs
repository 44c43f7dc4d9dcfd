//! Events: everything the book says, in the order it happened.
//!
//! One `trade` per fill holds both sides; the bus turns it into one tape message and one
//! execution report per side. A rejection is an event with a `RejectReason`, never an `Err`.
//! Events own their ids inline (no heap), so a caller's buffer can be reused command after
//! command without allocating. This module must never describe anything the book did not do.

use super::command::OpKind;
use super::num::{Price, Qty};
use super::spec::MarketSpec;
use super::types::{Account, Cid, OrderId, OrderType, Seq, Side, StpMode, Tif, Timestamp};

/// Who an order belongs to, carried by every event about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderTag {
    pub oid: OrderId,
    pub cid: Option<Cid>,
    pub account: Account,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Accepted(Accepted),
    Rejected(Rejected),
    Trade(Trade),
    Cancelled(Cancelled),
    Amended(Amended),
    Triggered(Triggered),
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Accepted(_) => "accepted",
            Event::Rejected(_) => "rejected",
            Event::Trade(_) => "trade",
            Event::Cancelled(_) => "cancelled",
            Event::Amended(_) => "amended",
            Event::Triggered(_) => "triggered",
        }
    }

    /// The input sequence of the command that caused this event.
    pub fn seq(&self) -> Seq {
        match self {
            Event::Accepted(e) => e.seq,
            Event::Rejected(e) => e.seq,
            Event::Trade(e) => e.seq,
            Event::Cancelled(e) => e.seq,
            Event::Amended(e) => e.seq,
            Event::Triggered(e) => e.seq,
        }
    }
}

/// A new order passed every check; fills (if any) follow in `trade` events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub seq: Seq,
    pub ts: Timestamp,
    pub order: OrderTag,
    pub side: Side,
    pub order_type: OrderType,
    pub tif: Tif,
    pub price: Option<Price>,
    pub qty: Qty,
    pub stop_price: Option<Price>,
    pub display_qty: Option<Qty>,
    pub expire_at: Option<Timestamp>,
    pub stp: StpMode,
}

/// A command was refused; nothing in the book changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub seq: Seq,
    pub ts: Timestamp,
    pub op: OpKind,
    /// For `new`: the id the order would have had. For `cancel`/`amend` by oid: the target.
    pub oid: Option<OrderId>,
    pub cid: Option<Cid>,
    pub account: Account,
    pub reason: RejectReason,
    /// The price and quantity the command carried, so the message can quote them.
    pub price: Option<Price>,
    pub qty: Option<Qty>,
    /// For `rate_limited`: nanoseconds of stream time until the account may send again.
    pub retry_after: Option<u64>,
}

/// One fill between a resting (maker) and an incoming (taker) order, at the maker's price.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trade {
    pub seq: Seq,
    pub ts: Timestamp,
    /// `trade_id` on the wire is `<seq>-<n>`; `n` counts fills from 1 within one input sequence.
    pub trade_n: u32,
    pub price: Price,
    pub qty: Qty,
    pub taker_side: Side,
    pub maker: OrderTag,
    /// The maker's remaining quantity after this fill (hidden iceberg quantity included).
    pub maker_leaves: Qty,
    pub taker: OrderTag,
    pub taker_leaves: Qty,
}

/// Quantity of an order was cancelled. `leaves` is what remains open afterwards: 0 ends the
/// order; above 0 only with `decrement_and_cancel` self-trade prevention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancelled {
    pub seq: Seq,
    pub ts: Timestamp,
    pub order: OrderTag,
    pub side: Side,
    pub reason: CancelReason,
    pub qty: Qty,
    pub leaves: Qty,
}

/// An order's price and/or total quantity changed. `leaves` 0 means the new total is at or
/// below the filled quantity and the order is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Amended {
    pub seq: Seq,
    pub ts: Timestamp,
    pub order: OrderTag,
    pub side: Side,
    pub price: Price,
    pub qty: Qty,
    pub leaves: Qty,
    /// Whether the order kept its place in the queue (only a lower quantity at the same price).
    pub priority_kept: bool,
}

/// A stop order's trigger price was reached by the last trade; it now enters the book as a
/// limit (`stop_limit`) or market (`stop_market`) order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Triggered {
    pub seq: Seq,
    pub ts: Timestamp,
    pub order: OrderTag,
    pub side: Side,
    pub order_type: OrderType,
    pub stop_price: Price,
    /// The last trade price that reached the stop.
    pub last_price: Price,
}

/// Why an order (or the rest of it) was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CancelReason {
    User,
    IocRemainder,
    FokUnfilled,
    MarketRemainder,
    PostOnlyWouldCross,
    Stp,
    Halt,
    Expired,
    CancelAll,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::User => "user",
            CancelReason::IocRemainder => "ioc_remainder",
            CancelReason::FokUnfilled => "fok_unfilled",
            CancelReason::MarketRemainder => "market_remainder",
            CancelReason::PostOnlyWouldCross => "post_only_would_cross",
            CancelReason::Stp => "stp",
            CancelReason::Halt => "halt",
            CancelReason::Expired => "expired",
            CancelReason::CancelAll => "cancel_all",
        }
    }
}

macro_rules! reject_reasons {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)*) => {
        /// Why a command was refused. Each variant's doc says how the client fixes it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum RejectReason {
            $($(#[doc = $doc])* $variant,)*
        }

        impl RejectReason {
            pub const ALL: &'static [RejectReason] = &[$(RejectReason::$variant,)*];

            /// The machine-readable name on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(RejectReason::$variant => $name,)*
                }
            }
        }
    };
}

reject_reasons! {
    /// The message could not be decoded; send a MessagePack (or JSON) map with the fields of the protocol.
    Malformed = "malformed",
    /// A field has a value outside its rules (decimals, characters, length); the message names it.
    InvalidField = "invalid_field",
    /// A batch holds more commands than allowed; split it.
    BatchTooLarge = "batch_too_large",
    /// The market is halted; only cancels are accepted until it resumes.
    Halted = "halted",
    /// The account already has an open order with this `cid`; use a new cid per order.
    DuplicateCid = "duplicate_cid",
    /// No open order has this `oid`/`cid` (it may have filled, expired or been cancelled).
    UnknownOrder = "unknown_order",
    /// The order belongs to another account.
    NotOwner = "not_owner",
    /// Stop orders waiting for their trigger cannot be amended; cancel and place a new one.
    NotAmendable = "not_amendable",
    /// The amend changes nothing; send a different `qty` and/or `price`.
    NothingToAmend = "nothing_to_amend",
    /// `qty` must be above zero.
    QtyZero = "qty_zero",
    /// `qty` must be a multiple of the market's lot size.
    QtyNotOnLot = "qty_not_on_lot",
    /// `qty` is below the market's minimum order quantity.
    QtyBelowMin = "qty_below_min",
    /// `qty` is above the market's maximum order quantity.
    QtyAboveMax = "qty_above_max",
    /// `limit` and `stop_limit` orders need a `price`.
    PriceMissing = "price_missing",
    /// `market` and `stop_market` orders take no `price`.
    PriceNotAllowed = "price_not_allowed",
    /// `price` must be above zero.
    PriceZero = "price_zero",
    /// `price` must be a multiple of the market's tick size.
    PriceNotOnTick = "price_not_on_tick",
    /// The price is further from the reference price than the market's band allows.
    PriceOutOfBand = "price_out_of_band",
    /// Stop orders need a `stop_price`.
    StopPriceMissing = "stop_price_missing",
    /// Only stop orders take a `stop_price`.
    StopPriceNotAllowed = "stop_price_not_allowed",
    /// `stop_price` must be above zero and a multiple of the tick size.
    StopPriceInvalid = "stop_price_invalid",
    /// This time in force does not go with this order type (market orders are `ioc` or `fok`).
    TifNotAllowed = "tif_not_allowed",
    /// `display_qty` must be above zero, on the lot, at most `qty`, and only on resting limit orders.
    DisplayQtyInvalid = "display_qty_invalid",
    /// `gtd` orders need an `expire_at`.
    ExpireAtMissing = "expire_at_missing",
    /// Only `gtd` orders take an `expire_at`.
    ExpireAtNotAllowed = "expire_at_not_allowed",
    /// `expire_at` is not after the command's timestamp.
    ExpireAtInPast = "expire_at_in_past",
    /// The market holds its maximum number of open orders; retry after some close.
    BookFull = "book_full",
    /// The command's sequence is not after the last one applied; it was applied already.
    SequenceNotIncreasing = "sequence_not_increasing",
    /// The market is halted already.
    AlreadyHalted = "already_halted",
    /// The market is not halted.
    NotHalted = "not_halted",
    /// The amended price would trade against the book, and the order is post-only.
    PostOnlyWouldCross = "post_only_would_cross",
    /// Only operators may send this command (halt, resume); they use `agora ctl`.
    NotPermitted = "not_permitted",
    /// A new tick size that some open order's price (or stop price) is not a multiple of;
    /// cancel those orders first, or choose a tick their prices are multiples of.
    OrdersOffTick = "orders_off_tick",
    /// The account sent more new orders and amends than the market's per-account rate and
    /// burst allow; retry after `retry_after_ms` (cancels are never limited).
    RateLimited = "rate_limited",
    /// The account holds the most open orders the market allows one account; cancel some,
    /// or send orders that do not rest (ioc, fok, market).
    TooManyOpenOrders = "too_many_open_orders",
}

impl RejectReason {
    /// A sentence for a person: what was wrong and what to do.
    pub fn message(self, spec: &MarketSpec, price: Option<Price>, qty: Option<Qty>) -> String {
        let m = &spec.symbol;
        let p = |p: Option<Price>| p.map_or_else(|| "?".to_string(), |p| spec.fmt_price(p));
        let q = |q: Option<Qty>| q.map_or_else(|| "?".to_string(), |q| spec.fmt_qty(q));
        match self {
            RejectReason::Malformed => "the message could not be decoded; send a MessagePack map (or JSON with Content-Type: application/json) with the protocol's field names".into(),
            RejectReason::InvalidField => "a field broke its rules".into(),
            RejectReason::BatchTooLarge => "the batch holds too many commands; split it into smaller batches".into(),
            RejectReason::Halted => format!("{m} is halted; only cancels are accepted until it resumes"),
            RejectReason::DuplicateCid if spec.cid_window_secs > 0 => format!("this account already sent an order with this cid to {m} (it is open, or arrived within the last {} s): a retry of it is not placed again, and its first reports stand; use a new cid for each new order", spec.cid_window_secs),
            RejectReason::DuplicateCid => "this account already has an open order with this cid; use a new cid for each order".into(),
            RejectReason::UnknownOrder => format!("no open order in {m} matches; it may have filled, expired or been cancelled"),
            RejectReason::NotOwner => "the order belongs to another account".into(),
            RejectReason::NotAmendable => "a stop order waiting for its trigger cannot be amended; cancel it and place a new one".into(),
            RejectReason::NothingToAmend => "the amend changes nothing; send a different qty and/or price".into(),
            RejectReason::QtyZero => "qty must be above zero".into(),
            RejectReason::QtyNotOnLot => format!("qty {} is not a multiple of the lot size {} of {m}", q(qty), spec.fmt_qty(spec.lot)),
            RejectReason::QtyBelowMin => format!("qty {} is below the minimum {} of {m}", q(qty), spec.fmt_qty(spec.min_qty)),
            RejectReason::QtyAboveMax => format!("qty {} is above the maximum {} of {m}", q(qty), spec.max_qty.map_or_else(|| "?".into(), |x| spec.fmt_qty(x))),
            RejectReason::PriceMissing => "limit and stop_limit orders need a price".into(),
            RejectReason::PriceNotAllowed => "market and stop_market orders take no price; leave it out or send a limit order".into(),
            RejectReason::PriceZero => "price must be above zero".into(),
            RejectReason::PriceNotOnTick => format!("price {} is not a multiple of the tick size {} of {m}", p(price), spec.fmt_price(spec.tick)),
            RejectReason::PriceOutOfBand => format!("price {} is outside the {}% band of {m} around the last trade price", p(price), spec.price_band_bps.map_or_else(|| "?".into(), |b| super::num::format_decimal(u64::from(b), 2))),
            RejectReason::StopPriceMissing => "stop_limit and stop_market orders need a stop_price".into(),
            RejectReason::StopPriceNotAllowed => "only stop_limit and stop_market orders take a stop_price".into(),
            RejectReason::StopPriceInvalid => format!("stop_price must be above zero and a multiple of the tick size {} of {m}", spec.fmt_price(spec.tick)),
            RejectReason::TifNotAllowed => "this tif does not go with this order type: market orders take ioc or fok; limit orders take gtc, ioc, fok, gtd or post_only".into(),
            RejectReason::DisplayQtyInvalid => "display_qty must be above zero, a multiple of the lot size, at most qty, and only on limit orders that rest (gtc, gtd, post_only)".into(),
            RejectReason::ExpireAtMissing => "gtd orders need expire_at (nanoseconds since the epoch)".into(),
            RejectReason::ExpireAtNotAllowed => "only gtd orders take expire_at".into(),
            RejectReason::ExpireAtInPast => "expire_at is not after the time the order arrived".into(),
            RejectReason::BookFull => format!("{m} holds its maximum of {} open orders; retry once some close", spec.orders_max),
            RejectReason::SequenceNotIncreasing => "the command's sequence is not after the last applied one; it was applied already".into(),
            RejectReason::AlreadyHalted => format!("{m} is halted already"),
            RejectReason::NotHalted => format!("{m} is not halted"),
            RejectReason::PostOnlyWouldCross => "the new price would trade against the book and the order is post_only; the order is unchanged".into(),
            RejectReason::NotPermitted => "only operators may send this command; they use agora ctl".into(),
            RejectReason::RateLimited => format!("this account sent more new orders and amends to {m} than its limit of {} a second (burst {}) allows; retry after retry_after_ms (cancels are never limited)", spec.account_rate, spec.account_burst),
            RejectReason::TooManyOpenOrders => format!("this account holds the most open orders {m} allows one account ({}); cancel some first, or send orders that do not rest (ioc, fok, market)", spec.account_orders_max),
            RejectReason::OrdersOffTick => format!("the tick size {} would leave open orders of {m} off the tick; cancel them first, or choose a tick their prices are multiples of", p(price)),
        }
    }
}
