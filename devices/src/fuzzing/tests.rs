//! The fuzz bodies run in the test command: over seeds that reach deep (whole conversations,
//! requests that attach, map and unmap) and over random and mutated inputs. The fuzzers
//! themselves (coverage-guided, under AddressSanitizer) run in `tests/fuzz.sh` and
//! `tests/stress.sh`.

use iommu::testing::{detach, fuzz_inputs, unmap, write_fuzz_seed};
use proptest::prelude::*;

use super::*;
use crate::passthrough::vfio_user::tests::scripted_server;

/// Requests for [`virtio_iommu_queue`]: each is `[len, writable_len / 4, flags]` and its
/// body, the flags notifying after each.
fn iommu_seed() -> Vec<u8> {
    let mut seed = vec![0, 0];
    for req in [
        attach(1, 8, 0),
        map(1, 0x1000, 0x2fff, 0x10_0000, 3),
        attach(2, 16, 0),
        map(2, 0x4000, 0x7fff, 0x20_0000, 1),
        unmap(1, 0x1000, 0x1fff),
        unmap(2, 0x4000, 0x7fff),
        detach(1, 8),
    ] {
        seed.extend_from_slice(&[req.len() as u8, 1, 4 | 8]);
        seed.extend_from_slice(&req);
    }
    seed
}

/// Requests for [`virtio_blk`] behind the vIOMMU: a write, a read, a flush and an unknown
/// type, each `[type, sector (8), data length (4), flags, status length, pad]`.
fn blk_seed() -> Vec<u8> {
    let mut seed = vec![1];
    for (type_, sector, flags) in [(1u8, 2u64, 0u8), (0, 2, 4 | 16), (4, 0, 16), (9, 0, 0)] {
        seed.push(type_);
        seed.extend_from_slice(&sector.to_le_bytes());
        seed.extend_from_slice(&512u32.to_le_bytes());
        seed.extend_from_slice(&[flags, 1, 0]);
    }
    seed
}

/// The bodies take their seeds, which `tests/fuzz.sh` then hands to the fuzzers.
#[test]
fn the_seeds_pass() {
    for (target, seed, body) in [
        (
            "virtio_iommu_queue",
            iommu_seed(),
            virtio_iommu_queue as fn(&[u8]),
        ),
        ("virtio_blk", blk_seed(), virtio_blk),
        ("vfio_user_replies", scripted_server(), vfio_user_replies),
    ] {
        body(&seed);
        write_fuzz_seed(target, "seed", &seed);
    }
}

proptest! {
    #![proptest_config(iommu::testing::fuzz_config())]

    #[test]
    fn virtio_iommu_queue_takes_any_input(data in fuzz_inputs(iommu_seed())) {
        virtio_iommu_queue(&data);
    }

    #[test]
    fn virtio_blk_takes_any_input(data in fuzz_inputs(blk_seed())) {
        virtio_blk(&data);
    }

    #[test]
    fn vfio_user_replies_take_any_input(data in fuzz_inputs(scripted_server())) {
        vfio_user_replies(&data);
    }
}
