//! KVM state of the vCPUs and of the in-kernel irqchip, PIT and clock, as saved for a
//! snapshot or a migration. The structures are KVM's own (`kvm-bindings` with its `serde`
//! feature); MSRs are saved as `(index, value)` pairs over every MSR KVM lists as saveable
//! (`KVM_GET_MSR_INDEX_LIST`), skipping those the host refuses to read.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Why KVM state could not be saved or restored: the ioctl that failed.
#[derive(Debug, thiserror::Error)]
#[error("{0} failed: {1}")]
pub struct KvmStateError(pub &'static str, #[source] pub kvm_ioctls::Error);

fn e(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |err| KvmStateError(what, err)
}

/// The state of one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers (`KVM_GET_REGS`).
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers (`KVM_GET_SREGS`).
    pub sregs: kvm_sregs,
    /// x87/SSE state (`KVM_GET_FPU`), as bytes.
    pub fpu: Vec<u8>,
    /// Local APIC (`KVM_GET_LAPIC`).
    pub lapic: kvm_lapic_state,
    /// `(index, value)` of every saveable MSR.
    pub msrs: Vec<(u32, u64)>,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs (`KVM_GET_VCPU_EVENTS`).
    pub events: kvm_vcpu_events,
    /// `KVM_GET_XCRS`, when the host has XSAVE.
    pub xcrs: Option<kvm_xcrs>,
    /// `KVM_GET_DEBUGREGS`.
    pub debugregs: kvm_debugregs,
}

/// MSRs KVM can save (`KVM_GET_MSR_INDEX_LIST`).
pub fn saveable_msrs(kvm: &Kvm) -> Vec<u32> {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default()
}

fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    // SAFETY: `kvm_fpu` is plain old data without padding-dependent invariants; reading its
    // bytes is sound.
    unsafe {
        std::slice::from_raw_parts(
            (f as *const kvm_fpu).cast::<u8>(),
            std::mem::size_of::<kvm_fpu>(),
        )
    }
    .to_vec()
}

fn fpu_from(bytes: &[u8]) -> Option<kvm_fpu> {
    if bytes.len() != std::mem::size_of::<kvm_fpu>() {
        return None;
    }
    let mut f = kvm_fpu::default();
    // SAFETY: the lengths match and every bit pattern is a valid `kvm_fpu` (integers only).
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut f as *mut kvm_fpu).cast::<u8>(),
            bytes.len(),
        )
    };
    Some(f)
}

/// Reads the MSRs in `indices` one batch at a time; an MSR the host refuses is skipped.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Vec<(u32, u64)> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            break;
        };
        let n = vcpu.get_msrs(&mut msrs).unwrap_or(0).min(rest.len());
        out.extend(msrs.as_slice()[..n].iter().map(|m| (m.index, m.data)));
        // KVM stops at the first MSR it cannot read: skip it.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    out
}

impl VcpuState {
    /// Saves `vcpu` (which must not be running).
    ///
    /// # Errors
    /// The first ioctl that fails.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, KvmStateError> {
        // The MP state first: it may flush pending events into the other structures.
        let mp_state = vcpu.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
        Ok(Self {
            mp_state,
            regs: vcpu.get_regs().map_err(e("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?,
            fpu: fpu_bytes(&vcpu.get_fpu().map_err(e("KVM_GET_FPU"))?),
            lapic: vcpu.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
            msrs: read_msrs(vcpu, msr_indices),
            events: vcpu.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
            xcrs: vcpu.get_xcrs().ok(),
            debugregs: vcpu.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Loads the state into `vcpu` (created and configured with the same CPUID).
    ///
    /// # Errors
    /// The first ioctl that fails.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), KvmStateError> {
        vcpu.set_sregs(&self.sregs).map_err(e("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(e("KVM_SET_REGS"))?;
        let fpu = fpu_from(&self.fpu).unwrap_or_default();
        vcpu.set_fpu(&fpu).map_err(e("KVM_SET_FPU"))?;
        if let Some(x) = &self.xcrs {
            vcpu.set_xcrs(x).map_err(e("KVM_SET_XCRS"))?;
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        // One at a time past a refusal, as for saving.
        let mut rest = &entries[..];
        while !rest.is_empty() {
            let Ok(msrs) = Msrs::from_entries(rest) else {
                break;
            };
            let n = vcpu.set_msrs(&msrs).unwrap_or(0).min(rest.len());
            if n < rest.len() {
                log::debug!("KVM_SET_MSRS refused MSR {:#x}", rest[n].index);
            }
            rest = &rest[(n + 1).min(rest.len())..];
        }
        vcpu.set_lapic(&self.lapic).map_err(e("KVM_SET_LAPIC"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(e("KVM_SET_MP_STATE"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

/// The VM-wide in-kernel devices.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC (`KVM_GET_IRQCHIP`).
    pub irqchips: Vec<kvm_irqchip>,
    /// `KVM_GET_PIT2`.
    pub pit: kvm_pit_state2,
    /// `KVM_GET_CLOCK`.
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Saves the irqchip, PIT and clock of `vm`.
    ///
    /// # Errors
    /// The first ioctl that fails.
    pub fn save(vm: &VmFd) -> Result<Self, KvmStateError> {
        let mut irqchips = Vec::new();
        for id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).map_err(e("KVM_GET_IRQCHIP"))?;
            irqchips.push(c);
        }
        Ok(Self {
            irqchips,
            pit: vm.get_pit2().map_err(e("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(e("KVM_GET_CLOCK"))?,
        })
    }

    /// Loads the state into `vm`.
    ///
    /// # Errors
    /// The first ioctl that fails.
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        for c in &self.irqchips {
            vm.set_irqchip(c).map_err(e("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(e("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(e("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
