//! The DMA test device: a PCI device with a small DMA engine, served over vfio-user by the
//! `dma-test-device` binary (on the `vfio_user` crate's server side). A crate of its own: the
//! VMM's crates use it only in their tests.
//!
//! BAR 0 (region 0, 4 KiB) holds the registers of [`regs`]: source and destination IOVAs,
//! length, operation (copy, fill, compare), a doorbell, status, the error with the faulting
//! IOVA, and a per-chunk delay that keeps a transfer pending long enough to race an UNMAP.
//! MSI-X vector 0 signals completion (and errors). The device reaches guest memory only
//! through the IOVAs the VMM mapped for it, with their permissions; anything else is a DMA
//! fault, recorded in the error registers, in the fault log (region 9) and signalled on the
//! error IRQ (index 3) so that the VMM raises a virtio-iommu fault event; region 12 lets the
//! VMM map on demand: a transfer that misses waits for the VMM's answer to its page request.
//! Both are named extensions in the server's VERSION capabilities (`vmm-fault-log`,
//! `vmm-page-request`). Migration and the log of pages the device wrote use the standard
//! messages (`VFIO_USER_DEVICE_FEATURE`, `VFIO_USER_MIG_DATA_*`).

pub mod dma;
mod engine;
pub mod seccomp;
mod server;

pub use engine::{MigrationError, TestDevice};
pub use server::{serve, Behaviour, DirtyLogMode};

/// PCI vendor ID of the test device.
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID of the test device.
pub const DEVICE_ID: u16 = 0x7eed;
/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x1000;
/// Region of the fault log: `u32 count`, `u32 lost`, then `count` records of
/// `{u64 iova, u32 flags (bit 0: write), u32 0}`. Writing a `u32` N at offset 0 removes the
/// first N records (the ones the reader has seen; records logged after its read stay) and
/// resets `lost`.
pub const REGION_FAULT_LOG: u32 = 9;
/// Records the fault log holds.
pub const FAULT_LOG_RECORDS: usize = 64;
/// Size of the device data the migration stream carries at most (`VFIO_USER_MIG_DATA_*`).
/// The device migrates with VFIO migration v2 over `VFIO_USER_DEVICE_FEATURE`
/// (`MIG_DEVICE_STATE`; arcs RUNNING <-> STOP, STOP <-> STOP_COPY, STOP <-> RESUMING; others
/// are refused and leave the state unchanged). In STOP the device does no DMA and raises no
/// interrupt; a transfer in progress is parked between two chunks and is part of the data.
/// It logs its DMA writes through `DMA_LOGGING_START`/`STOP`/`REPORT` at 4 KiB.
pub const MIGRATION_DATA_SIZE: u64 = 0x1_0000;

/// Region of the page-request interface (the stall model of PCIe PRI): with requests enabled,
/// a transfer that reaches an IOVA the device cannot access does not fault at once; it posts
/// a page request, signals the error IRQ (index 3) and waits for the answer. Layout
/// (little-endian): `u32` enable at 0 (bit 0; read back), `u32` pending at 4 (1 while a
/// request waits), the request's `u64 iova` at 8, `u32 flags` at 0x10 (bit 0: write) and
/// `u32 id` at 0x14; the answer is written at 0x18 as a `u64`: the id in the low half and
/// [`PRQ_RETRY`] or [`PRQ_INVALID`] in the high half. Counters: `u64` requests at 0x20,
/// retries at 0x28, invalid answers at 0x30, timeouts at 0x38. The engine has at most one
/// request outstanding (it stalls on it) and gives up after [`PRQ_TIMEOUT_MS`]: the access
/// faults then, as it does on an invalid answer.
pub const REGION_PAGE_REQUEST: u32 = 12;
/// Answer: the page is mapped now; retry the access.
pub const PRQ_RETRY: u32 = devices::passthrough::vfio_user::caps::ext::PRQ_RETRY;
/// Answer: the access is not allowed; it faults.
pub const PRQ_INVALID: u32 = devices::passthrough::vfio_user::caps::ext::PRQ_INVALID;
/// How long the engine waits for an answer.
pub const PRQ_TIMEOUT_MS: u64 = 2000;
/// Page requests one chunk of a transfer may make before it faults.
pub const PRQ_RETRIES_PER_CHUNK: u32 = 8;

/// Device states, the values of `enum vfio_device_mig_state` (`<linux/vfio.h>`).
pub use devices::passthrough::mig_state as mig;

/// BAR 2 (region 2): 4 KiB of device memory the device lets the VMM map into the guest (a
/// sparse-mmap area covering all of it, backed by a memfd sent with its region info). It
/// holds [`BAR2_MAGIC`] at 0 and is otherwise the guest's to write and read.
pub const BAR2_SIZE: u64 = 0x1000;
/// The `u32` at BAR 2 offset 0.
pub const BAR2_MAGIC: u32 = 0xba22_0d17;

/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u32 = 2;

/// Register offsets of BAR 0 (little-endian; 64-bit registers may be accessed as two halves).
pub mod regs {
    /// `u32`, reads `0x7eed_d4a7`.
    pub const ID: u64 = 0x00;
    /// `u32` version, 1.
    pub const VERSION: u64 = 0x04;
    /// `u64` source IOVA.
    pub const SRC: u64 = 0x08;
    /// `u64` destination IOVA.
    pub const DST: u64 = 0x10;
    /// `u64` length in bytes (at most 64 MiB).
    pub const LEN: u64 = 0x18;
    /// `u32` operation: [`super::OP_COPY`], [`super::OP_FILL`], [`super::OP_COMPARE`].
    pub const OP: u64 = 0x20;
    /// `u32` fill value (its low byte is written).
    pub const FILL: u64 = 0x24;
    /// `u32`: writing 1 starts the operation.
    pub const DOORBELL: u64 = 0x28;
    /// `u32` status: [`super::STATUS_IDLE`] .. [`super::STATUS_ERROR`].
    pub const STATUS: u64 = 0x2c;
    /// `u32` error: [`super::ERR_NONE`] ..
    pub const ERROR: u64 = 0x30;
    /// `u64` the IOVA that faulted.
    pub const FAULT_IOVA: u64 = 0x38;
    /// `u64` compare result: 0 when equal, else 1 + the first differing offset.
    pub const RESULT: u64 = 0x40;
    /// `u32` microseconds to wait after each 4 KiB chunk.
    pub const DELAY_US: u64 = 0x48;
    /// `u64` operations completed.
    pub const COMPLETED: u64 = 0x50;
    /// `u64` bytes moved.
    pub const BYTES: u64 = 0x58;
    /// `u64` DMA faults.
    pub const FAULTS: u64 = 0x60;
    /// `u64` bytes done of the current operation.
    pub const PROGRESS: u64 = 0x68;
    /// `u64` identifies the device process (its PID). Not part of the migrated device state:
    /// a guest that reads it before and after sees it change when it was migrated.
    pub const INSTANCE: u64 = 0x70;
    /// `u64` page requests made (see [`super::REGION_PAGE_REQUEST`]); not migrated.
    pub const PAGE_REQUESTS: u64 = 0x78;
    /// `u64` accesses to BAR 2 that reached the device as messages (zero while the VMM maps
    /// BAR 2 into the guest: the sparse-mmap figure's check); not migrated.
    pub const BAR2_MESSAGES: u64 = 0x80;
    /// `u64` doorbell writes that reached the device as messages (zero while the VMM has
    /// registered the doorbell's ioeventfd, `DEVICE_GET_REGION_IO_FDS`); not migrated.
    pub const DOORBELL_MESSAGES: u64 = 0x88;
}

/// Value of [`regs::ID`].
pub const ID_VALUE: u32 = 0x7eed_d4a7;
/// Copy `LEN` bytes from `SRC` to `DST`.
pub const OP_COPY: u32 = 1;
/// Write `LEN` bytes of the fill value at `DST`.
pub const OP_FILL: u32 = 2;
/// Compare `LEN` bytes at `SRC` and `DST`.
pub const OP_COMPARE: u32 = 3;
/// Idle.
pub const STATUS_IDLE: u32 = 0;
/// An operation is running.
pub const STATUS_BUSY: u32 = 1;
/// The last operation completed.
pub const STATUS_DONE: u32 = 2;
/// The last operation failed; see [`regs::ERROR`].
pub const STATUS_ERROR: u32 = 3;
/// No error.
pub const ERR_NONE: u32 = 0;
/// A read from an IOVA faulted.
pub const ERR_FAULT_READ: u32 = 1;
/// A write to an IOVA faulted.
pub const ERR_FAULT_WRITE: u32 = 2;
/// Unknown operation.
pub const ERR_BAD_OP: u32 = 3;
/// Length zero or above 64 MiB.
pub const ERR_BAD_LEN: u32 = 4;
/// Doorbell while busy.
pub const ERR_BUSY: u32 = 5;
/// Largest transfer.
pub const MAX_LEN: u64 = 64 << 20;
