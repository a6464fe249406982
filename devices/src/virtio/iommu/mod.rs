//! The virtio-iommu device model (virtio 1.3 section 5.13) around the `iommu` crate's state:
//! a request queue whose requests of one notification are handled as a batch and answered
//! with one interrupt, and an event queue that carries translation faults.
//!
//! Every device-normative statement of 5.13, with the code that enforces it and the test
//! that shows it, is in `iommu/CONFORMANCE.md`.

mod handler;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use iommu::protocol::{CONFIG_BYPASS_OFFSET, VIRTIO_ID_IOMMU};
use iommu::viommu::HostSide;
use iommu::Viommu;
use sync::MutexExt;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zerocopy::IntoBytes;

use super::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemoryMmap;

/// Size of each of the two queues: room for 256 requests of two descriptors in one batch.
pub const QUEUE_SIZE: u16 = 512;

/// The IOMMU state shared with the devices behind it: emulated devices translate through it,
/// passthrough devices report faults to it. After raising a fault, signal `fault_evt` so the
/// event loop writes it to the event queue.
#[derive(Clone)]
pub struct IommuHandle {
    /// The device state.
    pub state: Arc<Mutex<Viommu>>,
    /// Signalled when a fault is waiting for the event queue.
    pub fault_evt: Arc<EventFd>,
    /// How the state's lock is shared out, for the counters report.
    pub lock_stats: Arc<LockStats>,
    /// The host order: held by whoever runs the state's paths that make host calls
    /// ([`IommuHandle::lock_for_host_calls`]), from before it takes the state until it is
    /// done, so that those paths run one at a time while the state itself is given up
    /// during each call.
    host_order: Arc<Mutex<()>>,
}

/// How often the state's lock was taken through [`IommuHandle::lock`], how often the taker
/// found it held by another thread (contended), and how long those takers waited in total
/// (nanoseconds). Only contended takers read the clock.
#[derive(Debug, Default)]
pub struct LockStats {
    /// Times the lock was taken.
    pub acquisitions: AtomicU64,
    /// Times the taker had to wait for another holder.
    pub contended: AtomicU64,
    /// Nanoseconds spent waiting, summed over the contended takes.
    pub wait_ns: AtomicU64,
    /// Host calls (to a device server, a back end or the kernel) made with the state given
    /// up ([`HostCalls`]).
    pub unlocked_calls: AtomicU64,
}

impl IommuHandle {
    /// Wraps `state`.
    ///
    /// # Errors
    /// When the eventfd cannot be created.
    pub fn new(state: Viommu) -> std::io::Result<Self> {
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
            fault_evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            lock_stats: Arc::default(),
            host_order: Arc::default(),
        })
    }

    /// Locks the state (a poisoned lock is still usable: the state has no invariant a
    /// panic mid-update could break that the next request does not re-check), counting the
    /// take in [`LockStats`].
    pub fn lock(&self) -> MutexGuard<'_, Viommu> {
        let stats = &self.lock_stats;
        stats.acquisitions.fetch_add(1, Ordering::Relaxed);
        match self.state.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                stats.contended.fetch_add(1, Ordering::Relaxed);
                let since = Instant::now();
                let guard = self.state.locked();
                let waited = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
                stats.wait_ns.fetch_add(waited, Ordering::Relaxed);
                guard
            }
        }
    }

    /// Locks the state for a path that makes host calls (requests, bypass changes, resets,
    /// dirty tracking, page requests; see [`iommu::viommu::HostSide`]): the host order
    /// first, then the state, which the path gives up during each host call. The caller must
    /// not hold the state ([`IommuHandle::lock`]) already.
    pub fn lock_for_host_calls(&self) -> HostCalls<'_> {
        let order = self
            .host_order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        HostCalls {
            guard: Some(self.lock()),
            handle: self,
            _order: order,
        }
    }

    /// Tells the event loop that faults are waiting.
    pub fn notify_fault(&self) {
        let _ = self.fault_evt.write(1);
    }
}

/// The state locked by [`IommuHandle::lock_for_host_calls`]: it dereferences to the state,
/// and gives the state up while a host call waits on its peer
/// ([`iommu::viommu::Relock`]), so that translations, fault reports, IOTLB misses and the
/// API's reads go on meanwhile. The host order is kept until it is dropped.
pub struct HostCalls<'a> {
    /// The state, `None` only during a host call.
    guard: Option<MutexGuard<'a, Viommu>>,
    handle: &'a IommuHandle,
    /// Dropped after `guard` (fields drop in order).
    _order: MutexGuard<'a, ()>,
}

impl std::ops::Deref for HostCalls<'_> {
    type Target = Viommu;
    fn deref(&self) -> &Viommu {
        // `guard` is `None` only inside `unlocked`, which borrows `self` mutably.
        self.guard
            .as_deref()
            .expect("the state is held outside host calls")
    }
}

impl std::ops::DerefMut for HostCalls<'_> {
    fn deref_mut(&mut self) -> &mut Viommu {
        self.guard
            .as_deref_mut()
            .expect("the state is held outside host calls")
    }
}

impl iommu::viommu::Relock for HostCalls<'_> {
    fn unlocked<R>(&mut self, call: impl FnOnce() -> R) -> R {
        self.guard = None;
        self.handle
            .lock_stats
            .unlocked_calls
            .fetch_add(1, Ordering::Relaxed);
        let r = call();
        self.guard = Some(self.handle.lock());
        r
    }
}

/// The request queue and what serving it keeps: the device's queue 0, with its own mutex so
/// that serving it holds neither the device's mutex (which vCPU accesses take) nor the event
/// loop (see [`VirtioIommu::start_request_thread`]).
#[derive(Default)]
pub(crate) struct Requests {
    queue: Option<Queue>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    /// Chains whose memory could not be read or written (driver bugs), for the logs: shared
    /// with the device, which reads it without waiting for a batch being served.
    bad_chains: Arc<AtomicU64>,
    /// The replies of the last batch (kept: no allocation per batch).
    replies: Vec<iommu::viommu::Reply>,
}

/// The thread that serves the request queue (`viommu`): it waits on the queue's notification
/// eventfd and on its stop eventfd.
struct RequestThread {
    stop: Arc<EventFd>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// The virtio-iommu device.
pub struct VirtioIommu {
    iommu: IommuHandle,
    mem: Arc<GuestMemoryMmap>,
    acked: u64,
    requests: Arc<Mutex<Requests>>,
    /// The request queue's bad chains (`Requests::bad_chains`).
    bad_request_chains: Arc<AtomicU64>,
    /// Queue 1, the event queue (served by the event loop: [`VirtioIommu::deliver_faults`]).
    events: Option<Queue>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    /// Chains of the event queue the device could not access.
    bad_event_chains: u64,
    /// The configuration and the offered features as last read from the state: what a vCPU
    /// reads while the request thread holds the state's lock (waiting on a device server,
    /// say). Both change only when the driver writes `bypass`, which updates them.
    cached: Mutex<(iommu::protocol::Config, u64)>,
    /// Queue 0's notification eventfd (from the transport).
    kick: Option<Arc<EventFd>>,
    worker: Option<RequestThread>,
}

impl VirtioIommu {
    /// A device for `iommu`, whose queues live in `mem` (the IOMMU itself is never behind an
    /// IOMMU). Its request queue is served by whoever notifies it, until
    /// [`VirtioIommu::start_request_thread`].
    pub fn new(iommu: IommuHandle, mem: Arc<GuestMemoryMmap>) -> Self {
        let cached = {
            let s = iommu.lock();
            (s.config(), s.offered_features())
        };
        let requests = Requests::default();
        let bad_request_chains = Arc::clone(&requests.bad_chains);
        Self {
            iommu,
            mem,
            acked: 0,
            requests: Arc::new(Mutex::new(requests)),
            bad_request_chains,
            events: None,
            interrupt: None,
            bad_event_chains: 0,
            cached: Mutex::new(cached),
            kick: None,
            worker: None,
        }
    }

    /// Serves the request queue on a thread of its own (`viommu`), from the transport's
    /// notification eventfd ([`VirtioDevice::set_notifiers`] must have been called): the
    /// event loop and the device's mutex are then never held while a request waits on a
    /// device server or a back end. While `frozen` is set, notifications are left for later
    /// ([`VirtioDevice::queue_notify`] after a thaw serves what arrived meanwhile). The
    /// thread installs its own seccomp filter; call this during set-up, before any filter.
    ///
    /// # Errors
    /// When no notification eventfd was given, or the thread or its eventfd cannot be made.
    pub fn start_request_thread(&mut self, frozen: Arc<AtomicBool>) -> std::io::Result<()> {
        let kick = self.kick.clone().ok_or_else(|| {
            std::io::Error::other("the request queue has no notification eventfd")
        })?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let (requests, iommu, mem, stop2) = (
            self.requests.clone(),
            self.iommu.clone(),
            self.mem.clone(),
            stop.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("viommu".into())
            .spawn(move || {
                crate::seccomp::confine("viommu", crate::seccomp::lists::VIOMMU);
                handler::serve(&requests, &iommu, &mem, &kick, &stop2, &frozen);
            })?;
        self.worker = Some(RequestThread {
            stop,
            handle: Some(handle),
        });
        Ok(())
    }

    /// The shared state.
    pub fn handle(&self) -> &IommuHandle {
        &self.iommu
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.events.is_some()
    }

    /// Chains the device could not access.
    pub fn bad_chains(&self) -> u64 {
        self.bad_request_chains.load(Ordering::Relaxed) + self.bad_event_chains
    }

    /// Serves the request queue here (tests, and a device without a request thread).
    pub fn process_requests(&mut self) {
        handler::process(&mut self.requests.locked(), &self.iommu, &self.mem);
        // Requests may have been answered while faults were waiting for buffers.
        self.deliver_faults();
    }

    /// The configuration and offered features: read from the state when its lock is free
    /// (and kept), else the last ones read.
    fn current(&self) -> (iommu::protocol::Config, u64) {
        match self.iommu.state.try_lock() {
            Ok(s) => {
                let now = (s.config(), s.offered_features());
                *self.cached.locked() = now;
                now
            }
            Err(TryLockError::Poisoned(e)) => {
                let s = e.into_inner();
                (s.config(), s.offered_features())
            }
            Err(TryLockError::WouldBlock) => *self.cached.locked(),
        }
    }

    /// The device's counters as `name=value` pairs on one line (`--counters`): requests by
    /// type, batches, statuses other than OK that occurred, host calls, faults, IOTLB,
    /// domains, metadata bytes, dirty reads, bad chains and the vIOMMU lock's contention.
    /// Takes the vIOMMU's lock (after this device's and the request queue's, as request
    /// processing takes it after the request queue's).
    pub fn counters_line(&self) -> String {
        let s = self.iommu.lock();
        let c = s.counters();
        let req: Vec<String> = iommu::viommu::Counters::REQUEST_NAMES
            .iter()
            .zip(c.requests)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let st: Vec<String> = iommu::protocol::Status::ALL
            .iter()
            .zip(c.statuses)
            .filter(|(_, v)| *v > 0)
            .map(|(s, v)| format!("status_{}={v}", s.name()))
            .collect();
        let ls = &self.iommu.lock_stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Which endpoints are attached (`EP:DOMAIN`, hex endpoint IDs), and the pages all
        // domains map.
        let endpoints = s.endpoints();
        let attached: Vec<String> = endpoints
            .iter()
            .filter_map(|&(ep, d)| d.map(|d| format!("{ep:#x}:{d}")))
            .collect();
        let mapped_pages: u64 = s
            .domain_ids()
            .iter()
            .filter_map(|&d| s.domain_mapped_pages(d))
            .sum();
        format!(
            "{} batches={} {} host_maps={} host_unmaps={} faults={} faults_dropped={} \
             iotlb_hits={} iotlb_misses={} translated_bytes={} domains={} metadata_bytes={} \
             dirty_reads={} dirty_pages_reported={} bad_chains={} lock_takes={} \
             lock_contended={} lock_wait_us={} unlocked_host_calls={} endpoints={} \
             attached={} mapped_pages={}",
            req.join(" "),
            c.batches,
            st.join(" "),
            c.host_maps,
            c.host_unmaps,
            c.faults,
            c.faults_dropped,
            c.iotlb_hits,
            c.iotlb_misses,
            c.translated_bytes,
            s.domain_ids().len(),
            s.metadata_bytes(),
            c.dirty_reads,
            c.dirty_pages_reported,
            self.bad_chains(),
            get(&ls.acquisitions),
            get(&ls.contended),
            get(&ls.wait_ns) / 1000,
            get(&ls.unlocked_calls),
            endpoints.len(),
            if attached.is_empty() {
                "none".to_string()
            } else {
                attached.join(",")
            },
            mapped_pages,
        )
    }
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_IOMMU
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | self.current().1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.avail_features();
        self.iommu.lock().set_negotiated(self.acked);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.current().0;
        let bytes = config.as_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // 5.13.4: the driver MAY write `bypass` (with BYPASS_CONFIG negotiated) and MUST NOT
        // write any other field; other writes are ignored.
        let bypass_cfg = 1u64 << iommu::protocol::features::VIRTIO_IOMMU_F_BYPASS_CONFIG;
        if offset == CONFIG_BYPASS_OFFSET as u64 && data.len() == 1 && self.acked & bypass_cfg != 0
        {
            let mut s = self.iommu.lock_for_host_calls();
            s.set_bypass(data[0]);
            *self.cached.locked() = (s.config(), s.offered_features());
        } else {
            log::debug!("virtio-iommu: ignored config write at {offset:#x}");
        }
    }

    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        use virtio_queue::QueueT;
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        for (i, q) in queues.iter().enumerate() {
            if !q.is_valid(self.mem.as_ref()) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        // The Linux driver refuses devices without MAP_UNMAP; we only need VERSION_1.
        if self.acked & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(ActivateError::MissingFeature(VIRTIO_F_VERSION_1));
        }
        let mut queues = queues.into_iter();
        {
            let mut r = self.requests.locked();
            r.queue = queues.next();
            r.interrupt = Some(interrupt.clone());
        }
        self.events = queues.next();
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        {
            // Waits for a batch being served.
            let mut r = self.requests.locked();
            r.queue = None;
            r.interrupt = None;
        }
        self.events = None;
        self.interrupt = None;
        self.acked = 0;
        let mut s = self.iommu.lock_for_host_calls();
        s.reset();
        *self.cached.locked() = (s.config(), s.offered_features());
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        use virtio_queue::QueueT;
        let r = self.requests.locked();
        r.queue
            .iter()
            .chain(&self.events)
            .map(|q| (q.next_avail(), q.next_used()))
            .collect()
    }

    fn queue_notify(&mut self, queue: usize) {
        match queue {
            0 if self.worker.is_some() => {
                if let Some(k) = &self.kick {
                    let _ = k.write(1);
                }
            }
            0 => self.process_requests(),
            1 => self.deliver_faults(),
            _ => {}
        }
    }

    fn set_notifiers(&mut self, evts: &[Arc<EventFd>]) {
        self.kick = evts.first().cloned();
    }

    fn notified_outside(&self, queue: usize) -> bool {
        queue == 0 && self.worker.is_some()
    }
}

impl Drop for VirtioIommu {
    fn drop(&mut self) {
        if let Some(mut w) = self.worker.take() {
            let _ = w.stop.write(1);
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod regressions;
#[cfg(test)]
mod tests;
