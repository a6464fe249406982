//! The build side of hot-plug: what device set-up needs kept after boot (the BAR window,
//! MSI vectors, KVM adapters, the vIOMMU, RAM), so that a device added while the guest runs
//! is set up by the same code as one given by flags (`super::passthrough`).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ::devices::passthrough::vfio_user_backend::SharedRam;
use ::devices::pci::PciBus;
use ::devices::virtio::iommu::IommuHandle;
use ::devices::virtio::pci::IoEventRegistrar;
use ::devices::GuestMemoryMmap;
use iommu::viommu::HostSide;
use sync::MutexExt;
use vm_allocator::IdAllocator;

use super::builder::{Builder, WindowAllocator};
use crate::error::VmmError;
use crate::machine::devices::KvmGuestMapper;
use crate::machine::hotplug::{Connector, HotDevice, Plugged};
use crate::machine::interrupts::KvmInterruptManager;

/// What set-up keeps for devices added later.
pub struct Plugger {
    /// The 32-bit window's allocator, shared with nothing else after boot.
    pub bars: Mutex<Option<WindowAllocator>>,
    /// MSI vectors.
    pub interrupts: KvmInterruptManager,
    /// ioeventfds.
    pub ioevents: Arc<dyn IoEventRegistrar>,
    /// BAR areas into the guest.
    pub guest_mapper: Arc<KvmGuestMapper>,
    /// The vIOMMU, if any.
    pub iommu: Option<IommuHandle>,
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// Guest RAM as device processes map it.
    pub ram: SharedRam,
    /// Threads and cut alignment of a static map.
    pub static_map: (usize, u64),
    /// Set while the devices are frozen.
    pub frozen: Arc<AtomicBool>,
}

impl Connector for Plugger {
    fn release(&self, bars: &[(u64, u64)]) {
        if let Some(w) = self.bars.locked().as_mut() {
            w.give_back(bars);
        }
    }

    fn connect(&self, dev: &HotDevice, slot: u8) -> Result<Plugged, VmmError> {
        let cfg = dev.config();
        let name = format!("device {}", cfg.path.display());
        let mut bars = self.bars.locked();
        let window = bars
            .take()
            .ok_or_else(|| VmmError::Device(name.clone(), "the BAR window is gone".into()))?;
        let mut b = Builder {
            pci: PciBus::new(),
            bars: window,
            interrupts: KvmInterruptManager(self.interrupts.0.clone()),
            ioevents: self.ioevents.clone(),
            subscribers: Vec::new(),
            endpoints: Vec::new(),
            slots: IdAllocator::new(u32::from(slot), u32::from(slot))
                .map_err(|e| VmmError::Device(name.clone(), Box::new(e)))?,
            iommu: self.iommu.clone(),
            mem: self.mem.clone(),
            ram: self.ram.clone(),
            guest_mapper: self.guest_mapper.clone(),
            static_map: self.static_map,
            // Populated at boot if a device needed it; the vIOMMU's bypass maps on demand.
            ram_populated: true,
            frozen: self.frozen.clone(),
            functions: Vec::new(),
            virtio: Vec::new(),
            running: true,
            hot: Vec::new(),
        };
        b.bars.take_given();
        let r = match dev {
            HotDevice::VfioUser(c) => super::passthrough::vfio_user(&mut b, c),
            HotDevice::Vfio(c) => super::passthrough::vfio(&mut b, c),
        };
        let given = b.bars.take_given();
        if r.is_err() {
            b.bars.give_back(&given);
        }
        *bars = Some(b.bars);
        let passthrough = match r {
            Ok(p) => p,
            Err(e) => {
                // Whatever made it into the vIOMMU goes again.
                if let (true, Some(h)) = (cfg.iommu, &self.iommu) {
                    h.lock_for_host_calls()
                        .remove_endpoint(u32::from(slot) << 3);
                }
                return Err(e);
            }
        };
        let function = b
            .functions
            .pop()
            .ok_or_else(|| VmmError::Device(name, "no PCI function was built".into()))?;
        Ok(Plugged {
            bars: given,
            endpoint: (cfg.iommu).then_some(u32::from(slot) << 3),
            function,
            passthrough,
            subscribers: b.subscribers,
        })
    }
}
