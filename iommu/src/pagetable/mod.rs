//! The page-granular I/O page table of one domain: IOVA page -> (GPA page, permissions,
//! mapping boundaries), at 4 KiB granularity, for a 48-bit IOVA space.
//!
//! Layout (see `iommu/DESIGN.md`): a 4-level, 512-ary radix tree (root, L2, L1, leaf). A
//! dense leaf covers 2 MiB of IOVA and stores, per 4 KiB page, a 32-bit GPA frame number
//! (GPAs below 2^44) in a `[u32; 512]` array and six per-page flag bitmaps (`VALID`, `READ`,
//! `WRITE`, `MMIO`, `START`, `END`): 4.77 bytes per page. `START`/`END` mark the first and
//! last page of the guest MAP request that created the page, so UNMAP's "never split a
//! mapping" rule is two bit tests, with no heap object per mapping. A 2 MiB chunk of one
//! mapping whose IOVA and GPA are 2 MiB aligned is a single 8-byte huge entry in the L1 table
//! instead of a leaf.
//!
//! Sparse layouts: a leaf holding at most 256 pages is a sorted vector of 8-byte page entries
//! (`sparse`), and so is a whole L1 table (1 GiB) holding at most 512 pages and no huge
//! entry (`l1`). A node takes the dense form only when that is smaller (or, for an L1 table,
//! when its vector would pass 4 KiB), and goes back when pages leave.
//!
//! Files: `leaf` (the dense leaf and the huge entry), `sparse` (page entries), `l1` (the L1
//! table and its chunks), `budget` (the bytes a map would allocate), this file (the table,
//! its walks and its public types).
//!
//! All addresses here are page numbers (`u64`, address >> 12) and ranges are inclusive
//! `[first, last]`, so a range ending at `u64::MAX >> 12` is representable.

use std::fmt;

mod budget;
mod l1;
mod leaf;
mod sparse;

use l1::{Slot, L1};

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

/// Pages of one L1 table.
const L1_PAGES: u64 = LEAF_PAGES << LEVEL_BITS;

/// Level 2: 512 GiB, 512 L1 tables.
struct L2 {
    slots: [Option<L1>; FANOUT],
    /// Present tables, so that an emptied L2 is freed.
    count: u16,
}

impl L2 {
    fn new() -> Box<L2> {
        Box::new(L2 {
            slots: std::array::from_fn(|_| None),
            count: 0,
        })
    }
}

/// The root: 256 TiB, 512 L2 tables; never freed.
struct Root {
    slots: [Option<Box<L2>>; FANOUT],
}

const ROOT_BYTES: u64 = std::mem::size_of::<Root>() as u64;
const L2_BYTES: u64 = std::mem::size_of::<L2>() as u64;

#[inline]
fn idx(page: u64, level: u32) -> usize {
    ((page >> (LEVEL_BITS * level)) as usize) & (FANOUT - 1)
}

/// Page `page`'s index in its L1 table.
#[inline]
fn l1_index(page: u64) -> usize {
    (page & (L1_PAGES - 1)) as usize
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
    root: Box<Root>,
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
            root: Box::new(Root {
                slots: std::array::from_fn(|_| None),
            }),
            mapped_pages: 0,
            metadata_bytes: ROOT_BYTES,
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

    /// The L1 table holding `page`, if any.
    #[inline]
    fn l1(&self, page: u64) -> Option<&L1> {
        let l2 = self.root.slots[idx(page, 3)].as_deref()?;
        l2.slots[idx(page, 2)].as_ref()
    }

    /// The translation of IOVA page `page`, if mapped.
    #[inline]
    pub fn get(&self, page: u64) -> Option<Pte> {
        if page > MAX_IOVA >> PAGE_SHIFT {
            return None;
        }
        self.l1(page)?.get(l1_index(page))
    }

    /// Visits every present chunk intersecting `[first, last]` in IOVA order, skipping empty
    /// subtrees. `f(chunk_first_page, slot)` returns `false` to stop.
    fn visit<'a>(&'a self, first: u64, last: u64, mut f: impl FnMut(u64, Slot<'a>) -> bool) {
        let last = last.min(MAX_IOVA >> PAGE_SHIFT);
        if first > last {
            return;
        }
        let span2 = 1u64 << (LEVEL_BITS * 3);
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
                    let base2 = base3 + (i2 as u64) * L1_PAGES;
                    let Some(l1) = l2.slots[i2].as_ref() else {
                        continue;
                    };
                    let lo1 = if base2 <= first { idx(first, 1) } else { 0 };
                    let hi1 = if base2 + L1_PAGES > last {
                        idx(last, 1)
                    } else {
                        FANOUT - 1
                    };
                    let mut go = |c: usize, slot| f(base2 + (c as u64) * LEAF_PAGES, slot);
                    if !l1.visit(lo1, hi1, &mut go) {
                        return;
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
            // `visit` passes only chunks that end at or after `first`.
            let lo = first.saturating_sub(chunk) as usize;
            let hi = (last - chunk).min(LEAF_PAGES - 1) as usize;
            empty = match slot {
                Slot::Huge(_) => false,
                Slot::Leaf(leaf) => !leaf.any_valid(lo, hi),
                Slot::Sparse(es) => sparse::in_chunk(es, lo, hi).is_empty(),
            };
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
        let taken = match pages {
            1 => self.get(first).is_some(),
            _ => !self.is_range_empty(first, last),
        };
        if taken {
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
            let hi = (page | (L1_PAGES - 1)).min(last);
            let gpa = gpa_page + (page - first);
            let slot = self.l1_slot_mut(page);
            let before = slot.as_ref().map_or(0, L1::bytes);
            let l1 = slot.get_or_insert_with(|| L1::Sparse(Vec::new()));
            l1.map(
                (l1_index(page), l1_index(hi)),
                gpa,
                perm,
                page == first,
                hi == last,
            );
            let after = l1.bytes();
            self.metadata_bytes = self.metadata_bytes + after - before;
            page = hi + 1;
        }
        self.mapped_pages += pages;
        Ok(())
    }

    /// The L2 slot of `page`'s L1 table, its L2 created (and counting the table as present).
    fn l1_slot_mut(&mut self, page: u64) -> &mut Option<L1> {
        let slot3 = &mut self.root.slots[idx(page, 3)];
        let l2 = slot3.get_or_insert_with(|| {
            self.metadata_bytes += L2_BYTES;
            L2::new()
        });
        let slot2 = &mut l2.slots[idx(page, 2)];
        if slot2.is_none() {
            l2.count += 1;
        }
        slot2
    }

    /// Calls `f(first_page, pages)` for each maximal span of IOVA pages covered by populated
    /// chunks (of 512 pages each), in IOVA order: where something may be mapped. Cheap: it
    /// walks directories and sparse entries, not the pages of dense leaves.
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
                    let end = hi == LEAF_PAGES - 1 && h.flag(leaf::F_END);
                    stop = !push(chunk + lo, hi - lo + 1, p.gpa_page, p.perm, end);
                }
                Slot::Leaf(leaf) => {
                    let mut i = lo as usize;
                    while let Some(v) = leaf.next_valid(i, hi as usize) {
                        // Pages v..=seg_hi belong to one mapping: up to its END, or to the
                        // end of the window in this chunk.
                        let run_end = leaf.next_end(v, hi as usize);
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
                Slot::Sparse(es) => {
                    for &e in sparse::in_chunk(es, lo as usize, hi as usize) {
                        let i = (sparse::index(e) % FANOUT) as u64;
                        let p = sparse::pte(e);
                        if !push(chunk + i, 1, p.gpa_page, p.perm, p.end) {
                            stop = true;
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
            let hi = (page | (L1_PAGES - 1)).min(last);
            let i3 = idx(page, 3);
            if let Some(l2) = self.root.slots[i3].as_deref_mut() {
                let slot = &mut l2.slots[idx(page, 2)];
                if let Some(l1) = slot.as_mut() {
                    let before = l1.bytes();
                    removed += l1.clear(l1_index(page), l1_index(hi));
                    let after = if l1.pages() == 0 {
                        *slot = None;
                        l2.count -= 1;
                        0
                    } else {
                        l1.bytes()
                    };
                    self.metadata_bytes = self.metadata_bytes + after - before;
                }
                if l2.count == 0 {
                    self.root.slots[i3] = None;
                    self.metadata_bytes -= L2_BYTES;
                }
            }
            page = hi + 1;
        }
        removed
    }

    /// Removes everything.
    pub fn clear_all(&mut self) {
        *self = Self::new(self.budget_bytes);
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

#[cfg(test)]
impl IoPageTable {
    /// The metadata bytes recomputed from the nodes, each checked (`L1::check`).
    fn recount(&self) -> u64 {
        let mut bytes = ROOT_BYTES;
        for l2 in self.root.slots.iter().flatten() {
            let present: Vec<&L1> = l2.slots.iter().flatten().collect();
            assert_eq!(present.len(), usize::from(l2.count));
            assert!(!present.is_empty() && present.iter().all(|l1| l1.pages() > 0));
            bytes += L2_BYTES + present.iter().map(|l1| l1.check()).sum::<u64>();
        }
        bytes
    }
}

#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod tests;
