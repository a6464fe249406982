//! How devices and vCPUs end the VM: the first reason recorded wins and wakes the event loop.

use std::sync::Mutex;

use sync::MutexExt;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI sleep state S5).
    PowerOff,
    /// The guest reset itself (i8042 `0xfe` or the ACPI reset register).
    Reset,
    /// The guest wrote an exit code to the test-exit port.
    TestExit(u32),
    /// The guest or KVM failed; the VMM exits non-zero with this one-line reason.
    Error(String),
    /// The VMM was asked to stop (signal or API).
    Stopped,
    /// The guest now runs elsewhere: migrated to the destination named.
    Migrated(String),
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff
            | ExitReason::Reset
            | ExitReason::Stopped
            | ExitReason::Migrated(_) => 0,
            ExitReason::TestExit(code) => i32::try_from(*code).unwrap_or(i32::MAX),
            ExitReason::Error(_) => 1,
        }
    }
}

/// Shared exit request: an eventfd for the event loop plus the first reason given.
pub struct VmExit {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl VmExit {
    /// A new, unsignalled exit request.
    ///
    /// # Errors
    /// When the eventfd cannot be created.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.locked();
        if r.is_none() {
            *r = Some(reason);
        }
        // A full counter still wakes the loop, so the error can be ignored.
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.locked().clone()
    }

    /// The eventfd signalled by [`VmExit::request`].
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
