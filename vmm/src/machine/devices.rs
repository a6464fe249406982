//! The VM's PCI devices as they run: the device manager (what `build` put on the buses),
//! the KVM adapters devices use at run time (memory slots for BAR areas, ioeventfds), the
//! event-loop handlers that serve queues and fault events, each device's counters, and the
//! dirty tracking of every writer that is not a vCPU.
//!
//! Passthrough devices behind the vIOMMU are harvested through it (device reports by IOVA,
//! translated to GPA by its page tables, harvested before every unmap); those not behind it
//! see guest RAM at IOVA = GPA and report directly ([`super::dirty::DirectDirty`]). vhost-user back ends
//! log by GPA into a shared log (behind the vIOMMU or not). A device that cannot report has
//! every page it can write counted dirty (a vhost-user back end: all of RAM), so nothing is
//! lost. Migration adds the vCPUs' writes (KVM's dirty log) and the VMM's own (emulated
//! devices) on top of these (`Machine::harvest`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use boot::acpi::PlatformDescription;
use devices::pci::{PciBus, PciDevice};
use devices::virtio::block::VirtioBlock;
use devices::virtio::iommu::{IommuHandle, VirtioIommu};
use devices::virtio::net::VhostUserNet;
use devices::virtio::pci::IoEventRegistrar;
use devices::virtio::VirtioDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use iommu::dirty::DirtyBitmap;
use iommu::pagetable::PAGE_SIZE;
use iommu::viommu::HostSide;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use sync::{MutexExt, RwLockExt};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::passthrough::Passthrough;

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
            let mut s = self.slots.locked();
            match s.1.pop() {
                Some(n) => n,
                None => {
                    s.0 += 1;
                    s.0 - 1
                }
            }
        };
        if let Err(e) = self.set(slot, gpa, len, hva) {
            self.slots.locked().1.push(slot);
            return Err(e);
        }
        Ok(slot)
    }

    fn unmap(&self, slot: u32) {
        if let Err(e) = self.set(slot, 0, 0, 0) {
            log::error!("KVM memory slot {slot}: cannot remove it: {e}");
            return;
        }
        self.slots.locked().1.push(slot);
    }
}

/// Registers ioeventfds with KVM.
pub struct KvmIoEvents(pub Arc<VmFd>);

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
    /// The device whose queues these are.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// One ioeventfd per queue, in queue order.
    pub evts: Vec<Arc<EventFd>>,
    /// Set while the devices are frozen for a snapshot.
    pub frozen: Arc<AtomicBool>,
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
            self.device.locked().queue_notify(q);
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        let dev = self.device.locked();
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
    /// The virtio-iommu.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// Signalled when a fault event waits.
    pub evt: Arc<EventFd>,
    /// Set while the devices are frozen for a snapshot.
    pub frozen: Arc<AtomicBool>,
}

impl MutEventSubscriber for FaultNotifier {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        if self.frozen.load(Ordering::Acquire) {
            return;
        }
        // Queue 1 is the event queue: a notification delivers waiting faults.
        self.device.locked().queue_notify(1);
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(self.evt.as_ref(), EventSet::IN)) {
            log::error!("cannot watch the fault eventfd: {err:?}");
        }
    }
}

/// What a PCI function is: the part of it both sides of a migration must agree on. Its
/// serialized form (`"virtio-blk"`, ...) is what the stream's machine description carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// The host bridge at 00:00.0.
    #[serde(rename = "host bridge")]
    HostBridge,
    /// The virtio-iommu.
    #[serde(rename = "virtio-iommu")]
    VirtioIommu,
    /// A virtio-blk disk.
    #[serde(rename = "virtio-blk")]
    VirtioBlk,
    /// A passthrough device served over vfio-user.
    #[serde(rename = "vfio-user")]
    VfioUser,
    /// A host PCI device through VFIO.
    #[serde(rename = "vfio")]
    Vfio,
    /// A virtio-net device on a vhost-user back end.
    #[serde(rename = "vhost-user-net")]
    VhostUserNet,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::HostBridge => "host bridge",
            DeviceKind::VirtioIommu => "virtio-iommu",
            DeviceKind::VirtioBlk => "virtio-blk",
            DeviceKind::VfioUser => "vfio-user",
            DeviceKind::Vfio => "vfio",
            DeviceKind::VhostUserNet => "vhost-user-net",
        })
    }
}

/// A PCI function on bus 0.
pub struct Function {
    /// Its device number (function 0).
    pub slot: u8,
    /// What it is.
    pub kind: DeviceKind,
    /// Its name in logs and errors (`disk PATH`, `vfio-user device PATH`, ...).
    pub name: String,
    /// The PCI model.
    pub device: Arc<Mutex<dyn PciDevice>>,
}

/// A subscriber for the event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The VM's PCI devices.
pub struct DeviceManager {
    /// The virtio-iommu, if any.
    pub iommu: Option<(IommuHandle, Arc<Mutex<VirtioIommu>>)>,
    /// Disks: label and device.
    pub disks: Vec<(String, Arc<Mutex<VirtioBlock>>)>,
    /// vhost-user net devices: label and device.
    pub nets: Vec<(String, Arc<Mutex<VhostUserNet>>)>,
    /// Passthrough devices (hot-plug adds and removes some while the guest runs).
    pub passthrough: RwLock<Vec<Passthrough>>,
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
    /// PCI functions in slot order (hot-plug adds and removes some while the guest runs).
    pub functions: RwLock<Vec<Function>>,
    /// Virtio devices and their queue counts.
    pub virtio: Vec<(Arc<Mutex<dyn VirtioDevice>>, usize)>,
    /// Set while the devices are frozen for a snapshot.
    pub frozen: Arc<AtomicBool>,
}

impl DeviceManager {
    /// One line per device with its counters.
    pub fn counters_report(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some((_, dev)) = &self.iommu {
            let line = dev.locked().counters_line();
            lines.push(format!("virtio-iommu 00:{IOMMU_SLOT:02x}.0: {line}"));
        }
        for (label, d) in &self.disks {
            lines.push(format!("{label}: {}", d.locked().counters_line()));
        }
        for (label, n) in &self.nets {
            lines.push(format!("{label}: {}", n.locked().counters_line()));
        }
        for p in self.passthrough.read_locked().iter() {
            lines.push(p.counters_line());
        }
        if let Some(log) = self.dirty_since_boot() {
            let pages = log.count();
            let untracked = self.untracked.locked();
            lines.push(format!(
                "dirty log: pages={pages} bytes={} untracked={} (guest pages written by \
                 passthrough devices since boot; untracked devices count every writable page)",
                pages * 4096,
                untracked.len()
            ));
        }
        lines
    }

    /// Starts tracking the pages passthrough devices write. Returns the devices that cannot
    /// report them (all their writable pages count as dirty).
    pub fn start_dirty_tracking(&self) -> Vec<String> {
        let mut untracked = Vec::new();
        if let Some((h, _)) = &self.iommu {
            untracked.extend(h.lock_for_host_calls().start_dirty_tracking().untracked);
        }
        for p in self.passthrough.read_locked().iter() {
            if let Some(d) = &p.direct {
                if !d.start() {
                    untracked.push(p.label.clone());
                }
            }
        }
        for (label, n) in &self.nets {
            if !n.locked().start_dirty_log() {
                untracked.push(label.clone());
            }
        }
        *self.dirty.locked() = Some(DirtyBitmap::new(&self.ram_ranges));
        self.untracked.locked().clone_from(&untracked);
        untracked
    }

    /// ORs into `out` the pages passthrough devices and vhost-user back ends wrote since the
    /// last harvest.
    pub fn harvest_dirty(&self, out: &mut DirtyBitmap) {
        self.harvest_passthrough(out);
        self.harvest_vhost_user(out);
    }

    /// ORs into `out` the pages vhost-user back ends logged since the last harvest; returns
    /// how many they reported.
    pub fn harvest_vhost_user(&self, out: &mut DirtyBitmap) -> u64 {
        self.nets
            .iter()
            .map(|(_, n)| n.locked().harvest_dirty_log(&self.ram_ranges, out))
            .sum()
    }

    /// ORs into `out` the pages passthrough devices wrote since the last harvest.
    pub fn harvest_passthrough(&self, out: &mut DirtyBitmap) {
        if let Some((h, _)) = &self.iommu {
            h.lock_for_host_calls().harvest_dirty(out);
        }
        for p in self.passthrough.read_locked().iter() {
            if let Some(d) = &p.direct {
                d.harvest(&self.ram_ranges, out);
            }
        }
    }

    /// Stops tracking; ORs into `out` what was written since the last harvest.
    pub fn stop_dirty_tracking(&self, out: &mut DirtyBitmap) {
        self.harvest_dirty(out);
        if let Some((h, _)) = &self.iommu {
            if let Some(rest) = h.lock_for_host_calls().stop_dirty_tracking() {
                out.merge(&rest);
            }
        }
        for p in self.passthrough.read_locked().iter() {
            if let Some(d) = &p.direct {
                d.stop();
            }
        }
        for (_, n) in &self.nets {
            n.locked().stop_dirty_log();
        }
        *self.dirty.locked() = None;
    }

    /// With `--track-dirty`: the pages written by passthrough devices since boot.
    pub fn dirty_since_boot(&self) -> Option<DirtyBitmap> {
        let mut guard = self.dirty.locked();
        let acc = guard.as_mut()?;
        let mut round = DirtyBitmap::new(&self.ram_ranges);
        self.harvest_dirty(&mut round);
        acc.merge(&round);
        Some(acc.clone())
    }

    /// Writes the pages passthrough devices wrote since boot (`--dirty-log-out`): a line
    /// `pages=N`, then one line `FIRST+COUNT` (page frame numbers, hex) per run.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_dirty_log(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::fmt::Write as _;
        let Some(log) = self.dirty_since_boot() else {
            return Err(std::io::Error::other(
                "dirty tracking is off (--track-dirty)",
            ));
        };
        let mut out = format!("pages={}\n", log.count());
        log.for_each_run(|gpa, bytes| {
            let _ = writeln!(out, "{:x}+{:x}", gpa / PAGE_SIZE, bytes / PAGE_SIZE);
        });
        std::fs::write(path, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::{ActivateError, VirtioInterrupt};
    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::Queue;

    /// A device that records its notifications; `outside` is served by a back end.
    struct Notes {
        notified: Arc<Mutex<Vec<usize>>>,
        outside: usize,
    }

    impl VirtioDevice for Notes {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![8; 3]
        }
        fn avail_features(&self) -> u64 {
            0
        }
        fn set_acked_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: Vec<Queue>,
            _: Arc<dyn VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn queue_notify(&mut self, queue: usize) {
            self.notified.locked().push(queue);
        }
        fn notified_outside(&self, queue: usize) -> bool {
            queue == self.outside
        }
    }

    /// Runs the event loop until it has nothing more to do.
    fn drain(em: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>) {
        while em.run_with_timeout(0).unwrap() > 0 {}
    }

    fn eventfd() -> Arc<EventFd> {
        Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap())
    }

    /// A queue's eventfd notifies its queue, except a queue a back end serves (its eventfd is
    /// not watched) and while the devices are frozen (the kick is consumed, the request stays
    /// queued). The fault eventfd notifies the virtio-iommu's event queue (1), not while
    /// frozen.
    #[test]
    fn eventfds_notify_their_queues_unless_frozen_or_served_outside() {
        let notified = Arc::new(Mutex::new(Vec::new()));
        let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Notes {
            notified: notified.clone(),
            outside: 1,
        }));
        let frozen = Arc::new(AtomicBool::new(false));
        let evts: Vec<_> = (0..3).map(|_| eventfd()).collect();
        let fault = eventfd();
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(QueueNotifier {
            device: device.clone(),
            evts: evts.clone(),
            frozen: frozen.clone(),
        })));
        em.add_subscriber(Arc::new(Mutex::new(FaultNotifier {
            device,
            evt: fault.clone(),
            frozen: frozen.clone(),
        })));
        for e in &evts {
            e.write(1).unwrap();
        }
        drain(&mut em);
        let mut got = std::mem::take(&mut *notified.locked());
        got.sort_unstable();
        assert_eq!(got, vec![0, 2]);
        assert_eq!(evts[0].read().ok(), None, "the kick was consumed");
        assert_eq!(
            evts[1].read().ok(),
            Some(1),
            "a back end's kick is left alone"
        );

        fault.write(1).unwrap();
        drain(&mut em);
        assert_eq!(std::mem::take(&mut *notified.locked()), vec![1]);

        frozen.store(true, Ordering::Release);
        evts[2].write(1).unwrap();
        fault.write(1).unwrap();
        drain(&mut em);
        assert_eq!(*notified.locked(), Vec::<usize>::new());
        assert_eq!(evts[2].read().ok(), None, "consumed while frozen");
        assert_eq!(fault.read().ok(), None, "consumed while frozen");
    }
}
