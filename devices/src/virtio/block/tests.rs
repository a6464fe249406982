//! virtio-blk through its queue, plain and behind the vIOMMU.

use std::io::Write;

use iommu::protocol::Status;
use iommu::testing::{attach, batch, map};
use iommu::{Viommu, ViommuConfig};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::testing::{test_memory, CountingInterrupt, TestQueue};

const MEM: usize = 16 << 20;

fn image(name: &str, sectors: u64) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("blk-{}-{name}", std::process::id()));
    let mut f = File::create(&p).unwrap();
    for s in 0..sectors {
        f.write_all(&[s as u8; 512]).unwrap();
    }
    p
}

fn header(type_: u32, sector: u64) -> Vec<u8> {
    let mut h = type_.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

struct Setup {
    mem: Arc<GuestMemoryMmap>,
    dev: VirtioBlock,
    q: TestQueue,
    irq: Arc<CountingInterrupt>,
    iommu: Option<IommuHandle>,
}

fn setup(name: &str, iommu: bool) -> Setup {
    let mem = test_memory(MEM);
    let path = image(name, 64);
    let handle = iommu.then(|| {
        let mut s = Viommu::new(ViommuConfig::default());
        s.add_endpoint(0x10, None, &[]).unwrap();
        IommuHandle::new(s).unwrap()
    });
    let mut dev =
        VirtioBlock::new(&path, false, mem.clone(), handle.clone().map(|h| (h, 0x10))).unwrap();
    std::fs::remove_file(path).unwrap();
    let q = TestQueue::new(&mem, 0x1000, 16);
    if let Some(h) = &handle {
        // The driver maps the ring pages and a data area IOVA = GPA, except one read-only page.
        let reqs = [
            attach(1, 0x10, 0),
            map(1, 0x1000, 0x2fff, 0x1000, 3),
            map(1, 0x10_0000, 0x10_ffff, 0x10_0000, 3),
            map(1, 0x20_0000, 0x20_0fff, 0x20_0000, 1),
        ];
        let st = batch(&mut h.lock(), &reqs);
        assert!(st.iter().all(|s| *s == Some(Status::Ok)), "{st:?}");
    }
    dev.set_acked_features(dev.avail_features());
    let irq = CountingInterrupt::new();
    dev.activate(vec![q.queue()], irq.clone()).unwrap();
    Setup {
        mem,
        dev,
        q,
        irq,
        iommu: handle,
    }
}

impl Setup {
    /// Queues a request: header at `hdr`, data buffer (`data`, `len`, device-writable?),
    /// status byte at `status`. Returns the status byte and used length.
    fn request(
        &mut self,
        type_: u32,
        sector: u64,
        data: Option<(u64, u32, bool)>,
        status: u64,
    ) -> (u8, u32) {
        let hdr = 0x10_0000;
        self.mem
            .write_slice(&header(type_, sector), GuestAddress(hdr))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut bufs = vec![(hdr, 16, false)];
        bufs.extend(data);
        bufs.push((status, 1, true));
        self.q.add(&self.mem, &bufs);
        self.dev.queue_notify(0);
        let used = self.q.used(&self.mem);
        let s: u8 = self.mem.read_obj(GuestAddress(status)).unwrap();
        (s, used.last().map(|u| u.1).unwrap_or(u32::MAX))
    }
}

#[test]
fn read_write_flush_id() {
    let mut s = setup("plain", false);
    assert_eq!(
        s.request(0, 3, Some((0x10_1000, 1024, true)), 0x10_f000),
        (0, 1025)
    );
    let mut b = [0u8; 1024];
    s.mem.read_slice(&mut b, GuestAddress(0x10_1000)).unwrap();
    assert!(b[..512].iter().all(|&x| x == 3) && b[512..].iter().all(|&x| x == 4));
    s.mem
        .write_slice(&[0xab; 512], GuestAddress(0x10_2000))
        .unwrap();
    assert_eq!(
        s.request(1, 5, Some((0x10_2000, 512, false)), 0x10_f000),
        (0, 1)
    );
    assert_eq!(
        s.request(0, 5, Some((0x10_3000, 512, true)), 0x10_f000).0,
        0
    );
    let mut r = [0u8; 512];
    s.mem.read_slice(&mut r, GuestAddress(0x10_3000)).unwrap();
    assert_eq!(r, [0xab; 512]);
    assert_eq!(s.request(4, 0, None, 0x10_f000), (0, 1));
    assert_eq!(s.request(8, 0, Some((0x10_4000, 20, true)), 0x10_f000).0, 0);
    assert_eq!(s.request(99, 0, None, 0x10_f000).0, 2, "UNSUPP");
    assert_eq!(
        s.request(0, 64, Some((0x10_1000, 512, true)), 0x10_f000).0,
        1,
        "past the end"
    );
    assert_eq!(
        s.request(0, u64::MAX, Some((0x10_1000, 512, true)), 0x10_f000)
            .0,
        1
    );
    let c = s.dev.counters();
    assert_eq!((c.reads, c.writes, c.flushes), (2, 1, 1));
    assert_eq!(s.irq.count(0), 8, "one interrupt per notification");
}

#[test]
fn behind_the_iommu_only_mapped_memory_is_touched() {
    let mut s = setup("iommu", true);
    assert!(s.dev.avail_features() & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0);
    // A read into a mapped, writable buffer works.
    assert_eq!(
        s.request(0, 7, Some((0x10_1000, 512, true)), 0x10_f000),
        (0, 513)
    );
    let mut b = [0u8; 512];
    s.mem.read_slice(&mut b, GuestAddress(0x10_1000)).unwrap();
    assert_eq!(b, [7; 512]);
    // A read into a read-only mapping: IOERR, memory untouched, a fault event.
    s.mem
        .write_slice(&[0x55; 512], GuestAddress(0x20_0000))
        .unwrap();
    assert_eq!(
        s.request(0, 7, Some((0x20_0000, 512, true)), 0x10_f000).0,
        1
    );
    s.mem.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(b, [0x55; 512]);
    // A buffer running off the mapping: IOERR, nothing written past it.
    s.mem
        .write_slice(&[0x66; 512], GuestAddress(0x11_0000))
        .unwrap();
    assert_eq!(
        s.request(0, 7, Some((0x10_ff00, 512, true)), 0x10_f000).0,
        1
    );
    s.mem.read_slice(&mut b, GuestAddress(0x11_0000)).unwrap();
    assert_eq!(b, [0x66; 512]);
    // An unmapped status byte: nothing can be answered.
    assert_eq!(
        s.request(0, 7, Some((0x10_1000, 512, true)), 0x30_0000).1,
        0
    );
    let h = s.iommu.as_ref().unwrap().lock();
    assert!(h.counters().faults >= 3);
    assert!(h.counters().translated_bytes > 0);
    assert!(s.dev.counters().translation_faults >= 2);
    assert!(h.has_faults());
}

#[test]
fn access_platform_is_required_behind_the_iommu() {
    let mem = test_memory(MEM);
    let path = image("noap", 8);
    let mut st = Viommu::new(ViommuConfig::default());
    st.add_endpoint(0x10, None, &[]).unwrap();
    let h = IommuHandle::new(st).unwrap();
    let mut dev = VirtioBlock::new(&path, true, mem.clone(), Some((h, 0x10))).unwrap();
    std::fs::remove_file(path).unwrap();
    dev.set_acked_features(1 << VIRTIO_F_VERSION_1);
    let q = TestQueue::new(&mem, 0x1000, 16);
    assert_eq!(
        dev.activate(vec![q.queue()], CountingInterrupt::new()),
        Err(ActivateError::MissingFeature(VIRTIO_F_ACCESS_PLATFORM))
    );
}
