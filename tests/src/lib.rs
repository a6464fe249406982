//! Helpers for the integration tests: find the workspace's binaries, build or find the guest
//! kernel, run the `vmm` as a real process with a deadline, and read its console.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use sync::MutexExt;

mod command;
pub mod migration;

pub use command::VmmCommand;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a binary built by this workspace in the same profile as the running test.
///
/// The tests run the real binaries; `tests/run.sh` builds them first. Panics with the command
/// to run when the binary is missing.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace{}`)",
        path.display(),
        if dir.ends_with("release") {
            " --release"
        } else {
            ""
        }
    );
    path
}

/// The guest images `images/build-kernel.sh` builds.
#[derive(Debug, Clone)]
pub struct GuestImages {
    /// The kernel (ELF).
    pub vmlinux: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// A 16 MiB ext2 root disk with the same `/init`.
    pub rootfs: PathBuf,
}

impl GuestImages {
    /// A private copy of the root disk (the guest may write to it).
    pub fn rootfs_copy(&self) -> PathBuf {
        let p = scratch("rootfs.ext2");
        std::fs::copy(&self.rootfs, &p).expect("copy the root disk");
        p
    }
}

/// The guest images built by `images/build-kernel.sh` (cached), or those beside the kernel
/// named by `$VMM_TEST_KERNEL`.
pub fn guest_kernel() -> &'static GuestImages {
    static KERNEL: OnceLock<GuestImages> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let vmlinux = match std::env::var_os("VMM_TEST_KERNEL") {
            Some(p) => PathBuf::from(p),
            None => {
                let out = Command::new(workspace_root().join("images/build-kernel.sh"))
                    .stderr(Stdio::inherit())
                    .output()
                    .expect("run images/build-kernel.sh");
                assert!(out.status.success(), "images/build-kernel.sh failed");
                let stdout = String::from_utf8_lossy(&out.stdout);
                PathBuf::from(
                    stdout
                        .lines()
                        .last()
                        .expect("build-kernel prints a path")
                        .trim(),
                )
            }
        };
        assert!(vmlinux.exists(), "no kernel at {}", vmlinux.display());
        GuestImages {
            initramfs: vmlinux.with_file_name("initramfs.cpio"),
            rootfs: vmlinux.with_file_name("rootfs.ext2"),
            vmlinux,
        }
    })
}

/// What a finished `vmm` run left behind.
#[derive(Debug)]
pub struct Run {
    /// Exit status (`None` when killed at the deadline).
    pub status: Option<ExitStatus>,
    /// The guest console.
    pub console: String,
    /// The VMM's stderr (its log and error lines).
    pub stderr: String,
    /// Wall time.
    pub wall: Duration,
}

impl Run {
    /// Exit code, or -1 when killed or signalled.
    pub fn code(&self) -> i32 {
        self.status.and_then(|s| s.code()).unwrap_or(-1)
    }

    /// Panics with the console and log when `needle` is not on the console.
    pub fn assert_console(&self, needle: &str) {
        assert!(
            self.console.contains(needle),
            "console lacks {needle:?}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.console,
            self.stderr
        );
    }
}

/// A unique scratch path under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("vmm-test-{}-{n}-{name}", std::process::id()))
}

/// Waits for `child` until `deadline`, killing it then.
pub fn wait_with_deadline(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `vmm` with `args` plus `--serial file=...`, killing it after `deadline`.
pub fn run_vmm(args: &[&str], deadline: Duration) -> Run {
    run_vmm_env(args, &[], deadline)
}

/// [`run_vmm`] with extra environment variables.
pub fn run_vmm_env(args: &[&str], env: &[(&str, &str)], deadline: Duration) -> Run {
    let console_path = scratch("console.log");
    let serial = format!("file={}", console_path.display());
    let start = Instant::now();
    let mut cmd = Command::new(bin("vmm"));
    cmd.args(args)
        .arg("--serial")
        .arg(&serial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn vmm");
    let mut stderr_pipe = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let status = wait_with_deadline(&mut child, deadline);
    let stderr = reader.join().unwrap_or_default();
    let console = std::fs::read_to_string(&console_path).unwrap_or_default();
    let _ = std::fs::remove_file(&console_path);
    Run {
        status,
        console,
        stderr,
        wall: start.elapsed(),
    }
}

/// Runs the workspace binary `name` with `args` as uid and gid 65534 (from a copy that user
/// may run), as another local user would. `None` when this process is not root and cannot.
pub fn run_as_nobody(name: &str, args: &[&std::ffi::OsStr]) -> Option<std::process::Output> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let copy = scratch(name);
    std::fs::copy(bin(name), &copy).expect("copy the binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new(&copy)
        .args(args)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as uid 65534");
    let _ = std::fs::remove_file(&copy);
    Some(out)
}

/// A DMA test device process serving one VMM on a fresh socket.
pub struct DeviceProcess {
    /// The process.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
}

impl DeviceProcess {
    /// Starts `dma-test-device` and waits for its socket.
    pub fn start() -> DeviceProcess {
        Self::start_with(&[])
    }

    /// Starts `dma-test-device` with extra arguments (`--dirty-log off`, ...).
    pub fn start_with(args: &[&str]) -> DeviceProcess {
        let socket = scratch("dma.sock");
        let child = Command::new(bin("dma-test-device"))
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dma-test-device");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the device never opened its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        DeviceProcess { child, socket }
    }

    /// The `--vfio-user` argument for it.
    pub fn arg(&self, iommu: bool) -> String {
        format!(
            "socket={}{}",
            self.socket.display(),
            if iommu { ",iommu=on" } else { "" }
        )
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The arguments of a `vmm` running the bare-metal test guest (128 MiB, counters on) with one
/// DMA test device at `vfio` (a whole `--vfio-user` value), behind the vIOMMU with `iommu`,
/// its cases `tests` (all the default ones when `None`).
pub fn test_guest_args(vfio: &str, iommu: bool, tests: Option<&str>) -> Vec<String> {
    test_guest_command(vfio, iommu, tests).to_args()
}

/// [`test_guest_args`] as a [`VmmCommand`], to add flags to.
pub fn test_guest_command(vfio: &str, iommu: bool, tests: Option<&str>) -> VmmCommand {
    let mut c = VmmCommand::test_guest()
        .memory("128M")
        .counters()
        .vfio_user(vfio);
    if let Some(t) = tests {
        c = c.cmdline(&format!("tests={t}"));
    }
    if iommu {
        c = c.iommu();
    }
    c
}

/// Runs [`test_guest_args`] to its end.
pub fn run_test_guest(vfio: &str, iommu: bool, tests: Option<&str>, deadline: Duration) -> Run {
    test_guest_command(vfio, iommu, tests).run(deadline)
}

/// Whether the long stress runs are asked for (`tests/stress.sh` sets `VMM_STRESS=1`).
pub fn stress() -> bool {
    std::env::var_os("VMM_STRESS").is_some_and(|v| v != "0")
}

/// `short` in the test command, `full` under `tests/stress.sh`: the number of cycles, samples
/// or frames of a long guest run. The same cases run either way; only their length changes.
pub fn scale(short: u32, full: u32) -> u32 {
    if stress() {
        full
    } else {
        short
    }
}

/// The value of `key=` in the `counters:` line of `device`.
pub fn counter(run: &Run, device: &str, key: &str) -> u64 {
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with(&format!("counters: {device}")))
        .unwrap_or_else(|| panic!("no counters for {device}:\n{}", run.stderr));
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[at + key.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad {key} in {line}"))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// TAP results on the console: `(ok, not ok)` counts, and the failing lines.
pub fn tap(console: &str) -> (usize, usize, Vec<String>) {
    let ok = console.lines().filter(|l| l.starts_with("ok ")).count();
    let bad: Vec<String> = console
        .lines()
        .filter(|l| l.starts_with("not ok "))
        .map(str::to_string)
        .collect();
    (ok, bad.len(), bad)
}

/// A `vmm` running in the background (for tests that talk to it while it runs).
pub struct VmmProcess {
    child: Child,
    console_path: PathBuf,
    stderr: Option<std::thread::JoinHandle<String>>,
    stderr_so_far: Arc<Mutex<String>>,
    start: Instant,
}

impl VmmProcess {
    /// Starts `vmm` with `args` plus `--serial file=...`.
    pub fn start(args: &[&str]) -> VmmProcess {
        Self::start_env(args, &[])
    }

    /// [`VmmProcess::start`] with environment variables set for it.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> VmmProcess {
        Self::start_wrapped(&[], args, env)
    }

    /// [`VmmProcess::start_env`] under `wrapper` (a command that runs the rest of its
    /// arguments, such as `ip netns exec NAME`), when not empty.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> VmmProcess {
        let console_path = scratch("console.log");
        let serial = format!("file={}", console_path.display());
        let vmm = bin("vmm");
        let mut cmd = match wrapper.split_first() {
            None => Command::new(&vmm),
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&vmm);
                c
            }
        };
        let mut child = cmd
            .args(args)
            .arg("--serial")
            .arg(&serial)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let mut pipe = child.stderr.take().expect("stderr piped");
        let so_far = Arc::new(Mutex::new(String::new()));
        let sink = so_far.clone();
        let stderr = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.locked().push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
            let s = sink.locked().clone();
            s
        });
        VmmProcess {
            child,
            console_path,
            stderr: Some(stderr),
            stderr_so_far: so_far,
            start: Instant::now(),
        }
    }

    /// [`api`] to this VMM at `socket`; when there is no answer, panics with what the VMM
    /// printed (and how it ended, if it did).
    pub fn api(&mut self, socket: &Path, request: &str) -> serde_json::Value {
        try_api(socket, request).unwrap_or_else(|e| {
            std::thread::sleep(Duration::from_millis(500));
            let ended = self.child.try_wait().ok().flatten();
            panic!(
                "{e}\nvmm: {}\n--- stderr ---\n{}\n--- console (end) ---\n{}",
                ended.map_or("still running".into(), |s| s.to_string()),
                self.stderr_so_far(),
                tail(&self.console(), 40)
            )
        })
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the VMM wrote on stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr_so_far.locked().clone()
    }

    /// Waits until stderr contains `needle`; panics after `deadline` (a hang).
    pub fn wait_stderr(&mut self, needle: &str, deadline: Duration) {
        let start = Instant::now();
        while !self.stderr_so_far().contains(needle) {
            assert!(
                start.elapsed() < deadline,
                "no {needle:?} on stderr after {deadline:?}:\n{}",
                self.stderr_so_far()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the VMM (SIGKILL) and returns what it left.
    pub fn kill(mut self) -> Run {
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        self.finish_with(status)
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console_path).unwrap_or_default()
    }

    /// Waits until the console contains `needle`; panics after `deadline`.
    pub fn wait_console(&mut self, needle: &str, deadline: Duration) {
        let start = Instant::now();
        while !self.console().contains(needle) {
            if let Ok(Some(s)) = self.child.try_wait() {
                let run = self.finish_with(Some(s));
                panic!(
                    "vmm exited ({s}) before {needle:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                    run.console, run.stderr
                );
            }
            assert!(
                start.elapsed() < deadline,
                "no {needle:?} on the console after {deadline:?}:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit (killing it after `deadline`).
    pub fn wait(mut self, deadline: Duration) -> Run {
        let status = wait_with_deadline(&mut self.child, deadline);
        self.finish_with(status)
    }

    fn finish_with(&mut self, status: Option<ExitStatus>) -> Run {
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let console = self.console();
        let _ = std::fs::remove_file(&self.console_path);
        Run {
            status,
            console,
            stderr,
            wall: self.start.elapsed(),
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one request to the control API at `socket`; returns the JSON answer. Panics when
/// there is none (see [`try_api`]).
pub fn api(socket: &Path, request: &str) -> serde_json::Value {
    try_api(socket, request).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends one request to the control API at `socket`: the JSON answer, or why there is none
/// (the socket cannot be reached within 10 s, the VMM closed the connection without an
/// answer, the answer is not JSON).
pub fn try_api(socket: &Path, request: &str) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, Write};
    let start = Instant::now();
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("cannot reach the API at {}: {e}", socket.display())),
        }
    };
    let mut w = stream.try_clone().map_err(|e| format!("clone: {e}"))?;
    writeln!(w, "{request}").map_err(|e| format!("send {request}: {e}"))?;
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("read the answer to {request}: {e}"))?;
    if line.is_empty() {
        return Err(format!(
            "no answer to {request}: the VMM closed the connection"
        ));
    }
    serde_json::from_str(&line).map_err(|e| format!("bad answer {line:?} to {request}: {e}"))
}

/// A `dpdk-testpmd` process serving vhost-user net ports (DPDK's vhost PMD, server mode,
/// with a device IOTLB) and looping every frame back with its MAC addresses swapped
/// (`--forward-mode=macswap`, each port to itself). Started by the tests that need a
/// vhost-user back end nobody here wrote; `tests/run.sh` installs Debian's `dpdk-dev`.
pub struct Testpmd {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    /// One socket per port, in port order.
    pub sockets: Vec<PathBuf>,
    log: PathBuf,
}

/// Where `dpdk-testpmd` is, if installed.
pub fn testpmd_path() -> Option<PathBuf> {
    ["/usr/bin/dpdk-testpmd", "/usr/local/bin/dpdk-testpmd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Testpmd {
    /// Starts testpmd with `ports` vhost-user ports (sockets `<name>-<i>.sock` in the temp
    /// dir) and waits until every socket exists. Runs without hugepages, both lcores on CPU 0.
    ///
    /// # Panics
    /// When testpmd is not installed or does not start: the tests that use it are meant to
    /// run (`tests/run.sh` installs it).
    pub fn start(name: &str, ports: usize) -> Testpmd {
        Self::spawn(name, Self::sockets(name, ports), false)
    }

    /// Like [`Testpmd::start`], printing its statistics every second so that
    /// [`Testpmd::wait_rx`] can watch traffic flow; [`Testpmd::stop`] then finds no final
    /// statistics.
    pub fn start_counting(name: &str, ports: usize) -> Testpmd {
        Self::spawn(name, Self::sockets(name, ports), true)
    }

    fn sockets(name: &str, ports: usize) -> Vec<PathBuf> {
        (0..ports)
            .map(|i| scratch(&format!("{name}-{i}.sock")))
            .collect()
    }

    /// Starts testpmd serving `sockets` (paths that may be reused after an earlier testpmd
    /// went away).
    pub fn start_on(name: &str, sockets: Vec<PathBuf>) -> Testpmd {
        Self::spawn(name, sockets, false)
    }

    /// [`Testpmd::start_on`], printing its statistics every second
    /// ([`Testpmd::start_counting`]).
    pub fn start_counting_on(name: &str, sockets: Vec<PathBuf>) -> Testpmd {
        Self::spawn(name, sockets, true)
    }

    fn spawn(name: &str, sockets: Vec<PathBuf>, counting: bool) -> Testpmd {
        let bin = testpmd_path()
            .expect("dpdk-testpmd is missing: install Debian's dpdk-dev (tests/run.sh does it)");
        for s in &sockets {
            let _ = std::fs::remove_file(s);
        }
        let log = scratch(&format!("{name}-testpmd.log"));
        let mut cmd = Command::new(bin);
        cmd.args(["--no-huge", "-m", "512", "--no-pci", "--lcores", "0@0,1@0"])
            .arg(format!(
                "--file-prefix=vmm-{}-{}",
                std::process::id(),
                log.file_name().unwrap().to_string_lossy()
            ));
        for (i, s) in sockets.iter().enumerate() {
            cmd.arg("--vdev").arg(format!(
                "net_vhost{i},iface={},iommu-support=1,queues=1",
                s.display()
            ));
        }
        cmd.args([
            "--",
            "--total-num-mbufs=8192",
            "--nb-cores=1",
            "--forward-mode=macswap",
            "--port-topology=loop",
            "--auto-start",
        ]);
        if counting {
            // testpmd then waits for a signal, not Enter: `stop` would find no final
            // statistics.
            cmd.arg("--stats-period=1");
        }
        let out = std::fs::File::create(&log).expect("testpmd log");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn dpdk-testpmd");
        let stdin = child.stdin.take();
        let start = Instant::now();
        while !sockets.iter().all(|s| s.exists()) {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "dpdk-testpmd exited ({st}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "dpdk-testpmd did not open its sockets:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Testpmd {
            child,
            stdin,
            sockets,
            log,
        }
    }

    /// The `--vhost-user-net` argument for port `i`.
    pub fn arg(&self, i: usize, iommu: bool) -> String {
        format!(
            "socket={}{}",
            self.sockets[i].display(),
            if iommu { ",iommu=on" } else { "" }
        )
    }

    /// Frames port `port` has received so far, from the statistics testpmd prints every
    /// second (`--stats-period=1`, [`Testpmd::start_counting`]); 0 before the first.
    pub fn rx_packets(&self, port: usize) -> u64 {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let head = format!("NIC statistics for port {port} ");
        log.rfind(&head)
            .and_then(|at| {
                let block = &log[at..];
                let i = block.find("RX-packets:")? + "RX-packets:".len();
                block[i..].split_whitespace().next()?.parse().ok()
            })
            .unwrap_or(0)
    }

    /// Waits until port `port` has received `frames` frames: traffic flows through this
    /// back end. Panics with testpmd's log after `deadline`.
    pub fn wait_rx(&self, port: usize, frames: u64, deadline: Duration) {
        let start = Instant::now();
        while self.rx_packets(port) < frames {
            assert!(
                start.elapsed() < deadline,
                "testpmd port {port} received {} of {frames} frames in {deadline:?}",
                self.rx_packets(port)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills testpmd at once (the back end "crashes").
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops testpmd (as its operator would: Enter) and returns everything it printed,
    /// forwarding statistics last.
    pub fn stop(mut self) -> String {
        use std::io::Write;
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"\n");
        }
        let _ = wait_with_deadline(&mut self.child, Duration::from_secs(20));
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `(RX-packets, TX-packets, TX-dropped)` of port `port` in testpmd's final statistics.
pub fn testpmd_port_stats(log: &str, port: usize) -> Option<(u64, u64, u64)> {
    let head = format!("Forward statistics for port {port} ");
    let at = log.find(&head)?;
    let block = &log[at..];
    let num = |key: &str| -> Option<u64> {
        let i = block.find(key)? + key.len();
        block[i..].split_whitespace().next()?.parse().ok()
    };
    Some((
        num("RX-packets:")?,
        num("TX-packets:")?,
        num("TX-dropped:")?,
    ))
}

/// The console without printk timestamps.
pub fn console_text(run: &Run) -> String {
    run.console
        .lines()
        .map(|l| match l.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map_or(l, |(_, t)| t),
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `key=` value on the first console line starting with `prefix` (timestamps stripped).
pub fn console_value(run: &Run, prefix: &str, key: &str) -> u64 {
    let con = console_text(run);
    console_values(&con, prefix, key)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no {prefix:?} line:\n{con}"))
}

/// The `key=` values of every line of `console` (timestamps stripped) starting with
/// `prefix`, in order.
pub fn console_values(console: &str, prefix: &str, key: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| {
            let at = l
                .find(&format!(" {key}="))
                .unwrap_or_else(|| panic!("no {key} in {l}"));
            l[at + key.len() + 2..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad {key} in {l}"))
        })
        .collect()
}

/// Checks a guest test run the way its suites mean it: every KTAP suite on the console ran
/// its whole plan with no failure and no skipped case, the suites named in `suites` are among
/// them (each at least once), and the guest gave its verdict, 0 failed, through the test-exit
/// port. A panic or a reset (which also ends the VMM with status 0), a hang, a short plan or a
/// `# SKIP` fails, with the console's tail in the message. Returns the suites found, in order.
pub fn check_suites(name: &str, run: &Run, suites: &[&str]) -> Vec<String> {
    check_suites_skipping(name, run, suites, &[])
}

/// [`check_suites`] for a run where exactly the cases named in `skipped` are skipped, in every
/// suite that has them: a case skipped that is not in the set, or one in the set that ran,
/// fails. SKIP is a verdict of its own, not a pass.
pub fn check_suites_skipping(
    name: &str,
    run: &Run,
    suites: &[&str],
    skipped: &[&str],
) -> Vec<String> {
    let con = console_text(run);
    let tail = tail(&con, 25);
    let expected: std::collections::BTreeSet<&str> = skipped.iter().copied().collect();
    let mut found = Vec::new();
    let mut seen_skipped = std::collections::BTreeSet::new();
    for block in con.split("KTAP version 1").skip(1) {
        let suite = block
            .lines()
            .find_map(|l| l.strip_prefix("# ").and_then(|r| r.split(':').next()))
            .unwrap_or("?")
            .to_string();
        let plan: usize = block
            .lines()
            .find_map(|l| l.strip_prefix("1.."))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name}: {suite} has no plan:\n{tail}\n{}", run.stderr));
        let ok = block.lines().filter(|l| l.starts_with("ok ")).count();
        let bad: Vec<&str> = block.lines().filter(|l| l.starts_with("not ok ")).collect();
        assert!(
            bad.is_empty() && ok == plan,
            "{name}: {suite}: {ok} ok of {plan}, failing {bad:?}\n--- console tail ---\n{tail}\n--- stderr ---\n{}",
            run.stderr
        );
        let skips: std::collections::BTreeSet<&str> =
            block.lines().filter_map(skipped_case).collect();
        let unexpected: Vec<&&str> = skips.difference(&expected).collect();
        assert!(
            unexpected.is_empty(),
            "{name}: {suite}: skipped {unexpected:?}, which this run must run (a SKIP is not a pass)\n--- console tail ---\n{tail}"
        );
        seen_skipped.extend(skips);
        found.push(suite);
    }
    let ran: Vec<&&str> = expected.difference(&seen_skipped).collect();
    assert!(
        ran.is_empty(),
        "{name}: {ran:?} should have been skipped in this configuration and were not\n--- console tail ---\n{tail}"
    );
    for s in suites {
        assert!(
            found.iter().any(|f| f == s),
            "{name}: suite {s} did not run (ran {found:?}):\n{tail}\n{}",
            run.stderr
        );
    }
    assert!(
        run.stderr.contains("guest ended (test exit code 0)"),
        "{name}: no passing verdict from the guest (a panic or a reset is not one):\n--- console tail ---\n{tail}\n--- stderr ---\n{}",
        run.stderr
    );
    found
}

/// The scripts' verdict (`images/common.sh`'s `ktap_summary CONSOLE LOG ARGS...`, which
/// `run-suite.sh` and `run-net.sh` end with) on a guest's `console` (text) and the VMM's
/// `log` (its stderr): whether it passed, and what it printed.
pub fn ktap_summary(console: &str, log: &str, args: &[&str]) -> (bool, String) {
    let path = scratch("vmm.log");
    std::fs::write(&path, log).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#". images/common.sh && ktap_summary "$@""#)
        .arg("ktap")
        .arg(console)
        .arg(&path)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("run bash");
    let _ = std::fs::remove_file(&path);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The case a KTAP result line skipped: `ok N NAME # SKIP why` gives `NAME`.
pub fn skipped_case(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("ok ")?;
    let (case, directive) = rest.split_once(" # ")?;
    if !directive.starts_with("SKIP") {
        return None;
    }
    // `N NAME`, or `N - NAME` in KTAP's optional form.
    let case = case.split_once(' ')?.1;
    Some(case.strip_prefix("- ").unwrap_or(case).trim())
}

/// Page frame numbers from `FIRST+COUNT` hex runs (the guest's `# written ranges:` lines, the
/// VMM's `--dirty-log-out` file).
pub fn page_set<'a>(runs: impl Iterator<Item = &'a str>) -> std::collections::BTreeSet<u64> {
    let mut set = std::collections::BTreeSet::new();
    for r in runs {
        let Some((first, count)) = r.split_once('+') else {
            continue;
        };
        let (Ok(first), Ok(count)) = (
            u64::from_str_radix(first, 16),
            u64::from_str_radix(count, 16),
        ) else {
            panic!("bad page run {r:?}");
        };
        set.extend(first..first + count);
    }
    set
}

/// The pages the guest suite says its devices wrote (`# written ranges:` lines).
pub fn guest_written_pages(run: &Run) -> std::collections::BTreeSet<u64> {
    let con = console_text(run);
    page_set(
        con.lines()
            .filter_map(|l| l.strip_prefix("# written ranges:"))
            .flat_map(str::split_whitespace),
    )
}

/// The pages in a `--dirty-log-out` file.
pub fn dirty_log_pages(path: &Path) -> std::collections::BTreeSet<u64> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no dirty log at {}: {e}", path.display()));
    page_set(text.lines().skip(1))
}

/// Panics unless the two page sets are equal, naming pages missing from and extra in `got`.
pub fn assert_same_pages(
    what: &str,
    want: &std::collections::BTreeSet<u64>,
    got: &std::collections::BTreeSet<u64>,
) {
    let missing: Vec<String> = want
        .difference(got)
        .take(20)
        .map(|p| format!("{p:#x}"))
        .collect();
    let extra: Vec<String> = got
        .difference(want)
        .take(20)
        .map(|p| format!("{p:#x}"))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} pages expected, {} found; missing {} (first: {missing:?}), extra {} (first: {extra:?})",
        want.len(),
        got.len(),
        want.difference(got).count(),
        got.difference(want).count()
    );
}

/// How a [`HostileProxy`] misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Half of a reply, then the connection closes.
    Truncated,
    /// A reply header claiming a 1 GiB message.
    Oversized,
    /// The previous reply again instead of this one (out of order).
    OutOfOrder,
    /// The reply with another message ID.
    WrongId,
    /// No reply, ever (the connection stays open).
    Hang,
    /// The connection closes instead of a reply.
    Close,
    /// No reply to the first `DMA_MAP` (and nothing relayed from then on); the connection
    /// stays open. `after` does not apply.
    HangOnMap,
}

/// A vfio-user man in the middle: relays messages (and their file descriptors) between the
/// VMM and a real device process, and from the `after`-th reply on misbehaves as told. Stands
/// for a device server that goes wrong mid-session.
pub struct HostileProxy {
    /// The socket the VMM connects to.
    pub socket: PathBuf,
    /// Set when the proxy holds back the `DMA_MAP` it hangs on ([`Misbehaviour::HangOnMap`]):
    /// the VMM is waiting for its reply from then on.
    pub hung: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn recv_vfio_user(s: &std::os::unix::net::UnixStream) -> Option<(Vec<u8>, Vec<std::fs::File>)> {
    use std::os::fd::FromRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut h = [0u8; 16];
    let mut fds = [-1; 16];
    let mut iov = [libc::iovec {
        iov_base: h.as_mut_ptr().cast(),
        iov_len: 16,
    }];
    // SAFETY: `iov` points at `h`, which outlives the call.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }.ok()?;
    let files: Vec<std::fs::File> = fds[..nfds]
        .iter()
        // SAFETY: descriptors just received, owned by nobody else.
        .map(|&fd| unsafe { std::fs::File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return None;
    }
    let mut msg = h[..n].to_vec();
    let mut rd = s;
    if n < 16 {
        let mut rest = vec![0u8; 16 - n];
        rd.read_exact(&mut rest).ok()?;
        msg.extend_from_slice(&rest);
    }
    let size = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]) as usize;
    if size > 16 {
        let mut body = vec![0u8; size.min(64 << 20) - 16];
        rd.read_exact(&mut body).ok()?;
        msg.extend_from_slice(&body);
    }
    Some((msg, files))
}

fn send_vfio_user(s: &std::os::unix::net::UnixStream, msg: &[u8], files: &[std::fs::File]) -> bool {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    if files.is_empty() {
        let mut w = s;
        return w.write_all(msg).is_ok();
    }
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    match s.send_with_fds(&[msg], &fds) {
        Ok(n) if n < msg.len() => {
            let mut w = s;
            w.write_all(&msg[n..]).is_ok()
        }
        Ok(_) => true,
        Err(_) => false,
    }
}

impl HostileProxy {
    /// Listens on a fresh socket and relays to `upstream`, misbehaving (`how`) at the
    /// `after`-th reply (counting from 1).
    pub fn start(upstream: &Path, how: Misbehaviour, after: u64) -> HostileProxy {
        let socket = scratch("hostile.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let upstream = upstream.to_path_buf();
        let hung = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hung_flag = std::sync::Arc::clone(&hung);
        let thread = std::thread::spawn(move || {
            let Ok((vmm, _)) = listener.accept() else {
                return;
            };
            let dev = std::os::unix::net::UnixStream::connect(&upstream).expect("upstream");
            let mut replies = 0u64;
            let mut last: Option<Vec<u8>> = None;
            while let Some((req, fds)) = recv_vfio_user(&vmm) {
                // VFIO_USER_DMA_MAP is command 2 (the header's second u16).
                if how == Misbehaviour::HangOnMap && u16::from_le_bytes([req[2], req[3]]) == 2 {
                    hung_flag.store(true, std::sync::atomic::Ordering::Release);
                    std::thread::park();
                    return;
                }
                if !send_vfio_user(&dev, &req, &fds) {
                    return;
                }
                let Some((mut reply, rfds)) = recv_vfio_user(&dev) else {
                    return;
                };
                replies += 1;
                if replies < after || how == Misbehaviour::HangOnMap {
                    if !send_vfio_user(&vmm, &reply, &rfds) {
                        return;
                    }
                    last = Some(reply);
                    continue;
                }
                match how {
                    Misbehaviour::Truncated => {
                        let half = (reply.len() / 2).max(8);
                        let _ = send_vfio_user(&vmm, &reply[..half.min(reply.len())], &[]);
                    }
                    Misbehaviour::Oversized => {
                        reply[4..8].copy_from_slice(&(1u32 << 30).to_le_bytes());
                        let _ = send_vfio_user(&vmm, &reply[..16], &[]);
                        std::thread::park();
                    }
                    Misbehaviour::OutOfOrder => {
                        let _ = send_vfio_user(&vmm, last.as_deref().unwrap_or(&reply), &[]);
                        std::thread::park();
                    }
                    Misbehaviour::WrongId => {
                        reply[0] ^= 0x55;
                        reply[1] ^= 0x55;
                        let _ = send_vfio_user(&vmm, &reply, &[]);
                        std::thread::park();
                    }
                    Misbehaviour::Hang => std::thread::park(),
                    Misbehaviour::Close | Misbehaviour::HangOnMap => {}
                }
                let _ = vmm.shutdown(std::net::Shutdown::Both);
                let _ = dev.shutdown(std::net::Shutdown::Both);
                return;
            }
        });
        HostileProxy {
            socket,
            hung,
            thread: Some(thread),
        }
    }
}

impl Drop for HostileProxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        // A parked relay thread stays parked; the process ends it.
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(console: &str) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            status: Some(ExitStatus::from_raw(0)),
            console: console.into(),
            stderr: "guest ended (test exit code 0)".into(),
            wall: Duration::ZERO,
        }
    }

    const SUITE: &str = "KTAP version 1\n# vmm_dmatest: 0000:00:02.0\n1..3\nok 1 copy_4k\n\
                         ok 2 fault_read_only # SKIP the device is not behind an IOMMU\n\
                         ok 3 fault_unmapped # SKIP the device is not behind an IOMMU\n";

    fn fails(f: impl FnOnce() + std::panic::UnwindSafe) -> bool {
        std::panic::catch_unwind(f).is_err()
    }

    /// A skipped case is its own verdict: refused where none is expected, accepted where
    /// exactly that set is, and an expected skip that ran instead fails too.
    #[test]
    fn a_skip_is_not_a_pass() {
        assert_eq!(
            skipped_case("ok 2 fault_read_only # SKIP not behind an IOMMU"),
            Some("fault_read_only")
        );
        assert_eq!(skipped_case("ok 2 - chains # SKIP no SG"), Some("chains"));
        assert_eq!(skipped_case("ok 1 copy_4k"), None);
        assert_eq!(skipped_case("not ok 1 copy_4k # SKIP x"), None);
        let r = run_of(SUITE);
        assert!(fails(|| {
            check_suites("s", &r, &["vmm_dmatest"]);
        }));
        assert!(fails(|| {
            check_suites_skipping("s", &r, &["vmm_dmatest"], &["fault_read_only"]);
        }));
        assert!(fails(|| {
            check_suites_skipping(
                "s",
                &r,
                &["vmm_dmatest"],
                &[
                    "fault_read_only",
                    "fault_unmapped",
                    "fault_already_unmapped",
                ],
            );
        }));
        let found = check_suites_skipping(
            "s",
            &r,
            &["vmm_dmatest"],
            &["fault_unmapped", "fault_read_only"],
        );
        assert_eq!(found, ["vmm_dmatest"]);
        let all_ran = run_of(&SUITE.replace(" # SKIP the device is not behind an IOMMU", ""));
        check_suites("s", &all_ran, &["vmm_dmatest"]);
    }
}
