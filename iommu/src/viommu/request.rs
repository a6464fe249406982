//! Parsing and handling of request buffers (virtio 1.3, 5.13.6). Each request is a
//! device-readable part (head and body) and a device-writable part whose last four bytes are
//! the tail; PROBE's writable part starts with `probe_size` bytes of properties.

use zerocopy::{FromBytes, IntoBytes};

use super::host::HostOps;
use super::relock::{Held, Relock};
use super::*;
use crate::pagetable::{Perm, TableError, MAX_GPA, PAGE_SHIFT};
use crate::protocol::*;

/// Bytes of a request's readable part that the device reads; longer parts are accepted and
/// the rest ignored (room for future fields).
pub const MAX_READABLE: usize = 128;

/// One request as the transport found it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The first `min(readable_len, MAX_READABLE)` bytes of the device-readable part.
    pub readable: &'a [u8],
    /// Total bytes in the device-readable descriptors.
    pub readable_len: usize,
    /// Total bytes in the device-writable descriptors.
    pub writable_len: usize,
}

/// What the transport writes back for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Nothing is written and the used length is 0: the request could not be parsed (no
    /// head, no room for a tail) or its type is unknown (5.13.6: "If a request type is not
    /// recognized, the device SHOULD NOT write the buffer and SHOULD set the used length to
    /// zero").
    Unwritten,
    /// Write `props` at the start of the writable part and the tail (`status`, 3 zero bytes)
    /// right after them, at `tail_offset`; the used length is `used_len`, which is exactly
    /// the bytes written (`tail_offset + 4`): 2.7.8.2, "the device MUST have written at least
    /// `len` bytes". The positions are those of the request structs (5.13.6.1-5): the tail
    /// starts the writable part, except for PROBE, where it follows `probe_size` bytes of
    /// properties (fewer when the driver gave less room; the request is then INVAL and the
    /// properties are zeros). Writable bytes past the tail are not the request's and are
    /// left alone.
    Written {
        /// Status in the tail.
        status: Status,
        /// PROBE properties (or zeros), `tail_offset` bytes; empty for other requests.
        props: Vec<u8>,
        /// Offset of the tail in the writable part.
        tail_offset: usize,
        /// Used length to report.
        used_len: u32,
    },
}

impl Reply {
    /// The status, if the request was answered.
    pub fn status(&self) -> Option<Status> {
        match self {
            Reply::Unwritten => None,
            Reply::Written { status, .. } => Some(*status),
        }
    }
}

/// Per-request bookkeeping of a batch, kept between batches (no allocation once grown).
#[derive(Debug, Default)]
pub(super) struct Scratch {
    statuses: Vec<Status>,
    answered: Vec<bool>,
    props: Vec<Vec<u8>>,
}

enum Parsed {
    Attach(AttachBody),
    Detach(DetachBody),
    Map(MapBody),
    Unmap(UnmapBody),
    Probe(ProbeBody),
}

fn body<T: FromBytes>(bytes: &[u8]) -> Option<T> {
    let head = std::mem::size_of::<ReqHead>();
    T::read_from_prefix(bytes.get(head..)?).ok().map(|(t, _)| t)
}

impl Viommu {
    /// Handles the requests of one notification in order and returns one reply per request.
    /// Host map calls of consecutive MAPs are deferred, merged where the backends allow, and
    /// issued before the replies are returned; a request whose host call fails gets the
    /// failure's status and its mapping is undone.
    pub fn process(&mut self, reqs: &[Request<'_>]) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(reqs.len());
        self.process_into(reqs, &mut replies);
        replies
    }

    /// Whether requests of `type_` exist on this device as negotiated: MAP and UNMAP only
    /// with `VIRTIO_IOMMU_F_MAP_UNMAP` (5.13.6.3-4: "This request is only available when
    /// VIRTIO_IOMMU_F_MAP_UNMAP has been negotiated"), PROBE only with `VIRTIO_IOMMU_F_PROBE`
    /// (5.13.6.5: "If the device does not offer the VIRTIO_IOMMU_F_PROBE feature, and if the
    /// driver sends a VIRTIO_IOMMU_T_PROBE request, then the device SHOULD NOT write the
    /// buffer and SHOULD set the used length to zero"). Others are answered like unknown
    /// types.
    fn recognizes(&self, type_: u8) -> bool {
        match type_ {
            VIRTIO_IOMMU_T_MAP | VIRTIO_IOMMU_T_UNMAP => self.has(VIRTIO_IOMMU_F_MAP_UNMAP),
            VIRTIO_IOMMU_T_PROBE => self.has(VIRTIO_IOMMU_F_PROBE),
            _ => true,
        }
    }

    pub(super) fn domain_in_range(&self, domain: DomainId) -> bool {
        domain >= self.cfg.domain_range.0 && domain <= self.cfg.domain_range.1
    }

    /// Maps in the domain's table within the device-wide metadata budget.
    fn table_map(
        &mut self,
        dom: DomainId,
        first: u64,
        last: u64,
        gpa_page: u64,
        perm: Perm,
    ) -> Result<(), TableError> {
        let others: u64 = self
            .domains
            .iter()
            .filter(|(&id, _)| id != dom)
            .map(|(_, d)| d.table.metadata_bytes())
            .sum();
        let budget = self.cfg.metadata_budget.saturating_sub(others);
        let d = self.domains.get_mut(&dom).ok_or(TableError::OutOfRange)?;
        d.table.set_budget(budget);
        d.table.map(first, last, gpa_page, perm)
    }

    fn probe_req(&mut self, b: &ProbeBody, props_len: usize) -> (Status, Vec<u8>) {
        // 5.13.6.5: "The device MUST ignore field reserved of a PROBE request."
        // "If the endpoint identified by endpoint doesn't exist, then the device SHOULD
        // reject the request and set status to VIRTIO_IOMMU_S_NOENT."
        let Some(ep) = self.endpoints.get(&b.endpoint.get()) else {
            return (Status::NoEnt, Vec::new());
        };
        let probe_size = self.probe_size() as usize;
        // "If the properties list is smaller than probe_size, the device SHOULD NOT write
        // any property. It SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
        if props_len < probe_size {
            return (Status::Inval, Vec::new());
        }
        let mut props = Vec::with_capacity(probe_size);
        for r in &ep.resv {
            let mut p = ProbeResvMem::default();
            p.head.type_.set(VIRTIO_IOMMU_PROBE_T_RESV_MEM);
            // "The device MUST write the size of a property without the struct
            // virtio_iommu_probe_property header, in bytes, into length."
            p.head.length.set(
                (std::mem::size_of::<ProbeResvMem>() - std::mem::size_of::<ProbeProperty>()) as u16,
            );
            p.subtype = r.subtype;
            p.start.set(r.start);
            p.end.set(r.end);
            props.extend_from_slice(p.as_bytes());
        }
        // "If the device doesn't fill all probe_size bytes with properties, it SHOULD fill the
        // remaining bytes of properties with zeroes."
        props.resize(probe_size, 0);
        (Status::Ok, props)
    }

    /// [`Viommu::process`] into `replies` (cleared first), so that a caller that keeps the
    /// vector allocates nothing per batch: the per-request bookkeeping is kept in the device
    /// between batches too. Only PROBE replies allocate (their properties).
    pub fn process_into(&mut self, reqs: &[Request<'_>], replies: &mut Vec<Reply>) {
        Held(self).serve_into(reqs, replies);
    }
}

/// Request handling, whose host calls run with the state unlocked (see [`Relock`]).
pub(super) trait Serve: Relock {
    /// The body of [`Viommu::process_into`].
    fn serve_into(&mut self, reqs: &[Request<'_>], replies: &mut Vec<Reply>) {
        self.counters.batches += 1;
        let mut scratch = std::mem::take(&mut self.scratch);
        let Scratch {
            statuses,
            answered,
            props,
        } = &mut scratch;
        statuses.clear();
        statuses.resize(reqs.len(), Status::Ok);
        answered.clear();
        answered.resize(reqs.len(), false);
        props.clear();
        props.resize_with(reqs.len(), Vec::new);
        for (i, r) in reqs.iter().enumerate() {
            let Some(&type_) = r.readable.first().filter(|_| r.readable_len >= 4) else {
                self.counters.requests[5] += 1;
                continue;
            };
            let Some(size) = request_size(type_).filter(|_| self.recognizes(type_)) else {
                self.counters.requests[5] += 1;
                continue;
            };
            if r.writable_len < std::mem::size_of::<ReqTail>() {
                // No tail to write the status into (5.13.6: "returns the buffers without
                // writing to them").
                self.counters.requests[5] += 1;
                continue;
            }
            self.counters.requests[usize::from(type_ - 1)] += 1;
            answered[i] = true;
            // A `readable` holding fewer bytes than `readable_len` says fails to parse below.
            if r.readable_len < size {
                statuses[i] = Status::Inval;
                continue;
            }
            let parsed = match type_ {
                VIRTIO_IOMMU_T_ATTACH => body(r.readable).map(Parsed::Attach),
                VIRTIO_IOMMU_T_DETACH => body(r.readable).map(Parsed::Detach),
                VIRTIO_IOMMU_T_MAP => body(r.readable).map(Parsed::Map),
                VIRTIO_IOMMU_T_UNMAP => body(r.readable).map(Parsed::Unmap),
                _ => body(r.readable).map(Parsed::Probe),
            };
            let Some(parsed) = parsed else {
                statuses[i] = Status::Inval;
                continue;
            };
            // Keep deferred host calls in order: consecutive MAPs are deferred together, and
            // consecutive UNMAPs; anything else settles them first.
            let settle = match parsed {
                Parsed::Map(_) => !self.pending_unmaps.is_empty(),
                Parsed::Unmap(_) => !self.pending.is_empty(),
                _ => true,
            };
            if settle {
                self.flush_pending(statuses);
            }
            statuses[i] = match parsed {
                Parsed::Attach(b) => self.attach_req(&b),
                Parsed::Detach(b) => self.detach_req(&b),
                Parsed::Map(b) => self.map_req(i, &b, statuses),
                Parsed::Unmap(b) => self.unmap_req(i, &b, statuses),
                Parsed::Probe(b) => {
                    let (status, p) = self.probe_req(&b, r.writable_len - 4);
                    props[i] = p;
                    status
                }
            };
        }
        self.flush_pending(statuses);
        let probe_size = self.probe_size() as usize;
        replies.clear();
        replies.reserve(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            if !answered[i] {
                replies.push(Reply::Unwritten);
                continue;
            }
            self.counters.statuses[statuses[i] as usize] += 1;
            let mut p = std::mem::take(&mut props[i]);
            if r.readable.first() == Some(&VIRTIO_IOMMU_T_PROBE) {
                // Whatever the status, the properties field is written (zeros when there is
                // nothing to report) so that the used length covers what precedes the tail.
                p.resize((r.writable_len - 4).min(probe_size), 0);
            }
            let tail_offset = p.len();
            replies.push(Reply::Written {
                status: statuses[i],
                props: p,
                tail_offset,
                used_len: u32::try_from(tail_offset + 4).unwrap_or(u32::MAX),
            });
        }
        self.scratch = scratch;
    }

    fn attach_req(&mut self, b: &AttachBody) -> Status {
        let (dom, ep, flags) = (b.domain.get(), b.endpoint.get(), b.flags.get());
        // 5.13.6.1: "If the reserved field of an ATTACH request is not zero, the device MUST
        // reject the request and set status to VIRTIO_IOMMU_S_INVAL."
        if b.reserved != [0; 4] {
            return Status::Inval;
        }
        // "If the device does not recognize a flags bit, it MUST reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL." ATTACH_F_BYPASS exists only with BYPASS_CONFIG.
        let known = if self.has(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            VIRTIO_IOMMU_ATTACH_F_BYPASS
        } else {
            0
        };
        if flags & !known != 0 {
            return Status::Inval;
        }
        // "If the endpoint identified by endpoint doesn't exist, the device MUST reject the
        // request and set status to VIRTIO_IOMMU_S_NOENT."
        if !self.endpoints.contains_key(&ep) {
            return Status::NoEnt;
        }
        // The driver MUST NOT use domains outside domain_range (5.13.6); out-of-range IDs
        // are out-of-range parameters.
        if !self.domain_in_range(dom) {
            return Status::Range;
        }
        let bypass = flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
        match self.attach(ep, dom, bypass) {
            Ok(()) => Status::Ok,
            Err(s) => s,
        }
    }

    fn detach_req(&mut self, b: &DetachBody) -> Status {
        // 5.13.6.2: "The device MUST ignore reserved."
        let (dom, ep) = (b.domain.get(), b.endpoint.get());
        match self.detach(ep, dom) {
            Ok(()) => Status::Ok,
            Err(s) => s,
        }
    }

    fn map_req(&mut self, idx: usize, b: &MapBody, statuses: &mut [Status]) -> Status {
        let dom = b.domain.get();
        let (start, end, phys) = (b.virt_start.get(), b.virt_end.get(), b.phys_start.get());
        let flags = b.flags.get();
        // 5.13.6.3: "If the device doesn't recognize a flags bit, it MUST reject the request
        // and set status to VIRTIO_IOMMU_S_INVAL." MAP_F_MMIO exists only with F_MMIO.
        let mut known = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
        if self.has(VIRTIO_IOMMU_F_MMIO) {
            known |= VIRTIO_IOMMU_MAP_F_MMIO;
        }
        let Some(perm) = Perm::from_bits(flags).filter(|_| flags & !known == 0) else {
            return Status::Inval;
        };
        // "If domain does not exist, the device SHOULD reject the request and set status to
        // VIRTIO_IOMMU_S_NOENT."
        let Some(d) = self.domains.get(&dom) else {
            return Status::NoEnt;
        };
        // "If the domain is a bypass domain, the device SHOULD reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL."
        if d.bypass {
            return Status::Inval;
        }
        // Driver: "virt_end MUST be strictly greater than virt_start."
        if end < start {
            return Status::Inval;
        }
        // "If virt_start, phys_start or (virt_end + 1) is not aligned on the page
        // granularity, the device SHOULD reject the request and set status to
        // VIRTIO_IOMMU_S_RANGE."
        let g = self.granule();
        if start % g != 0 || phys % g != 0 || end.wrapping_add(1) % g != 0 {
            return Status::Range;
        }
        // 5.13.6: "Any mapping request to virtual addresses outside of [input_range] fails."
        if start < self.cfg.input_range.0 || end > self.cfg.input_range.1 {
            return Status::Range;
        }
        // The physical range must exist: no wrap, and within what the table can target.
        let Some(phys_end) = phys.checked_add(end - start).filter(|&e| e <= MAX_GPA) else {
            return Status::Range;
        };
        let _ = phys_end;
        // 5.13.6.6.1: "The device SHOULD reject a MAP request that overlaps a RESV_MEM
        // region."
        let reserved = d
            .endpoints
            .iter()
            .filter_map(|e| self.endpoints.get(e))
            .any(|e| e.resv.iter().any(|r| r.overlaps(start, end)));
        if reserved {
            return Status::Inval;
        }
        let (first, last) = pages_of(start, end);
        let gpa_page = phys >> PAGE_SHIFT;
        let mut result = self.table_map(dom, first, last, gpa_page, perm);
        if result == Err(TableError::Overlap) && !self.pending.is_empty() {
            // The overlap may be with a deferred map whose host call will fail: settle them.
            self.flush_pending(statuses);
            result = self.table_map(dom, first, last, gpa_page, perm);
        }
        match result {
            Ok(()) => {
                self.queue_map(
                    idx,
                    dom,
                    crate::pagetable::Run {
                        iova_page: first,
                        gpa_page,
                        pages: last - first + 1,
                        perm,
                    },
                );
                Status::Ok
            }
            // "If a mapping already exists in the requested range, the device SHOULD reject
            // the request and set status to VIRTIO_IOMMU_S_INVAL."
            Err(TableError::Overlap) => Status::Inval,
            Err(TableError::NoMemory) => Status::NoMem,
            Err(TableError::OutOfRange) | Err(TableError::Split) => Status::Range,
        }
    }

    fn unmap_req(&mut self, idx: usize, b: &UnmapBody, statuses: &mut [Status]) -> Status {
        let dom = b.domain.get();
        let (start, end) = (b.virt_start.get(), b.virt_end.get());
        // The checks below read the table: UNMAPs of the same pages still deferred in this
        // batch are settled first, so that this one sees the table as the guest expects.
        let (lo, hi) = pages_of(start.min(end), end.max(start));
        if self.pending_unmaps_overlap(dom, lo, hi) {
            self.flush_pending(statuses);
        }
        // 5.13.6.4: "If domain does not exist, the device SHOULD set the request status to
        // VIRTIO_IOMMU_S_NOENT." (The reserved field MAY give INVAL; it is ignored here.)
        let Some(d) = self.domains.get(&dom) else {
            return Status::NoEnt;
        };
        // "If the domain is a bypass domain, the device SHOULD reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL."
        if d.bypass {
            return Status::Inval;
        }
        if end < start {
            return Status::Inval;
        }
        let (mut first, mut last) = pages_of(start, end);
        // An edge inside a page cannot be a mapping's first or last address: it splits the
        // mapping there, if any ("the device SHOULD set the request status to
        // VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping").
        if start % PAGE_SIZE != 0 {
            if d.table.get(first).is_some() {
                return Status::Range;
            }
            first += 1;
        }
        if end != u64::MAX && (end + 1) % PAGE_SIZE != 0 {
            if d.table.get(last).is_some() {
                return Status::Range;
            }
            match last.checked_sub(1) {
                Some(l) => last = l,
                None => return Status::Ok,
            }
        }
        if first > last {
            return Status::Ok;
        }
        if d.table.check_unmap(first, last).is_err() {
            return Status::Range;
        }
        // "If part of the range or the full range is not covered by an existing mapping,
        // then the device SHOULD remove all mappings affected by the range and set the
        // request status to VIRTIO_IOMMU_S_OK." The host side is deferred to the end of the
        // run of UNMAPs (a failure there sets this request's status).
        if d.table.is_range_empty(first, last) {
            return Status::Ok;
        }
        self.queue_unmap(idx, dom, first, last);
        Status::Ok
    }
}

impl<G: Relock + ?Sized> Serve for G {}
