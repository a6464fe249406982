//! Hostile peers: what a device server holding the VMM's shared memory could do to the VMM,
//! and that the VMM survives it.

use std::time::Duration;

use vmm_tests::{run_test_guest, tap, DeviceProcess};

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
