//! Hostile peers: what a device server holding the VMM's shared memory could do to the VMM,
//! and that the VMM survives it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
/// MAP's (the guest checks the order). The vIOMMU's state is not held while the server is
/// waited on: the API's `counters`, which read it, answer while the MAP is still in flight
/// (counted as a request, without a status yet). After the call's deadline the device is
/// failed, the MAP gets an error status, and the vIOMMU answers the next request.
#[test]
fn hostile_a_hanging_server_leaves_the_viommu_configuration_answering() {
    let dev = DeviceProcess::start();
    let proxy = HostileProxy::start(&dev.socket, Misbehaviour::HangOnMap, 0);
    let api_sock = vmm_tests::scratch("hang-api.sock");
    let mut vmm = VmmCommand::test_guest()
        .memory("128M")
        .iommu()
        .counters()
        .api_socket(&api_sock)
        .vfio_user(&format!("socket={},iommu=on", proxy.socket.display()))
        .cmdline("tests=hostile_hang")
        .start();
    let since = Instant::now();
    while !proxy.hung.load(Ordering::Acquire) {
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "the guest's MAP never reached the server:\n{}",
            vmm.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = vmm.api(&api_sock, r#"{"cmd":"counters"}"#);
    let line = answer["counters"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .filter_map(|v| v.as_str())
                .find(|l| l.starts_with("virtio-iommu"))
        })
        .unwrap_or_else(|| panic!("no virtio-iommu counters: {answer}"))
        .to_string();
    let value = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0)
    };
    let requests: u64 = ["attach", "detach", "map", "unmap", "probe"]
        .iter()
        .map(|k| value(k))
        .sum();
    let answered: u64 = line
        .split_whitespace()
        .filter(|w| w.starts_with("status_"))
        .filter_map(|w| w.split_once('=')?.1.parse::<u64>().ok())
        .sum();
    assert!(
        value("map") >= 1 && requests > answered,
        "the counters were read after the MAP was answered, so the state was held while the \
         server was waited on: {line}"
    );
    assert!(value("unlocked_host_calls") >= 1, "{line}");
    let run = vmm.wait(Duration::from_secs(120));
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
