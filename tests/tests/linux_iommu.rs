//! The project's guest kernel with the virtio-iommu and a virtio-blk disk behind it: the
//! guest's own virtio-iommu driver binds, the disk's endpoint is attached to a DMA domain,
//! and the kernel finds its ext2 root on the disk through translated DMA (lazy invalidation:
//! the strict policy's boots are `linux_suite`'s and `linux_net`'s). The same boot without
//! the vIOMMU, for comparison, also shows the kernel reaching init and the VMM ending by
//! itself. The two boots run in parallel.

use std::time::Duration;

use vmm_tests::{counter, guest_kernel, run_vmm, Run};

const BOOT_DEADLINE: Duration = Duration::from_secs(600);

fn boot(iommu: bool) -> Run {
    let g = guest_kernel();
    let disk = g.rootfs_copy();
    let cmdline = "console=ttyS0 reboot=k panic=1 root=/dev/vda";
    let disk_arg = format!(
        "path={}{}",
        disk.display(),
        if iommu { ",iommu=on" } else { "" }
    );
    let mut args = vec![
        "--kernel",
        g.vmlinux.to_str().unwrap(),
        "--memory",
        "256M",
        "--counters",
        "--cmdline",
        cmdline,
        "--disk",
        &disk_arg,
    ];
    if iommu {
        args.push("--iommu");
    }
    let run = run_vmm(&args, BOOT_DEADLINE);
    let _ = std::fs::remove_file(disk);
    run
}

#[test]
fn linux_uses_the_virtio_iommu_for_its_disk() {
    let lazy = std::thread::spawn(|| boot(true));
    let plain = boot(false);
    let lazy = lazy.join().unwrap();

    let (name, run) = ("lazy", &lazy);
    eprintln!(
        "{name}: boot took {:.1} s\n{}",
        run.wall.as_secs_f64(),
        run.stderr
    );
    assert_eq!(run.code(), 0, "{name}:\n{}", run.console);
    run.assert_console("virtio_iommu virtio0: input address: 48 bits");
    run.assert_console("virtio-pci 0000:00:02.0: Adding to iommu group");
    run.assert_console("virtio_blk virtio1: [vda]");
    run.assert_console("VFS: Mounted root (ext2 filesystem)");
    assert_eq!(counter(run, "virtio-iommu", "attach"), 1, "{name}");
    assert!(counter(run, "virtio-iommu", "map") > 0, "{name}");
    assert!(counter(run, "virtio-iommu", "unmap") > 0, "{name}");
    assert!(
        counter(run, "virtio-iommu", "translated_bytes") > 0,
        "{name}"
    );
    assert!(counter(run, "virtio-blk", "reads") > 0, "{name}");
    assert_eq!(counter(run, "virtio-blk", "io_errors"), 0, "{name}");
    assert_eq!(counter(run, "virtio-iommu", "faults"), 0, "{name}");
    assert!(run.stderr.contains("behind the vIOMMU"));
    lazy.assert_console("DMA domain TLB invalidation policy: lazy mode");

    eprintln!(
        "without vIOMMU: boot took {:.1} s\n{}",
        plain.wall.as_secs_f64(),
        plain.stderr
    );
    plain.assert_console("Linux version 6.12");
    plain.assert_console("Command line: console=ttyS0 reboot=k panic=1 root=/dev/vda");
    plain.assert_console("VFS: Mounted root (ext2 filesystem)");
    plain.assert_console(" as init process");
    // On a PVM host user space cannot run, so init dies and `panic=1 reboot=k` resets the
    // guest; elsewhere init powers off. Either way the VMM ends by itself with status 0.
    assert_eq!(plain.code(), 0, "{}", plain.console);
    assert!(
        plain.stderr.contains("guest ended (reset)")
            || plain.stderr.contains("guest ended (power off)"),
        "{}",
        plain.stderr
    );
    assert!(
        plain.stderr.contains("emulation fallbacks:"),
        "{}",
        plain.stderr
    );
    assert!(!plain.console.contains("virtio_iommu"));
    assert!(!plain.stderr.contains("counters: virtio-iommu"));
    // The guest read the same data either way.
    assert_eq!(
        counter(&plain, "virtio-blk", "reads"),
        counter(&lazy, "virtio-blk", "reads")
    );
}
