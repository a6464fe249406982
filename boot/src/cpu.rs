//! vCPU state for entering a kernel directly in 64-bit long mode: identity page tables with
//! 2 MiB pages (1 GiB pages triple-fault on PVM hosts), a flat GDT, CPUID from
//! `KVM_GET_SUPPORTED_CPUID`, boot MSRs, FPU and LAPIC LINT pins.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;
use crate::BootError;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Selector of the boot code segment (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the boot TSS.
pub const BOOT_TSS: u16 = 0x20;

/// Builds a GDT descriptor from flags, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// Returns the CPUID table for vCPU `id` of `count`: what KVM supports, with the APIC ID,
/// the hypervisor bit and the topology leaves set.
///
/// # Errors
/// [`BootError::Kvm`] if KVM cannot report its supported CPUID.
pub fn cpuid_for(kvm: &Kvm, id: u8, count: u8, tsc_khz: Option<u32>) -> Result<CpuId, BootError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BootError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    // The hypervisor timing leaf (0x40000010): EAX = TSC kHz, EBX = LAPIC timer kHz.
    if let Some(khz) = tsc_khz {
        let mut entries: Vec<_> = cpuid.as_slice().to_vec();
        let mut has_leaf = false;
        for e in &mut entries {
            if e.function == 0x4000_0000 {
                e.eax = e.eax.max(0x4000_0010);
            }
            if e.function == 0x4000_0010 {
                has_leaf = true;
                e.eax = khz;
                e.ebx = 1_000_000;
            }
        }
        if !has_leaf {
            entries.push(kvm_bindings::kvm_cpuid_entry2 {
                function: 0x4000_0010,
                eax: khz,
                ebx: 1_000_000,
                ..Default::default()
            });
        }
        cpuid =
            CpuId::from_entries(&entries).map_err(|_| BootError::WriteBootData("CPUID table"))?;
    }
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (entry.ebx & 0xffff);
                entry.ecx |= 1 << 31; // hypervisor present
                                      // HTT: the logical processor count in EBX[23:16] is valid.
                if count > 1 {
                    entry.edx |= 1 << 28;
                } else {
                    entry.edx &= !(1 << 28);
                }
            }
            // Deterministic cache parameters: one core per vCPU, caches not shared by threads.
            4 => {
                entry.eax = (entry.eax & 0x3fff) | (u32::from(count.saturating_sub(1)) << 26);
            }
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Sets CPUID, MSRs, FPU and LAPIC of any vCPU.
///
/// # Errors
/// [`BootError::Kvm`] naming the ioctl that failed.
pub fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd, id: u8, count: u8) -> Result<(), BootError> {
    let tsc_khz = vcpu.get_tsc_khz().ok().filter(|&k| k > 0);
    let cpuid = cpuid_for(kvm, id, count, tsc_khz)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| BootError::Kvm("KVM_SET_CPUID2", e))?;

    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| BootError::WriteBootData("MSR list"))?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| BootError::Kvm("KVM_SET_MSRS", e))?;
    if written != entries.len() {
        log::debug!(
            "KVM_SET_MSRS set {written} of {} boot MSRs (MSR {:#x} refused)",
            entries.len(),
            entries[written].index
        );
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| BootError::Kvm("KVM_SET_FPU", e))?;

    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| BootError::Kvm("KVM_GET_LAPIC", e))?;
    let set_lvt = |regs: &mut [i8], reg: usize, mode: u32| {
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(&regs[reg..reg + 4]) {
            *b = *r as u8;
        }
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (r, b) in regs[reg..reg + 4].iter_mut().zip(v.to_le_bytes()) {
            *r = b as i8;
        }
    };
    set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| BootError::Kvm("KVM_SET_LAPIC", e))?;
    Ok(())
}

/// Writes the boot GDT and identity page tables into guest memory.
///
/// # Errors
/// [`BootError::WriteBootData`] if low memory is missing.
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<[u64; 5], BootError> {
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // BOOT_CS: 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // BOOT_DS: data
        gdt_entry(0x808b, 0, 0xfffff), // BOOT_TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(|_| BootError::WriteBootData("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|_| BootError::WriteBootData("IDT"))?;

    let err = |_| BootError::WriteBootData("page tables");
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(err)?;
    // The top 2 GiB map the first 2 GiB, through the same page directories.
    mem.write_obj(PDPTE_HIGH_START | 0x3, GuestAddress(PML4_START + 511 * 8))
        .map_err(err)?;
    mem.write_obj(PDE_START | 0x3, GuestAddress(PDPTE_HIGH_START + 510 * 8))
        .map_err(err)?;
    mem.write_obj(
        (PDE_START + 0x1000) | 0x3,
        GuestAddress(PDPTE_HIGH_START + 511 * 8),
    )
    .map_err(err)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPTE_START + gib * 8))
            .map_err(err)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            // Present, writable, 2 MiB page.
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))
                .map_err(err)?;
        }
    }
    Ok(gdt)
}

/// Puts the boot vCPU in 64-bit mode at `entry` with `rsi` pointing at the zero page.
///
/// # Errors
/// [`BootError::Kvm`] or [`BootError::WriteBootData`].
pub fn setup_boot_vcpu<M: GuestMemoryBackend>(
    mem: &M,
    vcpu: &VcpuFd,
    entry: GuestAddress,
) -> Result<(), BootError> {
    let gdt = write_boot_tables(mem)?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| BootError::Kvm("KVM_GET_SREGS", e))?;
    let code = segment_from_gdt(gdt[2], BOOT_CS);
    let data = segment_from_gdt(gdt[3], BOOT_DS);
    let tss = segment_from_gdt(gdt[4], BOOT_TSS);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| BootError::Kvm("KVM_SET_SREGS", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| BootError::Kvm("KVM_SET_REGS", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), BOOT_CS);
        assert_eq!(code.l, 1);
        assert_eq!(code.present, 1);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), BOOT_DS);
        assert_eq!(data.db, 1);
        assert_eq!(data.type_, 0x3);
    }
}
