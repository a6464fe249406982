//! The guest-physical address map shared by the loader, the CPU setup, ACPI and the devices.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)           0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  boot stack top            0x0000_9000  PML4, PDPT, 4 PDs, high PDPT
//! 0x0002_0000  kernel command line       0x0009_fc00  EBDA (reserved) .. 1 MiB
//! 0x000e_0000  ACPI tables (RSDP first)  0x0010_0000  RAM (kernel at 16 MiB for vmlinux)
//! 0xc000_0000  32-bit MMIO hole: PCI BARs (0xc000_0000..0xe000_0000), ECAM at 0xe000_0000,
//!              PCI hot-plug registers 0xe010_0000, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 4 GiB        RAM above the hole, then the 64-bit PCI window
//! ```

/// GPA of the boot GDT.
pub const GDT_START: u64 = 0x500;
/// GPA of the (empty) boot IDT.
pub const IDT_START: u64 = 0x520;
/// GPA of the Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// GPA of the boot PML4; the PDPT and the page directories follow it.
pub const PML4_START: u64 = 0x9000;
/// GPA of the boot PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// GPA of the first of the boot page directories (one per GiB identity mapped).
pub const PDE_START: u64 = 0xb000;
/// GiB of address space identity mapped with 2 MiB pages at entry.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// GPA of the PDPT that maps the top 2 GiB of the address space (0xffff_ffff_8000_0000) to
/// the first 2 GiB of physical memory, as Linux's kernel mapping does: PVM hosts run guest
/// kernel code natively only there.
pub const PDPTE_HIGH_START: u64 = 0xf000;
/// GPA of the kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, bytes including the NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// GPA where the ACPI tables start (the RSDP sits at the start, inside the BIOS scan area).
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the area reserved for ACPI tables.
pub const ACPI_END: u64 = 0x100000;
/// First byte of RAM above the legacy area.
pub const HIGH_RAM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole: RAM below 4 GiB ends here.
pub const MMIO_32_START: u64 = 0xc000_0000;
/// Start of the PCI 32-bit BAR window.
pub const PCI_MMIO_32_START: u64 = MMIO_32_START;
/// Size of the PCI 32-bit BAR window.
pub const PCI_MMIO_32_SIZE: u64 = 0x2000_0000;
/// GPA of the PCI ECAM (MMCONFIG) area.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM area: one bus (32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// GPA of the PCI hot-plug registers (`devices::pci::hotplug`), right after ECAM.
pub const PCI_HOTPLUG_START: u64 = PCI_ECAM_START + PCI_ECAM_SIZE;
/// Size of the PCI hot-plug registers.
pub const PCI_HOTPLUG_SIZE: u64 = 0x10;
/// GPA of the IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// GPA of the local APICs.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// End (exclusive) of the 32-bit hole.
pub const MMIO_32_END: u64 = 0x1_0000_0000;
/// Start of RAM above 4 GiB.
pub const RAM_64_START: u64 = 0x1_0000_0000;
/// Size of the 64-bit PCI BAR window placed after the end of RAM.
pub const PCI_MMIO_64_SIZE: u64 = 0x10_0000_0000;

/// The x86 MSI doorbell range that the IOMMU must report as a reserved region
/// (`0xfee0_0000..=0xfeef_ffff`).
pub const MSI_RANGE_START: u64 = 0xfee0_0000;
/// Last byte of the x86 MSI doorbell range.
pub const MSI_RANGE_END: u64 = 0xfeef_ffff;

/// Legacy I/O port of the first 16550 UART.
pub const SERIAL_PORT: u16 = 0x3f8;
/// GSI of the first UART.
pub const SERIAL_GSI: u32 = 4;
/// GSI of the Generic Event Device (PCI hot-plug notifications).
pub const GED_GSI: u32 = 5;
/// i8042 command/status port (a `0xfe` command resets the machine).
pub const I8042_PORT: u16 = 0x60;
/// I/O port of the ACPI PM1a event block (hardware-reduced sleep status register).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x600;
/// I/O port of the ACPI sleep control register: writing SLP_EN with SLP_TYP 5 powers off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x601;
/// I/O port of the ACPI reset register (FADT `RESET_REG`).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// I/O port of the test-exit device: a 32-bit write ends the VM with that exit code.
pub const TEST_EXIT_PORT: u16 = 0x604;
/// Legacy PCI configuration address port (the data port follows at `0xcfc`).
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;

/// Guest RAM ranges `(start GPA, size in bytes)` for `mem_size` bytes of RAM, split around the
/// 32-bit MMIO hole.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_32_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_32_START), (RAM_64_START, mem_size - MMIO_32_START)]
    }
}

/// First GPA after the last byte of RAM.
pub fn ram_end(mem_size: u64) -> u64 {
    ram_ranges(mem_size)
        .last()
        .map(|&(start, size)| start + size)
        .unwrap_or(0)
}

/// Start of the 64-bit PCI window: the end of RAM rounded up to 1 GiB, at least 4 GiB.
pub fn pci_mmio_64_start(mem_size: u64) -> u64 {
    let end = ram_end(mem_size).max(RAM_64_START);
    end.div_ceil(1 << 30) << 30
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_32_START), (RAM_64_START, 1 << 30)]
        );
        assert_eq!(ram_end(4 << 30), 5 << 30);
        assert_eq!(pci_mmio_64_start(512 << 20), 4 << 30);
        assert_eq!(pci_mmio_64_start(4 << 30), 5 << 30);
    }
}
