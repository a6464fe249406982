//! Dirty tracking through the IOMMU: pages written by passthrough devices, reported by their
//! backends by IOVA, translated to guest-physical pages through the domains' page tables.
//!
//! An IOVA means nothing once its mapping is gone (the guest may map it again to other
//! memory), so the device's dirty bits of a range are harvested before every host unmap of
//! it: a guest UNMAP, a DETACH, a bypass change, a rollback. Between harvests they stay in
//! the device. A backend that cannot track (or that failed, or whose report failed) has all
//! of its writable mappings counted dirty at every harvest, so no write is ever lost; only
//! more pages are copied.

use super::host::HostOps;
use super::relock::{call, Held, Relock};
use super::*;
use crate::dirty::DirtyBitmap;
use crate::pagetable::{Perm, Run};

/// Default window of a harvest: pages read from a backend per call (1 GiB of IOVA, a
/// 32 KiB bitmap), as the kernel's `iova_bitmap` walks a user bitmap in windows.
pub const DEFAULT_WINDOW_PAGES: u64 = 1 << 18;

/// How [`Viommu::harvest_dirty_with`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HarvestOptions {
    /// Clear what was read, in the devices and here (a new round starts). Without it the
    /// read is a peek (`IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`): the next harvest sees the same
    /// pages again.
    pub clear: bool,
    /// Pages per backend read (at least 64); the temporary bitmap is `window_pages / 8` bytes.
    pub window_pages: u64,
}

impl Default for HarvestOptions {
    fn default() -> Self {
        Self {
            clear: true,
            window_pages: DEFAULT_WINDOW_PAGES,
        }
    }
}

/// Dirty tracking in progress.
#[derive(Debug)]
pub(super) struct DirtyState {
    /// Pages found dirty and not harvested yet (those found at unmaps, mostly).
    bitmap: DirtyBitmap,
    /// Backends with tracking on in the device.
    tracked: Vec<bool>,
}

/// Which backends track dirty pages themselves, from [`Viommu::start_dirty_tracking`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyTrackingReport {
    /// Backends whose devices report the pages they write.
    pub tracked: Vec<String>,
    /// Backends that cannot (or failed to start): every writable page mapped for them counts
    /// as dirty at every harvest.
    pub untracked: Vec<String>,
}

impl Viommu {
    /// Starts tracking the pages passthrough devices write, over the guest RAM of
    /// [`ViommuConfig::guest_ram`]. Restarting clears what was gathered.
    pub fn start_dirty_tracking(&mut self) -> DirtyTrackingReport {
        Held(self).start_tracking()
    }

    /// ORs into `out` (by guest page) every page written by a passthrough device since the
    /// last harvest, and starts a new round. Nothing is lost across unmaps: those were
    /// harvested when they happened. Does nothing when tracking is off.
    pub fn harvest_dirty(&mut self, out: &mut DirtyBitmap) {
        self.harvest_dirty_with(out, HarvestOptions::default());
    }

    /// [`Viommu::harvest_dirty`] with options: reading without clearing, and the window in
    /// which backends' bitmaps are read. Clean 64-page words of a window are skipped when its
    /// bits are translated to guest pages.
    pub fn harvest_dirty_with(&mut self, out: &mut DirtyBitmap, opts: HarvestOptions) {
        Held(self).harvest_with(out, opts);
    }

    /// Stops tracking; returns the pages dirtied since the last harvest.
    pub fn stop_dirty_tracking(&mut self) -> Option<DirtyBitmap> {
        Held(self).stop_tracking()
    }

    /// Whether dirty tracking is on.
    pub fn is_tracking_dirty(&self) -> bool {
        self.dirty.is_some()
    }

    /// Whether backend `b`'s own dirty reports are used (tracking on, device alive).
    pub(super) fn reads_device_dirty(&self, b: BackendId) -> bool {
        self.dirty
            .as_ref()
            .and_then(|s| s.tracked.get(b).copied())
            .unwrap_or(false)
            && self.backends.get(b).is_some_and(|s| !s.failed)
    }

    /// Marks the guest pages behind the bits of `bits` (bit `i` = IOVA page `iova / 4096 +
    /// i`, over `len` bytes) that `runs` (sorted by IOVA) map writable. Only set bits cost
    /// work: each finds its run by binary search.
    pub(super) fn mark_unmapped(&mut self, runs: &[Run], iova: u64, len: u64, bits: &[u64]) {
        let Some(state) = self.dirty.as_mut() else {
            return;
        };
        let writable: Vec<Run> = runs
            .iter()
            .filter(|r| r.perm.write() && !r.perm.contains(Perm::MMIO))
            .copied()
            .collect();
        let (first, pages) = (iova / PAGE_SIZE, len / PAGE_SIZE);
        self.counters.dirty_pages_reported +=
            mark_through_runs(&mut state.bitmap, &writable, first, pages, bits);
    }

    /// What backend `b` has mapped on the host.
    pub(super) fn backend_content(&self, b: BackendId) -> Content {
        let mut users = self.endpoints.iter().filter(|(_, e)| e.backend == Some(b));
        let first = users.clone().next().map(|(&id, _)| id);
        match users.find(|(_, e)| e.domain.is_some()) {
            Some((&id, _)) => self.endpoint_content(id),
            None => first.map_or(Content::Nothing, |id| self.endpoint_content(id)),
        }
    }
}

/// Dirty tracking's host calls, each with the state unlocked (see [`Relock`]).
pub(super) trait DirtySide: Relock {
    /// Starts tracking the pages passthrough devices write, over the guest RAM of
    /// [`ViommuConfig::guest_ram`]. Restarting clears what was gathered.
    fn start_tracking(&mut self) -> DirtyTrackingReport {
        self.flush_pending(&mut []);
        let mut report = DirtyTrackingReport::default();
        let mut tracked = Vec::with_capacity(self.backends.len());
        for b in 0..self.backends.len() {
            let name = self.backends[b].name.clone();
            let on = self.turn_tracking_on(b);
            if on {
                report.tracked.push(name);
            } else {
                report.untracked.push(name);
            }
            tracked.push(on);
        }
        self.dirty = Some(DirtyState {
            bitmap: DirtyBitmap::new(&self.cfg.guest_ram),
            tracked,
        });
        report
    }

    /// Turns dirty tracking on in registered backend `b`'s device; false when it is failed,
    /// cannot track, or refused (logged).
    fn turn_tracking_on(&mut self, b: BackendId) -> bool {
        let slot = &self.backends[b];
        let name = slot.name.clone();
        !slot.failed
            && slot.caps.dirty_tracking
            && match call(self, b, |be| be.set_dirty_tracking(true)) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("virtio-iommu: dirty tracking on {name}: {e}");
                    false
                }
            }
    }

    /// Starts tracking on backend `b`, registered while tracking runs (a hot-added device):
    /// its device reports what it writes from now on, as it had nothing mapped before.
    /// `None` when tracking is off; `Some(false)` when the backend cannot (every writable page
    /// mapped for it then counts dirty at each harvest).
    fn track_backend(&mut self, b: BackendId) -> Option<bool> {
        self.dirty.as_ref()?;
        self.backends.get(b)?;
        let on = self.turn_tracking_on(b);
        let d = self.dirty.as_mut()?;
        if d.tracked.len() <= b {
            d.tracked.resize(b + 1, false);
        }
        d.tracked[b] = on;
        Some(on)
    }

    /// [`Viommu::harvest_dirty`] with options: reading without clearing, and the window in
    /// which backends' bitmaps are read. Clean 64-page words of a window are skipped when its
    /// bits are translated to guest pages.
    fn harvest_with(&mut self, out: &mut DirtyBitmap, opts: HarvestOptions) {
        if self.dirty.is_none() {
            return;
        }
        self.flush_pending(&mut []);
        let window = opts.window_pages.max(64);
        if opts.clear {
            for b in 0..self.backends.len() {
                self.harvest_backend(b, window, true);
            }
            if let Some(d) = self.dirty.as_mut() {
                out.merge(&d.bitmap);
                d.bitmap.clear();
            }
            return;
        }
        // A peek: read into a scratch bitmap, leave the pending pages and the devices alone.
        let Some(pending) = self.dirty.as_ref().map(|d| d.bitmap.clone()) else {
            return;
        };
        for b in 0..self.backends.len() {
            self.harvest_backend(b, window, false);
        }
        if let Some(d) = self.dirty.as_mut() {
            out.merge(&d.bitmap);
            d.bitmap = pending;
        }
    }

    /// Stops tracking; returns the pages dirtied since the last harvest.
    fn stop_tracking(&mut self) -> Option<DirtyBitmap> {
        let mut out = DirtyBitmap::new(&self.cfg.guest_ram);
        self.harvest_with(&mut out, HarvestOptions::default());
        let state = self.dirty.take()?;
        for (b, on) in state.tracked.into_iter().enumerate() {
            if on && self.backends.get(b).is_some_and(|s| !s.failed) {
                if let Err(e) = call(self, b, |be| be.set_dirty_tracking(false)) {
                    log::warn!(
                        "virtio-iommu: stopping dirty tracking on {}: {e}",
                        self.backends[b].name
                    );
                }
            }
        }
        Some(out)
    }

    /// Harvests everything backend `b` has mapped. For a domain, the device is read in
    /// windows over the IOVA spans the page table populates, and each dirty bit is translated
    /// through the table (clean 64-page words skipped); identity content is read as runs.
    fn harvest_backend(&mut self, b: BackendId, window: u64, clear: bool) {
        let content = self.backend_content(b);
        let dom = match content {
            // (A bypass domain's content is `Identity`: see `endpoint_content`.)
            Content::Domain(d) => d,
            _ => {
                let runs = self.content_runs(content);
                self.harvest_runs(b, &runs, window, clear);
                return;
            }
        };
        if !self.reads_device_dirty(b) || self.backends[b].caps.dirty_whole_mappings {
            // Untracked, or a backend whose reports must follow host mappings: by mapping.
            let runs = self.content_runs(content);
            self.harvest_runs(b, &runs, window, clear);
            return;
        }
        let mut spans = Vec::new();
        if let Some(d) = self.domains.get(&dom) {
            d.table
                .populated_spans(|first, pages| spans.push((first, pages)));
        }
        for (first, pages) in spans {
            let mut done = 0;
            while done < pages {
                let n = (pages - done).min(window);
                let iova_page = first + done;
                let mut bits = vec![0u64; n.div_ceil(64) as usize];
                self.counters.dirty_reads += 1;
                let r = call(self, b, |be| {
                    be.read_dirty(iova_page * PAGE_SIZE, n * PAGE_SIZE, &mut bits, clear)
                });
                let v: &mut Viommu = self;
                let (Some(state), Some(d)) = (v.dirty.as_mut(), v.domains.get(&dom)) else {
                    return;
                };
                match r {
                    Ok(()) => {
                        for (w, &word) in bits.iter().enumerate() {
                            let mut word = word;
                            while word != 0 {
                                let bit = u64::from(word.trailing_zeros());
                                word &= word - 1;
                                let page = iova_page + w as u64 * 64 + bit;
                                v.counters.dirty_pages_reported += 1;
                                if let Some(pte) = d.table.get(page) {
                                    if pte.perm.write() && !pte.perm.contains(Perm::MMIO) {
                                        state.bitmap.mark(pte.gpa_page, 1);
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        log::warn!(
                            "virtio-iommu: dirty report of IOVA {:#x}+{:#x} failed ({e}); \
                             counting its writable mappings dirty",
                            iova_page * PAGE_SIZE,
                            n * PAGE_SIZE
                        );
                        d.table.mappings(iova_page, iova_page + n - 1, |r| {
                            if r.perm.write() && !r.perm.contains(Perm::MMIO) {
                                state.bitmap.mark(r.gpa_page, r.pages);
                            }
                            true
                        });
                    }
                }
                done += n;
            }
        }
    }

    /// Moves the device's dirty bits of `runs` (mapped on backend `b`, sorted by IOVA) into
    /// the bitmap, clearing them in the device. Called before the runs are unmapped from the
    /// host, and by harvests. The device is read in windows of at most `window` pages (see
    /// [`dirty_windows`]); each set bit is translated through the run that maps it.
    fn harvest_runs(&mut self, b: BackendId, runs: &[Run], window: u64, clear: bool) {
        let Some(tracked) = self.dirty.as_ref().map(|s| s.tracked.get(b).copied()) else {
            return;
        };
        let Some(slot) = self.backends.get(b) else {
            return;
        };
        let reads_device = tracked.unwrap_or(false) && !slot.failed;
        let whole = slot.caps.dirty_whole_mappings;
        let writable: Vec<Run> = runs
            .iter()
            .filter(|r| r.perm.write() && !r.perm.contains(Perm::MMIO))
            .copied()
            .collect();
        if !reads_device {
            if let Some(state) = self.dirty.as_mut() {
                for r in &writable {
                    state.bitmap.mark(r.gpa_page, r.pages);
                }
            }
            return;
        }
        for (first, pages) in dirty_windows(&writable, window, whole) {
            let mut bits = vec![0u64; pages.div_ceil(64) as usize];
            let iova = first * PAGE_SIZE;
            self.counters.dirty_reads += 1;
            let r = call(self, b, |be| {
                be.read_dirty(iova, pages * PAGE_SIZE, &mut bits, clear)
            });
            let v: &mut Viommu = self;
            let Some(state) = v.dirty.as_mut() else {
                return;
            };
            match r {
                Ok(()) => {
                    v.counters.dirty_pages_reported +=
                        mark_through_runs(&mut state.bitmap, &writable, first, pages, &bits);
                }
                Err(e) => {
                    log::warn!(
                        "virtio-iommu: dirty report of IOVA {iova:#x}+{:#x} from {} \
                         failed ({e}); counting the range dirty",
                        pages * PAGE_SIZE,
                        v.backends[b].name
                    );
                    for r in runs_in(&writable, first, pages) {
                        let from = r.iova_page.max(first);
                        let to = (r.iova_page + r.pages).min(first + pages);
                        state
                            .bitmap
                            .mark(r.gpa_page + (from - r.iova_page), to - from);
                    }
                }
            }
        }
    }
}

impl<G: Relock + ?Sized> DirtySide for G {}

/// The runs of `runs` (sorted, disjoint) that overlap pages `[first, first + pages)`.
fn runs_in(runs: &[Run], first: u64, pages: u64) -> impl Iterator<Item = &Run> {
    let k = runs.partition_point(|r| r.iova_page + r.pages <= first);
    runs[k..]
        .iter()
        .take_while(move |r| r.iova_page < first + pages)
}

/// Marks, in `bitmap`, the GPA page behind each set bit of `bits` (bit `i` = IOVA page
/// `first + i`, `i < pages`) that one of `runs` (sorted by IOVA) maps; returns how many.
fn mark_through_runs(
    bitmap: &mut crate::dirty::DirtyBitmap,
    runs: &[Run],
    first: u64,
    pages: u64,
    bits: &[u64],
) -> u64 {
    let mut found = 0;
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let i = w as u64 * 64 + u64::from(word.trailing_zeros());
            word &= word - 1;
            if i >= pages {
                break;
            }
            let page = first + i;
            let k = runs.partition_point(|r| r.iova_page + r.pages <= page);
            if let Some(r) = runs.get(k).filter(|r| r.iova_page <= page) {
                bitmap.mark(r.gpa_page + (page - r.iova_page), 1);
                found += 1;
            }
        }
    }
    found
}

/// The IOVA windows `(first page, pages)` in which the dirty bits of `runs` (sorted by IOVA,
/// disjoint) are read: runs that touch in IOVA share windows of at most `window` pages.
/// With `whole` (the backend's reports must cover whole host mappings, each run being one),
/// a window starts at a run's first page and ends at a run's last page: runs are grouped
/// while they fit, and a run larger than `window` is read in one window of its own.
/// Otherwise windows cut runs wherever `window` falls.
pub(super) fn dirty_windows(runs: &[Run], window: u64, whole: bool) -> Vec<(u64, u64)> {
    let window = window.max(1);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut open: Option<(u64, u64)> = None; // (first, pages) of the window being built
    for r in runs {
        if whole {
            match open.as_mut() {
                Some((f, n)) if *f + *n == r.iova_page && *n + r.pages <= window => {
                    *n += r.pages;
                }
                _ => {
                    out.extend(open.take());
                    open = Some((r.iova_page, r.pages));
                }
            }
            continue;
        }
        // Cut anywhere: continue the open window when the run touches it.
        let (mut at, mut left) = (r.iova_page, r.pages);
        if let Some((f, n)) = open.as_mut() {
            if *f + *n == at {
                let take = left.min(window - *n);
                *n += take;
                at += take;
                left -= take;
            }
        }
        while left > 0 {
            out.extend(open.take());
            let take = left.min(window);
            open = Some((at, take));
            at += take;
            left -= take;
        }
    }
    out.extend(open);
    out
}

#[cfg(test)]
mod tests;
