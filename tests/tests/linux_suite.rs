//! The main job end to end: the project's Linux guest with the DMA suite built in
//! (`images/kernel/drivers/vmm_dmatest.c`), the DMA test device served by its own process
//! over vfio-user, behind our virtio-iommu (lazy and strict invalidation) and not behind it.
//!
//! Verdicts come from the suite: every KTAP plan complete with no failure and the guest's
//! verdict through the test-exit port. The device's dirty log, harvested through the vIOMMU
//! (or directly), must hold exactly the set of pages the suite made the device write
//! (`--dirty-log-out` against the suite's `# written ranges:`): a device that reports nothing
//! misses pages, and one that cannot report (every writable mapping counted) has extra ones
//! (the suite's `dirty_sparse` case writes 3 of 16 mapped pages).
//!
//! The three boots run in parallel. Behind the vIOMMU each map/unmap cycle costs about 4 ms
//! of emulated guest code on PVM hosts: in the test command the lazy run does 3,000 cycles
//! and 300 latency samples, the strict one 2,000; `tests/stress.sh` (`VMM_STRESS=1`) runs
//! the suite's full 100,000 cycles and 10,000 samples (about 7 minutes), strict 20,000.

use std::time::Duration;

use vmm_tests::{
    assert_same_pages, check_suites_skipping, console_text, console_value, counter,
    dirty_log_pages, guest_kernel, guest_written_pages, ktap_summary, run_vmm, scale, scratch,
    DeviceProcess, Run,
};

const DEADLINE: Duration = Duration::from_secs(1800);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Lazy,
    Strict,
    NoIommu,
}

struct SuiteRun {
    run: Run,
    dirty_log: std::path::PathBuf,
}

fn suite(mode: Mode, cycles: u32, samples: u32) -> SuiteRun {
    suite_with(mode, cycles, samples, "")
}

/// [`suite`] with `extra` on the guest's command line.
fn suite_with(mode: Mode, cycles: u32, samples: u32, extra: &str) -> SuiteRun {
    let g = guest_kernel();
    let dev = DeviceProcess::start();
    let behind = mode != Mode::NoIommu;
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 vmm_dmatest.required=1 vmm_dmatest.cycles={cycles} \
         vmm_dmatest.samples={samples}{} {extra}",
        if mode == Mode::Strict {
            " iommu.strict=1"
        } else {
            ""
        }
    );
    let vfio_user = dev.arg(behind);
    let dirty_log = scratch("dirty.log");
    let dirty = dirty_log.display().to_string();
    let mut args = vec![
        "--kernel",
        g.vmlinux.to_str().unwrap(),
        "--initramfs",
        g.initramfs.to_str().unwrap(),
        "--memory",
        "256M",
        "--counters",
        "--track-dirty",
        "--dirty-log-out",
        &dirty,
        "--cmdline",
        &cmdline,
        "--vfio-user",
        &vfio_user,
    ];
    if behind {
        args.push("--iommu");
    }
    SuiteRun {
        run: run_vmm(&args, DEADLINE),
        dirty_log,
    }
}

fn check(mode: Mode, s: &SuiteRun) {
    let run = &s.run;
    let name = format!("{mode:?}");
    let console = console_text(run);
    eprintln!(
        "{name}: {} s wall\n{}\n{}",
        run.wall.as_secs(),
        console
            .lines()
            .filter(|l| l.starts_with("# ") && !l.starts_with("# written ranges"))
            .collect::<Vec<_>>()
            .join("\n"),
        run.stderr
            .lines()
            .filter(|l| l.starts_with("counters:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Without the vIOMMU the fault cases cannot fault: exactly they are skipped.
    let skipped: &[&str] = if mode == Mode::NoIommu {
        &[
            "fault_read_only",
            "fault_unmapped",
            "fault_already_unmapped",
        ]
    } else {
        &[]
    };
    check_suites_skipping(&name, run, &["vmm_dmatest"], skipped);
    let planned: usize = console
        .lines()
        .find_map(|l| l.strip_prefix("1.."))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(planned >= 25, "{name}: {planned} cases planned");

    // The device did what the suite asked, and nothing else.
    assert_eq!(
        console_value(run, "# device:", "completed"),
        console_value(run, "# traffic:", "transfers"),
        "{name}"
    );
    assert_eq!(
        console_value(run, "# device:", "bytes"),
        console_value(run, "# traffic:", "bytes"),
        "{name}"
    );
    // The dirty log holds exactly the pages the suite made the device write, and the device
    // was tracked (its own reports, not every writable page).
    let written = guest_written_pages(run);
    assert_eq!(
        written.len() as u64,
        console_value(run, "# written:", "pages"),
        "{name}: the suite's ranges and its count agree"
    );
    assert!(written.len() > 100, "{name}: the suite wrote pages");
    assert_same_pages(
        &format!("{name}: dirty log against the pages the suite had the device write"),
        &written,
        &dirty_log_pages(&s.dirty_log),
    );
    let _ = std::fs::remove_file(&s.dirty_log);
    assert_eq!(counter(run, "dirty log", "untracked"), 0, "{name}");

    if mode == Mode::NoIommu {
        assert!(!run.stderr.contains("counters: virtio-iommu"));
        return;
    }
    assert!(
        counter(run, "virtio-iommu", "dirty_reads") > 0,
        "{name}: the device's dirty log was read"
    );
    // Every DMA API unmap became one UNMAP request; every map at least one MAP (a scattered
    // list maps page by page), each followed by host calls.
    let maps = counter(run, "virtio-iommu", "map");
    let unmaps = counter(run, "virtio-iommu", "unmap");
    assert_eq!(
        unmaps,
        console_value(run, "# traffic:", "dma_unmaps"),
        "{name}"
    );
    assert!(
        maps >= console_value(run, "# traffic:", "dma_maps"),
        "{name}"
    );
    assert!(counter(run, "virtio-iommu", "host_maps") <= maps, "{name}");
    assert_eq!(counter(run, "virtio-iommu", "status_OK"), maps + unmaps + 2);
    // Three faults: read-only, never mapped, already unmapped; each an event in the guest.
    assert_eq!(counter(run, "virtio-iommu", "faults"), 3, "{name}");
    assert_eq!(counter(run, "vfio-user device", "dma_faults"), 3, "{name}");
    let events = console
        .lines()
        .filter(|l| l.contains("virtio_iommu virtio0: page fault from EP 16"))
        .count();
    assert_eq!(events, 3, "{name}: fault events in the guest log");
    assert!(console.contains("page fault from EP 16 at 0x10000 [W]"));
    let mode_line = match mode {
        Mode::Lazy => "behind an IOMMU, lazy invalidation",
        _ => "behind an IOMMU, strict invalidation",
    };
    assert!(console.contains(mode_line), "{name}");
}

#[test]
fn dma_suite_passes_behind_the_viommu_and_without_it() {
    let samples = scale(300, 10_000);
    let lazy = std::thread::spawn(move || suite(Mode::Lazy, scale(3_000, 100_000), samples));
    let strict = std::thread::spawn(move || suite(Mode::Strict, scale(2_000, 20_000), samples));
    let plain = suite(Mode::NoIommu, scale(3_000, 100_000), samples);
    let strict = strict.join().unwrap();
    let lazy = lazy.join().unwrap();
    check(Mode::NoIommu, &plain);
    check(Mode::Strict, &strict);
    check(Mode::Lazy, &lazy);
}

/// A guest whose case fails through its own check (the suite's hidden `break_copy`: the
/// source's last byte changes after each copy) fails everywhere the verdict is taken: the
/// suite reports the case `not ok`, the guest's verdict through the test-exit port is not 0,
/// the test helpers' check fails, and so does the scripts' (`ktap_summary`, with which
/// `run-suite.sh` ends).
#[test]
fn a_case_that_fails_fails_the_run() {
    let s = suite_with(
        Mode::Lazy,
        10,
        10,
        "vmm_dmatest.cases=copy vmm_dmatest.break_copy=1",
    );
    let run = &s.run;
    let console = console_text(run);
    let failing: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("not ok ") && l.contains("copy"))
        .collect();
    assert!(
        !failing.is_empty() && failing.iter().all(|l| l.contains("copied bytes differ")),
        "the copy cases fail through their check: {failing:?}\n{console}"
    );
    assert!(
        run.stderr.contains("guest ended (test exit code")
            && !run.stderr.contains("guest ended (test exit code 0)"),
        "the guest's verdict is a failure:\n{}",
        run.stderr
    );
    let helper = std::panic::catch_unwind(|| {
        check_suites_skipping("broken", run, &["vmm_dmatest"], &[]);
    });
    assert!(helper.is_err(), "the test helpers pass a failing guest");
    let (ok, out) = ktap_summary(&console, &run.stderr, &["--suites", "vmm_dmatest", "1"]);
    assert!(!ok, "the scripts pass a failing guest:\n{out}");
    assert!(out.contains("failed"), "{out}");
}
