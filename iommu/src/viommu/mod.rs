//! The virtio-iommu device state: endpoints, domains, their page tables and host backends,
//! and the handling of one batch of requests (everything the guest queued before one
//! notification), as virtio 1.3 section 5.13 specifies.
//!
//! Guest-visible outcomes are [`Status`] codes; host-side failures are [`BackendError`]s
//! mapped to a status at the request that caused them. Nothing a guest sends can panic
//! this code: every address computation is checked and every count bounded.

mod device_iotlb;
mod dirty;
mod host;
mod hotplug;
mod relock;
mod request;
mod state;
mod translate;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use host::HostOps;

pub use device_iotlb::{IotlbEntry, MAX_IOTLB_ENTRY};
pub use dirty::{DirtyTrackingReport, HarvestOptions, DEFAULT_WINDOW_PAGES};
pub use hotplug::EndpointRemoval;
pub use relock::{Held, HostSide, Relock};
pub use request::{Reply, Request, MAX_READABLE};
pub use state::{DomainState, RestoreError, ViommuState, STATE_VERSION};
pub use translate::{Access, Translation};

use crate::backend::{BackendCaps, BackendError, DmaBackend};
use crate::pagetable::{IoPageTable, MAX_IOVA, PAGE_SIZE};
use crate::protocol::{self, features::*, Status};

/// Endpoint ID (the VIOT's PCI endpoint ID: segment << 16 | BDF).
pub type EndpointId = u32;
/// Domain ID chosen by the driver.
pub type DomainId = u32;
/// Index of a registered backend.
pub type BackendId = usize;

/// A reserved IOVA region reported by PROBE (`RESV_MEM`), inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResvRegion {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA.
    pub end: u64,
    /// `VIRTIO_IOMMU_RESV_MEM_T_RESERVED` or `_MSI`.
    pub subtype: u8,
}

impl ResvRegion {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// Static configuration of the device, before backends narrow it.
#[derive(Debug, Clone)]
pub struct ViommuConfig {
    /// Page sizes offered (bit n = 2^n bytes); the lowest set bit, 4 KiB, is the granule.
    pub page_size_mask: u64,
    /// IOVAs the device translates (at most [`MAX_IOVA`]).
    pub input_range: (u64, u64),
    /// Domain IDs the driver may use.
    pub domain_range: (u32, u32),
    /// Most domains alive at once; further ATTACHes get `NOMEM`.
    pub max_domains: usize,
    /// Initial value of the `bypass` config field (restored on system reset only).
    pub bypass: bool,
    /// Regions reserved for every endpoint (on x86 the MSI doorbell, as `RESV_MEM_T_MSI`).
    pub reserved: Vec<ResvRegion>,
    /// Guest RAM `(GPA, bytes)`: what an endpoint in bypass mode can reach (identity mapped).
    pub guest_ram: Vec<(u64, u64)>,
    /// Bytes of page-table metadata all domains together may use; past it MAP gets `NOMEM`.
    pub metadata_budget: u64,
    /// Features offered besides `VIRTIO_F_VERSION_1`.
    pub features: u64,
}

/// x86's MSI doorbell window, reported as `RESV_MEM_T_MSI` (Linux otherwise maps a software
/// MSI window at 0x8000000, which x86 cannot use).
pub const X86_MSI_REGION: ResvRegion = ResvRegion {
    start: 0xfee0_0000,
    end: 0xfeef_ffff,
    subtype: protocol::VIRTIO_IOMMU_RESV_MEM_T_MSI,
};

impl Default for ViommuConfig {
    fn default() -> Self {
        Self {
            page_size_mask: 0x4000_0000 | 0x20_0000 | 0x1000,
            input_range: (0, MAX_IOVA),
            domain_range: (0, 0xffff),
            max_domains: 0x1_0000,
            bypass: false,
            reserved: vec![X86_MSI_REGION],
            guest_ram: Vec::new(),
            metadata_budget: 1 << 30,
            features: (1 << VIRTIO_IOMMU_F_INPUT_RANGE)
                | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
                | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
                | (1 << VIRTIO_IOMMU_F_PROBE)
                | (1 << VIRTIO_IOMMU_F_MMIO)
                | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG),
        }
    }
}

impl ViommuConfig {
    /// This configuration with an input range `aw_bits` wide (`[0, 2^aw_bits - 1]`, narrowed
    /// to the [`MAX_IOVA`] the page table translates) and `domains` domain IDs
    /// (`domain_range = [0, domains - 1]`, at most 2^32; the live-domain limit becomes the
    /// smaller of `domains` and the current one). QEMU calls the first `aw-bits`.
    pub fn with_widths(mut self, aw_bits: u32, domains: u64) -> Self {
        let top = 1u64
            .checked_shl(aw_bits)
            .map_or(u64::MAX, |v| v.wrapping_sub(1));
        self.input_range = (0, top.min(MAX_IOVA));
        let last = domains.clamp(1, 1 << 32) - 1;
        self.domain_range = (0, u32::try_from(last).unwrap_or(u32::MAX));
        self.max_domains = self
            .max_domains
            .min(usize::try_from(domains).unwrap_or(usize::MAX));
        self
    }
}

/// Errors while setting the device up (VMM side, not guest-visible).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetupError {
    /// The endpoint ID is already registered.
    #[error("endpoint {0:#x} registered twice")]
    DuplicateEndpoint(EndpointId),
    /// No page size is common to the device and the backend.
    #[error("backend {0} shares no page size with the IOMMU (its mask {1:#x})")]
    PageSizes(String, u64),
    /// The backend's granule is larger than 4 KiB (the guest's page size).
    #[error("backend {0} has a granule larger than 4 KiB")]
    Granule(String),
    /// The backend has no usable IOVA range inside the device's input range.
    #[error("backend {0} has no usable IOVA range")]
    NoIovaRange(String),
    /// Two fixed reserved regions of an endpoint overlap.
    #[error("reserved regions {0:x?} and {1:x?} overlap")]
    ReservedOverlap(ResvRegion, ResvRegion),
    /// An endpoint would have two MSI doorbell regions.
    #[error("endpoint {0:#x} would have more than one MSI reserved region")]
    SecondMsiRegion(EndpointId),
    /// A host call failed while setting up bypass mappings.
    #[error("backend {0}")]
    Backend(String, #[source] BackendError),
    /// A backend added while the guest runs would contradict what the guest was told.
    #[error("backend {0} cannot map {1}")]
    Narrows(String, String),
}

/// Per-device counters, for the VMM's statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests by type: ATTACH, DETACH, MAP, UNMAP, PROBE, unknown/unparsable.
    pub requests: [u64; 6],
    /// Replies by status code (index = status).
    pub statuses: [u64; 9],
    /// Notifications (batches) processed.
    pub batches: u64,
    /// Host map calls made.
    pub host_maps: u64,
    /// Host unmap calls made.
    pub host_unmaps: u64,
    /// Translation faults raised.
    pub faults: u64,
    /// Fault events dropped because the queue of pending events was full.
    pub faults_dropped: u64,
    /// Translations served from the IOTLB.
    pub iotlb_hits: u64,
    /// Translations that walked the page table.
    pub iotlb_misses: u64,
    /// Bytes translated for emulated devices.
    pub translated_bytes: u64,
    /// Dirty reports read from backends (at harvests and before host unmaps).
    pub dirty_reads: u64,
    /// Dirty pages the backends reported (a page reported twice counts twice).
    pub dirty_pages_reported: u64,
    /// Page requests passed to backends ([`Viommu::page_request`]).
    pub page_requests: u64,
}

impl Counters {
    /// Names of [`Counters::requests`] slots.
    pub const REQUEST_NAMES: [&'static str; 6] =
        ["attach", "detach", "map", "unmap", "probe", "invalid"];
}

#[derive(Debug)]
struct Endpoint {
    domain: Option<DomainId>,
    backend: Option<BackendId>,
    /// Reserved regions of this endpoint (global ones included), sorted.
    resv: Vec<ResvRegion>,
    iotlb: translate::Iotlb,
}

#[derive(Debug)]
struct Domain {
    bypass: bool,
    table: IoPageTable,
    endpoints: BTreeSet<EndpointId>,
    /// Bumped whenever translations of the domain may change (UNMAP).
    generation: u64,
}

struct BackendSlot {
    backend: relock::SharedBackend,
    /// The backend's name, kept so that logs never wait for a backend in a call.
    name: String,
    caps: BackendCaps,
    /// The device behind it failed; it gets no more calls.
    failed: bool,
}

/// What an endpoint's backend currently has mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Nothing,
    Identity,
    Domain(DomainId),
}

/// The virtio-iommu device state.
pub struct Viommu {
    cfg: ViommuConfig,
    /// Negotiated features (`VIRTIO_IOMMU_F_*` bits).
    negotiated: u64,
    /// Current value of the `bypass` config field.
    bypass: bool,
    endpoints: BTreeMap<EndpointId, Endpoint>,
    domains: BTreeMap<DomainId, Domain>,
    backends: Vec<BackendSlot>,
    pending: Vec<host::PendingMap>,
    pending_unmaps: Vec<host::PendingUnmap>,
    faults: VecDeque<protocol::Fault>,
    counters: Counters,
    /// Next domain generation number (shared so that a re-created ID never reuses one).
    next_generation: u64,
    /// Dirty tracking, when on.
    dirty: Option<dirty::DirtyState>,
    /// Per-request bookkeeping of [`Viommu::process`], kept between batches.
    scratch: request::Scratch,
}

/// The device's life-cycle paths that make host calls (bypass changes, resets), with the
/// state unlocked during the calls (see [`Relock`]).
pub(super) trait Lifecycle: Relock {
    /// The guest wrote the `bypass` config field (only with `BYPASS_CONFIG`; the driver MUST
    /// NOT write values other than 0 and 1, and bits 1-7 are ignored).
    fn bypass_to(&mut self, value: u8) {
        if self.cfg.features & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG) == 0 {
            return;
        }
        let bypass = value & 1 == 1;
        if bypass == self.bypass {
            return;
        }
        self.flush_pending(&mut []);
        // Backends whose endpoints are all unattached, each once (endpoints may share one).
        let mut unattached: Vec<BackendId> =
            self.endpoints.values().filter_map(|e| e.backend).collect();
        unattached.sort_unstable();
        unattached.dedup();
        unattached.retain(|&b| {
            !self
                .endpoints
                .values()
                .any(|e| e.backend == Some(b) && e.domain.is_some())
        });
        let (from, to) = if bypass {
            (Content::Nothing, Content::Identity)
        } else {
            (Content::Identity, Content::Nothing)
        };
        for b in unattached {
            if let Err(e) = self.switch_backend(b, from, to) {
                log::error!("virtio-iommu: bypass change on backend {b}: {e}");
            }
        }
        self.bypass = bypass;
        for ep in self.endpoints.values_mut() {
            ep.iotlb.clear();
        }
    }

    /// Device reset: every endpoint is detached ("When the device is reset, endpoints are
    /// not attached to any domain", 5.13.5); `bypass` keeps its value (5.13.4).
    fn reset_all(&mut self) {
        self.pending.clear();
        self.pending_unmaps.clear();
        let attached: Vec<(EndpointId, DomainId)> = self
            .endpoints
            .iter()
            .filter_map(|(&id, e)| e.domain.map(|d| (id, d)))
            .collect();
        for (ep, dom) in attached {
            let _ = self.detach(ep, dom);
        }
        self.domains.clear();
        self.faults.clear();
        self.negotiated = self.cfg.features;
    }

    /// System reset: as [`Viommu::reset`], and `bypass` returns to its initial value.
    fn system_reset_all(&mut self) {
        self.reset_all();
        let initial = self.cfg.bypass;
        if initial != self.bypass {
            self.bypass_to(u8::from(initial));
        }
    }
}

impl<G: Relock + ?Sized> Lifecycle for G {}

/// Most fault events kept while the event queue has no buffers.
pub const MAX_PENDING_FAULTS: usize = 256;

impl Viommu {
    /// A device with `cfg` and no endpoints.
    pub fn new(cfg: ViommuConfig) -> Self {
        let bypass = cfg.bypass;
        Self {
            negotiated: cfg.features,
            cfg,
            bypass,
            endpoints: BTreeMap::new(),
            domains: BTreeMap::new(),
            backends: Vec::new(),
            pending: Vec::new(),
            pending_unmaps: Vec::new(),
            faults: VecDeque::new(),
            counters: Counters::default(),
            next_generation: 1,
            dirty: None,
            scratch: request::Scratch::default(),
        }
    }

    /// Registers a host backend; its capabilities narrow the device's page sizes and input
    /// range (the narrowest wins).
    ///
    /// # Errors
    /// [`SetupError`] when the backend cannot work with this device.
    pub fn add_backend(&mut self, backend: Box<dyn DmaBackend>) -> Result<BackendId, SetupError> {
        let caps = backend.caps();
        let name = backend.name();
        let mask = self.cfg.page_size_mask & caps.page_size_mask;
        if mask == 0 {
            return Err(SetupError::PageSizes(name, caps.page_size_mask));
        }
        // The common mask is a subset of the backend's: its lowest size is 4 KiB or more.
        if mask.trailing_zeros() > 12 {
            return Err(SetupError::Granule(name));
        }
        let (lo, hi) = self.cfg.input_range;
        let first = caps
            .iova_ranges
            .iter()
            .map(|r| r.0)
            .min()
            .unwrap_or(u64::MAX)
            .max(lo);
        let last = caps
            .iova_ranges
            .iter()
            .map(|r| r.1)
            .max()
            .unwrap_or(0)
            .min(hi);
        if first > last {
            return Err(SetupError::NoIovaRange(name));
        }
        self.cfg.page_size_mask = mask;
        self.cfg.input_range = (first, last);
        self.backends.push(BackendSlot {
            backend: std::sync::Arc::new(std::sync::Mutex::new(backend)),
            name,
            caps,
            failed: false,
        });
        Ok(self.backends.len() - 1)
    }

    /// Registers endpoint `id`, optionally served by `backend` (a passthrough device), with
    /// extra reserved regions. An endpoint without a backend is an emulated device that
    /// translates through [`Viommu::translate`].
    ///
    /// # Errors
    /// [`SetupError::DuplicateEndpoint`], or a backend failure while mapping bypass.
    pub fn add_endpoint(
        &mut self,
        id: EndpointId,
        backend: Option<BackendId>,
        extra_resv: &[ResvRegion],
    ) -> Result<(), SetupError> {
        if self.endpoints.contains_key(&id) {
            return Err(SetupError::DuplicateEndpoint(id));
        }
        let mut resv: Vec<ResvRegion> = self.cfg.reserved.clone();
        resv.extend_from_slice(extra_resv);
        resv.sort_by_key(|r| (r.start, r.end));
        // 5.13.6.6.1: "The device SHOULD NOT present multiple RESV_MEM properties that overlap
        // each other for the same endpoint." Fixed regions that overlap are a configuration
        // error; the host's holes yield to them (a hole is only "reserved", and an MSI
        // doorbell inside one keeps its meaning).
        if let Some(w) = resv
            .windows(2)
            .find(|w| w[0].overlaps(w[1].start, w[1].end))
        {
            return Err(SetupError::ReservedOverlap(w[0], w[1]));
        }
        // "The device SHOULD NOT present more than one VIRTIO_IOMMU_RESV_MEM_T_MSI property
        // per endpoint."
        let msi = protocol::VIRTIO_IOMMU_RESV_MEM_T_MSI;
        if resv.iter().filter(|r| r.subtype == msi).count() > 1 {
            return Err(SetupError::SecondMsiRegion(id));
        }
        if let Some(b) = backend.and_then(|b| self.backends.get(b)) {
            let holes = host_holes(&b.caps.iova_ranges, self.cfg.input_range);
            let split = subtract_regions(&holes, &resv);
            resv.extend(split);
            resv.sort_by_key(|r| (r.start, r.end));
        }
        self.endpoints.insert(
            id,
            Endpoint {
                domain: None,
                backend,
                resv,
                iotlb: translate::Iotlb::default(),
            },
        );
        if let Some(b) = backend {
            // A backend another endpoint already uses holds what that endpoint needs
            // (identity too when it is unattached): only a backend's first endpoint maps.
            if self.bypass
                && self.endpoint_content(id) == Content::Identity
                && !self
                    .endpoints
                    .iter()
                    .any(|(&other, e)| other != id && e.backend == Some(b))
            {
                let r = Held(self).switch_backend(b, Content::Nothing, Content::Identity);
                r.map_err(|e| SetupError::Backend(self.backends[b].name.clone(), e))?;
            }
        }
        Ok(())
    }

    /// The configuration space the guest reads (`struct virtio_iommu_config`).
    pub fn config(&self) -> protocol::Config {
        let mut c = protocol::Config::default();
        c.page_size_mask.set(self.cfg.page_size_mask);
        c.input_range.start.set(self.cfg.input_range.0);
        c.input_range.end.set(self.cfg.input_range.1);
        c.domain_range.start.set(self.cfg.domain_range.0);
        c.domain_range.end.set(self.cfg.domain_range.1);
        c.probe_size.set(self.probe_size());
        c.bypass = u8::from(self.bypass);
        c
    }

    /// Features offered (without `VIRTIO_F_VERSION_1`).
    pub fn offered_features(&self) -> u64 {
        self.cfg.features
    }

    /// Records the features the driver accepted.
    pub fn set_negotiated(&mut self, features: u64) {
        self.negotiated = features & self.cfg.features;
    }

    fn has(&self, feature: u32) -> bool {
        self.negotiated & (1 << feature) != 0
    }

    /// The guest wrote the `bypass` config field (only with `BYPASS_CONFIG`; the driver MUST
    /// NOT write values other than 0 and 1, and bits 1-7 are ignored).
    pub fn set_bypass(&mut self, value: u8) {
        Held(self).bypass_to(value);
    }

    /// Device reset: every endpoint is detached ("When the device is reset, endpoints are
    /// not attached to any domain", 5.13.5); `bypass` keeps its value (5.13.4).
    pub fn reset(&mut self) {
        Held(self).reset_all();
    }

    /// System reset: as [`Viommu::reset`], and `bypass` returns to its initial value.
    pub fn system_reset(&mut self) {
        Held(self).system_reset_all();
    }

    /// Marks a backend's device as failed: it gets no more host calls (its endpoint's DMA
    /// fails from now on).
    pub fn set_backend_failed(&mut self, backend: BackendId) {
        if let Some(b) = self.backends.get_mut(backend) {
            b.failed = true;
        }
    }

    /// Passes a page request of a device on `backend` (PCIe PRI) to the backend, which
    /// installs the host mapping under `iova` if it maps on demand and the domain's mapping
    /// allows the access ([`DmaBackend::page_request`]). A failed or unknown backend answers
    /// [`crate::backend::PageResponse::Invalid`].
    ///
    /// # Errors
    /// The backend's error when the host map failed.
    pub fn page_request(
        &mut self,
        backend: BackendId,
        iova: u64,
        write: bool,
    ) -> Result<crate::backend::PageResponse, BackendError> {
        HostSide::page_request(&mut Held(self), backend, iova, write)
    }

    /// Counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Takes the next fault event to write to the event queue.
    pub fn pop_fault(&mut self) -> Option<protocol::Fault> {
        self.faults.pop_front()
    }

    /// Puts a fault event back at the front (no event buffer was available).
    pub fn unpop_fault(&mut self, f: protocol::Fault) {
        self.faults.push_front(f);
    }

    /// Whether fault events are waiting.
    pub fn has_faults(&self) -> bool {
        !self.faults.is_empty()
    }

    /// Bytes of page-table metadata in use over all domains.
    pub fn metadata_bytes(&self) -> u64 {
        self.domains
            .values()
            .map(|d| d.table.metadata_bytes())
            .sum()
    }

    /// Domain ID an endpoint is attached to, if any.
    pub fn endpoint_domain(&self, ep: EndpointId) -> Option<DomainId> {
        self.endpoints.get(&ep).and_then(|e| e.domain)
    }

    /// Whether `ep` is registered.
    pub fn has_endpoint(&self, ep: EndpointId) -> bool {
        self.endpoints.contains_key(&ep)
    }

    /// Endpoint IDs and the domain each is attached to, in ID order.
    pub fn endpoints(&self) -> Vec<(EndpointId, Option<DomainId>)> {
        self.endpoints
            .iter()
            .map(|(&id, e)| (id, e.domain))
            .collect()
    }

    /// IDs of live domains.
    pub fn domain_ids(&self) -> Vec<DomainId> {
        self.domains.keys().copied().collect()
    }

    /// Pages mapped in `domain`.
    pub fn domain_mapped_pages(&self, domain: DomainId) -> Option<u64> {
        self.domains.get(&domain).map(|d| d.table.mapped_pages())
    }

    /// The guest mappings of `domain` as `(iova, gpa, len, perm)`, in IOVA order.
    pub fn domain_mappings(
        &self,
        domain: DomainId,
    ) -> Vec<(u64, u64, u64, crate::pagetable::Perm)> {
        let mut v = Vec::new();
        if let Some(d) = self.domains.get(&domain) {
            d.table.mappings(0, u64::MAX, |r| {
                v.push((r.iova(), r.gpa(), r.len(), r.perm));
                true
            });
        }
        v
    }

    fn probe_size(&self) -> u32 {
        let most = self
            .endpoints
            .values()
            .map(|e| e.resv.len())
            .max()
            .unwrap_or(1);
        let needed = (most * std::mem::size_of::<protocol::ProbeResvMem>()) as u32;
        needed.max(512).next_multiple_of(64)
    }

    fn granule(&self) -> u64 {
        1 << self.cfg.page_size_mask.trailing_zeros().max(12)
    }

    fn endpoint_content(&self, ep: EndpointId) -> Content {
        match self.endpoints.get(&ep).and_then(|e| e.domain) {
            Some(d) if self.domains.get(&d).is_some_and(|d| d.bypass) => Content::Identity,
            Some(d) => Content::Domain(d),
            None if self.bypass => Content::Identity,
            None => Content::Nothing,
        }
    }

    fn new_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

/// The holes between a backend's usable IOVA ranges inside `input`, as RESERVED regions.
fn host_holes(ranges: &[(u64, u64)], input: (u64, u64)) -> Vec<ResvRegion> {
    let mut holes = Vec::new();
    let mut next = input.0;
    let mut sorted = ranges.to_vec();
    sorted.sort();
    for (s, e) in sorted {
        if s > next && next <= input.1 {
            holes.push(ResvRegion {
                start: next,
                end: (s - 1).min(input.1),
                subtype: protocol::VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
            });
        }
        next = next.max(e.saturating_add(1));
        if e == u64::MAX {
            next = u64::MAX;
            break;
        }
    }
    if next <= input.1 && next != u64::MAX {
        holes.push(ResvRegion {
            start: next,
            end: input.1,
            subtype: protocol::VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
        });
    }
    holes
}

/// `regions` without the addresses of `remove` (sorted, non-overlapping): each region split
/// into the pieces outside every removed one.
fn subtract_regions(regions: &[ResvRegion], remove: &[ResvRegion]) -> Vec<ResvRegion> {
    let mut out = Vec::new();
    for r in regions {
        let mut start = r.start;
        let mut covered_to_end = false;
        for x in remove.iter().filter(|x| x.overlaps(r.start, r.end)) {
            if x.start > start {
                out.push(ResvRegion {
                    start,
                    end: x.start - 1,
                    subtype: r.subtype,
                });
            }
            match x.end.checked_add(1) {
                Some(next) if x.end < r.end => start = next.max(start),
                _ => {
                    covered_to_end = true;
                    break;
                }
            }
        }
        if !covered_to_end {
            out.push(ResvRegion { start, ..*r });
        }
    }
    out
}

fn status_of(e: &BackendError) -> Status {
    match e {
        BackendError::NoMemory(_) => Status::NoMem,
        BackendError::Range(_) => Status::Range,
        BackendError::BadAddress(_) => Status::Fault,
        BackendError::Unsupported | BackendError::Failed(_) => Status::DevErr,
    }
}

/// Pages of `[start, end]` (bytes, inclusive) at the 4 KiB granule: `(first page, last page)`.
fn pages_of(start: u64, end: u64) -> (u64, u64) {
    (start / PAGE_SIZE, end / PAGE_SIZE)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod model_tests;
