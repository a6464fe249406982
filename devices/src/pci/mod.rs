//! PCI: one bus (bus 0, function 0 only), configuration access through ECAM and the
//! 0xcf8/0xcfc ports, and dispatch of MMIO accesses to the BARs the functions currently
//! decode.

pub mod config;
pub mod hotplug;
pub mod msix;

use crate::state::FunctionState;
use std::sync::{Arc, Mutex, RwLock};

pub use config::{PciConfiguration, PciIds};

use crate::bus::BusDevice;
use sync::{MutexExt, RwLockExt};

/// Number of device slots on the bus.
pub const SLOTS: usize = 32;

/// A PCI function.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &PciConfiguration;
    /// Reads configuration register `reg` (dword index).
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }
    /// Writes configuration register `reg` at byte `offset`.
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// Reads BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// The function's state for a snapshot (configuration space and device registers), as
    /// its kind's [`FunctionState`].
    ///
    /// # Errors
    /// [`crate::state::StateError`] when the device cannot report it.
    fn save_state(&mut self) -> Result<FunctionState, crate::state::StateError>;
    /// Called after the guest moved or (un)enabled the function's BARs (a BAR or the command
    /// register written, or a restore): a function that maps parts of its BARs straight into
    /// the guest moves those mappings.
    fn decode_changed(&mut self) {}
    /// Restores what [`PciDevice::save_state`] saved, on a function built the same way.
    ///
    /// # Errors
    /// [`crate::state::StateError`]; the function then keeps its state.
    /// A state of another kind is refused.
    ///
    /// # Errors
    /// [`crate::state::StateError`]; the function then keeps its state.
    fn restore_state(&mut self, state: &FunctionState) -> Result<(), crate::state::StateError>;
}

/// A shared PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// A decoded BAR: `(start, size, slot, bar index)`.
type Window = (u64, u64, usize, usize);

/// Bus 0.
pub struct PciBus {
    slots: RwLock<Vec<Option<SharedPciDevice>>>,
    windows: RwLock<Vec<Window>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self {
            slots: RwLock::new(vec![None; SLOTS]),
            windows: RwLock::new(Vec::new()),
        }
    }

    /// Puts `dev` in `slot`, at set-up or while the guest runs (hot-plug). Returns false when
    /// the slot is taken or out of range.
    pub fn add_device(&self, slot: usize, dev: SharedPciDevice) -> bool {
        match self.slots.write_locked().get_mut(slot) {
            Some(s @ None) => *s = Some(dev),
            _ => return false,
        }
        self.refresh(slot);
        true
    }

    /// Takes the device out of `slot` (hot-unplug): from then on its configuration space
    /// reads all ones and its BARs decode nothing. Returns it, or `None` for an empty slot.
    pub fn remove_device(&self, slot: usize) -> Option<SharedPciDevice> {
        let dev = self.slots.write_locked().get_mut(slot)?.take()?;
        self.windows.write_locked().retain(|e| e.2 != slot);
        Some(dev)
    }

    /// The device in `slot`.
    pub fn device(&self, slot: usize) -> Option<SharedPciDevice> {
        self.slots.read_locked().get(slot).cloned().flatten()
    }

    fn lock(dev: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
        dev.locked()
    }

    /// Recomputes the BARs of every slot (after a restore changed configuration spaces).
    pub fn refresh_all(&self) {
        for slot in 0..SLOTS {
            self.refresh(slot);
        }
    }

    /// Recomputes the BARs `slot` decodes.
    fn refresh(&self, slot: usize) {
        let new: Vec<Window> = match self.device(slot) {
            Some(d) => {
                let mut d = Self::lock(&d);
                d.decode_changed();
                if d.config().memory_enabled() {
                    d.config()
                        .bars()
                        .into_iter()
                        .map(|(i, a, s)| (a, s, slot, i))
                        .collect()
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        let mut w = self.windows.write_locked();
        w.retain(|e| e.2 != slot);
        w.extend(new);
    }

    /// Configuration read of `(device, function, register)` on bus 0; absent functions read
    /// all ones.
    pub fn config_read(&self, bus: u8, device: usize, function: usize, reg: usize) -> u32 {
        if bus != 0 || function != 0 {
            return 0xffff_ffff;
        }
        match self.device(device) {
            Some(d) => Self::lock(&d).config_read(reg),
            None => 0xffff_ffff,
        }
    }

    /// Configuration write.
    pub fn config_write(
        &self,
        bus: u8,
        device: usize,
        function: usize,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        if bus != 0 || function != 0 {
            return;
        }
        if let Some(d) = self.device(device) {
            Self::lock(&d).config_write(reg, offset, data);
            // BAR or command changes move what the device decodes.
            if reg == config::COMMAND / 4 || (4..10).contains(&reg) {
                self.refresh(device);
            }
        }
    }

    fn find(&self, addr: u64, len: usize) -> Option<(SharedPciDevice, usize, u64)> {
        let w = self.windows.read_locked();
        let &(start, _, slot, bar) = w
            .iter()
            .find(|&&(s, l, _, _)| addr >= s && addr - s < l && addr - s + len as u64 <= l)?;
        Some((self.device(slot)?, bar, addr - start))
    }

    /// MMIO read inside a PCI window; `false` when no BAR decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((d, bar, off)) => {
                Self::lock(&d).bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// MMIO write inside a PCI window.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((d, bar, off)) => {
                Self::lock(&d).bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }
}

/// The ECAM area (MMIO): offset = bus << 20 | device << 15 | function << 12 | register.
pub struct PciEcam(pub Arc<PciBus>);

impl PciEcam {
    fn decode(offset: u64) -> (u8, usize, usize, usize, u64) {
        (
            ((offset >> 20) & 0xff) as u8,
            ((offset >> 15) & 0x1f) as usize,
            ((offset >> 12) & 0x7) as usize,
            ((offset & 0xfff) / 4) as usize,
            offset & 3,
        )
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg, byte) = Self::decode(offset);
        let v = self.0.config_read(bus, dev, func, reg);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * ((byte as usize + i) % 4))) as u8;
        }
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg, byte) = Self::decode(offset);
        self.0.config_write(bus, dev, func, reg, byte, data);
    }
}

/// The legacy configuration mechanism: address at 0xcf8, data at 0xcfc..0xcff.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl PciConfigIo {
    /// Access to `bus` through ports 0xcf8..0xcff.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0 }
    }

    fn target(&self) -> Option<(u8, usize, usize, usize)> {
        (self.address & 0x8000_0000 != 0).then_some((
            ((self.address >> 16) & 0xff) as u8,
            ((self.address >> 11) & 0x1f) as usize,
            ((self.address >> 8) & 0x7) as usize,
            ((self.address & 0xfc) / 4) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    /// A string instruction (`rep insd`) hands over `count * size` bytes in one exit, the
    /// element size unknown here: every dword of `data` reads the register again.
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0..=3 => self.address >> (8 * offset),
            _ => match self.target() {
                Some((b, d, f, r)) => self.bus.config_read(b, d, f, r) >> (8 * (offset - 4)),
                None => 0xffff_ffff,
            },
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * (i % 4))) as u8;
        }
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        } else if offset >= 4 {
            if let Some((b, d, f, r)) = self.target() {
                self.bus.config_write(b, d, f, r, offset - 4, data);
            }
        }
    }
}

/// The PCI memory windows on the MMIO bus: accesses go to the BAR that decodes them.
pub struct PciMmio(pub Arc<PciBus>);

impl BusDevice for PciMmio {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if !self.0.mmio_read(base + offset, data) {
            data.fill(0xff);
        }
    }
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.0.mmio_write(base + offset, data);
    }
}

/// The host bridge at 00:00.0.
pub struct HostBridge {
    config: PciConfiguration,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// A Red Hat QEMU-compatible host bridge (1b36:0008, class 06:00).
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(PciIds {
                vendor: 0x1b36,
                device: 0x0008,
                class: 0x06_00_00,
                revision: 0,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn save_state(&mut self) -> Result<FunctionState, crate::state::StateError> {
        Ok(FunctionState::HostBridge(self.config.save_regs()))
    }
    fn restore_state(&mut self, state: &FunctionState) -> Result<(), crate::state::StateError> {
        let FunctionState::HostBridge(regs) = state else {
            return Err(crate::state::other_kind(
                "PCI host bridge",
                "host bridge",
                state,
            ));
        };
        self.config
            .restore_regs(regs)
            .map_err(|e| crate::state::StateError::Mismatch("PCI host bridge".into(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy {
        config: PciConfiguration,
        last: Option<(usize, u64, Vec<u8>)>,
    }
    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg, offset, data);
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last = Some((bar, offset, data.to_vec()));
        }
        fn save_state(&mut self) -> Result<FunctionState, crate::state::StateError> {
            Ok(FunctionState::HostBridge(self.config.save_regs()))
        }
        fn restore_state(&mut self, _: &FunctionState) -> Result<(), crate::state::StateError> {
            Ok(())
        }
    }

    /// A function's state is tagged with its kind (`{"host_bridge": [...]}`), round-trips
    /// through JSON, and a state of another kind is refused by name with the function
    /// unchanged.
    #[test]
    fn function_states_are_typed_by_kind() {
        let mut a = HostBridge::new();
        a.config_write(0x3c / 4, 0, &[0x5a]);
        let saved = a.save_state().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        assert!(json.starts_with(r#"{"host_bridge":["#), "{json}");
        let back: FunctionState = serde_json::from_str(&json).unwrap();
        let mut b = HostBridge::new();
        b.restore_state(&back).unwrap();
        assert_eq!(b.config_read(0x3c / 4) & 0xff, 0x5a);

        let other: FunctionState =
            serde_json::from_str(r#"{"passthrough":{"config":[],"msix":null}}"#).unwrap();
        let e = b.restore_state(&other).unwrap_err().to_string();
        assert!(
            e.contains("saved as a passthrough function, this is a host bridge one"),
            "{e}"
        );
        assert_eq!(b.config_read(0x3c / 4) & 0xff, 0x5a);
        // An untagged state (stream version 1) does not parse as a function state.
        assert!(serde_json::from_str::<FunctionState>("[0, 0]").is_err());
    }

    #[test]
    fn config_access_and_bar_dispatch() {
        let bus = PciBus::new();
        bus.add_device(0, Arc::new(Mutex::new(HostBridge::new())));
        let mut config = PciConfiguration::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x01_00_00,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 2,
        });
        config.add_bar(0, 0xc000_0000, 0x1000, false);
        let dev = Arc::new(Mutex::new(Dummy { config, last: None }));
        assert!(bus.add_device(3, dev.clone()));
        assert!(!bus.add_device(3, dev.clone()));
        assert!(!bus.add_device(40, dev.clone()));
        let bus = Arc::new(bus);

        let mut ecam = PciEcam(bus.clone());
        let mut v = [0u8; 4];
        ecam.read(0, 3 << 15, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x1042_1af4);
        ecam.read(0, 5 << 15, &mut v);
        assert_eq!(v, [0xff; 4], "empty slot");
        ecam.read(0, (1 << 20) | (3 << 15), &mut v);
        assert_eq!(v, [0xff; 4], "other bus");

        // Memory decoding is off until the command register says so.
        let mut d = [0u8; 2];
        assert!(!bus.mmio_read(0xc000_0010, &mut d));
        ecam.write(0, (3 << 15) | 4, &[0x2]);
        assert!(bus.mmio_read(0xc000_0010, &mut d));
        assert_eq!(d, [0x10, 0x10]);
        assert!(
            !bus.mmio_read(0xc000_0fff, &mut [0u8; 2]),
            "crosses the BAR end"
        );

        // Through 0xcf8/0xcfc: move the BAR.
        let mut io = PciConfigIo::new(bus.clone());
        io.write(0xcf8, 0, &(0x8000_0000u32 | (3 << 11) | 0x10).to_le_bytes());
        io.write(0xcf8, 4, &0xd000_0000u32.to_le_bytes());
        let mut r = [0u8; 4];
        io.read(0xcf8, 4, &mut r);
        assert_eq!(u32::from_le_bytes(r), 0xd000_0000);
        assert!(!bus.mmio_read(0xc000_0010, &mut d));
        assert!(bus.mmio_write(0xd000_0004, &[7]));
        assert_eq!(dev.lock().unwrap().last, Some((0, 4, vec![7])));
    }
}
