//! What device set-up accumulates while `devices` puts functions on PCI bus 0: the bus, BAR
//! addresses from the 32-bit window, MSI vectors, event-loop handlers, the endpoints behind
//! the vIOMMU (for the VIOT) and the PCI functions in slot order.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ::devices::interrupt::InterruptManager;
use ::devices::passthrough::pci::BarAllocator;
use ::devices::passthrough::vfio_user_backend::SharedRam;
use ::devices::pci::{PciBus, PciDevice};
use ::devices::virtio::iommu::IommuHandle;
use ::devices::virtio::pci::{IoEventRegistrar, VirtioPciDevice, BAR0_SIZE};
use ::devices::virtio::VirtioDevice;
use ::devices::GuestMemoryMmap;
use sync::MutexExt;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};

use crate::error::VmmError;
use crate::machine::devices::{DeviceKind, Function, KvmGuestMapper, QueueNotifier, Subscriber};
use crate::machine::interrupts::KvmInterruptManager;

/// BAR addresses from the 32-bit PCI window: vm-allocator's `AddressAllocator`, first fit,
/// each BAR aligned to its size; what it handed out since [`WindowAllocator::take_given`]
/// is remembered, so that a hot-unplugged device's BARs can be given back.
pub struct WindowAllocator(AddressAllocator, Vec<(u64, u64)>);

impl WindowAllocator {
    /// The window of `size` bytes at `base`.
    ///
    /// # Errors
    /// When the window is empty or wraps.
    pub fn new(base: u64, size: u64) -> Result<Self, VmmError> {
        AddressAllocator::new(base, size)
            .map(|a| WindowAllocator(a, Vec::new()))
            .map_err(|e| VmmError::Device("the 32-bit PCI window".into(), Box::new(e)))
    }

    /// The ranges `(start, size)` handed out since the last call.
    pub fn take_given(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.1)
    }

    /// Gives back ranges handed out earlier (a device that went away).
    pub fn give_back(&mut self, ranges: &[(u64, u64)]) {
        for &(start, size) in ranges {
            if let Ok(r) = vm_allocator::RangeInclusive::new(start, start + size - 1) {
                if let Err(e) = self.0.free(&r) {
                    log::warn!("BAR window {start:#x}+{size:#x}: cannot give it back: {e}");
                }
            }
        }
    }
}

impl BarAllocator for WindowAllocator {
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let at = self.0.allocate(size, size, AllocPolicy::FirstMatch).ok()?;
        self.1.push((at.start(), size));
        Some(at.start())
    }
}

/// Turns a device error into a [`VmmError`] naming the device.
pub fn dev_err<E: std::error::Error + Send + Sync + 'static>(
    what: String,
) -> impl FnOnce(E) -> VmmError {
    move |e| VmmError::Device(what, Box::new(e))
}

/// What device setup accumulates.
pub struct Builder {
    /// Bus 0 under construction.
    pub pci: PciBus,
    /// BAR addresses.
    pub bars: WindowAllocator,
    /// MSI vectors.
    pub interrupts: KvmInterruptManager,
    /// Registers ioeventfds with KVM.
    pub(crate) ioevents: Arc<dyn IoEventRegistrar>,
    /// Event-loop handlers.
    pub subscribers: Vec<Subscriber>,
    /// Device numbers behind the vIOMMU (for the VIOT).
    pub endpoints: Vec<u8>,
    /// Device numbers on bus 0 (vm-allocator's `IdAllocator`).
    pub(crate) slots: IdAllocator,
    /// The vIOMMU, if any.
    pub iommu: Option<IommuHandle>,
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// Guest RAM as device processes map it.
    pub ram: SharedRam,
    /// Maps device memory (passthrough BAR areas) into the guest.
    pub guest_mapper: Arc<KvmGuestMapper>,
    /// Threads and cut alignment (bytes) for mapping all RAM on a device outside the
    /// vIOMMU (`super::static_map`).
    pub static_map: (usize, u64),
    /// Guest RAM was populated already (for the vIOMMU's boot bypass).
    pub ram_populated: bool,
    /// Set while the devices are frozen for a snapshot.
    pub frozen: Arc<AtomicBool>,
    /// PCI functions in slot order.
    pub functions: Vec<Function>,
    /// Virtio devices and their queue counts.
    pub virtio: Vec<(Arc<Mutex<dyn VirtioDevice>>, usize)>,
    /// The guest runs (a hot-plug): the vIOMMU is reached in the host order, and a backend
    /// may not narrow what the guest was told.
    pub running: bool,
    /// The hot-plug slots (`--hotplug`), which a device given by flags takes only with
    /// `slot=N`.
    pub hot: Vec<crate::machine::hotplug::HotSlot>,
}

impl Builder {
    /// Registers ioeventfds with KVM.
    pub fn ioevents(&self) -> Arc<dyn IoEventRegistrar> {
        self.ioevents.clone()
    }

    /// The next free device number.
    ///
    /// # Errors
    /// When the bus is full.
    pub fn slot(&mut self, what: &str) -> Result<u8, VmmError> {
        self.slots
            .allocate_id()
            .ok()
            .and_then(|s| u8::try_from(s).ok())
            .ok_or_else(|| VmmError::Device(what.into(), "no free slot on PCI bus 0".into()))
    }

    /// Hot-plug slot `slot` for a device given by flags (`slot=N`), behind the vIOMMU when
    /// `behind`.
    ///
    /// # Errors
    /// When `slot` is not a hot-plug slot of that kind, or is taken.
    pub fn hot_slot(&self, slot: u8, behind: bool, what: &str) -> Result<u8, VmmError> {
        let slots: Vec<String> = self.hot.iter().map(|h| format!("{}", h.slot)).collect();
        let Some(h) = self.hot.iter().find(|h| h.slot == slot) else {
            return Err(VmmError::Device(
                what.into(),
                format!(
                    "slot={slot}: not a --hotplug slot (they are: {})",
                    if slots.is_empty() {
                        "none".into()
                    } else {
                        slots.join(", ")
                    }
                )
                .into(),
            ));
        };
        if h.behind != behind {
            return Err(VmmError::Device(
                what.into(),
                format!(
                    "slot={slot} is a hot-plug slot {} the vIOMMU: give iommu={}",
                    if h.behind { "behind" } else { "outside" },
                    if h.behind { "on" } else { "off" }
                )
                .into(),
            ));
        }
        if self.pci.device(usize::from(slot)).is_some() {
            return Err(VmmError::Device(
                what.into(),
                format!("slot={slot} is taken").into(),
            ));
        }
        Ok(slot)
    }

    /// Puts virtio device `dev` in `slot` behind a virtio-pci transport, with one MSI
    /// vector per queue and one for configuration changes.
    ///
    /// # Errors
    /// When vectors, a BAR or the slot are not to be had.
    pub fn add_virtio(
        &mut self,
        slot: u8,
        kind: DeviceKind,
        dev: Arc<Mutex<dyn VirtioDevice>>,
        name: &str,
    ) -> Result<(), VmmError> {
        let nq = dev.locked().queue_max_sizes().len();
        let vectors = self
            .interrupts
            .allocate_msi(nq + 1)
            .map_err(dev_err(format!("{name} interrupts")))?;
        let bar = self
            .bars
            .allocate(BAR0_SIZE)
            .ok_or_else(|| VmmError::Device(name.into(), "the 32-bit PCI window is full".into()))?;
        let pdev = VirtioPciDevice::new(dev.clone(), bar, vectors, Some(self.ioevents.clone()))
            .map_err(dev_err(format!("{name} transport")))?;
        self.subscribers.push(Arc::new(Mutex::new(QueueNotifier {
            device: dev.clone(),
            evts: pdev.queue_evts().to_vec(),
            frozen: self.frozen.clone(),
        })));
        self.virtio.push((dev, nq));
        self.add_pci(slot, kind, Arc::new(Mutex::new(pdev)), name)
    }

    /// Puts `dev` in `slot`.
    ///
    /// # Errors
    /// When the slot is taken.
    pub fn add_pci(
        &mut self,
        slot: u8,
        kind: DeviceKind,
        dev: Arc<Mutex<dyn PciDevice>>,
        name: &str,
    ) -> Result<(), VmmError> {
        if !self.pci.add_device(usize::from(slot), dev.clone()) {
            return Err(VmmError::Device(name.into(), "PCI slot taken".into()));
        }
        self.functions.push(Function {
            slot,
            kind,
            name: name.to_string(),
            device: dev,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BARs come aligned to their size, inside the window, without overlap; a hole left by
    /// alignment is used by a later small BAR; a BAR that does not fit is refused.
    #[test]
    fn bars_are_aligned_disjoint_and_inside_the_window() {
        let (base, size) = (0xc000_0000u64, 0x10_0000u64);
        let mut w = WindowAllocator::new(base, size).unwrap();
        let mut got = Vec::new();
        for len in [0x1000u64, 0x4_0000, 0x1000, 0x2000] {
            let at = w.allocate(len).unwrap();
            assert_eq!(at % len, 0, "{len:#x} at {at:#x}");
            assert!(at >= base && at + len <= base + size);
            got.push((at, len));
        }
        got.sort();
        assert!(
            got.windows(2).all(|p| p[0].0 + p[0].1 <= p[1].0),
            "{got:x?}"
        );
        // The third BAR (4 KiB) went into the hole before the 256 KiB one.
        assert!(got[1].0 < base + 0x4_0000, "{got:x?}");
        assert_eq!(w.allocate(0x10_0000), None);
        // Given back, the window takes a BAR of its whole size again.
        let given = w.take_given();
        assert_eq!(given.len(), 4);
        w.give_back(&given);
        assert_eq!(w.allocate(0x10_0000), Some(base));
    }
}
