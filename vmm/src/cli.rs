//! Command-line interface: clap's view of the flags, turned into a [`VmConfig`] by
//! [`Cli::into_config`]. The values are parsed and checked by `config`; only `main.rs` uses
//! this module.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{
    parse_disk, parse_hotplug, parse_incoming, parse_iommu, parse_memory, parse_serial, parse_vfio,
    parse_vfio_user, parse_vhost_user_net, DiskConfig, HotplugConfig, IncomingConfig, IommuConfig,
    MemoryConfig, NetConfig, PassthroughConfig, QuirksConfig, SerialConfig, VmConfig,
    DEFAULT_CMDLINE,
};

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
    pub memory: MemoryConfig,

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
    pub serial: SerialConfig,

    /// Host workarounds: `auto` detects a PVM-based KVM, `pvm` forces them, `none` disables.
    #[arg(long, value_enum, value_name = "auto|pvm|none", default_value_t = QuirksConfig::Auto)]
    pub host_quirks: QuirksConfig,

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
    pub iommu: Option<IommuConfig>,

    /// Attaches a virtio-blk disk backed by a raw image; `iommu=on` puts it behind the
    /// virtio-iommu. Repeatable.
    #[arg(long, value_name = "path=FILE[,iommu=on][,readonly=on]", value_parser = parse_disk)]
    pub disk: Vec<DiskConfig>,

    /// Attaches a passthrough device served by a vfio-user process on `socket`; `iommu=on`
    /// puts it behind the virtio-iommu (else all guest RAM is mapped at its GPA).
    /// `dma=fault` makes host mappings only when the device asks with a page request (at
    /// most `prefault=SIZE` per request, default 2M) instead of when the guest maps
    /// (`dma=static` or `shared`, the default: guest RAM shared by file descriptor);
    /// `dma=messages` gives the device no RAM descriptor: it reaches guest memory only
    /// through DMA_READ/DMA_WRITE messages the VMM checks against its mappings. BAR areas the
    /// device offers for mapping are mapped into the guest unless `mmap=off`. `slot=N` puts
    /// it in `--hotplug` slot N (decimal or 0x hex), as on the source of a migration that
    /// hot-added it; it can be removed like a hot-added device. Repeatable.
    #[arg(long = "vfio-user", value_name = "socket=PATH[,iommu=on][,dma=static|fault|messages][,prefault=SIZE][,mmap=on|off][,slot=N]",
          value_parser = parse_vfio_user)]
    pub vfio_user: Vec<PassthroughConfig>,

    /// Attaches a host PCI device through VFIO (`path=/sys/bus/pci/devices/BDF`);
    /// `backend=type1|iommufd` picks the host interface. Repeatable.
    #[arg(long, value_name = "path=SYSFS[,iommu=on][,backend=type1|iommufd]", value_parser = parse_vfio)]
    pub vfio: Vec<PassthroughConfig>,

    /// Attaches a virtio-net device whose datapath is a vhost-user back end (DPDK testpmd,
    /// OVS-DPDK) listening on `socket`. `iommu=on` puts it behind the virtio-iommu (the back end
    /// then needs a device IOTLB); `mac=` sets its MAC (default 52:54:00:12:34:56, then :57 ...);
    /// `queues=` its queue pairs (1-8); `reconnect=SECS` reconnects when the back end returns
    /// after going away; `iotlb=prefetch` (default) sends the back end each guest mapping as
    /// it is made, `iotlb=miss` only when the back end misses. Repeatable.
    #[arg(long = "vhost-user-net",
          value_name = "socket=PATH[,iommu=on][,mac=MAC][,queues=N][,reconnect=SECS][,iotlb=prefetch|miss]",
          value_parser = parse_vhost_user_net)]
    pub vhost_user_net: Vec<NetConfig>,

    /// Keeps PCI slots free for passthrough devices added while the guest runs (the API's
    /// `add-device`, `vmm-ctl add-device`): `iommu=N` slots behind the virtio-iommu (named in
    /// the VIOT at boot, so the guest's driver attaches what arrives there) and `direct=N`
    /// outside it; the slots are the highest device numbers of bus 0. The guest is told
    /// through ACPI PCI hot-plug (a Generic Event Device and ejectable slots; Linux's
    /// acpiphp). Alone, `--hotplug` is `iommu=1`.
    #[arg(long, value_name = "[iommu=N][,direct=N]", num_args = 0..=1,
          default_missing_value = "", value_parser = parse_hotplug)]
    pub hotplug: Option<HotplugConfig>,

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

    /// Instead of booting, waits for a migrated guest on `unix:PATH` (a peer of this uid or
    /// root), on `tcp:HOST:PORT,tls=DIR` (mutual TLS: DIR holds ca-cert.pem,
    /// server-cert.pem, server-key.pem) or `tcp:HOST:PORT,insecure` (clear text), or
    /// (`defer`) for the API's `restore` or `receive`. The other flags must describe the same
    /// machine as the source's.
    #[arg(long, value_name = "unix:PATH|tcp:HOST:PORT,tls=DIR|tcp:HOST:PORT,insecure|defer",
          value_parser = parse_incoming,
          conflicts_with = "restore")]
    pub incoming: Option<IncomingConfig>,

    /// Instead of booting, restores the snapshot in DIR (written by the API's `snapshot`).
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,

    /// Log level of the VMM's own messages (stderr): error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,
}

fn parse_seccomp(s: &str) -> Result<devices::seccomp::Mode, String> {
    s.parse()
}

impl Cli {
    /// The VM these flags describe (everything but the log level).
    pub fn into_config(self) -> VmConfig {
        VmConfig {
            kernel: self.kernel,
            initramfs: self.initramfs,
            cmdline: self.cmdline,
            memory: self.memory,
            dma_threads: self.dma_threads,
            cpus: self.cpus,
            serial: self.serial,
            host_quirks: self.host_quirks,
            seccomp: self.seccomp,
            iommu: self.iommu,
            disk: self.disk,
            vfio_user: self.vfio_user,
            vfio: self.vfio,
            vhost_user_net: self.vhost_user_net,
            hotplug: self.hotplug,
            counters: self.counters,
            track_dirty: self.track_dirty,
            dirty_log_out: self.dirty_log_out,
            api_socket: self.api_socket,
            incoming: self.incoming,
            restore: self.restore,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IommuConfig, MemoryConfig, DEFAULT_PREFAULT};

    #[test]
    fn iommu_and_disk_flags() {
        let cli =
            Cli::try_parse_from(["vmm", "--kernel", "k", "--iommu", "--disk", "path=d"]).unwrap();
        assert_eq!(cli.iommu, Some(IommuConfig::default()));
        assert_eq!(cli.disk.len(), 1);
    }

    #[test]
    fn a_bad_vhost_user_net_is_named() {
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
            MemoryConfig {
                size: 1 << 30,
                hugepages: true
            }
        );
        let m = parse("size=64M,hugepages=off").unwrap().memory;
        assert_eq!(
            m,
            MemoryConfig {
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
