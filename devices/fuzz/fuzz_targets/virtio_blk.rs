//! Fuzzes virtio-blk requests through its queue, plain and behind the vIOMMU (where only some
//! IOVAs are mapped, one of them read-only): the input is split into requests, each a header
//! (type, sector) and data and status buffers with fuzzer-chosen sizes, directions and
//! addresses (some outside memory). Nothing may panic, every chain comes back, and the disk
//! image never grows.
#![no_main]

use std::io::Write;

use devices::virtio::block::VirtioBlock;
use devices::virtio::iommu::IommuHandle;
use devices::virtio::testing::{test_memory, CountingInterrupt, TestQueue};
use devices::virtio::VirtioDevice;
use iommu::testing::{attach, map};
use iommu::{Request, Viommu, ViommuConfig};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 4 << 20;
const SECTORS: u64 = 32;

fn image() -> (std::path::PathBuf, std::fs::File) {
    let p = std::env::temp_dir().join(format!("fuzz-blk-{}", std::process::id()));
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&[0x5a; SECTORS as usize * 512]).unwrap();
    (p, f)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mem = test_memory(MEM);
    let (path, _f) = image();
    let behind = mode & 1 == 1;
    let handle = behind.then(|| {
        let mut s = Viommu::new(ViommuConfig {
            guest_ram: vec![(0, MEM as u64)],
            ..Default::default()
        });
        s.add_endpoint(0x10, None, &[]).unwrap();
        let reqs = [
            attach(1, 0x10, 0),
            map(1, 0x1000, 0x2fff, 0x1000, 3),
            map(1, 0x10_0000, 0x17_ffff, 0x10_0000, 3),
            map(1, 0x20_0000, 0x20_0fff, 0x20_0000, 1),
        ];
        let rs: Vec<Request> = reqs
            .iter()
            .map(|r| Request {
                readable: r,
                readable_len: r.len(),
                writable_len: 4,
            })
            .collect();
        s.process(&rs);
        IommuHandle::new(s).unwrap()
    });
    let read_only = mode & 2 == 2;
    let Ok(mut dev) = VirtioBlock::new(&path, read_only, mem.clone(), handle.map(|h| (h, 0x10)))
    else {
        return;
    };
    let mut q = TestQueue::new(&mem, 0x1000, 16);
    dev.set_acked_features(dev.avail_features());
    if dev
        .activate(vec![q.queue()], CountingInterrupt::new())
        .is_err()
    {
        return;
    }
    let mut buf = 0x10_0000u64;
    let mut queued = 0usize;
    while rest.len() >= 16 {
        let (head, tail) = rest.split_at(16);
        rest = tail;
        let type_ = u32::from(head[0] % 12);
        let sector = u64::from_le_bytes(head[1..9].try_into().unwrap());
        let dlen = u32::from_le_bytes(head[9..13].try_into().unwrap()) % 8192;
        let (flags, slen) = (head[13], u32::from(head[14] % 3));
        let mut h = type_.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(buf)).unwrap();
        let data_at = match flags & 3 {
            0 => buf + 0x100,
            1 => 0x20_0000,
            2 => u64::MAX - 0x100,
            _ => 0x30_0000,
        };
        let write = flags & 4 != 0;
        let mut chain = vec![(buf, if flags & 8 != 0 { 8 } else { 16 }, false)];
        if dlen > 0 {
            chain.push((data_at, dlen, write));
        }
        chain.push((buf + 0x3000, slen, true));
        q.add(&mem, &chain);
        queued += 1;
        buf += 0x4000;
        if flags & 16 != 0 || queued == 15 {
            dev.queue_notify(0);
            assert_eq!(q.used(&mem).len(), queued, "every chain comes back");
            queued = 0;
        }
        if buf >= 0x17_0000 {
            break;
        }
    }
    dev.queue_notify(0);
    assert_eq!(q.used(&mem).len(), queued);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SECTORS * 512);
    let _ = std::fs::remove_file(&path);
});
