//! A passthrough function over a fake backend, for the unit tests and the fuzz bodies
//! (`crate::fuzzing`).

use std::os::fd::RawFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::{BarAllocator, PassthroughPci, SetupError};
use crate::interrupt::testing::RecordingInterrupts;
use crate::interrupt::InterruptManager;
use crate::passthrough::{
    PassthroughBackend, PassthroughError, Region, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};

/// A device with a config space of IDs, BAR 0 of `bar0` bytes and `vectors` MSI-X vectors.
pub struct Fake {
    /// BAR 0's size in bytes.
    pub bar0: u64,
    /// MSI-X vectors.
    pub vectors: u32,
}

impl PassthroughBackend for Fake {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn region(&self, index: u32) -> Option<Region> {
        (index == 0).then_some(Region { size: self.bar0 })
    }
    fn region_read(&mut self, index: u32, _: u64, data: &mut [u8]) -> Result<(), PassthroughError> {
        data.fill(0);
        if index == VFIO_PCI_CONFIG_REGION_INDEX && data.len() >= 4 {
            data[..4].copy_from_slice(&[0xf4, 0x1a, 0x01, 0x10]);
        }
        Ok(())
    }
    fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), PassthroughError> {
        Ok(())
    }
    fn irq_count(&mut self, index: u32) -> Result<u32, PassthroughError> {
        Ok(if index == VFIO_PCI_MSIX_IRQ_INDEX {
            self.vectors
        } else {
            0
        })
    }
    fn set_irqs(&mut self, _: u32, _: u32, _: &[RawFd]) -> Result<(), PassthroughError> {
        Ok(())
    }
    fn reset(&mut self) -> Result<(), PassthroughError> {
        Ok(())
    }
}

/// Hands out size-aligned addresses from 0xc000_0000 on.
pub struct Bump(pub u64);

impl BarAllocator for Bump {
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let at = self.0.checked_next_multiple_of(size)?;
        self.0 = at.checked_add(size)?;
        Some(at)
    }
}

/// A function named `fake` with BAR 0 of `bar0` bytes from 0xc000_0000 on and `vectors`
/// MSI-X vectors.
///
/// # Errors
/// What [`PassthroughPci::new`] refuses.
pub fn function(bar0: u64, vectors: u32) -> Result<PassthroughPci, SetupError> {
    function_at(0xc000_0000, bar0, vectors)
}

/// [`function`] with its BARs from `base` on.
///
/// # Errors
/// What [`PassthroughPci::new`] refuses.
pub fn function_at(base: u64, bar0: u64, vectors: u32) -> Result<PassthroughPci, SetupError> {
    let irqs = RecordingInterrupts::default();
    PassthroughPci::new(
        "fake".into(),
        Arc::new(Mutex::new(Fake { bar0, vectors })),
        &mut Bump(base),
        &mut |n| irqs.allocate_msi(n),
        Arc::new(AtomicBool::new(false)),
        None,
    )
}
