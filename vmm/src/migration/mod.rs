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

pub use recv::{read_stream, read_stream_from, receive, HandoverResolver, Incoming, Source};
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
    /// RAM differs between the two sides after the last copy.
    #[error("verify: {0}")]
    Verify(String),
    /// The source aborted the hand-over (it runs the guest).
    #[error("the source aborted the migration ({0}); this side discards the guest")]
    Aborted(String),
    /// The hand-over could not be confirmed: neither side runs the guest on its own.
    #[error("hand-over unconfirmed: {0}")]
    Unconfirmed(String),
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
    fn add(&mut self, o: DirtySources) {
        self.kvm += o.kvm;
        self.vmm_devices += o.vmm_devices;
        self.passthrough += o.passthrough;
        self.vhost_user += o.vhost_user;
    }
}

/// How the hand-over at the end of a migration goes (the `HANDOVER` record), and for a
/// snapshot whether it carries RAM hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// Compare every RAM page of both sides (by hash) before the guest runs again.
    pub verify: bool,
    /// Milliseconds each side waits for the other's next hand-over message.
    pub timeout_ms: u64,
}

/// Hash of every 4 KiB page of `ram_ranges` (`(GPA, bytes)`) in `mem`, in GPA order (the
/// order both sides walk). Both sides run the same VMM, so the same hash function.
///
/// # Errors
/// When a page cannot be read.
pub fn page_hashes(
    mem: &devices::GuestMemoryMmap,
    ram_ranges: &[(u64, u64)],
) -> Result<Vec<u64>, MigrationError> {
    use std::hash::{DefaultHasher, Hasher};
    use vm_memory::{Bytes, GuestAddress};
    const CHUNK: u64 = 2 << 20;
    let pages: u64 = ram_ranges.iter().map(|r| r.1 / 4096).sum();
    let mut out = Vec::with_capacity(pages as usize);
    let mut buf = vec![0u8; CHUNK as usize];
    for &(gpa, len) in ram_ranges {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(CHUNK);
            let b = &mut buf[..n as usize];
            mem.read_slice(b, GuestAddress(gpa + off))
                .map_err(|e| state_err(format!("hashing RAM at {:#x}: {e}", gpa + off)))?;
            for page in b.chunks(4096) {
                let mut h = DefaultHasher::new();
                h.write(page);
                out.push(h.finish());
            }
            off += n;
        }
    }
    Ok(out)
}

/// GPAs of the pages whose hashes differ between `ours` and `theirs` (both from
/// [`page_hashes`] over `ram_ranges`); pages one side lacks count as differing.
pub fn differing_pages(ours: &[u64], theirs: &[u64], ram_ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut i = 0usize;
    for &(gpa, len) in ram_ranges {
        for p in 0..len / 4096 {
            if ours.get(i) != theirs.get(i) || ours.get(i).is_none() {
                out.push(gpa + p * 4096);
            }
            i += 1;
        }
    }
    out
}

/// A verify failure's message: how many pages differ and the first GPAs.
fn verify_failure(gpas: &[u64]) -> String {
    let shown: Vec<String> = gpas.iter().take(32).map(|g| format!("{g:#x}")).collect();
    format!(
        "{} pages differ between source and destination: {}{}",
        gpas.len(),
        shown.join(" "),
        if gpas.len() > shown.len() { " ..." } else { "" }
    )
}

/// A fault the tests inject into the hand-over (test only): `VMM_TEST_HANDOVER_FAULT` holds
/// comma-separated `name` or `name=N` entries: `drop-ack`, `delay-ack=MS` (destination),
/// `drop-commit`, `stall-before-commit=MS` (source), `drop-done` (destination). Returns
/// `Some(N)` (0 without a value) when `name` is set.
pub(crate) fn test_fault(name: &str) -> Option<u64> {
    let v = std::env::var("VMM_TEST_HANDOVER_FAULT").ok()?;
    v.split(',').find_map(|e| {
        let (k, n) = e.split_once('=').unwrap_or((e, "0"));
        (k.trim() == name).then(|| n.trim().parse().unwrap_or(0))
    })
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
}

/// A migration's progress as `status` shows it while `migrate` runs.
#[derive(Default)]
pub struct MigrationProgress {
    /// Pages sent so far (all rounds).
    pub pages_sent: std::sync::atomic::AtomicU64,
    /// Phase, round, pages to send in this round, dirty pages and rate, estimated downtime.
    pub state: Mutex<Option<ProgressState>>,
}

/// The slower-changing part of [`MigrationProgress`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgressState {
    /// `copy`, `stop-and-copy`, `hand-over`.
    pub phase: &'static str,
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
    /// `{"phase":..,"round":..,"pages_sent":..,"round_pages":..,"round_sent":..,..}` while a
    /// migration runs.
    pub fn json(&self) -> Option<serde_json::Value> {
        let st = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let sent = self.pages_sent.load(Ordering::Relaxed);
        let mut v = serde_json::to_value(&st).ok()?;
        v["pages_sent"] = serde_json::json!(sent);
        v["round_sent"] = serde_json::json!(sent.saturating_sub(st.round_start));
        Some(v)
    }

    pub(crate) fn set(&self, st: Option<ProgressState>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = st;
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        if let Some(st) = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            f(st);
        }
    }
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

    /// Stops every vhost-user back end's rings (`GET_VRING_BASE`); on a failure restarts
    /// those already stopped.
    fn stop_vhost_user(&self) -> Result<(), MigrationError> {
        for (label, n) in &self.devices.nets {
            let r = n
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stop_for_migration();
            if let Err(e) = r {
                self.restart_vhost_user();
                return Err(state_err(format!("{label}: {e}")));
            }
        }
        Ok(())
    }

    /// Starts again the vhost-user rings [`Machine::stop_vhost_user`] stopped.
    fn restart_vhost_user(&self) {
        for (_, n) in &self.devices.nets {
            n.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restart_after_migration();
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

    /// Refuses early when a device cannot migrate.
    fn check_migratable(&self) -> Result<(), MigrationError> {
        for (label, n) in &self.devices.nets {
            let pairs = n.lock().unwrap_or_else(|e| e.into_inner()).active_pairs();
            if pairs > 1 {
                return Err(MigrationError::Busy(format!(
                    "{label} runs {pairs} queue pairs: only the first pair's rings are \
                     migrated so far"
                )));
            }
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
    /// Returns how many pages each source reported (a page two sources report counts in
    /// both).
    fn harvest(&self, out: &mut DirtyBitmap) -> Result<DirtySources, MigrationError> {
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
    fn device_dirty_reads(&self) -> u64 {
        self.devices
            .iommu
            .as_ref()
            .map_or(0, |(h, _)| h.lock().counters().dirty_reads)
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
    fn differing_pages_are_named_by_gpa() {
        let ram = [(0u64, 3 * 4096u64), (0x10_0000, 2 * 4096)];
        let ours = [1, 2, 3, 4, 5];
        assert!(differing_pages(&ours, &ours, &ram).is_empty());
        assert_eq!(
            differing_pages(&ours, &[1, 9, 3, 4, 0], &ram),
            vec![0x1000, 0x10_1000]
        );
        // Hashes one side lacks count as differing.
        assert_eq!(
            differing_pages(&ours, &[1, 2, 3], &ram),
            vec![0x10_0000, 0x10_1000]
        );
        let msg = verify_failure(&(0..40).map(|p| p * 4096).collect::<Vec<_>>());
        assert!(
            msg.starts_with("40 pages differ") && msg.ends_with(" ..."),
            "{msg}"
        );
    }

    #[test]
    fn hashes_records_go_in_order_and_stay_inside_ram() {
        let mut w = stream::StreamWriter::new(Vec::new()).unwrap();
        let hashes: Vec<u64> = (0..(stream::MAX_HASHES_RECORD + 5)).collect();
        w.hashes(&hashes).unwrap();
        let bytes = w.get_mut().clone();
        let mut r = stream::StreamReader::new(&bytes[..]).unwrap();
        let mut got = Vec::new();
        for i in 0..2 {
            let (k, payload) = r.next_record().unwrap();
            assert_eq!(k, stream::Kind::Hashes);
            stream::add_hashes(&mut got, &payload, hashes.len() as u64, i).unwrap();
        }
        assert_eq!(got, hashes);
        // Out of order, past RAM, or ragged: refused.
        let mut again = got.clone();
        let mut rec = 0u64.to_le_bytes().to_vec();
        rec.extend(7u64.to_le_bytes());
        assert!(stream::add_hashes(&mut again, &rec, u64::MAX, 0).is_err());
        assert!(stream::add_hashes(&mut Vec::new(), &rec, 0, 0).is_err());
        assert!(stream::add_hashes(&mut Vec::new(), &rec[..12], 10, 0).is_err());
    }

    #[test]
    fn kinds_ignore_paths() {
        assert_eq!(kind_of("disk /a/b.img"), "virtio-blk");
        assert_eq!(kind_of("vfio-user device /tmp/x.sock"), "vfio-user");
        assert_eq!(kind_of("the virtio-iommu"), "virtio-iommu");
        assert_eq!(kind_of("host bridge"), "host bridge");
    }
}
