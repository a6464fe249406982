//! `--vfio-user ...,dma=messages`: the device process gets no guest-RAM descriptor and reaches
//! guest memory only through DMA_READ/DMA_WRITE messages the VMM checks against the endpoint's
//! mappings. The bare-metal guest suite passes through it; the device process never holds
//! guest RAM (its `/proc/PID/fd` and `/proc/PID/maps`, watched while the guest runs, against
//! the same watch under `dma=shared`, where it does); and a device that writes where the guest
//! mapped read-only changes nothing (against `dma=shared`, where it does).

use std::time::{Duration, Instant};

use vmm_tests::{counter, tap, test_guest_args, DeviceProcess, Run, VmmProcess};

const DEADLINE: Duration = Duration::from_secs(300);

/// The name the VMM gives its guest-RAM memfd (`vmm/src/memory.rs`).
const RAM: &str = "memfd:guest-ram";

/// Whether process `pid` holds guest RAM: an open descriptor or a mapping of it.
fn holds_guest_ram(pid: u32) -> bool {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|l| l.to_string_lossy().contains(RAM));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains(RAM));
    fds || maps
}

/// Runs the bare-metal guest (cases `tests`, all when `None`) behind the vIOMMU with the
/// device at `vfio`, watching the device process while it runs. Returns the run and whether
/// the device process was ever seen holding guest RAM.
fn run_watching(dev: &mut DeviceProcess, vfio: &str, tests: Option<&str>) -> (Run, bool) {
    let args = test_guest_args(vfio, true, tests);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vmm = VmmProcess::start(&args);
    let pid = dev.child.id();
    let start = Instant::now();
    let mut seen = false;
    // The device process serves one VMM and exits when it goes.
    while dev.child.try_wait().ok().flatten().is_none() && start.elapsed() < DEADLINE {
        seen |= holds_guest_ram(pid);
        std::thread::sleep(Duration::from_millis(2));
    }
    (vmm.wait(DEADLINE), seen)
}

#[test]
fn dma_by_messages_passes_the_suite_without_guest_ram_in_the_device() {
    // The watch sees guest RAM where the device has it.
    let mut shared = DeviceProcess::start();
    let arg = shared.arg(true);
    let (run, seen) = run_watching(&mut shared, &arg, Some("copy,fill"));
    assert_eq!(run.code(), 0, "{}\n{}", run.console, run.stderr);
    assert!(
        seen,
        "under dma=shared the device maps guest RAM: the watch must see it"
    );

    let mut dev = DeviceProcess::start();
    let arg = format!("{},dma=messages", dev.arg(true));
    let (run, seen) = run_watching(&mut dev, &arg, None);
    eprintln!("{}\n{}", run.console, run.stderr);
    let (ok, bad, failing) = tap(&run.console);
    assert_eq!(bad, 0, "{failing:?}");
    assert_eq!(ok, 10);
    assert_eq!(run.code(), 0, "the guest's verdict is the exit status");
    assert!(
        !seen,
        "the device process held guest RAM under dma=messages"
    );
    let c = |k| counter(&run, "vfio-user", k);
    assert!(c("dma_messages_read") > 0 && c("dma_messages_written") > 0);
    // The fault cases (ro_fault, unmapped_fault, unmap_pending, detach_reattach): this
    // device keeps to its mappings, so it refuses them itself and the VMM refuses nothing;
    // each is one fault event. (A device that does not keep to them: the next test.)
    assert_eq!(c("dma_messages_refused"), 0);
    assert!(c("dma_faults") >= 4, "{}", run.stderr);
    assert_eq!(counter(&run, "virtio-iommu", "faults"), c("dma_faults"));
}

#[test]
fn a_device_writing_where_the_guest_mapped_read_only_changes_nothing() {
    // Under dma=shared such a device writes guest memory at will: the case fails.
    let mut dev = DeviceProcess::start_with(&["--ignore-permissions"]);
    let arg = dev.arg(true);
    let (run, _) = run_watching(&mut dev, &arg, Some("ro_fault"));
    assert!(
        run.console.contains("read-only memory was written"),
        "the hostile device must break dma=shared:\n{}",
        run.console
    );
    assert_ne!(run.code(), 0);

    // Under dma=messages the VMM refuses the write: memory unchanged, a fault event.
    let mut dev = DeviceProcess::start_with(&["--ignore-permissions"]);
    let arg = format!("{},dma=messages", dev.arg(true));
    let (run, _) = run_watching(&mut dev, &arg, Some("ro_fault"));
    eprintln!("{}\n{}", run.console, run.stderr);
    let (ok, bad, failing) = tap(&run.console);
    assert_eq!((ok, bad), (1, 0), "{failing:?}");
    assert_eq!(run.code(), 0);
    assert_eq!(counter(&run, "vfio-user", "dma_messages_refused"), 1);
    assert_eq!(counter(&run, "virtio-iommu", "faults"), 1);
}

/// The figure: the guest's copy throughput (4 KiB and 1 MiB, the bare-metal `throughput`
/// case) with the device reaching memory by message against by shared memory, both behind
/// the vIOMMU, measured in one run each. Prints the ratio; asserts only the verdicts.
#[test]
fn throughput_by_messages_against_shared_memory() {
    let mbps = |run: &Run, size: &str| -> u64 {
        run.console
            .lines()
            .find(|l| l.starts_with(&format!("# throughput: {size} bytes")))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|v| v.split(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut runs = Vec::new();
    for mode in ["", ",dma=messages"] {
        let mut dev = DeviceProcess::start();
        let arg = format!("{}{mode}", dev.arg(true));
        let (run, _) = run_watching(&mut dev, &arg, Some("throughput"));
        let (ok, bad, failing) = tap(&run.console);
        assert_eq!((ok, bad), (1, 0), "{failing:?}\n{}", run.console);
        assert_eq!(run.code(), 0);
        runs.push(run);
    }
    assert!(counter(&runs[1], "vfio-user", "dma_messages_read") > 0);
    for size in ["4096", "1048576"] {
        let (shared, messages) = (mbps(&runs[0], size), mbps(&runs[1], size));
        eprintln!(
            "figure: copy throughput {size} B behind the vIOMMU: dma=messages {messages} MB/s, \
             dma=shared {shared} MB/s, ratio {:.2}",
            messages as f64 / shared.max(1) as f64
        );
    }
}
