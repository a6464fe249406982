//! The virtio-iommu's protocol and state, the page-granular I/O page table (the mapping core)
//! and dirty bitmaps. No KVM and no threads: everything here is driven by the device model in
//! the `devices` crate and tested in-process.
//!
//! - [`protocol`]: wire types of virtio 1.3 section 5.13.
//! - [`pagetable`]: the per-domain I/O page table (4 KiB granule, ~4.8 bytes per page).
//! - [`dirty`]: dirty bitmaps of guest pages (written by devices, harvested through the IOMMU).
//! - [`backend`]: the host-side mapping trait and a recording backend for tests.
//! - [`on_demand`]: a backend wrapper that maps on a device's page request (`dma=fault`).
//! - [`viommu`]: device state (endpoints, domains), request handling, translation, faults.

pub mod backend;
pub mod dirty;
pub mod on_demand;
pub mod pagetable;
pub mod protocol;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod viommu;

pub use backend::{BackendCaps, BackendError, DmaBackend};
pub use pagetable::Perm;
pub use viommu::{Access, Reply, Request, Viommu, ViommuConfig};
