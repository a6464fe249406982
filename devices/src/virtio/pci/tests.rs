//! The transport driven as the Linux virtio-pci driver would.

use std::sync::atomic::Ordering;

use super::*;
use crate::interrupt::testing::RecordingInterrupts;
use crate::interrupt::InterruptManager;
use crate::virtio::ActivateError;

#[derive(Default)]
struct Dummy {
    acked: u64,
    active: Option<Arc<dyn VirtioInterrupt>>,
    notified: Vec<usize>,
    resets: usize,
    config: [u8; 8],
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![128, 64]
    }
    fn avail_features(&self) -> u64 {
        (1 << 32) | (1 << 33) | 1
    }
    fn set_acked_features(&mut self, f: u64) {
        self.acked = f;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = self.config.get_mut(offset as usize) {
            *b = data[0];
        }
    }
    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if !queues.iter().all(|q| q.ready()) {
            return Err(ActivateError::InvalidQueue(0));
        }
        self.active = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        self.resets += 1;
    }
    fn queue_notify(&mut self, queue: usize) {
        self.notified.push(queue);
    }
}

fn setup() -> (VirtioPciDevice, Arc<Mutex<Dummy>>, RecordingInterrupts) {
    let dummy = Arc::new(Mutex::new(Dummy::default()));
    let mgr = RecordingInterrupts::default();
    let dev = VirtioPciDevice::new(
        dummy.clone(),
        0xc000_0000,
        mgr.allocate_msi(3).unwrap(),
        None,
    )
    .unwrap();
    (dev, dummy, mgr)
}

fn w(d: &mut VirtioPciDevice, off: u64, v: u64, len: usize) {
    d.bar_write(0, off, &v.to_le_bytes()[..len]);
}

fn r(d: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(0, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

/// Finds the virtio capability of `cfg_type` as the driver does.
fn find_cap(d: &VirtioPciDevice, cfg_type: u8) -> Option<(u32, u32)> {
    let c = d.config();
    let mut off = c.byte(0x34) as usize;
    while off != 0 {
        if c.byte(off) == 0x09 && c.byte(off + 3) == cfg_type {
            let rd = |o: usize| {
                u32::from_le_bytes([c.byte(o), c.byte(o + 1), c.byte(o + 2), c.byte(o + 3)])
            };
            return Some((rd(off + 8), rd(off + 12)));
        }
        off = c.byte(off + 1) as usize;
    }
    None
}

#[test]
fn driver_brings_the_device_up() {
    let (mut d, dummy, mgr) = setup();
    assert_eq!(d.config().read_reg(0), 0x1042_1af4);
    assert_eq!(
        find_cap(&d, VIRTIO_PCI_CAP_COMMON_CFG),
        Some((0, COMMON_SIZE as u32))
    );
    assert_eq!(
        find_cap(&d, VIRTIO_PCI_CAP_NOTIFY_CFG).unwrap().0,
        NOTIFY_OFFSET as u32
    );
    assert_eq!(r(&mut d, 0x12, 2), 2, "num_queues");
    w(&mut d, 0x14, 1 | 2, 1);
    w(&mut d, 0x00, 1, 4);
    assert_eq!(r(&mut d, 0x04, 4), 0b11);
    w(&mut d, 0x00, 0, 4);
    assert_eq!(r(&mut d, 0x04, 4), 1);
    w(&mut d, 0x08, 1, 4);
    w(&mut d, 0x0c, 1, 4);
    w(&mut d, 0x08, 0, 4);
    w(&mut d, 0x0c, 1, 4);
    w(&mut d, 0x14, 1 | 2 | 8, 1);
    assert_eq!(r(&mut d, 0x14, 1), 1 | 2 | 8, "FEATURES_OK sticks");
    assert_eq!(dummy.lock().unwrap().acked, (1 << 32) | 1);
    for q in 0..2u64 {
        w(&mut d, 0x16, q, 2);
        assert_eq!(r(&mut d, 0x18, 2), if q == 0 { 128 } else { 64 });
        w(&mut d, 0x18, 32, 2);
        w(&mut d, 0x1a, q + 1, 2);
        assert_eq!(r(&mut d, 0x1a, 2), q + 1);
        w(&mut d, 0x20, 0x10000 * (q + 1), 4);
        w(&mut d, 0x28, 0x10000 * (q + 1) + 0x1000, 4);
        w(&mut d, 0x30, 0x10000 * (q + 1) + 0x2000, 4);
        w(&mut d, 0x1c, 1, 2);
    }
    w(&mut d, 0x10, 0, 2);
    w(&mut d, 0x1a, 99, 2);
    assert_eq!(
        r(&mut d, 0x1a, 2),
        u64::from(NO_VECTOR),
        "a vector the device lacks"
    );
    w(&mut d, 0x1a, 2, 2);
    w(&mut d, 0x14, 1 | 2 | 8 | 4, 1);
    assert!(dummy.lock().unwrap().active.is_some());
    // Enable MSI-X and unmask vector 2; a queue-1 interrupt arrives on it.
    d.config_write(d.msix_cap / 4, 2, &[0, 0x80]);
    w(&mut d, MSIX_TABLE_OFFSET + 2 * 16 + 12, 0, 4);
    let irq = dummy.lock().unwrap().active.clone().unwrap();
    irq.signal_queue(1);
    assert_eq!(
        mgr.vectors.lock().unwrap()[2].fired.load(Ordering::SeqCst),
        1
    );
    // Notification through an MMIO write (no ioeventfd registered).
    w(&mut d, NOTIFY_OFFSET + 4, 1, 2);
    assert_eq!(dummy.lock().unwrap().notified, vec![1]);
    // Queue registers are frozen while running.
    w(&mut d, 0x16, 0, 2);
    w(&mut d, 0x20, 0xdead_0000, 4);
    assert_eq!(r(&mut d, 0x20, 4), 0x10000);
    // Device config goes to the device.
    w(&mut d, DEVICE_OFFSET + 3, 0x5a, 1);
    assert_eq!(r(&mut d, DEVICE_OFFSET + 3, 1), 0x5a);
    // Reset.
    w(&mut d, 0x14, 0, 1);
    assert_eq!(r(&mut d, 0x14, 1), 0);
    assert_eq!(dummy.lock().unwrap().resets, 1);
}

#[test]
fn bad_driver_behaviour_is_contained() {
    let (mut d, _dummy, _) = setup();
    // Features not offered: FEATURES_OK does not stick.
    w(&mut d, 0x08, 1, 4);
    w(&mut d, 0x0c, 0x8000_0000, 4);
    w(&mut d, 0x14, 8, 1);
    assert_eq!(r(&mut d, 0x14, 1) & 8, 0);
    // DRIVER_OK without enabled queues: the device asks for a reset.
    w(&mut d, 0x14, 4, 1);
    assert_eq!(
        r(&mut d, 0x14, 1) & u64::from(STATUS_NEEDS_RESET),
        u64::from(STATUS_NEEDS_RESET)
    );
    // Out-of-range selectors and offsets read zero and write nothing.
    w(&mut d, 0x16, 500, 2);
    assert_eq!(r(&mut d, 0x18, 2), 0);
    w(&mut d, 0x18, 8, 2);
    w(&mut d, 0x7000, 1, 4);
    assert_eq!(r(&mut d, 0x7ff8, 8), 0);
    d.bar_write(1, 0, &[1]);
    d.bar_read(0, 0, &mut []);
    w(&mut d, NOTIFY_OFFSET + 400, 1, 2);
}

/// A transport brought up as a driver would: features acked, both queues ready, DRIVER_OK.
fn running() -> (VirtioPciDevice, Arc<Mutex<Dummy>>, RecordingInterrupts) {
    let (mut d, dummy, mgr) = setup();
    w(&mut d, 0x14, 1 | 2, 1);
    w(&mut d, 0x08, 1, 4);
    w(&mut d, 0x0c, 1, 4);
    w(&mut d, 0x08, 0, 4);
    w(&mut d, 0x0c, 1, 4);
    w(&mut d, 0x14, 1 | 2 | 8, 1);
    for q in 0..2u64 {
        w(&mut d, 0x16, q, 2);
        w(&mut d, 0x18, 32, 2);
        w(&mut d, 0x20, 0x10000 * (q + 1), 4);
        w(&mut d, 0x28, 0x10000 * (q + 1) + 0x1000, 4);
        w(&mut d, 0x30, 0x10000 * (q + 1) + 0x2000, 4);
        w(&mut d, 0x1c, 1, 2);
    }
    w(&mut d, 0x14, 1 | 2 | 8 | 4, 1);
    assert!(dummy.lock().unwrap().active.is_some());
    (d, dummy, mgr)
}

proptest::proptest! {
    /// A saved transport state changed where a restore must check it (the configuration
    /// space's length and read-only bits, the MSI-X vector count, the queue layout, features
    /// this device does not offer) is either taken or refused as a mismatch; a refused one
    /// leaves the running transport exactly as it was, its device not even reset.
    #[test]
    fn a_state_that_does_not_fit_leaves_the_transport_as_it_was(
        change in 0u8..5,
        reg in 0usize..64,
        bit in 0u32..32,
        n in 0usize..6,
    ) {
        let (mut d, dummy, _mgr) = running();
        let before = serde_json::to_value(Persist::save(&mut d).unwrap()).unwrap();
        let resets = dummy.lock().unwrap().resets;
        let mut st = Persist::save(&mut d).unwrap();
        match change {
            0 => st.config.truncate(reg),
            1 => st.config[reg] ^= 1 << bit,
            2 => st.msix.entries.resize(n, (0, 0, 0, 0)),
            3 => st.queues.truncate(n.min(1)),
            _ => st.driver_features |= 1 << (bit + 1),
        }
        match Persist::restore(&mut d, &st) {
            Ok(()) => {}
            Err(StateError::Mismatch(..)) => {
                let after = serde_json::to_value(Persist::save(&mut d).unwrap()).unwrap();
                proptest::prop_assert_eq!(after, before);
                proptest::prop_assert_eq!(dummy.lock().unwrap().resets, resets);
            }
            Err(e) => proptest::prop_assert!(false, "{}", e),
        }
    }
}
