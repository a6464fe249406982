//! Saving and restoring the device state for snapshots and migration: negotiated features,
//! the `bypass` field, which endpoint is in which domain, every domain's mappings (with their
//! boundaries, so that a later UNMAP behaves the same), and fault events not yet delivered.
//!
//! Restoring into a freshly built device (same endpoints and backends) re-creates every host
//! mapping on the backends before the guest runs again.

use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use super::host::HostOps;
use super::relock::Held;
use super::*;
use crate::pagetable::Perm;

/// Version of [`ViommuState`]'s layout.
pub const STATE_VERSION: u32 = 1;

/// One domain: ID, bypass flag and mappings `(first IOVA page, first GPA page, pages, perm
/// bits)`, in IOVA order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    /// Domain ID.
    pub id: DomainId,
    /// An identity (bypass) domain.
    pub bypass: bool,
    /// Mappings as `(iova_page, gpa_page, pages, perm bits)`.
    pub mappings: Vec<(u64, u64, u64, u8)>,
}

/// The guest-visible state of a virtio-iommu.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViommuState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Negotiated `VIRTIO_IOMMU_F_*` features.
    pub negotiated: u64,
    /// The `bypass` config field.
    pub bypass: bool,
    /// `(endpoint, domain)` of attached endpoints.
    pub attached: Vec<(EndpointId, DomainId)>,
    /// Live domains.
    pub domains: Vec<DomainState>,
    /// Fault events not yet delivered, as their wire bytes.
    pub faults: Vec<Vec<u8>>,
}

/// Why a state could not be restored (the device is left as it was).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// The state was written by an incompatible version.
    #[error("virtio-iommu state version {0} (this VMM reads {STATE_VERSION})")]
    Version(u32),
    /// An endpoint of the state does not exist on this side.
    #[error("endpoint {0:#x} of the saved state is not on this VM")]
    UnknownEndpoint(EndpointId),
    /// A domain's mappings do not fit a page table (corrupt state).
    #[error("domain {0}: mapping {1:#x}+{2} pages cannot be restored")]
    BadMapping(DomainId, u64, u64),
    /// A domain ID outside this device's domain range.
    #[error("domain {0} of the saved state is outside this device's domain range")]
    DomainOutOfRange(DomainId),
    /// More domains than this device allows.
    #[error("{0} domains saved, more than this device allows")]
    TooManyDomains(usize),
    /// A host backend refused to map what the guest had mapped.
    #[error("host mappings of backend {0}: {1}")]
    Backend(String, BackendError),
}

impl Viommu {
    /// The device state (deferred host maps are issued first).
    pub fn save_state(&mut self) -> ViommuState {
        Held(&mut *self).flush_pending(&mut []);
        let domains = self
            .domains
            .iter()
            .map(|(&id, d)| {
                let mut mappings = Vec::new();
                d.table.mappings(0, u64::MAX, |r| {
                    mappings.push((r.iova_page, r.gpa_page, r.pages, r.perm.bits()));
                    true
                });
                DomainState {
                    id,
                    bypass: d.bypass,
                    mappings,
                }
            })
            .collect();
        ViommuState {
            version: STATE_VERSION,
            negotiated: self.negotiated,
            bypass: self.bypass,
            attached: self
                .endpoints
                .iter()
                .filter_map(|(&ep, e)| e.domain.map(|d| (ep, d)))
                .collect(),
            domains,
            faults: self.faults.iter().map(|f| f.as_bytes().to_vec()).collect(),
        }
    }

    /// Replaces the device state with `s` and brings every backend's host mappings in line
    /// with it.
    ///
    /// # Errors
    /// [`RestoreError`]; the device state is then unchanged (host mappings restored too, as
    /// far as the backends allow).
    pub fn restore_state(&mut self, s: &ViommuState) -> Result<(), RestoreError> {
        if s.version != STATE_VERSION {
            return Err(RestoreError::Version(s.version));
        }
        if let Some(&(ep, _)) = s
            .attached
            .iter()
            .find(|(ep, _)| !self.endpoints.contains_key(ep))
        {
            return Err(RestoreError::UnknownEndpoint(ep));
        }
        if s.domains.len() > self.cfg.max_domains {
            return Err(RestoreError::TooManyDomains(s.domains.len()));
        }
        Held(&mut *self).flush_pending(&mut []);
        // Build the new domains aside first: a corrupt state changes nothing.
        let mut domains = BTreeMap::new();
        let (lo, hi) = (
            self.cfg.input_range.0 / PAGE_SIZE,
            self.cfg.input_range.1 / PAGE_SIZE,
        );
        for d in &s.domains {
            // A destination started with a narrower `domains=` or `aw-bits=` cannot take
            // what the guest has: refused, not truncated.
            if !self.domain_in_range(d.id) {
                return Err(RestoreError::DomainOutOfRange(d.id));
            }
            let mut table = IoPageTable::new(self.cfg.metadata_budget);
            for &(iova, gpa, pages, perm) in &d.mappings {
                let ok = pages > 0
                    && Perm::from_bits(u32::from(perm)).is_some()
                    && iova >= lo
                    && iova.checked_add(pages - 1).is_some_and(|last| {
                        last <= hi
                            && table
                                .map(
                                    iova,
                                    last,
                                    gpa,
                                    Perm::from_bits(u32::from(perm)).unwrap_or_default(),
                                )
                                .is_ok()
                    });
                if !ok {
                    return Err(RestoreError::BadMapping(
                        d.id,
                        iova.saturating_mul(PAGE_SIZE),
                        pages,
                    ));
                }
            }
            let generation = self.new_generation();
            domains.insert(
                d.id,
                Domain {
                    bypass: d.bypass,
                    table,
                    endpoints: BTreeSet::new(),
                    generation,
                },
            );
        }
        for &(ep, dom) in &s.attached {
            match domains.get_mut(&dom) {
                Some(d) => {
                    d.endpoints.insert(ep);
                }
                None => return Err(RestoreError::UnknownEndpoint(ep)),
            }
        }

        let before: Vec<Content> = (0..self.backends.len())
            .map(|b| self.backend_content(b))
            .collect();
        let old_domains = std::mem::replace(&mut self.domains, domains);
        let old_attached: Vec<(EndpointId, Option<DomainId>)> = self
            .endpoints
            .iter()
            .map(|(&id, e)| (id, e.domain))
            .collect();
        let old_bypass = self.bypass;
        self.bypass = s.bypass;
        for e in self.endpoints.values_mut() {
            e.domain = None;
            e.iotlb.clear();
        }
        for &(ep, dom) in &s.attached {
            if let Some(e) = self.endpoints.get_mut(&ep) {
                e.domain = Some(dom);
            }
        }
        // Host mappings: from what each backend has now to what the restored state says.
        for b in 0..self.backends.len() {
            let after = self.backend_content(b);
            let r = Held(&mut *self).switch_backend(b, before[b], after);
            if let Err(e) = r {
                let name = self.backends[b].name.clone();
                // Undo: the earlier backends back to their old content, the state back.
                let new_content: Vec<Content> = (0..b).map(|k| self.backend_content(k)).collect();
                self.domains = old_domains;
                self.bypass = old_bypass;
                for (id, d) in old_attached {
                    if let Some(e) = self.endpoints.get_mut(&id) {
                        e.domain = d;
                    }
                }
                for (k, from) in new_content.into_iter().enumerate() {
                    let _ = Held(&mut *self).switch_backend(k, from, before[k]);
                }
                return Err(RestoreError::Backend(name, e));
            }
        }
        self.negotiated = s.negotiated & self.cfg.features;
        self.faults = s
            .faults
            .iter()
            .filter_map(|b| protocol::Fault::read_from_bytes(b).ok())
            .collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
