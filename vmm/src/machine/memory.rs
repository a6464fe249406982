//! Guest RAM: one memfd holding every RAM range back to back, mapped shared so that a device
//! process (vfio-user) can map the same pages from the file descriptor.

use std::fs::File;
use std::sync::Arc;

use devices::GuestMemoryMmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::HUGEPAGE_SIZE;
use crate::error::VmmError;

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    /// The mapped memory (with the VMM's dirty bitmap).
    pub mem: Arc<GuestMemoryMmap>,
    /// The memfd; RAM range `i` starts at the sum of the sizes of ranges `0..i`.
    pub memfd: Arc<File>,
    /// Total bytes of RAM.
    pub size: u64,
    /// Bytes of the pages backing it: 4 KiB, or the hugetlb page size.
    pub backing_page: u64,
}

/// Free 2 MiB hugetlb pages on the host (0 when the kernel has none).
pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Total physical memory of the host in bytes (`MemTotal` of `/proc/meminfo`).
pub fn host_mem_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Smallest guest RAM the VMM accepts: the boot structures live in the first MiB.
pub const MIN_MEMORY: u64 = 2 << 20;

impl GuestRam {
    /// Creates `size` bytes of RAM laid out by [`boot::layout::ram_ranges`], on 2 MiB
    /// hugetlb pages with `hugepages`.
    ///
    /// # Errors
    /// [`VmmError::MemoryTooSmall`], [`VmmError::MemoryTooLarge`] (more than the host has),
    /// [`VmmError::HugePages`] (not enough free hugetlb pages), [`VmmError::GuestMemory`]
    /// when the memfd or mapping fails.
    pub fn new(size: u64, hugepages: bool) -> Result<Self, VmmError> {
        if size < MIN_MEMORY || !size.is_multiple_of(4096) {
            return Err(VmmError::MemoryTooSmall(size));
        }
        if let Some(host) = host_mem_total() {
            if size > host {
                return Err(VmmError::MemoryTooLarge { size, host });
            }
        }
        if hugepages {
            let need = size.div_ceil(HUGEPAGE_SIZE);
            let free = free_hugepages();
            if free < need {
                return Err(VmmError::HugePages { need, free });
            }
        }
        // Sealed: a device process holding the descriptor cannot truncate RAM under us.
        let file =
            devices::memfd::sealed("guest-ram", size, hugepages).map_err(VmmError::GuestMemory)?;
        let memfd = Arc::new(file);
        let mut offset = 0u64;
        let mut ranges = Vec::new();
        for (start, len) in boot::layout::ram_ranges(size) {
            let len_usize = usize::try_from(len).map_err(|_| VmmError::MemoryTooLarge {
                size,
                host: usize::MAX as u64,
            })?;
            ranges.push((
                GuestAddress(start),
                len_usize,
                Some(FileOffset::from_arc(memfd.clone(), offset)),
            ));
            offset += len;
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| VmmError::GuestMemory(std::io::Error::other(e.to_string())))?;
        Ok(Self {
            mem: Arc::new(mem),
            memfd,
            size,
            backing_page: if hugepages { HUGEPAGE_SIZE } else { 4096 },
        })
    }

    /// `(GPA, size, HVA, memfd offset)` of each RAM region.
    pub fn regions(&self) -> Vec<(u64, u64, u64, u64)> {
        self.mem
            .iter()
            .map(|r| {
                let fo = r.file_offset().map(|f| f.start()).unwrap_or(0);
                (r.start_addr().0, r.len(), r.as_ptr() as u64, fo)
            })
            .collect()
    }

    /// `(GPA, bytes)` of the parts of guest RAM that hold data, in GPA order, page aligned:
    /// the memfd's extents (`SEEK_DATA`/`SEEK_HOLE`, lseek(2)). A region whose file system
    /// lacks `SEEK_DATA` is listed whole.
    ///
    /// Pages never touched read as zero and are zero on a fresh destination, so a migration's
    /// full copy and its verify skip them (touching them would allocate them on both sides).
    pub fn data_extents(&self) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let fd = self.memfd.as_raw_fd();
        let mut out = Vec::new();
        for (gpa, len, _, file_off) in self.regions() {
            let end = file_off + len;
            let mut pos = file_off;
            while pos < end {
                // SAFETY: lseek on a file descriptor we own; the results are checked.
                let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
                if data < 0 {
                    let errno = std::io::Error::last_os_error().raw_os_error();
                    if errno != Some(libc::ENXIO) {
                        // No SEEK_DATA here: list the whole rest.
                        out.push((gpa + (pos - file_off), end - pos));
                    }
                    break;
                }
                let data = (data as u64).min(end);
                if data >= end {
                    break;
                }
                // SAFETY: as above.
                let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
                let hole = if hole < 0 {
                    end
                } else {
                    (hole as u64).min(end)
                };
                let start = data & !4095;
                let stop = hole.next_multiple_of(4096).min(end);
                out.push((gpa + (start - file_off), stop - start));
                pos = stop;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hugepages=on` on a host without enough free hugetlb pages is refused with the count
    /// and where to look; without it the same RAM is made.
    #[test]
    fn guest_ram_cannot_be_resized_by_a_peer_holding_its_descriptor() {
        let ram = GuestRam::new(16 << 20, false).unwrap();
        // What a device process given the descriptor could try: refused, RAM intact.
        for len in [0, 8 << 20, 32 << 20] {
            let e = ram.memfd.set_len(len).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "set_len({len})");
        }
        assert_eq!(ram.memfd.metadata().unwrap().len(), 16 << 20);
    }

    #[test]
    fn hugepages_need_free_hugetlb_pages() {
        let size = 64 << 20;
        match GuestRam::new(size, true) {
            Err(VmmError::HugePages { need, free }) => {
                assert_eq!(need, 32);
                assert!(free < 32);
                let msg = VmmError::HugePages { need, free }.to_string();
                assert!(
                    msg.contains("hugepages=on") && msg.contains("free_hugepages"),
                    "{msg}"
                );
            }
            Ok(ram) => {
                // A host with 32 free 2 MiB pages: the RAM is on them.
                assert_eq!(ram.backing_page, HUGEPAGE_SIZE);
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        let ram = GuestRam::new(size, false).unwrap();
        assert_eq!((ram.size, ram.backing_page), (size, 4096));
    }

    /// RAM split by the PCI hole: the extents are the pages written, named by GPA in both
    /// regions (the upper one starts at 4 GiB, 3 GiB into the memfd); the verify hashes that
    /// skip the rest equal those that read everything, and read nothing more.
    #[test]
    fn data_extents_and_hashes_skip_what_the_guest_never_touched() {
        use vm_memory::{Bytes, GuestAddress};
        let ram = GuestRam::new((3 << 30) + (8 << 20), false).unwrap();
        let regions: Vec<(u64, u64)> = ram.regions().iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(regions, vec![(0, 3 << 30), (1 << 32, 8 << 20)]);
        let written = [0u64, 0x2000, (1 << 30) + 0x5000, (1 << 32) + 0x3000];
        for &gpa in &written {
            ram.mem.write_obj(0xa5u8, GuestAddress(gpa + 4095)).unwrap();
        }
        let extents = ram.data_extents();
        // shmem allocates whole pages; each written page is its own extent.
        assert_eq!(
            extents,
            written.iter().map(|&g| (g, 4096)).collect::<Vec<_>>()
        );
        let skipping = crate::migration::page_hashes(&ram.mem, &regions, Some(&extents)).unwrap();
        let blocks = |ram: &GuestRam| ram.memfd.metadata().unwrap().blocks() * 512;
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            blocks(&ram),
            written.len() as u64 * 4096,
            "hashing read never-touched pages"
        );
        // What reading gives: the written pages' own hashes, and the zero page's elsewhere
        // (read from a page never written, in the lower region).
        let read =
            |gpa: u64| crate::migration::page_hashes(&ram.mem, &[(gpa, 4096)], None).unwrap()[0];
        let zero = read(0x10_0000);
        let index = |gpa: u64| {
            if gpa >= 1 << 32 {
                ((gpa - (1 << 32)) + (3 << 30)) / 4096
            } else {
                gpa / 4096
            }
        };
        for (i, h) in skipping.iter().enumerate() {
            let gpa = written.iter().find(|&&g| index(g) == i as u64);
            let want = gpa.map_or(zero, |&g| read(g));
            assert_eq!(*h, want, "page {i}");
        }
        assert_eq!(skipping.len() as u64, ram.size / 4096);
    }

    /// RAM below the boot structures' 2 MiB, or not whole pages, is refused; so is more than
    /// the host has (`MemTotal`).
    #[test]
    fn ram_sizes_the_host_cannot_give_are_refused() {
        assert!(matches!(
            GuestRam::new(1 << 20, false),
            Err(VmmError::MemoryTooSmall(s)) if s == 1 << 20
        ));
        assert!(matches!(
            GuestRam::new((4 << 20) + 512, false),
            Err(VmmError::MemoryTooSmall(_))
        ));
        assert!(GuestRam::new(MIN_MEMORY, false).is_ok());
        let host = host_mem_total().expect("MemTotal in /proc/meminfo");
        let too_much = (host + (1 << 30)).next_multiple_of(4096);
        assert!(matches!(
            GuestRam::new(too_much, false),
            Err(VmmError::MemoryTooLarge { size, host: h }) if size == too_much && h == host
        ));
    }
}
