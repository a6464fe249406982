//! Bad input gets one clear line and a non-zero exit, never a panic.

use std::time::Duration;

use vmm_tests::{run_vmm, run_vmm_env, scratch, Run};

const DEADLINE: Duration = Duration::from_secs(60);

/// A minimal ELF64 with one 4 KiB PT_LOAD segment at 16 MiB.
fn tiny_elf() -> Vec<u8> {
    let mut f = vec![0u8; 0x2000];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    f[ph + 16..ph + 24].copy_from_slice(&0x100_0000u64.to_le_bytes()); // vaddr
    f[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // paddr
    f[ph + 32..ph + 40].copy_from_slice(&0x1000u64.to_le_bytes()); // filesz
    f[ph + 40..ph + 48].copy_from_slice(&0x1000u64.to_le_bytes()); // memsz
    f[0x1000] = 0xf4; // hlt
    f
}

fn assert_one_error_line(run: &Run, words: &[&str]) {
    assert_ne!(run.code(), 0, "expected failure: {run:?}");
    assert!(!run.stderr.contains("panicked"), "panic: {}", run.stderr);
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one error line, got:\n{}",
        run.stderr
    );
    for w in words {
        assert!(errors[0].contains(w), "{:?} lacks {w:?}", errors[0]);
    }
}

#[test]
fn missing_kernel() {
    let run = run_vmm(&["--kernel", "/nonexistent/vmlinux"], DEADLINE);
    assert_one_error_line(&run, &["/nonexistent/vmlinux", "No such file"]);
}

#[test]
fn unreadable_kernel() {
    let run = run_vmm(&["--kernel", "/"], DEADLINE);
    assert_one_error_line(&run, &["cannot read kernel /", "directory"]);
}

#[test]
fn kernel_neither_elf_nor_bzimage() {
    let path = scratch("not-a-kernel");
    std::fs::write(&path, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    let run = run_vmm(&["--kernel", path.to_str().unwrap()], DEADLINE);
    std::fs::remove_file(&path).unwrap();
    assert_one_error_line(&run, &["neither an ELF", "bzImage"]);
}

#[test]
fn memory_too_small_for_the_kernel() {
    let path = scratch("tiny.elf");
    std::fs::write(&path, tiny_elf()).unwrap();
    let run = run_vmm(
        &["--kernel", path.to_str().unwrap(), "--memory", "8M"],
        DEADLINE,
    );
    std::fs::remove_file(&path).unwrap();
    assert_one_error_line(&run, &["does not fit in 8 MiB"]);
}

#[test]
fn memory_larger_than_the_host() {
    let path = scratch("tiny.elf");
    std::fs::write(&path, tiny_elf()).unwrap();
    let run = run_vmm(
        &["--kernel", path.to_str().unwrap(), "--memory", "64000G"],
        DEADLINE,
    );
    std::fs::remove_file(&path).unwrap();
    assert_one_error_line(&run, &["--memory", "more than the host"]);
}

#[test]
fn unknown_flag() {
    let run = run_vmm(&["--kernel", "/x", "--frobnicate"], DEADLINE);
    assert_eq!(run.code(), 2);
    assert!(!run.stderr.contains("panicked"));
    assert!(run.stderr.contains("'--frobnicate'"), "{}", run.stderr);
}

#[test]
fn bad_flag_value_names_the_flag() {
    let run = run_vmm(&["--kernel", "/x", "--memory", "lots"], DEADLINE);
    assert_eq!(run.code(), 2);
    assert!(run.stderr.contains("--memory"), "{}", run.stderr);
    let run = run_vmm(&["--kernel", "/x", "--host-quirks", "maybe"], DEADLINE);
    assert_eq!(run.code(), 2);
    assert!(run.stderr.contains("--host-quirks"), "{}", run.stderr);
    for bad in [
        "aw-bits=70",
        "domains=0",
        "boot-bypass=perhaps",
        "granule=4k",
    ] {
        let run = run_vmm(&["--kernel", "/x", "--iommu", bad], DEADLINE);
        assert_eq!(run.code(), 2, "{bad}");
        assert!(run.stderr.contains("--iommu"), "{bad}: {}", run.stderr);
        let key = bad.split('=').next().unwrap();
        assert!(run.stderr.contains(key), "{bad}: {}", run.stderr);
    }
    for bad in ["iommu=29", "direct=x", "slots=2"] {
        let run = run_vmm(&["--kernel", "/x", "--hotplug", bad], DEADLINE);
        assert_eq!(run.code(), 2, "{bad}");
        assert!(run.stderr.contains("--hotplug"), "{bad}: {}", run.stderr);
        let key = bad.split('=').next().unwrap();
        assert!(run.stderr.contains(key), "{bad}: {}", run.stderr);
    }
}

/// Hot-plug slots that cannot be: behind a vIOMMU that is not there, a device pinned to a
/// slot that is not a hot-plug slot, or one of the other kind.
#[test]
fn hotplug_slots_are_checked() {
    let elf = scratch("tiny.elf");
    std::fs::write(&elf, tiny_elf()).unwrap();
    let kernel = elf.to_str().unwrap();
    let run = run_vmm(&["--kernel", kernel, "--hotplug", "iommu=1"], DEADLINE);
    assert_one_error_line(&run, &["--hotplug", "iommu=N needs --iommu"]);
    let dev = vmm_tests::DeviceProcess::start();
    let arg = |extra: &str| format!("{},{extra}", dev.arg(true));
    let run = run_vmm(
        &[
            "--kernel",
            kernel,
            "--iommu",
            "--hotplug",
            "iommu=1",
            "--vfio-user",
            &arg("slot=5"),
        ],
        DEADLINE,
    );
    assert_one_error_line(&run, &["slot=5: not a --hotplug slot (they are: 31)"]);
    let run = run_vmm(
        &[
            "--kernel",
            kernel,
            "--iommu",
            "--hotplug",
            "direct=1",
            "--vfio-user",
            &arg("slot=31"),
        ],
        DEADLINE,
    );
    assert_one_error_line(&run, &["slot=31 is a hot-plug slot outside the vIOMMU"]);
}

#[test]
fn no_kvm_device() {
    let path = scratch("tiny.elf");
    std::fs::write(&path, tiny_elf()).unwrap();
    let run = run_vmm_env(
        &["--kernel", path.to_str().unwrap()],
        &[("VMM_KVM_DEVICE", "/nonexistent/kvm")],
        DEADLINE,
    );
    std::fs::remove_file(&path).unwrap();
    assert_one_error_line(&run, &["cannot open /nonexistent/kvm", "KVM"]);
}

#[test]
fn vfio_user_socket_missing() {
    let path = scratch("tiny.elf");
    std::fs::write(&path, tiny_elf()).unwrap();
    let run = run_vmm(
        &[
            "--kernel",
            path.to_str().unwrap(),
            "--vfio-user",
            "socket=/nonexistent/dev.sock",
        ],
        DEADLINE,
    );
    std::fs::remove_file(&path).unwrap();
    assert_one_error_line(
        &run,
        &["vfio-user device /nonexistent/dev.sock", "No such file"],
    );
}

#[test]
fn vfio_user_server_sending_garbage() {
    use std::io::{Read, Write};
    let sock = scratch("garbage.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.read(&mut [0u8; 256]);
        // A reply header claiming a 2-byte message.
        let _ = s.write_all(&[0, 0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        std::thread::sleep(Duration::from_millis(200));
    });
    let path = scratch("tiny.elf");
    std::fs::write(&path, tiny_elf()).unwrap();
    let arg = format!("socket={}", sock.display());
    let run = run_vmm(
        &["--kernel", path.to_str().unwrap(), "--vfio-user", &arg],
        DEADLINE,
    );
    server.join().unwrap();
    std::fs::remove_file(&path).unwrap();
    let _ = std::fs::remove_file(&sock);
    assert_one_error_line(&run, &["malformed reply to VERSION", "message size 2"]);
}

#[test]
fn host_vfio_device_that_cannot_be_used_is_named() {
    let has_vfio = std::path::Path::new("/dev/vfio/vfio").exists();
    let path = scratch("tiny.elf");
    std::fs::write(&path, tiny_elf()).unwrap();
    let run = run_vmm(
        &[
            "--kernel",
            path.to_str().unwrap(),
            "--vfio",
            "path=/sys/bus/pci/devices/0000:00:00.0",
        ],
        DEADLINE,
    );
    std::fs::remove_file(&path).unwrap();
    if has_vfio {
        // The host bridge is never bound to vfio-pci: the error names the device.
        assert_one_error_line(&run, &["0000:00:00.0"]);
    } else {
        assert_one_error_line(
            &run,
            &["host VFIO unavailable", "/dev/vfio/vfio does not exist"],
        );
    }
}

#[test]
fn passthrough_flags_are_checked() {
    let run = run_vmm(&["--kernel", "/x", "--vfio-user", "iommu=on"], DEADLINE);
    assert_eq!(run.code(), 2);
    assert!(
        run.stderr.contains("--vfio-user") && run.stderr.contains("socket=PATH"),
        "{}",
        run.stderr
    );
    let run = run_vmm(
        &["--kernel", "/x", "--vfio", "path=/sys/x,backend=magic"],
        DEADLINE,
    );
    assert_eq!(run.code(), 2);
    assert!(run.stderr.contains("type1 or iommufd"), "{}", run.stderr);
}

#[test]
fn vhost_user_net_bad_back_ends() {
    let elf = scratch("tiny.elf");
    std::fs::write(&elf, tiny_elf()).unwrap();
    let kernel = elf.to_str().unwrap();
    // No socket.
    let run = run_vmm(
        &[
            "--kernel",
            kernel,
            "--vhost-user-net",
            "socket=/nonexistent/vu.sock",
        ],
        DEADLINE,
    );
    assert_one_error_line(
        &run,
        &["vhost-user-net /nonexistent/vu.sock", "No such file"],
    );
    // Garbage instead of a vhost-user reply.
    let sock = scratch("garbage.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = listener.accept() {
            let mut b = [0u8; 12];
            let _ = s.read_exact(&mut b);
            let _ = s.write_all(b"this is not vhost-user, not at all");
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    });
    let arg = format!("socket={}", sock.display());
    let run = run_vmm(&["--kernel", kernel, "--vhost-user-net", &arg], DEADLINE);
    assert_one_error_line(
        &run,
        &[
            &format!("vhost-user-net {}", sock.display()),
            "GET_FEATURES",
        ],
    );
    let _ = server.join();
    // Behind the vIOMMU without --iommu.
    let arg = format!("socket={},iommu=on", sock.display());
    let run = run_vmm(&["--kernel", kernel, "--vhost-user-net", &arg], DEADLINE);
    assert_one_error_line(&run, &["vhost-user-net", "iommu=on needs --iommu"]);
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&elf);
}
