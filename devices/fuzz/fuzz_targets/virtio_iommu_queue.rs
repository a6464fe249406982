//! The `virtio_iommu_queue` fuzz target: its body, what it feeds and what it checks, is
//! [`devices::fuzzing::virtio_iommu_queue`] (`devices/src/fuzzing.rs`), which the unit tests also run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::virtio_iommu_queue(data));
