//! Endpoints that come and go while the guest runs (PCI hot-plug).
//!
//! The guest read the page sizes and the input range once, when its driver probed the
//! device (`page_size_mask`, `input_range`: virtio 1.3 section 5.13.4), and may have mapped
//! with them since. A backend added later must therefore take what the device already
//! offers: [`Viommu::add_backend_within`] refuses one that would narrow it. A removed
//! endpoint leaves nothing behind on the host: [`HostSide::remove_endpoint`] detaches it
//! (its host mappings unmapped, with their dirty pages harvested first, and its domain freed
//! when it was the last endpoint), then releases its backend, so that the device's
//! connection can close.

use std::sync::{Arc, Mutex};

use super::relock::Relock;
use super::{BackendSlot, Content, EndpointId, HostOps, SetupError, Viommu};
use crate::backend::{BackendCaps, BackendError, DmaBackend};
use crate::Perm;

/// What removing an endpoint did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointRemoval {
    /// The domain it was still attached to (the guest did not DETACH it), if any.
    pub was_attached: Option<u32>,
    /// That domain had no other endpoint and is gone.
    pub domain_freed: bool,
    /// Host mappings it still had (identity under bypass, or its domain's), now unmapped.
    pub unmapped_content: bool,
    /// Its backend served no other endpoint and was released.
    pub backend_released: bool,
    /// A host unmap failed; the backend was released all the same (its device is going
    /// away), marked failed.
    pub error: Option<String>,
}

/// Stands in for a released backend: its slot keeps its index, it gets no call (it is
/// marked failed), and any call that came would fail.
struct Released(String);

impl DmaBackend for Released {
    fn name(&self) -> String {
        self.0.clone()
    }
    fn caps(&self) -> BackendCaps {
        BackendCaps::default()
    }
    fn map(&mut self, _: u64, _: u64, _: u64, _: Perm) -> Result<(), BackendError> {
        Err(BackendError::Failed(format!("{}: released", self.0)))
    }
    fn unmap(&mut self, _: u64, _: u64) -> Result<(), BackendError> {
        Err(BackendError::Failed(format!("{}: released", self.0)))
    }
}

impl Viommu {
    /// Registers the backend of a device added while the guest runs. Unlike
    /// [`Viommu::add_backend`], it never narrows what the guest was told: the backend must
    /// map every page size of `page_size_mask` and the whole `input_range`.
    ///
    /// # Errors
    /// [`SetupError::Narrows`] naming the backend and what it lacks.
    pub fn add_backend_within(
        &mut self,
        backend: Box<dyn DmaBackend>,
    ) -> Result<super::BackendId, SetupError> {
        let caps = backend.caps();
        let name = backend.name();
        let missing = self.cfg.page_size_mask & !caps.page_size_mask;
        if missing != 0 {
            return Err(SetupError::Narrows(
                name,
                format!(
                    "page sizes {missing:#x} of the guest's page_size_mask {:#x} (it maps \
                     {:#x})",
                    self.cfg.page_size_mask, caps.page_size_mask
                ),
            ));
        }
        let (lo, hi) = self.cfg.input_range;
        let first = caps.iova_ranges.iter().map(|r| r.0).min();
        let last = caps.iova_ranges.iter().map(|r| r.1).max();
        if first.is_none_or(|f| f > lo) || last.is_none_or(|l| l < hi) {
            return Err(SetupError::Narrows(
                name,
                format!(
                    "the guest's input_range {lo:#x}..={hi:#x} (its IOVA ranges {:x?})",
                    caps.iova_ranges
                ),
            ));
        }
        self.backends.push(BackendSlot {
            backend: Arc::new(Mutex::new(backend)),
            name,
            caps,
            failed: false,
        });
        Ok(self.backends.len() - 1)
    }
}

/// Removal's host calls, each with the state unlocked (see [`Relock`]).
pub(super) trait Unplug: Relock {
    /// See [`super::HostSide::remove_endpoint`].
    fn unplug(&mut self, ep: EndpointId) -> Option<EndpointRemoval> {
        self.flush_pending(&mut []);
        let e = self.endpoints.get(&ep)?;
        let backend = e.backend;
        let mut out = EndpointRemoval {
            was_attached: e.domain,
            ..EndpointRemoval::default()
        };
        if let Some(dom) = e.domain {
            if let Err(s) = self.detach(ep, dom) {
                out.error = Some(format!("detach from domain {dom}: {s:?}"));
                // The device leaves anyway: take it out of the domain.
                self.leave_domain(ep, dom);
            }
            // A domain goes with its last endpoint.
            out.domain_freed = !self.domains.contains_key(&dom);
        }
        // Unattached, the endpoint may still have identity mappings (bypass).
        if let Some(b) = backend {
            let shared = self
                .endpoints
                .iter()
                .any(|(&id, o)| id != ep && o.backend == Some(b));
            if !shared {
                let content = self.endpoint_content(ep);
                if content != Content::Nothing {
                    out.unmapped_content = true;
                    if let Err(e) = self.switch_backend(b, content, Content::Nothing) {
                        out.error.get_or_insert(format!("unmap: {e}"));
                    }
                }
            }
        }
        self.endpoints.remove(&ep);
        if let Some(b) = backend {
            if !self.endpoints.values().any(|o| o.backend == Some(b)) {
                let slot = &mut self.backends[b];
                let name = slot.name.clone();
                slot.failed = true;
                // The backend itself (and the device connection it holds) is dropped here,
                // or when a call in flight returns it.
                slot.backend = Arc::new(Mutex::new(Box::new(Released(name))));
                out.backend_released = true;
            }
        }
        Some(out)
    }
}

impl<G: Relock + ?Sized> Unplug for G {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RecordingBackend;
    use crate::protocol::Status;
    use crate::testing::{attach, batch, device, map, RW};
    use crate::viommu::HostSide;

    /// A device removed while attached, with mappings and dirty pages: every host mapping is
    /// unmapped (unmap calls balance map calls), the pages it wrote reach the next harvest,
    /// its domain is freed, and its backend is released; a second endpoint's domain and
    /// mappings are untouched.
    #[test]
    fn a_removed_endpoint_leaves_no_host_mapping_and_loses_no_dirty_page() {
        let mut v = device();
        let caps = BackendCaps {
            dirty_tracking: true,
            ..BackendCaps::default()
        };
        let (rec, log) = RecordingBackend::new("gone", caps.clone());
        let (other, other_log) = RecordingBackend::new("stays", caps);
        let b = v.add_backend(Box::new(rec)).unwrap();
        let o = v.add_backend(Box::new(other)).unwrap();
        v.add_endpoint(8, Some(b), &[]).unwrap();
        v.add_endpoint(16, Some(o), &[]).unwrap();
        let ok = Some(Status::Ok);
        let reqs = [
            attach(1, 8, 0),
            map(1, 0x10000, 0x1ffff, 0x80000, RW),
            map(1, 0x40000, 0x40fff, 0x90000, RW),
            attach(2, 16, 0),
            map(2, 0x10000, 0x10fff, 0xa0000, RW),
        ];
        assert_eq!(batch(&mut v, &reqs), vec![ok; 5]);
        v.start_dirty_tracking();
        log.lock().unwrap().device_write(0x11);
        let r = HostSide::remove_endpoint(&mut crate::viommu::Held(&mut v), 8).unwrap();
        assert_eq!(r.was_attached, Some(1));
        assert!(
            r.domain_freed && r.backend_released && r.error.is_none(),
            "{r:?}"
        );
        let l = log.lock().unwrap();
        assert!(l.host_pages().is_empty(), "{:x?}", l.host_pages());
        assert_eq!(l.map_calls(), l.unmap_calls(), "{:x?}", l.calls);
        drop(l);
        assert!(!v.has_endpoint(8));
        assert_eq!(v.domain_ids(), vec![2]);
        assert_eq!(other_log.lock().unwrap().host_pages().len(), 1);
        let mut out = crate::dirty::DirtyBitmap::new(&[(0, 1 << 30)]);
        v.harvest_dirty(&mut out);
        let mut pages = Vec::new();
        out.for_each_run(|gpa, len| pages.push((gpa, len)));
        assert_eq!(
            pages,
            vec![(0x81000, 0x1000)],
            "the page written before removal"
        );
        assert_eq!(
            HostSide::remove_endpoint(&mut crate::viommu::Held(&mut v), 8),
            None
        );
    }

    /// A host unmap that fails at removal is reported, and the device leaves all the same:
    /// out of its domain (freed), its backend released; a domain another endpoint shares
    /// stays.
    #[test]
    fn a_removal_whose_unmap_fails_still_takes_the_endpoint_out() {
        let mut v = device();
        let (rec, log) = RecordingBackend::new("gone", BackendCaps::default());
        let b = v.add_backend(Box::new(rec)).unwrap();
        v.add_endpoint(8, Some(b), &[]).unwrap();
        let reqs = [
            attach(1, 8, 0),
            map(1, 0x10000, 0x10fff, 0x80000, RW),
            attach(1, 1, 0),
        ];
        assert_eq!(batch(&mut v, &reqs), vec![Some(Status::Ok); 3]);
        log.lock().unwrap().fail_unmap_iova = Some(0x10000);
        let r = HostSide::remove_endpoint(&mut crate::viommu::Held(&mut v), 8).unwrap();
        assert!(r.error.is_some() && r.backend_released, "{r:?}");
        assert!(!r.domain_freed, "endpoint 1 is still in domain 1: {r:?}");
        assert!(!v.has_endpoint(8));
        assert_eq!(v.endpoint_domain(1), Some(1));
        // Alone in its domain, the domain goes with it even though the unmap failed.
        let (rec, log) = RecordingBackend::new("alone", BackendCaps::default());
        let b = v.add_backend(Box::new(rec)).unwrap();
        v.add_endpoint(16, Some(b), &[]).unwrap();
        let reqs = [attach(2, 16, 0), map(2, 0x20000, 0x20fff, 0x90000, RW)];
        assert_eq!(batch(&mut v, &reqs), vec![Some(Status::Ok); 2]);
        log.lock().unwrap().fail_unmap_iova = Some(0x20000);
        let r = HostSide::remove_endpoint(&mut crate::viommu::Held(&mut v), 16).unwrap();
        assert!(r.error.is_some() && r.domain_freed, "{r:?}");
        assert_eq!(v.domain_ids(), vec![1]);
    }

    /// Under bypass, an unattached endpoint's identity mappings go with it.
    #[test]
    fn a_removed_endpoint_in_bypass_takes_its_identity_mappings() {
        let mut v = device();
        v.set_bypass(1);
        let (rec, log) = RecordingBackend::new("gone", BackendCaps::default());
        let b = v.add_backend(Box::new(rec)).unwrap();
        v.add_endpoint(8, Some(b), &[]).unwrap();
        let before = log.lock().unwrap().host_pages().len();
        let r = HostSide::remove_endpoint(&mut crate::viommu::Held(&mut v), 8).unwrap();
        assert!(r.unmapped_content && r.was_attached.is_none(), "{r:?}");
        let l = log.lock().unwrap();
        assert!(before > 0 && l.host_pages().is_empty());
        assert_eq!(l.map_calls(), l.unmap_calls());
    }

    /// A backend added while tracking runs is tracked from then on: a harvest reports the
    /// page its device wrote, not every page mapped writable for it.
    #[test]
    fn a_backend_added_while_tracking_runs_is_tracked() {
        let mut v = device();
        v.start_dirty_tracking();
        let caps = BackendCaps {
            dirty_tracking: true,
            ..BackendCaps::default()
        };
        let (rec, log) = RecordingBackend::new("late", caps);
        let b = v.add_backend_within(Box::new(rec)).unwrap();
        v.add_endpoint(8, Some(b), &[]).unwrap();
        let mut g = crate::viommu::Held(&mut v);
        assert_eq!(g.track_new_backend(b), Some(true));
        assert!(log.lock().unwrap().tracking);
        let reqs = [attach(1, 8, 0), map(1, 0x10000, 0x1ffff, 0x80000, RW)];
        assert_eq!(batch(&mut v, &reqs), vec![Some(Status::Ok); 2]);
        log.lock().unwrap().device_write(0x12);
        let mut out = crate::dirty::DirtyBitmap::new(&[(0, 1 << 30)]);
        v.harvest_dirty(&mut out);
        let mut pages = Vec::new();
        out.for_each_run(|gpa, len| pages.push((gpa, len)));
        assert_eq!(pages, vec![(0x82000, 0x1000)]);
        v.stop_dirty_tracking();
        let mut g = crate::viommu::Held(&mut v);
        assert_eq!(g.track_new_backend(b), None, "tracking is off");
    }

    /// A backend added while the guest runs takes what the guest was told, or is refused.
    #[test]
    fn a_late_backend_cannot_narrow_what_the_guest_read() {
        let mut v = device();
        let (fine, _) = RecordingBackend::new("fine", BackendCaps::default());
        assert!(v.add_backend_within(Box::new(fine)).is_ok());
        let big = BackendCaps {
            page_size_mask: 0x20_0000,
            ..BackendCaps::default()
        };
        let (coarse, _) = RecordingBackend::new("coarse", big);
        let e = v.add_backend_within(Box::new(coarse)).unwrap_err();
        assert!(
            e.to_string().contains("cannot map page sizes 0x40001000"),
            "{e}"
        );
        let narrow = BackendCaps {
            iova_ranges: vec![(0, (1 << 39) - 1)],
            ..BackendCaps::default()
        };
        let (short, _) = RecordingBackend::new("short", narrow);
        let e = v.add_backend_within(Box::new(short)).unwrap_err();
        assert!(e.to_string().contains("input_range"), "{e}");
        let late_start = BackendCaps {
            iova_ranges: vec![(0x1000, crate::pagetable::MAX_IOVA)],
            ..BackendCaps::default()
        };
        let (high, _) = RecordingBackend::new("high", late_start);
        let e = v.add_backend_within(Box::new(high)).unwrap_err();
        assert!(e.to_string().contains("input_range"), "{e}");
        assert_eq!(v.config().page_size_mask.get() & 0x1000, 0x1000);
    }
}
