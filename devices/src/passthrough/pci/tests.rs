//! The emulated PCI function of a passthrough device, against a fake backend.

use std::os::fd::RawFd;

use super::*;
use crate::interrupt::testing::RecordingInterrupts;
use crate::interrupt::InterruptManager;
use crate::passthrough::Region;

/// A device with a config space of IDs, BAR 0 of `bar0` bytes and `vectors` MSI-X vectors.
struct Fake {
    bar0: u64,
    vectors: u32,
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
struct Bump(u64);

impl BarAllocator for Bump {
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let at = self.0.checked_next_multiple_of(size)?;
        self.0 = at.checked_add(size)?;
        Some(at)
    }
}

fn function(bar0: u64, vectors: u32) -> Result<PassthroughPci, SetupError> {
    let irqs = RecordingInterrupts::default();
    PassthroughPci::new(
        "fake".into(),
        Arc::new(Mutex::new(Fake { bar0, vectors })),
        &mut Bump(0xc000_0000),
        &mut |n| irqs.allocate_msi(n),
        Arc::new(AtomicBool::new(false)),
        None,
    )
}

#[test]
fn bars_are_powers_of_two_and_a_region_too_large_for_one_is_refused() {
    let f = function(0x1800, 2).unwrap();
    let bars = f.config().bars();
    assert!(bars.contains(&(0, 0xc000_0000, 0x2000)), "{bars:?}");
    // A server that claims a region larger than half the 64-bit space: no BAR can hold it.
    let e = function((1 << 63) + 1, 0).err().unwrap().to_string();
    assert!(
        e.contains("BAR 0: the server's region size 0x8000000000000001 is too large"),
        "{e}"
    );
}

/// A saved state that does not fit (a vector count of another size), together with a
/// changed register, is refused, and the function keeps every register as it was.
#[test]
fn a_state_that_does_not_fit_leaves_the_function_as_it_was() {
    let mut f = function(0x1000, 2).unwrap();
    let before = Persist::save(&mut f).unwrap();
    let mut st = before.clone();
    st.config[1] ^= 0x2; // memory decoding on
    if let Some(m) = st.msix.as_mut() {
        m.entries.push((0, 0, 0, 0));
    }
    let e = Persist::restore(&mut f, &st).err().unwrap();
    assert!(matches!(e, StateError::Mismatch(..)), "{e}");
    let after = Persist::save(&mut f).unwrap();
    assert_eq!(after.config, before.config);
    // The same register change alone is taken.
    st.msix = before.msix.clone();
    Persist::restore(&mut f, &st).unwrap();
    assert_eq!(Persist::save(&mut f).unwrap().config, st.config);
}
