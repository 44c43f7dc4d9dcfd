//! What one processed input batch sends out: the journal message, then the derived views
//! (execution reports per account, the public trade tape, L2 deltas). Pure: events in, messages
//! (subject, `Nats-Msg-Id`, MessagePack payload) out; the market actor publishes them.
//!
//! Msg-Ids derive from (market, last input sequence of the batch, what the message is), never
//! from a counter, so a new owner that republishes the last batches produces the same ids and
//! JetStream drops the duplicates. An execution report tells an account about its own orders
//! only: a fill names the account's own side, never the counterparty. The tape names no account
//! and no order. This module must never publish, and never reorder a batch's events.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::ser::SerializeSeq;

use super::subjects::Subjects;
use crate::book::{Event, L2Level, MarketSpec, OrderTag, Qty, Seq, Side, Timestamp, Trade};
use crate::wire::{EventView, RejectView, WireReject};

/// One entry of a batch, in input order: a book event, or a message that did not decode.
#[derive(Clone, Debug)]
pub enum Entry {
    Event(Event),
    Reject(WireReject),
}

/// A message to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    /// `Nats-Msg-Id` for JetStream subjects; `None` for core NATS (L2 deltas).
    pub msg_id: Option<String>,
    pub payload: Vec<u8>,
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

struct Entries<'a> {
    spec: &'a MarketSpec,
    entries: &'a [Entry],
}

impl Serialize for Entries<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.entries.len()))?;
        for entry in self.entries {
            match entry {
                Entry::Event(e) => seq.serialize_element(&EventView::new(self.spec, e))?,
                Entry::Reject(r) => seq.serialize_element(&RejectView::new(self.spec, r))?,
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

/// One side of a fill, as its own account sees it.
#[derive(Serialize)]
struct Fill<'a> {
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
    Event(&'a Event),
    Reject(&'a WireReject),
    Fill {
        trade: &'a Trade,
        order: &'a OrderTag,
        side: Side,
        maker: bool,
        leaves: Qty,
    },
}

struct Reports<'a> {
    spec: &'a MarketSpec,
    reports: &'a [Report<'a>],
}

impl Serialize for Reports<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let spec = self.spec;
        let mut seq = s.serialize_seq(Some(self.reports.len()))?;
        for report in self.reports {
            match report {
                Report::Event(e) => seq.serialize_element(&EventView::new(spec, e))?,
                Report::Reject(r) => seq.serialize_element(&RejectView::new(spec, r))?,
                Report::Fill {
                    trade,
                    order,
                    side,
                    maker,
                    leaves,
                } => seq.serialize_element(&Fill {
                    kind: "fill",
                    market: &spec.symbol,
                    seq: trade.seq,
                    ts: trade.ts,
                    trade_id: format!("{}-{}", trade.seq, trade.trade_n),
                    oid: order.oid.0,
                    cid: order.cid.as_ref().map(|c| c.as_str()),
                    account: order.account.as_str(),
                    side: side.as_str(),
                    liquidity: if *maker { "maker" } else { "taker" },
                    price: spec.fmt_price(trade.price),
                    qty: spec.fmt_qty(trade.qty),
                    leaves: spec.fmt_qty(*leaves),
                })?,
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

#[derive(Serialize)]
struct TapeTrade {
    trade_id: String,
    ts: Timestamp,
    price: String,
    qty: String,
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
    price: String,
    /// Shown quantity now at the price; "0" when the level is gone from the top.
    qty: String,
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

fn encode(value: &impl Serialize) -> Vec<u8> {
    // Encoding plain maps of strings and integers into a Vec cannot fail.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

/// The changes between two tops of book, per side: new or changed levels with their state,
/// levels gone with quantity 0. Best prices first on each side, bids before asks.
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

/// Builds the messages of one batch.
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
    let journal = Outgoing {
        subject: subjects.events(market),
        msg_id: Some(format!("{market}:{last_seq}")),
        payload: encode(&Journal {
            market,
            first_seq,
            last_seq,
            events: Entries { spec, entries },
        }),
    };

    // Reports per account, in batch order; accounts in name order for stable output.
    let mut per_account: BTreeMap<&str, Vec<Report<'_>>> = BTreeMap::new();
    let mut unreadable: Vec<&WireReject> = Vec::new();
    let mut tape = Vec::new();
    for entry in entries {
        match entry {
            Entry::Event(Event::Trade(t)) => {
                // One report per side, each to its own account.
                let sides = [
                    (&t.maker, t.taker_side.opposite(), true, t.maker_leaves),
                    (&t.taker, t.taker_side, false, t.taker_leaves),
                ];
                for (order, side, maker, leaves) in sides {
                    per_account
                        .entry(order.account.as_str())
                        .or_default()
                        .push(Report::Fill {
                            trade: t,
                            order,
                            side,
                            maker,
                            leaves,
                        });
                }
                tape.push(TapeTrade {
                    trade_id: format!("{}-{}", t.seq, t.trade_n),
                    ts: t.ts,
                    price: spec.fmt_price(t.price),
                    qty: spec.fmt_qty(t.qty),
                    taker_side: t.taker_side.as_str(),
                });
            }
            Entry::Event(e) => {
                let account = match e {
                    Event::Accepted(x) => x.order.account.as_str(),
                    Event::Rejected(x) => x.account.as_str(),
                    Event::Cancelled(x) => x.order.account.as_str(),
                    Event::Amended(x) => x.order.account.as_str(),
                    Event::Triggered(x) => x.order.account.as_str(),
                    Event::Trade(_) => continue,
                };
                per_account
                    .entry(account)
                    .or_default()
                    .push(Report::Event(e));
            }
            Entry::Reject(r) => match &r.account {
                Some(a) => per_account
                    .entry(a.as_str())
                    .or_default()
                    .push(Report::Reject(r)),
                None => unreadable.push(r),
            },
        }
    }
    let execs = per_account
        .iter()
        .map(|(account, reports)| Outgoing {
            subject: subjects.execs(account, market),
            msg_id: Some(format!("{market}:{last_seq}:x:{account}")),
            payload: encode(&ReportBatch {
                market,
                last_seq,
                reports: Reports { spec, reports },
            }),
        })
        .collect();
    let rejects = (!unreadable.is_empty()).then(|| {
        let entries: Vec<Entry> = unreadable
            .iter()
            .map(|r| Entry::Reject((*r).clone()))
            .collect();
        Outgoing {
            subject: subjects.rejects(market),
            msg_id: None,
            payload: encode(&Journal {
                market,
                first_seq,
                last_seq,
                events: Entries {
                    spec,
                    entries: &entries,
                },
            }),
        }
    });
    let trades = (!tape.is_empty()).then(|| Outgoing {
        subject: subjects.trades(market),
        msg_id: Some(format!("{market}:{last_seq}:t")),
        payload: encode(&Tape {
            market,
            last_seq,
            trades: tape,
        }),
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
                    price: spec.fmt_price(l.price),
                    qty: spec.fmt_qty(l.qty),
                    orders: l.orders,
                })
                .collect(),
        }),
    });
    BatchOutputs {
        journal,
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

        assert_eq!(out.journal.subject, "agora.events.BTC-USDC");
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
        assert_eq!(a.subject, "agora.execs.maker-a.BTC-USDC");
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
        assert_eq!(b.subject, "agora.execs.taker-b.BTC-USDC");
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
}
