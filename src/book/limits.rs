//! `RateLimits`: how far ahead of its rate each account is, for the per-account command limit.
//!
//! The rule (book module doc, "per-account limits") is the generic cell rate algorithm in
//! stream time: each account has a theoretical arrival time `tat`; a command at clock `c`
//! passes when `max(tat, c) − c ≤ tolerance` and then moves `tat` to `max(tat, c) + interval`.
//! The clock is the greatest timestamp applied while the limit is on, so it never runs
//! backwards when stream timestamps do (a new stream leader's clock), and an account whose
//! `tat` is at or behind it is exactly an account with no entry: such entries are dropped
//! whenever the table has doubled since the last sweep, and never reach a snapshot or the
//! state hash. This module must never hash a key itself (the book hashes with its seeded
//! hasher) and never allocate once the table has reached its working size.

use hashbrown::HashTable;
use serde::{Deserialize, Serialize};

use super::types::{Account, Timestamp};

/// One account ahead of its rate: the time (stream nanoseconds) its debt runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateDebt {
    pub account: Account,
    pub tat: Timestamp,
}

#[derive(Clone, Debug)]
struct Entry {
    debt: RateDebt,
    hash: u64,
}

/// A command the limit refuses: when the account may send again, in nanoseconds from now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct OverRate {
    pub retry_after: u64,
}

/// A command the limit lets through, to be charged once every other limit agrees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Charge {
    hash: u64,
    tat: Timestamp,
}

#[derive(Clone, Debug, Default)]
pub(super) struct RateLimits {
    /// `(interval, tolerance)` in nanoseconds; `None` when off.
    rate: Option<(u64, u64)>,
    clock: Timestamp,
    table: HashTable<Entry>,
    /// Entries after the last sweep; the next comes when the table has twice as many.
    swept_len: usize,
}

impl RateLimits {
    pub fn new(rate: Option<(u64, u64)>) -> RateLimits {
        let mut r = RateLimits::default();
        r.configure(rate);
        r
    }

    #[inline(always)]
    pub fn is_on(&self) -> bool {
        self.rate.is_some()
    }

    /// A new rate from the next command on; off forgets every debt and the clock.
    pub fn configure(&mut self, rate: Option<(u64, u64)>) {
        self.rate = rate;
        if rate.is_none() {
            self.table.clear();
            self.clock = 0;
            self.swept_len = 0;
        }
    }

    /// Moves the clock to `ts` if later; every applied command calls it while the limit is on.
    #[inline]
    pub fn tick(&mut self, ts: Timestamp) {
        self.clock = self.clock.max(ts);
    }

    pub fn clock(&self) -> Timestamp {
        self.clock
    }

    /// Whether a command of `account` (hashed `hash`) passes now; the debt it would leave
    /// is charged by `charge`.
    pub fn check(&self, account: &Account, hash: u64) -> Result<Charge, OverRate> {
        let Some((interval, tolerance)) = self.rate else {
            return Ok(Charge { hash, tat: 0 });
        };
        let tat = self
            .table
            .find(hash, |e| e.debt.account == *account)
            .map_or(0, |e| e.debt.tat);
        let start = tat.max(self.clock);
        let ahead = start - self.clock;
        if ahead > tolerance {
            return Err(OverRate {
                retry_after: ahead - tolerance,
            });
        }
        Ok(Charge {
            hash,
            tat: start.saturating_add(interval),
        })
    }

    /// Records the debt a passed command leaves.
    pub fn charge(&mut self, account: &Account, charge: Charge) {
        if self.rate.is_none() {
            return;
        }
        let Charge { hash, tat } = charge;
        match self.table.find_mut(hash, |e| e.debt.account == *account) {
            Some(e) => e.debt.tat = tat,
            None => {
                if self.table.len() >= 2 * self.swept_len.max(512) {
                    self.sweep();
                }
                self.table.insert_unique(
                    hash,
                    Entry {
                        debt: RateDebt {
                            account: *account,
                            tat,
                        },
                        hash,
                    },
                    |e| e.hash,
                );
            }
        }
    }

    /// Drops the accounts whose debt has run out (they behave as if never seen).
    fn sweep(&mut self) {
        let clock = self.clock;
        self.table.retain(|e| e.debt.tat > clock);
        self.swept_len = self.table.len();
    }

    /// The accounts still ahead of their rate, by account name: what a snapshot holds.
    pub fn debts(&self) -> Vec<RateDebt> {
        let mut debts: Vec<RateDebt> = self
            .table
            .iter()
            .map(|e| e.debt)
            .filter(|d| d.tat > self.clock)
            .collect();
        debts.sort_by(|a, b| a.account.as_str().cmp(b.account.as_str()));
        debts
    }

    /// Restores the clock and the debts of a snapshot (`hash` is the book's hasher).
    pub fn restore(
        &mut self,
        clock: Timestamp,
        debts: &[RateDebt],
        hash: impl Fn(&Account) -> u64,
    ) {
        self.clock = clock;
        self.table.clear();
        for d in debts {
            let h = hash(&d.account);
            self.table
                .insert_unique(h, Entry { debt: *d, hash: h }, |e| e.hash);
        }
        self.swept_len = self.table.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str) -> Account {
        Account::new(name).expect("account")
    }

    /// 10 a second with a burst of 3: three at once pass, the fourth waits 100 ms, and the
    /// debt is gone once the clock passes it.
    #[test]
    fn the_burst_passes_then_the_rate_holds() {
        let mut r = RateLimits::new(Some((100_000_000, 200_000_000)));
        let a = account("a");
        r.tick(1_000_000_000);
        for _ in 0..3 {
            let c = r.check(&a, 7).expect("within the burst");
            r.charge(&a, c);
        }
        assert_eq!(
            r.check(&a, 7),
            Err(OverRate {
                retry_after: 100_000_000
            })
        );
        r.tick(1_100_000_000);
        let c = r.check(&a, 7).expect("after 100 ms");
        r.charge(&a, c);
        assert_eq!(r.debts().len(), 1);
        r.tick(2_000_000_000);
        assert!(r.debts().is_empty(), "a debt behind the clock is no debt");
        // A clock that would run backwards does not.
        r.tick(1_500_000_000);
        assert_eq!(r.clock(), 2_000_000_000);
    }

    /// Accounts with the same hash are told apart, and a sweep keeps every live debt and
    /// only those.
    #[test]
    fn colliding_accounts_and_sweeps_keep_every_debt() {
        let mut r = RateLimits::new(Some((1_000_000_000, 0)));
        for i in 0..2_000u64 {
            r.tick(10 + i);
            let a = account(&format!("a{i}"));
            let c = r.check(&a, 1).expect("first command");
            r.charge(&a, c);
        }
        assert_eq!(r.debts().len(), 2_000);
        assert!(r.check(&account("a1999"), 1).is_err());
        assert!(r.check(&account("a0"), 1).is_err());
        r.tick(1_000_000_500);
        r.sweep();
        assert_eq!(r.table.len(), 1_509, "the first 491 debts ran out");
        assert_eq!(r.debts().len(), 1_509);
        assert!(r.check(&account("a0"), 1).is_ok());
        assert!(r.check(&account("a500"), 1).is_err());
    }
}
