//! A minimal guest-side virtio driver for in-process device tests and fuzzing: split
//! virtqueues laid out in guest memory as a driver would, chains added to the available
//! ring, used entries read back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VirtioInterrupt;
use crate::GuestMemoryMmap;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// A split virtqueue owned by the test "driver".
#[derive(Debug, Clone)]
pub struct TestQueue {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl TestQueue {
    /// A queue of `size` entries whose rings start at GPA `base` (zeroed here).
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        let end = used + 6 + 8 * u64::from(size);
        let zeros = vec![0u8; (end - base) as usize];
        mem.write_slice(&zeros, GuestAddress(base))
            .expect("rings inside memory");
        Self {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// First GPA after the rings.
    pub fn end(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size)
    }

    /// The device side of this queue, as the transport would configure it.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("valid size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Makes a chain of `bufs` (`(GPA, len, device-writable)`) available; returns its head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = self.next_desc;
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let d = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr.to_le(), GuestAddress(d)).unwrap();
            mem.write_obj(len.to_le(), GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(d + 12)).unwrap();
            mem.write_obj(next.to_le(), GuestAddress(d + 14)).unwrap();
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Used entries `(head, len)` added since the last call.
    pub fn used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut v = Vec::new();
        while self.last_used != idx {
            let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            v.push((id, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        v
    }
}

/// Counts interrupts per queue, and gives each queue an eventfd standing for its irqfd.
#[derive(Debug)]
pub struct CountingInterrupt {
    /// Signals of queues 0..4.
    pub queues: [AtomicU64; 4],
    /// Configuration change signals.
    pub config: AtomicU64,
    /// The "irqfd" of queues 0..4 (what a vhost-user back end would write).
    pub irqfds: Vec<EventFd>,
}

impl CountingInterrupt {
    /// A shared counter.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            queues: Default::default(),
            config: AtomicU64::new(0),
            irqfds: (0..4)
                .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
                .collect(),
        })
    }
    /// Signals of `queue` so far.
    pub fn count(&self, queue: usize) -> u64 {
        self.queues[queue].load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal_queue(&self, queue: u16) {
        if let Some(c) = self.queues.get(usize::from(queue)) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
    fn queue_irqfd(&self, queue: u16) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.irqfds.get(usize::from(queue)).map(|e| e.as_raw_fd())
    }
}

/// Guest memory of `size` bytes at GPA 0, for tests.
pub fn test_memory(size: usize) -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("test memory"))
}

/// Guest memory of `size` bytes at GPA 0 backed by an unlinked file, so that it can be shared
/// by file descriptor (as vhost-user back ends and device processes map it).
pub fn shared_test_memory(size: usize) -> Arc<GuestMemoryMmap> {
    use std::io::{Seek, SeekFrom, Write};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "vmm-test-mem-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("memory file");
    std::fs::remove_file(&p).expect("unlink the memory file");
    f.seek(SeekFrom::Start(size as u64 - 1)).expect("seek");
    f.write_all(&[0]).expect("size the memory file");
    let fo = vm_memory::FileOffset::new(f, 0);
    Arc::new(
        GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), size, Some(fo))])
            .expect("shared test memory"),
    )
}
