//! The L1 table: 1 GiB of IOVA, 512 chunks of 2 MiB. It is sparse (one sorted vector of page
//! entries) while it holds at most [`SPARSE_L1_MAX`] pages and no huge entry, and dense (an
//! array of 512 chunks) otherwise. A chunk of a dense L1 is empty, a huge entry, a sparse leaf
//! (at most [`SPARSE_LEAF_MAX`] pages) or a dense leaf.
//!
//! The forms are canonical: which one a node takes follows from what it holds, after a map
//! and after a removal alike, so its size does too (what the budget check relies on).

use std::mem::size_of;

use super::leaf::{Huge, Leaf};
use super::sparse;
use super::{Perm, Pte, FANOUT, LEAF_PAGES};

/// Bytes of a dense leaf.
pub(super) const LEAF_BYTES: u64 = size_of::<Leaf>() as u64;
/// Bytes of a dense L1 table (its chunks' leaves not included).
pub(super) const L1_BYTES: u64 = size_of::<DenseL1>() as u64;
/// Most pages a chunk keeps sparse: one more and its vector (8 bytes per entry, capacity a
/// power of two) would be no smaller than a dense leaf.
pub(super) const SPARSE_LEAF_MAX: usize = 256;
const _: () = assert!(
    sparse::bytes_for(SPARSE_LEAF_MAX) < LEAF_BYTES
        && sparse::bytes_for(SPARSE_LEAF_MAX + 1) >= LEAF_BYTES
);
/// Most pages an L1 table keeps sparse: its vector is then at most 4 KiB, which bounds the
/// entries an insertion moves. A sparse L1 is always smaller than the dense one.
pub(super) const SPARSE_L1_MAX: usize = 512;
const _: () = assert!(sparse::bytes_for(SPARSE_L1_MAX) < L1_BYTES);

/// A present chunk, as walks see it.
pub(super) enum Slot<'a> {
    Leaf(&'a Leaf),
    Huge(Huge),
    /// The chunk's entries; the low 9 bits of their index are the page in the chunk.
    Sparse(&'a [u64]),
}

/// One 2 MiB chunk of a dense L1 table.
pub(super) enum Chunk {
    Empty,
    Huge(Huge),
    Dense(Box<Leaf>),
    Sparse(Vec<u64>),
}

/// Bytes a chunk of `n` pages (not a huge entry) takes.
pub(super) fn chunk_bytes_for(n: usize) -> u64 {
    if n <= SPARSE_LEAF_MAX {
        sparse::bytes_for(n)
    } else {
        LEAF_BYTES
    }
}

/// Whether `[lo, hi]` mapped from `frame` is exactly one whole chunk with a 2 MiB aligned
/// GPA (a huge entry). Asked only of maps that could stay sparse, so of at most 512 pages: a
/// map that covers a whole chunk and more is too large for a sparse table anyway.
fn is_huge_chunk(lo: usize, hi: usize, frame: u64) -> bool {
    lo.is_multiple_of(FANOUT) && hi - lo + 1 == FANOUT && frame.is_multiple_of(LEAF_PAGES)
}

impl Chunk {
    fn pages(&self) -> usize {
        match self {
            Chunk::Empty => 0,
            Chunk::Huge(_) => FANOUT,
            Chunk::Dense(leaf) => usize::from(leaf.count),
            Chunk::Sparse(v) => v.len(),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Chunk::Empty | Chunk::Huge(_) => 0,
            Chunk::Dense(_) => LEAF_BYTES,
            Chunk::Sparse(v) => sparse::bytes(v),
        }
    }

    #[inline]
    fn get(&self, i: usize) -> Option<Pte> {
        match self {
            Chunk::Empty => None,
            Chunk::Huge(h) => Some(h.pte(i as u64)),
            Chunk::Dense(leaf) => leaf.get(i),
            Chunk::Sparse(v) => sparse::get(v, i),
        }
    }

    fn slot(&self) -> Option<Slot<'_>> {
        match self {
            Chunk::Empty => None,
            Chunk::Huge(h) => Some(Slot::Huge(*h)),
            Chunk::Dense(leaf) => Some(Slot::Leaf(leaf)),
            Chunk::Sparse(v) => Some(Slot::Sparse(v)),
        }
    }

    /// The chunk holding `entries` (at least one, all of one chunk).
    fn from_entries(entries: &[u64]) -> Chunk {
        match entries.len() {
            n if n <= SPARSE_LEAF_MAX => Chunk::Sparse(sparse::from_entries(
                entries
                    .iter()
                    .map(|&e| sparse::reindex(e, sparse::index(e) % FANOUT)),
            )),
            _ => Chunk::Dense(Leaf::from_entries(entries)),
        }
    }

    /// Appends the pages as entries with index `base + page`.
    fn push_entries(&self, base: usize, out: &mut Vec<u64>) {
        match self {
            Chunk::Empty => {}
            Chunk::Huge(h) => Leaf::from_huge(*h).push_entries(base, out),
            Chunk::Dense(leaf) => leaf.push_entries(base, out),
            Chunk::Sparse(v) => out.extend(
                v.iter()
                    .map(|&e| sparse::reindex(e, base + sparse::index(e))),
            ),
        }
    }

    /// Maps pages `[lo, hi]` (unmapped) from `frame`, as a leaf.
    fn map(&mut self, (lo, hi): (usize, usize), frame: u64, perm: Perm, start: bool, end: bool) {
        if self.pages() + hi - lo < SPARSE_LEAF_MAX {
            if let Chunk::Empty = self {
                *self = Chunk::Sparse(Vec::new());
            }
            if let Chunk::Sparse(v) = self {
                sparse::insert(v, (lo, hi), frame, perm, start, end);
                return;
            }
        }
        let mut leaf = match std::mem::replace(self, Chunk::Empty) {
            Chunk::Dense(leaf) => leaf,
            Chunk::Sparse(v) => Leaf::from_entries(&v),
            Chunk::Empty => Leaf::new(),
            Chunk::Huge(h) => Leaf::from_huge(h),
        };
        leaf.set_range(lo, hi, frame, perm, start, end);
        *self = Chunk::Dense(leaf);
    }

    /// Unmaps pages `[lo, hi]`; returns how many were mapped.
    fn clear(&mut self, lo: usize, hi: usize) -> u64 {
        let removed = match self {
            Chunk::Empty => 0,
            Chunk::Huge(_) if lo == 0 && hi == FANOUT - 1 => {
                *self = Chunk::Empty;
                return LEAF_PAGES;
            }
            Chunk::Huge(h) => {
                // Part of a huge chunk (the caller split a mapping): page by page.
                let mut leaf = Leaf::from_huge(*h);
                let removed = leaf.clear_range(lo, hi);
                *self = Chunk::Dense(leaf);
                removed
            }
            Chunk::Sparse(v) => sparse::remove(v, lo, hi),
            Chunk::Dense(leaf) => leaf.clear_range(lo, hi),
        };
        let pages = self.pages();
        if pages == 0 {
            *self = Chunk::Empty;
        } else if pages <= SPARSE_LEAF_MAX {
            if let Chunk::Dense(leaf) = self {
                let mut v = sparse::with_room_for(pages);
                leaf.push_entries(0, &mut v);
                *self = Chunk::Sparse(v);
            }
        }
        removed
    }
}

/// A dense L1 table.
pub(super) struct DenseL1 {
    chunks: [Chunk; FANOUT],
    /// Pages mapped (up to 2^18).
    pages: u32,
    /// Huge chunks.
    huge: u16,
    /// Bytes of the chunks' leaves.
    leaf_bytes: u64,
}

impl DenseL1 {
    fn new() -> Box<DenseL1> {
        Box::new(DenseL1 {
            chunks: std::array::from_fn(|_| Chunk::Empty),
            pages: 0,
            huge: 0,
            leaf_bytes: 0,
        })
    }

    /// Runs `f` on chunk `c`, keeping the table's counts.
    fn update<R>(&mut self, c: usize, f: impl FnOnce(&mut Chunk) -> R) -> R {
        let chunk = &mut self.chunks[c];
        let (pages, bytes, huge) = (
            chunk.pages(),
            chunk.bytes(),
            matches!(chunk, Chunk::Huge(_)),
        );
        let r = f(chunk);
        self.pages = self.pages + chunk.pages() as u32 - pages as u32;
        self.leaf_bytes = self.leaf_bytes + chunk.bytes() - bytes;
        self.huge = self.huge + u16::from(matches!(chunk, Chunk::Huge(_))) - u16::from(huge);
        r
    }

    /// The dense form of a sparse L1's entries.
    fn from_entries(mut rest: &[u64]) -> Box<DenseL1> {
        let mut d = DenseL1::new();
        while let Some(&e) = rest.first() {
            let c = sparse::index(e) / FANOUT;
            let n = rest.partition_point(|&x| sparse::index(x) / FANOUT == c);
            d.update(c, |chunk| *chunk = Chunk::from_entries(&rest[..n]));
            rest = &rest[n..];
        }
        d
    }

    /// Every page as an entry, for the sparse form.
    fn entries(&self) -> Vec<u64> {
        let mut v = sparse::with_room_for(self.pages as usize);
        for (c, chunk) in self.chunks.iter().enumerate() {
            chunk.push_entries(c * FANOUT, &mut v);
        }
        v
    }

    fn map(&mut self, (lo, hi): (usize, usize), frame: u64, perm: Perm, start: bool, end: bool) {
        let mut page = lo;
        while page <= hi {
            let c = page / FANOUT;
            let chunk_hi = (c * FANOUT + FANOUT - 1).min(hi);
            let f = frame + (page - lo) as u64;
            let (s, e) = (start && page == lo, end && chunk_hi == hi);
            let (i, j) = (page % FANOUT, chunk_hi % FANOUT);
            let whole = i == 0 && j == FANOUT - 1 && f.is_multiple_of(LEAF_PAGES);
            self.update(c, |chunk| match chunk {
                Chunk::Empty if whole => *chunk = Chunk::Huge(Huge::new(f, perm, s, e)),
                _ => chunk.map((i, j), f, perm, s, e),
            });
            page = chunk_hi + 1;
        }
    }

    fn clear(&mut self, lo: usize, hi: usize) -> u64 {
        let mut removed = 0;
        for c in lo / FANOUT..=hi / FANOUT {
            let i = lo.saturating_sub(c * FANOUT);
            let j = (hi - c * FANOUT).min(FANOUT - 1);
            removed += self.update(c, |chunk| chunk.clear(i, j));
        }
        removed
    }
}

/// An L1 table (see the module's documentation).
pub(super) enum L1 {
    Sparse(Vec<u64>),
    Dense(Box<DenseL1>),
}

impl L1 {
    /// Pages mapped.
    pub(super) fn pages(&self) -> u64 {
        match self {
            L1::Sparse(v) => v.len() as u64,
            L1::Dense(d) => u64::from(d.pages),
        }
    }

    /// Bytes of the table and its leaves.
    pub(super) fn bytes(&self) -> u64 {
        match self {
            L1::Sparse(v) => sparse::bytes(v),
            L1::Dense(d) => L1_BYTES + d.leaf_bytes,
        }
    }

    /// The translation of page `i` (0..2^18) of the table.
    #[inline]
    pub(super) fn get(&self, i: usize) -> Option<Pte> {
        match self {
            L1::Sparse(v) => sparse::get(v, i),
            L1::Dense(d) => d.chunks[i / FANOUT].get(i % FANOUT),
        }
    }

    /// Calls `f(chunk, slot)` for the present chunks `lo..=hi` in order; returns `false` as
    /// soon as `f` does.
    pub(super) fn visit<'a>(
        &'a self,
        lo: usize,
        hi: usize,
        f: &mut impl FnMut(usize, Slot<'a>) -> bool,
    ) -> bool {
        match self {
            L1::Sparse(v) => {
                let mut rest = sparse::range(v, lo * FANOUT, hi * FANOUT + FANOUT - 1);
                while let Some(&e) = rest.first() {
                    let c = sparse::index(e) / FANOUT;
                    let n = rest.partition_point(|&x| sparse::index(x) / FANOUT == c);
                    if !f(c, Slot::Sparse(&rest[..n])) {
                        return false;
                    }
                    rest = &rest[n..];
                }
            }
            L1::Dense(d) => {
                for (c, chunk) in d.chunks.iter().enumerate().take(hi + 1).skip(lo) {
                    if let Some(slot) = chunk.slot() {
                        if !f(c, slot) {
                            return false;
                        }
                    }
                }
            }
        }
        true
    }

    fn dense_mut(&mut self) -> &mut DenseL1 {
        if let L1::Sparse(v) = self {
            *self = L1::Dense(DenseL1::from_entries(v));
        }
        match self {
            L1::Dense(d) => d,
            L1::Sparse(_) => unreachable!("the table was just made dense"),
        }
    }

    /// Maps pages `[lo, hi]` (unmapped; indices in the table) to consecutive frames from
    /// `frame`; START on `lo` if `start`, END on `hi` if `end`.
    pub(super) fn map(
        &mut self,
        (lo, hi): (usize, usize),
        frame: u64,
        perm: Perm,
        start: bool,
        end: bool,
    ) {
        if let L1::Sparse(v) = self {
            if v.len() + hi - lo < SPARSE_L1_MAX && !is_huge_chunk(lo, hi, frame) {
                sparse::insert(v, (lo, hi), frame, perm, start, end);
                return;
            }
        }
        self.dense_mut().map((lo, hi), frame, perm, start, end);
    }

    /// Unmaps pages `[lo, hi]`; returns how many were mapped.
    pub(super) fn clear(&mut self, lo: usize, hi: usize) -> u64 {
        let removed = match self {
            L1::Sparse(v) => sparse::remove(v, lo, hi),
            L1::Dense(d) => d.clear(lo, hi),
        };
        if let L1::Dense(d) = self {
            if d.huge == 0 && d.pages as usize <= SPARSE_L1_MAX {
                *self = L1::Sparse(d.entries());
            }
        }
        removed
    }

    /// The bytes table `this` (absent: a new one) will take after `map((lo, hi), frame, ..)`.
    pub(super) fn bytes_after_map(this: Option<&L1>, (lo, hi): (usize, usize), frame: u64) -> u64 {
        let n = hi - lo + 1;
        let huge = is_huge_chunk(lo, hi, frame);
        let (pages, sparse) = match this {
            None => (0, Some(&[][..])),
            Some(L1::Sparse(v)) => (v.len(), Some(&v[..])),
            Some(L1::Dense(_)) => (0, None),
        };
        if sparse.is_some() && pages + n <= SPARSE_L1_MAX && !huge {
            return sparse::bytes_for(pages + n);
        }
        // Dense: the chunks as they are, or as the sparse entries will be distributed.
        let chunk = |c: usize| match (this, sparse) {
            (Some(L1::Dense(d)), _) => (d.chunks[c].pages(), d.chunks[c].bytes()),
            (_, Some(v)) => {
                let k = sparse::range(v, c * FANOUT, c * FANOUT + FANOUT - 1).len();
                (k, chunk_bytes_for(k))
            }
            _ => (0, 0),
        };
        let mut total = L1_BYTES;
        match (this, sparse) {
            (Some(L1::Dense(d)), _) => total += d.leaf_bytes,
            (_, Some(v)) => {
                let mut rest = v;
                while let Some(&e) = rest.first() {
                    let c = sparse::index(e) / FANOUT;
                    let k = rest.partition_point(|&x| sparse::index(x) / FANOUT == c);
                    total += chunk_bytes_for(k);
                    rest = &rest[k..];
                }
            }
            _ => {}
        }
        let mut page = lo;
        while page <= hi {
            let c = page / FANOUT;
            let chunk_hi = (c * FANOUT + FANOUT - 1).min(hi);
            let (k, before) = chunk(c);
            let whole = page % FANOUT == 0
                && chunk_hi % FANOUT == FANOUT - 1
                && (frame + (page - lo) as u64).is_multiple_of(LEAF_PAGES);
            let after = if whole && k == 0 {
                0
            } else {
                chunk_bytes_for(k + chunk_hi - page + 1)
            };
            total = total + after - before;
            page = chunk_hi + 1;
        }
        total
    }
}

#[cfg(test)]
impl L1 {
    /// Checks that the table and its chunks have the form their content calls for and that
    /// its counters are right; returns its bytes, recomputed from scratch.
    pub(super) fn check(&self) -> u64 {
        let sorted = |v: &[u64]| {
            v.windows(2)
                .all(|w| sparse::index(w[0]) < sparse::index(w[1]))
        };
        match self {
            L1::Sparse(v) => {
                assert!(
                    !v.is_empty() && v.len() <= SPARSE_L1_MAX,
                    "{} pages",
                    v.len()
                );
                assert!(sorted(v));
                assert_eq!(sparse::bytes(v), sparse::bytes_for(v.len()));
                sparse::bytes_for(v.len())
            }
            L1::Dense(d) => {
                let (mut pages, mut huge, mut bytes) = (0, 0, 0);
                for chunk in &d.chunks {
                    let n = match chunk {
                        Chunk::Empty => 0,
                        Chunk::Huge(_) => {
                            huge += 1;
                            FANOUT
                        }
                        Chunk::Dense(leaf) => {
                            let mut v = Vec::new();
                            leaf.push_entries(0, &mut v);
                            assert_eq!(v.len(), usize::from(leaf.count));
                            assert!(v.len() > SPARSE_LEAF_MAX, "a dense leaf of {}", v.len());
                            v.len()
                        }
                        Chunk::Sparse(v) => {
                            assert!(!v.is_empty() && v.len() <= SPARSE_LEAF_MAX);
                            assert!(sorted(v) && v.iter().all(|&e| sparse::index(e) < FANOUT));
                            assert_eq!(sparse::bytes(v), sparse::bytes_for(v.len()));
                            v.len()
                        }
                    };
                    pages += n as u32;
                    bytes += chunk.bytes();
                }
                assert_eq!((pages, huge, bytes), (d.pages, d.huge, d.leaf_bytes));
                assert!(
                    huge > 0 || pages as usize > SPARSE_L1_MAX,
                    "{pages} pages kept dense"
                );
                L1_BYTES + bytes
            }
        }
    }
}
