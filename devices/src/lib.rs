//! Device models of the VMM: buses, legacy devices, PCI and virtio transport, the
//! virtio-iommu and virtio-blk devices, and passthrough backends.

pub mod bus;
pub mod exit;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;
pub mod interrupt;
pub mod legacy;
pub mod memfd;
pub mod passthrough;
pub mod pci;
pub mod seccomp;
pub mod state;
pub mod virtio;

/// Guest memory as the VMM maps it: memfd-backed regions with a dirty bitmap that records the
/// VMM's own writes (one bit per 4 KiB page).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;
