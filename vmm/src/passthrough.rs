//! Passthrough devices on the command line: vfio-user device processes and host VFIO.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::interrupt::InterruptManager;
use devices::passthrough::message_dma::MessageDma;
use devices::passthrough::pci::PassthroughPci;
use devices::passthrough::vfio_user::caps::ext;
use devices::passthrough::vfio_user_backend::{VfioUserDevice, VfioUserDma};
use devices::passthrough::{PassthroughBackend, VFIO_PCI_ERR_IRQ_INDEX};
use devices::virtio::iommu::IommuHandle;
use event_manager::{EventOps, Events, MutEventSubscriber};
use iommu::backend::PageResponse;
use iommu::on_demand::{OnDemand, OnDemandCounters};
use iommu::viommu::BackendId;
use iommu::DmaBackend;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::cli::PassthroughArg;
use crate::device_manager::{dev_err, Builder};
use crate::dirty::DirectDirty;
use crate::error::VmmError;

/// Page requests one device may have answered per [`PRQ_WINDOW`] (3,200 a second).
pub const PRQ_BUDGET: u32 = 32;
/// The throttling window of page requests.
pub const PRQ_WINDOW: Duration = Duration::from_millis(10);

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
    /// kept for dirty tracking (and for page requests under `dma=fault`).
    pub direct: Option<Arc<DirectDirty>>,
    /// Under `dma=fault`: the on-demand backend's counters, and the device (whose page
    /// request counters the line shows).
    pub on_demand: Option<(Arc<Mutex<OnDemandCounters>>, VfioUserDevice, Arc<AtomicU64>)>,
    /// The device side (regions, interrupts, migration states).
    pub backend: Arc<Mutex<dyn PassthroughBackend>>,
    /// Under `dma=messages`: the table its DMA messages are answered through (counters).
    pub messages: Option<Arc<MessageDma>>,
}

/// Turns the device's fault reports into virtio-iommu fault events, and notices a device
/// process that went away.
struct FaultForwarder {
    evt: EventFd,
    dev: VfioUserDevice,
    iommu: Option<(IommuHandle, u32, BackendId)>,
    /// Under `dma=fault` outside the vIOMMU: where page requests go.
    direct: Option<Arc<DirectDirty>>,
    /// The device makes page requests (`dma=fault`).
    page_requests: bool,
    /// Under `dma=messages`: the table whose refused accesses are faults too.
    messages: Option<Arc<MessageDma>>,
    /// Throttling of page requests: the current window's start and count, the timer that
    /// serves a request held back, and how many were held back.
    prq_window: (Instant, u32),
    prq_timer: Option<TimerFd>,
    prq_timer_armed: bool,
    prq_throttled: Arc<AtomicU64>,
    faults: Arc<Mutex<u64>>,
    label: String,
    socket_fd: RawFd,
    reported_failure: bool,
}

impl FaultForwarder {
    /// Whether a page request may be served now: at most [`PRQ_BUDGET`] per
    /// [`PRQ_WINDOW`] per device. A request over the budget waits, in the device, for the
    /// timer that ends the window: a device that floods is slowed down, the event loop is
    /// not taken over.
    fn prq_admit(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.prq_window.0) >= PRQ_WINDOW {
            self.prq_window = (now, 0);
        }
        if self.prq_window.1 < PRQ_BUDGET {
            self.prq_window.1 += 1;
            return true;
        }
        if !self.prq_timer_armed {
            let left = PRQ_WINDOW.saturating_sub(now.duration_since(self.prq_window.0));
            if let Some(t) = self.prq_timer.as_mut() {
                if t.reset(left.max(Duration::from_micros(100)), None).is_ok() {
                    self.prq_timer_armed = true;
                }
            }
            self.prq_throttled.fetch_add(1, Ordering::Relaxed);
        }
        // Without a timer (it could not be made) the request is served late by the next
        // interrupt rather than never.
        !self.prq_timer_armed && self.prq_timer.is_none()
    }

    /// Answers the device's pending page request: the vIOMMU's endpoint backend (or the
    /// direct backend) installs the host mapping if the access is allowed.
    fn serve_page_request(&mut self) {
        if !self.prq_admit() {
            return;
        }
        let (id, iova, write) = match self.dev.take_page_request() {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                log::debug!("{}: cannot read its page request: {e}", self.label);
                return;
            }
        };
        let r = match (&self.iommu, &self.direct) {
            (Some((h, _, backend)), _) => h.lock().page_request(*backend, iova, write),
            (None, Some(d)) => d.page_request(iova, write),
            (None, None) => Ok(PageResponse::Invalid),
        };
        let code = match r {
            Ok(PageResponse::Retry) => ext::PRQ_RETRY,
            Ok(PageResponse::Invalid) => ext::PRQ_INVALID,
            Err(e) => {
                log::warn!(
                    "{}: page request at IOVA {iova:#x}: host map failed: {e}",
                    self.label
                );
                ext::PRQ_INVALID
            }
        };
        if let Err(e) = self.dev.answer_page_request(id, code) {
            log::debug!("{}: cannot answer its page request: {e}", self.label);
        }
    }

    fn forward(&mut self) {
        if self.page_requests {
            self.serve_page_request();
        }
        // The device's own fault log (faults it found itself), and under dma=messages the
        // accesses the VMM refused (which the device does not log again).
        let faults = self.dev.take_faults().map(|mut f| {
            if let Some(m) = &self.messages {
                f.extend(m.take_faults());
            }
            f
        });
        match faults {
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
        if let Some(t) = self.prq_timer.as_mut() {
            if events.fd() == t.as_raw_fd() {
                let _ = t.wait();
                self.prq_timer_armed = false;
                self.forward();
                return;
            }
        }
        if events.fd() == self.socket_fd {
            if events
                .event_set()
                .intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
            {
                self.failed();
                let _ = ops.remove(events);
                return;
            }
            // DMA_READ/DMA_WRITE the server sent while no request of ours was outstanding.
            if let Err(e) = self.dev.serve_server_commands() {
                log::error!("{}: {e}", self.label);
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
        if let Some(t) = &self.prq_timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                log::warn!("{}: cannot watch its page-request timer: {e:?}", self.label);
            }
        }
        // Hang-ups; and, under dma=messages, the server's commands between our requests
        // (during a request the client answers them itself).
        let set = if self.messages.is_some() {
            EventSet::READ_HANG_UP | EventSet::IN
        } else {
            EventSet::READ_HANG_UP
        };
        if let Err(e) = ops.add(Events::new_raw(self.socket_fd, set)) {
            log::warn!("{}: cannot watch its socket: {e:?}", self.label);
        }
    }
}

/// Puts the PCI model of a passthrough device in `slot`; with `mmap`, the BAR areas the
/// device lets map are mapped into the guest and its ioeventfds registered.
fn add_function(
    b: &mut Builder,
    name: &str,
    slot: u8,
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
    b.add_pci(slot, Arc::new(Mutex::new(pci)), name)
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
                let r = crate::static_map::populate_all(&ranges, align, threads)
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
        _ if on_demand => {
            // Recorded only: the device's page requests install windows of it.
            for &(gpa, len, _) in &b.ram.ranges {
                dma.map(gpa, gpa, len, iommu::Perm::RW)
                    .map_err(dev_err(name.to_string()))?;
            }
            Ok((None, Some(Arc::new(DirectDirty::new(dma)))))
        }
        _ => {
            let ranges = ram_with_hvas(b, name)?;
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
            Ok((None, Some(Arc::new(DirectDirty::new(dma)))))
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
        add_function(b, &name, slot, backend.clone(), failed.clone(), arg.mmap)?;

        let evt = EventFd::new(EFD_NONBLOCK).map_err(dev_err(name.clone()))?;
        let mut dma = VfioUserDma::new(dev.clone(), b.ram.clone());
        let dma_calls = dma.calls.clone();
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
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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
            prq_window: (Instant::now(), 0),
            prq_timer: on_demand.as_ref().and_then(|_| TimerFd::new().ok()),
            prq_timer_armed: false,
            prq_throttled: prq_throttled.clone(),
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
            on_demand: on_demand.map(|(c, d)| (c, d, prq_throttled)),
            backend,
            messages,
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
        add_function(b, &name, slot, backend.clone(), failed.clone(), arg.mmap)?;
        let dma = host
            .dma(b.ram.clone(), b.mem.clone())
            .map_err(dev_err(name.clone()))?;
        let dma_calls = dma.calls();
        let (_, direct) = attach_dma(b, &name, slot, arg.iommu, false, Box::new(dma))?;
        Ok(Self {
            label: format!("{name} at 00:{slot:02x}.0"),
            failed,
            dma_calls,
            faults: Arc::new(Mutex::new(0)),
            direct,
            on_demand: None,
            backend,
            messages: None,
        })
    }

    /// Its counters.
    pub fn counters_line(&self) -> String {
        let (maps, unmaps) = *self.dma_calls.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = format!(
            "{}: dma_map_calls={maps} dma_unmap_calls={unmaps} dma_faults={} failed={}",
            self.label,
            *self.faults.lock().unwrap_or_else(|e| e.into_inner()),
            u8::from(self.failed.load(Ordering::Acquire))
        );
        if let Some(m) = &self.messages {
            let c = &m.counters;
            line.push_str(&format!(
                " dma_messages_read={} dma_messages_written={} dma_message_bytes={} \
                 dma_messages_refused={}",
                c.reads.load(Ordering::Relaxed),
                c.writes.load(Ordering::Relaxed),
                c.bytes.load(Ordering::Relaxed),
                c.refused.load(Ordering::Relaxed)
            ));
        }
        if let Some((counters, dev, throttled)) = &self.on_demand {
            let c = *counters.lock().unwrap_or_else(|e| e.into_inner());
            let [requests, retries, invalid, timeouts] =
                dev.page_request_counters().unwrap_or_default();
            line.push_str(&format!(
                " page_requests={} page_requests_invalid={} installs={} installed_bytes={} \
                 peak_installed_bytes={} device_page_requests={requests} device_retries={retries} \
                 device_invalid={invalid} device_timeouts={timeouts} page_requests_throttled={}",
                c.page_requests,
                c.invalid,
                c.installs,
                c.installed_bytes,
                c.peak_installed_bytes,
                throttled.load(Ordering::Relaxed)
            ));
        }
        line
    }
}
