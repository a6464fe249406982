//! A polling virtio-iommu driver: requests as the Linux driver lays them out (head and body
//! device-readable, the tail device-writable), batches of up to 8 per notification, and the
//! event queue for fault reports.

use crate::io::{rd32, rd64, rd8, wr32, wr64, wr8};
use crate::mem::{alloc_pages, fill};
use crate::pci::Func;
use crate::virtio::{Queue, VirtioPci, F_VERSION_1};

/// `VIRTIO_IOMMU_T_*`.
pub const T_ATTACH: u8 = 1;
const T_DETACH: u8 = 2;
const T_MAP: u8 = 3;
const T_UNMAP: u8 = 4;
const T_PROBE: u8 = 5;
/// MAP flags.
pub const MAP_R: u32 = 1;
/// MAP flags.
pub const MAP_W: u32 = 2;
/// `ATTACH_F_BYPASS`.
pub const ATTACH_BYPASS: u32 = 1;
/// Most requests per notification (two descriptors each, 16-entry queue).
pub const MAX_BATCH: usize = 16;

const FEATURES: u64 = F_VERSION_1 | (1 << 0) | (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 6);
const EVENT_BUFS: u64 = 8;

/// A request, built in place.
#[derive(Clone, Copy)]
pub enum Req {
    /// ATTACH(domain, endpoint, flags).
    Attach(u32, u32, u32),
    /// DETACH(domain, endpoint).
    Detach(u32, u32),
    /// MAP(domain, virt_start, virt_end, phys, flags).
    Map(u32, u64, u64, u64, u32),
    /// UNMAP(domain, virt_start, virt_end).
    Unmap(u32, u64, u64),
    /// A request of a type the device does not know: answered with used length 0 and no
    /// work (the transport's own cost, for timing).
    Noop,
}

/// A fault report from the event queue.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    /// `FAULT_R_*`.
    pub reason: u8,
    /// `FAULT_F_*`.
    pub flags: u32,
    /// Endpoint.
    pub endpoint: u32,
    /// Address.
    pub address: u64,
}

/// The driver.
pub struct Viommu {
    _pci: VirtioPci,
    req: Queue,
    evt: Queue,
    buf: u64,
    /// `page_size_mask`.
    pub page_size_mask: u64,
    /// `probe_size`.
    pub probe_size: u32,
    /// Requests sent.
    pub sent: u64,
}

impl Viommu {
    /// Initialises the device at `f`.
    pub fn new(f: &Func) -> Option<Viommu> {
        let pci = VirtioPci::new(f)?;
        pci.negotiate(FEATURES)?;
        let req = pci.queue(0);
        let mut evt = pci.queue(1);
        let page_size_mask = rd64(pci.device_cfg);
        let probe_size = rd32(pci.device_cfg + 32);
        if !pci.driver_ok() {
            return None;
        }
        let events = alloc_pages(1);
        for i in 0..EVENT_BUFS {
            evt.add(&[(events + 64 * i, 64, true)]);
        }
        evt.kick();
        Some(Viommu {
            _pci: pci,
            req,
            evt,
            buf: alloc_pages(2),
            page_size_mask,
            probe_size,
            sent: 0,
        })
    }

    fn encode(at: u64, r: &Req) -> u32 {
        fill(at, 128, 0);
        match *r {
            Req::Attach(d, e, flags) => {
                wr8(at, T_ATTACH);
                wr32(at + 4, d);
                wr32(at + 8, e);
                wr32(at + 12, flags);
                20
            }
            Req::Detach(d, e) => {
                wr8(at, T_DETACH);
                wr32(at + 4, d);
                wr32(at + 8, e);
                20
            }
            Req::Map(d, s, e, p, flags) => {
                wr8(at, T_MAP);
                wr32(at + 4, d);
                wr64(at + 8, s);
                wr64(at + 16, e);
                wr64(at + 24, p);
                wr32(at + 32, flags);
                36
            }
            Req::Unmap(d, s, e) => {
                wr8(at, T_UNMAP);
                wr32(at + 4, d);
                wr64(at + 8, s);
                wr64(at + 16, e);
                28
            }
            Req::Noop => {
                wr8(at, 0x7f);
                4
            }
        }
    }

    /// Sends `reqs` as one batch and returns the TSC cycles from the notification to the
    /// last used-ring entry (the VMM's handling plus the exits around it).
    pub fn timed_batch(&mut self, reqs: &[Req]) -> u64 {
        let n = reqs.len().min(MAX_BATCH);
        for (i, r) in reqs[..n].iter().enumerate() {
            let at = self.buf + 256 * i as u64;
            let len = Self::encode(at, r);
            self.req.add(&[(at, len, false), (at + 128, 4, true)]);
        }
        let t0 = crate::io::rdtsc();
        self.req.kick();
        let mut lens = [0u32; MAX_BATCH];
        let ok = self.req.wait(n, &mut lens);
        let t = crate::io::rdtsc() - t0;
        self.sent += n as u64;
        if ok {
            t
        } else {
            u64::MAX
        }
    }

    /// Sends up to [`MAX_BATCH`] requests with one notification; returns their statuses
    /// (0xff when the device wrote nothing).
    pub fn batch(&mut self, reqs: &[Req]) -> [u8; MAX_BATCH] {
        // Zeroed, then set one by one: LLVM turns a 16-byte 0xff fill into `pcmpeqd`,
        // which KVM's emulator refuses.
        let mut st = [0u8; MAX_BATCH];
        let n = reqs.len().min(MAX_BATCH);
        for (i, r) in reqs[..n].iter().enumerate() {
            let at = self.buf + 256 * i as u64;
            let len = Self::encode(at, r);
            wr32(at + 128, 0xff);
            self.req.add(&[(at, len, false), (at + 128, 4, true)]);
        }
        self.req.kick();
        self.sent += n as u64;
        let mut lens = [0u32; MAX_BATCH];
        if !self.req.wait(n, &mut lens) {
            crate::say!("# virtio-iommu: no answer");
            for s in st[..n].iter_mut() {
                *s = core::hint::black_box(0xff);
            }
            return st;
        }
        for (i, s) in st[..n].iter_mut().enumerate() {
            *s = rd8(self.buf + 256 * i as u64 + 128);
        }
        st
    }

    /// Queues `r` and notifies, without waiting for the answer ([`Viommu::answered`]).
    pub fn submit(&mut self, r: Req) {
        let len = Self::encode(self.buf, &r);
        wr32(self.buf + 128, 0xff);
        self.req
            .add(&[(self.buf, len, false), (self.buf + 128, 4, true)]);
        self.req.kick();
        self.sent += 1;
    }

    /// The status of the request [`Viommu::submit`] queued, once the device answered it.
    pub fn answered(&mut self) -> Option<u8> {
        self.req.pop_used().map(|_| rd8(self.buf + 128))
    }

    /// `page_size_mask`, read from the device's configuration again.
    pub fn read_page_size_mask(&self) -> u64 {
        rd64(self._pci.device_cfg)
    }

    /// One request; its status.
    pub fn one(&mut self, r: Req) -> u8 {
        self.batch(&[r])[0]
    }

    /// PROBE `ep`: status and the first property `(type, subtype, start, end)`.
    pub fn probe(&mut self, ep: u32) -> (u8, (u16, u8, u64, u64)) {
        let at = self.buf;
        fill(at, 8192, 0);
        wr8(at, T_PROBE);
        wr32(at + 4, ep);
        let props = at + 128;
        let size = u64::from(self.probe_size);
        self.req
            .add(&[(at, 72, false), (props, (size + 4) as u32, true)]);
        self.req.kick();
        self.sent += 1;
        let mut lens = [0u32; 1];
        self.req.wait(1, &mut lens);
        let status = rd8(props + size);
        let ty = (rd32(props) & 0xfff) as u16;
        (
            status,
            (ty, rd8(props + 4), rd64(props + 8), rd64(props + 16)),
        )
    }

    /// The next fault report, if one arrived (its buffer is given back).
    pub fn next_fault(&mut self) -> Option<Fault> {
        let (id, _len) = self.evt.pop_used()?;
        let b = self.evt.desc_addr(id);
        let f = Fault {
            reason: rd8(b),
            flags: rd32(b + 4),
            endpoint: rd32(b + 8),
            address: rd64(b + 16),
        };
        self.evt.add(&[(b, 64, true)]);
        self.evt.kick();
        Some(f)
    }

    /// Waits (polling) for a fault report, up to `ms` milliseconds.
    pub fn wait_fault(&mut self, ms: u64) -> Option<Fault> {
        let deadline = crate::io::Deadline::in_ms(ms);
        loop {
            if let Some(f) = self.next_fault() {
                return Some(f);
            }
            if deadline.passed() {
                return None;
            }
            core::hint::spin_loop();
        }
    }
}
