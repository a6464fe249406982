//! The vhost-user net device with DPDK's vhost-user back end (dpdk-testpmd, device IOTLB on,
//! frames looped back), driven by the bare-metal test guest: frames through the virtio-iommu
//! and without it, and the back end made to touch IOVAs the guest did not map.

use std::time::Duration;

use vmm_tests::{bin, counter, run_vmm, tap, Testpmd};

const DEADLINE: Duration = Duration::from_secs(300);

fn guest(pmd: &Testpmd, port: usize, iommu: bool, tests: &str) -> vmm_tests::Run {
    guest_with(pmd, port, iommu, "", tests)
}

/// [`guest`] with more `--vhost-user-net` options (`,iotlb=miss`).
fn guest_with(
    pmd: &Testpmd,
    port: usize,
    iommu: bool,
    options: &str,
    tests: &str,
) -> vmm_tests::Run {
    let g = bin("test-guest").display().to_string();
    let net = format!("{}{options}", pmd.arg(port, iommu));
    let cmdline = format!("tests={tests} net_frames=100");
    let mut args = vec![
        "--kernel",
        &g,
        "--memory",
        "128M",
        "--counters",
        "--vhost-user-net",
        &net,
        "--cmdline",
        &cmdline,
    ];
    if iommu {
        args.push("--iommu");
    }
    run_vmm(&args, DEADLINE)
}

/// `net_echo`'s drops are explained: DPDK drops a frame only while it waits for a
/// translation it missed on, so a run drops at most as many frames as the back end missed
/// (none without the vIOMMU, or with every translation sent ahead and none missed).
fn drops_explained(run: &vmm_tests::Run) {
    let dropped: u64 = run
        .console
        .lines()
        .find_map(|l| l.strip_prefix("# net_echo: "))
        .and_then(|l| l.split(" (").nth(1))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("net_echo's drops");
    let misses = counter(run, "vhost-user-net", "misses");
    assert!(
        dropped <= misses,
        "{dropped} frames dropped, {misses} misses:\n{}",
        run.console
    );
}

fn verdict(run: &vmm_tests::Run, cases: &[&str]) {
    let (ok, bad, failing) = tap(&run.console);
    assert_eq!(
        (ok, bad),
        (cases.len(), 0),
        "{failing:?}\n{}\n{}",
        run.console,
        run.stderr
    );
    for c in cases {
        assert!(
            run.console.lines().any(|l| l.starts_with("ok ")
                && l.ends_with(&format!("- {c}"))
                && !l.contains("SKIP")),
            "{c} did not pass:\n{}",
            run.console
        );
    }
    assert!(
        run.stderr.contains("guest ended (test exit code 0)"),
        "the guest's verdict:\n{}",
        run.stderr
    );
}

#[test]
fn frames_through_the_viommu_and_faults_on_iovas_the_guest_did_not_map() {
    let pmd = Testpmd::start("net", 2);
    let behind = std::thread::scope(|s| {
        let plain = s.spawn(|| guest(&pmd, 1, false, "net_echo"));
        let behind = guest(&pmd, 0, true, "net_echo,net_fault");
        let plain = plain.join().unwrap();
        eprintln!("{}\n{}", plain.console, plain.stderr);
        verdict(&plain, &["net_echo"]);
        assert_eq!(counter(&plain, "vhost-user-net", "misses"), 0);
        drops_explained(&plain);
        behind
    });
    eprintln!("{}\n{}", behind.console, behind.stderr);
    verdict(&behind, &["net_echo", "net_fault"]);
    drops_explained(&behind);
    // The two IOVAs the guest did not map (a receive buffer it unmapped, a transmit buffer
    // never mapped) each got no UPDATE and a fault event for the net device's endpoint.
    assert!(counter(&behind, "vhost-user-net", "faults") >= 2);
    assert!(counter(&behind, "virtio-iommu", "faults") >= 2);
    assert!(
        behind
            .console
            .contains("# net_fault: receive at 0x4010000000: fault reason 2 flags 0x102"),
        "{}",
        behind.console
    );
    assert!(behind
        .console
        .contains("# net_fault: transmit at 0x4020000000: fault reason 2 flags 0x101"));
    // Every miss on a mapped IOVA was answered; the unmap became an invalidation.
    let misses = counter(&behind, "vhost-user-net", "misses");
    let updates = counter(&behind, "vhost-user-net", "updates");
    let faults = counter(&behind, "vhost-user-net", "faults");
    assert_eq!(misses, updates + faults);
    assert!(counter(&behind, "vhost-user-net", "invalidations") >= 1);
    let stats = pmd.stop();
    let (rx, tx, dropped) = vmm_tests::testpmd_port_stats(&stats, 0).expect("port 0 stats");
    eprintln!("testpmd port 0: rx={rx} tx={tx} tx_dropped={dropped}");
    assert!(tx >= 101, "frames looped back through the vIOMMU");
}

/// `iotlb=miss`: the back end learns translations only by asking. DPDK's testpmd misses on
/// every buffer it touches first; each miss is answered with an UPDATE of the guest's mapping
/// (or, on an IOVA the guest did not map, a fault event), nothing is sent ahead, and the frames
/// come back as with prefetching.
#[test]
fn frames_through_the_viommu_with_the_back_end_asking_for_every_translation() {
    let pmd = Testpmd::start("net-miss", 1);
    let run = guest_with(&pmd, 0, true, ",iotlb=miss", "net_echo,net_fault");
    eprintln!("{}\n{}", run.console, run.stderr);
    verdict(&run, &["net_echo", "net_fault"]);
    drops_explained(&run);
    let dev = "vhost-user-net";
    assert_eq!(counter(&run, dev, "prefetches"), 0, "nothing is sent ahead");
    let misses = counter(&run, dev, "misses");
    let (updates, faults) = (counter(&run, dev, "updates"), counter(&run, dev, "faults"));
    assert!(
        updates > 0,
        "the back end learnt its translations by missing"
    );
    assert_eq!(misses, updates + faults, "every miss answered or faulted");
    assert!(faults >= 2, "the two IOVAs the guest did not map");
    // A frame whose buffer testpmd missed on may be dropped (DPDK drops a packet while it
    // waits for the translation); every frame the guest got back went through testpmd.
    let back: u64 = run
        .console
        .lines()
        .find_map(|l| l.strip_prefix("# net_echo: "))
        .and_then(|l| l.split(" of ").next())
        .and_then(|n| n.parse().ok())
        .expect("net_echo's count");
    let stats = pmd.stop();
    let (_, tx, _) = vmm_tests::testpmd_port_stats(&stats, 0).expect("port 0 stats");
    assert!(
        back > 0 && tx >= back,
        "testpmd sent {tx}, the guest got {back} back"
    );
}
