//! The control API: a Unix socket (`--api-socket PATH`, mode 0600, peers of another uid
//! than the VMM's or root's refused) taking one JSON object per line (at most
//! [`MAX_REQUEST`] bytes; [`MAX_CONNECTIONS`] at once) and answering each with one JSON line.
//!
//! | request | answer |
//! | --- | --- |
//! | `{"cmd":"status"}` | `{"ok":true,"state":"running"\|"paused"\|"waiting"\|"awaiting-commit"\|"handover-unconfirmed","memory":N,"cpus":N}`, and while a migration runs `"migration":{"phase","round","pages_sent","round_pages","round_sent","dirty_pages","dirty_rate","expected_downtime_ms"}` |
//! | `{"cmd":"pause"}`, `{"cmd":"resume"}` | `{"ok":true}` (`resume` of a handed-over guest needs `"force":true`) |
//! | `{"cmd":"snapshot","dir":"PATH"[,"verify":true]}` | `{"ok":true,"path":..,"pages":N,"bytes":N,"total_ms":N}` |
//! | `{"cmd":"migrate","to":"unix:PATH"\|"tcp:HOST:PORT", ...}` | the migration report |
//! | `{"cmd":"restore","dir":"PATH"}` | `{"ok":true}` (only with `--incoming defer`) |
//! | `{"cmd":"receive","from":"unix:PATH"\|"tcp:HOST:PORT"}` | `{"ok":true}` (same) |
//! | `{"cmd":"commit"}`, `{"cmd":"discard"}` | `{"ok":true}`: a destination whose hand-over was not confirmed runs, or drops, the guest |
//! | `{"cmd":"quit"}` | `{"ok":true}`, then the VM stops |
//!
//! `migrate` also takes `max_rounds` (30), `max_dirty_pages` (256), `verify` (false: compare
//! every RAM page of both sides before the guest runs again), `timeout_ms` (30000: how long
//! each side waits for the other during the hand-over), `max_bandwidth` (0: no limit; bytes
//! per second of the pre-copy rounds, QEMU's `max-bandwidth`) and `device_dirty_tracking` (true;
//! false is unsafe and only shows that device writes would be lost). Errors answer
//! `{"ok":false,"error":"..."}` and change nothing.
//!
//! The hand-over is fenced: the destination runs the guest only after the source's COMMIT,
//! which the source sends only after the destination's ACK (and a matching verify). A source
//! that gets no ACK in time resumes (the destination discards on its ABORT, or waits for the
//! user); a source that sent COMMIT but got no DONE stays stopped in `handover-unconfirmed`;
//! a destination that got no COMMIT waits in `awaiting-commit`. Neither ever runs the guest
//! on its own then: `status` on both says which command resolves it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use sync::MutexExt;

use crate::machine::{Lifecycle, Machine};
use crate::migration::{self, migrate, snapshot, HandoverResolver, MigrateOptions, Source};

/// A request to bring a guest in, from the API to the VM waiting with `--incoming defer`.
pub type IncomingRequest = (Source, Sender<Result<(), String>>);

/// What the API serves.
#[derive(Default)]
pub struct ApiTarget {
    /// The running VM, once it runs.
    pub machine: Mutex<Option<Arc<Machine>>>,
    /// Set while the VM waits for `restore` or `receive`.
    pub incoming: Mutex<Option<Sender<IncomingRequest>>>,
    /// Set while a received guest waits for the user to `commit` or `discard` it: why, and
    /// where the decision goes.
    pub handover: Mutex<Option<(String, Sender<bool>)>>,
    /// Whether the API socket is served (someone can decide).
    pub serving: std::sync::atomic::AtomicBool,
}

impl HandoverResolver for ApiTarget {
    fn wait(&self, why: &str) -> Option<bool> {
        if !self.serving.load(Ordering::Acquire) {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        *self.handover.locked() = Some((why.to_string(), tx));
        let decision = rx.recv().ok();
        *self.handover.locked() = None;
        decision
    }
}

/// Most bytes of one request line; a longer one is answered with an error and its
/// connection closed.
pub const MAX_REQUEST: usize = 64 << 10;

/// Most connections served at once; one more is answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 8;

/// Starts serving `path` on a thread of its own. The socket is made mode 0600, and a peer
/// whose uid (`SO_PEERCRED`) is neither the VMM's effective uid nor root is refused: the
/// mode keeps other users out, the check covers the moment between `bind` and `chmod` and
/// a socket whose mode was changed later.
///
/// # Errors
/// When the socket cannot be bound or its mode set.
pub fn start(path: &Path, target: Arc<ApiTarget>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        // A stale socket from an earlier run.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // SAFETY: geteuid has no preconditions.
    let owner = unsafe { libc::geteuid() };
    target.serving.store(true, Ordering::Release);
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            devices::seccomp::confine("api", devices::seccomp::lists::API);
            for mut conn in listener.incoming().flatten() {
                if let Err(why) = admit(&conn, owner, &live) {
                    log::warn!("API: {why}");
                    let _ = writeln!(conn, "{}", json!({"ok": false, "error": why}));
                    continue;
                }
                let (t, count) = (target.clone(), live.clone());
                live.fetch_add(1, Ordering::AcqRel);
                let spawned =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            // Under the API listener's filter, inherited.
                            devices::seccomp::name_thread("api");
                            serve(conn, &t);
                            count.fetch_sub(1, Ordering::AcqRel);
                        });
                if spawned.is_err() {
                    live.fetch_sub(1, Ordering::AcqRel);
                    log::warn!("API: no thread for a connection");
                }
            }
        })?;
    Ok(())
}

/// Whether a peer may use the API: its uid is `owner`'s or root's, and fewer than
/// [`MAX_CONNECTIONS`] are being served. The error says why not.
fn admit(
    conn: &UnixStream,
    owner: libc::uid_t,
    live: &std::sync::atomic::AtomicUsize,
) -> Result<(), String> {
    let uid = peer_uid(conn).map_err(|e| format!("refused: no peer credentials ({e})"))?;
    if !uid_allowed(uid, owner) {
        return Err(format!(
            "refused: the peer's uid {uid} is neither the VMM's ({owner}) nor root"
        ));
    }
    if live.load(Ordering::Acquire) >= MAX_CONNECTIONS {
        return Err(format!(
            "refused: {MAX_CONNECTIONS} connections are open already"
        ));
    }
    Ok(())
}

/// A peer with `uid` may use the API of a VMM running as `owner`.
fn uid_allowed(uid: libc::uid_t, owner: libc::uid_t) -> bool {
    uid == owner || uid == 0
}

/// The uid of a UNIX socket's peer (`SO_PEERCRED`, socket(7)).
fn peer_uid(conn: &UnixStream) -> std::io::Result<libc::uid_t> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` is `cred`'s size.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// One request line of at most [`MAX_REQUEST`] bytes (without its newline): `Ok(None)` at
/// the end of the stream, `Err` with the reply for one that is too long.
fn read_request(reader: &mut impl BufRead) -> Result<Option<Vec<u8>>, String> {
    let mut buf = Vec::new();
    match reader
        .take(MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut buf)
    {
        Ok(0) | Err(_) => return Ok(None),
        Ok(_) => {}
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    if buf.len() > MAX_REQUEST {
        return Err(format!(
            "the request is longer than {MAX_REQUEST} bytes; connection closed"
        ));
    }
    Ok(Some(buf))
}

fn serve(conn: UnixStream, target: &ApiTarget) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let line = match read_request(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                let _ = writeln!(out, "{}", json!({"ok": false, "error": e}));
                return;
            }
        };
        let line = String::from_utf8_lossy(&line);
        if line.trim().is_empty() {
            continue;
        }
        let (reply, migrated_to) = match serde_json::from_str::<Value>(&line) {
            Ok(req) => {
                let reply =
                    handle(&req, target).unwrap_or_else(|e| json!({"ok": false, "error": e}));
                let migrated = req["cmd"] == "migrate" && reply["ok"] == true;
                (
                    reply,
                    migrated.then(|| req["to"].as_str().unwrap_or("").to_string()),
                )
            }
            Err(e) => (
                json!({"ok": false, "error": format!("not JSON: {e}")}),
                None,
            ),
        };
        let written = writeln!(out, "{reply}").is_ok();
        if let Some(to) = migrated_to {
            // The guest runs on the destination now: this VM ends, after the report was
            // written (or could not be: the client went away).
            let machine = target.machine.locked().clone();
            if let Some(m) = machine {
                m.exit.request(devices::exit::ExitReason::Migrated(to));
            }
        }
        if !written {
            return;
        }
    }
}

fn handle(req: &Value, target: &ApiTarget) -> Result<Value, String> {
    let cmd = req
        .get("cmd")
        .and_then(Value::as_str)
        .ok_or("the request has no \"cmd\"")?;
    let machine = target.machine.locked().clone();
    let Some(m) = machine else {
        return handle_waiting(cmd, req, target);
    };
    match cmd {
        "status" => {
            let l = *m.lifecycle.locked();
            let mut v = json!({"ok": true, "memory": m.config.memory, "cpus": m.config.cpus});
            let state = match l {
                Lifecycle::Running => "running",
                Lifecycle::Paused => "paused",
                Lifecycle::HandoverUnconfirmed => {
                    v["resolve"] = json!(UNCONFIRMED_HELP);
                    "handover-unconfirmed"
                }
            };
            v["state"] = json!(state);
            if let Some(p) = m.progress.json() {
                v["migration"] = p;
            }
            Ok(v)
        }
        "pause" => {
            let mut l = m.lifecycle.locked();
            if *l == Lifecycle::Running {
                m.pause_vcpus().map_err(|e| e.to_string())?;
                *l = Lifecycle::Paused;
            }
            Ok(json!({"ok": true}))
        }
        "resume" => {
            let mut l = m.lifecycle.locked();
            match *l {
                Lifecycle::Paused => {
                    m.resume_vcpus();
                    *l = Lifecycle::Running;
                }
                Lifecycle::HandoverUnconfirmed => {
                    if req.get("force").and_then(Value::as_bool) != Some(true) {
                        return Err(format!("resume: {UNCONFIRMED_HELP}"));
                    }
                    log::warn!("resuming a guest whose hand-over was not confirmed (forced)");
                    migration::resume_after_handover(&m);
                    *l = Lifecycle::Running;
                }
                Lifecycle::Running => {}
            }
            Ok(json!({"ok": true}))
        }
        "snapshot" => {
            let dir = req
                .get("dir")
                .and_then(Value::as_str)
                .ok_or("snapshot needs \"dir\"")?;
            let verify = req.get("verify").and_then(Value::as_bool).unwrap_or(false);
            let r = snapshot(&m, Path::new(dir), verify).map_err(|e| e.to_string())?;
            Ok(
                json!({"ok": true, "path": Path::new(dir).join("snapshot.vmm"),
                      "pages": r.pages, "bytes": r.bytes, "total_ms": r.total_ms}),
            )
        }
        "migrate" => {
            let mut args = req.clone();
            if let Some(o) = args.as_object_mut() {
                o.remove("cmd");
            }
            let opts: MigrateOptions =
                serde_json::from_value(args).map_err(|e| format!("migrate: {e}"))?;
            if opts.to.is_empty() {
                return Err("migrate needs \"to\"".into());
            }
            let r = migrate(&m, &opts).map_err(|e| e.to_string())?;
            let mut v = serde_json::to_value(&r).map_err(|e| e.to_string())?;
            if let Some(o) = v.as_object_mut() {
                o.insert("ok".into(), json!(true));
            }
            Ok(v)
        }
        "quit" => {
            m.exit.request(devices::exit::ExitReason::Stopped);
            Ok(json!({"ok": true}))
        }
        "restore" | "receive" => Err(format!(
            "{cmd}: the VM is already running (start vmm with --incoming defer to {cmd} into it)"
        )),
        "commit" | "discard" => Err(format!("{cmd}: no hand-over is waiting here")),
        // Test only: a system call outside the API threads' filter.
        "test-forbidden-syscall" if std::env::var_os("VMM_TEST_SECCOMP").is_some() => {
            // SAFETY: all-zero bytes are a valid `sysinfo` (integers only).
            let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
            // SAFETY: sysinfo writes into the buffer given, which outlives the call.
            let r = unsafe { libc::sysinfo(&mut info) };
            Ok(json!({"ok": true, "sysinfo": r}))
        }
        other => Err(format!("unknown command \"{other}\"")),
    }
}

/// What a source whose hand-over was not confirmed tells the user.
const UNCONFIRMED_HELP: &str = "the guest was handed over (COMMIT sent) but the destination \
     did not confirm: it may run there. Ask the destination: if it runs the guest (or waits \
     in \"awaiting-commit\": then \"commit\" there), \"quit\" here; if it discarded it, \
     resume here with \"force\":true";

fn handle_waiting(cmd: &str, req: &Value, target: &ApiTarget) -> Result<Value, String> {
    let pending = target.handover.locked().clone();
    if let Some((why, decide)) = pending {
        return match cmd {
            "status" => Ok(json!({"ok": true, "state": "awaiting-commit", "resolve": why})),
            "commit" | "discard" | "quit" => {
                decide
                    .send(cmd == "commit")
                    .map_err(|_| "the hand-over is over".to_string())?;
                Ok(json!({"ok": true}))
            }
            other => Err(format!(
                "{other}: a received guest waits for \"commit\" or \"discard\" ({why})"
            )),
        };
    }
    let source = match cmd {
        "status" => return Ok(json!({"ok": true, "state": "waiting"})),
        "restore" => Source::Snapshot(
            req.get("dir")
                .and_then(Value::as_str)
                .ok_or("restore needs \"dir\"")?
                .into(),
        ),
        "receive" => Source::Listen(
            req.get("from")
                .and_then(Value::as_str)
                .ok_or("receive needs \"from\"")?
                .parse()?,
        ),
        other => {
            return Err(format!(
                "{other}: the VM waits for a guest (restore or receive first)"
            ))
        }
    };
    let tx = target
        .incoming
        .locked()
        .clone()
        .ok_or("the VM is not waiting for a guest")?;
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    tx.send((source, reply_tx))
        .map_err(|_| "the VM is gone".to_string())?;
    reply_rx
        .recv()
        .map_err(|_| "the VM is gone".to_string())??;
    Ok(json!({"ok": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_and_root_may_use_the_api() {
        assert!(uid_allowed(1000, 1000));
        assert!(uid_allowed(0, 1000));
        assert!(!uid_allowed(1001, 1000));
        assert!(!uid_allowed(65534, 0));
    }

    #[test]
    fn a_request_line_is_capped() {
        let mut two = std::io::Cursor::new(b"{\"cmd\":\"status\"}\nnext".to_vec());
        assert_eq!(
            read_request(&mut two).unwrap().unwrap(),
            b"{\"cmd\":\"status\"}"
        );
        assert_eq!(read_request(&mut two).unwrap().unwrap(), b"next");
        assert_eq!(read_request(&mut two).unwrap(), None);
        let mut exact = std::io::Cursor::new(vec![b'x'; MAX_REQUEST]);
        assert_eq!(
            read_request(&mut exact).unwrap().unwrap().len(),
            MAX_REQUEST
        );
        let mut long = std::io::Cursor::new(vec![b'x'; MAX_REQUEST + 1]);
        assert!(read_request(&mut long)
            .unwrap_err()
            .contains("longer than 65536 bytes"));
    }
}
