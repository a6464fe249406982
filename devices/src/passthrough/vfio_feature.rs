//! Host VFIO on the migration v2 state machine: `VFIO_DEVICE_FEATURE` (`include/uapi/linux/
//! vfio.h`) with `VFIO_DEVICE_FEATURE_MIGRATION` (probe: the `VFIO_MIGRATION_*` flags),
//! `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (SET: the state arc, returning the data file for
//! STOP_COPY and RESUMING) and the device's own DMA logging
//! (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`/`STOP`/`REPORT`), the same states and structures
//! vfio-user's `DEVICE_FEATURE` carries.
//!
//! Each request is the `vfio-bindings` struct behind a `struct vfio_device_feature` header in
//! an 8-byte aligned buffer; the ioctl itself is a closure, so the layouts and the answers'
//! handling are tested against a fake kernel (no host here has VFIO).

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_feature, vfio_device_feature_dma_logging_control,
    vfio_device_feature_dma_logging_range, vfio_device_feature_dma_logging_report,
    vfio_device_feature_mig_state, vfio_device_feature_migration,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
    VFIO_MIGRATION_STOP_COPY,
};

/// `VFIO_DEVICE_FEATURE`: `_IO(VFIO_TYPE, VFIO_BASE + 17)` on the device file.
pub fn device_feature_nr() -> libc::c_ulong {
    super::vfio::VFIO_DEVICE_FEATURE()
}

/// A `VFIO_DEVICE_FEATURE` request: the header, then `payload`, in 8-byte words.
pub fn feature_request<T: Copy>(flags: u32, payload: &T) -> Vec<u64> {
    let head = std::mem::size_of::<vfio_device_feature>();
    let size = head + std::mem::size_of::<T>();
    let mut buf = vec![0u64; size.div_ceil(8)];
    let bytes = as_bytes_mut(&mut buf);
    bytes[..4].copy_from_slice(&(size as u32).to_le_bytes());
    bytes[4..8].copy_from_slice(&flags.to_le_bytes());
    // SAFETY: `T` is a plain uAPI struct (integers only), `size_of::<T>()` bytes read from a
    // live reference; the destination has room for them after the header.
    let src = unsafe {
        std::slice::from_raw_parts((payload as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    bytes[head..size].copy_from_slice(src);
    buf
}

/// The payload of a request after the kernel answered it.
pub fn feature_payload<T: Copy + Default>(buf: &[u64]) -> T {
    let head = std::mem::size_of::<vfio_device_feature>();
    let mut out = T::default();
    let bytes = as_bytes(buf);
    // SAFETY: `T` is a plain uAPI struct for which any bytes are valid; the buffer holds
    // `size_of::<T>()` bytes after the header (it was built by `feature_request::<T>`).
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes[head..].as_ptr(),
            (&mut out as *mut T).cast::<u8>(),
            std::mem::size_of::<T>().min(bytes.len() - head),
        );
    }
    out
}

fn as_bytes(w: &[u64]) -> &[u8] {
    // SAFETY: any u64 is 8 readable bytes; the length covers exactly the words.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), w.len() * 8) }
}

fn as_bytes_mut(w: &mut [u64]) -> &mut [u8] {
    // SAFETY: as `as_bytes`, and every byte pattern is a valid u64.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast(), w.len() * 8) }
}

/// The device's `VFIO_MIGRATION_*` flags, or `None` when it cannot migrate (the feature is
/// refused, or STOP_COPY is missing).
///
/// # Errors
/// An ioctl failure other than the feature being absent.
pub fn migration_flags(
    call: &mut impl FnMut(&mut [u8]) -> io::Result<()>,
) -> io::Result<Option<u64>> {
    let mut buf = feature_request(
        VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_GET,
        &vfio_device_feature_migration::default(),
    );
    match call(as_bytes_mut(&mut buf)) {
        Ok(()) => {
            let m: vfio_device_feature_migration = feature_payload(&buf);
            Ok((m.flags & u64::from(VFIO_MIGRATION_STOP_COPY) != 0).then_some(m.flags))
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTTY | libc::EINVAL | libc::ENOTSUP)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Moves the device to `state` (`enum vfio_device_mig_state`); returns the data file the
/// kernel opens for STOP_COPY (read the device state from it) and RESUMING (write it).
///
/// # Errors
/// The arc's failure (`EINVAL` for an arc the device does not take).
pub fn set_mig_state(
    call: &mut impl FnMut(&mut [u8]) -> io::Result<()>,
    state: u32,
) -> io::Result<Option<File>> {
    let mut buf = feature_request(
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_SET,
        &vfio_device_feature_mig_state {
            device_state: state,
            data_fd: -1,
        },
    );
    call(as_bytes_mut(&mut buf))?;
    let r: vfio_device_feature_mig_state = feature_payload(&buf);
    if r.data_fd < 0 {
        return Ok(None);
    }
    // SAFETY: the kernel installed a new descriptor for this process; nothing else owns it.
    Ok(Some(unsafe { File::from_raw_fd(r.data_fd as RawFd) }))
}

/// Whether the device logs its own DMA writes: a PROBE of `DMA_LOGGING_START` with SET.
pub fn logging_supported(call: &mut impl FnMut(&mut [u8]) -> io::Result<()>) -> bool {
    let mut buf = feature_request(
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE,
        &(),
    );
    call(as_bytes_mut(&mut buf)).is_ok()
}

/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` over `ranges` (`(iova, length)`; the kernel wants
/// at least one) at `page_size`.
///
/// # Errors
/// The ioctl's failure.
pub fn logging_start(
    call: &mut impl FnMut(&mut [u8]) -> io::Result<()>,
    page_size: u64,
    ranges: &[(u64, u64)],
) -> io::Result<()> {
    let list: Vec<vfio_device_feature_dma_logging_range> = ranges
        .iter()
        .map(|&(iova, length)| vfio_device_feature_dma_logging_range { iova, length })
        .collect();
    let mut buf = feature_request(
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_SET,
        &vfio_device_feature_dma_logging_control {
            page_size,
            num_ranges: list.len() as u32,
            __reserved: 0,
            ranges: list.as_ptr() as u64,
        },
    );
    // `list` lives until after the call: the kernel reads the ranges through the pointer.
    let r = call(as_bytes_mut(&mut buf));
    drop(list);
    r
}

/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
///
/// # Errors
/// The ioctl's failure.
pub fn logging_stop(call: &mut impl FnMut(&mut [u8]) -> io::Result<()>) -> io::Result<()> {
    let mut buf = feature_request(
        VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP | VFIO_DEVICE_FEATURE_SET,
        &(),
    );
    call(as_bytes_mut(&mut buf))
}

/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` of `[iova, iova + length)` at `page_size`
/// (reading clears), ORed into `bitmap` (bit `i` = the page at `iova + i * page_size`).
///
/// # Errors
/// The ioctl's failure; a bitmap too small or a `page_size` of 0 is `EINVAL` before any
/// call.
pub fn logging_report(
    call: &mut impl FnMut(&mut [u8]) -> io::Result<()>,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    if page_size == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let words = length.div_ceil(page_size).div_ceil(64) as usize;
    if bitmap.len() < words {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut bits = vec![0u64; words];
    let mut buf = feature_request(
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT | VFIO_DEVICE_FEATURE_GET,
        &vfio_device_feature_dma_logging_report {
            iova,
            length,
            page_size,
            bitmap: bits.as_mut_ptr() as u64,
        },
    );
    call(as_bytes_mut(&mut buf))?;
    for (o, b) in bitmap.iter_mut().zip(&bits) {
        *o |= b;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_MIGRATION_P2P, VFIO_TYPE};

    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn the_ioctl_number_and_the_layouts_are_the_kernels() {
        // _IO(';', 100 + 17).
        assert_eq!(
            device_feature_nr(),
            (u64::from(VFIO_TYPE) << 8 | u64::from(VFIO_BASE + 17)) as libc::c_ulong
        );
        assert_eq!(size_of::<vfio_device_feature>(), 8);
        assert_eq!(offset_of!(vfio_device_feature, flags), 4);
        let st = feature_request(
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_SET,
            &vfio_device_feature_mig_state {
                device_state: 3,
                data_fd: -1,
            },
        );
        let b = as_bytes(&st);
        assert_eq!(u32_at(b, 0), 16, "argsz covers header and payload");
        assert_eq!(u32_at(b, 4), 2 | 1 << 17);
        assert_eq!((u32_at(b, 8), u32_at(b, 12) as i32), (3, -1));
        let ranges = [(0x1000u64, 0x2000u64)];
        let mut seen = Vec::new();
        logging_start(
            &mut |buf: &mut [u8]| {
                seen.extend_from_slice(buf);
                let p = u64_at(
                    buf,
                    8 + offset_of!(vfio_device_feature_dma_logging_control, ranges),
                );
                // SAFETY: the test reads the range list the request points at, alive here.
                let r = unsafe { *(p as *const vfio_device_feature_dma_logging_range) };
                assert_eq!((r.iova, r.length), ranges[0]);
                Ok(())
            },
            4096,
            &ranges,
        )
        .unwrap();
        assert_eq!(u32_at(&seen, 0) as usize, 8 + 24);
        assert_eq!(u32_at(&seen, 4), 6 | 1 << 17);
        assert_eq!((u64_at(&seen, 8), u32_at(&seen, 16)), (4096, 1));
    }

    #[test]
    fn migration_probe_state_arcs_and_data_files_against_a_fake_kernel() {
        // A device with STOP_COPY and P2P.
        let mut k = |buf: &mut [u8]| {
            assert_eq!(u32_at(buf, 4), 1 | 1 << 16);
            buf[8..16].copy_from_slice(
                &u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P).to_le_bytes(),
            );
            Ok(())
        };
        assert_eq!(migration_flags(&mut k).unwrap(), Some(3));
        // No STOP_COPY, or no feature: not migratable; another failure is an error.
        let mut k = |buf: &mut [u8]| {
            buf[8..16].copy_from_slice(&u64::from(VFIO_MIGRATION_P2P).to_le_bytes());
            Ok(())
        };
        assert_eq!(migration_flags(&mut k).unwrap(), None);
        let mut k = |_: &mut [u8]| Err(io::Error::from_raw_os_error(libc::ENOTTY));
        assert_eq!(migration_flags(&mut k).unwrap(), None);
        let mut k = |_: &mut [u8]| Err(io::Error::from_raw_os_error(libc::EIO));
        assert!(migration_flags(&mut k).is_err());
        // STOP_COPY returns a data file; STOP none; a refused arc is the error.
        let (r, w) = {
            let mut fds = [0; 2];
            // SAFETY: a pipe into a local array.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        let mut k = |buf: &mut [u8]| {
            let to = u32_at(buf, 8);
            match to {
                3 => buf[12..16].copy_from_slice(&r.to_le_bytes()),
                1 => {}
                _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            }
            Ok(())
        };
        let mut data = set_mig_state(&mut k, 3).unwrap().expect("a data file");
        // SAFETY: the pipe's write end, owned here.
        let mut wf = unsafe { File::from_raw_fd(w) };
        std::io::Write::write_all(&mut wf, b"state").unwrap();
        drop(wf);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut data, &mut got).unwrap();
        assert_eq!(got, b"state");
        assert!(set_mig_state(&mut k, 1).unwrap().is_none());
        assert_eq!(
            set_mig_state(&mut k, 6).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn a_report_fills_the_callers_bitmap_through_the_kernels_pointer() {
        let mut k = |buf: &mut [u8]| {
            assert_eq!(u32_at(buf, 4), 8 | 1 << 16);
            let (iova, len, pg) = (u64_at(buf, 8), u64_at(buf, 16), u64_at(buf, 24));
            assert_eq!((iova, len, pg), (0x100000, 128 * 4096, 4096));
            let p = u64_at(buf, 32) as *mut u64;
            // SAFETY: the request's bitmap pointer, two words long, alive during the call.
            unsafe {
                *p = 1 << 5;
                *p.add(1) = 1 << 63;
            }
            Ok(())
        };
        let mut bits = [0u64, 1];
        logging_report(&mut k, 0x100000, 128 * 4096, 4096, &mut bits).unwrap();
        assert_eq!(bits, [1 << 5, 1 | 1 << 63]);
        let mut small = [0u64; 1];
        assert!(logging_report(&mut k, 0x100000, 128 * 4096, 4096, &mut small).is_err());
    }

    /// Each request names its feature with the right direction (GET, SET, PROBE): a kernel
    /// that answers only the requests it expects sees exactly these flags.
    #[test]
    fn each_request_names_its_feature_and_direction() {
        let (get, set, probe) = (
            VFIO_DEVICE_FEATURE_GET,
            VFIO_DEVICE_FEATURE_SET,
            VFIO_DEVICE_FEATURE_PROBE,
        );
        let expecting = |want: u32| {
            move |b: &mut [u8]| {
                if u32_at(b, 4) == want {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(libc::EINVAL))
                }
            }
        };
        assert!(logging_supported(&mut expecting(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START | set | probe
        )));
        assert!(!logging_supported(&mut |_: &mut [u8]| Err(
            io::Error::from_raw_os_error(libc::ENOTTY)
        )));
        logging_stop(&mut expecting(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP | set)).unwrap();
        assert!(logging_stop(&mut expecting(0)).is_err());
        let mut bitmap = [0u64; 1];
        logging_report(
            &mut expecting(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT | get),
            0,
            64 * 4096,
            4096,
            &mut bitmap,
        )
        .unwrap();
        let st = set_mig_state(
            &mut expecting(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | set),
            crate::passthrough::mig_state::STOP,
        )
        .unwrap();
        assert!(st.is_none(), "no data file for STOP");
        assert_eq!(
            migration_flags(&mut expecting(VFIO_DEVICE_FEATURE_MIGRATION | get)).unwrap(),
            None,
            "flags without STOP_COPY"
        );
    }

    /// A STOP_COPY arc hands back the data file the kernel opened.
    #[test]
    fn the_data_file_of_an_arc_is_handed_back() {
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe; the read end goes to the File, the write end is closed below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let f = set_mig_state(
            &mut |b: &mut [u8]| {
                b[12..16].copy_from_slice(&fds[0].to_le_bytes());
                Ok(())
            },
            crate::passthrough::mig_state::STOP_COPY,
        )
        .unwrap()
        .expect("a data file");
        assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&f), fds[0]);
        // SAFETY: the write end, not used again.
        unsafe { libc::close(fds[1]) };
    }
}
