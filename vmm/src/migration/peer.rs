//! Who the other side of a migration is. Over `unix:`, a process running as this VMM's
//! effective uid or as root (`SO_PEERCRED`, socket(7)). Over `tcp:`, the holder of a
//! certificate from the configured CA, both ways (mutual TLS with rustls, certificates in
//! QEMU's `tls-creds-x509` file layout), or anyone when the address says `insecure`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use sync::MutexExt;

use super::bounds::Conn;
use crate::config::TlsConfig;

/// Longest a TLS handshake may take, either side.
#[cfg(not(test))]
pub const HANDSHAKE: Duration = Duration::from_secs(10);
/// The unit tests' peers answer at once or never: a second keeps a silent peer's test short.
#[cfg(test)]
pub const HANDSHAKE: Duration = Duration::from_secs(1);

/// A peer with `uid` may talk to a VMM running as `owner`: the same uid, or root.
pub fn uid_allowed(uid: u32, owner: u32) -> bool {
    uid == owner || uid == 0
}

/// Checks the uid of a Unix socket's peer (`SO_PEERCRED`) with [`uid_allowed`].
///
/// # Errors
/// Why not, naming both uids.
pub fn check_uid(s: &UnixStream) -> Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(s)
        .map_err(|e| format!("no peer credentials ({e})"))?;
    let (uid, owner) = (cred.uid.as_raw(), rustix::process::geteuid().as_raw());
    if uid_allowed(uid, owner) {
        Ok(())
    } else {
        Err(format!(
            "the peer's uid {uid} is neither the VMM's ({owner}) nor root"
        ))
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, String> {
    let path = dir.join("ca-cert.pem");
    let mut roots = RootCertStore::empty();
    for c in certificates(&path)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// rustls over *ring*, which builds with the C compiler alone. rustls 0.23.48 deprecates
/// *ring*'s provider because it has no post-quantum key exchange; aws-lc-rs has one, at the
/// cost of a much larger C build.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The destination's TLS configuration: `server-cert.pem` and `server-key.pem` in
/// `tls.dir`, and a source must present a certificate chaining to `ca-cert.pem`.
///
/// # Errors
/// A file that is missing or unreadable, or certificates rustls refuses, by path.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&tls.dir)?, provider())
        .build()
        .map_err(|e| e.to_string())?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates(&tls.dir.join("server-cert.pem"))?,
            private_key(&tls.dir.join("server-key.pem"))?,
        )
        .map_err(|e| format!("{}: {e}", tls.dir.join("server-key.pem").display()))?;
    Ok(Arc::new(config))
}

/// The source's TLS configuration: `client-cert.pem` and `client-key.pem` in `tls.dir`,
/// and the destination must present a certificate chaining to `ca-cert.pem`.
///
/// # Errors
/// As [`server_config`].
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, String> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(&tls.dir)?)
        .with_client_auth_cert(
            certificates(&tls.dir.join("client-cert.pem"))?,
            private_key(&tls.dir.join("client-key.pem"))?,
        )
        .map_err(|e| format!("{}: {e}", tls.dir.join("client-key.pem").display()))?;
    Ok(Arc::new(config))
}

enum Session {
    Server(rustls::StreamOwned<ServerConnection, TcpStream>),
    Client(rustls::StreamOwned<ClientConnection, TcpStream>),
}

impl Session {
    fn sock(&self) -> &TcpStream {
        match self {
            Session::Server(s) => &s.sock,
            Session::Client(s) => &s.sock,
        }
    }
}

/// A TLS session over TCP. Clones share it: a destination reads the stream through one and
/// answers through another, one after the other, never at once.
#[derive(Clone)]
pub struct Tls(Arc<Mutex<Session>>);

impl Tls {
    /// The destination's side: the handshake with a source on `sock`, within [`HANDSHAKE`].
    ///
    /// # Errors
    /// The handshake failed: a peer without a certificate from the CA, not speaking TLS, or
    /// too slow.
    pub fn accept(config: Arc<ServerConfig>, sock: TcpStream) -> Result<Tls, String> {
        let conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut s = rustls::StreamOwned::new(conn, sock);
        handshake(&mut s.conn, &mut s.sock)?;
        Ok(Tls(Arc::new(Mutex::new(Session::Server(s)))))
    }

    /// The source's side: the handshake with the destination on `sock`, which must present
    /// a certificate for `name`, within [`HANDSHAKE`].
    ///
    /// # Errors
    /// As [`Tls::accept`], or `name` is not a DNS name or an IP address.
    pub fn connect(config: Arc<ClientConfig>, name: &str, sock: TcpStream) -> Result<Tls, String> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("`{name}` is not a host name for TLS: {e}"))?;
        let conn = ClientConnection::new(config, name).map_err(|e| e.to_string())?;
        let mut s = rustls::StreamOwned::new(conn, sock);
        handshake(&mut s.conn, &mut s.sock)?;
        Ok(Tls(Arc::new(Mutex::new(Session::Client(s)))))
    }
}

fn handshake<S: rustls::SideData>(
    conn: &mut rustls::ConnectionCommon<S>,
    sock: &mut TcpStream,
) -> Result<(), String> {
    let set = |s: &TcpStream, t| {
        let _ = s.set_read_timeout(t);
        let _ = s.set_write_timeout(t);
    };
    set(sock, Some(HANDSHAKE));
    let mut r = Ok(());
    while conn.is_handshaking() && r.is_ok() {
        r = conn.complete_io(sock).map(drop);
    }
    // Whatever the handshake left to send (an alert, the last flight).
    if conn.wants_write() {
        let _ = conn.complete_io(sock);
    }
    set(sock, None);
    r.map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no TLS handshake within {} s", HANDSHAKE.as_secs())
        }
        _ => format!("TLS: {e}"),
    })
}

impl Read for Tls {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut *self.0.locked() {
            Session::Server(s) => s.read(buf),
            Session::Client(s) => s.read(buf),
        }
    }
}

impl Write for Tls {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut *self.0.locked() {
            Session::Server(s) => s.write(buf),
            Session::Client(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut *self.0.locked() {
            Session::Server(s) => s.flush(),
            Session::Client(s) => s.flush(),
        }
    }
}

impl Conn for Tls {
    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.0.locked().sock().set_read_timeout(t);
    }
}

/// Certificates for the TLS tests. `tests/tests/migration_tls.rs` includes the same file, so
/// that asking for them changes no feature of the `vmm` crate.
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
