//! Dirty bitmaps of guest RAM, one bit per 4 KiB guest-physical page.
//!
//! Devices report the pages they wrote by IOVA (VFIO `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`,
//! iommufd `IOMMU_HWPT_GET_DIRTY_BITMAP`, vfio-user `DMA_LOGGING_REPORT`); migration
//! needs them by GPA. The virtio-iommu state translates one into the other through its page
//! tables (see [`crate::viommu::Viommu::harvest_dirty`]) and ORs the result into a
//! [`DirtyBitmap`], which only knows guest-physical pages.
//!
//! The bitmap covers the guest's RAM ranges only; a page outside them is ignored (and
//! counted, see [`DirtyBitmap::outside`]). Walking it skips clean 64-page words, so a
//! mostly clean 1 GiB bitmap (32 KiB) costs a few microseconds to scan.

use crate::pagetable::PAGE_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    /// First guest page of the region.
    first: u64,
    /// Pages in the region.
    pages: u64,
    /// Index of the region's first bit in the bitmap (a multiple of 64).
    bit: u64,
}

/// A bitmap of dirty guest pages over a fixed set of RAM ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    regions: Vec<Region>,
    words: Vec<u64>,
    outside: u64,
}

impl DirtyBitmap {
    /// A clean bitmap over `ram`, given as `(GPA, bytes)` ranges (4 KiB aligned; partial
    /// pages are dropped).
    pub fn new(ram: &[(u64, u64)]) -> Self {
        let mut sorted: Vec<(u64, u64)> = ram
            .iter()
            .map(|&(gpa, len)| (gpa.div_ceil(PAGE_SIZE), (gpa + len) / PAGE_SIZE))
            .filter(|&(first, end)| end > first)
            .collect();
        sorted.sort_unstable();
        let mut regions = Vec::new();
        let mut bit = 0u64;
        for (first, end) in sorted {
            let pages = end - first;
            regions.push(Region { first, pages, bit });
            bit += pages.next_multiple_of(64);
        }
        Self {
            regions,
            words: vec![0; (bit / 64) as usize],
            outside: 0,
        }
    }

    /// Pages the bitmap covers.
    pub fn pages(&self) -> u64 {
        self.regions.iter().map(|r| r.pages).sum()
    }

    /// Marks `pages` guest pages from page `first` (GPA / 4096) dirty.
    pub fn mark(&mut self, first: u64, pages: u64) {
        let mut page = first;
        let end = first.saturating_add(pages);
        while page < end {
            let Some(r) = self.region_of(page) else {
                // Skip to the next region (or to the end).
                let next = self
                    .regions
                    .iter()
                    .map(|r| r.first)
                    .find(|&f| f > page)
                    .unwrap_or(end)
                    .min(end);
                self.outside += next - page;
                page = next;
                continue;
            };
            let n = (r.first + r.pages).min(end) - page;
            let bit = r.bit + (page - r.first);
            set_bits(&mut self.words, bit, n);
            page += n;
        }
    }

    /// Marks dirty the pages whose bits are set in `bits` (bit `i` = guest page `first + i`),
    /// looking at the first `nbits` bits only.
    pub fn mark_bits(&mut self, first: u64, bits: &[u64], nbits: u64) {
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            let base = w as u64 * 64;
            if base >= nbits {
                break;
            }
            if nbits - base < 64 {
                word &= (1u64 << (nbits - base)) - 1;
            }
            while word != 0 {
                let i = u64::from(word.trailing_zeros());
                // Runs of set bits become one call.
                let run = u64::from((word >> i).trailing_ones());
                self.mark(first + base + i, run);
                word = if i + run >= 64 {
                    0
                } else {
                    word & !(((1u64 << run) - 1) << i)
                };
            }
        }
    }

    /// Whether guest page `page` is dirty.
    pub fn is_dirty(&self, page: u64) -> bool {
        self.region_of(page).is_some_and(|r| {
            let bit = r.bit + (page - r.first);
            self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Pages marked outside the RAM ranges (ignored) so far.
    pub fn outside(&self) -> u64 {
        self.outside
    }

    /// Clears every page.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// ORs `other` into `self`. Both must cover the same ranges; otherwise `other` is ORed
    /// page by page.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        if self.regions == other.regions {
            for (a, b) in self.words.iter_mut().zip(&other.words) {
                *a |= b;
            }
        } else {
            other.for_each_run(|gpa, len| self.mark(gpa / PAGE_SIZE, len / PAGE_SIZE));
        }
        self.outside += other.outside;
    }

    /// Calls `f(gpa, bytes)` for each maximal run of dirty pages, in GPA order, skipping clean
    /// words.
    pub fn for_each_run(&self, mut f: impl FnMut(u64, u64)) {
        for r in &self.regions {
            let mut run: Option<(u64, u64)> = None;
            let first_word = (r.bit / 64) as usize;
            let words = r.pages.div_ceil(64) as usize;
            for (k, &word) in self.words[first_word..first_word + words]
                .iter()
                .enumerate()
            {
                if word == 0 {
                    if let Some((s, n)) = run.take() {
                        f(s * PAGE_SIZE, n * PAGE_SIZE);
                    }
                    continue;
                }
                for b in 0..64u64 {
                    let idx = k as u64 * 64 + b;
                    if idx >= r.pages {
                        break;
                    }
                    let page = r.first + idx;
                    if word & (1 << b) != 0 {
                        match run.as_mut() {
                            Some((s, n)) if *s + *n == page => *n += 1,
                            _ => {
                                if let Some((s, n)) = run.take() {
                                    f(s * PAGE_SIZE, n * PAGE_SIZE);
                                }
                                run = Some((page, 1));
                            }
                        }
                    }
                }
            }
            if let Some((s, n)) = run {
                f(s * PAGE_SIZE, n * PAGE_SIZE);
            }
        }
    }

    /// The dirty runs as `(gpa, bytes)`.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        self.for_each_run(|g, l| v.push((g, l)));
        v
    }

    fn region_of(&self, page: u64) -> Option<Region> {
        let i = self.regions.partition_point(|r| r.first <= page);
        let r = *self.regions.get(i.checked_sub(1)?)?;
        (page < r.first + r.pages).then_some(r)
    }
}

/// Sets `n` bits from bit `start`.
fn set_bits(words: &mut [u64], start: u64, n: u64) {
    let mut bit = start;
    let end = start + n;
    while bit < end {
        let w = (bit / 64) as usize;
        let off = bit % 64;
        let take = (64 - off).min(end - bit);
        let mask = if take == 64 {
            u64::MAX
        } else {
            ((1u64 << take) - 1) << off
        };
        if let Some(word) = words.get_mut(w) {
            *word |= mask;
        }
        bit += take;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const MIB: u64 = 1 << 20;

    #[test]
    fn marks_counts_and_walks_runs() {
        // Two RAM ranges with a hole, like below and above the PCI hole.
        let mut b = DirtyBitmap::new(&[(0, 3 * MIB), (4 * MIB, MIB)]);
        assert_eq!(b.pages(), 768 + 256);
        b.mark(1, 3);
        b.mark(767, 2); // the last page of range 0, then the hole
        b.mark(1024, 1);
        assert_eq!(b.count(), 5);
        assert_eq!(b.outside(), 1);
        assert!(b.is_dirty(2) && !b.is_dirty(0) && b.is_dirty(1024));
        assert_eq!(
            b.runs(),
            vec![(0x1000, 0x3000), (767 * 4096, 4096), (4 * MIB, 4096)]
        );
    }

    /// Whole words: `nbits` a multiple of 64 takes every bit of the last word.
    #[test]
    fn mark_bits_takes_whole_words() {
        let mut b = DirtyBitmap::new(&[(0, 64 * MIB)]);
        b.mark_bits(0, &[u64::MAX], 64);
        assert_eq!(b.count(), 64);
        b.mark_bits(1000, &[1, u64::MAX, 0], 128);
        assert_eq!(b.count(), 64 + 1 + 64);
        assert!(b.is_dirty(1000) && b.is_dirty(1064) && b.is_dirty(1127) && !b.is_dirty(1001));
    }

    #[test]
    fn mark_bits_translates_by_offset() {
        let mut b = DirtyBitmap::new(&[(0, 64 * MIB)]);
        let bits = [0b1011u64, 1 << 63, u64::MAX];
        b.mark_bits(100, &bits, 130);
        let pages: Vec<u64> = (0..16384).filter(|&p| b.is_dirty(p)).collect();
        let mut want = vec![100, 101, 103, 100 + 127];
        want.extend(228..230);
        assert_eq!(pages, want);
    }

    #[test]
    fn merge_of_different_layouts_goes_page_by_page() {
        let mut a = DirtyBitmap::new(&[(0, MIB)]);
        let mut b = DirtyBitmap::new(&[(0, 2 * MIB)]);
        b.mark(10, 2);
        b.mark(300, 1);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.outside(), 1);
    }

    proptest! {
        /// `mark_bits` marks the pages of the set bits among the first `nbits`, and no other.
        #[test]
        fn mark_bits_matches_a_set_of_bits(
            words in proptest::collection::vec(any::<u64>(), 1..4),
            nbits in 0u64..256,
            first in 0u64..300,
        ) {
            let mut b = DirtyBitmap::new(&[(0, 4 * MIB)]);
            b.mark_bits(first, &words, nbits);
            let want: BTreeSet<u64> = (0..nbits.min(words.len() as u64 * 64))
                .filter(|&i| words[(i / 64) as usize] & (1 << (i % 64)) != 0)
                .map(|i| first + i)
                .collect();
            let got: BTreeSet<u64> = (0..1024).filter(|&p| b.is_dirty(p)).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn matches_a_set_of_pages(marks in proptest::collection::vec((0u64..2000, 0u64..200), 0..40)) {
            let ram = [(0, 2 * MIB), (3 * MIB, 4 * MIB)];
            let mut b = DirtyBitmap::new(&ram);
            let mut set = BTreeSet::new();
            let in_ram = |p: u64| p < 512 || (768..1792).contains(&p);
            let mut outside = 0;
            prop_assert!(b.is_clean());
            for (first, n) in marks {
                b.mark(first, n);
                set.extend((first..first + n).filter(|&p| in_ram(p)));
                outside += (first..first + n).filter(|&p| !in_ram(p)).count() as u64;
            }
            prop_assert_eq!(b.count(), set.len() as u64);
            prop_assert_eq!(b.is_clean(), set.is_empty());
            prop_assert_eq!(b.outside(), outside);
            let mut walked = BTreeSet::new();
            b.for_each_run(|g, l| walked.extend(g / 4096..(g + l) / 4096));
            prop_assert_eq!(walked, set);
        }
    }
}
