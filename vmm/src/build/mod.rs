//! Turns a [`VmConfig`] into a VM ready to run: the KVM VM, guest RAM, the legacy devices,
//! the PCI devices (`devices`, with passthrough set-up in `passthrough` and the static
//! mapping of RAM for devices outside the vIOMMU in `static_map`), the ACPI tables, the
//! kernel and the vCPUs. This is the only code that wires devices; `run` runs what it builds.

pub mod builder;
pub mod devices;
pub mod hotplug;
pub mod passthrough;
pub mod static_map;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ::devices::bus::Bus;
use ::devices::exit::VmExit;
use ::devices::legacy::{AcpiPowerButton, I8042Reset, Serial, SerialOutput, TestExit};
use ::devices::passthrough::vfio_user_backend::SharedRam;
use boot::layout;
use boot::quirks::HostQuirks;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use sync::RwLockExt;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{IncomingConfig, SerialConfig, VmConfig};
use crate::error::VmmError;
use crate::machine::devices::DeviceManager;
use crate::machine::memory::GuestRam;
use crate::machine::MachineConfig;
use devices::build_devices;

/// Address of the TSS KVM needs below 4 GiB on Intel hosts (three pages).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The KVM device: `/dev/kvm`.
#[cfg(not(feature = "test-hooks"))]
fn kvm_device_path() -> std::ffi::CString {
    c"/dev/kvm".to_owned()
}

/// The KVM device: `/dev/kvm`, or `$VMM_KVM_DEVICE` when set (with the cargo feature
/// `test-hooks`: tests use it to simulate a host without KVM).
#[cfg(feature = "test-hooks")]
fn kvm_device_path() -> std::ffi::CString {
    let path = std::env::var_os("VMM_KVM_DEVICE").unwrap_or_else(|| "/dev/kvm".into());
    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .unwrap_or_else(|_| c"/dev/kvm".to_owned())
}

/// A configured VM, ready to run.
pub struct Vm {
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) devices: DeviceManager,
    /// With `--hotplug`: the slots that take devices while the guest runs.
    pub(crate) hotplug: Option<crate::machine::hotplug::Hotplug>,
    pub(crate) ram: GuestRam,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) exit: Arc<VmExit>,
    pub(crate) vcpus: Vec<kvm_ioctls::VcpuFd>,
    pub(crate) quirks: HostQuirks,
    pub(crate) started: Instant,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) msr_indices: Vec<u32>,
    pub(crate) config: MachineConfig,
    pub(crate) incoming: Option<IncomingConfig>,
    pub(crate) restore: Option<std::path::PathBuf>,
    pub(crate) api_socket: Option<std::path::PathBuf>,
    pub(crate) dirty_log_out: Option<std::path::PathBuf>,
}

fn dev_err<E: std::error::Error + Send + Sync + 'static>(
    what: &str,
) -> impl FnOnce(E) -> VmmError + '_ {
    move |e| VmmError::Device(what.to_string(), Box::new(e))
}

impl Vm {
    /// Builds the VM described by `cfg`.
    ///
    /// # Errors
    /// Any [`VmmError`]: KVM missing, memory out of bounds, a bad kernel or initramfs.
    pub fn new(cfg: &VmConfig) -> Result<Self, VmmError> {
        let started = Instant::now();
        let quirks = cfg.host_quirks.resolve();
        let kvm_path = kvm_device_path();
        let kvm = Kvm::new_with_path(kvm_path.as_c_str())
            .map_err(|e| VmmError::KvmOpen(kvm_path.to_string_lossy().into_owned(), e))?;
        let ram = GuestRam::new(cfg.memory.size, cfg.memory.hugepages)?;

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
        let serial_out = match &cfg.serial {
            SerialConfig::Stdout => SerialOutput::Stdout,
            SerialConfig::Off => SerialOutput::Sink,
            SerialConfig::File(p) => SerialOutput::file(p).map_err(|e| {
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
        let (devices, hotplug) = build_devices(
            cfg,
            vm_fd.clone(),
            ram.mem.clone(),
            shared,
            ram.size,
            &pio,
            &mmio,
        )?;
        let rsdp = boot::acpi::write_acpi_tables(ram.mem.as_ref(), &devices.platform)?;
        if cfg.track_dirty {
            for name in devices.start_dirty_tracking() {
                log::warn!("{name} cannot report the pages it writes: all count as dirty");
            }
        }

        let incoming = cfg.incoming.is_some() || cfg.restore.is_some();
        let entry = match (&cfg.kernel, incoming) {
            (Some(k), false) => Some(Self::load(cfg, &ram, k, rsdp, quirks)?),
            _ => None,
        };

        let mut vcpus = Vec::new();
        for id in 0..cfg.cpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
            boot::cpu::configure_vcpu(&kvm, &vcpu, id, cfg.cpus)?;
            if let (0, Some(entry)) = (id, entry) {
                boot::cpu::setup_boot_vcpu(ram.mem.as_ref(), &vcpu, entry)?;
            }
            vcpus.push(vcpu);
        }
        let config = MachineConfig {
            memory: ram.size,
            cpus: cfg.cpus,
            functions: devices
                .functions
                .read_locked()
                .iter()
                .map(|f| (f.slot, f.kind))
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
            hotplug,
            ram,
            pio,
            mmio,
            exit,
            vcpus,
            quirks,
            started,
            serial,
            msr_indices: crate::machine::kvm_state::saveable_msrs(&kvm),
            config,
            incoming: cfg.incoming.clone(),
            restore: cfg.restore.clone(),
            api_socket: cfg.api_socket.clone(),
            dirty_log_out: cfg.dirty_log_out.clone(),
        })
    }

    /// Loads the kernel, initramfs, command line and boot parameters; returns the entry.
    fn load(
        cfg: &VmConfig,
        ram: &GuestRam,
        kernel_path: &std::path::Path,
        rsdp: u64,
        quirks: HostQuirks,
    ) -> Result<vm_memory::GuestAddress, VmmError> {
        let mem = ram.mem.as_ref();
        let kernel = boot::loader::load_kernel(mem, ram.size, kernel_path)?;
        let initramfs = match &cfg.initramfs {
            Some(p) => Some(boot::loader::load_initramfs(mem, ram.size, &kernel, p)?),
            None => None,
        };
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE)
            .map_err(|e| VmmError::Boot(boot::BootError::CmdlineBuild(e)))?;
        cmdline
            .insert_str(&cfg.cmdline)
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
}
