//! Sparse nodes: a leaf or an L1 table holding few pages keeps them as a sorted vector of
//! 8-byte page entries instead of an array slot per page.
//!
//! An entry is one `u64`: bits 46-63 the page's index in its node (0..2^18 in an L1 table,
//! 0..512 in a leaf), bits 32-37 its flags (the `F_*` bits of a dense leaf), bits 0-31 its
//! GPA frame. Indices are unique in a node, so sorting by value sorts by index.
//!
//! A vector holding `n` entries has a capacity of exactly `n.next_power_of_two()` (see
//! [`fit`]), so its size is a function of what it holds: the metadata budget can compute the
//! bytes a map will allocate before making it.

use super::leaf::{flag_bits, F_END, F_READ};
use super::{Perm, Pte};

const INDEX_SHIFT: u32 = 46;
const FLAG_SHIFT: u32 = 32;

/// The entry of page `index` mapping to `frame` with flag bits `flags`.
#[inline]
pub(super) fn entry_of(index: usize, frame: u64, flags: u64) -> u64 {
    ((index as u64) << INDEX_SHIFT) | (flags << FLAG_SHIFT) | (frame & u64::from(u32::MAX))
}

/// The page's index in its node.
#[inline]
pub(super) fn index(e: u64) -> usize {
    (e >> INDEX_SHIFT) as usize
}

/// The GPA frame (fits 32 bits: see `GPA_BITS`).
#[inline]
pub(super) fn frame(e: u64) -> u32 {
    e as u32
}

/// The flag bits (`1 << F_*`).
#[inline]
pub(super) fn flags(e: u64) -> u64 {
    (e >> FLAG_SHIFT) & 0x3f
}

/// The page's translation.
#[inline]
pub(super) fn pte(e: u64) -> Pte {
    let f = flags(e);
    Pte {
        gpa_page: u64::from(frame(e)),
        perm: Perm(((f >> F_READ) & 7) as u8),
        start: f & (1 << super::leaf::F_START) != 0,
        end: f & (1 << F_END) != 0,
    }
}

/// The same entry with index `index`.
#[inline]
pub(super) fn reindex(e: u64, index: usize) -> u64 {
    (e & ((1 << INDEX_SHIFT) - 1)) | ((index as u64) << INDEX_SHIFT)
}

/// Position of the first entry whose index is `i` or above.
#[inline]
fn lower_bound(v: &[u64], i: usize) -> usize {
    v.partition_point(|&e| index(e) < i)
}

/// The translation of page `i`.
#[inline]
pub(super) fn get(v: &[u64], i: usize) -> Option<Pte> {
    let at = lower_bound(v, i);
    v.get(at).filter(|&&e| index(e) == i).map(|&e| pte(e))
}

/// The entries whose index is in `[lo, hi]`.
pub(super) fn range(v: &[u64], lo: usize, hi: usize) -> &[u64] {
    &v[lower_bound(v, lo)..lower_bound(v, hi + 1)]
}

/// The entries of `chunk` (entries of one 512-page chunk, indexed in a leaf or in an L1
/// table) whose page in the chunk is in `[lo, hi]`.
pub(super) fn in_chunk(chunk: &[u64], lo: usize, hi: usize) -> &[u64] {
    let page = |e: u64| index(e) % super::FANOUT;
    let a = chunk.partition_point(|&e| page(e) < lo);
    let b = chunk.partition_point(|&e| page(e) <= hi);
    &chunk[a..b]
}

/// Bytes of a vector of `n` entries: see [`fit`].
pub(super) const fn bytes_for(n: usize) -> u64 {
    if n == 0 {
        0
    } else {
        8 * n.next_power_of_two() as u64
    }
}

/// Bytes the vector's buffer takes.
pub(super) fn bytes(v: &Vec<u64>) -> u64 {
    8 * v.capacity() as u64
}

/// Sets the capacity to `n.next_power_of_two()` for `n` entries (reallocating only when it
/// changes), so that [`bytes`] equals [`bytes_for`].
fn fit(v: &mut Vec<u64>, n: usize) {
    let cap = if n == 0 { 0 } else { n.next_power_of_two() };
    if v.capacity() < cap {
        v.reserve_exact(cap - v.len());
    } else if v.capacity() > cap {
        v.shrink_to(cap);
    }
}

/// An empty vector with the capacity [`fit`] gives `n` entries.
pub(super) fn with_room_for(n: usize) -> Vec<u64> {
    let mut v = Vec::new();
    fit(&mut v, n);
    v
}

/// A vector holding `entries`, with the capacity [`fit`] gives.
pub(super) fn from_entries(entries: impl ExactSizeIterator<Item = u64>) -> Vec<u64> {
    let mut v = with_room_for(entries.len());
    v.extend(entries);
    v
}

/// Inserts pages `[lo, hi]` (none present) mapping to consecutive frames from `frame`; START
/// on `lo` if `start`, END on `hi` if `end`.
pub(super) fn insert(
    v: &mut Vec<u64>,
    (lo, hi): (usize, usize),
    frame: u64,
    perm: Perm,
    start: bool,
    end: bool,
) {
    fit(v, v.len() + hi - lo + 1);
    let at = lower_bound(v, lo);
    let (len, n) = (v.len(), hi - lo + 1);
    v.resize(len + n, 0);
    v.copy_within(at..len, at + n);
    for (k, slot) in v[at..at + n].iter_mut().enumerate() {
        let flags = flag_bits(perm, start && k == 0, end && k == n - 1);
        *slot = entry_of(lo + k, frame + k as u64, flags);
    }
}

/// Removes the pages in `[lo, hi]`; returns how many there were.
pub(super) fn remove(v: &mut Vec<u64>, lo: usize, hi: usize) -> u64 {
    let (a, b) = (lower_bound(v, lo), lower_bound(v, hi + 1));
    v.drain(a..b);
    fit(v, v.len());
    (b - a) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_index_frame_and_flags() {
        let e = entry_of(
            (1 << 18) - 1,
            u64::from(u32::MAX),
            flag_bits(Perm(7), true, true),
        );
        assert_eq!(index(e), (1 << 18) - 1);
        assert_eq!(frame(e), u32::MAX);
        let p = pte(e);
        assert_eq!((p.perm, p.start, p.end), (Perm(7), true, true));
        let e = reindex(e, 5);
        assert_eq!((index(e), frame(e), pte(e)), (5, u32::MAX, p));
        let e = entry_of(3, 9, flag_bits(Perm::READ, false, false));
        assert_eq!(
            (pte(e).perm, pte(e).start, pte(e).end),
            (Perm::READ, false, false)
        );
    }

    /// The capacity follows the entry count both ways, so the bytes are a function of it.
    #[test]
    fn capacity_is_the_next_power_of_two() {
        let mut v = Vec::new();
        insert(&mut v, (10, 12), 100, Perm::RW, true, true);
        assert_eq!((v.len(), bytes(&v), bytes_for(3)), (3, 32, 32));
        insert(&mut v, (0, 1), 7, Perm::READ, true, false);
        assert_eq!(bytes(&v), bytes_for(5));
        assert_eq!(bytes_for(5), 64);
        let idx: Vec<usize> = v.iter().map(|&e| index(e)).collect();
        assert_eq!(idx, vec![0, 1, 10, 11, 12]);
        assert_eq!(get(&v, 11).map(|p| p.gpa_page), Some(101));
        assert!(get(&v, 11).is_some_and(|p| !p.start && !p.end));
        assert!(get(&v, 12).is_some_and(|p| p.end));
        assert!(get(&v, 0).is_some_and(|p| p.start && !p.end));
        assert_eq!(get(&v, 2), None);
        assert_eq!(range(&v, 1, 10).len(), 2);
        assert_eq!(remove(&mut v, 2, 11), 2);
        assert_eq!((v.len(), bytes(&v)), (3, bytes_for(3)));
        assert_eq!(remove(&mut v, 0, 100), 3);
        assert_eq!((bytes(&v), bytes_for(0)), (0, 0));
        let w = from_entries([entry_of(1, 1, 1), entry_of(2, 2, 1)].into_iter());
        assert_eq!(bytes(&w), 16);
    }
}
