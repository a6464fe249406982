//! Regression tests for defects found against virtio 1.3 (5.13 and 2.7.8.2), each driven
//! through the virtqueues as a guest driver would. Each test failed on the code before its
//! fix.

use iommu::backend::{BackendCaps, RecordingBackend};
use iommu::pagetable::MAX_IOVA;
use iommu::protocol::features::*;
use iommu::protocol::*;
use iommu::testing::{attach, map, probe, unmap};
use iommu::viommu::{ResvRegion, SetupError, X86_MSI_REGION};
use iommu::{Viommu, ViommuConfig};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::FromBytes;

use super::tests::{Driver, OK, RW};
use super::*;

/// Sends `req` with a `writable`-byte writable part filled with `poison` to a fresh device
/// (endpoints 8 and 9); returns the used length and the whole writable part afterwards.
fn answer(req: &[u8], writable: u32, poison: u8) -> (u32, Vec<u8>) {
    let mut d = Driver::new();
    assert_eq!(d.status(attach(1, 9, 0)), OK);
    let (_, w) = d.queue_poisoned(req, writable, poison);
    d.dev.queue_notify(0);
    let used = d.req.used(&d.mem);
    assert_eq!(used.len(), 1);
    let mut out = vec![0u8; writable as usize];
    d.mem.read_slice(&mut out, GuestAddress(w)).unwrap();
    (used[0].1, out)
}

fn probe_size() -> u32 {
    let d = Driver::new();
    let mut cfg = [0u8; 40];
    d.dev.read_config(0, &mut cfg);
    Config::read_from_bytes(&cfg).unwrap().probe_size.get()
}

/// 2.7.8.2: "The device MUST write at least len bytes to descriptor, beginning at the first
/// device-writable buffer, prior to updating the used idx." Shown by sending each request
/// twice over different poison bytes: the first `len` bytes must come out the same (the
/// device wrote them), the rest must be the poison (the device left them alone).
#[test]
fn used_length_never_exceeds_what_the_device_wrote() {
    let ps = probe_size();
    let cases: Vec<(&str, Vec<u8>, u32, Status)> = vec![
        (
            "PROBE of an unknown endpoint",
            probe(77),
            ps + 4,
            Status::NoEnt,
        ),
        ("PROBE with too little room", probe(8), 20, Status::Inval),
        (
            "PROBE with more room than probe_size",
            probe(8),
            ps + 4 + 256,
            Status::Ok,
        ),
        ("PROBE of the right size", probe(8), ps + 4, Status::Ok),
        (
            "ATTACH with a long writable part",
            attach(1, 8, 0),
            64,
            Status::Ok,
        ),
        (
            "UNMAP of an unknown domain, long writable part",
            unmap(5, 0, 0xfff),
            32,
            Status::NoEnt,
        ),
        (
            "MAP with exactly a tail",
            map(1, 0, 0xfff, 0, RW),
            4,
            Status::Ok,
        ),
    ];
    for (what, req, writable, status) in cases {
        let (len_a, a) = answer(&req, writable, 0xee);
        let (len_b, b) = answer(&req, writable, 0x11);
        assert_eq!(len_a, len_b, "{what}: used length");
        let len = len_a as usize;
        assert!(
            len >= 4 && len <= writable as usize,
            "{what}: used length {len}"
        );
        assert_eq!(
            a[..len],
            b[..len],
            "{what}: bytes within the used length were not written"
        );
        assert!(
            a[len..].iter().all(|&x| x == 0xee),
            "{what}: wrote past the used length"
        );
        assert!(
            b[len..].iter().all(|&x| x == 0x11),
            "{what}: wrote past the used length"
        );
        assert_eq!(a[len - 4], status as u8, "{what}: status in the tail");
        assert_eq!(a[len - 3..len], [0, 0, 0], "{what}: tail reserved bytes");
    }
}

/// The RESV_MEM properties a PROBE returns, as `(subtype, start, end)`.
fn resv_mem(d: &mut Driver, ep: u32) -> Vec<(u8, u64, u64)> {
    let ps = probe_size_of(d);
    let (_, w) = d.queue(&probe(ep), ps + 4);
    d.dev.queue_notify(0);
    assert_eq!(d.req.used(&d.mem)[0].1, ps + 4);
    let mut out = vec![0u8; ps as usize + 4];
    d.mem.read_slice(&mut out, GuestAddress(w)).unwrap();
    assert_eq!(out[ps as usize], Status::Ok as u8);
    let mut props = Vec::new();
    let mut at = 0usize;
    while at + 4 <= ps as usize {
        let (h, _) = ProbeProperty::read_from_prefix(&out[at..]).unwrap();
        if h.type_.get() == 0 {
            break;
        }
        assert_eq!(h.type_.get(), VIRTIO_IOMMU_PROBE_T_RESV_MEM);
        let (p, _) = ProbeResvMem::read_from_prefix(&out[at..]).unwrap();
        props.push((p.subtype, p.start.get(), p.end.get()));
        at += 4 + usize::from(h.length.get());
    }
    props
}

fn probe_size_of(d: &Driver) -> u32 {
    let mut cfg = [0u8; 40];
    d.dev.read_config(0, &mut cfg);
    Config::read_from_bytes(&cfg).unwrap().probe_size.get()
}

/// 5.13.6.6.1: "The device SHOULD NOT present multiple RESV_MEM properties that overlap each
/// other for the same endpoint." A host whose usable IOVA ranges leave a hole over the MSI
/// doorbell (as x86 VFIO does, often wider than the doorbell) gets the hole split around it.
#[test]
fn resv_mem_properties_never_overlap() {
    let mut state = Viommu::new(Driver::config());
    let caps = BackendCaps {
        iova_ranges: vec![(0, 0xfedf_ffff), (0xff00_0000, MAX_IOVA)],
        ..Default::default()
    };
    let (b, _) = RecordingBackend::new("holes", caps);
    let id = state.add_backend(Box::new(b)).unwrap();
    let low = ResvRegion {
        start: 0x1000_0000,
        end: 0x1000_ffff,
        subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
    };
    state.add_endpoint(10, Some(id), &[low]).unwrap();
    let mut d = Driver::with(state, None);
    let got = resv_mem(&mut d, 10);
    assert_eq!(
        got,
        vec![
            (VIRTIO_IOMMU_RESV_MEM_T_RESERVED, 0x1000_0000, 0x1000_ffff),
            (VIRTIO_IOMMU_RESV_MEM_T_MSI, 0xfee0_0000, 0xfeef_ffff),
            (VIRTIO_IOMMU_RESV_MEM_T_RESERVED, 0xfef0_0000, 0xfeff_ffff),
        ]
    );
    // A real conflict, two fixed regions over the same addresses, is refused at setup.
    let mut state = Viommu::new(Driver::config());
    let clash = ResvRegion {
        start: 0xfeef_0000,
        end: 0xfef0_ffff,
        subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
    };
    assert_eq!(
        state.add_endpoint(11, None, &[clash]),
        Err(SetupError::ReservedOverlap(X86_MSI_REGION, clash))
    );
    assert!(!state.has_endpoint(11));
}

/// 5.13.6.1: an ATTACH that moves an endpoint "SHOULD behave as if the driver issued a
/// DETACH request with this endpoint, followed by the ATTACH request. If the device cannot
/// do so, it MUST reject the request and set status to VIRTIO_IOMMU_S_UNSUPP."
#[test]
fn attach_moves_an_endpoint_as_detach_then_attach() {
    // At the domain limit, moving the last endpoint of a domain frees that domain first.
    let mut state = Viommu::new(ViommuConfig {
        max_domains: 1,
        ..Driver::config()
    });
    state.add_endpoint(8, None, &[]).unwrap();
    state.add_endpoint(9, None, &[]).unwrap();
    let mut d = Driver::with(state, None);
    assert_eq!(d.status(attach(1, 8, 0)), OK);
    assert_eq!(
        d.status(attach(2, 8, 0)),
        OK,
        "DETACH + ATTACH would succeed"
    );
    assert_eq!(d.dev.handle().lock().domain_ids(), vec![2]);
    // A domain that keeps another endpoint is not freed by the move: the limit holds.
    assert_eq!(d.status(attach(2, 9, 0)), OK);
    assert_eq!(d.status(attach(3, 8, 0)), Some(Status::NoMem as u8));
    assert_eq!(d.dev.handle().lock().endpoint_domain(8), Some(2));

    // A host call that fails during the move: UNSUPP, and the endpoint stays where it was
    // with its mappings, on the host too.
    let mut state = Viommu::new(Driver::config());
    let (b, log) = RecordingBackend::new("host", BackendCaps::default());
    let id = state.add_backend(Box::new(b)).unwrap();
    state.add_endpoint(10, Some(id), &[]).unwrap();
    let mut d = Driver::with(state, None);
    assert_eq!(d.status(attach(1, 10, 0)), OK);
    assert_eq!(d.status(map(1, 0x1000, 0x1fff, 0x8000, RW)), OK);
    let before = log.lock().unwrap().host_pages();
    let attempts = log.lock().unwrap().attempts;
    log.lock().unwrap().fail_call = Some(attempts);
    assert_eq!(d.status(attach(2, 10, 0)), Some(Status::Unsupp as u8));
    let s = d.dev.handle().lock();
    assert_eq!(s.endpoint_domain(10), Some(1));
    assert_eq!(s.domain_ids(), vec![1]);
    assert_eq!(
        s.domain_mappings(1),
        vec![(0x1000, 0x8000, 0x1000, iommu::Perm::RW)]
    );
    assert_eq!(log.lock().unwrap().host_pages(), before);
}

/// 5.13.6.5: "If the device does not offer the VIRTIO_IOMMU_F_PROBE feature, and if the
/// driver sends a VIRTIO_IOMMU_T_PROBE request, then the device SHOULD NOT write the buffer
/// and SHOULD set the used length to zero." Likewise MAP and UNMAP without
/// VIRTIO_IOMMU_F_MAP_UNMAP ("This request is only available when VIRTIO_IOMMU_F_MAP_UNMAP
/// has been negotiated").
#[test]
fn requests_of_features_not_negotiated_are_not_recognized() {
    for (feature, req) in [
        (VIRTIO_IOMMU_F_PROBE, probe(8)),
        (VIRTIO_IOMMU_F_MAP_UNMAP, map(1, 0, 0xfff, 0, RW)),
        (VIRTIO_IOMMU_F_MAP_UNMAP, unmap(1, 0, 0xfff)),
    ] {
        let mut state = Viommu::new(Driver::config());
        state.add_endpoint(8, None, &[]).unwrap();
        let offered = (1 << crate::virtio::VIRTIO_F_VERSION_1) | state.offered_features();
        let mut d = Driver::with(state, Some(offered & !(1 << feature)));
        assert_eq!(d.status(attach(1, 8, 0)), OK);
        let (head, w) = d.queue(&req, 600);
        d.dev.queue_notify(0);
        assert_eq!(
            d.req.used(&d.mem),
            vec![(u32::from(head), 0)],
            "feature {feature}: used length"
        );
        let mut out = vec![0u8; 600];
        d.mem.read_slice(&mut out, GuestAddress(w)).unwrap();
        assert!(
            out.iter().all(|&b| b == 0xee),
            "feature {feature}: buffer written"
        );
    }
}

/// 5.13.6.7: `VIRTIO_IOMMU_FAULT_R_DOMAIN`, "The endpoint attempted to access address
/// without being attached to a domain". A passthrough device's refused DMA is reported with
/// the reason its endpoint's state gives, read from the event queue.
#[test]
fn device_faults_carry_the_reason_of_the_endpoint_state() {
    let mut state = Viommu::new(Driver::config());
    let (b, _) = RecordingBackend::new("host", BackendCaps::default());
    let id = state.add_backend(Box::new(b)).unwrap();
    state.add_endpoint(10, Some(id), &[]).unwrap();
    let mut d = Driver::with(state, None);
    let mut reasons = Vec::new();
    for step in 0..3 {
        match step {
            1 => assert_eq!(d.status(attach(1, 10, 0)), OK),
            2 => {
                // An endpoint the device does not know.
                d.dev
                    .handle()
                    .lock()
                    .report_device_fault(77, false, Some(0x3000));
                reasons.push(next_fault(&mut d));
                continue;
            }
            _ => {}
        }
        d.dev
            .handle()
            .lock()
            .report_device_fault(10, true, Some(0x2000));
        reasons.push(next_fault(&mut d));
    }
    assert_eq!(
        reasons,
        vec![
            (VIRTIO_IOMMU_FAULT_R_DOMAIN, 10, 0x2000),
            (VIRTIO_IOMMU_FAULT_R_MAPPING, 10, 0x2000),
            (VIRTIO_IOMMU_FAULT_R_UNKNOWN, 77, 0x3000),
        ]
    );
}

/// Gives the event queue one buffer and returns the fault written there as
/// `(reason, endpoint, address)`.
fn next_fault(d: &mut Driver) -> (u8, u32, u64) {
    let buf = d.alloc(64);
    d.evt.add(&d.mem, &[(buf, 64, true)]);
    d.dev.queue_notify(1);
    let used = d.evt.used(&d.mem);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 24);
    let mut raw = [0u8; 24];
    d.mem.read_slice(&mut raw, GuestAddress(buf)).unwrap();
    let f = Fault::read_from_bytes(&raw).unwrap();
    (f.reason, f.endpoint.get(), f.address.get())
}
