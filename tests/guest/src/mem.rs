//! The stack and a bump allocator of DMA pages in guest RAM above the program.

use core::sync::atomic::{AtomicU64, Ordering};

/// Bytes of stack.
pub const STACK_SIZE: usize = 256 * 1024;

/// The stack (`_start` points `rsp` at its end).
#[no_mangle]
pub static mut STACK: [u8; STACK_SIZE] = [0; STACK_SIZE];

/// First GPA handed out: 16 MiB, above the program at 2 MiB.
const HEAP_START: u64 = 16 << 20;
static NEXT: AtomicU64 = AtomicU64::new(HEAP_START);

/// `pages` zeroed 4 KiB pages; returns their GPA (identity mapped).
pub fn alloc_pages(pages: u64) -> u64 {
    let a = NEXT.fetch_add(pages * 4096, Ordering::Relaxed);
    fill(a, pages * 4096, 0);
    a
}

/// The GPA the next allocation starts at.
pub fn next_page() -> u64 {
    NEXT.load(Ordering::Relaxed)
}

/// `pages` 4 KiB pages, not cleared (RAM the guest never wrote reads as zero); returns
/// their GPA.
pub fn reserve_pages(pages: u64) -> u64 {
    NEXT.fetch_add(pages * 4096, Ordering::Relaxed)
}

/// Fills `[gpa, gpa + len)` with `v`.
pub fn fill(gpa: u64, len: u64, v: u8) {
    // SAFETY: the guest is identity mapped and the range is RAM it allocated.
    unsafe { core::ptr::write_bytes(gpa as *mut u8, v, len as usize) }
}

/// The bytes of `[gpa, gpa + len)`.
pub fn bytes(gpa: u64, len: u64) -> &'static mut [u8] {
    // SAFETY: as above; the tests use each buffer from one place at a time.
    unsafe { core::slice::from_raw_parts_mut(gpa as *mut u8, len as usize) }
}

/// Whether every byte of `[gpa, gpa + len)` is `v` (`repe scasb`: one emulated instruction).
pub fn all_eq(gpa: u64, len: u64, v: u8) -> bool {
    if len == 0 {
        return true;
    }
    let left: u64;
    let zf: u8;
    // SAFETY: scans at most `len` bytes of guest RAM the caller owns.
    unsafe {
        core::arch::asm!(
            "repe scasb",
            "sete {zf}",
            zf = out(reg_byte) zf,
            inout("rcx") len => left, inout("rdi") gpa => _, in("al") v,
            options(nostack, readonly)
        );
    }
    left == 0 && zf == 1
}

/// Fills `[gpa, gpa + len)` (whole pages) with a pattern that differs in every byte of a
/// page and in every page: a 4 KiB pattern built once, copied page by page, with the page's
/// index and `seed` in its first 8 bytes.
pub fn pattern(gpa: u64, len: u64, seed: u8) {
    let first = bytes(gpa, len.min(4096));
    for (i, b) in first.iter_mut().enumerate() {
        // SAFETY: a plain byte store; volatile keeps the loop scalar.
        unsafe { core::ptr::write_volatile(b, (i as u8).wrapping_mul(31).wrapping_add(seed)) };
    }
    let mut off = 4096;
    while off < len {
        let n = (len - off).min(4096);
        // SAFETY: both ranges lie in the buffer and do not overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(gpa as *const u8, (gpa + off) as *mut u8, n as usize)
        };
        off += 4096;
    }
    let mut page = 0u64;
    while page * 4096 + 8 <= len {
        // SAFETY: inside the buffer.
        unsafe {
            core::ptr::write_unaligned(
                (gpa + page * 4096) as *mut u64,
                (page << 8) | u64::from(seed),
            )
        };
        page += 1;
    }
}

/// Boot PDPT (`boot::layout::PDPTE_START`): entry N maps GiB N of the identity map.
const BOOT_PDPT: u64 = 0xa000;
/// The boot tables identity map the first 4 GiB (`boot::layout::IDENTITY_MAPPED_GIB`).
const BOOT_MAPPED_GIB: u64 = 4;

/// Identity maps the GiB at `4 GiB + gib_above * 1 GiB` (2 MiB pages, one new page
/// directory from the allocator) and moves the allocator there: the next pages handed out
/// are RAM above the PCI hole, in the VM's second memory region. The caller checks that
/// the VM has RAM there.
pub fn allocate_above_4g() {
    let pd = alloc_pages(1);
    let gib = BOOT_MAPPED_GIB;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        let entry = ((gib << 30) + (i << 21)) | 0x83;
        // SAFETY: the page directory was just allocated in identity-mapped RAM.
        unsafe { core::ptr::write_volatile((pd + i * 8) as *mut u64, entry) };
    }
    // SAFETY: PDPT entry 4 is unused by the boot tables; reloading CR3 drops stale
    // translations.
    unsafe {
        core::ptr::write_volatile((BOOT_PDPT + gib * 8) as *mut u64, pd | 0x3);
        core::arch::asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack));
    }
    NEXT.store(gib << 30, Ordering::Relaxed);
}
