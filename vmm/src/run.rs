//! Runs a built VM: serves the control API, takes in a guest from a snapshot or a migration
//! if asked, starts the vCPUs and runs the event loop on the main thread until the guest
//! powers off, resets, fails or migrates away.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boot::quirks::FallbackStats;
use devices::exit::{ExitReason, VmExit};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use sync::{MutexExt, RwLockExt};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::signal::Killable;

use crate::api::{self, ApiTarget, IncomingRequest};
use crate::build::Vm;
use crate::config::IncomingConfig;
use crate::error::VmmError;
use crate::machine::vcpu::{self, VcpuContext};
use crate::machine::{self, Lifecycle, Machine};
use crate::migration::{self, Source};

/// What a finished run reports.
pub struct RunSummary {
    /// Why the VM ended.
    pub reason: ExitReason,
    /// Emulation fallbacks over all vCPUs.
    pub fallbacks: FallbackStats,
    /// Wall time from VM creation to exit.
    pub wall: Duration,
    /// Per-device counter lines.
    pub counters: Vec<String>,
}

/// Runs the guest `vm` until it ends. Returns why, with the fallback statistics.
///
/// # Errors
/// When a vCPU thread or the event loop cannot be started.
pub fn run(vm: Vm) -> Result<RunSummary, VmmError> {
    vcpu::install_kick_handler().map_err(|e| VmmError::Io("signal handler".into(), e))?;
    let mut vm = vm;
    let (api_socket, incoming, restore) =
        (vm.api_socket.take(), vm.incoming.take(), vm.restore.take());
    let (dirty_log_out, started) = (vm.dirty_log_out.take(), vm.started);
    let (machine, vcpus) = assemble(vm);
    let ctx = machine.ctx.clone();
    let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| {
            VmmError::Io(
                "event manager".into(),
                std::io::Error::other(format!("{e:?}")),
            )
        })?;
    event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher(machine.exit.clone()))));
    for s in &machine.devices.subscribers {
        event_manager.add_subscriber(s.clone());
    }
    if let Some(h) = &machine.hotplug {
        h.start(&mut event_manager);
    }
    let api = Arc::new(ApiTarget::default());
    if let Some(path) = &api_socket {
        api::start(path, api.clone())
            .map_err(|e| VmmError::Io(format!("cannot serve the API on {}", path.display()), e))?;
    }

    // A guest from elsewhere: restored before any vCPU runs.
    let source = match (&incoming, &restore) {
        (_, Some(dir)) => Some(Source::Snapshot(dir.clone())),
        (Some(IncomingConfig::Listen(a)), _) => Some(Source::Listen(a.clone())),
        (Some(IncomingConfig::Defer), _) => {
            let (tx, rx) = std::sync::mpsc::channel::<IncomingRequest>();
            *api.incoming.locked() = Some(tx);
            log::info!("waiting for a guest: the API's restore or receive");
            loop {
                let Ok((src, reply)) = rx.recv() else {
                    return Err(VmmError::Migration("the API went away".into()));
                };
                match receive_confined(&machine, &vcpus, &src, api.as_ref()) {
                    Ok(()) => {
                        let _ = reply.send(Ok(()));
                        break;
                    }
                    Err(e) => {
                        log::error!("{e}");
                        let _ = reply.send(Err(e));
                    }
                }
            }
            *api.incoming.locked() = None;
            None
        }
        (None, None) => None,
    };
    let restored = match &source {
        Some(src) => {
            receive_confined(&machine, &vcpus, src, api.as_ref())
                .map_err(|e| VmmError::Migration(e.to_string()))?;
            true
        }
        None => incoming.is_some(),
    };

    if restored {
        // Devices run again before any vCPU does: a guest must never find its
        // passthrough devices stopped. A device that cannot is a failed restore.
        for p in machine.devices.passthrough.read_locked().iter() {
            let r = p
                .backend
                .locked()
                .set_migration_state(machine::device_state::RUNNING);
            if let Err(e) = r {
                return Err(VmmError::Migration(format!(
                    "{}: cannot be put back in RUNNING after the restore: {e}",
                    p.label
                )));
            }
        }
        machine.kick_queues();
    }
    {
        let mut threads = machine.threads.locked();
        let mut requests = machine.requests.locked();
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            let t = vcpu::spawn(id as u8, vcpu, ctx.clone(), rx)
                .map_err(|e| VmmError::Io("cannot start a vCPU thread".into(), e))?;
            threads.push(t);
            requests.push(tx);
        }
    }
    *api.machine.locked() = Some(machine.clone());

    // Set up: from here on the main thread runs the event loop, confined.
    devices::seccomp::confine("vmm", devices::seccomp::lists::VMM_MAIN);
    while machine.exit.reason().is_none() {
        if let Err(e) = event_manager.run_with_timeout(1000) {
            log::warn!("event loop: {e:?}");
        }
    }
    let reason = machine.exit.reason().unwrap_or(ExitReason::Stopped);
    *api.machine.locked() = None;

    ctx.stop.store(true, Ordering::Release);
    ctx.pause.resume();
    let threads = std::mem::take(&mut *machine.threads.locked());
    let mut fallbacks = FallbackStats::default();
    for t in threads {
        while !t.is_finished() {
            let _ = t.kill(vcpu::kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Ok(stats) = t.join() {
            fallbacks.merge(&stats);
        }
    }
    let counters = if matches!(reason, ExitReason::Migrated(_)) {
        Vec::new()
    } else {
        machine.devices.counters_report()
    };
    if let Some(path) = &dirty_log_out {
        if let Err(e) = machine.devices.write_dirty_log(path) {
            log::error!("cannot write the dirty log to {}: {e}", path.display());
        }
    }
    Ok(RunSummary {
        reason,
        fallbacks,
        wall: started.elapsed(),
        counters,
    })
}

/// The [`Machine`] a built `vm` becomes, shared by the event loop, the control API and
/// migration, with the vCPUs it has yet to start (in id order). Nothing runs yet.
pub fn assemble(vm: Vm) -> (Arc<Machine>, Vec<kvm_ioctls::VcpuFd>) {
    let ctx = Arc::new(VcpuContext {
        pio: vm.pio.clone(),
        mmio: vm.mmio.clone(),
        exit: vm.exit.clone(),
        stop: Default::default(),
        mem: vm.ram.mem.clone(),
        quirks: vm.quirks,
        pause: Default::default(),
        msr_indices: vm.msr_indices.clone(),
        xsave_size: crate::machine::kvm_state::xsave_size(&vm.vm_fd),
    });
    let machine = Arc::new(Machine {
        vm_fd: vm.vm_fd,
        devices: vm.devices,
        hotplug: vm.hotplug,
        ram: vm.ram,
        exit: vm.exit,
        ctx,
        threads: Mutex::new(Vec::new()),
        requests: Mutex::new(Vec::new()),
        serial: vm.serial,
        config: vm.config,
        lifecycle: Mutex::new(Lifecycle::Running),
        busy: Mutex::new(()),
        progress: Default::default(),
    });
    (machine, vm.vcpus)
}

/// Wakes the event loop when the VM is asked to end.
struct ExitWatcher(Arc<VmExit>);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            log::error!("cannot watch the exit eventfd: {e:?}");
        }
        let _ = self.0.eventfd().as_raw_fd();
    }
}

/// [`migration::receive`] on a thread of its own under the migration filter: the stream is
/// untrusted input, and the main thread is not confined until its event loop starts.
fn receive_confined(
    machine: &Machine,
    vcpus: &[kvm_ioctls::VcpuFd],
    src: &migration::Source,
    api: &ApiTarget,
) -> Result<(), migration::MigrationError> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("migration".into())
            .spawn_scoped(s, || {
                devices::seccomp::confine("migration", devices::seccomp::lists::API);
                migration::receive(machine, vcpus, src, api)
            })
            .map_err(|e| {
                migration::MigrationError::Transport("cannot start the migration thread".into(), e)
            })?
            .join()
            .map_err(|_| migration::MigrationError::State("the migration thread panicked".into()))?
    })
}
