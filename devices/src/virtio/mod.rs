//! virtio devices, independent of the transport: the [`VirtioDevice`] trait that the
//! virtio-pci transport drives, and helpers to read and write descriptor chains safely.
//!
//! Every guest-supplied address and length goes through checked arithmetic; a chain that
//! points outside guest memory is answered with a used length of 0, never a panic.

pub mod block;
pub mod iommu;
pub mod iova;
pub mod net;
pub mod pci;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`, and `VIRTIO_F_ACCESS_PLATFORM` (the device's DMA goes through the
/// platform IOMMU), from `virtio-bindings`.
pub use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};

/// How a device raises its interrupts (MSI-X vectors on PCI).
pub trait VirtioInterrupt: Send + Sync {
    /// The device used buffers of queue `queue`.
    fn signal_queue(&self, queue: u16);
    /// The device's configuration changed.
    fn signal_config(&self);
    /// The eventfd that raises queue `queue`'s interrupt when written (a KVM irqfd), for a
    /// device whose queues are served outside the VMM (vhost-user `SET_VRING_CALL`); `None`
    /// when the queue has no vector or the vector no eventfd.
    fn queue_irqfd(&self, queue: u16) -> Option<RawFd>;
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// Wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues given.
        got: usize,
    },
    /// A queue's rings are not inside guest memory or its size is invalid.
    #[error("queue {0} is not valid")]
    InvalidQueue(usize),
    /// The driver did not accept a feature the device requires.
    #[error("feature {0} not negotiated")]
    MissingFeature(u32),
}

/// A virtio device model. The transport calls these from the VMM's event loop.
pub trait VirtioDevice: Send {
    /// virtio device ID.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered, `VIRTIO_F_VERSION_1` included.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of [`VirtioDevice::avail_features`]).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (only writable fields change).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set `DRIVER_OK`: start using `queues`.
    ///
    /// # Errors
    /// [`ActivateError`]; the transport then sets `DEVICE_NEEDS_RESET`.
    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Device reset (status written 0): drop the queues, return to the initial state.
    fn reset(&mut self);
    /// The driver notified queue `queue`.
    fn queue_notify(&mut self, queue: usize);
    /// `(next_avail, next_used)` of each active queue, for a snapshot (empty before
    /// activation).
    fn queue_positions(&self) -> Vec<(u16, u16)> {
        Vec::new()
    }
    /// The transport's notification eventfds (one per queue, signalled by the hypervisor when
    /// the driver notifies), given once before activation. A device whose queues are served
    /// outside the VMM (a vhost-user back end) hands them over as kick descriptors.
    fn set_notifiers(&mut self, evts: &[Arc<EventFd>]) {
        let _ = evts;
    }
    /// Whether notifications of `queue` are served outside the VMM: the VMM's event loop then
    /// leaves its eventfd alone.
    fn notified_outside(&self, queue: usize) -> bool {
        let _ = queue;
        false
    }
}

/// `(next_avail, next_used)` of each queue, for [`VirtioDevice::queue_positions`].
pub fn positions(queues: &[Queue]) -> Vec<(u16, u16)> {
    use virtio_queue::QueueT;
    queues
        .iter()
        .map(|q| (q.next_avail(), q.next_used()))
        .collect()
}
