//! The virtio-iommu driven through its virtqueues in-process, the way a guest driver would:
//! every request type, the error paths, hostile buffers, fault events, reset.

use std::sync::Arc;

use iommu::protocol::*;
use iommu::testing::{attach, detach, map, probe, unmap};
use iommu::{Access, Viommu, ViommuConfig};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::FromBytes;

use super::*;
use crate::virtio::testing::{test_memory, CountingInterrupt, TestQueue};

pub(super) const MEM: usize = 16 << 20;
/// Where request buffers go.
const BUFS: u64 = 0x10_0000;

/// A guest driver of the device: its memory, both queues and the interrupts it received.
pub(super) struct Driver {
    pub(super) mem: Arc<GuestMemoryMmap>,
    pub(super) dev: VirtioIommu,
    pub(super) req: TestQueue,
    pub(super) evt: TestQueue,
    pub(super) irq: Arc<CountingInterrupt>,
    next_buf: u64,
}

impl Driver {
    /// Endpoints 8 and 9 (emulated), every offered feature accepted.
    pub(super) fn new() -> Self {
        let mut state = Viommu::new(Self::config());
        state.add_endpoint(8, None, &[]).unwrap();
        state.add_endpoint(9, None, &[]).unwrap();
        Self::with(state, None)
    }

    /// The configuration [`Driver::new`] uses: guest RAM is the test memory.
    pub(super) fn config() -> ViommuConfig {
        ViommuConfig {
            guest_ram: vec![(0, MEM as u64)],
            ..Default::default()
        }
    }

    /// A driver of a device around `state` that accepts `features` (`None`: all offered).
    pub(super) fn with(state: Viommu, features: Option<u64>) -> Self {
        let mem = test_memory(MEM);
        let mut dev = VirtioIommu::new(IommuHandle::new(state).unwrap(), mem.clone());
        let req = TestQueue::new(&mem, 0x1000, 64);
        let evt = TestQueue::new(&mem, 0x4000, 64);
        dev.set_acked_features(features.unwrap_or(dev.avail_features()));
        let irq = CountingInterrupt::new();
        dev.activate(vec![req.queue(), evt.queue()], irq.clone())
            .unwrap();
        Self {
            mem,
            dev,
            req,
            evt,
            irq,
            next_buf: BUFS,
        }
    }

    pub(super) fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += len.next_multiple_of(64);
        a
    }

    /// Queues `req` with a `writable`-byte writable part; returns (head, writable GPA).
    pub(super) fn queue(&mut self, req: &[u8], writable: u32) -> (u16, u64) {
        self.queue_poisoned(req, writable, 0xee)
    }

    /// As [`Driver::queue`], with the writable part filled with `poison` first.
    pub(super) fn queue_poisoned(&mut self, req: &[u8], writable: u32, poison: u8) -> (u16, u64) {
        let r = self.alloc(req.len() as u64);
        self.mem.write_slice(req, GuestAddress(r)).unwrap();
        let w = self.alloc(u64::from(writable));
        self.mem
            .write_slice(&vec![poison; writable as usize], GuestAddress(w))
            .unwrap();
        let head = self.req.add(
            &self.mem,
            &[(r, req.len() as u32, false), (w, writable, true)],
        );
        (head, w)
    }

    /// Sends requests as one notification; returns (status byte, used length) of each.
    pub(super) fn send(&mut self, reqs: &[Vec<u8>]) -> Vec<(Option<u8>, u32)> {
        let queued: Vec<(u16, u64)> = reqs.iter().map(|r| self.queue(r, 4)).collect();
        self.dev.queue_notify(0);
        let used = self.req.used(&self.mem);
        assert_eq!(used.len(), reqs.len());
        queued
            .iter()
            .zip(used)
            .map(|(&(head, w), (id, len))| {
                assert_eq!(id, u32::from(head));
                let status: u8 = self.mem.read_obj(GuestAddress(w)).unwrap();
                ((len > 0).then_some(status), len)
            })
            .collect()
    }

    pub(super) fn status(&mut self, req: Vec<u8>) -> Option<u8> {
        self.send(&[req])[0].0
    }
}

pub(super) const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
pub(super) const OK: Option<u8> = Some(Status::Ok as u8);

#[test]
fn a_batch_is_answered_with_one_interrupt() {
    let mut d = Driver::new();
    let st = d.send(&[
        attach(1, 8, 0),
        map(1, 0x1000, 0x1fff, 0x8000, RW),
        map(1, 0x2000, 0x3fff, 0x9000, VIRTIO_IOMMU_MAP_F_READ),
        unmap(1, 0x1000, 0x1fff),
        detach(1, 9),
    ]);
    let codes: Vec<Option<u8>> = st.iter().map(|s| s.0).collect();
    assert_eq!(codes, vec![OK, OK, OK, OK, Some(Status::Inval as u8)]);
    assert!(st.iter().all(|s| s.1 == 4), "used length covers the tail");
    assert_eq!(d.irq.count(0), 1);
    let s = d.dev.handle().lock();
    assert_eq!(
        s.domain_mappings(1),
        vec![(0x2000, 0x9000, 0x2000, iommu::Perm::READ)]
    );
    assert_eq!(s.counters().requests, [1, 1, 2, 1, 0, 0]);
    assert_eq!(s.counters().batches, 1);
}

#[test]
fn probe_through_the_queue() {
    let mut d = Driver::new();
    let mut cfg = [0u8; 40];
    d.dev.read_config(0, &mut cfg);
    let cfg = Config::read_from_bytes(&cfg).unwrap();
    let probe_size = cfg.probe_size.get();
    assert_eq!(cfg.page_size_mask.get() & 0xfff, 0);
    assert_eq!(cfg.page_size_mask.get().trailing_zeros(), 12);
    let (_, w) = d.queue(&probe(8), probe_size + 4);
    d.dev.queue_notify(0);
    let used = d.req.used(&d.mem);
    assert_eq!(used[0].1, probe_size + 4);
    let mut out = vec![0u8; probe_size as usize + 4];
    d.mem.read_slice(&mut out, GuestAddress(w)).unwrap();
    assert_eq!(out[probe_size as usize], Status::Ok as u8);
    let (p, _) = ProbeResvMem::read_from_prefix(&out).unwrap();
    assert_eq!(p.subtype, VIRTIO_IOMMU_RESV_MEM_T_MSI);
    assert_eq!(p.start.get(), 0xfee0_0000);
    assert!(
        out[24..probe_size as usize].iter().all(|&b| b == 0),
        "zero padded"
    );
}

#[test]
fn every_error_status_reaches_the_guest() {
    let mut d = Driver::new();
    assert_eq!(d.status(attach(1, 77, 0)), Some(Status::NoEnt as u8));
    assert_eq!(
        d.status(attach(0x1_0000, 8, 0)),
        Some(Status::Range as u8),
        "domain out of range"
    );
    assert_eq!(d.status(attach(1, 8, 4)), Some(Status::Inval as u8));
    assert_eq!(d.status(map(5, 0, 0xfff, 0, RW)), Some(Status::NoEnt as u8));
    assert_eq!(d.status(attach(1, 8, 0)), OK);
    assert_eq!(
        d.status(map(1, 0x1000, 0x1800, 0, RW)),
        Some(Status::Range as u8)
    );
    assert_eq!(d.status(map(1, 0x1000, 0x1fff, 0, RW)), OK);
    assert_eq!(
        d.status(map(1, 0x1000, 0x1fff, 0, RW)),
        Some(Status::Inval as u8)
    );
    assert_eq!(
        d.status(map(1, u64::MAX - 0xfff, u64::MAX, 0, RW)),
        Some(Status::Range as u8)
    );
    assert_eq!(d.status(unmap(1, 0, u64::MAX)), OK);
    assert_eq!(d.status(probe(0xffff_ffff)), Some(Status::NoEnt as u8));
}

#[test]
fn hostile_buffers_never_panic() {
    let mut d = Driver::new();
    // Unknown type: untouched buffer, used length 0.
    let (_, w) = d.queue(&[0x42, 0, 0, 0, 1, 2, 3, 4], 4);
    // Truncated request: INVAL.
    let truncated = attach(1, 8, 0)[..9].to_vec();
    let (_, w2) = d.queue(&truncated, 4);
    // No writable part at all.
    let r = d.alloc(64);
    d.mem
        .write_slice(&attach(1, 8, 0), GuestAddress(r))
        .unwrap();
    d.req.add(&d.mem, &[(r, 20, false)]);
    // Buffers outside guest memory.
    d.req
        .add(&d.mem, &[(u64::MAX - 10, 20, false), (0x1000, 4, true)]);
    d.req
        .add(&d.mem, &[(r, 20, false), (MEM as u64 + 0x1000, 4, true)]);
    // Zero-length buffers and a huge length.
    d.req.add(&d.mem, &[(r, 0, false), (r, 0, true)]);
    d.req
        .add(&d.mem, &[(r, u32::MAX, false), (BUFS, u32::MAX, true)]);
    // Writable before readable: the readable part is ignored.
    d.req
        .add(&d.mem, &[(BUFS + 0x100, 4, true), (r, 20, false)]);
    d.dev.queue_notify(0);
    let used = d.req.used(&d.mem);
    assert_eq!(used.len(), 8);
    assert_eq!(used[0].1, 0);
    let untouched: [u8; 4] = d.mem.read_obj(GuestAddress(w)).unwrap();
    assert_eq!(untouched, [0xee; 4]);
    let st: u8 = d.mem.read_obj(GuestAddress(w2)).unwrap();
    assert_eq!(st, Status::Inval as u8);
    assert_eq!(used[2].1, 0, "no tail, no write");
    assert_eq!(used[3].1, 0, "unreadable request");
    assert_eq!(used[4].1, 0, "unwritable tail");
    assert_eq!(used[5].1, 0);
    // The chain whose writable part the device cannot reach is counted for the logs.
    assert_eq!(d.dev.bad_chains(), 1);
    // The device still works afterwards.
    assert_eq!(d.status(attach(1, 8, 0)), OK);
}

#[test]
fn faults_go_to_the_event_queue() {
    let mut d = Driver::new();
    assert_eq!(d.status(attach(1, 8, 0)), OK);
    assert_eq!(
        d.status(map(1, 0x4000, 0x4fff, 0x4000, VIRTIO_IOMMU_MAP_F_READ)),
        OK
    );
    // An emulated device behind endpoint 8 writes through a read-only mapping.
    let mut out = Vec::new();
    let err = d
        .dev
        .handle()
        .lock()
        .translate(8, 0x4010, 8, Access::Write, &mut out);
    assert!(err.is_err());
    // No event buffer yet: the fault waits.
    d.dev.queue_notify(1);
    assert_eq!(d.irq.count(1), 0);
    let buf = d.alloc(64);
    d.evt.add(&d.mem, &[(buf, 64, true)]);
    d.dev.queue_notify(1);
    assert_eq!(d.irq.count(1), 1);
    let used = d.evt.used(&d.mem);
    assert_eq!(used, vec![(0, 24)]);
    let mut raw = [0u8; 24];
    d.mem.read_slice(&mut raw, GuestAddress(buf)).unwrap();
    let f = Fault::read_from_bytes(&raw).unwrap();
    assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(f.endpoint.get(), 8);
    assert_eq!(f.address.get(), 0x4010);
    assert_eq!(
        f.flags.get(),
        VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
    // A buffer too small for a report is returned unused.
    let _ = d
        .dev
        .handle()
        .lock()
        .translate(9, 0, 1, Access::Read, &mut out);
    let small = d.alloc(64);
    d.evt.add(&d.mem, &[(small, 8, true)]);
    d.dev.queue_notify(1);
    assert_eq!(d.evt.used(&d.mem), vec![(1, 0)]);
    // So is the event buffer too small for a report.
    assert_eq!(d.dev.bad_chains(), 1);
}

#[test]
fn config_writes_only_reach_bypass() {
    let mut d = Driver::new();
    d.dev.write_config(0, &[0xff; 8]);
    let mut c = [0u8; 40];
    d.dev.read_config(0, &mut c);
    assert_ne!(c[..8], [0xff; 8]);
    d.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    let mut b = [0u8; 1];
    d.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut b);
    assert_eq!(b, [1]);
    // Reads past the end are zero, and never panic.
    let mut past = [0xaau8; 8];
    d.dev.read_config(u64::MAX - 2, &mut past);
    assert_eq!(past, [0; 8]);
}

#[test]
fn requests_after_reset_are_ignored_until_reactivated() {
    let mut d = Driver::new();
    assert_eq!(d.status(attach(1, 8, 0)), OK);
    d.dev.reset();
    assert!(!d.dev.is_active());
    assert_eq!(d.dev.handle().lock().endpoint_domain(8), None);
    d.queue(&attach(1, 8, 0), 4);
    d.dev.queue_notify(0);
    assert!(d.req.used(&d.mem).is_empty(), "no queue after reset");
    // The driver sets the device up again.
    let mem = d.mem.clone();
    d.req = TestQueue::new(&mem, 0x1000, 64);
    d.evt = TestQueue::new(&mem, 0x4000, 64);
    d.dev.set_acked_features(d.dev.avail_features());
    d.dev
        .activate(vec![d.req.queue(), d.evt.queue()], d.irq.clone())
        .unwrap();
    assert_eq!(d.status(attach(1, 8, 0)), OK);
}

#[test]
fn activation_is_checked() {
    let mem = test_memory(MEM);
    let mut dev = VirtioIommu::new(
        IommuHandle::new(Viommu::new(ViommuConfig::default())).unwrap(),
        mem.clone(),
    );
    let q = TestQueue::new(&mem, 0x1000, 16);
    dev.set_acked_features(dev.avail_features());
    let irq = CountingInterrupt::new();
    assert_eq!(
        dev.activate(vec![q.queue()], irq.clone()),
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 1
        })
    );
    let mut bad = q.queue();
    use virtio_queue::QueueT;
    bad.set_desc_table_address(Some(0), Some(0x10));
    assert_eq!(
        dev.activate(vec![q.queue(), bad], irq.clone()),
        Err(ActivateError::InvalidQueue(1))
    );
    dev.set_acked_features(0);
    assert_eq!(
        dev.activate(vec![q.queue(), q.queue()], irq),
        Err(ActivateError::MissingFeature(
            crate::virtio::VIRTIO_F_VERSION_1
        ))
    );
}

#[test]
fn identity_features_positions_and_counters() {
    let mem = test_memory(MEM);
    let dev = VirtioIommu::new(
        IommuHandle::new(Viommu::new(ViommuConfig::default())).unwrap(),
        mem,
    );
    assert_eq!(dev.device_type(), 23, "virtio 1.3 5.13.1");
    assert_eq!(dev.queue_max_sizes(), vec![QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(
        dev.avail_features(),
        (1 << crate::virtio::VIRTIO_F_VERSION_1) | ViommuConfig::default().features
    );
    assert!(!dev.is_active());
    assert!(dev.queue_positions().is_empty());

    let mut d = Driver::new();
    assert!(d.dev.is_active());
    assert_eq!(d.status(attach(1, 8, 0)), OK);
    assert_eq!(d.status(map(1, 0, 0xfff, 0, RW)), OK);
    assert_eq!(d.dev.queue_positions(), vec![(2, 2), (0, 0)]);
    assert_eq!(d.dev.bad_chains(), 0);
    // A chain whose writable part is outside memory, and a fault report's buffer that is
    // too small, are counted. (A descriptor running past the end of memory ends the chain
    // in virtio-queue: that request has no writable part and is only left unanswered.)
    d.req
        .add(&d.mem, &[(BUFS, 20, false), (MEM as u64 + 0x1000, 4, true)]);
    d.req
        .add(&d.mem, &[(BUFS, 20, false), (BUFS, u32::MAX, true)]);
    d.dev.queue_notify(0);
    assert_eq!(
        d.req.used(&d.mem).iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![0, 0]
    );
    assert_eq!(d.dev.bad_chains(), 1);
    let mut out = Vec::new();
    assert!(d
        .dev
        .handle()
        .lock()
        .translate(9, 0, 1, Access::Read, &mut out)
        .is_err());
    let small = d.alloc(64);
    d.evt.add(&d.mem, &[(small, 8, true)]);
    d.dev.queue_notify(1);
    assert_eq!(d.dev.bad_chains(), 2);
    // Device faults wake the event loop through the handle's eventfd.
    let h = d.dev.handle().clone();
    h.notify_fault();
    assert_eq!(h.fault_evt.read().unwrap(), 1);
}

#[test]
fn bypass_is_written_only_where_and_when_allowed() {
    let read_bypass = |d: &Driver| {
        let mut b = [0u8; 1];
        d.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut b);
        b[0]
    };
    // Not at another offset, not two bytes at once.
    let mut d = Driver::new();
    d.dev.write_config(0, &[1]);
    d.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1, 1]);
    assert_eq!(read_bypass(&d), 0);
    // Not without BYPASS_CONFIG negotiated.
    let mut state = Viommu::new(Driver::config());
    state.add_endpoint(8, None, &[]).unwrap();
    let offered = (1 << crate::virtio::VIRTIO_F_VERSION_1) | state.offered_features();
    let mut d = Driver::with(
        state,
        Some(offered & !(1 << features::VIRTIO_IOMMU_F_BYPASS_CONFIG)),
    );
    d.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    assert_eq!(read_bypass(&d), 0);
    // With it: written.
    let mut d = Driver::new();
    d.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    assert_eq!(read_bypass(&d), 1);
}

#[test]
fn lock_stats_count_takes_and_contended_waits() {
    use std::sync::atomic::Ordering::Relaxed;

    let handle = IommuHandle::new(Viommu::new(ViommuConfig::default())).unwrap();
    drop(handle.lock());
    drop(handle.lock());
    let stats = handle.lock_stats.clone();
    assert_eq!(stats.acquisitions.load(Relaxed), 2);
    assert_eq!(stats.contended.load(Relaxed), 0);
    assert_eq!(stats.wait_ns.load(Relaxed), 0);

    // A second thread takes the lock while this one holds it: it must wait, and says so
    // before it waits; the holder lets go only then.
    let held = handle.lock();
    let other = handle.clone();
    let waiter = std::thread::spawn(move || drop(other.lock()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stats.contended.load(Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiting take was not counted as contended"
        );
        std::thread::yield_now();
    }
    drop(held);
    waiter.join().unwrap();
    assert_eq!(stats.acquisitions.load(Relaxed), 4);
    assert_eq!(stats.contended.load(Relaxed), 1);
    assert!(stats.wait_ns.load(Relaxed) > 0);
}
