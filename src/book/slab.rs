//! `Slab`: values in a `Vec`, addressed by a `u32` slot, with a free list, so a removed value's
//! slot is taken by the next insert and nothing allocates once the slab has reached its working
//! size. The book keeps its orders, its accounts, each ladder's levels and pages, and the parts
//! of an order that most orders lack (a cid; a stop price, an iceberg peak or an expiry) in
//! slabs, so the order itself stays small and every link between them is a `u32`. This module
//! must never hand out a slot twice while it is in use.

#[derive(Clone, Debug)]
pub(super) struct Slab<T> {
    items: Vec<T>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// Room for `n` more values before the slab grows (exactly: a node restores thousands of
    /// books, each sized to its snapshot and an eighth more).
    pub fn reserve(&mut self, n: usize) {
        self.items.reserve_exact(n);
    }

    /// Room for `n` freed slots before the free list grows.
    pub fn reserve_free(&mut self, n: usize) {
        self.free.reserve(n);
    }

    /// Values the slab holds before it grows.
    pub fn capacity(&self) -> usize {
        self.items.capacity()
    }

    /// Stores `value` in a free slot, or a new one.
    #[inline]
    pub fn insert(&mut self, value: T) -> u32 {
        match self.free.pop() {
            Some(slot) => {
                self.items[slot as usize] = value;
                slot
            }
            None => {
                self.items.push(value);
                (self.items.len() - 1) as u32
            }
        }
    }

    /// Frees `slot` (which must be in use); its value stays until the slot is taken again.
    #[inline]
    pub fn remove(&mut self, slot: u32) {
        self.free.push(slot);
    }

    #[inline(always)]
    pub fn get(&self, slot: u32) -> &T {
        &self.items[slot as usize]
    }

    #[inline(always)]
    pub fn get_mut(&mut self, slot: u32) -> &mut T {
        &mut self.items[slot as usize]
    }

    /// The value in `slot`, if the slab has reached it.
    #[inline(always)]
    pub fn try_get(&self, slot: u32) -> Option<&T> {
        self.items.get(slot as usize)
    }

    /// Asks the CPU to fetch `slot`'s value (a hint: any slot, nothing read).
    #[inline(always)]
    pub fn prefetch(&self, slot: u32) {
        super::prefetch(self.items.as_ptr().wrapping_add(slot as usize) as usize);
    }

    /// Asks the CPU to fetch the slots the next two inserts take.
    #[inline(always)]
    pub fn prefetch_free(&self) {
        let n = self.free.len();
        if n > 0 {
            self.prefetch(self.free[n - 1]);
        }
        if n > 1 {
            self.prefetch(self.free[n - 2]);
        }
    }

    /// Values in use.
    pub fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }

    /// Every value in use with its slot, in slot order: memory order, which the CPU reads
    /// ahead of the loop, unlike links between values. Allocates a bit a slot to know the free
    /// ones (for a walk of the whole slab, never on a command's path).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> + '_ {
        let mut free = vec![0u64; self.items.len().div_ceil(64)];
        for &slot in &self.free {
            free[slot as usize / 64] |= 1 << (slot % 64);
        }
        self.items
            .iter()
            .enumerate()
            .filter(move |&(i, _)| free[i / 64] & (1 << (i % 64)) == 0)
            .map(|(i, v)| (i as u32, v))
    }
}

impl<T> std::ops::Index<u32> for Slab<T> {
    type Output = T;
    #[inline(always)]
    fn index(&self, slot: u32) -> &T {
        self.get(slot)
    }
}

impl<T> std::ops::IndexMut<u32> for Slab<T> {
    #[inline(always)]
    fn index_mut(&mut self, slot: u32) -> &mut T {
        self.get_mut(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_freed_slots_and_keeps_the_others() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        let c = s.insert("c");
        s.remove(b);
        assert_eq!(s.len(), 2);
        let d = s.insert("d");
        assert_eq!(d, b, "the freed slot is taken first");
        assert_eq!((*s.get(a), *s.get(d), *s.get(c)), ("a", "d", "c"));
        assert_eq!(s.insert("e"), 3);
        assert_eq!(s.len(), 4);
        s.remove(a);
        let used: Vec<_> = s.iter().map(|(slot, v)| (slot, *v)).collect();
        assert_eq!(used, [(1, "d"), (2, "c"), (3, "e")]);
    }
}
