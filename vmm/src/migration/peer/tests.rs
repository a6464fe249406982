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
