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
use vmm::api::protocol::{Reply, Request, Response, StatusReply};
use vmm::migration::MigrateOptions;

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
    /// Every device's counters, one line per device.
    Counters,
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
    /// Migrate the running guest to TO (`unix:PATH`, `tcp:HOST:PORT,tls=DIR` or
    /// `tcp:HOST:PORT,insecure`).
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
        /// Where to listen (`unix:PATH`, `tcp:HOST:PORT,tls=DIR` or `tcp:HOST:PORT,insecure`).
        from: String,
    },
    /// Run a received guest whose hand-over was not confirmed.
    Commit,
    /// Drop a received guest whose hand-over was not confirmed.
    Discard,
    /// Add a passthrough device in a free hot-plug slot of a VM started with `--hotplug`:
    /// `add-device vfio-user socket=PATH[,iommu=on][,dma=...]` (what `--vfio-user` takes) or
    /// `add-device vfio path=SYSFS[,iommu=on]` (what `--vfio` takes). Prints its id and BDF
    /// once the guest enabled it.
    AddDevice {
        /// The kind of device: `vfio-user` or `vfio`.
        #[arg(value_parser = ["vfio-user", "vfio"])]
        kind: String,
        /// Its options, as the VMM's flag of that name takes them.
        options: String,
        /// Seconds to wait for the guest (default 30).
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Remove a hot-added device: the guest is asked to eject it; after the wait it goes
    /// without the guest.
    RemoveDevice {
        /// The id `add-device` printed.
        id: String,
        /// Seconds to wait for the guest's eject (default 30).
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Stop the VM.
    Quit,
}

fn request(cmd: &Cmd) -> Request {
    match cmd {
        Cmd::Status => Request::Status,
        Cmd::Counters => Request::Counters,
        Cmd::Pause => Request::Pause,
        Cmd::Resume { force } => Request::Resume { force: *force },
        Cmd::Snapshot { dir, verify } => Request::Snapshot {
            dir: dir.clone(),
            verify: *verify,
        },
        Cmd::Migrate {
            to,
            verify,
            max_rounds,
            max_dirty_pages,
            timeout_ms,
            max_bandwidth,
            no_device_dirty_tracking,
        } => {
            let d = MigrateOptions::default();
            Request::Migrate(MigrateOptions {
                to: to.clone(),
                verify: *verify,
                max_rounds: max_rounds.unwrap_or(d.max_rounds),
                max_dirty_pages: max_dirty_pages.unwrap_or(d.max_dirty_pages),
                timeout_ms: timeout_ms.unwrap_or(d.timeout_ms),
                max_bandwidth: max_bandwidth.unwrap_or(d.max_bandwidth),
                device_dirty_tracking: !no_device_dirty_tracking,
            })
        }
        Cmd::Restore { dir } => Request::Restore { dir: dir.clone() },
        Cmd::Receive { from } => Request::Receive { from: from.clone() },
        Cmd::Commit => Request::Commit,
        Cmd::Discard => Request::Discard,
        Cmd::AddDevice {
            kind,
            options,
            wait,
        } => Request::AddDevice {
            vfio_user: (kind == "vfio-user").then(|| options.clone()),
            vfio: (kind == "vfio").then(|| options.clone()),
            wait: *wait,
        },
        Cmd::RemoveDevice { id, wait } => Request::RemoveDevice {
            id: id.clone(),
            wait: *wait,
        },
        Cmd::Quit => Request::Quit,
    }
}

/// Sends `req` on a fresh connection and reads the one-line answer: the line as it came,
/// and as a [`Response`].
fn call(socket: &Path, req: &Request) -> Result<(String, Response), String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let mut w = stream
        .try_clone()
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let line = serde_json::to_string(req).map_err(|e| format!("the request: {e}"))?;
    // A VMM that refuses the connection answers and closes at once, maybe before the
    // request is written: its answer is still there to read.
    let sent = writeln!(w, "{line}");
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if answer.is_empty() {
        let why = match (sent, read) {
            (Err(e), _) | (Ok(()), Err(e)) => e.to_string(),
            (Ok(()), Ok(_)) => "the VMM closed the connection".into(),
        };
        return Err(format!("{}: {why}", socket.display()));
    }
    let parsed = serde_json::from_str(&answer)
        .map_err(|e| format!("the VMM's answer is not an API answer: {e}"))?;
    Ok((answer.trim_end().to_string(), parsed))
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
        if let Ok((_, r)) = call(&socket, &Request::Status) {
            if let Reply::Status(StatusReply {
                migration: Some(m), ..
            }) = r.reply
            {
                bar.set_prefix(format!("{} round {}", m.progress.phase, m.progress.round));
                bar.set_length(m.progress.round_pages.max(m.round_sent));
                bar.set_position(m.round_sent);
                bar.set_message(format!(
                    "{} MiB sent, {} pages dirty ({} pages/s), expected downtime {} ms",
                    (m.pages_sent * 4096) >> 20,
                    m.progress.dirty_pages,
                    m.progress.dirty_rate,
                    m.progress.expected_downtime_ms
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_and_clear();
}

/// The answer, readable.
fn show(reply: &Reply) -> String {
    match reply {
        Reply::Status(st) => {
            let mut s = st.state.name().to_string();
            if let (Some(mem), Some(cpus)) = (st.memory, st.cpus) {
                s.push_str(&format!(": {} MiB, {cpus} vCPUs", mem >> 20));
            }
            if let Some(r) = &st.resolve {
                s.push_str(&format!("\n{r}"));
            }
            if let Some(m) = &st.migration {
                s.push_str(&format!(
                    "\nmigrating: {} round {}, {} MiB sent",
                    m.progress.phase,
                    m.progress.round,
                    (m.pages_sent * 4096) >> 20
                ));
            }
            s
        }
        Reply::Counters { counters } => counters.join("\n"),
        Reply::Snapshot(r) => format!(
            "snapshot {}: {} pages, {} MiB, {} ms",
            r.path.display(),
            r.pages,
            r.bytes >> 20,
            r.total_ms
        ),
        Reply::Migrated(v) => {
            let mut s = String::new();
            for r in &v.rounds {
                s.push_str(&format!(
                    "round {}: {} pages in {} ms, {} dirty after it\n",
                    r.round, r.pages, r.ms, r.dirty_after
                ));
            }
            let by = &v.dirty_by_source;
            s.push_str(&format!(
                "stop-and-copy: {} pages; downtime {} ms; total {} ms; {} MiB sent\n\
                 dirty pages by source: vCPUs {}, VMM devices {}, passthrough devices {} \
                 ({} device dirty reads); untracked devices: {}\n",
                v.final_pages,
                v.downtime_ms,
                v.total_ms,
                v.bytes >> 20,
                by.kvm,
                by.vmm_devices,
                by.passthrough,
                v.device_dirty_reads,
                if v.untracked_devices.is_empty() {
                    "none".to_string()
                } else {
                    v.untracked_devices.join(", ")
                }
            ));
            if v.verified_pages > 0 {
                s.push_str(&format!(
                    "verify: {} RAM pages identical on both sides\n",
                    v.verified_pages
                ));
            }
            s.push_str("migrated");
            s
        }
        Reply::Added { added: a } => format!(
            "{} at {}{}: {} after {} ms",
            a.id,
            a.bdf,
            if a.iommu { " behind the vIOMMU" } else { "" },
            if a.enabled {
                "enabled by the guest"
            } else {
                "on the bus, not enabled by the guest yet"
            },
            a.enabled_ms
        ),
        Reply::Removed { removed: r } => format!(
            "{} removed from {} ({} after {} ms): {} host maps, {} host unmaps, {} bytes left              mapped{}",
            r.id,
            r.bdf,
            if r.ejected {
                "ejected by the guest"
            } else {
                "without the guest"
            },
            r.ejected_ms,
            r.host_maps,
            r.host_unmaps,
            r.mapped_bytes_left,
            match r.left_attached {
                Some(d) => format!("; it was still in domain {d}"),
                None => String::new(),
            }
        ),
        #[cfg(feature = "test-hooks")]
        Reply::Syscall { .. } => "ok".into(),
        Reply::Done {} => "ok".into(),
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
        Ok((line, r)) => {
            if cli.json {
                println!("{line}");
            } else if r.ok {
                println!("{}", show(&r.reply));
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                if !cli.json {
                    eprintln!("vmm-ctl: {}", r.error.as_deref().unwrap_or("failed"));
                }
                ExitCode::FAILURE
            }
        }
    }
}
