//! The DMA test device's registers (see the `testdev` crate).

use crate::io::{rd32, rd64, wr32, wr64};
use crate::pci::Func;

/// Vendor and device IDs.
pub const IDS: (u16, u16) = (0x1234, 0x7eed);
const SRC: u64 = 0x08;
const DST: u64 = 0x10;
const LEN: u64 = 0x18;
const OP: u64 = 0x20;
const FILL: u64 = 0x24;
const DOORBELL: u64 = 0x28;
const STATUS: u64 = 0x2c;
const ERROR: u64 = 0x30;
const FAULT_IOVA: u64 = 0x38;
const RESULT: u64 = 0x40;
const DELAY_US: u64 = 0x48;
const PROGRESS: u64 = 0x68;
const INSTANCE: u64 = 0x70;
const PAGE_REQUESTS: u64 = 0x78;
const BAR2_MESSAGES: u64 = 0x80;
const DOORBELL_MESSAGES: u64 = 0x88;
/// The `u32` at BAR 2 offset 0.
pub const BAR2_MAGIC: u32 = 0xba22_0d17;
/// Copy.
pub const OP_COPY: u32 = 1;
/// Fill.
pub const OP_FILL: u32 = 2;
/// Compare.
pub const OP_COMPARE: u32 = 3;
/// Running.
pub const BUSY: u32 = 1;
/// Done.
pub const DONE: u32 = 2;
/// Failed.
pub const ERROR_STATUS: u32 = 3;
/// Write fault.
pub const ERR_FAULT_WRITE: u32 = 2;
/// Length zero or above 64 MiB.
pub const ERR_BAD_LEN: u32 = 4;

/// The device.
pub struct DmaDev {
    bar: u64,
    /// BAR 2: device memory (see `testdev::BAR2_SIZE`).
    pub bar2: u64,
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `STATUS`.
    pub status: u32,
    /// `ERROR`.
    pub error: u32,
    /// `FAULT_IOVA`.
    pub fault_iova: u64,
    /// `RESULT`.
    pub result: u64,
}

impl DmaDev {
    /// The device at `f`.
    pub fn new(f: &Func) -> DmaDev {
        f.enable();
        DmaDev {
            bar: f.bar(0),
            bar2: f.bar(2),
        }
    }

    /// Accesses to BAR 2 that reached the device as messages.
    pub fn bar2_messages(&self) -> u64 {
        rd64(self.bar + BAR2_MESSAGES)
    }

    /// Doorbell writes that reached the device as messages.
    pub fn doorbell_messages(&self) -> u64 {
        rd64(self.bar + DOORBELL_MESSAGES)
    }

    /// The ID register (a read that always goes to the device process).
    pub fn id(&self) -> u32 {
        rd32(self.bar)
    }

    /// Whether the registers answer (all ones once the device process is gone).
    pub fn alive(&self) -> bool {
        rd32(self.bar) == 0x7eed_d4a7
    }

    /// Starts `op`.
    pub fn start(&self, op: u32, src: u64, dst: u64, len: u64, fill: u8, delay_us: u32) {
        wr64(self.bar + SRC, src);
        wr64(self.bar + DST, dst);
        wr64(self.bar + LEN, len);
        wr32(self.bar + OP, op);
        wr32(self.bar + FILL, u32::from(fill));
        wr32(self.bar + DELAY_US, delay_us);
        wr32(self.bar + DOORBELL, 1);
    }

    /// Status register.
    pub fn status(&self) -> u32 {
        rd32(self.bar + STATUS)
    }

    /// Bytes done of the running operation.
    pub fn progress(&self) -> u64 {
        rd64(self.bar + PROGRESS)
    }

    /// Page requests the device has made (`dma=fault`).
    pub fn page_requests(&self) -> u64 {
        rd64(self.bar + PAGE_REQUESTS)
    }

    /// Which device process serves the device (changes when the VM is migrated).
    pub fn instance(&self) -> u64 {
        rd64(self.bar + INSTANCE)
    }

    /// Waits until the operation ends (at most 2 minutes: then the status is still `BUSY`).
    pub fn wait(&self) -> Outcome {
        let deadline = crate::io::Deadline::in_ms(120_000);
        loop {
            let s = self.status();
            if s != BUSY || deadline.passed() {
                return Outcome {
                    status: s,
                    error: rd32(self.bar + ERROR),
                    fault_iova: rd64(self.bar + FAULT_IOVA),
                    result: rd64(self.bar + RESULT),
                };
            }
            core::hint::spin_loop();
        }
    }

    /// Runs `op` to its end.
    pub fn run(&self, op: u32, src: u64, dst: u64, len: u64, fill: u8) -> Outcome {
        self.start(op, src, dst, len, fill, 0);
        self.wait()
    }
}
