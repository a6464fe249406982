//! The virtio-pci modern transport (virtio 1.3 section 4.1): the virtio capabilities, the
//! common configuration, ISR, device configuration and notification regions in BAR 0, MSI-X
//! in BAR 0 too, and queue notifications through ioeventfds (or MMIO exits when no ioeventfd
//! could be registered).

use std::io;
use std::sync::{Arc, Mutex};

use sync::MutexExt;
use virtio_queue::{Queue, QueueT};

use crate::state::{FunctionState, Persist, StateError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VirtioDevice, VirtioInterrupt};
use crate::interrupt::MsiVector;
use crate::pci::msix::Msix;
use crate::pci::{PciConfiguration, PciDevice, PciIds};

/// Registers queue-notify ioeventfds with the hypervisor.
pub trait IoEventRegistrar: Send + Sync {
    /// Signal `evt` on any write to MMIO address `addr`.
    ///
    /// # Errors
    /// When the hypervisor refuses.
    fn register(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
    /// Stops signalling `evt` for `addr`.
    ///
    /// # Errors
    /// When the hypervisor refuses.
    fn unregister(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
}

const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x8000;

const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

const STATUS_FEATURES_OK: u8 = 8;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_NEEDS_RESET: u8 = 0x40;
/// "No vector" in `msix_config` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    msix_vector: u16,
    enable: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            msix_vector: NO_VECTOR,
            enable: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

struct PciInterrupt {
    msix: Arc<Mutex<Msix>>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
}

impl PciInterrupt {
    fn fire(&self, vector: u16) {
        if vector != NO_VECTOR {
            self.msix.locked().trigger(usize::from(vector));
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        if let Some(&v) = self.queue_vectors.get(usize::from(queue)) {
            self.fire(v);
        }
    }
    fn signal_config(&self) {
        self.fire(self.config_vector);
    }
    fn queue_irqfd(&self, queue: u16) -> Option<std::os::fd::RawFd> {
        let v = *self.queue_vectors.get(usize::from(queue))?;
        if v == NO_VECTOR {
            return None;
        }
        self.msix.locked().irqfd(usize::from(v))
    }
}

/// The transport's saved state: everything the driver wrote, and where each queue stands.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    config: Vec<u32>,
    msix: crate::pci::msix::MsixState,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_msix_vector: u16,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    activated: bool,
    /// `(next_avail, next_used)` per queue when activated.
    positions: Vec<(u16, u16)>,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    msix: Arc<Mutex<Msix>>,
    msix_cap: usize,
    features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_msix_vector: u16,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    queue_evts: Vec<Arc<EventFd>>,
    ioevents: Option<Arc<dyn IoEventRegistrar>>,
    registered_bar: Option<u64>,
    activated: bool,
}

fn cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let len = 16 + extra.len();
    let mut c = vec![0x09, 0, len as u8, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl VirtioPciDevice {
    /// Wraps `device` with BAR 0 at `bar_addr`, one MSI-X vector per queue plus one for
    /// configuration changes.
    ///
    /// # Errors
    /// When the eventfds cannot be created.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        bar_addr: u64,
        vectors: Vec<Arc<dyn MsiVector>>,
        ioevents: Option<Arc<dyn IoEventRegistrar>>,
    ) -> io::Result<Self> {
        let (device_type, sizes, features) = {
            let d = device.locked();
            (d.device_type(), d.queue_max_sizes(), d.avail_features())
        };
        let class = match device_type {
            1 => 0x02_00_00,  // network: Ethernet controller
            2 => 0x01_80_00,  // block: mass storage
            23 => 0x08_06_00, // IOMMU
            _ => 0xff_00_00,
        };
        let mut config = PciConfiguration::new(PciIds {
            vendor: 0x1af4,
            device: 0x1040 + device_type as u16,
            class,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        });
        config.add_bar(0, bar_addr, BAR0_SIZE, false);
        let ro = |c: &[u8]| vec![0u8; c.len()];
        let c = cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE, &[]);
        config.add_capability(&c, &ro(&c));
        let c = cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 4, &[]);
        config.add_capability(&c, &ro(&c));
        let c = cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE, &[]);
        config.add_capability(&c, &ro(&c));
        let c = cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            u64::from(NOTIFY_MULTIPLIER) * sizes.len() as u64,
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        );
        config.add_capability(&c, &ro(&c));
        let msix = Msix::new(vectors);
        let (mc, mw) = msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(&mc, &mw);
        let queue_evts = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let mut dev = Self {
            config,
            device,
            device_type,
            msix: Arc::new(Mutex::new(msix)),
            msix_cap,
            features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_msix_vector: NO_VECTOR,
            queue_select: 0,
            queues: sizes.iter().map(|&s| QueueConfig::new(s)).collect(),
            queue_evts,
            ioevents,
            registered_bar: None,
            activated: false,
        };
        dev.register_ioevents();
        dev.lock_device().set_notifiers(&dev.queue_evts);
        Ok(dev)
    }

    /// The ioeventfds the event loop waits on; index = queue.
    pub fn queue_evts(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    /// The wrapped device.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    fn register_ioevents(&mut self) {
        let Some(reg) = self.ioevents.clone() else {
            return;
        };
        let Some(bar) = self.config.bar_addr(0) else {
            return;
        };
        if self.registered_bar == Some(bar) {
            return;
        }
        if let Some(old) = self.registered_bar.take() {
            for (i, e) in self.queue_evts.iter().enumerate() {
                let _ = reg.unregister(
                    e,
                    old + NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * i as u64,
                );
            }
        }
        for (i, e) in self.queue_evts.iter().enumerate() {
            if let Err(err) = reg.register(
                e,
                bar + NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * i as u64,
            ) {
                log::warn!("virtio-pci: no ioeventfd for queue {i} ({err}); notifications go through MMIO exits");
                return;
            }
        }
        self.registered_bar = Some(bar);
    }

    fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.locked()
    }

    fn reset(&mut self) {
        self.lock_device().reset();
        self.status = 0;
        self.activated = false;
        self.driver_features = 0;
        self.config_msix_vector = NO_VECTOR;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            if self.driver_features & !self.features != 0 {
                // The driver accepted something not offered: FEATURES_OK does not stick.
                value &= !STATUS_FEATURES_OK;
            } else {
                let f = self.driver_features;
                self.lock_device().set_acked_features(f);
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && !self.activated {
            match self.activate_device(&[]) {
                Ok(()) => self.activated = true,
                Err(e) => {
                    log::warn!(
                        "virtio-pci: device type {} not activated: {e}",
                        self.device_type
                    );
                    value |= STATUS_NEEDS_RESET;
                }
            }
        }
        self.status = value;
    }

    fn activate_device(&mut self, positions: &[(u16, u16)]) -> Result<(), super::ActivateError> {
        let queues: Vec<Queue> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut q = Self::make_queue(c);
                if let Some(&(avail, used)) = positions.get(i) {
                    q.set_next_avail(avail);
                    q.set_next_used(used);
                }
                q
            })
            .collect();
        let interrupt = Arc::new(PciInterrupt {
            msix: self.msix.clone(),
            queue_vectors: self.queues.iter().map(|q| q.msix_vector).collect(),
            config_vector: self.config_msix_vector,
        });
        self.lock_device().activate(queues, interrupt)
    }

    fn make_queue(c: &QueueConfig) -> Queue {
        let mut q =
            Queue::new(c.max_size).unwrap_or_else(|_| Queue::new(1).expect("size 1 is valid"));
        q.set_size(c.size);
        q.set_desc_table_address(Some(c.desc as u32), Some((c.desc >> 32) as u32));
        q.set_avail_ring_address(Some(c.driver as u32), Some((c.driver >> 32) as u32));
        q.set_used_ring_address(Some(c.device as u32), Some((c.device >> 32) as u32));
        q.set_ready(c.enable);
        q
    }

    fn common_read(&self, offset: u64) -> u64 {
        let q = self.queues.get(usize::from(self.queue_select));
        match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.features & 0xffff_ffff,
                1 => self.features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_msix_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => 0,
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            0x1c => q.map_or(0, |q| u64::from(q.enable)),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.driver),
            0x2c => q.map_or(0, |q| q.driver >> 32),
            0x30 => q.map_or(0, |q| q.device),
            0x34 => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        }
    }

    fn common_write(&mut self, offset: u64, value: u64) {
        let qs = usize::from(self.queue_select);
        let running = self.status & STATUS_DRIVER_OK != 0;
        let set_lo = |v: &mut u64, x: u64| *v = (*v & !0xffff_ffff) | (x & 0xffff_ffff);
        let set_hi = |v: &mut u64, x: u64| *v = (*v & 0xffff_ffff) | (x << 32);
        match offset {
            0x00 => self.device_feature_select = value as u32,
            0x08 => self.driver_feature_select = value as u32,
            0x0c => match self.driver_feature_select {
                0 => set_lo(&mut self.driver_features, value),
                1 => set_hi(&mut self.driver_features, value & 0xffff_ffff),
                _ => {}
            },
            0x10 => self.config_msix_vector = self.valid_vector(value as u16),
            0x14 => self.set_status(value as u8),
            0x16 => self.queue_select = value as u16,
            _ => {
                let vector = self.valid_vector(value as u16);
                // Queue registers are frozen once the device runs.
                let Some(q) = self.queues.get_mut(qs).filter(|_| !running) else {
                    return;
                };
                match offset {
                    0x18 => {
                        let s = value as u16;
                        if s.is_power_of_two() && s <= q.max_size {
                            q.size = s;
                        }
                    }
                    0x1a => q.msix_vector = vector,
                    0x1c => q.enable = value & 1 == 1,
                    0x20 => set_lo(&mut q.desc, value),
                    0x24 => set_hi(&mut q.desc, value),
                    0x28 => set_lo(&mut q.driver, value),
                    0x2c => set_hi(&mut q.driver, value),
                    0x30 => set_lo(&mut q.device, value),
                    0x34 => set_hi(&mut q.device, value),
                    _ => {}
                }
            }
        }
    }

    /// A vector number the device has, or `NO_VECTOR` (virtio 4.1.5.1.2: the device answers
    /// `NO_VECTOR` when it cannot use the vector).
    fn valid_vector(&self, v: u16) -> u16 {
        let n = self.msix.locked().len();
        if usize::from(v) < n {
            v
        } else {
            NO_VECTOR
        }
    }
}

fn to_u64(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl Persist for VirtioPciDevice {
    type State = TransportState;

    fn save(&mut self) -> Result<TransportState, StateError> {
        let positions = if self.activated {
            self.lock_device().queue_positions()
        } else {
            Vec::new()
        };
        let st = TransportState {
            config: self.config.save_regs(),
            msix: self.msix.locked().save(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_msix_vector: self.config_msix_vector,
            queue_select: self.queue_select,
            queues: self.queues.clone(),
            activated: self.activated,
            positions,
        };
        Ok(st)
    }

    fn restore(&mut self, st: &TransportState) -> Result<(), StateError> {
        let who = format!("virtio device type {}", self.device_type);
        let bad = |m: String| StateError::Mismatch(who.clone(), m);
        if st.queues.len() != self.queues.len()
            || st
                .queues
                .iter()
                .zip(&self.queues)
                .any(|(a, b)| a.max_size != b.max_size)
        {
            return Err(bad("queue layout differs".into()));
        }
        if st.driver_features & !self.features != 0 {
            return Err(bad(format!(
                "features {:#x} not offered here",
                st.driver_features & !self.features
            )));
        }
        // Everything that can refuse the state is checked before anything changes.
        self.config.check_regs(&st.config).map_err(bad)?;
        self.msix.locked().check(&st.msix).map_err(bad)?;
        self.lock_device().reset();
        self.activated = false;
        self.config.restore_regs(&st.config).map_err(bad)?;
        self.msix.locked().restore(&st.msix).map_err(bad)?;
        self.device_feature_select = st.device_feature_select;
        self.driver_feature_select = st.driver_feature_select;
        self.driver_features = st.driver_features;
        self.status = st.status;
        self.config_msix_vector = st.config_msix_vector;
        self.queue_select = st.queue_select;
        self.queues = st.queues.clone();
        if self.status & STATUS_FEATURES_OK != 0 {
            let f = self.driver_features;
            self.lock_device().set_acked_features(f);
        }
        self.register_ioevents();
        if st.activated {
            self.activate_device(&st.positions)
                .map_err(|e| StateError::Device(who.clone(), e.to_string()))?;
            self.activated = true;
        }
        Ok(())
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn save_state(&mut self) -> Result<FunctionState, StateError> {
        Ok(FunctionState::Virtio(Box::new(Persist::save(self)?)))
    }

    fn restore_state(&mut self, state: &FunctionState) -> Result<(), StateError> {
        match state {
            FunctionState::Virtio(st) => Persist::restore(self, st),
            other => Err(crate::state::other_kind(
                &format!("virtio device type {}", self.device_type),
                "virtio",
                other,
            )),
        }
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let moved = self.config.write_reg(reg, offset, data);
        // MSI-X message control sits in the upper half of the capability's first dword.
        if reg == self.msix_cap / 4 {
            let ctrl = (self.config.read_reg(reg) >> 16) as u16;
            self.msix.locked().set_message_control(ctrl);
        }
        if moved.contains(&0) {
            self.register_ioevents();
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_SIZE => {
                // Drivers access each field at its offset with its natural width (4.1.3.1).
                let v = self.common_read(o);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = v.checked_shr(8 * i as u32).unwrap_or(0) as u8;
                }
            }
            o if (ISR_OFFSET..ISR_OFFSET + 4).contains(&o) => {
                // MSI-X only: the ISR never has bits to report.
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.lock_device().read_config(o - DEVICE_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.locked().table_read(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..BAR0_SIZE).contains(&o) => {
                self.msix.locked().pba_read(o - MSIX_PBA_OFFSET, data);
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_SIZE => self.common_write(o, to_u64(data)),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.lock_device().write_config(o - DEVICE_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Reached only when no ioeventfd is registered for this queue.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if self.activated && q < self.queues.len() {
                    self.lock_device().queue_notify(q);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.locked().table_write(o - MSIX_TABLE_OFFSET, data);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
