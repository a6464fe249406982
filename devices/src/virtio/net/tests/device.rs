//! The device's own surface against the scripted back end: the features it offers and the
//! `SET_FEATURES` word it passes on, its counters line, the control queue taking pairs away,
//! reset stopping the rings, and what its device IOTLB declares to the vIOMMU.

use iommu::backend::{BackendCaps, DmaBackend};
use iommu::pagetable::Perm;
use vhost::vhost_user::message::VhostUserU64;
use virtio_bindings::virtio_net::{VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET};

use super::*;

/// A back end that offers every feature bit.
const EVERYTHING: Script = Script {
    features: u64::MAX,
    ..DPDK
};

/// The device's own bits (virtio 1.2 5.1.3, 6): VERSION_1 (32), MAC (5), STATUS (16).
const OWN: u64 = (1 << 32) | (1 << 5) | (1 << 16);
/// MQ (22) and CTRL_VQ (17), with more than one pair.
const MULTIQUEUE: u64 = (1 << 22) | (1 << 17);
/// ACCESS_PLATFORM (33), behind the vIOMMU.
const PLATFORM: u64 = 1 << 33;

/// A device not behind the vIOMMU, on a back end speaking `script`, activated with its rings
/// at their GPAs and the driver having acked `acked`.
fn untranslated(script: Script, acked: u64) -> (Backend, VhostUserNet) {
    let be = Backend::start(script);
    let mem = shared_test_memory(MEM);
    let mut dev = VhostUserNet::new(config(be.socket.clone(), None), mem.clone()).unwrap();
    let queues: Vec<TestQueue> = (0..2)
        .map(|i| TestQueue::new(&mem, 0x1000 + 0x8000 * i as u64, 64))
        .collect();
    let evts: Vec<Arc<EventFd>> = (0..2).map(|_| Arc::new(EventFd::new(0).unwrap())).collect();
    dev.set_notifiers(&evts);
    dev.set_acked_features(acked);
    dev.activate(
        queues.iter().map(|q| q.queue()).collect(),
        CountingInterrupt::new(),
    )
    .unwrap();
    be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    (be, dev)
}

/// The `SET_FEATURES` words the back end got.
fn set_features(be: &Backend) -> Vec<u64> {
    be.msgs()
        .iter()
        .filter(|m| m.is(FrontendReq::SET_FEATURES))
        .map(|m| m.obj::<VhostUserU64>().value)
        .collect()
}

/// The ring indices of every `req` the back end got after its first `skip` messages.
fn rings_after(be: &Backend, skip: usize, req: FrontendReq) -> Vec<u32> {
    be.msgs()[skip..]
        .iter()
        .filter(|m| m.is(req))
        .map(|m| m.obj::<VhostUserVringState>().index)
        .collect()
}

/// Sends the control command `class`/`cmd` with `pairs` as its data on the control queue
/// (the last queue); returns the driver's ack byte.
fn control(r: &mut Rig, class: u8, cmd: u8, pairs: u16) -> u8 {
    let q = r.queues.len() - 1;
    let at = 0x9_0000u64;
    r.mem.write_slice(&[class, cmd], GuestAddress(at)).unwrap();
    r.mem
        .write_obj(pairs.to_le(), GuestAddress(at + 2))
        .unwrap();
    r.mem.write_obj(0xeeu8, GuestAddress(at + 0x100)).unwrap();
    r.queues[q].add(
        &r.mem,
        &[
            (0x1_0000_0000 | at, 4, false),
            (0x1_0000_0000 | (at + 0x100), 1, true),
        ],
    );
    r.dev.queue_notify(q);
    assert_eq!(r.queues[q].used(&r.mem).len(), 1, "the command completes");
    r.mem.read_obj(GuestAddress(at + 0x100)).unwrap()
}

/// virtio 1.2 5.1.3's numbers for the offloads, mergeable receive buffers, and 6's for
/// indirect descriptors and event indices: the data path's features, and nothing else.
#[test]
fn the_data_path_features_are_the_offloads_and_the_ring_features() {
    let bits: Vec<u32> = (0..64)
        .filter(|b| PASSTHROUGH_FEATURES & (1 << b) != 0)
        .collect();
    assert_eq!(bits, [0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 28, 29]);
}

/// The device offers its own bits, the data-path bits the back end has, multiqueue with more
/// than one pair and ACCESS_PLATFORM behind the vIOMMU; nothing else.
#[test]
fn offers_its_own_features_and_the_data_path_ones_the_back_end_has() {
    let r = rig_with(EVERYTHING, 1);
    assert_eq!(r.dev.device_type(), 1, "virtio 1.2 5: network card");
    assert_eq!(
        r.dev.avail_features(),
        OWN | PASSTHROUGH_FEATURES | PLATFORM
    );
    drop(r);
    let r = rig_with(DPDK, 1);
    assert_eq!(
        r.dev.avail_features(),
        OWN | (DPDK_FEATURES & PASSTHROUGH_FEATURES) | PLATFORM
    );
    drop(r);
    let r = rig_with(EVERYTHING, 2);
    assert_eq!(
        r.dev.avail_features(),
        OWN | PASSTHROUGH_FEATURES | MULTIQUEUE | PLATFORM
    );
    drop(r);
    let (be, dev) = untranslated(EVERYTHING, 0);
    assert_eq!(dev.avail_features(), OWN | PASSTHROUGH_FEATURES);
    drop((be, dev));
}

/// `SET_FEATURES` carries what the driver acked of what the device offered, with VERSION_1
/// and PROTOCOL_FEATURES (30): a driver acking bits the device never offered passes none of
/// them on (here ACCESS_PLATFORM, without the vIOMMU).
#[test]
fn the_back_end_gets_what_the_driver_acked_of_what_was_offered() {
    let (be, _dev) = untranslated(EVERYTHING, u64::MAX);
    assert_eq!(
        set_features(&be),
        [PASSTHROUGH_FEATURES | (1 << 32) | (1 << 30)]
    );
    drop(be);
    // Behind the vIOMMU: ACCESS_PLATFORM too, and only the data-path bits acked.
    let mut r = rig_with(EVERYTHING, 1);
    let acked = OWN | PLATFORM | (1 << VIRTIO_NET_F_MRG_RXBUF);
    r.activate_acked(acked).unwrap();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    assert_eq!(
        set_features(&r.be),
        [(1 << VIRTIO_NET_F_MRG_RXBUF) | PLATFORM | (1 << 32) | (1 << 30)]
    );
}

/// Behind the vIOMMU every ring address is an IOVA: a driver that did not ack
/// ACCESS_PLATFORM would hand over GPAs, and activation fails naming the feature.
#[test]
fn behind_the_viommu_a_driver_without_access_platform_is_refused() {
    let mut r = rig_with(DPDK, 1);
    let f = r.dev.avail_features() & !PLATFORM;
    assert_eq!(
        r.activate_acked(f),
        Err(ActivateError::MissingFeature(VIRTIO_F_ACCESS_PLATFORM))
    );
    assert!(
        !r.be
            .msgs()
            .iter()
            .any(|m| m.is(FrontendReq::SET_VRING_ADDR)),
        "no ring handed over"
    );
}

/// Every counter under its own name, and the link.
#[test]
fn the_counters_line_names_each_counter_and_the_link() {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    let c = r.dev.counters();
    for (i, a) in [
        &c.misses,
        &c.updates,
        &c.prefetches,
        &c.update_pages,
        &c.invalidations,
        &c.invalidated_pages,
        &c.resent,
        &c.faults,
        &c.connects,
        &c.disconnects,
        &c.bad_messages,
        &c.ctrl_commands,
    ]
    .into_iter()
    .enumerate()
    {
        a.store(i as u64 + 1, Ordering::Relaxed);
    }
    assert_eq!(
        r.dev.counters_line(),
        "link=up misses=1 updates=2 prefetches=3 update_pages=4 invalidations=5 \
         invalidated_pages=6 resent=7 faults=8 reconnects=9 disconnects=10 bad_messages=11 \
         ctrl_commands=12"
    );
    r.be.hang_up();
    eventually("link down", || !r.dev.link_up());
    assert!(r.dev.counters_line().starts_with("link=down misses=1 "));
}

/// Pairs go up and down with VQ_PAIRS_SET: the rings of pairs taken away are stopped
/// (`GET_VRING_BASE`) and leave the plan, so a reset stops only the pairs left. Another
/// command class is refused and changes nothing.
#[test]
fn the_control_queue_takes_pairs_away_and_reset_stops_the_rest() {
    let mut r = rig_with(DPDK, 2);
    r.activate();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    assert_eq!(r.dev.active_pairs(), 1);
    // More than one pair: the back end is told of multiqueue (MQ, protocol feature 0).
    let proto: Vec<u64> =
        r.be.msgs()
            .iter()
            .filter(|m| m.is(FrontendReq::SET_PROTOCOL_FEATURES))
            .map(|m| m.obj::<VhostUserU64>().value)
            .collect();
    assert_eq!(proto.len(), 1);
    assert_ne!(proto[0] & VhostUserProtocolFeatures::MQ.bits(), 0);
    let (mq, set) = (
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
    );
    assert_eq!(u32::from(control(&mut r, mq, set, 2)), VIRTIO_NET_OK);
    assert_eq!(r.dev.active_pairs(), 2);
    let mark = r.be.msgs().len();
    // Another class (VIRTIO_NET_CTRL_RX, 0) with the same command number: refused.
    assert_eq!(u32::from(control(&mut r, 0, set, 1)), VIRTIO_NET_ERR);
    assert_eq!(r.dev.active_pairs(), 2);
    assert_eq!(r.be.msgs().len(), mark, "nothing sent");
    // The right class with another command: refused too.
    assert_eq!(u32::from(control(&mut r, mq, 1, 1)), VIRTIO_NET_ERR);
    assert_eq!(r.dev.active_pairs(), 2);
    // Down to one pair: rings 2 and 3 stop.
    assert_eq!(u32::from(control(&mut r, mq, set, 1)), VIRTIO_NET_OK);
    assert_eq!(r.dev.active_pairs(), 1);
    assert_eq!(
        rings_after(&r.be, mark, FrontendReq::GET_VRING_BASE),
        [2, 3]
    );
    // The second pair's rings were handed over without logging (no migration runs).
    let flags: Vec<(u32, u32)> =
        r.be.msgs()
            .iter()
            .filter(|m| m.is(FrontendReq::SET_VRING_ADDR))
            .map(|m| m.obj::<VhostUserVringAddr>())
            .map(|a| (a.index, a.flags))
            .collect();
    assert_eq!(flags, [(0, 0), (1, 0), (2, 0), (3, 0)]);
    assert_eq!(r.dev.counters().ctrl_commands.load(Ordering::Relaxed), 4);
    // The driver resets the device: the rings still running stop, and only they.
    let mark = r.be.msgs().len();
    r.dev.reset();
    assert_eq!(
        rings_after(&r.be, mark, FrontendReq::GET_VRING_BASE),
        [0, 1]
    );
    assert_eq!(r.dev.active_pairs(), 1);
}

/// A back end's ACCESS_FAIL report is logged, not refused: no bad message, the link stays.
#[test]
fn an_access_fail_report_is_taken_without_cutting_the_back_end_off() {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    r.be.send_iotlb(VhostUserIotlb::new(
        VhostUserIotlbType::AccessFail,
        0x1_0000_0000,
        0x1000,
        0,
        1,
    ));
    // A miss after it is answered: the report before it was handled.
    r.be.miss(0x1_0000_0000, 1);
    r.be.wait_for("the miss's UPDATE", |m| {
        m.is(FrontendReq::IOTLB_MSG)
            && m.obj::<VhostUserIotlb>().iotlb_type() == Some(VhostUserIotlbType::Update)
    });
    assert!(r.dev.link_up());
    assert_eq!(r.dev.counters().bad_messages.load(Ordering::Relaxed), 0);
}

/// In prefetch mode a guest mapping of device memory (MMIO) is never sent: the back end
/// could not reach it. The pages sent are counted by 4 KiB.
#[test]
fn prefetch_sends_no_mmio_and_counts_pages() {
    let mut r = rig_mode(DPDK, 1, IotlbMode::Prefetch);
    r.activate();
    let mut iotlb = r.dev.device_iotlb();
    let before = r.be.iotlb().len();
    let pages = r.dev.counters().update_pages.load(Ordering::Relaxed);
    iotlb
        .map(0x50_0000, 0x60_0000, 0x1000, Perm::from_bits(7).unwrap())
        .unwrap();
    iotlb.map(0x70_0000, 0x60_0000, 0x3000, Perm::READ).unwrap();
    let sent = r.be.iotlb();
    assert_eq!(sent.len(), before + 1);
    let (iova, size) = (sent[before].iova, sent[before].size);
    assert_eq!((iova, size), (0x70_0000, 0x3000));
    assert_eq!(
        r.dev.counters().update_pages.load(Ordering::Relaxed),
        pages + 3
    );
}

/// The device IOTLB as the vIOMMU sees it: named after the device, 4 KiB, 2 MiB and 1 GiB
/// granules over every IOVA, tracked (by GPA, in the back end's log), merging maps and
/// unmaps, dirty pages by page.
#[test]
fn the_device_iotlb_declares_its_granules_and_tracking() {
    let r = rig_with(DPDK, 1);
    let iotlb = r.dev.device_iotlb();
    assert_eq!(iotlb.name(), "vhost-user-net test");
    assert_eq!(
        iotlb.caps(),
        BackendCaps {
            page_size_mask: (1 << 30) | (1 << 21) | (1 << 12),
            iova_ranges: vec![(0, iommu::pagetable::MAX_IOVA)],
            dirty_tracking: true,
            merge_maps: true,
            merge_unmaps: true,
            dirty_whole_mappings: false,
        }
    );
}

/// A path that exists but is no socket is refused by name before any connection.
#[test]
fn a_path_that_is_no_socket_is_refused_by_name() {
    let f = std::env::temp_dir().join(format!("vmm-vu-not-a-socket-{}", std::process::id()));
    std::fs::write(&f, b"").unwrap();
    let e = vhost_user::check_socket(&f).unwrap_err().to_string();
    let src = match vhost_user::check_socket(&f).unwrap_err() {
        VhostUserError::Connect(p, e) => (p, e.to_string()),
        e => panic!("{e}"),
    };
    assert_eq!(src, (f.clone(), "not a socket".to_string()), "{e}");
    let be = Backend::start(DPDK);
    vhost_user::check_socket(&be.socket).unwrap();
    std::fs::remove_file(&f).unwrap();
}

/// A back end without VIRTIO_F_VERSION_1 or VHOST_USER_F_PROTOCOL_FEATURES is refused,
/// naming the feature.
#[test]
fn a_back_end_without_a_required_feature_is_refused_by_its_name() {
    for (bit, name) in [
        (32, "VIRTIO_F_VERSION_1"),
        (30, "VHOST_USER_F_PROTOCOL_FEATURES"),
    ] {
        let be = Backend::start(Script {
            features: DPDK_FEATURES & !(1u64 << bit),
            ..DPDK
        });
        let r = VhostUserNet::new(config(be.socket.clone(), None), shared_test_memory(MEM));
        match r {
            Err(VhostUserError::MissingFeature(n)) => assert_eq!(n, name),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name}: accepted"),
        }
    }
}

/// With three pairs the queues are rx0, tx0 .. rx2, tx2 and the control queue (virtio 1.2
/// 5.1.2): the back end is notified of the six data queues, the VMM serves the seventh;
/// pairs taken away stop their own rings.
#[test]
fn three_pairs_put_the_control_queue_last() {
    let mut r = rig_with(DPDK, 3);
    assert_eq!(r.dev.queue_max_sizes().len(), 7);
    let outside: Vec<usize> = (0..7).filter(|&q| r.dev.notified_outside(q)).collect();
    assert_eq!(outside, [0, 1, 2, 3, 4, 5]);
    r.activate();
    let (mq, set) = (
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
    );
    assert_eq!(u32::from(control(&mut r, mq, set, 3)), VIRTIO_NET_OK);
    assert_eq!(r.dev.active_pairs(), 3);
    r.be.wait_for("ring 5 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 5
    });
    // Down to two pairs, then one: each time the rings of the pairs taken away stop.
    for (pairs, stopped) in [(2, [4, 5]), (1, [2, 3])] {
        let mark = r.be.msgs().len();
        assert_eq!(u32::from(control(&mut r, mq, set, pairs)), VIRTIO_NET_OK);
        assert_eq!(
            rings_after(&r.be, mark, FrontendReq::GET_VRING_BASE),
            stopped
        );
    }
}

/// A back end that closes its channel (the IOTLB's way back) but not its socket can no
/// longer answer misses: the link goes down, as when it hangs up.
#[test]
fn a_back_end_that_closes_only_its_channel_takes_the_link_down() {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    assert!(r.dev.link_up());
    if let Some(s) = r.be.channel.lock().unwrap().take() {
        s.shutdown(std::net::Shutdown::Both).unwrap();
    }
    eventually("link down", || !r.dev.link_up());
    assert_eq!(r.dev.counters().disconnects.load(Ordering::Relaxed), 1);
}
