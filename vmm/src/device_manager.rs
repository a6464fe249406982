//! Builds the PCI devices from the command line: the host bridge (00:00.0), the
//! virtio-iommu (00:01.0), then virtio-blk disks and passthrough devices in order; wires their
//! interrupts, ioeventfds and event-loop handlers, and describes the topology for the ACPI
//! tables.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use boot::acpi::{IommuTopology, PlatformDescription};
use boot::layout;
use devices::bus::Bus;
use devices::interrupt::InterruptManager;
use devices::passthrough::pci::BarAllocator;
use devices::passthrough::vfio_user_backend::SharedRam;
use devices::pci::{HostBridge, PciBus, PciConfigIo, PciDevice, PciEcam, PciMmio};
use devices::virtio::block::VirtioBlock;
use devices::virtio::iommu::{IommuHandle, VirtioIommu};
use devices::virtio::net::{IotlbMode, NetConfig, VhostUserNet};
use devices::virtio::pci::{IoEventRegistrar, VirtioPciDevice, BAR0_SIZE};
use devices::virtio::VirtioDevice;
use devices::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use iommu::{Viommu, ViommuConfig};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::cli::{Cli, NetArg};
use crate::error::VmmError;
use crate::interrupts::{KvmInterruptManager, KvmInterrupts};
use crate::passthrough::Passthrough;

/// PCI device number of the virtio-iommu.
pub const IOMMU_SLOT: u8 = 1;
/// PCI device number of the first disk or passthrough device.
pub const FIRST_SLOT: u8 = 2;

/// KVM memory slots for device memory mapped into the guest (passthrough BAR areas), from
/// [`DEVICE_SLOT_BASE`] up: RAM has the slots below.
pub struct KvmGuestMapper {
    vm: Arc<VmFd>,
    /// The next never-used slot, and slots given back.
    slots: Mutex<(u32, Vec<u32>)>,
}

/// First KVM memory slot of device memory.
pub const DEVICE_SLOT_BASE: u32 = 64;

impl KvmGuestMapper {
    /// Slots of `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            slots: Mutex::new((DEVICE_SLOT_BASE, Vec::new())),
        }
    }

    fn set(&self, slot: u32, gpa: u64, len: u64, hva: u64) -> io::Result<()> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: hva,
            flags: 0,
        };
        // SAFETY: `hva..hva + len` is a live shared mapping owned by the passthrough function,
        // which removes the slot (len 0) before it unmaps it.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

impl devices::passthrough::pci::GuestMapper for KvmGuestMapper {
    fn map(&self, gpa: u64, len: u64, hva: u64) -> io::Result<u32> {
        let slot = {
            let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match s.1.pop() {
                Some(n) => n,
                None => {
                    s.0 += 1;
                    s.0 - 1
                }
            }
        };
        if let Err(e) = self.set(slot, gpa, len, hva) {
            self.slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .push(slot);
            return Err(e);
        }
        Ok(slot)
    }

    fn unmap(&self, slot: u32) {
        if let Err(e) = self.set(slot, 0, 0, 0) {
            log::error!("KVM memory slot {slot}: cannot remove it: {e}");
            return;
        }
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .push(slot);
    }
}

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
    frozen: Arc<AtomicBool>,
}

impl MutEventSubscriber for QueueNotifier {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let q = events.data() as usize;
        if let Some(e) = self.evts.get(q) {
            let _ = e.read();
            // Frozen for a snapshot: the request stays in the queue; whoever runs the guest
            // next notifies every queue again.
            if self.frozen.load(Ordering::Acquire) {
                return;
            }
            self.device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_notify(q);
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        let dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
        for (i, e) in self.evts.iter().enumerate() {
            // A vhost-user back end reads its own kicks.
            if dev.notified_outside(i) {
                continue;
            }
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
    frozen: Arc<AtomicBool>,
}

impl MutEventSubscriber for FaultNotifier {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        if self.frozen.load(Ordering::Acquire) {
            return;
        }
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

/// A PCI function: `(slot, name, device)`.
pub type Function = (u8, String, Arc<Mutex<dyn PciDevice>>);

/// A subscriber for the event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// BAR addresses from the 32-bit PCI window.
pub struct WindowAllocator {
    next: u64,
    end: u64,
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
    ioevents: Arc<dyn IoEventRegistrar>,
    /// Event-loop handlers.
    pub subscribers: Vec<Subscriber>,
    /// Device numbers behind the vIOMMU (for the VIOT).
    pub endpoints: Vec<u8>,
    next_slot: u8,
    /// The vIOMMU, if any.
    pub iommu: Option<IommuHandle>,
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// Guest RAM as device processes map it.
    pub ram: SharedRam,
    /// Maps device memory (passthrough BAR areas) into the guest.
    pub guest_mapper: Arc<KvmGuestMapper>,
    /// Threads and cut alignment (bytes) for mapping all RAM on a device outside the
    /// vIOMMU (`crate::static_map`).
    pub static_map: (usize, u64),
    /// Guest RAM was populated already (for the vIOMMU's boot bypass).
    pub ram_populated: bool,
    /// Set while the devices are frozen for a snapshot.
    pub frozen: Arc<AtomicBool>,
    /// PCI functions in slot order: `(slot, kind, device)`.
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

    fn add_virtio(
        &mut self,
        slot: u8,
        dev: Arc<Mutex<dyn VirtioDevice>>,
        name: &str,
    ) -> Result<(), VmmError> {
        let nq = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_max_sizes()
            .len();
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
        self.add_pci(slot, Arc::new(Mutex::new(pdev)), name)
    }

    /// Puts `dev` in `slot`.
    ///
    /// # Errors
    /// When the slot is taken.
    pub fn add_pci(
        &mut self,
        slot: u8,
        dev: Arc<Mutex<dyn PciDevice>>,
        name: &str,
    ) -> Result<(), VmmError> {
        if !self.pci.add_device(usize::from(slot), dev.clone()) {
            return Err(VmmError::Device(name.into(), "PCI slot taken".into()));
        }
        self.functions.push((slot, name.to_string(), dev));
        Ok(())
    }
}

/// Puts a vhost-user net device on the bus: connects to its back end and, behind the vIOMMU,
/// registers it as an endpoint whose host side turns unmaps into IOTLB invalidations.
fn add_vhost_user_net(
    b: &mut Builder,
    arg: &NetArg,
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
    b.add_virtio(slot, dev.clone(), &name)?;
    Ok((label, dev))
}

/// The VM's PCI devices.
pub struct DeviceManager {
    /// The virtio-iommu, if any.
    pub iommu: Option<(IommuHandle, Arc<Mutex<VirtioIommu>>)>,
    /// Disks: label and device.
    pub disks: Vec<(String, Arc<Mutex<VirtioBlock>>)>,
    /// vhost-user net devices: label and device.
    pub nets: Vec<(String, Arc<Mutex<VhostUserNet>>)>,
    /// Passthrough devices.
    pub passthrough: Vec<Passthrough>,
    /// Event-loop handlers to register.
    pub subscribers: Vec<Subscriber>,
    /// What the ACPI tables describe.
    pub platform: PlatformDescription,
    /// Guest RAM ranges `(GPA, bytes)`.
    pub ram_ranges: Vec<(u64, u64)>,
    /// With `--track-dirty`: pages passthrough devices wrote since tracking started.
    pub dirty: Mutex<Option<iommu::dirty::DirtyBitmap>>,
    /// Devices that could not report their writes when tracking last started.
    pub untracked: Mutex<Vec<String>>,
    /// Bus 0.
    pub pci: Arc<PciBus>,
    /// PCI functions in slot order: `(slot, kind, device)`.
    pub functions: Vec<Function>,
    /// Virtio devices and their queue counts.
    pub virtio: Vec<(Arc<Mutex<dyn VirtioDevice>>, usize)>,
    /// Set while the devices are frozen for a snapshot.
    pub frozen: Arc<AtomicBool>,
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
        ram: SharedRam,
        mem_size: u64,
        pio: &Bus,
        mmio: &Bus,
    ) -> Result<Self, VmmError> {
        let mut b = Builder {
            pci: PciBus::new(),
            bars: WindowAllocator {
                next: layout::PCI_MMIO_32_START,
                end: layout::PCI_MMIO_32_START + layout::PCI_MMIO_32_SIZE,
            },
            interrupts: KvmInterruptManager(KvmInterrupts::new(vm.clone())),
            guest_mapper: Arc::new(KvmGuestMapper::new(vm.clone())),
            ioevents: Arc::new(KvmIoEvents(vm)),
            subscribers: Vec::new(),
            endpoints: Vec::new(),
            next_slot: FIRST_SLOT,
            iommu: None,
            mem: mem.clone(),
            ram,
            static_map: (
                cli.dma_threads
                    .map_or_else(crate::static_map::default_threads, usize::from),
                crate::static_map::cut_align(cli.memory.hugepages),
            ),
            ram_populated: false,
            frozen: Arc::new(AtomicBool::new(false)),
            functions: Vec::new(),
            virtio: Vec::new(),
        };
        b.add_pci(0, Arc::new(Mutex::new(HostBridge::new())), "host bridge")?;

        let iommu = match &cli.iommu {
            Some(arg) => {
                let cfg = ViommuConfig {
                    bypass: arg.bypass,
                    guest_ram: layout::ram_ranges(mem_size),
                    ..ViommuConfig::default().with_widths(arg.aw_bits, arg.domains)
                };
                let handle = IommuHandle::new(Viommu::new(cfg))
                    .map_err(dev_err("the virtio-iommu".into()))?;
                let dev = Arc::new(Mutex::new(VirtioIommu::new(handle.clone(), mem.clone())));
                b.add_virtio(IOMMU_SLOT, dev.clone(), "the virtio-iommu")?;
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
        for d in &cli.disk {
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
                (None, true) => {
                    return Err(VmmError::Device(name, "iommu=on needs --iommu".into()))
                }
                _ => None,
            };
            let blk = VirtioBlock::new(&d.path, d.readonly, mem.clone(), behind)
                .map_err(dev_err(name.clone()))?;
            let blk = Arc::new(Mutex::new(blk));
            b.add_virtio(slot, blk.clone(), &name)?;
            let label = format!(
                "virtio-blk 00:{slot:02x}.0 ({}{})",
                d.path.display(),
                if d.iommu { ", behind the vIOMMU" } else { "" }
            );
            disks.push((label, blk));
        }

        let mut passthrough = Vec::new();
        for p in &cli.vfio_user {
            passthrough.push(Passthrough::vfio_user(&mut b, p)?);
        }
        for p in &cli.vfio {
            passthrough.push(Passthrough::vfio(&mut b, p)?);
        }

        let mut nets = Vec::new();
        for (i, n) in cli.vhost_user_net.iter().enumerate() {
            nets.push(add_vhost_user_net(&mut b, n, i)?);
        }

        let pci = Arc::new(b.pci);
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
                endpoints: b.endpoints.clone(),
            }),
        };
        Ok(Self {
            iommu,
            disks,
            nets,
            passthrough,
            subscribers: b.subscribers,
            platform,
            ram_ranges: layout::ram_ranges(mem_size),
            dirty: Mutex::new(None),
            untracked: Mutex::new(Vec::new()),
            pci: pci.clone(),
            functions: b.functions,
            virtio: b.virtio,
            frozen: b.frozen,
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
            let ls = &h.lock_stats;
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            lines.push(format!(
                "virtio-iommu 00:{IOMMU_SLOT:02x}.0: {} batches={} {} host_maps={} host_unmaps={} \
                 faults={} faults_dropped={} iotlb_hits={} iotlb_misses={} translated_bytes={} \
                 domains={} metadata_bytes={} dirty_reads={} dirty_pages_reported={} \
                 bad_chains={bad} lock_takes={} lock_contended={} lock_wait_us={}",
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
                c.dirty_reads,
                c.dirty_pages_reported,
                get(&ls.acquisitions),
                get(&ls.contended),
                get(&ls.wait_ns) / 1000,
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
        for (label, n) in &self.nets {
            let n = n.lock().unwrap_or_else(|e| e.into_inner());
            let c = n.counters();
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            lines.push(format!(
                "{label}: link={} misses={} updates={} prefetches={} update_pages={} \
                 invalidations={} invalidated_pages={} resent={} faults={} reconnects={} \
                 disconnects={} bad_messages={} ctrl_commands={}",
                if n.link_up() { "up" } else { "down" },
                get(&c.misses),
                get(&c.updates),
                get(&c.prefetches),
                get(&c.update_pages),
                get(&c.invalidations),
                get(&c.invalidated_pages),
                get(&c.resent),
                get(&c.faults),
                get(&c.connects),
                get(&c.disconnects),
                get(&c.bad_messages),
                get(&c.ctrl_commands),
            ));
        }
        for p in &self.passthrough {
            lines.push(p.counters_line());
        }
        if let Some(log) = self.dirty_since_boot() {
            let pages = log.count();
            let untracked = self.untracked.lock().unwrap_or_else(|e| e.into_inner());
            lines.push(format!(
                "dirty log: pages={pages} bytes={} untracked={} (guest pages written by \
                 passthrough devices since boot; untracked devices count every writable page)",
                pages * 4096,
                untracked.len()
            ));
        }
        lines
    }
}
