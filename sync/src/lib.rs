//! Locks without poisoning, in the manner of crosvm's `sync` crate.
//!
//! The VMM is built with `panic = "abort"`: a thread that panics ends the process, so a lock
//! can never be found poisoned outside tests. In tests (which unwind), a panicking holder has
//! already failed its test; the data it left is taken as it is rather than panicking a second
//! thread. These extension traits are the one place that decision is made: every lock in the
//! workspace goes through them instead of `lock().unwrap_or_else(...)` at each call.
//!
//! The standard types stay (event-manager, vm-superio and the device traits take
//! `std::sync::Mutex`); only the way they are locked changes.

use std::sync::{
    Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    WaitTimeoutResult,
};
use std::time::Duration;

/// [`Mutex::lock`] that takes the data even when a holder panicked.
pub trait MutexExt<T: ?Sized> {
    /// Locks, blocking until the mutex is free.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`RwLock::read`] and [`RwLock::write`] that take the data even when a holder panicked.
pub trait RwLockExt<T: ?Sized> {
    /// Shared access, blocking while a writer holds the lock.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// Exclusive access, blocking while anyone holds the lock.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`Condvar::wait_timeout`] that gets the guard back even when a holder panicked.
pub trait CondvarExt {
    /// Waits for a notification or `timeout`, with `guard` released meanwhile.
    fn wait_timeout_locked<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult);
}

impl CondvarExt for Condvar {
    fn wait_timeout_locked<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
        self.wait_timeout(guard, timeout)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_lock_whose_holder_panicked_is_still_taken() {
        let m = Arc::new(Mutex::new(1));
        let rw = Arc::new(RwLock::new(2));
        let (m2, rw2) = (m.clone(), rw.clone());
        let r = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            let _w = rw2.write().unwrap();
            panic!("holder dies");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned() && rw.is_poisoned());
        *m.locked() += 1;
        assert_eq!(*m.locked(), 2);
        *rw.write_locked() += 1;
        assert_eq!(*rw.read_locked(), 3);
        let cv = Condvar::new();
        let (g, t) = cv.wait_timeout_locked(m.locked(), Duration::from_millis(1));
        assert!(t.timed_out());
        assert_eq!(*g, 2);
    }
}
