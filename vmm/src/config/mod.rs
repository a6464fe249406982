//! What a VM is made of, as plain data: the parsed and validated form of the command line
//! (`cli.rs` produces a [`VmConfig`]), which `build` turns into a running machine. Each
//! `parse_*` function is the one place a flag's value is checked; its error names the key and
//! value at fault. This module imports nothing else of the crate.

use std::path::PathBuf;

use clap::ValueEnum;

/// Kernel command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// A whole VM: every flag of `vmm` but the log level.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel to boot (ELF `vmlinux`, bare-metal ELF or bzImage); `None` with an incoming
    /// guest or a restore.
    pub kernel: Option<PathBuf>,
    /// Initramfs (cpio archive).
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (host quirks may append to it).
    pub cmdline: String,
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// Threads that populate and map guest RAM for passthrough devices outside the vIOMMU;
    /// `None`: the host's CPU count.
    pub dma_threads: Option<u16>,
    /// vCPUs, 1..=16.
    pub cpus: u8,
    /// The serial console's destination.
    pub serial: SerialConfig,
    /// Host workarounds.
    pub host_quirks: QuirksConfig,
    /// Seccomp mode of every thread.
    pub seccomp: devices::seccomp::Mode,
    /// The virtio-iommu, if any.
    pub iommu: Option<IommuConfig>,
    /// virtio-blk disks.
    pub disk: Vec<DiskConfig>,
    /// vfio-user passthrough devices.
    pub vfio_user: Vec<PassthroughConfig>,
    /// VFIO passthrough devices.
    pub vfio: Vec<PassthroughConfig>,
    /// virtio-net devices on vhost-user back ends.
    pub vhost_user_net: Vec<NetConfig>,
    /// PCI slots kept free for devices added while the guest runs.
    pub hotplug: Option<HotplugConfig>,
    /// Print per-device counters when the VM ends.
    pub counters: bool,
    /// Track the pages passthrough devices write from boot.
    pub track_dirty: bool,
    /// Where to write the pages passthrough devices wrote, when the VM ends.
    pub dirty_log_out: Option<PathBuf>,
    /// The control API's Unix socket.
    pub api_socket: Option<PathBuf>,
    /// Wait for a migrated guest instead of booting.
    pub incoming: Option<IncomingConfig>,
    /// Restore the snapshot in this directory instead of booting.
    pub restore: Option<PathBuf>,
}

/// Addresses of the other side of a migration: `unix:PATH`, or `tcp:HOST:PORT` with
/// `tls=DIR` or `insecure`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket path. Each side checks the other's uid (`SO_PEERCRED`).
    Unix(PathBuf),
    /// `HOST:PORT` and how the stream is protected.
    Tcp {
        /// `HOST:PORT`.
        host_port: String,
        /// Mutual TLS, or clear text.
        security: TcpSecurity,
    },
}

/// How a TCP migration stream is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpSecurity {
    /// Mutual TLS with the certificates in a directory.
    Tls(TlsConfig),
    /// Clear text, unauthenticated (`insecure`): for a trusted network only.
    Insecure,
}

/// Certificates for a TLS migration, in QEMU's `tls-creds-x509` layout: `DIR/ca-cert.pem`
/// (the CA both sides' certificates must chain to), `DIR/server-cert.pem` and
/// `DIR/server-key.pem` (the destination's), `DIR/client-cert.pem` and
/// `DIR/client-key.pem` (the source's). PEM files; keys in PKCS#8, PKCS#1 or SEC1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The directory.
    pub dir: PathBuf,
    /// The name the source expects in the destination's certificate (`tls-hostname=`;
    /// the address's host by default).
    pub hostname: Option<String>,
}

impl Address {
    /// `HOST` of a TCP address (without brackets around an IPv6 address).
    pub fn host(&self) -> Option<&str> {
        match self {
            Address::Unix(_) => None,
            Address::Tcp { host_port, .. } => host_port
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']')),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let addr = parts.next().unwrap_or_default();
        let (mut tls, mut hostname, mut insecure) = (None, None, false);
        for opt in parts {
            match opt.split_once('=') {
                Some(("tls", d)) if !d.is_empty() => tls = Some(PathBuf::from(d)),
                Some(("tls-hostname", h)) if !h.is_empty() => hostname = Some(h.to_string()),
                None if opt == "insecure" => insecure = true,
                _ => {
                    return Err(format!(
                        "unknown migration address option `{opt}` (tls=DIR, tls-hostname=NAME, \
                         insecure)"
                    ))
                }
            }
        }
        if let Some(p) = addr.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            if tls.is_some() || hostname.is_some() || insecure {
                return Err(
                    "unix: takes no tls or insecure option (the peers' uids are checked)".into(),
                );
            }
            Ok(Address::Unix(p.into()))
        } else if let Some(hp) = addr.strip_prefix("tcp:") {
            match hp.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {}
                _ => return Err(format!("'{hp}' is not HOST:PORT")),
            }
            let security = match (tls, insecure) {
                (Some(dir), false) => TcpSecurity::Tls(TlsConfig { dir, hostname }),
                (None, true) if hostname.is_none() => TcpSecurity::Insecure,
                (Some(_), true) => return Err("tls=DIR and insecure exclude each other".into()),
                (None, true) => return Err("tls-hostname needs tls=DIR".into()),
                (None, false) => {
                    return Err(format!(
                        "tcp:{hp} needs tls=DIR (mutual TLS with the certificates in DIR) or \
                         insecure (clear text, for a trusted network only)"
                    ))
                }
            };
            Ok(Address::Tcp {
                host_port: hp.to_string(),
                security,
            })
        } else {
            Err(format!("'{s}' is neither unix:PATH nor tcp:HOST:PORT"))
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp { host_port, .. } => write!(f, "tcp:{host_port}"),
        }
    }
}

/// `--incoming`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingConfig {
    /// Listen on this address.
    Listen(Address),
    /// Wait for the API.
    Defer,
}

/// Parses `--incoming`: `unix:PATH`, `tcp:HOST:PORT` or `defer`.
///
/// # Errors
/// A message naming what is wrong.
pub fn parse_incoming(s: &str) -> Result<IncomingConfig, String> {
    if s == "defer" {
        return Ok(IncomingConfig::Defer);
    }
    s.parse().map(IncomingConfig::Listen)
}

/// `--iommu` options (QEMU's virtio-iommu has `boot-bypass` and `aw-bits` too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuConfig {
    /// Initial `bypass` value.
    pub bypass: bool,
    /// Width of the input range in bits, 32..=64.
    pub aw_bits: u32,
    /// Number of domain IDs (`domain_range` is `[0, domains - 1]`), 1..=2^32.
    pub domains: u64,
}

impl Default for IommuConfig {
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
pub struct DiskConfig {
    /// Raw image.
    pub path: PathBuf,
    /// Behind the virtio-iommu.
    pub iommu: bool,
    /// Read-only.
    pub readonly: bool,
}

/// One `--vfio-user` or `--vfio`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughConfig {
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
    /// `slot=N`: the PCI device number (a `--hotplug` slot of the same kind, behind the
    /// vIOMMU or not), as a migration destination takes the device a source hot-added;
    /// `None`: the next free boot slot.
    pub slot: Option<u8>,
}

/// The default `prefault=` window.
pub const DEFAULT_PREFAULT: u64 = 2 << 20;

/// Parses one `--vfio-user`: `socket=PATH[,iommu=on][,dma=static|fault|messages][,prefault=SIZE][,mmap=on|off][,slot=N]`.
///
/// # Errors
/// A message naming the bad key or value.
pub fn parse_vfio_user(s: &str) -> Result<PassthroughConfig, String> {
    let mut a = PassthroughConfig {
        path: PathBuf::new(),
        iommu: false,
        iommufd: false,
        fault_window: None,
        messages: false,
        mmap: true,
        slot: None,
    };
    let mut fault = false;
    let mut prefault = None;
    for (k, v) in parse_kv(s, &["socket", "iommu", "dma", "prefault", "mmap", "slot"])? {
        match k.as_str() {
            "socket" if !v.is_empty() => a.path = PathBuf::from(v),
            "slot" => {
                let n = v
                    .strip_prefix("0x")
                    .map_or_else(|| v.parse(), |h| u8::from_str_radix(h, 16));
                a.slot = Some(
                    n.ok()
                        .filter(|n| (2..32).contains(n))
                        .ok_or_else(|| format!("`slot={v}`: a PCI device number, 2 to 31"))?,
                );
            }
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
pub struct NetConfig {
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

/// Parses a MAC address, six hex bytes such as `52:54:00:12:34:56` (not multicast).
///
/// # Errors
/// A message naming the bad value.
pub fn parse_mac(v: &str) -> Result<[u8; 6], String> {
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

/// Parses one `--vhost-user-net`: `socket=PATH[,iommu=on][,mac=MAC][,queues=N][,reconnect=SECS][,iotlb=prefetch|miss]`.
///
/// # Errors
/// A message naming the bad key or value.
pub fn parse_vhost_user_net(s: &str) -> Result<NetConfig, String> {
    let mut a = NetConfig {
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

/// Parses one `--vfio`: `path=SYSFS[,iommu=on][,backend=type1|iommufd]`.
///
/// # Errors
/// A message naming the bad key or value.
pub fn parse_vfio(s: &str) -> Result<PassthroughConfig, String> {
    let mut a = PassthroughConfig {
        path: PathBuf::new(),
        iommu: false,
        iommufd: false,
        fault_window: None,
        messages: false,
        mmap: true,
        slot: None,
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

/// Parses `--iommu`: `[boot-bypass=on|off][,aw-bits=N][,domains=N]` (empty: the defaults).
///
/// # Errors
/// A message naming the bad key or value.
pub fn parse_iommu(s: &str) -> Result<IommuConfig, String> {
    let mut a = IommuConfig::default();
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

/// `--hotplug`: PCI slots of bus 0 kept free at boot for passthrough devices added while the
/// guest runs (the API's `add-device`). The guest learns at boot, from the ACPI tables,
/// which slots exist and (VIOT) which of them are behind the virtio-iommu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugConfig {
    /// Slots behind the virtio-iommu (named in the VIOT).
    pub iommu: u8,
    /// Slots outside it (all guest RAM mapped on their device).
    pub direct: u8,
}

impl HotplugConfig {
    /// Most hot-pluggable slots: bus 0 keeps 00:00.0 to 00:03.0 for the host bridge, the
    /// virtio-iommu and two devices given by flags.
    pub const MAX_SLOTS: u8 = 28;

    /// Slots in all.
    pub fn slots(&self) -> u8 {
        self.iommu + self.direct
    }
}

/// Parses `--hotplug`: `[iommu=N][,direct=N]`, slots behind the virtio-iommu and outside it
/// (each 0 when the other is given; an empty value is `iommu=1`).
///
/// # Errors
/// A message naming the bad key or value.
pub fn parse_hotplug(s: &str) -> Result<HotplugConfig, String> {
    let mut a = HotplugConfig {
        iommu: 0,
        direct: 0,
    };
    let mut any = false;
    for (k, v) in parse_kv(s, &["iommu", "direct"])? {
        let n: u8 = v
            .parse()
            .ok()
            .filter(|n| *n <= HotplugConfig::MAX_SLOTS)
            .ok_or_else(|| {
                format!(
                    "`{k}={v}`: expected a number of slots, 0 to {}",
                    HotplugConfig::MAX_SLOTS
                )
            })?;
        match k.as_str() {
            "iommu" => a.iommu = n,
            _ => a.direct = n,
        }
        any = true;
    }
    if !any {
        a.iommu = 1;
    }
    if a.slots() == 0 {
        return Err("no slot: give iommu=N or direct=N above 0".into());
    }
    if a.slots() > HotplugConfig::MAX_SLOTS {
        return Err(format!(
            "{} slots: at most {} in all",
            a.slots(),
            HotplugConfig::MAX_SLOTS
        ));
    }
    Ok(a)
}

/// Parses one `--disk`: `path=FILE[,iommu=on][,readonly=on]`.
///
/// # Errors
/// A message naming the bad key or value.
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
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
    Ok(DiskConfig {
        path,
        iommu,
        readonly,
    })
}

/// `--serial` choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's stdout.
    Stdout,
    /// A file.
    File(PathBuf),
    /// Discarded.
    Off,
}

/// `--host-quirks` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuirksConfig {
    /// Detect the host.
    Auto,
    /// PVM workarounds on.
    Pvm,
    /// No workarounds.
    None,
}

impl QuirksConfig {
    /// Resolves `auto` against the running host.
    pub fn resolve(self) -> boot::quirks::HostQuirks {
        match self {
            QuirksConfig::Auto => boot::quirks::HostQuirks::detect(),
            QuirksConfig::Pvm => boot::quirks::HostQuirks::Pvm,
            QuirksConfig::None => boot::quirks::HostQuirks::None,
        }
    }
}

/// `--memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes of RAM.
    pub size: u64,
    /// Backed by 2 MiB hugetlb pages.
    pub hugepages: bool,
}

/// Bytes of a hugetlb page with `hugepages=on`.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;

/// Parses `--memory`: `SIZE[,hugepages=on|off]` (SIZE as [`parse_size`]; with hugepages a
/// multiple of [`HUGEPAGE_SIZE`]).
///
/// # Errors
/// A message naming the bad size or option.
pub fn parse_memory(s: &str) -> Result<MemoryConfig, String> {
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
    Ok(MemoryConfig { size, hugepages })
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

/// Parses `--serial`: `stdout`, `file=PATH` or `off`.
///
/// # Errors
/// A message naming the expected forms.
pub fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    match s {
        "stdout" => Ok(SerialConfig::Stdout),
        "off" => Ok(SerialConfig::Off),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
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
        assert_eq!(parse_serial("stdout"), Ok(SerialConfig::Stdout));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tty").is_err());
    }

    #[test]
    fn disks_and_iommu() {
        assert_eq!(
            parse_disk("path=/a.img,iommu=on"),
            Ok(DiskConfig {
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
        assert_eq!(parse_iommu(""), Ok(IommuConfig::default()));
        let on = IommuConfig {
            bypass: true,
            ..Default::default()
        };
        assert_eq!(parse_iommu("bypass=on"), Ok(on.clone()));
        assert_eq!(parse_iommu("boot-bypass=on"), Ok(on));
        assert_eq!(
            parse_iommu("aw-bits=39,domains=8,boot-bypass=off"),
            Ok(IommuConfig {
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
    }

    #[test]
    fn hotplug_slots_and_pinned_slots() {
        let h = |iommu, direct| Ok(HotplugConfig { iommu, direct });
        assert_eq!(parse_hotplug(""), h(1, 0));
        assert_eq!(parse_hotplug("direct=2"), h(0, 2));
        assert_eq!(parse_hotplug("iommu=3,direct=1"), h(3, 1));
        for (bad, says) in [
            ("iommu=0", "no slot"),
            ("iommu=29", "`iommu=29`"),
            ("iommu=20,direct=20", "at most 28"),
            ("direct=x", "`direct=x`"),
            ("slots=2", "`slots`"),
        ] {
            let e = parse_hotplug(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(parse_vfio_user("socket=/s,slot=31").unwrap().slot, Some(31));
        assert_eq!(
            parse_vfio_user("socket=/s,slot=0x1e").unwrap().slot,
            Some(30)
        );
        assert_eq!(parse_vfio_user("socket=/s").unwrap().slot, None);
        for bad in ["slot=1", "slot=32", "slot=x"] {
            let e = parse_vfio_user(&format!("socket=/s,{bad}")).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }

    #[test]
    fn vhost_user_net() {
        let a = parse_vhost_user_net(
            "socket=/s,iommu=on,mac=52:54:00:aa:bb:0c,queues=2,reconnect=3,iotlb=miss",
        )
        .unwrap();
        assert_eq!(
            a,
            NetConfig {
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
    }

    #[test]
    fn addresses_parse_and_print() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Address>(),
            Ok(Address::Unix("/tmp/m.sock".into()))
        );
        let tls: Address = "tcp:[::1]:4444,tls=/etc/vmm/tls,tls-hostname=dst"
            .parse()
            .unwrap();
        assert_eq!(tls.to_string(), "tcp:[::1]:4444");
        assert_eq!(tls.host(), Some("::1"));
        assert_eq!(
            tls,
            Address::Tcp {
                host_port: "[::1]:4444".into(),
                security: TcpSecurity::Tls(TlsConfig {
                    dir: "/etc/vmm/tls".into(),
                    hostname: Some("dst".into()),
                }),
            }
        );
        let clear: Address = "tcp:127.0.0.1:4444,insecure".parse().unwrap();
        assert_eq!(clear.to_string(), "tcp:127.0.0.1:4444");
        assert!(matches!(
            clear,
            Address::Tcp {
                security: TcpSecurity::Insecure,
                ..
            }
        ));
        for (bad, why) in [
            ("tcp:127.0.0.1:4444", "needs tls=DIR"),
            ("tcp:h:1,tls=/d,insecure", "exclude each other"),
            (
                "tcp:h:1,insecure,tls-hostname=x",
                "tls-hostname needs tls=DIR",
            ),
            ("tcp:h:1,tls=", "unknown migration address option `tls=`"),
            ("tcp:h:1,tsl=/d", "`tsl=/d`"),
            ("unix:/m,insecure", "unix: takes no tls or insecure option"),
            ("tcp:nohost,insecure", "is not HOST:PORT"),
            ("unix:", "needs a socket path"),
            ("ftp:x", "neither unix:PATH nor tcp:HOST:PORT"),
        ] {
            let e = bad.parse::<Address>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
