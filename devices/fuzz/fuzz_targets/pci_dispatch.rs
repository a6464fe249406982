//! The `pci_dispatch` fuzz target: its body, what it feeds and what it checks, is
//! [`devices::fuzzing::pci_dispatch`] (`devices/src/fuzzing/functions.rs`), which the unit tests
//! also run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::pci_dispatch(data));
