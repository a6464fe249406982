//! The test device behind the `vfio_user` crate's `Server`.

use std::fs::File;
use std::io;
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_MIGRATION_STOP_COPY, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::server_ext::ServerCapabilities;
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

use devices::passthrough::vfio_user::caps::ext;

use super::engine::{lock, TestDevice};
use super::*;

const CONFIG_REGION: u32 = 7;

/// The PCI configuration space the device reports (region 7): IDs, class "other", BAR 0 as
/// a 32-bit memory BAR. The VMM builds the guest-visible config space from it.
fn config_space() -> [u8; 256] {
    let mut c = [0u8; 256];
    c[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
    c[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
    c[8] = 1; // revision
    c[0x0b] = 0xff; // class: unassigned
    c[0x2c..0x2e].copy_from_slice(&VENDOR_ID.to_le_bytes());
    c[0x2e..0x30].copy_from_slice(&DEVICE_ID.to_le_bytes());
    c
}

struct Backend {
    dev: TestDevice,
    no_migration: bool,
    truncate_ram: bool,
    /// BAR 2's memory, and the accesses to it that came as messages.
    bar2: File,
    bar2_messages: u64,
    doorbell_messages: u64,
    dirty_log: DirtyLogMode,
    /// Bytes of the migration data stream read or written since the last state change.
    mig_cursor: u64,
}

/// How the device's DMA log (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`) behaves
/// (`dma-test-device --dirty-log`): a correct log, none (the feature is not offered, so the
/// VMM knows the device is untracked), or one that claims to track and always reports nothing (a broken device the VMM cannot tell from an idle one;
/// only a RAM comparison at switch-over shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyLogMode {
    /// Pages written by DMA are reported.
    #[default]
    On,
    /// Dirty tracking cannot be enabled.
    Off,
    /// Tracking can be enabled; every report is empty.
    Empty,
}

impl std::str::FromStr for DirtyLogMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            "empty" => Ok(Self::Empty),
            other => Err(format!("`{other}`: expected on, off or empty")),
        }
    }
}

fn region(index: u32, size: u64) -> ServerRegion {
    ServerRegion {
        region_info: vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            flags: if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            },
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    }
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), io::Error> {
        match region {
            0 if offset == regs::BAR2_MESSAGES || offset == regs::DOORBELL_MESSAGES => {
                let v = if offset == regs::BAR2_MESSAGES {
                    self.bar2_messages
                } else {
                    self.doorbell_messages
                };
                let n = data.len().min(8);
                data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
            0 => self.dev.bar_read(offset, data),
            2 => {
                self.bar2_messages += 1;
                std::os::unix::fs::FileExt::read_exact_at(&self.bar2, data, offset)?;
            }
            CONFIG_REGION => {
                let c = config_space();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = c.get(offset as usize + i).copied().unwrap_or(0);
                }
            }
            REGION_FAULT_LOG => self.dev.fault_log_read(offset, data),
            REGION_PAGE_REQUEST => self.dev.prq_read(offset, data),
            _ => data.fill(0),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let le = |d: &[u8]| {
            let mut b = [0u8; 8];
            b[..d.len().min(8)].copy_from_slice(&d[..d.len().min(8)]);
            u64::from_le_bytes(b)
        };
        match region {
            0 => {
                if offset == regs::DOORBELL {
                    self.doorbell_messages += 1;
                }
                self.dev.bar_write(offset, data);
            }
            2 => {
                self.bar2_messages += 1;
                std::os::unix::fs::FileExt::write_all_at(&self.bar2, data, offset)?;
            }
            REGION_FAULT_LOG if offset == 0 => self.dev.fault_log_consume(le(data) as u32),
            REGION_PAGE_REQUEST => self.dev.prq_write(offset, le(data)),
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), io::Error> {
        if let (true, Some(f)) = (self.truncate_ram, fd.as_ref()) {
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            match f.set_len(size / 2) {
                Ok(()) => log::warn!("dma-test-device: truncated the guest RAM file to half"),
                Err(e) => log::warn!("dma-test-device: truncating the guest RAM file: {e}"),
            }
        }
        // Without a file descriptor the mapping is reached by DMA_READ/DMA_WRITE messages.
        self.dev.dma().map(
            address,
            size,
            fd,
            offset,
            flags.contains(DmaMapFlags::READ),
            flags.contains(DmaMapFlags::WRITE),
        )
    }

    fn dma_unmap(
        &mut self,
        flags: DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> Result<(), io::Error> {
        if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            self.dev.dma().clear();
        } else {
            self.dev.dma().unmap(address, size);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), io::Error> {
        self.dev.reset();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        start: u32,
        _count: u32,
        fds: Vec<File>,
    ) -> Result<(), io::Error> {
        self.dev.set_irqs(index, start, fds);
        Ok(())
    }

    fn connected(&mut self, dma: vfio_user::server_ext::DmaHandle) {
        self.dev.dma().set_messages(dma);
    }

    fn region_io_fds(
        &mut self,
        region: u32,
    ) -> Result<Vec<vfio_user::server_ext::IoEventFd>, io::Error> {
        if region != 0 {
            return Ok(Vec::new());
        }
        Ok(vec![vfio_user::server_ext::IoEventFd {
            offset: regs::DOORBELL,
            size: 4,
            fd: self.dev.doorbell_eventfd()?,
            flags: 0,
            datamatch: 0,
        }])
    }

    fn migration_flags(&self) -> Option<u64> {
        (!self.no_migration).then_some(u64::from(VFIO_MIGRATION_STOP_COPY))
    }

    fn mig_state(&mut self) -> Result<u32, io::Error> {
        Ok(self.dev.migration_state())
    }

    fn set_mig_state(&mut self, state: u32) -> Result<(), io::Error> {
        self.dev
            .set_migration_state(state)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.mig_cursor = 0;
        Ok(())
    }

    fn mig_data_read(&mut self, size: u32) -> Result<Vec<u8>, io::Error> {
        if self.dev.migration_state() != mig::STOP_COPY {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let left = self
            .dev
            .migration_data_size()
            .saturating_sub(self.mig_cursor);
        let mut data = vec![0u8; left.min(u64::from(size)) as usize];
        self.dev.migration_data_read(self.mig_cursor, &mut data);
        self.mig_cursor += data.len() as u64;
        Ok(data)
    }

    fn mig_data_write(&mut self, data: &[u8]) -> Result<(), io::Error> {
        self.dev
            .migration_data_write(self.mig_cursor, data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.mig_cursor += data.len() as u64;
        Ok(())
    }

    fn dma_logging_supported(&self) -> bool {
        self.dirty_log != DirtyLogMode::Off
    }

    fn dma_logging_start(
        &mut self,
        _page_size: u64,
        _ranges: &[(u64, u64)],
    ) -> Result<u64, io::Error> {
        // Every write is logged, whatever the ranges, at 4 KiB.
        self.dev.dma().set_tracking(true);
        Ok(dma::PAGE)
    }

    fn dma_logging_stop(&mut self) -> Result<(), io::Error> {
        self.dev.dma().set_tracking(false);
        Ok(())
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), io::Error> {
        if page_size != dma::PAGE || !iova.is_multiple_of(dma::PAGE) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if !self.dev.dma().tracking() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let pages = length.div_ceil(dma::PAGE);
        let mut bytes = vec![0u8; pages.div_ceil(8) as usize];
        self.dev.dma().dirty_bitmap(iova, pages, &mut bytes, true);
        if self.dirty_log == DirtyLogMode::Empty {
            return Ok(());
        }
        for (i, b) in bytes.iter().enumerate() {
            if let Some(w) = bitmap.get_mut(i / 8) {
                *w |= u64::from(*b) << (8 * (i % 8));
            }
        }
        Ok(())
    }
}

/// How the device behaves (the `dma-test-device` flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Its DMA log.
    pub dirty_log: DirtyLogMode,
    /// It asks for unmapped pages without end once page requests are on (a hostile device).
    pub flood_page_requests: bool,
    /// It writes where its mappings are read-only (a hostile device: only the VMM's checks,
    /// under `dma=messages`, stop it).
    pub ignore_permissions: bool,
    /// It offers no migration (`VFIO_DEVICE_FEATURE_MIGRATION` refused).
    pub no_migration: bool,
    /// It tries to truncate the guest-RAM file it is given (a hostile peer: the VMM seals the
    /// file's size, so the attempt fails and the device goes on).
    pub truncate_ram: bool,
}

/// BAR 2's memory: a memfd of [`BAR2_SIZE`] bytes with [`BAR2_MAGIC`] at 0, its size sealed
/// (the VMM maps it into the guest).
fn bar2_memory() -> io::Result<File> {
    let f = devices::memfd::sealed("dma-test-device-bar2", BAR2_SIZE, false)?;
    std::os::unix::fs::FileExt::write_all_at(&f, &BAR2_MAGIC.to_le_bytes(), 0)?;
    Ok(f)
}

/// Serves one VMM on the socket at `path` until it disconnects.
///
/// # Errors
/// When the socket cannot be bound or the connection fails.
pub fn serve(path: &Path, how: Behaviour) -> Result<(), vfio_user::Error> {
    let Behaviour {
        dirty_log,
        flood_page_requests: flood,
        ignore_permissions,
        no_migration,
        truncate_ram,
    } = how;
    let mut regions: Vec<ServerRegion> = (0..13u32).map(|i| region(i, 0)).collect();
    regions[0] = region(0, BAR0_SIZE);
    regions[CONFIG_REGION as usize] = region(CONFIG_REGION, 256);
    regions[REGION_FAULT_LOG as usize] = region(REGION_FAULT_LOG, 0x1000);
    regions[REGION_PAGE_REQUEST as usize] = region(REGION_PAGE_REQUEST, 0x1000);
    let bar2 = bar2_memory().map_err(vfio_user::Error::Backend)?;
    let mut r2 = region(2, BAR2_SIZE);
    r2.region_info.flags |= VFIO_REGION_INFO_FLAG_MMAP;
    r2.sparse_areas = vec![vfio_user::SparseArea {
        area: vfio_bindings::bindings::vfio::vfio_region_sparse_mmap_area {
            offset: 0,
            size: BAR2_SIZE,
        },
    }];
    r2.mmap_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&bar2));
    regions[2] = r2;
    let irq = |index: u32, count: u32| IrqInfo {
        index,
        flags: VFIO_IRQ_INFO_EVENTFD,
        count,
    };
    let irqs = vec![
        irq(0, 0),
        irq(1, 0),
        irq(2, MSIX_VECTORS),
        irq(3, 1),
        irq(4, 0),
    ];
    // The extensions the VMM may use: named in VERSION, found by name, never by identity.
    let mut caps = ServerCapabilities::default();
    let named = |region: Option<u32>| match region {
        Some(r) => serde_json::json!({ "region": r }),
        None => serde_json::json!({}),
    };
    caps.extra
        .insert(ext::FAULT_LOG.into(), named(Some(REGION_FAULT_LOG)));
    caps.extra
        .insert(ext::PAGE_REQUEST.into(), named(Some(REGION_PAGE_REQUEST)));
    caps.extra.insert(ext::SPLIT_UNMAP.into(), named(None));
    let server = Server::new(path, true, irqs, regions)?.with_capabilities(caps);
    let mut backend = Backend {
        dev: TestDevice::new(),
        no_migration,
        truncate_ram,
        bar2,
        bar2_messages: 0,
        doorbell_messages: 0,
        dirty_log,
        mig_cursor: 0,
    };
    if flood {
        backend.dev.start_flood();
    }
    backend.dev.dma().ignore_permissions = ignore_permissions;
    // The doorbell's thread starts (and installs its own filter) before this thread's filter,
    // which it would otherwise inherit.
    backend
        .dev
        .doorbell_eventfd()
        .map_err(vfio_user::Error::Backend)?;
    devices::seccomp::confine("dma-test-device", crate::seccomp::SERVER);
    let r = server.run(&mut backend);
    let (maps, unmaps, (reads, writes, refused)) = {
        let d = lock(&backend.dev.shared.dma);
        (d.map_calls, d.unmap_calls, d.message_counts)
    };
    log::info!(
        "dma-test-device: client gone after {maps} DMA_MAP and {unmaps} DMA_UNMAP; \
         {reads} DMA_READ and {writes} DMA_WRITE messages, {refused} refused"
    );
    r
}
