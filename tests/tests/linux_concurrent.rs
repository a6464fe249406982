//! DMA from every vCPU at once: the project's Linux guest on two vCPUs with two DMA test
//! devices and a virtio-blk disk, all behind the virtio-iommu (lazy invalidation; strict too
//! under `tests/stress.sh`, the strict policy's own cases being in `linux_suite` and
//! `linux_net`), runs the per-device suite on each test device and then the concurrent suite
//! (`vmm_dmatest.concurrent=`): one kthread per CPU, each round a copy on its own device, a
//! fill on the device both share and a 16 KiB raw read of the disk, every byte checked, so
//! that MAPs and UNMAPs for three domains, and for one domain from both CPUs, reach the
//! vIOMMU interleaved.
//!
//! Verdicts come from the suites (every KTAP plan complete, the guest's verdict through the
//! test-exit port). The rounds must really overlap (the suite counts rounds that started
//! while another was running). The dirty log must hold exactly the pages the suite had the
//! two devices write, and each device did exactly the transfers the suite asked for. Each
//! test device also runs the fault cases: the faults reach the guest for that device's
//! endpoint alone.

use std::time::Duration;

use vmm_tests::{
    assert_same_pages, check_suites, console_text, console_value, console_values, counter,
    dirty_log_pages, guest_kernel, guest_written_pages, run_vmm, scale, scratch, DeviceProcess,
    Run,
};

const DEADLINE: Duration = Duration::from_secs(1500);
/// Rounds per CPU (the test command runs them short; `tests/stress.sh` long).
fn rounds() -> u64 {
    u64::from(scale(50, 300))
}
const CPUS: u64 = 2;

fn boot(strict: bool) -> (Run, std::path::PathBuf) {
    let g = guest_kernel();
    let disk = g.rootfs_copy();
    let (a, b) = (DeviceProcess::start(), DeviceProcess::start());
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 vmm_dmatest.required=1 \
         vmm_dmatest.cases=copy,fill,dirty_sparse,sg,fault_ro,fault_unmapped,fault_stale \
         vmm_dmatest.max_size=65536 \
         vmm_dmatest.concurrent={} vmm_dmatest.disk=vda{}",
        rounds(),
        if strict { " iommu.strict=1" } else { "" }
    );
    let disk_arg = format!("path={},iommu=on", disk.display());
    let dirty_log = scratch("dirty.log");
    let dirty = dirty_log.display().to_string();
    let (va, vb) = (a.arg(true), b.arg(true));
    let cpus = CPUS.to_string();
    let run = run_vmm(
        &[
            "--kernel",
            g.vmlinux.to_str().unwrap(),
            "--initramfs",
            g.initramfs.to_str().unwrap(),
            "--memory",
            "256M",
            "--cpus",
            &cpus,
            "--iommu",
            "--counters",
            "--track-dirty",
            "--dirty-log-out",
            &dirty,
            "--cmdline",
            &cmdline,
            "--disk",
            &disk_arg,
            "--vfio-user",
            &va,
            "--vfio-user",
            &vb,
        ],
        DEADLINE,
    );
    let _ = std::fs::remove_file(disk);
    (run, dirty_log)
}

/// The counters lines of the vfio-user devices.
fn vfio_user_lines(run: &Run) -> Vec<&str> {
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("counters: vfio-user device"))
        .collect();
    assert_eq!(lines.len(), 2, "{}", run.stderr);
    lines
}

fn check(name: &str, run: &Run, dirty_log: &std::path::Path) {
    let console = console_text(run);
    eprintln!(
        "{name}: {} s wall\n{}\n{}",
        run.wall.as_secs(),
        console
            .lines()
            .filter(|l| l.starts_with("# concurrent") || l.starts_with("# totals"))
            .collect::<Vec<_>>()
            .join("\n"),
        run.stderr
            .lines()
            .filter(|l| l.starts_with("counters:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let suites = check_suites(name, run, &["vmm_dmatest", "vmm_dmatest_concurrent"]);
    assert_eq!(
        suites.iter().filter(|s| *s == "vmm_dmatest").count(),
        2,
        "{name}: the per-device suite ran on both test devices"
    );
    assert!(
        console.contains(&format!(
            "# vmm_dmatest_concurrent: {CPUS} CPUs, 2 test devices"
        )),
        "{name}"
    );
    assert!(console.contains("disk vda"), "{name}");
    assert!(!console.contains("disk_reference # SKIP"), "{name}");

    // Every worker did every round, the disk included, and the rounds overlapped.
    assert_eq!(
        console_values(&console, "# concurrent: cpu", "rounds"),
        vec![rounds(); CPUS as usize],
        "{name}"
    );
    assert_eq!(
        console_values(&console, "# concurrent: cpu", "disk_reads"),
        vec![rounds(); CPUS as usize],
        "{name}"
    );
    let overlapped = console_value(run, "# concurrent: overlapped", "rounds");
    assert!(
        overlapped > 0,
        "{name}: no round ever ran while another did: nothing was concurrent"
    );

    // Each device did what the suite asked, and nothing else.
    let totals = |k| console_values(&console, "# totals:", k);
    assert_eq!(totals("transfers").len(), 2, "{name}");
    assert_eq!(totals("transfers"), totals("completed"), "{name}");
    assert_eq!(totals("bytes"), totals("device_bytes"), "{name}");

    // The dirty log holds exactly the pages the suite had the two devices write.
    let written = guest_written_pages(run);
    assert_eq!(
        written.len() as u64,
        console_value(run, "# written:", "pages"),
        "{name}"
    );
    assert_same_pages(
        &format!("{name}: dirty log against the pages the suite had both devices write"),
        &written,
        &dirty_log_pages(dirty_log),
    );
    let _ = std::fs::remove_file(dirty_log);
    assert_eq!(counter(run, "dirty log", "untracked"), 0, "{name}");
    assert!(counter(run, "virtio-iommu", "dirty_reads") > 0, "{name}");

    // Three endpoints, each in its own DMA domain. Each test device's three fault cases
    // (read-only, never mapped, already unmapped) faulted on that device alone, each an event
    // in the guest for that device's endpoint; the disk read through translated DMA every
    // time without a fault.
    assert_eq!(counter(run, "virtio-iommu", "domains"), 3, "{name}");
    assert_eq!(counter(run, "virtio-iommu", "faults"), 6, "{name}");
    let mut events = std::collections::BTreeMap::<&str, usize>::new();
    for l in console.lines() {
        if let Some(rest) = l.split("page fault from EP ").nth(1) {
            *events.entry(rest.split(' ').next().unwrap()).or_default() += 1;
        }
    }
    assert_eq!(
        events.values().copied().collect::<Vec<_>>(),
        vec![3, 3],
        "{name}: fault events per endpoint {events:?}"
    );
    for dev in vfio_user_lines(run) {
        assert!(dev.contains(" dma_faults=3 "), "{name}: {dev}");
    }
    let unmaps: u64 = totals("dma_unmaps").iter().sum();
    assert!(
        counter(run, "virtio-iommu", "unmap") >= unmaps,
        "{name}: every DMA API unmap of the suite is an UNMAP request"
    );
    assert!(
        counter(run, "virtio-blk", "reads") > CPUS * rounds(),
        "{name}"
    );
    assert_eq!(counter(run, "virtio-blk", "io_errors"), 0, "{name}");
    assert_eq!(
        counter(run, "virtio-blk", "translation_faults"),
        0,
        "{name}"
    );
}

#[test]
fn every_vcpu_maps_and_transfers_at_once() {
    // Two guests of two vCPUs each would share the host's two CPUs: the test command runs
    // the lazy one alone, and `tests/stress.sh` both.
    let strict = vmm_tests::stress().then(|| std::thread::spawn(|| boot(true)));
    let lazy = boot(false);
    check("lazy", &lazy.0, &lazy.1);
    if let Some(strict) = strict {
        let strict = strict.join().unwrap();
        check("strict", &strict.0, &strict.1);
    }
}
