//! The `ioctl` requests the VMM's threads make, as numbers a filter compares `ioctl`'s second
//! argument with (its low 32 bits: the kernel takes `unsigned int cmd`). Built with
//! `vmm-sys-util`'s macros from the kernel's definitions: `include/uapi/linux/kvm.h` (type
//! `KVMIO`, 0xAE) and `include/uapi/asm-generic/ioctls.h`. VFIO's and iommufd's are allowed by
//! type (`';'`): this host has neither, so which of them each path makes cannot be gathered
//! here.

/// The request numbers, as functions (`vmm-sys-util`'s macros make them so).
mod numbers {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_ioeventfd,
        kvm_irq_routing, kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msr_list,
        kvm_msrs, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_translation,
        kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
    ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    // The system's and the VM's.
    ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
    ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
    ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
    ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
    ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
    ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
    ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
}
use numbers::*;

/// `FIONBIO` (the standard library's `set_nonblocking` on sockets).
pub const FIONBIO: u64 = 0x5421;
/// `FIOCLEX`.
pub const FIOCLEX: u64 = 0x5451;
/// `FIONCLEX`.
pub const FIONCLEX: u64 = 0x5450;

/// The `_IOC_TYPE` of KVM's requests.
pub const KVM_TYPE: u8 = kvm_bindings::KVMIO as u8;
/// The `_IOC_TYPE` of VFIO's requests and of iommufd's (both `';'`, `include/uapi/linux/vfio.h`
/// and `iommufd.h`).
pub const VFIO_TYPE: u8 = vfio_bindings::bindings::vfio::VFIO_TYPE;

/// Descriptor flags, on any thread.
pub fn descriptors() -> Vec<u64> {
    vec![FIONBIO, FIOCLEX, FIONCLEX]
}

/// A vCPU thread's own: `KVM_RUN`; its state, saved while it is parked (`KVM_GET_*`); the
/// emulation fallbacks of PVM hosts (`boot::quirks`: registers, FPU, events, `KVM_TRANSLATE`);
/// and the VM's, for the device emulation its exits run: irqfds and GSI routes when the
/// guest programs MSI-X, ioeventfds when it enables queues or moves BARs, memory slots for
/// BARs mapped into the guest.
pub fn vcpu() -> Vec<u64> {
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_TRANSLATE(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_GET_FPU(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_SET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_SET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_SET_XCRS(),
        KVM_GET_XSAVE2(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_SET_GSI_ROUTING(),
        KVM_IRQFD(),
        KVM_IOEVENTFD(),
    ]
}

/// The main thread's and the API's: building the VM (`/dev/kvm`'s and the VM's requests:
/// CPUID, MSRs, the in-kernel interrupt controllers and PIT, memory slots, vCPUs), the event
/// loop's device work (irqfds, ioeventfds, GSI routes, memory slots), migration and
/// snapshots (dirty logs; the VM's clock, interrupt controllers and PIT), and a restore's
/// vCPU state: every request of [`vcpu`] but `KVM_RUN`.
pub fn vm() -> Vec<u64> {
    let mut v = vec![
        KVM_GET_API_VERSION(),
        KVM_CREATE_VM(),
        KVM_GET_MSR_INDEX_LIST(),
        KVM_CHECK_EXTENSION(),
        KVM_GET_VCPU_MMAP_SIZE(),
        KVM_GET_SUPPORTED_CPUID(),
        KVM_CREATE_VCPU(),
        KVM_GET_DIRTY_LOG(),
        KVM_SET_TSS_ADDR(),
        KVM_CREATE_IRQCHIP(),
        KVM_GET_IRQCHIP(),
        KVM_SET_IRQCHIP(),
        KVM_CREATE_PIT2(),
        KVM_SET_CLOCK(),
        KVM_GET_CLOCK(),
        KVM_SET_CPUID2(),
        KVM_GET_PIT2(),
        KVM_SET_PIT2(),
        KVM_GET_TSC_KHZ(),
    ];
    v.extend(vcpu().into_iter().filter(|&r| r != KVM_RUN()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers are the kernel's (`include/uapi/linux/kvm.h` on x86-64, as `strace`
    /// prints them).
    #[test]
    fn numbers_are_the_kernels() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SET_REGS(), 0x4090_ae82);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_TRANSLATE(), 0xc018_ae85);
        assert_eq!(KVM_CREATE_VM(), 0xae01);
        assert_eq!(KVM_CREATE_VCPU(), 0xae41);
        assert_eq!(KVM_GET_SUPPORTED_CPUID(), 0xc008_ae05);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_SET_CPUID2(), 0x4008_ae90);
        assert_eq!(KVM_GET_CLOCK(), 0x8030_ae7c);
        assert_eq!(KVM_GET_PIT2(), 0x8070_ae9f);
        assert_eq!(KVM_SET_IRQCHIP(), 0x8208_ae63);
        assert_eq!(u32::from(VFIO_TYPE), u32::from(b';'));
    }
}
