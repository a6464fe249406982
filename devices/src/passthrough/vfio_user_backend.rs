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
use sync::MutexExt;

use super::message_dma::MessageDma;
use super::vfio_user::caps::ext;
use super::vfio_user::{
    MigrationFeature, VfioUserClient, VfioUserError, DMA_MAP_READ, DMA_MAP_WRITE,
};
use super::{MmapArea, PassthroughBackend, PassthroughError, Region};

/// Page size of the DMA logs the VMM asks for (the vIOMMU's granule).
const PAGE: u64 = 4096;

/// How long the VMM waits for a device process to answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Records a fault log holds ([`ext::FAULT_LOG`]).
pub const FAULT_LOG_RECORDS: usize = 64;

/// What a server offers beyond BARs, interrupts and DMA maps, learnt once at connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerFeatures {
    /// `VFIO_DEVICE_FEATURE_MIGRATION` with at least STOP_COPY.
    pub migration: Option<MigrationFeature>,
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_*`.
    pub dma_logging: bool,
    /// The region of the [`ext::FAULT_LOG`] extension.
    pub fault_log: Option<u32>,
    /// The region of the [`ext::PAGE_REQUEST`] extension.
    pub page_request: Option<u32>,
    /// The [`ext::SPLIT_UNMAP`] extension.
    pub split_unmap: bool,
}

/// A shared connection to a vfio-user device, marked failed on the first socket error.
#[derive(Clone)]
pub struct VfioUserDevice {
    client: Arc<Mutex<VfioUserClient>>,
    path: String,
    failed: Arc<AtomicBool>,
    features: ServerFeatures,
}

impl VfioUserDevice {
    /// Connects to the device served at `socket`.
    ///
    /// # Errors
    /// [`VfioUserError`] when the server cannot be reached or answers badly.
    pub fn connect(socket: &Path) -> Result<Self, VfioUserError> {
        let mut client = VfioUserClient::connect(socket, REPLY_TIMEOUT)?;
        let caps = client.caps().clone();
        let region = |name: &str| {
            caps.extension_region(name)
                .filter(|&r| client.regions().get(r as usize).is_some_and(|i| i.size > 0))
        };
        let (fault_log, page_request) = (region(ext::FAULT_LOG), region(ext::PAGE_REQUEST));
        let migration = client.migration_feature()?.filter(|m| m.stop_copy());
        let dma_logging = client.dma_logging_supported()?;
        Ok(Self {
            client: Arc::new(Mutex::new(client)),
            path: socket.display().to_string(),
            failed: Arc::new(AtomicBool::new(false)),
            features: ServerFeatures {
                migration,
                dma_logging,
                fault_log,
                page_request,
                split_unmap: caps.has_extension(ext::SPLIT_UNMAP),
            },
        })
    }

    /// What the server offers.
    pub fn features(&self) -> ServerFeatures {
        self.features
    }

    /// Answers the DMA_READ/DMA_WRITE commands the server sent between requests.
    ///
    /// # Errors
    /// [`PassthroughError::Failed`] when the server broke the protocol or went away.
    pub fn serve_server_commands(&self) -> Result<usize, PassthroughError> {
        let r = self.lock().serve_server_commands();
        r.map_err(|e| self.map_err(e))
    }

    /// The socket, to watch for the device process hanging up.
    pub fn socket_fd(&self) -> RawFd {
        self.lock().socket_fd()
    }

    /// The failure flag shared with the PCI model and the DMA backend.
    pub fn failed_flag(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    fn lock(&self) -> MutexGuard<'_, VfioUserClient> {
        self.client.locked()
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

    /// Reads the device's fault log ([`ext::FAULT_LOG`], when the server offers it) and
    /// clears what it read: `(iova, write)`.
    ///
    /// # Errors
    /// [`PassthroughError`].
    pub fn take_faults(&self) -> Result<Vec<(u64, bool)>, PassthroughError> {
        let Some(log) = self.features.fault_log else {
            return Ok(Vec::new());
        };
        let mut c = self.lock();
        let mut head = [0u8; 8];
        c.region_read(log, 0, &mut head)
            .map_err(|e| self.map_err(e))?;
        let n = (u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize)
            .min(FAULT_LOG_RECORDS);
        let mut recs = vec![0u8; 16 * n];
        c.region_read(log, 8, &mut recs)
            .map_err(|e| self.map_err(e))?;
        // Only the records read: one the device logs meanwhile stays for the next read.
        c.region_write(log, 0, &(n as u32).to_le_bytes())
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

    /// Turns on the device's page requests ([`ext::PAGE_REQUEST`]): its transfers then
    /// wait for [`VfioUserDevice::answer_page_request`] on a miss. False for a server
    /// without the extension.
    ///
    /// # Errors
    /// When the device process does not answer.
    pub fn enable_page_requests(&self) -> Result<bool, PassthroughError> {
        let Some(prq) = self.features.page_request else {
            return Ok(false);
        };
        let mut c = self.lock();
        if c.regions().get(prq as usize).is_none_or(|r| r.size < 0x40) {
            return Ok(false);
        }
        c.region_write(prq, 0, &1u32.to_le_bytes())
            .map_err(|e| self.map_err(e))?;
        let mut on = [0u8; 4];
        c.region_read(prq, 0, &mut on)
            .map_err(|e| self.map_err(e))?;
        Ok(on[0] & 1 == 1)
    }

    fn prq_region(&self) -> Result<u32, PassthroughError> {
        self.features
            .page_request
            .ok_or_else(|| PassthroughError::Refused(format!("{}: no page requests", self.path)))
    }

    /// The device's pending page request `(id, iova, write)`, if any.
    ///
    /// # Errors
    /// When the device process does not answer.
    pub fn take_page_request(&self) -> Result<Option<(u32, u64, bool)>, PassthroughError> {
        let mut r = [0u8; 0x18];
        let prq = self.prq_region()?;
        self.lock()
            .region_read(prq, 0, &mut r)
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

    /// Answers page request `id` with [`ext::PRQ_RETRY`] or [`ext::PRQ_INVALID`].
    ///
    /// # Errors
    /// When the device process does not answer.
    pub fn answer_page_request(&self, id: u32, code: u32) -> Result<(), PassthroughError> {
        let v = u64::from(id) | (u64::from(code) << 32);
        let prq = self.prq_region()?;
        self.lock()
            .region_write(prq, 0x18, &v.to_le_bytes())
            .map_err(|e| self.map_err(e))
    }

    /// The device's page-request counters: requests, retries, invalid answers, timeouts.
    ///
    /// # Errors
    /// When the device process does not answer.
    pub fn page_request_counters(&self) -> Result<[u64; 4], PassthroughError> {
        let mut r = [0u8; 32];
        let prq = self.prq_region()?;
        self.lock()
            .region_read(prq, 0x20, &mut r)
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

    fn mmap_areas(&self, index: u32) -> Vec<MmapArea> {
        let c = self.lock();
        let Some(m) = c.region_mmap(index) else {
            return Vec::new();
        };
        m.areas
            .iter()
            .map(|&(offset, size)| MmapArea {
                offset,
                size,
                file: m.file.clone(),
                file_offset: m.file_offset + offset,
            })
            .collect()
    }

    fn io_eventfds(&mut self, index: u32) -> Vec<(u64, Arc<vmm_sys_util::eventfd::EventFd>)> {
        let r = self.lock().region_io_fds(index);
        match r {
            Ok(subs) => subs
                .into_iter()
                .filter_map(|(offset, _, datamatch, file)| {
                    if datamatch.is_some() {
                        log::debug!(
                            "{}: region {index} ioeventfd at {offset:#x} wants a datamatch; \
                             left to messages",
                            self.path
                        );
                        return None;
                    }
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&*file);
                    // SAFETY: `dup` of a live descriptor, checked; the new one is ours.
                    let d = unsafe { libc::dup(fd) };
                    (d >= 0).then(|| {
                        // SAFETY: `d` is a fresh descriptor nothing else owns.
                        let e = unsafe {
                            <vmm_sys_util::eventfd::EventFd as std::os::fd::FromRawFd>::from_raw_fd(
                                d,
                            )
                        };
                        (offset, Arc::new(e))
                    })
                })
                .collect(),
            Err(e) => {
                log::warn!(
                    "{}: DEVICE_GET_REGION_IO_FDS of region {index}: {e}",
                    self.path
                );
                Vec::new()
            }
        }
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
        self.features.migration.is_some()
    }

    fn set_migration_state(&mut self, state: u32) -> Result<(), PassthroughError> {
        if self.features.migration.is_none() {
            return Err(PassthroughError::Refused(format!(
                "{} does not support migration (no VFIO_DEVICE_FEATURE_MIGRATION with \
                 STOP_COPY)",
                self.describe()
            )));
        }
        let r = self.lock().set_mig_state(state);
        r.map(|_| ()).map_err(|e| self.map_err(e))
    }

    fn read_migration_data(&mut self) -> Result<Vec<u8>, PassthroughError> {
        let r = self.lock().read_mig_data();
        r.map_err(|e| self.map_err(e))
    }

    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), PassthroughError> {
        let r = self.lock().write_mig_data(data);
        r.map_err(|e| self.map_err(e))
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
    /// `dma=messages`: mappings go to the server without the RAM descriptor, and its
    /// DMA_READ/DMA_WRITE messages are answered through this table.
    messages: Option<Arc<MessageDma>>,
    /// Host (device-side) mapping calls made.
    pub calls: Arc<Mutex<(u64, u64)>>,
    /// Bytes the server has mapped now: those of successful `DMA_MAP`s less those of
    /// successful `DMA_UNMAP`s. Zero once every mapping is gone.
    pub mapped_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// Merge contiguous guest maps when the device allows it.
    merge: bool,
}

impl VfioUserDma {
    /// The DMA backend of `dev` over `ram`.
    pub fn new(dev: VfioUserDevice, ram: SharedRam) -> Self {
        Self {
            dev,
            ram,
            messages: None,
            calls: Arc::new(Mutex::new((0, 0))),
            mapped_bytes: Arc::default(),
            merge: true,
        }
    }

    /// The same backend in `dma=messages` mode: the server never gets the guest-RAM
    /// descriptor and reaches guest memory only through `table`, which this backend keeps
    /// equal to the host mappings it makes (and which the client consults for the server's
    /// DMA_READ and DMA_WRITE).
    pub fn by_messages(mut self, table: Arc<MessageDma>) -> Self {
        self.dev.lock().set_dma_access(table.clone());
        self.messages = Some(table);
        self
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
        // A server that splits mappings on a partial unmap (the `vmm-split-unmap`
        // extension) lets contiguous guest mappings be merged; others need exact unmaps.
        let f = self.dev.features;
        BackendCaps {
            dirty_tracking: f.dma_logging,
            merge_maps: f.split_unmap && self.merge,
            merge_unmaps: f.split_unmap && self.merge,
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
        self.calls.locked().0 += 1;
        if let Some(t) = &self.messages {
            let r = self.dev.lock().dma_map(iova, len, None, 0, flags);
            r.map_err(|e| self.err(e))?;
            self.mapped_bytes.fetch_add(len, Ordering::Relaxed);
            return t.map(iova, gpa, len, perm).map_err(BackendError::Failed);
        }
        let memfd: &File = &self.ram.memfd;
        let r = self
            .dev
            .lock()
            .dma_map(iova, len, Some(memfd), offset, flags);
        r.map_err(|e| self.err(e))?;
        self.mapped_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError> {
        if self.failed() {
            return Ok(());
        }
        self.calls.locked().1 += 1;
        // Messages first lose their way to the range, then the server is told.
        if let Some(t) = &self.messages {
            t.unmap(iova, len);
        }
        let r = self.dev.lock().dma_unmap(iova, len);
        r.map_err(|e| self.err(e))?;
        let _ = self
            .mapped_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some(m.saturating_sub(len))
            });
        Ok(())
    }

    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), BackendError> {
        if !self.dev.features.dma_logging {
            return Err(BackendError::Unsupported);
        }
        let r = if enable {
            // No ranges: every write is logged (the mappings change while tracking).
            self.dev.lock().dma_logging_start(PAGE, &[]).map(|_| ())
        } else {
            self.dev.lock().dma_logging_stop()
        };
        r.map_err(|e| self.err(e))
    }

    fn unmap_read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
    ) -> Result<(), BackendError> {
        // A DMA log is by IOVA and outlives the mapping (the kernel's and the test device's
        // alike): unmapping first and reading after leaves no window for a lost write.
        iommu::backend::unmap_then_read_dirty(self, iova, len, bitmap)
    }

    fn read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), BackendError> {
        // DMA_LOGGING_REPORT always clears what it reports.
        if !self.dev.features.dma_logging || !clear {
            return Err(BackendError::Unsupported);
        }
        let r = self.dev.lock().dma_logging_report(iova, len, PAGE, bitmap);
        r.map_err(|e| self.err(e))
    }
}
