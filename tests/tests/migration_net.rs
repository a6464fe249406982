//! Live migration of a guest exchanging frames with DPDK's vhost-user back end (dpdk-testpmd,
//! device IOTLB on) behind the vIOMMU, as real processes: two VMMs, two testpmds, two DMA
//! test device processes (the guest watches the device's instance register to know it moved).
//! The fast test guest's `net_migrate` case loops frames back through testpmd without end,
//! rotating its receive buffers, which only the back end writes: a frame whose write the
//! back end did not log is lost in the migration, and both `verify` and the guest see it.
//!
//! The source's back end logs into a shared memfd (`VHOST_F_LOG_ALL`, `SET_LOG_BASE`,
//! `VHOST_VRING_F_LOG`), its rings are stopped with `GET_VRING_BASE` at the stop-and-copy,
//! and the destination starts its own testpmd from those bases, its device IOTLB filled
//! again from the migrated vIOMMU state through misses.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use sync::MutexExt;
use vmm_tests::migration::{
    self, assert_handed_over, assert_migrated, assert_never_ran, assert_verify_failed,
    wait_for_path,
};
use vmm_tests::{api, bin, counter, scratch, DeviceProcess, Testpmd, VmmCommand, VmmProcess};

const DEADLINE: Duration = Duration::from_secs(300);
const MEMORY: &str = "256M";
/// RAM pages of a 256 MiB guest.
const PAGES: u64 = 65536;

/// One migration at a time: each side's testpmd busy-polls a CPU.
static ONE: Mutex<()> = Mutex::new(());

/// The VMM arguments both sides share: RAM, the vIOMMU, the DMA test device and the net
/// device behind it.
fn common(dev: &DeviceProcess, pmd: &Testpmd) -> VmmCommand {
    VmmCommand::new()
        .memory(MEMORY)
        .iommu()
        .vfio_user(&dev.arg(true))
        .vhost_user_net(&pmd.arg(0, true))
        .counters()
}

struct Pair {
    src: VmmProcess,
    dst: VmmProcess,
    api: std::path::PathBuf,
    report: serde_json::Value,
    // Kept alive for the processes' lifetime.
    _procs: (DeviceProcess, DeviceProcess, Testpmd, Testpmd),
}

/// Starts both sides (the source's VMM with `src_env`), waits until frames flow, migrates
/// with `verify` (and the `extra` options) and returns the report.
fn migrate(name: &str, src_env: &[(&str, &str)], extra: &str) -> Pair {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (pmd_a, pmd_b) = (
        Testpmd::start(&format!("{name}-src"), 1),
        Testpmd::start(&format!("{name}-dst"), 1),
    );
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let dst = common(&dev_b, &pmd_b).incoming(&to).start();
    let mut src = common(&dev_a, &pmd_a)
        .kernel(&bin("test-guest"))
        .cmdline("tests=net_migrate net_after=200")
        .api_socket(&api_sock)
        .envs(src_env)
        .start();
    wait_for_path(&mig_sock);
    src.wait_console("# migrate-ready", DEADLINE);
    let report = migration::migrate(&api_sock, &to, &format!(r#","verify":true{extra}"#));
    Pair {
        src,
        dst,
        api: api_sock,
        report,
        _procs: (dev_a, dev_b, pmd_a, pmd_b),
    }
}

/// The per-source figures of a report, for the log.
fn figures(report: &serde_json::Value) {
    eprintln!(
        "downtime {} ms, total {} ms, dirty by source {}, final {}",
        report["downtime_ms"],
        report["total_ms"],
        report["dirty_by_source"],
        report["final_by_source"]
    );
    for r in report["rounds"].as_array().into_iter().flatten() {
        eprintln!(
            "round {}: {} pages, found dirty by source {}",
            r["round"], r["pages"], r["dirty_by_source"]
        );
    }
}

#[test]
fn frames_flow_through_a_live_migration_and_verify_passes() {
    let _one = ONE.locked();
    let Pair {
        src,
        dst,
        report,
        _procs,
        ..
    } = migrate("mig-net", &[], "");
    figures(&report);
    assert_migrated(&report, PAGES);
    // The back end's log found pages (the receive buffers and the used rings).
    let by = &report["dirty_by_source"];
    assert!(by["vhost_user"].as_u64().unwrap() > 0, "{report}");
    assert!(by["kvm"].as_u64().unwrap() > 0, "{report}");
    assert_handed_over(&src.wait(DEADLINE));
    let dst = dst.wait(DEADLINE);
    eprintln!("{}\n{}", dst.console, dst.stderr);
    assert_eq!(dst.code(), 0, "the guest's verdict on the destination");
    dst.assert_console("ok 1 - net_migrate");
    dst.assert_console("# net_migrate: migrated after ");
    dst.assert_console(" after; ");
    dst.assert_console(" 0 buffers lost their frame");
    // The destination's testpmd took over: its device IOTLB was filled again from the
    // migrated vIOMMU state.
    assert!(counter(&dst, "vhost-user-net", "updates") > 0);
    assert_eq!(counter(&dst, "vhost-user-net", "faults"), 0);
}

#[test]
fn a_back_end_log_that_is_ignored_fails_verify_and_the_source_runs_on() {
    let _one = ONE.locked();
    let Pair {
        mut src,
        dst,
        api: api_sock,
        report,
        _procs,
    } = migrate(
        "mig-net-ignored",
        &[("VMM_TEST_VHOST_USER_LOG", "ignore")],
        "",
    );
    assert_verify_failed(&report);
    assert_never_ran(
        &dst.wait(DEADLINE),
        "the source aborted the migration",
        "# net_migrate: migrated",
    );
    source_runs_on(&mut src, &api_sock);
}

#[test]
fn a_back_end_that_cannot_log_is_copied_in_full_and_reported_untracked() {
    let _one = ONE.locked();
    let Pair {
        src,
        dst,
        report,
        _procs,
        ..
    } = migrate(
        "mig-net-nolog",
        &[("VMM_TEST_VHOST_USER_LOG", "unsupported")],
        r#","max_rounds":2"#,
    );
    figures(&report);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["verified_pages"], PAGES, "{report}");
    let untracked = report["untracked_devices"].as_array().unwrap();
    assert_eq!(untracked.len(), 1, "{report}");
    assert!(
        untracked[0].as_str().unwrap().contains("vhost-user-net"),
        "{report}"
    );
    // All of RAM counted dirty at every harvest (the first and the final at least).
    assert!(
        report["dirty_by_source"]["vhost_user"].as_u64().unwrap() >= 2 * PAGES,
        "{report}"
    );
    assert_eq!(report["final_by_source"]["vhost_user"], PAGES, "{report}");
    assert_eq!(src.wait(DEADLINE).code(), 0);
    let dst = dst.wait(DEADLINE);
    assert_eq!(dst.code(), 0, "{}\n{}", dst.console, dst.stderr);
    dst.assert_console(" 0 buffers lost their frame");
}

/// A back end that dies during pre-copy and comes back (`reconnect=1`, a new testpmd on the
/// same socket) is started logging, with the log the migration harvests: the frames it loops
/// back before the stop-and-copy land in buffers the first round already sent, and verify
/// passes, the guest losing no frame. The pre-copy is slowed (256 MiB at 24 MiB/s, about
/// 11 s) so that the new back end comes and carries frames before it ends; the test checks
/// that order from the source's log and the new testpmd's count rather than assuming it.
#[test]
fn a_back_end_that_reconnects_during_pre_copy_keeps_logging() {
    let _one = ONE.locked();
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (mut pmd_a, pmd_b) = (
        Testpmd::start("mig-net-reconnect-src", 1),
        Testpmd::start("mig-net-reconnect-dst", 1),
    );
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let dst = common(&dev_b, &pmd_b).incoming(&to).start();
    let mut src = VmmCommand::new()
        .memory(MEMORY)
        .iommu()
        .vfio_user(&dev_a.arg(true))
        .vhost_user_net(&format!("{},reconnect=1", pmd_a.arg(0, true)))
        .counters()
        .kernel(&bin("test-guest"))
        .cmdline("tests=net_migrate net_after=200")
        .api_socket(&api_sock)
        .start();
    wait_for_path(&mig_sock);
    src.wait_console("# migrate-ready", DEADLINE);
    let (a, t) = (api_sock.clone(), to.clone());
    let migrating = std::thread::spawn(move || {
        migration::migrate(
            &a,
            &t,
            &format!(r#","verify":true,"max_bandwidth":{}"#, 24 << 20),
        )
    });
    while api(&api_sock, r#"{"cmd":"status"}"#)["migration"].is_null() {
        assert!(!migrating.is_finished(), "the migration ended at once");
        std::thread::sleep(Duration::from_millis(10));
    }
    let sockets = pmd_a.sockets.clone();
    pmd_a.kill();
    let pmd_a2 = Testpmd::start_counting_on("mig-net-reconnect-src-2", sockets);
    src.wait_stderr("back end reconnected; link up", DEADLINE);
    let report = migrating.join().expect("the migration thread");
    figures(&report);
    assert_migrated(&report, PAGES);
    let src = src.wait(DEADLINE);
    assert_handed_over(&src);
    // The order: the back end went, came back, then the stop-and-copy.
    let at = |needle: &str| {
        src.stderr
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in\n{}", src.stderr))
    };
    assert!(at("the back end went away") < at("back end reconnected; link up"));
    assert!(
        at("back end reconnected; link up") < at("migration: stop-and-copy"),
        "the pre-copy ended before the back end came back:\n{}",
        src.stderr
    );
    assert_eq!(
        src.stderr.matches("back end reconnected; link up").count(),
        1
    );
    // The new back end looped frames back before its ring was stopped.
    let looped = pmd_a2.rx_packets(0);
    assert!(looped > 0, "the new back end carried no frame");
    let dst = dst.wait(DEADLINE);
    eprintln!("{}\n{}", dst.console, dst.stderr);
    assert_eq!(dst.code(), 0, "the guest's verdict on the destination");
    dst.assert_console("ok 1 - net_migrate");
    dst.assert_console(" 0 buffers lost their frame");
    eprintln!("the new back end looped {looped} frames back during the pre-copy");
}

/// After a failed migration the source's rings run again: frames keep coming back there.
fn source_runs_on(src: &mut VmmProcess, api_sock: &Path) {
    assert_eq!(api(api_sock, r#"{"cmd":"status"}"#)["state"], "running");
    let before = src.console().matches("# net_migrate: ").count();
    let start = std::time::Instant::now();
    while src.console().matches("# net_migrate: ").count() < before + 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "no frames back on the source after the failed migration:\n{}",
            src.console()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(api(api_sock, r#"{"cmd":"quit"}"#)["ok"], true);
}
