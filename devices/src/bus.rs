//! Port I/O and MMIO buses: address ranges mapped to devices.
//!
//! A vCPU exit for `addr` finds the device whose range holds it and calls it with the offset
//! from the range's start. Ranges never overlap; inserting an overlapping range fails.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use sync::{MutexExt, RwLockExt};

/// A device on a bus. `offset` is relative to the start of the range it was inserted at;
/// `data.len()` is the access size (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send {
    /// Guest read: fill `data`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write of `data`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors of bus registration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or overflows.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps one already present.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A shared, dynamically typed bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space of devices (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    ///
    /// # Errors
    /// [`BusError::InvalidRange`] for an empty or overflowing range, [`BusError::Overlap`].
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write_locked();
        if let Some((&b, e)) = ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the range starting at `base`. Returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        self.ranges.write_locked().remove(&base).is_some()
    }

    fn lookup(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read_locked();
        let (&base, e) = ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then(|| (base, e.device.clone()))
    }

    /// Dispatches a read. Returns `false` (and leaves `data` untouched) when nothing is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.locked().read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns `false` when nothing is mapped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.locked().write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Echo(Vec<(u64, u64)>);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, _data: &[u8]) {
            self.0.push((base, offset));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 0x9),
            Err(BusError::Overlap { base: 0xf8, len: 9 })
        );
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev.clone(), 0x110, 1).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x105, &mut d));
        assert_eq!(d, [5, 5]);
        assert!(!bus.read(0x111, &mut d));
        assert!(bus.write(0x110, &[1]));
        assert_eq!(dev.lock().unwrap().0, vec![(0x110, 0)]);
        assert!(bus.remove(0x110));
        assert!(!bus.write(0x110, &[1]));
    }
}
