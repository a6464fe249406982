//! The vhost-user net device against a scripted back end in-process: a thread that speaks
//! the vhost-user protocol on a real Unix socket, answers what it is asked, records every
//! message, and sends IOTLB misses on the back-end channel when told to.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use iommu::protocol::*;
use iommu::testing::{attach, map, unmap};
use iommu::{Viommu, ViommuConfig};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserIotlb, VhostUserIotlbType, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::virtio::testing::{shared_test_memory, CountingInterrupt, TestQueue};

const MEM: usize = 16 << 20;
/// Endpoint of the device behind the vIOMMU.
const EP: u32 = 0x18;
/// Features DPDK 22.11's vhost PMD offers with `iommu-support=1`.
const DPDK_FEATURES: u64 = 0xf_7c66_e7cb;
/// Back-end protocol features DPDK offers (MQ, LOG_SHMFD, RARP, REPLY_ACK, MTU, BACKEND_REQ,
/// CONFIG ...).
const DPDK_PROTOCOL: u64 = 0xcbf;

/// One message the back end received: request code, body, number of file descriptors.
#[derive(Debug, Clone)]
struct Msg {
    code: u32,
    body: Vec<u8>,
    fds: usize,
}

impl Msg {
    fn is(&self, req: FrontendReq) -> bool {
        self.code == req as u32
    }
    fn obj<T: ByteValued>(&self) -> T {
        T::from_slice(&self.body[..std::mem::size_of::<T>()])
            .copied()
            .expect("body large enough")
    }
}

#[derive(Default)]
struct Log {
    msgs: Vec<Msg>,
    closed: bool,
    /// IOTLB messages wait for their acknowledgement while set.
    hold_iotlb_acks: bool,
}

/// A vhost-user back end run by a thread of the test.
struct Backend {
    socket: PathBuf,
    log: Arc<(Mutex<Log>, Condvar)>,
    /// The back-end channel (after SET_BACKEND_REQ_FD).
    channel: Arc<Mutex<Option<UnixStream>>>,
    /// The main connection, to hang up on the frontend.
    conn: Arc<Mutex<Option<UnixStream>>>,
    /// The dirty log's memfd (after SET_LOG_BASE).
    log_fd: Arc<Mutex<Option<std::fs::File>>>,
}

#[derive(Clone, Copy)]
struct Script {
    features: u64,
    protocol: u64,
    /// Answer GET_FEATURES with garbage instead.
    garbage: bool,
    /// GET_VRING_BASE answers this plus the ring's index.
    base: u32,
    /// Hang up on SET_LOG_BASE (a back end that dies as logging starts).
    hang_up_on_log_base: bool,
}

const DPDK: Script = Script {
    features: DPDK_FEATURES,
    protocol: DPDK_PROTOCOL,
    garbage: false,
    base: 40,
    hang_up_on_log_base: false,
};

fn reply(s: &UnixStream, code: u32, body: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    let _ = (&*s).write_all(&m);
}

impl Backend {
    fn start(script: Script) -> Backend {
        let socket = std::env::temp_dir().join(format!(
            "vmm-vu-{}-{:?}.sock",
            std::process::id(),
            std::thread::current().id()
        ));
        Self::start_at(socket, script)
    }

    /// A back end listening on `socket` (removed first, as a restarted back end does).
    fn start_at(socket: PathBuf, script: Script) -> Backend {
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let log: Arc<(Mutex<Log>, Condvar)> = Arc::default();
        let channel: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let conn: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let log_fd: Arc<Mutex<Option<std::fs::File>>> = Arc::default();
        let (l, ch, cn, lf) = (log.clone(), channel.clone(), conn.clone(), log_fd.clone());
        std::thread::spawn(move || {
            let Ok((s, _)) = listener.accept() else {
                return;
            };
            *cn.lock().unwrap() = s.try_clone().ok();
            Self::serve(&s, script, &l, &ch, &lf);
        });
        Backend {
            socket,
            log,
            channel,
            conn,
            log_fd,
        }
    }

    fn serve(
        s: &UnixStream,
        script: Script,
        log: &(Mutex<Log>, Condvar),
        channel: &Mutex<Option<UnixStream>>,
        log_fd: &Mutex<Option<std::fs::File>>,
    ) {
        let mut pending_fd: VecDeque<RawFd> = VecDeque::new();
        loop {
            // SET_BACKEND_REQ_FD carries the channel: take it before recv_msg closes it.
            let mut hdr = [0u8; 12];
            let mut fds = [-1 as RawFd; 8];
            let mut iov = [libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: 12,
            }];
            // SAFETY: `iov` points at `hdr`, which outlives the call.
            let got = unsafe { s.recv_with_fds(&mut iov, &mut fds) };
            let Ok((12, nfds)) = got else {
                break;
            };
            pending_fd.extend(&fds[..nfds]);
            let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size];
            if (&*s).read_exact(&mut body).is_err() {
                break;
            }
            // Recorded before any reply: a test that saw its request acknowledged finds the
            // message in the log.
            {
                let (m, cv) = log;
                m.lock().unwrap().msgs.push(Msg {
                    code,
                    body: body.clone(),
                    fds: nfds,
                });
                cv.notify_all();
            }
            let mut answered = false;
            match code {
                c if c == FrontendReq::GET_FEATURES as u32 => {
                    if script.garbage {
                        let _ = (&*s).write_all(b"\x01\x00\x00\x00garbage!");
                    } else {
                        reply(s, c, &script.features.to_le_bytes());
                    }
                    answered = true;
                }
                c if c == FrontendReq::GET_PROTOCOL_FEATURES as u32 => {
                    reply(s, c, &script.protocol.to_le_bytes());
                    answered = true;
                }
                c if c == FrontendReq::GET_VRING_BASE as u32 => {
                    let st = VhostUserVringState::from_slice(&body[..8])
                        .copied()
                        .unwrap();
                    // Where the ring stands: the script's base + its index.
                    let base = script.base.wrapping_add(st.index);
                    reply(s, c, VhostUserVringState::new(st.index, base).as_slice());
                    answered = true;
                }
                c if c == FrontendReq::SET_LOG_BASE as u32 && script.hang_up_on_log_base => {
                    break;
                }
                c if c == FrontendReq::SET_LOG_BASE as u32 => {
                    if let Some(fd) = pending_fd.pop_front() {
                        // SAFETY: a descriptor we just received and own.
                        *log_fd.lock().unwrap() = Some(unsafe { std::fs::File::from_raw_fd(fd) });
                    }
                    // As DPDK and QEMU's back ends: an empty reply.
                    reply(s, c, &[]);
                    answered = true;
                }
                c if c == FrontendReq::SET_BACKEND_REQ_FD as u32 => {
                    if let Some(fd) = pending_fd.pop_front() {
                        // SAFETY: a descriptor we just received and own.
                        *channel.lock().unwrap() = Some(unsafe { UnixStream::from_raw_fd(fd) });
                    }
                }
                _ => {}
            }
            for fd in pending_fd.drain(..) {
                // SAFETY: received descriptors are ours; closing them is all we do.
                drop(unsafe { std::fs::File::from_raw_fd(fd) });
            }
            if flags & 0x8 != 0 && !answered {
                if code == FrontendReq::IOTLB_MSG as u32 {
                    let (m, cv) = log;
                    let mut g = m.lock().unwrap();
                    while g.hold_iotlb_acks {
                        g = cv.wait(g).unwrap();
                    }
                }
                reply(s, code, &0u64.to_le_bytes());
            }
        }
        let (m, cv) = log;
        m.lock().unwrap().closed = true;
        cv.notify_all();
    }

    /// Waits until a message satisfies `f`; returns it.
    fn wait_for(&self, what: &str, f: impl Fn(&Msg) -> bool) -> Msg {
        let (m, cv) = &*self.log;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut g = m.lock().unwrap();
        loop {
            if let Some(msg) = g.msgs.iter().find(|m| f(m)) {
                return msg.clone();
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("the back end never got {what}"));
            g = cv.wait_timeout(g, left).unwrap().0;
        }
    }

    fn msgs(&self) -> Vec<Msg> {
        self.log.0.lock().unwrap().msgs.clone()
    }

    fn iotlb(&self) -> Vec<VhostUserIotlb> {
        self.msgs()
            .iter()
            .filter(|m| m.is(FrontendReq::IOTLB_MSG))
            .map(|m| m.obj())
            .collect()
    }

    /// Holds (or lets go) the acknowledgements of IOTLB messages.
    fn hold_iotlb_acks(&self, hold: bool) {
        let (m, cv) = &*self.log;
        m.lock().unwrap().hold_iotlb_acks = hold;
        cv.notify_all();
    }

    /// Sends a MISS on the back-end channel (as DPDK does: no reply asked).
    fn miss(&self, iova: u64, perm: u8) {
        self.send_iotlb(VhostUserIotlb::new(
            VhostUserIotlbType::Miss,
            iova,
            0,
            0,
            perm,
        ));
    }

    /// Sends `msg` as an IOTLB request on the back-end channel (no reply asked).
    fn send_iotlb(&self, msg: VhostUserIotlb) {
        let ch = self.channel.lock().unwrap();
        let s = ch.as_ref().expect("the back-end channel was set up");
        let mut m = Vec::new();
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&32u32.to_le_bytes());
        m.extend_from_slice(msg.as_slice());
        (&*s).write_all(&m).unwrap();
    }

    /// Hangs up (the back end "crashes").
    fn hang_up(&self) {
        if let Some(s) = self.conn.lock().unwrap().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(s) = self.channel.lock().unwrap().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.hang_up();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Waits for `cond`, failing after a deadline that only catches hangs.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One pair on `socket`, behind `iommu` or not, filled on misses.
fn config(socket: PathBuf, iommu: Option<(IommuHandle, u32)>) -> NetConfig {
    NetConfig {
        label: "vhost-user-net test".into(),
        socket,
        mac: [0x52, 0x54, 0, 1, 2, 3],
        queue_pairs: 1,
        reconnect: None,
        iommu,
        iotlb: IotlbMode::Miss,
    }
}

struct Rig {
    mem: Arc<GuestMemoryMmap>,
    iommu: IommuHandle,
    dev: VhostUserNet,
    irq: Arc<CountingInterrupt>,
    be: Backend,
    queues: Vec<TestQueue>,
}

fn send(v: &mut Viommu, req: &[u8]) -> Status {
    let r = iommu::Request {
        readable: req,
        readable_len: req.len(),
        writable_len: 4,
    };
    v.process(&[r]).remove(0).status().unwrap()
}

/// A device behind the vIOMMU (endpoint attached to domain 1, rings identity-mapped at
/// IOVA 0x1_0000_0000 + GPA), connected to a back end speaking `script`.
fn rig_with(script: Script, pairs: u16) -> Rig {
    rig_mode(script, pairs, IotlbMode::Miss)
}

fn rig_mode(script: Script, pairs: u16, iotlb: IotlbMode) -> Rig {
    rig_full(script, pairs, iotlb, None)
}

/// [`rig_mode`], trying to reconnect every `reconnect` once the back end went away.
fn rig_full(script: Script, pairs: u16, iotlb: IotlbMode, reconnect: Option<Duration>) -> Rig {
    let be = Backend::start(script);
    let mem = shared_test_memory(MEM);
    let mut v = Viommu::new(ViommuConfig {
        guest_ram: vec![(0, MEM as u64)],
        ..Default::default()
    });
    let iommu = IommuHandle::new(Viommu::new(ViommuConfig::default())).unwrap();
    *iommu.lock() = std::mem::replace(&mut v, Viommu::new(ViommuConfig::default()));
    let dev = VhostUserNet::new(
        NetConfig {
            queue_pairs: pairs,
            reconnect,
            iotlb,
            ..config(be.socket.clone(), Some((iommu.clone(), EP)))
        },
        mem.clone(),
    )
    .unwrap();
    {
        let mut s = iommu.lock();
        let id = s.add_backend(Box::new(dev.device_iotlb())).unwrap();
        s.add_endpoint(EP, Some(id), &[]).unwrap();
        assert_eq!(send(&mut s, &attach(1, EP, 0)), Status::Ok);
        // Rings at GPA 0x1000.. mapped at IOVA 0x1_0000_1000.. (one MAP for all of them).
        assert_eq!(
            send(&mut s, &map(1, 0x1_0000_0000, 0x1_000f_ffff, 0, 3)),
            Status::Ok
        );
    }
    let nq = dev.queue_max_sizes().len();
    let queues = (0..nq)
        .map(|i| TestQueue::new(&mem, 0x1000 + 0x8000 * i as u64, 64))
        .collect();
    Rig {
        mem,
        iommu,
        dev,
        irq: CountingInterrupt::new(),
        be,
        queues,
    }
}

impl Rig {
    /// Activates with the rings as IOVAs.
    fn activate(&mut self) {
        let f = self.dev.avail_features();
        self.activate_acked(f).unwrap();
    }

    /// Activates with the rings as IOVAs, the driver having acked `acked`.
    fn activate_acked(&mut self, acked: u64) -> Result<(), ActivateError> {
        let evts: Vec<Arc<EventFd>> = (0..self.queues.len())
            .map(|_| Arc::new(EventFd::new(0).unwrap()))
            .collect();
        self.dev.set_notifiers(&evts);
        self.dev.set_acked_features(acked);
        let qs = self
            .queues
            .iter()
            .map(|q| {
                let mut q = q.queue();
                let (d, a, u) = (q.desc_table(), q.avail_ring(), q.used_ring());
                q.set_desc_table_address(Some(d as u32), Some(1));
                q.set_avail_ring_address(Some(a as u32), Some(1));
                q.set_used_ring_address(Some(u as u32), Some(1));
                q
            })
            .collect();
        self.dev.activate(qs, self.irq.clone())
    }
}

#[test]
fn negotiates_shares_memory_and_hands_rings_over_as_iovas() {
    let mut r = rig_with(DPDK, 1);
    let f = r.dev.avail_features();
    assert_ne!(f & (1 << VIRTIO_F_ACCESS_PLATFORM), 0, "behind the vIOMMU");
    assert_ne!(f & (1 << VIRTIO_NET_F_MRG_RXBUF), 0, "both sides have it");
    assert_ne!(f & (1 << VIRTIO_NET_F_CSUM), 0);
    assert_eq!(
        f & (1 << VIRTIO_NET_F_HOST_TSO4),
        0,
        "DPDK does not offer it"
    );
    assert_eq!(
        f & (1 << VIRTIO_NET_F_CTRL_VQ),
        0,
        "one pair: no control queue"
    );
    assert_eq!(
        f & (1 << 34),
        0,
        "not RING_PACKED: the VMM does not pass it"
    );
    assert_eq!(r.dev.queue_max_sizes().len(), 2);
    r.activate();
    let enable = r.be.wait_for("SET_VRING_ENABLE of ring 1", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    let num = enable.obj::<VhostUserVringState>().num;
    assert_eq!(num, 1);
    let msgs = r.be.msgs();
    let codes: Vec<u32> = msgs.iter().map(|m| m.code).collect();
    let pos = |req: FrontendReq| codes.iter().position(|&c| c == req as u32).unwrap();
    assert!(pos(FrontendReq::SET_OWNER) < pos(FrontendReq::SET_FEATURES));
    assert!(pos(FrontendReq::SET_FEATURES) < pos(FrontendReq::SET_MEM_TABLE));
    assert!(pos(FrontendReq::SET_MEM_TABLE) < pos(FrontendReq::SET_VRING_ADDR));
    let set = msgs
        .iter()
        .find(|m| m.is(FrontendReq::SET_FEATURES))
        .unwrap();
    let sent: u64 = set.obj::<vhost::vhost_user::message::VhostUserU64>().value;
    assert_ne!(sent & (1 << VIRTIO_F_ACCESS_PLATFORM), 0);
    assert_ne!(sent & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES");
    assert_eq!(sent & (1 << VIRTIO_NET_F_MAC), 0, "the VMM's own feature");
    let proto = msgs
        .iter()
        .find(|m| m.is(FrontendReq::SET_PROTOCOL_FEATURES))
        .unwrap()
        .obj::<vhost::vhost_user::message::VhostUserU64>()
        .value;
    let want = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD;
    assert_eq!(proto, want.bits());
    // Guest RAM shared by descriptor, with its GPA and the VMM's address.
    let table = msgs
        .iter()
        .find(|m| m.is(FrontendReq::SET_MEM_TABLE))
        .unwrap();
    assert_eq!(table.fds, 1);
    let regions = table.obj::<VhostUserMemory>().num_regions;
    assert_eq!(regions, 1);
    let region = VhostUserMemoryRegion::from_slice(&table.body[8..8 + 32])
        .copied()
        .unwrap();
    let (gpa, size) = (region.guest_phys_addr, region.memory_size);
    assert_eq!((gpa, size), (0, MEM as u64));
    let user_addr = region.user_addr;
    assert_eq!(
        user_addr,
        r.mem.get_host_address(GuestAddress(0)).unwrap() as u64
    );
    // Rings as IOVAs, kick and call descriptors passed.
    let addrs: Vec<VhostUserVringAddr> = msgs
        .iter()
        .filter(|m| m.is(FrontendReq::SET_VRING_ADDR))
        .map(|m| m.obj())
        .collect();
    assert_eq!(addrs.len(), 2);
    for (i, a) in addrs.iter().enumerate() {
        let q = r.queues[i].queue();
        let (desc, avail, used) = (a.descriptor, a.available, a.used);
        assert_eq!(desc, 0x1_0000_0000 | q.desc_table());
        assert_eq!(avail, 0x1_0000_0000 | q.avail_ring());
        assert_eq!(used, 0x1_0000_0000 | q.used_ring());
    }
    for req in [FrontendReq::SET_VRING_KICK, FrontendReq::SET_VRING_CALL] {
        let n: Vec<usize> = msgs.iter().filter(|m| m.is(req)).map(|m| m.fds).collect();
        assert_eq!(n, vec![1, 1], "{req:?}");
    }
    // The data queues' notifications belong to the back end.
    assert!(r.dev.notified_outside(0) && r.dev.notified_outside(1));
}

#[test]
fn a_miss_gets_the_merged_run_and_an_unmapped_one_a_fault() {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    {
        let mut v = r.iommu.lock();
        // Two touching read-write mappings (one run), then a read-only one.
        assert_eq!(
            send(&mut v, &map(1, 0x20_0000, 0x20_0fff, 0x40_0000, 3)),
            Status::Ok
        );
        assert_eq!(
            send(&mut v, &map(1, 0x20_1000, 0x20_2fff, 0x40_1000, 3)),
            Status::Ok
        );
        assert_eq!(
            send(&mut v, &map(1, 0x30_0000, 0x30_0fff, 0x50_0000, 1)),
            Status::Ok
        );
    }
    let hva = |gpa: u64| r.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    // An unmapped IOVA, a write to a read-only one: no UPDATE, a fault each. Then a good one:
    // its UPDATE is the first IOTLB message, so none came for the two before.
    r.be.miss(0x60_0000, 1);
    r.be.miss(0x30_0000, 2);
    r.be.miss(0x20_1800, 1);
    let upd =
        r.be.wait_for("an UPDATE", |m| m.is(FrontendReq::IOTLB_MSG))
            .obj::<VhostUserIotlb>();
    assert_eq!(
        upd,
        VhostUserIotlb::new(
            VhostUserIotlbType::Update,
            0x20_0000,
            0x3000,
            hva(0x40_0000),
            3
        )
    );
    let mut v = r.iommu.lock();
    let f1 = v.pop_fault().expect("a fault event for the unmapped IOVA");
    assert_eq!((f1.endpoint.get(), f1.address.get()), (EP, 0x60_0000));
    assert_eq!(f1.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_ne!(f1.flags.get() & VIRTIO_IOMMU_FAULT_F_READ, 0);
    let f2 = v.pop_fault().expect("a fault event for the write");
    assert_eq!(f2.address.get(), 0x30_0000);
    assert_ne!(f2.flags.get() & VIRTIO_IOMMU_FAULT_F_WRITE, 0);
    drop(v);
    let c = r.dev.counters();
    assert_eq!(c.misses.load(Ordering::Relaxed), 3);
    assert_eq!(c.faults.load(Ordering::Relaxed), 2);
    // Counted once the back end acknowledged it (the UPDATE is sent without the vIOMMU
    // held, so taking it above does not wait for that).
    eventually("the UPDATE counted", || {
        c.updates.load(Ordering::Relaxed) == 1 && c.update_pages.load(Ordering::Relaxed) == 3
    });
    // A read of the read-only page: read-only entry, never writable.
    r.be.miss(0x30_0000, 1);
    eventually("a second UPDATE", || r.be.iotlb().len() == 2);
    assert_eq!(
        r.be.iotlb()[1],
        VhostUserIotlb::new(
            VhostUserIotlbType::Update,
            0x30_0000,
            0x1000,
            hva(0x50_0000),
            1
        )
    );
    // A write-only mapping (a receive buffer) serves DPDK's read-write miss read-write; a
    // read-only miss on it faults.
    {
        let mut v = r.iommu.lock();
        assert_eq!(
            send(&mut v, &map(1, 0x70_0000, 0x70_0fff, 0x60_0000, 2)),
            Status::Ok
        );
    }
    r.be.miss(0x70_0000, 1);
    r.be.miss(0x70_0000, 3);
    eventually("a third UPDATE", || r.be.iotlb().len() == 3);
    assert_eq!(
        r.be.iotlb()[2],
        VhostUserIotlb::new(
            VhostUserIotlbType::Update,
            0x70_0000,
            0x1000,
            hva(0x60_0000),
            3
        )
    );
    assert_eq!(c.faults.load(Ordering::Relaxed), 3);
}

/// The UPDATE answering a miss waits for the back end's acknowledgement without the vIOMMU
/// held: while the back end holds it, the vIOMMU's lock is free (a guest's requests, other
/// devices' translations go on); the UPDATE then completes.
#[test]
fn hostile_a_back_end_slow_to_acknowledge_an_update_holds_no_viommu_lock() {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    {
        let mut v = r.iommu.lock();
        assert_eq!(
            send(&mut v, &map(1, 0x20_0000, 0x20_0fff, 0x40_0000, 3)),
            Status::Ok
        );
    }
    r.be.hold_iotlb_acks(true);
    r.be.miss(0x20_0000, 1);
    r.be.wait_for("an UPDATE", |m| m.is(FrontendReq::IOTLB_MSG));
    assert!(
        r.iommu.state.try_lock().is_ok(),
        "the vIOMMU is held while the back end acknowledges an UPDATE"
    );
    assert_eq!(r.dev.counters().updates.load(Ordering::Relaxed), 0);
    r.be.hold_iotlb_acks(false);
    eventually("the UPDATE acknowledged", || {
        r.dev.counters().updates.load(Ordering::Relaxed) == 1
    });
}

#[test]
fn unmap_invalidates_before_the_request_completes() {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    let mut v = r.iommu.lock();
    assert_eq!(
        send(&mut v, &map(1, 0x20_0000, 0x20_3fff, 0x40_0000, 3)),
        Status::Ok
    );
    assert!(r.be.iotlb().is_empty(), "a MAP sends nothing");
    assert_eq!(send(&mut v, &unmap(1, 0x20_0000, 0x20_3fff)), Status::Ok);
    // Already there when the request completed: the INVALIDATE was acknowledged.
    let inv = r.be.iotlb();
    assert_eq!(
        inv,
        vec![VhostUserIotlb::new(
            VhostUserIotlbType::Invalidate,
            0x20_0000,
            0x4000,
            0,
            0
        )]
    );
    // Detach: everything the domain mapped is invalidated.
    assert_eq!(send(&mut v, &iommu::testing::detach(1, EP)), Status::Ok);
    let inv = r.be.iotlb();
    assert_eq!(inv.len(), 2);
    assert_eq!(
        (inv[1].iova, inv[1].size, inv[1].msg_type),
        (
            0x1_0000_0000,
            0x10_0000,
            VhostUserIotlbType::Invalidate as u8
        )
    );
    drop(v);
    assert_eq!(r.dev.counters().invalidations.load(Ordering::Relaxed), 2);
    // 4 pages, then the 1 MiB the detach removed.
    assert_eq!(
        r.dev.counters().invalidated_pages.load(Ordering::Relaxed),
        4 + 256
    );
}

#[test]
fn prefetch_sends_each_mapping_before_the_map_completes() {
    let mut r = rig_mode(DPDK, 1, IotlbMode::Prefetch);
    r.activate();
    let hva = |gpa: u64| r.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    // Activation fills the device IOTLB with what the endpoint already maps (the rings).
    assert_eq!(
        r.be.iotlb(),
        vec![VhostUserIotlb::new(
            VhostUserIotlbType::Update,
            0x1_0000_0000,
            0x10_0000,
            hva(0),
            3
        )]
    );
    let mut v = r.iommu.lock();
    // Read-only, write-only (served read-write) and outside RAM (not sent).
    assert_eq!(
        send(&mut v, &map(1, 0x20_0000, 0x20_1fff, 0x40_0000, 1)),
        Status::Ok
    );
    assert_eq!(
        send(&mut v, &map(1, 0x30_0000, 0x30_0fff, 0x50_0000, 2)),
        Status::Ok
    );
    assert_eq!(
        send(&mut v, &map(1, 0x40_0000, 0x40_0fff, 0x8000_0000, 3)),
        Status::Ok
    );
    assert_eq!(
        r.be.iotlb()[1..],
        [
            VhostUserIotlb::new(
                VhostUserIotlbType::Update,
                0x20_0000,
                0x2000,
                hva(0x40_0000),
                1
            ),
            VhostUserIotlb::new(
                VhostUserIotlbType::Update,
                0x30_0000,
                0x1000,
                hva(0x50_0000),
                3
            ),
        ]
    );
    // Unmapping the first of two touching mappings: its INVALIDATE, then the second one
    // again (DPDK 22.11 drops the entry that starts where an invalidated range ends).
    assert_eq!(
        send(&mut v, &map(1, 0x20_2000, 0x20_2fff, 0x48_0000, 3)),
        Status::Ok
    );
    assert_eq!(send(&mut v, &unmap(1, 0x20_0000, 0x20_1fff)), Status::Ok);
    let msgs = r.be.iotlb();
    assert_eq!(
        msgs[4..],
        [
            VhostUserIotlb::new(VhostUserIotlbType::Invalidate, 0x20_0000, 0x2000, 0, 0),
            VhostUserIotlb::new(
                VhostUserIotlbType::Update,
                0x20_2000,
                0x1000,
                hva(0x48_0000),
                3
            ),
        ]
    );
    // Unmapping the last one: nothing follows it.
    assert_eq!(send(&mut v, &unmap(1, 0x20_2000, 0x20_2fff)), Status::Ok);
    assert_eq!(r.be.iotlb().len(), 7);
    drop(v);
    let c = r.dev.counters();
    // The activation fill and three guest maps.
    assert_eq!(c.prefetches.load(Ordering::Relaxed), 4);
    assert_eq!(c.resent.load(Ordering::Relaxed), 1);
    assert_eq!(c.misses.load(Ordering::Relaxed), 0);
}

#[test]
fn back_end_gone_takes_the_link_down_and_the_vmm_goes_on() {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    assert!(r.dev.link_up());
    let mut cfg = [0u8; 12];
    r.dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "LINK_UP");
    r.be.hang_up();
    eventually("link down", || !r.dev.link_up());
    eventually("a config interrupt", || {
        r.irq.config.load(Ordering::SeqCst) > 0
    });
    r.dev.read_config(0, &mut cfg);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 0);
    // The vIOMMU still answers, and unmaps complete without a back end.
    let mut v = r.iommu.lock();
    assert_eq!(
        send(&mut v, &unmap(1, 0x1_0000_0000, 0x1_000f_ffff)),
        Status::Ok
    );
    drop(v);
    assert_eq!(r.dev.counters().disconnects.load(Ordering::Relaxed), 1);
    // Reset and reactivation with no back end do not fail.
    r.dev.reset();
}

#[test]
fn reconnect_replays_memory_and_rings() {
    let be = Backend::start(DPDK);
    let mem = shared_test_memory(MEM);
    let mut dev = VhostUserNet::new(
        NetConfig {
            reconnect: Some(Duration::from_millis(20)),
            ..config(be.socket.clone(), None)
        },
        mem.clone(),
    )
    .unwrap();
    let mut queues: Vec<TestQueue> = (0..2)
        .map(|i| TestQueue::new(&mem, 0x1000 + 0x8000 * i as u64, 64))
        .collect();
    // The driver had buffers used on queue 0: the new back end starts where they end.
    queues[0].add(&mem, &[(0x10_0000, 64, true)]);
    mem.write_obj(1u16, GuestAddress(queues[0].queue().used_ring() + 2))
        .unwrap();
    let evts: Vec<Arc<EventFd>> = (0..2).map(|_| Arc::new(EventFd::new(0).unwrap())).collect();
    dev.set_notifiers(&evts);
    dev.set_acked_features(dev.avail_features());
    let irq = CountingInterrupt::new();
    dev.activate(queues.iter().map(|q| q.queue()).collect(), irq.clone())
        .unwrap();
    be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    // Without an IOMMU the rings go as the VMM's own addresses.
    let a: VhostUserVringAddr = be
        .msgs()
        .iter()
        .find(|m| m.is(FrontendReq::SET_VRING_ADDR))
        .unwrap()
        .obj();
    let desc = a.descriptor;
    assert_eq!(
        desc,
        mem.get_host_address(GuestAddress(queues[0].queue().desc_table()))
            .unwrap() as u64
    );
    // The back end goes away and a new one comes up on the same socket.
    let socket = be.socket.clone();
    drop(be);
    eventually("link down", || !dev.link_up());
    let be2 = Backend::start_at(socket, DPDK);
    eventually("link up again", || dev.link_up());
    let base = be2.wait_for("SET_VRING_BASE of ring 0", |m| {
        m.is(FrontendReq::SET_VRING_BASE) && m.obj::<VhostUserVringState>().index == 0
    });
    let num = base.obj::<VhostUserVringState>().num;
    assert_eq!(num, 1, "from used->idx");
    assert!(be2.msgs().iter().any(|m| m.is(FrontendReq::SET_MEM_TABLE)));
    be2.wait_for("ring 1 enabled again", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    assert_eq!(dev.counters().connects.load(Ordering::Relaxed), 1);
    assert!(irq.config.load(Ordering::SeqCst) >= 2, "down, then up");
}

#[test]
fn bad_back_ends_give_one_clear_error() {
    let mem = shared_test_memory(MEM);
    let err = |r: Result<VhostUserNet, VhostUserError>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s += &format!(": {c}");
                src = c.source();
            }
            s
        }
    };
    // No socket.
    let e = err(VhostUserNet::new(
        config("/nonexistent/vu.sock".into(), None),
        mem.clone(),
    ));
    assert!(e.contains("/nonexistent/vu.sock"), "{e}");
    // No device IOTLB, behind the vIOMMU.
    let be = Backend::start(Script {
        features: DPDK_FEATURES & !(1 << VIRTIO_F_ACCESS_PLATFORM),
        ..DPDK
    });
    let h = IommuHandle::new(Viommu::new(ViommuConfig::default())).unwrap();
    let e = err(VhostUserNet::new(
        config(be.socket.clone(), Some((h, EP))),
        mem.clone(),
    ));
    assert!(e.contains("VIRTIO_F_ACCESS_PLATFORM"), "{e}");
    drop(be);
    // No REPLY_ACK.
    let be = Backend::start(Script {
        protocol: DPDK_PROTOCOL & !VhostUserProtocolFeatures::REPLY_ACK.bits(),
        ..DPDK
    });
    let e = err(VhostUserNet::new(
        config(be.socket.clone(), None),
        mem.clone(),
    ));
    assert!(e.contains("REPLY_ACK"), "{e}");
    drop(be);
    // Garbage instead of a reply.
    let be = Backend::start(Script {
        garbage: true,
        ..DPDK
    });
    let e = err(VhostUserNet::new(config(be.socket.clone(), None), mem));
    assert!(e.contains("GET_FEATURES"), "{e}");
}

/// Writes, on the back-end channel, an IOTLB request whose header announces `announced`
/// body bytes, followed by `body`; the back end must then be cut off (link down, one bad
/// message counted).
fn back_end_cut_off_by(announced: u32, body: &[u8]) {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    {
        let ch = r.be.channel.lock().unwrap();
        let mut m = Vec::new();
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&announced.to_le_bytes());
        m.extend_from_slice(body);
        ch.as_ref().unwrap().write_all(&m).unwrap();
    }
    eventually("link down", || !r.dev.link_up());
    assert_eq!(r.dev.counters().bad_messages.load(Ordering::Relaxed), 1);
}

/// An IOTLB message with a 7-byte body.
#[test]
fn malformed_back_end_request_cuts_it_off() {
    back_end_cut_off_by(7, &[0xff; 7]);
}

/// A back end that sends the header of a request on its channel (32 bytes announced) and
/// then nothing (the socket stays open) is cut off within the reply deadline, as a malformed
/// one is: the channel thread does not wait for the body for ever.
#[test]
fn hostile_half_a_back_end_request_cuts_it_off() {
    back_end_cut_off_by(32, &[]);
}

#[test]
fn control_queue_sets_the_queue_pairs() {
    let mut r = rig_with(DPDK, 2);
    assert_eq!(r.dev.queue_max_sizes().len(), 5);
    let f = r.dev.avail_features();
    assert_ne!(f & (1 << VIRTIO_NET_F_MQ), 0);
    assert_ne!(f & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
    let mut cfg = [0u8; 2];
    r.dev.read_config(8, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg), 2, "max_virtqueue_pairs");
    assert!(
        !r.dev.notified_outside(4),
        "the VMM serves the control queue"
    );
    r.activate();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    let enabled = |r: &Rig| -> Vec<u32> {
        r.be.msgs()
            .iter()
            .filter(|m| m.is(FrontendReq::SET_VRING_ENABLE))
            .map(|m| m.obj::<VhostUserVringState>().index)
            .collect()
    };
    assert_eq!(enabled(&r), vec![0, 1], "one pair until the driver asks");
    // VIRTIO_NET_CTRL_MQ / VQ_PAIRS_SET 2, at IOVAs (buffers in the mapped window).
    let cmd = 0x9_0000u64;
    r.mem.write_slice(&[4, 0, 2, 0], GuestAddress(cmd)).unwrap();
    r.mem.write_obj(0xeeu8, GuestAddress(cmd + 0x100)).unwrap();
    r.queues[4].add(
        &r.mem,
        &[
            (0x1_0000_0000 | cmd, 4, false),
            (0x1_0000_0000 | (cmd + 0x100), 1, true),
        ],
    );
    r.dev.queue_notify(4);
    let used = r.queues[4].used(&r.mem);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 1);
    let ack: u8 = r.mem.read_obj(GuestAddress(cmd + 0x100)).unwrap();
    assert_eq!(u32::from(ack), VIRTIO_NET_OK);
    assert_eq!(enabled(&r), vec![0, 1, 2, 3]);
    // Out of range: refused, nothing changes.
    r.mem.write_slice(&[4, 0, 3, 0], GuestAddress(cmd)).unwrap();
    r.queues[4].add(
        &r.mem,
        &[
            (0x1_0000_0000 | cmd, 4, false),
            (0x1_0000_0000 | (cmd + 0x100), 1, true),
        ],
    );
    r.dev.queue_notify(4);
    assert_eq!(r.queues[4].used(&r.mem).len(), 1);
    let ack: u8 = r.mem.read_obj(GuestAddress(cmd + 0x100)).unwrap();
    assert_eq!(u32::from(ack), VIRTIO_NET_ERR);
    assert_eq!(r.dev.counters().ctrl_commands.load(Ordering::Relaxed), 2);
}

use virtio_bindings::virtio_net::{VIRTIO_NET_ERR, VIRTIO_NET_OK};
use vm_memory::Bytes;

mod device;
mod migration;

/// The UPDATEs remembered for the resend after an invalidation: an invalidation forgets
/// exactly the entries it overlaps, however large, and returns the one starting at its end;
/// a guest with more mappings than [`MAX_SENT`] cannot make the VMM remember more.
#[test]
fn sent_updates_are_bounded_and_invalidated_by_overlap() {
    use super::vhost_user::{SentUpdates, MAX_SENT};
    let upd = |iova: u64, size: u64| {
        VhostUserIotlb::new(
            VhostUserIotlbType::Update,
            iova,
            size,
            0x7000_0000 + iova,
            3,
        )
    };
    let mut s = SentUpdates::default();
    s.record(upd(0x1000, 0x1000));
    s.record(upd(0x10_0000, 0x40_0000)); // a large entry starting far below the next range
    s.record(upd(0x80_0000, 0x1000));
    s.record(upd(0x80_1000, 0x1000));
    // [0x40_0000, 0x80_0000) overlaps only the large entry; the next starts at its end.
    assert_eq!(
        s.invalidate(0x40_0000, 0x80_0000),
        Some(upd(0x80_0000, 0x1000))
    );
    assert_eq!(s.len(), 3);
    // A range touching nothing forgets nothing.
    assert_eq!(s.invalidate(0x2000, 0x3000), None);
    assert_eq!(s.len(), 3);
    // Exact and partial overlaps.
    assert_eq!(
        s.invalidate(0x80_0800, 0x80_1000),
        Some(upd(0x80_1000, 0x1000))
    );
    assert_eq!(s.invalidate(0x0, 0x1001), None);
    assert_eq!(s.len(), 1);
    // The bound: the lowest IOVAs go first; a replaced entry does not count twice.
    let mut s = SentUpdates::default();
    for i in 0..(MAX_SENT as u64 + 10) {
        s.record(upd(i << 12, 0x1000));
    }
    s.record(upd((MAX_SENT as u64 + 9) << 12, 0x1000));
    assert_eq!(s.len(), MAX_SENT);
    // The ten lowest were forgotten: nothing below 10 << 12 overlaps, the entry there stays.
    assert_eq!(s.invalidate(0, 10 << 12), Some(upd(10 << 12, 0x1000)));
    assert_eq!(s.len(), MAX_SENT);
    assert_eq!(
        s.invalidate(10 << 12, 11 << 12),
        Some(upd(11 << 12, 0x1000))
    );
    assert_eq!(s.len(), MAX_SENT - 1);
}
