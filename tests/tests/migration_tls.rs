//! Migration over TCP with mutual TLS between two network namespaces that the test makes (a
//! veth pair, one VMM in each), as two hosts would migrate. The device processes and the API
//! sockets are Unix sockets, which the namespaces share.
//!
//! In one run, against one source that keeps its guest throughout:
//! - a destination whose certificates come from another CA is refused by the source, and
//!   refuses it; the source's guest runs on;
//! - a third party that connects to the destination's port and sends a stream in clear text
//!   is refused before any ACK, and the destination goes on waiting;
//! - the source then migrates to a destination with the right certificates, `verify` on:
//!   every RAM page equal, the guest finds every page its device wrote.
//!
//! Needs root and `ip` (iproute2); says SKIP otherwise.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vmm_tests::migration::{self, assert_handed_over, assert_migrated};
use vmm_tests::{api, scratch, DeviceProcess, VmmCommand, VmmProcess};

/// `write_pki`, shared with the unit tests of `vmm::migration::peer`.
mod pki {
    include!("../../vmm/src/migration/peer/testing.rs");
}
use pki::write_pki;

const DEADLINE: Duration = Duration::from_secs(300);
/// RAM pages of a 256 MiB guest.
const PAGES: u64 = 65536;

/// Two network namespaces joined by a veth pair: `a` at 10.213.X.1, `b` at 10.213.X.2.
/// Deleted on drop.
struct Namespaces {
    a: String,
    b: String,
    b_addr: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Namespaces {
    fn make() -> Result<Namespaces, String> {
        let n = std::process::id() % 250 + 1;
        let (a, b) = (format!("vmmtls-a{n}"), format!("vmmtls-b{n}"));
        let (va, vb) = (format!("vtA{n}"), format!("vtB{n}"));
        let ns = Namespaces {
            a: a.clone(),
            b: b.clone(),
            b_addr: format!("10.213.{n}.2"),
        };
        ip(&["netns", "add", &a])?;
        ip(&["netns", "add", &b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &a])?;
        ip(&["link", "set", &vb, "netns", &b])?;
        ip(&[
            "-n",
            &a,
            "addr",
            "add",
            &format!("10.213.{n}.1/24"),
            "dev",
            &va,
        ])?;
        ip(&[
            "-n",
            &b,
            "addr",
            "add",
            &format!("10.213.{n}.2/24"),
            "dev",
            &vb,
        ])?;
        for (netns, dev) in [(&a, &va), (&b, &vb)] {
            ip(&["-n", netns, "link", "set", dev, "up"])?;
            ip(&["-n", netns, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    fn exec(netns: &str) -> [&str; 4] {
        ["ip", "netns", "exec", netns]
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// A destination in namespace `b` listening on `addr` (a whole `--incoming` value).
fn destination(ns: &Namespaces, dev: &DeviceProcess, addr: &str) -> VmmProcess {
    let mut dst = VmmCommand::new()
        .memory("256M")
        .iommu()
        .vfio_user(&dev.arg(true))
        .counters()
        .incoming(addr)
        .wrapped(&Namespaces::exec(&ns.b))
        .start();
    dst.wait_stderr("waiting for a migration on", DEADLINE);
    dst
}

/// Connects from namespace `netns` to `to` and sends `bytes`, as a third party would.
fn inject(netns: &str, to: &str, bytes: &'static [u8]) {
    let path = format!("/run/netns/{netns}");
    let to = to.to_string();
    std::thread::spawn(move || {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns with a namespace file descriptor moves only this thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let mut s = std::net::TcpStream::connect(&to).expect("connect");
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    })
    .join()
    .expect("the third party");
}

#[test]
fn tls_migration_between_two_namespaces() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: making network namespaces needs root");
        return;
    }
    let ns = match Namespaces::make() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIP: no network namespaces here ({e})");
            return;
        }
    };
    let (good, other) = (scratch("tls-good"), scratch("tls-other"));
    write_pki(&good, &[&ns.b_addr]);
    write_pki(&other, &[&ns.b_addr]);
    let port = 4444;
    let at = |dir: &Path| format!("tcp:{}:{port},tls={}", ns.b_addr, dir.display());

    // The source, in namespace a.
    let (dev_a, dev_b, dev_c) = (
        DeviceProcess::start(),
        DeviceProcess::start(),
        DeviceProcess::start(),
    );
    let api_sock = scratch("api.sock");
    let mut src = VmmCommand::test_guest()
        .memory("256M")
        .iommu()
        .vfio_user(&dev_a.arg(true))
        .cmdline("tests=migrate_dma until_migrated=1 iters=40 touch=192")
        .api_socket(&api_sock)
        .counters()
        .wrapped(&Namespaces::exec(&ns.a))
        .start();
    src.wait_console("# migrate-ready", DEADLINE);

    // A destination with another CA's certificates: each side refuses the other.
    let wrong = destination(&ns, &dev_c, &at(&other));
    let report = migration::migrate(&api_sock, &at(&good), r#","verify":true"#);
    assert_eq!(report["ok"], false, "{report}");
    let err = report["error"].as_str().unwrap();
    assert!(
        err.contains("refused the destination") && err.contains("invalid peer certificate"),
        "{err}"
    );
    let mut wrong = wrong;
    wrong.wait_stderr("migration: refused 10.213.", DEADLINE);
    let wrong = wrong.kill();
    assert!(
        wrong.stderr.contains("migration: refused 10.213.") && wrong.stderr.contains("TLS: "),
        "{}",
        wrong.stderr
    );
    assert!(!wrong.console.contains("migrate_dma"), "{}", wrong.console);
    assert_eq!(api(&api_sock, r#"{"cmd":"status"}"#)["state"], "running");

    // The right destination. A third party's clear-text stream is refused before any ACK,
    // and the destination waits on.
    let mut dst = destination(&ns, &dev_b, &at(&good));
    let to = format!("{}:{port}", ns.b_addr);
    inject(
        &ns.a,
        &to,
        b"VMMVIOMU\x01\0\0\0\0\0\0\0 a guest from nobody",
    );
    dst.wait_stderr("migration: refused 10.213.", DEADLINE);
    assert!(
        dst.stderr_so_far().contains("TLS: "),
        "{}",
        dst.stderr_so_far()
    );
    assert!(!dst.stderr_so_far().contains("ACK sent"));

    // The source, still running its guest, migrates there: verify on.
    assert_eq!(api(&api_sock, r#"{"cmd":"status"}"#)["state"], "running");
    let report = migration::migrate(&api_sock, &at(&good), r#","verify":true"#);
    assert_migrated(&report, PAGES);
    assert_handed_over(&src.wait(DEADLINE));
    let dst = dst.wait(DEADLINE);
    eprintln!("{}\n{}", dst.console, dst.stderr);
    assert_eq!(dst.code(), 0, "the guest's verdict on the destination");
    assert!(
        dst.stderr.contains("authenticated by TLS"),
        "{}",
        dst.stderr
    );
    dst.assert_console("ok 1 - migrate_dma");
    dst.assert_console("0 stale pages seen before a refill, 0 of 256 pages wrong at the end");
    let _ = std::fs::remove_dir_all(good);
    let _ = std::fs::remove_dir_all(other);
}
