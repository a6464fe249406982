//! The bytes a map would allocate, for the metadata budget: a cheap upper bound, and the
//! exact count (the nodes' forms follow from their content, see `l1`).

use super::l1::{L1, L1_BYTES, LEAF_BYTES, SPARSE_L1_MAX};
use super::{idx, l1_index, sparse, IoPageTable, L1_PAGES, L2_BYTES, LEVEL_BITS};

impl IoPageTable {
    /// Upper bound of the bytes that mapping `[first, last]` may allocate: per L1 table, a
    /// dense table plus what converting its sparse entries may add, and a dense leaf per
    /// chunk.
    pub(super) fn alloc_estimate(&self, first: u64, last: u64) -> u64 {
        let chunks = (last >> LEVEL_BITS) - (first >> LEVEL_BITS) + 1;
        let l1s = (last >> (2 * LEVEL_BITS)) - (first >> (2 * LEVEL_BITS)) + 1;
        let l2s = (last >> (3 * LEVEL_BITS)) - (first >> (3 * LEVEL_BITS)) + 1;
        chunks
            .saturating_mul(LEAF_BYTES)
            .saturating_add(l1s.saturating_mul(L1_BYTES + sparse::bytes_for(SPARSE_L1_MAX)))
            .saturating_add(l2s.saturating_mul(L2_BYTES))
    }

    /// Exact bytes `map(first, last, gpa_page, ..)` would add (slow path of the budget check;
    /// the range is unmapped).
    pub(super) fn alloc_needed(&self, first: u64, last: u64, gpa_page: u64) -> u64 {
        let mut bytes = 0;
        let mut seen_l2 = u64::MAX;
        let mut page = first;
        while page <= last {
            let hi = (page | (L1_PAGES - 1)).min(last);
            let l2 = self.root.slots[idx(page, 3)].as_deref();
            if l2.is_none() && seen_l2 != page >> (3 * LEVEL_BITS) {
                bytes += L2_BYTES;
                seen_l2 = page >> (3 * LEVEL_BITS);
            }
            let l1 = l2.and_then(|d| d.slots[idx(page, 2)].as_ref());
            let range = (l1_index(page), l1_index(hi));
            let gpa = gpa_page + (page - first);
            bytes += L1::bytes_after_map(l1, range, gpa) - l1.map_or(0, L1::bytes);
            page = hi + 1;
        }
        bytes
    }
}
