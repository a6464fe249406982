//! The bodies of the fuzz targets (`devices/fuzz`, run by `tests/fuzz.sh`): each takes the
//! fuzzer's bytes, drives one device or client with them, and panics only when a promise
//! breaks (a chain not returned, a disk that grew, a parse that panicked). The fuzz targets
//! are one line each around these, and the unit tests below run them over their seeds and
//! random inputs, so the test command exercises the same code without building the fuzzers.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use iommu::backend::RecordingBackend;
use iommu::testing::{attach, batch, map};
use iommu::{Access, BackendCaps, Viommu, ViommuConfig};
use vm_memory::{Bytes, GuestAddress};

use crate::passthrough::message_dma::MessageDma;
use crate::passthrough::vfio_user::VfioUserClient;
use crate::virtio::block::VirtioBlock;
use crate::virtio::iommu::{IommuHandle, VirtioIommu};
use crate::virtio::testing::{test_memory, CountingInterrupt, TestQueue};
use crate::virtio::VirtioDevice;

/// Guest memory of the virtio fuzz bodies: 4 MiB.
const MEM: usize = 4 << 20;
/// The virtio-blk body's disk: 32 sectors of 512 bytes.
const SECTORS: u64 = 32;

/// The virtio-iommu's request queue: `data` is split into requests that are laid out in
/// guest memory as descriptor chains (with chosen readable and writable sizes, and sometimes
/// addresses outside memory), queued and notified in batches. Endpoints 8 (an emulated
/// device) and 16 (a passthrough backend that fails some host calls) exist.
///
/// # Panics
/// When a chain is not returned to the used ring, or when anything below panics.
pub fn virtio_iommu_queue(data: &[u8]) {
    let mem = test_memory(MEM);
    let mut state = Viommu::new(ViommuConfig {
        guest_ram: vec![(0, MEM as u64)],
        metadata_budget: 8 << 20,
        ..Default::default()
    });
    let (backend, log) = RecordingBackend::new(
        "fuzz",
        BackendCaps {
            merge_maps: data.first().is_some_and(|b| b & 1 == 1),
            ..Default::default()
        },
    );
    log.lock().unwrap().fail_iova = Some(0x6000);
    let b = state.add_backend(Box::new(backend)).unwrap();
    state.add_endpoint(8, None, &[]).unwrap();
    state.add_endpoint(16, Some(b), &[]).unwrap();
    let handle = IommuHandle::new(state).unwrap();
    let mut dev = VirtioIommu::new(handle.clone(), mem.clone());
    let mut req = TestQueue::new(&mem, 0x1000, 64);
    let mut evt = TestQueue::new(&mem, 0x3000, 8);
    dev.set_acked_features(dev.avail_features() & !u64::from(data.get(1).copied().unwrap_or(0)));
    let irq = CountingInterrupt::new();
    if dev
        .activate(vec![req.queue(), evt.queue()], irq.clone())
        .is_err()
    {
        return;
    }
    for i in 0..4u64 {
        evt.add(&mem, &[(0x8000 + 64 * i, 24, true)]);
    }
    let mut buf = 0x10_0000u64;
    let mut queued = 0usize;
    let mut rest = data.get(2..).unwrap_or(&[]);
    while rest.len() >= 3 {
        let (len, wlen, flags) = (usize::from(rest[0] % 96), u32::from(rest[1]), rest[2]);
        rest = &rest[3..];
        let body = &rest[..len.min(rest.len())];
        rest = &rest[body.len()..];
        mem.write_slice(body, GuestAddress(buf)).unwrap();
        let rlen = if flags & 1 != 0 {
            u32::MAX
        } else {
            body.len() as u32
        };
        let waddr = if flags & 2 != 0 {
            u64::MAX - 8
        } else {
            buf + 128
        };
        req.add(&mem, &[(buf, rlen, false), (waddr, wlen * 4, true)]);
        queued += 1;
        buf += 0x1000;
        if flags & 4 != 0 || queued.is_multiple_of(60) {
            dev.queue_notify(0);
            let used = req.used(&mem);
            assert_eq!(used.len(), queued, "every chain comes back");
            queued = 0;
        }
        if flags & 8 != 0 {
            let mut out = Vec::new();
            let _ = handle
                .lock()
                .translate(8, buf & 0xff_ffff, 64, Access::Write, &mut out);
            dev.queue_notify(1);
        }
        if flags & 16 != 0 {
            dev.reset();
            return;
        }
        if buf >= 0x30_0000 {
            break;
        }
    }
    dev.queue_notify(0);
    assert_eq!(req.used(&mem).len(), queued);
}

/// A scratch disk image of [`SECTORS`] sectors filled with 0x5a, removed when dropped.
struct Image(std::path::PathBuf);

impl Image {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("fuzz-blk-{}-{n}", std::process::id()));
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&[0x5a; SECTORS as usize * 512]).unwrap();
        Image(p)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// virtio-blk requests through its queue, plain and behind the vIOMMU (where only some IOVAs
/// are mapped, one of them read-only): `data` is split into requests, each a header (type,
/// sector) and data and status buffers with chosen sizes, directions and addresses (some
/// outside memory).
///
/// # Panics
/// When a chain is not returned, when the disk image grew, or when anything below panics.
pub fn virtio_blk(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mem = test_memory(MEM);
    let image = Image::new();
    let path = &image.0;
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
        batch(&mut s, &reqs);
        IommuHandle::new(s).unwrap()
    });
    let read_only = mode & 2 == 2;
    let Ok(mut dev) = VirtioBlock::new(path, read_only, mem.clone(), handle.map(|h| (h, 0x10)))
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
    assert_eq!(std::fs::metadata(path).unwrap().len(), SECTORS * 512);
}

/// The vfio-user client's reply parsing: `data` is everything a device server sends (the
/// version reply, device and region info, then the replies to region reads and writes, DMA
/// maps and unmaps, IRQ info and SET_IRQS, DEVICE_FEATURE and MIG_DATA_READ, and the server's
/// own DMA_READ/DMA_WRITE commands in between), whatever the client asked. The client must
/// refuse what is malformed with an error and never read past a message.
///
/// # Panics
/// Only when the client panics.
pub fn vfio_user_replies(data: &[u8]) {
    let Ok((client_end, mut server_end)) = UnixStream::pair() else {
        return;
    };
    // Everything the server will ever say, then end of stream.
    if server_end.write_all(data).is_err() {
        return;
    }
    let _ = server_end.shutdown(std::net::Shutdown::Write);
    let Ok(mut c) = VfioUserClient::from_stream(client_end, Duration::from_millis(50)) else {
        return;
    };
    let memfd = std::fs::File::open("/dev/null").unwrap();
    // The server's DMA_READ/DMA_WRITE go to a small table over 1 MiB of guest memory.
    if let Ok(mem) = crate::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]) {
        let table = Arc::new(MessageDma::new(Arc::new(mem), None));
        let _ = table.map(0x10000, 0x1000, 0x4000, iommu::Perm::RW);
        c.set_dma_access(table);
    }
    let mut buf = [0u8; 64];
    for i in 0..c.regions().len().min(4) as u32 {
        let _ = c.region_read(i, 0, &mut buf);
        let _ = c.region_write(i, 8, &buf[..4]);
    }
    let _ = c.irq_info(0);
    let _ = c.set_irqs(0, 0, &[]);
    let _ = c.dma_map(0x10000, 0x2000, Some(&memfd), 0, 3);
    let _ = c.dma_unmap(0x10000, 0x2000);
    let _ = c.reset();
    let _ = c.migration_feature();
    let _ = c.set_mig_state(1);
    let _ = c.read_mig_data();
    let mut bits = [0u64; 1];
    let _ = c.dma_logging_report(0, 64 * 4096, 4096, &mut bits);
    drop(server_end);
}

mod functions;
pub use crate::virtio::net::vhost_user::fuzzing::backend_channel as vhost_user_backend_channel;
pub use functions::{function_states, pci_dispatch};

#[cfg(test)]
mod tests;
