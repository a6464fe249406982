//! The device's side of a live migration against the scripted back end: dirty logging on
//! (`SET_LOG_BASE` with the memfd, `VHOST_F_LOG_ALL`, `VHOST_VRING_F_LOG` on the running
//! rings) and off, the log harvested by GPA, the rings stopped with `GET_VRING_BASE` and their
//! bases saved, the rings started again after a failed migration.

use std::os::unix::fs::FileExt;

use iommu::dirty::DirtyBitmap;
use vhost::vhost_user::message::VhostUserU64;

use super::*;

/// Bit 26 of `SET_FEATURES`.
const LOG_ALL: u64 = 1 << 26;

/// The value of every `req` message the back end got after the first `skip` messages.
fn sent_after<T: ByteValued>(be: &Backend, skip: usize, req: FrontendReq) -> Vec<T> {
    be.msgs()[skip..]
        .iter()
        .filter(|m| m.is(req))
        .map(|m| m.obj())
        .collect()
}

#[test]
fn logging_goes_on_and_off_and_the_log_is_harvested_by_gpa() {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    let before = r.be.msgs().len();
    assert!(r.dev.start_dirty_log(), "DPDK can log");
    // The log handed over with its size, then LOG_ALL, then each ring's used ring logged.
    let msgs = r.be.msgs()[before..].to_vec();
    let base = msgs
        .iter()
        .find(|m| m.is(FrontendReq::SET_LOG_BASE))
        .expect("SET_LOG_BASE");
    assert_eq!(base.fds, 1);
    let size = u64::from_le_bytes(base.body[..8].try_into().unwrap());
    assert_eq!(size, MEM as u64 / 4096 / 8, "one bit per 4 KiB page of RAM");
    let features: Vec<VhostUserU64> = sent_after(&r.be, before, FrontendReq::SET_FEATURES);
    assert_eq!(features.len(), 1);
    let on = features[0].value;
    assert_ne!(on & LOG_ALL, 0);
    let addrs: Vec<VhostUserVringAddr> = sent_after(&r.be, before, FrontendReq::SET_VRING_ADDR);
    let logged: Vec<(u32, u32, u64)> = addrs.iter().map(|a| (a.index, a.flags, a.log)).collect();
    let used = |i: usize| 0x1_0000_0000 | r.queues[i].queue().used_ring();
    assert_eq!(logged, vec![(0, 1, used(0)), (1, 1, used(1))]);

    // The back end logs pages by GPA; the harvest takes exactly those, once.
    let pages = [0u64, 3, 64, 1000, 4095];
    {
        let f = r.be.log_fd.lock().unwrap();
        let f = f.as_ref().expect("the log's memfd");
        for p in pages {
            let mut b = [0u8];
            f.read_exact_at(&mut b, p / 8).unwrap();
            b[0] |= 1 << (p % 8);
            f.write_all_at(&b, p / 8).unwrap();
        }
    }
    let ram = [(0u64, MEM as u64)];
    let mut out = DirtyBitmap::new(&ram);
    assert_eq!(r.dev.harvest_dirty_log(&ram, &mut out), pages.len() as u64);
    let got: Vec<u64> = (0..MEM as u64 / 4096)
        .filter(|&p| out.is_dirty(p))
        .collect();
    assert_eq!(got, pages);
    let mut again = DirtyBitmap::new(&ram);
    assert_eq!(r.dev.harvest_dirty_log(&ram, &mut again), 0);
    assert!(again.is_clean());

    // Off: LOG_ALL cleared, the rings' log flags too.
    let before = r.be.msgs().len();
    r.dev.stop_dirty_log();
    let features: Vec<VhostUserU64> = sent_after(&r.be, before, FrontendReq::SET_FEATURES);
    assert_eq!(features.len(), 1);
    let off = features[0].value;
    assert_eq!(off, on & !LOG_ALL);
    let flags: Vec<u32> =
        sent_after::<VhostUserVringAddr>(&r.be, before, FrontendReq::SET_VRING_ADDR)
            .iter()
            .map(|a| a.flags)
            .collect();
    assert_eq!(flags, vec![0, 0]);
}

#[test]
fn rings_stop_with_their_bases_saved_and_start_again_from_them() {
    let mut r = rig_with(DPDK, 1);
    r.activate();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    let before = r.be.msgs().len();
    r.dev.stop_for_migration().unwrap();
    let stopped: Vec<u32> =
        sent_after::<VhostUserVringState>(&r.be, before, FrontendReq::GET_VRING_BASE)
            .iter()
            .map(|s| s.index)
            .collect();
    assert_eq!(stopped, vec![0, 1]);
    // The snapshot carries where the back end stands (the script answers 40 + index), not
    // where the VMM's unused queue objects stand.
    assert_eq!(r.dev.queue_positions(), vec![(40, 40), (41, 41)]);

    // The migration failed: the rings start again from those bases.
    let before = r.be.msgs().len();
    r.dev.restart_after_migration();
    let bases: Vec<(u32, u32)> =
        sent_after::<VhostUserVringState>(&r.be, before, FrontendReq::SET_VRING_BASE)
            .iter()
            .map(|s| (s.index, s.num))
            .collect();
    assert_eq!(bases, vec![(0, 40), (1, 41)]);
    let enabled: Vec<(u32, u32)> =
        sent_after::<VhostUserVringState>(&r.be, before, FrontendReq::SET_VRING_ENABLE)
            .iter()
            .map(|s| (s.index, s.num))
            .collect();
    assert_eq!(enabled, vec![(0, 1), (1, 1)]);
    // Running again: positions come from the rings, not from a stale stop.
    assert_eq!(r.dev.queue_positions(), vec![(0, 0), (0, 0)]);
}

#[test]
fn a_back_end_that_cannot_log_counts_all_of_ram() {
    let mut r = rig_with(
        Script {
            protocol: DPDK_PROTOCOL & !VhostUserProtocolFeatures::LOG_SHMFD.bits(),
            ..DPDK
        },
        1,
    );
    r.activate();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    assert!(!r.dev.start_dirty_log(), "reported untracked");
    assert!(!r.be.msgs().iter().any(|m| m.is(FrontendReq::SET_LOG_BASE)));
    all_of_ram_until_logging_stops(&r);
}

/// A back end with the log's protocol feature but not `VHOST_F_LOG_ALL` cannot log either.
#[test]
fn a_back_end_without_log_all_cannot_log() {
    let mut r = rig_with(
        Script {
            features: DPDK_FEATURES & !LOG_ALL,
            ..DPDK
        },
        1,
    );
    r.activate();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    assert!(!r.dev.start_dirty_log(), "reported untracked");
    all_of_ram_until_logging_stops(&r);
}

/// A back end that goes away while the device logs and comes back (`script`): started
/// again as a running migration needs (the rig's back end is the new one).
fn back_end_back_while_logging(script: Script) -> Rig {
    let mut r = rig_full(DPDK, 1, IotlbMode::Miss, Some(Duration::from_millis(20)));
    r.activate();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    assert!(r.dev.start_dirty_log());
    let socket = r.be.socket.clone();
    r.be.hang_up();
    eventually("link down", || !r.dev.link_up());
    // The new one listens on the same path; the old one's drop would remove it.
    let old = std::mem::replace(&mut r.be, Backend::start_at(socket, script));
    std::mem::forget(old);
    eventually("link up again", || r.dev.link_up());
    r.be.wait_for("ring 1 enabled again", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    r
}

/// A back end that can log comes back during a migration: it is told to log again (the
/// log, LOG_ALL), and the harvest keeps taking only what it logs.
#[test]
fn a_back_end_back_during_logging_logs_again() {
    let r = back_end_back_while_logging(DPDK);
    assert!(r.be.msgs().iter().any(|m| m.is(FrontendReq::SET_LOG_BASE)));
    let features: Vec<u64> = sent_after::<VhostUserU64>(&r.be, 0, FrontendReq::SET_FEATURES)
        .iter()
        .map(|f| f.value)
        .collect();
    assert!(
        !features.is_empty() && features.iter().all(|f| f & LOG_ALL != 0),
        "{features:x?}"
    );
    let ram = [(0u64, MEM as u64)];
    let mut out = DirtyBitmap::new(&ram);
    let n = r.dev.harvest_dirty_log(&ram, &mut out);
    assert!(n < MEM as u64 / 4096, "the log was kept: {n} pages");
}

/// A back end that comes back during a migration unable to log: the log is lost from then
/// on (all of RAM at every harvest), and it is not asked to log.
#[test]
fn a_back_end_back_unable_to_log_loses_the_log() {
    let r = back_end_back_while_logging(Script {
        protocol: DPDK_PROTOCOL & !VhostUserProtocolFeatures::LOG_SHMFD.bits(),
        ..DPDK
    });
    assert!(!r.be.msgs().iter().any(|m| m.is(FrontendReq::SET_LOG_BASE)));
    all_of_ram_until_logging_stops(&r);
}

/// Every page of RAM, below the PCI hole and above 4 GiB, is dirty at each harvest while
/// logging is lost; nothing once logging stopped.
fn all_of_ram_until_logging_stops(r: &Rig) {
    let ram = [(0u64, MEM as u64), (1 << 32, 16 * 4096)];
    let pages = MEM as u64 / 4096 + 16;
    let mut out = DirtyBitmap::new(&ram);
    assert_eq!(r.dev.harvest_dirty_log(&ram, &mut out), pages);
    assert_eq!(out.count(), pages);
    assert_eq!(out.outside(), 0);
    assert!(out.is_dirty((1 << 32) / 4096 + 15));
    r.dev.stop_dirty_log();
    let mut after = DirtyBitmap::new(&ram);
    assert_eq!(r.dev.harvest_dirty_log(&ram, &mut after), 0);
}

/// A back end that hangs up as logging starts: reported untracked (a migration copies all
/// of RAM at every round), and the link goes down.
#[test]
fn a_back_end_lost_as_logging_starts_is_reported_untracked() {
    let mut r = rig_with(
        Script {
            hang_up_on_log_base: true,
            ..DPDK
        },
        1,
    );
    r.activate();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    assert!(!r.dev.start_dirty_log(), "reported untracked");
    eventually("link down", || !r.dev.link_up());
    all_of_ram_until_logging_stops(&r);
}

#[test]
fn a_ring_base_past_16_bits_fails_the_stop_and_cuts_the_back_end_off() {
    let mut r = rig_with(
        Script {
            base: 0x1_0000,
            ..DPDK
        },
        1,
    );
    r.activate();
    r.be.wait_for("ring 1 enabled", |m| {
        m.is(FrontendReq::SET_VRING_ENABLE) && m.obj::<VhostUserVringState>().index == 1
    });
    let e = r.dev.stop_for_migration().unwrap_err();
    assert!(e.to_string().contains("GET_VRING_BASE"), "{e}");
    eventually("link down", || !r.dev.link_up());
}
