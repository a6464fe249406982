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
    /// Kernel to boot: an uncompressed ELF `vmlinux` (or bare-metal ELF) or a bzImage. Not
    /// needed with --incoming or --restore.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["incoming", "restore"])]
    pub kernel: Option<PathBuf>,

    /// Initramfs (cpio archive) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line. Host quirks may append parameters (see --host-quirks).
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest RAM: a number with an optional K, M or G suffix (binary units; no suffix =
    /// MiB), optionally `,hugepages=on` to back it with 2 MiB hugetlb pages (the host must
    /// have that many free: /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages).
    #[arg(long, value_name = "SIZE[,hugepages=on]", default_value = "512M",
          value_parser = parse_memory)]
    pub memory: MemoryArg,

    /// Threads that populate and map guest RAM for passthrough devices outside the vIOMMU
    /// (cuts fall on the backing page size); default: the host's CPU count.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub dma_threads: Option<u16>,

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

    /// Seccomp filters on every thread: `on` stops the VMM with a message naming the thread
    /// and the system call when a thread makes one outside its list, `log` lets it through
    /// and has the kernel log it (`dmesg`), `off` installs none.
    #[arg(long, value_name = "on|log|off", default_value = "on", value_parser = parse_seccomp)]
    pub seccomp: devices::seccomp::Mode,

    /// Adds the virtio-iommu at PCI 00:01.0. `boot-bypass=on` (or `bypass=on`) lets endpoints
    /// that are not attached to a domain reach all of guest RAM (the initial value of the
    /// config field `bypass`; default off). `aw-bits=N` (32-64, default 48) sets the width
    /// of the IOVA input range advertised in `input_range`; widths above 48 are narrowed to
    /// the 48 bits the page table translates, and host backends may narrow it further.
    /// `domains=N` (1-4294967296, default 65536) makes the domain IDs 0..N-1
    /// (`domain_range`).
    #[arg(long, value_name = "[boot-bypass=on|off][,aw-bits=N][,domains=N]", num_args = 0..=1,
          default_missing_value = "", value_parser = parse_iommu)]
    pub iommu: Option<IommuArg>,

    /// Attaches a virtio-blk disk backed by a raw image; `iommu=on` puts it behind the
    /// virtio-iommu. Repeatable.
    #[arg(long, value_name = "path=FILE[,iommu=on][,readonly=on]", value_parser = parse_disk)]
    pub disk: Vec<DiskArg>,

    /// Attaches a passthrough device served by a vfio-user process on `socket`; `iommu=on`
    /// puts it behind the virtio-iommu (else all guest RAM is mapped at its GPA).
    /// `dma=fault` makes host mappings only when the device asks with a page request (at
    /// most `prefault=SIZE` per request, default 2M) instead of when the guest maps
    /// (`dma=static` or `shared`, the default: guest RAM shared by file descriptor);
    /// `dma=messages` gives the device no RAM descriptor: it reaches guest memory only
    /// through DMA_READ/DMA_WRITE messages the VMM checks against its mappings. BAR areas the
    /// device offers for mapping are mapped into the guest unless `mmap=off`. Repeatable.
    #[arg(long = "vfio-user", value_name = "socket=PATH[,iommu=on][,dma=static|fault|messages][,prefault=SIZE][,mmap=on|off]",
          value_parser = parse_vfio_user)]
    pub vfio_user: Vec<PassthroughArg>,

    /// Attaches a host PCI device through VFIO (`path=/sys/bus/pci/devices/BDF`);
    /// `backend=type1|iommufd` picks the host interface. Repeatable.
    #[arg(long, value_name = "path=SYSFS[,iommu=on][,backend=type1|iommufd]", value_parser = parse_vfio)]
    pub vfio: Vec<PassthroughArg>,

    /// Attaches a virtio-net device whose datapath is a vhost-user back end (DPDK testpmd,
    /// OVS-DPDK) listening on `socket`. `iommu=on` puts it behind the virtio-iommu (the back end
    /// then needs a device IOTLB); `mac=` sets its MAC (default 52:54:00:12:34:56, then :57 ...);
    /// `queues=` its queue pairs (1-8); `reconnect=SECS` reconnects when the back end returns
    /// after going away; `iotlb=prefetch` (default) sends the back end each guest mapping as
    /// it is made, `iotlb=miss` only when the back end misses. Repeatable.
    #[arg(long = "vhost-user-net",
          value_name = "socket=PATH[,iommu=on][,mac=MAC][,queues=N][,reconnect=SECS][,iotlb=prefetch|miss]",
          value_parser = parse_vhost_user_net)]
    pub vhost_user_net: Vec<NetArg>,

    /// Prints per-device counters (requests, statuses, faults, IOTLB) when the VM ends.
    #[arg(long)]
    pub counters: bool,

    /// Tracks, from boot, the guest pages passthrough devices write (through the vIOMMU, or
    /// directly for devices not behind it); --counters then reports them (`dirty log:`).
    #[arg(long)]
    pub track_dirty: bool,

    /// With --track-dirty: writes the set of guest pages passthrough devices wrote since
    /// boot to this file when the VM ends (`pages=N`, then `FIRST+COUNT` page frame numbers
    /// in hex, one run per line).
    #[arg(long, value_name = "FILE", requires = "track_dirty")]
    pub dirty_log_out: Option<PathBuf>,

    /// Serves the control API (JSON lines: pause, resume, snapshot, migrate, ...) on this
    /// Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Instead of booting, waits for a migrated guest on `unix:PATH` or `tcp:HOST:PORT`, or
    /// (`defer`) for the API's `restore` or `receive`. The other flags must describe the same
    /// machine as the source's.
    #[arg(long, value_name = "unix:PATH|tcp:HOST:PORT|defer", value_parser = parse_incoming,
          conflicts_with = "restore")]
    pub incoming: Option<IncomingArg>,

    /// Instead of booting, restores the snapshot in DIR (written by the API's `snapshot`).
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,

    /// Log level of the VMM's own messages (stderr): error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,
}

/// `--incoming`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingArg {
    /// Listen on this address.
    Listen(crate::migration::Address),
    /// Wait for the API.
    Defer,
}

fn parse_incoming(s: &str) -> Result<IncomingArg, String> {
    if s == "defer" {
        return Ok(IncomingArg::Defer);
    }
    s.parse().map(IncomingArg::Listen)
}

/// `--iommu` options (QEMU's virtio-iommu has `boot-bypass` and `aw-bits` too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuArg {
    /// Initial `bypass` value.
    pub bypass: bool,
    /// Width of the input range in bits, 32..=64.
    pub aw_bits: u32,
    /// Number of domain IDs (`domain_range` is `[0, domains - 1]`), 1..=2^32.
    pub domains: u64,
}

impl Default for IommuArg {
    fn default() -> Self {
        Self {
            bypass: false,
            aw_bits: iommu::pagetable::IOVA_BITS,
            domains: 0x1_0000,
        }
    }
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// Raw image.
    pub path: PathBuf,
    /// Behind the virtio-iommu.
    pub iommu: bool,
    /// Read-only.
    pub readonly: bool,
}

/// One `--vfio-user` or `--vfio`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughArg {
    /// The socket (vfio-user) or sysfs device path (VFIO).
    pub path: PathBuf,
    /// Behind the virtio-iommu.
    pub iommu: bool,
    /// Host VFIO through iommufd instead of a type1 container.
    pub iommufd: bool,
    /// `dma=fault`: host mappings made on the device's page requests, this many bytes (a
    /// power of two, the `prefault=` window) at most per request; `None` for `dma=static`.
    pub fault_window: Option<u64>,
    /// `dma=messages`: no guest-RAM descriptor for the device; its DMA goes through
    /// DMA_READ/DMA_WRITE messages.
    pub messages: bool,
    /// BAR areas the device lets map are mapped into the guest (`mmap=on`, the default);
    /// `mmap=off` sends every BAR access to the device as a message.
    pub mmap: bool,
}

/// The default `prefault=` window.
pub const DEFAULT_PREFAULT: u64 = 2 << 20;

fn parse_vfio_user(s: &str) -> Result<PassthroughArg, String> {
    let mut a = PassthroughArg {
        path: PathBuf::new(),
        iommu: false,
        iommufd: false,
        fault_window: None,
        messages: false,
        mmap: true,
    };
    let mut fault = false;
    let mut prefault = None;
    for (k, v) in parse_kv(s, &["socket", "iommu", "dma", "prefault", "mmap"])? {
        match k.as_str() {
            "socket" if !v.is_empty() => a.path = PathBuf::from(v),
            "iommu" => a.iommu = on_off(&k, &v)?,
            "mmap" => a.mmap = on_off(&k, &v)?,
            "dma" => {
                (fault, a.messages) = match v.as_str() {
                    "static" | "shared" => (false, false),
                    "fault" => (true, false),
                    "messages" => (false, true),
                    _ => {
                        return Err(format!(
                            "`dma={v}`: expected `static` (or `shared`), `fault` or `messages`"
                        ))
                    }
                }
            }
            "prefault" => {
                let w = parse_size(&v).map_err(|e| format!("`prefault=`: {e}"))?;
                if !w.is_power_of_two() || w < 4096 {
                    return Err(format!(
                        "`prefault={v}`: a power of two of at least 4K (e.g. 64K, 2M)"
                    ));
                }
                prefault = Some(w);
            }
            _ => return Err(format!("`{k}=` needs a value")),
        }
    }
    if a.path.as_os_str().is_empty() {
        return Err("missing socket=PATH".into());
    }
    match (fault, prefault) {
        (true, w) => a.fault_window = Some(w.unwrap_or(DEFAULT_PREFAULT)),
        (false, Some(_)) => return Err("`prefault=` needs `dma=fault`".into()),
        (false, None) => {}
    }
    Ok(a)
}

/// One `--vhost-user-net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    /// The back end's socket.
    pub socket: PathBuf,
    /// Behind the virtio-iommu.
    pub iommu: bool,
    /// MAC address, if given.
    pub mac: Option<[u8; 6]>,
    /// Queue pairs.
    pub queues: u16,
    /// Seconds between reconnection attempts, if any.
    pub reconnect: Option<u64>,
    /// Fill the device IOTLB with every guest mapping, not only on misses.
    pub prefetch: bool,
}

fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    let bad = || format!("`mac={v}`: expected six hex bytes such as 52:54:00:12:34:56");
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "`mac={v}`: a multicast address cannot be a device's MAC"
        ));
    }
    Ok(mac)
}

fn parse_vhost_user_net(s: &str) -> Result<NetArg, String> {
    let mut a = NetArg {
        socket: PathBuf::new(),
        iommu: false,
        mac: None,
        queues: 1,
        reconnect: None,
        prefetch: true,
    };
    for (k, v) in parse_kv(
        s,
        &["socket", "iommu", "mac", "queues", "reconnect", "iotlb"],
    )? {
        match k.as_str() {
            "socket" if !v.is_empty() => a.socket = PathBuf::from(v),
            "iommu" => a.iommu = on_off(&k, &v)?,
            "mac" => a.mac = Some(parse_mac(&v)?),
            "queues" => {
                a.queues = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=8).contains(n))
                    .ok_or_else(|| format!("`queues={v}`: expected 1 to 8 queue pairs"))?
            }
            "iotlb" => {
                a.prefetch = match v.as_str() {
                    "prefetch" => true,
                    "miss" => false,
                    _ => return Err(format!("`iotlb={v}`: expected prefetch or miss")),
                }
            }
            "reconnect" => {
                a.reconnect = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=3600).contains(n))
                        .ok_or_else(|| format!("`reconnect={v}`: expected 1 to 3600 seconds"))?,
                )
            }
            _ => return Err(format!("`{k}=` needs a value")),
        }
    }
    if a.socket.as_os_str().is_empty() {
        return Err("missing socket=PATH".into());
    }
    Ok(a)
}

fn parse_vfio(s: &str) -> Result<PassthroughArg, String> {
    let mut a = PassthroughArg {
        path: PathBuf::new(),
        iommu: false,
        iommufd: false,
        fault_window: None,
        messages: false,
        mmap: true,
    };
    for (k, v) in parse_kv(s, &["path", "iommu", "backend"])? {
        match k.as_str() {
            "path" if !v.is_empty() => a.path = PathBuf::from(v),
            "iommu" => a.iommu = on_off(&k, &v)?,
            "backend" => {
                a.iommufd = match v.as_str() {
                    "type1" => false,
                    "iommufd" => true,
                    _ => return Err(format!("`backend={v}`: expected type1 or iommufd")),
                }
            }
            _ => return Err(format!("`{k}=` needs a value")),
        }
    }
    if a.path.as_os_str().is_empty() {
        return Err("missing path=/sys/bus/pci/devices/BDF".into());
    }
    Ok(a)
}

/// Splits `key=value,key=value`, refusing keys not in `allowed`.
pub fn parse_kv(s: &str, allowed: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not key=value"))?;
        if !allowed.contains(&k) {
            return Err(format!(
                "unknown key `{k}` (expected {})",
                allowed.join(", ")
            ));
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(format!(
                "`{k}=` given twice{}",
                if k == "dma" {
                    " (one DMA mode per device: `dma=messages` gives the device no RAM to map \
                     on demand, so it does not combine with `dma=fault`)"
                } else {
                    ""
                }
            ));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("`{key}={v}`: expected on or off")),
    }
}

fn parse_seccomp(s: &str) -> Result<devices::seccomp::Mode, String> {
    s.parse()
}

fn parse_iommu(s: &str) -> Result<IommuArg, String> {
    let mut a = IommuArg::default();
    for (k, v) in parse_kv(s, &["boot-bypass", "bypass", "aw-bits", "domains"])? {
        match k.as_str() {
            "aw-bits" => {
                a.aw_bits = v
                    .parse()
                    .ok()
                    .filter(|n| (32..=64).contains(n))
                    .ok_or_else(|| format!("`aw-bits={v}`: expected a width from 32 to 64"))?
            }
            "domains" => {
                a.domains = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1 << 32).contains(n))
                    .ok_or_else(|| format!("`domains={v}`: expected 1 to 4294967296"))?
            }
            _ => a.bypass = on_off(&k, &v)?,
        }
    }
    Ok(a)
}

fn parse_disk(s: &str) -> Result<DiskArg, String> {
    let mut path = None;
    let mut iommu = false;
    let mut readonly = false;
    for (k, v) in parse_kv(s, &["path", "iommu", "readonly"])? {
        match k.as_str() {
            "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "iommu" => iommu = on_off(&k, &v)?,
            "readonly" => readonly = on_off(&k, &v)?,
            _ => return Err(format!("`{k}=` needs a value")),
        }
    }
    let path = path.ok_or("missing path=FILE")?;
    Ok(DiskArg {
        path,
        iommu,
        readonly,
    })
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

/// `--memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryArg {
    /// Bytes of RAM.
    pub size: u64,
    /// Backed by 2 MiB hugetlb pages.
    pub hugepages: bool,
}

/// Bytes of a hugetlb page with `hugepages=on`.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;

fn parse_memory(s: &str) -> Result<MemoryArg, String> {
    let mut parts = s.split(',');
    let first = parts.next().unwrap_or_default();
    let size = parse_size(first.strip_prefix("size=").unwrap_or(first))?;
    let mut hugepages = false;
    for opt in parts {
        hugepages = match opt {
            "hugepages=on" => true,
            "hugepages=off" => false,
            _ => {
                return Err(format!(
                    "unknown option `{opt}` (expected hugepages=on|off)"
                ))
            }
        };
    }
    if hugepages && !size.is_multiple_of(HUGEPAGE_SIZE) {
        return Err(format!(
            "{size:#x} bytes is not a multiple of the 2 MiB hugetlb page"
        ));
    }
    Ok(MemoryArg { size, hugepages })
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
    fn disks_and_iommu() {
        assert_eq!(
            parse_disk("path=/a.img,iommu=on"),
            Ok(DiskArg {
                path: "/a.img".into(),
                iommu: true,
                readonly: false
            })
        );
        assert!(parse_disk("iommu=on").unwrap_err().contains("path"));
        assert!(parse_disk("path=x,speed=fast")
            .unwrap_err()
            .contains("`speed`"));
        assert!(parse_disk("path=x,iommu=maybe")
            .unwrap_err()
            .contains("on or off"));
        assert_eq!(parse_iommu(""), Ok(IommuArg::default()));
        let on = IommuArg {
            bypass: true,
            ..Default::default()
        };
        assert_eq!(parse_iommu("bypass=on"), Ok(on.clone()));
        assert_eq!(parse_iommu("boot-bypass=on"), Ok(on));
        assert_eq!(
            parse_iommu("aw-bits=39,domains=8,boot-bypass=off"),
            Ok(IommuArg {
                bypass: false,
                aw_bits: 39,
                domains: 8
            })
        );
        assert_eq!(
            parse_iommu("aw-bits=64,domains=4294967296")
                .unwrap()
                .domains,
            1 << 32
        );
        for bad in [
            "aw-bits=31",
            "aw-bits=65",
            "aw-bits=x",
            "domains=0",
            "domains=4294967297",
        ] {
            let key = bad.split('=').next().unwrap();
            let e = parse_iommu(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
            assert!(e.contains(key));
        }
        assert!(parse_iommu("boot-bypass=maybe")
            .unwrap_err()
            .contains("boot-bypass"));
        let cli =
            Cli::try_parse_from(["vmm", "--kernel", "k", "--iommu", "--disk", "path=d"]).unwrap();
        assert_eq!(cli.iommu, Some(IommuArg::default()));
        assert_eq!(cli.disk.len(), 1);
    }

    #[test]
    fn vhost_user_net() {
        let a = parse_vhost_user_net(
            "socket=/s,iommu=on,mac=52:54:00:aa:bb:0c,queues=2,reconnect=3,iotlb=miss",
        )
        .unwrap();
        assert_eq!(
            a,
            NetArg {
                socket: "/s".into(),
                iommu: true,
                mac: Some([0x52, 0x54, 0, 0xaa, 0xbb, 0x0c]),
                queues: 2,
                reconnect: Some(3),
                prefetch: false,
            }
        );
        assert!(parse_vhost_user_net("socket=/s").unwrap().prefetch);
        assert!(parse_vhost_user_net("socket=/s,iotlb=eager")
            .unwrap_err()
            .contains("`iotlb=eager`"));
        assert!(parse_vhost_user_net("iommu=on")
            .unwrap_err()
            .contains("socket"));
        assert!(parse_vhost_user_net("socket=/s,mac=52:54:00")
            .unwrap_err()
            .contains("`mac=52:54:00`"));
        assert!(parse_vhost_user_net("socket=/s,mac=01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_vhost_user_net("socket=/s,queues=9")
            .unwrap_err()
            .contains("`queues=9`"));
        assert!(parse_vhost_user_net("socket=/s,reconnect=0")
            .unwrap_err()
            .contains("`reconnect=0`"));
        assert!(parse_vhost_user_net("socket=/s,speed=fast")
            .unwrap_err()
            .contains("`speed`"));
        let err = Cli::try_parse_from(["vmm", "--kernel", "k", "--vhost-user-net", "queues=2"])
            .unwrap_err();
        assert!(err.to_string().contains("--vhost-user-net"));
    }

    #[test]
    fn unknown_flag_is_named() {
        let err = Cli::try_parse_from(["vmm", "--kernel", "k", "--bogus"]).unwrap_err();
        assert!(err.to_string().contains("--bogus"));
        let err = Cli::try_parse_from(["vmm", "--kernel", "k", "--memory", "x"]).unwrap_err();
        assert!(err.to_string().contains("--memory"));
    }

    #[test]
    fn memory_takes_hugepages_and_dma_threads_a_count() {
        let parse = |m: &str| Cli::try_parse_from(["vmm", "--kernel", "k", "--memory", m]);
        let m = parse("1G,hugepages=on").unwrap().memory;
        assert_eq!(
            m,
            MemoryArg {
                size: 1 << 30,
                hugepages: true
            }
        );
        let m = parse("size=64M,hugepages=off").unwrap().memory;
        assert_eq!(
            m,
            MemoryArg {
                size: 64 << 20,
                hugepages: false
            }
        );
        assert_eq!(parse("512").unwrap().memory.size, 512 << 20);
        for (bad, why) in [
            ("3M,hugepages=on", "2 MiB hugetlb page"),
            ("1G,huge=on", "`huge=on`"),
            ("1G,hugepages=yes", "`hugepages=yes`"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("--memory") && err.contains(why),
                "{bad}: {err}"
            );
        }
        let cli = Cli::try_parse_from(["vmm", "--kernel", "k", "--dma-threads", "3"]).unwrap();
        assert_eq!(cli.dma_threads, Some(3));
        let err = Cli::try_parse_from(["vmm", "--kernel", "k", "--dma-threads", "0"]).unwrap_err();
        assert!(err.to_string().contains("--dma-threads"));
    }

    #[test]
    fn vfio_user_takes_a_dma_policy() {
        let parse = |v: &str| Cli::try_parse_from(["vmm", "--kernel", "k", "--vfio-user", v]);
        let a = &parse("socket=/s,iommu=on,dma=fault").unwrap().vfio_user[0];
        assert_eq!((a.iommu, a.fault_window), (true, Some(DEFAULT_PREFAULT)));
        let a = &parse("socket=/s,dma=fault,prefault=64K").unwrap().vfio_user[0];
        assert_eq!(a.fault_window, Some(64 << 10));
        let a = &parse("socket=/s,dma=static").unwrap().vfio_user[0];
        assert_eq!((a.fault_window, a.messages), (None, false));
        let a = &parse("socket=/s,dma=shared").unwrap().vfio_user[0];
        assert_eq!((a.fault_window, a.messages), (None, false));
        let a = &parse("socket=/s,iommu=on,dma=messages").unwrap().vfio_user[0];
        assert_eq!((a.fault_window, a.messages, a.mmap), (None, true, true));
        let a = &parse("socket=/s,mmap=off").unwrap().vfio_user[0];
        assert!(!a.mmap);
        for (bad, why) in [
            ("socket=/s,dma=lazy", "`dma=lazy`"),
            ("socket=/s,dma=fault,prefault=3K", "power of two"),
            ("socket=/s,prefault=2M", "needs `dma=fault`"),
            ("socket=/s,dma=messages,prefault=2M", "needs `dma=fault`"),
            (
                "socket=/s,dma=fault,dma=messages",
                "does not combine with `dma=fault`",
            ),
            ("socket=/s,iommu=on,iommu=off", "`iommu=` given twice"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("--vfio-user") && err.contains(why),
                "{bad}: {err}"
            );
        }
    }
}
