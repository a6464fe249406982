//! The page-granular I/O page table of one domain: IOVA page -> (GPA page, permissions,
//! mapping boundaries), at 4 KiB granularity, for a 48-bit IOVA space.
//!
//! Layout (see `iommu/DESIGN.md`): a 4-level, 512-ary radix tree. A leaf covers 2 MiB of IOVA
//! and stores, per 4 KiB page, a 32-bit GPA frame number (GPAs below 2^44) in a `[u32; 512]`
//! array and six per-page flag bitmaps (`VALID`, `READ`, `WRITE`, `MMIO`, `START`, `END`):
//! 4.75 bytes per page. `START`/`END` mark the first and last page of the guest MAP request
//! that created the page, so UNMAP's "never split a mapping" rule is two bit tests, with no
//! heap object per mapping. A 2 MiB chunk of one mapping whose IOVA and GPA are 2 MiB aligned
//! is stored as a single 8-byte huge entry in the level above instead of a leaf.
//!
//! All addresses here are page numbers (`u64`, address >> 12) and ranges are inclusive
//! `[first, last]`, so a range ending at `u64::MAX >> 12` is representable.

use std::fmt;

/// Granule of the table: 4 KiB.
pub const PAGE_SHIFT: u32 = 12;
/// Bytes per page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// IOVA bits the table translates.
pub const IOVA_BITS: u32 = 48;
/// Largest IOVA the table can map.
pub const MAX_IOVA: u64 = (1 << IOVA_BITS) - 1;
/// GPA bits a mapping target may use (frames are stored in 32 bits).
pub const GPA_BITS: u32 = 32 + PAGE_SHIFT;
/// Largest GPA a mapping may target.
pub const MAX_GPA: u64 = (1 << GPA_BITS) - 1;

const LEVEL_BITS: u32 = 9;
const FANOUT: usize = 1 << LEVEL_BITS;
const WORDS: usize = FANOUT / 64;
/// Pages per leaf / per huge entry.
const LEAF_PAGES: u64 = FANOUT as u64;

/// Access permissions of a mapping, with the bit values of the virtio-iommu MAP flags
/// (`VIRTIO_IOMMU_MAP_F_READ`, `_WRITE`, `_MMIO`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// No access.
    pub const NONE: Perm = Perm(0);
    /// Device reads allowed.
    pub const READ: Perm = Perm(1);
    /// Device writes allowed.
    pub const WRITE: Perm = Perm(2);
    /// Reads and writes.
    pub const RW: Perm = Perm(3);
    /// The target is device memory (MMIO), not RAM.
    pub const MMIO: Perm = Perm(4);

    /// From the MAP request's flags; `None` if unknown bits are set.
    pub fn from_bits(bits: u32) -> Option<Perm> {
        (bits & !7 == 0).then_some(Perm(bits as u8))
    }
    /// The flag bits.
    pub fn bits(self) -> u8 {
        self.0
    }
    /// Whether every permission in `other` is present.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }
    /// Reads allowed.
    pub fn read(self) -> bool {
        self.contains(Perm::READ)
    }
    /// Writes allowed.
    pub fn write(self) -> bool {
        self.contains(Perm::WRITE)
    }
    /// Union.
    pub fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = if self.read() { "R" } else { "-" };
        let w = if self.write() { "W" } else { "-" };
        let m = if self.contains(Perm::MMIO) { "M" } else { "" };
        write!(f, "{r}{w}{m}")
    }
}

/// One page's translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pte {
    /// Target GPA page number.
    pub gpa_page: u64,
    /// Permissions.
    pub perm: Perm,
    /// First page of its mapping.
    pub start: bool,
    /// Last page of its mapping.
    pub end: bool,
}

/// A run of pages contiguous in IOVA and GPA with one permission: a whole guest mapping when
/// returned by [`IoPageTable::mappings`] and [`IoPageTable::remove`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First IOVA page.
    pub iova_page: u64,
    /// First GPA page.
    pub gpa_page: u64,
    /// Number of pages.
    pub pages: u64,
    /// Permissions.
    pub perm: Perm,
}

impl Run {
    /// First IOVA (bytes).
    pub fn iova(&self) -> u64 {
        self.iova_page << PAGE_SHIFT
    }
    /// First GPA (bytes).
    pub fn gpa(&self) -> u64 {
        self.gpa_page << PAGE_SHIFT
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.pages << PAGE_SHIFT
    }
    /// Never true: a run has at least one page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
    /// Last IOVA page.
    pub fn last_page(&self) -> u64 {
        self.iova_page + self.pages - 1
    }
}

// Per-page flag bitmaps of a leaf, and the flag bits of a huge entry.
const F_VALID: usize = 0;
const F_READ: usize = 1;
const F_WRITE: usize = 2;
const F_MMIO: usize = 3;
const F_START: usize = 4;
const F_END: usize = 5;
const NFLAGS: usize = 6;

struct Leaf {
    frames: [u32; FANOUT],
    bits: [[u64; WORDS]; NFLAGS],
    count: u16,
}

impl Leaf {
    fn new() -> Box<Leaf> {
        Box::new(Leaf {
            frames: [0; FANOUT],
            bits: [[0; WORDS]; NFLAGS],
            count: 0,
        })
    }
    #[inline]
    fn test(&self, flag: usize, i: usize) -> bool {
        self.bits[flag][i / 64] & (1 << (i % 64)) != 0
    }
    #[inline]
    fn get(&self, i: usize) -> Option<Pte> {
        if !self.test(F_VALID, i) {
            return None;
        }
        let mut perm = 0;
        if self.test(F_READ, i) {
            perm |= 1;
        }
        if self.test(F_WRITE, i) {
            perm |= 2;
        }
        if self.test(F_MMIO, i) {
            perm |= 4;
        }
        Some(Pte {
            gpa_page: u64::from(self.frames[i]),
            perm: Perm(perm),
            start: self.test(F_START, i),
            end: self.test(F_END, i),
        })
    }
    /// Sets pages `[lo, hi]` (indices) to map to consecutive frames from `frame`.
    fn set_range(&mut self, lo: usize, hi: usize, frame: u64, perm: Perm) {
        for (k, f) in self.frames[lo..=hi].iter_mut().enumerate() {
            *f = (frame + k as u64) as u32;
        }
        let flags = [
            (F_VALID, true),
            (F_READ, perm.read()),
            (F_WRITE, perm.write()),
            (F_MMIO, perm.contains(Perm::MMIO)),
        ];
        for (flag, on) in flags {
            for_each_word(lo, hi, |w, mask| {
                if on {
                    self.bits[flag][w] |= mask;
                } else {
                    self.bits[flag][w] &= !mask;
                }
            });
        }
        for_each_word(lo, hi, |w, mask| {
            self.bits[F_START][w] &= !mask;
            self.bits[F_END][w] &= !mask;
        });
        self.count += (hi - lo + 1) as u16;
    }
    fn clear_range(&mut self, lo: usize, hi: usize) -> u64 {
        let mut removed = 0;
        for_each_word(lo, hi, |w, mask| {
            removed += (self.bits[F_VALID][w] & mask).count_ones() as u64;
            for flag in 0..NFLAGS {
                self.bits[flag][w] &= !mask;
            }
        });
        self.count -= removed as u16;
        removed
    }
    fn set_flag(&mut self, flag: usize, i: usize) {
        self.bits[flag][i / 64] |= 1 << (i % 64);
    }
    /// First valid index in `[lo, hi]`.
    fn next_valid(&self, lo: usize, hi: usize) -> Option<usize> {
        next_set_bit(&self.bits[F_VALID], lo, hi)
    }
    /// Whether any page in `[lo, hi]` is valid.
    fn any_valid(&self, lo: usize, hi: usize) -> bool {
        let mut any = false;
        for_each_word(lo, hi, |w, mask| any |= self.bits[F_VALID][w] & mask != 0);
        any
    }
}

/// Calls `f(word, mask)` for the bits `[lo, hi]` of a 512-bit bitmap.
#[inline]
fn for_each_word(lo: usize, hi: usize, mut f: impl FnMut(usize, u64)) {
    let (wl, wh) = (lo / 64, hi / 64);
    for w in wl..=wh {
        let from = if w == wl { lo % 64 } else { 0 };
        let to = if w == wh { hi % 64 } else { 63 };
        let mask = (u64::MAX >> (63 - to)) & (u64::MAX << from);
        f(w, mask);
    }
}

#[inline]
fn next_set_bit(bits: &[u64; WORDS], lo: usize, hi: usize) -> Option<usize> {
    let mut found = None;
    for_each_word(lo, hi, |w, mask| {
        let v = bits[w] & mask;
        if found.is_none() && v != 0 {
            found = Some(w * 64 + v.trailing_zeros() as usize);
        }
    });
    found
}

/// A huge entry: one 2 MiB chunk of one mapping. Bits 0-5 are the flags, bits 12.. the GPA
/// page number of the chunk's first page.
#[derive(Clone, Copy)]
struct Huge(u64);

impl Huge {
    fn new(gpa_page: u64, perm: Perm, start: bool, end: bool) -> Huge {
        let mut v = (gpa_page << 12) | (1 << F_VALID);
        if perm.read() {
            v |= 1 << F_READ;
        }
        if perm.write() {
            v |= 1 << F_WRITE;
        }
        if perm.contains(Perm::MMIO) {
            v |= 1 << F_MMIO;
        }
        if start {
            v |= 1 << F_START;
        }
        if end {
            v |= 1 << F_END;
        }
        Huge(v)
    }
    fn valid(self) -> bool {
        self.0 & (1 << F_VALID) != 0
    }
    fn flag(self, f: usize) -> bool {
        self.0 & (1 << f) != 0
    }
    fn perm(self) -> Perm {
        Perm(((self.0 >> F_READ) & 7) as u8)
    }
    /// Translation of page `i` (0..512) of the chunk.
    fn pte(self, i: u64) -> Pte {
        Pte {
            gpa_page: (self.0 >> 12) + i,
            perm: self.perm(),
            start: i == 0 && self.flag(F_START),
            end: i == LEAF_PAGES - 1 && self.flag(F_END),
        }
    }
}

/// Level 1: covers 1 GiB; each slot is empty, a leaf, or a huge entry.
struct L1 {
    leaves: [Option<Box<Leaf>>; FANOUT],
    huge: [u64; FANOUT],
    count: u16,
}

struct Dir<T> {
    slots: [Option<Box<T>>; FANOUT],
    /// Occupied slots, so that an emptied L2 directory is freed (not kept for the root,
    /// which is never freed).
    count: u16,
}

impl<T> Dir<T> {
    fn new() -> Box<Self> {
        Box::new(Dir {
            slots: std::array::from_fn(|_| None),
            count: 0,
        })
    }
}

impl L1 {
    fn new() -> Box<L1> {
        Box::new(L1 {
            leaves: std::array::from_fn(|_| None),
            huge: [0; FANOUT],
            count: 0,
        })
    }
}

type L2 = Dir<L1>;
type L3 = Dir<L2>;

const LEAF_BYTES: u64 = std::mem::size_of::<Leaf>() as u64;
const L1_BYTES: u64 = std::mem::size_of::<L1>() as u64;
const DIR_BYTES: u64 = std::mem::size_of::<Dir<L1>>() as u64;

#[inline]
fn idx(page: u64, level: u32) -> usize {
    ((page >> (LEVEL_BITS * level)) as usize) & (FANOUT - 1)
}

/// Errors of [`IoPageTable`] updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The IOVA range is beyond [`MAX_IOVA`] or the GPA range beyond [`MAX_GPA`].
    #[error("address out of the table's range")]
    OutOfRange,
    /// Part of the range is already mapped.
    #[error("range overlaps an existing mapping")]
    Overlap,
    /// The range would split an existing mapping.
    #[error("range would split a mapping")]
    Split,
    /// The metadata budget would be exceeded.
    #[error("page table metadata budget exhausted")]
    NoMemory,
}

/// The I/O page table of one domain.
pub struct IoPageTable {
    root: Box<L3>,
    mapped_pages: u64,
    metadata_bytes: u64,
    budget_bytes: u64,
}

impl Default for IoPageTable {
    fn default() -> Self {
        Self::new(u64::MAX)
    }
}

impl fmt::Debug for IoPageTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoPageTable")
            .field("mapped_pages", &self.mapped_pages)
            .field("metadata_bytes", &self.metadata_bytes)
            .finish()
    }
}

impl IoPageTable {
    /// An empty table that may allocate up to `budget_bytes` of nodes.
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            root: Dir::new(),
            mapped_pages: 0,
            metadata_bytes: DIR_BYTES,
            budget_bytes,
        }
    }

    /// Changes the metadata budget (bytes) for later maps.
    pub fn set_budget(&mut self, budget_bytes: u64) {
        self.budget_bytes = budget_bytes;
    }

    /// Pages currently mapped.
    pub fn mapped_pages(&self) -> u64 {
        self.mapped_pages
    }

    /// Bytes of table nodes allocated (the per-page metadata cost).
    pub fn metadata_bytes(&self) -> u64 {
        self.metadata_bytes
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.mapped_pages == 0
    }

    /// The translation of IOVA page `page`, if mapped.
    #[inline]
    pub fn get(&self, page: u64) -> Option<Pte> {
        if page > MAX_IOVA >> PAGE_SHIFT {
            return None;
        }
        let l2 = self.root.slots[idx(page, 3)].as_deref()?;
        let l1 = l2.slots[idx(page, 2)].as_deref()?;
        let i1 = idx(page, 1);
        match l1.leaves[i1].as_deref() {
            Some(leaf) => leaf.get(idx(page, 0)),
            None => {
                let h = Huge(l1.huge[i1]);
                h.valid().then(|| h.pte(page & (LEAF_PAGES - 1)))
            }
        }
    }

    /// Visits every present slot intersecting `[first, last]` in IOVA order, skipping empty
    /// subtrees. `f(chunk_first_page, slot)` returns `false` to stop.
    fn visit<'a>(&'a self, first: u64, last: u64, mut f: impl FnMut(u64, Slot<'a>) -> bool) {
        let last = last.min(MAX_IOVA >> PAGE_SHIFT);
        if first > last {
            return;
        }
        let span2 = 1u64 << (LEVEL_BITS * 3);
        let span1 = 1u64 << (LEVEL_BITS * 2);
        let mut i3 = idx(first, 3);
        while i3 <= idx(last, 3) {
            let base3 = (i3 as u64) * span2;
            if let Some(l2) = self.root.slots[i3].as_deref() {
                let lo2 = if base3 <= first { idx(first, 2) } else { 0 };
                let hi2 = if base3 + span2 > last {
                    idx(last, 2)
                } else {
                    FANOUT - 1
                };
                for i2 in lo2..=hi2 {
                    let base2 = base3 + (i2 as u64) * span1;
                    let Some(l1) = l2.slots[i2].as_deref() else {
                        continue;
                    };
                    let lo1 = if base2 <= first { idx(first, 1) } else { 0 };
                    let hi1 = if base2 + span1 > last {
                        idx(last, 1)
                    } else {
                        FANOUT - 1
                    };
                    for i1 in lo1..=hi1 {
                        let chunk = base2 + (i1 as u64) * LEAF_PAGES;
                        let slot = match l1.leaves[i1].as_deref() {
                            Some(leaf) => Slot::Leaf(leaf),
                            None if Huge(l1.huge[i1]).valid() => Slot::Huge(Huge(l1.huge[i1])),
                            None => continue,
                        };
                        if !f(chunk, slot) {
                            return;
                        }
                    }
                }
            }
            i3 += 1;
        }
    }

    /// Whether no page in `[first, last]` is mapped.
    pub fn is_range_empty(&self, first: u64, last: u64) -> bool {
        let mut empty = true;
        self.visit(first, last, |chunk, slot| {
            match slot {
                Slot::Huge(_) => empty = false,
                Slot::Leaf(leaf) => {
                    // `visit` passes only chunks that end at or after `first`.
                    let lo = first.saturating_sub(chunk) as usize;
                    let hi = (last - chunk).min(LEAF_PAGES - 1) as usize;
                    if leaf.any_valid(lo, hi) {
                        empty = false;
                    }
                }
            }
            empty
        });
        empty
    }

    /// Checks that removing `[first, last]` would not split a mapping: the pages at either
    /// end are unmapped or are the first (resp. last) page of their mapping.
    ///
    /// # Errors
    /// [`TableError::Split`].
    pub fn check_unmap(&self, first: u64, last: u64) -> Result<(), TableError> {
        if let Some(p) = self.get(first) {
            if !p.start {
                return Err(TableError::Split);
            }
        }
        if let Some(p) = self.get(last) {
            if !p.end {
                return Err(TableError::Split);
            }
        }
        Ok(())
    }

    /// Upper bound of the bytes that mapping `[first, last]` may allocate.
    fn alloc_estimate(&self, first: u64, last: u64) -> u64 {
        let chunks = (last >> LEVEL_BITS) - (first >> LEVEL_BITS) + 1;
        let l1s = (last >> (2 * LEVEL_BITS)) - (first >> (2 * LEVEL_BITS)) + 1;
        let l2s = (last >> (3 * LEVEL_BITS)) - (first >> (3 * LEVEL_BITS)) + 1;
        chunks
            .saturating_mul(LEAF_BYTES)
            .saturating_add(l1s.saturating_mul(L1_BYTES))
            .saturating_add(l2s.saturating_mul(DIR_BYTES))
    }

    /// Maps IOVA pages `[first, last]` to GPA pages from `gpa_page` with `perm`, as one
    /// mapping (its first page marked START, its last END).
    ///
    /// # Errors
    /// [`TableError::OutOfRange`], [`TableError::Overlap`] (nothing changed) or
    /// [`TableError::NoMemory`] when the budget would be exceeded.
    pub fn map(
        &mut self,
        first: u64,
        last: u64,
        gpa_page: u64,
        perm: Perm,
    ) -> Result<(), TableError> {
        let pages = last.checked_sub(first).ok_or(TableError::OutOfRange)? + 1;
        let gpa_last = gpa_page
            .checked_add(pages - 1)
            .ok_or(TableError::OutOfRange)?;
        if last > MAX_IOVA >> PAGE_SHIFT || gpa_last > MAX_GPA >> PAGE_SHIFT {
            return Err(TableError::OutOfRange);
        }
        if !self.is_range_empty(first, last) {
            return Err(TableError::Overlap);
        }
        // Cheap upper bound first; the exact count only near the budget.
        let room = self.budget_bytes.saturating_sub(self.metadata_bytes);
        if self.alloc_estimate(first, last) > room
            && self.alloc_needed(first, last, gpa_page) > room
        {
            return Err(TableError::NoMemory);
        }
        let mut page = first;
        while page <= last {
            let chunk = page & !(LEAF_PAGES - 1);
            let chunk_last = chunk + LEAF_PAGES - 1;
            let hi = chunk_last.min(last);
            let gpa = gpa_page + (page - first);
            let l1 = self.l1_mut(page);
            let i1 = idx(page, 1);
            let whole = page == chunk && hi == chunk_last && gpa.is_multiple_of(LEAF_PAGES);
            if whole && l1.leaves[i1].is_none() {
                l1.huge[i1] = Huge::new(gpa, perm, page == first, hi == last).0;
                l1.count += 1;
            } else {
                let new_leaf = l1.leaves[i1].is_none();
                if new_leaf {
                    l1.leaves[i1] = Some(Leaf::new());
                    l1.count += 1;
                }
                let leaf = l1.leaves[i1].as_deref_mut().expect("leaf just ensured");
                leaf.set_range(idx(page, 0), idx(hi, 0), gpa, perm);
                if page == first {
                    leaf.set_flag(F_START, idx(page, 0));
                }
                if hi == last {
                    leaf.set_flag(F_END, idx(hi, 0));
                }
                if new_leaf {
                    self.metadata_bytes += LEAF_BYTES;
                }
            }
            page = hi + 1;
        }
        self.mapped_pages += pages;
        Ok(())
    }

    /// Exact bytes `map(first, last)` would allocate (slow path of the budget check).
    fn alloc_needed(&self, first: u64, last: u64, gpa_page: u64) -> u64 {
        let mut bytes = 0;
        let mut page = first;
        let mut seen_l1 = u64::MAX;
        let mut seen_l2 = u64::MAX;
        while page <= last {
            let chunk = page & !(LEAF_PAGES - 1);
            let hi = (chunk + LEAF_PAGES - 1).min(last);
            let l2 = self.root.slots[idx(page, 3)].as_deref();
            let l1 = l2.and_then(|d| d.slots[idx(page, 2)].as_deref());
            if l2.is_none() && seen_l2 != page >> (3 * LEVEL_BITS) {
                bytes += DIR_BYTES;
                seen_l2 = page >> (3 * LEVEL_BITS);
            }
            if l1.is_none() && seen_l1 != page >> (2 * LEVEL_BITS) {
                bytes += L1_BYTES;
                seen_l1 = page >> (2 * LEVEL_BITS);
            }
            let has_leaf = l1.is_some_and(|l| l.leaves[idx(page, 1)].is_some());
            let huge = page == chunk
                && hi == chunk + LEAF_PAGES - 1
                && (gpa_page + (page - first)).is_multiple_of(LEAF_PAGES);
            if !(has_leaf || huge) {
                bytes += LEAF_BYTES;
            }
            page = hi + 1;
        }
        bytes
    }

    fn l1_mut(&mut self, page: u64) -> &mut L1 {
        let slot3 = &mut self.root.slots[idx(page, 3)];
        if slot3.is_none() {
            *slot3 = Some(Dir::new());
            self.metadata_bytes += DIR_BYTES;
        }
        let l2 = slot3.as_deref_mut().expect("l2 just ensured");
        let slot2 = &mut l2.slots[idx(page, 2)];
        if slot2.is_none() {
            *slot2 = Some(L1::new());
            l2.count += 1;
            self.metadata_bytes += L1_BYTES;
        }
        slot2.as_deref_mut().expect("l1 just ensured")
    }

    /// Calls `f(first_page, pages)` for each maximal span of IOVA pages covered by populated
    /// leaves or huge entries (of 512 pages each), in IOVA order: where something may be
    /// mapped. Cheap: it walks directories only, not pages.
    pub fn populated_spans(&self, mut f: impl FnMut(u64, u64)) {
        let mut cur: Option<(u64, u64)> = None;
        self.visit(0, u64::MAX, |chunk, _| {
            match cur.as_mut() {
                Some((s, n)) if *s + *n == chunk => *n += LEAF_PAGES,
                _ => {
                    if let Some((s, n)) = cur.take() {
                        f(s, n);
                    }
                    cur = Some((chunk, LEAF_PAGES));
                }
            }
            true
        });
        if let Some((s, n)) = cur {
            f(s, n);
        }
    }

    /// Calls `f` with every guest mapping that intersects `[first, last]`, in IOVA order, each
    /// clipped to the range. Returns early when `f` returns `false`.
    pub fn mappings(&self, first: u64, last: u64, mut f: impl FnMut(Run) -> bool) {
        // A mapping's pages are contiguous in IOVA and GPA with one permission, and its last
        // page carries END: a run is open from a mapping's first visited page until END, and
        // stays open across chunk edges.
        let mut open: Option<Run> = None;
        let mut stop = false;
        // Adds `n` pages from `page` to the open run (or opens one); emits it at the END.
        let mut push = |page: u64, n: u64, gpa: u64, perm: Perm, end: bool| -> bool {
            let run = match open.take() {
                Some(mut r) => {
                    debug_assert_eq!(r.iova_page + r.pages, page, "a mapping continues");
                    r.pages += n;
                    r
                }
                None => Run {
                    iova_page: page,
                    gpa_page: gpa,
                    pages: n,
                    perm,
                },
            };
            if end {
                f(run)
            } else {
                open = Some(run);
                true
            }
        };
        self.visit(first, last, |chunk, slot| {
            // `visit` passes only chunks that end at or after `first`.
            let lo = first.saturating_sub(chunk);
            let hi = (last - chunk).min(LEAF_PAGES - 1);
            match slot {
                Slot::Huge(h) => {
                    let p = h.pte(lo);
                    let end = hi == LEAF_PAGES - 1 && h.flag(F_END);
                    stop = !push(chunk + lo, hi - lo + 1, p.gpa_page, p.perm, end);
                }
                Slot::Leaf(leaf) => {
                    let mut i = lo as usize;
                    while let Some(v) = leaf.next_valid(i, hi as usize) {
                        // Pages v..=seg_hi belong to one mapping: up to its END, or to the
                        // end of the window in this chunk.
                        let run_end = next_set_bit(&leaf.bits[F_END], v, hi as usize);
                        let seg_hi = run_end.unwrap_or(hi as usize);
                        let p = leaf.get(v).expect("valid page");
                        let n = (seg_hi - v + 1) as u64;
                        if !push(chunk + v as u64, n, p.gpa_page, p.perm, run_end.is_some()) {
                            stop = true;
                            break;
                        }
                        i = seg_hi + 1;
                        if i > hi as usize {
                            break;
                        }
                    }
                }
            }
            !stop
        });
        if !stop {
            if let Some(r) = open {
                f(r);
            }
        }
    }

    /// Removes every mapping inside `[first, last]`, calling `f` with each removed mapping.
    /// The caller checks [`IoPageTable::check_unmap`] first; pages of a mapping that crosses
    /// the range's edge are removed only inside the range. Returns the pages removed.
    pub fn remove(&mut self, first: u64, last: u64, mut f: impl FnMut(Run)) -> u64 {
        let mut runs = Vec::new();
        self.mappings(first, last, |r| {
            runs.push(r);
            true
        });
        let mut removed = 0;
        for r in &runs {
            removed += self.clear(r.iova_page, r.last_page());
        }
        self.mapped_pages -= removed;
        for r in runs {
            f(r);
        }
        removed
    }

    /// Clears `[first, last]`, freeing emptied nodes. Returns pages cleared.
    fn clear(&mut self, first: u64, last: u64) -> u64 {
        let mut removed = 0;
        let mut page = first;
        while page <= last {
            let chunk = page & !(LEAF_PAGES - 1);
            let hi = (chunk + LEAF_PAGES - 1).min(last);
            let (i3, i2, i1) = (idx(page, 3), idx(page, 2), idx(page, 1));
            let mut free_leaf = false;
            let mut free_l1 = false;
            let mut free_l2 = false;
            if let Some(l2) = self.root.slots[i3].as_deref_mut() {
                if let Some(l1) = l2.slots[i2].as_deref_mut() {
                    if let Some(leaf) = l1.leaves[i1].as_deref_mut() {
                        removed += leaf.clear_range(idx(page, 0), idx(hi, 0));
                        free_leaf = leaf.count == 0;
                    } else if Huge(l1.huge[i1]).valid() {
                        // Only whole chunks: a mapping is never split.
                        l1.huge[i1] = 0;
                        l1.count -= 1;
                        removed += LEAF_PAGES;
                    }
                    if free_leaf {
                        l1.leaves[i1] = None;
                        l1.count -= 1;
                    }
                    free_l1 = l1.count == 0;
                }
                if free_l1 {
                    l2.slots[i2] = None;
                    l2.count -= 1;
                }
                free_l2 = l2.count == 0;
            }
            if free_leaf {
                self.metadata_bytes -= LEAF_BYTES;
            }
            if free_l1 {
                self.metadata_bytes -= L1_BYTES;
            }
            if free_l2 {
                self.root.slots[i3] = None;
                self.metadata_bytes -= DIR_BYTES;
            }
            page = hi + 1;
        }
        removed
    }

    /// Removes everything.
    pub fn clear_all(&mut self) {
        self.root = Dir::new();
        self.mapped_pages = 0;
        self.metadata_bytes = DIR_BYTES;
    }

    /// Translates `[iova, iova + len)` into GPA runs, merging pages contiguous in GPA with
    /// the same permissions even across mapping boundaries. Stops at the first unmapped page
    /// and returns the runs found so far with the IOVA of that page.
    pub fn translate(&self, iova: u64, len: u64, out: &mut Vec<(u64, u64, Perm)>) -> Option<u64> {
        out.clear();
        if len == 0 {
            return None;
        }
        let Some(end) = iova.checked_add(len - 1) else {
            return Some(iova);
        };
        let mut addr = iova;
        loop {
            let page = addr >> PAGE_SHIFT;
            let Some(pte) = self.get(page) else {
                return Some(addr);
            };
            let off = addr & (PAGE_SIZE - 1);
            let chunk_end = ((page << PAGE_SHIFT) | (PAGE_SIZE - 1)).min(end);
            let n = chunk_end - addr + 1;
            let gpa = (pte.gpa_page << PAGE_SHIFT) | off;
            match out.last_mut() {
                Some((g, l, p)) if *g + *l == gpa && *p == pte.perm => *l += n,
                _ => out.push((gpa, n, pte.perm)),
            }
            if chunk_end == end {
                return None;
            }
            addr = chunk_end + 1;
        }
    }
}

enum Slot<'a> {
    Leaf(&'a Leaf),
    Huge(Huge),
}

#[cfg(test)]
#[path = "pagetable_model_tests.rs"]
mod model_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(t: &IoPageTable) -> Vec<(u64, u64, u64)> {
        let mut v = Vec::new();
        t.mappings(0, u64::MAX, |r| {
            v.push((r.iova_page, r.gpa_page, r.pages));
            true
        });
        v
    }

    #[test]
    fn translate_merges_only_contiguous_runs_of_one_permission() {
        let mut t = IoPageTable::default();
        t.map(0, 1, 100, Perm::RW).unwrap();
        // Contiguous in GPA with the same permission: one run across the mappings.
        t.map(2, 2, 102, Perm::RW).unwrap();
        // Contiguous in GPA, another permission: a new run.
        t.map(3, 3, 103, Perm::READ).unwrap();
        // The same permission, a GPA jump: a new run.
        t.map(4, 4, 200, Perm::READ).unwrap();
        let mut out = Vec::new();
        assert_eq!(t.translate(0x800, 5 * PAGE_SIZE - 0x900, &mut out), None);
        assert_eq!(
            out,
            vec![
                ((100 << PAGE_SHIFT) | 0x800, 3 * PAGE_SIZE - 0x800, Perm::RW),
                (103 << PAGE_SHIFT, PAGE_SIZE, Perm::READ),
                (200 << PAGE_SHIFT, PAGE_SIZE - 0x100, Perm::READ),
            ]
        );
        // Stops at the first unmapped page.
        assert_eq!(t.translate(0x4800, 0x2000, &mut out), Some(0x5000));
        assert_eq!(out, vec![((200 << PAGE_SHIFT) | 0x800, 0x800, Perm::READ)]);
    }

    /// The budget check's shortcut is the exact allocation count on an empty table and
    /// never less than it; the exact count knows what exists and what maps huge.
    #[test]
    fn budget_estimate_and_exact_count() {
        let (leaf, l1, dir) = (LEAF_BYTES, L1_BYTES, DIR_BYTES);
        let l1_span = LEAF_PAGES * FANOUT as u64;
        let l2_span = l1_span * FANOUT as u64;
        let mut t = IoPageTable::default();
        assert_eq!(t.alloc_estimate(0, 511), leaf + l1 + dir);
        assert_eq!(t.alloc_estimate(511, 512), 2 * leaf + l1 + dir);
        assert_eq!(
            t.alloc_estimate(l1_span - 1, l1_span),
            2 * leaf + 2 * l1 + dir
        );
        assert_eq!(
            t.alloc_estimate(l2_span - 1, l2_span),
            2 * leaf + 2 * l1 + 2 * dir
        );
        assert_eq!(t.alloc_estimate(l2_span, l2_span + 511), leaf + l1 + dir);
        // An aligned chunk with an aligned GPA maps huge: no leaf.
        assert_eq!(t.alloc_needed(0, 511, 0), l1 + dir);
        // A mapping that starts inside a chunk: its next chunks are aligned again.
        assert_eq!(t.alloc_needed(100, 1535, 100), leaf + l1 + dir);
        // One directory and one L1 however many chunks they hold.
        assert_eq!(t.alloc_needed(0, 8191, 1), 16 * leaf + l1 + dir);
        assert_eq!(t.alloc_needed(0, 511, 1), leaf + l1 + dir);
        assert_eq!(t.alloc_needed(5, 600, 0), 2 * leaf + l1 + dir);
        assert_eq!(t.alloc_needed(512, 1535, 512), l1 + dir);
        assert_eq!(
            t.alloc_needed(l2_span - 1, l2_span, 0),
            2 * leaf + 2 * l1 + 2 * dir
        );
        // What exists is not counted again.
        t.map(0, 3, 0, Perm::RW).unwrap();
        assert_eq!(t.alloc_needed(4, 10, 0), 0);
        assert_eq!(t.alloc_needed(4, 600, 0), leaf);
        assert_eq!(t.alloc_needed(l1_span - 5, l1_span + 5, 0), 2 * leaf + l1);
        assert_eq!(t.alloc_estimate(4, 10), leaf + l1 + dir);
    }

    #[test]
    fn clear_all_empties_the_table_and_its_metadata() {
        let mut t = IoPageTable::default();
        t.map(0, 1000, 0, Perm::RW).unwrap();
        t.map(1 << 30, (1 << 30) + 3, 0, Perm::READ).unwrap();
        t.clear_all();
        assert!(t.is_empty());
        assert_eq!(t.mapped_pages(), 0);
        assert_eq!(t.metadata_bytes(), DIR_BYTES);
        assert_eq!(t.get(5), None);
        assert!(runs(&t).is_empty());
    }

    #[test]
    fn empty_range_queries_inside_a_leaf_and_at_directory_edges() {
        let mut t = IoPageTable::default();
        let chunk = 3 * LEAF_PAGES;
        t.map(chunk + 3, chunk + 3, 0, Perm::RW).unwrap();
        t.map(chunk + 10, chunk + 10, 1, Perm::RW).unwrap();
        assert!(!t.is_range_empty(chunk, chunk + 5));
        assert!(t.is_range_empty(chunk + 4, chunk + 9));
        assert!(t.is_range_empty(chunk + 11, chunk + 511));
        // The last page under an L1 directory, and under an L2 directory, seen from a range
        // that ends on the first page of the next one.
        let l1_span = LEAF_PAGES * FANOUT as u64;
        let l2_span = l1_span * FANOUT as u64;
        for span in [l1_span, l2_span] {
            let mut t = IoPageTable::default();
            t.map(span - 1, span - 1, 0, Perm::RW).unwrap();
            assert!(!t.is_range_empty(0, span), "span {span:#x}");
            assert!(!t.is_range_empty(span - 1, span));
            assert!(t.is_range_empty(0, span - 2));
            assert!(t.is_range_empty(span, 2 * span));
            let mut found = Vec::new();
            t.mappings(0, span, |r| {
                found.push(r.iova_page);
                true
            });
            assert_eq!(found, vec![span - 1]);
        }
    }

    #[test]
    fn mappings_in_a_window_are_clipped_and_keep_their_boundaries() {
        let mut t = IoPageTable::default();
        // Two mappings contiguous in IOVA and GPA with one permission stay two; a third
        // crosses a leaf edge.
        t.map(10, 19, 100, Perm::RW).unwrap();
        t.map(20, 29, 110, Perm::RW).unwrap();
        t.map(500, 600, 1000, Perm::READ).unwrap();
        assert_eq!(
            runs(&t),
            vec![(10, 100, 10), (20, 110, 10), (500, 1000, 101)]
        );
        let window = |first, last| {
            let mut v = Vec::new();
            t.mappings(first, last, |r| {
                v.push((r.iova_page, r.gpa_page, r.pages, r.perm));
                true
            });
            v
        };
        assert_eq!(
            window(15, 24),
            vec![(15, 105, 5, Perm::RW), (20, 110, 5, Perm::RW)]
        );
        assert_eq!(window(510, 515), vec![(510, 1010, 6, Perm::READ)]);
        assert_eq!(window(505, 1000), vec![(505, 1005, 96, Perm::READ)]);
        assert_eq!(window(30, 499), vec![]);
        // Stopping after the first run.
        let mut n = 0;
        t.mappings(0, u64::MAX, |_| {
            n += 1;
            false
        });
        assert_eq!(n, 1);
    }

    /// Chunks mapped huge (512 aligned pages to an aligned GPA) report whole and clipped
    /// runs like leaves do.
    #[test]
    fn huge_chunks_in_mapping_windows() {
        let mut t = IoPageTable::default();
        t.map(512, 1535, 512, Perm::RW).unwrap();
        t.map(1536, 2047, 1536, Perm::RW).unwrap();
        assert_eq!(runs(&t), vec![(512, 512, 1024), (1536, 1536, 512)]);
        let window = |first, last| {
            let mut v = Vec::new();
            t.mappings(first, last, |r| {
                v.push((r.iova_page, r.gpa_page, r.pages));
                true
            });
            v
        };
        assert_eq!(window(600, 700), vec![(600, 600, 101)]);
        assert_eq!(window(1000, 1100), vec![(1000, 1000, 101)]);
        assert_eq!(window(1500, 1600), vec![(1500, 1500, 36), (1536, 1536, 65)]);
        let mut out = Vec::new();
        assert_eq!(
            t.translate(1535 << PAGE_SHIFT, 2 * PAGE_SIZE, &mut out),
            None
        );
        assert_eq!(out, vec![(1535 << PAGE_SHIFT, 2 * PAGE_SIZE, Perm::RW)]);
    }

    #[test]
    fn permission_union_and_the_top_of_the_space() {
        assert_eq!(Perm::READ.union(Perm::WRITE), Perm::RW);
        assert_eq!(Perm::RW.union(Perm::READ), Perm::RW);
        let top = MAX_IOVA >> PAGE_SHIFT;
        let mut t = IoPageTable::default();
        assert_eq!(t.map(top, top, 0, Perm::RW), Ok(()));
        assert_eq!(
            t.map(top, top + 1, 5, Perm::RW),
            Err(TableError::OutOfRange)
        );
        let gtop = MAX_GPA >> PAGE_SHIFT;
        assert_eq!(t.map(0, 1, gtop - 1, Perm::RW), Ok(()));
        assert_eq!(t.map(5, 6, gtop, Perm::RW), Err(TableError::OutOfRange));
    }

    #[test]
    fn map_translate_unmap() {
        let mut t = IoPageTable::default();
        t.map(10, 19, 100, Perm::RW).unwrap();
        assert_eq!(t.get(10).unwrap().gpa_page, 100);
        assert!(t.get(10).unwrap().start);
        assert!(t.get(19).unwrap().end);
        assert_eq!(t.get(20), None);
        assert_eq!(t.map(19, 25, 0, Perm::READ), Err(TableError::Overlap));
        assert_eq!(t.check_unmap(10, 14), Err(TableError::Split));
        assert_eq!(t.check_unmap(12, 30), Err(TableError::Split));
        assert_eq!(t.check_unmap(0, 30), Ok(()));
        let mut removed = Vec::new();
        assert_eq!(t.remove(0, 30, |r| removed.push(r)), 10);
        assert_eq!(removed.len(), 1);
        assert!(t.is_empty());
        assert_eq!(t.metadata_bytes(), DIR_BYTES);
    }

    #[test]
    fn adjacent_mappings_stay_apart() {
        let mut t = IoPageTable::default();
        t.map(0, 4, 10, Perm::READ).unwrap();
        t.map(5, 9, 15, Perm::READ).unwrap();
        assert_eq!(runs(&t), vec![(0, 10, 5), (5, 15, 5)]);
        assert_eq!(t.check_unmap(0, 4), Ok(()));
        t.remove(0, 4, |_| {});
        assert_eq!(runs(&t), vec![(5, 15, 5)]);
        // Translation merges GPA-contiguous pages across mappings.
        t.map(0, 4, 10, Perm::READ).unwrap();
        let mut out = Vec::new();
        assert_eq!(t.translate(0x800, 9 * 4096, &mut out), None);
        assert_eq!(out, vec![(10 * 4096 + 0x800, 9 * 4096, Perm::READ)]);
        assert_eq!(t.translate(0, 11 * 4096, &mut out), Some(10 * 4096));
    }

    #[test]
    fn huge_chunks_are_used_when_aligned() {
        let mut t = IoPageTable::default();
        // 4 MiB + 1 page at 2 MiB-aligned IOVA and GPA: two huge entries and a leaf.
        t.map(512, 512 * 3, 1024, Perm::RW).unwrap();
        assert_eq!(t.mapped_pages(), 1025);
        assert_eq!(t.metadata_bytes(), DIR_BYTES * 2 + L1_BYTES + LEAF_BYTES);
        assert_eq!(t.get(512 + 700).unwrap().gpa_page, 1024 + 700);
        assert!(t.get(512).unwrap().start);
        assert!(!t.get(513).unwrap().start);
        assert!(t.get(512 * 3).unwrap().end);
        assert_eq!(runs(&t), vec![(512, 1024, 1025)]);
        assert_eq!(t.check_unmap(512, 1023), Err(TableError::Split));
        assert_eq!(t.remove(0, u64::MAX >> PAGE_SHIFT, |_| {}), 1025);
        assert_eq!(t.metadata_bytes(), DIR_BYTES);
    }

    #[test]
    fn edges_of_the_address_space() {
        let mut t = IoPageTable::default();
        let top = MAX_IOVA >> PAGE_SHIFT;
        t.map(top, top, 1, Perm::READ).unwrap();
        assert_eq!(
            t.map(top, top + 1, 1, Perm::READ),
            Err(TableError::OutOfRange)
        );
        assert_eq!(
            t.map(0, 0, (MAX_GPA >> PAGE_SHIFT) + 1, Perm::READ),
            Err(TableError::OutOfRange)
        );
        assert!(!t.is_range_empty(0, u64::MAX));
        assert_eq!(t.remove(0, u64::MAX, |_| {}), 1);
        let mut out = Vec::new();
        assert_eq!(t.translate(u64::MAX, 2, &mut out), Some(u64::MAX));
        assert_eq!(
            t.translate(u64::MAX - 4095, 4096, &mut out),
            Some(u64::MAX - 4095)
        );
    }

    #[test]
    fn budget_gives_no_memory() {
        let mut t = IoPageTable::new(DIR_BYTES * 2 + L1_BYTES + LEAF_BYTES);
        t.map(0, 0, 0, Perm::READ).unwrap();
        // Same leaf: no new allocation.
        t.map(5, 5, 0, Perm::READ).unwrap();
        assert_eq!(t.map(512, 512, 0, Perm::READ), Err(TableError::NoMemory));
        assert_eq!(t.mapped_pages(), 2);
    }
}
