//! Host mappings on demand (`dma=fault`, the "IOPF support for VFIO passthrough" RFC's idea): a [`DmaBackend`] wrapper
//! that records the mappings it is given without making them, and installs one on the inner
//! backend only when the device touches it and asks with a page request (the stall model of
//! PCIe PRI or the SMMU: the transfer waits, the host maps, the device retries).
//!
//! - `map` records the mapping in a page table (the mapping core) and maps nothing.
//! - [`OnDemand::page_request`] answers [`PageResponse::Retry`] once the host mapping under
//!   the IOVA is installed: the recorded mapping that holds it, clipped to the aligned window
//!   of `window` bytes around it (so that a large mapping, such as all of RAM for a device
//!   outside the vIOMMU, is installed a window at a time). A page that is not recorded, or
//!   recorded without the access asked for, gets [`PageResponse::Invalid`]: the transfer
//!   faults as it would with static mapping.
//! - `unmap` forgets the recorded pages and unmaps the installed host mappings inside the
//!   range (only those: what was never touched costs no host call).
//! - Dirty reads cover the installed host mappings; pages never installed cannot have been
//!   written.
//!
//! Each installed host mapping lies inside one recorded mapping, so a backend that refuses
//! partial unmaps (VFIO type1) never sees one; one `unmap` of the wrapper may become several
//! host unmaps.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::backend::{BackendCaps, BackendError, DmaBackend};
use crate::pagetable::{IoPageTable, Perm, PAGE_SHIFT, PAGE_SIZE};
use sync::MutexExt;

/// The answer to a page request (PCIe PRI's "Page Request Group Response": success, or
/// invalid request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageResponse {
    /// The page is mapped on the host now (or already was): retry the access.
    Retry,
    /// The IOVA is not mapped for that access: the access faults.
    Invalid,
}

/// What an [`OnDemand`] backend did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OnDemandCounters {
    /// Page requests answered.
    pub page_requests: u64,
    /// Of which [`PageResponse::Invalid`].
    pub invalid: u64,
    /// Host mappings installed.
    pub installs: u64,
    /// Bytes mapped on the host now.
    pub installed_bytes: u64,
    /// Most bytes mapped on the host at once.
    pub peak_installed_bytes: u64,
}

/// A backend that maps on demand; see the module's documentation.
pub struct OnDemand {
    inner: Box<dyn DmaBackend>,
    /// What the IOMMU mapped (IOVA page -> GPA page, permission).
    recorded: IoPageTable,
    /// Host mappings made on `inner`: first IOVA page -> (pages, first GPA page, perm).
    installed: BTreeMap<u64, (u64, u64, Perm)>,
    /// Dirty IOVA pages read from the inner backend by an unmap but outside what the caller
    /// unmapped: reported by the next [`DmaBackend::read_dirty`] that covers them.
    dirty_kept: std::collections::BTreeSet<u64>,
    /// Install window, in pages (a power of two).
    window_pages: u64,
    counters: Arc<Mutex<OnDemandCounters>>,
}

impl OnDemand {
    /// Wraps `inner`, installing at most `window` bytes (a power of two, at least 4 KiB)
    /// per page request.
    pub fn new(inner: Box<dyn DmaBackend>, window: u64) -> Self {
        let window_pages = (window >> PAGE_SHIFT).max(1).next_power_of_two();
        Self {
            inner,
            recorded: IoPageTable::default(),
            installed: BTreeMap::new(),
            dirty_kept: std::collections::BTreeSet::new(),
            window_pages,
            counters: Arc::default(),
        }
    }

    /// Its counters.
    pub fn counters(&self) -> OnDemandCounters {
        *self.count()
    }

    /// Its counters, shared: they stay readable once the backend is handed to the IOMMU.
    pub fn shared_counters(&self) -> Arc<Mutex<OnDemandCounters>> {
        self.counters.clone()
    }

    fn count(&self) -> std::sync::MutexGuard<'_, OnDemandCounters> {
        self.counters.locked()
    }

    /// The installed host mappings `(iova, len)`, in IOVA order.
    pub fn installed(&self) -> Vec<(u64, u64)> {
        self.installed
            .iter()
            .map(|(&p, &(n, _, _))| (p << PAGE_SHIFT, n << PAGE_SHIFT))
            .collect()
    }

    /// The installed host mapping holding IOVA page `page`.
    fn installed_at(&self, page: u64) -> Option<(u64, u64)> {
        let (&first, &(pages, _, _)) = self.installed.range(..=page).next_back()?;
        (page < first + pages).then_some((first, pages))
    }

    /// Answers a page request for `iova` (a read, or a write when `write`), installing the
    /// host mapping under it when allowed.
    ///
    /// # Errors
    /// The inner backend's error when the host map fails (the device should treat the
    /// access as faulted).
    pub fn page_request(&mut self, iova: u64, write: bool) -> Result<PageResponse, BackendError> {
        self.count().page_requests += 1;
        let page = iova >> PAGE_SHIFT;
        let allowed = self.recorded.get(page).is_some_and(|p| {
            let need = if write { Perm::WRITE } else { Perm::READ };
            p.perm.contains(need)
        });
        if !allowed {
            self.count().invalid += 1;
            return Ok(PageResponse::Invalid);
        }
        if self.installed_at(page).is_some() {
            return Ok(PageResponse::Retry);
        }
        // The recorded mapping under `page`, clipped to its window and to what is not
        // installed yet on either side.
        let wlo = page & !(self.window_pages - 1);
        let whi = wlo + self.window_pages - 1;
        let mut run = None;
        self.recorded.mappings(wlo, whi, |r| {
            if r.iova_page <= page && page <= r.last_page() {
                run = Some(r);
                return false;
            }
            true
        });
        let Some(run) = run else {
            self.count().invalid += 1;
            return Ok(PageResponse::Invalid);
        };
        // No installed mapping overlaps `run`: one would lie in the same window and the same
        // recorded mapping, so it would hold `page` (installs never outlive a change of what
        // they cover: `unmap` removes every one it touches).
        self.inner.map(run.iova(), run.gpa(), run.len(), run.perm)?;
        self.installed
            .insert(run.iova_page, (run.pages, run.gpa_page, run.perm));
        let mut c = self.count();
        c.installs += 1;
        c.installed_bytes += run.len();
        c.peak_installed_bytes = c.peak_installed_bytes.max(c.installed_bytes);
        Ok(PageResponse::Retry)
    }

    /// The installed host mappings that overlap `[first, last]` (pages), whole.
    fn installed_in(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
        let before = self.installed_at(first).filter(|&(p, _)| p < first);
        before
            .into_iter()
            .chain(
                self.installed
                    .range(first..=last)
                    .map(|(&p, &(n, _, _))| (p, n)),
            )
            .collect()
    }
}

/// ORs `n` bits of `src` (from bit 0) into `dst` from bit `at`.
fn or_bits(dst: &mut [u64], at: u64, src: &[u64], n: u64) {
    for i in (0..n).filter(|&i| test_bit(src, i)) {
        set_bit(dst, at + i);
    }
}

/// Whether bit `i` of `bits` is set.
fn test_bit(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Sets bit `i` of `bits` (nothing beyond its end).
fn set_bit(bits: &mut [u64], i: u64) {
    if let Some(w) = bits.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

impl DmaBackend for OnDemand {
    fn name(&self) -> String {
        format!("{} (on demand)", self.inner.name())
    }

    fn caps(&self) -> BackendCaps {
        self.inner.caps()
    }

    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), BackendError> {
        let (first, pages) = (iova >> PAGE_SHIFT, len >> PAGE_SHIFT);
        if pages == 0 {
            return Ok(());
        }
        self.recorded
            .map(first, first + pages - 1, gpa >> PAGE_SHIFT, perm)
            .map_err(|e| BackendError::Range(format!("IOVA {iova:#x}+{len:#x}: {e}")))
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError> {
        let (first, pages) = (iova >> PAGE_SHIFT, len >> PAGE_SHIFT);
        if pages == 0 {
            return Ok(());
        }
        let last = first + pages - 1;
        for (p, n) in self.installed_in(first, last) {
            self.inner.unmap(p << PAGE_SHIFT, n << PAGE_SHIFT)?;
            self.installed.remove(&p);
            self.count().installed_bytes -= n << PAGE_SHIFT;
        }
        self.recorded.remove(first, last, |_| {});
        Ok(())
    }

    fn page_request(&mut self, iova: u64, write: bool) -> Result<PageResponse, BackendError> {
        OnDemand::page_request(self, iova, write)
    }

    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), BackendError> {
        self.inner.set_dirty_tracking(enable)
    }

    fn read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), BackendError> {
        let first = iova >> PAGE_SHIFT;
        let last = first + (len >> PAGE_SHIFT).max(1) - 1;
        let kept: Vec<u64> = self.dirty_kept.range(first..=last).copied().collect();
        for page in kept {
            set_bit(bitmap, page - first);
            if clear {
                self.dirty_kept.remove(&page);
            }
        }
        // Installed mappings that overlap the range, clipped to it.
        for (p, n) in self.installed_in(first, last) {
            let lo = p.max(first);
            let hi = (p + n - 1).min(last);
            let k = hi - lo + 1;
            let mut bits = vec![0u64; k.div_ceil(64) as usize];
            self.inner
                .read_dirty(lo * PAGE_SIZE, k * PAGE_SIZE, &mut bits, clear)?;
            or_bits(bitmap, lo - first, &bits, k);
        }
        Ok(())
    }

    fn unmap_read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
    ) -> Result<(), BackendError> {
        let (first, pages) = (iova >> PAGE_SHIFT, len >> PAGE_SHIFT);
        if pages == 0 {
            return Ok(());
        }
        let last = first + pages - 1;
        for (p, n) in self.installed_in(first, last) {
            let mut bits = vec![0u64; n.div_ceil(64) as usize];
            self.inner
                .unmap_read_dirty(p << PAGE_SHIFT, n << PAGE_SHIFT, &mut bits)?;
            // The part inside the range goes to the caller; pages of the host mapping outside
            // it (it held more than the caller unmaps) are kept for the next dirty read.
            for page in (0..n).filter(|&i| test_bit(&bits, i)).map(|i| p + i) {
                if (first..=last).contains(&page) {
                    set_bit(bitmap, page - first);
                } else {
                    self.dirty_kept.insert(page);
                }
            }
            self.installed.remove(&p);
            self.count().installed_bytes -= n << PAGE_SHIFT;
        }
        self.recorded.remove(first, last, |_| {});
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::backend::{Call, RecordingBackend, RecordingLog};

    const P: u64 = PAGE_SIZE;

    fn wrapped(window: u64) -> (OnDemand, Arc<Mutex<RecordingLog>>) {
        let (inner, log) = RecordingBackend::new("dev", BackendCaps::default());
        (OnDemand::new(Box::new(inner), window), log)
    }

    fn calls(log: &Arc<Mutex<RecordingLog>>) -> Vec<Call> {
        log.lock().unwrap().calls.clone()
    }

    /// A map reaches the host only when the device asks, and then exactly the mapping under
    /// the IOVA; a second request for it makes no call; what the mapping does not allow is
    /// invalid.
    #[test]
    fn a_mapping_is_installed_on_its_first_page_request() {
        let (mut b, log) = wrapped(2 << 20);
        b.map(0x10000, 0x80000, 4 * P, Perm::READ).unwrap();
        b.map(0x20000, 0x90000, P, Perm::RW).unwrap();
        assert!(calls(&log).is_empty());
        assert_eq!(b.page_request(0x12345, false), Ok(PageResponse::Retry));
        assert_eq!(
            calls(&log),
            vec![Call::Map(0x10000, 0x80000, 4 * P, Perm::READ)]
        );
        assert_eq!(b.page_request(0x13000, false), Ok(PageResponse::Retry));
        assert_eq!(calls(&log).len(), 1);
        // A write to the read-only mapping, an unmapped IOVA: invalid, nothing mapped.
        assert_eq!(b.page_request(0x10000, true), Ok(PageResponse::Invalid));
        assert_eq!(b.page_request(0x30000, false), Ok(PageResponse::Invalid));
        assert_eq!(b.page_request(0x20000, true), Ok(PageResponse::Retry));
        assert_eq!(calls(&log).len(), 2);
        let c = b.counters();
        assert_eq!(
            (c.page_requests, c.invalid, c.installs, c.installed_bytes),
            (5, 2, 2, 5 * P)
        );
        assert_eq!(b.installed(), vec![(0x10000, 4 * P), (0x20000, P)]);
    }

    /// UNMAP unmaps on the host only what was installed; an untouched mapping costs no call.
    #[test]
    fn unmap_removes_only_installed_mappings() {
        let (mut b, log) = wrapped(2 << 20);
        b.map(0x10000, 0x80000, 4 * P, Perm::RW).unwrap();
        b.map(0x20000, 0x90000, P, Perm::RW).unwrap();
        b.page_request(0x20000, true).unwrap();
        b.unmap(0x10000, 4 * P).unwrap();
        b.unmap(0x20000, P).unwrap();
        assert_eq!(
            calls(&log),
            vec![
                Call::Map(0x20000, 0x90000, P, Perm::RW),
                Call::Unmap(0x20000, P)
            ]
        );
        assert!(b.installed().is_empty());
        assert_eq!(b.counters().installed_bytes, 0);
        assert_eq!(b.counters().peak_installed_bytes, P);
        // Unmapped: a request for it is invalid now.
        assert_eq!(b.page_request(0x20000, false), Ok(PageResponse::Invalid));
        assert!(log.lock().unwrap().pages.is_empty());
    }

    /// A large mapping (all of RAM outside the vIOMMU) is installed one aligned window at a
    /// time, each window a host mapping of its own inside the recorded one.
    #[test]
    fn large_mappings_are_installed_a_window_at_a_time() {
        let (mut b, log) = wrapped(2 << 20);
        let ram = 64 << 20;
        b.map(0, 0, ram, Perm::RW).unwrap();
        assert_eq!(b.page_request(0x30_1234, true), Ok(PageResponse::Retry));
        assert_eq!(
            b.page_request((5 << 20) + 1, false),
            Ok(PageResponse::Retry)
        );
        assert_eq!(
            calls(&log),
            vec![
                Call::Map(2 << 20, 2 << 20, 2 << 20, Perm::RW),
                Call::Map(4 << 20, 4 << 20, 2 << 20, Perm::RW),
            ]
        );
        assert_eq!(b.counters().installed_bytes, 4 << 20);
        // Tearing down all of RAM unmaps the two windows, one call each.
        b.unmap(0, ram).unwrap();
        assert_eq!(
            calls(&log)[2..],
            [Call::Unmap(2 << 20, 2 << 20), Call::Unmap(4 << 20, 2 << 20)]
        );
    }

    /// A window that reaches an installed neighbour stops at it: host mappings never overlap.
    #[test]
    fn windows_stop_at_installed_neighbours() {
        let (mut b, log) = wrapped(16 * P);
        // Two recorded mappings of 16 pages each, where the second starts mid-window... and
        // one of 32 pages across two windows.
        b.map(0, 0x100000, 32 * P, Perm::RW).unwrap();
        b.page_request(20 * P, true).unwrap();
        b.page_request(3 * P, true).unwrap();
        assert_eq!(
            calls(&log),
            vec![
                Call::Map(16 * P, 0x100000 + 16 * P, 16 * P, Perm::RW),
                Call::Map(0, 0x100000, 16 * P, Perm::RW),
            ]
        );
        // Small window at an odd mapping: the window is clipped to the mapping.
        let (mut b, log) = wrapped(8 * P);
        b.map(5 * P, 0x200000, 6 * P, Perm::READ).unwrap();
        b.page_request(9 * P, false).unwrap();
        b.page_request(6 * P, false).unwrap();
        assert_eq!(
            calls(&log),
            vec![
                Call::Map(8 * P, 0x200000 + 3 * P, 3 * P, Perm::READ),
                Call::Map(5 * P, 0x200000, 3 * P, Perm::READ),
            ]
        );
    }

    /// A refused host map is the request's error; nothing is recorded as installed.
    #[test]
    fn a_failed_install_is_an_error_and_installs_nothing() {
        let (mut b, log) = wrapped(2 << 20);
        b.map(0x10000, 0x80000, P, Perm::RW).unwrap();
        log.lock().unwrap().fail_iova = Some(0x10000);
        assert!(b.page_request(0x10000, true).is_err());
        assert!(b.installed().is_empty());
        log.lock().unwrap().fail_iova = None;
        assert_eq!(b.page_request(0x10000, true), Ok(PageResponse::Retry));
        // Overlapping records are refused like a host would refuse them.
        assert!(b.map(0x10000, 0x80000, P, Perm::RW).is_err());
    }

    /// Dirty reads and unmaps with dirty bits go to the installed mappings only, and their
    /// bits land at the right offsets of the caller's bitmap.
    #[test]
    fn dirty_bits_come_from_installed_mappings() {
        let caps = BackendCaps {
            dirty_tracking: true,
            ..BackendCaps::default()
        };
        let (inner, log) = RecordingBackend::new("dev", caps);
        let mut b = OnDemand::new(Box::new(inner), 4 * P);
        b.set_dirty_tracking(true).unwrap();
        b.map(0, 0x100000, 16 * P, Perm::RW).unwrap();
        b.page_request(5 * P, true).unwrap();
        b.page_request(13 * P, true).unwrap();
        log.lock().unwrap().dirty.extend([5, 6, 13]);
        let mut bits = [0u64; 1];
        b.read_dirty(0, 16 * P, &mut bits, false).unwrap();
        assert_eq!(bits[0], (1 << 5) | (1 << 6) | (1 << 13));
        let mut bits = [0u64; 1];
        b.read_dirty(6 * P, 10 * P, &mut bits, true).unwrap();
        assert_eq!(bits[0], 1 | (1 << 7));
        let mut bits = [0u64; 1];
        b.unmap_read_dirty(0, 16 * P, &mut bits).unwrap();
        assert_eq!(bits[0], 1 << 5);
        assert!(b.installed().is_empty());
    }

    /// Through the device: a guest MAP makes no host call on an on-demand backend; the
    /// device's page request installs it (and only a permitted access); UNMAP unmaps what
    /// was installed; a page request after DETACH is invalid.
    #[test]
    fn the_viommu_routes_page_requests_to_the_endpoint_backend() {
        use crate::protocol::{Status, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
        use crate::testing::{attach, detach, map, unmap};
        use crate::viommu::{Request, Viommu, ViommuConfig};

        let send = |v: &mut Viommu, req: &[u8]| {
            let r = Request {
                readable: req,
                readable_len: req.len(),
                writable_len: 4,
            };
            v.process(&[r]).remove(0).status()
        };
        let mut v = Viommu::new(ViommuConfig {
            guest_ram: vec![(0, 1 << 30)],
            ..Default::default()
        });
        let (inner, log) = RecordingBackend::new("dev", BackendCaps::default());
        let id = v
            .add_backend(Box::new(OnDemand::new(Box::new(inner), 2 << 20)))
            .unwrap();
        v.add_endpoint(8, Some(id), &[]).unwrap();
        assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
        let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
        assert_eq!(
            send(&mut v, &map(1, 0x10000, 0x13fff, 0x80000, rw)),
            Some(Status::Ok)
        );
        assert_eq!(
            send(
                &mut v,
                &map(1, 0x20000, 0x20fff, 0x90000, VIRTIO_IOMMU_MAP_F_READ)
            ),
            Some(Status::Ok)
        );
        assert!(calls(&log).is_empty());
        assert_eq!(v.page_request(id, 0x11000, true), Ok(PageResponse::Retry));
        assert_eq!(v.page_request(id, 0x20000, true), Ok(PageResponse::Invalid));
        assert_eq!(
            calls(&log),
            vec![Call::Map(0x10000, 0x80000, 4 * P, Perm::RW)]
        );
        assert_eq!(v.counters().page_requests, 2);
        assert_eq!(send(&mut v, &unmap(1, 0x10000, 0x13fff)), Some(Status::Ok));
        assert_eq!(send(&mut v, &unmap(1, 0x20000, 0x20fff)), Some(Status::Ok));
        assert_eq!(calls(&log)[1..], [Call::Unmap(0x10000, 4 * P)]);
        assert_eq!(
            send(&mut v, &map(1, 0x30000, 0x30fff, 0x70000, rw)),
            Some(Status::Ok)
        );
        assert_eq!(send(&mut v, &detach(1, 8)), Some(Status::Ok));
        assert_eq!(
            v.page_request(id, 0x30000, false),
            Ok(PageResponse::Invalid)
        );
        assert_eq!(calls(&log).len(), 2);
        // An unknown backend: invalid.
        assert_eq!(
            v.page_request(id + 7, 0x30000, false),
            Ok(PageResponse::Invalid)
        );
    }

    /// A host mapping installed over two recorded ones (a backend that merges maps) is
    /// unmapped whole when the caller unmaps the second: the host never keeps an IOVA the
    /// IOMMU unmapped, and the first one's dirty bits wait for the next read.
    #[test]
    fn an_unmap_inside_an_installed_mapping_unmaps_it_and_keeps_its_dirty_bits() {
        let caps = BackendCaps {
            dirty_tracking: true,
            merge_maps: true,
            ..BackendCaps::default()
        };
        let (inner, log) = RecordingBackend::new("dev", caps);
        let mut b = OnDemand::new(Box::new(inner), 2 << 20);
        b.set_dirty_tracking(true).unwrap();
        // One merged host call from the IOMMU for two guest mappings of 4 pages each.
        b.map(0x10000, 0x80000, 8 * P, Perm::RW).unwrap();
        b.page_request(0x10000, true).unwrap();
        log.lock().unwrap().dirty.extend([0x10, 0x15]);
        let mut bits = [0u64; 1];
        b.unmap_read_dirty(0x14000, 4 * P, &mut bits).unwrap();
        assert_eq!(bits[0], 1 << 1, "page 0x15 is the second page of the range");
        assert!(
            log.lock().unwrap().pages.is_empty(),
            "the host unmapped the whole install"
        );
        assert_eq!(b.page_request(0x14000, false), Ok(PageResponse::Invalid));
        // The first mapping is still recorded: reinstalled on demand, and its dirty page read.
        let mut bits = [0u64; 1];
        b.read_dirty(0x10000, 4 * P, &mut bits, true).unwrap();
        assert_eq!(bits[0], 1);
        let mut bits = [0u64; 1];
        b.read_dirty(0x10000, 4 * P, &mut bits, true).unwrap();
        assert_eq!(bits[0], 0, "cleared by the clearing read");
        assert_eq!(b.page_request(0x12000, true), Ok(PageResponse::Retry));
        assert_eq!(b.installed(), vec![(0x10000, 4 * P)]);
        // A plain unmap of a range inside an install unmaps the install too.
        b.unmap(0x11000, P).unwrap();
        assert!(b.installed().is_empty());
    }
}
