//! Host VFIO passthrough (`vfio-ioctls`): a PCI device bound to vfio-pci, its DMA through a
//! type1 container (`VFIO_IOMMU_MAP_DMA`) or an iommufd IOAS (`IOMMU_IOAS_MAP`).
//!
//! `vfio-ioctls` opens the device and the container or iommufd, but maps everything
//! read-write and does not report the host's page sizes or usable IOVA ranges, so this module
//! issues those ioctls itself: permissions from the guest's MAP, `iova_pgsizes` and the
//! `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE` capability (type1) or `IOMMU_IOAS_IOVA_RANGES`
//! (iommufd) fed into the vIOMMU's config, and type1's dirty page tracking. Every request is
//! built from the `vfio-bindings` / `iommufd-bindings` structs (generated from
//! `include/uapi/linux/vfio.h` and `iommufd.h`) and every ioctl number from `vmm-sys-util`'s
//! `ioctl_io_nr!` with the bindings' type and base, so nothing here restates the uAPI by hand.
//!
//! iommufd dirty tracking is not offered: it needs a HWPT allocated with
//! `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` and the device attached to it, and `vfio-ioctls` attaches
//! the device to the IOAS's automatic HWPT. A device that logs its own DMA
//! (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`, [`super::vfio_feature`]) is tracked through that log
//! where the host IOMMU has none; otherwise an iommufd device reports no tracking and its
//! writable mappings count as dirty. A device with `VFIO_DEVICE_FEATURE_MIGRATION` migrates
//! on the v2 state machine, its state read from and written to the data file the kernel
//! returns for STOP_COPY and RESUMING.
//!
//! The development hosts have no VFIO (`CONFIG_VFIO` off): opening fails there with a message
//! saying so; the request building, reply parsing and retry protocols below are unit-tested
//! against fakes of the kernel's behaviour.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use iommu::{BackendCaps, BackendError, DmaBackend, Perm};
use iommufd_bindings::iommufd::{
    iommu_ioas_iova_ranges, iommu_iova_range, IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_TYPE,
};
use sync::MutexExt;
use vfio_bindings::bindings::vfio::{
    vfio_bitmap, vfio_info_cap_header, vfio_iommu_type1_dirty_bitmap,
    vfio_iommu_type1_dirty_bitmap_get, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info, vfio_iommu_type1_info_cap_iova_range, vfio_iova_range, VFIO_BASE,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::ioctl_io_nr;

use super::vfio_feature;
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

/// ioctl numbers, from `vmm-sys-util`'s `ioctl_io_nr!` and the bindings' type and base.
mod nr {
    #![allow(missing_docs)]
    use super::*;

    // include/uapi/linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + n).
    ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
    ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
    ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);
    ioctl_io_nr!(VFIO_IOMMU_DIRTY_PAGES, VFIO_TYPE as u32, VFIO_BASE + 17);
    // On the device file, the same number: _IO(VFIO_TYPE, VFIO_BASE + 17).
    ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE as u32, VFIO_BASE + 17);
    // include/uapi/linux/iommufd.h: _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES).
    ioctl_io_nr!(
        IOMMU_IOAS_IOVA_RANGES,
        IOMMUFD_TYPE as u32,
        IOMMUFD_CMD_IOAS_IOVA_RANGES
    );
}
pub use nr::*;

/// Bytes in a dirty bitmap page: the vIOMMU's granule.
const DIRTY_PGSIZE: u64 = 4096;

/// `argsz`/`size` of a uAPI struct.
fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// Bytes of a dirty bitmap for `len` bytes of IOVA at 4 KiB per bit, rounded to whole
/// `u64`s as the type1 driver requires.
pub fn bitmap_bytes(len: u64) -> u64 {
    (len / DIRTY_PGSIZE).div_ceil(64) * 8
}

/// `struct vfio_bitmap` over `len` bytes of IOVA, written to `data`.
fn dirty_bitmap(len: u64, data: *mut u64) -> vfio_bitmap {
    vfio_bitmap {
        pgsize: DIRTY_PGSIZE,
        size: bitmap_bytes(len),
        data,
    }
}

/// `VFIO_IOMMU_DIRTY_PAGES` with START or STOP (`struct vfio_iommu_type1_dirty_bitmap`).
pub fn type1_dirty_control(start: bool) -> vfio_iommu_type1_dirty_bitmap {
    vfio_iommu_type1_dirty_bitmap {
        argsz: argsz::<vfio_iommu_type1_dirty_bitmap>(),
        flags: if start {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_START
        } else {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
        },
        ..Default::default()
    }
}

/// `VFIO_IOMMU_DIRTY_PAGES` with GET_BITMAP: `struct vfio_iommu_type1_dirty_bitmap` whose
/// `data[]` is a `struct vfio_iommu_type1_dirty_bitmap_get`.
#[repr(C)]
pub struct Type1DirtyGet {
    /// `argsz` (the whole request) and `flags`.
    pub head: vfio_iommu_type1_dirty_bitmap,
    /// The range and the bitmap the kernel writes (and clears in the device).
    pub get: vfio_iommu_type1_dirty_bitmap_get,
}

/// The GET_BITMAP request for `[iova, iova + size)`, bits written to `data`.
pub fn type1_dirty_get(iova: u64, size: u64, data: *mut u64) -> Type1DirtyGet {
    Type1DirtyGet {
        head: vfio_iommu_type1_dirty_bitmap {
            argsz: argsz::<Type1DirtyGet>(),
            flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
            ..Default::default()
        },
        get: vfio_iommu_type1_dirty_bitmap_get {
            iova,
            size,
            bitmap: dirty_bitmap(size, data),
        },
    }
}

/// `VFIO_IOMMU_UNMAP_DMA` with `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`: `struct
/// vfio_iommu_type1_dma_unmap` whose `data[]` is a `struct vfio_bitmap`. The kernel unmaps
/// and returns, atomically, the pages written until then.
#[repr(C)]
pub struct Type1UnmapDirty {
    /// `argsz`, `flags`, `iova`, `size`.
    pub unmap: vfio_iommu_type1_dma_unmap,
    /// Where the bits go.
    pub bitmap: vfio_bitmap,
}

/// The unmap-and-read request for `[iova, iova + size)`, bits written to `data`.
pub fn type1_unmap_dirty(iova: u64, size: u64, data: *mut u64) -> Type1UnmapDirty {
    Type1UnmapDirty {
        unmap: vfio_iommu_type1_dma_unmap {
            argsz: argsz::<Type1UnmapDirty>(),
            flags: VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            iova,
            size,
            ..Default::default()
        },
        bitmap: dirty_bitmap(size, data),
    }
}

/// The request of `VFIO_IOMMU_MAP_DMA` (`struct vfio_iommu_type1_dma_map`) with the mapping's
/// permissions.
pub fn type1_map_request(iova: u64, vaddr: u64, size: u64, perm: Perm) -> vfio_iommu_type1_dma_map {
    let mut flags = 0;
    if perm.read() {
        flags |= VFIO_DMA_MAP_FLAG_READ;
    }
    if perm.write() {
        flags |= VFIO_DMA_MAP_FLAG_WRITE;
    }
    vfio_iommu_type1_dma_map {
        argsz: argsz::<vfio_iommu_type1_dma_map>(),
        flags,
        vaddr,
        iova,
        size,
    }
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

/// Reads a `T` at byte `off` of `buf`, if it fits.
///
/// Only for the plain-integer uAPI structs read here (every bit pattern is a valid value).
fn read_at<T: Copy>(buf: &[u8], off: usize) -> Option<T> {
    let end = off.checked_add(std::mem::size_of::<T>())?;
    let bytes = buf.get(off..end)?;
    // SAFETY: `bytes` holds `size_of::<T>()` initialized bytes; `read_unaligned` copies them
    // without alignment requirements, and the `T`s used here (uAPI structs of integers) have
    // no invalid bit patterns.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Parses the reply of `VFIO_IOMMU_GET_INFO` (`struct vfio_iommu_type1_info` followed by its
/// capability chain), with what the VMM needs present: `iova_pgsizes` and the usable IOVA
/// ranges. A chain that loops or points outside the buffer ends the parse.
///
/// # Errors
/// What is missing or malformed, for the caller to name with the ioctl.
pub fn parse_type1_info(buf: &[u8]) -> Result<Type1Info, String> {
    let info: vfio_iommu_type1_info = read_at(buf, 0).ok_or("reply shorter than its header")?;
    if info.flags & VFIO_IOMMU_INFO_PGSIZES == 0 {
        return Err("no iova_pgsizes (VFIO_IOMMU_INFO_PGSIZES unset)".into());
    }
    let mut out = Type1Info {
        pgsizes: info.iova_pgsizes,
        ranges: Vec::new(),
        dirty: false,
    };
    let mut found_ranges = false;
    if info.flags & VFIO_IOMMU_INFO_CAPS != 0 {
        let mut off = info.cap_offset as usize;
        let mut hops = 0;
        while off != 0 && hops < 16 {
            hops += 1;
            let cap: vfio_info_cap_header = read_at(buf, off)
                .ok_or_else(|| format!("capability at {off} outside the reply"))?;
            match u32::from(cap.id) {
                VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                    let base = std::mem::offset_of!(vfio_iommu_type1_info_cap_iova_range, nr_iovas);
                    let n: u32 =
                        read_at(buf, off + base).ok_or("truncated IOVA range capability")?;
                    let first = off
                        + std::mem::offset_of!(vfio_iommu_type1_info_cap_iova_range, iova_ranges);
                    for i in 0..(n as usize).min(1024) {
                        let at = first + i * std::mem::size_of::<vfio_iova_range>();
                        let r: vfio_iova_range =
                            read_at(buf, at).ok_or("truncated IOVA range capability")?;
                        out.ranges.push((r.start, r.end));
                    }
                    found_ranges = true;
                }
                VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION => out.dirty = true,
                _ => {}
            }
            if cap.next as usize <= off {
                break;
            }
            off = cap.next as usize;
        }
    }
    if !found_ranges {
        return Err(
            "no VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE capability (Linux older than 5.4?)".into(),
        );
    }
    Ok(out)
}

/// Runs `VFIO_IOMMU_GET_INFO` through `call` (the ioctl on a buffer) and parses the reply.
/// The kernel answers a buffer too small for the capabilities by raising `argsz` to the size
/// it needs (and leaving `cap_offset` 0): the buffer grows and the call is repeated.
///
/// # Errors
/// The failed ioctl or the missing information, naming `VFIO_IOMMU_GET_INFO`.
pub fn type1_info_with(
    mut call: impl FnMut(&mut [u8]) -> std::io::Result<()>,
) -> Result<Type1Info, HostVfioError> {
    let name = |e: String| HostVfioError::Vfio(format!("VFIO_IOMMU_GET_INFO: {e}"));
    let mut size = std::mem::size_of::<vfio_iommu_type1_info>();
    for _ in 0..4 {
        let mut buf = vec![0u8; size];
        let head = vfio_iommu_type1_info {
            argsz: size as u32,
            ..Default::default()
        };
        // SAFETY: `head` is a plain-integer struct; its bytes are copied into `buf`, which
        // is at least its size.
        let head_bytes = unsafe {
            std::slice::from_raw_parts(
                (&head as *const vfio_iommu_type1_info).cast::<u8>(),
                std::mem::size_of::<vfio_iommu_type1_info>(),
            )
        };
        buf[..head_bytes.len()].copy_from_slice(head_bytes);
        call(&mut buf).map_err(|e| name(e.to_string()))?;
        let reply: vfio_iommu_type1_info =
            read_at(&buf, 0).ok_or_else(|| name("short reply".into()))?;
        let needed = reply.argsz as usize;
        if reply.flags & VFIO_IOMMU_INFO_CAPS != 0 && reply.cap_offset == 0 && needed > size {
            if needed > 1 << 20 {
                return Err(name(format!("the kernel asks for a {needed}-byte reply")));
            }
            size = needed;
            continue;
        }
        return parse_type1_info(&buf).map_err(name);
    }
    Err(name("the reply size kept growing".into()))
}

/// Runs `IOMMU_IOAS_IOVA_RANGES` through `call` and returns the usable ranges and the IOVA
/// alignment. The kernel answers too small an array with `EMSGSIZE` and the number it needs
/// in `num_iovas`: the array grows and the call is repeated.
///
/// # Errors
/// The failed ioctl, naming `IOMMU_IOAS_IOVA_RANGES`.
pub fn iommufd_ranges_with(
    ioas_id: u32,
    mut call: impl FnMut(&mut iommu_ioas_iova_ranges) -> std::io::Result<()>,
) -> Result<(Vec<(u64, u64)>, u64), HostVfioError> {
    let name = |e: String| HostVfioError::Vfio(format!("IOMMU_IOAS_IOVA_RANGES: {e}"));
    let mut n = 8u32;
    for _ in 0..4 {
        let mut ranges = vec![iommu_iova_range::default(); n as usize];
        let mut req = iommu_ioas_iova_ranges {
            size: argsz::<iommu_ioas_iova_ranges>(),
            ioas_id,
            num_iovas: n,
            allowed_iovas: ranges.as_mut_ptr() as u64,
            ..Default::default()
        };
        match call(&mut req) {
            Ok(()) => {
                let got = (req.num_iovas as usize).min(ranges.len());
                return Ok((
                    ranges[..got].iter().map(|r| (r.start, r.last)).collect(),
                    req.out_iova_alignment,
                ));
            }
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) && req.num_iovas > n => {
                if req.num_iovas > 1 << 16 {
                    return Err(name(format!("{} ranges", req.num_iovas)));
                }
                n = req.num_iovas;
            }
            Err(e) => return Err(name(e.to_string())),
        }
    }
    Err(name("the number of ranges kept growing".into()))
}

/// Issues `req` (a uAPI request struct, `argsz` first) on `fd`.
fn ioctl_req<T>(fd: RawFd, nr: libc::c_ulong, req: &mut T) -> std::io::Result<()> {
    // SAFETY: `req` is a live, exclusively borrowed request struct of the layout the ioctl
    // expects (its `argsz` says how much of it the kernel may read or write); any pointers
    // in it point to buffers the caller keeps alive for the call.
    let r = unsafe { libc::ioctl(fd, nr as _, req as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Issues an ioctl whose argument is the byte buffer `buf` (`argsz` first).
fn ioctl_bytes(fd: RawFd, nr: libc::c_ulong, buf: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: `buf` is live and writable for its whole length, which its leading `argsz`
    // field states, so the kernel stays inside it.
    let r = unsafe { libc::ioctl(fd, nr as _, buf.as_mut_ptr()) };
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

    /// The device side (regions, interrupts, migration v2 when the device has it).
    pub fn device(&self) -> HostVfioDevice {
        let fd = self.device.as_raw_fd();
        let migration =
            vfio_feature::migration_flags(&mut |b| ioctl_bytes(fd, VFIO_DEVICE_FEATURE(), b))
                .unwrap_or_else(|e| {
                    log::warn!("{}: VFIO_DEVICE_FEATURE_MIGRATION: {e}", self.name);
                    None
                });
        HostVfioDevice {
            device: self.device.clone(),
            name: self.name.clone(),
            migration,
            data: None,
        }
    }

    /// The DMA side, mapping guest memory by host virtual address. Asks the host for its page
    /// sizes and usable IOVA ranges (and, for type1, dirty tracking).
    ///
    /// # Errors
    /// The query that failed (`VFIO_IOMMU_GET_INFO`, `IOMMU_IOAS_IOVA_RANGES`), named.
    pub fn dma(
        &self,
        ram: SharedRam,
        mem: Arc<GuestMemoryMmap>,
    ) -> Result<HostVfioDma, HostVfioError> {
        let mut caps = host_caps(&self.host)?;
        // The device's own DMA log where the host IOMMU has none (iommufd here, or type1
        // without its migration capability).
        let fd = self.device.as_raw_fd();
        let device_logging = !caps.dirty_tracking
            && vfio_feature::logging_supported(&mut |b| ioctl_bytes(fd, VFIO_DEVICE_FEATURE(), b));
        caps.dirty_tracking |= device_logging;
        Ok(HostVfioDma {
            host: self.host.clone(),
            device: device_logging.then(|| self.device.clone()),
            caps,
            mem,
            _ram: ram,
            name: self.name.clone(),
            calls: Arc::new(Mutex::new((0, 0))),
        })
    }
}

/// What the host IOMMU behind `host` allows.
fn host_caps(host: &Host) -> Result<BackendCaps, HostVfioError> {
    match host {
        Host::Type1(c) => {
            let fd = c.as_raw_fd();
            let info = type1_info_with(|buf| ioctl_bytes(fd, VFIO_IOMMU_GET_INFO(), buf))?;
            Ok(type1_caps(&info))
        }
        Host::Iommufd(i) => {
            let fd = i.iommufd().as_raw_fd();
            let (ranges, align) = iommufd_ranges_with(i.ioas().id(), |req| {
                ioctl_req(fd, IOMMU_IOAS_IOVA_RANGES(), req)
            })?;
            Ok(iommufd_caps(ranges, align))
        }
    }
}

/// Backend capabilities of a type1 container: its page sizes and ranges, dirty tracking when
/// the migration capability is there; unmaps may cover several mappings, maps may not be
/// split later (type1v2), and dirty reports cover whole mappings.
pub fn type1_caps(info: &Type1Info) -> BackendCaps {
    BackendCaps {
        page_size_mask: info.pgsizes,
        iova_ranges: info.ranges.clone(),
        dirty_tracking: info.dirty,
        merge_maps: false,
        merge_unmaps: true,
        dirty_whole_mappings: true,
    }
}

/// Backend capabilities of an iommufd IOAS: page sizes from the IOVA alignment (at least
/// 4 KiB), its ranges, no dirty tracking (see the module docs).
pub fn iommufd_caps(ranges: Vec<(u64, u64)>, align: u64) -> BackendCaps {
    BackendCaps {
        page_size_mask: !(align.max(4096).next_power_of_two() - 1),
        iova_ranges: ranges,
        dirty_tracking: false,
        merge_maps: false,
        merge_unmaps: true,
        dirty_whole_mappings: false,
    }
}

/// The device side of a host VFIO device.
pub struct HostVfioDevice {
    device: Arc<VfioDevice>,
    name: String,
    /// `VFIO_MIGRATION_*` flags (with STOP_COPY), when the device migrates.
    migration: Option<u64>,
    /// The data file of the current STOP_COPY or RESUMING session.
    data: Option<std::fs::File>,
}

impl HostVfioDevice {
    fn feature(&self) -> impl FnMut(&mut [u8]) -> std::io::Result<()> {
        let fd = self.device.as_raw_fd();
        move |b| ioctl_bytes(fd, VFIO_DEVICE_FEATURE(), b)
    }
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
        self.device
            .try_region_read(index, data, offset)
            .map_err(region_error)
    }
    fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PassthroughError> {
        self.device
            .try_region_write(index, data, offset)
            .map_err(region_error)
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

    fn supports_migration(&self) -> bool {
        self.migration.is_some()
    }

    fn set_migration_state(&mut self, state: u32) -> Result<(), PassthroughError> {
        if self.migration.is_none() {
            return Err(PassthroughError::Refused(format!(
                "{} does not support migration (no VFIO_DEVICE_FEATURE_MIGRATION with \
                 STOP_COPY)",
                self.describe()
            )));
        }
        let data = vfio_feature::set_mig_state(&mut self.feature(), state).map_err(|e| {
            PassthroughError::Refused(format!("VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE {state}: {e}"))
        })?;
        // A new session's file, or none (the old one ends with the arc).
        self.data = data;
        Ok(())
    }

    fn read_migration_data(&mut self) -> Result<Vec<u8>, PassthroughError> {
        let f = self
            .data
            .as_mut()
            .ok_or_else(|| PassthroughError::Refused("no STOP_COPY data session".into()))?;
        let limit = super::vfio_user::MAX_MIGRATION_DATA as u64;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut *f, limit + 1), &mut out)
            .map_err(|e| PassthroughError::Failed(format!("reading the device state: {e}")))?;
        if out.len() as u64 > limit {
            return Err(PassthroughError::Refused(format!(
                "device state beyond {limit} bytes"
            )));
        }
        Ok(out)
    }

    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), PassthroughError> {
        let f = self
            .data
            .as_mut()
            .ok_or_else(|| PassthroughError::Refused("no RESUMING data session".into()))?;
        std::io::Write::write_all(f, data)
            .map_err(|e| PassthroughError::Failed(format!("writing the device state: {e}")))
    }
}

/// A region access error: the device failing to answer (`pread`/`pwrite` on it failed) fails
/// the device; an access the region does not allow (outside it, a write to a read-only one)
/// is the guest's and is refused.
fn region_error(e: vfio_ioctls::VfioError) -> PassthroughError {
    use vfio_ioctls::VfioError as E;
    match e {
        E::VfioRegionRead(..) | E::VfioRegionWrite(..) => PassthroughError::Failed(e.to_string()),
        other => PassthroughError::Refused(other.to_string()),
    }
}

/// The DMA side of a host VFIO device.
pub struct HostVfioDma {
    host: Arc<Host>,
    /// The device, when its own DMA log tracks dirty pages (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
    device: Option<Arc<VfioDevice>>,
    caps: BackendCaps,
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
}

/// Runs a type1 ioctl that fills a dirty bitmap for `len` bytes of IOVA (`request` builds it
/// around the bitmap's address, `T` being its struct), then ORs the bits into `bitmap`.
fn type1_bitmap_call<T>(
    fd: RawFd,
    nr: libc::c_ulong,
    len: u64,
    bitmap: &mut [u64],
    what: &str,
    request: impl FnOnce(*mut u64) -> T,
) -> Result<(), BackendError> {
    let mut bits = vec![0u64; (bitmap_bytes(len) / 8) as usize];
    let mut req = request(bits.as_mut_ptr());
    ioctl_req(fd, nr, &mut req).map_err(|e| errno_status(e, what))?;
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
        self.caps.clone()
    }

    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), BackendError> {
        let hva = self.hva(gpa, len)?;
        self.calls.locked().0 += 1;
        match self.host.as_ref() {
            Host::Type1(c) => {
                let mut req = type1_map_request(iova, hva, len, perm);
                ioctl_req(c.as_raw_fd(), VFIO_IOMMU_MAP_DMA(), &mut req)
                    .map_err(|e| errno_status(e, "VFIO_IOMMU_MAP_DMA"))
            }
            Host::Iommufd(i) => {
                let map = iommufd_bindings::iommufd::iommu_ioas_map {
                    size: argsz::<iommufd_bindings::iommufd::iommu_ioas_map>(),
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
        self.calls.locked().1 += 1;
        let r = match self.host.as_ref() {
            Host::Type1(c) => c.vfio_dma_unmap(iova, len as usize),
            Host::Iommufd(i) => i.vfio_dma_unmap(iova, len as usize),
        };
        r.map_err(|e| BackendError::Failed(format!("unmap: {e}")))
    }

    // The device's DMA log when it has one, else type1's (see the module docs for iommufd).
    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), BackendError> {
        if let Some(d) = &self.device {
            let fd = d.as_raw_fd();
            let mut call = |b: &mut [u8]| ioctl_bytes(fd, VFIO_DEVICE_FEATURE(), b);
            let r = if enable {
                vfio_feature::logging_start(&mut call, DIRTY_PGSIZE, &self.caps.iova_ranges)
            } else {
                vfio_feature::logging_stop(&mut call)
            };
            return r.map_err(|e| errno_status(e, "VFIO_DEVICE_FEATURE_DMA_LOGGING"));
        }
        match self.host.as_ref() {
            Host::Type1(c) => {
                let mut req = type1_dirty_control(enable);
                ioctl_req(c.as_raw_fd(), VFIO_IOMMU_DIRTY_PAGES(), &mut req)
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
        // Both logs clear what they report: a peek is not possible.
        if !clear {
            return Err(BackendError::Unsupported);
        }
        if let Some(d) = &self.device {
            let fd = d.as_raw_fd();
            return vfio_feature::logging_report(
                &mut |b: &mut [u8]| ioctl_bytes(fd, VFIO_DEVICE_FEATURE(), b),
                iova,
                len,
                DIRTY_PGSIZE,
                bitmap,
            )
            .map_err(|e| errno_status(e, "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"));
        }
        let Host::Type1(c) = self.host.as_ref() else {
            return Err(BackendError::Unsupported);
        };
        type1_bitmap_call(
            c.as_raw_fd(),
            VFIO_IOMMU_DIRTY_PAGES(),
            len,
            bitmap,
            "VFIO_IOMMU_DIRTY_PAGES",
            |data| type1_dirty_get(iova, len, data),
        )
    }

    fn unmap_read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
    ) -> Result<(), BackendError> {
        if self.device.is_some() {
            // The device's log is by IOVA and outlives the mapping: unmap, then read.
            return iommu::backend::unmap_then_read_dirty(self, iova, len, bitmap);
        }
        let Host::Type1(c) = self.host.as_ref() else {
            self.unmap(iova, len)?;
            iommu::backend::set_all(bitmap, len / 4096);
            return Ok(());
        };
        self.calls.locked().1 += 1;
        type1_bitmap_call(
            c.as_raw_fd(),
            VFIO_IOMMU_UNMAP_DMA(),
            len,
            bitmap,
            "VFIO_IOMMU_UNMAP_DMA",
            |data| type1_unmap_dirty(iova, len, data),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use vfio_bindings::bindings::vfio::vfio_iommu_type1_info_cap_migration;
    use vmm_sys_util::ioctl::{_IOC_NRMASK, _IOC_NRSHIFT, _IOC_TYPEMASK, _IOC_TYPESHIFT};

    use super::*;

    /// The bytes of a uAPI struct (plain integers).
    fn bytes_of<T>(t: &T) -> Vec<u8> {
        // SAFETY: `t` is a live `T`; its `size_of::<T>()` bytes are read as bytes.
        unsafe { std::slice::from_raw_parts((t as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn ioctl_numbers_come_from_the_bindings() {
        let decode = |n: libc::c_ulong| {
            (
                (n >> _IOC_TYPESHIFT) & libc::c_ulong::from(_IOC_TYPEMASK),
                (n >> _IOC_NRSHIFT) & libc::c_ulong::from(_IOC_NRMASK),
            )
        };
        let vfio = libc::c_ulong::from(VFIO_TYPE);
        let base = libc::c_ulong::from(VFIO_BASE);
        assert_eq!(decode(VFIO_IOMMU_GET_INFO()), (vfio, base + 12));
        assert_eq!(decode(VFIO_IOMMU_MAP_DMA()), (vfio, base + 13));
        assert_eq!(decode(VFIO_IOMMU_UNMAP_DMA()), (vfio, base + 14));
        assert_eq!(decode(VFIO_IOMMU_DIRTY_PAGES()), (vfio, base + 17));
        assert_eq!(
            decode(IOMMU_IOAS_IOVA_RANGES()),
            (
                libc::c_ulong::from(IOMMUFD_TYPE),
                libc::c_ulong::from(IOMMUFD_CMD_IOAS_IOVA_RANGES)
            )
        );
    }

    /// The composite requests put their tails where the kernel's flexible `data[]` arrays
    /// are, and their `argsz` covers both parts.
    #[test]
    fn requests_follow_the_bindings_layouts() {
        assert_eq!(
            offset_of!(Type1DirtyGet, get),
            offset_of!(vfio_iommu_type1_dirty_bitmap, data)
        );
        assert_eq!(
            offset_of!(Type1UnmapDirty, bitmap),
            offset_of!(vfio_iommu_type1_dma_unmap, data)
        );
        let mut bits = [0u64; 2];
        let get = type1_dirty_get(0x10_0000, 0x40_0000, bits.as_mut_ptr());
        assert_eq!(get.head.argsz as usize, size_of::<Type1DirtyGet>());
        assert_eq!(get.head.flags, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP);
        assert_eq!((get.get.iova, get.get.size), (0x10_0000, 0x40_0000));
        assert_eq!(get.get.bitmap.pgsize, 4096);
        assert_eq!(get.get.bitmap.size, 128, "1024 pages, 128 bytes");
        assert_eq!(get.get.bitmap.data, bits.as_mut_ptr());
        let unmap = type1_unmap_dirty(0x2000, 0x41000, bits.as_mut_ptr());
        assert_eq!(unmap.unmap.argsz as usize, size_of::<Type1UnmapDirty>());
        assert_eq!(unmap.unmap.flags, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP);
        assert_eq!((unmap.unmap.iova, unmap.unmap.size), (0x2000, 0x41000));
        assert_eq!(unmap.bitmap.size, 16, "65 pages need two words");
        let start = type1_dirty_control(true);
        assert_eq!(
            start.argsz as usize,
            size_of::<vfio_iommu_type1_dirty_bitmap>()
        );
        assert_eq!(start.flags, VFIO_IOMMU_DIRTY_PAGES_FLAG_START);
        assert_eq!(
            type1_dirty_control(false).flags,
            VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
        );
        assert_eq!(bitmap_bytes(64 * 4096), 8);
    }

    #[test]
    fn map_requests_carry_the_permissions() {
        let r = type1_map_request(0x1000, 0x7f00_0000_0000, 0x2000, Perm::READ);
        assert_eq!(r.argsz as usize, size_of::<vfio_iommu_type1_dma_map>());
        assert_eq!(r.flags, VFIO_DMA_MAP_FLAG_READ);
        assert_eq!(
            (r.iova, r.vaddr, r.size),
            (0x1000, 0x7f00_0000_0000, 0x2000)
        );
        assert_eq!(
            type1_map_request(0, 0, 0x1000, Perm::RW).flags,
            VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
        );
        use iommufd_bindings::iommufd::{
            iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as FIXED,
            iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as R,
            iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as W,
        };
        assert_eq!(iommufd_map_flags(Perm::READ), FIXED | R);
        assert_eq!(iommufd_map_flags(Perm::WRITE), FIXED | W);
    }

    /// The capability chain a type1 kernel returns: IOVA ranges (the x86 MSI hole), then
    /// migration.
    fn caps_chain(ranges: &[(u64, u64)], with_ranges: bool) -> Vec<u8> {
        let at = size_of::<vfio_iommu_type1_info>();
        let mut out = Vec::new();
        let range_cap_len = offset_of!(vfio_iommu_type1_info_cap_iova_range, iova_ranges)
            + ranges.len() * size_of::<vfio_iova_range>();
        if with_ranges {
            let head = vfio_info_cap_header {
                id: VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16,
                version: 1,
                next: (at + range_cap_len) as u32,
            };
            out.extend(bytes_of(&head));
            out.extend((ranges.len() as u32).to_ne_bytes());
            out.extend(0u32.to_ne_bytes());
            for &(start, end) in ranges {
                out.extend(bytes_of(&vfio_iova_range { start, end }));
            }
        }
        let mig = vfio_iommu_type1_info_cap_migration {
            header: vfio_info_cap_header {
                id: VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION as u16,
                version: 1,
                next: 0,
            },
            flags: 0,
            pgsize_bitmap: 4096,
            max_dirty_bitmap_size: 1 << 20,
        };
        out.extend(bytes_of(&mig));
        out
    }

    /// A fake of `vfio_iommu_type1_get_info`: a too-small `argsz` gets the size needed and
    /// no capabilities; a large enough one gets them at `cap_offset`.
    fn fake_kernel(caps: Vec<u8>) -> impl FnMut(&mut [u8]) -> std::io::Result<()> {
        let mut calls = 0;
        move |buf: &mut [u8]| {
            calls += 1;
            assert!(calls <= 2, "asked more than twice");
            let head: vfio_iommu_type1_info = read_at(buf, 0).unwrap();
            let minsz = size_of::<vfio_iommu_type1_info>();
            assert_eq!(head.argsz as usize, buf.len());
            let needed = minsz + caps.len();
            let mut reply = vfio_iommu_type1_info {
                argsz: head.argsz,
                flags: VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS,
                iova_pgsizes: 0x4020_1000,
                cap_offset: 0,
                pad: 0,
            };
            if (head.argsz as usize) < needed {
                reply.argsz = needed as u32;
            } else {
                reply.cap_offset = minsz as u32;
                buf[minsz..needed].copy_from_slice(&caps);
            }
            buf[..minsz].copy_from_slice(&bytes_of(&reply));
            Ok(())
        }
    }

    #[test]
    fn type1_info_grows_its_buffer_and_reads_the_capabilities() {
        let ranges = [(0u64, 0xfedf_ffffu64), (0xfef0_0000, (1 << 39) - 1)];
        let info = type1_info_with(fake_kernel(caps_chain(&ranges, true))).unwrap();
        assert_eq!(info.pgsizes, 0x4020_1000);
        assert_eq!(info.ranges, ranges.to_vec());
        assert!(info.dirty);
        let caps = type1_caps(&info);
        assert!(caps.dirty_whole_mappings && caps.merge_unmaps && !caps.merge_maps);
        assert_eq!(caps.iova_ranges, ranges.to_vec());
    }

    #[test]
    fn type1_info_failures_name_the_ioctl() {
        let e = type1_info_with(fake_kernel(caps_chain(&[], false))).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("VFIO_IOMMU_GET_INFO: "), "{msg}");
        assert!(
            msg.contains("VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE"),
            "{msg}"
        );
        let e = type1_info_with(|_| Err(std::io::Error::from_raw_os_error(libc::ENOTTY)))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("VFIO_IOMMU_GET_INFO: "), "{e}");
        // No page sizes: refused, not guessed.
        let e = type1_info_with(|buf: &mut [u8]| {
            buf[4..8].copy_from_slice(&0u32.to_ne_bytes());
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("iova_pgsizes"), "{e}");
        // A kernel that keeps asking for more gives up rather than loops.
        let e = type1_info_with(|buf: &mut [u8]| {
            let grow = vfio_iommu_type1_info {
                argsz: buf.len() as u32 + 8,
                flags: VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS,
                ..Default::default()
            };
            buf[..size_of::<vfio_iommu_type1_info>()].copy_from_slice(&bytes_of(&grow));
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("kept growing"), "{e}");
    }

    /// A reply whose header is followed by `unknown` capabilities of an id nobody knows,
    /// then the IOVA range capability with one range; `caps` sets `VFIO_IOMMU_INFO_CAPS`.
    fn reply_with_range_after(unknown: usize, caps: bool) -> Vec<u8> {
        let head_len = size_of::<vfio_iommu_type1_info>();
        let mut chain = Vec::new();
        for i in 0..unknown {
            chain.extend(bytes_of(&vfio_info_cap_header {
                id: 9,
                version: 1,
                next: (head_len + 8 * (i + 1)) as u32,
            }));
        }
        chain.extend(bytes_of(&vfio_info_cap_header {
            id: VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16,
            version: 1,
            next: 0,
        }));
        chain.extend(1u32.to_ne_bytes());
        chain.extend(0u32.to_ne_bytes());
        chain.extend(0x1000u64.to_ne_bytes());
        chain.extend(0xfee0_0000u64.to_ne_bytes());
        let head = vfio_iommu_type1_info {
            argsz: (head_len + chain.len()) as u32,
            flags: VFIO_IOMMU_INFO_PGSIZES | if caps { VFIO_IOMMU_INFO_CAPS } else { 0 },
            iova_pgsizes: 4096,
            cap_offset: head_len as u32,
            pad: 0,
        };
        let mut b = bytes_of(&head);
        b.extend(chain);
        b
    }

    /// The capability chain is followed for 16 capabilities at most, and only when the
    /// reply says it has one.
    #[test]
    fn the_capability_chain_is_read_for_16_capabilities_when_flagged() {
        let info = parse_type1_info(&reply_with_range_after(15, true)).unwrap();
        assert_eq!(info.ranges, vec![(0x1000, 0xfee0_0000)]);
        let e = parse_type1_info(&reply_with_range_after(16, true)).unwrap_err();
        assert!(e.contains("VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE"), "{e}");
        let e = parse_type1_info(&reply_with_range_after(0, false)).unwrap_err();
        assert!(e.contains("VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE"), "{e}");
    }

    #[test]
    fn hostile_capability_chains_end_the_parse() {
        let info = |caps: &[u8]| {
            let head = vfio_iommu_type1_info {
                argsz: (size_of::<vfio_iommu_type1_info>() + caps.len()) as u32,
                flags: VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS,
                iova_pgsizes: 4096,
                cap_offset: size_of::<vfio_iommu_type1_info>() as u32,
                pad: 0,
            };
            let mut b = bytes_of(&head);
            b.extend_from_slice(caps);
            b
        };
        // A chain pointing at itself.
        let looped = vfio_info_cap_header {
            id: 9,
            version: 1,
            next: size_of::<vfio_iommu_type1_info>() as u32,
        };
        assert!(parse_type1_info(&info(&bytes_of(&looped))).is_err());
        // A range count past the buffer.
        let mut past = bytes_of(&vfio_info_cap_header {
            id: VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16,
            version: 1,
            next: 0,
        });
        past.extend(1000u32.to_ne_bytes());
        assert!(parse_type1_info(&info(&past)).is_err());
        assert!(parse_type1_info(&[1, 2, 3]).is_err());
    }

    /// The buffer grows only when the reply says it has capabilities it could not hold, up
    /// to 1 MiB; an answer that fits (or has none) is parsed as it is.
    #[test]
    fn type1_info_grows_only_for_capabilities_that_did_not_fit() {
        let reply = |buf: &mut [u8], argsz: usize, flags: u32| {
            let r = vfio_iommu_type1_info {
                argsz: argsz as u32,
                flags,
                iova_pgsizes: 4096,
                cap_offset: 0,
                pad: 0,
            };
            buf[..size_of::<vfio_iommu_type1_info>()].copy_from_slice(&bytes_of(&r));
        };
        let all = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS;
        // Capabilities, in a buffer already as large as the kernel says: no growing.
        let mut calls = 0;
        let e = type1_info_with(|buf: &mut [u8]| {
            calls += 1;
            let n = buf.len();
            reply(buf, n, all);
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE"), "{e}");
        assert_eq!(calls, 1);
        // No capabilities flagged: a larger argsz is no reason to ask again.
        let mut calls = 0;
        let e = type1_info_with(|buf: &mut [u8]| {
            calls += 1;
            let n = buf.len();
            reply(buf, n + 64, VFIO_IOMMU_INFO_PGSIZES);
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE"), "{e}");
        assert_eq!(calls, 1);
        // Exactly 1 MiB is still asked for; more is refused.
        let caps = caps_chain(&[(0, 0xffff_ffff)], true);
        let big = |limit: usize| {
            let caps = caps.clone();
            move |buf: &mut [u8]| {
                if buf.len() < limit {
                    reply(buf, limit, all);
                } else {
                    let minsz = size_of::<vfio_iommu_type1_info>();
                    let r = vfio_iommu_type1_info {
                        argsz: limit as u32,
                        flags: all,
                        iova_pgsizes: 4096,
                        cap_offset: minsz as u32,
                        pad: 0,
                    };
                    buf[..minsz].copy_from_slice(&bytes_of(&r));
                    buf[minsz..minsz + caps.len()].copy_from_slice(&caps);
                }
                Ok(())
            }
        };
        assert!(type1_info_with(big(1 << 20)).is_ok());
        let e = type1_info_with(big((1 << 20) + 8)).unwrap_err().to_string();
        assert!(e.contains("asks for a 1048584-byte reply"), "{e}");
    }

    /// Only `EMSGSIZE` with a larger count grows the array; another error, or `EMSGSIZE`
    /// without a larger count, is the kernel's answer.
    #[test]
    fn iommufd_ranges_grow_only_on_emsgsize_with_more() {
        let e = iommufd_ranges_with(1, |_| Err(std::io::Error::from_raw_os_error(libc::ENOENT)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&std::io::Error::from_raw_os_error(libc::ENOENT).to_string()),
            "{e}"
        );
        let e = iommufd_ranges_with(1, |_| {
            Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE))
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&std::io::Error::from_raw_os_error(libc::EMSGSIZE).to_string()),
            "{e}"
        );
        // Up to 65,536 ranges are asked for; more are refused.
        let asking = |most: u32| {
            move |req: &mut iommu_ioas_iova_ranges| {
                if req.num_iovas < most {
                    req.num_iovas = most;
                    return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE));
                }
                req.num_iovas = 0;
                Ok(())
            }
        };
        assert_eq!(iommufd_ranges_with(1, asking(1 << 16)).unwrap().0, vec![]);
        let e = iommufd_ranges_with(1, asking((1 << 16) + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("65537 ranges"), "{e}");
    }

    /// Without the host's VFIO or IOMMUFD, opening a device says which is missing.
    #[test]
    fn a_host_without_vfio_says_what_is_missing() {
        let dev = Path::new("/sys/bus/pci/devices/0000:00:00.0");
        if Path::new("/dev/iommu").exists() || Path::new("/dev/vfio/vfio").exists() {
            eprintln!("SKIP: this host has VFIO");
            return;
        }
        let e = check_host(dev, true).unwrap_err().to_string();
        assert!(e.contains("/dev/iommu does not exist"), "{e}");
        let e = check_host(dev, false).unwrap_err().to_string();
        assert!(e.contains("/dev/vfio/vfio does not exist"), "{e}");
    }

    /// The ioctl helpers report the kernel's refusal, and its success (`FIONREAD` on a
    /// pipe: the bytes waiting).
    #[test]
    fn ioctl_helpers_report_the_kernels_answer() {
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe; both ends are closed at the end of the test.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: writing 3 bytes from a live buffer to the pipe's write end.
        assert_eq!(unsafe { libc::write(fds[1], b"abc".as_ptr().cast(), 3) }, 3);
        let mut n = 0i32;
        ioctl_req(fds[0], libc::FIONREAD, &mut n).unwrap();
        assert_eq!(n, 3);
        let mut b = [0u8; 4];
        ioctl_bytes(fds[0], libc::FIONREAD, &mut b).unwrap();
        assert_eq!(i32::from_ne_bytes(b), 3);
        let e = ioctl_req(fds[0], 0xdead, &mut n).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        let e = ioctl_bytes(fds[0], 0xdead, &mut b).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        // SAFETY: the pipe's two descriptors, not used again.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    #[test]
    fn iommufd_ranges_grow_on_emsgsize() {
        let want: Vec<(u64, u64)> = (0..12u64).map(|k| (k << 32, (k << 32) + 0xffff)).collect();
        let mut calls = 0;
        let (ranges, align) = iommufd_ranges_with(7, |req| {
            calls += 1;
            assert_eq!(req.size as usize, size_of::<iommu_ioas_iova_ranges>());
            assert_eq!(req.ioas_id, 7);
            if (req.num_iovas as usize) < want.len() {
                req.num_iovas = want.len() as u32;
                return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE));
            }
            for (k, &(start, last)) in want.iter().enumerate() {
                // SAFETY: the caller's array has `num_iovas` (>= 12) entries.
                unsafe {
                    (req.allowed_iovas as *mut iommu_iova_range)
                        .add(k)
                        .write(iommu_iova_range { start, last });
                }
            }
            req.num_iovas = want.len() as u32;
            req.out_iova_alignment = 4096;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(ranges, want);
        assert_eq!(iommufd_caps(ranges, align).page_size_mask, !0xfff);
        let e = iommufd_ranges_with(1, |_| Err(std::io::Error::from_raw_os_error(libc::ENOENT)))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("IOMMU_IOAS_IOVA_RANGES: "), "{e}");
    }

    /// The host's errno becomes the status the guest's MAP or UNMAP gets (virtio 1.2
    /// 5.13.6.3): out of pinnable or mappable memory is NOMEM, an IOVA the host cannot use is
    /// RANGE, the rest is DEVERR; each names the call.
    #[test]
    fn host_errors_map_to_the_guests_status() {
        let status = |errno| errno_status(std::io::Error::from_raw_os_error(errno), "MAP_DMA");
        for errno in [libc::ENOMEM, libc::ENOSPC] {
            assert!(
                matches!(status(errno), BackendError::NoMemory(m) if m.starts_with("MAP_DMA: "))
            );
        }
        for errno in [libc::EINVAL, libc::ERANGE] {
            assert!(matches!(status(errno), BackendError::Range(m) if m.starts_with("MAP_DMA: ")));
        }
        for errno in [libc::EIO, libc::EFAULT, libc::EBUSY] {
            assert!(matches!(status(errno), BackendError::Failed(m) if m.starts_with("MAP_DMA: ")));
        }
    }

    #[test]
    fn region_errors_fail_the_device_only_when_it_is_the_device() {
        use vfio_ioctls::VfioError as E;
        let io = || std::io::Error::from_raw_os_error(libc::EIO);
        assert!(matches!(
            region_error(E::VfioRegionRead(0, 0x10, io())),
            PassthroughError::Failed(_)
        ));
        assert!(matches!(
            region_error(E::VfioRegionWrite(2, 0, io())),
            PassthroughError::Failed(_)
        ));
        assert!(matches!(
            region_error(E::VfioRegionAccessInvalid(0, u64::MAX, 4)),
            PassthroughError::Refused(_)
        ));
        assert!(matches!(
            region_error(E::VfioRegionNotWritable(1)),
            PassthroughError::Refused(_)
        ));
    }

    #[test]
    fn missing_vfio_is_named() {
        let e = HostVfio::open(Path::new("/sys/bus/pci/devices/0000:00:00.0"), false)
            .err()
            .unwrap()
            .to_string();
        if Path::new("/dev/vfio/vfio").exists() {
            // The host bridge is never bound to vfio-pci: some reason names it.
            assert!(e.contains("0000:00:00.0"), "{e}");
        } else {
            assert!(e.contains("/dev/vfio/vfio does not exist"), "{e}");
        }
    }

    /// Against a real kernel: the device named by `VMM_TEST_VFIO_DEVICE` (a sysfs path,
    /// bound to vfio-pci), type1 then iommufd: the host's caps, a read-only and a writable
    /// page mapped, dirty tracking started, a harvest and an unmap-with-bitmap.
    #[test]
    #[ignore = "needs host VFIO: VMM_TEST_VFIO_DEVICE=/sys/bus/pci/devices/<BDF> bound to vfio-pci"]
    fn real_host_vfio() {
        let dev = std::env::var("VMM_TEST_VFIO_DEVICE").expect("VMM_TEST_VFIO_DEVICE");
        let mem = crate::virtio::testing::shared_test_memory(4 << 20);
        for iommufd in [false, true] {
            if iommufd && !Path::new("/dev/iommu").exists() {
                eprintln!("SKIP iommufd: /dev/iommu does not exist");
                continue;
            }
            let host = HostVfio::open(Path::new(&dev), iommufd).unwrap();
            // The memfd only matters to vfio-user; VFIO maps by host address.
            let ram = SharedRam {
                memfd: Arc::new(std::fs::File::open("/dev/null").unwrap()),
                ranges: Vec::new(),
            };
            let mut dma = host.dma(ram, mem.clone()).unwrap();
            let caps = dma.caps();
            assert!(!caps.iova_ranges.is_empty());
            assert_ne!(caps.page_size_mask & 0x1000, 0);
            let iova = caps.iova_ranges[0].0.next_multiple_of(0x10_0000);
            dma.map(iova, 0, 0x1000, Perm::READ).unwrap();
            dma.map(iova + 0x1000, 0x1000, 0x1000, Perm::RW).unwrap();
            if caps.dirty_tracking {
                dma.set_dirty_tracking(true).unwrap();
                let mut bits = [0u64; 1];
                dma.read_dirty(iova + 0x1000, 0x1000, &mut bits, true)
                    .unwrap();
                let mut bits = [0u64; 1];
                dma.unmap_read_dirty(iova + 0x1000, 0x1000, &mut bits)
                    .unwrap();
                dma.set_dirty_tracking(false).unwrap();
            } else {
                dma.unmap(iova + 0x1000, 0x1000).unwrap();
            }
            dma.unmap(iova, 0x1000).unwrap();
        }
    }
}
