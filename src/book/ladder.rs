//! `Ladder`: one side's price levels, in price order, found by price in near-constant time.
//!
//! Levels are addressed by a `key` that grows toward the better price (the tick index for bids,
//! its complement for asks). Keys are grouped in pages of 64; each page has an occupancy bitmap
//! and the level slot of each occupied key. Only the directory of non-empty pages is kept sorted
//! (`directory::Directory`: sorted chunks), so creating a level deep in the book moves at most a
//! chunk of page entries instead of every level above it, and the best level (or the next one)
//! is a bit scan away. A hash index from page id to page finds the page of a price in one probe;
//! the directory is searched only to place a new page or drop an emptied one. Pages and levels
//! live in slabs with free lists: once warm, nothing here allocates. This module must never know
//! about orders beyond the queue heads and totals a level carries.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::directory::Directory;
use super::slab::Slab;

/// Page ids come from the prices clients choose: a per-process random seed, so that no one can
/// precompute ids that collide. The seed decides nothing but where an entry sits in the index.
type PageHasher = foldhash::fast::RandomState;

/// End of an intrusive list, and "no level".
pub(super) const NIL: u32 = u32::MAX;

const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;

/// One price level: its FIFO of orders (by slab index) and its totals.
#[derive(Clone, Copy, Debug)]
pub(super) struct Level {
    pub key: u64,
    pub price: u64,
    /// Sum of shown quantity.
    pub shown: u64,
    /// Sum of leaves (hidden iceberg quantity included).
    pub total: u64,
    pub count: u32,
    pub head: u32,
    pub tail: u32,
    /// Slot of the level's page (pages never move while they hold a level), so removing a
    /// level needs no directory search unless its page empties.
    page: u32,
}

#[derive(Clone, Debug)]
struct Page {
    bits: u64,
    slots: [u32; SLOTS],
}

#[derive(Clone, Debug, Default)]
pub(super) struct Ladder {
    /// `(page id, page slot)` in ascending page id: the best page is last.
    dir: Directory,
    /// `(page id, page slot)` of every page in `dir`, by id: where a price's page is without a
    /// search of `dir` (a binary search over hundreds of pages on a deep book).
    by_id: HashTable<(u64, u32)>,
    hasher: PageHasher,
    pages: Slab<Page>,
    levels: Slab<Level>,
    len: usize,
    /// The best level, kept up to date by `get_or_insert` and `remove`: every taker reads it,
    /// and the match loop once per fill.
    best: Option<u32>,
}

impl Ladder {
    pub fn reserve(&mut self, levels: usize) {
        self.levels.reserve(levels);
        self.levels.reserve_free(levels);
        self.pages.reserve(levels / 4 + 16);
        self.pages.reserve_free(levels / 4 + 16);
        self.dir.reserve(levels / 4 + 16);
        let hasher = &self.hasher;
        self.by_id
            .reserve(levels / 4 + 16, |&(id, _)| hasher.hash_one(id));
    }

    /// Number of levels.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The level with this key.
    #[inline]
    pub fn get(&self, key: u64) -> Option<u32> {
        let p = self.page_of(key >> SLOT_BITS)?;
        let page = &self.pages[p];
        let bit = (key & (SLOTS as u64 - 1)) as u32;
        (page.bits & (1 << bit) != 0).then(|| page.slots[bit as usize])
    }

    #[inline]
    pub fn level(&self, li: u32) -> &Level {
        &self.levels[li]
    }

    /// Asks the CPU to fetch level `li` (a hint).
    #[inline(always)]
    pub fn prefetch_level(&self, li: u32) {
        self.levels.prefetch(li);
    }

    #[inline]
    pub fn level_mut(&mut self, li: u32) -> &mut Level {
        &mut self.levels[li]
    }

    /// The best level.
    #[inline]
    pub fn best(&self) -> Option<u32> {
        self.best
    }

    /// The best level, found from the pages.
    fn find_best(&self) -> Option<u32> {
        let (_, p) = self.dir.last()?;
        let page = &self.pages[p];
        Some(page.slots[(63 - page.bits.leading_zeros()) as usize])
    }

    /// The slot of page `id`, if it holds a level.
    #[inline]
    fn page_of(&self, id: u64) -> Option<u32> {
        self.by_id
            .find(self.hasher.hash_one(id), |&(i, _)| i == id)
            .map(|&(_, p)| p)
    }

    /// The level with this key, created empty if there is none.
    pub fn get_or_insert(&mut self, key: u64, price: u64) -> u32 {
        let id = key >> SLOT_BITS;
        let bit = (key & (SLOTS as u64 - 1)) as usize;
        let hash = self.hasher.hash_one(id);
        let p = match self.by_id.find(hash, |&(i, _)| i == id) {
            Some(&(_, p)) => p,
            None => self.insert_page(id, hash),
        };
        let page = &self.pages[p];
        if page.bits & (1 << bit) != 0 {
            return page.slots[bit];
        }
        let level = Level {
            key,
            price,
            shown: 0,
            total: 0,
            count: 0,
            head: NIL,
            tail: NIL,
            page: p,
        };
        let li = self.levels.insert(level);
        let page = &mut self.pages[p];
        page.bits |= 1 << bit;
        page.slots[bit] = li;
        self.len += 1;
        if self.best.is_none_or(|best| key > self.levels[best].key) {
            self.best = Some(li);
        }
        li
    }

    /// A new, empty page `id` (not yet in the ladder), placed in the directory and the index.
    #[cold]
    fn insert_page(&mut self, id: u64, hash: u64) -> u32 {
        let p = self.pages.insert(Page {
            bits: 0,
            slots: [NIL; SLOTS],
        });
        match self.dir.find(id) {
            Err(at) => self.dir.insert(at, (id, p)),
            Ok(_) => unreachable!("page {id} is in the directory but not in its index"),
        }
        let hasher = &self.hasher;
        self.by_id
            .insert_unique(hash, (id, p), |&(i, _)| hasher.hash_one(i));
        p
    }

    /// Removes the (empty) level in slot `li`.
    pub fn remove(&mut self, li: u32) {
        let level = &self.levels[li];
        let (key, p) = (level.key, level.page);
        let bit = (key & (SLOTS as u64 - 1)) as usize;
        let page = &mut self.pages[p];
        debug_assert!(page.bits & (1 << bit) != 0 && page.slots[bit] == li);
        page.bits &= !(1 << bit);
        page.slots[bit] = NIL;
        let empty = page.bits == 0;
        self.levels.remove(li);
        self.len -= 1;
        if empty {
            let id = key >> SLOT_BITS;
            let Ok(at) = self.dir.find(id) else {
                unreachable!("the page of level {key} is not in the directory");
            };
            self.dir.remove(at);
            let Ok(entry) = self
                .by_id
                .find_entry(self.hasher.hash_one(id), |&(i, _)| i == id)
            else {
                unreachable!("the page of level {key} is not in the index");
            };
            entry.remove();
            self.pages.remove(p);
        }
        if self.best == Some(li) {
            self.best = self.find_best();
        }
    }

    /// Levels from the best down.
    pub fn iter(&self) -> impl Iterator<Item = &Level> + '_ {
        self.dir.iter_rev().flat_map(move |(_, p)| {
            let page = &self.pages[p];
            BitsDown(page.bits).map(move |bit| &self.levels[page.slots[bit as usize]])
        })
    }

    /// Checks that every occupied slot points at a level with the key of its position.
    pub fn check(&self) -> Result<(), String> {
        let mut count = 0;
        self.dir.check()?;
        let listed = self.dir.iter_rev().count();
        if self.by_id.len() != listed {
            return Err(format!(
                "ladder indexes {} pages, lists {listed}",
                self.by_id.len()
            ));
        }
        for (id, p) in self.dir.iter_rev() {
            if self.page_of(id) != Some(p) {
                return Err(format!("ladder page {id} is missing from the index"));
            }
            let page = &self.pages[p];
            if page.bits == 0 {
                return Err(format!("ladder page {id} is empty but listed"));
            }
            for bit in BitsDown(page.bits) {
                let level = &self.levels[page.slots[bit as usize]];
                if level.key != (id << SLOT_BITS) | u64::from(bit) {
                    return Err(format!("level {} sits at the wrong key", level.price));
                }
                if level.page != p {
                    return Err(format!("level {} names the wrong page", level.price));
                }
                count += 1;
            }
        }
        if count != self.len {
            return Err(format!("ladder counts {} levels, holds {count}", self.len));
        }
        if self.best != self.find_best() {
            return Err("ladder's best level is out of date".into());
        }
        Ok(())
    }
}

/// The set bits of a word, highest first.
struct BitsDown(u64);

impl Iterator for BitsDown {
    type Item = u32;
    #[inline]
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let bit = 63 - self.0.leading_zeros();
        self.0 &= !(1u64 << bit);
        Some(bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_levels_in_key_order() {
        let mut ladder = Ladder::default();
        let keys = [5u64, 700, 64, 63, 1 << 40, 6, 65, 4096, 0];
        for &k in &keys {
            let li = ladder.get_or_insert(k, k * 10);
            assert_eq!(ladder.level(li).key, k);
            assert_eq!(ladder.get_or_insert(k, k * 10), li);
        }
        ladder.check().unwrap();
        let mut sorted = keys.to_vec();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let order: Vec<u64> = ladder.iter().map(|l| l.key).collect();
        assert_eq!(order, sorted);
        assert_eq!(ladder.best().map(|li| ladder.level(li).key), Some(1 << 40));
        ladder.remove(ladder.get(1 << 40).unwrap());
        ladder.remove(ladder.get(4096).unwrap());
        assert_eq!(ladder.best().map(|li| ladder.level(li).key), Some(700));
        assert_eq!(ladder.get(64).map(|li| ladder.level(li).price), Some(640));
        assert_eq!(ladder.get(4096), None);
        assert_eq!(ladder.len(), keys.len() - 2);
        ladder.check().unwrap();
    }
}
