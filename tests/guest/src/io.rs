//! Port I/O, MMIO, the serial console and the test-exit port.

const COM1: u16 = 0x3f8;
const TEST_EXIT_PORT: u16 = 0x604;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as above.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) }
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads a counter.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// A point in time on the TSC, `ms` milliseconds from when it was made (the rate from the
/// VMM's CPUID leaf 0x4000_0010, 1 GHz without it). It bounds a wait for an event (a fault
/// report, a device's status, a used entry) so that an event that never comes ends as a
/// named failure instead of a hung guest. The bounds are far beyond the events' normal
/// times and, unlike a spin count, do not depend on how fast the emulator runs the loop.
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn in_ms(ms: u64) -> Deadline {
        let khz = crate::tests::tsc_khz().max(1_000_000);
        Deadline(rdtsc() + ms * khz)
    }

    /// Whether the time is up.
    pub fn passed(&self) -> bool {
        rdtsc() > self.0
    }
}

/// `cpuid(leaf)` -> (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Reads a `u32` at a physical (identity-mapped) address.
pub fn rd32(addr: u64) -> u32 {
    // SAFETY: the guest is identity mapped; callers pass device or RAM addresses.
    unsafe { (addr as *const u32).read_volatile() }
}
/// Writes a `u32` at a physical address.
pub fn wr32(addr: u64, v: u32) {
    // SAFETY: as above.
    unsafe { (addr as *mut u32).write_volatile(v) }
}
/// Reads a `u16`.
pub fn rd16(addr: u64) -> u16 {
    // SAFETY: as above.
    unsafe { (addr as *const u16).read_volatile() }
}
/// Writes a `u16`.
pub fn wr16(addr: u64, v: u16) {
    // SAFETY: as above.
    unsafe { (addr as *mut u16).write_volatile(v) }
}
/// Reads a `u8`.
pub fn rd8(addr: u64) -> u8 {
    // SAFETY: as above.
    unsafe { (addr as *const u8).read_volatile() }
}
/// Writes a `u8`.
pub fn wr8(addr: u64, v: u8) {
    // SAFETY: as above.
    unsafe { (addr as *mut u8).write_volatile(v) }
}
/// Reads a `u64` as two dwords (device registers).
pub fn rd64(addr: u64) -> u64 {
    u64::from(rd32(addr)) | (u64::from(rd32(addr + 4)) << 32)
}
/// Writes a `u64` as two dwords.
pub fn wr64(addr: u64, v: u64) {
    wr32(addr, v as u32);
    wr32(addr + 4, (v >> 32) as u32);
}

/// Sets up the UART: 8N1, FIFO on, no interrupts.
pub fn serial_init() {
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 0x80);
    outb(COM1, 1);
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
}

/// Writes a string to the serial console.
pub fn puts(s: &str) {
    for b in s.bytes() {
        if b == b'\n' {
            outb(COM1, b'\r');
        }
        outb(COM1, b);
    }
}

/// Something [`say!`] can print without `core::fmt` (whose code uses SSE, which KVM's
/// emulator refuses).
pub trait Emit {
    /// Prints it.
    fn emit(&self);
}

impl Emit for &str {
    fn emit(&self) {
        puts(self)
    }
}

fn dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        outb(COM1, b);
    }
}

impl Emit for u64 {
    fn emit(&self) {
        dec(*self)
    }
}
impl Emit for u32 {
    fn emit(&self) {
        dec(u64::from(*self))
    }
}
impl Emit for u8 {
    fn emit(&self) {
        dec(u64::from(*self))
    }
}
impl Emit for i32 {
    fn emit(&self) {
        if *self < 0 {
            puts("-");
        }
        dec(u64::from(self.unsigned_abs()))
    }
}
impl Emit for usize {
    fn emit(&self) {
        dec(*self as u64)
    }
}

/// Prints a number in hex with `0x`.
pub struct Hex(pub u64);

impl Emit for Hex {
    fn emit(&self) {
        puts("0x");
        let mut started = false;
        for k in (0..16).rev() {
            let d = ((self.0 >> (4 * k)) & 0xf) as u8;
            if d != 0 || started || k == 0 {
                started = true;
                outb(COM1, if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
    }
}

/// Prints its arguments (strings, numbers, [`Hex`]) and a newline.
#[macro_export]
macro_rules! say {
    ($($x:expr),* $(,)?) => {{
        $( $crate::io::Emit::emit(&$x); )*
        $crate::io::puts("\n");
    }};
}

/// Ends the VM with `code` as the VMM's exit status.
pub fn exit(code: u32) -> ! {
    outl(TEST_EXIT_PORT, code);
    loop {
        // SAFETY: halting with interrupts off stops this vCPU.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) }
    }
}
