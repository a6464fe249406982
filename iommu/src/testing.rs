//! Request builders for tests in any crate: the bytes a driver puts in the device-readable
//! part of each request type.

use zerocopy::IntoBytes;

use crate::protocol::*;

/// ATTACH `ep` to `dom`.
pub fn attach(dom: u32, ep: u32, flags: u32) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_ATTACH, 0, 0, 0];
    let mut b = AttachBody::default();
    b.domain.set(dom);
    b.endpoint.set(ep);
    b.flags.set(flags);
    v.extend_from_slice(b.as_bytes());
    v
}

/// DETACH `ep` from `dom`.
pub fn detach(dom: u32, ep: u32) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_DETACH, 0, 0, 0];
    let mut b = DetachBody::default();
    b.domain.set(dom);
    b.endpoint.set(ep);
    v.extend_from_slice(b.as_bytes());
    v
}

/// MAP `[start, end]` to `phys`.
pub fn map(dom: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_MAP, 0, 0, 0];
    let mut b = MapBody::default();
    b.domain.set(dom);
    b.virt_start.set(start);
    b.virt_end.set(end);
    b.phys_start.set(phys);
    b.flags.set(flags);
    v.extend_from_slice(b.as_bytes());
    v
}

/// UNMAP `[start, end]`.
pub fn unmap(dom: u32, start: u64, end: u64) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_UNMAP, 0, 0, 0];
    let mut b = UnmapBody::default();
    b.domain.set(dom);
    b.virt_start.set(start);
    b.virt_end.set(end);
    v.extend_from_slice(b.as_bytes());
    v
}

/// PROBE `ep`.
pub fn probe(ep: u32) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_PROBE, 0, 0, 0];
    let mut b = ProbeBody::default();
    b.endpoint.set(ep);
    v.extend_from_slice(b.as_bytes());
    v
}

/// Property-test cases: `default`, or `$PROPTEST_CASES` when set (tests/mutants.sh lowers it
/// to keep each mutant's test run short).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
