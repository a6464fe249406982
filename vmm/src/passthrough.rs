//! Passthrough devices on the command line: vfio-user device processes and host VFIO.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::interrupt::InterruptManager;
use devices::passthrough::pci::PassthroughPci;
use devices::passthrough::vfio_user_backend::{VfioUserDevice, VfioUserDma};
use devices::passthrough::{PassthroughBackend, VFIO_PCI_ERR_IRQ_INDEX};
use devices::virtio::iommu::IommuHandle;
use event_manager::{EventOps, Events, MutEventSubscriber};
use iommu::viommu::BackendId;
use iommu::DmaBackend;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cli::PassthroughArg;
use crate::device_manager::{dev_err, Builder};
use crate::dirty::DirectDirty;
use crate::error::VmmError;

/// A passthrough device the VMM set up.
pub struct Passthrough {
    /// For logs and counters.
    pub label: String,
    /// Set when the device failed.
    pub failed: Arc<AtomicBool>,
    /// Host map and unmap calls of its DMA backend `(maps, unmaps)`.
    pub dma_calls: Arc<Mutex<(u64, u64)>>,
    /// DMA faults the device reported.
    pub faults: Arc<Mutex<u64>>,
    /// The DMA backend of a device not behind the vIOMMU (all guest RAM mapped at its GPA),
    /// kept for dirty tracking.
    pub direct: Option<DirectDirty>,
    /// The device side (regions, interrupts, migration states).
    pub backend: Arc<Mutex<dyn PassthroughBackend>>,
}

/// Turns the device's fault reports into virtio-iommu fault events, and notices a device
/// process that went away.
struct FaultForwarder {
    evt: EventFd,
    dev: VfioUserDevice,
    iommu: Option<(IommuHandle, u32, BackendId)>,
    faults: Arc<Mutex<u64>>,
    label: String,
    socket_fd: RawFd,
    reported_failure: bool,
}

impl FaultForwarder {
    fn forward(&mut self) {
        match self.dev.take_faults() {
            Ok(faults) => {
                *self.faults.lock().unwrap_or_else(|e| e.into_inner()) += faults.len() as u64;
                if let Some((h, ep, _)) = &self.iommu {
                    let mut s = h.lock();
                    for &(iova, write) in &faults {
                        s.report_device_fault(*ep, write, Some(iova));
                    }
                    drop(s);
                    if !faults.is_empty() {
                        h.notify_fault();
                    }
                } else {
                    for (iova, write) in faults {
                        log::warn!(
                            "{}: DMA fault at IOVA {iova:#x} ({})",
                            self.label,
                            if write { "write" } else { "read" }
                        );
                    }
                }
            }
            Err(e) => log::debug!("{}: cannot read its fault log: {e}", self.label),
        }
    }

    fn failed(&mut self) {
        if self.reported_failure {
            return;
        }
        self.reported_failure = true;
        self.dev.failed_flag().store(true, Ordering::Release);
        log::error!(
            "{}: the device process went away; the device is failed, the VM goes on",
            self.label
        );
        if let Some((h, _, backend)) = &self.iommu {
            h.lock().set_backend_failed(*backend);
        }
    }
}

impl MutEventSubscriber for FaultForwarder {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.socket_fd {
            if events
                .event_set()
                .intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
            {
                self.failed();
                let _ = ops.remove(events);
            }
            return;
        }
        let _ = self.evt.read();
        self.forward();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("{}: cannot watch its error interrupt: {e:?}", self.label);
        }
        // Only hang-ups: the client owns the socket's data.
        if let Err(e) = ops.add(Events::new_raw(self.socket_fd, EventSet::READ_HANG_UP)) {
            log::warn!("{}: cannot watch its socket: {e:?}", self.label);
        }
    }
}

/// Puts the PCI model of a passthrough device in `slot`.
fn add_function(
    b: &mut Builder,
    name: &str,
    slot: u8,
    backend: Arc<Mutex<dyn PassthroughBackend>>,
    failed: Arc<AtomicBool>,
) -> Result<(), VmmError> {
    let interrupts = &b.interrupts;
    let pci = PassthroughPci::new(
        name.to_string(),
        backend,
        &mut b.bars,
        &mut |n| interrupts.allocate_msi(n),
        failed,
    )
    .map_err(dev_err(name.to_string()))?;
    b.add_pci(slot, Arc::new(Mutex::new(pci)), name)
}

/// Where a device's DMA went: `(endpoint, backend ID)` in the vIOMMU, or the backend itself
/// (all RAM mapped) for dirty tracking.
type DmaAttachment = (Option<(u32, BackendId)>, Option<DirectDirty>);

/// Gives a device's DMA backend to the vIOMMU (`iommu=on`: returns its endpoint and backend
/// IDs), or maps all guest RAM at IOVA = GPA on it (returns it for dirty tracking).
fn attach_dma(
    b: &mut Builder,
    name: &str,
    slot: u8,
    behind: bool,
    mut dma: Box<dyn DmaBackend>,
) -> Result<DmaAttachment, VmmError> {
    let ep = u32::from(slot) << 3;
    match (&b.iommu, behind) {
        (Some(h), true) => {
            let mut s = h.lock();
            let id = s.add_backend(dma).map_err(dev_err(name.to_string()))?;
            s.add_endpoint(ep, Some(id), &[])
                .map_err(dev_err(name.to_string()))?;
            drop(s);
            b.endpoints.push(slot);
            Ok((Some((ep, id)), None))
        }
        (None, true) => Err(VmmError::Device(
            name.to_string(),
            "iommu=on needs --iommu".into(),
        )),
        _ => {
            let mut ranges = Vec::new();
            for &(gpa, len, _) in &b.ram.ranges {
                let hva = b
                    .mem
                    .get_host_address(GuestAddress(gpa))
                    .map_err(dev_err(name.to_string()))?;
                ranges.push((gpa, len, hva as u64));
            }
            let (threads, align) = b.static_map;
            let r = crate::static_map::map_all(dma.as_mut(), &ranges, align, threads)
                .map_err(dev_err(name.to_string()))?;
            log::info!(
                "{name}: guest RAM populated and mapped ({} MiB) in {} host calls by {} threads \
                 in {} ms",
                r.bytes >> 20,
                r.calls,
                r.threads,
                r.elapsed.as_millis()
            );
            Ok((None, Some(DirectDirty::new(dma))))
        }
    }
}

impl Passthrough {
    /// Connects a vfio-user device and puts it on the bus.
    ///
    /// # Errors
    /// [`VmmError::Device`] naming the socket.
    pub fn vfio_user(b: &mut Builder, arg: &PassthroughArg) -> Result<Self, VmmError> {
        let name = format!("vfio-user device {}", arg.path.display());
        let slot = b.slot(&name)?;
        let dev = VfioUserDevice::connect(&arg.path).map_err(dev_err(name.clone()))?;
        let failed = dev.failed_flag();
        let backend: Arc<Mutex<dyn PassthroughBackend>> = Arc::new(Mutex::new(dev.clone()));
        add_function(b, &name, slot, backend.clone(), failed.clone())?;

        let dma = VfioUserDma::new(dev.clone(), b.ram.clone());
        let dma_calls = dma.calls.clone();
        let (endpoint, direct) = attach_dma(b, &name, slot, arg.iommu, Box::new(dma))?;

        let evt = EventFd::new(EFD_NONBLOCK).map_err(dev_err(name.clone()))?;
        backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_irqs(VFIO_PCI_ERR_IRQ_INDEX, 0, &[evt.as_raw_fd()])
            .map_err(dev_err(name.clone()))?;
        let label = format!(
            "{name} at 00:{slot:02x}.0{}",
            if arg.iommu { " behind the vIOMMU" } else { "" }
        );
        let faults = Arc::new(Mutex::new(0));
        b.subscribers.push(Arc::new(Mutex::new(FaultForwarder {
            evt,
            socket_fd: dev.socket_fd(),
            dev: dev.clone(),
            iommu: endpoint.and_then(|(ep, id)| b.iommu.clone().map(|h| (h, ep, id))),
            faults: faults.clone(),
            label: label.clone(),
            reported_failure: false,
        })));
        Ok(Self {
            label,
            failed,
            dma_calls,
            faults,
            direct,
            backend,
        })
    }

    /// Opens a host VFIO device and puts it on the bus.
    ///
    /// # Errors
    /// [`VmmError::Device`]; on hosts without VFIO, a message saying so.
    pub fn vfio(b: &mut Builder, arg: &PassthroughArg) -> Result<Self, VmmError> {
        let name = format!("VFIO device {}", arg.path.display());
        let host = devices::passthrough::vfio::HostVfio::open(&arg.path, arg.iommufd)
            .map_err(dev_err(name.clone()))?;
        let slot = b.slot(&name)?;
        let failed = Arc::new(AtomicBool::new(false));
        let backend: Arc<Mutex<dyn PassthroughBackend>> = Arc::new(Mutex::new(host.device()));
        add_function(b, &name, slot, backend.clone(), failed.clone())?;
        let dma = host
            .dma(b.ram.clone(), b.mem.clone())
            .map_err(dev_err(name.clone()))?;
        let dma_calls = dma.calls();
        let (_, direct) = attach_dma(b, &name, slot, arg.iommu, Box::new(dma))?;
        Ok(Self {
            label: format!("{name} at 00:{slot:02x}.0"),
            failed,
            dma_calls,
            faults: Arc::new(Mutex::new(0)),
            direct,
            backend,
        })
    }

    /// Its counters.
    pub fn counters_line(&self) -> String {
        let (maps, unmaps) = *self.dma_calls.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "{}: dma_map_calls={maps} dma_unmap_calls={unmaps} dma_faults={} failed={}",
            self.label,
            *self.faults.lock().unwrap_or_else(|e| e.into_inner()),
            u8::from(self.failed.load(Ordering::Acquire))
        )
    }
}
