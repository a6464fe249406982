//! The stream body over its seed (the records after the configuration of a minimal stream)
//! and over random and mutated inputs. The fuzzer itself runs in `tests/fuzz.sh`.

use iommu::testing::{fuzz_inputs, write_fuzz_seed};
use proptest::prelude::*;

use super::*;
use crate::migration::recv::tests::minimal_stream;
use crate::migration::stream::StreamReader;

/// The records of the minimal stream that follow its header and configuration record, in
/// the body's record mode (`[1]`, then `[kind, length, payload]` each).
fn seed() -> Vec<u8> {
    let (stream, prefix) = minimal_stream();
    let mut r = StreamReader::resume(&stream[prefix..], 1);
    let mut seed = vec![1];
    while let Ok((kind, payload)) = r.next_record() {
        seed.push(kind as u8);
        seed.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        seed.extend_from_slice(&payload);
    }
    assert!(seed.len() > 4096, "the seed holds the page and the state");
    seed
}

/// The same records as raw bytes (`[0]`, then the stream as written).
fn raw_seed() -> Vec<u8> {
    let (stream, prefix) = minimal_stream();
    [&[0][..], &stream[prefix..]].concat()
}

/// The body takes its seeds, which `tests/fuzz.sh` then hands to the fuzzer.
#[test]
fn the_seeds_pass() {
    for (name, seed) in [("records", seed()), ("raw", raw_seed())] {
        migration_stream(&seed);
        write_fuzz_seed("migration_stream", name, &seed);
    }
}

proptest! {
    #![proptest_config(iommu::testing::fuzz_config())]

    #[test]
    fn migration_stream_takes_any_input(
        data in fuzz_inputs(seed())) {
        migration_stream(&data);
    }
}
