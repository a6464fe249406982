//! The test device behind the `vfio_user` crate's `Server`.

use std::fs::File;
use std::io;
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

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
    query: (u64, u64, u32),
    dirty_log: DirtyLogMode,
}

/// How the device's dirty log behaves (`dma-test-device --dirty-log`): a correct log, none
/// (enabling it is refused, so the VMM knows the device is untracked), or one that claims to
/// track and always reports nothing (a broken device the VMM cannot tell from an idle one;
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
            0 => self.dev.bar_read(offset, data),
            CONFIG_REGION => {
                let c = config_space();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = c.get(offset as usize + i).copied().unwrap_or(0);
                }
            }
            REGION_FAULT_LOG => self.dev.fault_log_read(offset, data),
            REGION_PAGE_REQUEST => self.dev.prq_read(offset, data),
            REGION_DIRTY_LOG if offset >= DIRTY_BITMAP_OFFSET => {
                let (iova, pages, clear) = self.query;
                let max = (data.len() as u64) * 8;
                self.dev
                    .dma()
                    .dirty_bitmap(iova, pages.min(max), data, clear != 0);
                if self.dirty_log == DirtyLogMode::Empty {
                    data.fill(0);
                }
            }
            REGION_DIRTY_LOG => {
                data.fill(0);
                if offset == 0 {
                    data[0] = u8::from(self.dev.dma().tracking());
                }
            }
            REGION_MIGRATION if offset >= MIGRATION_DATA_OFFSET => self
                .dev
                .migration_data_read(offset - MIGRATION_DATA_OFFSET, data),
            REGION_MIGRATION => {
                let v = match offset {
                    0 => u64::from(self.dev.migration_state()),
                    8 => self.dev.migration_data_size(),
                    _ => 0,
                };
                for (i, b) in data.iter_mut().enumerate() {
                    *b = v.checked_shr(8 * i as u32).unwrap_or(0) as u8;
                }
            }
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
            0 => self.dev.bar_write(offset, data),
            REGION_FAULT_LOG if offset == 0 => self.dev.fault_log_consume(le(data) as u32),
            REGION_PAGE_REQUEST => self.dev.prq_write(offset, le(data)),
            REGION_DIRTY_LOG => match offset {
                0 if self.dirty_log == DirtyLogMode::Off && le(data) & 1 == 1 => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "this device has no dirty log (--dirty-log off)",
                    ))
                }
                0 => self.dev.dma().set_tracking(le(data) & 1 == 1),
                8 => self.query.0 = le(data),
                16 => self.query.1 = le(data),
                24 => self.query.2 = le(data) as u32,
                _ => {}
            },
            REGION_MIGRATION if offset >= MIGRATION_DATA_OFFSET => self
                .dev
                .migration_data_write(offset - MIGRATION_DATA_OFFSET, data)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
            REGION_MIGRATION if offset == 0 => self
                .dev
                .set_migration_state(le(data) as u32)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
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
        let fd = fd.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
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
}

/// Serves one VMM on the socket at `path` until it disconnects.
///
/// # Errors
/// When the socket cannot be bound or the connection fails.
pub fn serve(path: &Path, dirty_log: DirtyLogMode, flood: bool) -> Result<(), vfio_user::Error> {
    let mut regions: Vec<ServerRegion> = (0..13u32).map(|i| region(i, 0)).collect();
    regions[0] = region(0, BAR0_SIZE);
    regions[CONFIG_REGION as usize] = region(CONFIG_REGION, 256);
    regions[REGION_FAULT_LOG as usize] = region(REGION_FAULT_LOG, 0x1000);
    regions[REGION_PAGE_REQUEST as usize] = region(REGION_PAGE_REQUEST, 0x1000);
    regions[REGION_DIRTY_LOG as usize] =
        region(REGION_DIRTY_LOG, DIRTY_BITMAP_OFFSET + DIRTY_BITMAP_SIZE);
    regions[REGION_MIGRATION as usize] = region(
        REGION_MIGRATION,
        MIGRATION_DATA_OFFSET + MIGRATION_DATA_SIZE,
    );
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
    let server = Server::new(path, true, irqs, regions)?;
    let mut backend = Backend {
        dev: TestDevice::new(),
        query: (0, 0, 0),
        dirty_log,
    };
    if flood {
        backend.dev.start_flood();
    }
    crate::seccomp::confine("dma-test-device", crate::seccomp::lists::TESTDEV_SERVER);
    let r = server.run(&mut backend);
    let calls = {
        let d = lock(&backend.dev.shared.dma);
        (d.map_calls, d.unmap_calls)
    };
    log::info!(
        "dma-test-device: client gone after {} DMA_MAP and {} DMA_UNMAP",
        calls.0,
        calls.1
    );
    r
}
