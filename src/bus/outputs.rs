//! What one processed input batch sends out: the journal message, then the derived views
//! (execution reports per account, the public trade tape, L2 deltas). Pure: events in, messages
//! (subject, `Nats-Msg-Id`, MessagePack payload) out; the market actor publishes them.
//!
//! Msg-Ids derive from (market, last input sequence of the batch, what the message is), never
//! from a counter, so a new owner that republishes the last batches produces the same ids and
//! JetStream drops the duplicates. An execution report tells an account about its own orders
//! only: a fill names the account's own side, never the counterparty. The tape names no account
//! and no order. This module must never publish, and never reorder a batch's events.

use std::cmp::Ordering;
use std::ops::Range;

use bytes::Bytes;
use serde::Serialize;

use super::subjects::Subjects;
use crate::book::{Event, L2Level, MarketSpec, OrderTag, Qty, Seq, Side, Timestamp, Trade};
use crate::wire::{EventView, RejectView, ShortStr, WireReject};

/// One entry of a batch, in input order: a book event, or a message that did not decode.
#[derive(Clone, Debug)]
pub enum Entry {
    Event(Event),
    Reject(WireReject),
}

/// What one input message did within a batch: the order its first event (or rejection) is
/// about, how many events and fills it caused, and its first rejection's reason. Traces
/// annotate a command's span with it; it is read from the batch's entries, never re-decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub oid: Option<crate::book::OrderId>,
    pub cid: Option<crate::book::Cid>,
    pub account: Option<crate::book::Account>,
    pub events: u64,
    pub fills: u64,
    pub rejected: Option<crate::book::RejectReason>,
}

impl Outcome {
    /// Adds what `entries` did for each of `seqs` to `outcomes` (same length as `seqs`), so a
    /// message whose batch was split sums over the parts.
    pub fn add(entries: &[Entry], seqs: &[Seq], outcomes: &mut [Outcome]) {
        for entry in entries {
            let seq = match entry {
                Entry::Event(e) => e.seq(),
                Entry::Reject(r) => r.seq,
            };
            let Some(o) = seqs
                .iter()
                .position(|s| *s == seq)
                .and_then(|i| outcomes.get_mut(i))
            else {
                continue;
            };
            o.events += 1;
            let first = o.events == 1;
            let (oid, cid, account) = match entry {
                Entry::Event(Event::Trade(t)) => {
                    o.fills += 1;
                    (Some(t.taker.oid), t.taker.cid, Some(t.taker.account))
                }
                Entry::Event(Event::Rejected(r)) => {
                    o.rejected.get_or_insert(r.reason);
                    (r.oid, r.cid, Some(r.account))
                }
                Entry::Event(Event::Accepted(e)) => {
                    (Some(e.order.oid), e.order.cid, Some(e.order.account))
                }
                Entry::Event(Event::Cancelled(e)) => {
                    (Some(e.order.oid), e.order.cid, Some(e.order.account))
                }
                Entry::Event(Event::Amended(e)) => {
                    (Some(e.order.oid), e.order.cid, Some(e.order.account))
                }
                Entry::Event(Event::Triggered(e)) => {
                    (Some(e.order.oid), e.order.cid, Some(e.order.account))
                }
                Entry::Reject(r) => {
                    o.rejected.get_or_insert(r.reason);
                    (None, r.cid, r.account)
                }
            };
            if first {
                (o.oid, o.cid, o.account) = (oid, cid, account);
            }
        }
    }
}

/// A message to publish. The payload is shared (`Bytes`): a batch's report payloads are slices
/// of one buffer, and publishing hands them over without a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    /// `Nats-Msg-Id` for JetStream subjects; `None` for core NATS (L2 deltas).
    pub msg_id: Option<String>,
    pub payload: Bytes,
}

/// Everything one batch sends, in publishing order: the journal first, alone (it is fenced);
/// the derived views only after it is acknowledged.
#[derive(Clone, Debug)]
pub struct BatchOutputs {
    pub journal: Outgoing,
    pub execs: Vec<Outgoing>,
    pub rejects: Option<Outgoing>,
    pub trades: Option<Outgoing>,
    pub book: Option<Outgoing>,
}

/// The top of both sides of a book, best first, as published in L2 deltas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Top {
    pub bids: Vec<L2Level>,
    pub asks: Vec<L2Level>,
}

/// One side of a fill, as its own account sees it.
#[derive(Serialize)]
struct Fill<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    market: &'a str,
    seq: Seq,
    ts: Timestamp,
    trade_id: ShortStr,
    oid: u64,
    cid: Option<&'a str>,
    account: &'a str,
    side: &'static str,
    liquidity: &'static str,
    price: ShortStr,
    qty: ShortStr,
    leaves: ShortStr,
}

impl<'a> Fill<'a> {
    /// The `maker` (or taker) side of `t`, for that side's account.
    fn new(spec: &'a MarketSpec, t: &'a Trade, maker: bool) -> Fill<'a> {
        let (order, side, leaves): (&OrderTag, Side, Qty) = if maker {
            (&t.maker, t.taker_side.opposite(), t.maker_leaves)
        } else {
            (&t.taker, t.taker_side, t.taker_leaves)
        };
        Fill {
            kind: "fill",
            market: &spec.symbol,
            seq: t.seq,
            ts: t.ts,
            trade_id: ShortStr::trade_id(t.seq, t.trade_n),
            oid: order.oid.0,
            cid: order.cid.as_ref().map(|c| c.as_str()),
            account: order.account.as_str(),
            side: side.as_str(),
            liquidity: if maker { "maker" } else { "taker" },
            price: ShortStr::decimal(t.price.0, spec.price_decimals),
            qty: ShortStr::decimal(t.qty.0, spec.size_decimals),
            leaves: ShortStr::decimal(leaves.0, spec.size_decimals),
        }
    }
}

#[derive(Serialize)]
struct TapeTrade {
    trade_id: ShortStr,
    ts: Timestamp,
    price: ShortStr,
    qty: ShortStr,
    taker_side: &'static str,
}

#[derive(Serialize)]
struct Tape<'a> {
    market: &'a str,
    last_seq: Seq,
    trades: Vec<TapeTrade>,
}

#[derive(Serialize)]
struct LevelChange {
    side: &'static str,
    price: ShortStr,
    /// Shown quantity now at the price; "0" when the level is gone from the top.
    qty: ShortStr,
    orders: u32,
}

#[derive(Serialize)]
struct BookDelta<'a> {
    market: &'a str,
    /// The last input sequence this delta includes.
    seq: Seq,
    /// `seq` of the previous delta: a consumer whose last seen `seq` differs missed a delta
    /// and asks `<prefix>.book.<MARKET>.snapshot` for the whole book.
    prev_seq: Seq,
    changes: Vec<LevelChange>,
}

/// Appends `value` as a named-field MessagePack map.
fn encode_into(out: &mut Vec<u8>, value: &impl Serialize) {
    // Encoding plain maps of strings and integers into a Vec cannot fail.
    let _ = rmp_serde::encode::write_named(out, value);
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    encode_into(&mut out, value);
    out
}

/// The head of a message whose last field is a list: the map's size, its leading fields
/// (strings and unsigned integers), and the list's key and length; the caller appends the
/// list's items, already encoded. Bytes as `rmp_serde::to_vec_named` writes the same struct.
fn write_head(out: &mut Vec<u8>, fields: &[(&str, Field<'_>)], list: &str, len: usize) {
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(out, (fields.len() + 1) as u32);
    for (key, value) in fields {
        let _ = rmp::encode::write_str(out, key);
        let _ = match value {
            Field::Str(v) => rmp::encode::write_str(out, v),
            Field::Uint(v) => rmp::encode::write_uint(out, *v).map(|_| ()),
        };
    }
    let _ = rmp::encode::write_str(out, list);
    let _ = rmp::encode::write_array_len(out, len as u32);
}

enum Field<'a> {
    Str(&'a str),
    Uint(u64),
}

/// The changes between two tops of book, per side: new or changed levels with their state,
/// levels gone with quantity 0. Best prices first on each side, bids before asks. Each side of
/// both tops is best first with one level a price, as `top` makes them: one walk over both.
pub fn top_changes(before: &Top, after: &Top) -> Vec<(Side, L2Level)> {
    let mut changes = Vec::new();
    for (side, old, new) in [
        (Side::Buy, &before.bids, &after.bids),
        (Side::Sell, &before.asks, &after.asks),
    ] {
        let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
        loop {
            // Which comes first on this side: the old level (`Less`) or the new one.
            let first = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(a), Some(b)) if side == Side::Buy => b.price.cmp(&a.price),
                (Some(a), Some(b)) => a.price.cmp(&b.price),
            };
            match first {
                Ordering::Less => {
                    if let Some(gone) = old.next() {
                        changes.push((
                            side,
                            L2Level {
                                price: gone.price,
                                qty: Qty(0),
                                orders: 0,
                            },
                        ));
                    }
                }
                Ordering::Greater => changes.extend(new.next().map(|l| (side, *l))),
                Ordering::Equal => {
                    if let (Some(a), Some(b)) = (old.next(), new.next())
                        && a != b
                    {
                        changes.push((side, *b));
                    }
                }
            }
        }
    }
    changes
}

/// One processed batch: input sequences `first_seq..=last_seq`, its entries in order, the top
/// of book before and after it, and the `seq` of the previous L2 delta.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub first_seq: Seq,
    pub last_seq: Seq,
    pub entries: &'a [Entry],
    pub before: &'a Top,
    pub after: &'a Top,
    pub prev_book_seq: Seq,
}

/// What an execution report holds for one entry of the batch.
#[derive(Clone, Copy)]
enum Part {
    /// The entry as the journal has it (an event or a rejection of the account's).
    Whole,
    /// One side of a trade.
    Maker,
    Taker,
}

/// The account an entry (other than a trade) reports to; `None` for an unreadable message.
fn account_of(entry: &Entry) -> Option<&str> {
    match entry {
        Entry::Event(e) => Some(match e {
            Event::Accepted(x) => x.order.account.as_str(),
            Event::Rejected(x) => x.account.as_str(),
            Event::Cancelled(x) => x.order.account.as_str(),
            Event::Amended(x) => x.order.account.as_str(),
            Event::Triggered(x) => x.order.account.as_str(),
            Event::Trade(x) => x.taker.account.as_str(),
        }),
        Entry::Reject(r) => r.account.as_ref().map(|a| a.as_str()),
    }
}

/// Builds the messages of one batch.
///
/// Each entry is encoded once, into the journal; an execution report copies the bytes of the
/// entries it shares with the journal (everything but fills), and all of a batch's report
/// payloads are written into one buffer and handed out as slices of it.
pub fn build(subjects: &Subjects, spec: &MarketSpec, batch: &Batch<'_>) -> BatchOutputs {
    let Batch {
        first_seq,
        last_seq,
        entries,
        before,
        after,
        prev_book_seq,
    } = *batch;
    let market = spec.symbol.as_str();

    // The journal, each entry's bytes in it remembered.
    let mut journal = Vec::with_capacity(64 + entries.len() * 192);
    write_head(
        &mut journal,
        &[
            ("market", Field::Str(market)),
            ("first_seq", Field::Uint(first_seq)),
            ("last_seq", Field::Uint(last_seq)),
        ],
        "events",
        entries.len(),
    );
    let mut spans: Vec<Range<usize>> = Vec::with_capacity(entries.len());
    for entry in entries {
        let start = journal.len();
        match entry {
            Entry::Event(e) => encode_into(&mut journal, &EventView::new(spec, e)),
            Entry::Reject(r) => encode_into(&mut journal, &RejectView::new(spec, r)),
        }
        spans.push(start..journal.len());
    }

    // Reports per account, in batch order; accounts in name order for stable output.
    let mut parts: Vec<(&str, u32, Part)> = Vec::with_capacity(entries.len() + 16);
    let mut unreadable: Vec<usize> = Vec::new();
    let mut tape = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let i = i as u32;
        match entry {
            Entry::Event(Event::Trade(t)) => {
                // One report per side, each to its own account.
                parts.push((t.maker.account.as_str(), i, Part::Maker));
                parts.push((t.taker.account.as_str(), i, Part::Taker));
                tape.push(TapeTrade {
                    trade_id: ShortStr::trade_id(t.seq, t.trade_n),
                    ts: t.ts,
                    price: ShortStr::decimal(t.price.0, spec.price_decimals),
                    qty: ShortStr::decimal(t.qty.0, spec.size_decimals),
                    taker_side: t.taker_side.as_str(),
                });
            }
            _ => match account_of(entry) {
                Some(account) => parts.push((account, i, Part::Whole)),
                None => unreadable.push(i as usize),
            },
        }
    }
    // Stable: within an account, batch order stays.
    parts.sort_by(|a, b| a.0.cmp(b.0));

    let mut views = Vec::with_capacity(parts.len() * 224 + 64);
    let mut groups: Vec<(&str, Range<usize>)> = Vec::new();
    let mut rest = parts.as_slice();
    while let Some(&(account, _, _)) = rest.first() {
        let n = rest.iter().take_while(|p| p.0 == account).count();
        let (group, tail) = rest.split_at(n);
        rest = tail;
        let start = views.len();
        write_head(
            &mut views,
            &[
                ("market", Field::Str(market)),
                ("last_seq", Field::Uint(last_seq)),
            ],
            "reports",
            group.len(),
        );
        for &(_, i, part) in group {
            let i = i as usize;
            match (part, &entries[i]) {
                (Part::Maker, Entry::Event(Event::Trade(t))) => {
                    encode_into(&mut views, &Fill::new(spec, t, true));
                }
                (Part::Taker, Entry::Event(Event::Trade(t))) => {
                    encode_into(&mut views, &Fill::new(spec, t, false));
                }
                _ => views.extend_from_slice(&journal[spans[i].clone()]),
            }
        }
        groups.push((account, start..views.len()));
    }
    let views = Bytes::from(views);
    let execs = groups
        .into_iter()
        .map(|(account, range)| Outgoing {
            subject: subjects.capture_execs(account, market),
            msg_id: Some(format!("{market}:{last_seq}:x:{account}")),
            payload: views.slice(range),
        })
        .collect();

    let rejects = (!unreadable.is_empty()).then(|| {
        let mut payload = Vec::with_capacity(64 + unreadable.len() * 192);
        write_head(
            &mut payload,
            &[
                ("market", Field::Str(market)),
                ("first_seq", Field::Uint(first_seq)),
                ("last_seq", Field::Uint(last_seq)),
            ],
            "events",
            unreadable.len(),
        );
        for &i in &unreadable {
            payload.extend_from_slice(&journal[spans[i].clone()]);
        }
        Outgoing {
            subject: subjects.rejects(market),
            msg_id: None,
            payload: payload.into(),
        }
    });
    let trades = (!tape.is_empty()).then(|| Outgoing {
        subject: subjects.capture_trades(market),
        msg_id: Some(format!("{market}:{last_seq}:t")),
        payload: encode(&Tape {
            market,
            last_seq,
            trades: tape,
        })
        .into(),
    });
    let changes = top_changes(before, after);
    let book = (!changes.is_empty()).then(|| Outgoing {
        subject: subjects.book(market),
        msg_id: None,
        payload: encode(&BookDelta {
            market,
            seq: last_seq,
            prev_seq: prev_book_seq,
            changes: changes
                .into_iter()
                .map(|(side, l)| LevelChange {
                    side: side.as_str(),
                    price: ShortStr::decimal(l.price.0, spec.price_decimals),
                    qty: ShortStr::decimal(l.qty.0, spec.size_decimals),
                    orders: l.orders,
                })
                .collect(),
        })
        .into(),
    });
    BatchOutputs {
        journal: Outgoing {
            subject: subjects.capture_events(market),
            msg_id: Some(format!("{market}:{last_seq}")),
            payload: journal.into(),
        },
        execs,
        rejects,
        trades,
        book,
    }
}

/// The top `levels` of both sides of `book`.
pub fn top(book: &crate::book::OrderBook, levels: usize) -> Top {
    Top {
        bids: book.depth(Side::Buy, levels),
        asks: book.depth(Side::Sell, levels),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::{
        Account, Cid, Command, MarketSpecInput, NewOrder, Op, OrderBook, OrderRef, Price,
    };

    fn spec() -> MarketSpec {
        MarketSpecInput::new("BTC-USDC", 2, 0)
            .validate()
            .expect("spec")
    }

    fn cmd(seq: u64, account: &str, op: Op) -> Command {
        Command {
            seq,
            pos: 0,
            ts: seq * 10,
            account: Account::new(account).expect("account"),
            op,
        }
    }

    fn limit(side: Side, price: u64, qty: u64, cid: &str) -> Op {
        let mut o = NewOrder::limit(side, Price(price), Qty(qty));
        o.cid = Some(Cid::new(cid).expect("cid"));
        Op::New(o)
    }

    fn decode(payload: &[u8]) -> serde_json::Value {
        rmp_serde::from_slice(payload).expect("valid MessagePack")
    }

    /// Applies commands, returning the batch entries and the top before and after.
    fn run(book: &mut OrderBook, commands: &[Command]) -> (Vec<Entry>, Top, Top) {
        let before = top(book, 10);
        let mut entries = Vec::new();
        let mut events = Vec::new();
        for c in commands {
            events.clear();
            book.apply(c, &mut events);
            entries.extend(events.drain(..).map(Entry::Event));
        }
        (entries, before, top(book, 10))
    }

    #[test]
    fn a_batch_sends_its_journal_reports_tape_and_book() {
        let spec = spec();
        let subjects = Subjects::default();
        let mut book = OrderBook::new(spec.clone());
        let commands = [
            cmd(1, "maker-a", limit(Side::Sell, 10_000, 5, "m1")),
            cmd(2, "maker-a", limit(Side::Sell, 10_100, 5, "m2")),
            cmd(3, "taker-b", limit(Side::Buy, 10_000, 2, "t1")),
            cmd(
                4,
                "maker-a",
                Op::Cancel(OrderRef::Cid(Cid::new("m2").expect("cid"))),
            ),
        ];
        let (entries, before, after) = run(&mut book, &commands);
        let batch = Batch {
            first_seq: 1,
            last_seq: 4,
            entries: &entries,
            before: &before,
            after: &after,
            prev_book_seq: 0,
        };
        let out = build(&subjects, &spec, &batch);

        assert_eq!(out.journal.subject, "agora.capture.events.BTC-USDC");
        assert_eq!(out.journal.msg_id.as_deref(), Some("BTC-USDC:4"));
        let journal = decode(&out.journal.payload);
        let types: Vec<&str> = journal["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["type"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            types,
            ["accepted", "accepted", "accepted", "trade", "cancelled"]
        );
        assert_eq!(journal["first_seq"], 1);
        assert_eq!(journal["last_seq"], 4);

        assert_eq!(out.execs.len(), 2);
        let a = &out.execs[0];
        assert_eq!(a.subject, "agora.capture.execs.maker-a.BTC-USDC");
        assert_eq!(a.msg_id.as_deref(), Some("BTC-USDC:4:x:maker-a"));
        let reports = decode(&a.payload);
        let fill = reports["reports"]
            .as_array()
            .expect("reports")
            .iter()
            .find(|r| r["type"] == "fill")
            .expect("a fill")
            .clone();
        assert_eq!(fill["liquidity"], "maker");
        assert_eq!(fill["side"], "sell");
        assert_eq!(fill["cid"], "m1");
        assert_eq!(fill["price"], "100.00");
        assert_eq!(fill["qty"], "2");
        assert_eq!(fill["leaves"], "3");
        assert_eq!(fill["trade_id"], "3-1");
        // Neither side learns who the other is.
        let a_text = String::from_utf8_lossy(&a.payload);
        assert!(
            !a_text.contains("taker-b") && !a_text.contains("t1"),
            "{reports}"
        );
        let b = &out.execs[1];
        assert_eq!(b.subject, "agora.capture.execs.taker-b.BTC-USDC");
        let b_text = String::from_utf8_lossy(&b.payload);
        assert!(
            !b_text.contains("maker-a") && !b_text.contains("m1"),
            "{}",
            decode(&b.payload)
        );

        let trades = out.trades.expect("a trade happened");
        assert_eq!(trades.msg_id.as_deref(), Some("BTC-USDC:4:t"));
        let tape = decode(&trades.payload);
        assert_eq!(tape["trades"][0]["price"], "100.00");
        assert_eq!(tape["trades"][0]["taker_side"], "buy");
        let tape_text = String::from_utf8_lossy(&trades.payload);
        assert!(!tape_text.contains("maker-a") && !tape_text.contains("taker-b"));

        let delta = decode(&out.book.expect("the book changed").payload);
        assert_eq!(delta["seq"], 4);
        assert_eq!(delta["prev_seq"], 0);
        assert_eq!(delta["changes"].as_array().map(Vec::len), Some(1));
        assert_eq!(delta["changes"][0]["side"], "sell");
        assert_eq!(delta["changes"][0]["price"], "100.00");
        assert_eq!(delta["changes"][0]["qty"], "3");
        assert!(out.rejects.is_none());
    }

    #[test]
    fn the_same_batch_gives_the_same_bytes_and_ids() {
        let spec = spec();
        let subjects = Subjects::default();
        let commands = [
            cmd(1, "a", limit(Side::Sell, 10_000, 5, "x")),
            cmd(2, "b", limit(Side::Buy, 10_000, 1, "y")),
        ];
        let mut one = OrderBook::new(spec.clone());
        let mut two = OrderBook::new(spec.clone());
        let (e1, b1, a1) = run(&mut one, &commands);
        let (e2, b2, a2) = run(&mut two, &commands);
        let x = build(
            &subjects,
            &spec,
            &Batch {
                first_seq: 1,
                last_seq: 2,
                entries: &e1,
                before: &b1,
                after: &a1,
                prev_book_seq: 0,
            },
        );
        let y = build(
            &subjects,
            &spec,
            &Batch {
                first_seq: 1,
                last_seq: 2,
                entries: &e2,
                before: &b2,
                after: &a2,
                prev_book_seq: 0,
            },
        );
        assert_eq!(x.journal, y.journal);
        assert_eq!(x.execs, y.execs);
        assert_eq!(x.trades, y.trades);
        assert_eq!(x.book, y.book);
    }

    #[test]
    fn unreadable_messages_go_to_the_rejects_subject() {
        let spec = spec();
        let reject = WireReject {
            seq: 9,
            pos: 0,
            ts: 90,
            op: None,
            account: None,
            cid: None,
            reason: crate::book::RejectReason::Malformed,
            message: "not a valid MessagePack command".into(),
        };
        let entries = [Entry::Reject(reject)];
        let empty = Top::default();
        let out = build(
            &Subjects::default(),
            &spec,
            &Batch {
                first_seq: 9,
                last_seq: 9,
                entries: &entries,
                before: &empty,
                after: &empty,
                prev_book_seq: 0,
            },
        );
        assert!(out.execs.is_empty());
        let rejects = out.rejects.expect("sent to the rejects subject");
        assert_eq!(rejects.subject, "agora.rejects.BTC-USDC");
        let body = decode(&rejects.payload);
        assert_eq!(body["events"][0]["reason"], "malformed");
        assert_eq!(body["events"][0]["seq"], 9);
        // It is in the journal too.
        assert_eq!(
            decode(&out.journal.payload)["events"][0]["reason"],
            "malformed"
        );
        assert!(out.book.is_none() && out.trades.is_none());
    }

    /// The messages of a batch as they were first built: serde structs encoded whole, a
    /// `String` per decimal, a map of reports per account. `build` must give the same bytes.
    mod reference {
        use super::*;
        use serde::ser::SerializeSeq;
        use std::collections::BTreeMap;

        /// `top_changes` as first written: a map of each side's levels by price, before and
        /// after.
        pub fn top_changes(before: &Top, after: &Top) -> Vec<(Side, L2Level)> {
            let mut changes = Vec::new();
            for (side, old, new) in [
                (Side::Buy, &before.bids, &after.bids),
                (Side::Sell, &before.asks, &after.asks),
            ] {
                let old_map: BTreeMap<u64, &L2Level> = old.iter().map(|l| (l.price.0, l)).collect();
                let new_map: BTreeMap<u64, &L2Level> = new.iter().map(|l| (l.price.0, l)).collect();
                let mut prices: Vec<u64> = old_map.keys().chain(new_map.keys()).copied().collect();
                prices.sort_unstable();
                prices.dedup();
                if side == Side::Buy {
                    prices.reverse();
                }
                for price in prices {
                    match (old_map.get(&price), new_map.get(&price)) {
                        (Some(a), Some(b)) if a == b => {}
                        (_, Some(b)) => changes.push((side, **b)),
                        (Some(a), None) => changes.push((
                            side,
                            L2Level {
                                price: a.price,
                                qty: Qty(0),
                                orders: 0,
                            },
                        )),
                        (None, None) => {}
                    }
                }
            }
            changes
        }

        struct Entries<'a>(&'a MarketSpec, &'a [&'a Entry]);

        impl Serialize for Entries<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.1.len()))?;
                for entry in self.1 {
                    match entry {
                        Entry::Event(e) => seq.serialize_element(&EventView::new(self.0, e))?,
                        Entry::Reject(r) => seq.serialize_element(&RejectView::new(self.0, r))?,
                    }
                }
                seq.end()
            }
        }

        #[derive(Serialize)]
        struct Journal<'a> {
            market: &'a str,
            first_seq: Seq,
            last_seq: Seq,
            events: Entries<'a>,
        }

        #[derive(Serialize)]
        struct OldFill<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            market: &'a str,
            seq: Seq,
            ts: Timestamp,
            trade_id: String,
            oid: u64,
            cid: Option<&'a str>,
            account: &'a str,
            side: &'static str,
            liquidity: &'static str,
            price: String,
            qty: String,
            leaves: String,
        }

        enum Report<'a> {
            Entry(&'a Entry),
            Fill(Box<OldFill<'a>>),
        }

        struct Reports<'a>(&'a MarketSpec, &'a [Report<'a>]);

        impl Serialize for Reports<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.1.len()))?;
                for report in self.1 {
                    match report {
                        Report::Entry(Entry::Event(e)) => {
                            seq.serialize_element(&EventView::new(self.0, e))?
                        }
                        Report::Entry(Entry::Reject(r)) => {
                            seq.serialize_element(&RejectView::new(self.0, r))?
                        }
                        Report::Fill(f) => seq.serialize_element(&**f)?,
                    }
                }
                seq.end()
            }
        }

        #[derive(Serialize)]
        struct ReportBatch<'a> {
            market: &'a str,
            last_seq: Seq,
            reports: Reports<'a>,
        }

        /// Subject, `Nats-Msg-Id` and payload of each execution report.
        pub type Execs = Vec<(String, String, Vec<u8>)>;

        /// The journal, the execution reports and the unreadable messages, as first built.
        pub fn build(
            subjects: &Subjects,
            spec: &MarketSpec,
            batch: &Batch<'_>,
        ) -> (Vec<u8>, Execs, Option<Vec<u8>>) {
            let market = spec.symbol.as_str();
            let all: Vec<&Entry> = batch.entries.iter().collect();
            let journal = rmp_serde::to_vec_named(&Journal {
                market,
                first_seq: batch.first_seq,
                last_seq: batch.last_seq,
                events: Entries(spec, &all),
            })
            .expect("encodes");
            let mut per_account: BTreeMap<&str, Vec<Report<'_>>> = BTreeMap::new();
            let mut unreadable = Vec::new();
            for entry in batch.entries {
                if let Entry::Event(Event::Trade(t)) = entry {
                    let sides = [
                        (&t.maker, t.taker_side.opposite(), true, t.maker_leaves),
                        (&t.taker, t.taker_side, false, t.taker_leaves),
                    ];
                    for (order, side, maker, leaves) in sides {
                        per_account
                            .entry(order.account.as_str())
                            .or_default()
                            .push(Report::Fill(Box::new(OldFill {
                                kind: "fill",
                                market,
                                seq: t.seq,
                                ts: t.ts,
                                trade_id: format!("{}-{}", t.seq, t.trade_n),
                                oid: order.oid.0,
                                cid: order.cid.as_ref().map(|c| c.as_str()),
                                account: order.account.as_str(),
                                side: side.as_str(),
                                liquidity: if maker { "maker" } else { "taker" },
                                price: spec.fmt_price(t.price),
                                qty: spec.fmt_qty(t.qty),
                                leaves: spec.fmt_qty(leaves),
                            })));
                    }
                } else {
                    match account_of(entry) {
                        Some(a) => per_account.entry(a).or_default().push(Report::Entry(entry)),
                        None => unreadable.push(entry),
                    }
                }
            }
            let execs = per_account
                .iter()
                .map(|(account, reports)| {
                    (
                        subjects.capture_execs(account, market),
                        format!("{market}:{}:x:{account}", batch.last_seq),
                        rmp_serde::to_vec_named(&ReportBatch {
                            market,
                            last_seq: batch.last_seq,
                            reports: Reports(spec, reports),
                        })
                        .expect("encodes"),
                    )
                })
                .collect();
            let rejects = (!unreadable.is_empty()).then(|| {
                rmp_serde::to_vec_named(&Journal {
                    market,
                    first_seq: batch.first_seq,
                    last_seq: batch.last_seq,
                    events: Entries(spec, &unreadable),
                })
                .expect("encodes")
            });
            (journal, execs, rejects)
        }
    }

    #[test]
    fn a_batch_gives_the_bytes_the_first_encoding_gave() {
        use crate::workload::{self, FlowParams};
        let w = workload::generate(&FlowParams {
            seed: 11,
            resting: 300,
            spread_ticks: 30,
            commands: 3000,
            accounts: 7,
            full_mix: true,
            young_cancel_pct: 80,
        });
        let subjects = Subjects::default();
        let mut book = OrderBook::new(w.spec.clone());
        let commands: Vec<&Command> = w.prefill.iter().chain(&w.commands).collect();
        let mut at = 0;
        let mut sizes = [1usize, 7, 64, 250, 3].into_iter().cycle();
        let mut batches = 0;
        while at < commands.len() {
            let n = sizes.next().unwrap_or(1).min(commands.len() - at);
            let chunk: Vec<Command> = commands[at..at + n].iter().map(|c| (*c).clone()).collect();
            let (mut entries, before, after) = run(&mut book, &chunk);
            // Decode rejections, with and without an account, among the events.
            let reject = |account: Option<&str>| WireReject {
                seq: chunk[0].seq,
                pos: 1,
                ts: chunk[0].ts,
                op: Some(crate::book::OpKind::New),
                account: account.map(|a| Account::new(a).expect("account")),
                cid: None,
                reason: crate::book::RejectReason::Malformed,
                message: "qty is missing".into(),
            };
            if batches % 3 == 0 {
                entries.insert(entries.len() / 2, Entry::Reject(reject(Some("a-1"))));
                entries.push(Entry::Reject(reject(None)));
            }
            let batch = Batch {
                first_seq: chunk[0].seq,
                last_seq: chunk[n - 1].seq,
                entries: &entries,
                before: &before,
                after: &after,
                prev_book_seq: 0,
            };
            let out = build(&subjects, &w.spec, &batch);
            let (journal, execs, rejects) = reference::build(&subjects, &w.spec, &batch);
            assert_eq!(
                &out.journal.payload[..],
                &journal[..],
                "journal of batch {batches}"
            );
            let got: Vec<(String, String, Vec<u8>)> = out
                .execs
                .iter()
                .map(|o| {
                    (
                        o.subject.clone(),
                        o.msg_id.clone().unwrap_or_default(),
                        o.payload.to_vec(),
                    )
                })
                .collect();
            assert_eq!(got, execs, "reports of batch {batches}");
            assert_eq!(
                out.rejects.map(|o| o.payload.to_vec()),
                rejects,
                "unreadable of batch {batches}"
            );
            at += n;
            batches += 1;
        }
    }

    #[test]
    fn top_changes_report_new_changed_and_gone_levels() {
        let l = |p: u64, q: u64, n: u32| L2Level {
            price: Price(p),
            qty: Qty(q),
            orders: n,
        };
        let before = Top {
            bids: vec![l(100, 5, 1), l(99, 2, 1)],
            asks: vec![l(101, 1, 1)],
        };
        let after = Top {
            bids: vec![l(100, 5, 1), l(98, 4, 2)],
            asks: vec![l(101, 3, 2)],
        };
        let changes = top_changes(&before, &after);
        assert_eq!(
            changes,
            vec![
                (Side::Buy, l(99, 0, 0)),
                (Side::Buy, l(98, 4, 2)),
                (Side::Sell, l(101, 3, 2))
            ]
        );
    }

    #[test]
    fn top_changes_are_the_first_versions() {
        // Seeded tops of up to 6 levels a side out of 10 prices, a few quantities each, so
        // that levels stay, change, appear and go.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut side = |best_first_desc: bool| {
            let mut prices: Vec<u64> = (100..110).filter(|_| next(5) < 3).take(6).collect();
            if best_first_desc {
                prices.reverse();
            }
            prices
                .into_iter()
                .map(|p| L2Level {
                    price: Price(p),
                    qty: Qty(1 + next(3)),
                    orders: 1 + next(2) as u32,
                })
                .collect::<Vec<_>>()
        };
        for _ in 0..2000 {
            let before = Top {
                bids: side(true),
                asks: side(false),
            };
            let after = Top {
                bids: side(true),
                asks: side(false),
            };
            assert_eq!(
                top_changes(&before, &after),
                reference::top_changes(&before, &after),
                "{before:?} -> {after:?}"
            );
        }
    }
}
