//! `CidWindow`: the (account, cid) of a market's recent `new` commands, so that a retried `new`
//! is rejected `duplicate_cid` even after the first order closed, and no account's message can
//! make another's be dropped (the window is the book's, keyed by the sender's own account).
//!
//! The rule (book module doc, "cid window"): entries are kept oldest first; before every
//! command those at least `secs` older than its timestamp leave from the front; a `new` with a
//! cid whose (account, cid) is held is a duplicate, otherwise it is added at the back (the
//! oldest leaving first when the window holds `orders` entries). Keys are unique in the window,
//! so the index maps a key to the one position that holds it. Positions are absolute
//! (`head` + offset, kept modulo 2³² in the index), so entries never move in the index when
//! the front leaves. The index is a `SlotIndex`, which grows a chunk an insert, so no command
//! rehashes it whole (reading each entry's hash from the ring, a cache miss each: ~6-11 ms on
//! a window of ~115,000). An entry that leaves is removed from the index: a second random
//! access per `new` once the window is full, a few hundred nanoseconds on the p99. This module must never hash a key itself
//! (the book hashes with its seeded hasher) and never allocate once the window has reached its
//! working size.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::index::SlotIndex;
use super::types::{Account, Cid, Timestamp};

/// One remembered `new`: who, which cid, and its stream timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CidSeen {
    pub account: Account,
    pub cid: Cid,
    pub ts: Timestamp,
}

#[derive(Clone, Debug)]
struct Entry {
    seen: CidSeen,
    hash: u64,
}

#[derive(Clone, Debug, Default)]
pub(super) struct CidWindow {
    /// 0 when the window is off.
    window_ns: u64,
    max: usize,
    entries: VecDeque<Entry>,
    /// Absolute position of `entries[0]`.
    head: u64,
    /// Absolute positions modulo 2³², by the hash of (account, cid), one for each entry.
    index: SlotIndex,
}

impl CidWindow {
    /// A window of `secs` seconds (0: off) holding at most `orders` entries.
    pub fn new(secs: u32, orders: u32) -> CidWindow {
        let mut w = CidWindow::default();
        w.configure(secs, orders);
        w
    }

    #[inline(always)]
    pub fn is_on(&self) -> bool {
        self.window_ns != 0
    }

    /// New limits, from the next command on: off empties the window, a smaller cap forgets
    /// the oldest entries beyond it.
    pub fn configure(&mut self, secs: u32, orders: u32) {
        self.window_ns = u64::from(secs) * 1_000_000_000;
        self.max = orders as usize;
        if self.window_ns == 0 {
            self.entries.clear();
            self.index = SlotIndex::default();
            self.head = 0;
        }
        while self.entries.len() > self.max {
            self.pop_front();
        }
    }

    /// Forgets the entries at least the window older than `ts`.
    #[inline]
    pub fn expire(&mut self, ts: Timestamp) {
        while let Some(front) = self.entries.front() {
            if ts.saturating_sub(front.seen.ts) < self.window_ns {
                break;
            }
            self.pop_front();
        }
    }

    /// The oldest entry leaves, and its index entry with it.
    fn pop_front(&mut self) {
        if let Some(front) = self.entries.pop_front() {
            let removed = self.index.remove(front.hash, self.head as u32);
            debug_assert!(removed, "every entry of the window is in its index");
            self.head += 1;
        }
    }

    /// Whether (account, cid) is held; if not, remembers it at `ts`. `hash` is the book's hash
    /// of (account, cid).
    #[inline]
    pub fn seen_before(&mut self, account: &Account, cid: &Cid, hash: u64, ts: Timestamp) -> bool {
        let (entries, head) = (&self.entries, self.head as u32);
        let held = self.index.find(hash, |p| {
            entries
                .get(p.wrapping_sub(head) as usize)
                .is_some_and(|e| e.seen.cid == *cid && e.seen.account == *account)
        });
        if held.is_some() {
            return true;
        }
        if self.entries.len() >= self.max {
            self.pop_front();
        }
        let position = (self.head + self.entries.len() as u64) as u32;
        self.entries.push_back(Entry {
            seen: CidSeen {
                account: *account,
                cid: *cid,
                ts,
            },
            hash,
        });
        let (entries, head) = (&self.entries, self.head as u32);
        self.index.insert(hash, position, |p| {
            entries
                .get(p.wrapping_sub(head) as usize)
                .map_or(0, |e| e.hash)
        });
        false
    }

    pub fn len(&self) -> usize {
        debug_assert_eq!(self.index.len(), self.entries.len());
        self.entries.len()
    }

    /// The entries, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &CidSeen> + '_ {
        self.entries.iter().map(|e| &e.seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(a: &str, c: &str) -> (Account, Cid) {
        (Account::new(a).unwrap(), Cid::new(c).unwrap())
    }

    /// Against the rule written plainly (a list scanned from the front), with hashes forced to
    /// collide, through expiry, the cap, and reconfiguration.
    #[test]
    fn agrees_with_a_plain_list() {
        const S: u64 = 1_000_000_000;
        let mut w = CidWindow::new(2, 50);
        let mut model: VecDeque<(Account, Cid, Timestamp)> = VecDeque::new();
        let (mut secs, mut max) = (2u64, 50usize);
        let mut x: u64 = 11;
        let mut ts: u64 = 0;
        for step in 0..100_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ts += (x >> 40) % (S / 20);
            if step % 10_000 == 9_999 {
                secs = [0, 1, 3][(step / 10_000 % 3) as usize];
                max = [5, 50, 200][(step / 7_000 % 3) as usize];
                w.configure(secs as u32, max as u32);
                if secs == 0 {
                    model.clear();
                }
                while model.len() > max {
                    model.pop_front();
                }
            }
            if secs > 0 {
                while model
                    .front()
                    .is_some_and(|f| ts.saturating_sub(f.2) >= secs * S)
                {
                    model.pop_front();
                }
            }
            w.expire(ts);
            if secs == 0 {
                assert!(!w.is_on());
                continue;
            }
            let n = (x >> 33) % 120;
            let (account, cid) = key(&format!("a{}", n % 3), &format!("c{n}"));
            let hash = n % 7; // few distinct hashes: every probe meets collisions
            let expected = model.iter().any(|(a, c, _)| *a == account && *c == cid);
            if !expected {
                if model.len() >= max {
                    model.pop_front();
                }
                model.push_back((account, cid, ts));
            }
            assert_eq!(
                w.seen_before(&account, &cid, hash, ts),
                expected,
                "step {step}"
            );
            assert_eq!(w.len(), model.len(), "step {step}");
        }
        let held: Vec<(Account, Cid, Timestamp)> =
            w.iter().map(|s| (s.account, s.cid, s.ts)).collect();
        assert_eq!(held, model.into_iter().collect::<Vec<_>>());
    }
}
