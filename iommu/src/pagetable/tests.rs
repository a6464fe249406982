//! Unit tests of the page table: examples at the edges.

use super::l1::{L1_BYTES, LEAF_BYTES};
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

/// The budget check's shortcut is never less than the exact count; the exact count knows
/// what exists, what maps huge, and which form each node takes.
#[test]
fn budget_estimate_and_exact_count() {
    let (leaf, l1, l2) = (LEAF_BYTES, L1_BYTES, L2_BYTES);
    let sparse_l1 = sparse::bytes_for(l1::SPARSE_L1_MAX);
    let l1_span = L1_PAGES;
    let l2_span = l1_span * FANOUT as u64;
    let mut t = IoPageTable::default();
    assert_eq!(t.alloc_estimate(0, 511), leaf + l1 + sparse_l1 + l2);
    assert_eq!(t.alloc_estimate(511, 512), 2 * leaf + l1 + sparse_l1 + l2);
    assert_eq!(
        t.alloc_estimate(l1_span - 1, l1_span),
        2 * (leaf + l1 + sparse_l1) + l2
    );
    assert_eq!(
        t.alloc_estimate(l2_span - 1, l2_span),
        2 * (leaf + l1 + sparse_l1 + l2)
    );
    assert_eq!(
        t.alloc_estimate(l2_span, l2_span + 511),
        leaf + l1 + sparse_l1 + l2
    );
    // Two L1 tables under one new L2: the L2 counted once.
    assert_eq!(t.alloc_needed(l1_span - 1, l1_span, 0), 2 * 8 + l2);
    assert_eq!(
        t.alloc_needed(l2_span + l1_span - 1, l2_span + l1_span, 0),
        2 * 8 + l2
    );
    // An aligned chunk with an aligned GPA maps huge: a dense L1 and no leaf.
    assert_eq!(t.alloc_needed(0, 511, 0), l1 + l2);
    // A mapping that starts inside a chunk: its next chunks are aligned again.
    assert_eq!(t.alloc_needed(100, 1535, 100), leaf + l1 + l2);
    // One directory and one L1 however many chunks they hold.
    assert_eq!(t.alloc_needed(0, 8191, 1), 16 * leaf + l1 + l2);
    // 512 pages, not huge: one sparse L1 of 512 entries (4 KiB).
    assert_eq!(t.alloc_needed(0, 511, 1), 4096 + l2);
    // 596 pages: a dense L1 with a dense leaf (507 pages) and a sparse one (89 entries in a
    // vector of 128).
    assert_eq!(t.alloc_needed(5, 600, 0), leaf + 128 * 8 + l1 + l2);
    assert_eq!(t.alloc_needed(0, 9, 0), 16 * 8 + l2);
    assert_eq!(t.alloc_needed(l2_span - 1, l2_span, 0), 2 * (8 + l2));
    // What exists is not counted again.
    t.map(0, 3, 0, Perm::RW).unwrap();
    assert_eq!(t.metadata_bytes(), ROOT_BYTES + l2 + 4 * 8);
    assert_eq!(t.alloc_needed(4, 10, 0), (16 - 4) * 8);
    assert_eq!(t.alloc_needed(4, 600, 0), l1 + leaf + 128 * 8 - 4 * 8);
    assert_eq!(t.alloc_needed(l1_span - 5, l1_span + 5, 0), 96 + 64);
    for (first, last, gpa) in [(4, 10, 0), (4, 600, 0), (l1_span - 5, l1_span + 5, 0)] {
        assert!(t.alloc_estimate(first, last) >= t.alloc_needed(first, last, gpa));
    }
}

#[test]
fn clear_all_empties_the_table_and_its_metadata() {
    let mut t = IoPageTable::default();
    t.map(0, 1000, 0, Perm::RW).unwrap();
    t.map(1 << 30, (1 << 30) + 3, 0, Perm::READ).unwrap();
    t.clear_all();
    assert!(t.is_empty());
    assert_eq!(t.mapped_pages(), 0);
    assert_eq!(t.metadata_bytes(), ROOT_BYTES);
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
    assert_eq!(t.metadata_bytes(), ROOT_BYTES);
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
    assert_eq!(t.metadata_bytes(), ROOT_BYTES + L2_BYTES + L1_BYTES + 8);
    assert_eq!(t.get(512 + 700).unwrap().gpa_page, 1024 + 700);
    assert!(t.get(512).unwrap().start);
    assert!(!t.get(513).unwrap().start);
    assert!(t.get(512 * 3).unwrap().end);
    assert_eq!(runs(&t), vec![(512, 1024, 1025)]);
    assert_eq!(t.check_unmap(512, 1023), Err(TableError::Split));
    assert_eq!(t.remove(0, u64::MAX >> PAGE_SHIFT, |_| {}), 1025);
    assert_eq!(t.metadata_bytes(), ROOT_BYTES);
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
    let mut t = IoPageTable::new(ROOT_BYTES + L2_BYTES + 16);
    t.map(0, 0, 0, Perm::READ).unwrap();
    // The sparse table's vector grows from 8 to 16 bytes: it fits.
    t.map(5, 5, 0, Perm::READ).unwrap();
    assert_eq!(t.map(512, 512, 0, Perm::READ), Err(TableError::NoMemory));
    assert_eq!(t.mapped_pages(), 2);
}

/// A few pages cost 8 bytes each; a leaf turns dense past 256 pages, an L1 table past 512
/// pages or at its first huge chunk, and both turn back as pages leave.
#[test]
fn nodes_are_sparse_until_dense_is_smaller() {
    let base = ROOT_BYTES + L2_BYTES;
    let mut t = IoPageTable::default();
    // One page in each chunk of one L1 table: a sparse table of 512 entries.
    for c in 0..512 {
        t.map(c * 512, c * 512, c, Perm::READ).unwrap();
    }
    assert_eq!(t.metadata_bytes(), base + 4096);
    assert_eq!(t.recount(), t.metadata_bytes());
    // The 513th page: a dense table, 511 one-page sparse leaves and one of two pages.
    t.map(1, 1, 7, Perm::READ).unwrap();
    assert_eq!(t.metadata_bytes(), base + L1_BYTES + 511 * 8 + 16);
    // Chunk 0 at 256 pages is still sparse (2 KiB); at 257 it is a dense leaf.
    t.map(2, 255, 1000, Perm::RW).unwrap();
    assert_eq!(t.metadata_bytes(), base + L1_BYTES + 511 * 8 + 2048);
    t.map(256, 256, 5000, Perm::RW).unwrap();
    assert_eq!(t.metadata_bytes(), base + L1_BYTES + 511 * 8 + LEAF_BYTES);
    assert_eq!(t.recount(), t.metadata_bytes());
    let gpa = |p| t.get(p).map(|e| e.gpa_page);
    assert_eq!(
        [gpa(0), gpa(1), gpa(100), gpa(256), gpa(257), gpa(300 * 512)],
        [Some(0), Some(7), Some(1098), Some(5000), None, Some(300)]
    );
    assert!(t
        .get(255)
        .is_some_and(|e| e.end && !e.start && e.perm == Perm::RW));
    // Back: chunk 0 sparse again, then the table once it holds 512 pages.
    t.remove(256, 256, |_| {});
    assert_eq!(t.metadata_bytes(), base + L1_BYTES + 511 * 8 + 2048);
    t.remove(2, 255, |_| {});
    assert_eq!(t.metadata_bytes(), base + L1_BYTES + 511 * 8 + 16);
    t.remove(1, 1, |_| {});
    assert_eq!(t.metadata_bytes(), base + 4096);
    assert_eq!(runs(&t).len(), 512);
    assert_eq!(runs(&t)[300], (300 * 512, 300, 1));
    // A huge chunk makes a table dense whatever it holds; removing it frees the table.
    t.map(L1_PAGES, L1_PAGES + 511, 0, Perm::RW).unwrap();
    assert_eq!(t.metadata_bytes(), base + 4096 + L1_BYTES);
    t.map(L1_PAGES + 512, L1_PAGES + 512, 0, Perm::RW).unwrap();
    assert_eq!(t.metadata_bytes(), base + 4096 + L1_BYTES + 8);
    t.remove(L1_PAGES, L1_PAGES + 511, |_| {});
    assert_eq!(t.metadata_bytes(), base + 4096 + 8);
    t.remove(L1_PAGES, 2 * L1_PAGES, |_| {});
    assert_eq!(t.metadata_bytes(), base + 4096);
    assert_eq!(t.recount(), t.metadata_bytes());
}

/// Removing part of a huge chunk (a caller that skipped `check_unmap`) keeps the rest, page
/// by page.
#[test]
fn part_of_a_huge_chunk_can_be_removed() {
    let mut t = IoPageTable::default();
    t.map(512, 1023, 512, Perm::RW).unwrap();
    t.map(0, 0, 9, Perm::READ).unwrap();
    assert_eq!(t.clear(600, 700), 101);
    t.mapped_pages -= 101;
    assert_eq!(t.get(599).map(|e| e.gpa_page), Some(599));
    assert_eq!(t.get(600), None);
    assert!(t.get(512).is_some_and(|e| e.start) && t.get(1023).is_some_and(|e| e.end));
    assert_eq!(t.mapped_pages(), 512 - 101 + 1);
    // 412 pages and no huge chunk left: one sparse table (a vector of 512 entries).
    assert_eq!(t.recount(), t.metadata_bytes());
    assert_eq!(t.metadata_bytes(), ROOT_BYTES + L2_BYTES + 4096);
}

/// Walks of a sparse L1 table that start at a later chunk see nothing of the chunks before.
#[test]
fn walks_of_a_sparse_table_start_at_their_chunk() {
    let mut t = IoPageTable::default();
    t.map(3, 3, 10, Perm::RW).unwrap();
    t.map(5 * 512 + 7, 5 * 512 + 8, 20, Perm::READ).unwrap();
    assert!(t.is_range_empty(2 * 512, 5 * 512 + 6));
    assert!(!t.is_range_empty(2 * 512, 5 * 512 + 7));
    let mut seen = Vec::new();
    t.mappings(512, u64::MAX, |r| {
        seen.push((r.iova_page, r.pages));
        true
    });
    assert_eq!(seen, vec![(5 * 512 + 7, 2)]);
    let mut spans = Vec::new();
    t.populated_spans(|s, n| spans.push((s, n)));
    assert_eq!(spans, vec![(0, 512), (5 * 512, 512)]);
}

/// The exact budget count against what maps really allocate, where a sparse table turns
/// dense next to entries of the neighbouring chunk, and where a dense table gains a small
/// sparse leaf.
#[test]
fn exact_count_matches_the_allocation_at_chunk_edges() {
    let check = |t: &mut IoPageTable, first: u64, last: u64, gpa: u64| {
        let need = t.alloc_needed(first, last, gpa);
        let before = t.metadata_bytes();
        t.map(first, last, gpa, Perm::RW).unwrap();
        assert_eq!(
            t.metadata_bytes() - before,
            need,
            "map {first:#x}..={last:#x}"
        );
        assert_eq!(t.recount(), t.metadata_bytes());
    };
    // Entries at the first two pages of chunk 1; 512 pages into chunk 0 make it dense.
    let mut t = IoPageTable::default();
    t.map(512, 513, 0, Perm::READ).unwrap();
    check(&mut t, 0, 511, 1);
    // A dense table (a huge chunk), then two pages in an empty chunk: a 16-byte leaf.
    let mut t = IoPageTable::default();
    t.map(0, 511, 0, Perm::RW).unwrap();
    assert_eq!(t.alloc_needed(3 * 512, 3 * 512 + 1, 7), 16);
    check(&mut t, 3 * 512, 3 * 512 + 1, 7);
    check(&mut t, 3 * 512 + 2, 3 * 512 + 4, 9);
}

/// The last page of a mapping that ends with a huge chunk carries END; the pages before it
/// do not, so an UNMAP that stops inside the chunk would split the mapping.
#[test]
fn a_huge_chunk_ends_its_mapping_on_its_last_page() {
    let mut t = IoPageTable::default();
    t.map(512, 1023, 512, Perm::RW).unwrap();
    assert!(t.get(1023).is_some_and(|p| p.end && !p.start));
    assert!(t.get(1000).is_some_and(|p| !p.end && !p.start));
    assert!(t.get(512).is_some_and(|p| p.start && !p.end));
    assert_eq!(t.check_unmap(512, 1000), Err(TableError::Split));
    assert_eq!(t.check_unmap(512, 1023), Ok(()));
}
