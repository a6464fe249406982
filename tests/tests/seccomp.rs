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

/// The main thread is filtered from the start of set-up, before it talks to any device
/// server or back end: with `VMM_TEST_SECCOMP=set-up`, it calls `sysinfo` right after
/// installing the set-up list, and the VMM stops naming the set-up thread.
#[test]
fn set_up_runs_filtered() {
    let g = bin("test-guest").display().to_string();
    let run = vmm_tests::run_vmm_env(
        &["--kernel", &g, "--memory", "64M", "--cmdline", "tests=none"],
        &[("VMM_TEST_SECCOMP", "set-up")],
        DEADLINE,
    );
    assert_eq!(run.code(), 159, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("seccomp: the set-up thread made a forbidden system call: sysinfo (99)"),
        "{}",
        run.stderr
    );
}

/// `--seccomp log` lets a forbidden call through, and the kernel logs it: an audit record
/// (`type=1326`) of the VMM's process for `sysinfo` (99) with the action `SECCOMP_RET_LOG`
/// (`code=0x7ffc0000`). SKIP for the record where the kernel log cannot be read.
#[test]
fn log_mode_lets_it_through() {
    let (_dev, mut vmm, sock) = start("log");
    let pid = vmm.pid();
    let r = vmm.api(&sock, r#"{"cmd":"test-forbidden-syscall"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(vmm.api(&sock, r#"{"cmd":"status"}"#)["state"], "running");
    assert_eq!(vmm.api(&sock, r#"{"cmd":"quit"}"#)["ok"], true);
    assert_eq!(vmm.wait(DEADLINE).code(), 0);
    let record = |log: &str| {
        log.lines().any(|l| {
            l.contains("type=1326")
                && l.contains(&format!(" pid={pid} "))
                && l.contains(" syscall=99 ")
                && l.contains("code=0x7ffc0000")
        })
    };
    let since = std::time::Instant::now();
    loop {
        let Ok(out) = std::process::Command::new("dmesg").output() else {
            eprintln!("SKIP the audit record: dmesg cannot run");
            return;
        };
        if !out.status.success() {
            eprintln!("SKIP the audit record: the kernel log cannot be read here");
            return;
        }
        if record(&String::from_utf8_lossy(&out.stdout)) {
            return;
        }
        // The kernel's audit thread prints the record after the call.
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "no audit record of the VMM ({pid}) calling sysinfo in log mode"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every thread of a running VMM is under a seccomp filter of its own: `Seccomp: 2` (filter
/// mode) in each `/proc/PID/task/TID/status`, the main thread's included, and more filters
/// (`Seccomp_filters`) than the two of set-up that every thread inherits (the set-up list and
/// the `clone3` refusal that comes with a list allowing threads): a thread that installed no
/// list of its own has just those two. Returns the threads' names.
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
        let filters: u32 = field("Seccomp_filters:").parse().unwrap_or(0);
        assert!(
            filters > 2,
            "thread {name} has {filters} filters: only set-up's, none of its own"
        );
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
    for kind in ["vmm", "vcpu", "api", "viommu"] {
        assert!(names.contains(kind), "no {kind} thread among {names:?}");
    }
    assert_eq!(vmm.api(&sock, r#"{"cmd":"quit"}"#)["ok"], true);
    assert_eq!(vmm.wait(DEADLINE).code(), 0);
}
