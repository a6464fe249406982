//! Loading and entering a Linux kernel on x86_64 KVM.
//!
//! - [`loader`]: ELF (`vmlinux`) and `bzImage` loading with `linux-loader`, the initramfs, the
//!   command line and the zero page (`boot_params`, with the e820 map).
//! - [`cpu`]: long-mode entry (identity page tables with 2 MiB pages, GDT), CPUID, MSRs, FPU
//!   and LAPIC.
//! - [`acpi`]: the ACPI tables (RSDP, XSDT, FADT, MADT, DSDT, MCFG, VIOT) built from a
//!   [`acpi::PlatformDescription`] the VMM fills; this crate knows nothing of devices.
//! - [`quirks`]: PVM host detection, command-line additions and the emulation fallback.
//! - [`layout`]: the guest-physical address map.

pub mod acpi;
pub mod cpu;
pub mod layout;
pub mod loader;
pub mod quirks;

use std::path::PathBuf;

/// Errors while preparing a guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}")]
    OpenKernel {
        /// Path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF file nor a bzImage.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    /// The kernel image is malformed.
    #[error("cannot load kernel {path}")]
    LoadKernel {
        /// Path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel does not fit in guest RAM.
    #[error("kernel {path} does not fit in {} MiB of guest memory", mem_size >> 20)]
    KernelTooBig {
        /// Path given.
        path: PathBuf,
        /// Guest RAM, bytes.
        mem_size: u64,
    },
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}")]
    OpenInitramfs {
        /// Path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of low RAM.
    #[error("initramfs {path} ({size} bytes) does not fit in {} MiB of guest memory next to the kernel", mem_size >> 20)]
    InitramfsTooBig {
        /// Path given.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// Guest RAM, bytes.
        mem_size: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::loader::Error),
    /// The command line could not be built.
    #[error("invalid kernel command line")]
    CmdlineBuild(#[source] linux_loader::cmdline::Error),
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    WriteBootData(&'static str),
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM's emulator refused an instruction that no fallback handles.
    #[error(
        "KVM cannot emulate the guest instruction `{disassembly}` (bytes {bytes}) at RIP {rip:#x}"
    )]
    UnhandledInstruction {
        /// Guest RIP.
        rip: u64,
        /// Instruction bytes in hex.
        bytes: String,
        /// Intel-syntax disassembly.
        disassembly: String,
    },
    /// Building the ACPI tables failed.
    #[error("cannot build ACPI tables: {0}")]
    Acpi(String),
}
