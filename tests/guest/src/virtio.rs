//! A polling virtio-pci (modern) driver core: capabilities, feature negotiation, split
//! virtqueues.

use crate::io::{rd16, rd32, rd8, wr16, wr32, wr64, wr8};
use crate::mem::alloc_pages;
use crate::pci::Func;

const COMMON: u8 = 1;
const NOTIFY: u8 = 2;
const DEVICE: u8 = 4;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
const QUEUE_SIZE: u16 = 32;

/// One split virtqueue, polled.
pub struct Queue {
    index: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl Queue {
    /// Makes a chain of `(gpa, len, device-writable)` available and notifies.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) {
        let n = bufs.len() as u16;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QUEUE_SIZE;
            let d = self.desc + 16 * u64::from(idx);
            wr64(d, addr);
            wr32(d + 8, len);
            let mut flags = if write { 2 } else { 0 };
            if (i as u16) + 1 < n {
                flags |= 1;
            }
            wr16(d + 12, flags);
            wr16(d + 14, (idx + 1) % QUEUE_SIZE);
        }
        let head = self.next_desc;
        self.next_desc = (self.next_desc + n) % QUEUE_SIZE;
        wr16(
            self.avail + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE),
            head,
        );
        self.avail_idx = self.avail_idx.wrapping_add(1);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        wr16(self.avail + 2, self.avail_idx);
    }

    /// The buffer address of descriptor `id`.
    pub fn desc_addr(&self, id: u32) -> u64 {
        crate::io::rd64(self.desc + 16 * u64::from(id % u32::from(QUEUE_SIZE)))
    }

    /// Tells the device to look at the queue.
    pub fn kick(&self) {
        wr16(self.notify, self.index);
    }

    /// The next used entry `(id, len)`, if any.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        if rd16(self.used + 2) == self.last_used {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.last_used % QUEUE_SIZE);
        self.last_used = self.last_used.wrapping_add(1);
        Some((rd32(e), rd32(e + 4)))
    }

    /// Waits for `n` used entries (polling, at most a minute); false when they did not come.
    pub fn wait(&mut self, n: usize, out: &mut [u32]) -> bool {
        let mut got = 0;
        let deadline = crate::io::Deadline::in_ms(60_000);
        while got < n {
            match self.pop_used() {
                Some((_, len)) => {
                    if let Some(o) = out.get_mut(got) {
                        *o = len;
                    }
                    got += 1;
                }
                None => {
                    if deadline.passed() {
                        return false;
                    }
                    core::hint::spin_loop();
                }
            }
        }
        true
    }
}

/// A virtio-pci device.
pub struct VirtioPci {
    common: u64,
    notify_base: u64,
    notify_mult: u32,
    /// Device-specific configuration.
    pub device_cfg: u64,
}

impl VirtioPci {
    /// Finds the capabilities of `f` and resets the device.
    pub fn new(f: &Func) -> Option<VirtioPci> {
        f.enable();
        let mut common = 0;
        let mut notify = (0, 0);
        let mut device = 0;
        for off in f.caps(0x09) {
            if off == 0 {
                break;
            }
            let ty = (f.read32(off) >> 24) as u8;
            let bar = (f.read32(off + 4) & 0xff) as u64;
            let addr = f.bar(bar) + u64::from(f.read32(off + 8));
            match ty {
                COMMON => common = addr,
                NOTIFY => notify = (addr, f.read32(off + 16)),
                DEVICE => device = addr,
                _ => {}
            }
        }
        if common == 0 || notify.0 == 0 {
            return None;
        }
        let v = VirtioPci {
            common,
            notify_base: notify.0,
            notify_mult: notify.1,
            device_cfg: device,
        };
        v.set_status(0);
        Some(v)
    }

    fn set_status(&self, s: u8) {
        wr8(self.common + 0x14, s);
    }

    /// Status byte.
    pub fn status(&self) -> u8 {
        rd8(self.common + 0x14)
    }

    /// Negotiates `wanted` (intersected with what the device offers); returns the result, or
    /// `None` if FEATURES_OK did not stick.
    pub fn negotiate(&self, wanted: u64) -> Option<u64> {
        self.set_status(1 | 2);
        wr32(self.common, 0);
        let lo = u64::from(rd32(self.common + 4));
        wr32(self.common, 1);
        let hi = u64::from(rd32(self.common + 4));
        let f = wanted & (lo | (hi << 32));
        wr32(self.common + 8, 0);
        wr32(self.common + 0xc, f as u32);
        wr32(self.common + 8, 1);
        wr32(self.common + 0xc, (f >> 32) as u32);
        self.set_status(1 | 2 | 8);
        (self.status() & 8 != 0).then_some(f)
    }

    /// Sets up queue `index` (no interrupt vector: polled).
    pub fn queue(&self, index: u16) -> Queue {
        self.queue_at(index, 0)
    }

    /// Sets up queue `index`, telling the device its rings are at GPA + `offset` (an IOVA
    /// the caller maps, for a device behind the vIOMMU).
    pub fn queue_at(&self, index: u16, offset: u64) -> Queue {
        wr16(self.common + 0x16, index);
        wr16(self.common + 0x18, QUEUE_SIZE);
        wr16(self.common + 0x1a, 0xffff);
        let mem = alloc_pages(2);
        let (desc, avail, used) = (mem, mem + 16 * u64::from(QUEUE_SIZE), mem + 4096);
        wr64(self.common + 0x20, desc + offset);
        wr64(self.common + 0x28, avail + offset);
        wr64(self.common + 0x30, used + offset);
        let off = u64::from(rd16(self.common + 0x1e));
        wr16(self.common + 0x1c, 1);
        Queue {
            index,
            desc,
            avail,
            used,
            notify: self.notify_base + off * u64::from(self.notify_mult),
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Sets DRIVER_OK; false when the device asks for a reset.
    pub fn driver_ok(&self) -> bool {
        self.set_status(1 | 2 | 8 | 4);
        self.status() & 0x40 == 0
    }
}
