//! The passthrough PCI function.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::interrupt::MsiVector;
use crate::pci::msix::Msix;
use crate::pci::{PciConfiguration, PciDevice, PciIds};
use sync::MutexExt;

use super::{
    PassthroughBackend, PassthroughError, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use crate::state::{FunctionState, Persist, StateError};

/// Size of the BAR that holds the emulated MSI-X table and PBA.
pub const MSIX_BAR_SIZE: u64 = 0x1000;
const MSIX_PBA_OFFSET: u64 = 0x800;

/// Why a passthrough device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A backend call failed.
    #[error(transparent)]
    Backend(#[from] PassthroughError),
    /// The device has no free BAR slot for the MSI-X table, or too many BARs.
    #[error("{0}")]
    Layout(String),
}

/// Allocates BAR addresses (the VMM's PCI window).
pub trait BarAllocator {
    /// An address for a BAR of `size` bytes (a power of two), aligned to its size.
    fn allocate(&mut self, size: u64) -> Option<u64>;
}

/// Places host memory in the guest-physical address space (a KVM memory slot).
pub trait GuestMapper: Send + Sync {
    /// Maps `len` bytes at host address `hva` at guest address `gpa`; returns a handle for
    /// [`GuestMapper::unmap`].
    ///
    /// # Errors
    /// When the hypervisor refuses the mapping (no free slot, an overlap).
    fn map(&self, gpa: u64, len: u64, hva: u64) -> std::io::Result<u32>;
    /// Removes mapping `handle`.
    fn unmap(&self, handle: u32);
}

/// What lets a passthrough function bypass messages for parts of its BARs: mapping device
/// memory into the guest, and registering the device's ioeventfds.
#[derive(Clone)]
pub struct DirectAccess {
    /// Maps BAR areas (sparse mmap).
    pub mapper: Arc<dyn GuestMapper>,
    /// Registers ioeventfds at BAR addresses.
    pub ioevents: Arc<dyn crate::virtio::pci::IoEventRegistrar>,
}

/// An ioeventfd of the device at a BAR offset, registered while the BAR is decoded.
struct DirectEvent {
    bar: usize,
    offset: u64,
    evt: Arc<vmm_sys_util::eventfd::EventFd>,
    /// The MMIO address it is registered at.
    at: Option<u64>,
}

/// A device file mapped in this process.
struct HostMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared file memory, owned by this object; the guest and the device
// process access it concurrently by design (it is device memory), this process only hands
// its address to the hypervisor.
unsafe impl Send for HostMap {}

impl Drop for HostMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this object made, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A BAR area mapped straight into the guest while the BAR is decoded.
struct DirectArea {
    bar: usize,
    offset: u64,
    size: u64,
    host: HostMap,
    /// The guest mapping: `(handle, GPA)`.
    at: Option<(u32, u64)>,
}

/// A passthrough function on the guest's PCI bus.
pub struct PassthroughPci {
    config: PciConfiguration,
    backend: Arc<Mutex<dyn PassthroughBackend>>,
    /// BAR index -> device region index (the same index for PCI devices).
    bars: Vec<usize>,
    msix: Option<(usize, Msix)>,
    failed: Arc<AtomicBool>,
    name: String,
    /// Areas of the BARs mapped into the guest (sparse mmap), the device's ioeventfds, and
    /// who maps and registers them.
    direct: Vec<DirectArea>,
    events: Vec<DirectEvent>,
    access: Option<DirectAccess>,
}

impl PassthroughPci {
    /// Builds the function from `backend`: IDs from its config region, BARs sized as its
    /// regions 0-5 at addresses from `alloc`, and MSI-X with `vectors` (at most as many as
    /// the device has) handed to the device as irqfds. With `access`, the areas of the BARs
    /// the backend lets map ([`PassthroughBackend::mmap_areas`]) are mapped into the guest
    /// and its ioeventfds ([`PassthroughBackend::io_eventfds`]) registered, wherever the
    /// guest puts the BAR: accesses there are not messages to the device.
    ///
    /// # Errors
    /// [`SetupError`].
    pub fn new(
        name: String,
        backend: Arc<Mutex<dyn PassthroughBackend>>,
        alloc: &mut dyn BarAllocator,
        make_vectors: &mut dyn FnMut(usize) -> std::io::Result<Vec<Arc<dyn MsiVector>>>,
        failed: Arc<AtomicBool>,
        access: Option<DirectAccess>,
    ) -> Result<Self, SetupError> {
        let mut b = backend.locked();
        let mut cfg = [0u8; 64];
        b.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg)?;
        let u16_at = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
        let class = u32::from(cfg[0x0b]) << 16 | u32::from(cfg[0x0a]) << 8 | u32::from(cfg[0x09]);
        let mut config = PciConfiguration::new(PciIds {
            vendor: u16_at(0),
            device: u16_at(2),
            class,
            revision: cfg[8],
            subsystem_vendor: u16_at(0x2c),
            subsystem: u16_at(0x2e),
        });
        let mut bars = Vec::new();
        for i in 0..6u32 {
            let Some(r) = b.region(i).filter(|r| r.size > 0) else {
                continue;
            };
            // The server's size: a BAR is a power of two, and at most half the 64-bit space.
            let size = r
                .size
                .checked_next_power_of_two()
                .ok_or_else(|| {
                    SetupError::Layout(format!(
                        "BAR {i}: the server's region size {:#x} is too large",
                        r.size
                    ))
                })?
                .max(0x1000);
            let addr = alloc.allocate(size).ok_or_else(|| {
                SetupError::Layout(format!("no room for BAR {i} ({size:#x} bytes)"))
            })?;
            config.add_bar(i as usize, addr, size, false);
            bars.push(i as usize);
        }
        let nvec = b.irq_count(VFIO_PCI_MSIX_IRQ_INDEX)?;
        let msix = if nvec > 0 {
            let slot = (0..6usize)
                .find(|i| !bars.contains(i))
                .ok_or_else(|| SetupError::Layout("no free BAR for the MSI-X table".into()))?;
            let vectors = make_vectors(nvec.min(2048) as usize)
                .map_err(|e| SetupError::Layout(format!("MSI-X vectors: {e}")))?;
            let fds: Vec<i32> = vectors.iter().filter_map(|v| v.irqfd()).collect();
            if !fds.is_empty() {
                b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, &fds)?;
            }
            let m = Msix::new(vectors);
            let (cap, writable) = m.capability(slot as u8, 0, MSIX_PBA_OFFSET as u32);
            config.add_capability(&cap, &writable);
            let addr = alloc
                .allocate(MSIX_BAR_SIZE)
                .ok_or_else(|| SetupError::Layout("no room for the MSI-X BAR".into()))?;
            config.add_bar(slot, addr, MSIX_BAR_SIZE, false);
            Some((slot, m))
        } else {
            None
        };
        let mut direct = Vec::new();
        let mut events = Vec::new();
        if access.is_some() {
            for &bar in &bars {
                for (offset, evt) in b.io_eventfds(bar as u32) {
                    events.push(DirectEvent {
                        bar,
                        offset,
                        evt,
                        at: None,
                    });
                }
                for a in b.mmap_areas(bar as u32) {
                    // SAFETY: a fresh shared mapping of the device's file; checked below.
                    let ptr = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            a.size as usize,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_SHARED,
                            std::os::fd::AsRawFd::as_raw_fd(&*a.file),
                            a.file_offset as libc::off_t,
                        )
                    };
                    if ptr == libc::MAP_FAILED {
                        log::warn!(
                            "{name}: BAR {bar} area {:#x}+{:#x} cannot be mapped ({}); its \
                             accesses go to the device as messages",
                            a.offset,
                            a.size,
                            std::io::Error::last_os_error()
                        );
                        continue;
                    }
                    direct.push(DirectArea {
                        bar,
                        offset: a.offset,
                        size: a.size,
                        host: HostMap {
                            ptr: ptr.cast(),
                            len: a.size as usize,
                        },
                        at: None,
                    });
                }
            }
        }
        drop(b);
        Ok(Self {
            config,
            backend,
            bars,
            msix,
            failed,
            name,
            direct,
            events,
            access,
        })
    }

    /// The BAR areas mapped into the guest now: `(BAR, offset in it, bytes, GPA)`.
    pub fn direct_mappings(&self) -> Vec<(usize, u64, u64, u64)> {
        self.direct
            .iter()
            .filter_map(|a| a.at.map(|(_, gpa)| (a.bar, a.offset, a.size, gpa)))
            .collect()
    }

    /// Whether the device failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn fail(&self, e: &PassthroughError) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            log::error!(
                "passthrough device {} failed: {e}; it now reads as all ones",
                self.name
            );
        }
    }

    fn msix_cap_reg(&self) -> Option<usize> {
        // The MSI-X capability is the only one: it sits at the first capability offset.
        self.msix
            .as_ref()
            .map(|_| usize::from(self.config.byte(0x34)) / 4)
    }
}

impl Drop for PassthroughPci {
    fn drop(&mut self) {
        // The guest loses the areas before this process unmaps them.
        if let Some(access) = &self.access {
            for a in &mut self.direct {
                if let Some((h, _)) = a.at.take() {
                    access.mapper.unmap(h);
                }
            }
            for e in &mut self.events {
                if let Some(addr) = e.at.take() {
                    let _ = access.ioevents.unregister(&e.evt, addr);
                }
            }
        }
    }
}

/// What [`PassthroughPci`] saves: its emulated configuration space and MSI-X table (the
/// device's own state travels through its migration interface).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PassthroughState {
    config: Vec<u32>,
    msix: Option<crate::pci::msix::MsixState>,
}

impl Persist for PassthroughPci {
    type State = PassthroughState;

    fn save(&mut self) -> Result<PassthroughState, StateError> {
        Ok(PassthroughState {
            config: self.config.save_regs(),
            msix: self.msix.as_ref().map(|(_, m)| m.save()),
        })
    }

    fn restore(&mut self, st: &PassthroughState) -> Result<(), StateError> {
        let bad = |m: String| StateError::Mismatch(self.name.clone(), m);
        if st.msix.is_some() != self.msix.is_some() {
            return Err(bad("MSI-X presence differs".into()));
        }
        // Everything that can refuse the state is checked before anything changes.
        self.config.check_regs(&st.config).map_err(bad)?;
        if let (Some((_, m)), Some(saved)) = (self.msix.as_ref(), st.msix.as_ref()) {
            m.check(saved).map_err(bad)?;
        }
        self.config.restore_regs(&st.config).map_err(bad)?;
        if let (Some((_, m)), Some(saved)) = (self.msix.as_mut(), st.msix.as_ref()) {
            m.restore(saved)
                .map_err(|e| StateError::Mismatch(self.name.clone(), e))?;
        }
        Ok(())
    }
}

impl PciDevice for PassthroughPci {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn save_state(&mut self) -> Result<FunctionState, StateError> {
        Ok(FunctionState::Passthrough(Persist::save(self)?))
    }

    fn restore_state(&mut self, state: &FunctionState) -> Result<(), StateError> {
        match state {
            FunctionState::Passthrough(st) => Persist::restore(self, st),
            other => Err(crate::state::other_kind(&self.name, "passthrough", other)),
        }
    }

    fn decode_changed(&mut self) {
        let Some(access) = self.access.clone() else {
            return;
        };
        let mapper = access.mapper;
        let on = self.config.memory_enabled();
        let bars = self.config.bars();
        let at = |bar: usize, offset: u64| {
            bars.iter()
                .find(|&&(i, addr, _)| i == bar && addr != 0)
                .filter(|_| on)
                .and_then(|&(_, addr, _)| addr.checked_add(offset))
        };
        for e in &mut self.events {
            let want = at(e.bar, e.offset);
            if want == e.at {
                continue;
            }
            if let Some(addr) = e.at.take() {
                if let Err(err) = access.ioevents.unregister(&e.evt, addr) {
                    log::warn!("{}: ioeventfd at {addr:#x}: {err}", self.name);
                }
            }
            if let Some(addr) = want {
                match access.ioevents.register(&e.evt, addr) {
                    Ok(()) => {
                        e.at = Some(addr);
                        log::info!(
                            "{}: BAR {} offset {:#x}: the device's ioeventfd at {addr:#x}",
                            self.name,
                            e.bar,
                            e.offset
                        );
                    }
                    Err(err) => log::warn!(
                        "{}: BAR {} offset {:#x}: ioeventfd not registered ({err}); writes \
                         there go to the device as messages",
                        self.name,
                        e.bar,
                        e.offset
                    ),
                }
            }
        }
        for a in &mut self.direct {
            let want = at(a.bar, a.offset);
            if want == a.at.map(|(_, g)| g) {
                continue;
            }
            if let Some((h, _)) = a.at.take() {
                mapper.unmap(h);
            }
            if let Some(gpa) = want {
                match mapper.map(gpa, a.size, a.host.ptr as u64) {
                    Ok(h) => {
                        a.at = Some((h, gpa));
                        log::info!(
                            "{}: BAR {} area {:#x}+{:#x} mapped into the guest at {gpa:#x}",
                            self.name,
                            a.bar,
                            a.offset,
                            a.size
                        );
                    }
                    Err(e) => log::warn!(
                        "{}: BAR {} area {:#x}+{:#x} not mapped at {gpa:#x} ({e}); its \
                         accesses go to the device as messages",
                        self.name,
                        a.bar,
                        a.offset,
                        a.size
                    ),
                }
            }
        }
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        if Some(reg) == self.msix_cap_reg() {
            let ctrl = (self.config.read_reg(reg) >> 16) as u16;
            if let Some((_, m)) = self.msix.as_mut() {
                m.set_message_control(ctrl);
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some((slot, m)) = self.msix.as_ref() {
            if *slot == bar {
                if offset >= MSIX_PBA_OFFSET {
                    m.pba_read(offset - MSIX_PBA_OFFSET, data);
                } else {
                    m.table_read(offset, data);
                }
                return;
            }
        }
        if self.failed() || !self.bars.contains(&bar) {
            data.fill(0xff);
            return;
        }
        let r = self.backend.locked().region_read(bar as u32, offset, data);
        match r {
            Ok(()) => {}
            Err(e @ PassthroughError::Failed(_)) => {
                self.fail(&e);
                data.fill(0xff);
            }
            Err(e) => {
                log::debug!("{}: BAR {bar} read at {offset:#x}: {e}", self.name);
                data.fill(0xff);
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some((slot, m)) = self.msix.as_mut() {
            if *slot == bar {
                if offset < MSIX_PBA_OFFSET {
                    m.table_write(offset, data);
                }
                return;
            }
        }
        if self.failed() || !self.bars.contains(&bar) {
            return;
        }
        let r = self.backend.locked().region_write(bar as u32, offset, data);
        match r {
            Ok(()) => {}
            Err(e @ PassthroughError::Failed(_)) => self.fail(&e),
            Err(e) => log::debug!("{}: BAR {bar} write at {offset:#x}: {e}", self.name),
        }
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
#[cfg(test)]
mod tests;
