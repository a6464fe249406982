//! A vfio-user device as a passthrough backend: its regions and interrupts for the PCI model,
//! and its DMA mappings for the IOMMU (guest memory shared by memfd, each guest mapping one
//! DMA_MAP with the mapping's permissions).

use std::fs::File;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use iommu::{BackendCaps, BackendError, DmaBackend, Perm};

use super::vfio_user::{VfioUserClient, VfioUserError, DMA_MAP_READ, DMA_MAP_WRITE};
use super::{PassthroughBackend, PassthroughError, Region};
use crate::testdev;

/// How long the VMM waits for a device process to answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A shared connection to a vfio-user device, marked failed on the first socket error.
#[derive(Clone)]
pub struct VfioUserDevice {
    client: Arc<Mutex<VfioUserClient>>,
    path: String,
    failed: Arc<AtomicBool>,
    ids: (u16, u16),
}

impl VfioUserDevice {
    /// Connects to the device served at `socket`.
    ///
    /// # Errors
    /// [`VfioUserError`] when the server cannot be reached or answers badly.
    pub fn connect(socket: &Path) -> Result<Self, VfioUserError> {
        let mut client = VfioUserClient::connect(socket, REPLY_TIMEOUT)?;
        let mut ids = [0u8; 4];
        if client.regions().len() > super::VFIO_PCI_CONFIG_REGION_INDEX as usize {
            client.region_read(super::VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut ids)?;
        }
        Ok(Self {
            client: Arc::new(Mutex::new(client)),
            path: socket.display().to_string(),
            failed: Arc::new(AtomicBool::new(false)),
            ids: (
                u16::from_le_bytes([ids[0], ids[1]]),
                u16::from_le_bytes([ids[2], ids[3]]),
            ),
        })
    }

    /// The socket, to watch for the device process hanging up.
    pub fn socket_fd(&self) -> RawFd {
        self.lock().socket_fd()
    }

    /// The failure flag shared with the PCI model and the DMA backend.
    pub fn failed_flag(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    /// Whether the device is the project's DMA test device.
    pub fn is_test_device(&self) -> bool {
        self.ids == (testdev::VENDOR_ID, testdev::DEVICE_ID)
    }

    fn lock(&self) -> MutexGuard<'_, VfioUserClient> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn map_err(&self, e: VfioUserError) -> PassthroughError {
        match e {
            VfioUserError::Io(_) | VfioUserError::Protocol { .. } => {
                self.failed.store(true, Ordering::Release);
                PassthroughError::Failed(format!("vfio-user {}: {e}", self.path))
            }
            other => PassthroughError::Refused(other.to_string()),
        }
    }

    /// Reads the device's fault log (test device region 9) and clears it: `(iova, write)`.
    ///
    /// # Errors
    /// [`PassthroughError`].
    pub fn take_faults(&self) -> Result<Vec<(u64, bool)>, PassthroughError> {
        let mut c = self.lock();
        if c.regions()
            .get(testdev::REGION_FAULT_LOG as usize)
            .is_none_or(|r| r.size < 8)
        {
            return Ok(Vec::new());
        }
        let mut head = [0u8; 8];
        c.region_read(testdev::REGION_FAULT_LOG, 0, &mut head)
            .map_err(|e| self.map_err(e))?;
        let n = (u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize)
            .min(testdev::FAULT_LOG_RECORDS);
        let mut recs = vec![0u8; 16 * n];
        c.region_read(testdev::REGION_FAULT_LOG, 8, &mut recs)
            .map_err(|e| self.map_err(e))?;
        // Only the records read: one the device logs meanwhile stays for the next read.
        c.region_write(testdev::REGION_FAULT_LOG, 0, &(n as u32).to_le_bytes())
            .map_err(|e| self.map_err(e))?;
        Ok(recs
            .chunks(16)
            .map(|r| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&r[..8]);
                (u64::from_le_bytes(a), r[8] & 1 == 1)
            })
            .collect())
    }

    /// Turns on the test device's page requests ([`testdev::REGION_PAGE_REQUEST`]): its
    /// transfers then wait for [`VfioUserDevice::answer_page_request`] on a miss. False for
    /// a device without the region.
    ///
    /// # Errors
    /// When the device process does not answer.
    pub fn enable_page_requests(&self) -> Result<bool, PassthroughError> {
        let mut c = self.lock();
        if c.regions()
            .get(testdev::REGION_PAGE_REQUEST as usize)
            .is_none_or(|r| r.size < 0x40)
        {
            return Ok(false);
        }
        c.region_write(testdev::REGION_PAGE_REQUEST, 0, &1u32.to_le_bytes())
            .map_err(|e| self.map_err(e))?;
        let mut on = [0u8; 4];
        c.region_read(testdev::REGION_PAGE_REQUEST, 0, &mut on)
            .map_err(|e| self.map_err(e))?;
        Ok(on[0] & 1 == 1)
    }

    /// The device's pending page request `(id, iova, write)`, if any.
    ///
    /// # Errors
    /// When the device process does not answer.
    pub fn take_page_request(&self) -> Result<Option<(u32, u64, bool)>, PassthroughError> {
        let mut r = [0u8; 0x18];
        self.lock()
            .region_read(testdev::REGION_PAGE_REQUEST, 0, &mut r)
            .map_err(|e| self.map_err(e))?;
        let u32_at = |o: usize| u32::from_le_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
        if u32_at(4) != 1 {
            return Ok(None);
        }
        let mut iova = [0u8; 8];
        iova.copy_from_slice(&r[8..16]);
        Ok(Some((
            u32_at(0x14),
            u64::from_le_bytes(iova),
            u32_at(0x10) & 1 == 1,
        )))
    }

    /// Answers page request `id` with [`testdev::PRQ_RETRY`] or [`testdev::PRQ_INVALID`].
    ///
    /// # Errors
    /// When the device process does not answer.
    pub fn answer_page_request(&self, id: u32, code: u32) -> Result<(), PassthroughError> {
        let v = u64::from(id) | (u64::from(code) << 32);
        self.lock()
            .region_write(testdev::REGION_PAGE_REQUEST, 0x18, &v.to_le_bytes())
            .map_err(|e| self.map_err(e))
    }

    /// The device's page-request counters: requests, retries, invalid answers, timeouts.
    ///
    /// # Errors
    /// When the device process does not answer.
    pub fn page_request_counters(&self) -> Result<[u64; 4], PassthroughError> {
        let mut r = [0u8; 32];
        self.lock()
            .region_read(testdev::REGION_PAGE_REQUEST, 0x20, &mut r)
            .map_err(|e| self.map_err(e))?;
        let mut out = [0u64; 4];
        for (i, o) in out.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&r[8 * i..8 * i + 8]);
            *o = u64::from_le_bytes(b);
        }
        Ok(out)
    }
}

impl PassthroughBackend for VfioUserDevice {
    fn describe(&self) -> String {
        format!("vfio-user {}", self.path)
    }

    fn region(&self, index: u32) -> Option<Region> {
        self.lock()
            .regions()
            .get(index as usize)
            .map(|r| Region { size: r.size })
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), PassthroughError> {
        let r = self.lock().region_read(index, offset, data);
        r.map_err(|e| self.map_err(e))
    }

    fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PassthroughError> {
        let r = self.lock().region_write(index, offset, data);
        r.map_err(|e| self.map_err(e))
    }

    fn irq_count(&mut self, index: u32) -> Result<u32, PassthroughError> {
        let mut c = self.lock();
        if index >= c.num_irqs() {
            return Ok(0);
        }
        let r = c.irq_info(index);
        drop(c);
        r.map(|i| i.count).map_err(|e| self.map_err(e))
    }

    fn set_irqs(&mut self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), PassthroughError> {
        let r = self.lock().set_irqs(index, start, fds);
        r.map_err(|e| self.map_err(e))
    }

    fn reset(&mut self) -> Result<(), PassthroughError> {
        let r = self.lock().reset();
        r.map_err(|e| self.map_err(e))
    }

    fn supports_migration(&self) -> bool {
        self.is_test_device()
    }

    fn set_migration_state(&mut self, state: u32) -> Result<(), PassthroughError> {
        if !self.is_test_device() {
            return Err(PassthroughError::Refused(format!(
                "{} does not support migration",
                self.describe()
            )));
        }
        let r = self
            .lock()
            .region_write(testdev::REGION_MIGRATION, 0, &state.to_le_bytes());
        r.map_err(|e| self.map_err(e))
    }

    fn read_migration_data(&mut self) -> Result<Vec<u8>, PassthroughError> {
        let mut size = [0u8; 8];
        let r = self
            .lock()
            .region_read(testdev::REGION_MIGRATION, 8, &mut size);
        r.map_err(|e| self.map_err(e))?;
        let size = u64::from_le_bytes(size);
        if size > testdev::MIGRATION_DATA_SIZE {
            return Err(PassthroughError::Refused(format!(
                "device data of {size} bytes is larger than its window"
            )));
        }
        let mut data = vec![0u8; size as usize];
        for (k, chunk) in data.chunks_mut(4096).enumerate() {
            let r = self.lock().region_read(
                testdev::REGION_MIGRATION,
                testdev::MIGRATION_DATA_OFFSET + 4096 * k as u64,
                chunk,
            );
            r.map_err(|e| self.map_err(e))?;
        }
        Ok(data)
    }

    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), PassthroughError> {
        if data.len() as u64 > testdev::MIGRATION_DATA_SIZE {
            return Err(PassthroughError::Refused(format!(
                "device data of {} bytes is larger than the window",
                data.len()
            )));
        }
        for (k, chunk) in data.chunks(4096).enumerate() {
            let r = self.lock().region_write(
                testdev::REGION_MIGRATION,
                testdev::MIGRATION_DATA_OFFSET + 4096 * k as u64,
                chunk,
            );
            r.map_err(|e| self.map_err(e))?;
        }
        Ok(())
    }
}

/// Guest RAM as a device process maps it: `(GPA, bytes, memfd offset)` ranges of one memfd.
#[derive(Clone)]
pub struct SharedRam {
    /// The memfd.
    pub memfd: Arc<File>,
    /// Ranges `(gpa, len, file offset)`.
    pub ranges: Vec<(u64, u64, u64)>,
}

impl SharedRam {
    /// The memfd offset of `[gpa, gpa + len)`, which must lie in one RAM range.
    pub fn offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        self.ranges
            .iter()
            .find(|&&(g, l, _)| gpa >= g && end <= g + l)
            .map(|&(g, _, off)| off + (gpa - g))
    }
}

/// The DMA side of a vfio-user device, for the IOMMU.
pub struct VfioUserDma {
    dev: VfioUserDevice,
    ram: SharedRam,
    /// Host (device-side) mapping calls made.
    pub calls: Arc<Mutex<(u64, u64)>>,
    /// Merge contiguous guest maps when the device allows it.
    merge: bool,
}

impl VfioUserDma {
    /// The DMA backend of `dev` over `ram`.
    pub fn new(dev: VfioUserDevice, ram: SharedRam) -> Self {
        Self {
            dev,
            ram,
            calls: Arc::new(Mutex::new((0, 0))),
            merge: true,
        }
    }

    /// The same backend with one host map per guest MAP, even where merging is allowed.
    pub fn without_merging(mut self) -> Self {
        self.merge = false;
        self
    }

    fn err(&self, e: VfioUserError) -> BackendError {
        match e {
            VfioUserError::Refused { errno, .. }
                if errno == libc::ENOMEM as u32 || errno == libc::ENOSPC as u32 =>
            {
                BackendError::NoMemory(e.to_string())
            }
            VfioUserError::Io(_) | VfioUserError::Protocol { .. } => {
                self.dev.failed.store(true, Ordering::Release);
                BackendError::Failed(e.to_string())
            }
            other => BackendError::Failed(other.to_string()),
        }
    }

    fn failed(&self) -> bool {
        self.dev.failed.load(Ordering::Acquire)
    }
}

impl DmaBackend for VfioUserDma {
    fn name(&self) -> String {
        self.dev.describe()
    }

    fn caps(&self) -> BackendCaps {
        // The project's test device keeps page-granular mappings and splits them on unmap,
        // so contiguous guest mappings may be merged; other servers need exact unmaps.
        let ours = self.dev.is_test_device();
        BackendCaps {
            dirty_tracking: ours,
            merge_maps: ours && self.merge,
            merge_unmaps: ours && self.merge,
            ..Default::default()
        }
    }

    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), BackendError> {
        // A dead device's mappings no longer matter: keep the guest's view consistent.
        if self.failed() {
            return Ok(());
        }
        let offset = self
            .ram
            .offset_of(gpa, len)
            .ok_or_else(|| BackendError::BadAddress(format!("GPA {gpa:#x}+{len:#x} is not RAM")))?;
        let mut flags = 0;
        if perm.read() {
            flags |= DMA_MAP_READ;
        }
        if perm.write() {
            flags |= DMA_MAP_WRITE;
        }
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        let r = self
            .dev
            .lock()
            .dma_map(iova, len, self.ram.memfd.as_ref(), offset, flags);
        r.map_err(|e| self.err(e))
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError> {
        if self.failed() {
            return Ok(());
        }
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).1 += 1;
        let r = self.dev.lock().dma_unmap(iova, len);
        r.map_err(|e| self.err(e))
    }

    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), BackendError> {
        if !self.dev.is_test_device() {
            return Err(BackendError::Unsupported);
        }
        let r = self.dev.lock().region_write(
            testdev::REGION_DIRTY_LOG,
            0,
            &u32::from(enable).to_le_bytes(),
        );
        r.map_err(|e| self.err(e))
    }

    fn unmap_read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
    ) -> Result<(), BackendError> {
        // The test device logs writes by IOVA and keeps the log across an unmap: unmapping
        // first and reading after leaves no window for a lost write.
        iommu::backend::unmap_then_read_dirty(self, iova, len, bitmap)
    }

    fn read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), BackendError> {
        if !self.dev.is_test_device() {
            return Err(BackendError::Unsupported);
        }
        let pages = len / 4096;
        let window_pages = testdev::DIRTY_BITMAP_SIZE * 8;
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(window_pages);
            let mut raw = vec![0u8; n.div_ceil(8) as usize];
            {
                let mut c = self.dev.lock();
                let q = |c: &mut VfioUserClient, off: u64, v: u64| {
                    c.region_write(testdev::REGION_DIRTY_LOG, off, &v.to_le_bytes())
                };
                q(&mut c, 8, iova + done * 4096)
                    .and_then(|()| q(&mut c, 16, n))
                    .and_then(|()| q(&mut c, 24, u64::from(clear)))
                    .and_then(|()| {
                        c.region_read(
                            testdev::REGION_DIRTY_LOG,
                            testdev::DIRTY_BITMAP_OFFSET,
                            &mut raw,
                        )
                    })
                    .map_err(|e| self.err(e))?;
            }
            for (i, b) in raw.iter().enumerate() {
                for bit in 0..8 {
                    if b & (1 << bit) != 0 {
                        let page = done + (i * 8 + bit) as u64;
                        if let Some(w) = bitmap.get_mut((page / 64) as usize) {
                            *w |= 1 << (page % 64);
                        }
                    }
                }
            }
            done += n;
        }
        Ok(())
    }
}
