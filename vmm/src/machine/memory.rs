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
}
