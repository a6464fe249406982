//! The dirty log a vhost-user back end writes while a migration runs (vhost-user spec,
//! "Migration", with `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): one bit per 4 KiB page of
//! guest-physical address space, page `n` at bit `n % 8` of byte `n / 8`, in a memfd the VMM
//! hands over with `SET_LOG_BASE`. The back end sets bits with atomic ORs (DPDK:
//! `vhost_log_page`) by GPA, also for the used rings it writes (`VHOST_VRING_F_LOG`); the VMM
//! takes them with atomic swaps, so no bit set between two harvests is lost.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use iommu::dirty::DirtyBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

/// Bytes per logged page (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 4096;

/// Words swapped per [`DirtyBitmap::mark_bits`] call (16 MiB of guest memory).
const CHUNK_WORDS: usize = 64;

/// A shared dirty log covering guest-physical `[0, pages * 4 KiB)`.
pub struct DirtyLog {
    /// The memfd handed to the back end.
    file: Arc<File>,
    /// A shared mapping of the whole memfd (vm-memory maps and unmaps it).
    region: MmapRegion,
    words: usize,
}

impl DirtyLog {
    /// A zeroed log for guest-physical addresses below `gpa_end` (rounded up to 64 pages).
    ///
    /// # Errors
    /// `memfd_create`, `ftruncate` or `mmap` failed.
    pub fn new(gpa_end: u64) -> std::io::Result<Self> {
        let words = gpa_end.div_ceil(LOG_PAGE).div_ceil(64).max(1);
        let bytes = words * 8;
        let words = usize::try_from(words).map_err(|_| std::io::Error::other("log too large"))?;
        // Sealed: the back end holding the descriptor cannot truncate the log under us.
        let file = crate::memfd::sealed("vhost-user-log", bytes, false)?;
        let file = Arc::new(file);
        let region = MmapRegion::from_file(FileOffset::from_arc(file.clone(), 0), words * 8)
            .map_err(|e| std::io::Error::other(format!("mapping the vhost-user log: {e}")))?;
        Ok(Self {
            file,
            region,
            words,
        })
    }

    /// The log's size in bytes (`VhostUserLog::mmap_size`).
    pub fn bytes(&self) -> u64 {
        self.words as u64 * 8
    }

    /// The memfd handed to the back end.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `words` u64s in the region's live shared mapping of exactly that size, page
        // aligned; it is only ever accessed through atomics, here and by the back end.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr().cast::<AtomicU64>(), self.words) }
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in self.words() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Takes the bits set since the last harvest and ORs them into `out` (pages outside guest
    /// RAM are ignored there). Returns how many pages were set.
    pub fn harvest(&self, out: &mut DirtyBitmap) -> u64 {
        let mut n = 0;
        let mut chunk = [0u64; CHUNK_WORDS];
        for (i, words) in self.words().chunks(CHUNK_WORDS).enumerate() {
            let mut any = false;
            for (c, w) in chunk.iter_mut().zip(words) {
                // A load first: most words are clean, and a swap would dirty the cache line.
                *c = if w.load(Ordering::Relaxed) == 0 {
                    0
                } else {
                    w.swap(0, Ordering::AcqRel)
                };
                any |= *c != 0;
            }
            if any {
                let got = &chunk[..words.len()];
                n += got.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                out.mark_bits((i * CHUNK_WORDS * 64) as u64, got, got.len() as u64 * 64);
            }
        }
        n
    }

    /// Sets the bit of page `page` (the back end's side; for tests).
    pub fn log_page(&self, page: u64) {
        if let Some(w) = usize::try_from(page / 64)
            .ok()
            .and_then(|i| self.words().get(i))
        {
            w.fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_pages_by_gpa_and_a_harvest_takes_them_once() {
        // RAM below 3 GiB and above 4 GiB; the log covers up to the end.
        let ram = [(0, 0xc000_0000), (0x1_0000_0000, 0x4000_0000)];
        let log = DirtyLog::new(0x1_4000_0000).unwrap();
        assert_eq!(log.bytes(), 0x1_4000_0000 / 4096 / 8);
        // The back end's view: bit n % 8 of byte n / 8, through the memfd.
        let set = |page: u64| {
            use std::os::unix::fs::FileExt;
            let f = &log.file;
            let mut b = [0u8];
            f.read_exact_at(&mut b, page / 8).unwrap();
            b[0] |= 1 << (page % 8);
            f.write_all_at(&b, page / 8).unwrap();
        };
        let pages = [0u64, 7, 8, 65, 0xbffff, 0xc0000, 0x100000, 0x13ffff];
        for p in pages {
            set(p);
        }
        let mut out = DirtyBitmap::new(&ram);
        assert_eq!(log.harvest(&mut out), pages.len() as u64);
        let inside: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|p| !(0xc0000..0x100000).contains(p))
            .collect();
        let got: Vec<u64> = (0..0x140000).filter(|&p| out.is_dirty(p)).collect();
        assert_eq!(got, inside);
        assert_eq!(out.outside(), 1);
        // Taken: a second harvest finds nothing, and the memfd is clean.
        let mut again = DirtyBitmap::new(&ram);
        assert_eq!(log.harvest(&mut again), 0);
        assert!(again.is_clean());
        use std::os::unix::fs::FileExt;
        let mut back = vec![0u8; log.bytes() as usize];
        log.file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        // `log_page` sets the page's own bit, below the hole and above 4 GiB.
        log.log_page(3);
        log.log_page(0x10_0041);
        let mut once = DirtyBitmap::new(&ram);
        assert_eq!(log.harvest(&mut once), 2);
        let got: Vec<u64> = (0..0x140000).filter(|&p| once.is_dirty(p)).collect();
        assert_eq!(got, vec![3, 0x10_0041]);
        log.log_page(3);
        log.clear();
        assert_eq!(log.harvest(&mut again), 0);
    }

    /// A harvest takes a chunk whose every word is dirty (no clean word in it to notice):
    /// all 4,096 pages of the first chunk, and one page in the next.
    #[test]
    fn a_chunk_dirty_in_every_word_is_harvested_whole() {
        let ram = [(0, 64 << 20)];
        let log = DirtyLog::new(64 << 20).unwrap();
        let chunk = (CHUNK_WORDS * 64) as u64;
        for p in 0..=chunk {
            log.log_page(p);
        }
        let mut out = DirtyBitmap::new(&ram);
        assert_eq!(log.harvest(&mut out), chunk + 1);
        assert_eq!(out.count(), chunk + 1);
        assert!((0..=chunk).all(|p| out.is_dirty(p)));
    }
}
