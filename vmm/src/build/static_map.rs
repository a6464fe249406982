//! Static DMA mapping of all guest RAM for a passthrough device outside the vIOMMU: every
//! page is populated and mapped at IOVA = GPA before the guest runs. The work is split across
//! threads, and the cuts fall on the RAM's backing page size (2 MiB, or the hugetlb page size)
//! so that a huge host page is never split between two host mappings (the "Multithreaded VFIO page
//! pinning" review: user space knows its backing page size and can cut there).
//!
//! Each thread populates its share (`MADV_POPULATE_WRITE`: the page faults, the part that
//! scales with memory) and makes one host map call per RAM range it covers. The host calls
//! themselves go through one lock: VFIO type1 serialises DMA_MAP on its container anyway, and
//! with the pages already present its pinning is the cheap part.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use iommu::{BackendError, DmaBackend, Perm};
use sync::MutexExt;

/// One piece of RAM: `len` bytes at `gpa` (mapped at IOVA = GPA), at `hva` in the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Guest-physical address (bytes).
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// Host virtual address of `gpa`.
    pub hva: u64,
}

/// Splits RAM `ranges` (`(gpa, len, hva)`) into at most `threads` shares of nearly equal
/// size, each a list of pieces in GPA order. Every cut inside a range falls on a multiple of
/// `align` (a power of two, the backing page size) from the range's start; pieces start and
/// end at cuts or at range edges. Empty shares are dropped.
pub fn cuts(ranges: &[(u64, u64, u64)], align: u64, threads: usize) -> Vec<Vec<Piece>> {
    let units: u64 = ranges.iter().map(|r| r.1.div_ceil(align)).sum();
    let threads = threads.max(1) as u64;
    // Units of `align` bytes per share; the first `units % threads` shares take one more.
    let (base, extra) = (units / threads, units % threads);
    let mut shares = Vec::new();
    let mut share = Vec::new();
    let mut quota = base + u64::from(extra > 0);
    for &(gpa, len, hva) in ranges {
        let mut off = 0;
        while off < len {
            let take = (quota * align).min(len - off);
            share.push(Piece {
                gpa: gpa + off,
                len: take,
                hva: hva + off,
            });
            off += take;
            quota -= take.div_ceil(align);
            if quota == 0 {
                shares.push(std::mem::take(&mut share));
                let n = shares.len() as u64;
                quota = base + u64::from(n < extra);
            }
        }
    }
    if !share.is_empty() {
        shares.push(share);
    }
    shares.retain(|s| !s.is_empty());
    shares
}

/// Faults in `len` bytes at `hva` for writing.
///
/// # Errors
/// The `madvise` error; kernels before 5.14 lack `MADV_POPULATE_WRITE`, and the pages are
/// then touched one by one instead.
fn populate(hva: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: `[hva, hva + len)` is guest RAM the VMM mapped and keeps mapped; populating
    // changes no content.
    let r = unsafe {
        libc::madvise(
            hva as *mut libc::c_void,
            len as usize,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    for off in (0..len).step_by(4096) {
        let p = (hva + off) as *mut u8;
        // SAFETY: inside the mapped range; the guest does not run yet, so reading and writing
        // back a byte changes nothing.
        unsafe { p.write_volatile(p.read_volatile()) };
    }
    Ok(())
}

/// What [`map_all`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaticMapReport {
    /// Threads that had a share.
    pub threads: usize,
    /// Host map calls.
    pub calls: usize,
    /// Bytes mapped.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Why [`map_all`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StaticMapError {
    /// Populating a piece failed.
    #[error("cannot populate guest RAM at GPA {gpa:#x} (+{len:#x}): {source}")]
    Populate {
        /// The piece.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The `madvise` error.
        source: std::io::Error,
    },
    /// The host refused a map.
    #[error("host map of GPA {gpa:#x} (+{len:#x}) failed: {source}")]
    Map {
        /// The piece.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The backend's error.
        source: BackendError,
    },
}

/// Populates all of `ranges` (`(gpa, len, hva)`) and maps it at IOVA = GPA, read-write, on
/// `dma`, with `threads` threads cutting on `align`. On an error, what was mapped stays
/// mapped (the caller drops the device).
///
/// # Errors
/// The first [`StaticMapError`] of any thread.
pub fn map_all(
    dma: &mut dyn DmaBackend,
    ranges: &[(u64, u64, u64)],
    align: u64,
    threads: usize,
) -> Result<StaticMapReport, StaticMapError> {
    run(Some(dma), ranges, align, threads)
}

/// Populates all of `ranges` with `threads` threads cutting on `align`, mapping nothing: for
/// the identity maps the vIOMMU makes itself when it starts in bypass, so that their host
/// calls (VFIO's pinning) find the pages present. `calls` is 0 in the report.
///
/// # Errors
/// The first [`StaticMapError::Populate`] of any thread.
pub fn populate_all(
    ranges: &[(u64, u64, u64)],
    align: u64,
    threads: usize,
) -> Result<StaticMapReport, StaticMapError> {
    run(None, ranges, align, threads)
}

fn run(
    dma: Option<&mut dyn DmaBackend>,
    ranges: &[(u64, u64, u64)],
    align: u64,
    threads: usize,
) -> Result<StaticMapReport, StaticMapError> {
    let started = Instant::now();
    let shares = cuts(ranges, align, threads);
    let dma = Mutex::new(dma);
    let results: Vec<Result<(usize, u64), StaticMapError>> = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .iter()
            .map(|share| {
                let dma = &dma;
                s.spawn(move || {
                    // Filtered like every other thread: it talks to device servers.
                    devices::seccomp::confine("static-map", devices::seccomp::lists::STATIC_MAP);
                    let (mut calls, mut bytes) = (0, 0);
                    for p in share {
                        populate(p.hva, p.len).map_err(|source| StaticMapError::Populate {
                            gpa: p.gpa,
                            len: p.len,
                            source,
                        })?;
                        let mut d = dma.locked();
                        if let Some(d) = d.as_mut() {
                            d.map(p.gpa, p.gpa, p.len, Perm::RW).map_err(|source| {
                                StaticMapError::Map {
                                    gpa: p.gpa,
                                    len: p.len,
                                    source,
                                }
                            })?;
                            calls += 1;
                        }
                        bytes += p.len;
                    }
                    Ok((calls, bytes))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut report = StaticMapReport {
        threads: shares.len(),
        ..Default::default()
    };
    for r in results {
        let (calls, bytes) = r?;
        report.calls += calls;
        report.bytes += bytes;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Where cuts fall: 2 MiB (the transparent huge page size, and the hugetlb page size of
/// `--memory ...,hugepages=on`).
pub fn cut_align(_hugepages: bool) -> u64 {
    crate::config::HUGEPAGE_SIZE
}

/// The default thread count: the host's CPUs.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iommu::backend::{Call, RecordingBackend};
    use iommu::BackendCaps;
    use proptest::prelude::*;

    const MIB2: u64 = 2 << 20;

    /// Every byte of every range in exactly one piece, pieces inside their range, cuts on
    /// `align` from the range start, at most `threads` shares whose sizes differ by at most
    /// one unit.
    fn check(ranges: &[(u64, u64, u64)], align: u64, threads: usize) {
        let shares = cuts(ranges, align, threads);
        assert!(shares.len() <= threads.max(1));
        let mut pieces: Vec<Piece> = shares.iter().flatten().copied().collect();
        pieces.sort_by_key(|p| p.gpa);
        let mut covered = Vec::new();
        for p in &pieces {
            let r = ranges
                .iter()
                .find(|r| p.gpa >= r.0 && p.gpa + p.len <= r.0 + r.1)
                .expect("a piece lies in one range");
            assert_eq!(p.hva, r.2 + (p.gpa - r.0), "HVA follows GPA");
            assert!(p.len > 0);
            let (start, end) = (p.gpa - r.0, p.gpa + p.len - r.0);
            assert!(
                start % align == 0,
                "piece start {start:#x} off the {align:#x} grid"
            );
            assert!(
                end % align == 0 || end == r.1,
                "piece end {end:#x} off the grid"
            );
            covered.push((p.gpa, p.len));
        }
        // Merge and compare with the ranges as sets of bytes.
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (g, l) in covered {
            match merged.last_mut() {
                Some((mg, ml)) if *mg + *ml == g => *ml += l,
                _ => merged.push((g, l)),
            }
        }
        let mut want: Vec<(u64, u64)> = ranges
            .iter()
            .map(|r| (r.0, r.1))
            .filter(|r| r.1 > 0)
            .collect();
        want.sort();
        let mut want_merged: Vec<(u64, u64)> = Vec::new();
        for (g, l) in want {
            match want_merged.last_mut() {
                Some((mg, ml)) if *mg + *ml == g => *ml += l,
                _ => want_merged.push((g, l)),
            }
        }
        assert_eq!(merged, want_merged);
        let units: Vec<u64> = shares
            .iter()
            .map(|s| s.iter().map(|p| p.len.div_ceil(align)).sum())
            .collect();
        let (lo, hi) = (units.iter().min(), units.iter().max());
        if let (Some(lo), Some(hi)) = (lo, hi) {
            assert!(hi - lo <= 1, "unbalanced shares {units:?}");
        }
    }

    #[test]
    fn a_guest_with_a_hole_in_two_threads() {
        // 3 GiB below the PCI hole and 1 GiB + 6 MiB above it.
        let ranges = [
            (0, 3 << 30, 0x7f00_0000_0000),
            (4 << 30, (1 << 30) + 3 * MIB2, 0x7f00_c000_0000),
        ];
        check(&ranges, MIB2, 2);
        let shares = cuts(&ranges, MIB2, 2);
        assert_eq!(shares.len(), 2);
        // 2,051 units: the first share takes 1,026 (all below the hole but 510 units), the
        // second the rest.
        assert_eq!(
            shares[0],
            vec![Piece {
                gpa: 0,
                len: 1026 * MIB2,
                hva: 0x7f00_0000_0000
            }]
        );
        assert_eq!(shares[1][0].gpa, 1026 * MIB2);
        assert_eq!(
            shares[1][1],
            Piece {
                gpa: 4 << 30,
                len: (1 << 30) + 3 * MIB2,
                hva: 0x7f00_c000_0000
            }
        );
        // One thread: one piece per range.
        assert_eq!(
            cuts(&ranges, MIB2, 1),
            vec![vec![
                Piece {
                    gpa: 0,
                    len: 3 << 30,
                    hva: 0x7f00_0000_0000
                },
                Piece {
                    gpa: 4 << 30,
                    len: (1 << 30) + 3 * MIB2,
                    hva: 0x7f00_c000_0000
                },
            ]]
        );
        // More threads than units: one unit each, no empty share.
        let small = [(0, 3 * MIB2 - 4096, 0x1000_0000)];
        check(&small, MIB2, 8);
        assert_eq!(cuts(&small, MIB2, 8).len(), 3);
        assert!(cuts(&[], MIB2, 4).is_empty());
    }

    proptest! {
        #[test]
        fn cuts_cover_ram_on_the_backing_page_grid(
            lens in proptest::collection::vec(1u64..5000, 1..4),
            align_shift in 0u32..4,
            threads in 1usize..9,
        ) {
            let align = 4096u64 << (9 + align_shift);
            let mut gpa = 0;
            let ranges: Vec<(u64, u64, u64)> = lens
                .iter()
                .map(|&pages| {
                    let r = (gpa, pages * 4096 * 97, 0x7000_0000_0000 + gpa);
                    gpa = (gpa + r.1).next_multiple_of(1 << 30);
                    r
                })
                .collect();
            check(&ranges, align, threads);
        }
    }

    /// Every host map call starts and ends on a backing-page boundary (or a RAM range's end),
    /// and the host ends up with all of RAM mapped at IOVA = GPA; the pages are populated.
    #[test]
    fn host_calls_fall_on_backing_pages_and_cover_ram() {
        let len = 8 * MIB2 + 3 * 4096;
        // SAFETY: an anonymous private mapping of `len` bytes, unmapped below.
        let hva = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(hva, libc::MAP_FAILED);
        let half = 4 * MIB2;
        let ranges = [
            (0, half, hva as u64),
            (1 << 32, len - half, hva as u64 + half),
        ];
        let (mut dma, log) = RecordingBackend::new("ram", BackendCaps::default());
        let report = map_all(&mut dma, &ranges, MIB2, 3).unwrap();
        assert_eq!((report.threads, report.bytes), (3, len));
        let log = log.lock().unwrap();
        let mut calls: Vec<(u64, u64)> = log
            .calls
            .iter()
            .map(|c| match *c {
                Call::Map(iova, gpa, len, perm) => {
                    assert_eq!((iova, perm), (gpa, Perm::RW));
                    (gpa, len)
                }
                ref other => panic!("unexpected call {other:?}"),
            })
            .collect();
        calls.sort();
        assert_eq!(report.calls, calls.len());
        for &(gpa, l) in &calls {
            let r = ranges
                .iter()
                .find(|r| gpa >= r.0 && gpa < r.0 + r.1)
                .unwrap();
            assert_eq!((gpa - r.0) % MIB2, 0, "call at {gpa:#x}");
            assert!(
                (gpa + l - r.0) % MIB2 == 0 || gpa + l == r.0 + r.1,
                "call end {:#x}",
                gpa + l
            );
        }
        let pages: u64 = calls.iter().map(|c| c.1 / 4096).sum();
        assert_eq!(pages, len / 4096);
        assert_eq!(log.pages.len() as u64, len / 4096);
        // Populated: every page is resident.
        let mut vec = vec![0u8; (len / 4096) as usize];
        // SAFETY: `hva` is mapped for `len` bytes; `vec` has a byte per page.
        let r = unsafe { libc::mincore(hva, len as usize, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        assert!(vec.iter().all(|&b| b & 1 == 1), "a page was not populated");
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(hva, len as usize) };
    }

    /// A refused host map fails the whole mapping with the piece named.
    #[test]
    fn a_refused_map_is_reported_with_its_piece() {
        let (mut dma, log) = RecordingBackend::new("ram", BackendCaps::default());
        log.lock().unwrap().fail_iova = Some(0);
        let mut buf = vec![0u8; (2 * MIB2) as usize];
        let ranges = [(0, 2 * MIB2, buf.as_mut_ptr() as u64)];
        let err = map_all(&mut dma, &ranges, MIB2, 1).unwrap_err();
        assert!(err.to_string().contains("GPA 0x0"), "{err}");
    }

    /// Populating alone: every page resident, no host call.
    #[test]
    fn populate_all_makes_pages_resident_and_maps_nothing() {
        let len = 6 * MIB2;
        // SAFETY: an anonymous private mapping of `len` bytes, unmapped below.
        let hva = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(hva, libc::MAP_FAILED);
        let r = populate_all(&[(0, len, hva as u64)], MIB2, 2).unwrap();
        assert_eq!((r.threads, r.calls, r.bytes), (2, 0, len));
        let mut vec = vec![0u8; (len / 4096) as usize];
        // SAFETY: `hva` is mapped for `len` bytes; `vec` has a byte per page.
        let rc = unsafe { libc::mincore(hva, len as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        assert!(vec.iter().all(|&b| b & 1 == 1), "a page was not populated");
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(hva, len as usize) };
    }
}
