//! `vmm-ctl`: drives a running `vmm` through its control API (`--api-socket PATH`): one
//! JSON request per command, the answer printed readably (or as JSON with `--json`), a
//! progress bar while a migration runs, and exit status 1 when the VMM answers
//! `{"ok":false}` (2 for a bad command line, as clap does).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Drive a running vmm through its control API.
#[derive(Parser, Debug)]
#[command(name = "vmm-ctl", version)]
struct Cli {
    /// The VMM's API socket (its `--api-socket PATH`).
    #[arg(long, short = 's', value_name = "PATH")]
    socket: PathBuf,
    /// Print the VMM's JSON answer as it is.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// State of the VM (and of a migration in progress).
    Status,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs (`--force` after an unconfirmed hand-over).
    Resume {
        /// Resume a guest that may already run on the destination.
        #[arg(long)]
        force: bool,
    },
    /// Write a snapshot into DIR.
    Snapshot {
        /// Directory for `snapshot.vmm`.
        dir: PathBuf,
        /// Store page hashes that a restore checks.
        #[arg(long)]
        verify: bool,
    },
    /// Migrate the running guest to TO (`unix:PATH` or `tcp:HOST:PORT`).
    Migrate {
        /// Where the destination listens.
        to: String,
        /// Compare every RAM page of both sides before the guest runs again.
        #[arg(long)]
        verify: bool,
        /// Most pre-copy rounds after the full copy.
        #[arg(long, value_name = "N")]
        max_rounds: Option<u32>,
        /// Stop and copy once at most this many pages are dirty.
        #[arg(long, value_name = "N")]
        max_dirty_pages: Option<u64>,
        /// Milliseconds each side waits for the other during the hand-over.
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
        /// Most bytes per second the pre-copy rounds send (the stop-and-copy phase is not
        /// limited).
        #[arg(long, value_name = "BYTES")]
        max_bandwidth: Option<u64>,
        /// Unsafe: do not harvest passthrough devices' dirty pages.
        #[arg(long)]
        no_device_dirty_tracking: bool,
    },
    /// Restore a snapshot into a VM started with `--incoming defer`.
    Restore {
        /// Directory holding `snapshot.vmm`.
        dir: PathBuf,
    },
    /// Receive a migration into a VM started with `--incoming defer`.
    Receive {
        /// Where to listen (`unix:PATH` or `tcp:HOST:PORT`).
        from: String,
    },
    /// Run a received guest whose hand-over was not confirmed.
    Commit,
    /// Drop a received guest whose hand-over was not confirmed.
    Discard,
    /// Stop the VM.
    Quit,
}

fn request(cmd: &Cmd) -> Value {
    match cmd {
        Cmd::Status => json!({"cmd": "status"}),
        Cmd::Pause => json!({"cmd": "pause"}),
        Cmd::Resume { force } => json!({"cmd": "resume", "force": force}),
        Cmd::Snapshot { dir, verify } => {
            json!({"cmd": "snapshot", "dir": dir, "verify": verify})
        }
        Cmd::Migrate {
            to,
            verify,
            max_rounds,
            max_dirty_pages,
            timeout_ms,
            max_bandwidth,
            no_device_dirty_tracking,
        } => {
            let mut v = json!({"cmd": "migrate", "to": to, "verify": verify});
            if let Some(n) = max_rounds {
                v["max_rounds"] = json!(n);
            }
            if let Some(n) = max_dirty_pages {
                v["max_dirty_pages"] = json!(n);
            }
            if let Some(n) = timeout_ms {
                v["timeout_ms"] = json!(n);
            }
            if let Some(n) = max_bandwidth {
                v["max_bandwidth"] = json!(n);
            }
            if *no_device_dirty_tracking {
                v["device_dirty_tracking"] = json!(false);
            }
            v
        }
        Cmd::Restore { dir } => json!({"cmd": "restore", "dir": dir}),
        Cmd::Receive { from } => json!({"cmd": "receive", "from": from}),
        Cmd::Commit => json!({"cmd": "commit"}),
        Cmd::Discard => json!({"cmd": "discard"}),
        Cmd::Quit => json!({"cmd": "quit"}),
    }
}

/// Sends `req` on a fresh connection and reads the one-line answer.
fn call(socket: &Path, req: &Value) -> Result<Value, String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let mut w = stream
        .try_clone()
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    // A VMM that refuses the connection answers and closes at once, maybe before the
    // request is written: its answer is still there to read.
    let sent = writeln!(w, "{req}");
    let mut line = String::new();
    let read = BufReader::new(stream).read_line(&mut line);
    if line.is_empty() {
        let why = match (sent, read) {
            (Err(e), _) | (Ok(()), Err(e)) => e.to_string(),
            (Ok(()), Ok(_)) => "the VMM closed the connection".into(),
        };
        return Err(format!("{}: {why}", socket.display()));
    }
    serde_json::from_str(&line).map_err(|e| format!("the VMM's answer is not JSON: {e}"))
}

/// Polls `status` while a migration runs and draws its progress.
fn progress(socket: PathBuf, done: Arc<AtomicBool>) {
    let bar = indicatif::ProgressBar::new(0);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} pages {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    while !done.load(Ordering::Acquire) {
        if let Ok(v) = call(&socket, &json!({"cmd": "status"})) {
            if let Some(m) = v.get("migration") {
                let n = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
                bar.set_prefix(format!(
                    "{} round {}",
                    m.get("phase").and_then(Value::as_str).unwrap_or("?"),
                    n("round")
                ));
                bar.set_length(n("round_pages").max(n("round_sent")));
                bar.set_position(n("round_sent"));
                bar.set_message(format!(
                    "{} MiB sent, {} pages dirty ({} pages/s), expected downtime {} ms",
                    (n("pages_sent") * 4096) >> 20,
                    n("dirty_pages"),
                    n("dirty_rate"),
                    n("expected_downtime_ms")
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_and_clear();
}

/// The answer, readable.
fn show(cmd: &Cmd, v: &Value) -> String {
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    match cmd {
        Cmd::Status => {
            let mut s = format!(
                "{}: {} MiB, {} vCPUs",
                v["state"].as_str().unwrap_or("?"),
                n(v, "memory") >> 20,
                n(v, "cpus")
            );
            if let Some(r) = v.get("resolve").and_then(Value::as_str) {
                s.push_str(&format!("\n{r}"));
            }
            if let Some(m) = v.get("migration") {
                s.push_str(&format!(
                    "\nmigrating: {} round {}, {} MiB sent",
                    m["phase"].as_str().unwrap_or("?"),
                    n(m, "round"),
                    (n(m, "pages_sent") * 4096) >> 20
                ));
            }
            s
        }
        Cmd::Snapshot { .. } => format!(
            "snapshot {}: {} pages, {} MiB, {} ms",
            v["path"].as_str().unwrap_or("?"),
            n(v, "pages"),
            n(v, "bytes") >> 20,
            n(v, "total_ms")
        ),
        Cmd::Migrate { .. } => {
            let mut s = String::new();
            for r in v["rounds"].as_array().into_iter().flatten() {
                s.push_str(&format!(
                    "round {}: {} pages in {} ms, {} dirty after it\n",
                    n(r, "round"),
                    n(r, "pages"),
                    n(r, "ms"),
                    n(r, "dirty_after")
                ));
            }
            let by = &v["dirty_by_source"];
            s.push_str(&format!(
                "stop-and-copy: {} pages; downtime {} ms; total {} ms; {} MiB sent\n\
                 dirty pages by source: vCPUs {}, VMM devices {}, passthrough devices {} \
                 ({} device dirty reads); untracked devices: {}\n",
                n(v, "final_pages"),
                n(v, "downtime_ms"),
                n(v, "total_ms"),
                n(v, "bytes") >> 20,
                n(by, "kvm"),
                n(by, "vmm_devices"),
                n(by, "passthrough"),
                n(v, "device_dirty_reads"),
                v["untracked_devices"]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map(|a| a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_else(|| "none".into())
            ));
            if n(v, "verified_pages") > 0 {
                s.push_str(&format!(
                    "verify: {} RAM pages identical on both sides\n",
                    n(v, "verified_pages")
                ));
            }
            s.push_str("migrated");
            s
        }
        _ => "ok".into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let req = request(&cli.cmd);
    let done = Arc::new(AtomicBool::new(false));
    let bar = matches!(cli.cmd, Cmd::Migrate { .. }) && !cli.json;
    let poller = bar.then(|| {
        let (s, d) = (cli.socket.clone(), done.clone());
        std::thread::spawn(move || progress(s, d))
    });
    let answer = call(&cli.socket, &req);
    done.store(true, Ordering::Release);
    if let Some(p) = poller {
        let _ = p.join();
    }
    match answer {
        Err(e) => {
            eprintln!("vmm-ctl: {e}");
            ExitCode::FAILURE
        }
        Ok(v) => {
            let ok = v.get("ok").and_then(Value::as_bool) == Some(true);
            if cli.json {
                println!("{v}");
            } else if ok {
                println!("{}", show(&cli.cmd, &v));
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                if !cli.json {
                    eprintln!(
                        "vmm-ctl: {}",
                        v.get("error").and_then(Value::as_str).unwrap_or("failed")
                    );
                }
                ExitCode::FAILURE
            }
        }
    }
}
