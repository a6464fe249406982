//! The control API: a Unix socket (`--api-socket PATH`, mode 0600, peers of another uid
//! than the VMM's or root's refused) taking one JSON object per line (at most
//! [`MAX_REQUEST`] bytes; [`MAX_CONNECTIONS`] at once) and answering each with one JSON line.
//!
//! | request | answer |
//! | --- | --- |
//! | `{"cmd":"status"}` | `{"ok":true,"state":"running"\|"paused"\|"waiting"\|"awaiting-commit"\|"handover-unconfirmed","memory":N,"cpus":N}`, and while a migration runs `"migration":{"phase","round","pages_sent","round_pages","round_sent","dirty_pages","dirty_rate","expected_downtime_ms"}` |
//! | `{"cmd":"counters"}` | `{"ok":true,"counters":["NAME: key=value ...", ...]}`: one line per device, as `--counters` prints them at exit |
//! | `{"cmd":"pause"}`, `{"cmd":"resume"}` | `{"ok":true}` (`resume` of a handed-over guest needs `"force":true`) |
//! | `{"cmd":"snapshot","dir":"PATH"[,"verify":true]}` | `{"ok":true,"path":..,"pages":N,"bytes":N,"total_ms":N}` |
//! | `{"cmd":"migrate","to":"unix:PATH"\|"tcp:HOST:PORT,tls=DIR"\|"tcp:HOST:PORT,insecure", ...}` | the migration report |
//! | `{"cmd":"restore","dir":"PATH"}` | `{"ok":true}` (only with `--incoming defer`) |
//! | `{"cmd":"receive","from":"unix:PATH"\|"tcp:HOST:PORT,tls=DIR"\|"tcp:HOST:PORT,insecure"}` | `{"ok":true}` (same) |
//! | `{"cmd":"commit"}`, `{"cmd":"discard"}` | `{"ok":true}`: a destination whose hand-over was not confirmed runs, or drops, the guest |
//! | `{"cmd":"add-device","vfio-user":"socket=PATH[,iommu=on][,dma=...]"[,"wait":SECS]}` or `"vfio":"path=SYSFS[,iommu=on]"` | `{"ok":true,"added":{"id","bdf","iommu","enabled","plugged_ms","enabled_ms"}}`: the device in a free `--hotplug` slot, once the guest enabled it (or `"enabled":false` after `wait`, 30 s) |
//! | `{"cmd":"remove-device","id":"ID"[,"wait":SECS]}` | `{"ok":true,"removed":{"id","bdf","ejected","ejected_ms","host_maps","host_unmaps","mapped_bytes_left","left_attached","domain_freed"}}`: the guest asked to eject it; after `wait` (30 s) it goes without the guest, and the answer is `{"ok":false,"error":"the guest did not eject ID ... host_maps=N host_unmaps=N mapped_bytes_left=N"}` |
//! | `{"cmd":"quit"}` | `{"ok":true}`, then the VM stops |
//!
//! `migrate` also takes `max_rounds` (30, at most 62), `max_dirty_pages` (256), `verify` (false: compare
//! every RAM page of both sides before the guest runs again), `timeout_ms` (30000: how long
//! each side waits for the other during the hand-over), `max_bandwidth` (0: no limit; bytes
//! per second of the pre-copy rounds, QEMU's `max-bandwidth`) and `device_dirty_tracking` (true;
//! false is unsafe and only shows that device writes would be lost). Errors answer
//! `{"ok":false,"error":"..."}` and change nothing.
//!
//! The messages are typed: [`protocol::Request`] (tagged by `"cmd"`) and
//! [`protocol::Response`], shared with `vmm-ctl`; a failure is an [`ApiError`], whose text is
//! the answer's `"error"`.
//!
//! The hand-over is fenced: the destination runs the guest only after the source's COMMIT,
//! which the source sends only after the destination's ACK (and a matching verify). A source
//! that gets no ACK in time resumes (the destination discards on its ABORT, or waits for the
//! user); a source that sent COMMIT but got no DONE stays stopped in `handover-unconfirmed`;
//! a destination that got no COMMIT waits in `awaiting-commit`. Neither ever runs the guest
//! on its own then: `status` on both says which command resolves it.

#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;
pub mod protocol;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use sync::MutexExt;

use crate::machine::{hotplug, Lifecycle, Machine, MachineError};
use crate::migration::{self, migrate, peer, snapshot, HandoverResolver, MigrationError, Source};
use protocol::{Reply, Request, Response, SnapshotReply, StatusReply, VmState};

/// A request to bring a guest in, from the API to the VM waiting with `--incoming defer`.
pub type IncomingRequest = (Source, Sender<Result<(), MigrationError>>);

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
            log::error!("migration: {why}");
            return None;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        *self.handover.locked() = Some((why.to_string(), tx));
        // Logged once `status` says `awaiting-commit`: whoever reads the line finds the state
        // it describes.
        log::error!("migration: {why}");
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
    target.serving.store(true, Ordering::Release);
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            devices::seccomp::confine("api", devices::seccomp::lists::API);
            for mut conn in listener.incoming().flatten() {
                if let Err(why) = admit(&conn, &live) {
                    log::warn!("API: {why}");
                    let _ = writeln!(conn, "{}", answer_line(&Response::error(why)));
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

/// Whether a peer may use the API: its uid is the VMM's or root's
/// ([`peer::check_uid`]), and fewer than [`MAX_CONNECTIONS`] are being served. The error
/// says why not.
fn admit(conn: &UnixStream, live: &std::sync::atomic::AtomicUsize) -> Result<(), String> {
    peer::check_uid(conn).map_err(|why| format!("refused: {why}"))?;
    if live.load(Ordering::Acquire) >= MAX_CONNECTIONS {
        return Err(format!(
            "refused: {MAX_CONNECTIONS} connections are open already"
        ));
    }
    Ok(())
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

/// Why a request was refused or failed; its text is the answer's `"error"`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The line is not a request.
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The line is JSON but not a request this API takes.
    #[error("bad request: {0}")]
    BadRequest(#[source] serde_json::Error),
    /// Not in the VM's present state; the text says what would be.
    #[error("{0}")]
    NotNow(String),
    /// A snapshot, migration or restore failed.
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// Pausing or resuming the machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The part of the VMM the request goes to is gone (the VM is ending).
    #[error("the VM is gone")]
    Gone,
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
                let _ = writeln!(out, "{}", answer_line(&Response::error(e)));
                return;
            }
        };
        let line = String::from_utf8_lossy(&line);
        if line.trim().is_empty() {
            continue;
        }
        let (response, ends) = match parse_request(&line) {
            Ok(req) => {
                // A running VM that `quit` or `migrate` ends, once the answer is written.
                let running = target.machine.locked().is_some();
                match handle(&req, target) {
                    Ok(reply) => {
                        let ends = match &req {
                            Request::Migrate(o) => {
                                Some(devices::exit::ExitReason::Migrated(o.to.clone()))
                            }
                            Request::Quit if running => Some(devices::exit::ExitReason::Stopped),
                            _ => None,
                        };
                        (Response::ok(reply), ends)
                    }
                    Err(e) => (Response::error(e), None),
                }
            }
            Err(e) => (Response::error(e), None),
        };
        let written = writeln!(out, "{}", answer_line(&response)).is_ok();
        if let Some(reason) = ends {
            // After the answer was written (or could not be: the client went away): a
            // migrated guest runs on the destination now; a stopped one nowhere.
            let machine = target.machine.locked().clone();
            if let Some(m) = machine {
                m.exit.request(reason);
            }
        }
        if !written {
            return;
        }
    }
}

/// `line` as a request: JSON first (so that a line that is not JSON says so), then a
/// [`Request`].
fn parse_request(line: &str) -> Result<Request, ApiError> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(ApiError::NotJson)?;
    serde_json::from_value(v).map_err(ApiError::BadRequest)
}

fn answer_line(r: &Response) -> String {
    serde_json::to_string(r).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"error\":\"the answer cannot be written: {e}\"}}")
    })
}

/// Holds off migrations and snapshots while `what` (pause or resume) runs, or refuses it when
/// one is in progress: the vCPUs are theirs until they end, so that a `resume` never runs the
/// guest during a stop-and-copy or a hand-over.
fn not_during_a_migration<'a>(
    m: &'a Machine,
    what: &str,
) -> Result<std::sync::MutexGuard<'a, ()>, ApiError> {
    m.busy.try_lock().map_err(|_| {
        ApiError::NotNow(format!(
            "{what}: a snapshot or migration is in progress; try again when it has ended"
        ))
    })
}

fn handle(req: &Request, target: &ApiTarget) -> Result<Reply, ApiError> {
    let machine = target.machine.locked().clone();
    let Some(m) = machine else {
        return handle_waiting(req, target);
    };
    match req {
        Request::Status => {
            let (state, resolve) = match *m.lifecycle.locked() {
                Lifecycle::Running => (VmState::Running, None),
                Lifecycle::Paused => (VmState::Paused, None),
                Lifecycle::HandoverUnconfirmed => (
                    VmState::HandoverUnconfirmed,
                    Some(UNCONFIRMED_HELP.to_string()),
                ),
            };
            Ok(Reply::Status(StatusReply {
                state,
                memory: Some(m.config.memory),
                cpus: Some(m.config.cpus),
                resolve,
                migration: m.progress.status(),
            }))
        }
        Request::Counters => Ok(Reply::Counters {
            counters: m.devices.counters_report(),
        }),
        Request::AddDevice {
            vfio_user,
            vfio,
            wait,
        } => {
            let bad =
                |key: &'static str| move |e: String| ApiError::NotNow(format!("`{key}`: {e}"));
            let dev = match (vfio_user, vfio) {
                (Some(v), None) => hotplug::HotDevice::VfioUser(
                    crate::config::parse_vfio_user(v).map_err(bad("vfio-user"))?,
                ),
                (None, Some(v)) => {
                    hotplug::HotDevice::Vfio(crate::config::parse_vfio(v).map_err(bad("vfio"))?)
                }
                _ => {
                    return Err(ApiError::NotNow(
                        "add-device takes one of `vfio-user` and `vfio`".into(),
                    ))
                }
            };
            let wait = wait.map_or(hotplug::DEFAULT_WAIT, std::time::Duration::from_secs);
            Ok(Reply::Added {
                added: m.add_device(&dev, wait)?,
            })
        }
        Request::RemoveDevice { id, wait } => {
            let wait = wait.map_or(hotplug::DEFAULT_WAIT, std::time::Duration::from_secs);
            Ok(Reply::Removed {
                removed: m.remove_device(id, wait)?,
            })
        }
        Request::Pause => {
            let _busy = not_during_a_migration(&m, "pause")?;
            let mut l = m.lifecycle.locked();
            if *l == Lifecycle::Running {
                m.pause_vcpus()?;
                *l = Lifecycle::Paused;
            }
            Ok(Reply::Done {})
        }
        Request::Resume { force } => {
            let _busy = not_during_a_migration(&m, "resume")?;
            let mut l = m.lifecycle.locked();
            match *l {
                Lifecycle::Paused => {
                    m.resume_vcpus();
                    *l = Lifecycle::Running;
                }
                Lifecycle::HandoverUnconfirmed => {
                    if !force {
                        return Err(ApiError::NotNow(format!("resume: {UNCONFIRMED_HELP}")));
                    }
                    log::warn!("resuming a guest whose hand-over was not confirmed (forced)");
                    migration::resume_after_handover(&m);
                    *l = Lifecycle::Running;
                }
                Lifecycle::Running => {}
            }
            Ok(Reply::Done {})
        }
        Request::Snapshot { dir, verify } => {
            let r = snapshot(&m, dir, *verify)?;
            Ok(Reply::Snapshot(SnapshotReply {
                path: dir.join("snapshot.vmm"),
                pages: r.pages,
                bytes: r.bytes,
                total_ms: r.total_ms,
            }))
        }
        Request::Migrate(opts) => {
            if opts.to.is_empty() {
                return Err(ApiError::NotNow("migrate needs \"to\"".into()));
            }
            Ok(Reply::Migrated(Box::new(migrate(&m, opts)?)))
        }
        // The VM stops once the answer is written (`serve`): a client always gets it.
        Request::Quit => Ok(Reply::Done {}),
        Request::Restore { .. } | Request::Receive { .. } => Err(ApiError::NotNow(format!(
            "{0}: the VM is already running (start vmm with --incoming defer to {0} into it)",
            req.name()
        ))),
        Request::Commit | Request::Discard => Err(ApiError::NotNow(format!(
            "{}: no hand-over is waiting here",
            req.name()
        ))),
        // Test only: a system call outside the API threads' filter.
        #[cfg(feature = "test-hooks")]
        Request::TestForbiddenSyscall if std::env::var_os("VMM_TEST_SECCOMP").is_some() => {
            // SAFETY: all-zero bytes are a valid `sysinfo` (integers only).
            let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
            // SAFETY: sysinfo writes into the buffer given, which outlives the call.
            let r = unsafe { libc::sysinfo(&mut info) };
            Ok(Reply::Syscall { sysinfo: r })
        }
        #[cfg(feature = "test-hooks")]
        Request::TestForbiddenSyscall => Err(ApiError::NotNow(format!(
            "unknown command \"{}\"",
            req.name()
        ))),
    }
}

/// What a source whose hand-over was not confirmed tells the user.
const UNCONFIRMED_HELP: &str = "the guest was handed over (COMMIT sent) but the destination \
     did not confirm: it may run there. Ask the destination: if it runs the guest (or waits \
     in \"awaiting-commit\": then \"commit\" there), \"quit\" here; if it discarded it, \
     resume here with \"force\":true";

fn handle_waiting(req: &Request, target: &ApiTarget) -> Result<Reply, ApiError> {
    let pending = target.handover.locked().clone();
    if let Some((why, decide)) = pending {
        return match req {
            Request::Status => Ok(Reply::Status(StatusReply {
                state: VmState::AwaitingCommit,
                memory: None,
                cpus: None,
                resolve: Some(why),
                migration: None,
            })),
            Request::Commit | Request::Discard | Request::Quit => {
                decide
                    .send(matches!(req, Request::Commit))
                    .map_err(|_| ApiError::NotNow("the hand-over is over".into()))?;
                Ok(Reply::Done {})
            }
            other => Err(ApiError::NotNow(format!(
                "{}: a received guest waits for \"commit\" or \"discard\" ({why})",
                other.name()
            ))),
        };
    }
    let source = match req {
        Request::Status => {
            return Ok(Reply::Status(StatusReply {
                state: VmState::Waiting,
                memory: None,
                cpus: None,
                resolve: None,
                migration: None,
            }))
        }
        Request::Restore { dir } => Source::Snapshot(dir.clone()),
        Request::Receive { from } => Source::Listen(from.parse().map_err(ApiError::NotNow)?),
        other => {
            return Err(ApiError::NotNow(format!(
                "{}: the VM waits for a guest (restore or receive first)",
                other.name()
            )))
        }
    };
    let tx = target
        .incoming
        .locked()
        .clone()
        .ok_or_else(|| ApiError::NotNow("the VM is not waiting for a guest".into()))?;
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    tx.send((source, reply_tx)).map_err(|_| ApiError::Gone)?;
    reply_rx.recv().map_err(|_| ApiError::Gone)??;
    Ok(Reply::Done {})
}

#[cfg(test)]
mod tests {
    use super::*;

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
