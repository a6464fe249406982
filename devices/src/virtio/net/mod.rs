//! virtio-net (virtio 1.3 section 5.1) whose datapath is a vhost-user back end (DPDK's vhost
//! library, OVS-DPDK, testpmd): the VMM keeps the configuration space (MAC, link status,
//! queue pairs), negotiates features with both the driver and the back end, shares guest RAM
//! with the back end (`SET_MEM_TABLE` with the memfd) and hands it the rings; the back end
//! moves the frames.
//!
//! Behind the virtio-iommu the device offers `VIRTIO_F_ACCESS_PLATFORM`: ring and buffer
//! addresses are IOVAs, and the back end translates them through its device IOTLB, which the
//! VMM fills from the endpoint's domain when the back end misses and empties when the guest
//! unmaps (see [`vhost_user`]). With more than one queue pair the device has a control
//! queue, served by the VMM (`VIRTIO_NET_CTRL_MQ`).

mod ctrl;
pub mod dirty_log;
pub mod vhost_user;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use self::dirty_log::DirtyLog;
pub use self::vhost_user::IotlbMode;
use self::vhost_user::{DeviceIotlb, LinkState, LogFault, Plan, RingSpec, Shared, VhostUserError};
use super::iommu::IommuHandle;
use super::iova::IovaMemory;
use super::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_ACCESS_PLATFORM};
use crate::GuestMemoryMmap;

/// virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most queue pairs.
pub const MAX_QUEUE_PAIRS: u16 = 8;

/// Datapath features the VMM passes between the driver and the back end when both have them:
/// checksum and segmentation offloads, mergeable receive buffers, indirect descriptors and
/// event indices. (MAC, link status and multiqueue are the VMM's own.)
pub const PASSTHROUGH_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN)
    | (1 << VIRTIO_NET_F_HOST_UFO)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX);

/// What the device counts (atomics: the back-end channel thread updates them).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// IOTLB misses the back end sent.
    pub misses: AtomicU64,
    /// `UPDATE`s sent in answer.
    pub updates: AtomicU64,
    /// `UPDATE`s sent ahead, with guest MAPs ([`IotlbMode::Prefetch`]).
    pub prefetches: AtomicU64,
    /// 4 KiB pages the `UPDATE`s (answers and prefetches) covered.
    pub update_pages: AtomicU64,
    /// `INVALIDATE`s acknowledged by the back end.
    pub invalidations: AtomicU64,
    /// 4 KiB pages the acknowledged `INVALIDATE`s covered (consecutive guest UNMAPs merged
    /// by the vIOMMU arrive as one `INVALIDATE`).
    pub invalidated_pages: AtomicU64,
    /// Entries sent again after an invalidation that DPDK widens by one entry.
    pub resent: AtomicU64,
    /// Misses on IOVAs the endpoint may not reach (each a fault event, no `UPDATE`).
    pub faults: AtomicU64,
    /// Connections made after the first (reconnects).
    pub connects: AtomicU64,
    /// Times the back end went away.
    pub disconnects: AtomicU64,
    /// Back-end requests refused or malformed.
    pub bad_messages: AtomicU64,
    /// Control-queue commands handled.
    pub ctrl_commands: AtomicU64,
}

/// How to set the device up (`--vhost-user-net`).
#[derive(Clone)]
pub struct NetConfig {
    /// For logs: `vhost-user-net 00:03.0 (PATH)`.
    pub label: String,
    /// The back end's socket (the VMM connects).
    pub socket: PathBuf,
    /// MAC address in the configuration space.
    pub mac: [u8; 6],
    /// Queue pairs (1 to [`MAX_QUEUE_PAIRS`]).
    pub queue_pairs: u16,
    /// Try to reconnect this often after the back end went away.
    pub reconnect: Option<Duration>,
    /// Behind the vIOMMU as this endpoint.
    pub iommu: Option<(IommuHandle, u32)>,
    /// How the device IOTLB is filled.
    pub iotlb: IotlbMode,
}

/// A virtio-net device with a vhost-user back end.
pub struct VhostUserNet {
    shared: Arc<Shared>,
    mac: [u8; 6],
    pairs: u16,
    /// Virtio features of the back end, read at connection.
    backend_features: u64,
    acked: u64,
    kicks: Vec<Arc<EventFd>>,
    queues: Vec<Queue>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    /// Pairs the driver enabled (1 until `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`).
    active_pairs: u16,
}

impl VhostUserNet {
    /// Connects to the back end at `cfg.socket` and negotiates; the device then offers the
    /// guest what the back end can do.
    ///
    /// # Errors
    /// [`VhostUserError`]: no socket, a back end that lacks a feature the device needs, or
    /// a malformed reply.
    pub fn new(cfg: NetConfig, mem: Arc<GuestMemoryMmap>) -> Result<Self, VhostUserError> {
        vhost_user::check_socket(&cfg.socket)?;
        let pairs = cfg.queue_pairs.clamp(1, MAX_QUEUE_PAIRS);
        let queues = 2 * usize::from(pairs) + usize::from(pairs > 1);
        let gpa_end = vm_memory::GuestMemoryBackend::last_addr(mem.as_ref())
            .0
            .saturating_add(1);
        let log = DirtyLog::new(gpa_end).map_err(VhostUserError::Log)?;
        let shared = Arc::new(Shared {
            label: cfg.label,
            socket: cfg.socket,
            iommu: cfg.iommu,
            mem,
            queues,
            reconnect: cfg.reconnect,
            iotlb_mode: cfg.iotlb,
            state: Mutex::default(),
            log,
            log_fault: LogFault::from_env(),
            link_up: AtomicBool::new(false),
            counters: NetCounters::default(),
        });
        let (link, channel) = shared.connect()?;
        let backend_features = link.features;
        let main_fd = link.watch_fd();
        shared.lock().link = Some(link);
        shared.link_up.store(true, Ordering::Release);
        vhost_user::spawn_channel_thread(shared.clone(), main_fd, channel)
            .map_err(|e| VhostUserError::Connect(shared.socket.clone(), e))?;
        Ok(Self {
            shared,
            mac: cfg.mac,
            pairs,
            backend_features,
            acked: 0,
            kicks: Vec::new(),
            queues: Vec::new(),
            interrupt: None,
            active_pairs: 1,
        })
    }

    /// The vIOMMU side of this device: what turns guest unmaps into IOTLB invalidations (and
    /// maps into prefetched entries).
    pub fn device_iotlb(&self) -> DeviceIotlb {
        DeviceIotlb {
            shared: self.shared.clone(),
        }
    }

    /// Starts dirty tracking for a migration: the back end logs every guest page it writes
    /// (buffers and used rings) by GPA into the device's shared log. Returns false when it
    /// cannot (the back end lacks `VHOST_USER_PROTOCOL_F_LOG_SHMFD` or `VHOST_F_LOG_ALL`, or
    /// refused): [`VhostUserNet::harvest_dirty_log`] then reports all of RAM every time.
    pub fn start_dirty_log(&self) -> bool {
        self.shared.set_logging(true)
    }

    /// ORs into `out` the guest pages the back end wrote since the last harvest (all of
    /// `ram`, `(GPA, bytes)` ranges, when it cannot log). Returns the pages reported.
    pub fn harvest_dirty_log(
        &self,
        ram: &[(u64, u64)],
        out: &mut iommu::dirty::DirtyBitmap,
    ) -> u64 {
        self.shared.harvest_log(ram, out)
    }

    /// Stops dirty tracking (`VHOST_F_LOG_ALL` off).
    pub fn stop_dirty_log(&self) {
        self.shared.set_logging(false);
    }

    /// Stops the back end's rings for a migration's stop-and-copy (`GET_VRING_BASE`): it
    /// writes no guest memory from here on. The bases go into the snapshot
    /// ([`VirtioDevice::queue_positions`]); the destination starts its back end there.
    ///
    /// # Errors
    /// A ring that did not stop (the back end is then cut off).
    pub fn stop_for_migration(&self) -> Result<(), VhostUserError> {
        self.shared.stop_for_migration()
    }

    /// Starts the rings [`VhostUserNet::stop_for_migration`] stopped again (the migration
    /// failed, or it was a snapshot).
    pub fn restart_after_migration(&self) {
        self.shared.restart_after_migration();
    }

    /// Queue pairs the driver enabled.
    pub fn active_pairs(&self) -> u16 {
        self.active_pairs
    }

    /// Counters so far.
    pub fn counters(&self) -> &NetCounters {
        &self.shared.counters
    }

    /// Whether the back end is connected (`VIRTIO_NET_S_LINK_UP`).
    pub fn link_up(&self) -> bool {
        self.shared.link_up.load(Ordering::Acquire)
    }

    /// The link and the counters as `name=value` pairs on one line (`--counters`): device
    /// IOTLB misses, updates, prefetches, invalidations, resends and faults, connections and
    /// bad messages.
    pub fn counters_line(&self) -> String {
        let c = self.counters();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "link={} misses={} updates={} prefetches={} update_pages={} invalidations={} \
             invalidated_pages={} resent={} faults={} reconnects={} disconnects={} \
             bad_messages={} ctrl_commands={}",
            if self.link_up() { "up" } else { "down" },
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
        )
    }

    fn behind_iommu(&self) -> bool {
        self.shared.iommu.is_some()
    }

    fn ctrl_queue(&self) -> Option<usize> {
        (self.pairs > 1).then_some(2 * usize::from(self.pairs))
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up() {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&self.pairs.to_le_bytes());
        // mtu (no VIRTIO_NET_F_MTU): 0.
        c
    }

    /// The ring of queue `i` as handed to the back end.
    fn ring(&self, i: usize) -> Option<RingSpec> {
        let q = self.queues.get(i)?;
        Some(RingSpec {
            index: i,
            size: q.size(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            kick: self.kicks.get(i)?.clone(),
        })
    }

    /// Starts the rings of pairs `[from, to)` on the back end (if connected) and records them
    /// in the plan replayed on reconnection.
    fn start_pairs(&mut self, from: u16, to: u16) {
        let Some(interrupt) = self.interrupt.clone() else {
            return;
        };
        let rings: Vec<RingSpec> = (2 * usize::from(from)..2 * usize::from(to))
            .filter_map(|i| self.ring(i))
            .collect();
        let features =
            vhost_user::backend_features(self.acked, self.backend_features, PASSTHROUGH_FEATURES);
        let positions: Vec<u16> = rings
            .iter()
            .map(|r| self.queues[r.index].next_avail())
            .collect();
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let first = st.plan.is_none();
        let logging = st.logging;
        let plan = st.plan.get_or_insert_with(|| Plan {
            features,
            rings: Vec::new(),
            interrupt,
        });
        plan.rings.extend(rings.iter().cloned());
        let plan = plan.clone();
        st.plan_generation += 1;
        let LinkState { link, .. } = &mut *st;
        let Some(link) = link.as_mut() else {
            return;
        };
        let r = if first {
            shared.start(link, &plan, &positions, logging)
        } else {
            rings
                .iter()
                .zip(&positions)
                .try_for_each(|(r, &b)| shared.start_ring(link, &plan, r, b, logging))
        };
        if let Err(e) = r {
            log::error!("{}: cannot start the rings: {e}", shared.label);
            vhost_user::cut(link);
        }
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.shared.queues]
    }

    fn avail_features(&self) -> u64 {
        let mut f = (1u64 << super::VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (self.backend_features & PASSTHROUGH_FEATURES);
        if self.pairs > 1 {
            f |= (1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ);
        }
        if self.behind_iommu() {
            f |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // virtio 5.1.4.2: "The driver MUST NOT write to any of the device configuration
        // fields" (without VIRTIO_NET_F_CTRL_MAC_ADDR, not offered).
    }

    fn set_notifiers(&mut self, evts: &[Arc<EventFd>]) {
        self.kicks = evts.to_vec();
    }

    fn notified_outside(&self, queue: usize) -> bool {
        queue < 2 * usize::from(self.pairs)
    }

    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.shared.queues {
            return Err(ActivateError::QueueCount {
                expected: self.shared.queues,
                got: queues.len(),
            });
        }
        // Behind the IOMMU every ring and buffer address is an IOVA; a driver that does not
        // know that would hand over GPAs.
        if self.behind_iommu() && self.acked & (1 << VIRTIO_F_ACCESS_PLATFORM) == 0 {
            return Err(ActivateError::MissingFeature(VIRTIO_F_ACCESS_PLATFORM));
        }
        for (i, q) in queues.iter().enumerate() {
            let valid = match &self.shared.iommu {
                Some((h, ep)) => {
                    q.is_valid(&IovaMemory::new(self.shared.mem.clone(), h.clone(), *ep))
                }
                None => q.is_valid(self.shared.mem.as_ref()),
            };
            if !valid {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        self.queues = queues;
        self.interrupt = Some(interrupt);
        self.active_pairs = 1;
        self.start_pairs(0, 1);
        self.shared.replay();
        Ok(())
    }

    fn reset(&mut self) {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        if let Some(plan) = st.plan.take() {
            let rings: Vec<usize> = plan.rings.iter().map(|r| r.index).collect();
            shared.stop_rings(&mut st, &rings);
        }
        st.stopped = None;
        st.plan_generation += 1;
        drop(st);
        self.queues.clear();
        self.interrupt = None;
        self.acked = 0;
        self.active_pairs = 1;
    }

    /// The back end's rings stand where `GET_VRING_BASE` left them (after
    /// [`VhostUserNet::stop_for_migration`]), or where the driver's used index says (no back
    /// end); the control queue is the VMM's own.
    fn queue_positions(&self) -> Vec<(u16, u16)> {
        let stopped = self.shared.stopped_bases().unwrap_or_default();
        let own = super::positions(&self.queues);
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                if Some(i) == self.ctrl_queue() {
                    return own[i];
                }
                let b = stopped
                    .iter()
                    .find(|s| s.0 == i)
                    .map(|s| s.1)
                    .or_else(|| self.shared.used_idx(q.used_ring()))
                    .unwrap_or(0);
                (b, b)
            })
            .collect()
    }

    fn queue_notify(&mut self, queue: usize) {
        if Some(queue) == self.ctrl_queue() {
            self.process_ctrl();
        } else if let Some(k) = self.kicks.get(queue) {
            // Reached only when the notification came as an MMIO exit (no ioeventfd): pass
            // it on to the back end.
            let _ = k.write(1);
        }
    }
}

#[cfg(test)]
mod tests;
