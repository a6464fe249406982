//! The vhost-user connection of the net device, through the rust-vmm `vhost` crate's frontend
//! (with the device-IOTLB messages of `third_party/vhost/PATCH.md`): the handshake, handing
//! guest RAM and rings to the back end, the back-end channel where IOTLB misses arrive (served
//! on its own thread from the virtio-iommu's page tables), invalidations, and noticing a back
//! end that went away (and, with `reconnect=`, coming back to it).
//!
//! Lock order: the `Viommu` (when an IOTLB message is sent on its behalf) before
//! the device's link state; nothing that holds `state` takes the `Viommu`.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use iommu::backend::{BackendCaps, BackendError, DmaBackend};
use iommu::pagetable::{Perm, MAX_IOVA};
use iommu::viommu::Relock;
use sync::MutexExt;
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserIotlb, VhostUserIotlbType, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::dirty_log::DirtyLog;

mod migration;
use super::NetCounters;
use crate::virtio::iommu::IommuHandle;
use crate::virtio::iova::IovaMemory;
use crate::virtio::{VirtioInterrupt, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use crate::GuestMemoryMmap;

/// How long the VMM waits for any reply of the back end (an ack, a feature word) before it
/// gives up on it: the VMM must not hang behind a back end that hangs.
#[cfg(not(test))]
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The unit tests' scripted back ends answer at once or never: a second is ample, and keeps
/// the tests of a silent back end (and each mutant's test run) short.
#[cfg(test)]
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Most runs sent ahead when the device starts (DPDK keeps 2048 entries per queue).
pub const REPLAY_MAX: usize = 1024;

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// `VHOST_F_LOG_ALL`: the back end logs every write to guest memory.
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// `VHOST_VRING_F_LOG` of `SET_VRING_ADDR`: the back end logs its used-ring writes.
const VRING_F_LOG: u32 = 1;

/// Test-only breakages of the dirty log, from `VMM_TEST_VHOST_USER_LOG` at device creation
/// (only with the cargo feature `test-hooks`): `ignore` (the log is set up but every harvest
/// reports nothing: the bug a migration's verification must catch) or `unsupported`
/// (`LOG_SHMFD` not negotiated: the device is reported untracked and all of RAM is copied
/// every round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LogFault {
    None,
    Ignore,
    Unsupported,
}

impl LogFault {
    /// [`LogFault::None`], always, without the `test-hooks` feature.
    #[cfg(not(feature = "test-hooks"))]
    pub(super) fn from_env() -> Self {
        LogFault::None
    }

    #[cfg(feature = "test-hooks")]
    pub(super) fn from_env() -> Self {
        match std::env::var("VMM_TEST_VHOST_USER_LOG").as_deref() {
            Ok("ignore") => LogFault::Ignore,
            Ok("unsupported") => LogFault::Unsupported,
            _ => LogFault::None,
        }
    }
}

/// Why a back end cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be reached.
    #[error("cannot connect to {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// A request failed or its reply was malformed.
    #[error("{0} failed")]
    Protocol(&'static str, #[source] vhost::Error),
    /// The back end lacks a feature the device needs.
    #[error("the back end does not offer {0}")]
    MissingFeature(&'static str),
    /// The back-end channel could not be set up.
    #[error("cannot set up the back-end channel")]
    Channel(#[source] vhost::vhost_user::Error),
    /// The dirty log (a memfd) could not be made.
    #[error("cannot create the dirty log")]
    Log(#[source] std::io::Error),
}

fn step<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, VhostUserError> {
    r.map_err(|e| VhostUserError::Protocol(what, e))
}

/// One ring as handed to the back end.
#[derive(Clone)]
pub(super) struct RingSpec {
    /// vhost-user vring index (= virtio queue index).
    pub index: usize,
    /// Entries.
    pub size: u16,
    /// Descriptor table, available and used rings, as the driver wrote them (IOVAs behind the
    /// vIOMMU, else GPAs).
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The transport's notification eventfd.
    pub kick: Arc<EventFd>,
}

/// What the device handed to the back end, replayed on a new connection.
#[derive(Clone)]
pub(super) struct Plan {
    /// `SET_FEATURES` word.
    pub features: u64,
    /// Started rings.
    pub rings: Vec<RingSpec>,
    /// Raises the guest's interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// Most `UPDATE`s remembered per back end (DPDK's own cache keeps 2,048 entries per queue).
pub(super) const MAX_SENT: usize = 16_384;

/// The `UPDATE`s a back end took and no `INVALIDATE` removed, by IOVA, at most [`MAX_SENT`]:
/// what [`Shared::invalidate`] sends again after an invalidation that DPDK extends by one
/// entry. A guest that keeps more mappings than that costs the oldest-by-IOVA record, which
/// only means that one resend is not made (the back end then misses, and the miss is
/// answered): the memory a guest can make the VMM keep here is bounded, and an invalidation
/// looks only at the entries that can overlap its range.
#[derive(Debug, Default)]
pub(super) struct SentUpdates {
    by_iova: BTreeMap<u64, VhostUserIotlb>,
    /// The largest size recorded: an entry overlapping `[iova, end)` starts after
    /// `iova - largest`.
    largest: u64,
}

impl SentUpdates {
    /// Records an `UPDATE` the back end took (replacing one at the same IOVA).
    pub(super) fn record(&mut self, msg: VhostUserIotlb) {
        if self.by_iova.len() >= MAX_SENT && !self.by_iova.contains_key(&msg.iova) {
            self.by_iova.pop_first();
        }
        self.largest = self.largest.max(msg.size);
        self.by_iova.insert(msg.iova, msg);
    }

    /// Forgets every entry overlapping `[iova, end)`; returns the one starting at `end`, if
    /// any (the entry DPDK drops too).
    pub(super) fn invalidate(&mut self, iova: u64, end: u64) -> Option<VhostUserIotlb> {
        let from = iova.saturating_sub(self.largest.saturating_sub(1));
        let gone: Vec<u64> = self
            .by_iova
            .range(from..end.max(from))
            .filter(|(_, m)| m.iova.saturating_add(m.size) > iova)
            .map(|(&k, _)| k)
            .collect();
        for k in gone {
            self.by_iova.remove(&k);
        }
        self.by_iova.get(&end).copied()
    }

    /// Entries remembered.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_iova.len()
    }
}

/// A live connection to the back end.
pub(super) struct Link {
    frontend: Frontend,
    /// The back end's virtio features.
    pub features: u64,
    /// Another handle on the main socket, to watch for hang-ups and to cut it.
    watch: UnixStream,
    /// The `UPDATE`s the back end took and no `INVALIDATE` removed.
    sent: SentUpdates,
    /// `SET_FEATURES` was sent with `VIRTIO_F_ACCESS_PLATFORM`.
    iotlb_on: bool,
    /// `VHOST_USER_PROTOCOL_F_LOG_SHMFD` was negotiated and the back end offers
    /// `VHOST_F_LOG_ALL`: it can log its writes into a shared log.
    can_log: bool,
}

impl Link {
    /// The main socket, for watching hang-ups.
    pub(super) fn watch_fd(&self) -> RawFd {
        self.watch.as_raw_fd()
    }
}

/// Shuts the main socket down: the back-end channel thread then sees the hang-up and handles
/// the disconnection.
pub(super) fn cut(link: &Link) {
    let _ = link.watch.shutdown(std::net::Shutdown::Both);
}

/// Connection state shared by the device, the back-end channel thread and the IOTLB
/// invalidator inside the vIOMMU.
#[derive(Default)]
pub(super) struct LinkState {
    pub link: Option<Link>,
    pub plan: Option<Plan>,
    /// Bumped whenever `plan` changes, so a reconnect notices it raced with the driver.
    pub plan_generation: u64,
    /// A migration tracks dirty pages: the back end logs its writes (`VHOST_F_LOG_ALL`,
    /// `SET_LOG_BASE`, `VHOST_VRING_F_LOG`), also after a reconnection.
    pub logging: bool,
    /// Logging was asked for but a back end could not (or failed to) log: every harvest
    /// until logging stops counts all of RAM dirty.
    pub log_lost: bool,
    /// Rings stopped for a migration (`GET_VRING_BASE`) and the base each returned, until
    /// the migration ends here (they are then started again from those bases).
    pub stopped: Option<Vec<(usize, u16)>>,
}

/// Everything the threads of one device share.
pub(super) struct Shared {
    /// For logs and errors: `vhost-user-net 00:03.0 (socket)`.
    pub label: String,
    pub socket: PathBuf,
    /// The device's endpoint behind the vIOMMU.
    pub iommu: Option<(IommuHandle, u32)>,
    pub mem: Arc<GuestMemoryMmap>,
    /// Queues the device has (for the frontend's index checks).
    pub queues: usize,
    pub reconnect: Option<Duration>,
    pub iotlb_mode: IotlbMode,
    pub state: Mutex<LinkState>,
    /// The dirty log handed to the back end during migrations.
    pub log: DirtyLog,
    /// Test-only breakage of the log.
    pub log_fault: LogFault,
    /// `VIRTIO_NET_S_LINK_UP`.
    pub link_up: AtomicBool,
    pub counters: NetCounters,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.locked()
    }

    /// Connects and negotiates; returns the link and, behind the vIOMMU, the back-end channel.
    pub(super) fn connect(
        self: &Arc<Self>,
    ) -> Result<(Link, Option<FrontendReqHandler<Shared>>), VhostUserError> {
        let stream = UnixStream::connect(&self.socket)
            .map_err(|e| VhostUserError::Connect(self.socket.clone(), e))?;
        let set =
            |r: std::io::Result<()>| r.map_err(|e| VhostUserError::Connect(self.socket.clone(), e));
        set(stream.set_read_timeout(Some(REPLY_TIMEOUT)))?;
        set(stream.set_write_timeout(Some(REPLY_TIMEOUT)))?;
        let watch = stream
            .try_clone()
            .map_err(|e| VhostUserError::Connect(self.socket.clone(), e))?;
        let mut frontend = Frontend::from_stream(stream, self.queues as u64);
        let features = step("GET_FEATURES", frontend.get_features())?;
        let iotlb = self.iommu.is_some();
        for (bit, name) in [
            (VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
            (30, "VHOST_USER_F_PROTOCOL_FEATURES"),
        ] {
            if features & (1 << bit) == 0 {
                return Err(VhostUserError::MissingFeature(name));
            }
        }
        if iotlb && features & (1 << VIRTIO_F_ACCESS_PLATFORM) == 0 {
            return Err(VhostUserError::MissingFeature(
                "VIRTIO_F_ACCESS_PLATFORM (a device IOTLB), needed behind the vIOMMU",
            ));
        }
        let offered = step("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
        let mut want = VhostUserProtocolFeatures::REPLY_ACK;
        if iotlb {
            want |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        if self.queues > 3 {
            want |= VhostUserProtocolFeatures::MQ;
        }
        // Optional: without it a migration copies all of RAM every round (reported).
        let can_log = offered.contains(VhostUserProtocolFeatures::LOG_SHMFD)
            && features & LOG_ALL != 0
            && self.log_fault != LogFault::Unsupported;
        if can_log {
            want |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        for (f, name) in [
            (
                VhostUserProtocolFeatures::REPLY_ACK,
                "VHOST_USER_PROTOCOL_F_REPLY_ACK",
            ),
            (
                VhostUserProtocolFeatures::BACKEND_REQ,
                "VHOST_USER_PROTOCOL_F_BACKEND_REQ",
            ),
            (VhostUserProtocolFeatures::MQ, "VHOST_USER_PROTOCOL_F_MQ"),
        ] {
            if want.contains(f) && !offered.contains(f) {
                return Err(VhostUserError::MissingFeature(name));
            }
        }
        step(
            "SET_PROTOCOL_FEATURES",
            frontend.set_protocol_features(want),
        )?;
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        step("SET_OWNER", frontend.set_owner())?;
        let channel = if iotlb {
            let mut req = FrontendReqHandler::new(self.clone()).map_err(VhostUserError::Channel)?;
            req.set_reply_ack_flag(true);
            // A request's body that never comes ends the wait (the back end is then cut off
            // as for a malformed request), instead of blocking the channel thread for ever.
            // SAFETY: the handler owns the descriptor and outlives this borrow.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(req.as_raw_fd()) };
            rustix::net::sockopt::set_socket_timeout(
                fd,
                rustix::net::sockopt::Timeout::Recv,
                Some(REPLY_TIMEOUT),
            )
            .map_err(|e| VhostUserError::Connect(self.socket.clone(), e.into()))?;
            let fd = req.get_tx_raw_fd();
            step("SET_BACKEND_REQ_FD", frontend.set_backend_request_fd(&fd))?;
            Some(req)
        } else {
            None
        };
        Ok((
            Link {
                frontend,
                features,
                watch,
                sent: SentUpdates::default(),
                iotlb_on: false,
                can_log,
            },
            channel,
        ))
    }

    /// Reads where the driver's used ring stands (`used->idx`), the base a new back end starts
    /// from.
    pub(super) fn used_idx(&self, used: u64) -> Option<u16> {
        use vm_memory::Bytes;
        let at = GuestAddress(used.checked_add(2)?);
        match &self.iommu {
            Some((h, ep)) => IovaMemory::new(self.mem.clone(), h.clone(), *ep)
                .read_obj::<u16>(at)
                .ok(),
            None => self.mem.read_obj::<u16>(at).ok(),
        }
    }

    /// Starts `plan` on `link`: features, memory table, (`logging`: the dirty log), rings
    /// with the `bases` given.
    pub(super) fn start(
        &self,
        link: &mut Link,
        plan: &Plan,
        bases: &[u16],
        logging: bool,
    ) -> Result<(), VhostUserError> {
        let logging = logging && link.can_log;
        let fe = &mut link.frontend;
        let features = plan.features | if logging { LOG_ALL } else { 0 };
        step("SET_FEATURES", fe.set_features(features))?;
        link.iotlb_on = plan.features & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .mem
            .iter()
            .filter_map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).ok())
            .collect();
        step("SET_MEM_TABLE", fe.set_mem_table(&regions))?;
        if logging {
            self.send_log_base(link)?;
        }
        for (r, &base) in plan.rings.iter().zip(bases) {
            self.start_ring(link, plan, r, base, logging)?;
        }
        Ok(())
    }

    /// `SET_LOG_BASE` with the device's log.
    fn send_log_base(&self, link: &mut Link) -> Result<(), VhostUserError> {
        let region = VhostUserDirtyLogRegion {
            mmap_size: self.log.bytes(),
            mmap_offset: 0,
            mmap_handle: self.log.fd(),
        };
        step("SET_LOG_BASE", link.frontend.set_log_base(0, Some(region)))
    }

    /// The `SET_VRING_ADDR` of ring `r`: IOVAs behind the vIOMMU, else the VMM's own
    /// addresses; with `logging`, the used ring is logged (by its driver address: DPDK turns
    /// an IOVA into a GPA through its IOTLB and the memory table).
    fn ring_config(
        &self,
        link: &Link,
        r: &RingSpec,
        logging: bool,
    ) -> Result<VringConfigData, VhostUserError> {
        // Without an IOMMU the back end takes the frontend's own addresses.
        let addr = |gpa: u64| -> Result<u64, VhostUserError> {
            if link.iotlb_on {
                return Ok(gpa);
            }
            self.mem
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| VhostUserError::MissingFeature("a ring inside guest RAM"))
        };
        Ok(VringConfigData {
            queue_max_size: r.size,
            queue_size: r.size,
            flags: if logging { VRING_F_LOG } else { 0 },
            desc_table_addr: addr(r.desc)?,
            used_ring_addr: addr(r.used)?,
            avail_ring_addr: addr(r.avail)?,
            log_addr: logging.then_some(r.used),
        })
    }

    /// Hands one ring over and enables it.
    pub(super) fn start_ring(
        &self,
        link: &mut Link,
        plan: &Plan,
        r: &RingSpec,
        base: u16,
        logging: bool,
    ) -> Result<(), VhostUserError> {
        let config = self.ring_config(link, r, logging && link.can_log)?;
        let fe = &mut link.frontend;
        step("SET_VRING_NUM", fe.set_vring_num(r.index, r.size))?;
        step("SET_VRING_BASE", fe.set_vring_base(r.index, base))?;
        step("SET_VRING_ADDR", fe.set_vring_addr(r.index, &config))?;
        step("SET_VRING_KICK", fe.set_vring_kick(r.index, &r.kick))?;
        let call = match plan.interrupt.queue_irqfd(r.index as u16) {
            // SAFETY: `dup` of a descriptor the interrupt object keeps open; the result is
            // checked and owned by the `EventFd` from here on.
            Some(fd) => match unsafe { libc::dup(fd) } {
                -1 => None,
                // SAFETY: a fresh descriptor owned by nothing else.
                d => Some(unsafe { EventFd::from_raw_fd(d) }),
            },
            None => None,
        };
        let call = match call {
            Some(c) => c,
            None => {
                log::warn!(
                    "{}: queue {} has no interrupt vector; its completions will not interrupt",
                    self.label,
                    r.index
                );
                EventFd::new(0).map_err(|e| VhostUserError::Connect(self.socket.clone(), e))?
            }
        };
        step("SET_VRING_CALL", fe.set_vring_call(r.index, &call))?;
        step("SET_VRING_ENABLE", fe.set_vring_enable(r.index, true))?;
        Ok(())
    }

    /// Stops `rings` (`GET_VRING_BASE`); a back end that does not answer is cut off.
    pub(super) fn stop_rings(&self, st: &mut LinkState, rings: &[usize]) {
        let Some(link) = st.link.as_mut() else {
            return;
        };
        for &i in rings {
            if let Err(e) = link.frontend.get_vring_base(i) {
                log::warn!("{}: GET_VRING_BASE of ring {i}: {e}", self.label);
                cut(link);
                return;
            }
        }
    }

    /// Sends `msg` on the main channel and waits for the ack. A back end that fails or does
    /// not answer is cut off. Returns whether the message was taken; an `UPDATE` taken is
    /// recorded in [`Link::sent`].
    fn send_iotlb(&self, st: &mut LinkState, msg: &VhostUserIotlb) -> bool {
        let Some(link) = st.link.as_mut() else {
            return false;
        };
        if !link.iotlb_on {
            return false;
        }
        match link.frontend.send_iotlb_msg(msg) {
            Ok(()) => {
                if msg.iotlb_type() == Some(VhostUserIotlbType::Update) {
                    link.sent.record(*msg);
                }
                true
            }
            Err(e) => {
                log::error!(
                    "{}: IOTLB message for IOVA {:#x}+{:#x} failed ({e}); cutting the back end off",
                    self.label,
                    msg.iova,
                    msg.size
                );
                cut(link);
                false
            }
        }
    }

    /// A guest UNMAP, DETACH, domain move or bypass change removed `[iova, iova + len)`: the
    /// back end drops every cached translation in it before the guest's request completes.
    ///
    /// DPDK 22.11's vhost library also drops the entry that starts exactly where the range
    /// ends (`vhost_user_iotlb_cache_remove` stops at `iova + size < node->iova`, one short),
    /// so that a buffer still mapped next to an unmapped one would miss, and a received frame
    /// for it be dropped. The VMM sends that entry again after the invalidation.
    pub(super) fn invalidate(&self, iova: u64, len: u64) {
        let msg = VhostUserIotlb::new(VhostUserIotlbType::Invalidate, iova, len, 0, 0);
        let end = iova.saturating_add(len);
        let mut st = self.lock();
        let next = st
            .link
            .as_mut()
            .and_then(|link| link.sent.invalidate(iova, end));
        if self.send_iotlb(&mut st, &msg) {
            self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
            self.counters
                .invalidated_pages
                .fetch_add(len.div_ceil(4096), Ordering::Relaxed);
            if let Some(next) = next {
                if self.send_iotlb(&mut st, &next) {
                    self.counters.resent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Sends the guest mapping `[iova, iova + len)` -> `gpa` as an `UPDATE` (if it is guest
    /// RAM, in one region).
    fn prefetch(&self, iova: u64, gpa: u64, len: u64, perm: Perm) {
        let Some(uaddr) = self.host_range(gpa, len) else {
            return;
        };
        if perm.contains(Perm::MMIO) || !(perm.read() || perm.write()) {
            return;
        }
        let update = VhostUserIotlb::new(
            VhostUserIotlbType::Update,
            iova,
            len,
            uaddr,
            vhost_perm(perm),
        );
        let mut st = self.lock();
        if self.send_iotlb(&mut st, &update) {
            self.counters.prefetches.fetch_add(1, Ordering::Relaxed);
            self.counters
                .update_pages
                .fetch_add(len / 4096, Ordering::Relaxed);
        }
    }

    /// In [`IotlbMode::Prefetch`], sends what the endpoint may reach now (at most
    /// [`REPLAY_MAX`] runs): the rings and buffers the driver mapped before the device
    /// started, or before a new back end came. Takes the vIOMMU in the host order (so that
    /// no UNMAP's INVALIDATE is under way), then the link state: call with neither held.
    pub(super) fn replay(&self) {
        let Some((h, ep)) = &self.iommu else {
            return;
        };
        if self.iotlb_mode != IotlbMode::Prefetch {
            return;
        }
        let mut v = h.lock_for_host_calls();
        let runs = v.endpoint_runs(*ep, REPLAY_MAX);
        // The UPDATEs go out in the host order, without the vIOMMU.
        v.unlocked(|| {
            for r in runs {
                self.prefetch(r.iova(), r.gpa(), r.len(), r.perm);
            }
        });
    }

    /// The VMM's address of `[gpa, gpa + len)` when it lies in one region of guest RAM.
    fn host_range(&self, gpa: u64, len: u64) -> Option<u64> {
        let last = gpa.checked_add(len.checked_sub(1)?)?;
        let r = self.mem.find_region(GuestAddress(gpa))?;
        if last >= r.start_addr().0.checked_add(r.len())? {
            return None;
        }
        self.mem
            .get_host_address(GuestAddress(gpa))
            .ok()
            .map(|p| p as u64)
    }

    /// Answers a miss: an `UPDATE` for the entry the vIOMMU gives, or nothing and a fault
    /// event for the endpoint.
    fn serve_miss(&self, msg: &VhostUserIotlb) -> std::io::Result<u64> {
        let c = &self.counters;
        c.misses.fetch_add(1, Ordering::Relaxed);
        // What the guest must have allowed. A write-only guest mapping serves a read-write
        // miss: DPDK asks read-write for every receive buffer (it may read back what it
        // wrote), while Linux maps DMA_FROM_DEVICE buffers write-only behind a virtio-iommu,
        // and a write-only entry would never match DPDK's lookup (as on VT-d, which sets
        // the read bit of every mapping). Writes stay exactly what the guest allowed.
        let needed = match msg.perm {
            VHOST_ACCESS_RO => Perm::READ,
            VHOST_ACCESS_WO | VHOST_ACCESS_RW => Perm::WRITE,
            _ => return Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let Some((h, ep)) = &self.iommu else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // The lookup is made in the host order (`lock_for_host_calls`): an UNMAP's
        // INVALIDATE, sent with the vIOMMU let go but in the host order, is then either
        // done and its mapping gone from the table, or not started. The device's link state
        // is taken before the host order and the vIOMMU are let go, so such an INVALIDATE
        // goes after this UPDATE, and no UNMAP completes between the lookup and the UPDATE.
        // Neither is held while the back end acknowledges.
        let mut v = h.lock_for_host_calls();
        let entry = match v.iotlb_entry(*ep, msg.iova, needed) {
            Ok(e) => e,
            Err(_) => {
                drop(v);
                c.faults.fetch_add(1, Ordering::Relaxed);
                log::debug!(
                    "{}: IOTLB miss at unmapped IOVA {:#x} ({:?}): no update, fault event",
                    self.label,
                    msg.iova,
                    needed
                );
                h.notify_fault();
                return Ok(0);
            }
        };
        let Some(uaddr) = self.host_range(entry.gpa, entry.len) else {
            return Ok(0);
        };
        let update = VhostUserIotlb::new(
            VhostUserIotlbType::Update,
            entry.iova,
            entry.len,
            uaddr,
            vhost_perm(entry.perm),
        );
        log::trace!(
            "{}: IOTLB update {:#x}+{:#x} perm {}",
            self.label,
            update.iova,
            update.size,
            update.perm
        );
        let mut st = self.lock();
        drop(v);
        if self.send_iotlb(&mut st, &update) {
            c.updates.fetch_add(1, Ordering::Relaxed);
            c.update_pages
                .fetch_add(entry.len / 4096, Ordering::Relaxed);
        }
        drop(st);
        Ok(0)
    }

    /// The back end went away: link down, and the driver told.
    fn disconnected(&self) {
        let mut st = self.lock();
        st.link = None;
        self.link_up.store(false, Ordering::Release);
        self.counters.disconnects.fetch_add(1, Ordering::Relaxed);
        let plan = st.plan.clone();
        drop(st);
        match self.reconnect {
            Some(p) => log::error!(
                "{}: the back end went away; link down, reconnecting every {} s",
                self.label,
                p.as_secs_f64()
            ),
            None => log::error!(
                "{}: the back end went away; link down (no reconnect= given)",
                self.label
            ),
        }
        if let Some(p) = plan {
            p.interrupt.signal_config();
        }
    }

    /// One reconnection attempt: connect, and replay what the device had started.
    fn reconnect_once(
        self: &Arc<Self>,
    ) -> Result<(RawFd, Option<FrontendReqHandler<Shared>>), VhostUserError> {
        let (mut link, channel) = self.connect()?;
        loop {
            let (plan, generation) = {
                let st = self.lock();
                (st.plan.clone(), st.plan_generation)
            };
            // Bases come from guest memory (through the vIOMMU): read without `state` held.
            let bases: Vec<u16> = plan
                .as_ref()
                .map(|p| {
                    p.rings
                        .iter()
                        .map(|r| self.used_idx(r.used).unwrap_or(0))
                        .collect()
                })
                .unwrap_or_default();
            let mut st = self.lock();
            if st.plan_generation != generation {
                continue;
            }
            if let Some(p) = &plan {
                let logging = st.logging;
                if logging && !link.can_log {
                    log::error!(
                        "{}: the new back end cannot log its writes; a running migration \
                         copies all of RAM from now on",
                        self.label
                    );
                    st.log_lost = true;
                }
                self.start(&mut link, p, &bases, logging)?;
            }
            let fd = link.watch.as_raw_fd();
            st.link = Some(link);
            self.link_up.store(true, Ordering::Release);
            self.counters.connects.fetch_add(1, Ordering::Relaxed);
            drop(st);
            log::info!("{}: back end reconnected; link up", self.label);
            self.replay();
            if let Some(p) = plan {
                p.interrupt.signal_config();
            }
            return Ok((fd, channel));
        }
    }
}

impl VhostUserFrontendReqHandler for Shared {
    fn handle_iotlb_msg(&self, msg: &VhostUserIotlb) -> std::io::Result<u64> {
        log::trace!(
            "{}: IOTLB message type {} IOVA {:#x} perm {}",
            self.label,
            msg.msg_type,
            msg.iova,
            msg.perm
        );
        match msg.iotlb_type() {
            Some(VhostUserIotlbType::Miss) => self.serve_miss(msg),
            Some(VhostUserIotlbType::AccessFail) => {
                log::warn!(
                    "{}: the back end reports a failed access at IOVA {:#x}",
                    self.label,
                    msg.iova
                );
                Ok(0)
            }
            _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

/// The `VHOST_ACCESS_*` of an entry the guest mapped with `perm`. Every entry of one IOVA has
/// one permission (DPDK keeps the first entry it gets for an IOVA): writable entries are
/// read-write (see [`Shared::serve_miss`]), the others read-only.
fn vhost_perm(perm: Perm) -> u8 {
    if perm.write() {
        VHOST_ACCESS_RW
    } else {
        VHOST_ACCESS_RO
    }
}

/// Runs the back-end channel of a device: serves its IOTLB misses, notices hang-ups, and
/// reconnects when asked to.
pub(super) fn spawn_channel_thread(
    shared: Arc<Shared>,
    main_fd: RawFd,
    channel: Option<FrontendReqHandler<Shared>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || {
            crate::seccomp::confine("vhost-user", crate::seccomp::lists::VHOST_USER);
            channel_thread(shared, main_fd, channel)
        })
        .map(|_| ())
}

fn channel_thread(
    shared: Arc<Shared>,
    mut main_fd: RawFd,
    mut channel: Option<FrontendReqHandler<Shared>>,
) {
    loop {
        serve(&shared, main_fd, channel.as_mut());
        drop(channel.take());
        shared.disconnected();
        let Some(period) = shared.reconnect else {
            return;
        };
        loop {
            std::thread::sleep(period);
            match shared.reconnect_once() {
                Ok((fd, ch)) => {
                    main_fd = fd;
                    channel = ch;
                    break;
                }
                Err(e) => log::debug!("{}: reconnect: {e}", shared.label),
            }
        }
    }
}

/// Serves the back-end channel until the main socket hangs up or the channel breaks.
fn serve(shared: &Shared, main_fd: RawFd, mut channel: Option<&mut FrontendReqHandler<Shared>>) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: main_fd,
                events: libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: channel.as_ref().map_or(-1, |c| c.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures for the duration of the
        // call; negative descriptors are ignored by poll(2).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
        {
            return;
        }
        if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0
            && fds[1].revents & libc::POLLIN == 0
        {
            return;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Some(ch) = channel.as_mut() {
                match ch.handle_request() {
                    Ok(_) => {}
                    Err(vhost::vhost_user::Error::ReqHandlerError(e)) => {
                        shared.counters.bad_messages.fetch_add(1, Ordering::Relaxed);
                        log::warn!("{}: refused a back-end request: {e}", shared.label);
                    }
                    Err(e) => {
                        shared.counters.bad_messages.fetch_add(1, Ordering::Relaxed);
                        log::error!(
                            "{}: malformed message on the back-end channel ({e}); cutting the back end off",
                            shared.label
                        );
                        if let Some(link) = shared.lock().link.as_ref() {
                            cut(link);
                        }
                        return;
                    }
                }
            }
        }
    }
}

/// The device's side of the vIOMMU's host mappings. Every unmap becomes an `INVALIDATE` the
/// back end acknowledges before the guest's request completes. A map does nothing in
/// [`IotlbMode::Miss`] (the back end asks when it misses); in [`IotlbMode::Prefetch`] it is
/// sent as an `UPDATE` at once, so that a buffer the guest just mapped does not miss (DPDK
/// drops a received frame whose buffer misses, and Linux maps every buffer anew).
pub struct DeviceIotlb {
    pub(super) shared: Arc<Shared>,
}

/// How the device IOTLB is filled (`--vhost-user-net ...,iotlb=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbMode {
    /// Only in answer to the back end's misses.
    Miss,
    /// Also with every guest MAP, as an `UPDATE` sent before the MAP completes.
    Prefetch,
}

impl DmaBackend for DeviceIotlb {
    fn name(&self) -> String {
        self.shared.label.clone()
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            page_size_mask: 0x4000_0000 | 0x20_0000 | 0x1000,
            iova_ranges: vec![(0, MAX_IOVA)],
            // Tracked, but not by IOVA: the back end logs by GPA into the device's own log,
            // which the VMM harvests next to the vIOMMU's reads
            // (`VhostUserNet::harvest_dirty_log`); the reads below have nothing to add.
            dirty_tracking: true,
            // Nothing is mapped on the host: any range may be invalidated at once.
            merge_maps: true,
            merge_unmaps: true,
            dirty_whole_mappings: false,
        }
    }

    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), BackendError> {
        if self.shared.iotlb_mode == IotlbMode::Prefetch {
            self.shared.prefetch(iova, gpa, len, perm);
        }
        Ok(())
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError> {
        self.shared.invalidate(iova, len);
        Ok(())
    }

    /// Logging itself is started by `VhostUserNet::start_dirty_log`, which knows whether the
    /// back end can log (and the VMM reports the device untracked when it cannot).
    fn set_dirty_tracking(&mut self, _enable: bool) -> Result<(), BackendError> {
        Ok(())
    }

    /// Nothing by IOVA: the back end's writes are in the GPA log (see above), which outlives
    /// the mappings, so nothing is lost at an unmap either.
    fn read_dirty(
        &mut self,
        _iova: u64,
        _len: u64,
        _bitmap: &mut [u64],
        _clear: bool,
    ) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Whether `path` looks like a socket that could be a back end (for early, clear errors).
pub(super) fn check_socket(path: &Path) -> Result<(), VhostUserError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(VhostUserError::Connect(
            path.to_path_buf(),
            std::io::Error::other("not a socket"),
        )),
        Err(e) => Err(VhostUserError::Connect(path.to_path_buf(), e)),
    }
}

/// The `SET_FEATURES` word for the guest's `acked` features.
pub(super) fn backend_features(acked: u64, backend: u64, passthrough_mask: u64) -> u64 {
    (acked & backend & passthrough_mask)
        | (1 << VIRTIO_F_VERSION_1)
        | (acked & (1 << VIRTIO_F_ACCESS_PLATFORM))
        | PROTOCOL_FEATURES
}

/// The body of the `vhost_user_backend_channel` fuzz target (run through
/// [`crate::fuzzing::vhost_user_backend_channel`]).
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use iommu::testing::{attach, batch, map};
    use iommu::{Viommu, ViommuConfig};
    use vhost::vhost_user::FrontendReqHandler;

    use super::{LogFault, Shared};
    use crate::virtio::iommu::IommuHandle;
    use crate::virtio::net::dirty_log::DirtyLog;
    use crate::virtio::net::{IotlbMode, NetCounters};
    use crate::virtio::testing::test_memory;

    /// Guest RAM: 4 MiB.
    const MEM: usize = 4 << 20;
    /// The device's endpoint.
    const EP: u32 = 0x18;

    /// What a back end sends on the back-end channel (`VHOST_USER_BACKEND_*` requests: IOTLB
    /// misses and access failures among others, each a header and a body), served as the
    /// `vhost-user` thread serves it, for a device behind the vIOMMU whose endpoint maps IOVAs
    /// 0x1000-0x2fff read-write and 0x10000-0x10fff read-only. The link to the back end is
    /// down, so answers to misses are computed and dropped.
    ///
    /// # Panics
    /// When the messages raised more faults than there were misses, or when anything below
    /// panics.
    pub fn backend_channel(data: &[u8]) {
        if let Some((misses, faults)) = serve_messages(data) {
            assert!(faults <= misses, "{faults} faults for {misses} misses");
        }
    }

    /// Serves `data` as [`backend_channel`] does; returns the misses and the faults raised
    /// for them.
    pub fn serve_messages(data: &[u8]) -> Option<(u64, u64)> {
        let mem = test_memory(MEM);
        let mut v = Viommu::new(ViommuConfig {
            guest_ram: vec![(0, MEM as u64)],
            ..Default::default()
        });
        v.add_endpoint(EP, None, &[]).ok()?;
        batch(
            &mut v,
            &[
                attach(1, EP, 0),
                map(1, 0x1000, 0x2fff, 0x10_0000, 3),
                map(1, 0x1_0000, 0x1_0fff, 0x20_0000, 1),
            ],
        );
        let (handle, log) = (IommuHandle::new(v).ok()?, DirtyLog::new(MEM as u64).ok()?);
        let shared = Arc::new(Shared {
            label: "vhost-user-net fuzz".into(),
            socket: std::path::PathBuf::new(),
            iommu: Some((handle, EP)),
            mem,
            queues: 2,
            reconnect: None,
            iotlb_mode: IotlbMode::Miss,
            state: Mutex::default(),
            log,
            log_fault: LogFault::None,
            link_up: AtomicBool::new(false),
            counters: NetCounters::default(),
        });
        let mut handler = FrontendReqHandler::new(shared.clone()).ok()?;
        // The back end's end of the channel, as it would write to it.
        // SAFETY: `dup` of a descriptor the handler owns; the new one is ours alone.
        let fd = unsafe { libc::dup(handler.get_tx_raw_fd()) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just duplicated and is owned by nobody else.
        let mut backend = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        let _ = backend.set_nonblocking(true);
        let written = backend
            .write(&data[..data.len().min(32 << 10)])
            .unwrap_or(0);
        // The end of the stream after it (shutdown acts on the socket, which the handler's
        // descriptor shares): a message cut short fails instead of waiting for its rest.
        let _ = backend.shutdown(std::net::Shutdown::Write);
        // Serve what was written, as `serve` does: one request per readable poll.
        for _ in 0..written / 12 + 1 {
            let mut p = libc::pollfd {
                fd: handler.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no timeout.
            if unsafe { libc::poll(&mut p, 1, 0) } != 1 || p.revents & libc::POLLIN == 0 {
                break;
            }
            match handler.handle_request() {
                Ok(_) | Err(vhost::vhost_user::Error::ReqHandlerError(_)) => {}
                Err(_) => break,
            }
        }
        let c = &shared.counters;
        Some((
            c.misses.load(Ordering::Relaxed),
            c.faults.load(Ordering::Relaxed),
        ))
    }
}
