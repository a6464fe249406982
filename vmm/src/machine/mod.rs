//! The running VM: the [`Machine`] the event loop, the control API and migration share,
//! what it is made of ([`MachineConfig`]), what it saves ([`MachineState`]), and what can be
//! done to it while it runs: pause and resume the vCPUs, freeze and thaw the device queues,
//! stop and start device DMA, harvest every dirty page (vCPUs through KVM, the VMM's own
//! devices through vm-memory's bitmap, passthrough devices and vhost-user back ends through
//! [`devices::DeviceManager`]).

pub mod devices;
pub mod dirty;
pub mod hotplug;
pub mod interrupts;
pub mod kvm_state;
pub mod memory;
pub mod passthrough;
pub mod vcpu;

use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ::devices::exit::VmExit;
use ::devices::legacy::Serial;
use ::devices::state::Persist;
use boot::quirks::FallbackStats;
use iommu::dirty::DirtyBitmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use sync::{MutexExt, RwLockExt};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use devices::{DeviceKind, DeviceManager};
use kvm_state::{VcpuState, VmState};
use memory::GuestRam;
use vcpu::{ParkedRequest, VcpuContext};

/// Why an operation on the running machine failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Something could not be saved, stopped or changed.
    #[error("{0}")]
    State(String),
    /// The VM is not in a state that allows it.
    #[error("{0}")]
    Busy(String),
}

fn state_err(e: impl std::fmt::Display) -> MachineError {
    MachineError::State(e.to_string())
}

/// Version of [`MachineState`]. 2: each device's state is typed (`FunctionState` by kind,
/// the serial port's `SerialSaved`). Version 1 (untyped JSON per device) is refused by name
/// before anything else of the record is read.
pub const STATE_VERSION: u32 = 2;

/// VFIO migration v2 device states (`enum vfio_device_mig_state`).
pub use ::devices::passthrough::mig_state as device_state;

/// What the VM is made of; the receiver checks it equals its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u8,
    /// `(slot, kind)` of every PCI function.
    pub functions: Vec<(u8, DeviceKind)>,
}

/// Everything but RAM and passthrough device data.
#[derive(Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Per vCPU.
    pub vcpus: Vec<VcpuState>,
    /// Irqchip, PIT, clock.
    pub vm: VmState,
    /// The 16550.
    pub serial: ::devices::legacy::SerialSaved,
    /// `(slot, state)` of every PCI function.
    pub functions: Vec<(u8, ::devices::state::FunctionState)>,
    /// The virtio-iommu's state (domains, endpoints, mappings).
    pub viommu: Option<iommu::viommu::ViommuState>,
}

/// Whether the guest runs or the user paused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// vCPUs run.
    Running,
    /// Paused through the API.
    Paused,
    /// The guest was handed over (COMMIT sent) but the destination did not confirm: it may
    /// run there. Stopped here for good unless the user resumes with `"force":true`.
    HandoverUnconfirmed,
}

/// Dirty pages by where they were found: vCPU writes (KVM's dirty log), the VMM's own
/// device models (vm-memory's bitmap), passthrough devices (their logs, through the vIOMMU
/// or directly), vhost-user back ends (their shared logs, by GPA).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtySources {
    /// From KVM's dirty log.
    pub kvm: u64,
    /// From vm-memory's bitmap.
    pub vmm_devices: u64,
    /// From passthrough devices' dirty logs.
    pub passthrough: u64,
    /// From vhost-user back ends' dirty logs (`VHOST_F_LOG_ALL`).
    #[serde(default)]
    pub vhost_user: u64,
}

impl DirtySources {
    /// Adds `o`'s counts to these.
    pub fn add(&mut self, o: DirtySources) {
        self.kvm += o.kvm;
        self.vmm_devices += o.vmm_devices;
        self.passthrough += o.passthrough;
        self.vhost_user += o.vhost_user;
    }
}

/// The VM, shared by the event loop, the control API and migration.
pub struct Machine {
    /// The KVM VM.
    pub vm_fd: Arc<VmFd>,
    /// PCI devices.
    pub devices: DeviceManager,
    /// Guest RAM.
    pub ram: GuestRam,
    /// Where the end of the VM is requested.
    pub exit: Arc<VmExit>,
    /// What the vCPU threads share.
    pub ctx: Arc<VcpuContext>,
    /// vCPU threads.
    pub threads: Mutex<Vec<JoinHandle<FallbackStats>>>,
    /// Requests to parked vCPU threads.
    pub requests: Mutex<Vec<Sender<ParkedRequest>>>,
    /// The console UART.
    pub serial: Arc<Mutex<Serial>>,
    /// What the VM is made of.
    pub config: MachineConfig,
    /// Running or paused by the user.
    pub lifecycle: Mutex<Lifecycle>,
    /// One snapshot or migration at a time.
    pub busy: Mutex<()>,
    /// Where a running migration is, for the API's `status`.
    pub progress: MigrationProgress,
    /// The slots that take devices while the guest runs (`--hotplug`).
    pub hotplug: Option<hotplug::Hotplug>,
}

/// A migration's progress as `status` shows it while `migrate` runs.
#[derive(Default)]
pub struct MigrationProgress {
    /// Pages sent so far (all rounds).
    pub pages_sent: std::sync::atomic::AtomicU64,
    /// Phase, round, pages to send in this round, dirty pages and rate, estimated downtime.
    pub state: Mutex<Option<ProgressState>>,
}

/// A running migration's progress, as the API's `status` reports it (`"migration"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Phase, round, pages to send in this round, dirty pages and rate, estimated downtime.
    #[serde(flatten)]
    pub progress: ProgressState,
    /// Pages sent so far, all rounds.
    pub pages_sent: u64,
    /// Pages sent so far in this round.
    pub round_sent: u64,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Pre-copy: the full copy and the rounds after it, the guest running.
    #[default]
    Copy,
    /// The guest paused, the last dirty pages and the state sent.
    StopAndCopy,
    /// Waiting for the destination's ACK, then COMMIT and DONE.
    HandOver,
}

impl std::fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigrationPhase::Copy => "copy",
            MigrationPhase::StopAndCopy => "stop-and-copy",
            MigrationPhase::HandOver => "hand-over",
        })
    }
}

/// The slower-changing part of [`MigrationProgress`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressState {
    /// Where the migration is.
    pub phase: MigrationPhase,
    /// Pre-copy round (0: the full copy).
    pub round: u32,
    /// Pages sent before this round.
    pub round_start: u64,
    /// Pages this round sends.
    pub round_pages: u64,
    /// Pages dirty after the last round.
    pub dirty_pages: u64,
    /// Pages dirtied per second in the last round.
    pub dirty_rate: u64,
    /// Downtime the last round predicts, in milliseconds.
    pub expected_downtime_ms: u64,
}

impl MigrationProgress {
    /// Where the running migration is (`None`: none runs), as the API's `status` shows it.
    pub fn status(&self) -> Option<MigrationStatus> {
        let st = self.state.locked().clone()?;
        let sent = self.pages_sent.load(Ordering::Relaxed);
        Some(MigrationStatus {
            round_sent: sent.saturating_sub(st.round_start),
            pages_sent: sent,
            progress: st,
        })
    }

    /// Sets the state (`None`: no migration runs).
    pub fn set(&self, st: Option<ProgressState>) {
        *self.state.locked() = st;
    }

    /// Changes the state of a running migration.
    pub fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        if let Some(st) = self.state.locked().as_mut() {
            f(st);
        }
    }
}

impl From<hotplug::HotplugError> for MachineError {
    fn from(e: hotplug::HotplugError) -> Self {
        match e {
            hotplug::HotplugError::Refused(m) => MachineError::Busy(m),
            hotplug::HotplugError::Failed(m) | hotplug::HotplugError::NotEjected(m) => {
                MachineError::State(m)
            }
        }
    }
}

impl Machine {
    fn hotplug_slots(&self) -> Result<&hotplug::Hotplug, MachineError> {
        self.hotplug.as_ref().ok_or_else(|| {
            MachineError::Busy("no hot-plug slot: start the VMM with --hotplug".into())
        })
    }

    /// Adds a passthrough device while the guest runs ([`hotplug::Hotplug::add_device`]).
    ///
    /// # Errors
    /// [`MachineError::Busy`] without `--hotplug`, with no free slot of the kind asked, or
    /// during a snapshot or migration; [`MachineError::State`] when the device cannot be set
    /// up.
    pub fn add_device(
        &self,
        dev: &hotplug::HotDevice,
        wait: Duration,
    ) -> Result<hotplug::AddedDevice, MachineError> {
        let hp = self.hotplug_slots()?;
        Ok(hp.add_device(&self.devices, &self.busy, dev, wait)?)
    }

    /// Removes a hot-added device ([`hotplug::Hotplug::remove_device`]).
    ///
    /// # Errors
    /// [`MachineError::Busy`] without `--hotplug`, for an unknown id, or during a snapshot or
    /// migration.
    pub fn remove_device(
        &self,
        id: &str,
        wait: Duration,
    ) -> Result<hotplug::RemovedDevice, MachineError> {
        let hp = self.hotplug_slots()?;
        Ok(hp.remove_device(&self.devices, &self.busy, id, wait)?)
    }

    /// What the VM is made of now: [`Machine::config`] with the PCI functions as they are
    /// (hot-plug adds and removes some).
    pub fn current_config(&self) -> MachineConfig {
        MachineConfig {
            functions: self
                .devices
                .functions
                .read_locked()
                .iter()
                .map(|f| (f.slot, f.kind))
                .collect(),
            ..self.config.clone()
        }
    }

    /// Parks every vCPU (their pending I/O completed).
    ///
    /// # Errors
    /// When the VM ended meanwhile.
    pub fn pause_vcpus(&self) -> Result<(), MachineError> {
        let threads = self.threads.locked();
        let n = threads.len();
        if self.ctx.pause.pause(&threads, n, &self.ctx.stop) {
            Ok(())
        } else {
            Err(MachineError::Busy("the VM is ending".into()))
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume_vcpus(&self) {
        self.ctx.pause.resume();
    }

    /// Saves every (parked) vCPU's state.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, MachineError> {
        let senders = self.requests.locked().clone();
        let mut out = Vec::new();
        for (i, s) in senders.iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            s.send(ParkedRequest::Save(tx))
                .map_err(|_| state_err(format!("vCPU {i} is gone")))?;
            let st = rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| state_err(format!("vCPU {i} did not answer")))?
                .map_err(|e| state_err(format!("vCPU {i}: {e}")))?;
            out.push(st);
        }
        Ok(out)
    }

    /// Stops the event loop from serving device queues (requests stay queued).
    pub fn freeze(&self) {
        self.devices.frozen.store(true, Ordering::Release);
    }

    /// Serves device queues again, looking at every queue once for what arrived meanwhile.
    pub fn thaw(&self) {
        self.devices.frozen.store(false, Ordering::Release);
        self.kick_queues();
    }

    /// Notifies every virtio queue once (after a restore or a thaw).
    pub fn kick_queues(&self) {
        for (dev, nq) in &self.devices.virtio {
            let mut d = dev.locked();
            for q in 0..*nq {
                d.queue_notify(q);
            }
        }
    }

    /// Stops every vhost-user back end's rings (`GET_VRING_BASE`); on a failure restarts
    /// those already stopped.
    pub fn stop_vhost_user(&self) -> Result<(), MachineError> {
        for (label, n) in &self.devices.nets {
            let r = n.locked().stop_for_migration();
            if let Err(e) = r {
                self.restart_vhost_user();
                return Err(state_err(format!("{label}: {e}")));
            }
        }
        Ok(())
    }

    /// Starts again the vhost-user rings [`Machine::stop_vhost_user`] stopped.
    pub fn restart_vhost_user(&self) {
        for (_, n) in &self.devices.nets {
            n.locked().restart_after_migration();
        }
    }

    /// Moves every passthrough device to migration state `state`.
    pub fn passthrough_state(&self, state: u32) -> Result<(), MachineError> {
        for p in self.devices.passthrough.read_locked().iter() {
            p.backend
                .locked()
                .set_migration_state(state)
                .map_err(|e| state_err(format!("{}: {e}", p.label)))?;
        }
        Ok(())
    }

    /// Refuses early when a device cannot migrate.
    pub fn check_migratable(&self) -> Result<(), MachineError> {
        for (label, n) in &self.devices.nets {
            let pairs = n.locked().active_pairs();
            if pairs > 1 {
                return Err(MachineError::Busy(format!(
                    "{label} runs {pairs} queue pairs: only the first pair's rings are \
                     migrated so far"
                )));
            }
        }
        for p in self.devices.passthrough.read_locked().iter() {
            let b = p.backend.locked();
            if !b.supports_migration() {
                return Err(MachineError::Busy(format!(
                    "{} cannot be migrated (no VFIO migration support)",
                    p.label
                )));
            }
        }
        Ok(())
    }

    /// Turns KVM's dirty logging of every memory slot on or off.
    pub fn kvm_dirty_log(&self, on: bool) -> Result<(), MachineError> {
        for (slot, (gpa, size, hva, _)) in self.ram.regions().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: hva,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            };
            // SAFETY: the same live mapping as registered at start (owned by `ram`, which
            // lives as long as the VM), only the flags change.
            unsafe { self.vm_fd.set_user_memory_region(region) }
                .map_err(|e| state_err(format!("KVM dirty logging of slot {slot}: {e}")))?;
        }
        Ok(())
    }

    /// Starts tracking every writer of guest memory. Returns passthrough devices that cannot
    /// report their writes (their writable pages count as always dirty).
    pub fn start_tracking(&self, device_dirty: bool) -> Result<Vec<String>, MachineError> {
        self.kvm_dirty_log(true)?;
        for r in self.ram.mem.iter() {
            std::ops::Deref::deref(r).bitmap().reset();
        }
        if device_dirty {
            Ok(self.devices.start_dirty_tracking())
        } else {
            log::warn!(
                "migration: passthrough devices' dirty pages are NOT tracked (unsafe; \
                 writes by devices during migration will be lost)"
            );
            Ok(Vec::new())
        }
    }

    /// Stops tracking every writer of guest memory (what was dirty since the last harvest
    /// is dropped).
    pub fn stop_tracking(&self) {
        if let Err(e) = self.kvm_dirty_log(false) {
            log::warn!("{e}");
        }
        let mut scratch = DirtyBitmap::new(&self.devices.ram_ranges);
        self.devices.stop_dirty_tracking(&mut scratch);
    }

    /// ORs into `out` every page written since the last harvest: vCPUs (KVM), the VMM's
    /// devices (vm-memory), passthrough devices (their dirty logs, through the vIOMMU).
    /// Returns how many pages each source reported (a page two sources report counts in
    /// both).
    pub fn harvest(&self, out: &mut DirtyBitmap) -> Result<DirtySources, MachineError> {
        let ones = |w: &[u64]| w.iter().map(|x| u64::from(x.count_ones())).sum::<u64>();
        let mut n = DirtySources::default();
        for (slot, (gpa, size, _, _)) in self.ram.regions().into_iter().enumerate() {
            let bits = self
                .vm_fd
                .get_dirty_log(slot as u32, size as usize)
                .map_err(|e| state_err(format!("KVM_GET_DIRTY_LOG of slot {slot}: {e}")))?;
            n.kvm += ones(&bits);
            out.mark_bits(gpa / 4096, &bits, size / 4096);
        }
        for r in self.ram.mem.iter() {
            let words = std::ops::Deref::deref(r).bitmap().get_and_reset();
            n.vmm_devices += ones(&words);
            out.mark_bits(r.start_addr().0 / 4096, &words, r.len() / 4096);
        }
        let mut devices = DirtyBitmap::new(&self.devices.ram_ranges);
        self.devices.harvest_passthrough(&mut devices);
        n.passthrough = devices.count();
        out.merge(&devices);
        n.vhost_user = self.devices.harvest_vhost_user(out);
        Ok(n)
    }

    /// Dirty reports read from passthrough devices so far (the vIOMMU's counter).
    pub fn device_dirty_reads(&self) -> u64 {
        self.devices
            .iommu
            .as_ref()
            .map_or(0, |(h, _)| h.lock().counters().dirty_reads)
    }

    /// Saves everything but RAM; vCPUs parked, devices frozen and stopped.
    pub fn save_state(&self) -> Result<MachineState, MachineError> {
        let vcpus = self.save_vcpus()?;
        self.state_with(vcpus)
    }

    /// [`Machine::save_state`] with the vCPUs' states given.
    pub(crate) fn state_with(&self, vcpus: Vec<VcpuState>) -> Result<MachineState, MachineError> {
        let vm = VmState::save(&self.vm_fd).map_err(state_err)?;
        let serial = Persist::save(&mut *self.serial.locked()).map_err(state_err)?;
        let mut functions = Vec::new();
        for f in self.devices.functions.read_locked().iter() {
            let st = f
                .device
                .locked()
                .save_state()
                .map_err(|e| state_err(format!("{}: {e}", f.name)))?;
            functions.push((f.slot, st));
        }
        let viommu = self
            .devices
            .iommu
            .as_ref()
            .map(|(h, _)| h.lock().save_state());
        Ok(MachineState {
            version: STATE_VERSION,
            vcpus,
            vm,
            serial,
            functions,
            viommu,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
