//! The reference book's canonical content: its snapshot, the state hash, the restore that
//! refuses an inconsistent snapshot, and the invariants checked after commands in tests.

use super::*;

/// A record as the book keeps it: one from an older build, without a last sequence, has its
/// own order's.
fn with_last_seq(o: &OrderRecord) -> OrderRecord {
    let mut o = o.clone();
    if o.last_seq == 0 {
        o.last_seq = o.oid.seq();
    }
    o
}

impl ReferenceBook {
    pub fn snapshot(&self) -> BookSnapshot {
        let records = |side: Side| -> Vec<OrderRecord> {
            self.levels_by_priority(side)
                .flat_map(|(_, level)| level.iter())
                .map(|oid| self.orders[oid].clone())
                .collect()
        };
        BookSnapshot {
            format_version: SNAPSHOT_FORMAT_VERSION,
            spec: self.spec.clone(),
            halted: self.halted,
            last_trade_price: self.last_trade_price,
            last_input: self.last_input,
            trade_n: self.trade_n,
            bids: records(Side::Buy),
            asks: records(Side::Sell),
            stops: self
                .stops
                .iter()
                .map(|oid| self.orders[oid].clone())
                .collect(),
            cid_window: self.window.iter().copied().collect(),
            rate_clock: self.rate_clock,
            rate_debts: {
                let mut debts: Vec<RateDebt> = self
                    .rate_tat
                    .iter()
                    .filter(|&(_, &tat)| tat > self.rate_clock)
                    .map(|(&account, &tat)| RateDebt { account, tat })
                    .collect();
                debts.sort_by(|a, b| a.account.as_str().cmp(b.account.as_str()));
                debts
            },
        }
    }

    pub fn state_hash(&self) -> StateHash {
        self.snapshot().state_hash()
    }

    /// Rebuilds a book from a snapshot, refusing one that breaks the book's invariants.
    pub fn restore(s: &BookSnapshot) -> Result<ReferenceBook, RestoreError> {
        if s.format_version != SNAPSHOT_FORMAT_VERSION {
            return Err(RestoreError::Version {
                found: s.format_version,
                expected: SNAPSHOT_FORMAT_VERSION,
            });
        }
        let mut book = ReferenceBook::new(s.spec.clone());
        book.halted = s.halted;
        book.last_trade_price = s.last_trade_price;
        book.last_input = s.last_input;
        book.trade_n = s.trade_n;
        s.check_records()?;
        for records in [&s.bids, &s.asks] {
            for o in records {
                book.check_unique(o)?;
                book.insert_resting(with_last_seq(o));
            }
        }
        for o in &s.stops {
            book.check_unique(o)?;
            book.stops.insert(o.oid);
            book.index(o);
            book.orders.insert(o.oid, with_last_seq(o));
        }
        if let (Some(bid), Some(ask)) = (book.best_bid(), book.best_ask())
            && bid >= ask
        {
            return Err(inconsistent(format!(
                "the book is crossed: best bid {} >= best ask {}",
                bid.0, ask.0
            )));
        }
        s.check_cid_window()?;
        for seen in &s.cid_window {
            if !book.window_keys.insert((seen.account, seen.cid)) {
                return Err(inconsistent(format!(
                    "the cid window holds cid {} of {} twice",
                    seen.cid, seen.account
                )));
            }
            book.window.push_back(*seen);
        }
        s.check_rate_limits()?;
        book.rate_clock = s.rate_clock;
        book.rate_tat = s.rate_debts.iter().map(|d| (d.account, d.tat)).collect();
        Ok(book)
    }

    /// An order's oid and its open cid are not taken already (`BookSnapshot::check_records`
    /// has checked each record alone).
    fn check_unique(&self, o: &OrderRecord) -> Result<(), RestoreError> {
        let oid = o.oid;
        if self.orders.contains_key(&oid) {
            return Err(inconsistent(format!("order {oid} appears twice")));
        }
        if let Some(cid) = o.cid
            && self.cids.contains_key(&(o.account, cid))
        {
            return Err(inconsistent(format!(
                "account {} has two open orders with cid {cid}",
                o.account
            )));
        }
        Ok(())
    }

    /// Checks that the book's structures agree with one another; `Err` names the first break.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = 0usize;
        for side in [Side::Buy, Side::Sell] {
            for (&price, level) in self.levels(side) {
                if level.is_empty() {
                    return Err(format!("empty {} level {}", side.as_str(), price.0));
                }
                for oid in level {
                    let Some(o) = self.orders.get(oid) else {
                        return Err(format!("order {oid} in a level is not open"));
                    };
                    if o.side != side || o.price != Some(price) || self.stops.contains(oid) {
                        return Err(format!("order {oid} is in the wrong level"));
                    }
                    let visible_ok = o.visible > Qty::ZERO
                        && o.visible <= o.leaves
                        && match o.display_qty {
                            Some(d) => o.visible <= d,
                            None => o.visible == o.leaves,
                        };
                    if !visible_ok || o.filled.0 + o.leaves.0 != o.qty.0 {
                        return Err(format!("order {oid} has inconsistent quantities"));
                    }
                    seen += 1;
                }
            }
        }
        for oid in &self.stops {
            let stop_ok = self.orders.get(oid).is_some_and(|o| {
                o.order_type.is_stop()
                    && o.filled == Qty::ZERO
                    && o.leaves == o.qty
                    && o.visible == o.leaves
            });
            if !stop_ok {
                return Err(format!("stop {oid} is not a whole open stop order"));
            }
            seen += 1;
        }
        if seen != self.orders.len() {
            return Err(format!(
                "{} open orders but {seen} in levels and stops",
                self.orders.len()
            ));
        }
        if let (Some(bid), Some(ask)) = (self.best_bid(), self.best_ask())
            && bid >= ask
        {
            return Err(format!("crossed at rest: bid {} >= ask {}", bid.0, ask.0));
        }
        let cids = self.orders.values().filter(|o| o.cid.is_some()).count();
        let gtds = self
            .orders
            .values()
            .filter(|o| o.expire_at.is_some())
            .count();
        if cids != self.cids.len() || gtds != self.expiries.len() {
            return Err("the cid or expiry index disagrees with the orders".to_string());
        }
        for (&(account, cid), oid) in &self.cids {
            if !self
                .orders
                .get(oid)
                .is_some_and(|o| o.account == account && o.cid == Some(cid))
            {
                return Err(format!("cid {cid} of {account} points at the wrong order"));
            }
        }
        Ok(())
    }
}
