//! The fast test guest: a bare-metal x86_64 program the VMM boots like a kernel (entered in
//! 64-bit mode with identity-mapped memory and `rsi` pointing at the zero page). It finds the
//! devices through the ACPI tables (MCFG for ECAM, VIOT for the IOMMU topology), drives the
//! virtio-iommu through its virtqueues and the DMA test device through its registers, prints
//! TAP on the serial port, and powers off through the test-exit port with the number of
//! failed cases as the exit status.
//!
//! The kernel command line selects what runs: `tests=copy,fill,...` (default: all that apply).
//!
//! On PVM hosts a guest that is not PVM-aware runs entirely in KVM's instruction emulator,
//! which refuses most SSE: the guest is built with `opt-level = "z"` (no auto-vectorisation)
//! and prints without `core::fmt` (see `io::Emit`); the VMM's fallback handles the register
//! zeroing idiom (`xorps xmm, xmm`) LLVM still emits.
#![no_std]
#![no_main]

mod acpi;
mod dmadev;
mod io;
mod mem;
mod net;
mod pci;
mod tests;
mod viommu;
mod virtio;

use core::panic::PanicInfo;

core::arch::global_asm!(
    ".section .text._start",
    ".global _start",
    "_start:",
    // SSE on: CR0.EM off, CR0.MP on, CR4.OSFXSR and OSXMMEXCPT on (the compiler uses SSE).
    "    mov rax, cr0",
    "    and rax, ~4",
    "    or rax, 2",
    "    mov cr0, rax",
    "    mov rax, cr4",
    "    or rax, 0x600",
    "    mov cr4, rax",
    "    lea rsp, [rip + {stack} + {size}]",
    "    and rsp, -16",
    "    mov rdi, rsi",
    "    call {main}",
    "2:  hlt",
    "    jmp 2b",
    stack = sym mem::STACK,
    size = const mem::STACK_SIZE,
    main = sym rust_main,
);

// One stub per exception vector (0-31): pushes a dummy error code when the CPU does not,
// then the vector, and reports through `exception`.
core::arch::global_asm!(
    ".section .text.exceptions",
    ".altmacro",
    ".macro STUB v",
    "exc_\\v:",
    ".if (\\v == 8) || (\\v == 10) || (\\v == 11) || (\\v == 12) || (\\v == 13) || (\\v == 14) || (\\v == 17)",
    "    push \\v",
    ".else",
    "    push 0",
    "    push \\v",
    ".endif",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call {handler}",
    ".endm",
    ".set i, 0",
    ".rept 32",
    "    STUB %i",
    "    .set i, i + 1",
    ".endr",
    ".section .rodata.exceptions",
    ".global EXC_STUBS",
    "EXC_STUBS:",
    ".macro ADDR v",
    "    .quad exc_\\v",
    ".endm",
    ".set i, 0",
    ".rept 32",
    "    ADDR %i",
    "    .set i, i + 1",
    ".endr",
    handler = sym exception,
);

extern "C" {
    static EXC_STUBS: [u64; 32];
}

/// Reports an unexpected CPU exception and ends the VM (exit status 98). `frame` points at
/// the vector, the error code and the interrupt frame.
extern "C" fn exception(frame: *const u64) -> ! {
    // SAFETY: the stub passes its stack pointer: vector, error code, RIP, CS, RFLAGS, RSP.
    let f = unsafe { core::slice::from_raw_parts(frame, 4) };
    say!(
        "Bail out! CPU exception ",
        f[0],
        " error ",
        io::Hex(f[1]),
        " at ",
        io::Hex(f[2])
    );
    io::exit(98)
}

static mut IDT: [[u64; 2]; 32] = [[0; 2]; 32];

fn install_idt() {
    let cs: u16;
    // SAFETY: reads the code segment selector.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    // SAFETY: single-threaded set-up of a static before any exception can use it.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    // SAFETY: a table of addresses defined in the assembly above.
    let stubs = unsafe { &*core::ptr::addr_of!(EXC_STUBS) };
    for (e, &h) in idt.iter_mut().zip(stubs) {
        e[0] =
            (h & 0xffff) | (u64::from(cs) << 16) | (0x8e00u64 << 32) | (((h >> 16) & 0xffff) << 48);
        e[1] = h >> 32;
    }
    let mut desc = [0u8; 10];
    desc[..2].copy_from_slice(&((core::mem::size_of_val(idt) - 1) as u16).to_le_bytes());
    desc[2..].copy_from_slice(&(idt.as_ptr() as u64).to_le_bytes());
    // SAFETY: `desc` describes the static IDT; every gate points at a stub.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) desc.as_ptr(), options(nostack)) }
}

/// Entry from `_start` with the zero page's address.
extern "C" fn rust_main(boot_params: u64) -> ! {
    install_idt();
    io::serial_init();
    let failures = tests::run(boot_params);
    io::exit(failures)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    match info.location() {
        Some(l) => say!("Bail out! panic at ", l.file(), ":", l.line()),
        None => say!("Bail out! panic"),
    }
    io::exit(99)
}

/// Unwinding is never used (`panic = "abort"`); `core` still references the symbol.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// # Safety
/// `d` and `s` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; `rep movsb` copies forward.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _, options(nostack));
    }
    d
}

/// # Safety
/// `d` and `s` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        // SAFETY: a forward copy is correct when the destination starts before the source or
        // does not overlap it.
        unsafe { memcpy(d, s, n) }
    } else {
        // SAFETY: copy backward from the last byte; the direction flag is restored.
        unsafe {
            core::arch::asm!(
                "std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") d.add(n - 1) => _, inout("rsi") s.add(n - 1) => _,
                options(nostack)
            );
        }
        d
    }
}

/// # Safety
/// `d` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8, options(nostack));
    }
    d
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let left: usize;
    // SAFETY: `repe cmpsb` reads at most `n` bytes of each range; one emulated instruction
    // instead of a loop (the guest runs in KVM's emulator on PVM hosts).
    unsafe {
        core::arch::asm!(
            "repe cmpsb",
            inout("rcx") n => left, inout("rsi") a => _, inout("rdi") b => _,
            options(nostack, readonly)
        );
    }
    if left == 0 {
        // SAFETY: `n >= 1`.
        let (x, y) = unsafe { (a.add(n - 1).read(), b.add(n - 1).read()) };
        return i32::from(x) - i32::from(y);
    }
    let i = n - left - 1;
    // SAFETY: `i < n`.
    let (x, y) = unsafe { (a.add(i).read(), b.add(i).read()) };
    i32::from(x) - i32::from(y)
}

/// # Safety
/// As [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
