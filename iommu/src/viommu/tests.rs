//! Request-level tests: every request type and error path of 5.13.6, host backends kept in
//! step, rollback, translation and faults.

use super::*;
use crate::backend::{Call, RecordingBackend};
use crate::pagetable::Perm;
use crate::protocol::*;

pub(crate) use crate::testing::{
    attach, batch, detach, device, map, probe, send, unmap, with_backend, R, RW,
};

#[test]
fn attach_map_translate_unmap_detach() {
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0x10000, 0x1ffff, 0x80000, RW)),
        Some(Status::Ok)
    );
    let mut out = Vec::new();
    v.translate(1, 0x10800, 0x1000, Access::Write, &mut out)
        .unwrap();
    assert_eq!(out, vec![(0x80800, 0x1000)]);
    // Second lookup hits the IOTLB.
    v.translate(1, 0x10800, 0x100, Access::Read, &mut out)
        .unwrap();
    assert_eq!(v.counters().iotlb_hits, 1);
    assert_eq!(send(&mut v, &unmap(1, 0x10000, 0x1ffff)), Some(Status::Ok));
    // The IOTLB entry is gone with the mapping.
    let f = v
        .translate(1, 0x10800, 0x100, Access::Read, &mut out)
        .unwrap_err();
    assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(f.address.get(), 0x10800);
    assert_eq!(
        f.flags.get(),
        VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
    assert_eq!(v.pop_fault().unwrap().endpoint.get(), 1);
    assert_eq!(send(&mut v, &detach(1, 1)), Some(Status::Ok));
    assert!(v.domain_ids().is_empty(), "an empty domain is freed");
    let f = v.translate(1, 0, 1, Access::Read, &mut out).unwrap_err();
    assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_DOMAIN);
}

#[test]
fn attach_errors() {
    let mut v = device();
    let mut bad = attach(1, 1, 0);
    bad[16] = 1; // reserved
    assert_eq!(send(&mut v, &bad), Some(Status::Inval));
    assert_eq!(
        send(&mut v, &attach(1, 1, 2)),
        Some(Status::Inval),
        "unknown flag"
    );
    assert_eq!(send(&mut v, &attach(1, 99, 0)), Some(Status::NoEnt));
    assert_eq!(send(&mut v, &attach(0x10000, 1, 0)), Some(Status::Range));
    assert_eq!(
        send(&mut v, &attach(1, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Some(Status::Ok)
    );
    assert_eq!(
        send(&mut v, &attach(1, 2, 0)),
        Some(Status::Inval),
        "bypass flag inconsistent"
    );
    assert_eq!(
        send(&mut v, &map(1, 0, 0xfff, 0, RW)),
        Some(Status::Inval),
        "MAP on a bypass domain"
    );
    assert_eq!(
        send(&mut v, &unmap(1, 0, 0xfff)),
        Some(Status::Inval),
        "UNMAP on a bypass domain"
    );
    // ATTACH_F_BYPASS is unknown when BYPASS_CONFIG is not negotiated.
    v.set_negotiated(v.offered_features() & !(1 << features::VIRTIO_IOMMU_F_BYPASS_CONFIG));
    assert_eq!(
        send(&mut v, &attach(3, 2, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Some(Status::Inval)
    );
}

#[test]
fn attach_moves_between_domains_and_frees_empty_ones() {
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &attach(1, 1, 0)),
        Some(Status::Ok),
        "same domain again"
    );
    assert_eq!(send(&mut v, &attach(2, 1, 0)), Some(Status::Ok));
    assert_eq!(v.domain_ids(), vec![2]);
    assert_eq!(v.endpoint_domain(1), Some(2));
    assert_eq!(
        send(&mut v, &attach(2, 2, 0)),
        Some(Status::Ok),
        "two endpoints share a domain"
    );
    assert_eq!(send(&mut v, &detach(2, 1)), Some(Status::Ok));
    assert_eq!(v.domain_ids(), vec![2]);
}

#[test]
fn detach_errors() {
    let mut v = device();
    assert_eq!(send(&mut v, &detach(1, 99)), Some(Status::NoEnt));
    assert_eq!(
        send(&mut v, &detach(1, 1)),
        Some(Status::Inval),
        "not attached"
    );
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &detach(2, 1)),
        Some(Status::Inval),
        "other domain"
    );
    let mut reserved = detach(1, 1);
    reserved[12] = 0xff; // ignored
    assert_eq!(send(&mut v, &reserved), Some(Status::Ok));
}

#[test]
fn map_errors_change_nothing() {
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &map(2, 0, 0xfff, 0, RW)), Some(Status::NoEnt));
    assert_eq!(
        send(&mut v, &map(1, 0, 0xfff, 0, 8)),
        Some(Status::Inval),
        "unknown flag"
    );
    assert_eq!(
        send(&mut v, &map(1, 0x800, 0x17ff, 0, RW)),
        Some(Status::Range)
    );
    assert_eq!(send(&mut v, &map(1, 0, 0xffe, 0, RW)), Some(Status::Range));
    assert_eq!(
        send(&mut v, &map(1, 0, 0xfff, 0x10, RW)),
        Some(Status::Range)
    );
    assert_eq!(
        send(&mut v, &map(1, 0x2000, 0xfff, 0, RW)),
        Some(Status::Inval),
        "end < start"
    );
    assert_eq!(
        send(&mut v, &map(1, 0, u64::MAX, 0, RW)),
        Some(Status::Range),
        "beyond input_range"
    );
    assert_eq!(
        send(&mut v, &map(1, u64::MAX - 0xfff, u64::MAX, 0, RW)),
        Some(Status::Range)
    );
    assert_eq!(
        send(&mut v, &map(1, 0, 0xfff, u64::MAX - 0xfff, RW)),
        Some(Status::Range),
        "phys beyond what exists"
    );
    assert_eq!(
        send(&mut v, &map(1, 0xfee0_0000, 0xfee0_0fff, 0, RW)),
        Some(Status::Inval),
        "over the MSI reserved region"
    );
    assert_eq!(
        send(&mut v, &map(1, 0x1000, 0x2fff, 0, R)),
        Some(Status::Ok)
    );
    assert_eq!(
        send(&mut v, &map(1, 0x2000, 0x3fff, 0, R)),
        Some(Status::Inval),
        "overlap"
    );
    assert_eq!(v.domain_mappings(1), vec![(0x1000, 0, 0x2000, Perm::READ)]);
    // MMIO only with F_MMIO negotiated.
    assert_eq!(
        send(&mut v, &map(1, 0x8000, 0x8fff, 0, VIRTIO_IOMMU_MAP_F_MMIO)),
        Some(Status::Ok)
    );
    v.set_negotiated(v.offered_features() & !(1 << features::VIRTIO_IOMMU_F_MMIO));
    assert_eq!(
        send(&mut v, &map(1, 0x9000, 0x9fff, 0, VIRTIO_IOMMU_MAP_F_MMIO)),
        Some(Status::Inval)
    );
}

#[test]
fn unmap_follows_the_spec_examples() {
    // The seven examples of 5.13.6.4, in pages of 4 KiB.
    let p = |n: u64| n * 0x1000;
    let e = |n: u64| n * 0x1000 + 0xfff;
    type Case = (Vec<(u64, u64)>, (u64, u64), Status, usize);
    let cases: Vec<Case> = vec![
        (vec![], (0, 4), Status::Ok, 0),
        (vec![(0, 9)], (0, 9), Status::Ok, 0),
        (vec![(0, 4), (5, 9)], (0, 9), Status::Ok, 0),
        (vec![(0, 9)], (0, 4), Status::Range, 1),
        (vec![(0, 4), (5, 9)], (0, 4), Status::Ok, 1),
        (vec![(0, 4)], (0, 9), Status::Ok, 0),
        (vec![(0, 4), (10, 14)], (0, 14), Status::Ok, 0),
    ];
    for (maps, (s, t), status, left) in cases {
        let mut v = device();
        assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
        for (a, b) in &maps {
            assert_eq!(
                send(&mut v, &map(1, p(*a), e(*b), p(*a), RW)),
                Some(Status::Ok)
            );
        }
        assert_eq!(
            send(&mut v, &unmap(1, p(s), e(t))),
            Some(status),
            "{maps:?} unmap {s}-{t}"
        );
        assert_eq!(v.domain_mappings(1).len(), left, "{maps:?} unmap {s}-{t}");
    }
}

#[test]
fn unmap_errors_and_edges() {
    let mut v = device();
    assert_eq!(send(&mut v, &unmap(1, 0, 0xfff)), Some(Status::NoEnt));
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0x1000, 0x2fff, 0, RW)),
        Some(Status::Ok)
    );
    assert_eq!(send(&mut v, &unmap(1, 0x2000, 0x1000)), Some(Status::Inval));
    assert_eq!(
        send(&mut v, &unmap(1, 0x1800, 0x2fff)),
        Some(Status::Range),
        "unaligned start inside"
    );
    assert_eq!(
        send(&mut v, &unmap(1, 0x1000, 0x27ff)),
        Some(Status::Range),
        "unaligned end inside"
    );
    assert_eq!(v.domain_mappings(1).len(), 1);
    assert_eq!(
        send(&mut v, &unmap(1, 0x800, u64::MAX)),
        Some(Status::Ok),
        "to u64::MAX"
    );
    assert!(v.domain_mappings(1).is_empty());
    assert_eq!(
        send(&mut v, &unmap(1, u64::MAX, u64::MAX)),
        Some(Status::Ok)
    );
    assert_eq!(send(&mut v, &unmap(1, 0, u64::MAX)), Some(Status::Ok));
}

#[test]
fn probe_reports_reserved_regions() {
    let mut v = device();
    let req = probe(1);
    let size = v.config().probe_size.get() as usize;
    let r = Request {
        readable: &req,
        readable_len: req.len(),
        writable_len: size + 4,
    };
    let Reply::Written {
        status,
        props,
        tail_offset,
        used_len,
    } = v.process(&[r]).remove(0)
    else {
        panic!("unwritten");
    };
    assert_eq!(status, Status::Ok);
    assert_eq!(tail_offset, size);
    assert_eq!(used_len as usize, size + 4);
    assert_eq!(props.len(), size);
    let (p, _) = <ProbeResvMem as zerocopy::FromBytes>::read_from_prefix(&props[..]).unwrap();
    assert_eq!(p.head.type_.get(), VIRTIO_IOMMU_PROBE_T_RESV_MEM);
    assert_eq!(p.head.length.get(), 20);
    assert_eq!(p.subtype, VIRTIO_IOMMU_RESV_MEM_T_MSI);
    assert_eq!((p.start.get(), p.end.get()), (0xfee0_0000, 0xfeef_ffff));
    assert!(props[24..].iter().all(|&b| b == 0));
    // Too small a properties buffer: INVAL and no property written.
    let r = Request {
        readable: &req,
        readable_len: req.len(),
        writable_len: 20,
    };
    let reply = v.process(&[r]).remove(0);
    assert_eq!(reply.status(), Some(Status::Inval));
    let Reply::Written { props, .. } = reply else {
        panic!()
    };
    assert_eq!(props, vec![0; 16], "no property, only zeros up to the tail");
    let req = probe(42);
    let r = Request {
        readable: &req,
        readable_len: req.len(),
        writable_len: size + 4,
    };
    assert_eq!(v.process(&[r]).remove(0).status(), Some(Status::NoEnt));
}

#[test]
fn malformed_requests() {
    let mut v = device();
    // Unknown type: nothing written, used length 0.
    assert_eq!(send(&mut v, &[9, 0, 0, 0, 1, 2, 3, 4]), None);
    assert_eq!(send(&mut v, &[0, 0, 0, 0]), None);
    // No head.
    assert_eq!(send(&mut v, &[1, 0]), None);
    assert_eq!(send(&mut v, &[]), None);
    // Truncated body with a tail: INVAL.
    assert_eq!(send(&mut v, &attach(1, 1, 0)[..10]), Some(Status::Inval));
    // No room for the tail: nothing written.
    let req = attach(1, 1, 0);
    let r = Request {
        readable: &req,
        readable_len: req.len(),
        writable_len: 3,
    };
    assert_eq!(v.process(&[r]).remove(0), Reply::Unwritten);
    // Oversized readable part: extra bytes ignored.
    let mut big = attach(1, 1, 0);
    big.resize(MAX_READABLE, 0xaa);
    let r = Request {
        readable: &big,
        readable_len: 1 << 20,
        writable_len: 1 << 20,
    };
    let reply = v.process(&[r]).remove(0);
    assert_eq!(reply.status(), Some(Status::Ok));
    let Reply::Written {
        tail_offset,
        used_len,
        ..
    } = reply
    else {
        panic!()
    };
    assert_eq!(
        (tail_offset, used_len),
        (0, 4),
        "the tail starts the writable part"
    );
}

#[test]
fn requests_after_reset_see_a_clean_device() {
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &map(1, 0, 0xfff, 0, RW)), Some(Status::Ok));
    v.reset();
    assert!(v.domain_ids().is_empty());
    assert_eq!(v.endpoint_domain(1), None);
    assert_eq!(send(&mut v, &map(1, 0, 0xfff, 0, RW)), Some(Status::NoEnt));
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert!(v.domain_mappings(1).is_empty());
}

#[test]
fn host_backend_follows_the_guest() {
    let (mut v, log) = with_backend(BackendCaps::default());
    assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0x10000, 0x11fff, 0x5000, R)),
        Some(Status::Ok)
    );
    assert_eq!(
        log.lock().unwrap().calls,
        vec![Call::Map(0x10000, 0x5000, 0x2000, Perm::READ)]
    );
    assert_eq!(send(&mut v, &unmap(1, 0, u64::MAX)), Some(Status::Ok));
    assert!(log.lock().unwrap().pages.is_empty());
    // Re-attach replays the domain's mappings into the backend.
    assert_eq!(
        send(&mut v, &map(1, 0x20000, 0x20fff, 0x9000, RW)),
        Some(Status::Ok)
    );
    assert_eq!(send(&mut v, &attach(2, 2, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(2, 0x40000, 0x40fff, 0xa000, RW)),
        Some(Status::Ok)
    );
    assert_eq!(send(&mut v, &attach(2, 8, 0)), Some(Status::Ok));
    assert_eq!(
        log.lock().unwrap().host_pages(),
        vec![(0x40, 0xa, Perm::RW)]
    );
    assert_eq!(send(&mut v, &detach(2, 8)), Some(Status::Ok));
    assert!(log.lock().unwrap().pages.is_empty());
}

#[test]
fn failed_host_map_rolls_back() {
    let (mut v, log) = with_backend(BackendCaps::default());
    assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
    log.lock().unwrap().fail_iova = Some(0x3000);
    let st = batch(
        &mut v,
        &[
            map(1, 0x1000, 0x1fff, 0x1000, RW),
            map(1, 0x3000, 0x3fff, 0x3000, RW),
            map(1, 0x5000, 0x5fff, 0x5000, RW),
        ],
    );
    assert_eq!(
        st,
        vec![Some(Status::Ok), Some(Status::DevErr), Some(Status::Ok)]
    );
    let m: Vec<u64> = v.domain_mappings(1).iter().map(|m| m.0).collect();
    assert_eq!(m, vec![0x1000, 0x5000], "the failed MAP left no mapping");
    assert_eq!(log.lock().unwrap().host_pages().len(), 2);
    // A failed host call during ATTACH leaves the endpoint where it was.
    log.lock().unwrap().fail_iova = None;
    assert_eq!(send(&mut v, &attach(2, 2, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(2, 0x7000, 0x7fff, 0x7000, RW)),
        Some(Status::Ok)
    );
    let attempts = log.lock().unwrap().attempts;
    // unmap 0x1000, unmap 0x5000, then map 0x7000 fails.
    log.lock().unwrap().fail_call = Some(attempts + 2);
    // A move the host cannot make is UNSUPP (5.13.6.1).
    assert_eq!(send(&mut v, &attach(2, 8, 0)), Some(Status::Unsupp));
    assert_eq!(v.endpoint_domain(8), Some(1));
    let hp: Vec<u64> = log
        .lock()
        .unwrap()
        .host_pages()
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(hp, vec![1, 5], "host content restored");
}

#[test]
fn merged_host_maps_for_splittable_backends() {
    let caps = BackendCaps {
        merge_maps: true,
        merge_unmaps: true,
        ..Default::default()
    };
    let (mut v, log) = with_backend(caps);
    assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
    let reqs: Vec<Vec<u8>> = (0..16u64)
        .map(|i| {
            map(
                1,
                0x100000 + i * 0x1000,
                0x100fff + i * 0x1000,
                0x200000 + i * 0x1000,
                RW,
            )
        })
        .collect();
    assert!(batch(&mut v, &reqs).iter().all(|s| *s == Some(Status::Ok)));
    assert_eq!(
        log.lock().unwrap().map_calls(),
        1,
        "16 contiguous MAPs, one host call"
    );
    assert_eq!(v.domain_mappings(1).len(), 16, "still 16 guest mappings");
    assert_eq!(
        send(&mut v, &unmap(1, 0x105000, 0x105fff)),
        Some(Status::Ok)
    );
    assert_eq!(log.lock().unwrap().host_pages().len(), 15);
    // A failing page inside a merged run fails only its own request.
    log.lock().unwrap().fail_iova = Some(0x304000);
    let reqs: Vec<Vec<u8>> = (0..8u64)
        .map(|i| {
            map(
                1,
                0x300000 + i * 0x1000,
                0x300fff + i * 0x1000,
                0x400000 + i * 0x1000,
                RW,
            )
        })
        .collect();
    let st = batch(&mut v, &reqs);
    assert_eq!(st.iter().filter(|s| **s == Some(Status::Ok)).count(), 7);
    assert_eq!(st[4], Some(Status::DevErr));
}

#[test]
fn bypass_maps_guest_ram_into_backends() {
    let (mut v, log) = with_backend(BackendCaps::default());
    assert!(
        log.lock().unwrap().pages.is_empty(),
        "bypass off: nothing mapped"
    );
    v.set_bypass(1);
    assert_eq!(log.lock().unwrap().pages.len(), (1 << 30) / 4096);
    let mut out = Vec::new();
    v.translate(1, 0x1234, 10, Access::Write, &mut out).unwrap();
    assert_eq!(out, vec![(0x1234, 10)]);
    assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
    assert!(
        log.lock().unwrap().pages.is_empty(),
        "attached: only the domain's mappings"
    );
    assert_eq!(
        send(&mut v, &attach(2, 8, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Some(Status::Ok)
    );
    assert_eq!(log.lock().unwrap().pages.len(), (1 << 30) / 4096);
    v.set_bypass(0);
    v.reset();
    assert!(log.lock().unwrap().pages.is_empty());
}

#[test]
fn write_to_read_only_faults() {
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0, 0x1fff, 0x10000, R)),
        Some(Status::Ok)
    );
    let mut out = Vec::new();
    v.translate(1, 0x100, 0x1000, Access::Read, &mut out)
        .unwrap();
    let f = v
        .translate(1, 0x100, 0x1000, Access::Write, &mut out)
        .unwrap_err();
    assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(
        f.flags.get() & VIRTIO_IOMMU_FAULT_F_WRITE,
        VIRTIO_IOMMU_FAULT_F_WRITE
    );
    // A range running past the mapping faults at the first unmapped byte.
    let f = v
        .translate(1, 0x1800, 0x1000, Access::Read, &mut out)
        .unwrap_err();
    assert_eq!(f.address.get(), 0x2000);
    assert_eq!(
        v.translate(1, u64::MAX, 2, Access::Read, &mut out)
            .unwrap_err()
            .reason,
        VIRTIO_IOMMU_FAULT_R_MAPPING
    );
    assert_eq!(v.counters().faults, 3);
}

#[test]
fn shared_backend_endpoints_stay_together() {
    let mut v = device();
    let (b, _log) = RecordingBackend::new("shared", BackendCaps::default());
    let id = v.add_backend(Box::new(b)).unwrap();
    v.add_endpoint(10, Some(id), &[]).unwrap();
    v.add_endpoint(11, Some(id), &[]).unwrap();
    assert_eq!(send(&mut v, &attach(1, 10, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &attach(2, 11, 0)), Some(Status::Unsupp));
    assert_eq!(send(&mut v, &attach(1, 11, 0)), Some(Status::Ok));
}

#[test]
fn backend_caps_narrow_the_config() {
    let mut v = device();
    let caps = BackendCaps {
        page_size_mask: 0x1000 | 0x20_0000,
        iova_ranges: vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)],
        ..Default::default()
    };
    let (b, _) = RecordingBackend::new("narrow", caps);
    let id = v.add_backend(Box::new(b)).unwrap();
    v.add_endpoint(9, Some(id), &[]).unwrap();
    let c = v.config();
    assert_eq!(c.page_size_mask.get(), 0x1000 | 0x20_0000);
    assert_eq!(c.input_range.end.get(), (1 << 39) - 1);
    let (b, _) = RecordingBackend::new(
        "big",
        BackendCaps {
            page_size_mask: 0x10000,
            ..Default::default()
        },
    );
    assert!(matches!(
        v.add_backend(Box::new(b)),
        Err(SetupError::PageSizes(..))
    ));
    // The hole becomes a RESERVED region of that endpoint.
    assert_eq!(send(&mut v, &attach(1, 9, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0xfee0_0000, 0xfeef_ffff, 0, RW)),
        Some(Status::Inval)
    );
    assert_eq!(
        send(&mut v, &map(1, 1 << 39, (1 << 39) + 0xfff, 0, RW)),
        Some(Status::Range)
    );
}

#[test]
fn metadata_budget_gives_nomem() {
    let mut v = Viommu::new(ViommuConfig {
        metadata_budget: 64 << 10,
        ..Default::default()
    });
    v.add_endpoint(1, None, &[]).unwrap();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    let mut last = Status::Ok;
    for i in 0..64u64 {
        // 2 MiB each, to a GPA not 2 MiB aligned: 512 pages, not one huge entry.
        let s = send(&mut v, &map(1, i << 30, (i << 30) + 0x1f_ffff, 0x1000, RW)).unwrap();
        if s != Status::Ok {
            last = s;
            break;
        }
    }
    assert_eq!(last, Status::NoMem);
    assert!(v.metadata_bytes() <= 64 << 10);
}

mod resv_split {
    use proptest::prelude::*;

    use super::*;

    fn region(start: u64, len: u64, subtype: u8) -> ResvRegion {
        ResvRegion {
            start,
            end: start + (len - 1),
            subtype,
        }
    }

    #[test]
    fn edges() {
        let hole = region(10, 11, 0); // 10..=20
        let cut = |remove: &[ResvRegion]| subtract_regions(&[hole], remove);
        assert_eq!(cut(&[]), vec![hole]);
        assert_eq!(cut(&[region(10, 11, 1)]), vec![], "covered exactly");
        assert_eq!(cut(&[region(0, 100, 1)]), vec![], "covered more");
        assert_eq!(
            cut(&[region(10, 1, 1)]),
            vec![region(11, 10, 0)],
            "first address"
        );
        assert_eq!(
            cut(&[region(20, 1, 1)]),
            vec![region(10, 10, 0)],
            "last address"
        );
        assert_eq!(
            cut(&[region(12, 2, 1), region(16, 1, 1)]),
            vec![region(10, 2, 0), region(14, 2, 0), region(17, 4, 0)]
        );
        let top = ResvRegion {
            start: u64::MAX - 9,
            end: u64::MAX,
            subtype: 0,
        };
        assert_eq!(subtract_regions(&[top], &[top]), vec![]);
        assert_eq!(
            subtract_regions(&[top], &[region(u64::MAX - 4, 5, 1)]),
            vec![region(u64::MAX - 9, 5, 0)]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: crate::testing::cases(256),
            ..ProptestConfig::default()
        })]

        /// Against a per-address model: the pieces cover exactly the addresses of the
        /// regions outside the removed ones, keep their subtype, and do not overlap.
        #[test]
        fn subtraction_matches_a_model(
            holes in proptest::collection::vec((0u64..64, 1u64..16), 0..4),
            fixed in proptest::collection::vec((0u64..64, 1u64..16), 0..4),
        ) {
            let disjoint = |v: &[(u64, u64)], subtype: u8| {
                let mut out: Vec<ResvRegion> = Vec::new();
                let mut sorted = v.to_vec();
                sorted.sort();
                for &(s, l) in &sorted {
                    if out.last().is_none_or(|r| r.end < s) {
                        out.push(region(s, l, subtype));
                    }
                }
                out
            };
            let holes = disjoint(&holes, 0);
            let fixed = disjoint(&fixed, 1);
            let got = subtract_regions(&holes, &fixed);
            let inside = |rs: &[ResvRegion], a: u64| rs.iter().any(|r| r.start <= a && a <= r.end);
            for a in 0..100u64 {
                prop_assert_eq!(inside(&got, a), inside(&holes, a) && !inside(&fixed, a), "address {}", a);
            }
            prop_assert!(got.iter().all(|r| r.subtype == 0 && r.start <= r.end));
            prop_assert!(got.windows(2).all(|w| w[0].end < w[1].start));
        }
    }
}

/// `aw-bits` and `domains` (the VMM's `--iommu` options) reach the config space and bound
/// what the guest may use; a saved state that does not fit them is refused.
#[test]
fn input_width_and_domain_count_are_advertised_and_enforced() {
    let cfg = |aw, doms| ViommuConfig::default().with_widths(aw, doms);
    let c = Viommu::new(cfg(39, 8)).config();
    assert_eq!(c.input_range.start.get(), 0);
    assert_eq!(c.input_range.end.get(), (1 << 39) - 1);
    assert_eq!(
        (c.domain_range.start.get(), c.domain_range.end.get()),
        (0, 7)
    );
    let c = Viommu::new(cfg(64, 1 << 32)).config();
    assert_eq!(
        c.input_range.end.get(),
        MAX_IOVA,
        "narrowed to the table's width"
    );
    assert_eq!(c.domain_range.end.get(), u32::MAX);
    assert_eq!(
        Viommu::new(cfg(32, 1)).config().input_range.end.get(),
        0xffff_ffff
    );

    let mut wide = Viommu::new(ViommuConfig::default());
    wide.add_endpoint(8, None, &[]).unwrap();
    assert_eq!(send(&mut wide, &attach(9, 8, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut wide, &map(9, 1 << 40, (1 << 40) + 0xfff, 0, RW)),
        Some(Status::Ok)
    );

    let mut v = Viommu::new(cfg(39, 8));
    v.add_endpoint(8, None, &[]).unwrap();
    assert_eq!(send(&mut v, &attach(8, 8, 0)), Some(Status::Range));
    assert_eq!(send(&mut v, &attach(7, 8, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(7, 1 << 39, (1 << 39) + 0xfff, 0, RW)),
        Some(Status::Range)
    );
    assert_eq!(
        send(&mut v, &map(7, (1 << 39) - 0x1000, (1 << 39) - 1, 0, RW)),
        Some(Status::Ok)
    );
    // Migrating the wide device's state here: domain 9 does not exist on this side.
    let saved = wide.save_state();
    assert_eq!(
        v.restore_state(&saved),
        Err(RestoreError::DomainOutOfRange(9))
    );
    let mut in_range = saved.clone();
    in_range.domains[0].id = 1;
    in_range.attached[0].1 = 1;
    assert!(matches!(
        v.restore_state(&in_range),
        Err(RestoreError::BadMapping(1, _, 1))
    ));
    assert_eq!(v.domain_ids(), vec![7], "refused restores change nothing");
}

/// Device-side statements of 5.13.3-4 and 5.13.6.6-7 that are about what the device
/// presents: features offered, `bypass` values and resets, one MSI region, reserved fields
/// of fault reports.
#[test]
fn what_the_device_presents() {
    use features::*;
    let v = device();
    let f = v.offered_features();
    // 5.13.3: "The device SHOULD offer feature bit VIRTIO_IOMMU_F_MAP_UNMAP." "New devices
    // SHOULD NOT offer VIRTIO_IOMMU_F_BYPASS." "Devices SHOULD NOT offer both."
    assert_ne!(f & (1 << VIRTIO_IOMMU_F_MAP_UNMAP), 0);
    assert_eq!(f & (1 << VIRTIO_IOMMU_F_BYPASS), 0);
    assert_ne!(f & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG), 0);
    // 5.13.4: "The device MUST set at least one bit in page_size_mask."
    assert_ne!(v.config().page_size_mask.get(), 0);
    // "The device MUST NOT present a value different than 0 or 1 in bypass." "bypass SHOULD
    // NOT change on device reset, but SHOULD be restored to its initial value on system
    // reset."
    let mut v = device();
    v.set_bypass(0xff);
    assert_eq!(v.config().bypass, 1);
    v.reset();
    assert_eq!(v.config().bypass, 1, "device reset keeps bypass");
    v.system_reset();
    assert_eq!(v.config().bypass, 0, "system reset restores it");
    // 5.13.6.6.1: "The device SHOULD NOT present more than one VIRTIO_IOMMU_RESV_MEM_T_MSI
    // property per endpoint."
    let second = ResvRegion {
        start: 0x1000_0000,
        end: 0x1000_0fff,
        subtype: VIRTIO_IOMMU_RESV_MEM_T_MSI,
    };
    assert_eq!(
        v.add_endpoint(7, None, &[second]),
        Err(SetupError::SecondMsiRegion(7))
    );
    // 5.13.6.7: "The device SHOULD set reserved and reserved1 to zero." "The device SHOULD
    // set undefined flags to zero." "The device SHOULD write a valid endpoint ID."
    let mut out = Translation::default();
    assert!(v.translate(1, 0x1000, 4, Access::Read, &mut out).is_err());
    let fault = v.pop_fault().unwrap();
    assert_eq!((fault.reserved, fault.reserved1), ([0; 3], [0; 4]));
    assert_eq!(
        fault.flags.get()
            & !(VIRTIO_IOMMU_FAULT_F_READ
                | VIRTIO_IOMMU_FAULT_F_WRITE
                | VIRTIO_IOMMU_FAULT_F_ADDRESS),
        0
    );
    assert_eq!(fault.endpoint.get(), 1);
}

/// 5.13.6.1: "If properties of the endpoint (obtained with a PROBE request) are compatible
/// with properties of other endpoints already attached to the requested domain, then the
/// device SHOULD attach the endpoint. Otherwise the device SHOULD reject the request and set
/// status to VIRTIO_IOMMU_S_UNSUPP." A domain that maps inside the endpoint's reserved region
/// is incompatible; one that does not is compatible.
#[test]
fn attach_refuses_a_domain_mapping_the_endpoint_reserved_region() {
    let mut v = device();
    let resv = ResvRegion {
        start: 0x1000_0000,
        end: 0x1000_ffff,
        subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
    };
    v.add_endpoint(20, None, &[resv]).unwrap();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &attach(2, 2, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0x1000_f000, 0x1001_0fff, 0, RW)),
        Some(Status::Ok)
    );
    assert_eq!(
        send(&mut v, &map(2, 0x1001_0000, 0x1001_0fff, 0, RW)),
        Some(Status::Ok)
    );
    assert_eq!(send(&mut v, &attach(1, 20, 0)), Some(Status::Unsupp));
    assert_eq!(v.endpoint_domain(20), None);
    assert_eq!(send(&mut v, &attach(2, 20, 0)), Some(Status::Ok));
    // And the reserved region now refuses MAPs in that domain.
    assert_eq!(
        send(&mut v, &map(2, 0x1000_0000, 0x1000_0fff, 0, RW)),
        Some(Status::Inval)
    );
}

/// Reserved fields the device ignores (UNMAP MAY, PROBE MUST), and fault events beyond
/// [`MAX_PENDING_FAULTS`] dropped and counted ("If no buffer is available, the device can
/// either wait for one to be consumed, or drop the event").
#[test]
fn ignored_reserved_fields_and_bounded_fault_queue() {
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &map(1, 0, 0xfff, 0, RW)), Some(Status::Ok));
    let mut u = unmap(1, 0, 0xfff);
    let n = u.len();
    u[n - 4..].copy_from_slice(&[1, 2, 3, 4]);
    assert_eq!(send(&mut v, &u), Some(Status::Ok));
    assert!(
        v.domain_mappings(1).is_empty(),
        "UNMAP with reserved bytes still unmaps"
    );
    let mut p = probe(1);
    p[8..72].fill(0xff);
    let size = v.config().probe_size.get() as usize;
    let r = Request {
        readable: &p,
        readable_len: p.len(),
        writable_len: size + 4,
    };
    assert_eq!(v.process(&[r])[0].status(), Some(Status::Ok));

    let mut out = Translation::default();
    for i in 0..MAX_PENDING_FAULTS as u64 + 5 {
        let _ = v.translate(1, 0x10_0000 + i * 0x1000, 1, Access::Read, &mut out);
    }
    assert_eq!(v.counters().faults, MAX_PENDING_FAULTS as u64 + 5);
    assert_eq!(v.counters().faults_dropped, 5);
    let mut kept = 0;
    while let Some(f) = v.pop_fault() {
        assert_eq!(
            f.address.get(),
            0x10_0000 + kept * 0x1000,
            "the oldest are kept"
        );
        kept += 1;
    }
    assert_eq!(kept, MAX_PENDING_FAULTS as u64);
}

/// A run of UNMAPs in one batch is one host call where the backend can merge unmaps; when
/// that call fails, each UNMAP is retried alone and only the one whose own call fails gets
/// the error and keeps its mapping. An UNMAP of pages an earlier UNMAP of the batch still
/// holds sees the table as if that one were done.
#[test]
fn consecutive_unmaps_merge_and_fail_alone() {
    let caps = BackendCaps {
        merge_unmaps: true,
        ..Default::default()
    };
    let (mut v, log) = with_backend(caps);
    assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
    let maps: Vec<Vec<u8>> = (0..16u64)
        .map(|i| {
            map(
                1,
                i * 0x1000,
                i * 0x1000 + 0xfff,
                0x10_0000 + i * 0x1000,
                RW,
            )
        })
        .collect();
    assert!(batch(&mut v, &maps).iter().all(|s| *s == Some(Status::Ok)));
    let unmaps: Vec<Vec<u8>> = (0..16u64)
        .map(|i| unmap(1, i * 0x1000, i * 0x1000 + 0xfff))
        .collect();
    let before = log.lock().unwrap().unmap_calls();
    assert!(batch(&mut v, &unmaps)
        .iter()
        .all(|s| *s == Some(Status::Ok)));
    assert_eq!(
        log.lock().unwrap().unmap_calls() - before,
        1,
        "one host call for 16"
    );
    assert!(v.domain_mappings(1).is_empty());
    assert!(log.lock().unwrap().host_pages().is_empty());

    // A failing page: the merged call fails, the retries fail only request 5.
    assert!(batch(&mut v, &maps).iter().all(|s| *s == Some(Status::Ok)));
    log.lock().unwrap().fail_unmap_iova = Some(5 * 0x1000);
    let st = batch(&mut v, &unmaps);
    for (i, s) in st.iter().enumerate() {
        let want = if i == 5 { Status::DevErr } else { Status::Ok };
        assert_eq!(*s, Some(want), "request {i}");
    }
    assert_eq!(
        v.domain_mappings(1),
        vec![(0x5000, 0x10_5000, 0x1000, Perm::RW)]
    );
    assert_eq!(log.lock().unwrap().host_pages(), vec![(5, 0x105, Perm::RW)]);
    log.lock().unwrap().fail_unmap_iova = None;

    // UNMAP, MAP again and UNMAP the same page in one batch: in order.
    let st = batch(
        &mut v,
        &[
            unmap(1, 0x5000, 0x5fff),
            unmap(1, 0x5000, 0x5fff),
            map(1, 0x5000, 0x5fff, 0x20_0000, R),
            unmap(1, 0x4000, 0x6fff),
        ],
    );
    assert_eq!(st, vec![Some(Status::Ok); 4]);
    assert!(v.domain_mappings(1).is_empty());
    assert!(log.lock().unwrap().host_pages().is_empty());
}

/// Endpoints added while `bypass` is on reach guest RAM at once, through their backend; a
/// second endpoint on the same backend does not map it again.
#[test]
fn endpoints_added_in_bypass_are_identity_mapped_once() {
    let mut v = Viommu::new(ViommuConfig {
        guest_ram: vec![(0, 1 << 24)],
        bypass: true,
        ..Default::default()
    });
    let (b, log) = RecordingBackend::new("rec", BackendCaps::default());
    let id = v.add_backend(Box::new(b)).unwrap();
    assert!(log.lock().unwrap().calls.is_empty(), "no endpoint yet");
    v.add_endpoint(8, Some(id), &[]).unwrap();
    assert_eq!(log.lock().unwrap().pages.len(), (1 << 24) / 4096);
    let calls = log.lock().unwrap().calls.len();
    v.add_endpoint(9, Some(id), &[]).unwrap();
    assert_eq!(log.lock().unwrap().calls.len(), calls, "already mapped");
    // Bypass off and on again with both endpoints unattached: one switch each way.
    v.set_bypass(0);
    assert!(log.lock().unwrap().pages.is_empty());
    v.set_bypass(1);
    assert_eq!(log.lock().unwrap().pages.len(), (1 << 24) / 4096);
    // One endpoint attached: the backend holds the domain's mappings, not RAM.
    assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
    assert!(log.lock().unwrap().pages.is_empty());
    v.set_bypass(0);
    v.set_bypass(1);
    assert!(log.lock().unwrap().pages.is_empty(), "in use by the domain");
    // Without bypass, nothing is mapped for a new endpoint.
    let (mut v, log) = with_backend(BackendCaps::default());
    assert!(log.lock().unwrap().calls.is_empty());
    assert!(v.has_endpoint(8) && v.has_endpoint(1) && !v.has_endpoint(3));
    v.add_endpoint(3, None, &[]).unwrap();
    assert!(v.has_endpoint(3));
}

/// `bypass` takes bit 0 of what the driver writes (5.13.4: bits 1-7 ignored).
#[test]
fn bypass_writes_take_bit_zero() {
    let mut v = device();
    for (value, on) in [(1u8, 1u8), (0, 0), (3, 1), (2, 0), (0xfe, 0), (0x81, 1)] {
        v.set_bypass(value);
        assert_eq!(v.config().bypass, on, "wrote {value:#x}");
    }
}

/// A backend's page sizes and IOVA ranges narrow the device's; one the device cannot use is
/// refused with the reason.
#[test]
fn backends_narrow_page_sizes_and_ranges_or_are_refused() {
    let caps = |mask: u64, ranges: Vec<(u64, u64)>| BackendCaps {
        page_size_mask: mask,
        iova_ranges: ranges,
        ..BackendCaps::default()
    };
    let add = |v: &mut Viommu, c: BackendCaps| {
        let (b, _) = RecordingBackend::new("rec", c);
        v.add_backend(Box::new(b))
    };
    let mut v = device();
    // 2 MiB pages only: the 4 KiB granule is gone.
    assert!(matches!(
        add(&mut v, caps(0x20_0000, vec![(0, 1 << 40)])),
        Err(SetupError::Granule(_))
    ));
    // 4 KiB and 2 MiB: the device keeps its 4 KiB granule.
    assert!(add(&mut v, caps(0x1000 | 0x20_0000, vec![(0, 1 << 40)])).is_ok());
    assert!(matches!(
        add(&mut v, caps(0x40_0000_0000, vec![(0, 1 << 40)])),
        Err(SetupError::PageSizes(..))
    ));
    // A range of one byte is still a range; an inverted one is none.
    assert!(add(&mut v, caps(0x1000, vec![(0x10_0000, 0x10_0000)])).is_ok());
    assert_eq!(v.config().input_range.start.get(), 0x10_0000);
    assert_eq!(v.config().input_range.end.get(), 0x10_0000);
    let mut v = device();
    assert!(matches!(
        add(&mut v, caps(0x1000, vec![(0x20_0000, 0x10_0000)])),
        Err(SetupError::NoIovaRange(_))
    ));
    // Several ranges: from the lowest start to the highest end.
    assert!(add(
        &mut v,
        caps(0x1000, vec![(0x8000, 0xffff), (0x1000, 0x1fff)])
    )
    .is_ok());
    assert_eq!(v.config().input_range.start.get(), 0x1000);
    assert_eq!(v.config().input_range.end.get(), 0xffff);
}

/// The accessors the devices and the VMM read: mapped pages per domain, metadata, faults.
#[test]
fn domain_pages_metadata_and_fault_queue() {
    let mut v = device();
    assert_eq!(v.domain_mapped_pages(1), None);
    let empty = v.metadata_bytes();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(v.domain_mapped_pages(1), Some(0));
    assert_eq!(
        send(&mut v, &map(1, 0x10000, 0x12fff, 0x80000, RW)),
        Some(Status::Ok)
    );
    assert_eq!(v.domain_mapped_pages(1), Some(3));
    assert!(v.metadata_bytes() > empty);
    assert!(!v.has_faults());
    let mut out = Vec::new();
    let f = v
        .translate(1, 0x20000, 4, Access::Read, &mut out)
        .unwrap_err();
    assert!(v.has_faults());
    let first = v.pop_fault().unwrap();
    assert_eq!(first.address.get(), f.address.get());
    assert!(!v.has_faults());
    v.unpop_fault(first);
    assert!(v.has_faults());
    assert_eq!(v.pop_fault().unwrap().address.get(), 0x20000);
}

/// Without `VIRTIO_IOMMU_F_BYPASS_CONFIG` offered, writes to `bypass` are ignored (5.13.4);
/// every notification counts one batch.
#[test]
fn bypass_writes_need_the_feature_and_batches_are_counted() {
    let mut v = Viommu::new(ViommuConfig {
        features: ViommuConfig::default().features & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG),
        ..Default::default()
    });
    v.set_bypass(1);
    assert_eq!(v.config().bypass, 0);
    assert_eq!(v.counters().batches, 0);
    v.add_endpoint(1, None, &[]).unwrap();
    send(&mut v, &attach(1, 1, 0));
    batch(&mut v, &[detach(1, 1), attach(1, 1, 0)]);
    assert_eq!(v.counters().batches, 2);
    // Per type: attach, detach, map, unmap, probe, invalid.
    assert_eq!(v.counters().requests, [2, 1, 0, 0, 0, 0]);
    assert_eq!(v.counters().statuses[Status::Ok as usize], 3);
    assert_eq!(v.counters().statuses.iter().sum::<u64>(), 3);
    // Unparseable requests are counted as invalid and left unwritten: no head, an unknown
    // type, no room for the tail.
    let one = |v: &mut Viommu, readable: &[u8], readable_len: usize, writable_len: usize| {
        let r = Request {
            readable,
            readable_len,
            writable_len,
        };
        v.process(&[r]).remove(0).status()
    };
    let mut unknown = detach(1, 1);
    unknown[0] = 9;
    assert_eq!(one(&mut v, &detach(1, 1), 2, 4), None);
    assert_eq!(one(&mut v, &unknown, unknown.len(), 4), None);
    assert_eq!(one(&mut v, &detach(1, 1), detach(1, 1).len(), 2), None);
    assert_eq!(v.counters().requests, [2, 1, 0, 0, 0, 3]);
    // A PROBE whose writable part has room for the tail but not for `probe_size` bytes of
    // properties before it is INVAL.
    let size = v.probe_size() as usize;
    assert_eq!(
        one(&mut v, &probe(1), probe(1).len(), size + 2),
        Some(Status::Inval)
    );
    assert_eq!(
        one(&mut v, &probe(1), probe(1).len(), size + 4),
        Some(Status::Ok)
    );
}

/// A backend's usable IOVA ranges leave holes that PROBE reports as reserved regions.
#[test]
fn host_holes_are_the_gaps_between_usable_ranges() {
    let hole = |start, end| ResvRegion {
        start,
        end,
        subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
    };
    let input = (0x1000, 0xf_ffff);
    // Unsorted, with a gap at the start, between them and at the end.
    assert_eq!(
        host_holes(&[(0x8000, 0xffff), (0x2000, 0x3fff)], input),
        vec![
            hole(0x1000, 0x1fff),
            hole(0x4000, 0x7fff),
            hole(0x1_0000, 0xf_ffff)
        ]
    );
    // Ranges that cover the input, overlap or touch leave none.
    assert_eq!(
        host_holes(&[(0, 0x7_ffff), (0x8_0000, u64::MAX)], input),
        vec![]
    );
    assert_eq!(
        host_holes(&[(0, 0x5_ffff), (0x4_0000, 0xf_ffff)], input),
        vec![]
    );
    // A range beyond the input: the hole is clipped to the input.
    assert_eq!(
        host_holes(&[(0x1000, 0x1fff), (0x20_0000, 0x2f_ffff)], input),
        vec![hole(0x2000, 0xf_ffff)]
    );
    // A range ending exactly at the input's end, and one ending at the top of the space.
    assert_eq!(host_holes(&[(0x1000, 0xf_ffff)], input), vec![]);
    assert_eq!(
        host_holes(&[(0x2000, u64::MAX)], input),
        vec![hole(0x1000, 0x1fff)]
    );
    assert_eq!(host_holes(&[], input), vec![hole(0x1000, 0xf_ffff)]);
}

/// PROBE's room grows with the endpoint that has the most reserved regions.
#[test]
fn probe_size_fits_the_most_reserved_regions() {
    let mut v = device();
    assert_eq!(v.config().probe_size.get(), 512);
    let many: Vec<ResvRegion> = (0..40u64)
        .map(|i| ResvRegion {
            start: i << 20,
            end: (i << 20) + 0xfff,
            subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
        })
        .collect();
    v.add_endpoint(3, None, &many).unwrap();
    // The 40 and the MSI region every endpoint has.
    let need = 41 * std::mem::size_of::<ProbeResvMem>() as u32;
    assert!(need > 512);
    assert_eq!(v.config().probe_size.get(), need.next_multiple_of(64));
}

/// An endpoint with a backend joining a domain that already maps pages gets them in as few
/// host calls as its backend allows: runs contiguous in IOVA and GPA with one permission
/// merge, anything else stays apart; leaving unmaps them the same way.
#[test]
fn joining_a_populated_domain_maps_merged_runs() {
    for merge in [true, false] {
        let (mut v, log) = with_backend(BackendCaps {
            merge_maps: merge,
            merge_unmaps: merge,
            ..Default::default()
        });
        // Endpoint 1 (no backend) populates domain 1 first.
        assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
        for req in [
            map(1, 0x10000, 0x10fff, 0x200000, RW),
            map(1, 0x11000, 0x12fff, 0x201000, RW),
            // Contiguous in IOVA, not in GPA.
            map(1, 0x13000, 0x13fff, 0x400000, RW),
            // Contiguous in both, another permission.
            map(1, 0x14000, 0x14fff, 0x401000, R),
            // Contiguous in GPA, not in IOVA.
            map(1, 0x20000, 0x20fff, 0x402000, R),
        ] {
            assert_eq!(send(&mut v, &req), Some(Status::Ok));
        }
        let host_maps = v.counters().host_maps;
        assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
        let calls = log.lock().unwrap().calls.clone();
        let want = if merge {
            vec![
                Call::Map(0x10000, 0x200000, 0x3000, Perm::RW),
                Call::Map(0x13000, 0x400000, 0x1000, Perm::RW),
                Call::Map(0x14000, 0x401000, 0x1000, Perm::READ),
                Call::Map(0x20000, 0x402000, 0x1000, Perm::READ),
            ]
        } else {
            vec![
                Call::Map(0x10000, 0x200000, 0x1000, Perm::RW),
                Call::Map(0x11000, 0x201000, 0x2000, Perm::RW),
                Call::Map(0x13000, 0x400000, 0x1000, Perm::RW),
                Call::Map(0x14000, 0x401000, 0x1000, Perm::READ),
                Call::Map(0x20000, 0x402000, 0x1000, Perm::READ),
            ]
        };
        assert_eq!(calls, want, "merge {merge}");
        assert_eq!(v.counters().host_maps - host_maps, want.len() as u64);

        // Leaving: the same runs unmapped (touching ones merged when allowed).
        let host_unmaps = v.counters().host_unmaps;
        assert_eq!(send(&mut v, &detach(1, 8)), Some(Status::Ok));
        let calls = log.lock().unwrap().calls[want.len()..].to_vec();
        let want = if merge {
            vec![Call::Unmap(0x10000, 0x5000), Call::Unmap(0x20000, 0x1000)]
        } else {
            vec![
                Call::Unmap(0x10000, 0x1000),
                Call::Unmap(0x11000, 0x2000),
                Call::Unmap(0x13000, 0x1000),
                Call::Unmap(0x14000, 0x1000),
                Call::Unmap(0x20000, 0x1000),
            ]
        };
        assert_eq!(calls, want, "merge {merge}");
        assert_eq!(v.counters().host_unmaps - host_unmaps, want.len() as u64);
        assert!(log.lock().unwrap().host_pages().is_empty());
    }
}

/// An UNMAP overlapping one deferred earlier in the batch sees the table as the guest
/// expects: the earlier one is settled first, and no host range is unmapped twice.
#[test]
fn overlapping_unmaps_in_one_batch_settle_in_order() {
    let (mut v, log) = with_backend(BackendCaps {
        merge_maps: true,
        merge_unmaps: true,
        ..Default::default()
    });
    assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
    assert_eq!(
        batch(
            &mut v,
            &[
                map(1, 0x10000, 0x10fff, 0x200000, RW),
                map(1, 0x11000, 0x11fff, 0x300000, RW),
                map(1, 0x12000, 0x12fff, 0x400000, RW),
            ]
        ),
        vec![Some(Status::Ok); 3]
    );
    let before = log.lock().unwrap().calls.len();
    let host_unmaps = v.counters().host_unmaps;
    assert_eq!(
        batch(
            &mut v,
            &[
                unmap(1, 0x10000, 0x10fff),
                unmap(1, 0x10000, 0x11fff),
                unmap(1, 0x12000, 0x12fff),
            ]
        ),
        vec![Some(Status::Ok); 3]
    );
    // The second UNMAP overlaps the first: the first is settled alone; the second (now only
    // the second page) and the third touch and merge.
    assert_eq!(
        log.lock().unwrap().calls[before..].to_vec(),
        vec![Call::Unmap(0x10000, 0x1000), Call::Unmap(0x11000, 0x2000)]
    );
    assert_eq!(v.counters().host_unmaps - host_unmaps, 2);
    assert!(log.lock().unwrap().host_pages().is_empty());
    assert_eq!(v.domain_mapped_pages(1), Some(0));
}

/// At the domain limit, moving an endpoint to a new domain is allowed when the move frees
/// its old domain (it was the last endpoint there), and refused when it does not.
#[test]
fn a_move_that_frees_its_old_domain_fits_under_the_limit() {
    let mut v = Viommu::new(ViommuConfig {
        guest_ram: vec![(0, 1 << 30)],
        max_domains: 2,
        ..Default::default()
    });
    for ep in [1, 2, 3] {
        v.add_endpoint(ep, None, &[]).unwrap();
    }
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &attach(2, 2, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &attach(3, 3, 0)), Some(Status::NoMem));
    // Endpoint 1 alone in domain 1: moving it to domain 3 frees domain 1.
    assert_eq!(send(&mut v, &attach(3, 1, 0)), Some(Status::Ok));
    assert_eq!(v.domain_mapped_pages(1), None);
    // Endpoint 3 joins domain 2, which then has two: moving endpoint 2 frees nothing.
    assert_eq!(send(&mut v, &attach(2, 3, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &attach(4, 2, 0)), Some(Status::NoMem));
    assert_eq!(v.endpoint_domain(2), Some(2));
}

/// A device that reports a write to a read-only mapping has its bit counted as reported,
/// never as a dirty page.
#[test]
fn a_reported_write_to_a_read_only_mapping_is_not_dirty() {
    let (mut v, log) = with_backend(BackendCaps {
        dirty_tracking: true,
        ..Default::default()
    });
    v.start_dirty_tracking();
    send(&mut v, &attach(1, 8, 0));
    send(&mut v, &map(1, 0x10000, 0x10fff, 0x300000, R));
    send(&mut v, &map(1, 0x11000, 0x11fff, 0x400000, RW));
    log.lock().unwrap().dirty.extend([0x10, 0x11]);
    let reported = v.counters().dirty_pages_reported;
    let mut b = crate::dirty::DirtyBitmap::new(&[(0, 1 << 30)]);
    v.harvest_dirty(&mut b);
    assert_eq!(b.runs(), vec![(0x400000, 0x1000)]);
    assert_eq!(v.counters().dirty_pages_reported - reported, 2);
}

/// Endpoints sharing a backend share its host mappings: detaching one leaves them for the
/// other; detaching the last removes them.
#[test]
fn detaching_one_of_two_endpoints_on_a_backend_keeps_its_host_mappings() {
    let mut v = device();
    let (b, log) = RecordingBackend::new("shared", BackendCaps::default());
    let id = v.add_backend(Box::new(b)).unwrap();
    v.add_endpoint(10, Some(id), &[]).unwrap();
    v.add_endpoint(11, Some(id), &[]).unwrap();
    assert_eq!(send(&mut v, &attach(1, 10, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &attach(1, 11, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0x10000, 0x10fff, 0x200000, RW)),
        Some(Status::Ok)
    );
    assert_eq!(send(&mut v, &detach(1, 10)), Some(Status::Ok));
    assert_eq!(
        log.lock().unwrap().host_pages(),
        vec![(0x10, 0x200, Perm::RW)]
    );
    assert_eq!(send(&mut v, &detach(1, 11)), Some(Status::Ok));
    assert!(log.lock().unwrap().host_pages().is_empty());
}

/// Two backends behind one domain: a MAP reaches both; when the second refuses it, the first
/// is rolled back and the request fails. Pending MAPs of different domains never merge, even
/// when contiguous.
#[test]
fn maps_reach_every_backend_of_a_domain_and_roll_back_together() {
    let caps = BackendCaps {
        merge_maps: true,
        ..Default::default()
    };
    let mut v = device();
    let (a, log_a) = RecordingBackend::new("a", caps.clone());
    let (b, log_b) = RecordingBackend::new("b", caps);
    let a = v.add_backend(Box::new(a)).unwrap();
    let b = v.add_backend(Box::new(b)).unwrap();
    v.add_endpoint(8, Some(a), &[]).unwrap();
    v.add_endpoint(16, Some(b), &[]).unwrap();
    assert_eq!(send(&mut v, &attach(1, 8, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &attach(2, 16, 0)), Some(Status::Ok));
    assert_eq!(
        batch(
            &mut v,
            &[
                map(1, 0x10000, 0x10fff, 0x200000, RW),
                map(2, 0x11000, 0x11fff, 0x201000, RW),
            ]
        ),
        vec![Some(Status::Ok); 2]
    );
    assert_eq!(
        log_a.lock().unwrap().calls,
        vec![Call::Map(0x10000, 0x200000, 0x1000, Perm::RW)]
    );
    assert_eq!(
        log_b.lock().unwrap().calls,
        vec![Call::Map(0x11000, 0x201000, 0x1000, Perm::RW)]
    );

    // Both endpoints in domain 1 now (domain 2 freed); backend b refuses the next MAP.
    assert_eq!(send(&mut v, &attach(1, 16, 0)), Some(Status::Ok));
    log_b.lock().unwrap().fail_iova = Some(0x20000);
    let (maps, unmaps) = (v.counters().host_maps, v.counters().host_unmaps);
    assert_eq!(
        send(&mut v, &map(1, 0x20000, 0x20fff, 0x300000, RW)),
        Some(Status::DevErr)
    );
    assert_eq!(v.counters().host_maps - maps, 2);
    assert_eq!(v.counters().host_unmaps - unmaps, 1);
    assert_eq!(
        log_a.lock().unwrap().calls.last(),
        Some(&Call::Unmap(0x20000, 0x1000))
    );
    assert!(!log_a.lock().unwrap().pages.contains_key(&0x20));
    assert_eq!(v.domain_mapped_pages(1), Some(1));
}

/// A translation over several mappings: pages contiguous in GPA are one run across mapping
/// edges, a GPA break starts another; the counters count one miss, then one hit, and every
/// byte.
#[test]
fn translations_merge_gpa_runs_and_count_hits_and_bytes() {
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    for req in [
        map(1, 0x10000, 0x10fff, 0x80000, RW),
        map(1, 0x11000, 0x11fff, 0x81000, RW),
        map(1, 0x12000, 0x12fff, 0x90000, RW),
    ] {
        assert_eq!(send(&mut v, &req), Some(Status::Ok));
    }
    let mut out = Vec::new();
    v.translate(1, 0x10800, 0x2000, Access::Read, &mut out)
        .unwrap();
    assert_eq!(out, vec![(0x80800, 0x1800), (0x90000, 0x800)]);
    let c = v.counters();
    assert_eq!(
        (c.iotlb_hits, c.iotlb_misses, c.translated_bytes),
        (0, 1, 0x2000)
    );
    v.translate(1, 0x10800, 0x2000, Access::Read, &mut out)
        .unwrap();
    assert_eq!(out, vec![(0x80800, 0x1800), (0x90000, 0x800)]);
    let c = v.counters();
    assert_eq!(
        (c.iotlb_hits, c.iotlb_misses, c.translated_bytes),
        (1, 1, 0x4000)
    );
    // One byte at the very end of a mapping, and the last byte of the window.
    v.translate(1, 0x12fff, 1, Access::Write, &mut out).unwrap();
    assert_eq!(out, vec![(0x90fff, 1)]);

    // A cached page followed by a page walked now: one GPA run still.
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    for req in [
        map(1, 0x10000, 0x10fff, 0x80000, RW),
        map(1, 0x11000, 0x11fff, 0x81000, RW),
    ] {
        assert_eq!(send(&mut v, &req), Some(Status::Ok));
    }
    v.translate(1, 0x10000, 8, Access::Read, &mut out).unwrap();
    v.translate(1, 0x10800, 0x1000, Access::Read, &mut out)
        .unwrap();
    assert_eq!(out, vec![(0x80800, 0x1000)]);
    assert_eq!(v.counters().translated_bytes, 0x1008);
}

/// Faults a passthrough device reports carry the reason its endpoint's state gives, the
/// access and the address.
#[test]
fn device_faults_take_the_endpoints_reason() {
    let mut v = device();
    let f = v.report_device_fault(99, true, Some(0x1234));
    assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_UNKNOWN);
    assert_eq!(f.endpoint.get(), 99);
    let f = v.report_device_fault(1, false, Some(0x1234));
    assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_DOMAIN);
    assert_eq!(
        f.flags.get(),
        VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
    assert_eq!(f.address.get(), 0x1234);
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    let f = v.report_device_fault(1, true, None);
    assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(f.flags.get(), VIRTIO_IOMMU_FAULT_F_WRITE);
    assert_eq!(f.endpoint.get(), 1);
    // Each is queued for the event queue, in order.
    let reasons: Vec<u8> = std::iter::from_fn(|| v.pop_fault())
        .map(|f| f.reason)
        .collect();
    assert_eq!(
        reasons,
        vec![
            VIRTIO_IOMMU_FAULT_R_UNKNOWN,
            VIRTIO_IOMMU_FAULT_R_DOMAIN,
            VIRTIO_IOMMU_FAULT_R_MAPPING
        ]
    );
}

/// MAP edges: a one-byte MAP is misaligned (RANGE); the last page of the GPA space can be
/// mapped, one past it cannot; the metadata budget is shared by all domains.
#[test]
fn map_edges_and_a_budget_shared_by_domains() {
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0x10000, 0x10000, 0, RW)),
        Some(Status::Range)
    );
    let top = crate::pagetable::MAX_GPA + 1;
    assert_eq!(
        send(&mut v, &map(1, 0x10000, 0x10fff, top - 0x1000, RW)),
        Some(Status::Ok)
    );
    assert_eq!(
        send(&mut v, &map(1, 0x20000, 0x20fff, top, RW)),
        Some(Status::Range)
    );

    let mut v = Viommu::new(ViommuConfig {
        guest_ram: vec![(0, 1 << 30)],
        metadata_budget: 64 << 10,
        ..Default::default()
    });
    v.add_endpoint(1, None, &[]).unwrap();
    v.add_endpoint(2, None, &[]).unwrap();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(send(&mut v, &attach(2, 2, 0)), Some(Status::Ok));
    // Domain 1 takes the whole budget, a 2 MiB chunk (one dense leaf) at a time.
    let mut full = false;
    for i in 0..64u64 {
        let m = map(1, i << 21, (i << 21) + 0x1f_ffff, 0x1000, RW);
        if send(&mut v, &m) == Some(Status::NoMem) {
            full = true;
            break;
        }
    }
    assert!(full);
    // Domain 2 cannot add a page of its own.
    assert_eq!(send(&mut v, &map(2, 0, 0xfff, 0, RW)), Some(Status::NoMem));
    assert!(v.metadata_bytes() <= 64 << 10);
}

/// MAP and UNMAP exist only with VIRTIO_IOMMU_F_MAP_UNMAP negotiated, PROBE only with
/// VIRTIO_IOMMU_F_PROBE: otherwise they are answered like unknown types (5.13.6.3-5).
#[test]
fn requests_need_their_features() {
    let mut v = device();
    v.set_negotiated(
        v.offered_features() & !(1 << VIRTIO_IOMMU_F_MAP_UNMAP) & !(1 << VIRTIO_IOMMU_F_PROBE),
    );
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    for req in [
        map(1, 0x10000, 0x10fff, 0, RW),
        unmap(1, 0x10000, 0x10fff),
        probe(1),
    ] {
        let r = Request {
            readable: &req,
            readable_len: req.len(),
            writable_len: 4 + 512,
        };
        let unknown = [0xffu8, 0, 0, 0];
        let u = Request {
            readable: &unknown,
            readable_len: 4,
            writable_len: 4,
        };
        let replies = v.process(&[r, u]);
        assert_eq!(replies[0], replies[1], "type {}", req[0]);
    }
    assert_eq!(v.domain_mapped_pages(1), Some(0));
}

/// The translation cache holds several entries: alternating between two pages hits both.
#[test]
fn the_iotlb_keeps_several_entries() {
    let mut v = device();
    assert_eq!(send(&mut v, &attach(1, 1, 0)), Some(Status::Ok));
    assert_eq!(
        send(&mut v, &map(1, 0x10000, 0x10fff, 0x80000, RW)),
        Some(Status::Ok)
    );
    assert_eq!(
        send(&mut v, &map(1, 0x30000, 0x30fff, 0x90000, RW)),
        Some(Status::Ok)
    );
    let mut out = Vec::new();
    for _ in 0..3 {
        v.translate(1, 0x10000, 8, Access::Read, &mut out).unwrap();
        v.translate(1, 0x30000, 8, Access::Read, &mut out).unwrap();
    }
    let c = v.counters();
    assert_eq!((c.iotlb_misses, c.iotlb_hits), (2, 4));
}
