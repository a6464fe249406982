//! Finds what the tests need in the ACPI tables: the ECAM base (MCFG) and the virtio-iommu
//! topology (VIOT).

use crate::io::{rd16, rd32, rd64, rd8};

/// What the tables say.
#[derive(Default, Clone, Copy)]
pub struct Platform {
    /// ECAM base of segment 0.
    pub ecam: u64,
    /// PCI device number of the virtio-iommu (from the VIOT), if any.
    pub iommu_dev: Option<u8>,
    /// Bitmap of PCI device numbers the VIOT puts behind it.
    pub endpoints: u32,
}

fn find(xsdt: u64, sig: &[u8; 4]) -> Option<u64> {
    let len = rd32(xsdt + 4) as u64;
    let n = (len.saturating_sub(36)) / 8;
    (0..n.min(64))
        .map(|i| rd64(xsdt + 36 + 8 * i))
        .find(|&t| t != 0 && (0..4).all(|k| rd8(t + k) == sig[k as usize]))
}

/// Reads the tables from the RSDP at `rsdp`.
pub fn platform(rsdp: u64) -> Option<Platform> {
    if rsdp == 0 || rd32(rsdp) != u32::from_le_bytes(*b"RSD ") {
        return None;
    }
    let xsdt = rd64(rsdp + 24);
    let mut p = Platform::default();
    let mcfg = find(xsdt, b"MCFG")?;
    p.ecam = rd64(mcfg + 44);
    if let Some(viot) = find(xsdt, b"VIOT") {
        let count = rd16(viot + 36);
        let mut off = viot + u64::from(rd16(viot + 38));
        for _ in 0..count.min(64) {
            let (ty, len) = (rd8(off), rd16(off + 2));
            match ty {
                // virtio-pci IOMMU: BDF at +6.
                3 => {
                    p.iommu_dev = Some(((rd16(off + 6) >> 3) & 0x1f) as u8);
                }
                // PCI range: BDF start at +12, end at +14.
                1 => {
                    let (s, e) = (rd16(off + 12), rd16(off + 14));
                    for bdf in s..=e {
                        p.endpoints |= 1 << ((bdf >> 3) & 0x1f);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += u64::from(len);
        }
    }
    Some(p)
}
