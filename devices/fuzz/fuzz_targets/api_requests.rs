//! The `api_requests` fuzz target: its body, what it feeds and what it checks, is
//! [`vmm::api::fuzzing::api_requests`] (`vmm/src/api/fuzzing.rs`), which the unit tests also
//! run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::api::fuzzing::api_requests(data));
