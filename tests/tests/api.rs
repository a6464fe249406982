//! The control API socket against local users and clients that misbehave (issue 23, item 6):
//! its mode is 0600; a peer of another uid is refused even when the mode lets it connect
//! (`SO_PEERCRED`); a request line longer than 64 KiB gets an error and its connection is
//! closed; a ninth connection is refused while eight are open, and served once one closed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_tests::migration::wait_for_path;
use vmm_tests::{api, run_as_nobody, scratch, VmmCommand, VmmProcess};

/// A VMM waiting for a guest (`--incoming defer`): its API is served, nothing runs.
fn waiting_vmm(api_sock: &Path) -> VmmProcess {
    let vmm = VmmCommand::test_guest()
        .memory("64M")
        .incoming("defer")
        .api_socket(api_sock)
        .start();
    wait_for_path(api_sock);
    vmm
}

/// Sends `request` on `conn` and returns the first answer line. A write error is ignored:
/// the VMM may close the connection before a request too long for it was all sent.
fn ask(conn: &UnixStream, request: &[u8]) -> String {
    let mut w = conn.try_clone().unwrap();
    let _ = w.write_all(request).and_then(|()| w.write_all(b"\n"));
    let mut line = String::new();
    BufReader::new(conn.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

#[test]
fn hostile_local_users_and_clients_get_nothing_from_the_api() {
    let api_sock = scratch("api.sock");
    let vmm = waiting_vmm(&api_sock);
    assert_eq!(api(&api_sock, r#"{"cmd":"status"}"#)["state"], "waiting");

    // `receive unix:PATH` removes a stale socket only: a file at PATH stays, the VMM says
    // why and waits on.
    let file = scratch("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let conn = UnixStream::connect(&api_sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = ask(
        &conn,
        format!(r#"{{"cmd":"receive","from":"unix:{}"}}"#, file.display()).as_bytes(),
    );
    drop(conn);
    let r: serde_json::Value = serde_json::from_str(&r).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("is not a socket"),
        "{r}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert_eq!(api(&api_sock, r#"{"cmd":"status"}"#)["state"], "waiting");

    // The socket's mode does not come from the umask.
    let mode = std::fs::metadata(&api_sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");

    // A line over 64 KiB: an error, then the connection ends.
    let conn = UnixStream::connect(&api_sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let answer = ask(&conn, &vec![b' '; 70_000]);
    assert!(answer.contains("longer than 65536 bytes"), "{answer}");
    let mut rest = String::new();
    assert_eq!(BufReader::new(&conn).read_line(&mut rest).unwrap(), 0);

    // Eight connections served at once, the ninth refused; one closed, a new one served.
    let open: Vec<UnixStream> = (0..8)
        .map(|_| {
            let c = UnixStream::connect(&api_sock).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert!(ask(&c, br#"{"cmd":"status"}"#).contains("waiting"));
            c
        })
        .collect();
    let ninth = UnixStream::connect(&api_sock).unwrap();
    ninth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut refused = String::new();
    BufReader::new(&ninth).read_line(&mut refused).unwrap();
    assert!(
        refused.contains("8 connections are open already"),
        "{refused}"
    );
    drop(open);
    let start = Instant::now();
    loop {
        let c = UnixStream::connect(&api_sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if ask(&c, br#"{"cmd":"status"}"#).contains("waiting") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never served again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Another user, let in by the mode, is refused by its uid: `vmm-ctl` as uid 65534.
    std::fs::set_permissions(&api_sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let Some(out) = run_as_nobody(
        "vmm-ctl",
        &["--socket".as_ref(), api_sock.as_os_str(), "status".as_ref()],
    ) else {
        eprintln!("SKIP: another uid's client needs root to start it");
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the peer's uid 65534 is neither the VMM's"),
        "{err}"
    );
    drop(vmm);
}
