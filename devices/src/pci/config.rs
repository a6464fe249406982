//! A type-0 PCI configuration space (256 bytes): header, BARs with sizing, command register,
//! capability list. Registers are 32-bit; writes honour per-bit writable masks.

/// Offset of the command register.
pub const COMMAND: usize = 0x04;
/// Memory space enable bit of the command register.
pub const COMMAND_MEMORY: u32 = 1 << 1;
/// Bus master enable bit of the command register.
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
/// Capability list bit of the status register (upper half of register 1).
const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
const BAR0: usize = 0x10;
const CAP_PTR: usize = 0x34;
const FIRST_CAP: usize = 0x40;
const NUM_REGS: usize = 64;
/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;

/// A memory BAR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bar {
    /// Size in bytes (a power of two, at least 4 KiB), 0 when unused.
    pub size: u64,
    /// 64-bit BAR (uses the next register too).
    pub is_64: bool,
}

/// The identity of a function.
#[derive(Debug, Clone, Copy)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (class << 16 | subclass << 8 | prog-if).
    pub class: u32,
    /// Revision.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// The configuration space of one function.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    bars: [Bar; NUM_BARS],
    next_cap: usize,
    last_cap: usize,
}

impl PciConfiguration {
    /// A header with `ids`, no BARs and no capabilities.
    pub fn new(ids: PciIds) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[0] = u32::from(ids.vendor) | (u32::from(ids.device) << 16);
        regs[2] = (ids.class << 8) | u32::from(ids.revision);
        regs[11] = u32::from(ids.subsystem_vendor) | (u32::from(ids.subsystem) << 16);
        // Command: I/O, memory, bus master, INTx disable.
        writable[COMMAND / 4] = 0x0000_0407;
        // Interrupt line is writable; no interrupt pin.
        writable[0x3c / 4] = 0xff;
        Self {
            regs,
            writable,
            bars: [Bar::default(); NUM_BARS],
            next_cap: FIRST_CAP,
            last_cap: 0,
        }
    }

    /// Declares memory BAR `idx` of `size` bytes at `addr`.
    ///
    /// # Panics
    /// When `size` is not a power of two of at least 16 bytes, or `idx` is out of range
    /// (VMM setup errors, not guest input).
    pub fn add_bar(&mut self, idx: usize, addr: u64, size: u64, is_64: bool) {
        assert!(size.is_power_of_two() && size >= 16 && idx + usize::from(is_64) < NUM_BARS);
        self.bars[idx] = Bar { size, is_64 };
        let mask = !(size - 1);
        let r = BAR0 / 4 + idx;
        self.regs[r] = (addr as u32 & mask as u32) | if is_64 { 0b100 } else { 0 };
        self.writable[r] = mask as u32;
        if is_64 {
            self.regs[r + 1] = (addr >> 32) as u32;
            self.writable[r + 1] = (mask >> 32) as u32;
        }
    }

    /// The current address of BAR `idx`, if it is a BAR.
    pub fn bar_addr(&self, idx: usize) -> Option<u64> {
        let bar = self.bars.get(idx).filter(|b| b.size != 0)?;
        let r = BAR0 / 4 + idx;
        let mut addr = u64::from(self.regs[r] & !0xf);
        if bar.is_64 {
            addr |= u64::from(self.regs[r + 1]) << 32;
        }
        Some(addr)
    }

    /// BARs in use: `(index, address, size)`.
    pub fn bars(&self) -> Vec<(usize, u64, u64)> {
        (0..NUM_BARS)
            .filter_map(|i| self.bar_addr(i).map(|a| (i, a, self.bars[i].size)))
            .collect()
    }

    /// Whether memory decoding is on.
    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND / 4] & COMMAND_MEMORY != 0
    }

    /// Whether the function may master DMA.
    pub fn bus_master(&self) -> bool {
        self.regs[COMMAND / 4] & COMMAND_BUS_MASTER != 0
    }

    /// Appends a capability: `body` starts with the capability ID and a placeholder next
    /// byte. Returns its offset. `writable` masks bytes the guest may change (same length).
    ///
    /// # Panics
    /// When the capability does not fit (a VMM setup error).
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> usize {
        let off = self.next_cap;
        let len = body.len().next_multiple_of(4);
        assert!(off + len <= NUM_REGS * 4 && body.len() >= 2 && writable.len() == body.len());
        for (i, (&b, &w)) in body.iter().zip(writable).enumerate() {
            self.set_byte(off + i, b);
            let r = (off + i) / 4;
            let shift = 8 * ((off + i) % 4);
            self.writable[r] |= u32::from(w) << shift;
        }
        self.set_byte(off + 1, 0);
        if self.last_cap == 0 {
            self.set_byte(CAP_PTR, off as u8);
            self.regs[1] |= STATUS_CAP_LIST;
        } else {
            self.set_byte(self.last_cap + 1, off as u8);
        }
        self.last_cap = off;
        self.next_cap = off + len;
        off
    }

    fn set_byte(&mut self, off: usize, v: u8) {
        let shift = 8 * (off % 4);
        self.regs[off / 4] = (self.regs[off / 4] & !(0xff << shift)) | (u32::from(v) << shift);
    }

    /// Reads byte `off` (0 past the end).
    pub fn byte(&self, off: usize) -> u8 {
        self.regs
            .get(off / 4)
            .map(|r| (r >> (8 * (off % 4))) as u8)
            .unwrap_or(0)
    }

    /// The registers, for a snapshot.
    pub fn save_regs(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Restores registers saved by [`PciConfiguration::save_regs`] from a function built the
    /// same way. Read-only bits must match (they describe the function).
    ///
    /// # Errors
    /// A message when the length or a read-only bit differs.
    pub fn restore_regs(&mut self, regs: &[u32]) -> Result<(), String> {
        self.check_regs(regs)?;
        self.regs.copy_from_slice(regs);
        Ok(())
    }

    /// Whether [`PciConfiguration::restore_regs`] would take `regs`, changing nothing.
    ///
    /// # Errors
    /// As [`PciConfiguration::restore_regs`].
    pub fn check_regs(&self, regs: &[u32]) -> Result<(), String> {
        if regs.len() != NUM_REGS {
            return Err(format!(
                "{} config registers, expected {NUM_REGS}",
                regs.len()
            ));
        }
        for (i, (&new, &old)) in regs.iter().zip(self.regs.iter()).enumerate() {
            let ro = !self.writable[i];
            // BAR type bits and IDs are read-only; status bits may differ (write-1-to-clear).
            if i != COMMAND / 4 && (new & ro) != (old & ro) {
                return Err(format!(
                    "config register {:#x} reads {new:#x}, this function has {old:#x}",
                    i * 4
                ));
            }
        }
        Ok(())
    }

    /// Reads register `reg` (a dword index); `0xffff_ffff` past the header.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Writes `data` at byte `offset` (0..4) of register `reg`, honouring the writable bits.
    /// Returns the BARs whose address changed.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<usize> {
        let Some(off) = usize::try_from(offset).ok().filter(|o| o + data.len() <= 4) else {
            return Vec::new();
        };
        if reg >= NUM_REGS || data.is_empty() {
            return Vec::new();
        }
        let before = self.bars();
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, &b) in data.iter().enumerate() {
            value |= u32::from(b) << (8 * (off + i));
            mask |= 0xff << (8 * (off + i));
        }
        let w = self.writable[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !w) | (value & w);
        let after = self.bars();
        after
            .iter()
            .filter(|a| !before.contains(a))
            .map(|a| a.0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1057,
            class: 0x088000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x17,
        }
    }

    #[test]
    fn bar_sizing_and_moves() {
        let mut c = PciConfiguration::new(ids());
        c.add_bar(0, 0xc000_0000, 0x8000, false);
        assert_eq!(c.read_reg(0), 0x1057_1af4);
        // Sizing: write all ones, read the size mask back.
        assert!(!c.write_reg(4, 0, &[0xff; 4]).is_empty());
        assert_eq!(c.read_reg(4), 0xffff_8000);
        let moved = c.write_reg(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(moved, vec![0]);
        assert_eq!(c.bar_addr(0), Some(0xd000_0000));
        assert_eq!(c.bar_addr(1), None);
        // Read-only IDs.
        c.write_reg(0, 0, &[0; 4]);
        assert_eq!(c.read_reg(0), 0x1057_1af4);
        // Out of range accesses are harmless.
        assert!(c.write_reg(64, 0, &[1]).is_empty());
        assert!(c.write_reg(4, 3, &[1, 2]).is_empty());
        assert_eq!(c.read_reg(1000), 0xffff_ffff);
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = PciConfiguration::new(ids());
        let a = c.add_capability(&[0x11, 0, 1, 2], &[0, 0, 0xff, 0]);
        let b = c.add_capability(&[0x09, 0, 16, 1, 0, 0, 0, 0], &[0; 8]);
        assert_eq!(c.byte(0x34) as usize, a);
        assert_eq!(c.byte(a + 1) as usize, b);
        assert_eq!(c.byte(b + 1), 0);
        assert!(c.read_reg(1) & STATUS_CAP_LIST != 0);
        c.write_reg(a / 4, 0, &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(c.byte(a), 0x11);
        assert_eq!(c.byte(a + 2), 0xcc);
        assert_eq!(c.byte(a + 3), 2);
    }
}
