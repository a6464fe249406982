//! Host calls without the device state held: the state's owner hands the request paths an
//! access that it can give up while a backend waits on its peer (a vfio-user server, a
//! vhost-user back end, the kernel), so that translations, fault reports and IOTLB misses of
//! other devices go on meanwhile.
//!
//! Whoever makes host calls through a [`Relock`] must be the only one doing so until it is
//! done (the caller's "host order": the `devices` crate takes a lock for that before the
//! state's lock). Between two host calls the state may then be read, and changed by the
//! paths that make no host calls (translations, faults, counters), but its mappings,
//! endpoints and domains change only through the caller. The paths keep the guest's order:
//! a MAP or UNMAP is answered only after its host calls returned, and a failed call is
//! undone before the request's status is set.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};

use super::{BackendId, Viommu};
use crate::backend::{BackendError, DmaBackend};
use crate::dirty::DirtyBitmap;

/// A host backend as the device keeps it: shared, so that a call can run while the device
/// state is unlocked. Only the holder of the host order locks it.
pub(super) type SharedBackend = Arc<Mutex<Box<dyn DmaBackend>>>;

/// Access to the device state that can be given up for the length of a host call.
pub trait Relock: DerefMut<Target = Viommu> {
    /// Runs `call` (one host call on a backend) with the state unlocked, and takes the state
    /// back before returning. `call` gets no access to the state.
    fn unlocked<R>(&mut self, call: impl FnOnce() -> R) -> R;
}

/// The state borrowed exclusively, with no lock to give up: host calls run in place. Used by
/// the methods of [`Viommu`] itself, by set-up and restore, and by tests.
pub struct Held<'a>(pub &'a mut Viommu);

impl Deref for Held<'_> {
    type Target = Viommu;
    fn deref(&self) -> &Viommu {
        self.0
    }
}

impl DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Viommu {
        self.0
    }
}

impl Relock for Held<'_> {
    fn unlocked<R>(&mut self, call: impl FnOnce() -> R) -> R {
        call()
    }
}

/// Runs `f` on backend `b` with the state unlocked. Callers name registered backends only;
/// an unknown one is not called and fails.
pub(super) fn call<G: Relock + ?Sized, T>(
    g: &mut G,
    b: BackendId,
    f: impl FnOnce(&mut dyn DmaBackend) -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    let Some(backend) = g.backends.get(b).map(|s| Arc::clone(&s.backend)) else {
        return Err(BackendError::Failed(format!("no backend {b}")));
    };
    g.unlocked(move || {
        let mut guard = backend.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut **guard)
    })
}

/// The device's paths that make host calls, for a caller that can unlock the state while
/// they wait ([`Relock`]). [`Viommu`]'s methods of the same names run them with [`Held`].
pub trait HostSide: Relock {
    /// [`Viommu::process_into`], with the state unlocked during each host call.
    fn process_into(&mut self, reqs: &[super::Request<'_>], replies: &mut Vec<super::Reply>) {
        super::request::Serve::serve_into(self, reqs, replies);
    }

    /// [`Viommu::set_bypass`], with the state unlocked during each host call.
    fn set_bypass(&mut self, value: u8) {
        super::Lifecycle::bypass_to(self, value);
    }

    /// [`Viommu::reset`], with the state unlocked during each host call.
    fn reset(&mut self) {
        super::Lifecycle::reset_all(self);
    }

    /// [`Viommu::system_reset`], with the state unlocked during each host call.
    fn system_reset(&mut self) {
        super::Lifecycle::system_reset_all(self);
    }

    /// [`Viommu::page_request`], with the state unlocked during the backend's call.
    ///
    /// # Errors
    /// The backend's error when the host map failed.
    fn page_request(
        &mut self,
        backend: BackendId,
        iova: u64,
        write: bool,
    ) -> Result<crate::backend::PageResponse, BackendError> {
        if self.backends.get(backend).is_none_or(|b| b.failed) {
            return Ok(crate::backend::PageResponse::Invalid);
        }
        self.counters.page_requests += 1;
        call(self, backend, |b| b.page_request(iova, write))
    }

    /// Removes endpoint `ep` (its device was hot-unplugged): detaches it if the guest did
    /// not (its host mappings unmapped, their dirty pages harvested first, its domain freed
    /// when empty), unmaps what it had under bypass, and releases its backend when no other
    /// endpoint uses it. `None` for an unknown endpoint.
    fn remove_endpoint(&mut self, ep: super::EndpointId) -> Option<super::EndpointRemoval> {
        super::hotplug::Unplug::unplug(self, ep)
    }

    /// [`Viommu::start_dirty_tracking`], with the state unlocked during each host call.
    fn start_dirty_tracking(&mut self) -> super::DirtyTrackingReport {
        super::dirty::DirtySide::start_tracking(self)
    }

    /// Starts dirty tracking on backend `backend`, registered while tracking runs (a
    /// hot-added device), with the state unlocked during the call. `None` when tracking is
    /// off; `Some(false)` when the backend cannot track (its writable mappings then count
    /// dirty at every harvest).
    fn track_new_backend(&mut self, backend: BackendId) -> Option<bool> {
        super::dirty::DirtySide::track_backend(self, backend)
    }

    /// [`Viommu::harvest_dirty_with`], with the state unlocked during each host call.
    fn harvest_dirty_with(&mut self, out: &mut DirtyBitmap, opts: super::HarvestOptions) {
        super::dirty::DirtySide::harvest_with(self, out, opts);
    }

    /// [`Viommu::harvest_dirty`], with the state unlocked during each host call.
    fn harvest_dirty(&mut self, out: &mut DirtyBitmap) {
        super::dirty::DirtySide::harvest_with(self, out, super::HarvestOptions::default());
    }

    /// [`Viommu::stop_dirty_tracking`], with the state unlocked during each host call.
    fn stop_dirty_tracking(&mut self) -> Option<DirtyBitmap> {
        super::dirty::DirtySide::stop_tracking(self)
    }
}

impl<G: Relock + ?Sized> HostSide for G {}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;
    use crate::backend::{BackendCaps, PageResponse, RecordingBackend};
    use crate::protocol::Status;
    use crate::testing::{attach, batch, detach, device, map, unmap, RW};
    use crate::viommu::Request;

    /// Whether the state is given up, shared by the access and the backend.
    #[derive(Default)]
    struct Seen {
        given_up: AtomicBool,
        /// Backend calls made while the state was held.
        held_calls: AtomicU64,
        calls: AtomicU64,
    }

    /// An access that marks when the state is given up.
    struct Marking<'a>(&'a mut Viommu, &'a Seen);

    impl Deref for Marking<'_> {
        type Target = Viommu;
        fn deref(&self) -> &Viommu {
            self.0
        }
    }

    impl DerefMut for Marking<'_> {
        fn deref_mut(&mut self) -> &mut Viommu {
            self.0
        }
    }

    impl Relock for Marking<'_> {
        fn unlocked<R>(&mut self, call: impl FnOnce() -> R) -> R {
            self.1.given_up.store(true, Ordering::SeqCst);
            let r = call();
            self.1.given_up.store(false, Ordering::SeqCst);
            r
        }
    }

    /// A recording backend that counts the calls it gets while the state is held.
    struct Watched(RecordingBackend, Arc<Seen>);

    impl Watched {
        fn note(&self) {
            self.1.calls.fetch_add(1, Ordering::SeqCst);
            if !self.1.given_up.load(Ordering::SeqCst) {
                self.1.held_calls.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl DmaBackend for Watched {
        fn name(&self) -> String {
            self.0.name()
        }
        fn caps(&self) -> BackendCaps {
            self.0.caps()
        }
        fn map(
            &mut self,
            iova: u64,
            gpa: u64,
            len: u64,
            perm: crate::Perm,
        ) -> Result<(), BackendError> {
            self.note();
            self.0.map(iova, gpa, len, perm)
        }
        fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError> {
            self.note();
            self.0.unmap(iova, len)
        }
        fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), BackendError> {
            self.note();
            self.0.set_dirty_tracking(enable)
        }
        fn read_dirty(
            &mut self,
            iova: u64,
            len: u64,
            bitmap: &mut [u64],
            clear: bool,
        ) -> Result<(), BackendError> {
            self.note();
            self.0.read_dirty(iova, len, bitmap, clear)
        }
        fn unmap_read_dirty(
            &mut self,
            iova: u64,
            len: u64,
            bitmap: &mut [u64],
        ) -> Result<(), BackendError> {
            self.note();
            self.0.unmap_read_dirty(iova, len, bitmap)
        }
        fn page_request(&mut self, _iova: u64, _write: bool) -> Result<PageResponse, BackendError> {
            self.note();
            Ok(PageResponse::Retry)
        }
    }

    /// Sends `reqs` as one batch through `g`; returns the statuses.
    fn serve(g: &mut impl HostSide, reqs: &[Vec<u8>]) -> Vec<Option<Status>> {
        let rs: Vec<Request<'_>> = reqs
            .iter()
            .map(|r| Request {
                readable: r,
                readable_len: r.len(),
                writable_len: 4,
            })
            .collect();
        let mut replies = Vec::new();
        g.process_into(&rs, &mut replies);
        replies.iter().map(|r| r.status()).collect()
    }

    /// Every host call of every path that makes them (requests, rollback, bypass changes,
    /// resets, dirty tracking, page requests) is made with the state given up.
    #[test]
    fn every_host_call_is_made_with_the_state_given_up() {
        let seen = Arc::new(Seen::default());
        let mut v = device();
        let caps = BackendCaps {
            dirty_tracking: true,
            ..BackendCaps::default()
        };
        let (rec, log) = RecordingBackend::new("rec", caps);
        let b = v
            .add_backend(Box::new(Watched(rec, Arc::clone(&seen))))
            .unwrap();
        v.add_endpoint(8, Some(b), &[]).unwrap();
        let mut g = Marking(&mut v, &seen);
        let ok = Some(Status::Ok);
        let first = [
            attach(1, 8, 0),
            map(1, 0x10000, 0x1ffff, 0x80000, RW),
            map(1, 0x20000, 0x20fff, 0x90000, RW),
        ];
        assert_eq!(serve(&mut g, &first), vec![ok; 3]);
        let report = g.start_dirty_tracking();
        assert_eq!(report.tracked, vec!["rec".to_string()]);
        let mut out = crate::dirty::DirtyBitmap::new(&[(0, 1 << 30)]);
        g.harvest_dirty(&mut out);
        assert!(g.page_request(b, 0x10000, true).is_ok());
        // A failing map is undone, with more calls.
        log.lock().unwrap().fail_iova = Some(0x40000);
        let failing = [
            map(1, 0x40000, 0x40fff, 0xa0000, RW),
            unmap(1, 0x10000, 0x1ffff),
        ];
        assert_eq!(serve(&mut g, &failing), vec![Some(Status::DevErr), ok]);
        g.stop_dirty_tracking();
        assert_eq!(serve(&mut g, &[detach(1, 8)]), vec![ok]);
        g.set_bypass(1);
        g.set_bypass(0);
        g.set_bypass(1);
        g.system_reset();
        let calls = seen.calls.load(Ordering::SeqCst);
        assert!(calls >= 10, "the paths made host calls: {calls}");
        assert_eq!(
            seen.held_calls.load(Ordering::SeqCst),
            0,
            "of {calls} calls"
        );
        // `Viommu`'s own methods ([`Held`]) keep the state during the calls.
        let reqs = [attach(2, 8, 0), map(2, 0x10000, 0x10fff, 0x80000, RW)];
        assert_eq!(batch(&mut v, &reqs), vec![ok; 2]);
        assert!(seen.held_calls.load(Ordering::SeqCst) > 0);
    }
}
