//! Serving a device IOTLB: a device that caches translations itself (a vhost-user back end
//! with `VIRTIO_F_ACCESS_PLATFORM`) asks for one when it misses, and gets the longest run
//! around the missed IOVA that it may cache as one entry.
//!
//! An entry is contiguous in IOVA and GPA, has one permission that allows the access, lies in
//! one range of guest RAM (so that it is contiguous in the VMM's address space too), and spans
//! guest mappings where they touch (the merged runs of DPDK's vhost-user device-IOTLB series),
//! but never covers an IOVA the guest did not map, and is never writable where the guest
//! mapped read-only. UNMAP, DETACH and domain changes reach the device as host unmaps of its
//! [`DmaBackend`](crate::DmaBackend), which it turns into invalidations.

use super::*;
use crate::pagetable::{Perm, Run, PAGE_SHIFT, PAGE_SIZE};
use crate::protocol::{VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING};

/// One device-IOTLB entry: `[iova, iova + len)` translates to `[gpa, gpa + len)` with `perm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IotlbEntry {
    /// First IOVA (4 KiB aligned).
    pub iova: u64,
    /// First GPA (4 KiB aligned).
    pub gpa: u64,
    /// Bytes (a multiple of 4 KiB).
    pub len: u64,
    /// Permissions (read and/or write; never MMIO).
    pub perm: Perm,
}

/// Most bytes one entry covers.
pub const MAX_IOTLB_ENTRY: u64 = 1 << 30;
/// Most guest mappings one lookup merges before the missed page, and from it on.
const MAX_MERGED_MAPPINGS: usize = 512;
/// Pages looked at per step of the backward scan.
const BACK_WINDOW: u64 = 512;

impl Viommu {
    /// Serves a device-IOTLB miss of endpoint `ep` at `iova` for an access needing `needed`
    /// (`Perm::READ`, `Perm::WRITE` or both).
    ///
    /// # Errors
    /// The fault, which is also queued for the event queue: `R_DOMAIN` when the endpoint is
    /// not attached to a domain (and not in bypass), `R_MAPPING` when `iova` is not mapped,
    /// is mapped without the permission needed, or maps outside guest RAM.
    pub fn iotlb_entry(
        &mut self,
        ep: EndpointId,
        iova: u64,
        needed: Perm,
    ) -> Result<IotlbEntry, protocol::Fault> {
        let access = if needed.write() {
            Access::Write
        } else {
            Access::Read
        };
        if !self.endpoints.contains_key(&ep) {
            return Err(self.fault(
                ep,
                protocol::VIRTIO_IOMMU_FAULT_R_UNKNOWN,
                access,
                Some(iova),
            ));
        }
        let page = iova >> PAGE_SHIFT;
        // The run around `page` and the RAM range its GPA lies in.
        let found = match self.endpoint_content(ep) {
            Content::Nothing => {
                return Err(self.fault(ep, VIRTIO_IOMMU_FAULT_R_DOMAIN, access, Some(iova)))
            }
            // Bypass: IOVA = GPA over the whole RAM range.
            Content::Identity => self.ram_range_of(page).map(|(first, last)| {
                let run = Run {
                    iova_page: first,
                    gpa_page: first,
                    pages: last - first + 1,
                    perm: Perm::RW,
                };
                (run, (first, last))
            }),
            Content::Domain(d) => self
                .domains
                .get(&d)
                .and_then(|d| merged_run(&d.table, page))
                .and_then(|r| Some((r, self.ram_range_of(r.gpa_page + (page - r.iova_page))?))),
        };
        match found {
            Some((run, (ram_first, ram_last)))
                if run.perm.contains(needed) && !run.perm.contains(Perm::MMIO) =>
            {
                Ok(clip(run, page, ram_first, ram_last))
            }
            _ => Err(self.fault(ep, VIRTIO_IOMMU_FAULT_R_MAPPING, access, Some(iova))),
        }
    }

    /// What endpoint `ep` may reach now, as at most `max` runs (touching guest mappings
    /// contiguous in GPA with one permission merged), lowest IOVAs first: for filling a
    /// device IOTLB ahead of use when the device starts. Empty when the endpoint reaches
    /// nothing (not attached, bypass off).
    pub fn endpoint_runs(&self, ep: EndpointId, max: usize) -> Vec<Run> {
        if !self.endpoints.contains_key(&ep) {
            return Vec::new();
        }
        let mut out: Vec<Run> = Vec::new();
        for r in self.content_runs(self.endpoint_content(ep)) {
            if let Some(l) = out.last_mut() {
                if l.iova_page + l.pages == r.iova_page
                    && l.gpa_page + l.pages == r.gpa_page
                    && l.perm == r.perm
                {
                    l.pages += r.pages;
                    continue;
                }
            }
            if out.len() == max {
                break;
            }
            out.push(r);
        }
        out
    }

    /// The RAM range holding GPA page `gpa_page`, as `(first page, last page)`.
    fn ram_range_of(&self, gpa_page: u64) -> Option<(u64, u64)> {
        self.cfg.guest_ram.iter().find_map(|&(start, len)| {
            let first = start.div_ceil(PAGE_SIZE);
            let last = (start.checked_add(len)? / PAGE_SIZE).checked_sub(1)?;
            (first..=last).contains(&gpa_page).then_some((first, last))
        })
    }
}

/// The run of mappings around `page` contiguous in IOVA and GPA with one permission, at most
/// [`MAX_IOTLB_ENTRY`] on each side and [`MAX_MERGED_MAPPINGS`] mappings before `page` and from
/// it on.
fn merged_run(table: &IoPageTable, page: u64) -> Option<Run> {
    let pte = table.get(page)?;
    let cap = MAX_IOTLB_ENTRY / PAGE_SIZE;
    // Forward from `page` (the first callback is the mapping holding it, clipped to start at
    // `page`).
    let mut fwd = Run {
        iova_page: page,
        gpa_page: pte.gpa_page,
        pages: 0,
        perm: pte.perm,
    };
    let mut seen = 0;
    table.mappings(page, page.saturating_add(cap - 1), |r| {
        let contiguous = r.iova_page == fwd.iova_page + fwd.pages
            && r.gpa_page == fwd.gpa_page + fwd.pages
            && r.perm == fwd.perm;
        seen += 1;
        if !contiguous || seen > MAX_MERGED_MAPPINGS {
            return false;
        }
        fwd.pages += r.pages;
        true
    });
    // Backward, a window at a time, while every mapping in the window continues the run.
    let (mut first, mut first_gpa) = (page, pte.gpa_page);
    let mut seen = 0;
    'back: while first > 0 && page - first < cap {
        let lo = first.saturating_sub(BACK_WINDOW);
        let mut runs = Vec::new();
        table.mappings(lo, first - 1, |r| {
            runs.push(r);
            true
        });
        for r in runs.iter().rev() {
            seen += 1;
            let contiguous = r.iova_page + r.pages == first
                && r.gpa_page + r.pages == first_gpa
                && r.perm == pte.perm;
            if !contiguous || seen > MAX_MERGED_MAPPINGS {
                break 'back;
            }
            first = r.iova_page;
            first_gpa = r.gpa_page;
        }
        if first != lo {
            break;
        }
    }
    Some(Run {
        iova_page: first,
        gpa_page: first_gpa,
        pages: fwd.iova_page + fwd.pages - first,
        perm: pte.perm,
    })
}

/// `run` clipped to GPA pages `[ram_first, ram_last]` and to [`MAX_IOTLB_ENTRY`] bytes, keeping
/// `page` inside.
fn clip(run: Run, page: u64, ram_first: u64, ram_last: u64) -> IotlbEntry {
    let cap = MAX_IOTLB_ENTRY / PAGE_SIZE;
    let off = page - run.iova_page;
    let gpa_page = run.gpa_page + off;
    // Pages before and after `page` that stay inside RAM and the run.
    let before = off.min(gpa_page - ram_first).min(cap - 1);
    let after = (run.pages - off - 1)
        .min(ram_last - gpa_page)
        .min(cap - 1 - before);
    IotlbEntry {
        iova: (page - before) << PAGE_SHIFT,
        gpa: (gpa_page - before) << PAGE_SHIFT,
        len: (before + after + 1) << PAGE_SHIFT,
        perm: run.perm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;
    use crate::testing::{attach, map, unmap};

    const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    const R: u32 = VIRTIO_IOMMU_MAP_F_READ;

    fn send(v: &mut Viommu, req: &[u8]) -> Status {
        let r = Request {
            readable: req,
            readable_len: req.len(),
            writable_len: 4,
        };
        v.process(&[r]).remove(0).status().unwrap()
    }

    /// Endpoint 1 attached to domain 1; RAM at [0, 1 GiB) and [4 GiB, 5 GiB).
    fn device() -> Viommu {
        let mut v = Viommu::new(ViommuConfig {
            guest_ram: vec![(0, 1 << 30), (4 << 30, 1 << 30)],
            ..Default::default()
        });
        v.add_endpoint(1, None, &[]).unwrap();
        assert_eq!(send(&mut v, &attach(1, 1, 0)), Status::Ok);
        v
    }

    fn entry(iova: u64, gpa: u64, len: u64, perm: Perm) -> IotlbEntry {
        IotlbEntry {
            iova,
            gpa,
            len,
            perm,
        }
    }

    /// `clip` keeps the page inside and cuts at the run's ends, the RAM range's ends and the
    /// entry size limit, before the page first.
    #[test]
    fn clip_cuts_at_run_ram_and_size_limits() {
        let cap = MAX_IOTLB_ENTRY / PAGE_SIZE;
        let run = |iova_page, gpa_page, pages| Run {
            iova_page,
            gpa_page,
            pages,
            perm: Perm::RW,
        };
        let at =
            |iova: u64, gpa: u64, pages: u64| entry(iova << 12, gpa << 12, pages << 12, Perm::RW);
        // The whole run.
        assert_eq!(clip(run(100, 1000, 50), 120, 0, 1 << 20), at(100, 1000, 50));
        assert_eq!(clip(run(100, 1000, 50), 149, 0, 1 << 20), at(100, 1000, 50));
        assert_eq!(clip(run(100, 1000, 50), 100, 0, 1 << 20), at(100, 1000, 50));
        // RAM ends inside the run on both sides.
        assert_eq!(clip(run(100, 1000, 50), 120, 1010, 1030), at(110, 1010, 21));
        assert_eq!(clip(run(100, 1000, 50), 110, 1010, 1010), at(110, 1010, 1));
        // Larger than an entry: the pages before the page first, then after it.
        assert_eq!(clip(run(0, 0, 3 * cap), cap + 5, 0, 1 << 40), at(6, 6, cap));
        assert_eq!(clip(run(0, 0, 3 * cap), 5, 0, 1 << 40), at(0, 0, cap));
    }

    /// `merged_run` joins mappings contiguous in IOVA and GPA with one permission on both
    /// sides of the page, looking back a window at a time, and stops at a gap, a GPA break, a
    /// permission change or after MAX_MERGED_MAPPINGS mappings each way.
    #[test]
    fn merged_run_joins_both_ways_and_is_bounded() {
        let mut t = IoPageTable::default();
        for (first, last, gpa) in [(100, 109, 1000), (110, 119, 1010), (120, 129, 1020)] {
            t.map(first, last, gpa, Perm::RW).unwrap();
        }
        t.map(130, 139, 1030, Perm::READ).unwrap();
        t.map(90, 99, 5000, Perm::RW).unwrap();
        let want = Run {
            iova_page: 100,
            gpa_page: 1000,
            pages: 30,
            perm: Perm::RW,
        };
        for page in [100, 115, 129] {
            assert_eq!(merged_run(&t, page), Some(want), "page {page}");
        }
        assert_eq!(merged_run(&t, 140), None);

        // 1,101 one-page mappings, contiguous: 512 are taken each way at most, and the
        // backward walk crosses a window edge.
        let mut t = IoPageTable::default();
        for p in 1000..=2100u64 {
            t.map(p, p, p + 7, Perm::RW).unwrap();
        }
        let r = merged_run(&t, 1600).unwrap();
        assert_eq!(
            (r.iova_page, r.gpa_page, r.pages),
            (
                1600 - MAX_MERGED_MAPPINGS as u64,
                1600 - MAX_MERGED_MAPPINGS as u64 + 7,
                2101 - 1088
            )
        );
        let r = merged_run(&t, 1010).unwrap();
        assert_eq!(
            (r.iova_page, r.pages),
            (1000, 10 + MAX_MERGED_MAPPINGS as u64)
        );
    }

    #[test]
    fn touching_mappings_merge_and_nothing_unmapped_is_covered() {
        let mut v = device();
        // Three 4 KiB mappings contiguous in IOVA and GPA, then a gap, then one more.
        for i in 0..3u64 {
            let iova = 0x10_0000 + i * 0x1000;
            assert_eq!(
                send(
                    &mut v,
                    &map(1, iova, iova + 0xfff, 0x80_0000 + i * 0x1000, RW)
                ),
                Status::Ok
            );
        }
        assert_eq!(
            send(&mut v, &map(1, 0x10_4000, 0x10_4fff, 0x80_4000, RW)),
            Status::Ok
        );
        let e = v.iotlb_entry(1, 0x10_1234, Perm::READ).unwrap();
        assert_eq!(e, entry(0x10_0000, 0x80_0000, 0x3000, Perm::RW));
        // From the last page of the run, the same entry.
        assert_eq!(v.iotlb_entry(1, 0x10_2fff, Perm::RW).unwrap(), e);
        // The page after the gap is its own entry.
        assert_eq!(
            v.iotlb_entry(1, 0x10_4000, Perm::WRITE).unwrap(),
            entry(0x10_4000, 0x80_4000, 0x1000, Perm::RW)
        );
        // The gap itself faults, with the address and the access.
        let f = v.iotlb_entry(1, 0x10_3000, Perm::WRITE).unwrap_err();
        assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert_eq!(f.address.get(), 0x10_3000);
        assert_eq!(
            f.flags.get(),
            VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
        );
        assert_eq!(v.pop_fault(), Some(f), "queued for the event queue");
        // After an UNMAP of the middle page, the run splits there.
        assert_eq!(send(&mut v, &unmap(1, 0x10_1000, 0x10_1fff)), Status::Ok);
        assert_eq!(
            v.iotlb_entry(1, 0x10_0000, Perm::READ).unwrap(),
            entry(0x10_0000, 0x80_0000, 0x1000, Perm::RW)
        );
        assert!(v.iotlb_entry(1, 0x10_1000, Perm::READ).is_err());
    }

    #[test]
    fn permission_and_gpa_breaks_split_entries() {
        let mut v = device();
        // Read-only then read-write, contiguous in GPA: two entries.
        assert_eq!(
            send(&mut v, &map(1, 0x20_0000, 0x20_0fff, 0x90_0000, R)),
            Status::Ok
        );
        assert_eq!(
            send(&mut v, &map(1, 0x20_1000, 0x20_1fff, 0x90_1000, RW)),
            Status::Ok
        );
        // Contiguous in IOVA, not in GPA.
        assert_eq!(
            send(&mut v, &map(1, 0x20_2000, 0x20_2fff, 0x70_0000, RW)),
            Status::Ok
        );
        assert_eq!(
            v.iotlb_entry(1, 0x20_0000, Perm::READ).unwrap(),
            entry(0x20_0000, 0x90_0000, 0x1000, Perm::READ)
        );
        assert_eq!(
            v.iotlb_entry(1, 0x20_1000, Perm::WRITE).unwrap(),
            entry(0x20_1000, 0x90_1000, 0x1000, Perm::RW)
        );
        assert_eq!(
            v.iotlb_entry(1, 0x20_2000, Perm::READ).unwrap(),
            entry(0x20_2000, 0x70_0000, 0x1000, Perm::RW)
        );
        // Never writable where the guest mapped read-only.
        let f = v.iotlb_entry(1, 0x20_0000, Perm::WRITE).unwrap_err();
        assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert!(v.iotlb_entry(1, 0x20_0000, Perm::RW).is_err());
    }

    #[test]
    fn entries_stay_in_one_ram_range() {
        let mut v = device();
        // IOVA-contiguous mapping whose GPA runs past the end of the low RAM range: the part
        // in RAM is served, the rest faults.
        assert_eq!(
            send(
                &mut v,
                &map(1, 0x100_0000, 0x100_0000 + 0x3fff, (1 << 30) - 0x2000, RW)
            ),
            Status::Ok
        );
        assert_eq!(
            v.iotlb_entry(1, 0x100_0000, Perm::READ).unwrap(),
            entry(0x100_0000, (1 << 30) - 0x2000, 0x2000, Perm::RW)
        );
        assert!(v.iotlb_entry(1, 0x100_2000, Perm::READ).is_err());
    }

    #[test]
    fn large_and_many_mappings_are_bounded() {
        let mut v = device();
        // 2 GiB mapped as one guest mapping into [4 GiB, 5 GiB) and beyond: the entry stays in
        // RAM and within MAX_IOTLB_ENTRY.
        assert_eq!(
            send(&mut v, &map(1, 0x1_0000_0000, 0x1_3fff_ffff, 4 << 30, RW)),
            Status::Ok
        );
        let e = v.iotlb_entry(1, 0x1_2000_0000, Perm::READ).unwrap();
        assert!(e.len <= MAX_IOTLB_ENTRY);
        assert!(e.iova <= 0x1_2000_0000 && 0x1_2000_0000 < e.iova + e.len);
        assert_eq!(e.gpa - (4 << 30), e.iova - 0x1_0000_0000);
        // 2000 touching single-page mappings: the entry merges at most MAX_MERGED_MAPPINGS
        // before the missed page and from it on.
        for i in 0..2000u64 {
            let iova = 0x2000_0000 + i * 0x1000;
            assert_eq!(
                send(
                    &mut v,
                    &map(1, iova, iova + 0xfff, 0x1000_0000 + i * 0x1000, RW)
                ),
                Status::Ok
            );
        }
        let e = v
            .iotlb_entry(1, 0x2000_0000 + 1000 * 0x1000, Perm::READ)
            .unwrap();
        assert_eq!(e.len, 2 * MAX_MERGED_MAPPINGS as u64 * 0x1000);
    }

    #[test]
    fn endpoint_runs_merge_and_stop_at_max() {
        let mut v = device();
        for i in 0..4u64 {
            let iova = 0x10_0000 + i * 0x1000;
            assert_eq!(
                send(
                    &mut v,
                    &map(1, iova, iova + 0xfff, 0x80_0000 + i * 0x1000, RW)
                ),
                Status::Ok
            );
        }
        assert_eq!(
            send(&mut v, &map(1, 0x20_0000, 0x20_0fff, 0x90_0000, R)),
            Status::Ok
        );
        assert_eq!(
            send(&mut v, &map(1, 0x30_0000, 0x30_0fff, 0x90_1000, R)),
            Status::Ok
        );
        let runs = v.endpoint_runs(1, 8);
        let got: Vec<(u64, u64, u64)> = runs.iter().map(|r| (r.iova(), r.gpa(), r.len())).collect();
        assert_eq!(
            got,
            vec![
                (0x10_0000, 0x80_0000, 0x4000),
                (0x20_0000, 0x90_0000, 0x1000),
                (0x30_0000, 0x90_1000, 0x1000)
            ]
        );
        assert_eq!(v.endpoint_runs(1, 2).len(), 2);
        assert!(v.endpoint_runs(9, 8).is_empty(), "unknown endpoint");
    }

    #[test]
    fn bypass_and_unattached_endpoints() {
        let mut v = Viommu::new(ViommuConfig {
            guest_ram: vec![(0, 1 << 30)],
            bypass: true,
            ..Default::default()
        });
        v.add_endpoint(1, None, &[]).unwrap();
        assert_eq!(
            v.iotlb_entry(1, 0x1234_5000, Perm::RW).unwrap(),
            entry(0, 0, 1 << 30, Perm::RW)
        );
        // Outside RAM: nothing to translate to.
        assert!(v.iotlb_entry(1, 1 << 31, Perm::READ).is_err());
        v.set_bypass(0);
        let f = v.iotlb_entry(1, 0x1000, Perm::READ).unwrap_err();
        assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_DOMAIN);
        let f = v.iotlb_entry(7, 0x1000, Perm::READ).unwrap_err();
        assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_UNKNOWN);
    }

    mod props {
        use std::collections::BTreeMap;

        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Against a per-page model of what the guest mapped: an entry covers only mapped
            /// pages, each translating as the entry says with exactly the entry's permission;
            /// it cannot grow by one page at either end; a miss gets an entry exactly when its
            /// page is mapped with the permission needed.
            #[test]
            fn entries_are_exact_and_maximal(
                maps in prop::collection::vec((0u64..64, 1u64..5, 0u64..32, 1u32..4), 1..40),
                unmaps in prop::collection::vec((0u64..64, 0u64..4), 0..10),
                misses in prop::collection::vec((0u64..70, 1u8..4), 1..30),
            ) {
                let mut v = Viommu::new(ViommuConfig {
                    guest_ram: vec![(0, 32 * 4096)],
                    ..Default::default()
                });
                v.add_endpoint(1, None, &[]).unwrap();
                prop_assert_eq!(send(&mut v, &attach(1, 1, 0)), Status::Ok);
                let mut model: BTreeMap<u64, (u64, u8)> = BTreeMap::new();
                for (page, pages, gpa, perm) in maps {
                    let req = map(1, page * 4096, (page + pages) * 4096 - 1, gpa * 4096, perm);
                    if send(&mut v, &req) == Status::Ok {
                        for i in 0..pages {
                            model.insert(page + i, (gpa + i, perm as u8));
                        }
                    }
                }
                for (first, n) in unmaps {
                    let req = unmap(1, first * 4096, (first + n + 1) * 4096 - 1);
                    if send(&mut v, &req) == Status::Ok {
                        // Only whole mappings go: rebuild the model from the table.
                        model.clear();
                        for (iova, gpa, len, perm) in v.domain_mappings(1) {
                            for i in 0..len / 4096 {
                                model.insert(iova / 4096 + i, (gpa / 4096 + i, perm.bits()));
                            }
                        }
                    }
                }
                for (page, needed) in misses {
                    let needed = Perm::from_bits(u32::from(needed)).unwrap();
                    let got = v.iotlb_entry(1, page * 4096 + 12, needed);
                    let allowed = model.get(&page).filter(|&&(gpa, perm)| {
                        gpa < 32 && Perm::from_bits(u32::from(perm)).unwrap().contains(needed)
                    });
                    prop_assert_eq!(got.is_ok(), allowed.is_some(), "page {} {:?}", page, needed);
                    let Ok(e) = got else { continue };
                    let (first, pages) = (e.iova / 4096, e.len / 4096);
                    prop_assert!(first <= page && page < first + pages);
                    for i in 0..pages {
                        prop_assert_eq!(
                            model.get(&(first + i)),
                            Some(&(e.gpa / 4096 + i, e.perm.bits()))
                        );
                    }
                    let before = first.checked_sub(1).and_then(|p| model.get(&p));
                    prop_assert!(e.gpa == 0 || before != Some(&((e.gpa / 4096).wrapping_sub(1), e.perm.bits())));
                    let after = model.get(&(first + pages));
                    prop_assert!(
                        after != Some(&(e.gpa / 4096 + pages, e.perm.bits()))
                            || e.gpa / 4096 + pages >= 32
                    );
                }
            }
        }
    }
}
