//! Passthrough devices: a PCI device model whose config space, BARs, interrupts and DMA come
//! from a backend (a vfio-user device process, or host VFIO).
//!
//! The model builds the guest-visible configuration space itself from the device's IDs and
//! BAR sizes, with BARs at addresses the VMM allocated, and emulates MSI-X in a BAR of its own:
//! each vector is a KVM irqfd handed to the device (`SET_IRQS`), routed as the guest programs
//! the table. BAR accesses are forwarded to the backend. When the backend fails (the device
//! process died), the device is marked failed: its BARs read all ones, writes are dropped and
//! its DMA calls become no-ops, so the guest sees errors from that device only.

pub mod message_dma;
pub mod pci;
pub mod vfio;
pub mod vfio_feature;
pub mod vfio_user;
pub mod vfio_user_backend;

use std::os::fd::RawFd;

/// VFIO PCI region and IRQ indexes (`linux/vfio.h`): the configuration space's region, the
/// MSI-X and error IRQs.
pub use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};

/// VFIO migration v2 device states (`enum vfio_device_mig_state`, `linux/vfio.h`): what
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` carries, over VFIO and vfio-user's
/// `DEVICE_FEATURE` alike.
pub mod mig_state {
    use vfio_bindings::bindings::vfio as v;

    /// The device failed a transition.
    pub const ERROR: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR;
    /// No DMA, no interrupts, registers frozen.
    pub const STOP: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP;
    /// Normal operation.
    pub const RUNNING: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING;
    /// Stopped, and the device data can be read.
    pub const STOP_COPY: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY;
    /// Stopped, and device data is being written.
    pub const RESUMING: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING;
}

/// Why a passthrough backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// The device (process) is gone: it is now failed.
    #[error("device failed: {0}")]
    Failed(String),
    /// The device refused or the request was invalid.
    #[error("{0}")]
    Refused(String),
}

/// A region of the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Region {
    /// Bytes (0: absent).
    pub size: u64,
}

/// A part of a region the VMM may map straight into the guest (vfio-user's sparse-mmap
/// capability; VFIO's `VFIO_REGION_INFO_CAP_SPARSE_MMAP`): guest accesses there never reach
/// the device process as messages.
#[derive(Debug, Clone)]
pub struct MmapArea {
    /// Offset in the region, page-aligned.
    pub offset: u64,
    /// Bytes, page-aligned.
    pub size: u64,
    /// The file to map, and the area's offset in it.
    pub file: std::sync::Arc<std::fs::File>,
    /// Offset of the area in `file`.
    pub file_offset: u64,
}

/// The device side of a passthrough device (not its DMA, which is an `iommu::DmaBackend`).
pub trait PassthroughBackend: Send {
    /// For logs: `vfio-user /path` or `VFIO 0000:01:00.0`.
    fn describe(&self) -> String;
    /// Region `index`, if the device has it.
    fn region(&self, index: u32) -> Option<Region>;
    /// Reads region `index` at `offset`.
    ///
    /// # Errors
    /// [`PassthroughError`].
    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), PassthroughError>;
    /// Writes region `index` at `offset`.
    ///
    /// # Errors
    /// [`PassthroughError`].
    fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PassthroughError>;
    /// Vectors of IRQ index `index` (0 when absent).
    ///
    /// # Errors
    /// [`PassthroughError`].
    fn irq_count(&mut self, index: u32) -> Result<u32, PassthroughError>;
    /// Makes vectors `start..` of IRQ index `index` signal `fds` (empty: disable).
    ///
    /// # Errors
    /// [`PassthroughError`].
    fn set_irqs(&mut self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), PassthroughError>;
    /// Resets the device.
    ///
    /// # Errors
    /// [`PassthroughError`].
    fn reset(&mut self) -> Result<(), PassthroughError>;

    /// The parts of region `index` that may be mapped into the guest.
    fn mmap_areas(&self, index: u32) -> Vec<MmapArea> {
        let _ = index;
        Vec::new()
    }

    /// Offsets in region `index` whose writes may signal an eventfd of the device instead of
    /// reaching it as a message (vfio-user's `DEVICE_GET_REGION_IO_FDS` ioeventfds, without
    /// datamatch): `(offset, eventfd)`.
    fn io_eventfds(
        &mut self,
        index: u32,
    ) -> Vec<(u64, std::sync::Arc<vmm_sys_util::eventfd::EventFd>)> {
        let _ = index;
        Vec::new()
    }

    /// Whether the device can be migrated (VFIO migration v2: `VFIO_DEVICE_FEATURE_MIGRATION`
    /// with STOP_COPY, over `VFIO_DEVICE_FEATURE` or vfio-user's `DEVICE_FEATURE`).
    fn supports_migration(&self) -> bool {
        false
    }

    /// Moves the device to migration state `state` (`enum vfio_device_mig_state`: 1 STOP,
    /// 2 RUNNING, 3 STOP_COPY, 4 RESUMING).
    ///
    /// # Errors
    /// [`PassthroughError::Refused`] for an unsupported arc or device.
    fn set_migration_state(&mut self, state: u32) -> Result<(), PassthroughError> {
        let _ = state;
        Err(PassthroughError::Refused(format!(
            "{} does not support migration",
            self.describe()
        )))
    }

    /// Reads the device data (in STOP_COPY).
    ///
    /// # Errors
    /// [`PassthroughError`].
    fn read_migration_data(&mut self) -> Result<Vec<u8>, PassthroughError> {
        Err(PassthroughError::Refused(format!(
            "{} does not support migration",
            self.describe()
        )))
    }

    /// Writes device data (in RESUMING).
    ///
    /// # Errors
    /// [`PassthroughError`].
    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), PassthroughError> {
        let _ = data;
        Err(PassthroughError::Refused(format!(
            "{} does not support migration",
            self.describe()
        )))
    }
}
