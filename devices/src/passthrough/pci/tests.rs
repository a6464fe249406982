//! The emulated PCI function of a passthrough device, against a fake backend.

use super::testing::function;
use super::*;

#[test]
fn bars_are_powers_of_two_and_a_region_too_large_for_one_is_refused() {
    let f = function(0x1800, 2).unwrap();
    let bars = f.config().bars();
    assert!(bars.contains(&(0, 0xc000_0000, 0x2000)), "{bars:?}");
    // A server that claims a region larger than half the 64-bit space: no BAR can hold it.
    let e = function((1 << 63) + 1, 0).err().unwrap().to_string();
    assert!(
        e.contains("BAR 0: the server's region size 0x8000000000000001 is too large"),
        "{e}"
    );
}

/// A saved state that does not fit (a vector count of another size), together with a
/// changed register, is refused, and the function keeps every register as it was.
#[test]
fn a_state_that_does_not_fit_leaves_the_function_as_it_was() {
    let mut f = function(0x1000, 2).unwrap();
    let before = Persist::save(&mut f).unwrap();
    let mut st = before.clone();
    st.config[1] ^= 0x2; // memory decoding on
    if let Some(m) = st.msix.as_mut() {
        m.entries.push((0, 0, 0, 0));
    }
    let e = Persist::restore(&mut f, &st).err().unwrap();
    assert!(matches!(e, StateError::Mismatch(..)), "{e}");
    let after = Persist::save(&mut f).unwrap();
    assert_eq!(after.config, before.config);
    // The same register change alone is taken.
    st.msix = before.msix.clone();
    Persist::restore(&mut f, &st).unwrap();
    assert_eq!(Persist::save(&mut f).unwrap().config, st.config);
}

/// A backend that records the BAR accesses that reach it, answers reads with `0x5a`, and
/// fails (the device process gone) once `gone` is set.
struct Recording {
    accesses: Vec<(&'static str, u32, u64, Vec<u8>)>,
    gone: bool,
}

impl PassthroughBackend for Recording {
    fn describe(&self) -> String {
        "recording".into()
    }
    fn region(&self, index: u32) -> Option<crate::passthrough::Region> {
        (index == 0).then_some(crate::passthrough::Region { size: 0x1000 })
    }
    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), PassthroughError> {
        if index == crate::passthrough::VFIO_PCI_CONFIG_REGION_INDEX {
            data.fill(0);
            data[..4].copy_from_slice(&[0xf4, 0x1a, 0x01, 0x10]);
            return Ok(());
        }
        if self.gone {
            return Err(PassthroughError::Failed("gone".into()));
        }
        data.fill(0x5a);
        self.accesses.push(("read", index, offset, data.to_vec()));
        Ok(())
    }
    fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PassthroughError> {
        if self.gone {
            return Err(PassthroughError::Failed("gone".into()));
        }
        self.accesses.push(("write", index, offset, data.to_vec()));
        Ok(())
    }
    fn irq_count(&mut self, index: u32) -> Result<u32, PassthroughError> {
        Ok(if index == crate::passthrough::VFIO_PCI_MSIX_IRQ_INDEX {
            2
        } else {
            0
        })
    }
    fn set_irqs(
        &mut self,
        _: u32,
        _: u32,
        _: &[std::os::fd::RawFd],
    ) -> Result<(), PassthroughError> {
        Ok(())
    }
    fn reset(&mut self) -> Result<(), PassthroughError> {
        Ok(())
    }
}

fn recording() -> (PassthroughPci, Arc<Mutex<Recording>>) {
    use crate::interrupt::InterruptManager;
    let rec = Arc::new(Mutex::new(Recording {
        accesses: Vec::new(),
        gone: false,
    }));
    let irqs = crate::interrupt::testing::RecordingInterrupts::default();
    let f = PassthroughPci::new(
        "rec".into(),
        rec.clone(),
        &mut super::testing::Bump(0xc000_0000),
        &mut |n| irqs.allocate_msi(n),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        None,
    )
    .unwrap();
    (f, rec)
}

/// BAR 0's accesses reach the device at their offsets; the MSI-X BAR is the VMM's own
/// (its table written and read back, its PBA after it, nothing of it reaching the device);
/// a BAR the device does not have reads as all ones. Once the device is gone, it is failed:
/// it reads as all ones and takes no writes.
#[test]
fn bar_accesses_reach_the_device_or_the_msix_table_and_a_gone_device_fails() {
    let (mut f, rec) = recording();
    let msix_bar = f.msix.as_ref().unwrap().0;
    assert_ne!(msix_bar, 0);
    f.bar_write(0, 0x28, &[1, 0, 0, 0]);
    let mut d = [0u8; 4];
    f.bar_read(0, 0x2c, &mut d);
    assert_eq!(d, [0x5a; 4]);
    assert_eq!(
        std::mem::take(&mut rec.lock().unwrap().accesses),
        vec![
            ("write", 0, 0x28, vec![1, 0, 0, 0]),
            ("read", 0, 0x2c, vec![0x5a; 4])
        ]
    );
    // Entry 1's message address, written and read back; the PBA reads as nothing pending.
    f.bar_write(msix_bar, 16, &0xfee0_1000u32.to_le_bytes());
    f.bar_read(msix_bar, 16, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xfee0_1000);
    let mut pba = [0xffu8; 8];
    f.bar_read(msix_bar, MSIX_PBA_OFFSET, &mut pba);
    assert_eq!(pba, [0; 8]);
    f.bar_write(msix_bar, MSIX_PBA_OFFSET, &[0xff; 8]);
    f.bar_read(msix_bar, MSIX_PBA_OFFSET, &mut pba);
    assert_eq!(pba, [0; 8], "the PBA is read-only");
    f.bar_read(3, 0, &mut d);
    assert_eq!(d, [0xff; 4]);
    f.bar_write(3, 0, &[1; 4]);
    assert!(rec.lock().unwrap().accesses.is_empty());

    assert!(!f.failed());
    rec.lock().unwrap().gone = true;
    f.bar_read(0, 0, &mut d);
    assert_eq!(d, [0xff; 4]);
    assert!(f.failed());
    rec.lock().unwrap().gone = false;
    f.bar_read(0, 0, &mut d);
    f.bar_write(0, 0, &[1; 4]);
    assert_eq!(d, [0xff; 4], "a failed device stays failed");
    assert!(rec.lock().unwrap().accesses.is_empty());
    // A write that finds the device gone fails it too.
    let (mut f, rec) = recording();
    rec.lock().unwrap().gone = true;
    f.bar_write(0, 0, &[1; 4]);
    assert!(f.failed());
}

/// The guest enabling MSI-X in the capability's message control enables the table; a
/// saved state restored through the PCI interface comes back, one of another kind is
/// refused.
#[test]
fn msix_control_and_restores_through_the_pci_interface() {
    let (mut f, _) = recording();
    let cap = usize::from(f.config().byte(0x34)) / 4;
    assert!(cap > 0);
    assert!(!f.msix.as_ref().unwrap().1.enabled());
    f.config_write(cap, 2, &0x8000u16.to_le_bytes());
    assert!(f.msix.as_ref().unwrap().1.enabled());
    f.config_write(cap, 2, &0u16.to_le_bytes());
    assert!(!f.msix.as_ref().unwrap().1.enabled());
    // Another register's upper half is no message control.
    f.config_write(cap + 1, 2, &0x8000u16.to_le_bytes());
    assert!(!f.msix.as_ref().unwrap().1.enabled());

    let FunctionState::Passthrough(mut st) = f.save_state().unwrap() else {
        panic!("not a passthrough state");
    };
    st.config[1] |= 0x6;
    // Vector 1 masked and pending: the guest reads it in the pending-bit array, at its
    // offset in the MSI-X BAR.
    let m = st.msix.as_mut().unwrap();
    m.entries[1].3 |= 1;
    m.pending[0] = 0b10;
    f.restore_state(&FunctionState::Passthrough(st.clone()))
        .unwrap();
    assert_eq!(f.config().read_reg(1) & 0x6, 0x6);
    let bar = f.msix.as_ref().unwrap().0;
    let mut pba = [0u8; 8];
    f.bar_read(bar, MSIX_PBA_OFFSET, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0b10);
    // A write there changes nothing (the array is read-only), nor does it reach the table.
    let table = f.msix.as_ref().unwrap().1.save().entries;
    f.bar_write(bar, MSIX_PBA_OFFSET, &[0xff; 8]);
    f.bar_read(bar, MSIX_PBA_OFFSET, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0b10);
    assert_eq!(f.msix.as_ref().unwrap().1.save().entries, table);
    let other = FunctionState::HostBridge(Vec::new());
    assert!(f.restore_state(&other).is_err());
}

/// A backend that says nothing of migration cannot migrate: every step is refused, naming
/// it.
#[test]
fn a_backend_without_migration_refuses_every_step() {
    let mut b = Recording {
        accesses: Vec::new(),
        gone: false,
    };
    assert!(!b.supports_migration());
    let refused = |r: Result<(), PassthroughError>| match r {
        Err(PassthroughError::Refused(m)) => m,
        r => panic!("{r:?}"),
    };
    let m = refused(b.set_migration_state(crate::passthrough::mig_state::STOP));
    assert_eq!(m, "recording does not support migration");
    refused(b.read_migration_data().map(drop));
    refused(b.write_migration_data(b"x"));
}

/// What the fake hypervisor was asked, in order.
type Calls = Arc<Mutex<Vec<String>>>;

struct Mapper(Calls, Mutex<u32>);

impl GuestMapper for Mapper {
    fn map(&self, gpa: u64, len: u64, _hva: u64) -> std::io::Result<u32> {
        let mut n = self.1.lock().unwrap();
        *n += 1;
        self.0
            .lock()
            .unwrap()
            .push(format!("map {gpa:#x}+{len:#x} as {n}"));
        Ok(*n)
    }
    fn unmap(&self, handle: u32) {
        self.0.lock().unwrap().push(format!("unmap {handle}"));
    }
}

struct Events(Calls);

impl crate::virtio::pci::IoEventRegistrar for Events {
    fn register(&self, _: &vmm_sys_util::eventfd::EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().push(format!("register {addr:#x}"));
        Ok(())
    }
    fn unregister(&self, _: &vmm_sys_util::eventfd::EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().push(format!("unregister {addr:#x}"));
        Ok(())
    }
}

/// A device with two BARs, 0 and 2, of which BAR 2 has a mappable area (its second page) and
/// a doorbell ioeventfd at 0x28.
struct Mappable(Recording, Arc<std::fs::File>);

impl PassthroughBackend for Mappable {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn region(&self, index: u32) -> Option<crate::passthrough::Region> {
        (index == 0 || index == 2).then_some(crate::passthrough::Region { size: 0x2000 })
    }
    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), PassthroughError> {
        self.0.region_read(index, offset, data)
    }
    fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PassthroughError> {
        self.0.region_write(index, offset, data)
    }
    fn irq_count(&mut self, index: u32) -> Result<u32, PassthroughError> {
        self.0.irq_count(index)
    }
    fn set_irqs(
        &mut self,
        i: u32,
        s: u32,
        fds: &[std::os::fd::RawFd],
    ) -> Result<(), PassthroughError> {
        self.0.set_irqs(i, s, fds)
    }
    fn reset(&mut self) -> Result<(), PassthroughError> {
        Ok(())
    }
    fn mmap_areas(&self, index: u32) -> Vec<crate::passthrough::MmapArea> {
        if index != 2 {
            return Vec::new();
        }
        vec![crate::passthrough::MmapArea {
            offset: 0x1000,
            size: 0x1000,
            file: self.1.clone(),
            file_offset: 0,
        }]
    }
    fn io_eventfds(&mut self, index: u32) -> Vec<(u64, Arc<vmm_sys_util::eventfd::EventFd>)> {
        if index != 2 {
            return Vec::new();
        }
        vec![(
            0x28,
            Arc::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap()),
        )]
    }
}

/// While the guest decodes the BARs, BAR 2's mappable area is mapped at BAR 2's address (not
/// BAR 0's) and the doorbell's ioeventfd registered there; moving the BAR moves both, turning decoding
/// off removes both, and so does removing the function.
#[test]
fn bar_areas_and_ioeventfds_follow_the_bar() {
    use crate::interrupt::InterruptManager;
    let calls: Calls = Arc::default();
    let file = crate::memfd::sealed("bar-areas-follow-the-bar", 0x1000, false).unwrap();
    // The host's mappings of the area's file, as /proc/self/maps lists them.
    let host_maps = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains("memfd:bar-areas-follow-the-bar"))
            .count()
    };
    let backend = Mappable(
        Recording {
            accesses: Vec::new(),
            gone: false,
        },
        Arc::new(file),
    );
    let irqs = crate::interrupt::testing::RecordingInterrupts::default();
    let mut f = PassthroughPci::new(
        "mappable".into(),
        Arc::new(Mutex::new(backend)),
        &mut super::testing::Bump(0xc000_0000),
        &mut |n| irqs.allocate_msi(n),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        Some(DirectAccess {
            mapper: Arc::new(Mapper(calls.clone(), Mutex::new(0))),
            ioevents: Arc::new(Events(calls.clone())),
        }),
    )
    .unwrap();
    let take = || std::mem::take(&mut *calls.lock().unwrap());
    f.decode_changed();
    assert_eq!(take(), Vec::<String>::new(), "not decoded yet");
    assert_eq!(f.direct_mappings(), vec![]);
    f.config_write(1, 0, &[0x2, 0]);
    f.decode_changed();
    assert_eq!(
        take(),
        ["register 0xc0002028", "map 0xc0003000+0x1000 as 1"]
    );
    assert_eq!(f.direct_mappings(), vec![(2, 0x1000, 0x1000, 0xc000_3000)]);
    assert_eq!(host_maps(), 1, "the area mapped in this process");
    f.decode_changed();
    assert_eq!(take(), Vec::<String>::new(), "nothing moved");
    // BAR 2 moves (BAR 0 stays where it is).
    f.config_write(6, 0, &0xd000_0000u32.to_le_bytes());
    f.decode_changed();
    assert_eq!(
        take(),
        [
            "unregister 0xc0002028",
            "register 0xd0000028",
            "unmap 1",
            "map 0xd0001000+0x1000 as 2"
        ]
    );
    f.config_write(1, 0, &[0, 0]);
    f.decode_changed();
    assert_eq!(take(), ["unregister 0xd0000028", "unmap 2"]);
    assert_eq!(f.direct_mappings(), vec![]);
    f.config_write(1, 0, &[0x2, 0]);
    f.decode_changed();
    take();
    drop(f);
    assert_eq!(take(), ["unmap 3", "unregister 0xd0000028"]);
    assert_eq!(host_maps(), 0, "and unmapped with the function");
}
