//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Kernel command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Boot a Linux kernel (or a bare-metal ELF guest) under KVM, optionally behind an emulated
/// virtio-iommu with passthrough devices.
#[derive(Parser, Debug, Clone)]
#[command(name = "vmm", version, about, max_term_width = 100)]
pub struct Cli {
    /// Kernel to boot: an uncompressed ELF `vmlinux` (or bare-metal ELF) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initramfs (cpio archive) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line. Host quirks may append parameters (see --host-quirks).
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest RAM: a number with an optional K, M or G suffix (binary units); no suffix = MiB.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub memory: u64,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=16))]
    pub cpus: u8,

    /// Where the guest's serial console goes: `stdout`, `file=PATH` or `off`.
    #[arg(long, value_name = "stdout|file=PATH|off", default_value = "stdout",
          value_parser = parse_serial)]
    pub serial: SerialArg,

    /// Host workarounds: `auto` detects a PVM-based KVM, `pvm` forces them, `none` disables.
    #[arg(long, value_enum, value_name = "auto|pvm|none", default_value_t = QuirksArg::Auto)]
    pub host_quirks: QuirksArg,

    /// Log level of the VMM's own messages (stderr): error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,
}

/// `--serial` choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialArg {
    /// The VMM's stdout.
    Stdout,
    /// A file.
    File(PathBuf),
    /// Discarded.
    Off,
}

/// `--host-quirks` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuirksArg {
    /// Detect the host.
    Auto,
    /// PVM workarounds on.
    Pvm,
    /// No workarounds.
    None,
}

impl QuirksArg {
    /// Resolves `auto` against the running host.
    pub fn resolve(self) -> boot::quirks::HostQuirks {
        match self {
            QuirksArg::Auto => boot::quirks::HostQuirks::detect(),
            QuirksArg::Pvm => boot::quirks::HostQuirks::Pvm,
            QuirksArg::None => boot::quirks::HostQuirks::None,
        }
    }
}

/// Parses `512M`, `1G`, `4096K`, `256` (MiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 20),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (expected e.g. 512M or 2G)"))?;
    n.checked_mul(1 << shift)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("`{s}` is not a usable size"))
}

fn parse_serial(s: &str) -> Result<SerialArg, String> {
    match s {
        "stdout" => Ok(SerialArg::Stdout),
        "off" => Ok(SerialArg::Off),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialArg::File(PathBuf::from(p))),
            _ => Err(format!(
                "expected `stdout`, `off` or `file=PATH`, got `{s}`"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64"), Ok(64 << 20));
        assert_eq!(parse_size("4096k"), Ok(4 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn serial() {
        assert_eq!(parse_serial("stdout"), Ok(SerialArg::Stdout));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialArg::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tty").is_err());
    }

    #[test]
    fn unknown_flag_is_named() {
        let err = Cli::try_parse_from(["vmm", "--kernel", "k", "--bogus"]).unwrap_err();
        assert!(err.to_string().contains("--bogus"));
        let err = Cli::try_parse_from(["vmm", "--kernel", "k", "--memory", "x"]).unwrap_err();
        assert!(err.to_string().contains("--memory"));
    }
}
