//! The page table against a per-page model (a map from IOVA page to translation and mapping
//! edges), over ranges that cross leaf, L1 and L2 boundaries and the top of the IOVA space,
//! with aligned targets so that huge entries are used; and the metadata budget, which must
//! admit a map exactly when the bytes it allocates fit.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

/// Pages of one L1 table (an L2 slot) and of one L2 table (a root slot).
const L1_SPAN: u64 = LEAF_PAGES << LEVEL_BITS;
const L2_SPAN: u64 = L1_SPAN << LEVEL_BITS;
const TOP: u64 = MAX_IOVA >> PAGE_SHIFT;

/// Places near which ranges start: inside a leaf, across a leaf edge, an L1 edge, an L2 edge,
/// and the end of the space.
fn base() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(L1_SPAN - 700),
        Just(L2_SPAN - 700),
        Just(TOP - 1400),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    /// Map `[first, first + pages - 1]` to `gpa`, with `perm` bits.
    Map(u64, u64, u64, u8),
    /// Remove `[first, last]` (after `check_unmap`).
    Remove(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let perm = prop_oneof![Just(1u8), Just(2), Just(3), Just(7)];
    let gpa = prop_oneof![
        (0u64..4).prop_map(|k| k * LEAF_PAGES),
        (0u64..4096),
        Just((MAX_GPA >> PAGE_SHIFT) - 1200)
    ];
    prop_oneof![
        3 => (base(), 0u64..1400, 1u64..1100, gpa.clone(), perm.clone())
            .prop_map(|(b, o, n, g, p)| Op::Map(b + o, n, g, p)),
        // Ending at the last IOVA page.
        1 => (1u64..1100, gpa, perm).prop_map(|(n, g, p)| Op::Map(TOP - n + 1, n, g, p)),
        1 => (base(), 0u64..1400, 0u64..1100)
            .prop_map(|(b, o, n)| Op::Remove(b + o, b + o + n)),
    ]
}

#[derive(Default)]
struct Model {
    pages: BTreeMap<u64, Pte>,
}

impl Model {
    fn map(&mut self, first: u64, last: u64, gpa: u64, perm: Perm) -> Result<(), TableError> {
        if last > TOP || gpa + (last - first) > MAX_GPA >> PAGE_SHIFT {
            return Err(TableError::OutOfRange);
        }
        if self.pages.range(first..=last).next().is_some() {
            return Err(TableError::Overlap);
        }
        for p in first..=last {
            let pte = Pte {
                gpa_page: gpa + (p - first),
                perm,
                start: p == first,
                end: p == last,
            };
            self.pages.insert(p, pte);
        }
        Ok(())
    }

    fn check_unmap(&self, first: u64, last: u64) -> Result<(), TableError> {
        let bad_first = self.pages.get(&first).is_some_and(|p| !p.start);
        let bad_last = self.pages.get(&last).is_some_and(|p| !p.end);
        if bad_first || bad_last {
            Err(TableError::Split)
        } else {
            Ok(())
        }
    }

    fn remove(&mut self, first: u64, last: u64) -> u64 {
        let gone: Vec<u64> = self.pages.range(first..=last).map(|(&p, _)| p).collect();
        for p in &gone {
            self.pages.remove(p);
        }
        gone.len() as u64
    }

    /// Whole mappings in IOVA order, as the table reports them.
    fn mappings(&self) -> Vec<(u64, u64, u64, Perm)> {
        let mut out: Vec<(u64, u64, u64, Perm)> = Vec::new();
        for (&p, pte) in &self.pages {
            if pte.start {
                out.push((p, pte.gpa_page, 1, pte.perm));
            } else if let Some(last) = out.last_mut() {
                last.2 += 1;
            }
        }
        out
    }
}

fn table_mappings(t: &IoPageTable) -> Vec<(u64, u64, u64, Perm)> {
    let mut v = Vec::new();
    t.mappings(0, u64::MAX, |r| {
        v.push((r.iova_page, r.gpa_page, r.pages, r.perm));
        true
    });
    v
}

fn perm(bits: u8) -> Perm {
    Perm::from_bits(u32::from(bits)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: crate::testing::cases(256),
        ..ProptestConfig::default()
    })]

    /// Every operation agrees with the model: results, every page's translation around the
    /// touched ranges, empty-range queries, unmap checks, the mapping list, translation of
    /// byte ranges, the span walk; and the metadata returns to one directory when empty.
    #[test]
    fn the_table_matches_a_per_page_model(ops in proptest::collection::vec(op(), 1..24)) {
        let mut t = IoPageTable::default();
        let mut m = Model::default();
        let mut probes = Vec::new();
        for op in &ops {
            match *op {
                Op::Map(first, n, gpa, p) => {
                    let last = first + n - 1;
                    prop_assert_eq!(t.map(first, last, gpa, perm(p)), m.map(first, last, gpa, perm(p)));
                    probes.extend([first.saturating_sub(1), first, last, last + 1, first + n / 2]);
                }
                Op::Remove(first, last) => {
                    let check = t.check_unmap(first, last);
                    prop_assert_eq!(check, m.check_unmap(first, last));
                    if check.is_ok() {
                        let mut removed = 0;
                        let n = t.remove(first, last, |r| removed += r.pages);
                        prop_assert_eq!(n, m.remove(first, last));
                        prop_assert_eq!(removed, n);
                    }
                    probes.extend([first.saturating_sub(1), first, last, last + 1]);
                }
            }
            prop_assert_eq!(t.mapped_pages(), m.pages.len() as u64);
            prop_assert_eq!(t.is_empty(), m.pages.is_empty());
            prop_assert_eq!(t.recount(), t.metadata_bytes());
        }
        for &p in &probes {
            prop_assert_eq!(t.get(p), m.pages.get(&p).copied(), "page {:#x}", p);
            for span in [0u64, 1, 600] {
                let last = p.saturating_add(span);
                prop_assert_eq!(
                    t.is_range_empty(p, last),
                    m.pages.range(p..=last).next().is_none(),
                    "range {:#x}..={:#x}", p, last
                );
            }
            // A byte range from the middle of page p over three pages.
            if p < TOP - 4 {
                let mut out = Vec::new();
                let stop = t.translate((p << PAGE_SHIFT) + 0x800, 3 * PAGE_SIZE, &mut out);
                let first_gap = (p..=p + 3).find(|q| !m.pages.contains_key(q));
                match first_gap {
                    Some(q) => prop_assert_eq!(stop, Some((q << PAGE_SHIFT).max((p << PAGE_SHIFT) + 0x800))),
                    None => prop_assert_eq!(stop, None),
                }
                let bytes: u64 = out.iter().map(|r| r.1).sum();
                let mapped = match first_gap {
                    Some(q) => (q << PAGE_SHIFT).saturating_sub((p << PAGE_SHIFT) + 0x800),
                    None => 3 * PAGE_SIZE,
                };
                prop_assert_eq!(bytes, mapped);
                if let Some(&(gpa, _, pr)) = out.first() {
                    let pte = m.pages[&p];
                    prop_assert_eq!(gpa, (pte.gpa_page << PAGE_SHIFT) + 0x800);
                    prop_assert_eq!(pr, pte.perm);
                }
            }
        }
        prop_assert_eq!(table_mappings(&t), m.mappings());
        // Spans cover every mapped page and are ordered, disjoint, 512-page granular.
        let mut spans = Vec::new();
        t.populated_spans(|s, n| spans.push((s, n)));
        prop_assert!(spans.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
        prop_assert!(spans.iter().all(|&(s, n)| s % LEAF_PAGES == 0 && n % LEAF_PAGES == 0 && n > 0));
        for &p in m.pages.keys() {
            prop_assert!(spans.iter().any(|&(s, n)| s <= p && p < s + n), "page {:#x} outside every span", p);
        }
        t.remove(0, u64::MAX, |_| {});
        prop_assert!(t.is_empty());
        prop_assert_eq!(t.metadata_bytes(), ROOT_BYTES);
    }

    /// A map is admitted exactly when the bytes it allocates fit in the budget: with the
    /// budget at the table's size plus that cost it succeeds, one byte less and it fails with
    /// NoMemory, changing nothing.
    #[test]
    fn the_budget_admits_exactly_what_fits(
        before in proptest::collection::vec(op(), 0..6),
        first_base in base(),
        off in 0u64..1400,
        n in 1u64..1100,
        gpa in prop_oneof![(0u64..4).prop_map(|k| k * LEAF_PAGES), 0u64..4096],
    ) {
        let build = || {
            let mut t = IoPageTable::default();
            for op in &before {
                if let Op::Map(f, n, g, p) = *op {
                    let _ = t.map(f, f + n - 1, g, perm(p));
                }
            }
            t
        };
        let first = first_base + off;
        let last = first + n - 1;
        let mut free = build();
        let start = free.metadata_bytes();
        if free.map(first, last, gpa, Perm::RW).is_err() {
            return Ok(());
        }
        let cost = free.metadata_bytes() - start;
        let mut exact = build();
        exact.set_budget(start + cost);
        prop_assert_eq!(exact.map(first, last, gpa, Perm::RW), Ok(()));
        prop_assert_eq!(exact.metadata_bytes(), start + cost);
        if cost > 0 {
            let mut short = build();
            short.set_budget(start + cost - 1);
            let mapped = short.mapped_pages();
            prop_assert_eq!(short.map(first, last, gpa, Perm::RW), Err(TableError::NoMemory));
            prop_assert_eq!(short.metadata_bytes(), start);
            prop_assert_eq!(short.mapped_pages(), mapped);
        }
    }
}

#[test]
fn permissions_and_runs() {
    assert_eq!(Perm::READ.union(Perm::WRITE), Perm::RW);
    assert_eq!(Perm::RW.union(Perm::MMIO).bits(), 7);
    let r = Run {
        iova_page: 3,
        gpa_page: 9,
        pages: 2,
        perm: Perm::READ,
    };
    assert!(!r.is_empty());
    assert!(Run { pages: 0, ..r }.is_empty());
    assert_eq!(
        (r.iova(), r.gpa(), r.len(), r.last_page()),
        (0x3000, 0x9000, 0x2000, 4)
    );
    // The top of each space.
    assert_eq!(MAX_IOVA, (1 << IOVA_BITS) - 1);
    assert_eq!(MAX_GPA, (1 << GPA_BITS) - 1);
}
