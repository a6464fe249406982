// Certificates for tests of TLS migration: included by `tests/tests/migration_tls.rs` too,
// so no inner attributes and no `crate::` paths here.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// Writes a fresh CA and, signed by it, a destination's and a source's certificate and key
/// into `dir`, in the layout `TlsConfig` reads: `ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`. The server's
/// certificate names `hosts` (DNS names or IP addresses). Each call makes a new CA, so two
/// directories do not trust each other.
///
/// # Panics
/// When a certificate cannot be made or `dir` cannot be written.
pub fn write_pki(dir: &Path, hosts: &[&str]) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "vmm test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    std::fs::create_dir_all(dir).expect("TLS directory");
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).expect(name);
    write("ca-cert.pem", ca_cert.pem());
    for (side, names, usage) in [
        (
            "server",
            hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            "client",
            vec!["vmm-source".to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names).expect("params");
        p.distinguished_name
            .push(DnType::CommonName, format!("vmm test {side}"));
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca_cert, &ca_key).expect("certificate");
        write(&format!("{side}-cert.pem"), cert.pem());
        write(&format!("{side}-key.pem"), key.serialize_pem());
    }
}
