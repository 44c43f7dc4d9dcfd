//! The state hash: one 64-bit value over a book's canonical content (the spec, the market
//! state, every open order in canonical order, the cid window and the account limits when the
//! market has them), stable across machines, Rust versions and serde formats. Two books with
//! the same hash are the same book; the cluster compares hashes across nodes on moves, and a
//! snapshot stores the hash of what it holds, which its restore checks.
//!
//! Two versions, fed the same content in the same order (`StateHasher`):
//! - `Fnv1`: FNV-1a 64 over a fixed byte layout, one byte at a time. Each byte waits for the
//!   multiplication of the byte before, ~130 bytes an order: ~170 ns an order here, 3.4 ms for
//!   a book of 20,000, every time a snapshot is written and every time one is restored.
//!   Snapshots of format version 1 hold it, so it stays to check them.
//! - `Words2`: a 64-bit word at a time. Each order is digested alone, with its place (behind
//!   which order in its queue, or a stop), and the book's value takes the count and the sum of
//!   the digests: no order of the orders is needed, so a live book reads them as they lie in
//!   memory instead of following each queue's links, a cache miss an order on a book bigger
//!   than the cache; and consecutive digests overlap on the CPU. Also covers an order's `ts`
//!   and `last_seq`, which `Fnv1` left out to keep the hashes of older snapshots. A step is
//!   `(h.rotate_left(23) ^ w) * K` with an odd `K`: for a given `h` a bijection of the word,
//!   for a given word a bijection of `h`, so content differing in one word never gives the same
//!   digest; digests end with murmur3's finalizer, so a sum of them mixes every bit.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::cid_window::CidSeen;
use super::limits::RateDebt;
use super::num::Price;
use super::snapshot::OrderRecord;
use super::spec::MarketSpec;
use super::types::{OrderType, Seq, Side, StpMode, Tif, Timestamp};

/// A stable 64-bit hash of a book's canonical content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StateHash(pub u64);

impl fmt::Display for StateHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// How a state hash is computed (the module doc says each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashVersion {
    Fnv1,
    Words2,
}

impl HashVersion {
    /// What this build computes for everything it hashes and stores.
    pub const CURRENT: HashVersion = HashVersion::Words2;
}

/// What a state hash is fed with. The content is the same in every version; how each value
/// becomes bits is the version's.
pub(super) trait Digest {
    fn u64(&mut self, v: u64);
    /// A string's length, then its bytes.
    fn str(&mut self, s: &[u8]);
    fn opt(&mut self, v: Option<u64>);
    fn value(self) -> u64;
}

pub(super) struct Fnv(u64);

impl Fnv {
    pub(super) fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn order(&mut self, o: &OrderRecord) {
        self.u64(o.oid.0);
        self.str(o.account.as_bytes());
        self.str(o.cid.as_ref().map_or(&[], |c| c.as_bytes()));
        self.str(o.side.as_str().as_bytes());
        self.str(o.order_type.as_str().as_bytes());
        self.str(o.tif.as_str().as_bytes());
        self.opt(o.price.map(|p| p.0));
        self.opt(o.stop_price.map(|p| p.0));
        self.u64(o.qty.0);
        self.u64(o.filled.0);
        self.u64(o.leaves.0);
        self.u64(o.visible.0);
        self.opt(o.display_qty.map(|q| q.0));
        self.opt(o.expire_at);
        self.str(o.stp.as_str().as_bytes());
    }
}

impl Digest for Fnv {
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn str(&mut self, s: &[u8]) {
        self.u64(s.len() as u64);
        self.bytes(s);
    }
    fn opt(&mut self, v: Option<u64>) {
        match v {
            None => self.bytes(&[0]),
            Some(v) => {
                self.bytes(&[1]);
                self.u64(v);
            }
        }
    }
    fn value(self) -> u64 {
        self.0
    }
}

pub(super) struct Words(u64);

/// Odd (the step is a bijection of `h`), with bits spread over the whole word.
const WORDS_K: u64 = 0x9e37_79b9_7f4a_7c15;
const WORDS_SEED: u64 = 0x6a09_e667_f3bc_c908;
const WORDS_ORDER_SEED: u64 = 0xbb67_ae85_84ca_a73b;
/// What an order without a cid feeds where a cid's length goes: no string is that long.
const NO_CID: u64 = u64::MAX;

impl Words {
    pub(super) fn new() -> Words {
        Words(WORDS_SEED)
    }
}

impl Digest for Words {
    #[inline(always)]
    fn u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(23) ^ v).wrapping_mul(WORDS_K);
    }
    /// The length, then the bytes eight at a time, little-endian, the last word padded with
    /// zeros (the length says where the string ends).
    #[inline(always)]
    fn str(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.u64(u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.u64(u64::from_le_bytes(word));
        }
    }
    #[inline(always)]
    fn opt(&mut self, v: Option<u64>) {
        match v {
            None => self.u64(0),
            Some(v) => {
                self.u64(1);
                self.u64(v);
            }
        }
    }
    fn value(self) -> u64 {
        fmix64(self.0)
    }
}

/// murmur3's 64-bit finalizer: every bit of the value depends on every bit of the input, and
/// it is a bijection.
#[inline(always)]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// An order's side, type, time in force and self-trade prevention as one word, a byte each,
/// by codes fixed here (not the enums' own numbers, which may change).
fn kinds(o: &OrderRecord) -> u64 {
    let side = match o.side {
        Side::Buy => 1,
        Side::Sell => 2,
    };
    let order_type = match o.order_type {
        OrderType::Limit => 1,
        OrderType::Market => 2,
        OrderType::StopLimit => 3,
        OrderType::StopMarket => 4,
    };
    let tif = match o.tif {
        Tif::Gtc => 1,
        Tif::Ioc => 2,
        Tif::Fok => 3,
        Tif::Gtd => 4,
        Tif::PostOnly => 5,
    };
    let stp = match o.stp {
        StpMode::None => 1,
        StpMode::CancelNewest => 2,
        StpMode::CancelOldest => 3,
        StpMode::CancelBoth => 4,
        StpMode::DecrementAndCancel => 5,
    };
    side | order_type << 8 | tif << 16 | stp << 24
}

/// Where an order is, for `Words2`: resting behind the order `prev` (`None`: at the head of
/// its level), or a stop waiting for its trigger. With the order's side and price this places
/// it in its queue, so a book's orders can be fed in any order.
#[derive(Clone, Copy, Debug)]
pub(super) enum Place {
    Rests { prev: Option<u64> },
    Stop,
}

/// A book's orders for `Words2`: how many, and the sum of each one's digest (its fields and
/// its place). A sum does not depend on the order the orders come in, so a live book feeds
/// them as they lie in memory; a different order, or one placed elsewhere in a queue, changes
/// its digest and so the sum.
#[derive(Debug, Default)]
pub(super) struct OrderSet {
    count: u64,
    sum: u64,
}

impl OrderSet {
    #[inline]
    pub(super) fn add(&mut self, o: &OrderRecord, at: Place) {
        let mut d = Words(WORDS_ORDER_SEED);
        d.u64(o.oid.0);
        d.str(o.account.as_bytes());
        match &o.cid {
            Some(c) => d.str(c.as_bytes()),
            None => d.u64(NO_CID),
        }
        d.u64(kinds(o));
        d.opt(o.price.map(|p| p.0));
        d.opt(o.stop_price.map(|p| p.0));
        d.u64(o.qty.0);
        d.u64(o.filled.0);
        d.u64(o.leaves.0);
        d.u64(o.visible.0);
        d.opt(o.display_qty.map(|q| q.0));
        d.opt(o.expire_at);
        d.u64(o.ts);
        d.u64(o.last_seq);
        match at {
            Place::Rests { prev } => {
                d.u64(1);
                d.opt(prev);
            }
            Place::Stop => d.u64(2),
        }
        self.count += 1;
        self.sum = self.sum.wrapping_add(d.value());
    }
}

/// The state hash, fed part by part in canonical order: the head (`new`), the bids, asks and
/// stops (`orders`, in that order), then the cid window and the account limits (`finish`). A
/// snapshot feeds it from its records; a live book from its own structures, one order at a
/// time, without first copying itself into a snapshot. Both must give the same value: the
/// cluster compares hashes across nodes and stores them with snapshots.
pub(super) struct StateHasher<'a, D> {
    h: D,
    spec: &'a MarketSpec,
}

impl<'a, D: Digest> StateHasher<'a, D> {
    pub(super) fn new(
        mut h: D,
        spec: &'a MarketSpec,
        halted: bool,
        last_trade_price: Option<Price>,
        last_input: Option<(Seq, u16)>,
        trade_n: u32,
    ) -> StateHasher<'a, D> {
        let s = spec;
        h.str(s.symbol.as_bytes());
        h.str(s.base_token.as_bytes());
        h.str(s.quote_token.as_bytes());
        h.u64(u64::from(s.price_decimals));
        h.u64(u64::from(s.size_decimals));
        h.u64(s.tick.0);
        h.u64(s.lot.0);
        h.u64(s.min_qty.0);
        h.opt(s.max_qty.map(|q| q.0));
        h.opt(s.price_band_bps.map(u64::from));
        h.str(s.stp_default.as_str().as_bytes());
        h.u64(u64::from(s.orders_max));
        h.u64(u64::from(halted));
        h.opt(last_trade_price.map(|p| p.0));
        h.opt(last_input.map(|(seq, _)| seq));
        h.opt(last_input.map(|(_, pos)| u64::from(pos)));
        h.u64(u64::from(trade_n));
        StateHasher { h, spec }
    }

    pub(super) fn finish<'c>(
        mut self,
        cid_window_len: usize,
        cid_window: impl Iterator<Item = &'c CidSeen>,
        rate_clock: Timestamp,
        rate_debts: &[RateDebt],
    ) -> StateHash {
        let (h, s) = (&mut self.h, self.spec);
        // Only a market with a cid window hashes it, so books without one (every book of
        // older builds) keep their hashes.
        if s.cid_window_secs > 0 {
            h.str(b"cid_window");
            h.u64(u64::from(s.cid_window_secs));
            h.u64(u64::from(s.cid_window_orders));
            h.u64(cid_window_len as u64);
            for seen in cid_window {
                h.str(seen.account.as_bytes());
                h.str(seen.cid.as_bytes());
                h.u64(seen.ts);
            }
        }
        // Likewise the per-account limits, only when a market has them.
        if s.account_rate > 0 || s.account_orders_max > 0 {
            h.str(b"account_limits");
            h.u64(u64::from(s.account_rate));
            h.u64(u64::from(s.account_burst));
            h.u64(u64::from(s.account_orders_max));
            h.u64(rate_clock);
            h.u64(rate_debts.len() as u64);
            for d in rate_debts {
                h.str(d.account.as_bytes());
                h.u64(d.tat);
            }
        }
        StateHash(self.h.value())
    }
}

impl StateHasher<'_, Fnv> {
    /// One list of orders: `tag` ("bids", "asks", "stops"), how many, and each in order.
    pub(super) fn orders<R: std::borrow::Borrow<OrderRecord>>(
        &mut self,
        tag: &str,
        len: usize,
        orders: impl Iterator<Item = R>,
    ) {
        self.h.str(tag.as_bytes());
        self.h.u64(len as u64);
        for o in orders {
            self.h.order(o.borrow());
        }
    }
}

impl StateHasher<'_, Words> {
    /// Every order of the book (`Words2`): resting on either side and stops alike.
    pub(super) fn order_set(&mut self, set: OrderSet) {
        self.h.str(b"orders");
        self.h.u64(set.count);
        self.h.u64(set.sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::BookSnapshot;
    use crate::workload::{self, FlowParams};

    fn snapshot() -> BookSnapshot {
        let mut params = FlowParams::large_book(7, 0);
        params.resting = 2_000;
        params.spread_ticks = 50;
        workload::generate(&params).prefilled_book().snapshot()
    }

    fn both(s: &BookSnapshot) -> (StateHash, StateHash) {
        (
            s.state_hash_as(HashVersion::Fnv1),
            s.state_hash_as(HashVersion::Words2),
        )
    }

    #[test]
    fn each_version_sees_a_queue_reordered_and_an_order_changed() {
        let base = snapshot();
        let (fnv, words) = both(&base);
        assert_ne!(fnv, words);

        // Two orders of one level trade places in its queue.
        let at = base
            .bids
            .windows(2)
            .position(|w| w[0].price == w[1].price)
            .expect("a level of two bids");
        let mut swapped = base.clone();
        swapped.bids.swap(at, at + 1);
        let (f, w) = both(&swapped);
        assert_ne!(f, fnv);
        assert_ne!(w, words);

        // The head of a level goes to its back.
        let level = base.bids[at].price;
        let end = at
            + base.bids[at..]
                .iter()
                .take_while(|o| o.price == level)
                .count();
        let mut rotated = base.clone();
        rotated.bids[at..end].rotate_left(1);
        assert_ne!(both(&rotated).1, words);

        // One lot more on one order.
        let mut more = base.clone();
        more.asks[3].qty.0 += 1;
        let (f, w) = both(&more);
        assert_ne!(f, fnv);
        assert_ne!(w, words);

        // The time an order was accepted: `Words2` covers it, `Fnv1` never did.
        let mut later = base.clone();
        later.bids[0].ts += 1;
        let (f, w) = both(&later);
        assert_eq!(f, fnv);
        assert_ne!(w, words);

        // An order without its cid.
        let mut cid = base.clone();
        let with = cid
            .bids
            .iter()
            .position(|o| o.cid.is_some())
            .expect("a cid");
        cid.bids[with].cid = None;
        assert_ne!(both(&cid).1, words);
    }

    #[test]
    fn words_pad_strings_and_tell_their_lengths_apart() {
        let hash = |parts: &[&[u8]]| {
            let mut h = Words::new();
            for p in parts {
                h.str(p);
            }
            h.value()
        };
        assert_ne!(hash(&[b"ab", b"c"]), hash(&[b"a", b"bc"]));
        assert_ne!(hash(&[b"abcdefgh"]), hash(&[b"abcdefgh\0"]));
        assert_ne!(hash(&[b""]), hash(&[]));
        assert_eq!(hash(&[b"abcdefghi"]), hash(&[b"abcdefghi"]));
    }
}
