//! What a migration source may cost the destination before the ACK: time, passes over guest
//! RAM, and records of each kind. A source that sends more, or too slowly, is refused by
//! name; the destination never ran the guest, and the source keeps it.

use std::cell::Cell;
use std::io;
use std::time::{Duration, Instant};

/// Most passes over guest RAM a stream may carry: `RAM` record bytes up to this many times
/// the guest's RAM. A source's pre-copy is the full copy, at most [`MAX_ROUNDS`] rounds and
/// the stop-and-copy, each at most all of RAM.
pub const MAX_RAM_PASSES: u64 = 64;

/// Most pre-copy rounds a source may ask for (the `migrate` argument `max_rounds`), so that
/// its stream stays within [`MAX_RAM_PASSES`].
pub const MAX_ROUNDS: u32 = (MAX_RAM_PASSES - 2) as u32;

/// Longest a destination waits for the next byte of the stream before the ACK.
pub const IDLE: Duration = Duration::from_secs(60);

/// Longest a whole stream may take, from the connection to its `END` record.
pub const STREAM: Duration = Duration::from_secs(3600);

/// A connection whose reads fail with [`io::ErrorKind::TimedOut`] once no byte came for
/// `idle`, or once `total` has passed since it was made: a source that trickles bytes is cut
/// off at `total`, one that stops at `idle`. [`Conn::set_timeout`] starts a new bound of the
/// given length (the hand-over's wait for COMMIT).
pub struct Bounded<C: Conn> {
    inner: C,
    idle: Cell<Duration>,
    until: Cell<Instant>,
    total: Cell<Duration>,
}

impl<C: Conn> Bounded<C> {
    /// `inner` bounded by `idle` per read and `total` in all, from now.
    pub fn new(inner: C, idle: Duration, total: Duration) -> Self {
        Self {
            inner,
            idle: Cell::new(idle.min(total)),
            until: Cell::new(Instant::now() + total),
            total: Cell::new(total),
        }
    }
}

impl<C: Conn> io::Read for Bounded<C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.get().saturating_duration_since(Instant::now());
        let over = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the source took more than {} s",
                    self.total.get().as_secs_f64()
                ),
            )
        };
        if left.is_zero() {
            return Err(over());
        }
        let wait = left.min(self.idle.get());
        self.inner.set_timeout(Some(wait));
        match self.inner.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if wait < self.idle.get() {
                    Err(over())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "nothing from the source for {} s",
                            self.idle.get().as_secs_f64()
                        ),
                    ))
                }
            }
            r => r,
        }
    }
}

impl<C: Conn> io::Write for Bounded<C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<C: Conn> Conn for Bounded<C> {
    fn set_timeout(&self, t: Option<Duration>) {
        let t = t.unwrap_or(STREAM);
        self.idle.set(t);
        self.total.set(t);
        self.until.set(Instant::now() + t);
    }
}

/// A connection either way.
pub trait Conn: std::io::Read + std::io::Write + Send {
    /// Sets the read timeout.
    fn set_timeout(&self, t: Option<Duration>);
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.set_read_timeout(t);
    }
}

impl Conn for std::net::TcpStream {
    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.set_read_timeout(t);
    }
}

impl Conn for Box<dyn Conn> {
    fn set_timeout(&self, t: Option<Duration>) {
        (**self).set_timeout(t);
    }
}

#[cfg(test)]
mod tests;
