//! Message-signalled interrupts as the device models see them. The VMM implements these with
//! KVM GSI routes and irqfds; tests use the recording vectors of the `testing` module.

use std::io;
use std::sync::Arc;

/// One MSI vector of a device.
pub trait MsiVector: Send + Sync {
    /// Sends the interrupt.
    fn trigger(&self);
    /// Routes the vector to `(address, data)`; `enabled` is false while masked or disabled.
    ///
    /// # Errors
    /// When the route cannot be installed.
    fn update(&self, address: u64, data: u32, enabled: bool) -> io::Result<()>;
    /// The eventfd that raises this vector when written (a KVM irqfd), for handing to a
    /// device process; `None` when the vector has none.
    fn irqfd(&self) -> Option<std::os::fd::RawFd>;
}

/// Hands out MSI vectors.
pub trait InterruptManager: Send + Sync {
    /// `count` new vectors.
    ///
    /// # Errors
    /// When the host runs out of routes or eventfds.
    fn allocate_msi(&self, count: usize) -> io::Result<Vec<Arc<dyn MsiVector>>>;
}

/// Test doubles.
#[cfg(any(test, feature = "test-utils"))]
pub mod testing {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// A vector that counts triggers and remembers its route.
    #[derive(Debug, Default)]
    pub struct RecordingMsi {
        /// Times triggered.
        pub fired: AtomicU64,
        /// Last route `(address, data, enabled)`.
        pub route: Mutex<Option<(u64, u32, bool)>>,
    }

    impl MsiVector for RecordingMsi {
        fn trigger(&self) {
            self.fired.fetch_add(1, Ordering::SeqCst);
        }
        fn update(&self, address: u64, data: u32, enabled: bool) -> io::Result<()> {
            *self.route.lock().unwrap() = Some((address, data, enabled));
            Ok(())
        }
        fn irqfd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
    }

    /// Allocates [`RecordingMsi`] vectors and keeps them for inspection.
    #[derive(Default)]
    pub struct RecordingInterrupts {
        /// Every vector handed out.
        pub vectors: Mutex<Vec<Arc<RecordingMsi>>>,
    }

    impl InterruptManager for RecordingInterrupts {
        fn allocate_msi(&self, count: usize) -> io::Result<Vec<Arc<dyn MsiVector>>> {
            let mut all = self.vectors.lock().unwrap();
            Ok((0..count)
                .map(|_| {
                    let v = Arc::new(RecordingMsi::default());
                    all.push(v.clone());
                    v as Arc<dyn MsiVector>
                })
                .collect())
        }
    }
}
