//! `MarketCore`: the pure part of a market actor. Stream messages in (payload, stream sequence,
//! stream timestamp), decoded, stamped, applied to the book; the batch's outgoing messages out.
//!
//! No I/O and no clock: the same messages give the same book and the same outputs on any node,
//! which is what makes recovery by replay and republishing with the same `Nats-Msg-Id`s work.
//! This module must never publish, wait, or read anything but its arguments.

use crate::book::{Event, MarketSpec, OrderBook, Seq, Timestamp};
use crate::bus::Subjects;
use crate::bus::outputs::{self, Batch, BatchOutputs, Entry};
use crate::wire::{self, DecodeContext};

/// Levels per side that L2 deltas cover.
pub const TOP_LEVELS_DEFAULT: usize = 50;

/// One message of the market's order stream.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// Its stream sequence.
    pub seq: Seq,
    /// The stream's timestamp of it, in nanoseconds.
    pub ts: Timestamp,
    pub payload: Vec<u8>,
    /// Sent with `Content-Type: application/json`; MessagePack otherwise.
    pub json: bool,
    /// Published on the operators' subject (`<prefix>.admin.<MARKET>`), not the orders one.
    pub operator: bool,
}

pub struct MarketCore {
    subjects: Subjects,
    book: OrderBook,
    events: Vec<Event>,
    batch_max: u16,
    top_levels: usize,
    /// Stream sequence of the last message applied.
    last_seq: Seq,
    /// `seq` of the last L2 delta built.
    book_seq: Seq,
}

impl MarketCore {
    pub fn new(subjects: Subjects, spec: MarketSpec, batch_max: u16) -> MarketCore {
        MarketCore {
            subjects,
            book: OrderBook::new(spec),
            events: Vec::with_capacity(256),
            batch_max,
            top_levels: TOP_LEVELS_DEFAULT,
            last_seq: 0,
            book_seq: 0,
        }
    }

    pub fn book(&self) -> &OrderBook {
        &self.book
    }

    pub fn spec(&self) -> &MarketSpec {
        self.book.spec()
    }

    /// Stream sequence of the last message applied (0 before any).
    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }

    /// Decodes and applies one message, appending what it produced to `entries`.
    fn apply(&mut self, msg: &Incoming, entries: &mut Vec<Entry>) {
        let spec = self.book.spec().clone();
        let ctx = DecodeContext {
            spec: &spec,
            seq: msg.seq,
            ts: msg.ts,
            default_account: None,
            batch_max: self.batch_max,
            operator: msg.operator,
        };
        for decoded in wire::decode(&msg.payload, msg.json, &ctx) {
            match decoded {
                Ok(cmd) => {
                    self.events.clear();
                    self.book.apply(&cmd, &mut self.events);
                    entries.extend(self.events.drain(..).map(Entry::Event));
                }
                Err(reject) => entries.push(Entry::Reject(reject)),
            }
        }
        self.last_seq = self.last_seq.max(msg.seq);
    }

    /// Applies messages already processed before (recovery), building nothing.
    pub fn replay(&mut self, msgs: &[Incoming]) {
        let mut scratch = Vec::new();
        for msg in msgs {
            scratch.clear();
            self.apply(msg, &mut scratch);
        }
    }

    /// Applies a batch and builds everything it sends. Returns `None` for an empty batch.
    pub fn process(&mut self, msgs: &[Incoming]) -> Option<BatchOutputs> {
        let first = msgs.first()?.seq;
        let before = outputs::top(&self.book, self.top_levels);
        let mut entries = Vec::with_capacity(msgs.len() * 2);
        for msg in msgs {
            self.apply(msg, &mut entries);
        }
        let after = outputs::top(&self.book, self.top_levels);
        let out = outputs::build(
            &self.subjects,
            self.book.spec(),
            &Batch {
                first_seq: first,
                last_seq: self.last_seq,
                entries: &entries,
                before: &before,
                after: &after,
                prev_book_seq: self.book_seq,
            },
        );
        if out.book.is_some() {
            self.book_seq = self.last_seq;
        }
        Some(out)
    }
}
