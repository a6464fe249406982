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

/// A back end's messages on its channel: IOTLB misses at a read-write mapping, read-only at
/// a read-only one, a write at the read-only one, one at an unmapped IOVA, an access failure,
/// an `UPDATE` (which only the front end may send) and a request of no known type.
fn channel_seed() -> Vec<u8> {
    let iotlb = |iova: u64, perm: u8, type_: u8| {
        let mut m = Vec::new();
        for v in [1u32, 0x1, 32] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        m.extend_from_slice(&iova.to_le_bytes());
        m.extend_from_slice(&[0; 16]);
        m.extend_from_slice(&[perm, type_, 0, 0, 0, 0, 0, 0]);
        m
    };
    let mut seed = Vec::new();
    for (iova, perm, type_) in [
        (0x1000u64, 3u8, 1u8),
        (0x1_0000, 1, 1),
        (0x1_0000, 3, 1),
        (0x5000, 1, 1),
        (0x1000, 3, 4),
        (0x1000, 3, 2),
    ] {
        seed.extend_from_slice(&iotlb(iova, perm, type_));
    }
    for v in [99u32, 0x1, 0] {
        seed.extend_from_slice(&v.to_le_bytes());
    }
    seed
}

/// The channel body sees what the channel thread does with each miss: the two misses the
/// mappings allow raise nothing, the write at the read-only mapping and the unmapped IOVA
/// raise a fault each.
#[test]
fn the_channel_body_counts_misses_and_faults() {
    use crate::virtio::net::vhost_user::fuzzing::serve_messages;
    assert_eq!(serve_messages(&channel_seed()), Some((4, 2)));
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
        ("pci_dispatch", functions::seeds().0, pci_dispatch),
        (
            "vhost_user_backend_channel",
            channel_seed(),
            vhost_user_backend_channel,
        ),
    ] {
        body(&seed);
        write_fuzz_seed(target, "seed", &seed);
    }
    for (i, seed) in functions::seeds().1.iter().enumerate() {
        function_states(seed);
        write_fuzz_seed("function_states", &format!("seed-{i}"), seed);
    }
}

/// Each function takes back its own saved state, through either mode of [`function_states`]
/// (the body would return early, and prove nothing, on a state that does not parse).
#[test]
fn every_function_takes_back_its_own_state() {
    let f = functions::Functions::new().expect("the bus builds");
    let states = f.states();
    assert_eq!(states.len(), 4);
    for (i, st) in states.iter().enumerate() {
        let parsed: crate::state::FunctionState = serde_json::from_value(st.clone()).unwrap();
        f.restore(i, &parsed)
            .unwrap_or_else(|e| panic!("function {i}: {e}"));
        assert_eq!(f.states()[i], *st, "function {i}");
    }
}

/// A guest write of a function's IDs through the configuration port is ignored (the
/// dispatch body's promise).
#[test]
fn a_guest_write_of_the_ids_is_ignored() {
    let f = functions::Functions::new().expect("the bus builds");
    let ids = f.ids();
    assert!(
        ids.iter().all(|&id| id != 0xffff_ffff && id != 0),
        "{ids:x?}"
    );
    // 0xcf8 <- slot 1, register 0; 0xcfc <- 0.
    pci_dispatch(&[
        8, 0, 0, 0, 0, 4, 0x00, 0x08, 0x00, 0x80, 8, 4, 0, 0, 0, 4, 0, 0, 0, 0,
    ]);
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

    #[test]
    fn vhost_user_backend_channel_takes_any_input(data in fuzz_inputs(channel_seed())) {
        vhost_user_backend_channel(&data);
    }

    #[test]
    fn pci_dispatch_takes_any_input(data in fuzz_inputs(functions::seeds().0)) {
        pci_dispatch(&data);
    }

    /// A seed (each function's state, as JSON or as its own state to edit) with a few
    /// numbers changed, or a few bytes of its JSON.
    #[test]
    fn function_states_take_any_input(
        which in 0usize..8,
        edits in prop::collection::vec(
            (
                prop_oneof![any::<u16>(), 0x8000..0x8040u16, 0xc000..0xc100u16],
                prop_oneof![0..4u64, 0..0x1_0000u64, any::<u64>()],
            ),
            0..6,
        ),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    ) {
        let mut input = functions::seeds().1[which].clone();
        if input[1] == 1 {
            for (index, value) in edits {
                input.extend_from_slice(&index.to_le_bytes());
                input.extend_from_slice(&value.to_le_bytes());
            }
        } else {
            let len = input.len() - 2;
            for (at, byte) in flips {
                input[2 + at % len] = byte;
            }
        }
        function_states(&input);
    }
}
/// The state body catches a refused state that changed its function: a passthrough state
/// with a third MSI-X vector (refused) and BAR 0 moved (taken first, were the MSI-X table
/// checked after the registers were written) leaves BAR 0 where it was.
#[test]
fn a_refused_passthrough_state_that_moves_a_bar_changes_nothing() {
    let mut input = vec![3u8, 1];
    // The second list (the MSI-X entries) gets three elements; register 4 (BAR 0) bit 20
    // flips.
    for (index, value) in [(0x8001u16, 3u64), (0xc004, 20)] {
        input.extend_from_slice(&index.to_le_bytes());
        input.extend_from_slice(&value.to_le_bytes());
    }
    function_states(&input);
}
