//! Dirty tracking of a passthrough device not behind the vIOMMU: its DMA backend maps all of
//! guest RAM at IOVA = GPA and reports the pages the device wrote by GPA. The device
//! manager harvests it with the others (`DeviceManager::harvest_passthrough`).

use std::sync::Mutex;

use iommu::dirty::DirtyBitmap;
use iommu::pagetable::PAGE_SIZE;
use iommu::DmaBackend;
use sync::MutexExt;

/// Most pages read from a direct backend per call (1 GiB).
const CHUNK_PAGES: u64 = 1 << 18;

/// Dirty tracking of passthrough devices not behind the vIOMMU.
pub struct DirectDirty {
    backend: Mutex<Box<dyn DmaBackend>>,
    tracked: Mutex<bool>,
    /// The host mappings `(iova = gpa, len)` made at set-up, one per map call, for
    /// [`DirectDirty::unmap_all`].
    mapped: Mutex<Vec<(u64, u64)>>,
}

impl DirectDirty {
    /// Wraps the backend that maps all of guest RAM for one device.
    pub fn new(backend: Box<dyn DmaBackend>) -> Self {
        Self {
            backend: Mutex::new(backend),
            tracked: Mutex::new(false),
            mapped: Mutex::new(Vec::new()),
        }
    }

    /// The same, remembering the host mappings `(iova = gpa, len)` set-up made, one per map
    /// call.
    pub fn with_mappings(self, mapped: Vec<(u64, u64)>) -> Self {
        *self.mapped.locked() = mapped;
        self
    }

    /// Unmaps every host mapping set-up made, one unmap call each (the device is being
    /// removed). A failed call is logged; the others are still made.
    pub(crate) fn unmap_all(&self) {
        let mapped = std::mem::take(&mut *self.mapped.locked());
        let mut b = self.backend.locked();
        for (iova, len) in mapped {
            if let Err(e) = b.unmap(iova, len) {
                log::error!("{}: cannot unmap {iova:#x}+{len:#x}: {e}", b.name());
            }
        }
    }

    /// Passes a device's page request to the backend (`dma=fault` outside the vIOMMU).
    ///
    /// # Errors
    /// The backend's error when the host map failed.
    pub fn page_request(
        &self,
        iova: u64,
        write: bool,
    ) -> Result<iommu::backend::PageResponse, iommu::BackendError> {
        let mut b = self.backend.locked();
        b.page_request(iova, write)
    }

    pub(crate) fn start(&self) -> bool {
        let mut b = self.backend.locked();
        let on = b.caps().dirty_tracking && b.set_dirty_tracking(true).is_ok();
        *self.tracked.locked() = on;
        on
    }

    pub(crate) fn stop(&self) {
        let mut tracked = self.tracked.locked();
        if std::mem::take(&mut *tracked) {
            let mut b = self.backend.locked();
            let _ = b.set_dirty_tracking(false);
        }
    }

    pub(crate) fn harvest(&self, ram: &[(u64, u64)], out: &mut DirtyBitmap) {
        let tracked = *self.tracked.locked();
        let mut b = self.backend.locked();
        for &(gpa, len) in ram {
            let (first, pages) = (gpa / PAGE_SIZE, len / PAGE_SIZE);
            let mut done = 0;
            while done < pages {
                let n = (pages - done).min(CHUNK_PAGES);
                let mut bits = vec![0u64; n.div_ceil(64) as usize];
                let ok = tracked
                    && b.read_dirty((first + done) * PAGE_SIZE, n * PAGE_SIZE, &mut bits, true)
                        .is_ok();
                if ok {
                    out.mark_bits(first + done, &bits, n);
                } else {
                    out.mark(first + done, n);
                }
                done += n;
            }
        }
    }
}

#[cfg(test)]
mod tests;
