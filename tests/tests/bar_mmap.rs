//! BAR areas a vfio-user device lets map (the sparse-mmap region capability, with the file
//! sent alongside the region info) are mapped straight into the guest, and the ioeventfds it
//! offers (`DEVICE_GET_REGION_IO_FDS`) are registered with KVM: reading those areas, or
//! writing those registers, costs no message to the device process. The test device's BAR 2
//! is such an area and its doorbell such a register; the bare-metal guest's `bar_latency`
//! case reads BAR 2 and BAR 0's ID register, rings the doorbell, and reports how many of
//! those accesses reached the device as messages (the device counts them).

use std::time::Duration;

use vmm_tests::{run_test_guest, tap, DeviceProcess, Run};

fn run(mmap: bool) -> Run {
    let dev = DeviceProcess::start();
    let vfio = format!("{}{}", dev.arg(true), if mmap { "" } else { ",mmap=off" });
    let run = run_test_guest(&vfio, true, Some("bar_latency"), Duration::from_secs(120));
    let (ok, bad, failing) = tap(&run.console);
    assert_eq!(
        (ok, bad),
        (1, 0),
        "{failing:?}\n{}\n{}",
        run.console,
        run.stderr
    );
    assert_eq!(run.code(), 0);
    run
}

/// `(BAR 0 cycles, BAR 2 cycles, BAR 2 accesses by message, doorbells by message)` from the
/// guest's line.
fn figures(run: &Run) -> (u64, u64, u64, u64) {
    let line = run
        .console
        .lines()
        .find(|l| l.starts_with("# bar_latency:"))
        .unwrap_or_else(|| panic!("no bar_latency line:\n{}", run.console));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // "BAR 0 register N cycles, BAR 2 M cycles (medians of 64); BAR 2 accesses by message: K;
    // doorbells by message: D"
    (nums[1], nums[3], nums[6], nums[7])
}

#[test]
fn a_sparse_mmap_bar_is_read_without_messages() {
    let direct = run(true);
    assert!(
        direct
            .stderr
            .contains("BAR 2 area 0x0+0x1000 mapped into the guest"),
        "{}",
        direct.stderr
    );
    assert!(
        direct
            .stderr
            .contains("BAR 0 offset 0x28: the device's ioeventfd at"),
        "{}",
        direct.stderr
    );
    let (b0, b2, messages, rings) = figures(&direct);
    assert_eq!(messages, 0, "BAR 2 reads went to the device process");
    assert_eq!(rings, 0, "the doorbell went to the device as a message");
    // The same accesses with mmap=off all reach the device as messages.
    let socket = run(false);
    let (s0, s2, by_socket, rings) = figures(&socket);
    assert!(by_socket >= 65, "{}", socket.console);
    assert_eq!(rings, 1, "{}", socket.console);
    eprintln!(
        "figure: BAR read latency in the bare-metal guest (median cycles): BAR 2 mapped {b2}, \
         BAR 2 by message {s2} ({:.1}x); BAR 0 register by message {b0} and {s0}",
        s2 as f64 / b2.max(1) as f64
    );
}
