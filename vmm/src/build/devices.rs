//! Builds the PCI devices from a [`VmConfig`]: the host bridge (00:00.0), the virtio-iommu
//! (00:01.0), then virtio-blk disks, passthrough devices and vhost-user net devices in order;
//! wires their interrupts, ioeventfds and event-loop handlers, and describes the topology for
//! the ACPI tables.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use boot::acpi::{HotplugSlots, IommuTopology, PlatformDescription};
use boot::layout;
use devices::bus::Bus;
use devices::passthrough::vfio_user_backend::SharedRam;
use devices::pci::hotplug::{GedInterrupt, PciHotplug, PciHotplugRegs};
use devices::pci::{HostBridge, PciBus, PciConfigIo, PciEcam, PciMmio};
use devices::virtio::block::VirtioBlock;
use devices::virtio::iommu::{IommuHandle, VirtioIommu};
use devices::virtio::net::{IotlbMode, NetConfig, VhostUserNet};
use devices::GuestMemoryMmap;
use iommu::{Viommu, ViommuConfig};
use kvm_ioctls::VmFd;
use sync::MutexExt;
use vm_allocator::IdAllocator;

use super::builder::{dev_err, Builder, WindowAllocator};
use super::hotplug::Plugger;
use crate::config::{NetConfig as NetFlag, VmConfig};
use crate::error::VmmError;
use crate::machine::devices::{
    DeviceKind, DeviceManager, FaultNotifier, KvmGuestMapper, KvmIoEvents, FIRST_SLOT, IOMMU_SLOT,
};
use crate::machine::hotplug::{HotSlot, Hotplug};
use crate::machine::interrupts::{KvmInterruptManager, KvmInterrupts};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The Generic Event Device's edge: an irqfd on its GSI.
struct GedIrq(EventFd);

impl GedInterrupt for GedIrq {
    fn trigger(&self) {
        if let Err(e) = self.0.write(1) {
            log::error!("hot-plug: cannot raise the GED's interrupt: {e}");
        }
    }
}

/// Puts a vhost-user net device on the bus: connects to its back end and, behind the vIOMMU,
/// registers it as an endpoint whose host side turns unmaps into IOTLB invalidations.
fn add_vhost_user_net(
    b: &mut Builder,
    arg: &NetFlag,
    index: usize,
) -> Result<(String, Arc<Mutex<VhostUserNet>>), VmmError> {
    let name = format!("vhost-user-net {}", arg.socket.display());
    let slot = b.slot(&name)?;
    let ep = u32::from(slot) << 3;
    let iommu = match (&b.iommu, arg.iommu) {
        (Some(h), true) => Some((h.clone(), ep)),
        (None, true) => return Err(VmmError::Device(name, "iommu=on needs --iommu".into())),
        _ => None,
    };
    let label = format!(
        "vhost-user-net 00:{slot:02x}.0 ({}{})",
        arg.socket.display(),
        if arg.iommu { ", behind the vIOMMU" } else { "" }
    );
    let mut mac: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    mac[5] = mac[5].wrapping_add(index as u8);
    let cfg = NetConfig {
        label: label.clone(),
        socket: arg.socket.clone(),
        mac: arg.mac.unwrap_or(mac),
        queue_pairs: arg.queues,
        reconnect: arg.reconnect.map(std::time::Duration::from_secs),
        iommu: iommu.clone(),
        iotlb: if arg.prefetch {
            IotlbMode::Prefetch
        } else {
            IotlbMode::Miss
        },
    };
    let dev = VhostUserNet::new(cfg, b.mem.clone()).map_err(dev_err(name.clone()))?;
    if let Some((h, ep)) = &iommu {
        let mut s = h.lock();
        let id = s
            .add_backend(Box::new(dev.device_iotlb()))
            .map_err(dev_err(name.clone()))?;
        s.add_endpoint(*ep, Some(id), &[])
            .map_err(dev_err(name.clone()))?;
        drop(s);
        b.endpoints.push(slot);
    }
    let dev = Arc::new(Mutex::new(dev));
    b.add_virtio(slot, DeviceKind::VhostUserNet, dev.clone(), &name)?;
    Ok((label, dev))
}

/// Creates the devices `cfg` asks for and maps them on the buses: the host bridge (00:00.0),
/// the virtio-iommu (00:01.0), then virtio-blk disks, passthrough devices and vhost-user net
/// devices in order, from 00:02.0 up.
///
/// Returns the devices and, with `--hotplug`, what adds and removes more while the guest
/// runs.
///
/// # Errors
/// [`VmmError::Device`] naming the device.
pub fn build_devices(
    cfg: &VmConfig,
    vm: Arc<VmFd>,
    mem: Arc<GuestMemoryMmap>,
    ram: SharedRam,
    mem_size: u64,
    pio: &Bus,
    mmio: &Bus,
) -> Result<(DeviceManager, Option<Hotplug>), VmmError> {
    let hot_slots = cfg.hotplug.map_or(0, |h| h.slots());
    // Hot-plug slots: those behind the vIOMMU first (named in the VIOT), from 32 - N up.
    let hot: Vec<HotSlot> = match cfg.hotplug {
        Some(h) => {
            if h.iommu > 0 && cfg.iommu.is_none() {
                return Err(VmmError::Device(
                    "--hotplug".into(),
                    "iommu=N needs --iommu (or give direct=N alone)".into(),
                ));
            }
            (0..h.slots())
                .map(|i| HotSlot {
                    slot: 32 - h.slots() + i,
                    behind: i < h.iommu,
                })
                .collect()
        }
        None => Vec::new(),
    };
    let mut b = Builder {
        running: false,
        hot: hot.clone(),
        pci: PciBus::new(),
        bars: WindowAllocator::new(layout::PCI_MMIO_32_START, layout::PCI_MMIO_32_SIZE)?,
        interrupts: KvmInterruptManager(KvmInterrupts::new(vm.clone())),
        guest_mapper: Arc::new(KvmGuestMapper::new(vm.clone())),
        ioevents: Arc::new(KvmIoEvents(vm.clone())),
        subscribers: Vec::new(),
        endpoints: Vec::new(),
        // The highest slots are kept for hot-plug.
        slots: IdAllocator::new(FIRST_SLOT.into(), u32::from(31 - hot_slots))
            .map_err(|e| VmmError::Device("PCI bus 0".into(), Box::new(e)))?,
        iommu: None,
        mem: mem.clone(),
        ram,
        static_map: (
            cfg.dma_threads
                .map_or_else(super::static_map::default_threads, usize::from),
            super::static_map::cut_align(cfg.memory.hugepages),
        ),
        ram_populated: false,
        frozen: Arc::new(AtomicBool::new(false)),
        functions: Vec::new(),
        virtio: Vec::new(),
    };
    b.add_pci(
        0,
        DeviceKind::HostBridge,
        Arc::new(Mutex::new(HostBridge::new())),
        "host bridge",
    )?;

    let iommu = match &cfg.iommu {
        Some(arg) => {
            let cfg = ViommuConfig {
                bypass: arg.bypass,
                guest_ram: layout::ram_ranges(mem_size),
                ..ViommuConfig::default().with_widths(arg.aw_bits, arg.domains)
            };
            let handle =
                IommuHandle::new(Viommu::new(cfg)).map_err(dev_err("the virtio-iommu".into()))?;
            let dev = Arc::new(Mutex::new(VirtioIommu::new(handle.clone(), mem.clone())));
            b.add_virtio(
                IOMMU_SLOT,
                DeviceKind::VirtioIommu,
                dev.clone(),
                "the virtio-iommu",
            )?;
            dev.locked()
                .start_request_thread(b.frozen.clone())
                .map_err(dev_err("the virtio-iommu's request thread".into()))?;
            b.subscribers.push(Arc::new(Mutex::new(FaultNotifier {
                device: dev.clone(),
                evt: handle.fault_evt.clone(),
                frozen: b.frozen.clone(),
            })));
            b.iommu = Some(handle.clone());
            Some((handle, dev))
        }
        None => None,
    };

    let mut disks = Vec::new();
    for d in &cfg.disk {
        let name = format!("disk {}", d.path.display());
        let slot = b.slot(&name)?;
        let behind = match (&b.iommu, d.iommu) {
            (Some(h), true) => {
                let ep = u32::from(slot) << 3;
                h.lock()
                    .add_endpoint(ep, None, &[])
                    .map_err(dev_err(name.clone()))?;
                b.endpoints.push(slot);
                Some((h.clone(), ep))
            }
            (None, true) => return Err(VmmError::Device(name, "iommu=on needs --iommu".into())),
            _ => None,
        };
        let blk = VirtioBlock::new(&d.path, d.readonly, mem.clone(), behind)
            .map_err(dev_err(name.clone()))?;
        let blk = Arc::new(Mutex::new(blk));
        b.add_virtio(slot, DeviceKind::VirtioBlk, blk.clone(), &name)?;
        let label = format!(
            "virtio-blk 00:{slot:02x}.0 ({}{})",
            d.path.display(),
            if d.iommu { ", behind the vIOMMU" } else { "" }
        );
        disks.push((label, blk));
    }

    let mut passthrough = Vec::new();
    // Devices given by flags in hot-plug slots (`slot=N`): their event-loop handlers go
    // with them to `Hotplug`, so that they can be removed.
    let mut at_boot = Vec::new();
    for p in &cfg.vfio_user {
        let before = b.subscribers.len();
        let pt = super::passthrough::vfio_user(&mut b, p)?;
        if hot.iter().any(|h| h.slot == pt.slot) {
            let subs = b.subscribers.split_off(before);
            at_boot.push((pt.slot, p.iommu.then_some(u32::from(pt.slot) << 3), subs));
        }
        passthrough.push(pt);
    }
    for p in &cfg.vfio {
        passthrough.push(super::passthrough::vfio(&mut b, p)?);
    }

    let mut nets = Vec::new();
    for (i, n) in cfg.vhost_user_net.iter().enumerate() {
        nets.push(add_vhost_user_net(&mut b, n, i)?);
    }

    // The VIOT names every hot-plug slot behind the vIOMMU, taken or not.
    b.endpoints
        .extend(hot.iter().filter(|s| s.behind).map(|s| s.slot));
    b.endpoints.sort_unstable();
    b.endpoints.dedup();

    let pci = Arc::new(b.pci);
    let hotplug = if hot.is_empty() {
        None
    } else {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(dev_err("the hot-plug GED".into()))?;
        vm.register_irqfd(&evt, layout::GED_GSI)
            .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
        let mask = hot.iter().fold(0u32, |m, s| m | 1 << s.slot);
        let controller = Arc::new(PciHotplug::new(pci.clone(), mask, Arc::new(GedIrq(evt))));
        mmio.insert(
            Arc::new(Mutex::new(PciHotplugRegs(controller.clone()))),
            layout::PCI_HOTPLUG_START,
            layout::PCI_HOTPLUG_SIZE,
        )
        .map_err(dev_err("the PCI hot-plug registers".into()))?;
        let plugger = Plugger {
            bars: Mutex::new(Some(b.bars)),
            interrupts: KvmInterruptManager(b.interrupts.0.clone()),
            ioevents: b.ioevents.clone(),
            guest_mapper: b.guest_mapper.clone(),
            iommu: b.iommu.clone(),
            mem: b.mem.clone(),
            ram: b.ram.clone(),
            static_map: b.static_map,
            frozen: b.frozen.clone(),
        };
        Some(Hotplug::new(
            controller,
            hot.clone(),
            Box::new(plugger),
            at_boot,
        ))
    };
    mmio.insert(
        Arc::new(Mutex::new(PciEcam(pci.clone()))),
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
    )
    .map_err(dev_err("the PCI ECAM area".into()))?;
    mmio.insert(
        Arc::new(Mutex::new(PciMmio(pci.clone()))),
        layout::PCI_MMIO_32_START,
        layout::PCI_MMIO_32_SIZE,
    )
    .map_err(dev_err("the PCI window".into()))?;
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        u64::from(layout::PCI_CONFIG_ADDRESS_PORT),
        8,
    )
    .map_err(dev_err("the PCI configuration ports".into()))?;

    let platform = PlatformDescription {
        cpus: cfg.cpus,
        pci_mmio32: (layout::PCI_MMIO_32_START, layout::PCI_MMIO_32_SIZE),
        pci_mmio64: (
            layout::pci_mmio_64_start(mem_size),
            layout::PCI_MMIO_64_SIZE,
        ),
        iommu: iommu.as_ref().map(|_| IommuTopology {
            iommu_device: IOMMU_SLOT,
            endpoints: b.endpoints.clone(),
        }),
        hotplug: (!hot.is_empty()).then(|| HotplugSlots {
            slots: hot.iter().map(|s| s.slot).collect(),
            regs: layout::PCI_HOTPLUG_START,
            gsi: layout::GED_GSI,
        }),
    };
    Ok((
        DeviceManager {
            iommu,
            disks,
            nets,
            passthrough: RwLock::new(passthrough),
            subscribers: b.subscribers,
            platform,
            ram_ranges: layout::ram_ranges(mem_size),
            dirty: Mutex::new(None),
            untracked: Mutex::new(Vec::new()),
            pci: pci.clone(),
            functions: RwLock::new(b.functions),
            virtio: b.virtio,
            frozen: b.frozen,
        },
        hotplug,
    ))
}
