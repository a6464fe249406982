//! MSI through KVM: each vector is a GSI with an irqfd; routes are installed with
//! `KVM_SET_GSI_ROUTING`, which replaces the whole table, so the table always carries KVM's
//! default IOAPIC/PIC routes for GSIs 0-23 plus every enabled MSI route.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use devices::interrupt::{InterruptManager, MsiVector};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use sync::MutexExt;
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs below this are the IOAPIC's pins.
const FIRST_MSI_GSI: u32 = 24;
/// The last GSI KVM routes (`KVM_MAX_IRQ_ROUTES` is 4096 on x86).
const LAST_GSI: u32 = 4095;

struct Routes {
    /// MSI GSIs (vm-allocator's `IdAllocator`).
    gsis: IdAllocator,
    msi: BTreeMap<u32, (u64, u32)>,
}

/// Hands out KVM-backed MSI vectors.
pub struct KvmInterrupts {
    vm: Arc<VmFd>,
    routes: Mutex<Routes>,
}

impl KvmInterrupts {
    /// A manager for `vm`.
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(Self {
            vm,
            routes: Mutex::new(Routes {
                gsis: IdAllocator::new(FIRST_MSI_GSI, LAST_GSI).expect("FIRST_MSI_GSI <= LAST_GSI"),
                msi: BTreeMap::new(),
            }),
        })
    }

    fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
        kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
            },
            ..Default::default()
        }
    }

    /// The whole routing table for `routes`: KVM's default routes (GSIs 0-23 to the IOAPIC's
    /// pins, 0-15 to the PICs' too), then every MSI route.
    fn entries(routes: &Routes) -> Vec<kvm_irq_routing_entry> {
        let mut entries = Vec::new();
        for gsi in 0..FIRST_MSI_GSI {
            entries.push(Self::irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 16 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(Self::irqchip(gsi, chip, gsi % 8));
            }
        }
        for (&gsi, &(addr, data)) in &routes.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi = kvm_irq_routing_msi {
                address_lo: addr as u32,
                address_hi: (addr >> 32) as u32,
                data,
                ..Default::default()
            };
            entries.push(e);
        }
        entries
    }

    fn install(&self, routes: &Routes) -> io::Result<()> {
        let table = KvmIrqRouting::from_entries(&Self::entries(routes))
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

struct KvmMsi {
    gsi: u32,
    evt: EventFd,
    mgr: Arc<KvmInterrupts>,
}

impl MsiVector for KvmMsi {
    fn trigger(&self) {
        let _ = self.evt.write(1);
    }

    fn irqfd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.evt))
    }

    fn update(&self, address: u64, data: u32, enabled: bool) -> io::Result<()> {
        let mut routes = self.mgr.routes.locked();
        let changed = if enabled {
            routes.msi.insert(self.gsi, (address, data)) != Some((address, data))
        } else {
            routes.msi.remove(&self.gsi).is_some()
        };
        if changed {
            self.mgr.install(&routes)?;
        }
        Ok(())
    }
}

/// A vector goes with its function (hot-unplug): its irqfd, its route and its GSI are given
/// back.
impl Drop for KvmMsi {
    fn drop(&mut self) {
        if let Err(e) = self.mgr.vm.unregister_irqfd(&self.evt, self.gsi) {
            log::warn!("MSI GSI {}: cannot remove its irqfd: {e}", self.gsi);
        }
        let mut routes = self.mgr.routes.locked();
        if routes.msi.remove(&self.gsi).is_some() {
            if let Err(e) = self.mgr.install(&routes) {
                log::warn!("MSI GSI {}: cannot remove its route: {e}", self.gsi);
            }
        }
        let _ = routes.gsis.free_id(self.gsi);
    }
}

/// A handle implementing the devices crate's trait.
pub struct KvmInterruptManager(pub Arc<KvmInterrupts>);

impl InterruptManager for KvmInterruptManager {
    fn allocate_msi(&self, count: usize) -> io::Result<Vec<Arc<dyn MsiVector>>> {
        let mut v: Vec<Arc<dyn MsiVector>> = Vec::with_capacity(count);
        for _ in 0..count {
            let gsi = self.0.routes.locked().gsis.allocate_id().map_err(|_| {
                io::Error::other(format!("no free MSI GSI (GSIs {FIRST_MSI_GSI}-{LAST_GSI})"))
            })?;
            let evt = EventFd::new(EFD_NONBLOCK)?;
            self.0
                .vm
                .register_irqfd(&evt, gsi)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            v.push(Arc::new(KvmMsi {
                gsi,
                evt,
                mgr: self.0.clone(),
            }));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a routing entry says, comparable: `(gsi, type, chip or address, pin or data)`.
    fn view(e: &kvm_irq_routing_entry) -> (u32, u32, u64, u32) {
        // SAFETY: the union is read as the variant `type_` names.
        unsafe {
            match e.type_ {
                KVM_IRQ_ROUTING_IRQCHIP => (
                    e.gsi,
                    e.type_,
                    u64::from(e.u.irqchip.irqchip),
                    e.u.irqchip.pin,
                ),
                _ => (
                    e.gsi,
                    e.type_,
                    u64::from(e.u.msi.address_hi) << 32 | u64::from(e.u.msi.address_lo),
                    e.u.msi.data,
                ),
            }
        }
    }

    /// The table keeps KVM's default routes (every GSI below 24 to its IOAPIC pin, GSIs 0-7
    /// to the master PIC's pins and 8-15 to the slave's) and adds one route per MSI, its
    /// address in both halves.
    #[test]
    fn the_table_keeps_the_default_routes_and_adds_each_msi() {
        let mut routes = Routes {
            gsis: IdAllocator::new(FIRST_MSI_GSI, LAST_GSI).unwrap(),
            msi: BTreeMap::new(),
        };
        routes.msi.insert(24, (0xfee0_1000, 0x41));
        routes.msi.insert(30, (0x1_fee0_2000, 0x42));
        let got: Vec<_> = KvmInterrupts::entries(&routes).iter().map(view).collect();
        let mut want = Vec::new();
        let chip = |c: u32| u64::from(c);
        for gsi in 0..24 {
            want.push((gsi, KVM_IRQ_ROUTING_IRQCHIP, chip(KVM_IRQCHIP_IOAPIC), gsi));
            if gsi < 8 {
                want.push((
                    gsi,
                    KVM_IRQ_ROUTING_IRQCHIP,
                    chip(KVM_IRQCHIP_PIC_MASTER),
                    gsi,
                ));
            } else if gsi < 16 {
                want.push((
                    gsi,
                    KVM_IRQ_ROUTING_IRQCHIP,
                    chip(KVM_IRQCHIP_PIC_SLAVE),
                    gsi - 8,
                ));
            }
        }
        want.push((24, KVM_IRQ_ROUTING_MSI, 0xfee0_1000, 0x41));
        want.push((30, KVM_IRQ_ROUTING_MSI, 0x1_fee0_2000, 0x42));
        assert_eq!(got, want);
    }

    /// Vectors get GSIs from 24 up, each with an irqfd; enabling a vector routes its GSI to
    /// its message, disabling removes the route, and a vector dropped (hot-unplug) gives its
    /// route and its GSI back.
    #[test]
    fn vectors_route_their_messages_and_give_their_gsis_back() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let ints = KvmInterrupts::new(Arc::new(vm));
        let mgr = KvmInterruptManager(ints.clone());
        let v = mgr.allocate_msi(2).unwrap();
        let routes = || {
            ints.routes
                .locked()
                .msi
                .clone()
                .into_iter()
                .collect::<Vec<_>>()
        };
        assert!(v.iter().all(|v| v.irqfd().is_some()));
        assert_ne!(v[0].irqfd(), v[1].irqfd());
        v[0].update(0xfee0_1000, 0x41, true).unwrap();
        v[1].update(0xfee0_2000, 0x42, true).unwrap();
        assert_eq!(
            routes(),
            vec![(24, (0xfee0_1000, 0x41)), (25, (0xfee0_2000, 0x42))]
        );
        v[1].update(0xfee0_2000, 0x42, false).unwrap();
        assert_eq!(routes(), vec![(24, (0xfee0_1000, 0x41))]);
        let mut v = v;
        v.remove(0);
        assert_eq!(routes(), vec![]);
        // GSI 24 is free again.
        let again = mgr.allocate_msi(1).unwrap();
        again[0].update(0xfee0_3000, 0x43, true).unwrap();
        assert_eq!(routes(), vec![(24, (0xfee0_3000, 0x43))]);
    }

    /// A routed vector's trigger reaches the destination's local APIC: its vector is
    /// pending there (IRR), which is what the routing table is for.
    #[test]
    fn a_triggered_vector_is_pending_in_the_local_apic() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vm = Arc::new(vm);
        let vcpu = vm.create_vcpu(0).unwrap();
        // The spurious-interrupt register (0xf0): software-enabled (bit 8).
        let mut lapic = vcpu.get_lapic().unwrap();
        lapic.regs[0xf1] |= 1;
        vcpu.set_lapic(&lapic).unwrap();
        let ints = KvmInterrupts::new(vm);
        let v = KvmInterruptManager(ints).allocate_msi(1).unwrap();
        // Fixed delivery to APIC 0, vector 0x45 (IRR word 2 at 0x220, bit 5).
        v[0].update(0xfee0_0000, 0x45, true).unwrap();
        v[0].trigger();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let l = vcpu.get_lapic().unwrap();
            if l.regs[0x220] as u8 & (1 << 5) != 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "vector 0x45 never pending"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
