//! Seccomp filters, built with `seccompiler` (the rust-vmm crate Firecracker uses): each
//! thread of the VMM and of the DMA test device installs, when it starts, a filter that
//! allows the system calls its kind of thread makes and nothing else.
//!
//! [`Mode::On`] makes a forbidden call raise SIGSYS; the handler installed here writes one
//! line naming the thread and the system call to stderr and ends the process (exit status
//! [`VIOLATION_EXIT`]). [`Mode::Log`] lets the call through and has the kernel log it
//! (`dmesg`: audit type 1326, `comm` is the thread name). [`Mode::Off`] installs nothing.
//!
//! Filters stack: a thread started by a filtered thread keeps its parent's filter under its
//! own, so a parent's list includes what its children need (see each list's comment).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub mod ioctls;

/// What a kind of thread may call, beyond [`COMMON`]: system calls (groups of
/// `libc::SYS_*` numbers) and, for `ioctl`, which requests.
#[derive(Debug, Clone, Copy)]
pub struct Filter {
    /// The system calls.
    pub syscalls: &'static [&'static [i64]],
    /// The `ioctl` requests, when `ioctl` is among the system calls.
    pub ioctls: Ioctls,
}

/// The `ioctl` requests a filter lets through (its second argument's low 32 bits).
#[derive(Debug, Clone, Copy)]
pub enum Ioctls {
    /// Any request (the test device's processes).
    Any,
    /// The requests one of these functions lists (see [`ioctls`]), and every request of
    /// these `_IOC_TYPE`s (bits 8 to 15: [`ioctls::KVM_TYPE`], [`ioctls::VFIO_TYPE`]).
    Only {
        /// Lists of request numbers.
        requests: &'static [fn() -> Vec<u64>],
        /// Request types allowed whole.
        types: &'static [u8],
    },
}

/// What a forbidden system call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The process ends with a message naming the thread and the call.
    #[default]
    On,
    /// The call goes through; the kernel logs it.
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!("`{other}`: expected on, log or off")),
        }
    }
}

/// Exit status of a process stopped by its filter.
pub const VIOLATION_EXIT: i32 = 159;

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Building or loading the filter failed.
    #[error("seccomp filter of the {0} thread: {1}")]
    Filter(&'static str, String),
}

thread_local! {
    /// The name the SIGSYS handler prints (a `const` initialiser: no allocation on first use
    /// from the handler).
    static THREAD: Cell<&'static str> = const { Cell::new("unnamed") };
}

/// Installs, on the calling thread, a filter that allows `syscalls` (groups of numbers,
/// `libc::SYS_*`)
/// plus what every thread needs (the SIGSYS report, returning from signals, exiting, futexes,
/// memory management, clocks). `name` is the thread's kind, for the report.
///
/// # Errors
/// [`SeccompError`] when the filter cannot be built or loaded.
pub fn install(name: &'static str, filter: Filter, mode: Mode) -> Result<(), SeccompError> {
    let syscalls = filter.syscalls;
    if mode == Mode::Off {
        return Ok(());
    }
    THREAD.with(|t| t.set(name));
    static HANDLER: Once = Once::new();
    HANDLER.call_once(install_sigsys_handler);
    let err = |e: &dyn std::fmt::Display| SeccompError::Filter(name, e.to_string());
    let mut rules = BTreeMap::new();
    for &nr in COMMON.iter().chain(syscalls.iter().copied().flatten()) {
        rules.insert(nr, argument_rules(nr, filter.ioctls).map_err(|e| err(&e))?);
    }
    let mismatch = match mode {
        Mode::On => SeccompAction::Trap,
        _ => SeccompAction::Log,
    };
    let filter =
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch()).map_err(|e| err(&e))?;
    let bpf: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))?;
    if syscalls.iter().any(|g| g.contains(&libc::SYS_clone3)) {
        // `clone3` passes its flags in memory, where a filter cannot look: it fails with
        // ENOSYS, and the C library starts the thread with `clone`, whose flags the filter
        // above checks. Stacked filters take the strictest answer: this ERRNO wins over the
        // first filter's ALLOW.
        let no_clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch(),
        )
        .map_err(|e| err(&e))?;
        let no_clone3: BpfProgram = no_clone3
            .try_into()
            .map_err(|e: seccompiler::BackendError| err(&e))?;
        seccompiler::apply_filter(&no_clone3).map_err(|e| err(&e))?;
    }
    seccompiler::apply_filter(&bpf).map_err(|e| err(&e))
}

/// The arguments a system call may have, as rules of which one must match (none: any):
/// - `mmap` and `mprotect`: never `PROT_EXEC` (no thread makes code after start-up);
/// - `socket`: only the families the VMM speaks (`AF_UNIX` for device servers, back ends,
///   the API and local migration; `AF_INET` and `AF_INET6` for migration over TCP);
/// - `clone`: only threads (`CLONE_THREAD`), never a new process;
/// - `tgkill`: only threads of this process (the vCPU kick);
/// - `ioctl`: only the requests of the thread's [`Ioctls`].
fn argument_rules(nr: i64, ioctls: Ioctls) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let arg = |index: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
    };
    Ok(match nr {
        libc::SYS_mmap | libc::SYS_mprotect => vec![SeccompRule::new(vec![arg(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?],
        libc::SYS_socket => [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
            .into_iter()
            .map(|family| SeccompRule::new(vec![arg(0, SeccompCmpOp::Eq, family as u64)?]))
            .collect::<Result<_, _>>()?,
        libc::SYS_clone => vec![SeccompRule::new(vec![arg(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
        libc::SYS_tgkill => vec![SeccompRule::new(vec![arg(
            0,
            SeccompCmpOp::Eq,
            u64::from(std::process::id()),
        )?])?],
        libc::SYS_ioctl => match ioctls {
            Ioctls::Any => Vec::new(),
            Ioctls::Only { requests, types } => {
                let mut rules = Vec::new();
                for r in requests.iter().flat_map(|list| list()) {
                    rules.push(SeccompRule::new(vec![arg(
                        1,
                        SeccompCmpOp::Eq,
                        r & 0xffff_ffff,
                    )?])?);
                }
                for &t in types {
                    rules.push(SeccompRule::new(vec![arg(
                        1,
                        SeccompCmpOp::MaskedEq(0xff00),
                        u64::from(t) << 8,
                    )?])?);
                }
                rules
            }
        },
        _ => Vec::new(),
    })
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
}

/// What every thread may call.
pub const COMMON: &[i64] = &[
    libc::SYS_write, // the SIGSYS report, logs
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rseq,
    libc::SYS_close,
];

fn install_sigsys_handler() {
    // SAFETY: a zeroed `sigaction` is valid; the handler is an `extern "C"` function of the
    // SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

/// The SIGSYS handler: one line on stderr, then the process ends. Async-signal-safe: no
/// allocation, only `write` and `exit_group`.
extern "C" fn sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // `siginfo_t` for SIGSYS: after si_signo, si_errno, si_code and padding (16 bytes), the
    // union holds `void *_call_addr` then `int _syscall` (include/uapi/asm-generic/siginfo.h).
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let mut buf = [0u8; 256];
    let len = violation_line(THREAD.with(|t| t.get()), nr, &mut buf);
    // SAFETY: writing a stack buffer to stderr and ending the process; both are allowed by
    // every filter and async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::SYS_exit_group, VIOLATION_EXIT);
    }
}

/// Writes the line a forbidden call prints into `buf` and returns its length: "seccomp: the
/// `thread` thread made a forbidden system call: NAME (NR); stopping\n", cut at the buffer's
/// end. Async-signal-safe: no allocation (the SIGSYS handler's formatting).
fn violation_line(thread: &str, nr: i32, buf: &mut [u8; 256]) -> usize {
    let mut len = 0;
    let mut put = |s: &[u8]| {
        let n = s.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&s[..n]);
        len += n;
    };
    put(b"seccomp: the ");
    put(thread.as_bytes());
    put(b" thread made a forbidden system call: ");
    put(syscall_name(i64::from(nr)).as_bytes());
    put(b" (");
    if nr < 0 {
        put(b"-");
    }
    let mut digits = [0u8; 12];
    let mut k = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        k -= 1;
        digits[k] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[k..]);
    put(b"); stopping\n");
    len
}

/// The name of system call `nr` on this architecture, for reports ("?" when not listed).
pub fn syscall_name(nr: i64) -> &'static str {
    NAMES
        .iter()
        .find(|&&(n, _)| n == nr)
        .map_or("?", |&(_, s)| s.strip_prefix("SYS_").unwrap_or(s))
}

macro_rules! names {
    ($($n:ident),* $(,)?) => {
        &[$((libc::$n, stringify!($n))),*]
    };
}

/// Names of the calls the filters list and of those an attacker would want.
const NAMES: &[(i64, &str)] = names![
    SYS_read,
    SYS_write,
    SYS_open,
    SYS_openat,
    SYS_close,
    SYS_stat,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_lseek,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_access,
    SYS_pipe,
    SYS_pipe2,
    SYS_sched_yield,
    SYS_mremap,
    SYS_madvise,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_nanosleep,
    SYS_getpid,
    SYS_socket,
    SYS_connect,
    SYS_accept,
    SYS_accept4,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_socketpair,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_clone,
    SYS_clone3,
    SYS_fork,
    SYS_vfork,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_wait4,
    SYS_kill,
    SYS_tgkill,
    SYS_tkill,
    SYS_fcntl,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    SYS_getdents64,
    SYS_getcwd,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_unlink,
    SYS_unlinkat,
    SYS_readlink,
    SYS_readlinkat,
    SYS_chmod,
    SYS_fchmod,
    SYS_chown,
    SYS_ptrace,
    SYS_prctl,
    SYS_arch_prctl,
    SYS_mount,
    SYS_umount2,
    SYS_setuid,
    SYS_setgid,
    SYS_gettid,
    SYS_futex,
    SYS_sched_getaffinity,
    SYS_set_tid_address,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_poll,
    SYS_ppoll,
    SYS_select,
    SYS_pselect6,
    SYS_eventfd2,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_signalfd4,
    SYS_memfd_create,
    SYS_fallocate,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_exit_group,
    SYS_sigaltstack,
    SYS_getrandom,
    SYS_rseq,
    SYS_sysinfo,
    SYS_uname,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_prlimit64,
    SYS_sched_setaffinity,
    SYS_set_robust_list,
    SYS_get_robust_list,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_bpf,
    SYS_seccomp,
    SYS_init_module,
    SYS_finit_module,
    SYS_kexec_load,
    SYS_reboot,
    SYS_io_uring_setup,
    SYS_userfaultfd,
    SYS_perf_event_open,
    SYS_mincore,
    SYS_msync,
    SYS_getrusage,
    SYS_times,
    SYS_fstatfs,
    SYS_statfs,
    SYS_sendfile,
    SYS_copy_file_range,
    SYS_splice,
    SYS_tee,
    SYS_name_to_handle_at,
    SYS_open_by_handle_at,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pidfd_getfd,
    SYS_faccessat,
    SYS_faccessat2,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIGSYS line names the thread, the call and its number (one digit, several, a
    /// negative one), and a thread name too long for the buffer cuts the line, never overflows.
    #[test]
    fn the_violation_line_names_thread_call_and_number() {
        let line = |thread: &str, nr: i32| {
            let mut buf = [0u8; 256];
            let len = violation_line(thread, nr, &mut buf);
            String::from_utf8(buf[..len].to_vec()).unwrap()
        };
        assert_eq!(
            line("vcpu0", libc::SYS_socket as i32),
            "seccomp: the vcpu0 thread made a forbidden system call: socket (41); stopping\n"
        );
        assert_eq!(
            line("api", 0),
            "seccomp: the api thread made a forbidden system call: read (0); stopping\n"
        );
        assert_eq!(
            line("x", 1234),
            "seccomp: the x thread made a forbidden system call: ? (1234); stopping\n"
        );
        assert!(line("x", -7).ends_with(": ? (-7); stopping\n"));
        let long = "t".repeat(300);
        let cut = line(&long, 41);
        assert_eq!(cut.len(), 256);
        assert!(cut.starts_with("seccomp: the ttt"));
    }

    /// Every thread the main thread starts during set-up inherits [`lists::SETUP`] and adds
    /// its own list: what its own list allows must be within set-up's, system calls and
    /// `ioctl` requests alike.
    #[test]
    fn every_list_is_within_set_up() {
        use lists::*;
        let setup: std::collections::BTreeSet<i64> =
            SETUP.syscalls.iter().copied().flatten().copied().collect();
        let allows_ioctl = |ioctls: Ioctls, request: u64| match ioctls {
            Ioctls::Any => true,
            Ioctls::Only { requests, types } => {
                requests.iter().flat_map(|l| l()).any(|r| r == request)
                    || types.iter().any(|&t| (request >> 8) & 0xff == u64::from(t))
            }
        };
        for (name, list) in [
            ("VCPU", VCPU),
            ("VMM_MAIN", VMM_MAIN),
            ("API", API),
            ("STATIC_MAP", STATIC_MAP),
            ("VIOMMU", VIOMMU),
            ("VHOST_USER", VHOST_USER),
        ] {
            let missing: Vec<&str> = list
                .syscalls
                .iter()
                .copied()
                .flatten()
                .filter(|nr| !setup.contains(nr))
                .map(|&nr| syscall_name(nr))
                .collect();
            assert!(
                missing.is_empty(),
                "{name} allows what set-up does not: {missing:?}"
            );
            let Ioctls::Only { requests, types } = list.ioctls else {
                panic!("{name}: any ioctl");
            };
            for r in requests.iter().flat_map(|l| l()) {
                assert!(allows_ioctl(SETUP.ioctls, r), "{name}: ioctl {r:#x}");
            }
            for &t in types {
                let Ioctls::Only {
                    types: setup_types, ..
                } = SETUP.ioctls
                else {
                    unreachable!()
                };
                assert!(setup_types.contains(&t), "{name}: ioctl type {t:#x}");
            }
        }
    }

    /// Under a filter, executable memory, sockets of other families, `ioctl` requests
    /// outside the thread's list (a terminal's on the vhost-user thread, a VM's on a vCPU
    /// thread), a `clone` that makes a process and a signal to another process are refused (the process ends with
    /// [`VIOLATION_EXIT`]) while plain mappings, UNIX sockets, listed `ioctl`s, new threads and signals to
    /// this process's threads go through. Each case runs in a child process (this test binary again), since a filter
    /// cannot be removed.
    #[test]
    fn arguments_are_filtered_too() {
        if let Ok(case) = std::env::var("VMM_SECCOMP_CASE") {
            install("test", lists::VHOST_USER, Mode::On).unwrap();
            // SAFETY: plain system calls on memory and descriptors this block owns; the
            // process ends at the end of the block.
            unsafe {
                let len = 4096;
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                assert_eq!(libc::mprotect(p, len, libc::PROT_READ), 0);
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                assert!(fd >= 0);
                let mut on: libc::c_int = 1;
                assert_eq!(libc::ioctl(fd, libc::FIONBIO, &mut on), 0);
                match case.as_str() {
                    "mprotect-exec" => {
                        libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC);
                    }
                    "mmap-exec" => {
                        libc::mmap(
                            std::ptr::null_mut(),
                            len,
                            libc::PROT_READ | libc::PROT_EXEC,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        );
                    }
                    "netlink" => {
                        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0);
                    }
                    // A terminal request (the TIOCSTI family of escapes), on a thread that
                    // may only set descriptor flags.
                    "ioctl-tty" => {
                        let mut t = std::mem::zeroed::<libc::termios>();
                        libc::ioctl(0, libc::TCGETS, &mut t);
                    }
                    _ => {}
                }
                libc::_exit(0);
            }
        }
        if let Ok(case) = std::env::var("VMM_SECCOMP_VCPU_CASE") {
            install("test", lists::VCPU, Mode::On).unwrap();
            // SAFETY: requests on a descriptor that does not exist: the filter looks at the
            // request number before the kernel looks at the descriptor.
            unsafe {
                assert_eq!(libc::ioctl(-1, 0xae80 as _, 0), -1); // KVM_RUN
                if case == "kvm-create-vcpu" {
                    // KVM_CREATE_VCPU: a VM's request no vCPU thread makes.
                    libc::ioctl(-1, 0xae41 as _, 0);
                }
                libc::_exit(0);
            }
        }
        if let Ok(case) = std::env::var("VMM_SECCOMP_API_CASE") {
            install("test", lists::API, Mode::On).unwrap();
            // SAFETY: requests on a descriptor that does not exist, as above.
            unsafe {
                assert_eq!(libc::ioctl(-1, 0x4010_ae42 as _, 0), -1); // KVM_GET_DIRTY_LOG
                assert_eq!(libc::ioctl(-1, 0x4040_ae79 as _, 0), -1); // KVM_IOEVENTFD
                if case == "kvm-enable-cap" {
                    // KVM_ENABLE_CAP: of KVM's type, but no path of the VMM makes it.
                    libc::ioctl(-1, 0x4068_aea3 as _, 0);
                }
                libc::_exit(0);
            }
        }
        if let Ok(case) = std::env::var("VMM_SECCOMP_THREADS_CASE") {
            const MORE: &[i64] = &[libc::SYS_sched_getaffinity, libc::SYS_tgkill];
            let filter = Filter {
                syscalls: &[lists::THREADS, MORE],
                ioctls: Ioctls::Any,
            };
            install("test", filter, Mode::On).unwrap();
            // Threads start (clone3 refused, clone with thread flags) and signal their own
            // process.
            std::thread::spawn(|| ()).join().unwrap();
            // SAFETY: signal 0 checks a thread exists and delivers nothing; the forbidden
            // cases end the process, and the clone without thread flags is a fork whose
            // child exits at once.
            unsafe {
                assert_eq!(
                    libc::syscall(
                        libc::SYS_tgkill,
                        libc::getpid(),
                        libc::syscall(libc::SYS_gettid),
                        0
                    ),
                    0
                );
                match case.as_str() {
                    "fork" if libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) == 0 => {
                        libc::_exit(0);
                    }
                    "tgkill-other" => {
                        libc::syscall(libc::SYS_tgkill, 1, 1, 0);
                    }
                    "clone3-process" => {
                        // struct clone_args: flags 0, exit_signal SIGCHLD: a fork.
                        let mut args = [0u64; 11];
                        args[4] = libc::SIGCHLD as u64;
                        let r = libc::syscall(libc::SYS_clone3, args.as_mut_ptr(), 88);
                        if r == 0 {
                            libc::_exit(0);
                        }
                        let e = *libc::__errno_location();
                        libc::_exit(if r < 0 && e == libc::ENOSYS { 0 } else { 3 });
                    }
                    _ => {}
                }
                libc::_exit(0);
            }
        }
        for (var, case, code) in [
            ("VMM_SECCOMP_CASE", "allowed", 0),
            ("VMM_SECCOMP_CASE", "mprotect-exec", VIOLATION_EXIT),
            ("VMM_SECCOMP_CASE", "mmap-exec", VIOLATION_EXIT),
            ("VMM_SECCOMP_CASE", "netlink", VIOLATION_EXIT),
            ("VMM_SECCOMP_CASE", "ioctl-tty", VIOLATION_EXIT),
            ("VMM_SECCOMP_VCPU_CASE", "allowed", 0),
            ("VMM_SECCOMP_VCPU_CASE", "kvm-create-vcpu", VIOLATION_EXIT),
            ("VMM_SECCOMP_API_CASE", "allowed", 0),
            ("VMM_SECCOMP_API_CASE", "kvm-enable-cap", VIOLATION_EXIT),
            ("VMM_SECCOMP_THREADS_CASE", "allowed", 0),
            ("VMM_SECCOMP_THREADS_CASE", "fork", VIOLATION_EXIT),
            ("VMM_SECCOMP_THREADS_CASE", "tgkill-other", VIOLATION_EXIT),
            ("VMM_SECCOMP_THREADS_CASE", "clone3-process", 0),
        ] {
            in_child("arguments_are_filtered_too", var, case, code, "test");
        }
    }

    /// Runs test `test` of this binary again in a child process with `var=case`, which must
    /// exit with `code`; a violation's report must name thread `thread`.
    fn in_child(test: &str, var: &str, case: &str, code: i32, thread: &str) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("seccomp::tests::{test}"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env(var, case)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{case}: {stderr}");
        if code == VIOLATION_EXIT {
            let line = format!("seccomp: the {thread} thread made a forbidden system call");
            assert!(stderr.contains(&line), "{case}: {stderr}");
        }
    }

    /// [`confine`] installs the filter in the mode the process set with [`set_mode`] (none
    /// set: no filter, as in a test process), and a violation names the thread by the name
    /// [`name_thread`] gave it last. Each case runs in a child process, as above.
    #[test]
    fn confine_takes_the_process_mode_and_names_the_thread() {
        if let Ok(case) = std::env::var("VMM_SECCOMP_CONFINE_CASE") {
            match case.as_str() {
                "on" => set_mode(Mode::On),
                "log" => set_mode(Mode::Log),
                _ => {}
            }
            std::thread::spawn(|| {
                confine("confined", lists::VHOST_USER);
                name_thread("renamed");
                // SAFETY: a socket call whose descriptor, if any, the process's end closes.
                unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
            })
            .join()
            .unwrap();
            // SAFETY: ends the child process.
            unsafe { libc::_exit(0) };
        }
        for (case, code) in [("on", VIOLATION_EXIT), ("log", 0), ("unset", 0)] {
            in_child(
                "confine_takes_the_process_mode_and_names_the_thread",
                "VMM_SECCOMP_CONFINE_CASE",
                case,
                code,
                "renamed",
            );
        }
    }

    #[test]
    fn modes_parse_and_names_are_known() {
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert!("maybe".parse::<Mode>().unwrap_err().contains("`maybe`"));
        assert_eq!(syscall_name(libc::SYS_ptrace), "ptrace");
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert_eq!(syscall_name(-1), "?");
    }
}

/// The mode the process chose (`--seccomp`), for threads started deep inside device code.
static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();

/// Names the calling thread in violation reports, for a thread that runs under a filter it
/// inherited (a connection thread of the API, say).
pub fn name_thread(name: &'static str) {
    THREAD.with(|t| t.set(name));
}

/// Records the process-wide mode (first call wins).
pub fn set_mode(mode: Mode) {
    let _ = MODE.set(mode);
}

/// [`install`] with the process-wide mode set by the program with [`set_mode`] (none when it
/// set none: the device models in a test process stay unfiltered). A thread that cannot
/// install its filter logs it and goes on unfiltered only in [`Mode::Log`]; in [`Mode::On`]
/// the process ends (an unconfined thread is not what was asked for).
pub fn confine(name: &'static str, filter: Filter) {
    let mode = MODE.get().copied().unwrap_or(Mode::Off);
    if let Err(e) = install(name, filter, mode) {
        log::error!("{e}");
        if mode == Mode::On {
            std::process::exit(VIOLATION_EXIT);
        }
    }
}

/// The system calls of each kind of thread, beyond [`COMMON`], as groups. Gathered by running
/// every test with `--seccomp log` and reading the kernel's log of what the filters let
/// through (`dmesg | grep type=1326`: `comm` is the thread, `syscall` the number).
pub mod lists {
    use super::ioctls::{self, VFIO_TYPE};
    use super::{Filter, Ioctls};

    /// `libc::SYS_*` numbers, as a slice.
    macro_rules! sys {
        ($($n:ident),* $(,)?) => { &[$(libc::$n),*] };
    }

    /// Descriptor I/O every working thread does: reads and writes, messages with file
    /// descriptors (vfio-user, vhost-user), polling, descriptor flags, eventfds, ioctls on
    /// descriptors it holds (KVM, VFIO), metadata of open files, random numbers (hash maps).
    pub const IO: &[i64] = sys![
        SYS_read,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_sendto,
        SYS_recvfrom,
        SYS_poll,
        SYS_ppoll,
        SYS_fcntl,
        SYS_dup,
        SYS_shutdown,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_getrandom,
        SYS_epoll_ctl,
        SYS_eventfd2,
        SYS_ioctl,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_lseek,
    ];

    /// Files by name: snapshots, `--dirty-log-out`, sockets removed at the end.
    const FILES: &[i64] = sys![
        SYS_openat,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_unlink,
        SYS_unlinkat,
        SYS_mkdir,
        SYS_mkdirat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
    ];

    /// Making connections (migration, reconnecting to a back end).
    const CONNECT: &[i64] = sys![SYS_socket, SYS_connect, SYS_socketpair];

    /// Accepting connections (the API, migration, the test device's socket), and checking a
    /// peer's uid against the VMM's (`geteuid`).
    pub const SERVE: &[i64] = sys![
        SYS_geteuid,
        SYS_accept,
        SYS_accept4,
        SYS_bind,
        SYS_listen,
        SYS_getsockname,
        SYS_epoll_wait,
        SYS_epoll_pwait,
    ];

    /// Starting threads (the API's connection threads).
    pub const THREADS: &[i64] = sys![SYS_clone, SYS_clone3, SYS_set_robust_list, SYS_prctl];

    /// A vCPU thread: `KVM_RUN` and the device emulation its exits run (PCI, virtio
    /// transports, passthrough BARs through vfio-user messages or VFIO region reads,
    /// device activation: eventfds, irqfds, vhost-user messages with file descriptors),
    /// kicking the other vCPUs (signals).
    ///
    /// `ioctl`: [`ioctls::vcpu`], and VFIO's and iommufd's (a passthrough function's
    /// interrupts and reset; the identity mappings a `bypass` write makes).
    pub const VCPU: Filter = Filter {
        syscalls: &[
            IO,
            sys![SYS_dup3, SYS_socketpair, SYS_tgkill, SYS_sched_getaffinity],
        ],
        ioctls: Ioctls::Only {
            requests: &[ioctls::vcpu, ioctls::descriptors],
            types: &[VFIO_TYPE],
        },
    };

    /// The main thread once the VM runs: the event loop (queue notifications, device
    /// processes' interrupts and hang-ups, the devices' work, the timer of throttled page
    /// requests), stopping the vCPUs, and at the end the counters and `--dirty-log-out`.
    pub const VMM_MAIN: Filter = Filter {
        syscalls: &[
            IO,
            FILES,
            sys![
                SYS_timerfd_settime,
                SYS_epoll_wait,
                SYS_epoll_pwait,
                SYS_dup3,
                SYS_tgkill,
                SYS_sched_getaffinity,
                SYS_wait4,
            ],
        ],
        ioctls: KVM_AND_VFIO,
    };

    /// The control API's threads (the listener and one per connection, which inherit its
    /// filter): snapshots (files), migration (sockets, KVM's dirty log, memory slots), the
    /// devices' migration data, hot-plug (`add-device` connects a device server and sets
    /// its device up here: `seccomp` for the filter of the static-map threads it starts,
    /// which only narrows theirs, and `timerfd_create` for a `dma=fault` device's
    /// page-request timer). An incoming migration or a restore runs on a `migration` thread
    /// under the same list.
    pub const API: Filter = Filter {
        syscalls: &[
            IO,
            FILES,
            CONNECT,
            SERVE,
            THREADS,
            sys![
                SYS_tgkill,
                SYS_sched_getaffinity,
                SYS_seccomp,
                SYS_timerfd_create
            ],
        ],
        ioctls: KVM_AND_VFIO,
    };

    /// A thread that populates guest RAM and maps it for a device before the guest runs
    /// (`madvise`, in [`COMMON`](super::COMMON)), through vfio-user messages or VFIO ioctls.
    pub const STATIC_MAP: Filter = Filter {
        syscalls: &[IO],
        ioctls: Ioctls::Only {
            requests: &[ioctls::descriptors],
            types: &[VFIO_TYPE],
        },
    };

    /// The virtio-iommu's request thread: the requests' host calls (vfio-user and vhost-user
    /// messages; VFIO's and iommufd's `ioctl`s), its queue's notification eventfd, the
    /// guest's interrupt.
    pub const VIOMMU: Filter = Filter {
        syscalls: &[IO],
        ioctls: Ioctls::Only {
            requests: &[ioctls::descriptors],
            types: &[VFIO_TYPE],
        },
    };

    /// A vhost-user device's back-end channel thread: IOTLB misses and updates, hang-ups,
    /// reconnection (a new socket, the memory table and rings sent again). `ioctl`:
    /// descriptor flags only.
    pub const VHOST_USER: Filter = Filter {
        syscalls: &[IO, CONNECT],
        ioctls: Ioctls::Only {
            requests: &[ioctls::descriptors],
            types: &[],
        },
    };

    /// The main thread during set-up, from the command line parsed to the event loop, and
    /// so every thread it starts (each then narrows it with its own list: stacked filters
    /// allow only what both allow, so every other list must be within this one,
    /// `every_list_is_within_set_up`). Beyond the other lists: building the VM and its
    /// memory (`memfd_create`, KVM's `ioctl`s, `mincore` for what a static map populated),
    /// the event loop (`epoll_create1`, `timerfd_create`), the API socket's mode (`chmod`),
    /// signal handlers, thread stacks (`prlimit64`), and the threads' own filters
    /// (`seccomp`).
    pub const SETUP: Filter = Filter {
        syscalls: &[
            IO,
            FILES,
            CONNECT,
            SERVE,
            THREADS,
            sys![
                SYS_dup3,
                SYS_tgkill,
                SYS_sched_getaffinity,
                SYS_wait4,
                SYS_timerfd_create,
                SYS_timerfd_settime,
                SYS_epoll_create1,
                SYS_memfd_create,
                SYS_mincore,
                SYS_chmod,
                SYS_fchmod,
                SYS_fchmodat,
                SYS_prlimit64,
                SYS_rt_sigaction,
                SYS_seccomp,
            ],
        ],
        ioctls: Ioctls::Only {
            requests: &[ioctls::descriptors, ioctls::vm, ioctls::vcpu],
            types: &[VFIO_TYPE],
        },
    };

    /// The `ioctl`s of the main thread and the API's: KVM's that [`ioctls::vm`] lists (the
    /// VM's memory slots, dirty logs, interrupts; a restore's vCPU state), VFIO's and
    /// iommufd's (host mappings, dirty tracking, device migration) whole, and descriptor
    /// flags.
    const KVM_AND_VFIO: Ioctls = Ioctls::Only {
        requests: &[ioctls::descriptors, ioctls::vm],
        types: &[VFIO_TYPE],
    };
}
