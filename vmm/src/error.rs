//! Errors of the VMM process; each prints as one line naming what failed.

/// What stopped the VMM from starting or running a guest.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open {0} (is KVM available and accessible?)")]
    KvmOpen(String, #[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest RAM too small.
    #[error("--memory {0} bytes is too small: at least 2 MiB, in whole 4 KiB pages")]
    MemoryTooSmall(u64),
    /// `hugepages=on` without enough free hugetlb pages.
    #[error(
        "--memory ...,hugepages=on needs {need} free 2 MiB hugetlb pages and the host has {free} \
         (/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages; the host's administrator \
         reserves them with vm.nr_hugepages)"
    )]
    HugePages {
        /// Pages needed.
        need: u64,
        /// Pages free.
        free: u64,
    },
    /// Guest RAM larger than the host.
    #[error("--memory {} MiB is more than the host's {} MiB of RAM", size >> 20, host >> 20)]
    MemoryTooLarge {
        /// Requested bytes.
        size: u64,
        /// Host bytes.
        host: u64,
    },
    /// Creating or mapping guest RAM failed.
    #[error("cannot allocate guest memory")]
    GuestMemory(#[source] std::io::Error),
    /// Boot preparation failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A device could not be set up.
    #[error("cannot set up {0}")]
    Device(String, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// An I/O error with context.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// Restoring or receiving a guest failed.
    #[error("{0}")]
    Migration(String),
}

/// Formats an error with its chain of causes on one line: `a: b: c`.
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = e.source();
    }
    s
}
