//! Boots the project's guest kernel (images/build-kernel.sh) to its init process.

use std::time::Duration;

use vmm_tests::{guest_kernel, run_vmm};

/// A boot takes well under a minute on a PVM host; the deadline only stops a hung guest.
const BOOT_DEADLINE: Duration = Duration::from_secs(600);

#[test]
fn linux_boots_to_init_and_the_vmm_exits_by_itself() {
    let g = guest_kernel();
    let (vmlinux, initramfs) = (&g.vmlinux, &g.initramfs);
    let run = run_vmm(
        &[
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--memory",
            "256M",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1",
        ],
        BOOT_DEADLINE,
    );
    eprintln!("boot took {:.1} s\n{}", run.wall.as_secs_f64(), run.stderr);
    run.assert_console("Linux version 6.12");
    run.assert_console("Command line: console=ttyS0 reboot=k panic=1");
    run.assert_console("Run /init as init process");
    // On a PVM host user space cannot run, so init dies and `panic=1 reboot=k` resets the
    // guest; elsewhere init powers off. Either way the VMM ends by itself with status 0.
    assert_eq!(
        run.code(),
        0,
        "console:\n{}\nstderr:\n{}",
        run.console,
        run.stderr
    );
    assert!(
        run.stderr.contains("guest ended (reset)")
            || run.stderr.contains("guest ended (power off)"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("emulation fallbacks:"),
        "{}",
        run.stderr
    );
}
