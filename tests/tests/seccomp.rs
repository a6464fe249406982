//! Seccomp filters are on in every VMM thread (`--seccomp on`, the default): a system call
//! outside a thread's list stops the VMM with a message naming the thread and the call;
//! `--seccomp log` lets it through (the kernel logs it). The test API command
//! `test-forbidden-syscall` (only with `VMM_TEST_SECCOMP` set) makes the API thread call
//! `sysinfo`, which no list allows.

use std::time::Duration;

use vmm_tests::{api, bin, scratch, DeviceProcess, VmmProcess};

const DEADLINE: Duration = Duration::from_secs(120);

fn start(seccomp: &str) -> (DeviceProcess, VmmProcess, std::path::PathBuf) {
    let dev = DeviceProcess::start();
    let sock = scratch("api.sock");
    let g = bin("test-guest").display().to_string();
    let (vfio, api_arg) = (dev.arg(true), sock.display().to_string());
    let mut vmm = VmmProcess::start_env(
        &[
            "--kernel",
            &g,
            "--memory",
            "128M",
            "--iommu",
            "--vfio-user",
            &vfio,
            "--cmdline",
            "tests=migrate_dma until_migrated=1 iters=1",
            "--api-socket",
            &api_arg,
            "--seccomp",
            seccomp,
        ],
        &[("VMM_TEST_SECCOMP", "1")],
    );
    vmm.wait_console("# migrate-ready", DEADLINE);
    (dev, vmm, sock)
}

#[test]
fn a_forbidden_system_call_stops_the_vmm_and_is_named() {
    let (_dev, mut vmm, sock) = start("on");
    // The guest runs with every thread filtered: vCPU, event loop, API, device process.
    assert_eq!(vmm.api(&sock, r#"{"cmd":"status"}"#)["state"], "running");
    let _ = std::panic::catch_unwind(|| api(&sock, r#"{"cmd":"test-forbidden-syscall"}"#));
    let run = vmm.wait(DEADLINE);
    assert_eq!(run.code(), 159, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("seccomp: the api thread made a forbidden system call: sysinfo (99)"),
        "{}",
        run.stderr
    );
}

#[test]
fn log_mode_lets_it_through() {
    let (_dev, mut vmm, sock) = start("log");
    let r = vmm.api(&sock, r#"{"cmd":"test-forbidden-syscall"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(vmm.api(&sock, r#"{"cmd":"status"}"#)["state"], "running");
    assert_eq!(vmm.api(&sock, r#"{"cmd":"quit"}"#)["ok"], true);
    assert_eq!(vmm.wait(DEADLINE).code(), 0);
}

/// Every thread of a running VMM is under a seccomp filter: `Seccomp: 2` (filter mode) in
/// each `/proc/PID/task/TID/status`, the main thread's included. Returns the threads' names.
fn filtered_threads(pid: u32) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A thread that ended meanwhile (an API connection's) has no status any more.
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let name = field("Name:");
        assert_eq!(field("Seccomp:"), "2", "thread {name} is not filtered");
        names.insert(name.trim_end_matches(char::is_numeric).to_string());
    }
    names
}

#[test]
fn every_thread_runs_filtered() {
    let (_dev, mut vmm, sock) = start("on");
    assert_eq!(vmm.api(&sock, r#"{"cmd":"status"}"#)["state"], "running");
    let names = filtered_threads(vmm.pid());
    eprintln!("threads: {names:?}");
    for kind in ["vmm", "vcpu", "api"] {
        assert!(names.contains(kind), "no {kind} thread among {names:?}");
    }
    assert_eq!(vmm.api(&sock, r#"{"cmd":"quit"}"#)["ok"], true);
    assert_eq!(vmm.wait(DEADLINE).code(), 0);
}
