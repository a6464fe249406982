//! The `vfio_user_replies` fuzz target: its body, what it feeds and what it checks, is
//! [`devices::fuzzing::vfio_user_replies`] (`devices/src/fuzzing.rs`), which the unit tests also run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::vfio_user_replies(data));
