use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;

use super::testing::write_pki;
use super::*;

fn pki(name: &str) -> TlsConfig {
    let dir = std::env::temp_dir().join(format!("vmm-peer-{}-{name}", std::process::id()));
    write_pki(&dir, &["localhost", "127.0.0.1"]);
    TlsConfig {
        dir,
        hostname: None,
    }
}

/// A destination with `server`'s certificates on a loopback port, and a source with
/// `client`'s connecting to it as `name`: each side's outcome. The destination answers
/// "ack" to a "hello".
fn session(
    server: &TlsConfig,
    client: &TlsConfig,
    name: &str,
) -> (Result<String, String>, Result<String, String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let sc = server_config(server).unwrap();
    let dst = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut t = Tls::accept(sc, s)?;
        let mut buf = [0u8; 5];
        t.read_exact(&mut buf).map_err(|e| e.to_string())?;
        t.write_all(b"ack")
            .and_then(|()| t.flush())
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf).to_string())
    });
    let src = (|| {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        let mut t = Tls::connect(client_config(client)?, name, s)?;
        t.write_all(b"hello")
            .and_then(|()| t.flush())
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 3];
        t.read_exact(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf).to_string())
    })();
    (dst.join().unwrap(), src)
}

#[test]
fn both_sides_with_certificates_from_the_ca_talk() {
    let p = pki("good");
    let (dst, src) = session(&p, &p, "localhost");
    assert_eq!(dst, Ok("hello".to_string()));
    assert_eq!(src, Ok("ack".to_string()));
    // By IP address too: the destination's certificate names 127.0.0.1.
    let (dst, src) = session(&p, &p, "127.0.0.1");
    assert_eq!((dst.is_ok(), src.is_ok()), (true, true));
}

#[test]
fn a_source_whose_certificate_is_from_another_ca_is_refused() {
    let (ours, theirs) = (pki("ours"), pki("theirs"));
    // The source trusts our CA but holds a certificate from another.
    let mixed = std::env::temp_dir().join(format!("vmm-peer-{}-mixed", std::process::id()));
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(ours.dir.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(theirs.dir.join(f), mixed.join(f)).unwrap();
    }
    let client = TlsConfig {
        dir: mixed,
        hostname: None,
    };
    let (dst, src) = session(&ours, &client, "localhost");
    let e = dst.unwrap_err();
    assert!(
        e.starts_with("TLS: ") && e.contains("invalid peer certificate"),
        "{e}"
    );
    assert!(src.is_err(), "the source got an answer: {src:?}");
}

#[test]
fn a_destination_whose_certificate_is_from_another_ca_is_refused() {
    let (ours, theirs) = (pki("src"), pki("dst"));
    let (dst, src) = session(&theirs, &ours, "localhost");
    let e = src.unwrap_err();
    assert!(
        e.starts_with("TLS: ") && e.contains("invalid peer certificate"),
        "{e}"
    );
    assert!(dst.is_err());
    // And one whose certificate does not name the host the source asked for.
    let (_, src) = session(&ours, &ours, "elsewhere.example");
    assert!(src.unwrap_err().contains("invalid peer certificate"));
}

#[test]
fn a_peer_that_does_not_speak_tls_is_refused() {
    let p = pki("plain");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(b"VMMVIOMU\x01\0\0\0\0\0\0\0 a stream in clear text");
    });
    let (s, _) = l.accept().unwrap();
    let e = Tls::accept(server_config(&p).unwrap(), s).err().unwrap();
    t.join().unwrap();
    assert!(e.starts_with("TLS: "), "{e}");
}

#[test]
fn missing_certificates_are_named_by_path() {
    let dir = PathBuf::from("/nonexistent/tls");
    let t = TlsConfig {
        dir,
        hostname: None,
    };
    assert!(server_config(&t)
        .err()
        .unwrap()
        .contains("/nonexistent/tls/ca-cert.pem"));
    assert!(client_config(&t)
        .err()
        .unwrap()
        .contains("/nonexistent/tls/ca-cert.pem"));
}

#[test]
fn a_peer_of_this_uid_or_root_is_admitted() {
    assert!(uid_allowed(1000, 1000));
    assert!(uid_allowed(0, 1000));
    assert!(!uid_allowed(1001, 1000));
    assert!(!uid_allowed(65534, 0));
    let (a, _b) = UnixStream::pair().unwrap();
    assert_eq!(check_uid(&a), Ok(()));
}

/// A peer of another uid (a child process that became `nobody`, 65534, before connecting)
/// is refused, naming both uids. Needs root to change uid; SKIPs otherwise.
#[test]
fn a_peer_of_another_uid_is_refused_by_uid() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;
    let owner = rustix::process::geteuid().as_raw();
    if owner != 0 {
        eprintln!("SKIP: a_peer_of_another_uid_is_refused_by_uid needs root to change uid");
        return;
    }
    let path = std::env::temp_dir().join(format!("vmm-peer-uid-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    // SAFETY: a zeroed sockaddr_un, then the path's bytes (shorter than sun_path) copied in.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr
        .sun_path
        .iter_mut()
        .zip(path.as_os_str().as_encoded_bytes())
    {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child makes raw system calls only (no allocation, no locks) and ends with
    // `_exit`; the parent waits for it.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        // SAFETY: as above.
        unsafe {
            if libc::syscall(libc::SYS_setuid, 65534) != 0 {
                libc::_exit(2);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                libc::_exit(3);
            }
            // Until the parent hangs up.
            let mut b = 0u8;
            libc::read(fd, (&raw mut b).cast(), 1);
            libc::_exit(0);
        }
    }
    // Accepts while the child lives (a child that could not connect has exited).
    l.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut status = 0;
                // SAFETY: polls the child forked above.
                let gone = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
                assert_eq!(
                    gone,
                    0,
                    "the child ended first: {}",
                    libc::WEXITSTATUS(status)
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "the child never connected"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let r = check_uid(&s);
    drop(s);
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        r,
        Err("the peer's uid 65534 is neither the VMM's (0) nor root".to_string())
    );
    assert_eq!(libc::WEXITSTATUS(status), 0);
}

/// A peer that connects and never speaks TLS is refused once the handshake's time is up,
/// by name; a session's timeout is its socket's read timeout.
#[test]
fn a_silent_peer_is_refused_and_timeouts_reach_the_socket() {
    let p = pki("silent");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    let e = Tls::accept(server_config(&p).unwrap(), s).err().unwrap();
    assert_eq!(e, "no TLS handshake within 1 s");
    drop(silent);

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let sc = server_config(&p).unwrap();
    let dst = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let t = Tls::accept(sc, s).unwrap();
        t.set_timeout(Some(Duration::from_secs(2)));
        let timeout = t.0.locked().sock().read_timeout().unwrap();
        timeout
    });
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut t = Tls::connect(client_config(&p).unwrap(), "localhost", s).unwrap();
    t.write_all(b"x").and_then(|()| t.flush()).unwrap();
    assert_eq!(dst.join().unwrap(), Some(Duration::from_secs(2)));
}
