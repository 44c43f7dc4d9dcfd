//! `SlotIndex`: a hash index from a key to a slab slot, where the key itself lives in the slab.
//!
//! An entry is only the slot (4 bytes), so even a book of a million orders keeps its indexes
//! small enough for the caches. hashbrown's SIMD group probing and its 7-bit control bytes pick
//! the candidates; the caller's `eq` confirms a candidate by looking at the slab. Removal
//! matches the slot itself. This module must never compute a key's hash itself: callers hash
//! with the hasher that fits their keys (a random seed for keys clients choose).
//!
//! Growing is incremental. A full table (more entries than ever, or too many tombstones) is
//! not rehashed in one go, which reads every key from the slab with a cache miss each: 3-4 ms
//! at 57,000 orders, tens of milliseconds at a million, all inside one command. Instead it
//! becomes the `old` table, a fresh table twice the size takes new entries, and each insert
//! copies a chunk of old entries across (`MOVES_PER_INSERT`), walking the old table's buckets
//! in order with a cursor, until it reaches the end; lookups and removals look in both
//! meanwhile. An entry behind the cursor has been copied: it is left where it is (erasing it
//! would cost as much as the copy) and the old table ignores it. Nothing is read at the switch
//! but the allocation of the new table. So `eq` may be shown a slot whose entry was removed
//! since: callers keep removed slots readable (a `Slab` never shrinks) and `eq` only compares.
//!
//! (Measured on the book benchmarks: a hand-written linear-probing table ran fewer instructions
//! but was ~20% slower, and 8-byte entries carrying hash bits ~10% slower on a 100k-order book.)

use hashbrown::HashTable;

/// Old entries copied to the new table with each insert while growing. With the new table at
/// least twice the old one's entries, the copy ends long before the new table fills. Copying
/// many at a time lets their reads of the slab overlap (a few microseconds for 64), and keeps
/// the inserts that pay for it below one in a hundred even while a book is built from empty.
const MOVES_PER_INSERT: usize = 64;

#[derive(Clone, Debug, Default)]
pub(super) struct SlotIndex {
    table: HashTable<u32>,
    /// The table being copied into `table` while growing; its entries at buckets from `cursor`
    /// on are live, those before it copied. Empty (no allocation) when not growing.
    old: HashTable<u32>,
    cursor: usize,
    /// Live entries of `old`: not yet copied, not removed.
    old_live: usize,
    growing: bool,
    /// Address of `table`'s control bytes, learnt from the last insert (0 before one), used
    /// only as a prefetch hint: never read through. A stale value (a table replaced or the
    /// index cloned since) only makes the hint miss until the next insert.
    ctrl: usize,
}

impl SlotIndex {
    /// An index that holds `n` entries before it grows.
    pub fn with_capacity(n: usize) -> SlotIndex {
        SlotIndex {
            table: HashTable::with_capacity(n),
            ..SlotIndex::default()
        }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.table.len() + self.old_live
    }

    /// The slot whose key has this hash and satisfies `eq`.
    #[inline(always)]
    pub fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        match self.table.find(hash, |&s| eq(s)) {
            Some(&s) => Some(s),
            None if self.growing => self.find_old(hash, eq),
            None => None,
        }
    }

    /// A live entry of `old`.
    #[cold]
    fn find_old(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let bucket = self.old.find_bucket_index(hash, |&s| eq(s))?;
        if bucket < self.cursor {
            return None;
        }
        self.old.get_bucket(bucket).copied()
    }

    /// Adds `slot` under `hash` (the caller knows its key is not present); `rehash` gives the
    /// hash of any stored slot, for when the table grows.
    #[inline(always)]
    pub fn insert(&mut self, hash: u64, slot: u32, rehash: impl Fn(u32) -> u64) {
        if self.growing || self.table.len() == self.table.capacity() {
            self.grow_step(&rehash);
        }
        let entry = self.table.insert_unique(hash, slot, |&s| rehash(s));
        // hashbrown keeps bucket i's value at ctrl - (i + 1) * 4.
        let value = std::ptr::from_ref::<u32>(entry.get()) as usize;
        self.ctrl = value + 4 * (entry.bucket_index() + 1);
    }

    /// Asks the CPU to fetch what a lookup of `hash` reads first (the control bytes and the
    /// slot of its home bucket in the live table), so that a lookup a little later finds them
    /// in cache. A hint: nothing is read and nothing changes.
    #[inline(always)]
    pub fn prefetch(&self, hash: u64) {
        if self.ctrl == 0 {
            return;
        }
        let home = (hash as usize) & (self.table.num_buckets() - 1);
        super::prefetch(self.ctrl.wrapping_add(home));
        super::prefetch(self.ctrl.wrapping_sub(4 * (home + 1)));
    }

    /// The first slot stored under a hash whose control bits match `hash`'s, unconfirmed:
    /// what a lookup of `hash` will compare first, for prefetching it.
    #[inline(always)]
    pub fn candidate(&self, hash: u64) -> Option<u32> {
        self.table.iter_hash(hash).next().copied()
    }

    /// Before an insert: starts growing when the table is full, and copies a chunk of old
    /// entries.
    #[cold]
    #[inline(never)]
    fn grow_step(&mut self, rehash: &impl Fn(u32) -> u64) {
        if self.table.len() == self.table.capacity() {
            // Full while still copying (cannot happen with the sizes above, but never grow in
            // one go): finish the copy first.
            while self.growing {
                self.copy_some(rehash);
            }
            let bigger = HashTable::with_capacity((2 * self.table.len()).max(16));
            self.old = std::mem::replace(&mut self.table, bigger);
            self.cursor = 0;
            self.old_live = self.old.len();
            self.growing = true;
        }
        self.copy_some(rehash);
    }

    /// Copies the next `MOVES_PER_INSERT` live entries of `old` into `table`, and frees `old`
    /// at its end. The chunk's keys are read from the slab before any is used, so their cache
    /// misses overlap instead of following one another.
    fn copy_some(&mut self, rehash: &impl Fn(u32) -> u64) {
        let buckets = self.old.num_buckets();
        let mut found = [0u32; MOVES_PER_INSERT];
        let mut k = 0;
        while k < MOVES_PER_INSERT && self.cursor < buckets {
            if let Some(&slot) = self.old.get_bucket(self.cursor) {
                found[k] = slot;
                k += 1;
            }
            self.cursor += 1;
        }
        let mut hashes = [0u64; MOVES_PER_INSERT];
        for (h, &slot) in hashes.iter_mut().zip(&found[..k]) {
            *h = rehash(slot);
        }
        for (&hash, &slot) in hashes.iter().zip(&found[..k]) {
            self.table.insert_unique(hash, slot, |&s| rehash(s));
        }
        self.old_live -= k;
        if self.cursor == buckets {
            debug_assert_eq!(self.old_live, 0);
            self.old = HashTable::new();
            self.cursor = 0;
            self.old_live = 0;
            self.growing = false;
        }
    }

    /// Removes `slot`, stored under `hash`. Returns whether it was there.
    #[inline(always)]
    pub fn remove(&mut self, hash: u64, slot: u32) -> bool {
        if let Ok(entry) = self.table.find_entry(hash, |&s| s == slot) {
            entry.remove();
            return true;
        }
        self.growing && self.remove_old(hash, slot)
    }

    /// Removes a live entry of `old`, so that it is not copied.
    #[cold]
    fn remove_old(&mut self, hash: u64, slot: u32) -> bool {
        let Some(bucket) = self.old.find_bucket_index(hash, |&s| s == slot) else {
            return false;
        };
        if bucket < self.cursor {
            return false;
        }
        if let Ok(entry) = self.old.get_bucket_entry(bucket) {
            entry.remove();
        }
        self.old_live -= 1;
        true
    }

    /// Every slot, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        // The old table's buckets not copied yet (none once growth is over).
        let end = if self.growing {
            self.old.num_buckets()
        } else {
            0
        };
        let old = (self.cursor..end).filter_map(|b| self.old.get_bucket(b).copied());
        self.table.iter().copied().chain(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next state of a 64-bit linear congruential generator (Knuth's MMIX constants).
    fn lcg(x: u64) -> u64 {
        x.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    }

    /// Against a plain map, with hashes forced to collide into few home positions.
    #[test]
    fn agrees_with_a_map_under_collisions() {
        let mut index = SlotIndex::with_capacity(4);
        let mut model = std::collections::HashMap::new();
        let mut x: u64 = 7;
        for step in 0..200_000u64 {
            x = lcg(x);
            let key = (x >> 33) % 500;
            // Few distinct hashes: long runs that wrap around the table end.
            let hash = (key % 37).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 0xffff_ff00;
            let slot = key as u32;
            let found = index.find(hash, |s| s == slot);
            assert_eq!(found.is_some(), model.contains_key(&key), "step {step}");
            if found.is_some() {
                assert!(index.remove(hash, slot));
                model.remove(&key);
            } else {
                index.insert(hash, slot, |s| {
                    (u64::from(s) % 37).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 0xffff_ff00
                });
                model.insert(key, ());
            }
            assert_eq!(index.len(), model.len());
        }
        let mut slots: Vec<u32> = index.iter().collect();
        slots.sort_unstable();
        let mut keys: Vec<u32> = model.keys().map(|&k| k as u32).collect();
        keys.sort_unstable();
        assert_eq!(slots, keys);
    }

    /// No insert rehashes more than one chunk of stored slots, whether the table grows for size or
    /// fills with tombstones, and every slot stays findable while the old table empties.
    #[test]
    fn grows_a_chunk_at_a_time() {
        use std::cell::Cell;
        let hash_of = |s: u32| {
            u64::from(s)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(29)
        };
        let mut index = SlotIndex::default();
        let mut live = std::collections::BTreeSet::new();
        let rehashed = Cell::new(0usize);
        let mut most = 0;
        let mut x: u64 = 11;
        let mut next = 0u32;
        for step in 0..400_000u32 {
            x = lcg(x);
            // Grow to ~100,000, then churn at that size (tombstones), then shrink a little.
            let add = match step {
                0..150_000 => !x.is_multiple_of(4),
                150_000..350_000 => x.is_multiple_of(2),
                _ => x.is_multiple_of(3),
            };
            if add || live.is_empty() {
                let slot = next;
                next += 1;
                rehashed.set(0);
                index.insert(hash_of(slot), slot, |s| {
                    rehashed.set(rehashed.get() + 1);
                    hash_of(s)
                });
                most = most.max(rehashed.get());
                live.insert(slot);
            } else {
                // Remove a live slot picked from the random state (old ones too).
                let pick = (x >> 20) as u32 % next;
                let slot = live
                    .range(pick..)
                    .next()
                    .or_else(|| live.iter().next())
                    .copied();
                let slot = slot.expect("live is not empty");
                assert!(index.remove(hash_of(slot), slot), "step {step}");
                assert!(!index.remove(hash_of(slot), slot), "step {step}");
                live.remove(&slot);
            }
            if step % 997 == 0 {
                for &s in live.iter().step_by(101) {
                    assert_eq!(index.find(hash_of(s), |c| c == s), Some(s), "step {step}");
                }
                assert_eq!(index.find(hash_of(next), |c| c == next), None);
            }
            assert_eq!(index.len(), live.len(), "step {step}");
        }
        assert!(most <= MOVES_PER_INSERT, "an insert rehashed {most} slots");
        let mut slots: Vec<u32> = index.iter().collect();
        slots.sort_unstable();
        assert_eq!(slots, live.into_iter().collect::<Vec<_>>());
    }

    /// As the book uses it: keys live in a slab whose freed slots keep their old key until
    /// taken again, so an entry left behind the cursor names a slot that may hold a removed
    /// key, or a new one. A removed key is never found, a live one always is.
    #[test]
    fn removed_keys_stay_gone_while_growing() {
        let hash_of = |k: u64| k.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17);
        let mut slab: Vec<u64> = Vec::new();
        let mut free: Vec<u32> = Vec::new();
        let mut index = SlotIndex::default();
        let mut live = std::collections::BTreeMap::new();
        let mut removed: Vec<u64> = Vec::new();
        let mut x: u64 = 3;
        let mut next_key = 1u64;
        for step in 0..300_000u32 {
            x = lcg(x);
            if x % 5 < 3 || live.is_empty() {
                let key = next_key;
                next_key += 1;
                let slot = match free.pop() {
                    Some(s) => {
                        slab[s as usize] = key;
                        s
                    }
                    None => {
                        slab.push(key);
                        (slab.len() - 1) as u32
                    }
                };
                let slab_ref = &slab;
                index.insert(hash_of(key), slot, |s| hash_of(slab_ref[s as usize]));
                live.insert(key, slot);
            } else {
                let pick = 1 + (x >> 24) % next_key;
                let (&key, &slot) = live
                    .range(pick..)
                    .next()
                    .or_else(|| live.iter().next())
                    .expect("live");
                assert!(index.remove(hash_of(key), slot), "step {step}");
                live.remove(&key);
                free.push(slot);
                removed.push(key);
                // Its slot still holds it: only the index can say it is gone.
                let found = index.find(hash_of(key), |s| slab[s as usize] == key);
                assert_eq!(found, None, "removed key {key} found at step {step}");
            }
            if step % 499 == 0 {
                let find = |k: u64| index.find(hash_of(k), |s| slab[s as usize] == k);
                for &k in removed.iter().rev().take(50) {
                    assert_eq!(find(k), None, "removed key {k} found at step {step}");
                }
                for (&k, &slot) in live.iter().step_by(97) {
                    assert_eq!(find(k), Some(slot), "live key {k} lost at step {step}");
                }
            }
        }
        assert_eq!(index.len(), live.len());
    }
}
