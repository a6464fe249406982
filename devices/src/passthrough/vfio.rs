//! Host VFIO passthrough (`vfio-ioctls`): a PCI device bound to vfio-pci, its DMA through a
//! type1 container (`VFIO_IOMMU_MAP_DMA`) or an iommufd IOAS (`IOMMU_IOAS_MAP`).
//!
//! `vfio-ioctls` opens the device and the container or iommufd, but maps everything
//! read-write and does not report the host's page sizes or usable IOVA ranges, so this module
//! issues those ioctls itself, as the kernel's uAPI documents them
//! (`include/uapi/linux/vfio.h`, `include/uapi/linux/iommufd.h`): permissions from the guest's
//! MAP, `iova_pgsizes` and the `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE` capability (type1) or
//! `IOMMU_IOAS_IOVA_RANGES` (iommufd) fed into the vIOMMU's config.
//!
//! The development hosts have no VFIO (`CONFIG_VFIO` off): opening fails there with a message
//! saying so; the parsing and encoding below are unit-tested.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use iommu::{BackendCaps, BackendError, DmaBackend, Perm};
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::vfio_user_backend::SharedRam;
use super::{PassthroughBackend, PassthroughError, Region};
use crate::GuestMemoryMmap;

/// Why host VFIO cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostVfioError {
    /// The host lacks VFIO or the device is not set up for it.
    #[error("host VFIO unavailable: {0}")]
    Unavailable(String),
    /// A VFIO call failed.
    #[error("{0}")]
    Vfio(String),
}

const fn io(nr: u32) -> u64 {
    ((VFIO_TYPE as u64) << 8) | (VFIO_BASE + nr) as u64
}
/// `VFIO_IOMMU_GET_INFO`.
pub const VFIO_IOMMU_GET_INFO: u64 = io(12);
/// `VFIO_IOMMU_MAP_DMA`.
pub const VFIO_IOMMU_MAP_DMA: u64 = io(13);
/// `VFIO_IOMMU_UNMAP_DMA`.
pub const VFIO_IOMMU_UNMAP_DMA: u64 = io(14);
/// `IOMMU_IOAS_IOVA_RANGES` (`_IO(';', 0x84)`).
pub const IOMMU_IOAS_IOVA_RANGES: u64 = (59 << 8) | 0x84;
/// `VFIO_IOMMU_DIRTY_PAGES` (`_IO(';', 100 + 17)`).
pub const VFIO_IOMMU_DIRTY_PAGES: u64 = io(17);
/// `IOMMU_HWPT_SET_DIRTY_TRACKING` (`_IO(';', 0x8b)`).
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u64 = (59 << 8) | 0x8b;
/// `IOMMU_HWPT_GET_DIRTY_BITMAP` (`_IO(';', 0x8c)`).
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u64 = (59 << 8) | 0x8c;
/// `VFIO_IOMMU_DIRTY_PAGES_FLAG_START`.
pub const DIRTY_PAGES_START: u32 = 1 << 0;
/// `VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP`.
pub const DIRTY_PAGES_STOP: u32 = 1 << 1;
/// `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP`.
pub const DIRTY_PAGES_GET_BITMAP: u32 = 1 << 2;
/// `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`.
pub const DMA_UNMAP_GET_DIRTY_BITMAP: u32 = 1 << 0;

/// Bytes of a dirty bitmap for `len` bytes of IOVA at 4 KiB per bit, rounded to whole
/// `u64`s as the type1 driver requires.
pub fn bitmap_bytes(len: u64) -> u64 {
    (len / 4096).div_ceil(64) * 8
}

/// `VFIO_IOMMU_DIRTY_PAGES` with START or STOP (`struct vfio_iommu_type1_dirty_bitmap`).
pub fn type1_dirty_control(start: bool) -> [u8; 8] {
    let mut r = [0u8; 8];
    r[0..4].copy_from_slice(&8u32.to_le_bytes());
    let flags = if start {
        DIRTY_PAGES_START
    } else {
        DIRTY_PAGES_STOP
    };
    r[4..8].copy_from_slice(&flags.to_le_bytes());
    r
}

/// `VFIO_IOMMU_DIRTY_PAGES` with GET_BITMAP: `struct vfio_iommu_type1_dirty_bitmap` followed
/// by `struct vfio_iommu_type1_dirty_bitmap_get { iova, size, struct vfio_bitmap { pgsize,
/// size, data } }`. The kernel writes the bits of `[iova, iova + size)` to `data` and clears
/// them.
pub fn type1_dirty_get(iova: u64, size: u64, data: u64) -> [u8; 48] {
    let mut r = [0u8; 48];
    r[0..4].copy_from_slice(&48u32.to_le_bytes());
    r[4..8].copy_from_slice(&DIRTY_PAGES_GET_BITMAP.to_le_bytes());
    r[8..16].copy_from_slice(&iova.to_le_bytes());
    r[16..24].copy_from_slice(&size.to_le_bytes());
    r[24..32].copy_from_slice(&4096u64.to_le_bytes());
    r[32..40].copy_from_slice(&bitmap_bytes(size).to_le_bytes());
    r[40..48].copy_from_slice(&data.to_le_bytes());
    r
}

/// `VFIO_IOMMU_UNMAP_DMA` with `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`: `struct
/// vfio_iommu_type1_dma_unmap { argsz, flags, iova, size }` followed by `struct vfio_bitmap`.
/// The kernel unmaps and returns, atomically, the pages written until then.
pub fn type1_unmap_dirty(iova: u64, size: u64, data: u64) -> [u8; 48] {
    let mut r = [0u8; 48];
    r[0..4].copy_from_slice(&48u32.to_le_bytes());
    r[4..8].copy_from_slice(&DMA_UNMAP_GET_DIRTY_BITMAP.to_le_bytes());
    r[8..16].copy_from_slice(&iova.to_le_bytes());
    r[16..24].copy_from_slice(&size.to_le_bytes());
    r[24..32].copy_from_slice(&4096u64.to_le_bytes());
    r[32..40].copy_from_slice(&bitmap_bytes(size).to_le_bytes());
    r[40..48].copy_from_slice(&data.to_le_bytes());
    r
}

/// `IOMMU_HWPT_SET_DIRTY_TRACKING` (`struct iommu_hwpt_set_dirty_tracking`).
pub fn iommufd_dirty_control(hwpt: u32, enable: bool) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..4].copy_from_slice(&16u32.to_le_bytes());
    r[4..8].copy_from_slice(&u32::from(enable).to_le_bytes());
    r[8..12].copy_from_slice(&hwpt.to_le_bytes());
    r
}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP` (`struct iommu_hwpt_get_dirty_bitmap`); `clear: false` sets
/// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`.
pub fn iommufd_dirty_get(hwpt: u32, iova: u64, length: u64, data: u64, clear: bool) -> [u8; 48] {
    let mut r = [0u8; 48];
    r[0..4].copy_from_slice(&48u32.to_le_bytes());
    r[4..8].copy_from_slice(&hwpt.to_le_bytes());
    r[8..12].copy_from_slice(&u32::from(!clear).to_le_bytes());
    r[16..24].copy_from_slice(&iova.to_le_bytes());
    r[24..32].copy_from_slice(&length.to_le_bytes());
    r[32..40].copy_from_slice(&4096u64.to_le_bytes());
    r[40..48].copy_from_slice(&data.to_le_bytes());
    r
}

/// What the host's type1 IOMMU reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type1Info {
    /// `iova_pgsizes`.
    pub pgsizes: u64,
    /// Usable IOVA ranges (inclusive).
    pub ranges: Vec<(u64, u64)>,
    /// The container can track dirty pages (`VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`).
    pub dirty: bool,
}

fn rd_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn rd_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Parses the reply of `VFIO_IOMMU_GET_INFO` (`struct vfio_iommu_type1_info` followed by its
/// capability chain). A chain that loops or points outside the buffer ends the parse.
pub fn parse_type1_info(buf: &[u8]) -> Option<Type1Info> {
    let flags = rd_u32(buf, 4)?;
    let pgsizes = if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        rd_u64(buf, 8)?
    } else {
        4096
    };
    let mut info = Type1Info {
        pgsizes,
        ranges: Vec::new(),
        dirty: false,
    };
    if flags & VFIO_IOMMU_INFO_CAPS != 0 {
        let mut off = rd_u32(buf, 16)? as usize;
        let mut hops = 0;
        while off != 0 && hops < 16 {
            hops += 1;
            let (id, next) = (
                u32::from(u16::from_le_bytes(buf.get(off..off + 2)?.try_into().ok()?)),
                rd_u32(buf, off + 4)?,
            );
            match id {
                VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                    let n = rd_u32(buf, off + 8)? as usize;
                    for i in 0..n.min(1024) {
                        let at = off + 16 + 16 * i;
                        info.ranges.push((rd_u64(buf, at)?, rd_u64(buf, at + 8)?));
                    }
                }
                VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION => info.dirty = true,
                _ => {}
            }
            if next as usize <= off {
                break;
            }
            off = next as usize;
        }
    }
    if info.ranges.is_empty() {
        info.ranges.push((0, u64::MAX));
    }
    Some(info)
}

/// The request of `VFIO_IOMMU_MAP_DMA` (`struct vfio_iommu_type1_dma_map`) with the mapping's
/// permissions.
pub fn type1_map_request(iova: u64, vaddr: u64, size: u64, perm: Perm) -> [u8; 32] {
    let mut flags = 0;
    if perm.read() {
        flags |= VFIO_DMA_MAP_FLAG_READ;
    }
    if perm.write() {
        flags |= VFIO_DMA_MAP_FLAG_WRITE;
    }
    let mut r = [0u8; 32];
    r[0..4].copy_from_slice(&32u32.to_le_bytes());
    r[4..8].copy_from_slice(&flags.to_le_bytes());
    r[8..16].copy_from_slice(&vaddr.to_le_bytes());
    r[16..24].copy_from_slice(&iova.to_le_bytes());
    r[24..32].copy_from_slice(&size.to_le_bytes());
    r
}

/// `IOMMU_IOAS_MAP` flags for `perm`: fixed IOVA plus readable/writeable.
pub fn iommufd_map_flags(perm: Perm) -> u32 {
    use iommufd_bindings::iommufd::{
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as FIXED,
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as R,
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as W,
    };
    let mut f = FIXED;
    if perm.read() {
        f |= R;
    }
    if perm.write() {
        f |= W;
    }
    f
}

fn ioctl_buf(fd: RawFd, req: u64, buf: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: `buf` is a live, writable buffer sized for the request's structure (argsz is
    // its first field), which is all the kernel reads or writes.
    let r = unsafe { libc::ioctl(fd, req as _, buf.as_mut_ptr()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

enum Host {
    Type1(Arc<VfioContainer>),
    Iommufd(Arc<VfioIommufd>),
}

/// A host device opened for passthrough.
pub struct HostVfio {
    device: Arc<VfioDevice>,
    host: Arc<Host>,
    name: String,
}

/// Checks the host side before touching the device, so the error says what is missing.
fn check_host(sysfs: &Path, iommufd: bool) -> Result<(), HostVfioError> {
    if iommufd && !Path::new("/dev/iommu").exists() {
        return Err(HostVfioError::Unavailable(
            "/dev/iommu does not exist (the host kernel has no IOMMUFD)".into(),
        ));
    }
    if !iommufd && !Path::new("/dev/vfio/vfio").exists() {
        return Err(HostVfioError::Unavailable(
            "/dev/vfio/vfio does not exist (the host kernel has no VFIO, or vfio-pci is not loaded)".into(),
        ));
    }
    if !sysfs.join("iommu_group").exists() {
        return Err(HostVfioError::Unavailable(format!(
            "{} has no IOMMU group (no host IOMMU, or not a PCI device)",
            sysfs.display()
        )));
    }
    Ok(())
}

impl HostVfio {
    /// Opens the device at `sysfs` (`/sys/bus/pci/devices/BDF`, bound to vfio-pci) with a type1
    /// container, or with iommufd.
    ///
    /// # Errors
    /// [`HostVfioError::Unavailable`] naming what the host lacks, or the VFIO failure.
    pub fn open(sysfs: &Path, iommufd: bool) -> Result<Self, HostVfioError> {
        check_host(sysfs, iommufd)?;
        let err =
            |e: vfio_ioctls::VfioError| HostVfioError::Vfio(format!("{}: {e}", sysfs.display()));
        let (host, ops): (Host, Arc<dyn VfioOps>) = if iommufd {
            let fd = iommufd_ioctls::IommuFd::new()
                .map_err(|e| HostVfioError::Vfio(format!("/dev/iommu: {e}")))?;
            let i = Arc::new(VfioIommufd::new(Arc::new(fd), None, None).map_err(err)?);
            (Host::Iommufd(i.clone()), i)
        } else {
            let c = Arc::new(VfioContainer::new(None).map_err(err)?);
            (Host::Type1(c.clone()), c)
        };
        let device = VfioDevice::new(sysfs, ops, iommufd).map_err(err)?;
        Ok(Self {
            device: Arc::new(device),
            host: Arc::new(host),
            name: sysfs.display().to_string(),
        })
    }

    /// The device side (regions, interrupts).
    pub fn device(&self) -> HostVfioDevice {
        HostVfioDevice {
            device: self.device.clone(),
            name: self.name.clone(),
        }
    }

    /// The DMA side, mapping guest memory by host virtual address.
    pub fn dma(&self, ram: SharedRam, mem: Arc<GuestMemoryMmap>) -> HostVfioDma {
        HostVfioDma {
            host: self.host.clone(),
            mem,
            _ram: ram,
            name: self.name.clone(),
            calls: Arc::new(Mutex::new((0, 0))),
        }
    }
}

/// The device side of a host VFIO device.
pub struct HostVfioDevice {
    device: Arc<VfioDevice>,
    name: String,
}

impl PassthroughBackend for HostVfioDevice {
    fn describe(&self) -> String {
        format!("VFIO {}", self.name)
    }
    fn region(&self, index: u32) -> Option<Region> {
        Some(Region {
            size: self.device.get_region_size(index),
        })
    }
    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), PassthroughError> {
        self.device.region_read(index, data, offset);
        Ok(())
    }
    fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PassthroughError> {
        self.device.region_write(index, data, offset);
        Ok(())
    }
    fn irq_count(&mut self, index: u32) -> Result<u32, PassthroughError> {
        Ok(self
            .device
            .get_irq_info(index)
            .map(|i| i.count)
            .unwrap_or(0))
    }
    fn set_irqs(&mut self, index: u32, _start: u32, fds: &[RawFd]) -> Result<(), PassthroughError> {
        let mut evts = Vec::with_capacity(fds.len());
        for &fd in fds {
            // SAFETY: `fd` is a live eventfd owned by the caller; `dup` gives us our own.
            let d = unsafe { libc::dup(fd) };
            if d < 0 {
                return Err(PassthroughError::Refused(format!(
                    "dup: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: `d` is a fresh descriptor that nothing else owns.
            evts.push(unsafe {
                <vmm_sys_util::eventfd::EventFd as std::os::fd::FromRawFd>::from_raw_fd(d)
            });
        }
        let refs: Vec<&vmm_sys_util::eventfd::EventFd> = evts.iter().collect();
        let r = if refs.is_empty() {
            self.device.disable_irq(index)
        } else {
            self.device.enable_irq(index, refs)
        };
        r.map_err(|e| PassthroughError::Refused(format!("VFIO_DEVICE_SET_IRQS: {e}")))
    }
    fn reset(&mut self) -> Result<(), PassthroughError> {
        self.device.reset();
        Ok(())
    }
}

/// The DMA side of a host VFIO device.
pub struct HostVfioDma {
    host: Arc<Host>,
    mem: Arc<GuestMemoryMmap>,
    _ram: SharedRam,
    name: String,
    calls: Arc<Mutex<(u64, u64)>>,
}

impl HostVfioDma {
    /// Host map and unmap calls made.
    pub fn calls(&self) -> Arc<Mutex<(u64, u64)>> {
        self.calls.clone()
    }

    fn hva(&self, gpa: u64, len: u64) -> Result<u64, BackendError> {
        let bad = || BackendError::BadAddress(format!("GPA {gpa:#x}+{len:#x} is not RAM"));
        let last = gpa
            .checked_add(len.checked_sub(1).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let a = self
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| bad())?;
        let b = self
            .mem
            .get_host_address(GuestAddress(last))
            .map_err(|_| bad())?;
        if b as u64 - a as u64 != len - 1 {
            return Err(bad());
        }
        Ok(a as u64)
    }

    fn type1_info(c: &VfioContainer) -> Option<Type1Info> {
        let mut buf = vec![0u8; 4096];
        buf[0..4].copy_from_slice(&4096u32.to_le_bytes());
        ioctl_buf(c.as_raw_fd(), VFIO_IOMMU_GET_INFO, &mut buf).ok()?;
        parse_type1_info(&buf)
    }
}

/// Runs a type1 ioctl that fills a dirty bitmap for `len` bytes of IOVA (`request` builds it
/// around the bitmap's address), then ORs the bits into `bitmap`.
fn type1_bitmap_call(
    fd: RawFd,
    len: u64,
    bitmap: &mut [u64],
    what: &str,
    request: impl FnOnce(u64) -> (u64, [u8; 48]),
) -> Result<(), BackendError> {
    let mut bits = vec![0u64; (bitmap_bytes(len) / 8) as usize];
    let (nr, mut req) = request(bits.as_mut_ptr() as u64);
    ioctl_buf(fd, nr, &mut req).map_err(|e| errno_status(e, what))?;
    for (o, b) in bitmap.iter_mut().zip(&bits) {
        *o |= b;
    }
    Ok(())
}

fn errno_status(e: std::io::Error, what: &str) -> BackendError {
    match e.raw_os_error() {
        Some(libc::ENOMEM) | Some(libc::ENOSPC) => BackendError::NoMemory(format!("{what}: {e}")),
        Some(libc::EINVAL) | Some(libc::ERANGE) => BackendError::Range(format!("{what}: {e}")),
        _ => BackendError::Failed(format!("{what}: {e}")),
    }
}

impl DmaBackend for HostVfioDma {
    fn name(&self) -> String {
        format!("VFIO {}", self.name)
    }

    fn caps(&self) -> BackendCaps {
        let mut caps = BackendCaps {
            merge_maps: false,
            merge_unmaps: true,
            ..Default::default()
        };
        match self.host.as_ref() {
            Host::Type1(c) => {
                if let Some(info) = Self::type1_info(c) {
                    caps.page_size_mask = info.pgsizes;
                    caps.iova_ranges = info.ranges;
                    caps.dirty_tracking = info.dirty;
                }
            }
            Host::Iommufd(i) => {
                let mut buf = vec![0u8; 32 + 16 * 64];
                buf[0..4].copy_from_slice(&32u32.to_le_bytes());
                buf[4..8].copy_from_slice(&i.ioas().id().to_le_bytes());
                buf[8..12].copy_from_slice(&64u32.to_le_bytes());
                let ptr = buf.as_ptr() as u64 + 32;
                buf[16..24].copy_from_slice(&ptr.to_le_bytes());
                if ioctl_buf(i.iommufd().as_raw_fd(), IOMMU_IOAS_IOVA_RANGES, &mut buf).is_ok() {
                    let n = rd_u32(&buf, 8).unwrap_or(0).min(64) as usize;
                    let align = rd_u64(&buf, 24).unwrap_or(4096).max(4096);
                    caps.page_size_mask = !(align.next_power_of_two() - 1);
                    caps.iova_ranges = (0..n)
                        .filter_map(|k| {
                            Some((rd_u64(&buf, 32 + 16 * k)?, rd_u64(&buf, 40 + 16 * k)?))
                        })
                        .collect();
                }
            }
        }
        caps
    }

    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), BackendError> {
        let hva = self.hva(gpa, len)?;
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        match self.host.as_ref() {
            Host::Type1(c) => {
                let mut req = type1_map_request(iova, hva, len, perm);
                ioctl_buf(c.as_raw_fd(), VFIO_IOMMU_MAP_DMA, &mut req)
                    .map_err(|e| errno_status(e, "VFIO_IOMMU_MAP_DMA"))
            }
            Host::Iommufd(i) => {
                let map = iommufd_bindings::iommufd::iommu_ioas_map {
                    size: std::mem::size_of::<iommufd_bindings::iommufd::iommu_ioas_map>() as u32,
                    flags: iommufd_map_flags(perm),
                    ioas_id: i.ioas().id(),
                    __reserved: 0,
                    user_va: hva,
                    length: len,
                    iova,
                };
                i.iommufd()
                    .map_iommu_ioas(&map)
                    .map_err(|e| BackendError::Failed(format!("IOMMU_IOAS_MAP: {e}")))
            }
        }
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), BackendError> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).1 += 1;
        let r = match self.host.as_ref() {
            Host::Type1(c) => c.vfio_dma_unmap(iova, len as usize),
            Host::Iommufd(i) => i.vfio_dma_unmap(iova, len as usize),
        };
        r.map_err(|e| BackendError::Failed(format!("unmap: {e}")))
    }

    // Type1 only: iommufd's dirty tracking needs a HWPT allocated with
    // IOMMU_HWPT_ALLOC_DIRTY_TRACKING, and vfio-ioctls attaches the device to the IOAS (its
    // automatic HWPT has no ID here), so iommufd reports no dirty tracking (caps) and its
    // writable pages count as dirty. The request builders above are ready for it.
    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), BackendError> {
        match self.host.as_ref() {
            Host::Type1(c) => {
                let mut req = type1_dirty_control(enable);
                ioctl_buf(c.as_raw_fd(), VFIO_IOMMU_DIRTY_PAGES, &mut req)
                    .map_err(|e| errno_status(e, "VFIO_IOMMU_DIRTY_PAGES"))
            }
            Host::Iommufd(_) => Err(BackendError::Unsupported),
        }
    }

    fn read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), BackendError> {
        let Host::Type1(c) = self.host.as_ref() else {
            return Err(BackendError::Unsupported);
        };
        // Type1 always clears what it reports: a peek is not possible.
        if !clear {
            return Err(BackendError::Unsupported);
        }
        type1_bitmap_call(
            c.as_raw_fd(),
            len,
            bitmap,
            "VFIO_IOMMU_DIRTY_PAGES",
            |data| (VFIO_IOMMU_DIRTY_PAGES, type1_dirty_get(iova, len, data)),
        )
    }

    fn unmap_read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
    ) -> Result<(), BackendError> {
        let Host::Type1(c) = self.host.as_ref() else {
            self.unmap(iova, len)?;
            iommu::backend::set_all(bitmap, len / 4096);
            return Ok(());
        };
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).1 += 1;
        type1_bitmap_call(c.as_raw_fd(), len, bitmap, "VFIO_IOMMU_UNMAP_DMA", |data| {
            (VFIO_IOMMU_UNMAP_DMA, type1_unmap_dirty(iova, len, data))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_requests_follow_the_uapi_layouts() {
        // include/uapi/linux/vfio.h and iommufd.h.
        assert_eq!(VFIO_IOMMU_DIRTY_PAGES, 0x3b75);
        assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING, 0x3b8b);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x3b8c);
        assert_eq!(
            std::mem::size_of::<iommufd_bindings::iommufd::iommu_hwpt_get_dirty_bitmap>(),
            48
        );
        assert_eq!(
            std::mem::size_of::<iommufd_bindings::iommufd::iommu_hwpt_set_dirty_tracking>(),
            16
        );
        // One bit per page, whole u64s: 65 pages need 16 bytes.
        assert_eq!(bitmap_bytes(65 * 4096), 16);
        assert_eq!(bitmap_bytes(64 * 4096), 8);
        let start = type1_dirty_control(true);
        assert_eq!(rd_u32(&start, 0), Some(8));
        assert_eq!(rd_u32(&start, 4), Some(DIRTY_PAGES_START));
        assert_eq!(
            rd_u32(&type1_dirty_control(false), 4),
            Some(DIRTY_PAGES_STOP)
        );
        let get = type1_dirty_get(0x10_0000, 0x40_0000, 0xdead_b000);
        assert_eq!(rd_u32(&get, 0), Some(48));
        assert_eq!(rd_u32(&get, 4), Some(DIRTY_PAGES_GET_BITMAP));
        assert_eq!(rd_u64(&get, 8), Some(0x10_0000));
        assert_eq!(rd_u64(&get, 16), Some(0x40_0000));
        assert_eq!(rd_u64(&get, 24), Some(4096));
        assert_eq!(rd_u64(&get, 32), Some(128)); // 1024 pages
        assert_eq!(rd_u64(&get, 40), Some(0xdead_b000));
        let unmap = type1_unmap_dirty(0x2000, 0x1000, 0x1234_0000);
        assert_eq!(rd_u32(&unmap, 4), Some(DMA_UNMAP_GET_DIRTY_BITMAP));
        assert_eq!(rd_u64(&unmap, 8), Some(0x2000));
        assert_eq!(rd_u64(&unmap, 32), Some(8));
        let ctl = iommufd_dirty_control(7, true);
        assert_eq!(
            (rd_u32(&ctl, 0), rd_u32(&ctl, 4), rd_u32(&ctl, 8)),
            (Some(16), Some(1), Some(7))
        );
        let peek = iommufd_dirty_get(7, 0x1000, 0x2000, 0x5000, false);
        assert_eq!(rd_u32(&peek, 8), Some(
            iommufd_bindings::iommufd::iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
        ));
        assert_eq!(rd_u64(&peek, 32), Some(4096));
        assert_eq!(rd_u32(&iommufd_dirty_get(7, 0, 4096, 0, true), 8), Some(0));
    }

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // include/uapi/linux/vfio.h: _IO(';', 100 + 12..14); iommufd.h: _IO(';', 0x84).
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
        assert_eq!(IOMMU_IOAS_IOVA_RANGES, 0x3b84);
    }

    fn info(caps: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 24];
        b[0..4].copy_from_slice(&((24 + caps.len()) as u32).to_le_bytes());
        b[4..8].copy_from_slice(&(VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS).to_le_bytes());
        b[8..16].copy_from_slice(&0x4020_1000u64.to_le_bytes());
        b[16..20].copy_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(caps);
        b
    }

    #[test]
    fn type1_info_with_iova_ranges_and_migration() {
        // IOVA_RANGE cap at 24: two ranges (the x86 MSI hole), next -> MIGRATION cap at 72.
        let mut caps = Vec::new();
        caps.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_le_bytes());
        caps.extend_from_slice(&1u16.to_le_bytes());
        caps.extend_from_slice(&72u32.to_le_bytes());
        caps.extend_from_slice(&2u32.to_le_bytes());
        caps.extend_from_slice(&0u32.to_le_bytes());
        for (s, e) in [(0u64, 0xfedf_ffffu64), (0xfef0_0000, (1 << 39) - 1)] {
            caps.extend_from_slice(&s.to_le_bytes());
            caps.extend_from_slice(&e.to_le_bytes());
        }
        caps.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION as u16).to_le_bytes());
        caps.extend_from_slice(&1u16.to_le_bytes());
        caps.extend_from_slice(&0u32.to_le_bytes());
        caps.extend_from_slice(&[0u8; 24]);
        let i = parse_type1_info(&info(&caps)).unwrap();
        assert_eq!(i.pgsizes, 0x4020_1000);
        assert_eq!(
            i.ranges,
            vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)]
        );
        assert!(i.dirty);
    }

    #[test]
    fn hostile_capability_chains_end_the_parse() {
        // A chain pointing at itself, and one pointing past the buffer.
        let mut looped = Vec::new();
        looped.extend_from_slice(&9u16.to_le_bytes());
        looped.extend_from_slice(&1u16.to_le_bytes());
        looped.extend_from_slice(&24u32.to_le_bytes());
        let i = parse_type1_info(&info(&looped)).unwrap();
        assert_eq!(i.ranges, vec![(0, u64::MAX)]);
        let mut past = Vec::new();
        past.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_le_bytes());
        past.extend_from_slice(&1u16.to_le_bytes());
        past.extend_from_slice(&0u32.to_le_bytes());
        past.extend_from_slice(&1000u32.to_le_bytes());
        assert!(parse_type1_info(&info(&past)).is_none());
        assert!(parse_type1_info(&[1, 2, 3]).is_none());
    }

    #[test]
    fn map_requests_carry_the_permissions() {
        let r = type1_map_request(0x1000, 0x7f00_0000_0000, 0x2000, Perm::READ);
        assert_eq!(
            u32::from_le_bytes(r[4..8].try_into().unwrap()),
            VFIO_DMA_MAP_FLAG_READ
        );
        assert_eq!(u64::from_le_bytes(r[16..24].try_into().unwrap()), 0x1000);
        let r = type1_map_request(0, 0, 0x1000, Perm::RW);
        assert_eq!(
            u32::from_le_bytes(r[4..8].try_into().unwrap()),
            VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
        );
        assert_eq!(iommufd_map_flags(Perm::READ), 1 | 4);
        assert_eq!(iommufd_map_flags(Perm::WRITE), 1 | 2);
    }

    #[test]
    fn missing_vfio_is_named() {
        let e = HostVfio::open(Path::new("/sys/bus/pci/devices/0000:00:00.0"), false)
            .err()
            .unwrap();
        let msg = e.to_string();
        if !Path::new("/dev/vfio/vfio").exists() {
            assert!(msg.contains("/dev/vfio/vfio does not exist"), "{msg}");
        }
    }
}
