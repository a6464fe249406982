//! The vCPU threads: `KVM_RUN` in a loop, exits dispatched to the buses, host-quirk fallbacks
//! for instructions KVM's emulator refuses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boot::quirks::{self, FallbackStats, HostQuirks};
use devices::bus::Bus;
use devices::exit::{ExitReason, VmExit};
use devices::GuestMemoryMmap;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use sync::{CondvarExt, MutexExt};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::kvm_state::{KvmStateError, VcpuState};

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for [`kick_signal`] (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What every vCPU thread shares.
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where to report the end of the VM.
    pub exit: Arc<VmExit>,
    /// Set to make vCPU threads return.
    pub stop: AtomicBool,
    /// Guest memory (to read instruction bytes for the fallback).
    pub mem: Arc<GuestMemoryMmap>,
    /// Host quirks in force.
    pub quirks: HostQuirks,
    /// Pausing and resuming.
    pub pause: PauseControl,
    /// MSRs to save with the vCPU state.
    pub msr_indices: Vec<u32>,
    /// Bytes of the host's XSAVE area (0: no XSAVE).
    pub xsave_size: usize,
}

/// What a parked vCPU thread can be asked to do.
pub enum ParkedRequest {
    /// Save the vCPU's state.
    Save(Sender<Result<VcpuState, KvmStateError>>),
}

/// Parks vCPU threads (out of `KVM_RUN`, their pending I/O completed) and resumes them.
#[derive(Default)]
pub struct PauseControl {
    requested: AtomicBool,
    /// Number of parked threads.
    parked: Mutex<usize>,
    changed: Condvar,
}

impl PauseControl {
    /// Whether a pause is requested.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Asks every vCPU thread to park and waits until `count` are parked (kicking them out
    /// of `KVM_RUN` with [`kick_signal`]). Returns false when the VM ended meanwhile.
    pub fn pause<T: Killable>(&self, threads: &[T], count: usize, stop: &AtomicBool) -> bool {
        self.requested.store(true, Ordering::Release);
        let mut parked = self.parked.locked();
        while *parked < count {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            for t in threads {
                let _ = t.kill(kick_signal());
            }
            parked = self
                .changed
                .wait_timeout_locked(parked, Duration::from_millis(1))
                .0;
        }
        true
    }

    /// Lets parked threads run again.
    pub fn resume(&self) {
        self.requested.store(false, Ordering::Release);
        let _g = self.parked.locked();
        self.changed.notify_all();
    }

    fn park(&self, vcpu: &mut VcpuFd, ctx: &VcpuContext, requests: &Receiver<ParkedRequest>) {
        // Complete the instruction of the last exit (an MMIO or port read's value is only
        // stored into the guest by the next KVM_RUN) without running the guest further.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
        let mut parked = self.parked.locked();
        *parked += 1;
        self.changed.notify_all();
        while self.requested() && !ctx.stop.load(Ordering::Acquire) {
            drop(parked);
            while let Ok(r) = requests.try_recv() {
                match r {
                    ParkedRequest::Save(reply) => {
                        let _ = reply.send(VcpuState::save(vcpu, &ctx.msr_indices, ctx.xsave_size));
                    }
                }
            }
            parked = self.parked.locked();
            parked = self
                .changed
                .wait_timeout_locked(parked, Duration::from_millis(1))
                .0;
        }
        *parked -= 1;
    }
}

enum Action {
    Continue,
    Exit(ExitReason),
    EmulationFailure,
}

/// Runs vCPU `id` until the VM ends; returns its fallback statistics.
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    ctx: Arc<VcpuContext>,
    requests: Receiver<ParkedRequest>,
) -> std::io::Result<JoinHandle<FallbackStats>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            devices::seccomp::confine("vcpu", devices::seccomp::lists::VCPU);
            let mut stats = FallbackStats::default();
            while !ctx.stop.load(Ordering::Acquire) {
                if ctx.pause.requested() {
                    ctx.pause.park(&mut vcpu, &ctx, &requests);
                    continue;
                }
                let action = match vcpu.run() {
                    Ok(exit) => handle_exit(&ctx, exit),
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                        Action::Continue
                    }
                    Err(e) => {
                        Action::Exit(ExitReason::Error(format!("vCPU {id}: KVM_RUN failed: {e}")))
                    }
                };
                let action = match action {
                    Action::EmulationFailure => emulation_failure(id, &mut vcpu, &ctx, &mut stats),
                    a => a,
                };
                if let Action::Exit(reason) = action {
                    ctx.exit.request(reason);
                    break;
                }
            }
            stats
        })
}

fn handle_exit(ctx: &VcpuContext, exit: VcpuExit<'_>) -> Action {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
                log::trace!("unhandled PIO read {port:#x}");
            }
            Action::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(u64::from(port), data) {
                log::trace!("unhandled PIO write {port:#x}");
            }
            Action::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                data.fill(0xff);
                log::debug!("unhandled MMIO read {addr:#x}");
            }
            Action::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                log::debug!("unhandled MMIO write {addr:#x}");
            }
            Action::Continue
        }
        VcpuExit::Hlt => Action::Exit(ExitReason::PowerOff),
        VcpuExit::Shutdown => Action::Exit(ExitReason::Error(
            "the guest triple-faulted (KVM_EXIT_SHUTDOWN)".into(),
        )),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => Action::Exit(ExitReason::PowerOff),
            KVM_SYSTEM_EVENT_RESET => Action::Exit(ExitReason::Reset),
            KVM_SYSTEM_EVENT_CRASH => Action::Exit(ExitReason::Error("the guest crashed".into())),
            other => Action::Exit(ExitReason::Error(format!(
                "unexpected KVM system event {other}"
            ))),
        },
        VcpuExit::InternalError => Action::EmulationFailure,
        VcpuExit::FailEntry(reason, cpu) => Action::Exit(ExitReason::Error(format!(
            "KVM could not enter the guest on CPU {cpu} (hardware reason {reason:#x})"
        ))),
        VcpuExit::Intr => Action::Continue,
        other => Action::Exit(ExitReason::Error(format!("unexpected vCPU exit {other:?}"))),
    }
}

fn emulation_failure(
    id: u8,
    vcpu: &mut VcpuFd,
    ctx: &VcpuContext,
    stats: &mut FallbackStats,
) -> Action {
    let start = Instant::now();
    // SAFETY-free copy: the run structure is plain data.
    let run = *vcpu.get_kvm_run();
    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, whose payload is `internal`.
    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
    let failure = match quirks::emulation_failure(&run, vcpu, ctx.mem.as_ref()) {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Action::Exit(ExitReason::Error(format!(
                "vCPU {id}: KVM internal error (suberror {suberror})"
            )))
        }
        Err(e) => return Action::Exit(ExitReason::Error(format!("vCPU {id}: {e}"))),
    };
    if !ctx.quirks.emulation_fallback() {
        return Action::Exit(ExitReason::Error(format!(
            "vCPU {id}: KVM cannot emulate the guest instruction `{}` (bytes {}) at RIP {:#x} \
             (host quirks are off)",
            failure.disassembly(),
            failure.hex(),
            failure.rip
        )));
    }
    let result = quirks::classify(&failure).and_then(|(fb, len)| {
        quirks::apply(vcpu, &failure, fb, len)?;
        Ok(fb)
    });
    match result {
        Ok(fb) => {
            log::debug!("vCPU {id}: fallback {} at {:#x}", fb.name(), failure.rip);
            *stats.counts.entry(fb).or_default() += 1;
            stats.time += start.elapsed();
            Action::Continue
        }
        Err(e) => Action::Exit(ExitReason::Error(format!("vCPU {id}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A port device answering reads with `0x5a` and recording writes.
    #[derive(Default)]
    struct Port {
        written: Vec<(u64, Vec<u8>)>,
    }

    impl devices::bus::BusDevice for Port {
        fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
            self.written.push((offset, data.to_vec()));
        }
    }

    fn context() -> (VcpuContext, Arc<Mutex<Port>>) {
        let port = Arc::new(Mutex::new(Port::default()));
        let pio = Bus::new();
        pio.insert(port.clone(), 0x3f8, 8).unwrap();
        let mmio = Bus::new();
        mmio.insert(port.clone(), 0xd000_0000, 0x1000).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit: Arc::new(VmExit::new().unwrap()),
            stop: AtomicBool::new(false),
            mem: Arc::new(mem),
            quirks: HostQuirks::None,
            pause: PauseControl::default(),
            msr_indices: Vec::new(),
            xsave_size: 0,
        };
        (ctx, port)
    }

    /// What an action says, comparable.
    fn outcome(a: Action) -> Result<(), Option<ExitReason>> {
        match a {
            Action::Continue => Ok(()),
            Action::Exit(r) => Err(Some(r)),
            Action::EmulationFailure => Err(None),
        }
    }

    fn error_containing(a: Action, needle: &str) {
        match outcome(a) {
            Err(Some(ExitReason::Error(e))) => assert!(e.contains(needle), "{e}"),
            other => panic!("{other:?}, expected an error with {needle:?}"),
        }
    }

    /// Port and MMIO exits reach the device at their offset; reads nobody serves read as
    /// all ones, writes nobody serves are dropped; the guest runs on either way.
    #[test]
    fn io_exits_go_to_the_buses_and_unserved_reads_read_ones() {
        let (ctx, port) = context();
        let mut data = [0u8; 2];
        assert_eq!(
            outcome(handle_exit(&ctx, VcpuExit::IoIn(0x3f9, &mut data))),
            Ok(())
        );
        assert_eq!(data, [0x5a, 0x5a]);
        let mut data = [0u8; 4];
        assert_eq!(
            outcome(handle_exit(&ctx, VcpuExit::IoIn(0x80, &mut data))),
            Ok(())
        );
        assert_eq!(data, [0xff; 4]);
        let mut data = [0u8; 8];
        let read = VcpuExit::MmioRead(0xd000_0010, &mut data);
        assert_eq!(outcome(handle_exit(&ctx, read)), Ok(()));
        assert_eq!(data, [0x5a; 8]);
        let mut data = [0u8; 4];
        let read = VcpuExit::MmioRead(0xe000_0000, &mut data);
        assert_eq!(outcome(handle_exit(&ctx, read)), Ok(()));
        assert_eq!(data, [0xff; 4]);
        for exit in [
            VcpuExit::IoOut(0x3fb, &[1]),
            VcpuExit::IoOut(0x80, &[2]),
            VcpuExit::MmioWrite(0xd000_0020, &[3, 4]),
            VcpuExit::MmioWrite(0xe000_0000, &[5]),
        ] {
            assert_eq!(outcome(handle_exit(&ctx, exit)), Ok(()));
        }
        assert_eq!(
            port.lock().unwrap().written,
            vec![(3, vec![1]), (0x20, vec![3, 4])]
        );
    }

    /// How each exit that ends or stops the guest is reported (KVM's `kvm_run` exit
    /// reasons and system events, linux/kvm.h).
    #[test]
    fn exits_that_end_the_guest_say_why() {
        let (ctx, _) = context();
        let h = |e| outcome(handle_exit(&ctx, e));
        assert_eq!(h(VcpuExit::Hlt), Err(Some(ExitReason::PowerOff)));
        assert_eq!(
            h(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[])),
            Err(Some(ExitReason::PowerOff))
        );
        assert_eq!(
            h(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[])),
            Err(Some(ExitReason::Reset))
        );
        assert_eq!(
            h(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[])),
            Err(Some(ExitReason::Error("the guest crashed".into())))
        );
        error_containing(
            handle_exit(&ctx, VcpuExit::SystemEvent(99, &[])),
            "unexpected KVM system event 99",
        );
        error_containing(handle_exit(&ctx, VcpuExit::Shutdown), "triple-faulted");
        error_containing(
            handle_exit(&ctx, VcpuExit::FailEntry(0x21, 3)),
            "could not enter the guest on CPU 3 (hardware reason 0x21)",
        );
        error_containing(
            handle_exit(&ctx, VcpuExit::Debug(Default::default())),
            "unexpected vCPU exit",
        );
        // An emulation failure goes to the fallback; a signal's exit just runs again.
        assert_eq!(h(VcpuExit::InternalError), Err(None));
        assert_eq!(h(VcpuExit::Intr), Ok(()));
    }

    /// A thread that `kill` only counts (a vCPU thread's kick).
    struct Kicked(Arc<AtomicUsize>);

    // SAFETY: `kill` is overridden, so the handle is never used.
    unsafe impl Killable for Kicked {
        fn pthread_handle(&self) -> libc::pthread_t {
            unreachable!("kill is overridden")
        }
        fn kill(&self, num: libc::c_int) -> vmm_sys_util::errno::Result<()> {
            assert_eq!(num, kick_signal());
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// `pause` asks, kicks the threads until all of them parked, and then returns true;
    /// `resume` withdraws the request. A VM that ends meanwhile ends the wait (false).
    #[test]
    fn pause_kicks_until_every_thread_parked_and_resume_lets_them_go() {
        let pause = Arc::new(PauseControl::default());
        let kicks = Arc::new(AtomicUsize::new(0));
        let stop = AtomicBool::new(false);
        // Two "vCPU threads" that park once they were kicked (as KVM_RUN returns on the
        // signal), then wait for the resume.
        let parkers: Vec<_> = (0..2)
            .map(|_| {
                let (pause, kicks) = (pause.clone(), kicks.clone());
                std::thread::spawn(move || {
                    while !pause.requested() || kicks.load(Ordering::SeqCst) == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    *pause.parked.locked() += 1;
                    pause.changed.notify_all();
                    while pause.requested() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    *pause.parked.locked() -= 1;
                })
            })
            .collect();
        let threads = [Kicked(kicks.clone()), Kicked(kicks.clone())];
        assert!(!pause.requested());
        assert!(pause.pause(&threads, 2, &stop));
        assert!(pause.requested());
        assert_eq!(*pause.parked.locked(), 2);
        assert!(kicks.load(Ordering::SeqCst) >= 2);
        pause.resume();
        assert!(!pause.requested());
        for p in parkers {
            p.join().unwrap();
        }
        assert_eq!(*pause.parked.locked(), 0);

        // Nobody parks, and the VM ends: the wait ends with false.
        let stop = AtomicBool::new(true);
        assert!(!pause.pause(&threads, 1, &stop));
        pause.resume();
    }
}
