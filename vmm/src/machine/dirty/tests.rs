//! Harvests of a passthrough device outside the vIOMMU, through a recording backend: the
//! pages it reports by GPA, in every RAM range (below the PCI hole and above 4 GiB, past the
//! 1 GiB read chunk), or all of RAM when it cannot report.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use iommu::backend::{Call, RecordingBackend, RecordingLog};
use iommu::BackendCaps;

use super::*;

/// Guest RAM: 640 MiB below the PCI hole, 1.5 GiB above 4 GiB (two read chunks and a half).
const RAM: [(u64, u64); 2] = [(0, 640 << 20), (4 << 30, 3 << 29)];

fn direct(dirty_tracking: bool) -> (DirectDirty, Arc<Mutex<RecordingLog>>) {
    let (b, log) = RecordingBackend::new(
        "direct",
        BackendCaps {
            dirty_tracking,
            ..Default::default()
        },
    );
    (DirectDirty::new(Box::new(b)), log)
}

/// The dirty pages of `bitmap` among `candidates`, and whether it holds no others.
fn dirty_set(bitmap: &DirtyBitmap, candidates: &BTreeSet<u64>) -> (BTreeSet<u64>, bool) {
    let set: BTreeSet<u64> = candidates
        .iter()
        .copied()
        .filter(|&p| bitmap.is_dirty(p))
        .collect();
    let only = bitmap.count() == set.len() as u64;
    (set, only)
}

#[test]
fn a_tracking_device_reports_exactly_its_pages_in_every_ram_range() {
    let (d, log) = direct(true);
    assert!(d.start());
    let gib4 = (4u64 << 30) / PAGE_SIZE;
    let written: BTreeSet<u64> = [
        0,
        5,
        (640 << 20) / PAGE_SIZE - 1,
        gib4,
        gib4 + CHUNK_PAGES - 1,
        gib4 + CHUNK_PAGES,
        gib4 + (3 << 29) / PAGE_SIZE - 1,
    ]
    .into();
    log.lock().unwrap().dirty = written.clone();
    let mut out = DirtyBitmap::new(&RAM);
    d.harvest(&RAM, &mut out);
    let probes: BTreeSet<u64> = written
        .iter()
        .flat_map(|&p| [p.saturating_sub(1), p, p + 1])
        .collect();
    assert_eq!(dirty_set(&out, &probes), (written, true));
    // Read with clear: the next harvest finds nothing.
    let mut again = DirtyBitmap::new(&RAM);
    d.harvest(&RAM, &mut again);
    assert!(again.is_clean());
}

#[test]
fn a_device_that_cannot_report_marks_all_of_ram() {
    let all: u64 = RAM.iter().map(|r| r.1 / PAGE_SIZE).sum();
    // No dirty tracking: start says so, and every page counts as written.
    let (d, _) = direct(false);
    assert!(!d.start());
    let mut out = DirtyBitmap::new(&RAM);
    d.harvest(&RAM, &mut out);
    assert_eq!(out.count(), all);
    // RAM's end is not a chunk's: nothing is marked past it.
    assert_eq!(out.outside(), 0);
    // Tracking that fails to report: the same.
    let (d, log) = direct(true);
    assert!(d.start());
    log.lock().unwrap().fail_dirty = true;
    let mut out = DirtyBitmap::new(&RAM);
    d.harvest(&RAM, &mut out);
    assert_eq!(out.count(), all);
    // Stopped: tracking is off on the backend, and a harvest marks everything.
    log.lock().unwrap().fail_dirty = false;
    d.stop();
    assert!(!log.lock().unwrap().tracking);
    let mut out = DirtyBitmap::new(&RAM);
    d.harvest(&RAM, &mut out);
    assert_eq!(out.count(), all);
}

/// Removing the device unmaps every host mapping its set-up made, one call each, and a
/// failed unmap does not keep the others from being made.
#[test]
fn unmap_all_unmaps_every_mapping_once() {
    let (d, log) = direct(false);
    let d = d.with_mappings(vec![(0, 640 << 20), (4 << 30, 3 << 29), (8 << 30, 1 << 20)]);
    log.lock().unwrap().fail_unmap_iova = Some(4 << 30);
    d.unmap_all();
    assert_eq!(
        log.lock().unwrap().calls,
        vec![Call::Unmap(0, 640 << 20), Call::Unmap(8 << 30, 1 << 20)]
    );
    // Nothing is left to unmap.
    d.unmap_all();
    assert_eq!(log.lock().unwrap().calls.len(), 2);
}
