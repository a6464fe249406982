//! Keeping host backends in step with the guest's view: endpoint attach and detach, deferred
//! and merged host maps, unmaps, and rollback when a host call fails part way (the guest then
//! sees an error status and the state is as before its request).

use super::dirty::{DirtySide, DEFAULT_WINDOW_PAGES};
use super::relock::{call, Relock};
use super::*;
use crate::pagetable::{Perm, Run};

/// A host map deferred to the end of the batch (or to the next non-MAP request).
#[derive(Debug)]
pub(super) struct PendingMap {
    domain: DomainId,
    run: Run,
    /// The guest requests merged into `run`, with their own parts.
    parts: Vec<(usize, Run)>,
}

/// The host side of a successful UNMAP, deferred while the next requests of the batch are
/// UNMAPs too, so that their host calls merge.
#[derive(Debug)]
pub(super) struct PendingUnmap {
    req: usize,
    domain: DomainId,
    first: u64,
    last: u64,
}

/// Adds `next` to `runs`, merging it into the last run when contiguous in IOVA and GPA with
/// the same permissions.
fn push_merged(runs: &mut Vec<Run>, next: Run) {
    if let Some(last) = runs.last_mut() {
        if last.iova_page + last.pages == next.iova_page
            && last.gpa_page + last.pages == next.gpa_page
            && last.perm == next.perm
        {
            last.pages += next.pages;
            return;
        }
    }
    runs.push(next);
}

impl Viommu {
    /// Distinct, working backends of the endpoints attached to `dom`.
    fn live_backends(&self, dom: DomainId) -> Vec<BackendId> {
        let mut v: Vec<BackendId> = self
            .domains
            .get(&dom)
            .map(|d| {
                d.endpoints
                    .iter()
                    .filter_map(|e| self.endpoints.get(e).and_then(|e| e.backend))
                    .filter(|&b| !self.backends[b].failed)
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Defers the host side of a successful MAP.
    pub(super) fn queue_map(&mut self, req: usize, dom: DomainId, run: Run) {
        let backends = self.live_backends(dom);
        if backends.is_empty() {
            return;
        }
        let mergeable = backends.iter().all(|&b| self.backends[b].caps.merge_maps);
        if mergeable {
            if let Some(last) = self.pending.last_mut() {
                let r = &mut last.run;
                if last.domain == dom
                    && r.iova_page + r.pages == run.iova_page
                    && r.gpa_page + r.pages == run.gpa_page
                    && r.perm == run.perm
                {
                    r.pages += run.pages;
                    last.parts.push((req, run));
                    return;
                }
            }
        }
        self.pending.push(PendingMap {
            domain: dom,
            run,
            parts: vec![(req, run)],
        });
    }

    /// Whether a deferred UNMAP of `dom` touches pages `[first, last]`.
    pub(super) fn pending_unmaps_overlap(&self, dom: DomainId, first: u64, last: u64) -> bool {
        self.pending_unmaps
            .iter()
            .any(|u| u.domain == dom && u.first <= last && first <= u.last)
    }

    /// Defers the host side (and the table removal) of an UNMAP of pages `[first, last]` of
    /// `dom`, already checked.
    pub(super) fn queue_unmap(&mut self, req: usize, dom: DomainId, first: u64, last: u64) {
        // Deferred MAPs were settled before this UNMAP (`process`), and deferred UNMAPs
        // overlapping its range before its checks (`unmap_req`).
        self.pending_unmaps.push(PendingUnmap {
            req,
            domain: dom,
            first,
            last,
        });
    }

    fn fail_map(
        &mut self,
        dom: DomainId,
        req: usize,
        run: Run,
        e: &BackendError,
        statuses: &mut [Status],
    ) {
        log::warn!(
            "virtio-iommu: host map of IOVA {:#x}+{:#x} failed: {e}",
            run.iova(),
            run.len()
        );
        let generation = self.new_generation();
        if let Some(d) = self.domains.get_mut(&dom) {
            d.table.remove(run.iova_page, run.last_page(), |_| {});
            d.generation = generation;
        }
        if let Some(s) = statuses.get_mut(req) {
            *s = status_of(e);
        }
    }

    /// The host calls that map `runs` on backend `b`.
    fn map_ops(&self, b: BackendId, runs: &[Run]) -> Vec<Run> {
        if !self.backends[b].caps.merge_maps {
            return runs.to_vec();
        }
        let mut v = Vec::new();
        for &r in runs {
            push_merged(&mut v, r);
        }
        v
    }

    /// The host calls `(iova, len)` that unmap `runs` (whole guest mappings) on backend `b`.
    fn unmap_ops(&self, b: BackendId, runs: &[Run]) -> Vec<(u64, u64)> {
        let merge = self.backends[b].caps.merge_unmaps || self.backends[b].caps.merge_maps;
        // While dirty bits are collected with each unmap, a merged call stays within one
        // harvest window, so its bitmap stays small whatever the guest mapped.
        let cap = if self.reads_device_dirty(b) {
            DEFAULT_WINDOW_PAGES * PAGE_SIZE
        } else {
            u64::MAX
        };
        let mut v: Vec<(u64, u64)> = Vec::new();
        for r in runs {
            match v.last_mut() {
                Some((i, l)) if merge && *i + *l == r.iova() && *l + r.len() <= cap => {
                    *l += r.len()
                }
                _ => v.push((r.iova(), r.len())),
            }
        }
        v
    }

    /// What `content` means as mappings.
    pub(super) fn content_runs(&self, content: Content) -> Vec<Run> {
        match content {
            Content::Nothing => Vec::new(),
            Content::Identity => self
                .cfg
                .guest_ram
                .iter()
                .filter(|&&(_, len)| len >= PAGE_SIZE)
                .map(|&(gpa, len)| Run {
                    iova_page: gpa / PAGE_SIZE,
                    gpa_page: gpa / PAGE_SIZE,
                    pages: len / PAGE_SIZE,
                    perm: Perm::RW,
                })
                .collect(),
            Content::Domain(d) => {
                let mut v = Vec::new();
                if let Some(d) = self.domains.get(&d) {
                    if !d.bypass {
                        d.table.mappings(0, u64::MAX, |r| {
                            v.push(r);
                            true
                        });
                    } else {
                        return self.content_runs(Content::Identity);
                    }
                }
                v
            }
        }
    }

    /// Removes `ep` from `dom`'s endpoint set, freeing the domain when it empties ("After all
    /// endpoints have been successfully detached from a domain, it ceases to exist").
    pub(super) fn leave_domain(&mut self, ep: EndpointId, dom: DomainId) {
        let empty = match self.domains.get_mut(&dom) {
            Some(d) => {
                d.endpoints.remove(&ep);
                d.endpoints.is_empty()
            }
            None => false,
        };
        if empty {
            self.domains.remove(&dom);
        }
        if let Some(e) = self.endpoints.get_mut(&ep) {
            e.domain = None;
            e.iotlb.clear();
        }
    }

    /// Drops pages `[first, last]` of `dom` from its table (after the host unmaps).
    fn remove_from_table(&mut self, dom: DomainId, first: u64, last: u64) {
        let generation = self.new_generation();
        if let Some(d) = self.domains.get_mut(&dom) {
            d.table.remove(first, last, |_| {});
            d.generation = generation;
        }
    }
}

/// The paths that make host calls, each with the state unlocked during the calls
/// (see [`Relock`]).
pub(super) trait HostOps: Relock {
    /// Issues the deferred host unmaps, the UNMAPs of one domain in one go (merged where the
    /// backends allow), then removes their mappings from the tables. When the merged calls
    /// fail, each UNMAP is retried on its own so that only those whose own call fails get
    /// the error (in `statuses`) and keep their mappings.
    fn flush_unmaps(&mut self, statuses: &mut [Status]) {
        let ops = std::mem::take(&mut self.pending_unmaps);
        let mut i = 0;
        while i < ops.len() {
            let dom = ops[i].domain;
            let n = ops[i..].iter().take_while(|u| u.domain == dom).count();
            let group = &ops[i..i + n];
            i += n;
            let mut runs = Vec::new();
            if let Some(d) = self.domains.get(&dom) {
                for u in group {
                    d.table.mappings(u.first, u.last, |r| {
                        runs.push(r);
                        true
                    });
                }
            }
            runs.sort_by_key(|r| r.iova_page);
            let together = n > 1 && self.unmap_on_all(dom, &runs).is_ok();
            for u in group {
                if together {
                    self.remove_from_table(dom, u.first, u.last);
                } else if let Err(e) = self.unmap_range(dom, u.first, u.last) {
                    if let Some(s) = statuses.get_mut(u.req) {
                        *s = status_of(&e);
                    }
                }
            }
        }
    }

    /// Issues the deferred host maps and unmaps. A failed merged map is retried request by
    /// request so that only the requests whose own call fails get the error (in `statuses`)
    /// and lose their mapping.
    fn flush_pending(&mut self, statuses: &mut [Status]) {
        self.flush_unmaps(statuses);
        for op in std::mem::take(&mut self.pending) {
            let backends = self.live_backends(op.domain);
            let r = op.run;
            let Err(e) = self.map_on_all(&backends, r) else {
                continue;
            };
            if op.parts.len() == 1 {
                self.fail_map(op.domain, op.parts[0].0, r, &e, statuses);
                continue;
            }
            for (req, part) in op.parts {
                if let Err(e) = self.map_on_all(&backends, part) {
                    self.fail_map(op.domain, req, part, &e, statuses);
                }
            }
        }
    }

    /// Maps `run` on every backend in `backends`, undoing the earlier ones on failure.
    fn map_on_all(&mut self, backends: &[BackendId], run: Run) -> Result<(), BackendError> {
        for (k, &b) in backends.iter().enumerate() {
            self.counters.host_maps += 1;
            let (iova, gpa, len, perm) = (run.iova(), run.gpa(), run.len(), run.perm);
            if let Err(e) = call(self, b, |be| be.map(iova, gpa, len, perm)) {
                for &u in &backends[..k] {
                    self.harvest_runs(u, &[run], DEFAULT_WINDOW_PAGES, true);
                    self.counters.host_unmaps += 1;
                    let _ = call(self, u, |be| be.unmap(iova, len));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Maps `runs` on backend `b`; on failure unmaps what this call mapped.
    fn map_runs(&mut self, b: BackendId, runs: &[Run]) -> Result<(), BackendError> {
        if self.backends[b].failed {
            return Ok(());
        }
        let ops = self.map_ops(b, runs);
        for (k, r) in ops.iter().enumerate() {
            self.counters.host_maps += 1;
            let (iova, gpa, len, perm) = (r.iova(), r.gpa(), r.len(), r.perm);
            if let Err(e) = call(self, b, |be| be.map(iova, gpa, len, perm)) {
                self.harvest_runs(b, &ops[..k], DEFAULT_WINDOW_PAGES, true);
                for u in &ops[..k] {
                    self.counters.host_unmaps += 1;
                    let (iova, len) = (u.iova(), u.len());
                    let _ = call(self, b, |be| be.unmap(iova, len));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unmaps `runs` from backend `b`; on failure maps back what this call unmapped. While
    /// dirty tracking is on, the device's dirty bits of each range are collected with its
    /// unmap (see [`DmaBackend::unmap_read_dirty`]): an IOVA means nothing once unmapped.
    fn unmap_runs(&mut self, b: BackendId, runs: &[Run]) -> Result<(), BackendError> {
        let reads_device = self.reads_device_dirty(b);
        if !reads_device {
            // Untracked or failed: its writable pages count as dirty.
            self.harvest_runs(b, runs, DEFAULT_WINDOW_PAGES, true);
        }
        if self.backends[b].failed {
            return Ok(());
        }
        let ops = self.unmap_ops(b, runs);
        for (k, &(iova, len)) in ops.iter().enumerate() {
            self.counters.host_unmaps += 1;
            let r = if reads_device {
                let mut bits = vec![0u64; (len / PAGE_SIZE).div_ceil(64) as usize];
                self.counters.dirty_reads += 1;
                let r = call(self, b, |be| be.unmap_read_dirty(iova, len, &mut bits));
                if r.is_ok() {
                    self.mark_unmapped(runs, iova, len, &bits);
                }
                r
            } else {
                call(self, b, |be| be.unmap(iova, len))
            };
            if let Err(e) = r {
                let done_end = ops[..k].last().map(|&(i, l)| i + l).unwrap_or(0);
                let undo: Vec<Run> = runs
                    .iter()
                    .copied()
                    .filter(|r| r.iova() < done_end)
                    .collect();
                if let Err(e2) = self.map_runs(b, &undo) {
                    log::error!(
                        "virtio-iommu: cannot restore host mappings after a failed unmap: {e2}"
                    );
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Replaces backend `b`'s host mappings `from` with `to`; on failure restores `from`.
    fn switch_backend(
        &mut self,
        b: BackendId,
        from: Content,
        to: Content,
    ) -> Result<(), BackendError> {
        if from == to {
            return Ok(());
        }
        let old = self.content_runs(from);
        let new = self.content_runs(to);
        self.unmap_runs(b, &old)?;
        if let Err(e) = self.map_runs(b, &new) {
            if let Err(e2) = self.map_runs(b, &old) {
                log::error!("virtio-iommu: cannot restore host mappings of backend {b}: {e2}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Attaches `ep` to `dom` (created if needed), moving it from its current domain.
    fn attach(&mut self, ep: EndpointId, dom: DomainId, bypass: bool) -> Result<(), Status> {
        let (backend, old) = match self.endpoints.get(&ep) {
            Some(e) => (e.backend, e.domain),
            None => return Err(Status::NoEnt),
        };
        if let Some(d) = self.domains.get(&dom) {
            // 5.13.6.1: "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS
            // flag is not consistent with that domain, the device SHOULD reject the request
            // and set status to VIRTIO_IOMMU_S_INVAL."
            if d.bypass != bypass {
                return Err(Status::Inval);
            }
            if old == Some(dom) {
                return Ok(());
            }
            // "If properties of the endpoint (obtained with a PROBE request) are compatible
            // with properties of other endpoints already attached to the requested domain,
            // then the device SHOULD attach the endpoint. Otherwise the device SHOULD reject
            // the request and set status to VIRTIO_IOMMU_S_UNSUPP." A domain mapping inside
            // this endpoint's reserved regions is such an incompatibility.
            let resv = &self.endpoints[&ep].resv;
            let clash = resv.iter().any(|r| {
                !d.table
                    .is_range_empty(r.start / PAGE_SIZE, r.end / PAGE_SIZE)
            });
            if clash {
                return Err(Status::Unsupp);
            }
        } else {
            // A move frees the old domain when this endpoint is its last one, as the DETACH it
            // stands for would (5.13.6.1: "the device SHOULD behave as if the driver issued a
            // DETACH request with this endpoint, followed by the ATTACH request").
            let freed = old.is_some_and(|o| {
                self.domains
                    .get(&o)
                    .is_some_and(|d| d.endpoints.len() == 1 && d.endpoints.contains(&ep))
            });
            if self.domains.len() - usize::from(freed) >= self.cfg.max_domains {
                return Err(Status::NoMem);
            }
        }
        let from = self.endpoint_content(ep);
        let to = if bypass {
            Content::Identity
        } else {
            Content::Domain(dom)
        };
        if let Some(b) = backend {
            // Endpoints sharing a host address space (one container or device process)
            // cannot be in different domains: "If it cannot do so, the device MUST reject
            // the request and set status to VIRTIO_IOMMU_S_UNSUPP."
            let others: Vec<Option<DomainId>> = self
                .endpoints
                .iter()
                .filter(|(&id, e)| id != ep && e.backend == Some(b) && e.domain.is_some())
                .map(|(_, e)| e.domain)
                .collect();
            if others.iter().any(|&d| d != Some(dom)) {
                return Err(Status::Unsupp);
            }
            // The host content changes before the state does; a domain created by this
            // request has no mappings yet.
            if others.is_empty() {
                self.switch_backend(b, from, to).map_err(|e| {
                    // A move the host cannot make leaves the endpoint where it was; the
                    // spec's answer for that is UNSUPP ("If the device cannot do so, it MUST
                    // reject the request and set status to VIRTIO_IOMMU_S_UNSUPP").
                    if old.is_some() {
                        Status::Unsupp
                    } else {
                        status_of(&e)
                    }
                })?;
            }
        }
        // "If the endpoint identified by endpoint is already attached to another domain,
        // then the device SHOULD first detach it from that domain and attach it to the one
        // identified by domain."
        if let Some(o) = old {
            self.leave_domain(ep, o);
        }
        let generation = self.new_generation();
        let budget = self.cfg.metadata_budget;
        let d = self.domains.entry(dom).or_insert_with(|| Domain {
            bypass,
            table: IoPageTable::new(budget),
            endpoints: BTreeSet::new(),
            generation,
        });
        d.endpoints.insert(ep);
        if let Some(e) = self.endpoints.get_mut(&ep) {
            e.domain = Some(dom);
            e.iotlb.clear();
        }
        Ok(())
    }

    /// Detaches `ep` from `dom`.
    fn detach(&mut self, ep: EndpointId, dom: DomainId) -> Result<(), Status> {
        // 5.13.6.2: "If the endpoint identified by endpoint doesn't exist, then the device
        // MUST reject the request and set status to VIRTIO_IOMMU_S_NOENT."
        let Some(e) = self.endpoints.get(&ep) else {
            return Err(Status::NoEnt);
        };
        // "If the domain identified by domain doesn't exist, or if the endpoint identified
        // by endpoint isn't attached to this domain, then the device MAY set the request
        // status to VIRTIO_IOMMU_S_INVAL."
        if e.domain != Some(dom) || !self.domains.contains_key(&dom) {
            return Err(Status::Inval);
        }
        let backend = e.backend;
        if let Some(b) = backend {
            let shared = self
                .endpoints
                .iter()
                .any(|(&id, o)| id != ep && o.backend == Some(b) && o.domain == Some(dom));
            if !shared {
                let from = self.endpoint_content(ep);
                let to = if self.bypass {
                    Content::Identity
                } else {
                    Content::Nothing
                };
                // "The device MUST ensure that after being detached from a domain, the
                // endpoint cannot access any mapping from that domain." A failed host unmap
                // therefore fails the request and leaves the endpoint attached.
                self.switch_backend(b, from, to)
                    .map_err(|e| status_of(&e))?;
            }
        }
        self.leave_domain(ep, dom);
        Ok(())
    }

    /// Removes the mappings in pages `[first, last]` of `dom` from the host and the table.
    fn unmap_range(&mut self, dom: DomainId, first: u64, last: u64) -> Result<(), BackendError> {
        let mut runs = Vec::new();
        if let Some(d) = self.domains.get(&dom) {
            d.table.mappings(first, last, |r| {
                runs.push(r);
                true
            });
        }
        if runs.is_empty() {
            return Ok(());
        }
        self.unmap_on_all(dom, &runs)?;
        self.remove_from_table(dom, first, last);
        Ok(())
    }

    /// Unmaps `runs` (whole mappings of `dom`, in IOVA order) from every working backend of
    /// the domain; on failure the backends already done get them back.
    fn unmap_on_all(&mut self, dom: DomainId, runs: &[Run]) -> Result<(), BackendError> {
        let backends = self.live_backends(dom);
        for (k, &b) in backends.iter().enumerate() {
            if let Err(e) = self.unmap_runs(b, runs) {
                for &u in &backends[..k] {
                    if let Err(e2) = self.map_runs(u, runs) {
                        log::error!(
                            "virtio-iommu: cannot restore host mappings after a failed unmap: {e2}"
                        );
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

impl<G: Relock + ?Sized> HostOps for G {}
