//! The control API: a Unix socket (`--api-socket PATH`) taking one JSON object per line and
//! answering each with one JSON line.
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

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::*;

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
        *self.handover.lock().unwrap_or_else(|e| e.into_inner()) = Some((why.to_string(), tx));
        let decision = rx.recv().ok();
        *self.handover.lock().unwrap_or_else(|e| e.into_inner()) = None;
        decision
    }
}

/// Starts serving `path` on a thread of its own.
///
/// # Errors
/// When the socket cannot be bound.
pub fn start(path: &Path, target: Arc<ApiTarget>) -> std::io::Result<()> {
    if path.exists() {
        // A stale socket from an earlier run.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)?;
    target.serving.store(true, Ordering::Release);
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            devices::seccomp::confine("api", devices::seccomp::lists::API);
            for conn in listener.incoming().flatten() {
                let t = target.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        // Under the API listener's filter, inherited.
                        devices::seccomp::name_thread("api");
                        serve(conn, &t)
                    });
            }
        })?;
    Ok(())
}

fn serve(conn: UnixStream, target: &ApiTarget) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
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
            let machine = target
                .machine
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
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
    let machine = target
        .machine
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(m) = machine else {
        return handle_waiting(cmd, req, target);
    };
    match cmd {
        "status" => {
            let l = *m.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
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
            let mut l = m.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
            if *l == Lifecycle::Running {
                m.pause_vcpus().map_err(|e| e.to_string())?;
                *l = Lifecycle::Paused;
            }
            Ok(json!({"ok": true}))
        }
        "resume" => {
            let mut l = m.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
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
                    super::send::resume_after_handover(&m);
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
    let pending = target
        .handover
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
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
        .lock()
        .unwrap_or_else(|e| e.into_inner())
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
