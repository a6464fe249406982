//! Hostile peers: what a device server holding the VMM's shared memory could do to the VMM,
//! and that the VMM survives it.

use std::time::Duration;

use vmm_tests::{run_test_guest, tap, DeviceProcess, HostileProxy, Misbehaviour, VmmCommand};

/// A device server that truncates the guest-RAM file it was given (the VMM maps that file:
/// a truncated one kills the VMM with SIGBUS at its next access). The file's size is sealed:
/// the truncation is refused, and the guest suite passes.
#[test]
fn hostile_a_device_server_truncating_guest_ram_changes_nothing() {
    // Its own seccomp filter would stop it first: this device does not filter itself.
    let dev = DeviceProcess::start_with(&["--truncate-ram", "--seccomp", "off"]);
    let run = run_test_guest(
        &dev.arg(true),
        true,
        Some("copy,fill,compare"),
        Duration::from_secs(120),
    );
    let (ok, bad, failing) = tap(&run.console);
    assert_eq!(
        (ok, bad),
        (3, 0),
        "{failing:?}\n{}\n{}",
        run.console,
        run.stderr
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
}

/// A device server that never answers the guest's first MAP (a proxy in front of a real
/// device process hangs on the `DMA_MAP`). While the MAP waits on it, the virtio-iommu is
/// served on its own thread: a vCPU reading its configuration gets the answer before the
/// MAP's (the guest checks the order). After the call's deadline the device is failed, the
/// MAP gets an error status, and the vIOMMU answers the next request.
#[test]
fn hostile_a_hanging_server_leaves_the_viommu_configuration_answering() {
    let dev = DeviceProcess::start();
    let proxy = HostileProxy::start(&dev.socket, Misbehaviour::HangOnMap, 0);
    let run = VmmCommand::test_guest()
        .memory("128M")
        .iommu()
        .counters()
        .vfio_user(&format!("socket={},iommu=on", proxy.socket.display()))
        .cmdline("tests=hostile_hang")
        .run(Duration::from_secs(120));
    let (ok, bad, failing) = tap(&run.console);
    assert_eq!(
        (ok, bad),
        (1, 0),
        "{failing:?}\n{}\n{}",
        run.console,
        run.stderr
    );
    assert!(
        run.stderr.contains("guest ended (test exit code 0)"),
        "the guest's verdict:\n{}",
        run.stderr
    );
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("counters: vfio-user"))
        .unwrap_or_else(|| panic!("no device counters:\n{}", run.stderr));
    assert!(
        line.contains("failed=1"),
        "the hanging device is failed: {line}"
    );
}
