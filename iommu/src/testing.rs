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

/// `seed` cut at `cut` if given (modulo its length plus one) with `flips` applied, each an
/// index (modulo the cut length) and a byte to xor there: the mutations the fuzz bodies'
/// property tests apply to their seeds.
pub fn mutated(seed: &[u8], cut: Option<usize>, flips: &[(usize, u8)]) -> Vec<u8> {
    let mut v = seed[..cut.map_or(seed.len(), |c| c % (seed.len() + 1))].to_vec();
    let n = v.len();
    if n > 0 {
        for &(i, x) in flips {
            v[i % n] ^= x;
        }
    }
    v
}

/// Inputs for a fuzz body's property test: random bytes (up to 1 KiB), or `seed` with up to
/// five bytes flipped (half of them in its first 64 bytes, where headers live) and, one time
/// in four, cut short.
pub fn fuzz_inputs(seed: Vec<u8>) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let index = prop_oneof![0..64usize, any::<usize>()];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..1024),
        (
            prop::option::weighted(0.25, any::<usize>()),
            prop::collection::vec((index, any::<u8>()), 0..6),
        )
            .prop_map(move |(cut, flips)| mutated(&seed, cut, &flips)),
    ]
}

/// Writes `bytes` as the seed `name` of the fuzz target `target` when `$VMM_FUZZ_SEED_DIR` is
/// set (`tests/fuzz.sh` sets it and starts each fuzzer from these seeds).
///
/// # Panics
/// When the seed cannot be written.
pub fn write_fuzz_seed(target: &str, name: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("VMM_FUZZ_SEED_DIR") {
        let dir = std::path::Path::new(&dir).join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Sends `reqs` (request bytes, each with a 4-byte writable tail) to `v` as one batch;
/// returns each request's status.
pub fn batch(v: &mut crate::Viommu, reqs: &[Vec<u8>]) -> Vec<Option<Status>> {
    let rs: Vec<crate::Request> = reqs
        .iter()
        .map(|r| crate::Request {
            readable: r,
            readable_len: r.len(),
            writable_len: 4,
        })
        .collect();
    v.process(&rs).iter().map(|r| r.status()).collect()
}

/// The property-test configuration of the fuzz bodies: [`cases`]`(2000)`, nothing persisted.
pub fn fuzz_config() -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: cases(2000),
        failure_persistence: None,
        ..Default::default()
    }
}

/// MAP flags: read and write.
#[cfg(test)]
pub(crate) const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
/// MAP flags: read only.
#[cfg(test)]
pub(crate) const R: u32 = VIRTIO_IOMMU_MAP_F_READ;

/// Sends one request with a 4-byte writable tail; returns its status.
#[cfg(test)]
pub(crate) fn send(v: &mut crate::Viommu, req: &[u8]) -> Option<Status> {
    batch(v, &[req.to_vec()]).remove(0)
}

/// A vIOMMU over 1 GiB of RAM with emulated endpoints 1 and 2.
#[cfg(test)]
pub(crate) fn device() -> crate::Viommu {
    let mut v = crate::Viommu::new(crate::ViommuConfig {
        guest_ram: vec![(0, 1 << 30)],
        ..Default::default()
    });
    v.add_endpoint(1, None, &[]).unwrap();
    v.add_endpoint(2, None, &[]).unwrap();
    v
}

/// [`device`] with endpoint 8 on a recording backend of `caps`; returns its log.
#[cfg(test)]
pub(crate) fn with_backend(
    caps: crate::BackendCaps,
) -> (
    crate::Viommu,
    std::sync::Arc<std::sync::Mutex<crate::backend::RecordingLog>>,
) {
    let mut v = device();
    let (b, log) = crate::backend::RecordingBackend::new("rec", caps);
    let id = v.add_backend(Box::new(b)).unwrap();
    v.add_endpoint(8, Some(id), &[]).unwrap();
    (v, log)
}
