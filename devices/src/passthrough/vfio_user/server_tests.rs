//! The client against the project's own server (the DMA test device on the patched
//! `vfio_user` crate), message by message and both directions: VERSION capabilities,
//! DEVICE_FEATURE (migration v2 states, DMA logging), MIG_DATA_READ/WRITE, and the server's
//! DMA_READ/DMA_WRITE answered through a `dma=messages` table.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_GET,
};
use vm_memory::{Bytes, GuestAddress};

use super::caps::ext;
use super::*;
use crate::passthrough::message_dma::MessageDma;
use crate::passthrough::vfio_user_backend::VfioUserDevice;
use crate::GuestMemoryMmap;
use iommu::Perm;
use testdev::{mig, regs, DirtyLogMode};

/// A test device served on a fresh socket in this process, and a client connected to it.
fn device(log: DirtyLogMode) -> (VfioUserClient, JoinHandle<()>, PathBuf) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("vu-srv-{}-{n}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let p = path.clone();
    let t = std::thread::spawn(move || {
        let how = testdev::Behaviour {
            dirty_log: log,
            ..Default::default()
        };
        let _ = testdev::serve(&p, how);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        match VfioUserClient::connect(&path, Duration::from_secs(5)) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("no test device: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    (c, t, path)
}

/// A zeroed anonymous file of `len` bytes (guest RAM shared by descriptor).
fn memfile(len: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: a new descriptor, checked, owned by the File.
    let fd = unsafe { libc::memfd_create(c"vu-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: as above.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

fn w64(c: &mut VfioUserClient, reg: u64, v: u64) {
    c.region_write(0, reg, &v.to_le_bytes()).unwrap();
}

fn r64(c: &mut VfioUserClient, reg: u64) -> u64 {
    let mut b = [0u8; 8];
    c.region_read(0, reg, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Starts a fill of `len` bytes of `value` at `dst` and polls the status register until the
/// device is no longer busy (each poll is a request, during which the client answers the
/// device's DMA messages). Returns the status and the error register.
fn fill(c: &mut VfioUserClient, dst: u64, len: u64, value: u8) -> (u32, u32) {
    w64(c, regs::DST, dst);
    w64(c, regs::LEN, len);
    c.region_write(0, regs::OP, &testdev::OP_FILL.to_le_bytes())
        .unwrap();
    c.region_write(0, regs::FILL, &u32::from(value).to_le_bytes())
        .unwrap();
    c.region_write(0, regs::DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = r64(c, regs::STATUS) as u32;
        if status != testdev::STATUS_BUSY {
            return (status, r64(c, regs::ERROR) as u32);
        }
        assert!(Instant::now() < deadline, "the device never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn the_server_announces_its_limits_and_extensions_by_name() {
    let (c, t, _) = device(DirtyLogMode::On);
    let caps = c.caps().clone();
    assert_eq!(caps.max_data_xfer_size, 1 << 20);
    assert_eq!(caps.max_msg_fds, 16);
    assert_eq!(caps.pgsizes, 4096);
    assert_eq!(caps.migration.map(|m| m.pgsize), Some(4096));
    assert_eq!(
        caps.extension_region(ext::FAULT_LOG),
        Some(testdev::REGION_FAULT_LOG)
    );
    assert_eq!(
        caps.extension_region(ext::PAGE_REQUEST),
        Some(testdev::REGION_PAGE_REQUEST)
    );
    assert!(caps.has_extension(ext::SPLIT_UNMAP));
    drop(c);
    t.join().unwrap();
}

#[test]
fn migration_v2_states_and_data_through_device_feature_and_mig_data() {
    let (mut a, ta, _) = device(DirtyLogMode::On);
    let m = a.migration_feature().unwrap().expect("migration offered");
    assert!(m.stop_copy() && !m.p2p() && !m.pre_copy(), "{m:?}");
    assert_eq!(a.mig_state().unwrap(), mig::RUNNING);
    w64(&mut a, regs::DELAY_US, 77);
    // An arc the server does not take: refused with its errno, the state unchanged.
    let e = a.set_mig_state(mig::STOP_COPY).unwrap_err();
    assert!(
        matches!(e, VfioUserError::Refused { command: "DEVICE_FEATURE", errno } if errno == libc::EINVAL as u32),
        "{e}"
    );
    assert_eq!(a.mig_state().unwrap(), mig::RUNNING);
    // Reading data outside a saving state is refused.
    assert!(a.read_mig_data().is_err());
    assert_eq!(a.set_mig_state(mig::STOP).unwrap(), mig::STOP);
    a.set_mig_state(mig::STOP_COPY).unwrap();
    let data = a.read_mig_data().unwrap();
    assert!(!data.is_empty());
    a.set_mig_state(mig::STOP).unwrap();

    let (mut b, tb, _) = device(DirtyLogMode::On);
    b.set_mig_state(mig::STOP).unwrap();
    b.set_mig_state(mig::RESUMING).unwrap();
    // Written in pieces smaller than the data: a stream, not one message.
    for part in data.chunks(7) {
        b.write_mig_data(part).unwrap();
    }
    b.set_mig_state(mig::STOP).unwrap();
    b.set_mig_state(mig::RUNNING).unwrap();
    assert_eq!(
        r64(&mut b, regs::DELAY_US) as u32,
        77,
        "the registers moved"
    );
    // Bad data fails the RESUMING -> STOP arc.
    b.set_mig_state(mig::STOP).unwrap();
    b.set_mig_state(mig::RESUMING).unwrap();
    b.write_mig_data(b"{not json").unwrap();
    assert!(b.set_mig_state(mig::STOP).is_err());
    drop((a, b));
    ta.join().unwrap();
    tb.join().unwrap();
}

#[test]
fn dma_logging_reports_the_pages_written_and_clears_them() {
    let (mut c, t, _) = device(DirtyLogMode::On);
    assert!(c.dma_logging_supported().unwrap());
    // GET is not a method of DMA_LOGGING_START.
    assert!(!c
        .probe_feature(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            VFIO_DEVICE_FEATURE_GET
        )
        .unwrap());
    let f = memfile(1 << 20);
    c.dma_map(0x100000, 1 << 20, Some(&f), 0, DMA_MAP_READ | DMA_MAP_WRITE)
        .unwrap();
    assert_eq!(c.dma_logging_start(4096, &[]).unwrap(), 4096);
    assert_eq!(
        fill(&mut c, 0x103000, 0x2000, 0x5a),
        (testdev::STATUS_DONE, 0)
    );
    assert_eq!(
        fill(&mut c, 0x1ff000, 0x10, 0x5a),
        (testdev::STATUS_DONE, 0)
    );
    let mut bits = vec![0u64; 4];
    c.dma_logging_report(0x100000, 1 << 20, 4096, &mut bits)
        .unwrap();
    let pages: Vec<u64> = (0..256)
        .filter(|p| bits[*p as usize / 64] >> (p % 64) & 1 == 1)
        .collect();
    assert_eq!(pages, vec![3, 4, 255]);
    // Read once: the next report is empty.
    let mut again = vec![0u64; 4];
    c.dma_logging_report(0x100000, 1 << 20, 4096, &mut again)
        .unwrap();
    assert_eq!(again, vec![0; 4]);
    c.dma_logging_stop().unwrap();
    // A report after STOP is refused.
    assert!(c
        .dma_logging_report(0x100000, 4096, 4096, &mut again)
        .is_err());
    drop(c);
    t.join().unwrap();

    // A server without a log says so: the VMM then counts its mappings dirty.
    let (mut c, t, _) = device(DirtyLogMode::Off);
    assert!(!c.dma_logging_supported().unwrap());
    assert!(matches!(
        c.dma_logging_start(4096, &[]),
        Err(VfioUserError::Refused { .. })
    ));
    drop(c);
    t.join().unwrap();
}

#[test]
fn a_report_is_split_at_the_largest_bitmap_the_server_takes() {
    let (mut c, t, _) = device(DirtyLogMode::On);
    let f = memfile(1 << 20);
    c.dma_map(0, 1 << 20, Some(&f), 0, DMA_MAP_READ | DMA_MAP_WRITE)
        .unwrap();
    c.dma_logging_start(4096, &[]).unwrap();
    assert_eq!(fill(&mut c, 0xff000, 8, 1), (testdev::STATUS_DONE, 0));
    // 8 bytes of bitmap per report: 64 pages each, four reports for 1 MiB.
    c.caps.migration = Some(caps::MigrationCaps {
        pgsize: 4096,
        max_bitmap_size: 8,
    });
    let before = c.next_id;
    let mut bits = vec![0u64; 4];
    c.dma_logging_report(0, 1 << 20, 4096, &mut bits).unwrap();
    assert_eq!(c.next_id.wrapping_sub(before), 4);
    assert_eq!(bits, vec![0, 0, 0, 1 << 63]);
    drop(c);
    t.join().unwrap();
}

fn guest_mem() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap())
}

#[test]
fn dma_by_messages_reaches_only_what_is_mapped_with_its_permissions() {
    let (mut c, t, _) = device(DirtyLogMode::On);
    let mem = guest_mem();
    let table = Arc::new(MessageDma::new(mem.clone(), None));
    c.set_dma_access(table.clone());
    // Mapped without a descriptor: the device reaches it only by message.
    c.dma_map(0x200000, 0x10000, None, 0, DMA_MAP_READ | DMA_MAP_WRITE)
        .unwrap();
    table.map(0x200000, 0x100000, 0x10000, Perm::RW).unwrap();
    // The guest mapped this page read-only; the device is told read-write (a server that
    // ignores its mappings' permissions): the VMM's table decides.
    c.dma_map(0x300000, 0x1000, None, 0, DMA_MAP_READ | DMA_MAP_WRITE)
        .unwrap();
    table.map(0x300000, 0x180000, 0x1000, Perm::READ).unwrap();
    // A fill of 3 pages arrives in guest memory, written by the VMM on the device's behalf.
    assert_eq!(
        fill(&mut c, 0x201000, 0x3000, 0xa5),
        (testdev::STATUS_DONE, 0)
    );
    let mut got = vec![0u8; 0x3000];
    mem.read_slice(&mut got, GuestAddress(0x101000)).unwrap();
    assert!(got.iter().all(|&b| b == 0xa5));
    assert!(c.served().1 >= 3, "{:?}", c.served());
    // Read-only for the device: refused, memory unchanged, a fault for the guest.
    mem.write_slice(&[0x11; 16], GuestAddress(0x180000))
        .unwrap();
    let (status, err) = fill(&mut c, 0x300000, 16, 0xee);
    assert_eq!(
        (status, err),
        (testdev::STATUS_ERROR, testdev::ERR_FAULT_WRITE)
    );
    let mut m = [0u8; 16];
    mem.read_slice(&mut m, GuestAddress(0x180000)).unwrap();
    assert_eq!(m, [0x11; 16]);
    // Mapped on the device's side but not in the VMM's table (the guest unmapped it): the
    // VMM's word is final.
    c.dma_map(0x400000, 0x1000, None, 0, DMA_MAP_READ | DMA_MAP_WRITE)
        .unwrap();
    let (status, err) = fill(&mut c, 0x400000, 16, 0xee);
    assert_eq!(
        (status, err),
        (testdev::STATUS_ERROR, testdev::ERR_FAULT_WRITE)
    );
    assert_eq!(
        table.take_faults(),
        vec![(0x300000, true), (0x400000, true)]
    );
    drop(c);
    t.join().unwrap();
}

#[test]
fn region_io_fds_give_the_doorbell_an_eventfd_and_bar2_a_mappable_file() {
    let (mut c, t, _) = device(DirtyLogMode::On);
    // BAR 0: one ioeventfd, at the doorbell, without datamatch; none elsewhere.
    let subs = c.region_io_fds(0).unwrap();
    assert_eq!(subs.len(), 1);
    let (offset, size, datamatch, file) = &subs[0];
    assert_eq!((*offset, *size, *datamatch), (regs::DOORBELL, 4, None));
    assert!(c.region_io_fds(2).unwrap().is_empty());
    // Writing the eventfd rings the doorbell: a fill runs, and the status read after it
    // sees it (the device drains the eventfd before answering a register read).
    let f = memfile(1 << 20);
    c.dma_map(0x100000, 1 << 20, Some(&f), 0, DMA_MAP_READ | DMA_MAP_WRITE)
        .unwrap();
    w64(&mut c, regs::DST, 0x100000);
    w64(&mut c, regs::LEN, 4096);
    c.region_write(0, regs::OP, &testdev::OP_FILL.to_le_bytes())
        .unwrap();
    std::io::Write::write_all(&mut &**file, &1u64.to_le_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while r64(&mut c, regs::STATUS) as u32 != testdev::STATUS_DONE {
        assert!(
            Instant::now() < deadline,
            "the eventfd did not ring the doorbell"
        );
    }
    assert_eq!(r64(&mut c, regs::DOORBELL_MESSAGES), 0);
    // BAR 2's file, as the region info gave it, holds the magic.
    let m = c.region_mmap(2).expect("BAR 2 is mappable").clone();
    assert_eq!(m.areas, vec![(0, testdev::BAR2_SIZE)]);
    let mut magic = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&*m.file, &mut magic, m.file_offset).unwrap();
    assert_eq!(u32::from_le_bytes(magic), testdev::BAR2_MAGIC);
    assert!(c.region_mmap(0).is_none());
    drop(c);
    t.join().unwrap();
}

/// The passthrough backend over the test device: it names itself, shows its regions and
/// vectors, reads its registers, migrates (STOP, STOP_COPY with data, back to RUNNING),
/// and hands over the faults the device logged, each once, `(iova, write)`.
/// The passthrough backend over a test device served in this process on a socket named
/// `name`, behaving as `how`: the backend, the serving thread, the socket.
fn backend_device_with(
    name: &str,
    how: testdev::Behaviour,
) -> (VfioUserDevice, JoinHandle<()>, PathBuf) {
    let path = std::env::temp_dir().join(format!("vu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let p = path.clone();
    let t = std::thread::spawn(move || {
        let _ = testdev::serve(&p, how);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let d = loop {
        match VfioUserDevice::connect(&path) {
            Ok(d) => break d,
            Err(e) if Instant::now() > deadline => panic!("no test device: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    (d, t, path)
}

/// Polls the backend's status register until the device is no longer busy (10 s at most);
/// returns the status.
fn finished(d: &mut VfioUserDevice) -> u32 {
    use crate::passthrough::PassthroughBackend;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut b = [0u8; 4];
        d.region_read(0, regs::STATUS, &mut b).unwrap();
        let s = u32::from_le_bytes(b);
        if s != testdev::STATUS_BUSY {
            return s;
        }
        assert!(Instant::now() < deadline, "the device never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// [`backend_device_with`] the default behaviour.
fn backend_device(name: &str) -> (VfioUserDevice, JoinHandle<()>, PathBuf) {
    backend_device_with(name, Default::default())
}

#[test]
fn the_backend_over_the_test_device() {
    use crate::passthrough::{mig_state, PassthroughBackend, VFIO_PCI_MSIX_IRQ_INDEX};
    let (mut d, t, path) = backend_device("backend");
    assert!(d.describe().contains(&path.display().to_string()));
    assert_eq!(d.region(0).map(|r| r.size), Some(testdev::BAR0_SIZE));
    assert_eq!(
        d.irq_count(VFIO_PCI_MSIX_IRQ_INDEX).unwrap(),
        testdev::MSIX_VECTORS
    );
    let mut id = [0u8; 4];
    d.region_read(0, regs::ID, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), testdev::ID_VALUE);
    assert!(d.features().fault_log.is_some());
    assert!(d.socket_fd() > 2);

    // BAR 0's doorbell takes an ioeventfd; BAR 2 is mapped from the file the server gave.
    let doorbell: Vec<u64> = d.io_eventfds(0).iter().map(|e| e.0).collect();
    assert_eq!(doorbell, [regs::DOORBELL]);
    assert!(d.io_eventfds(2).is_empty());
    let areas = d.mmap_areas(2);
    assert_eq!(areas.len(), 1);
    assert_eq!((areas[0].offset, areas[0].size), (0, testdev::BAR2_SIZE));
    let mut magic = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&*areas[0].file, &mut magic, areas[0].file_offset)
        .unwrap();
    assert_eq!(u32::from_le_bytes(magic), testdev::BAR2_MAGIC);
    assert!(d.mmap_areas(0).is_empty());

    // Its state moves to another device: STOP_COPY's data, written in RESUMING.
    assert!(d.supports_migration());
    d.region_write(0, regs::DELAY_US, &0x1234u32.to_le_bytes())
        .unwrap();
    d.set_migration_state(mig_state::STOP).unwrap();
    d.set_migration_state(mig_state::STOP_COPY).unwrap();
    let data = d.read_migration_data().unwrap();
    let (mut to, t2, _) = backend_device("backend-to");
    to.set_migration_state(mig_state::STOP).unwrap();
    to.set_migration_state(mig_state::RESUMING).unwrap();
    to.write_migration_data(&data).unwrap();
    to.set_migration_state(mig_state::STOP).unwrap();
    to.set_migration_state(mig_state::RUNNING).unwrap();
    let mut delay = [0u8; 4];
    to.region_read(0, regs::DELAY_US, &mut delay).unwrap();
    assert_eq!(u32::from_le_bytes(delay), 0x1234, "the state arrived");
    // A reset puts the registers back.
    to.reset().unwrap();
    to.region_read(0, regs::DELAY_US, &mut delay).unwrap();
    assert_eq!(u32::from_le_bytes(delay), 0);
    drop(to);
    t2.join().unwrap();
    d.set_migration_state(mig_state::STOP).unwrap();
    d.set_migration_state(mig_state::RUNNING).unwrap();
    // A device without migration says so, and refuses every state by name.
    let (mut fixed, t3, _) = backend_device_with(
        "backend-fixed",
        testdev::Behaviour {
            no_migration: true,
            ..Default::default()
        },
    );
    assert!(!fixed.supports_migration());
    let e = fixed.set_migration_state(mig_state::STOP).unwrap_err();
    assert!(e.to_string().contains("does not support migration"), "{e}");
    drop(fixed);
    t3.join().unwrap();

    assert_eq!(d.take_faults().unwrap(), vec![]);
    let w = |d: &mut VfioUserDevice, reg: u64, v: u64, n: usize| {
        d.region_write(0, reg, &v.to_le_bytes()[..n]).unwrap()
    };
    w(&mut d, regs::DST, 0x10_0000, 8);
    w(&mut d, regs::LEN, 4096, 8);
    w(&mut d, regs::OP, u64::from(testdev::OP_FILL), 4);
    w(&mut d, regs::DOORBELL, 1, 4);
    let deadline = Instant::now() + Duration::from_secs(10);
    let faults = loop {
        let f = d.take_faults().unwrap();
        if !f.is_empty() {
            break f;
        }
        assert!(Instant::now() < deadline, "no fault logged");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(faults, vec![(0x10_0000, true)]);
    assert_eq!(d.take_faults().unwrap(), vec![]);
    drop(d);
    t.join().unwrap();
}

/// Page requests through the backend (the `vmm-page-request` extension): turned on, the
/// device's transfer to an IOVA it cannot reach stalls on a request `(id, iova, write)`; an
/// answer for another id changes nothing; INVALID faults the access (logged), RETRY redoes
/// it (here still unmapped: a new request). The device counts requests, retries, invalid
/// answers and timeouts.
#[test]
fn page_requests_through_the_backend() {
    use crate::passthrough::PassthroughBackend;
    let (mut d, t, _) = backend_device("prq");
    assert!(d.features().page_request.is_some());
    assert_eq!(d.take_page_request().unwrap(), None, "off: nothing pending");
    assert!(d.enable_page_requests().unwrap());
    assert_eq!(d.page_request_counters().unwrap(), [0; 4]);
    let w = |d: &mut VfioUserDevice, reg: u64, v: u64, n: usize| {
        d.region_write(0, reg, &v.to_le_bytes()[..n]).unwrap()
    };
    let pending = |d: &VfioUserDevice| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = d.take_page_request().unwrap() {
                return r;
            }
            assert!(Instant::now() < deadline, "no page request");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // A fill of an IOVA nothing maps: a write request.
    w(&mut d, regs::DST, 0x12_3000, 8);
    w(&mut d, regs::LEN, 4096, 8);
    w(&mut d, regs::OP, u64::from(testdev::OP_FILL), 4);
    w(&mut d, regs::DOORBELL, 1, 4);
    let (id, iova, write) = pending(&d);
    assert_eq!((iova, write), (0x12_3000, true));
    d.answer_page_request(id.wrapping_add(1), ext::PRQ_INVALID)
        .unwrap();
    assert_eq!(pending(&d), (id, 0x12_3000, true), "still the same request");
    d.answer_page_request(id, ext::PRQ_INVALID).unwrap();
    assert_eq!(finished(&mut d), testdev::STATUS_ERROR);
    assert_eq!(d.take_faults().unwrap(), vec![(0x12_3000, true)]);
    assert_eq!(d.page_request_counters().unwrap(), [1, 0, 1, 0]);
    // A copy from an unmapped source: a read request; RETRY with nothing mapped asks again.
    w(&mut d, regs::SRC, 0x45_6000, 8);
    w(&mut d, regs::OP, u64::from(testdev::OP_COPY), 4);
    w(&mut d, regs::DOORBELL, 1, 4);
    let (id, iova, write) = pending(&d);
    assert_eq!((iova, write), (0x45_6000, false));
    d.answer_page_request(id, ext::PRQ_RETRY).unwrap();
    let (again, iova, write) = pending(&d);
    assert_ne!(again, id, "a new request");
    assert_eq!((iova, write), (0x45_6000, false));
    d.answer_page_request(again, ext::PRQ_INVALID).unwrap();
    assert_eq!(finished(&mut d), testdev::STATUS_ERROR);
    assert_eq!(
        d.take_faults().unwrap(),
        vec![(0x45_6000, false)],
        "a read fault"
    );
    assert_eq!(d.page_request_counters().unwrap(), [3, 1, 2, 0]);
    drop(d);
    t.join().unwrap();
}

/// Guest RAM as the device maps it: 1 MiB at GPA 0 (file offset 0) and 1 MiB at 4 GiB (file
/// offset 1 MiB) of one 2 MiB memfd.
fn shared_ram() -> crate::passthrough::vfio_user_backend::SharedRam {
    crate::passthrough::vfio_user_backend::SharedRam {
        memfd: Arc::new(memfile(2 << 20)),
        ranges: vec![(0, 1 << 20, 0), (1 << 32, 1 << 20, 1 << 20)],
    }
}

/// A GPA range's memfd offset: inside one RAM range (up to its last byte), never across one
/// or outside all.
#[test]
fn shared_ram_finds_a_ranges_file_offset() {
    let ram = shared_ram();
    assert_eq!(ram.offset_of(0x1000, 0x1000), Some(0x1000));
    assert_eq!(ram.offset_of(0xf_f000, 0x1000), Some(0xf_f000));
    assert_eq!(ram.offset_of((1 << 32) + 0x2000, 0x1000), Some(0x10_2000));
    assert_eq!(ram.offset_of(0xf_f000, 0x2000), None, "past the range");
    assert_eq!(ram.offset_of(0x10_0000, 0x1000), None, "in the hole");
    assert_eq!(ram.offset_of(u64::MAX - 0xfff, 0x2000), None, "wraps");
}

/// The vfio-user DMA backend over the test device: it names the device and declares what the
/// server offers (DMA logging, merging with `vmm-split-unmap` unless told not to); a map
/// makes the guest's RAM reachable at the IOVA with the guest's permissions (the device
/// writes land in the memfd at the GPA's offset, and a read-only mapping refuses writes);
/// dirty tracking reports the pages written, clearing them; an unmap takes the range away.
/// GPAs outside RAM are refused, and a failed device takes no more calls.
#[test]
fn the_dma_backend_maps_guest_ram_with_its_permissions_and_tracks_writes() {
    use crate::passthrough::vfio_user_backend::VfioUserDma;
    use crate::passthrough::PassthroughBackend;
    use iommu::backend::{BackendError, DmaBackend};
    use std::os::unix::fs::FileExt;
    let (d, t, _) = backend_device("dma");
    let ram = shared_ram();
    let mut dma = VfioUserDma::new(d.clone(), ram.clone());
    assert_eq!(dma.name(), d.describe());
    let caps = dma.caps();
    assert!(caps.dirty_tracking && caps.merge_maps && caps.merge_unmaps);
    let caps = VfioUserDma::new(d.clone(), ram.clone())
        .without_merging()
        .caps();
    assert!(caps.dirty_tracking && !caps.merge_maps && !caps.merge_unmaps);

    let mut dev = d.clone();
    let mut op = |op: u32, src: u64, dst: u64, len: u64| {
        for (reg, v, n) in [
            (regs::SRC, src, 8),
            (regs::DST, dst, 8),
            (regs::LEN, len, 8),
            (regs::OP, u64::from(op), 4),
            (regs::FILL, 0x5a, 4),
            (regs::DOORBELL, 1, 4),
        ] {
            dev.region_write(0, reg, &v.to_le_bytes()[..n]).unwrap();
        }
        finished(&mut dev)
    };
    // Two pages read-write above 4 GiB, one read-only below.
    dma.map(0x20_0000, (1 << 32) + 0x3000, 0x2000, Perm::RW)
        .unwrap();
    dma.map(0x30_0000, 0x5000, 0x1000, Perm::READ).unwrap();
    assert_eq!(*dma.calls.lock().unwrap(), (2, 0));
    assert_eq!(
        dma.mapped_bytes.load(std::sync::atomic::Ordering::Relaxed),
        0x3000
    );
    dma.set_dirty_tracking(true).unwrap();
    assert_eq!(
        op(testdev::OP_FILL, 0, 0x20_1000, 0x1000),
        testdev::STATUS_DONE
    );
    let mut page = [0u8; 0x1000];
    ram.memfd
        .read_exact_at(&mut page, (1 << 20) + 0x4000)
        .unwrap();
    assert_eq!(page, [0x5a; 0x1000], "at the GPA's offset in the memfd");
    // Reads from the read-only page work; writes to it fault.
    assert_eq!(
        op(testdev::OP_COPY, 0x30_0000, 0x20_0000, 0x1000),
        testdev::STATUS_DONE
    );
    assert_eq!(
        op(testdev::OP_FILL, 0, 0x30_0000, 0x1000),
        testdev::STATUS_ERROR
    );
    let mut bits = [0u64; 1];
    dma.read_dirty(0x20_0000, 0x2000, &mut bits, true).unwrap();
    assert_eq!(bits[0], 0b11, "both pages written");
    let mut bits = [0u64; 1];
    dma.read_dirty(0x20_0000, 0x2000, &mut bits, true).unwrap();
    assert_eq!(bits[0], 0, "cleared by the report");
    assert_eq!(
        dma.read_dirty(0x20_0000, 0x2000, &mut bits, false),
        Err(BackendError::Unsupported),
        "a report always clears"
    );
    // An unmap that reads the range's dirty pages: the write before it is in the bitmap.
    assert_eq!(
        op(testdev::OP_FILL, 0, 0x20_0000, 0x1000),
        testdev::STATUS_DONE
    );
    let mut bits = [0u64; 1];
    dma.unmap_read_dirty(0x20_0000, 0x2000, &mut bits).unwrap();
    assert_eq!(bits[0], 0b01);
    assert_eq!(*dma.calls.lock().unwrap(), (2, 1));
    dma.set_dirty_tracking(false).unwrap();
    assert_eq!(
        dma.mapped_bytes.load(std::sync::atomic::Ordering::Relaxed),
        0x1000
    );
    assert_eq!(
        op(testdev::OP_FILL, 0, 0x20_0000, 0x1000),
        testdev::STATUS_ERROR
    );
    assert!(matches!(
        dma.map(0x40_0000, 0x10_0000, 0x1000, Perm::RW),
        Err(BackendError::BadAddress(_))
    ));
    // A failed device: the guest's view stays consistent, nothing is sent.
    d.failed_flag()
        .store(true, std::sync::atomic::Ordering::Release);
    dma.map(0x50_0000, 0x6000, 0x1000, Perm::RW).unwrap();
    dma.unmap(0x30_0000, 0x1000).unwrap();
    assert_eq!(*dma.calls.lock().unwrap(), (2, 1));
    drop((dma, d, dev));
    t.join().unwrap();
}
