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
mod tests;
