use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::*;

/// Reads until an error; returns its text.
fn read_until_error(c: &mut impl Read) -> String {
    let mut buf = [0u8; 64];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return "end of stream".into(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

#[test]
fn a_trickling_source_is_cut_off_at_the_total() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let t = std::thread::spawn(move || {
        // One byte every 10 ms: never idle for long.
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            if theirs.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let mut c = Bounded::new(ours, Duration::from_secs(5), Duration::from_millis(200));
    let e = read_until_error(&mut c);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
    assert_eq!(e, "the source took more than 0.2 s");
}

#[test]
fn a_silent_source_is_cut_off_at_the_idle_bound() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut c = Bounded::new(ours, Duration::from_millis(100), Duration::from_secs(60));
    assert_eq!(
        read_until_error(&mut c),
        "nothing from the source for 0.1 s"
    );
    drop(theirs);
}

#[test]
fn set_timeout_starts_a_new_bound_and_bytes_pass_through() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut c = Bounded::new(ours, Duration::from_millis(50), Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(80));
    // The first bound is spent; a new one lets the bytes through.
    c.set_timeout(Some(Duration::from_secs(5)));
    theirs.write_all(b"abc").unwrap();
    let mut got = [0u8; 3];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"abc");
    c.write_all(b"ok").unwrap();
    let mut back = [0u8; 2];
    theirs.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ok");
}

#[test]
fn the_round_bound_keeps_a_source_within_the_passes() {
    // The full copy, every round and the stop-and-copy, each at most all of RAM.
    assert_eq!(u64::from(MAX_ROUNDS) + 2, MAX_RAM_PASSES);
}

/// A connection that fails reads with `kind`, counts flushes and records its timeouts.
#[derive(Default)]
struct Scripted {
    kind: Option<io::ErrorKind>,
    flushes: usize,
    timeouts: std::sync::Mutex<Vec<Option<Duration>>>,
}

impl Read for Scripted {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::new(self.kind.unwrap(), "scripted"))
    }
}

impl Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
}

impl Conn for Scripted {
    fn set_timeout(&self, t: Option<Duration>) {
        self.timeouts.lock().unwrap().push(t);
    }
}

/// A read error other than a timeout is the connection's own, unchanged; a flush reaches
/// the connection; a boxed connection's timeout reaches the one inside.
#[test]
fn other_errors_flushes_and_boxed_timeouts_pass_through() {
    let mut c = Bounded::new(
        Scripted {
            kind: Some(io::ErrorKind::ConnectionReset),
            ..Default::default()
        },
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let e = c.read(&mut [0u8; 4]).unwrap_err();
    assert_eq!(
        (e.kind(), e.to_string()),
        (io::ErrorKind::ConnectionReset, "scripted".into())
    );
    c.flush().unwrap();
    c.flush().unwrap();
    assert_eq!(c.inner.flushes, 2);

    let boxed: Box<dyn Conn> = Box::new(Scripted::default());
    boxed.set_timeout(Some(Duration::from_millis(7)));
    boxed.set_timeout(None);
    // The only way back to the fake is through the box's pointer.
    let raw = Box::into_raw(boxed) as *mut Scripted;
    // SAFETY: the box was made from a `Scripted` just above; it is taken back once.
    let back = unsafe { Box::from_raw(raw) };
    assert_eq!(
        *back.timeouts.lock().unwrap(),
        vec![Some(Duration::from_millis(7)), None]
    );
}

/// A TCP connection's timeout is its read timeout.
#[test]
fn a_tcp_connections_timeout_is_its_read_timeout() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    Conn::set_timeout(&s, Some(Duration::from_secs(2)));
    assert_eq!(s.read_timeout().unwrap(), Some(Duration::from_secs(2)));
    Conn::set_timeout(&s, None);
    assert_eq!(s.read_timeout().unwrap(), None);
}
