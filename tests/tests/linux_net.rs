//! Linux's virtio-net driver on the vhost-user net device, with DPDK's vhost-user back end
//! (dpdk-testpmd, device IOTLB on, frames looped back with their MACs swapped): the guest's
//! `vmm_nettest` suite sends frames of 60 to 1514 bytes (some as chains of descriptors) and
//! checks every byte that comes back; behind the virtio-iommu with lazy and strict
//! invalidation (300 frames each in the test command, 10,000 under `tests/stress.sh`) and
//! without it. Then testpmd is killed mid-traffic: the
//! VMM and the DMA test device behind the same vIOMMU keep running, and with `reconnect=`
//! traffic resumes once testpmd is back.
//!
//! Verdicts come from the suites: every KTAP plan complete with no failure, and the guest's
//! verdict through the test-exit port (`guest ended (test exit code 0)`), never from the exit
//! status alone (a panic resets the guest, which also exits 0).

use std::sync::RwLock;
use std::time::Duration;

use sync::RwLockExt;
use vmm_tests::migration::{self, assert_handed_over, assert_migrated};
use vmm_tests::{
    check_suites, console_text as console, console_value, counter, guest_kernel, run_vmm, scale,
    scratch, DeviceProcess, Run, Testpmd, VmmCommand, VmmProcess,
};

const DEADLINE: Duration = Duration::from_secs(1800);

/// The frame test (three guests) runs alone; the kill and migration tests (one running guest
/// each) run together.
static GUESTS: RwLock<()> = RwLock::new(());

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Lazy,
    Strict,
    NoIommu,
}

fn net_args(mode: Mode, net: &str, frames: u32, extra_cmdline: &str) -> Vec<String> {
    let g = guest_kernel();
    let mut cmdline = format!(
        "console=ttyS0 reboot=k panic=1 vmm_nettest.required=1 vmm_nettest.frames={frames}{extra_cmdline}"
    );
    if mode == Mode::Strict {
        cmdline += " iommu.strict=1";
    }
    let mut args: Vec<String> = [
        "--kernel",
        g.vmlinux.to_str().unwrap(),
        "--initramfs",
        g.initramfs.to_str().unwrap(),
        "--memory",
        "256M",
        "--counters",
        "--cmdline",
        &cmdline,
        "--vhost-user-net",
        net,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if mode != Mode::NoIommu {
        args.push("--iommu".into());
    }
    args
}

/// Frames each run loops through testpmd.
fn frames_of(mode: Mode) -> u32 {
    if mode == Mode::NoIommu {
        scale(300, 3_000)
    } else {
        scale(300, 10_000)
    }
}

/// Frames the kill test loops through testpmd in all.
fn mid_traffic_frames() -> u32 {
    scale(300, 6_000)
}

/// Frames of the migration test: the traffic left after [`FLOWING`] (350 frames, about 12 s
/// at the 28 frames a second seen here) outlasts the migration (the full copy paced to
/// 64 MiB/s takes 4 s), so the hand-over happens mid-traffic even on a host several times
/// faster. With 300 frames and 32 MiB/s, a run at 28 frames a second ended the guest's suite
/// before the hand-over.
fn migration_frames() -> u32 {
    scale(450, 6_000)
}

/// Frames testpmd has seen before a test acts "mid-traffic".
const FLOWING: u64 = 100;

#[test]
fn frames_checked_byte_for_byte_lazy_strict_and_without_the_viommu() {
    let _alone = GUESTS.write_locked();
    let pmd = Testpmd::start("linux-net", 3);
    let runs: Vec<(Mode, Run)> = std::thread::scope(|s| {
        let handles: Vec<_> = [
            (Mode::Lazy, frames_of(Mode::Lazy)),
            (Mode::Strict, frames_of(Mode::Strict)),
            (Mode::NoIommu, frames_of(Mode::NoIommu)),
        ]
        .into_iter()
        .enumerate()
        .map(|(port, (mode, frames))| {
            let pmd = &pmd;
            s.spawn(move || {
                let net = pmd.arg(port, mode != Mode::NoIommu);
                let args = net_args(mode, &net, frames, "");
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                (mode, run_vmm(&args, DEADLINE))
            })
        })
        .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stats = pmd.stop();
    for (port, (mode, run)) in runs.iter().enumerate() {
        let name = format!("{mode:?}");
        let con = console(run);
        eprintln!(
            "{name}: {} s\n{}\n{}",
            run.wall.as_secs(),
            con.lines()
                .filter(|l| l.starts_with("# net"))
                .collect::<Vec<_>>()
                .join("\n"),
            run.stderr
                .lines()
                .filter(|l| l.starts_with("counters: vhost-user-net"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        check_suites(&name, run, &["vmm_nettest"]);
        let frames = u64::from(frames_of(*mode));
        let received = console_value(run, "# net: sent=", "received");
        assert!(received >= frames, "{name}: {received} frames back");
        assert_eq!(console_value(run, "# net: sent=", "corrupt"), 0, "{name}");
        assert!(
            console_value(run, "# net: sent=", "chains_received") > 0,
            "{name}: chained frames came back"
        );
        // testpmd saw every frame the guest sent and sent back every one it received.
        let (rx, tx, _) = vmm_tests::testpmd_port_stats(&stats, port)
            .unwrap_or_else(|| panic!("no statistics for port {port}:\n{stats}"));
        assert!(
            rx >= console_value(run, "# net: sent=", "sent")
                - console_value(run, "# net: sent=", "xmit_errors")
        );
        assert!(tx >= received, "{name}: testpmd sent {tx}");
        let dev = "vhost-user-net";
        if *mode == Mode::NoIommu {
            assert_eq!(
                counter(run, dev, "misses"),
                0,
                "{name}: no IOTLB without the vIOMMU"
            );
            assert_eq!(counter(run, dev, "invalidations"), 0, "{name}");
            continue;
        }
        // Behind the vIOMMU: every miss answered with an UPDATE or, on an IOVA the guest
        // does not map, a fault; guest mappings sent ahead, and every buffer the guest
        // unmapped invalidated before the unmap completed. Lazy: no fault at all. Strict:
        // seen once in several runs, the back end missed on a buffer the guest had just
        // unmapped; the access is refused (a fault event) and that frame is lost, so a
        // fault must cost a counted drop and nothing else.
        let misses = counter(run, dev, "misses");
        let faults = counter(run, dev, "faults");
        assert_eq!(
            misses,
            counter(run, dev, "updates") + faults,
            "{name}: every miss answered or faulted"
        );
        if *mode == Mode::Strict {
            let dropped = console_value(run, "# net: sent=", "dropped");
            assert!(
                faults <= dropped,
                "{name}: {faults} faults, {dropped} drops"
            );
        } else {
            assert_eq!(faults, 0, "{name}");
        }
        assert!(counter(run, dev, "prefetches") >= received, "{name}");
        // DPDK's invalidation also drops the entry that starts where the range ends; Linux's
        // IOVA allocator puts buffers side by side, so the VMM must send such entries again.
        assert!(
            counter(run, dev, "resent") > 0,
            "{name}: no entry sent again after an invalidation"
        );
        let unmaps = counter(run, "virtio-iommu", "unmap");
        let invalidations = counter(run, dev, "invalidations");
        let invalidated = counter(run, dev, "invalidated_pages");
        assert!(unmaps > frames, "{name}: buffers are unmapped");
        // Consecutive UNMAPs of one batch reach the back end as one INVALIDATE, so count
        // pages: every UNMAP removed at least one page, and their pages are disjoint.
        assert!(
            invalidations > 0 && invalidated + 64 >= unmaps,
            "{name}: {invalidations} invalidations ({invalidated} pages) for {unmaps} UNMAPs"
        );
        eprintln!(
            "figure {name}: {} misses per 1,000 frames, {} pages per UPDATE",
            misses * 1000 / received,
            counter(run, dev, "update_pages") as f64
                / (counter(run, dev, "updates") + counter(run, dev, "prefetches")) as f64
        );
    }
}

#[test]
fn testpmd_killed_mid_traffic_the_vmm_goes_on_and_traffic_resumes() {
    let _shared = GUESTS.read_locked();
    let mut pmd = Testpmd::start_counting("linux-kill", 1);
    let dma = DeviceProcess::start();
    let net = format!("{},reconnect=1", pmd.arg(0, true));
    let mut args = net_args(
        Mode::Lazy,
        &net,
        mid_traffic_frames(),
        " vmm_dmatest.required=1 vmm_dmatest.cycles=500 vmm_dmatest.samples=100",
    );
    let vfio = dma.arg(true);
    args.extend(["--vfio-user".to_string(), vfio]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vmm = VmmProcess::start(&args);
    // Mid-traffic: testpmd has looped frames back.
    pmd.wait_rx(0, FLOWING, DEADLINE);
    let sockets = pmd.sockets.clone();
    pmd.kill();
    std::thread::sleep(Duration::from_secs(3));
    let pmd2 = Testpmd::start_on("linux-kill-2", sockets);
    let run = vmm.wait(DEADLINE);
    drop(pmd2);
    eprintln!(
        "{}\n{}",
        console(&run)
            .lines()
            .filter(|l| l.starts_with("# ") || l.starts_with("ok") || l.starts_with("not ok"))
            .collect::<Vec<_>>()
            .join("\n"),
        run.stderr
    );
    // Both suites passed after the outage: the net suite got its frames back once the new
    // testpmd came, and the DMA suite (run after it) used the DMA device behind the same
    // vIOMMU.
    check_suites("kill", &run, &["vmm_nettest", "vmm_dmatest"]);
    assert!(console_value(&run, "# net: sent=", "received") >= u64::from(mid_traffic_frames()));
    assert_eq!(counter(&run, "vhost-user-net", "disconnects"), 1);
    assert_eq!(counter(&run, "vhost-user-net", "reconnects"), 1);
    assert!(run
        .stderr
        .contains("the back end went away; link down, reconnecting every 1 s"));
    assert!(run.stderr.contains("back end reconnected; link up"));
}

/// The migration test's bound (it takes about a minute).
const MIGRATION_DEADLINE: Duration = Duration::from_secs(600);

/// Linux's virtio-net driver behind the vIOMMU, mid-traffic, is live-migrated to a VMM with
/// its own testpmd: `verify` passes (the back end's writes were logged), and the suite goes
/// on there to the end, every frame checked byte for byte, the device IOTLB filled again
/// from the migrated vIOMMU state.
#[test]
fn linux_migrates_mid_traffic_to_a_vmm_with_its_own_testpmd() {
    let _shared = GUESTS.read_locked();
    let (pmd_a, pmd_b) = (
        Testpmd::start_counting("linux-mig-src", 1),
        Testpmd::start("linux-mig-dst", 1),
    );
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let net_b = pmd_b.arg(0, true);
    let dst = VmmCommand::new()
        .memory("256M")
        .counters()
        .vhost_user_net(&net_b)
        .iommu()
        .incoming(&to)
        .start();
    let mut args = net_args(Mode::Lazy, &pmd_a.arg(0, true), migration_frames(), "");
    args.extend(["--api-socket".to_string(), api_sock.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let src = VmmProcess::start(&args);
    // Traffic flows: testpmd has looped frames back.
    pmd_a.wait_rx(0, FLOWING, MIGRATION_DEADLINE);
    // The full copy paced to 64 MiB/s takes 4 s of the guest's traffic (20 to 30 frames a
    // second here): the back end writes while its dirty log is on.
    let report = migration::migrate(
        &api_sock,
        &to,
        &format!(r#","verify":true,"max_bandwidth":{}"#, 64 << 20),
    );
    assert_migrated(&report, 65536);
    assert!(
        report["dirty_by_source"]["vhost_user"].as_u64().unwrap() > 0,
        "{report}"
    );
    let src = src.wait(MIGRATION_DEADLINE);
    assert_handed_over(&src);
    let dst = dst.wait(MIGRATION_DEADLINE);
    // The suite's KTAP starts on the source and ends on the destination.
    let whole = Run {
        status: dst.status,
        console: format!("{}{}", src.console, dst.console),
        stderr: dst.stderr.clone(),
        wall: dst.wall,
    };
    eprintln!(
        "{}\n{}",
        console(&whole)
            .lines()
            .filter(|l| l.starts_with("# net"))
            .collect::<Vec<_>>()
            .join("\n"),
        dst.stderr
    );
    check_suites("migrated", &whole, &["vmm_nettest"]);
    assert!(console_value(&dst, "# net: sent=", "received") >= u64::from(migration_frames()));
    assert_eq!(console_value(&dst, "# net: sent=", "corrupt"), 0);
    // The destination's testpmd carried the frames: its device IOTLB was filled again.
    let dev = "vhost-user-net";
    assert!(counter(&dst, dev, "misses") + counter(&dst, dev, "prefetches") > 0);
}
