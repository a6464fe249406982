//! `DEVICE_FEATURE` (migration v2, DMA logging) and `MIG_DATA_READ` against a scripted
//! server: the requests as the specification lays them out, and each reply checked.

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_SET, VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};

use super::super::feature::{MigrationFeature, MAX_LOGGING_RANGES};
use super::*;

/// What the scripted server saw: `(command, body)` of each request after the set-up.
type Requests = thread::JoinHandle<Vec<(u16, Vec<u8>)>>;

/// A client whose server (one 8 KiB region, capabilities `caps`) answers each later request
/// with `answer(command, body)`: a reply body, or an errno.
fn answering(
    caps: &'static str,
    mut answer: impl FnMut(u16, &[u8]) -> Result<Vec<u8>, u32> + Send + 'static,
) -> (VfioUserClient, Requests) {
    let (client_end, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        one_region_handshake(&mut s, caps);
        let mut seen = Vec::new();
        while let Some((id, cmd, body)) = next_request(&mut s) {
            let msg = match answer(cmd, &body) {
                Ok(r) => reply(id, cmd, &r),
                Err(errno) => header(id, cmd, 16, FLAG_REPLY | FLAG_ERROR, errno),
            };
            seen.push((cmd, body));
            s.write_all(&msg).unwrap();
        }
        seen
    });
    let c = VfioUserClient::from_stream(client_end, Duration::from_secs(5)).unwrap();
    (c, server)
}

/// The `(argsz, flags)` header of a feature request, as a reply starts.
fn echo_head(body: &[u8]) -> Vec<u8> {
    body[..8].to_vec()
}

#[test]
fn migration_flags_name_each_capability() {
    let stop_copy = u64::from(VFIO_MIGRATION_STOP_COPY);
    let (p2p, pre_copy) = (
        u64::from(VFIO_MIGRATION_P2P),
        u64::from(VFIO_MIGRATION_PRE_COPY),
    );
    let f = MigrationFeature { flags: stop_copy };
    assert!(f.stop_copy() && !f.p2p() && !f.pre_copy());
    let f = MigrationFeature {
        flags: p2p | pre_copy,
    };
    assert!(!f.stop_copy() && f.p2p() && f.pre_copy());
}

/// vfio-user.rst, "VFIO_USER_DEVICE_FEATURE": MIGRATION GET returns the flags after the
/// header; a refusal means no migration; a reply without the flags, shorter than the
/// header or for other feature flags is refused.
#[test]
fn the_migration_feature_and_its_malformed_replies() {
    let flags = VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_GET;
    let (mut c, seen) = answering("{}", move |_, body| {
        let mut r = echo_head(body);
        r.extend_from_slice(&0x5u64.to_le_bytes());
        Ok(r)
    });
    assert_eq!(
        c.migration_feature().unwrap(),
        Some(MigrationFeature { flags: 0x5 })
    );
    drop(c);
    let seen = seen.join().unwrap();
    // argsz covers the header and the flags the reply brings; the feature and GET.
    assert_eq!(seen[0].0, CMD_DEVICE_FEATURE);
    assert_eq!((u32_at(&seen[0].1, 0), u32_at(&seen[0].1, 4)), (16, flags));
    let (mut c, _) = answering("{}", |_, _| Err(libc::ENOTTY as u32));
    assert_eq!(c.migration_feature().unwrap(), None);
    for bad in [
        |b: &[u8]| echo_head(b),
        |b: &[u8]| b[..4].to_vec(),
        |b: &[u8]| {
            let mut r = echo_head(b);
            r[4] ^= 1;
            r.extend_from_slice(&0x5u64.to_le_bytes());
            r
        },
    ] {
        let (mut c, _) = answering("{}", move |_, body| Ok(bad(body)));
        assert!(
            matches!(c.migration_feature(), Err(VfioUserError::Protocol { .. })),
            "accepted"
        );
    }
}

/// MIG_DEVICE_STATE: SET sends the state and a `data_fd` of -1, and wants the state back;
/// GET reads it. A reply naming another state, or none, is refused.
#[test]
fn device_states_are_set_and_read_back() {
    let (mut c, seen) = answering("{}", |_, body| {
        let mut r = echo_head(body);
        let flags = u32_at(body, 4);
        let state = if flags & VFIO_DEVICE_FEATURE_SET != 0 {
            u32_at(body, 8)
        } else {
            2
        };
        r.extend_from_slice(&state.to_le_bytes());
        r.extend_from_slice(&(-1i32).to_le_bytes());
        Ok(r)
    });
    assert_eq!(c.set_mig_state(3).unwrap(), 3);
    assert_eq!(c.mig_state().unwrap(), 2);
    drop(c);
    let seen = seen.join().unwrap();
    let set = &seen[0].1;
    assert_eq!(
        u32_at(set, 4),
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_SET
    );
    assert_eq!((u32_at(set, 8), u32_at(set, 12) as i32), (3, -1));
    // Another state, a state cut short.
    let (mut c, _) = answering("{}", |_, body| {
        let mut r = echo_head(body);
        r.extend_from_slice(&7u32.to_le_bytes());
        Ok(r)
    });
    let e = c.set_mig_state(3).unwrap_err().to_string();
    assert!(
        e.contains("asked for device state 3, the reply says Some(7)"),
        "{e}"
    );
    let (mut c, _) = answering("{}", |_, body| {
        let mut r = echo_head(body);
        r.extend_from_slice(&[3, 0, 0]);
        Ok(r)
    });
    assert!(c.set_mig_state(3).is_err());
    assert!(c.mig_state().is_err());
    // Just the state (no data_fd): enough, either way.
    let (mut c, _) = answering("{}", |_, body| {
        let mut r = echo_head(body);
        r.extend_from_slice(&3u32.to_le_bytes());
        Ok(r)
    });
    assert_eq!(c.set_mig_state(3).unwrap(), 3);
    assert_eq!(c.mig_state().unwrap(), 3);
}

/// MIG_DATA_READ asks for the transfer limit each time and stops at the first shorter
/// answer; an answer whose size disagrees with its data, or exceeds what was asked, is
/// refused.
#[test]
fn migration_data_is_read_until_a_short_answer() {
    let mut answers = vec![4096usize, 100].into_iter();
    let (mut c, seen) = answering(r#"{"max_data_xfer_size":4096}"#, move |_, body| {
        let n = answers.next().unwrap();
        let mut r = echo_head(body);
        r[4..8].copy_from_slice(&(n as u32).to_le_bytes());
        r.extend(std::iter::repeat_n(0x77, n));
        Ok(r)
    });
    assert_eq!(c.read_mig_data().unwrap(), vec![0x77; 4196]);
    drop(c);
    let seen = seen.join().unwrap();
    assert_eq!(seen.len(), 2);
    for (cmd, body) in &seen {
        assert_eq!(
            (*cmd, u32_at(body, 0), u32_at(body, 4)),
            (CMD_MIG_DATA_READ, 8 + 4096, 4096)
        );
    }
    // No data at all: an empty answer ends it at once.
    let (mut c, _) = answering(r#"{"max_data_xfer_size":4096}"#, |_, body| {
        let mut r = echo_head(body);
        r[4..8].copy_from_slice(&0u32.to_le_bytes());
        Ok(r)
    });
    assert_eq!(c.read_mig_data().unwrap(), Vec::<u8>::new());
    for (size, carried) in [(10u32, 12usize), (4097, 4097), (4, 0)] {
        let (mut c, _) = answering(r#"{"max_data_xfer_size":4096}"#, move |_, body| {
            let mut r = echo_head(body);
            r[4..8].copy_from_slice(&size.to_le_bytes());
            r.extend(std::iter::repeat_n(0, carried));
            if size == 4 {
                r.truncate(6);
            }
            Ok(r)
        });
        assert!(
            matches!(c.read_mig_data(), Err(VfioUserError::Protocol { .. })),
            "{size} {carried}"
        );
    }
}

/// DMA_LOGGING_START names at most 4096 ranges (more are not sent) and takes the page size
/// the server chose, which must be a power of two.
#[test]
fn logging_starts_with_a_bounded_range_list_and_a_real_page_size() {
    let mut page = vec![4096u64, 3000].into_iter();
    let (mut c, seen) = answering("{}", move |_, body| {
        let mut r = body.to_vec();
        r[8..16].copy_from_slice(&page.next().unwrap().to_le_bytes());
        Ok(r)
    });
    let ranges: Vec<(u64, u64)> = (0..MAX_LOGGING_RANGES as u64)
        .map(|i| (i << 12, 4096))
        .collect();
    assert_eq!(c.dma_logging_start(4096, &ranges).unwrap(), 4096);
    let more: Vec<(u64, u64)> = (0..=MAX_LOGGING_RANGES as u64)
        .map(|i| (i << 12, 4096))
        .collect();
    assert!(matches!(
        c.dma_logging_start(4096, &more),
        Err(VfioUserError::Invalid(_))
    ));
    let e = c.dma_logging_start(4096, &[]).unwrap_err().to_string();
    assert!(e.contains("logging page size 3000"), "{e}");
    drop(c);
    let seen = seen.join().unwrap();
    assert_eq!(seen.len(), 2, "the oversized list was not sent");
    let start = &seen[0].1;
    assert_eq!(
        u32_at(start, 4),
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_SET
    );
    assert_eq!(u32_at(start, 16), MAX_LOGGING_RANGES as u32, "num_ranges");
    assert_eq!(
        u64_at(start, 24 + 16 * 4095),
        4095 << 12,
        "the last range's IOVA"
    );
}

/// DMA_LOGGING_REPORT: a page size that is no power of two, an IOVA off a page, or a bitmap
/// too small for the range is refused before sending; a range is split so that no report's
/// bitmap exceeds the server's `max_bitmap_size` (16 bytes here: 128 pages); bits past a
/// report's range are ignored; a reply for another range, or of another size, is refused.
#[test]
fn logging_reports_are_split_at_the_servers_bitmap_and_checked() {
    let caps = r#"{"migration":{"pgsize":4096,"max_bitmap_size":16}}"#;
    // Every bit set, in as many words as the report's pages need.
    let (mut c, seen) = answering(caps, |_, body| {
        let words = (u64_at(body, 16) / 4096).div_ceil(64);
        let mut r = body[..32].to_vec();
        for _ in 0..words {
            r.extend_from_slice(&u64::MAX.to_le_bytes());
        }
        Ok(r)
    });
    let mut bitmap = [0u64; 4];
    c.dma_logging_report(0x10_0000, 200 * 4096, 4096, &mut bitmap)
        .unwrap();
    assert_eq!(bitmap, [u64::MAX, u64::MAX, u64::MAX, 0xff]);
    for (iova, page) in [(0x10_0000, 3000), (0x10_0800, 4096)] {
        assert!(matches!(
            c.dma_logging_report(iova, 4096, page, &mut bitmap),
            Err(VfioUserError::Invalid(_))
        ));
    }
    let mut small = [0u64; 1];
    assert!(matches!(
        c.dma_logging_report(0, 65 * 4096, 4096, &mut small),
        Err(VfioUserError::Invalid(_))
    ));
    drop(c);
    let seen = seen.join().unwrap();
    // argsz: the header, the report's range and page size, and its bitmap (2 words each).
    let argsz: Vec<u32> = seen.iter().map(|(_, b)| u32_at(b, 0)).collect();
    assert_eq!(argsz, [8 + 24 + 16, 8 + 24 + 16]);
    let reports: Vec<(u32, u64, u64, u64)> = seen
        .iter()
        .map(|(_, b)| (u32_at(b, 4), u64_at(b, 8), u64_at(b, 16), u64_at(b, 24)))
        .collect();
    let get = VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT | VFIO_DEVICE_FEATURE_GET;
    assert_eq!(
        reports,
        [
            (get, 0x10_0000, 128 * 4096, 4096),
            (get, 0x10_0000 + 128 * 4096, 72 * 4096, 4096)
        ]
    );
    // Another range; a bitmap of the wrong size.
    for bad in [
        |b: &[u8]| {
            let mut r = b[..32].to_vec();
            r[8] ^= 0x10;
            r.extend_from_slice(&[0; 8]);
            r
        },
        |b: &[u8]| {
            let mut r = b[..32].to_vec();
            r.extend_from_slice(&[0; 16]);
            r
        },
    ] {
        let (mut c, _) = answering(caps, move |_, body| Ok(bad(body)));
        let mut bitmap = [0u64; 1];
        assert!(matches!(
            c.dma_logging_report(0, 64 * 4096, 4096, &mut bitmap),
            Err(VfioUserError::Protocol { .. })
        ));
    }
}

/// The DMA backend over a scripted server that refuses the features (no migration, no DMA
/// logging) and answers DMA_MAP with the errnos of `map_errnos` in turn: a server out of
/// memory or of map slots is NOMEM to the guest, another refusal is DEVERR, and a malformed
/// reply fails the device for good. Without DMA logging, dirty tracking is unsupported.
#[test]
fn the_dma_backend_turns_server_errors_into_the_guests_statuses() {
    use crate::passthrough::vfio_user_backend::{SharedRam, VfioUserDevice, VfioUserDma};
    use iommu::backend::{BackendError, DmaBackend};
    let path = std::env::temp_dir().join(format!("vu-errs-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        one_region_handshake(&mut s, "{}");
        let mut errnos = [libc::ENOMEM, libc::ENOSPC, libc::EINVAL].into_iter();
        while let Some((id, cmd, _)) = next_request(&mut s) {
            let errno = if cmd == CMD_DEVICE_FEATURE {
                Some(libc::ENOTTY)
            } else {
                errnos.next()
            };
            let msg = match errno {
                Some(e) => header(id, cmd, 16, FLAG_REPLY | FLAG_ERROR, e as u32),
                // A reply to another message.
                None => header(id.wrapping_add(1), cmd, 16, FLAG_REPLY, 0),
            };
            s.write_all(&msg).unwrap();
        }
    });
    let dev = VfioUserDevice::connect(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let f = dev.features();
    assert!(f.migration.is_none() && !f.dma_logging);
    let memfd = std::sync::Arc::new(tempfile_memfd());
    let ram = SharedRam {
        memfd,
        ranges: vec![(0, 1 << 20, 0)],
    };
    let mut dma = VfioUserDma::new(dev.clone(), ram);
    assert!(!dma.caps().dirty_tracking);
    assert_eq!(dma.set_dirty_tracking(true), Err(BackendError::Unsupported));
    let mut bits = [0u64; 1];
    assert_eq!(
        dma.read_dirty(0, 4096, &mut bits, true),
        Err(BackendError::Unsupported)
    );
    let mut map = || dma.map(0x1000, 0x1000, 0x1000, iommu::Perm::RW);
    assert!(matches!(map(), Err(BackendError::NoMemory(_))));
    assert!(matches!(map(), Err(BackendError::NoMemory(_))));
    assert!(matches!(map(), Err(BackendError::Failed(_))));
    assert!(!dev.failed_flag().load(std::sync::atomic::Ordering::Acquire));
    assert!(matches!(map(), Err(BackendError::Failed(_))));
    assert!(
        dev.failed_flag().load(std::sync::atomic::Ordering::Acquire),
        "a malformed reply fails the device"
    );
    drop((dma, dev));
    server.join().unwrap();
}

/// A 1 MiB memfd.
fn tempfile_memfd() -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: a new descriptor, checked, owned by the File.
    let fd = unsafe { libc::memfd_create(c"vu-errs".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: as above.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(1 << 20).unwrap();
    f
}

/// The region accesses `(command, region, offset)` a scripted server saw.
type RegionAccesses = thread::JoinHandle<Vec<(u16, u32, u64)>>;

/// A vfio-user device at a socket of its own whose server announces `caps` and the regions
/// `regions` (a `struct vfio_region_info` each, with that many eventfds attached as its
/// file), refuses every feature, confirms region writes and answers a read of `n` bytes at
/// `(region, offset)` with `read_back(region, offset, n)`. The server's thread returns the
/// `(command, region, offset)` of each region access.
fn scripted_device(
    caps: &'static str,
    regions: Vec<(Vec<u8>, usize)>,
    read_back: impl Fn(u32, u64, usize) -> Vec<u8> + Send + 'static,
) -> (
    crate::passthrough::vfio_user_backend::VfioUserDevice,
    RegionAccesses,
) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("vu-dev-{}-{n}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut accesses = Vec::new();
        while let Some((id, cmd, body)) = next_request(&mut s) {
            let (r, fds): (Vec<u8>, usize) = match cmd {
                CMD_VERSION => {
                    let mut v = vec![0, 0, 1, 0];
                    v.extend_from_slice(format!(r#"{{"capabilities":{caps}}}"#).as_bytes());
                    v.push(0);
                    (v, 0)
                }
                CMD_DEVICE_GET_INFO => {
                    let mut info = 16u32.to_le_bytes().to_vec();
                    info.extend_from_slice(&0u32.to_le_bytes());
                    info.extend_from_slice(&(regions.len() as u32).to_le_bytes());
                    info.extend_from_slice(&0u32.to_le_bytes());
                    (info, 0)
                }
                CMD_DEVICE_GET_REGION_INFO => {
                    let index = u32_at(&body, 8);
                    let (mut r, fds) = regions[index as usize].clone();
                    r[8..12].copy_from_slice(&index.to_le_bytes());
                    (r, fds)
                }
                CMD_REGION_READ | CMD_REGION_WRITE => {
                    let (offset, region, count) =
                        (u64_at(&body, 0), u32_at(&body, 8), u32_at(&body, 12));
                    accesses.push((cmd, region, offset));
                    let mut r = body[..16].to_vec();
                    if cmd == CMD_REGION_READ {
                        r.extend(read_back(region, offset, count as usize));
                    }
                    (r, 0)
                }
                _ => {
                    let e = header(id, cmd, 16, FLAG_REPLY | FLAG_ERROR, libc::ENOTTY as u32);
                    s.write_all(&e).unwrap();
                    continue;
                }
            };
            let files: Vec<vmm_sys_util::eventfd::EventFd> = (0..fds)
                .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
                .collect();
            let raw: Vec<RawFd> = files.iter().map(|e| e.as_raw_fd()).collect();
            s.send_with_fds(&[&reply(id, cmd, &r)[..]], &raw).unwrap();
        }
        accesses
    });
    let dev = crate::passthrough::vfio_user_backend::VfioUserDevice::connect(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    (dev, server)
}

/// A region's info: `size` bytes at file offset 0x5000, with a sparse-mmap area
/// `(0x1000, 0x1000)` and the MMAP flag when `mappable`.
fn scripted_region(size: u64, mappable: bool) -> (Vec<u8>, usize) {
    let mut b = (if mappable { 64u32 } else { 32 }).to_le_bytes().to_vec();
    let flags: u32 = if mappable { 0x3 | 0x4 | 0x8 } else { 0x3 };
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(if mappable { 32u32 } else { 0 }).to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&0x5000u64.to_le_bytes());
    if mappable {
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&0x1000u64.to_le_bytes());
    }
    (b, usize::from(mappable))
}

/// The backend's view of a scripted device: an extension whose region is empty is not
/// offered; page requests need a region of at least 0x40 bytes and a device that reads the
/// enable bit back; a mappable area lies at the region's file offset plus its own.
#[test]
fn the_backend_takes_extensions_page_requests_and_areas_as_the_server_gives_them() {
    use crate::passthrough::PassthroughBackend;
    let caps = r#"{"vmm-fault-log":{"region":0},"vmm-page-request":{"region":1}}"#;
    // Region 0 empty; region 1 of 0x40 bytes; region 2 mappable.
    let regions = vec![
        scripted_region(0, false),
        scripted_region(0x40, false),
        scripted_region(0x4000, true),
    ];
    let (dev, server) = scripted_device(caps, regions.clone(), |_, _, n| vec![1; n]);
    let f = dev.features();
    assert_eq!((f.fault_log, f.page_request), (None, Some(1)));
    assert!(dev.enable_page_requests().unwrap());
    let areas = dev.mmap_areas(2);
    let got: Vec<(u64, u64, u64)> = areas
        .iter()
        .map(|a| (a.offset, a.size, a.file_offset))
        .collect();
    assert_eq!(got, [(0x1000, 0x1000, 0x6000)]);
    drop((dev, areas));
    // Enabled, then read back at 0.
    assert_eq!(
        server.join().unwrap(),
        [(CMD_REGION_WRITE, 1, 0), (CMD_REGION_READ, 1, 0)]
    );
    // A device that reads the enable bit back as 0 did not turn requests on.
    let (dev, _) = scripted_device(caps, regions.clone(), |_, _, n| vec![0; n]);
    assert!(!dev.enable_page_requests().unwrap());
    // A region too small for the interface: not touched.
    let small = vec![scripted_region(0, false), scripted_region(0x3f, false)];
    let (dev, server) = scripted_device(caps, small, |_, _, n| vec![1; n]);
    assert!(!dev.enable_page_requests().unwrap());
    drop(dev);
    assert_eq!(server.join().unwrap(), []);
    // A pending request read whole: every byte of its id, IOVA and flags counts.
    let (dev, _) = scripted_device(caps, regions, |region, offset, n| {
        assert_eq!((region, offset, n), (1, 0, 0x18));
        let mut r = 1u32.to_le_bytes().to_vec();
        r.extend_from_slice(&1u32.to_le_bytes());
        r.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        r.extend_from_slice(&0x0101_0101u32.to_le_bytes());
        r.extend_from_slice(&0x0a0b_0c0du32.to_le_bytes());
        r
    });
    assert_eq!(
        dev.take_page_request().unwrap(),
        Some((0x0a0b_0c0d, 0x1122_3344_5566_7788, true))
    );
}
