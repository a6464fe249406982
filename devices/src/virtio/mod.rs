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

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// `VIRTIO_F_ACCESS_PLATFORM`: the device's DMA goes through the platform IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

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

/// One descriptor of a chain: `(GPA, length)`.
pub type Buf = (u64, u32);

/// A descriptor chain split into its device-readable and device-writable buffers.
#[derive(Debug, Default, Clone)]
pub struct Chain {
    /// Head index, for `add_used`.
    pub head: u16,
    /// Device-readable buffers in order.
    pub readable: Vec<Buf>,
    /// Device-writable buffers in order.
    pub writable: Vec<Buf>,
}

impl Chain {
    /// Splits `chain`. Readable buffers after a writable one (a driver error) are ignored.
    pub fn from_desc_chain<M>(chain: DescriptorChain<M>) -> Chain
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let mut c = Chain {
            head: chain.head_index(),
            ..Default::default()
        };
        for d in chain {
            let buf = (d.addr().0, d.len());
            if d.is_write_only() {
                c.writable.push(buf);
            } else if c.writable.is_empty() {
                c.readable.push(buf);
            }
        }
        c
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.1)).sum()
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.1)).sum()
    }

    /// Reads up to `max` bytes from the start of the readable part.
    ///
    /// # Errors
    /// When a buffer lies outside `mem`.
    pub fn read_prefix<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        max: usize,
    ) -> Result<Vec<u8>, vm_memory::GuestMemoryError> {
        let mut out = Vec::new();
        for &(addr, len) in &self.readable {
            if out.len() >= max {
                break;
            }
            let n = (len as usize).min(max - out.len());
            let start = out.len();
            out.resize(start + n, 0);
            mem.read_slice(&mut out[start..], GuestAddress(addr))?;
        }
        Ok(out)
    }

    /// Writes `data` at byte `offset` of the writable part.
    ///
    /// # Errors
    /// When the range does not fit in the writable buffers or a buffer lies outside `mem`.
    pub fn write_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        data: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        write_bufs(mem, &self.writable, offset, data)
    }
}

/// Writes `data` at byte `offset` of the concatenation of `bufs`.
///
/// # Errors
/// When the range does not fit in `bufs` or a buffer lies outside `mem`.
pub fn write_bufs<M: GuestMemory + ?Sized>(
    mem: &M,
    bufs: &[Buf],
    offset: u64,
    data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pos = 0u64;
    let mut written = 0usize;
    let end = offset
        .checked_add(data.len() as u64)
        .ok_or(vm_memory::GuestMemoryError::InvalidBackendAddress)?;
    for &(addr, len) in bufs {
        let len = u64::from(len);
        let buf_end = pos + len;
        if buf_end > offset && pos < end {
            let from = offset.max(pos);
            let to = end.min(buf_end);
            let n = (to - from) as usize;
            let gpa = addr
                .checked_add(from - pos)
                .ok_or(vm_memory::GuestMemoryError::InvalidBackendAddress)?;
            mem.write_slice(&data[written..written + n], GuestAddress(gpa))?;
            written += n;
        }
        pos = buf_end;
        if pos >= end {
            break;
        }
    }
    if written == data.len() {
        Ok(())
    } else {
        Err(vm_memory::GuestMemoryError::InvalidBackendAddress)
    }
}
