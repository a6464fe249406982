//! Snapshots and live migration.
//!
//! A [`Machine`] is the running VM as the control API and migration see it. Migration is
//! pre-copy: every page is sent once while the guest runs, then the pages dirtied meanwhile
//! (by vCPUs through KVM's dirty log, by the VMM's emulated devices through vm-memory's
//! bitmap, by passthrough devices through their dirty logs harvested by the vIOMMU) are sent
//! again, round after round, until few remain; then the guest is paused, passthrough devices
//! are stopped (VFIO migration v2 STOP), the last dirty pages and every piece of state are
//! sent, and the destination takes over. A snapshot is the same stream with one full copy of
//! RAM, written to a file while the guest is paused.

pub mod api;
pub mod kvm_state;
mod recv;
mod send;
pub mod stream;

use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use boot::quirks::FallbackStats;
use devices::exit::VmExit;
use devices::legacy::Serial;
use iommu::dirty::DirtyBitmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::device_manager::DeviceManager;
use crate::memory::GuestRam;
use crate::vcpu::{ParkedRequest, VcpuContext};
use kvm_state::{VcpuState, VmState};

pub use recv::{read_stream, receive, Incoming, Source};
pub use send::{migrate, snapshot, MigrateOptions};

/// Version of [`MachineState`].
pub const STATE_VERSION: u32 = 1;

/// VFIO migration v2 device states (`enum vfio_device_mig_state`).
pub mod device_state {
    /// Stopped.
    pub const STOP: u32 = 1;
    /// Running.
    pub const RUNNING: u32 = 2;
    /// Stopped, data readable.
    pub const STOP_COPY: u32 = 3;
    /// Stopped, data being written.
    pub const RESUMING: u32 = 4;
}

/// Why a snapshot, restore or migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream (file or connection) failed or was refused.
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    /// The two sides are not the same machine.
    #[error("incompatible machines: {0}")]
    Incompatible(String),
    /// Something could not be saved or restored.
    #[error("{0}")]
    State(String),
    /// Connecting or listening failed.
    #[error("{0}: {1}")]
    Transport(String, #[source] std::io::Error),
    /// The other side refused.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// The VM is not in a state that allows it.
    #[error("{0}")]
    Busy(String),
}

fn state_err(e: impl std::fmt::Display) -> MigrationError {
    MigrationError::State(e.to_string())
}

/// What the VM is made of; the receiver checks it equals its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u8,
    /// `(slot, kind)` of every PCI function.
    pub functions: Vec<(u8, String)>,
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
    pub serial: serde_json::Value,
    /// `(slot, state)` of every PCI function.
    pub functions: Vec<(u8, serde_json::Value)>,
    /// The virtio-iommu's state (domains, endpoints, mappings).
    pub viommu: Option<iommu::viommu::ViommuState>,
}

/// The kind of a PCI function, from its name (the part both sides share).
pub fn kind_of(name: &str) -> String {
    let k = if name.starts_with("disk ") {
        "virtio-blk"
    } else if name.starts_with("vfio-user") {
        "vfio-user"
    } else if name.starts_with("VFIO") {
        "vfio"
    } else if name.starts_with("vhost-user-net") {
        "vhost-user-net"
    } else if name.contains("virtio-iommu") {
        "virtio-iommu"
    } else {
        name
    };
    k.to_string()
}

/// Whether the guest runs or the user paused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// vCPUs run.
    Running,
    /// Paused through the API.
    Paused,
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
}

impl Machine {
    /// Parks every vCPU (their pending I/O completed).
    ///
    /// # Errors
    /// When the VM ended meanwhile.
    pub fn pause_vcpus(&self) -> Result<(), MigrationError> {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let n = threads.len();
        if self.ctx.pause.pause(&threads, n, &self.ctx.stop) {
            Ok(())
        } else {
            Err(MigrationError::Busy("the VM is ending".into()))
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume_vcpus(&self) {
        self.ctx.pause.resume();
    }

    /// Saves every (parked) vCPU's state.
    fn save_vcpus(&self) -> Result<Vec<VcpuState>, MigrationError> {
        let senders = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
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
    fn freeze(&self) {
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
            let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
            for q in 0..*nq {
                d.queue_notify(q);
            }
        }
    }

    /// Moves every passthrough device to migration state `state`.
    fn passthrough_state(&self, state: u32) -> Result<(), MigrationError> {
        for p in &self.devices.passthrough {
            p.backend
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_migration_state(state)
                .map_err(|e| state_err(format!("{}: {e}", p.label)))?;
        }
        Ok(())
    }

    /// Refuses early when a passthrough device cannot migrate.
    fn check_migratable(&self) -> Result<(), MigrationError> {
        if let Some((label, _)) = self.devices.nets.first() {
            return Err(MigrationError::Busy(format!(
                "{label} cannot be migrated yet (vhost-user dirty logging is not wired)"
            )));
        }
        for p in &self.devices.passthrough {
            let b = p.backend.lock().unwrap_or_else(|e| e.into_inner());
            if !b.supports_migration() {
                return Err(MigrationError::Busy(format!(
                    "{} cannot be migrated (no VFIO migration support)",
                    p.label
                )));
            }
        }
        Ok(())
    }

    /// Turns KVM's dirty logging of every memory slot on or off.
    fn kvm_dirty_log(&self, on: bool) -> Result<(), MigrationError> {
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
    fn start_tracking(&self, device_dirty: bool) -> Result<Vec<String>, MigrationError> {
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

    fn stop_tracking(&self) {
        if let Err(e) = self.kvm_dirty_log(false) {
            log::warn!("{e}");
        }
        let mut scratch = DirtyBitmap::new(&self.devices.ram_ranges);
        self.devices.stop_dirty_tracking(&mut scratch);
    }

    /// ORs into `out` every page written since the last harvest: vCPUs (KVM), the VMM's
    /// devices (vm-memory), passthrough devices (their dirty logs, through the vIOMMU).
    fn harvest(&self, out: &mut DirtyBitmap) -> Result<(), MigrationError> {
        for (slot, (gpa, size, _, _)) in self.ram.regions().into_iter().enumerate() {
            let bits = self
                .vm_fd
                .get_dirty_log(slot as u32, size as usize)
                .map_err(|e| state_err(format!("KVM_GET_DIRTY_LOG of slot {slot}: {e}")))?;
            out.mark_bits(gpa / 4096, &bits, size / 4096);
        }
        for r in self.ram.mem.iter() {
            let words = std::ops::Deref::deref(r).bitmap().get_and_reset();
            out.mark_bits(r.start_addr().0 / 4096, &words, r.len() / 4096);
        }
        self.devices.harvest_dirty(out);
        Ok(())
    }

    /// Saves everything but RAM; vCPUs parked, devices frozen and stopped.
    fn save_state(&self) -> Result<MachineState, MigrationError> {
        let vcpus = self.save_vcpus()?;
        let vm = VmState::save(&self.vm_fd).map_err(state_err)?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save_state();
        let mut functions = Vec::new();
        for (slot, name, dev) in &self.devices.functions {
            let st = dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state()
                .map_err(|e| state_err(format!("{name}: {e}")))?;
            functions.push((*slot, st));
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

/// Addresses of the other side: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket path.
    Unix(std::path::PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            Ok(Address::Unix(p.into()))
        } else if let Some(hp) = s.strip_prefix("tcp:") {
            match hp.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    Ok(Address::Tcp(hp.to_string()))
                }
                _ => Err(format!("'{hp}' is not HOST:PORT")),
            }
        } else {
            Err(format!("'{s}' is neither unix:PATH nor tcp:HOST:PORT"))
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(hp) => write!(f, "tcp:{hp}"),
        }
    }
}

/// A connection either way.
pub trait Conn: std::io::Read + std::io::Write + Send {
    /// Sets the read timeout.
    fn set_timeout(&self, t: Option<Duration>);
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.set_read_timeout(t);
    }
}

impl Conn for std::net::TcpStream {
    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.set_read_timeout(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Address>(),
            Ok(Address::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Address>().unwrap().to_string(),
            "tcp:127.0.0.1:4444"
        );
        assert!("tcp:nohost".parse::<Address>().is_err());
        assert!("unix:".parse::<Address>().is_err());
        assert!("ftp:x".parse::<Address>().is_err());
    }

    #[test]
    fn kinds_ignore_paths() {
        assert_eq!(kind_of("disk /a/b.img"), "virtio-blk");
        assert_eq!(kind_of("vfio-user device /tmp/x.sock"), "vfio-user");
        assert_eq!(kind_of("the virtio-iommu"), "virtio-iommu");
        assert_eq!(kind_of("host bridge"), "host bridge");
    }
}
