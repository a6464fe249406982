//! Passthrough devices as they run: vfio-user device processes and host VFIO functions,
//! their counters, and the forwarding of their fault reports and page requests to the
//! virtio-iommu (or, outside it, to the on-demand backend), with page requests throttled per
//! device. `build::passthrough` sets them up.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::passthrough::message_dma::MessageDma;
use devices::passthrough::vfio_user::caps::ext;
use devices::passthrough::vfio_user_backend::VfioUserDevice;
use devices::passthrough::PassthroughBackend;
use devices::virtio::iommu::IommuHandle;
use event_manager::{EventOps, Events, MutEventSubscriber};
use iommu::backend::PageResponse;
use iommu::on_demand::OnDemandCounters;
use iommu::viommu::{BackendId, HostSide};
use sync::MutexExt;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::dirty::DirectDirty;

/// Page requests one device may have answered per [`PRQ_WINDOW`] (3,200 a second).
pub const PRQ_BUDGET: u32 = 32;
/// The throttling window of page requests.
pub const PRQ_WINDOW: Duration = Duration::from_millis(10);

/// The page-request budget of one device: the current window's start and the requests
/// served in it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrqWindow {
    start: Instant,
    served: u32,
}

impl PrqWindow {
    /// A window that starts at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            start: now,
            served: 0,
        }
    }

    /// Takes a page request that arrived at `now`: `None` when it may be served now (at most
    /// [`PRQ_BUDGET`] per [`PRQ_WINDOW`]), or how long it must wait, until the window ends.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<Duration> {
        if now.saturating_duration_since(self.start) >= PRQ_WINDOW {
            *self = Self::new(now);
        }
        if self.served < PRQ_BUDGET {
            self.served += 1;
            return None;
        }
        Some(PRQ_WINDOW.saturating_sub(now.saturating_duration_since(self.start)))
    }
}

/// The throttling of one device's page requests: its [`PrqWindow`], the timer that serves
/// a request held back when the window ends, and how many were held back.
pub(crate) struct PrqThrottle {
    window: PrqWindow,
    timer: Option<TimerFd>,
    armed: bool,
    throttled: Arc<AtomicU64>,
}

impl PrqThrottle {
    /// A budget whose window starts now; `timer` serves requests held back (`None`: it
    /// could not be made), `throttled` counts them (the device's counters line shows it).
    pub(crate) fn new(timer: Option<TimerFd>, throttled: Arc<AtomicU64>) -> Self {
        Self {
            window: PrqWindow::new(Instant::now()),
            timer,
            armed: false,
            throttled,
        }
    }

    /// Whether a page request arriving at `now` may be served now: at most [`PRQ_BUDGET`]
    /// per [`PRQ_WINDOW`]. A request over the budget waits, in the device, for the timer
    /// that ends the window (armed once per window): a device that floods is slowed down,
    /// the event loop is not taken over. Without a timer it is served late, by the next
    /// interrupt, rather than never.
    fn admit(&mut self, now: Instant) -> bool {
        let Some(left) = self.window.admit(now) else {
            return true;
        };
        if !self.armed {
            if let Some(t) = self.timer.as_mut() {
                if t.reset(left.max(Duration::from_micros(100)), None).is_ok() {
                    self.armed = true;
                }
            }
        }
        self.throttled.fetch_add(1, Ordering::Relaxed);
        !self.armed && self.timer.is_none()
    }

    /// Whether `fd` is the timer; if so it fired, and is taken note of.
    fn fired(&mut self, fd: RawFd) -> bool {
        match self.timer.as_mut() {
            Some(t) if t.as_raw_fd() == fd => {
                let _ = t.wait();
                self.armed = false;
                true
            }
            _ => false,
        }
    }
}

/// A passthrough device the VMM set up.
pub struct Passthrough {
    /// For logs and counters.
    pub label: String,
    /// Its PCI device number (its device data in a migration stream is keyed by it).
    pub slot: u8,
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
    /// Bytes its server has mapped now (vfio-user), for hot-unplug's report.
    pub mapped_bytes: Option<Arc<AtomicU64>>,
}

/// Turns the device's fault reports into virtio-iommu fault events, and notices a device
/// process that went away.
pub(crate) struct FaultForwarder {
    pub(crate) evt: EventFd,
    pub(crate) dev: VfioUserDevice,
    pub(crate) iommu: Option<(IommuHandle, u32, BackendId)>,
    /// Under `dma=fault` outside the vIOMMU: where page requests go.
    pub(crate) direct: Option<Arc<DirectDirty>>,
    /// The device makes page requests (`dma=fault`).
    pub(crate) page_requests: bool,
    /// Under `dma=messages`: the table whose refused accesses are faults too.
    pub(crate) messages: Option<Arc<MessageDma>>,
    /// Throttling of page requests.
    pub(crate) prq: PrqThrottle,
    pub(crate) faults: Arc<Mutex<u64>>,
    pub(crate) label: String,
    pub(crate) socket_fd: RawFd,
    pub(crate) reported_failure: bool,
}

impl FaultForwarder {
    /// Answers the device's pending page request: the vIOMMU's endpoint backend (or the
    /// direct backend) installs the host mapping if the access is allowed.
    fn serve_page_request(&mut self) {
        if !self.prq.admit(Instant::now()) {
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
            (Some((h, _, backend)), _) => {
                h.lock_for_host_calls().page_request(*backend, iova, write)
            }
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
                *self.faults.locked() += faults.len() as u64;
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
        if self.prq.fired(events.fd()) {
            self.forward();
            return;
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
        if let Some(t) = &self.prq.timer {
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

impl Passthrough {
    /// Its counters.
    pub fn counters_line(&self) -> String {
        let (maps, unmaps) = *self.dma_calls.locked();
        let mut line = format!(
            "{}: dma_map_calls={maps} dma_unmap_calls={unmaps} dma_faults={} failed={}",
            self.label,
            *self.faults.locked(),
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
            let c = *counters.locked();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A device gets [`PRQ_BUDGET`] page requests served per [`PRQ_WINDOW`]; the next waits
    /// for the rest of the window, and the window after it has the whole budget again.
    #[test]
    fn page_requests_over_the_budget_wait_for_the_window_to_end() {
        let t0 = Instant::now();
        let mut w = PrqWindow::new(t0);
        let ms = Duration::from_millis;
        for i in 0..PRQ_BUDGET {
            assert_eq!(
                w.admit(t0 + Duration::from_micros(u64::from(i))),
                None,
                "request {i}"
            );
        }
        assert_eq!(w.admit(t0 + ms(1)), Some(PRQ_WINDOW - ms(1)));
        assert_eq!(
            w.admit(t0 + ms(4)),
            Some(PRQ_WINDOW - ms(4)),
            "still held back"
        );
        // The next window: the whole budget again, counted from its first request.
        let t1 = t0 + PRQ_WINDOW + ms(3);
        for i in 0..PRQ_BUDGET {
            assert_eq!(w.admit(t1), None, "request {i} of the next window");
        }
        assert_eq!(w.admit(t1 + ms(2)), Some(PRQ_WINDOW - ms(2)));
        // A clock read before the window's start (another thread's) counts as in it.
        assert_eq!(w.admit(t0), Some(PRQ_WINDOW));
    }

    /// Over the budget a request is held back (counted) and the timer armed, once per
    /// window, for the window's end; when it fires, the next request of the new window is
    /// served. Without a timer a request over the budget is served late rather than never.
    #[test]
    fn requests_over_the_budget_arm_the_timer_once_and_are_counted() {
        let throttled = Arc::new(AtomicU64::new(0));
        let mut p = PrqThrottle::new(Some(TimerFd::new().unwrap()), throttled.clone());
        let now = p.window.start;
        for i in 0..PRQ_BUDGET {
            assert!(p.admit(now), "request {i}");
        }
        assert!(!p.timer.as_ref().unwrap().is_armed().unwrap());
        assert!(!p.admit(now), "over the budget");
        assert!(p.timer.as_ref().unwrap().is_armed().unwrap());
        assert!(!p.admit(now), "still over the budget");
        assert_eq!(throttled.load(Ordering::Relaxed), 2);
        assert!(!p.fired(-1), "another descriptor");
        let fd = p.timer.as_ref().unwrap().as_raw_fd();
        assert!(p.fired(fd), "the timer fires at the window's end");
        assert!(!p.armed);
        assert!(p.admit(now + PRQ_WINDOW), "the next window");

        let throttled = Arc::new(AtomicU64::new(0));
        let mut p = PrqThrottle::new(None, throttled.clone());
        let now = p.window.start;
        for _ in 0..PRQ_BUDGET {
            assert!(p.admit(now));
        }
        assert!(p.admit(now), "served late without a timer");
        assert_eq!(throttled.load(Ordering::Relaxed), 1);
    }
}
