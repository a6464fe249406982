//! Translation for emulated devices: IOVA range -> GPA runs with a permission check, served
//! from a small per-endpoint IOTLB that UNMAP, DETACH and domain changes invalidate, and
//! fault events for the event queue when an access is refused.

use zerocopy::byteorder::little_endian::{U32, U64};

use super::*;
use crate::pagetable::{Perm, PAGE_SIZE};
use crate::protocol::{
    VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_READ, VIRTIO_IOMMU_FAULT_F_WRITE,
    VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_R_UNKNOWN,
};

/// The kind of access a device makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The device reads guest memory.
    Read,
    /// The device writes guest memory.
    Write,
}

impl Access {
    fn allowed(self, perm: Perm) -> bool {
        match self {
            Access::Read => perm.read(),
            Access::Write => perm.write(),
        }
    }
    fn fault_flag(self) -> u32 {
        match self {
            Access::Read => VIRTIO_IOMMU_FAULT_F_READ,
            Access::Write => VIRTIO_IOMMU_FAULT_F_WRITE,
        }
    }
}

/// GPA runs `(gpa, bytes)` covering a translated IOVA range in order.
pub type Translation = Vec<(u64, u64)>;

const IOTLB_ENTRIES: usize = 8;

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    iova: u64,
    /// 0 = empty.
    len: u64,
    gpa: u64,
    perm: Perm,
    generation: u64,
}

/// A tiny fully associative cache of translated runs, replaced round-robin.
#[derive(Debug, Default)]
pub(super) struct Iotlb {
    entries: [Entry; IOTLB_ENTRIES],
    next: usize,
}

impl Iotlb {
    pub(super) fn clear(&mut self) {
        self.entries = Default::default();
    }

    fn lookup(&self, addr: u64, generation: u64) -> Option<Entry> {
        self.entries
            .iter()
            .find(|e| {
                e.len != 0 && e.generation == generation && addr >= e.iova && addr - e.iova < e.len
            })
            .copied()
    }

    fn insert(&mut self, e: Entry) {
        self.entries[self.next] = e;
        self.next = (self.next + 1) % IOTLB_ENTRIES;
    }
}

impl Viommu {
    /// Translates `[iova, iova + len)` of endpoint `ep` for `access` into GPA runs in `out`.
    ///
    /// # Errors
    /// The fault, which is also queued for the event queue: `R_DOMAIN` when the endpoint is
    /// not attached (and not in bypass), `R_MAPPING` when a page is unmapped or lacks the
    /// permission ("The device MUST NOT allow writes to a range mapped without the
    /// VIRTIO_IOMMU_MAP_F_WRITE flag"), with the first refused IOVA.
    pub fn translate(
        &mut self,
        ep: EndpointId,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut Translation,
    ) -> Result<(), protocol::Fault> {
        out.clear();
        if len == 0 {
            return Ok(());
        }
        let Some(end) = iova.checked_add(len - 1) else {
            return Err(self.fault(ep, VIRTIO_IOMMU_FAULT_R_MAPPING, access, Some(iova)));
        };
        if !self.endpoints.contains_key(&ep) {
            return Err(self.fault(ep, VIRTIO_IOMMU_FAULT_R_UNKNOWN, access, Some(iova)));
        }
        let dom = match self.endpoint_content(ep) {
            Content::Identity => {
                out.push((iova, len));
                self.counters.translated_bytes += len;
                return Ok(());
            }
            Content::Nothing => {
                return Err(self.fault(ep, VIRTIO_IOMMU_FAULT_R_DOMAIN, access, Some(iova)));
            }
            Content::Domain(d) => d,
        };
        let Some(domain) = self.domains.get(&dom) else {
            return Err(self.fault(ep, VIRTIO_IOMMU_FAULT_R_DOMAIN, access, Some(iova)));
        };
        let generation = domain.generation;
        let mut addr = iova;
        let mut all_hits = true;
        let mut runs = Vec::new();
        loop {
            let hit = self
                .endpoints
                .get(&ep)
                .and_then(|e| e.iotlb.lookup(addr, generation));
            let entry = match hit {
                Some(e) => e,
                None => {
                    all_hits = false;
                    // Walk the table from the start of `addr`'s page to the end of the last
                    // page needed, and cache the run that starts there: later accesses to
                    // the same pages (ring entries, the next descriptor) then hit.
                    let from = addr & !(PAGE_SIZE - 1);
                    let to = end | (PAGE_SIZE - 1);
                    let stop =
                        domain
                            .table
                            .translate(from, (to - from).saturating_add(1), &mut runs);
                    let Some(&(gpa, run_len, perm)) = runs.first().filter(|r| r.1 > addr - from)
                    else {
                        return Err(self.fault(
                            ep,
                            VIRTIO_IOMMU_FAULT_R_MAPPING,
                            access,
                            stop.map(|s| s.max(addr)).or(Some(addr)),
                        ));
                    };
                    let e = Entry {
                        iova: from,
                        len: run_len,
                        gpa,
                        perm,
                        generation,
                    };
                    if let Some(ep) = self.endpoints.get_mut(&ep) {
                        ep.iotlb.insert(e);
                    }
                    e
                }
            };
            if !access.allowed(entry.perm) {
                return Err(self.fault(ep, VIRTIO_IOMMU_FAULT_R_MAPPING, access, Some(addr)));
            }
            let off = addr - entry.iova;
            let n = (entry.len - off).min(end - addr + 1);
            let gpa = entry.gpa + off;
            match out.last_mut() {
                Some((g, l)) if *g + *l == gpa => *l += n,
                _ => out.push((gpa, n)),
            }
            if addr + (n - 1) == end {
                break;
            }
            addr += n;
        }
        if all_hits {
            self.counters.iotlb_hits += 1;
        } else {
            self.counters.iotlb_misses += 1;
        }
        self.counters.translated_bytes += len;
        Ok(())
    }

    /// Records a fault raised outside the IOMMU (a passthrough device's DMA to `address` was
    /// refused by the host) for the event queue, with the reason the endpoint's state gives
    /// (5.13.6.7): `R_UNKNOWN` for an endpoint the device does not know, `R_DOMAIN` when it
    /// is not attached to a domain (and not in bypass), otherwise `R_MAPPING`. Returns the
    /// event.
    pub fn report_device_fault(
        &mut self,
        ep: EndpointId,
        write: bool,
        address: Option<u64>,
    ) -> protocol::Fault {
        let access = if write { Access::Write } else { Access::Read };
        let reason = if !self.endpoints.contains_key(&ep) {
            VIRTIO_IOMMU_FAULT_R_UNKNOWN
        } else if self.endpoint_content(ep) == Content::Nothing {
            VIRTIO_IOMMU_FAULT_R_DOMAIN
        } else {
            VIRTIO_IOMMU_FAULT_R_MAPPING
        };
        self.fault(ep, reason, access, address)
    }

    pub(super) fn fault(
        &mut self,
        ep: EndpointId,
        reason: u8,
        access: Access,
        address: Option<u64>,
    ) -> protocol::Fault {
        let mut flags = access.fault_flag();
        if address.is_some() {
            flags |= VIRTIO_IOMMU_FAULT_F_ADDRESS;
        }
        let f = protocol::Fault {
            reason,
            reserved: [0; 3],
            flags: U32::new(flags),
            endpoint: U32::new(ep),
            reserved1: [0; 4],
            address: U64::new(address.unwrap_or(0)),
        };
        self.counters.faults += 1;
        if self.faults.len() < MAX_PENDING_FAULTS {
            self.faults.push_back(f);
        } else {
            self.counters.faults_dropped += 1;
        }
        f
    }
}
