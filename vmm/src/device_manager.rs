//! Builds the PCI devices from the command line: the host bridge (00:00.0), the
//! virtio-iommu (00:01.0), virtio-blk disks (00:02.0 on), wires their interrupts, ioeventfds
//! and event-loop handlers, and describes the topology for the ACPI tables.

use std::io;
use std::sync::{Arc, Mutex};

use boot::acpi::{IommuTopology, PlatformDescription};
use boot::layout;
use devices::bus::Bus;
use devices::interrupt::InterruptManager;
use devices::pci::{HostBridge, PciBus, PciConfigIo, PciDevice, PciEcam, PciMmio};
use devices::virtio::block::VirtioBlock;
use devices::virtio::iommu::{IommuHandle, VirtioIommu};
use devices::virtio::pci::{IoEventRegistrar, VirtioPciDevice, BAR0_SIZE};
use devices::virtio::VirtioDevice;
use devices::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use iommu::{Viommu, ViommuConfig};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::cli::Cli;
use crate::error::VmmError;
use crate::interrupts::{KvmInterruptManager, KvmInterrupts};

/// PCI device number of the virtio-iommu.
pub const IOMMU_SLOT: u8 = 1;
/// PCI device number of the first disk.
pub const FIRST_DISK_SLOT: u8 = 2;

/// Registers ioeventfds with KVM.
struct KvmIoEvents(Arc<VmFd>);

impl IoEventRegistrar for KvmIoEvents {
    fn register(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
        self.0
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
        self.0
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// Calls `queue_notify` when a queue's ioeventfd fires.
pub struct QueueNotifier {
    device: Arc<Mutex<dyn VirtioDevice>>,
    evts: Vec<Arc<EventFd>>,
}

impl MutEventSubscriber for QueueNotifier {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let q = events.data() as usize;
        if let Some(e) = self.evts.get(q) {
            let _ = e.read();
            self.device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_notify(q);
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.evts.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(e.as_ref(), i as u32, EventSet::IN)) {
                log::error!("cannot watch queue {i}: {err:?}");
            }
        }
    }
}

/// Writes waiting fault events to the virtio-iommu's event queue.
pub struct FaultNotifier {
    device: Arc<Mutex<dyn VirtioDevice>>,
    evt: Arc<EventFd>,
}

impl MutEventSubscriber for FaultNotifier {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        // Queue 1 is the event queue: a notification delivers waiting faults.
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_notify(1);
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(self.evt.as_ref(), EventSet::IN)) {
            log::error!("cannot watch the fault eventfd: {err:?}");
        }
    }
}

/// A subscriber for the event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The VM's PCI devices.
pub struct DeviceManager {
    /// The virtio-iommu, if any.
    pub iommu: Option<(IommuHandle, Arc<Mutex<VirtioIommu>>)>,
    /// Disks: label and device.
    pub disks: Vec<(String, Arc<Mutex<VirtioBlock>>)>,
    /// Event-loop handlers to register.
    pub subscribers: Vec<Subscriber>,
    /// What the ACPI tables describe.
    pub platform: PlatformDescription,
}

struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    fn alloc(&mut self, size: u64) -> Result<u64, VmmError> {
        let at = self.next.next_multiple_of(size);
        if at + size > self.end {
            return Err(VmmError::Device(
                "PCI devices".into(),
                "the 32-bit PCI window is full".into(),
            ));
        }
        self.next = at + size;
        Ok(at)
    }
}

fn dev_err<E: std::error::Error + Send + Sync + 'static>(
    what: String,
) -> impl FnOnce(E) -> VmmError {
    move |e| VmmError::Device(what, Box::new(e))
}

impl DeviceManager {
    /// Creates the devices `cli` asks for and maps them on the buses.
    ///
    /// # Errors
    /// [`VmmError::Device`] naming the device.
    pub fn new(
        cli: &Cli,
        vm: Arc<VmFd>,
        mem: Arc<GuestMemoryMmap>,
        mem_size: u64,
        pio: &Bus,
        mmio: &Bus,
    ) -> Result<Self, VmmError> {
        let interrupts = KvmInterruptManager(KvmInterrupts::new(vm.clone()));
        let ioevents: Arc<dyn IoEventRegistrar> = Arc::new(KvmIoEvents(vm));
        let mut bars = BarAllocator {
            next: layout::PCI_MMIO_32_START,
            end: layout::PCI_MMIO_32_START + layout::PCI_MMIO_32_SIZE,
        };
        let mut pci = PciBus::new();
        pci.add_device(0, Arc::new(Mutex::new(HostBridge::new())));
        let mut subscribers: Vec<Subscriber> = Vec::new();
        let mut add_virtio = |pci: &mut PciBus,
                              slot: u8,
                              dev: Arc<Mutex<dyn VirtioDevice>>,
                              name: &str|
         -> Result<(), VmmError> {
            let nq = dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_max_sizes()
                .len();
            let vectors = interrupts
                .allocate_msi(nq + 1)
                .map_err(dev_err(format!("{name} interrupts")))?;
            let bar = bars.alloc(BAR0_SIZE)?;
            let pdev = VirtioPciDevice::new(dev.clone(), bar, vectors, Some(ioevents.clone()))
                .map_err(dev_err(format!("{name} transport")))?;
            subscribers.push(Arc::new(Mutex::new(QueueNotifier {
                device: dev,
                evts: pdev.queue_evts().to_vec(),
            })));
            let pdev: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(pdev));
            if !pci.add_device(usize::from(slot), pdev) {
                return Err(VmmError::Device(name.into(), "PCI slot taken".into()));
            }
            Ok(())
        };

        let mut fault_notifier = None;
        let iommu = match &cli.iommu {
            Some(arg) => {
                let cfg = ViommuConfig {
                    bypass: arg.bypass,
                    guest_ram: layout::ram_ranges(mem_size),
                    ..Default::default()
                };
                let handle = IommuHandle::new(Viommu::new(cfg))
                    .map_err(dev_err("the virtio-iommu".into()))?;
                let dev = Arc::new(Mutex::new(VirtioIommu::new(handle.clone(), mem.clone())));
                add_virtio(&mut pci, IOMMU_SLOT, dev.clone(), "the virtio-iommu")?;
                fault_notifier = Some(FaultNotifier {
                    device: dev.clone(),
                    evt: handle.fault_evt.clone(),
                });
                Some((handle, dev))
            }
            None => None,
        };

        let mut disks = Vec::new();
        let mut endpoints = Vec::new();
        for (i, d) in cli.disk.iter().enumerate() {
            let slot = FIRST_DISK_SLOT + i as u8;
            if slot >= 32 {
                return Err(VmmError::Device(
                    "disks".into(),
                    "too many devices for one PCI bus".into(),
                ));
            }
            let name = format!("disk {}", d.path.display());
            let behind = match (&iommu, d.iommu) {
                (Some((h, _)), true) => {
                    let ep = u32::from(slot) << 3;
                    h.lock()
                        .add_endpoint(ep, None, &[])
                        .map_err(dev_err(name.clone()))?;
                    endpoints.push(slot);
                    Some((h.clone(), ep))
                }
                (None, true) => {
                    return Err(VmmError::Device(name, "iommu=on needs --iommu".into()))
                }
                _ => None,
            };
            let blk = VirtioBlock::new(&d.path, d.readonly, mem.clone(), behind)
                .map_err(dev_err(name.clone()))?;
            let blk = Arc::new(Mutex::new(blk));
            add_virtio(&mut pci, slot, blk.clone(), &name)?;
            let label = format!(
                "virtio-blk 00:{slot:02x}.0 ({}{})",
                d.path.display(),
                if d.iommu { ", behind the vIOMMU" } else { "" }
            );
            disks.push((label, blk));
        }

        if let Some(f) = fault_notifier {
            subscribers.push(Arc::new(Mutex::new(f)));
        }
        let pci = Arc::new(pci);
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
            cpus: cli.cpus,
            pci_mmio32: (layout::PCI_MMIO_32_START, layout::PCI_MMIO_32_SIZE),
            pci_mmio64: (
                layout::pci_mmio_64_start(mem_size),
                layout::PCI_MMIO_64_SIZE,
            ),
            iommu: iommu.as_ref().map(|_| IommuTopology {
                iommu_device: IOMMU_SLOT,
                endpoints,
            }),
        };
        Ok(Self {
            iommu,
            disks,
            subscribers,
            platform,
        })
    }

    /// One line per device with its counters.
    pub fn counters_report(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some((h, dev)) = &self.iommu {
            let s = h.lock();
            let c = s.counters();
            let req: Vec<String> = iommu::viommu::Counters::REQUEST_NAMES
                .iter()
                .zip(c.requests)
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            let st: Vec<String> = iommu::protocol::Status::ALL
                .iter()
                .zip(c.statuses)
                .filter(|(_, v)| *v > 0)
                .map(|(s, v)| format!("status_{}={v}", s.name()))
                .collect();
            let bad = dev.lock().unwrap_or_else(|e| e.into_inner()).bad_chains();
            lines.push(format!(
                "virtio-iommu 00:{IOMMU_SLOT:02x}.0: {} batches={} {} host_maps={} host_unmaps={} \
                 faults={} faults_dropped={} iotlb_hits={} iotlb_misses={} translated_bytes={} \
                 domains={} metadata_bytes={} bad_chains={bad}",
                req.join(" "),
                c.batches,
                st.join(" "),
                c.host_maps,
                c.host_unmaps,
                c.faults,
                c.faults_dropped,
                c.iotlb_hits,
                c.iotlb_misses,
                c.translated_bytes,
                s.domain_ids().len(),
                s.metadata_bytes(),
            ));
        }
        for (label, d) in &self.disks {
            let c = d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .counters()
                .clone();
            lines.push(format!(
                "{label}: reads={} writes={} flushes={} bytes_read={} bytes_written={} io_errors={} \
                 translation_faults={} unsupported={}",
                c.reads,
                c.writes,
                c.flushes,
                c.bytes_read,
                c.bytes_written,
                c.io_errors,
                c.translation_faults,
                c.unsupported
            ));
        }
        lines
    }
}
