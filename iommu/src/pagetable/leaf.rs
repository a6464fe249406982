//! The dense leaf (512 pages: 32-bit frames and six flag bitmaps) and the huge entry (one
//! 2 MiB chunk of one mapping in eight bytes).

use super::sparse;
use super::{Perm, Pte, FANOUT, LEAF_PAGES};

pub(super) const WORDS: usize = FANOUT / 64;

// Per-page flag bitmaps of a dense leaf; the flag bits of a huge entry and of a sparse entry.
pub(super) const F_VALID: usize = 0;
pub(super) const F_READ: usize = 1;
pub(super) const F_WRITE: usize = 2;
pub(super) const F_MMIO: usize = 3;
pub(super) const F_START: usize = 4;
pub(super) const F_END: usize = 5;
const NFLAGS: usize = 6;

/// The flag bits (`1 << F_*`) of a page with `perm`, START and END as given; VALID set.
pub(super) fn flag_bits(perm: Perm, start: bool, end: bool) -> u64 {
    (1 << F_VALID)
        | (u64::from(perm.bits()) << F_READ)
        | (u64::from(start) << F_START)
        | (u64::from(end) << F_END)
}

/// A dense leaf: every page of a 2 MiB chunk has a slot, 4.77 bytes per page.
pub(super) struct Leaf {
    frames: [u32; FANOUT],
    bits: [[u64; WORDS]; NFLAGS],
    /// Valid pages.
    pub(super) count: u16,
}

impl Leaf {
    pub(super) fn new() -> Box<Leaf> {
        Box::new(Leaf {
            frames: [0; FANOUT],
            bits: [[0; WORDS]; NFLAGS],
            count: 0,
        })
    }

    /// A dense leaf holding `entries` (sparse entries of one chunk; the low 9 bits of their
    /// index are the page in the chunk).
    pub(super) fn from_entries(entries: &[u64]) -> Box<Leaf> {
        let mut leaf = Leaf::new();
        for &e in entries {
            let i = sparse::index(e) % FANOUT;
            leaf.frames[i] = sparse::frame(e);
            for f in 0..NFLAGS {
                if sparse::flags(e) & (1 << f) != 0 {
                    leaf.set_flag(f, i);
                }
            }
        }
        leaf.count = entries.len() as u16;
        leaf
    }

    /// The chunk of huge entry `h`, page by page.
    pub(super) fn from_huge(h: Huge) -> Box<Leaf> {
        let mut leaf = Leaf::new();
        let (first, start, end) = (h.pte(0), h.flag(F_START), h.flag(F_END));
        leaf.set_range(0, FANOUT - 1, first.gpa_page, first.perm, start, end);
        leaf
    }

    /// Appends the valid pages as sparse entries, with index `base + page`.
    pub(super) fn push_entries(&self, base: usize, out: &mut Vec<u64>) {
        for w in 0..WORDS {
            let mut valid = self.bits[F_VALID][w];
            while valid != 0 {
                let b = valid.trailing_zeros() as usize;
                valid &= valid - 1;
                let flags = (0..NFLAGS).fold(0, |acc, f| acc | (((self.bits[f][w] >> b) & 1) << f));
                let i = w * 64 + b;
                out.push(sparse::entry_of(base + i, u64::from(self.frames[i]), flags));
            }
        }
    }

    #[inline]
    fn test(&self, flag: usize, i: usize) -> bool {
        self.bits[flag][i / 64] & (1 << (i % 64)) != 0
    }

    #[inline]
    pub(super) fn get(&self, i: usize) -> Option<Pte> {
        if !self.test(F_VALID, i) {
            return None;
        }
        let perm = (u8::from(self.test(F_READ, i)))
            | (u8::from(self.test(F_WRITE, i)) << 1)
            | (u8::from(self.test(F_MMIO, i)) << 2);
        Some(Pte {
            gpa_page: u64::from(self.frames[i]),
            perm: Perm(perm),
            start: self.test(F_START, i),
            end: self.test(F_END, i),
        })
    }

    /// Sets pages `[lo, hi]` (indices, all invalid) to map to consecutive frames from
    /// `frame`; START on `lo` if `start`, END on `hi` if `end`.
    pub(super) fn set_range(
        &mut self,
        lo: usize,
        hi: usize,
        frame: u64,
        perm: Perm,
        start: bool,
        end: bool,
    ) {
        for (k, f) in self.frames[lo..=hi].iter_mut().enumerate() {
            *f = (frame + k as u64) as u32;
        }
        let flags = [
            (F_VALID, true),
            (F_READ, perm.read()),
            (F_WRITE, perm.write()),
            (F_MMIO, perm.contains(Perm::MMIO)),
            (F_START, false),
            (F_END, false),
        ];
        for (flag, on) in flags {
            for_each_word(lo, hi, |w, mask| {
                if on {
                    self.bits[flag][w] |= mask;
                } else {
                    self.bits[flag][w] &= !mask;
                }
            });
        }
        if start {
            self.set_flag(F_START, lo);
        }
        if end {
            self.set_flag(F_END, hi);
        }
        self.count += (hi - lo + 1) as u16;
    }

    /// Clears `[lo, hi]`; returns the pages that were valid.
    pub(super) fn clear_range(&mut self, lo: usize, hi: usize) -> u64 {
        let mut removed = 0;
        for_each_word(lo, hi, |w, mask| {
            removed += (self.bits[F_VALID][w] & mask).count_ones() as u64;
            for flag in 0..NFLAGS {
                self.bits[flag][w] &= !mask;
            }
        });
        self.count -= removed as u16;
        removed
    }

    fn set_flag(&mut self, flag: usize, i: usize) {
        self.bits[flag][i / 64] |= 1 << (i % 64);
    }

    /// First valid index in `[lo, hi]`.
    pub(super) fn next_valid(&self, lo: usize, hi: usize) -> Option<usize> {
        next_set_bit(&self.bits[F_VALID], lo, hi)
    }

    /// First index in `[lo, hi]` that ends a mapping.
    pub(super) fn next_end(&self, lo: usize, hi: usize) -> Option<usize> {
        next_set_bit(&self.bits[F_END], lo, hi)
    }

    /// Whether any page in `[lo, hi]` is valid.
    pub(super) fn any_valid(&self, lo: usize, hi: usize) -> bool {
        let mut any = false;
        for_each_word(lo, hi, |w, mask| any |= self.bits[F_VALID][w] & mask != 0);
        any
    }
}

/// Calls `f(word, mask)` for the bits `[lo, hi]` of a 512-bit bitmap.
#[inline]
fn for_each_word(lo: usize, hi: usize, mut f: impl FnMut(usize, u64)) {
    let (wl, wh) = (lo / 64, hi / 64);
    for w in wl..=wh {
        let from = if w == wl { lo % 64 } else { 0 };
        let to = if w == wh { hi % 64 } else { 63 };
        let mask = (u64::MAX >> (63 - to)) & (u64::MAX << from);
        f(w, mask);
    }
}

#[inline]
fn next_set_bit(bits: &[u64; WORDS], lo: usize, hi: usize) -> Option<usize> {
    let mut found = None;
    for_each_word(lo, hi, |w, mask| {
        let v = bits[w] & mask;
        if found.is_none() && v != 0 {
            found = Some(w * 64 + v.trailing_zeros() as usize);
        }
    });
    found
}

/// A huge entry: one 2 MiB chunk of one mapping. Bits 0-5 are the flags, bits 12.. the GPA
/// page number of the chunk's first page.
#[derive(Clone, Copy)]
pub(super) struct Huge(u64);

impl Huge {
    pub(super) fn new(gpa_page: u64, perm: Perm, start: bool, end: bool) -> Huge {
        Huge((gpa_page << 12) | flag_bits(perm, start, end))
    }
    pub(super) fn flag(self, f: usize) -> bool {
        self.0 & (1 << f) != 0
    }
    fn perm(self) -> Perm {
        Perm(((self.0 >> F_READ) & 7) as u8)
    }
    /// Translation of page `i` (0..512) of the chunk.
    pub(super) fn pte(self, i: u64) -> Pte {
        Pte {
            gpa_page: (self.0 >> 12) + i,
            perm: self.perm(),
            start: i == 0 && self.flag(F_START),
            end: i == LEAF_PAGES - 1 && self.flag(F_END),
        }
    }
}
