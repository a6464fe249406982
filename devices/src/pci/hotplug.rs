//! ACPI PCI hot-plug of bus 0's slots: the register block the DSDT's `PCNT` and `PCEJ`
//! methods use (`boot::acpi`), in the shape of Cloud Hypervisor's and QEMU's
//! `acpi-pci-hotplug`, and the Generic Event Device interrupt (ACPI 6.5 section 5.6.9) that
//! tells the guest to look.
//!
//! Registers (32-bit, little endian, at [`HOTPLUG_REGS_SIZE`] bytes from the block's base):
//! - `PCIU` (offset 0), read: the slots whose device was added since the last read, one bit
//!   per device number; reading clears them. The guest answers with a device check
//!   (`Notify(Snn, 1)`): Linux's acpiphp scans the slot.
//! - `PCID` (offset 4), read: the slots whose device the VMM wants removed since the last
//!   read; reading clears them. The guest answers with an eject request (`Notify(Snn, 3)`):
//!   acpiphp unbinds the driver, removes the function and calls the slot's `_EJ0`.
//! - `B0EJ` (offset 8), write: `_EJ0` writes the slot's bit: the function leaves the bus at
//!   once (its configuration space reads all ones) and the waiting remover is told.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sync::{CondvarExt, MutexExt};

use super::PciBus;
use crate::bus::BusDevice;

/// Size in bytes of the register block.
pub const HOTPLUG_REGS_SIZE: u64 = 16;
/// Offset of `PCIU`.
pub const PCIU: u64 = 0;
/// Offset of `PCID`.
pub const PCID: u64 = 4;
/// Offset of `B0EJ`.
pub const B0EJ: u64 = 8;

/// Raises the Generic Event Device's interrupt.
pub trait GedInterrupt: Send + Sync {
    /// One edge on the GED's GSI.
    fn trigger(&self);
}

#[derive(Default)]
struct Pending {
    /// Added, not yet read by the guest (`PCIU`).
    up: u32,
    /// Removal requested, not yet read by the guest (`PCID`).
    down: u32,
    /// Ejected by the guest (`B0EJ`), not yet taken by [`PciHotplug::wait_ejected`].
    ejected: u32,
}

/// The hot-plug registers of bus 0, shared by the MMIO bus (the guest's side) and the VMM
/// (which plugs and unplugs).
pub struct PciHotplug {
    bus: Arc<PciBus>,
    /// The slots that may be hot-plugged, one bit per device number; writes to `B0EJ`
    /// outside them do nothing.
    slots: u32,
    pending: Mutex<Pending>,
    ejected: Condvar,
    ged: Arc<dyn GedInterrupt>,
}

impl PciHotplug {
    /// The registers for the hot-pluggable `slots` (a bit per device number) of `bus`,
    /// signalling through `ged`.
    pub fn new(bus: Arc<PciBus>, slots: u32, ged: Arc<dyn GedInterrupt>) -> Self {
        Self {
            bus,
            slots,
            pending: Mutex::new(Pending::default()),
            ejected: Condvar::new(),
            ged,
        }
    }

    /// Tells the guest a device is now in `slot` (already on the bus).
    pub fn announce_added(&self, slot: u8) {
        let bit = 1u32 << (slot & 31);
        {
            let mut p = self.pending.locked();
            p.up |= bit;
            p.down &= !bit;
            p.ejected &= !bit;
        }
        self.ged.trigger();
    }

    /// Asks the guest to give up the device in `slot`; [`PciHotplug::wait_ejected`] waits for
    /// its `_EJ0`.
    pub fn request_removal(&self, slot: u8) {
        let bit = 1u32 << (slot & 31);
        {
            let mut p = self.pending.locked();
            p.down |= bit;
            p.up &= !bit;
        }
        self.ged.trigger();
    }

    /// Waits until the guest ejected `slot`, at most `timeout`. True when it did (the device
    /// is off the bus then); false when the time ran out (the device is still on the bus).
    pub fn wait_ejected(&self, slot: u8, timeout: Duration) -> bool {
        let bit = 1u32 << (slot & 31);
        let deadline = Instant::now() + timeout;
        let mut p = self.pending.locked();
        loop {
            if p.ejected & bit != 0 {
                p.ejected &= !bit;
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Whatever the guest does later with this slot, it is no longer asked to.
                p.down &= !bit;
                return false;
            }
            p = self.ejected.wait_timeout_locked(p, left).0;
        }
    }

    fn eject(&self, mask: u32) {
        let mask = mask & self.slots;
        if mask == 0 {
            return;
        }
        for slot in 0..32u8 {
            if mask & (1 << slot) != 0 && self.bus.remove_device(usize::from(slot)).is_some() {
                log::info!("hot-plug: the guest ejected 00:{slot:02x}.0");
            }
        }
        self.pending.locked().ejected |= mask;
        self.ejected.notify_all();
    }
}

/// The register block on the MMIO bus.
pub struct PciHotplugRegs(pub Arc<PciHotplug>);

impl BusDevice for PciHotplugRegs {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = {
            let mut p = self.0.pending.locked();
            match offset {
                PCIU => std::mem::take(&mut p.up),
                PCID => std::mem::take(&mut p.down),
                _ => 0,
            }
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != B0EJ || data.len() != 4 {
            return;
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(data);
        self.0.eject(u32::from_le_bytes(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct Edges(AtomicU32);
    impl GedInterrupt for Edges {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn read(r: &mut PciHotplugRegs, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        r.read(0, offset, &mut d);
        u32::from_le_bytes(d)
    }

    /// An added slot shows in `PCIU` once; a removal request in `PCID` once; each raises the
    /// GED's interrupt; `_EJ0` takes the function off the bus and wakes the remover; an
    /// eject outside the hot-pluggable slots does nothing.
    #[test]
    fn plug_request_and_eject_go_through_the_registers() {
        let bus = Arc::new(PciBus::new());
        let edges = Arc::new(Edges::default());
        let hp = Arc::new(PciHotplug::new(
            bus.clone(),
            1 << 30 | 1 << 31,
            edges.clone(),
        ));
        let mut regs = PciHotplugRegs(hp.clone());
        let dev: super::super::SharedPciDevice =
            Arc::new(Mutex::new(super::super::HostBridge::new()));
        assert!(bus.add_device(30, dev.clone()));
        assert!(bus.add_device(5, dev));
        hp.announce_added(30);
        assert_eq!(edges.0.load(Ordering::SeqCst), 1);
        assert_eq!(read(&mut regs, PCIU), 1 << 30);
        assert_eq!(read(&mut regs, PCIU), 0, "PCIU clears on read");
        hp.request_removal(30);
        assert_eq!(edges.0.load(Ordering::SeqCst), 2);
        assert_eq!(read(&mut regs, PCID), 1 << 30);
        assert_eq!(read(&mut regs, PCID), 0, "PCID clears on read");
        assert!(!hp.wait_ejected(30, Duration::from_millis(1)));
        assert!(bus.device(30).is_some());
        regs.write(0, B0EJ, &(1u32 << 30 | 1 << 5).to_le_bytes());
        assert!(
            bus.device(30).is_none(),
            "_EJ0 takes the function off the bus"
        );
        assert!(
            bus.device(5).is_some(),
            "a slot outside the hot-pluggable ones stays"
        );
        assert!(hp.wait_ejected(30, Duration::ZERO));
        assert_eq!(bus.config_read(0, 30, 0, 0), 0xffff_ffff);
    }

    /// A request undoes the other's pending bit; a wait takes its eject once, and a wait that
    /// times out withdraws the request; only `B0EJ` ejects; a waiter is woken by the eject.
    #[test]
    fn stale_bits_never_reach_the_guest_or_the_remover() {
        let bus = Arc::new(PciBus::new());
        let hp = Arc::new(PciHotplug::new(
            bus.clone(),
            1 << 30,
            Arc::new(Edges::default()),
        ));
        let mut regs = PciHotplugRegs(hp.clone());
        let dev: super::super::SharedPciDevice =
            Arc::new(Mutex::new(super::super::HostBridge::new()));
        // Removal asked, then the device added again before the guest looked: a device
        // check only.
        hp.request_removal(30);
        hp.announce_added(30);
        assert_eq!((read(&mut regs, PCIU), read(&mut regs, PCID)), (1 << 30, 0));
        // Added, then removal asked before the guest looked: an eject request only.
        hp.announce_added(30);
        hp.request_removal(30);
        assert_eq!((read(&mut regs, PCIU), read(&mut regs, PCID)), (0, 1 << 30));
        // A wait that times out withdraws the request.
        hp.request_removal(30);
        assert!(!hp.wait_ejected(30, Duration::ZERO));
        assert_eq!(read(&mut regs, PCID), 0);
        // Only a 4-byte write to B0EJ ejects.
        assert!(bus.add_device(30, dev.clone()));
        regs.write(0, PCIU, &(1u32 << 30).to_le_bytes());
        regs.write(0, B0EJ, &[0x40]);
        assert!(bus.device(30).is_some());
        // An eject is taken once; a new plug forgets an old eject.
        regs.write(0, B0EJ, &(1u32 << 30).to_le_bytes());
        assert!(hp.wait_ejected(30, Duration::ZERO));
        assert!(!hp.wait_ejected(30, Duration::ZERO));
        regs.write(0, B0EJ, &(1u32 << 30).to_le_bytes());
        hp.announce_added(30);
        assert!(!hp.wait_ejected(30, Duration::ZERO));
        // A remover waiting is woken by the guest's eject.
        assert!(bus.add_device(30, dev));
        let guest = {
            let hp = hp.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                PciHotplugRegs(hp).write(0, B0EJ, &(1u32 << 30).to_le_bytes());
            })
        };
        assert!(hp.wait_ejected(30, Duration::from_secs(60)));
        guest.join().unwrap();
    }
}
