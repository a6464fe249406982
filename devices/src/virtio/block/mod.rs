//! virtio-blk (virtio 1.3 section 5.2) over a raw image file. Behind the virtio-iommu it
//! offers `VIRTIO_F_ACCESS_PLATFORM` and reaches guest memory only through its endpoint's
//! IOVA space: a buffer that is not mapped (or not writable, for reads from the disk) fails
//! the request with `VIRTIO_BLK_S_IOERR` and raises a fault event; memory outside the
//! mapping is never touched.

mod handler;

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::iommu::IommuHandle;
use super::iova::IovaMemory;
use super::{
    ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
pub use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
const SECTOR_SIZE: u64 = 512;

/// What the device counted, for the VMM's statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockCounters {
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Bytes read from the disk into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the disk.
    pub bytes_written: u64,
    /// Requests failed with `IOERR` (bad request, I/O error, or a translation fault).
    pub io_errors: u64,
    /// Requests whose buffers the IOMMU refused.
    pub translation_faults: u64,
    /// Unknown request types.
    pub unsupported: u64,
}

/// Guest memory as the device reaches it.
#[derive(Clone)]
pub(crate) enum BlockMemory {
    Plain(Arc<GuestMemoryMmap>),
    Iova(IovaMemory),
}

/// A virtio-blk device.
pub struct VirtioBlock {
    disk: File,
    sectors: u64,
    read_only: bool,
    id: String,
    mem: BlockMemory,
    acked: u64,
    queues: Vec<Queue>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    counters: BlockCounters,
}

impl VirtioBlock {
    /// A device over the image at `path`. With `iommu = Some((handle, endpoint))` the device
    /// sits behind the virtio-iommu as `endpoint`.
    ///
    /// # Errors
    /// When the image cannot be opened.
    pub fn new(
        path: &Path,
        read_only: bool,
        mem: Arc<GuestMemoryMmap>,
        iommu: Option<(IommuHandle, u32)>,
    ) -> std::io::Result<Self> {
        let disk = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let len = disk.metadata()?.len();
        let mem = match iommu {
            Some((h, ep)) => BlockMemory::Iova(IovaMemory::new(mem, h, ep)),
            None => BlockMemory::Plain(mem),
        };
        Ok(Self {
            disk,
            sectors: len / SECTOR_SIZE,
            read_only,
            id: path
                .file_name()
                .map(|n| n.to_string_lossy().chars().take(20).collect())
                .unwrap_or_default(),
            mem,
            acked: 0,
            queues: Vec::new(),
            interrupt: None,
            counters: BlockCounters::default(),
        })
    }

    /// Whether the device sits behind the vIOMMU.
    pub fn behind_iommu(&self) -> bool {
        matches!(self.mem, BlockMemory::Iova(_))
    }

    /// Counters so far.
    pub fn counters(&self) -> &BlockCounters {
        &self.counters
    }

    /// The counters as `name=value` pairs on one line (`--counters`).
    pub fn counters_line(&self) -> String {
        let c = &self.counters;
        format!(
            "reads={} writes={} flushes={} bytes_read={} bytes_written={} io_errors={} \
             translation_faults={} unsupported={}",
            c.reads,
            c.writes,
            c.flushes,
            c.bytes_read,
            c.bytes_written,
            c.io_errors,
            c.translation_faults,
            c.unsupported
        )
    }

    fn config_bytes(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[..8].copy_from_slice(&self.sectors.to_le_bytes());
        // seg_max
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        // blk_size
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.behind_iommu() {
            f |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        // Behind the IOMMU every address is an IOVA; a driver that does not know that would
        // hand us GPAs, so the device refuses to run without ACCESS_PLATFORM.
        if self.behind_iommu() && self.acked & (1 << VIRTIO_F_ACCESS_PLATFORM) == 0 {
            return Err(ActivateError::MissingFeature(VIRTIO_F_ACCESS_PLATFORM));
        }
        let valid = match &self.mem {
            BlockMemory::Plain(m) => queues[0].is_valid(m.as_ref()),
            BlockMemory::Iova(m) => queues[0].is_valid(m),
        };
        if !valid {
            return Err(ActivateError::InvalidQueue(0));
        }
        self.queues = queues;
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.clear();
        self.interrupt = None;
        self.acked = 0;
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        super::positions(&self.queues)
    }

    fn queue_notify(&mut self, queue: usize) {
        if queue == 0 {
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests;
