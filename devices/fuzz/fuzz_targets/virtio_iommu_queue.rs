//! Fuzzes the virtio-iommu's request queue: the input is split into requests that are laid
//! out in guest memory as descriptor chains (with fuzzer-chosen readable and writable sizes,
//! and sometimes addresses outside memory), queued and notified in batches. Endpoints 8 (an
//! emulated device) and 16 (a passthrough backend that fails some host calls) exist. Nothing
//! may panic, and every chain must be returned.
#![no_main]

use devices::virtio::iommu::{IommuHandle, VirtioIommu};
use devices::virtio::testing::{test_memory, CountingInterrupt, TestQueue};
use devices::virtio::VirtioDevice;
use iommu::backend::RecordingBackend;
use iommu::{Access, BackendCaps, Viommu, ViommuConfig};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 4 << 20;

fuzz_target!(|data: &[u8]| {
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
        if flags & 4 != 0 || queued % 60 == 0 {
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
});
