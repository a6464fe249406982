//! The VMM as a library: everything the `vmm` binary is made of, so that fuzz targets and
//! benchmarks can drive its parts (the migration stream reader, above all) without a VM.

pub mod cli;
pub mod device_manager;
pub mod dirty;
pub mod error;
pub mod interrupts;
pub mod memory;
pub mod migration;
pub mod passthrough;
pub mod static_map;
pub mod vcpu;
pub mod vm;
