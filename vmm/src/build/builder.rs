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

use crate::error::VmmError;
use crate::machine::devices::{DeviceKind, Function, KvmGuestMapper, QueueNotifier, Subscriber};
use crate::machine::interrupts::KvmInterruptManager;

/// BAR addresses from the 32-bit PCI window.
pub struct WindowAllocator {
    /// The next free address.
    pub(crate) next: u64,
    /// The window's end (exclusive).
    pub(crate) end: u64,
}

impl BarAllocator for WindowAllocator {
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let at = self.next.checked_next_multiple_of(size)?;
        let end = at.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(at)
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
    /// The next free device number.
    pub(crate) next_slot: u8,
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
        let s = self.next_slot;
        if s >= 32 {
            return Err(VmmError::Device(
                what.into(),
                "no free slot on PCI bus 0".into(),
            ));
        }
        self.next_slot += 1;
        Ok(s)
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
