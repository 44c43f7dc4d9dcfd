//! The wire format: order commands in, events out, as MessagePack maps with named fields (or
//! JSON, for people at a shell), with the field names of the protocol.
//!
//! Decoding turns untrusted bytes into typed [`Command`]s; every way bytes can be wrong becomes a
//! [`WireReject`] that says which field broke which rule and what to send instead. Encoding
//! turns book events into maps with decimal strings for prices and quantities. This module must
//! never panic on input, never guess at a value (a float price is refused, not rounded), and
//! never decide anything about matching: that is the book's.

use serde::{Deserialize, Serialize};

use crate::book::command::{Amend, Command, NewOrder, Op, OpKind, OrderRef};
use crate::book::event::{Event, RejectReason};
use crate::book::num::{Price, Qty, format_decimal, parse_decimal};
use crate::book::spec::{MarketSpec, MarketSpecInput};
use crate::book::types::{
    Account, BATCH_COMMANDS_MAX, Cid, OrderId, OrderType, Seq, Side, StpMode, Tif, Timestamp,
};

/// Largest message accepted on the order subject, in bytes.
pub const PAYLOAD_MAX: usize = 64 * 1024;

/// A scalar as it arrived, before its field's rules are applied.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Str(String),
    UInt(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// One command as on the wire. Every field is optional here so that a missing or misplaced
/// field gets a message of ours, not a generic decoder error.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireCommand {
    pub op: Option<String>,
    pub account: Option<String>,
    pub cid: Option<String>,
    pub oid: Option<u64>,
    pub side: Option<String>,
    #[serde(rename = "type")]
    pub order_type: Option<String>,
    pub tif: Option<String>,
    pub price: Option<Scalar>,
    pub qty: Option<Scalar>,
    pub stop_price: Option<Scalar>,
    pub display_qty: Option<Scalar>,
    pub expire_at: Option<u64>,
    pub stp: Option<String>,
    pub cancel_orders: Option<bool>,
    /// `update_spec` only: the market's whole new spec (the fields of a market spec).
    pub spec: Option<serde_json::Value>,
    pub commands: Option<Vec<WireCommand>>,
    /// `agora replay` only: the command's timestamp (ns) and input sequence.
    pub ts: Option<u64>,
    pub seq: Option<u64>,
}

/// A command that could not be turned into a `Command`: reported as a `rejected` event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireReject {
    pub seq: Seq,
    pub pos: u16,
    pub ts: Timestamp,
    pub op: Option<OpKind>,
    pub account: Option<Account>,
    pub cid: Option<Cid>,
    pub reason: RejectReason,
    pub message: String,
}

/// What decoding needs to know besides the bytes.
#[derive(Clone, Copy, Debug)]
pub struct DecodeContext<'a> {
    pub spec: &'a MarketSpec,
    pub seq: Seq,
    pub ts: Timestamp,
    /// Used when a command names no account (`agora replay`); `None` makes `account` required.
    pub default_account: Option<Account>,
    /// The account whose own subject (`<prefix>.orders.<MARKET>.<ACCOUNT>`) carried the
    /// message: every command in it is for that account (one naming another is refused
    /// `not_permitted`, and the refusal goes to the sender), and `account` may be left out.
    pub bound_account: Option<Account>,
    /// Most commands one batch may carry (at most `BATCH_COMMANDS_MAX`).
    pub batch_max: u16,
    /// Whether the message came from the operators' subject: only then may it halt or resume
    /// the market (`agora replay` files are the operator's own).
    pub operator: bool,
}

pub mod query;
mod shape;

/// Decodes a JSON document into a wire command: a map whose fields have the documented kinds
/// (`shape`), then its fields.
pub fn parse_json(bytes: &[u8]) -> Result<WireCommand, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    shape::check_json(&value)?;
    serde_json::from_value(value).map_err(|e| format!("not a valid JSON command: {e}"))
}

/// Decodes a MessagePack map into a wire command: a map with string keys whose fields have the
/// documented kinds (`shape`), then its fields.
pub fn parse_msgpack(bytes: &[u8]) -> Result<WireCommand, String> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'{' | b'['))
        && serde_json::from_slice::<serde_json::Value>(bytes).is_ok()
    {
        return Err(
            "this is JSON sent as MessagePack: set the header Content-Type: application/json, or send a MessagePack map"
                .into(),
        );
    }
    shape::check_msgpack(bytes)?;
    rmp_serde::from_slice(bytes).map_err(|e| format!("not a valid MessagePack command: {e}"))
}

/// Decodes one message (JSON when `json`, else MessagePack) into its commands: one, or one per
/// entry of a batch. Bad entries become rejections; good ones in the same batch still apply.
pub fn decode(
    bytes: &[u8],
    json: bool,
    ctx: &DecodeContext<'_>,
) -> Vec<Result<Command, WireReject>> {
    let malformed = |message: String| {
        vec![Err(WireReject {
            seq: ctx.seq,
            pos: 0,
            ts: ctx.ts,
            op: None,
            account: ctx.bound_account,
            cid: None,
            reason: RejectReason::Malformed,
            message,
        })]
    };
    if bytes.len() > PAYLOAD_MAX {
        return malformed(format!(
            "the message is {} bytes; the limit is {PAYLOAD_MAX}: split it into smaller batches",
            bytes.len()
        ));
    }
    let parsed = if json {
        parse_json(bytes)
    } else {
        parse_msgpack(bytes)
    };
    match parsed {
        Ok(wire) => wire.into_commands(ctx),
        Err(message) => malformed(message),
    }
}

#[derive(Clone, Copy)]
struct Fields<'a> {
    ctx: &'a DecodeContext<'a>,
    pos: u16,
    op: Option<OpKind>,
    account: Option<Account>,
    cid: Option<Cid>,
}

impl Fields<'_> {
    fn fail(&self, reason: RejectReason, message: String) -> WireReject {
        WireReject {
            seq: self.ctx.seq,
            pos: self.pos,
            ts: self.ctx.ts,
            op: self.op,
            account: self.account,
            cid: self.cid,
            reason,
            message,
        }
    }

    fn invalid(&self, message: String) -> WireReject {
        self.fail(RejectReason::InvalidField, message)
    }

    fn amount(
        &self,
        field: &str,
        value: &Option<Scalar>,
        decimals: u8,
    ) -> Result<Option<u64>, WireReject> {
        let market = &self.ctx.spec.symbol;
        let text = match value {
            None => return Ok(None),
            Some(Scalar::Str(s)) => s.clone(),
            Some(Scalar::UInt(n)) => n.to_string(),
            Some(Scalar::Int(n)) => n.to_string(),
            Some(Scalar::Float(f)) => {
                return Err(self.invalid(format!(
                    "{field} {f} was sent as a floating-point number; send it as a decimal string such as \"{f}\" so it stays exact"
                )));
            }
            Some(Scalar::Bool(b)) => {
                return Err(self.invalid(format!(
                    "{field} is {b}; send a decimal string such as \"1.5\""
                )));
            }
        };
        parse_decimal(&text, decimals)
            .map(Some)
            .map_err(|e| self.invalid(e.describe(field, &text, market)))
    }

    fn not_for(&self, field: &str, present: bool) -> Result<(), WireReject> {
        if present {
            let op = self.op.map_or("this op", OpKind::as_str);
            return Err(self.invalid(format!("{field} does not apply to {op}; leave it out")));
        }
        Ok(())
    }
}

fn one_of<T: Copy>(field: &str, value: &str, options: &[(&str, T)]) -> Result<T, String> {
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            format!("{field} {value:?} is not one of {}", names.join(", "))
        })
}

const OPS: &[(&str, OpKind)] = &[
    ("new", OpKind::New),
    ("cancel", OpKind::Cancel),
    ("amend", OpKind::Amend),
    ("cancel_all", OpKind::CancelAll),
    ("halt", OpKind::Halt),
    ("resume", OpKind::Resume),
    ("update_spec", OpKind::UpdateSpec),
    ("batch", OpKind::Batch),
];
const SIDES: &[(&str, Side)] = &[("buy", Side::Buy), ("sell", Side::Sell)];
const TYPES: &[(&str, OrderType)] = &[
    ("limit", OrderType::Limit),
    ("market", OrderType::Market),
    ("stop_limit", OrderType::StopLimit),
    ("stop_market", OrderType::StopMarket),
];
const TIFS: &[(&str, Tif)] = &[
    ("gtc", Tif::Gtc),
    ("ioc", Tif::Ioc),
    ("fok", Tif::Fok),
    ("gtd", Tif::Gtd),
    ("post_only", Tif::PostOnly),
];
const STPS: &[(&str, StpMode)] = &[
    ("none", StpMode::None),
    ("cancel_newest", StpMode::CancelNewest),
    ("cancel_oldest", StpMode::CancelOldest),
    ("cancel_both", StpMode::CancelBoth),
    ("decrement_and_cancel", StpMode::DecrementAndCancel),
];

impl WireCommand {
    /// The commands this message carries, each with its position inside the message.
    pub fn into_commands(self, ctx: &DecodeContext<'_>) -> Vec<Result<Command, WireReject>> {
        if self.op.as_deref() != Some("batch") {
            return vec![self.to_command(ctx, 0, None)];
        }
        let batch_account = match ctx.bound_account {
            Some(bound) => Some(bound),
            None => self.account.as_deref().and_then(|a| Account::new(a).ok()),
        };
        let fields = Fields {
            ctx,
            pos: 0,
            op: Some(OpKind::Batch),
            account: batch_account,
            cid: None,
        };
        let commands = match self.commands {
            Some(commands) if !commands.is_empty() => commands,
            _ => {
                return vec![Err(fields.invalid(
                    "a batch needs a non-empty commands list: {op: \"batch\", commands: [...]}"
                        .into(),
                ))];
            }
        };
        let max = ctx.batch_max.min(BATCH_COMMANDS_MAX);
        if commands.len() > usize::from(max) {
            return vec![Err(fields.fail(
                RejectReason::BatchTooLarge,
                format!(
                    "the batch holds {} commands; the limit is {max}: split it",
                    commands.len()
                ),
            ))];
        }
        commands
            .into_iter()
            .enumerate()
            .map(|(pos, c)| {
                let sub = Fields {
                    pos: pos as u16,
                    ..fields
                };
                if c.op.as_deref() == Some("batch") {
                    return Err(sub.invalid("a batch cannot hold another batch".into()));
                }
                c.to_command(ctx, pos as u16, self.account.as_deref())
            })
            .collect()
    }

    fn to_command(
        &self,
        ctx: &DecodeContext<'_>,
        pos: u16,
        batch_account: Option<&str>,
    ) -> Result<Command, WireReject> {
        let mut f = Fields {
            ctx,
            pos,
            op: None,
            account: None,
            cid: None,
        };
        let spec = ctx.spec;
        // Identify the sender and the cid first, so even a rejection reaches the right account.
        let account_text = self.account.as_deref().or(batch_account);
        f.account = match account_text {
            Some(text) => {
                Some(Account::new(text).map_err(|e| f.invalid(e.describe("account", text)))?)
            }
            None => ctx.default_account,
        };
        // On an account's own subject, the rejection of a command naming someone else goes to
        // the sender, never to the account it named.
        let mut foreign = None;
        if let Some(bound) = ctx.bound_account {
            if f.account.is_some_and(|a| a != bound) {
                foreign = f.account;
            }
            f.account = Some(bound);
        }
        if let Some(text) = &self.cid {
            f.cid = Some(Cid::new(text).map_err(|e| f.invalid(e.describe("cid", text)))?);
        }
        let op_text = self.op.as_deref().ok_or_else(|| {
            f.invalid(
                "op is missing; send one of new, cancel, amend, cancel_all, halt, resume, update_spec, batch"
                    .into(),
            )
        })?;
        let op = one_of("op", op_text, OPS).map_err(|m| f.invalid(m))?;
        f.op = Some(op);
        if let (Some(named), Some(bound)) = (foreign, ctx.bound_account) {
            return Err(f.fail(
                RejectReason::NotPermitted,
                format!(
                    "this message came on the subject of account {}, so its commands are for {} only; this one names {}",
                    bound.as_str(),
                    bound.as_str(),
                    named.as_str()
                ),
            ));
        }
        let Some(account) = f.account else {
            return Err(
                f.invalid("account is missing; every command names the account it is for".into())
            );
        };
        f.not_for("commands", self.commands.is_some())?;
        let is_new = op == OpKind::New;
        let is_amend = op == OpKind::Amend;
        let targets = matches!(op, OpKind::Cancel | OpKind::Amend);
        f.not_for("side", self.side.is_some() && !is_new)?;
        f.not_for("type", self.order_type.is_some() && !is_new)?;
        f.not_for("tif", self.tif.is_some() && !is_new)?;
        f.not_for("stop_price", self.stop_price.is_some() && !is_new)?;
        f.not_for("display_qty", self.display_qty.is_some() && !is_new)?;
        f.not_for("expire_at", self.expire_at.is_some() && !is_new)?;
        f.not_for("stp", self.stp.is_some() && !is_new)?;
        f.not_for("price", self.price.is_some() && !(is_new || is_amend))?;
        f.not_for("qty", self.qty.is_some() && !(is_new || is_amend))?;
        f.not_for("oid", self.oid.is_some() && !targets)?;
        f.not_for("cid", self.cid.is_some() && !(is_new || targets))?;
        f.not_for(
            "cancel_orders",
            self.cancel_orders.is_some() && op != OpKind::Halt,
        )?;
        f.not_for("spec", self.spec.is_some() && op != OpKind::UpdateSpec)?;
        let price = f
            .amount("price", &self.price, spec.price_decimals)?
            .map(Price);
        let qty = f.amount("qty", &self.qty, spec.size_decimals)?.map(Qty);
        let op = match op {
            OpKind::New => {
                let side_text = self
                    .side
                    .as_deref()
                    .ok_or_else(|| f.invalid("side is missing; send buy or sell".into()))?;
                let side = one_of("side", side_text, SIDES).map_err(|m| f.invalid(m))?;
                let order_type = match self.order_type.as_deref() {
                    None => OrderType::Limit,
                    Some(t) => one_of("type", t, TYPES).map_err(|m| f.invalid(m))?,
                };
                let tif = match self.tif.as_deref() {
                    None if order_type.has_limit_price() => Tif::Gtc,
                    None => Tif::Ioc,
                    Some(t) => one_of("tif", t, TIFS).map_err(|m| f.invalid(m))?,
                };
                let stp = match self.stp.as_deref() {
                    None => None,
                    Some(s) => Some(one_of("stp", s, STPS).map_err(|m| f.invalid(m))?),
                };
                let qty = qty.ok_or_else(|| {
                    f.invalid("qty is missing; send the order quantity as a decimal string".into())
                })?;
                Op::New(NewOrder {
                    cid: f.cid,
                    side,
                    order_type,
                    tif,
                    price,
                    qty,
                    stop_price: f
                        .amount("stop_price", &self.stop_price, spec.price_decimals)?
                        .map(Price),
                    display_qty: f
                        .amount("display_qty", &self.display_qty, spec.size_decimals)?
                        .map(Qty),
                    expire_at: self.expire_at,
                    stp,
                })
            }
            OpKind::Cancel | OpKind::Amend => {
                let target = match (self.oid, f.cid) {
                    (Some(oid), None) => OrderRef::Oid(OrderId(oid)),
                    (None, Some(cid)) => OrderRef::Cid(cid),
                    (Some(_), Some(_)) => {
                        return Err(f.invalid(format!(
                            "{} names both oid and cid; send one of them",
                            op.as_str()
                        )));
                    }
                    (None, None) => {
                        return Err(f.invalid(format!(
                            "{} needs the oid or the cid of the order",
                            op.as_str()
                        )));
                    }
                };
                if op == OpKind::Cancel {
                    Op::Cancel(target)
                } else {
                    Op::Amend(Amend { target, qty, price })
                }
            }
            OpKind::CancelAll => Op::CancelAll,
            OpKind::Halt | OpKind::Resume | OpKind::UpdateSpec if !ctx.operator => {
                let verb = if op == OpKind::UpdateSpec {
                    "update"
                } else {
                    op.as_str()
                };
                return Err(f.fail(
                    RejectReason::NotPermitted,
                    format!(
                        "{} is an operator command; operators send it with `agora ctl market.{verb}`",
                        op.as_str(),
                    ),
                ));
            }
            OpKind::UpdateSpec => {
                let value = self.spec.clone().ok_or_else(|| {
                    f.invalid(
                        "spec is missing; update_spec carries the market's whole new spec".into(),
                    )
                })?;
                let input: MarketSpecInput = serde_json::from_value(value)
                    .map_err(|e| f.invalid(format!("spec is not a market spec: {e}")))?;
                let rules = spec
                    .update_rules(&input)
                    .map_err(|e| f.invalid(format!("spec: {e} (field {})", e.field)))?;
                Op::UpdateSpec(rules)
            }
            OpKind::Halt => Op::Halt {
                cancel_orders: self.cancel_orders.unwrap_or(false),
            },
            OpKind::Resume => Op::Resume,
            // Batches are unpacked by `into_commands`; one inside a batch is refused there.
            OpKind::Batch => return Err(f.invalid("a batch cannot hold another batch".into())),
        };
        Ok(Command {
            seq: ctx.seq,
            pos,
            ts: ctx.ts,
            account,
            op,
        })
    }
}

// ----- events out ------------------------------------------------------------------------

/// A short string made on the stack: a decimal (`"65000.50"`) or a trade id (`"812-3"`). The
/// event types hold these instead of `String`s, so encoding an event allocates nothing; they
/// serialize as plain strings, byte for byte what `format_decimal` and `format!` give.
#[derive(Clone, Copy)]
pub struct ShortStr {
    buf: [u8; ShortStr::CAPACITY],
    len: u8,
}

impl ShortStr {
    /// A `u64` has 20 digits; with up to `DECIMALS_MAX` (18) decimals, a point and a leading
    /// "0", a decimal needs at most 22 bytes, and a trade id (`u64`, '-', `u32`) 31.
    const CAPACITY: usize = 40;

    /// `units` with exactly `decimals` digits after the point, as `format_decimal` writes it.
    pub fn decimal(units: u64, decimals: u8) -> ShortStr {
        let mut digits = [0u8; 20];
        let mut n = digits.len();
        let mut v = units;
        loop {
            n -= 1;
            digits[n] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let digits = &digits[n..];
        let mut out = ShortStr {
            buf: [0; ShortStr::CAPACITY],
            len: 0,
        };
        let decimals = usize::from(decimals).min(ShortStr::CAPACITY - 3);
        if decimals == 0 {
            out.push(digits);
            return out;
        }
        if digits.len() > decimals {
            let (int, frac) = digits.split_at(digits.len() - decimals);
            out.push(int);
            out.push(b".");
            out.push(frac);
        } else {
            out.push(b"0.");
            for _ in digits.len()..decimals {
                out.push(b"0");
            }
            out.push(digits);
        }
        out
    }

    /// `"<seq>-<n>"`, the id of the `n`-th trade of input `seq`.
    pub fn trade_id(seq: u64, n: u32) -> ShortStr {
        let mut out = ShortStr::decimal(seq, 0);
        out.push(b"-");
        out.push(ShortStr::decimal(u64::from(n), 0).as_str().as_bytes());
        out
    }

    fn push(&mut self, bytes: &[u8]) {
        let at = usize::from(self.len);
        let end = (at + bytes.len()).min(ShortStr::CAPACITY);
        self.buf[at..end].copy_from_slice(&bytes[..end - at]);
        self.len = end as u8;
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits, '.' and '-' are ever written.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for ShortStr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Serialize)]
struct WireAccepted<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    market: &'a str,
    seq: Seq,
    ts: Timestamp,
    oid: u64,
    cid: Option<&'a str>,
    account: &'a str,
    side: &'static str,
    order_type: &'static str,
    tif: &'static str,
    price: Option<ShortStr>,
    qty: ShortStr,
    stop_price: Option<ShortStr>,
    display_qty: Option<ShortStr>,
    expire_at: Option<Timestamp>,
    stp: &'static str,
}

#[derive(Serialize)]
struct WireRejected<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    market: &'a str,
    seq: Seq,
    ts: Timestamp,
    op: Option<&'static str>,
    oid: Option<u64>,
    cid: Option<&'a str>,
    account: Option<&'a str>,
    reason: &'static str,
    message: String,
    /// For `rate_limited`: milliseconds until the account may send again (rounded up).
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

#[derive(Serialize)]
struct WireTrade<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    market: &'a str,
    seq: Seq,
    ts: Timestamp,
    trade_id: ShortStr,
    price: ShortStr,
    qty: ShortStr,
    taker_side: &'static str,
    maker_oid: u64,
    maker_cid: Option<&'a str>,
    maker_account: &'a str,
    maker_leaves: ShortStr,
    taker_oid: u64,
    taker_cid: Option<&'a str>,
    taker_account: &'a str,
    taker_leaves: ShortStr,
}

#[derive(Serialize)]
struct WireCancelled<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    market: &'a str,
    seq: Seq,
    ts: Timestamp,
    oid: u64,
    cid: Option<&'a str>,
    account: &'a str,
    side: &'static str,
    reason: &'static str,
    qty: ShortStr,
    leaves: ShortStr,
}

#[derive(Serialize)]
struct WireAmended<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    market: &'a str,
    seq: Seq,
    ts: Timestamp,
    oid: u64,
    cid: Option<&'a str>,
    account: &'a str,
    side: &'static str,
    price: ShortStr,
    qty: ShortStr,
    leaves: ShortStr,
    priority_kept: bool,
}

#[derive(Serialize)]
struct WireTriggered<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    market: &'a str,
    seq: Seq,
    ts: Timestamp,
    oid: u64,
    cid: Option<&'a str>,
    account: &'a str,
    side: &'static str,
    order_type: &'static str,
    stop_price: ShortStr,
    last_price: ShortStr,
}

/// An event ready to encode: `serde_json::to_string(&EventView::new(spec, &event))` or
/// `rmp_serde::to_vec_named(...)` gives the wire form.
pub struct EventView<'a> {
    spec: &'a MarketSpec,
    event: &'a Event,
}

impl<'a> EventView<'a> {
    pub fn new(spec: &'a MarketSpec, event: &'a Event) -> EventView<'a> {
        EventView { spec, event }
    }
}

impl Serialize for EventView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let spec = self.spec;
        let market = spec.symbol.as_str();
        let p = |p: Price| ShortStr::decimal(p.0, spec.price_decimals);
        let q = |q: Qty| ShortStr::decimal(q.0, spec.size_decimals);
        match self.event {
            Event::Accepted(e) => WireAccepted {
                kind: "accepted",
                market,
                seq: e.seq,
                ts: e.ts,
                oid: e.order.oid.0,
                cid: e.order.cid.as_ref().map(Cid::as_str),
                account: e.order.account.as_str(),
                side: e.side.as_str(),
                order_type: e.order_type.as_str(),
                tif: e.tif.as_str(),
                price: e.price.map(p),
                qty: q(e.qty),
                stop_price: e.stop_price.map(p),
                display_qty: e.display_qty.map(q),
                expire_at: e.expire_at,
                stp: e.stp.as_str(),
            }
            .serialize(s),
            Event::Rejected(e) => WireRejected {
                kind: "rejected",
                market,
                seq: e.seq,
                ts: e.ts,
                op: Some(e.op.as_str()),
                oid: e.oid.map(|o| o.0),
                cid: e.cid.as_ref().map(Cid::as_str),
                account: Some(e.account.as_str()),
                reason: e.reason.as_str(),
                message: e.reason.message(spec, e.price, e.qty),
                retry_after_ms: e.retry_after.map(|ns| ns.div_ceil(1_000_000).max(1)),
            }
            .serialize(s),
            Event::Trade(e) => WireTrade {
                kind: "trade",
                market,
                seq: e.seq,
                ts: e.ts,
                trade_id: ShortStr::trade_id(e.seq, e.trade_n),
                price: p(e.price),
                qty: q(e.qty),
                taker_side: e.taker_side.as_str(),
                maker_oid: e.maker.oid.0,
                maker_cid: e.maker.cid.as_ref().map(Cid::as_str),
                maker_account: e.maker.account.as_str(),
                maker_leaves: q(e.maker_leaves),
                taker_oid: e.taker.oid.0,
                taker_cid: e.taker.cid.as_ref().map(Cid::as_str),
                taker_account: e.taker.account.as_str(),
                taker_leaves: q(e.taker_leaves),
            }
            .serialize(s),
            Event::Cancelled(e) => WireCancelled {
                kind: "cancelled",
                market,
                seq: e.seq,
                ts: e.ts,
                oid: e.order.oid.0,
                cid: e.order.cid.as_ref().map(Cid::as_str),
                account: e.order.account.as_str(),
                side: e.side.as_str(),
                reason: e.reason.as_str(),
                qty: q(e.qty),
                leaves: q(e.leaves),
            }
            .serialize(s),
            Event::Amended(e) => WireAmended {
                kind: "amended",
                market,
                seq: e.seq,
                ts: e.ts,
                oid: e.order.oid.0,
                cid: e.order.cid.as_ref().map(Cid::as_str),
                account: e.order.account.as_str(),
                side: e.side.as_str(),
                price: p(e.price),
                qty: q(e.qty),
                leaves: q(e.leaves),
                priority_kept: e.priority_kept,
            }
            .serialize(s),
            Event::Triggered(e) => WireTriggered {
                kind: "triggered",
                market,
                seq: e.seq,
                ts: e.ts,
                oid: e.order.oid.0,
                cid: e.order.cid.as_ref().map(Cid::as_str),
                account: e.order.account.as_str(),
                side: e.side.as_str(),
                order_type: e.order_type.as_str(),
                stop_price: p(e.stop_price),
                last_price: p(e.last_price),
            }
            .serialize(s),
        }
    }
}

/// A decode rejection ready to encode, in the same shape as a book rejection.
pub struct RejectView<'a> {
    spec: &'a MarketSpec,
    reject: &'a WireReject,
}

impl<'a> RejectView<'a> {
    pub fn new(spec: &'a MarketSpec, reject: &'a WireReject) -> RejectView<'a> {
        RejectView { spec, reject }
    }
}

impl Serialize for RejectView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.reject;
        WireRejected {
            kind: "rejected",
            market: &self.spec.symbol,
            seq: r.seq,
            ts: r.ts,
            op: r.op.map(OpKind::as_str),
            oid: (r.op == Some(OpKind::New)).then(|| OrderId::from_input(r.seq, r.pos).0),
            cid: r.cid.as_ref().map(Cid::as_str),
            account: r.account.as_ref().map(Account::as_str),
            reason: r.reason.as_str(),
            message: r.message.clone(),
            retry_after_ms: None,
        }
        .serialize(s)
    }
}

/// One L2 level on the wire.
#[derive(Serialize)]
pub struct WireLevel {
    pub price: String,
    pub qty: String,
    pub orders: u32,
}

/// The top of a book on the wire: `{market, bids: [...], asks: [...]}`, best first.
#[derive(Serialize)]
pub struct WireBook<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub market: &'a str,
    pub bids: Vec<WireLevel>,
    pub asks: Vec<WireLevel>,
}

impl<'a> WireBook<'a> {
    pub fn new(book: &'a crate::book::OrderBook, levels: usize) -> WireBook<'a> {
        let spec = book.spec();
        let side = |side| {
            book.depth(side, levels)
                .into_iter()
                .map(|l| WireLevel {
                    price: format_decimal(l.price.0, spec.price_decimals),
                    qty: format_decimal(l.qty.0, spec.size_decimals),
                    orders: l.orders,
                })
                .collect()
        };
        WireBook {
            kind: "book",
            market: &spec.symbol,
            bids: side(Side::Buy),
            asks: side(Side::Sell),
        }
    }
}

// ----- commands out (clients, tools, sample files) ----------------------------------------

/// A command as a client sends it. Absent options are left out of the map.
#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct WireCommandOut {
    pub op: String,
    pub account: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oid: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub order_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tif: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_price: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_qty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_orders: Option<bool>,
    /// `update_spec` only: the market's whole new spec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<MarketSpecInput>,
    /// Replay files only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
}

impl WireCommandOut {
    /// The wire form of `cmd` (with `ts` when `with_ts`, as replay files carry it).
    pub fn from_command(spec: &MarketSpec, cmd: &Command, with_ts: bool) -> WireCommandOut {
        let p = |p: Price| format_decimal(p.0, spec.price_decimals);
        let q = |q: Qty| format_decimal(q.0, spec.size_decimals);
        let mut w = WireCommandOut {
            op: cmd.op.kind().as_str().to_string(),
            account: cmd.account.as_str().to_string(),
            ts: with_ts.then_some(cmd.ts),
            ..WireCommandOut::default()
        };
        let target = |w: &mut WireCommandOut, r: &OrderRef| match r {
            OrderRef::Oid(oid) => w.oid = Some(oid.0),
            OrderRef::Cid(cid) => w.cid = Some(cid.as_str().to_string()),
        };
        match &cmd.op {
            Op::New(o) => {
                w.cid = o.cid.map(|c| c.as_str().to_string());
                w.side = Some(o.side.as_str().into());
                w.order_type = Some(o.order_type.as_str().into());
                w.tif = Some(o.tif.as_str().into());
                w.price = o.price.map(p);
                w.qty = Some(q(o.qty));
                w.stop_price = o.stop_price.map(p);
                w.display_qty = o.display_qty.map(q);
                w.expire_at = o.expire_at;
                w.stp = o.stp.map(|s| s.as_str().into());
            }
            Op::Cancel(r) => target(&mut w, r),
            Op::Amend(a) => {
                target(&mut w, &a.target);
                w.price = a.price.map(p);
                w.qty = a.qty.map(q);
            }
            Op::CancelAll | Op::Resume => {}
            Op::Halt { cancel_orders } => w.cancel_orders = Some(*cancel_orders),
            Op::UpdateSpec(rules) => w.spec = Some(spec.with_rules(*rules).to_input()),
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_are_what_format_gives() {
        let values = [
            0,
            1,
            9,
            10,
            99,
            100,
            12_345,
            6_500_050,
            999_999_999_999,
            u64::MAX / 7,
            u64::MAX - 1,
            u64::MAX,
        ];
        for units in values {
            for decimals in 0..=crate::book::num::DECIMALS_MAX {
                assert_eq!(
                    ShortStr::decimal(units, decimals).as_str(),
                    format_decimal(units, decimals),
                    "{units} with {decimals} decimals"
                );
            }
        }
        for (seq, n) in [(0, 0), (812, 3), (u64::MAX, u32::MAX)] {
            assert_eq!(ShortStr::trade_id(seq, n).as_str(), format!("{seq}-{n}"));
        }
        let encoded = rmp_serde::to_vec(&ShortStr::decimal(150, 2)).expect("encodes");
        assert_eq!(encoded, rmp_serde::to_vec("1.50").expect("encodes"));
    }
}
