//! Fuzz bodies over a bus of PCI functions as the VMM builds them: a host bridge, the
//! virtio-iommu and a virtio-blk behind the virtio-pci transport, and a passthrough function
//! over a fake backend, with their BARs decoding and both virtio devices running.
//!
//! - [`pci_dispatch`]: what a vCPU's port I/O and MMIO exits hand the buses, the PCI
//!   configuration port with `rep ins`/`rep outs` among them (KVM hands over the data of a
//!   whole string instruction, `count * size` bytes, in one exit).
//! - [`function_states`]: a saved function state from a snapshot or a migration stream,
//!   restored into the running functions.

use std::sync::{Arc, Mutex};

use sync::MutexExt;

use super::Image;
use crate::bus::Bus;
use crate::interrupt::testing::RecordingInterrupts;
use crate::interrupt::InterruptManager;
use crate::passthrough::pci::testing::function_at;
use crate::pci::{HostBridge, PciBus, PciConfigIo, PciEcam, PciMmio, SharedPciDevice};
use crate::state::{FunctionState, StateError};
use crate::virtio::block::VirtioBlock;
use crate::virtio::iommu::{IommuHandle, VirtioIommu};
use crate::virtio::pci::VirtioPciDevice;
use crate::virtio::testing::test_memory;
use crate::GuestMemoryMmap;
use iommu::{Viommu, ViommuConfig};

/// Guest RAM of the bus: 4 MiB.
const MEM: usize = 4 << 20;
/// Where the ECAM area sits on the MMIO bus (bus 0 only: 1 MiB).
const ECAM: u64 = 0xe000_0000;
/// The PCI window on the MMIO bus, and where each function's BAR 0 is placed.
const WINDOW: u64 = 0xc000_0000;
const WINDOW_SIZE: u64 = 0x1000_0000;
const IOMMU_BAR: u64 = WINDOW;
const BLK_BAR: u64 = WINDOW + 0x10_0000;
const PASSTHROUGH_BAR: u64 = WINDOW + 0x20_0000;
/// Slots of the functions, in [`Functions::devices`]' order.
const SLOTS: [usize; 4] = [0, 1, 2, 3];

/// The buses and the functions on them.
pub(super) struct Functions {
    pio: Bus,
    mmio: Bus,
    /// The functions, in slot order.
    devices: Vec<SharedPciDevice>,
    _mem: Arc<GuestMemoryMmap>,
    _irqs: RecordingInterrupts,
    _image: Image,
}

/// The common configuration registers of a virtio-pci function (virtio 1.3, 4.1.4.3).
mod common {
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

impl Functions {
    /// Builds the bus; the virtio functions are brought up as the Linux driver does
    /// (features, queues in RAM, `DRIVER_OK`).
    pub(super) fn new() -> Option<Self> {
        let mem = test_memory(MEM);
        let irqs = RecordingInterrupts::default();
        let iommu = IommuHandle::new(Viommu::new(ViommuConfig {
            guest_ram: vec![(0, MEM as u64)],
            ..Default::default()
        }))
        .ok()?;
        let image = Image::new();
        let blk = VirtioBlock::new(&image.0, false, mem.clone(), None).ok()?;
        let virtio = |dev: Arc<Mutex<dyn crate::virtio::VirtioDevice>>, bar, n| {
            VirtioPciDevice::new(dev, bar, irqs.allocate_msi(n).ok()?, None).ok()
        };
        let devices: Vec<SharedPciDevice> = vec![
            Arc::new(Mutex::new(HostBridge::new())),
            Arc::new(Mutex::new(virtio(
                Arc::new(Mutex::new(VirtioIommu::new(iommu, mem.clone()))),
                IOMMU_BAR,
                3,
            )?)),
            Arc::new(Mutex::new(virtio(Arc::new(Mutex::new(blk)), BLK_BAR, 2)?)),
            Arc::new(Mutex::new(function_at(PASSTHROUGH_BAR, 0x1000, 2).ok()?)),
        ];
        let bus = PciBus::new();
        for (slot, d) in SLOTS.iter().zip(&devices) {
            bus.add_device(*slot, d.clone());
        }
        let bus = Arc::new(bus);
        let pio = Bus::new();
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))),
            0xcf8,
            8,
        )
        .ok()?;
        let mmio = Bus::new();
        mmio.insert(Arc::new(Mutex::new(PciEcam(bus.clone()))), ECAM, 1 << 20)
            .ok()?;
        mmio.insert(
            Arc::new(Mutex::new(PciMmio(bus.clone()))),
            WINDOW,
            WINDOW_SIZE,
        )
        .ok()?;
        let f = Functions {
            pio,
            mmio,
            devices,
            _mem: mem,
            _irqs: irqs,
            _image: image,
        };
        for slot in SLOTS {
            // Memory decoding and bus mastering on.
            f.ecam_write(slot, 4, &6u16.to_le_bytes());
        }
        f.bring_up(IOMMU_BAR, &[0x1_0000, 0x2_0000]);
        f.bring_up(BLK_BAR, &[0x3_0000]);
        Some(f)
    }

    fn ecam_write(&self, slot: usize, reg_byte: u64, data: &[u8]) {
        self.mmio
            .write(ECAM + ((slot as u64) << 15) + reg_byte, data);
    }

    fn w(&self, at: u64, v: u64, len: usize) {
        self.mmio.write(at, &v.to_le_bytes()[..len]);
    }

    fn r(&self, at: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.mmio.read(at, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// The Linux driver's bring-up of the virtio function at `bar`: every offered feature,
    /// queue `i` of 64 entries at `queues[i]`, then `DRIVER_OK`.
    fn bring_up(&self, bar: u64, queues: &[u64]) {
        use common::*;
        self.w(bar + STATUS, 1 | 2, 1);
        for sel in 0..2 {
            self.w(bar + DEVICE_FEATURE_SELECT, sel, 4);
            let f = self.r(bar + DEVICE_FEATURE, 4);
            self.w(bar + DRIVER_FEATURE_SELECT, sel, 4);
            self.w(bar + DRIVER_FEATURE, f, 4);
        }
        self.w(bar + STATUS, 1 | 2 | 8, 1);
        for (q, &at) in queues.iter().enumerate() {
            self.w(bar + QUEUE_SELECT, q as u64, 2);
            self.w(bar + QUEUE_SIZE, 64, 2);
            // 64-bit registers in two halves, as Linux writes them.
            for (reg, addr) in [
                (QUEUE_DESC, at),
                (QUEUE_DRIVER, at + 0x1000),
                (QUEUE_DEVICE, at + 0x2000),
            ] {
                self.w(bar + reg, addr & 0xffff_ffff, 4);
                self.w(bar + reg + 4, addr >> 32, 4);
            }
            self.w(bar + QUEUE_ENABLE, 1, 2);
        }
        self.w(bar + STATUS, 1 | 2 | 8 | 4, 1);
    }

    /// Register 0 (vendor and device ID) of every function, read through the ECAM.
    pub(super) fn ids(&self) -> Vec<u64> {
        SLOTS
            .iter()
            .map(|&s| self.r(ECAM + ((s as u64) << 15), 4))
            .collect()
    }

    /// Restores function `i`.
    #[cfg(test)]
    pub(super) fn restore(&self, i: usize, st: &FunctionState) -> Result<(), StateError> {
        self.devices[i].locked().restore_state(st)
    }

    /// Every function's saved state, as JSON.
    pub(super) fn states(&self) -> Vec<serde_json::Value> {
        self.devices
            .iter()
            .map(|d| {
                let st = d.locked().save_state().expect("a running function saves");
                serde_json::to_value(st).expect("a state is JSON")
            })
            .collect()
    }
}

/// Port I/O and MMIO accesses as vCPU exits hand them to the buses. `data` is a sequence of
/// `[kind, a0, a1, a2, a3, len]`, a write followed by its `len` bytes of value:
/// - `kind % 4`: 0 the configuration ports 0xcf8 + `a0 % 8`; 1 the ECAM at offset
///   `a0..a3 % 1 MiB` (a write of 0xcf8's address register first when `a3` is odd, so
///   that the data port targets every function); 2 the PCI window at `a0..a3 % 64 MiB`
///   (the functions' BARs: virtio registers, MSI-X tables, the passthrough BAR); 3 any port
///   `a0..a1`;
/// - `kind & 8`: a write, else a read.
///
/// Port I/O lengths go up to 16 (`rep ins`/`rep outs` data), MMIO ones up to 8 (KVM's
/// most).
///
/// # Panics
/// When a guest access changes a function's vendor or device ID (read-only registers), or
/// when anything below panics.
pub fn pci_dispatch(data: &[u8]) {
    let Some(f) = Functions::new() else {
        return;
    };
    let ids = f.ids();
    let mut rest = data;
    while let [kind, a0, a1, a2, a3, len, tail @ ..] = rest {
        // KVM hands over at most 8 bytes of MMIO; port I/O of a string instruction more.
        let len = usize::from(
            *len % if kind % 4 == 0 || kind % 4 == 3 {
                17
            } else {
                9
            },
        );
        let write = kind & 8 != 0;
        let mut value = [0u8; 16];
        rest = tail;
        if write {
            let n = len.min(tail.len());
            value[..n].copy_from_slice(&tail[..n]);
            rest = &tail[n..];
        }
        let value = &mut value[..len];
        let a = u32::from_le_bytes([*a0, *a1, *a2, *a3]);
        let (bus, at) = match kind % 4 {
            0 => (&f.pio, 0xcf8 + u64::from(a0 % 8)),
            1 => {
                if a3 & 1 == 1 {
                    f.pio
                        .write(0xcf8, &(0x8000_0000 | (a & 0x00ff_fffc)).to_le_bytes());
                }
                (&f.mmio, ECAM + u64::from(a % (1 << 20)))
            }
            2 => (&f.mmio, WINDOW + u64::from(a % (64 << 20))),
            _ => (&f.pio, u64::from(u16::from_le_bytes([*a0, *a1]))),
        };
        if write {
            bus.write(at, value);
        } else {
            bus.read(at, value);
        }
    }
    assert_eq!(f.ids(), ids, "a guest access changed a function's IDs");
}

/// A function's saved state as a snapshot or a migration stream would carry it, restored
/// into the running function `data[0] % 4` (host bridge, virtio-iommu, virtio-blk,
/// passthrough). `data[1]`'s low bit chooses
/// - 0: the rest is the state's JSON, as the fuzzer writes it;
/// - 1: the function's own saved state with its numbers and lists changed: the rest is
///   pairs of `[index (u16 LE), value (u64 LE)]`. Below 0x8000, each sets the
///   `index % count`-th number of the state to `value` (to a negative one when the value's
///   top bit is set); from 0x8000, it gives the `(index - 0x8000) % count`-th list
///   `value % 8` elements (copies of its last one, or zeros); from 0xc000, it flips bit
///   `value % 32` of the `(index - 0xc000) % count`-th number.
///
/// # Panics
/// When a state that was refused as not fitting (`StateError::Mismatch`) changed the
/// function (the `Persist` promise), when a restored state does not save back as a state
/// the function takes again, or when anything below panics.
pub fn function_states(data: &[u8]) {
    let [sel, mode, rest @ ..] = data else {
        return;
    };
    let Some(f) = Functions::new() else {
        return;
    };
    let i = usize::from(*sel) % f.devices.len();
    let before = f.states().swap_remove(i);
    let state: FunctionState = if mode & 1 == 0 {
        let Ok(s) = serde_json::from_slice(rest) else {
            return;
        };
        s
    } else {
        let mut v = before.clone();
        for pair in rest.chunks_exact(10) {
            let index = usize::from(u16::from_le_bytes([pair[0], pair[1]]));
            let value = u64::from_le_bytes(pair[2..10].try_into().unwrap_or_default());
            match index >> 14 {
                0 | 1 => set_nth_number(&mut v, index, value),
                2 => resize_nth_array(&mut v, index & 0x3fff, (value % 8) as usize),
                _ => flip_nth_number(&mut v, index & 0x3fff, (value % 32) as u32),
            }
        }
        let Ok(s) = serde_json::from_value(v) else {
            return;
        };
        s
    };
    let dev = &f.devices[i];
    let result = dev.locked().restore_state(&state);
    match result {
        Ok(()) => {
            // What it took, it saves; and that saved state is taken again.
            let again = dev
                .locked()
                .save_state()
                .expect("a restored function saves");
            dev.locked()
                .restore_state(&again)
                .expect("a function takes back its own saved state");
        }
        Err(StateError::Mismatch(..)) => {
            let after = f.states().swap_remove(i);
            assert_eq!(after, before, "a refused state changed the function");
        }
        // Activating the restored queues failed after the registers were taken (the
        // restore is not atomic then: SECURITY.md, gaps).
        Err(StateError::Device(..)) => {}
    }
}

/// Sets the `index % count`-th number (in document order) of `v` to `value`, or to
/// `value as i64` when its top bit is set.
fn set_nth_number(v: &mut serde_json::Value, index: usize, value: u64) {
    fn count(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Number(_) => 1,
            serde_json::Value::Array(a) => a.iter().map(count).sum(),
            serde_json::Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn nth<'a>(v: &'a mut serde_json::Value, k: &mut usize) -> Option<&'a mut serde_json::Value> {
        match v {
            serde_json::Value::Number(_) => {
                if *k == 0 {
                    return Some(v);
                }
                *k -= 1;
                None
            }
            serde_json::Value::Array(a) => a.iter_mut().find_map(|x| nth(x, k)),
            serde_json::Value::Object(o) => o.values_mut().find_map(|x| nth(x, k)),
            _ => None,
        }
    }
    let n = count(v);
    if n == 0 {
        return;
    }
    let mut k = index % n;
    if let Some(slot) = nth(v, &mut k) {
        *slot = if value >> 63 == 1 {
            serde_json::Value::from(value as i64)
        } else {
            serde_json::Value::from(value)
        };
    }
}

/// Flips bit `bit` of the `index % count`-th unsigned number of `v` (others stay).
fn flip_nth_number(v: &mut serde_json::Value, index: usize, bit: u32) {
    let mut numbers = Vec::new();
    collect_numbers(v, &mut numbers);
    if numbers.is_empty() {
        return;
    }
    let at = index % numbers.len();
    if let Some(n) = numbers[at].as_u64() {
        set_nth_number(v, at, n ^ (1 << bit));
    }
}

fn collect_numbers(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Number(_) => out.push(v.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_numbers(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| collect_numbers(x, out)),
        _ => {}
    }
}

/// Gives the `index % count`-th array (in document order) of `v` `len` elements: cut, or
/// grown with copies of its last element (zero when it had none).
fn resize_nth_array(v: &mut serde_json::Value, index: usize, len: usize) {
    fn count(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(a) => 1 + a.iter().map(count).sum::<usize>(),
            serde_json::Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn nth<'a>(
        v: &'a mut serde_json::Value,
        k: &mut usize,
    ) -> Option<&'a mut Vec<serde_json::Value>> {
        match v {
            serde_json::Value::Array(a) => {
                if *k == 0 {
                    return Some(a);
                }
                *k -= 1;
                a.iter_mut().find_map(|x| nth(x, k))
            }
            serde_json::Value::Object(o) => o.values_mut().find_map(|x| nth(x, k)),
            _ => None,
        }
    }
    let n = count(v);
    if n == 0 {
        return;
    }
    let mut k = index % n;
    if let Some(a) = nth(v, &mut k) {
        let fill = a.last().cloned().unwrap_or(serde_json::Value::from(0));
        a.resize(len, fill);
    }
}

/// Seeds: for [`pci_dispatch`], the driver's walk of every function's configuration space
/// through both mechanisms, a `rep insd` of four dwords at the data port, and reads of each
/// BAR; for [`function_states`], each function's own state through both modes.
#[cfg(test)]
pub(super) fn seeds() -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut dispatch = Vec::new();
    for slot in SLOTS {
        let addr = 0x8000_0000u32 | ((slot as u32) << 11);
        // 0xcf8 <- address; 0xcfc read; a rep insd of 16 bytes; ECAM reads.
        dispatch.extend_from_slice(&[8, 0, 0, 0, 0, 4]);
        dispatch.extend_from_slice(&addr.to_le_bytes());
        dispatch.extend_from_slice(&[0, 4, 0, 0, 0, 4]);
        dispatch.extend_from_slice(&[0, 4, 0, 0, 0, 16]);
        let ecam = (slot as u32) << 15;
        for reg in [0u32, 4, 0x10, 0x34] {
            dispatch.push(1);
            dispatch.extend_from_slice(&(ecam + reg).to_le_bytes());
            dispatch.push(4);
        }
    }
    for bar in [IOMMU_BAR, BLK_BAR, PASSTHROUGH_BAR] {
        for off in [0u32, 0x14, 0x2000, 0x3000] {
            dispatch.push(2);
            dispatch.extend_from_slice(&((bar - WINDOW) as u32 + off).to_le_bytes());
            dispatch.push(4);
        }
    }
    let mut states = Vec::new();
    if let Some(f) = Functions::new() {
        for (i, st) in f.states().iter().enumerate() {
            let mut raw = vec![i as u8, 0];
            raw.extend_from_slice(&serde_json::to_vec(st).unwrap_or_default());
            states.push(raw);
            states.push(vec![i as u8, 1]);
        }
    }
    (dispatch, states)
}
