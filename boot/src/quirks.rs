//! Host quirks: what a guest needs to run on KVM provided by PVM ("Pagetable-based Virtual
//! Machine", `kvm_pvm`), where the guest kernel runs in hardware ring 3 and privileged code is
//! run by KVM's instruction emulator.
//!
//! Two things are needed there (see `HOST-NOTES.md`):
//! - kernel command-line additions that keep the guest away from instructions the host's
//!   emulator rejects (`clearcpuid=...`) and that shorten slow boot paths;
//! - a fallback for `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION`: the exit
//!   carries the instruction bytes, which are decoded with `iced-x86` and either handled
//!   (`int3` by injecting #BP, `fwait` as a no-op) or reported with their RIP and bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic};
use kvm_bindings::{kvm_run, KVM_INTERNAL_ERROR_EMULATION};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::BootError;

/// Which host quirks apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostQuirks {
    /// A VMX/SVM host: nothing special.
    None,
    /// KVM provided by PVM.
    Pvm,
}

/// Kernel parameters added on PVM hosts. The CPU features named in `clearcpuid` are the ones
/// whose instructions KVM's emulator refuses; clearing them with `KVM_SET_CPUID2` alone does
/// not stop the guest from using them. The rest cut time spent with interrupts off.
pub const PVM_CMDLINE: &[&str] = &[
    "clearcpuid=cx16,xsave,smap,popcnt,bmi1,bmi2,fsgsbase,rdpid,movbe,avx,avx2,avx512f,abm,adx,rdseed,rdrand",
    "8250.nr_uarts=1",
    "tsc=reliable",
];

impl HostQuirks {
    /// Detects the host: PVM when `/sys/module/kvm_pvm` exists.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// [`HostQuirks::detect`] against another sysfs module directory (for tests).
    pub fn detect_in(sys_module: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            HostQuirks::Pvm
        } else {
            HostQuirks::None
        }
    }

    /// Kernel command-line parameters this host needs.
    pub fn cmdline_additions(&self) -> &'static [&'static str] {
        match self {
            HostQuirks::None => &[],
            HostQuirks::Pvm => PVM_CMDLINE,
        }
    }

    /// Whether the emulation-failure fallback is enabled.
    pub fn emulation_fallback(&self) -> bool {
        matches!(self, HostQuirks::Pvm)
    }
}

impl fmt::Display for HostQuirks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostQuirks::None => "none",
            HostQuirks::Pvm => "pvm",
        })
    }
}

/// An instruction KVM's emulator refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulationFailure {
    /// Guest RIP of the instruction.
    pub rip: u64,
    /// The instruction bytes as reported (up to 15).
    pub bytes: Vec<u8>,
}

impl EmulationFailure {
    /// Decodes the instruction (64-bit mode).
    pub fn instruction(&self) -> Instruction {
        Decoder::with_ip(64, &self.bytes, self.rip, DecoderOptions::NONE).decode()
    }

    /// The instruction in Intel syntax, or `"(undecodable)"`.
    pub fn disassembly(&self) -> String {
        let insn = self.instruction();
        if insn.is_invalid() {
            return "(undecodable)".to_string();
        }
        let mut out = String::new();
        IntelFormatter::new().format(&insn, &mut out);
        out
    }

    /// Hex of the instruction's own bytes.
    pub fn hex(&self) -> String {
        let len = match self.instruction().len() {
            0 => self.bytes.len(),
            n => n.min(self.bytes.len()),
        };
        self.bytes[..len]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the fallback did about a refused instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fallback {
    /// `int3`: RIP advanced and #BP injected, as the CPU would have done.
    Int3,
    /// `fwait`/`wait`: no unmasked x87 exception can be pending in our guests; skipped.
    Fwait,
    /// `xorps`/`xorpd`/`pxor` between two XMM registers (compilers' register-zeroing
    /// idiom): done on the vCPU's saved XMM state. KVM's emulator has no SSE logic ops, and
    /// on PVM a guest that is not PVM-aware runs in that emulator.
    SseXor,
    /// `pcmpeqb`/`pcmpeqw`/`pcmpeqd` between two XMM registers (with the same register
    /// twice, compilers' all-ones idiom): each lane set to all ones where equal, else zero,
    /// on the saved XMM state.
    SseCompare,
}

impl Fallback {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Fallback::Int3 => "int3",
            Fallback::Fwait => "fwait",
            Fallback::SseXor => "sse-xor",
            Fallback::SseCompare => "sse-pcmpeq",
        }
    }
}

/// Chooses the fallback for an instruction, or refuses it.
///
/// # Errors
/// [`BootError::UnhandledInstruction`] naming the instruction, its bytes and RIP.
pub fn classify(failure: &EmulationFailure) -> Result<(Fallback, u64), BootError> {
    let insn = failure.instruction();
    let len = insn.len() as u64;
    match insn.mnemonic() {
        Mnemonic::Int3 => Ok((Fallback::Int3, len)),
        Mnemonic::Wait => Ok((Fallback::Fwait, len)),
        Mnemonic::Xorps | Mnemonic::Xorpd | Mnemonic::Pxor if xmm_pair(&insn).is_some() => {
            Ok((Fallback::SseXor, len))
        }
        Mnemonic::Pcmpeqb | Mnemonic::Pcmpeqw | Mnemonic::Pcmpeqd if xmm_pair(&insn).is_some() => {
            Ok((Fallback::SseCompare, len))
        }
        _ => Err(BootError::UnhandledInstruction {
            rip: failure.rip,
            bytes: failure.hex(),
            disassembly: failure.disassembly(),
        }),
    }
}

/// The XMM register numbers of a two-register instruction (`op0`, `op1`).
fn xmm_pair(insn: &Instruction) -> Option<(usize, usize)> {
    use iced_x86::OpKind;
    if insn.op_count() != 2
        || insn.op0_kind() != OpKind::Register
        || insn.op1_kind() != OpKind::Register
    {
        return None;
    }
    let (a, b) = (insn.op0_register(), insn.op1_register());
    if !a.is_xmm() || !b.is_xmm() {
        return None;
    }
    let n = |r: iced_x86::Register| r as usize - iced_x86::Register::XMM0 as usize;
    Some((n(a), n(b)))
}

/// Reads the failing instruction from a `KVM_EXIT_INTERNAL_ERROR` exit: from the exit's data
/// when KVM supplied the bytes, else from guest memory at RIP.
///
/// Returns `None` when the exit is not an emulation failure.
pub fn emulation_failure<M: GuestMemoryBackend>(
    run: &kvm_run,
    vcpu: &VcpuFd,
    mem: &M,
) -> Result<Option<EmulationFailure>, BootError> {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR (checked by the caller), for which
    // KVM fills the `internal` member of the union; every bit pattern is a valid `u32`/`u64`.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Ok(None);
    }
    let rip = vcpu
        .get_regs()
        .map_err(|e| BootError::Kvm("KVM_GET_REGS", e))?
        .rip;
    // Layout of `emulation_failure`: flags (data[0]), then insn_size: u8 and insn_bytes[15]
    // (data[1..3]).
    let flags = internal.data[0];
    let mut bytes = Vec::new();
    if internal.ndata >= 3
        && flags & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
    {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&internal.data[1].to_le_bytes());
        raw[8..].copy_from_slice(&internal.data[2].to_le_bytes());
        let size = usize::from(raw[0]).min(15);
        bytes.extend_from_slice(&raw[1..1 + size]);
    }
    if bytes.is_empty() {
        if let Ok(t) = vcpu.translate_gva(rip) {
            if t.valid != 0 {
                let mut buf = [0u8; 15];
                if mem
                    .read_slice(&mut buf, GuestAddress(t.physical_address))
                    .is_ok()
                {
                    bytes.extend_from_slice(&buf);
                }
            }
        }
    }
    Ok(Some(EmulationFailure { rip, bytes }))
}

/// Applies a fallback to the vCPU: advances RIP past the instruction and, for `int3`,
/// injects #BP (vector 3).
///
/// # Errors
/// [`BootError::Kvm`] naming the ioctl that failed.
pub fn apply(
    vcpu: &VcpuFd,
    failure: &EmulationFailure,
    fallback: Fallback,
    len: u64,
) -> Result<(), BootError> {
    if matches!(fallback, Fallback::SseXor | Fallback::SseCompare) {
        let insn = failure.instruction();
        let (d, s) =
            xmm_pair(&failure.instruction()).ok_or_else(|| BootError::UnhandledInstruction {
                rip: failure.rip,
                bytes: failure.hex(),
                disassembly: failure.disassembly(),
            })?;
        let mut fpu = vcpu
            .get_fpu()
            .map_err(|e| BootError::Kvm("KVM_GET_FPU", e))?;
        if d >= fpu.xmm.len() || s >= fpu.xmm.len() {
            return Err(BootError::UnhandledInstruction {
                rip: failure.rip,
                bytes: failure.hex(),
                disassembly: failure.disassembly(),
            });
        }
        let src = fpu.xmm[s];
        if fallback == Fallback::SseXor {
            for (x, y) in fpu.xmm[d].iter_mut().zip(src) {
                *x ^= y;
            }
        } else {
            let lane = match insn.mnemonic() {
                Mnemonic::Pcmpeqb => 1,
                Mnemonic::Pcmpeqw => 2,
                _ => 4,
            };
            sse_compare(&mut fpu.xmm[d], &src, lane);
        }
        vcpu.set_fpu(&fpu)
            .map_err(|e| BootError::Kvm("KVM_SET_FPU", e))?;
    }
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| BootError::Kvm("KVM_GET_REGS", e))?;
    regs.rip = regs.rip.wrapping_add(len);
    vcpu.set_regs(&regs)
        .map_err(|e| BootError::Kvm("KVM_SET_REGS", e))?;
    if fallback == Fallback::Int3 {
        let mut events = vcpu
            .get_vcpu_events()
            .map_err(|e| BootError::Kvm("KVM_GET_VCPU_EVENTS", e))?;
        events.exception.injected = 1;
        events.exception.nr = 3;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        events.exception.pending = 0;
        events.flags = 0;
        vcpu.set_vcpu_events(&events)
            .map_err(|e| BootError::Kvm("KVM_SET_VCPU_EVENTS", e))?;
    }
    Ok(())
}

/// `pcmpeq` on lanes of `lane` bytes: each lane of `d` becomes all ones where it equals the
/// same lane of `s`, else zero.
fn sse_compare(d: &mut [u8; 16], s: &[u8; 16], lane: usize) {
    for (a, b) in d.chunks_mut(lane).zip(s.chunks(lane)) {
        let v = if a == b { 0xff } else { 0 };
        a.fill(v);
    }
}

/// How often each fallback fired and the time spent in them.
#[derive(Debug, Default, Clone)]
pub struct FallbackStats {
    /// Count per fallback.
    pub counts: BTreeMap<Fallback, u64>,
    /// Wall time spent decoding and applying fallbacks.
    pub time: Duration,
}

impl FallbackStats {
    /// Adds another vCPU's figures.
    pub fn merge(&mut self, other: &FallbackStats) {
        for (k, v) in &other.counts {
            *self.counts.entry(*k).or_default() += v;
        }
        self.time += other.time;
    }

    /// Total number of fallbacks.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

impl fmt::Display for FallbackStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.counts.is_empty() {
            return write!(f, "none fired");
        }
        let parts: Vec<String> = self
            .counts
            .iter()
            .map(|(k, v)| format!("{} x{v}", k.name()))
            .collect();
        write!(
            f,
            "{} ({:.3} ms)",
            parts.join(", "),
            self.time.as_secs_f64() * 1e3
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(bytes: &[u8]) -> EmulationFailure {
        EmulationFailure {
            rip: 0xffff_ffff_8100_0000,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn int3_and_fwait_are_handled() {
        assert_eq!(
            classify(&failure(&[0xcc, 0x90])).unwrap(),
            (Fallback::Int3, 1)
        );
        assert_eq!(
            classify(&failure(&[0x9b, 0xdb])).unwrap(),
            (Fallback::Fwait, 1)
        );
    }

    #[test]
    fn sse_idioms_are_recognised_and_computed() {
        // pcmpeqd xmm0,xmm0; pcmpeqb xmm1,xmm2
        assert_eq!(
            classify(&failure(&[0x66, 0x0f, 0x76, 0xc0])).unwrap(),
            (Fallback::SseCompare, 4)
        );
        assert_eq!(
            classify(&failure(&[0x66, 0x0f, 0x74, 0xca])).unwrap(),
            (Fallback::SseCompare, 4)
        );
        let mut d = [7u8; 16];
        sse_compare(&mut d, &[7u8; 16], 4);
        assert_eq!(d, [0xff; 16], "the all-ones idiom");
        let mut d = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        let mut s = d;
        s[5] = 0;
        sse_compare(&mut d, &s, 4);
        assert_eq!(&d[..8], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(&d[8..], &[0xff; 8]);
        let mut d = [1u8; 16];
        let mut s = [1u8; 16];
        s[3] = 9;
        sse_compare(&mut d, &s, 2);
        assert_eq!(&d[..4], &[0xff, 0xff, 0, 0]);
    }

    #[test]
    fn others_are_named() {
        // lock cmpxchg16b [rdi]
        let err = classify(&failure(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cmpxchg16b"), "{msg}");
        assert!(msg.contains("f0 48 0f c7 0f"), "{msg}");
        assert!(msg.contains("0xffffffff81000000"), "{msg}");
    }

    #[test]
    fn detect_pvm_from_sysfs() {
        let dir = std::env::temp_dir().join(format!("quirks-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(HostQuirks::detect_in(&dir), HostQuirks::None);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(HostQuirks::detect_in(&dir), HostQuirks::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
