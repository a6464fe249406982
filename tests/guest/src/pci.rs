//! PCI configuration through ECAM, bus 0.

use crate::io::{rd16, rd32, wr16};

/// A function on bus 0.
#[derive(Clone, Copy)]
pub struct Func {
    base: u64,
}

impl Func {
    /// Device `dev`, function 0, if present.
    pub fn probe(ecam: u64, dev: u8) -> Option<Func> {
        let f = Func {
            base: ecam + (u64::from(dev) << 15),
        };
        (f.read16(0) != 0xffff).then_some(f)
    }
    /// Vendor and device IDs.
    pub fn ids(&self) -> (u16, u16) {
        (self.read16(0), self.read16(2))
    }
    /// Reads a config dword.
    pub fn read32(&self, off: u64) -> u32 {
        rd32(self.base + off)
    }
    /// Reads a config word.
    pub fn read16(&self, off: u64) -> u16 {
        rd16(self.base + off)
    }
    /// Address of memory BAR `i` (32-bit BARs).
    pub fn bar(&self, i: u64) -> u64 {
        u64::from(self.read32(0x10 + 4 * i) & !0xf)
    }
    /// Turns on memory decoding and bus mastering.
    pub fn enable(&self) {
        let cmd = self.read16(4);
        wr16(self.base + 4, cmd | 0x6);
    }
    /// Capability offsets with id `id`, in order (at most 16).
    pub fn caps(&self, id: u8) -> [u64; 16] {
        let mut out = [0u64; 16];
        let mut n = 0;
        let mut off = u64::from(self.read32(0x34) & 0xff);
        let mut hops = 0;
        while off != 0 && hops < 48 && n < 16 {
            let hdr = self.read32(off & !3);
            if (hdr & 0xff) as u8 == id {
                out[n] = off;
                n += 1;
            }
            off = u64::from((hdr >> 8) & 0xff);
            hops += 1;
        }
        out
    }
}
