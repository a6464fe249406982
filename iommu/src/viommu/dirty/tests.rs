//! The dirty tracking through the vIOMMU: harvests by GPA from backends that track,
//! their options (peek, windows), and windows that cover whole host mappings.

use std::sync::{Arc, Mutex};

use crate::backend::{Call, RecordingBackend, RecordingLog};
use crate::pagetable::Perm;
use crate::protocol::*;
use crate::testing::{attach, detach, map, unmap};
use crate::testing::{send, with_backend, R, RW};
use crate::viommu::*;

use crate::dirty::DirtyBitmap;

fn tracked() -> (Viommu, Arc<Mutex<RecordingLog>>) {
    let (mut v, log) = with_backend(BackendCaps {
        dirty_tracking: true,
        ..Default::default()
    });
    assert_eq!(v.start_dirty_tracking().tracked, vec!["rec".to_string()]);
    assert!(log.lock().unwrap().tracking);
    (v, log)
}

fn harvest(v: &mut Viommu) -> Vec<(u64, u64)> {
    let mut b = DirtyBitmap::new(&[(0, 1 << 30)]);
    v.harvest_dirty(&mut b);
    b.runs()
}

#[test]
fn writes_are_reported_by_gpa() {
    let (mut v, log) = tracked();
    assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0x10000, 0x13fff, 0x200000, RW)),
        Some(Status::Ok)
    );
    assert_eq!(log.lock().unwrap().device_write(0x11), Some(0x201));
    assert_eq!(log.lock().unwrap().device_write(0x12), Some(0x202));
    assert_eq!(harvest(&mut v), vec![(0x201000, 0x2000)]);
    // A harvest starts a new round.
    assert_eq!(harvest(&mut v), vec![]);
    assert!(v.counters().dirty_reads >= 2);
    assert_eq!(v.counters().dirty_pages_reported, 2);
}

#[test]
fn an_unmap_harvests_before_the_iova_is_reused() {
    let (mut v, log) = tracked();
    send(&mut v, &attach(1, 8, 0));
    send(&mut v, &map(1, 0x10000, 0x10fff, 0x300000, RW));
    log.lock().unwrap().device_write(0x10);
    // The guest moves the IOVA to other memory before anyone harvests.
    assert_eq!(send(&mut v, &unmap(1, 0x10000, 0x10fff)), Some(Status::Ok));
    send(&mut v, &map(1, 0x10000, 0x10fff, 0x500000, RW));
    // The write is reported for the memory it went to, not where the IOVA points now.
    assert_eq!(harvest(&mut v), vec![(0x300000, 0x1000)]);
}

#[test]
fn detach_harvests() {
    let (mut v, log) = tracked();
    send(&mut v, &attach(1, 8, 0));
    send(&mut v, &map(1, 0x10000, 0x10fff, 0x300000, RW));
    log.lock().unwrap().device_write(0x10);
    assert_eq!(send(&mut v, &detach(1, 8)), Some(Status::Ok));
    assert_eq!(harvest(&mut v), vec![(0x300000, 0x1000)]);
}

#[test]
fn bypass_writes_are_identity() {
    let (mut v, log) = tracked();
    v.set_bypass(1);
    assert_eq!(log.lock().unwrap().device_write(0x777), Some(0x777));
    assert_eq!(harvest(&mut v), vec![(0x777000, 0x1000)]);
}

#[test]
fn untracked_failed_or_failing_backends_count_writable_mappings_dirty() {
    // A backend that cannot track.
    let (mut v, _log) = with_backend(BackendCaps::default());
    let r = v.start_dirty_tracking();
    assert_eq!(r.untracked, vec!["rec".to_string()]);
    send(&mut v, &attach(1, 8, 0));
    send(&mut v, &map(1, 0x10000, 0x11fff, 0x300000, RW));
    send(&mut v, &map(1, 0x20000, 0x20fff, 0x400000, R));
    assert_eq!(harvest(&mut v), vec![(0x300000, 0x2000)]);
    // Read-only mappings are never dirty; writable ones are, every round.
    assert_eq!(harvest(&mut v), vec![(0x300000, 0x2000)]);

    // A tracking backend whose device died.
    let (mut v, _log) = tracked();
    send(&mut v, &attach(1, 8, 0));
    send(&mut v, &map(1, 0x10000, 0x10fff, 0x300000, RW));
    v.set_backend_failed(0);
    assert_eq!(harvest(&mut v), vec![(0x300000, 0x1000)]);

    // A tracking backend whose report fails.
    let (mut v, log) = tracked();
    send(&mut v, &attach(1, 8, 0));
    send(&mut v, &map(1, 0x10000, 0x10fff, 0x300000, RW));
    log.lock().unwrap().fail_dirty = true;
    assert_eq!(harvest(&mut v), vec![(0x300000, 0x1000)]);
}

/// Failed reports count exactly the writable pages they cover: of a domain's mappings
/// (read-only ones never), of an UNMAP's range, and of identity-mapped RAM in bypass.
#[test]
fn failed_reports_count_writable_pages_only() {
    let (mut v, log) = tracked();
    assert!(v.is_tracking_dirty());
    send(&mut v, &attach(1, 8, 0));
    send(&mut v, &map(1, 0x10000, 0x11fff, 0x300000, RW));
    send(&mut v, &map(1, 0x12000, 0x12fff, 0x400000, R));
    send(&mut v, &map(1, 0x13000, 0x13fff, 0x500000, RW));
    log.lock().unwrap().fail_dirty = true;
    let writable = vec![(0x300000, 0x2000), (0x500000, 0x1000)];
    assert_eq!(harvest(&mut v), writable);
    // One UNMAP over all three: its report fails, so its writable pages count.
    let mut b = DirtyBitmap::new(&[(0, 1 << 30)]);
    assert_eq!(send(&mut v, &unmap(1, 0x10000, 0x13fff)), Some(Status::Ok));
    v.harvest_dirty(&mut b);
    assert_eq!(b.runs(), writable);

    // Bypass: all of guest RAM, in windows of at most 64 pages.
    let ram = [(0, 64 << 12), (1 << 20, 96 << 12)];
    let (mut v, log) = small_tracked(&ram);
    v.set_bypass(1);
    log.lock().unwrap().fail_dirty = true;
    let mut b = DirtyBitmap::new(&ram);
    let reads = v.counters().dirty_reads;
    let opts = HarvestOptions {
        window_pages: 64,
        ..Default::default()
    };
    v.harvest_dirty_with(&mut b, opts);
    assert_eq!(b.runs(), ram.to_vec());
    assert_eq!(v.counters().dirty_reads - reads, 3);
}

/// A tracked backend on endpoint 8 of a device whose guest RAM is `ram` (small: a bypass
/// maps all of it, page by page, in the recording backend).
fn small_tracked(ram: &[(u64, u64)]) -> (Viommu, Arc<Mutex<RecordingLog>>) {
    let mut v = Viommu::new(ViommuConfig {
        guest_ram: ram.to_vec(),
        ..Default::default()
    });
    let (rec, log) = RecordingBackend::new(
        "rec",
        BackendCaps {
            dirty_tracking: true,
            ..Default::default()
        },
    );
    let id = v.add_backend(Box::new(rec)).unwrap();
    v.add_endpoint(8, Some(id), &[]).unwrap();
    v.start_dirty_tracking();
    (v, log)
}

/// One UNMAP (one host call over touching mappings) reports the writes under it by GPA,
/// bit by bit across bitmap words; a bit on a read-only mapping (a device claiming a write
/// the host would refuse) is not a dirty page.
#[test]
fn an_unmap_reports_each_written_page_by_gpa() {
    let (mut v, log) = with_backend(BackendCaps {
        dirty_tracking: true,
        merge_maps: true,
        merge_unmaps: true,
        ..Default::default()
    });
    v.start_dirty_tracking();
    send(&mut v, &attach(1, 8, 0));
    send(&mut v, &map(1, 0x10000, 0x11fff, 0x300000, RW));
    send(&mut v, &map(1, 0x12000, 0x12fff, 0x400000, R));
    send(&mut v, &map(1, 0x13000, 0x92fff, 0x500000, RW));
    {
        let mut l = log.lock().unwrap();
        assert_eq!(l.device_write(0x11), Some(0x301));
        assert_eq!(l.device_write(0x13 + 100), Some(0x500 + 100));
        l.dirty.insert(0x12);
    }
    let (calls, reported) = (
        log.lock().unwrap().calls.len(),
        v.counters().dirty_pages_reported,
    );
    assert_eq!(send(&mut v, &unmap(1, 0x10000, 0x92fff)), Some(Status::Ok));
    assert_eq!(
        log.lock().unwrap().calls[calls..].to_vec(),
        vec![Call::Unmap(0x10000, 0x83000)]
    );
    assert_eq!(
        harvest(&mut v),
        vec![(0x301000, 0x1000), (0x564000, 0x1000)]
    );
    assert_eq!(v.counters().dirty_pages_reported - reported, 2);
}

/// Global bypass over RAM that does not start at 0: writes are read where the RAM is.
#[test]
fn bypass_reads_ram_where_it_is() {
    let ram = [(1 << 20, 1 << 20)];
    let (mut v, log) = small_tracked(&ram);
    v.set_bypass(1);
    assert_eq!(log.lock().unwrap().device_write(0x105), Some(0x105));
    let mut b = DirtyBitmap::new(&ram);
    v.harvest_dirty(&mut b);
    assert_eq!(b.runs(), vec![(0x105000, 0x1000)]);
}

/// A domain attached in bypass (ATTACH_F_BYPASS) reports device writes by GPA = IOVA.
#[test]
fn bypass_domains_report_identity() {
    let ram = [(0, 1 << 20)];
    let (mut v, log) = small_tracked(&ram);
    assert_eq!(
        send(&mut v, &attach(1, 8, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Some(Status::Ok)
    );
    assert_eq!(log.lock().unwrap().device_write(0x55), Some(0x55));
    assert_eq!(log.lock().unwrap().device_write(0x57), Some(0x57));
    let (reads, reported) = (v.counters().dirty_reads, v.counters().dirty_pages_reported);
    assert_eq!(harvest(&mut v), vec![(0x55000, 0x1000), (0x57000, 0x1000)]);
    // 1 MiB of RAM: one window of the default size.
    assert_eq!(v.counters().dirty_reads - reads, 1);
    assert_eq!(v.counters().dirty_pages_reported - reported, 2);
}

#[test]
fn stop_returns_the_rest_and_turns_the_device_off() {
    let (mut v, log) = tracked();
    send(&mut v, &attach(1, 8, 0));
    send(&mut v, &map(1, 0x10000, 0x10fff, 0x300000, RW));
    log.lock().unwrap().device_write(0x10);
    let rest = v.stop_dirty_tracking().unwrap();
    assert_eq!(rest.runs(), vec![(0x300000, 0x1000)]);
    assert!(!log.lock().unwrap().tracking);
    assert!(!v.is_tracking_dirty());
    assert!(v.stop_dirty_tracking().is_none());
}

mod harvest_options {
    use super::*;
    use crate::dirty::DirtyBitmap;

    #[test]
    fn peek_does_not_clear_and_small_windows_see_everything() {
        let (mut v, log) = with_backend(BackendCaps {
            dirty_tracking: true,
            ..Default::default()
        });
        v.start_dirty_tracking();
        send(&mut v, &attach(1, 8, 0));
        send(&mut v, &map(1, 0x100000, 0x1fffff, 0x4000000, RW)); // 256 pages
        for p in [0x100, 0x13f, 0x140, 0x1ff] {
            log.lock().unwrap().device_write(p);
        }
        // Pending bits from an unmap are peeked too.
        send(&mut v, &map(1, 0x300000, 0x300fff, 0x5000000, RW));
        log.lock().unwrap().device_write(0x300);
        send(&mut v, &unmap(1, 0x300000, 0x300fff));
        let peek = HarvestOptions {
            clear: false,
            window_pages: 64,
        };
        let ram = [(0, 1u64 << 30)];
        let mut a = DirtyBitmap::new(&ram);
        v.harvest_dirty_with(&mut a, peek);
        let mut b = DirtyBitmap::new(&ram);
        v.harvest_dirty_with(&mut b, peek);
        assert_eq!(a, b);
        assert_eq!(a.count(), 5);
        let mut c = DirtyBitmap::new(&ram);
        v.harvest_dirty(&mut c);
        assert_eq!(c, a);
        let mut d = DirtyBitmap::new(&ram);
        v.harvest_dirty(&mut d);
        assert!(d.is_clean());
    }
}

mod whole_mapping_windows {
    use super::*;
    use crate::viommu::dirty::dirty_windows;
    use proptest::prelude::*;

    use crate::dirty::DirtyBitmap;
    use crate::pagetable::Run;

    /// A backend whose dirty reports must cover whole host mappings (VFIO type1): with
    /// 64-page windows, mappings of 1 to 200 pages side by side, a harvest reads every
    /// written page and never asks for a range that splits a mapping; in both modes
    /// (whole-mapping reads, and the peeking vfio-user kind of read) the result is the same.
    #[test]
    fn type1_harvests_never_split_a_mapping() {
        for whole in [true, false] {
            let (mut v, log) = with_backend(BackendCaps {
                dirty_tracking: true,
                dirty_whole_mappings: whole,
                ..Default::default()
            });
            v.start_dirty_tracking();
            assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
            let mut iova = 0x10_0000u64;
            let mut written = Vec::new();
            for (k, pages) in [1u64, 63, 64, 65, 200, 3, 128].into_iter().enumerate() {
                let gpa = 0x400_0000 + (k as u64) * 0x100_0000;
                let end = iova + pages * PAGE_SIZE - 1;
                assert_eq!(send(&mut v, &map(1, iova, end, gpa, RW)), Some(Status::Ok));
                for p in [0, pages / 2, pages - 1] {
                    log.lock().unwrap().device_write(iova / PAGE_SIZE + p);
                    written.push(gpa / PAGE_SIZE + p);
                }
                iova = end + 1;
            }
            let opts = HarvestOptions {
                clear: true,
                window_pages: 64,
            };
            let mut got = DirtyBitmap::new(&[(0, 1 << 30)]);
            v.harvest_dirty_with(&mut got, opts);
            assert_eq!(log.lock().unwrap().split_dirty_reads, 0, "whole={whole}");
            written.sort();
            written.dedup();
            let pages: Vec<u64> = got
                .runs()
                .iter()
                .flat_map(|&(gpa, len)| gpa / PAGE_SIZE..(gpa + len) / PAGE_SIZE)
                .collect();
            assert_eq!(pages, written, "whole={whole}");
        }
    }

    fn runs_from(spec: &[(u64, u64)]) -> Vec<Run> {
        // (gap before, pages) -> runs at increasing IOVAs.
        let mut at = 0;
        spec.iter()
            .map(|&(gap, pages)| {
                at += gap;
                let r = Run {
                    iova_page: at,
                    gpa_page: 1000 + at,
                    pages,
                    perm: Perm::RW,
                };
                at += pages;
                r
            })
            .collect()
    }

    /// The fewest windows: touching runs share them, cut at `window` pages (or, whole, at
    /// run edges while they fit).
    #[test]
    fn windows_are_as_few_as_the_rules_allow() {
        let run = |iova_page, pages| Run {
            iova_page,
            gpa_page: iova_page,
            pages,
            perm: Perm::RW,
        };
        let runs = [run(0, 10), run(10, 5), run(20, 3)];
        assert_eq!(
            dirty_windows(&runs, 8, false),
            vec![(0, 8), (8, 7), (20, 3)]
        );
        assert_eq!(
            dirty_windows(&runs, 8, true),
            vec![(0, 10), (10, 5), (20, 3)]
        );
        let runs = [run(0, 3), run(3, 4), run(7, 1), run(8, 2)];
        assert_eq!(dirty_windows(&runs, 8, true), vec![(0, 8), (8, 2)]);
        assert_eq!(dirty_windows(&runs, 8, false), vec![(0, 8), (8, 2)]);
        assert_eq!(
            dirty_windows(&[run(0, 8), run(8, 4)], 8, false),
            vec![(0, 8), (8, 4)]
        );
        assert_eq!(dirty_windows(&[run(5, 20)], 0, false).len(), 20);
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: crate::testing::cases(256),
            ..ProptestConfig::default()
        })]

        /// Windows cover exactly the runs' pages, once; none is larger than `window` unless
        /// it is one run (whole mode); in whole mode each starts at a run's first page and
        /// ends at a run's last page.
        #[test]
        fn windows_cover_runs_and_respect_mapping_edges(
            spec in proptest::collection::vec((0u64..3, 1u64..150), 0..12),
            window in 1u64..130,
            whole in any::<bool>(),
        ) {
            let runs = runs_from(&spec);
            let windows = dirty_windows(&runs, window, whole);
            let mut covered = Vec::new();
            for &(f, n) in &windows {
                prop_assert!(n > 0);
                covered.extend(f..f + n);
                let single = runs.iter().any(|r| r.iova_page == f && r.pages == n);
                prop_assert!(n <= window || (whole && single), "window {f}+{n}");
                if whole {
                    prop_assert!(runs.iter().any(|r| r.iova_page == f));
                    prop_assert!(runs.iter().any(|r| r.iova_page + r.pages == f + n));
                }
            }
            let expected: Vec<u64> = runs.iter().flat_map(|r| r.iova_page..r.iova_page + r.pages).collect();
            prop_assert_eq!(covered, expected);
        }
    }
}
