//! The `migration_stream` fuzz target: its body, what it feeds and what it checks, is
//! [`vmm::migration::fuzzing::migration_stream`] (`vmm/src/migration/fuzzing.rs`), which the unit tests also run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::migration::fuzzing::migration_stream(data));
