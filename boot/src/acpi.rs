//! ACPI tables for a hardware-reduced x86 platform, built with `acpi_tables`: RSDP, XSDT,
//! FADT, MADT, DSDT (PCI host bridge with its windows, ECAM reservation, COM1, `_S5`), MCFG,
//! and VIOT (ACPI 6.5 section 5.2.32; Linux `drivers/acpi/viot.c`) describing the
//! virtio-iommu and which PCI endpoints sit behind it. The caller describes the platform;
//! this module knows nothing of device models.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Package, Path,
    ResourceTemplate,
};
use acpi_tables::aml::{
    And, Arg, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Local,
    Method, MethodCall, NotEqual, Notify, OpRegion, OpRegionSpace, ShiftLeft, Store,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::viot::{PciDevice, PciRange, VirtIoPciIommu, VIOT};
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::*;
use crate::BootError;

const OEM_ID: [u8; 6] = *b"VMMVIO";
const OEM_TABLE_ID: [u8; 8] = *b"VMMVIOMM";

/// What the ACPI tables describe.
#[derive(Debug, Clone)]
pub struct PlatformDescription {
    /// Number of vCPUs (APIC IDs `0..cpus`).
    pub cpus: u8,
    /// The 32-bit PCI window `(start, size)`.
    pub pci_mmio32: (u64, u64),
    /// The 64-bit PCI window `(start, size)`.
    pub pci_mmio64: (u64, u64),
    /// The virtio-iommu, if any.
    pub iommu: Option<IommuTopology>,
    /// The PCI slots that take devices while the guest runs, if any.
    pub hotplug: Option<HotplugSlots>,
}

/// ACPI PCI hot-plug: the slots the DSDT declares ejectable, and where their registers and
/// the Generic Event Device's interrupt are (`devices::pci::hotplug`).
#[derive(Debug, Clone)]
pub struct HotplugSlots {
    /// Device numbers (bus 0, function 0) of the hot-pluggable slots.
    pub slots: Vec<u8>,
    /// GPA of the 16-byte register block (`PCIU`, `PCID`, `B0EJ`).
    pub regs: u64,
    /// GSI of the Generic Event Device (edge, active high).
    pub gsi: u32,
}

/// The VIOT's content: where the virtio-iommu is and which endpoints it translates.
#[derive(Debug, Clone)]
pub struct IommuTopology {
    /// PCI device number (bus 0, function 0) of the virtio-iommu.
    pub iommu_device: u8,
    /// PCI device numbers (bus 0, function 0) behind it; their endpoint ID is their BDF.
    pub endpoints: Vec<u8>,
}

/// MADT Interrupt Source Override (ACPI 6.5 section 5.2.12.5).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    type_: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// An AML `Device` named `name` with `children`, serialized.
fn device(name: &str, children: &[&dyn Aml]) -> Vec<u8> {
    let mut v = Vec::new();
    Device::new(Path::new(name), children.to_vec()).to_aml_bytes(&mut v);
    v
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Sets the checksum byte (offset 9) of a finished table.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

fn dsdt(desc: &PlatformDescription) -> Vec<u8> {
    let (m32, m32_len) = desc.pci_mmio32;
    let (m64, m64_len) = desc.pci_mmio64;
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_io = aml::IO::new(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_ADDRESS_PORT, 1, 8);
    let mem32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m32 as u32,
        (m32 + m32_len - 1) as u32,
        None,
    );
    let mem64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m64,
        m64 + m64_len - 1,
        None,
    );
    let pci_crs = ResourceTemplate::new(vec![&bus, &cfg_io, &mem32, &mem64]);
    let zero = 0u8;
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
    let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
    let adr = Name::new(Path::new("_ADR"), &zero);
    let seg = Name::new(Path::new("_SEG"), &zero);
    let uid = Name::new(Path::new("_UID"), &zero);
    let bbn = Name::new(Path::new("_BBN"), &zero);
    let crs = Name::new(Path::new("_CRS"), &pci_crs);
    let hotplug = desc.hotplug.as_ref().map(hotplug_aml);
    let mut pci0: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs];
    if let Some(h) = &hotplug {
        pci0.push(h);
    }
    let mut devices = device("PCI0", &pci0);
    // The ECAM area must be reserved as a motherboard resource or Linux ignores MCFG; so
    // are the hot-plug registers.
    let ecam = aml::Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    let regs = desc
        .hotplug
        .as_ref()
        .map(|h| aml::Memory32Fixed::new(true, h.regs as u32, PCI_HOTPLUG_SIZE as u32));
    let mut mbrd: Vec<&dyn Aml> = vec![&ecam];
    if let Some(r) = &regs {
        mbrd.push(r);
    }
    devices.extend(device(
        "MBRD",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C02")),
            &Name::new(Path::new("_UID"), &zero),
            &Name::new(Path::new("_CRS"), &ResourceTemplate::new(mbrd)),
        ],
    ));
    if let Some(h) = &desc.hotplug {
        devices.extend(ged(h));
    }
    let com_io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    devices.extend(device(
        "COM1",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &zero),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![&com_io, &com_irq]),
            ),
        ],
    ));
    let mut body = aml::Scope::raw(Path::new("\\_SB_"), devices);
    // Sleep type 5 for soft-off, matching the sleep control register's decoder.
    let five = 5u8;
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&five, &zero, &zero, &zero]),
    )
    .to_aml_bytes(&mut body);
    let mut t = sdt_header(*b"DSDT", 2, body.len());
    t.extend_from_slice(&body);
    fix_checksum(&mut t);
    t
}

/// Raw AML bytes as a term.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The hot-plug part of `PCI0`, in the shape of Cloud Hypervisor's and QEMU's ACPI PCI
/// hot-plug: the register block as `PCST` (`PCIU`, `PCID`, `B0EJ`), `PCEJ(slot)` writing a
/// slot's bit to `B0EJ`, `PCNT` notifying each slot whose bit `PCIU` (device check, 1) or
/// `PCID` (eject request, 3) holds, and a device `Snn` per slot with `_ADR`, `_SUN` and
/// `_EJ0` (which Linux's acpiphp needs to register the slot).
fn hotplug_aml(h: &HotplugSlots) -> RawAml {
    let mut v = Vec::new();
    let base = h.regs;
    let len = PCI_HOTPLUG_SIZE as u32;
    OpRegion::new(Path::new("PCST"), OpRegionSpace::SystemMemory, &base, &len).to_aml_bytes(&mut v);
    Field::new(
        Path::new("PCST"),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
        ],
    )
    .to_aml_bytes(&mut v);
    let one = 1u32;
    Method::new(
        Path::new("PCEJ"),
        1,
        true,
        vec![&Store::new(
            &Path::new("B0EJ"),
            &ShiftLeft::new(&Local(0), &one, &Arg(0)),
        )],
    )
    .to_aml_bytes(&mut v);
    let names: Vec<String> = h.slots.iter().map(|s| format!("S{s:03}")).collect();
    let paths: Vec<Path> = names.iter().map(|n| Path::new(n)).collect();
    let masks: Vec<u32> = h.slots.iter().map(|&s| 1u32 << s).collect();
    let (up, down) = (1u8, 3u8);
    let ups: Vec<And> = masks
        .iter()
        .map(|m| And::new(&Local(2), &Local(0), m))
        .collect();
    let downs: Vec<And> = masks
        .iter()
        .map(|m| And::new(&Local(2), &Local(1), m))
        .collect();
    let zero = 0u8;
    let up_tests: Vec<NotEqual> = ups.iter().map(|a| NotEqual::new(a, &zero)).collect();
    let down_tests: Vec<NotEqual> = downs.iter().map(|a| NotEqual::new(a, &zero)).collect();
    let up_notes: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &up)).collect();
    let down_notes: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &down)).collect();
    let ifs: Vec<If> = (0..h.slots.len())
        .flat_map(|i| {
            [
                If::new(&up_tests[i], vec![&up_notes[i]]),
                If::new(&down_tests[i], vec![&down_notes[i]]),
            ]
        })
        .collect();
    let (pciu, pcid) = (Path::new("PCIU"), Path::new("PCID"));
    let read_up = Store::new(&Local(0), &pciu);
    let read_down = Store::new(&Local(1), &pcid);
    let mut body: Vec<&dyn Aml> = vec![&read_up, &read_down];
    body.extend(ifs.iter().map(|i| i as &dyn Aml));
    Method::new(Path::new("PCNT"), 0, true, body).to_aml_bytes(&mut v);
    for (i, &slot) in h.slots.iter().enumerate() {
        let adr = u32::from(slot) << 16;
        let sun = u32::from(slot);
        let sun_path = Path::new("_SUN");
        let eject = MethodCall::new(Path::new("PCEJ"), vec![&sun_path]);
        Device::new(
            Path::new(&names[i]),
            vec![
                &Name::new(Path::new("_ADR"), &adr),
                &Name::new(Path::new("_SUN"), &sun),
                &Method::new(Path::new("_EJ0"), 1, false, vec![&eject]),
            ],
        )
        .to_aml_bytes(&mut v);
    }
    RawAml(v)
}

/// The Generic Event Device (`ACPI0013`, ACPI 6.5 section 5.6.9): its interrupt runs `_EVT`,
/// which asks `PCI0.PCNT` what changed.
fn ged(h: &HotplugSlots) -> Vec<u8> {
    let irq = aml::Interrupt::new(true, true, false, false, h.gsi);
    let zero = 0u8;
    let pcnt = MethodCall::new(Path::new("\\_SB_.PCI0.PCNT"), vec![]);
    device(
        "GED_",
        &[
            &Name::new(Path::new("_HID"), &"ACPI0013"),
            &Name::new(Path::new("_UID"), &zero),
            &Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&irq])),
            &Method::new(Path::new("_EVT"), 1, true, vec![&pcnt]),
        ],
    )
}

/// A 36-byte SDT header for a table of `body_len` more bytes.
fn sdt_header(signature: [u8; 4], revision: u8, body_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(36 + body_len);
    h.extend_from_slice(&signature);
    h.extend_from_slice(&((36 + body_len) as u32).to_le_bytes());
    h.push(revision);
    h.push(0);
    h.extend_from_slice(&OEM_ID);
    h.extend_from_slice(&OEM_TABLE_ID);
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&acpi_tables::CREATOR_ID);
    h.extend_from_slice(&acpi_tables::CREATOR_REVISION);
    h
}

fn madt(desc: &PlatformDescription) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..desc.cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    // The PIT (ISA IRQ 0) is wired to IOAPIC pin 2 on PC-compatible platforms.
    madt.add_structure(InterruptSourceOverride {
        type_: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    bytes_of(&madt)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    b.sleep_control_reg = io(ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io(ACPI_SLEEP_STATUS_PORT);
    b.reset_reg = io(ACPI_RESET_PORT);
    b.reset_value = ACPI_RESET_VALUE;
    bytes_of(&b.finalize())
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, 1);
    m.add_ecam(PCI_ECAM_START, 0, 0, 0);
    bytes_of(&m)
}

fn viot(t: &IommuTopology) -> Vec<u8> {
    let mut v = VIOT::new(OEM_ID, OEM_TABLE_ID, 1);
    let handle =
        v.add_virtio_pci_iommu(VirtIoPciIommu::new(PciDevice::new(0, 0, t.iommu_device, 0)));
    for &dev in &t.endpoints {
        let d = || PciDevice::new(0, 0, dev, 0);
        v.add_pci_range(PciRange::new(d(), d(), &handle));
    }
    bytes_of(&v)
}

/// Writes the ACPI tables at [`ACPI_START`] and returns the RSDP's GPA.
///
/// # Errors
/// [`BootError::Acpi`] when the tables do not fit below 1 MiB or cannot be written, or the
/// description is inconsistent (a device number above 31).
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    desc: &PlatformDescription,
) -> Result<u64, BootError> {
    if let Some(t) = &desc.iommu {
        if t.iommu_device > 31 || t.endpoints.iter().any(|&d| d > 31) {
            return Err(BootError::Acpi("PCI device number above 31".into()));
        }
    }
    if let Some(h) = &desc.hotplug {
        if h.slots.iter().any(|&d| d > 31) || h.regs > u64::from(u32::MAX) {
            return Err(BootError::Acpi(
                "a hot-plug slot above 31 or registers above 4 GiB".into(),
            ));
        }
    }
    let rsdp_addr = ACPI_START;
    let mut next = ACPI_START + 64;
    let mut place = |table: &[u8]| -> Result<u64, BootError> {
        let at = next;
        let end = at + table.len() as u64;
        if end > ACPI_END {
            return Err(BootError::Acpi("tables do not fit below 1 MiB".into()));
        }
        mem.write_slice(table, GuestAddress(at))
            .map_err(|e| BootError::Acpi(format!("cannot write a table at {at:#x}: {e}")))?;
        next = end.next_multiple_of(16);
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(desc))?;
    let mut tables = vec![
        place(&fadt(dsdt_addr))?,
        place(&madt(desc))?,
        place(&mcfg())?,
    ];
    if let Some(t) = &desc.iommu {
        tables.push(place(&viot(t))?);
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    for t in tables {
        xsdt.add_entry(t);
    }
    let xsdt_addr = place(&bytes_of(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(rsdp.as_bytes(), GuestAddress(rsdp_addr))
        .map_err(|e| BootError::Acpi(format!("cannot write the RSDP: {e}")))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table_at(mem: &GuestMemoryMmap<()>, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let desc = PlatformDescription {
            cpus: 2,
            pci_mmio32: (PCI_MMIO_32_START, PCI_MMIO_32_SIZE),
            pci_mmio64: (1 << 36, 1 << 32),
            iommu: Some(IommuTopology {
                iommu_device: 1,
                endpoints: vec![2, 3],
            }),
            hotplug: Some(HotplugSlots {
                slots: vec![30, 31],
                regs: PCI_HOTPLUG_START,
                gsi: GED_GSI,
            }),
        };
        let rsdp = write_acpi_tables(&mem, &desc).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let mut sigs = Vec::new();
        for e in xsdt[36..].chunks(8) {
            let t = table_at(&mem, u64::from_le_bytes(e.try_into().unwrap()));
            assert_eq!(sum(&t), 0, "{:?}", std::str::from_utf8(&t[..4]));
            sigs.push(String::from_utf8(t[..4].to_vec()).unwrap());
            if &t[..4] == b"FACP" {
                let dsdt = u64::from_le_bytes(t[140..148].try_into().unwrap());
                let d = table_at(&mem, dsdt);
                assert_eq!(&d[..4], b"DSDT");
                assert_eq!(sum(&d), 0);
                for name in [
                    &b"_S5_"[..],
                    b"PCNT",
                    b"PCEJ",
                    b"S030",
                    b"S031",
                    b"_EJ0",
                    b"ACPI0013",
                ] {
                    assert!(d.windows(name.len()).any(|w| w == name), "{name:?}");
                }
                if std::env::var_os("DSDT_OUT").is_some() {
                    std::fs::write(std::env::var_os("DSDT_OUT").unwrap(), &d).unwrap();
                }
            }
            if &t[..4] == b"VIOT" {
                // One IOMMU node and two PCI range nodes.
                assert_eq!(u16::from_le_bytes([t[36], t[37]]), 3);
            }
        }
        assert_eq!(sigs, vec!["FACP", "APIC", "MCFG", "VIOT"]);
    }
}
