//! Commands: what the book is asked to do, already decoded into integers and typed ids.
//!
//! A `Command` carries its own input sequence, batch position and timestamp; the book reads no
//! clock. Decoding from the wire (decimal strings, JSON or MessagePack) lives in `wire`; this
//! module must never hold a string that needs the heap.

use super::num::{Price, Qty};
use super::spec::SpecRules;
use super::types::{Account, Cid, OrderId, OrderType, Seq, Side, StpMode, Tif, Timestamp};

/// One command for one market.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// Input sequence (stream sequence, or line number in a replay).
    pub seq: Seq,
    /// Position inside a batch message, 0 for a single command.
    pub pos: u16,
    /// The stream's timestamp of the message, nanoseconds.
    pub ts: Timestamp,
    /// Who sends it: owner of new orders, and who may cancel or amend them.
    pub account: Account,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    New(NewOrder),
    Cancel(OrderRef),
    Amend(Amend),
    /// Cancel every open order (resting or stop) of the command's account.
    CancelAll,
    /// Stop matching; with `cancel_orders`, also cancel every open order (reason `halt`).
    Halt {
        cancel_orders: bool,
    },
    Resume,
    /// New market rules (tick, lot, quantity limits, price band, STP default, order cap),
    /// from the next command on; sequenced with the orders so every replay agrees. A new tick
    /// that some open order's price is not a multiple of is refused (`orders_off_tick`).
    UpdateSpec(SpecRules),
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::New(_) => OpKind::New,
            Op::Cancel(_) => OpKind::Cancel,
            Op::Amend(_) => OpKind::Amend,
            Op::CancelAll => OpKind::CancelAll,
            Op::Halt { .. } => OpKind::Halt,
            Op::Resume => OpKind::Resume,
            Op::UpdateSpec(_) => OpKind::UpdateSpec,
        }
    }
}

/// The name of an operation, as on the wire (`op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    New,
    Cancel,
    Amend,
    CancelAll,
    Halt,
    Resume,
    UpdateSpec,
    Batch,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::New => "new",
            OpKind::Cancel => "cancel",
            OpKind::Amend => "amend",
            OpKind::CancelAll => "cancel_all",
            OpKind::Halt => "halt",
            OpKind::Resume => "resume",
            OpKind::UpdateSpec => "update_spec",
            OpKind::Batch => "batch",
        }
    }
}

/// A new order. Which optional fields must or must not be present depends on `order_type` and
/// `tif`; the book checks that and rejects with the reason that names the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOrder {
    pub cid: Option<Cid>,
    pub side: Side,
    pub order_type: OrderType,
    pub tif: Tif,
    /// Limit price: required for `limit` and `stop_limit`, refused for market types.
    pub price: Option<Price>,
    pub qty: Qty,
    /// Trigger price: required for stop types, refused otherwise.
    pub stop_price: Option<Price>,
    /// Iceberg peak: the quantity shown on the book at once.
    pub display_qty: Option<Qty>,
    /// Expiry for `gtd`, in the same nanoseconds as command timestamps.
    pub expire_at: Option<Timestamp>,
    /// Self-trade prevention for this order; the market's default when absent.
    pub stp: Option<StpMode>,
}

impl NewOrder {
    /// A plain GTC limit order, the most common case (tests and tools build on it).
    pub fn limit(side: Side, price: Price, qty: Qty) -> NewOrder {
        NewOrder {
            cid: None,
            side,
            order_type: OrderType::Limit,
            tif: Tif::Gtc,
            price: Some(price),
            qty,
            stop_price: None,
            display_qty: None,
            expire_at: None,
            stp: None,
        }
    }

    /// A market order (IOC).
    pub fn market(side: Side, qty: Qty) -> NewOrder {
        NewOrder {
            order_type: OrderType::Market,
            tif: Tif::Ioc,
            price: None,
            ..NewOrder::limit(side, Price(0), qty)
        }
    }
}

/// Which order a cancel or amend is about: the engine's id, or the sender's client order id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderRef {
    Oid(OrderId),
    Cid(Cid),
}

/// FIX-style amend: `qty` is the new total quantity including what is already filled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Amend {
    pub target: OrderRef,
    pub qty: Option<Qty>,
    pub price: Option<Price>,
}
