//! `Directory`: the ladder's sorted list of non-empty pages, `(page id, page slot)` in ascending
//! id (the best page last), kept as a list of sorted chunks of at most a few hundred entries.
//!
//! One sorted `Vec` made every page created or emptied deep in a sparse book shift every entry
//! above it: thousands of entries on a book spread over a million ticks. A chunk bounds that
//! shift; a chunk that fills splits in two, one that runs low merges into a neighbour, so the
//! chunk list stays short and dense. Lookups near the best page (most of them) look at the last
//! chunk's last entries first. Emptied chunk buffers are kept for reuse: once the directory has
//! reached its working size nothing here allocates. This module must never know what a page
//! holds.

/// Entries a chunk holds at most, by default.
const CHUNK: usize = 256;

/// Where an entry is, or would go: (chunk, index in the chunk).
pub(super) type At = (usize, usize);

#[derive(Clone, Debug)]
pub(super) struct Directory {
    /// Sorted within and across chunks; no chunk is empty.
    chunks: Vec<Vec<(u64, u32)>>,
    /// Emptied chunk buffers, reused by splits.
    spare: Vec<Vec<(u64, u32)>>,
    chunk: usize,
    len: usize,
}

impl Default for Directory {
    fn default() -> Self {
        Directory::with_chunk(CHUNK)
    }
}

impl Directory {
    /// A directory of chunks of at most `chunk` entries (at least 4).
    pub fn with_chunk(chunk: usize) -> Directory {
        Directory {
            chunks: Vec::new(),
            spare: Vec::new(),
            chunk: chunk.max(4),
            len: 0,
        }
    }

    /// Room for about `pages` pages before anything grows.
    pub fn reserve(&mut self, pages: usize) {
        let chunks = pages / (self.chunk / 2) + 2;
        self.chunks.reserve(chunks);
        self.spare.reserve(chunks);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// The entry with the greatest id.
    #[inline]
    pub fn last(&self) -> Option<(u64, u32)> {
        self.chunks.last().and_then(|c| c.last()).copied()
    }

    #[cfg(test)]
    pub fn get(&self, at: At) -> (u64, u32) {
        self.chunks[at.0][at.1]
    }

    /// Where page `id` is (`Ok`), or where it would go (`Err`).
    #[inline]
    pub fn find(&self, id: u64) -> Result<At, At> {
        let Some(last) = self.chunks.last() else {
            return Err((0, 0));
        };
        let c = self.chunks.len() - 1;
        // Near the best page first: most lookups end here.
        let n = last.len();
        for i in (n.saturating_sub(2)..n).rev() {
            let found = last[i].0;
            if found == id {
                return Ok((c, i));
            }
            if found < id {
                return Err((c, i + 1));
            }
        }
        // The first chunk whose last id is not below `id` holds it or the place for it.
        let c = self.chunks.partition_point(|ch| ch[ch.len() - 1].0 < id);
        if c == self.chunks.len() {
            let c = c - 1;
            return Err((c, self.chunks[c].len()));
        }
        self.chunks[c]
            .binary_search_by_key(&id, |&(p, _)| p)
            .map(|i| (c, i))
            .map_err(|i| (c, i))
    }

    /// Inserts `entry` where `find` said it would go.
    pub fn insert(&mut self, at: At, entry: (u64, u32)) {
        self.len += 1;
        if self.chunks.is_empty() {
            let mut chunk = self.fresh();
            chunk.push(entry);
            self.chunks.push(chunk);
            return;
        }
        let (c, i) = at;
        self.chunks[c].insert(i, entry);
        if self.chunks[c].len() > self.chunk {
            let mut upper = self.fresh();
            let half = self.chunks[c].len() / 2;
            upper.extend(self.chunks[c].drain(half..));
            self.chunks.insert(c + 1, upper);
        }
    }

    /// Removes the entry at `at`.
    pub fn remove(&mut self, at: At) {
        let (c, i) = at;
        self.len -= 1;
        self.chunks[c].remove(i);
        let n = self.chunks[c].len();
        if n == 0 {
            let empty = self.chunks.remove(c);
            self.spare.push(empty);
        } else if n < self.chunk / 4 {
            // Merge the smaller of this chunk and a neighbour into the other when they fit.
            if c + 1 < self.chunks.len() && n + self.chunks[c + 1].len() <= self.chunk {
                let mut next = self.chunks.remove(c + 1);
                self.chunks[c].append(&mut next);
                self.spare.push(next);
            } else if c > 0 && n + self.chunks[c - 1].len() <= self.chunk {
                let mut this = self.chunks.remove(c);
                self.chunks[c - 1].append(&mut this);
                self.spare.push(this);
            }
        }
    }

    /// Entries from the greatest id down.
    pub fn iter_rev(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.chunks
            .iter()
            .rev()
            .flat_map(|c| c.iter().rev().copied())
    }

    /// Checks the order, the counts and that no chunk is empty or over its size.
    pub fn check(&self) -> Result<(), String> {
        let mut previous: Option<u64> = None;
        let mut count = 0;
        for chunk in &self.chunks {
            if chunk.is_empty() || chunk.len() > self.chunk {
                return Err(format!("a directory chunk holds {} entries", chunk.len()));
            }
            for &(id, _) in chunk {
                if previous.is_some_and(|p| p >= id) {
                    return Err("ladder pages out of order".into());
                }
                previous = Some(id);
                count += 1;
            }
        }
        if count != self.len {
            return Err(format!(
                "the directory counts {} pages, holds {count}",
                self.len
            ));
        }
        Ok(())
    }

    /// An empty chunk buffer: a spare one, or a new one.
    fn fresh(&mut self) -> Vec<(u64, u32)> {
        self.spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.chunk + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Against a `BTreeMap`, with small chunks so that splits and merges happen all the time.
    #[test]
    fn agrees_with_a_sorted_map_through_splits_and_merges() {
        for chunk in [4, 5, 8, 256] {
            let mut dir = Directory::with_chunk(chunk);
            let mut model: BTreeMap<u64, u32> = BTreeMap::new();
            let mut x: u64 = 11;
            for step in 0..60_000u32 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Mostly near the top (large ids), sometimes deep; the set grows, then shrinks.
                let id = if x >> 62 == 0 {
                    (x >> 20) % 5_000
                } else {
                    5_000 + (x >> 20) % 300
                };
                let grow = (step / 15_000) % 2 == 0;
                match dir.find(id) {
                    Ok(at) => {
                        assert_eq!(dir.get(at), (id, model[&id]), "step {step}");
                        if !grow || x & 3 == 0 {
                            dir.remove(at);
                            model.remove(&id);
                        }
                    }
                    Err(at) => {
                        assert!(!model.contains_key(&id), "step {step}: {id} not found");
                        if grow || x & 3 == 0 {
                            dir.insert(at, (id, step));
                            model.insert(id, step);
                        }
                    }
                }
                if step % 997 == 0 {
                    dir.check()
                        .unwrap_or_else(|e| panic!("chunk {chunk}, step {step}: {e}"));
                    let ours: Vec<(u64, u32)> = dir.iter_rev().collect();
                    let theirs: Vec<(u64, u32)> =
                        model.iter().rev().map(|(&k, &v)| (k, v)).collect();
                    assert_eq!(ours, theirs, "chunk {chunk}, step {step}");
                }
                assert_eq!(dir.len(), model.len());
                assert_eq!(dir.last(), model.iter().next_back().map(|(&k, &v)| (k, v)));
            }
        }
    }
}
