//! KVM state of the vCPUs and of the in-kernel irqchip, PIT and clock, as saved for a
//! snapshot or a migration. The structures are KVM's own (`kvm-bindings` with its `serde`
//! feature); MSRs are saved as `(index, value)` pairs over every MSR KVM lists as saveable
//! (`KVM_GET_MSR_INDEX_LIST`), skipping those the host refuses to read; the extended state
//! is the XSAVE area (`KVM_GET_XSAVE2` at the size `KVM_CAP_XSAVE2` gives, or the 4 KiB
//! `KVM_GET_XSAVE`) with the XCRs. Restoring refuses a malformed blob (it never loads zeros
//! instead) and lists every MSR the destination host refuses.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    kvm_xsave2, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::fam::FamStruct;

/// Why KVM state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    /// The ioctl that failed.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// A saved structure does not have the shape this host needs.
    #[error("malformed {0}")]
    Malformed(String),
    /// MSRs this host refused to load.
    #[error("this host refuses MSRs {}", list_msrs(.0))]
    MsrsRefused(Vec<u32>),
}

fn list_msrs(v: &[u32]) -> String {
    v.iter()
        .map(|m| format!("{m:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn e(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |err| KvmStateError::Ioctl(what, err)
}

/// Bytes of the XSAVE area this host's KVM saves: the `KVM_CAP_XSAVE2` size, 4096 for plain
/// `KVM_CAP_XSAVE`, 0 without XSAVE.
pub fn xsave_size(vm: &VmFd) -> usize {
    match vm.check_extension_int(Cap::Xsave2) {
        n if n > 0 => n as usize,
        _ if vm.check_extension(Cap::Xsave) => std::mem::size_of::<kvm_xsave>(),
        _ => 0,
    }
}

/// Entries of `kvm_xsave2`'s flexible array for an area of `size` bytes.
fn xsave_entries(size: usize) -> usize {
    size.saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(std::mem::size_of::<<kvm_xsave2 as FamStruct>::Entry>())
}

fn xsave_save(vcpu: &VcpuFd, size: usize) -> Result<Option<Vec<u8>>, KvmStateError> {
    if size == 0 {
        return Ok(None);
    }
    let mut x = Xsave::new(xsave_entries(size))
        .map_err(|e| KvmStateError::Malformed(format!("XSAVE area of {size} bytes: {e:?}")))?;
    if size > std::mem::size_of::<kvm_xsave>() {
        // SAFETY: `x` holds `size` bytes, the size KVM_CAP_XSAVE2 reported for this VM.
        unsafe { vcpu.get_xsave2(&mut x) }.map_err(e("KVM_GET_XSAVE2"))?;
    } else {
        let legacy = vcpu.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
        // SAFETY: only the fixed `xsave` field is written, not the length of the array.
        unsafe { x.as_mut_fam_struct() }.xsave = legacy;
    }
    Ok(Some(xsave_bytes(&x, size)))
}

fn xsave_bytes(x: &Xsave, size: usize) -> Vec<u8> {
    let fam = x.as_fam_struct_ref();
    let head = std::mem::size_of::<kvm_xsave>();
    // SAFETY: `kvm_xsave` is integers only; its bytes are read as bytes.
    let mut out =
        unsafe { std::slice::from_raw_parts((&fam.xsave as *const kvm_xsave).cast::<u8>(), head) }
            .to_vec();
    for w in x.as_slice() {
        out.extend_from_slice(&w.to_ne_bytes());
    }
    out.truncate(size);
    out
}

/// A saved XSAVE area as KVM takes it, which must be exactly the `size` bytes this host
/// saves (`KVM_CAP_XSAVE2`, or 4096 for the legacy area).
///
/// # Errors
/// [`KvmStateError::Malformed`] for any other length.
fn xsave_from(bytes: &[u8], size: usize) -> Result<Xsave, KvmStateError> {
    let head = std::mem::size_of::<kvm_xsave>();
    if bytes.len() != size || size < head {
        return Err(KvmStateError::Malformed(format!(
            "XSAVE area: {} bytes saved, this host's KVM uses {size}",
            bytes.len()
        )));
    }
    let mut x = Xsave::new(xsave_entries(size))
        .map_err(|e| KvmStateError::Malformed(format!("XSAVE area of {size} bytes: {e:?}")))?;
    {
        // SAFETY: only the fixed `xsave` field is written, not the length of the array.
        let fam = unsafe { x.as_mut_fam_struct() };
        // SAFETY: `bytes` has `size >= head` bytes (checked above) and `kvm_xsave` is
        // integers only.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut fam.xsave as *mut kvm_xsave).cast::<u8>(),
                head,
            )
        };
    }
    for (w, c) in x.as_mut_slice().iter_mut().zip(bytes[head..].chunks(4)) {
        let mut b = [0u8; 4];
        b[..c.len()].copy_from_slice(c);
        *w = u32::from_ne_bytes(b);
    }
    Ok(x)
}

/// Loads a saved XSAVE area ([`xsave_from`]) into `vcpu`.
fn xsave_restore(vcpu: &VcpuFd, x: &Xsave, size: usize) -> Result<(), KvmStateError> {
    if size > std::mem::size_of::<kvm_xsave>() {
        // SAFETY: `x` holds the `size` bytes KVM_CAP_XSAVE2 reports for this VM.
        unsafe { vcpu.set_xsave2(x) }.map_err(e("KVM_SET_XSAVE2"))
    } else {
        // SAFETY: a 4 KiB legacy area, the size KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&x.as_fam_struct_ref().xsave) }.map_err(e("KVM_SET_XSAVE"))
    }
}

/// What [`VcpuState::restore`] checks and builds before its first ioctl: the FPU state and
/// the XSAVE area as KVM takes them.
pub struct CheckedVcpuState {
    fpu: kvm_fpu,
    xsave: Option<Xsave>,
}

impl CheckedVcpuState {
    /// The bytes KVM is given: the FPU state, and the XSAVE area of `xsave_size` bytes (the
    /// size [`VcpuState::check`] was given), if any.
    pub fn images(&self, xsave_size: usize) -> (Vec<u8>, Option<Vec<u8>>) {
        (
            fpu_bytes(&self.fpu),
            self.xsave.as_ref().map(|x| xsave_bytes(x, xsave_size)),
        )
    }
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
    /// The XSAVE area (`KVM_GET_XSAVE2`/`KVM_GET_XSAVE`), when the host has XSAVE.
    #[serde(default)]
    pub xsave: Option<Vec<u8>>,
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
    pub fn save(
        vcpu: &VcpuFd,
        msr_indices: &[u32],
        xsave_size: usize,
    ) -> Result<Self, KvmStateError> {
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
            xcrs: if xsave_size > 0 {
                Some(vcpu.get_xcrs().map_err(e("KVM_GET_XCRS"))?)
            } else {
                None
            },
            xsave: xsave_save(vcpu, xsave_size)?,
            debugregs: vcpu.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Checks the state against this host before anything is loaded, and builds what the
    /// ioctls take: the FPU state from its bytes, and the XSAVE area, which must be there
    /// exactly when this host has one (`xsave_size` bytes, 0 for none) and of its size.
    ///
    /// # Errors
    /// [`KvmStateError::Malformed`] naming what does not fit.
    pub fn check(&self, xsave_size: usize) -> Result<CheckedVcpuState, KvmStateError> {
        let fpu = fpu_from(&self.fpu).ok_or_else(|| {
            KvmStateError::Malformed(format!(
                "FPU state: {} bytes, kvm_fpu has {}",
                self.fpu.len(),
                std::mem::size_of::<kvm_fpu>()
            ))
        })?;
        if self.xsave.is_some() != (xsave_size > 0) {
            return Err(KvmStateError::Malformed(format!(
                "XSAVE area {} but this host {} XSAVE",
                if self.xsave.is_some() {
                    "saved"
                } else {
                    "missing"
                },
                if xsave_size > 0 { "has" } else { "lacks" }
            )));
        }
        let xsave = match &self.xsave {
            Some(x) => Some(xsave_from(x, xsave_size)?),
            None => None,
        };
        Ok(CheckedVcpuState { fpu, xsave })
    }

    /// Loads the state into `vcpu` (created and configured with the same CPUID), once
    /// [`VcpuState::check`] took it.
    ///
    /// # Errors
    /// What [`VcpuState::check`] refuses, then the first ioctl that fails.
    pub fn restore(&self, vcpu: &VcpuFd, xsave_size: usize) -> Result<(), KvmStateError> {
        let checked = self.check(xsave_size)?;
        vcpu.set_sregs(&self.sregs).map_err(e("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(e("KVM_SET_REGS"))?;
        vcpu.set_fpu(&checked.fpu).map_err(e("KVM_SET_FPU"))?;
        if let Some(x) = &checked.xsave {
            xsave_restore(vcpu, x, xsave_size)?;
        }
        if let Some(x) = &self.xcrs {
            vcpu.set_xcrs(x).map_err(e("KVM_SET_XCRS"))?;
        }
        // The TSC deadline after the local APIC: KVM ignores a deadline written while the
        // APIC's timer is not in TSC-deadline mode (QEMU orders it the same way), and the
        // guest would wait for a timer interrupt that never comes.
        let entries = |deadline: bool| -> Vec<kvm_msr_entry> {
            self.msrs
                .iter()
                .filter(|&&(index, _)| (index == MSR_IA32_TSC_DEADLINE) == deadline)
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect()
        };
        let mut refused = set_msrs(vcpu, &entries(false))?;
        vcpu.set_lapic(&self.lapic).map_err(e("KVM_SET_LAPIC"))?;
        refused.extend(set_msrs(vcpu, &entries(true))?);
        if !refused.is_empty() {
            return Err(KvmStateError::MsrsRefused(refused));
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(e("KVM_SET_MP_STATE"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

/// `MSR_IA32_TSC_DEADLINE` (Intel SDM vol. 4, table 2-2).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Loads `entries` into `vcpu`; past a refusal, on with the next one. Returns the MSRs the
/// host refused.
fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<Vec<u32>, KvmStateError> {
    let mut rest = entries;
    let mut refused = Vec::new();
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest)
            .map_err(|e| KvmStateError::Malformed(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).unwrap_or(0).min(rest.len());
        if n < rest.len() {
            refused.push(rest[n].index);
        }
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(refused)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX state crosses a switchover: a vCPU's XMM registers, the upper halves of its
    /// YMM registers (the XSAVE area's AVX component) and XCR0 saved from one vCPU and
    /// restored into a new one (as the destination does) come back from KVM unchanged.
    ///
    /// This replaces a guest that uses AVX across a migration: on this PVM host guest code
    /// runs in KVM's instruction emulator, which refuses VEX-encoded instructions, so the
    /// guests run with `clearcpuid=avx,...,xsave` and no guest can hold AVX state. What the
    /// VMM must carry is the area itself, and this test has KVM load and save it.
    /// SKIP without /dev/kvm, without XSAVE, or when KVM offers no AVX.
    #[test]
    fn the_avx_state_survives_a_round_trip_through_kvm() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("SKIP: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let size = xsave_size(&vm);
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let leaf = |f: u32, i: u32| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .copied()
        };
        // CPUID 0xD sub-leaf 0: the XCR0 bits KVM supports; sub-leaf 2: the AVX component's
        // size and offset in the standard form.
        let avx = leaf(0xd, 0).is_some_and(|l| l.eax & 0x4 != 0);
        let Some(ymm) = leaf(0xd, 2).filter(|l| l.eax == 256 && avx) else {
            eprintln!("SKIP: KVM supports no AVX state component");
            return;
        };
        // The size saved is KVM's: the XSAVE2 size when it reports one, else the legacy
        // area's (a host with the AVX component has XSAVE).
        assert!(vm.check_extension(Cap::Xsave), "AVX state without XSAVE");
        let legacy = std::mem::size_of::<kvm_xsave>();
        match vm.check_extension_int(Cap::Xsave2) {
            n if n > 0 => assert_eq!(size, n as usize),
            _ => assert_eq!(size, legacy),
        }
        // This PVM host's KVM leaves XSAVE and AVX out of CPUID leaf 1 (its guests cannot
        // run them) while supporting the AVX component: the vCPUs get both bits, as a guest
        // on a host whose KVM offers them would see them.
        let mut cpuid = cpuid.clone();
        for l in cpuid.as_mut_slice() {
            if l.function == 1 {
                l.ecx |= (1 << 26) | (1 << 28);
            }
        }
        let new_vcpu = |id| {
            let v = vm.create_vcpu(id).unwrap();
            v.set_cpuid2(&cpuid).unwrap();
            v
        };
        let src = new_vcpu(0);
        // XCR0: x87, SSE and AVX on, as a guest that uses AVX sets it.
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = 0x7;
        src.set_xcrs(&xcrs).unwrap();
        let mut st = VcpuState::save(&src, &[], size).unwrap();
        let area = st.xsave.as_mut().expect("an XSAVE area");
        // XMM0-15 (legacy area, bytes 160..416), YMM_Hi128 0-15, and XSTATE_BV (header,
        // byte 512) saying both components hold state.
        let (xmm, hi) = (160..416, ymm.ebx as usize..ymm.ebx as usize + 256);
        for (i, b) in area[xmm.clone()].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(7).wrapping_add(1);
        }
        for (i, b) in area[hi.clone()].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(13).wrapping_add(5);
        }
        let bv = u64::from_le_bytes(area[512..520].try_into().unwrap()) | 0x6;
        area[512..520].copy_from_slice(&bv.to_le_bytes());
        // The saved FPU state carries XMM too; KVM_SET_FPU runs first, then the area.
        let sent = st.xsave.clone().unwrap();

        let dst = new_vcpu(1);
        st.restore(&dst, size).unwrap();
        let back = VcpuState::save(&dst, &[], size).unwrap();
        let got = back.xsave.expect("an XSAVE area");
        assert_eq!(got[hi.clone()], sent[hi], "YMM upper halves");
        assert_eq!(got[xmm.clone()], sent[xmm], "XMM registers");
        let bv = u64::from_le_bytes(got[512..520].try_into().unwrap());
        assert_eq!(bv & 0x4, 0x4, "XSTATE_BV keeps the AVX component");
        let xcr0 = back.xcrs.map(|x| (x.xcrs[0].xcr, x.xcrs[0].value));
        assert_eq!(xcr0, Some((0, 0x7)));
    }

    #[test]
    fn malformed_blobs_are_refused_and_msrs_named() {
        assert!(fpu_from(&[0u8; 3]).is_none());
        let f = kvm_fpu {
            fcw: 0x37f,
            ..Default::default()
        };
        assert_eq!(fpu_from(&fpu_bytes(&f)).map(|g| g.fcw), Some(0x37f));
        assert_eq!(xsave_entries(4096), 0);
        assert_eq!(xsave_entries(4096 + 8), 2);
        assert_eq!(xsave_entries(4096 + 6), 2);
        let e = KvmStateError::MsrsRefused(vec![0x10, 0xc000_0080]);
        assert_eq!(e.to_string(), "this host refuses MSRs 0x10, 0xc0000080");
        // A saved area round-trips through the wrapper unchanged.
        let mut x = Xsave::new(xsave_entries(4096 + 64)).unwrap();
        // SAFETY: only the fixed part is written.
        unsafe { x.as_mut_fam_struct() }.xsave.region[0] = 0xdead_beef;
        x.as_mut_slice()[15] = 7;
        let bytes = xsave_bytes(&x, 4096 + 64);
        assert_eq!(bytes.len(), 4160);
        assert_eq!(&bytes[..4], &0xdead_beefu32.to_ne_bytes());
        assert_eq!(&bytes[4156..], &7u32.to_ne_bytes());
    }
}
