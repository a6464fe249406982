//! Guest pages written by passthrough devices: those behind the vIOMMU are harvested through
//! it (device reports by IOVA, translated to GPA by its page tables, harvested before every
//! unmap); those not behind it see guest RAM at IOVA = GPA and report directly. vhost-user
//! back ends log by GPA into a shared log (behind the vIOMMU or not). A device that cannot
//! report has every page it can write counted dirty (a vhost-user back end: all of RAM), so
//! nothing is lost.
//!
//! Migration adds the vCPUs' writes (KVM's dirty log) and the VMM's own (emulated devices)
//! on top of these; see `migration`.

use std::sync::Mutex;

use iommu::dirty::DirtyBitmap;
use iommu::pagetable::PAGE_SIZE;
use iommu::DmaBackend;

use crate::device_manager::DeviceManager;

/// Most pages read from a direct backend per call (1 GiB).
const CHUNK_PAGES: u64 = 1 << 18;

/// Dirty tracking of passthrough devices not behind the vIOMMU.
pub struct DirectDirty {
    backend: Mutex<Box<dyn DmaBackend>>,
    tracked: Mutex<bool>,
}

impl DirectDirty {
    /// Wraps the backend that maps all of guest RAM for one device.
    pub fn new(backend: Box<dyn DmaBackend>) -> Self {
        Self {
            backend: Mutex::new(backend),
            tracked: Mutex::new(false),
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
        let mut b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        b.page_request(iova, write)
    }

    fn start(&self) -> bool {
        let mut b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        let on = b.caps().dirty_tracking && b.set_dirty_tracking(true).is_ok();
        *self.tracked.lock().unwrap_or_else(|e| e.into_inner()) = on;
        on
    }

    fn stop(&self) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut *tracked) {
            let mut b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
            let _ = b.set_dirty_tracking(false);
        }
    }

    fn harvest(&self, ram: &[(u64, u64)], out: &mut DirtyBitmap) {
        let tracked = *self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        let mut b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
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

impl DeviceManager {
    /// Starts tracking the pages passthrough devices write. Returns the devices that cannot
    /// report them (all their writable pages count as dirty).
    pub fn start_dirty_tracking(&self) -> Vec<String> {
        let mut untracked = Vec::new();
        if let Some((h, _)) = &self.iommu {
            untracked.extend(h.lock().start_dirty_tracking().untracked);
        }
        for p in &self.passthrough {
            if let Some(d) = &p.direct {
                if !d.start() {
                    untracked.push(p.label.clone());
                }
            }
        }
        for (label, n) in &self.nets {
            if !n
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .start_dirty_log()
            {
                untracked.push(label.clone());
            }
        }
        *self.dirty.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(DirtyBitmap::new(&self.ram_ranges));
        self.untracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone_from(&untracked);
        untracked
    }

    /// ORs into `out` the pages passthrough devices and vhost-user back ends wrote since the
    /// last harvest.
    pub fn harvest_dirty(&self, out: &mut DirtyBitmap) {
        self.harvest_passthrough(out);
        self.harvest_vhost_user(out);
    }

    /// ORs into `out` the pages vhost-user back ends logged since the last harvest; returns
    /// how many they reported.
    pub fn harvest_vhost_user(&self, out: &mut DirtyBitmap) -> u64 {
        self.nets
            .iter()
            .map(|(_, n)| {
                n.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .harvest_dirty_log(&self.ram_ranges, out)
            })
            .sum()
    }

    /// ORs into `out` the pages passthrough devices wrote since the last harvest.
    pub fn harvest_passthrough(&self, out: &mut DirtyBitmap) {
        if let Some((h, _)) = &self.iommu {
            h.lock().harvest_dirty(out);
        }
        for p in &self.passthrough {
            if let Some(d) = &p.direct {
                d.harvest(&self.ram_ranges, out);
            }
        }
    }

    /// Stops tracking; ORs into `out` what was written since the last harvest.
    pub fn stop_dirty_tracking(&self, out: &mut DirtyBitmap) {
        self.harvest_dirty(out);
        if let Some((h, _)) = &self.iommu {
            if let Some(rest) = h.lock().stop_dirty_tracking() {
                out.merge(&rest);
            }
        }
        for p in &self.passthrough {
            if let Some(d) = &p.direct {
                d.stop();
            }
        }
        for (_, n) in &self.nets {
            n.lock().unwrap_or_else(|e| e.into_inner()).stop_dirty_log();
        }
        *self.dirty.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// With `--track-dirty`: the pages written by passthrough devices since boot.
    pub fn dirty_since_boot(&self) -> Option<DirtyBitmap> {
        let mut guard = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let acc = guard.as_mut()?;
        let mut round = DirtyBitmap::new(&self.ram_ranges);
        self.harvest_dirty(&mut round);
        acc.merge(&round);
        Some(acc.clone())
    }

    /// Writes the pages passthrough devices wrote since boot (`--dirty-log-out`): a line
    /// `pages=N`, then one line `FIRST+COUNT` (page frame numbers, hex) per run.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_dirty_log(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::fmt::Write as _;
        let Some(log) = self.dirty_since_boot() else {
            return Err(std::io::Error::other(
                "dirty tracking is off (--track-dirty)",
            ));
        };
        let mut out = format!("pages={}\n", log.count());
        log.for_each_run(|gpa, bytes| {
            let _ = writeln!(out, "{:x}+{:x}", gpa / PAGE_SIZE, bytes / PAGE_SIZE);
        });
        std::fs::write(path, out)
    }
}
