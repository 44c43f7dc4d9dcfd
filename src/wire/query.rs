//! The shapes of queries between a node's query front (`query`) and a market's responder
//! (`actors::market::queries`), and the order as every query reply shows it (DESIGN section
//! 11). Plain data: no NATS here, and nothing decided about an order.

use serde::{Deserialize, Serialize};

use crate::book::{Account, Cid, MarketSpec, OpenOrder, OrderId, OrderRef, Seq};

/// The most orders one reply carries (a reply stays well under NATS's 1 MB default payload:
/// an order is ~300 bytes).
pub const LIMIT_MAX: usize = 1000;

/// One order as a query shows it (DESIGN section 11).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    pub market: String,
    pub oid: u64,
    pub cid: Option<String>,
    pub account: String,
    pub side: String,
    pub order_type: String,
    pub tif: String,
    pub price: Option<String>,
    pub stop_price: Option<String>,
    pub qty: String,
    pub display_qty: Option<String>,
    pub filled: String,
    pub leaves: String,
    /// `open` (on the book) or `untriggered` (a stop waiting for its trigger).
    pub status: String,
    /// When the order was accepted (stream nanoseconds; 0 when it was placed before this
    /// was kept).
    pub ts: u64,
    /// The input sequence of the last command that changed it.
    pub last_seq: Seq,
    /// For a closed order (from the history store): the notional over the filled quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg_price: Option<String>,
    /// For a closed order: the cancel or reject reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl OrderView {
    pub fn new(spec: &MarketSpec, o: &OpenOrder) -> OrderView {
        let r = &o.record;
        OrderView {
            market: spec.symbol.clone(),
            oid: r.oid.0,
            cid: r.cid.map(|c| c.to_string()),
            account: r.account.to_string(),
            side: r.side.as_str().into(),
            order_type: r.order_type.as_str().into(),
            tif: r.tif.as_str().into(),
            price: r.price.map(|p| spec.fmt_price(p)),
            stop_price: r.stop_price.map(|p| spec.fmt_price(p)),
            qty: spec.fmt_qty(r.qty),
            display_qty: r.display_qty.map(|q| spec.fmt_qty(q)),
            filled: spec.fmt_qty(r.filled),
            leaves: spec.fmt_qty(r.leaves),
            status: if o.waiting { "untriggered" } else { "open" }.into(),
            ts: r.ts,
            last_seq: r.last_seq,
            avg_price: None,
            reason: None,
        }
    }
}

/// What the front asks one market (`<prefix>.market.<MARKET>.orders`), MessagePack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketRequest {
    pub account: String,
    /// One order: by oid or cid (then `after` and `limit` are ignored).
    #[serde(default)]
    pub oid: Option<u64>,
    #[serde(default)]
    pub cid: Option<String>,
    /// The open orders after this oid, at most `limit`.
    #[serde(default)]
    pub after: Option<u64>,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// What the book is asked, once the request is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BookQuery {
    Open {
        after: Option<OrderId>,
        limit: usize,
    },
    One(OrderRef),
}

impl MarketRequest {
    /// The account and what to ask its book, or what is wrong with the request.
    pub fn read(&self) -> Result<(Account, BookQuery), String> {
        let account =
            Account::new(&self.account).map_err(|e| e.describe("account", &self.account))?;
        let query = match (self.oid, &self.cid) {
            (Some(_), Some(_)) => return Err("give oid or cid, not both".into()),
            (Some(oid), None) => BookQuery::One(OrderRef::Oid(OrderId(oid))),
            (None, Some(cid)) => BookQuery::One(OrderRef::Cid(
                Cid::new(cid).map_err(|e| e.describe("cid", cid))?,
            )),
            (None, None) => BookQuery::Open {
                after: self.after.map(OrderId),
                limit: self.limit.unwrap_or(LIMIT_MAX).clamp(1, LIMIT_MAX),
            },
        };
        Ok((account, query))
    }
}

/// One market's answer: the sequence its book reflects, the orders, and whether more follow
/// (for `BookQuery::Open`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketAnswer {
    pub ok: bool,
    #[serde(default)]
    pub seq: Seq,
    #[serde(default)]
    pub orders: Vec<OrderView>,
    #[serde(default)]
    pub more: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl MarketAnswer {
    pub fn refused(error: &str, message: String) -> MarketAnswer {
        MarketAnswer {
            ok: false,
            seq: 0,
            orders: Vec::new(),
            more: false,
            error: Some(error.into()),
            message: Some(message),
        }
    }
}

/// An order as the history shows it: the fields of a query's order (DESIGN section 11), and
/// what only the history knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryOrder {
    pub market: String,
    pub oid: u64,
    pub cid: Option<String>,
    pub account: String,
    pub side: Option<String>,
    pub order_type: Option<String>,
    pub tif: Option<String>,
    pub price: Option<String>,
    pub stop_price: Option<String>,
    pub qty: Option<String>,
    #[serde(default)]
    pub display_qty: Option<String>,
    pub filled: String,
    pub leaves: String,
    #[serde(default)]
    pub avg_price: Option<String>,
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
    /// When it was accepted (or rejected), stream nanoseconds.
    pub ts: u64,
    #[serde(default)]
    pub updated_ts: u64,
    #[serde(default)]
    pub created_seq: u64,
    pub last_seq: u64,
}

impl HistoryOrder {
    /// The order as every query shows one (a rejected order's unknown side, type and
    /// quantity as empty strings).
    pub fn into_view(self) -> OrderView {
        OrderView {
            market: self.market,
            oid: self.oid,
            cid: self.cid,
            account: self.account,
            side: self.side.unwrap_or_default(),
            order_type: self.order_type.unwrap_or_default(),
            tif: self.tif.unwrap_or_default(),
            price: self.price,
            stop_price: self.stop_price,
            qty: self.qty.unwrap_or_default(),
            display_qty: self.display_qty,
            filled: self.filled,
            leaves: self.leaves,
            status: self.status,
            ts: self.ts,
            last_seq: self.last_seq,
            avg_price: self.avg_price,
            reason: self.reason,
        }
    }
}

/// What the node's query front asks for a closed order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderLookup {
    pub account: String,
    pub market: String,
    #[serde(default)]
    pub oid: Option<u64>,
    #[serde(default)]
    pub cid: Option<String>,
}

#[derive(Serialize)]
pub struct OrderFound {
    pub ok: bool,
    pub order: HistoryOrder,
    /// The last journal sequence of the market the store has written.
    pub as_of: u64,
}

/// `OrderFound` as read back (by the node's query front).
#[derive(Deserialize)]
pub struct OrderFoundOwned {
    pub ok: bool,
    pub order: HistoryOrder,
    #[serde(default)]
    pub as_of: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_market_request_names_one_order_or_a_page() {
        let page = MarketRequest {
            account: "alice".into(),
            oid: None,
            cid: None,
            after: Some(5),
            limit: Some(100_000),
        };
        let (_, q) = page.read().expect("page");
        assert_eq!(
            q,
            BookQuery::Open {
                after: Some(OrderId(5)),
                limit: LIMIT_MAX
            }
        );
        let both = MarketRequest {
            oid: Some(1),
            cid: Some("c".into()),
            ..page.clone()
        };
        assert!(both.read().is_err());
        let bad = MarketRequest {
            account: "a.b".into(),
            ..page
        };
        assert!(bad.read().is_err());
    }
}
