//! The seam between the IOMMU and whatever programs the host side of DMA: a host IOMMU
//! through VFIO (type1 container or iommufd), a vfio-user device process, or nothing (for
//! emulated devices, which translate through the page table themselves).

use std::fmt;

pub use crate::on_demand::PageResponse;
use crate::pagetable::Perm;

/// What a backend can do, reported once when its endpoint is registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCaps {
    /// Page sizes the host can map, bit `n` = 2^n bytes (the lowest set bit is the host's
    /// granule). Source: VFIO `VFIO_IOMMU_GET_INFO.iova_pgsizes`, iommufd
    /// `IOMMU_IOAS_IOVA_RANGES`/`IOMMU_GET_HW_INFO`.
    pub page_size_mask: u64,
    /// Usable IOVA ranges, inclusive, sorted and disjoint (VFIO
    /// `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`, iommufd `IOMMU_IOAS_IOVA_RANGES`).
    pub iova_ranges: Vec<(u64, u64)>,
    /// The backend can report pages written by device DMA (by IOVA).
    pub dirty_tracking: bool,
    /// A host mapping may later be unmapped in parts, so contiguous guest mappings may be
    /// merged into one host map call. VFIO type1v2 and native iommufd refuse partial unmaps.
    pub merge_maps: bool,
    /// One unmap call may remove several adjacent host mappings (VFIO type1 and iommufd
    /// accept any range that covers whole mappings).
    pub merge_unmaps: bool,
    /// A dirty report ([`DmaBackend::read_dirty`]) must cover whole host mappings: VFIO
    /// type1's `VFIO_IOMMU_DIRTY_PAGES` with `GET_BITMAP` refuses (`EINVAL`) a range that
    /// starts or ends inside a mapping (`vfio_iova_dirty_bitmap` in
    /// `drivers/vfio/vfio_iommu_type1.c`). Harvest windows then never split a mapping.
    pub dirty_whole_mappings: bool,
}

impl Default for BackendCaps {
    fn default() -> Self {
        Self {
            page_size_mask: 0x4000_0000 | 0x20_0000 | 0x1000,
            iova_ranges: vec![(0, crate::pagetable::MAX_IOVA)],
            dirty_tracking: false,
            merge_maps: false,
            merge_unmaps: false,
            dirty_whole_mappings: false,
        }
    }
}

/// Why a backend call failed; each maps to the virtio-iommu status the guest sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The host is out of resources (pinning limit, mapping limit): `VIRTIO_IOMMU_S_NOMEM`.
    #[error("host out of resources: {0}")]
    NoMemory(String),
    /// The IOVA range is not usable on the host: `VIRTIO_IOMMU_S_RANGE`.
    #[error("IOVA range not usable on the host: {0}")]
    Range(String),
    /// The GPA range is not backed by guest memory: `VIRTIO_IOMMU_S_FAULT`.
    #[error("GPA range not backed by guest memory: {0}")]
    BadAddress(String),
    /// The backend cannot do this (e.g. no dirty tracking).
    #[error("not supported by this backend")]
    Unsupported,
    /// The host or the device process failed: `VIRTIO_IOMMU_S_DEVERR`.
    #[error("{0}")]
    Failed(String),
}

/// A host-side DMA mapping backend.
///
/// Calls are made once per guest mapping (or per merged run of them when
/// [`BackendCaps::merge_maps`] is set), in the order of the guest's requests. A failed call
/// must leave the host as before that call; the caller undoes earlier calls of the same
/// request.
pub trait DmaBackend: Send {
    /// Short name for logs and counters.
    fn name(&self) -> String;

    /// Capabilities (stable for the backend's lifetime).
    fn caps(&self) -> BackendCaps;

    /// Maps `len` bytes at `iova` to guest-physical `gpa` with `perm`. `iova`, `gpa` and `len`
    /// are multiples of 4 KiB.
    ///
    /// # Errors
    /// A [`BackendError`]; nothing is mapped then.
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), BackendError>;

    /// Unmaps `[iova, iova + len)`, which covers whole host mappings (or parts of them when
    /// [`BackendCaps::merge_maps`] is set).
    ///
    /// # Errors
    /// A [`BackendError`].
    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError>;

    /// Starts or stops dirty tracking. Starting clears any stale dirty state.
    ///
    /// # Errors
    /// [`BackendError::Unsupported`] when [`BackendCaps::dirty_tracking`] is false.
    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), BackendError> {
        let _ = enable;
        Err(BackendError::Unsupported)
    }

    /// ORs into `bitmap` (bit `i` = page `iova / 4096 + i`) the pages of
    /// `[iova, iova + len)` written by the device since the last clearing read, and clears
    /// them when `clear` is set (the `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR` semantics when not).
    ///
    /// # Errors
    /// [`BackendError::Unsupported`] when [`BackendCaps::dirty_tracking`] is false.
    fn read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), BackendError> {
        let _ = (iova, len, bitmap, clear);
        Err(BackendError::Unsupported)
    }

    /// Answers a device's page request for `iova` (a write when `write`): the stall model
    /// of PCIe PRI. Only a backend that maps on demand ([`crate::on_demand::OnDemand`])
    /// installs anything; any other has mapped everything the device may reach already, so
    /// a page request to it is [`PageResponse::Invalid`] (the default).
    ///
    /// # Errors
    /// A [`BackendError`] when installing the host mapping failed.
    fn page_request(&mut self, iova: u64, write: bool) -> Result<PageResponse, BackendError> {
        let _ = (iova, write);
        Ok(PageResponse::Invalid)
    }

    /// Unmaps `[iova, iova + len)` and ORs into `bitmap` the pages of the range the device
    /// wrote up to the unmap (clearing them), so that no write is lost between a last read
    /// and the unmap. VFIO type1 does it in one call (`VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`).
    /// The default reads first and unmaps after, which loses writes a device makes in
    /// between; backends override it when they can do better. When the unmap succeeded but
    /// the bits could not be read, every bit of the range is set.
    ///
    /// # Errors
    /// A [`BackendError`] of the unmap; nothing was unmapped then.
    fn unmap_read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
    ) -> Result<(), BackendError> {
        if self.read_dirty(iova, len, bitmap, true).is_err() {
            set_all(bitmap, len / 4096);
        }
        self.unmap(iova, len)
    }
}

/// [`DmaBackend::unmap_read_dirty`] for backends whose dirty log is by IOVA and survives the
/// unmap (the project's test device): unmap first, then read, so no write falls in between.
///
/// # Errors
/// The unmap's error; nothing was unmapped then.
pub fn unmap_then_read_dirty<B: DmaBackend + ?Sized>(
    b: &mut B,
    iova: u64,
    len: u64,
    bitmap: &mut [u64],
) -> Result<(), BackendError> {
    b.unmap(iova, len)?;
    if b.read_dirty(iova, len, bitmap, true).is_err() {
        set_all(bitmap, len / 4096);
    }
    Ok(())
}

/// Sets the first `bits` bits of `bitmap`.
pub fn set_all(bitmap: &mut [u64], bits: u64) {
    for (i, w) in bitmap.iter_mut().enumerate() {
        let base = i as u64 * 64;
        if base >= bits {
            break;
        }
        *w = if bits - base >= 64 {
            u64::MAX
        } else {
            (1u64 << (bits - base)) - 1
        };
    }
}

impl fmt::Debug for dyn DmaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmaBackend({})", self.name())
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub use recording::{Call, RecordingBackend, RecordingLog};

#[cfg(any(test, feature = "test-utils"))]
mod recording {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// One backend call as recorded.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        /// `map(iova, gpa, len, perm)`.
        Map(u64, u64, u64, Perm),
        /// `unmap(iova, len)`.
        Unmap(u64, u64),
    }

    /// What a [`RecordingBackend`] saw and holds, shared with the test.
    #[derive(Debug, Default)]
    pub struct RecordingLog {
        /// Every successful call, in order.
        pub calls: Vec<Call>,
        /// The host's view: IOVA page -> (GPA page, perm).
        pub pages: BTreeMap<u64, (u64, Perm)>,
        /// Fail the call with this (0-based) index, counting every call.
        pub fail_call: Option<usize>,
        /// Fail every map touching this IOVA.
        pub fail_iova: Option<u64>,
        /// Fail every unmap touching this IOVA.
        pub fail_unmap_iova: Option<u64>,
        /// Calls attempted (including failed ones).
        pub attempts: usize,
        /// Dirty IOVA pages (set by tests to simulate device writes).
        pub dirty: std::collections::BTreeSet<u64>,
        /// Whether dirty tracking is on.
        pub tracking: bool,
        /// Fail every dirty report.
        pub fail_dirty: bool,
        /// Dirty reports refused because they split a host mapping (with
        /// `dirty_whole_mappings`).
        pub split_dirty_reads: usize,
    }

    impl RecordingLog {
        /// Host mappings as `(iova page, gpa page, perm)` sorted.
        pub fn host_pages(&self) -> Vec<(u64, u64, Perm)> {
            self.pages.iter().map(|(&i, &(g, p))| (i, g, p)).collect()
        }
        /// Number of map calls.
        pub fn map_calls(&self) -> usize {
            self.calls
                .iter()
                .filter(|c| matches!(c, Call::Map(..)))
                .count()
        }
        /// A device write to IOVA page `iova_page`: returns the GPA page written, or `None`
        /// (a DMA fault) when the page is not mapped writable on the host. Marks the page
        /// dirty when tracking.
        pub fn device_write(&mut self, iova_page: u64) -> Option<u64> {
            let (gpa, perm) = *self.pages.get(&iova_page)?;
            if !perm.write() {
                return None;
            }
            if self.tracking {
                self.dirty.insert(iova_page);
            }
            Some(gpa)
        }
        /// Number of unmap calls.
        pub fn unmap_calls(&self) -> usize {
            self.calls
                .iter()
                .filter(|c| matches!(c, Call::Unmap(..)))
                .count()
        }
    }

    /// A backend that applies calls to an in-memory host view and records them. It checks
    /// what a real host would refuse: mapping over a mapped page, and (unless `merge_maps`)
    /// unmapping part of a host mapping.
    pub struct RecordingBackend {
        name: String,
        caps: BackendCaps,
        log: Arc<Mutex<RecordingLog>>,
        /// Host mappings `(iova, len)` for the split check.
        host_maps: BTreeMap<u64, u64>,
    }

    impl RecordingBackend {
        /// A backend with `caps`; returns it with its shared log.
        pub fn new(name: &str, caps: BackendCaps) -> (Self, Arc<Mutex<RecordingLog>>) {
            let log = Arc::new(Mutex::new(RecordingLog::default()));
            (
                Self {
                    name: name.to_string(),
                    caps,
                    log: log.clone(),
                    host_maps: BTreeMap::new(),
                },
                log,
            )
        }
    }

    impl DmaBackend for RecordingBackend {
        fn name(&self) -> String {
            self.name.clone()
        }

        fn caps(&self) -> BackendCaps {
            self.caps.clone()
        }

        fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), BackendError> {
            let mut log = self.log.lock().unwrap();
            let n = log.attempts;
            log.attempts += 1;
            if log.fail_call == Some(n) {
                return Err(BackendError::NoMemory("injected failure".into()));
            }
            if let Some(f) = log.fail_iova {
                if f >= iova && f - iova < len {
                    return Err(BackendError::Failed("injected failure".into()));
                }
            }
            assert!(
                iova.is_multiple_of(4096)
                    && gpa.is_multiple_of(4096)
                    && len.is_multiple_of(4096)
                    && len > 0
            );
            for p in 0..len / 4096 {
                assert!(
                    !log.pages.contains_key(&(iova / 4096 + p)),
                    "host: double map at {:#x}",
                    iova + p * 4096
                );
            }
            for p in 0..len / 4096 {
                log.pages.insert(iova / 4096 + p, (gpa / 4096 + p, perm));
            }
            self.host_maps.insert(iova, len);
            log.calls.push(Call::Map(iova, gpa, len, perm));
            Ok(())
        }

        fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError> {
            let mut log = self.log.lock().unwrap();
            let n = log.attempts;
            log.attempts += 1;
            if log.fail_call == Some(n) {
                return Err(BackendError::Failed("injected failure".into()));
            }
            if let Some(f) = log.fail_unmap_iova {
                if f >= iova && f - iova < len {
                    return Err(BackendError::Failed("injected unmap failure".into()));
                }
            }
            let end = iova + len;
            // Host mappings touched by the range.
            let touched: Vec<(u64, u64)> = self
                .host_maps
                .range(..end)
                .filter(|(&s, &l)| s + l > iova)
                .map(|(&s, &l)| (s, l))
                .collect();
            for (s, l) in touched {
                if !self.caps.merge_maps {
                    assert!(
                        s >= iova && s + l <= end,
                        "host: unmap {iova:#x}+{len:#x} splits host mapping {s:#x}+{l:#x}"
                    );
                }
                self.host_maps.remove(&s);
                if s < iova {
                    self.host_maps.insert(s, iova - s);
                }
                if s + l > end {
                    self.host_maps.insert(end, s + l - end);
                }
            }
            for p in iova / 4096..end / 4096 {
                log.pages.remove(&p);
            }
            log.calls.push(Call::Unmap(iova, len));
            Ok(())
        }

        fn unmap_read_dirty(
            &mut self,
            iova: u64,
            len: u64,
            bitmap: &mut [u64],
        ) -> Result<(), BackendError> {
            // Like the project's test device: the dirty log is by IOVA and outlives the
            // mapping, so the bits are read after the unmap and nothing is lost.
            super::unmap_then_read_dirty(self, iova, len, bitmap)
        }

        fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), BackendError> {
            if !self.caps.dirty_tracking {
                return Err(BackendError::Unsupported);
            }
            let mut log = self.log.lock().unwrap();
            log.tracking = enable;
            log.dirty.clear();
            Ok(())
        }

        fn read_dirty(
            &mut self,
            iova: u64,
            len: u64,
            bitmap: &mut [u64],
            clear: bool,
        ) -> Result<(), BackendError> {
            if !self.caps.dirty_tracking {
                return Err(BackendError::Unsupported);
            }
            let mut log = self.log.lock().unwrap();
            if log.fail_dirty {
                return Err(BackendError::Failed("injected dirty report failure".into()));
            }
            if self.caps.dirty_whole_mappings {
                // As type1: the range starts at a mapping's first byte and ends at a
                // mapping's last byte.
                let end = iova + len;
                let starts = self.host_maps.contains_key(&iova);
                let ends = self
                    .host_maps
                    .range(..end)
                    .next_back()
                    .is_some_and(|(&s, &l)| s + l == end);
                if !starts || !ends {
                    log.split_dirty_reads += 1;
                    return Err(BackendError::Range(format!(
                        "dirty report {iova:#x}+{len:#x} splits a host mapping"
                    )));
                }
            }
            let first = iova / 4096;
            let pages = len / 4096;
            let hits: Vec<u64> = log.dirty.range(first..first + pages).copied().collect();
            for p in hits {
                let i = (p - first) as usize;
                if let Some(w) = bitmap.get_mut(i / 64) {
                    *w |= 1 << (i % 64);
                }
                if clear {
                    log.dirty.remove(&p);
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend with only what the trait requires, recording calls; `dirty` makes it report
    /// (and fail to report) dirty bits.
    #[derive(Default)]
    struct Minimal {
        calls: Vec<String>,
        fail_unmap: bool,
        bits: Option<u64>,
    }

    impl DmaBackend for Minimal {
        fn name(&self) -> String {
            "minimal".into()
        }
        fn caps(&self) -> BackendCaps {
            BackendCaps::default()
        }
        fn map(&mut self, _: u64, _: u64, _: u64, _: Perm) -> Result<(), BackendError> {
            Ok(())
        }
        fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError> {
            self.calls.push(format!("unmap {iova:#x}+{len:#x}"));
            if self.fail_unmap {
                Err(BackendError::Failed("no".into()))
            } else {
                Ok(())
            }
        }
    }

    struct Reporting(Minimal);

    impl DmaBackend for Reporting {
        fn name(&self) -> String {
            self.0.name()
        }
        fn caps(&self) -> BackendCaps {
            self.0.caps()
        }
        fn map(&mut self, i: u64, g: u64, l: u64, p: Perm) -> Result<(), BackendError> {
            self.0.map(i, g, l, p)
        }
        fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError> {
            self.0.unmap(iova, len)
        }
        fn read_dirty(
            &mut self,
            iova: u64,
            len: u64,
            bitmap: &mut [u64],
            clear: bool,
        ) -> Result<(), BackendError> {
            self.0
                .calls
                .push(format!("read {iova:#x}+{len:#x} clear={clear}"));
            match self.0.bits {
                Some(b) => {
                    bitmap[0] |= b;
                    Ok(())
                }
                None => Err(BackendError::Failed("no log".into())),
            }
        }
    }

    #[test]
    fn set_all_sets_exactly_the_first_bits() {
        for (bits, want) in [
            (0u64, [0u64, 0, 0]),
            (1, [1, 0, 0]),
            (63, [u64::MAX >> 1, 0, 0]),
            (64, [u64::MAX, 0, 0]),
            (65, [u64::MAX, 1, 0]),
            (130, [u64::MAX, u64::MAX, 3]),
            (1000, [u64::MAX; 3]),
        ] {
            let mut b = [0u64; 3];
            set_all(&mut b, bits);
            assert_eq!(b, want, "{bits} bits");
        }
    }

    #[test]
    fn default_methods() {
        let mut m = Minimal::default();
        assert_eq!(m.set_dirty_tracking(true), Err(BackendError::Unsupported));
        let mut bits = [0u64; 2];
        assert_eq!(
            m.read_dirty(0, 0x1000, &mut bits, true),
            Err(BackendError::Unsupported)
        );
        // No dirty log: every page of the range counts as written, and it is unmapped.
        assert_eq!(m.unmap_read_dirty(0x4000, 66 * 4096, &mut bits), Ok(()));
        assert_eq!(bits, [u64::MAX, 3]);
        assert_eq!(m.calls, vec!["unmap 0x4000+0x42000"]);
        // A log: read (clearing) before the unmap, bits as reported.
        let mut r = Reporting(Minimal {
            bits: Some(0b101),
            ..Default::default()
        });
        let mut bits = [0u64; 1];
        assert_eq!(r.unmap_read_dirty(0x2000, 0x3000, &mut bits), Ok(()));
        assert_eq!(bits, [0b101]);
        assert_eq!(
            r.0.calls,
            vec!["read 0x2000+0x3000 clear=true", "unmap 0x2000+0x3000"]
        );
    }

    #[test]
    fn unmap_then_read_dirty_reads_after_the_unmap() {
        let mut r = Reporting(Minimal {
            bits: Some(0b10),
            ..Default::default()
        });
        let mut bits = [0u64; 1];
        assert_eq!(
            unmap_then_read_dirty(&mut r, 0x1000, 0x2000, &mut bits),
            Ok(())
        );
        assert_eq!(bits, [0b10]);
        assert_eq!(
            r.0.calls,
            vec!["unmap 0x1000+0x2000", "read 0x1000+0x2000 clear=true"]
        );
        // The log cannot be read: every page counts.
        let mut r = Reporting(Minimal::default());
        let mut bits = [0u64; 1];
        assert_eq!(
            unmap_then_read_dirty(&mut r, 0, 5 * 4096, &mut bits),
            Ok(())
        );
        assert_eq!(bits, [0b11111]);
        // The unmap fails: nothing read, the error returned.
        let mut r = Reporting(Minimal {
            fail_unmap: true,
            bits: Some(1),
            ..Default::default()
        });
        let mut bits = [0u64; 1];
        assert!(unmap_then_read_dirty(&mut r, 0, 0x1000, &mut bits).is_err());
        assert_eq!(bits, [0]);
        assert_eq!(r.0.calls, vec!["unmap 0x0+0x1000"]);
    }
}
