//! The control API: a Unix socket (`--api-socket PATH`) taking one JSON object per line and
//! answering each with one JSON line.
//!
//! | request | answer |
//! | --- | --- |
//! | `{"cmd":"status"}` | `{"ok":true,"state":"running"\|"paused"\|"waiting","memory":N,"cpus":N}` |
//! | `{"cmd":"pause"}`, `{"cmd":"resume"}` | `{"ok":true}` |
//! | `{"cmd":"snapshot","dir":"PATH"}` | `{"ok":true,"path":..,"pages":N,"bytes":N,"total_ms":N}` |
//! | `{"cmd":"migrate","to":"unix:PATH"\|"tcp:HOST:PORT", ...}` | the migration report |
//! | `{"cmd":"restore","dir":"PATH"}` | `{"ok":true}` (only with `--incoming defer`) |
//! | `{"cmd":"receive","from":"unix:PATH"\|"tcp:HOST:PORT"}` | `{"ok":true}` (same) |
//! | `{"cmd":"quit"}` | `{"ok":true}`, then the VM stops |
//!
//! `migrate` also takes `max_rounds` (30), `max_dirty_pages` (256) and
//! `device_dirty_tracking` (true; false is unsafe and only shows that device writes would be
//! lost). Errors answer `{"ok":false,"error":"..."}` and change nothing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
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
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let t = target.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || serve(conn, &t));
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
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req, target).unwrap_or_else(|e| json!({"ok": false, "error": e})),
            Err(e) => json!({"ok": false, "error": format!("not JSON: {e}")}),
        };
        if writeln!(out, "{reply}").is_err() {
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
            let state = match *m.lifecycle.lock().unwrap_or_else(|e| e.into_inner()) {
                Lifecycle::Running => "running",
                Lifecycle::Paused => "paused",
            };
            Ok(
                json!({"ok": true, "state": state, "memory": m.config.memory,
                      "cpus": m.config.cpus}),
            )
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
            if *l == Lifecycle::Paused {
                m.resume_vcpus();
                *l = Lifecycle::Running;
            }
            Ok(json!({"ok": true}))
        }
        "snapshot" => {
            let dir = req
                .get("dir")
                .and_then(Value::as_str)
                .ok_or("snapshot needs \"dir\"")?;
            let r = snapshot(&m, Path::new(dir)).map_err(|e| e.to_string())?;
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
        other => Err(format!("unknown command \"{other}\"")),
    }
}

fn handle_waiting(cmd: &str, req: &Value, target: &ApiTarget) -> Result<Value, String> {
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
