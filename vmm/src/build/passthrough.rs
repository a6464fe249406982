//! Sets up passthrough devices from their flags: connects the vfio-user server (or opens the
//! host VFIO device), puts its PCI model on the bus, and gives its DMA backend to the
//! virtio-iommu or maps all guest RAM on it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use devices::interrupt::InterruptManager;
use devices::passthrough::message_dma::MessageDma;
use devices::passthrough::pci::PassthroughPci;
use devices::passthrough::vfio_user_backend::{VfioUserDevice, VfioUserDma};
use devices::passthrough::{PassthroughBackend, VFIO_PCI_ERR_IRQ_INDEX};
use iommu::on_demand::OnDemand;
use iommu::viommu::{BackendId, HostSide};
use iommu::DmaBackend;
use sync::MutexExt;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::builder::{dev_err, Builder};
use crate::config::PassthroughConfig;
use crate::error::VmmError;
use crate::machine::devices::DeviceKind;
use crate::machine::dirty::DirectDirty;
use crate::machine::passthrough::{FaultForwarder, Passthrough};

/// Puts the PCI model of a passthrough device in `slot`; with `mmap`, the BAR areas the
/// device lets map are mapped into the guest and its ioeventfds registered.
fn add_function(
    b: &mut Builder,
    name: &str,
    slot: u8,
    kind: DeviceKind,
    backend: Arc<Mutex<dyn PassthroughBackend>>,
    failed: Arc<AtomicBool>,
    mmap: bool,
) -> Result<(), VmmError> {
    let interrupts = &b.interrupts;
    let access = mmap.then(|| devices::passthrough::pci::DirectAccess {
        mapper: b.guest_mapper.clone(),
        ioevents: b.ioevents(),
    });
    let pci = PassthroughPci::new(
        name.to_string(),
        backend,
        &mut b.bars,
        &mut |n| interrupts.allocate_msi(n),
        failed,
        access,
    )
    .map_err(dev_err(name.to_string()))?;
    b.add_pci(slot, kind, Arc::new(Mutex::new(pci)), name)
}

/// Guest RAM ranges as `(gpa, len, hva)`.
fn ram_with_hvas(b: &Builder, name: &str) -> Result<Vec<(u64, u64, u64)>, VmmError> {
    let mut ranges = Vec::new();
    for &(gpa, len, _) in &b.ram.ranges {
        let hva = b
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(dev_err(name.to_string()))?;
        ranges.push((gpa, len, hva as u64));
    }
    Ok(ranges)
}

/// Where a device's DMA went: `(endpoint, backend ID)` in the vIOMMU, or the backend itself
/// (all RAM mapped) for dirty tracking.
type DmaAttachment = (Option<(u32, BackendId)>, Option<Arc<DirectDirty>>);

/// Gives a device's DMA backend to the vIOMMU (`iommu=on`: returns its endpoint and backend
/// IDs), or maps all guest RAM at IOVA = GPA on it (returns it for dirty tracking).
fn attach_dma(
    b: &mut Builder,
    name: &str,
    slot: u8,
    behind: bool,
    on_demand: bool,
    mut dma: Box<dyn DmaBackend>,
) -> Result<DmaAttachment, VmmError> {
    let ep = u32::from(slot) << 3;
    match (&b.iommu, behind) {
        (Some(h), true) => {
            // A vIOMMU that starts in bypass identity-maps all RAM on the device's backend
            // as it is added: populate RAM first, split across threads (once per VM), so
            // that those host calls find the pages present.
            if h.lock().config().bypass == 1 && !b.ram_populated && !on_demand {
                let ranges = ram_with_hvas(b, name)?;
                let (threads, align) = b.static_map;
                let r = super::static_map::populate_all(&ranges, align, threads)
                    .map_err(dev_err(name.to_string()))?;
                b.ram_populated = true;
                log::info!(
                    "{name}: guest RAM populated for the boot bypass ({} MiB) by {} threads in \
                     {} ms",
                    r.bytes >> 20,
                    r.threads,
                    r.elapsed.as_millis()
                );
            }
            let id = if b.running {
                // While the guest runs: in the host order (after any request in flight), and
                // within what the guest already read of page sizes and ranges.
                let mut s = h.lock_for_host_calls();
                let id = s
                    .add_backend_within(dma)
                    .map_err(dev_err(name.to_string()))?;
                s.add_endpoint(ep, Some(id), &[])
                    .map_err(dev_err(name.to_string()))?;
                // Tracking runs (`--track-dirty`): the device logs its writes from now on.
                if s.track_new_backend(id) == Some(false) {
                    log::warn!(
                        "{name}: cannot track the pages it writes: every page mapped writable \
                         for it counts dirty"
                    );
                }
                id
            } else {
                let mut s = h.lock();
                let id = s.add_backend(dma).map_err(dev_err(name.to_string()))?;
                s.add_endpoint(ep, Some(id), &[])
                    .map_err(dev_err(name.to_string()))?;
                id
            };
            b.endpoints.push(slot);
            Ok((Some((ep, id)), None))
        }
        (None, true) => Err(VmmError::Device(
            name.to_string(),
            "iommu=on needs --iommu".into(),
        )),
        _ if on_demand => {
            // Recorded only: the device's page requests install windows of it.
            let mut mapped = Vec::new();
            for &(gpa, len, _) in &b.ram.ranges {
                dma.map(gpa, gpa, len, iommu::Perm::RW)
                    .map_err(dev_err(name.to_string()))?;
                mapped.push((gpa, len));
            }
            let direct = DirectDirty::new(dma).with_mappings(mapped);
            Ok((None, Some(Arc::new(direct))))
        }
        _ => {
            let ranges = ram_with_hvas(b, name)?;
            let (threads, align) = b.static_map;
            let r = super::static_map::map_all(dma.as_mut(), &ranges, align, threads)
                .map_err(dev_err(name.to_string()))?;
            log::info!(
                "{name}: guest RAM populated and mapped ({} MiB) in {} host calls by {} threads \
                 in {} ms",
                r.bytes >> 20,
                r.calls,
                r.threads,
                r.elapsed.as_millis()
            );
            // The pieces map_all made, one map call each.
            let mapped = super::static_map::cuts(&ranges, align, threads)
                .into_iter()
                .flatten()
                .map(|p| (p.gpa, p.len))
                .collect();
            Ok((
                None,
                Some(Arc::new(DirectDirty::new(dma).with_mappings(mapped))),
            ))
        }
    }
}

/// Connects a vfio-user device and puts it on the bus.
///
/// # Errors
/// [`VmmError::Device`] naming the socket.
pub fn vfio_user(b: &mut Builder, arg: &PassthroughConfig) -> Result<Passthrough, VmmError> {
    let name = format!("vfio-user device {}", arg.path.display());
    let slot = match arg.slot {
        Some(s) if !b.running => b.hot_slot(s, arg.iommu, &name)?,
        _ => b.slot(&name)?,
    };
    let dev = VfioUserDevice::connect(&arg.path).map_err(dev_err(name.clone()))?;
    let failed = dev.failed_flag();
    let backend: Arc<Mutex<dyn PassthroughBackend>> = Arc::new(Mutex::new(dev.clone()));
    add_function(
        b,
        &name,
        slot,
        DeviceKind::VfioUser,
        backend.clone(),
        failed.clone(),
        arg.mmap,
    )?;

    let evt = EventFd::new(EFD_NONBLOCK).map_err(dev_err(name.clone()))?;
    let mut dma = VfioUserDma::new(dev.clone(), b.ram.clone());
    let dma_calls = dma.calls.clone();
    let mapped_bytes = dma.mapped_bytes.clone();
    let messages = if arg.messages {
        let notify = evt.try_clone().map_err(dev_err(name.clone()))?;
        let table = Arc::new(MessageDma::new(b.mem.clone(), Some(notify)));
        dma = dma.by_messages(table.clone());
        Some(table)
    } else {
        None
    };
    let (dma, on_demand): (Box<dyn DmaBackend>, _) = match arg.fault_window {
        Some(window) => {
            if !dev.enable_page_requests().map_err(dev_err(name.clone()))? {
                return Err(VmmError::Device(
                    name,
                    "dma=fault needs a device that makes page requests".into(),
                ));
            }
            let od = OnDemand::new(Box::new(dma), window);
            let counters = od.shared_counters();
            (Box::new(od), Some((counters, dev.clone())))
        }
        None => (Box::new(dma), None),
    };
    let (endpoint, direct) = attach_dma(b, &name, slot, arg.iommu, on_demand.is_some(), dma)?;

    backend
        .locked()
        .set_irqs(VFIO_PCI_ERR_IRQ_INDEX, 0, &[evt.as_raw_fd()])
        .map_err(dev_err(name.clone()))?;
    let label = format!(
        "{name} at 00:{slot:02x}.0{}",
        if arg.iommu { " behind the vIOMMU" } else { "" }
    );
    let faults = Arc::new(Mutex::new(0));
    let prq_throttled = Arc::new(AtomicU64::new(0));
    b.subscribers.push(Arc::new(Mutex::new(FaultForwarder {
        evt,
        socket_fd: dev.socket_fd(),
        dev: dev.clone(),
        iommu: endpoint.and_then(|(ep, id)| b.iommu.clone().map(|h| (h, ep, id))),
        direct: direct.clone().filter(|_| on_demand.is_some()),
        page_requests: on_demand.is_some(),
        messages: messages.clone(),
        prq: crate::machine::passthrough::PrqThrottle::new(
            on_demand.as_ref().and_then(|_| TimerFd::new().ok()),
            prq_throttled.clone(),
        ),
        faults: faults.clone(),
        label: label.clone(),
        reported_failure: false,
    })));
    Ok(Passthrough {
        label,
        slot,
        failed,
        dma_calls,
        faults,
        direct,
        on_demand: on_demand.map(|(c, d)| (c, d, prq_throttled)),
        backend,
        messages,
        mapped_bytes: Some(mapped_bytes),
    })
}

/// Opens a host VFIO device and puts it on the bus.
///
/// # Errors
/// [`VmmError::Device`]; on hosts without VFIO, a message saying so.
pub fn vfio(b: &mut Builder, arg: &PassthroughConfig) -> Result<Passthrough, VmmError> {
    let name = format!("VFIO device {}", arg.path.display());
    let host = devices::passthrough::vfio::HostVfio::open(&arg.path, arg.iommufd)
        .map_err(dev_err(name.clone()))?;
    let slot = b.slot(&name)?;
    let failed = Arc::new(AtomicBool::new(false));
    let backend: Arc<Mutex<dyn PassthroughBackend>> = Arc::new(Mutex::new(host.device()));
    add_function(
        b,
        &name,
        slot,
        DeviceKind::Vfio,
        backend.clone(),
        failed.clone(),
        arg.mmap,
    )?;
    let dma = host
        .dma(b.ram.clone(), b.mem.clone())
        .map_err(dev_err(name.clone()))?;
    let dma_calls = dma.calls();
    let (_, direct) = attach_dma(b, &name, slot, arg.iommu, false, Box::new(dma))?;
    Ok(Passthrough {
        label: format!("{name} at 00:{slot:02x}.0"),
        slot,
        failed,
        dma_calls,
        faults: Arc::new(Mutex::new(0)),
        direct,
        on_demand: None,
        backend,
        messages: None,
        mapped_bytes: None,
    })
}
