//! VM lifecycle: create the KVM VM, guest RAM and devices, load the kernel, run the vCPUs and
//! the event loop until the guest powers off, resets or fails.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boot::layout;
use boot::quirks::{FallbackStats, HostQuirks};
use devices::bus::Bus;
use devices::exit::{ExitReason, VmExit};
use devices::legacy::{AcpiPowerButton, I8042Reset, Serial, SerialOutput, TestExit};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::cli::{Cli, IncomingArg, SerialArg};
use crate::device_manager::DeviceManager;
use crate::error::VmmError;
use crate::memory::GuestRam;
use crate::migration::api::{ApiTarget, IncomingRequest};
use crate::migration::{self, Lifecycle, Machine, MachineConfig, Source};
use crate::vcpu::{self, VcpuContext};
use devices::passthrough::vfio_user_backend::SharedRam;

/// Address of the TSS KVM needs below 4 GiB on Intel hosts (three pages).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The KVM device: `/dev/kvm`, or `$VMM_KVM_DEVICE` when set (tests use it to simulate a
/// host without KVM).
fn kvm_device_path() -> std::ffi::CString {
    let path = std::env::var_os("VMM_KVM_DEVICE").unwrap_or_else(|| "/dev/kvm".into());
    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .unwrap_or_else(|_| c"/dev/kvm".to_owned())
}

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

/// A configured VM, ready to run.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    devices: DeviceManager,
    ram: GuestRam,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<VmExit>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    quirks: HostQuirks,
    started: Instant,
    serial: Arc<Mutex<Serial>>,
    msr_indices: Vec<u32>,
    config: MachineConfig,
    incoming: Option<IncomingArg>,
    restore: Option<std::path::PathBuf>,
    api_socket: Option<std::path::PathBuf>,
    dirty_log_out: Option<std::path::PathBuf>,
}

fn dev_err<E: std::error::Error + Send + Sync + 'static>(
    what: &str,
) -> impl FnOnce(E) -> VmmError + '_ {
    move |e| VmmError::Device(what.to_string(), Box::new(e))
}

impl Vm {
    /// Builds the VM described by `cli`.
    ///
    /// # Errors
    /// Any [`VmmError`]: KVM missing, memory out of bounds, a bad kernel or initramfs.
    pub fn new(cli: &Cli) -> Result<Self, VmmError> {
        let started = Instant::now();
        let quirks = cli.host_quirks.resolve();
        let kvm_path = kvm_device_path();
        let kvm = Kvm::new_with_path(kvm_path.as_c_str())
            .map_err(|e| VmmError::KvmOpen(kvm_path.to_string_lossy().into_owned(), e))?;
        let ram = GuestRam::new(cli.memory.size, cli.memory.hugepages)?;

        let vm_fd = kvm
            .create_vm()
            .map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;
        for (slot, (gpa, size, hva, _)) in ram.regions().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: hva,
                flags: 0,
            };
            // SAFETY: the HVA range is a live mapping owned by `ram`, which outlives the VM
            // (both are fields of `Vm`, and KVM drops the slot when the VM fd closes).
            unsafe { vm_fd.set_user_memory_region(region) }
                .map_err(|e| VmmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        let exit = Arc::new(VmExit::new().map_err(|e| VmmError::Io("eventfd".into(), e))?);
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());

        // Legacy devices.
        let serial_out = match &cli.serial {
            SerialArg::Stdout => SerialOutput::Stdout,
            SerialArg::Off => SerialOutput::Sink,
            SerialArg::File(p) => SerialOutput::file(p).map_err(|e| {
                VmmError::Io(format!("cannot create serial file {}", p.display()), e)
            })?,
        };
        let serial_irq =
            EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Io("eventfd".into(), e))?;
        vm_fd
            .register_irqfd(&serial_irq, layout::SERIAL_GSI)
            .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_out)));
        pio.insert(serial.clone(), u64::from(layout::SERIAL_PORT), 8)
            .map_err(dev_err("the serial port"))?;
        pio.insert(
            Arc::new(Mutex::new(I8042Reset::new(exit.clone()))),
            u64::from(layout::I8042_PORT),
            5,
        )
        .map_err(dev_err("the i8042"))?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPowerButton::new(exit.clone()))),
            u64::from(layout::ACPI_SLEEP_STATUS_PORT),
            3,
        )
        .map_err(dev_err("the ACPI power registers"))?;
        pio.insert(
            Arc::new(Mutex::new(TestExit::new(exit.clone()))),
            u64::from(layout::TEST_EXIT_PORT),
            4,
        )
        .map_err(dev_err("the test-exit port"))?;

        let vm_fd = Arc::new(vm_fd);
        let shared = SharedRam {
            memfd: ram.memfd.clone(),
            ranges: ram
                .regions()
                .iter()
                .map(|&(gpa, len, _, off)| (gpa, len, off))
                .collect(),
        };
        let devices = DeviceManager::new(
            cli,
            vm_fd.clone(),
            ram.mem.clone(),
            shared,
            ram.size,
            &pio,
            &mmio,
        )?;
        let rsdp = boot::acpi::write_acpi_tables(ram.mem.as_ref(), &devices.platform)?;
        if cli.track_dirty {
            for name in devices.start_dirty_tracking() {
                log::warn!("{name} cannot report the pages it writes: all count as dirty");
            }
        }

        let incoming = cli.incoming.is_some() || cli.restore.is_some();
        let entry = match (&cli.kernel, incoming) {
            (Some(k), false) => Some(Self::load(cli, &ram, k, rsdp, quirks)?),
            _ => None,
        };

        let mut vcpus = Vec::new();
        for id in 0..cli.cpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
            boot::cpu::configure_vcpu(&kvm, &vcpu, id, cli.cpus)?;
            if let (0, Some(entry)) = (id, entry) {
                boot::cpu::setup_boot_vcpu(ram.mem.as_ref(), &vcpu, entry)?;
            }
            vcpus.push(vcpu);
        }
        let config = MachineConfig {
            memory: ram.size,
            cpus: cli.cpus,
            functions: devices
                .functions
                .iter()
                .map(|(slot, name, _)| (*slot, crate::migration::kind_of(name)))
                .collect(),
        };

        log::info!(
            "VM built in {} ms ({} MiB of RAM)",
            started.elapsed().as_millis(),
            ram.size >> 20
        );
        Ok(Self {
            vm_fd,
            devices,
            ram,
            pio,
            mmio,
            exit,
            vcpus,
            quirks,
            started,
            serial,
            msr_indices: crate::migration::kvm_state::saveable_msrs(&kvm),
            config,
            incoming: cli.incoming.clone(),
            restore: cli.restore.clone(),
            api_socket: cli.api_socket.clone(),
            dirty_log_out: cli.dirty_log_out.clone(),
        })
    }

    /// Loads the kernel, initramfs, command line and boot parameters; returns the entry.
    fn load(
        cli: &Cli,
        ram: &GuestRam,
        kernel_path: &std::path::Path,
        rsdp: u64,
        quirks: HostQuirks,
    ) -> Result<vm_memory::GuestAddress, VmmError> {
        let mem = ram.mem.as_ref();
        let kernel = boot::loader::load_kernel(mem, ram.size, kernel_path)?;
        let initramfs = match &cli.initramfs {
            Some(p) => Some(boot::loader::load_initramfs(mem, ram.size, &kernel, p)?),
            None => None,
        };
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE)
            .map_err(|e| VmmError::Boot(boot::BootError::CmdlineBuild(e)))?;
        cmdline
            .insert_str(&cli.cmdline)
            .map_err(|e| VmmError::Boot(boot::BootError::CmdlineBuild(e)))?;
        for extra in quirks.cmdline_additions() {
            cmdline
                .insert_str(extra)
                .map_err(|e| VmmError::Boot(boot::BootError::CmdlineBuild(e)))?;
        }
        boot::loader::write_boot_params(
            mem,
            ram.size,
            &kernel,
            initramfs.as_ref(),
            &cmdline,
            Some(rsdp),
        )?;
        log::info!(
            "loaded {:?} kernel, entry {:#x}; host quirks: {quirks}; cmdline: {}",
            kernel.format,
            kernel.entry.0,
            cmdline
                .as_cstring()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        Ok(kernel.entry)
    }

    /// Runs the guest until it ends. Returns why, with the fallback statistics.
    ///
    /// # Errors
    /// When a vCPU thread or the event loop cannot be started.
    pub fn run(self) -> Result<RunSummary, VmmError> {
        vcpu::install_kick_handler().map_err(|e| VmmError::Io("signal handler".into(), e))?;
        let ctx = Arc::new(VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            exit: self.exit.clone(),
            stop: Default::default(),
            mem: self.ram.mem.clone(),
            quirks: self.quirks,
            pause: Default::default(),
            msr_indices: self.msr_indices.clone(),
            xsave_size: crate::migration::kvm_state::xsave_size(&self.vm_fd),
        });
        let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| {
                VmmError::Io(
                    "event manager".into(),
                    std::io::Error::other(format!("{e:?}")),
                )
            })?;
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher(self.exit.clone()))));
        for s in &self.devices.subscribers {
            event_manager.add_subscriber(s.clone());
        }
        let vcpus = self.vcpus;
        let machine = Arc::new(Machine {
            vm_fd: self.vm_fd,
            devices: self.devices,
            ram: self.ram,
            exit: self.exit.clone(),
            ctx: ctx.clone(),
            threads: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            serial: self.serial,
            config: self.config,
            lifecycle: Mutex::new(Lifecycle::Running),
            busy: Mutex::new(()),
            progress: Default::default(),
        });
        let api = Arc::new(ApiTarget::default());
        if let Some(path) = &self.api_socket {
            migration::api::start(path, api.clone()).map_err(|e| {
                VmmError::Io(format!("cannot serve the API on {}", path.display()), e)
            })?;
        }

        // A guest from elsewhere: restored before any vCPU runs.
        let source = match (&self.incoming, &self.restore) {
            (_, Some(dir)) => Some(Source::Snapshot(dir.clone())),
            (Some(IncomingArg::Listen(a)), _) => Some(Source::Listen(a.clone())),
            (Some(IncomingArg::Defer), _) => {
                let (tx, rx) = std::sync::mpsc::channel::<IncomingRequest>();
                *api.incoming.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
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
                            let _ = reply.send(Err(e.to_string()));
                        }
                    }
                }
                *api.incoming.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
            None => self.incoming.is_some(),
        };

        if restored {
            // Devices run again before any vCPU does: a guest must never find its
            // passthrough devices stopped. A device that cannot is a failed restore.
            for p in &machine.devices.passthrough {
                let r = p
                    .backend
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_migration_state(migration::device_state::RUNNING);
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
            let mut threads = machine.threads.lock().unwrap_or_else(|e| e.into_inner());
            let mut requests = machine.requests.lock().unwrap_or_else(|e| e.into_inner());
            for (id, vcpu) in vcpus.into_iter().enumerate() {
                let (tx, rx) = std::sync::mpsc::channel();
                let t = vcpu::spawn(id as u8, vcpu, ctx.clone(), rx)
                    .map_err(|e| VmmError::Io("cannot start a vCPU thread".into(), e))?;
                threads.push(t);
                requests.push(tx);
            }
        }
        *api.machine.lock().unwrap_or_else(|e| e.into_inner()) = Some(machine.clone());

        // Set up: from here on the main thread runs the event loop, confined.
        devices::seccomp::confine("vmm", devices::seccomp::lists::VMM_MAIN);
        while self.exit.reason().is_none() {
            if let Err(e) = event_manager.run_with_timeout(1000) {
                log::warn!("event loop: {e:?}");
            }
        }
        let reason = self.exit.reason().unwrap_or(ExitReason::Stopped);
        *api.machine.lock().unwrap_or_else(|e| e.into_inner()) = None;

        ctx.stop.store(true, Ordering::Release);
        ctx.pause.resume();
        let threads =
            std::mem::take(&mut *machine.threads.lock().unwrap_or_else(|e| e.into_inner()));
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
        if let Some(path) = &self.dirty_log_out {
            if let Err(e) = machine.devices.write_dirty_log(path) {
                log::error!("cannot write the dirty log to {}: {e}", path.display());
            }
        }
        Ok(RunSummary {
            reason,
            fallbacks,
            wall: self.started.elapsed(),
            counters,
        })
    }
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
