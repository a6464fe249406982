//! The device's view of DMA: the IOVA mappings the VMM gave it, with their permissions, and
//! the dirty log of IOVA pages it wrote. A mapping that came with a file descriptor of guest
//! memory is reached directly; one without (the VMM's `dma=messages`) only through
//! `VFIO_USER_DMA_READ`/`DMA_WRITE` messages, which the VMM checks again. Every access is
//! checked against the mappings; the table is locked for the whole copy of one chunk, so an
//! unmap waits for a chunk in flight and no later chunk can reach an unmapped page.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use vfio_user::server_ext::DmaHandle;

/// Page size of the dirty log.
pub const PAGE: u64 = 4096;

/// One whole-file mapping of guest memory in this process.
struct FileMap {
    ptr: *mut u8,
    len: u64,
    _file: File,
}

// SAFETY: the mapping is process memory shared by file; access is serialised by the owner's
// lock and bounds-checked against `len`.
unsafe impl Send for FileMap {}
// SAFETY: as above.
unsafe impl Sync for FileMap {}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this object created and nothing else unmaps.
        unsafe { libc::munmap(self.ptr.cast(), self.len as usize) };
    }
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    size: u64,
    /// The file mapped (device, inode), or none: reached by message.
    file: Option<(u64, u64)>,
    offset: u64,
    read: bool,
    write: bool,
}

/// Why a DMA access failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault {
    /// First IOVA refused.
    pub iova: u64,
    /// The access was a write.
    pub write: bool,
}

/// IOVA mappings and the dirty log.
#[derive(Default)]
pub struct DmaSpace {
    files: BTreeMap<(u64, u64), FileMap>,
    maps: BTreeMap<u64, Mapping>,
    /// Dirty IOVA pages, when tracking.
    dirty: Option<BTreeSet<u64>>,
    /// DMA_MAP messages handled.
    pub map_calls: u64,
    /// DMA_UNMAP messages handled.
    pub unmap_calls: u64,
    /// The channel for mappings without a file.
    messages: Option<DmaHandle>,
    /// Transfers by message: `(DMA_READ, DMA_WRITE, refused by the VMM)`.
    pub message_counts: (u64, u64, u64),
    /// A hostile device: accesses ignore the mappings' permissions here (the VMM's own
    /// checks under `dma=messages` still apply).
    pub ignore_permissions: bool,
    /// The last access the VMM refused by message (its fault is the VMM's to report).
    pub iommu_refused: Option<DmaFault>,
}

impl DmaSpace {
    /// Sets the channel through which mappings without a file are reached.
    pub fn set_messages(&mut self, dma: DmaHandle) {
        self.messages = Some(dma);
    }

    /// Adds a mapping of `[iova, iova + size)` to `offset` of `file`, or, without a file, a
    /// mapping reached by `VFIO_USER_DMA_READ`/`DMA_WRITE`.
    ///
    /// # Errors
    /// When the range wraps, overlaps a mapping, or the file cannot be mapped.
    pub fn map(
        &mut self,
        iova: u64,
        size: u64,
        file: Option<File>,
        offset: u64,
        read: bool,
        write: bool,
    ) -> io::Result<()> {
        let end = iova
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if let Some((&s, m)) = self.maps.range(..end).next_back() {
            if s + m.size > iova {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
        }
        let key = match file {
            Some(file) => Some(self.map_file(file, offset, size)?),
            None => None,
        };
        self.maps.insert(
            iova,
            Mapping {
                size,
                file: key,
                offset,
                read,
                write,
            },
        );
        self.map_calls += 1;
        Ok(())
    }

    fn map_file(&mut self, file: File, offset: u64, size: u64) -> io::Result<(u64, u64)> {
        let meta = file.metadata()?;
        let key = (meta.dev(), meta.ino());
        if offset.checked_add(size).is_none_or(|e| e > meta.len()) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let std::collections::btree_map::Entry::Vacant(slot) = self.files.entry(key) {
            let len = meta.len();
            // SAFETY: a fresh shared mapping of the whole file; the result is checked.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            slot.insert(FileMap {
                ptr: ptr.cast(),
                len,
                _file: file,
            });
        }
        Ok(key)
    }

    /// Removes `[iova, iova + size)`, splitting mappings at its edges.
    pub fn unmap(&mut self, iova: u64, size: u64) {
        self.unmap_calls += 1;
        let end = iova.saturating_add(size);
        let touched: Vec<u64> = self
            .maps
            .range(..end)
            .filter(|(&s, m)| s + m.size > iova)
            .map(|(&s, _)| s)
            .collect();
        for s in touched {
            let Some(m) = self.maps.remove(&s) else {
                continue;
            };
            if s < iova {
                self.maps.insert(
                    s,
                    Mapping {
                        size: iova - s,
                        ..m
                    },
                );
            }
            if s + m.size > end {
                let cut = end - s;
                self.maps.insert(
                    end,
                    Mapping {
                        size: m.size - cut,
                        offset: m.offset + cut,
                        ..m
                    },
                );
            }
        }
    }

    /// Drops every mapping.
    pub fn clear(&mut self) {
        self.maps.clear();
        self.files.clear();
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether there are no mappings.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Where `[iova, iova + len)` (inside one page and one mapping) is: a host pointer, or
    /// `None` for a mapping reached by message.
    fn host(&self, iova: u64, len: u64, write: bool) -> Result<Option<*mut u8>, DmaFault> {
        let fault = DmaFault { iova, write };
        let (&s, m) = self.maps.range(..=iova).next_back().ok_or(fault)?;
        let allowed = if write { m.write } else { m.read };
        if iova - s >= m.size || iova - s + len > m.size || !(allowed || self.ignore_permissions) {
            return Err(fault);
        }
        let Some(key) = m.file else {
            return Ok(None);
        };
        let f = self.files.get(&key).ok_or(fault)?;
        let off = m.offset + (iova - s);
        if off + len > f.len {
            return Err(fault);
        }
        // SAFETY: `off + len <= f.len`, inside the live mapping.
        Ok(Some(unsafe { f.ptr.add(off as usize) }))
    }

    /// Reads `out.len()` bytes at `iova` (any length; checked page by page).
    ///
    /// # Errors
    /// The first refused IOVA (refused here, or by the VMM for a mapping reached by message).
    pub fn read(&mut self, iova: u64, out: &mut [u8]) -> Result<(), DmaFault> {
        let mut done = 0usize;
        while done < out.len() {
            let a = iova
                .checked_add(done as u64)
                .ok_or(DmaFault { iova, write: false })?;
            let n = ((PAGE - a % PAGE) as usize).min(out.len() - done);
            match self.host(a, n as u64, false)? {
                // SAFETY: `p` points at `n` readable bytes of the mapping (checked by `host`).
                Some(p) => unsafe { std::ptr::copy_nonoverlapping(p, out[done..].as_mut_ptr(), n) },
                None => self.by_message(a, &mut out[done..done + n], None)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `iova`, marking the pages dirty when tracking.
    ///
    /// # Errors
    /// The first refused IOVA; pages before it were written.
    pub fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        let mut done = 0usize;
        while done < data.len() {
            let a = iova
                .checked_add(done as u64)
                .ok_or(DmaFault { iova, write: true })?;
            let n = ((PAGE - a % PAGE) as usize).min(data.len() - done);
            match self.host(a, n as u64, true)? {
                // SAFETY: `p` points at `n` writable bytes of the mapping (checked by `host`).
                Some(p) => unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), p, n) },
                None => self.by_message(a, &mut [], Some(&data[done..done + n]))?,
            }
            if let Some(d) = self.dirty.as_mut() {
                d.insert(a / PAGE);
            }
            done += n;
        }
        Ok(())
    }

    /// One transfer by message: a read into `out`, or a write of `data`.
    fn by_message(
        &mut self,
        iova: u64,
        out: &mut [u8],
        data: Option<&[u8]>,
    ) -> Result<(), DmaFault> {
        let fault = DmaFault {
            iova,
            write: data.is_some(),
        };
        let Some(h) = self.messages.as_ref() else {
            return Err(fault);
        };
        let r = match data {
            Some(d) => h.write(iova, d),
            None => h.read(iova, out),
        };
        match r {
            Ok(()) => {
                if data.is_some() {
                    self.message_counts.1 += 1;
                } else {
                    self.message_counts.0 += 1;
                }
                Ok(())
            }
            Err(e) => {
                log::debug!("dma-test-device: the VMM refused a DMA message at {iova:#x}: {e}");
                self.message_counts.2 += 1;
                self.iommu_refused = Some(fault);
                Err(fault)
            }
        }
    }

    /// Starts (clearing the log) or stops dirty tracking.
    pub fn set_tracking(&mut self, on: bool) {
        self.dirty = on.then(BTreeSet::new);
    }

    /// Whether dirty tracking is on.
    pub fn tracking(&self) -> bool {
        self.dirty.is_some()
    }

    /// Writes the dirty bits of `[iova, iova + pages * 4 KiB)` into `bitmap` (bit `i` = page
    /// `iova / 4096 + i`), clearing them when `clear`.
    pub fn dirty_bitmap(&mut self, iova: u64, pages: u64, bitmap: &mut [u8], clear: bool) {
        bitmap.fill(0);
        let Some(d) = self.dirty.as_mut() else { return };
        let first = iova / PAGE;
        let hits: Vec<u64> = d
            .range(first..first.saturating_add(pages))
            .copied()
            .collect();
        for p in hits {
            let i = (p - first) as usize;
            if let Some(b) = bitmap.get_mut(i / 8) {
                *b |= 1 << (i % 8);
            }
            if clear {
                d.remove(&p);
            }
        }
    }

    /// All dirty pages (for migration of the device state).
    pub fn dirty_pages(&self) -> Vec<u64> {
        self.dirty.iter().flatten().copied().collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::*;

    /// A zeroed file of `len` bytes, unlinked (for DMA tests).
    pub(crate) fn memfile(len: usize) -> File {
        // One name per call: tests run in parallel and may ask for the same length.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("dma-{}-{len}-{n}", std::process::id()));
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        std::fs::remove_file(p).unwrap();
        f
    }

    #[test]
    fn permissions_splits_and_dirty_log() {
        let f = memfile(64 << 10);
        let mut d = DmaSpace::default();
        d.map(0x10000, 0x4000, Some(f.try_clone().unwrap()), 0, true, true)
            .unwrap();
        d.map(
            0x20000,
            0x1000,
            Some(f.try_clone().unwrap()),
            0x8000,
            true,
            false,
        )
        .unwrap();
        assert_eq!(
            d.map(0x11000, 0x1000, Some(f.try_clone().unwrap()), 0, true, true)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        assert!(d
            .map(
                0x30000,
                0x1000,
                Some(f.try_clone().unwrap()),
                1 << 20,
                true,
                true
            )
            .is_err());
        d.set_tracking(true);
        d.write(0x10ff0, &[7u8; 32]).unwrap();
        let mut b = [0u8; 32];
        d.read(0x10ff0, &mut b).unwrap();
        assert_eq!(b, [7; 32]);
        assert_eq!(
            d.write(0x20000, &[1]),
            Err(DmaFault {
                iova: 0x20000,
                write: true
            })
        );
        assert_eq!(
            d.write(0x13ff0, &[1; 32]),
            Err(DmaFault {
                iova: 0x14000,
                write: true
            })
        );
        let mut bm = [0u8; 1];
        d.dirty_bitmap(0x10000, 8, &mut bm, true);
        assert_eq!(bm[0], 0b1011, "pages 0x10, 0x11 and 0x13 were written");
        d.dirty_bitmap(0x10000, 8, &mut bm, false);
        assert_eq!(bm[0], 0);
        d.unmap(0x11000, 0x1000);
        assert!(d.read(0x11000, &mut [0u8; 1]).is_err());
        assert!(d.read(0x10000, &mut [0u8; 1]).is_ok());
        assert!(d.read(0x12000, &mut [0u8; 1]).is_ok());
        assert_eq!(d.len(), 3);
    }
}
