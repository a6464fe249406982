//! `dma=messages`: a vfio-user device that gets no guest-RAM file descriptor and reaches guest
//! memory only through `VFIO_USER_DMA_READ` and `VFIO_USER_DMA_WRITE` messages
//! (vfio-user.rst, "VFIO_USER_DMA_MAP": a region sent without a descriptor "can be accessed by
//! the server using VFIO_USER_DMA_READ and VFIO_USER_DMA_WRITE").
//!
//! The VMM answers each message through a table of the endpoint's host mappings: exactly what
//! the vIOMMU mapped for the device (or all RAM at IOVA = GPA outside it), with the mapping's
//! permissions, kept in step by the device's DMA backend as the guest maps and unmaps. An
//! access the table does not allow is refused (`EFAULT` unmapped, `EPERM` forbidden), guest
//! memory is not touched, and the access is queued as a fault for the event loop to turn into
//! a virtio-iommu fault event. A device server that ignores its mappings therefore reaches
//! nothing the guest did not map for it.
//!
//! The table is a leaf lock: it is taken on whichever thread reads the server's message (a
//! vCPU waiting for a BAR reply, the event loop), possibly while the vIOMMU's lock is held,
//! and takes no other lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use iommu::pagetable::IoPageTable;
use iommu::Perm;
use sync::MutexExt;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::vfio_user::DmaAccess;
use crate::GuestMemoryMmap;

const PAGE_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PAGE_SHIFT;
/// Metadata the table may allocate: the page table's 4.8 bytes a page covers 200 GiB.
const TABLE_BUDGET: u64 = 1 << 30;

/// Counters of the messages served.
#[derive(Debug, Default)]
pub struct MessageCounters {
    /// DMA_READ messages answered with data.
    pub reads: AtomicU64,
    /// DMA_WRITE messages carried out.
    pub writes: AtomicU64,
    /// Bytes read and written.
    pub bytes: AtomicU64,
    /// Messages refused (unmapped, forbidden, beyond RAM).
    pub refused: AtomicU64,
}

/// The endpoint's host mappings as the device's messages see them.
pub struct MessageDma {
    table: Mutex<IoPageTable>,
    mem: Arc<GuestMemoryMmap>,
    faults: Mutex<Vec<(u64, bool)>>,
    notify: Option<EventFd>,
    /// What was served.
    pub counters: MessageCounters,
}

impl MessageDma {
    /// An empty table over guest memory `mem`. A refused access is queued (see
    /// [`MessageDma::take_faults`]) and signals `notify`.
    pub fn new(mem: Arc<GuestMemoryMmap>, notify: Option<EventFd>) -> Self {
        Self {
            table: Mutex::new(IoPageTable::new(TABLE_BUDGET)),
            mem,
            faults: Mutex::new(Vec::new()),
            notify,
            counters: MessageCounters::default(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, IoPageTable> {
        self.table.locked()
    }

    /// Records a host mapping `[iova, iova + len)` -> `gpa` with `perm` (page-aligned).
    ///
    /// # Errors
    /// Unaligned or overlapping ranges, as the page table says.
    pub fn map(&self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), String> {
        if !(iova | gpa | len).is_multiple_of(PAGE) || len == 0 {
            return Err(format!("unaligned mapping {iova:#x}+{len:#x} -> {gpa:#x}"));
        }
        let first = iova >> PAGE_SHIFT;
        self.table()
            .map(
                first,
                first + (len >> PAGE_SHIFT) - 1,
                gpa >> PAGE_SHIFT,
                perm,
            )
            .map_err(|e| format!("mapping {iova:#x}+{len:#x}: {e:?}"))
    }

    /// Forgets every host mapping inside `[iova, iova + len)`.
    pub fn unmap(&self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = iova >> PAGE_SHIFT;
        let last = (iova + len - 1) >> PAGE_SHIFT;
        self.table().remove(first, last, |_| {});
    }

    /// The accesses refused since the last call: `(iova, write)`.
    pub fn take_faults(&self) -> Vec<(u64, bool)> {
        std::mem::take(&mut *self.faults.locked())
    }

    fn refuse(&self, iova: u64, write: bool, errno: i32) -> i32 {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        let mut f = self.faults.locked();
        // Bounded: a device that keeps faulting cannot grow the queue without end.
        if f.len() < 1024 {
            f.push((iova, write));
        }
        drop(f);
        if let Some(e) = &self.notify {
            let _ = e.write(1);
        }
        errno
    }

    /// The GPA runs of `[iova, iova + len)` if every page is mapped with `need`.
    fn translate(&self, iova: u64, len: u64, write: bool) -> Result<Vec<(u64, u64)>, i32> {
        let need = if write { Perm::WRITE } else { Perm::READ };
        let mut runs = Vec::new();
        if let Some(miss) = self.table().translate(iova, len, &mut runs) {
            return Err(self.refuse(miss, write, libc::EFAULT));
        }
        let mut at = iova;
        let mut out = Vec::with_capacity(runs.len());
        for (gpa, n, perm) in runs {
            if !perm.contains(need) {
                return Err(self.refuse(at, write, libc::EPERM));
            }
            out.push((gpa, n));
            at += n;
        }
        Ok(out)
    }
}

impl DmaAccess for MessageDma {
    fn dma_read(&self, iova: u64, data: &mut [u8]) -> Result<(), i32> {
        let runs = self.translate(iova, data.len() as u64, false)?;
        let mut done = 0usize;
        for (gpa, n) in runs {
            let part = &mut data[done..done + n as usize];
            if self.mem.read_slice(part, GuestAddress(gpa)).is_err() {
                return Err(self.refuse(iova + done as u64, false, libc::EFAULT));
            }
            done += n as usize;
        }
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), i32> {
        // Every page is checked before the first byte is written: a refused write changes
        // nothing.
        let runs = self.translate(iova, data.len() as u64, true)?;
        let mut done = 0usize;
        for (gpa, n) in runs {
            // Written through vm-memory: its dirty bitmap records the pages, so the device's
            // writes reach migration as the VMM's own do.
            if self
                .mem
                .write_slice(&data[done..done + n as usize], GuestAddress(gpa))
                .is_err()
            {
                return Err(self.refuse(iova + done as u64, true, libc::EFAULT));
            }
            done += n as usize;
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
    }

    #[test]
    fn reads_and_writes_only_what_is_mapped_with_its_permissions() {
        let evt = EventFd::new(0).unwrap();
        let d = MessageDma::new(mem(), Some(evt.try_clone().unwrap()));
        d.map(0x10000, 0x2000, 0x4000, Perm::RW).unwrap();
        d.map(0x20000, 0x8000, 0x1000, Perm::READ).unwrap();
        // A write across a page boundary lands at the GPAs, read back through the IOVA.
        d.dma_write(0x10ff0, &[7; 32]).unwrap();
        let mut b = [0u8; 32];
        d.mem.read_slice(&mut b, GuestAddress(0x2ff0)).unwrap();
        assert_eq!(b, [7; 32]);
        let mut r = [0u8; 32];
        d.dma_read(0x10ff0, &mut r).unwrap();
        assert_eq!(r, [7; 32]);
        // Read-only: refused, memory unchanged, a fault queued and signalled.
        d.mem.write_slice(&[1; 16], GuestAddress(0x8000)).unwrap();
        assert_eq!(d.dma_write(0x20000, &[9; 16]), Err(libc::EPERM));
        let mut m = [0u8; 16];
        d.mem.read_slice(&mut m, GuestAddress(0x8000)).unwrap();
        assert_eq!(m, [1; 16]);
        assert!(d.dma_read(0x20000, &mut m).is_ok());
        // Unmapped, and a write that runs past its mapping: nothing of it is written.
        assert_eq!(d.dma_read(0x30000, &mut m), Err(libc::EFAULT));
        d.mem.write_slice(&[0; 16], GuestAddress(0x5ff8)).unwrap();
        assert_eq!(d.dma_write(0x13ff8, &[5; 16]), Err(libc::EFAULT));
        d.mem.read_slice(&mut m, GuestAddress(0x5ff8)).unwrap();
        assert_eq!(m, [0; 16], "the mapped half was not written either");
        assert_eq!(
            d.take_faults(),
            vec![(0x20000, true), (0x30000, false), (0x14000, true)]
        );
        assert_eq!(evt.read().unwrap(), 3);
        assert!(d.take_faults().is_empty());
        // After an unmap, the pages are gone; the rest of the mapping stays.
        d.unmap(0x11000, 0x1000);
        assert_eq!(d.dma_read(0x11000, &mut m), Err(libc::EFAULT));
        assert!(d.dma_read(0x12000, &mut m).is_ok());
        assert_eq!(d.counters.refused.load(Ordering::Relaxed), 4);
    }

    /// Mappings must be whole pages at page-aligned IOVA and GPA; a fault names the first
    /// page refused, also in the second run of an access; the queue of faults is bounded.
    #[test]
    fn mappings_are_whole_pages_faults_name_their_page_and_stay_bounded() {
        let d = MessageDma::new(mem(), None);
        for (iova, gpa, len) in [
            (0x10800, 0x2000, 0x1000),
            (0x10000, 0x2800, 0x1000),
            (0x10000, 0x2000, 0x800),
            (0x10000, 0x2000, 0),
            // Offsets that cancel out (XOR) or add up to a page are still offsets.
            (0x10800, 0x2800, 0x1000),
            (0x10800, 0x2800, 0x800),
            (0x10000, 0x2800, 0x1800),
        ] {
            assert!(
                d.map(iova, gpa, len, Perm::RW).is_err(),
                "{iova:#x} {gpa:#x} {len:#x}"
            );
        }
        // Two runs (the GPAs are not contiguous), the second read-only.
        d.map(0x10000, 0x2000, 0x1000, Perm::RW).unwrap();
        d.map(0x11000, 0x8000, 0x1000, Perm::READ).unwrap();
        let mut buf = [0u8; 0x2000];
        d.dma_read(0x10000, &mut buf).unwrap();
        assert_eq!(d.dma_write(0x10000, &buf), Err(libc::EPERM));
        assert_eq!(d.take_faults(), vec![(0x11000, true)]);
        // Data crossing into the second run lands at its GPA.
        d.mem.write_slice(&[3; 8], GuestAddress(0x8000)).unwrap();
        let mut r = [0u8; 16];
        d.dma_read(0x10ff8, &mut r).unwrap();
        assert_eq!(r[8..], [3; 8]);
        d.dma_write(0x10ff0, &[4; 8]).unwrap();
        let mut w = [0u8; 8];
        d.mem.read_slice(&mut w, GuestAddress(0x2ff0)).unwrap();
        assert_eq!(w, [4; 8]);
        // A mapping to a GPA outside guest memory: refused at its first page, both ways.
        d.map(0x20000, 0x1000, 0x1000, Perm::RW).unwrap();
        d.map(0x21000, 0x20_0000, 0x1000, Perm::RW).unwrap();
        assert_eq!(d.dma_read(0x20000, &mut buf), Err(libc::EFAULT));
        assert_eq!(d.dma_write(0x20000, &buf), Err(libc::EFAULT));
        assert_eq!(d.take_faults(), vec![(0x21000, false), (0x21000, true)]);
        // A device that keeps faulting: 1,024 kept, every one counted.
        for i in 0..1100u64 {
            let _ = d.dma_read(0x40_0000 + i * 4096, &mut r);
        }
        assert_eq!(d.take_faults().len(), 1024);
        assert_eq!(d.counters.refused.load(Ordering::Relaxed), 1103);
    }
}
