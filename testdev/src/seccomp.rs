//! The system calls of the test device's threads, beyond `devices::seccomp::COMMON`, built
//! from the VMM's groups (`devices::seccomp::lists`). Gathered as the VMM's were: every test
//! run with `--seccomp log`, the kernel's log read.

use devices::seccomp::lists::{IO, SERVE, THREADS};
use devices::seccomp::{Filter, Ioctls};

/// The server thread: vfio-user messages (with file descriptors), guest memory mapped from
/// them, its socket removed at the end; it starts the connection's reader thread
/// (`vfio-user-rx`), which inherits the list.
pub const SERVER: Filter = Filter {
    syscalls: &[
        IO,
        SERVE,
        THREADS,
        &[
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_sched_getaffinity,
        ],
    ],
    ioctls: Ioctls::Any,
};

/// The engine: transfers in mapped memory or by DMA_READ/DMA_WRITE messages on the socket
/// (`sendto`; the replies come through the reader thread), interrupts by eventfd.
pub const ENGINE: Filter = Filter {
    syscalls: &[&[libc::SYS_read, libc::SYS_sendto]],
    ioctls: Ioctls::Any,
};

/// The doorbell thread: waits on the doorbell's ioeventfd, reads it.
pub const DOORBELL: Filter = Filter {
    syscalls: &[&[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll]],
    ioctls: Ioctls::Any,
};
